#[dtf::test]
fn type_generic<T: Default>() {
    let _ = T::default();
}

#[dtf::test]
fn const_generic<const N: usize>() {}

#[dtf::test]
fn lifetime_generic<'a>() {}

fn main() {}
