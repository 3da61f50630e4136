#[dtf::test]
#[ignore(reason = "slow")]
fn list_form() {}

#[dtf::test]
#[ignore = 5]
fn reason_not_a_string() {}

fn main() {}
