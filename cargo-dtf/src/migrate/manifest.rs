//! What cargo says about a workspace's packages and targets (`cargo metadata`), the `harness`
//! flags of their manifests, and manifest edits through `toml_edit`.

use std::path::{Path, PathBuf};
use std::process::Command;

use toml_edit::{DocumentMut, InlineTable, Item, Table, Value};

/// The package dtf's library comes in.
pub const PACKAGE: &str = "dtf-harness";
/// The library's name, and the package name of a checkout's `dtf/` directory.
pub const LIBRARY: &str = "dtf";

/// The packages to migrate or scan.
pub struct Workspace {
    /// The workspace root.
    pub root: PathBuf,
    /// The manifest cargo was pointed at (the workspace's).
    pub manifest_path: PathBuf,
    /// The selected packages.
    pub packages: Vec<Package>,
}

/// One package.
pub struct Package {
    /// Its name.
    pub name: String,
    /// Its Cargo.toml.
    pub manifest_path: PathBuf,
    /// Its directory.
    pub root: PathBuf,
    /// Its targets.
    pub targets: Vec<Target>,
    /// The names its code knows dtf by (`dtf`, or a renamed dependency's name).
    pub dtf_names: Vec<String>,
}

/// The kinds of target that hold tests dtf can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetKind {
    /// The library's unit tests.
    Lib,
    /// A binary's unit tests.
    Bin,
    /// An integration test (`tests/*.rs`, `tests/*/main.rs`, `[[test]]`).
    Test,
    /// Examples, benches, build scripts, proc-macro libraries: left alone.
    Other,
}

impl TargetKind {
    /// True for the kinds migrate converts.
    pub fn has_tests(self) -> bool {
        self != TargetKind::Other
    }
}

/// One target.
pub struct Target {
    /// Its kind.
    pub kind: TargetKind,
    /// Its name.
    pub name: String,
    /// Its root source file.
    pub src_path: PathBuf,
    /// True when it runs libtest's harness (the default); false for `harness = false`.
    pub harness: bool,
}

impl Target {
    /// `lib`, `bin NAME`, `test NAME`.
    pub fn label(&self) -> String {
        match self.kind {
            TargetKind::Lib => "lib".to_owned(),
            TargetKind::Bin => format!("bin {}", self.name),
            TargetKind::Test => format!("test {}", self.name),
            TargetKind::Other => self.name.clone(),
        }
    }
}

/// Reads the workspace through `cargo metadata`, keeping the packages named in `select` (all
/// members when empty).
pub fn load(manifest_path: Option<&Path>, select: &[String]) -> Result<Workspace, String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["metadata", "--format-version", "1", "--no-deps"]);
    if let Some(path) = manifest_path {
        cmd.arg("--manifest-path").arg(path);
    }
    let output = cmd
        .output()
        .map_err(|e| format!("cannot run cargo metadata: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    from_metadata(&output.stdout, manifest_path, select)
}

/// The workspace as `metadata` (the output of `cargo metadata --format-version 1 --no-deps`
/// for `manifest_path`) describes it, with the packages named in `select` (all when empty).
pub fn from_metadata(
    metadata: &[u8],
    manifest_path: Option<&Path>,
    select: &[String],
) -> Result<Workspace, String> {
    let meta: serde_json::Value = serde_json::from_slice(metadata)
        .map_err(|e| format!("cannot read cargo metadata's output: {e}"))?;
    let root = PathBuf::from(meta["workspace_root"].as_str().unwrap_or("."));
    let mut packages = Vec::new();
    for p in meta["packages"].as_array().into_iter().flatten() {
        let name = p["name"].as_str().unwrap_or_default().to_owned();
        if !select.is_empty() && !select.contains(&name) {
            continue;
        }
        let manifest_path = PathBuf::from(p["manifest_path"].as_str().unwrap_or_default());
        let doc = read_doc(&manifest_path)?;
        let mut targets = Vec::new();
        for t in p["targets"].as_array().into_iter().flatten() {
            let kinds: Vec<&str> = t["kind"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|k| k.as_str())
                .collect();
            let kind = if kinds.contains(&"proc-macro") {
                TargetKind::Other
            } else if kinds.iter().any(|k| k.contains("lib")) {
                TargetKind::Lib
            } else if kinds.contains(&"bin") {
                TargetKind::Bin
            } else if kinds.contains(&"test") {
                TargetKind::Test
            } else {
                TargetKind::Other
            };
            let target_name = t["name"].as_str().unwrap_or_default().to_owned();
            let harness = harness_of(&doc, kind, &target_name);
            targets.push(Target {
                kind,
                name: target_name,
                src_path: PathBuf::from(t["src_path"].as_str().unwrap_or_default()),
                harness,
            });
        }
        let mut dtf_names: Vec<String> = p["dependencies"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|d| {
                // dtf-harness from anywhere, or a checkout's `dtf` package (path or git; the
                // registry's `dtf` is an unrelated crate).
                d["name"] == PACKAGE
                    || (d["name"] == LIBRARY
                        && d["source"]
                            .as_str()
                            .is_none_or(|source| source.starts_with("git+")))
            })
            .map(|d| d["rename"].as_str().unwrap_or("dtf").replace('-', "_"))
            .collect();
        if dtf_names.is_empty() {
            dtf_names.push("dtf".to_owned());
        }
        packages.push(Package {
            root: manifest_path
                .parent()
                .unwrap_or(Path::new("."))
                .to_path_buf(),
            name,
            manifest_path,
            targets,
            dtf_names,
        });
    }
    for wanted in select {
        if !packages.iter().any(|p| &p.name == wanted) {
            return Err(format!(
                "package `{wanted}` is not a member of the workspace at {}",
                root.display()
            ));
        }
    }
    let manifest_path = match manifest_path {
        Some(path) => path.to_path_buf(),
        None => root.join("Cargo.toml"),
    };
    Ok(Workspace {
        root,
        manifest_path,
        packages,
    })
}

fn read_doc(path: &Path) -> Result<DocumentMut, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    text.parse::<DocumentMut>()
        .map_err(|e| format!("cannot parse {}: {e}", path.display()))
}

/// The `harness` flag of a target in its manifest (true unless `harness = false`).
fn harness_of(doc: &DocumentMut, kind: TargetKind, name: &str) -> bool {
    let flag = |table: &dyn toml_edit::TableLike| {
        table.get("harness").and_then(Item::as_bool).unwrap_or(true)
    };
    match kind {
        TargetKind::Lib => doc
            .get("lib")
            .and_then(Item::as_table_like)
            .is_none_or(flag),
        TargetKind::Bin | TargetKind::Test => {
            let key = if kind == TargetKind::Bin {
                "bin"
            } else {
                "test"
            };
            doc.get(key)
                .and_then(Item::as_array_of_tables)
                .into_iter()
                .flat_map(|a| a.iter())
                .find(|t| t.get("name").and_then(Item::as_str) == Some(name))
                .is_none_or(|t| flag(t))
        }
        TargetKind::Other => true,
    }
}

/// A manifest being edited.
pub struct Manifest {
    original: String,
    doc: DocumentMut,
}

impl Manifest {
    /// Reads `path`.
    pub fn read(path: &Path) -> Result<Manifest, String> {
        let original = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let doc = original
            .parse::<DocumentMut>()
            .map_err(|e| format!("cannot parse {}: {e}", path.display()))?;
        Ok(Manifest { original, doc })
    }

    /// `harness = false` for `target`, declaring it when cargo found it on its own.
    pub fn set_harness_false(
        &mut self,
        target: &Target,
        package_root: &Path,
    ) -> Result<(), String> {
        match target.kind {
            TargetKind::Lib => {
                let lib = self
                    .doc
                    .entry("lib")
                    .or_insert_with(|| Item::Table(Table::new()));
                let Some(lib) = lib.as_table_like_mut() else {
                    return Err("`lib` in Cargo.toml is not a table".to_owned());
                };
                lib.insert("harness", toml_edit::value(false));
            }
            TargetKind::Bin | TargetKind::Test => {
                let key = if target.kind == TargetKind::Bin {
                    "bin"
                } else {
                    "test"
                };
                let entry = self
                    .doc
                    .entry(key)
                    .or_insert_with(|| Item::ArrayOfTables(Default::default()));
                let Some(array) = entry.as_array_of_tables_mut() else {
                    return Err(format!("`{key}` in Cargo.toml is not an array of tables"));
                };
                let existing = array
                    .iter()
                    .position(|t| t.get("name").and_then(Item::as_str) == Some(&target.name));
                match existing.and_then(|i| array.get_mut(i)) {
                    Some(table) => {
                        table.insert("harness", toml_edit::value(false));
                    }
                    None => {
                        let path = target
                            .src_path
                            .strip_prefix(package_root)
                            .unwrap_or(&target.src_path);
                        let mut table = Table::new();
                        table.insert("name", toml_edit::value(target.name.as_str()));
                        table.insert(
                            "path",
                            toml_edit::value(path.to_string_lossy().replace('\\', "/")),
                        );
                        table.insert("harness", toml_edit::value(false));
                        array.push(table);
                    }
                }
            }
            TargetKind::Other => {}
        }
        Ok(())
    }

    /// The dev-dependency on dtf, unless the package already depends on it.
    pub fn add_dev_dependency(&mut self, path: Option<&Path>, version: &str) -> Result<(), String> {
        let depends = ["dependencies", "dev-dependencies"].iter().any(|section| {
            self.doc
                .get(section)
                .and_then(Item::as_table_like)
                .is_some_and(|deps| {
                    deps.iter().any(|(key, dep)| {
                        let package = dep.get("package").and_then(Item::as_str);
                        key == PACKAGE
                            || package == Some(PACKAGE)
                            // A checkout's `dtf` package, by path or git.
                            || (package.unwrap_or(key) == LIBRARY
                                && (dep.get("path").is_some() || dep.get("git").is_some()))
                    })
                })
        });
        if depends {
            return Ok(());
        }
        let deps = self
            .doc
            .entry("dev-dependencies")
            .or_insert_with(|| Item::Table(Table::new()));
        let Some(deps) = deps.as_table_like_mut() else {
            return Err("`dev-dependencies` in Cargo.toml is not a table".to_owned());
        };
        if deps.contains_key("dtf") {
            return Err(
                "the package has a dev-dependency called `dtf` that is not dtf-harness (the \
                 `dtf` crate on crates.io is an unrelated one); remove it and run again"
                    .to_owned(),
            );
        }
        let mut dep = InlineTable::new();
        match path {
            Some(path) => {
                let path = std::fs::canonicalize(path)
                    .map_err(|e| format!("--dtf-path {}: {e}", path.display()))?;
                // A checkout has the library as two packages: `dtf` in dtf/ and the published
                // `dtf-harness` in dtf-harness/. Name the one PATH holds.
                let manifest = std::fs::read_to_string(path.join("Cargo.toml")).map_err(|e| {
                    format!(
                        "--dtf-path {}: cannot read its Cargo.toml ({e}): point it at the `dtf` \
                         directory of a checkout",
                        path.display()
                    )
                })?;
                let name = manifest
                    .parse::<DocumentMut>()
                    .ok()
                    .and_then(|doc| Some(doc.get("package")?.get("name")?.as_str()?.to_owned()));
                match name.as_deref() {
                    Some(LIBRARY) => {}
                    Some(PACKAGE) => {
                        dep.insert("package", Value::from(PACKAGE));
                    }
                    other => {
                        return Err(format!(
                            "--dtf-path {} holds {}, not dtf: point it at the `dtf` directory of \
                             a checkout",
                            path.display(),
                            other.map_or("no package".to_owned(), |n| format!("the package `{n}`"))
                        ));
                    }
                }
                dep.insert("path", Value::from(path.to_string_lossy().as_ref()));
            }
            None => {
                dep.insert("package", Value::from(PACKAGE));
                dep.insert("version", Value::from(version));
            }
        }
        deps.insert("dtf", Item::Value(Value::InlineTable(dep)));
        Ok(())
    }

    /// `(before, after)` when anything changed.
    pub fn changed(&self) -> Option<(String, String)> {
        let now = self.doc.to_string();
        (now != self.original).then(|| (self.original.clone(), now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(text: &str) -> Manifest {
        Manifest {
            original: text.to_owned(),
            doc: text.parse().unwrap(),
        }
    }

    #[test]
    fn harness_flags_declared_targets_and_dependency_keep_comments() {
        let text =
            "[package]\nname = \"p\" # the name\n\n[[test]]\nname = \"a\"\npath = \"tests/a.rs\"\n";
        let mut m = manifest(text);
        let root = Path::new("/p");
        let test = |name: &str, path: &str| Target {
            kind: TargetKind::Test,
            name: name.to_owned(),
            src_path: PathBuf::from(path),
            harness: true,
        };
        m.set_harness_false(&test("a", "/p/tests/a.rs"), root)
            .unwrap();
        m.set_harness_false(&test("b", "/p/tests/b/main.rs"), root)
            .unwrap();
        m.set_harness_false(
            &Target {
                kind: TargetKind::Lib,
                name: "p".to_owned(),
                src_path: PathBuf::from("/p/src/lib.rs"),
                harness: true,
            },
            root,
        )
        .unwrap();
        m.add_dev_dependency(None, "0.1.0").unwrap();
        let (_, after) = m.changed().unwrap();
        assert!(after.contains("name = \"p\" # the name"), "{after}");
        assert!(
            after.contains("[[test]]\nname = \"a\"\npath = \"tests/a.rs\"\nharness = false\n"),
            "{after}"
        );
        assert!(
            after.contains("[[test]]\nname = \"b\"\npath = \"tests/b/main.rs\"\nharness = false\n"),
            "{after}"
        );
        assert!(after.contains("[lib]\nharness = false\n"), "{after}");
        assert!(
            after.contains("dtf = { package = \"dtf-harness\", version = \"0.1.0\" }"),
            "{after}"
        );
        let doc: DocumentMut = after.parse().unwrap();
        assert!(!harness_of(&doc, TargetKind::Test, "a"));
        assert!(!harness_of(&doc, TargetKind::Lib, "p"));
        assert!(harness_of(&doc, TargetKind::Bin, "p"));
    }

    #[test]
    fn dtf_path_names_the_package_the_checkout_directory_holds() {
        let checkout = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let mut m = manifest("[package]\nname = \"p\"\n");
        m.add_dev_dependency(Some(&checkout.join("dtf")), "0.1.0")
            .unwrap();
        let (_, after) = m.changed().unwrap();
        let doc: DocumentMut = after.parse().unwrap();
        let dep = &doc["dev-dependencies"]["dtf"];
        assert!(dep.get("package").is_none(), "{after}");
        assert!(dep["path"].as_str().unwrap().ends_with("/dtf"), "{after}");

        let mut m = manifest("[package]\nname = \"p\"\n");
        m.add_dev_dependency(Some(&checkout.join("dtf-harness")), "0.1.0")
            .unwrap();
        let (_, after) = m.changed().unwrap();
        assert!(after.contains("package = \"dtf-harness\""), "{after}");

        let mut m = manifest("[package]\nname = \"p\"\n");
        let err = m
            .add_dev_dependency(Some(&checkout.join("dtf-macros")), "0.1.0")
            .unwrap_err();
        assert!(err.contains("the package `dtf-macros`, not dtf"), "{err}");

        // A checkout's `dtf` by path counts as depending on dtf already.
        let mut m = manifest(
            "[package]\nname = \"p\"\n[dev-dependencies]\ndtf = { path = \"../dtf/dtf\" }\n",
        );
        m.add_dev_dependency(None, "0.1.0").unwrap();
        assert!(m.changed().is_none());
    }

    #[test]
    fn an_existing_dependency_is_kept() {
        let mut m = manifest(
            "[dev-dependencies]\nharnessx = { package = \"dtf-harness\", path = \"../dtf\" }\n",
        );
        m.add_dev_dependency(None, "0.1.0").unwrap();
        assert!(m.changed().is_none());
        let mut m = manifest("[dev-dependencies]\ndtf = \"0.1\"\n");
        assert!(
            m.add_dev_dependency(None, "0.1.0")
                .unwrap_err()
                .contains("unrelated")
        );
    }
}
