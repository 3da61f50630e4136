//! `#[harnessx::test]` where `Cargo.toml` says `harnessx = { package = "dtf-harness", ... }`: the
//! generated code finds the library under its new name (and no crate called `dtf` exists).

#[test]
fn renamed_dependency() {
    trybuild::TestCases::new().pass("tests/pass/*.rs");
}
