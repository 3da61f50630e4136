//! The engine: runs a [`Plan`] of tests from one or many binaries to its end — start order,
//! the local runner or the coordinator, the reporters, the summary, the history and the exit
//! code. A dtf test binary (`dtf::main!()`) and `cargo dtf` are both small drivers over it:
//! each selects tests and plans them, then hands the plan here.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::cli::{self, Args, Color, Order};
use crate::config;
#[cfg(feature = "distributed")]
use crate::coordinator;
use crate::errors::Error;
use crate::history::{self, History};
use crate::order::{self, Rule};
use crate::outcome::{OUTPUT_CAP_VAR, Status, TestReport};
use crate::plan::Plan;
use crate::plan::{Defaults, Explicit, Origin};
use crate::registry::{Isolation, Spawn};
use crate::report::{Reporters, RunInfo, Summary};
use crate::runner::{self, Ending, LocalOptions};
use crate::sandbox::env;
use crate::sandbox::{Harness, Sandbox};

/// libtest's exit code for a failed run.
pub const EXIT_FAILED: i32 = 101;

/// `DTF_SPAWN=fork|exec`: how per-test processes start.
pub const SPAWN_VAR: &str = "DTF_SPAWN";

/// Fork where there is a fork server (Linux); exec elsewhere.
fn default_spawn() -> Spawn {
    if cfg!(target_os = "linux") {
        Spawn::Fork
    } else {
        Spawn::Exec
    }
}

/// Where a run's tests go when not local: the coordinator's settings (with the `distributed`
/// feature; without it there are none).
#[cfg(feature = "distributed")]
pub type Workers = coordinator::Options;

/// Where a run's tests go when not local: never, without the `distributed` feature.
#[cfg(not(feature = "distributed"))]
pub type Workers = std::convert::Infallible;

/// One run: what to run and how.
pub struct Run {
    /// The tests that execute.
    pub plan: Plan,
    /// `sandboxes[i]` runs the tests of binary `i`.
    pub sandboxes: Vec<Sandbox>,
    /// Facts for the reporters (the shuffle seed is filled in here).
    pub info: RunInfo,
    /// Tests reported without running (ignored, unchanged), before the others start.
    pub not_running: Vec<TestReport>,
    /// The start order rule.
    pub order: Order,
    /// The history file: read for `--order history`, updated after the run.
    pub history_file: PathBuf,
    /// Whether to record this run's results in the history.
    pub record_history: bool,
    /// `--skip-unchanged` digests by test name, recorded with each test that passes on its
    /// first attempt (empty without the flag).
    pub unchanged_keys: std::collections::HashMap<String, String>,
    /// Workers to run on (`None`: locally).
    pub workers: Option<Workers>,
    /// The local runner's settings (slots, fail-fast, slow threshold).
    pub local: LocalOptions,
    /// Count flaky tests as failures.
    pub flaky_fails: bool,
}

/// What a run ended with.
pub struct Outcome {
    /// The exit code: 0, [`EXIT_FAILED`], or 128 + the signal that interrupted it.
    pub code: i32,
    /// Every test's report, including those that did not run.
    pub reports: Vec<TestReport>,
    /// The summary the reporters saw.
    pub summary: Summary,
}

/// Runs `run` to its end, reporting through `reporters`.
pub async fn execute(run: Run, reporters: &mut Reporters) -> Result<Outcome, Error> {
    let Run {
        plan,
        sandboxes,
        mut info,
        not_running,
        order,
        history_file,
        record_history,
        unchanged_keys,
        workers,
        local,
        flaky_fails,
    } = run;
    let (order, shuffle_seed, history) = start_order(&plan, order, &history_file);
    // Which tests may share a slot: those the history knows to be short, when the slots are
    // the default.
    let short: Vec<bool> = if local.share_short {
        plan.tests
            .iter()
            .map(|t| history.get(&t.name).is_some_and(|r| r.is_short()))
            .collect()
    } else {
        Vec::new()
    };
    info.shuffle_seed = shuffle_seed;

    let started = Instant::now();
    // Each binary's fork server runs its warm-ups (their time counts as the run's) before any
    // test starts: one that fails stops the run here. Workers start servers of their own.
    if workers.is_none() {
        for (i, sandbox) in sandboxes.iter().enumerate() {
            let forks = plan.tests.iter().any(|t| {
                t.binary == i && t.spec.spawn == Spawn::Fork && t.spec.harness == Harness::Dtf
            });
            if forks {
                sandbox.start_fork_server().await.map_err(Error::WarmUp)?;
            }
        }
    }
    reporters.run_started(&info);
    let mut summary = Summary {
        filtered_out: info.filtered_out,
        ..Summary::default()
    };
    for report in &not_running {
        reporters.test_finished(report);
        summary.add(report);
    }
    // A distributed run may fail for a reason of its own (every worker lost with
    // `DTF_REQUIRE_WORKERS=1`): it still ends like a failed run, with its summary and reports.
    let (reports, ending, failed) = match &workers {
        #[cfg(feature = "distributed")]
        Some(workers) => {
            let outcome = coordinator::run(&plan, order, &sandboxes, workers, reporters).await?;
            summary.notes.extend(outcome.notes);
            (outcome.reports, outcome.ending, outcome.failure.is_some())
        }
        #[cfg(not(feature = "distributed"))]
        Some(never) => match *never {},
        None => {
            let (reports, ending) =
                runner::run_local(&plan, order, &short, &sandboxes, &local, reporters).await;
            (reports, ending, false)
        }
    };
    for sandbox in &sandboxes {
        sandbox.stop_fork_server().await;
    }
    for report in &reports {
        summary.add(report);
    }
    summary.duration = started.elapsed();
    reporters.run_finished(&summary);
    if record_history {
        record(&history_file, &reports, &unchanged_keys);
    }
    let code = match ending {
        Ending::Interrupted(signal) => 128 + signal,
        Ending::Completed if !failed && summary.success(flaky_fails) => 0,
        Ending::Completed => EXIT_FAILED,
    };
    let mut all = not_running;
    all.extend(reports);
    Ok(Outcome {
        code,
        reports: all,
        summary,
    })
}

/// An ignored test's report.
pub fn ignored(name: String, reason: Option<String>) -> TestReport {
    TestReport {
        name,
        status: Status::Ignored { reason },
        attempts: Vec::new(),
        rerun_after_lost_worker: false,
    }
}

/// The order to start the plan's tests in, with the seed of a random order, and the history
/// it was planned from. The history is read only for `--order history` (empty otherwise);
/// when it cannot be read the run warns and goes on.
fn start_order(
    plan: &Plan,
    order: Order,
    history_file: &std::path::Path,
) -> (Vec<usize>, Option<u64>, History) {
    let names: Vec<&str> = plan.tests.iter().map(|t| t.name.as_str()).collect();
    let (rule, seed) = match order {
        Order::History => (Rule::History, None),
        Order::Name => (Rule::Name, None),
        Order::Random(seed) => {
            let seed = seed.unwrap_or_else(order::fresh_seed);
            (Rule::Random(seed), Some(seed))
        }
    };
    let history = if rule == Rule::History && names.len() > 1 {
        History::load(history_file).unwrap_or_else(|e| {
            eprintln!("warning: ignoring the test history: {e}");
            History::new()
        })
    } else {
        History::new()
    };
    (order::order(&names, &history, rule), seed, history)
}

/// Adds the run's durations and outcomes to the history; a failure only warns.
fn record(
    history_file: &std::path::Path,
    reports: &[TestReport],
    keys: &std::collections::HashMap<String, String>,
) {
    let entries: Vec<history::Entry> = reports
        .iter()
        .filter_map(|report| {
            let mut entry = history::Entry::from_report(report)?;
            if report.status == Status::Passed {
                entry.unchanged_key = keys.get(&report.name).cloned();
            }
            Some(entry)
        })
        .collect();
    if let Err(e) = History::update(history_file, &entries) {
        eprintln!("warning: cannot record test durations: {e}");
    }
}

/// Everything the run reads from flags, the environment and the config file, validated.
pub struct Settings {
    /// `--test-threads` / `RUST_TEST_THREADS`.
    pub slots: usize,
    /// Neither set the slots: they are the core count.
    pub default_slots: bool,
    /// `--fail-fast`, or `fail-fast = true` in the profile.
    pub fail_fast: bool,
    /// Per-test defaults.
    pub defaults: Defaults,
    /// `DTF_KEEP_TMP`.
    pub keep_tmp: bool,
    /// `DTF_OUTPUT_CAP`: the most bytes of a test's output kept (its head and its tail).
    pub output_cap: usize,
    /// The slow-test notice threshold.
    pub slow: Duration,
    /// Color the output.
    pub color: bool,
    /// `--order` / `DTF_ORDER` (libtest's `--shuffle` and `--shuffle-seed` mean random).
    pub order: Order,
    /// `--junit` / `DTF_JUNIT`.
    pub junit: Option<PathBuf>,
    /// `--html` / `DTF_HTML`.
    pub html: Option<PathBuf>,
    /// `DTF_HISTORY_DIR`.
    pub history_dir: Option<PathBuf>,
    /// The package's name (part of the history file's name).
    pub package: String,
}

impl Settings {
    /// Reads the run's settings: `args`, then the variables, then the config file `file`,
    /// then the built-in defaults. `manifest_dir` is the tests' working directory, `origin`
    /// the binary the overrides' filters see, `package` part of the history file's name.
    pub fn new(
        args: &Args,
        manifest_dir: &std::path::Path,
        origin: Origin,
        package: &str,
        file: config::Config,
    ) -> Result<Settings, Error> {
        let default_slots = args.test_threads.is_none() && env_var("RUST_TEST_THREADS").is_none();
        let slots = match (&args.test_threads, env_var("RUST_TEST_THREADS")) {
            (Some(n), _) => {
                cli::parse_threads(n, "--test-threads").map_err(|message| Error::BadFlag {
                    flag: "--test-threads",
                    message,
                })?
            }
            (None, Some(n)) => {
                cli::parse_threads(&n, "RUST_TEST_THREADS").map_err(|message| Error::BadEnv {
                    var: "RUST_TEST_THREADS",
                    value: n.clone(),
                    message,
                })?
            }
            (None, None) => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        // The command line, then the variable; else the config file's profile, then the
        // built-in default (and then a matching override wins, see `Defaults::resolve`).
        let profile = &file.profile.tests;
        let isolation = match args.isolation {
            Some(level) => Some(level),
            None => parse_env("DTF_ISOLATION", |s| s.parse())?,
        };
        let timeout = match args.timeout {
            Some(t) => Some(t),
            None => parse_env("DTF_TIMEOUT", cli::parse_duration)?,
        };
        let memory = match args.memory {
            Some(m) => Some(m),
            None => parse_env("DTF_MEMORY", cli::parse_size)?,
        };
        let retries = match args.retries {
            Some(r) => Some(r),
            None => parse_env("DTF_RETRIES", |s| {
                s.parse::<u32>()
                    .map_err(|_| "expected a whole number of retries, such as 2".to_owned())
            })?,
        };
        let explicit = Explicit {
            isolation: isolation.is_some(),
            timeout: timeout.is_some(),
            memory: memory.is_some(),
            retries: retries.is_some(),
        };
        let isolation = isolation.or(profile.isolation).unwrap_or(Isolation::Env);
        let timeout = timeout.or(profile.timeout);
        let memory = memory.or(profile.memory);
        let retries = retries.or(profile.retries).unwrap_or(0);
        let slow = args.slow.or(file.profile.slow);
        let fail_fast = args.fail_fast || file.profile.fail_fast.unwrap_or(false);
        let nocapture = args.nocapture || env_var("RUST_TEST_NOCAPTURE").is_some_and(|v| v != "0");
        let color = match args.color {
            Color::Always => true,
            Color::Never => false,
            Color::Auto => {
                use std::io::IsTerminal;
                std::io::stdout().is_terminal() && env_var("NO_COLOR").is_none()
            }
        };
        let order = match (args.order, args.shuffle_seed) {
            (Some(order), _) => order,
            (None, Some(seed)) => Order::Random(Some(seed)),
            (None, None) if args.shuffle => Order::Random(None),
            (None, None) => parse_env("DTF_ORDER", |s| s.parse())?.unwrap_or(Order::History),
        };
        let cwd = manifest_dir.to_path_buf();
        let spawn = parse_env(SPAWN_VAR, |s| s.parse())?.unwrap_or_else(default_spawn);
        Ok(Settings {
            slots,
            default_slots,
            defaults: Defaults {
                isolation,
                full_becomes: Isolation::Full,
                timeout,
                memory,
                retries,
                capture: !nocapture,
                cwd: cwd.is_dir().then_some(cwd),
                parent_env: std::env::vars().collect(),
                pass_env: env_var(env::PASS_ENV_VAR)
                    .map(|v| env::parse_pass_env(&v))
                    .unwrap_or_default(),
                leak_fails: args.leak_fails,
                spawn,
                config: std::sync::Arc::new(file),
                explicit,
                origin,
            },
            fail_fast,
            keep_tmp: env_var("DTF_KEEP_TMP").is_some_and(|v| v != "0"),
            output_cap: parse_env(OUTPUT_CAP_VAR, crate::outcome::parse_output_cap)?
                .unwrap_or(crate::outcome::DEFAULT_OUTPUT_CAP),
            slow: slow.unwrap_or(Duration::from_secs(60)),
            color,
            order,
            junit: args
                .junit
                .clone()
                .or_else(|| env_var("DTF_JUNIT"))
                .map(PathBuf::from),
            html: args
                .html
                .clone()
                .or_else(|| env_var(crate::report::html::HTML_VAR))
                .map(PathBuf::from),
            history_dir: env_var(history::DIR_VAR).map(PathBuf::from),
            package: package.to_owned(),
        })
    }
}

/// A non-empty environment variable.
fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn parse_env<T>(
    var: &'static str,
    parse: impl FnOnce(&str) -> Result<T, String>,
) -> Result<Option<T>, Error> {
    match env_var(var) {
        None => Ok(None),
        Some(value) => parse(&value).map(Some).map_err(|message| Error::BadEnv {
            var,
            value,
            message,
        }),
    }
}
