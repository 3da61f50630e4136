//! `cargo dtf` on a generated workspace with several packages, dtf binaries and libtest
//! binaries: one run, one report, filters, partitions, the config file, workers, the HTML page.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use dtf_e2e::run_bounded;
use dtf_e2e::workspace::Workspace;
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(600);

/// Plain `#[test]`s that each set the same variable and move to their own directory, then
/// check both: under libtest's threads they race; under `cargo dtf` each has its process.
fn racy_tests() -> String {
    let mut text = String::new();
    for i in 0..6 {
        text.push_str(&format!(
            r#"
#[test]
fn racy_{i}() {{
    let dir = std::env::temp_dir().join(format!("racy-{i}-{{}}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    unsafe {{ std::env::set_var("RACY", "{i}") }};
    std::env::set_current_dir(&dir).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(40));
    assert_eq!(std::env::var("RACY").unwrap(), "{i}");
    assert_eq!(std::env::current_dir().unwrap(), dir.canonicalize().unwrap());
}}
"#
        ));
    }
    text
}

/// A test of the group `serial`: records when it ran.
fn grouped(name: &str) -> String {
    format!(
        r#"
fn {name}() {{
    let dir = std::env::var("WS_STAMPS").expect("WS_STAMPS passes through the config's pass-env");
    let start = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    std::thread::sleep(std::time::Duration::from_millis(120));
    let end = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    std::fs::write(format!("{{dir}}/{name}"), format!("{{start}} {{end}}")).unwrap();
}}
"#
    )
}

fn workspace() -> Workspace {
    let dtf = Workspace::dtf_dependency();
    let files = vec![
        (
            ".config/dtf.toml".to_owned(),
            r#"[profile.default]
pass-env = ["WS_*"]

[[profile.default.overrides]]
filter = "test(/^grouped_/)"
test-group = "serial"

[profile.ci]
retries = 2

[test-groups.serial]
max-threads = 1
"#
            .to_owned(),
        ),
        (
            "alpha/Cargo.toml".to_owned(),
            "[package]\nname = \"alpha\"\nversion = \"0.1.0\"\nedition = \"2024\"\n\n[features]\nbroken = []\n".to_owned(),
        ),
        (
            "alpha/src/lib.rs".to_owned(),
            r#"#[cfg(feature = "broken")]
compile_error!("alpha is broken on purpose");

pub fn add(a: u32, b: u32) -> u32 {
    a + b
}

#[cfg(test)]
mod tests {
    #[test]
    fn adds() {
        assert_eq!(super::add(2, 2), 4);
    }

    #[test]
    #[ignore]
    fn slow_ignored() {}
}
"#
            .to_owned(),
        ),
        ("alpha/tests/racy.rs".to_owned(), racy_tests()),
        (
            "alpha/tests/grouped.rs".to_owned(),
            format!(
                "#[test]{}\n#[test]{}\n#[test]\nfn fails_on_purpose() {{\n    panic!(\"alpha failed on purpose\");\n}}\n",
                grouped("grouped_a"),
                grouped("grouped_b")
            ),
        ),
        (
            "beta/Cargo.toml".to_owned(),
            format!(
                "[package]\nname = \"beta\"\nversion = \"0.1.0\"\nedition = \"2024\"\n\n[dev-dependencies]\n{dtf}\n\n[[test]]\nname = \"checks\"\nharness = false\n"
            ),
        ),
        ("beta/src/lib.rs".to_owned(), "//! Nothing.\n".to_owned()),
        (
            "beta/tests/checks.rs".to_owned(),
            format!(
                r#"#[dtf::test]
fn one() {{}}

#[dtf::test]
fn two() {{
    assert_eq!(std::env::var("HOME").unwrap(), std::env::temp_dir().parent().unwrap().join("home").display().to_string());
}}

#[dtf::test]{}
#[dtf::test]{}
#[dtf::test]
fn fails_on_purpose() {{
    panic!("beta failed on purpose");
}}

#[dtf::test]
fn flaky() {{
    let marker = format!("{{}}/flaky-marker", std::env::var("WS_STAMPS").unwrap());
    if std::fs::metadata(&marker).is_err() {{
        std::fs::write(&marker, "").unwrap();
        panic!("first attempt fails");
    }}
}}

dtf::main!();
"#,
                grouped("grouped_c"),
                grouped("grouped_d")
            ),
        ),
        (
            "gamma/Cargo.toml".to_owned(),
            "[package]\nname = \"gamma\"\nversion = \"0.1.0\"\nedition = \"2024\"\n".to_owned(),
        ),
        (
            "gamma/src/main.rs".to_owned(),
            "fn main() {}\n\n#[test]\nfn in_bin() {}\n".to_owned(),
        ),
        (
            "delta/Cargo.toml".to_owned(),
            format!(
                "[package]\nname = \"delta\"\nversion = \"0.1.0\"\nedition = \"2024\"\n\n[dev-dependencies]\n{dtf}\n\n[[test]]\nname = \"mixed\"\nharness = false\n"
            ),
        ),
        ("delta/src/lib.rs".to_owned(), "//! Nothing.\n".to_owned()),
        (
            "delta/tests/mixed.rs".to_owned(),
            "#[dtf::test]\nfn kept() {}\n\n#[test]\nfn forgotten() {}\n\ndtf::main!();\n".to_owned(),
        ),
    ];
    Workspace::generate("several", &["alpha", "beta", "gamma", "delta"], &files)
}

/// The test events of a `--format json` run: `(name, event, the dtf extension)`.
fn events(stdout: &str) -> Vec<(String, String, Value)> {
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["type"] == "test" && v["event"] != "started")
        .map(|v| {
            (
                v["name"].as_str().unwrap_or_default().to_owned(),
                v["event"].as_str().unwrap_or_default().to_owned(),
                v["dtf"].clone(),
            )
        })
        .collect()
}

/// `test NAME` → outcome, from a run's JSON: the test's own name (last) with its outcome.
fn outcomes(events: &[(String, String, Value)]) -> BTreeMap<String, Vec<String>> {
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, event, _) in events {
        map.entry(name.clone()).or_default().push(event.clone());
    }
    map
}

fn stamps(dir: &Path) -> Vec<(u128, u128, String)> {
    let mut found: Vec<(u128, u128, String)> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("grouped_"))
        .map(|e| {
            let text = std::fs::read_to_string(e.path()).unwrap();
            let (a, b) = text.split_once(' ').unwrap();
            (
                a.parse().unwrap(),
                b.parse().unwrap(),
                e.file_name().to_string_lossy().into_owned(),
            )
        })
        .collect();
    found.sort();
    found
}

/// libtest's pretty lines of `cargo test`: `(name, outcome)`, one per test line.
fn cargo_test_outcomes(stdout: &str) -> BTreeSet<(String, String)> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("test "))
        .filter_map(|l| l.rsplit_once(" ... "))
        .map(|(name, outcome)| {
            let outcome = match outcome.split([' ', ',']).next().unwrap_or_default() {
                "ok" => "ok",
                "FAILED" => "failed",
                "ignored" => "ignored",
                other => other,
            };
            (name.to_owned(), outcome.to_owned())
        })
        .collect()
}

#[test]
fn a_workspace_is_one_run_with_one_report_and_the_outcomes_of_cargo_test() {
    let ws = workspace();
    let stamps_dir = tempfile::tempdir().unwrap();
    let history = tempfile::tempdir().unwrap();
    let junit = stamps_dir.path().join("junit.xml");
    let run = run_bounded(
        ws.cargo_dtf(&[
            "--workspace",
            "--exclude",
            "delta",
            "--test-threads",
            "4",
            "--format",
            "json",
        ])
        .arg("--junit")
        .arg(&junit)
        .env("WS_STAMPS", stamps_dir.path())
        .env("DTF_HISTORY_DIR", history.path()),
        LIMIT,
    );
    assert_eq!(run.code, Some(101), "{}\n{}", run.stdout, run.stderr);
    let suites: Vec<Value> = run
        .stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["type"] == "suite")
        .collect();
    assert_eq!(suites.len(), 2, "one suite for the run: {suites:?}");
    assert_eq!(suites[0]["event"], "started");
    assert_eq!(suites[1]["event"], "failed");
    assert_eq!(suites[1]["failed"], 3, "{}", run.stdout);

    let events = events(&run.stdout);
    for (name, _, dtf) in &events {
        assert!(
            dtf["binary"].is_string() && dtf["package"].is_string(),
            "{name}: {dtf}"
        );
    }
    let by_name = outcomes(&events);
    let expect = |name: &str, outcome: &str| {
        assert_eq!(
            by_name.get(name).map(Vec::as_slice),
            Some(&[outcome.to_owned()][..]),
            "{name} in {by_name:?}"
        );
    };
    for i in 0..6 {
        expect(&format!("alpha::racy racy_{i}"), "ok");
    }
    expect("alpha tests::adds", "ok");
    expect("alpha tests::slow_ignored", "ignored");
    expect("alpha::grouped fails_on_purpose", "failed");
    expect("beta::checks fails_on_purpose", "failed");
    expect("beta::checks flaky", "failed");
    expect("beta::checks two", "ok");
    expect("gamma::bin/gamma in_bin", "ok");
    assert_eq!(
        events
            .iter()
            .find(|(n, _, _)| n == "beta::checks one")
            .map(|(_, _, d)| (d["binary"].clone(), d["package"].clone())),
        Some((Value::from("checks"), Value::from("beta")))
    );

    // The group `serial` (max-threads 1) never overlapped, across both binaries' tests.
    let stamps = stamps(stamps_dir.path());
    assert_eq!(stamps.len(), 4, "{stamps:?}");
    for pair in stamps.windows(2) {
        assert!(
            pair[1].0 >= pair[0].1,
            "{} started before {} ended",
            pair[1].2,
            pair[0].2
        );
    }

    // One JUnit file, a testsuite per binary, valid against the schema.
    let xml = std::fs::read_to_string(&junit).unwrap();
    let suites = xml.matches("<testsuite ").count();
    assert_eq!(suites, 5, "{xml}");
    for id in [
        "name=\"alpha\"",
        "name=\"alpha::racy\"",
        "name=\"alpha::grouped\"",
        "name=\"beta::checks\"",
        "name=\"gamma::bin/gamma\"",
    ] {
        assert!(xml.contains(id), "{id} in {xml}");
    }
    let xmllint = dtf_e2e::tool("xmllint");
    let schema = dtf_e2e::workspace_root().join("tests/junit.xsd");
    let check = std::process::Command::new(xmllint)
        .arg("--noout")
        .arg("--schema")
        .arg(&schema)
        .arg(&junit)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );

    // The same outcomes as `cargo test` for the tests that do not race.
    let fresh = tempfile::tempdir().unwrap();
    let cargo = run_bounded(
        ws.cargo(&[
            "test",
            "--workspace",
            "--exclude",
            "delta",
            "--no-fail-fast",
        ])
        .env("WS_STAMPS", fresh.path()),
        LIMIT,
    );
    assert_eq!(cargo.code, Some(101), "{}", cargo.stderr);
    let theirs = cargo_test_outcomes(&cargo.stdout);
    let ours: BTreeSet<(String, String)> = events
        .iter()
        .map(|(name, event, _)| {
            let own = name.rsplit_once(' ').map_or(name.as_str(), |(_, n)| n);
            (own.to_owned(), event.clone())
        })
        .filter(|(name, _)| !name.starts_with("racy_"))
        .collect();
    let theirs: BTreeSet<(String, String)> = theirs
        .into_iter()
        .filter(|(name, _)| !name.starts_with("racy_"))
        .collect();
    assert_eq!(ours, theirs);
}

#[test]
fn filters_partitions_repeat_and_rerun_failed() {
    let ws = workspace();
    // The history partitions read a snapshot of the history: the other tests of this file
    // share the target directory, and their runs rewrite it between the three calls.
    let snapshot = tempfile::tempdir().expect("dir");
    if let Ok(files) = std::fs::read_dir(ws.target.join("debug/dtf-history")) {
        for file in files.flatten() {
            std::fs::copy(file.path(), snapshot.path().join(file.file_name())).expect("copy");
        }
    }
    let list = |args: &[&str]| -> (Option<i32>, Vec<String>, String) {
        let mut all = vec!["list", "--workspace", "--exclude", "delta"];
        all.extend_from_slice(args);
        let mut cmd = ws.cargo_dtf(&all);
        cmd.env("DTF_HISTORY_DIR", snapshot.path());
        let run = run_bounded(&mut cmd, LIMIT);
        (
            run.code,
            run.stdout.lines().map(str::to_owned).collect(),
            run.stderr,
        )
    };
    let (code, everything, stderr) = list(&[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(everything.len(), 18, "{everything:?}");
    let (_, beta, _) = list(&["-E", "package(beta) & not test(~grouped)"]);
    assert_eq!(
        beta,
        [
            "beta::checks fails_on_purpose",
            "beta::checks flaky",
            "beta::checks one",
            "beta::checks two"
        ]
    );
    let (_, kinds, _) = list(&["-E", "kind(bin) | (binary(racy) & test(=racy_0))"]);
    assert_eq!(kinds, ["alpha::racy racy_0", "gamma::bin/gamma in_bin"]);
    let (code, _, stderr) = list(&["-E", "package(beta) && test(one)"]);
    assert_eq!(code, Some(101));
    assert!(
        stderr.contains("at character 16") && stderr.contains("^"),
        "{stderr}"
    );

    for kind in ["count", "hash", "history"] {
        let mut seen: Vec<String> = Vec::new();
        for m in 1..=3 {
            let (code, part, stderr) = list(&["--partition", &format!("{kind}:{m}/3")]);
            assert_eq!(code, Some(0), "{stderr}");
            seen.extend(part);
        }
        seen.sort();
        let mut all = everything.clone();
        all.sort();
        assert_eq!(seen, all, "{kind}: every test exactly once");
    }

    // --repeat: every attempt reported.
    let run = run_bounded(
        &mut ws.cargo_dtf(&[
            "-p",
            "beta",
            "--repeat",
            "3",
            "-E",
            "test(=one)",
            "--format",
            "json",
        ]),
        LIMIT,
    );
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    let ev = events(&run.stdout);
    assert_eq!(ev.len(), 3, "{ev:?}");
    assert!(ev.iter().all(|(_, e, d)| e == "ok" && d["test"] == "one"));

    // --rerun-failed: what failed last time, nothing else.
    let history = tempfile::tempdir().unwrap();
    let stamps = tempfile::tempdir().unwrap();
    let first = run_bounded(
        ws.cargo_dtf(&["-p", "beta", "-p", "gamma", "--format", "json"])
            .env("DTF_HISTORY_DIR", history.path())
            .env("WS_STAMPS", stamps.path()),
        LIMIT,
    );
    assert_eq!(first.code, Some(101));
    let failed: BTreeSet<String> = events(&first.stdout)
        .into_iter()
        .filter(|(_, e, _)| e == "failed")
        .map(|(n, _, _)| n)
        .collect();
    assert_eq!(
        failed,
        BTreeSet::from([
            "beta::checks fails_on_purpose".to_owned(),
            "beta::checks flaky".to_owned()
        ])
    );
    let again = run_bounded(
        ws.cargo_dtf(&[
            "-p",
            "beta",
            "-p",
            "gamma",
            "--rerun-failed",
            "--format",
            "json",
        ])
        .env("DTF_HISTORY_DIR", history.path())
        .env("WS_STAMPS", stamps.path()),
        LIMIT,
    );
    let rerun: BTreeSet<String> = events(&again.stdout)
        .into_iter()
        .map(|(n, _, _)| n)
        .collect();
    assert_eq!(rerun, failed, "{}", again.stderr);
    // `flaky` passes on its second run; only `fails_on_purpose` is left.
    let third = run_bounded(
        ws.cargo_dtf(&[
            "-p",
            "beta",
            "-p",
            "gamma",
            "--rerun-failed",
            "--format",
            "json",
        ])
        .env("DTF_HISTORY_DIR", history.path())
        .env("WS_STAMPS", stamps.path()),
        LIMIT,
    );
    let names: Vec<String> = events(&third.stdout)
        .into_iter()
        .map(|(n, _, _)| n)
        .collect();
    assert_eq!(names, ["beta::checks fails_on_purpose"]);

    // A selection with no test fails unless told otherwise.
    let none = run_bounded(&mut ws.cargo_dtf(&["-p", "gamma", "-E", "none()"]), LIMIT);
    assert_eq!(none.code, Some(101));
    assert!(none.stderr.contains("no tests to run"), "{}", none.stderr);
    let pass = run_bounded(
        &mut ws.cargo_dtf(&["-p", "gamma", "-E", "none()", "--no-tests=pass"]),
        LIMIT,
    );
    assert_eq!(pass.code, Some(0), "{}", pass.stderr);
}

#[test]
fn profiles_reach_cargo_dtf_and_plain_cargo_test_and_bad_files_are_named() {
    let ws = workspace();
    let stamps = tempfile::tempdir().unwrap();
    let run = run_bounded(
        ws.cargo_dtf(&[
            "-P",
            "ci",
            "-p",
            "beta",
            "-E",
            "test(flaky)",
            "--format",
            "json",
        ])
        .env("WS_STAMPS", stamps.path()),
        LIMIT,
    );
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    let ev = events(&run.stdout);
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].1, "ok");
    assert_eq!(
        ev[0].2["flaky"], true,
        "retries = 2 of profile ci: {:?}",
        ev[0]
    );

    // Plain `cargo test` of the dtf binary reads the same file and profile.
    let stamps = tempfile::tempdir().unwrap();
    let plain = run_bounded(
        ws.cargo(&["test", "-p", "beta", "--test", "checks", "--", "flaky"])
            .env("DTF_PROFILE", "ci")
            .env("WS_STAMPS", stamps.path()),
        LIMIT,
    );
    assert_eq!(plain.code, Some(0), "{}\n{}", plain.stdout, plain.stderr);
    assert!(
        plain.stdout.contains("FLAKY") || plain.stdout.contains("flaky"),
        "{}",
        plain.stdout
    );

    let bad = stamps.path().join("bad.toml");
    std::fs::write(&bad, "[profile.default]\nretries = 1\ntimeout = \"soon\"\n").unwrap();
    let run = run_bounded(
        ws.cargo_dtf(&["list", "-p", "gamma"])
            .env("DTF_CONFIG", &bad),
        LIMIT,
    );
    assert_eq!(run.code, Some(101));
    assert!(
        run.stderr
            .contains(&format!("{}:3: `profile.default.timeout`", bad.display())),
        "{}",
        run.stderr
    );
    let run = run_bounded(
        &mut ws.cargo_dtf(&["list", "-p", "gamma", "-P", "nope"]),
        LIMIT,
    );
    assert_eq!(run.code, Some(101));
    assert!(
        run.stderr.contains("there is no profile `nope`"),
        "{}",
        run.stderr
    );
}

#[test]
fn unrunnable_tests_builds_and_workers() {
    let ws = workspace();
    // A plain #[test] in a harness = false target would never run: named, unless allowed.
    let run = run_bounded(&mut ws.cargo_dtf(&["-p", "delta"]), LIMIT);
    assert_eq!(run.code, Some(101), "{}", run.stderr);
    assert!(
        run.stderr.contains("delta/tests/mixed.rs:5: `forgotten`")
            && run.stderr.contains("will not run"),
        "{}",
        run.stderr
    );
    let run = run_bounded(
        &mut ws.cargo_dtf(&["-p", "delta", "--allow-unrunnable"]),
        LIMIT,
    );
    assert_eq!(run.code, Some(0), "{}", run.stderr);

    // A build failure: cargo's message and code 101.
    let run = run_bounded(
        &mut ws.cargo_dtf(&["-p", "alpha", "--features", "broken"]),
        LIMIT,
    );
    assert_eq!(run.code, Some(101));
    assert!(
        run.stderr.contains("alpha is broken on purpose"),
        "{}",
        run.stderr
    );

    // On two local workers: one queue, the same outcomes, one summary with the worker lines.
    let stamps_dir = tempfile::tempdir().unwrap();
    let run = run_bounded(
        ws.cargo_dtf(&["--workspace", "--exclude", "delta", "--workers", "local:2"])
            .env("WS_STAMPS", stamps_dir.path()),
        LIMIT,
    );
    assert_eq!(run.code, Some(101), "{}\n{}", run.stdout, run.stderr);
    assert_eq!(
        run.stdout.matches("test result:").count(),
        1,
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains("test result: FAILED. 14 passed; 3 failed; 1 ignored"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("binaries shipped to"), "{}", run.stdout);
    let worker_lines = run
        .stdout
        .lines()
        .filter(|l| l.starts_with("dtf: ") && l.contains(" ran "))
        .count();
    assert_eq!(
        worker_lines, 1,
        "one worker line for the run: {}",
        run.stdout
    );
    assert!(
        run.stdout.contains("5 binaries shipped to 2 of 2"),
        "only binaries with tests to run travel: {}",
        run.stdout
    );
    for i in 0..6 {
        assert!(
            run.stdout
                .contains(&format!("test alpha::racy racy_{i} ... ok")),
            "{}",
            run.stdout
        );
    }
    let stamps = stamps(stamps_dir.path());
    assert_eq!(stamps.len(), 4);
    for pair in stamps.windows(2) {
        assert!(
            pair[1].0 >= pair[0].1,
            "the group overlapped on the workers: {stamps:?}"
        );
    }
}

#[test]
fn the_html_page_shows_a_failure_in_a_real_browser() {
    let ws = workspace();
    let out = tempfile::tempdir().unwrap();
    let page = out.path().join("report.html");
    let run = run_bounded(
        ws.cargo_dtf(&["-p", "alpha", "--test", "grouped"])
            .arg("--html")
            .arg(&page)
            .env("WS_STAMPS", out.path()),
        LIMIT,
    );
    assert_eq!(run.code, Some(101), "{}", run.stderr);
    let chromium = dtf_e2e::tool("chromium");
    let profile = tempfile::tempdir().unwrap();
    let dom = run_bounded(
        std::process::Command::new(chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("--dump-dom")
            .arg(format!("file://{}", page.display())),
        Duration::from_secs(120),
    );
    assert_eq!(dom.code, Some(0), "{}", dom.stderr);
    assert!(
        dom.stdout.contains("alpha failed on purpose"),
        "{}",
        dom.stdout
    );
    assert!(dom.stdout.contains("Run failed"), "{}", dom.stdout);
    let failed = dom.stdout.find("fails_on_purpose").unwrap();
    let passed = dom.stdout.find("grouped_a").unwrap();
    assert!(failed < passed, "failures first");
}
