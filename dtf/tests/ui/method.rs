struct Fixture;

impl Fixture {
    #[dtf::test]
    fn check(&self) {}
}

fn main() {}
