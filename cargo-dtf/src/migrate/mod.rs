//! `cargo dtf migrate`: moves a package's tests onto dtf without losing one, and the source
//! scanner that names the test functions dtf would not run.
//!
//! Sources are edited at the places `syn` spans point to and manifests through `toml_edit`,
//! so formatting and comments stay as they were. The migration checks itself: it lists the tests
//! of every test target before (libtest's `--list`) and after (dtf's `--list`), and puts every
//! file back when a test would be lost or renamed.

mod edit;
mod manifest;
mod scan;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use clap::Args as ClapArgs;

use edit::{Edit, Lines};
use manifest::TargetKind;
use scan::Marker;

/// The arguments of `cargo dtf migrate`.
#[derive(Debug, Default, ClapArgs)]
pub struct Args {
    /// Migrate only this package (repeatable; default: every workspace member).
    #[arg(short = 'p', long = "package", value_name = "SPEC")]
    pub packages: Vec<String>,
    /// Print the changes as a diff and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Change nothing; name every test function that dtf would not run in a harness = false
    /// target, and exit 1 if there is any.
    #[arg(long)]
    pub check: bool,
    /// Migrate even when the git working tree has uncommitted changes (or no git at all).
    #[arg(long)]
    pub allow_dirty: bool,
    /// Depend on a dtf checkout at PATH instead of the published dtf-harness package.
    #[arg(long, value_name = "PATH")]
    pub dtf_path: Option<PathBuf>,
    /// The workspace's or package's Cargo.toml.
    #[arg(long, value_name = "PATH")]
    pub manifest_path: Option<PathBuf>,
}

/// A test function that dtf will not run, found in the sources of a `harness = false` target.
#[derive(Clone, Debug)]
pub struct Unrunnable {
    /// The package.
    pub package: String,
    /// The target (`lib`, `bin NAME`, `test NAME`).
    pub target: String,
    /// The file the function is written in.
    pub file: PathBuf,
    /// The line of its name.
    pub line: usize,
    /// Its path inside the target (`module::name`).
    pub test: String,
    /// Why dtf does not run it, and what to change.
    pub reason: String,
}

impl std::fmt::Display for Unrunnable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}: `{}` ({} {}) will not run: {}",
            self.file.display(),
            self.line,
            self.test,
            self.package,
            self.target,
            self.reason
        )
    }
}

/// Finds, from the sources, the test functions of `harness = false` targets that dtf will not
/// run: `#[test]` outside a module that imports `dtf::test`, `#[tokio::test]`, `#[test_case]`,
/// `#[rstest]` without `#[dtf::test]`, other crates' test attributes, `#[test]` inside macro
/// invocations. `packages` empty means every workspace member. The run path of `cargo dtf`
/// calls this before a run and fails on what it returns (unless `--allow-unrunnable`).
pub fn unrunnable(
    manifest_path: Option<&Path>,
    packages: &[String],
) -> Result<Vec<Unrunnable>, String> {
    unrunnable_in(&manifest::load(manifest_path, packages)?)
}

/// [`unrunnable`] of the `packages` that `metadata` (`cargo metadata`'s output, read already)
/// describes.
pub fn unrunnable_of(
    metadata: &[u8],
    manifest_path: Option<&Path>,
    packages: &[String],
) -> Result<Vec<Unrunnable>, String> {
    unrunnable_in(&manifest::from_metadata(metadata, manifest_path, packages)?)
}

fn unrunnable_in(workspace: &manifest::Workspace) -> Result<Vec<Unrunnable>, String> {
    let mut found = Vec::new();
    for package in &workspace.packages {
        for target in &package.targets {
            if target.harness || !target.kind.has_tests() {
                continue;
            }
            let scanned =
                scan::scan_target(&target.src_path, &package.dtf_names).map_err(|e| e.0)?;
            for test in scanned.tests {
                if let Some(reason) = test.why_unrunnable() {
                    found.push(Unrunnable {
                        package: package.name.clone(),
                        target: target.label(),
                        file: relative(&test.file, &workspace.root),
                        line: test.line,
                        test: test.name,
                        reason,
                    });
                }
            }
        }
    }
    Ok(found)
}

/// The check `cargo dtf` makes before a run: every test function [`unrunnable`] finds is
/// printed to stderr with its file and line; then the run is refused (`Err`) unless
/// `allow_unrunnable` (`--allow-unrunnable`), in which case they are only warned about.
#[allow(dead_code)] // called by the run path of `cargo dtf`
pub fn refuse_unrunnable(
    manifest_path: Option<&Path>,
    packages: &[String],
    allow_unrunnable: bool,
) -> Result<(), String> {
    let found = unrunnable(manifest_path, packages)?;
    if found.is_empty() {
        return Ok(());
    }
    let level = if allow_unrunnable { "warning" } else { "error" };
    for f in &found {
        eprintln!("{level}: {f}");
    }
    if allow_unrunnable {
        eprintln!(
            "warning: {} test function(s) will not run (--allow-unrunnable)",
            found.len()
        );
        return Ok(());
    }
    Err(format!(
        "{} test function(s) in harness = false targets would not run under dtf (listed above); \
         `cargo dtf migrate` converts them, or pass --allow-unrunnable to run the rest",
        found.len()
    ))
}

/// Runs `cargo dtf migrate`; returns the exit code.
pub fn run(args: Args) -> Result<i32, String> {
    if args.check {
        return check(&args);
    }
    let workspace = manifest::load(args.manifest_path.as_deref(), &args.packages)?;
    if !args.dry_run && !args.allow_dirty {
        refuse_dirty(&workspace.root)?;
    }
    let plan = plan(&workspace, &args)?;
    if plan.changes.is_empty() {
        println!("cargo dtf migrate: nothing to change; every test target already runs under dtf");
        return Ok(0);
    }
    if args.dry_run {
        for change in &plan.changes {
            print_diff(change, &workspace.root);
        }
        return Ok(0);
    }

    let packages: Vec<String> = workspace.packages.iter().map(|p| p.name.clone()).collect();
    let manifest = workspace.manifest_path.clone();
    eprintln!("cargo dtf migrate: listing the tests before (libtest)");
    let before = list_tests(&manifest, &packages)
        .map_err(|e| format!("cannot list the tests before migrating: {e}"))?;
    for change in &plan.changes {
        write(&change.path, &change.new)?;
    }
    eprintln!("cargo dtf migrate: listing the tests after (dtf)");
    let after = match list_tests(&manifest, &packages) {
        Ok(after) => after,
        Err(e) => {
            restore(&plan.changes);
            return Err(format!(
                "the migrated package does not build, so every file was put back: {e}"
            ));
        }
    };
    let comparison = compare(&before, &after);
    if !comparison.lost.is_empty() {
        restore(&plan.changes);
        eprintln!(
            "error: the migration would lose or rename these tests, so every file was put back:"
        );
        for line in &comparison.lost {
            eprintln!("  lost: {line}");
        }
        for line in &comparison.gained {
            eprintln!("  new (renamed?): {line}");
        }
        return Ok(1);
    }
    let count: usize = before.values().map(BTreeSet::len).sum();
    for change in &plan.changes {
        println!(
            "migrated {}",
            relative(&change.path, &workspace.root).display()
        );
    }
    println!(
        "cargo dtf migrate: the {count} tests listed before are listed after, under the same names; `cargo test` runs them under dtf"
    );
    if !comparison.gained.is_empty() {
        println!(
            "cargo dtf migrate: {} more test(s) now run that were not listed before (harness = false targets had dropped them):",
            comparison.gained.len()
        );
        for line in &comparison.gained {
            println!("  {line}");
        }
    }
    Ok(0)
}

/// `--check`: names what dtf would not run; 1 when there is any.
fn check(args: &Args) -> Result<i32, String> {
    let found = unrunnable(args.manifest_path.as_deref(), &args.packages)?;
    if found.is_empty() {
        println!(
            "cargo dtf migrate --check: every test function of the harness = false targets runs under dtf"
        );
        return Ok(0);
    }
    for f in &found {
        println!("{f}");
    }
    println!(
        "cargo dtf migrate --check: {} test function(s) that dtf will not run; `cargo dtf migrate` converts them",
        found.len()
    );
    Ok(1)
}

/// One file's new contents.
struct Change {
    path: PathBuf,
    old: String,
    new: String,
}

/// Every change the migration makes, or the tests it cannot convert.
struct Plan {
    changes: Vec<Change>,
}

/// Works out every edit; changes nothing.
fn plan(workspace: &manifest::Workspace, args: &Args) -> Result<Plan, String> {
    let mut changes: Vec<Change> = Vec::new();
    let mut problems: Vec<String> = Vec::new();
    for package in &workspace.packages {
        let mut doc = manifest::Manifest::read(&package.manifest_path)?;
        let dtf = package
            .dtf_names
            .first()
            .cloned()
            .unwrap_or_else(|| "dtf".to_owned());
        let mut migrated_any = false;
        for target in &package.targets {
            if !target.kind.has_tests() {
                continue;
            }
            let scanned =
                scan::scan_target(&target.src_path, &package.dtf_names).map_err(|e| e.0)?;
            let needs_work = scanned.tests.iter().any(|t| t.marker != Marker::Dtf);
            if scanned.tests.is_empty() || (!needs_work && !target.harness) {
                continue;
            }
            migrated_any = true;
            let mut edits: BTreeMap<PathBuf, Vec<Edit>> = BTreeMap::new();
            for test in &scanned.tests {
                let Some(file) = scanned.files.iter().find(|f| f.path == test.file) else {
                    continue;
                };
                let lines = Lines::new(&file.text);
                let list = edits.entry(test.file.clone()).or_default();
                match convert(test, &lines, &dtf) {
                    Ok(edits) => list.extend(edits),
                    Err(why) => problems.push(format!(
                        "{}:{}: `{}`: {why}",
                        relative(&test.file, &workspace.root).display(),
                        test.line,
                        test.name
                    )),
                }
            }
            let root = &scanned.files[0];
            let root_edits = edits.entry(root.path.clone()).or_default();
            root_edits.extend(main_edits(&root.syntax, &root.text, target.kind, &dtf));
            for (path, list) in edits {
                if list.is_empty() {
                    continue;
                }
                let old = match changes.iter().find(|c| c.path == path) {
                    Some(change) => change.new.clone(),
                    None => std::fs::read_to_string(&path)
                        .map_err(|e| format!("cannot read {}: {e}", path.display()))?,
                };
                let new = edit::apply(&old, &list);
                match changes.iter_mut().find(|c| c.path == path) {
                    Some(change) => change.new = new,
                    None => changes.push(Change { path, old, new }),
                }
            }
            if target.harness {
                doc.set_harness_false(target, &package.root)?;
            }
        }
        if migrated_any {
            doc.add_dev_dependency(args.dtf_path.as_deref(), env!("CARGO_PKG_VERSION"))?;
        }
        if let Some((old, new)) = doc.changed() {
            changes.push(Change {
                path: package.manifest_path.clone(),
                old,
                new,
            });
        }
    }
    if !problems.is_empty() {
        return Err(format!(
            "these tests cannot be converted, so nothing was changed:\n  {}",
            problems.join("\n  ")
        ));
    }
    Ok(Plan { changes })
}

/// The edit that makes one test a dtf test (`None` when it already is one).
fn convert(test: &scan::Found, lines: &Lines<'_>, dtf: &str) -> Result<Vec<Edit>, String> {
    let replace_path = |text: String| -> Option<Edit> {
        let (start, end) = lines.range(test.attr_path?);
        Some(Edit { start, end, text })
    };
    let one = |edit: Option<Edit>| edit.into_iter().collect::<Vec<Edit>>();
    match &test.marker {
        Marker::Dtf => Ok(Vec::new()),
        Marker::LibtestTest | Marker::AmbiguousTest => {
            Ok(one(replace_path(format!("{dtf}::test"))))
        }
        Marker::TokioTest(tokens) => {
            let tokens: proc_macro2::TokenStream = tokens
                .parse()
                .map_err(|e| format!("cannot read the options of `#[tokio::test]`: {e}"))?;
            check_tokio_options(tokens)?;
            Ok(one(replace_path(format!("{dtf}::test"))))
        }
        Marker::TestCase | Marker::Rstest => {
            let start = lines.offset(test.after_attrs.start());
            let indent = lines.indent_at(start);
            let mut edits = vec![Edit {
                start,
                end: start,
                text: format!("#[{dtf}::test]\n{indent}"),
            }];
            // test-case gives each case of a plain `fn` libtest's `#[test]` itself (which a
            // harness = false target drops), and hands the function's other attributes to the
            // cases only for an `async fn`: the function becomes `async`, and `#[dtf::test]`
            // runs each case on a runtime of its own.
            if let (Marker::TestCase, Some((fn_token, false))) = (&test.marker, test.fn_token) {
                let at = lines.offset(fn_token.start());
                edits.push(Edit {
                    start: at,
                    end: at,
                    text: "async ".to_owned(),
                });
            }
            Ok(edits)
        }
        Marker::Other(path) => Err(format!(
            "`#[{path}]` has no dtf equivalent; rewrite it as `#[{dtf}::test]` by hand"
        )),
        Marker::InMacro(mac) => Err(format!(
            "a `#[test]` inside `{mac}!` cannot be rewritten from the outside; write `#[{dtf}::test]` inside the macro by hand"
        )),
    }
}

/// `#[tokio::test(...)]` options dtf's attribute takes under the same names.
fn check_tokio_options(tokens: proc_macro2::TokenStream) -> Result<(), String> {
    use syn::parse::Parser;
    let mut unknown = Vec::new();
    let parser = syn::meta::parser(|meta| {
        let name = scan::path_string(&meta.path);
        if !matches!(name.as_str(), "flavor" | "worker_threads" | "start_paused") {
            unknown.push(name);
        }
        if meta.input.peek(syn::Token![=]) {
            meta.value()?.parse::<syn::Expr>()?;
        }
        Ok(())
    });
    parser
        .parse2(tokens)
        .map_err(|e| format!("cannot read the options of `#[tokio::test]`: {e}"))?;
    match unknown.is_empty() {
        true => Ok(()),
        false => Err(format!(
            "`#[tokio::test]` option(s) {} have no dtf equivalent (dtf takes flavor, worker_threads and start_paused)",
            unknown.join(", ")
        )),
    }
}

/// `dtf::main!()` where the target needs it, and `#[cfg(not(test))]` on a binary's `fn main`.
fn main_edits(syntax: &syn::File, text: &str, kind: TargetKind, dtf: &str) -> Vec<Edit> {
    let has_main_macro = syntax.items.iter().any(|item| match item {
        syn::Item::Macro(m) => m
            .mac
            .path
            .segments
            .last()
            .is_some_and(|s| s.ident == "main"),
        _ => false,
    });
    let mut edits = Vec::new();
    if kind == TargetKind::Bin {
        let lines = Lines::new(text);
        for item in &syntax.items {
            let syn::Item::Fn(function) = item else {
                continue;
            };
            if function.sig.ident != "main" {
                continue;
            }
            let already = function.attrs.iter().any(|a| {
                a.path().is_ident("cfg")
                    && quote::ToTokens::to_token_stream(&a.meta)
                        .to_string()
                        .replace(' ', "")
                        == "cfg(not(test))"
            });
            if !already {
                let start = lines.offset(syn::spanned::Spanned::span(function).start());
                edits.push(Edit {
                    start,
                    end: start,
                    text: "#[cfg(not(test))]\n".to_owned(),
                });
            }
        }
    }
    if !has_main_macro {
        let sep = if text.ends_with('\n') || text.is_empty() {
            ""
        } else {
            "\n"
        };
        let main = match kind {
            TargetKind::Test => format!("{sep}\n{dtf}::main!();\n"),
            _ => format!("{sep}\n#[cfg(test)]\n{dtf}::main!();\n"),
        };
        edits.push(Edit {
            start: text.len(),
            end: text.len(),
            text: main,
        });
    }
    edits
}

/// Refuses a git working tree with uncommitted changes, as `cargo fix` does.
fn refuse_dirty(root: &Path) -> Result<(), String> {
    let output = Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=all"])
        .current_dir(root)
        .output();
    let output = match output {
        Ok(o) if o.status.success() => o,
        _ => {
            return Err(format!(
                "{} is not in a git working tree, so the migration could not be undone with git; \
                 commit it to git first, or pass --allow-dirty",
                root.display()
            ));
        }
    };
    let dirty: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|l| l.get(3..).unwrap_or(l).to_owned())
        .collect();
    if dirty.is_empty() {
        return Ok(());
    }
    let mut shown: Vec<String> = dirty
        .iter()
        .take(10)
        .map(|f| format!("  {}", f.escape_debug()))
        .collect();
    if dirty.len() > 10 {
        shown.push(format!("  ... and {} more", dirty.len() - 10));
    }
    Err(format!(
        "the working tree has uncommitted changes, which the migration would mix with its own:\n{}\n\
         commit or stash them first, or pass --allow-dirty",
        shown.join("\n")
    ))
}

/// Prints a unified diff of one change.
fn print_diff(change: &Change, root: &Path) {
    let name = relative(&change.path, root).display().to_string();
    let diff = similar::TextDiff::from_lines(&change.old, &change.new);
    print!(
        "{}",
        diff.unified_diff()
            .context_radius(3)
            .header(&format!("a/{name}"), &format!("b/{name}"))
    );
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Puts every changed file back as it was.
fn restore(changes: &[Change]) {
    for change in changes {
        if let Err(e) = std::fs::write(&change.path, &change.old) {
            eprintln!(
                "error: cannot restore {}: {e}; `git checkout -- {}` does",
                change.path.display(),
                change.path.display()
            );
        }
    }
}

/// What the lists before and after say: tests listed before and missing after (lost, or
/// renamed), and tests listed only after (which the target had but did not run).
struct Comparison {
    lost: Vec<String>,
    gained: Vec<String>,
}

/// Compares the lists of each target, before and after.
fn compare(
    before: &BTreeMap<String, BTreeSet<String>>,
    after: &BTreeMap<String, BTreeSet<String>>,
) -> Comparison {
    let empty = BTreeSet::new();
    let mut result = Comparison {
        lost: Vec::new(),
        gained: Vec::new(),
    };
    for (target, names) in before {
        let now = after.get(target).unwrap_or(&empty);
        for name in names.difference(now) {
            result.lost.push(format!("{target}: {name}"));
        }
    }
    for (target, names) in after {
        let then = before.get(target).unwrap_or(&empty);
        for name in names.difference(then) {
            result.gained.push(format!("{target}: {name}"));
        }
    }
    result
}

/// How long one `--list` may take.
const LIST_LIMIT: Duration = Duration::from_secs(120);

/// Builds the test targets of `packages` and lists each one's tests, keyed by
/// `package kind name`.
pub(crate) fn list_tests(
    manifest_path: &Path,
    packages: &[String],
) -> Result<BTreeMap<String, BTreeSet<String>>, String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.args(["test", "--no-run", "--tests", "--message-format=json"])
        .arg("--manifest-path")
        .arg(manifest_path);
    for p in packages {
        cmd.args(["-p", p]);
    }
    let output = cmd.output().map_err(|e| format!("cannot run cargo: {e}"))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(30).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(format!(
            "`cargo test --no-run` failed:\n{}",
            tail.join("\n")
        ));
    }
    let mut lists = BTreeMap::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if message["reason"] != "compiler-artifact" || message["profile"]["test"] != true {
            continue;
        }
        let Some(exe) = message["executable"].as_str() else {
            continue;
        };
        let kind = message["target"]["kind"][0].as_str().unwrap_or("?");
        let kind = if kind.contains("lib") { "lib" } else { kind };
        let name = message["target"]["name"].as_str().unwrap_or("?");
        let package = message["package_id"].as_str().unwrap_or("?");
        let package = package_name(package);
        let cwd = message["manifest_path"]
            .as_str()
            .and_then(|m| Path::new(m).parent())
            .map(Path::to_path_buf);
        let names = list_binary(Path::new(exe), cwd.as_deref())?;
        lists.insert(format!("{package} {kind} {name}"), names);
    }
    Ok(lists)
}

/// The package name in a cargo package id (`path+file:///x/y#name@0.1.0` or `name 0.1.0 (...)`).
fn package_name(id: &str) -> String {
    if let Some((_, tail)) = id.rsplit_once('#') {
        let name = tail.split('@').next().unwrap_or(tail);
        // `#0.1.0` alone: the name is the last path segment.
        if name.chars().next().is_some_and(|c| c.is_ascii_digit()) {
            let path = id.rsplit_once('#').map_or(id, |(p, _)| p);
            return path.rsplit('/').next().unwrap_or(path).to_owned();
        }
        return name.to_owned();
    }
    id.split(' ').next().unwrap_or(id).to_owned()
}

/// Runs `EXE --list --format terse` and returns the test names.
fn list_binary(exe: &Path, cwd: Option<&Path>) -> Result<BTreeSet<String>, String> {
    let mut cmd = Command::new(exe);
    cmd.args(["--list", "--format", "terse"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    if let Some(cwd) = cwd {
        cmd.current_dir(cwd);
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", exe.display()))?;
    let started = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if started.elapsed() > LIST_LIMIT => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{} --list did not finish within {}s",
                    exe.display(),
                    LIST_LIMIT.as_secs()
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("cannot wait for {}: {e}", exe.display())),
        }
    }
    let output = child
        .wait_with_output()
        .map_err(|e| format!("cannot read {}'s list: {e}", exe.display()))?;
    if !output.status.success() {
        return Err(format!(
            "{} --list failed: {}",
            exe.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .map(str::to_owned)
        .collect())
}

/// `path` relative to `root` where it lies below it.
fn relative(path: &Path, root: &Path) -> PathBuf {
    path.strip_prefix(root).unwrap_or(path).to_path_buf()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_ids_of_both_formats() {
        assert_eq!(package_name("path+file:///tmp/x/shell#0.1.0"), "shell");
        assert_eq!(package_name("path+file:///tmp/x/a#shell@0.1.0"), "shell");
        assert_eq!(package_name("shell 0.1.0 (path+file:///tmp/x)"), "shell");
    }

    #[test]
    fn tokio_options_dtf_lacks_are_refused() {
        use quote::quote;
        assert!(check_tokio_options(quote!(flavor = "multi_thread", worker_threads = 2)).is_ok());
        assert!(check_tokio_options(quote!(start_paused = true)).is_ok());
        let error = check_tokio_options(quote!(crate = "other_tokio")).unwrap_err();
        assert!(error.contains("crate"), "{error}");
    }

    #[test]
    fn a_lost_and_a_renamed_test_are_both_named() {
        let set = |names: &[&str]| names.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        let before = BTreeMap::from([("p test t".to_owned(), set(&["a", "b", "c"]))]);
        let after = BTreeMap::from([("p test t".to_owned(), set(&["a", "c2", "c"]))]);
        let comparison = compare(&before, &after);
        assert_eq!(comparison.lost, ["p test t: b"]);
        assert_eq!(comparison.gained, ["p test t: c2"]);
        let comparison = compare(&before, &before);
        assert!(comparison.lost.is_empty() && comparison.gained.is_empty());
    }
}
