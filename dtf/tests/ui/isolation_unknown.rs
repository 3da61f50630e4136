#[dtf::test(isolation = "container")]
fn unknown_level() {}

fn main() {}
