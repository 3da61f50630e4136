//! Compile-time checks of `#[dtf::test]`: every misuse in `tests/ui/*.rs` fails to compile with
//! the message in the `.stderr` file next to it, and `tests/ui/pass/*.rs` compiles and runs.
//!
//! After changing a message, regenerate the `.stderr` files with
//! `TRYBUILD=overwrite cargo test -p dtf --test compile_fail` and review the diff.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*.rs");
    t.pass("tests/ui/pass/*.rs");
}
