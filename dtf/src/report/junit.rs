//! JUnit XML: `--format junit` on stdout, and `--junit PATH` / `DTF_JUNIT=PATH` to a file next
//! to the normal output. The document follows the schema CI servers read (Surefire's, with the
//! `timestamp` and `hostname` attributes of Jenkins's): one `testsuite` per test binary, one
//! `testcase` per test, and for retried tests Surefire's elements: `flakyFailure` for each
//! failed attempt of a test that passed in the end, `failure` then `rerunFailure` for a test
//! that failed every attempt (`error`/`rerunError`/`flakyError` when the infrastructure failed
//! rather than the test). `tests/junit.xsd` is that schema. A test `cargo dtf
//! --skip-unchanged` did not run (it passed last time, nothing changed) is a passing
//! `testcase` with `time="0"` and the property `dtf.unchanged` = `true`.
//!
//! Whatever a test prints, the document is valid XML 1.0: output is decoded as UTF-8 with
//! invalid bytes replaced, characters XML cannot hold (NUL, other control characters) are
//! written as Rust escapes (`\u{0}`), and text is escaped rather than put in CDATA, so `]]>`
//! needs no special case.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use quick_xml::Writer;
use quick_xml::events::{BytesDecl, BytesEnd, BytesStart, BytesText, Event};

use super::json::NOT_RUN_MESSAGE;
use super::{Reporter, RunInfo, Summary};
use crate::outcome::{Attempt, Failure, Status, Stream, TestReport};

/// Where the document goes.
pub enum Sink {
    /// Standard output (`--format junit`).
    Stdout(Box<dyn Write + Send>),
    /// A file, replaced atomically when the run ends (`--junit PATH`).
    File(PathBuf),
}

/// The JUnit reporter: collects every test and writes the document when the run ends.
pub struct Junit {
    sink: Sink,
    classnames: HashMap<String, String>,
    show_output: bool,
    info: RunInfo,
    started: SystemTime,
    reports: Vec<TestReport>,
}

impl Junit {
    /// A reporter writing to `sink`. `classnames` maps a test's full name to its module path
    /// (the `classname` attribute); with `show_output`, passing tests carry their output too.
    pub fn new(sink: Sink, classnames: HashMap<String, String>, show_output: bool) -> Junit {
        Junit {
            sink,
            classnames,
            show_output,
            info: RunInfo::default(),
            started: SystemTime::now(),
            reports: Vec::new(),
        }
    }

    /// The complete document for the reports collected so far.
    pub fn document(&self, summary: &Summary) -> io::Result<Vec<u8>> {
        let mut w = Writer::new_with_indent(Vec::new(), b' ', 2);
        w.write_event(Event::Decl(BytesDecl::new("1.0", Some("UTF-8"), None)))?;

        let kinds: Vec<Kind> = self.reports.iter().map(Kind::of).collect();
        let count = |kind| kinds.iter().filter(|&&k| k == kind).count().to_string();
        let counts = [
            ("tests", kinds.len().to_string()),
            ("failures", count(Kind::Failure)),
            ("errors", count(Kind::Error)),
            ("skipped", count(Kind::Skipped)),
            ("time", time(summary.duration)),
        ];

        let mut root = BytesStart::new("testsuites");
        root.push_attribute(("name", "dtf"));
        for (k, v) in &counts {
            root.push_attribute((*k, v.as_str()));
        }
        w.write_event(Event::Start(root))?;

        // One suite per binary: this binary's, or each binary of a `cargo dtf` run.
        let mut suites: Vec<(String, Vec<&TestReport>)> = Vec::new();
        if self.info.origins.is_empty() {
            suites.push((self.info.suite.clone(), self.reports.iter().collect()));
        } else {
            let mut by_binary: std::collections::BTreeMap<String, Vec<&TestReport>> =
                Default::default();
            for report in &self.reports {
                let binary = self
                    .info
                    .origins
                    .get(&report.name)
                    .map(|o| o.binary_id.clone())
                    .unwrap_or_else(|| self.info.suite.clone());
                by_binary.entry(binary).or_default().push(report);
            }
            suites.extend(by_binary);
        }
        let single = suites.len() == 1 && self.info.origins.is_empty();
        for (name, mut reports) in suites {
            let kinds: Vec<Kind> = reports.iter().map(|r| Kind::of(r)).collect();
            let count = |kind| kinds.iter().filter(|&&k| k == kind).count().to_string();
            let duration = if single {
                summary.duration
            } else {
                reports.iter().map(|r| r.duration()).sum()
            };
            let counts = [
                ("tests", kinds.len().to_string()),
                ("failures", count(Kind::Failure)),
                ("errors", count(Kind::Error)),
                ("skipped", count(Kind::Skipped)),
                ("time", time(duration)),
            ];
            let mut suite = BytesStart::new("testsuite");
            suite.push_attribute(("name", clean(&name).as_ref()));
            for (k, v) in &counts {
                suite.push_attribute((*k, v.as_str()));
            }
            suite.push_attribute(("timestamp", timestamp(self.started).as_str()));
            suite.push_attribute(("hostname", clean(&hostname()).as_ref()));
            w.write_event(Event::Start(suite))?;

            let mut props = vec![
                ("dtf.slots", self.info.slots.to_string()),
                ("dtf.filtered_out", summary.filtered_out.to_string()),
            ];
            if let Some(seed) = self.info.shuffle_seed {
                props.push(("dtf.shuffle_seed", seed.to_string()));
            }
            if summary.flaky > 0 {
                props.push(("dtf.flaky", summary.flaky.to_string()));
            }
            properties(&mut w, &props)?;

            // By name, as libtest lists tests, whatever order they finished in.
            reports.sort_by(|a, b| a.name.cmp(&b.name));
            for report in reports {
                self.testcase(&mut w, report)?;
            }
            w.write_event(Event::End(BytesEnd::new("testsuite")))?;
        }
        w.write_event(Event::End(BytesEnd::new("testsuites")))?;
        let mut doc = w.into_inner();
        doc.push(b'\n');
        Ok(doc)
    }

    fn testcase(&self, w: &mut Writer<Vec<u8>>, report: &TestReport) -> io::Result<()> {
        let mut tc = BytesStart::new("testcase");
        let origin = self.info.origins.get(&report.name);
        let name = origin.map_or(report.name.as_str(), |o| o.test.as_str());
        tc.push_attribute(("name", clean(name).as_ref()));
        let classname = match origin {
            Some(o) => self
                .classnames
                .get(&report.name)
                .cloned()
                .unwrap_or_else(|| derived_classname(&o.binary_id, &o.test)),
            None => self
                .classnames
                .get(&report.name)
                .cloned()
                .unwrap_or_else(|| derived_classname(&self.info.suite, &report.name)),
        };
        tc.push_attribute(("classname", clean(&classname).as_ref()));
        tc.push_attribute(("time", time(report.duration()).as_str()));
        w.write_event(Event::Start(tc))?;

        // Properties first (as pytest and quick-junit write them), then Surefire's order.
        if !report.attempts.is_empty() {
            let mut props = Vec::new();
            for attempt in &report.attempts {
                let worker = attempt.worker.clone().unwrap_or_else(|| "local".to_owned());
                if !props.iter().any(|(_, v)| *v == worker) {
                    props.push(("dtf.worker", worker));
                }
            }
            if report.attempts.len() > 1 {
                props.push(("dtf.attempts", report.attempts.len().to_string()));
            }
            if report.rerun_after_lost_worker {
                props.push(("dtf.rerun_after_lost_worker", "true".to_owned()));
            }
            let leaked = report.leaked();
            if !leaked.is_empty() {
                props.push(("dtf.leaked", crate::outcome::leak_note(&leaked)));
            }
            properties(w, &props)?;
        } else if report.status == Status::Unchanged {
            properties(w, &[("dtf.unchanged", "true".to_owned())])?;
        }

        match &report.status {
            Status::Failed => {
                // Surefire's order: the first attempt as `failure` (or `error`), each rerun as
                // `rerunFailure` (or `rerunError`), then the first attempt's output.
                let (first, later) = match report.attempts.split_first() {
                    Some((first, later)) => (Some(first), later),
                    None => (None, &[][..]),
                };
                if let Some(a) = first.filter(|a| !is_error(a)) {
                    failure_element(w, "failure", a)?;
                }
                for a in later.iter().filter(|a| !a.passed() && !is_error(a)) {
                    nested_failure(w, "rerunFailure", a)?;
                }
                if let Some(a) = first.filter(|a| is_error(a)) {
                    failure_element(w, "error", a)?;
                }
                for a in later.iter().filter(|a| !a.passed() && is_error(a)) {
                    nested_failure(w, "rerunError", a)?;
                }
                if let Some(a) = first {
                    outputs(w, a)?;
                }
            }
            Status::Passed | Status::Flaky => {
                // Every failed attempt of a test that passed in the end is a `flakyFailure`
                // (or `flakyError`) with its own output.
                let failed = || report.attempts.iter().filter(|a| !a.passed());
                for a in failed().filter(|a| !is_error(a)) {
                    nested_failure(w, "flakyFailure", a)?;
                }
                for a in failed().filter(|a| is_error(a)) {
                    nested_failure(w, "flakyError", a)?;
                }
                if let Some(a) = report.last().filter(|_| self.show_output) {
                    outputs(w, a)?;
                }
            }
            Status::Ignored { reason } => {
                skipped(w, reason.as_deref())?;
            }
            Status::NotRun => {
                skipped(w, Some(NOT_RUN_MESSAGE))?;
            }
            // Passed last time, unchanged since: a passing testcase of no time.
            Status::Unchanged => {}
        }
        w.write_event(Event::End(BytesEnd::new("testcase")))
    }

    fn write(&mut self, document: &[u8]) -> io::Result<()> {
        match &mut self.sink {
            Sink::Stdout(out) => {
                out.write_all(document)?;
                out.flush()
            }
            Sink::File(path) => write_file(path, document).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("the JUnit report {}: {e}", path.display()),
                )
            }),
        }
    }
}

/// How a testcase counts in the suite's totals.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Passed,
    Failure,
    Error,
    Skipped,
}

impl Kind {
    fn of(report: &TestReport) -> Kind {
        match report.status {
            Status::Passed | Status::Flaky | Status::Unchanged => Kind::Passed,
            Status::Failed => match report.attempts.first() {
                Some(a) if is_error(a) => Kind::Error,
                _ => Kind::Failure,
            },
            Status::Ignored { .. } | Status::NotRun => Kind::Skipped,
        }
    }
}

/// True when the attempt failed because of the infrastructure, not the test: a JUnit error.
fn is_error(attempt: &Attempt) -> bool {
    matches!(
        attempt.failure,
        Some(Failure::System { .. } | Failure::WorkerLost { .. })
    )
}

/// The `type` attribute of a failure: its kind (`panicked`, `timed-out`, `signaled`, ...).
fn failure_type(failure: &Failure) -> &'static str {
    match failure {
        Failure::Panicked { .. } => "panicked",
        Failure::ReturnedErr { .. } => "returned-err",
        Failure::DidNotPanic => "did-not-panic",
        Failure::WrongPanic { .. } => "wrong-panic",
        Failure::ExitedEarly { .. } => "exited-early",
        Failure::Signaled { .. } => "signaled",
        Failure::TimedOut { .. } => "timed-out",
        Failure::MemoryLimit { .. } => "memory-limit",
        Failure::WorkerLost { .. } => "worker-lost",
        Failure::Leaked { .. } => "leaked",
        Failure::System { .. } => "system",
    }
}

/// The failure's reason: the full text, and its first line for the `message` attribute.
fn reason(attempt: &Attempt) -> (String, String, &'static str) {
    match &attempt.failure {
        Some(f) => {
            let full = f.to_string();
            let first = full.lines().next().unwrap_or_default().to_owned();
            (full, first, failure_type(f))
        }
        None => (String::new(), String::new(), "none"),
    }
}

/// `<failure message type>reason</failure>` (or `error`), for the first failed attempt.
fn failure_element(w: &mut Writer<Vec<u8>>, tag: &str, attempt: &Attempt) -> io::Result<()> {
    let (full, first, kind) = reason(attempt);
    let mut el = BytesStart::new(tag);
    el.push_attribute(("message", clean(&first).as_ref()));
    el.push_attribute(("type", kind));
    w.write_event(Event::Start(el))?;
    w.write_event(Event::Text(BytesText::new(&clean(&full))))?;
    w.write_event(Event::End(BytesEnd::new(tag)))
}

/// Surefire's `rerunFailure`/`flakyFailure` (and `*Error`): the reason as `stackTrace`, then
/// that attempt's own output.
fn nested_failure(w: &mut Writer<Vec<u8>>, tag: &str, attempt: &Attempt) -> io::Result<()> {
    let (full, first, kind) = reason(attempt);
    let mut el = BytesStart::new(tag);
    el.push_attribute(("message", clean(&first).as_ref()));
    el.push_attribute(("type", kind));
    w.write_event(Event::Start(el))?;
    text_element(w, "stackTrace", &full)?;
    outputs(w, attempt)?;
    w.write_event(Event::End(BytesEnd::new(tag)))
}

/// `system-out` and `system-err` of an attempt, when it printed anything.
fn outputs(w: &mut Writer<Vec<u8>>, attempt: &Attempt) -> io::Result<()> {
    for (stream, tag) in [
        (Stream::Stdout, "system-out"),
        (Stream::Stderr, "system-err"),
    ] {
        let bytes = attempt.output.stream(stream);
        if !bytes.is_empty() {
            text_element(w, tag, &String::from_utf8_lossy(&bytes))?;
        }
    }
    Ok(())
}

fn skipped(w: &mut Writer<Vec<u8>>, message: Option<&str>) -> io::Result<()> {
    let mut el = BytesStart::new("skipped");
    if let Some(message) = message {
        el.push_attribute(("message", clean(message).as_ref()));
    }
    w.write_event(Event::Empty(el))
}

fn text_element(w: &mut Writer<Vec<u8>>, tag: &str, text: &str) -> io::Result<()> {
    w.write_event(Event::Start(BytesStart::new(tag)))?;
    w.write_event(Event::Text(BytesText::new(&clean(text))))?;
    w.write_event(Event::End(BytesEnd::new(tag)))
}

fn properties(w: &mut Writer<Vec<u8>>, props: &[(&str, String)]) -> io::Result<()> {
    if props.is_empty() {
        return Ok(());
    }
    w.write_event(Event::Start(BytesStart::new("properties")))?;
    for (name, value) in props {
        let mut p = BytesStart::new("property");
        p.push_attribute(("name", *name));
        p.push_attribute(("value", clean(value).as_ref()));
        w.write_event(Event::Empty(p))?;
    }
    w.write_event(Event::End(BytesEnd::new("properties")))
}

/// True for the characters XML 1.0 allows in a document.
fn xml_char(c: char) -> bool {
    matches!(c,
        '\t' | '\n' | '\r'
        | '\u{20}'..='\u{D7FF}'
        | '\u{E000}'..='\u{FFFD}'
        | '\u{10000}'..='\u{10FFFF}')
}

/// `text` with every character XML 1.0 cannot hold written as a Rust escape (`\u{1b}`).
/// Markup characters are left to the writer's escaping.
pub fn clean(text: &str) -> Cow<'_, str> {
    if text.chars().all(xml_char) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if xml_char(c) {
            out.push(c);
        } else {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        }
    }
    Cow::Owned(out)
}

/// Seconds with millisecond precision, as Surefire's schema wants (`1.234`).
fn time(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64())
}

/// `classname` for a test whose module path is unknown: the binary, then the test's modules.
fn derived_classname(suite: &str, name: &str) -> String {
    match name.rsplit_once("::") {
        Some((modules, _)) => format!("{suite}::{modules}"),
        None => suite.to_owned(),
    }
}

/// The machine's name.
fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// A UTC time as `YYYY-MM-DDTHH:MM:SS`, the form Jenkins's schema requires (no zone).
pub fn timestamp(at: SystemTime) -> String {
    let secs = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename, so a
/// reader never sees half a report.
fn write_file(path: &std::path::Path, bytes: &[u8]) -> io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => std::path::Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".dtf-junit-")
        .tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.flush()?;
    // A report is for everyone who reads the build's files (temporary files start private).
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644))?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

impl Reporter for Junit {
    fn run_started(&mut self, info: &RunInfo) -> io::Result<()> {
        self.info = info.clone();
        self.started = SystemTime::now();
        Ok(())
    }

    fn test_finished(&mut self, report: &TestReport) -> io::Result<()> {
        self.reports.push(report.clone());
        Ok(())
    }

    fn run_finished(&mut self, summary: &Summary) -> io::Result<()> {
        let document = self.document(summary)?;
        self.write(&document)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_civil_time() {
        assert_eq!(timestamp(UNIX_EPOCH), "1970-01-01T00:00:00");
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400 + 3661); // 2000-02-29 01:01:01
        assert_eq!(timestamp(t), "2000-02-29T01:01:01");
        let t = UNIX_EPOCH + Duration::from_secs(1_798_761_599); // 2026-12-31 23:59:59
        assert_eq!(timestamp(t), "2026-12-31T23:59:59");
    }

    #[test]
    fn characters_xml_cannot_hold_become_escapes() {
        assert_eq!(clean("plain <&> ]]>"), "plain <&> ]]>");
        assert_eq!(
            clean("a\0b\x1b[31m\u{fffe}"),
            "a\\u{0}b\\u{1b}[31m\\u{fffe}"
        );
        assert_eq!(clean("tab\tnl\ncr\r"), "tab\tnl\ncr\r");
    }

    #[test]
    fn classnames_fall_back_to_the_binary_and_modules() {
        assert_eq!(
            derived_classname("fixture", "nested::deep"),
            "fixture::nested"
        );
        assert_eq!(derived_classname("fixture", "top"), "fixture");
    }
}
