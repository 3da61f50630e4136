#[dtf::test]
unsafe fn dangerous() {}

fn main() {}
