//! The overlay network: an IPv4 CIDR from which sites and gateways get their addresses.

use std::collections::HashSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// An IPv4 network such as `100.64.0.0/10`, with its host bits zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverlayNet {
    network: Ipv4Addr,
    prefix_len: u8,
}

/// A string was not a usable overlay CIDR.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?}: {reason}")]
pub struct BadCidr {
    input: String,
    reason: &'static str,
}

impl OverlayNet {
    /// The default overlay, the CGNAT range `100.64.0.0/10`.
    pub const DEFAULT: OverlayNet = OverlayNet {
        network: Ipv4Addr::new(100, 64, 0, 0),
        prefix_len: 10,
    };

    /// The prefix length (10 for `100.64.0.0/10`).
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    fn host_range(&self) -> (u32, u32) {
        let net = u32::from(self.network);
        let size = 1u64 << (32 - u32::from(self.prefix_len));
        let last = (u64::from(net) + size - 1) as u32;
        // Skip the network and broadcast addresses.
        (net + 1, last - 1)
    }

    /// The lowest host address not in `used`, or `None` if the network is full.
    pub fn lowest_free(&self, used: &HashSet<Ipv4Addr>) -> Option<Ipv4Addr> {
        let (first, last) = self.host_range();
        (first..=last)
            .map(Ipv4Addr::from)
            .find(|a| !used.contains(a))
    }
}

impl fmt::Display for OverlayNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix_len)
    }
}

impl FromStr for OverlayNet {
    type Err = BadCidr;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason| BadCidr {
            input: s.to_owned(),
            reason,
        };
        let (addr, len) = s
            .trim()
            .split_once('/')
            .ok_or_else(|| bad("expected ADDRESS/PREFIX, e.g. 100.64.0.0/10"))?;
        let network: Ipv4Addr = addr.parse().map_err(|_| bad("not an IPv4 address"))?;
        let prefix_len: u8 = len.parse().map_err(|_| bad("prefix is not a number"))?;
        if !(8..=30).contains(&prefix_len) {
            return Err(bad("prefix length must be between 8 and 30"));
        }
        let mask = u32::MAX << (32 - u32::from(prefix_len));
        if u32::from(network) & !mask != 0 {
            return Err(bad("host bits are set (use the network address)"));
        }
        Ok(Self {
            network,
            prefix_len,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_allocates_lowest_free() {
        let net: OverlayNet = "100.64.0.0/10".parse().unwrap();
        assert_eq!(net, OverlayNet::DEFAULT);
        let mut used = HashSet::new();
        assert_eq!(net.lowest_free(&used), Some(Ipv4Addr::new(100, 64, 0, 1)));
        used.insert(Ipv4Addr::new(100, 64, 0, 1));
        used.insert(Ipv4Addr::new(100, 64, 0, 3));
        assert_eq!(net.lowest_free(&used), Some(Ipv4Addr::new(100, 64, 0, 2)));
    }

    #[test]
    fn small_network_fills_up() {
        let net: OverlayNet = "10.0.0.0/30".parse().unwrap();
        let mut used = HashSet::new();
        used.insert(Ipv4Addr::new(10, 0, 0, 1));
        used.insert(Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(net.lowest_free(&used), None);
    }

    #[test]
    fn rejects_bad_cidrs() {
        for s in [
            "100.64.0.1/10",
            "100.64.0.0",
            "100.64.0.0/31",
            "x/10",
            "100.64.0.0/x",
        ] {
            assert!(s.parse::<OverlayNet>().is_err(), "{s}");
        }
    }
}
