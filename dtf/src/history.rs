//! Duration history: how long each test took and whether it failed, recorded after every run
//! and read before the next one to order tests (see [`crate::order`]).
//!
//! One JSON file per test binary, `dtf-history/<package>.<binary>.json` next to the target
//! directory's profile folder (`target/debug/dtf-history/`), or in `DTF_HISTORY_DIR`. The name
//! leaves out cargo's hash, so a rebuilt binary keeps its history. Several runs may finish at
//! once: each one takes a lock file, merges its results into what is on disk at that moment
//! and replaces the file by an atomic rename, so readers never see a half-written file and no
//! run's results are lost. History is an optimisation: a missing, unreadable or corrupt file
//! only costs a warning and the run goes on.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::outcome::{Status, TestReport};

/// The environment variable that chooses the history directory.
pub const DIR_VAR: &str = "DTF_HISTORY_DIR";

/// The weight of the newest duration in a test's moving average: recent runs count most, and
/// one outlier is forgotten after a few runs.
const SMOOTHING: f64 = 0.5;

/// Entries of tests that have not run for this long are dropped (deleted or renamed tests).
const FORGET_AFTER: Duration = Duration::from_secs(30 * 24 * 3600);

/// How long a run waits for another run to finish writing the same file.
const LOCK_WAIT: Duration = Duration::from_secs(5);

/// The file format's version; a file with another version is ignored.
const VERSION: u32 = 1;

/// What the history knows about one test.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Moving average of the test's durations (all attempts together), in seconds.
    pub mean_secs: f64,
    /// The duration of its last run, in seconds.
    pub last_secs: f64,
    /// How many runs were recorded.
    pub runs: u64,
    /// True when the test failed (every attempt) on its last run.
    pub failed: bool,
    /// When it last ran, in seconds since the Unix epoch.
    pub seen: u64,
    /// When it passed on its last run with `cargo dtf --skip-unchanged`: the digest of what
    /// it ran with (binary, input tree, environment, arguments). A later run with the flag
    /// and the same digest reports it unchanged without running it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unchanged_key: Option<String>,
}

impl Record {
    /// The expected duration of the next run.
    pub fn estimate(&self) -> Duration {
        Duration::from_secs_f64(self.mean_secs.max(0.0))
    }

    /// True when the test passed last time and took less than [`SHORT`] then and on average.
    ///
    /// [`SHORT`]: crate::scheduler::SHORT
    pub fn is_short(&self) -> bool {
        let last = Duration::try_from_secs_f64(self.last_secs).unwrap_or(Duration::MAX);
        !self.failed && self.estimate().max(last) < crate::scheduler::SHORT
    }
}

/// One finished test, as the history records it.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    /// The test's full name.
    pub name: String,
    /// How long it ran, every attempt together.
    pub duration: Duration,
    /// True when it failed.
    pub failed: bool,
    /// The `--skip-unchanged` digest it ran with (kept only when it passed).
    pub unchanged_key: Option<String>,
}

impl Entry {
    /// The entry for a report, or `None` for tests that did not run (ignored, not run).
    pub fn from_report(report: &TestReport) -> Option<Entry> {
        let failed = match report.status {
            Status::Passed | Status::Flaky => false,
            Status::Failed => true,
            // An unchanged test keeps the record of the run that passed.
            Status::Ignored { .. } | Status::NotRun | Status::Unchanged => return None,
        };
        Some(Entry {
            name: report.name.clone(),
            duration: report.duration(),
            failed,
            unchanged_key: None,
        })
    }
}

/// The recorded tests of one binary.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct History {
    version: u32,
    tests: BTreeMap<String, Record>,
}

impl History {
    /// An empty history.
    pub fn new() -> History {
        History {
            version: VERSION,
            tests: BTreeMap::new(),
        }
    }

    /// What is known about the test `name`.
    pub fn get(&self, name: &str) -> Option<&Record> {
        self.tests.get(name)
    }

    /// How many tests are recorded.
    pub fn len(&self) -> usize {
        self.tests.len()
    }

    /// True when no test is recorded.
    pub fn is_empty(&self) -> bool {
        self.tests.is_empty()
    }

    /// Reads the history at `path`. A missing file is an empty history; a file that cannot be
    /// read or parsed is an error (the caller warns and goes on without history).
    pub fn load(path: &Path) -> Result<History, String> {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(History::new()),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        let history: History = serde_json::from_slice(&bytes)
            .map_err(|e| format!("cannot parse {}: {e}", path.display()))?;
        if history.version != VERSION {
            // A file from another version of dtf: start over rather than misread it.
            return Ok(History::new());
        }
        Ok(history)
    }

    /// True when `name` passed on its last run with the `--skip-unchanged` digest `key`.
    pub fn unchanged(&self, name: &str, key: &str) -> bool {
        self.tests
            .get(name)
            .is_some_and(|r| !r.failed && r.unchanged_key.as_deref() == Some(key))
    }

    /// Adds one run's results, `now` being seconds since the Unix epoch, and forgets tests that
    /// have not run for a month. A test that failed loses its `--skip-unchanged` digest.
    pub fn record<'a>(&mut self, entries: impl IntoIterator<Item = &'a Entry>, now: u64) {
        let key = |entry: &Entry| entry.unchanged_key.clone().filter(|_| !entry.failed);
        for entry in entries {
            let secs = entry.duration.as_secs_f64();
            self.tests
                .entry(entry.name.clone())
                .and_modify(|r| {
                    r.mean_secs = SMOOTHING * secs + (1.0 - SMOOTHING) * r.mean_secs;
                    r.last_secs = secs;
                    r.runs += 1;
                    r.failed = entry.failed;
                    r.seen = now;
                    r.unchanged_key = key(entry);
                })
                .or_insert(Record {
                    mean_secs: secs,
                    last_secs: secs,
                    runs: 1,
                    failed: entry.failed,
                    seen: now,
                    unchanged_key: key(entry),
                });
        }
        let horizon = now.saturating_sub(FORGET_AFTER.as_secs());
        self.tests.retain(|_, r| r.seen >= horizon);
    }

    /// Merges `entries` into the file at `path` (creating its directory): under a lock, reads
    /// what other runs wrote meanwhile, adds this run's results and atomically replaces the
    /// file.
    pub fn update(path: &Path, entries: &[Entry]) -> Result<(), String> {
        if entries.is_empty() {
            return Ok(());
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let _lock = lock(&path.with_extension("lock"))?;
        let mut history = History::load(path).unwrap_or_default();
        history.version = VERSION;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        history.record(entries, now);
        let json = serde_json::to_vec(&history).map_err(|e| e.to_string())?;
        let mut tmp = tempfile::Builder::new()
            .prefix(".dtf-history-")
            .tempfile_in(dir)
            .map_err(|e| format!("cannot create a file in {}: {e}", dir.display()))?;
        tmp.write_all(&json)
            .and_then(|()| tmp.flush())
            .and_then(|()| {
                // Shared by everyone who builds in this target directory.
                std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644))
            })
            .map_err(|e| format!("cannot write {}: {e}", tmp.path().display()))?;
        tmp.persist(path)
            .map_err(|e| format!("cannot replace {}: {}", path.display(), e.error))?;
        Ok(())
    }
}

/// Where a test binary's history lives: `dir` (from `DTF_HISTORY_DIR`) when given, otherwise
/// `dtf-history/` in the binary's profile folder (`target/debug/` for
/// `target/debug/deps/NAME-HASH`); the file is named after the package and the binary without
/// cargo's hash.
pub fn path_for(dir: Option<&Path>, exe: &Path, package: &str, suite: &str) -> PathBuf {
    let dir = match dir {
        Some(dir) => dir.to_path_buf(),
        None => {
            let parent = exe.parent().unwrap_or(Path::new("."));
            let profile = if parent.file_name().is_some_and(|n| n == "deps") {
                parent.parent().unwrap_or(parent)
            } else {
                parent
            };
            profile.join("dtf-history")
        }
    };
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    dir.join(format!("{}.{}.json", clean(package), clean(suite)))
}

/// An exclusive lock on `path` (created if needed), released on drop. Waits up to
/// [`LOCK_WAIT`] for another run to release it.
fn lock(path: &Path) -> Result<nix::fcntl::Flock<File>, String> {
    use nix::fcntl::{Flock, FlockArg};
    let mut file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let started = Instant::now();
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((f, nix::errno::Errno::EWOULDBLOCK)) if started.elapsed() < LOCK_WAIT => {
                file = f;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err((_, e)) => return Err(format!("cannot lock {}: {e}", path.display())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, ms: u64, failed: bool) -> Entry {
        Entry {
            name: name.to_owned(),
            duration: Duration::from_millis(ms),
            failed,
            unchanged_key: None,
        }
    }

    #[test]
    fn averages_durations_and_remembers_the_last_outcome() {
        let mut h = History::new();
        h.record(&[entry("a", 1000, true)], 100);
        h.record(&[entry("a", 3000, false)], 200);
        let a = h.get("a").unwrap();
        assert_eq!(a.runs, 2);
        assert!(!a.failed);
        assert_eq!(a.last_secs, 3.0);
        assert_eq!(a.estimate(), Duration::from_secs(2));
    }

    #[test]
    fn forgets_tests_that_stopped_running() {
        let mut h = History::new();
        h.record(&[entry("old", 10, false)], 0);
        let later = FORGET_AFTER.as_secs() + 10;
        h.record(&[entry("new", 10, false)], later);
        assert!(h.get("old").is_none());
        assert!(h.get("new").is_some());
    }

    #[test]
    fn lives_next_to_the_profile_folder_without_the_hash() {
        let exe = Path::new("/w/target/debug/deps/fixture-0123456789abcdef");
        assert_eq!(
            path_for(None, exe, "dtf-fixture", "fixture"),
            Path::new("/w/target/debug/dtf-history/dtf-fixture.fixture.json")
        );
        assert_eq!(
            path_for(Some(Path::new("/h")), exe, "p", "a/b"),
            Path::new("/h/p.a_b.json")
        );
    }

    #[test]
    fn concurrent_updates_merge_and_a_corrupt_file_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/p.s.json");
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let path = path.clone();
                std::thread::spawn(move || {
                    History::update(&path, &[entry(&format!("t{i}"), 10 * i, false)]).unwrap()
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let h = History::load(&path).unwrap();
        assert_eq!(h.len(), 8, "every run's results survive: {h:?}");

        std::fs::write(&path, b"{ not json").unwrap();
        assert!(History::load(&path).is_err());
        History::update(&path, &[entry("x", 5, true)]).unwrap();
        let h = History::load(&path).unwrap();
        assert!(h.get("x").unwrap().failed);
    }
}
