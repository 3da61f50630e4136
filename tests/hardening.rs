//! End-to-end tests of the worker against hostile peers: short tokens, token files others can
//! read, floods of idle and failed connections, malformed input; and against hostile tests.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use dtf_e2e::*;

const MINUTE: Duration = Duration::from_secs(60);

fn worker_cmd() -> Command {
    let mut cmd = Command::new(worker_binary());
    cmd.env_remove("DTF_TOKEN").env_remove("DTF_TOKEN_FILE");
    cmd
}

#[test]
fn dtf_worker_token_makes_long_random_tokens_in_private_files() {
    let printed = run_bounded(worker_cmd().arg("token"), MINUTE);
    assert_eq!(printed.code, Some(0), "{}", printed.dump());
    let token = printed.stdout.trim();
    assert_eq!(token.len(), 64, "{}", printed.dump());
    assert!(token.chars().all(|c| c.is_ascii_hexdigit()), "{token}");
    let again = run_bounded(worker_cmd().arg("token"), MINUTE);
    assert_ne!(again.stdout.trim(), token);

    // Into a file that exists and is world-readable: replaced, and private afterwards.
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("token");
    std::fs::write(&file, "old").expect("write");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let wrote = run_bounded(worker_cmd().arg("token").arg("--out").arg(&file), MINUTE);
    assert_eq!(wrote.code, Some(0), "{}", wrote.dump());
    assert!(wrote.stdout.is_empty(), "{}", wrote.dump());
    let meta = std::fs::metadata(&file).expect("metadata");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let text = std::fs::read_to_string(&file).expect("read");
    assert_eq!(text.trim().len(), 64, "{text}");

    // A worker started with it serves a run that uses it.
    let w = Worker::start_with(WorkerConfig {
        token: Some(text.trim().to_owned()),
        ..WorkerConfig::default()
    });
    let run = run_bounded(
        w.command(&fixture())
            .env_remove("DTF_TOKEN")
            .env("DTF_TOKEN_FILE", &file)
            .env("DTF_REQUIRE_WORKERS", "1")
            .args(["--exact", "dist_sleep_1"]),
        MINUTE,
    );
    assert_eq!(run.code, Some(0), "{}", run.dump());
}

#[test]
fn short_tokens_are_refused_by_worker_and_coordinator_with_how_to_make_one() {
    let dir = tempfile::tempdir().expect("dir");
    let refused = run_bounded(
        worker_cmd()
            .args(["--listen", "127.0.0.1:0", "--cache-dir"])
            .arg(dir.path())
            .env("DTF_TOKEN", "hunter2"),
        MINUTE,
    );
    assert_eq!(refused.code, Some(2), "{}", refused.dump());
    assert!(
        refused.stderr.contains("too short (7 characters")
            && refused.stderr.contains("dtf-worker token --out FILE"),
        "{}",
        refused.dump()
    );
    assert!(!refused.stdout.contains("listening"), "{}", refused.dump());

    let w = Worker::start();
    let coordinator = run_bounded(
        w.command(&fixture())
            .env("DTF_TOKEN", "hunter2")
            .env("DTF_REQUIRE_WORKERS", "1")
            .args(["--exact", "dist_sleep_1"]),
        MINUTE,
    );
    assert_ne!(coordinator.code, Some(0), "{}", coordinator.dump());
    assert!(
        coordinator.stderr.contains("too short") && coordinator.stderr.contains("dtf-worker token"),
        "{}",
        coordinator.dump()
    );
}

#[test]
fn a_token_file_others_can_read_is_warned_about() {
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("token");
    std::fs::write(&file, format!("{TOKEN}\n")).expect("write");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let mut worker = Background::start(
        worker_cmd()
            .args(["--listen", "127.0.0.1:0", "--cache-dir"])
            .arg(dir.path().join("cache"))
            .arg("--token-file")
            .arg(&file),
    );
    assert!(
        eventually(Duration::from_secs(20), || worker
            .output()
            .0
            .contains("listening on")),
        "{:?}",
        worker.output()
    );
    let (_, log) = worker.output();
    assert!(
        log.contains("is readable or writable by other users (mode 644)")
            && log.contains("chmod 600"),
        "{log}"
    );
    let _ = worker.child.kill();
    let _ = worker.wait(MINUTE);

    // A private file: no warning.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let worker = Background::start(
        worker_cmd()
            .args(["--listen", "127.0.0.1:0", "--cache-dir"])
            .arg(dir.path().join("cache"))
            .arg("--token-file")
            .arg(&file),
    );
    assert!(
        eventually(Duration::from_secs(20), || worker
            .output()
            .0
            .contains("listening on")),
        "{:?}",
        worker.output()
    );
    assert!(
        !worker.output().1.contains("other users"),
        "{:?}",
        worker.output()
    );
}
