//! The fork server: the test binary started once more, in a server role, from which every
//! test's per-test process is forked instead of exec'd.
//!
//! ```text
//! runner (or dtf-worker)  ──request + 3 descriptors (SCM_RIGHTS)──▶  fork server
//!        ◀── Started { pid }, Exited { status } ──                    │ fork
//!                                                                     └── per-test process ...
//! ```
//!
//! The runner starts the server by exec (so it inherits none of the runner's threads or its
//! async runtime), with a `SOCK_SEQPACKET` socket on its stdin and [`SERVER_VAR`] set. The
//! server runs the `#[dtf::warm_up]` functions, says it is ready, and then serves one request
//! at a time: a test's [`ChildSpec`], environment and working directory, with its stdout,
//! stderr and result pipe as descriptors. It checks that it still has one thread, forks, and
//! the child does what the spawner does for an exec'd per-test process (its own process group,
//! the descriptors, the cleared environment, the working directory) before it becomes the
//! per-test process (`pertest::run`). The server reaps its children and sends each one's raw
//! wait status back; the runner treats it as the exit status of an exec'd child.
//!
//! The server is a child subreaper too: when a per-test process is killed from outside (a
//! timeout kills its group), what its test had started outside that group comes to the
//! server, which kills it. It dies with the runner (`PR_SET_PDEATHSIG`), and ends when the
//! runner closes the socket.

use std::collections::HashMap;
use std::fs::File;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nix::errno::Errno;
use nix::libc;
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg,
    sendmsg, socketpair,
};
use nix::unistd::{ForkResult, fork};
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::sync::oneshot;

use super::paths::{self, PathMap};
use super::{ChildSpec, pertest};
use crate::registry::WarmUp;

/// The variable that puts a test binary in the fork server role.
pub const SERVER_VAR: &str = "__DTF_FORK_SERVER";

/// The variable that gives a fork server the paths to map for all its tests (JSON of a
/// [`PathMap`]), on workers that map the coordinator's paths.
const PATHS_VAR: &str = "__DTF_FORK_SERVER_PATHS";

/// The largest message either side sends (a request holds the test's whole environment).
const MAX_MESSAGE: usize = 4 << 20;

/// Set once the warm-ups have run in this process image (the server, and every process it
/// forks): a test process started by exec runs them itself.
static WARMED: AtomicBool = AtomicBool::new(false);

/// A request's head: start one per-test process. On the wire it is followed by the test's
/// environment as the C library keeps one (see [`encode_request`]), and sent with three
/// descriptors: stdout, stderr and the result pipe's write end.
#[derive(Debug, Deserialize)]
struct Request {
    id: u64,
    spec: ChildSpec,
    cwd: Option<PathBuf>,
}

/// The head as the runner writes it (borrowing what it sends).
#[derive(Serialize)]
struct RequestOut<'a> {
    id: u64,
    spec: &'a ChildSpec,
    cwd: &'a Option<PathBuf>,
}

/// What the server says.
#[derive(Debug, PartialEq)]
enum Message {
    /// The warm-ups ran; requests may come.
    Ready,
    /// A warm-up failed: the run cannot start.
    WarmUpFailed { message: String },
    /// The per-test process of request `id` runs as `pid`.
    Started { id: u64, pid: i32 },
    /// The server did not fork for request `id`, and will not again.
    Refused { id: u64, reason: String },
    /// The per-test process of request `id` ended with this raw wait status.
    Exited { id: u64, status: i32 },
}

// ---- the encoding ----
//
// Both sides are the same binary, so the encoding needs no versioning; it is binary rather
// than JSON because it is encoded and decoded once per test on both sides, in whatever
// profile the user's tests are built (usually unoptimised).

/// A test's environment as a request carries it, and as the C library keeps one:
/// `NAME=VALUE\0` strings. A variable that cannot be in an environment (a NUL anywhere, `=` or
/// nothing as its name) is left out, as exec would refuse it.
pub(crate) fn env_block(env: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(env.iter().map(|(k, v)| k.len() + v.len() + 2).sum());
    push_vars(&mut out, env);
    out
}

fn push_vars(out: &mut Vec<u8>, env: &[(String, String)]) {
    for (name, value) in env {
        if name.is_empty() || name.contains(['=', '\0']) || value.contains('\0') {
            continue;
        }
        out.extend_from_slice(name.as_bytes());
        out.push(b'=');
        out.extend_from_slice(value.as_bytes());
        out.push(0);
    }
}

/// A request: the head's length (4 bytes, little-endian), the head (JSON), then the
/// environment: `block` (from [`env_block`], usually the same for every test of a run, so
/// built once) and then `extra`, the variables of this test alone.
fn encode_request(
    id: u64,
    spec: &ChildSpec,
    cwd: &Option<PathBuf>,
    block: &[u8],
    extra: &[(String, String)],
) -> Result<Vec<u8>, String> {
    let head = serde_json::to_vec(&RequestOut { id, spec, cwd })
        .map_err(|e| format!("cannot encode the request: {e}"))?;
    let head_len = u32::try_from(head.len()).map_err(|_| "the request is too large")?;
    let extra_len: usize = extra.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
    let mut out = Vec::with_capacity(4 + head.len() + block.len() + extra_len);
    out.extend_from_slice(&head_len.to_le_bytes());
    out.extend_from_slice(&head);
    out.extend_from_slice(block);
    push_vars(&mut out, extra);
    Ok(out)
}

/// A request's head and its environment block; `None` for anything malformed.
fn decode_request(bytes: &[u8]) -> Option<(Request, &[u8])> {
    let head_len = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let head = bytes.get(4..4usize.checked_add(head_len)?)?;
    let env = &bytes[4 + head_len..];
    if !env.is_empty() && env.last() != Some(&0) {
        return None;
    }
    Some((serde_json::from_slice(head).ok()?, env))
}

impl Message {
    /// A tag byte, then the fields: ids as 8 bytes and pids and statuses as 4 (native
    /// order: both ends are on one machine), text as the rest of the message.
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16);
        match self {
            Message::Ready => out.push(0),
            Message::WarmUpFailed { message } => {
                out.push(1);
                out.extend_from_slice(message.as_bytes());
            }
            Message::Started { id, pid } => {
                out.push(2);
                out.extend_from_slice(&id.to_ne_bytes());
                out.extend_from_slice(&pid.to_ne_bytes());
            }
            Message::Refused { id, reason } => {
                out.push(3);
                out.extend_from_slice(&id.to_ne_bytes());
                out.extend_from_slice(reason.as_bytes());
            }
            Message::Exited { id, status } => {
                out.push(4);
                out.extend_from_slice(&id.to_ne_bytes());
                out.extend_from_slice(&status.to_ne_bytes());
            }
        }
        out
    }

    fn decode(bytes: &[u8]) -> Option<Message> {
        let (&tag, rest) = bytes.split_first()?;
        let id = || Some(u64::from_ne_bytes(rest.get(..8)?.try_into().ok()?));
        let int = || {
            (rest.len() == 12).then_some(())?;
            Some(i32::from_ne_bytes(rest.get(8..12)?.try_into().ok()?))
        };
        let text =
            |from: usize| String::from_utf8_lossy(rest.get(from..).unwrap_or(&[])).into_owned();
        Some(match tag {
            0 if rest.is_empty() => Message::Ready,
            1 => Message::WarmUpFailed { message: text(0) },
            2 => Message::Started {
                id: id()?,
                pid: int()?,
            },
            3 => Message::Refused {
                id: id()?,
                reason: text(8),
            },
            4 => Message::Exited {
                id: id()?,
                status: int()?,
            },
            _ => return None,
        })
    }
}

// ---- the server side ----

/// If this process was started as a fork server, takes the variable out of the environment.
/// Must run first in `main`, while the process has one thread.
pub fn take_role() -> bool {
    if std::env::var_os(SERVER_VAR).is_none() {
        return false;
    }
    // SAFETY: called at the start of `main`, before any other thread exists.
    unsafe { std::env::remove_var(SERVER_VAR) };
    true
}

/// Runs the warm-ups once, in name order. Each must leave the process single-threaded.
pub fn run_warm_ups() -> Result<(), String> {
    if WARMED.swap(true, Ordering::SeqCst) {
        return Ok(());
    }
    for warm_up in WarmUp::all() {
        let name = warm_up.full_name();
        let func = warm_up.func;
        let before = thread_count();
        if let Err(payload) = std::panic::catch_unwind(func) {
            let message = super::child::payload_text(&*payload);
            return Err(format!("warm-up `{name}` panicked: {message}"));
        }
        let left = thread_count().saturating_sub(before);
        if left > 0 {
            return Err(format!(
                "warm-up `{name}` left {left} thread{} running: a warm-up must not start \
                 threads (or anything that starts them, such as a multi-threaded runtime or a \
                 connection pool), since forked tests would share nothing of them",
                if left == 1 { "" } else { "s" }
            ));
        }
    }
    Ok(())
}

/// The number of threads of this process, from `/proc/self/stat`; 0 when unknown.
fn thread_count() -> usize {
    File::open("/proc/self/stat").map_or(0, |stat| threads_in(&stat))
}

/// The thread count in `stat`, this process's open `/proc/self/stat` (read again from its
/// start: the kernel writes it afresh for every read at offset 0).
fn threads_in(stat: &File) -> usize {
    use std::os::unix::fs::FileExt;
    // One read into a buffer that holds any stat line (checked before every fork).
    let mut buf = [0u8; 4096];
    let Ok(n) = stat.read_at(&mut buf, 0) else {
        return 0;
    };
    let Ok(stat) = std::str::from_utf8(&buf[..n]) else {
        return 0;
    };
    // Field 20 (num_threads), counting from the state after the command's closing paren.
    stat.rfind(')')
        .and_then(|close| stat[close + 1..].split_whitespace().nth(17))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The server role to its end: never returns.
pub fn serve() -> ! {
    let socket = take_socket();
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer and changes only this process.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong) };
    // The coordinator's paths, mapped once here rather than in every test (the warm-ups see
    // them too). Where that fails, each test tries itself, and reports why it cannot.
    if let Some(map) = std::env::var(PATHS_VAR)
        .ok()
        .and_then(|json| serde_json::from_str::<PathMap>(&json).ok())
    {
        // SAFETY: the server has one thread (`serve` runs first in `main`).
        unsafe { std::env::remove_var(PATHS_VAR) };
        let _ = paths::enter_for_server(&map);
    }
    crate::registry::Registry::index_for_find();
    let ready = match run_warm_ups() {
        Ok(()) => Message::Ready,
        Err(message) => Message::WarmUpFailed { message },
    };
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    let failed = matches!(ready, Message::WarmUpFailed { .. });
    // In unoptimised builds only: their code is spread over many pages, and each forked test
    // would fault in a hundred or more of them; an optimised binary's tests touch few, and
    // copying its image costs more per server than it saves (docs/design.md).
    if cfg!(debug_assertions) && !failed && thread_count() == 1 {
        // SAFETY: this process has one thread (checked just now).
        let _ = unsafe { super::resident::make_resident() };
    }
    send(socket.as_fd(), &ready);
    if failed {
        pertest::exit_now(1);
    }
    Server::new(socket).run()
}

/// Moves the socket off stdin and puts `/dev/null` there.
fn take_socket() -> OwnedFd {
    let stdin = std::io::stdin();
    let Ok(socket) = stdin.as_fd().try_clone_to_owned() else {
        pertest::exit_now(1);
    };
    if let Ok(null) = File::open("/dev/null") {
        // SAFETY: fd 0 is replaced atomically by dup2.
        let mut zero = unsafe { OwnedFd::from_raw_fd(0) };
        let _ = nix::unistd::dup2(&null, &mut zero);
        std::mem::forget(zero);
    }
    socket
}

struct Server {
    socket: OwnedFd,
    signals: nix::sys::signalfd::SignalFd,
    /// This process's `/proc/self/stat`, open for the check before each fork (without it the
    /// count is 0, and the server does not fork).
    stat: Option<File>,
    /// Live per-test processes: pid → request id.
    running: HashMap<i32, u64>,
    /// Why the server stopped forking, once it has.
    refused: Option<String>,
    buf: Vec<u8>,
}

impl Server {
    fn new(socket: OwnedFd) -> Server {
        let mut mask = SigSet::empty();
        mask.add(Signal::SIGCHLD);
        let _ = mask.thread_block();
        let signals = match nix::sys::signalfd::SignalFd::with_flags(
            &mask,
            nix::sys::signalfd::SfdFlags::SFD_CLOEXEC | nix::sys::signalfd::SfdFlags::SFD_NONBLOCK,
        ) {
            Ok(fd) => fd,
            Err(_) => pertest::exit_now(1),
        };
        Server {
            socket,
            signals,
            stat: File::open("/proc/self/stat").ok(),
            running: HashMap::new(),
            refused: None,
            buf: vec![0u8; MAX_MESSAGE],
        }
    }

    fn run(mut self) -> ! {
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: self.socket.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.signals.as_fd().as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: poll(2) gets two valid `pollfd`s.
            let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if ready < 0 {
                if Errno::last() == Errno::EINTR {
                    continue;
                }
                self.shut_down();
            }
            if fds[1].revents != 0 {
                while let Ok(Some(_)) = self.signals.read_signal() {}
                self.reap();
            }
            if fds[0].revents != 0 && !self.serve_one() {
                self.shut_down();
            }
        }
    }

    /// Reads and serves one request; false when the runner is gone.
    ///
    /// The request is decoded, and the test's environment built, here rather than in the
    /// child: the server's pages for that code and data are mapped already, and a forked child
    /// inherits the result without faulting them in again.
    fn serve_one(&mut self) -> bool {
        let (bytes, fds) = match receive(self.socket.as_fd(), &mut self.buf) {
            Received::Message(bytes, fds) => (bytes, fds),
            Received::Nothing => return true,
            Received::Closed => return false,
        };
        let Some((request, env)) = decode_request(&bytes) else {
            return true;
        };
        let id = request.id;
        let Ok([stdout, stderr, result]) = <[OwnedFd; 3]>::try_from(fds) else {
            return true;
        };
        let env = Environment::new(env);
        match self.fork_for(request, env, [stdout, stderr, result]) {
            Some(pid) => {
                self.running.insert(pid, id);
                send(self.socket.as_fd(), &Message::Started { id, pid });
            }
            None => {
                let reason = self
                    .refused
                    .clone()
                    .unwrap_or_else(|| "the fork server cannot fork".to_owned());
                send(self.socket.as_fd(), &Message::Refused { id, reason });
            }
        }
        true
    }

    /// Forks the per-test process of `request`; `None` when the server does not fork (it
    /// stops for good when it finds itself with more than one thread).
    fn fork_for(&mut self, request: Request, env: Environment, fds: [OwnedFd; 3]) -> Option<i32> {
        if self.refused.is_some() {
            return None;
        }
        let threads = self.stat.as_ref().map_or(0, threads_in);
        if threads == 0 {
            self.refused = Some(
                "the fork server cannot read its thread count from /proc/self/stat, and forking \
                 is safe only while it has one thread (is /proc mounted?)"
                    .to_owned(),
            );
            return None;
        }
        if threads != 1 {
            self.refused = Some(format!(
                "the fork server has {threads} threads (something started a thread before \
                 main, such as a #[ctor] or a static initialiser), and forking a \
                 multi-threaded process is not safe"
            ));
            return None;
        }
        // SAFETY: this process has one thread (checked above); the child becomes the per-test
        // process, which may run any code.
        match unsafe { fork() } {
            Err(e) => {
                self.refused = Some(format!("the fork server cannot fork: {e}"));
                None
            }
            Ok(ForkResult::Child) => {
                // The server's descriptors are not the test's. `self` is never dropped in this
                // process (what follows never returns), so closing them here is final.
                // SAFETY: both are open descriptors this process owns.
                unsafe {
                    libc::close(self.socket.as_raw_fd());
                    libc::close(self.signals.as_fd().as_raw_fd());
                    if let Some(stat) = &self.stat {
                        libc::close(stat.as_raw_fd());
                    }
                }
                let [stdout, stderr, result] = fds;
                let mut spec = request.spec;
                spec.parent = Some(nix::unistd::getppid().as_raw() as u32);
                become_per_test(spec, env, request.cwd, stdout, stderr, result)
            }
            Ok(ForkResult::Parent { child }) => {
                // The child makes itself a group leader too; doing it here as well means the
                // group exists before its pid is reported, so a runner that kills the group at
                // once (a cancelled test) cannot miss it. It fails harmlessly if the child
                // was first.
                let _ = nix::unistd::setpgid(child, child);
                Some(child.as_raw())
            }
        }
    }

    /// Reaps every child that ended. A per-test process's status goes to the runner; after
    /// one was killed or ended abnormally, what its test left outside its group (now the
    /// server's children) is killed too.
    fn reap(&mut self) {
        let mut sweep = false;
        loop {
            let mut status: libc::c_int = 0;
            // SAFETY: waitpid(2) writes the status into a valid local.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG | libc::__WALL) };
            if pid <= 0 {
                break;
            }
            if let Some(id) = self.running.remove(&pid) {
                // A per-test process that ended normally caught its test's leaks itself;
                // one that was killed, or whose test ended it, could not.
                sweep |= !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
                send(self.socket.as_fd(), &Message::Exited { id, status });
            }
        }
        if sweep {
            self.kill_orphans();
        }
    }

    /// Kills every child that is not a live per-test process: orphans re-parented here.
    fn kill_orphans(&self) {
        let me = std::process::id();
        let children =
            std::fs::read_to_string(format!("/proc/{me}/task/{me}/children")).unwrap_or_default();
        for pid in children
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            if !self.running.contains_key(&pid) {
                // SAFETY: kill(2) on a child of this process; it is reaped by `reap`.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
    }

    /// The runner is gone: every per-test process's group goes too, and any orphan left.
    fn shut_down(&self) -> ! {
        self.kill_orphans();
        for &pid in self.running.keys() {
            // SAFETY: killpg(2) on the group a per-test process leads.
            unsafe {
                libc::killpg(pid, libc::SIGKILL);
            }
        }
        pertest::exit_now(0)
    }
}

/// A test's environment as the C library keeps one: `NAME=VALUE\0` strings (the request's
/// block, copied once) and the null-terminated array of pointers to them, built in the
/// server so that the forked child only points `environ` at it.
struct Environment {
    /// Owns the strings `pointers` point at; never read through this field.
    _block: Vec<u8>,
    pointers: Vec<*mut libc::c_char>,
}

impl Environment {
    /// `block` holds NUL-terminated strings (checked by [`decode_request`]).
    fn new(block: &[u8]) -> Environment {
        let mut block = block.to_vec();
        let base = block.as_mut_ptr();
        let mut pointers = Vec::with_capacity(64);
        let mut start = 0;
        for (at, byte) in block.iter().enumerate() {
            if *byte == 0 {
                // SAFETY: `start` is within the block (it is at most `at`).
                pointers.push(unsafe { base.add(start) } as *mut libc::c_char);
                start = at + 1;
            }
        }
        pointers.push(std::ptr::null_mut());
        Environment {
            _block: block,
            pointers,
        }
    }

    /// Makes this the process's environment, for good: the strings and the array stay
    /// allocated for the rest of the process (the C library may keep pointing at them;
    /// `setenv` copies the array before it changes it).
    ///
    /// # Safety
    /// The process must have one thread: nothing may read the environment concurrently.
    unsafe fn install(self) {
        unsafe extern "C" {
            static mut environ: *mut *mut libc::c_char;
        }
        // Never dropped: the block and `pointers` stay allocated, unmoved, for the process.
        let mut this = std::mem::ManuallyDrop::new(self);
        // SAFETY: the caller guarantees a single thread; the array is null-terminated and
        // every pointer in it points at a NUL-terminated string in the block.
        unsafe {
            environ = this.pointers.as_mut_ptr();
        }
    }
}

/// The forked child: takes what the spawner gives an exec'd per-test process, then becomes
/// one.
fn become_per_test(
    spec: ChildSpec,
    env: Environment,
    cwd: Option<PathBuf>,
    stdout: OwnedFd,
    stderr: OwnedFd,
    result: OwnedFd,
) -> ! {
    // The server blocks SIGCHLD for its signalfd; a test process starts with nothing blocked,
    // as an exec'd one does.
    let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
    // SAFETY: setpgid(2) on this process: it leads a new group, as `process_group(0)` does.
    unsafe {
        libc::setpgid(0, 0);
    }
    for (fd, target) in [(&stdout, 1), (&stderr, 2)] {
        // SAFETY: dup2 onto 1 and 2, which stay open as this process's stdout and stderr.
        let mut to = unsafe { OwnedFd::from_raw_fd(target) };
        let _ = nix::unistd::dup2(fd, &mut to);
        std::mem::forget(to);
    }
    drop(stdout);
    drop(stderr);
    // SAFETY: this forked process has one thread: nothing reads the environment concurrently.
    unsafe { env.install() };
    let mut result = File::from(result);
    // The test's directory is made here, in parallel with the runner, rather than by it.
    if let Some(dir) = &spec.dir {
        if let Err(message) = super::make_test_dir(dir) {
            pertest::fail_setup(&mut result, message);
        }
    }
    if let Some(cwd) = cwd {
        let _ = std::env::set_current_dir(cwd);
    }
    pertest::run(spec, result)
}

// ---- messages ----

enum Received {
    Message(Vec<u8>, Vec<OwnedFd>),
    /// Nothing to read yet (a non-blocking socket), or an error that ends nothing.
    Nothing,
    Closed,
}

fn receive(socket: BorrowedFd<'_>, buf: &mut [u8]) -> Received {
    let mut space = nix::cmsg_space!([RawFd; 3]);
    let mut iov = [IoSliceMut::new(buf)];
    let got = recvmsg::<()>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    );
    let message = match got {
        Ok(message) => message,
        Err(Errno::EAGAIN | Errno::EINTR) => return Received::Nothing,
        Err(_) => return Received::Closed,
    };
    let mut fds = Vec::new();
    if let Ok(cmsgs) = message.cmsgs() {
        for cmsg in cmsgs {
            if let ControlMessageOwned::ScmRights(raw) = cmsg {
                // SAFETY: the kernel just installed these descriptors in this process.
                fds.extend(
                    raw.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
    }
    let len = message.bytes;
    if len == 0 && fds.is_empty() {
        return Received::Closed;
    }
    Received::Message(buf[..len].to_vec(), fds)
}

/// Sends one message (blocking); errors mean the runner is gone, which the next read sees.
fn send(socket: BorrowedFd<'_>, message: &Message) {
    let _ = send_bytes(socket, &message.encode(), &[]);
}

fn send_bytes(socket: BorrowedFd<'_>, bytes: &[u8], fds: &[RawFd]) -> nix::Result<usize> {
    let iov = [IoSlice::new(bytes)];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    loop {
        match sendmsg::<()>(
            socket.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Err(Errno::EINTR) => continue,
            other => return other,
        }
    }
}

// ---- the runner's side ----

/// What a started per-test process reports to the runner.
type ExitReceiver = oneshot::Receiver<Result<ExitStatus, String>>;

/// How many milliseconds a stopping server waits for its per-test processes to exit.
const EXIT_WAIT_ROUNDS: usize = 5_000;

/// A running fork server, shared by the tests of one run and binary.
#[derive(Debug)]
pub struct ForkServer {
    inner: Arc<Inner>,
    reader: tokio::task::JoinHandle<()>,
    process: tokio::sync::Mutex<tokio::process::Child>,
}

#[derive(Debug)]
struct Inner {
    socket: AsyncFd<OwnedFd>,
    send_lock: tokio::sync::Mutex<()>,
    pending: Mutex<HashMap<u64, Pending>>,
    next_id: AtomicU64,
    /// Set when the server is gone or refused: later tests start by exec.
    closed: Mutex<Option<String>>,
}

#[derive(Debug)]
struct Pending {
    started: Option<oneshot::Sender<Result<i32, Refusal>>>,
    exited: Option<oneshot::Sender<Result<ExitStatus, String>>>,
    /// The per-test process's pid, once the server has said it.
    pid: Option<i32>,
    /// The test's directory, which the forked process makes.
    dir: Option<PathBuf>,
    /// The runner stopped waiting before it learnt the pid (its test was cancelled): nobody
    /// else can end this process, so the reader kills its group when the pid arrives and
    /// removes its directory once it has exited.
    abandoned: bool,
}

/// Why a test did not start through the server.
#[derive(Clone, Debug)]
pub enum Refusal {
    /// The server will not fork again (the reason is for a one-time note): start by exec.
    Fallback(String),
}

/// A per-test process the server started.
#[derive(Debug)]
pub struct Forked {
    /// Its pid (and process group).
    pub pid: i32,
    exited: ExitReceiver,
}

impl Forked {
    /// Waits for the per-test process to end.
    pub async fn wait(&mut self) -> Result<ExitStatus, String> {
        match (&mut self.exited).await {
            Ok(result) => result,
            Err(_) => Err("the fork server ended while the test ran".to_owned()),
        }
    }
}

impl ForkServer {
    /// Starts `program` as a fork server, with `env` on top of this process's environment,
    /// and waits until its warm-ups have run; with `paths`, the server maps them for all its
    /// tests first. `Err` holds a warm-up's failure or why the server could not start.
    pub async fn start(
        program: &Path,
        paths: Option<&PathMap>,
        env: &[(String, String)],
    ) -> Result<ForkServer, StartError> {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| StartError::Unavailable(format!("cannot create a socket pair: {e}")))?;
        let mut cmd = tokio::process::Command::new(program);
        cmd.envs(env.iter().map(|(k, v)| (k, v)))
            .env(SERVER_VAR, "1");
        if let Some(map) = paths {
            let json = serde_json::to_string(map).map_err(|e| {
                StartError::Unavailable(format!("cannot encode the paths to map: {e}"))
            })?;
            cmd.env(PATHS_VAR, json);
        }
        cmd.stdin(Stdio::from(theirs))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .process_group(0)
            .kill_on_drop(true);
        let process = super::spawn_retrying(&mut cmd, program).map_err(StartError::Unavailable)?;
        drop(cmd);
        nix::fcntl::fcntl(
            &ours,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )
        .map_err(|e| StartError::Unavailable(format!("cannot configure the socket: {e}")))?;
        // SAFETY: the `OwnedFd` moves into the `AsyncFd` and stays open for its lifetime.
        let socket = unsafe { AsyncFd::register(ours) }
            .map_err(|e| StartError::Unavailable(format!("cannot watch the socket: {e}")))?;
        let inner = Arc::new(Inner {
            socket,
            send_lock: tokio::sync::Mutex::new(()),
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            closed: Mutex::new(None),
        });
        let mut buf = vec![0u8; 64 * 1024];
        match inner.recv(&mut buf).await {
            Some(Message::Ready) => {}
            Some(Message::WarmUpFailed { message }) => return Err(StartError::WarmUp(message)),
            _ => {
                return Err(StartError::Unavailable(
                    "the fork server ended before it was ready".to_owned(),
                ));
            }
        }
        let reader = tokio::spawn(read_loop(inner.clone(), buf));
        Ok(ForkServer {
            inner,
            reader,
            process: tokio::sync::Mutex::new(process),
        })
    }

    /// Ends the server: it sees the socket close, kills what is left of its per-test
    /// processes and exits; it is waited for (at most a second, then killed).
    pub async fn stop(&self) {
        // A test is reported once its output and records are in, which may be before its
        // process has exited: the server, which would kill what is left, waits for those
        // exits first (a coverage tool writes its profile then).
        for _ in 0..EXIT_WAIT_ROUNDS {
            if self.inner.lock_pending().is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        self.inner.close("the fork server was stopped".to_owned());
        // SAFETY: shutdown(2) on the socket this server owns.
        unsafe {
            libc::shutdown(self.inner.socket.get_ref().as_raw_fd(), libc::SHUT_RDWR);
        }
        let mut process = self.process.lock().await;
        let waited = tokio::time::timeout(std::time::Duration::from_secs(1), process.wait()).await;
        if waited.is_err() {
            let _ = process.kill().await;
        }
    }

    /// Starts one per-test process. `env` is its environment: a block from [`env_block`] and
    /// the variables that follow it. `fds` are its stdout, stderr and the result pipe's write
    /// end; they are closed here once the server holds its copies.
    pub async fn spawn(
        &self,
        spec: &ChildSpec,
        env: (&[u8], &[(String, String)]),
        cwd: &Option<PathBuf>,
        fds: [OwnedFd; 3],
    ) -> Result<Forked, Refusal> {
        if let Some(reason) = self.closed() {
            return Err(Refusal::Fallback(reason));
        }
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let bytes = encode_request(id, spec, cwd, env.0, env.1).map_err(Refusal::Fallback)?;
        let (started_tx, started_rx) = oneshot::channel();
        let (exited_tx, exited_rx) = oneshot::channel();
        self.inner.lock_pending().insert(
            id,
            Pending {
                started: Some(started_tx),
                exited: Some(exited_tx),
                pid: None,
                dir: spec.dir.clone(),
                abandoned: false,
            },
        );
        // From here until the pid is in hand, a dropped future (a cancelled test) leaves the
        // process, once forked, to the reader to end.
        let mut waiting = Waiting {
            inner: &self.inner,
            id,
            armed: true,
            sent: false,
        };
        let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
        if let Err(reason) = self.inner.send(&bytes, &raw).await {
            waiting.armed = false;
            self.inner.lock_pending().remove(&id);
            return Err(Refusal::Fallback(self.inner.close(reason)));
        }
        waiting.sent = true;
        drop(fds);
        let started = started_rx.await;
        waiting.armed = false;
        match started {
            Ok(Ok(pid)) => Ok(Forked {
                pid,
                exited: exited_rx,
            }),
            Ok(Err(refusal)) => Err(refusal),
            Err(_) => Err(Refusal::Fallback(
                self.closed()
                    .unwrap_or_else(|| "the fork server ended".to_owned()),
            )),
        }
    }

    fn closed(&self) -> Option<String> {
        self.inner
            .closed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for ForkServer {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Armed while [`ForkServer::spawn`] waits for its process's pid: dropped armed (the
/// runner's future was dropped), it hands the process over to the reader (see
/// [`Pending::abandoned`]).
struct Waiting<'a> {
    inner: &'a Inner,
    id: u64,
    armed: bool,
    /// The request went out: the server forks (or refuses) whether or not anyone waits.
    sent: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut pending = self.inner.lock_pending();
        if !self.sent {
            pending.remove(&self.id);
            return;
        }
        if let Some(p) = pending.get_mut(&self.id) {
            p.abandoned = true;
            p.started = None;
            p.exited = None;
            // The pid arrived but was not read yet.
            if let Some(pid) = p.pid {
                kill_group(pid);
            }
        }
    }
}

/// Kills the process group `pid` leads. The server makes every per-test process a group
/// leader before it reports its pid, and the group's id stays taken until the server has
/// reaped it, which it reports after.
fn kill_group(pid: i32) {
    // SAFETY: kill(2) with a negative pid signals that process group; it touches no memory.
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
    }
}

/// Why a fork server did not start.
#[derive(Clone, Debug)]
pub enum StartError {
    /// A warm-up failed: the run must stop.
    WarmUp(String),
    /// The server could not start: tests start by exec instead.
    Unavailable(String),
}

impl Inner {
    fn lock_pending(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Pending>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the server closed (the first reason wins) and returns the reason.
    fn close(&self, reason: String) -> String {
        let mut closed = self.closed.lock().unwrap_or_else(|e| e.into_inner());
        closed.get_or_insert(reason).clone()
    }

    async fn send(&self, bytes: &[u8], fds: &[RawFd]) -> Result<(), String> {
        let _one_at_a_time = self.send_lock.lock().await;
        loop {
            let mut guard = self
                .socket
                .writable()
                .await
                .map_err(|e| format!("the fork server's socket failed: {e}"))?;
            match send_bytes(self.socket.get_ref().as_fd(), bytes, fds) {
                Ok(_) => return Ok(()),
                Err(Errno::EAGAIN) => guard.clear_ready(),
                Err(e) => return Err(format!("cannot reach the fork server: {e}")),
            }
        }
    }

    async fn recv(&self, buf: &mut [u8]) -> Option<Message> {
        loop {
            let mut guard = self.socket.readable().await.ok()?;
            match receive(self.socket.get_ref().as_fd(), buf) {
                Received::Message(bytes, _) => match Message::decode(&bytes) {
                    Some(message) => return Some(message),
                    None => continue,
                },
                Received::Nothing => guard.clear_ready(),
                Received::Closed => return None,
            }
        }
    }
}

/// Hands the server's messages to the tests waiting for them; when the server is gone, every
/// waiting test learns it.
async fn read_loop(inner: Arc<Inner>, mut buf: Vec<u8>) {
    while let Some(message) = inner.recv(&mut buf).await {
        let mut pending = inner.lock_pending();
        match message {
            Message::Started { id, pid } => {
                if let Some(p) = pending.get_mut(&id) {
                    p.pid = Some(pid);
                    if p.abandoned {
                        kill_group(pid);
                    } else if let Some(sender) = p.started.take() {
                        let _ = sender.send(Ok(pid));
                    }
                }
            }
            Message::Refused { id, reason } => {
                if let Some(mut p) = pending.remove(&id) {
                    let reason = inner.close(reason);
                    if let Some(sender) = p.started.take() {
                        let _ = sender.send(Err(Refusal::Fallback(reason)));
                    }
                }
            }
            Message::Exited { id, status } => match pending.remove(&id) {
                Some(Pending {
                    abandoned: true,
                    dir: Some(dir),
                    ..
                }) => {
                    drop(pending);
                    let _ = std::fs::remove_dir_all(dir);
                }
                Some(Pending {
                    exited: Some(sender),
                    ..
                }) => {
                    let _ = sender.send(Ok(ExitStatus::from_raw(status)));
                }
                _ => {}
            },
            Message::Ready | Message::WarmUpFailed { .. } => {}
        }
    }
    let reason = inner.close("the fork server ended".to_owned());
    let left: Vec<Pending> = inner.lock_pending().drain().map(|(_, p)| p).collect();
    for mut p in left {
        if p.abandoned {
            // The server killed what it had forked as it ended.
            if let Some(dir) = p.dir.take() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
        if let Some(sender) = p.started.take() {
            let _ = sender.send(Err(Refusal::Fallback(reason.clone())));
        }
        if let Some(sender) = p.exited.take() {
            let _ = sender.send(Err(format!("{reason} while the test ran")));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ChildSpec {
        ChildSpec {
            test: "a::b".to_owned(),
            isolation: crate::registry::Isolation::Env,
            memory: Some(1 << 30),
            parent: None,
            exec: None,
            paths: None,
            dir: Some(PathBuf::from("/tmp/dtf-a_b-1")),
        }
    }

    #[test]
    fn a_request_round_trips_and_leaves_out_what_no_environment_can_hold() {
        let env = [
            ("PATH".to_owned(), "/bin:/usr/bin".to_owned()),
            ("EMPTY".to_owned(), String::new()),
            ("WITH=EQUALS".to_owned(), "x".to_owned()),
            (String::new(), "no name".to_owned()),
            ("NUL".to_owned(), "a\0b".to_owned()),
            ("UTF8".to_owned(), "grüße=ja".to_owned()),
        ];
        let cwd = Some(PathBuf::from("/work"));
        let (first, extra) = env.split_at(4);
        let bytes = encode_request(7, &spec(), &cwd, &env_block(first), extra).expect("encodes");
        let (request, block) = decode_request(&bytes).expect("decodes");
        assert_eq!(request.id, 7);
        assert_eq!(request.spec.test, "a::b");
        assert_eq!(request.spec.memory, Some(1 << 30));
        assert_eq!(request.cwd, cwd);
        let strings: Vec<&[u8]> = block.split(|b| *b == 0).filter(|s| !s.is_empty()).collect();
        assert_eq!(
            strings,
            vec![
                &b"PATH=/bin:/usr/bin"[..],
                b"EMPTY=",
                "UTF8=grüße=ja".as_bytes()
            ]
        );
        let environment = Environment::new(block);
        assert_eq!(environment.pointers.len(), 4, "three strings and the null");
        assert!(environment.pointers[3].is_null());
        // SAFETY: each pointer points at a NUL-terminated string inside `block`.
        let second = unsafe { std::ffi::CStr::from_ptr(environment.pointers[1]) };
        assert_eq!(second.to_bytes(), b"EMPTY=");
    }

    #[test]
    fn malformed_requests_are_refused_not_misread() {
        let bytes = encode_request(1, &spec(), &None, &[], &[("A".into(), "b".into())]).unwrap();
        assert!(decode_request(&bytes[..2]).is_none(), "a cut length");
        assert!(decode_request(&bytes[..10]).is_none(), "a cut head");
        assert!(
            decode_request(&bytes[..bytes.len() - 1]).is_none(),
            "an unterminated variable"
        );
        let mut huge = bytes.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_request(&huge).is_none(), "a length past the end");
        assert!(decode_request(&[]).is_none());
    }

    #[test]
    fn messages_round_trip_and_bad_ones_are_ignored() {
        let all = [
            Message::Ready,
            Message::WarmUpFailed {
                message: "warm-up `w` panicked: boom".into(),
            },
            Message::Started { id: 3, pid: 4242 },
            Message::Refused {
                id: u64::MAX,
                reason: "two threads".into(),
            },
            Message::Exited { id: 9, status: -1 },
        ];
        for message in all {
            assert_eq!(Message::decode(&message.encode()), Some(message));
        }
        assert_eq!(Message::decode(&[]), None);
        assert_eq!(Message::decode(&[9]), None, "an unknown tag");
        assert_eq!(Message::decode(&[2, 1, 2, 3]), None, "a cut message");
        let mut long = Message::Exited { id: 1, status: 0 }.encode();
        long.push(0);
        assert_eq!(Message::decode(&long), None, "trailing bytes");
    }
}
