//! How `cargo dtf` learns a dtf binary's tests with everything needed to run them: it runs the
//! binary with [`DESCRIBE_VAR`] set (and the run's flags), and the binary prints one JSON
//! line per test — its name, whether it is ignored, and the [`RunSpec`] its attributes, the
//! flags, the variables and the config file resolve to (the same code as the binary's own
//! runs, so both entry points agree). A libtest binary ignores the variable and prints its
//! usual `--list` lines, which tells the two kinds apart.

use serde::{Deserialize, Serialize};

use crate::registry::Isolation;
use crate::sandbox::RunSpec;

/// The variable: a JSON [`Context`].
pub const DESCRIBE_VAR: &str = "__DTF_DESCRIBE";

/// The first line a dtf binary prints when described.
pub const HEADER: &str = r#"{"dtf-describe":1}"#;

/// Where the described binary sits in the workspace (for the config file's filters).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Context {
    /// The binary's target name.
    pub binary: String,
    /// Its id (`my-pkg::integration`).
    pub binary_id: String,
    /// Its package.
    pub package: String,
    /// Its kind.
    pub kind: String,
}

/// One test of a described binary.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Described {
    /// Its full name.
    pub name: String,
    /// `#[ignore]`.
    pub ignored: bool,
    /// The reason of `#[ignore = "..."]`.
    pub ignore_reason: Option<String>,
    /// The isolation level asked for, before a fallback (`full-or-env` stays itself).
    pub isolation: Isolation,
    /// How to run it (at `full` for `full` and `full-or-env`).
    pub spec: RunSpec,
    /// Retries allowed.
    pub retries: u32,
    /// Slots it takes.
    pub threads: usize,
    /// Its test group.
    pub group: Option<String>,
}
