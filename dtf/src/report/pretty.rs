//! libtest's human formats: `pretty` (a line per test) and `terse` (a character per test),
//! with the same `failures:` block and `test result:` line.

use std::io::{self, Write};
use std::time::Duration;

use super::{Reporter, RunInfo, Summary};
use crate::outcome::{Attempt, Failure, Status, TestReport, leak_note};

/// Tests per line in terse output, as libtest.
const TERSE_COLUMNS: usize = 88;

const GREEN: &str = "\x1b[32m";
const RED: &str = "\x1b[31m";
const YELLOW: &str = "\x1b[33m";
const RESET: &str = "\x1b[0m";

/// The pretty and terse reporter.
pub struct Pretty {
    out: Box<dyn Write + Send>,
    terse: bool,
    color: bool,
    show_output: bool,
    /// With one test at a time libtest prints `test NAME ... ` when the test starts.
    announce_start: bool,
    total: usize,
    done: usize,
    failures: Vec<TestReport>,
    successes: Vec<TestReport>,
}

impl Pretty {
    /// A reporter writing to `out`.
    pub fn new(out: Box<dyn Write + Send>, terse: bool, color: bool, show_output: bool) -> Pretty {
        Pretty {
            out,
            terse,
            color,
            show_output,
            announce_start: false,
            total: 0,
            done: 0,
            failures: Vec::new(),
            successes: Vec::new(),
        }
    }

    fn paint(&self, text: &str, color: &str) -> String {
        if self.color {
            format!("{color}{text}{RESET}")
        } else {
            text.to_owned()
        }
    }

    /// The status word with its notes: `ok (FLAKY: passed on attempt 2; leaked 1 process:
    /// sleep)`.
    fn word(&self, report: &TestReport) -> Option<String> {
        let word = self.status_word(report)?;
        let mut notes = Vec::new();
        if report.status == Status::Unchanged {
            notes.push("unchanged".to_owned());
        }
        if report.status == Status::Flaky {
            notes.push(format!(
                "FLAKY: passed on attempt {}",
                report.attempts.len()
            ));
        }
        if report.rerun_after_lost_worker {
            notes.push("rerun after a lost worker".to_owned());
        }
        let leaked = report.leaked();
        let leak_failed = report
            .last()
            .is_some_and(|a| matches!(a.failure, Some(Failure::Leaked { .. })));
        if !leaked.is_empty() && !leak_failed {
            notes.push(leak_note(&leaked));
        }
        Some(if notes.is_empty() {
            word
        } else {
            format!("{word} ({})", self.paint(&notes.join("; "), YELLOW))
        })
    }

    fn status_word(&self, report: &TestReport) -> Option<String> {
        Some(match &report.status {
            Status::Passed | Status::Flaky | Status::Unchanged => self.paint("ok", GREEN),
            Status::Failed => self.paint("FAILED", RED),
            Status::Ignored { reason: None } => self.paint("ignored", YELLOW),
            Status::Ignored {
                reason: Some(reason),
            } => format!("{}, {reason}", self.paint("ignored", YELLOW)),
            Status::NotRun => return None,
        })
    }

    fn short(&self, report: &TestReport) -> Option<String> {
        Some(match &report.status {
            Status::Passed => ".".to_owned(),
            Status::Unchanged => self.paint("u", GREEN),
            Status::Flaky => self.paint("f", YELLOW),
            Status::Failed => self.paint("F", RED),
            Status::Ignored { .. } => self.paint("i", YELLOW),
            Status::NotRun => return None,
        })
    }

    fn write_outputs(&mut self, heading: &str, reports: &[TestReport]) -> io::Result<()> {
        write!(self.out, "\n{heading}:\n")?;
        let mut sections = Vec::new();
        for report in reports {
            let count = report.attempts.len();
            for (i, attempt) in report.attempts.iter().enumerate() {
                let text = attempt_text(attempt);
                if text.is_empty() {
                    continue;
                }
                let title = if count > 1 {
                    format!(
                        "---- {} stdout (attempt {} of {count}) ----\n",
                        report.name,
                        i + 1
                    )
                } else {
                    format!("---- {} stdout ----\n", report.name)
                };
                sections.push(title.into_bytes());
                sections.push(text);
                sections.push(b"\n".to_vec());
            }
        }
        if !sections.is_empty() {
            self.out.write_all(b"\n")?;
            for s in sections {
                self.out.write_all(&s)?;
            }
        }
        write!(self.out, "\n{heading}:\n")?;
        let mut names: Vec<&str> = reports.iter().map(|r| r.name.as_str()).collect();
        names.sort_unstable();
        for name in names {
            writeln!(self.out, "    {name}")?;
        }
        Ok(())
    }
}

/// What the failures block shows for one attempt: its output, then a note with the reason
/// when the output does not already say it, and where it ran.
fn attempt_text(attempt: &Attempt) -> Vec<u8> {
    let mut text = attempt.output.combined();
    if let Some(failure) = &attempt.failure {
        if !failure.is_in_output() {
            text.extend_from_slice(format!("note: {failure}\n").as_bytes());
        }
    }
    if attempt.failure.is_some() {
        if let Some(worker) = &attempt.worker {
            text.extend_from_slice(format!("note: ran on worker {worker}\n").as_bytes());
        }
        if let Some(dir) = &attempt.kept_tmp {
            text.extend_from_slice(format!("note: temporary directory kept at {dir}\n").as_bytes());
        }
    }
    text
}

impl Reporter for Pretty {
    fn run_started(&mut self, info: &RunInfo) -> io::Result<()> {
        self.total = info.total;
        self.announce_start = info.slots == 1 && !self.terse;
        let noun = if info.total == 1 { "test" } else { "tests" };
        // libtest's wording for a shuffled run, so the seed can be replayed.
        let seed = info
            .shuffle_seed
            .map(|seed| format!(" (shuffle seed: {seed})"))
            .unwrap_or_default();
        write!(self.out, "\nrunning {} {noun}{seed}\n", info.total)?;
        self.out.flush()
    }

    fn test_started(&mut self, name: &str) -> io::Result<()> {
        if self.announce_start {
            write!(self.out, "test {name} ... ")?;
            self.out.flush()?;
        }
        Ok(())
    }

    fn test_slow(&mut self, name: &str, threshold: Duration) -> io::Result<()> {
        // libtest's line, in every format and also after a single-slot `test NAME ... `.
        let secs = threshold.as_secs();
        let over = if threshold.subsec_nanos() != 0 {
            crate::outcome::format_duration(threshold)
        } else if secs == 1 {
            "1 second".to_owned()
        } else {
            format!("{secs} seconds")
        };
        writeln!(self.out, "test {name} has been running for over {over}")?;
        self.out.flush()
    }

    fn test_finished(&mut self, report: &TestReport) -> io::Result<()> {
        match report.status {
            Status::Failed => self.failures.push(report.clone()),
            Status::Passed | Status::Flaky if self.show_output => {
                self.successes.push(report.clone())
            }
            _ => {}
        }
        if self.terse {
            if let Some(c) = self.short(report) {
                write!(self.out, "{c}")?;
                if self.done % TERSE_COLUMNS == TERSE_COLUMNS - 1 {
                    writeln!(self.out, " {}/{}", self.done + 1, self.total)?;
                }
                self.done += 1;
            }
        } else if let Some(word) = self.word(report) {
            let ran_at_start = self.announce_start
                && !matches!(report.status, Status::Ignored { .. } | Status::NotRun);
            if ran_at_start {
                writeln!(self.out, "{word}")?;
            } else {
                writeln!(self.out, "test {} ... {word}", report.name)?;
            }
        }
        self.out.flush()
    }

    fn run_finished(&mut self, summary: &Summary) -> io::Result<()> {
        if self.terse && self.done % TERSE_COLUMNS != 0 {
            writeln!(self.out)?;
        }
        if self.show_output && !self.successes.is_empty() {
            let successes = std::mem::take(&mut self.successes);
            self.write_outputs("successes", &successes)?;
        }
        if !self.failures.is_empty() {
            let failures = std::mem::take(&mut self.failures);
            self.write_outputs("failures", &failures)?;
        }
        let ok = summary.failed == 0 && summary.not_run == 0;
        let word = if ok {
            self.paint("ok", GREEN)
        } else {
            self.paint("FAILED", RED)
        };
        write!(
            self.out,
            "\ntest result: {word}. {} passed; {} failed; {} ignored; 0 measured; {} filtered out; finished in {:.2}s",
            summary.passed,
            summary.failed,
            summary.ignored,
            summary.filtered_out,
            summary.duration.as_secs_f64()
        )?;
        if summary.flaky > 0 {
            write!(self.out, "; {} flaky", summary.flaky)?;
        }
        if summary.not_run > 0 {
            write!(self.out, "; {} not run", summary.not_run)?;
        }
        if summary.unchanged > 0 {
            write!(self.out, "; {} unchanged", summary.unchanged)?;
        }
        writeln!(self.out)?;
        for note in &summary.notes {
            writeln!(self.out, "{note}")?;
        }
        writeln!(self.out)?;
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::Failure;
    use crate::report::SharedBuf;

    fn attempt(failure: Option<Failure>, leaked: &[&str]) -> Attempt {
        Attempt {
            failure,
            duration: Duration::from_millis(3),
            output: Default::default(),
            worker: None,
            kept_tmp: None,
            leaked: leaked.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn line_of(report: TestReport) -> String {
        let buf = SharedBuf::default();
        let mut pretty = Pretty::new(Box::new(buf.clone()), false, false, false);
        pretty.test_finished(&report).unwrap();
        let bytes = buf.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn leaks_are_a_note_combined_with_the_others() {
        let leaked = TestReport {
            name: "t".into(),
            status: Status::Passed,
            attempts: vec![attempt(None, &["sleep"])],
            rerun_after_lost_worker: false,
        };
        assert_eq!(line_of(leaked), "test t ... ok (leaked 1 process: sleep)\n");
        let flaky = TestReport {
            name: "t".into(),
            status: Status::Flaky,
            attempts: vec![
                attempt(Some(Failure::Signaled { signal: 9 }), &[]),
                attempt(None, &["sleep"]),
            ],
            rerun_after_lost_worker: false,
        };
        assert_eq!(
            line_of(flaky),
            "test t ... ok (FLAKY: passed on attempt 2; leaked 1 process: sleep)\n"
        );
        let two = TestReport {
            name: "t".into(),
            status: Status::Passed,
            attempts: vec![attempt(None, &["sh", "sleep\n"])],
            rerun_after_lost_worker: false,
        };
        assert_eq!(
            line_of(two),
            "test t ... ok (leaked 2 processes: sh, sleep\\n)\n"
        );
    }
}
