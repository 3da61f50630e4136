//! `cargo dtf` on workers starts the tests of a run recorded before while cargo checks the
//! build: a slowed-down cargo shows the tests starting before cargo is done; what cargo then
//! confirms is reported once, and a run whose binaries cargo rebuilds, or whose build fails,
//! shows nothing of the tests it started.

use std::path::Path;
use std::time::Duration;

use dtf_e2e::workspace::Workspace;
use dtf_e2e::{Run, Worker, run_bounded};

const LIMIT: Duration = Duration::from_secs(600);

/// How long the wrapped cargo waits before checking the build.
const CARGO_DELAY: &str = "1.5";

/// A dtf binary whose tests append the time they ran (seconds since the epoch) to a file
/// named after them in `$WS_STAMPS`.
fn files(second: &str, broken: bool) -> Vec<(String, String)> {
    let dtf = Workspace::dtf_dependency();
    // A type error: the file still parses (the input tree's scan reads it), cargo fails.
    let tail = if broken {
        "#[allow(dead_code)]\nfn broken() -> u32 {\n    \"not a number\"\n}\n"
    } else {
        ""
    };
    vec![
        (
            "early/Cargo.toml".to_owned(),
            format!(
                "[package]\nname = \"early\"\nversion = \"0.1.0\"\nedition = \"2024\"\n\n[dev-dependencies]\n{dtf}\n\n[[test]]\nname = \"timed\"\nharness = false\n"
            ),
        ),
        ("early/src/lib.rs".to_owned(), String::new()),
        (
            "early/tests/timed.rs".to_owned(),
            format!(
                r#"fn stamp(name: &str) {{
    use std::io::Write;
    let dir = std::env::var("WS_STAMPS").expect("WS_STAMPS passes through DTF_PASS_ENV");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(format!("{{dir}}/{{name}}"))
        .unwrap();
    writeln!(f, "{{now:.6}}").unwrap();
}}

#[dtf::test]
fn first() {{
    stamp("first");
}}

#[dtf::test]
fn {second}() {{
    stamp("{second}");
}}

dtf::main!();
{tail}"#
            ),
        ),
    ]
}

/// A `cargo` that waits [`CARGO_DELAY`] seconds before `cargo test --no-run`, then writes when
/// that build check ended to `$WS_STAMPS/built`.
fn slow_cargo(dir: &Path) -> std::path::PathBuf {
    let real = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let path = dir.join("slow-cargo");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\ncase \" $* \" in\n  *\" --no-run \"*)\n    sleep {CARGO_DELAY}\n    '{real}' \"$@\"\n    rc=$?\n    date +%s.%N > \"$WS_STAMPS/built\"\n    exit $rc;;\nesac\nexec '{real}' \"$@\"\n"
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// The times `test` ran, from its stamp file.
fn times(stamps: &Path, test: &str) -> Vec<f64> {
    std::fs::read_to_string(stamps.join(test))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// When the last build check ended.
fn built(stamps: &Path) -> f64 {
    std::fs::read_to_string(stamps.join("built"))
        .expect("the wrapped cargo wrote when its build check ended")
        .trim()
        .parse()
        .expect("a time")
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn headers(run: &Run) -> usize {
    run.stdout
        .lines()
        .filter(|l| l.starts_with("running "))
        .count()
}

#[test]
fn a_run_on_workers_starts_before_cargo_is_done_and_shows_only_what_cargo_confirms() {
    let ws = Workspace::generate("speculate", &["early"], &files("second", false));
    let stamps = tempfile::tempdir().unwrap();
    let tools = tempfile::tempdir().unwrap();
    let cargo = slow_cargo(tools.path());
    let worker = Worker::start();
    let run = |ws: &Workspace| {
        run_bounded(
            ws.cargo_dtf(&["--workers", &worker.addr])
                .env("CARGO", &cargo)
                .env("DTF_TOKEN", worker.token.as_deref().unwrap_or_default())
                .env("DTF_REQUIRE_WORKERS", "1")
                .env("DTF_PASS_ENV", "WS_*")
                .env("WS_STAMPS", stamps.path()),
            LIMIT,
        )
    };

    // A first run builds and leaves a record. On a filesystem with whole-second times its
    // binary, stamped right after it was written, is not trusted: a second run, two seconds
    // on, records it again.
    for _ in 0..2 {
        let cold = run(&ws);
        assert_eq!(cold.code, Some(0), "{}", cold.dump());
        std::thread::sleep(Duration::from_millis(2100));
    }
    let before = times(stamps.path(), "first").len();
    assert_eq!(before, 2);

    // Confirmed: the tests start while cargo waits, and are reported once.
    let started = now();
    let warm = run(&ws);
    assert_eq!(warm.code, Some(0), "{}", warm.dump());
    assert_eq!(headers(&warm), 1, "{}", warm.dump());
    for test in ["early::timed first", "early::timed second"] {
        assert!(
            warm.result_of(test).is_some_and(|r| r.starts_with("ok")),
            "{test}: {}",
            warm.dump()
        );
    }
    let first = times(stamps.path(), "first");
    assert_eq!(first.len(), before + 1, "ran once: {first:?}");
    let ran_at = first[before];
    let built_at = built(stamps.path());
    assert!(
        started < ran_at && ran_at < built_at,
        "the test ran at {ran_at}, between the start ({started}) and the end of cargo's build \
         check ({built_at})"
    );

    // Superseded: a renamed test makes cargo rebuild the binary the run started from. The old
    // binary's tests ran meanwhile; only the new binary's are reported.
    let ws = Workspace::generate("speculate", &["early"], &files("renamed", false));
    let started = now();
    let rebuilt = run(&ws);
    assert_eq!(rebuilt.code, Some(0), "{}", rebuilt.dump());
    assert_eq!(headers(&rebuilt), 1, "{}", rebuilt.dump());
    assert!(
        rebuilt
            .result_of("early::timed renamed")
            .is_some_and(|r| r.starts_with("ok")),
        "{}",
        rebuilt.dump()
    );
    assert!(
        !rebuilt.stdout.contains("second"),
        "nothing of the superseded run is shown:\n{}",
        rebuilt.dump()
    );
    assert!(
        rebuilt.stdout.contains("2 passed"),
        "the summary counts the run that counted:\n{}",
        rebuilt.dump()
    );
    let second = times(stamps.path(), "second");
    assert!(
        second
            .iter()
            .any(|&t| t > started && t < built(stamps.path())),
        "the old binary's tests started before cargo rebuilt it: {second:?}"
    );
    assert_eq!(times(stamps.path(), "renamed").len(), 1);

    // A build that fails: cargo's exit, and nothing of the tests that started.
    for _ in 0..2 {
        std::thread::sleep(Duration::from_millis(2100));
        let settle = run(&ws);
        assert_eq!(settle.code, Some(0), "{}", settle.dump());
    }
    let broken = Workspace::generate("speculate", &["early"], &files("renamed", true));
    let started = now();
    let failed = run(&broken);
    assert_eq!(failed.code, Some(101), "{}", failed.dump());
    assert!(
        !failed.stdout.contains("running ") && !failed.stdout.contains("test result"),
        "{}",
        failed.dump()
    );
    assert!(
        times(stamps.path(), "renamed")
            .iter()
            .any(|&t| t > started && t < built(stamps.path())),
        "the run started before the build failed"
    );
}
