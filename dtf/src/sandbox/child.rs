//! The child role: runs inside the re-executed test binary, establishes the isolation level,
//! runs exactly one test in-process and reports the outcome over the result pipe.

use std::any::Any;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::panic::{AssertUnwindSafe, catch_unwind};

use super::{CHILD_VAR, ChildReport, ChildSpec, namespaces};
use crate::outcome::Failure;
use crate::registry::{Isolation, Registry, ShouldPanic, TestDef};

/// The longest failure message sent to the parent (the report must fit in the pipe's buffer).
const MAX_MESSAGE: usize = 16 * 1024;

/// If this process was started as a test's child, takes the child's spec out of the
/// environment. Must run first in `main`, while the process has one thread.
pub fn take_spec() -> Option<Result<ChildSpec, String>> {
    let raw = std::env::var_os(CHILD_VAR)?;
    // SAFETY: called at the start of `main`, before any other thread exists, so nothing can
    // read the environment concurrently.
    unsafe { std::env::remove_var(CHILD_VAR) };
    Some(
        raw.into_string()
            .map_err(|_| "the child spec is not UTF-8".to_owned())
            .and_then(|s| serde_json::from_str(&s).map_err(|e| format!("bad child spec: {e}"))),
    )
}

/// Runs the child role to the end: never returns.
pub fn run(spec: Result<ChildSpec, String>) -> ! {
    let mut report_to = take_result_channel();
    let failure = match spec {
        Ok(spec) => match prepare(&spec) {
            Ok(()) => match Registry::find(&spec.test) {
                Some(def) => run_test(&spec.test, def),
                None => Some(Failure::System {
                    message: format!(
                        "no test named `{}` in this binary (was it built from other sources?)",
                        spec.test
                    ),
                }),
            },
            Err(message) => Some(Failure::System { message }),
        },
        Err(message) => Some(Failure::System { message }),
    };
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    if let Some(out) = report_to.as_mut() {
        let report = ChildReport { failure };
        if let Ok(json) = serde_json::to_vec(&report) {
            let _ = out.write_all(&json);
        }
    }
    std::process::exit(0)
}

/// Moves the result pipe off stdin (to a close-on-exec descriptor, so the test's own child
/// processes never inherit it) and puts `/dev/null` on stdin.
fn take_result_channel() -> Option<File> {
    let stdin = std::io::stdin();
    let fd: OwnedFd = stdin.as_fd().try_clone_to_owned().ok()?;
    if let Ok(null) = File::open("/dev/null") {
        // SAFETY: fd 0 is replaced atomically by dup2; `null` stays a valid open file until
        // dropped.
        let mut zero = unsafe { OwnedFd::from_raw_fd(0) };
        let _ = nix::unistd::dup2(&null, &mut zero);
        std::mem::forget(zero); // fd 0 stays open: it is the process's stdin
    }
    Some(File::from(fd))
}

/// Establishes what the spec asks before the test runs: a memory limit and namespaces.
///
/// The limit comes first: forked processes inherit it, and at level `full` it also sizes the
/// test's `/tmp`. At level `full` this process becomes the relay of a new PID namespace and
/// only the forked test process returns here (see [`namespaces`]).
fn prepare(spec: &ChildSpec) -> Result<(), String> {
    if let Some(parent) = spec.parent {
        die_with_parent(parent)?;
    }
    if let Some(limit) = spec.memory {
        use nix::sys::resource::{Resource, setrlimit};
        setrlimit(Resource::RLIMIT_DATA, limit, limit)
            .map_err(|e| format!("cannot set the memory limit: {e}"))?;
    }
    if spec.isolation == Isolation::Full {
        namespaces::enter_in_child()?;
    }
    Ok(())
}

/// Makes the test's whole process group die with the process that started it, so a runner,
/// worker or cargo-nextest killed with SIGKILL leaves no test (nor anything the test started)
/// running. The parent-death signal is a real-time signal whose handler kills the group: tests
/// do not use it, and a handler runs even while the test's own code blocks.
fn die_with_parent(parent: u32) -> Result<(), String> {
    extern "C" fn kill_group(_: nix::libc::c_int) {
        // SAFETY: killpg is async-signal-safe; group 0 is this process's own group.
        unsafe {
            nix::libc::killpg(0, nix::libc::SIGKILL);
        }
    }
    let signal = nix::libc::SIGRTMAX();
    // SAFETY: installs a handler that only calls an async-signal-safe function; the process is
    // still single-threaded here.
    let installed = unsafe {
        let mut action: nix::libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = kill_group as *const () as usize;
        nix::libc::sigemptyset(&mut action.sa_mask);
        nix::libc::sigaction(signal, &action, std::ptr::null_mut())
    };
    // SAFETY: PR_SET_PDEATHSIG takes a signal number and changes only this process.
    let set =
        unsafe { nix::libc::prctl(nix::libc::PR_SET_PDEATHSIG, signal as nix::libc::c_ulong) };
    if installed != 0 || set != 0 {
        return Err(format!(
            "cannot arrange for the test to die with its runner: {}",
            std::io::Error::last_os_error()
        ));
    }
    if nix::unistd::getppid().as_raw() as u32 != parent {
        return Err("the process that started this test is gone".to_owned());
    }
    Ok(())
}

/// Runs the test body on a thread named after the test (as libtest does, so panic messages
/// read `thread 'NAME' panicked`) and judges the outcome.
fn run_test(name: &str, def: &'static TestDef) -> Option<Failure> {
    let func = def.func;
    let handle = std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || catch_unwind(AssertUnwindSafe(func)));
    let result = match handle {
        Ok(handle) => handle.join().unwrap_or_else(Err),
        Err(e) => {
            return Some(Failure::System {
                message: format!("cannot start the test thread: {e}"),
            });
        }
    };
    judge(def.should_panic, result)
}

/// Pass or fail from what the body did and what `#[should_panic]` asked.
fn judge(
    should_panic: ShouldPanic,
    result: Result<Result<(), String>, Box<dyn Any + Send>>,
) -> Option<Failure> {
    match (should_panic, result) {
        (ShouldPanic::No, Ok(Ok(()))) => None,
        (ShouldPanic::No, Ok(Err(message))) => {
            eprintln!("Error: {message}");
            Some(Failure::ReturnedErr {
                message: clip(message),
            })
        }
        (ShouldPanic::No, Err(payload)) => Some(Failure::Panicked {
            message: clip(payload_text(&*payload)),
        }),
        (_, Ok(_)) => Some(Failure::DidNotPanic),
        (ShouldPanic::Yes, Err(_)) => None,
        (ShouldPanic::WithMessage(expected), Err(payload)) => {
            let message = payload_text(&*payload);
            if message.contains(expected) {
                None
            } else {
                Some(Failure::WrongPanic {
                    message: clip(message),
                    expected: expected.to_owned(),
                })
            }
        }
    }
}

fn payload_text(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "Box<dyn Any>".to_owned()
    }
}

fn clip(mut s: String) -> String {
    if s.len() > MAX_MESSAGE {
        let mut end = MAX_MESSAGE;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str("... [cut]");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn panic_with(msg: &'static str) -> Result<Result<(), String>, Box<dyn Any + Send>> {
        Err(Box::new(msg))
    }

    #[test]
    fn should_panic_rules_match_libtest() {
        assert_eq!(judge(ShouldPanic::No, Ok(Ok(()))), None);
        assert_eq!(judge(ShouldPanic::Yes, panic_with("x")), None);
        assert_eq!(
            judge(ShouldPanic::Yes, Ok(Ok(()))),
            Some(Failure::DidNotPanic)
        );
        assert_eq!(
            judge(ShouldPanic::WithMessage("boom"), panic_with("boom!")),
            None
        );
        assert_eq!(
            judge(ShouldPanic::WithMessage("boom"), panic_with("bang")),
            Some(Failure::WrongPanic {
                message: "bang".into(),
                expected: "boom".into()
            })
        );
        assert_eq!(
            judge(ShouldPanic::No, panic_with("bang")),
            Some(Failure::Panicked {
                message: "bang".into()
            })
        );
    }
}
