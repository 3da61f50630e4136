//! `#[dtf::test]`, `use dtf::test;` and `dtf::main!()` in an edition 2018 crate: the case in
//! `tests/pass/` compiles and its `main` finds every test registered and passing.

#[test]
fn edition_2018() {
    trybuild::TestCases::new().pass("tests/pass/*.rs");
}
