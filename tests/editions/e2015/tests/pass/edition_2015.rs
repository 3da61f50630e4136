//! Edition 2015: a leading `::` names this crate's root, so `::dtf` and `::core` in generated
//! code would not resolve; `use` paths are relative to the crate root.

extern crate dtf;

use dtf::test;

#[test]
fn via_use() {}

#[dtf::test]
fn via_path() {}

#[dtf::test]
#[should_panic(expected = "boom")]
fn panics() {
    panic!("boom!")
}

#[dtf::test(timeout = "2s", env(A = "1"))]
#[ignore = "configured"]
fn configured() {}

#[dtf::test]
fn fallible() -> Result<(), String> {
    Ok(())
}

mod nested {
    use super::*;
    use dtf::test;

    #[test]
    fn glob_and_explicit() {
        via_path(); // from `super::*`
    }

    #[dtf::test]
    fn path_in_nested() {}

    mod deeper {
        #[::dtf::test]
        fn rooted() {}
    }
}

fn main() {
    check(&[
        "configured",
        "fallible",
        "nested::deeper::rooted",
        "nested::glob_and_explicit",
        "nested::path_in_nested",
        "panics",
        "via_path",
        "via_use",
    ]);
}

/// Every expected test is registered under its path, and each passes (or panics as it should).
fn check(expected: &[&str]) {
    use dtf::__private::{inventory, ShouldPanic, TestDef};
    std::panic::set_hook(Box::new(|_| {}));
    let mut names = Vec::new();
    for def in inventory::iter::<TestDef> {
        let path: Vec<&str> = def.module_path.split("::").skip(1).chain(Some(def.name)).collect();
        let name = path.join("::");
        let result = std::panic::catch_unwind(def.func);
        match def.should_panic {
            ShouldPanic::No => assert_eq!(result.ok(), Some(Ok(())), "{}", name),
            _ => assert!(result.is_err(), "{} should panic", name),
        }
        names.push(name);
    }
    names.sort();
    assert_eq!(names, expected);
}
