#[dtf::test(timeout = "1s", retries = 1, timeout = "2s")]
fn twice() {}

#[dtf::test(env(FOO = "1", FOO = "2"))]
fn same_variable_twice() {}

fn main() {}
