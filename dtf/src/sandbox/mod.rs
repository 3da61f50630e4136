//! The sandbox: builds and runs one isolated child process for one test, and the child-side
//! code that runs inside it. Local runs and `dtf-worker` both use this module.
//!
//! Every test goes through one pipeline (drawn in [`pertest`]): a spawner starts the test's
//! per-test process, which runs its stages (subreaper, limits, namespaces, ...) and starts
//! the test process. The spawner re-executes the test binary with the variable
//! [`CHILD_VAR`] describing the test. The per-test process's stdin is the write end of a
//! pipe: it moves it to a close-on-exec descriptor and replaces stdin with `/dev/null`; the
//! test process writes its outcome there as a [`Record::Outcome`], and the per-test process
//! adds a [`Record::Relay`] with what the test leaked. Whatever the test prints cannot forge
//! those records. The per-test process leads its own process group, so a timeout or a
//! cancelled run kills every process the test started.

pub mod child;
pub mod env;
pub mod forkserver;
pub mod namespaces;
pub mod paths;
pub mod pertest;
mod resident;
pub mod rundir;

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::outcome::{Attempt, Capture, Failure, Output, Stream};
use crate::registry::{Isolation, Spawn};
use forkserver::{ForkServer, Forked, Refusal, StartError};

/// The variable that puts a re-executed test binary in the child role. It holds a
/// JSON-encoded [`ChildSpec`] and is removed from the environment before the test runs.
pub const CHILD_VAR: &str = "__DTF_CHILD";

/// The default cap on a test's captured output (both streams together).
pub const OUTPUT_CAP: usize = crate::outcome::DEFAULT_OUTPUT_CAP;

/// How long the parent waits for a test's output pipes to close after its process exited
/// (a process that escaped the test's process group may hold them open).
const DRAIN_GRACE: Duration = Duration::from_millis(500);

/// What the child needs to know to run its test.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChildSpec {
    /// The test's full name.
    pub test: String,
    /// The isolation level to establish before running it (`process`, `env` or `full`).
    pub isolation: Isolation,
    /// A memory limit in bytes.
    pub memory: Option<u64>,
    /// The pid of the process that started the child: the child dies with it.
    #[serde(default)]
    pub parent: Option<u32>,
    /// Run this program in the test process instead of a registered test (a foreign test
    /// binary, after the per-test process has set up its isolation).
    #[serde(default)]
    pub exec: Option<Exec>,
    /// Paths to map before the test runs (a worker's copy of the input tree at the
    /// coordinator's paths), at every isolation level.
    #[serde(default)]
    pub paths: Option<paths::PathMap>,
    /// The test's private directory (`HOME` is its `home`, `TMPDIR` its `tmp`), made by the
    /// spawner if it does not exist yet (see `TestDir`).
    #[serde(default)]
    pub dir: Option<PathBuf>,
}

/// A program the test process runs in place of a registered test.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Exec {
    /// The program.
    pub program: PathBuf,
    /// Its arguments (without the program's name).
    pub args: Vec<std::ffi::OsString>,
}

/// What the test process reports over the result pipe.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChildReport {
    /// `None` when the test passed.
    pub failure: Option<Failure>,
}

/// What the per-test process adds once the test process has ended.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RelayReport {
    /// The names of the processes the test left running outside its process group, which
    /// were killed.
    pub leaked: Vec<String>,
}

/// One line on the result pipe.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Record {
    /// From the test process: its outcome.
    Outcome(ChildReport),
    /// From the per-test process, after the test process ended.
    Relay(RelayReport),
}

/// One test to run in a fresh process.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunSpec {
    /// The test's full name.
    pub test: String,
    /// `process`, `env` or `full` (never `full-or-env`: resolve it first).
    pub isolation: Isolation,
    /// The complete environment the test starts from, before `HOME` and `TMPDIR` (see
    /// [`env::test_environment`]).
    pub env: Vec<(String, String)>,
    /// Kill the test after this long.
    pub timeout: Option<Duration>,
    /// A memory limit in bytes.
    pub memory: Option<u64>,
    /// Capture stdout and stderr (otherwise the child inherits the parent's).
    pub capture: bool,
    /// The working directory; the temporary directory when `None` or missing.
    pub cwd: Option<PathBuf>,
    /// A test that leaks processes fails (`--leak-fails`); otherwise the leak is reported.
    #[serde(default)]
    pub leak_fails: bool,
    /// How its per-test process starts: forked from the fork server, or exec'd.
    #[serde(default)]
    pub spawn: Spawn,
    /// How the binary runs a test.
    #[serde(default)]
    pub harness: Harness,
}

/// Which harness a test binary was built with: how its tests are started and judged.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Harness {
    /// A dtf binary (`dtf::main!()`): re-executed as the test's per-test process, whose test
    /// process reports the outcome over the result pipe.
    #[default]
    Dtf,
    /// A binary with libtest's harness (plain `#[test]`). Its per-test process is a relay (a
    /// dtf-owned binary: cargo-dtf, dtf-worker) that runs the stages and then execs
    /// `BINARY --exact NAME --nocapture [--ignored] [ARGS...]` as the test process, as
    /// cargo-nextest runs tests; the exit status judges it (0 passed, 101 failed).
    Libtest {
        /// Pass `--ignored` (the test is `#[ignore]` and the run includes ignored tests).
        ignored: bool,
        /// Extra arguments for the binary (`cargo dtf -- ARGS`).
        args: Vec<String>,
    },
}

impl Harness {
    /// The arguments that run test `name` of a libtest binary.
    pub fn libtest_args(name: &str, ignored: bool, extra: &[String]) -> Vec<String> {
        let mut args = vec![
            "--exact".to_owned(),
            name.to_owned(),
            "--nocapture".to_owned(),
        ];
        if ignored {
            args.push("--ignored".to_owned());
        }
        args.extend(extra.iter().cloned());
        args
    }
}

/// Runs tests of one binary in fresh processes. Clones share one fork server, started when the
/// first test that forks runs (or by [`Sandbox::start_fork_server`]).
#[derive(Clone, Debug)]
pub struct Sandbox {
    program: PathBuf,
    relay: Option<PathBuf>,
    runner: Vec<std::ffi::OsString>,
    tmp_root: PathBuf,
    keep_failed_tmp: bool,
    output_cap: usize,
    paths: Option<paths::PathMap>,
    server_env: Vec<(String, String)>,
    server: Arc<ServerSlot>,
    dirs: Arc<DirPool>,
    env_block: Arc<std::sync::Mutex<Option<EnvBlock>>>,
}

/// The last environment block built for a forked test, and what it was built from.
#[derive(Debug)]
struct EnvBlock {
    env: Vec<(String, String)>,
    isolated: bool,
    block: Arc<[u8]>,
}

/// The fork server of a sandbox: started once, or why not.
#[derive(Debug, Default)]
struct ServerSlot {
    server: tokio::sync::OnceCell<Result<Arc<ForkServer>, StartError>>,
    /// The note that tests start by exec has been printed.
    fallback_noted: AtomicBool,
}

impl Sandbox {
    /// A sandbox that runs `program` (a dtf test binary), with per-test directories under
    /// `tmp_root`. With `keep_failed_tmp`, a failed test's directory is kept (`DTF_KEEP_TMP`).
    pub fn new(program: PathBuf, tmp_root: PathBuf, keep_failed_tmp: bool) -> Sandbox {
        Sandbox {
            program,
            relay: None,
            runner: Vec::new(),
            tmp_root,
            keep_failed_tmp,
            output_cap: OUTPUT_CAP,
            paths: None,
            server_env: Vec::new(),
            server: Arc::default(),
            dirs: Arc::default(),
            env_block: Arc::default(),
        }
    }

    /// Starts the fork server now (it runs the warm-ups), rather than with the first test.
    /// `Err` is a warm-up's failure, which should stop the run; a server that cannot start
    /// only means tests start by exec, after a note.
    pub async fn start_fork_server(&self) -> Result<(), String> {
        if !self.runner.is_empty() {
            return Ok(());
        }
        match self.fork_server().await {
            Err(StartError::WarmUp(message)) => Err(message),
            _ => Ok(()),
        }
    }

    /// Starts, in the background, the fork server `spec`'s test would be forked from, unless
    /// it started already: a test that waits for a slot (on a worker) then does not spend the
    /// slot starting it. Must be called within a tokio runtime.
    pub fn start_fork_server_for(&self, spec: &RunSpec) {
        if self.forks(spec) && self.server.server.get().is_none() {
            let sandbox = self.clone();
            tokio::spawn(async move {
                let _ = sandbox.fork_server().await;
            });
        }
    }

    /// Whether `spec`'s test is forked from the fork server (on Linux, a dtf test, unless the
    /// test or the run asks for exec or the binary starts through a runner).
    fn forks(&self, spec: &RunSpec) -> bool {
        spec.spawn == Spawn::Fork
            && spec.harness == Harness::Dtf
            && self.runner.is_empty()
            && cfg!(target_os = "linux")
    }

    /// Stops the fork server, if one started, and waits for it to end. Tests that are still
    /// running are killed.
    pub async fn stop_fork_server(&self) {
        if let Some(Ok(server)) = self.server.server.get() {
            server.stop().await;
        }
    }

    async fn fork_server(&self) -> Result<Arc<ForkServer>, StartError> {
        let started = self
            .server
            .server
            .get_or_init(|| async {
                ForkServer::start(&self.program, self.paths.as_ref(), &self.server_env)
                    .await
                    .map(Arc::new)
            })
            .await;
        if let Err(StartError::Unavailable(reason)) = started {
            self.note_fallback(reason);
        }
        started.clone()
    }

    /// Says once per sandbox why its tests start by exec.
    fn note_fallback(&self, reason: &str) {
        if !self.server.fallback_noted.swap(true, Ordering::Relaxed) {
            eprintln!("note: dtf: tests start by exec instead of from the fork server: {reason}");
        }
    }

    /// The same sandbox, mapping `map`'s paths in each test's process before the test runs
    /// (see [`paths`]).
    pub fn with_paths(mut self, map: paths::PathMap) -> Sandbox {
        self.paths = Some(map);
        self
    }

    /// The same sandbox, starting its fork server with `env` on top of this process's
    /// environment. A worker passes the loader path that reaches the shipped libraries: the
    /// loader runs before the server can map any path.
    pub fn with_server_env(mut self, env: Vec<(String, String)>) -> Sandbox {
        self.server_env = env;
        self
    }

    /// The same sandbox, starting the binary through `runner` (a program and its arguments,
    /// cargo's `target.<triple>.runner`): `RUNNER... BINARY ARGS...`. Tests then start by exec
    /// (no fork server: the server would run outside the runner).
    pub fn with_runner(mut self, runner: Vec<std::ffi::OsString>) -> Sandbox {
        self.runner = runner;
        self
    }

    /// The binary this sandbox runs.
    pub fn program(&self) -> &Path {
        &self.program
    }

    /// Keeps at most `cap` bytes of each test's output (its head and its tail, see
    /// [`Capture`]); the default is [`OUTPUT_CAP`].
    pub fn with_output_cap(mut self, cap: usize) -> Sandbox {
        self.output_cap = cap;
        self
    }

    /// The per-test process of a libtest binary's tests: a binary whose `main` starts with
    /// [`child::take_spec`] and [`child::run`] (cargo-dtf, dtf-worker). Without one, this
    /// process's own executable is used.
    pub fn with_relay(mut self, relay: PathBuf) -> Sandbox {
        self.relay = Some(relay);
        self
    }

    /// Runs one test to completion. Never fails: a sandbox that cannot be set up yields an
    /// attempt with [`Failure::System`]. Dropping the future kills the test's process group and
    /// removes its temporary directory.
    pub async fn run(&self, spec: &RunSpec) -> Attempt {
        let started = Instant::now();
        match self.run_inner(spec, started).await {
            Ok(attempt) => attempt,
            Err(message) => Attempt {
                failure: Some(Failure::System { message }),
                duration: started.elapsed(),
                output: Output::default(),
                worker: None,
                kept_tmp: None,
                leaked: Vec::new(),
            },
        }
    }

    async fn run_inner(&self, spec: &RunSpec, started: Instant) -> Result<Attempt, String> {
        let isolated = spec.isolation != Isolation::Process;
        // A directory a test before left as it found it, or a new one, only named here: the
        // spawner makes it (in the forked child, off this thread, or before an exec).
        let tmp = if isolated {
            Some(self.dirs.take(&self.tmp_root, &spec.test)?)
        } else {
            None
        };

        // A dtf binary is its own per-test process; a libtest binary's is the relay, which
        // execs the binary once its stages ran.
        let (per_test, exec) = match &spec.harness {
            Harness::Dtf => (self.program.clone(), None),
            Harness::Libtest { ignored, args } => {
                let relay = match &self.relay {
                    Some(relay) => relay.clone(),
                    None => std::env::current_exe()
                        .map_err(|e| format!("cannot find the relay program: {e}"))?,
                };
                let args = Harness::libtest_args(&spec.test, *ignored, args);
                let exec = match self.runner.split_first() {
                    None => Exec {
                        program: self.program.clone(),
                        args: args.into_iter().map(Into::into).collect(),
                    },
                    Some((runner, runner_args)) => Exec {
                        program: PathBuf::from(runner),
                        args: runner_args
                            .iter()
                            .cloned()
                            .chain(std::iter::once(self.program.clone().into_os_string()))
                            .chain(args.into_iter().map(Into::into))
                            .collect(),
                    },
                };
                (relay, Some(exec))
            }
        };
        let child_spec = ChildSpec {
            test: spec.test.clone(),
            isolation: spec.isolation,
            memory: spec.memory,
            parent: Some(std::process::id()),
            exec,
            paths: self.paths.clone(),
            dir: tmp.as_ref().map(|t| t.path().to_path_buf()),
        };
        // The test's own variables, after the run's (and winning over them).
        let own: Vec<(String, String)> = match &tmp {
            Some(tmp) => vec![
                ("HOME".to_owned(), tmp.home().display().to_string()),
                ("TMPDIR".to_owned(), tmp.tmp().display().to_string()),
            ],
            None => Vec::new(),
        };
        let cwd = spec
            .cwd
            .as_deref()
            .filter(|dir| dir.is_dir())
            .map(Path::to_path_buf)
            .or_else(|| tmp.as_ref().map(|t| t.home()));

        // A dtf binary's per-test process is forked from its fork server (on Linux, unless the
        // test or the run asks for exec); a libtest binary's relay is exec'd.
        let forked = if self.forks(spec) {
            match self.fork_server().await {
                Ok(server) => {
                    let block = self.env_block(&spec.env, isolated, &own);
                    self.fork(&server, &child_spec, (&block, &own), &cwd, spec.capture)
                        .await?
                }
                Err(StartError::WarmUp(message)) => return Err(message),
                Err(StartError::Unavailable(_)) => None,
            }
        } else {
            None
        };
        let mut process = match forked {
            Some(process) => process,
            None => {
                if let Some(tmp) = &tmp {
                    make_test_dir(tmp.path())?;
                }
                let mut vars = run_vars(&spec.env, isolated);
                vars.extend(own);
                self.exec(&per_test, &child_spec, &vars, &cwd, spec.capture)?
            }
        };
        // The per-test process leads its own group: its pid is the group id.
        let group = GroupGuard(Some(Pid::from_raw(process.pid)));
        let result_read = process.result.take().ok_or("no result pipe")?;
        // A forked dtf test ends its output and closes the result pipe before its process
        // exits (see `pertest`): read along, and the test is done when all three have ended
        // with its outcome in, without waiting for the exit.
        let mut records = match (&process.waiter, &spec.harness) {
            (Waiter::Forked(_), Harness::Dtf) => result_read
                .try_clone()
                .ok()
                .and_then(|fd| tokio::net::unix::pipe::Receiver::from_owned_fd(fd).ok()),
            _ => None,
        };
        let mut record_bytes: Vec<u8> = Vec::new();
        let mut records_ended = false;
        let mut rec_buf = vec![0u8; 4096];
        let mut stdout = process.stdout.take();
        let mut stderr = process.stderr.take();
        let mut capture = Capture::new(self.output_cap);
        let timeout_at = spec
            .timeout
            .map(|t| tokio::time::Instant::from_std(started + t));
        let mut status: Option<ExitStatus> = None;
        let mut timed_out = false;
        let mut drain_until: Option<tokio::time::Instant> = None;
        let mut out_buf = vec![0u8; 16 * 1024];
        let mut err_buf = vec![0u8; 16 * 1024];

        loop {
            if stdout.is_none() && stderr.is_none() {
                if status.is_some() {
                    break;
                }
                if records_ended && parse_records(&record_bytes).0.is_some() {
                    // Whatever the test left running in its group goes with it.
                    group.kill();
                    break;
                }
            }
            // Biased, stdout first: when both pipes are ready, what the test printed first
            // (stdout is line-buffered, stderr not) is most likely the stdout chunk.
            tokio::select! {
                biased;
                n = read_some(&mut stdout, &mut out_buf), if stdout.is_some() => match n {
                    Some(n) => capture.push(Stream::Stdout, &out_buf[..n]),
                    None => stdout = None,
                },
                n = read_some(&mut stderr, &mut err_buf), if stderr.is_some() => match n {
                    Some(n) => capture.push(Stream::Stderr, &err_buf[..n]),
                    None => stderr = None,
                },
                n = read_some(&mut records, &mut rec_buf), if records.is_some() => match n {
                    Some(n) => record_bytes.extend_from_slice(&rec_buf[..n]),
                    None => {
                        records = None;
                        records_ended = true;
                    }
                },
                exit = process.waiter.wait(), if status.is_none() => {
                    let exit = exit?;
                    status = Some(exit);
                    // Whatever the test left running in its group goes with it.
                    group.kill();
                    drain_until = Some(tokio::time::Instant::now() + DRAIN_GRACE);
                }
                _ = sleep_until(timeout_at), if status.is_none() && !timed_out && timeout_at.is_some() => {
                    timed_out = true;
                    group.kill();
                }
                _ = sleep_until(drain_until), if drain_until.is_some() => break,
            }
        }
        let duration = started.elapsed();
        let mut output = capture.finish();
        if matches!(spec.harness, Harness::Libtest { .. }) {
            strip_libtest_framing(&mut output, &spec.test);
        }
        group.disarm();

        drop(records);
        read_rest(&result_read, &mut record_bytes);
        let (report, relay) = parse_records(&record_bytes);
        let exit_status = || status.ok_or("the test process vanished");
        let failure = if timed_out {
            Some(Failure::TimedOut {
                after: spec.timeout.unwrap_or_default(),
            })
        } else {
            match report {
                Some(report) => report.failure,
                None if matches!(spec.harness, Harness::Libtest { .. }) => {
                    libtest_failure(exit_status()?, spec.memory, &output)
                }
                None => Some(failure_from_exit(exit_status()?, spec.memory, &output)),
            }
        };
        let leaked = relay.leaked;
        let failure = match failure {
            None if spec.leak_fails && !leaked.is_empty() => Some(Failure::Leaked {
                processes: leaked.clone(),
            }),
            failure => failure,
        };
        let kept_tmp = match tmp {
            Some(tmp) if failure.is_some() && self.keep_failed_tmp => Some(tmp.keep()),
            Some(tmp) => {
                self.dirs.give_back(tmp);
                None
            }
            None => None,
        };
        Ok(Attempt {
            failure,
            duration,
            output,
            worker: None,
            kept_tmp,
            leaked,
        })
    }
}

impl Sandbox {
    /// The environment block of a forked test whose run gives it `env` (with the toolchain
    /// homes when `isolated`), without the variables in `own`, which follow it and would be
    /// found second. Most tests of a run share one `env`: the last block is kept, and built
    /// again only for a test whose variables differ.
    fn env_block(
        &self,
        env: &[(String, String)],
        isolated: bool,
        own: &[(String, String)],
    ) -> Arc<[u8]> {
        let mut last = self.env_block.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(last) = last
            .as_ref()
            .filter(|l| l.isolated == isolated && l.env == env)
        {
            return last.block.clone();
        }
        let mut vars = run_vars(env, isolated);
        vars.retain(|(name, _)| !own.iter().any(|(n, _)| n == name));
        let block: Arc<[u8]> = forkserver::env_block(&vars).into();
        *last = Some(EnvBlock {
            env: env.to_vec(),
            isolated,
            block: block.clone(),
        });
        block
    }

    /// Starts the per-test process from the fork server; `None` when the server will not fork
    /// (the test then starts by exec, after a note).
    async fn fork(
        &self,
        server: &ForkServer,
        child_spec: &ChildSpec,
        env: (&[u8], &[(String, String)]),
        cwd: &Option<PathBuf>,
        capture: bool,
    ) -> Result<Option<Started>, String> {
        let (result_read, result_write) = result_pipe()?;
        let (stdout, stdout_w) = output_pipe(capture, 1)?;
        let (stderr, stderr_w) = output_pipe(capture, 2)?;
        let fds = [stdout_w, stderr_w, result_write];
        match server.spawn(child_spec, env, cwd, fds).await {
            Ok(forked) => Ok(Some(Started {
                pid: forked.pid,
                stdout,
                stderr,
                result: Some(result_read),
                waiter: Waiter::Forked(forked),
            })),
            Err(Refusal::Fallback(reason)) => {
                self.note_fallback(&reason);
                Ok(None)
            }
        }
    }

    /// Starts the per-test process by exec of `program` (the test binary, or a libtest
    /// binary's relay).
    fn exec(
        &self,
        program: &Path,
        child_spec: &ChildSpec,
        env: &[(String, String)],
        cwd: &Option<PathBuf>,
        capture: bool,
    ) -> Result<Started, String> {
        let child_spec = serde_json::to_string(child_spec).map_err(|e| e.to_string())?;
        let (result_read, result_write) = result_pipe()?;
        // A dtf binary through its target runner: `RUNNER... BINARY`.
        let through_runner = program == self.program;
        let mut cmd = match self.runner.split_first() {
            Some((runner, args)) if through_runner => {
                let mut cmd = tokio::process::Command::new(runner);
                cmd.args(args).arg(program);
                cmd
            }
            _ => tokio::process::Command::new(program),
        };
        cmd.env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env(CHILD_VAR, child_spec)
            .stdin(Stdio::from(result_write))
            .process_group(0)
            .kill_on_drop(true);
        if let Some(cwd) = cwd {
            cmd.current_dir(cwd);
        }
        if capture {
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        } else {
            cmd.stdout(Stdio::inherit()).stderr(Stdio::inherit());
        }
        let mut child = spawn_retrying(&mut cmd, program)?;
        drop(cmd); // closes our copy of the result pipe's write end
        let pid = child.id().ok_or("the test process vanished")? as i32;
        let stdout = child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn AsyncRead + Unpin + Send>);
        let stderr = child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn AsyncRead + Unpin + Send>);
        Ok(Started {
            pid,
            stdout,
            stderr,
            result: Some(result_read),
            waiter: Waiter::Exec(child),
        })
    }
}

/// A test's variables from its run, `env`, with the toolchain homes when `isolated` (before
/// its own `HOME` and `TMPDIR`).
fn run_vars(env: &[(String, String)], isolated: bool) -> Vec<(String, String)> {
    let mut vars = env.to_vec();
    if isolated {
        env::add_toolchain_homes(&mut vars, |name| std::env::var(name).ok());
    }
    vars
}

/// A started per-test process, whichever way it started.
struct Started {
    /// Its pid, which is also its process group.
    pid: i32,
    stdout: Option<Box<dyn AsyncRead + Unpin + Send>>,
    stderr: Option<Box<dyn AsyncRead + Unpin + Send>>,
    result: Option<OwnedFd>,
    waiter: Waiter,
}

enum Waiter {
    Exec(tokio::process::Child),
    Forked(Forked),
}

impl Waiter {
    async fn wait(&mut self) -> Result<ExitStatus, String> {
        match self {
            Waiter::Exec(child) => child
                .wait()
                .await
                .map_err(|e| format!("cannot wait for the test process: {e}")),
            Waiter::Forked(forked) => forked.wait().await,
        }
    }
}

/// A captured stream's pipe (the read end for the parent, the write end for the test), or,
/// without capture, a copy of this process's own descriptor `fd`.
type OutputPipe = (Option<Box<dyn AsyncRead + Unpin + Send>>, OwnedFd);

fn output_pipe(capture: bool, fd: i32) -> Result<OutputPipe, String> {
    use nix::fcntl::OFlag;
    if !capture {
        // SAFETY: 1 and 2 are this process's stdout and stderr, open for its lifetime.
        let own = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        let copy = own
            .try_clone_to_owned()
            .map_err(|e| format!("cannot pass the output on: {e}"))?;
        return Ok((None, copy));
    }
    let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)
        .map_err(|e| format!("cannot create an output pipe: {e}"))?;
    let read = tokio::net::unix::pipe::Receiver::from_owned_fd(read)
        .map_err(|e| format!("cannot watch an output pipe: {e}"))?;
    Ok((Some(Box::new(read)), write))
}

/// Removes what libtest prints around one test (`running 1 test`, `test NAME ... ok`,
/// `failures:`, its own `test result:` line) from a libtest test's captured stdout, so the
/// report shows the test's own output once, under dtf's summary.
fn strip_libtest_framing(output: &mut Output, name: &str) {
    let verdict = format!("test {name} ... ");
    let listed = format!("    {name}");
    let framing = |line: &str| {
        let line = line.trim_end_matches('\r');
        line == "running 1 test"
            || line == "running 0 tests"
            || line.starts_with(&verdict)
            || line == "failures:"
            || line == listed
            || line.starts_with("test result: ")
    };
    for (stream, bytes) in &mut output.chunks {
        if *stream != Stream::Stdout {
            continue;
        }
        let text = String::from_utf8_lossy(bytes);
        if !text.lines().any(framing) {
            continue;
        }
        let mut kept = String::new();
        for line in text.split_inclusive('\n') {
            if !framing(line.trim_end_matches('\n')) {
                kept.push_str(line);
            }
        }
        let trimmed = if kept.trim().is_empty() {
            String::new()
        } else {
            kept
        };
        *bytes = trimmed.into_bytes();
    }
    output.chunks.retain(|(_, bytes)| !bytes.is_empty());
}

/// Judges a libtest binary's run of one test by its exit status: 0 passed, 101 failed (the
/// panic message is in its output), anything else as for a dtf test without a report.
fn libtest_failure(status: ExitStatus, memory: Option<u64>, output: &Output) -> Option<Failure> {
    match status.code() {
        Some(0) => None,
        Some(101) => match failure_from_exit(status, memory, output) {
            limit @ Failure::MemoryLimit { .. } => Some(limit),
            _ => Some(Failure::Panicked {
                message: libtest_message(output),
            }),
        },
        _ => Some(failure_from_exit(status, memory, output)),
    }
}

/// The panic message a libtest test printed (`panicked at FILE:LINE:COL:` then the message),
/// or a pointer at the output.
fn libtest_message(output: &Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stream(Stream::Stderr)).into_owned();
    let stdout = String::from_utf8_lossy(&output.stream(Stream::Stdout)).into_owned();
    for text in [&stderr, &stdout] {
        if let Some(at) = text.find("panicked at ") {
            let mut lines = text[at..].lines();
            lines.next();
            let message: Vec<&str> = lines
                .take_while(|l| !l.starts_with("note: ") && !l.starts_with("stack backtrace:"))
                .collect();
            let message = message.join("\n").trim().to_owned();
            if !message.is_empty() {
                return message;
            }
        }
    }
    "the test failed (exit code 101; see its output)".to_owned()
}

/// Explains an exit without a report.
fn failure_from_exit(status: ExitStatus, memory: Option<u64>, output: &Output) -> Failure {
    if let Some(limit) = memory {
        let stderr = output.stream(Stream::Stderr);
        let needle = b"memory allocation of";
        if stderr.windows(needle.len()).any(|w| w == needle) {
            return Failure::MemoryLimit { limit };
        }
    }
    match (status.code(), status.signal()) {
        (Some(code), _) => Failure::ExitedEarly { code },
        (None, Some(signal)) => Failure::Signaled { signal },
        (None, None) => Failure::System {
            message: format!("the test process ended with an unknown status: {status}"),
        },
    }
}

/// Kills a test's process group when dropped (a cancelled run), unless disarmed.
struct GroupGuard(Option<Pid>);

impl GroupGuard {
    fn kill(&self) {
        if let Some(pid) = self.0 {
            // ESRCH (nothing left in the group) is the normal case.
            let _ = killpg(pid, Signal::SIGKILL);
        }
    }

    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A test's private directory: `home` (its `HOME`) and `tmp` (its `TMPDIR`). Removed on drop.
///
/// Making and removing three directories costs more than a forked test on some file systems
/// (on ext4 every removal frees a block, with a discard), so a directory that a test left
/// exactly as it found it (both empty, nothing else beside them, modes and types intact) goes
/// back to the sandbox's [`DirPool`] and the next test gets it, renamed after that test;
/// anything else is removed and the next test gets a new one. A test cannot tell a reused
/// directory from a new one.
#[derive(Debug)]
struct TestDir(PathBuf);

/// Numbers the test directories of this process (the run directory is its own).
static TEST_DIRS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl TestDir {
    fn path(&self) -> &Path {
        &self.0
    }

    /// Whether the directory is as [`make_test_dir`] made it: itself, `home` and `tmp`
    /// directories (not links) of mode 0700, `home` and `tmp` empty and nothing else beside
    /// them. Four system calls per directory (open, fstat, one read of its entries, close):
    /// this runs once per test on the runner's thread.
    fn is_pristine(&self) -> bool {
        private_dir_holding(&self.0, &[b"home", b"tmp"])
            && private_dir_holding(&self.home(), &[])
            && private_dir_holding(&self.tmp(), &[])
    }

    fn home(&self) -> PathBuf {
        self.0.join("home")
    }

    fn tmp(&self) -> PathBuf {
        self.0.join("tmp")
    }

    /// Keeps the directory: it moves out of the run directory (which is removed with its
    /// runner) next to it, and its path is returned.
    fn keep(mut self) -> String {
        let dir = std::mem::take(&mut self.0);
        let moved = match (dir.parent().and_then(Path::parent), dir.file_name()) {
            (Some(outside), Some(name)) => {
                let target = outside.join(name);
                match std::fs::rename(&dir, &target) {
                    Ok(()) => target,
                    Err(_) => dir,
                }
            }
            _ => dir,
        };
        moved.display().to_string()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if !self.0.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// The test directories of a sandbox that are free for the next test; removed with the
/// sandbox.
#[derive(Debug, Default)]
struct DirPool(std::sync::Mutex<Vec<PathBuf>>);

impl DirPool {
    /// A directory for `test`, named after it: a free one renamed (one cheap call), or a new
    /// name in `root` (made once) for one.
    fn take(&self, root: &Path, test: &str) -> Result<TestDir, String> {
        let n = TEST_DIRS.fetch_add(1, Ordering::Relaxed);
        let path = root.join(format!("dtf-{}-{n}", file_name_part(test)));
        let free = self.0.lock().unwrap_or_else(|e| e.into_inner()).pop();
        if let Some(free) = free {
            if std::fs::rename(&free, &path).is_ok() {
                return Ok(TestDir(path));
            }
            let _ = std::fs::remove_dir_all(&free);
        }
        if !root.is_dir() {
            std::fs::create_dir_all(root)
                .map_err(|e| format!("cannot create {}: {e}", root.display()))?;
        }
        Ok(TestDir(path))
    }

    /// Takes back a test's directory if the test left it pristine; removes it otherwise.
    fn give_back(&self, mut dir: TestDir) {
        if dir.is_pristine() {
            let path = std::mem::take(&mut dir.0);
            self.0.lock().unwrap_or_else(|e| e.into_inner()).push(path);
        }
    }
}

impl Drop for DirPool {
    fn drop(&mut self) {
        for dir in self
            .0
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Whether `dir` is a directory (not a link) of mode 0700 whose entries are exactly `names`.
fn private_dir_holding(dir: &Path, names: &[&[u8]]) -> bool {
    use nix::fcntl::{OFlag, open};
    use nix::sys::stat::{Mode, SFlag, fstat};
    let Ok(fd) = open(
        dir,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    ) else {
        return false;
    };
    let private = fstat(&fd).is_ok_and(|st| {
        st.st_mode & SFlag::S_IFMT.bits() == SFlag::S_IFDIR.bits() && st.st_mode & 0o7777 == 0o700
    });
    if !private {
        return false;
    }
    // One read: a directory holding only what is expected fits in it many times over, and a
    // fuller buffer means more entries than expected.
    let mut buf = [0u8; 1024];
    // SAFETY: getdents64(2) writes at most `buf.len()` bytes into `buf`.
    let n = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_getdents64,
            fd.as_raw_fd(),
            buf.as_mut_ptr(),
            buf.len(),
        )
    };
    let Ok(n) = usize::try_from(n) else {
        return false;
    };
    if n > buf.len() / 2 {
        return false;
    }
    // struct linux_dirent64: d_ino (8), d_off (8), d_reclen (2), d_type (1), d_name (NUL).
    let mut seen = 0;
    let mut at = 0;
    while at + 19 <= n {
        let reclen = u16::from_ne_bytes([buf[at + 16], buf[at + 17]]) as usize;
        if reclen < 20 || at + reclen > n {
            return false;
        }
        let name = &buf[at + 19..at + reclen];
        let name = &name[..name.iter().position(|b| *b == 0).unwrap_or(name.len())];
        if name != b"." && name != b".." {
            if !names.contains(&name) {
                return false;
            }
            seen += 1;
        }
        at += reclen;
    }
    seen == names.len()
}

/// A test's name as part of a file name: ASCII letters and digits, `_` for the rest, at most
/// 40 characters.
fn file_name_part(test: &str) -> String {
    test.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .take(40)
        .collect()
}

/// Makes a test's private directory, its `home` and its `tmp` (readable by its owner only,
/// as a temporary directory is).
pub(crate) fn make_test_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    let mut builder = std::fs::DirBuilder::new();
    builder.mode(0o700);
    for path in [dir.to_path_buf(), dir.join("home"), dir.join("tmp")] {
        match builder.create(&path) {
            Ok(()) => {}
            // A directory the test before left pristine.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("cannot create {}: {e}", path.display())),
        }
    }
    Ok(())
}

/// A pipe whose read end is non-blocking; both ends close on exec (the write end becomes the
/// child's stdin, which `Command` sets up explicitly).
fn result_pipe() -> Result<(OwnedFd, OwnedFd), String> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)
        .map_err(|e| format!("cannot create the result pipe: {e}"))?;
    fcntl(&read, FcntlArg::F_SETFL(OFlag::O_NONBLOCK))
        .map_err(|e| format!("cannot configure the result pipe: {e}"))?;
    Ok((read, write))
}

/// [`Record::Outcome`] of a test that passed, as it is written.
const PASSED_LINE: &[u8] = br#"{"outcome":{"failure":null}}"#;
/// [`Record::Relay`] of a test that leaked nothing, as it is written.
const NOTHING_LEAKED_LINE: &[u8] = br#"{"relay":{"leaked":[]}}"#;

/// Appends what is left in the result pipe to `bytes`, once the per-test process has exited
/// or closed it (it does not block: the pipe is
/// non-blocking, and its writers are gone or a descendant holds it).
fn read_rest(fd: &OwnedFd, bytes: &mut Vec<u8>) {
    let Ok(clone) = fd.try_clone() else {
        return;
    };
    let mut file = std::fs::File::from(clone);
    let mut buf = [0u8; 8192];
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break, // WouldBlock: a descendant still holds the write end
        }
    }
}

/// The records in what the result pipe held. A line that is not a record (a descendant
/// that wrote to an inherited descriptor) is ignored.
fn parse_records(bytes: &[u8]) -> (Option<ChildReport>, RelayReport) {
    let mut outcome = None;
    let mut relay = RelayReport::default();
    for line in bytes.split(|&b| b == b'\n') {
        // The usual two lines, recognised without a parse (which is slow in the unoptimised
        // builds `cargo test` makes).
        if line == PASSED_LINE {
            outcome.get_or_insert(ChildReport { failure: None });
            continue;
        }
        if line == NOTHING_LEAKED_LINE {
            relay = RelayReport::default();
            continue;
        }
        match serde_json::from_slice(line) {
            Ok(Record::Outcome(report)) if outcome.is_none() => outcome = Some(report),
            Ok(Record::Relay(report)) => relay = report,
            _ => {}
        }
    }
    (outcome, relay)
}

/// Spawns, retrying briefly on `ETXTBSY` (a just-written binary still open in a concurrent
/// fork).
pub(crate) fn spawn_retrying(
    cmd: &mut tokio::process::Command,
    program: &Path,
) -> Result<tokio::process::Child, String> {
    let mut delay = Duration::from_millis(5);
    for _ in 0..8 {
        match cmd.spawn() {
            Ok(child) => return Ok(child),
            Err(e) if e.raw_os_error() == Some(nix::libc::ETXTBSY) => {
                std::thread::sleep(delay);
                delay *= 2;
            }
            Err(e) => return Err(format!("cannot start {}: {e}", program.display())),
        }
    }
    Err(format!(
        "cannot start {}: the file stayed busy (ETXTBSY)",
        program.display()
    ))
}

async fn read_some<R: AsyncRead + Unpin>(reader: &mut Option<R>, buf: &mut [u8]) -> Option<usize> {
    let r = reader.as_mut()?;
    match r.read(buf).await {
        Ok(0) | Err(_) => None,
        Ok(n) => Some(n),
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_test_directory_left_as_made_counts_as_pristine() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().expect("a temporary directory");
        let fresh = |name: &str| {
            let dir = TestDir(root.path().join(name));
            make_test_dir(dir.path()).expect("made");
            dir
        };
        assert!(fresh("untouched").is_pristine());
        type Spoil = (&'static str, fn(&Path));
        let dirty: [Spoil; 6] = [
            ("file-in-tmp", |d| {
                std::fs::write(d.join("tmp/x"), b"x").unwrap()
            }),
            ("dir-in-home", |d| {
                std::fs::create_dir(d.join("home/.cache")).unwrap()
            }),
            ("file-beside", |d| {
                std::fs::write(d.join("stray"), b"").unwrap()
            }),
            ("home-mode", |d| {
                std::fs::set_permissions(d.join("home"), std::fs::Permissions::from_mode(0o755))
                    .unwrap()
            }),
            ("tmp-link", |d| {
                std::fs::remove_dir(d.join("tmp")).unwrap();
                std::os::unix::fs::symlink("/tmp", d.join("tmp")).unwrap();
            }),
            ("home-gone", |d| {
                std::fs::remove_dir(d.join("home")).unwrap()
            }),
        ];
        for (name, spoil) in dirty {
            let dir = fresh(name);
            spoil(dir.path());
            assert!(!dir.is_pristine(), "{name}");
        }
        // Many entries (more than one read returns) are not pristine either.
        let dir = fresh("crowded");
        for i in 0..200 {
            std::fs::write(dir.path().join(format!("home/file-{i:04}")), b"").unwrap();
        }
        assert!(!dir.is_pristine());
    }

    #[test]
    fn the_usual_records_are_the_lines_read_without_a_parse() {
        let passed = Record::Outcome(ChildReport { failure: None });
        let clean = Record::Relay(RelayReport::default());
        assert_eq!(serde_json::to_vec(&passed).unwrap(), PASSED_LINE);
        assert_eq!(serde_json::to_vec(&clean).unwrap(), NOTHING_LEAKED_LINE);
        let (read, write) = result_pipe().unwrap();
        let mut write = std::fs::File::from(write);
        use std::io::Write;
        write
            .write_all(b"{\"relay\":{\"leaked\":[\"sleep\"]}}\n")
            .unwrap();
        write.write_all(PASSED_LINE).unwrap();
        write.write_all(b"\n").unwrap();
        write.write_all(PASSED_LINE).unwrap();
        drop(write);
        let mut bytes = Vec::new();
        read_rest(&read, &mut bytes);
        let (outcome, relay) = parse_records(&bytes);
        assert!(outcome.is_some_and(|o| o.failure.is_none()));
        assert_eq!(relay.leaked, vec!["sleep".to_owned()]);
    }

    #[test]
    fn libtest_framing_goes_and_the_test_output_stays() {
        let mut output = Output::default();
        output.push(
            Stream::Stdout,
            b"\nrunning 1 test\nhello from the test\n",
            1 << 20,
        );
        output.push(
            Stream::Stderr,
            b"thread 'a::b' panicked at x.rs:1:1:\nboom\n",
            1 << 20,
        );
        output.push(
            Stream::Stdout,
            b"test a::b ... FAILED\n\nfailures:\n\nfailures:\n    a::b\n\ntest result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; 2 filtered out; finished in 0.00s\n\n",
            1 << 20,
        );
        strip_libtest_framing(&mut output, "a::b");
        let stdout = String::from_utf8(output.stream(Stream::Stdout)).unwrap();
        assert_eq!(stdout.trim(), "hello from the test");
        assert_eq!(libtest_message(&output), "boom");
    }
}
