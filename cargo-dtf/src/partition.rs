//! `--partition count:M/N`, `hash:M/N` and `history:M/N`: which share of the selected tests
//! this run takes, for CI matrices without workers. Every test lands in exactly one of the N
//! shares.

use dtf::history::History;

/// How tests are split.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Split {
    /// The i-th test (by binary and name) goes to share i mod N.
    Count,
    /// A stable hash of the test's name picks its share (a new test moves nothing else).
    Hash,
    /// Longest first into the share with the least recorded time so far.
    History,
}

/// A partition: share `m` (1-based) of `n`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Partition {
    split: Split,
    m: usize,
    n: usize,
}

impl Partition {
    /// Parses `count:M/N`, `hash:M/N` or `history:M/N`.
    pub fn parse(value: &str) -> Result<Partition, String> {
        let bad = |why: &str| {
            format!(
                "invalid --partition `{value}`: {why} (expected count:M/N, hash:M/N or history:M/N with 1 <= M <= N)"
            )
        };
        let (kind, share) = value.split_once(':').ok_or_else(|| bad("no kind"))?;
        let split = match kind {
            "count" => Split::Count,
            "hash" => Split::Hash,
            "history" => Split::History,
            _ => return Err(bad(&format!("unknown kind `{kind}`"))),
        };
        let (m, n) = share.split_once('/').ok_or_else(|| bad("no M/N"))?;
        let m: usize = m.trim().parse().map_err(|_| bad("M is not a number"))?;
        let n: usize = n.trim().parse().map_err(|_| bad("N is not a number"))?;
        if n == 0 || m == 0 || m > n {
            return Err(bad("M out of range"));
        }
        Ok(Partition { split, m, n })
    }

    /// True when the split reads recorded durations.
    pub fn needs_history(&self) -> bool {
        self.split == Split::History
    }

    /// Which of `names` (in listing order) this share keeps.
    pub fn select(&self, names: &[String], history: &History) -> Vec<bool> {
        let share = self.m - 1;
        match self.split {
            Split::Count => {
                let mut order: Vec<usize> = (0..names.len()).collect();
                order.sort_by(|&a, &b| names[a].cmp(&names[b]));
                let mut keep = vec![false; names.len()];
                for (rank, i) in order.into_iter().enumerate() {
                    keep[i] = rank % self.n == share;
                }
                keep
            }
            Split::Hash => names
                .iter()
                .map(|name| (fnv1a(name) % self.n as u64) as usize == share)
                .collect(),
            Split::History => {
                // Tests never seen count as the median of those seen (or 1 s).
                let mut known: Vec<f64> = names
                    .iter()
                    .filter_map(|n| history.get(n).map(|r| r.mean_secs))
                    .collect();
                known.sort_by(f64::total_cmp);
                let default = known.get(known.len() / 2).copied().unwrap_or(1.0);
                let cost = |n: &String| history.get(n).map_or(default, |r| r.mean_secs);
                let mut order: Vec<usize> = (0..names.len()).collect();
                order.sort_by(|&a, &b| {
                    cost(&names[b])
                        .total_cmp(&cost(&names[a]))
                        .then_with(|| names[a].cmp(&names[b]))
                });
                let mut load = vec![0.0f64; self.n];
                let mut keep = vec![false; names.len()];
                for i in order {
                    let (bin, _) = load
                        .iter()
                        .enumerate()
                        .min_by(|a, b| a.1.total_cmp(b.1).then(a.0.cmp(&b.0)))
                        .unwrap_or((0, &0.0));
                    load[bin] += cost(&names[i]).max(1e-6);
                    keep[i] = bin == share;
                }
                keep
            }
        }
    }
}

/// 64-bit FNV-1a: a stable, well-spread hash of a test's name (not for security).
fn fnv1a(text: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_test_lands_in_exactly_one_share() {
        let names: Vec<String> = (0..57).map(|i| format!("pkg::t test_{i}")).collect();
        for kind in ["count", "hash", "history"] {
            let mut seen = vec![0; names.len()];
            for m in 1..=4 {
                let p = Partition::parse(&format!("{kind}:{m}/4")).unwrap();
                for (i, keep) in p.select(&names, &History::new()).into_iter().enumerate() {
                    seen[i] += usize::from(keep);
                }
            }
            assert!(seen.iter().all(|&n| n == 1), "{kind}: {seen:?}");
        }
        for bad in ["count:0/2", "count:3/2", "slice:1/2", "hash:1", "hash:a/2"] {
            assert!(Partition::parse(bad).is_err(), "{bad}");
        }
    }
}
