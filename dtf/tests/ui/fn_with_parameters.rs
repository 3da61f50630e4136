#[dtf::test]
fn takes_one(n: u32) {
    let _ = n;
}

#[dtf::test]
fn takes_two(a: u32, b: &str) {
    let _ = (a, b);
}

fn main() {}
