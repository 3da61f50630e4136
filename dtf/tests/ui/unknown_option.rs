#[dtf::test(timout = "1s")]
fn misspelled() {}

#[dtf::test(timeout = "1s", ignore)]
fn marker_as_option() {}

fn main() {}
