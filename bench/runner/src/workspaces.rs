//! Whole workspaces: `cargo dtf` against `cargo test` (one coordinator per binary) on workers,
//! and against `cargo nextest run` locally, on generated workspaces built in release mode under
//! `target/dtf-workspaces/` (warm: each figure is a re-run).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::measure::{self, secs, time_median};
use crate::sections::Bench;
use crate::workers::LocalWorkers;

/// A generated workspace: its root and target directory.
struct Generated {
    root: PathBuf,
    target: PathBuf,
}

fn write_if_changed(path: &Path, text: &str) -> Result<(), String> {
    if std::fs::read_to_string(path).is_ok_and(|old| old == text) {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

/// One package `suite` with `binaries` test targets of `tests` tests each; `dtf` chooses dtf
/// binaries (else plain `#[test]`); every test sleeps `sleep_ms`.
fn generate(
    name: &str,
    binaries: usize,
    tests: usize,
    sleep_ms: u64,
    dtf: bool,
) -> Result<Generated, String> {
    let checkout = measure::workspace_root();
    let base = checkout.join("target").join("dtf-workspaces");
    let root = base.join(name);
    write_if_changed(
        &root.join("Cargo.toml"),
        "[workspace]\nresolver = \"3\"\nmembers = [\"suite\"]\n",
    )?;
    let lock = std::fs::read_to_string(checkout.join("Cargo.lock"))
        .map_err(|e| format!("Cargo.lock: {e}"))?;
    write_if_changed(&root.join("Cargo.lock"), &lock)?;
    let mut manifest = String::from(
        // The library only exists because a package needs one; it has no tests, and libtest
        // (unit tests, doctests) would refuse dtf's flags after `cargo test --`.
        "[package]\nname = \"suite\"\nversion = \"0.1.0\"\nedition = \"2024\"\n\n\
         [lib]\ntest = false\ndoctest = false\n\n[dev-dependencies]\n",
    );
    if dtf {
        manifest.push_str(&format!(
            "dtf = {{ path = \"{}\" }}\n",
            checkout.join("dtf").display()
        ));
    }
    for b in 0..binaries {
        manifest.push_str(&format!("\n[[test]]\nname = \"b{b:02}\"\n"));
        if dtf {
            manifest.push_str("harness = false\n");
        }
    }
    write_if_changed(&root.join("suite/Cargo.toml"), &manifest)?;
    write_if_changed(&root.join("suite/src/lib.rs"), "//! Nothing.\n")?;
    for b in 0..binaries {
        let mut text = String::new();
        for t in 0..tests {
            let attr = if dtf { "#[dtf::test]" } else { "#[test]" };
            let body = if sleep_ms > 0 {
                format!("std::thread::sleep(std::time::Duration::from_millis({sleep_ms}));")
            } else {
                String::new()
            };
            text.push_str(&format!("{attr}\nfn t{t:03}() {{ {body} }}\n\n"));
        }
        if dtf {
            text.push_str("dtf::main!();\n");
        }
        write_if_changed(&root.join(format!("suite/tests/b{b:02}.rs")), &text)?;
    }
    Ok(Generated {
        target: base.join(format!("{name}-target")),
        root,
    })
}

impl Generated {
    fn command(&self, program: &str) -> Command {
        let mut cmd = measure::clean_command(Path::new(program));
        cmd.current_dir(&self.root)
            .env("CARGO_TARGET_DIR", &self.target)
            .env_remove("CARGO_MANIFEST_DIR")
            .env_remove("CARGO_PKG_NAME");
        cmd
    }

    /// Builds the workspace's tests (release) so the timed runs are warm.
    fn build(&self) -> Result<(), String> {
        let status = self
            .command(&measure::cargo())
            .args(["test", "--release", "--no-run", "--quiet"])
            .status()
            .map_err(|e| format!("cannot run cargo: {e}"))?;
        if !status.success() {
            return Err(format!("building {} failed", self.root.display()));
        }
        Ok(())
    }
}

/// `cargo-dtf` of this checkout (release).
fn cargo_dtf() -> Result<PathBuf, String> {
    let status = Command::new(measure::cargo())
        .current_dir(measure::workspace_root())
        .args(["build", "--release", "--quiet", "-p", "cargo-dtf"])
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() {
        return Err("building cargo-dtf failed".to_owned());
    }
    Ok(measure::workspace_root().join("target/release/cargo-dtf"))
}

/// The rows: the 20 × 20 × 50 ms workspace on 4 workers × 2 slots, and 1000 trivial tests
/// over 10 binaries locally.
pub fn workspaces(b: &mut Bench) -> Result<(), String> {
    let cargo_dtf = cargo_dtf()?;
    let cargo_dtf = cargo_dtf.display().to_string();
    let (binaries, tests) = if b.quick() { (5, 4) } else { (20, 20) };
    let sleepy = generate("bench-sleepy", binaries, tests, 50, true)?;
    sleepy.build()?;
    let worker_bin = b.worker_binary()?;
    let (k, slots) = (4, 2);
    let workers = LocalWorkers::start(&worker_bin, k, slots, None)?;
    let total = binaries * tests;
    let bound = (total as f64 * 0.050 / (k * slots) as f64).max(0.050);
    // A first run ships the binaries to the workers' caches (hundreds of megabytes written):
    // it runs, and is flushed to disk, before the warm runs are timed. It is the timed runs'
    // command, so it also leaves the record a warm run starts from while cargo checks the
    // build.
    let _ = sleepy
        .command(&cargo_dtf)
        .args(["dtf", "--release", "-q", "--order", "name"])
        .env("DTF_WORKERS", workers.addrs())
        .env("DTF_TOKEN", workers.token())
        .env("DTF_REQUIRE_WORKERS", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    let _ = Command::new("sync").status();
    let ours = time_median(b.reps(), || {
        let mut c = sleepy.command(&cargo_dtf);
        c.args(["dtf", "--release", "-q", "--order", "name"])
            .env("DTF_WORKERS", workers.addrs())
            .env("DTF_TOKEN", workers.token())
            .env("DTF_REQUIRE_WORKERS", "1");
        c
    })?;
    let theirs = time_median(b.reps(), || {
        let mut c = sleepy.command(&measure::cargo());
        c.args(["test", "--release", "-q", "--", "--order", "name"])
            .env("DTF_WORKERS", workers.addrs())
            .env("DTF_TOKEN", workers.token())
            .env("DTF_REQUIRE_WORKERS", "1");
        c
    })?;
    drop(workers);
    let eff = |d: Duration| 100.0 * bound / d.as_secs_f64();
    let what =
        format!("{binaries} binaries × {tests} × 50 ms on {k} workers × {slots} slots: cargo dtf");
    let value = format!("{} vs bound {bound:.3} s: {:.1} %", secs(ours), eff(ours));
    b.target_row(
        "workspace",
        what,
        value,
        eff(ours),
        "≥ 90 %",
        eff(ours) >= 90.0,
    );
    b.row(
        "workspace",
        "the same with `cargo test` and DTF_WORKERS (one coordinator per binary)".to_owned(),
        format!(
            "{} vs bound {bound:.3} s: {:.1} %",
            secs(theirs),
            eff(theirs)
        ),
        eff(theirs),
    );

    let (binaries, tests) = if b.quick() { (4, 25) } else { (10, 100) };
    let trivial = generate("bench-trivial", binaries, tests, 0, false)?;
    trivial.build()?;
    let ours = time_median(b.reps(), || {
        let mut c = trivial.command(&cargo_dtf);
        c.args(["dtf", "--release", "-q"]);
        c
    })?;
    let nextest = time_median(b.reps(), || {
        let mut c = trivial.command(&measure::cargo());
        c.args([
            "nextest",
            "run",
            "--release",
            "--no-fail-fast",
            "--status-level",
            "none",
            "--final-status-level",
            "none",
        ]);
        c
    })?;
    let n = binaries * tests;
    b.row(
        "workspace",
        format!("{n} trivial #[test]s over {binaries} binaries, local: cargo dtf"),
        secs(ours),
        ours.as_secs_f64(),
    );
    b.row(
        "workspace",
        "the same with cargo nextest run (ratio: cargo dtf / nextest)".to_owned(),
        format!(
            "{} ({:.2}×)",
            secs(nextest),
            ours.as_secs_f64() / nextest.as_secs_f64()
        ),
        nextest.as_secs_f64(),
    );
    Ok(())
}
