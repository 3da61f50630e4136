//! `cargo dtf run` and `cargo dtf list`: the workspace driver over dtf's engine.

use crate::cli::{ListArgs, RunArgs};

/// `cargo dtf run`: returns the exit code.
pub fn run(_args: RunArgs) -> Result<i32, String> {
    Err("`cargo dtf run` is being built".to_owned())
}

/// `cargo dtf list`: returns the exit code.
pub fn list(_args: ListArgs) -> Result<i32, String> {
    Err("`cargo dtf list` is being built".to_owned())
}
