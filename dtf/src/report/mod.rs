//! Reporters: turn the run's events into libtest's pretty and terse output (and, in sibling
//! modules, JSON and JUnit). Every reporter sees the same events in the same order.

pub mod html;
pub mod json;
pub mod junit;
pub mod pretty;
pub mod progress;

use std::io::{self, Write};
use std::time::Duration;

use crate::outcome::{Status, TestReport};

/// Facts about the run, known before any test starts.
#[derive(Clone, Debug, Default)]
pub struct RunInfo {
    /// The binary's name (the JUnit suite name).
    pub suite: String,
    /// Tests selected (to run or to report as ignored).
    pub total: usize,
    /// Tests removed by filters.
    pub filtered_out: usize,
    /// Tests that may run at once.
    pub slots: usize,
    /// The seed of a random order (`--order random`), printed so the order can be replayed.
    pub shuffle_seed: Option<u64>,
    /// In a run of several binaries (`cargo dtf`): where each test comes from, by the name
    /// its reports carry. Empty for a single binary's run.
    pub origins: std::collections::HashMap<String, Origin>,
}

/// Where a test of a run of several binaries comes from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Origin {
    /// The binary's id, as nextest spells it: `my-pkg` for a library's unit tests,
    /// `my-pkg::integration` for `tests/integration.rs`, `my-pkg::bin/name`, ...
    pub binary_id: String,
    /// The binary's target name (`integration`).
    pub binary: String,
    /// The package's name.
    pub package: String,
    /// The test's own name in its binary (`module::test`).
    pub test: String,
}

/// The counts of a finished run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Passed on the first attempt, plus flaky tests.
    pub passed: usize,
    /// Failed every attempt.
    pub failed: usize,
    /// Ignored.
    pub ignored: usize,
    /// Passed after failing (included in `passed`).
    pub flaky: usize,
    /// Never ran (the run stopped early).
    pub not_run: usize,
    /// Passed last time and unchanged since, so not run (included in `passed`).
    pub unchanged: usize,
    /// Filtered out.
    pub filtered_out: usize,
    /// Wall time of the run.
    pub duration: Duration,
    /// Extra lines dtf prints after the summary (distributed runs, notices).
    pub notes: Vec<String>,
}

impl Summary {
    /// Counts one finished test.
    pub fn add(&mut self, report: &TestReport) {
        match report.status {
            Status::Passed => self.passed += 1,
            Status::Flaky => {
                self.passed += 1;
                self.flaky += 1;
            }
            Status::Failed => self.failed += 1,
            Status::Ignored { .. } => self.ignored += 1,
            Status::NotRun => self.not_run += 1,
            Status::Unchanged => {
                self.passed += 1;
                self.unchanged += 1;
            }
        }
    }

    /// The run's success, as the exit code sees it.
    pub fn success(&self, flaky_fails: bool) -> bool {
        self.failed == 0 && self.not_run == 0 && !(flaky_fails && self.flaky > 0)
    }
}

/// Receives the events of a run.
pub trait Reporter {
    /// Before any test starts.
    fn run_started(&mut self, info: &RunInfo) -> io::Result<()>;
    /// A test's first attempt started.
    fn test_started(&mut self, _name: &str) -> io::Result<()> {
        Ok(())
    }
    /// A test has run longer than the slow threshold.
    fn test_slow(&mut self, _name: &str, _threshold: Duration) -> io::Result<()> {
        Ok(())
    }
    /// A test is done (all its attempts), or was ignored, or will not run.
    fn test_finished(&mut self, report: &TestReport) -> io::Result<()>;
    /// After the last test.
    fn run_finished(&mut self, summary: &Summary) -> io::Result<()>;
}

/// Sends every event to several reporters. A reporter whose output is gone (a closed pipe)
/// is dropped quietly; the others go on.
///
/// While a [`Gate`] holds them ([`Reporters::hold`]), events are kept in order rather than
/// shown, and shown with the first event after the gate opens.
#[derive(Default)]
pub struct Reporters {
    reporters: Vec<Box<dyn Reporter>>,
    held: Option<(Gate, Vec<Event>)>,
}

/// An event kept while the reporters are held.
enum Event {
    RunStarted(RunInfo),
    TestStarted(String),
    TestSlow(String, Duration),
    TestFinished(TestReport),
}

impl Reporters {
    /// Adds a reporter.
    pub fn push(&mut self, reporter: Box<dyn Reporter>) {
        self.reporters.push(reporter);
    }

    /// Keeps every event until `gate` opens; a gate that closes drops them.
    pub fn hold(&mut self, gate: Gate) {
        self.held = Some((gate, Vec::new()));
    }

    /// Keeps `event` while the gate is undecided, drops it once the gate closed (true for
    /// both); after it opened, shows what was kept (false: show `event` too).
    fn keep(&mut self, event: impl FnOnce() -> Event) -> bool {
        match &mut self.held {
            None => false,
            Some((gate, events)) => match gate.state() {
                None => {
                    events.push(event());
                    true
                }
                Some(false) => true,
                Some(true) => {
                    self.release();
                    false
                }
            },
        }
    }

    /// Shows what was kept, and keeps nothing more.
    fn release(&mut self) {
        let Some((_, kept)) = self.held.take() else {
            return;
        };
        for event in kept {
            match event {
                Event::RunStarted(info) => self.run_started(&info),
                Event::TestStarted(name) => self.test_started(&name),
                Event::TestSlow(name, threshold) => self.test_slow(&name, threshold),
                Event::TestFinished(report) => self.test_finished(&report),
            }
        }
    }

    fn each(&mut self, mut f: impl FnMut(&mut dyn Reporter) -> io::Result<()>) {
        self.reporters.retain_mut(|r| match f(r.as_mut()) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => false,
            Err(e) => {
                eprintln!("dtf: cannot write a report: {e}");
                false
            }
        });
    }

    /// See [`Reporter::run_started`].
    pub fn run_started(&mut self, info: &RunInfo) {
        if !self.keep(|| Event::RunStarted(info.clone())) {
            self.each(|r| r.run_started(info));
        }
    }

    /// See [`Reporter::test_started`].
    pub fn test_started(&mut self, name: &str) {
        if !self.keep(|| Event::TestStarted(name.to_owned())) {
            self.each(|r| r.test_started(name));
        }
    }

    /// See [`Reporter::test_slow`].
    pub fn test_slow(&mut self, name: &str, threshold: Duration) {
        if !self.keep(|| Event::TestSlow(name.to_owned(), threshold)) {
            self.each(|r| r.test_slow(name, threshold));
        }
    }

    /// See [`Reporter::test_finished`].
    pub fn test_finished(&mut self, report: &TestReport) {
        if !self.keep(|| Event::TestFinished(report.clone())) {
            self.each(|r| r.test_finished(report));
        }
    }

    /// See [`Reporter::run_finished`]. The run's end is never kept: a held run waits for its
    /// gate to open before it ends (see [`Gate::decided`]); shown here, it shows what was kept
    /// first.
    pub fn run_finished(&mut self, summary: &Summary) {
        if let Some((gate, _)) = &self.held {
            if gate.state() == Some(false) {
                return;
            }
        }
        self.release();
        self.each(|r| r.run_finished(summary));
    }
}

/// Whether a run's reports may be shown yet: a run that started before its test binaries were
/// known to be the ones to run (`cargo dtf` starts one on workers while cargo checks the
/// build) is held until the check says yes ([`GateSwitch::open`]) or no
/// ([`GateSwitch::close`]: the run is thrown away).
#[derive(Clone, Debug)]
pub struct Gate(tokio::sync::watch::Receiver<Option<bool>>);

/// Decides a [`Gate`].
#[derive(Debug)]
pub struct GateSwitch(tokio::sync::watch::Sender<Option<bool>>);

/// A new, undecided gate and its switch.
pub fn gate() -> (GateSwitch, Gate) {
    let (tx, rx) = tokio::sync::watch::channel(None);
    (GateSwitch(tx), Gate(rx))
}

impl GateSwitch {
    /// The run is the one to run: what it held is shown, and it goes on.
    pub fn open(&self) {
        self.0.send_replace(Some(true));
    }

    /// The run is not the one to run: it keeps nothing more, and is to be dropped.
    pub fn close(&self) {
        self.0.send_replace(Some(false));
    }
}

impl Gate {
    /// `None` while undecided; then whether it opened.
    pub fn state(&self) -> Option<bool> {
        *self.0.borrow()
    }

    /// Waits for the decision: true when the gate opened. A switch dropped undecided counts
    /// as closed.
    pub async fn decided(&self) -> bool {
        let mut rx = self.0.clone();
        match rx.wait_for(Option::is_some).await {
            Ok(state) => *state == Some(true),
            Err(_) => false,
        }
    }
}

/// Which reporters a run has.
#[derive(Clone, Debug)]
pub struct Outputs {
    /// The format on stdout.
    pub format: crate::cli::Format,
    /// Color the pretty and terse output.
    pub color: bool,
    /// Show passing tests' output too.
    pub show_output: bool,
    /// Output is captured (no live progress line otherwise: live output would tear it).
    pub capture: bool,
    /// A test's module path by its report name (JUnit's `classname`).
    pub classnames: std::collections::HashMap<String, String>,
    /// Also a JUnit file here (`--junit` / `DTF_JUNIT`).
    pub junit: Option<std::path::PathBuf>,
    /// Also an HTML page here (`--html` / `DTF_HTML`).
    pub html: Option<std::path::PathBuf>,
}

/// The reporters of a run: the format's own on stdout (pretty and terse with a live progress
/// line on a terminal), plus a JUnit file and an HTML page when asked for.
pub fn standard(outputs: &Outputs) -> Reporters {
    use crate::cli::Format;
    let mut reporters = Reporters::default();
    match outputs.format {
        Format::Pretty | Format::Terse => {
            let terse = outputs.format == Format::Terse;
            if progress::wanted() && outputs.capture {
                let term = progress::Terminal::new(stdout());
                let pretty = pretty::Pretty::new(
                    Box::new(term.clone()),
                    terse,
                    outputs.color,
                    outputs.show_output,
                );
                reporters.push(Box::new(pretty));
                reporters.push(Box::new(progress::Progress::new(term)));
            } else {
                reporters.push(Box::new(pretty::Pretty::new(
                    stdout(),
                    terse,
                    outputs.color,
                    outputs.show_output,
                )));
            }
        }
        Format::Json => {
            reporters.push(Box::new(json::Json::new(stdout(), outputs.show_output)));
        }
        Format::Junit => {
            let sink = junit::Sink::Stdout(stdout());
            reporters.push(Box::new(junit::Junit::new(
                sink,
                outputs.classnames.clone(),
                outputs.show_output,
            )));
        }
    }
    if let Some(path) = &outputs.junit {
        let sink = junit::Sink::File(path.clone());
        reporters.push(Box::new(junit::Junit::new(
            sink,
            outputs.classnames.clone(),
            outputs.show_output,
        )));
    }
    if let Some(path) = &outputs.html {
        reporters.push(Box::new(html::Html::new(path.clone())));
    }
    reporters
}

/// Writes text to stdout through a locked handle, returning errors instead of panicking (so a
/// closed pipe ends the output quietly).
pub fn stdout() -> Box<dyn Write + Send> {
    Box::new(io::stdout())
}

/// An in-memory output shared between a reporter under test and the test that reads it.
#[cfg(test)]
#[derive(Clone, Default)]
pub(crate) struct SharedBuf(pub std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

#[cfg(test)]
impl Write for SharedBuf {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records the events it gets, in order.
    struct Log(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

    impl Reporter for Log {
        fn run_started(&mut self, info: &RunInfo) -> io::Result<()> {
            self.0.lock().unwrap().push(format!("start {}", info.total));
            Ok(())
        }
        fn test_started(&mut self, name: &str) -> io::Result<()> {
            self.0.lock().unwrap().push(format!("started {name}"));
            Ok(())
        }
        fn test_finished(&mut self, report: &TestReport) -> io::Result<()> {
            self.0
                .lock()
                .unwrap()
                .push(format!("finished {}", report.name));
            Ok(())
        }
        fn run_finished(&mut self, summary: &Summary) -> io::Result<()> {
            self.0
                .lock()
                .unwrap()
                .push(format!("end {}", summary.passed));
            Ok(())
        }
    }

    fn report(name: &str) -> TestReport {
        TestReport {
            name: name.to_owned(),
            status: Status::Passed,
            attempts: Vec::new(),
            rerun_after_lost_worker: false,
        }
    }

    fn held() -> (
        Reporters,
        GateSwitch,
        std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    ) {
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut reporters = Reporters::default();
        reporters.push(Box::new(Log(log.clone())));
        let (switch, gate) = gate();
        reporters.hold(gate);
        (reporters, switch, log)
    }

    #[test]
    fn held_events_are_shown_in_order_once_the_gate_opens() {
        let (mut reporters, switch, log) = held();
        let info = RunInfo {
            total: 2,
            ..RunInfo::default()
        };
        reporters.run_started(&info);
        reporters.test_started("a");
        reporters.test_finished(&report("a"));
        assert!(
            log.lock().unwrap().is_empty(),
            "nothing shown while undecided"
        );
        switch.open();
        reporters.test_started("b");
        reporters.test_finished(&report("b"));
        let summary = Summary {
            passed: 2,
            ..Summary::default()
        };
        reporters.run_finished(&summary);
        assert_eq!(
            *log.lock().unwrap(),
            [
                "start 2",
                "started a",
                "finished a",
                "started b",
                "finished b",
                "end 2"
            ]
        );
    }

    #[test]
    fn a_closed_gate_shows_nothing_of_the_run() {
        let (mut reporters, switch, log) = held();
        reporters.run_started(&RunInfo::default());
        reporters.test_finished(&report("a"));
        switch.close();
        reporters.test_finished(&report("b"));
        reporters.run_finished(&Summary::default());
        assert!(log.lock().unwrap().is_empty());
    }

    #[test]
    fn a_gate_whose_switch_is_gone_counts_as_closed() {
        let (switch, gate) = gate();
        drop(switch);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert!(!runtime.block_on(gate.decided()));
        let (switch, gate) = gate_pair_opened();
        drop(switch);
        assert!(runtime.block_on(gate.decided()));
    }

    fn gate_pair_opened() -> (GateSwitch, Gate) {
        let (switch, gate) = gate();
        switch.open();
        (switch, gate)
    }
}
