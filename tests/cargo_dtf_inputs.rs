//! `cargo dtf` ships each binary's input tree: a generated workspace of two packages, each with
//! a dtf binary and a libtest binary whose tests read a file of their own package root, runs on
//! two workers that cannot see the checkout (each in its own mount namespace with a tmpfs over
//! it). Every test passes and reads its own package's file; a warm second run ships nothing.

use std::time::Duration;

use dtf_e2e::workspace::Workspace;
use dtf_e2e::{Run, Worker, WorkerConfig, run_bounded, workspace_root};

const LIMIT: Duration = Duration::from_secs(600);

/// Names no other generated workspace uses: cargo names a path package's artifacts by its
/// name and its path relative to its workspace, and the workspaces share a target directory.
const PACKAGES: &[&str] = &["carrot", "turnip"];

/// Package `name`: `fixtures/data.txt` says `data of NAME`; the tests of its dtf binary and of
/// its library's unit tests read it by a relative path (the working directory is the package
/// root) and through `CARGO_MANIFEST_DIR`, and compare it with their own package's name.
fn package(name: &str) -> Vec<(String, String)> {
    let dtf = Workspace::dtf_dependency();
    let check = r#"
fn check(text: std::io::Result<String>, how: &str) {
    let text = text.unwrap_or_else(|e| panic!("cannot read fixtures/data.txt {how}: {e}"));
    assert_eq!(text, format!("data of {}\n", env!("CARGO_PKG_NAME")), "read {how}");
}
"#;
    vec![
        (
            format!("{name}/Cargo.toml"),
            format!(
                "[package]\nname = \"{name}\"\nversion = \"0.1.0\"\nedition = \"2024\"\n\n[dev-dependencies]\n{dtf}\n\n[[test]]\nname = \"reads\"\nharness = false\n"
            ),
        ),
        (
            format!("{name}/fixtures/data.txt"),
            format!("data of {name}\n"),
        ),
        (
            format!("{name}/src/lib.rs"),
            format!(
                r#"#[cfg(test)]
mod tests {{{check}
    #[test]
    fn unit_reads_relative() {{
        check(std::fs::read_to_string("fixtures/data.txt"), "by a relative path");
    }}
}}
"#
            ),
        ),
        (
            format!("{name}/tests/reads.rs"),
            format!(
                r#"{check}
#[dtf::test]
fn reads_relative() {{
    check(std::fs::read_to_string("fixtures/data.txt"), "by a relative path");
}}

#[dtf::test]
fn reads_through_manifest_dir() {{
    let root = std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR is set");
    check(
        std::fs::read_to_string(std::path::Path::new(&root).join("fixtures/data.txt")),
        "through CARGO_MANIFEST_DIR",
    );
}}

dtf::main!();
"#
            ),
        ),
    ]
}

/// The tests every run runs, as `cargo dtf` names them.
fn tests() -> Vec<String> {
    PACKAGES
        .iter()
        .flat_map(|p| {
            [
                format!("{p}::reads reads_relative"),
                format!("{p}::reads reads_through_manifest_dir"),
                format!("{p} tests::unit_reads_relative"),
            ]
        })
        .collect()
}

/// True when `test` is reported as passed.
fn passed(run: &Run, test: &str) -> bool {
    run.result_of(test).is_some_and(|r| r.starts_with("ok"))
}

/// The summary line that starts with `prefix`.
fn summary<'a>(run: &'a Run, prefix: &str) -> &'a str {
    run.stdout
        .lines()
        .chain(run.stderr.lines())
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting with `{prefix}`:\n{}", run.dump()))
}

/// How many tests the workers say they ran: `dtf: ADDR ran N[, ...]; ADDR ran M...`.
fn ran_on_workers(run: &Run, workers: &[&Worker]) -> usize {
    let line = summary(run, &format!("dtf: {} ran ", workers[0].addr))
        .trim_start_matches("dtf: ")
        .to_owned();
    line.split("; ")
        .filter(|part| {
            workers
                .iter()
                .any(|w| part.starts_with(&format!("{} ", w.addr)))
        })
        .map(|part| {
            let n = part.split(" ran ").nth(1).unwrap_or_default();
            let n: String = n.chars().take_while(char::is_ascii_digit).collect();
            n.parse::<usize>()
                .unwrap_or_else(|_| panic!("no count in `{part}`: {line}"))
        })
        .sum()
}

#[test]
fn every_binary_sees_its_own_package_tree_on_workers_that_cannot_see_the_checkout() {
    let files: Vec<(String, String)> = PACKAGES.iter().flat_map(|p| package(p)).collect();
    let ws = Workspace::generate("inputs", PACKAGES, &files);
    // The generated workspace lives in this checkout's target directory, which the workers
    // cannot see.
    assert!(ws.root.starts_with(workspace_root()));
    let hidden = || {
        Worker::start_with(WorkerConfig {
            hide: Some(workspace_root()),
            ..WorkerConfig::default()
        })
    };
    let workers = [hidden(), hidden()];
    let addrs: Vec<&str> = workers.iter().map(|w| w.addr.as_str()).collect();
    let run = || {
        run_bounded(
            ws.cargo_dtf(&["--workspace", "--workers", &addrs.join(",")])
                .env("DTF_REQUIRE_WORKERS", "1")
                .env("DTF_TOKEN", workers[0].token.as_deref().unwrap_or_default()),
            LIMIT,
        )
    };

    let cold = run();
    assert_eq!(cold.code, Some(0), "{}", cold.dump());
    for test in tests() {
        assert!(passed(&cold, &test), "{test}:\n{}", cold.dump());
    }
    let workers_ref: Vec<&Worker> = workers.iter().collect();
    assert_eq!(
        ran_on_workers(&cold, &workers_ref),
        tests().len(),
        "every test ran on a worker:\n{}",
        cold.dump()
    );
    // Four binaries (a dtf binary and a library's unit tests per package), two trees (one per
    // package), each shipped to both workers.
    let binaries = summary(&cold, "dtf: 2 workers; ");
    assert!(
        binaries.contains("4 binaries shipped to 2 of 2 ("),
        "{binaries}"
    );
    let inputs = summary(&cold, "dtf: inputs: ");
    assert!(
        inputs.contains("shipped to 2 of 2 (") && inputs.ends_with(" in 2 trees"),
        "{inputs}"
    );
    assert!(
        !inputs.contains("(0 bytes"),
        "cold workers get the files: {inputs}"
    );

    // A warm second run ships nothing, binaries or trees, and gives the same outcomes.
    let warm = run();
    assert_eq!(warm.code, Some(0), "{}", warm.dump());
    for test in tests() {
        assert!(passed(&warm, &test), "{test}:\n{}", warm.dump());
    }
    assert_eq!(ran_on_workers(&warm, &workers_ref), tests().len());
    let binaries = summary(&warm, "dtf: 2 workers; ");
    assert!(
        binaries.contains("4 binaries shipped to 0 of 2 (0 bytes)"),
        "{binaries}"
    );
    let inputs = summary(&warm, "dtf: inputs: ");
    assert!(
        inputs.starts_with("dtf: inputs: 0 files shipped to 0 of 2 (0 bytes)")
            && inputs.ends_with(" in 2 trees"),
        "{inputs}"
    );

    // Changing one package's file ships that file alone, and its tests read the new text.
    let data = ws.root.join("carrot/fixtures/data.txt");
    std::fs::write(&data, "changed\n").unwrap();
    let changed = run();
    std::fs::write(&data, "data of carrot\n").unwrap();
    assert_eq!(changed.code, Some(101), "{}", changed.dump());
    for test in tests() {
        let failed = changed
            .result_of(&test)
            .is_some_and(|r| r.starts_with("FAILED"));
        assert_eq!(
            (passed(&changed, &test), failed),
            (!test.starts_with("carrot"), test.starts_with("carrot")),
            "{test}:\n{}",
            changed.dump()
        );
    }
    let inputs = summary(&changed, "dtf: inputs: ");
    assert!(
        inputs.starts_with("dtf: inputs: 2 files shipped to 2 of 2 ("),
        "one file (and its package's new manifest) to each worker: {inputs}"
    );
}
