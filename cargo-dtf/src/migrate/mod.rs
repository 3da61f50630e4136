//! `cargo dtf migrate`: moves a workspace's tests onto dtf.

use clap::Args as ClapArgs;

/// The arguments of `cargo dtf migrate`.
#[derive(Debug, ClapArgs)]
pub struct Args {
    /// What to migrate (see `cargo dtf migrate --help` once the command is available).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    pub rest: Vec<String>,
}

/// Runs `cargo dtf migrate`; returns the exit code.
pub fn run(_args: Args) -> Result<i32, String> {
    Err("`cargo dtf migrate` is not part of this build of cargo-dtf yet".to_owned())
}
