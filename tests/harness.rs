//! The core harness, end to end: the fixture test binary (tests/fixture) run with libtest's
//! flags, every outcome kind in a real child process.

use std::path::Path;
use std::time::Duration;

use dtf_e2e::*;

/// Runs the fixture with `args` and returns the run.
fn fixture_run(args: &[&str]) -> Run {
    run_dtf(&fixture(), args)
}

#[test]
fn every_outcome_kind_is_judged_and_explained() {
    let run = fixture_run(&[
        "--exact",
        "pass_plain",
        "pass_prints",
        "pass_should_panic",
        "pass_should_panic_expected",
        "pass_result",
        "pass_async",
        "nested::pass_deep",
        "fail_assert",
        "fail_panic",
        "fail_should_panic_wrong_message",
        "fail_should_panic_no_panic",
        "fail_result",
        "fail_abort",
        "fail_segfault",
        "fail_exit_zero",
        "fail_exit_three",
        "fail_async",
        "ignored_plain",
        "ignored_with_reason",
    ]);
    assert_eq!(run.code, Some(101), "{}", run.dump());
    for pass in [
        "pass_plain",
        "pass_prints",
        "pass_should_panic",
        "pass_should_panic_expected",
        "pass_result",
        "pass_async",
        "nested::pass_deep",
    ] {
        assert_eq!(run.result_of(pass), Some("ok"), "{pass}\n{}", run.dump());
    }
    assert_eq!(run.result_of("ignored_plain"), Some("ignored"));
    assert_eq!(
        run.result_of("ignored_with_reason"),
        Some("ignored, needs network")
    );

    let expect_failure = |name: &str, needle: &str| {
        assert_eq!(
            run.result_of(name),
            Some("FAILED"),
            "{name}\n{}",
            run.dump()
        );
        let section = run
            .section_of(name)
            .unwrap_or_else(|| panic!("no section for {name}\n{}", run.dump()));
        assert!(
            section.contains(needle),
            "{name}: expected {needle:?} in\n{section}"
        );
    };
    expect_failure("fail_assert", "arithmetic is broken");
    expect_failure("fail_assert", "printed before the assertion");
    expect_failure("fail_panic", "panicked at");
    expect_failure("fail_panic", "plain panic");
    expect_failure(
        "fail_should_panic_wrong_message",
        "note: panic did not contain expected string",
    );
    expect_failure(
        "fail_should_panic_wrong_message",
        "expected substring: \"boom\"",
    );
    expect_failure(
        "fail_should_panic_no_panic",
        "note: test did not panic as expected",
    );
    expect_failure("fail_result", "Error: \"the error value\"");
    expect_failure("fail_abort", "note: killed by signal 6 (SIGABRT)");
    expect_failure("fail_segfault", "note: killed by signal 11 (SIGSEGV)");
    expect_failure(
        "fail_exit_zero",
        "note: exited with code 0 before the test finished",
    );
    expect_failure(
        "fail_exit_three",
        "note: exited with code 3 before the test finished",
    );
    expect_failure("fail_async", "async failure");

    assert!(
        run.stdout.contains("\nrunning 19 tests\n"),
        "{}",
        run.dump()
    );
    let summary = run
        .stdout
        .lines()
        .find(|l| l.starts_with("test result: "))
        .expect("summary line");
    assert!(
        summary.starts_with("test result: FAILED. 7 passed; 10 failed; 2 ignored; 0 measured; "),
        "{summary}"
    );
    // The failed names are listed, sorted, after the sections.
    let list = run
        .stdout
        .rsplit("\nfailures:\n")
        .next()
        .unwrap_or_default();
    let listed: Vec<&str> = list
        .lines()
        .filter_map(|l| l.strip_prefix("    "))
        .collect();
    let mut sorted = listed.clone();
    sorted.sort_unstable();
    assert_eq!(listed, sorted);
    assert_eq!(listed.len(), 10);
}

#[test]
fn a_timeout_kills_the_whole_process_group() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("grandchild.pid");
    let run = run_bounded(
        dtf_command(&fixture())
            .args(["--exact", "fail_timeout_with_grandchild"])
            .env("DTF_PASS_ENV", "FIXTURE_PID_FILE")
            .env("FIXTURE_PID_FILE", &pid_file),
        Duration::from_secs(30),
    );
    assert_eq!(run.code, Some(101), "{}", run.dump());
    assert!(
        run.section_of("fail_timeout_with_grandchild")
            .unwrap_or_default()
            .contains("note: timed out after 300ms"),
        "{}",
        run.dump()
    );
    assert!(
        run.elapsed < Duration::from_secs(20),
        "the 30 s sleep was not cut short"
    );
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .expect("grandchild pid")
        .trim()
        .parse()
        .unwrap();
    assert!(
        eventually(Duration::from_secs(5), || !process_alive(pid)),
        "grandchild {pid} survived"
    );
}

#[test]
fn a_run_wide_timeout_applies_and_the_attribute_wins() {
    // pass_plain is instant: a 1 s run-wide timeout does not fail it; the attribute's 300ms
    // still applies to the sleeper, not DTF_TIMEOUT's 20 s.
    let run = run_bounded(
        dtf_command(&fixture())
            .args(["--exact", "pass_plain", "fail_timeout_with_grandchild"])
            .env("DTF_TIMEOUT", "20s"),
        Duration::from_secs(30),
    );
    assert_eq!(run.result_of("pass_plain"), Some("ok"));
    assert!(
        run.stdout.contains("timed out after 300ms"),
        "{}",
        run.dump()
    );
    let bad = run_bounded(
        dtf_command(&fixture()).env("DTF_TIMEOUT", "soon"),
        Duration::from_secs(30),
    );
    assert_eq!(bad.code, Some(101));
    assert!(
        bad.stderr.contains("invalid DTF_TIMEOUT=\"soon\""),
        "{}",
        bad.dump()
    );
}

fn names_in(run: &Run) -> Vec<String> {
    let mut names: Vec<String> = run
        .stdout
        .lines()
        .filter_map(|l| l.strip_prefix("test "))
        .filter_map(|l| l.split_once(" ... ").map(|(n, _)| n.to_owned()))
        .collect();
    names.sort();
    names
}

#[test]
fn filters_exact_skip_and_ignored_follow_libtest() {
    let run = fixture_run(&["pass_p", "deep"]);
    assert_eq!(
        names_in(&run),
        ["nested::pass_deep", "pass_plain", "pass_prints"]
    );
    assert!(run.stdout.contains("filtered out"), "{}", run.dump());
    let total: usize = fixture_run(&["--list"])
        .stdout
        .lines()
        .filter(|l| l.ends_with(": test"))
        .count();
    let summary = format!("{} filtered out", total - 3);
    assert!(run.stdout.contains(&summary), "{summary}\n{}", run.dump());

    let run = fixture_run(&["--exact", "pass_plain", "pass_p"]);
    assert_eq!(names_in(&run), ["pass_plain"]);

    let run = fixture_run(&["pass_p", "--skip", "prints"]);
    assert_eq!(names_in(&run), ["pass_plain"]);

    let run = fixture_run(&["--ignored"]);
    assert_eq!(names_in(&run), ["ignored_plain", "ignored_with_reason"]);
    assert_eq!(
        run.result_of("ignored_plain"),
        Some("ok"),
        "--ignored runs them"
    );
    assert_eq!(run.code, Some(0));

    let run = fixture_run(&["--include-ignored", "ignored_", "pass_plain"]);
    assert_eq!(
        names_in(&run),
        ["ignored_plain", "ignored_with_reason", "pass_plain"]
    );
    assert_eq!(run.result_of("ignored_with_reason"), Some("ok"));
}

#[test]
fn list_formats_match_libtest() {
    let run = fixture_run(&["--list", "pass_p"]);
    assert_eq!(run.code, Some(0));
    assert_eq!(
        run.stdout,
        "pass_plain: test\npass_prints: test\n\n2 tests, 0 benchmarks\n"
    );
    let run = fixture_run(&["--list", "--format", "terse", "pass_p"]);
    assert_eq!(run.stdout, "pass_plain: test\npass_prints: test\n");
    let run = fixture_run(&["--list", "--format", "terse", "--ignored"]);
    assert_eq!(
        run.stdout,
        "ignored_plain: test\nignored_with_reason: test\n"
    );
    let run = fixture_run(&["--list", "--exact", "nested::pass_deep"]);
    assert_eq!(
        run.stdout,
        "nested::pass_deep: test\n\n1 test, 0 benchmarks\n"
    );
}

#[test]
fn a_closed_stdout_ends_the_list_quietly() {
    // `--list | head -1`: the reader goes away after one line.
    let mut child = dtf_command(&fixture())
        .arg("--list")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // closed before anything is read
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        out.status.code().is_some(),
        "killed by a signal: {:?}",
        out.status
    );
}

/// Parses a dump file written by the fixture's `env_dump_*` tests.
fn read_dump(path: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
        .collect()
}

fn get<'a>(vars: &'a [(String, String)], name: &str) -> Option<&'a str> {
    vars.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

#[test]
fn the_hermetic_environment_has_only_the_allowlist_and_private_dirs() {
    let out = tempfile::tempdir().unwrap();
    let run = run_bounded(
        dtf_command(&fixture())
            .args([
                "--exact",
                "env_dump_one",
                "env_dump_two",
                "env_dump_process",
                "env_attribute",
            ])
            .env("DTF_PASS_ENV", "FIXTURE_OUT_DIR, MYAPP_*")
            .env("FIXTURE_OUT_DIR", out.path())
            .env("MYAPP_MODE", "fast")
            .env("SECRET_TOKEN", "leak")
            .env("USER", "alice")
            .env("LOGNAME", "alice")
            .env("SHELL", "/bin/zsh")
            .env("HOME", "/home/parent")
            .env("LC_ALL", "C")
            .env("CARGO_TERM_COLOR", "never")
            .env("TZ", "UTC"),
        Duration::from_secs(60),
    );
    assert_eq!(run.code, Some(0), "{}", run.dump());
    let one = read_dump(&out.path().join("one"));
    let two = read_dump(&out.path().join("two"));
    let process = read_dump(&out.path().join("process"));

    // Allowlisted and DTF_PASS_ENV-named variables pass; others do not.
    for (name, value) in [
        ("MYAPP_MODE", "fast"),
        ("LC_ALL", "C"),
        ("TZ", "UTC"),
        ("CARGO_TERM_COLOR", "never"),
        ("USER", "alice"),
        ("LOGNAME", "alice"),
    ] {
        assert_eq!(get(&one, name), Some(value), "{name}");
    }
    assert_eq!(
        get(&one, "SHELL"),
        None,
        "the interactive shell is not passed"
    );
    assert!(get(&one, "PATH").is_some());
    assert_eq!(get(&one, "SECRET_TOKEN"), None);
    assert_eq!(
        get(&one, "__DTF_CHILD"),
        None,
        "dtf's own variable is removed"
    );
    let allowed = [
        "PATH",
        "HOME",
        "TMPDIR",
        "RUST_BACKTRACE",
        "RUST_LIB_BACKTRACE",
        "RUST_LOG",
        "RUST_MIN_STACK",
        "LANG",
        "TZ",
        "TERM",
        "USER",
        "LOGNAME",
        "OUT_DIR",
        "RUSTUP_HOME",
        "RUSTUP_TOOLCHAIN",
        "LD_LIBRARY_PATH",
        "DYLD_FALLBACK_LIBRARY_PATH",
        "LLVM_PROFILE_FILE",
        "FIXTURE_OUT_DIR",
        "MYAPP_MODE",
    ];
    for (name, _) in one.iter().filter(|(k, _)| !k.starts_with('@')) {
        assert!(
            allowed.contains(&name.as_str())
                || name.starts_with("CARGO_")
                || name.starts_with("LC_"),
            "unexpected variable {name} in the hermetic environment"
        );
    }

    // A private HOME and TMPDIR per test, writable, different between tests, gone afterwards.
    let (home1, home2) = (get(&one, "HOME").unwrap(), get(&two, "HOME").unwrap());
    assert_ne!(home1, "/home/parent");
    assert_ne!(home1, home2);
    assert_ne!(get(&one, "TMPDIR"), get(&two, "TMPDIR"));
    assert_eq!(get(&one, "@home_writable"), Some("true"));
    for dir in [home1, home2, get(&one, "TMPDIR").unwrap()] {
        assert!(!Path::new(dir).exists(), "{dir} was not removed");
    }
    // The working directory is the package root.
    let root = workspace_root().join("tests/fixture");
    assert_eq!(get(&one, "@cwd"), Some(root.to_str().unwrap()));

    // Level `process` inherits everything and gets no private HOME.
    assert_eq!(get(&process, "SECRET_TOKEN"), Some("leak"));
    assert_eq!(get(&process, "HOME"), Some("/home/parent"));
}

#[test]
fn a_failed_tests_directory_is_kept_on_request() {
    let run = run_bounded(
        dtf_command(&fixture())
            .args(["--exact", "fail_panic"])
            .env("DTF_KEEP_TMP", "1"),
        Duration::from_secs(30),
    );
    let section = run.section_of("fail_panic").unwrap_or_default();
    let kept = section
        .lines()
        .find_map(|l| l.strip_prefix("note: temporary directory kept at "))
        .unwrap_or_else(|| panic!("no kept directory in\n{}", run.dump()));
    assert!(Path::new(kept).join("home").is_dir());
    std::fs::remove_dir_all(kept).unwrap();
}

#[test]
fn output_is_shown_for_failures_only_unless_asked() {
    let run = fixture_run(&["--exact", "pass_prints", "fail_assert"]);
    assert!(
        !run.stdout.contains("stdout of a passing test"),
        "{}",
        run.dump()
    );
    assert!(!run.stderr.contains("stdout of a passing test"));
    assert!(
        run.section_of("fail_assert")
            .unwrap()
            .contains("printed before the assertion")
    );

    let run = fixture_run(&["--exact", "pass_prints", "--show-output"]);
    assert!(run.stdout.contains("\nsuccesses:\n"), "{}", run.dump());
    let section = run.section_of("pass_prints").unwrap();
    assert!(
        section.contains("stdout of a passing test")
            && section.contains("stderr of a passing test")
    );
}

#[test]
fn nocapture_streams_output_live() {
    for flag in ["--nocapture", "--no-capture"] {
        let run = fixture_run(&["--exact", "pass_prints", flag]);
        assert_eq!(run.code, Some(0));
        assert!(
            run.stdout.contains("stdout of a passing test\n"),
            "{}",
            run.dump()
        );
        assert!(
            run.stderr.contains("stderr of a passing test\n"),
            "{}",
            run.dump()
        );
        assert!(!run.stdout.contains("---- pass_prints stdout ----"));
    }
}

#[test]
fn exit_codes_follow_libtest() {
    assert_eq!(fixture_run(&["--exact", "pass_plain"]).code, Some(0));
    assert_eq!(fixture_run(&["--exact", "fail_panic"]).code, Some(101));
    assert_eq!(fixture_run(&["no_such_test_anywhere"]).code, Some(0));
    assert_eq!(fixture_run(&["--list"]).code, Some(0));
    let help = fixture_run(&["--help"]);
    assert_eq!(help.code, Some(0));
    assert!(help.stdout.contains("--test-threads"));
}

/// Asserts that a run was refused before any test started, with `needle` in its error.
fn assert_refused(run: &Run, needle: &str) {
    assert_eq!(run.code, Some(101), "{}", run.dump());
    assert!(
        run.stderr.contains(needle),
        "expected {needle:?}:\n{}",
        run.dump()
    );
    assert!(!run.stdout.contains("running"), "no test may start");
}

#[test]
fn bad_command_lines_get_clear_errors() {
    let run = fixture_run(&["--frobnicate"]);
    assert_refused(&run, "--frobnicate");
    assert_refused(&run, "Usage:");
    assert_refused(
        &fixture_run(&["--test-threads", "0"]),
        "--test-threads must be at least 1",
    );
    let run = run_bounded(
        dtf_command(&fixture()).env("RUST_TEST_THREADS", "many"),
        Duration::from_secs(30),
    );
    assert_refused(&run, "RUST_TEST_THREADS");
    assert_refused(
        &fixture_run(&["--timeout", "5 parsecs"]),
        "invalid duration `5 parsecs`",
    );
    assert_refused(
        &fixture_run(&["--isolation", "total"]),
        "unknown isolation level `total`",
    );
}

#[test]
fn libtest_flags_that_tools_pass_are_accepted() {
    let run = fixture_run(&[
        "--exact",
        "pass_plain",
        "--test",
        "-Z",
        "unstable-options",
        "--color",
        "never",
        "--test-threads",
        "1",
        "-q",
    ]);
    assert_eq!(run.code, Some(0), "{}", run.dump());
    // terse: one character per test
    assert!(
        run.stdout.contains("\nrunning 1 test\n.\n"),
        "{}",
        run.dump()
    );
}

#[test]
fn one_thread_announces_each_test_before_it_runs() {
    let run = fixture_run(&[
        "--exact",
        "pass_plain",
        "pass_prints",
        "--test-threads",
        "1",
    ]);
    assert_eq!(run.result_of("pass_plain"), Some("ok"), "{}", run.dump());
    assert_eq!(run.result_of("pass_prints"), Some("ok"), "{}", run.dump());
}

/// Waits for `core_hold_with_grandchild` to record its pid and its grandchild's; returns both.
fn held_pids(pid_file: &Path) -> Vec<i32> {
    let started = eventually(Duration::from_secs(20), || {
        std::fs::read_to_string(pid_file).is_ok_and(|s| s.split_whitespace().count() == 2)
    });
    assert!(started, "the test never started");
    std::fs::read_to_string(pid_file)
        .unwrap()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect()
}

#[test]
fn a_killed_runner_takes_its_tests_and_their_children_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pids");
    let mut runner = dtf_command(&fixture())
        .args(["--exact", "core_hold_with_grandchild"])
        .env("DTF_PASS_ENV", "FIXTURE_PID_FILE")
        .env("FIXTURE_PID_FILE", &pid_file)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pids = held_pids(&pid_file);
    runner.kill().unwrap(); // SIGKILL: the runner gets no chance to clean up
    runner.wait().unwrap();
    for pid in pids {
        assert!(
            eventually(Duration::from_secs(5), || !process_alive(pid)),
            "process {pid} outlived its killed runner"
        );
    }
}

#[test]
fn ctrl_c_stops_the_run_kills_running_tests_and_reports_them_not_run() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pids");
    let mut runner = dtf_command(&fixture())
        .args(["--exact", "core_hold_with_grandchild", "pass_plain"])
        .env("DTF_PASS_ENV", "FIXTURE_PID_FILE")
        .env("FIXTURE_PID_FILE", &pid_file)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Read stdout as it comes: the interrupt is sent once `pass_plain` has been reported, so
    // exactly one test (the holding one) is cut short, however the two race.
    let stdout = runner.stdout.take().unwrap();
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let reader = {
        let lines = lines.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                lines.lock().unwrap().push(line);
            }
        })
    };
    let pids = held_pids(&pid_file);
    assert!(
        eventually(Duration::from_secs(20), || lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l == "test pass_plain ... ok")),
        "pass_plain never finished: {:?}",
        lines.lock().unwrap()
    );
    let interrupted = std::time::Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(runner.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let out = runner.wait_with_output().unwrap();
    reader.join().unwrap();
    assert!(
        interrupted.elapsed() < Duration::from_secs(10),
        "the 30 s test was not cut short"
    );
    assert_eq!(out.status.code(), Some(130), "128 + SIGINT");
    let stdout = lines.lock().unwrap().join("\n");
    assert!(stdout.contains("1 not run"), "{stdout}");
    for pid in pids {
        assert!(
            eventually(Duration::from_secs(5), || !process_alive(pid)),
            "process {pid} outlived the interrupted run"
        );
    }
}

#[test]
fn a_target_without_harness_false_fails_with_what_to_do() {
    let binary = test_binary("dtf-fixture", "forgot_harness");
    let run = run_bounded(
        std::process::Command::new(binary).env("RUST_BACKTRACE", "0"),
        Duration::from_secs(30),
    );
    assert_eq!(run.code, Some(101), "{}", run.dump());
    assert!(
        run.stdout
            .contains("`lonely` is a #[dtf::test], but this target runs libtest's harness")
            && run.stdout.contains("harness = false"),
        "{}",
        run.dump()
    );
}

/// Runs the fixture's four `dist_sleep_*` tests on one core (so the default is one slot),
/// each sleeping `ms`, with `args`; the most of them seen running at once, and the run's
/// exit code and output.
fn sleepers_on_one_core(
    history: &Path,
    ms: u64,
    args: &[&str],
    env: &[(&str, &str)],
) -> (usize, Option<i32>, String) {
    let out = tempfile::tempdir().expect("a directory for the tests' pids");
    let mut cmd = dtf_command(Path::new("taskset"));
    cmd.args(["-c", "0"])
        .arg(fixture())
        .args(["--exact", "dist_sleep_1", "dist_sleep_2"])
        .args(["dist_sleep_3", "dist_sleep_4"])
        .args(args)
        .env("DTF_HISTORY_DIR", history)
        .env("DTF_PASS_ENV", "FIXTURE_*")
        .env("FIXTURE_SLEEP_MS", ms.to_string())
        .env("FIXTURE_OUT_DIR", out.path())
        .envs(env.iter().copied());
    let mut run = Background::start(&mut cmd);
    // A test is in its body while its `sleep` grandchild lives: the test starts it first and
    // kills and reaps it last (its own process may outlive the body by a moment).
    let mut most = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while matches!(run.child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
        let alive = recorded_pid_pairs(out.path())
            .into_iter()
            .filter(|&(_, sleep)| process_alive(sleep))
            .count();
        most = most.max(alive);
        std::thread::sleep(Duration::from_millis(5));
    }
    let code = run.wait(Duration::from_secs(10));
    let (stdout, stderr) = run.output();
    (most, code, format!("{stdout}{stderr}"))
}

#[test]
fn tests_known_to_be_short_share_a_slot_unless_the_slots_were_chosen() {
    // Without a history, one core is one test at a time.
    let empty = tempfile::tempdir().expect("a history directory");
    let (most, code, said) = sleepers_on_one_core(empty.path(), 300, &[], &[]);
    assert_eq!(code, Some(0), "{said}");
    assert_eq!(most, 1, "no history yet: one slot, one test\n{said}");
    // A history that says they are short: the one a run writes, its durations set to 1 ms
    // (what they take on a quiet machine, which this may not be).
    let short = tempfile::tempdir().expect("a history directory");
    let (_, code, said) = sleepers_on_one_core(short.path(), 0, &[], &[]);
    assert_eq!(code, Some(0), "{said}");
    let mut files = 0;
    for entry in std::fs::read_dir(short.path())
        .expect("the history")
        .flatten()
    {
        if entry.path().extension().is_none_or(|e| e != "json") {
            continue;
        }
        let text = std::fs::read_to_string(entry.path()).expect("the history file");
        let mut history: serde_json::Value = serde_json::from_str(&text).expect("JSON");
        let tests = history["tests"].as_object_mut().expect("its tests");
        assert_eq!(tests.len(), 4, "{text}");
        for record in tests.values_mut() {
            record["mean_secs"] = 0.001.into();
            record["last_secs"] = 0.001.into();
        }
        std::fs::write(entry.path(), history.to_string()).expect("write the history");
        files += 1;
    }
    assert_eq!(files, 1, "one history file");
    // ...copied for each run below, which records its own long durations.
    let copy = || {
        let dir = tempfile::tempdir().expect("a history directory");
        for entry in std::fs::read_dir(short.path())
            .expect("the history")
            .flatten()
        {
            std::fs::copy(entry.path(), dir.path().join(entry.file_name())).expect("copy");
        }
        dir
    };
    // They share the slot two to one, even when they turn out long this time.
    let history = copy();
    let (most, code, said) = sleepers_on_one_core(history.path(), 300, &[], &[]);
    assert_eq!(code, Some(0), "{said}");
    assert_eq!(most, 2, "short tests share the slot\n{said}");
    // A number of slots the user chose is kept exactly.
    let one: &[(&str, &str)] = &[("RUST_TEST_THREADS", "1")];
    for (args, env) in [
        (&["--test-threads", "1"][..], &[][..]),
        (&["--test-threads=1", "--order", "history"][..], &[][..]),
        (&[][..], one),
    ] {
        let history = copy();
        let (most, code, said) = sleepers_on_one_core(history.path(), 300, args, env);
        assert_eq!(code, Some(0), "{said}");
        assert_eq!(most, 1, "{args:?} {env:?}\n{said}");
    }
}
