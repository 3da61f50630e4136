//! Generates the benchmark suites: many small test functions are easier to generate than to
//! write.

use std::fmt::Write;
use std::path::Path;

fn generate(out: &Path, file: &str, attr: &str, count: usize, body: impl Fn(usize) -> String) {
    let mut src = String::new();
    for i in 0..count {
        let _ = writeln!(src, "{attr}\nfn t{i:05}() {{ {} }}", body(i));
    }
    std::fs::write(out.join(file), src).expect("write generated suite");
}

fn main() {
    let out = std::env::var_os("OUT_DIR").expect("OUT_DIR");
    let out = Path::new(&out);
    generate(out, "trivial.rs", "#[dtf::test]", 1000, |_| String::new());
    generate(out, "trivial_std.rs", "#[test]", 1000, |_| String::new());
    generate(out, "sleepy.rs", "#[dtf::test]", 400, |_| {
        "std::thread::sleep(std::time::Duration::from_millis(50));".to_owned()
    });
    // 40 tests of 100 ms and one of 1000 ms: the long one is last by name.
    generate(out, "skewed.rs", "#[dtf::test]", 41, |i| {
        let ms = if i == 40 { 1000 } else { 100 };
        format!("std::thread::sleep(std::time::Duration::from_millis({ms}));")
    });
    generate(out, "many.rs", "#[dtf::test]", 10_000, |_| String::new());
    // 150 tests of 0.2 ms each over a table that takes 5 ms to build (see src/lib.rs).
    let shaped = |i: usize| format!("dtf_bench_suites::shaped_test({i});");
    generate(out, "shaped.rs", "#[dtf::test]", 150, shaped);
    generate(out, "shaped_std.rs", "#[test]", 150, shaped);
    println!("cargo::rerun-if-changed=build.rs");
}
