//! Which control replica the control channel tries next, and how long it waits first; sans-IO: it
//! never sleeps, reads the clock or draws from a global random source (the caller seeds it).
//!
//! A node may know several control URLs (replicas without a load balancer in front). It starts at
//! a random one, so that nodes spread over the replicas, and stays there while the sessions last.
//! When a session fails or is lost, or control is busy, it moves to the next URL in the list. While
//! the list still holds URLs that have not failed in this outage, the wait is short and jittered
//! (up to the backoff base): the nodes of a replica that died land on another one well within a
//! second, but not all in the same millisecond. Once every URL failed in a row, the waits are
//! [`Backoff`]'s growing ones, still rotating through the list. A welcome ends the outage. With a
//! single URL this is exactly [`Backoff`].

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::backoff::Backoff;

/// The rotation over control URLs and the delay before each next attempt.
#[derive(Debug, Clone)]
pub struct Failover {
    count: usize,
    current: usize,
    /// Sessions that failed in a row since the last welcome (or the start).
    failures_in_row: usize,
    quick_max: Duration,
    backoff: Backoff,
    rng: StdRng,
}

impl Failover {
    /// A rotation over `count` URLs (at least one), starting at an index drawn from `seed`. A move
    /// to a URL not yet tried in this outage waits up to `base`; after a full round, the waits are
    /// those of `Backoff::new(base, max, _)`.
    pub fn new(count: usize, base: Duration, max: Duration, seed: u64) -> Self {
        let count = count.max(1);
        let mut rng = StdRng::seed_from_u64(seed);
        let current = rng.gen_range(0..count);
        let backoff = Backoff::new(base, max, rng.gen());
        Self {
            count,
            current,
            failures_in_row: 0,
            quick_max: base,
            backoff,
            rng,
        }
    }

    /// The index of the URL to try now.
    pub fn current(&self) -> usize {
        self.current
    }

    /// Control welcomed the node: the outage (if any) is over, the next one starts with short
    /// waits again.
    pub fn welcomed(&mut self) {
        self.failures_in_row = 0;
        self.backoff.reset();
    }

    /// The session at [`Failover::current`] could not start or was lost: moves to the next URL and
    /// returns how long to wait before trying it.
    pub fn failed(&mut self) -> Duration {
        if self.advance() {
            self.quick_delay()
        } else {
            self.backoff.next_delay()
        }
    }

    /// Control at [`Failover::current`] is busy and asked to come back after `after`: moves to the
    /// next URL and returns how long to wait; when every URL failed in a row, that is `after` and
    /// up to half again (so that a refused crowd does not come back at once).
    pub fn busy(&mut self, after: Duration) -> Duration {
        if self.advance() {
            self.quick_delay()
        } else {
            let half = u64::try_from(after.as_nanos() / 2).unwrap_or(u64::MAX);
            after.saturating_add(Duration::from_nanos(self.rng.gen_range(0..=half)))
        }
    }

    /// Moves on; whether the new URL is one that has not failed in this outage.
    fn advance(&mut self) -> bool {
        self.failures_in_row = self.failures_in_row.saturating_add(1);
        self.current = (self.current + 1) % self.count;
        self.failures_in_row < self.count
    }

    fn quick_delay(&mut self) -> Duration {
        let max = u64::try_from(self.quick_max.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(self.rng.gen_range(0..=max))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn failover(count: usize, seed: u64) -> Failover {
        Failover::new(count, 100 * MS, 2000 * MS, seed)
    }

    /// Asserts `d` is a backoff delay with this ceiling (in ms): within `[c/2, c]`.
    #[track_caller]
    fn assert_backoff(d: Duration, ceiling_ms: u32) {
        assert!(
            d >= ceiling_ms * MS / 2 && d <= ceiling_ms * MS,
            "{d:?} outside [{ceiling_ms}/2, {ceiling_ms}] ms"
        );
    }

    #[test]
    fn the_starting_url_is_spread_by_the_seed() {
        let mut seen = [0usize; 3];
        for seed in 0..300 {
            seen[failover(3, seed).current()] += 1;
        }
        for (i, n) in seen.iter().enumerate() {
            assert!((50..=150).contains(n), "index {i} chosen {n} times of 300");
        }
        assert_eq!(failover(3, 7).current(), failover(3, 7).current());
        // Nothing to choose from: index 0, even for a count of 0.
        assert_eq!(failover(1, 7).current(), 0);
        assert_eq!(failover(0, 7).current(), 0);
    }

    #[test]
    fn failures_rotate_through_the_list() {
        let mut f = failover(3, 1);
        let start = f.current();
        let mut order = vec![start];
        for _ in 0..6 {
            f.failed();
            order.push(f.current());
        }
        let expected: Vec<usize> = (0..7).map(|i| (start + i) % 3).collect();
        assert_eq!(order, expected);
        // Busy moves on too.
        let before = f.current();
        f.busy(Duration::from_secs(1));
        assert_eq!(f.current(), (before + 1) % 3);
    }

    #[test]
    fn short_jittered_waits_while_untried_urls_remain_then_backoff() {
        let mut quick = Vec::new();
        for seed in 0..50 {
            let mut f = failover(3, seed);
            // The first two failures move to URLs not tried yet: at most the base.
            for _ in 0..2 {
                let d = f.failed();
                assert!(d <= 100 * MS, "{d:?}");
                quick.push(d);
            }
            // Every URL failed in a row: the backoff, growing, still rotating.
            for ceiling in [100, 200, 400, 800, 1600, 2000, 2000] {
                assert_backoff(f.failed(), ceiling);
            }
        }
        // Jittered over the whole range, not all at once.
        assert!(quick.iter().any(|d| *d < 30 * MS), "{quick:?}");
        assert!(quick.iter().any(|d| *d > 70 * MS), "{quick:?}");
        quick.sort();
        quick.dedup();
        assert!(quick.len() > 90, "{} distinct delays", quick.len());
    }

    #[test]
    fn busy_waits_short_while_untried_urls_remain_then_as_asked() {
        let after = Duration::from_secs(2);
        let mut f = failover(2, 3);
        assert!(f.busy(after) <= 100 * MS);
        for _ in 0..10 {
            let d = f.busy(after);
            assert!(d >= after && d <= after * 3 / 2, "{d:?}");
        }
        // Busy does not grow the backoff.
        assert_backoff(f.failed(), 100);
    }

    #[test]
    fn a_welcome_starts_the_next_outage_with_short_waits() {
        let mut f = failover(3, 9);
        for _ in 0..6 {
            f.failed();
        }
        f.welcomed();
        let at = f.current();
        // The replica in use dies: the next two are tried quickly, then the backoff from its
        // base again.
        assert!(f.failed() <= 100 * MS);
        assert_eq!(f.current(), (at + 1) % 3);
        assert!(f.failed() <= 100 * MS);
        assert_backoff(f.failed(), 100);
        assert_backoff(f.failed(), 200);
        // A welcome after only part of a round resets it too.
        f.welcomed();
        assert!(f.failed() <= 100 * MS);
        f.welcomed();
        assert!(f.failed() <= 100 * MS);
        assert!(f.failed() <= 100 * MS);
        assert_backoff(f.failed(), 100);
    }

    #[test]
    fn a_single_url_backs_off_as_before() {
        let mut f = failover(1, 5);
        for ceiling in [100, 200, 400, 800, 1600, 2000, 2000] {
            assert_backoff(f.failed(), ceiling);
            assert_eq!(f.current(), 0);
        }
        f.welcomed();
        assert_backoff(f.failed(), 100);
        assert_backoff(f.failed(), 200);
        let after = Duration::from_secs(1);
        let d = f.busy(after);
        assert!(d >= after && d <= after * 3 / 2, "{d:?}");
        assert_eq!(f.current(), 0);
    }

    #[test]
    fn same_seed_same_choices() {
        let run = |seed| {
            let mut f = failover(4, seed);
            let mut out = vec![(f.current(), Duration::ZERO)];
            for i in 0..10 {
                if i == 5 {
                    f.welcomed();
                }
                let d = f.failed();
                out.push((f.current(), d));
            }
            out
        };
        assert_eq!(run(11), run(11));
        assert_ne!(run(11), run(12));
    }
}
