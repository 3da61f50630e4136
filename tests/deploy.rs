//! The packaging in `deploy/`, checked statically (no init system, container runtime, image
//! registry or cluster runs here): the systemd unit with `systemd-analyze`, the Containerfile
//! with hadolint, the Kubernetes manifests against the Kubernetes schema, and every worker
//! flag they use against the worker's own `--help`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use dtf_e2e::*;

const LIMIT: Duration = Duration::from_secs(120);

fn deploy(path: &str) -> PathBuf {
    workspace_root().join("deploy").join(path)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

const UNIT: &str = "systemd/dtf-worker.service";
const CONTAINERFILE: &str = "Containerfile";
const MANIFESTS: [&str; 3] = [
    "kubernetes/deployment.yaml",
    "kubernetes/service.yaml",
    "kubernetes/secret.yaml",
];

/// The unit with its `ExecStart` pointing at the worker this workspace builds (verify checks
/// that the command exists), in a directory of its own under its own name.
fn unit_for_verify() -> (tempfile::TempDir, PathBuf) {
    let unit = read(&deploy(UNIT));
    assert!(
        unit.contains("ExecStart=/usr/local/bin/dtf-worker "),
        "{unit}"
    );
    let unit = unit.replace(
        "ExecStart=/usr/local/bin/dtf-worker ",
        &format!("ExecStart={} ", worker_binary().display()),
    );
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("dtf-worker.service");
    std::fs::write(&path, unit).expect("write the unit");
    (dir, path)
}

#[test]
fn the_systemd_unit_verifies_and_is_hardened() {
    let (_dir, unit) = unit_for_verify();
    let analyze = tool("systemd-analyze");
    let run = run_bounded(Command::new(&analyze).arg("verify").arg(&unit), LIMIT);
    assert_eq!(run.code, Some(0), "{}", run.dump());
    // Unknown or misspelt settings are only warnings: there must be none.
    assert_eq!(run.stderr.trim(), "", "{}", run.dump());

    let run = run_bounded(
        Command::new(&analyze)
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(&unit),
        LIMIT,
    );
    let all = format!("{}{}", run.stdout, run.stderr);
    let exposure: f64 = all
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for dtf-worker.service: "))
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{all}"));
    assert!(
        exposure <= 3.5,
        "exposure {exposure} (0 is best, 10 worst):\n{all}"
    );

    let text = read(&deploy(UNIT));
    let setting = |key: &str| -> String {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("{key}= in the unit"))
            .to_owned()
    };
    assert_eq!(setting("DynamicUser"), "yes");
    assert_eq!(setting("ProtectSystem"), "strict");
    assert_eq!(setting("CacheDirectory"), "dtf-worker");
    assert!(setting("LoadCredential").starts_with("token:"));
    assert!(text.contains("--token-file ${CREDENTIALS_DIRECTORY}/token"));
    assert!(text.contains("--cache-dir ${CACHE_DIRECTORY}"));
    let allowed: Vec<String> = setting("RestrictNamespaces")
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    for ns in ["user", "mnt", "net", "pid", "ipc", "uts"] {
        assert!(allowed.iter().any(|a| a == ns), "{ns} in {allowed:?}");
    }
    // Stopping drains for up to 5 minutes (--drain-timeout's default): systemd waits longer.
    let stop: u64 = setting("TimeoutStopSec").parse().expect("seconds");
    assert!(stop > 300, "TimeoutStopSec={stop}");
    assert_eq!(setting("KillMode"), "mixed");
}

#[test]
fn the_containerfile_lints_clean() {
    let path = deploy(CONTAINERFILE);
    let run = run_bounded(Command::new(tool("hadolint")).arg(&path), LIMIT);
    assert_eq!(run.code, Some(0), "{}", run.dump());
    let text = read(&path);
    assert!(
        text.lines().filter(|l| l.starts_with("FROM ")).count() >= 2,
        "multi-stage"
    );
    let healthcheck = text
        .lines()
        .skip_while(|l| !l.starts_with("HEALTHCHECK"))
        .take(2)
        .collect::<String>();
    assert!(healthcheck.contains("/healthz"), "{healthcheck}");
    let user = text
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER line");
    assert!(
        !user.starts_with("root") && !user.starts_with("0"),
        "{user}"
    );
    assert!(
        text.contains("VOLUME [\"/var/cache/dtf-worker\"]"),
        "{text}"
    );
}

#[test]
fn the_kubernetes_manifests_match_the_schema() {
    let paths: Vec<PathBuf> = MANIFESTS.iter().map(|m| deploy(m)).collect();
    // 1.33: the oldest release with every field the Deployment uses (hostUsers, procMount,
    // appArmorProfile); strict: unknown fields are errors.
    let run = run_bounded(
        Command::new(tool("kubernetes-validate"))
            .args(["--strict", "--kubernetes-version", "1.33.0"])
            .args(&paths),
        LIMIT,
    );
    assert_eq!(run.code, Some(0), "{}", run.dump());
    for m in MANIFESTS {
        assert!(
            run.stdout.contains(m.rsplit('/').next().unwrap_or(m)),
            "{}",
            run.dump()
        );
    }
    let deployment = read(&deploy("kubernetes/deployment.yaml"));
    for needle in [
        "kind: Deployment",
        "path: /readyz",
        "path: /healthz",
        "terminationGracePeriodSeconds: 330",
        "secretName: dtf-worker-token",
        "runAsNonRoot: true",
    ] {
        assert!(deployment.contains(needle), "{needle}");
    }
    let service = read(&deploy("kubernetes/service.yaml"));
    assert!(service.contains("clusterIP: None"), "headless");
}

/// `--flag` words in `text`.
fn flags(text: &str) -> Vec<String> {
    text.split(|c: char| c.is_whitespace() || "\"',[]\\".contains(c))
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(|w| w.split('=').next().unwrap_or(w).to_owned())
        .collect()
}

#[test]
fn every_worker_flag_in_deploy_is_one_the_worker_has() {
    let help = run_bounded(Command::new(worker_binary()).arg("--help"), LIMIT);
    assert_eq!(help.code, Some(0), "{}", help.dump());
    let unit = read(&deploy(UNIT));
    let exec: String = unit
        .lines()
        .skip_while(|l| !l.starts_with("ExecStart="))
        .take_while(|l| !l.trim().is_empty() && !l.starts_with("Environment"))
        .collect::<Vec<_>>()
        .join(" ");
    let containerfile = read(&deploy(CONTAINERFILE));
    let cmd: String = containerfile
        .lines()
        .skip_while(|l| !l.starts_with("CMD "))
        .collect::<Vec<_>>()
        .join(" ");
    let deployment = read(&deploy("kubernetes/deployment.yaml"));
    let args: String = deployment
        .lines()
        .skip_while(|l| l.trim() != "args:")
        .take_while(|l| !l.trim_start().starts_with("env:"))
        .collect::<Vec<_>>()
        .join(" ");
    for (place, text) in [
        ("the unit's ExecStart", exec),
        ("the Containerfile's CMD", cmd),
        ("the Deployment's args", args),
    ] {
        let used = flags(&text);
        for flag in ["--listen", "--http", "--token-file", "--cache-dir"] {
            assert!(
                used.iter().any(|f| f == flag),
                "{place} sets {flag}: {used:?}"
            );
        }
        for flag in &used {
            assert!(
                help.stdout.contains(&format!("{flag} ")),
                "{place} uses {flag}, which `dtf-worker --help` does not list:\n{}",
                help.stdout
            );
        }
    }
}
