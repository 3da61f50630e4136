//! libtest's JSON event stream (`--format json`), one object per line, with libtest's field
//! names, types, spacing and key order, so tools that read `cargo test -- --format json`
//! (IDEs, CI converters) read dtf's output unchanged.
//!
//! dtf adds what libtest has no word for in one extra key, `"dtf"`, present only when there is
//! something to say (the way cargo-nextest's `libtest-json-plus` adds `"nextest"`). Readers
//! that deserialise events with serde ignore unknown keys; event names stay libtest's own:
//! - a flaky test is `ok` with `"dtf": { "flaky": true, "attempts": [...] }`, every failed
//!   attempt with its `exec_time`, `message` and `stdout`;
//! - a test that failed after retries lists its earlier attempts the same way;
//! - a test that never ran because the run stopped early (`--fail-fast`, an interrupt) is
//!   `ignored` with a `message` and `"dtf": { "not_run": true }`, and counts as ignored in the
//!   final suite event, so `passed + failed + ignored` is still `test_count`;
//! - a test that `cargo dtf --skip-unchanged` did not run because it passed last time with the
//!   same binary, input tree, environment and arguments is `ok` with no `exec_time` and
//!   `"dtf": { "unchanged": true }`, and counts as passed;
//! - a test that ran on a remote worker has `"dtf": { "worker": "host:port" }`;
//! - a test that left processes running outside its process group has
//!   `"dtf": { "leaked": ["sleep"] }` (the names of those processes, which were killed);
//! - in a run of several binaries (`cargo dtf`) every test event names its binary:
//!   `"dtf": { "binary": "integration", "package": "my-pkg", "binary_id":
//!   "my-pkg::integration", "test": "parses_empty_input" }`, and `name` is
//!   `BINARY_ID TEST`.

use std::collections::HashSet;
use std::io::{self, Write};
use std::time::Duration;

use serde_json::Value;

use super::{Reporter, RunInfo, Summary};
use crate::outcome::{Attempt, Status, TestReport};

/// The message of a test that did not run because the run stopped early.
pub const NOT_RUN_MESSAGE: &str = "not run: the run stopped before this test finished";

/// The JSON reporter.
pub struct Json {
    out: Box<dyn Write + Send>,
    show_output: bool,
    started: HashSet<String>,
    origins: std::collections::HashMap<String, super::Origin>,
}

impl Json {
    /// A reporter writing to `out`; with `show_output`, passing tests carry their output too
    /// (libtest's `--show-output`).
    pub fn new(out: Box<dyn Write + Send>, show_output: bool) -> Json {
        Json {
            out,
            show_output,
            started: HashSet::new(),
            origins: Default::default(),
        }
    }

    fn line(&mut self, line: &str) -> io::Result<()> {
        self.out.write_all(line.as_bytes())?;
        self.out.write_all(b"\n")?;
        self.out.flush()
    }

    fn started(&mut self, name: &str) -> io::Result<()> {
        if self.started.insert(name.to_owned()) {
            self.line(&format!(
                r#"{{ "type": "test", "event": "started", "name": {} }}"#,
                string(name)
            ))?;
        }
        Ok(())
    }
}

/// A JSON string literal.
fn string(s: &str) -> String {
    Value::from(s).to_string()
}

/// Seconds as libtest prints them: `Duration::as_secs_f64` through `Display`, which never
/// uses an exponent.
fn secs(d: Duration) -> String {
    format!("{}", d.as_secs_f64())
}

/// The captured output of an attempt as one string (invalid UTF-8 replaced).
fn output_text(attempt: &Attempt) -> String {
    String::from_utf8_lossy(&attempt.output.combined()).into_owned()
}

/// The `message` for a failed attempt: libtest's own for `should_panic` failures, dtf's reason
/// for failures libtest cannot have (a signal, a timeout, ...). Panics and `Err` returns
/// carry their reason in `stdout`, as in libtest.
fn message(attempt: &Attempt) -> Option<String> {
    attempt
        .failure
        .as_ref()
        .filter(|f| !f.is_in_output())
        .map(ToString::to_string)
}

/// An attempt in the `"dtf"` extension.
fn attempt_json(attempt: &Attempt) -> Value {
    let mut a = serde_json::Map::new();
    let event = if attempt.passed() { "ok" } else { "failed" };
    a.insert("event".into(), event.into());
    a.insert("exec_time".into(), attempt.duration.as_secs_f64().into());
    if let Some(message) = message(attempt) {
        a.insert("message".into(), message.into());
    }
    let stdout = output_text(attempt);
    if !stdout.is_empty() {
        a.insert("stdout".into(), stdout.into());
    }
    if let Some(worker) = &attempt.worker {
        a.insert("worker".into(), worker.clone().into());
    }
    Value::Object(a)
}

impl Reporter for Json {
    fn run_started(&mut self, info: &RunInfo) -> io::Result<()> {
        self.origins = info.origins.clone();
        let seed = info
            .shuffle_seed
            .map(|s| format!(r#", "shuffle_seed": {s}"#))
            .unwrap_or_default();
        self.line(&format!(
            r#"{{ "type": "suite", "event": "started", "test_count": {}{seed} }}"#,
            info.total
        ))
    }

    fn test_started(&mut self, name: &str) -> io::Result<()> {
        self.started(name)
    }

    fn test_slow(&mut self, name: &str, _threshold: Duration) -> io::Result<()> {
        self.line(&format!(
            r#"{{ "type": "test", "event": "timeout", "name": {} }}"#,
            string(name)
        ))
    }

    fn test_finished(&mut self, report: &TestReport) -> io::Result<()> {
        // libtest announces every test, ignored ones included, before its result.
        self.started(&report.name)?;
        let mut fields = String::new();
        let mut dtf = serde_json::Map::new();
        let event = match &report.status {
            Status::Passed | Status::Flaky | Status::Failed => {
                let last = report.last();
                let failed = report.status == Status::Failed;
                if let Some(last) = last {
                    // All attempts together: what the test cost the run.
                    fields.push_str(&format!(r#", "exec_time": {}"#, secs(report.duration())));
                    let stdout = output_text(last);
                    if (failed || self.show_output) && !stdout.is_empty() {
                        fields.push_str(&format!(r#", "stdout": {}"#, string(&stdout)));
                    }
                    if let Some(message) = message(last).filter(|_| failed) {
                        fields.push_str(&format!(r#", "message": {}"#, string(&message)));
                    }
                    if let Some(worker) = &last.worker {
                        dtf.insert("worker".into(), worker.clone().into());
                    }
                }
                if report.status == Status::Flaky {
                    dtf.insert("flaky".into(), true.into());
                }
                let leaked = report.leaked();
                if !leaked.is_empty() {
                    dtf.insert("leaked".into(), leaked.into());
                }
                if report.attempts.len() > 1 {
                    let attempts = report.attempts.iter().map(attempt_json).collect();
                    dtf.insert("attempts".into(), Value::Array(attempts));
                }
                if failed { "failed" } else { "ok" }
            }
            Status::Ignored { reason } => {
                if let Some(reason) = reason {
                    fields.push_str(&format!(r#", "message": {}"#, string(reason)));
                }
                "ignored"
            }
            Status::NotRun => {
                fields.push_str(&format!(r#", "message": {}"#, string(NOT_RUN_MESSAGE)));
                dtf.insert("not_run".into(), true.into());
                "ignored"
            }
            Status::Unchanged => {
                dtf.insert("unchanged".into(), true.into());
                "ok"
            }
        };
        if let Some(origin) = self.origins.get(&report.name) {
            dtf.insert("binary".into(), origin.binary.clone().into());
            dtf.insert("package".into(), origin.package.clone().into());
            dtf.insert("binary_id".into(), origin.binary_id.clone().into());
            dtf.insert("test".into(), origin.test.clone().into());
        }
        if !dtf.is_empty() {
            fields.push_str(&format!(r#", "dtf": {}"#, Value::Object(dtf)));
        }
        self.line(&format!(
            r#"{{ "type": "test", "name": {}, "event": "{event}"{fields} }}"#,
            string(&report.name)
        ))
    }

    fn run_finished(&mut self, summary: &Summary) -> io::Result<()> {
        let ok = summary.failed == 0 && summary.not_run == 0;
        self.line(&format!(
            r#"{{ "type": "suite", "event": "{}", "passed": {}, "failed": {}, "ignored": {}, "measured": 0, "filtered_out": {}, "exec_time": {} }}"#,
            if ok { "ok" } else { "failed" },
            summary.passed,
            summary.failed,
            summary.ignored + summary.not_run,
            summary.filtered_out,
            secs(summary.duration)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::{Failure, Output, Stream};
    use serde_json::json;

    use crate::report::SharedBuf as Buf;

    fn attempt(failure: Option<Failure>, out: &[u8]) -> Attempt {
        let mut output = Output::default();
        output.push(Stream::Stdout, out, 1 << 20);
        Attempt {
            failure,
            duration: Duration::from_millis(1500),
            output,
            worker: None,
            kept_tmp: None,
            leaked: Vec::new(),
        }
    }

    fn lines(reports: &[TestReport]) -> Vec<Value> {
        let buf = Buf::default();
        let mut json = Json::new(Box::new(buf.clone()), false);
        json.run_started(&RunInfo {
            total: reports.len(),
            shuffle_seed: Some(7),
            ..RunInfo::default()
        })
        .unwrap();
        let mut summary = Summary::default();
        for r in reports {
            json.test_finished(r).unwrap();
            summary.add(r);
        }
        json.run_finished(&summary).unwrap();
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn events_have_libtests_shapes_and_dtfs_extension() {
        let flaky = TestReport {
            name: "f\"q".into(),
            status: Status::Flaky,
            attempts: vec![
                attempt(Some(Failure::Signaled { signal: 9 }), b"first\xff"),
                attempt(None, b""),
            ],
            rerun_after_lost_worker: false,
        };
        let not_run = TestReport {
            name: "n".into(),
            status: Status::NotRun,
            attempts: vec![],
            rerun_after_lost_worker: false,
        };
        let v = lines(&[flaky, not_run]);
        assert_eq!(
            v[0],
            json!({"type": "suite", "event": "started", "test_count": 2, "shuffle_seed": 7})
        );
        assert_eq!(
            v[1],
            json!({"type": "test", "event": "started", "name": "f\"q"})
        );
        assert_eq!(v[2]["event"], "ok");
        assert_eq!(v[2]["exec_time"], 3.0, "all attempts together");
        assert!(
            v[2].get("stdout").is_none(),
            "ok without --show-output has no stdout"
        );
        assert_eq!(v[2]["dtf"]["flaky"], true);
        assert_eq!(
            v[2]["dtf"]["attempts"][0]["message"],
            "killed by signal 9 (SIGKILL)"
        );
        assert_eq!(v[2]["dtf"]["attempts"][0]["stdout"], "first\u{fffd}");
        assert_eq!(v[4]["event"], "ignored");
        assert_eq!(v[4]["dtf"]["not_run"], true);
        assert_eq!(v[5]["event"], "failed");
        assert_eq!(v[5]["passed"], 1);
        assert_eq!(v[5]["ignored"], 1);
    }

    #[test]
    fn leaked_processes_are_named_under_dtf() {
        let mut leaky = attempt(None, b"");
        leaky.leaked = vec!["sleep".into()];
        let report = TestReport {
            name: "l".into(),
            status: Status::Passed,
            attempts: vec![leaky],
            rerun_after_lost_worker: false,
        };
        let v = lines(&[report]);
        assert_eq!(v[2]["event"], "ok");
        assert_eq!(v[2]["dtf"]["leaked"], json!(["sleep"]));
    }
}
