#[dtf::test]
struct Fixture;

#[dtf::test]
pub mod tests {}

#[dtf::test]
const ANSWER: u32 = 42;

fn main() {}
