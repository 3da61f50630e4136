//! cargo-nextest drives dtf binaries unchanged: it lists the same tests as `--list`, reports
//! the same outcomes as a plain dtf run, and dtf's hermetic environment holds under it.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use dtf_e2e::*;

const FILTER: &str = "test(/^(pass_|fail_(panic|segfault|exit_zero|result|abort)|nested|ignored)/)";

fn nextest(args: &[&str]) -> Run {
    tool("cargo-nextest");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root())
        .args(["nextest"])
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .env_remove("DTF_PASS_ENV");
    run_bounded(&mut cmd, Duration::from_secs(300))
}

/// `name -> passed?` from nextest's human output (`PASS [..] pkg::bin name`).
fn nextest_outcomes(run: &Run) -> BTreeMap<String, bool> {
    let mut outcomes = BTreeMap::new();
    for line in run.stderr.lines().chain(run.stdout.lines()) {
        let line = line.trim_start();
        let passed = if line.starts_with("PASS [") {
            true
        } else if line.starts_with("FAIL [")
            || line.starts_with("SIGSEGV [")
            || line.starts_with("ABORT [")
        {
            false
        } else {
            continue;
        };
        if let Some(name) = line.split_whitespace().last() {
            outcomes.insert(name.to_owned(), passed);
        }
    }
    outcomes
}

#[test]
fn nextest_reports_the_same_outcomes_as_dtf() {
    let out = tempfile::tempdir().unwrap();
    let run = nextest(&[
        "run",
        "-p",
        "dtf-fixture",
        "--test",
        "fixture",
        "--no-fail-fast",
        "--color",
        "never",
        "-E",
        FILTER,
    ]);
    let via_nextest = nextest_outcomes(&run);
    assert!(via_nextest.len() >= 10, "{}", run.dump());

    let names: Vec<&str> = via_nextest.keys().map(String::as_str).collect();
    let mut args = vec!["--exact"];
    args.extend(&names);
    let direct = run_bounded(
        dtf_command(&fixture())
            .args(&args)
            .env("DTF_PASS_ENV", "FIXTURE_OUT_DIR")
            .env("FIXTURE_OUT_DIR", out.path()),
        Duration::from_secs(60),
    );
    for (name, passed) in &via_nextest {
        let word = direct
            .result_of(name)
            .unwrap_or_else(|| panic!("{name} missing\n{}", direct.dump()));
        assert_eq!(
            word == "ok",
            *passed,
            "{name}: nextest says passed={passed}, dtf says {word}"
        );
    }
    assert!(via_nextest.get("fail_segfault") == Some(&false));
    assert!(via_nextest.get("pass_should_panic") == Some(&true));
}

#[test]
fn nextest_lists_what_dtf_lists() {
    let run = nextest(&[
        "list",
        "-p",
        "dtf-fixture",
        "--test",
        "fixture",
        "--message-format",
        "json",
    ]);
    assert_eq!(run.code, Some(0), "{}", run.dump());
    let json_line = run
        .stdout
        .lines()
        .find(|l| l.starts_with('{'))
        .expect("json");
    let list: serde_json::Value = serde_json::from_str(json_line).expect("nextest's json");
    let suites = list["rust-suites"].as_object().expect("rust-suites");
    let cases = suites
        .values()
        .find_map(|s| s["testcases"].as_object())
        .expect("testcases");
    let mut from_nextest: Vec<&str> = cases.keys().map(String::as_str).collect();
    from_nextest.sort_unstable();

    let listed = run_dtf(&fixture(), &["--list"]);
    let mut from_dtf: Vec<&str> = listed
        .stdout
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .collect();
    from_dtf.sort_unstable();
    assert_eq!(from_nextest, from_dtf);
    // Ignored tests are known to nextest as ignored.
    assert_eq!(cases["ignored_plain"]["ignored"], true);
}

#[test]
fn the_hermetic_environment_holds_under_nextest() {
    tool("cargo-nextest");
    let out = tempfile::tempdir().unwrap();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let run = run_bounded(
        Command::new(cargo)
            .current_dir(workspace_root())
            .args([
                "nextest",
                "run",
                "-p",
                "dtf-fixture",
                "--test",
                "fixture",
                "-E",
                "test(=env_dump_one)",
            ])
            .env("DTF_PASS_ENV", "FIXTURE_OUT_DIR")
            .env("FIXTURE_OUT_DIR", out.path())
            .env("SECRET_TOKEN", "leak"),
        Duration::from_secs(300),
    );
    assert_eq!(run.code, Some(0), "{}", run.dump());
    let dump = std::fs::read_to_string(out.path().join("one")).expect("the test ran");
    assert!(!dump.contains("SECRET_TOKEN"), "{dump}");
    assert!(
        !dump.contains("NEXTEST_"),
        "nextest's variables stay outside: {dump}"
    );
    let home = dump
        .lines()
        .find_map(|l| l.strip_prefix("HOME="))
        .expect("HOME");
    assert!(
        home.contains("dtf-env_dump_one-"),
        "private HOME, got {home}"
    );
}

#[test]
fn nextest_runs_the_shell_example_and_lists_what_cargo_test_lists() {
    // Doc tests are not nextest's business: compare with `cargo test --tests`.
    let run = nextest(&["run", "-p", "shell-env", "--color", "never"]);
    assert_eq!(run.code, Some(0), "{}", run.dump());
    let passed = nextest_outcomes(&run);
    assert!(passed.values().all(|&p| p), "{passed:?}");

    let listed = nextest(&["list", "-p", "shell-env", "--message-format", "json"]);
    let json_line = listed
        .stdout
        .lines()
        .find(|l| l.starts_with('{'))
        .expect("json");
    let list: serde_json::Value = serde_json::from_str(json_line).expect("nextest's json");
    let mut from_nextest: Vec<String> = list["rust-suites"]
        .as_object()
        .expect("rust-suites")
        .values()
        .flat_map(|s| {
            s["testcases"]
                .as_object()
                .into_iter()
                .flat_map(|c| c.keys().cloned())
        })
        .collect();
    from_nextest.sort();
    assert_eq!(
        passed.len(),
        from_nextest.len(),
        "nextest ran what it listed"
    );

    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let via_cargo = run_bounded(
        Command::new(cargo).current_dir(workspace_root()).args([
            "test",
            "-q",
            "-p",
            "shell-env",
            "--tests",
            "--",
            "--list",
            "--format",
            "terse",
        ]),
        Duration::from_secs(300),
    );
    assert_eq!(via_cargo.code, Some(0), "{}", via_cargo.dump());
    let mut from_cargo: Vec<String> = via_cargo
        .stdout
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .map(str::to_owned)
        .collect();
    from_cargo.sort();
    assert_eq!(from_nextest, from_cargo);
    assert!(
        from_cargo.len() >= 16,
        "unit and integration tests: {from_cargo:?}"
    );
}
