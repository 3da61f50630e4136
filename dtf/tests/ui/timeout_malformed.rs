#[dtf::test(timeout = "5 parsecs")]
fn unknown_unit() {}

#[dtf::test(timeout = "")]
fn empty() {}

#[dtf::test(timeout = "-1s")]
fn negative() {}

#[dtf::test(timeout = "0s")]
fn zero() {}

#[dtf::test(timeout = 5)]
fn not_a_string() {}

#[dtf::test(timeout)]
fn missing_value() {}

fn main() {}
