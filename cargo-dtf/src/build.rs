//! Building the test targets through cargo: `cargo metadata` for the workspace, then
//! `cargo test --no-run --message-format json-render-diagnostics` with the pass-through flags,
//! and the test executables from its `compiler-artifact` messages.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

use crate::cli::BuildArgs;

/// A built test binary.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binary {
    /// The executable.
    pub path: PathBuf,
    /// Its id, as nextest spells it (`my-pkg`, `my-pkg::integration`, `my-pkg::bin/name`).
    pub id: String,
    /// The target's name.
    pub name: String,
    /// The target's kind: `lib`, `test`, `bin`, `example`, `bench`, `proc-macro`.
    pub kind: String,
    /// The package's name.
    pub package: String,
    /// The package's version.
    pub version: String,
    /// The package's root (each test's working directory).
    pub manifest_dir: PathBuf,
    /// Its build script's `OUT_DIR`, when the package has one.
    pub out_dir: Option<PathBuf>,
}

/// The workspace as `cargo metadata` describes it.
#[derive(Clone, Debug)]
pub struct Workspace {
    /// Its root directory.
    pub root: PathBuf,
    /// Its target directory.
    pub target_dir: PathBuf,
    /// Packages with a library whose doctests `cargo test` would run.
    pub doctest_packages: Vec<String>,
    /// `cargo metadata`'s output (JSON), for the checks that read more of it.
    pub metadata: Vec<u8>,
}

#[derive(Deserialize)]
struct Metadata {
    workspace_root: PathBuf,
    target_directory: PathBuf,
    packages: Vec<MetaPackage>,
    #[serde(default)]
    workspace_members: Vec<String>,
}

#[derive(Deserialize)]
struct MetaPackage {
    id: String,
    name: String,
    targets: Vec<MetaTarget>,
}

#[derive(Deserialize)]
struct MetaTarget {
    kind: Vec<String>,
    #[serde(default)]
    doctest: bool,
}

#[derive(Deserialize)]
struct Message {
    reason: String,
    #[serde(default)]
    package_id: String,
    #[serde(default)]
    target: Option<ArtifactTarget>,
    #[serde(default)]
    profile: Option<Profile>,
    #[serde(default)]
    executable: Option<PathBuf>,
    #[serde(default)]
    manifest_path: Option<PathBuf>,
    #[serde(default)]
    out_dir: Option<PathBuf>,
}

#[derive(Deserialize)]
struct ArtifactTarget {
    name: String,
    kind: Vec<String>,
}

#[derive(Deserialize)]
struct Profile {
    test: bool,
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned())
}

/// Reads the workspace's metadata.
pub fn metadata(args: &BuildArgs) -> Result<Workspace, String> {
    let mut cmd = Command::new(cargo());
    cmd.args(["metadata", "--format-version", "1", "--no-deps"]);
    if let Some(path) = &args.manifest_path {
        cmd.arg("--manifest-path").arg(path);
    }
    for flag in [
        ("--locked", args.locked),
        ("--offline", args.offline),
        ("--frozen", args.frozen),
    ] {
        if flag.1 {
            cmd.arg(flag.0);
        }
    }
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run `cargo metadata`: {e}"))?;
    if !out.status.success() {
        return Err("`cargo metadata` failed (see its message above)".to_owned());
    }
    let meta: Metadata = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("cannot read `cargo metadata`'s output: {e}"))?;
    let doctest_packages = meta
        .packages
        .iter()
        .filter(|p| meta.workspace_members.is_empty() || meta.workspace_members.contains(&p.id))
        .filter(|p| {
            p.targets
                .iter()
                .any(|t| t.doctest && t.kind.iter().any(|k| k == "lib" || k == "rlib"))
        })
        .map(|p| p.name.clone())
        .collect();
    Ok(Workspace {
        root: meta.workspace_root,
        target_dir: meta.target_directory,
        doctest_packages,
        metadata: out.stdout,
    })
}

/// The flags of `cargo test` that choose and build targets.
pub fn cargo_flags(args: &BuildArgs) -> Vec<String> {
    let mut flags = Vec::new();
    let mut push = |flag: &str, value: Option<&str>| {
        flags.push(flag.to_owned());
        if let Some(v) = value {
            flags.push(v.to_owned());
        }
    };
    for p in &args.packages {
        push("--package", Some(p));
    }
    if args.workspace {
        push("--workspace", None);
    }
    for p in &args.exclude {
        push("--exclude", Some(p));
    }
    for f in &args.features {
        push("--features", Some(f));
    }
    if args.all_features {
        push("--all-features", None);
    }
    if args.no_default_features {
        push("--no-default-features", None);
    }
    if args.release {
        push("--release", None);
    }
    if let Some(p) = &args.cargo_profile {
        push("--profile", Some(p));
    }
    if let Some(t) = &args.target {
        push("--target", Some(t));
    }
    if args.lib {
        push("--lib", None);
    }
    if args.bins {
        push("--bins", None);
    }
    for b in &args.bin {
        push("--bin", Some(b));
    }
    if args.tests {
        push("--tests", None);
    }
    for t in &args.test_targets {
        push("--test", Some(t));
    }
    if args.examples {
        push("--examples", None);
    }
    for e in &args.example {
        push("--example", Some(e));
    }
    if args.benches {
        push("--benches", None);
    }
    for b in &args.bench {
        push("--bench", Some(b));
    }
    if let Some(path) = &args.manifest_path {
        push("--manifest-path", Some(path));
    }
    if let Some(j) = &args.jobs {
        push("--jobs", Some(j));
    }
    if args.locked {
        push("--locked", None);
    }
    if args.offline {
        push("--offline", None);
    }
    if args.frozen {
        push("--frozen", None);
    }
    flags
}

/// What building produced: the test binaries, or cargo's exit code when the build failed
/// (cargo has printed why).
pub enum Built {
    /// The binaries, in cargo's order.
    Binaries(Vec<Binary>),
    /// The build failed with this exit code.
    Failed(i32),
}

/// A build under way (see [`start`]): killed if dropped before [`Building::finish`].
pub struct Building {
    child: Option<std::process::Child>,
}

impl Drop for Building {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts building the test targets as `cargo test` would; [`Building::finish`] waits for the
/// executables. What runs meanwhile (reading the workspace's metadata) overlaps cargo's own
/// start and its freshness checks.
pub fn start(args: &BuildArgs) -> Result<Building, String> {
    let mut cmd = Command::new(cargo());
    cmd.args([
        "test",
        "--no-run",
        "--message-format",
        "json-render-diagnostics",
    ])
    .args(cargo_flags(args))
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot run `cargo test --no-run`: {e}"))?;
    Ok(Building { child: Some(child) })
}

impl Building {
    /// Waits for the build and returns its test executables.
    pub fn finish(mut self) -> Result<Built, String> {
        let Some(child) = self.child.take() else {
            return Err("the build was already waited for".to_owned());
        };
        read_build(child)
    }
}

fn read_build(mut child: std::process::Child) -> Result<Built, String> {
    let stdout = child.stdout.take().ok_or("cargo's output is missing")?;
    let mut binaries = Vec::new();
    let mut versions: HashMap<String, String> = HashMap::new();
    // A package's build script's output directory, and which binary belongs to which package.
    let mut out_dirs: HashMap<String, PathBuf> = HashMap::new();
    let mut package_ids: Vec<String> = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.map_err(|e| format!("cannot read cargo's output: {e}"))?;
        if !line.starts_with('{') {
            continue;
        }
        let Ok(message) = serde_json::from_str::<Message>(&line) else {
            continue;
        };
        if message.reason == "build-script-executed" {
            if let Some(dir) = message.out_dir {
                out_dirs.insert(message.package_id, dir);
            }
            continue;
        }
        if message.reason != "compiler-artifact" {
            continue;
        }
        let (Some(target), Some(profile), Some(executable)) =
            (message.target, message.profile, message.executable)
        else {
            continue;
        };
        if !profile.test {
            continue;
        }
        let (package, version) = package_of(&message.package_id);
        versions.insert(package.clone(), version.clone());
        let kind = target
            .kind
            .first()
            .map(|k| match k.as_str() {
                "rlib" | "dylib" | "cdylib" | "staticlib" => "lib".to_owned(),
                other => other.to_owned(),
            })
            .unwrap_or_else(|| "lib".to_owned());
        let manifest_dir = message
            .manifest_path
            .as_deref()
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let id = match kind.as_str() {
            "lib" | "proc-macro" => package.clone(),
            "test" => format!("{package}::{}", target.name),
            other => format!("{package}::{other}/{}", target.name),
        };
        package_ids.push(message.package_id.clone());
        binaries.push(Binary {
            path: executable,
            id,
            name: target.name,
            kind,
            package,
            version,
            manifest_dir,
            out_dir: None,
        });
    }
    for (binary, id) in binaries.iter_mut().zip(&package_ids) {
        binary.out_dir = out_dirs.get(id).cloned();
    }
    let status = child
        .wait()
        .map_err(|e| format!("cannot wait for cargo: {e}"))?;
    if !status.success() {
        return Ok(Built::Failed(status.code().unwrap_or(101)));
    }
    Ok(Built::Binaries(binaries))
}

/// `(name, version)` from a package id: `path+file:///w/a#my-pkg@0.1.0`, `path+file:///w/a#0.1.0`
/// (the directory's name is the package's) or the old `my-pkg 0.1.0 (path+file:///w/a)`.
fn package_of(id: &str) -> (String, String) {
    if let Some((url, frag)) = id.rsplit_once('#') {
        if let Some((name, version)) = frag.split_once('@') {
            return (name.to_owned(), version.to_owned());
        }
        let name = url
            .trim_end_matches('/')
            .rsplit('/')
            .next()
            .unwrap_or_default();
        return (name.to_owned(), frag.to_owned());
    }
    let mut parts = id.split(' ');
    (
        parts.next().unwrap_or_default().to_owned(),
        parts.next().unwrap_or_default().to_owned(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_ids_in_every_spelling() {
        assert_eq!(
            package_of("path+file:///w/crates/a#my-pkg@0.1.0"),
            ("my-pkg".into(), "0.1.0".into())
        );
        assert_eq!(
            package_of("path+file:///w/crates/alpha#0.2.0"),
            ("alpha".into(), "0.2.0".into())
        );
        assert_eq!(
            package_of("my-pkg 0.1.0 (path+file:///w)"),
            ("my-pkg".into(), "0.1.0".into())
        );
    }

    #[test]
    fn flags_pass_through() {
        let args = BuildArgs {
            packages: vec!["a".into()],
            workspace: true,
            test_targets: vec!["t".into()],
            cargo_profile: Some("ci".into()),
            release: true,
            ..BuildArgs::default()
        };
        assert_eq!(
            cargo_flags(&args),
            [
                "--package",
                "a",
                "--workspace",
                "--release",
                "--profile",
                "ci",
                "--test",
                "t"
            ]
        );
    }
}
