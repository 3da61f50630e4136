//! The fork server: tests forked from it see what an exec'd test sees, warm-ups run once in it
//! and tests inherit their state, a failing warm-up stops the run before any test, a server
//! with a thread falls back to exec with one note, workers run a server of their own, and a test
//! cancelled before its pid is back is still killed and its directory removed.
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

/// The pids of the children of `pid` (of all its threads).
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|list| pids_in(&list))
        .collect()
}

fn pids_in(list: &str) -> Vec<u32> {
    list.split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

#[test]
fn a_test_cancelled_before_its_pid_is_back_is_killed_and_its_directory_removed() {
    use dtf::sandbox::Sandbox;
    let tmp = tempfile::tempdir().expect("a temporary root");
    let out = tempfile::tempdir().expect("a directory for the test's pids");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let sandbox = Sandbox::new(dtf_e2e::fixture(), tmp.path().to_path_buf(), false);
        sandbox.start_fork_server().await.expect("the fork server");
        // Started by this thread (the runtime's only one); other tests run on other threads.
        let tid = nix::unistd::gettid();
        let servers = pids_in(
            &std::fs::read_to_string(format!("/proc/self/task/{tid}/children"))
                .expect("this thread's children"),
        );
        assert_eq!(servers.len(), 1, "one fork server: {servers:?}");
        let spec = |ms: &str| {
            dtf_e2e::sleeper_spec(
                "/usr/bin:/bin",
                &[
                    ("FIXTURE_SLEEP_MS", ms.to_owned()),
                    ("FIXTURE_OUT_DIR", out.path().display().to_string()),
                ],
            )
        };
        for round in 0..3 {
            let _ = std::fs::remove_file(out.path().join("pid-dist_sleep_1"));
            let long = spec("30000");
            let mut run = Box::pin(sandbox.run(&long));
            // One poll sends the request. The server's answer (the pid) is read by another
            // task, which this one-thread runtime runs only once this task waits: the future
            // is dropped before the runner knows which process is its test's.
            tokio::select! {
                biased;
                attempt = &mut run => panic!("the test ended at once: {attempt:?}"),
                _ = std::future::ready(()) => {}
            }
            drop(run);
            // Blocking, so that the runner reads nothing meanwhile: the server forks, and the
            // test makes its directory (which the dropped future may or may not have found to
            // remove) and starts its grandchild, unknown to the runner.
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while dtf_e2e::recorded_pids(out.path()).len() < 2 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "round {round}: the cancelled test never started"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            let pids = dtf_e2e::recorded_pids(out.path());
            // Now the runner hears of it: the test and all it started go, and its directory.
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                let forked: Vec<u32> = servers.iter().flat_map(|&s| children_of(s)).collect();
                let dirs = dtf_e2e::dtf_dirs(tmp.path());
                let alive: Vec<i32> = pids
                    .iter()
                    .copied()
                    .filter(|&p| dtf_e2e::process_alive(p))
                    .collect();
                if forked.is_empty() && dirs.is_empty() && alive.is_empty() {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "round {round}: the cancelled test lives on: processes {forked:?}, \
                     {alive:?}; directories {dirs:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        // The server still serves.
        let attempt = sandbox.run(&spec("0")).await;
        assert!(attempt.failure.is_none(), "{attempt:?}");
        sandbox.stop_fork_server().await;
    });
}
