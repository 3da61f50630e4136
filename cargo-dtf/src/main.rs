//! `cargo dtf`: a thin command line over dtf's engine. It builds a workspace's test targets
//! through cargo, and runs the tests of every binary as one run (one queue, locally or on
//! `dtf-worker` services, one report).

#![warn(missing_docs)]

mod build;
mod cli;
mod migrate;
mod partition;
mod runner;
mod speculate;
mod unchanged;
mod workspace;

use clap::Parser;

use cli::{Cli, Command};

fn main() {
    // A libtest test at level `full` (or under a memory limit) runs below a relay: this
    // binary started again in the child role, which sets up the isolation and execs the test.
    if let Some(spec) = dtf::sandbox::child::take_spec() {
        dtf::sandbox::child::run(spec);
    }
    let args = cli::normalize(std::env::args());
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            std::process::exit(if e.use_stderr() { 101 } else { 0 });
        }
    };
    let result = match cli.command {
        Command::Run(args) => workspace::run(*args),
        Command::List(args) => workspace::list(*args),
        Command::Migrate(args) => migrate::run(args),
    };
    let code = match result {
        Ok(code) => code,
        Err(message) => {
            eprintln!("error: {message}");
            101
        }
    };
    std::process::exit(code)
}
