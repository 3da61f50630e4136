//! Helpers for dtf's end-to-end tests: build and locate real test binaries and the worker,
//! run them with a bounded wait, and inspect what they left behind.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned())
}

/// Builds `cargo build -p PACKAGE <target flag>` once per process and returns the executable.
/// `target` is `--test NAME` or `--bin NAME`.
fn build(package: &str, kind: &str, name: &str, features: &[&str]) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let key = format!("{package}/{kind}/{name}/{}", features.join(","));
    let built = BUILT.get_or_init(Default::default);
    let mut built = built.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(path) = built.get(&key) {
        return path.clone();
    }
    let mut cmd = Command::new(cargo());
    cmd.current_dir(workspace_root())
        .args(["build", "--quiet", "--message-format=json", "-p", package])
        .arg(format!("--{kind}"))
        .arg(name);
    if !features.is_empty() {
        cmd.arg("--features").arg(features.join(","));
    }
    let output = cmd.stderr(Stdio::inherit()).output().expect("cargo runs");
    assert!(output.status.success(), "cargo build of {key} failed");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let exe = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == name)
        .filter_map(|m| m["executable"].as_str().map(PathBuf::from))
        .next_back()
        .unwrap_or_else(|| panic!("cargo built no executable for {key}"));
    built.insert(key, exe.clone());
    exe
}

/// A test target's binary, built if needed.
pub fn test_binary(package: &str, target: &str) -> PathBuf {
    build(package, "test", target, &[])
}

/// A test target's binary built with features.
pub fn test_binary_with(package: &str, target: &str, features: &[&str]) -> PathBuf {
    build(package, "test", target, features)
}

/// The fixture binary with every outcome kind.
pub fn fixture() -> PathBuf {
    test_binary("dtf-fixture", "fixture")
}

/// The `dtf-worker` binary.
pub fn worker_binary() -> PathBuf {
    build("dtf-worker", "bin", "dtf-worker", &[])
}

/// A binary target `name` of `package`, built if needed.
pub fn build_bin(package: &str, name: &str) -> PathBuf {
    build(package, "bin", name, &[])
}

/// What a finished command did.
#[derive(Debug)]
pub struct Run {
    /// Exit code (`None` when killed by a signal).
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
    /// Wall time.
    pub elapsed: Duration,
}

impl Run {
    /// The line `test NAME ... RESULT` for `name`, if printed.
    pub fn result_of(&self, name: &str) -> Option<&str> {
        let prefix = format!("test {name} ... ");
        self.stdout
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
    }

    /// The `---- NAME stdout ----` section of the failures block.
    pub fn section_of(&self, name: &str) -> Option<&str> {
        let head = format!("---- {name} stdout ----\n");
        let start = self.stdout.find(&head)? + head.len();
        let rest = &self.stdout[start..];
        let end = ["\n---- ", "\nfailures:\n", "\nsuccesses:\n"]
            .iter()
            .filter_map(|m| rest.find(m))
            .min()
            .unwrap_or(rest.len());
        Some(&rest[..end])
    }

    /// Both streams, for assertion messages.
    pub fn dump(&self) -> String {
        format!(
            "exit: {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `cmd` to completion, killing it after `limit`. Output is read on threads so a chatty
/// child cannot block.
pub fn run_bounded(cmd: &mut Command, limit: Duration) -> Run {
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let status = child.wait().expect("wait");
            panic!("command did not finish within {limit:?}: {cmd:?} ({status})");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let stdout = String::from_utf8_lossy(&out_t.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err_t.join().unwrap_or_default()).into_owned();
    Run {
        code: status.code(),
        stdout,
        stderr,
        elapsed: started.elapsed(),
    }
}

/// A command for a dtf test binary with a predictable environment: no inherited `DTF_*`,
/// `RUST_TEST_*` or `NEXTEST_*` variables, no `CARGO_MANIFEST_DIR`, and no backtraces (they only slow panicking tests).
pub fn dtf_command(binary: &Path) -> Command {
    let mut cmd = Command::new(binary);
    for (name, _) in std::env::vars() {
        if name.starts_with("DTF_") || name.starts_with("RUST_TEST_") || name.starts_with("NEXTEST")
        {
            cmd.env_remove(name);
        }
    }
    // This process's own package root is not the binary's: cargo would set the binary's, and a
    // run-time CARGO_MANIFEST_DIR wins over the compiled-in one.
    cmd.env_remove("CARGO_MANIFEST_DIR");
    cmd.env("RUST_BACKTRACE", "0");
    cmd
}

/// Runs a dtf test binary with `args`, bounded to a minute.
pub fn run_dtf(binary: &Path, args: &[&str]) -> Run {
    run_bounded(dtf_command(binary).args(args), Duration::from_secs(60))
}

/// True when a process with this pid exists (and is not a zombie).
pub fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // The state follows the parenthesised command name.
            let state = stat.rsplit_once(") ").map(|(_, rest)| rest.chars().next());
            !matches!(state, Some(Some('Z')) | Some(Some('X')))
        }
        Err(_) => false,
    }
}

/// Polls `cond` every 20 ms for up to `limit`; true if it became true.
pub fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let started = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if started.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

mod packaging;
mod tools;
mod workers;
pub mod workspace;
pub use tools::tool;
pub use workers::*;

/// Live processes for which `keep(pid)` holds.
pub fn processes_where(keep: impl Fn(i32) -> bool) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| keep(pid) && process_alive(pid))
        .collect()
}
