//! Watching whether UDP reaches each peer, for the fallback over a relay (a WebSocket on the
//! gateway's HTTPS port) when it does not.
//!
//! A sans-IO state machine, like the core: the driver tells it every datagram it sends or
//! receives over UDP, with `now`, and asks it where each outgoing datagram goes. It never reads
//! the clock.
//!
//! - A destination that has been sent to over UDP for [`PathSettings::blocked_after`] with
//!   nothing received from it is *blocked*: [`PathEvent::Blocked`] (again every `blocked_after`
//!   while no relay is attached, so a failed relay attempt is retried).
//! - While a relay is attached, datagrams go over it, except one WireGuard data packet per
//!   [`PathSettings::probe_every`], which goes over UDP as a probe. A WireGuard data packet that
//!   arrives over UDP makes the peer move its endpoint back to UDP (it roams to the source of
//!   any authenticated packet) and answer there; handshake messages are never used as probes,
//!   since losing one costs a 5 s retry.
//! - Anything received over UDP from a relayed destination is [`PathEvent::Restored`]: the
//!   driver detaches the relay and UDP carries everything again.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Timers of the path watch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PathSettings {
    /// Sending over UDP this long without receiving anything means UDP is blocked. WireGuard
    /// and QUIC keepalives make a healthy path answer within a second.
    pub blocked_after: Duration,
    /// While relayed, one data packet this often is sent over UDP instead, to find out whether
    /// UDP works again.
    pub probe_every: Duration,
}

impl Default for PathSettings {
    fn default() -> Self {
        PathSettings {
            blocked_after: Duration::from_secs(3),
            probe_every: Duration::from_secs(5),
        }
    }
}

/// What the watch reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathEvent {
    /// UDP to this destination gets no answer: carry its datagrams over a relay.
    Blocked(SocketAddr),
    /// UDP from this relayed destination arrived: its relay was detached, UDP carries it again.
    Restored(SocketAddr),
}

/// Where one outgoing datagram goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// The UDP socket.
    Udp,
    /// The destination's relay.
    Relay,
}

#[derive(Debug, Default)]
struct Path {
    /// The first UDP send since something was last received over UDP.
    unanswered_since: Option<Instant>,
    /// When `Blocked` was last reported (none since the last UDP receive).
    reported: Option<Instant>,
    /// Relayed: when the next probe may go over UDP.
    relayed: Option<Instant>,
}

/// The path watch of one tunnel (see the module docs).
#[derive(Debug)]
pub struct PathWatch {
    settings: PathSettings,
    paths: HashMap<SocketAddr, Path>,
    events: VecDeque<PathEvent>,
}

/// WireGuard's transport data message type.
const WG_DATA: u8 = 4;

impl PathWatch {
    /// A watch with nothing sent yet.
    pub fn new(settings: PathSettings) -> PathWatch {
        PathWatch {
            settings,
            paths: HashMap::new(),
            events: VecDeque::new(),
        }
    }

    /// Whether any destination is relayed (the driver skips the per-datagram lookup otherwise).
    pub fn any_relayed(&self) -> bool {
        self.paths.values().any(|p| p.relayed.is_some())
    }

    /// Where `datagram`, about to be sent to `dst`, goes; records a UDP send.
    pub fn route(&mut self, dst: SocketAddr, datagram: &[u8], now: Instant) -> Via {
        let path = self.paths.entry(dst).or_default();
        if let Some(next_probe) = path.relayed {
            if now < next_probe || datagram.first() != Some(&WG_DATA) {
                return Via::Relay;
            }
            path.relayed = Some(now + self.settings.probe_every);
            tracing::trace!(%dst, "probing UDP");
            return Via::Udp;
        }
        path.unanswered_since.get_or_insert(now);
        Via::Udp
    }

    /// A datagram arrived over UDP from `from`.
    pub fn handle_udp_received(&mut self, from: SocketAddr, _now: Instant) {
        let Some(path) = self.paths.get_mut(&from) else {
            return;
        };
        path.unanswered_since = None;
        path.reported = None;
        if path.relayed.take().is_some() {
            self.events.push_back(PathEvent::Restored(from));
        }
    }

    /// A relay now carries `dst`'s datagrams; the first probe goes after `probe_every`.
    pub fn handle_relay_attached(&mut self, dst: SocketAddr, now: Instant) {
        let path = self.paths.entry(dst).or_default();
        path.relayed = Some(now + self.settings.probe_every);
    }

    /// `dst`'s relay ended (its stream closed): UDP again, blocked again if still unanswered.
    pub fn handle_relay_detached(&mut self, dst: SocketAddr, now: Instant) {
        if let Some(path) = self.paths.get_mut(&dst) {
            if path.relayed.take().is_some() {
                path.unanswered_since = Some(now);
                path.reported = None;
            }
        }
    }

    /// Forgets destinations no longer in use (the peer set changed).
    pub fn retain(&mut self, keep: impl Fn(SocketAddr) -> bool) {
        self.paths.retain(|dst, _| keep(*dst));
    }

    /// Reports destinations that became blocked.
    pub fn handle_timeout(&mut self, now: Instant) {
        let after = self.settings.blocked_after;
        for (dst, path) in &mut self.paths {
            if path.relayed.is_some() {
                continue;
            }
            let Some(since) = path.unanswered_since else {
                continue;
            };
            let due = path.reported.map_or(since + after, |at| at + after);
            if now >= due {
                path.reported = Some(now);
                self.events.push_back(PathEvent::Blocked(*dst));
            }
        }
    }

    /// When [`PathWatch::handle_timeout`] next has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let after = self.settings.blocked_after;
        self.paths
            .values()
            .filter(|p| p.relayed.is_none())
            .filter_map(|p| {
                let since = p.unanswered_since?;
                Some(p.reported.map_or(since + after, |at| at + after))
            })
            .min()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<PathEvent> {
        self.events.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DATA: &[u8] = &[4, 0, 0, 0];
    const INIT: &[u8] = &[1, 0, 0, 0];

    fn gw() -> SocketAddr {
        "192.0.2.1:51820".parse().unwrap()
    }

    fn watch() -> PathWatch {
        PathWatch::new(PathSettings {
            blocked_after: Duration::from_secs(3),
            probe_every: Duration::from_secs(5),
        })
    }

    /// Sends every 500 ms from `from` to `to` (exclusive), firing timers as the driver does.
    fn send_until(w: &mut PathWatch, t0: Instant, from: u64, to: u64) -> Vec<(u64, PathEvent)> {
        let mut out = Vec::new();
        let mut ms = from;
        while ms < to {
            let now = t0 + Duration::from_millis(ms);
            if w.poll_timeout().is_some_and(|t| t <= now) {
                w.handle_timeout(now);
            }
            while let Some(e) = w.poll_event() {
                out.push((ms, e));
            }
            w.route(gw(), DATA, now);
            ms += 500;
        }
        out
    }

    #[test]
    fn answered_udp_is_never_blocked() {
        let t0 = Instant::now();
        let mut w = watch();
        for s in 0..60 {
            let now = t0 + Duration::from_secs(s);
            assert_eq!(w.route(gw(), DATA, now), Via::Udp);
            w.handle_udp_received(gw(), now + Duration::from_millis(20));
            if w.poll_timeout().is_some_and(|t| t <= now) {
                w.handle_timeout(now);
            }
            assert_eq!(w.poll_event(), None);
        }
    }

    #[test]
    fn unanswered_udp_is_blocked_after_the_delay_and_again_while_no_relay_comes() {
        let t0 = Instant::now();
        let mut w = watch();
        let events = send_until(&mut w, t0, 0, 10_000);
        assert_eq!(
            events,
            vec![
                (3000, PathEvent::Blocked(gw())),
                (6000, PathEvent::Blocked(gw())),
                (9000, PathEvent::Blocked(gw())),
            ]
        );
    }

    #[test]
    fn relayed_datagrams_take_the_relay_but_one_data_packet_per_interval_probes_udp() {
        let t0 = Instant::now();
        let mut w = watch();
        send_until(&mut w, t0, 0, 3500);
        w.handle_relay_attached(gw(), t0 + Duration::from_millis(3500));
        assert!(w.any_relayed());
        let mut udp = Vec::new();
        for ms in (3500..20_000).step_by(100) {
            let now = t0 + Duration::from_millis(ms);
            // A handshake initiation never probes, even when a probe is due.
            assert_eq!(w.route(gw(), INIT, now), Via::Relay);
            if w.route(gw(), DATA, now) == Via::Udp {
                udp.push(ms);
            }
        }
        assert_eq!(udp, vec![8500, 13_500, 18_500]);
        // No `Blocked` while relayed.
        w.handle_timeout(t0 + Duration::from_secs(30));
        assert_eq!(w.poll_event(), None);
    }

    #[test]
    fn udp_received_while_relayed_restores_the_path() {
        let t0 = Instant::now();
        let mut w = watch();
        send_until(&mut w, t0, 0, 3500);
        w.handle_relay_attached(gw(), t0 + Duration::from_secs(4));
        w.handle_udp_received(gw(), t0 + Duration::from_secs(9));
        assert_eq!(w.poll_event(), Some(PathEvent::Restored(gw())));
        assert!(!w.any_relayed());
        assert_eq!(
            w.route(gw(), INIT, t0 + Duration::from_secs(9)),
            Via::Udp,
            "everything over UDP again"
        );
        // Blocked again if UDP stops answering.
        let events = send_until(&mut w, t0, 9500, 13_000);
        assert_eq!(events, vec![(12_000, PathEvent::Blocked(gw()))]);
    }

    #[test]
    fn a_relay_that_ends_while_udp_is_still_blocked_is_reported_again() {
        let t0 = Instant::now();
        let mut w = watch();
        send_until(&mut w, t0, 0, 3500);
        w.handle_relay_attached(gw(), t0 + Duration::from_secs(4));
        w.handle_relay_detached(gw(), t0 + Duration::from_secs(10));
        let events = send_until(&mut w, t0, 10_000, 14_000);
        assert_eq!(events, vec![(13_000, PathEvent::Blocked(gw()))]);
    }

    #[test]
    fn udp_from_unknown_sources_is_ignored() {
        let t0 = Instant::now();
        let mut w = watch();
        w.handle_udp_received("198.51.100.7:9".parse().unwrap(), t0);
        assert!(w.paths.is_empty());
        assert_eq!(w.poll_timeout(), None);
    }
}
