//! # shell-env — a tiny shell that owns its process
//!
//! [`Shell`] runs command lines made of five builtins:
//!
//! | command | effect |
//! | --- | --- |
//! | `cd [DIR]` | changes the working directory: to `$HOME` without an argument, to `$OLDPWD` with `-` (and prints it); updates `PWD` and `OLDPWD` |
//! | `pwd [-L\|-P]` | prints the working directory: `$PWD` (`-L`, the default) or the one the operating system reports (`-P`) |
//! | `echo [-n] ARGS` | prints its arguments separated by spaces; `-n` leaves out the newline |
//! | `export NAME=VALUE...` | sets environment variables; without arguments, lists them |
//! | `unset NAME...` | removes environment variables |
//!
//! Words are split and expanded like in `sh`: quotes, `$NAME`, `${NAME}` and `~` at the start of
//! a word (see [`Shell::run_line`]).
//!
//! ## The process is the shell's state
//!
//! Like every real shell, this one keeps no copy of its variables or of its working directory:
//! `export` and `unset` change the environment of the process ([`std::env::set_var`],
//! [`std::env::remove_var`]) and `cd` changes its working directory
//! ([`std::env::set_current_dir`]). Whatever the process runs next, a child process, a relative
//! [`std::fs`] path or [`std::env::var`], sees the change.
//!
//! The price is that a `Shell` must own its process: create one per process and run nothing
//! else that reads or writes the environment or the working directory on other threads.
//!
//! ```
//! use shell_env::Shell;
//!
//! let mut sh = Shell::new();
//! sh.run_line("export GREETING=hello")?;
//! assert_eq!(sh.run_line(r#"echo "$GREETING, ${GREETING}!""#)?.text(), "hello, hello!");
//! assert_eq!(std::env::var("GREETING").as_deref(), Ok("hello"));
//!
//! sh.run_line("unset GREETING")?;
//! assert_eq!(sh.run_line("echo [$GREETING]")?.text(), "[]");
//! # Ok::<(), shell_env::ShellError>(())
//! ```

use std::env;
use std::ffi::OsStr;
use std::fmt;
use std::path::{Component, Path, PathBuf};

mod error;
mod words;

pub use error::ShellError;

/// A shell whose variables are the process's environment and whose working directory is the
/// process's working directory.
///
/// See the [crate documentation](crate) for the builtins and for why a `Shell` must own its
/// process.
#[derive(Debug)]
pub struct Shell {
    _private: (),
}

impl Shell {
    /// Starts a shell in the process's current working directory.
    ///
    /// Like `sh` at startup, it keeps `PWD` when `PWD` names the current directory (it may
    /// spell it through symbolic links) and otherwise sets `PWD` to the directory the operating
    /// system reports.
    pub fn new() -> Shell {
        if let Ok(cwd) = env::current_dir() {
            let pwd_is_current = env::var_os("PWD")
                .map(PathBuf::from)
                .is_some_and(|pwd| pwd.is_absolute() && same_dir(&pwd, &cwd));
            if !pwd_is_current {
                set_env("PWD", &cwd);
            }
        }
        Shell { _private: () }
    }

    /// Runs one command line and returns what it printed.
    ///
    /// The line is split into words: unquoted whitespace separates them, `'...'` is literal,
    /// `"..."` expands variables, `\` escapes the next character and an unquoted `#` at the start
    /// of a word starts a comment. `$NAME` and `${NAME}` expand to the variable's value (nothing
    /// when it is unset), and `~` at the start of a word, alone or before `/`, to `$HOME`.
    /// Expansions are not split into fields.
    ///
    /// The first word names the builtin; an empty line or a comment does nothing.
    ///
    /// # Errors
    ///
    /// Returns a [`ShellError`] when the line cannot be parsed, names no builtin, or the builtin
    /// fails (`cd` into a missing directory, `cd` without `HOME`, an invalid variable name, ...).
    /// A failed command changes nothing.
    pub fn run_line(&mut self, line: &str) -> Result<Output, ShellError> {
        let words = words::split(line, |name| {
            env::var_os(name).map(|value| value.to_string_lossy().into_owned())
        })?;
        let Some((command, args)) = words.split_first() else {
            return Ok(Output::default());
        };
        match command.as_str() {
            "cd" => self.cd(args),
            "pwd" => self.pwd(args),
            "echo" => Ok(echo(args)),
            "export" => self.export(args),
            "unset" => self.unset(args),
            _ => Err(ShellError::UnknownCommand(command.clone())),
        }
    }

    fn cd(&mut self, args: &[String]) -> Result<Output, ShellError> {
        let (target, print) = match args {
            [] => (non_empty_var("HOME").ok_or(ShellError::HomeNotSet)?, false),
            [dash] if dash == "-" => (
                non_empty_var("OLDPWD").ok_or(ShellError::OldPwdNotSet)?,
                true,
            ),
            [dir] => (PathBuf::from(dir), false),
            _ => return Err(ShellError::TooManyArguments { builtin: "cd" }),
        };

        let old = logical_cwd()?;
        // Like `cd -L`: `..` removes the previous component of the path as written, so a
        // directory reached through a symbolic link is left the way it was entered.
        let logical = normalize(&old.join(&target));
        let new = if env::set_current_dir(&logical).is_ok() {
            logical
        } else {
            // The logical path names nothing (`..` after a symbolic link can do that): let the
            // operating system resolve the path as written, and report its error if it fails too.
            env::set_current_dir(&target).map_err(|source| ShellError::ChangeDir {
                dir: target.clone(),
                source,
            })?;
            env::current_dir().map_err(ShellError::CurrentDir)?
        };

        set_env("OLDPWD", &old);
        set_env("PWD", &new);
        Ok(if print {
            Output::line(new.display())
        } else {
            Output::default()
        })
    }

    fn pwd(&mut self, args: &[String]) -> Result<Output, ShellError> {
        let physical = match args {
            [] => false,
            [option] if option == "-L" => false,
            [option] if option == "-P" => true,
            [option] if option.starts_with('-') => {
                return Err(ShellError::InvalidOption {
                    builtin: "pwd",
                    option: option.clone(),
                });
            }
            _ => return Err(ShellError::TooManyArguments { builtin: "pwd" }),
        };
        let dir = if physical {
            env::current_dir().map_err(ShellError::CurrentDir)?
        } else {
            logical_cwd()?
        };
        Ok(Output::line(dir.display()))
    }

    fn export(&mut self, args: &[String]) -> Result<Output, ShellError> {
        if args.is_empty() {
            let mut vars: Vec<_> = env::vars_os()
                .map(|(name, value)| {
                    format!("{}={}\n", name.to_string_lossy(), value.to_string_lossy())
                })
                .collect();
            vars.sort();
            return Ok(Output {
                stdout: vars.concat(),
            });
        }

        // Check every assignment before making any, so that a failed `export` changes nothing.
        let mut assignments = Vec::with_capacity(args.len());
        for arg in args {
            let (name, value) = arg
                .split_once('=')
                .ok_or_else(|| ShellError::ExpectedAssignment(arg.clone()))?;
            if !words::is_name(name) {
                return Err(ShellError::InvalidName {
                    builtin: "export",
                    name: name.to_owned(),
                });
            }
            if value.contains('\0') {
                return Err(ShellError::NulInValue(name.to_owned()));
            }
            assignments.push((name, value));
        }
        for (name, value) in assignments {
            set_env(name, value);
        }
        Ok(Output::default())
    }

    fn unset(&mut self, args: &[String]) -> Result<Output, ShellError> {
        if let Some(name) = args.iter().find(|name| !words::is_name(name)) {
            return Err(ShellError::InvalidName {
                builtin: "unset",
                name: name.clone(),
            });
        }
        for name in args {
            remove_env(name);
        }
        Ok(Output::default())
    }
}

impl Default for Shell {
    /// The same as [`Shell::new`].
    fn default() -> Shell {
        Shell::new()
    }
}

/// What a command printed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Output {
    stdout: String,
}

impl Output {
    /// A single line of output: `text` and a newline.
    fn line(text: impl fmt::Display) -> Output {
        Output {
            stdout: format!("{text}\n"),
        }
    }

    /// Everything the command printed, newlines included.
    pub fn stdout(&self) -> &str {
        &self.stdout
    }

    /// What the command printed without its final newline: the value of `$(command)` in `sh`.
    pub fn text(&self) -> &str {
        self.stdout.strip_suffix('\n').unwrap_or(&self.stdout)
    }

    /// Whether the command printed nothing.
    pub fn is_empty(&self) -> bool {
        self.stdout.is_empty()
    }
}

impl fmt::Display for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.stdout)
    }
}

/// Sets an environment variable of the process.
fn set_env(name: &str, value: impl AsRef<OsStr>) {
    // SAFETY: the shell owns the process (see the crate documentation): its commands run one at
    // a time through `&mut Shell`, and nothing else in the process reads or writes the
    // environment on another thread, so this write cannot race with a read. `name` is an
    // identifier and values are checked for NUL bytes, so `set_var` does not panic.
    unsafe { env::set_var(name, value) }
}

/// Removes an environment variable of the process.
fn remove_env(name: &str) {
    // SAFETY: as in `set_env`: the shell owns the process, so no other thread is reading the
    // environment while the variable is removed. `name` is an identifier.
    unsafe { env::remove_var(name) }
}

/// The value of an environment variable as a path, when it is set and not empty.
fn non_empty_var(name: &str) -> Option<PathBuf> {
    env::var_os(name)
        .filter(|value| !value.is_empty())
        .map(PathBuf::from)
}

/// The working directory as the shell spells it: `$PWD` when it is an absolute path, otherwise
/// the directory the operating system reports.
fn logical_cwd() -> Result<PathBuf, ShellError> {
    match env::var_os("PWD").map(PathBuf::from) {
        Some(pwd) if pwd.is_absolute() => Ok(pwd),
        _ => env::current_dir().map_err(ShellError::CurrentDir),
    }
}

/// Removes `.` and resolves `..` in an absolute path without looking at the file system.
fn normalize(path: &Path) -> PathBuf {
    let mut normal = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                normal.pop();
            }
            other => normal.push(other),
        }
    }
    normal
}

/// Whether two paths name the same directory.
fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// `echo [-n] ARGS...`
fn echo(args: &[String]) -> Output {
    let (newline, args) = match args {
        [flag, rest @ ..] if flag == "-n" => (false, rest),
        _ => (true, args),
    };
    let mut stdout = args.join(" ");
    if newline {
        stdout.push('\n');
    }
    Output { stdout }
}

// The unit tests of this library run under dtf, like its integration tests (`harness = false`
// under `[lib]` in Cargo.toml).
#[cfg(test)]
dtf::main!();
