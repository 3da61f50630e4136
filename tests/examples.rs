//! The example crates behave as their READMEs say.

use std::time::Duration;

use dtf_e2e::*;

/// How many consecutive runs must pass under dtf (`DTF_E2E_RUNS` overrides).
fn runs() -> usize {
    std::env::var("DTF_E2E_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50)
}

#[test]
fn shell_env_passes_every_time_under_dtf() {
    let binary = test_binary("shell-env", "shell");
    for round in 1..=runs() {
        let run = run_bounded(&mut dtf_command(&binary), Duration::from_secs(60));
        assert_eq!(run.code, Some(0), "run {round} failed:\n{}", run.dump());
        assert!(
            run.stdout.contains("test result: ok. 13 passed; 0 failed"),
            "{}",
            run.dump()
        );
    }
}

#[test]
fn shell_env_fails_under_std_harness() {
    // The same cases as threads of one process: they race on the environment and the working
    // directory. Nearly every run fails; ten runs without a failure would mean the example no
    // longer demonstrates anything.
    let binary = test_binary_with("shell-env", "shell_std", &["std-harness"]);
    let mut failures = 0;
    for _ in 0..10 {
        let run = run_bounded(
            std::process::Command::new(&binary)
                .args(["--test-threads", "4"])
                .env("RUST_BACKTRACE", "0"),
            Duration::from_secs(60),
        );
        if run.code == Some(101) {
            failures += 1;
            break;
        }
    }
    assert!(
        failures > 0,
        "std's harness passed the racy suite 10 times in a row"
    );
}
