//! The core harness, end to end: a real dtf test binary (tests/fixture) run with libtest's
//! flags, every outcome kind in a real child process.

use dtf_e2e::*;

#[test]
fn smoke() {
    let run = run_dtf(&fixture(), &["pass_plain"]);
    assert_eq!(run.code, Some(0), "{}", run.dump());
}
