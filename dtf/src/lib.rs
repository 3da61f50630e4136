//! # dtf — a distributed, process-per-test harness for Rust
//!
//! Replace `#[test]` with `#[dtf::test]`, set `harness = false` on the test target and end it
//! with `dtf::main!();`. Every test then runs in its own fresh process with a hermetic
//! environment (a cleared environment plus an allowlist, a private `HOME` and `TMPDIR`), and
//! `cargo test` keeps libtest's flags, output and exit codes.
//!
//! ```ignore
//! #[dtf::test]
//! fn sets_home() {
//!     unsafe { std::env::set_var("HOME", "/nowhere") };
//!     assert_eq!(std::env::var("HOME").unwrap(), "/nowhere");
//! }
//!
//! dtf::main!();
//! ```
//!
//! See the README for the isolation levels, the CLI and distributed mode.

#![warn(missing_docs)]

pub use dtf_macros::{test, warm_up};

pub mod cli;
pub mod config;
#[cfg(feature = "distributed")]
pub mod coordinator;
pub mod describe;
pub mod engine;
pub mod errors;
pub mod filter;
mod harness;
pub mod history;
#[cfg(feature = "distributed")]
pub mod inputs;
pub mod order;
pub mod outcome;
pub mod plan;
#[cfg(feature = "distributed")]
pub mod protocol;
pub mod registry;
pub mod report;
pub mod runner;
pub mod sandbox;
pub mod scheduler;

pub use registry::{Isolation, ShouldPanic, Spawn, TestDef};

/// Generates the `main` function of a dtf test binary.
///
/// Put `dtf::main!();` at the root of a test target with `harness = false`, or
/// `#[cfg(test)] dtf::main!();` at the root of a library whose `[lib]` has `harness = false`.
#[macro_export]
macro_rules! main {
    () => {
        fn main() {
            $crate::__private::run_main($crate::__private::Package {
                manifest_dir: ::core::env!("CARGO_MANIFEST_DIR"),
                name: ::core::env!("CARGO_PKG_NAME"),
                kind: if ::core::option_env!("CARGO_BIN_NAME").is_some() {
                    "bin"
                } else if ::core::option_env!("CARGO_TARGET_TMPDIR").is_some() {
                    "test"
                } else {
                    "lib"
                },
                out_dir: ::core::option_env!("OUT_DIR"),
                target_tmpdir: ::core::option_env!("CARGO_TARGET_TMPDIR"),
            })
        }
    };
}

/// Items used by the code that `#[dtf::test]` and `dtf::main!()` generate. Not a stable API.
#[doc(hidden)]
pub mod __private {
    pub use crate::registry::{Isolation, ShouldPanic, Spawn, TestDef, WarmUp};
    pub use core;
    pub use inventory;

    /// Facts about the package that holds the test binary, captured at its compile time.
    #[derive(Clone, Copy, Debug)]
    pub struct Package {
        /// `CARGO_MANIFEST_DIR` of the test's package: the working directory of each test.
        pub manifest_dir: &'static str,
        /// `CARGO_PKG_NAME`.
        pub name: &'static str,
        /// The target's kind as cargo's variables tell it at compile time: `bin`, `test`
        /// (integration tests and benches) or `lib`.
        pub kind: &'static str,
        /// `OUT_DIR` of the package's build script, when it has one.
        pub out_dir: Option<&'static str>,
        /// `CARGO_TARGET_TMPDIR` (set for integration tests).
        pub target_tmpdir: Option<&'static str>,
    }

    /// Turns what a test function returns into pass or fail, like std's `Termination`.
    #[diagnostic::on_unimplemented(
        message = "a `#[dtf::test]` function must return `()` or `Result<T, E>` with `E: Debug`, not `{Self}`",
        label = "this return type cannot be judged as pass or fail"
    )]
    pub trait TestReturn {
        /// `Ok` when the test passed, `Err(message)` when it returned a failure.
        fn into_test_result(self) -> Result<(), String>;
    }

    impl TestReturn for () {
        fn into_test_result(self) -> Result<(), String> {
            Ok(())
        }
    }

    impl<T, E: std::fmt::Debug> TestReturn for Result<T, E> {
        fn into_test_result(self) -> Result<(), String> {
            match self {
                Ok(_) => Ok(()),
                Err(e) => Err(format!("{e:?}")),
            }
        }
    }

    /// The body of the `#[test]` twin of every `#[dtf::test]`: it only exists, and runs, when a
    /// target uses libtest's harness, which would otherwise ignore dtf's tests silently.
    #[track_caller]
    pub fn wrong_harness(test: &str) -> ! {
        panic!(
            "`{test}` is a #[dtf::test], but this target runs libtest's harness, which ignores dtf's \
             tests. Set `harness = false` for the target in Cargo.toml (`[[test]]` with \
             `harness = false`, or `harness = false` under `[lib]`) and end it with `dtf::main!();`"
        )
    }

    /// Runs an `async fn` test body on a fresh current-thread tokio runtime.
    pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
        block_on_runtime(Runtime::default(), future)
    }

    /// The tokio runtime of an `async fn` test, as `#[dtf::test(flavor = ..., worker_threads =
    /// ..., start_paused = ...)]` describes it (the options of `#[tokio::test]`).
    #[derive(Clone, Copy, Debug, Default)]
    pub struct Runtime {
        /// `flavor = "multi_thread"`; otherwise current-thread.
        pub multi_thread: bool,
        /// `worker_threads = N` of a multi-thread runtime; tokio's default otherwise.
        pub worker_threads: Option<usize>,
        /// `start_paused = true`: tokio's clock starts paused and auto-advances.
        pub start_paused: bool,
    }

    /// Runs an `async fn` test body on a fresh tokio runtime built as `runtime` says.
    pub fn block_on_runtime<F: std::future::Future>(runtime: Runtime, future: F) -> F::Output {
        let mut builder = if runtime.multi_thread {
            tokio::runtime::Builder::new_multi_thread()
        } else {
            tokio::runtime::Builder::new_current_thread()
        };
        if let Some(threads) = runtime.worker_threads {
            builder.worker_threads(threads);
        }
        builder.enable_all().start_paused(runtime.start_paused);
        let runtime = builder
            .build()
            .unwrap_or_else(|e| panic!("dtf: cannot start a tokio runtime for the test: {e}"));
        runtime.block_on(future)
    }

    /// The entry point behind `dtf::main!()`.
    pub fn run_main(package: Package) -> ! {
        crate::harness::run(package)
    }
}
