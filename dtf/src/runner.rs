//! The local runner: runs the planned tests on this machine, up to `slots` at a time, each
//! through the [`Sandbox`], driven by the [`Scheduler`].

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use crate::outcome::{Attempt, Failure, Status, TestReport};
use crate::plan::Plan;
use crate::report::Reporters;
use crate::sandbox::Sandbox;
use crate::scheduler::{Finished, Job, Scheduler};

/// How a run ends besides its reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// Every test ran (or was stopped by `--fail-fast`).
    Completed,
    /// Interrupted by SIGINT or SIGTERM (the signal number).
    Interrupted(i32),
}

/// Options of a local run.
#[derive(Clone, Debug)]
pub struct LocalOptions {
    /// Tests at once.
    pub slots: usize,
    /// Whether tests known to be short may share a slot (the slots are the default, the core
    /// count, rather than a `--test-threads` or `RUST_TEST_THREADS` the user chose).
    pub share_short: bool,
    /// Stop at the first failure.
    pub fail_fast: bool,
    /// Notice threshold for slow tests.
    pub slow: Duration,
}

/// Runs `plan.tests` locally in the order given, reporting each test when it is done.
/// `sandboxes[i]` runs the tests of binary `i` (see [`PlannedTest::binary`]). Returns the
/// reports of every test that ran or was stopped.
///
/// [`PlannedTest::binary`]: crate::plan::PlannedTest::binary
///
/// `short[i]` says test `i` is known to be short (see [`SHORT`]): two such tests share a slot.
/// Empty when nothing may share.
///
/// [`SHORT`]: crate::scheduler::SHORT
pub async fn run_local(
    plan: &Plan,
    order: Vec<usize>,
    short: &[bool],
    sandboxes: &[Sandbox],
    options: &LocalOptions,
    reporters: &mut Reporters,
) -> (Vec<TestReport>, Ending) {
    let retries: Vec<u32> = plan.tests.iter().map(|t| t.retries).collect();
    // Counted in half slots: two tests known to be short share one. A forked test that does
    // almost nothing spends its time in its process's start and end, and with one test per
    // core the cores wait on those hand-offs; two per core keep them busy.
    let limits = plan.limits().in_half_slots(short);
    let capacity = options.slots.saturating_mul(2);
    let mut scheduler = Scheduler::with_limits(order, &retries, limits);
    let mut running: JoinSet<(Job, Attempt)> = JoinSet::new();
    let mut jobs: HashMap<tokio::task::Id, Job> = HashMap::new();
    let mut started_at: HashMap<usize, (Instant, bool)> = HashMap::new();
    let mut reports = Vec::new();
    let mut ticker = tokio::time::interval(Duration::from_millis(250));
    let mut signals = Signals::new();
    let mut ending = Ending::Completed;
    // Half slots taken by the tests running (a test may take several: `threads-required`).
    let mut used = 0usize;

    loop {
        while used < capacity {
            // An idle pool takes a test however many slots it asks for.
            let free = if running.is_empty() {
                usize::MAX
            } else {
                capacity - used
            };
            let Some(job) = scheduler.next_job_within(free) else {
                break;
            };
            used += scheduler.threads_of(job.test);
            let test = &plan.tests[job.test];
            if job.attempt == 1 {
                reporters.test_started(&test.name);
            }
            started_at.insert(job.test, (Instant::now(), false));
            let Some(sandbox) = sandboxes.get(test.binary).cloned() else {
                let attempt = system_failure("no sandbox for the test's binary".to_owned());
                jobs.insert(running.spawn(async move { (job, attempt) }).id(), job);
                continue;
            };
            let spec = test.spec.clone();
            let task = running.spawn(async move { (job, sandbox.run(&spec).await) });
            jobs.insert(task.id(), job);
        }
        if scheduler.is_done() && running.is_empty() {
            break;
        }
        tokio::select! {
            joined = running.join_next_with_id(), if !running.is_empty() => {
                let Some(joined) = joined else { continue };
                let (job, attempt) = match joined {
                    Ok((id, done)) => {
                        jobs.remove(&id);
                        done
                    }
                    // A bug in dtf, not in the test: reported as such, and the run goes on.
                    Err(e) => match jobs.remove(&e.id()) {
                        Some(job) => (
                            job,
                            system_failure(format!("internal error while running the test: {e}")),
                        ),
                        None => continue,
                    },
                };
                used = used.saturating_sub(scheduler.threads_of(job.test));
                started_at.remove(&job.test);
                if let Some(finished) = scheduler.record(job, attempt, false) {
                    let failed = finished.status == Status::Failed;
                    let report = into_report(plan, finished);
                    reporters.test_finished(&report);
                    reports.push(report);
                    if failed && options.fail_fast {
                        stop(plan, &mut scheduler, &mut running, &mut reports, reporters).await;
                        // What was in flight is reported and will never be recorded.
                        break;
                    }
                }
            }
            _ = ticker.tick() => {
                for (&test, (since, noticed)) in started_at.iter_mut() {
                    if !*noticed && since.elapsed() >= options.slow {
                        *noticed = true;
                        reporters.test_slow(&plan.tests[test].name, options.slow);
                    }
                }
            }
            signal = signals.recv() => {
                ending = Ending::Interrupted(signal);
                stop(plan, &mut scheduler, &mut running, &mut reports, reporters).await;
                break;
            }
        }
    }
    (reports, ending)
}

fn system_failure(message: String) -> Attempt {
    Attempt {
        failure: Some(Failure::System { message }),
        duration: Duration::ZERO,
        output: Default::default(),
        worker: None,
        kept_tmp: None,
        leaked: Vec::new(),
    }
}

/// Stops the run: nothing more starts, running tests are killed (dropping their futures kills
/// their process groups and removes their directories), and the rest is reported as not run.
async fn stop(
    plan: &Plan,
    scheduler: &mut Scheduler,
    running: &mut JoinSet<(Job, Attempt)>,
    reports: &mut Vec<TestReport>,
    reporters: &mut Reporters,
) {
    let mut not_run = scheduler.stop();
    running.shutdown().await;
    // Whatever was in flight is reported as not run too.
    let reported: std::collections::HashSet<&str> =
        reports.iter().map(|r| r.name.as_str()).collect();
    let in_flight: Vec<usize> = (0..plan.tests.len())
        .filter(|&i| !reported.contains(plan.tests[i].name.as_str()) && !not_run.contains(&i))
        .collect();
    not_run.extend(in_flight);
    not_run.sort_unstable();
    for test in not_run {
        let report = TestReport {
            name: plan.tests[test].name.clone(),
            status: Status::NotRun,
            attempts: Vec::new(),
            rerun_after_lost_worker: false,
        };
        reporters.test_finished(&report);
        reports.push(report);
    }
}

/// Turns the scheduler's verdict into a report.
pub fn into_report(plan: &Plan, finished: Finished) -> TestReport {
    TestReport {
        name: plan.tests[finished.test].name.clone(),
        status: finished.status,
        attempts: finished.attempts,
        rerun_after_lost_worker: finished.rerun_after_lost_worker,
    }
}

/// SIGINT and SIGTERM as a stream of signal numbers.
pub struct Signals {
    int: Option<tokio::signal::unix::Signal>,
    term: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    /// Starts listening (a listener that cannot be installed is left out).
    pub fn new() -> Signals {
        use tokio::signal::unix::{SignalKind, signal};
        Signals {
            int: signal(SignalKind::interrupt()).ok(),
            term: signal(SignalKind::terminate()).ok(),
        }
    }

    /// The next signal received.
    pub async fn recv(&mut self) -> i32 {
        async fn next(s: &mut Option<tokio::signal::unix::Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            _ = next(&mut self.int) => nix::libc::SIGINT,
            _ = next(&mut self.term) => nix::libc::SIGTERM,
        }
    }
}

impl Default for Signals {
    fn default() -> Self {
        Signals::new()
    }
}
