//! The command line of `cargo dtf`: `cargo dtf [run] [OPTIONS] [FILTERS...] [-- BINARY_ARGS...]`,
//! `cargo dtf list` and `cargo dtf migrate`.

use clap::{Args, Parser, Subcommand};

/// The words that name a subcommand. Any other first argument means `run`, so a filter can
/// only be one of these after an explicit `run`.
pub const SUBCOMMANDS: &[&str] = &["run", "list", "migrate", "help"];

/// `cargo dtf`.
#[derive(Debug, Parser)]
#[command(
    name = "cargo dtf",
    bin_name = "cargo dtf",
    version,
    about = "Runs every test binary of a workspace as one run: one queue (locally or on dtf-worker \
             services), every test in its own isolated process, one report.",
    long_about = None,
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build the test targets and run their tests (the default).
    Run(Box<RunArgs>),
    /// Build the test targets and list their tests.
    List(Box<ListArgs>),
    /// Move a workspace's tests onto dtf.
    Migrate(crate::migrate::Args),
}

/// Which targets to build, passed through to cargo.
#[derive(Clone, Debug, Default, Args)]
#[command(next_help_heading = "Package selection and build (as cargo test)")]
pub struct BuildArgs {
    /// Test only these packages.
    #[arg(short = 'p', long = "package", value_name = "SPEC")]
    pub packages: Vec<String>,
    /// Test every package of the workspace.
    #[arg(long)]
    pub workspace: bool,
    /// Leave these packages out (with --workspace).
    #[arg(long, value_name = "SPEC")]
    pub exclude: Vec<String>,
    /// Features to activate (space- or comma-separated; repeatable).
    #[arg(short = 'F', long, value_name = "FEATURES")]
    pub features: Vec<String>,
    /// Activate every feature.
    #[arg(long)]
    pub all_features: bool,
    /// Do not activate the default features.
    #[arg(long)]
    pub no_default_features: bool,
    /// Build with the release profile.
    #[arg(short = 'r', long)]
    pub release: bool,
    /// Build with this cargo profile (`-P` is dtf's profile).
    #[arg(long, value_name = "NAME")]
    pub cargo_profile: Option<String>,
    /// Build for this target triple (`target.<triple>.runner` runs the binaries).
    #[arg(long, value_name = "TRIPLE")]
    pub target: Option<String>,
    /// Test only the library's unit tests.
    #[arg(long)]
    pub lib: bool,
    /// Test every binary target.
    #[arg(long)]
    pub bins: bool,
    /// Test only this binary target (repeatable).
    #[arg(long, value_name = "NAME")]
    pub bin: Vec<String>,
    /// Test every test target.
    #[arg(long)]
    pub tests: bool,
    /// Test only this test target (repeatable).
    #[arg(long = "test", value_name = "NAME")]
    pub test_targets: Vec<String>,
    /// Test every example.
    #[arg(long)]
    pub examples: bool,
    /// Test only this example (repeatable).
    #[arg(long, value_name = "NAME")]
    pub example: Vec<String>,
    /// Test every benchmark target.
    #[arg(long)]
    pub benches: bool,
    /// Test only this benchmark target (repeatable).
    #[arg(long, value_name = "NAME")]
    pub bench: Vec<String>,
    /// The workspace's Cargo.toml (default: found from the current directory).
    #[arg(long, value_name = "PATH")]
    pub manifest_path: Option<String>,
    /// Parallel build jobs.
    #[arg(short = 'j', long, value_name = "N")]
    pub jobs: Option<String>,
    /// Require Cargo.lock to be up to date.
    #[arg(long)]
    pub locked: bool,
    /// Run without accessing the network.
    #[arg(long)]
    pub offline: bool,
    /// Require Cargo.lock and the cache to be up to date.
    #[arg(long)]
    pub frozen: bool,
}

/// Which tests to pick.
#[derive(Clone, Debug, Default, Args)]
#[command(next_help_heading = "Test selection")]
pub struct SelectArgs {
    /// Run only tests whose names contain one of these (exact names with --exact).
    #[arg(value_name = "FILTERS")]
    pub filters: Vec<String>,
    /// Match the filters and --skip exactly.
    #[arg(long)]
    pub exact: bool,
    /// Skip tests whose names contain this (repeatable).
    #[arg(long, value_name = "FILTER")]
    pub skip: Vec<String>,
    /// Run only ignored tests.
    #[arg(long)]
    pub ignored: bool,
    /// Run ignored tests too.
    #[arg(long)]
    pub include_ignored: bool,
    /// A filter expression, as nextest's filtersets: test(), binary(), binary_id(),
    /// package(), kind(), all(), none(), and, or, not, -, parentheses (repeatable: any
    /// matches).
    #[arg(short = 'E', long = "filter-expr", value_name = "EXPR")]
    pub filter_expr: Vec<String>,
    /// Run only this shard: count:M/N, hash:M/N or history:M/N.
    #[arg(long, value_name = "KIND:M/N")]
    pub partition: Option<String>,
    /// Run only the tests that failed last time (from the history).
    #[arg(long)]
    pub rerun_failed: bool,
    /// What a run that selects no test does: fail (default), warn or pass.
    #[arg(long, value_name = "ACTION")]
    pub no_tests: Option<String>,
    /// Run even when a harness = false target has test functions dtf would not run.
    #[arg(long)]
    pub allow_unrunnable: bool,
}

/// `cargo dtf run`.
#[derive(Clone, Debug, Default, Args)]
pub struct RunArgs {
    /// Targets to build.
    #[command(flatten)]
    pub build: BuildArgs,
    /// Tests to pick.
    #[command(flatten)]
    pub select: SelectArgs,
    /// dtf's profile from .config/dtf.toml (DTF_PROFILE; default `default`).
    #[arg(short = 'P', long, value_name = "NAME", help_heading = "Running")]
    pub profile: Option<String>,
    /// How many tests run at once locally (RUST_TEST_THREADS; default: the available
    /// parallelism).
    #[arg(long, value_name = "N", help_heading = "Running")]
    pub test_threads: Option<String>,
    /// Run on these dtf-worker services: host:port,... or local:N (DTF_WORKERS).
    #[arg(long, value_name = "WORKERS", help_heading = "Running")]
    pub workers: Option<String>,
    /// Isolation level: process, env (default), full or full-or-env (DTF_ISOLATION).
    #[arg(long, value_name = "LEVEL", help_heading = "Running")]
    pub isolation: Option<String>,
    /// Kill each test after this long, e.g. 30s (DTF_TIMEOUT).
    #[arg(long, value_name = "DURATION", help_heading = "Running")]
    pub timeout: Option<String>,
    /// Limit each test's memory, e.g. 512MiB (DTF_MEMORY).
    #[arg(long, value_name = "SIZE", help_heading = "Running")]
    pub memory: Option<String>,
    /// Retry failing tests up to N times; a later pass is FLAKY (DTF_RETRIES).
    #[arg(long, value_name = "N", help_heading = "Running")]
    pub retries: Option<String>,
    /// Print a notice for tests running longer than this (default 60s).
    #[arg(long, value_name = "DURATION", help_heading = "Running")]
    pub slow: Option<String>,
    /// Stop at the first failure.
    #[arg(long, help_heading = "Running")]
    pub fail_fast: bool,
    /// Run every test even after a failure (overrides `fail-fast = true` in the config).
    #[arg(long, conflicts_with = "fail_fast", help_heading = "Running")]
    pub no_fail_fast: bool,
    /// Test order: history (default), name, random or random:SEED (DTF_ORDER).
    #[arg(long, value_name = "ORDER", help_heading = "Running")]
    pub order: Option<String>,
    /// Run every selected test N times, all attempts at once; each failing attempt is
    /// reported.
    #[arg(long, value_name = "N", help_heading = "Running")]
    pub repeat: Option<String>,
    /// Report a test that passed last time with the same binary, inputs, environment and
    /// arguments as `ok (unchanged)` without running it (keys kept in the history).
    #[arg(long, help_heading = "Running")]
    pub skip_unchanged: bool,
    /// Count flaky tests as failures for the exit code.
    #[arg(long, help_heading = "Running")]
    pub flaky_fails: bool,
    /// Show tests' output live instead of capturing it.
    #[arg(long, alias = "no-capture", help_heading = "Output")]
    pub nocapture: bool,
    /// Show the captured output of passing tests too.
    #[arg(long, help_heading = "Output")]
    pub show_output: bool,
    /// Output format: pretty, terse or json.
    #[arg(long, value_name = "FORMAT", help_heading = "Output")]
    pub format: Option<String>,
    /// Terse output (one character per test).
    #[arg(short, long, help_heading = "Output")]
    pub quiet: bool,
    /// Color: auto, always or never.
    #[arg(long, value_name = "WHEN", help_heading = "Output")]
    pub color: Option<String>,
    /// Also write one JUnit XML report for the run here (DTF_JUNIT).
    #[arg(long, value_name = "PATH", help_heading = "Output")]
    pub junit: Option<String>,
    /// Also write one self-contained HTML page for the run here (DTF_HTML).
    #[arg(long, value_name = "PATH", help_heading = "Output")]
    pub html: Option<String>,
    /// Arguments after `--`, passed to every test binary's run of a test.
    #[arg(last = true, value_name = "BINARY_ARGS")]
    pub binary_args: Vec<String>,
}

/// `cargo dtf list`.
#[derive(Clone, Debug, Default, Args)]
pub struct ListArgs {
    /// Targets to build.
    #[command(flatten)]
    pub build: BuildArgs,
    /// Tests to pick.
    #[command(flatten)]
    pub select: SelectArgs,
    /// dtf's profile from .config/dtf.toml (DTF_PROFILE).
    #[arg(short = 'P', long, value_name = "NAME")]
    pub profile: Option<String>,
    /// Output format: human (default, `BINARY_ID TEST` lines), terse or json.
    #[arg(long, value_name = "FORMAT")]
    pub format: Option<String>,
}

/// The arguments after `cargo dtf` (cargo passes `dtf` first), with `run` put in front when no
/// subcommand is named.
pub fn normalize(args: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut args: Vec<String> = args.into_iter().collect();
    let program = if args.is_empty() {
        "cargo-dtf".to_owned()
    } else {
        args.remove(0)
    };
    if args.first().is_some_and(|a| a == "dtf") {
        args.remove(0);
    }
    let named = match args.first() {
        Some(first) => {
            SUBCOMMANDS.contains(&first.as_str())
                || matches!(first.as_str(), "-h" | "--help" | "-V" | "--version")
        }
        None => false,
    };
    let mut out = vec![program];
    if !named {
        out.push("run".to_owned());
    }
    out.extend(args);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(normalize(args.iter().map(|s| s.to_string())))
    }

    #[test]
    fn run_is_the_default_and_filters_follow() {
        let cli = parse(&["cargo-dtf", "dtf", "parses", "-p", "a", "--", "--x"]).unwrap();
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert_eq!(run.select.filters, ["parses"]);
        assert_eq!(run.build.packages, ["a"]);
        assert_eq!(run.binary_args, ["--x"]);
        let cli = parse(&["cargo-dtf", "dtf"]).unwrap();
        assert!(matches!(cli.command, Command::Run(_)));
        let cli = parse(&["cargo-dtf", "dtf", "run", "list"]).unwrap();
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert_eq!(run.select.filters, ["list"], "`list` is a filter after run");
    }

    #[test]
    fn list_and_migrate_are_subcommands() {
        assert!(matches!(
            parse(&["cargo-dtf", "dtf", "list", "--workspace"])
                .unwrap()
                .command,
            Command::List(_)
        ));
        assert!(matches!(
            parse(&["cargo-dtf", "dtf", "migrate"]).unwrap().command,
            Command::Migrate(_)
        ));
    }

    #[test]
    fn cargo_flags_pass_through() {
        let cli = parse(&[
            "cargo-dtf",
            "dtf",
            "--workspace",
            "--exclude",
            "x",
            "--features",
            "f",
            "--all-features",
            "--no-default-features",
            "--release",
            "--cargo-profile",
            "ci",
            "--target",
            "x86_64-unknown-linux-gnu",
            "--lib",
            "--bins",
            "--tests",
            "--test",
            "integration",
            "--examples",
            "--benches",
            "-P",
            "ci",
            "-E",
            "test(a)",
        ])
        .unwrap();
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert!(run.build.workspace && run.build.release && run.build.lib);
        assert_eq!(run.build.test_targets, ["integration"]);
        assert_eq!(run.profile.as_deref(), Some("ci"));
        assert_eq!(run.select.filter_expr, ["test(a)"]);
    }
}
