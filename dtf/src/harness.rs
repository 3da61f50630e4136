//! What `dtf::main!()` runs: the child role when this process was started for one test,
//! otherwise the parent role (parse the command line, select, plan, run, report, exit).

use std::io::Write;

use clap::Parser;

use crate::__private::Package;
use crate::cli::{Args, Format};
use crate::config;
#[cfg(feature = "distributed")]
use crate::coordinator;
use crate::describe;
use crate::engine::{self, Settings as Config};
use crate::errors::Error;
use crate::history;
use crate::plan::{self, Origin, Plan, Selected, Selection};
use crate::registry::{Isolation, Registry};
use crate::report::{Reporters, RunInfo};
use crate::runner::LocalOptions;
use crate::sandbox::rundir::RunDir;
use crate::sandbox::{Sandbox, child, forkserver, namespaces};

/// libtest's exit code for a failed run.
pub const EXIT_FAILED: i32 = engine::EXIT_FAILED;

/// Runs the binary's role to the end.
pub fn run(package: Package) -> ! {
    if let Some(spec) = child::take_spec() {
        child::run(spec);
    }
    if forkserver::take_role() {
        forkserver::serve();
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
    if let Some(context) = std::env::var_os(describe::DESCRIBE_VAR) {
        return describe(&args, package, &registry, context);
    }
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

    let file = load_config_file(package)?;
    let config = Config::new(
        &args,
        &package_root(package),
        origin(package),
        package.name,
        file,
    )?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::Runtime)?;
    runtime.block_on(run_tests(&args, &config, package, &selected, filtered_out))
}

async fn run_tests(
    args: &Args,
    config: &Config,
    #[cfg_attr(not(feature = "distributed"), allow(unused_variables))] package: Package,
    selected: &[Selected<'_>],
    filtered_out: usize,
) -> Result<i32, Error> {
    // `--workers` / `DTF_WORKERS`: run on dtf-worker services instead of locally.
    #[cfg(feature = "distributed")]
    let mut workers = coordinator::Options::from_env(
        args.workers.as_deref(),
        config.slots,
        config.fail_fast,
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
                s.runs
                    && defaults.resolve(&s.test.name, Some(s.test.def)).isolation == Isolation::Full
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
    // A distributed run ships the binary's input tree with it.
    #[cfg(feature = "distributed")]
    if let Some(workers) = workers.as_mut() {
        let sources = crate::inputs::Sources::new(
            exe.clone(),
            package_root(package),
            package.out_dir.map(std::path::PathBuf::from),
            package.target_tmpdir.map(std::path::PathBuf::from),
        )
        .with_env(|name| std::env::var(name).ok())?;
        let compiled = sources.compiled_paths(std::path::Path::new(package.manifest_dir));
        workers.inputs = vec![coordinator::Inputs {
            sources,
            compiled,
            binaries: vec![0],
        }];
    }

    let mut reporters = make_reporters(args, config, selected);
    let suite = suite_name(&exe);
    let history_file =
        history::path_for(config.history_dir.as_deref(), &exe, &config.package, &suite);
    let info = RunInfo {
        suite,
        total: selected.len(),
        filtered_out,
        slots: config.slots,
        ..RunInfo::default()
    };
    let not_running = selected
        .iter()
        .filter(|s| !s.runs)
        .map(|s| {
            engine::ignored(
                s.test.name.clone(),
                s.test.def.ignore_reason.map(str::to_owned),
            )
        })
        .collect();

    // Per-test directories live in a locked run directory: a later run removes it if this one
    // is killed before it can.
    let run_dir = RunDir::create_in(&std::env::temp_dir()).map_err(Error::TempDir)?;
    let sandbox = Sandbox::new(exe, run_dir.path().to_path_buf(), config.keep_tmp)
        .with_output_cap(config.output_cap);
    let run = engine::Run {
        plan,
        sandboxes: vec![sandbox],
        info,
        not_running,
        order: config.order,
        history_file,
        // Not under cargo-nextest, which schedules tests itself and starts one process per
        // test: there the file's read and rewrite would cost more than the test.
        record_history: std::env::var_os("NEXTEST_EXECUTION_MODE").is_none(),
        unchanged_keys: std::collections::HashMap::new(),
        workers,
        local: LocalOptions {
            slots: config.slots,
            share_short: config.default_slots,
            fail_fast: config.fail_fast,
            slow: config.slow,
        },
        flaky_fails: args.flaky_fails,
    };
    let outcome = engine::execute(run, &mut reporters).await?;
    drop(run_dir);
    Ok(outcome.code)
}

/// The reporters of a run (see [`crate::report::standard`]).
fn make_reporters(args: &Args, config: &Config, selected: &[Selected<'_>]) -> Reporters {
    let classnames = selected
        .iter()
        .map(|s| (s.test.name.clone(), s.test.def.module_path.to_owned()))
        .collect();
    crate::report::standard(&crate::report::Outputs {
        format: args.format(),
        color: config.color,
        show_output: args.show_output,
        capture: config.defaults.capture,
        classnames,
        junit: config.junit.clone(),
        html: config.html.clone(),
    })
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

/// `cargo dtf` asks what this binary holds: every test, planned as a run with these flags
/// would plan it, one JSON line each (see [`describe`]).
fn describe(
    args: &Args,
    package: Package,
    registry: &Registry,
    context: std::ffi::OsString,
) -> Result<i32, Error> {
    let context: describe::Context = context
        .to_str()
        .and_then(|c| serde_json::from_str(c).ok())
        .ok_or_else(|| Error::Workers(format!("invalid {}", describe::DESCRIBE_VAR)))?;
    let file = load_config_file(package)?;
    let mut config = Config::new(
        args,
        &package_root(package),
        origin(package),
        package.name,
        file,
    )?;
    config.defaults.origin = Origin {
        binary: context.binary,
        binary_id: context.binary_id,
        package: context.package,
        kind: context.kind,
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut write = || -> std::io::Result<()> {
        writeln!(out, "{}", describe::HEADER)?;
        for test in registry.tests() {
            let resolved = config.defaults.resolve(&test.name, Some(test.def));
            let planned = plan::plan_one(test, &config.defaults, &[]);
            let described = describe::Described {
                name: test.name.clone(),
                ignored: test.def.ignore,
                ignore_reason: test.def.ignore_reason.map(str::to_owned),
                isolation: resolved.isolation,
                spec: planned.spec,
                retries: planned.retries,
                threads: resolved.threads,
                group: resolved.group,
            };
            let line = serde_json::to_string(&described).map_err(std::io::Error::other)?;
            writeln!(out, "{line}")?;
        }
        out.flush()
    };
    let _ = write();
    Ok(0)
}

/// Reads `.config/dtf.toml` (found from the package root up to the workspace root, or
/// `DTF_CONFIG`) with the profile `DTF_PROFILE` names, and applies its run-wide settings as
/// `DTF_*` variables where those are not set. Runs while the process has one thread.
fn load_config_file(package: Package) -> Result<config::Config, Error> {
    let path = config::Config::find(std::path::Path::new(package.manifest_dir));
    let file = config::Config::load(path.as_deref(), None).map_err(Error::Config)?;
    // SAFETY: the parent role calls this before it starts any thread (the runtime comes later).
    unsafe { file.apply_to_env() };
    Ok(file)
}

/// This binary as filter expressions see it: `DESCRIBE_VAR` when `cargo dtf` says, else what
/// cargo set at compile time.
fn origin(package: Package) -> Origin {
    let binary = std::env::current_exe()
        .map(|exe| suite_name(&exe))
        .unwrap_or_default();
    let kind = package.kind.to_owned();
    let binary_id = match kind.as_str() {
        "lib" | "proc-macro" => package.name.to_owned(),
        "test" => format!("{}::{binary}", package.name),
        other => format!("{}::{other}/{binary}", package.name),
    };
    Origin {
        binary,
        binary_id,
        package: package.name.to_owned(),
        kind,
    }
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
pub(crate) fn package_root(package: Package) -> std::path::PathBuf {
    std::env::var("CARGO_MANIFEST_DIR")
        .ok()
        .filter(|v| !v.is_empty())
        .map(std::path::PathBuf::from)
        .filter(|dir| dir.is_dir())
        .unwrap_or_else(|| std::path::PathBuf::from(package.manifest_dir))
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
