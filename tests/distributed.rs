//! Distributed mode end to end: real `dtf-worker` processes on 127.0.0.1 running the fixture
//! suite for real coordinators, and every failure really happening (workers killed and
//! stopped mid-run, coordinators killed, wrong tokens, raw garbage on the socket).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use dtf::protocol::{self, Chunk, Digest, Hello, MAGIC, PROTOCOL_VERSION, RunRequest, Token};
use dtf_e2e::*;
use nix::sys::signal::Signal;

const MINUTE: Duration = Duration::from_secs(60);

/// Variables the fixture's `dist_*` tests read, passed through the hermetic environment.
const PASS: &str = "FIXTURE_OUT_DIR,FIXTURE_SLEEP_MS,FIXTURE_KILL_WORKER";

/// The six `dist_sleep_*` tests, each sleeping `ms`, recording pids in `out` when given.
fn sleepers(cmd: &mut std::process::Command, ms: u64, out: Option<&Path>) {
    cmd.arg("dist_sleep")
        .env("DTF_PASS_ENV", PASS)
        .env("FIXTURE_SLEEP_MS", ms.to_string());
    if let Some(out) = out {
        cmd.env("FIXTURE_OUT_DIR", out);
    }
}

fn assert_all_sleepers_passed_once(stdout: &str) {
    for i in 1..=6 {
        let name = format!("dist_sleep_{i}");
        let lines: Vec<&str> = stdout
            .lines()
            .filter(|l| l.starts_with(&format!("test {name} ... ")))
            .collect();
        assert_eq!(lines.len(), 1, "{name} reported once:\n{stdout}");
        assert!(
            lines[0].ends_with(" ok") || lines[0].ends_with("ok (rerun after a lost worker)"),
            "{}",
            lines[0]
        );
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Asks the worker behind `client` to run one test of the binary `digest` (30 s deadline).
async fn run_on(
    client: &protocol::WorkerClient,
    digest: Digest,
    spec: dtf::sandbox::RunSpec,
) -> protocol::RunResponse {
    client
        .run(
            protocol::context_within(Duration::from_secs(30)),
            RunRequest {
                digest,
                inputs: None,
                spec,
            },
        )
        .await
        .expect("an answer")
        .expect("not declined")
}

/// An authenticated protocol connection to `w`, as a coordinator opens one.
async fn connect(w: &Worker) -> protocol::Connection {
    protocol::connect(
        &w.addr,
        Some(&token()),
        Hello {
            run: "e2e".into(),
            key: None,
        },
        Duration::from_secs(10),
    )
    .await
    .expect("connect")
}

fn token() -> Token {
    Token::new(TOKEN, "test").expect("token")
}

/// `ADDR ran N` from the run's note, per worker.
fn ran_per_worker(stdout: &str) -> BTreeMap<String, usize> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("dtf: "))
        .flat_map(|l| l.split("; "))
        .filter_map(|part| {
            let (label, rest) = part.split_once(" ran ")?;
            let n = rest
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()?;
            Some((label.to_owned(), n))
        })
        .collect()
}

#[test]
fn the_fixture_has_the_same_outcomes_on_two_workers_and_a_warm_rerun_ships_nothing() {
    let (_dir, fixture) = private_copy(&fixture());
    let a = Worker::start();
    let b = Worker::start();

    let local = run_bounded(&mut dtf_command(&fixture), MINUTE);
    let cold = run_bounded(&mut workers_command(&fixture, &[&a, &b]), MINUTE);
    assert_eq!(
        results(&local.stdout),
        results(&cold.stdout),
        "{}",
        cold.dump()
    );
    assert!(results(&local.stdout).len() > 20);
    assert_eq!(local.code, cold.code, "{}", cold.dump());
    assert!(
        cold.stdout.contains("binary shipped to 2 of 2"),
        "{}",
        cold.dump()
    );
    // Failures say where they ran; both workers took a share of the tests.
    assert!(
        cold.stdout.contains("note: ran on worker 127.0.0.1:"),
        "{}",
        cold.dump()
    );
    let ran = ran_per_worker(&cold.stdout);
    assert!(
        ran[&a.addr] > 0 && ran[&b.addr] > 0,
        "{ran:?}\n{}",
        cold.dump()
    );

    let received = |w: &Worker| w.status()["bytes_received"].as_u64().unwrap_or(0);
    let before = (received(&a), received(&b));
    assert!(before.0 > 1_000_000 && before.1 > 1_000_000, "{before:?}");
    let warm = run_bounded(workers_command(&fixture, &[&a, &b]).arg("pass_"), MINUTE);
    assert_eq!(warm.code, Some(0), "{}", warm.dump());
    assert!(
        warm.stdout
            .contains("binary shipped to 0 of 2 (0 bytes), already cached on 2"),
        "{}",
        warm.dump()
    );
    assert_eq!(
        (received(&a), received(&b)),
        before,
        "a warm run ships no bytes"
    );
    let status = a.status();
    assert!(status["cache_hits"].as_u64() >= Some(1), "{status}");
    // The binary, and the fixture package's files and manifest.
    assert!(status["cache_entries"].as_u64() > Some(1), "{status}");

    // The human status output.
    let human = run_bounded(
        std::process::Command::new(worker_binary())
            .args(["status", &a.addr])
            .env("DTF_TOKEN", TOKEN),
        MINUTE,
    );
    assert!(human.stdout.contains("tests run"), "{}", human.dump());
    assert!(
        human.stdout.contains("blobs (binaries and input files)"),
        "{}",
        human.dump()
    );

    eprintln!(
        "fixture: local {:.2}s, two workers cold {:.2}s, warm (pass_ only) {:.2}s",
        local.elapsed.as_secs_f64(),
        cold.elapsed.as_secs_f64(),
        warm.elapsed.as_secs_f64()
    );
}

#[test]
fn a_test_longer_than_the_default_rpc_deadline_passes() {
    let w = Worker::start();
    let run = run_bounded(
        w.command(&fixture())
            .args(["--exact", "dist_sleep_1"])
            .env("DTF_PASS_ENV", PASS)
            .env("FIXTURE_SLEEP_MS", "10500"),
        MINUTE,
    );
    assert_eq!(run.code, Some(0), "{}", run.dump());
    assert_eq!(run.result_of("dist_sleep_1"), Some("ok"), "{}", run.dump());
    assert!(run.elapsed >= Duration::from_millis(10500));
}

#[test]
fn an_unreachable_worker_is_named_and_the_run_goes_on_without_it() {
    let w = Worker::start();
    let dead = format!("127.0.0.1:{}", closed_port());
    let mut cmd = dtf_command(&fixture());
    cmd.env("DTF_WORKERS", format!("{},{dead}", w.addr))
        .env("DTF_TOKEN", TOKEN);
    sleepers(&mut cmd, 0, None);
    let run = run_bounded(&mut cmd, MINUTE);
    assert_eq!(run.code, Some(0), "{}", run.dump());
    assert!(
        run.stderr
            .contains(&format!("worker {dead} is unreachable")),
        "{}",
        run.dump()
    );
    assert!(
        run.stdout.contains(&format!("left out: {dead}")),
        "{}",
        run.dump()
    );
    assert!(run.stdout.contains("1 worker;"), "{}", run.dump());
    assert_all_sleepers_passed_once(&run.stdout);
}

#[test]
fn with_no_reachable_worker_the_run_goes_local_unless_workers_are_required() {
    let dead = format!("127.0.0.1:{}", closed_port());
    let unknown = "no-such-host.invalid:7878";
    let mut cmd = dtf_command(&fixture());
    cmd.env("DTF_WORKERS", format!("{dead},{unknown}"))
        .env("DTF_WORKER_WAIT", "0");
    sleepers(&mut cmd, 0, None);
    let run = run_bounded(&mut cmd, MINUTE);
    assert_eq!(run.code, Some(0), "{}", run.dump());
    for name in [dead.as_str(), unknown] {
        assert!(
            run.stderr
                .contains(&format!("worker {name} is unreachable")),
            "{}",
            run.dump()
        );
    }
    assert!(
        run.stderr.contains("no worker is reachable")
            && run.stderr.contains("running the tests locally"),
        "{}",
        run.dump()
    );
    assert_all_sleepers_passed_once(&run.stdout);

    let run = run_bounded(cmd.env("DTF_REQUIRE_WORKERS", "1"), MINUTE);
    assert_eq!(run.code, Some(101), "{}", run.dump());
    assert!(
        run.stderr.contains("DTF_REQUIRE_WORKERS=1") && run.stderr.contains(&dead),
        "{}",
        run.dump()
    );
    assert!(
        !run.stdout.contains("test dist_sleep_1 ... ok"),
        "{}",
        run.dump()
    );
}

#[test]
fn an_unparsable_worker_address_is_named() {
    let mut cmd = dtf_command(&fixture());
    cmd.env("DTF_WORKERS", "127.0.0.1:7878,nonsense")
        .arg("dist_sleep");
    let run = run_bounded(&mut cmd, MINUTE);
    assert_eq!(run.code, Some(101), "{}", run.dump());
    assert!(run.stderr.contains("`nonsense`"), "{}", run.dump());
    assert!(run.stderr.contains("host:port"), "{}", run.dump());

    let run = run_bounded(
        dtf_command(&fixture()).args(["--workers", "local:zero", "dist_sleep"]),
        MINUTE,
    );
    assert_eq!(run.code, Some(101), "{}", run.dump());
    assert!(run.stderr.contains("--workers"), "{}", run.dump());
}

#[test]
fn a_worker_killed_mid_run_has_its_tests_rerun_on_the_others() {
    let mut a = Worker::start();
    let b = Worker::start();
    let out = tempfile::tempdir().expect("dir");
    let mut cmd = workers_command(&fixture(), &[&a, &b]);
    sleepers(&mut cmd, 1500, Some(out.path()));
    let mut run = Background::start(&mut cmd);
    assert!(
        eventually(MINUTE, || !a.test_dirs().is_empty()),
        "a test starts on {}",
        a.addr
    );
    a.kill();
    let code = run.wait(MINUTE);
    let (stdout, stderr) = run.output();
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(
        stderr.contains(&format!("lost worker {}", a.addr)),
        "{stderr}"
    );
    assert!(
        stdout.contains("ok (rerun after a lost worker)"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("dtf: lost worker {}", a.addr)),
        "{stdout}"
    );
    assert_all_sleepers_passed_once(&stdout);
}

#[test]
fn a_hung_worker_is_detected_within_seconds() {
    let a = Worker::start();
    let b = Worker::start();
    let out = tempfile::tempdir().expect("dir");
    let mut cmd = workers_command(&fixture(), &[&a, &b]);
    sleepers(&mut cmd, 1500, Some(out.path()));
    let mut run = Background::start(&mut cmd);
    assert!(eventually(MINUTE, || !a.test_dirs().is_empty()));
    a.signal(Signal::SIGSTOP);
    let stopped = Instant::now();
    assert!(
        eventually(Duration::from_secs(15), || run
            .output()
            .1
            .contains("lost worker")),
        "{:?}",
        run.output()
    );
    let detected = stopped.elapsed();
    let code = run.wait(MINUTE);
    let (stdout, stderr) = run.output();
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(
        stderr.contains(&format!("lost worker {}", a.addr)),
        "{stderr}"
    );
    assert!(stderr.contains("heartbeats"), "{stderr}");
    assert!(
        detected < Duration::from_secs(8),
        "detected after {detected:?}"
    );
    assert_all_sleepers_passed_once(&stdout);
    eprintln!("a stopped worker was declared lost after {detected:?}");
}

#[test]
fn a_test_that_keeps_losing_its_worker_fails_with_that_reason() {
    let mut workers = [Worker::start(), Worker::start(), Worker::start()];
    let refs: Vec<&Worker> = workers.iter().collect();
    let run = run_bounded(
        workers_command(&fixture(), &refs)
            .args(["--exact", "dist_kill_worker"])
            .env("DTF_PASS_ENV", PASS)
            .env("FIXTURE_KILL_WORKER", "1"),
        MINUTE,
    );
    assert_eq!(run.code, Some(101), "{}", run.dump());
    assert_eq!(
        run.result_of("dist_kill_worker"),
        Some("FAILED (rerun after a lost worker)"),
        "{}",
        run.dump()
    );
    let section = run.section_of("dist_kill_worker").unwrap_or_default();
    assert!(
        section.contains("the worker running it was lost 3 times"),
        "{}",
        run.dump()
    );
    for w in &mut workers {
        assert!(
            eventually(Duration::from_secs(5), || !w.alive()),
            "{} was killed",
            w.addr
        );
    }
}

#[test]
fn when_every_worker_is_lost_the_rest_runs_locally() {
    let mut w = Worker::start_with(WorkerConfig {
        slots: 1,
        ..WorkerConfig::default()
    });
    let out = tempfile::tempdir().expect("dir");
    let mut cmd = w.command(&fixture());
    sleepers(&mut cmd, 700, Some(out.path()));
    cmd.env("DTF_WORKER_WAIT", "1");
    let mut run = Background::start(&mut cmd);
    assert!(eventually(MINUTE, || !w.test_dirs().is_empty()));
    w.kill();
    let code = run.wait(MINUTE);
    let (stdout, stderr) = run.output();
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("waiting up to 1s (DTF_WORKER_WAIT)")
            && stderr.contains("every worker is lost and none came back within 1s (DTF_WORKER_WAIT); running the remaining tests locally"),
        "{stderr}"
    );
    assert!(
        stdout.contains("ran locally after every worker was lost"),
        "{stdout}"
    );
    assert_all_sleepers_passed_once(&stdout);
}

#[test]
fn a_killed_coordinator_leaves_no_test_process_or_directory_on_the_worker() {
    let mut w = Worker::start();
    let out = tempfile::tempdir().expect("dir");
    let mut cmd = w.command(&fixture());
    sleepers(&mut cmd, 30_000, Some(out.path()));
    let run = Background::start(&mut cmd);
    // Both slots busy: two tests, each with a `sleep` grandchild.
    assert!(eventually(MINUTE, || recorded_pids(out.path()).len() >= 4));
    let pids = recorded_pids(out.path());
    assert!(
        pids.iter().any(|&p| descends_from(p, w.pid())),
        "the tests run below the worker"
    );
    assert!(!w.test_dirs().is_empty());
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(run.pid()), Signal::SIGKILL).expect("kill");
    let killed = Instant::now();
    assert!(
        eventually(Duration::from_secs(5), || pids
            .iter()
            .all(|&p| !process_alive(p))),
        "test processes {pids:?} survive; worker log:\n{}",
        w.log()
    );
    assert!(
        eventually(Duration::from_secs(5), || w.test_dirs().is_empty()),
        "{:?}",
        w.test_dirs()
    );
    eprintln!(
        "the worker cleaned up {:?} after the coordinator died",
        killed.elapsed()
    );
    assert!(w.alive());
    // Logged once the connection's handlers are gone and its input tree removed.
    assert!(
        eventually(Duration::from_secs(5), || w.log().contains("cancelled")),
        "{}",
        w.log()
    );

    // The next coordinator is served normally.
    let mut cmd = w.command(&fixture());
    sleepers(&mut cmd, 0, None);
    let next = run_bounded(&mut cmd, MINUTE);
    assert_eq!(next.code, Some(0), "{}", next.dump());
    assert_all_sleepers_passed_once(&next.stdout);
}

#[test]
fn two_coordinators_share_one_worker() {
    let w = Worker::start();
    let start = || {
        let mut cmd = w.command(&fixture());
        sleepers(&mut cmd, 400, None);
        Background::start(&mut cmd)
    };
    let mut first = start();
    let mut second = start();
    // Both runs hold slots at the same time.
    let mut shared = false;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !shared && Instant::now() < deadline {
        let status = w.status();
        let runs: std::collections::HashSet<String> = status["running"]
            .as_array()
            .map(|r| {
                r.iter()
                    .filter_map(|t| t["run"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        shared = runs.len() == 2;
    }
    for run in [&mut first, &mut second] {
        let code = run.wait(MINUTE);
        let (stdout, stderr) = run.output();
        assert_eq!(code, Some(0), "{stdout}\n{stderr}");
        assert_all_sleepers_passed_once(&stdout);
    }
    assert!(shared, "both runs had a test running at once");
}

#[test]
fn a_wrong_token_is_refused_and_the_worker_keeps_serving() {
    let w = Worker::start();
    let fixture = fixture();
    let wrong = run_bounded(
        dtf_command(&fixture)
            .env("DTF_WORKERS", &w.addr)
            .env("DTF_TOKEN", "not-the-token-but-long-enough-to-be-accepted")
            .env("DTF_REQUIRE_WORKERS", "1")
            .args(["--exact", "dist_sleep_1"]),
        MINUTE,
    );
    assert_eq!(wrong.code, Some(101), "{}", wrong.dump());
    assert!(
        wrong.stderr.contains(&w.addr) && wrong.stderr.contains("authentication failed"),
        "{}",
        wrong.dump()
    );
    let none = run_bounded(
        dtf_command(&fixture)
            .env("DTF_WORKERS", &w.addr)
            .env("DTF_REQUIRE_WORKERS", "1")
            .args(["--exact", "dist_sleep_1"]),
        MINUTE,
    );
    assert_eq!(none.code, Some(101), "{}", none.dump());
    assert!(none.stderr.contains("requires a token"), "{}", none.dump());
    assert!(
        eventually(Duration::from_secs(5), || w
            .log()
            .contains("refused a connection")),
        "{}",
        w.log()
    );

    let token_file = tempfile::NamedTempFile::new().expect("file");
    std::fs::write(token_file.path(), format!("{TOKEN}\n")).expect("write");
    let right = run_bounded(
        dtf_command(&fixture)
            .env("DTF_WORKERS", &w.addr)
            .env("DTF_TOKEN_FILE", token_file.path())
            .env("DTF_REQUIRE_WORKERS", "1")
            .args(["--exact", "dist_sleep_1"]),
        MINUTE,
    );
    assert_eq!(right.code, Some(0), "{}", right.dump());
    assert!(right.stdout.contains("dtf: 1 worker;"), "{}", right.dump());
}

/// Reads until the peer closes; true when it closed within `limit`.
fn closes_within(stream: &mut std::net::TcpStream, limit: Duration) -> bool {
    stream.set_read_timeout(Some(limit)).expect("timeout");
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

/// A connection that completed the real handshake: bytes written go through the encrypted
/// record layer, so they reach the worker's frame decoder as sent.
struct Authenticated {
    rt: tokio::runtime::Runtime,
    stream: protocol::SecureStream<tokio::net::TcpStream>,
}

impl Authenticated {
    fn connect(addr: &str) -> Authenticated {
        let rt = runtime();
        let stream = rt.block_on(async {
            let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
            protocol::client_handshake(stream, Some(&token()))
                .await
                .expect("handshake")
        });
        Authenticated { rt, stream }
    }

    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt;
        self.rt.block_on(async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        })
    }

    /// True when the worker closed the connection within `limit`.
    fn closes_within(&mut self, limit: Duration) -> bool {
        use tokio::io::AsyncReadExt;
        self.rt.block_on(async {
            let mut buf = [0u8; 4096];
            tokio::time::timeout(limit, async {
                loop {
                    match self.stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => continue,
                    }
                }
            })
            .await
            .is_ok()
        })
    }
}

#[test]
fn malformed_and_oversized_frames_end_only_their_connection() {
    let w = Worker::start();
    let fixture = fixture();
    let serves = || {
        let mut cmd = w.command(&fixture);
        sleepers(&mut cmd, 0, None);
        let run = run_bounded(&mut cmd, MINUTE);
        assert_eq!(run.code, Some(0), "{}", run.dump());
        assert!(run.stdout.contains("dtf: 1 worker;"), "{}", run.dump());
    };
    // A connection kept open throughout: garbage elsewhere does not disturb it.
    let mut idle = Authenticated::connect(&w.addr);

    // Before authentication: garbage, and an oversized length prefix.
    for bytes in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &[0x7f, 0xff, 0xff, 0xff, 1, 2, 3][..],
    ] {
        let mut s = std::net::TcpStream::connect(&w.addr).expect("connect");
        let _ = s.write_all(bytes);
        // Enough bytes for the worker to read a whole greeting.
        let _ = s.write_all(&[0u8; 64]);
        assert!(
            closes_within(&mut s, Duration::from_secs(15)),
            "closed after {bytes:?}"
        );
        serves();
    }
    // After authentication: an oversized frame, then a well-sized frame of garbage.
    let mut s = Authenticated::connect(&w.addr);
    s.write_all(&[0x7f, 0xff, 0xff, 0xff]).expect("write");
    s.write_all(&[0u8; 1024]).expect("write");
    assert!(s.closes_within(Duration::from_secs(5)), "{}", w.log());
    serves();
    let mut s = Authenticated::connect(&w.addr);
    s.write_all(&[0, 0, 0, 8, 0xde, 0xad, 0xbe, 0xef, 0xff, 0xff, 0xff, 0xff])
        .expect("write");
    assert!(s.closes_within(Duration::from_secs(5)), "{}", w.log());
    serves();
    // Raw bytes that are not an encrypted record, after a real handshake.
    let raw = Authenticated::connect(&w.addr);
    let mut tcp = {
        use std::os::fd::AsFd;
        let fd = raw
            .stream
            .get_ref()
            .as_fd()
            .try_clone_to_owned()
            .expect("dup");
        std::net::TcpStream::from(fd)
    };
    tcp.set_nonblocking(false).expect("blocking");
    tcp.write_all(&[
        0, 20, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20,
    ])
    .expect("write");
    assert!(
        closes_within(&mut tcp, Duration::from_secs(5)),
        "{}",
        w.log()
    );
    serves();

    let log = w.log();
    assert!(log.contains("refused a connection"), "{log}");
    assert!(log.matches("connection error").count() >= 3, "{log}");
    assert!(log.contains("does not authenticate"), "{log}");
    // The idle connection is still open.
    assert!(!idle.closes_within(Duration::from_millis(200)), "{log}");
}

/// Uploads `binary` in chunks; its digest.
async fn upload_all(client: &protocol::WorkerClient, binary: &[u8]) -> Digest {
    let digest = Digest::of(binary);
    let mut offset = 0;
    for piece in binary.chunks(protocol::CHUNK_SIZE) {
        client
            .upload(
                protocol::context_within(Duration::from_secs(30)),
                Chunk {
                    digest,
                    total: binary.len() as u64,
                    offset,
                    data: piece.to_vec(),
                },
            )
            .await
            .expect("an answer")
            .expect("accepted");
        offset += piece.len() as u64;
    }
    digest
}

#[test]
fn a_digest_mismatch_is_rejected_and_an_unknown_test_is_a_clear_error() {
    let w = Worker::start();
    let binary = std::fs::read(fixture()).expect("fixture");
    runtime().block_on(async {
        let ctx = || protocol::context_within(Duration::from_secs(30));
        let conn = connect(&w).await;
        let client = conn.client;

        // Bytes that do not hash to the announced digest: rejected, nothing cached.
        let claimed = Digest::of(b"other bytes");
        let refused = client
            .upload(
                ctx(),
                Chunk {
                    digest: claimed,
                    total: 3,
                    offset: 0,
                    data: b"abc".to_vec(),
                },
            )
            .await
            .expect("an answer");
        let err = refused.expect_err("a mismatch");
        assert!(err.to_string().contains("digest mismatch"), "{err}");
        let status = client.status(ctx()).await.expect("status");
        assert_eq!(status.cache_entries, 0);
        for sub in ["bin", "incoming"] {
            let n = std::fs::read_dir(w.cache_dir().join(sub))
                .map(|d| d.count())
                .unwrap_or(0);
            assert_eq!(n, 0, "nothing left in {sub}");
        }

        // A binary never uploaded: an infrastructure failure naming it.
        let spec = |test: &str| dtf::sandbox::RunSpec {
            test: test.to_owned(),
            isolation: dtf::Isolation::Env,
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            timeout: Some(Duration::from_secs(20)),
            memory: None,
            capture: true,
            cwd: None,
            leak_fails: false,
            spawn: Default::default(),
            harness: Default::default(),
        };
        let digest = Digest::of(&binary);
        let response = run_on(&client, digest, spec("pass_plain")).await;
        let failure = response.failure.expect("a failure");
        assert!(failure.is_system(), "{failure}");
        assert!(failure.to_string().contains("not in worker"), "{failure}");

        // Upload the real binary in chunks, then ask for a test it does not have.
        assert_eq!(
            client.missing(ctx(), vec![digest]).await.expect("missing"),
            vec![digest]
        );
        upload_all(&client, &binary).await;
        let response = run_on(&client, digest, spec("no_such_test")).await;
        let failure = response.failure.expect("a failure");
        assert!(failure.is_system(), "{failure}");
        assert!(
            failure.to_string().contains("no test named `no_such_test`"),
            "{failure}"
        );
        let response = run_on(&client, digest, spec("pass_plain")).await;
        assert_eq!(response.failure, None);
        assert!(!response.worker.is_empty());
    });
}

#[test]
fn protocol_versions_that_differ_are_named_on_both_sides() {
    // A coordinator meeting a worker of another version.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let fake = listener.local_addr().expect("addr").to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten().take(1) {
            let mut stream = stream;
            let mut hello = [0u8; 44];
            let _ = stream.read_exact(&mut hello);
            let mut reply = MAGIC.to_vec();
            reply.extend_from_slice(&999u32.to_be_bytes());
            reply.extend_from_slice(&[0u8; 65]);
            let _ = stream.write_all(&reply);
        }
    });
    let run = run_bounded(
        dtf_command(&fixture())
            .env("DTF_WORKERS", &fake)
            .env("DTF_REQUIRE_WORKERS", "1")
            .args(["--exact", "dist_sleep_1"]),
        MINUTE,
    );
    assert_eq!(run.code, Some(101), "{}", run.dump());
    assert!(
        run.stderr.contains(&fake)
            && run
                .stderr
                .contains("worker speaks dtf protocol version 999")
            && run.stderr.contains(&format!("version {PROTOCOL_VERSION}")),
        "{}",
        run.dump()
    );

    // A worker meeting a coordinator of another version.
    let w = Worker::start();
    let mut s = std::net::TcpStream::connect(&w.addr).expect("connect");
    let mut hello = MAGIC.to_vec();
    hello.extend_from_slice(&999u32.to_be_bytes());
    s.write_all(&hello).expect("write");
    let mut head = [0u8; 12];
    s.read_exact(&mut head)
        .expect("the worker answers with its version");
    assert_eq!(head[..8], MAGIC);
    assert_eq!(
        u32::from_be_bytes([head[8], head[9], head[10], head[11]]),
        PROTOCOL_VERSION
    );
    assert!(closes_within(&mut s, Duration::from_secs(5)));
    assert!(
        eventually(Duration::from_secs(5), || w
            .log()
            .contains("coordinator speaks dtf protocol version 999")),
        "{}",
        w.log()
    );
    let mut cmd = w.command(&fixture());
    sleepers(&mut cmd, 0, None);
    let run = run_bounded(&mut cmd, MINUTE);
    assert_eq!(run.code, Some(0), "{}", run.dump());
}

#[test]
fn a_worker_without_a_token_serves_loopback_only() {
    let w = Worker::start_with(WorkerConfig {
        token: None,
        ..WorkerConfig::default()
    });
    let mut cmd = w.command(&fixture());
    sleepers(&mut cmd, 0, None);
    let run = run_bounded(&mut cmd, MINUTE);
    assert_eq!(run.code, Some(0), "{}", run.dump());
    assert!(run.stdout.contains("dtf: 1 worker;"), "{}", run.dump());

    // A non-loopback address (TEST-NET-1, never bound here) is refused before binding.
    let refused = run_bounded(
        std::process::Command::new(worker_binary())
            .args(["--listen", "192.0.2.1:7878", "--cache-dir"])
            .arg(w.cache_dir())
            .env_remove("DTF_TOKEN")
            .env_remove("DTF_TOKEN_FILE"),
        MINUTE,
    );
    assert_eq!(refused.code, Some(2), "{}", refused.dump());
    assert!(
        refused.stderr.contains("without a token"),
        "{}",
        refused.dump()
    );
}

#[test]
fn local_workers_run_the_suite_and_die_with_their_coordinator() {
    let fixture = fixture();
    let mut cmd = dtf_command(&fixture);
    cmd.env("DTF_WORKERS", "local:2")
        .env("DTF_WORKER_BIN", worker_binary());
    sleepers(&mut cmd, 0, None);
    let run = run_bounded(&mut cmd, MINUTE);
    assert_eq!(run.code, Some(0), "{}", run.dump());
    assert!(run.stdout.contains("dtf: 2 workers;"), "{}", run.dump());
    assert!(
        run.stdout.contains("local-1 ran") && run.stdout.contains("local-2 ran"),
        "{}",
        run.dump()
    );
    assert_all_sleepers_passed_once(&run.stdout);

    // The local workers' caches outlive the run: the next run ships nothing.
    let mut cmd = dtf_command(&fixture);
    cmd.env("DTF_WORKERS", "local:2")
        .env("DTF_WORKER_BIN", worker_binary());
    sleepers(&mut cmd, 0, None);
    let again = run_bounded(&mut cmd, MINUTE);
    assert_eq!(again.code, Some(0), "{}", again.dump());
    assert!(
        again.stdout.contains("binary shipped to 0 of 2 (0 bytes)"),
        "{}",
        again.dump()
    );

    // SIGKILL the coordinator: its local workers notice their stdin close and exit, killing
    // their tests.
    let out = tempfile::tempdir().expect("dir");
    let mut cmd = dtf_command(&fixture);
    cmd.env("DTF_WORKERS", "local:2")
        .env("DTF_WORKER_BIN", worker_binary());
    sleepers(&mut cmd, 30_000, Some(out.path()));
    let coordinator = Background::start(&mut cmd);
    assert!(eventually(MINUTE, || recorded_pids(out.path()).len() >= 2));
    let workers: Vec<i32> = processes_with("--exit-on-stdin-eof")
        .into_iter()
        .filter(|&p| parent_of(p) == Some(coordinator.pid()))
        .collect();
    assert_eq!(workers.len(), 2, "{workers:?}");
    let tests = recorded_pids(out.path());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(coordinator.pid()),
        Signal::SIGKILL,
    )
    .expect("kill");
    assert!(
        eventually(Duration::from_secs(10), || workers
            .iter()
            .chain(&tests)
            .all(|&p| !process_alive(p))),
        "workers {workers:?} or tests {tests:?} survive"
    );
}

#[test]
fn local_workers_need_the_worker_binary() {
    let run = run_bounded(
        dtf_command(&fixture())
            .env("DTF_WORKERS", "local:1")
            .env("DTF_WORKER_BIN", "/nonexistent/dtf-worker")
            .arg("dist_sleep"),
        MINUTE,
    );
    assert_eq!(run.code, Some(101), "{}", run.dump());
    assert!(
        run.stderr
            .contains("DTF_WORKER_BIN=/nonexistent/dtf-worker"),
        "{}",
        run.dump()
    );
    assert!(!run.stdout.contains("running"), "{}", run.dump());

    // Found nowhere (a test binary outside any target directory, no dtf-worker on PATH): the
    // message says how a user gets one, before the run starts.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("fixture");
    std::fs::copy(fixture(), &copy).unwrap();
    let run = run_bounded(
        dtf_command(&copy)
            .env("DTF_WORKERS", "local:1")
            .env("PATH", "/usr/bin:/bin")
            .arg("dist_sleep"),
        MINUTE,
    );
    assert_eq!(run.code, Some(101), "{}", run.dump());
    assert!(
        run.stderr.contains("cargo install dtf-worker")
            && run
                .stderr
                .contains("DTF_WORKER_BIN to the path of a built one")
            && !run.stderr.contains("cargo build -p"),
        "{}",
        run.dump()
    );
    assert!(!run.stdout.contains("running"), "{}", run.dump());
}

#[test]
fn a_worker_that_cannot_take_the_binary_is_left_out() {
    let small = Worker::start_with(WorkerConfig {
        cache_max: Some("1MiB".to_owned()),
        ..WorkerConfig::default()
    });
    let mut cmd = small.command(&fixture());
    sleepers(&mut cmd, 0, None);
    let run = run_bounded(&mut cmd, MINUTE);
    assert_eq!(run.code, Some(0), "{}", run.dump());
    assert!(
        run.stderr
            .contains(&format!("cannot use worker {}", small.addr))
            && run.stderr.contains("larger than the worker's cache cap"),
        "{}",
        run.dump()
    );
    assert!(
        run.stderr.contains("running the tests locally"),
        "{}",
        run.dump()
    );
    assert_all_sleepers_passed_once(&run.stdout);
}

#[test]
fn a_cancelled_request_kills_its_test_and_the_connection_goes_on() {
    let w = Worker::start();
    let binary = std::fs::read(fixture()).expect("fixture");
    let out = tempfile::tempdir().expect("dir");
    runtime().block_on(async {
        let ctx = || protocol::context_within(Duration::from_secs(60));
        let conn = connect(&w).await;
        let client = conn.client;
        let digest = upload_all(&client, &binary).await;
        let spec = dtf_e2e::sleeper_spec(
            "/usr/bin:/bin",
            &[
                ("FIXTURE_SLEEP_MS", "30000".to_owned()),
                ("FIXTURE_OUT_DIR", out.path().display().to_string()),
            ],
        );
        let started = async {
            while recorded_pids(out.path()).len() < 2 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::select! {
            response = client.run(ctx(), RunRequest { digest, inputs: None, spec }) => {
                panic!("the test ended early: {response:?}")
            }
            _ = tokio::time::timeout(MINUTE, started) => {}
        }
        // Leaving the select dropped the request: the client sent a cancel.
        let pids = recorded_pids(out.path());
        assert_eq!(pids.len(), 2, "the test and its grandchild");
        let gone = async {
            while pids.iter().any(|&p| process_alive(p)) || !w.test_dirs().is_empty() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        if tokio::time::timeout(Duration::from_secs(5), gone)
            .await
            .is_err()
        {
            panic!("test {pids:?} or its directory survives: {}", w.log());
        }
        // The connection still serves.
        client.ping(ctx()).await.expect("ping");
        let status = client.status(ctx()).await.expect("status");
        assert!(status.running.is_empty(), "{status:?}");
        assert_eq!(status.connections, 1);
    });
}
