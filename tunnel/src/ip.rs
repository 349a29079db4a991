//! The inner packets the tunnel carries: IPv4 with UDP between two overlay addresses, holding
//! one QUIC datagram each. Only what QUIC-in-WireGuard needs: no options, no fragments.
//!
//! Must never panic on what a peer sends: every length is checked before it is used.

use std::net::Ipv4Addr;

/// Length of the IPv4 header (no options) plus the UDP header.
pub const HEADER_LEN: usize = IPV4_HEADER_LEN + UDP_HEADER_LEN;
const IPV4_HEADER_LEN: usize = 20;
const UDP_HEADER_LEN: usize = 8;
const PROTOCOL_UDP: u8 = 17;
const TTL: u8 = 64;
/// Don't Fragment, no offset.
const FLAGS_DF: u16 = 0x4000;

/// An inner UDP packet's addresses and where its payload starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpPacket {
    /// Source overlay address.
    pub src: Ipv4Addr,
    /// Destination overlay address.
    pub dst: Ipv4Addr,
    /// Source UDP port.
    pub src_port: u16,
    /// Destination UDP port.
    pub dst_port: u16,
    /// Offset of the UDP payload in the packet.
    pub payload_start: usize,
    /// Offset just past the UDP payload (IPv4 total length may be less than what was received).
    pub payload_end: usize,
}

/// Parses an IPv4/UDP packet; `None` for anything else (other protocols, fragments, bad
/// lengths). Checksums are not verified: WireGuard already authenticated every byte.
pub fn parse_udp(packet: &[u8]) -> Option<UdpPacket> {
    let header = packet.get(..IPV4_HEADER_LEN)?;
    if header[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(header[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([header[2], header[3]]));
    let fragment = u16::from_be_bytes([header[6], header[7]]) & 0x3fff;
    if ihl < IPV4_HEADER_LEN || total > packet.len() || total < ihl + UDP_HEADER_LEN {
        return None;
    }
    if header[9] != PROTOCOL_UDP || fragment != 0 {
        return None;
    }
    let src = Ipv4Addr::new(header[12], header[13], header[14], header[15]);
    let dst = Ipv4Addr::new(header[16], header[17], header[18], header[19]);
    let udp = packet.get(ihl..ihl + UDP_HEADER_LEN)?;
    let udp_len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    if udp_len < UDP_HEADER_LEN || ihl + udp_len > total {
        return None;
    }
    Some(UdpPacket {
        src,
        dst,
        src_port: u16::from_be_bytes([udp[0], udp[1]]),
        dst_port: u16::from_be_bytes([udp[2], udp[3]]),
        payload_start: ihl + UDP_HEADER_LEN,
        payload_end: ihl + udp_len,
    })
}

/// Writes the IPv4 and UDP headers for a payload of `payload_len` bytes into `out`, which must be
/// [`HEADER_LEN`] long. The UDP checksum is 0 (none, allowed over IPv4); the IPv4 header
/// checksum is set, as kernels check it.
pub fn write_udp_header(
    out: &mut [u8],
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    payload_len: usize,
) {
    debug_assert_eq!(out.len(), HEADER_LEN);
    let total = (HEADER_LEN + payload_len) as u16;
    let udp_len = (UDP_HEADER_LEN + payload_len) as u16;
    out[0] = 0x45;
    out[1] = 0;
    out[2..4].copy_from_slice(&total.to_be_bytes());
    out[4..6].copy_from_slice(&[0, 0]);
    out[6..8].copy_from_slice(&FLAGS_DF.to_be_bytes());
    out[8] = TTL;
    out[9] = PROTOCOL_UDP;
    out[10..12].copy_from_slice(&[0, 0]);
    out[12..16].copy_from_slice(&src.0.octets());
    out[16..20].copy_from_slice(&dst.0.octets());
    let checksum = ipv4_checksum(&out[..IPV4_HEADER_LEN]);
    out[10..12].copy_from_slice(&checksum.to_be_bytes());
    out[20..22].copy_from_slice(&src.1.to_be_bytes());
    out[22..24].copy_from_slice(&dst.1.to_be_bytes());
    out[24..26].copy_from_slice(&udp_len.to_be_bytes());
    out[26..28].copy_from_slice(&[0, 0]);
}

fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_header_parses_back_and_has_a_valid_checksum() {
        let mut packet = vec![0u8; HEADER_LEN + 5];
        let src = (Ipv4Addr::new(100, 64, 0, 1), 4433);
        let dst = (Ipv4Addr::new(100, 64, 0, 2), 4433);
        write_udp_header(&mut packet[..HEADER_LEN], src, dst, 5);
        packet[HEADER_LEN..].copy_from_slice(b"hello");
        assert_eq!(ipv4_checksum(&packet[..20]), 0);
        let p = parse_udp(&packet).unwrap();
        assert_eq!((p.src, p.src_port), src);
        assert_eq!((p.dst, p.dst_port), dst);
        assert_eq!(&packet[p.payload_start..p.payload_end], b"hello");
    }

    #[test]
    fn malformed_packets_are_rejected() {
        let mut packet = vec![0u8; HEADER_LEN + 5];
        let a = (Ipv4Addr::new(100, 64, 0, 1), 1);
        write_udp_header(&mut packet[..HEADER_LEN], a, a, 5);
        for cut in 0..HEADER_LEN + 5 {
            assert!(parse_udp(&packet[..cut]).is_none(), "cut at {cut}");
        }
        let mut tcp = packet.clone();
        tcp[9] = 6;
        assert!(parse_udp(&tcp).is_none());
        let mut v6 = packet.clone();
        v6[0] = 0x60;
        assert!(parse_udp(&v6).is_none());
        let mut fragment = packet.clone();
        fragment[7] = 1;
        assert!(parse_udp(&fragment).is_none());
        let mut long_udp = packet.clone();
        long_udp[25] = 200;
        assert!(parse_udp(&long_udp).is_none());
        assert!(parse_udp(&packet).is_some());
    }
}
