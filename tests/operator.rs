//! Operating a worker: its HTTP endpoint (`--http`: health, readiness, Prometheus metrics and
//! the status page in a real headless browser), JSON logs (`--log-format json`), and
//! `dtf-worker status` not counting as a run. Real workers on 127.0.0.1, real fixture runs.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use dtf_e2e::*;

const MINUTE: Duration = Duration::from_secs(60);

/// The fixture tests one run sends: three pass, two fail, one times out.
const PASSING: [&str; 3] = ["pass_plain", "pass_prints", "pass_result"];
const FAILING: [&str; 2] = ["fail_assert", "fail_panic"];
const TIMING_OUT: &str = "fail_timeout_with_grandchild";

/// `GET path` on the worker's HTTP endpoint: the status code and the body.
fn get(addr: &str, path: &str) -> (u16, String) {
    request(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: worker\r\n\r\n"),
    )
}

fn request(addr: &str, raw: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream.write_all(raw.as_bytes()).expect("send the request");
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .expect("read the response");
    let response = String::from_utf8(response).expect("UTF-8");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of head in {response:?}"));
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    (code, body.to_owned())
}

/// `/metrics`, parsed by a Prometheus text-format parser.
fn scrape(addr: &str) -> prometheus_parse::Scrape {
    let (code, body) = get(addr, "/metrics");
    assert_eq!(code, 200, "{body}");
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
        .unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// The value of the sample `metric` whose labels include `labels`.
fn value(scrape: &prometheus_parse::Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    let sample = scrape
        .samples
        .iter()
        .find(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .unwrap_or_else(|| panic!("no sample {metric} {labels:?} in {:#?}", scrape.samples));
    match &sample.value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => *v,
        other => panic!("{metric} is not a number: {other:?}"),
    }
}

fn histogram_count(scrape: &prometheus_parse::Scrape, metric: &str) -> f64 {
    let sample = scrape
        .samples
        .iter()
        .find(|s| s.metric == metric)
        .unwrap_or_else(|| panic!("no histogram {metric}"));
    match &sample.value {
        prometheus_parse::Value::Histogram(buckets) => buckets
            .iter()
            .find(|b| b.less_than.is_infinite())
            .map(|b| b.count)
            .unwrap_or_else(|| panic!("no +Inf bucket in {buckets:?}")),
        other => panic!("{metric} is not a histogram: {other:?}"),
    }
}

fn http_worker(more: &[&str]) -> Worker {
    let mut args = vec!["--http".to_owned(), "127.0.0.1:0".to_owned()];
    args.extend(more.iter().map(|s| s.to_string()));
    Worker::start_with(WorkerConfig {
        args,
        ..WorkerConfig::default()
    })
}

/// The JSON log lines of `worker` whose message starts with `message`.
fn logged(worker: &Worker, message: &str) -> Vec<serde_json::Value> {
    worker
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| {
            v["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with(message))
        })
        .collect()
}

#[test]
fn metrics_count_a_run_exactly_and_status_is_not_a_run() {
    let worker = http_worker(&["--log-format", "json"]);
    let http = worker.http.clone().expect("an HTTP address");
    let before = scrape(&http);
    assert_eq!(value(&before, "dtf_worker_slots", &[]), 2.0);
    assert_eq!(
        value(&before, "dtf_worker_tests_total", &[("outcome", "passed")]),
        0.0
    );

    let mut names: Vec<&str> = PASSING.iter().chain(&FAILING).copied().collect();
    names.push(TIMING_OUT);
    let run = run_bounded(
        worker.command(&fixture()).arg("--exact").args(&names),
        MINUTE,
    );
    assert_eq!(run.code, Some(101), "{}", run.dump());
    let results = results(&run.stdout);
    assert_eq!(results.len(), names.len(), "{}", run.dump());

    let after = scrape(&http);
    let tests = |outcome| value(&after, "dtf_worker_tests_total", &[("outcome", outcome)]);
    assert_eq!(tests("passed"), PASSING.len() as f64);
    assert_eq!(tests("failed"), FAILING.len() as f64);
    assert_eq!(tests("timed_out"), 1.0);
    assert_eq!(tests("system_error"), 0.0);
    assert_eq!(tests("ignored"), 0.0);
    assert_eq!(
        histogram_count(&after, "dtf_worker_test_duration_seconds"),
        names.len() as f64
    );
    assert_eq!(value(&after, "dtf_worker_slots_busy", &[]), 0.0);
    assert_eq!(value(&after, "dtf_worker_draining", &[]), 0.0);
    let binary_size = std::fs::metadata(fixture()).expect("fixture").len() as f64;
    assert!(
        value(&after, "dtf_worker_received_bytes_total", &[]) >= binary_size,
        "the binary was received"
    );
    // The binary, and the input tree's files and manifest.
    assert!(value(&after, "dtf_worker_cache_entries", &[]) >= 1.0);
    assert!(value(&after, "dtf_worker_cache_misses_total", &[]) >= 1.0);
    assert!(value(&after, "dtf_worker_cache_bytes", &[]) >= binary_size);

    // JSON lines: every line parses and carries timestamp, level, target and fields.
    let log = worker.log();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 3, "{log}");
    for line in &lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["timestamp"].is_string(), "{line}");
        assert!(
            ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"]
                .contains(&v["level"].as_str().unwrap_or("")),
            "{line}"
        );
        assert!(
            v["target"].as_str().is_some_and(|t| t.starts_with("dtf")),
            "{line}"
        );
        assert!(v["fields"]["message"].is_string(), "{line}");
    }
    let serving: Vec<_> = logged(&worker, "serving")
        .into_iter()
        .filter(|v| v["fields"]["message"] == "serving")
        .collect();
    assert_eq!(serving.len(), 1, "{log}");
    assert_eq!(serving[0]["fields"]["slots"], 2, "{log}");
    // The run's label names the user and host the coordinator ran as.
    let started = logged(&worker, "run started");
    assert_eq!(started.len(), 1, "one run: {log}");
    let label = started[0]["fields"]["label"].as_str().unwrap_or_default();
    let uid = nix::unistd::getuid();
    let user = (std::env::var("USER").ok().filter(|u| !u.is_empty()))
        .or_else(|| Some(nix::unistd::User::from_uid(uid).ok()??.name))
        .unwrap_or_else(|| uid.to_string());
    assert!(label.contains(&format!("{user}@")), "{label}");
    let peer = started[0]["fields"]["peer"].as_str().unwrap_or_default();
    assert!(peer.starts_with("127.0.0.1:"), "{log}");
    assert!(
        eventually(MINUTE, || !logged(&worker, "run ended").is_empty()),
        "the run ends: {}",
        worker.log()
    );

    // `status` connects, authenticates and asks, but it is no run: not counted, not logged.
    for _ in 0..2 {
        let status = worker.status();
        assert_eq!(status["connections"], 0, "{status}");
        assert_eq!(status["tests_run"], names.len(), "{status}");
    }
    let again = scrape(&http);
    assert_eq!(value(&again, "dtf_worker_connections", &[]), 0.0);
    assert_eq!(logged(&worker, "run started").len(), 1, "{}", worker.log());
    assert_eq!(logged(&worker, "run ended").len(), 1, "{}", worker.log());
}

#[test]
fn health_and_readiness_answer_and_readiness_follows_the_cache() {
    let worker = http_worker(&[]);
    let http = worker.http.clone().expect("an HTTP address");
    assert_eq!(get(&http, "/healthz"), (200, "ok\n".to_owned()));
    assert_eq!(get(&http, "/readyz"), (200, "ready\n".to_owned()));
    let (code, body) = request(&http, "HEAD /readyz HTTP/1.1\r\n\r\n");
    assert_eq!((code, body.as_str()), (200, ""), "HEAD sends no body");
    assert_eq!(get(&http, "/nothing-here").0, 404);
    let (code, body) = request(&http, "POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(code, 405, "{body}");

    // Refused handshakes are counted by reason: HTTP sent to the dtf port, and a wrong token.
    let mut garbage = TcpStream::connect(&worker.addr).expect("connect");
    garbage
        .write_all(b"GET / HTTP/1.1\r\nHost: worker\r\n\r\n")
        .expect("send");
    let mut rest = Vec::new();
    let _ = garbage
        .set_read_timeout(Some(Duration::from_secs(20)))
        .and_then(|()| garbage.read_to_end(&mut rest));
    let wrong = run_bounded(
        std::process::Command::new(worker_binary())
            .args(["status", &worker.addr])
            .env(
                "DTF_TOKEN",
                "a-wrong-token-0123456789abcdef0123456789abcdef",
            )
            .env_remove("DTF_TOKEN_FILE"),
        MINUTE,
    );
    assert_ne!(wrong.code, Some(0), "{}", wrong.dump());
    let refused = |reason| {
        value(
            &scrape(&http),
            "dtf_worker_handshakes_refused_total",
            &[("reason", reason)],
        )
    };
    assert!(
        eventually(MINUTE, || scrape(&http)
            .samples
            .iter()
            .filter(|s| s.metric == "dtf_worker_handshakes_refused_total")
            .count()
            == 2),
        "{:#?}\n{}",
        scrape(&http).samples,
        worker.log()
    );
    assert_eq!(refused("not dtf"), 1.0);
    assert_eq!(refused("bad token"), 1.0);

    // The cache directory goes away under the worker: it cannot take uploads, so it is not
    // ready, but it is alive.
    std::fs::remove_dir_all(worker.cache_dir()).expect("remove the cache");
    let (code, body) = get(&http, "/readyz");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("cache"), "{body}");
    assert_eq!(get(&http, "/healthz").0, 200);
}

fn chromium(args: &[&str], url: &str) -> Run {
    let profile = tempfile::tempdir().expect("profile dir");
    run_bounded(
        std::process::Command::new(tool("chromium"))
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
            .args(args)
            .arg(url),
        Duration::from_secs(120),
    )
}

#[test]
fn the_status_page_shows_the_running_test_in_a_real_browser() {
    let worker = Worker::start_with(WorkerConfig {
        slots: 1,
        args: vec!["--http".into(), "127.0.0.1:0".into()],
        ..WorkerConfig::default()
    });
    let http = worker.http.clone().expect("an HTTP address");
    // The run's label starts with the binary's file name, which the coordinator sends as is:
    // markup in it must reach the page as text.
    let dir = tempfile::tempdir().expect("dir");
    let binary = dir.path().join("fix<b>ture");
    std::fs::copy(fixture(), &binary).expect("copy the fixture");
    let mut cmd = worker.command(&binary);
    cmd.args(["--exact", "dist_sleep_1"])
        .env("DTF_PASS_ENV", "FIXTURE_SLEEP_MS")
        .env("FIXTURE_SLEEP_MS", "90000");
    let coordinator = Background::start(&mut cmd);
    assert!(
        eventually(MINUTE, || value(
            &scrape(&http),
            "dtf_worker_slots_busy",
            &[]
        ) == 1.0),
        "the test starts: {:?}\n{}",
        coordinator.output(),
        worker.log()
    );

    // One browser start both dumps the rendered DOM and takes the picture.
    let url = format!("http://{http}/");
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fleet-status-page.png");
    let _ = std::fs::remove_file(&shot);
    let dom = chromium(
        &[
            "--dump-dom",
            "--window-size=1000,700",
            &format!("--screenshot={}", shot.display()),
        ],
        &url,
    );
    assert_eq!(dom.code, Some(0), "{}", dom.dump());
    assert!(
        dom.stdout.contains("<td class=\"test\">dist_sleep_1</td>"),
        "the running test is listed:\n{}",
        dom.stdout
    );
    assert!(dom.stdout.contains("1 of 1 busy"), "{}", dom.stdout);
    assert!(dom.stdout.contains("fix&lt;b&gt;ture"), "{}", dom.stdout);
    assert!(!dom.stdout.contains("<b>ture"), "escaped: {}", dom.stdout);
    let png = std::fs::read(&shot).unwrap_or_else(|e| panic!("{}: {e}", shot.display()));
    assert!(png.starts_with(b"\x89PNG"), "a PNG at {}", shot.display());
    drop(coordinator);
}
