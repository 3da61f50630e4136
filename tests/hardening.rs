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

/// Raises this process's soft open-file limit to its hard limit (the attacker side of the
/// flood tests needs thousands of sockets; the worker under test keeps its own limit).
fn raise_own_nofile() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("setrlimit");
    hard
}

/// Lines of the worker's log that report refused connections.
fn refusal_lines(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.contains("refused")).collect()
}

/// The sum of the counts by reason in refusal lines: `refused … (bad token 61, evicted 6) …`.
fn refusal_counts(lines: &[&str]) -> std::collections::BTreeMap<String, u64> {
    let mut counts = std::collections::BTreeMap::new();
    for line in lines {
        let Some(inside) = line
            .split_once('(')
            .and_then(|(_, rest)| rest.split_once(')'))
        else {
            continue;
        };
        for part in inside.0.split(", ") {
            if let Some((reason, Ok(n))) = part
                .rsplit_once(' ')
                .map(|(reason, n)| (reason, n.parse::<u64>()))
            {
                *counts.entry(reason.to_owned()).or_default() += n;
            }
        }
    }
    counts
}

/// An attacker holding `n` idle connections to `addr`, reopening each one the worker closes,
/// until dropped. Returns how many connections it opened in all.
struct IdleFlood {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<(usize, usize)>>,
}

impl IdleFlood {
    fn start(addr: &str, n: usize) -> IdleFlood {
        use std::io::Read;
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let addr = addr.to_owned();
        let connect = move || -> Option<std::net::TcpStream> {
            let s = std::net::TcpStream::connect_timeout(
                &addr.parse().expect("addr"),
                Duration::from_secs(2),
            )
            .ok()?;
            s.set_nonblocking(true).ok()?;
            Some(s)
        };
        let thread = std::thread::spawn(move || {
            let started = std::time::Instant::now();
            let mut conns: Vec<Option<std::net::TcpStream>> = Vec::with_capacity(n);
            let mut opened = 0;
            for _ in 0..n {
                conns.push(connect());
                opened += 1;
            }
            let mut peak = conns.iter().flatten().count();
            // Reopen what the worker closed, for as long as the test runs (at most 5 minutes).
            while !flag.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(300) {
                let mut buf = [0u8; 64];
                for slot in conns.iter_mut() {
                    let closed = match slot {
                        None => true,
                        Some(s) => match s.read(&mut buf) {
                            Ok(0) => true,
                            Ok(_) => false,
                            Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
                        },
                    };
                    if closed {
                        *slot = connect();
                        opened += 1;
                    }
                    if flag.load(Ordering::SeqCst) {
                        break;
                    }
                }
                peak = peak.max(conns.iter().flatten().count());
                std::thread::sleep(Duration::from_millis(50));
            }
            (opened, peak)
        });
        IdleFlood {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the flood; (connections opened in all, most held at once).
    fn stop(mut self) -> (usize, usize) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for IdleFlood {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn two_thousand_idle_connections_under_ulimit_1024_do_not_lock_a_coordinator_out() {
    raise_own_nofile();
    let w = Worker::start_with(WorkerConfig {
        nofile: Some(1024),
        ..WorkerConfig::default()
    });
    let flood = IdleFlood::start(&w.addr, 2000);
    // Let the flood reach the worker's caps before the coordinator arrives.
    assert!(
        eventually(Duration::from_secs(60), || w.log().contains("evicted")),
        "{}",
        w.log()
    );
    let fixture = fixture();
    let mut cmd = w.command(&fixture);
    cmd.env("DTF_REQUIRE_WORKERS", "1")
        .env("FIXTURE_SLEEP_MS", "0")
        .arg("dist_sleep");
    let run = run_bounded(&mut cmd, MINUTE);
    let (opened, peak) = flood.stop();
    assert_eq!(run.code, Some(0), "{}\n{}", run.dump(), w.log());
    assert!(run.stdout.contains("dtf: 1 worker;"), "{}", run.dump());
    assert!(
        opened >= 2000 && peak > 1024,
        "opened {opened}, peak {peak}"
    );
    // Refusals are logged at most once per 10 s, so a fast run can end before the line that
    // counts the flood: wait for it (the worker writes it at its next 10 s tick).
    eventually(Duration::from_secs(30), || {
        refusal_counts(&refusal_lines(&w.log()))
            .get("evicted")
            .is_some_and(|&n| n > 500)
    });
    let log = w.log();
    assert!(!log.contains("Too many open files"), "{log}");
    assert!(log.contains("nofile=1024"), "{log}");
    // Thousands of refusals, a handful of lines.
    let lines = refusal_lines(&log);
    let counts = refusal_counts(&lines);
    assert!(
        counts.get("evicted").copied().unwrap_or(0) > 500,
        "{counts:?}\n{log}"
    );
    assert!(lines.len() <= 2 + 60 / 10, "{lines:#?}");
}

#[test]
fn a_hundred_failed_handshakes_make_a_bounded_number_of_log_lines_and_back_off() {
    let w = Worker::start();
    let wrong = dtf::protocol::Token::new("wrong-token-wrong-token-wrong-token-0123", "test")
        .expect("token");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let started = std::time::Instant::now();
    let failures = rt.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..100 {
            let addr = w.addr.clone();
            let wrong = wrong.clone();
            tasks.push(tokio::spawn(async move {
                let stream = tokio::net::TcpStream::connect(&addr)
                    .await
                    .expect("connect");
                tokio::time::timeout(
                    Duration::from_secs(20),
                    dtf::protocol::client_handshake(stream, Some(&wrong)),
                )
                .await
                .map(|r| r.map(|_| ()))
            }));
        }
        let mut failures = Vec::new();
        for t in tasks {
            match t.await.expect("task") {
                Ok(Err(e)) => failures.push(e.to_string()),
                Ok(Ok(())) => panic!("a wrong token was accepted"),
                Err(_) => failures.push("timed out".to_owned()),
            }
        }
        failures
    });
    assert_eq!(failures.len(), 100);
    let rejected = failures
        .iter()
        .filter(|f| f.contains("rejected the token"))
        .count();
    assert!(rejected >= 1, "{failures:#?}");
    // All 100 are counted within two log periods, in at most three lines.
    let counted = || {
        let log = w.log();
        let counts = refusal_counts(&refusal_lines(&log));
        counts.values().sum::<u64>()
    };
    assert!(
        eventually(Duration::from_secs(25), || counted() >= 100),
        "{}",
        w.log()
    );
    let log = w.log();
    let lines = refusal_lines(&log);
    let counts = refusal_counts(&lines);
    assert_eq!(counts.values().sum::<u64>(), 100, "{counts:?}\n{log}");
    assert!(
        counts.get("bad token").copied().unwrap_or(0) >= 1,
        "{counts:?}"
    );
    assert!(
        lines.len() <= 2 + (started.elapsed().as_secs() as usize) / 10,
        "{lines:#?}"
    );

    // One guess after another: the back-off doubles each time, so only a handful fit in 3 s.
    let (guesses, backing_off) = rt.block_on(async {
        let started = std::time::Instant::now();
        let (mut guesses, mut backing_off) = (0, 0);
        while started.elapsed() < Duration::from_secs(3) {
            let stream = tokio::net::TcpStream::connect(&w.addr)
                .await
                .expect("connect");
            let r = tokio::time::timeout(
                Duration::from_secs(10),
                dtf::protocol::client_handshake(stream, Some(&wrong)),
            )
            .await;
            match r {
                Ok(Err(e)) if e.to_string().contains("rejected the token") => guesses += 1,
                Ok(Err(_)) => backing_off += 1,
                other => panic!("{:?}", other.map(|r| r.map(|_| ()))),
            }
        }
        (guesses, backing_off)
    });
    assert!(
        (1..=8).contains(&guesses),
        "{guesses} guesses, {backing_off} others"
    );

    // The right token still gets in: it waits out the back-off, and clears it.
    let right = dtf::protocol::Token::new(TOKEN, "test").expect("token");
    let handshake = || async {
        let stream = tokio::net::TcpStream::connect(&w.addr)
            .await
            .expect("connect");
        let started = std::time::Instant::now();
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            dtf::protocol::client_handshake(stream, Some(&right)),
        )
        .await
        .map(|r| r.map(|_| ()));
        (r, started.elapsed())
    };
    let first = rt.block_on(handshake());
    assert!(matches!(first.0, Ok(Ok(()))), "{first:?}\n{}", w.log());
    let second = rt.block_on(handshake());
    assert!(
        matches!(second.0, Ok(Ok(()))) && second.1 < Duration::from_secs(2),
        "{second:?}"
    );
}

/// The ends of a run's output (a few MiB would drown a failure message).
fn brief(run: &Run) -> String {
    let ends = |s: &str| {
        let chars: Vec<char> = s.chars().collect();
        if chars.len() <= 4000 {
            return s.to_owned();
        }
        let head: String = chars[..2000].iter().collect();
        let tail: String = chars[chars.len() - 2000..].iter().collect();
        format!(
            "{head}\n[... {} characters ...]\n{tail}",
            chars.len() - 4000
        )
    };
    format!(
        "exit: {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        run.code,
        ends(&run.stdout),
        ends(&run.stderr)
    )
}

/// Checks that a run of `cap_big_output_then_panic` failed and its report shows the head, the
/// note and the panic message at the end; returns the note's line.
fn assert_head_note_and_panic(run: &Run) -> String {
    assert_eq!(run.code, Some(101), "{}", brief(run));
    let all = format!("{}{}", run.stdout, run.stderr);
    assert!(all.contains("first line of the output"), "{}", brief(run));
    let note = all
        .lines()
        .find(|l| l.starts_with("[dtf: output truncated: "))
        .unwrap_or_else(|| panic!("no cut note: {}", brief(run)))
        .to_owned();
    assert!(
        all.contains("the panic after 5 MiB of output"),
        "{}",
        brief(run)
    );
    assert!(
        all.find("the panic after 5 MiB of output") > all.find(&note),
        "{}",
        brief(run)
    );
    note
}

#[test]
fn over_the_output_cap_a_failure_keeps_the_head_and_the_panic_message_locally_and_on_a_worker() {
    let test = ["--exact", "cap_big_output_then_panic"];
    let local = run_bounded(dtf_command(&fixture()).args(test), MINUTE);
    let note = assert_head_note_and_panic(&local);
    // 5 MiB and a line printed, 4 MiB kept: 2 MiB of head, 2 MiB of tail.
    assert!(
        note.contains("the first 2097152 and the last 2097152 bytes are kept"),
        "{note}"
    );

    let remote = run_bounded(
        dtf_command(&fixture())
            .env("DTF_WORKERS", "local:1")
            .env("DTF_REQUIRE_WORKERS", "1")
            .args(test),
        MINUTE,
    );
    assert_head_note_and_panic(&remote);

    // The coordinator's cap travels to the worker.
    let small = run_bounded(
        dtf_command(&fixture())
            .env("DTF_WORKERS", "local:1")
            .env("DTF_REQUIRE_WORKERS", "1")
            .env("DTF_OUTPUT_CAP", "64KiB")
            .args(test),
        MINUTE,
    );
    let note = assert_head_note_and_panic(&small);
    assert!(
        note.contains("the first 32768 and the last 32768 bytes are kept"),
        "{note}"
    );

    // Under --nocapture a worker's output is printed as it arrives, with the same cut.
    let nocapture = run_bounded(
        dtf_command(&fixture())
            .env("DTF_WORKERS", "local:1")
            .env("DTF_REQUIRE_WORKERS", "1")
            .env("DTF_OUTPUT_CAP", "64KiB")
            .args(test)
            .arg("--nocapture"),
        MINUTE,
    );
    let note = assert_head_note_and_panic(&nocapture);
    assert!(note.contains("bytes dropped here"), "{note}");
}

#[test]
fn an_output_cap_larger_than_a_frame_can_carry_is_refused() {
    let run = run_bounded(
        dtf_command(&fixture())
            .env("DTF_OUTPUT_CAP", "7MiB")
            .args(["--exact", "dist_sleep_1"]),
        MINUTE,
    );
    assert_eq!(run.code, Some(101), "{}", run.dump());
    assert!(
        run.stderr.contains("DTF_OUTPUT_CAP") && run.stderr.contains("at most 6MiB"),
        "{}",
        run.dump()
    );
    assert!(!run.stdout.contains("running"), "{}", run.dump());
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn e2e_token() -> dtf::protocol::Token {
    dtf::protocol::Token::new(TOKEN, "test").expect("token")
}

/// An authenticated protocol connection to `w`, as a coordinator opens one.
async fn connect(w: &Worker) -> dtf::protocol::Connection {
    dtf::protocol::connect(
        &w.addr,
        Some(&e2e_token()),
        dtf::protocol::Hello {
            run: "hardening".into(),
            key: None,
        },
        Duration::from_secs(10),
    )
    .await
    .expect("connect")
}

/// The first chunk (1 KiB) of an upload announced as `total` bytes, under a made-up digest.
fn first_chunk(n: u32, total: u64) -> dtf::protocol::Chunk {
    let mut digest = [0u8; 32];
    digest[..4].copy_from_slice(&n.to_be_bytes());
    dtf::protocol::Chunk {
        digest: dtf::protocol::Digest(digest),
        total,
        offset: 0,
        data: vec![0u8; 1024],
    }
}

/// Starts upload `n` on `conn`: `Ok` when the worker took it (unfinished), else its refusal.
async fn start_upload(conn: &dtf::protocol::Connection, n: u32, total: u64) -> Result<(), String> {
    let answer = conn
        .client
        .upload(
            dtf::protocol::context_within(Duration::from_secs(10)),
            first_chunk(n, total),
        )
        .await
        .expect("an answer");
    match answer {
        Ok(dtf::protocol::UploadProgress::Partial(1024)) => Ok(()),
        Ok(other) => panic!("unexpected progress {other:?}"),
        Err(e) => Err(e.to_string()),
    }
}

fn open_descriptors(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the worker's descriptors")
        .count()
}

#[test]
fn unfinished_uploads_are_limited_per_connection_per_worker_and_in_bytes() {
    let w = Worker::start_with(WorkerConfig {
        cache_max: Some("64MiB".into()),
        ..WorkerConfig::default()
    });
    let rt = runtime();
    rt.block_on(async {
        let first = connect(&w).await;
        let before = open_descriptors(w.pid());
        // One connection tries 200 unfinished uploads: 4 are taken, the rest refused clearly.
        let mut taken = 0;
        let mut refusal = None;
        for n in 0..200 {
            match start_upload(&first, n, 512 << 10).await {
                Ok(()) => taken += 1,
                Err(e) => refusal = Some(e),
            }
        }
        assert_eq!(taken, 4);
        let refusal = refusal.expect("refused");
        assert!(
            refusal.contains("4 uploads are in progress on this connection")
                && refusal.contains("4 per connection"),
            "{refusal}"
        );
        let held = open_descriptors(w.pid());
        assert!(held <= before + 8, "{before} descriptors, then {held}");
        // An upload that fits in one chunk is never unfinished: it still goes through.
        let small = b"a small input file".to_vec();
        let stored = first
            .client
            .upload(
                dtf::protocol::context_within(Duration::from_secs(10)),
                dtf::protocol::Chunk {
                    digest: dtf::protocol::Digest::of(&small),
                    total: small.len() as u64,
                    offset: 0,
                    data: small,
                },
            )
            .await
            .expect("an answer");
        assert_eq!(stored, Ok(dtf::protocol::UploadProgress::Stored));

        // 15 more connections take 4 each: 64 in all, the worker's limit.
        let mut conns = vec![first];
        for c in 1..16u32 {
            let conn = connect(&w).await;
            for k in 0..4 {
                start_upload(&conn, 1_000_000 + c * 10 + k, 512 << 10)
                    .await
                    .expect("under the limit");
            }
            conns.push(conn);
        }
        let one_more = connect(&w).await;
        let refusal = start_upload(&one_more, 7, 512 << 10)
            .await
            .expect_err("over the worker's limit");
        assert!(
            refusal.contains("64 uploads are in progress on this worker")
                && refusal.contains("64 over all connections"),
            "{refusal}"
        );
        let held = open_descriptors(w.pid());
        assert!(
            held <= before + 64 + 16 + 8,
            "{before} descriptors, then {held}"
        );

        // Closing the connections gives their uploads back.
        drop(conns);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match start_upload(&one_more, 8, 30 << 20).await {
                Ok(()) => break,
                Err(e) if std::time::Instant::now() < deadline => {
                    assert!(e.contains("on this worker"), "{e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("uploads not released: {e}"),
            }
        }
        // Bytes: two of 30 MiB fit under the 64 MiB cap, a third does not.
        start_upload(&one_more, 9, 30 << 20)
            .await
            .expect("60 MiB announced");
        let refusal = start_upload(&one_more, 10, 30 << 20)
            .await
            .expect_err("over the cap on bytes in unfinished uploads");
        assert!(
            refusal.contains("would exceed the cache cap") && refusal.contains("--cache-max"),
            "{refusal}"
        );
    });
    let log = w.log();
    assert!(log.contains("upload refused"), "{log}");
}

/// The worker's resident memory in bytes.
fn rss(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

#[test]
fn memory_in_partial_frames_is_bounded_over_all_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let w = Worker::start();
    let rt = runtime();
    let conns = 60;
    let frame = dtf::protocol::MAX_REQUEST_FRAME;
    let before = rss(w.pid());
    let closed = rt.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..conns {
            let addr = w.addr.clone();
            tasks.push(tokio::spawn(async move {
                let tcp = tokio::net::TcpStream::connect(&addr)
                    .await
                    .expect("connect");
                let mut stream = dtf::protocol::client_handshake(tcp, Some(&e2e_token()))
                    .await
                    .expect("handshake");
                // A frame announced at the limit, all but its last 64 bytes sent.
                let mut bytes = (frame as u32).to_be_bytes().to_vec();
                bytes.resize(4 + frame - 64, 0xab);
                let sent = stream.write_all(&bytes).await.and(stream.flush().await);
                // The worker either holds the frame (no answer) or closes the connection.
                let mut buf = [0u8; 16];
                let answer =
                    tokio::time::timeout(Duration::from_secs(3), stream.read(&mut buf)).await;
                let closed = sent.is_err() || matches!(answer, Ok(Ok(0)) | Ok(Err(_)));
                (closed, stream)
            }));
        }
        let mut closed = 0;
        let mut kept = Vec::new();
        for task in tasks {
            let (was_closed, stream) = task.await.expect("task");
            closed += was_closed as usize;
            kept.push(stream);
        }
        let during = rss(w.pid());
        drop(kept);
        (closed, during)
    });
    let (closed, during) = closed;
    let budget = dtf::protocol::PARTIAL_FRAME_BUDGET;
    let fit = budget / (frame - 60);
    assert!(
        closed >= conns - fit && closed < conns,
        "{closed} of {conns} connections closed ({fit} frames fit in the budget)"
    );
    // 120 MiB were sent; the worker holds at most the budget plus per-connection buffers.
    let grew = during.saturating_sub(before);
    eprintln!("the worker grew by {grew} bytes (from {before}); {closed} connections closed");
    assert!(
        grew < (budget as u64) + (32 << 20),
        "the worker grew by {grew} bytes (from {before})"
    );
    // The worker still serves a run.
    let run = run_bounded(
        w.command(&fixture())
            .env("DTF_REQUIRE_WORKERS", "1")
            .args(["--exact", "dist_sleep_1"]),
        MINUTE,
    );
    assert_eq!(run.code, Some(0), "{}", run.dump());
}

#[test]
fn control_characters_in_test_names_and_labels_reach_the_log_and_status_escaped() {
    use dtf::protocol::{Chunk, Digest, Hello, RunRequest, UploadProgress};
    let w = Worker::start();
    let rt = runtime();
    // A "test binary" that runs for a while whatever it is asked: a shell script run as a
    // libtest binary (the worker's relay execs it with `--exact NAME`).
    let script = b"#!/bin/sh\nsleep 3\n".to_vec();
    let digest = Digest::of(&script);
    let name = "forged\n2026-01-01T00:00:00Z  INFO dtf_worker: fake line\u{1b}[2J";
    let label = "evil\nlabel\u{1b}[31m";
    let status = rt.block_on(async {
        let conn = dtf::protocol::connect(
            &w.addr,
            Some(&e2e_token()),
            Hello {
                run: label.into(),
                key: None,
            },
            Duration::from_secs(10),
        )
        .await
        .expect("connect");
        let stored = conn
            .client
            .upload(
                dtf::protocol::context_within(Duration::from_secs(10)),
                Chunk {
                    digest,
                    total: script.len() as u64,
                    offset: 0,
                    data: script.clone(),
                },
            )
            .await
            .expect("an answer");
        assert_eq!(stored, Ok(UploadProgress::Stored));
        let spec = dtf::sandbox::RunSpec {
            test: name.into(),
            isolation: dtf::registry::Isolation::Process,
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            timeout: Some(Duration::from_secs(30)),
            memory: None,
            capture: true,
            cwd: None,
            leak_fails: false,
            spawn: dtf::registry::Spawn::Exec,
            harness: dtf::sandbox::Harness::Libtest {
                ignored: false,
                args: Vec::new(),
            },
        };
        let client = conn.client.clone();
        let run = tokio::spawn(async move {
            client
                .run(
                    dtf::protocol::context_within(Duration::from_secs(30)),
                    RunRequest {
                        digest,
                        inputs: None,
                        spec,
                    },
                )
                .await
        });
        // `dtf-worker status` while the test runs.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let status = loop {
            let status = tokio::task::spawn_blocking({
                let addr = w.addr.clone();
                move || {
                    run_bounded(
                        Command::new(worker_binary())
                            .args(["status", &addr])
                            .env("DTF_TOKEN", TOKEN)
                            .env_remove("DTF_TOKEN_FILE"),
                        MINUTE,
                    )
                }
            })
            .await
            .expect("status");
            if status.stdout.contains("forged") || std::time::Instant::now() > deadline {
                break status;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let response = run
            .await
            .expect("task")
            .expect("an answer")
            .expect("not declined");
        assert!(response.failure.is_none(), "{:?}", response.failure);
        status
    });
    assert_eq!(status.code, Some(0), "{}", status.dump());
    let out = &status.stdout;
    assert!(
        out.contains(r"forged\n2026-01-01T00:00:00Z  INFO dtf_worker: fake line\u{1b}[2J"),
        "{out}"
    );
    assert!(out.contains(r"evil\nlabel\u{1b}[31m"), "{out}");
    assert!(!out.contains('\u{1b}'), "{out:?}");
    assert!(
        !out.lines()
            .any(|l| l.starts_with("2026-01-01") || l.starts_with("label")),
        "{out}"
    );

    let log = w.log();
    assert!(log.contains(r"test=forged\n2026-01-01T00:00:00Z"), "{log}");
    assert!(log.contains(r"evil\nlabel\u{1b}[31m"), "{log}");
    assert!(!log.contains('\u{1b}'), "{log:?}");
    assert!(
        !log.lines()
            .any(|l| l.starts_with("2026-01-01") || l.starts_with("label")),
        "{log}"
    );
}
