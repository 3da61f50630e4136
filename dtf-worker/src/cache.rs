//! The content-addressed binary cache.
//!
//! Binaries live in `DIR/bin/<blake3 hex>`. An upload is written to a private temporary file
//! in `DIR/incoming/` (mode 0600, not executable) while its digest is computed; only when the
//! digest matches is the file made executable and renamed into place, atomically. Concurrent
//! uploads of one digest each write their own file; the first to finish wins and the others
//! are discarded. Over the cap, the least recently used binaries are deleted, never one that a
//! connected coordinator uses (pinned). The order of use survives restarts through the files'
//! modification times.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use dtf::protocol::{CHUNK_SIZE, Chunk, Digest, UploadError};

/// Counters of the cache, for `status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Binaries stored.
    pub entries: u64,
    /// Their total size.
    pub bytes: u64,
    /// The cap.
    pub max: u64,
    /// Lookups that found the binary.
    pub hits: u64,
    /// Lookups that did not.
    pub misses: u64,
    /// Bytes received by uploads.
    pub received: u64,
    /// Binaries deleted to keep the cache under its cap.
    pub evictions: u64,
}

#[derive(Debug)]
struct Entry {
    size: u64,
    last_used: u64,
    pins: u32,
}

#[derive(Debug, Default)]
struct State {
    entries: HashMap<Digest, Entry>,
    total: u64,
    clock: u64,
    hits: u64,
    misses: u64,
    received: u64,
    evictions: u64,
}

/// The most partial uploads a worker holds at once, over all connections (each holds an open
/// file).
pub const MAX_PARTIAL_UPLOADS: u32 = 64;

/// Partial uploads in progress, over all connections.
#[derive(Debug, Default)]
struct Partial {
    uploads: u32,
    /// The sizes they announced: what they may take on disk once complete.
    bytes: u64,
}

/// The cache.
#[derive(Debug)]
pub struct Cache {
    bin: PathBuf,
    incoming: PathBuf,
    max: u64,
    state: Mutex<State>,
    partial: Arc<Mutex<Partial>>,
}

/// One upload's share of [`Partial`], given back when the upload ends (dropped).
struct PartialSlot {
    partial: Arc<Mutex<Partial>>,
    bytes: u64,
}

impl Drop for PartialSlot {
    fn drop(&mut self) {
        let mut partial = self.partial.lock().unwrap_or_else(|e| e.into_inner());
        partial.uploads -= 1;
        partial.bytes -= self.bytes;
    }
}

/// An upload in progress: a private temporary file and a running digest. Dropping it removes
/// the file.
pub struct Upload {
    digest: Digest,
    total: u64,
    written: u64,
    hasher: blake3::Hasher,
    file: tempfile::NamedTempFile,
    _slot: PartialSlot,
}

impl std::fmt::Debug for Upload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upload")
            .field("digest", &self.digest)
            .field("total", &self.total)
            .field("written", &self.written)
            .finish()
    }
}

impl Cache {
    /// Opens (creating) the cache at `dir` with a cap of `max` bytes. Leftover partial uploads
    /// are removed; stored binaries are kept, ordered by their last use.
    pub fn open(dir: &Path, max: u64) -> io::Result<Cache> {
        let bin = dir.join("bin");
        let incoming = dir.join("incoming");
        fs::create_dir_all(&bin)?;
        fs::create_dir_all(&incoming)?;
        for entry in fs::read_dir(&incoming)?.flatten() {
            let _ = fs::remove_file(entry.path());
        }
        let mut found = Vec::new();
        for entry in fs::read_dir(&bin)?.flatten() {
            let name = entry.file_name();
            let Some(digest) = name.to_str().and_then(Digest::from_hex) else {
                continue;
            };
            let Ok(meta) = entry.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            let used = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            found.push((used, digest, meta.len()));
        }
        found.sort();
        let mut state = State::default();
        for (_, digest, size) in found {
            state.clock += 1;
            state.total += size;
            state.entries.insert(
                digest,
                Entry {
                    size,
                    last_used: state.clock,
                    pins: 0,
                },
            );
        }
        let cache = Cache {
            bin,
            incoming,
            max,
            state: Mutex::new(state),
            partial: Arc::default(),
        };
        cache.evict(&mut cache.lock());
        Ok(cache)
    }

    /// `Ok` when the cache can take an upload now: its directories exist and a file can be
    /// created where uploads land; else what is wrong.
    pub fn usable(&self) -> Result<(), String> {
        for dir in [&self.bin, &self.incoming] {
            match fs::metadata(dir) {
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => return Err(format!("{} is not a directory", dir.display())),
                Err(e) => return Err(format!("{}: {e}", dir.display())),
            }
        }
        tempfile::tempfile_in(&self.incoming)
            .map(drop)
            .map_err(|e| format!("cannot create a file in {}: {e}", self.incoming.display()))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where the binary with `digest` lives (whether or not it is stored).
    pub fn path_of(&self, digest: &Digest) -> PathBuf {
        self.bin.join(digest.to_hex())
    }

    /// Which of `digests` are missing. The ones present are pinned (once each) and counted
    /// as hits; the missing ones as misses.
    pub fn check_and_pin(&self, digests: &[Digest]) -> (Vec<Digest>, Vec<Digest>) {
        let mut state = self.lock();
        let mut missing = Vec::new();
        let mut pinned = Vec::new();
        for digest in digests {
            state.clock += 1;
            let clock = state.clock;
            match state.entries.get_mut(digest) {
                Some(entry) => {
                    entry.last_used = clock;
                    entry.pins += 1;
                    state.hits += 1;
                    pinned.push(*digest);
                }
                None => {
                    state.misses += 1;
                    missing.push(*digest);
                }
            }
        }
        (missing, pinned)
    }

    /// Pins a stored binary so it is not evicted. False when it is not stored.
    pub fn pin(&self, digest: &Digest) -> bool {
        let mut state = self.lock();
        match state.entries.get_mut(digest) {
            Some(entry) => {
                entry.pins += 1;
                true
            }
            None => false,
        }
    }

    /// Releases a pin; evicts what the cap requires.
    pub fn unpin(&self, digest: &Digest) {
        let mut state = self.lock();
        if let Some(entry) = state.entries.get_mut(digest) {
            entry.pins = entry.pins.saturating_sub(1);
        }
        self.evict(&mut state);
    }

    /// The stored binary's path, marking it used. `None` when it is not stored.
    pub fn use_binary(&self, digest: &Digest) -> Option<PathBuf> {
        let mut state = self.lock();
        state.clock += 1;
        let clock = state.clock;
        let entry = state.entries.get_mut(digest)?;
        entry.last_used = clock;
        drop(state);
        let path = self.path_of(digest);
        // The modification time records the use for the next start. (Set by path: opening
        // the binary for writing would make a concurrent exec of it fail with ETXTBSY.)
        use nix::sys::stat::{UtimensatFlags, utimensat};
        use nix::sys::time::TimeSpec;
        let _ = utimensat(
            nix::fcntl::AT_FDCWD,
            &path,
            &TimeSpec::UTIME_OMIT,
            &TimeSpec::UTIME_NOW,
            UtimensatFlags::FollowSymlink,
        );
        Some(path)
    }

    /// Starts an upload of `total` bytes that must hash to `digest`.
    pub fn begin(&self, digest: Digest, total: u64) -> Result<Upload, UploadError> {
        if total > self.max {
            return Err(UploadError::TooLarge(format!(
                "the binary ({total} bytes) is larger than the worker's cache cap ({} bytes)",
                self.max
            )));
        }
        let slot = {
            let mut partial = self.partial.lock().unwrap_or_else(|e| e.into_inner());
            if partial.uploads >= MAX_PARTIAL_UPLOADS {
                return Err(UploadError::Storage(format!(
                    "{} uploads are in progress on this worker, its limit \
                     ({MAX_PARTIAL_UPLOADS} over all connections); retry when they finish",
                    partial.uploads
                )));
            }
            if partial.bytes + total > self.max {
                return Err(UploadError::Storage(format!(
                    "uploads in progress on this worker announced {} bytes; with this one's \
                     {total} they would exceed the cache cap ({} bytes, --cache-max), the \
                     limit on bytes in partial uploads; retry when they finish",
                    partial.bytes, self.max
                )));
            }
            partial.uploads += 1;
            partial.bytes += total;
            PartialSlot {
                partial: self.partial.clone(),
                bytes: total,
            }
        };
        let file = tempfile::Builder::new()
            .prefix(&format!("{}-", digest.short()))
            .tempfile_in(&self.incoming)
            .map_err(|e| UploadError::Storage(e.to_string()))?;
        Ok(Upload {
            digest,
            total,
            written: 0,
            hasher: blake3::Hasher::new(),
            file,
            _slot: slot,
        })
    }

    /// Adds a chunk to `upload`. `Ok(true)` when the upload has all its bytes.
    pub fn write(&self, upload: &mut Upload, chunk: &Chunk) -> Result<bool, UploadError> {
        if chunk.digest != upload.digest || chunk.total != upload.total {
            return Err(UploadError::OutOfOrder {
                expected: upload.written,
                got: chunk.offset,
            });
        }
        if chunk.offset != upload.written {
            return Err(UploadError::OutOfOrder {
                expected: upload.written,
                got: chunk.offset,
            });
        }
        if chunk.data.len() > CHUNK_SIZE {
            return Err(UploadError::TooLarge(format!(
                "a chunk of {} bytes exceeds the chunk size of {CHUNK_SIZE} bytes",
                chunk.data.len()
            )));
        }
        let len = chunk.data.len() as u64;
        if upload.written + len > upload.total {
            return Err(UploadError::TooLarge(format!(
                "the chunks add up to more than the announced {} bytes",
                upload.total
            )));
        }
        upload
            .file
            .as_file_mut()
            .write_all(&chunk.data)
            .map_err(|e| UploadError::Storage(e.to_string()))?;
        upload.hasher.update(&chunk.data);
        upload.written += len;
        self.lock().received += len;
        Ok(upload.written == upload.total)
    }

    /// Verifies a complete upload and stores it: executable, under its digest, pinned once.
    /// On a digest mismatch nothing is stored.
    pub fn finish(&self, upload: Upload) -> Result<(), UploadError> {
        let Upload {
            digest,
            hasher,
            file,
            ..
        } = upload;
        let actual = Digest(*hasher.finalize().as_bytes());
        if actual != digest {
            return Err(UploadError::DigestMismatch {
                expected: digest.to_hex(),
                actual: actual.to_hex(),
            });
        }
        let storage = |e: io::Error| UploadError::Storage(e.to_string());
        file.as_file().sync_all().map_err(storage)?;
        let size = file.as_file().metadata().map_err(storage)?.len();
        let mut state = self.lock();
        state.clock += 1;
        let clock = state.clock;
        if let Some(entry) = state.entries.get_mut(&digest) {
            // A concurrent upload of the same binary finished first.
            entry.pins += 1;
            entry.last_used = clock;
            return Ok(());
        }
        fs::set_permissions(file.path(), fs::Permissions::from_mode(0o755)).map_err(storage)?;
        // Close our handle before the file can be executed (an open writer means ETXTBSY).
        let path = file.into_temp_path();
        path.persist(self.path_of(&digest))
            .map_err(|e| storage(e.error))?;
        state.total += size;
        state.entries.insert(
            digest,
            Entry {
                size,
                last_used: clock,
                pins: 1,
            },
        );
        self.evict(&mut state);
        Ok(())
    }

    /// The counters.
    pub fn stats(&self) -> CacheStats {
        let state = self.lock();
        CacheStats {
            entries: state.entries.len() as u64,
            bytes: state.total,
            max: self.max,
            hits: state.hits,
            misses: state.misses,
            received: state.received,
            evictions: state.evictions,
        }
    }

    /// Deletes least recently used, unpinned binaries until the total fits the cap.
    fn evict(&self, state: &mut State) {
        while state.total > self.max {
            let victim = state
                .entries
                .iter()
                .filter(|(_, e)| e.pins == 0)
                .min_by_key(|(_, e)| e.last_used)
                .map(|(d, e)| (*d, e.size));
            let Some((digest, size)) = victim else { break };
            let path = self.path_of(&digest);
            match fs::remove_file(&path) {
                Ok(()) => tracing::info!(digest = %digest.short(), size, "evicted from the cache"),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), "cannot evict: {e}");
                    break;
                }
            }
            state.entries.remove(&digest);
            state.total -= size;
            state.evictions += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upload(cache: &Cache, bytes: &[u8], claimed: Digest) -> Result<(), UploadError> {
        let mut up = cache.begin(claimed, bytes.len() as u64)?;
        let mut offset = 0;
        for piece in bytes.chunks(3) {
            let chunk = Chunk {
                digest: claimed,
                total: bytes.len() as u64,
                offset,
                data: piece.to_vec(),
            };
            offset += piece.len() as u64;
            cache.write(&mut up, &chunk)?;
        }
        cache.finish(up)
    }

    #[test]
    fn a_verified_upload_is_stored_executable() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), 1 << 20).unwrap();
        let bytes = b"#!/bin/sh\nexit 0\n";
        let digest = Digest::of(bytes);
        assert_eq!(cache.check_and_pin(&[digest]).0, vec![digest]);
        upload(&cache, bytes, digest).unwrap();
        let path = cache.use_binary(&digest).unwrap();
        assert_eq!(fs::read(&path).unwrap(), bytes);
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o755
        );
        assert!(cache.check_and_pin(&[digest]).0.is_empty());
        let stats = cache.stats();
        assert_eq!((stats.entries, stats.hits, stats.misses), (1, 1, 1));
        assert_eq!(stats.received, bytes.len() as u64);
    }

    #[test]
    fn a_digest_mismatch_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), 1 << 20).unwrap();
        let claimed = Digest::of(b"something else");
        let err = upload(&cache, b"the real bytes", claimed).unwrap_err();
        assert!(matches!(err, UploadError::DigestMismatch { .. }), "{err}");
        assert!(cache.use_binary(&claimed).is_none());
        assert_eq!(fs::read_dir(dir.path().join("bin")).unwrap().count(), 0);
        assert_eq!(
            fs::read_dir(dir.path().join("incoming")).unwrap().count(),
            0
        );
    }

    #[test]
    fn chunks_must_arrive_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), 1 << 20).unwrap();
        let digest = Digest::of(b"abcdef");
        let mut up = cache.begin(digest, 6).unwrap();
        let chunk = Chunk {
            digest,
            total: 6,
            offset: 3,
            data: b"def".to_vec(),
        };
        assert!(matches!(
            cache.write(&mut up, &chunk),
            Err(UploadError::OutOfOrder {
                expected: 0,
                got: 3
            })
        ));
        assert!(matches!(
            cache.begin(digest, 2 << 20),
            Err(UploadError::TooLarge(_))
        ));
    }

    #[test]
    fn concurrent_uploads_of_one_digest_are_safe() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), 1 << 20).unwrap();
        let bytes = b"same binary".to_vec();
        let digest = Digest::of(&bytes);
        let chunk = Chunk {
            digest,
            total: bytes.len() as u64,
            offset: 0,
            data: bytes.clone(),
        };
        let mut a = cache.begin(digest, bytes.len() as u64).unwrap();
        let mut b = cache.begin(digest, bytes.len() as u64).unwrap();
        assert!(cache.write(&mut a, &chunk).unwrap());
        assert!(cache.write(&mut b, &chunk).unwrap());
        cache.finish(b).unwrap();
        cache.finish(a).unwrap();
        assert_eq!(cache.stats().entries, 1);
        assert_eq!(cache.stats().bytes, bytes.len() as u64);
        assert_eq!(fs::read(cache.use_binary(&digest).unwrap()).unwrap(), bytes);
        assert_eq!(
            fs::read_dir(dir.path().join("incoming")).unwrap().count(),
            0
        );
    }

    #[test]
    fn the_least_recently_used_unpinned_binary_goes_first() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path(), 25).unwrap();
        let blobs: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i; 10]).collect();
        let digests: Vec<Digest> = blobs.iter().map(|b| Digest::of(b)).collect();
        upload(&cache, &blobs[0], digests[0]).unwrap();
        upload(&cache, &blobs[1], digests[1]).unwrap();
        // Both pinned by their uploads; release them, then use the first again.
        cache.unpin(&digests[0]);
        cache.unpin(&digests[1]);
        cache.use_binary(&digests[0]).unwrap();
        upload(&cache, &blobs[2], digests[2]).unwrap();
        // 30 bytes > 25: the least recently used unpinned one (the second) is gone.
        assert!(cache.use_binary(&digests[1]).is_none());
        assert!(cache.use_binary(&digests[0]).is_some());
        assert!(cache.use_binary(&digests[2]).is_some());

        // A pinned binary is never evicted, even over the cap.
        assert!(cache.pin(&digests[0]));
        upload(&cache, &[9u8; 10], Digest::of(&[9u8; 10])).unwrap();
        assert!(cache.use_binary(&digests[0]).is_some());

        // The order of use survives a restart.
        drop(cache);
        let cache = Cache::open(dir.path(), 25).unwrap();
        assert_eq!(cache.stats().entries, 2);
    }
}
