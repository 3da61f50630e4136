#[dtf::test]
#[should_panic(foo)]
fn unknown_argument() {}

#[dtf::test]
#[should_panic(expected = 42)]
fn expected_not_a_string() {}

#[dtf::test]
#[should_panic]
#[should_panic]
fn twice() {}

fn main() {}
