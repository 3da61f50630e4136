//! `cargo dtf migrate` on a generated workspace that holds every adoption trap: a binary crate
//! with unit tests (whose real `main` writes into `$HOME`), a 22-module integration target that
//! already has `harness = false` and `dtf::main!()` but loses its modules' tests, `#[tokio::test]`
//! with options, `#[test_case]`, `#[rstest]` with `#[case]` and `#[values]`, should_panic and
//! ignore combinations, nested modules with `use super::*;`, an edition 2015 crate, a renamed
//! dependency and a test that reads `USER`.
//!
//! `--check` names every test the unmigrated 22-module target loses; `--dry-run` prints a diff
//! and changes nothing; a dirty tree is refused; after the migration `cargo test` lists every
//! test libtest listed before (plus the ones that were lost) and they pass.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const CARGO_DTF: &str = env!("CARGO_BIN_EXE_cargo-dtf");

fn dtf_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../dtf")
        .canonicalize()
        .expect("the dtf checkout")
}

/// A target directory kept between runs and shared with the other generated workspaces'
/// tests (tests/common/workspace.rs), so the generated crates' dependencies build once.
fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/dtf-workspaces/shared-target")
}

fn write(root: &Path, path: &str, text: &str) {
    let path = root.join(path);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

fn generate(root: &Path) {
    let dtf = dtf_dir();
    let dtf = dtf.display();
    write(
        root,
        "Cargo.toml",
        "[workspace]\nresolver = \"2\"\nmembers = [\"bin-shell\", \"modules22\", \"attrs\", \"old2015\", \"renamed\"]\n",
    );
    // Pin the versions the repository builds with (cargo adds what is missing).
    let lock = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.lock");
    std::fs::copy(lock, root.join("Cargo.lock")).unwrap();

    write(
        root,
        "bin-shell/Cargo.toml",
        "[package]\nname = \"bin-shell\"\nversion = \"0.1.0\"\nedition = \"2021\"\n",
    );
    write(
        root,
        "bin-shell/src/main.rs",
        r#"fn greeting() -> &'static str {
    "hi"
}

/// The real program: it leaves a mark in `$HOME`.
fn main() {
    let home = std::env::var("HOME").unwrap();
    std::fs::write(format!("{home}/bin-shell-ran"), greeting()).unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greets() {
        assert_eq!(greeting(), "hi");
    }

    // `cd ~user` needs to know who the user is.
    #[test]
    fn knows_the_user() {
        assert_eq!(std::env::var("USER").as_deref(), Ok("dtf-e2e-user"));
    }
}
"#,
    );

    write(
        root,
        "modules22/Cargo.toml",
        &format!(
            "[package]\nname = \"modules22\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n\
             [dev-dependencies]\ndtf = {{ path = \"{dtf}\" }}\n\n\
             [[test]]\nname = \"big\"\npath = \"tests/big/main.rs\"\nharness = false\n"
        ),
    );
    let mut root_file = String::from("use dtf::test;\n\n");
    for n in 1..=22 {
        root_file.push_str(&format!("mod m{n:02};\n"));
        write(
            root,
            &format!("modules22/tests/big/m{n:02}.rs"),
            &format!("#[test]\nfn t{n:02}() {{\n    assert_eq!({n} + 0, {n});\n}}\n"),
        );
    }
    root_file.push_str("\n#[test]\nfn at_the_root() {}\n\ndtf::main!();\n");
    write(root, "modules22/tests/big/main.rs", &root_file);

    write(
        root,
        "attrs/Cargo.toml",
        "[package]\nname = \"attrs\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n\
         [dev-dependencies]\n\
         tokio = { version = \"1\", features = [\"rt\", \"rt-multi-thread\", \"macros\", \"time\", \"test-util\"] }\n\
         rstest = \"0.26\"\ntest-case = \"3.3\"\n",
    );
    write(root, "attrs/src/lib.rs", "");
    write(
        root,
        "attrs/tests/attrs.rs",
        r#"use rstest::rstest;
use test_case::test_case;

#[tokio::test]
async fn tokio_plain() {
    tokio::task::yield_now().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_multi() {
    assert_eq!(tokio::runtime::Handle::current().metrics().num_workers(), 2);
}

#[tokio::test(start_paused = true)]
async fn tokio_paused() {
    let start = tokio::time::Instant::now();
    tokio::time::sleep(std::time::Duration::from_secs(600)).await;
    assert!(start.elapsed().as_secs() >= 600);
}

#[test_case(1, 2 ; "small")]
#[test_case(10, 20)]
fn doubles(a: u32, b: u32) {
    assert_eq!(a * 2, b);
}

#[test_case(0)]
#[should_panic(expected = "zero")]
fn refuses_zero(n: u32) {
    assert!(n > 0, "zero");
}

#[rstest]
#[case(1)]
#[case(2)]
fn positive(#[case] n: u32) {
    assert!(n > 0);
}

#[rstest]
fn sums(#[values(1, 2)] a: u32, #[values(10)] b: u32) {
    assert!(a < b);
}

#[test]
#[should_panic(expected = "boom")]
fn panics() {
    panic!("boom!")
}

#[test]
#[ignore = "slow"]
fn ignored() {}

#[ignore]
#[test]
#[should_panic]
fn ignored_panic() {
    panic!()
}

mod nested {
    use super::*;

    #[test]
    fn outer() {}

    mod inner {
        use super::*;

        #[test]
        fn inner_test() {}
    }
}
"#,
    );

    write(
        root,
        "old2015/Cargo.toml",
        "[package]\nname = \"old2015\"\nversion = \"0.1.0\"\nedition = \"2015\"\n",
    );
    write(
        root,
        "old2015/src/lib.rs",
        "pub fn add(a: u32, b: u32) -> u32 {\n    a + b\n}\n\n#[cfg(test)]\nmod tests {\n    use super::*;\n\n    #[test]\n    fn adds() {\n        assert_eq!(add(1, 2), 3);\n    }\n}\n",
    );
    write(
        root,
        "old2015/tests/outside.rs",
        "extern crate old2015;\n\n#[test]\nfn from_outside() {\n    assert_eq!(old2015::add(2, 2), 4);\n}\n",
    );

    write(
        root,
        "renamed/Cargo.toml",
        &format!(
            "[package]\nname = \"renamed\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n\
             [dev-dependencies]\nharnessx = {{ package = \"dtf\", path = \"{dtf}\" }}\n"
        ),
    );
    write(root, "renamed/src/lib.rs", "");
    write(
        root,
        "renamed/tests/r.rs",
        "#[test]\nfn under_a_new_name() {}\n",
    );
}

fn git(root: &Path, args: &[&str]) {
    let status = Command::new("git")
        .args([
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "-c",
            "commit.gpgsign=false",
        ])
        .args(args)
        .current_dir(root)
        .status()
        .unwrap();
    assert!(status.success(), "git {args:?}");
}

fn cargo_dtf(root: &Path, args: &[&str]) -> Output {
    Command::new(CARGO_DTF)
        .args(["dtf", "migrate", "--manifest-path"])
        .arg(root.join("Cargo.toml"))
        .args(args)
        .env("CARGO_TARGET_DIR", target_dir())
        .env("CARGO_PROFILE_DEV_DEBUG", "line-tables-only")
        .current_dir(root)
        .output()
        .unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `cargo test` over the workspace, with a private HOME and a known USER.
fn cargo_test(root: &Path, home: &Path, extra: &[&str]) -> Output {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    Command::new(cargo)
        .args(["test", "--workspace", "--tests"])
        .args(extra)
        .env("CARGO_TARGET_DIR", target_dir())
        .env("CARGO_PROFILE_DEV_DEBUG", "line-tables-only")
        .env("HOME", home)
        .env("USER", "dtf-e2e-user")
        .env_remove("RUSTFLAGS")
        .current_dir(root)
        .output()
        .unwrap()
}

/// Every `NAME: test` line `cargo test -- --list --format terse` prints, sorted.
fn listed(root: &Path, home: &Path) -> Vec<String> {
    let output = cargo_test(root, home, &["--", "--list", "--format", "terse"]);
    assert!(output.status.success(), "{}", text(&output));
    let mut names: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .map(str::to_owned)
        .collect();
    names.sort();
    names
}

#[test]
fn migrate_converts_every_trap_and_loses_no_test() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("ws");
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    generate(&root);
    git(&root, &["init", "-q"]);
    git(&root, &["add", "-A"]);
    git(&root, &["commit", "-qm", "before dtf"]);
    let dtf = dtf_dir();
    let dtf_path = dtf.to_str().unwrap();

    // A dirty tree is refused, naming the file.
    write(&root, "attrs/src/lib.rs", "// work in progress\n");
    let refused = cargo_dtf(&root, &["--dtf-path", dtf_path]);
    assert_eq!(refused.status.code(), Some(101), "{}", text(&refused));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("uncommitted changes") && stderr.contains("attrs/src/lib.rs"),
        "{}",
        text(&refused)
    );
    git(&root, &["checkout", "-q", "--", "attrs/src/lib.rs"]);

    // --check names the 22 module tests the half-migrated target drops, with file and line.
    let check = cargo_dtf(&root, &["--check"]);
    assert_eq!(check.status.code(), Some(1), "{}", text(&check));
    let stdout = String::from_utf8_lossy(&check.stdout);
    let named: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains(") will not run: "))
        .collect();
    assert_eq!(named.len(), 22, "{}", text(&check));
    for n in 1..=22 {
        let line =
            format!("modules22/tests/big/m{n:02}.rs:2: `m{n:02}::t{n:02}` (modules22 test big)");
        assert!(stdout.contains(&line), "{line} missing from\n{stdout}");
    }

    let before = listed(&root, &home);
    assert!(before.contains(&"at_the_root".to_owned()) && !before.contains(&"m01::t01".to_owned()));
    // Building resolved the lock file's new entries: commit them, as a user would.
    git(&root, &["commit", "-qam", "lock file"]);

    // --dry-run prints the diff and changes nothing.
    let original = std::fs::read_to_string(root.join("bin-shell/src/main.rs")).unwrap();
    let dry = cargo_dtf(&root, &["--dry-run", "--dtf-path", dtf_path]);
    assert_eq!(dry.status.code(), Some(0), "{}", text(&dry));
    let diff = String::from_utf8_lossy(&dry.stdout);
    for expected in [
        "+++ b/bin-shell/src/main.rs",
        "-    #[test]\n+    #[dtf::test]",
        "+#[cfg(not(test))]\n /// The real program",
        "-#[tokio::test(flavor = \"multi_thread\", worker_threads = 2)]\n+#[dtf::test(flavor = \"multi_thread\", worker_threads = 2)]",
        "+[[test]]\n+name = \"outside\"\n+path = \"tests/outside.rs\"\n+harness = false",
        "+#[harnessx::test]",
    ] {
        assert!(
            diff.contains(expected),
            "`{expected}` missing from the diff:\n{diff}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(root.join("bin-shell/src/main.rs")).unwrap(),
        original
    );

    let migrated = cargo_dtf(&root, &["--dtf-path", dtf_path]);
    assert_eq!(migrated.status.code(), Some(0), "{}", text(&migrated));
    let out = String::from_utf8_lossy(&migrated.stdout);
    assert!(
        out.contains("22 more test(s) now run"),
        "{}",
        text(&migrated)
    );

    // The same tests as before, plus the 22 the harness = false target used to drop.
    let after = listed(&root, &home);
    let mut expected = before.clone();
    expected.extend((1..=22).map(|n| format!("m{n:02}::t{n:02}")));
    expected.sort();
    assert_eq!(after, expected);

    // They pass under dtf, and the binary's real `main` did not run.
    let run = cargo_test(&root, &home, &[]);
    assert!(run.status.success(), "{}", text(&run));
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        stdout.contains("test knows_the_user ... ok")
            || stdout.contains("test tests::knows_the_user ... ok"),
        "{stdout}"
    );
    assert!(
        !home.join("bin-shell-ran").exists(),
        "cargo test ran the real program"
    );

    let check = cargo_dtf(&root, &["--check"]);
    assert_eq!(check.status.code(), Some(0), "{}", text(&check));
}
