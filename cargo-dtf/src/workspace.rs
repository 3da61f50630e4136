//! `cargo dtf run` and `cargo dtf list`: build, discover every test of every binary, select,
//! plan, and hand one plan to dtf's engine.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use dtf::config::Config;
use dtf::describe::{self, Described};
use dtf::filter::{Filter, TestMeta};
use dtf::history::{self, History};
use dtf::plan::{Group, Origin, Plan, PlannedTest};
use dtf::registry::Isolation;
use dtf::report::{Origin as ReportOrigin, RunInfo};
use dtf::sandbox::{Harness, Sandbox, namespaces, rundir::RunDir};

use crate::build::{self, Binary, Built};
use crate::cli::{ListArgs, RunArgs, SelectArgs};
use crate::partition::Partition;

/// How a binary runs its tests.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(crate) enum Kind {
    /// A dtf binary, with its tests planned by itself.
    Dtf(Vec<Described>),
    /// A libtest binary: `(name, ignored)`.
    Libtest(Vec<(String, bool)>),
}

/// A test found in a binary.
#[derive(Clone, Debug)]
struct Candidate {
    binary: usize,
    name: String,
    ignored: bool,
    reason: Option<String>,
    /// A dtf test's own plan.
    described: Option<Described>,
    /// Runs (false: reported as ignored).
    runs: bool,
}

impl Candidate {
    fn display(&self, binaries: &[Binary]) -> String {
        format!("{} {}", binaries[self.binary].id, self.name)
    }
}

/// What both subcommands do first: read the config, build, discover.
struct Discovered {
    workspace: build::Workspace,
    config: Config,
    binaries: Vec<Binary>,
    candidates: Vec<Candidate>,
    /// Each binary's tests as listed, and when listed, the binaries' stamps taken before.
    kinds: Vec<Kind>,
    stamps: Vec<Option<crate::speculate::Stamp>>,
    stamped_at: std::time::SystemTime,
}

/// The build of a run: under way, or done already (by a run started while cargo checked it).
enum Build {
    Running(build::Building),
    Done(Built),
}

/// The workspace's config file, where `cargo dtf` looks for it.
fn config_path(root: &Path) -> Option<PathBuf> {
    Config::find(root).or_else(|| {
        let candidate = root.join(dtf::config::FILE);
        candidate.is_file().then_some(candidate)
    })
}

/// Reads the config file of the workspace at `root` and makes it the process's: its
/// settings as `DTF_*` variables (the binaries read them), its path and profile.
fn load_config(root: &Path, profile: Option<&str>) -> Result<Config, String> {
    let path = config_path(root);
    let config = Config::load(path.as_deref(), profile).map_err(|e| e.to_string())?;
    // SAFETY: `cargo dtf` has started no thread yet (the runtime and the discovery threads
    // come later; a runtime that ran before was shut down).
    unsafe {
        config.apply_to_env();
        if let Some(path) = &config.path {
            std::env::set_var(dtf::config::CONFIG_VAR, path);
        }
        std::env::set_var(dtf::config::PROFILE_VAR, &config.profile_name);
    }
    Ok(config)
}

/// The tests a binary's listing names, as candidates of the run.
fn candidates_of(kinds: &[Kind]) -> Vec<Candidate> {
    let mut candidates = Vec::new();
    for (i, kind) in kinds.iter().enumerate() {
        match kind {
            Kind::Dtf(tests) => {
                for d in tests {
                    candidates.push(Candidate {
                        binary: i,
                        name: d.name.clone(),
                        ignored: d.ignored,
                        reason: d.ignore_reason.clone(),
                        described: Some(d.clone()),
                        runs: true,
                    });
                }
            }
            Kind::Libtest(tests) => {
                for (name, ignored) in tests {
                    candidates.push(Candidate {
                        binary: i,
                        name: name.clone(),
                        ignored: *ignored,
                        reason: None,
                        described: None,
                        runs: true,
                    });
                }
            }
        }
    }
    candidates
}

/// The variables cargo sets for a test binary it runs, which `cargo dtf` sets too.
fn cargo_env(binary: &Binary) -> Vec<(String, String)> {
    let mut vars = vec![
        (
            "CARGO_MANIFEST_DIR".to_owned(),
            binary.manifest_dir.display().to_string(),
        ),
        ("CARGO_PKG_NAME".to_owned(), binary.package.clone()),
        ("CARGO_PKG_VERSION".to_owned(), binary.version.clone()),
        ("CARGO_CRATE_NAME".to_owned(), binary.name.replace('-', "_")),
        ("CARGO_PRIMARY_PACKAGE".to_owned(), "1".to_owned()),
    ];
    let mut parts = binary.version.splitn(3, '.');
    for key in ["CARGO_PKG_VERSION_MAJOR", "CARGO_PKG_VERSION_MINOR"] {
        vars.push((key.to_owned(), parts.next().unwrap_or("0").to_owned()));
    }
    let patch = parts.next().unwrap_or("0");
    let (patch, pre) = patch.split_once('-').unwrap_or((patch, ""));
    vars.push(("CARGO_PKG_VERSION_PATCH".to_owned(), patch.to_owned()));
    vars.push(("CARGO_PKG_VERSION_PRE".to_owned(), pre.to_owned()));
    if let Ok(cargo) = std::env::var("CARGO") {
        vars.push(("CARGO".to_owned(), cargo));
    }
    vars
}

/// Per-test flags of the run, as the variables a described dtf binary reads (they rank with
/// the command line: above the config file's overrides).
fn flag_env(args: &RunArgs) -> Vec<(&'static str, String)> {
    let mut vars = Vec::new();
    if let Some(v) = &args.timeout {
        vars.push(("DTF_TIMEOUT", v.clone()));
    }
    if let Some(v) = &args.isolation {
        vars.push(("DTF_ISOLATION", v.clone()));
    }
    if let Some(v) = &args.memory {
        vars.push(("DTF_MEMORY", v.clone()));
    }
    if let Some(v) = &args.retries {
        vars.push(("DTF_RETRIES", v.clone()));
    }
    if args.nocapture {
        vars.push(("RUST_TEST_NOCAPTURE", "1".to_owned()));
    }
    vars
}

/// The run's flags as a dtf binary's command line, parsed and checked by dtf itself.
fn engine_args(args: &RunArgs) -> Result<dtf::cli::Args, String> {
    let mut argv: Vec<String> = vec!["cargo dtf".to_owned()];
    let mut opt = |flag: &str, value: &Option<String>| {
        if let Some(v) = value {
            argv.push(flag.to_owned());
            argv.push(v.clone());
        }
    };
    opt("--test-threads", &args.test_threads);
    opt("--workers", &args.workers);
    opt("--isolation", &args.isolation);
    opt("--timeout", &args.timeout);
    opt("--memory", &args.memory);
    opt("--retries", &args.retries);
    opt("--slow", &args.slow);
    opt("--order", &args.order);
    opt("--format", &args.format);
    opt("--color", &args.color);
    opt("--junit", &args.junit);
    opt("--html", &args.html);
    for (flag, on) in [
        ("--fail-fast", args.fail_fast),
        ("--flaky-fails", args.flaky_fails),
        ("--nocapture", args.nocapture),
        ("--show-output", args.show_output),
        ("--quiet", args.quiet),
    ] {
        if on {
            argv.push(flag.to_owned());
        }
    }
    use clap::Parser;
    dtf::cli::Args::try_parse_from(argv).map_err(|e| {
        let text = e.to_string();
        let first = text.lines().next().unwrap_or("invalid arguments");
        first.trim_start_matches("error: ").to_owned()
    })
}

fn discover(
    build: Build,
    build_args: &crate::cli::BuildArgs,
    profile: Option<&str>,
    flag_env: &[(&'static str, String)],
    runner: &[String],
) -> Result<Result<Discovered, i32>, String> {
    // The build started first: cargo's start and freshness checks overlap reading the
    // metadata and the config (a failure there stops the build).
    let workspace = build::metadata(build_args)?;
    let config = load_config(&workspace.root, profile)?;
    let built = match build {
        Build::Running(building) => building.finish()?,
        Build::Done(built) => built,
    };
    let binaries = match built {
        Built::Binaries(b) => b,
        Built::Failed(code) => return Ok(Err(if code == 0 { 101 } else { code })),
    };
    let stamped_at = std::time::SystemTime::now();
    let stamps = binaries
        .iter()
        .map(|b| crate::speculate::Stamp::of_path(&b.path))
        .collect();
    let kinds = list_all(&binaries, flag_env, runner)?;
    let candidates = candidates_of(&kinds);
    Ok(Ok(Discovered {
        workspace,
        config,
        binaries,
        candidates,
        kinds,
        stamps,
        stamped_at,
    }))
}

/// Lists every binary's tests, a few binaries at a time.
fn list_all(
    binaries: &[Binary],
    flag_env: &[(&'static str, String)],
    runner: &[String],
) -> Result<Vec<Kind>, String> {
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, 8);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<std::sync::Mutex<Option<Result<Kind, String>>>> = binaries
        .iter()
        .map(|_| std::sync::Mutex::new(None))
        .collect();
    std::thread::scope(|scope| {
        for _ in 0..threads.min(binaries.len()) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(binary) = binaries.get(i) else {
                        return;
                    };
                    let result = list_one(binary, flag_env, runner);
                    if let Ok(mut slot) = results[i].lock() {
                        *slot = Some(result);
                    }
                }
            });
        }
    });
    results
        .into_iter()
        .map(|slot| {
            slot.into_inner()
                .ok()
                .flatten()
                .unwrap_or_else(|| Err("a binary's tests could not be listed".to_owned()))
        })
        .collect()
}

/// `BINARY --list --format terse`, through the target's runner when there is one.
fn list_command(
    binary: &Binary,
    flag_env: &[(&'static str, String)],
    runner: &[String],
) -> Command {
    let mut cmd = match runner.split_first() {
        Some((program, args)) => {
            let mut cmd = Command::new(program);
            cmd.args(args).arg(&binary.path);
            cmd
        }
        None => Command::new(&binary.path),
    };
    cmd.args(["--list", "--format", "terse"])
        .envs(cargo_env(binary))
        .envs(flag_env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if binary.manifest_dir.is_dir() {
        cmd.current_dir(&binary.manifest_dir);
    }
    cmd
}

fn list_one(
    binary: &Binary,
    flag_env: &[(&'static str, String)],
    runner: &[String],
) -> Result<Kind, String> {
    let context = describe::Context {
        binary: binary.name.clone(),
        binary_id: binary.id.clone(),
        package: binary.package.clone(),
        kind: binary.kind.clone(),
    };
    let context = serde_json::to_string(&context).map_err(|e| e.to_string())?;
    let out = list_command(binary, flag_env, runner)
        .env(describe::DESCRIBE_VAR, context)
        .output()
        .map_err(|e| {
            format!(
                "cannot run {} to list its tests: {e}",
                binary.path.display()
            )
        })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let failed = |out: &std::process::Output| {
        let stderr = String::from_utf8_lossy(&out.stderr);
        format!(
            "cannot list the tests of {} ({}): it exited with {}{}",
            binary.id,
            binary.path.display(),
            out.status,
            if stderr.trim().is_empty() {
                String::new()
            } else {
                format!(":\n{}", escape(stderr.trim()))
            }
        )
    };
    if !out.status.success() {
        return Err(failed(&out));
    }
    let mut lines = stdout.lines();
    if stdout.starts_with(describe::HEADER) {
        lines.next();
        let mut tests = Vec::new();
        for line in lines.filter(|l| !l.trim().is_empty()) {
            let d: Described = serde_json::from_str(line)
                .map_err(|e| format!("cannot read the test list of {}: {e}", binary.id))?;
            tests.push(d);
        }
        return Ok(Kind::Dtf(tests));
    }
    let names = parse_terse(&stdout).map_err(|line| {
        format!(
            "{} ({}) does not list its tests as libtest does (`--list --format terse` printed \
             `{}`): dtf runs binaries with libtest's harness and dtf binaries only",
            binary.id,
            binary.path.display(),
            escape(line)
        )
    })?;
    let ignored_out = list_command(binary, flag_env, runner)
        .arg("--ignored")
        .output()
        .map_err(|e| {
            format!(
                "cannot run {} to list its tests: {e}",
                binary.path.display()
            )
        })?;
    if !ignored_out.status.success() {
        return Err(failed(&ignored_out));
    }
    let ignored: std::collections::HashSet<String> =
        parse_terse(&String::from_utf8_lossy(&ignored_out.stdout))
            .unwrap_or_default()
            .into_iter()
            .collect();
    Ok(Kind::Libtest(
        names
            .into_iter()
            .map(|n| {
                let i = ignored.contains(&n);
                (n, i)
            })
            .collect(),
    ))
}

/// `NAME: test` lines (benchmarks left out); the first other line is an error.
fn parse_terse(text: &str) -> Result<Vec<String>, &str> {
    let mut names = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if let Some(name) = line.strip_suffix(": test") {
            names.push(name.to_owned());
        } else if line.ends_with(": benchmark") {
            continue;
        } else {
            return Err(line);
        }
    }
    Ok(names)
}

/// Text from a binary, safe to print: control characters escaped.
fn escape(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            if c.is_control() && c != '\n' && c != '\t' {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

/// Applies libtest's filters, `-E`, `--rerun-failed` and `--partition`. Returns how many were
/// filtered out.
fn select(
    candidates: &mut Vec<Candidate>,
    binaries: &[Binary],
    select: &SelectArgs,
    history_file: &Path,
) -> Result<usize, String> {
    let total = candidates.len();
    let filters: Vec<Filter> = select
        .filter_expr
        .iter()
        .map(|e| Filter::parse(e).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    let partition = select
        .partition
        .as_deref()
        .map(Partition::parse)
        .transpose()?;
    let matches = |pattern: &str, name: &str| {
        if select.exact {
            name == pattern
        } else {
            name.contains(pattern)
        }
    };
    candidates.retain(|c| {
        let b = &binaries[c.binary];
        let meta = TestMeta {
            name: &c.name,
            binary: &b.name,
            binary_id: &b.id,
            package: &b.package,
            kind: &b.kind,
        };
        (select.filters.is_empty() || select.filters.iter().any(|f| matches(f, &c.name)))
            && !select.skip.iter().any(|s| matches(s, &c.name))
            && (filters.is_empty() || filters.iter().any(|f| f.matches(&meta)))
            && (!select.ignored || c.ignored)
    });
    for c in candidates.iter_mut() {
        c.runs = !c.ignored || select.ignored || select.include_ignored;
    }
    let history = if select.rerun_failed || partition.as_ref().is_some_and(Partition::needs_history)
    {
        History::load(history_file).unwrap_or_else(|e| {
            eprintln!("warning: ignoring the test history: {e}");
            History::new()
        })
    } else {
        History::new()
    };
    if select.rerun_failed {
        candidates.retain(|c| {
            history
                .get(&c.display(binaries))
                .is_some_and(|record| record.failed)
        });
    }
    if let Some(partition) = partition {
        let names: Vec<String> = candidates.iter().map(|c| c.display(binaries)).collect();
        let keep = partition.select(&names, &history);
        let mut i = 0;
        candidates.retain(|_| {
            i += 1;
            keep[i - 1]
        });
    }
    Ok(total - candidates.len())
}

/// `cargo dtf run`: returns the exit code.
pub fn run(args: RunArgs) -> Result<i32, String> {
    let dargs = engine_args(&args)?;
    let repeat = match &args.repeat {
        None => 1,
        Some(n) => dtf::cli::parse_threads(n, "--repeat")?,
    };
    if args.skip_unchanged && repeat > 1 {
        return Err(
            "--skip-unchanged and --repeat contradict each other: --repeat runs every attempt \
             of a test, --skip-unchanged may run none (leave one of them out)"
                .to_owned(),
        );
    }
    let no_tests = NoTests::parse(args.select.no_tests.as_deref())?;
    let flag_env = flag_env(&args);
    let runner = target_runner(&args.build)?;
    let how = How {
        args: &args,
        dargs: &dargs,
        repeat,
        no_tests,
        runner: &runner,
    };
    // Tests that print straight to the terminal cannot be held: no speculative start then.
    let key = if args.nocapture {
        None
    } else {
        crate::speculate::Key::of_this_process()
    };
    let mut build = Build::Running(build::start(&args.build)?);
    if let Some(record) = key
        .as_ref()
        .and_then(|key| crate::speculate::Record::load(key, config_path))
    {
        if let Build::Running(building) = build {
            match speculate(&how, record, building)? {
                Speculation::Ran(code) => return Ok(code),
                Speculation::Superseded(built) => build = Build::Done(built),
            }
        }
    }
    let discovered = match discover(
        build,
        &args.build,
        args.profile.as_deref(),
        &flag_env,
        &runner,
    )? {
        Ok(d) => d,
        Err(code) => return Ok(code),
    };
    let record = key
        .as_ref()
        .filter(|_| crate::speculate::enabled())
        .and_then(|key| {
            crate::speculate::Record::new(
                key,
                &discovered.workspace,
                &discovered.binaries,
                &discovered.stamps,
                discovered.stamped_at,
                &discovered.kinds,
                discovered.config.path.as_deref(),
            )
        });
    let planned = plan_run(&how, discovered, None)?;
    if planned.remote {
        if let Some(record) = record {
            record.save();
        }
    }
    for notice in &planned.notices {
        eprintln!("{notice}");
    }
    let Planned {
        run,
        mut reporters,
        run_dir,
        ..
    } = planned;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runner: {e}"))?;
    let outcome = runtime
        .block_on(dtf::engine::execute(run, &mut reporters))
        .map_err(|e| e.to_string())?;
    drop(run_dir);
    let _ = std::io::stdout().flush();
    Ok(outcome.code)
}

/// What `cargo dtf run` was asked, for planning a run.
struct How<'a> {
    args: &'a RunArgs,
    dargs: &'a dtf::cli::Args,
    repeat: usize,
    no_tests: NoTests,
    runner: &'a [String],
}

/// A run ready to start.
struct Planned {
    run: dtf::engine::Run,
    reporters: dtf::report::Reporters,
    run_dir: RunDir,
    /// It runs on remote workers.
    remote: bool,
    /// Lines for stderr before it starts.
    notices: Vec<String>,
}

/// How a speculative start ended.
enum Speculation {
    /// cargo confirmed the recorded binaries: the run went on, with this exit code.
    Ran(i32),
    /// It did not: the run was dropped; this is what cargo built.
    Superseded(Built),
}

/// Runs the recorded binaries' tests on the workers while cargo checks the build (see
/// `speculate.rs`); gives up the run when cargo builds anything else.
fn speculate(
    how: &How<'_>,
    record: crate::speculate::Record,
    building: build::Building,
) -> Result<Speculation, String> {
    let check = record.check();
    let (workspace, binaries, kinds) = record.into_parts();
    let config = load_config(&workspace.root, how.args.profile.as_deref())?;
    if !crate::speculate::enabled() {
        return Ok(Speculation::Superseded(building.finish()?));
    }
    let discovered = Discovered {
        workspace,
        config,
        binaries,
        candidates: candidates_of(&kinds),
        kinds,
        stamps: Vec::new(),
        stamped_at: std::time::SystemTime::now(),
    };
    let (switch, gate) = dtf::report::gate();
    let planned = match plan_run(how, discovered, Some(gate.clone())) {
        Ok(planned) if planned.remote => planned,
        // What cannot start from the record starts from what cargo builds.
        _ => return Ok(Speculation::Superseded(building.finish()?)),
    };
    let Planned {
        run,
        mut reporters,
        run_dir,
        notices,
        ..
    } = planned;
    reporters.hold(gate);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runner: {e}"))?;
    let ended = runtime.block_on(async {
        let mut built = tokio::task::spawn_blocking(move || building.finish());
        let exec = dtf::engine::execute(run, &mut reporters);
        tokio::pin!(exec);
        // The run waits for the gate before it ends, so it ends first only with an error.
        let early = tokio::select! {
            built = &mut built => Err(built),
            outcome = &mut exec => Ok(outcome),
        };
        let (built, early) = match early {
            Err(built) => (built, None),
            Ok(outcome) => ((&mut built).await, Some(outcome)),
        };
        let built = built
            .map_err(|e| format!("cannot wait for the build: {e}"))?
            .map_err(|e| e.to_string())?;
        let confirmed = matches!(&built, Built::Binaries(b) if check.confirmed_by(b));
        if !confirmed {
            switch.close();
            return Ok(Speculation::Superseded(built));
        }
        for notice in &notices {
            eprintln!("{notice}");
        }
        switch.open();
        let outcome = match early {
            Some(outcome) => outcome,
            None => exec.await,
        };
        outcome
            .map(|o| Speculation::Ran(o.code))
            .map_err(|e| e.to_string())
    });
    // No thread of the runtime may outlive it: a run that goes on reads the config again.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    drop(run_dir);
    let _ = std::io::stdout().flush();
    ended
}

/// Selects and plans the discovered tests; the run's reports wait for `confirmation` when
/// given (a speculative start).
fn plan_run(
    how: &How<'_>,
    discovered: Discovered,
    confirmation: Option<dtf::report::Gate>,
) -> Result<Planned, String> {
    let How {
        args,
        dargs,
        repeat,
        no_tests,
        runner,
    } = *how;
    let mut notices = Vec::new();
    let Discovered {
        workspace,
        config,
        binaries,
        mut candidates,
        ..
    } = discovered;
    check_runnable(args, &binaries, &workspace.metadata)?;

    let history_dir = std::env::var_os(history::DIR_VAR)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    let history_file = history_file(&workspace, &binaries, history_dir.as_deref());
    let filtered_out = select(&mut candidates, &binaries, &args.select, &history_file)?;
    let running = candidates.iter().filter(|c| c.runs).count();
    if running == 0 {
        match no_tests {
            NoTests::Fail => {
                return Err(
                    "no tests to run: the filters, the partition or --rerun-failed left none \
                     (pass --no-tests=warn or --no-tests=pass to allow that)"
                        .to_owned(),
                );
            }
            NoTests::Warn => notices.push("warning: no tests to run".to_owned()),
            NoTests::Pass => {}
        }
    }
    let doctests: Vec<&String> = workspace
        .doctest_packages
        .iter()
        .filter(|p| binaries.iter().any(|b| &b.package == *p && b.kind == "lib"))
        .collect();
    if !doctests.is_empty() {
        notices.push(format!(
            "dtf: doctests are not run by cargo dtf; run them with `cargo test --doc` ({})",
            doctests
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }

    let mut settings = dtf::engine::Settings::new(
        dargs,
        &workspace.root,
        Origin::default(),
        "cargo-dtf",
        config.clone(),
    )
    .map_err(|e| e.to_string())?;
    if args.no_fail_fast {
        settings.fail_fast = false;
    }
    let mut workers = dtf::coordinator::Options::from_env(
        dargs.workers.as_deref(),
        settings.slots,
        settings.fail_fast,
        settings.slow,
    )
    .map_err(|e| e.to_string())?;
    let remote = workers
        .as_ref()
        .is_some_and(|w| matches!(w.workers, dtf::coordinator::WorkersSpec::Remote(_)));
    if let Some(workers) = workers.as_mut() {
        workers.confirmation = confirmation;
    }
    if workers.is_some() && !runner.is_empty() {
        return Err(format!(
            "target.{}.runner is set, and cargo dtf cannot run tests through a runner on workers \
             (the runner is a program of this machine): run locally, or unset the runner",
            args.build.target.as_deref().unwrap_or_default()
        ));
    }
    // On workers, each binary's tests see its package's input tree. `local:N` workers run on
    // this machine and see the checkout as it is (their caches live in the target directory,
    // which a shipped tree would cover): nothing travels to them.
    if let Some(workers) = workers
        .as_mut()
        .filter(|w| !matches!(w.workers, dtf::coordinator::WorkersSpec::Local(_)))
    {
        workers.inputs = package_inputs(&binaries)?;
    }

    // What each test asked for, and whether namespaces are there for those at `full`.
    let shared = Arc::new(config);
    let defaults_for = |binary: &Binary| {
        let mut d = settings.defaults.clone();
        d.config = shared.clone();
        d.origin = Origin {
            binary: binary.name.clone(),
            binary_id: binary.id.clone(),
            package: binary.package.clone(),
            kind: binary.kind.clone(),
        };
        d.cwd = binary
            .manifest_dir
            .is_dir()
            .then(|| binary.manifest_dir.clone());
        d.parent_env.retain(|(k, _)| !k.starts_with("CARGO_"));
        d.parent_env.extend(cargo_env(binary));
        d
    };
    let mut per_binary: Vec<dtf::plan::Defaults> = binaries.iter().map(defaults_for).collect();
    let requested: Vec<Isolation> = candidates
        .iter()
        .filter(|c| c.runs)
        .map(|c| match &c.described {
            Some(d) => d.isolation,
            None => per_binary[c.binary].resolve(&c.name, None).isolation,
        })
        .collect();
    let mut fallback = false;
    if workers.is_none()
        && requested
            .iter()
            .any(|i| matches!(i, Isolation::Full | Isolation::FullOrEnv))
    {
        if let Err(reason) = namespaces::probe() {
            let wants_fallback = settings.defaults.isolation == Isolation::FullOrEnv;
            if requested.contains(&Isolation::Full) && !wants_fallback {
                return Err(dtf::errors::Error::NamespacesRefused { reason }.to_string());
            }
            eprintln!(
                "warning: isolation level `full` is not available, so its tests run at level `env`: {reason}"
            );
            fallback = true;
            for d in &mut per_binary {
                d.full_becomes = Isolation::Env;
            }
        }
    }

    let groups: Vec<Group> = shared
        .groups
        .iter()
        .map(|(name, &max_threads)| Group {
            name: name.clone(),
            max_threads,
        })
        .collect();
    let mut plan = Plan {
        tests: Vec::new(),
        groups: groups.clone(),
    };
    let mut origins = HashMap::new();
    let mut not_running = Vec::new();
    for c in &candidates {
        let b = &binaries[c.binary];
        if !c.runs {
            let name = c.display(&binaries);
            origins.insert(name.clone(), origin(b, &c.name));
            not_running.push(dtf::engine::ignored(name, c.reason.clone()));
            continue;
        }
        let planned = match &c.described {
            Some(d) => {
                let mut spec = d.spec.clone();
                if fallback && spec.isolation == Isolation::Full {
                    spec.isolation = Isolation::Env;
                }
                PlannedTest {
                    name: String::new(),
                    def: None,
                    spec,
                    retries: d.retries,
                    binary: c.binary,
                    threads: d.threads.max(1),
                    group: d
                        .group
                        .as_ref()
                        .and_then(|g| groups.iter().position(|known| &known.name == g)),
                }
            }
            None => per_binary[c.binary].plan_foreign(
                &c.name,
                String::new(),
                Harness::Libtest {
                    ignored: c.ignored,
                    args: args.binary_args.clone(),
                },
                c.binary,
                &groups,
            ),
        };
        for k in 1..=repeat {
            let name = if repeat == 1 {
                c.display(&binaries)
            } else {
                format!("{}#{k} {}", b.id, c.name)
            };
            let mut test = planned.clone();
            test.name = name.clone();
            origins.insert(name, origin(b, &c.name));
            plan.tests.push(test);
        }
    }

    // --skip-unchanged: what passed last time with the same key is reported, not run.
    let mut unchanged_keys = HashMap::new();
    if args.skip_unchanged && !plan.tests.is_empty() {
        let history = History::load(&history_file).unwrap_or_else(|e| {
            eprintln!("warning: ignoring the test history: {e}");
            History::new()
        });
        let mut binary_keys: Vec<Option<Option<String>>> = vec![None; binaries.len()];
        let mut kept = Vec::new();
        for test in std::mem::take(&mut plan.tests) {
            let binary_key = binary_keys[test.binary]
                .get_or_insert_with(|| crate::unchanged::binary_key(&binaries[test.binary]));
            let Some(binary_key) = binary_key else {
                kept.push(test);
                continue;
            };
            let key = crate::unchanged::test_key(binary_key, &test, runner);
            if history.unchanged(&test.name, &key) {
                not_running.push(dtf::outcome::TestReport {
                    name: test.name.clone(),
                    status: dtf::outcome::Status::Unchanged,
                    attempts: Vec::new(),
                    rerun_after_lost_worker: false,
                });
            } else {
                unchanged_keys.insert(test.name.clone(), key);
                kept.push(test);
            }
        }
        plan.tests = kept;
    }

    let run_dir = RunDir::create_in(&std::env::temp_dir()).map_err(|e| e.to_string())?;
    let relay = std::env::current_exe().ok();
    let sandboxes: Vec<Sandbox> = binaries
        .iter()
        .map(|b| {
            let sandbox = Sandbox::new(
                b.path.clone(),
                run_dir.path().to_path_buf(),
                settings.keep_tmp,
            )
            .with_output_cap(settings.output_cap);
            let sandbox = sandbox.with_runner(runner.iter().map(Into::into).collect());
            match &relay {
                Some(relay) => sandbox.with_relay(relay.clone()),
                None => sandbox,
            }
        })
        .collect();
    let reporters = dtf::report::standard(&dtf::report::Outputs {
        format: dargs.format(),
        color: settings.color,
        show_output: dargs.show_output,
        capture: settings.defaults.capture,
        classnames: HashMap::new(),
        junit: settings.junit.clone(),
        html: settings.html.clone(),
    });
    let info = RunInfo {
        suite: "cargo-dtf".to_owned(),
        total: plan.tests.len() + not_running.len(),
        filtered_out,
        slots: settings.slots,
        origins,
        ..RunInfo::default()
    };
    let run = dtf::engine::Run {
        plan,
        sandboxes,
        info,
        not_running,
        order: settings.order,
        history_file,
        record_history: true,
        unchanged_keys,
        workers,
        local: dtf::runner::LocalOptions {
            slots: settings.slots,
            share_short: settings.default_slots,
            fail_fast: settings.fail_fast,
            slow: settings.slow,
        },
        flaky_fails: dargs.flaky_fails,
    };
    Ok(Planned {
        run,
        reporters,
        run_dir,
        remote,
        notices,
    })
}

/// The input trees of a distributed run: one per package, for all of the package's binaries
/// (its files, its build script's `OUT_DIR`, its executables, and the shared libraries each
/// of its binaries loads), as a dtf binary run by `cargo test` ships its own.
fn package_inputs(binaries: &[Binary]) -> Result<Vec<dtf::coordinator::Inputs>, String> {
    let mut packages: Vec<(&Path, Vec<usize>)> = Vec::new();
    for (i, binary) in binaries.iter().enumerate() {
        match packages
            .iter_mut()
            .find(|(root, _)| *root == binary.manifest_dir.as_path())
        {
            Some((_, of)) => of.push(i),
            None => packages.push((&binary.manifest_dir, vec![i])),
        }
    }
    packages
        .into_iter()
        .map(|(root, of)| {
            let first = &binaries[of[0]];
            let out_dir = of.iter().find_map(|&i| binaries[i].out_dir.clone());
            let mut sources =
                dtf::inputs::Sources::new(first.path.clone(), root.to_path_buf(), out_dir, None)
                    .with_env(|name| std::env::var(name).ok())
                    .map_err(|e| format!("{}: {e}", first.package))?;
            sources.more_binaries = of[1..].iter().map(|&i| binaries[i].path.clone()).collect();
            let compiled = sources.compiled_paths(root);
            Ok(dtf::coordinator::Inputs {
                sources,
                compiled,
                binaries: of,
            })
        })
        .collect()
}

/// With `--target`, the target's `runner` from cargo's config (empty: none).
fn target_runner(build: &crate::cli::BuildArgs) -> Result<Vec<String>, String> {
    let Some(triple) = &build.target else {
        return Ok(Vec::new());
    };
    let cwd =
        std::env::current_dir().map_err(|e| format!("cannot read the current directory: {e}"))?;
    Ok(crate::runner::for_target(triple, &cwd)?.unwrap_or_default())
}

/// Test functions of `harness = false` targets that dtf would not run (read from the sources
/// by the scanner of `cargo dtf migrate`) fail the run, unless `--allow-unrunnable`.
fn check_runnable(args: &RunArgs, binaries: &[Binary], metadata: &[u8]) -> Result<(), String> {
    let mut packages: Vec<String> = binaries.iter().map(|b| b.package.clone()).collect();
    packages.sort();
    packages.dedup();
    if packages.is_empty() {
        return Ok(());
    }
    let manifest = args.build.manifest_path.as_deref().map(Path::new);
    let found = crate::migrate::unrunnable_of(metadata, manifest, &packages)?;
    if found.is_empty() {
        return Ok(());
    }
    let lines: Vec<String> = found.iter().map(|f| format!("  {f}")).collect();
    if args.select.allow_unrunnable {
        eprintln!(
            "warning: {} test function(s) of harness = false targets do not run under dtf \
             (--allow-unrunnable):\n{}",
            found.len(),
            lines.join("\n")
        );
        return Ok(());
    }
    Err(format!(
        "{} test function(s) of harness = false targets would not run under dtf:\n{}\n\
         help: `cargo dtf migrate` converts them; or pass --allow-unrunnable to run the rest",
        found.len(),
        lines.join("\n")
    ))
}

fn origin(binary: &Binary, test: &str) -> ReportOrigin {
    ReportOrigin {
        binary_id: binary.id.clone(),
        binary: binary.name.clone(),
        package: binary.package.clone(),
        test: test.to_owned(),
    }
}

/// The run's history: one file for the workspace, beside the binaries' own.
fn history_file(workspace: &build::Workspace, binaries: &[Binary], dir: Option<&Path>) -> PathBuf {
    let exe = binaries
        .first()
        .map(|b| b.path.clone())
        .unwrap_or_else(|| workspace.target_dir.join("debug/deps/cargo-dtf"));
    history::path_for(dir, &exe, "cargo-dtf", "workspace")
}

/// `--no-tests`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NoTests {
    Fail,
    Warn,
    Pass,
}

impl NoTests {
    fn parse(value: Option<&str>) -> Result<NoTests, String> {
        match value {
            None | Some("fail") => Ok(NoTests::Fail),
            Some("warn") => Ok(NoTests::Warn),
            Some("pass") => Ok(NoTests::Pass),
            Some(other) => Err(format!(
                "invalid --no-tests `{other}`: expected fail, warn or pass"
            )),
        }
    }
}

/// `cargo dtf list`: returns the exit code.
pub fn list(args: ListArgs) -> Result<i32, String> {
    let runner = target_runner(&args.build)?;
    let build = Build::Running(build::start(&args.build)?);
    let discovered = match discover(build, &args.build, args.profile.as_deref(), &[], &runner)? {
        Ok(d) => d,
        Err(code) => return Ok(code),
    };
    let Discovered {
        workspace,
        binaries,
        mut candidates,
        ..
    } = discovered;
    let history_dir = std::env::var_os(history::DIR_VAR)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    let history_file = history_file(&workspace, &binaries, history_dir.as_deref());
    select(&mut candidates, &binaries, &args.select, &history_file)?;
    candidates.sort_by_cached_key(|c| c.display(&binaries));
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let format = args.format.as_deref().unwrap_or("human");
    let mut write = || -> std::io::Result<()> {
        match format {
            "json" => {
                let tests: Vec<serde_json::Value> = candidates
                    .iter()
                    .map(|c| {
                        let b = &binaries[c.binary];
                        serde_json::json!({
                            "binary_id": b.id,
                            "binary": b.name,
                            "package": b.package,
                            "kind": b.kind,
                            "test": c.name,
                            "ignored": c.ignored,
                            "harness": if c.described.is_some() { "dtf" } else { "libtest" },
                            "path": b.path,
                        })
                    })
                    .collect();
                writeln!(out, "{}", serde_json::Value::Array(tests))?;
            }
            _ => {
                for c in &candidates {
                    writeln!(out, "{}", c.display(&binaries))?;
                }
            }
        }
        out.flush()
    };
    if !matches!(format, "human" | "terse" | "json") {
        return Err(format!(
            "invalid --format `{format}`: expected human, terse or json"
        ));
    }
    let _ = write();
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terse_lists_parse_and_anything_else_is_named() {
        assert_eq!(
            parse_terse("a::b: test\nc: benchmark\n\nd: test\n"),
            Ok(vec!["a::b".to_owned(), "d".to_owned()])
        );
        assert_eq!(parse_terse("running 3 tests\n"), Err("running 3 tests"));
    }
}
