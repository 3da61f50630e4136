//! Isolation level `full`, end to end: the fixture's `iso_` tests in real child processes and
//! real namespaces, as the invoking user, (when that is root) as `nobody`, and on a
//! `dtf-worker`; `examples/ports`; the memory limit; and the error, or the fallback, when the
//! kernel refuses namespaces.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use dtf_e2e::*;

/// The example's state file and its helper's `sleep` argument (see examples/ports).
const STATE_FILE: &str = "/tmp/dtf-ports-example/state";
const HELPER_SECONDS: &str = "8080";

/// The uid and gid of `nobody`.
const NOBODY: u32 = 65534;

/// Who runs the fixture binary, and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum User {
    /// The user running these tests.
    Invoker,
    /// `nobody` (only when these tests run as root).
    Nobody,
    /// The user running these tests, on a `dtf-worker` on 127.0.0.1.
    Worker,
}

/// What must outlive a run: `nobody`'s copy of the binary, or the worker.
#[allow(dead_code)] // held for its `Drop`
enum Keep {
    Nothing,
    Copy(tempfile::TempDir),
    Worker(Box<Worker>),
}

/// A fresh directory for the fixture's meeting markers: outside /tmp (tests at level `full`
/// have a /tmp of their own) and writable by anyone.
fn meeting_dir() -> tempfile::TempDir {
    // Outside `/tmp` (a tmpfs per test at level `full`) and outside the checkout and its target
    // directory, which a worker maps from the run's input tree (hiding what else is there, as on
    // another machine): /dev/shm, where it exists.
    let shm = std::path::Path::new("/dev/shm");
    let parent = if shm.is_dir() {
        shm
    } else {
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
    };
    let dir = tempfile::Builder::new()
        .prefix("iso-meet-")
        .tempdir_in(parent)
        .expect("create a meeting directory");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
        .expect("open the meeting directory to everyone");
    dir
}

/// A `sleep` argument no other process has: the fixture's daemons run `sleep TOKEN`.
fn token() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "86{:03}.{:05}{:04}",
        NEXT.fetch_add(1, Ordering::Relaxed),
        std::process::id() % 100_000,
        nanos % 10_000
    )
}

/// Host pids of live processes whose command line is exactly `sleep TOKEN`.
fn daemons(token: &str) -> Vec<i32> {
    let cmdline = format!("sleep\0{token}\0");
    processes_where(|pid| {
        std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == cmdline.as_bytes())
    })
}

/// Kills the daemons of a token when dropped, so a failing assertion leaves nothing behind.
struct DaemonReaper(String);

impl Drop for DaemonReaper {
    fn drop(&mut self) {
        for pid in daemons(&self.0) {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
        }
    }
}

/// A command that runs `binary` as `user`, with what must outlive the run: for `nobody`, a
/// copy of the binary in a fresh directory it can read (the build directory may not be), run
/// from there, with `/tmp` as its temporary directory; for a worker, the worker (4 slots).
fn command_as(user: User, binary: &Path) -> (Command, Keep) {
    match user {
        User::Invoker => (dtf_command(binary), Keep::Nothing),
        User::Worker => {
            let worker = Worker::start_with(WorkerConfig {
                slots: 4,
                ..WorkerConfig::default()
            });
            (worker.command(binary), Keep::Worker(Box::new(worker)))
        }
        User::Nobody => {
            let dir = tempfile::Builder::new()
                .prefix("iso-nobody-")
                .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
                .expect("create a directory for nobody's copy");
            let copy = dir.path().join(binary.file_name().expect("a file name"));
            std::fs::copy(binary, &copy).expect("copy the test binary");
            for (path, mode) in [(dir.path(), 0o755), (copy.as_path(), 0o755)] {
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                    .expect("open the copy to nobody");
            }
            let mut cmd = dtf_command(&copy);
            cmd.uid(NOBODY)
                .gid(NOBODY)
                .current_dir(dir.path())
                .env("TMPDIR", "/tmp")
                .env("HOME", "/nonexistent");
            (cmd, Keep::Copy(dir))
        }
    }
}

/// A command for the fixture as `user`, meeting in `meet`, with daemons marked by `token`.
fn fixture_command(user: User, meet: &Path, token: &str) -> (Command, Keep) {
    let (mut cmd, keep) = command_as(user, &fixture());
    cmd.env("FIXTURE_OUT_DIR", meet)
        .env("FIXTURE_TOKEN", token)
        .env("DTF_PASS_ENV", "FIXTURE_*");
    (cmd, keep)
}

fn run_fixture(user: User, args: &[&str]) -> Run {
    let meet = meeting_dir();
    let token = token();
    let _reaper = DaemonReaper(token.clone());
    let (mut cmd, _copy) = fixture_command(user, meet.path(), &token);
    run_bounded(cmd.args(args), Duration::from_secs(60))
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Runs every `iso_` test at level `full` in parallel as `user` and checks what each proves.
fn full_suite(user: User) {
    let meet = meeting_dir();
    let token = token();
    let _reaper = DaemonReaper(token.clone());
    // The file both `iso_tmp_` tests create in their /tmp.
    let shared_tmp_file = format!("/tmp/dtf-iso-{token}");
    let (mut cmd, _copy) = fixture_command(user, meet.path(), &token);
    cmd.args(["--isolation", "full", "--test-threads", "4", "iso_"]);
    let run = run_bounded(&mut cmd, Duration::from_secs(60));

    for test in [
        "iso_port_a",
        "iso_port_b",
        "iso_tmp_a",
        "iso_tmp_b",
        "iso_daemon",
        "iso_hostname",
        "iso_attr_full",
        "iso_only_lo",
        "iso_pid",
        "iso_uid",
        "iso_fail_memory_flag", // no --memory here: 1 GiB of address space is fine
    ] {
        assert_eq!(run.result_of(test), Some("ok"), "{test}\n{}", run.dump());
    }
    // Each pair held its port or its /tmp file at the same time as its partner, and wrote its
    // marker as the user who started the run (root only inside the namespace).
    let invoker = match user {
        User::Invoker | User::Worker => nix::unistd::geteuid().as_raw(),
        User::Nobody => NOBODY,
    };
    for marker in ["port_a", "port_b", "tmp_a", "tmp_b"] {
        let meta = std::fs::metadata(meet.path().join(marker))
            .unwrap_or_else(|e| panic!("{marker}: {e}\n{}", run.dump()));
        assert_eq!(
            std::os::unix::fs::MetadataExt::uid(&meta),
            invoker,
            "{marker}"
        );
    }

    assert_eq!(
        run.result_of("iso_fail_memory"),
        Some("FAILED"),
        "{}",
        run.dump()
    );
    let memory = run.section_of("iso_fail_memory").unwrap_or_default();
    assert!(
        memory.contains("exceeded its memory limit of 256MiB"),
        "{memory}\n{}",
        run.dump()
    );
    assert_eq!(
        run.result_of("iso_fail_timeout_daemon"),
        Some("FAILED"),
        "{}",
        run.dump()
    );
    let timeout = run
        .section_of("iso_fail_timeout_daemon")
        .unwrap_or_default();
    assert!(timeout.contains("timed out after 1s"), "{timeout}");
    assert_eq!(run.code, Some(101), "{}", run.dump());

    // Both daemons (the one left by a passing test, the one of the timed-out test) died with
    // their namespaces, before the run ended.
    assert_eq!(
        daemons(&token),
        Vec::<i32>::new(),
        "daemons survived\n{}",
        run.dump()
    );
    // The /tmp files lived in the tests' own tmpfs.
    assert!(
        !Path::new(&shared_tmp_file).exists(),
        "{shared_tmp_file} reached the host's /tmp"
    );
}

#[test]
fn full_isolates_ports_tmp_processes_hostname_and_network() {
    full_suite(User::Invoker);
}

#[test]
fn full_works_the_same_for_an_unprivileged_user() {
    if !is_root() {
        // These tests already run unprivileged: the test above covers it.
        println!("not root: the unprivileged case is the test above");
        return;
    }
    full_suite(User::Nobody);
}

#[test]
fn full_works_the_same_through_dtf_worker() {
    full_suite(User::Worker);
}

#[test]
fn a_daemon_is_caught_and_reported_at_level_env() {
    // At level `env` the daemon escapes the test's process group (it would outlive the test):
    // the per-test process, its subreaper, kills it and reports the leak. `iso_daemon` waits
    // until the daemon runs, so the check above would have seen it.
    let meet = meeting_dir();
    let token = token();
    let _reaper = DaemonReaper(token.clone());
    let reports = tempfile::tempdir().expect("a temporary directory");
    let junit = reports.path().join("junit.xml");
    for spawn in ["fork", "exec"] {
        let (mut cmd, _) = fixture_command(User::Invoker, meet.path(), &token);
        cmd.env("DTF_SPAWN", spawn)
            .args(["--isolation", "env", "--exact", "iso_daemon", "--junit"])
            .arg(&junit);
        let run = run_bounded(&mut cmd, Duration::from_secs(60));
        assert_eq!(run.code, Some(0), "{spawn}: {}", run.dump());
        assert_eq!(
            run.result_of("iso_daemon"),
            Some("ok (leaked 1 process: sleep)"),
            "{spawn}: {}",
            run.dump()
        );
        assert_eq!(
            daemons(&token),
            Vec::<i32>::new(),
            "{spawn}: {}",
            run.dump()
        );
        let xml = std::fs::read_to_string(&junit).expect("the JUnit report");
        assert!(
            xml.contains(r#"<property name="dtf.leaked" value="leaked 1 process: sleep"/>"#),
            "{xml}"
        );
    }
}

#[test]
fn signals_and_exit_codes_read_as_at_level_env() {
    let run = run_fixture(
        User::Invoker,
        &[
            "--isolation",
            "full",
            "fail_segfault",
            "fail_abort",
            "fail_exit_three",
            "fail_exit_zero",
            "pass_plain",
        ],
    );
    assert_eq!(run.result_of("pass_plain"), Some("ok"), "{}", run.dump());
    for (test, reason) in [
        ("fail_segfault", "killed by signal 11 (SIGSEGV)"),
        ("fail_abort", "killed by signal 6 (SIGABRT)"),
        (
            "fail_exit_three",
            "exited with code 3 before the test finished",
        ),
        (
            "fail_exit_zero",
            "exited with code 0 before the test finished",
        ),
    ] {
        let section = run.section_of(test).unwrap_or_default();
        assert!(
            section.contains(reason),
            "{test}: {section}\n{}",
            run.dump()
        );
    }
}

#[test]
fn the_memory_flag_limits_every_test() {
    for level in ["env", "full"] {
        let run = run_fixture(
            User::Invoker,
            &[
                "--isolation",
                level,
                "--memory",
                "128MiB",
                "--exact",
                "iso_fail_memory_flag",
            ],
        );
        let section = run.section_of("iso_fail_memory_flag").unwrap_or_default();
        assert!(
            section.contains("exceeded its memory limit of 128MiB"),
            "{level}: {section}\n{}",
            run.dump()
        );
    }
}

/// Checks a run that namespaces were refused for: it stopped before any test started, with the
/// cause and the fix.
fn assert_refused(run: &Run, said: &[&str]) {
    assert_eq!(run.code, Some(101), "{}", run.dump());
    assert!(
        !run.stdout.contains("running"),
        "a test started\n{}",
        run.dump()
    );
    assert!(
        run.stderr
            .contains("error: isolation level `full` is not available"),
        "{}",
        run.dump()
    );
    for text in said.iter().chain(&["Fix:", "--isolation full-or-env"]) {
        assert!(
            run.stderr.contains(text),
            "missing {text:?}\n{}",
            run.dump()
        );
    }
}

#[test]
fn refused_namespaces_stop_the_run_with_cause_and_fix() {
    let run = run_bounded(
        dtf_command(&fixture())
            .env("DTF_FAULT_UNSHARE", "EPERM")
            .args(["--isolation", "full", "pass_plain"]),
        Duration::from_secs(60),
    );
    assert_refused(&run, &["EPERM", "kernel.unprivileged_userns_clone"]);

    // A test that asks for `full` itself stops the run too.
    let run = run_bounded(
        dtf_command(&fixture())
            .env("DTF_FAULT_UNSHARE", "ENOSPC")
            .args(["--exact", "iso_attr_full"]),
        Duration::from_secs(60),
    );
    assert_refused(&run, &["ENOSPC", "user.max_user_namespaces"]);
}

#[test]
fn the_kernel_refusing_nested_namespaces_is_explained() {
    // The binary starts in a user namespace whose limit on nested user namespaces is 0.
    let uid_map = format!("0 {} 1\n", nix::unistd::getuid());
    let gid_map = format!("0 {} 1\n", nix::unistd::getgid());
    let mut cmd = dtf_command(&fixture());
    cmd.args(["--isolation", "full", "pass_plain"]);
    // SAFETY: the closure runs between fork and exec; it only makes system calls on memory
    // allocated before the fork (paths are short, so nix builds them on the stack).
    unsafe {
        cmd.pre_exec(move || {
            let write = |path: &str, bytes: &[u8]| -> std::io::Result<()> {
                let fd = nix::fcntl::open(
                    path,
                    nix::fcntl::OFlag::O_WRONLY | nix::fcntl::OFlag::O_CLOEXEC,
                    nix::sys::stat::Mode::empty(),
                )?;
                nix::unistd::write(&fd, bytes)?;
                Ok(())
            };
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUSER)?;
            write("/proc/self/setgroups", b"deny")?;
            write("/proc/self/uid_map", uid_map.as_bytes())?;
            write("/proc/self/gid_map", gid_map.as_bytes())?;
            write("/proc/sys/user/max_user_namespaces", b"0")?;
            Ok(())
        });
    }
    let run = run_bounded(&mut cmd, Duration::from_secs(60));
    assert_refused(&run, &["ENOSPC", "user.max_user_namespaces = 0"]);
}

#[test]
fn full_or_env_warns_once_and_runs_at_level_env() {
    let run = run_bounded(
        dtf_command(&fixture())
            .env("DTF_FAULT_UNSHARE", "EPERM")
            .args([
                "--isolation",
                "full-or-env",
                "pass_plain",
                "pass_prints",
                "iso_hostname",
            ]),
        Duration::from_secs(60),
    );
    let warnings = run
        .stderr
        .matches("warning: isolation level `full` is not available")
        .count();
    assert_eq!(warnings, 1, "{}", run.dump());
    assert_eq!(run.result_of("pass_plain"), Some("ok"), "{}", run.dump());
    assert_eq!(run.result_of("pass_prints"), Some("ok"), "{}", run.dump());
    // At level `env` the hostname is the host's.
    assert_eq!(
        run.result_of("iso_hostname"),
        Some("FAILED"),
        "{}",
        run.dump()
    );
}

/// The example's tests all bind 127.0.0.1:8080, write the same /tmp file and leave a helper
/// behind: under `full` they pass side by side and nothing survives.
fn ports_example(user: User) {
    let helpers_before = daemons(HELPER_SECONDS);
    let state_dir = Path::new(STATE_FILE)
        .parent()
        .expect("the state file has a directory");
    let _ = std::fs::remove_dir_all(state_dir);
    let check_tmp = !state_dir.exists(); // another user's directory stays
    let (mut cmd, _copy) = command_as(user, &test_binary("ports", "ports"));
    cmd.args(["--test-threads", "6"]);
    let run = run_bounded(&mut cmd, Duration::from_secs(60));
    let new_helpers: Vec<i32> = daemons(HELPER_SECONDS)
        .into_iter()
        .filter(|pid| !helpers_before.contains(pid))
        .collect();
    for &pid in &new_helpers {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
    }
    assert_eq!(run.code, Some(0), "{}", run.dump());
    for test in [
        "echoes_a_line",
        "echoes_an_empty_line",
        "echoes_to_several_clients",
        "state_survives_a_reload",
        "state_can_be_replaced",
        "helper_starts",
    ] {
        assert_eq!(run.result_of(test), Some("ok"), "{test}\n{}", run.dump());
    }
    assert_eq!(
        new_helpers,
        Vec::<i32>::new(),
        "helpers survived\n{}",
        run.dump()
    );
    if check_tmp {
        assert!(
            !state_dir.exists(),
            "{} reached the host's /tmp",
            state_dir.display()
        );
    }
}

#[test]
fn the_ports_example_passes_in_parallel_and_leaves_nothing() {
    ports_example(User::Invoker);
}

#[test]
fn the_ports_example_passes_for_an_unprivileged_user() {
    if !is_root() {
        println!("not root: the unprivileged case is the test above");
        return;
    }
    ports_example(User::Nobody);
}

#[test]
fn full_gives_each_test_a_private_overlay_of_the_package_root() {
    let binary = test_binary("dtf-fixture", "package_root");
    let mark = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixture/dtf-package-root-mark");
    let _ = std::fs::remove_file(&mark);
    let run = run_bounded(
        dtf_command(&binary).args(["--test-threads", "1", "--order", "name"]),
        Duration::from_secs(60),
    );
    let leaked = mark.exists();
    let _ = std::fs::remove_file(&mark);
    assert_eq!(run.code, Some(0), "{}", run.dump());
    assert!(
        run.stdout.contains("test result: ok. 2 passed"),
        "{}",
        run.dump()
    );
    if mark.starts_with("/tmp") && run.stderr.contains("share the real package root") {
        // A checkout under /tmp is bound back onto each test's private /tmp, and the overlay
        // over that binding is refused on some kernels (gVisor's among them): then the
        // documented fallback, said once, is what must hold.
        println!("checkout under /tmp and the overlay refused: the documented fallback held");
        return;
    }
    assert!(!leaked, "a test's write reached the source tree");
    assert!(
        !run.stderr.contains("share the real package root"),
        "{}",
        run.dump()
    );
}
