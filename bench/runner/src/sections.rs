//! The measurements. Each section adds rows to the table: a figure, and where the project has
//! a target for it, the target and whether this run met it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde::Serialize;

use crate::measure::{self, clean_command, secs, time_and_cpu_median, time_median};
use crate::workers::{DelayProxy, LatencyNet, LocalWorkers, peak_rss_of_run};

/// One line of the results table.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// Which section measured it.
    pub section: &'static str,
    /// What was measured.
    pub what: String,
    /// The figure, formatted.
    pub value: String,
    /// The raw number (seconds, ratio, percent, bytes or MiB as the row says).
    pub number: f64,
    /// The project's target for it, if any.
    pub target: Option<String>,
    /// Whether the target was met.
    pub met: Option<bool>,
}

/// The benchmark's state: built binaries and the rows so far.
pub struct Bench {
    reps: usize,
    quick: bool,
    bins: HashMap<String, PathBuf>,
    rows: Vec<Row>,
    notes: Vec<String>,
}

const SUITES: [&str; 8] = [
    "trivial",
    "trivial_std",
    "sleepy",
    "skewed",
    "many",
    "shaped",
    "shaped_warm",
    "shaped_std",
];

impl Bench {
    /// Builds everything the sections need.
    pub fn new(reps: usize, quick: bool) -> Result<Bench, String> {
        eprintln!("building the benchmark suites (release)...");
        let bins = measure::build(&SUITES)?.into_iter().collect();
        Ok(Bench {
            reps,
            quick,
            bins,
            rows: Vec::new(),
            notes: Vec::new(),
        })
    }

    fn bin(&self, name: &str) -> Result<&Path, String> {
        self.bins
            .get(name)
            .map(PathBuf::as_path)
            .ok_or_else(|| format!("the build produced no `{name}` binary"))
    }

    /// Repetitions per figure.
    pub fn reps(&self) -> usize {
        self.reps
    }

    /// Smoke mode.
    pub fn quick(&self) -> bool {
        self.quick
    }

    /// A built binary by target name.
    pub fn suite(&self, name: &str) -> Result<PathBuf, String> {
        self.bin(name).map(Path::to_path_buf)
    }

    /// The release `dtf-worker`.
    pub fn worker_binary(&self) -> Result<PathBuf, String> {
        self.bin("dtf-worker").map(Path::to_path_buf)
    }

    pub(crate) fn row(
        &mut self,
        section: &'static str,
        what: impl Into<String>,
        value: String,
        number: f64,
    ) {
        self.rows.push(Row {
            section,
            what: what.into(),
            value,
            number,
            target: None,
            met: None,
        });
    }

    pub(crate) fn target_row(
        &mut self,
        section: &'static str,
        what: impl Into<String>,
        value: String,
        number: f64,
        target: &str,
        met: bool,
    ) {
        self.rows.push(Row {
            section,
            what: what.into(),
            value,
            number,
            target: Some(target.to_owned()),
            met: Some(met),
        });
    }

    fn note(&mut self, note: String) {
        eprintln!("note: {note}");
        self.notes.push(note);
    }

    /// Prints the table (Markdown) and the notes.
    pub fn print_table(&self) {
        let nproc = std::thread::available_parallelism().map_or(1, |n| n.get());
        println!(
            "\ndtf benchmark — {} repetition(s) per figure, medians; {nproc} cores{}\n",
            self.reps,
            if self.quick {
                "; QUICK smoke mode (small sizes)"
            } else {
                ""
            }
        );
        println!("| section | measurement | figure | target | met |");
        println!("| --- | --- | --- | --- | --- |");
        for r in &self.rows {
            let met = match r.met {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "",
            };
            println!(
                "| {} | {} | {} | {} | {met} |",
                r.section,
                r.what,
                r.value,
                r.target.as_deref().unwrap_or("")
            );
        }
        for n in &self.notes {
            println!("\nnote: {n}");
        }
    }

    /// Writes the rows and notes as JSON.
    pub fn write_json(&self, path: &Path) -> std::io::Result<()> {
        let doc = serde_json::json!({
            "reps": self.reps,
            "quick": self.quick,
            "cores": std::thread::available_parallelism().map_or(1, |n| n.get()),
            "rows": self.rows,
            "notes": self.notes,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&doc).unwrap_or_default())
    }
}

/// True when this machine allows isolation level `full`.
fn full_available(trivial: &Path) -> bool {
    clean_command(trivial)
        .args(["--exact", "t00000", "--isolation", "full", "-q"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// 1. Per-test overhead on one machine.
pub fn local(b: &mut Bench) -> Result<(), String> {
    let n = 1000.0;
    let reps = b.reps;
    let trivial = b.bin("trivial")?.to_path_buf();
    let std_bin = b.bin("trivial_std")?.to_path_buf();
    let per_test =
        |d: Duration| format!("{} ({:.2} ms/test)", secs(d), d.as_secs_f64() * 1000.0 / n);

    let libtest = time_median(reps, || {
        let mut c = clean_command(&std_bin);
        c.arg("-q");
        c
    })?;
    b.row(
        "local",
        "(a) libtest, in-process, 1000 trivial tests",
        per_test(libtest),
        libtest.as_secs_f64(),
    );

    let mut levels = vec!["env", "process"];
    if full_available(&trivial) {
        levels.push("full");
    } else {
        b.note("isolation level `full` is not available on this machine: row (e) skipped".into());
    }
    let mut by_level = HashMap::new();
    for level in levels {
        let d = time_median(reps, || {
            let mut c = clean_command(&trivial);
            c.args(["-q", "--isolation", level]);
            c
        })?;
        let label = match level {
            "env" => "(c) dtf `env`, binary run directly",
            "process" => "(d) dtf `process`, binary run directly",
            _ => "(e) dtf `full`, binary run directly",
        };
        b.row("local", label, per_test(d), d.as_secs_f64());
        by_level.insert(level, d);
    }
    if let (Some(full), Some(env)) = (by_level.get("full"), by_level.get("env")) {
        let extra = (full.as_secs_f64() - env.as_secs_f64()) * 1000.0 / n;
        b.row(
            "local",
            "`full` over `env`",
            format!(
                "{:.2}× ({extra:+.2} ms/test)",
                full.as_secs_f64() / env.as_secs_f64()
            ),
            full.as_secs_f64() / env.as_secs_f64(),
        );
    }

    // Through cargo, both sides pay cargo's start-up and up-to-date check.
    let root = measure::workspace_root();
    let through_cargo = |subcommand: &[&str]| {
        time_median(reps, || {
            let mut c = Command::new(measure::cargo());
            c.current_dir(&root)
                .args(subcommand)
                .args(["--release", "-p", "dtf-bench-suites", "--test", "trivial"])
                .env("RUST_BACKTRACE", "0");
            c
        })
    };
    let nextest = through_cargo(&["nextest", "run"])?;
    b.row(
        "local",
        "(b) cargo nextest run over the dtf binary",
        per_test(nextest),
        nextest.as_secs_f64(),
    );
    let dtf_cargo = through_cargo(&["test", "-q"])?;
    b.row(
        "local",
        "(c') cargo test with dtf `env`",
        per_test(dtf_cargo),
        dtf_cargo.as_secs_f64(),
    );
    let ratio = dtf_cargo.as_secs_f64() / nextest.as_secs_f64();
    b.target_row(
        "local",
        "dtf / nextest (both through cargo)",
        format!("{ratio:.2}"),
        ratio,
        "≤ 1.0",
        ratio <= 1.0,
    );
    Ok(())
}

/// The median makespan of the sleepy suite on `workers` (the untimed warm-up run fills the
/// workers' caches: shipping is measured separately).
fn sleepy_run(
    b: &Bench,
    addrs: &str,
    token: &str,
    filter: Option<&str>,
    net: Option<&LatencyNet>,
) -> Result<Duration, String> {
    let sleepy = b.bin("sleepy")?.to_path_buf();
    time_median(b.reps, || {
        let mut c = match net {
            Some(net) => net.command(&sleepy),
            None => clean_command(&sleepy),
        };
        c.args(["-q", "--order", "name"])
            .env("DTF_WORKERS", addrs)
            .env("DTF_TOKEN", token);
        if let Some(f) = filter {
            c.arg(f);
        }
        c
    })
}

/// 2. Distributed efficiency: makespan against max(longest, total / slots).
pub fn distributed(b: &mut Bench) -> Result<(), String> {
    // Quick mode runs t00000..t00099 only.
    let filter = b.quick.then_some("t000");
    let tests = if b.quick { 100 } else { 400 };
    let slots_each = 2;
    let worker_bin = b.bin("dtf-worker")?.to_path_buf();
    let counts: &[usize] = if b.quick { &[1, 2] } else { &[1, 2, 4, 8] };
    let work = tests as f64 * 0.050;
    for &k in counts {
        let workers = LocalWorkers::start(&worker_bin, k, slots_each, None)?;
        let makespan = sleepy_run(b, &workers.addrs(), workers.token(), filter, None)?;
        let bound = (work / (k * slots_each) as f64).max(0.050);
        let eff = 100.0 * bound / makespan.as_secs_f64();
        let what = format!("{tests} × 50 ms on K={k} workers × {slots_each} slots, loopback");
        let value = format!("{} vs bound {bound:.3} s: {eff:.1} %", secs(makespan));
        if k == 4 {
            b.target_row("distributed", what, value, eff, "≥ 90 %", eff >= 90.0);
        } else {
            b.row("distributed", what, value, eff);
        }
    }
    for rtt_ms in [10u64, 50] {
        let k = if b.quick { 2 } else { 4 };
        let rtt = Duration::from_millis(rtt_ms);
        let bound = (work / (k * slots_each) as f64).max(0.050);
        // Prefer the kernel's netem inside a network namespace; where the kernel lacks it, a
        // userspace proxy that delays every byte by half the round trip each way.
        let (makespan, how) = match LatencyNet::create(rtt_ms) {
            Ok(net) => {
                let workers = LocalWorkers::start(&worker_bin, k, slots_each, Some(&net))?;
                (
                    sleepy_run(b, &workers.addrs(), workers.token(), filter, Some(&net))?,
                    "netem",
                )
            }
            Err(e) => {
                b.note(format!(
                    "tc netem is not available ({e}); the {rtt_ms} ms round trip is simulated by a delaying TCP proxy"
                ));
                let workers = LocalWorkers::start(&worker_bin, k, slots_each, None)?;
                let proxy = DelayProxy::start(&workers.addrs_list(), rtt)?;
                (
                    sleepy_run(b, &proxy.addrs(), workers.token(), filter, None)?,
                    "delay proxy",
                )
            }
        };
        let eff = 100.0 * bound / makespan.as_secs_f64();
        let what =
            format!("{tests} × 50 ms on K={k} × {slots_each}, {rtt_ms} ms round trip ({how})");
        let value = format!("{} vs bound {bound:.3} s: {eff:.1} %", secs(makespan));
        if rtt_ms == 10 && k == 4 {
            b.target_row("distributed", what, value, eff, "≥ 85 %", eff >= 85.0);
        } else {
            b.row("distributed", what, value, eff);
        }
    }
    Ok(())
}

/// 3. Shipping: a cold upload to 4 workers, then the bytes a warm re-run ships.
pub fn shipping(b: &mut Bench) -> Result<(), String> {
    let worker_bin = b.bin("dtf-worker")?.to_path_buf();
    let trivial = b.bin("trivial")?.to_path_buf();
    let size = std::fs::metadata(&trivial)
        .map_err(|e| e.to_string())?
        .len();
    let k = if b.quick { 2 } else { 4 };
    let mut cold = Vec::new();
    let mut warm_bytes = 0;
    for _ in 0..b.reps {
        let workers = LocalWorkers::start(&worker_bin, k, 2, None)?;
        let (d, shipped) = workers.run_counting_bytes(&trivial, &["--exact", "t00000"])?;
        cold.push((d, shipped));
        let (_, again) = workers.run_counting_bytes(&trivial, &["--exact", "t00000"])?;
        warm_bytes = warm_bytes.max(again);
    }
    let cold_time = measure::median(cold.iter().map(|(d, _)| *d).collect());
    let shipped = cold.iter().map(|(_, s)| *s).max().unwrap_or(0);
    let mbps = shipped as f64 / 1e6 / cold_time.as_secs_f64();
    b.row(
        "shipping",
        format!(
            "cold run of 1 test (≈ time to first test), binary {:.1} MB to {k} workers",
            size as f64 / 1e6
        ),
        format!(
            "{} ({mbps:.0} MB/s over {:.1} MB shipped)",
            secs(cold_time),
            shipped as f64 / 1e6
        ),
        cold_time.as_secs_f64(),
    );
    b.target_row(
        "shipping",
        "binary bytes shipped on a warm re-run",
        format!("{warm_bytes} B"),
        warm_bytes as f64,
        "0",
        warm_bytes == 0,
    );
    Ok(())
}

/// Input trees: a package with 5,000 fixture files totalling 50 MB shipped to 4 workers, cold
/// (time to first test, bytes) and warm; and what mapping paths in a mount namespace costs per
/// test on a worker at level `env` (1000 trivial tests on one worker, mapped against the
/// fallback that maps nothing, alternated).
pub fn inputs(b: &mut Bench) -> Result<(), String> {
    let worker_bin = b.bin("dtf-worker")?.to_path_buf();
    let trivial = b.bin("trivial")?.to_path_buf();
    let (files, size) = if b.quick {
        (500, 10_000)
    } else {
        (5_000, 10_000)
    };
    let fixtures = tempfile::Builder::new()
        .prefix("dtf-bench-fixtures-")
        .tempdir()
        .map_err(|e| e.to_string())?;
    for i in 0..files {
        let dir = fixtures.path().join(format!("d{:02}", i % 50));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let mut data = vec![0u8; size];
        for (j, byte) in data.iter_mut().enumerate() {
            *byte = ((i * 31 + j * 7) % 251) as u8;
        }
        std::fs::write(dir.join(format!("f{i:05}.bin")), data).map_err(|e| e.to_string())?;
    }
    let include = format!("{}/**", fixtures.path().display());
    let env = [("DTF_INCLUDE", include.as_str())];
    let k = if b.quick { 2 } else { 4 };
    let mut cold = Vec::new();
    let mut warm = Vec::new();
    let (mut cold_bytes, mut warm_bytes) = (0, 0);
    for _ in 0..b.reps {
        let workers = LocalWorkers::start(&worker_bin, k, 2, None)?;
        // The binary first, so the cold figure is the input tree's.
        workers.run_with_env(&trivial, &["--exact", "t00000"], &[])?;
        let (d, text) = workers.run_with_env(&trivial, &["--exact", "t00000"], &env)?;
        cold.push(d);
        cold_bytes =
            crate::workers::input_bytes(&text).ok_or(format!("no inputs line:\n{text}"))?;
        let (d, text) = workers.run_with_env(&trivial, &["--exact", "t00000"], &env)?;
        warm.push(d);
        warm_bytes = warm_bytes
            .max(crate::workers::input_bytes(&text).ok_or(format!("no inputs line:\n{text}"))?);
    }
    let (cold, warm) = (measure::median(cold), measure::median(warm));
    b.row(
        "inputs",
        format!(
            "cold run of 1 test (≈ time to first test), {files} fixture files ({:.0} MB) to {k} workers",
            (files * size) as f64 / 1e6
        ),
        format!("{} ({:.1} MB shipped)", secs(cold), cold_bytes as f64 / 1e6),
        cold.as_secs_f64(),
    );
    b.row(
        "inputs",
        "warm re-run of the same (hashing and find-missing only)",
        secs(warm),
        warm.as_secs_f64(),
    );
    b.target_row(
        "inputs",
        "input bytes shipped on a warm re-run",
        format!("{warm_bytes} B"),
        warm_bytes as f64,
        "0",
        warm_bytes == 0,
    );

    // The mount namespace per test: the same worker set-up with and without path mapping.
    let mapped = LocalWorkers::start(&worker_bin, 1, 2, None)?;
    let unmapped =
        LocalWorkers::start_with_env(&worker_bin, 1, 2, None, &[("DTF_FAULT_PATHS", "bench")])?;
    let tests = if b.quick { "t00" } else { "t0" };
    let count = if b.quick { 100 } else { 1000 };
    mapped.run_with_env(&trivial, &["-q", tests], &[])?;
    unmapped.run_with_env(&trivial, &["-q", tests], &[])?;
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for _ in 0..b.reps {
        with.push(mapped.run_with_env(&trivial, &["-q", tests], &[])?.0);
        without.push(unmapped.run_with_env(&trivial, &["-q", tests], &[])?.0);
    }
    let (with, without) = (measure::median(with), measure::median(without));
    let extra_ms = (with.as_secs_f64() - without.as_secs_f64()) * 1000.0 / count as f64;
    b.row(
        "inputs",
        format!("{count} trivial tests at level env on 1 worker × 2 slots, paths mapped vs not"),
        format!(
            "{} vs {} (+{extra_ms:.2} ms/test)",
            secs(with),
            secs(without)
        ),
        extra_ms,
    );
    Ok(())
}

/// Scheduling (section 4): the skewed suite (40 × 100 ms and one 1000 ms test, last by name)
/// on 4 slots, in name order and in history order.
pub fn scheduling(b: &mut Bench) -> Result<(), String> {
    let skewed = b.bin("skewed")?.to_path_buf();
    let history = tempfile::tempdir().map_err(|e| e.to_string())?;
    let slots = 4;
    let run = |order: &str| {
        time_median(b.reps, || {
            let mut c = clean_command(&skewed);
            c.args(["-q", "--test-threads", &slots.to_string(), "--order", order])
                .env("DTF_HISTORY_DIR", history.path());
            c
        })
    };
    let by_name = run("name")?; // also records the durations
    let by_history = run("history")?;
    let bound = (40.0 * 0.1 + 1.0) / slots as f64;
    let bound = f64::max(bound, 1.0);
    let eff = |d: Duration| 100.0 * bound / d.as_secs_f64();
    b.row(
        "scheduling",
        "skewed suite, 4 slots, name order (no history)",
        format!(
            "{} ({:.1} % of bound {bound:.2} s)",
            secs(by_name),
            eff(by_name)
        ),
        by_name.as_secs_f64(),
    );
    b.target_row(
        "scheduling",
        "skewed suite, 4 slots, longest first from history",
        format!(
            "{} ({:.1} % of bound {bound:.2} s)",
            secs(by_history),
            eff(by_history)
        ),
        by_history.as_secs_f64(),
        "closer to the bound than name order",
        by_history < by_name,
    );
    Ok(())
}

/// Resources (section 5): a worker's RSS idle and under load; the coordinator's peak RSS for
/// 10 000 tests through 4 workers.
pub fn resources(b: &mut Bench) -> Result<(), String> {
    let worker_bin = b.bin("dtf-worker")?.to_path_buf();
    let sleepy = b.bin("sleepy")?.to_path_buf();
    let many = b.bin("many")?.to_path_buf();
    let workers = LocalWorkers::start(&worker_bin, 1, 4, None)?;
    std::thread::sleep(Duration::from_millis(200));
    let idle = workers.rss_kib(0)?;
    b.row(
        "resources",
        "worker RSS, idle",
        format!("{:.1} MiB", idle as f64 / 1024.0),
        idle as f64 / 1024.0,
    );
    let peak = workers.peak_rss_during(0, &sleepy, &["-q", "t000"])?;
    b.row(
        "resources",
        "worker peak RSS under load (100 × 50 ms tests, 4 slots)",
        format!("{:.1} MiB", peak as f64 / 1024.0),
        peak as f64 / 1024.0,
    );
    drop(workers);

    let n = if b.quick { "1000" } else { "10 000" };
    let filter: &[&str] = if b.quick { &["-q", "t00"] } else { &["-q"] };
    let workers = LocalWorkers::start(&worker_bin, 4, 2, None)?;
    let coordinator = peak_rss_of_run(&many, filter, &workers)?;
    b.row(
        "resources",
        format!("coordinator peak RSS, {n} tests through 4 workers"),
        format!("{:.1} MiB", coordinator as f64 / 1024.0),
        coordinator as f64 / 1024.0,
    );
    Ok(())
}

/// The resident set of a running fork server, in KiB: the process whose initial environment
/// held `__DTF_FORK_SERVER` (its forked tests inherit that memory, so the server is the one
/// whose parent does not).
fn fork_server_rss() -> Option<u64> {
    let mut found: Vec<(u32, u32, u64)> = Vec::new();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if !environ
            .split(|b| *b == 0)
            .any(|v| v.starts_with(b"__DTF_FORK_SERVER="))
        {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        };
        if let (Some(ppid), Some(rss)) = (field("PPid:"), field("VmRSS:")) {
            found.push((pid, ppid as u32, rss));
        }
    }
    let pids: Vec<u32> = found.iter().map(|f| f.0).collect();
    found
        .iter()
        .find(|(_, ppid, _)| !pids.contains(ppid))
        .map(|f| f.2)
}

/// The number of tests in the shaped suites.
const SHAPED_TESTS: f64 = 150.0;

/// What `tests/floor.rs` measured in its fork server: CPU per fresh process, in ms, medians
/// of `reps` runs.
struct Floor {
    /// Fork, exit, wait.
    bare: f64,
    /// With one shaped test's work in the child.
    work: f64,
    /// With that work on a named thread.
    thread: f64,
}

fn fork_floor(bin: &Path, reps: usize) -> Result<Floor, String> {
    let file = std::env::temp_dir().join(format!("dtf-bench-floor-{}", std::process::id()));
    let mut runs: [Vec<f64>; 3] = Default::default();
    for _ in 0..reps.max(1) {
        let _ = std::fs::remove_file(&file);
        let status = clean_command(bin)
            .arg("-q")
            .env("DTF_BENCH_FLOOR", &file)
            .stdout(std::process::Stdio::null())
            .status()
            .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        let _ = std::fs::remove_file(&file);
        if !status.success() || text.is_empty() {
            return Err(format!(
                "the floor suite measured nothing ({status}): was its warm-up run in a fork \
                 server?"
            ));
        }
        for line in text.lines() {
            let mut fields = line.split_whitespace();
            let (Some(kind), Some(cpu)) = (fields.next(), fields.next()) else {
                continue;
            };
            let Ok(cpu) = cpu.parse::<f64>() else {
                continue;
            };
            let slot = match kind {
                "bare" => 0,
                "work" => 1,
                "thread" => 2,
                _ => continue,
            };
            runs[slot].push(cpu);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let [mut bare, mut work, mut thread] = runs;
    Ok(Floor {
        bare: median(&mut bare),
        work: median(&mut work),
        thread: median(&mut thread),
    })
}

/// The fork server: per-test wall and CPU by fork and by exec, against cargo-nextest on a
/// std-harness twin and libtest; the server's memory; a suite with shared set-up, with and
/// without a warm-up, against libtest serial and threaded.
pub fn fork(b: &mut Bench) -> Result<(), String> {
    let n = 1000.0;
    let reps = b.reps;
    let trivial = b.bin("trivial")?.to_path_buf();
    let std_bin = b.bin("trivial_std")?.to_path_buf();
    let ms_per = |d: Duration, count: f64| d.as_secs_f64() * 1000.0 / count;

    let (libtest, libtest_cpu) = time_and_cpu_median(reps, || {
        let mut c = clean_command(&std_bin);
        c.arg("-q");
        c
    })?;
    b.row(
        "fork",
        "libtest in-process, 1000 trivial tests: wall (CPU)",
        format!("{} ({})", secs(libtest), secs(libtest_cpu)),
        libtest.as_secs_f64(),
    );
    let mut spawn = HashMap::new();
    for how in ["fork", "exec"] {
        let (wall, cpu) = time_and_cpu_median(reps, || {
            let mut c = clean_command(&trivial);
            c.args(["-q", "--isolation", "env"]).env("DTF_SPAWN", how);
            c
        })?;
        b.row(
            "fork",
            format!("dtf `env` by {how}, binary run directly: wall (CPU per test)"),
            format!("{} ({:.2} ms CPU/test)", secs(wall), ms_per(cpu, n)),
            wall.as_secs_f64(),
        );
        spawn.insert(how, (wall, cpu));
    }
    let (fork_wall, fork_cpu) = spawn["fork"];
    let (exec_wall, _) = spawn["exec"];
    b.row(
        "fork",
        "fork / exec (wall)",
        format!("{:.2}", fork_wall.as_secs_f64() / exec_wall.as_secs_f64()),
        fork_wall.as_secs_f64() / exec_wall.as_secs_f64(),
    );
    let cpu_per_test = ms_per(fork_cpu, n);
    b.target_row(
        "fork",
        "CPU per test at `env` (fork; runner + server + test processes)",
        format!("{cpu_per_test:.2} ms"),
        cpu_per_test,
        "≤ 0.5 ms",
        cpu_per_test <= 0.5,
    );

    // Both through cargo: nextest on the std-harness twin, dtf by cargo test.
    let root = measure::workspace_root();
    let through_cargo_as = |profile: &[&str], subcommand: &[&str], test: &str, after: &[&str]| {
        time_median(reps, || {
            let mut c = Command::new(measure::cargo());
            c.current_dir(&root)
                .args(subcommand)
                .args(profile)
                .args(["-p", "dtf-bench-suites", "--test", test])
                .args(after)
                .env("RUST_BACKTRACE", "0");
            c
        })
    };
    let through_cargo =
        |subcommand: &[&str], test: &str| through_cargo_as(&["--release"], subcommand, test, &[]);
    let nextest_std = through_cargo(&["nextest", "run"], "trivial_std")?;
    b.row(
        "fork",
        "cargo nextest run on the std-harness twin",
        secs(nextest_std),
        nextest_std.as_secs_f64(),
    );
    let dtf_cargo = through_cargo(&["test", "-q"], "trivial")?;
    b.row(
        "fork",
        "cargo test on the dtf binary (`env`, fork)",
        secs(dtf_cargo),
        dtf_cargo.as_secs_f64(),
    );
    let ratio = dtf_cargo.as_secs_f64() / nextest_std.as_secs_f64();
    b.target_row(
        "fork",
        "dtf / nextest on the twin (wall, both through cargo)",
        format!("{ratio:.2}×"),
        ratio,
        "≤ 0.2×",
        ratio <= 0.2,
    );

    // The same in the profile `cargo test` builds by default (debug), where dtf's own code is
    // unoptimised too; and the shaped suite with its warm-up against serialised libtest.
    let quiet_nextest = ["--status-level", "none", "--final-status-level", "none"];
    let debug = measure::debug_executables(&[
        "trivial",
        "trivial_std",
        "shaped_warm",
        "shaped_std",
        "floor",
    ])?;
    let nextest_debug = through_cargo_as(&[], &["nextest", "run"], "trivial_std", &quiet_nextest)?;
    let dtf_debug = through_cargo_as(&[], &["test", "-q"], "trivial", &[])?;
    let ratio_debug = dtf_debug.as_secs_f64() / nextest_debug.as_secs_f64();
    b.row(
        "fork",
        "debug: cargo nextest run on the twin / cargo test on the dtf binary",
        format!("{} / {}", secs(nextest_debug), secs(dtf_debug)),
        dtf_debug.as_secs_f64(),
    );
    b.target_row(
        "fork",
        "debug: dtf / nextest on the twin (wall, both through cargo)",
        format!("{ratio_debug:.2}×"),
        ratio_debug,
        "≤ 0.2×",
        ratio_debug <= 0.2,
    );
    let warm_debug = through_cargo_as(&[], &["test", "-q"], "shaped_warm", &[])?;
    let serial_debug = through_cargo_as(
        &[],
        &["test", "-q"],
        "shaped_std",
        &["--", "--test-threads=1"],
    )?;
    let shaped_debug = warm_debug.as_secs_f64() / serial_debug.as_secs_f64();
    b.target_row(
        "fork",
        format!(
            "debug, through cargo test: shaped with warm-up {} / libtest serialised {}",
            secs(warm_debug),
            secs(serial_debug)
        ),
        format!("{shaped_debug:.2}×"),
        shaped_debug,
        "≤ 1.0×",
        shaped_debug <= 1.0,
    );

    // The same two debug binaries run directly (without cargo's own 0.1-0.2 s), and the floor
    // under them: what the kernel alone charges for a fresh process that runs one shaped test
    // on a named thread, measured from a debug fork server's own image (`tests/floor.rs`).
    let debug_bin = |name: &str| {
        debug
            .get(name)
            .cloned()
            .ok_or_else(|| format!("the debug build produced no `{name}` binary"))
    };
    let (warm_bin, serial_bin) = (debug_bin("shaped_warm")?, debug_bin("shaped_std")?);
    let warm_direct = time_median(reps, || {
        let mut c = clean_command(&warm_bin);
        c.arg("-q");
        c
    })?;
    let serial_direct = time_median(reps, || {
        let mut c = clean_command(&serial_bin);
        c.args(["-q", "--test-threads=1"]);
        c
    })?;
    b.row(
        "fork",
        format!(
            "debug, run directly: shaped with warm-up {} / libtest serialised {}",
            secs(warm_direct),
            secs(serial_direct)
        ),
        format!(
            "{:.2}×",
            warm_direct.as_secs_f64() / serial_direct.as_secs_f64()
        ),
        warm_direct.as_secs_f64() / serial_direct.as_secs_f64(),
    );
    let floor = fork_floor(&debug_bin("floor")?, reps)?;
    b.row(
        "fork",
        "debug fork server's floor, no dtf code in the child: fork + exit / + one shaped test's \
         work / that work on a named thread (CPU per test)",
        format!(
            "{:.2} / {:.2} / {:.2} ms",
            floor.bare, floor.work, floor.thread
        ),
        floor.thread,
    );
    // What comes before the tests can start: the runner's and the server's start and the
    // warm-up, measured as the whole run of one shaped test.
    let one_test = time_median(reps, || {
        let mut c = clean_command(&warm_bin);
        c.args(["-q", "--exact", "t00000"]);
        c
    })?;
    let start_ms = one_test.as_secs_f64() * 1000.0;
    b.row(
        "fork",
        "debug, run directly: one shaped test with warm-up (the run's start, server and \
         warm-up included)",
        secs(one_test),
        one_test.as_secs_f64(),
    );
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let bound_ms = start_ms + (SHAPED_TESTS - 1.0) * floor.thread / cores;
    let serial_ms = serial_direct.as_secs_f64() * 1000.0;
    b.row(
        "fork",
        format!(
            "shaped suite's floor: that start, {start_ms:.0} ms, + {} × {:.2} ms over {cores} \
             cores = {bound_ms:.0} ms, against libtest serialised run directly, \
             {serial_ms:.0} ms",
            SHAPED_TESTS - 1.0,
            floor.thread
        ),
        format!("{:.2}×", bound_ms / serial_ms),
        bound_ms / serial_ms,
    );
    if bound_ms >= serial_ms {
        b.note(format!(
            "the shaped target (no slower than serialised libtest) is out of reach here: a \
             run's start and the kernel's cost of {SHAPED_TESTS} fresh processes with a test \
             thread each, spread over {cores} cores and with nothing of dtf in them, take \
             {bound_ms:.0} ms, and libtest's whole serialised run {serial_ms:.0} ms"
        ));
    }

    // The full level's extra cost per test, by fork.
    if full_available(&trivial) {
        let full = time_median(reps, || {
            let mut c = clean_command(&trivial);
            c.args(["-q", "--isolation", "full"]);
            c
        })?;
        let extra = ms_per(full.saturating_sub(fork_wall), n);
        b.row(
            "fork",
            "`full` over `env` (fork)",
            format!(
                "{:.2}× ({extra:+.2} ms/test)",
                full.as_secs_f64() / fork_wall.as_secs_f64()
            ),
            full.as_secs_f64() / fork_wall.as_secs_f64(),
        );
    }

    // The server's memory while tests run (sleepy: 50 ms tests, so the server is up).
    let sleepy = b.bin("sleepy")?.to_path_buf();
    let mut child = clean_command(&sleepy)
        .args(["-q", "--test-threads", "2"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run the sleepy suite: {e}"))?;
    let mut rss = None;
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(50));
        if let Some(kib) = fork_server_rss() {
            rss = Some(kib);
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    match rss {
        Some(kib) => b.row(
            "fork",
            "fork server RSS (release trivial suite binary, while serving)",
            format!("{:.1} MiB", kib as f64 / 1024.0),
            kib as f64 / 1024.0,
        ),
        None => b.note("the fork server's RSS was not found (no server process seen)".into()),
    }

    // Shared set-up: 150 tests × 0.2 ms over a table that takes 5 ms to build.
    let count = SHAPED_TESTS;
    let shaped = b.bin("shaped")?.to_path_buf();
    let warm = b.bin("shaped_warm")?.to_path_buf();
    let shaped_std = b.bin("shaped_std")?.to_path_buf();
    let shaped_row = |b: &mut Bench, what: &str, bin: &Path, args: &[&str]| {
        let d = time_median(reps, || {
            let mut c = clean_command(bin);
            c.args(args);
            c
        });
        if let Ok(d) = d {
            b.row(
                "fork",
                format!("shaped suite (150 × 0.2 ms, 5 ms table): {what}"),
                format!("{} ({:.2} ms/test)", secs(d), ms_per(d, count)),
                d.as_secs_f64(),
            );
        }
        d
    };
    let cold = shaped_row(b, "dtf, no warm-up", &shaped, &["-q"])?;
    let warmed = shaped_row(b, "dtf, `#[dtf::warm_up]`", &warm, &["-q"])?;
    let serial = shaped_row(
        b,
        "libtest --test-threads=1",
        &shaped_std,
        &["-q", "--test-threads=1"],
    )?;
    let threaded = shaped_row(b, "libtest threaded", &shaped_std, &["-q"])?;
    let _ = (cold, threaded);
    let ratio = warmed.as_secs_f64() / serial.as_secs_f64();
    b.target_row(
        "fork",
        "shaped: dtf with warm-up / libtest serialised",
        format!("{ratio:.2}×"),
        ratio,
        "≤ 1.0×",
        ratio <= 1.0,
    );
    Ok(())
}
