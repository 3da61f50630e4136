#[dtf::test(memory = "512 megabytes")]
fn unknown_unit() {}

#[dtf::test(memory = "1.5B")]
fn fractional_bytes() {}

#[dtf::test(memory = "99999999999GiB")]
fn too_large() {}

#[dtf::test(memory = true)]
fn not_a_size() {}

fn main() {}
