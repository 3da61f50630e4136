//! What happened to a test: the typed result of one attempt, the captured output, and the final
//! status of a test after all its attempts.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Why one attempt of a test failed. Every variant but [`Failure::System`] and
/// [`Failure::WorkerLost`] is the test's own fault; those two are the infrastructure's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Failure {
    /// The test panicked (the panic message is already in its captured stderr).
    Panicked {
        /// The panic payload, when it was a string.
        message: String,
    },
    /// A `Result`-returning test returned `Err`.
    ReturnedErr {
        /// `Debug` of the error.
        message: String,
    },
    /// `#[should_panic]` test that returned normally.
    DidNotPanic,
    /// `#[should_panic(expected = ..)]` test whose panic message lacked the expected text.
    WrongPanic {
        /// What the test panicked with.
        message: String,
        /// What it was expected to contain.
        expected: String,
    },
    /// The process exited before the test finished (e.g. it called `std::process::exit`).
    ExitedEarly {
        /// The exit code.
        code: i32,
    },
    /// The process was killed by a signal.
    Signaled {
        /// The signal number.
        signal: i32,
    },
    /// The test ran longer than its timeout; its process group was killed.
    TimedOut {
        /// The timeout that was exceeded.
        after: Duration,
    },
    /// The test allocated past its memory limit.
    MemoryLimit {
        /// The limit in bytes.
        limit: u64,
    },
    /// The worker running the test was lost too many times.
    WorkerLost {
        /// How many workers were lost while running it.
        times: u32,
    },
    /// The test passed but left processes running outside its process group, and leaks fail
    /// (`--leak-fails`).
    Leaked {
        /// The names of the processes, as [`leak_note`] lists them.
        processes: Vec<String>,
    },
    /// The test could not be run at all (sandbox set-up failed, binary missing, ...).
    System {
        /// What went wrong.
        message: String,
    },
}

impl Failure {
    /// True for failures of the infrastructure rather than of the test itself: these are
    /// retried on another worker, never counted against the test's retries.
    pub fn is_system(&self) -> bool {
        matches!(self, Failure::System { .. })
    }

    /// True when the reason is already visible in the test's captured output (a panic message
    /// or the `Error: ..` line), so reports need not repeat it.
    pub fn is_in_output(&self) -> bool {
        matches!(self, Failure::Panicked { .. } | Failure::ReturnedErr { .. })
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Panicked { message } => write!(f, "panicked: {message}"),
            Failure::ReturnedErr { message } => write!(f, "returned Err: {message}"),
            Failure::DidNotPanic => f.write_str("test did not panic as expected"),
            Failure::WrongPanic { message, expected } => write!(
                f,
                "panic did not contain expected string\n      panic message: {message:?}\n expected substring: {expected:?}"
            ),
            Failure::ExitedEarly { code } => {
                write!(f, "exited with code {code} before the test finished")
            }
            Failure::Signaled { signal } => {
                write!(f, "killed by signal {signal} ({})", signal_name(*signal))
            }
            Failure::TimedOut { after } => write!(f, "timed out after {}", format_duration(*after)),
            Failure::MemoryLimit { limit } => write!(
                f,
                "exceeded its memory limit of {} (an allocation failed)",
                format_size(*limit)
            ),
            Failure::WorkerLost { times } => write!(
                f,
                "the worker running it was lost {times} times; giving up on this test"
            ),
            Failure::Leaked { processes } => f.write_str(&leak_note(processes)),
            Failure::System { message } => write!(f, "could not run the test: {message}"),
        }
    }
}

/// How a report names leaked processes: `leaked 1 process: sleep`, `leaked 2 processes: sh,
/// sleep`. The names come from the test's processes: control characters are escaped.
pub fn leak_note(processes: &[String]) -> String {
    let count = processes.len();
    let noun = if count == 1 { "process" } else { "processes" };
    let names: Vec<String> = processes.iter().map(|p| escape_control(p)).collect();
    format!("leaked {count} {noun}: {}", names.join(", "))
}

/// `text` with control characters shown as escapes (`\n`, `\u{1b}`).
pub fn escape_control(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// The name of a signal number, e.g. `SIGSEGV` for 11.
pub fn signal_name(signal: i32) -> String {
    nix::sys::signal::Signal::try_from(signal)
        .map(|s| s.as_str().to_owned())
        .unwrap_or_else(|_| format!("signal {signal}"))
}

/// Formats a duration the way users write it: `500ms`, `2s`, `1.5s`, `1m`, `90s`.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        format!("{}us", d.as_micros())
    } else if ms < 1000 {
        format!("{ms}ms")
    } else if ms % 60_000 == 0 {
        format!("{}m", ms / 60_000)
    } else if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        let secs = format!("{:.3}", d.as_secs_f64());
        format!("{}s", secs.trim_end_matches('0').trim_end_matches('.'))
    }
}

/// Formats a byte count with binary units: `512MiB`, `1GiB`, `1536KiB`, `100B`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(&str, u64); 3] = [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    for (unit, size) in UNITS {
        if bytes >= size && bytes % size == 0 {
            return format!("{}{unit}", bytes / size);
        }
    }
    format!("{bytes}B")
}

/// Which stream a piece of captured output came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// The default cap on a test's captured output, both streams together (`DTF_OUTPUT_CAP`).
pub const DEFAULT_OUTPUT_CAP: usize = 4 << 20;

/// The largest cap `DTF_OUTPUT_CAP` accepts: a worker's response carries the whole output in
/// one protocol frame, and frames are at most 8 MiB.
pub const MAX_OUTPUT_CAP: usize = 6 << 20;

/// The variable that sets the output cap.
pub const OUTPUT_CAP_VAR: &str = "DTF_OUTPUT_CAP";

/// How the note that marks a cut in the output starts.
pub const CUT_NOTE_PREFIX: &[u8] = b"[dtf: output truncated";

/// Parses an output cap (`DTF_OUTPUT_CAP`): a size such as `1MiB`, at most [`MAX_OUTPUT_CAP`].
pub fn parse_output_cap(value: &str) -> Result<usize, String> {
    let bytes = crate::cli::parse_size(value)?;
    if bytes > MAX_OUTPUT_CAP as u64 {
        return Err(format!(
            "output cap {} is too large: at most {} (a worker returns a test's output in one \
             protocol frame of at most 8MiB)",
            format_size(bytes),
            format_size(MAX_OUTPUT_CAP as u64)
        ));
    }
    Ok(bytes as usize)
}

/// Removes `DTF_OUTPUT_CAP` from a test's environment (a coordinator sends its cap to a worker
/// there) and parses it: the default when it is missing or empty.
pub fn take_output_cap(env: &mut Vec<(String, String)>) -> Result<usize, String> {
    let mut value = None;
    env.retain(|(name, v)| {
        if name == OUTPUT_CAP_VAR {
            value = Some(v.clone());
            false
        } else {
            true
        }
    });
    match value.filter(|v| !v.is_empty()) {
        None => Ok(DEFAULT_OUTPUT_CAP),
        Some(v) => parse_output_cap(&v).map_err(|e| format!("{OUTPUT_CAP_VAR}: {e}")),
    }
}

/// A test's captured output, in the order it was read, capped in size. When a test printed
/// more than the cap, `chunks` holds the head, then a note chunk saying how much was dropped
/// (it starts with [`CUT_NOTE_PREFIX`]), then the tail; `truncated` counts the dropped bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Output {
    /// The pieces as they arrived.
    pub chunks: Vec<(Stream, Vec<u8>)>,
    /// Bytes dropped past the cap.
    pub truncated: u64,
}

/// True for the chunk [`Capture::finish`] inserts where output was cut.
fn is_cut_note(bytes: &[u8]) -> bool {
    bytes.starts_with(CUT_NOTE_PREFIX) && bytes.ends_with(b"]\n")
}

impl Output {
    /// Appends a piece, dropping whatever would exceed `cap` bytes in total (from the end:
    /// for a test's own output use [`Capture`], which keeps the head and the tail).
    pub fn push(&mut self, stream: Stream, bytes: &[u8], cap: usize) {
        let room = cap.saturating_sub(self.len());
        let kept = bytes.len().min(room);
        self.truncated += (bytes.len() - kept) as u64;
        if kept == 0 {
            return;
        }
        match self.chunks.last_mut() {
            Some((s, buf)) if *s == stream && !is_cut_note(buf) => {
                buf.extend_from_slice(&bytes[..kept])
            }
            _ => self.chunks.push((stream, bytes[..kept].to_vec())),
        }
    }

    /// Total bytes kept.
    pub fn len(&self) -> usize {
        self.chunks.iter().map(|(_, b)| b.len()).sum()
    }

    /// True when nothing was captured.
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty() && self.truncated == 0
    }

    /// Both streams interleaved as they arrived, with a note where output was cut.
    pub fn combined(&self) -> Vec<u8> {
        let mut all = Vec::with_capacity(self.len());
        for (_, bytes) in &self.chunks {
            all.extend_from_slice(bytes);
        }
        self.append_truncation_note(&mut all);
        all
    }

    /// One stream alone, with a note where output was cut.
    pub fn stream(&self, which: Stream) -> Vec<u8> {
        let mut out = Vec::new();
        let mut any = false;
        for (s, bytes) in &self.chunks {
            if *s == which {
                any = true;
                out.extend_from_slice(bytes);
            } else if is_cut_note(bytes) {
                out.extend_from_slice(bytes);
            }
        }
        if !any {
            return Vec::new();
        }
        self.append_truncation_note(&mut out);
        out
    }

    /// Output cut by [`Output::push`] (at the end) carries no note yet: it gets one at the end.
    fn append_truncation_note(&self, out: &mut Vec<u8>) {
        if self.truncated > 0 && !self.chunks.iter().any(|(_, b)| is_cut_note(b)) {
            if !out.ends_with(b"\n") && !out.is_empty() {
                out.push(b'\n');
            }
            out.extend_from_slice(
                format!(
                    "[dtf: output truncated, {} more bytes were not kept]\n",
                    self.truncated
                )
                .as_bytes(),
            );
        }
    }
}

/// Captures a test's output up to a cap, keeping its head and its tail: the first half of the
/// cap as it arrives, then the last half (a panic message and the last lines are at the end),
/// dropping the middle. [`Capture::finish`] puts a note where the cut is.
#[derive(Debug)]
pub struct Capture {
    head: Output,
    head_cap: usize,
    /// The tail, in the pieces that arrived (each at most a read's size), oldest first.
    tail: std::collections::VecDeque<(Stream, Vec<u8>)>,
    tail_len: usize,
    tail_cap: usize,
    dropped: u64,
}

impl Capture {
    /// A capture that keeps at most `cap` bytes of both streams together.
    pub fn new(cap: usize) -> Capture {
        let head_cap = cap / 2;
        Capture {
            head: Output::default(),
            head_cap,
            tail: Default::default(),
            tail_len: 0,
            tail_cap: cap - head_cap,
            dropped: 0,
        }
    }

    /// Appends what the test printed on `stream`.
    pub fn push(&mut self, stream: Stream, mut bytes: &[u8]) {
        if self.tail.is_empty() {
            let room = self.head_cap.saturating_sub(self.head.len());
            let kept = bytes.len().min(room);
            if kept > 0 {
                self.head.push(stream, &bytes[..kept], usize::MAX);
            }
            bytes = &bytes[kept..];
        }
        if bytes.is_empty() {
            return;
        }
        // Only the last `tail_cap` bytes of this piece can stay.
        if bytes.len() > self.tail_cap {
            let skip = bytes.len() - self.tail_cap;
            self.dropped += skip as u64;
            bytes = &bytes[skip..];
        }
        self.tail.push_back((stream, bytes.to_vec()));
        self.tail_len += bytes.len();
        while self.tail_len > self.tail_cap {
            let excess = self.tail_len - self.tail_cap;
            let Some((_, front)) = self.tail.front_mut() else {
                break;
            };
            if front.len() <= excess {
                let len = front.len();
                self.tail.pop_front();
                self.tail_len -= len;
                self.dropped += len as u64;
            } else {
                front.drain(..excess);
                self.tail_len -= excess;
                self.dropped += excess as u64;
            }
        }
    }

    /// The captured output: the head, a note where bytes were dropped, then the tail.
    pub fn finish(self) -> Output {
        let mut out = self.head;
        let kept_head = out.len();
        if self.dropped > 0 {
            let stream = self.tail.front().map_or(Stream::Stderr, |(s, _)| *s);
            // The note starts a line of its own; it is a chunk of its own.
            if let Some((_, last)) = out.chunks.last_mut() {
                if !last.ends_with(b"\n") {
                    last.push(b'\n');
                }
            }
            let note = format!(
                "[dtf: output truncated: {} bytes dropped here; the first {} and the last {} \
                 bytes are kept (the cap is set by {OUTPUT_CAP_VAR})]\n",
                self.dropped, kept_head, self.tail_len,
            );
            out.chunks.push((stream, note.into_bytes()));
            out.truncated = self.dropped;
        }
        for (stream, bytes) in self.tail {
            out.push(stream, &bytes, usize::MAX);
        }
        out
    }
}

/// The result of running one attempt of a test in a sandbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// `None` when the test passed.
    pub failure: Option<Failure>,
    /// How long the process ran.
    pub duration: Duration,
    /// What it printed (empty when output was not captured).
    pub output: Output,
    /// The worker that ran it (`None` for local runs).
    pub worker: Option<String>,
    /// Where the test's temporary directory was kept, when it was (`DTF_KEEP_TMP=1`).
    pub kept_tmp: Option<String>,
    /// The processes the test left running outside its process group (killed when it ended).
    #[serde(default)]
    pub leaked: Vec<String>,
}

impl Attempt {
    /// True when the attempt passed.
    pub fn passed(&self) -> bool {
        self.failure.is_none()
    }
}

/// How a test ended after all its attempts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    /// Passed on the first attempt.
    Passed,
    /// Failed, then passed on a retry.
    Flaky,
    /// Failed every attempt.
    Failed,
    /// Not run because of `#[ignore]`.
    Ignored {
        /// `#[ignore = "reason"]`.
        reason: Option<String>,
    },
    /// Not run because the run stopped early (`--fail-fast`).
    NotRun,
    /// Not run because it passed last time with the same binary, input tree, environment and
    /// arguments (`cargo dtf --skip-unchanged`): reported as `ok (unchanged)`, counted as
    /// passed.
    Unchanged,
}

/// A test's final report: its status and every attempt.
#[derive(Clone, Debug)]
pub struct TestReport {
    /// The test's full name.
    pub name: String,
    /// How it ended.
    pub status: Status,
    /// Every attempt, in order (empty for ignored and not-run tests).
    pub attempts: Vec<Attempt>,
    /// True when at least one attempt was rerun because its worker was lost.
    pub rerun_after_lost_worker: bool,
}

impl TestReport {
    /// The last attempt, which decided the status.
    pub fn last(&self) -> Option<&Attempt> {
        self.attempts.last()
    }

    /// The processes every attempt left running outside its process group, in order.
    pub fn leaked(&self) -> Vec<String> {
        self.attempts
            .iter()
            .flat_map(|a| a.leaked.iter().cloned())
            .collect()
    }

    /// Total time over all attempts.
    pub fn duration(&self) -> Duration {
        self.attempts.iter().map(|a| a.duration).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_read_as_the_issue_spells_them() {
        assert_eq!(
            Failure::ExitedEarly { code: 0 }.to_string(),
            "exited with code 0 before the test finished"
        );
        assert_eq!(
            Failure::Signaled { signal: 11 }.to_string(),
            "killed by signal 11 (SIGSEGV)"
        );
        assert_eq!(
            Failure::Signaled { signal: 6 }.to_string(),
            "killed by signal 6 (SIGABRT)"
        );
        assert_eq!(
            Failure::TimedOut {
                after: Duration::from_millis(500)
            }
            .to_string(),
            "timed out after 500ms"
        );
    }

    #[test]
    fn durations_and_sizes_format_compactly() {
        assert_eq!(format_duration(Duration::from_secs(2)), "2s");
        assert_eq!(format_duration(Duration::from_secs(60)), "1m");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format_size(512 << 20), "512MiB");
        assert_eq!(format_size(1000), "1000B");
    }

    #[test]
    fn output_is_capped_with_a_note() {
        let mut out = Output::default();
        out.push(Stream::Stdout, b"hello ", 8);
        out.push(Stream::Stderr, b"world", 8);
        assert_eq!(out.len(), 8);
        assert_eq!(out.truncated, 3);
        let all = String::from_utf8(out.combined()).unwrap();
        assert!(all.starts_with("hello wo\n[dtf: output truncated, 3 more bytes"));
        assert_eq!(
            out.stream(Stream::Stdout),
            b"hello \n[dtf: output truncated, 3 more bytes were not kept]\n"
        );
    }

    #[test]
    fn output_under_the_cap_is_kept_whole_without_a_note() {
        let mut capture = Capture::new(100);
        capture.push(Stream::Stdout, b"one\n");
        capture.push(Stream::Stderr, b"two\n");
        capture.push(Stream::Stdout, &[b'x'; 80]);
        let out = capture.finish();
        assert_eq!(out.truncated, 0);
        assert_eq!(out.len(), 88);
        assert_eq!(out.chunks.len(), 3);
        assert!(!out.combined().windows(3).any(|w| w == b"dtf"));
    }

    #[test]
    fn over_the_cap_the_head_and_the_tail_stay_with_a_note_between() {
        let mut capture = Capture::new(20);
        capture.push(Stream::Stdout, b"head-line\n");
        for i in 0..1000 {
            capture.push(Stream::Stdout, format!("{i:04}\n").as_bytes());
        }
        capture.push(Stream::Stderr, b"panicked\n");
        let out = capture.finish();
        // 10 bytes of head, 10 of tail; the rest dropped and counted.
        let total = 10 + 5000 + 9;
        assert_eq!(out.truncated, total - 20);
        let kept: Vec<u8> = out
            .chunks
            .iter()
            .filter(|(_, b)| !is_cut_note(b))
            .flat_map(|(_, b)| b.clone())
            .collect();
        assert_eq!(kept, b"head-line\n\npanicked\n");
        let all = String::from_utf8(out.combined()).unwrap();
        assert!(
            all.starts_with("head-line\n[dtf: output truncated: "),
            "{all}"
        );
        assert!(all.ends_with("]\n\npanicked\n"), "{all}");
        assert!(
            all.contains(&format!("{} bytes dropped here", total - 20)),
            "{all}"
        );
        // The note shows in each stream alone too, once.
        let stderr = String::from_utf8(out.stream(Stream::Stderr)).unwrap();
        assert_eq!(
            stderr.matches("[dtf: output truncated").count(),
            1,
            "{stderr}"
        );
        assert!(stderr.ends_with("panicked\n"));
        let stdout = String::from_utf8(out.stream(Stream::Stdout)).unwrap();
        assert_eq!(
            stdout.matches("[dtf: output truncated").count(),
            1,
            "{stdout}"
        );
        assert!(stdout.starts_with("head-line\n"));
    }

    #[test]
    fn one_huge_piece_keeps_its_own_head_and_tail() {
        let mut capture = Capture::new(8);
        let mut piece = vec![b'a'; 4];
        piece.extend(vec![b'-'; 1000]);
        piece.extend(b"zzzz");
        capture.push(Stream::Stdout, &piece);
        let out = capture.finish();
        assert_eq!(out.truncated, 1000);
        let all = String::from_utf8(out.combined()).unwrap();
        assert!(all.starts_with("aaaa\n[dtf: output truncated: 1000 bytes dropped here; the first 4 and the last 4 bytes"), "{all}");
        assert!(all.ends_with("]\nzzzz"), "{all}");
    }

    #[test]
    fn the_tail_is_exactly_the_last_bytes_across_streams() {
        let mut capture = Capture::new(6);
        for piece in [b"abc".as_slice(), b"defgh", b"ij", b"klmno"] {
            capture.push(Stream::Stdout, piece);
            capture.push(Stream::Stderr, b"!");
        }
        let out = capture.finish();
        let kept: Vec<u8> = out
            .chunks
            .iter()
            .filter(|(_, b)| !is_cut_note(b))
            .flat_map(|(_, b)| b.clone())
            .collect();
        // Head "abc", then the note (a newline was added to the head), tail "lmno!"... of
        // the last three bytes: "no!".
        assert_eq!(kept, b"abc\nno!");
        assert_eq!(out.truncated, (3 + 1 + 5 + 1 + 2 + 1 + 5 + 1 - 6) as u64);
    }

    #[test]
    fn output_caps_are_bounded_by_a_frame() {
        assert_eq!(parse_output_cap("1MiB"), Ok(1 << 20));
        assert_eq!(parse_output_cap("6MiB"), Ok(6 << 20));
        let err = parse_output_cap("7MiB").unwrap_err();
        assert!(err.contains("at most 6MiB"), "{err}");
        assert!(parse_output_cap("lots").is_err());
    }
}
