//! Jittered exponential backoff, sans-IO: it computes delays and never sleeps or reads the clock.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Exponential backoff with "equal jitter": the n-th delay is uniform in `[d/2, d]` where
/// `d = min(max, base * 2^n)`. The random source is seeded by the caller, so tests are
/// deterministic.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
    rng: StdRng,
}

impl Backoff {
    /// A backoff starting at `base`, capped at `max`, with jitter drawn from `seed`.
    pub fn new(base: Duration, max: Duration, seed: u64) -> Self {
        Self {
            base,
            max: max.max(base),
            attempt: 0,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// The delay to wait before the next attempt; each call grows the ceiling until `max`.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let ceiling_nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        let low = ceiling_nanos / 2;
        Duration::from_nanos(self.rng.gen_range(low..=ceiling_nanos))
    }

    /// Starts over from `base`, after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// How many delays were handed out since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn delays_grow_within_jitter_bounds_and_cap() {
        let mut b = Backoff::new(100 * MS, 2000 * MS, 7);
        let ceilings = [100, 200, 400, 800, 1600, 2000, 2000, 2000];
        for c in ceilings {
            let d = b.next_delay();
            assert!(
                d >= c * MS / 2 && d <= c * MS,
                "{d:?} outside [{}/2, {c}] ms",
                c
            );
        }
        // Far along, still capped and never overflowing.
        for _ in 0..100 {
            assert!(b.next_delay() <= 2000 * MS);
        }
    }

    #[test]
    fn same_seed_same_delays() {
        let mut a = Backoff::new(100 * MS, 2000 * MS, 42);
        let mut b = Backoff::new(100 * MS, 2000 * MS, 42);
        let da: Vec<_> = (0..10).map(|_| a.next_delay()).collect();
        let db: Vec<_> = (0..10).map(|_| b.next_delay()).collect();
        assert_eq!(da, db);
        let mut c = Backoff::new(100 * MS, 2000 * MS, 43);
        let dc: Vec<_> = (0..10).map(|_| c.next_delay()).collect();
        assert_ne!(da, dc, "jitter depends on the seed");
    }

    #[test]
    fn reset_starts_over() {
        let mut b = Backoff::new(100 * MS, 2000 * MS, 1);
        for _ in 0..6 {
            b.next_delay();
        }
        assert_eq!(b.attempts(), 6);
        b.reset();
        assert_eq!(b.attempts(), 0);
        assert!(b.next_delay() <= 100 * MS);
    }

    #[test]
    fn max_below_base_is_base() {
        let mut b = Backoff::new(500 * MS, 10 * MS, 1);
        assert!(b.next_delay() <= 500 * MS);
    }
}
