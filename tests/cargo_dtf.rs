//! `cargo dtf` on a one-package workspace: `--skip-unchanged` and a `target.<triple>.runner`
//! with `--target`. The input trees shipped with each binary to workers that cannot see the
//! checkout are `cargo_dtf_inputs.rs`'s.

use std::path::Path;
use std::time::Duration;

use dtf_e2e::run_bounded;
use dtf_e2e::workspace::Workspace;

const LIMIT: Duration = Duration::from_secs(600);

/// A dtf binary and a libtest binary; each passing test appends a line to a file named after
/// it in `$WS_STAMPS`, so a test can count how often each ran.
fn files(mark: &str, input: &str) -> Vec<(String, String)> {
    let dtf = Workspace::dtf_dependency();
    let stamp = r#"
fn stamp(name: &str) {
    use std::io::Write;
    let dir = std::env::var("WS_STAMPS").expect("WS_STAMPS passes through DTF_PASS_ENV");
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(format!("{dir}/{name}")).unwrap();
    writeln!(f, "ran").unwrap();
}
"#;
    vec![
        (
            "solo/Cargo.toml".to_owned(),
            format!(
                "[package]\nname = \"solo\"\nversion = \"0.1.0\"\nedition = \"2024\"\n\n[dev-dependencies]\n{dtf}\n\n[[test]]\nname = \"checks\"\nharness = false\n"
            ),
        ),
        ("solo/data/input.txt".to_owned(), input.to_owned()),
        (
            "solo/src/lib.rs".to_owned(),
            format!(
                "#[cfg(test)]\nmod tests {{{stamp}\n    #[test]\n    fn plain() {{\n        stamp(\"plain\");\n    }}\n}}\n"
            ),
        ),
        (
            "solo/tests/checks.rs".to_owned(),
            format!(
                r#"{stamp}
const MARK: &str = "{mark}";

#[dtf::test]
fn reads_setting() {{
    assert!(!MARK.is_empty());
    assert!(std::env::var("WS_SETTING").is_ok());
    stamp("reads_setting");
}}

#[dtf::test]
fn reads_package_file() {{
    let text = std::fs::read_to_string("data/input.txt").expect("the package's data/input.txt");
    assert!(!text.is_empty());
    stamp("reads_package_file");
}}

#[dtf::test]
fn always_fails() {{
    stamp("always_fails");
    panic!("fails on purpose");
}}

dtf::main!();
"#
            ),
        ),
    ]
}

fn workspace(name: &str, mark: &str, input: &str, extra: &[(String, String)]) -> Workspace {
    let mut files = files(mark, input);
    files.extend_from_slice(extra);
    // The generated workspaces share one target directory, so dtf builds once for them all.
    Workspace::generate(name, &["solo"], &files)
}

/// How many times each test has run so far.
fn counts(dir: &Path) -> Vec<(String, usize)> {
    [
        "plain",
        "reads_setting",
        "reads_package_file",
        "always_fails",
    ]
    .iter()
    .map(|name| {
        let n = std::fs::read_to_string(dir.join(name))
            .map(|t| t.lines().count())
            .unwrap_or(0);
        (name.to_string(), n)
    })
    .collect()
}

fn line<'a>(stdout: &'a str, test: &str) -> &'a str {
    stdout
        .lines()
        .find(|l| l.starts_with(&format!("test {test} ... ")))
        .unwrap_or_else(|| panic!("no line for {test}:\n{stdout}"))
}

#[test]
fn skip_unchanged_reruns_what_changed_and_what_failed() {
    let ws = workspace("unchanged", "a", "first\n", &[]);
    let stamps = tempfile::tempdir().unwrap();
    let history = tempfile::tempdir().unwrap();
    let run = |setting: &str, extra: &[&str]| {
        let mut args = vec!["--skip-unchanged"];
        args.extend_from_slice(extra);
        run_bounded(
            ws.cargo_dtf(&args)
                .env("DTF_PASS_ENV", "WS_*")
                .env("WS_STAMPS", stamps.path())
                .env("WS_SETTING", setting)
                // Sources are outside the input tree here, so an edit changes the binary only.
                .env("DTF_EXCLUDE", "src/**,tests/**")
                .env("DTF_HISTORY_DIR", history.path()),
            LIMIT,
        )
    };
    let each = |n: usize| -> Vec<(String, usize)> {
        [
            "plain",
            "reads_setting",
            "reads_package_file",
            "always_fails",
        ]
        .iter()
        .map(|t| (t.to_string(), n))
        .collect()
    };

    // First run: nothing is known, everything runs.
    let first = run("1", &[]);
    assert_eq!(first.code, Some(101), "{}\n{}", first.stdout, first.stderr);
    assert_eq!(counts(stamps.path()), each(1));
    assert!(!first.stdout.contains("(unchanged)"), "{}", first.stdout);

    // Nothing changed: only the test that failed runs again.
    let second = run("1", &["--format", "pretty"]);
    assert_eq!(
        second.code,
        Some(101),
        "{}\n{}",
        second.stdout,
        second.stderr
    );
    let mut expected = each(1);
    expected[3].1 = 2;
    assert_eq!(counts(stamps.path()), expected, "{}", second.stdout);
    for test in [
        "solo tests::plain",
        "solo::checks reads_setting",
        "solo::checks reads_package_file",
    ] {
        assert_eq!(
            line(&second.stdout, test),
            format!("test {test} ... ok (unchanged)"),
            "{}",
            second.stdout
        );
    }
    assert!(
        line(&second.stdout, "solo::checks always_fails").ends_with("FAILED"),
        "{}",
        second.stdout
    );
    assert!(
        second
            .stdout
            .contains("3 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out")
            && second.stdout.contains("; 3 unchanged"),
        "{}",
        second.stdout
    );

    // JSON and JUnit say so too.
    let junit = stamps.path().join("junit.xml");
    let third = run(
        "1",
        &["--format", "json", "--junit", junit.to_str().unwrap()],
    );
    assert_eq!(third.code, Some(101), "{}", third.stderr);
    let unchanged: Vec<serde_json::Value> = third
        .stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["type"] == "test" && v["dtf"]["unchanged"] == true)
        .collect();
    assert_eq!(unchanged.len(), 3, "{}", third.stdout);
    assert!(
        unchanged.iter().all(|v| v["event"] == "ok"),
        "{unchanged:?}"
    );
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert_eq!(
        xml.matches(r#"<property name="dtf.unchanged" value="true"/>"#)
            .count(),
        3,
        "{xml}"
    );
    let mut expected = each(1);
    expected[3].1 = 3;
    assert_eq!(counts(stamps.path()), expected);

    // A variable the tests see changed: they all run.
    let changed_env = run("2", &[]);
    assert!(
        !changed_env.stdout.contains("(unchanged)"),
        "{}",
        changed_env.stdout
    );
    assert_eq!(counts(stamps.path()), {
        let mut e = each(2);
        e[3].1 = 4;
        e
    });

    // An input file changed: the tests of that package's binaries run.
    workspace("unchanged", "a", "second\n", &[]);
    let changed_input = run("2", &[]);
    assert!(
        !changed_input.stdout.contains("(unchanged)"),
        "{}",
        changed_input.stdout
    );
    assert_eq!(counts(stamps.path()), {
        let mut e = each(3);
        e[3].1 = 5;
        e
    });

    // One binary changed: its tests run, the other binary's are unchanged.
    workspace("unchanged", "b", "second\n", &[]);
    let changed_binary = run("2", &[]);
    assert_eq!(
        line(&changed_binary.stdout, "solo tests::plain"),
        "test solo tests::plain ... ok (unchanged)",
        "{}",
        changed_binary.stdout
    );
    assert_eq!(
        line(&changed_binary.stdout, "solo::checks reads_setting"),
        "test solo::checks reads_setting ... ok",
        "{}",
        changed_binary.stdout
    );
    assert_eq!(counts(stamps.path()), {
        let mut e = each(4);
        e[0].1 = 3;
        e[3].1 = 6;
        e
    });
}

/// The host's triple, from `rustc -vV`.
fn host_triple() -> String {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned());
    let out = std::process::Command::new(rustc)
        .arg("-vV")
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .expect("rustc -vV names the host")
        .to_owned()
}

#[test]
fn with_target_the_configured_runner_starts_every_binary() {
    let triple = host_triple();
    let runner = "#!/bin/sh\necho \"$*\" >> \"$(dirname \"$0\")/runner.log\"\nexec \"$@\"\n";
    let config = format!("[target.{triple}]\nrunner = [\"./run.sh\"]\n");
    let ws = workspace(
        "runner",
        "a",
        "first\n",
        &[
            ("run.sh".to_owned(), runner.to_owned()),
            (".cargo/config.toml".to_owned(), config),
        ],
    );
    use std::os::unix::fs::PermissionsExt;
    let script = ws.root.join("run.sh");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let log = ws.root.join("runner.log");
    let _ = std::fs::remove_file(&log);
    let stamps = tempfile::tempdir().unwrap();
    let run = run_bounded(
        ws.cargo_dtf(&[
            "--target",
            &triple,
            "--lib",
            "--test",
            "checks",
            "--skip",
            "always_fails",
        ])
        .env("DTF_PASS_ENV", "WS_*")
        .env("WS_STAMPS", stamps.path())
        .env("WS_SETTING", "1"),
        LIMIT,
    );
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("3 passed; 0 failed"), "{}", run.stdout);
    let calls = std::fs::read_to_string(&log).expect("the runner was called");
    let lines: Vec<&str> = calls.lines().collect();
    let in_target = format!("/{triple}/debug/deps/");
    assert!(
        lines.iter().all(|l| l.contains(&in_target)),
        "every call runs a binary built for the target: {calls}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("/checks-") && l.ends_with("--list --format terse")),
        "listing goes through the runner: {calls}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.ends_with("--exact tests::plain --nocapture")),
        "a libtest test goes through the runner: {calls}"
    );
    let dtf_tests = lines
        .iter()
        .filter(|l| l.contains("/checks-") && !l.contains(' '))
        .count();
    assert_eq!(
        dtf_tests, 2,
        "each dtf test's process goes through the runner: {calls}"
    );
    assert_eq!(
        counts(stamps.path())[..3]
            .iter()
            .map(|c| c.1)
            .sum::<usize>(),
        3
    );

    // The variable wins over the config file, as under cargo.
    let _ = std::fs::remove_file(&log);
    let other = ws.root.join("other.sh");
    std::fs::write(
        &other,
        "#!/bin/sh\necho \"$*\" >> \"$(dirname \"$0\")/other.log\"\nexec \"$@\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o755)).unwrap();
    let var = format!(
        "CARGO_TARGET_{}_RUNNER",
        triple.to_uppercase().replace(['-', '.'], "_")
    );
    let run = run_bounded(
        ws.cargo_dtf(&[
            "--target",
            &triple,
            "--test",
            "checks",
            "--skip",
            "always_fails",
        ])
        .env(&var, &other)
        .env("DTF_PASS_ENV", "WS_*")
        .env("WS_STAMPS", stamps.path())
        .env("WS_SETTING", "1"),
        LIMIT,
    );
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    assert!(!log.exists(), "the config's runner was not used");
    let other_calls = std::fs::read_to_string(ws.root.join("other.log")).unwrap();
    assert!(other_calls.lines().count() >= 3, "{other_calls}");
    let _ = std::fs::remove_file(ws.root.join("other.log"));
}
