//! What the worker counts for its operators: tests by outcome and duration, refused
//! handshakes, and the most recent results, served by [`crate::http`] as Prometheus text
//! (`/metrics`) and on the status page (`/`).
//!
//! Counters and the histogram live here; values another part of the worker already keeps
//! (the cache's, the slots in use, connected runs, draining) are read when a scrape asks.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use dtf::outcome::Failure;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::cache::CacheStats;

/// How many finished tests the status page lists.
pub const RECENT: usize = 20;

/// A test's outcome as the `outcome` label of `dtf_worker_tests_total` spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// It passed.
    Passed,
    /// It failed (panicked, returned `Err`, crashed, ...), other than by its timeout.
    Failed,
    /// It was `#[ignore]`d. Coordinators report ignored tests themselves without sending them,
    /// so a worker counts none today; the label exists so that dashboards need no change.
    Ignored,
    /// It ran past its timeout and was killed.
    TimedOut,
    /// It could not be run (sandbox set-up failed, binary missing, ...).
    SystemError,
}

impl Outcome {
    /// Every outcome, in the order the page and the metrics list them.
    pub const ALL: [Outcome; 5] = [
        Outcome::Passed,
        Outcome::Failed,
        Outcome::Ignored,
        Outcome::TimedOut,
        Outcome::SystemError,
    ];

    /// The outcome of an attempt that ended with `failure`.
    pub fn of(failure: Option<&Failure>) -> Outcome {
        match failure {
            None => Outcome::Passed,
            Some(Failure::TimedOut { .. }) => Outcome::TimedOut,
            Some(Failure::System { .. }) => Outcome::SystemError,
            Some(_) => Outcome::Failed,
        }
    }

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Passed => "passed",
            Outcome::Failed => "failed",
            Outcome::Ignored => "ignored",
            Outcome::TimedOut => "timed_out",
            Outcome::SystemError => "system_error",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// A finished test, for the status page.
#[derive(Clone, Debug)]
pub struct Finished {
    /// The test's name (as the coordinator sent it: escape before showing).
    pub test: String,
    /// Its run's label (as the coordinator sent it: escape before showing).
    pub run: String,
    /// How it ended.
    pub outcome: Outcome,
    /// How long it ran.
    pub duration: Duration,
    /// When it ended.
    pub at: SystemTime,
}

/// The worker's counters.
#[derive(Debug)]
pub struct Metrics {
    tests: Family<OutcomeLabels, Counter>,
    durations: Histogram,
    refused: Family<ReasonLabels, Counter>,
    recent: Mutex<VecDeque<Finished>>,
}

/// Values read from the rest of the worker when a scrape asks.
#[derive(Clone, Copy, Debug)]
pub struct Gauges {
    /// `--slots`.
    pub slots: u64,
    /// Slots running a test now.
    pub busy: u64,
    /// Runs (coordinators) connected now.
    pub connections: u64,
    /// True while the worker drains: it takes no new work.
    pub draining: bool,
    /// The cache's figures.
    pub cache: CacheStats,
}

impl Default for Metrics {
    fn default() -> Self {
        let tests = Family::<OutcomeLabels, Counter>::default();
        // Every outcome is listed from the start, at 0, so that rates work from the first scrape.
        for outcome in Outcome::ALL {
            let _ = tests.get_or_create(&OutcomeLabels {
                outcome: outcome.label(),
            });
        }
        Metrics {
            tests,
            // 1 ms to ~17 min.
            durations: Histogram::new(exponential_buckets(0.001, 4.0, 11)),
            refused: Family::default(),
            recent: Mutex::new(VecDeque::with_capacity(RECENT)),
        }
    }
}

impl Metrics {
    /// Counts a finished test and keeps it among the recent results.
    pub fn test_finished(&self, test: &str, run: &str, outcome: Outcome, duration: Duration) {
        self.tests
            .get_or_create(&OutcomeLabels {
                outcome: outcome.label(),
            })
            .inc();
        self.durations.observe(duration.as_secs_f64());
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() == RECENT {
            recent.pop_back();
        }
        recent.push_front(Finished {
            test: test.to_owned(),
            run: run.to_owned(),
            outcome,
            duration,
            at: SystemTime::now(),
        });
    }

    /// Counts a handshake refused for `reason` (`bad token`, `timeout`, `evicted`, ...).
    pub fn handshake_refused(&self, reason: &'static str) {
        self.refused.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// Tests finished with `outcome` so far.
    pub fn tests(&self, outcome: Outcome) -> u64 {
        self.tests
            .get_or_create(&OutcomeLabels {
                outcome: outcome.label(),
            })
            .get()
    }

    /// The most recent results, newest first.
    pub fn recent(&self) -> Vec<Finished> {
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent.iter().cloned().collect()
    }

    /// Every metric in the Prometheus text format (version 0.0.4).
    pub fn encode(&self, now: Gauges) -> String {
        let mut registry = Registry::with_prefix("dtf_worker");
        registry.register("slots", "Tests this worker runs at once", gauge(now.slots));
        registry.register("slots_busy", "Slots running a test now", gauge(now.busy));
        registry.register("tests", "Tests finished, by outcome", self.tests.clone());
        registry.register(
            "test_duration_seconds",
            "How long tests ran",
            self.durations.clone(),
        );
        registry.register(
            "received_bytes",
            "Bytes of binaries and input files received",
            ConstCounter::new(now.cache.received),
        );
        registry.register(
            "cache_bytes",
            "Bytes stored in the cache",
            gauge(now.cache.bytes),
        );
        registry.register(
            "cache_max_bytes",
            "The cache's cap (--cache-max)",
            gauge(now.cache.max),
        );
        registry.register(
            "cache_entries",
            "Blobs (binaries and input files) in the cache",
            gauge(now.cache.entries),
        );
        registry.register(
            "cache_hits",
            "Cache lookups that found the blob",
            ConstCounter::new(now.cache.hits),
        );
        registry.register(
            "cache_misses",
            "Cache lookups that did not (the coordinator uploads it)",
            ConstCounter::new(now.cache.misses),
        );
        registry.register(
            "cache_evictions",
            "Blobs deleted to keep the cache under its cap",
            ConstCounter::new(now.cache.evictions),
        );
        registry.register(
            "connections",
            "Runs (coordinators) connected now; status queries are not runs",
            gauge(now.connections),
        );
        registry.register(
            "handshakes_refused",
            "Connections closed before authenticating, by reason",
            self.refused.clone(),
        );
        registry.register(
            "draining",
            "1 while the worker drains (takes no new work), else 0",
            gauge(u64::from(now.draining)),
        );
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry);
        out
    }
}

fn gauge(value: u64) -> ConstGauge {
    ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gauges() -> Gauges {
        Gauges {
            slots: 4,
            busy: 1,
            connections: 2,
            draining: true,
            cache: CacheStats {
                entries: 3,
                bytes: 300,
                max: 1000,
                hits: 5,
                misses: 6,
                received: 7,
                evictions: 8,
            },
        }
    }

    #[test]
    fn outcomes_map_from_failures() {
        assert_eq!(Outcome::of(None), Outcome::Passed);
        let timeout = Failure::TimedOut {
            after: Duration::from_secs(1),
        };
        assert_eq!(Outcome::of(Some(&timeout)), Outcome::TimedOut);
        let system = Failure::System {
            message: "x".into(),
        };
        assert_eq!(Outcome::of(Some(&system)), Outcome::SystemError);
        assert_eq!(Outcome::of(Some(&Failure::DidNotPanic)), Outcome::Failed);
    }

    #[test]
    fn the_text_lists_every_outcome_and_the_figures_read_at_scrape_time() {
        let metrics = Metrics::default();
        metrics.test_finished("a", "run", Outcome::Passed, Duration::from_millis(3));
        metrics.test_finished("b", "run", Outcome::Passed, Duration::from_millis(3));
        metrics.test_finished("c", "run", Outcome::TimedOut, Duration::from_secs(2));
        metrics.handshake_refused("bad token");
        let text = metrics.encode(gauges());
        for line in [
            "dtf_worker_tests_total{outcome=\"passed\"} 2",
            "dtf_worker_tests_total{outcome=\"timed_out\"} 1",
            "dtf_worker_tests_total{outcome=\"failed\"} 0",
            "dtf_worker_tests_total{outcome=\"ignored\"} 0",
            "dtf_worker_tests_total{outcome=\"system_error\"} 0",
            "dtf_worker_test_duration_seconds_count 3",
            "dtf_worker_handshakes_refused_total{reason=\"bad token\"} 1",
            "dtf_worker_slots 4",
            "dtf_worker_slots_busy 1",
            "dtf_worker_cache_evictions_total 8",
            "dtf_worker_received_bytes_total 7",
            "dtf_worker_draining 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        let recent = metrics.recent();
        assert_eq!(recent.len(), 3);
        assert_eq!(recent[0].test, "c", "newest first");
    }

    #[test]
    fn recent_results_are_bounded() {
        let metrics = Metrics::default();
        for i in 0..RECENT + 5 {
            metrics.test_finished(&format!("t{i}"), "r", Outcome::Failed, Duration::ZERO);
        }
        let recent = metrics.recent();
        assert_eq!(recent.len(), RECENT);
        assert_eq!(recent[0].test, format!("t{}", RECENT + 4));
        assert_eq!(metrics.tests(Outcome::Failed), (RECENT + 5) as u64);
    }
}
