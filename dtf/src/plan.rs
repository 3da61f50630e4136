//! Selection and planning: which tests run (libtest's filter rules) and, for each, the exact
//! [`RunSpec`] its process gets, with attribute options winning over run-wide ones.

use std::path::PathBuf;
use std::time::Duration;

use crate::registry::{Isolation, Registry, ShouldPanic, Spawn, Test, TestDef};
use crate::sandbox::RunSpec;
use crate::sandbox::env::test_environment;

/// Which tests a run selects, as libtest's flags say.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    /// Substrings (or exact names with `exact`); empty selects everything.
    pub filters: Vec<String>,
    /// Match exactly.
    pub exact: bool,
    /// Names or substrings to skip.
    pub skip: Vec<String>,
    /// Only ignored tests (`--ignored`).
    pub only_ignored: bool,
    /// Ignored tests too (`--include-ignored`).
    pub include_ignored: bool,
    /// Leave out `#[should_panic]` tests.
    pub exclude_should_panic: bool,
}

/// A selected test and whether it runs.
#[derive(Clone, Debug)]
pub struct Selected<'r> {
    /// The test.
    pub test: &'r Test,
    /// False when it is reported as ignored instead.
    pub runs: bool,
}

impl Selection {
    /// The selected tests in name order, and how many were filtered out.
    pub fn apply<'r>(&self, registry: &'r Registry) -> (Vec<Selected<'r>>, usize) {
        let candidates: Vec<&Test> = if self.exact && !self.filters.is_empty() {
            // Exact names are looked up, not searched for.
            let mut found: Vec<&Test> = self
                .filters
                .iter()
                .filter_map(|f| registry.get(f))
                .collect();
            found.sort_by(|a, b| a.name.cmp(&b.name));
            found.dedup_by(|a, b| a.name == b.name);
            found
        } else {
            registry
                .tests()
                .iter()
                .filter(|t| {
                    self.filters.is_empty()
                        || self.filters.iter().any(|f| t.name.contains(f.as_str()))
                })
                .collect()
        };
        let selected: Vec<Selected> = candidates
            .into_iter()
            .filter(|t| !self.skip.iter().any(|s| self.matches(s, &t.name)))
            .filter(|t| !self.only_ignored || t.def.ignore)
            .filter(|t| !(self.exclude_should_panic && t.def.should_panic != ShouldPanic::No))
            .map(|test| Selected {
                test,
                runs: !test.def.ignore || self.only_ignored || self.include_ignored,
            })
            .collect();
        let filtered_out = registry.tests().len() - selected.len();
        (selected, filtered_out)
    }

    fn matches(&self, pattern: &str, name: &str) -> bool {
        if self.exact {
            name == pattern
        } else {
            name.contains(pattern)
        }
    }
}

/// Run-wide settings that attributes may override.
#[derive(Clone, Debug)]
pub struct Defaults {
    /// `--isolation` / `DTF_ISOLATION` (tests without an `isolation` attribute get it).
    pub isolation: Isolation,
    /// What `full` means in this run: `Env` when the user chose the fallback and namespaces
    /// are refused.
    pub full_becomes: Isolation,
    /// `--timeout` / `DTF_TIMEOUT`.
    pub timeout: Option<Duration>,
    /// `--memory` / `DTF_MEMORY`.
    pub memory: Option<u64>,
    /// `--retries` / `DTF_RETRIES`.
    pub retries: u32,
    /// Capture output.
    pub capture: bool,
    /// The package root: every test's working directory.
    pub cwd: Option<PathBuf>,
    /// Parent environment variables.
    pub parent_env: Vec<(String, String)>,
    /// `DTF_PASS_ENV` patterns.
    pub pass_env: Vec<String>,
    /// `--leak-fails`: a test that leaks processes fails.
    pub leak_fails: bool,
    /// `DTF_SPAWN`: how per-test processes start (tests with `spawn = "exec"` always exec).
    pub spawn: Spawn,
}

/// A test to run, with everything its process needs.
#[derive(Clone, Debug)]
pub struct PlannedTest {
    /// Full name.
    pub name: String,
    /// The declaration.
    pub def: &'static TestDef,
    /// How to run it.
    pub spec: RunSpec,
    /// Retries allowed.
    pub retries: u32,
}

/// The tests of a run that will execute, in name order.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    /// Tests to run.
    pub tests: Vec<PlannedTest>,
}

impl Plan {
    /// Resolves each running test's options.
    pub fn new(selected: &[Selected<'_>], defaults: &Defaults) -> Plan {
        let tests = selected
            .iter()
            .filter(|s| s.runs)
            .map(|s| plan_one(s.test, defaults))
            .collect();
        Plan { tests }
    }

    /// True when some test runs at level `full` (before any fallback).
    pub fn needs_namespaces(selected: &[Selected<'_>], defaults: &Defaults) -> bool {
        selected.iter().filter(|s| s.runs).any(|s| {
            matches!(
                s.test.def.isolation.unwrap_or(defaults.isolation),
                Isolation::Full | Isolation::FullOrEnv
            )
        })
    }
}

fn plan_one(test: &Test, defaults: &Defaults) -> PlannedTest {
    let def = test.def;
    let isolation = match def.isolation.unwrap_or(defaults.isolation) {
        Isolation::Full | Isolation::FullOrEnv => defaults.full_becomes,
        level => level,
    };
    let env = test_environment(
        isolation,
        defaults.parent_env.iter().cloned(),
        &defaults.pass_env,
        def.env.iter().copied(),
    );
    PlannedTest {
        name: test.name.clone(),
        def,
        spec: RunSpec {
            test: test.name.clone(),
            isolation,
            env,
            timeout: def.timeout.or(defaults.timeout),
            memory: def.memory.or(defaults.memory),
            capture: defaults.capture,
            cwd: defaults.cwd.clone(),
            leak_fails: defaults.leak_fails,
            spawn: def.spawn.unwrap_or(defaults.spawn),
        },
        retries: def.retries.unwrap_or(defaults.retries),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static DEFS: [TestDef; 4] = [
        TestDef {
            module_path: "krate",
            name: "alpha",
            ..TestDef::DEFAULT
        },
        TestDef {
            module_path: "krate::nested",
            name: "beta",
            ..TestDef::DEFAULT
        },
        TestDef {
            module_path: "krate",
            name: "slow",
            ignore: true,
            ..TestDef::DEFAULT
        },
        TestDef {
            module_path: "krate",
            name: "panics",
            should_panic: ShouldPanic::Yes,
            ..TestDef::DEFAULT
        },
    ];

    fn names(sel: &Selection) -> (Vec<(String, bool)>, usize) {
        let registry = Registry::from_defs(DEFS.iter());
        let (selected, filtered) = sel.apply(&registry);
        (
            selected
                .iter()
                .map(|s| (s.test.name.clone(), s.runs))
                .collect(),
            filtered,
        )
    }

    fn n(name: &str, runs: bool) -> (String, bool) {
        (name.to_owned(), runs)
    }

    #[test]
    fn everything_by_default_with_ignored_reported() {
        let (got, filtered) = names(&Selection::default());
        assert_eq!(
            got,
            [
                n("alpha", true),
                n("nested::beta", true),
                n("panics", true),
                n("slow", false)
            ]
        );
        assert_eq!(filtered, 0);
    }

    #[test]
    fn substring_exact_and_skip_filters() {
        let sel = Selection {
            filters: vec!["a".into()],
            skip: vec!["nested".into()],
            ..Default::default()
        };
        assert_eq!(names(&sel), (vec![n("alpha", true), n("panics", true)], 2));
        let sel = Selection {
            filters: vec!["nested::beta".into(), "alph".into()],
            exact: true,
            ..Default::default()
        };
        assert_eq!(names(&sel), (vec![n("nested::beta", true)], 3));
    }

    #[test]
    fn ignored_flags() {
        let only = Selection {
            only_ignored: true,
            ..Default::default()
        };
        assert_eq!(names(&only), (vec![n("slow", true)], 3));
        let all = Selection {
            include_ignored: true,
            exclude_should_panic: true,
            ..Default::default()
        };
        assert_eq!(
            names(&all),
            (
                vec![n("alpha", true), n("nested::beta", true), n("slow", true)],
                1
            )
        );
    }
}
