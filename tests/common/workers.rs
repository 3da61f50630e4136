//! Real `dtf-worker` processes on 127.0.0.1 for the distributed-mode tests: each with its own
//! cache directory, `TMPDIR` and token, killed when dropped.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::{dtf_command, worker_binary};

/// How a [`Worker`] starts.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// `--slots`.
    pub slots: usize,
    /// The token (`DTF_TOKEN`); `None` runs without authentication.
    pub token: Option<String>,
    /// `--cache-max`.
    pub cache_max: Option<String>,
    /// More arguments for the worker.
    pub args: Vec<String>,
    /// `RLIMIT_NOFILE` (soft and hard) for the worker process, as `ulimit -n` would set it.
    pub nofile: Option<u64>,
    /// A directory the worker cannot see: it runs in its own mount namespace with a tmpfs
    /// over it, as a worker on another machine would not see this checkout.
    pub hide: Option<PathBuf>,
    /// Extra environment of the worker process.
    pub env: Vec<(String, String)>,
    /// `--listen` (default `127.0.0.1:0`: a free port on loopback).
    pub listen: String,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            slots: 2,
            token: Some(TOKEN.to_owned()),
            cache_max: None,
            args: Vec::new(),
            nofile: None,
            hide: None,
            env: Vec::new(),
            listen: "127.0.0.1:0".to_owned(),
        }
    }
}

/// The token the tests' workers share unless told otherwise.
pub const TOKEN: &str = "e2e-token-0123456789abcdef0123456789abcdef";

/// A running `dtf-worker`.
pub struct Worker {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// Its token, if any.
    pub token: Option<String>,
    /// The address of its HTTP endpoint, when started with `--http`.
    pub http: Option<String>,
    root: tempfile::TempDir,
    log: Arc<Mutex<String>>,
    config: WorkerConfig,
}

impl Worker {
    /// A worker with 2 slots and [`TOKEN`].
    pub fn start() -> Worker {
        Worker::start_with(WorkerConfig::default())
    }

    /// A worker as `config` says.
    pub fn start_with(config: WorkerConfig) -> Worker {
        let root = tempfile::Builder::new()
            .prefix("dtf-e2e-worker-")
            .tempdir()
            .expect("temp dir");
        std::fs::create_dir(root.path().join("tmp")).expect("tmp dir");
        let (child, addr, http, log) = launch(root.path(), &config);
        Worker {
            child,
            addr,
            token: config.token.clone(),
            http,
            root,
            log,
            config,
        }
    }

    /// Starts a new worker process on the same cache and `TMPDIR` (after this one died or was
    /// killed), as an operator restarting a worker would; it listens on a new port.
    pub fn restart(&mut self) {
        self.kill();
        let (child, addr, http, log) = launch(self.root.path(), &self.config);
        self.child = child;
        self.addr = addr;
        self.http = http;
        self.log = log;
    }

    /// Kills the worker (SIGKILL) and starts a new process on the same address, cache and
    /// `TMPDIR`, as an operator restarting it in place would.
    pub fn restart_in_place(&mut self) {
        self.kill();
        let mut config = self.config.clone();
        config.listen = self.addr.clone();
        let (child, addr, http, log) = launch(self.root.path(), &config);
        assert_eq!(addr, self.addr, "the restarted worker listens where it did");
        self.child = child;
        self.http = http;
        self.log = log;
    }

    /// Waits up to `limit` for the worker to exit by itself; its exit code (`None` when it
    /// did not exit in time, or died of a signal).
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let started = std::time::Instant::now();
        while started.elapsed() < limit {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    /// The worker's process id.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The worker's `TMPDIR`, where its tests' directories go.
    pub fn tmp_dir(&self) -> PathBuf {
        self.root.path().join("tmp")
    }

    /// The worker's cache directory.
    pub fn cache_dir(&self) -> PathBuf {
        self.root.path().join("cache")
    }

    /// Test directories (`dtf-*`) in the worker's `TMPDIR`, and inside its run directories
    /// (`dtf-run-*`, which hold the per-test directories while the worker lives).
    pub fn test_dirs(&self) -> Vec<PathBuf> {
        dtf_dirs(&self.tmp_dir())
            .into_iter()
            .flat_map(|dir| {
                let name = dir.file_name().map(|n| n.to_string_lossy().into_owned());
                if name.is_some_and(|n| n.starts_with("dtf-run-")) {
                    dtf_dirs(&dir)
                } else {
                    vec![dir]
                }
            })
            .collect()
    }

    /// The worker's run directories in its `TMPDIR`.
    pub fn run_dirs(&self) -> Vec<PathBuf> {
        dtf_dirs(&self.tmp_dir())
            .into_iter()
            .filter(|d| {
                d.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("dtf-run-"))
            })
            .collect()
    }

    /// What the worker logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Sends `signal` to the worker.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal);
    }

    /// SIGKILLs the worker and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// True while the worker process lives.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// `dtf-worker status ADDR --json`.
    pub fn status(&self) -> serde_json::Value {
        let mut cmd = Command::new(worker_binary());
        cmd.args(["status", &self.addr, "--json"])
            .env_remove("DTF_TOKEN_FILE");
        match &self.token {
            Some(t) => cmd.env("DTF_TOKEN", t),
            None => cmd.env_remove("DTF_TOKEN"),
        };
        let run = crate::run_bounded(&mut cmd, Duration::from_secs(20));
        assert_eq!(run.code, Some(0), "{}", run.dump());
        serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {}", run.dump()))
    }

    /// A command for `binary` that runs on this worker (and its token).
    pub fn command(&self, binary: &Path) -> Command {
        workers_command(binary, &[self])
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // A stopped worker must be continued to die promptly.
        self.signal(nix::sys::signal::Signal::SIGCONT);
        self.kill();
    }
}

/// A command for a dtf test binary that runs on `workers` (which share a token).
pub fn workers_command(binary: &Path, workers: &[&Worker]) -> Command {
    let mut cmd = dtf_command(binary);
    let addrs: Vec<&str> = workers.iter().map(|w| w.addr.as_str()).collect();
    cmd.env("DTF_WORKERS", addrs.join(","));
    if let Some(token) = workers.first().and_then(|w| w.token.clone()) {
        cmd.env("DTF_TOKEN", token);
    }
    cmd
}

/// A free loopback port nobody listens on (bound, then released).
pub fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

/// A command started in the background with its output in files, for tests that kill it.
pub struct Background {
    /// The process.
    pub child: Child,
    out: tempfile::NamedTempFile,
    err: tempfile::NamedTempFile,
}

impl Background {
    /// Starts `cmd` with stdin closed and stdout/stderr in temporary files.
    pub fn start(cmd: &mut Command) -> Background {
        let out = tempfile::NamedTempFile::new().expect("temp file");
        let err = tempfile::NamedTempFile::new().expect("temp file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.reopen().expect("reopen"))
            .stderr(err.reopen().expect("reopen"))
            .spawn()
            .expect("spawn");
        Background { child, out, err }
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Output so far: (stdout, stderr).
    pub fn output(&self) -> (String, String) {
        let read = |f: &tempfile::NamedTempFile| {
            let mut s = String::new();
            let _ = f.reopen().and_then(|mut f| f.read_to_string(&mut s));
            s
        };
        (read(&self.out), read(&self.err))
    }

    /// Waits up to `limit` for the process to exit; its exit code.
    pub fn wait(&mut self, limit: Duration) -> Option<i32> {
        let started = std::time::Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            if started.elapsed() > limit {
                let _ = self.child.kill();
                let _ = self.child.wait();
                let (out, err) = self.output();
                panic!(
                    "did not finish within {limit:?}\n--- stdout ---\n{out}\n--- stderr ---\n{err}"
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The pids recorded by the fixture's `dist_sleep_*` tests in `dir` (`pid-*` files: the test
/// process and its `sleep` grandchild).
pub fn recorded_pids(dir: &Path) -> Vec<i32> {
    recorded_pid_pairs(dir)
        .into_iter()
        .flat_map(|(test, sleep)| [test, sleep])
        .collect()
}

/// The `(test, sleep grandchild)` pids of each `pid-*` file in `dir`.
pub fn recorded_pid_pairs(dir: &Path) -> Vec<(i32, i32)> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("pid-"))
                .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                .filter_map(|s| {
                    let mut pids = s.split_whitespace().filter_map(|p| p.parse().ok());
                    Some((pids.next()?, pids.next()?))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The parent pid of `pid`, from `/proc`.
pub fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// True when `ancestor` is `pid`'s parent, grandparent, ... (at most 8 generations up): a test
/// process runs below its per-test process and, when forked, the fork server.
pub fn descends_from(pid: i32, ancestor: i32) -> bool {
    let mut current = pid;
    for _ in 0..8 {
        match parent_of(current) {
            Some(parent) if parent == ancestor => return true,
            Some(parent) if parent > 1 => current = parent,
            _ => return false,
        }
    }
    false
}

/// Live processes whose command line contains `needle`.
pub fn processes_with(needle: &str) -> Vec<i32> {
    crate::processes_where(|pid| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
    })
}

/// `test NAME ... RESULT` lines of a run, by name.
pub fn results(stdout: &str) -> std::collections::BTreeMap<String, String> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("test "))
        .filter_map(|l| l.split_once(" ... "))
        .filter(|(name, _)| !name.contains(' '))
        .map(|(name, result)| (name.to_owned(), result.to_owned()))
        .collect()
}

/// A private copy of `binary`, immune to concurrent rebuilds of the original (for tests that
/// compare runs or count bytes shipped). The directory goes with the returned guard.
pub fn private_copy(binary: &Path) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix("dtf-e2e-bin-")
        .tempdir()
        .expect("temp dir");
    let name = binary.file_name().expect("a file name");
    let copy = dir.path().join(name);
    std::fs::copy(binary, &copy).expect("copy the binary");
    (dir, copy)
}

/// Entries named `dtf-*` in `dir`.
pub fn dtf_dirs(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("dtf-"))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// Starts a worker process whose cache and `TMPDIR` live in `root`; its process, address,
/// HTTP address (with `--http` among its arguments) and log.
fn launch(
    root: &Path,
    config: &WorkerConfig,
) -> (Child, String, Option<String>, Arc<Mutex<String>>) {
    let mut cmd = match &config.hide {
        None => Command::new(worker_binary()),
        Some(hidden) => {
            // The worker's own binary may live in the hidden tree: it runs from a copy.
            let copy = root.join("dtf-worker");
            if !copy.exists() {
                std::fs::copy(worker_binary(), &copy).expect("copy dtf-worker");
            }
            let mut cmd = Command::new(crate::tool("unshare"));
            if !nix::unistd::geteuid().is_root() {
                cmd.args(["--user", "--map-current-user"]);
            }
            cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
                .arg("mount -t tmpfs tmpfs \"$0\" && exec \"$@\"")
                .arg(hidden)
                .arg(&copy);
            cmd
        }
    };
    cmd.args(["--listen", &config.listen, "--slots"])
        .arg(config.slots.to_string())
        .arg("--cache-dir")
        .arg(root.join("cache"))
        .env("TMPDIR", root.join("tmp"))
        .env("DTF_LOG", "info,tarpc=warn")
        .env_remove("DTF_TOKEN")
        .env_remove("DTF_TOKEN_FILE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(max) = &config.cache_max {
        cmd.arg("--cache-max").arg(max);
    }
    if let Some(token) = &config.token {
        cmd.env("DTF_TOKEN", token);
    }
    cmd.args(&config.args);
    if let Some(limit) = config.nofile {
        use std::os::unix::process::CommandExt;
        // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                nix::sys::resource::setrlimit(
                    nix::sys::resource::Resource::RLIMIT_NOFILE,
                    limit,
                    limit,
                )
                .map_err(std::io::Error::from)
            });
        }
    }
    cmd.envs(config.env.iter().map(|(k, v)| (k, v)));
    let mut child = cmd.spawn().expect("start dtf-worker");
    let stdout = child.stdout.take().expect("stdout");
    let stderr = child.stderr.take().expect("stderr");
    let log = Arc::new(Mutex::new(String::new()));
    let sink = log.clone();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stderr);
        let mut line = String::new();
        while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
            sink.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push_str(&line);
            line.clear();
        }
    });
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        for _ in 0..2 {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                break;
            }
            let _ = tx.send(line);
        }
        // Keep reading so the worker never blocks on a full pipe.
        let _ = std::io::copy(&mut reader, &mut std::io::sink());
    });
    let line = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("dtf-worker prints its address");
    let addr = line
        .trim()
        .strip_prefix("dtf-worker listening on ")
        .unwrap_or_else(|| {
            panic!(
                "unexpected first line {line:?}; log:\n{}",
                log.lock().unwrap_or_else(|e| e.into_inner())
            )
        })
        .to_owned();
    assert!(addr.starts_with("127."), "{addr}");
    let http = config.args.iter().any(|a| a == "--http").then(|| {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("dtf-worker prints its HTTP address");
        line.trim()
            .strip_prefix("dtf-worker serving HTTP on ")
            .unwrap_or_else(|| panic!("unexpected second line {line:?}"))
            .to_owned()
    });
    (child, addr, http, log)
}

/// A request to run the fixture's `dist_sleep_1` at level `env` with output captured and a
/// minute's timeout, its environment `PATH` and then `env`.
pub fn sleeper_spec(path: &str, env: &[(&str, String)]) -> dtf::sandbox::RunSpec {
    let mut vars = vec![("PATH".to_owned(), path.to_owned())];
    vars.extend(env.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
    dtf::sandbox::RunSpec {
        test: "dist_sleep_1".to_owned(),
        isolation: dtf::Isolation::Env,
        env: vars,
        timeout: Some(Duration::from_secs(60)),
        memory: None,
        capture: true,
        cwd: None,
        leak_fails: false,
        spawn: Default::default(),
        harness: Default::default(),
    }
}
