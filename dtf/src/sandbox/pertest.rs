//! The per-test process: the one process that owns a test's fate.
//!
//! Every test, local or on a worker, started by the fork server or by an exec, goes through
//! this one pipeline:
//!
//! ```text
//! spawner          the fork server (forkserver.rs) or an exec of the test binary (mod.rs):
//!   │              gives the per-test process its own process group, its stdout, stderr and
//!   │              result pipe, the test's environment, HOME, TMPDIR and working directory
//!   └── per-test process (the relay, this module)
//!         │        runs STAGES in order; then runs the test. A registered test at level
//!         │        `process` or `env` runs right here, on a thread named after it, while
//!         │        the relay's thread waits, then catches what it leaked: one process, one
//!         │        fork. Otherwise the relay starts a test process, directly (a foreign
//!         │        program, `ChildSpec::exec`) or through the init of a new PID namespace
//!         │        (level `full`), waits for it, kills and reports what it leaked, and ends
//!         │        exactly as the test process ended
//!         └── test process (child.rs), when there is one
//!                  runs one registered test on a thread named after it, or execs a program,
//!                  and writes the outcome to the result pipe
//! ```
//!
//! **Adding a stage.** A capability that changes what a test's process sees (a mount, a
//! limit, a namespace) is one more entry in [`STAGES`]: a function that takes the [`Relay`]
//! and returns an error message when it cannot do its part (the test is then reported as
//! `could not run the test: STAGE: MESSAGE`). Stages run in the per-test process, which is
//! single-threaded, after the spawner's part and before the test starts, so whatever they
//! set up (namespaces, mounts, limits, the working directory) holds for the test and
//! everything it starts, whether it runs in this process or in a child. A stage that needs
//! data from the parent gets a field in [`ChildSpec`] (with `#[serde(default)]`).
//!
//! **Leaks.** The per-test process is a child subreaper (`PR_SET_CHILD_SUBREAPER`): anything
//! the test started that leaves its process group (`setsid`, a double fork) and is orphaned is
//! re-parented to it rather than to the machine's init. When the test ends, the processes
//! still running outside the test's group are killed and their names reported
//! ([`RelayReport::leaked`]); what is left in the group is killed by the spawner's side, as
//! it always was. At level `full` nothing can escape: orphans go to the PID namespace's init,
//! and the namespace's end kills every process in it, so there is nothing to report.

use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::libc;
use nix::sys::signal::Signal;
use nix::unistd::{ForkResult, Pid, fork};

use super::{ChildReport, ChildSpec, Record, RelayReport, child, namespaces, paths};
use crate::outcome::Failure;
use crate::registry::Isolation;

/// The most leaked processes named in one report; more are killed but not named.
pub const MAX_LEAKS_NAMED: usize = 1024;

/// How many rounds of "kill what escaped, then look again" the leak catcher makes: each
/// round catches what the previous round's victims had started.
const LEAK_ROUNDS: usize = 16;

/// The exit code (sysexits' `EX_SOFTWARE`) of a relay or init that lost track of its child,
/// which cannot happen short of a kernel bug.
const EX_SOFTWARE: libc::c_int = 70;

/// One step the per-test process takes before the test process starts.
pub struct Stage {
    /// What the stage does, for error messages.
    pub name: &'static str,
    /// Does it; `Err` stops the test with a system failure.
    pub run: fn(&mut Relay) -> Result<(), String>,
}

/// The stages of the per-test process, in the order they run. Add new ones here (see the
/// module's documentation).
pub const STAGES: &[Stage] = &[
    Stage {
        name: "dying with the process that started the test",
        run: die_with_spawner,
    },
    Stage {
        name: "becoming the subreaper of the test's processes",
        run: become_subreaper,
    },
    Stage {
        name: "setting the memory limit",
        run: set_limits,
    },
    Stage {
        name: "mapping the coordinator's paths",
        run: map_paths,
    },
    Stage {
        name: "entering the namespaces of level `full`",
        run: enter_namespaces,
    },
];

/// The per-test process's state while its stages run.
pub struct Relay {
    /// What to run and how.
    pub spec: ChildSpec,
    /// The result pipe.
    report: File,
    /// Set by a stage that created a PID namespace: the test process is then started by the
    /// namespace's init.
    pub pid_namespace: bool,
}

/// Runs the per-test process to its end: the stages, the test process, the leak check.
/// `report` is the result pipe (close-on-exec). Must be called while the process has one
/// thread.
pub fn run(spec: ChildSpec, report: File) -> ! {
    let mut relay = Relay {
        spec,
        report,
        pid_namespace: false,
    };
    for stage in STAGES {
        if let Err(message) = (stage.run)(&mut relay) {
            relay.fail(format!("{}: {message}", stage.name));
        }
    }
    if relay.pid_namespace {
        let (status, leaked) = relay.through_init();
        relay.finish(status, leaked)
    }
    if relay.spec.exec.is_some() {
        let (status, leaked) = relay.directly();
        relay.finish(status, leaked)
    }
    relay.in_process()
}

impl Relay {
    /// Reports a failure to set up the test and ends.
    fn fail(&mut self, message: String) -> ! {
        fail_setup(&mut self.report, message)
    }

    /// A registered test without a PID namespace runs in this process, on its own thread,
    /// while this thread waits: the per-test process is then also the test process, and a
    /// test costs one fork rather than two. Everything the stages set up holds for it as for
    /// a child; what it leaves running outside its group is caught as from a child, once the
    /// test has returned. A test that ends the process itself (`exit`, `abort`, a fatal
    /// signal) ends it as a test process would; what it left outside its group then goes to
    /// the fork server (or the runner's group kill), which kills it.
    ///
    /// Once the test has returned, its output ends (what is buffered is flushed, then stdout
    /// and stderr point at `/dev/null`), the records follow, and the result pipe closes: with
    /// all three at their end, the spawner has the whole report and need not wait for this
    /// process's exit, whose teardown then overlaps the next test.
    fn in_process(&mut self) -> ! {
        let failure = child::registered_test_failure(&self.spec.test);
        end_output();
        child::write_outcome(&mut self.report, failure);
        let leaked = catch_leaks();
        if !leaked.is_empty() {
            write_record(&mut self.report, &Record::Relay(RelayReport { leaked }));
        }
        // SAFETY: the result pipe's descriptor, closed once; `self.report` is never used or
        // dropped after this (the process exits).
        unsafe {
            libc::close(std::os::fd::AsRawFd::as_raw_fd(&self.report));
        }
        std::process::exit(0)
    }

    /// Starts the test process as a child and waits for it, reaping orphans as they end.
    fn directly(&mut self) -> (libc::c_int, Vec<String>) {
        // SAFETY: the per-test process has one thread; the child runs the test.
        let test = match unsafe { fork() } {
            Err(e) => self.fail(format!("cannot start the test process (fork): {e}")),
            Ok(ForkResult::Child) => self.become_test(),
            Ok(ForkResult::Parent { child }) => child,
        };
        let status = wait_reaping(test);
        (status, catch_leaks())
    }

    /// Starts the init of the new PID namespace, which starts the test process; waits for
    /// init's report of the test's status. Nothing can leak out of a PID namespace: when init
    /// ends, the kernel kills every process left in it, so nothing is reported.
    fn through_init(&mut self) -> (libc::c_int, Vec<String>) {
        let (status_read, status_write) = match nix::unistd::pipe2(OFlag::O_CLOEXEC) {
            Ok(pipe) => pipe,
            Err(e) => self.fail(format!(
                "cannot create the status pipe of the PID namespace: {e}"
            )),
        };
        // SAFETY: the per-test process has one thread.
        let init = match unsafe { fork() } {
            Err(e) => self.fail(namespaces::explain_fork(e)),
            Ok(ForkResult::Child) => {
                drop(status_read);
                self.become_init(status_write)
            }
            Ok(ForkResult::Parent { child }) => child,
        };
        drop(status_write);
        let init_status = wait_reaping(init);
        let bytes = read_all(File::from(status_read));
        if bytes.len() >= 4 {
            let status = i32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
            (status, Vec::new())
        } else {
            // Init ended before the test did (killed, or it reported a set-up error itself).
            (init_status, Vec::new())
        }
    }

    /// PID 1 of the new namespace: mounts `/proc`, starts the test process and reaps every
    /// process that ends up its child until the test process ends; then passes the test's
    /// wait status to the relay and exits, which makes the kernel kill whatever is left in the
    /// namespace.
    fn become_init(&mut self, status_write: OwnedFd) -> ! {
        // If the relay is killed on its own, init (and with it the namespace) goes too.
        let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
        if let Err(message) = namespaces::mount_proc() {
            self.fail(message);
        }
        // SAFETY: this process has one thread (it was just forked from a single-threaded one).
        let test = match unsafe { fork() } {
            Err(e) => self.fail(namespaces::explain_fork(e)),
            Ok(ForkResult::Child) => {
                drop(status_write);
                self.become_test()
            }
            Ok(ForkResult::Parent { child }) => child,
        };
        let status = wait_reaping(test);
        let _ = nix::unistd::write(&status_write, &status.to_ne_bytes());
        exit_now(0)
    }

    /// The test process: runs the test (or execs the program) and never returns.
    fn become_test(&mut self) -> ! {
        let report = match self.report.try_clone() {
            Ok(report) => report,
            Err(e) => self.fail(format!("cannot pass the result pipe to the test: {e}")),
        };
        child::run_test_process(&self.spec, report)
    }

    /// Reports the leaks and ends the way the test process ended.
    fn finish(&mut self, status: libc::c_int, leaked: Vec<String>) -> ! {
        if self.spec.exec.is_some() && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
            // A foreign program reports nothing itself: exit code 0 is its pass.
            write_record(
                &mut self.report,
                &Record::Outcome(ChildReport { failure: None }),
            );
        }
        if !leaked.is_empty() {
            write_record(&mut self.report, &Record::Relay(RelayReport { leaked }));
        }
        exit_like(status)
    }
}

/// Flushes what the test's process buffered for stdout and stderr (Rust's and the C
/// library's), then points both at `/dev/null`, which closes this process's ends of the
/// output pipes.
fn end_output() {
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: fflush(NULL) flushes every C stream; /dev/null is opened and dup2'd onto 1 and
    // 2, then its own descriptor closed.
    unsafe {
        libc::fflush(std::ptr::null_mut());
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if null >= 0 {
            libc::dup2(null, 1);
            libc::dup2(null, 2);
            libc::close(null);
        }
    }
}

/// Everything left in a pipe whose writers are gone (an error ends the read).
fn read_all(mut file: File) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match file.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return out,
        }
    }
}

/// Reports on `report` that the test could not be set up (a system failure) and ends this
/// process.
pub fn fail_setup(report: &mut File, message: String) -> ! {
    let failure = Some(Failure::System { message });
    write_record(report, &Record::Outcome(ChildReport { failure }));
    exit_now(0)
}

/// Writes one record as a JSON line (one `write(2)`, well under the pipe's buffer).
pub fn write_record(out: &mut File, record: &Record) {
    if let Ok(mut line) = serde_json::to_vec(record) {
        line.push(b'\n');
        let _ = out.write_all(&line);
    }
}

// ---- the stages ----

/// Makes the whole process group die with the process that started it, so a runner, worker,
/// fork server or cargo-nextest killed with SIGKILL leaves no test (nor anything the test
/// started in its group) running. The parent-death signal is a real-time signal whose handler
/// kills the group: tests do not use it, and a handler runs even while the test's own code
/// blocks. The test process inherits the handler (not the parent-death setting).
fn die_with_spawner(relay: &mut Relay) -> Result<(), String> {
    let Some(parent) = relay.spec.parent else {
        return Ok(());
    };
    extern "C" fn kill_group(_: libc::c_int) {
        // SAFETY: killpg is async-signal-safe; group 0 is this process's own group.
        unsafe {
            libc::killpg(0, libc::SIGKILL);
        }
    }
    let signal = libc::SIGRTMAX();
    // SAFETY: installs a handler that only calls an async-signal-safe function; the process is
    // single-threaded here.
    let installed = unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = kill_group as *const () as usize;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(signal, &action, std::ptr::null_mut())
    };
    // SAFETY: PR_SET_PDEATHSIG takes a signal number and changes only this process.
    let set = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong) };
    if installed != 0 || set != 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    if nix::unistd::getppid().as_raw() as u32 != parent {
        return Err("the process that started this test is gone".to_owned());
    }
    Ok(())
}

/// `PR_SET_CHILD_SUBREAPER`: orphans among the test's descendants come to this process.
fn become_subreaper(_: &mut Relay) -> Result<(), String> {
    // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer and changes only this process.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong) } != 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    Ok(())
}

/// The memory limit: forked processes inherit it, and at level `full` it also sizes the
/// test's `/tmp`, so it comes before the namespaces.
fn set_limits(relay: &mut Relay) -> Result<(), String> {
    if let Some(limit) = relay.spec.memory {
        use nix::sys::resource::{Resource, setrlimit};
        setrlimit(Resource::RLIMIT_DATA, limit, limit).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// On a worker: the input tree's copy at the coordinator's paths, in a user namespace that
/// maps the worker's uid to itself and a private mount namespace (see `paths`), at every
/// isolation level. Level `full`'s namespaces, entered next, nest inside it.
fn map_paths(relay: &mut Relay) -> Result<(), String> {
    match &relay.spec.paths {
        Some(map) => paths::enter_in_test(map),
        None => Ok(()),
    }
}

/// Level `full`: new user, mount, network, UTS, IPC and PID namespaces (see `namespaces`).
fn enter_namespaces(relay: &mut Relay) -> Result<(), String> {
    if relay.spec.isolation == Isolation::Full {
        namespaces::enter()?;
        relay.pid_namespace = true;
    }
    Ok(())
}

// ---- waiting and leaks ----

/// Waits for `pid`, reaping any other child (an orphan re-parented here) that ends first.
/// Returns the raw wait status.
fn wait_reaping(pid: Pid) -> libc::c_int {
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: waitpid(2) writes the status into a valid local.
        let got = unsafe { libc::waitpid(-1, &mut status, libc::__WALL) };
        if got == pid.as_raw() {
            return status;
        }
        if got < 0 && Errno::last() != Errno::EINTR {
            // No children left and the test not seen: report an exit with EX_SOFTWARE.
            return EX_SOFTWARE << 8;
        }
    }
}

/// Kills every live child of this process that is outside its process group (what the test
/// left running after escaping the group), round after round as their own orphans arrive, and
/// returns their names. Children still in the group are left to the group's kill.
pub fn catch_leaks() -> Vec<String> {
    let me = nix::unistd::getpid().as_raw();
    // SAFETY: getpgrp(2) has no arguments and cannot fail.
    let group = unsafe { libc::getpgrp() };
    let mut leaked = Vec::new();
    for _ in 0..LEAK_ROUNDS {
        let escaped: Vec<(i32, String)> = children(me)
            .into_iter()
            .filter_map(|pid| {
                let stat = ProcStat::read(pid)?;
                (stat.alive && stat.group != group).then_some((pid, stat.name))
            })
            .collect();
        if escaped.is_empty() {
            break;
        }
        for (pid, name) in escaped {
            // SAFETY: kill(2) on a child of this process.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
            let mut status = 0;
            // SAFETY: waitpid(2) on that child; a SIGKILLed process ends promptly.
            unsafe {
                libc::waitpid(pid, &mut status, libc::__WALL);
            }
            if leaked.len() < MAX_LEAKS_NAMED {
                leaked.push(name);
            }
        }
    }
    leaked
}

/// The children of process `pid`, from `/proc/PID/task/TID/children` of each of its threads
/// (a process forked by a thread is that thread's child until the thread ends).
fn children(pid: i32) -> Vec<i32> {
    let of_task = |tid: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/children"))
            .map(|s| {
                s.split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return of_task(&pid.to_string());
    };
    let mut all = Vec::new();
    for task in tasks.flatten() {
        if let Some(tid) = task.file_name().to_str() {
            all.extend(of_task(tid));
        }
    }
    all
}

/// What `/proc/PID/stat` says about a process.
struct ProcStat {
    name: String,
    alive: bool,
    group: i32,
}

impl ProcStat {
    fn read(pid: i32) -> Option<ProcStat> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let open = stat.find('(')?;
        let close = stat.rfind(')')?;
        let name = stat.get(open + 1..close)?.to_owned();
        let mut rest = stat.get(close + 1..)?.split_whitespace();
        let state = rest.next()?;
        let _ppid = rest.next()?;
        let group = rest.next()?.parse().ok()?;
        Some(ProcStat {
            name,
            alive: !matches!(state, "Z" | "X"),
            group,
        })
    }
}

// ---- ending ----

/// Ends this process with the same wait status: the same exit code, or the same signal.
pub fn exit_like(status: libc::c_int) -> ! {
    use nix::sys::resource::{Resource, setrlimit};
    if libc::WIFEXITED(status) {
        exit_now(libc::WEXITSTATUS(status));
    }
    if libc::WIFSIGNALED(status) {
        let signal = libc::WTERMSIG(status);
        // The test process already dumped core if it was going to; the relay must not.
        let _ = setrlimit(Resource::RLIMIT_CORE, 0, 0);
        // SAFETY: this single-threaded process only exits after this: restoring the default
        // action and unblocking the signal cannot affect other code.
        unsafe {
            libc::signal(signal, libc::SIG_DFL);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, signal);
            libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            libc::raise(signal);
        }
        exit_now(128 + signal);
    }
    exit_now(EX_SOFTWARE)
}

/// Ends this process at once: no destructors, no `atexit` handlers, no flushing of buffers
/// copied from the forking process.
pub fn exit_now(code: libc::c_int) -> ! {
    // SAFETY: _exit(2) is async-signal-safe and always safe to call.
    unsafe { libc::_exit(code) }
}
