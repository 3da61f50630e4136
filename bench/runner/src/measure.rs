//! Timing and building: run a command several times, take the median; build the suites.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The median of some durations (the mean of the middle two for an even count).
pub fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort_unstable();
    let n = samples.len();
    match n {
        0 => Duration::ZERO,
        _ if n % 2 == 1 => samples[n / 2],
        _ => (samples[n / 2 - 1] + samples[n / 2]) / 2,
    }
}

/// Runs `cmd` once to completion with its output discarded; its wall time, or an error naming
/// the command when it fails (`ok_codes` lists the exit codes that count as success).
pub fn time_once(cmd: &mut Command, ok_codes: &[i32]) -> Result<Duration, String> {
    let started = Instant::now();
    let out = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    let elapsed = started.elapsed();
    match out.status.code() {
        Some(code) if ok_codes.contains(&code) => Ok(elapsed),
        _ => Err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        )),
    }
}

/// The median wall time of `reps` runs of the command `make()` builds, after one untimed
/// warm-up run (page cache, cargo's up-to-date checks, workers' binary caches).
pub fn time_median(reps: usize, mut make: impl FnMut() -> Command) -> Result<Duration, String> {
    time_once(&mut make(), &[0])?;
    let mut samples = Vec::with_capacity(reps);
    for _ in 0..reps {
        samples.push(time_once(&mut make(), &[0])?);
    }
    Ok(median(samples))
}

/// `cargo`, as cargo itself names it when it runs us.
pub fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned())
}

/// The workspace root (two levels above this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Builds the given test targets of the suites crate and the worker in release mode; returns
/// the executables by target name.
pub fn build(targets: &[&str]) -> Result<Vec<(String, PathBuf)>, String> {
    let mut cmd = Command::new(cargo());
    cmd.current_dir(workspace_root()).args([
        "build",
        "--release",
        "--quiet",
        "--message-format=json",
        "-p",
        "dtf-bench-suites",
        "-p",
        "dtf-worker",
        "--bin",
        "dtf-worker",
    ]);
    for t in targets {
        cmd.args(["--test", t]);
    }
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !out.status.success() {
        return Err("cargo build of the benchmark suites failed".to_owned());
    }
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" {
            continue;
        }
        if let (Some(name), Some(exe)) =
            (msg["target"]["name"].as_str(), msg["executable"].as_str())
        {
            found.push((name.to_owned(), PathBuf::from(exe)));
        }
    }
    Ok(found)
}

/// A command for a dtf binary with no inherited dtf or libtest settings.
pub fn clean_command(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    for (name, _) in std::env::vars() {
        if name.starts_with("DTF_") || name.starts_with("RUST_TEST_") || name.starts_with("NEXTEST")
        {
            cmd.env_remove(name);
        }
    }
    cmd.env("RUST_BACKTRACE", "0");
    cmd
}

/// Formats seconds with three decimals.
pub fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        let ms = Duration::from_millis;
        assert_eq!(median(vec![ms(3), ms(1), ms(2)]), ms(2));
        assert_eq!(
            median(vec![ms(4), ms(1), ms(2), ms(3)]),
            Duration::from_micros(2500)
        );
        assert_eq!(median(vec![]), Duration::ZERO);
    }
}
