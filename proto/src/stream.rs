//! The header that opens every stream a gateway sends through the tunnel to an agent.
//!
//! A stream is a QUIC bidirectional stream inside WireGuard; its first [`StreamHeader::LEN`]
//! bytes say what it is for, and everything after them is the user's bytes. The agent checks the
//! header against its config before it dials anything: the resource must be one it serves, on
//! the overlay port control gave that resource, so that a stream meant for a deleted or moved
//! resource can never reach whatever now has its port.
//!
//! Layout (network byte order): `"KM"`, version (1), kind, overlay port (2), resource id (16).

use uuid::Uuid;

/// What a stream carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamKind {
    /// One HTTP/1.1 exchange (a request and its response, or an upgraded connection).
    Http,
    /// A raw TCP byte stream.
    Tcp,
    /// One UDP flow: datagrams, each framed as a 2-byte big-endian length and its bytes.
    Udp,
    /// The agent's health reports to a gateway: newline-delimited JSON
    /// [`crate::HealthReport`]s, for as long as the gateway keeps the stream open. Port 0 and
    /// the nil resource id.
    Health,
    /// One HTTP/1.1 exchange with an agent session's server on the agent's loopback. Port 0;
    /// the resource id is the session's id.
    Session,
}

/// The largest datagram a UDP flow carries (the most an IPv4 UDP payload can be).
pub const MAX_DATAGRAM: usize = 65_507;

/// Frames one datagram for a UDP flow stream: its length (2 bytes, big endian), then its bytes.
/// `None` if it is longer than [`MAX_DATAGRAM`].
pub fn frame_datagram(payload: &[u8]) -> Option<Vec<u8>> {
    if payload.len() > MAX_DATAGRAM {
        return None;
    }
    let len = u16::try_from(payload.len()).ok()?;
    let mut out = Vec::with_capacity(2 + payload.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
    Some(out)
}

/// The header of a stream. See the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamHeader {
    /// What the stream carries.
    pub kind: StreamKind,
    /// The resource's overlay port (as in [`crate::Target::port`]).
    pub port: u16,
    /// The resource the stream is for.
    pub resource_id: Uuid,
}

/// Why a stream header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StreamHeaderError {
    /// It does not start with the magic bytes: not a kakuremichi stream.
    #[error("not a kakuremichi stream header")]
    BadMagic,
    /// A header version this build does not speak.
    #[error("unsupported stream header version {0}")]
    UnsupportedVersion(u8),
    /// A stream kind this build does not know.
    #[error("unknown stream kind {0}")]
    UnknownKind(u8),
}

const MAGIC: [u8; 2] = *b"KM";

/// The response header an agent sets on an error it answers itself (the target refused, or
/// closed before answering), so that the gateway shows its own error page instead.
pub const AGENT_ERROR_HEADER: &str = "x-kakuremichi-agent-error";

impl StreamHeader {
    /// The header version this build writes and reads.
    pub const VERSION: u8 = 1;
    /// Length of an encoded header.
    pub const LEN: usize = 22;

    /// The header's bytes.
    pub fn encode(&self) -> [u8; Self::LEN] {
        let mut out = [0u8; Self::LEN];
        out[..2].copy_from_slice(&MAGIC);
        out[2] = Self::VERSION;
        out[3] = match self.kind {
            StreamKind::Http => 1,
            StreamKind::Tcp => 2,
            StreamKind::Udp => 3,
            StreamKind::Health => 4,
            StreamKind::Session => 5,
        };
        out[4..6].copy_from_slice(&self.port.to_be_bytes());
        out[6..].copy_from_slice(self.resource_id.as_bytes());
        out
    }

    /// Parses a header.
    pub fn decode(bytes: &[u8; Self::LEN]) -> Result<StreamHeader, StreamHeaderError> {
        if bytes[..2] != MAGIC {
            return Err(StreamHeaderError::BadMagic);
        }
        if bytes[2] != Self::VERSION {
            return Err(StreamHeaderError::UnsupportedVersion(bytes[2]));
        }
        let kind = match bytes[3] {
            1 => StreamKind::Http,
            2 => StreamKind::Tcp,
            3 => StreamKind::Udp,
            4 => StreamKind::Health,
            5 => StreamKind::Session,
            other => return Err(StreamHeaderError::UnknownKind(other)),
        };
        let mut id = [0u8; 16];
        id.copy_from_slice(&bytes[6..]);
        Ok(StreamHeader {
            kind,
            port: u16::from_be_bytes([bytes[4], bytes[5]]),
            resource_id: Uuid::from_bytes(id),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_are_length_prefixed_and_bounded() {
        assert_eq!(frame_datagram(b"hi"), Some(vec![0, 2, b'h', b'i']));
        assert_eq!(frame_datagram(b""), Some(vec![0, 0]));
        assert_eq!(
            frame_datagram(&vec![0; MAX_DATAGRAM]).map(|f| f.len()),
            Some(MAX_DATAGRAM + 2)
        );
        assert_eq!(frame_datagram(&vec![0; MAX_DATAGRAM + 1]), None);
        let h = StreamHeader {
            kind: StreamKind::Udp,
            port: 1,
            resource_id: ID,
        };
        assert_eq!(h.encode()[3], 3);
        assert_eq!(StreamHeader::decode(&h.encode()), Ok(h));
        let s = StreamHeader {
            kind: StreamKind::Session,
            port: 0,
            resource_id: ID,
        };
        assert_eq!(s.encode()[3], 5);
        assert_eq!(StreamHeader::decode(&s.encode()), Ok(s));
    }

    const ID: Uuid = Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);

    #[test]
    fn golden_http_header() {
        let h = StreamHeader {
            kind: StreamKind::Http,
            port: 10001,
            resource_id: ID,
        };
        let bytes = h.encode();
        assert_eq!(
            bytes,
            [
                b'K', b'M', 1, 1, 0x27, 0x11, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef, 0x01,
                0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef
            ]
        );
        assert_eq!(StreamHeader::decode(&bytes), Ok(h));
    }

    #[test]
    fn golden_tcp_header() {
        let h = StreamHeader {
            kind: StreamKind::Tcp,
            port: 22,
            resource_id: Uuid::nil(),
        };
        let mut expected = [0u8; StreamHeader::LEN];
        expected[..6].copy_from_slice(&[b'K', b'M', 1, 2, 0, 22]);
        assert_eq!(h.encode(), expected);
        assert_eq!(StreamHeader::decode(&expected), Ok(h));
    }

    #[test]
    fn bad_headers_are_refused_with_a_reason() {
        let good = StreamHeader {
            kind: StreamKind::Http,
            port: 1,
            resource_id: ID,
        }
        .encode();
        let mut b = good;
        b[0] = b'G';
        assert_eq!(StreamHeader::decode(&b), Err(StreamHeaderError::BadMagic));
        let mut b = good;
        b[2] = 2;
        assert_eq!(
            StreamHeader::decode(&b),
            Err(StreamHeaderError::UnsupportedVersion(2))
        );
        let mut b = good;
        b[3] = 9;
        assert_eq!(
            StreamHeader::decode(&b),
            Err(StreamHeaderError::UnknownKind(9))
        );
    }
}
