//! The environment a test process starts from, per isolation level. Pure functions of the
//! parent's variables, so the local runner and the coordinator compute it the same way.

use crate::registry::Isolation;

/// Variables always passed through at levels `env` and `full` (exact names).
pub const ALLOWED: &[&str] = &[
    "PATH",
    "OUT_DIR",
    // What `cargo test` gives a test to run cargo and rustc and to load libraries.
    "RUSTUP_HOME",
    "RUSTUP_TOOLCHAIN",
    "LD_LIBRARY_PATH",
    "DYLD_FALLBACK_LIBRARY_PATH",
    // Coverage profiles (`cargo llvm-cov`).
    "LLVM_PROFILE_FILE",
    "RUST_BACKTRACE",
    "RUST_LIB_BACKTRACE",
    "RUST_LOG",
    "RUST_MIN_STACK",
    "LANG",
    "TZ",
    "TERM",
    // Who runs the test. Code that looks the user up (`~user` expansion, `getpwnam`, a default
    // user name) reads these; they describe the invoking user, which is who the test runs as
    // (at level `full` too: uid 0 inside the user namespace is that user outside it).
    // `SHELL` is left out on purpose: it names the developer's interactive shell (zsh on one
    // machine, bash on the next), so a test that ran `$SHELL` would differ between machines;
    // `DTF_PASS_ENV=SHELL` passes it.
    "USER",
    "LOGNAME",
];

/// Prefixes passed through at levels `env` and `full`.
pub const ALLOWED_PREFIXES: &[&str] = &["CARGO_", "LC_"];

/// Variables dtf itself reads in the parent; never passed to a test unless `DTF_PASS_ENV`
/// names them. (At level `process` everything is inherited, these included.)
pub const PASS_ENV_VAR: &str = "DTF_PASS_ENV";

/// True when `name` matches a `DTF_PASS_ENV` pattern: an exact name, or a `*` glob.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match p.split_first() {
            None => n.is_empty(),
            Some((b'*', rest)) => (0..=n.len()).any(|i| go(rest, &n[i..])),
            Some((c, rest)) => n.first() == Some(c) && go(rest, &n[1..]),
        }
    }
    go(pattern.as_bytes(), name.as_bytes())
}

/// Parses `DTF_PASS_ENV`: comma-separated names or `*` globs; blanks are ignored.
pub fn parse_pass_env(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// True when the variable `name` passes into a test at level `env`/`full`.
pub fn is_allowed(name: &str, pass_env: &[String]) -> bool {
    ALLOWED.contains(&name)
        || ALLOWED_PREFIXES.iter().any(|p| name.starts_with(p))
        || pass_env.iter().any(|p| glob_match(p, name))
}

/// The variables a test starts with at `level`, before dtf adds `HOME` and `TMPDIR`:
/// at `process` every parent variable; otherwise the allowlist and `DTF_PASS_ENV`. The test's
/// own `env(...)` comes last and wins.
pub fn test_environment<'a>(
    level: Isolation,
    parent: impl IntoIterator<Item = (String, String)>,
    pass_env: &[String],
    test_env: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Vec<(String, String)> {
    let mut vars: Vec<(String, String)> = parent
        .into_iter()
        .filter(|(name, _)| level == Isolation::Process || is_allowed(name, pass_env))
        .collect();
    for (name, value) in test_env {
        vars.retain(|(n, _)| n != name);
        vars.push((name.to_owned(), value.to_owned()));
    }
    vars
}

/// Adds `RUSTUP_HOME` and `CARGO_HOME` to a test's environment when it lacks them, derived
/// the way rustup and cargo derive them from `HOME` (`~/.rustup`, `~/.cargo`). The test's own
/// `HOME` is private, so without this a test that runs `cargo` would look for the toolchain in
/// its empty home. `runner` reads the variables of the process that runs the test (the local
/// parent, or the worker), whose `HOME` is the real one: on a worker the toolchain is the
/// worker's.
pub fn add_toolchain_homes(
    vars: &mut Vec<(String, String)>,
    runner: impl Fn(&str) -> Option<String>,
) {
    let home = runner("HOME").filter(|h| !h.is_empty());
    for (name, default) in [("RUSTUP_HOME", ".rustup"), ("CARGO_HOME", ".cargo")] {
        if let Some(pos) = vars.iter().position(|(n, _)| n == name) {
            if std::path::Path::new(&vars[pos].1).is_dir() {
                continue;
            }
            vars.remove(pos);
        }
        let value = runner(name).filter(|v| !v.is_empty()).or_else(|| {
            home.as_ref()
                .map(|h| format!("{}/{default}", h.trim_end_matches('/')))
        });
        if let Some(value) = value {
            vars.push((name.to_owned(), value));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn globs_match_whole_names() {
        assert!(glob_match("MY_*", "MY_VAR"));
        assert!(glob_match("*_TOKEN", "GH_TOKEN"));
        assert!(glob_match("A*B*C", "AxxBxxC"));
        assert!(!glob_match("MY_*", "XMY_VAR"));
        assert!(glob_match("EXACT", "EXACT"));
        assert!(!glob_match("EXACT", "EXACTLY"));
    }

    #[test]
    fn env_level_keeps_only_the_allowlist() {
        let parent = vars(&[
            ("PATH", "/bin"),
            ("HOME", "/root"),
            ("CARGO_PKG_NAME", "x"),
            ("LC_ALL", "C"),
            ("SECRET", "s"),
            ("MY_A", "1"),
        ]);
        let pass = parse_pass_env(" MY_* , ");
        let got = test_environment(Isolation::Env, parent, &pass, [("FOO", "bar")]);
        let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["PATH", "CARGO_PKG_NAME", "LC_ALL", "MY_A", "FOO"]);
    }

    #[test]
    fn toolchain_homes_come_from_the_runners_home_unless_set() {
        let mut got = vars(&[("PATH", "/bin")]);
        add_toolchain_homes(&mut got, |n| {
            (n == "HOME").then(|| "/home/alice/".to_owned())
        });
        assert_eq!(
            got,
            vars(&[
                ("PATH", "/bin"),
                ("RUSTUP_HOME", "/home/alice/.rustup"),
                ("CARGO_HOME", "/home/alice/.cargo")
            ])
        );
        // Set by the user (or passed on): kept. Set in the runner's environment: used.
        let mut got = vars(&[("CARGO_HOME", "/"), ("RUSTUP_HOME", "/nonexistent-dtf")]);
        add_toolchain_homes(&mut got, |n| match n {
            "RUSTUP_HOME" => Some("/opt/rustup".to_owned()),
            "HOME" => Some("/root".to_owned()),
            _ => None,
        });
        assert_eq!(
            got,
            vars(&[("CARGO_HOME", "/"), ("RUSTUP_HOME", "/opt/rustup")])
        );
        let mut got = Vec::new();
        add_toolchain_homes(&mut got, |_| None);
        assert!(got.is_empty());
    }

    #[test]
    fn identity_passes_but_not_the_interactive_shell() {
        let parent = vars(&[
            ("USER", "alice"),
            ("LOGNAME", "alice"),
            ("SHELL", "/bin/zsh"),
        ]);
        let got = test_environment(Isolation::Env, parent.clone(), &[], []);
        assert_eq!(got, vars(&[("USER", "alice"), ("LOGNAME", "alice")]));
        let got = test_environment(Isolation::Env, parent, &parse_pass_env("SHELL"), []);
        assert_eq!(got.len(), 3);
    }

    #[test]
    fn process_level_inherits_everything_and_test_env_wins() {
        let parent = vars(&[("HOME", "/root"), ("FOO", "old")]);
        let got = test_environment(Isolation::Process, parent, &[], [("FOO", "new")]);
        assert_eq!(got, vars(&[("HOME", "/root"), ("FOO", "new")]));
    }
}
