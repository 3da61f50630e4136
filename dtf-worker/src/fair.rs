//! Fair sharing of the worker's slots between the runs connected to it.
//!
//! Each coordinator connection is one run. A run request waits for a slot; when a slot frees,
//! it goes to the waiting run that holds the fewest slots, ties going to the run that was
//! served least recently. Two runs sharing a worker thus converge to half the slots each, and
//! a run that connects late is served at the next free slot instead of after the first run's
//! whole queue.
//!
//! [`FairSlots`] is the pure bookkeeping; [`SlotPool`] wraps it for async callers.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

/// Identifies a run (one coordinator connection).
pub type RunId = u64;

/// Identifies one waiting request.
pub type Ticket = u64;

/// The pure allocator.
#[derive(Debug)]
pub struct FairSlots {
    slots: usize,
    busy: usize,
    held: HashMap<RunId, usize>,
    waiting: BTreeMap<RunId, VecDeque<Ticket>>,
    last_served: HashMap<RunId, u64>,
    clock: u64,
}

impl FairSlots {
    /// An allocator of `slots` slots (at least one).
    pub fn new(slots: usize) -> FairSlots {
        FairSlots {
            slots: slots.max(1),
            busy: 0,
            held: HashMap::new(),
            waiting: BTreeMap::new(),
            last_served: HashMap::new(),
            clock: 0,
        }
    }

    /// Asks for a slot for `run`. True when granted at once; otherwise `ticket` waits until
    /// [`FairSlots::release`] returns it.
    pub fn request(&mut self, run: RunId, ticket: Ticket) -> bool {
        if self.busy < self.slots && self.waiting.is_empty() {
            self.grant(run);
            true
        } else {
            self.waiting.entry(run).or_default().push_back(ticket);
            false
        }
    }

    /// Gives back a slot `run` held. Returns the waiting request the slot now goes to.
    pub fn release(&mut self, run: RunId) -> Option<(RunId, Ticket)> {
        self.busy = self.busy.saturating_sub(1);
        if let Some(n) = self.held.get_mut(&run) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.held.remove(&run);
            }
        }
        self.next_grant()
    }

    /// Withdraws a waiting request. False when it is not waiting (it was granted meanwhile).
    pub fn cancel(&mut self, run: RunId, ticket: Ticket) -> bool {
        let Some(queue) = self.waiting.get_mut(&run) else {
            return false;
        };
        let Some(pos) = queue.iter().position(|&t| t == ticket) else {
            return false;
        };
        queue.remove(pos);
        if queue.is_empty() {
            self.waiting.remove(&run);
        }
        true
    }

    /// Forgets a run that disconnected (its tickets and its tie-break history).
    pub fn forget(&mut self, run: RunId) {
        self.waiting.remove(&run);
        self.last_served.remove(&run);
    }

    /// Slots `run` holds now.
    pub fn held(&self, run: RunId) -> usize {
        self.held.get(&run).copied().unwrap_or(0)
    }

    /// Requests waiting for a slot.
    pub fn waiting(&self) -> usize {
        self.waiting.values().map(VecDeque::len).sum()
    }

    /// Slots in use.
    #[cfg(test)]
    pub fn busy(&self) -> usize {
        self.busy
    }

    fn next_grant(&mut self) -> Option<(RunId, Ticket)> {
        if self.busy >= self.slots {
            return None;
        }
        let run = *self.waiting.keys().min_by_key(|run| {
            (
                self.held(**run),
                self.last_served.get(run).copied().unwrap_or(0),
            )
        })?;
        let queue = self.waiting.get_mut(&run)?;
        let ticket = queue.pop_front()?;
        if queue.is_empty() {
            self.waiting.remove(&run);
        }
        self.grant(run);
        Some((run, ticket))
    }

    fn grant(&mut self, run: RunId) {
        self.busy += 1;
        *self.held.entry(run).or_default() += 1;
        self.clock += 1;
        self.last_served.insert(run, self.clock);
    }
}

/// The async face of [`FairSlots`]: `acquire` waits for a slot; the permit gives it back.
#[derive(Debug)]
pub struct SlotPool {
    state: Mutex<PoolState>,
    tickets: AtomicU64,
}

#[derive(Debug)]
struct PoolState {
    fair: FairSlots,
    wakers: HashMap<Ticket, oneshot::Sender<()>>,
}

impl SlotPool {
    /// A pool of `slots` slots.
    pub fn new(slots: usize) -> Arc<SlotPool> {
        Arc::new(SlotPool {
            state: Mutex::new(PoolState {
                fair: FairSlots::new(slots),
                wakers: HashMap::new(),
            }),
            tickets: AtomicU64::new(1),
        })
    }

    fn lock(&self) -> MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for a slot for `run`. Cancel-safe: dropping the future withdraws the request (or
    /// passes on a slot granted meanwhile).
    pub async fn acquire(self: &Arc<Self>, run: RunId) -> Permit {
        let ticket = self.tickets.fetch_add(1, Ordering::Relaxed);
        let rx = {
            let mut state = self.lock();
            if state.fair.request(run, ticket) {
                return Permit {
                    pool: self.clone(),
                    run,
                };
            }
            let (tx, rx) = oneshot::channel();
            state.wakers.insert(ticket, tx);
            rx
        };
        let mut waiting = Waiting {
            pool: self,
            run,
            ticket,
            armed: true,
        };
        // The sender lives in the pool until the grant, so this only ends with a grant.
        let _ = rx.await;
        waiting.armed = false;
        Permit {
            pool: self.clone(),
            run,
        }
    }

    /// Forgets a run that disconnected.
    pub fn forget(&self, run: RunId) {
        self.lock().fair.forget(run);
    }

    /// Requests waiting for a slot.
    pub fn waiting(&self) -> usize {
        self.lock().fair.waiting()
    }

    /// Slots in use.
    #[cfg(test)]
    pub fn busy(&self) -> usize {
        self.lock().fair.busy()
    }

    fn release(&self, run: RunId) {
        let mut state = self.lock();
        let mut next = state.fair.release(run);
        while let Some((run, ticket)) = next {
            match state.wakers.remove(&ticket).map(|tx| tx.send(())) {
                Some(Ok(())) => break,
                // The waiter is gone: pass the slot on.
                _ => next = state.fair.release(run),
            }
        }
    }
}

/// A slot held until dropped.
#[derive(Debug)]
pub struct Permit {
    pool: Arc<SlotPool>,
    run: RunId,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.pool.release(self.run);
    }
}

struct Waiting<'a> {
    pool: &'a Arc<SlotPool>,
    run: RunId,
    ticket: Ticket,
    armed: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let granted = {
            let mut state = self.pool.lock();
            state.wakers.remove(&self.ticket);
            !state.fair.cancel(self.run, self.ticket)
        };
        if granted {
            // Granted after all, but nobody will use it.
            self.pool.release(self.run);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_at_once_while_slots_are_free() {
        let mut f = FairSlots::new(2);
        assert!(f.request(1, 10));
        assert!(f.request(1, 11));
        assert!(!f.request(1, 12));
        assert_eq!(f.busy(), 2);
        assert_eq!(f.waiting(), 1);
        assert_eq!(f.release(1), Some((1, 12)));
        assert_eq!(f.release(1), None);
        assert_eq!(f.busy(), 1);
    }

    #[test]
    fn a_late_run_gets_the_next_free_slot_and_then_half() {
        let mut f = FairSlots::new(4);
        // Run 1 fills the worker and queues more.
        for t in 0..4 {
            assert!(f.request(1, t));
        }
        for t in 4..20 {
            assert!(!f.request(1, t));
        }
        // Run 2 arrives with its own queue.
        for t in 100..116 {
            assert!(!f.request(2, t));
        }
        // Run 1's tests finish one by one: the freed slots go to run 2 until both hold half.
        let grants: Vec<RunId> = (0..4)
            .filter_map(|_| f.release(1))
            .map(|(r, _)| r)
            .collect();
        assert_eq!(grants, [2, 2, 1, 1]);
        assert_eq!((f.held(1), f.held(2)), (2, 2));
    }

    #[test]
    fn steady_state_is_an_even_split() {
        let mut f = FairSlots::new(4);
        let mut next = [0u64, 1000];
        for run in [1u64, 2] {
            for _ in 0..50 {
                let t = next[run as usize - 1];
                next[run as usize - 1] += 1;
                f.request(run, t);
            }
        }
        // Simulate tests of equal length: each step the oldest running test finishes.
        let mut running: VecDeque<RunId> = VecDeque::from([1, 1, 1, 1]);
        let mut served = HashMap::new();
        for step in 0..40 {
            let run = running.pop_front().unwrap_or_else(|| panic!("a test runs"));
            if let Some((r, _)) = f.release(run) {
                running.push_back(r);
                *served.entry(r).or_insert(0) += 1;
            }
            // Run 1 started with every slot; two frees later the split is even and stays so.
            if step >= 1 {
                assert_eq!((f.held(1), f.held(2)), (2, 2), "step {step}: {f:?}");
            }
        }
        assert!(served[&1] >= 19 && served[&2] >= 19, "{served:?}");
    }

    #[test]
    fn cancelled_requests_leave_the_queue() {
        let mut f = FairSlots::new(1);
        assert!(f.request(1, 1));
        assert!(!f.request(2, 2));
        assert!(f.cancel(2, 2));
        assert!(!f.cancel(2, 2));
        assert_eq!(f.release(1), None);
        assert_eq!(f.busy(), 0);
    }

    #[test]
    fn the_pool_hands_slots_over_and_survives_cancellation() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let pool = SlotPool::new(1);
            let first = pool.acquire(1).await;
            let p2 = pool.clone();
            let waiter = tokio::spawn(async move { p2.acquire(2).await });
            let p3 = pool.clone();
            let cancelled = tokio::spawn(async move { p3.acquire(3).await });
            tokio::task::yield_now().await;
            assert_eq!(pool.waiting(), 2);
            cancelled.abort();
            let _ = cancelled.await;
            assert_eq!(pool.waiting(), 1);
            drop(first);
            let second = waiter.await.unwrap();
            assert_eq!(pool.busy(), 1);
            drop(second);
            assert_eq!(pool.busy(), 0);
        });
    }
}
