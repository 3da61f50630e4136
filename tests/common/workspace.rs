//! A generated workspace for `cargo dtf`'s end-to-end tests and benchmarks: several packages,
//! dtf binaries and libtest binaries, written under the target directory (files are rewritten
//! only when they change, so cargo's build stays warm between runs) with its own target
//! directory and this checkout's `Cargo.lock` (no registry look-up, the same versions).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::workspace_root;

/// The variables cargo sets for the package whose tests run this one (kept out of the generated
/// workspace's commands; `CARGO_HOME` and the like stay).
const CARGO_PER_TARGET: &[&str] = &[
    "CARGO_PKG_",
    "CARGO_MANIFEST_",
    "CARGO_CRATE_",
    "CARGO_BIN_",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_TARGET_TMPDIR",
];

/// One generated workspace.
pub struct Workspace {
    /// Its root.
    pub root: PathBuf,
    /// Its target directory.
    pub target: PathBuf,
}

/// Writes `text` to `path` unless it already holds exactly that.
fn write_if_changed(path: &Path, text: &str) {
    if std::fs::read_to_string(path).is_ok_and(|old| old == text) {
        return;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).expect("create a directory of the generated workspace");
    }
    std::fs::write(path, text).expect("write a file of the generated workspace");
}

impl Workspace {
    /// A workspace named `name` below `target/dtf-workspaces/` with `files` (relative path,
    /// contents) besides its root `Cargo.toml`, which lists `members`.
    pub fn generate(name: &str, members: &[&str], files: &[(String, String)]) -> Workspace {
        let base = workspace_root().join("target").join("dtf-workspaces");
        let root = base.join(name);
        let members: Vec<String> = members.iter().map(|m| format!("\"{m}\"")).collect();
        write_if_changed(
            &root.join("Cargo.toml"),
            &format!(
                "[workspace]\nresolver = \"3\"\nmembers = [{}]\n",
                members.join(", ")
            ),
        );
        let lock = std::fs::read_to_string(workspace_root().join("Cargo.lock"))
            .expect("the checkout's Cargo.lock");
        write_if_changed(&root.join("Cargo.lock"), &lock);
        for (path, text) in files {
            write_if_changed(&root.join(path), text);
        }
        Workspace {
            // One target directory for every generated workspace (and cargo-dtf's migrate
            // test): their dependencies build once.
            target: base.join("shared-target"),
            root,
        }
    }

    /// The `dtf` dependency line for a generated package.
    pub fn dtf_dependency() -> String {
        format!(
            "dtf = {{ path = \"{}\" }}",
            workspace_root().join("dtf").display()
        )
    }

    /// A command run in the workspace with its target directory, and without the variables of
    /// the `cargo test` running this test (dtf's, libtest's, nextest's).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        for (name, _) in std::env::vars() {
            if name.starts_with("DTF_")
                || name.starts_with("RUST_TEST_")
                || name.starts_with("NEXTEST")
                || CARGO_PER_TARGET.iter().any(|p| name.starts_with(p))
            {
                cmd.env_remove(name);
            }
        }
        cmd.current_dir(&self.root)
            .env("CARGO_TARGET_DIR", &self.target)
            .env("CARGO_PROFILE_DEV_DEBUG", "line-tables-only")
            .env("RUST_BACKTRACE", "0");
        cmd
    }

    /// `cargo dtf ARGS` through the checkout's `cargo-dtf`, as `cargo` runs it.
    pub fn cargo_dtf(&self, args: &[&str]) -> Command {
        let mut cmd = self.command(cargo_dtf_binary());
        cmd.arg("dtf").args(args);
        if let Ok(cargo) = std::env::var("CARGO") {
            cmd.env("CARGO", cargo);
        }
        cmd.env("DTF_WORKER_BIN", crate::worker_binary());
        // Records of runs started while cargo checks the build stay with the workspace.
        let mut cache = self.root.clone().into_os_string();
        cache.push(".cache");
        cmd.env("XDG_CACHE_HOME", cache);
        cmd
    }

    /// `cargo ARGS` in the workspace.
    pub fn cargo(&self, args: &[&str]) -> Command {
        let mut cmd = self.command(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()));
        cmd.args(args);
        cmd
    }
}

/// The checkout's `cargo-dtf`, built once per process.
pub fn cargo_dtf_binary() -> PathBuf {
    crate::build_bin("cargo-dtf", "cargo-dtf")
}
