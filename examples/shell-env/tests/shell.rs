//! The shell's tests under dtf: each test runs in its own process, with its own environment,
//! `HOME`, `TMPDIR` and working directory (the package root), so tests that `cd`, `export` and
//! `unset` cannot see each other. Run with `cargo test -p shell-env`.

// From here on, `#[test]` is `#[dtf::test]`.
use dtf::test;

include!("common/cases.rs");

dtf::main!();
