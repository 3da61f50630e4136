//! What `dtf::main!()` runs: the child role when this process was started for one test,
//! otherwise the parent role (parse the command line, select, plan, run, report, exit).

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;

use crate::__private::Package;
use crate::cli::{self, Args, Color, Format, Order};
#[cfg(feature = "distributed")]
use crate::coordinator;
use crate::errors::Error;
use crate::history::{self, History};
use crate::order::{self, Rule};
use crate::outcome::{Status, TestReport};
use crate::plan::{Defaults, Plan, Selected, Selection};
use crate::registry::{Isolation, Registry, Spawn};
use crate::report::json::Json;
use crate::report::junit::{self, Junit};
use crate::report::progress::{self, Progress, Terminal};
use crate::report::{Reporters, RunInfo, Summary, pretty::Pretty};
use crate::runner::{self, Ending, LocalOptions};
use crate::sandbox::rundir::RunDir;
use crate::sandbox::{Sandbox, child, env, namespaces};

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

/// Runs the binary's role to the end.
pub fn run(package: Package) -> ! {
    if let Some(spec) = child::take_spec() {
        child::run(spec);
    }
    let code = match parent(package) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            EXIT_FAILED
        }
    };
    let _ = std::io::stdout().flush();
    std::process::exit(code)
}

fn parent(package: Package) -> Result<i32, Error> {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) => {
            let _ = e.print();
            return Ok(if e.use_stderr() { EXIT_FAILED } else { 0 });
        }
    };
    let registry = Registry::collect();
    let selection = Selection {
        filters: args.filters.clone(),
        exact: args.exact,
        skip: args.skip.clone(),
        only_ignored: args.ignored,
        include_ignored: args.include_ignored,
        exclude_should_panic: args.exclude_should_panic,
    };
    let (selected, filtered_out) = selection.apply(&registry);
    if args.list {
        list(&selected, args.format() == Format::Terse);
        return Ok(0);
    }

    let config = Config::new(&args, package)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::Runtime)?;
    runtime.block_on(run_tests(&args, &config, &selected, filtered_out))
}

/// Everything the run reads from flags and the environment, validated.
struct Config {
    slots: usize,
    defaults: Defaults,
    keep_tmp: bool,
    slow: Duration,
    color: bool,
    /// `--order` / `DTF_ORDER` (libtest's `--shuffle` and `--shuffle-seed` mean random).
    order: Order,
    /// `--junit` / `DTF_JUNIT`.
    junit: Option<PathBuf>,
    /// `DTF_HISTORY_DIR`.
    history_dir: Option<PathBuf>,
    /// The package's name (part of the history file's name).
    package: &'static str,
}

impl Config {
    fn new(args: &Args, package: Package) -> Result<Config, Error> {
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
        let isolation = match args.isolation {
            Some(level) => level,
            None => parse_env("DTF_ISOLATION", |s| s.parse())?.unwrap_or(Isolation::Env),
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
            Some(r) => r,
            None => parse_env("DTF_RETRIES", |s| {
                s.parse::<u32>()
                    .map_err(|_| "expected a whole number of retries, such as 2".to_owned())
            })?
            .unwrap_or(0),
        };
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
        // The package root: the run-time CARGO_MANIFEST_DIR when the binary was started with
        // one (cargo sets it; nextest's `--workspace-remap` points it into an extracted
        // archive), else the compile-time one.
        let cwd = package_root(package);
        let spawn = parse_env(SPAWN_VAR, |s| s.parse())?.unwrap_or_else(default_spawn);
        Ok(Config {
            slots,
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
            },
            keep_tmp: env_var("DTF_KEEP_TMP").is_some_and(|v| v != "0"),
            slow: args.slow.unwrap_or(Duration::from_secs(60)),
            color,
            order,
            junit: args
                .junit
                .clone()
                .or_else(|| env_var("DTF_JUNIT"))
                .map(PathBuf::from),
            history_dir: env_var(history::DIR_VAR).map(PathBuf::from),
            package: package.name,
        })
    }
}

async fn run_tests(
    args: &Args,
    config: &Config,
    selected: &[Selected<'_>],
    filtered_out: usize,
) -> Result<i32, Error> {
    // `--workers` / `DTF_WORKERS`: run on dtf-worker services instead of locally.
    #[cfg(feature = "distributed")]
    let workers = coordinator::Options::from_env(
        args.workers.as_deref(),
        config.slots,
        args.fail_fast,
        config.slow,
    )?;
    #[cfg(not(feature = "distributed"))]
    let workers = without_distributed::refuse_workers(args.workers.as_deref())?;
    let mut defaults = config.defaults.clone();
    // Namespaces are checked where the tests run: here for a local run; each worker checks
    // its own kernel (and says so in its log) for a distributed one.
    if workers.is_none() && Plan::needs_namespaces(selected, &defaults) {
        if let Err(reason) = namespaces::probe() {
            // A run-wide `full-or-env` lets every test fall back. Otherwise only tests marked
            // `full-or-env` may, and one test at `full` (by attribute or run-wide) stops the run.
            let wants_fallback = defaults.isolation == Isolation::FullOrEnv;
            let insists = selected.iter().any(|s| {
                s.runs && s.test.def.isolation.unwrap_or(defaults.isolation) == Isolation::Full
            });
            if insists && !wants_fallback {
                return Err(Error::NamespacesRefused { reason });
            }
            eprintln!(
                "warning: isolation level `full` is not available, so its tests run at level `env`: {reason}"
            );
            defaults.full_becomes = Isolation::Env;
        } else if let Some(root) = &defaults.cwd {
            // Each test at level `full` writes into an overlay of the package root; where the
            // kernel refuses overlayfs in a user namespace they share the real one.
            if let Err(reason) = namespaces::probe_overlay(root) {
                eprintln!(
                    "warning: tests at level `full` share the real package root (writes there reach the source tree), \
                     since it cannot be given a private overlay: {reason}"
                );
            }
        }
    }
    let plan = Plan::new(selected, &defaults);
    let exe = std::env::current_exe()
        .map_err(|e| Error::Workers(format!("cannot find this test binary: {e}")))?;
    // `local:N` needs the worker binary: a missing one is said before `running N tests`.
    #[cfg(feature = "distributed")]
    if let Some(coordinator::Options {
        workers: coordinator::WorkersSpec::Local(_),
        ..
    }) = &workers
    {
        coordinator::local::find_worker_binary(&exe).map_err(Error::Workers)?;
    }

    let mut reporters = make_reporters(args, config, selected);
    let suite = suite_name(&exe);
    let history_file =
        history::path_for(config.history_dir.as_deref(), &exe, config.package, &suite);
    // The order every runner (local or distributed) starts tests in.
    let (order, shuffle_seed) = start_order(&plan, config.order, &history_file);

    let started = Instant::now();
    let info = RunInfo {
        suite,
        total: selected.len(),
        filtered_out,
        slots: config.slots,
        shuffle_seed,
    };
    reporters.run_started(&info);
    let mut summary = Summary {
        filtered_out,
        ..Summary::default()
    };
    for s in selected.iter().filter(|s| !s.runs) {
        let report = TestReport {
            name: s.test.name.clone(),
            status: Status::Ignored {
                reason: s.test.def.ignore_reason.map(str::to_owned),
            },
            attempts: Vec::new(),
            rerun_after_lost_worker: false,
        };
        reporters.test_finished(&report);
        summary.add(&report);
    }

    // Per-test directories live in a locked run directory: a later run removes it if this one
    // is killed before it can.
    let run_dir = RunDir::create_in(&std::env::temp_dir()).map_err(Error::TempDir)?;
    let sandbox = Sandbox::new(exe, run_dir.path().to_path_buf(), config.keep_tmp);
    let options = LocalOptions {
        slots: config.slots,
        fail_fast: args.fail_fast,
        slow: config.slow,
    };
    let (reports, ending) = match &workers {
        #[cfg(feature = "distributed")]
        Some(workers) => {
            let outcome = coordinator::run(&plan, order, &sandbox, workers, &mut reporters).await?;
            summary.notes.extend(outcome.notes);
            (outcome.reports, outcome.ending)
        }
        #[cfg(not(feature = "distributed"))]
        Some(never) => match *never {},
        None => runner::run_local(&plan, order, &sandbox, &options, &mut reporters).await,
    };
    for report in &reports {
        summary.add(report);
    }
    summary.duration = started.elapsed();
    reporters.run_finished(&summary);
    record_history(&history_file, &reports);
    Ok(match ending {
        Ending::Interrupted(signal) => 128 + signal,
        Ending::Completed if summary.success(args.flaky_fails) => 0,
        Ending::Completed => EXIT_FAILED,
    })
}

/// The reporters of a run: the format's own on stdout (pretty and terse with a live progress
/// line on a terminal), plus a JUnit file with `--junit` / `DTF_JUNIT`.
fn make_reporters(args: &Args, config: &Config, selected: &[Selected<'_>]) -> Reporters {
    let mut reporters = Reporters::default();
    let format = args.format();
    let classnames = || {
        selected
            .iter()
            .map(|s| (s.test.name.clone(), s.test.def.module_path.to_owned()))
            .collect()
    };
    match format {
        Format::Pretty | Format::Terse => {
            let terse = format == Format::Terse;
            // Live output of `--nocapture` tests would tear the line: no progress then.
            if progress::wanted() && config.defaults.capture {
                let term = Terminal::new(crate::report::stdout());
                let pretty = Pretty::new(
                    Box::new(term.clone()),
                    terse,
                    config.color,
                    args.show_output,
                );
                reporters.push(Box::new(pretty));
                reporters.push(Box::new(Progress::new(term)));
            } else {
                let out = crate::report::stdout();
                reporters.push(Box::new(Pretty::new(
                    out,
                    terse,
                    config.color,
                    args.show_output,
                )));
            }
        }
        Format::Json => {
            reporters.push(Box::new(Json::new(
                crate::report::stdout(),
                args.show_output,
            )));
        }
        Format::Junit => {
            let sink = junit::Sink::Stdout(crate::report::stdout());
            reporters.push(Box::new(Junit::new(sink, classnames(), args.show_output)));
        }
    }
    if let Some(path) = &config.junit {
        let sink = junit::Sink::File(path.clone());
        reporters.push(Box::new(Junit::new(sink, classnames(), args.show_output)));
    }
    reporters
}

/// The order to start the plan's tests in, with the seed of a random order. The history is
/// read only for `--order history`; when it cannot be read the run warns and goes on.
fn start_order(
    plan: &Plan,
    order: Order,
    history_file: &std::path::Path,
) -> (Vec<usize>, Option<u64>) {
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
    (order::order(&names, &history, rule), seed)
}

/// Adds the run's durations and outcomes to the history; a failure only warns. Not under
/// cargo-nextest, which schedules tests itself and starts one process per test: there the
/// file's read and rewrite would cost more than the test.
fn record_history(history_file: &std::path::Path, reports: &[TestReport]) {
    if std::env::var_os("NEXTEST_EXECUTION_MODE").is_some() {
        return;
    }
    let entries: Vec<history::Entry> = reports
        .iter()
        .filter_map(history::Entry::from_report)
        .collect();
    if let Err(e) = History::update(history_file, &entries) {
        eprintln!("warning: cannot record test durations: {e}");
    }
}

/// Prints the test list as libtest does: `NAME: test` lines, then (except in terse format) a
/// blank line and the count. A closed stdout ends the list quietly.
fn list(selected: &[Selected<'_>], terse: bool) {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut write = || -> std::io::Result<()> {
        for s in selected {
            writeln!(out, "{}: test", s.test.name)?;
        }
        if !terse {
            let n = selected.len();
            let noun = if n == 1 { "test" } else { "tests" };
            writeln!(out, "\n{n} {noun}, 0 benchmarks")?;
        }
        out.flush()
    };
    let _ = write();
}

/// The binary's name without cargo's hash suffix: `shell-1a2b3c4d` → `shell`.
fn suite_name(exe: &std::path::Path) -> String {
    let stem = exe
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    match stem.rsplit_once('-') {
        Some((name, hash)) if hash.len() == 16 && hash.chars().all(|c| c.is_ascii_hexdigit()) => {
            name.to_owned()
        }
        _ => stem,
    }
}

/// The package root a run uses: the run-time `CARGO_MANIFEST_DIR` when set and a directory,
/// else the compile-time one.
pub(crate) fn package_root(package: Package) -> PathBuf {
    env_var("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .filter(|dir| dir.is_dir())
        .unwrap_or_else(|| PathBuf::from(package.manifest_dir))
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

/// A build without the `distributed` feature runs every test locally, and says so when asked for
/// workers rather than ignoring the request.
#[cfg(not(feature = "distributed"))]
mod without_distributed {
    use crate::errors::Error;

    /// `Ok(None)` when no workers are asked for; an error naming the fix when they are.
    pub(super) fn refuse_workers(
        flag: Option<&str>,
    ) -> Result<Option<std::convert::Infallible>, Error> {
        let asked = match flag {
            Some(value) => Some(format!("--workers {value}")),
            None => std::env::var("DTF_WORKERS")
                .ok()
                .filter(|v| !v.trim().is_empty())
                .map(|value| format!("DTF_WORKERS={value}")),
        };
        match asked {
            None => Ok(None),
            Some(asked) => Err(Error::Workers(format!(
                "{asked} asks for dtf-worker services, but this test binary was built without \
                 dtf's `distributed` feature (on by default): remove `default-features = false` \
                 from the `dtf` dependency, or unset DTF_WORKERS to run the tests here"
            ))),
        }
    }
}
