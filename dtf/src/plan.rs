//! Selection and planning: which tests run (libtest's filter rules) and, for each, the exact
//! [`RunSpec`] its process gets, with attribute options winning over run-wide ones.

use std::path::PathBuf;
use std::time::Duration;

use crate::config::Config;
use crate::filter::TestMeta;
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
    /// The config file's overrides and profile (empty without a file).
    pub config: std::sync::Arc<Config>,
    /// Which run-wide settings came from the command line or a variable: those win over the
    /// config file's overrides. (Otherwise they came from the profile or the built-in default,
    /// and a matching override wins.)
    pub explicit: Explicit,
    /// Where the tests come from, for the overrides' filters.
    pub origin: Origin,
}

/// Which of [`Defaults`]' per-test settings were given on the command line or in a variable.
#[derive(Clone, Copy, Debug, Default)]
pub struct Explicit {
    /// `--isolation` / `DTF_ISOLATION`.
    pub isolation: bool,
    /// `--timeout` / `DTF_TIMEOUT`.
    pub timeout: bool,
    /// `--memory` / `DTF_MEMORY`.
    pub memory: bool,
    /// `--retries` / `DTF_RETRIES`.
    pub retries: bool,
}

/// The binary a test is in, as filter expressions see it.
#[derive(Clone, Debug, Default)]
pub struct Origin {
    /// The binary's target name.
    pub binary: String,
    /// Its id (`my-pkg::integration`).
    pub binary_id: String,
    /// Its package.
    pub package: String,
    /// Its kind (`lib`, `test`, `bin`, ...).
    pub kind: String,
}

/// One test's settings once attributes, flags, variables, overrides and the profile are
/// resolved, before the isolation fallback.
#[derive(Clone, Debug, PartialEq)]
pub struct Resolved {
    /// The isolation level asked for (may be `full-or-env`).
    pub isolation: Isolation,
    /// Its timeout.
    pub timeout: Option<Duration>,
    /// Its memory limit.
    pub memory: Option<u64>,
    /// Its retries.
    pub retries: u32,
    /// Slots it takes.
    pub threads: usize,
    /// Its test group's name.
    pub group: Option<String>,
}

impl Defaults {
    /// Resolves one test's settings: the attribute (`def`), then the command line and
    /// variables, then the config file's overrides, then the profile and the built-in
    /// defaults (already in `self`).
    pub fn resolve(&self, name: &str, def: Option<&TestDef>) -> Resolved {
        let meta = TestMeta {
            name,
            binary: &self.origin.binary,
            binary_id: &self.origin.binary_id,
            package: &self.origin.package,
            kind: &self.origin.kind,
        };
        let (over, _) = self.config.for_test(&meta);
        let e = self.explicit;
        Resolved {
            isolation: def
                .and_then(|d| d.isolation)
                .or(e.isolation.then_some(self.isolation))
                .or(over.isolation)
                .unwrap_or(self.isolation),
            timeout: def
                .and_then(|d| d.timeout)
                .or(if e.timeout { self.timeout } else { None })
                .or(over.timeout)
                .or(self.timeout),
            memory: def
                .and_then(|d| d.memory)
                .or(if e.memory { self.memory } else { None })
                .or(over.memory)
                .or(self.memory),
            retries: def
                .and_then(|d| d.retries)
                .or(e.retries.then_some(self.retries))
                .or(over.retries)
                .unwrap_or(self.retries),
            threads: over
                .threads_required
                .or(self.config.profile.tests.threads_required)
                .unwrap_or(1),
            group: over.test_group,
        }
    }

    /// The level a resolved isolation runs at in this run (`full-or-env` and `full` become
    /// what `full` means here).
    pub fn effective(&self, isolation: Isolation) -> Isolation {
        match isolation {
            Isolation::Full | Isolation::FullOrEnv => self.full_becomes,
            level => level,
        }
    }

    /// Plans a test of a binary known only by name (a libtest binary run by `cargo dtf`).
    pub fn plan_foreign(
        &self,
        name: &str,
        display: String,
        harness: crate::sandbox::Harness,
        binary: usize,
        groups: &[Group],
    ) -> PlannedTest {
        let r = self.resolve(name, None);
        let isolation = self.effective(r.isolation);
        let env = test_environment(
            isolation,
            self.parent_env.iter().cloned(),
            &self.pass_env,
            std::iter::empty(),
        );
        PlannedTest {
            name: display,
            def: None,
            spec: RunSpec {
                test: name.to_owned(),
                isolation,
                env,
                timeout: r.timeout,
                memory: r.memory,
                capture: self.capture,
                cwd: self.cwd.clone(),
                leak_fails: self.leak_fails,
                // A foreign binary is never forked from a fork server: its per-test process
                // is exec'd and execs the binary.
                spawn: Spawn::Exec,
                harness,
            },
            retries: r.retries,
            binary,
            threads: r.threads,
            group: r
                .group
                .and_then(|g| groups.iter().position(|known| known.name == g)),
        }
    }
}

/// A test to run, with everything its process needs.
#[derive(Clone, Debug)]
pub struct PlannedTest {
    /// The name reports show: the test's full name, or `BINARY_ID NAME` in a run of several
    /// binaries.
    pub name: String,
    /// The declaration, when the test is in this binary (`None` for a test of another binary,
    /// known by its name).
    pub def: Option<&'static TestDef>,
    /// How to run it.
    pub spec: RunSpec,
    /// Retries allowed.
    pub retries: u32,
    /// Which of the run's binaries holds it (an index into the runner's sandboxes).
    pub binary: usize,
    /// Slots it takes while it runs (`threads-required`).
    pub threads: usize,
    /// Its test group (an index into [`Plan::groups`]).
    pub group: Option<usize>,
}

/// A test group: tests that run at most `max_threads` at once across the whole run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    /// Its name in the config file.
    pub name: String,
    /// How many of its tests may run at once, on every worker together.
    pub max_threads: usize,
}

/// The tests of a run that will execute, in name order.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    /// Tests to run.
    pub tests: Vec<PlannedTest>,
    /// The test groups the tests refer to.
    pub groups: Vec<Group>,
}

impl Plan {
    /// Resolves each running test's options.
    pub fn new(selected: &[Selected<'_>], defaults: &Defaults) -> Plan {
        let groups: Vec<Group> = defaults
            .config
            .groups
            .iter()
            .map(|(name, &max_threads)| Group {
                name: name.clone(),
                max_threads,
            })
            .collect();
        let tests = selected
            .iter()
            .filter(|s| s.runs)
            .map(|s| plan_one(s.test, defaults, &groups))
            .collect();
        Plan { tests, groups }
    }

    /// True when some test runs at level `full` (before any fallback).
    pub fn needs_namespaces(selected: &[Selected<'_>], defaults: &Defaults) -> bool {
        selected.iter().filter(|s| s.runs).any(|s| {
            matches!(
                defaults.resolve(&s.test.name, Some(s.test.def)).isolation,
                Isolation::Full | Isolation::FullOrEnv
            )
        })
    }

    /// What bounds the scheduler: slots per test and test groups.
    pub fn limits(&self) -> crate::scheduler::Limits {
        crate::scheduler::Limits {
            threads: self.tests.iter().map(|t| t.threads.max(1)).collect(),
            group: self.tests.iter().map(|t| t.group).collect(),
            group_max: self.groups.iter().map(|g| g.max_threads.max(1)).collect(),
        }
    }
}

/// Plans one test of this binary.
pub fn plan_one(test: &Test, defaults: &Defaults, groups: &[Group]) -> PlannedTest {
    let def = test.def;
    let r = defaults.resolve(&test.name, Some(def));
    let isolation = defaults.effective(r.isolation);
    let env = test_environment(
        isolation,
        defaults.parent_env.iter().cloned(),
        &defaults.pass_env,
        def.env.iter().copied(),
    );
    PlannedTest {
        name: test.name.clone(),
        def: Some(def),
        binary: 0,
        threads: r.threads,
        group: r
            .group
            .and_then(|g| groups.iter().position(|known| known.name == g)),
        spec: RunSpec {
            test: test.name.clone(),
            isolation,
            env,
            timeout: r.timeout,
            memory: r.memory,
            capture: defaults.capture,
            cwd: defaults.cwd.clone(),
            leak_fails: defaults.leak_fails,
            spawn: def.spawn.unwrap_or(defaults.spawn),
            harness: crate::sandbox::Harness::Dtf,
        },
        retries: r.retries,
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
