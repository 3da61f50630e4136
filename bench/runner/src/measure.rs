//! Timing and building: run a command several times, take the median; build the suites.

use std::collections::HashMap;
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

/// Runs `cmd` to completion (output discarded): its wall time and the CPU time (user + system)
/// of it and every descendant it waited for, from `wait4`.
pub fn time_and_cpu(cmd: &mut Command) -> Result<(Duration, Duration), String> {
    let started = Instant::now();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    let (wall, cpu, _) = wait_usage(child, started)?;
    Ok((wall, cpu))
}

/// Waits for `child` (started at `started`) with `wait4`: its wall time, CPU time (user +
/// system, with the descendants it waited for) and peak RSS in KiB. A failure exit is an error.
pub fn wait_usage(
    child: std::process::Child,
    started: Instant,
) -> Result<(Duration, Duration, u64), String> {
    let pid = child.id() as i32;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value; wait4 fills it for our own child.
    let mut usage: nix::libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our child, not yet waited for; both out-pointers are valid.
    let rc = unsafe { nix::libc::wait4(pid, &mut status, 0, &mut usage) };
    let wall = started.elapsed();
    std::mem::forget(child); // reaped by wait4 above
    if rc != pid {
        return Err(format!("wait4 failed: {}", std::io::Error::last_os_error()));
    }
    if !(nix::libc::WIFEXITED(status) && nix::libc::WEXITSTATUS(status) == 0) {
        return Err(format!("process {pid} failed (status {status:#x})"));
    }
    let tv = |t: nix::libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    Ok((
        wall,
        tv(usage.ru_utime) + tv(usage.ru_stime),
        usage.ru_maxrss as u64,
    ))
}

/// The medians of wall and CPU time over `reps` runs, after one untimed warm-up run.
pub fn time_and_cpu_median(
    reps: usize,
    mut make: impl FnMut() -> Command,
) -> Result<(Duration, Duration), String> {
    time_and_cpu(&mut make())?;
    let (mut walls, mut cpus) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        let (wall, cpu) = time_and_cpu(&mut make())?;
        walls.push(wall);
        cpus.push(cpu);
    }
    Ok((median(walls), median(cpus)))
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
    let release = [
        "build",
        "--release",
        "-p",
        "dtf-bench-suites",
        "-p",
        "dtf-worker",
        "--bin",
        "dtf-worker",
        "-p",
        "dtf-bench",
        "--bin",
        "dtf-fake-worker",
    ];
    cargo_executables(&release, targets, "the benchmark suites")
}

/// Builds the given test targets of the suites crate in the profile `cargo test` uses (debug);
/// returns the executables by target name.
pub fn debug_executables(targets: &[&str]) -> Result<HashMap<String, PathBuf>, String> {
    let debug = ["test", "--no-run", "-p", "dtf-bench-suites"];
    cargo_executables(&debug, targets, "the debug benchmark suites")
        .map(|found| found.into_iter().collect())
}

/// Runs cargo with `args` and `--test` for each of `targets`; the executables it built.
fn cargo_executables(
    args: &[&str],
    targets: &[&str],
    what: &str,
) -> Result<Vec<(String, PathBuf)>, String> {
    let mut cmd = Command::new(cargo());
    cmd.current_dir(workspace_root())
        .args(args)
        .args(["--quiet", "--message-format=json"]);
    for t in targets {
        cmd.args(["--test", t]);
    }
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !out.status.success() {
        return Err(format!("cargo build of {what} failed"));
    }
    Ok(executables(&out.stdout))
}

/// The executables cargo's JSON messages name, by target name.
fn executables(json_lines: &[u8]) -> Vec<(String, PathBuf)> {
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(json_lines).lines() {
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
    found
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
