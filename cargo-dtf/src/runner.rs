//! `target.<triple>.runner`: with `--target TRIPLE`, `cargo test` starts each test binary as
//! `RUNNER... BINARY ARGS...` (an emulator, a wrapper that sets up a device). `cargo dtf` does
//! the same, reading the runner where cargo does: `CARGO_TARGET_<TRIPLE>_RUNNER`, else the
//! `.cargo/config.toml` (or `.cargo/config`) files from the current directory up to the root,
//! the deepest first, then `$CARGO_HOME/config.toml`. A string value is split on whitespace;
//! an array is the program and its arguments. A relative program path with a `/` is relative
//! to the directory holding the `.cargo` directory (to the current directory for the
//! variable); a bare name is looked up on `PATH`. `target.'cfg(..)'.runner` and `--config`
//! are not read.

use std::path::{Path, PathBuf};

/// The variable cargo reads for `triple`'s runner: `CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER`.
pub fn var_name(triple: &str) -> String {
    let upper: String = triple
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("CARGO_TARGET_{upper}_RUNNER")
}

/// The runner of `triple` seen from `cwd`, as a program and its arguments; `None` when no
/// runner is configured.
pub fn for_target(triple: &str, cwd: &Path) -> Result<Option<Vec<String>>, String> {
    let var = var_name(triple);
    if let Some(value) = std::env::var(&var).ok().filter(|v| !v.trim().is_empty()) {
        let words: Vec<String> = value.split_whitespace().map(str::to_owned).collect();
        return Ok(Some(resolve(words, cwd)));
    }
    for file in config_files(cwd) {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        let doc: toml_edit::DocumentMut = text
            .parse()
            .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
        let Some(value) = doc
            .get("target")
            .and_then(|t| t.get(triple))
            .and_then(|t| t.get("runner"))
        else {
            continue;
        };
        let bad = || {
            format!(
                "{}: target.{triple}.runner must be a string or an array of strings",
                file.display()
            )
        };
        let words: Vec<String> = if let Some(s) = value.as_str() {
            s.split_whitespace().map(str::to_owned).collect()
        } else if let Some(array) = value.as_array() {
            array
                .iter()
                .map(|v| v.as_str().map(str::to_owned).ok_or_else(bad))
                .collect::<Result<_, _>>()?
        } else {
            return Err(bad());
        };
        if words.is_empty() {
            return Err(format!(
                "{}: target.{triple}.runner is empty",
                file.display()
            ));
        }
        // The directory holding `.cargo/`.
        let base = file
            .parent()
            .and_then(Path::parent)
            .unwrap_or(cwd)
            .to_path_buf();
        return Ok(Some(resolve(words, &base)));
    }
    Ok(None)
}

/// The program made absolute when it is a relative path with a `/`.
fn resolve(mut words: Vec<String>, base: &Path) -> Vec<String> {
    if let Some(program) = words.first_mut() {
        let path = Path::new(program.as_str());
        if path.is_relative() && program.contains('/') {
            *program = base.join(path).display().to_string();
        }
    }
    words
}

/// The config files cargo reads from `cwd`, the one that wins first.
fn config_files(cwd: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut push = |dir: &Path| {
        let toml = dir.join("config.toml");
        let plain = dir.join("config");
        let file = if toml.is_file() { toml } else { plain };
        if file.is_file() && !files.contains(&file) {
            files.push(file);
        }
    };
    for dir in cwd.ancestors() {
        push(&dir.join(".cargo"));
    }
    let home = std::env::var_os("CARGO_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    if let Some(home) = home {
        push(&home);
    }
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_variable_is_spelled_as_cargo_spells_it() {
        assert_eq!(
            var_name("x86_64-unknown-linux-gnu"),
            "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER"
        );
        assert_eq!(
            var_name("thumbv7em-none-eabihf.json"),
            "CARGO_TARGET_THUMBV7EM_NONE_EABIHF_JSON_RUNNER"
        );
    }

    #[test]
    fn the_deepest_config_wins_and_paths_are_relative_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let inner = dir.path().join("a/b");
        std::fs::create_dir_all(inner.join(".cargo")).unwrap();
        std::fs::create_dir_all(dir.path().join(".cargo")).unwrap();
        std::fs::write(
            dir.path().join(".cargo/config.toml"),
            "[target.t-x]\nrunner = \"outer --flag\"\n",
        )
        .unwrap();
        std::fs::write(
            inner.join(".cargo/config.toml"),
            "[target.t-x]\nrunner = [\"./run.sh\", \"--flag\"]\n",
        )
        .unwrap();
        assert_eq!(
            for_target("t-x", &inner.join("deeper")).unwrap(),
            Some(vec![
                inner.join("./run.sh").display().to_string(),
                "--flag".to_owned()
            ])
        );
        assert_eq!(
            for_target("t-x", dir.path()).unwrap(),
            Some(vec!["outer".to_owned(), "--flag".to_owned()])
        );
        assert_eq!(for_target("other", &inner).unwrap(), None);
        std::fs::write(
            inner.join(".cargo/config.toml"),
            "[target.t-x]\nrunner = 3\n",
        )
        .unwrap();
        let err = for_target("t-x", &inner).unwrap_err();
        assert!(err.contains("must be a string or an array"), "{err}");
    }
}
