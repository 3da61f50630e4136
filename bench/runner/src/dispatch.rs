//! The coordinator's dispatch ceiling: runs of trivial tests on fake workers
//! (`dtf-fake-worker`: dtf's real protocol, no processes) with 1,000 slots in all, so what
//! bounds the run is how fast the coordinator sends requests and takes results. Then several
//! coordinators at once on the same fake workers: throughput and fairness between runs.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::measure::{clean_command, median, wait_usage};
use crate::sections::Bench;

/// Fake workers in one process, killed on drop.
struct Fakes {
    child: Child,
    addrs: Vec<String>,
    token: String,
}

impl Fakes {
    fn start(
        bin: &std::path::Path,
        count: usize,
        slots: u32,
        duration_ms: u64,
    ) -> Result<Fakes, String> {
        let token =
            dtf::protocol::Token::random_text().map_err(|e| format!("cannot make a token: {e}"))?;
        let mut child = Command::new(bin)
            .args(["--count", &count.to_string()])
            .args(["--slots", &slots.to_string()])
            .args(["--duration-ms", &duration_ms.to_string()])
            .env("DTF_TOKEN", &token)
            .env_remove("DTF_TOKEN_FILE")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut addrs = Vec::new();
        for line in BufReader::new(stdout).lines().take(count) {
            let line = line.map_err(|e| e.to_string())?;
            match line.strip_prefix("listening ") {
                Some(addr) => addrs.push(addr.to_owned()),
                None => return Err(format!("unexpected line from the fake worker: {line}")),
            }
        }
        if addrs.len() != count {
            let _ = child.kill();
            return Err("the fake worker did not start".to_owned());
        }
        Ok(Fakes {
            child,
            addrs,
            token,
        })
    }

    fn usage(&self) -> Option<(Duration, u64)> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).ok()?;
        let rest = stat.rsplit_once(')')?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of stat (11 and 12 after the name).
        let ticks: u64 =
            fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let rss = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())?;
        Some((Duration::from_millis(ticks * 10), rss))
    }
}

impl Drop for Fakes {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One coordinator: the `many` suite (10,000 trivial tests; `filter` narrows it) on `fakes`.
fn coordinator(
    many: &std::path::Path,
    fakes: &Fakes,
    filter: Option<&str>,
) -> Result<Child, String> {
    let mut cmd = clean_command(many);
    cmd.arg("-q");
    if let Some(f) = filter {
        cmd.arg(f);
    }
    cmd.env("DTF_WORKERS", fakes.addrs.join(","))
        .env("DTF_TOKEN", &fakes.token)
        .env("DTF_REQUIRE_WORKERS", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", many.display()))
}

/// The dispatch section.
pub fn dispatch(b: &mut Bench) -> Result<(), String> {
    let many = b.suite("many")?;
    let fake_bin = b.suite("dtf-fake-worker")?;
    let reps = b.reps();
    let tests = 10_000.0;
    for (count, slots, duration_ms) in [(10usize, 100u32, 20u64), (100, 10, 20)] {
        let fakes = Fakes::start(&fake_bin, count, slots, duration_ms)?;
        // One untimed run: page cache, the connections' first handshakes.
        wait_usage(coordinator(&many, &fakes, None)?, Instant::now())?;
        let (mut walls, mut cpus, mut rss) = (Vec::new(), Vec::new(), 0);
        for _ in 0..reps {
            let started = Instant::now();
            let (wall, cpu, peak) = wait_usage(coordinator(&many, &fakes, None)?, started)?;
            walls.push(wall);
            cpus.push(cpu);
            rss = rss.max(peak);
        }
        let (wall, cpu) = (median(walls), median(cpus));
        let rate = tests / wall.as_secs_f64();
        let what = format!(
            "10,000 trivial tests on {count} fake workers × {slots} slots ({duration_ms} ms each; slot bound {:.0}/s)",
            (count as f64 * slots as f64) * 1000.0 / duration_ms as f64
        );
        b.target_row(
            "dispatch",
            format!("{what}: results per second"),
            format!("{rate:.0}/s ({:.2} s)", wall.as_secs_f64()),
            rate,
            "≥ 10,000/s",
            rate >= 10_000.0,
        );
        b.row(
            "dispatch",
            format!("{what}: coordinator CPU, peak RSS"),
            format!(
                "{:.2} s ({:.0} µs/test), {:.1} MiB",
                cpu.as_secs_f64(),
                cpu.as_secs_f64() * 1e6 / tests,
                rss as f64 / 1024.0
            ),
            cpu.as_secs_f64(),
        );
        if let Some((fake_cpu, fake_rss)) = fakes.usage() {
            b.row(
                "dispatch",
                format!("{what}: the fake workers' process (all runs), CPU and peak RSS"),
                format!(
                    "{:.2} s, {:.1} MiB",
                    fake_cpu.as_secs_f64(),
                    fake_rss as f64 / 1024.0
                ),
                fake_cpu.as_secs_f64(),
            );
        }
    }

    // Concurrent runs sharing the fake workers: 1,000 tests each.
    let runs = if b.quick() { 4 } else { 10 };
    let fakes = Fakes::start(&fake_bin, 10, 100, 20)?;
    let started = Instant::now();
    let children: Vec<Child> = (0..runs)
        .map(|_| coordinator(&many, &fakes, Some("t00")))
        .collect::<Result<_, _>>()?;
    let waiters: Vec<_> = children
        .into_iter()
        .map(|child| std::thread::spawn(move || wait_usage(child, started)))
        .collect();
    let mut ends = Vec::new();
    let mut rss_sum = 0;
    for w in waiters {
        let (wall, _, rss) = w.join().map_err(|_| "a waiter panicked")??;
        ends.push(wall);
        rss_sum += rss;
    }
    let total = started.elapsed();
    let first = ends.iter().min().copied().unwrap_or_default();
    let last = ends.iter().max().copied().unwrap_or_default();
    let rate = runs as f64 * 1000.0 / total.as_secs_f64();
    b.row(
        "dispatch",
        format!("{runs} concurrent runs × 1,000 tests on 10 × 100 fake slots: results per second (all runs)"),
        format!("{rate:.0}/s ({:.2} s)", total.as_secs_f64()),
        rate,
    );
    b.row(
        "dispatch",
        format!(
            "{runs} concurrent runs: first and last to finish (fairness), coordinators' RSS summed"
        ),
        format!(
            "{:.2} s / {:.2} s ({:.2}×), {:.0} MiB",
            first.as_secs_f64(),
            last.as_secs_f64(),
            last.as_secs_f64() / first.as_secs_f64().max(1e-9),
            rss_sum as f64 / 1024.0
        ),
        last.as_secs_f64() / first.as_secs_f64().max(1e-9),
    );
    Ok(())
}
