//! The virtual smoltcp device: queues of inner IP packets between WireGuard and the TCP/IP stack.

use std::collections::VecDeque;

use smoltcp::phy::{self, Checksum, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::time::Instant as SmolInstant;

/// Size of every pooled packet buffer; larger than any datagram or inner packet we accept.
pub(crate) const BUF_SIZE: usize = 2048;

/// How many outbound IP packets smoltcp may queue before the core encrypts them.
const TX_LIMIT: usize = 256;

/// Packet queues plus a pool of reusable buffers (so steady-state traffic allocates nothing).
#[derive(Debug)]
pub(crate) struct VirtualDevice {
    pub(crate) mtu: usize,
    /// Decrypted inner packets waiting for the interface.
    pub(crate) rx: VecDeque<Vec<u8>>,
    /// Inner packets the interface wants to send.
    pub(crate) tx: VecDeque<Vec<u8>>,
    /// Free buffers (length `BUF_SIZE`).
    pub(crate) pool: Vec<Vec<u8>>,
    /// Free buffers for replies generated during receive.
    pub(crate) spare: Vec<Vec<u8>>,
    /// Set when `transmit` refused a token because `tx` was full.
    pub(crate) exhausted: bool,
}

impl VirtualDevice {
    pub(crate) fn new(mtu: usize) -> Self {
        VirtualDevice {
            mtu,
            rx: VecDeque::new(),
            tx: VecDeque::new(),
            pool: Vec::new(),
            spare: Vec::new(),
            exhausted: false,
        }
    }

    /// A buffer of length `BUF_SIZE`, from the pool when possible.
    pub(crate) fn take_buf(pool: &mut Vec<Vec<u8>>) -> Vec<u8> {
        match pool.pop() {
            Some(mut b) => {
                b.resize(BUF_SIZE, 0);
                b
            }
            None => vec![0; BUF_SIZE],
        }
    }

    /// Moves free buffers into `spare` so replies made while receiving do not allocate.
    pub(crate) fn top_up_spare(&mut self) {
        while self.spare.len() < 32 {
            match self.pool.pop() {
                Some(b) => self.spare.push(b),
                None => break,
            }
        }
    }

    pub(crate) fn recycle(pool: &mut Vec<Vec<u8>>, buf: Vec<u8>) {
        if pool.len() < 1024 {
            pool.push(buf);
        }
    }
}

pub(crate) struct RxToken<'a> {
    buf: Vec<u8>,
    pool: &'a mut Vec<Vec<u8>>,
}

pub(crate) struct TxToken<'a> {
    tx: &'a mut VecDeque<Vec<u8>>,
    pool: &'a mut Vec<Vec<u8>>,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        let r = f(&self.buf);
        VirtualDevice::recycle(self.pool, self.buf);
        r
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let mut buf = VirtualDevice::take_buf(self.pool);
        buf.resize(len, 0);
        let r = f(&mut buf);
        self.tx.push_back(buf);
        r
    }
}

impl phy::Device for VirtualDevice {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _timestamp: SmolInstant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        let buf = self.rx.pop_front()?;
        // Both tokens need a pool: the rx token recycles into `pool`, and replies produced while
        // receiving (ACKs, RSTs) take from `spare`, which `top_up_spare` refills before a poll.
        Some((
            RxToken {
                buf,
                pool: &mut self.pool,
            },
            TxToken {
                tx: &mut self.tx,
                pool: &mut self.spare,
            },
        ))
    }

    fn transmit(&mut self, _timestamp: SmolInstant) -> Option<TxToken<'_>> {
        if self.tx.len() >= TX_LIMIT {
            self.exhausted = true;
            return None;
        }
        Some(TxToken {
            tx: &mut self.tx,
            pool: &mut self.pool,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        caps.max_burst_size = None;
        // WireGuard authenticates every packet, so verifying checksums again buys nothing.
        let mut checksum = ChecksumCapabilities::default();
        checksum.ipv4 = Checksum::Tx;
        checksum.tcp = Checksum::Tx;
        checksum.udp = Checksum::Tx;
        checksum.icmpv4 = Checksum::Tx;
        caps.checksum = checksum;
        caps
    }
}
