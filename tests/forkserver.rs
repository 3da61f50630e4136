//! The fork server: tests forked from it see what an exec'd test sees, warm-ups run once in it
//! and tests inherit their state, a failing warm-up stops the run before any test, a server
//! with a thread falls back to exec with one note, and workers run a server of their own.
//! (Every other end-to-end test runs with the fork server too: it is the default.)

use std::path::{Path, PathBuf};
use std::time::Duration;

use dtf_e2e::{Run, dtf_command, run_bounded, test_binary, worker_binary};

const MINUTE: Duration = Duration::from_secs(60);

fn warm() -> PathBuf {
    test_binary("dtf-fixture", "warm")
}

/// A directory outside /tmp, so that a warm-up in a level `full` test process can write there.
fn out_dir() -> tempfile::TempDir {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
    tempfile::tempdir_in(root).expect("a directory for the warm-up log")
}

fn warm_ups(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("warm-ups"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn run_warm(spawn: &str, expect: &str, dir: &Path, extra: &[(&str, &str)], args: &[&str]) -> Run {
    let mut cmd = dtf_command(&warm());
    cmd.env("DTF_SPAWN", spawn)
        .env("DTF_PASS_ENV", "FIXTURE_*")
        .env("FIXTURE_EXPECT_SPAWN", expect)
        .env("FIXTURE_OUT_DIR", dir)
        .env("WARM_SECRET", "1")
        .args(args);
    for (name, value) in extra {
        cmd.env(name, value);
    }
    run_bounded(&mut cmd, MINUTE)
}

const TESTS: [&str; 4] = [
    "warm_inherited",
    "warm_exec_attribute",
    "warm_at_level_full",
    "warm_semantics",
];

#[test]
fn warm_ups_run_once_in_the_server_and_every_test_inherits_them() {
    let dir = out_dir();
    let run = run_warm("fork", "fork", dir.path(), &[], &[]);
    assert_eq!(run.code, Some(0), "{}", run.dump());
    for test in TESTS {
        assert_eq!(run.result_of(test), Some("ok"), "{test}\n{}", run.dump());
    }
    // Once in the server, once in the process of the test marked `spawn = "exec"`.
    assert_eq!(warm_ups(dir.path()).len(), 2, "{}", run.dump());
}

#[test]
fn with_dtf_spawn_exec_every_test_process_runs_the_warm_ups_itself() {
    let dir = out_dir();
    let run = run_warm("exec", "exec", dir.path(), &[], &[]);
    assert_eq!(run.code, Some(0), "{}", run.dump());
    for test in TESTS {
        assert_eq!(run.result_of(test), Some("ok"), "{test}\n{}", run.dump());
    }
    assert_eq!(warm_ups(dir.path()).len(), TESTS.len(), "{}", run.dump());
}

#[test]
fn a_failing_warm_up_stops_the_run_before_any_test() {
    let dir = out_dir();
    for (how, says) in [
        (
            "panic",
            "error: warm-up `a_table` panicked: the fixture's warm-up fails on purpose",
        ),
        ("thread", "error: warm-up `a_table` left 1 thread running"),
    ] {
        let run = run_warm("fork", "fork", dir.path(), &[("FIXTURE_WARM_UP", how)], &[]);
        assert_eq!(run.code, Some(101), "{how}: {}", run.dump());
        assert!(run.stderr.contains(says), "{how}: {}", run.dump());
        assert!(
            !run.stdout.contains("test "),
            "{how}: no test started\n{}",
            run.dump()
        );
    }
}

#[test]
fn a_server_with_a_thread_falls_back_to_exec_with_one_note() {
    let dir = out_dir();
    // A constructor's thread also makes level `full` impossible in every process: leave that
    // test out.
    let run = run_warm(
        "fork",
        "exec",
        dir.path(),
        &[("FIXTURE_CTOR_THREAD", "1")],
        &["--skip", "warm_at_level_full", "--test-threads", "2"],
    );
    assert_eq!(run.code, Some(0), "{}", run.dump());
    for test in ["warm_inherited", "warm_exec_attribute", "warm_semantics"] {
        assert_eq!(run.result_of(test), Some("ok"), "{test}\n{}", run.dump());
    }
    let notes: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.starts_with("note: dtf: tests start by exec"))
        .collect();
    assert_eq!(notes.len(), 1, "{}", run.dump());
    assert!(
        notes[0].contains("the fork server has 2 threads"),
        "{}",
        run.dump()
    );
}

#[test]
fn a_worker_runs_the_tests_of_a_run_from_a_fork_server_of_its_own() {
    // The worker's server sees the coordinator's paths as its tests do: the shipped copy of
    // the input tree, which holds no warm-up log. Its log goes outside the tree (the tests it
    // forks inherit the warm-up, so none runs in a level `full` process with a private /tmp).
    let dir = tempfile::tempdir().expect("a directory for the warm-up log");
    let worker = worker_binary();
    let run = run_warm(
        "fork",
        "fork",
        dir.path(),
        &[
            ("DTF_WORKERS", "local:1"),
            ("DTF_WORKER_BIN", worker.to_str().expect("a UTF-8 path")),
        ],
        &["--skip", "warm_exec_attribute"],
    );
    assert_eq!(run.code, Some(0), "{}", run.dump());
    for test in ["warm_inherited", "warm_at_level_full", "warm_semantics"] {
        assert_eq!(run.result_of(test), Some("ok"), "{test}\n{}", run.dump());
    }
    let said = format!("{}{}", run.stdout, run.stderr);
    assert!(
        said.contains(" ran 3"),
        "the worker ran the tests\n{}",
        run.dump()
    );
    // One server on the worker ran the warm-up, once, for all three tests.
    assert_eq!(warm_ups(dir.path()).len(), 1, "{}", run.dump());
}
