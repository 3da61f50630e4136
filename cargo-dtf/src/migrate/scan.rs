//! Reads a target's sources (the root file and every `mod NAME;` file it reaches) and finds its
//! test functions: which attribute makes each one a test, and whether dtf runs it.
//!
//! This is what makes "no silent loss" checkable: in a `harness = false` target, rustc drops
//! every libtest `#[test]` (and everything that expands to one: `#[tokio::test]`,
//! `#[test_case]`, `#[rstest]`, `proptest! { #[test] ... }`), so the only way to know they are
//! there is to read the sources.

use std::path::{Path, PathBuf};

use proc_macro2::{TokenStream, TokenTree};
use syn::spanned::Spanned;
use syn::{Attribute, Item, ItemFn, UseTree};

/// How a test function is marked, as far as dtf is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Marker {
    /// `#[dtf::test]` (or the dependency's renamed path), or `#[test]` where `test` is dtf's.
    Dtf,
    /// `#[test]` where `test` is libtest's built-in attribute.
    LibtestTest,
    /// `#[test]` in a module whose `test` comes only from a glob import (`use super::*;` below a
    /// module with `use dtf::test;`): rustc rejects it as ambiguous (E0659).
    AmbiguousTest,
    /// `#[tokio::test(...)]`, with the tokens inside its parentheses.
    TokioTest(String),
    /// `#[test_case(...)]` (one or more), without a dtf attribute.
    TestCase,
    /// `#[rstest]`, without a dtf attribute.
    Rstest,
    /// Another crate's test attribute (`#[async_std::test]`, `#[test_log::test]`, ...), by path.
    Other(String),
    /// A `#[test]` inside a macro invocation (`proptest! { #[test] fn ... }`), by macro name.
    InMacro(String),
}

/// One test function found in the sources.
#[derive(Clone, Debug)]
pub struct Found {
    /// The file it is written in.
    pub file: PathBuf,
    /// The line of its name (1-based).
    pub line: usize,
    /// Its path inside the target, as libtest names it (`module::name`).
    pub name: String,
    /// What makes it a test.
    pub marker: Marker,
    /// The span of the attribute's path that makes it a test (`test` in `#[test]`,
    /// `tokio::test` in `#[tokio::test(...)]`), where there is one to rewrite.
    pub attr_path: Option<proc_macro2::Span>,
    /// Where the function's first token after its attributes starts (`pub`, `async`, `fn`).
    pub after_attrs: proc_macro2::Span,
    /// The `fn` keyword, and whether the function is already `async`.
    pub fn_token: Option<(proc_macro2::Span, bool)>,
}

impl Found {
    /// Why dtf does not run this test in a `harness = false` target, or `None` when it does.
    pub fn why_unrunnable(&self) -> Option<String> {
        Some(match &self.marker {
            Marker::Dtf => return None,
            Marker::LibtestTest => {
                "`#[test]` here is libtest's attribute, which a harness = false \
                target drops: write `#[dtf::test]`, or `use dtf::test;` in this module"
                    .to_owned()
            }
            Marker::AmbiguousTest => "`#[test]` here is ambiguous (E0659): `test` comes from a \
                glob import and from the prelude; add `use dtf::test;` to this module"
                .to_owned(),
            Marker::TokioTest(_) => "`#[tokio::test]` expands to libtest's `#[test]`, which a \
                harness = false target drops: write `#[dtf::test]` on the async fn (it takes \
                `flavor`, `worker_threads` and `start_paused`)"
                .to_owned(),
            Marker::TestCase => "`#[test_case]` expands to libtest's `#[test]`, which a harness = \
                false target drops: add `#[dtf::test]` below the `#[test_case]` lines"
                .to_owned(),
            Marker::Rstest => {
                "`#[rstest]` expands to libtest's `#[test]`, which a harness = false \
                target drops: add `#[dtf::test]` below `#[rstest]`"
                    .to_owned()
            }
            Marker::Other(path) => format!(
                "`#[{path}]` expands to libtest's `#[test]`, which a harness = false target drops"
            ),
            Marker::InMacro(mac) => {
                format!("a `#[test]` inside `{mac}!`, which a harness = false target drops")
            }
        })
    }
}

/// A source file that could not be read or parsed.
#[derive(Debug)]
pub struct ScanError(pub String);

/// The sources of one target, parsed.
pub struct Target {
    /// Every file of the target, with its text and parsed form, root first.
    pub files: Vec<SourceFile>,
    /// Every test function, in file order.
    pub tests: Vec<Found>,
}

/// One parsed source file.
pub struct SourceFile {
    /// Its path.
    pub path: PathBuf,
    /// Its text.
    pub text: String,
    /// Its syntax tree.
    pub syntax: syn::File,
}

/// What the scan knows about a module while it walks it.
#[derive(Clone)]
struct Scope {
    /// The module's path inside the target (empty at the root).
    path: Vec<String>,
    /// Where `mod NAME;` files of this module live.
    dir: PathBuf,
    /// `test` in this module is dtf's by an explicit `use`.
    explicit_test: bool,
    /// `test` could come into this module through `use super::*;` from a module where it is dtf's.
    glob_test: bool,
}

/// Parses `root` and every module file it declares, and collects the test functions.
///
/// `dtf_names` are the names the package knows dtf by (`dtf`, or a renamed dependency).
pub fn scan_target(root: &Path, dtf_names: &[String]) -> Result<Target, ScanError> {
    let mut target = Target {
        files: Vec::new(),
        tests: Vec::new(),
    };
    let dir = root.parent().unwrap_or(Path::new(".")).to_path_buf();
    let scope = Scope {
        path: Vec::new(),
        dir,
        explicit_test: false,
        glob_test: false,
    };
    scan_file(root, scope, dtf_names, &mut target, 0)?;
    Ok(target)
}

/// How deep `mod` files may nest: a guard against `#[path]` cycles.
const MAX_DEPTH: usize = 64;

fn scan_file(
    path: &Path,
    scope: Scope,
    dtf_names: &[String],
    target: &mut Target,
    depth: usize,
) -> Result<(), ScanError> {
    if depth > MAX_DEPTH || target.files.iter().any(|f| f.path == path) {
        return Ok(());
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| ScanError(format!("cannot read {}: {e}", path.display())))?;
    let syntax = syn::parse_file(&text)
        .map_err(|e| ScanError(format!("cannot parse {}: {e}", path.display())))?;
    let items = syntax.items.clone();
    target.files.push(SourceFile {
        path: path.to_path_buf(),
        text,
        syntax,
    });
    scan_items(path, &items, scope, dtf_names, target, depth)
}

fn scan_items(
    file: &Path,
    items: &[Item],
    mut scope: Scope,
    dtf_names: &[String],
    target: &mut Target,
    depth: usize,
) -> Result<(), ScanError> {
    let mut has_glob_super = false;
    for item in items {
        if let Item::Use(item_use) = item {
            if imports_dtf_test(&item_use.tree, dtf_names, &[]) {
                scope.explicit_test = true;
            }
            if is_glob_of_super(&item_use.tree) {
                has_glob_super = true;
            }
        }
    }
    if !has_glob_super {
        scope.glob_test = false;
    }
    for item in items {
        match item {
            Item::Fn(function) => {
                if let Some((marker, attr_path)) = classify(function, &scope, dtf_names) {
                    let mut name = scope.path.clone();
                    name.push(
                        function
                            .sig
                            .ident
                            .to_string()
                            .trim_start_matches("r#")
                            .to_owned(),
                    );
                    let after_attrs = match &function.vis {
                        syn::Visibility::Inherited => function.sig.span(),
                        vis => vis.span(),
                    };
                    target.tests.push(Found {
                        file: file.to_path_buf(),
                        line: function.sig.ident.span().start().line,
                        name: name.join("::"),
                        marker,
                        attr_path,
                        after_attrs,
                        fn_token: Some((
                            function.sig.fn_token.span(),
                            function.sig.asyncness.is_some(),
                        )),
                    });
                }
            }
            Item::Mod(module) => {
                let name = module.ident.to_string().trim_start_matches("r#").to_owned();
                let mut child = Scope {
                    path: scope.path.clone(),
                    dir: scope.dir.join(&name),
                    explicit_test: false,
                    glob_test: scope.explicit_test || scope.glob_test,
                };
                child.path.push(name.clone());
                match &module.content {
                    Some((_, items)) => {
                        if let Some(dir) = path_attr(&module.attrs) {
                            child.dir = scope.dir.join(dir);
                        }
                        scan_items(file, items, child, dtf_names, target, depth)?;
                    }
                    None => {
                        let candidates = match path_attr(&module.attrs) {
                            Some(explicit) => vec![scope.dir.join(explicit)],
                            None => vec![
                                scope.dir.join(format!("{name}.rs")),
                                scope.dir.join(&name).join("mod.rs"),
                            ],
                        };
                        let Some(found) = candidates.into_iter().find(|p| p.is_file()) else {
                            continue; // rustc reports it; nothing to scan
                        };
                        child.dir = if found.file_name().is_some_and(|n| n == "mod.rs")
                            || path_attr(&module.attrs).is_some()
                        {
                            found.parent().unwrap_or(Path::new(".")).to_path_buf()
                        } else {
                            scope.dir.join(&name)
                        };
                        scan_file(&found, child, dtf_names, target, depth + 1)?;
                    }
                }
            }
            Item::Macro(mac) => {
                if mac.mac.path.is_ident("macro_rules") {
                    continue;
                }
                let name = path_string(&mac.mac.path);
                for (line, fn_name) in tests_in_tokens(mac.mac.tokens.clone()) {
                    let mut path = scope.path.clone();
                    path.push(fn_name);
                    target.tests.push(Found {
                        file: file.to_path_buf(),
                        line,
                        name: path.join("::"),
                        marker: Marker::InMacro(name.clone()),
                        attr_path: None,
                        after_attrs: mac.span(),
                        fn_token: None,
                    });
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// The value of `#[path = "..."]`.
fn path_attr(attrs: &[Attribute]) -> Option<String> {
    attrs
        .iter()
        .find(|a| a.path().is_ident("path"))
        .and_then(|a| {
            let syn::Meta::NameValue(nv) = &a.meta else {
                return None;
            };
            match &nv.value {
                syn::Expr::Lit(syn::ExprLit {
                    lit: syn::Lit::Str(s),
                    ..
                }) => Some(s.value()),
                _ => None,
            }
        })
}

/// `a::b::c` as written.
pub fn path_string(path: &syn::Path) -> String {
    let segments: Vec<String> = path.segments.iter().map(|s| s.ident.to_string()).collect();
    let lead = if path.leading_colon.is_some() {
        "::"
    } else {
        ""
    };
    format!("{lead}{}", segments.join("::"))
}

/// True for `use DTF::test;` (also inside a `{...}` group, or `as test`).
fn imports_dtf_test(tree: &UseTree, dtf_names: &[String], prefix: &[String]) -> bool {
    match tree {
        UseTree::Path(p) => {
            let mut prefix = prefix.to_vec();
            prefix.push(p.ident.to_string());
            imports_dtf_test(&p.tree, dtf_names, &prefix)
        }
        UseTree::Name(n) => {
            n.ident == "test" && prefix.len() == 1 && dtf_names.contains(&prefix[0])
        }
        UseTree::Rename(r) => {
            r.ident == "test"
                && r.rename == "test"
                && prefix.len() == 1
                && dtf_names.contains(&prefix[0])
        }
        UseTree::Group(g) => g
            .items
            .iter()
            .any(|t| imports_dtf_test(t, dtf_names, prefix)),
        UseTree::Glob(_) => false,
    }
}

/// True for `use super::*;`.
fn is_glob_of_super(tree: &UseTree) -> bool {
    match tree {
        UseTree::Path(p) if p.ident == "super" => matches!(*p.tree, UseTree::Glob(_)),
        _ => false,
    }
}

/// True when `path` is dtf's test attribute: `dtf::test`, `::dtf::test`, or a renamed dependency's.
pub fn is_dtf_test_path(path: &syn::Path, dtf_names: &[String]) -> bool {
    let segments: Vec<String> = path.segments.iter().map(|s| s.ident.to_string()).collect();
    segments.len() == 2 && segments[1] == "test" && dtf_names.contains(&segments[0])
}

/// What makes `function` a test, if anything does, and the span of the attribute path to
/// rewrite.
fn classify(
    function: &ItemFn,
    scope: &Scope,
    dtf_names: &[String],
) -> Option<(Marker, Option<proc_macro2::Span>)> {
    let mut marker: Option<(Marker, Option<proc_macro2::Span>)> = None;
    let mut dtf = false;
    for attr in &function.attrs {
        let path = attr.path();
        let text = path_string(path);
        let span = Some(path.span());
        if is_dtf_test_path(path, dtf_names) {
            dtf = true;
        } else if text == "test" {
            let kind = if scope.explicit_test {
                Marker::Dtf
            } else if scope.glob_test {
                Marker::AmbiguousTest
            } else {
                Marker::LibtestTest
            };
            marker = Some((kind, span));
        } else if text == "tokio::test" || text == "::tokio::test" {
            let tokens = match &attr.meta {
                syn::Meta::List(list) => list.tokens.to_string(),
                _ => String::new(),
            };
            marker = Some((Marker::TokioTest(tokens), span));
        } else if text == "test_case" || text == "test_case::test_case" || text == "test_matrix" {
            marker.get_or_insert((Marker::TestCase, None));
        } else if text == "rstest" || text == "rstest::rstest" {
            marker.get_or_insert((Marker::Rstest, None));
        } else if text.ends_with("::test") || text == "quickcheck" || text == "wasm_bindgen_test" {
            marker = Some((Marker::Other(text), span));
        }
    }
    if dtf {
        // `#[dtf::test]` with `#[rstest]` or `#[test_case]`: they hand it each case.
        return match marker {
            None | Some((Marker::TestCase | Marker::Rstest | Marker::Dtf, _)) => {
                Some((Marker::Dtf, None))
            }
            other => other,
        };
    }
    marker
}

/// `(line, name)` of every `#[test] fn name` in a macro invocation's tokens.
fn tests_in_tokens(tokens: TokenStream) -> Vec<(usize, String)> {
    let trees: Vec<TokenTree> = tokens.into_iter().collect();
    let mut found = Vec::new();
    let mut i = 0;
    while i < trees.len() {
        match &trees[i] {
            TokenTree::Punct(p) if p.as_char() == '#' => {
                if let Some(TokenTree::Group(g)) = trees.get(i + 1) {
                    let inner: Vec<TokenTree> = g.stream().into_iter().collect();
                    let is_test =
                        matches!(inner.as_slice(), [TokenTree::Ident(id)] if id == "test");
                    if is_test {
                        // The function's name: the ident after the next `fn`.
                        let rest = &trees[i + 2..];
                        if let Some(pos) = rest
                            .iter()
                            .position(|t| matches!(t, TokenTree::Ident(id) if id == "fn"))
                        {
                            if let Some(TokenTree::Ident(name)) = rest.get(pos + 1) {
                                found.push((name.span().start().line, name.to_string()));
                            }
                        }
                    }
                }
            }
            TokenTree::Group(g) => found.extend(tests_in_tokens(g.stream())),
            _ => {}
        }
        i += 1;
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(files: &[(&str, &str)]) -> Vec<(String, Marker)> {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            let path = dir.path().join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        let target = scan_target(&dir.path().join(files[0].0), &["dtf".to_owned()]).unwrap();
        target
            .tests
            .into_iter()
            .map(|f| (f.name, f.marker))
            .collect()
    }

    #[test]
    fn finds_every_kind_of_test_attribute() {
        let found = scan(&[(
            "t.rs",
            r#"
            #[test] fn plain() {}
            #[dtf::test] fn dtf_one() {}
            #[tokio::test(flavor = "multi_thread")] async fn tokio_one() {}
            #[test_case(1)] #[test_case(2)] fn cases(x: u32) {}
            #[rstest] #[case(1)] fn rs(#[case] x: u32) {}
            #[rstest] #[dtf::test] fn rs_dtf(#[values(1)] x: u32) {}
            #[async_std::test] async fn other() {}
            fn helper() {}
            proptest! { #[test] fn prop(x in 0..1) {} }
            "#,
        )]);
        let markers: Vec<(&str, &Marker)> = found.iter().map(|(n, m)| (n.as_str(), m)).collect();
        assert_eq!(markers.len(), 8, "{found:?}");
        assert_eq!(markers[0], ("plain", &Marker::LibtestTest));
        assert_eq!(markers[1], ("dtf_one", &Marker::Dtf));
        assert!(matches!(markers[2], ("tokio_one", Marker::TokioTest(_))));
        assert_eq!(markers[3], ("cases", &Marker::TestCase));
        assert_eq!(markers[4], ("rs", &Marker::Rstest));
        assert_eq!(markers[5], ("rs_dtf", &Marker::Dtf));
        assert_eq!(
            markers[6],
            ("other", &Marker::Other("async_std::test".to_owned()))
        );
        assert_eq!(
            markers[7],
            ("prop", &Marker::InMacro("proptest".to_owned()))
        );
    }

    #[test]
    fn use_dtf_test_switches_only_its_own_module() {
        let found = scan(&[
            (
                "root.rs",
                "use dtf::test;\n#[test] fn top() {}\nmod a;\nmod b { #[test] fn plain() {} }\n\
                 mod c { use super::*; #[test] fn glob() {} }\n\
                 mod d { use super::*; use dtf::test; #[test] fn both() {} }\n",
            ),
            ("a.rs", "#[test] fn in_file() {}\nmod deeper;\n"),
            (
                "a/deeper.rs",
                "use dtf::{self, test};\n#[test] fn deep() {}\n",
            ),
        ]);
        assert_eq!(
            found,
            [
                ("top".to_owned(), Marker::Dtf),
                ("a::in_file".to_owned(), Marker::LibtestTest),
                ("a::deeper::deep".to_owned(), Marker::Dtf),
                ("b::plain".to_owned(), Marker::LibtestTest),
                ("c::glob".to_owned(), Marker::AmbiguousTest),
                ("d::both".to_owned(), Marker::Dtf),
            ]
        );
    }

    #[test]
    fn module_files_follow_rustcs_rules() {
        let found = scan(&[
            (
                "main.rs",
                "mod x;\nmod y;\n#[path = \"elsewhere/z.rs\"] mod z;\n",
            ),
            ("x/mod.rs", "mod inner;\n"),
            ("x/inner.rs", "#[test] fn a() {}\n"),
            ("y.rs", "mod inner;\n"),
            ("y/inner.rs", "#[test] fn b() {}\n"),
            ("elsewhere/z.rs", "#[test] fn c() {}\n"),
        ]);
        let names: Vec<&str> = found.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["x::inner::a", "y::inner::b", "z::c"]);
    }
}
