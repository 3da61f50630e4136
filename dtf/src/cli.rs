//! The command line: libtest's flags with libtest's meaning (so `cargo test`, IDEs and
//! cargo-nextest drive a dtf binary unchanged), plus dtf's own, each with an environment
//! variable.

use std::time::Duration;

use clap::{ArgAction, Parser, ValueEnum};

use crate::registry::Isolation;

/// Output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// libtest's default: one line per test.
    Pretty,
    /// libtest's `-q`: one character per test.
    Terse,
    /// libtest's JSON event stream.
    Json,
    /// JUnit XML on stdout.
    Junit,
}

/// When to color the output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Color {
    /// Color when stdout is a terminal.
    Auto,
    /// Always color.
    Always,
    /// Never color.
    Never,
}

/// The order tests start in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// Longest first by recorded durations (tests never seen and tests that failed last time
    /// first); name order without history.
    History,
    /// By name.
    Name,
    /// Shuffled with a seed (printed, so the order can be replayed).
    Random(Option<u64>),
}

impl std::str::FromStr for Order {
    type Err = String;

    fn from_str(s: &str) -> Result<Order, String> {
        match s {
            "history" => Ok(Order::History),
            "name" => Ok(Order::Name),
            "random" => Ok(Order::Random(None)),
            _ => match s.strip_prefix("random:") {
                Some(seed) => seed.parse().map(|n| Order::Random(Some(n))).map_err(|_| {
                    format!("invalid seed `{seed}` in `--order {s}`: expected random:NUMBER")
                }),
                None => Err(format!(
                    "unknown order `{s}`: expected history, name, random or random:SEED"
                )),
            },
        }
    }
}

/// The arguments of a dtf test binary.
#[derive(Debug, Parser)]
#[command(
    name = "dtf test binary",
    about = "Runs this binary's tests, each in its own isolated process (dtf).",
    long_about = None,
    disable_version_flag = true,
    after_help = "Environment: RUST_TEST_THREADS, DTF_TIMEOUT, DTF_ISOLATION, DTF_PASS_ENV, \
                  DTF_KEEP_TMP, DTF_RETRIES, DTF_JUNIT, DTF_HTML, DTF_PROFILE, DTF_CONFIG, DTF_ORDER, DTF_HISTORY_DIR, DTF_WORKERS, \
                  DTF_REQUIRE_WORKERS, DTF_WORKER_WAIT, DTF_WORKERS_REFRESH, \
                  DTF_TOKEN. See dtf's README."
)]
pub struct Args {
    /// Run only tests whose names contain one of these (exact names with --exact).
    #[arg(value_name = "FILTER")]
    pub filters: Vec<String>,
    /// Match filters and --skip exactly rather than as substrings.
    #[arg(long)]
    pub exact: bool,
    /// Skip tests whose names contain this (repeatable).
    #[arg(long, value_name = "FILTER", action = ArgAction::Append)]
    pub skip: Vec<String>,
    /// Run only ignored tests.
    #[arg(long)]
    pub ignored: bool,
    /// Run ignored tests too.
    #[arg(long)]
    pub include_ignored: bool,
    /// List tests instead of running them.
    #[arg(long)]
    pub list: bool,
    /// Output format: pretty, terse, json or junit.
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// Show tests' output live instead of capturing it.
    #[arg(long, alias = "no-capture")]
    pub nocapture: bool,
    /// Show the captured output of passing tests too.
    #[arg(long)]
    pub show_output: bool,
    /// How many tests run at once (default: the available parallelism; RUST_TEST_THREADS).
    #[arg(long, value_name = "N")]
    pub test_threads: Option<String>,
    /// Terse output (one character per test).
    #[arg(short, long)]
    pub quiet: bool,
    /// Color the output: auto, always or never.
    #[arg(long, value_enum, default_value = "auto")]
    pub color: Color,
    /// Accepted for libtest compatibility (dtf runs tests only).
    #[arg(long)]
    pub test: bool,
    /// Accepted for libtest compatibility (dtf has no benchmarks).
    #[arg(long)]
    pub bench: bool,
    /// Accepted for libtest compatibility (`-Z unstable-options`).
    #[arg(short = 'Z', value_name = "OPTION", action = ArgAction::Append)]
    pub unstable: Vec<String>,
    /// Accepted for libtest compatibility; ignored.
    #[arg(long, hide = true)]
    pub report_time: bool,
    /// Accepted for libtest compatibility; ignored.
    #[arg(long, hide = true)]
    pub ensure_time: bool,
    /// Accepted for libtest compatibility; ignored.
    #[arg(long, hide = true, value_name = "PATH")]
    pub logfile: Option<String>,
    /// libtest's shuffle: same as `--order random`.
    #[arg(long, hide = true)]
    pub shuffle: bool,
    /// libtest's shuffle seed: same as `--order random:SEED`.
    #[arg(long, hide = true, value_name = "SEED")]
    pub shuffle_seed: Option<u64>,
    /// Skip `#[should_panic]` tests (libtest compatibility).
    #[arg(long)]
    pub exclude_should_panic: bool,
    /// Accepted for libtest compatibility; dtf always runs each test in its own process.
    #[arg(long, hide = true)]
    pub force_run_in_process: bool,

    /// Kill each test after this long, e.g. 500ms, 30s, 2m (DTF_TIMEOUT; an attribute wins).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_arg)]
    pub timeout: Option<Duration>,
    /// Isolation level: process, env (default), full or full-or-env (DTF_ISOLATION).
    #[arg(long, value_name = "LEVEL")]
    pub isolation: Option<Isolation>,
    /// Limit each test's memory, e.g. 512MiB (DTF_MEMORY; an attribute wins).
    #[arg(long, value_name = "SIZE", value_parser = parse_size_arg)]
    pub memory: Option<u64>,
    /// Retry failing tests up to N times; a test that then passes is FLAKY (DTF_RETRIES).
    #[arg(long, value_name = "N")]
    pub retries: Option<u32>,
    /// Count flaky tests as failures for the exit code.
    #[arg(long)]
    pub flaky_fails: bool,
    /// A test that leaves processes running outside its process group fails (otherwise the
    /// leak is reported and the test passes).
    #[arg(long)]
    pub leak_fails: bool,
    /// Test order: history (default), name, random or random:SEED (DTF_ORDER).
    #[arg(long, value_name = "ORDER")]
    pub order: Option<Order>,
    /// Stop at the first failure: running tests are killed, the rest reported as not run.
    #[arg(long)]
    pub fail_fast: bool,
    /// Also write a JUnit XML report to this file (DTF_JUNIT).
    #[arg(long, value_name = "PATH")]
    pub junit: Option<String>,
    /// Also write a self-contained HTML page of the run to this file (DTF_HTML).
    #[arg(long, value_name = "PATH")]
    pub html: Option<String>,
    /// Print a notice for tests running longer than this (default 60s).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_arg)]
    pub slow: Option<Duration>,
    /// Run on these dtf-worker services: host:port, dns:NAME:PORT, file:PATH (mixed, comma
    /// separated), or local:N (DTF_WORKERS).
    #[arg(long, value_name = "WORKERS")]
    pub workers: Option<String>,
}

impl Args {
    /// The format, with `-q` meaning terse.
    pub fn format(&self) -> Format {
        match self.format {
            Some(f) => f,
            None if self.quiet => Format::Terse,
            None => Format::Pretty,
        }
    }
}

/// Parses a duration such as `500ms`, `2s`, `1.5s`, `1m`, `1h` or `250us`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || {
        format!(
            "invalid duration `{s}`: expected a number followed by a unit, such as 500ms, 2s or 1m"
        )
    };
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(bad)?;
    let (number, unit) = s.split_at(split);
    let number: f64 = number.parse().map_err(|_| bad())?;
    let scale = match unit.trim() {
        "ns" => 1e-9,
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "s" | "sec" | "secs" => 1.0,
        "m" | "min" | "mins" => 60.0,
        "h" => 3600.0,
        _ => return Err(bad()),
    };
    let secs = number * scale;
    if !secs.is_finite() || secs <= 0.0 || secs > 1e9 {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses a size such as `512MiB`, `1GB`, `64KiB` or `1048576` (bytes).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad =
        || format!("invalid size `{s}`: expected a number and a unit, such as 512MiB or 2GiB");
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let number: u64 = number.parse().map_err(|_| bad())?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KB" => 1000,
        "KiB" => 1 << 10,
        "M" | "MB" => 1000 * 1000,
        "MiB" => 1 << 20,
        "G" | "GB" => 1000 * 1000 * 1000,
        "GiB" => 1 << 30,
        _ => return Err(bad()),
    };
    number.checked_mul(scale).filter(|&n| n > 0).ok_or_else(bad)
}

fn parse_duration_arg(s: &str) -> Result<Duration, String> {
    parse_duration(s)
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    parse_size(s)
}

/// Parses `--test-threads` / `RUST_TEST_THREADS`.
pub fn parse_threads(s: &str, source: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err(format!("{source} must be at least 1, got 0")),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{source} must be a positive number, got `{s}`")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("bin").chain(list.iter().copied()))
    }

    #[test]
    fn accepts_what_cargo_ides_and_nextest_pass() {
        let a = args(&["--exact", "a::b", "--nocapture", "--ignored"]).unwrap();
        assert!(a.exact && a.nocapture && a.ignored);
        assert_eq!(a.filters, ["a::b"]);
        let a = args(&["--list", "--format", "terse"]).unwrap();
        assert!(a.list);
        assert_eq!(a.format(), Format::Terse);
        let a = args(&[
            "-Z",
            "unstable-options",
            "--format",
            "json",
            "--show-output",
        ])
        .unwrap();
        assert_eq!(a.format(), Format::Json);
        let a = args(&[
            "--skip",
            "x",
            "--skip",
            "y",
            "f1",
            "f2",
            "--no-capture",
            "-q",
        ])
        .unwrap();
        assert_eq!(a.skip, ["x", "y"]);
        assert_eq!(a.filters, ["f1", "f2"]);
        assert!(a.nocapture);
        assert_eq!(a.format(), Format::Terse);
        assert!(
            args(&[
                "--test-threads",
                "3",
                "--color",
                "never",
                "--test",
                "--bench"
            ])
            .is_ok()
        );
    }

    #[test]
    fn rejects_unknown_flags() {
        let err = args(&["--frobnicate"]).unwrap_err();
        assert!(err.to_string().contains("--frobnicate"), "{err}");
    }

    #[test]
    fn parses_durations_and_sizes() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("0s").is_err());
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("1GB"), Ok(1_000_000_000));
        assert!(parse_size("12 bananas").is_err());
        assert!(parse_threads("0", "--test-threads").is_err());
        assert_eq!(parse_threads("4", "--test-threads"), Ok(4));
    }

    #[test]
    fn parses_orders() {
        assert_eq!("random:42".parse::<Order>(), Ok(Order::Random(Some(42))));
        assert_eq!("name".parse::<Order>(), Ok(Order::Name));
        assert!("sideways".parse::<Order>().is_err());
    }
}
