//! Request rates per resource for the admin console: gateways report what each resource
//! answered since their last status report; this keeps the sums per minute for the last
//! [`MINUTES`] minutes, in memory (a restart starts the graphs again; each replica counts the
//! gateways connected to it). A plain state machine: time comes in as an argument.

use std::collections::HashMap;
use std::sync::Mutex;

use kakuremichi_proto::ResourceTraffic;
use uuid::Uuid;

/// Minutes kept.
pub const MINUTES: usize = 30;

/// Resources followed at most (each costs about half a kilobyte); the quietest go first.
pub const MAX_RESOURCES: usize = 20_000;

const MINUTE_MS: i64 = 60_000;

#[derive(Debug, Clone, Default)]
struct Ring {
    /// The minute (unix ms / 60 000) of the newest slot.
    newest: i64,
    /// Requests and 5xx per minute; slot `newest % MINUTES` is the newest.
    requests: [u64; MINUTES],
    errors: [u64; MINUTES],
}

impl Ring {
    /// Moves the newest slot to `minute`, clearing the slots passed over.
    fn advance(&mut self, minute: i64) {
        if minute <= self.newest {
            return;
        }
        let steps = usize::try_from(minute - self.newest)
            .unwrap_or(MINUTES)
            .min(MINUTES);
        for k in 1..=steps {
            let slot = slot(self.newest + k as i64);
            self.requests[slot] = 0;
            self.errors[slot] = 0;
        }
        self.newest = minute;
    }

    fn total(&self) -> u64 {
        self.requests.iter().sum()
    }
}

fn slot(minute: i64) -> usize {
    usize::try_from(minute.rem_euclid(MINUTES as i64)).unwrap_or(0)
}

/// One resource's last [`MINUTES`] minutes, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Series {
    /// Requests per minute.
    pub requests: Vec<u64>,
    /// 5xx answers per minute.
    pub errors: Vec<u64>,
}

impl Series {
    fn empty() -> Series {
        Series {
            requests: vec![0; MINUTES],
            errors: vec![0; MINUTES],
        }
    }
}

/// Every resource's rings.
#[derive(Debug, Default)]
pub struct Traffic {
    rings: Mutex<HashMap<Uuid, Ring>>,
}

impl Traffic {
    /// Adds a gateway's report, received at `now_ms`.
    pub fn record(&self, report: &[ResourceTraffic], now_ms: i64) {
        if report.is_empty() {
            return;
        }
        let minute = now_ms.div_euclid(MINUTE_MS);
        let mut rings = self.rings.lock().unwrap_or_else(|e| e.into_inner());
        for t in report {
            if !rings.contains_key(&t.resource_id) && rings.len() >= MAX_RESOURCES {
                Self::forget_quietest(&mut rings, minute);
            }
            let ring = rings.entry(t.resource_id).or_insert_with(|| Ring {
                newest: minute,
                ..Ring::default()
            });
            ring.advance(minute);
            let s = slot(minute);
            ring.requests[s] = ring.requests[s].saturating_add(t.requests);
            ring.errors[s] = ring.errors[s].saturating_add(t.errors);
        }
    }

    fn forget_quietest(rings: &mut HashMap<Uuid, Ring>, minute: i64) {
        for r in rings.values_mut() {
            r.advance(minute);
        }
        rings.retain(|_, r| r.total() > 0);
        if rings.len() >= MAX_RESOURCES {
            if let Some(id) = rings
                .iter()
                .min_by_key(|(id, r)| (r.total(), **id))
                .map(|(id, _)| *id)
            {
                rings.remove(&id);
            }
        }
    }

    /// The last [`MINUTES`] minutes of `id` as of `now_ms`, oldest first (the current minute
    /// last); zeros for a resource nothing was heard of.
    pub fn series(&self, id: Uuid, now_ms: i64) -> Series {
        let minute = now_ms.div_euclid(MINUTE_MS);
        let rings = self.rings.lock().unwrap_or_else(|e| e.into_inner());
        let Some(ring) = rings.get(&id) else {
            return Series::empty();
        };
        let mut out = Series::empty();
        for (i, m) in (minute - MINUTES as i64 + 1..=minute).enumerate() {
            if m <= ring.newest && m > ring.newest - MINUTES as i64 {
                out.requests[i] = ring.requests[slot(m)];
                out.errors[i] = ring.errors[slot(m)];
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(id: u128, requests: u64, errors: u64) -> ResourceTraffic {
        ResourceTraffic {
            resource_id: Uuid::from_u128(id),
            requests,
            errors,
        }
    }

    const T0: i64 = 1_800_000_000_000; // a whole minute

    #[test]
    fn reports_add_up_per_minute_and_fall_off_after_thirty_minutes() {
        let tr = Traffic::default();
        let a = Uuid::from_u128(1);
        tr.record(&[t(1, 5, 1)], T0);
        tr.record(&[t(1, 3, 0), t(2, 7, 0)], T0 + 30_000);
        tr.record(&[t(1, 2, 2)], T0 + 60_000);
        let s = tr.series(a, T0 + 60_000);
        assert_eq!(s.requests[MINUTES - 2..], [8, 2]);
        assert_eq!(s.errors[MINUTES - 2..], [1, 2]);
        assert_eq!(s.requests[..MINUTES - 2].iter().sum::<u64>(), 0);
        // Asked later, without new reports: the same minutes, moved left.
        let later = tr.series(a, T0 + 5 * 60_000);
        assert_eq!(later.requests[MINUTES - 6..MINUTES - 4], [8, 2]);
        // After thirty minutes, gone.
        assert_eq!(tr.series(a, T0 + 31 * 60_000).requests, vec![0; MINUTES]);
        // A report after a long quiet clears the old slots.
        tr.record(&[t(1, 1, 0)], T0 + 45 * 60_000);
        let s = tr.series(a, T0 + 45 * 60_000);
        assert_eq!(s.requests.iter().sum::<u64>(), 1);
        // Unknown: zeros.
        assert_eq!(tr.series(Uuid::from_u128(9), T0).requests, vec![0; MINUTES]);
    }

    #[test]
    fn at_most_max_resources_are_followed_and_the_quietest_go_first() {
        let tr = Traffic::default();
        let busy = t(u128::MAX, 1000, 0);
        tr.record(&[busy], T0);
        for i in 0..MAX_RESOURCES as u128 + 10 {
            tr.record(&[t(i, 1, 0)], T0);
        }
        let n = tr.rings.lock().unwrap().len();
        assert!(n <= MAX_RESOURCES, "{n}");
        assert_eq!(
            tr.series(Uuid::from_u128(u128::MAX), T0).requests[MINUTES - 1],
            1000
        );
    }
}
