//! The errors a command line can fail with.

use std::io;
use std::path::PathBuf;

/// Why [`Shell::run_line`](crate::Shell::run_line) could not run a line.
///
/// The messages read like a shell's: `cd: HOME not set`, `frobnicate: command not found`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ShellError {
    /// A `'` or `"` was opened and never closed.
    #[error("unexpected end of line: missing closing `{quote}`")]
    UnterminatedQuote {
        /// The quote character that is missing its partner.
        quote: char,
    },

    /// A `${...}` expansion that is unterminated or does not hold a variable name.
    #[error("bad substitution: `{0}`")]
    BadSubstitution(String),

    /// The first word of the line is not one of the builtins.
    #[error("{0}: command not found (builtins: cd, echo, export, pwd, unset)")]
    UnknownCommand(String),

    /// A builtin got more arguments than it takes.
    #[error("{builtin}: too many arguments")]
    TooManyArguments {
        /// The builtin that was called.
        builtin: &'static str,
    },

    /// A builtin got an option it does not know.
    #[error("{builtin}: invalid option `{option}`")]
    InvalidOption {
        /// The builtin that was called.
        builtin: &'static str,
        /// The option as written.
        option: String,
    },

    /// A variable name that is not an identifier (`[A-Za-z_][A-Za-z0-9_]*`).
    #[error("{builtin}: `{name}`: not a valid identifier")]
    InvalidName {
        /// The builtin that was called.
        builtin: &'static str,
        /// The name as written.
        name: String,
    },

    /// `export` got an argument without `=`.
    #[error("export: `{0}`: expected NAME=VALUE")]
    ExpectedAssignment(String),

    /// `export` got a value that contains a NUL byte, which no environment can hold.
    #[error("export: the value of `{0}` contains a NUL byte")]
    NulInValue(String),

    /// `cd` without an argument, while `HOME` is unset or empty.
    #[error("cd: HOME not set")]
    HomeNotSet,

    /// `cd -` while `OLDPWD` is unset or empty.
    #[error("cd: OLDPWD not set")]
    OldPwdNotSet,

    /// The operating system refused to change the working directory.
    #[error("cd: {}: {source}", dir.display())]
    ChangeDir {
        /// The directory as the command named it (after expansion).
        dir: PathBuf,
        /// What the operating system said.
        source: io::Error,
    },

    /// The working directory could not be read, for example because it was deleted.
    #[error("cannot read the current directory: {0}")]
    CurrentDir(#[source] io::Error),
}
