//! The same tests under std's harness: every test is a thread of one shared process, so a `cd`,
//! `export` or `unset` in one test changes the process under all the others, and the tests fail
//! at random. Run with `cargo test -p shell-env --features std-harness --test shell_std`.

include!("common/cases.rs");
