//! External tools the tests need, from the one list `scripts/tools` that `./scripts/test`
//! installs from. A missing tool fails the test with its name and what to run, never silently.

use std::path::{Path, PathBuf};

/// `scripts/tools`, the list `./scripts/test` installs from.
const TOOLS: &str = include_str!("../../scripts/tools");

/// The virtual environment `./scripts/test` installs Python tools into, in the workspace.
const VENV: &str = "target/dtf-tools";

/// One line of `scripts/tools`.
#[derive(Debug, PartialEq, Eq)]
struct Tool<'a> {
    command: &'a str,
    kind: &'a str,
    package: &'a str,
    why: String,
}

fn listed(list: &str) -> Vec<Tool<'_>> {
    list.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            Some(Tool {
                command: words.next()?,
                kind: words.next()?,
                package: words.next()?,
                why: words.collect::<Vec<_>>().join(" "),
            })
        })
        .collect()
}

/// Where `command` is on `path` (a `PATH`-style list), or why it cannot be used.
fn find(list: &str, command: &str, path: Option<&std::ffi::OsStr>) -> Result<PathBuf, String> {
    let tools = listed(list);
    let Some(tool) = tools.iter().find(|t| t.command == command) else {
        return Err(format!(
            "`{command}` is not listed in scripts/tools: add a line for it there, so that \
             ./scripts/test installs it"
        ));
    };
    // Python tools: also where ./scripts/test installs them.
    let venv = (tool.kind == "pip").then(|| crate::workspace_root().join(VENV).join("bin"));
    let found = path
        .map(std::env::split_paths)
        .into_iter()
        .flatten()
        .chain(venv)
        .map(|dir| dir.join(command))
        .find(|candidate| is_executable(candidate));
    found.ok_or_else(|| {
        let how = match tool.kind {
            "apt" => format!("Debian package {}", tool.package),
            "pip" => format!("Python package {} from pip, in {VENV}", tool.package),
            _ => format!("cargo install --locked {}", tool.package),
        };
        format!(
            "this test needs `{command}` ({how}; it {}), which is not on PATH: run \
             ./scripts/test, which installs what the test suite needs",
            tool.why
        )
    })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The path of the external tool `command`, which must be listed in `scripts/tools`. Panics
/// with the tool's name, its package and `run ./scripts/test` when it is not installed.
#[track_caller]
pub fn tool(command: &str) -> PathBuf {
    match find(TOOLS, command, std::env::var_os("PATH").as_deref()) {
        Ok(path) => path,
        Err(e) => panic!("{e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_line_of_the_list_is_complete() {
        let tools = listed(TOOLS);
        assert!(tools.iter().any(|t| t.command == "xmllint"));
        for t in &tools {
            assert!(matches!(t.kind, "apt" | "cargo" | "pip"), "{t:?}");
            assert!(!t.why.is_empty(), "{t:?} says why it is needed");
        }
        let lines = TOOLS
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
            .count();
        assert_eq!(
            lines,
            tools.len(),
            "every line has a command, a kind and a package"
        );
    }

    #[test]
    fn a_missing_tool_is_named_with_what_to_run() {
        let list = "xmllint apt libxml2-utils validates JUnit reports\n";
        let empty = tempfile::tempdir().unwrap();
        let err = find(list, "xmllint", Some(empty.path().as_os_str())).unwrap_err();
        assert!(err.contains("`xmllint`"), "{err}");
        assert!(err.contains("libxml2-utils"), "{err}");
        assert!(err.contains("./scripts/test"), "{err}");
        let err = find(list, "jq", Some(empty.path().as_os_str())).unwrap_err();
        assert!(err.contains("scripts/tools"), "{err}");
    }

    #[test]
    fn a_present_tool_is_found_on_path() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("mytool");
        std::fs::write(&exe, "#!/bin/sh\n").unwrap();
        let list = "mytool cargo mytool-pkg does things\n";
        // Not executable yet: not found.
        assert!(find(list, "mytool", Some(dir.path().as_os_str())).is_err());
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(
            find(list, "mytool", Some(dir.path().as_os_str())).unwrap(),
            exe
        );
    }
}
