//! The directory that holds the per-test directories of one runner process (a local run or a
//! worker). It is locked for the runner's lifetime, so a later runner can tell the directory
//! of one that was killed (its lock is free) from a live one, and remove it: a runner killed
//! with SIGKILL leaves nothing behind for long.

use std::fs::File;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

/// Prefix of every run directory.
const PREFIX: &str = "dtf-run-";
/// The lock file inside a run directory.
const LOCK: &str = ".lock";

/// A locked run directory, removed (with whatever is left in it) when dropped.
#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
    _lock: Flock<File>,
}

impl RunDir {
    /// Removes the run directories of dead runners in `root`, then creates and locks a new one.
    ///
    /// The directory is made and locked under a name the sweep ignores, then renamed into
    /// place: a concurrent sweep never sees a run directory whose lock is not yet held.
    pub fn create_in(root: &Path) -> Result<RunDir, String> {
        sweep(root);
        std::fs::create_dir_all(root)
            .map_err(|e| format!("cannot create {}: {e}", root.display()))?;
        let fresh = tempfile::Builder::new()
            .prefix(&format!(".dtf-new-{}-", std::process::id()))
            .tempdir_in(root)
            .map_err(|e| format!("cannot create a run directory in {}: {e}", root.display()))?;
        let file = File::create(fresh.path().join(LOCK))
            .map_err(|e| format!("cannot create the lock in {}: {e}", fresh.path().display()))?;
        let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| format!("cannot lock {}: {e}", fresh.path().display()))?;
        let suffix = fresh
            .path()
            .file_name()
            .map(|n| {
                n.to_string_lossy()
                    .trim_start_matches(".dtf-new-")
                    .to_owned()
            })
            .unwrap_or_default();
        let path = root.join(format!("{PREFIX}{suffix}"));
        std::fs::rename(fresh.path(), &path)
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        // Renamed away: the guard has nothing left to remove.
        let _ = fresh.keep();
        Ok(RunDir { path, _lock: lock })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Removes every run directory in `root` whose lock nobody holds. Errors are ignored: a
/// directory of another user, or one being removed by another runner, is not ours to fix.
pub fn sweep(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with(PREFIX) {
            continue;
        }
        let path: PathBuf = entry.path();
        let Ok(file) = File::open(path.join(LOCK)) else {
            continue;
        };
        if let Ok(lock) = Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            // A test of the dead runner may still be dying and writing: try a few times.
            for _ in 0..3 {
                if std::fs::remove_dir_all(&path).is_ok() || !path.exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            drop(lock);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_runners_directory_is_swept_and_a_live_one_kept() {
        let root = tempfile::tempdir().unwrap();
        let live = RunDir::create_in(root.path()).unwrap();
        std::fs::write(live.path().join("file"), "x").unwrap();

        // A run directory whose lock is free: what a killed runner leaves.
        let dead = root.path().join(format!("{PREFIX}999999-abc"));
        std::fs::create_dir_all(dead.join("dtf-test-1/home")).unwrap();
        File::create(dead.join(LOCK)).unwrap();
        // Something else entirely.
        let other = root.path().join("unrelated");
        std::fs::create_dir(&other).unwrap();

        let second = RunDir::create_in(root.path()).unwrap();
        assert!(!dead.exists(), "the dead runner's directory is removed");
        assert!(
            live.path().join("file").exists(),
            "a live runner's directory stays"
        );
        assert!(other.exists());
        let path = second.path().to_path_buf();
        drop(second);
        assert!(!path.exists(), "removed on drop");
    }

    #[test]
    fn concurrent_runners_never_sweep_each_other() {
        let root = tempfile::tempdir().unwrap();
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let root = root.path().to_path_buf();
                std::thread::spawn(move || {
                    for _ in 0..40 {
                        let dir = RunDir::create_in(&root).unwrap();
                        std::fs::create_dir(dir.path().join("dtf-test")).unwrap();
                        assert!(dir.path().join("dtf-test").is_dir());
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let left: Vec<_> = std::fs::read_dir(root.path()).unwrap().flatten().collect();
        assert!(left.is_empty(), "{left:?}");
    }
}
