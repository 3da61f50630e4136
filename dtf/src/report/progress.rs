//! The live progress line on a terminal: tests done out of the total, running, failed, and
//! slots busy. Shown only when stdout is a terminal and the format is pretty or terse, never
//! in piped output, JSON or JUnit.
//!
//! The line is drawn on the same terminal stream as the human output, at the cursor, and
//! moved back over: the next write of the human reporter first erases it (`ESC [K`), then the
//! progress reporter draws it again after that reporter's lines. So the pretty format's lines,
//! the terse format's dots and the single-slot `test NAME ... ` prefix all stay intact, and
//! no trace of the line remains once the run ends.

use std::io::{self, IsTerminal, Write};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{Reporter, RunInfo, Summary};
use crate::outcome::{Status, TestReport};

/// Erase from the cursor to the end of the line.
const ERASE: &[u8] = b"\x1b[K";

/// True when a progress line belongs on this process's stdout: a terminal that is not `dumb`.
pub fn wanted() -> bool {
    io::stdout().is_terminal() && std::env::var("TERM").map_or(true, |t| t != "dumb")
}

/// A terminal stream shared by the human reporter (through [`Write`]) and the progress line.
#[derive(Clone)]
pub struct Terminal(Arc<Mutex<State>>);

struct State {
    out: Box<dyn Write + Send>,
    /// Width of the line drawn after the cursor (0 when none is).
    drawn: usize,
    /// The cursor's column, as far as the bytes written tell.
    column: usize,
    /// Inside an escape sequence written by the reporter.
    escape: Escape,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Escape {
    None,
    Started,
    Csi,
}

impl Terminal {
    /// A terminal stream over `out` (stdout).
    pub fn new(out: Box<dyn Write + Send>) -> Terminal {
        Terminal(Arc::new(Mutex::new(State {
            out,
            drawn: 0,
            column: 0,
            escape: Escape::None,
        })))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Draws `line` after the cursor (cut to the terminal's width) and moves back over it.
    fn draw(&self, line: &str) -> io::Result<()> {
        let mut s = self.state();
        s.erase()?;
        let room = terminal_width().saturating_sub(s.column + 1);
        if room < 12 {
            return s.out.flush();
        }
        let text: String = line.chars().take(room).collect();
        let width = text.chars().count();
        write!(s.out, "{text}\x1b[{width}D")?;
        s.drawn = width;
        s.out.flush()
    }

    /// Erases the line, if drawn.
    fn clear(&self) -> io::Result<()> {
        let mut s = self.state();
        s.erase()?;
        s.out.flush()
    }
}

impl State {
    fn erase(&mut self) -> io::Result<()> {
        if self.drawn > 0 {
            self.out.write_all(ERASE)?;
            self.drawn = 0;
        }
        Ok(())
    }

    /// Follows the cursor's column through `bytes`, skipping escape sequences.
    fn track(&mut self, bytes: &[u8]) {
        for &b in bytes {
            match (self.escape, b) {
                (Escape::None, b'\n' | b'\r') => self.column = 0,
                (Escape::None, 0x1b) => self.escape = Escape::Started,
                (Escape::None, b'\t') => self.column = (self.column / 8 + 1) * 8,
                (Escape::None, 0x80..=0xbf) => {} // UTF-8 continuation byte
                (Escape::None, b) if b >= 0x20 => self.column += 1,
                (Escape::None, _) => {}
                (Escape::Started, b'[') => self.escape = Escape::Csi,
                (Escape::Started, _) => self.escape = Escape::None,
                (Escape::Csi, 0x40..=0x7e) => self.escape = Escape::None,
                (Escape::Csi, _) => {}
            }
        }
    }
}

impl Write for Terminal {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut s = self.state();
        s.erase()?;
        let n = s.out.write(buf)?;
        s.track(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.state().out.flush()
    }
}

/// The terminal's width in columns (80 when it cannot be asked).
fn terminal_width() -> usize {
    let mut size = nix::libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` through the pointer, which points to a live one.
    let ok =
        unsafe { nix::libc::ioctl(nix::libc::STDOUT_FILENO, nix::libc::TIOCGWINSZ, &mut size) };
    if ok == 0 && size.ws_col > 0 {
        usize::from(size.ws_col)
    } else {
        80
    }
}

/// How often the line is redrawn between events (its clock moves).
const TICK: Duration = Duration::from_millis(500);

/// The progress reporter. Push it after the human reporter that writes to the same
/// [`Terminal`], so it draws after that reporter's output of each event. A thread redraws the
/// line twice a second so its clock moves while tests run.
pub struct Progress {
    term: Terminal,
    counts: Arc<Mutex<Counts>>,
}

/// What the line shows.
struct Counts {
    total: usize,
    slots: usize,
    done: usize,
    running: usize,
    failed: usize,
    started: Instant,
    /// The run is over: nothing may draw any more.
    finished: bool,
}

impl Counts {
    fn line(&self) -> String {
        format!(
            "[{}/{} done, {} running, {} failed, {}/{} slots busy, {}]",
            self.done,
            self.total,
            self.running,
            self.failed,
            self.running.min(self.slots),
            self.slots,
            elapsed(self.started.elapsed())
        )
    }
}

impl Progress {
    /// A progress line on `term`.
    pub fn new(term: Terminal) -> Progress {
        Progress {
            term,
            counts: Arc::new(Mutex::new(Counts {
                total: 0,
                slots: 1,
                done: 0,
                running: 0,
                failed: 0,
                started: Instant::now(),
                finished: false,
            })),
        }
    }

    fn counts(&self) -> MutexGuard<'_, Counts> {
        lock(&self.counts)
    }

    /// Updates the counts and redraws, holding the counts' lock while drawing so the ticker
    /// never draws a stale line after the run ends.
    fn update(&self, change: impl FnOnce(&mut Counts)) -> io::Result<()> {
        let mut counts = self.counts();
        change(&mut counts);
        redraw(&self.term, &counts)
    }

    fn start_ticker(&self) {
        let term = self.term.clone();
        let counts = Arc::clone(&self.counts);
        // Without the thread the line still moves at every event.
        let _ = std::thread::Builder::new()
            .name("dtf-progress".to_owned())
            .spawn(move || {
                loop {
                    std::thread::sleep(TICK);
                    let counts = lock(&counts);
                    if counts.finished || redraw(&term, &counts).is_err() {
                        break;
                    }
                }
            });
    }
}

fn lock(counts: &Mutex<Counts>) -> MutexGuard<'_, Counts> {
    counts.lock().unwrap_or_else(|e| e.into_inner())
}

fn redraw(term: &Terminal, counts: &Counts) -> io::Result<()> {
    if counts.finished || counts.done >= counts.total {
        term.clear()
    } else {
        term.draw(&counts.line())
    }
}

fn elapsed(d: Duration) -> String {
    let s = d.as_secs();
    if s < 60 {
        format!("{s}s")
    } else {
        format!("{}m{:02}s", s / 60, s % 60)
    }
}

impl Reporter for Progress {
    fn run_started(&mut self, info: &RunInfo) -> io::Result<()> {
        self.update(|c| {
            c.total = info.total;
            c.slots = info.slots.max(1);
            c.started = Instant::now();
        })?;
        self.start_ticker();
        Ok(())
    }

    fn test_started(&mut self, _name: &str) -> io::Result<()> {
        self.update(|c| c.running += 1)
    }

    fn test_slow(&mut self, _name: &str, _threshold: Duration) -> io::Result<()> {
        self.update(|_| {})
    }

    fn test_finished(&mut self, report: &TestReport) -> io::Result<()> {
        self.update(|c| {
            c.done += 1;
            // Ignored tests never started; tests a stop killed did, but their count is
            // settled when the run ends.
            if matches!(
                report.status,
                Status::Passed | Status::Flaky | Status::Failed
            ) {
                c.running = c.running.saturating_sub(1);
            }
            if report.status == Status::Failed {
                c.failed += 1;
            }
        })
    }

    fn run_finished(&mut self, _summary: &Summary) -> io::Result<()> {
        self.update(|c| {
            c.running = 0;
            c.finished = true;
        })
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.counts().finished = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::pretty::Pretty;

    use crate::report::SharedBuf as Buf;

    fn report(name: &str, status: Status) -> TestReport {
        TestReport {
            name: name.into(),
            status,
            attempts: vec![],
            rerun_after_lost_worker: false,
        }
    }

    /// What a terminal would show: applies `\r`, `\n`, `ESC [nD` and `ESC [K` to a screen.
    fn screen(bytes: &[u8]) -> Vec<String> {
        let text = String::from_utf8_lossy(bytes);
        let mut lines = vec![Vec::<char>::new()];
        let mut col = 0usize;
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\n' => {
                    lines.push(Vec::new());
                    col = 0;
                }
                '\r' => col = 0,
                '\x1b' => {
                    assert_eq!(chars.next(), Some('['));
                    let mut n = String::new();
                    loop {
                        match chars.next() {
                            Some(d) if d.is_ascii_digit() => n.push(d),
                            Some('D') => {
                                col -= n.parse::<usize>().unwrap_or(1);
                                break;
                            }
                            Some('K') => {
                                lines.last_mut().unwrap().truncate(col);
                                break;
                            }
                            other => panic!("unexpected escape {other:?}"),
                        }
                    }
                }
                c => {
                    let line = lines.last_mut().unwrap();
                    if col < line.len() {
                        line[col] = c;
                    } else {
                        line.push(c);
                    }
                    col += 1;
                }
            }
        }
        lines.into_iter().map(|l| l.into_iter().collect()).collect()
    }

    #[test]
    fn the_line_follows_the_output_and_leaves_no_trace() {
        for terse in [false, true] {
            let buf = Buf::default();
            let term = Terminal::new(Box::new(buf.clone()));
            let mut pretty = Pretty::new(Box::new(term.clone()), terse, false, false);
            let mut progress = Progress::new(term);
            let info = RunInfo {
                total: 2,
                slots: 2,
                ..RunInfo::default()
            };
            pretty.run_started(&info).unwrap();
            progress.run_started(&info).unwrap();
            for name in ["a", "b"] {
                pretty.test_started(name).unwrap();
                progress.test_started(name).unwrap();
            }
            let mid = screen(&buf.0.lock().unwrap());
            assert!(
                mid.last()
                    .unwrap()
                    .contains("[0/2 done, 2 running, 0 failed, 2/2 slots busy"),
                "{mid:?}"
            );
            let a = report("a", Status::Failed);
            pretty.test_finished(&a).unwrap();
            progress.test_finished(&a).unwrap();
            let mid = screen(&buf.0.lock().unwrap());
            let last = mid.last().unwrap();
            assert!(
                last.contains("[1/2 done, 1 running, 1 failed, 1/2 slots busy"),
                "{mid:?}"
            );
            if terse {
                assert!(last.starts_with("F["), "{mid:?}");
            } else {
                assert_eq!(mid[mid.len() - 2], "test a ... FAILED");
            }
            let b = report("b", Status::Passed);
            pretty.test_finished(&b).unwrap();
            progress.test_finished(&b).unwrap();
            let summary = Summary {
                passed: 1,
                failed: 1,
                ..Summary::default()
            };
            pretty.run_finished(&summary).unwrap();
            progress.run_finished(&summary).unwrap();
            let end = screen(&buf.0.lock().unwrap());
            assert!(!end.iter().any(|l| l.contains("slots busy")), "{end:?}");
            if terse {
                assert!(end.iter().any(|l| l == "F."), "{end:?}");
            } else {
                assert!(end.iter().any(|l| l == "test b ... ok"), "{end:?}");
            }
        }
    }
}
