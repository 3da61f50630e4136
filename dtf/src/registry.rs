//! The test registry: every `#[dtf::test]` submits one [`TestDef`] through `inventory`; the
//! registry collects them once per process into a name-sorted list with a name index.

use std::collections::HashMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How far a test's process is separated from the machine and from other tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Isolation {
    /// A fresh process that inherits the parent's environment (what cargo-nextest gives).
    Process,
    /// A fresh process with a cleared environment plus an allowlist, and a private `HOME` and
    /// `TMPDIR` (the default).
    Env,
    /// Everything of `Env`, plus new user, network, mount, PID, UTS and IPC namespaces (Linux).
    Full,
    /// `Full` where the kernel allows namespaces; otherwise `Env`, with one warning.
    FullOrEnv,
}

impl Isolation {
    /// Every level with its spelling, as the CLI, the environment and the attribute accept it.
    pub const ALL: [(&'static str, Isolation); 4] = [
        ("process", Isolation::Process),
        ("env", Isolation::Env),
        ("full", Isolation::Full),
        ("full-or-env", Isolation::FullOrEnv),
    ];

    /// The level's spelling (`process`, `env`, `full`, `full-or-env`).
    pub fn as_str(self) -> &'static str {
        match self {
            Isolation::Process => "process",
            Isolation::Env => "env",
            Isolation::Full => "full",
            Isolation::FullOrEnv => "full-or-env",
        }
    }
}

impl std::str::FromStr for Isolation {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Isolation::ALL
            .iter()
            .find(|(name, _)| *name == s)
            .map(|(_, level)| *level)
            .ok_or_else(|| {
                format!(
                    "unknown isolation level `{s}`: expected one of process, env, full, full-or-env"
                )
            })
    }
}

impl std::fmt::Display for Isolation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a test's per-test process is started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Spawn {
    /// Forked from the run's fork server, a copy of the test binary that has started once
    /// (the default on Linux).
    #[default]
    Fork,
    /// A fresh exec of the test binary (`DTF_SPAWN=exec`, `#[dtf::test(spawn = "exec")]`).
    Exec,
}

impl Spawn {
    /// The spelling of `DTF_SPAWN` and of the attribute.
    pub fn as_str(self) -> &'static str {
        match self {
            Spawn::Fork => "fork",
            Spawn::Exec => "exec",
        }
    }
}

impl std::str::FromStr for Spawn {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "fork" => Ok(Spawn::Fork),
            "exec" => Ok(Spawn::Exec),
            _ => Err(format!("unknown spawn mode `{s}`: expected fork or exec")),
        }
    }
}

/// What `#[should_panic]` asks of a test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShouldPanic {
    /// The test must not panic.
    No,
    /// The test must panic.
    Yes,
    /// The test must panic with a message that contains this text.
    WithMessage(&'static str),
}

/// One registered test, as `#[dtf::test]` emits it. Not constructed by hand: the attribute
/// fills the fields it knows and takes the rest from [`TestDef::DEFAULT`].
#[derive(Clone, Copy, Debug)]
pub struct TestDef {
    /// `module_path!()` where the test was defined, crate name first.
    pub module_path: &'static str,
    /// The function's name.
    pub name: &'static str,
    /// Runs the test body; `Err` carries the failure message of a `Result`-returning test.
    pub func: fn() -> Result<(), String>,
    /// `#[ignore]`.
    pub ignore: bool,
    /// `#[ignore = "reason"]`.
    pub ignore_reason: Option<&'static str>,
    /// `#[should_panic]`.
    pub should_panic: ShouldPanic,
    /// `timeout = "..."`.
    pub timeout: Option<Duration>,
    /// `env(NAME = "value", ...)`.
    pub env: &'static [(&'static str, &'static str)],
    /// `isolation = "..."`.
    pub isolation: Option<Isolation>,
    /// `retries = N`.
    pub retries: Option<u32>,
    /// `memory = "512MiB"`, in bytes.
    pub memory: Option<u64>,
    /// `spawn = "exec"`.
    pub spawn: Option<Spawn>,
    /// The source file of the test.
    pub file: &'static str,
    /// The line of the test function.
    pub line: u32,
}

fn no_body() -> Result<(), String> {
    Err("test has no body".to_owned())
}

impl TestDef {
    /// The defaults for every field the attribute does not set.
    pub const DEFAULT: TestDef = TestDef {
        module_path: "",
        name: "",
        func: no_body,
        ignore: false,
        ignore_reason: None,
        should_panic: ShouldPanic::No,
        timeout: None,
        env: &[],
        isolation: None,
        retries: None,
        memory: None,
        spawn: None,
        file: "",
        line: 0,
    };

    /// True when [`TestDef::full_name`] equals `full`, without allocating.
    pub fn has_name(&self, full: &str) -> bool {
        let Some(rest) = full.strip_suffix(self.name) else {
            return false;
        };
        match self.module_path.split_once("::") {
            Some((_, modules)) => rest.strip_suffix("::") == Some(modules),
            None => rest.is_empty(),
        }
    }

    /// The name libtest would print: the module path below the crate root, then the function.
    pub fn full_name(&self) -> String {
        match self.module_path.split_once("::") {
            Some((_, rest)) => format!("{rest}::{}", self.name),
            None => self.name.to_owned(),
        }
    }
}

inventory::collect!(TestDef);

/// The name index of [`Registry::find`], once built.
static INDEX: std::sync::OnceLock<HashMap<String, &'static TestDef>> = std::sync::OnceLock::new();

/// One `#[dtf::warm_up]` function.
#[derive(Clone, Copy, Debug)]
pub struct WarmUp {
    /// `module_path!()` where it was defined, crate name first.
    pub module_path: &'static str,
    /// The function's name.
    pub name: &'static str,
    /// The function.
    pub func: fn(),
}

impl WarmUp {
    /// The name messages use: the module path below the crate root, then the function.
    pub fn full_name(&self) -> String {
        match self.module_path.split_once("::") {
            Some((_, rest)) => format!("{rest}::{}", self.name),
            None => self.name.to_owned(),
        }
    }

    /// Every warm-up of this binary, in name order.
    pub fn all() -> Vec<&'static WarmUp> {
        let mut all: Vec<&'static WarmUp> = inventory::iter::<WarmUp>.into_iter().collect();
        all.sort_by_key(|w| w.full_name());
        all
    }
}

inventory::collect!(WarmUp);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_drop_the_crate_and_match_without_allocating() {
        let nested = TestDef {
            module_path: "krate::a::b",
            name: "deep",
            ..TestDef::DEFAULT
        };
        assert_eq!(nested.full_name(), "a::b::deep");
        assert!(nested.has_name("a::b::deep"));
        assert!(!nested.has_name("b::deep"));
        assert!(!nested.has_name("a::b::dee"));
        let top = TestDef {
            module_path: "krate",
            name: "top",
            ..TestDef::DEFAULT
        };
        assert_eq!(top.full_name(), "top");
        assert!(top.has_name("top"));
        assert!(!top.has_name("x::top"));
    }
}

/// A registered test with its libtest-style name.
#[derive(Clone, Debug)]
pub struct Test {
    /// Full name, e.g. `nested::deep`.
    pub name: String,
    /// What the attribute declared.
    pub def: &'static TestDef,
}

/// All tests of this binary, sorted by name, with an index for exact lookups.
#[derive(Debug, Default)]
pub struct Registry {
    tests: Vec<Test>,
    by_name: HashMap<String, usize>,
}

impl Registry {
    /// Collects every test submitted through `inventory` in this binary.
    pub fn collect() -> Registry {
        Registry::from_defs(inventory::iter::<TestDef>)
    }

    /// Builds a registry from explicit definitions (used by tests of dtf itself).
    pub fn from_defs<'a>(defs: impl IntoIterator<Item = &'a TestDef>) -> Registry
    where
        'a: 'static,
    {
        let mut tests: Vec<Test> = defs
            .into_iter()
            .map(|def| Test {
                name: def.full_name(),
                def,
            })
            .collect();
        tests.sort_by(|a, b| a.name.cmp(&b.name));
        tests.dedup_by(|a, b| a.name == b.name);
        let by_name = tests
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Registry { tests, by_name }
    }

    /// The definition of the test named `name`, found without building a registry: what a
    /// child process, which runs exactly one test, needs.
    pub fn find(name: &str) -> Option<&'static TestDef> {
        if let Some(index) = INDEX.get() {
            return index.get(name).copied();
        }
        inventory::iter::<TestDef>
            .into_iter()
            .find(|def| def.has_name(name))
    }

    /// Builds the name index [`Registry::find`] uses from then on: what the fork server does
    /// once, so that every process it forks finds its test by a lookup.
    pub fn index_for_find() {
        INDEX.get_or_init(|| {
            inventory::iter::<TestDef>
                .into_iter()
                .map(|def| (def.full_name(), def))
                .collect()
        });
    }

    /// Every test, sorted by name.
    pub fn tests(&self) -> &[Test] {
        &self.tests
    }

    /// The test with exactly this name.
    pub fn get(&self, name: &str) -> Option<&Test> {
        self.by_name.get(name).map(|&i| &self.tests[i])
    }

    /// The position of the test with exactly this name in [`Registry::tests`].
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }
}
