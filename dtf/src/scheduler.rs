//! The scheduler: which test runs next, what a finished attempt means (done, retry, requeue
//! after a lost worker), and when the run is over. Pure logic with no I/O, driven by the local
//! runner and by the coordinator alike, and tested deterministically.

use std::collections::VecDeque;

use crate::outcome::{Attempt, Failure, Status};

/// How many times a test may lose its worker (or hit an infrastructure failure) before it
/// fails with that reason instead of being requeued again.
pub const MAX_WORKER_LOSSES: u32 = 3;

/// One attempt to hand to a runner: test `test` (an index into the run's test list).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Job {
    /// Index of the test in the run's list.
    pub test: usize,
    /// 1 for the first attempt, 2 for the first retry, ...
    pub attempt: u32,
}

/// A test that is done, with every attempt it took.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finished {
    /// Index of the test in the run's list.
    pub test: usize,
    /// How it ended: `Passed`, `Flaky` or `Failed`.
    pub status: Status,
    /// Every attempt, in order.
    pub attempts: Vec<Attempt>,
    /// True when it was requeued at least once because its worker was lost.
    pub rerun_after_lost_worker: bool,
}

#[derive(Debug, Default)]
struct TestState {
    retries: u32,
    attempts: Vec<Attempt>,
    /// Worker losses and infrastructure failures, together bounded by MAX_WORKER_LOSSES.
    losses: u32,
    /// True once a worker running it was lost.
    lost_worker: bool,
    done: bool,
}

/// What bounds which test may start: the slots a test takes and the test groups.
#[derive(Clone, Debug, Default)]
pub struct Limits {
    /// `threads[i]`: slots test `i` takes while it runs (`threads-required`; 1 when absent).
    pub threads: Vec<usize>,
    /// `group[i]`: the test group of test `i`, an index into `group_max`.
    pub group: Vec<Option<usize>>,
    /// The most tests of each group that run at once, across the whole run.
    pub group_max: Vec<usize>,
}

/// A test that took less than this on its last run and on average (as the history records
/// it) may share a slot with another such test when the run's slots are the default: most of
/// its time is then the fresh process's start and end, which overlap well (see
/// [`Limits::in_half_slots`]).
pub const SHORT: std::time::Duration = std::time::Duration::from_millis(5);

impl Limits {
    /// The same limits counted in half slots: a test marked in `short` that asks for one slot
    /// takes one half, every other test two halves per slot it asks for. A runner with `n`
    /// slots then has `2 × n` halves, and runs up to two short tests per slot.
    pub fn in_half_slots(mut self, short: &[bool]) -> Limits {
        for (test, threads) in self.threads.iter_mut().enumerate() {
            let one = (*threads).max(1);
            *threads = if one == 1 && short.get(test).copied().unwrap_or(false) {
                1
            } else {
                one * 2
            };
        }
        self
    }

    /// The slots test `test` takes.
    pub fn threads_of(&self, test: usize) -> usize {
        self.threads.get(test).copied().unwrap_or(1).max(1)
    }

    fn group_of(&self, test: usize) -> Option<usize> {
        self.group.get(test).copied().flatten()
    }
}

/// The queue and the bookkeeping of one run.
#[derive(Debug)]
pub struct Scheduler {
    queue: VecDeque<usize>,
    tests: Vec<TestState>,
    in_flight: usize,
    remaining: usize,
    stopped: bool,
    limits: Limits,
    /// Tests of each group handed out and not yet recorded.
    group_running: Vec<usize>,
}

impl Scheduler {
    /// A run of the tests at `order` (indices, in the order they should start), with
    /// `retries[i]` retries allowed for test `i`.
    pub fn new(order: Vec<usize>, retries: &[u32]) -> Scheduler {
        let tests: Vec<TestState> = retries
            .iter()
            .map(|&retries| TestState {
                retries,
                ..TestState::default()
            })
            .collect();
        Scheduler {
            remaining: order.len(),
            queue: order.into(),
            tests,
            in_flight: 0,
            stopped: false,
            limits: Limits::default(),
            group_running: Vec::new(),
        }
    }

    /// As [`Scheduler::new`], with the slots each test takes and its test group.
    pub fn with_limits(order: Vec<usize>, retries: &[u32], limits: Limits) -> Scheduler {
        let mut scheduler = Scheduler::new(order, retries);
        scheduler.group_running = vec![0; limits.group_max.len()];
        scheduler.limits = limits;
        scheduler
    }

    /// The slots test `test` takes.
    pub fn threads_of(&self, test: usize) -> usize {
        self.limits.threads_of(test)
    }

    /// The next attempt to start, if any is waiting (and its group has room).
    pub fn next_job(&mut self) -> Option<Job> {
        self.next_job_within(usize::MAX)
    }

    /// The first waiting attempt that fits in `free` slots and whose test group has room. A
    /// test that needs more slots than a target has at all is given to an idle target: pass
    /// its whole size as `free` when it is idle.
    pub fn next_job_within(&mut self, free: usize) -> Option<Job> {
        self.next_job_preferring(free, 1, |_| 0)
    }

    /// Like [`next_job_within`](Self::next_job_within), but among the first `window` attempts
    /// that fit, the one of lowest `rank` (the first of those on a tie). A dispatcher ranks by
    /// what is cheap where the attempt goes (a worker that already runs the test's binary), and
    /// the window bounds how far that may reorder the queue.
    pub fn next_job_preferring(
        &mut self,
        free: usize,
        window: usize,
        rank: impl Fn(usize) -> u8,
    ) -> Option<Job> {
        if self.stopped || free == 0 {
            return None;
        }
        let fits = |test: usize| {
            self.limits.threads_of(test) <= free
                && self
                    .limits
                    .group_of(test)
                    .is_none_or(|g| self.group_running[g] < self.limits.group_max[g])
        };
        let mut best: Option<(u8, usize)> = None;
        for (position, &test) in self
            .queue
            .iter()
            .enumerate()
            .filter(|&(_, &test)| fits(test))
            .take(window.max(1))
        {
            let r = rank(test);
            if best.is_none_or(|(b, _)| r < b) {
                best = Some((r, position));
                if r == 0 {
                    break;
                }
            }
        }
        let (_, position) = best?;
        let test = self.queue.remove(position)?;
        if let Some(g) = self.limits.group_of(test) {
            self.group_running[g] += 1;
        }
        self.in_flight += 1;
        Some(Job {
            test,
            attempt: self.tests[test].attempts.len() as u32 + 1,
        })
    }

    /// An attempt handed out is over (recorded or lost): its group has room again.
    fn release(&mut self, test: usize) {
        self.in_flight = self.in_flight.saturating_sub(1);
        if let Some(g) = self.limits.group_of(test) {
            self.group_running[g] = self.group_running[g].saturating_sub(1);
        }
    }

    /// Records a finished attempt. Returns the test's final result when it is done; `None`
    /// when it was queued again (a retry, or an infrastructure failure to run elsewhere).
    /// `requeue_system` says whether an infrastructure failure may be retried (true when
    /// other workers could run it).
    pub fn record(&mut self, job: Job, attempt: Attempt, requeue_system: bool) -> Option<Finished> {
        self.release(job.test);
        let state = &mut self.tests[job.test];
        if state.done {
            return None; // a late duplicate: the test was already reported
        }
        let system = attempt.failure.as_ref().is_some_and(Failure::is_system);
        if system && requeue_system && state.losses + 1 < MAX_WORKER_LOSSES && !self.stopped {
            state.losses += 1;
            self.queue.push_front(job.test);
            return None;
        }
        let passed = attempt.passed();
        state.attempts.push(attempt);
        let retries_left = (state.attempts.len() as u32) <= state.retries;
        if !passed && !system && retries_left && !self.stopped {
            // Retries go first so a flaky test does not hold the end of the run.
            self.queue.push_front(job.test);
            return None;
        }
        let status = if !passed {
            Status::Failed
        } else if state.attempts.len() > 1 {
            Status::Flaky
        } else {
            Status::Passed
        };
        Some(self.finish(job.test, status))
    }

    /// The worker running `job` was lost: requeue it first in line, or fail it when it has
    /// lost its worker [`MAX_WORKER_LOSSES`] times.
    pub fn worker_lost(&mut self, job: Job) -> Option<Finished> {
        self.release(job.test);
        let state = &mut self.tests[job.test];
        if state.done {
            return None;
        }
        state.losses += 1;
        state.lost_worker = true;
        if state.losses >= MAX_WORKER_LOSSES {
            let times = state.losses;
            state.attempts.push(Attempt {
                failure: Some(Failure::WorkerLost { times }),
                duration: Default::default(),
                output: Default::default(),
                worker: None,
                kept_tmp: None,
                leaked: Vec::new(),
            });
            return Some(self.finish(job.test, Status::Failed));
        }
        if self.stopped {
            return None;
        }
        self.queue.push_front(job.test);
        None
    }

    /// The worker sent `job` declined it before it started (it is draining): queue it again,
    /// first in line, counting nothing against the test.
    pub fn declined(&mut self, job: Job) {
        self.release(job.test);
        let state = &self.tests[job.test];
        if state.done || self.stopped {
            return;
        }
        self.queue.push_front(job.test);
    }

    /// Stops dispatching (fail-fast or an interrupt): returns the tests that will never run.
    /// Attempts in flight may still be recorded.
    pub fn stop(&mut self) -> Vec<usize> {
        self.stopped = true;
        let mut not_run: Vec<usize> = self.queue.drain(..).collect();
        for &t in &not_run {
            self.tests[t].done = true;
        }
        self.remaining -= not_run.len();
        not_run.sort_unstable();
        not_run
    }

    /// Tests started and not yet recorded.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Tests waiting to start.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// True when every test has its final result (or was dropped by [`Scheduler::stop`]).
    pub fn is_done(&self) -> bool {
        self.remaining == 0
    }

    fn finish(&mut self, test: usize, status: Status) -> Finished {
        let state = &mut self.tests[test];
        state.done = true;
        self.remaining -= 1;
        Finished {
            test,
            status,
            attempts: std::mem::take(&mut state.attempts),
            rerun_after_lost_worker: state.lost_worker,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_half_slots_two_short_tests_share_a_slot_and_others_keep_theirs() {
        let limits = Limits {
            threads: vec![1, 1, 1, 2],
            group: vec![None; 4],
            group_max: Vec::new(),
        }
        .in_half_slots(&[true, true, false, true]);
        // A test asking for two slots keeps them, short or not.
        assert_eq!(limits.threads, vec![1, 1, 2, 4]);
        // One slot (two halves): both short tests start together; the long one waits.
        let mut s = Scheduler::with_limits(vec![0, 1, 2, 3], &[0; 4], limits.clone());
        let a = s.next_job_within(2).expect("a short test");
        let b = s
            .next_job_within(2 - limits.threads_of(a.test))
            .expect("a second");
        assert_eq!((a.test, b.test), (0, 1));
        assert_eq!(s.next_job_within(0), None, "the slot is full");
        // With nothing short, half slots change nothing: one test per slot.
        let plain = Limits {
            threads: vec![1, 1],
            group: vec![None; 2],
            group_max: Vec::new(),
        }
        .in_half_slots(&[]);
        let mut s = Scheduler::with_limits(vec![0, 1], &[0; 2], plain.clone());
        let first = s.next_job_within(2).expect("a test");
        assert_eq!(s.next_job_within(2 - plain.threads_of(first.test)), None);
    }

    fn pass() -> Attempt {
        Attempt {
            failure: None,
            duration: Default::default(),
            output: Default::default(),
            worker: None,
            kept_tmp: None,
            leaked: Vec::new(),
        }
    }

    fn fail() -> Attempt {
        Attempt {
            failure: Some(Failure::DidNotPanic),
            ..pass()
        }
    }

    fn system() -> Attempt {
        Attempt {
            failure: Some(Failure::System {
                message: "no sandbox".into(),
            }),
            ..pass()
        }
    }

    #[test]
    fn runs_in_the_given_order_and_finishes() {
        let mut s = Scheduler::new(vec![2, 0, 1], &[0, 0, 0]);
        let jobs: Vec<usize> = std::iter::from_fn(|| s.next_job())
            .map(|j| j.test)
            .collect();
        assert_eq!(jobs, [2, 0, 1]);
        for t in jobs {
            let f = s
                .record(
                    Job {
                        test: t,
                        attempt: 1,
                    },
                    pass(),
                    false,
                )
                .unwrap();
            assert_eq!(f.status, Status::Passed);
        }
        assert!(s.is_done());
    }

    #[test]
    fn a_retried_pass_is_flaky_and_retries_are_bounded() {
        let mut s = Scheduler::new(vec![0, 1], &[1, 1]);
        let a = s.next_job().unwrap();
        assert_eq!(s.record(a, fail(), false), None);
        let retry = s.next_job().unwrap();
        assert_eq!(
            retry,
            Job {
                test: 0,
                attempt: 2
            },
            "a retry jumps the queue"
        );
        let f = s.record(retry, pass(), false).unwrap();
        assert_eq!(f.status, Status::Flaky);
        assert_eq!(f.attempts.len(), 2);

        let b = s.next_job().unwrap();
        assert_eq!(s.record(b, fail(), false), None);
        let b2 = s.next_job().unwrap();
        let f = s.record(b2, fail(), false).unwrap();
        assert_eq!(f.status, Status::Failed);
        assert!(s.is_done());
    }

    #[test]
    fn a_lost_worker_requeues_then_gives_up() {
        let mut s = Scheduler::new(vec![0, 1], &[0, 0]);
        let job = s.next_job().unwrap();
        for _ in 1..MAX_WORKER_LOSSES {
            assert_eq!(s.worker_lost(job), None);
            assert_eq!(s.next_job().unwrap().test, 0, "requeued first in line");
        }
        let f = s.worker_lost(job).unwrap();
        assert_eq!(f.status, Status::Failed);
        assert_eq!(
            f.attempts[0].failure,
            Some(Failure::WorkerLost {
                times: MAX_WORKER_LOSSES
            })
        );
        let other = s.next_job().unwrap();
        let f = s.record(other, pass(), false).unwrap();
        assert!(!f.rerun_after_lost_worker);
        assert!(s.is_done());
    }

    #[test]
    fn a_declined_test_goes_back_first_in_line_and_counts_nothing() {
        let mut s = Scheduler::new(vec![0, 1], &[0, 0]);
        for _ in 0..2 * MAX_WORKER_LOSSES {
            let job = s.next_job().unwrap();
            assert_eq!(job.test, 0);
            assert_eq!(s.in_flight(), 1);
            s.declined(job);
            assert_eq!(s.in_flight(), 0);
        }
        let job = s.next_job().unwrap();
        let f = s.record(job, pass(), true).unwrap();
        assert_eq!((f.status, f.attempts.len()), (Status::Passed, 1));
        assert!(!f.rerun_after_lost_worker);
        let other = s.next_job().unwrap();
        s.record(other, pass(), true).unwrap();
        assert!(s.is_done());
    }

    #[test]
    fn a_rerun_after_a_lost_worker_is_marked_and_reported_once() {
        let mut s = Scheduler::new(vec![0], &[0]);
        let job = s.next_job().unwrap();
        assert_eq!(s.worker_lost(job), None);
        let again = s.next_job().unwrap();
        let f = s.record(again, pass(), true).unwrap();
        assert!(f.rerun_after_lost_worker);
        // The lost worker's late answer is ignored.
        assert_eq!(s.record(job, pass(), true), None);
        assert!(s.is_done());
    }

    #[test]
    fn system_failures_move_elsewhere_but_not_forever_and_not_locally() {
        let mut s = Scheduler::new(vec![0], &[5]);
        let job = s.next_job().unwrap();
        assert_eq!(s.record(job, system(), true), None);
        let job = s.next_job().unwrap();
        assert_eq!(
            job.attempt, 1,
            "an infrastructure failure is not an attempt"
        );
        assert_eq!(s.record(job, system(), true), None);
        let job = s.next_job().unwrap();
        let f = s.record(job, system(), true).unwrap();
        assert_eq!(f.status, Status::Failed, "no retry of a system failure");
        assert!(!f.rerun_after_lost_worker, "no worker was lost");

        let mut local = Scheduler::new(vec![0], &[0]);
        let job = local.next_job().unwrap();
        assert!(local.record(job, system(), false).is_some());
    }

    #[test]
    fn groups_and_thread_counts_bound_what_starts() {
        // Tests 0 and 1 share a group of one; test 2 takes two slots.
        let limits = Limits {
            threads: vec![1, 1, 2, 1],
            group: vec![Some(0), Some(0), None, None],
            group_max: vec![1],
        };
        let mut s = Scheduler::with_limits(vec![0, 1, 2, 3], &[0, 0, 0, 0], limits);
        let a = s.next_job_within(3).unwrap();
        assert_eq!(a.test, 0);
        let b = s.next_job_within(2).unwrap();
        assert_eq!(b.test, 2, "test 1 waits for its group; 2 fits in two slots");
        assert_eq!(s.next_job_within(0), None);
        let c = s.next_job_within(1).unwrap();
        assert_eq!(c.test, 3);
        assert_eq!(s.next_job_within(5), None, "the group is full");
        assert!(s.record(a, pass(), false).is_some());
        assert_eq!(
            s.next_job_within(1).unwrap().test,
            1,
            "the group has room again"
        );
    }

    #[test]
    fn a_preference_reorders_only_within_its_window() {
        let mut s = Scheduler::new(vec![0, 1, 2, 3, 4, 5], &[0; 6]);
        // Rank: 3 and 5 are preferred; with a window of 3 only 3 is within reach.
        let rank = |t: usize| if t == 3 || t == 5 { 0 } else { 1 };
        assert_eq!(s.next_job_preferring(1, 3, rank).map(|j| j.test), Some(0));
        assert_eq!(s.next_job_preferring(1, 3, rank).map(|j| j.test), Some(3));
        // Queue 1, 2, 4, 5: the window of 3 holds no preferred test, so the head goes.
        assert_eq!(s.next_job_preferring(1, 3, rank).map(|j| j.test), Some(1));
        // Queue 2, 4, 5: 5 is in reach now.
        assert_eq!(s.next_job_preferring(1, 3, rank).map(|j| j.test), Some(5));
        // Lower is better, ties keep the queue's order.
        let rank = |t: usize| if t == 4 { 1 } else { 2 };
        assert_eq!(s.next_job_preferring(1, 8, rank).map(|j| j.test), Some(4));
        assert_eq!(s.next_job_preferring(1, 8, rank).map(|j| j.test), Some(2));
        assert_eq!(s.next_job_preferring(1, 8, rank), None);
    }

    #[test]
    fn stop_drops_the_queue() {
        let mut s = Scheduler::new(vec![0, 1, 2], &[0, 0, 0]);
        let a = s.next_job().unwrap();
        assert_eq!(s.stop(), vec![1, 2]);
        assert_eq!(s.next_job(), None);
        assert!(!s.is_done());
        assert!(s.record(a, fail(), false).is_some());
        assert!(s.is_done());
    }
}
