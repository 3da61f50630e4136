//! `--skip-unchanged`: a test that passed on its last run is reported `ok (unchanged)` without
//! running when nothing it runs with has changed since — the test binary (its BLAKE3 digest),
//! the binary's input tree (the digest of the tree a distributed run ships: the package's
//! files, what the binary reaches in the target directory, `DTF_INCLUDE`), the test's
//! environment (the exact variables it starts with, after the allowlist of level `env`) and
//! its arguments (everything else of its run spec: isolation, timeout, memory limit, working
//! directory, harness and the arguments after `--`, the retries and a `target.<triple>.runner`).
//!
//! The digest of all that is its key. The key of a test that passed on its first attempt is
//! stored in the run's history, beside the test's durations; a failed, flaky or stopped test
//! has none there, so it always runs next time.

use dtf::inputs::{Sources, Tree};
use dtf::plan::PlannedTest;
use dtf::protocol::Digest;
use serde::Serialize;

use crate::build::Binary;

/// The input-tree sources of `binary`, as a distributed run of it ships them.
pub fn sources(binary: &Binary) -> Result<Sources, String> {
    Sources::new(
        binary.path.clone(),
        binary.manifest_dir.clone(),
        binary.out_dir.clone(),
        None,
    )
    .with_env(|name| std::env::var(name).ok())
    .map_err(|e| e.to_string())
}

/// What a binary contributes to its tests' keys: its digest and its input tree's. `None` (with
/// a warning) when either cannot be read: its tests then run.
pub fn binary_key(binary: &Binary) -> Option<String> {
    let compute = || -> Result<String, String> {
        // Through the digests kept beside the binaries, as for shipping them.
        let exe = dtf::coordinator::workers::Binary::read(&binary.path)
            .map_err(|e| format!("cannot read {}: {e}", binary.path.display()))?
            .digest;
        let tree = Tree::compute(&sources(binary)?).map_err(|e| e.to_string())?;
        Ok(format!("{exe}:{}", tree.digest))
    };
    match compute() {
        Ok(key) => Some(key),
        Err(e) => {
            eprintln!(
                "warning: --skip-unchanged: the tests of {} run (cannot compute what they run with: {e})",
                binary.id
            );
            None
        }
    }
}

#[derive(Serialize)]
struct Key<'a> {
    binary: &'a str,
    spec: &'a dtf::sandbox::RunSpec,
    retries: u32,
    threads: usize,
    runner: &'a [String],
}

/// A test's key: the digest of its binary's key and everything its run spec holds.
pub fn test_key(binary_key: &str, test: &PlannedTest, runner: &[String]) -> String {
    let key = Key {
        binary: binary_key,
        spec: &test.spec,
        retries: test.retries,
        threads: test.threads,
        runner,
    };
    let json = serde_json::to_vec(&key).unwrap_or_default();
    Digest::of(&json).to_hex()
}
