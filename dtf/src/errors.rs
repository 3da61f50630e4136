//! Errors a user can cause, with messages that say what was wrong and what to do. They end a
//! run before any test starts, with exit code 101 (libtest's code for a failed run).

use thiserror::Error;

/// A run that cannot start.
#[derive(Debug, Error)]
pub enum Error {
    /// An environment variable dtf reads holds a value it cannot use.
    #[error("invalid {var}={value:?}: {message}")]
    BadEnv {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// What is wrong with it.
        message: String,
    },
    /// A flag holds a value dtf cannot use.
    #[error("invalid {flag}: {message}")]
    BadFlag {
        /// The flag.
        flag: &'static str,
        /// What is wrong.
        message: String,
    },
    /// Isolation level `full` was asked for and the kernel refuses namespaces.
    #[error(
        "isolation level `full` is not available: {reason}\n\
         help: fix the cause above, or run with `--isolation full-or-env` (DTF_ISOLATION=full-or-env) \
         to run these tests at level `env` instead, with a warning"
    )]
    NamespacesRefused {
        /// What the kernel said.
        reason: String,
    },
    /// The config file cannot be used.
    #[error("{0}")]
    Config(crate::config::ConfigError),
    /// Distributed mode could not start.
    #[error("{0}")]
    Workers(String),
    /// The input tree of a distributed run cannot be computed (or is over its cap).
    #[cfg(feature = "distributed")]
    #[error("{0}")]
    Inputs(#[from] crate::inputs::InputError),
    /// The directory for the tests' private directories could not be made.
    #[error("cannot prepare the tests' temporary directories: {0}")]
    TempDir(String),
    /// A `#[dtf::warm_up]` failed in the fork server.
    #[error("{0}\nhelp: the warm-ups run once, before any test starts; no test ran")]
    WarmUp(String),
    /// The runtime could not start.
    #[error("cannot start the test runner: {0}")]
    Runtime(std::io::Error),
}
