//! dtf's benchmark command. It builds the generated suites in `bench/suites` (release), runs
//! each measurement several times, and prints a table of medians and of ratios measured in the
//! same run; `--json PATH` also writes them as JSON.
//!
//! ```sh
//! cargo run --release -p dtf-bench -- all            # everything, 5 repetitions
//! cargo run --release -p dtf-bench -- local --reps 3  # one section
//! cargo run --release -p dtf-bench -- all --quick     # smoke mode: fewer tests, one repetition
//! ```

mod dispatch;
mod measure;
mod sections;
mod workers;
mod workspaces;

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

/// What to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Section {
    /// Per-test overhead on one machine: libtest, cargo-nextest, dtf at each isolation level.
    Local,
    /// Makespan against the lower bound on K local workers, on loopback and with latency.
    Distributed,
    /// Cold upload to 4 workers and bytes shipped on a warm re-run.
    Shipping,
    /// Input trees: 5,000 fixture files (50 MB) to 4 workers, cold and warm; the per-test cost
    /// of mapping paths in a mount namespace on a worker.
    Inputs,
    /// A skewed suite with and without duration history.
    Scheduling,
    /// Worker RSS idle and under load; the coordinator's peak RSS for 10 000 tests.
    Resources,
    /// Whole workspaces: cargo dtf against cargo test on workers and cargo nextest locally.
    Workspace,
    /// The fork server: fork against exec, CPU per test, nextest on a std-harness twin, the
    /// server's RSS, shared set-up with and without a warm-up.
    Fork,
    /// The coordinator's dispatch ceiling on fake workers with 1,000 slots; concurrent runs.
    Dispatch,
    /// All of the above.
    All,
}

#[derive(Debug, Parser)]
#[command(
    name = "dtf-bench",
    about = "Benchmarks dtf against libtest and cargo-nextest"
)]
struct Args {
    /// Which measurements to run.
    #[arg(value_enum, default_value = "all")]
    section: Section,
    /// Repetitions of each measurement (the median is reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Smoke mode: fewer tests and workers, one repetition; keeps the command working in CI.
    #[arg(long)]
    quick: bool,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn main() {
    let args = Args::parse();
    let reps = if args.quick { 1 } else { args.reps.max(1) };
    let mut bench = match sections::Bench::new(reps, args.quick) {
        Ok(bench) => bench,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    let all = args.section == Section::All;
    let mut failed = false;
    let mut run = |section: Section, f: fn(&mut sections::Bench) -> Result<(), String>| {
        if (all || args.section == section)
            && let Err(e) = f(&mut bench)
        {
            eprintln!("error in {section:?}: {e}");
            failed = true;
        }
    };
    run(Section::Local, sections::local);
    run(Section::Distributed, sections::distributed);
    run(Section::Shipping, sections::shipping);
    run(Section::Inputs, sections::inputs);
    run(Section::Scheduling, sections::scheduling);
    run(Section::Resources, sections::resources);
    run(Section::Workspace, workspaces::workspaces);
    run(Section::Fork, sections::fork);
    run(Section::Dispatch, dispatch::dispatch);
    bench.print_table();
    if let Some(path) = &args.json
        && let Err(e) = bench.write_json(path)
    {
        eprintln!("error: cannot write {}: {e}", path.display());
        failed = true;
    }
    if failed {
        std::process::exit(1);
    }
}
