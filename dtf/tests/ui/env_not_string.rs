#[dtf::test(env(FOO = 1))]
fn integer_value() {}

#[dtf::test(env(FOO = "1", BAR))]
fn missing_value() {}

#[dtf::test(env = "FOO=1")]
fn not_a_list() {}

fn main() {}
