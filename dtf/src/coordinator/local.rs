//! `DTF_WORKERS=local:N`: real `dtf-worker` processes on loopback ports, with a fresh random
//! token, for the length of the run.
//!
//! The worker binary is found through `DTF_WORKER_BIN`, then `PATH`, then next to this test
//! binary's target directory (`target/debug/dtf-worker` for `target/debug/deps/NAME-HASH`).
//! Each worker is started with `--exit-on-stdin-eof`: if this process dies, even by SIGKILL,
//! its end of their stdin closes and they shut down (killing their tests). Their binary caches
//! live in `target/<profile>/dtf-local-workers/`, so a second run ships nothing.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};

/// The variable naming the worker binary.
pub const WORKER_BIN_VAR: &str = "DTF_WORKER_BIN";

/// How long a worker may take to start listening.
const START_LIMIT: Duration = Duration::from_secs(10);

/// Running local workers. Dropping them kills them.
pub struct LocalWorkers {
    workers: Vec<LocalWorker>,
    _caches: Caches,
    /// The token they share.
    pub token: String,
}

struct LocalWorker {
    child: Child,
    stdin: Option<ChildStdin>,
    addr: String,
    name: String,
}

impl LocalWorkers {
    /// `(address, name)` of each worker.
    pub fn endpoints(&self) -> Vec<(String, String)> {
        self.workers
            .iter()
            .map(|w| (w.addr.clone(), w.name.clone()))
            .collect()
    }

    /// Stops the workers: closes their stdin, waits briefly, then kills what is left.
    pub async fn stop(mut self) {
        for w in &mut self.workers {
            w.stdin = None;
        }
        for w in &mut self.workers {
            match tokio::time::timeout(Duration::from_secs(5), w.child.wait()).await {
                Ok(_) => {}
                Err(_) => {
                    let _ = w.child.kill().await;
                }
            }
        }
    }
}

/// Finds `dtf-worker`: `DTF_WORKER_BIN`, `PATH`, then beside the test binary's target dir.
pub fn find_worker_binary(test_binary: &Path) -> Result<PathBuf, String> {
    let mut tried = Vec::new();
    match std::env::var_os(WORKER_BIN_VAR).filter(|v| !v.is_empty()) {
        Some(path) => {
            let path = PathBuf::from(path);
            if path.is_file() {
                return Ok(path);
            }
            return Err(format!(
                "{WORKER_BIN_VAR}={} does not name a file; point it at a built dtf-worker",
                path.display()
            ));
        }
        None => tried.push(format!("{WORKER_BIN_VAR} (not set)")),
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("dtf-worker");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    tried.push("dtf-worker on PATH".to_owned());
    if let Some(dir) = test_binary.parent() {
        let mut candidates = vec![dir.join("dtf-worker")];
        if dir.file_name().is_some_and(|n| n == "deps") {
            if let Some(profile) = dir.parent() {
                candidates.insert(0, profile.join("dtf-worker"));
            }
        }
        for candidate in candidates {
            if candidate.is_file() {
                return Ok(candidate);
            }
            tried.push(candidate.display().to_string());
        }
    }
    Err(format!(
        "DTF_WORKERS=local:N needs the dtf-worker binary, and it was not found (tried: {}). \
         Install it with `cargo install dtf-worker` (from a dtf checkout: \
         `cargo install --path dtf-worker`), or set {WORKER_BIN_VAR} to the path of a built one",
        tried.join(", ")
    ))
}

/// Where local workers keep the binaries they were sent.
enum Caches {
    /// `target/<profile>/dtf-local-workers/`, kept between runs, so a warm run ships nothing.
    Kept(PathBuf),
    /// A temporary directory for a test binary outside a cargo target directory.
    Temporary(tempfile::TempDir),
}

impl Caches {
    /// Beside the test binary's cargo profile directory when it has one, else temporary.
    fn for_binary(test_binary: &Path) -> Result<Caches, String> {
        let deps = test_binary.parent();
        if let Some(profile) = deps
            .filter(|d| d.file_name().is_some_and(|n| n == "deps"))
            .and_then(Path::parent)
        {
            let dir = profile.join("dtf-local-workers");
            if std::fs::create_dir_all(&dir).is_ok() {
                return Ok(Caches::Kept(dir));
            }
        }
        tempfile::Builder::new()
            .prefix("dtf-local-workers-")
            .tempdir()
            .map(Caches::Temporary)
            .map_err(|e| format!("cannot create a cache directory for the local workers: {e}"))
    }

    fn path(&self) -> &Path {
        match self {
            Caches::Kept(dir) => dir,
            Caches::Temporary(dir) => dir.path(),
        }
    }
}

/// Starts `n` workers with `slots` slots each on `127.0.0.1:0`.
pub async fn start(test_binary: &Path, n: usize, slots: usize) -> Result<LocalWorkers, String> {
    let program = find_worker_binary(test_binary)?;
    let token = crate::protocol::Token::random_text()
        .map_err(|e| format!("cannot make a token for the local workers: {e}"))?;
    let caches = Caches::for_binary(test_binary)?;
    let log = std::env::var("DTF_LOG")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "warn".to_owned());
    let mut workers = Vec::with_capacity(n);
    for i in 1..=n {
        let name = format!("local-{i}");
        let mut child = Command::new(&program)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--exit-on-stdin-eof",
                "--name",
                &name,
            ])
            .arg("--slots")
            .arg(slots.max(1).to_string())
            .arg("--cache-dir")
            .arg(caches.path().join(&name))
            .env("DTF_TOKEN", &token)
            .env_remove("DTF_TOKEN_FILE")
            .env("DTF_LOG", &log)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", program.display()))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let addr = match stdout {
            Some(stdout) => {
                let mut line = String::new();
                let mut reader = BufReader::new(stdout);
                match tokio::time::timeout(START_LIMIT, reader.read_line(&mut line)).await {
                    Ok(Ok(_)) => line
                        .trim()
                        .strip_prefix("dtf-worker listening on ")
                        .map(str::to_owned),
                    _ => None,
                }
            }
            None => None,
        };
        let Some(addr) = addr else {
            let _ = child.kill().await;
            return Err(format!(
                "{} did not start listening within {START_LIMIT:?} (see its messages above)",
                program.display()
            ));
        };
        workers.push(LocalWorker {
            child,
            stdin,
            addr,
            name,
        });
    }
    Ok(LocalWorkers {
        workers,
        _caches: caches,
        token,
    })
}
