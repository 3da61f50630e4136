#[dtf::test(retries = "2")]
fn string() {}

#[dtf::test(retries = -1)]
fn negative() {}

#[dtf::test(retries = 5000000000)]
fn too_large() {}

fn main() {}
