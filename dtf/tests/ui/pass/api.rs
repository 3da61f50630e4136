//! Every form of `#[dtf::test]` compiles, and registers the `TestDef` it should.
//!
//! This runs as a plain binary: `main` checks the registrations and calls the test bodies
//! directly, without the dtf harness.

use std::time::Duration;

use dtf::__private::{Isolation, ShouldPanic, TestDef};

/// `#[dtf::test]` is on the next line, `fn plain` on the one after.
const PLAIN_LINE: u32 = line!() + 2;
#[dtf::test]
fn plain() {}

#[dtf::test]
#[ignore]
fn slow() {}

#[dtf::test]
#[ignore = "needs network"]
fn with_reason() {}

#[dtf::test]
#[should_panic]
fn p() {
    panic!()
}

#[dtf::test]
#[should_panic(expected = "boom")]
fn p2() {
    panic!("boom!")
}

#[dtf::test]
fn fallible() -> Result<(), Box<dyn std::error::Error>> {
    Ok(())
}

#[dtf::test]
fn failing() -> Result<(), String> {
    Err("nope".to_owned())
}

#[dtf::test]
async fn on_tokio() {}

#[dtf::test]
async fn async_fallible() -> Result<(), Box<dyn std::error::Error>> {
    let n: u32 = "42".parse()?;
    assert_eq!(n, 42);
    Ok(())
}

#[dtf::test]
#[should_panic(expected = "async boom")]
async fn async_panics() {
    panic!("async boom")
}

#[dtf::test(timeout = "500ms")]
fn bounded() {}

#[dtf::test(timeout = "1.5s")]
fn bounded_decimal() {}

#[dtf::test(env(FOO = "bar", BAZ = "1"))]
fn configured() {}

#[dtf::test(isolation = "process")]
fn inherits_env() {}

#[dtf::test(retries = 2)]
fn r() {}

#[dtf::test(memory = "512MiB")]
fn m() {}

#[dtf::test(timeout = "2s", env(A = "1"))]
fn combined() {}

#[ignore = "written above"]
#[should_panic = "above"]
#[dtf::test]
fn markers_above() {
    panic!("above")
}

/// Documented, with lints allowed and a `cfg` that holds.
#[dtf::test]
#[allow(clippy::eq_op)]
#[cfg(not(any()))]
fn keeps_attributes() {
    assert_eq!(1, 1);
}

#[dtf::test]
#[cfg(any())]
fn configured_out() {}

#[dtf::test]
#[cfg_attr(all(), ignore = "through cfg_attr")]
fn cfg_attr_ignore() {}

mod nested {
    #[dtf::test]
    fn deep() {}

    #[dtf::test]
    pub(crate) fn callable() -> Result<u8, String> {
        Ok(7)
    }
}

/// The tests defined in this file (and not, say, in a dependency).
fn defs() -> impl Iterator<Item = &'static TestDef> {
    dtf::__private::inventory::iter::<TestDef>
        .into_iter()
        .filter(|def| def.module_path.split("::").next() == Some(module_path!()))
}

fn def(name: &str) -> &'static TestDef {
    defs()
        .find(|def| def.name == name)
        .unwrap_or_else(|| panic!("`{name}` is not registered"))
}

fn main() {
    std::panic::set_hook(Box::new(|_| {}));
    let names: Vec<&str> = defs().map(|def| def.name).collect();
    assert_eq!(names.len(), 22, "{names:?}");
    assert!(!names.contains(&"configured_out"));

    for def in defs() {
        assert!(def.file.ends_with(".rs"), "{}", def.file);
        assert!(def.line > 0);
        let result = std::panic::catch_unwind(def.func);
        match (def.should_panic, def.name) {
            (ShouldPanic::No, "failing") => assert!(matches!(result, Ok(Err(_)))),
            (ShouldPanic::No, name) => assert_eq!(result.ok(), Some(Ok(())), "{name}"),
            (_, name) => assert!(result.is_err(), "{name} should panic"),
        }
    }

    let plain_def = def("plain");
    assert!(!plain_def.module_path.contains("::"));
    assert!(!plain_def.ignore);
    assert_eq!(plain_def.should_panic, ShouldPanic::No);
    assert_eq!(plain_def.timeout, None);
    assert!(plain_def.env.is_empty());
    assert_eq!(plain_def.line, PLAIN_LINE);

    assert!(def("slow").ignore && def("slow").ignore_reason.is_none());
    assert_eq!(def("with_reason").ignore_reason, Some("needs network"));
    assert!(def("with_reason").ignore);
    assert_eq!(def("p").should_panic, ShouldPanic::Yes);
    assert_eq!(def("p2").should_panic, ShouldPanic::WithMessage("boom"));
    assert_eq!(
        def("async_panics").should_panic,
        ShouldPanic::WithMessage("async boom")
    );
    assert_eq!(def("bounded").timeout, Some(Duration::from_millis(500)));
    assert_eq!(
        def("bounded_decimal").timeout,
        Some(Duration::from_millis(1500))
    );
    assert_eq!(def("configured").env, &[("FOO", "bar"), ("BAZ", "1")]);
    assert_eq!(def("inherits_env").isolation, Some(Isolation::Process));
    assert_eq!(def("r").retries, Some(2));
    assert_eq!(def("m").memory, Some(512 * 1024 * 1024));
    assert_eq!(def("combined").timeout, Some(Duration::from_secs(2)));
    assert_eq!(def("combined").env, &[("A", "1")]);
    assert_eq!(def("markers_above").ignore_reason, Some("written above"));
    assert_eq!(
        def("markers_above").should_panic,
        ShouldPanic::WithMessage("above")
    );
    assert_eq!(
        def("cfg_attr_ignore").ignore_reason,
        Some("through cfg_attr")
    );
    assert!(def("deep").module_path.ends_with("::nested"));

    // The functions stay callable under their own names.
    plain();
    keeps_attributes();
    on_tokio();
    assert_eq!(nested::callable(), Ok(7));
}
