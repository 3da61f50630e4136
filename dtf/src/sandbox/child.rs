//! The child role: the re-executed test binary becomes the test's per-test process (see
//! [`pertest`]), and the test process it starts runs exactly one test in-process and reports
//! the outcome over the result pipe.

use std::any::Any;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::Ordering;

use nix::libc;

use super::{CHILD_VAR, ChildReport, ChildSpec, Exec, Record, forkserver, pertest};
use crate::outcome::Failure;
use crate::registry::{Registry, ShouldPanic, TestDef};

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

/// Runs the child role of an exec'd test binary to the end: this process is the test's
/// per-test process (see [`pertest`]). Never returns.
pub fn run(spec: Result<ChildSpec, String>) -> ! {
    let mut report = take_result_channel();
    match spec {
        Ok(spec) => pertest::run(spec, report),
        Err(message) => {
            let failure = Some(Failure::System { message });
            pertest::write_record(&mut report, &Record::Outcome(ChildReport { failure }));
            std::process::exit(0)
        }
    }
}

/// The test process: runs the test the spec names (or execs its program) and writes the
/// outcome to `report`. Never returns.
pub fn run_test_process(spec: &ChildSpec, mut report: File) -> ! {
    let failure = match &spec.exec {
        Some(exec) => Some(Failure::System {
            message: exec_program(exec),
        }),
        None => registered_test_failure(&spec.test),
    };
    write_outcome(&mut report, failure);
    std::process::exit(0)
}

/// Runs the registered test `name` in this process (on its own thread) and judges it.
pub fn registered_test_failure(name: &str) -> Option<Failure> {
    // Started by exec, this process has not run the warm-ups yet (forked from the fork
    // server, it has, and this does nothing).
    match forkserver::run_warm_ups().and_then(|()| {
        Registry::find(name).ok_or_else(|| {
            format!("no test named `{name}` in this binary (was it built from other sources?)")
        })
    }) {
        Ok(def) => run_test(name, def),
        Err(message) => Some(Failure::System { message }),
    }
}

/// Flushes what the test printed and writes its outcome to `report` (the process then ends
/// with `exit(0)`: the outcome is in the record, not the exit code).
pub fn write_outcome(report: &mut File, failure: Option<Failure>) {
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    pertest::write_record(report, &Record::Outcome(ChildReport { failure }));
}

/// Replaces this process with `exec`'s program; returns only why that failed.
fn exec_program(exec: &Exec) -> String {
    use std::os::unix::process::CommandExt;
    let error = std::process::Command::new(&exec.program)
        .args(&exec.args)
        .exec();
    format!("cannot run {}: {error}", exec.program.display())
}

/// Moves the result pipe off stdin (to a close-on-exec descriptor, so the test's own child
/// processes never inherit it) and puts `/dev/null` on stdin. Without a pipe on stdin the
/// outcome goes nowhere (the parent then explains the exit).
fn take_result_channel() -> File {
    let stdin = std::io::stdin();
    let fd: Option<OwnedFd> = stdin.as_fd().try_clone_to_owned().ok();
    if let Ok(null) = File::open("/dev/null") {
        // SAFETY: fd 0 is replaced atomically by dup2; `null` stays a valid open file until
        // dropped.
        let mut zero = unsafe { OwnedFd::from_raw_fd(0) };
        let _ = nix::unistd::dup2(&null, &mut zero);
        std::mem::forget(zero); // fd 0 stays open: it is the process's stdin
        if fd.is_none() {
            return null;
        }
    }
    match fd {
        Some(fd) => File::from(fd),
        None => std::process::exit(0),
    }
}

/// Runs the test body on a thread named after the test (as libtest does, so panic messages
/// read `thread 'NAME' panicked`) and judges the outcome.
fn run_test(name: &str, def: &'static TestDef) -> Option<Failure> {
    let func = def.func;
    let tid = std::sync::Arc::new(std::sync::atomic::AtomicI32::new(0));
    let its_tid = tid.clone();
    let handle = std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            // SAFETY: gettid(2) has no arguments and cannot fail.
            its_tid.store(unsafe { libc::gettid() }, Ordering::SeqCst);
            catch_unwind(AssertUnwindSafe(func))
        });
    let result = match handle {
        Ok(handle) => handle.join().unwrap_or_else(Err),
        Err(e) => {
            return Some(Failure::System {
                message: format!("cannot start the test thread: {e}"),
            });
        }
    };
    wait_until_gone(tid.load(Ordering::SeqCst));
    judge(def.should_panic, result)
}

/// Waits (at most a second) until the kernel has released thread `tid` of this process: a
/// join returns a moment before, and until then the processes the thread started are still
/// its children rather than the process's (the leak check looks for them).
fn wait_until_gone(tid: i32) {
    if tid <= 0 {
        return;
    }
    let task = format!("/proc/self/task/{tid}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    while std::fs::symlink_metadata(&task).is_ok() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_micros(20));
    }
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

pub(crate) fn payload_text(payload: &(dyn Any + Send)) -> String {
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
