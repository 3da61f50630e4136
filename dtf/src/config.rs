//! `.config/dtf.toml`: profiles, per-test overrides and test groups, read by `cargo dtf` and
//! by every dtf test binary (under plain `cargo test` too), so both entry points agree. See
//! `docs/config.md`.
//!
//! Precedence, highest first: the test's attribute, the command line, `DTF_*` variables, the
//! first matching override of the chosen profile, then of `default`, the chosen profile, the
//! `default` profile, built-in defaults.
//!
//! Run-wide settings that have a `DTF_*` variable are applied by setting that variable when it
//! is not set already ([`Config::apply_to_env`]), so every part of dtf that reads the variable
//! sees the file's value, and a variable the user set still wins. Per-test settings
//! (`retries`, `timeout`, `isolation`, `memory`, `threads-required`, `test-group`) are resolved
//! per test by the planner, where overrides sit between the variables and the profile.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use crate::cli::{self, Order};
use crate::filter::{Filter, TestMeta};
use crate::registry::Isolation;

/// The config file's path below the workspace root.
pub const FILE: &str = ".config/dtf.toml";

/// The variable that names the config file explicitly (`cargo dtf` sets it for the binaries
/// it runs, so they read the file it read).
pub const CONFIG_VAR: &str = "DTF_CONFIG";

/// The variable that chooses the profile (`-P/--profile` wins).
pub const PROFILE_VAR: &str = "DTF_PROFILE";

/// The user's cache directory, where dtf keeps what a later run reuses: `$XDG_CACHE_HOME`,
/// else `~/.cache`; `None` when neither is set.
pub fn user_cache_dir() -> Option<std::path::PathBuf> {
    std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|home| std::path::PathBuf::from(home).join(".cache"))
        })
}

/// Run-wide keys that stand for a `DTF_*` (or libtest) variable: `(key, variable, kind)`.
/// Adding a setting to dtf means adding its row here.
pub const ENV_KEYS: &[(&str, &str, Kind)] = &[
    ("test-threads", "RUST_TEST_THREADS", Kind::Count),
    ("workers", "DTF_WORKERS", Kind::Text),
    ("require-workers", "DTF_REQUIRE_WORKERS", Kind::Bool),
    ("worker-wait", "DTF_WORKER_WAIT", Kind::Duration),
    ("workers-refresh", "DTF_WORKERS_REFRESH", Kind::Duration),
    ("order", "DTF_ORDER", Kind::Order),
    ("junit.path", "DTF_JUNIT", Kind::Path),
    ("html.path", "DTF_HTML", Kind::Path),
    ("pass-env", "DTF_PASS_ENV", Kind::List),
    ("keep-tmp", "DTF_KEEP_TMP", Kind::Bool),
    ("history-dir", "DTF_HISTORY_DIR", Kind::Path),
    ("worker-bin", "DTF_WORKER_BIN", Kind::Path),
    ("token-file", "DTF_TOKEN_FILE", Kind::Path),
    ("log", "DTF_LOG", Kind::Text),
    ("output-cap", "DTF_OUTPUT_CAP", Kind::OutputCap),
    ("speculate", "DTF_SPECULATE", Kind::Bool),
];

/// Keys resolved per test (allowed in overrides): `(key, variable)`.
pub const TEST_KEYS: &[(&str, Option<&str>)] = &[
    ("retries", Some("DTF_RETRIES")),
    ("timeout", Some("DTF_TIMEOUT")),
    ("isolation", Some("DTF_ISOLATION")),
    ("memory", Some("DTF_MEMORY")),
    ("threads-required", None),
];

/// Run-wide keys without a variable.
pub const RUN_KEYS: &[&str] = &["fail-fast", "slow"];

/// How a value is checked (and spelled in the variable).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A positive whole number.
    Count,
    /// A string.
    Text,
    /// A boolean (`1`/`0` in the variable).
    Bool,
    /// A test order.
    Order,
    /// A path, relative to the workspace root.
    Path,
    /// A list of strings (comma-separated in the variable), or one string.
    List,
    /// A size of captured output, such as `"1MiB"`, at most 6 MiB.
    OutputCap,
    /// A duration: whole seconds (`30`, `0`) or a string such as `"500ms"` or `"2m"`, spelled
    /// the same way in the variable.
    Duration,
}

/// Per-test settings: what a profile or an override sets for the tests it applies to.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TestSettings {
    /// `retries`.
    pub retries: Option<u32>,
    /// `timeout`.
    pub timeout: Option<Duration>,
    /// `isolation`.
    pub isolation: Option<Isolation>,
    /// `memory`, in bytes.
    pub memory: Option<u64>,
    /// `threads-required`.
    pub threads_required: Option<usize>,
    /// `test-group` (overrides only).
    pub test_group: Option<String>,
}

impl TestSettings {
    /// Fills what `self` leaves unset from `lower`.
    fn or(mut self, lower: &TestSettings) -> TestSettings {
        self.retries = self.retries.or(lower.retries);
        self.timeout = self.timeout.or(lower.timeout);
        self.isolation = self.isolation.or(lower.isolation);
        self.memory = self.memory.or(lower.memory);
        self.threads_required = self.threads_required.or(lower.threads_required);
        if self.test_group.is_none() {
            self.test_group.clone_from(&lower.test_group);
        }
        self
    }
}

/// One `[[profile.NAME.overrides]]` entry.
#[derive(Clone, Debug)]
pub struct Override {
    /// Which tests it applies to.
    pub filter: Filter,
    /// What it sets for them.
    pub settings: TestSettings,
}

/// One profile: run-wide settings, per-test settings and overrides.
#[derive(Clone, Debug, Default)]
pub struct Profile {
    /// Run-wide keys with a variable: `(variable, value as the variable spells it)`.
    pub env: Vec<(&'static str, String)>,
    /// `fail-fast`.
    pub fail_fast: Option<bool>,
    /// `slow`.
    pub slow: Option<Duration>,
    /// The per-test settings of the whole profile.
    pub tests: TestSettings,
    /// Its overrides, in file order.
    pub overrides: Vec<Override>,
}

/// The parsed file with the chosen profile resolved against `default`.
#[derive(Clone, Debug, Default)]
pub struct Config {
    /// Where it was read from (`None`: no file).
    pub path: Option<PathBuf>,
    /// The chosen profile's name.
    pub profile_name: String,
    /// The chosen profile over `default`.
    pub profile: Profile,
    /// The chosen profile's overrides, then `default`'s.
    pub overrides: Vec<Override>,
    /// `[test-groups.NAME] max-threads = N`, by name.
    pub groups: BTreeMap<String, usize>,
}

/// A config file that cannot be used: names the file, the line and the key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Finds the config file: `DTF_CONFIG`, else `.config/dtf.toml` in `start` or the nearest
    /// directory above it, stopping at the workspace root (a `Cargo.toml` with
    /// `[workspace]`). `None` when there is none.
    pub fn find(start: &Path) -> Option<PathBuf> {
        if let Some(path) = std::env::var_os(CONFIG_VAR).filter(|v| !v.is_empty()) {
            return Some(PathBuf::from(path));
        }
        let mut dir = Some(start);
        while let Some(d) = dir {
            let candidate = d.join(FILE);
            if candidate.is_file() {
                return Some(candidate);
            }
            let manifest = d.join("Cargo.toml");
            if std::fs::read_to_string(&manifest)
                .is_ok_and(|text| text.lines().any(|l| l.trim() == "[workspace]"))
            {
                return None;
            }
            dir = d.parent();
        }
        None
    }

    /// Reads the file (if any) and resolves `profile` (else `DTF_PROFILE`, else `default`).
    pub fn load(path: Option<&Path>, profile: Option<&str>) -> Result<Config, ConfigError> {
        let name = match profile {
            Some(p) => p.to_owned(),
            None => std::env::var(PROFILE_VAR)
                .ok()
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| "default".to_owned()),
        };
        let Some(path) = path else {
            if name != "default" {
                return Err(ConfigError(format!(
                    "profile `{name}` was asked for, but there is no {FILE} (dtf looks for it in \
                     the package and the directories above it, up to the workspace root; or set \
                     {CONFIG_VAR})"
                )));
            }
            return Ok(Config {
                profile_name: name,
                ..Config::default()
            });
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError(format!(
                "cannot read the config file {}: {e}",
                path.display()
            ))
        })?;
        Config::parse(&text, path, &name)
    }

    /// Parses `text` (the contents of `path`) and resolves profile `name`.
    pub fn parse(text: &str, path: &Path, name: &str) -> Result<Config, ConfigError> {
        let file = File { path, text };
        let root = DeTable::parse(text).map_err(|e| {
            let line = e.span().map(|s| file.line(s.start)).unwrap_or(1);
            ConfigError(format!(
                "{}:{line}: invalid TOML: {}",
                path.display(),
                e.message().trim()
            ))
        })?;
        let base = path
            .parent()
            .and_then(Path::parent)
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let mut profiles: BTreeMap<String, Profile> = BTreeMap::new();
        let mut groups = BTreeMap::new();
        for (key, value) in root.get_ref() {
            match key.get_ref().as_ref() {
                "profile" => {
                    let table = file.table(value, "profile")?;
                    for (pname, pvalue) in table {
                        let pname = pname.get_ref().to_string();
                        let where_ = format!("profile.{pname}");
                        let profile = file.profile(pvalue, &where_, &base)?;
                        profiles.insert(pname, profile);
                    }
                }
                "test-groups" => {
                    let table = file.table(value, "test-groups")?;
                    for (gname, gvalue) in table {
                        let gname = gname.get_ref().to_string();
                        let where_ = format!("test-groups.{gname}");
                        let group = file.table(gvalue, &where_)?;
                        let mut max = None;
                        for (k, v) in group {
                            match k.get_ref().as_ref() {
                                "max-threads" => {
                                    max = Some(file.count(v, &format!("{where_}.max-threads"))?)
                                }
                                other => {
                                    return Err(file.error(
                                        k.span().start,
                                        &format!("{where_}.{other}"),
                                        "unknown key: a test group has only `max-threads`",
                                    ));
                                }
                            }
                        }
                        let Some(max) = max else {
                            return Err(file.error(
                                gvalue.span().start,
                                &where_,
                                "a test group needs `max-threads = N`",
                            ));
                        };
                        groups.insert(gname, max);
                    }
                }
                other => {
                    return Err(file.error(
                        key.span().start,
                        other,
                        "unknown key: expected `[profile.NAME]` or `[test-groups.NAME]`",
                    ));
                }
            }
        }
        // Every override's group must exist.
        for (pname, profile) in &profiles {
            for o in &profile.overrides {
                if let Some(g) = &o.settings.test_group {
                    if !groups.contains_key(g) {
                        return Err(ConfigError(format!(
                            "{}: profile.{pname}.overrides: test-group `{g}` is not defined: add \
                             `[test-groups.{g}]` with `max-threads = N`",
                            path.display()
                        )));
                    }
                }
            }
        }
        let default = profiles.remove("default").unwrap_or_default();
        let chosen = if name == "default" {
            None
        } else {
            match profiles.remove(name) {
                Some(p) => Some(p),
                None => {
                    let known: Vec<&str> = std::iter::once("default")
                        .chain(profiles.keys().map(String::as_str))
                        .collect();
                    return Err(ConfigError(format!(
                        "{}: there is no profile `{name}` (profiles: {})",
                        path.display(),
                        known.join(", ")
                    )));
                }
            }
        };
        let (profile, overrides) = match chosen {
            None => {
                let overrides = default.overrides.clone();
                (default, overrides)
            }
            Some(p) => {
                let mut env = p.env.clone();
                for (var, value) in &default.env {
                    if !env.iter().any(|(v, _)| v == var) {
                        env.push((var, value.clone()));
                    }
                }
                let mut overrides = p.overrides.clone();
                overrides.extend(default.overrides.iter().cloned());
                let merged = Profile {
                    env,
                    fail_fast: p.fail_fast.or(default.fail_fast),
                    slow: p.slow.or(default.slow),
                    tests: p.tests.clone().or(&default.tests),
                    overrides: Vec::new(),
                };
                (merged, overrides)
            }
        };
        Ok(Config {
            path: Some(path.to_path_buf()),
            profile_name: name.to_owned(),
            profile,
            overrides,
            groups,
        })
    }

    /// Sets the variable of every run-wide setting the profile has and the environment lacks.
    ///
    /// # Safety
    ///
    /// Changes the process environment: call it only while no other thread runs.
    pub unsafe fn apply_to_env(&self) {
        for (var, value) in &self.profile.env {
            if std::env::var_os(var).is_none_or(|v| v.is_empty()) {
                // SAFETY: the caller guarantees that no other thread runs.
                unsafe { std::env::set_var(var, value) };
            }
        }
    }

    /// The per-test settings of the overrides that match `test` (the first match wins per
    /// key), over the profile's.
    pub fn for_test(&self, test: &TestMeta<'_>) -> (TestSettings, TestSettings) {
        let mut from_overrides = TestSettings::default();
        for o in &self.overrides {
            if o.filter.matches(test) {
                from_overrides = from_overrides.or(&o.settings);
            }
        }
        (from_overrides, self.profile.tests.clone())
    }
}

struct File<'a> {
    path: &'a Path,
    text: &'a str,
}

type Value<'i> = Spanned<DeValue<'i>>;

impl File<'_> {
    fn line(&self, offset: usize) -> usize {
        self.text[..offset.min(self.text.len())]
            .bytes()
            .filter(|&b| b == b'\n')
            .count()
            + 1
    }

    fn error(&self, offset: usize, key: &str, message: &str) -> ConfigError {
        ConfigError(format!(
            "{}:{}: `{key}`: {message}",
            self.path.display(),
            self.line(offset)
        ))
    }

    fn table<'v, 'i>(
        &self,
        value: &'v Value<'i>,
        key: &str,
    ) -> Result<&'v DeTable<'i>, ConfigError> {
        value.get_ref().as_table().ok_or_else(|| {
            self.error(
                value.span().start,
                key,
                &format!("expected a table, found {}", value.get_ref().type_str()),
            )
        })
    }

    fn string(&self, value: &Value<'_>, key: &str) -> Result<String, ConfigError> {
        value.get_ref().as_str().map(str::to_owned).ok_or_else(|| {
            self.error(
                value.span().start,
                key,
                &format!("expected a string, found {}", value.get_ref().type_str()),
            )
        })
    }

    fn count(&self, value: &Value<'_>, key: &str) -> Result<usize, ConfigError> {
        let bad = || {
            self.error(
                value.span().start,
                key,
                "expected a whole number of at least 1",
            )
        };
        let int = value.get_ref().as_integer().ok_or_else(bad)?;
        let n =
            i64::from_str_radix(&int.as_str().replace('_', ""), int.radix()).map_err(|_| bad())?;
        usize::try_from(n).ok().filter(|&n| n >= 1).ok_or_else(bad)
    }

    fn bool(&self, value: &Value<'_>, key: &str) -> Result<bool, ConfigError> {
        value.get_ref().as_bool().ok_or_else(|| {
            self.error(
                value.span().start,
                key,
                &format!(
                    "expected true or false, found {}",
                    value.get_ref().type_str()
                ),
            )
        })
    }

    /// Whole seconds (an integer, 0 allowed) or a duration string, as the variable spells it.
    fn duration(&self, value: &Value<'_>, key: &str) -> Result<String, ConfigError> {
        let bad = || {
            self.error(
                value.span().start,
                key,
                "expected whole seconds (such as 60 or 0) or a duration (such as \"500ms\" or \"2m\")",
            )
        };
        match value.get_ref() {
            DeValue::Integer(int) => {
                let n = u64::from_str_radix(&int.as_str().replace('_', ""), int.radix())
                    .map_err(|_| bad())?;
                Ok(n.to_string())
            }
            DeValue::String(text) => {
                let text = text.trim();
                if text.parse::<u64>().is_ok() {
                    return Ok(text.to_owned());
                }
                cli::parse_duration(text).map_err(|e| self.error(value.span().start, key, &e))?;
                Ok(text.to_owned())
            }
            _ => Err(bad()),
        }
    }

    fn parsed<T>(
        &self,
        value: &Value<'_>,
        key: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        let text = self.string(value, key)?;
        parse(&text).map_err(|e| self.error(value.span().start, key, &e))
    }

    fn profile(
        &self,
        value: &Value<'_>,
        where_: &str,
        base: &Path,
    ) -> Result<Profile, ConfigError> {
        let table = self.table(value, where_)?;
        let mut profile = Profile::default();
        for (k, v) in table {
            let name = k.get_ref().to_string();
            let key = format!("{where_}.{name}");
            if name == "overrides" {
                let list = v.get_ref().as_array().ok_or_else(|| {
                    self.error(
                        v.span().start,
                        &key,
                        "expected an array of tables: write `[[profile.NAME.overrides]]`",
                    )
                })?;
                for (i, item) in list.iter().enumerate() {
                    let okey = format!("{key}[{i}]");
                    profile.overrides.push(self.override_(item, &okey)?);
                }
                continue;
            }
            if name == "junit" || name == "html" {
                let sub = self.table(v, &key)?;
                for (sk, sv) in sub {
                    let sname = format!("{name}.{}", sk.get_ref().as_ref());
                    let skey = format!("{where_}.{sname}");
                    match ENV_KEYS.iter().find(|(k, _, _)| *k == sname) {
                        Some((_, var, kind)) => {
                            let value = self.env_value(sv, &skey, *kind, base)?;
                            profile.env.push((var, value));
                        }
                        None => {
                            return Err(self.error(
                                sk.span().start,
                                &skey,
                                &format!("unknown key: `[{name}]` has only `path`"),
                            ));
                        }
                    }
                }
                continue;
            }
            if self.test_key(&mut profile.tests, &name, v, &key)? {
                continue;
            }
            if let Some((_, var, kind)) = ENV_KEYS.iter().find(|(k, _, _)| *k == name) {
                let value = self.env_value(v, &key, *kind, base)?;
                profile.env.push((var, value));
                continue;
            }
            match name.as_str() {
                "fail-fast" => profile.fail_fast = Some(self.bool(v, &key)?),
                "slow" => profile.slow = Some(self.parsed(v, &key, cli::parse_duration)?),
                "test-group" => {
                    return Err(self.error(
                        k.span().start,
                        &key,
                        "`test-group` belongs in an override: `[[profile.NAME.overrides]]` with \
                         `filter = \"...\"` and `test-group = \"NAME\"`",
                    ));
                }
                _ => {
                    return Err(self.error(
                        k.span().start,
                        &key,
                        &format!("unknown key: expected one of {}", known_keys()),
                    ));
                }
            }
        }
        Ok(profile)
    }

    /// Reads a per-test key into `settings`; false when `name` is not one.
    fn test_key(
        &self,
        settings: &mut TestSettings,
        name: &str,
        v: &Value<'_>,
        key: &str,
    ) -> Result<bool, ConfigError> {
        match name {
            "retries" => {
                let n = match v.get_ref().as_integer() {
                    Some(int) => int.as_str().parse::<u32>().ok(),
                    None => None,
                };
                settings.retries = Some(n.ok_or_else(|| {
                    self.error(
                        v.span().start,
                        key,
                        "expected a whole number of retries, such as 2",
                    )
                })?);
            }
            "timeout" => settings.timeout = Some(self.parsed(v, key, cli::parse_duration)?),
            "isolation" => settings.isolation = Some(self.parsed(v, key, |s| s.parse())?),
            "memory" => settings.memory = Some(self.parsed(v, key, cli::parse_size)?),
            "threads-required" => settings.threads_required = Some(self.count(v, key)?),
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn override_(&self, value: &Value<'_>, where_: &str) -> Result<Override, ConfigError> {
        let table = self.table(value, where_)?;
        let mut filter = None;
        let mut settings = TestSettings::default();
        for (k, v) in table {
            let name = k.get_ref().to_string();
            let key = format!("{where_}.{name}");
            if self.test_key(&mut settings, &name, v, &key)? {
                continue;
            }
            match name.as_str() {
                "filter" => {
                    let text = self.string(v, &key)?;
                    filter = Some(Filter::parse(&text).map_err(|e| {
                        ConfigError(format!(
                            "{}:{}: `{key}`: {e}",
                            self.path.display(),
                            self.line(v.span().start)
                        ))
                    })?);
                }
                "test-group" => settings.test_group = Some(self.string(v, &key)?),
                _ => {
                    let run_wide = ENV_KEYS.iter().any(|(k, _, _)| *k == name)
                        || RUN_KEYS.contains(&name.as_str());
                    let message = if run_wide {
                        format!(
                            "`{name}` applies to the whole run, not to some tests: set it in the \
                             profile itself"
                        )
                    } else {
                        "unknown key: an override takes `filter`, `retries`, `timeout`, \
                         `isolation`, `memory`, `threads-required` and `test-group`"
                            .to_owned()
                    };
                    return Err(self.error(k.span().start, &key, &message));
                }
            }
        }
        let Some(filter) = filter else {
            return Err(self.error(
                value.span().start,
                where_,
                "an override needs `filter = \"EXPR\"` (such as `filter = \"test(db::)\"`)",
            ));
        };
        Ok(Override { filter, settings })
    }

    fn env_value(
        &self,
        v: &Value<'_>,
        key: &str,
        kind: Kind,
        base: &Path,
    ) -> Result<String, ConfigError> {
        Ok(match kind {
            Kind::Count => self.count(v, key)?.to_string(),
            Kind::Text => self.string(v, key)?,
            Kind::OutputCap => {
                let text = self.string(v, key)?;
                self.parsed(v, key, crate::outcome::parse_output_cap)?;
                text
            }
            Kind::Bool => if self.bool(v, key)? { "1" } else { "0" }.to_owned(),
            Kind::Duration => self.duration(v, key)?,
            Kind::Order => {
                let text = self.string(v, key)?;
                text.parse::<Order>()
                    .map_err(|e| self.error(v.span().start, key, &e))?;
                text
            }
            Kind::Path => {
                let text = self.string(v, key)?;
                let path = Path::new(&text);
                if path.is_absolute() {
                    text
                } else {
                    base.join(path).display().to_string()
                }
            }
            Kind::List => match v.get_ref() {
                DeValue::String(s) => s.to_string(),
                DeValue::Array(items) => {
                    let mut names = Vec::new();
                    for item in items.iter() {
                        names.push(self.string(item, key)?);
                    }
                    names.join(",")
                }
                other => {
                    return Err(self.error(
                        v.span().start,
                        key,
                        &format!("expected a list of strings, found {}", other.type_str()),
                    ));
                }
            },
        })
    }
}

fn known_keys() -> String {
    let mut keys: Vec<&str> = TEST_KEYS.iter().map(|(k, _)| *k).collect();
    keys.extend(ENV_KEYS.iter().map(|(k, _, _)| *k));
    keys.extend(RUN_KEYS);
    keys.push("overrides");
    keys.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE_TEXT: &str = r#"
[profile.default]
retries = 1
test-threads = 3
junit.path = "target/junit.xml"
pass-env = ["DATABASE_URL", "MYAPP_*"]

[[profile.default.overrides]]
filter = "test(db::)"
test-group = "database"
timeout = "5s"

[profile.ci]
retries = 3
fail-fast = true
isolation = "full-or-env"

[[profile.ci.overrides]]
filter = "package(slow-*)"
threads-required = 2
retries = 0

[test-groups.database]
max-threads = 1
"#;

    fn meta<'a>(name: &'a str, package: &'a str) -> TestMeta<'a> {
        TestMeta {
            name,
            binary: "b",
            binary_id: "b",
            package,
            kind: "test",
        }
    }

    #[test]
    fn profiles_inherit_default_and_overrides_match_by_filter() {
        let path = Path::new("/w/.config/dtf.toml");
        let c = Config::parse(FILE_TEXT, path, "ci").unwrap();
        assert_eq!(c.profile.tests.retries, Some(3));
        assert_eq!(c.profile.fail_fast, Some(true));
        assert!(
            c.profile
                .env
                .contains(&("RUST_TEST_THREADS", "3".to_owned()))
        );
        assert!(
            c.profile
                .env
                .contains(&("DTF_JUNIT", "/w/target/junit.xml".to_owned()))
        );
        assert!(
            c.profile
                .env
                .contains(&("DTF_PASS_ENV", "DATABASE_URL,MYAPP_*".to_owned()))
        );
        assert_eq!(c.groups.get("database"), Some(&1));
        let (o, p) = c.for_test(&meta("db::connects", "slow-db"));
        assert_eq!(o.retries, Some(0), "ci's override comes first");
        assert_eq!(o.threads_required, Some(2));
        assert_eq!(o.test_group.as_deref(), Some("database"));
        assert_eq!(o.timeout, Some(Duration::from_secs(5)));
        assert_eq!(p.isolation, Some(Isolation::FullOrEnv));
        let (o, _) = c.for_test(&meta("other", "fast"));
        assert_eq!(o, TestSettings::default());
        let d = Config::parse(FILE_TEXT, path, "default").unwrap();
        assert_eq!(d.profile.tests.retries, Some(1));
        assert_eq!(d.overrides.len(), 1);
    }

    #[test]
    fn errors_name_the_file_the_line_and_the_key() {
        let path = Path::new("/w/.config/dtf.toml");
        let err = |text: &str| Config::parse(text, path, "default").unwrap_err().0;
        let e = err("[profile.default]\nretries = 1\ntimeuot = \"1s\"\n");
        assert!(
            e.starts_with("/w/.config/dtf.toml:3: `profile.default.timeuot`"),
            "{e}"
        );
        assert!(e.contains("unknown key"), "{e}");
        let e = err("[profile.default]\n\ntimeout = \"fast\"\n");
        assert!(
            e.starts_with("/w/.config/dtf.toml:3: `profile.default.timeout`"),
            "{e}"
        );
        assert!(e.contains("invalid duration"), "{e}");
        let e = err("[profile.default]\ntest-threads = 0\n");
        assert!(e.contains(":2: `profile.default.test-threads`"), "{e}");
        let e = err("[[profile.default.overrides]]\nfilter = \"test(a) &\"\n");
        assert!(
            e.contains(":2: `profile.default.overrides[0].filter`"),
            "{e}"
        );
        assert!(e.contains("^"), "{e}");
        let e = err("[[profile.default.overrides]]\nfilter = \"all()\"\ntest-threads = 2\n");
        assert!(
            e.contains(":3:") && e.contains("applies to the whole run"),
            "{e}"
        );
        let e = err("[[profile.default.overrides]]\nfilter = \"all()\"\ntest-group = \"db\"\n");
        assert!(e.contains("test-group `db` is not defined"), "{e}");
        let e = err("[test-groups.db]\nmax-thread = 1\n");
        assert!(e.contains(":2: `test-groups.db.max-thread`"), "{e}");
        let e = err("[profile.default\n");
        assert!(e.contains("/w/.config/dtf.toml:1: invalid TOML"), "{e}");
        let e = Config::parse("", path, "nope").unwrap_err().0;
        assert!(e.contains("there is no profile `nope`"), "{e}");
    }

    #[test]
    fn worker_wait_and_refresh_take_seconds_or_durations() {
        let path = Path::new("/w/.config/dtf.toml");
        let text = "[profile.default]\nworker-wait = 0\nworkers-refresh = \"200ms\"\nrequire-workers = true\n\n[profile.ci]\nworker-wait = \"2m\"\n";
        let d = Config::parse(text, path, "default").unwrap();
        assert!(d.profile.env.contains(&("DTF_WORKER_WAIT", "0".to_owned())));
        assert!(
            d.profile
                .env
                .contains(&("DTF_WORKERS_REFRESH", "200ms".to_owned()))
        );
        assert!(
            d.profile
                .env
                .contains(&("DTF_REQUIRE_WORKERS", "1".to_owned()))
        );
        // A profile's value wins over default's; default's fills the rest.
        let ci = Config::parse(text, path, "ci").unwrap();
        let wait: Vec<&String> = ci
            .profile
            .env
            .iter()
            .filter(|(var, _)| *var == "DTF_WORKER_WAIT")
            .map(|(_, v)| v)
            .collect();
        assert_eq!(wait, ["2m"]);
        assert!(
            ci.profile
                .env
                .contains(&("DTF_WORKERS_REFRESH", "200ms".to_owned()))
        );
        let err = |text: &str| Config::parse(text, path, "default").unwrap_err().0;
        for bad in [
            "worker-wait = \"soon\"",
            "worker-wait = -1",
            "workers-refresh = true",
        ] {
            let e = err(&format!("[profile.default]\n{bad}\n"));
            assert!(e.contains(":2: `profile.default.worker"), "{bad}: {e}");
        }
        let e = err("[[profile.default.overrides]]\nfilter = \"all()\"\nworker-wait = 1\n");
        assert!(e.contains("applies to the whole run"), "{e}");
    }
}
