//! Linux namespaces for isolation level `full`.
//!
//! [`enter`] is a stage of the per-test process (see `pertest`), which runs before the test
//! process exists, while the per-test process still has one thread. It creates new user,
//! mount, network, UTS, IPC and PID namespaces with one `unshare(2)` and sets them up:
//!
//! - **user**: the invoking uid and gid are mapped to 0, so the test runs as root inside the
//!   namespace (and as the invoking user outside it). That is what lets an unprivileged user
//!   mount, configure `lo` and set the hostname in the namespaces it owns.
//! - **mount**: mounts become private; a fresh tmpfs covers `/tmp`. The test's `HOME`, `TMPDIR`
//!   and working directory, when they lie under `/tmp` (the parent creates `HOME` and `TMPDIR`
//!   in the host's temporary directory), are bind-mounted back at the same paths, so they keep
//!   working and the parent still finds and removes them. The rest of the filesystem is the
//!   host's. Last, the package root (the working directory) is covered by a private overlay
//!   (see `Overlay`): the test's writes there land on the namespace's `/tmp` and vanish with
//!   it; the target directory, `HOME` and `TMPDIR` are bind-mounted back so writes to them go
//!   through. Where overlayfs is refused, the test shares the real package root ([`probe_overlay`]
//!   warns once before the run).
//! - **network**: only `lo`, brought up.
//! - **UTS**: the hostname is [`HOSTNAME`].
//! - **IPC**: System V IPC objects and POSIX message queues of its own.
//! - **PID**: the per-test process stays outside the new PID namespace; the first process it
//!   starts is the namespace's init:
//!
//! ```text
//! per-test process   the relay: waits, then exits as the test did
//!   └── init         PID 1 of the new namespace: mounts /proc, reaps orphans
//!         └── test   PID 2: runs the test
//! ```
//!
//! The test does not run as PID 1 because the kernel ignores signals without a handler sent to
//! a namespace's init from inside it: `abort()` and `raise(SIGTERM)` would not kill it. When the
//! test process ends, init sends the test's wait status to the relay over a pipe and exits;
//! the kernel then kills every other process of the namespace before the relay's wait returns. The relay exits
//! with the test's code or re-raises the test's signal, so the parent sees exactly what it
//! would see at level `env`. All three processes are in the process group the spawner
//! created, so a timeout's `killpg` kills the init, and with it the whole namespace.
//!
//! [`probe`] runs the same set-up in a short-lived forked process before any test starts and
//! turns a refusal into an error that names the cause and the fix.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::libc;
use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, unshare};
use nix::sys::resource::{Resource, getrlimit};
use nix::sys::signal::Signal;
use nix::sys::stat::Mode;
use nix::unistd::{ForkResult, Pid, fork};

/// Set to an errno name (`EPERM`, `EACCES`, `ENOSPC`, `EINVAL`, `EUSERS`, `ENOMEM`) or number to
/// make the namespace set-up fail at its `unshare(2)` call as if the kernel had returned that
/// error. For testing the refusal path: the parent's [`probe`] reads it; a child reads it only
/// when `DTF_PASS_ENV` passes it through.
pub const FAULT_VAR: &str = "DTF_FAULT_UNSHARE";

/// The hostname a test sees at level `full`.
pub const HOSTNAME: &str = "dtf-test";

/// How long [`probe`] waits for its forked process.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// The namespaces of level `full`.
const NAMESPACES: CloneFlags = CloneFlags::CLONE_NEWUSER
    .union(CloneFlags::CLONE_NEWNS)
    .union(CloneFlags::CLONE_NEWNET)
    .union(CloneFlags::CLONE_NEWUTS)
    .union(CloneFlags::CLONE_NEWIPC)
    .union(CloneFlags::CLONE_NEWPID);

/// Enters new namespaces from the per-test process, before the test process starts (see
/// `pertest`). Must be called while the process has one thread. The PID namespace applies to
/// the processes it starts next: its first one becomes the namespace's init, which mounts
/// [`mount_proc`] and starts the test process.
pub fn enter() -> Result<(), String> {
    let fault = fault_from_env()?;
    let cwd = std::env::current_dir().ok();
    let keep = dirs_to_keep(cwd.as_deref());
    let root = package_root(cwd.as_deref());
    let setup = Setup::new(fault, keep, cwd.clone()).with_overlay(
        root.as_deref(),
        write_through(),
        cwd.as_deref(),
    );
    match setup.enter() {
        // The overlay is the last step: without it the test shares the real package root, as
        // at level `env`; [`probe_overlay`] said so once before the run.
        Err(e) if e.step == Step::Overlay => Ok(()),
        other => other.map_err(explain),
    }
}

/// The package root a test at level `full` gets a private overlay of: its working directory,
/// unless that is the test's own directory (the fallback when the package root is missing).
fn package_root(cwd: Option<&Path>) -> Option<PathBuf> {
    let cwd = std::fs::canonicalize(cwd?).ok()?;
    let own = ["HOME", "TMPDIR"]
        .iter()
        .filter_map(|var| std::env::var_os(var).map(PathBuf::from))
        .filter_map(|p| std::fs::canonicalize(p).ok())
        .any(|p| p.parent().is_some_and(|test_dir| cwd.starts_with(test_dir)));
    (!own && cwd != Path::new("/")).then_some(cwd)
}

/// Directories whose writes must reach the real filesystem even under the overlay: the test's
/// `HOME` and `TMPDIR` (the parent reads and removes them) and the cargo target directory this
/// binary runs from (found by cargo's `CACHEDIR.TAG`).
fn write_through() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = ["HOME", "TMPDIR"]
        .iter()
        .filter_map(|var| std::env::var_os(var).map(PathBuf::from))
        .filter_map(|p| std::fs::canonicalize(p).ok())
        .collect();
    if let Some(exe) = std::env::current_exe()
        .ok()
        .and_then(|e| std::fs::canonicalize(e).ok())
    {
        if let Some(target) = exe.ancestors().find(|d| d.join("CACHEDIR.TAG").is_file()) {
            dirs.push(target.to_path_buf());
        }
    }
    dirs
}

/// Checks, before any test starts, that a test at level `full` can get a private overlay of
/// `root`, by mounting one in a short-lived forked process. `Err` says why not: the tests then
/// share the real package root.
pub fn probe_overlay(root: &Path) -> Result<(), String> {
    let root = std::fs::canonicalize(root)
        .map_err(|e| format!("cannot resolve the package root {}: {e}", root.display()))?;
    if Overlay::new(&root, Vec::new()).is_none() {
        return Err(format!(
            "the package root's path {} holds a character overlayfs options cannot carry (`,`, `:` or `\\`)",
            root.display()
        ));
    }
    let setup =
        Setup::new(fault_from_env()?, Vec::new(), None).with_overlay(Some(&root), Vec::new(), None);
    probe_with(&setup)
}

/// Mounts a fresh `/proc` from the first process of a new PID namespace.
pub fn mount_proc() -> Result<(), String> {
    mount_new_proc().map_err(explain)
}

/// What a failed fork of the PID namespace's first process means.
pub fn explain_fork(errno: Errno) -> String {
    explain(SetupError {
        step: Step::Fork,
        errno,
    })
}

/// Checks, before any test starts, that this process may create and set up the namespaces of
/// level `full`. The set-up runs in a forked process that exits at once; its namespaces vanish
/// with it. Safe to call from a multi-threaded process: the forked process only makes system
/// calls on memory allocated before the fork.
pub fn probe() -> Result<(), String> {
    probe_with(&Setup::new(fault_from_env()?, Vec::new(), None))
}

/// Runs `setup` in a forked process and reports how it went.
fn probe_with(setup: &Setup) -> Result<(), String> {
    let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)
        .map_err(|e| format!("cannot create a pipe to check for namespaces: {e}"))?;
    // SAFETY: the forked process runs `probe_child`, which uses only system calls on memory
    // allocated before the fork (no allocation, no locks), and ends with `_exit`.
    match unsafe { fork() } {
        Err(e) => Err(format!("cannot fork to check for namespaces: {e}")),
        Ok(ForkResult::Child) => {
            drop(read);
            probe_child(setup, &write);
            exit_now(0)
        }
        Ok(ForkResult::Parent { child }) => {
            drop(write);
            let record = read_record(&read, PROBE_TIMEOUT);
            if record.is_none() {
                let _ = nix::sys::signal::kill(child, Signal::SIGKILL);
            }
            let status = wait_raw(child);
            match record {
                Some(Ok(())) => Ok(()),
                Some(Err(e)) => Err(explain(e)),
                None => Err(match status {
                    Ok(status) if libc::WIFSIGNALED(status) => format!(
                        "the process checking for namespaces was killed by signal {}",
                        libc::WTERMSIG(status)
                    ),
                    _ => "the process checking for namespaces ended without an answer".to_owned(),
                }),
            }
        }
    }
}

/// One step of the set-up, for error messages and the probe's report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    Unshare,
    Setgroups,
    UidMap,
    GidMap,
    MakePrivate,
    MountTmp,
    KeepDir,
    Loopback,
    Hostname,
    Fork,
    MountProc,
    /// Mounting the package root's private overlay (the last step; its failure is not fatal).
    Overlay,
}

impl Step {
    const ALL: [Step; 12] = [
        Step::Unshare,
        Step::Setgroups,
        Step::UidMap,
        Step::GidMap,
        Step::MakePrivate,
        Step::MountTmp,
        Step::KeepDir,
        Step::Loopback,
        Step::Hostname,
        Step::Fork,
        Step::MountProc,
        Step::Overlay,
    ];

    fn code(self) -> u32 {
        Step::ALL
            .iter()
            .position(|&s| s == self)
            .map_or(0, |i| i as u32 + 1)
    }

    fn from_code(code: u32) -> Option<Step> {
        Step::ALL.get((code as usize).checked_sub(1)?).copied()
    }

    fn what(self) -> &'static str {
        match self {
            Step::Unshare => "creating user, mount, network, PID, UTS and IPC namespaces (unshare)",
            Step::Setgroups => "writing /proc/self/setgroups in the new user namespace",
            Step::UidMap => "writing /proc/self/uid_map in the new user namespace",
            Step::GidMap => "writing /proc/self/gid_map in the new user namespace",
            Step::MakePrivate => "making the new mount namespace private",
            Step::MountTmp => "mounting a tmpfs on /tmp",
            Step::KeepDir => "bind-mounting the test's HOME, TMPDIR or working directory into /tmp",
            Step::Loopback => "bringing up the loopback interface",
            Step::Hostname => "setting the hostname",
            Step::Fork => "starting the first process of the new PID namespace (fork)",
            Step::MountProc => "mounting a fresh /proc for the new PID namespace",
            Step::Overlay => "mounting a private overlay (overlayfs) over the package root",
        }
    }
}

/// A failed step and what the kernel said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SetupError {
    step: Step,
    errno: Errno,
}

fn at(step: Step) -> impl Fn(Errno) -> SetupError {
    move |errno| SetupError { step, errno }
}

/// Everything the set-up needs, prepared before it starts (so that [`probe`] can run it in a
/// forked process without allocating).
struct Setup {
    uid_map: String,
    gid_map: String,
    /// The tmpfs's options: its size is the memory limit, when there is one.
    tmp_options: String,
    fault: Option<Errno>,
    /// Directories under `/tmp` that stay visible at the same paths once a tmpfs covers `/tmp`.
    keep: Vec<PathBuf>,
    /// The working directory to re-enter once `/tmp` is covered, when it lies under `/tmp`.
    cwd: Option<PathBuf>,
    /// The package root's private overlay, when there is a package root to cover.
    overlay: Option<Overlay>,
    /// The working directory to re-enter through the overlay.
    overlay_cwd: Option<PathBuf>,
}

/// A private overlay over the package root: the test reads the real files (the lower layer)
/// and its writes land in an upper layer on the namespace's `/tmp` tmpfs, which vanishes with
/// the namespace. So a test cannot change the source tree, nor what another test sees of it.
struct Overlay {
    /// The package root, mounted over with the overlay.
    root: PathBuf,
    /// `/tmp/.dtf-package-root` and its `upper` and `work` directories, created in order.
    dirs: [String; 3],
    /// `lowerdir=ROOT,upperdir=...,workdir=...`.
    options: String,
    /// Directories under the root that stay the real ones (writes go through): the target
    /// directory (coverage profiles, `CARGO_TARGET_TMPDIR`) and the test's `HOME` and `TMPDIR`.
    through: Vec<PathBuf>,
}

/// Where the overlay's layers live, on the namespace's own `/tmp`.
const OVERLAY_DIR: &str = "/tmp/.dtf-package-root";

impl Overlay {
    /// The overlay of `root`; `None` when its path cannot be written in overlayfs's options
    /// (a `,`, `:` or `\` in it), in which case the test shares the real package root.
    fn new(root: &Path, through: Vec<PathBuf>) -> Option<Overlay> {
        let text = root.to_str()?;
        if text.contains([',', ':', '\\']) || !root.is_absolute() {
            return None;
        }
        Some(Overlay {
            root: root.to_path_buf(),
            dirs: [
                OVERLAY_DIR.to_owned(),
                format!("{OVERLAY_DIR}/upper"),
                format!("{OVERLAY_DIR}/work"),
            ],
            options: format!(
                "lowerdir={text},upperdir={OVERLAY_DIR}/upper,workdir={OVERLAY_DIR}/work"
            ),
            through: through
                .into_iter()
                .filter(|p| p.starts_with(root) && p != root && p.is_dir())
                .collect(),
        })
    }

    /// Mounts it and re-enters the working directory through it. System calls only.
    fn mount(&self, cwd: Option<&Path>) -> Result<(), Errno> {
        for dir in &self.dirs {
            match nix::unistd::mkdir(dir.as_str(), Mode::from_bits_truncate(0o700)) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(e),
            }
        }
        // Opened before the overlay covers them; bind-mounted back through /proc/self/fd.
        let through = self
            .through
            .iter()
            .map(|path| {
                let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
                nix::fcntl::open(path.as_path(), flags, Mode::empty()).map(|fd| (path, fd))
            })
            .collect::<Result<Vec<_>, _>>()?;
        mount(
            Some("overlay"),
            self.root.as_path(),
            Some("overlay"),
            MsFlags::empty(),
            Some(self.options.as_str()),
        )?;
        for (path, fd) in &through {
            let source = format!("/proc/self/fd/{}", fd.as_raw_fd());
            mount(
                Some(source.as_str()),
                path.as_path(),
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )?;
        }
        // The working directory still points into the layer below: enter the overlay.
        nix::unistd::chdir(cwd.unwrap_or(self.root.as_path()))
    }
}

impl Setup {
    fn new(fault: Option<Errno>, keep: Vec<PathBuf>, cwd: Option<PathBuf>) -> Setup {
        let uid = nix::unistd::getuid();
        let gid = nix::unistd::getgid();
        let cwd = cwd.filter(|c| keep.iter().any(|k| c.starts_with(k)));
        // Files in a tmpfs are memory: a test with a memory limit gets a /tmp of that size.
        let tmp_options = match getrlimit(Resource::RLIMIT_DATA) {
            Ok((limit, _)) if limit != libc::RLIM_INFINITY => format!("mode=1777,size={limit}"),
            _ => "mode=1777".to_owned(),
        };
        Setup {
            uid_map: format!("0 {uid} 1\n"),
            gid_map: format!("0 {gid} 1\n"),
            tmp_options,
            fault,
            keep,
            cwd,
            overlay: None,
            overlay_cwd: None,
        }
    }

    /// Adds the package root's overlay (see [`Overlay`]).
    fn with_overlay(
        mut self,
        root: Option<&Path>,
        through: Vec<PathBuf>,
        cwd: Option<&Path>,
    ) -> Setup {
        self.overlay = root.and_then(|root| Overlay::new(root, through));
        self.overlay_cwd = cwd.map(Path::to_path_buf);
        self
    }

    /// Creates the namespaces and sets up all but the PID namespace, whose first process does
    /// its own part. Without kept directories this makes system calls only.
    fn enter(&self) -> Result<(), SetupError> {
        unshare_namespaces(self.fault).map_err(at(Step::Unshare))?;
        match write_file("/proc/self/setgroups", b"deny") {
            Ok(()) | Err(Errno::ENOENT) => {} // kernels before 3.19 have no such file
            Err(e) => return Err(at(Step::Setgroups)(e)),
        }
        write_file("/proc/self/uid_map", self.uid_map.as_bytes()).map_err(at(Step::UidMap))?;
        write_file("/proc/self/gid_map", self.gid_map.as_bytes()).map_err(at(Step::GidMap))?;

        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .map_err(at(Step::MakePrivate))?;
        // Opened in the new mount namespace (a bind mount's source must be in it) and before
        // the tmpfs covers them; bind-mounted back through /proc/self/fd afterwards.
        let kept = self
            .keep
            .iter()
            .map(|path| {
                let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
                nix::fcntl::open(path.as_path(), flags, Mode::empty()).map(|fd| (path, fd))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(at(Step::KeepDir))?;
        mount(
            Some("tmpfs"),
            "/tmp",
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(self.tmp_options.as_str()),
        )
        .map_err(at(Step::MountTmp))?;
        for (path, fd) in &kept {
            std::fs::create_dir_all(path).map_err(|e| SetupError {
                step: Step::KeepDir,
                errno: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
            })?;
            let source = format!("/proc/self/fd/{}", fd.as_raw_fd());
            mount(
                Some(source.as_str()),
                path.as_path(),
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(at(Step::KeepDir))?;
        }
        if let Some(cwd) = &self.cwd {
            nix::unistd::chdir(cwd.as_path()).map_err(at(Step::KeepDir))?;
        }
        // POSIX message queues work through mq_open without this mount; a fresh one keeps
        // /dev/mqueue, where a host mounts it, showing the namespace's own queues.
        if Path::new("/dev/mqueue").is_dir() {
            let _ = mount(
                Some("mqueue"),
                "/dev/mqueue",
                Some("mqueue"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                None::<&str>,
            );
        }

        loopback_up().map_err(at(Step::Loopback))?;
        nix::unistd::sethostname(HOSTNAME).map_err(at(Step::Hostname))?;
        if let Some(overlay) = &self.overlay {
            let cwd = self.overlay_cwd.as_deref();
            overlay.mount(cwd).map_err(at(Step::Overlay))?;
        }
        Ok(())
    }
}

/// The one place the sandbox calls `unshare(2)`. A `fault` (from [`FAULT_VAR`]) makes it fail
/// with that error instead of calling the kernel.
fn unshare_namespaces(fault: Option<Errno>) -> Result<(), Errno> {
    match fault {
        Some(errno) => Err(errno),
        None => unshare(NAMESPACES),
    }
}

/// Reads [`FAULT_VAR`].
fn fault_from_env() -> Result<Option<Errno>, String> {
    let Some(value) = std::env::var_os(FAULT_VAR) else {
        return Ok(None);
    };
    let value = value.to_string_lossy();
    if value.trim().is_empty() {
        return Ok(None);
    }
    parse_errno(&value).map(Some).ok_or_else(|| {
        format!("invalid {FAULT_VAR}={value:?}: expected an errno name such as EPERM, EACCES or ENOSPC, or a number")
    })
}

fn parse_errno(s: &str) -> Option<Errno> {
    let s = s.trim();
    let named = [
        ("EPERM", Errno::EPERM),
        ("EACCES", Errno::EACCES),
        ("ENOSPC", Errno::ENOSPC),
        ("EINVAL", Errno::EINVAL),
        ("EUSERS", Errno::EUSERS),
        ("ENOMEM", Errno::ENOMEM),
    ];
    named
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(s))
        .map(|(_, e)| *e)
        .or_else(|| {
            s.parse::<i32>()
                .ok()
                .filter(|&n| n > 0)
                .map(Errno::from_raw)
        })
}

/// The directories that must stay visible once `/tmp` is covered: `HOME`, `TMPDIR` and the
/// working directory, where they lie under `/tmp` (outermost only, ancestors first). A working
/// directory that is a package root under `/tmp` (a checkout in `/tmp/project`) keeps the whole
/// checkout visible — its `target/` and sibling crates with it — since tests refer to them by
/// absolute paths (`CARGO_TARGET_TMPDIR`, `CARGO_MANIFEST_DIR/..`).
fn dirs_to_keep(cwd: Option<&Path>) -> Vec<PathBuf> {
    let tmp = Path::new("/tmp");
    let private: Vec<PathBuf> = ["HOME", "TMPDIR"]
        .iter()
        .filter_map(|var| std::env::var_os(var).map(PathBuf::from))
        .filter_map(|p| std::fs::canonicalize(p).ok())
        .collect();
    let checkout = cwd.and_then(|c| std::fs::canonicalize(c).ok()).map(|c| {
        // The test's own directory (the fallback working directory) is kept as it is; a
        // package root is widened to its top-level directory under /tmp.
        let own = private
            .iter()
            .any(|p| p.parent().is_some_and(|test_dir| c.starts_with(test_dir)));
        match c
            .strip_prefix(tmp)
            .ok()
            .and_then(|rest| rest.components().next())
        {
            Some(top) if !own => tmp.join(top),
            _ => c,
        }
    });
    let mut dirs: Vec<PathBuf> = private
        .iter()
        .cloned()
        .chain(checkout)
        .filter(|p| p.starts_with(tmp) && p != tmp && p.is_dir())
        .collect();
    dirs.sort();
    let mut kept: Vec<PathBuf> = Vec::new();
    for dir in dirs {
        if !kept.iter().any(|k| dir.starts_with(k)) {
            kept.push(dir);
        }
    }
    kept
}

/// Writes `bytes` to an existing file in one `write(2)` (as `/proc` control files need).
fn write_file(path: &str, bytes: &[u8]) -> Result<(), Errno> {
    let fd = nix::fcntl::open(path, OFlag::O_WRONLY | OFlag::O_CLOEXEC, Mode::empty())?;
    let written = nix::unistd::write(&fd, bytes)?;
    if written == bytes.len() {
        Ok(())
    } else {
        Err(Errno::EIO)
    }
}

/// Sets `IFF_UP` on `lo` with the `SIOCSIFFLAGS` ioctl.
fn loopback_up() -> Result<(), Errno> {
    // SAFETY: socket(2) takes no pointers; a non-negative result is a new descriptor we own.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(Errno::last());
    }
    // SAFETY: `raw` is a valid descriptor that nothing else owns.
    let socket: OwnedFd = unsafe { std::os::fd::FromRawFd::from_raw_fd(raw) };
    // SAFETY: `ifreq` is plain old data; all zeroes is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in request.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the name and writes the flags of `request`, which is a valid,
    // exclusively borrowed `ifreq` for the duration of the call.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut request) } < 0 {
        return Err(Errno::last());
    }
    // SAFETY: SIOCGIFFLAGS filled the `ifru_flags` member of the union.
    unsafe {
        request.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    }
    // SAFETY: as above; SIOCSIFFLAGS only reads `request`.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS as _, &request) } < 0 {
        return Err(Errno::last());
    }
    Ok(())
}

fn mount_new_proc() -> Result<(), SetupError> {
    mount(
        Some("proc"),
        "/proc",
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(at(Step::MountProc))
}

/// Ends this process at once: no destructors, no `atexit` handlers, no flushing of buffers
/// copied from the forking process.
fn exit_now(code: libc::c_int) -> ! {
    // SAFETY: _exit(2) is async-signal-safe and always safe to call.
    unsafe { libc::_exit(code) }
}

/// waitpid(2) for one child, retrying on EINTR; the raw wait status.
fn wait_raw(pid: Pid) -> Result<libc::c_int, Errno> {
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: waitpid(2) writes the status into a valid local.
        let got = unsafe { libc::waitpid(pid.as_raw(), &mut status, libc::__WALL) };
        if got == pid.as_raw() {
            return Ok(status);
        }
        let errno = Errno::last();
        if errno != Errno::EINTR {
            return Err(errno);
        }
    }
}

/// The forked process of [`probe`]: the whole set-up, then init's part in a grandchild; the
/// outcome goes to `out` as one record.
fn probe_child(setup: &Setup, out: &OwnedFd) {
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    if let Err(e) = setup.enter() {
        send_record(out, Err(e));
        return;
    }
    // SAFETY: this forked process has one thread; the grandchild only makes system calls and
    // ends with `_exit`.
    match unsafe { fork() } {
        Err(errno) => send_record(
            out,
            Err(SetupError {
                step: Step::Fork,
                errno,
            }),
        ),
        Ok(ForkResult::Child) => {
            send_record(out, mount_new_proc());
            exit_now(0)
        }
        Ok(ForkResult::Parent { child }) => {
            let _ = wait_raw(child);
        }
    }
}

/// The probe's answer: 8 bytes, the step's code (0 for success) and the errno.
fn send_record(out: &OwnedFd, result: Result<(), SetupError>) {
    let (code, errno) = match result {
        Ok(()) => (0u32, 0i32),
        Err(e) => (e.step.code(), e.errno as i32),
    };
    let mut record = [0u8; 8];
    record[..4].copy_from_slice(&code.to_ne_bytes());
    record[4..].copy_from_slice(&errno.to_ne_bytes());
    let _ = nix::unistd::write(out, &record);
}

/// Reads the probe's record, waiting at most `limit`. `None` when the probe ended or hung
/// without answering.
fn read_record(fd: &OwnedFd, limit: Duration) -> Option<Result<(), SetupError>> {
    let deadline = Instant::now() + limit;
    let mut record = [0u8; 8];
    let mut filled = 0;
    while filled < record.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        let mut poll = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let millis = left.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
        // SAFETY: poll(2) gets one valid `pollfd`.
        let ready = unsafe { libc::poll(&mut poll, 1, millis) };
        if ready < 0 {
            if Errno::last() == Errno::EINTR {
                continue;
            }
            return None;
        }
        if ready == 0 {
            continue;
        }
        match nix::unistd::read(fd, &mut record[filled..]) {
            Ok(0) => return None,
            Ok(n) => filled += n,
            Err(Errno::EINTR) => {}
            Err(_) => return None,
        }
    }
    let code = u32::from_ne_bytes([record[0], record[1], record[2], record[3]]);
    let errno = i32::from_ne_bytes([record[4], record[5], record[6], record[7]]);
    if code == 0 {
        return Some(Ok(()));
    }
    let step = Step::from_code(code)?;
    Some(Err(SetupError {
        step,
        errno: Errno::from_raw(errno),
    }))
}

/// A kernel setting, trimmed; `None` when this kernel has no such setting.
fn sysctl(name: &str) -> Option<String> {
    let path = format!("/proc/sys/{}", name.replace('.', "/"));
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

/// What a failed step means and how to fix it.
fn explain(e: SetupError) -> String {
    let said = format!(
        "{} failed with {:?} ({})",
        e.step.what(),
        e.errno,
        e.errno.desc()
    );
    let (cause, fix) = cause_and_fix(e);
    format!("{said}. {cause} Fix: {fix}")
}

fn cause_and_fix(e: SetupError) -> (String, String) {
    let refused = matches!(e.errno, Errno::EPERM | Errno::EACCES);
    match e.step {
        Step::Unshare if refused => {
            let mut cause = String::from("The kernel refuses to create user namespaces for this process: ");
            match sysctl("kernel.unprivileged_userns_clone").as_deref() {
                Some("0") => cause.push_str("unprivileged user namespaces are disabled (kernel.unprivileged_userns_clone = 0)."),
                _ => cause.push_str(
                    "unprivileged user namespaces are disabled (kernel.unprivileged_userns_clone = 0 where that setting exists), \
                     or a seccomp filter forbids unshare (the default profiles of Docker and Podman do).",
                ),
            }
            (
                cause,
                "`sysctl -w kernel.unprivileged_userns_clone=1` where that setting exists; in a container, \
                 allow unshare in its seccomp profile (e.g. `docker run --security-opt seccomp=unconfined`)."
                    .to_owned(),
            )
        }
        Step::Unshare if e.errno == Errno::ENOSPC => {
            let limits: Vec<String> = ["user", "mnt", "net", "pid", "uts", "ipc"]
                .iter()
                .filter_map(|ns| {
                    let name = format!("user.max_{ns}_namespaces");
                    sysctl(&name).map(|value| (name, value))
                })
                .filter(|(name, value)| value == "0" || name == "user.max_user_namespaces")
                .map(|(name, value)| format!("{name} = {value}"))
                .collect();
            let mut cause = String::from("A limit on the number of namespaces is reached or is 0");
            if !limits.is_empty() {
                cause.push_str(&format!(" ({})", limits.join(", ")));
            }
            cause.push_str(
                "; inside a container or a user namespace, the limits are that namespace's.",
            );
            (
                cause,
                "raise the limit, e.g. `sysctl -w user.max_user_namespaces=15000` (and any other \
                 user.max_*_namespaces that is 0)."
                    .to_owned(),
            )
        }
        Step::Unshare if e.errno == Errno::EINVAL => (
            "This kernel lacks support for some of these namespaces (CONFIG_USER_NS, CONFIG_NET_NS, CONFIG_PID_NS, \
             CONFIG_UTS_NS, CONFIG_IPC_NS), or the process is multi-threaded."
                .to_owned(),
            "use a kernel built with namespace support.".to_owned(),
        ),
        Step::Unshare if e.errno == Errno::EUSERS => (
            "User namespaces are nested too deeply (the kernel allows 32 levels).".to_owned(),
            "run the tests from a less deeply nested container.".to_owned(),
        ),
        Step::Setgroups | Step::UidMap | Step::GidMap if refused => {
            let mut cause = String::from(
                "The new user namespace has no privileges: a security module restricts unprivileged user namespaces",
            );
            match sysctl("kernel.apparmor_restrict_unprivileged_userns").as_deref() {
                Some("1") => cause.push_str(" (AppArmor: kernel.apparmor_restrict_unprivileged_userns = 1)."),
                _ => cause.push_str(" (on Ubuntu 23.10 and later, AppArmor's kernel.apparmor_restrict_unprivileged_userns = 1)."),
            }
            (
                cause,
                "`sysctl -w kernel.apparmor_restrict_unprivileged_userns=0`, or give the test binary an AppArmor \
                 profile that allows `userns,` (see Ubuntu's notes on unprivileged user namespace restrictions)."
                    .to_owned(),
            )
        }
        Step::MakePrivate | Step::MountTmp | Step::KeepDir if refused => (
            "A security module (AppArmor, SELinux) or the container forbids mounts in the new mount namespace.".to_owned(),
            "allow mounts in user namespaces in the security policy, or run at level `env`.".to_owned(),
        ),
        Step::MountProc if refused => (
            "The kernel mounts a fresh /proc in a user namespace only where the existing /proc is fully visible; \
             here parts of it are covered or read-only, as containers do."
                .to_owned(),
            "run the container with an unmasked /proc (e.g. `docker run --security-opt systempaths=unconfined`), \
             or run at level `env`."
                .to_owned(),
        ),
        _ => (
            "The kernel or a security policy refused the namespace set-up.".to_owned(),
            "check the kernel's namespace settings (user.max_user_namespaces, kernel.unprivileged_userns_clone, AppArmor, seccomp), or run at level `env`.".to_owned(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_round_trip_through_their_codes() {
        for step in Step::ALL {
            assert_eq!(Step::from_code(step.code()), Some(step));
        }
        assert_eq!(Step::from_code(0), None);
        assert_eq!(Step::from_code(99), None);
    }

    #[test]
    fn fault_values_parse_as_errnos() {
        assert_eq!(parse_errno("EPERM"), Some(Errno::EPERM));
        assert_eq!(parse_errno(" enospc "), Some(Errno::ENOSPC));
        assert_eq!(parse_errno("13"), Some(Errno::EACCES));
        assert_eq!(parse_errno("nope"), None);
        assert_eq!(parse_errno("0"), None);
    }

    #[test]
    fn refusals_name_the_setting_to_change() {
        let unshare = explain(SetupError {
            step: Step::Unshare,
            errno: Errno::EPERM,
        });
        assert!(unshare.contains("EPERM"), "{unshare}");
        assert!(
            unshare.contains("kernel.unprivileged_userns_clone"),
            "{unshare}"
        );
        let limit = explain(SetupError {
            step: Step::Unshare,
            errno: Errno::ENOSPC,
        });
        assert!(limit.contains("user.max_user_namespaces"), "{limit}");
        let apparmor = explain(SetupError {
            step: Step::Setgroups,
            errno: Errno::EACCES,
        });
        assert!(
            apparmor.contains("kernel.apparmor_restrict_unprivileged_userns"),
            "{apparmor}"
        );
    }
}
