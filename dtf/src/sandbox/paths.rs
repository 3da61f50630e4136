//! The same paths on a worker: a stage of the test's process that makes the coordinator's
//! absolute paths resolve to the worker's copy of the input tree.
//!
//! [`enter`] runs in the test's process before the test (and before level `full`'s
//! namespaces), while the process has one thread. It creates a user namespace that maps the
//! worker's uid and gid to themselves (the test runs as the worker's user, as it would without
//! the namespace) and a private mount namespace, then bind-mounts each root of the tree at the
//! coordinator's path, outermost first. A path whose directories do not exist on the worker
//! (`/home/alice/src/app` on a worker without `/home/alice`) is made by covering its nearest
//! existing ancestor with a tmpfs whose entries are bound back from the original, then
//! creating the missing directories in it. Nothing on the worker's filesystem is changed, and
//! the mounts vanish with the test's process. A worker that is not root then drops the
//! capabilities the new namespace gave it, so the test has the privileges it would have without
//! the namespace.
//!
//! A fork server does this once for all its tests ([`enter_for_server`]); each forked test then
//! only enters its working directory, in a mount namespace of its own where it could mount
//! ([`enter_in_test`]).
//!
//! [`probe`] checks once, at the worker's start, that the kernel allows this; where it does
//! not, the worker remaps what can be remapped at run time instead (see
//! [`crate::inputs::Materialized::rewrite_env`]).

use std::ffi::CString;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{OFlag, open};
use nix::libc;
use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, unshare};
use nix::sys::stat::Mode;
use serde::{Deserialize, Serialize};

/// Set to an errno name or number to make [`probe`] report that the kernel refused, as if it
/// had (for testing the fallback).
pub const FAULT_VAR: &str = "DTF_FAULT_PATHS";

/// How long [`probe`] waits.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the test's process maps before the test runs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathMap {
    /// `(local copy, the coordinator's path)`, outermost first.
    pub binds: Vec<(PathBuf, PathBuf)>,
    /// The working directory to enter once mapped (a coordinator path).
    pub cwd: Option<PathBuf>,
}

/// The binds a fork server mapped once for all its tests (see [`enter_for_server`]); forked
/// per-test processes inherit it with the namespace.
static ENTERED: std::sync::OnceLock<Vec<(PathBuf, PathBuf)>> = std::sync::OnceLock::new();

/// Maps `map`'s paths in a fork server, once for every test it forks: each test then only
/// enters its working directory (see [`enter_in_test`]), rather than making and filling a
/// namespace of its own, which costs more than the fork. Must run while the process has one
/// thread.
pub fn enter_for_server(map: &PathMap) -> Result<(), String> {
    enter(&PathMap {
        binds: map.binds.clone(),
        cwd: None,
    })?;
    let _ = ENTERED.set(map.binds.clone());
    Ok(())
}

/// Maps the paths in a test's process: where its fork server mapped the same paths already,
/// only a mount namespace of the test's own where the test could mount (a root worker keeps
/// its capabilities, so one test's mounts must not reach the next) and its working
/// directory; otherwise everything ([`enter`]). Must run while the process has one thread.
pub fn enter_in_test(map: &PathMap) -> Result<(), String> {
    if ENTERED.get() != Some(&map.binds) {
        return enter(map);
    }
    if nix::unistd::getuid().is_root() {
        unshare(CloneFlags::CLONE_NEWNS)
            .map_err(|e| format!("cannot create the test's mount namespace (unshare): {e}"))?;
    }
    if let Some(cwd) = &map.cwd {
        nix::unistd::chdir(cwd.as_path())
            .map_err(|e| format!("cannot enter {}: {e}", cwd.display()))?;
    }
    Ok(())
}

/// Maps the paths. Must run while the process has one thread.
pub fn enter(map: &PathMap) -> Result<(), String> {
    let uid = nix::unistd::getuid();
    let gid = nix::unistd::getgid();
    let here = open(
        ".",
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("cannot open the working directory: {e}"))?;
    unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNS).map_err(|e| {
        format!("cannot create the user and mount namespaces that map the coordinator's paths (unshare): {e}")
    })?;
    let write = |file: &str, text: String| {
        std::fs::write(file, text).map_err(|e| format!("cannot write {file}: {e}"))
    };
    match std::fs::write("/proc/self/setgroups", "deny") {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(format!("cannot write /proc/self/setgroups: {e}"));
        }
        _ => {}
    }
    write("/proc/self/uid_map", format!("{uid} {uid} 1"))?;
    write("/proc/self/gid_map", format!("{gid} {gid} 1"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| format!("cannot make the mounts private: {e}"))?;
    // Opened in the new namespace (a bind's source must be a mount of the caller's namespace),
    // before any tmpfs can hide them.
    let mut sources = Vec::with_capacity(map.binds.len());
    for (source, _) in &map.binds {
        let fd = open(
            source.as_path(),
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| {
            format!(
                "cannot open the input tree's copy {}: {e}",
                source.display()
            )
        })?;
        sources.push(fd);
    }
    let mut ours: Vec<PathBuf> = Vec::new();
    for ((_, target), fd) in map.binds.iter().zip(&sources) {
        make_dir(target, &mut ours)?;
        bind_from(fd, Path::new("."), target)
            .map_err(|e| format!("cannot map {}: {e}", target.display()))?;
        ours.push(target.clone());
    }
    match &map.cwd {
        Some(cwd) => nix::unistd::chdir(cwd.as_path())
            .map_err(|e| format!("cannot enter {}: {e}", cwd.display()))?,
        None => nix::unistd::fchdir(&here)
            .map_err(|e| format!("cannot return to the working directory: {e}"))?,
    }
    if !uid.is_root() {
        drop_capabilities()?;
    }
    Ok(())
}

/// Makes `target` a directory: it exists, or its missing part is created in a directory that
/// is ours (a bound copy or a tmpfs of this namespace), or the nearest existing ancestor is
/// covered with a tmpfs first.
fn make_dir(target: &Path, ours: &mut Vec<PathBuf>) -> Result<(), String> {
    if target.is_dir() {
        return Ok(());
    }
    let mut ancestor = target.to_path_buf();
    loop {
        if ancestor.is_dir() {
            break;
        }
        if std::fs::symlink_metadata(&ancestor).is_ok() {
            return Err(format!(
                "cannot map {}: {} is not a directory on this worker",
                target.display(),
                ancestor.display()
            ));
        }
        if !ancestor.pop() {
            return Err(format!(
                "cannot map {}: no ancestor exists",
                target.display()
            ));
        }
    }
    if !ours.iter().any(|o| ancestor.starts_with(o)) {
        if ancestor.parent().is_none() {
            return Err(format!(
                "cannot map {}: its first directory does not exist on this worker, and `/` cannot be covered",
                target.display()
            ));
        }
        cover(&ancestor).map_err(|e| format!("cannot map {}: {e}", target.display()))?;
        ours.push(ancestor);
    }
    std::fs::create_dir_all(target).map_err(|e| format!("cannot create {}: {e}", target.display()))
}

/// Covers `dir` with a tmpfs holding the same entries, each bound back from the original.
fn cover(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let fd = open(
        dir,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("cannot open {}: {e}", dir.display()))?;
    let mode = std::fs::metadata(dir)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0o755);
    let entries: Vec<(std::ffi::OsString, std::fs::FileType)> = std::fs::read_dir(dir)
        .map_err(|e| format!("cannot list {}: {e}", dir.display()))?
        .flatten()
        .filter_map(|e| Some((e.file_name(), e.file_type().ok()?)))
        .collect();
    mount(
        Some("tmpfs"),
        dir,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(format!("mode={mode:o}").as_str()),
    )
    .map_err(|e| format!("cannot mount a tmpfs on {}: {e}", dir.display()))?;
    for (name, kind) in entries {
        let point = dir.join(&name);
        if kind.is_symlink() {
            if let Ok(target) = nix::fcntl::readlinkat(&fd, Path::new(&name)) {
                let _ = std::os::unix::fs::symlink(target, &point);
            }
            continue;
        }
        let made = if kind.is_dir() {
            std::fs::create_dir(&point).is_ok()
        } else {
            std::fs::File::create(&point).is_ok()
        };
        // What cannot be bound back (a socket of another user, say) stays an empty mount point.
        if made {
            let _ = bind_from(&fd, Path::new(&name), &point);
        }
    }
    Ok(())
}

/// Bind-mounts `relative` (resolved from the directory `base`, which may be hidden by now)
/// at `target`, with everything mounted below it.
fn bind_from(base: &OwnedFd, relative: &Path, target: &Path) -> Result<(), Errno> {
    nix::unistd::fchdir(base)?;
    mount(
        Some(relative),
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
}

/// Clears this process's capabilities (those the new user namespace gave it).
fn drop_capabilities() -> Result<(), String> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capset(2) reads a valid header and two data structs, as version 3 requires.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &header as *const Header, data.as_ptr()) };
    if rc != 0 {
        return Err(format!(
            "cannot drop capabilities: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Checks, once, that this process may create a user namespace mapping its own uid and a mount
/// namespace, and mount in it. Runs in a forked process that only makes system calls on memory
/// prepared beforehand, so it is safe from a multi-threaded process.
pub fn probe() -> Result<(), String> {
    if let Some(value) = std::env::var(FAULT_VAR).ok().filter(|v| !v.is_empty()) {
        return Err(format!(
            "mapping paths is disabled: {FAULT_VAR}={value} makes the namespace set-up fail on purpose"
        ));
    }
    let uid = nix::unistd::getuid();
    let gid = nix::unistd::getgid();
    let c = |s: &str| CString::new(s).unwrap_or_default();
    let setgroups = c("/proc/self/setgroups");
    let uid_map = c("/proc/self/uid_map");
    let gid_map = c("/proc/self/gid_map");
    let deny = b"deny".to_vec();
    let uid_line = format!("{uid} {uid} 1").into_bytes();
    let gid_line = format!("{gid} {gid} 1").into_bytes();
    let root = c("/");
    let tmpfs = c("tmpfs");
    let probe_dir = if Path::new("/tmp").is_dir() {
        c("/tmp")
    } else {
        c("/")
    };
    // SAFETY: the forked process only calls async-signal-safe functions on memory allocated
    // before the fork, and ends with _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!(
            "cannot fork to check for namespaces: {}",
            Errno::last()
        ));
    }
    if pid == 0 {
        // SAFETY: system calls on prepared, valid memory; the process ends with _exit.
        unsafe {
            let exit_with = |step: i32| -> ! { libc::_exit(step) };
            if libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNS) != 0 {
                exit_with(10 + Errno::last_raw().clamp(0, 100));
            }
            let write_file = |path: &CString, bytes: &[u8]| -> bool {
                let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return false;
                }
                let ok =
                    libc::write(fd, bytes.as_ptr().cast(), bytes.len()) == bytes.len() as isize;
                libc::close(fd);
                ok
            };
            let _ = write_file(&setgroups, &deny);
            if !write_file(&uid_map, &uid_line) || !write_file(&gid_map, &gid_line) {
                exit_with(120);
            }
            if libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) != 0
            {
                exit_with(121);
            }
            if libc::mount(
                tmpfs.as_ptr(),
                probe_dir.as_ptr(),
                tmpfs.as_ptr(),
                0,
                std::ptr::null(),
            ) != 0
            {
                exit_with(122);
            }
            libc::_exit(0)
        }
    }
    let started = Instant::now();
    let status = loop {
        let mut status: libc::c_int = 0;
        // SAFETY: waitpid(2) writes the status into a valid local.
        let got = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if got == pid {
            break Some(status);
        }
        if got < 0 && Errno::last() != Errno::EINTR {
            break None;
        }
        if started.elapsed() > PROBE_TIMEOUT {
            // SAFETY: kill(2) and waitpid(2) on our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
            break None;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    match status {
        Some(s) if libc::WIFEXITED(s) && libc::WEXITSTATUS(s) == 0 => Ok(()),
        Some(s) if libc::WIFEXITED(s) => {
            let code = libc::WEXITSTATUS(s);
            Err(match code {
                10..=110 => format!(
                    "the kernel refuses to create user and mount namespaces (unshare failed with {})",
                    Errno::from_raw(code - 10)
                ),
                120 => "the kernel refuses to map the worker's uid in a new user namespace (AppArmor or a security policy)".to_owned(),
                121 | 122 => "mounts are refused in a new mount namespace".to_owned(),
                _ => format!("the namespace check failed (code {code})"),
            })
        }
        _ => Err("the namespace check did not finish".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_answers() {
        // Either answer is possible on a given kernel; the fault variable forces a refusal.
        let _ = probe();
        // SAFETY: unit tests of this module do not read the variable concurrently.
        unsafe { std::env::set_var(FAULT_VAR, "EPERM") };
        let refused = probe();
        unsafe { std::env::remove_var(FAULT_VAR) };
        assert!(refused.unwrap_err().contains(FAULT_VAR));
    }

    #[test]
    fn a_mapped_tree_appears_at_the_coordinators_paths() {
        if probe().is_err() {
            return; // nothing to map with on this kernel
        }
        let copy = tempfile::tempdir().unwrap();
        std::fs::write(copy.path().join("fixture.txt"), b"shipped").unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        std::fs::write(elsewhere.path().join("keep.txt"), b"kept").unwrap();
        // A path whose parent exists but is not ours: covered, with its entries bound back.
        let target = elsewhere.path().join("missing/app");
        let map = PathMap {
            binds: vec![(copy.path().to_path_buf(), target.clone())],
            cwd: Some(target.clone()),
        };
        // SAFETY: the forked process is single-threaded in effect: it only runs `enter` and
        // plain file reads, then exits.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let entered = enter(&map);
                let shipped = std::fs::read("fixture.txt");
                let kept = std::fs::read(elsewhere.path().join("keep.txt"));
                let ok = entered.is_ok()
                    && shipped.as_deref().ok() == Some(&b"shipped"[..])
                    && kept.as_deref().ok() == Some(&b"kept"[..]);
                if !ok {
                    // Straight to fd 2: the test harness captures eprintln!.
                    let text = format!("{entered:?} {shipped:?} {kept:?}\n");
                    let _ = nix::unistd::write(std::io::stderr(), text.as_bytes());
                }
                unsafe { libc::_exit(if ok { 0 } else { 1 }) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                let status = nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(status, nix::sys::wait::WaitStatus::Exited(child, 0));
            }
        }
        assert!(!target.exists(), "the worker's filesystem is unchanged");
    }
}
