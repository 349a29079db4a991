//! Batched UDP I/O for the driver, with quinn-udp: `recvmmsg` with GRO on receive, GSO (one
//! `sendmsg` for a run of equal-sized datagrams to one peer) on send, where the kernel has them.
//!
//! No allocation per datagram: receive slots and the send buffer are allocated once.

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;

use quinn_udp::{RecvMeta, Transmit, UdpSocketState, BATCH_SIZE};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tracing::trace;

/// Bytes of one receive slot: room for a GRO batch of full-sized datagrams.
const RECV_SLOT: usize = 64 * 1024;
/// Most bytes one GSO send may carry (a UDP datagram's length field, less the headers).
const MAX_GSO_BYTES: usize = 65_000;

/// The socket and its receive slots.
pub(crate) struct BatchSocket {
    socket: UdpSocket,
    state: UdpSocketState,
    slots: Vec<Vec<u8>>,
    metas: Vec<RecvMeta>,
}

impl BatchSocket {
    pub(crate) fn new(socket: UdpSocket) -> io::Result<BatchSocket> {
        let state = UdpSocketState::new((&socket).into())?;
        Ok(BatchSocket {
            socket,
            state,
            slots: (0..BATCH_SIZE).map(|_| vec![0u8; RECV_SLOT]).collect(),
            metas: vec![RecvMeta::default(); BATCH_SIZE],
        })
    }

    pub(crate) fn socket(&self) -> &UdpSocket {
        &self.socket
    }

    /// How many datagrams one send may carry.
    pub(crate) fn max_segments(&self) -> usize {
        self.state.max_gso_segments().max(1)
    }

    /// Reads one batch without waiting and hands every datagram in it to `f`; returns how many
    /// datagrams there were (0: nothing was waiting).
    pub(crate) fn recv_batch(&mut self, mut f: impl FnMut(SocketAddr, &[u8])) -> usize {
        let mut iovs: Vec<IoSliceMut<'_>> =
            self.slots.iter_mut().map(|s| IoSliceMut::new(s)).collect();
        let socket = &self.socket;
        let state = &self.state;
        let metas = &mut self.metas;
        let got = socket.try_io(Interest::READABLE, || {
            state.recv(socket.into(), &mut iovs, metas)
        });
        let n = match got {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return 0,
            Err(e) => {
                trace!(error = %e, "udp receive error");
                return 0;
            }
        };
        let mut datagrams = 0;
        for (meta, iov) in self.metas.iter().zip(iovs.iter()).take(n) {
            let stride = meta.stride.max(1);
            for d in iov[..meta.len].chunks(stride) {
                f(meta.addr, d);
                datagrams += 1;
            }
        }
        datagrams
    }

    /// Sends everything in `queue`, waiting for room in the socket as needed; then clears it.
    pub(crate) async fn flush(&self, queue: &mut SendQueue) {
        for run in &queue.runs {
            let transmit = Transmit {
                destination: run.dst,
                ecn: None,
                contents: &queue.buf[run.start..run.start + run.len],
                segment_size: (run.count > 1).then_some(run.segment),
                src_ip: None,
            };
            loop {
                let sent = self.socket.try_io(Interest::WRITABLE, || {
                    self.state.send((&self.socket).into(), &transmit)
                });
                match sent {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if self.socket.writable().await.is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        trace!(error = %e, dst = %run.dst, "udp send error");
                        break;
                    }
                }
            }
        }
        queue.clear();
    }
}

#[derive(Debug, Clone, Copy)]
struct Run {
    dst: SocketAddr,
    start: usize,
    len: usize,
    segment: usize,
    count: usize,
    /// The last datagram was shorter than the segment size: nothing may follow in this run.
    closed: bool,
}

/// Datagrams waiting to be sent, packed into runs that one GSO send can carry.
#[derive(Debug)]
pub(crate) struct SendQueue {
    buf: Vec<u8>,
    used: usize,
    runs: Vec<Run>,
    max_segments: usize,
    slot: usize,
}

impl SendQueue {
    /// A queue for up to `capacity` datagrams of at most `slot` bytes each.
    pub(crate) fn new(capacity: usize, slot: usize, max_segments: usize) -> SendQueue {
        SendQueue {
            buf: vec![0u8; capacity * slot],
            used: 0,
            runs: Vec::new(),
            max_segments,
            slot,
        }
    }

    /// Room for the next datagram, if any is left.
    pub(crate) fn slot(&mut self) -> Option<&mut [u8]> {
        let end = self.used + self.slot;
        self.buf.get_mut(self.used..end)
    }

    /// Queues the `len` bytes just written into [`SendQueue::slot`], for `dst`.
    pub(crate) fn commit(&mut self, dst: SocketAddr, len: usize) {
        let start = self.used;
        self.used += len;
        if let Some(run) = self.runs.last_mut() {
            if run.dst == dst
                && !run.closed
                && len <= run.segment
                && run.count < self.max_segments
                && run.len + len <= MAX_GSO_BYTES
            {
                run.len += len;
                run.count += 1;
                run.closed = len < run.segment;
                return;
            }
        }
        self.runs.push(Run {
            dst,
            start,
            len,
            segment: len,
            count: 1,
            closed: false,
        });
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    fn clear(&mut self) {
        self.used = 0;
        self.runs.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(q: &mut SendQueue, dst: SocketAddr, len: usize) {
        q.slot().unwrap()[..len].fill(len as u8);
        q.commit(dst, len);
    }

    #[test]
    fn equal_datagrams_to_one_peer_share_a_run_until_a_short_one_ends_it() {
        let a: SocketAddr = "192.0.2.1:1".parse().unwrap();
        let b: SocketAddr = "192.0.2.2:1".parse().unwrap();
        let mut q = SendQueue::new(64, 2048, 3);
        for len in [1000, 1000, 1000, 1000, 500, 1000] {
            push(&mut q, a, len);
        }
        push(&mut q, b, 1000);
        let shape: Vec<(SocketAddr, usize, usize)> =
            q.runs.iter().map(|r| (r.dst, r.count, r.len)).collect();
        assert_eq!(
            shape,
            vec![(a, 3, 3000), (a, 2, 1500), (a, 1, 1000), (b, 1, 1000)]
        );
        // Contiguous: each run starts where the previous ended.
        let mut at = 0;
        for r in &q.runs {
            assert_eq!(r.start, at);
            at += r.len;
        }
        assert!(q.slot().is_some());
    }

    #[test]
    fn a_run_stays_within_what_one_udp_send_carries() {
        let a: SocketAddr = "192.0.2.1:1".parse().unwrap();
        let mut q = SendQueue::new(100, 2048, 64);
        for _ in 0..100 {
            push(&mut q, a, 1452);
        }
        assert!(q.runs.iter().all(|r| r.len <= MAX_GSO_BYTES));
        assert_eq!(q.runs[0].count, MAX_GSO_BYTES / 1452);
    }

    #[test]
    fn a_full_queue_has_no_slot() {
        let a: SocketAddr = "192.0.2.1:1".parse().unwrap();
        let mut q = SendQueue::new(2, 100, 64);
        push(&mut q, a, 100);
        push(&mut q, a, 100);
        assert!(q.slot().is_none());
        q.clear();
        assert!(q.is_empty());
        assert!(q.slot().is_some());
    }
}
