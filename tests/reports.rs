//! Reports and scheduling, end to end on the fixture binary: libtest's JSON stream (checked
//! against libtest's schema and against libtest itself), JUnit XML (validated by xmllint
//! against tests/junit.xsd and read back with quick-xml, hostile output included), retries
//! and FLAKY, duration history and the start order, the slow notice, fail-fast and the
//! progress line.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use dtf_e2e::*;
use serde_json::Value;

/// Per-test state: `REP_STATE_DIR` (passed to the tests) and a private history directory.
struct Rep {
    state: tempfile::TempDir,
    history: tempfile::TempDir,
}

impl Rep {
    fn new() -> Rep {
        Rep {
            state: tempfile::tempdir().expect("tempdir"),
            history: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = dtf_command(&fixture());
        cmd.args(args)
            .env("DTF_PASS_ENV", "REP_STATE_DIR")
            .env("REP_STATE_DIR", self.state.path())
            .env("DTF_HISTORY_DIR", self.history.path());
        cmd
    }

    fn run(&self, args: &[&str]) -> Run {
        run_bounded(&mut self.command(args), Duration::from_secs(60))
    }

    /// Forgets what the flaky tests counted.
    fn reset_state(&self) {
        for entry in std::fs::read_dir(self.state.path()).expect("read state dir") {
            let _ = std::fs::remove_file(entry.expect("entry").path());
        }
    }
}

fn json_lines(run: &Run) -> Vec<Value> {
    run.stdout
        .lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("stdout line is not JSON ({e}): {l:?}\n{}", run.dump()))
        })
        .collect()
}

// ---- libtest JSON ------------------------------------------------------------------------

/// Keys with the JSON type their values must have.
type Fields = &'static [(&'static str, &'static str)];

/// Checks one event against libtest's JSON schema (library/test/src/formatters/json.rs):
/// the keys each event may have, which are required, and their types. dtf's one extension,
/// an object under `"dtf"`, is allowed on test results.
fn check_libtest_event(v: &Value) -> Result<(), String> {
    let obj = v.as_object().ok_or("an event is an object")?;
    let ty = obj
        .get("type")
        .and_then(Value::as_str)
        .ok_or("`type` is a string")?;
    let event = obj
        .get("event")
        .and_then(Value::as_str)
        .ok_or("`event` is a string")?;
    let (required, optional): (Fields, Fields) = match (ty, event) {
        ("suite", "started") => (&[("test_count", "uint")], &[("shuffle_seed", "uint")]),
        ("suite", "ok" | "failed") => (
            &[
                ("passed", "uint"),
                ("failed", "uint"),
                ("ignored", "uint"),
                ("measured", "uint"),
                ("filtered_out", "uint"),
                ("exec_time", "number"),
            ],
            &[],
        ),
        ("test", "started" | "timeout") => (&[("name", "string")], &[]),
        ("test", "ok" | "failed" | "ignored") => (
            &[("name", "string")],
            &[
                ("exec_time", "number"),
                ("stdout", "string"),
                ("message", "string"),
                ("reason", "string"),
                ("dtf", "object"),
            ],
        ),
        _ => return Err(format!("unknown event {ty}/{event}")),
    };
    let type_ok = |value: &Value, kind: &str| match kind {
        "uint" => value.is_u64(),
        "number" => value.is_number(),
        "string" => value.is_string(),
        "object" => value.is_object(),
        _ => false,
    };
    for (key, kind) in required {
        match obj.get(*key) {
            Some(value) if type_ok(value, kind) => {}
            other => return Err(format!("`{key}` must be a {kind}, got {other:?}")),
        }
    }
    for (key, value) in obj {
        if key == "type" || key == "event" || required.iter().any(|(k, _)| k == key) {
            continue;
        }
        match optional.iter().find(|(k, _)| k == key) {
            Some((_, kind)) if type_ok(value, kind) => {}
            Some((_, kind)) => return Err(format!("`{key}` must be a {kind}, got {value}")),
            None => return Err(format!("unexpected key `{key}`")),
        }
    }
    Ok(())
}

/// Reads a whole stream the way a consumer does: every line an event, the suite's start
/// first and its end last, each test started once and finished once, and counts that add up.
fn check_libtest_stream(run: &Run) -> Vec<Value> {
    let events = json_lines(run);
    for e in &events {
        check_libtest_event(e).unwrap_or_else(|m| panic!("{m}: {e}\n{}", run.dump()));
    }
    assert_eq!(
        events.first().map(|e| (&e["type"], &e["event"])),
        Some((&"suite".into(), &"started".into()))
    );
    let last = events.last().expect("events");
    assert_eq!(last["type"], "suite", "{}", run.dump());
    let mut started = Vec::new();
    let mut finished = Vec::new();
    for e in events.iter().filter(|e| e["type"] == "test") {
        let name = e["name"].as_str().expect("name").to_owned();
        match e["event"].as_str() {
            Some("started") => {
                assert!(!started.contains(&name), "{name} started twice");
                started.push(name);
            }
            Some("timeout") => assert!(started.contains(&name) && !finished.contains(&name)),
            _ => {
                assert!(started.contains(&name), "{name} finished before it started");
                assert!(!finished.contains(&name), "{name} finished twice");
                finished.push(name);
            }
        }
    }
    assert_eq!(started.len(), finished.len(), "every started test finishes");
    let count = |k: &str| last[k].as_u64().expect("count");
    assert_eq!(
        events[0]["test_count"].as_u64(),
        Some(finished.len() as u64)
    );
    assert_eq!(
        count("passed") + count("failed") + count("ignored"),
        finished.len() as u64
    );
    events
}

/// The keys of a one-line JSON object in the order they are written (top level only).
fn key_order(line: &str, value: &Value) -> Vec<String> {
    let mut keys: Vec<(usize, String)> = value
        .as_object()
        .expect("object")
        .keys()
        .map(|k| {
            let needle = format!("\"{k}\": ");
            let at = line
                .match_indices(&needle)
                .map(|(i, _)| i)
                .find(|&i| i == 0 || line.as_bytes()[i - 1] != b'\\')
                .unwrap_or(usize::MAX);
            (at, k.clone())
        })
        .collect();
    keys.sort();
    keys.into_iter().map(|(_, k)| k).collect()
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_u64() => "uint",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Captured output without what differs between any two processes: thread ids, file paths
/// (`panicked at FILE:LINE:COL:` lines) and libtest's once-per-process backtrace note. The
/// lines are sorted: libtest captures both streams into one buffer, dtf reads two pipes, so
/// lines printed on stdout and stderr at nearly the same moment may arrive in either order.
fn normalize_output(s: &str) -> Vec<&str> {
    let mut lines: Vec<&str> = s
        .lines()
        .filter(|l| !(l.starts_with("thread '") && l.contains("panicked at")))
        .filter(|l| !l.starts_with("note: run with `RUST_BACKTRACE=1`"))
        .filter(|l| !l.is_empty())
        .collect();
    lines.sort_unstable();
    lines
}

/// The same tests under libtest and under dtf: the same events for each test, with the same
/// keys in the same order, the same JSON types and the same values where they can agree.
#[test]
fn json_matches_what_libtest_emits_field_by_field() {
    const NAMES: &[&str] = &[
        "pass_plain",
        "pass_prints",
        "fail_assert",
        "fail_panic",
        "pass_should_panic",
        "fail_should_panic_wrong_message",
        "fail_should_panic_no_panic",
        "fail_result",
        "ignored_plain",
        "ignored_with_reason",
        "nested::pass_deep",
    ];
    let libtest = test_binary("dtf-fixture", "fixture_libtest");
    let rep = Rep::new();
    for extra in [&[][..], &["--show-output"][..]] {
        let mut reference = Command::new(&libtest);
        reference
            .env("RUSTC_BOOTSTRAP", "1")
            .env("RUST_BACKTRACE", "0")
            .args([
                "-Z",
                "unstable-options",
                "--format",
                "json",
                "--report-time",
            ])
            .args(extra)
            .arg("--exact")
            .args(NAMES);
        let want = run_bounded(&mut reference, Duration::from_secs(60));
        assert_eq!(want.code, Some(101), "{}", want.dump());
        let mut args = vec!["-Z", "unstable-options", "--format", "json", "--exact"];
        args.extend(extra);
        args.extend(NAMES);
        let got = rep.run(&args);
        assert_eq!(got.code, Some(101), "{}", got.dump());
        check_libtest_stream(&want);
        check_libtest_stream(&got);

        // Group each stream's events by test (tests run in parallel: order across tests is
        // free, order within a test is not).
        let by_test = |run: &Run| {
            let mut map: BTreeMap<String, Vec<(String, Value)>> = BTreeMap::new();
            let mut suite = Vec::new();
            for line in run.stdout.lines() {
                let v: Value = serde_json::from_str(line).expect("json");
                match v["name"].as_str() {
                    Some(name) => map
                        .entry(name.to_owned())
                        .or_default()
                        .push((line.to_owned(), v)),
                    None => suite.push((line.to_owned(), v)),
                }
            }
            (map, suite)
        };
        let (want_tests, want_suite) = by_test(&want);
        let (got_tests, got_suite) = by_test(&got);
        assert_eq!(
            want_tests.keys().collect::<Vec<_>>(),
            got_tests.keys().collect::<Vec<_>>(),
            "the same tests"
        );
        let pairs = want_tests
            .iter()
            .flat_map(|(name, w)| {
                let g = &got_tests[name];
                assert_eq!(w.len(), g.len(), "{name}: {w:?} vs {g:?}");
                w.iter().zip(g).map(move |(w, g)| (name.clone(), w, g))
            })
            .chain(
                want_suite
                    .iter()
                    .zip(&got_suite)
                    .map(|(w, g)| ("suite".to_owned(), w, g)),
            );
        for (name, (wl, w), (gl, g)) in pairs {
            assert_eq!(
                key_order(wl, w),
                key_order(gl, g),
                "{name}: keys\n{wl}\n{gl}"
            );
            for (key, wv) in w.as_object().expect("object") {
                let gv = &g[key];
                assert_eq!(kind(wv), kind(gv), "{name}: type of `{key}`\n{wl}\n{gl}");
                match key.as_str() {
                    // Times differ; so does what each binary filtered out of its own list.
                    "exec_time" | "filtered_out" => {}
                    "stdout" => assert_eq!(
                        normalize_output(wv.as_str().unwrap_or_default()),
                        normalize_output(gv.as_str().unwrap_or_default()),
                        "{name}: stdout"
                    ),
                    // libtest also names the test's source location, which dtf's child does
                    // not know to the column.
                    "message" if name == "fail_should_panic_no_panic" => {
                        let prefix = "test did not panic as expected";
                        assert!(wv.as_str().is_some_and(|m| m.starts_with(prefix)), "{wl}");
                        assert!(gv.as_str().is_some_and(|m| m.starts_with(prefix)), "{gl}");
                    }
                    _ => assert_eq!(wv, gv, "{name}: `{key}`\n{wl}\n{gl}"),
                }
            }
        }
    }
}

/// A stream with everything dtf adds (flaky, retries, hostile output, a slow notice, tests
/// not run) still reads as libtest's schema, and stdout holds nothing but events.
#[test]
fn json_with_dtfs_extras_still_follows_libtests_schema() {
    let rep = Rep::new();
    let run = rep.run(&[
        "--format",
        "json",
        "--slow",
        "1s",
        "--retries",
        "1",
        "--exact",
        "rep_flaky_cli",
        "rep_hostile",
        "rep_slow",
        "pass_plain",
        "ignored_with_reason",
    ]);
    assert_eq!(run.code, Some(101), "{}", run.dump());
    let events = check_libtest_stream(&run);
    let find = |name: &str, event: &str| {
        events
            .iter()
            .find(|e| e["name"] == name && e["event"] == event)
            .unwrap_or_else(|| panic!("no {event} event for {name}\n{}", run.dump()))
    };
    let flaky = find("rep_flaky_cli", "ok");
    assert_eq!(flaky["dtf"]["flaky"], true);
    let attempts = flaky["dtf"]["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[0]["event"], "failed");
    assert!(
        attempts[0]["stdout"]
            .as_str()
            .is_some_and(|s| s.contains("output of attempt 1"))
    );
    assert_eq!(attempts[1]["event"], "ok");
    let hostile = find("rep_hostile", "failed");
    let stdout = hostile["stdout"].as_str().expect("stdout");
    assert!(
        stdout.contains("NUL:\0 cdata-end:]]> bad-utf8:\u{fffd}"),
        "{stdout:?}"
    );
    find("rep_slow", "timeout");
    let ignored = find("ignored_with_reason", "ignored");
    assert_eq!(ignored["message"], "needs network");

    // `-Z unstable-options` is optional, as for libtest on nightly.
    let run = rep.run(&["--format", "json", "--exact", "pass_plain"]);
    assert_eq!(run.code, Some(0), "{}", run.dump());
    check_libtest_stream(&run);
}

// ---- JUnit XML ---------------------------------------------------------------------------

/// An element of a parsed document.
#[derive(Debug, Default)]
struct Element {
    name: String,
    attrs: HashMap<String, String>,
    children: Vec<Element>,
    text: String,
}

impl Element {
    fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }

    fn one<'a>(&'a self, name: &'a str) -> &'a Element {
        let mut found = self.all(name);
        let first = found
            .next()
            .unwrap_or_else(|| panic!("no <{name}> in <{}>", self.name));
        assert!(
            found.next().is_none(),
            "several <{name}> in <{}>",
            self.name
        );
        first
    }

    fn attr(&self, name: &str) -> &str {
        self.attrs
            .get(name)
            .unwrap_or_else(|| panic!("<{}> has no {name}", self.name))
    }
}

/// Parses a document with quick-xml into a tree, resolving entity and character references.
fn parse_xml(bytes: &[u8]) -> Element {
    use quick_xml::events::{BytesStart, Event};
    fn element(e: &BytesStart<'_>) -> Element {
        Element {
            name: String::from_utf8_lossy(e.name().as_ref()).into_owned(),
            attrs: e
                .attributes()
                .map(|a| {
                    let a = a.expect("well-formed attribute");
                    let key = String::from_utf8_lossy(a.key.as_ref()).into_owned();
                    (
                        key,
                        a.normalized_value(quick_xml::XmlVersion::Explicit1_0)
                            .expect("attribute value")
                            .into_owned(),
                    )
                })
                .collect(),
            ..Element::default()
        }
    }
    let mut reader = quick_xml::Reader::from_reader(bytes);
    let mut stack = vec![Element::default()];
    let mut buf = Vec::new();
    loop {
        let top = stack.len() - 1;
        match reader.read_event_into(&mut buf).expect("well-formed XML") {
            Event::Start(e) => stack.push(element(&e)),
            Event::Empty(e) => stack[top].children.push(element(&e)),
            Event::End(_) => {
                let done = stack.pop().expect("open element");
                stack.last_mut().expect("parent").children.push(done);
            }
            Event::Text(t) => stack[top].text.push_str(
                &t.xml_content(quick_xml::XmlVersion::Explicit1_0)
                    .expect("UTF-8 text"),
            ),
            Event::CData(t) => stack[top].text.push_str(&t.decode().expect("UTF-8 CDATA")),
            Event::GeneralRef(r) => {
                let c = match r.resolve_char_ref().expect("character reference") {
                    Some(c) => c,
                    // Spelled out: other crates in the graph make `as_ref` ambiguous here.
                    None => match <[u8] as AsRef<[u8]>>::as_ref(&r) {
                        b"amp" => '&',
                        b"lt" => '<',
                        b"gt" => '>',
                        b"apos" => '\'',
                        b"quot" => '"',
                        other => panic!("unknown entity {}", String::from_utf8_lossy(other)),
                    },
                };
                stack[top].text.push(c);
            }
            Event::Eof => break,
            _ => {}
        }
        buf.clear();
    }
    assert_eq!(stack.len(), 1, "every element closed");
    stack.pop().expect("document")
}

fn xsd() -> PathBuf {
    workspace_root().join("tests/junit.xsd")
}

/// Validates `file` against tests/junit.xsd with xmllint (libxml2), a real schema validator.
fn validate(file: &Path) {
    let out = Command::new(tool("xmllint"))
        .arg("--noout")
        .arg("--schema")
        .arg(xsd())
        .arg(file)
        .output()
        .unwrap_or_else(|e| panic!("cannot run xmllint: {e}"));
    assert!(
        out.status.success(),
        "{} does not validate against {}:\n{}",
        file.display(),
        xsd().display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn testcase<'a>(suite: &'a Element, name: &str) -> &'a Element {
    suite
        .all("testcase")
        .find(|t| t.attr("name") == name)
        .unwrap_or_else(|| panic!("no testcase {name}"))
}

#[test]
fn junit_file_is_valid_with_hostile_output_retries_and_flaky_tests() {
    let rep = Rep::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("reports/junit.xml");
    let run = rep.run(&[
        "--junit",
        file.to_str().expect("utf-8 path"),
        "--retries",
        "1",
        "--exact",
        "rep_hostile",
        "rep_huge_output",
        "rep_flaky_cli",
        "fail_panic",
        "fail_abort",
        "pass_plain",
        "ignored_with_reason",
        "nested::pass_deep",
    ]);
    assert_eq!(run.code, Some(101), "{}", run.dump());
    // The normal output is still there.
    assert!(
        run.stdout.contains("test result: FAILED."),
        "{}",
        run.dump()
    );
    assert!(run.stdout.contains("1 flaky"), "{}", run.dump());

    validate(&file);
    let bytes = std::fs::read(&file).expect("report written");
    assert!(
        bytes.len() > 4_000_000,
        "the huge output is kept (up to dtf's cap)"
    );
    let doc = parse_xml(&bytes);
    let suites = doc.one("testsuites");
    let suite = suites.one("testsuite");
    assert_eq!(suite.attr("name"), "fixture");
    assert_eq!(suite.attr("tests"), "8");
    assert_eq!(suite.attr("failures"), "4");
    assert_eq!(suite.attr("errors"), "0");
    assert_eq!(suite.attr("skipped"), "1");
    assert!(!suite.attr("hostname").is_empty());
    assert_eq!(suite.attr("timestamp").len(), "2026-01-01T00:00:00".len());
    let names: Vec<&str> = suite.all("testcase").map(|t| t.attr("name")).collect();
    assert_eq!(
        names,
        [
            "fail_abort",
            "fail_panic",
            "ignored_with_reason",
            "nested::pass_deep",
            "pass_plain",
            "rep_flaky_cli",
            "rep_hostile",
            "rep_huge_output"
        ]
    );
    assert_eq!(
        testcase(suite, "nested::pass_deep").attr("classname"),
        "fixture::nested"
    );
    assert_eq!(testcase(suite, "pass_plain").attr("classname"), "fixture");
    let worker = testcase(suite, "pass_plain")
        .one("properties")
        .one("property");
    assert_eq!(
        (worker.attr("name"), worker.attr("value")),
        ("dtf.worker", "local")
    );

    let skipped = testcase(suite, "ignored_with_reason").one("skipped");
    assert_eq!(skipped.attr("message"), "needs network");

    let flaky = testcase(suite, "rep_flaky_cli");
    assert!(flaky.all("failure").next().is_none(), "a flaky test passed");
    let first = flaky.one("flakyFailure");
    assert_eq!(first.attr("type"), "panicked");
    assert!(first.one("system-out").text.contains("output of attempt 1"));

    let abort = testcase(suite, "fail_abort");
    assert_eq!(abort.one("failure").attr("type"), "signaled");
    assert_eq!(abort.one("rerunFailure").attr("type"), "signaled");

    let hostile = testcase(suite, "rep_hostile");
    let out = &hostile.one("system-out").text;
    assert!(
        out.contains("NUL:\\u{0} cdata-end:]]> bad-utf8:\u{fffd}\u{fffd}"),
        "{out:?}"
    );
    assert!(out.contains("esc:\\u{1b}[31mred"), "{out:?}");
    assert!(out.contains("markup:<a b=\"c\">&amp;</a>"), "{out:?}");
    assert!(hostile.one("system-err").text.starts_with("stderr NUL:"));
    let failure = hostile.one("failure");
    assert!(
        failure
            .attr("message")
            .contains("hostile panic ]]> with \\u{0} NUL")
    );
    assert!(
        hostile
            .one("rerunFailure")
            .one("system-out")
            .text
            .contains("cdata-end:]]>")
    );

    let huge = testcase(suite, "rep_huge_output");
    assert!(
        huge.one("system-out")
            .text
            .contains("[dtf: output truncated")
    );
}

#[test]
fn junit_on_stdout_and_through_the_environment() {
    let rep = Rep::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let run = rep.run(&[
        "--format",
        "junit",
        "--exact",
        "pass_plain",
        "fail_panic",
        "ignored_plain",
    ]);
    assert_eq!(run.code, Some(101), "{}", run.dump());
    assert!(
        run.stdout.starts_with("<?xml"),
        "nothing but XML on stdout:\n{}",
        run.dump()
    );
    let on_stdout = dir.path().join("stdout.xml");
    std::fs::write(&on_stdout, &run.stdout).expect("write");
    validate(&on_stdout);
    let doc = parse_xml(run.stdout.as_bytes());
    assert_eq!(doc.one("testsuites").one("testsuite").attr("tests"), "3");

    let file = dir.path().join("env.xml");
    let mut cmd = rep.command(&["--format", "terse", "--exact", "pass_plain"]);
    cmd.env("DTF_JUNIT", &file);
    let run = run_bounded(&mut cmd, Duration::from_secs(60));
    assert_eq!(run.code, Some(0), "{}", run.dump());
    validate(&file);
    let doc = parse_xml(&std::fs::read(&file).expect("DTF_JUNIT written"));
    assert_eq!(doc.one("testsuites").one("testsuite").attr("tests"), "1");
}

// ---- Retries and FLAKY -------------------------------------------------------------------

#[test]
fn a_test_failing_once_then_passing_is_flaky() {
    let rep = Rep::new();
    // retries = 2 in the attribute.
    let run = rep.run(&["--exact", "rep_flaky_attr", "--show-output"]);
    assert_eq!(
        run.code,
        Some(0),
        "a flaky test counts as a pass\n{}",
        run.dump()
    );
    assert_eq!(
        run.result_of("rep_flaky_attr"),
        Some("ok (FLAKY: passed on attempt 2)"),
        "{}",
        run.dump()
    );
    assert!(run.stdout.contains("1 passed; 0 failed"), "{}", run.dump());
    assert!(run.stdout.contains("; 1 flaky"), "{}", run.dump());
    // Each attempt's output is kept, in its own section.
    for attempt in [1, 2] {
        let head = format!("---- rep_flaky_attr stdout (attempt {attempt} of 2) ----\n");
        let start = run.stdout.find(&head).map(|i| i + head.len());
        let section = start
            .map(|i| &run.stdout[i..])
            .map(|rest| match rest.find("\n---- ") {
                Some(end) => &rest[..end],
                None => rest,
            });
        let line = format!("output of attempt {attempt}");
        assert!(section.is_some_and(|s| s.contains(&line)), "{}", run.dump());
    }

    rep.reset_state();
    let run = rep.run(&["--exact", "rep_flaky_attr", "--flaky-fails"]);
    assert_eq!(run.code, Some(101), "--flaky-fails\n{}", run.dump());

    // Without retries the first attempt's failure stands.
    rep.reset_state();
    let run = rep.run(&["--exact", "rep_flaky_cli"]);
    assert_eq!(run.code, Some(101), "{}", run.dump());
    assert_eq!(run.result_of("rep_flaky_cli"), Some("FAILED"));

    rep.reset_state();
    let run = rep.run(&["--exact", "rep_flaky_cli", "--retries", "1"]);
    assert_eq!(run.code, Some(0), "{}", run.dump());
    assert_eq!(
        run.result_of("rep_flaky_cli"),
        Some("ok (FLAKY: passed on attempt 2)")
    );

    rep.reset_state();
    let mut cmd = rep.command(&["--exact", "rep_flaky_cli"]);
    cmd.env("DTF_RETRIES", "1");
    let run = run_bounded(&mut cmd, Duration::from_secs(60));
    assert_eq!(run.code, Some(0), "DTF_RETRIES\n{}", run.dump());
    assert_eq!(
        run.result_of("rep_flaky_cli"),
        Some("ok (FLAKY: passed on attempt 2)")
    );
}

// ---- History and order -------------------------------------------------------------------

/// The names in the order their first attempts started.
fn start_order(run: &Run) -> Vec<String> {
    json_lines(run)
        .iter()
        .filter(|e| e["type"] == "test" && e["event"] == "started")
        .map(|e| e["name"].as_str().expect("name").to_owned())
        .collect()
}

#[test]
fn history_starts_failures_then_new_tests_then_the_longest() {
    let rep = Rep::new();
    let one_at_a_time = ["--format", "json", "--test-threads", "1", "--exact"];
    let mut args = one_at_a_time.to_vec();
    args.extend([
        "pass_plain",
        "rep_skew_a00",
        "rep_skew_z_long",
        "fail_panic",
    ]);
    let first = rep.run(&args);
    assert_eq!(
        start_order(&first),
        [
            "fail_panic",
            "pass_plain",
            "rep_skew_a00",
            "rep_skew_z_long"
        ],
        "no history: by name"
    );
    let file = rep.history.path().join("dtf-fixture.fixture.json");
    let history: Value =
        serde_json::from_slice(&std::fs::read(&file).expect("history written")).expect("JSON");
    assert_eq!(history["tests"]["fail_panic"]["failed"], true);
    assert!(history["tests"]["rep_skew_z_long"]["mean_secs"].as_f64() > Some(0.9));

    args.push("pass_prints"); // never seen
    let second = rep.run(&args);
    assert_eq!(
        start_order(&second),
        [
            "fail_panic",
            "pass_prints",
            "rep_skew_z_long",
            "rep_skew_a00",
            "pass_plain"
        ],
        "failed last time, never seen, then longest first"
    );

    let mut by_name = args.clone();
    by_name.extend(["--order", "name"]);
    assert_eq!(
        start_order(&rep.run(&by_name)),
        [
            "fail_panic",
            "pass_plain",
            "pass_prints",
            "rep_skew_a00",
            "rep_skew_z_long"
        ]
    );
}

#[test]
fn random_order_prints_its_seed_and_replays_it() {
    let rep = Rep::new();
    let names = [
        "pass_plain",
        "pass_prints",
        "pass_result",
        "pass_async",
        "nested::pass_deep",
        "pass_should_panic",
    ];
    let mut args = vec![
        "--format",
        "json",
        "--test-threads",
        "1",
        "--order",
        "random",
        "--exact",
    ];
    args.extend(names);
    let run = rep.run(&args);
    let seed = json_lines(&run)[0]["shuffle_seed"]
        .as_u64()
        .expect("seed in the started event");
    let order = start_order(&run);
    let seed_arg = format!("random:{seed}");
    args[5] = &seed_arg;
    assert_eq!(
        start_order(&rep.run(&args)),
        order,
        "the same seed, the same order"
    );

    let run = rep.run(&["--order", "random:42", "--exact", "pass_plain"]);
    assert!(
        run.stdout.contains("running 1 test (shuffle seed: 42)"),
        "{}",
        run.dump()
    );
    let run = rep.run(&["--order", "sideways"]);
    assert_eq!(run.code, Some(101), "{}", run.dump());
}

#[test]
fn concurrent_runs_all_land_in_the_history() {
    let rep = Rep::new();
    let names = [
        "pass_plain",
        "pass_prints",
        "pass_result",
        "pass_async",
        "nested::pass_deep",
        "pass_should_panic",
    ];
    let children: Vec<_> = names
        .iter()
        .map(|name| {
            let mut cmd = rep.command(&["--exact", name]);
            cmd.stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped());
            cmd.spawn().expect("spawn")
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().expect("wait");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.stderr.is_empty(),
            "no warning: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let file = rep.history.path().join("dtf-fixture.fixture.json");
    let history: Value =
        serde_json::from_slice(&std::fs::read(&file).expect("history")).expect("JSON");
    for name in names {
        assert_eq!(
            history["tests"][name]["runs"], 1,
            "{name} recorded: {history}"
        );
    }
}

// ---- Slow notice, fail-fast, progress ----------------------------------------------------

#[test]
fn a_slow_test_gets_libtests_notice() {
    let rep = Rep::new();
    let run = rep.run(&["--slow", "1s", "--exact", "rep_slow", "pass_plain"]);
    assert_eq!(run.code, Some(0), "{}", run.dump());
    assert!(
        run.stdout
            .lines()
            .any(|l| l == "test rep_slow has been running for over 1 second"),
        "{}",
        run.dump()
    );
    assert!(!run.stdout.contains("test pass_plain has been running"));
}

#[test]
fn fail_fast_kills_what_runs_and_reports_the_rest_as_not_run() {
    let rep = Rep::new();
    // Bounded well below the sleeper's 30 s: the run must not wait for it.
    let run = run_bounded(
        &mut rep.command(&[
            "--fail-fast",
            "--test-threads",
            "2",
            "--order",
            "name",
            "--format",
            "json",
            "--exact",
            "rep_ff_a_fail",
            "rep_ff_b_sleeper",
            "rep_ff_c_later",
        ]),
        Duration::from_secs(20),
    );
    assert_eq!(run.code, Some(101), "{}", run.dump());
    let events = check_libtest_stream(&run);
    let result = |name: &str| {
        events
            .iter()
            .find(|e| e["name"] == name && e["event"] != "started")
            .unwrap_or_else(|| panic!("no result for {name}\n{}", run.dump()))
    };
    assert_eq!(result("rep_ff_a_fail")["event"], "failed");
    for name in ["rep_ff_b_sleeper", "rep_ff_c_later"] {
        assert_eq!(result(name)["event"], "ignored", "{name}");
        assert_eq!(result(name)["dtf"]["not_run"], true, "{name}");
    }
    let pid: i32 = std::fs::read_to_string(rep.state.path().join("sleeper.pid"))
        .expect("the sleeper started")
        .trim()
        .parse()
        .expect("pid");
    assert!(
        eventually(Duration::from_secs(5), || !process_alive(pid)),
        "the sleeping test (pid {pid}) was killed"
    );

    // The pretty summary counts them.
    let run = run_bounded(
        &mut rep.command(&[
            "--fail-fast",
            "--test-threads",
            "1",
            "--order",
            "name",
            "--exact",
            "rep_ff_a_fail",
            "rep_ff_c_later",
        ]),
        Duration::from_secs(20),
    );
    assert_eq!(run.code, Some(101), "{}", run.dump());
    assert!(
        run.stdout.contains("0 passed; 1 failed;") && run.stdout.contains("; 1 not run"),
        "{}",
        run.dump()
    );
}

#[test]
fn no_progress_line_in_piped_output() {
    let rep = Rep::new();
    for format in ["pretty", "terse"] {
        let run = rep.run(&[
            "--format",
            format,
            "--exact",
            "pass_plain",
            "rep_skew_a00",
            "fail_panic",
        ]);
        assert_eq!(run.code, Some(101), "{}", run.dump());
        for out in [&run.stdout, &run.stderr] {
            assert!(
                !out.contains('\r') && !out.contains("\x1b[") && !out.contains("slots busy"),
                "{}",
                run.dump()
            );
        }
    }
}

#[test]
fn progress_line_on_a_terminal() {
    let rep = Rep::new();
    let fixture = fixture();
    // util-linux's `script` runs the binary on a pseudo-terminal.
    let mut cmd = Command::new(tool("script"));
    cmd.args(["-q", "-e", "-c"])
        .arg(format!(
            "{} --test-threads 2 --exact pass_plain rep_skew_a00 rep_skew_a01",
            fixture.display()
        ))
        .arg("/dev/null");
    for (name, _) in std::env::vars() {
        if name.starts_with("DTF_") || name.starts_with("RUST_TEST_") || name.starts_with("NEXTEST")
        {
            cmd.env_remove(name);
        }
    }
    cmd.env("DTF_HISTORY_DIR", rep.history.path())
        .env("TERM", "xterm");
    let run = run_bounded(&mut cmd, Duration::from_secs(60));
    assert_eq!(run.code, Some(0), "{}", run.dump());
    assert!(
        run.stdout.contains("done, ") && run.stdout.contains("slots busy"),
        "{}",
        run.dump()
    );
    assert!(
        run.stdout.contains("\x1b[K"),
        "the line is erased before other output"
    );
    assert!(run.stdout.contains("test result: "), "{}", run.dump());
}
