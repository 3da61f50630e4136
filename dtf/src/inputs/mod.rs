//! The input tree of a distributed run: the files a test binary reads, so that a test on a
//! worker sees what it sees under `cargo test` on the coordinator.
//!
//! The coordinator computes a [`Tree`] from [`Sources`]: the package's files (its root,
//! honouring `.gitignore` and `.ignore`, without target directories, VCS metadata and nested
//! packages), what the binary can reach in the target directory (the package's executables,
//! its build script's `OUT_DIR`, an empty `CARGO_TARGET_TMPDIR`, the shared libraries it loads
//! from the target directory and the toolchain's sysroot), and what the user includes
//! (`[package.metadata.dtf] include`, `DTF_INCLUDE`) less what they exclude. Every file is
//! content-addressed (BLAKE3); the [`Manifest`] lists the tree and has a digest of its own.
//!
//! The worker checks a manifest it receives ([`Manifest::validate`]: it comes from the
//! network), builds the tree from its store ([`materialize`]) and, per test, maps the tree's
//! roots to their original paths (see [`crate::sandbox::paths`]).
//!
//! Both halves are a library so that other drivers (shipping every binary of a workspace)
//! use the same code.

mod collect;
mod manifest;

pub use collect::{InputError, Sources, Tree};
pub use manifest::{
    Entry, EntryKind, Manifest, Materialized, OutputFile, Root, RootKind, collect_outputs,
    materialize,
};

/// The BLAKE3 digest of a file's content.
pub fn digest_of(path: &std::path::Path) -> std::io::Result<crate::protocol::Digest> {
    manifest::hash_file(path).map(|(digest, _)| digest)
}

/// Extra globs to ship, comma-separated, relative to the package root.
pub const INCLUDE_VAR: &str = "DTF_INCLUDE";
/// Globs not to ship, comma-separated, relative to the package root.
pub const EXCLUDE_VAR: &str = "DTF_EXCLUDE";
/// Globs of files tests write that travel back to the coordinator, relative to the package root.
pub const OUTPUTS_VAR: &str = "DTF_OUTPUTS";
/// The cap on the input tree's size (`1GiB` by default).
pub const MAX_VAR: &str = "DTF_INPUT_MAX";
/// The default cap on the input tree's size: 1 GiB.
pub const DEFAULT_MAX: u64 = 1 << 30;
