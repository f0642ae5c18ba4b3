//! The agent's one UDP socket, batched both ways: `recvmmsg` with UDP GRO
//! (the kernel hands over a run of datagrams from one sender as one buffer
//! plus a segment size) and `sendmmsg` with UDP GSO (a run of equal-sized
//! datagrams to one destination leaves in one message). A 64 KiB TCP burst
//! from a pod thus costs one syscall each way instead of forty-five.
//!
//! Addresses cross the kernel boundary as `sockaddr_storage` only (socket2's
//! [`SockAddr`] and [`SockAddrStorage`]), never as `sockaddr_in`: nothing
//! here knows the family, so an IPv6 underlay is a matter of the address
//! [`Udp::bind`] is given. Both are plain values, so the batches still
//! allocate nothing per datagram.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};

use socket2::{Domain, SockAddr, SockAddrStorage, Socket, Type};

const SOL_UDP: libc::c_int = 17;
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;
/// Kernel limits for one GSO send: at most 64 segments (older kernels)
/// and 65,507 bytes of payload.
const GSO_MAX_SEGMENTS: usize = 64;
const GSO_MAX_BYTES: usize = 65_000;
/// Receive buffers: one GRO run is at most 64 KiB.
const RECV_BUF: usize = 65_536;
const CMSG_SPACE: usize = 64;

/// Room for control messages, aligned as the `cmsghdr` the kernel and the
/// CMSG_* macros read and write in it (a byte array is not).
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct CmsgBuf([u8; CMSG_SPACE]);

impl CmsgBuf {
    const ZERO: CmsgBuf = CmsgBuf([0; CMSG_SPACE]);

    fn as_mut_ptr(&mut self) -> *mut u8 {
        self.0.as_mut_ptr()
    }
}

pub struct Udp {
    sock: Socket,
    /// Whether the kernel coalesces received runs (else one datagram per
    /// buffer; the receive path handles both).
    pub gro: bool,
    gso: bool,
    port: u16,
}

pub(crate) fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    opt: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: passes a pointer to a live c_int and its size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&v as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The address the kernel wrote into `storage` (`len` bytes of it), if it
/// is an IP one.
fn from_storage(storage: &libc::sockaddr_storage, len: libc::socklen_t) -> Option<SocketAddr> {
    let mut s = SockAddrStorage::zeroed();
    // SAFETY: SockAddrStorage is a transparent sockaddr_storage.
    unsafe { *s.view_as::<libc::sockaddr_storage>() = *storage };
    // SAFETY: the kernel set the family and `len` together.
    unsafe { SockAddr::new(s, len) }.as_socket()
}

impl Udp {
    /// Binds `0.0.0.0:port` (IPv4 underlay). GSO and GRO are used when the
    /// kernel has them.
    pub fn bind(port: u16) -> io::Result<Udp> {
        Udp::bind_to(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))
    }

    /// Binds `[::]:port` for IPv6 only (IPV6_V6ONLY): the IPv4 socket keeps
    /// IPv4, so no IPv4-mapped address ever reaches the core, and a host
    /// without IPv6 (this fails) keeps its IPv4 underlay as it was.
    pub fn bind_v6(port: u16) -> io::Result<Udp> {
        Udp::bind_to(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)))
    }

    fn bind_to(local: SocketAddr) -> io::Result<Udp> {
        // socket2 opens it close-on-exec.
        let sock = Socket::new(Domain::for_address(local), Type::DGRAM, None)?;
        if local.is_ipv6() {
            sock.set_only_v6(true)?;
        }
        let raw = sock.as_raw_fd();
        // Bursts of 64 KiB at several Gbit/s: the default 200 KiB buffers
        // overflow while the engine encrypts the next batch (the receive
        // side dropped datagrams under 4 TCP streams with 8 MiB). The FORCE
        // variants pass net.core.rmem_max/wmem_max (the agent has
        // CAP_NET_ADMIN); without the capability, ask for what the limit
        // allows.
        if setsockopt_int(raw, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 16 << 20).is_err() {
            let _ = sock.set_recv_buffer_size(16 << 20);
        }
        if setsockopt_int(raw, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, 16 << 20).is_err() {
            let _ = sock.set_send_buffer_size(16 << 20);
        }
        sock.bind(&local.into())?;
        let gro = setsockopt_int(raw, SOL_UDP, UDP_GRO, 1).is_ok();
        // GSO is per message (a cmsg); probe that the option exists.
        let gso = setsockopt_int(raw, SOL_UDP, UDP_SEGMENT, 0).is_ok();
        let port = sock
            .local_addr()?
            .as_socket()
            .map_or(local.port(), |a| a.port());
        Ok(Udp {
            sock,
            gro,
            gso,
            port,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Sends one datagram now (control traffic: STUN, TURN, handshakes).
    pub fn send_to(&self, data: &[u8], to: SocketAddr) -> io::Result<()> {
        self.sock.send_to(data, &to.into()).map(drop)
    }
}

impl Udp {
    /// One datagram without blocking (control traffic only: the data path
    /// uses [`RecvBatch`]).
    pub fn recv_from(&self, buf: &mut [u8]) -> io::Result<Option<(usize, SocketAddr)>> {
        // SAFETY: recvfrom writes at most `len` bytes of the zeroed storage
        // and sets `len` with the family; buf is live and sized as stated.
        let got = unsafe {
            SockAddr::try_init(|addr, len| {
                let n = libc::recvfrom(
                    self.sock.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    addr.cast(),
                    len,
                );
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            })
        };
        match got {
            Ok((n, from)) => Ok(from.as_socket().map(|from| (n, from))),
            Err(e) => match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
                _ => Err(e),
            },
        }
    }
}

impl AsRawFd for Udp {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

/// Pre-allocated receive state for `recvmmsg`: nothing is allocated per
/// datagram.
pub struct RecvBatch {
    bufs: Vec<Vec<u8>>,
    addrs: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    cmsgs: Vec<CmsgBuf>,
    msgs: Vec<libc::mmsghdr>,
    count: usize,
}

/// One received buffer: `data` holds one datagram, or with GRO a run of
/// datagrams from `from`, each `segment` bytes (the last may be shorter).
pub struct Received<'a> {
    pub from: SocketAddr,
    pub data: &'a mut [u8],
    pub segment: usize,
}

impl RecvBatch {
    pub fn new(n: usize) -> RecvBatch {
        RecvBatch {
            bufs: (0..n).map(|_| vec![0u8; RECV_BUF]).collect(),
            // SAFETY: plain old data, all-zero valid.
            addrs: vec![unsafe { zeroed() }; n],
            iovs: Vec::with_capacity(n),
            cmsgs: vec![CmsgBuf::ZERO; n],
            msgs: Vec::with_capacity(n),
            count: 0,
        }
    }

    /// Receives up to the batch size without blocking; the number of
    /// buffers filled.
    pub fn recv(&mut self, udp: &Udp) -> io::Result<usize> {
        let n = self.bufs.len();
        self.iovs.clear();
        self.msgs.clear();
        for i in 0..n {
            self.iovs.push(libc::iovec {
                iov_base: self.bufs[i].as_mut_ptr().cast(),
                iov_len: self.bufs[i].len(),
            });
        }
        for i in 0..n {
            // SAFETY: plain old data, all-zero valid.
            let mut h: libc::mmsghdr = unsafe { zeroed() };
            h.msg_hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_hdr.msg_iov = &mut self.iovs[i];
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_control = self.cmsgs[i].as_mut_ptr().cast();
            h.msg_hdr.msg_controllen = CMSG_SPACE;
            self.msgs.push(h);
        }
        // SAFETY: every mmsghdr points into buffers owned by self that live
        // across the call.
        let r = unsafe {
            libc::recvmmsg(
                udp.as_raw_fd(),
                self.msgs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            self.count = 0;
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
                _ => Err(e),
            };
        }
        self.count = r as usize;
        Ok(self.count)
    }

    /// Buffer `i` of the last `recv` (None past them, or from a sender
    /// without an IP address, which a UDP socket never reports).
    pub fn get(&mut self, i: usize) -> Option<Received<'_>> {
        if i >= self.count {
            return None;
        }
        let h = &self.msgs[i].msg_hdr;
        let len = self.msgs[i].msg_len as usize;
        let segment = gro_segment(h).unwrap_or(len).max(1);
        let from = from_storage(&self.addrs[i], h.msg_namelen)?;
        let data = &mut self.bufs[i][..len.min(RECV_BUF)];
        Some(Received {
            from,
            data,
            segment,
        })
    }
}

fn gro_segment(h: &libc::msghdr) -> Option<usize> {
    // SAFETY: walks the control buffer the kernel filled, with the libc
    // CMSG macros that bound every step by msg_controllen.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        while !c.is_null() {
            if (*c).cmsg_level == SOL_UDP && (*c).cmsg_type == UDP_GRO {
                let mut v: libc::c_int = 0;
                std::ptr::copy_nonoverlapping(
                    libc::CMSG_DATA(c),
                    (&mut v as *mut libc::c_int).cast(),
                    size_of::<libc::c_int>(),
                );
                return usize::try_from(v).ok().filter(|&v| v > 0);
            }
            c = libc::CMSG_NXTHDR(h, c);
        }
    }
    None
}

/// Outgoing datagrams collected during one engine round and sent with as
/// few syscalls as GSO allows.
pub struct SendBatch {
    data: Vec<u8>,
    /// (destination, offset, length) of each queued datagram.
    queued: Vec<(SocketAddr, usize, usize)>,
    /// Where the datagram being written starts.
    cursor: usize,
    addrs: Vec<SockAddr>,
    iovs: Vec<libc::iovec>,
    cmsgs: Vec<CmsgBuf>,
    msgs: Vec<libc::mmsghdr>,
    /// Runs of `queued` sent as one message: (first, one past last).
    groups: Vec<(usize, usize)>,
    /// Datagrams the kernel refused (counted, dropped: the peers' TCP
    /// recovers, as it would from a lossy link).
    pub dropped: u64,
    pub syscalls: u64,
}

// SAFETY: the raw pointers inside `iovs`/`msgs` point into this batch's
// own buffers and are rebuilt by every `flush` before the syscall; between
// calls they are never read, so the batch may move to another thread (the
// engine's, where it is used alone).
unsafe impl Send for SendBatch {}

/// Room for one datagram past the cursor.
pub const SLOT: usize = 9_216;

impl SendBatch {
    pub fn new(bytes: usize) -> SendBatch {
        SendBatch {
            data: vec![0u8; bytes + SLOT],
            queued: Vec::with_capacity(1024),
            cursor: 0,
            addrs: Vec::with_capacity(256),
            iovs: Vec::with_capacity(256),
            cmsgs: vec![CmsgBuf::ZERO; 256],
            msgs: Vec::with_capacity(256),
            groups: Vec::with_capacity(256),
            dropped: 0,
            syscalls: 0,
        }
    }

    /// Space for the next datagram.
    pub fn slot(&mut self) -> &mut [u8] {
        &mut self.data[self.cursor..self.cursor + SLOT]
    }

    /// Queues the first `len` bytes of the slot for `to`. Returns true when
    /// the batch is full and must be flushed before the next slot.
    pub fn push(&mut self, to: SocketAddr, len: usize) -> bool {
        self.queued.push((to, self.cursor, len));
        self.cursor += len;
        self.cursor + SLOT > self.data.len() || self.queued.len() >= self.queued.capacity()
    }

    pub fn is_empty(&self) -> bool {
        self.queued.is_empty()
    }

    /// Sends everything queued.
    pub fn flush(&mut self, udp: &Udp) {
        let mut i = 0;
        while i < self.queued.len() {
            i = self.group(i, udp.gso);
            self.headers();
            self.send(udp);
        }
        self.queued.clear();
        self.cursor = 0;
    }

    /// Groups the queue from `i` into as many messages as there are
    /// control buffers; returns where the next round starts.
    fn group(&mut self, mut i: usize, gso: bool) -> usize {
        self.addrs.clear();
        self.iovs.clear();
        self.msgs.clear();
        self.groups.clear();
        while i < self.queued.len() && self.groups.len() < self.cmsgs.len() {
            let (to, off, _) = self.queued[i];
            let (j, total) = self.run(i, gso);
            self.groups.push((i, j));
            self.addrs.push(to.into());
            self.iovs.push(libc::iovec {
                iov_base: self.data[off..].as_mut_ptr().cast(),
                iov_len: total,
            });
            i = j;
        }
        i
    }

    /// The run that starts at `i`: same destination, contiguous, equal
    /// size (the last of a run may be shorter), within the GSO limits.
    /// Returns one past its end and its bytes.
    fn run(&self, i: usize, gso: bool) -> (usize, usize) {
        let (to, off, len) = self.queued[i];
        let mut j = i + 1;
        let mut total = len;
        if gso {
            while j < self.queued.len() && j - i < GSO_MAX_SEGMENTS {
                let (t2, o2, l2) = self.queued[j];
                if t2 != to || o2 != off + total || l2 > len || total + l2 > GSO_MAX_BYTES {
                    break;
                }
                total += l2;
                j += 1;
                if l2 < len {
                    break;
                }
            }
        }
        (j, total)
    }

    /// One message header per group; a run of more than one datagram gets
    /// its segment size in a UDP_SEGMENT control message.
    fn headers(&mut self) {
        for (g, &(a, b)) in self.groups.iter().enumerate() {
            // SAFETY: plain old data, all-zero valid.
            let mut h: libc::mmsghdr = unsafe { zeroed() };
            // sendmmsg only reads the name.
            h.msg_hdr.msg_name = self.addrs[g].as_ptr().cast_mut().cast();
            h.msg_hdr.msg_namelen = self.addrs[g].len();
            h.msg_hdr.msg_iov = &mut self.iovs[g];
            h.msg_hdr.msg_iovlen = 1;
            if b - a > 1 {
                let seg = self.queued[a].2 as u16;
                let buf = &mut self.cmsgs[g];
                h.msg_hdr.msg_control = buf.as_mut_ptr().cast();
                // SAFETY: CMSG_SPACE(2) fits the 64-byte buffer.
                unsafe {
                    h.msg_hdr.msg_controllen = libc::CMSG_SPACE(2) as usize;
                    let c = libc::CMSG_FIRSTHDR(&h.msg_hdr);
                    (*c).cmsg_level = SOL_UDP;
                    (*c).cmsg_type = UDP_SEGMENT;
                    (*c).cmsg_len = libc::CMSG_LEN(2) as usize;
                    std::ptr::copy_nonoverlapping(
                        (&seg as *const u16).cast::<u8>(),
                        libc::CMSG_DATA(c),
                        2,
                    );
                }
            }
            self.msgs.push(h);
        }
    }

    /// Sends the built messages with `sendmmsg`, as many per call as the
    /// kernel takes.
    fn send(&mut self, udp: &Udp) {
        let mut sent = 0;
        while sent < self.msgs.len() {
            self.syscalls += 1;
            // SAFETY: the headers point into buffers owned by self.
            let r = unsafe {
                libc::sendmmsg(
                    udp.as_raw_fd(),
                    self.msgs[sent..].as_mut_ptr(),
                    (self.msgs.len() - sent) as libc::c_uint,
                    0,
                )
            };
            if r <= 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // Unreachable destinations (ICMP errors reported on the
                // socket), a full buffer: drop this message, go on.
                let (a, b) = self.groups[sent];
                self.dropped += (b - a) as u64;
                sent += 1;
                continue;
            }
            sent += r as usize;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_buffers_are_aligned_for_cmsghdr() {
        assert!(std::mem::align_of::<CmsgBuf>() >= std::mem::align_of::<libc::cmsghdr>());
        let mut r = RecvBatch::new(3);
        let mut s = SendBatch::new(1 << 16);
        for b in r.cmsgs.iter_mut().chain(s.cmsgs.iter_mut()) {
            assert_eq!(
                b.as_mut_ptr() as usize % std::mem::align_of::<libc::cmsghdr>(),
                0
            );
        }
    }

    /// Over loopback: a GSO batch arrives as a GRO run, or as separate
    /// datagrams; either way every byte is there in order.
    #[test]
    fn batches_roundtrip_over_loopback() {
        let a = Udp::bind(0).unwrap();
        let b = Udp::bind(0).unwrap();
        let to: SocketAddr = format!("127.0.0.1:{}", b.port()).parse().unwrap();
        let mut batch = SendBatch::new(256 * 1024);
        let mut expect = Vec::new();
        for i in 0..40u32 {
            let len = if i == 39 { 300 } else { 1400 };
            let slot = batch.slot();
            for (k, byte) in slot[..len].iter_mut().enumerate() {
                *byte = (i as usize + k) as u8;
            }
            expect.push(slot[..len].to_vec());
            assert!(!batch.push(to, len));
        }
        batch.flush(&a);
        assert_eq!(batch.dropped, 0);
        assert!(batch.syscalls <= 2, "{} syscalls", batch.syscalls);
        let mut got: Vec<Vec<u8>> = Vec::new();
        let mut rb = RecvBatch::new(8);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while got.len() < expect.len() && std::time::Instant::now() < deadline {
            let n = rb.recv(&b).unwrap();
            for i in 0..n {
                let r = rb.get(i).unwrap();
                assert_eq!(r.from.port(), a.port());
                for d in r.data.chunks(r.segment) {
                    got.push(d.to_vec());
                }
            }
            if n == 0 {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
        assert_eq!(got, expect);
    }
}
