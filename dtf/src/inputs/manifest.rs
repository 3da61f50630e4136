//! The manifest of an input tree, its checks, and the worker's side: building the tree from
//! the store and finding what tests wrote back.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::protocol::Digest;

/// The most entries a manifest may list.
pub const MAX_ENTRIES: usize = 1_000_000;

/// An input tree: directories of the coordinator (roots) and what of each is shipped.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The roots, each an absolute path on the coordinator.
    pub roots: Vec<Root>,
    /// Absolute globs of files tests write that travel back (`*` stays within a directory,
    /// `**` crosses them). Each lies under a [`RootKind::Tree`] root.
    pub outputs: Vec<String>,
}

/// One directory of the coordinator and the entries shipped from it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Root {
    /// The directory's absolute path on the coordinator.
    pub path: String,
    /// How the worker makes it visible.
    pub kind: RootKind,
    /// Entries, relative to the root (`/`-separated, no `.` or `..`), parents before children.
    pub entries: Vec<Entry>,
}

/// How a root appears on the worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RootKind {
    /// Mapped at its original path (the package root, the target directory, included
    /// directories): what the worker has there is hidden from the test.
    Tree,
    /// Shared libraries of the toolchain: put in front of the original directory on the loader
    /// path, so the worker's own files in that directory stay usable.
    Libraries,
}

/// One entry of a root.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The path relative to the root.
    pub path: String,
    /// What it is.
    pub kind: EntryKind,
}

/// What an entry is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    /// A directory (possibly empty).
    Dir,
    /// A regular file, by content.
    File {
        /// Its BLAKE3 digest.
        digest: Digest,
        /// Its size in bytes.
        size: u64,
        /// Whether it is executable.
        executable: bool,
    },
    /// A symbolic link whose target is relative and stays inside the root.
    Symlink {
        /// The link's target, as the link holds it.
        target: String,
    },
}

impl Manifest {
    /// The manifest's bytes: what is shipped and what its digest covers.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).unwrap_or_default()
    }

    /// Decodes and checks a manifest received from a peer.
    pub fn decode(bytes: &[u8]) -> Result<Manifest, String> {
        let manifest: Manifest = postcard::from_bytes(bytes)
            .map_err(|e| format!("the manifest does not decode: {e}"))?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// Every file of the tree: `(digest, size)`, each digest once.
    pub fn blobs(&self) -> Vec<(Digest, u64)> {
        let mut seen = BTreeMap::new();
        for root in &self.roots {
            for entry in &root.entries {
                if let EntryKind::File { digest, size, .. } = entry.kind {
                    seen.insert(digest, size);
                }
            }
        }
        seen.into_iter().collect()
    }

    /// The number of files and their total size.
    pub fn size(&self) -> (usize, u64) {
        let mut files = 0;
        let mut bytes = 0;
        for root in &self.roots {
            for entry in &root.entries {
                if let EntryKind::File { size, .. } = entry.kind {
                    files += 1;
                    bytes += size;
                }
            }
        }
        (files, bytes)
    }

    /// Checks what a worker must check before it writes anything: root paths are absolute and
    /// plain (no `.`, `..` or empty components), distinct, and not `/`; entry paths are
    /// relative and plain, listed once, never below a file or a symlink; symlinks stay inside
    /// their root; outputs lie under a tree root.
    pub fn validate(&self) -> Result<(), String> {
        let count: usize = self.roots.iter().map(|r| r.entries.len()).sum();
        if count > MAX_ENTRIES {
            return Err(format!(
                "the manifest lists {count} entries, more than the {MAX_ENTRIES} allowed"
            ));
        }
        let mut seen_roots = std::collections::HashSet::new();
        for root in &self.roots {
            let parts = absolute_parts(&root.path).ok_or_else(|| {
                format!(
                    "root `{}` is not a plain absolute path",
                    root.path.escape_debug()
                )
            })?;
            if parts.is_empty() {
                return Err("a root of `/` is refused".to_owned());
            }
            if !seen_roots.insert(root.path.as_str()) {
                return Err(format!(
                    "root `{}` is listed twice",
                    root.path.escape_debug()
                ));
            }
            let mut kinds: HashMap<&str, &EntryKind> = HashMap::new();
            for entry in &root.entries {
                let parts = relative_parts(&entry.path).ok_or_else(|| {
                    format!(
                        "entry `{}` of root `{}` is not a plain relative path",
                        entry.path.escape_debug(),
                        root.path.escape_debug()
                    )
                })?;
                if kinds.insert(entry.path.as_str(), &entry.kind).is_some() {
                    return Err(format!(
                        "entry `{}` is listed twice",
                        entry.path.escape_debug()
                    ));
                }
                if let EntryKind::Symlink { target } = &entry.kind {
                    if !symlink_stays_inside(&parts, target) {
                        return Err(format!(
                            "symlink `{}` points to `{}`, outside its root",
                            entry.path.escape_debug(),
                            target.escape_debug()
                        ));
                    }
                }
            }
            // No entry below a file or a symlink: writing it would follow the link.
            for entry in &root.entries {
                for (i, c) in entry.path.char_indices() {
                    if c != '/' {
                        continue;
                    }
                    let ancestor = &entry.path[..i];
                    if kinds
                        .get(ancestor)
                        .is_some_and(|k| !matches!(k, EntryKind::Dir))
                    {
                        return Err(format!(
                            "entry `{}` lies below `{}`, which is not a directory",
                            entry.path.escape_debug(),
                            ancestor.escape_debug()
                        ));
                    }
                }
            }
        }
        for output in &self.outputs {
            if absolute_parts(output).is_none() {
                return Err(format!(
                    "output pattern `{}` is not a plain absolute path",
                    output.escape_debug()
                ));
            }
            let under_root = self
                .roots
                .iter()
                .any(|r| r.kind == RootKind::Tree && under(output, &r.path));
            if !under_root {
                return Err(format!(
                    "output pattern `{}` lies outside the tree",
                    output.escape_debug()
                ));
            }
        }
        Ok(())
    }
}

/// True when `path` is `root` or below it (as strings of plain absolute paths).
pub(crate) fn under(path: &str, root: &str) -> bool {
    path == root
        || path
            .strip_prefix(root)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// The components of a plain absolute path; `None` when it is relative or has `.`, `..` or
/// empty components (a trailing `/` aside) or a NUL.
fn absolute_parts(path: &str) -> Option<Vec<&str>> {
    let rest = path.strip_prefix('/')?;
    if rest.is_empty() {
        return Some(Vec::new());
    }
    relative_parts(rest)
}

/// The components of a plain relative path.
fn relative_parts(path: &str) -> Option<Vec<&str>> {
    if path.is_empty() || path.starts_with('/') || path.contains('\0') {
        return None;
    }
    let parts: Vec<&str> = path.split('/').collect();
    if parts
        .iter()
        .any(|p| p.is_empty() || *p == "." || *p == "..")
    {
        return None;
    }
    Some(parts)
}

/// True when a symlink at `link` (components relative to its root) with `target` resolves,
/// lexically, inside the root.
fn symlink_stays_inside(link: &[&str], target: &str) -> bool {
    if target.is_empty() || target.starts_with('/') || target.contains('\0') {
        return false;
    }
    let mut depth = link.len() as isize - 1;
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            _ => depth += 1,
        }
    }
    true
}

/// A tree built on a worker: where each root's copy lives.
#[derive(Clone, Debug)]
pub struct Materialized {
    /// `(kind, the coordinator's path, the local copy)` of each root, in manifest order.
    pub roots: Vec<(RootKind, String, PathBuf)>,
    /// The files the tree was built with: `(local copy, digest)` by coordinator path.
    pub files: HashMap<String, Digest>,
    /// The output patterns.
    pub outputs: Vec<String>,
}

/// Builds `manifest` in `dest` (a fresh directory) from the store: `blob` gives the stored
/// file of a digest. Files are copied (the kernel may share their blocks, never the store's
/// inode), so tests writing to the tree change neither the store nor another run's tree.
/// Each root is built at its own path below `dest/root/` (`/w/app` at `dest/root/w/app`): the
/// roots keep their places relative to each other, so a relative path from one to another
/// resolves even where the tree cannot be mapped at the original paths.
pub fn materialize(
    manifest: &Manifest,
    blob: impl Fn(&Digest) -> Option<PathBuf>,
    dest: &Path,
) -> Result<Materialized, String> {
    use std::os::unix::fs::PermissionsExt;
    manifest.validate()?;
    let io = |what: &str, path: &Path, e: std::io::Error| {
        format!("cannot {what} {}: {e}", path.display())
    };
    std::fs::create_dir_all(dest).map_err(|e| io("create", dest, e))?;
    let mut roots = Vec::new();
    let mut files = HashMap::new();
    let mut links = Vec::new();
    for root in &manifest.roots {
        let local = dest.join("root").join(root.path.trim_start_matches('/'));
        std::fs::create_dir_all(&local).map_err(|e| io("create", &local, e))?;
        for entry in &root.entries {
            let path = local.join(&entry.path);
            match &entry.kind {
                EntryKind::Dir => {
                    std::fs::create_dir_all(&path).map_err(|e| io("create", &path, e))?;
                }
                EntryKind::File {
                    digest, executable, ..
                } => {
                    let source = blob(digest).ok_or_else(|| {
                        format!(
                            "the store lacks {} (for {})",
                            digest.short(),
                            entry.path.escape_debug()
                        )
                    })?;
                    if let Some(parent) = path.parent() {
                        std::fs::create_dir_all(parent).map_err(|e| io("create", parent, e))?;
                    }
                    std::fs::copy(&source, &path).map_err(|e| io("copy to", &path, e))?;
                    let mode = if *executable { 0o755 } else { 0o644 };
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                        .map_err(|e| io("set the mode of", &path, e))?;
                    files.insert(format!("{}/{}", root.path, entry.path), *digest);
                }
                EntryKind::Symlink { target } => links.push((path, target)),
            }
        }
        roots.push((root.kind, root.path.clone(), local));
    }
    // Links last, after every root's files: nothing is ever written through one.
    for (path, target) in links {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io("create", parent, e))?;
        }
        std::os::unix::fs::symlink(target, &path).map_err(|e| io("create the link", &path, e))?;
    }
    Ok(Materialized {
        roots,
        files,
        outputs: manifest.outputs.clone(),
    })
}

impl Materialized {
    /// The local copy of a coordinator path, through the innermost tree root holding it.
    pub fn local_path(&self, path: &str) -> Option<PathBuf> {
        self.roots
            .iter()
            .filter(|(k, root, _)| *k == RootKind::Tree && under(path, root))
            .max_by_key(|(_, root, _)| root.len())
            .map(|(_, root, local)| {
                let rest = path[root.len()..].trim_start_matches('/');
                if rest.is_empty() {
                    local.clone()
                } else {
                    local.join(rest)
                }
            })
    }

    /// `(local copy, coordinator path)` of each tree root not inside another (whose copy
    /// holds it), outermost first: what a test's mount namespace binds.
    pub fn binds(&self) -> Vec<(PathBuf, PathBuf)> {
        let trees: Vec<&String> = self
            .roots
            .iter()
            .filter(|(k, _, _)| *k == RootKind::Tree)
            .map(|(_, p, _)| p)
            .collect();
        let mut binds: Vec<(PathBuf, PathBuf)> = self
            .roots
            .iter()
            .filter(|(k, p, _)| {
                *k == RootKind::Tree && !trees.iter().any(|t| *t != p && under(p, t))
            })
            .map(|(_, path, local)| (local.clone(), PathBuf::from(path)))
            .collect();
        binds.sort_by_key(|(_, target)| target.components().count());
        binds
    }

    /// Rewrites a test's environment for this tree. The loader path gets, in front of each
    /// entry that is a library root or lies in a tree root, that entry's copy: the loader looks
    /// libraries up when the test binary starts, before any path is mapped. With `remap` (the
    /// worker cannot map paths), every other value that is a tree path, or a `:`-list holding
    /// some, points into the copies instead.
    pub fn rewrite_env(&self, env: &mut [(String, String)], remap: bool) {
        for (name, value) in env.iter_mut() {
            let loader = name == "LD_LIBRARY_PATH" || name == "DYLD_FALLBACK_LIBRARY_PATH";
            if !loader && !remap {
                continue;
            }
            let parts: Vec<String> = value
                .split(':')
                .map(|part| {
                    let copy = self
                        .roots
                        .iter()
                        .find(|(kind, root, _)| *kind == RootKind::Libraries && part == root)
                        .map(|(_, _, local)| local.clone())
                        .or_else(|| self.local_path(part).filter(|_| part.starts_with('/')));
                    match copy {
                        Some(copy) if loader => format!("{}:{part}", copy.display()),
                        Some(copy) => copy.display().to_string(),
                        None => part.to_owned(),
                    }
                })
                .collect();
            *value = parts.join(":");
        }
    }
}

/// A file a test wrote that travels back to the coordinator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputFile {
    /// Its absolute path on the coordinator.
    pub path: String,
    /// Its digest.
    pub digest: Digest,
    /// Its size.
    pub size: u64,
}

/// The files in a built tree that match its output patterns and are new or changed since it
/// was built: `(the file, its local copy)`.
pub fn collect_outputs(tree: &Materialized) -> Vec<(OutputFile, PathBuf)> {
    let Ok(patterns) = glob_set(&tree.outputs) else {
        return Vec::new();
    };
    if tree.outputs.is_empty() {
        return Vec::new();
    }
    let mut found = Vec::new();
    for (kind, root, local) in &tree.roots {
        if *kind != RootKind::Tree {
            continue;
        }
        let walker = walkdir(local);
        for path in walker {
            let Ok(rel) = path.strip_prefix(local) else {
                continue;
            };
            let Some(rel) = rel.to_str() else { continue };
            let original = format!("{root}/{rel}");
            // A path below a nested root belongs to that root's walk.
            if tree.local_path(&original).as_deref() != Some(path.as_path()) {
                continue;
            }
            if !patterns.is_match(&original) {
                continue;
            }
            let Ok(digest) = hash_file(&path) else {
                continue;
            };
            if tree.files.get(&original) == Some(&digest.0) {
                continue;
            }
            found.push((
                OutputFile {
                    path: original,
                    digest: digest.0,
                    size: digest.1,
                },
                path,
            ));
        }
    }
    found
}

/// Regular files below `dir`, not following links.
fn walkdir(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_file() {
                out.push(entry.path());
            }
        }
    }
    out
}

/// The digest and size of a file.
pub(crate) fn hash_file(path: &Path) -> std::io::Result<(Digest, u64)> {
    let mut hasher = blake3::Hasher::new();
    let file = std::fs::File::open(path)?;
    hasher.update_reader(file)?;
    let size = std::fs::metadata(path)?.len();
    Ok((Digest(*hasher.finalize().as_bytes()), size))
}

/// A set of absolute globs: `*` within a directory, `**` across.
pub(crate) fn glob_set(patterns: &[String]) -> Result<globset::GlobSet, (String, String)> {
    let mut builder = globset::GlobSetBuilder::new();
    for pattern in patterns {
        let glob = globset::GlobBuilder::new(pattern)
            .literal_separator(true)
            .backslash_escape(true)
            .build()
            .map_err(|e| (pattern.clone(), e.kind().to_string()))?;
        builder.add(glob);
    }
    builder
        .build()
        .map_err(|e| (patterns.join(", "), e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, bytes: &[u8]) -> Entry {
        Entry {
            path: path.to_owned(),
            kind: EntryKind::File {
                digest: Digest::of(bytes),
                size: bytes.len() as u64,
                executable: false,
            },
        }
    }

    fn manifest(root: &str, entries: Vec<Entry>) -> Manifest {
        Manifest {
            roots: vec![Root {
                path: root.to_owned(),
                kind: RootKind::Tree,
                entries,
            }],
            outputs: Vec::new(),
        }
    }

    #[test]
    fn hostile_manifests_are_refused() {
        let link = |target: &str| Entry {
            path: "a/link".into(),
            kind: EntryKind::Symlink {
                target: target.into(),
            },
        };
        let bad = [
            manifest("/w/app", vec![file("../escape", b"x")]),
            manifest("/w/app", vec![file("/etc/passwd", b"x")]),
            manifest("/w/app", vec![file("a/./b", b"x")]),
            manifest("/w/app", vec![file("a//b", b"x")]),
            manifest("relative/root", vec![file("a", b"x")]),
            manifest("/w/../etc", vec![file("a", b"x")]),
            manifest("/", vec![file("a", b"x")]),
            manifest("/w/app", vec![link("../../outside")]),
            manifest("/w/app", vec![link("/etc")]),
            manifest("/w/app", vec![file("a", b"x"), file("a", b"y")]),
            manifest("/w/app", vec![file("f", b"x"), file("f/below", b"y")]),
            manifest("/w/app", vec![file("f/below", b"y"), file("f", b"x")]),
            manifest(
                "/w/app",
                vec![
                    Entry {
                        path: "l".into(),
                        kind: EntryKind::Symlink { target: "d".into() },
                    },
                    file("l/x", b"y"),
                ],
            ),
            Manifest {
                outputs: vec!["/etc/*.snap".into()],
                ..manifest("/w/app", vec![])
            },
        ];
        for m in bad {
            assert!(m.validate().is_err(), "accepted: {m:?}");
            assert!(Manifest::decode(&m.encode()).is_err());
        }
        let good = manifest("/w/app", vec![link("../b"), file("a/x", b"1")]);
        good.validate().unwrap();
        assert_eq!(Manifest::decode(&good.encode()).unwrap(), good);
    }

    #[test]
    fn a_built_tree_is_a_copy_and_maps_back() {
        let store = tempfile::tempdir().unwrap();
        let dest = tempfile::tempdir().unwrap();
        let blob = store.path().join("blob");
        std::fs::write(&blob, b"data").unwrap();
        let mut m = manifest(
            "/w/app",
            vec![
                file("fixtures/a.txt", b"data"),
                Entry {
                    path: "empty".into(),
                    kind: EntryKind::Dir,
                },
                Entry {
                    path: "fixtures/link".into(),
                    kind: EntryKind::Symlink {
                        target: "a.txt".into(),
                    },
                },
            ],
        );
        m.roots.push(Root {
            path: "/w/app/target".into(),
            kind: RootKind::Tree,
            entries: vec![Entry {
                path: "tmp".into(),
                kind: EntryKind::Dir,
            }],
        });
        m.roots.push(Root {
            path: "/rust/lib".into(),
            kind: RootKind::Libraries,
            entries: vec![file("libstd.so", b"data")],
        });
        m.outputs = vec!["/w/app/**/*.snap.new".into()];
        let tree = materialize(&m, |_| Some(blob.clone()), &dest.path().join("t")).unwrap();
        let copy = tree.local_path("/w/app/fixtures/a.txt").unwrap();
        assert_eq!(std::fs::read(&copy).unwrap(), b"data");
        std::fs::write(&copy, b"changed").unwrap();
        assert_eq!(
            std::fs::read(&blob).unwrap(),
            b"data",
            "the store is untouched"
        );
        assert!(tree.local_path("/w/app/empty").unwrap().is_dir());
        assert_eq!(
            tree.local_path("/w/app/target/tmp").unwrap(),
            dest.path().join("t/root/w/app/target/tmp"),
            "the nested root lies in the outer one's copy"
        );
        assert!(tree.local_path("/w/app/target/tmp").unwrap().is_dir());
        let binds = tree.binds();
        assert_eq!(
            binds,
            [(dest.path().join("t/root/w/app"), PathBuf::from("/w/app"))]
        );

        let mut env = vec![
            (
                "LD_LIBRARY_PATH".to_owned(),
                "/w/app/target/debug/deps:/rust/lib:/usr/lib".to_owned(),
            ),
            ("CARGO_MANIFEST_DIR".to_owned(), "/w/app".to_owned()),
        ];
        tree.rewrite_env(&mut env, false);
        let lib = tree.roots[2].2.display().to_string();
        let deps = tree.local_path("/w/app/target/debug/deps").unwrap();
        assert_eq!(
            env[0].1,
            format!(
                "{}:/w/app/target/debug/deps:{lib}:/rust/lib:/usr/lib",
                deps.display()
            )
        );
        assert_eq!(env[1].1, "/w/app");
        tree.rewrite_env(&mut env, true);
        assert_eq!(env[1].1, tree.roots[0].2.display().to_string());

        // Outputs: new or changed files matching the patterns.
        let snap = tree
            .local_path("/w/app/tests/snapshots/x.snap.new")
            .unwrap();
        std::fs::create_dir_all(snap.parent().unwrap()).unwrap();
        std::fs::write(&snap, b"snap").unwrap();
        let outputs = collect_outputs(&tree);
        assert_eq!(outputs.len(), 1, "{outputs:?}");
        assert_eq!(outputs[0].0.path, "/w/app/tests/snapshots/x.snap.new");
        assert_eq!(outputs[0].0.digest, Digest::of(b"snap"));
    }
}
