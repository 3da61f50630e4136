//! Inputs travel with the binary: the tests of `tests/inputs-fixture` (fixtures by relative
//! path and through CARGO_MANIFEST_DIR, a companion binary, build-script output, a Rust dylib,
//! `cargo --version`, outputs that come back...) give the same outcomes on a worker that cannot
//! see this checkout (its own mount namespace with a tmpfs over the workspace) as locally.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use dtf_e2e::*;

const LIMIT: Duration = Duration::from_secs(180);

/// The fixture package's directory.
fn package() -> PathBuf {
    workspace_root().join("tests/inputs-fixture")
}

fn binary() -> PathBuf {
    // A dylib's file name carries no hash: after dtf itself was rebuilt, rustc has been seen to
    // refuse linking the fixture against the stale `libdtf_inputs_dylib.so` ("cannot satisfy
    // dependencies so `std` only shows up once"). Rebuilding the (tiny) dylib first avoids it.
    static CLEANED: std::sync::Once = std::sync::Once::new();
    CLEANED.call_once(|| {
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(workspace_root())
            .args(["clean", "--quiet", "-p", "dtf-inputs-dylib"])
            .status()
            .expect("cargo runs");
        assert!(status.success(), "cargo clean -p dtf-inputs-dylib failed");
    });
    test_binary("dtf-inputs-fixture", "inputs")
}

/// What cargo puts on the loader path for a test: the target directory's libraries and the
/// toolchain's.
fn loader_path(binary: &Path) -> String {
    let sysroot = Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
        .args(["--print", "target-libdir"])
        .output()
        .expect("rustc runs");
    let deps = binary.parent().expect("deps");
    format!(
        "{}:{}:{}",
        deps.display(),
        deps.parent().expect("profile").display(),
        String::from_utf8_lossy(&sysroot.stdout).trim()
    )
}

/// A command for the fixture as `cargo test` would start it.
fn fixture_command(binary: &Path) -> Command {
    let mut cmd = dtf_command(binary);
    cmd.current_dir(package())
        .env("CARGO_MANIFEST_DIR", package())
        .env("LD_LIBRARY_PATH", loader_path(binary));
    cmd
}

/// A worker that cannot see the checkout.
fn hidden_worker(env: &[(&str, &str)]) -> Worker {
    Worker::start_with(WorkerConfig {
        hide: Some(workspace_root()),
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..WorkerConfig::default()
    })
}

fn on_worker(cmd: &mut Command, w: &Worker) {
    cmd.env("DTF_WORKERS", &w.addr)
        .env("DTF_REQUIRE_WORKERS", "1")
        .env("DTF_TOKEN", w.token.as_deref().unwrap_or_default());
}

/// The outputs the fixture writes into the checkout, removed before and after a run. One test
/// at a time holds them: they are files of the shared checkout.
struct Outputs {
    profiles: tempfile::TempDir,
    _turn: std::sync::MutexGuard<'static, ()>,
}

impl Outputs {
    fn new() -> Outputs {
        static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let outputs = Outputs {
            profiles: tempfile::tempdir().unwrap(),
            _turn: TURN.lock().unwrap_or_else(|e| e.into_inner()),
        };
        outputs.clear();
        outputs
    }

    fn profile_pattern(&self) -> String {
        format!("{}/fixture-%p-%m.profraw", self.profiles.path().display())
    }

    fn snapshot(&self) -> PathBuf {
        package().join("tests/snapshots/inputs__snap.snap.new")
    }

    fn report(&self) -> PathBuf {
        package().join("out/report.json")
    }

    fn profiles(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.profiles.path())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect()
    }

    fn clear(&self) {
        let _ = std::fs::remove_file(self.snapshot());
        let _ = std::fs::remove_dir_all(package().join("out"));
        for p in self.profiles() {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Drop for Outputs {
    fn drop(&mut self) {
        self.clear();
    }
}

fn shipped_lines(run: &Run) -> Vec<&str> {
    run.stdout
        .lines()
        .chain(run.stderr.lines())
        .filter(|l| l.contains("shipped"))
        .collect()
}

#[test]
fn a_worker_that_cannot_see_the_checkout_gives_the_local_outcomes() {
    let binary = binary();
    let outputs = Outputs::new();

    let local = run_bounded(
        fixture_command(&binary).env("LLVM_PROFILE_FILE", outputs.profile_pattern()),
        LIMIT,
    );
    assert_eq!(
        local.code,
        Some(0),
        "the fixture passes locally:\n{}",
        local.dump()
    );
    let local_results = results(&local.stdout);
    assert_eq!(local_results.len(), 18, "{}", local.dump());
    assert!(outputs.snapshot().is_file() && outputs.report().is_file());
    assert_eq!(outputs.profiles().len(), 1);
    outputs.clear();

    let worker = hidden_worker(&[]);
    let mut cmd = fixture_command(&binary);
    on_worker(&mut cmd, &worker);
    cmd.env("LLVM_PROFILE_FILE", outputs.profile_pattern());
    let cold = run_bounded(&mut cmd, LIMIT);
    assert_eq!(
        results(&cold.stdout),
        local_results,
        "same outcomes on the worker:\n{}",
        cold.dump()
    );
    assert_eq!(cold.code, Some(0), "{}", cold.dump());
    assert!(
        cold.stdout.contains(&format!("{} ran 16", worker.addr)),
        "{}",
        cold.dump()
    );
    // The tests were forked from the worker's fork server: the server, started with the
    // test's loader path, loaded the shipped Rust dylib and libstd.
    assert!(
        !worker.log().contains("instead of from the fork server"),
        "{}",
        worker.log()
    );
    let inputs = cold
        .stdout
        .lines()
        .find(|l| l.starts_with("dtf: inputs: "))
        .unwrap_or_else(|| panic!("no inputs line:\n{}", cold.dump()));
    assert!(inputs.contains("shipped to 1 of 1 ("), "{inputs}");
    assert!(
        !inputs.contains("(0 bytes"),
        "a cold worker gets the files: {inputs}"
    );
    // What the tests wrote came back into the same paths.
    assert!(outputs.snapshot().is_file(), "{}", cold.dump());
    assert_eq!(
        std::fs::read_to_string(outputs.report()).unwrap(),
        "{\"ok\":true}\n"
    );
    assert_eq!(outputs.profiles().len(), 1, "{}", cold.dump());
    assert!(
        cold.stdout.contains("dtf: outputs: 3 files came back"),
        "{}",
        cold.dump()
    );

    // A warm re-run ships nothing, binary or inputs; of the outputs only the new profile (its
    // name holds the pid) comes back, the identical others are not sent again.
    let warm = run_bounded(&mut cmd, LIMIT);
    assert_eq!(results(&warm.stdout), local_results, "{}", warm.dump());
    let lines = shipped_lines(&warm);
    assert_eq!(lines.len(), 2, "{}", warm.dump());
    for line in lines {
        assert!(line.contains("shipped to 0 of 1 (0 bytes"), "{line}");
    }
    assert!(
        warm.stdout
            .contains("dtf: outputs: 1 file came back (7 bytes)"),
        "{}",
        warm.dump()
    );

    // One changed fixture ships one file.
    let generated = package().join("fixtures/generated");
    std::fs::create_dir_all(&generated).unwrap();
    let changing = generated.join("changing.txt");
    let included = |cmd: &mut Command| -> Run {
        cmd.env("DTF_INCLUDE", "fixtures/generated/**")
            .args(["--ignored", "reads_an_included_file"]);
        run_bounded(cmd, LIMIT)
    };
    std::fs::write(&changing, "first").unwrap();
    let mut cmd = fixture_command(&binary);
    on_worker(&mut cmd, &worker);
    let first = included(&mut cmd);
    assert_eq!(
        first.result_of("reads_an_included_file"),
        Some("ok"),
        "{}",
        first.dump()
    );
    std::fs::write(&changing, "second").unwrap();
    let mut cmd = fixture_command(&binary);
    on_worker(&mut cmd, &worker);
    let second = included(&mut cmd);
    let _ = std::fs::remove_dir_all(&generated);
    assert_eq!(
        second.result_of("reads_an_included_file"),
        Some("ok"),
        "{}",
        second.dump()
    );
    assert!(
        second
            .stdout
            .contains("dtf: inputs: 1 file shipped to 1 of 1 ("),
        "{}",
        second.dump()
    );

    // A file that exists here but is not shipped (.gitignore) fails with a note saying so.
    let local_only = package().join("fixtures/local-only.log");
    std::fs::write(&local_only, "local\n").unwrap();
    let mut cmd = fixture_command(&binary);
    on_worker(&mut cmd, &worker);
    cmd.args(["--ignored", "reads_a_local_only_file"]);
    let missing = run_bounded(&mut cmd, LIMIT);
    let _ = std::fs::remove_file(&local_only);
    let section = missing
        .section_of("reads_a_local_only_file")
        .unwrap_or_else(|| panic!("{}", missing.dump()));
    assert!(
        section.contains("exists on the coordinator but was not shipped")
            && section.contains("DTF_INCLUDE=fixtures/local-only.log"),
        "{section}"
    );

    // A tree over its cap fails before any test runs, naming the largest entries.
    let mut cmd = fixture_command(&binary);
    on_worker(&mut cmd, &worker);
    cmd.env("DTF_INPUT_MAX", "1KiB");
    let capped = run_bounded(&mut cmd, LIMIT);
    assert_eq!(capped.code, Some(101), "{}", capped.dump());
    assert!(
        capped
            .stderr
            .contains("over the cap of 1024 bytes (DTF_INPUT_MAX)")
            && capped.stderr.contains("the largest entries: ")
            && capped.stderr.contains("exclude = ["),
        "{}",
        capped.dump()
    );
    assert!(!capped.stdout.contains("test result"), "{}", capped.dump());
}

#[test]
fn a_worker_without_namespaces_remaps_what_it_can_and_says_what_will_not_resolve() {
    let binary = binary();
    let _outputs = Outputs::new();
    let worker = hidden_worker(&[("DTF_FAULT_PATHS", "EPERM")]);
    assert!(
        eventually(Duration::from_secs(5), || worker
            .log()
            .contains("cannot map the coordinator's paths")),
        "{}",
        worker.log()
    );
    let mut cmd = fixture_command(&binary);
    on_worker(&mut cmd, &worker);
    let run = run_bounded(&mut cmd, LIMIT);
    let got = results(&run.stdout);
    // What is remapped at run time: the working directory, CARGO_MANIFEST_DIR, the loader path.
    for name in [
        "relative_fixture",
        "nested_fixture_directory",
        "run_time_manifest_dir",
        "cwd_is_the_package_root",
        "rust_dylib_dependency",
        "scratch_file_in_the_package_root",
        "included_workspace_directory",
        "runs_cargo",
    ] {
        assert_eq!(
            got.get(name).map(String::as_str),
            Some("ok"),
            "{name}:\n{}",
            run.dump()
        );
    }
    // Paths compiled into the binary do not resolve there.
    for name in [
        "compile_time_manifest_dir",
        "companion_binary",
        "build_script_output",
    ] {
        assert_eq!(
            got.get(name).map(String::as_str),
            Some("FAILED"),
            "{name}:\n{}",
            run.dump()
        );
    }
    let notes: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.contains("cannot map this machine's paths"))
        .collect();
    assert_eq!(notes.len(), 1, "said once:\n{}", run.dump());
    assert!(
        notes[0].contains(&format!("CARGO_MANIFEST_DIR = {}", package().display()))
            && notes[0].contains("OUT_DIR = ")
            && notes[0].contains("CARGO_BIN_EXE_dtf-inputs-fixture = "),
        "{}",
        notes[0]
    );
}

#[test]
fn a_hostile_manifest_is_refused_and_the_worker_keeps_serving() {
    use dtf::inputs::{Entry, EntryKind, Manifest, Root, RootKind};
    use dtf::protocol::{self, Chunk, Digest, Hello, Token};
    let worker = Worker::start();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let token = Token::new(TOKEN, "test").unwrap();
        let hello = Hello {
            run: "hostile".into(),
            key: None,
        };
        let conn = protocol::connect(&worker.addr, Some(&token), hello, Duration::from_secs(10))
            .await
            .unwrap();
        let ctx = || protocol::context_within(Duration::from_secs(10));
        let content = b"x".to_vec();
        let file = |path: &str| Entry {
            path: path.into(),
            kind: EntryKind::File {
                digest: Digest::of(&content),
                size: 1,
                executable: false,
            },
        };
        let root = |path: &str, entries| Manifest {
            roots: vec![Root {
                path: path.into(),
                kind: RootKind::Tree,
                entries,
            }],
            outputs: Vec::new(),
        };
        let upload = |bytes: Vec<u8>| {
            let client = conn.client.clone();
            async move {
                let digest = Digest::of(&bytes);
                client
                    .upload(
                        ctx(),
                        Chunk {
                            digest,
                            total: bytes.len() as u64,
                            offset: 0,
                            data: bytes,
                        },
                    )
                    .await
                    .unwrap()
                    .unwrap();
                digest
            }
        };
        upload(content.clone()).await;
        let hostile = [
            (
                "a parent component",
                root("/tmp/app", vec![file("../../etc/evil")]),
            ),
            (
                "an absolute entry",
                root("/tmp/app", vec![file("/etc/evil")]),
            ),
            ("a relative root", root("tmp/app", vec![file("a")])),
            (
                "a symlink leading outside",
                root(
                    "/tmp/app",
                    vec![
                        Entry {
                            path: "link".into(),
                            kind: EntryKind::Symlink {
                                target: "../../../etc".into(),
                            },
                        },
                        file("link/evil"),
                    ],
                ),
            ),
        ];
        for (what, manifest) in hostile {
            let digest = upload(manifest.encode()).await;
            let answer = conn.client.prepare_inputs(ctx(), digest).await.unwrap();
            let refusal = answer.expect_err(what);
            assert!(
                refusal.contains("refused the manifest"),
                "{what}: {refusal}"
            );
        }
        // Garbage that is not a manifest at all.
        let digest = upload(b"\xff\xff\xff\xff not postcard".to_vec()).await;
        assert!(
            conn.client
                .prepare_inputs(ctx(), digest)
                .await
                .unwrap()
                .is_err()
        );
        // The worker still serves.
        conn.client.ping(ctx()).await.unwrap();
    });
    assert!(!Path::new("/etc/evil").exists());
    // And answers others.
    let status = worker.status();
    assert!(status["uptime_secs"].is_u64(), "{status}");
}

/// The worker's fork server maps the coordinator's paths once for all the tests it forks
/// (rather than each test making a namespace of its own); what a test mounts still ends with
/// it. As root, a test keeps the capabilities to mount: the second probe fails if it sees the
/// first one's mount.
#[test]
fn a_test_s_mounts_on_a_worker_end_with_it() {
    let binary = test_binary("dtf-fixture", "package_root");
    let package = workspace_root().join("tests/fixture");
    let worker = hidden_worker(&[]);
    let mut cmd = dtf_command(&binary);
    cmd.current_dir(&package)
        .env("CARGO_MANIFEST_DIR", &package)
        .args(["--ignored", "--test-threads", "1", "--order", "name"]);
    on_worker(&mut cmd, &worker);
    let run = run_bounded(&mut cmd, LIMIT);
    assert_eq!(run.code, Some(0), "{}", run.dump());
    assert!(
        run.stdout.contains("test result: ok. 2 passed")
            && run.stdout.contains(&format!("{} ran 2", worker.addr)),
        "both probes ran on the worker:\n{}",
        run.dump()
    );
    assert!(
        !run.stderr.contains("instead of from the fork server"),
        "the tests were forked from the worker's fork server:\n{}",
        run.dump()
    );
}
