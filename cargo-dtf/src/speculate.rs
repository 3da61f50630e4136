//! Starting a run on workers while cargo checks the build.
//!
//! Even when nothing changed, cargo takes 0.1–0.2 s to say so (its start, the lock file, a
//! fingerprint per unit), then the binaries are listed: on a cluster that is idle time before
//! the first test. So a run on remote workers leaves a record of what it found: the binaries
//! cargo named (each with its file's identity), the workspace's metadata and every binary's
//! test list. The next run of the same command (same arguments, working directory,
//! environment and config file) whose binaries are all still the files recorded starts on the
//! workers from that record at once, with its reports held ([`dtf::report::Gate`]), while
//! cargo checks the build. When cargo names the same binaries, still the same files, the held
//! reports are shown and the run goes on; otherwise the run is dropped (its tests on the
//! workers are killed; nothing of it is shown, recorded or fetched back) and starts again
//! from what cargo built. Until cargo has confirmed the binaries, nothing of the run runs on
//! this machine.
//!
//! Records live in the user's cache directory (`$XDG_CACHE_HOME/dtf/runs`, else
//! `~/.cache/dtf/runs`), one per command, named by a digest of what keys it; environment
//! values are never written there. `DTF_SPECULATE=0` (or `speculate = false` in the config
//! file) turns this off.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use dtf::coordinator::workers::digest_cache::SETTLE;
pub use dtf::coordinator::workers::digest_cache::Stamp;
use serde::{Deserialize, Serialize};

use crate::build::{Binary, Workspace};
use crate::workspace::Kind;

/// Turns speculative starts off with `0`.
pub const VAR: &str = "DTF_SPECULATE";

/// The record's format; records of another one are ignored.
const FORMAT: u32 = 2;

/// The most records kept; the oldest go first.
const MAX_RECORDS: usize = 64;

/// Whether a stamp of a file that changed at `changed`, taken at `at`, identifies the file's
/// contents. A change time with a fraction of a second means a filesystem that keeps fine
/// timestamps, where the next build of a binary (which waits for cargo's lock on the build
/// directory) comes many clock ticks later; on one that keeps whole seconds (or FAT's two),
/// the file must not have changed for [`SETTLE`] before it was stamped, as in the digest cache.
fn settled(changed: Option<SystemTime>, at: SystemTime) -> bool {
    let Some(since_epoch) = changed.and_then(|c| c.duration_since(SystemTime::UNIX_EPOCH).ok())
    else {
        return false;
    };
    since_epoch.subsec_nanos() != 0 || changed.is_some_and(|c| c + SETTLE <= at)
}

/// What a record is for: a digest of the command line, the working directory and the whole
/// environment of `cargo dtf`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Key(String);

/// Whether speculative starts are on: `DTF_SPECULATE` (or the config file's `speculate`, once
/// read) is not `0`.
pub fn enabled() -> bool {
    !std::env::var_os(VAR).is_some_and(|v| v == "0" || v == "false")
}

impl Key {
    /// This process's key; `None` when speculative starts are off.
    pub fn of_this_process() -> Option<Key> {
        if !enabled() {
            return None;
        }
        let mut material: Vec<u8> = format!("dtf-speculation-{FORMAT}\0").into_bytes();
        let mut push = |part: &OsStr| {
            material.extend_from_slice(&(part.len() as u64).to_le_bytes());
            material.extend_from_slice(part.as_bytes());
        };
        for arg in std::env::args_os() {
            push(&arg);
        }
        push(std::env::current_dir().ok()?.as_os_str());
        let mut vars: Vec<(std::ffi::OsString, std::ffi::OsString)> = std::env::vars_os().collect();
        vars.sort();
        for (name, value) in &vars {
            push(name);
            push(value);
        }
        Some(Key(dtf::protocol::Digest::of(&material).to_hex()))
    }

    fn file(&self) -> Option<PathBuf> {
        Some(records_dir()?.join(format!("{}.json", self.0)))
    }
}

fn records_dir() -> Option<PathBuf> {
    Some(dtf::config::user_cache_dir()?.join("dtf").join("runs"))
}

/// The workspace as recorded (its metadata as text).
#[derive(Serialize, Deserialize)]
struct RecordedWorkspace {
    root: PathBuf,
    target_dir: PathBuf,
    doctest_packages: Vec<String>,
    metadata: String,
}

/// What a run found, for the next run of the same command.
#[derive(Serialize, Deserialize)]
pub struct Record {
    format: u32,
    key: String,
    workspace: RecordedWorkspace,
    binaries: Vec<Binary>,
    stamps: Vec<Stamp>,
    /// When the stamps were taken.
    stamped_at: SystemTime,
    kinds: Vec<Kind>,
    /// The config file and a digest of its bytes.
    config: Option<(PathBuf, String)>,
}

fn config_digest(path: &Path) -> Option<String> {
    Some(dtf::protocol::Digest::of(&std::fs::read(path).ok()?).to_hex())
}

impl Record {
    /// A record of what a run found; `None` when some binary cannot be stamped or changed
    /// while it was listed (`stamps` were taken before).
    pub fn new(
        key: &Key,
        workspace: &Workspace,
        binaries: &[Binary],
        stamps: &[Option<Stamp>],
        stamped_at: SystemTime,
        kinds: &[Kind],
        config: Option<&Path>,
    ) -> Option<Record> {
        let stamps: Vec<Stamp> = stamps.iter().cloned().collect::<Option<_>>()?;
        let unchanged = binaries
            .iter()
            .zip(&stamps)
            .all(|(b, s)| Stamp::of_path(&b.path).as_ref() == Some(s));
        if !unchanged || stamps.len() != binaries.len() {
            return None;
        }
        let config = match config {
            Some(path) => Some((path.to_path_buf(), config_digest(path)?)),
            None => None,
        };
        Some(Record {
            format: FORMAT,
            key: key.0.clone(),
            workspace: RecordedWorkspace {
                root: workspace.root.clone(),
                target_dir: workspace.target_dir.clone(),
                doctest_packages: workspace.doctest_packages.clone(),
                metadata: String::from_utf8(workspace.metadata.clone()).ok()?,
            },
            binaries: binaries.to_vec(),
            stamps,
            stamped_at,
            kinds: kinds.to_vec(),
            config,
        })
    }

    /// Writes the record (a failure is ignored: the next run only starts later).
    pub fn save(&self) {
        let (Some(file), Some(dir)) = (Key(self.key.clone()).file(), records_dir()) else {
            return;
        };
        if std::fs::create_dir_all(&dir).is_err() {
            return;
        }
        let Ok(text) = serde_json::to_vec(self) else {
            return;
        };
        // Written aside and renamed: a record is read whole or not at all.
        let aside = dir.join(format!(".{}.{}", self.key, std::process::id()));
        if std::fs::write(&aside, text).is_ok() && std::fs::rename(&aside, &file).is_err() {
            let _ = std::fs::remove_file(&aside);
        }
        prune(&dir);
    }

    /// The record of `key` when it is still true: every binary still the file recorded (and
    /// settled when it was stamped), the config file unchanged.
    pub fn load(key: &Key, config_path: impl Fn(&Path) -> Option<PathBuf>) -> Option<Record> {
        let text = std::fs::read(key.file()?).ok()?;
        let record: Record = serde_json::from_slice(&text).ok()?;
        if record.format != FORMAT || record.key != key.0 {
            return None;
        }
        if record.binaries.is_empty() || record.stamps.len() != record.binaries.len() {
            return None;
        }
        let current = record.binaries.iter().zip(&record.stamps).all(|(b, s)| {
            settled(s.changed(), record.stamped_at) && Stamp::of_path(&b.path).as_ref() == Some(s)
        });
        if !current {
            return None;
        }
        let config = config_path(&record.workspace.root);
        let same_config = match (&config, &record.config) {
            (None, None) => true,
            (Some(now), Some((then, digest))) => {
                now == then && config_digest(now).as_ref() == Some(digest)
            }
            _ => false,
        };
        same_config.then_some(record)
    }

    /// What confirms the record once cargo has built.
    pub fn check(&self) -> Check {
        Check {
            binaries: self.binaries.clone(),
            stamps: self.stamps.clone(),
        }
    }

    /// The workspace, binaries and test lists recorded.
    pub fn into_parts(self) -> (Workspace, Vec<Binary>, Vec<Kind>) {
        let workspace = Workspace {
            root: self.workspace.root,
            target_dir: self.workspace.target_dir,
            doctest_packages: self.workspace.doctest_packages,
            metadata: self.workspace.metadata.into_bytes(),
        };
        (workspace, self.binaries, self.kinds)
    }
}

/// The recorded binaries and their stamps, to compare with what cargo built.
pub struct Check {
    binaries: Vec<Binary>,
    stamps: Vec<Stamp>,
}

impl Check {
    /// Whether cargo's build produced exactly the recorded binaries (in any order: cargo
    /// reports fresh units as its jobs come), still the same files.
    pub fn confirmed_by(&self, built: &[Binary]) -> bool {
        let sorted = |binaries: &[Binary]| {
            let mut v: Vec<Binary> = binaries.to_vec();
            v.sort_by(|a, b| a.path.cmp(&b.path).then_with(|| a.id.cmp(&b.id)));
            v
        };
        sorted(built) == sorted(&self.binaries)
            && self
                .binaries
                .iter()
                .zip(&self.stamps)
                .all(|(b, s)| Stamp::of_path(&b.path).as_ref() == Some(s))
    }
}

/// Keeps the newest [`MAX_RECORDS`] records of `dir`.
fn prune(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut records: Vec<(SystemTime, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    if records.len() <= MAX_RECORDS {
        return;
    }
    records.sort();
    for (_, path) in &records[..records.len() - MAX_RECORDS] {
        let _ = std::fs::remove_file(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn binary(path: &Path) -> Binary {
        Binary {
            path: path.to_path_buf(),
            id: "pkg::t".to_owned(),
            name: "t".to_owned(),
            kind: "test".to_owned(),
            package: "pkg".to_owned(),
            version: "0.1.0".to_owned(),
            manifest_dir: PathBuf::from("/nowhere"),
            out_dir: None,
        }
    }

    fn workspace() -> Workspace {
        Workspace {
            root: PathBuf::from("/nowhere"),
            target_dir: PathBuf::from("/nowhere/target"),
            doctest_packages: Vec::new(),
            metadata: b"{}".to_vec(),
        }
    }

    #[test]
    fn a_record_holds_while_its_binaries_stay_the_files_stamped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t");
        std::fs::write(&path, b"one").unwrap();
        let b = vec![binary(&path)];
        let stamps = vec![Stamp::of_path(&path)];
        let later = SystemTime::now() + Duration::from_secs(3);
        let key = Key("k".to_owned());
        let record = Record::new(&key, &workspace(), &b, &stamps, later, &[], None).unwrap();
        assert!(record.check().confirmed_by(&b));
        // cargo names fresh binaries in any order.
        let second = dir.path().join("u");
        std::fs::write(&second, b"two").unwrap();
        let mut u = binary(&second);
        u.id = "pkg::u".to_owned();
        let both = vec![binary(&path), u];
        let stamps2 = vec![Stamp::of_path(&path), Stamp::of_path(&second)];
        let record2 = Record::new(&key, &workspace(), &both, &stamps2, later, &[], None).unwrap();
        let reversed: Vec<Binary> = both.iter().rev().cloned().collect();
        assert!(record2.check().confirmed_by(&reversed));
        assert!(!record2.check().confirmed_by(&both[..1]));
        // Another binary list, or the same path rewritten, is not what was recorded.
        let mut other = b.clone();
        other[0].id = "pkg::u".to_owned();
        assert!(!record.check().confirmed_by(&other));
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"two").unwrap();
        assert!(!record.check().confirmed_by(&b));
    }

    #[test]
    fn a_coarse_stamp_taken_right_after_a_change_is_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t");
        std::fs::write(&path, b"one").unwrap();
        let stamp = Stamp::of_path(&path).unwrap();
        let fine = stamp.changed().unwrap();
        let whole_second = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos()
                == 0
        };
        // This filesystem keeps fractions of a second (1 in 250 writes lands on a whole one).
        assert!(whole_second(fine) || settled(Some(fine), SystemTime::now()));
        // One that keeps whole seconds: trusted only once the file had settled.
        let changed = SystemTime::UNIX_EPOCH
            + Duration::from_secs(
                fine.duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap()
                    .as_secs(),
            );
        assert!(!settled(
            Some(changed),
            changed + Duration::from_millis(1500)
        ));
        assert!(settled(Some(changed), changed + Duration::from_secs(2)));
    }

    #[test]
    fn a_binary_that_changed_while_it_was_listed_leaves_no_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t");
        std::fs::write(&path, b"one").unwrap();
        let stamps = vec![Stamp::of_path(&path)];
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"longer").unwrap();
        let key = Key("k".to_owned());
        let b = vec![binary(&path)];
        assert!(
            Record::new(
                &key,
                &workspace(),
                &b,
                &stamps,
                SystemTime::now(),
                &[],
                None
            )
            .is_none()
        );
    }
}
