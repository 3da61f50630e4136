//! Operating a fleet: workers restarted, drained and discovered during a run; coordinators
//! of the previous protocol version; runs that must not fall back to running locally.

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use dtf::protocol::{self, Chunk, Digest, RunRequest, Token, v3};
use dtf_e2e::*;
use nix::sys::signal::Signal;

const MINUTE: Duration = Duration::from_secs(60);

/// Environment the fixture's sleepers need on a worker.
const PASS: &str = "FIXTURE_SLEEP_MS,FIXTURE_OUT_DIR";

/// Runs the fixture's six `dist_sleep_*` tests, each sleeping `ms`, recording pids in `out`.
fn sleepers(cmd: &mut std::process::Command, ms: u64, out: &Path) {
    cmd.arg("dist_sleep")
        .env("DTF_PASS_ENV", PASS)
        .env("FIXTURE_SLEEP_MS", ms.to_string())
        .env("FIXTURE_OUT_DIR", out);
}

/// Each sleeper is reported once, `ok` (not rerun).
fn assert_sleepers_ok_once(stdout: &str) {
    let results = results(stdout);
    for i in 1..=6 {
        let name = format!("dist_sleep_{i}");
        let lines = stdout
            .lines()
            .filter(|l| l.starts_with(&format!("test {name} ... ")))
            .count();
        assert_eq!(lines, 1, "{name} reported once:\n{stdout}");
        assert_eq!(
            results.get(&name).map(String::as_str),
            Some("ok"),
            "{stdout}"
        );
    }
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

#[test]
fn a_worker_restarted_mid_run_runs_tests_again_in_that_run() {
    let mut w = Worker::start_with(WorkerConfig {
        slots: 1,
        ..WorkerConfig::default()
    });
    let out = tempfile::tempdir().expect("dir");
    let mut cmd = w.command(&fixture());
    sleepers(&mut cmd, 600, out.path());
    // Never locally: every test must run on the worker, before or after its restart.
    cmd.env("DTF_REQUIRE_WORKERS", "1");
    let mut run = Background::start(&mut cmd);
    assert!(
        eventually(MINUTE, || !w.test_dirs().is_empty()),
        "no test started"
    );
    let killed_at = Instant::now();
    w.restart_in_place();
    let code = run.wait(MINUTE);
    let (stdout, stderr) = run.output();
    assert_eq!(code, Some(0), "{}\n{}", tail(&stdout), tail(&stderr));
    assert!(
        stderr.contains(&format!("lost worker {}", w.addr))
            && stderr.contains(&format!("worker {} is back; using it again", w.addr)),
        "{stderr}"
    );
    assert!(!stdout.contains("ran locally"), "{stdout}");
    for i in 1..=6 {
        let name = format!("dist_sleep_{i}");
        let result = results(&stdout).get(&name).cloned();
        assert!(
            matches!(
                result.as_deref(),
                Some("ok" | "ok (rerun after a lost worker)")
            ),
            "{name}: {result:?}\n{stdout}"
        );
    }
    // The restarted process ran the rest of the run: at least the test that was running at
    // the kill, and everything that had not started.
    let ran_after = w.status()["tests_run"].as_u64().unwrap_or(0);
    assert!(
        ran_after >= 2,
        "the restarted worker ran {ran_after}\n{stderr}"
    );
    assert!(stdout.contains("(connected 2 times)"), "{}", tail(&stdout));
    eprintln!(
        "restarted worker used again; run ended {:?} after the kill",
        killed_at.elapsed()
    );
}

/// The status code of `GET path` on a worker's HTTP endpoint; `None` when it does not answer.
fn http_code(addr: &str, path: &str) -> Option<u16> {
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: worker\r\n\r\n").as_bytes())
        .ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).ok()?;
    String::from_utf8_lossy(&response)
        .split(' ')
        .nth(1)?
        .parse()
        .ok()
}

#[test]
fn sigterm_drains_a_worker_its_running_tests_finish_there_and_it_exits_0() {
    let mut a = Worker::start_with(WorkerConfig {
        slots: 2,
        args: vec!["--http".into(), "127.0.0.1:0".into()],
        ..WorkerConfig::default()
    });
    let http = a.http.clone().expect("an HTTP address");
    assert_eq!(
        http_code(&http, "/readyz"),
        Some(200),
        "ready before the drain"
    );
    let b = Worker::start_with(WorkerConfig {
        slots: 2,
        ..WorkerConfig::default()
    });
    let out = tempfile::tempdir().expect("dir");
    let mut cmd = workers_command(&fixture(), &[&a, &b]);
    sleepers(&mut cmd, 1500, out.path());
    cmd.env("DTF_REQUIRE_WORKERS", "1");
    let mut run = Background::start(&mut cmd);
    // Wait until tests run on `a`, then ask it to drain.
    let mut running: Vec<String> = Vec::new();
    let started = Instant::now();
    while running.is_empty() && started.elapsed() < MINUTE {
        let status = a.status();
        running = status["running"]
            .as_array()
            .map(|r| {
                r.iter()
                    .filter_map(|t| t["test"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!running.is_empty(), "no test ran on the worker");
    a.signal(Signal::SIGTERM);
    // While its tests finish, the draining worker is alive but not ready.
    let asked = Instant::now();
    let mut readiness = None;
    while asked.elapsed() < Duration::from_secs(5) {
        readiness = http_code(&http, "/readyz");
        if readiness != Some(200) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(readiness, Some(503), "not ready while draining");
    let health = http_code(&http, "/healthz");
    assert!(
        !a.log().contains("drained: no test is running"),
        "the probes came after the drain ended: lengthen the tests\n{}",
        a.log()
    );
    assert_eq!(health, Some(200), "alive while draining");
    let exit = a.wait_exit(MINUTE);
    let log = a.log();
    assert_eq!(exit, Some(0), "the drained worker exits 0\n{log}");
    assert!(
        log.contains("SIGTERM: draining") && log.contains("drained: no test is running"),
        "{log}"
    );
    // What ran there at the signal finished there, and passed.
    for test in &running {
        assert!(
            log.lines()
                .any(|l| l.contains("passed") && l.contains(&format!("test={test} "))),
            "{test} did not finish on the draining worker\n{log}"
        );
    }
    let code = run.wait(MINUTE);
    let (stdout, stderr) = run.output();
    assert_eq!(code, Some(0), "{}\n{}", tail(&stdout), tail(&stderr));
    // Nothing was rerun: the running tests finished, the queued ones came back unstarted.
    assert_sleepers_ok_once(&stdout);
    assert!(
        stderr.contains(&format!("worker {} is draining", a.addr)),
        "{stderr}"
    );
    assert!(!stderr.contains("lost worker"), "{stderr}");
    assert!(!stdout.contains("ran locally"), "{stdout}");
}

#[test]
fn dtf_worker_drain_is_authenticated_and_drains_like_sigterm() {
    let mut w = Worker::start();
    let addr = w.addr.clone();
    let drain = |token: &str| {
        let mut cmd = std::process::Command::new(worker_binary());
        cmd.args(["drain", &addr])
            .env("DTF_TOKEN", token)
            .env_remove("DTF_TOKEN_FILE");
        run_bounded(&mut cmd, Duration::from_secs(20))
    };
    let refused = drain("another-token-0123456789abcdef0123456789abcdef");
    assert_ne!(refused.code, Some(0), "{}", refused.dump());
    assert!(
        refused.stderr.contains("rejected the token"),
        "{}",
        refused.dump()
    );
    assert!(w.alive(), "a wrong token drains nothing");
    let done = drain(TOKEN);
    assert_eq!(done.code, Some(0), "{}", done.dump());
    assert!(
        done.stdout.contains("draining; 0 tests running"),
        "{}",
        done.dump()
    );
    assert_eq!(w.wait_exit(Duration::from_secs(20)), Some(0), "{}", w.log());
}

#[test]
fn with_every_worker_killed_and_workers_required_no_test_runs_locally() {
    let mut a = Worker::start_with(WorkerConfig {
        slots: 1,
        ..WorkerConfig::default()
    });
    let mut b = Worker::start_with(WorkerConfig {
        slots: 1,
        ..WorkerConfig::default()
    });
    let out = tempfile::tempdir().expect("dir");
    let junit = out.path().join("junit.xml");
    let mut cmd = workers_command(&fixture(), &[&a, &b]);
    sleepers(&mut cmd, 700, out.path());
    cmd.arg("--junit")
        .arg(&junit)
        .env("DTF_REQUIRE_WORKERS", "1")
        .env("DTF_WORKER_WAIT", "1");
    let mut run = Background::start(&mut cmd);
    // Kill both workers (SIGKILL) once some test has finished and others have not.
    assert!(
        eventually(MINUTE, || run.output().0.contains("... ok")),
        "no test finished"
    );
    a.kill();
    b.kill();
    // Every test that ever starts records its pid: after the kill, none may start here.
    let before = recorded_pids(out.path());
    let code = run.wait(MINUTE);
    let (stdout, stderr) = run.output();
    assert_eq!(code, Some(101), "{}\n{}", tail(&stdout), tail(&stderr));
    assert!(
        stderr.contains("none came back within 1s (DTF_WORKER_WAIT)")
            && stderr.contains("DTF_REQUIRE_WORKERS=1 forbids running the tests locally"),
        "{stderr}"
    );
    assert_eq!(
        recorded_pids(out.path()),
        before,
        "a test started after every worker was gone\n{stdout}\n{stderr}"
    );
    assert!(!stdout.contains("ran locally"), "{stdout}");
    // It ends like any failed run: the results so far, the rest not run, the summary, JUnit.
    let finished: Vec<String> = results(&stdout)
        .into_iter()
        .filter(|(_, r)| r == "ok")
        .map(|(name, _)| name)
        .collect();
    assert!(!finished.is_empty() && finished.len() < 6, "{stdout}");
    let not_run = 6 - finished.len();
    assert!(
        stdout.contains("test result: FAILED.") && stdout.contains(&format!("; {not_run} not run")),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "dtf: {not_run} test{} not run (every worker was lost): dist_sleep_",
            if not_run == 1 { "" } else { "s" }
        )),
        "{stdout}"
    );
    let xml = std::fs::read_to_string(&junit).expect("the JUnit file is written");
    let doc = junit_cases(&xml);
    assert_eq!(doc.len(), 6, "{xml}");
    for (name, skipped) in &doc {
        assert_eq!(
            *skipped,
            !finished.contains(name),
            "{name}: skipped only when it did not finish\n{xml}"
        );
    }
}

/// `(name, skipped)` of every `<testcase>` of a JUnit document, with quick-xml.
fn junit_cases(xml: &str) -> Vec<(String, bool)> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut cases = Vec::new();
    let mut current: Option<String> = None;
    for _ in 0..1_000_000 {
        match reader.read_event().expect("well-formed XML") {
            Event::Start(e) | Event::Empty(e) if e.name().as_ref() == b"testcase" => {
                let name = e
                    .attributes()
                    .flatten()
                    .find(|a| a.key.as_ref() == b"name")
                    .map(|a| String::from_utf8_lossy(&a.value).into_owned())
                    .expect("a testcase has a name");
                cases.push((name.clone(), false));
                current = Some(name);
            }
            Event::Start(e) | Event::Empty(e) if e.name().as_ref() == b"skipped" => {
                assert!(current.is_some(), "<skipped> outside a testcase");
                if let Some(last) = cases.last_mut() {
                    last.1 = true;
                }
            }
            Event::End(e) if e.name().as_ref() == b"testcase" => current = None,
            Event::Eof => return cases,
            _ => {}
        }
    }
    panic!("the JUnit document does not end")
}

/// Runs `cmd` with `hosts` bind-mounted over `/etc/hosts`, in a mount namespace of its own.
fn with_hosts(cmd: &std::process::Command, hosts: &Path) -> std::process::Command {
    let mut wrapped = std::process::Command::new(tool("unshare"));
    if !nix::unistd::geteuid().is_root() {
        wrapped.args(["--user", "--map-root-user"]);
    }
    wrapped
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg("mount --bind \"$0\" /etc/hosts && exec \"$@\"")
        .arg(hosts)
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => wrapped.env(k, v),
            None => wrapped.env_remove(k),
        };
    }
    wrapped
}

#[test]
fn a_dns_name_with_several_addresses_uses_the_worker_at_each() {
    let port = closed_port();
    let workers: Vec<Worker> = ["127.0.0.2", "127.0.0.3"]
        .iter()
        .map(|ip| {
            Worker::start_with(WorkerConfig {
                listen: format!("{ip}:{port}"),
                ..WorkerConfig::default()
            })
        })
        .collect();
    let dir = tempfile::tempdir().expect("dir");
    let hosts = dir.path().join("hosts");
    std::fs::write(
        &hosts,
        "127.0.0.1 localhost\n127.0.0.2 workers.dtf-fleet.test\n127.0.0.3 workers.dtf-fleet.test\n",
    )
    .expect("hosts");
    let out = tempfile::tempdir().expect("dir");
    let mut cmd = dtf_command(&fixture());
    sleepers(&mut cmd, 300, out.path());
    cmd.env("DTF_WORKERS", format!("dns:workers.dtf-fleet.test:{port}"))
        .env("DTF_TOKEN", TOKEN)
        .env("DTF_REQUIRE_WORKERS", "1")
        .env("DTF_WORKER_WAIT", "0");
    let run = run_bounded(&mut with_hosts(&cmd, &hosts), MINUTE);
    assert_eq!(run.code, Some(0), "{}", run.dump());
    assert!(run.stdout.contains("dtf: 2 workers;"), "{}", run.dump());
    assert_sleepers_ok_once(&run.stdout);
    for w in &workers {
        let ran = w.status()["tests_run"].as_u64().unwrap_or(0);
        assert!(ran >= 1, "{} ran {ran}\n{}", w.addr, run.dump());
    }
    // The fleet's status, through the same name.
    let mut status = std::process::Command::new(worker_binary());
    status
        .args(["status", &format!("dns:workers.dtf-fleet.test:{port}")])
        .env("DTF_TOKEN", TOKEN)
        .env_remove("DTF_TOKEN_FILE");
    let table = run_bounded(&mut with_hosts(&status, &hosts), Duration::from_secs(30));
    assert_eq!(table.code, Some(0), "{}", table.dump());
    for w in &workers {
        assert!(
            table
                .stdout
                .lines()
                .any(|l| l.starts_with(&w.addr) && l.contains("ready")),
            "{}",
            table.dump()
        );
    }
    assert!(
        table.stdout.contains("2 of 2 workers answered: 4 slots"),
        "{}",
        table.dump()
    );
}

#[test]
fn a_worker_added_to_a_file_of_addresses_joins_the_run() {
    let a = Worker::start_with(WorkerConfig {
        slots: 1,
        ..WorkerConfig::default()
    });
    let b = Worker::start_with(WorkerConfig {
        slots: 1,
        ..WorkerConfig::default()
    });
    let dir = tempfile::tempdir().expect("dir");
    let list = dir.path().join("workers");
    std::fs::write(&list, format!("# the fleet\n{}\n", a.addr)).expect("list");
    let out = tempfile::tempdir().expect("dir");
    let mut cmd = dtf_command(&fixture());
    sleepers(&mut cmd, 700, out.path());
    cmd.env("DTF_WORKERS", format!("file:{}", list.display()))
        .env("DTF_WORKERS_REFRESH", "200ms")
        .env("DTF_TOKEN", TOKEN)
        .env("DTF_REQUIRE_WORKERS", "1");
    let mut run = Background::start(&mut cmd);
    assert!(eventually(MINUTE, || !recorded_pids(out.path()).is_empty()));
    std::fs::write(&list, format!("{}\n{}\n", a.addr, b.addr)).expect("list");
    let code = run.wait(MINUTE);
    let (stdout, stderr) = run.output();
    assert_eq!(code, Some(0), "{}\n{}", tail(&stdout), tail(&stderr));
    assert!(
        stderr.contains(&format!("worker {} joined the run", b.addr)),
        "{stderr}"
    );
    assert_sleepers_ok_once(&stdout);
    let ran = b.status()["tests_run"].as_u64().unwrap_or(0);
    assert!(ran >= 1, "the added worker ran {ran}\n{stderr}");
}

#[test]
fn a_v3_coordinator_runs_a_test_on_this_worker() {
    let w = Worker::start();
    let binary = std::fs::read(fixture()).expect("fixture");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let ctx = || protocol::context_within(Duration::from_secs(30));
        let token = Token::new(TOKEN, "test").expect("token");
        let (client, info) = v3::connect(
            &w.addr,
            Some(&token),
            v3::Hello {
                run: "a v3 coordinator".into(),
            },
            Duration::from_secs(10),
        )
        .await
        .expect("a v3 coordinator connects");
        assert!(info.slots >= 1);
        let digest = Digest::of(&binary);
        let missing = client.missing(ctx(), vec![digest]).await.expect("missing");
        if missing.contains(&digest) {
            let mut offset = 0;
            for piece in binary.chunks(protocol::CHUNK_SIZE) {
                client
                    .upload(
                        ctx(),
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
        }
        let spec = dtf_e2e::sleeper_spec("/usr/bin:/bin", &[]);
        let response = client
            .run(
                ctx(),
                RunRequest {
                    digest,
                    inputs: None,
                    spec,
                },
            )
            .await
            .expect("the test ran");
        assert!(response.failure.is_none(), "{:?}", response.failure);
        client.ping(ctx()).await.expect("a v3 ping");
        let status = client.status(ctx()).await.expect("status");
        assert_eq!(status.protocol, protocol::PROTOCOL_VERSION);
        assert_eq!(status.tests_run, 1);
    });
    assert!(
        w.log()
            .contains("the coordinator speaks an older protocol version"),
        "{}",
        w.log()
    );
}

/// What a real worker answers a greeting of protocol `version`.
fn answer_to(addr: &str, version: u32) -> Vec<u8> {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut greeting = protocol::MAGIC.to_vec();
    greeting.extend_from_slice(&version.to_be_bytes());
    greeting.extend_from_slice(&[1, 0, 0]);
    stream.write_all(&greeting).expect("write");
    let mut reply = Vec::new();
    let _ = stream.read_to_end(&mut reply);
    reply
}

#[test]
fn versions_older_than_the_previous_one_and_newer_than_this_one_are_refused_by_name() {
    let w = Worker::start();
    let oldest = *protocol::ACCEPTED_VERSIONS.start();
    let newest = *protocol::ACCEPTED_VERSIONS.end();
    assert_eq!((oldest, newest), (3, protocol::PROTOCOL_VERSION));
    let mut expected = protocol::MAGIC.to_vec();
    expected.extend_from_slice(&newest.to_be_bytes());
    expected.push(1); // the VERSION verdict
    expected.extend_from_slice(&oldest.to_be_bytes());
    for version in [2, protocol::PROTOCOL_VERSION + 1] {
        assert_eq!(answer_to(&w.addr, version), expected, "version {version}");
    }
    assert!(
        eventually(Duration::from_secs(10), || w
            .log()
            .contains("the coordinator speaks dtf protocol version 2")),
        "{}",
        w.log()
    );
}
