//! What happens to a connection before it authenticates: caps on unauthenticated connections
//! (in total and per source address), the back-off after failed authentication, and the
//! aggregated log of refusals.
//!
//! The state is plain data behind one mutex; every method takes the time as an argument, so the
//! rules are unit-tested without sockets or sleeps.
//!
//! - **Caps.** At most `max_total` connections may be unauthenticated at once, and at most
//!   `max_per_source` from one source (an IPv4 address, or an IPv6 /64). When a new connection
//!   would go over a cap, the worker closes the *idlest* unauthenticated connection instead
//!   (first those that have sent nothing yet, oldest first; then the oldest of the rest): a
//!   coordinator sends its whole greeting at once and finishes in one round trip, so a flood of
//!   idle connections only ever evicts itself. (An idle connection asked to leave first checks
//!   its socket: one whose greeting has arrived but was not read yet stays.)
//! - **Back-off.** Each failed authentication from a source doubles that source's back-off
//!   (from [`BACKOFF_START`] up to [`BACKOFF_MAX`]); while it lasts, one handshake at a time
//!   from that source waits for it to pass and other greetings from it are refused at once. A
//!   success clears it, and it is forgotten [`BACKOFF_FORGET`] after the last failure. Timeouts
//!   and closed connections do not count: a slow or vanished coordinator is not a guesser.
//! - **Log.** The first refusal in a quiet period is logged at once; after that, at most one
//!   summary line per [`LOG_EVERY`] with counts by reason.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// The first back-off after a failed authentication.
pub const BACKOFF_START: Duration = Duration::from_millis(100);
/// The longest back-off.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long after its last failure a source's back-off is forgotten.
pub const BACKOFF_FORGET: Duration = Duration::from_secs(60);
/// The least time between two refusal log lines.
pub const LOG_EVERY: Duration = Duration::from_secs(10);
/// The most sources whose failures are remembered (the oldest are forgotten first).
const MAX_REMEMBERED: usize = 4096;

/// Where a connection comes from, for the caps and the back-off: its IP address, with IPv6
/// addresses reduced to their /64 (one host usually holds a whole /64).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Source(IpAddr);

impl Source {
    /// The source of `peer`.
    pub fn of(peer: SocketAddr) -> Source {
        match peer.ip() {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source(IpAddr::V4(v4)),
                None => {
                    let bits = u128::from(v6) & !((1u128 << 64) - 1);
                    Source(IpAddr::V6(bits.into()))
                }
            },
            ip => Source(ip),
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
            ip => write!(f, "{ip}"),
        }
    }
}

/// The limits.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Unauthenticated connections at once.
    pub max_total: usize,
    /// Unauthenticated connections at once from one source.
    pub max_per_source: usize,
}

impl Limits {
    /// Limits that fit an open-file limit of `nofile`: a quarter of it for unauthenticated
    /// connections (between 16 and 1024), half of that per source (at least 4): the more room
    /// per source, the longer a coordinator sharing an address with a flood has to send its
    /// greeting before it could be evicted.
    pub fn for_nofile(nofile: u64) -> Limits {
        let max_total = (nofile / 4).clamp(16, 1024) as usize;
        Limits {
            max_total,
            max_per_source: (max_total / 2).max(4),
        }
    }
}

/// A new connection's place among the unauthenticated ones.
#[derive(Debug, PartialEq, Eq)]
pub struct Admitted {
    /// The connection's id, for [`Admission::ready`] and [`Admission::done`].
    pub id: u64,
    /// Connections to close to make room (their ids), if they are still idle.
    pub evict: Vec<u64>,
}

/// What to do with a connection whose greeting has arrived.
#[derive(Debug, PartialEq, Eq)]
pub enum Ready {
    /// Go ahead with the handshake.
    Go,
    /// Its source is in back-off: wait this long first.
    Wait(Duration),
    /// Close it at once: its source is in back-off and already has a handshake waiting.
    BackingOff,
}

struct Pending {
    source: Source,
    since: Instant,
    /// True once it has sent something.
    active: bool,
}

#[derive(Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
    /// A handshake from this source is waiting out the back-off.
    waiting: bool,
}

/// Why a connection was refused, by reason, since the last log line.
#[derive(Default)]
struct Tally {
    counts: BTreeMap<&'static str, u64>,
    sources: BTreeMap<Source, u64>,
    last: Option<String>,
    last_line: Option<Instant>,
}

/// The state of every connection that has not authenticated yet.
pub struct Admission {
    limits: Limits,
    next_id: u64,
    pending: HashMap<u64, Pending>,
    failures: HashMap<Source, Failures>,
    tally: Tally,
}

impl Admission {
    /// No connections yet.
    pub fn new(limits: Limits) -> Admission {
        Admission {
            limits,
            next_id: 1,
            pending: HashMap::new(),
            failures: HashMap::new(),
            tally: Tally::default(),
        }
    }

    /// Unauthenticated connections now.
    #[cfg(test)]
    fn pending(&self) -> usize {
        self.pending.len()
    }

    fn backoff(&mut self, source: Source, now: Instant) -> Option<(Duration, bool)> {
        let f = self.failures.get(&source).copied()?;
        if now.duration_since(f.last) >= BACKOFF_FORGET {
            self.failures.remove(&source);
            return None;
        }
        let delay = BACKOFF_START
            .saturating_mul(1u32 << (f.count.saturating_sub(1)).min(16))
            .min(BACKOFF_MAX);
        let until = f.last + delay;
        Some((until.saturating_duration_since(now), f.waiting))
    }

    /// A new connection from `source` at `now`.
    pub fn admit(&mut self, source: Source, now: Instant) -> Admitted {
        let mut evict = Vec::new();
        let from_source = self.pending.values().filter(|p| p.source == source).count();
        if from_source >= self.limits.max_per_source {
            evict.extend(self.idlest(Some(source), from_source + 1 - self.limits.max_per_source));
        }
        let total = self.pending.len() - evict.len();
        if total >= self.limits.max_total {
            let more = self.idlest_excluding(&evict, total + 1 - self.limits.max_total);
            evict.extend(more);
        }
        for id in &evict {
            self.pending.remove(id);
        }
        let id = self.next_id;
        self.next_id += 1;
        self.pending.insert(
            id,
            Pending {
                source,
                since: now,
                active: false,
            },
        );
        Admitted { id, evict }
    }

    /// Connection `id` (evicted while idle) turned out to have sent its greeting already: it
    /// stays, as an active connection.
    pub fn reinstate(&mut self, id: u64, source: Source, now: Instant) {
        self.pending.insert(
            id,
            Pending {
                source,
                since: now,
                active: true,
            },
        );
    }

    /// Connection `id` from `source` has sent its greeting: whether to go ahead.
    pub fn ready(&mut self, id: u64, source: Source, now: Instant) -> Ready {
        if let Some(p) = self.pending.get_mut(&id) {
            p.active = true;
        }
        match self.backoff(source, now) {
            Some((left, _)) if left.is_zero() => Ready::Go,
            Some((_, true)) => Ready::BackingOff,
            Some((left, false)) => {
                if let Some(f) = self.failures.get_mut(&source) {
                    f.waiting = true;
                }
                Ready::Wait(left)
            }
            None => Ready::Go,
        }
    }

    fn idlest(&self, source: Option<Source>, n: usize) -> Vec<u64> {
        self.idlest_excluding_in(source, &[], n)
    }

    fn idlest_excluding(&self, skip: &[u64], n: usize) -> Vec<u64> {
        self.idlest_excluding_in(None, skip, n)
    }

    fn idlest_excluding_in(&self, source: Option<Source>, skip: &[u64], n: usize) -> Vec<u64> {
        let mut candidates: Vec<(bool, Instant, u64)> = self
            .pending
            .iter()
            .filter(|(id, p)| !skip.contains(id) && source.is_none_or(|s| p.source == s))
            .map(|(&id, p)| (p.active, p.since, id))
            .collect();
        candidates.sort();
        candidates
            .into_iter()
            .take(n)
            .map(|(_, _, id)| id)
            .collect()
    }

    /// Connection `id` finished its handshake: `Ok` when it authenticated, else the reason it
    /// was refused (with `failed_auth` when a token was tried and wrong) and the message.
    /// Returns a line to log, when one is due.
    pub fn done(
        &mut self,
        id: u64,
        source: Source,
        peer: SocketAddr,
        waited: bool,
        result: Result<(), Refusal>,
        now: Instant,
    ) -> Option<String> {
        self.pending.remove(&id);
        if waited {
            if let Some(f) = self.failures.get_mut(&source) {
                f.waiting = false;
            }
        }
        match result {
            Ok(()) => {
                self.failures.remove(&source);
                None
            }
            Err(refusal) => {
                if refusal.failed_auth {
                    if self.failures.len() >= MAX_REMEMBERED && !self.failures.contains_key(&source)
                    {
                        if let Some(oldest) = self
                            .failures
                            .iter()
                            .min_by_key(|(_, f)| f.last)
                            .map(|(s, _)| *s)
                        {
                            self.failures.remove(&oldest);
                        }
                    }
                    let f = self.failures.entry(source).or_insert(Failures {
                        count: 0,
                        last: now,
                        waiting: false,
                    });
                    f.count = f.count.saturating_add(1);
                    f.last = now;
                }
                self.refused(
                    refusal.reason,
                    source,
                    Some(format!("{peer}: {}", refusal.message)),
                    now,
                )
            }
        }
    }

    /// A connection from `source` was refused for `reason` before any handshake (evicted,
    /// backing off). Returns a line to log, when one is due.
    pub fn refused(
        &mut self,
        reason: &'static str,
        source: Source,
        message: Option<String>,
        now: Instant,
    ) -> Option<String> {
        let t = &mut self.tally;
        *t.counts.entry(reason).or_default() += 1;
        *t.sources.entry(source).or_default() += 1;
        if let Some(m) = message {
            t.last = Some(m);
        }
        self.flush(now)
    }

    /// The summary line, if refusals are counted and the last line is old enough.
    pub fn flush(&mut self, now: Instant) -> Option<String> {
        let t = &mut self.tally;
        if t.counts.is_empty()
            || t.last_line
                .is_some_and(|l| now.duration_since(l) < LOG_EVERY)
        {
            return None;
        }
        let total: u64 = t.counts.values().sum();
        let reasons: Vec<String> = t
            .counts
            .iter()
            .map(|(reason, n)| format!("{reason} {n}"))
            .collect();
        let line = if total == 1 {
            format!(
                "refused a connection ({}){}",
                reasons.join(", "),
                t.last
                    .as_deref()
                    .map(|m| format!(": {m}"))
                    .unwrap_or_else(|| match t.sources.keys().next() {
                        Some(s) => format!(" from {s}"),
                        None => String::new(),
                    })
            )
        } else {
            let since = match t.last_line {
                Some(l) => format!(" in the last {:.0} s", now.duration_since(l).as_secs_f64()),
                None => String::new(),
            };
            let mut sources: Vec<(&Source, &u64)> = t.sources.iter().collect();
            sources.sort_by(|a, b| b.1.cmp(a.1));
            let top: Vec<String> = sources
                .iter()
                .take(3)
                .map(|(s, n)| format!("{s} {n}"))
                .collect();
            format!(
                "refused {total} connections{since} ({}) from {} source{} ({}{}){}",
                reasons.join(", "),
                sources.len(),
                if sources.len() == 1 { "" } else { "s" },
                top.join(", "),
                if sources.len() > 3 { ", …" } else { "" },
                t.last
                    .as_deref()
                    .map(|m| format!("; the last: {m}"))
                    .unwrap_or_default()
            )
        };
        t.counts.clear();
        t.sources.clear();
        t.last = None;
        t.last_line = Some(now);
        Some(line)
    }
}

/// Why a handshake failed, for [`Admission::done`].
#[derive(Debug)]
pub struct Refusal {
    /// A short fixed name.
    pub reason: &'static str,
    /// A token was tried and it was wrong.
    pub failed_auth: bool,
    /// The error, escaped for the log.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(last: u8) -> Source {
        Source::of(SocketAddr::from(([10, 0, 0, last], 1)))
    }

    fn peer(last: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, last], 1))
    }

    fn admit(a: &mut Admission, source: Source, now: Instant) -> (u64, Vec<u64>) {
        let Admitted { id, evict } = a.admit(source, now);
        (id, evict)
    }

    /// Admits and readies a connection: its id and what `ready` said.
    fn greet(a: &mut Admission, source: Source, now: Instant) -> (u64, Ready) {
        let (id, _) = admit(a, source, now);
        (id, a.ready(id, source, now))
    }

    fn bad_token() -> Refusal {
        Refusal {
            reason: "bad token",
            failed_auth: true,
            message: "authentication failed".into(),
        }
    }

    #[test]
    fn idle_connections_are_evicted_before_active_ones_and_per_source() {
        let t0 = Instant::now();
        let mut a = Admission::new(Limits {
            max_total: 4,
            max_per_source: 3,
        });
        let (first, ready) = greet(&mut a, src(1), t0);
        assert_eq!(ready, Ready::Go);
        let (second, _) = admit(&mut a, src(1), t0 + Duration::from_millis(1));
        let (_third, _) = admit(&mut a, src(1), t0 + Duration::from_millis(2));
        // A fourth from the same source evicts its idlest: the second (the first is active).
        let (_, evict) = admit(&mut a, src(1), t0 + Duration::from_millis(3));
        assert_eq!(evict, vec![second]);
        // Another source fills the total: the idlest overall goes.
        let (_, evict) = admit(&mut a, src(2), t0 + Duration::from_millis(4));
        assert!(evict.is_empty());
        let (_, evict) = admit(&mut a, src(3), t0 + Duration::from_millis(5));
        assert_eq!(evict.len(), 1);
        assert_ne!(evict[0], first, "the active connection stays");
        assert_eq!(a.pending(), 4);
        // A victim that had its greeting waiting comes back, as active.
        a.reinstate(evict[0], src(1), t0 + Duration::from_millis(5));
        assert_eq!(a.pending(), 5);
        let (_, evict) = admit(&mut a, src(4), t0 + Duration::from_millis(6));
        assert_eq!(evict.len(), 2, "back under the cap");
    }

    #[test]
    fn failed_authentication_backs_off_per_source_and_success_clears_it() {
        let t0 = Instant::now();
        let mut a = Admission::new(Limits::for_nofile(1024));
        let (id, ready) = greet(&mut a, src(1), t0);
        assert_eq!(ready, Ready::Go);
        a.done(id, src(1), peer(1), false, Err(bad_token()), t0);
        // The next one waits the back-off; a third meanwhile is refused at once.
        let (id, ready) = greet(&mut a, src(1), t0);
        assert_eq!(ready, Ready::Wait(BACKOFF_START));
        let (other, ready) = greet(&mut a, src(1), t0);
        assert_eq!(ready, Ready::BackingOff);
        let backing_off = Refusal {
            reason: "backing off",
            failed_auth: false,
            message: "backing off".into(),
        };
        a.done(other, src(1), peer(1), false, Err(backing_off), t0);
        // Other sources are not affected.
        assert_eq!(greet(&mut a, src(2), t0).1, Ready::Go);
        a.done(
            id,
            src(1),
            peer(1),
            true,
            Err(bad_token()),
            t0 + BACKOFF_START,
        );
        let (id, ready) = greet(&mut a, src(1), t0 + BACKOFF_START);
        assert_eq!(ready, Ready::Wait(BACKOFF_START * 2));
        // Many failures: capped.
        for _ in 0..20 {
            a.done(
                id,
                src(1),
                peer(1),
                true,
                Err(bad_token()),
                t0 + BACKOFF_START,
            );
        }
        let (id, ready) = greet(&mut a, src(1), t0 + BACKOFF_START);
        assert_eq!(ready, Ready::Wait(BACKOFF_MAX));
        // A success clears it.
        a.done(id, src(1), peer(1), true, Ok(()), t0 + BACKOFF_START);
        assert_eq!(greet(&mut a, src(1), t0 + BACKOFF_START).1, Ready::Go);
        // A timeout does not count.
        let (id, _) = greet(&mut a, src(3), t0);
        let timeout = Refusal {
            reason: "timeout",
            failed_auth: false,
            message: "timed out".into(),
        };
        a.done(id, src(3), peer(3), false, Err(timeout), t0);
        assert_eq!(greet(&mut a, src(3), t0).1, Ready::Go);
        // And failures are forgotten.
        let (id, _) = greet(&mut a, src(4), t0);
        a.done(id, src(4), peer(4), false, Err(bad_token()), t0);
        assert_eq!(greet(&mut a, src(4), t0 + BACKOFF_FORGET).1, Ready::Go);
    }

    #[test]
    fn refusals_are_logged_at_most_once_per_period_with_counts_by_reason() {
        let t0 = Instant::now();
        let mut a = Admission::new(Limits::for_nofile(1024));
        let mut lines = Vec::new();
        for i in 0..100u32 {
            let now = t0 + Duration::from_millis(u64::from(i) * 150);
            let (id, _) = admit(&mut a, src((i % 3) as u8), now);
            let refusal = if i % 10 == 0 {
                Refusal {
                    reason: "not dtf",
                    failed_auth: false,
                    message: "garbage".into(),
                }
            } else {
                bad_token()
            };
            lines.extend(a.done(
                id,
                src((i % 3) as u8),
                peer((i % 3) as u8),
                false,
                Err(refusal),
                now,
            ));
            lines.extend(a.flush(now));
        }
        lines.extend(a.flush(t0 + Duration::from_secs(60)));
        // 15 s of refusals: the first at once, one after 10 s, the rest at the end.
        assert_eq!(lines.len(), 3, "{lines:#?}");
        assert!(
            lines[0].starts_with("refused a connection (not dtf 1): 10.0.0.0:1: garbage"),
            "{}",
            lines[0]
        );
        assert!(
            lines[1].starts_with(
                "refused 67 connections in the last 10 s (bad token 61, not dtf 6) from 3 sources"
            ),
            "{}",
            lines[1]
        );
        let total: u64 = lines
            .iter()
            .map(|l| {
                l.split(['(', ')'])
                    .nth(1)
                    .unwrap()
                    .split(", ")
                    .map(|r| r.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
                    .sum::<u64>()
            })
            .sum();
        assert_eq!(total, 100);
    }

    #[test]
    fn ipv6_sources_are_their_slash_64() {
        let a: SocketAddr = "[2001:db8:1:2:3:4:5:6]:1".parse().unwrap();
        let b: SocketAddr = "[2001:db8:1:2:ffff::1]:2".parse().unwrap();
        assert_eq!(Source::of(a), Source::of(b));
        assert_eq!(Source::of(a).to_string(), "2001:db8:1:2::/64");
        let mapped: SocketAddr = "[::ffff:10.0.0.1]:1".parse().unwrap();
        assert_eq!(Source::of(mapped), src(1));
    }
}
