//! The coordinator's side: which files make up a test binary's input tree.

use std::collections::{BTreeMap, HashSet};
use std::path::{Component, Path, PathBuf};

use thiserror::Error;

use super::manifest::{Entry, EntryKind, Manifest, Root, RootKind, glob_set, hash_file, under};
use super::{DEFAULT_MAX, EXCLUDE_VAR, INCLUDE_VAR, MAX_VAR, OUTPUTS_VAR};
use crate::protocol::Digest;

/// Directories of version control systems, never shipped.
const VCS_DIRS: &[&str] = &[".git", ".hg", ".svn", ".jj", ".pijul", ".bzr", "_darcs"];

/// How many of the largest entries a cap error names.
const LARGEST: usize = 8;

/// Why the input tree cannot be computed.
#[derive(Debug, Error)]
pub enum InputError {
    /// `[package.metadata.dtf]` is malformed.
    #[error("{path}: {message}")]
    Metadata {
        /// The manifest file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// A glob does not parse.
    #[error("invalid glob `{pattern}` in {source_name}: {message}")]
    Glob {
        /// The pattern.
        pattern: String,
        /// Where it came from.
        source_name: String,
        /// Why.
        message: String,
    },
    /// A setting is malformed.
    #[error("invalid {var}=`{value}`: {message}")]
    BadEnv {
        /// The variable.
        var: &'static str,
        /// Its value.
        value: String,
        /// Why.
        message: String,
    },
    /// A file cannot be read.
    #[error("cannot read {path} for the input tree: {error}")]
    Io {
        /// The path.
        path: String,
        /// Why.
        error: std::io::Error,
    },
    /// The tree is over the cap.
    #[error(
        "the input tree of this test binary is {total} bytes ({human}), over the cap of {max} bytes \
         ({MAX_VAR}); the largest entries: {largest}. Exclude what tests do not read with \
         `[package.metadata.dtf] exclude = [\"{example}\"]` in Cargo.toml or {EXCLUDE_VAR}=\"{example}\", \
         or raise {MAX_VAR} (e.g. {MAX_VAR}=4GiB)"
    )]
    TooLarge {
        /// The tree's size.
        total: u64,
        /// The same, for people.
        human: String,
        /// The cap.
        max: u64,
        /// The largest entries, with sizes.
        largest: String,
        /// An exclude pattern for the largest directory.
        example: String,
    },
}

/// Where a test binary's inputs come from, as the coordinator sees them.
#[derive(Clone, Debug, Default)]
pub struct Sources {
    /// The package root (the run-time `CARGO_MANIFEST_DIR` when set, else the compile-time one).
    pub package_root: PathBuf,
    /// The test binary (its shared libraries are found from it).
    pub binary: PathBuf,
    /// More test binaries of the same package that run in this tree (`cargo dtf` ships one
    /// tree per package): the shared libraries they load travel too.
    pub more_binaries: Vec<PathBuf>,
    /// The target directory (`target/`).
    pub target_dir: Option<PathBuf>,
    /// The profile directory (`target/debug/`), where the package's executables are.
    pub profile_dir: Option<PathBuf>,
    /// The build script's `OUT_DIR`, as compiled into the binary.
    pub out_dir: Option<PathBuf>,
    /// `CARGO_TARGET_TMPDIR`, as compiled into the binary.
    pub target_tmpdir: Option<PathBuf>,
    /// The loader path (`LD_LIBRARY_PATH`): where shared libraries are looked up.
    pub library_path: Vec<PathBuf>,
    /// `DTF_INCLUDE` globs.
    pub include: Vec<String>,
    /// `DTF_EXCLUDE` globs.
    pub exclude: Vec<String>,
    /// `DTF_OUTPUTS` globs.
    pub outputs: Vec<String>,
    /// `LLVM_PROFILE_FILE`: its directory travels (empty) and its profiles come back.
    pub profile_file: Option<PathBuf>,
    /// The cap on the tree's size (`DTF_INPUT_MAX`).
    pub max: u64,
}

impl Sources {
    /// The sources of `binary` in the package at `package_root`, with the target directory
    /// found from the binary's path (`target/<profile>/deps/NAME`) or from `target_tmpdir`.
    pub fn new(
        binary: PathBuf,
        package_root: PathBuf,
        out_dir: Option<PathBuf>,
        target_tmpdir: Option<PathBuf>,
    ) -> Sources {
        let deps = binary.parent();
        let profile_dir = match deps {
            Some(d) if d.file_name().is_some_and(|n| n == "deps") => {
                d.parent().map(Path::to_path_buf)
            }
            Some(d) => Some(d.to_path_buf()),
            None => None,
        };
        let target_dir = target_tmpdir
            .as_deref()
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .or_else(|| {
                // `target/<profile>` or `target/<triple>/<profile>`: the directory holding
                // cargo's CACHEDIR.TAG.
                let mut dir = profile_dir.as_deref();
                while let Some(d) = dir {
                    if d.join("CACHEDIR.TAG").is_file() {
                        return Some(d.to_path_buf());
                    }
                    dir = d.parent();
                }
                profile_dir
                    .as_deref()
                    .and_then(Path::parent)
                    .map(Path::to_path_buf)
            });
        Sources {
            package_root,
            binary,
            target_dir,
            profile_dir,
            out_dir,
            target_tmpdir,
            max: DEFAULT_MAX,
            ..Sources::default()
        }
    }

    /// Adds what the environment says: `DTF_INCLUDE`, `DTF_EXCLUDE`, `DTF_OUTPUTS`,
    /// `DTF_INPUT_MAX`, the loader path and `LLVM_PROFILE_FILE`.
    pub fn with_env(mut self, var: impl Fn(&str) -> Option<String>) -> Result<Sources, InputError> {
        let list = |name: &str| -> Vec<String> {
            var(name)
                .map(|v| {
                    v.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default()
        };
        self.include = list(INCLUDE_VAR);
        self.exclude = list(EXCLUDE_VAR);
        self.outputs = list(OUTPUTS_VAR);
        if let Some(value) = var(MAX_VAR).filter(|v| !v.trim().is_empty()) {
            self.max = crate::cli::parse_size(&value).map_err(|message| InputError::BadEnv {
                var: MAX_VAR,
                value: value.clone(),
                message,
            })?;
        }
        let loader = if cfg!(target_os = "macos") {
            "DYLD_FALLBACK_LIBRARY_PATH"
        } else {
            "LD_LIBRARY_PATH"
        };
        self.library_path = var(loader)
            .map(|v| {
                std::env::split_paths(&v)
                    .filter(|p| p.is_absolute())
                    .collect()
            })
            .unwrap_or_default();
        self.profile_file = var("LLVM_PROFILE_FILE")
            .filter(|v| !v.is_empty())
            .map(|v| absolute(&self.package_root, Path::new(&v)));
        Ok(self)
    }

    /// Paths compiled into the binary that a test may use: `(what, path)`.
    pub fn compiled_paths(&self, compile_time_root: &Path) -> Vec<(String, PathBuf)> {
        let mut paths = vec![(
            "CARGO_MANIFEST_DIR".to_owned(),
            compile_time_root.to_path_buf(),
        )];
        if let Some(dir) = &self.out_dir {
            paths.push(("OUT_DIR".to_owned(), dir.clone()));
        }
        if let Some(dir) = &self.target_tmpdir {
            paths.push(("CARGO_TARGET_TMPDIR".to_owned(), dir.clone()));
        }
        if let (Some(profile), Ok(names)) = (&self.profile_dir, bin_names(&self.package_root)) {
            for name in names {
                let exe = profile.join(&name);
                if exe.is_file() {
                    paths.push((format!("CARGO_BIN_EXE_{name}"), exe));
                }
            }
        }
        paths
    }
}

/// A computed input tree.
#[derive(Clone, Debug)]
pub struct Tree {
    /// What it holds.
    pub manifest: Manifest,
    /// The manifest's encoding; its digest is [`Tree::digest`].
    pub encoded: Vec<u8>,
    /// The manifest's digest: the tree's name.
    pub digest: Digest,
    /// Where each file's content is read from, by digest.
    pub blobs: BTreeMap<Digest, (PathBuf, u64)>,
    /// Every path in the tree (absolute, on the coordinator).
    pub paths: HashSet<PathBuf>,
    /// What was found and left out, for people.
    pub notes: Vec<String>,
}

impl Tree {
    /// Computes the tree of `sources`. Fails on malformed settings, unreadable files and a
    /// tree over the cap.
    pub fn compute(sources: &Sources) -> Result<Tree, InputError> {
        let mut b = Builder::default();
        let root = &sources.package_root;
        let meta = Metadata::read(root)?;
        let normalize = |patterns: &[String], from: &str| -> Result<Vec<String>, InputError> {
            patterns
                .iter()
                .map(|p| {
                    let abs = absolute(root, Path::new(p));
                    let abs = abs
                        .to_str()
                        .map(str::to_owned)
                        .ok_or_else(|| InputError::Glob {
                            pattern: p.clone(),
                            source_name: from.to_owned(),
                            message: "not UTF-8".to_owned(),
                        })?;
                    glob_set(std::slice::from_ref(&abs)).map_err(|(_, message)| {
                        InputError::Glob {
                            pattern: p.clone(),
                            source_name: from.to_owned(),
                            message,
                        }
                    })?;
                    Ok(abs)
                })
                .collect()
        };
        let metadata_name = "[package.metadata.dtf]";
        let mut excludes = normalize(&meta.exclude, metadata_name)?;
        excludes.extend(normalize(&sources.exclude, EXCLUDE_VAR)?);
        let mut includes = normalize(&meta.include, metadata_name)?;
        includes.extend(normalize(&sources.include, INCLUDE_VAR)?);
        let mut outputs = normalize(&meta.outputs, metadata_name)?;
        outputs.extend(normalize(&sources.outputs, OUTPUTS_VAR)?);
        let exclude_set = glob_set(&excludes).map_err(|(pattern, message)| InputError::Glob {
            pattern,
            source_name: "the excludes".to_owned(),
            message,
        })?;

        b.add_root(root, RootKind::Tree);
        if let Some(target) = &sources.target_dir {
            b.add_root(target, RootKind::Tree);
        }

        // The package's files.
        let target_dir = sources.target_dir.clone();
        let mut walk = ignore::WalkBuilder::new(root);
        walk.hidden(false)
            .parents(true)
            .ignore(true)
            .git_ignore(true)
            .git_global(false)
            .git_exclude(true)
            .require_git(false)
            .follow_links(false);
        let walk_root = root.clone();
        let skip_set = exclude_set.clone();
        walk.filter_entry(move |entry| {
            let path = entry.path();
            if entry.depth() == 0 {
                return true;
            }
            if skip_set.is_match(path) {
                return false;
            }
            let is_dir = entry.file_type().is_some_and(|t| t.is_dir());
            if !is_dir {
                return true;
            }
            let name = entry.file_name().to_string_lossy();
            !(VCS_DIRS.contains(&name.as_ref())
                || target_dir.as_deref() == Some(path)
                || (entry.depth() == 1 && name == "target" && path.parent() == Some(&walk_root))
                || path.join("CACHEDIR.TAG").is_file()
                || path.join(".rustc_info.json").is_file()
                || path.join("Cargo.toml").is_file())
        });
        for entry in walk.build() {
            match entry {
                Ok(entry) if entry.depth() > 0 => b.add_walked(entry.path(), &exclude_set)?,
                Ok(_) => {}
                Err(e) => b.notes.push(format!("not shipped: {e}")),
            }
        }

        // What the user includes.
        for pattern in &includes {
            let base = glob_base(Path::new(pattern));
            let set = glob_set(std::slice::from_ref(pattern)).map_err(|(pattern, message)| {
                InputError::Glob {
                    pattern,
                    source_name: "the includes".to_owned(),
                    message,
                }
            })?;
            let mut matched = 0;
            if base.is_file() {
                if let Some(parent) = base.parent() {
                    b.ensure_root(parent);
                }
                b.add_walked(&base, &exclude_set)?;
                matched += 1;
            } else if base.is_dir() {
                b.ensure_root(&base);
                let literal = base.as_os_str() == Path::new(pattern).as_os_str();
                for entry in walkdir_sorted(&base) {
                    if exclude_set.is_match(&entry) {
                        continue;
                    }
                    if literal || set.is_match(&entry) {
                        b.add_walked(&entry, &exclude_set)?;
                        matched += 1;
                    }
                }
            }
            if matched == 0 {
                b.notes
                    .push(format!("the include `{pattern}` matches nothing"));
            }
        }

        // What the binary reaches in the target directory.
        if let Some(profile) = &sources.profile_dir {
            for name in bin_names(root).map_err(|message| InputError::Metadata {
                path: root.join("Cargo.toml").display().to_string(),
                message,
            })? {
                let exe = profile.join(&name);
                if exe.is_file() {
                    b.add_file(&exe)?;
                }
            }
        }
        if let Some(out) = sources.out_dir.as_ref().filter(|d| d.is_dir()) {
            b.ensure_root(out);
            b.add_dir(out);
            for entry in walkdir_sorted(out) {
                b.add_walked(&entry, &globset::GlobSet::empty())?;
            }
        }
        if let Some(tmp) = &sources.target_tmpdir {
            b.ensure_root(tmp);
            b.add_dir(tmp);
        }
        let mut libraries = needed_libraries(&sources.binary, &sources.library_path);
        for binary in &sources.more_binaries {
            for library in needed_libraries(binary, &sources.library_path) {
                if !libraries.contains(&library) {
                    libraries.push(library);
                }
            }
        }
        for library in libraries {
            let Some(dir) = library.parent() else {
                continue;
            };
            let in_target = sources
                .target_dir
                .as_deref()
                .is_some_and(|t| library.starts_with(t));
            if in_target {
                b.add_file(&library)?;
            } else if is_sysroot_dir(dir) {
                b.add_root(dir, RootKind::Libraries);
                b.add_file(&library)?;
            }
        }

        // Where tests write what travels back.
        if let Some(profile) = &sources.profile_file {
            if let (Some(dir), Some(name)) = (profile.parent(), profile.file_name()) {
                b.ensure_root(dir);
                b.add_dir(dir);
                let pattern = profile_glob(&name.to_string_lossy());
                outputs.push(format!("{}/{pattern}", dir.display()));
            }
        }
        outputs.push(format!("{}/**/*.snap.new", root.display()));
        outputs.push(format!("{}/**/.*.pending-snap", root.display()));
        let tree_roots: Vec<String> = b.tree_roots();
        outputs.retain(|o| tree_roots.iter().any(|r| under(o, r)));
        outputs.sort();
        outputs.dedup();

        let manifest = b.manifest(outputs);
        let (_, total) = manifest.size();
        if total > sources.max {
            return Err(b.too_large(total, sources.max, root));
        }
        let encoded = manifest.encode();
        let digest = Digest::of(&encoded);
        Ok(Tree {
            manifest,
            encoded,
            digest,
            blobs: b.blobs,
            paths: b.paths,
            notes: b.notes,
        })
    }

    /// The number of files and their total size.
    pub fn size(&self) -> (usize, u64) {
        self.manifest.size()
    }

    /// True when `path` (absolute, on the coordinator) is in the tree.
    pub fn contains(&self, path: &Path) -> bool {
        self.paths.contains(path)
    }

    /// True when `path` (absolute, plain) matches one of the tree's output patterns: what a
    /// worker may send back.
    pub fn is_output(&self, path: &str) -> bool {
        let plain = path.starts_with('/')
            && !path.split('/').any(|p| p == ".." || p == ".")
            && !path.contains('\0');
        plain && glob_set(&self.manifest.outputs).is_ok_and(|set| set.is_match(path))
    }
}

#[derive(Default)]
struct Builder {
    /// Roots by path: kind and entries by relative path.
    roots: BTreeMap<PathBuf, (RootKind, BTreeMap<String, EntryKind>)>,
    blobs: BTreeMap<Digest, (PathBuf, u64)>,
    paths: HashSet<PathBuf>,
    notes: Vec<String>,
}

impl Builder {
    fn add_root(&mut self, dir: &Path, kind: RootKind) {
        self.roots
            .entry(clean(dir))
            .or_insert_with(|| (kind, BTreeMap::new()));
    }

    /// A tree root holding `dir`: the innermost existing one, else a new one at `dir`.
    fn ensure_root(&mut self, dir: &Path) {
        let dir = clean(dir);
        if self.root_of(&dir).is_none() {
            self.add_root(&dir, RootKind::Tree);
        }
    }

    fn root_of(&self, path: &Path) -> Option<PathBuf> {
        self.roots
            .iter()
            .filter(|(root, (kind, _))| *kind == RootKind::Tree && path.starts_with(root))
            .max_by_key(|(root, _)| root.as_os_str().len())
            .map(|(root, _)| root.clone())
    }

    fn tree_roots(&self) -> Vec<String> {
        self.roots
            .iter()
            .filter(|(_, (k, _))| *k == RootKind::Tree)
            .filter_map(|(r, _)| r.to_str().map(str::to_owned))
            .collect()
    }

    /// The root and relative path of `path`; a library root when `path`'s directory is one.
    fn place(&self, path: &Path) -> Option<(PathBuf, String)> {
        let root = match path.parent().map(|p| self.roots.get_key_value(p)) {
            Some(Some((root, (RootKind::Libraries, _)))) => root.clone(),
            _ => self.root_of(path)?,
        };
        let rel = path.strip_prefix(&root).ok()?.to_str()?.to_owned();
        (!rel.is_empty()).then_some((root, rel))
    }

    fn insert(&mut self, path: &Path, kind: EntryKind) {
        let path = clean(path);
        let Some((root, rel)) = self.place(&path) else {
            if path.to_str().is_none() {
                self.notes
                    .push(format!("not shipped (not UTF-8): {}", path.display()));
            }
            return;
        };
        self.paths.insert(path);
        if let Some((_, entries)) = self.roots.get_mut(&root) {
            entries.insert(rel, kind);
        }
    }

    fn add_dir(&mut self, dir: &Path) {
        let dir = clean(dir);
        if self.roots.contains_key(&dir) {
            self.paths.insert(dir);
            return;
        }
        self.insert(&dir, EntryKind::Dir);
    }

    fn add_file(&mut self, path: &Path) -> Result<(), InputError> {
        use std::os::unix::fs::PermissionsExt;
        let io = |error| InputError::Io {
            path: path.display().to_string(),
            error,
        };
        let meta = std::fs::metadata(path).map_err(io)?;
        let (digest, size) = hash_file(path).map_err(io)?;
        self.blobs
            .entry(digest)
            .or_insert_with(|| (path.to_path_buf(), size));
        self.insert(
            path,
            EntryKind::File {
                digest,
                size,
                executable: meta.permissions().mode() & 0o111 != 0,
            },
        );
        Ok(())
    }

    /// Adds what a walk found: a directory, a file, or a symlink (kept as a link when it is
    /// relative and stays inside its root, else shipped as what it points to).
    fn add_walked(&mut self, path: &Path, excludes: &globset::GlobSet) -> Result<(), InputError> {
        if excludes.is_match(path) {
            return Ok(());
        }
        let Ok(meta) = std::fs::symlink_metadata(path) else {
            return Ok(()); // vanished since the walk saw it
        };
        if meta.is_dir() {
            self.add_dir(path);
        } else if meta.is_file() {
            self.add_file(path)?;
        } else if meta.file_type().is_symlink() {
            let target = std::fs::read_link(path).map_err(|error| InputError::Io {
                path: path.display().to_string(),
                error,
            })?;
            let inside = target.is_relative()
                && self.place(path).is_some_and(|(root, _)| {
                    path.parent()
                        .map(|p| clean(&p.join(&target)))
                        .is_some_and(|t| t.starts_with(&root))
                });
            match (inside, target.to_str()) {
                (true, Some(t)) => {
                    self.insert(path, EntryKind::Symlink { target: t.to_owned() });
                }
                _ => match std::fs::metadata(path) {
                    Ok(m) if m.is_file() => self.add_file(path)?,
                    Ok(_) => self.notes.push(format!(
                        "not shipped: {} is a link to a directory outside the tree ({}); include that directory instead",
                        path.display(),
                        target.display()
                    )),
                    Err(_) => self.notes.push(format!(
                        "not shipped: {} is a dangling link",
                        path.display()
                    )),
                },
            }
        }
        Ok(())
    }

    fn manifest(&self, outputs: Vec<String>) -> Manifest {
        let roots = self
            .roots
            .iter()
            .filter_map(|(path, (kind, entries))| {
                Some(Root {
                    path: path.to_str()?.to_owned(),
                    kind: *kind,
                    entries: entries
                        .iter()
                        .map(|(path, kind)| Entry {
                            path: path.clone(),
                            kind: kind.clone(),
                        })
                        .collect(),
                })
            })
            .filter(|r| !r.entries.is_empty() || r.kind == RootKind::Tree)
            .collect();
        Manifest { roots, outputs }
    }

    fn too_large(&self, total: u64, max: u64, package_root: &Path) -> InputError {
        // Sizes of files and of the directories one and two levels below each root.
        let mut sizes: BTreeMap<String, u64> = BTreeMap::new();
        for (root, (_, entries)) in &self.roots {
            for (rel, kind) in entries {
                let EntryKind::File { size, .. } = kind else {
                    continue;
                };
                let parts: Vec<&str> = rel.split('/').collect();
                *sizes
                    .entry(format!("{}/{rel}", root.display()))
                    .or_default() += size;
                for depth in 1..parts.len().min(3) {
                    let dir = parts[..depth].join("/");
                    *sizes
                        .entry(format!("{}/{dir}/", root.display()))
                        .or_default() += size;
                }
            }
        }
        let mut largest: Vec<(String, u64)> = sizes.into_iter().collect();
        largest.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        largest.truncate(LARGEST);
        let example = largest
            .iter()
            .find(|(p, _)| p.ends_with('/'))
            .map(|(p, _)| {
                let p = p.trim_end_matches('/');
                match Path::new(p).strip_prefix(package_root) {
                    Ok(rel) => format!("{}/**", rel.display()),
                    Err(_) => format!("{p}/**"),
                }
            })
            .unwrap_or_else(|| "fixtures/big/**".to_owned());
        InputError::TooLarge {
            total,
            human: crate::protocol::human_bytes(total),
            max,
            largest: largest
                .iter()
                .map(|(p, s)| format!("{p} ({})", crate::protocol::human_bytes(*s)))
                .collect::<Vec<_>>()
                .join(", "),
            example,
        }
    }
}

/// `[package.metadata.dtf]` of a package.
#[derive(Debug, Default)]
struct Metadata {
    include: Vec<String>,
    exclude: Vec<String>,
    outputs: Vec<String>,
}

impl Metadata {
    fn read(package_root: &Path) -> Result<Metadata, InputError> {
        let path = package_root.join("Cargo.toml");
        let Some(table) = read_manifest(&path)? else {
            return Ok(Metadata::default());
        };
        let Some(dtf) = table
            .get("package")
            .and_then(|p| p.get("metadata"))
            .and_then(|m| m.get("dtf"))
        else {
            return Ok(Metadata::default());
        };
        let bad = |message: String| InputError::Metadata {
            path: path.display().to_string(),
            message,
        };
        let dtf = dtf
            .as_table()
            .ok_or_else(|| bad("[package.metadata.dtf] must be a table".to_owned()))?;
        let mut meta = Metadata::default();
        for (key, value) in dtf {
            let list = match value.as_array() {
                Some(items) => items
                    .iter()
                    .map(|i| i.as_str().map(str::to_owned))
                    .collect::<Option<Vec<String>>>(),
                None => None,
            }
            .ok_or_else(|| bad(format!("[package.metadata.dtf] {key} must be a list of glob strings, such as [\"fixtures/**\"]")))?;
            match key.as_str() {
                "include" => meta.include = list,
                "exclude" => meta.exclude = list,
                "outputs" => meta.outputs = list,
                other => {
                    return Err(bad(format!(
                        "unknown key `{other}` in [package.metadata.dtf] (known: include, exclude, outputs)"
                    )));
                }
            }
        }
        Ok(meta)
    }
}

fn read_manifest(path: &Path) -> Result<Option<toml::Table>, InputError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => {
            return Err(InputError::Io {
                path: path.display().to_string(),
                error,
            });
        }
    };
    text.parse::<toml::Table>()
        .map(Some)
        .map_err(|e| InputError::Metadata {
            path: path.display().to_string(),
            message: e.to_string(),
        })
}

/// The package's executables, as cargo finds them: `[[bin]]` names, and unless
/// `autobins = false`, `src/main.rs` (the package's name), `src/bin/NAME.rs` and
/// `src/bin/NAME/main.rs`.
fn bin_names(package_root: &Path) -> Result<Vec<String>, String> {
    let path = package_root.join("Cargo.toml");
    let table = read_manifest(&path)
        .map_err(|e| e.to_string())?
        .unwrap_or_default();
    let package = table.get("package");
    let mut names = Vec::new();
    if let Some(bins) = table.get("bin").and_then(|b| b.as_array()) {
        for bin in bins {
            if let Some(name) = bin.get("name").and_then(|n| n.as_str()) {
                names.push(name.to_owned());
            }
        }
    }
    let auto = package
        .and_then(|p| p.get("autobins"))
        .and_then(|a| a.as_bool())
        .unwrap_or(true);
    if auto {
        if package_root.join("src/main.rs").is_file() {
            if let Some(name) = package.and_then(|p| p.get("name")).and_then(|n| n.as_str()) {
                names.push(name.to_owned());
            }
        }
        if let Ok(entries) = std::fs::read_dir(package_root.join("src/bin")) {
            for entry in entries.flatten() {
                let path = entry.path();
                let name = if path.extension().is_some_and(|e| e == "rs") {
                    path.file_stem()
                } else if path.join("main.rs").is_file() {
                    path.file_name()
                } else {
                    None
                };
                if let Some(name) = name.and_then(|n| n.to_str()) {
                    names.push(name.to_owned());
                }
            }
        }
    }
    names.sort();
    names.dedup();
    Ok(names)
}

/// The shared libraries `binary` loads (transitively) that are found in `search`: by
/// `DT_NEEDED` names, each looked up in order. Libraries not found there are the system's.
fn needed_libraries(binary: &Path, search: &[PathBuf]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    if search.is_empty() {
        return found; // nothing can be found: the binary is not even read
    }
    let mut seen = HashSet::new();
    let mut queue = vec![binary.to_path_buf()];
    while let Some(file) = queue.pop() {
        let Ok(file) = std::fs::File::open(&file) else {
            continue;
        };
        // Only the headers and the dynamic section are read, not the whole file.
        let data = object::read::ReadCache::new(file);
        for name in elf_needed(&data) {
            if !seen.insert(name.clone()) {
                continue;
            }
            if let Some(lib) = search.iter().map(|d| d.join(&name)).find(|p| p.is_file()) {
                queue.push(lib.clone());
                found.push(lib);
            }
        }
    }
    found
}

/// The `DT_NEEDED` entries of an ELF file (none for anything else).
fn elf_needed<'a>(data: impl object::ReadRef<'a>) -> Vec<String> {
    use object::read::elf::{Dyn as _, FileHeader as _};
    let Ok(header) = object::elf::FileHeader64::<object::Endianness>::parse(data) else {
        return Vec::new();
    };
    let Ok(endian) = header.endian() else {
        return Vec::new();
    };
    let Ok(sections) = header.sections(endian, data) else {
        return Vec::new();
    };
    let Ok(Some((dyns, link))) = sections.dynamic(endian, data) else {
        return Vec::new();
    };
    let Ok(strings) = sections.strings(endian, data, link) else {
        return Vec::new();
    };
    dyns.iter()
        .filter(|d| d.d_tag(endian) == object::elf::DT_NEEDED)
        .filter_map(|d| d.string(endian, strings).ok())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// A toolchain's library directory: `<sysroot>/lib` (it holds `rustlib/`) or a directory
/// inside `rustlib/`.
fn is_sysroot_dir(dir: &Path) -> bool {
    dir.join("rustlib").is_dir() || dir.components().any(|c| c.as_os_str() == "rustlib")
}

/// `LLVM_PROFILE_FILE`'s name as a glob: `%p`, `%h`, `%m`, `%Nm`, `%c`, `%t` become `*`.
fn profile_glob(name: &str) -> String {
    let mut out = String::new();
    let mut chars = name.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        while chars.peek().is_some_and(|c| c.is_ascii_digit()) {
            chars.next();
        }
        match chars.next() {
            Some('%') => out.push('%'),
            Some(_) if !out.ends_with('*') => out.push('*'),
            _ => {}
        }
    }
    out
}

/// The literal directory (or file) a glob starts from: its components before the first one
/// with a glob character.
fn glob_base(pattern: &Path) -> PathBuf {
    let mut base = PathBuf::new();
    for c in pattern.components() {
        let s = c.as_os_str().to_string_lossy();
        if s.contains(['*', '?', '[', '{']) {
            break;
        }
        base.push(c);
    }
    base
}

/// Every entry below `dir` (directories, files and links, not following links), sorted.
fn walkdir_sorted(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                if VCS_DIRS.contains(&name.to_string_lossy().as_ref()) {
                    continue;
                }
                stack.push(path.clone());
            }
            out.push(path);
        }
    }
    out.sort();
    out
}

/// `path` made absolute against `base`, with `.` and `..` resolved lexically.
fn absolute(base: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        clean(path)
    } else {
        clean(&base.join(path))
    }
}

/// `.` and `..` resolved lexically.
fn clean(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, bytes: &[u8]) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }

    fn entries(tree: &Tree, root: &Path) -> Vec<String> {
        tree.manifest
            .roots
            .iter()
            .find(|r| Path::new(&r.path) == root)
            .map(|r| r.entries.iter().map(|e| e.path.clone()).collect())
            .unwrap_or_default()
    }

    #[test]
    fn the_package_its_includes_and_its_target_files_travel() {
        let ws = tempfile::tempdir().unwrap();
        let ws = ws.path();
        let app = ws.join("app");
        write(
            &app.join("Cargo.toml"),
            br#"[package]
name = "app"
[package.metadata.dtf]
include = ["../shared/**/*.txt"]
exclude = ["fixtures/big/**"]
outputs = ["out/*.json"]
"#,
        );
        write(&app.join("src/main.rs"), b"fn main() {}");
        write(&app.join("src/bin/tool.rs"), b"fn main() {}");
        write(&app.join("fixtures/a.txt"), b"a");
        write(&app.join("fixtures/nested/b.txt"), b"b");
        write(&app.join("fixtures/big/huge.bin"), b"huge");
        write(&app.join(".gitignore"), b"ignored.txt\n");
        write(&app.join("ignored.txt"), b"no");
        write(&app.join(".git/HEAD"), b"ref");
        write(&app.join("sub/Cargo.toml"), b"[package]\nname = \"sub\"");
        write(&app.join("sub/data.txt"), b"nested package");
        std::os::unix::fs::symlink("a.txt", app.join("fixtures/link")).unwrap();
        write(&ws.join("shared/x/one.txt"), b"1");
        write(&ws.join("shared/x/two.bin"), b"2");
        let target = ws.join("target");
        write(&target.join("CACHEDIR.TAG"), b"Signature");
        write(&target.join("debug/app"), b"exe");
        write(&target.join("debug/tool"), b"exe2");
        write(&target.join("debug/other"), b"not ours");
        write(&target.join("debug/deps/app-0123"), b"test binary");
        write(&target.join("debug/build/app-1/out/gen.rs"), b"gen");

        let sources = Sources::new(
            target.join("debug/deps/app-0123"),
            app.clone(),
            Some(target.join("debug/build/app-1/out")),
            Some(target.join("tmp")),
        )
        .with_env(|name| match name {
            "DTF_INCLUDE" => Some("extra/*.dat".to_owned()),
            "LLVM_PROFILE_FILE" => Some(format!("{}/cov/app-%p-%16m.profraw", target.display())),
            _ => None,
        })
        .unwrap();
        assert_eq!(sources.target_dir.as_deref(), Some(target.as_path()));
        let tree = Tree::compute(&sources).unwrap();
        let app_entries = entries(&tree, &app);
        for want in [
            "Cargo.toml",
            ".gitignore",
            "fixtures",
            "fixtures/a.txt",
            "fixtures/nested/b.txt",
            "fixtures/link",
            "src/main.rs",
        ] {
            assert!(
                app_entries.contains(&want.to_owned()),
                "{want}: {app_entries:?}"
            );
        }
        for unwanted in [
            "ignored.txt",
            ".git/HEAD",
            "sub/data.txt",
            "fixtures/big/huge.bin",
        ] {
            assert!(
                !app_entries.iter().any(|e| e == unwanted),
                "{unwanted}: {app_entries:?}"
            );
        }
        assert_eq!(entries(&tree, &ws.join("shared")), ["x/one.txt"]);
        let target_entries = entries(&tree, &target);
        for want in [
            "debug/app",
            "debug/tool",
            "debug/build/app-1/out",
            "debug/build/app-1/out/gen.rs",
            "tmp",
            "cov",
        ] {
            assert!(
                target_entries.contains(&want.to_owned()),
                "{want}: {target_entries:?}"
            );
        }
        assert!(!target_entries.contains(&"debug/other".to_owned()));
        assert!(tree.contains(&app.join("fixtures/a.txt")));
        assert!(
            tree.manifest
                .outputs
                .contains(&format!("{}/cov/app-*-*.profraw", target.display()))
        );
        assert!(
            tree.manifest
                .outputs
                .contains(&format!("{}/out/*.json", app.display()))
        );
        assert!(
            tree.notes.iter().any(|n| n.contains("extra/*.dat")),
            "{:?}",
            tree.notes
        );
        tree.manifest.validate().unwrap();

        // Same files, same digest; one changed file, one new blob.
        let again = Tree::compute(&sources).unwrap();
        assert_eq!(again.digest, tree.digest);
        write(&app.join("fixtures/a.txt"), b"changed");
        let changed = Tree::compute(&sources).unwrap();
        assert_ne!(changed.digest, tree.digest);
        let new: Vec<_> = changed
            .blobs
            .keys()
            .filter(|d| !tree.blobs.contains_key(d))
            .collect();
        assert_eq!(new.len(), 1);
    }

    #[test]
    fn a_tree_over_the_cap_names_its_largest_entries() {
        let dir = tempfile::tempdir().unwrap();
        let app = dir.path().join("app");
        write(&app.join("Cargo.toml"), b"[package]\nname = \"app\"");
        write(&app.join("fixtures/big/blob.bin"), &[7u8; 4096]);
        write(&app.join("small.txt"), b"s");
        let sources = Sources::new(app.join("t"), app.clone(), None, None)
            .with_env(|n| (n == "DTF_INPUT_MAX").then(|| "1KiB".to_owned()))
            .unwrap();
        let err = Tree::compute(&sources).unwrap_err().to_string();
        assert!(err.contains("over the cap of 1024 bytes"), "{err}");
        assert!(err.contains("fixtures/big/blob.bin (4.0 KiB)"), "{err}");
        assert!(
            err.contains("exclude = [\"fixtures/**\"]") || err.contains("fixtures/big/**"),
            "{err}"
        );
        let bad = Sources::new(app.join("t"), app.clone(), None, None)
            .with_env(|n| (n == "DTF_INPUT_MAX").then(|| "lots".to_owned()));
        assert!(bad.unwrap_err().to_string().contains("DTF_INPUT_MAX"));
    }

    #[test]
    fn malformed_metadata_says_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        write(
            &dir.path().join("Cargo.toml"),
            b"[package]\nname = \"x\"\n[package.metadata.dtf]\ninclude = \"fixtures\"\n",
        );
        let sources = Sources::new(dir.path().join("t"), dir.path().to_path_buf(), None, None);
        let err = Tree::compute(&sources).unwrap_err().to_string();
        assert!(err.contains("include must be a list"), "{err}");
    }

    #[test]
    fn profile_names_become_globs() {
        assert_eq!(profile_glob("app-%p-%16m.profraw"), "app-*-*.profraw");
        assert_eq!(profile_glob("default_%m_%p.profraw"), "default_*_*.profraw");
        assert_eq!(profile_glob("a%%b"), "a%b");
        assert_eq!(glob_base(Path::new("/w/x/*/y")), Path::new("/w/x"));
        assert_eq!(
            clean(Path::new("/w/app/../fixtures/./a")),
            Path::new("/w/fixtures/a")
        );
    }
}
