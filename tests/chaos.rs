//! Scale and chaos, bounded in count and time: 10 000 tests through 4 real workers; workers
//! SIGKILLed at random moments of a run; a SIGKILLed coordinator. In every case each test is
//! reported exactly once and nothing is left running or lying around.
//!
//! `DTF_CHAOS_ROUNDS` sets the number of worker-killing rounds (default 3; the README gives a
//! larger command), `DTF_CHAOS_SEED` replays a printed seed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dtf_e2e::*;
use nix::sys::signal::Signal;

const MINUTE: Duration = Duration::from_secs(60);

fn many() -> PathBuf {
    test_binary("dtf-bench-suites", "many")
}

fn sleepy() -> PathBuf {
    test_binary("dtf-bench-suites", "sleepy")
}

/// A small deterministic generator (xorshift), seeded from the clock unless replayed.
struct Rng(u64);

impl Rng {
    fn new(what: &str) -> Rng {
        let seed = std::env::var("DTF_CHAOS_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
                    | 1
            });
        eprintln!("{what}: DTF_CHAOS_SEED={seed}");
        Rng(seed)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// `name -> [result words]` for every `test NAME ... RESULT` line.
fn reported(stdout: &str) -> BTreeMap<String, Vec<String>> {
    let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in stdout.lines() {
        if let Some((name, result)) = line
            .strip_prefix("test ")
            .and_then(|l| l.split_once(" ... "))
        {
            seen.entry(name.to_owned())
                .or_default()
                .push(result.to_owned());
        }
    }
    seen
}

/// Asserts that exactly the tests `t00000..t{n-1}` passed, each reported once.
fn assert_each_passed_once(run: &Run, n: usize) {
    let seen = reported(&run.stdout);
    assert_eq!(
        seen.len(),
        n,
        "tests reported: {}\n{}",
        seen.len(),
        tail(&run.stdout)
    );
    for (i, (name, results)) in seen.iter().enumerate() {
        assert_eq!(name, &format!("t{i:05}"));
        assert_eq!(results.len(), 1, "{name} reported {} times", results.len());
        assert!(
            results[0] == "ok" || results[0] == "ok (rerun after a lost worker)",
            "{name}: {}",
            results[0]
        );
    }
    let summary = format!("test result: ok. {n} passed; 0 failed; 0 ignored;");
    assert!(run.stdout.contains(&summary), "{}", tail(&run.stdout));
    assert_eq!(run.code, Some(0), "{}", tail(&run.stderr));
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Processes whose executable lies under `dir` (a worker's cache: its test processes).
fn processes_running_from(dir: &Path) -> Vec<i32> {
    processes_where(|pid| {
        std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| exe.starts_with(dir))
    })
}

/// Nothing of a run is left on `worker`: no test process, no test directory.
fn assert_clean(worker: &Worker) {
    let cache = worker.cache_dir();
    assert!(
        eventually(Duration::from_secs(10), || processes_running_from(&cache)
            .is_empty()),
        "test processes left on {}: {:?}",
        worker.addr,
        processes_running_from(&cache)
    );
    assert!(
        eventually(Duration::from_secs(10), || worker.test_dirs().is_empty()),
        "test directories left on {}: {:?}",
        worker.addr,
        worker.test_dirs()
    );
}

#[test]
fn ten_thousand_tests_through_four_workers_are_each_reported_once() {
    let binary = many();
    let workers: Vec<Worker> = (0..4).map(|_| Worker::start()).collect();
    let refs: Vec<&Worker> = workers.iter().collect();
    let started = Instant::now();
    let run = run_bounded(
        &mut workers_command(&binary, &refs),
        Duration::from_secs(300),
    );
    eprintln!("10 000 tests through 4 workers in {:?}", started.elapsed());
    assert_each_passed_once(&run, 10_000);
    let per_worker: u64 = workers
        .iter()
        .map(|w| w.status()["tests_run"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(per_worker, 10_000, "the workers ran each test once");
    for w in &workers {
        assert_clean(w);
    }
}

#[test]
fn workers_killed_at_random_moments_lose_no_result() {
    let rounds: usize = std::env::var("DTF_CHAOS_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let mut rng = Rng::new("worker chaos");
    let binary = sleepy();
    // t00000..t00099: 100 tests of 50 ms on 3 workers × 2 slots, about a second of work.
    let tests = 100;
    for round in 0..rounds {
        let mut workers: Vec<Worker> = (0..3).map(|_| Worker::start()).collect();
        let victim = rng.below(3) as usize;
        let delay = Duration::from_millis(100 + rng.below(700));
        let refs: Vec<&Worker> = workers.iter().collect();
        let mut coordinator = Background::start(workers_command(&binary, &refs).arg("t000"));
        std::thread::sleep(delay);
        workers[victim].kill();
        let code = coordinator.wait(MINUTE);
        let (stdout, stderr) = coordinator.output();
        let run = Run {
            code,
            stdout,
            stderr,
            elapsed: Duration::ZERO,
        };
        eprintln!("round {round}: killed worker {victim} after {delay:?}");
        assert_each_passed_once(&run, tests);
        for (i, w) in workers.iter().enumerate() {
            if i != victim {
                assert_clean(w);
            }
        }
        // The killed worker's tests died with it (they are its children); its directories
        // are removed by the worker that takes its place.
        let killed = &mut workers[victim];
        assert!(
            eventually(Duration::from_secs(10), || processes_running_from(
                &killed.cache_dir()
            )
            .is_empty()),
            "tests of the killed worker survive: {:?}",
            processes_running_from(&killed.cache_dir())
        );
        killed.restart();
        assert_eq!(
            killed.run_dirs().len(),
            1,
            "the dead worker's run directory is swept: {:?} {:?} alive={}\n{}",
            killed.run_dirs(),
            dtf_dirs(&killed.tmp_dir()),
            killed.alive(),
            killed.log()
        );
        assert_clean(killed);
    }
}

#[test]
fn a_killed_coordinator_leaves_every_worker_clean_and_serving() {
    let mut rng = Rng::new("coordinator chaos");
    let binary = sleepy();
    let workers: Vec<Worker> = (0..2).map(|_| Worker::start()).collect();
    let refs: Vec<&Worker> = workers.iter().collect();
    let coordinator = Background::start(workers_command(&binary, &refs).arg("t000"));
    // Wait until tests run on the workers, then kill at a random moment.
    let busy = eventually(MINUTE, || {
        workers
            .iter()
            .any(|w| !processes_running_from(&w.cache_dir()).is_empty())
    });
    assert!(busy, "no test started");
    std::thread::sleep(Duration::from_millis(rng.below(400)));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(coordinator.pid()),
        Signal::SIGKILL,
    )
    .expect("kill the coordinator");
    drop(coordinator);
    for w in &workers {
        assert_clean(w);
    }
    let run = run_bounded(workers_command(&binary, &refs).arg("t000"), MINUTE);
    assert_each_passed_once(&run, 100);
}
