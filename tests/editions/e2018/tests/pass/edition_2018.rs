//! Edition 2018: `#[dtf::test]`, `use dtf::test;` (also in a nested module with `use super::*;`) and the runtime options of `async fn` tests.

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
async fn on_current_thread() {
    let flavor = tokio::runtime::Handle::current().runtime_flavor();
    assert_eq!(flavor, tokio::runtime::RuntimeFlavor::CurrentThread);
}

#[dtf::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_two_workers() {
    let handle = tokio::runtime::Handle::current();
    assert_eq!(handle.runtime_flavor(), tokio::runtime::RuntimeFlavor::MultiThread);
    assert_eq!(handle.metrics().num_workers(), 2);
}

#[dtf::test(start_paused = true)]
async fn paused_clock() {
    let start = tokio::time::Instant::now();
    let wall = std::time::Instant::now();
    tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
    assert!(start.elapsed() >= std::time::Duration::from_secs(3600));
    assert!(wall.elapsed() < std::time::Duration::from_secs(60));
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
        "nested::deeper::rooted",
        "nested::glob_and_explicit",
        "nested::path_in_nested",
        "on_current_thread",
        "on_two_workers",
        "panics",
        "paused_clock",
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
