//! What an attacker pod has by default: a raw packet socket (CAP_NET_RAW,
//! which containerd grants) on its interface, sending any frame it likes
//! and reading every frame that reaches it. Plus the few frames the attack
//! tests forge, built by hand so that nothing in the code under test helps.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::libc;

use crate::netns::Netns;

pub type Mac = [u8; 6];

pub const BROADCAST: Mac = [0xff; 6];

/// An `AF_PACKET` socket bound to one interface of a namespace.
pub struct RawSocket {
    fd: OwnedFd,
    ifindex: i32,
}

const ETH_P_ALL: u16 = 0x0003;

impl RawSocket {
    /// Opens it inside `ns` (the socket stays there wherever it is used).
    pub fn open(ns: &Netns, ifname: &str) -> io::Result<RawSocket> {
        let name = std::ffi::CString::new(ifname)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in ifname"))?;
        ns.run(move || {
            // SAFETY: plain socket(2).
            let fd = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    i32::from(ETH_P_ALL.to_be()),
                )
            };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: fd was just created and is owned here.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: name is a valid C string.
            let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
            if ifindex == 0 {
                return Err(io::Error::last_os_error());
            }
            let sa = sockaddr_ll(ifindex);
            // SAFETY: sa is a valid sockaddr_ll of the stated size.
            let r = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&sa as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(RawSocket { fd, ifindex })
        })
    }

    /// Forgets what arrived so far.
    pub fn drain(&self) {
        let _ = self.recv_until(Duration::from_millis(1), |_| false);
        let mut buf = [0u8; 2048];
        // SAFETY: buf is live and sized as stated.
        while unsafe {
            libc::recv(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        } > 0
        {}
    }

    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        let sa = sockaddr_ll(self.ifindex);
        // SAFETY: frame and sa are live for the call.
        let r = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&sa as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Every frame that arrives (not those the namespace sends) until
    /// `timeout`, passed to `f`; stops early when `f` returns true, and then
    /// returns that frame.
    pub fn recv_until(
        &self,
        timeout: Duration,
        mut f: impl FnMut(&[u8]) -> bool,
    ) -> Option<Vec<u8>> {
        let end = Instant::now() + timeout;
        let mut buf = vec![0u8; 65_536];
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let mut p = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: p is one live pollfd.
            let n = unsafe { libc::poll(&mut p, 1, left.as_millis().min(1000) as i32 + 1) };
            if n <= 0 {
                continue;
            }
            // SAFETY: plain old data; all-zero is valid.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: buf and from are live and sized as stated.
            let got = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    (&mut from as *mut libc::sockaddr_ll).cast(),
                    &mut len,
                )
            };
            if got <= 0 || from.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            let frame = &buf[..got as usize];
            if f(frame) {
                return Some(frame.to_vec());
            }
        }
    }
}

fn sockaddr_ll(ifindex: i32) -> libc::sockaddr_ll {
    // SAFETY: plain old data; all-zero is valid.
    let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sa.sll_family = libc::AF_PACKET as u16;
    sa.sll_protocol = ETH_P_ALL.to_be();
    sa.sll_ifindex = ifindex;
    sa.sll_halen = 6;
    sa
}

/// MACs as `ip link` prints them: the overlay's one parser and printer.
pub use evio_overlay::packet::{fmt_mac, parse_mac};

/// The MAC of `ifname` in `ns`.
pub fn mac_of(ns: &Netns, ifname: &str) -> Mac {
    // Not /sys/class/net: `nsenter --net` keeps the caller's sysfs.
    let out = ns.ok(&["ip", "-o", "link", "show", "dev", ifname]);
    let words: Vec<&str> = out.split_whitespace().collect();
    words
        .iter()
        .position(|w| *w == "link/ether")
        .and_then(|i| parse_mac(words.get(i + 1)?))
        .unwrap_or_else(|| panic!("MAC of {ifname}: {out:?}"))
}

/// The link-layer address `ns` has cached for `ip`, if any.
pub fn neighbour(ns: &Netns, ip: IpAddr) -> Option<Mac> {
    let out = ns.ok(&["ip", "neigh", "show", &ip.to_string()]);
    let words: Vec<&str> = out.split_whitespace().collect();
    let i = words.iter().position(|w| *w == "lladdr")?;
    parse_mac(words.get(i + 1)?)
}

fn checksum(sum: u64, data: &[u8]) -> u64 {
    let mut s = sum;
    for c in data.chunks(2) {
        let w = u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]);
        s += u64::from(w);
    }
    s
}

fn finish(mut s: u64) -> u16 {
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

pub fn ethernet(dst: Mac, src: Mac, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An Ethernet/IPv4 ARP packet (op 1 request, 2 reply).
pub fn arp(
    op: u16,
    src: Mac,
    sender: (Mac, Ipv4Addr),
    target: (Mac, Ipv4Addr),
    dst: Mac,
) -> Vec<u8> {
    let mut p = vec![0, 1, 0x08, 0, 6, 4];
    p.extend_from_slice(&op.to_be_bytes());
    p.extend_from_slice(&sender.0);
    p.extend_from_slice(&sender.1.octets());
    p.extend_from_slice(&target.0);
    p.extend_from_slice(&target.1.octets());
    ethernet(dst, src, 0x0806, &p)
}

/// IPv4/UDP with correct checksums.
pub fn udp4(
    dst_mac: Mac,
    src_mac: Mac,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    port: u16,
    payload: &[u8],
) -> Vec<u8> {
    let ulen = (8 + payload.len()) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&(20 + ulen).to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let s = finish(checksum(0, &ip));
    ip[10..12].copy_from_slice(&s.to_be_bytes());
    let mut udp = Vec::new();
    udp.extend_from_slice(&40000u16.to_be_bytes());
    udp.extend_from_slice(&port.to_be_bytes());
    udp.extend_from_slice(&ulen.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let mut pseudo = checksum(0, &src.octets());
    pseudo = checksum(pseudo, &dst.octets());
    pseudo += 17 + u64::from(ulen);
    let s = finish(checksum(pseudo, &udp));
    udp[6..8].copy_from_slice(&s.to_be_bytes());
    ip.extend_from_slice(&udp);
    ethernet(dst_mac, src_mac, 0x0800, &ip)
}

/// The L2 and L3 addresses of a frame: (destination, source) each.
type Ends6 = ((Mac, Mac), (Ipv6Addr, Ipv6Addr));

/// IPv6 carrying `l4` (protocol `next`), its checksum (at `csum_at`)
/// computed over the pseudo-header.
fn ipv6(
    ((dst_mac, src_mac), (src, dst)): Ends6,
    next: u8,
    hop: u8,
    mut l4: Vec<u8>,
    csum_at: usize,
) -> Vec<u8> {
    let len = l4.len() as u32;
    let mut pseudo = checksum(0, &src.octets());
    pseudo = checksum(pseudo, &dst.octets());
    pseudo += u64::from(len) + u64::from(next);
    let s = finish(checksum(pseudo, &l4));
    l4[csum_at..csum_at + 2].copy_from_slice(&s.to_be_bytes());
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&(len as u16).to_be_bytes());
    p.extend_from_slice(&[next, hop]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&l4);
    ethernet(dst_mac, src_mac, 0x86dd, &p)
}

/// IPv6/UDP with a correct checksum.
pub fn udp6(
    dst_mac: Mac,
    src_mac: Mac,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    port: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut udp = Vec::new();
    udp.extend_from_slice(&40000u16.to_be_bytes());
    udp.extend_from_slice(&port.to_be_bytes());
    udp.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    ipv6(((dst_mac, src_mac), (src, dst)), 17, 64, udp, 6)
}

/// An unsolicited neighbour advertisement with the override flag: "`target`
/// is at `lladdr`", hop limit 255 as RFC 4861 demands.
pub fn neighbour_advert(
    dst_mac: Mac,
    src_mac: Mac,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    target: Ipv6Addr,
    lladdr: Mac,
) -> Vec<u8> {
    let mut m = vec![136, 0, 0, 0, 0x20, 0, 0, 0];
    m.extend_from_slice(&target.octets());
    m.extend_from_slice(&[2, 1]);
    m.extend_from_slice(&lladdr);
    ipv6(((dst_mac, src_mac), (src, dst)), 58, 255, m, 2)
}

/// A neighbour solicitation for `target` to its solicited-node group.
pub fn neighbour_solicit(src_mac: Mac, src: Ipv6Addr, target: Ipv6Addr) -> Vec<u8> {
    let t = target.octets();
    let group = Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(t[13]),
        u16::from_be_bytes([t[14], t[15]]),
    );
    let dst_mac = [0x33, 0x33, 0xff, t[13], t[14], t[15]];
    let mut m = vec![135, 0, 0, 0, 0, 0, 0, 0];
    m.extend_from_slice(&t);
    m.extend_from_slice(&[1, 1]);
    m.extend_from_slice(&src_mac);
    ipv6(((dst_mac, src_mac), (src, group)), 58, 255, m, 2)
}

/// A locally administered unicast MAC from a counter (distinct for every
/// `n`, never of the `0a:58` pod form).
pub fn junk_mac(n: u32) -> Mac {
    let b = n.to_be_bytes();
    [0x06, 0x66, b[0], b[1], b[2], b[3]]
}

/// Sends `datagram` to `to` from `ns` as fast as one thread can (batches of
/// 64 per `sendmmsg`) until `stop` is set; the thread returns how many went
/// out. Errors (a full buffer, an ICMP error) are ignored: a flood does not
/// care.
pub fn udp_flood(
    ns: &Netns,
    to: SocketAddr,
    datagram: Vec<u8>,
    stop: Arc<AtomicBool>,
) -> io::Result<std::thread::JoinHandle<u64>> {
    let bind: SocketAddr = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
        .parse()
        .map_err(|_| io::Error::other("address"))?;
    let sock = ns.udp_bind(bind)?;
    sock.connect(to)?;
    Ok(std::thread::spawn(move || {
        let mut data = datagram;
        let mut iov = libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: data.len(),
        };
        // SAFETY: plain old data; all-zero is valid.
        let mut msgs: Vec<libc::mmsghdr> = (0..64).map(|_| unsafe { std::mem::zeroed() }).collect();
        for m in &mut msgs {
            m.msg_hdr.msg_iov = &mut iov;
            m.msg_hdr.msg_iovlen = 1;
        }
        let mut sent = 0u64;
        while !stop.load(Ordering::Relaxed) {
            // SAFETY: every header points at `iov`, which points at `data`;
            // both outlive the call.
            let n = unsafe {
                libc::sendmmsg(
                    std::os::fd::AsRawFd::as_raw_fd(&sock),
                    msgs.as_mut_ptr(),
                    msgs.len() as u32,
                    0,
                )
            };
            if n > 0 {
                sent += n as u64;
            }
        }
        sent
    }))
}
