//! One self-contained HTML page for a run (`--html PATH`, `DTF_HTML`): a summary bar, one row
//! per test with its status, duration, binary, worker and attempts, failures first with their
//! output folded open, and a filter box. No external assets: the style and the few lines of
//! script are inline, so the page opens anywhere (a CI artifact, a mail attachment).

use std::fmt::Write as _;
use std::io;
use std::path::PathBuf;

use super::{Reporter, RunInfo, Summary};
use crate::outcome::{Attempt, Status, TestReport, format_duration};

/// The variable naming the page's path.
pub const HTML_VAR: &str = "DTF_HTML";

/// The HTML reporter: collects the run, writes the page at its end.
pub struct Html {
    path: PathBuf,
    info: RunInfo,
    reports: Vec<TestReport>,
}

impl Html {
    /// A reporter writing the page to `path`.
    pub fn new(path: PathBuf) -> Html {
        Html {
            path,
            info: RunInfo::default(),
            reports: Vec::new(),
        }
    }

    /// The page for the reports collected so far.
    pub fn page(&self, summary: &Summary) -> String {
        let mut rows: Vec<&TestReport> = self.reports.iter().collect();
        // Failures first, then flaky, not run, passed, ignored; by name within each.
        rows.sort_by(|a, b| rank(a).cmp(&rank(b)).then_with(|| a.name.cmp(&b.name)));
        let ok = summary.failed == 0 && summary.not_run == 0;
        let mut body = String::new();
        let verdict = if ok { "passed" } else { "failed" };
        let _ = writeln!(
            body,
            "<header class=\"bar {verdict}\"><h1>{}</h1><p class=\"counts\">\
             <span class=\"c-pass\">{} passed</span> · <span class=\"c-fail\">{} failed</span> · \
             <span class=\"c-flaky\">{} flaky</span> · {} ignored · {} not run · {} filtered out · \
             {}</p></header>",
            if ok { "Run passed" } else { "Run failed" },
            summary.passed,
            summary.failed,
            summary.flaky,
            summary.ignored,
            summary.not_run,
            summary.filtered_out,
            esc(&format_duration(summary.duration)),
        );
        if !summary.notes.is_empty() {
            body.push_str("<ul class=\"notes\">");
            for note in &summary.notes {
                let _ = write!(body, "<li>{}</li>", esc(note));
            }
            body.push_str("</ul>\n");
        }
        body.push_str(
            "<p><label for=\"filter\">Filter</label> <input id=\"filter\" type=\"search\" \
             placeholder=\"name, binary, status or worker\" autocomplete=\"off\"></p>\n\
             <table id=\"tests\"><thead><tr><th>Status</th><th>Test</th><th>Binary</th>\
             <th>Duration</th><th>Worker</th><th>Attempts</th></tr></thead>\n<tbody>\n",
        );
        for report in rows {
            self.row(&mut body, report);
        }
        body.push_str("</tbody></table>\n");
        format!(
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
             <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
             <title>dtf: {} — {}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n{body}\
             <script>{SCRIPT}</script>\n</body>\n</html>\n",
            esc(&self.info.suite),
            verdict
        )
    }

    fn row(&self, body: &mut String, report: &TestReport) {
        let (class, label) = match &report.status {
            Status::Passed => ("pass", "ok".to_owned()),
            Status::Flaky => ("flaky", "FLAKY".to_owned()),
            Status::Failed => ("fail", "FAILED".to_owned()),
            Status::Ignored { .. } => ("ignored", "ignored".to_owned()),
            Status::NotRun => ("notrun", "not run".to_owned()),
            Status::Unchanged => ("pass", "ok (unchanged)".to_owned()),
        };
        let origin = self.info.origins.get(&report.name);
        let name = origin.map_or(report.name.as_str(), |o| o.test.as_str());
        let binary = origin.map_or(self.info.suite.as_str(), |o| o.binary_id.as_str());
        let mut workers: Vec<String> = Vec::new();
        for a in &report.attempts {
            let w = a.worker.clone().unwrap_or_else(|| "local".to_owned());
            if !workers.contains(&w) {
                workers.push(w);
            }
        }
        let _ = writeln!(
            body,
            "<tr class=\"test {class}\"><td class=\"status\">{}</td><td class=\"name\">{}</td>\
             <td>{}</td><td class=\"num\">{}</td><td>{}</td><td class=\"num\">{}</td></tr>",
            esc(&label),
            esc(name),
            esc(binary),
            if report.attempts.is_empty() {
                String::new()
            } else {
                esc(&format_duration(report.duration()))
            },
            esc(&workers.join(", ")),
            report.attempts.len()
        );
        let failed: Vec<(usize, &Attempt)> = report
            .attempts
            .iter()
            .enumerate()
            .filter(|(_, a)| !a.passed())
            .collect();
        let reason = match &report.status {
            Status::Ignored { reason: Some(r) } => Some(r.clone()),
            _ => None,
        };
        if failed.is_empty() && reason.is_none() {
            return;
        }
        // Failures are folded open; a flaky test's failed attempts start folded.
        let open = if report.status == Status::Failed {
            " open"
        } else {
            ""
        };
        let _ = write!(
            body,
            "<tr class=\"detail {class}\"><td colspan=\"6\"><details{open}><summary>{}</summary>",
            if let Some(reason) = &reason {
                esc(reason)
            } else {
                format!("{} failed attempt(s)", failed.len())
            }
        );
        for (i, attempt) in failed {
            let message = attempt
                .failure
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default();
            let output = String::from_utf8_lossy(&attempt.output.combined()).into_owned();
            let _ = write!(
                body,
                "<p class=\"failure\">attempt {} · {}{}: <span class=\"message\">{}</span></p>",
                i + 1,
                esc(&format_duration(attempt.duration)),
                attempt
                    .worker
                    .as_ref()
                    .map(|w| format!(" on {}", esc(w)))
                    .unwrap_or_default(),
                esc(&message)
            );
            if !output.is_empty() {
                let _ = write!(body, "<pre>{}</pre>", esc(&output));
            }
        }
        body.push_str("</details></td></tr>\n");
    }
}

fn rank(report: &TestReport) -> u8 {
    match report.status {
        Status::Failed => 0,
        Status::Flaky => 1,
        Status::NotRun => 2,
        Status::Passed | Status::Unchanged => 3,
        Status::Ignored { .. } => 4,
    }
}

/// Escapes text for HTML content and attribute values, and drops control characters a test's
/// output may hold (which are not allowed in HTML), keeping newlines and tabs.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            '\n' | '\t' => out.push(c),
            c if c.is_control() => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:0 1.5em 2em;color:#222}\
.bar{padding:.6em 1em;margin:0 -1.5em 1em;color:#fff}.bar h1{margin:0;font-size:1.3em}\
.bar p{margin:.2em 0 0}.bar.passed{background:#2e7d32}.bar.failed{background:#c62828}\
table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:.25em .6em;\
border-bottom:1px solid #ddd;vertical-align:top}td.num{text-align:right;white-space:nowrap}\
td.name{font-family:ui-monospace,monospace}tr.fail td.status{color:#c62828;font-weight:bold}\
tr.flaky td.status{color:#ef6c00;font-weight:bold}tr.pass td.status{color:#2e7d32}\
tr.ignored td.status,tr.notrun td.status{color:#777}tr.detail td{background:#fafafa}\
pre{white-space:pre-wrap;word-break:break-word;background:#f3f3f3;padding:.5em;margin:.3em 0;\
max-height:30em;overflow:auto}.message{font-family:ui-monospace,monospace}\
#filter{width:28em;max-width:90%;padding:.3em}.notes{color:#555}";

const SCRIPT: &str = "(function(){var box=document.getElementById('filter');\
box.addEventListener('input',function(){var q=box.value.toLowerCase();\
var rows=document.querySelectorAll('#tests tbody tr.test');\
for(var i=0;i<rows.length;i++){var r=rows[i];var show=r.textContent.toLowerCase().indexOf(q)>=0;\
r.style.display=show?'':'none';var d=r.nextElementSibling;\
if(d&&d.classList.contains('detail')){d.style.display=show?'':'none';}}});})();";

impl Reporter for Html {
    fn run_started(&mut self, info: &RunInfo) -> io::Result<()> {
        self.info = info.clone();
        Ok(())
    }

    fn test_finished(&mut self, report: &TestReport) -> io::Result<()> {
        self.reports.push(report.clone());
        Ok(())
    }

    fn run_finished(&mut self, summary: &Summary) -> io::Result<()> {
        let page = self.page(summary);
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = self.path.with_extension("html.tmp");
        std::fs::write(&tmp, page)
            .and_then(|()| std::fs::rename(&tmp, &self.path))
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot write the HTML report {}: {e}", self.path.display()),
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::{Failure, Output, Stream};
    use std::time::Duration;

    #[test]
    fn failures_come_first_folded_open_and_everything_is_escaped() {
        let mut html = Html::new(PathBuf::from("unused.html"));
        html.run_started(&RunInfo {
            suite: "s".into(),
            ..RunInfo::default()
        })
        .unwrap();
        let mut output = Output::default();
        output.push(
            Stream::Stderr,
            b"<script>alert(1)</script>\x1b[31m",
            1 << 20,
        );
        let attempt = |failure| Attempt {
            failure,
            duration: Duration::from_millis(5),
            output: output.clone(),
            worker: Some("w:1".into()),
            kept_tmp: None,
            leaked: Vec::new(),
        };
        for (name, status, failure) in [
            ("a_passes", Status::Passed, None),
            (
                "z_fails",
                Status::Failed,
                Some(Failure::Panicked {
                    message: "boom & <bust>".into(),
                }),
            ),
        ] {
            html.test_finished(&TestReport {
                name: name.into(),
                status,
                attempts: vec![attempt(failure)],
                rerun_after_lost_worker: false,
            })
            .unwrap();
        }
        let page = html.page(&Summary {
            passed: 1,
            failed: 1,
            ..Summary::default()
        });
        assert!(page.find("z_fails").unwrap() < page.find("a_passes").unwrap());
        assert!(page.contains("<details open>"), "{page}");
        assert!(page.contains("boom &amp; &lt;bust&gt;"));
        assert!(!page.contains("<script>alert"));
        assert!(!page.contains('\x1b'));
        assert!(page.contains("Run failed"));
    }
}
