//! Views over Ethernet frames and the headers the overlay looks at, the
//! Internet checksum, and builders for the few frames the switch answers
//! itself (ARP replies, ICMP "too big").
//!
//! Every byte parsed here comes from an untrusted pod or peer, so parsers
//! bounds-check everything and return `None` on anything malformed: nothing
//! here panics or allocates. Header fields are decoded eagerly into small
//! `Copy` structs (a copy of a few bytes is cheaper than re-checking bounds on
//! every access); payloads stay borrowed.

use std::net::{Ipv4Addr, Ipv6Addr};

pub type Mac = [u8; 6];

pub const ETH_HLEN: usize = 14;
pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_ARP: u16 = 0x0806;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
pub const ETHERTYPE_VLAN: u16 = 0x8100;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

pub const ARP_REQUEST: u16 = 1;
pub const ARP_REPLY: u16 = 2;
/// Length of an Ethernet/IPv4 ARP packet.
pub const ARP_LEN: usize = 28;
pub const ICMPV6_ROUTER_SOLICIT: u8 = 133;
pub const ICMPV6_ROUTER_ADVERT: u8 = 134;
pub const ICMPV6_NEIGHBOR_SOLICIT: u8 = 135;
pub const ICMPV6_NEIGHBOR_ADVERT: u8 = 136;
pub const ICMPV6_REDIRECT: u8 = 137;
/// Neighbour discovery options (RFC 4861 4.6.1).
pub const ND_SOURCE_LLADDR: u8 = 1;
pub const ND_TARGET_LLADDR: u8 = 2;

pub const BROADCAST: Mac = [0xff; 6];

/// TTL / hop limit of the packets we originate (Linux's default).
const TTL: u8 = 64;
/// Bytes of the offending packet's payload quoted after its IPv4 header in
/// an ICMPv4 error: more than RFC 792's 8 so that the sender can match the
/// error to a connection even through tunnels and NAT.
pub const ICMPV4_QUOTE: usize = 64;
/// RFC 4443 2.4(c): an ICMPv6 error must not exceed the minimum IPv6 MTU.
const IPV6_MIN_MTU: usize = 1280;

/// Multicast bit (I/G); broadcast is a multicast address too.
pub fn is_multicast(mac: &Mac) -> bool {
    mac[0] & 1 == 1
}

pub fn is_broadcast(mac: &Mac) -> bool {
    *mac == BROADCAST
}

/// 01:80:c2:00:00:00–0f: IEEE 802.1D reserves these for the link itself
/// (STP, pause, LACP, LLDP, 802.1X); a bridge never forwards them, and a
/// tunnel that did would merge two spanning trees or pause a remote NIC.
pub fn is_link_local_group(mac: &Mac) -> bool {
    matches!(mac, [0x01, 0x80, 0xc2, 0, 0, last] if *last <= 0x0f)
}

/// The MAC a pod with this address has: the CNI plugin gives it through
/// `evio_plugin::naming::pod_mac`, which calls this (the one derivation;
/// the switch checks frames against it). `0a:58` (locally administered,
/// unicast) and the four address bytes, as OVN-Kubernetes does, so any node
/// can answer ARP for any pod.
pub const fn pod_mac(ip: Ipv4Addr) -> Mac {
    let [a, b, c, d] = ip.octets();
    [0x0a, 0x58, a, b, c, d]
}

/// The MAC a pod whose address is IPv6 has (the plugin's
/// `naming::pod_mac` calls this): `0a` and 40 bits of BLAKE2s over
/// the whole address. The low 32 bits alone repeat on every node (each
/// node's range starts at `::2`); a hash of all 128 collides only by chance,
/// about once in 2^20 pods (birthday bound). Never of the `0a:58` IPv4 form.
pub fn pod_mac_v6(ip: Ipv6Addr) -> Mac {
    use blake2::{Blake2s256, Digest};
    let h = Blake2s256::new()
        .chain_update(b"evio pod mac v6 ")
        .chain_update(ip.octets())
        .finalize();
    let first = if h[0] == 0x58 { 0xd8 } else { h[0] };
    [0x0a, first, h[1], h[2], h[3], h[4]]
}

/// `aa:bb:cc:dd:ee:ff`, as `ip link` prints a MAC.
pub fn fmt_mac(m: &Mac) -> String {
    let [a, b, c, d, e, f] = *m;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
}

/// The MAC [`fmt_mac`] printed (either case), as `ip link` and OVS's
/// `other_config:hwaddr` show it: the one parser of MAC text (the plugin and
/// the test kit use it too).
pub fn parse_mac(s: &str) -> Option<Mac> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut out {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// The address encoded in a pod MAC of the derived form, if it is one.
pub fn pod_mac_ipv4(mac: &Mac) -> Option<Ipv4Addr> {
    match *mac {
        [0x0a, 0x58, a, b, c, d] => Some(Ipv4Addr::new(a, b, c, d)),
        _ => None,
    }
}

fn array<const N: usize>(b: &[u8], at: usize) -> Option<[u8; N]> {
    b.get(at..)?.first_chunk().copied()
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    array(b, at).map(u16::from_be_bytes)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ethernet<'a> {
    pub dst: Mac,
    pub src: Mac,
    /// An 802.1Q/802.1ad tag is not looked through: its TPID (0x8100,
    /// 0x88a8) is the ethertype, so callers drop tagged frames. Pod ports are
    /// untagged; a tag from a pod is an attempt to hop VLANs.
    pub ethertype: u16,
    pub payload: &'a [u8],
}

impl<'a> Ethernet<'a> {
    pub fn parse(frame: &'a [u8]) -> Option<Self> {
        let (header, payload) = frame.split_first_chunk::<ETH_HLEN>()?;
        Some(Ethernet {
            dst: array(header, 0)?,
            src: array(header, 6)?,
            ethertype: be16(header, 12)?,
            payload,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4<'a> {
    /// The header with its options (IHL × 4 bytes).
    pub header: &'a [u8],
    /// Up to the total length: Ethernet padding is not part of it.
    pub payload: &'a [u8],
    pub dont_fragment: bool,
    pub more_fragments: bool,
    /// In 8-byte units.
    pub fragment_offset: u16,
    pub ttl: u8,
    pub protocol: u8,
    pub checksum: u16,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
}

impl<'a> Ipv4<'a> {
    /// Checks version 4, IHL ≥ 5 and IHL × 4 ≤ total length ≤ the buffer;
    /// the header checksum is left to [`Ipv4::header_checksum_ok`] because
    /// nothing on the switch's path depends on it.
    pub fn parse(packet: &'a [u8]) -> Option<Self> {
        let version_ihl = *packet.first()?;
        if version_ihl >> 4 != 4 {
            return None;
        }
        let header_len = usize::from(version_ihl & 0x0f) * 4;
        let total_len = usize::from(be16(packet, 2)?);
        if header_len < 20 || total_len < header_len {
            return None;
        }
        let (header, payload) = packet.get(..total_len)?.split_at_checked(header_len)?;
        let flags = be16(header, 6)?;
        Some(Ipv4 {
            header,
            payload,
            dont_fragment: flags & 0x4000 != 0,
            more_fragments: flags & 0x2000 != 0,
            fragment_offset: flags & 0x1fff,
            ttl: *header.get(8)?,
            protocol: *header.get(9)?,
            checksum: be16(header, 10)?,
            src: Ipv4Addr::from(array::<4>(header, 12)?),
            dst: Ipv4Addr::from(array::<4>(header, 16)?),
        })
    }

    pub fn total_len(&self) -> usize {
        self.header.len() + self.payload.len()
    }

    pub fn header_checksum_ok(&self) -> bool {
        checksum(self.header) == 0
    }

    /// Only the first fragment carries the transport header.
    pub fn is_first_fragment(&self) -> bool {
        self.fragment_offset == 0
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv6<'a> {
    /// The fixed 40-byte header.
    pub header: &'a [u8],
    /// Payload-length bytes (extension headers included): Ethernet padding
    /// is not part of it.
    pub payload: &'a [u8],
    /// Not walked: an extension header is reported as such and whatever it
    /// carries is opaque to the switch.
    pub next_header: u8,
    pub hop_limit: u8,
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
}

impl<'a> Ipv6<'a> {
    pub fn parse(packet: &'a [u8]) -> Option<Self> {
        if *packet.first()? >> 4 != 6 {
            return None;
        }
        let payload_len = usize::from(be16(packet, 4)?);
        let (header, rest) = packet.split_at_checked(40)?;
        Some(Ipv6 {
            header,
            payload: rest.get(..payload_len)?,
            next_header: *header.get(6)?,
            hop_limit: *header.get(7)?,
            src: Ipv6Addr::from(array::<16>(header, 8)?),
            dst: Ipv6Addr::from(array::<16>(header, 24)?),
        })
    }

    pub fn payload_len(&self) -> usize {
        self.payload.len()
    }

    /// The upper-layer protocol and its bytes, past hop-by-hop, routing and
    /// destination options headers (at most eight of them). A fragment
    /// header ends the walk: what it carries is opaque (and RFC 6980 has
    /// hosts ignore neighbour discovery in fragments). `None` for a chain
    /// that is truncated or too long.
    pub fn upper_layer(&self) -> Option<(u8, &'a [u8])> {
        let (mut next, mut rest) = (self.next_header, self.payload);
        for _ in 0..8 {
            if !matches!(next, 0 | 43 | 60) {
                return Some((next, rest));
            }
            let len = (usize::from(*rest.get(1)?) + 1) * 8;
            next = *rest.first()?;
            rest = rest.get(len..)?;
        }
        None
    }
}

/// An IP packet of either family, for callers that dispatch on the version
/// nibble (the host overlay's TUN has no ethertype).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ip<'a> {
    V4(Ipv4<'a>),
    V6(Ipv6<'a>),
}

impl<'a> Ip<'a> {
    pub fn parse(packet: &'a [u8]) -> Option<Self> {
        match *packet.first()? >> 4 {
            4 => Ipv4::parse(packet).map(Ip::V4),
            6 => Ipv6::parse(packet).map(Ip::V6),
            _ => None,
        }
    }

    pub fn src(&self) -> std::net::IpAddr {
        match self {
            Ip::V4(ip) => ip.src.into(),
            Ip::V6(ip) => ip.src.into(),
        }
    }

    pub fn dst(&self) -> std::net::IpAddr {
        match self {
            Ip::V4(ip) => ip.dst.into(),
            Ip::V6(ip) => ip.dst.into(),
        }
    }

    /// The transport protocol number and the bytes after the IP header, when
    /// they start with a transport header: not for IPv4 non-first fragments.
    /// For IPv6 this is the first next header, extension headers included.
    pub fn transport(&self) -> Option<(u8, &'a [u8])> {
        match self {
            Ip::V4(ip) => ip.is_first_fragment().then_some((ip.protocol, ip.payload)),
            Ip::V6(ip) => Some((ip.next_header, ip.payload)),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Udp<'a> {
    pub src_port: u16,
    pub dst_port: u16,
    /// As written by the sender; not checked against the slice because a
    /// GSO super-frame's UDP length describes one segment.
    pub length: u16,
    pub checksum: u16,
    pub payload: &'a [u8],
}

impl<'a> Udp<'a> {
    pub fn parse(segment: &'a [u8]) -> Option<Self> {
        let (header, payload) = segment.split_first_chunk::<8>()?;
        Some(Udp {
            src_port: be16(header, 0)?,
            dst_port: be16(header, 2)?,
            length: be16(header, 4)?,
            checksum: be16(header, 6)?,
            payload,
        })
    }
}

/// ICMPv4 and ICMPv6 share the first four bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Icmp<'a> {
    pub ty: u8,
    pub code: u8,
    pub checksum: u16,
    /// Everything after type, code and checksum.
    pub body: &'a [u8],
}

impl<'a> Icmp<'a> {
    pub fn parse(message: &'a [u8]) -> Option<Self> {
        let (header, body) = message.split_first_chunk::<4>()?;
        Some(Icmp {
            ty: header[0],
            code: header[1],
            checksum: be16(header, 2)?,
            body,
        })
    }

    /// RFC 1122 3.2.2: destination unreachable, source quench, redirect,
    /// time exceeded, parameter problem.
    pub fn is_v4_error(&self) -> bool {
        matches!(self.ty, 3 | 4 | 5 | 11 | 12)
    }

    /// RFC 4443 2.1: types below 128 are errors.
    pub fn is_v6_error(&self) -> bool {
        self.ty < 128
    }

    /// The target address of an ICMPv6 neighbour solicitation.
    pub fn ns_target(&self) -> Option<Ipv6Addr> {
        if self.ty != ICMPV6_NEIGHBOR_SOLICIT || self.code != 0 {
            return None;
        }
        array::<16>(self.body, 4).map(Ipv6Addr::from)
    }

    /// A neighbour solicitation or advertisement: its target and the
    /// link-layer address option of the given type, if present. `None` for
    /// any other message, a code other than 0, a truncated target or an
    /// option of length 0 (RFC 4861 7.1.1 and 7.1.2: such messages are
    /// invalid). A link-layer option that is not 6 bytes of address (8 in
    /// all) is refused too: Ethernet is the only link here.
    pub fn nd(&self, option: u8) -> Option<(Ipv6Addr, Option<Mac>)> {
        if !matches!(self.ty, ICMPV6_NEIGHBOR_SOLICIT | ICMPV6_NEIGHBOR_ADVERT) || self.code != 0 {
            return None;
        }
        let target = Ipv6Addr::from(array::<16>(self.body, 4)?);
        let mut opts = self.body.get(20..)?;
        let mut lladdr = None;
        while !opts.is_empty() {
            let ty = *opts.first()?;
            let len = usize::from(*opts.get(1)?) * 8;
            if len == 0 {
                return None;
            }
            let (this, rest) = opts.split_at_checked(len)?;
            if ty == option {
                if len != 8 || lladdr.is_some() {
                    return None;
                }
                lladdr = Some(array::<6>(this, 2)?);
            }
            opts = rest;
        }
        Some((target, lladdr))
    }
}

/// An ARP packet for IPv4 over Ethernet, the only kind the overlay carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arp {
    pub op: u16,
    pub sender_mac: Mac,
    pub sender_ip: Ipv4Addr,
    pub target_mac: Mac,
    pub target_ip: Ipv4Addr,
}

impl Arp {
    pub fn parse(payload: &[u8]) -> Option<Self> {
        let p = payload.first_chunk::<ARP_LEN>()?;
        let ethernet_ipv4 =
            be16(p, 0)? == 1 && be16(p, 2)? == ETHERTYPE_IPV4 && p[4] == 6 && p[5] == 4;
        if !ethernet_ipv4 {
            return None;
        }
        Some(Arp {
            op: be16(p, 6)?,
            sender_mac: array(p, 8)?,
            sender_ip: Ipv4Addr::from(array::<4>(p, 14)?),
            target_mac: array(p, 18)?,
            target_ip: Ipv4Addr::from(array::<4>(p, 24)?),
        })
    }
}

/// Sequential writes into a caller's buffer that fail instead of panicking
/// when it is too small.
struct Writer<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl<'a> Writer<'a> {
    fn new(buf: &'a mut [u8]) -> Self {
        Writer { buf, len: 0 }
    }

    fn put(&mut self, bytes: &[u8]) -> Option<&mut Self> {
        let end = self.len.checked_add(bytes.len())?;
        self.buf.get_mut(self.len..end)?.copy_from_slice(bytes);
        self.len = end;
        Some(self)
    }

    fn u8(&mut self, v: u8) -> Option<&mut Self> {
        self.put(&[v])
    }

    fn u16(&mut self, v: u16) -> Option<&mut Self> {
        self.put(&v.to_be_bytes())
    }

    fn u32(&mut self, v: u32) -> Option<&mut Self> {
        self.put(&v.to_be_bytes())
    }

    fn written(&self, from: usize) -> Option<&[u8]> {
        self.buf.get(from..self.len)
    }

    fn patch16(&mut self, at: usize, v: u16) -> Option<()> {
        self.buf
            .get_mut(at..at.checked_add(2)?)?
            .copy_from_slice(&v.to_be_bytes());
        Some(())
    }
}

/// Writes the answer to ARP request `request`: "`request.target_ip` is at
/// `mac`", from `mac` to the requester. Returns the frame's length, `None`
/// when `out` is too small.
pub fn build_arp_reply(out: &mut [u8], request: &Arp, mac: Mac) -> Option<usize> {
    let mut w = Writer::new(out);
    w.put(&request.sender_mac)?.put(&mac)?.u16(ETHERTYPE_ARP)?;
    w.u16(1)?
        .u16(ETHERTYPE_IPV4)?
        .u8(6)?
        .u8(4)?
        .u16(ARP_REPLY)?;
    w.put(&mac)?.put(&request.target_ip.octets())?;
    w.put(&request.sender_mac)?
        .put(&request.sender_ip.octets())?;
    Some(w.len)
}

/// Adds `b` to the one's complement accumulator `a` (end-around carry), so
/// accumulators never overflow whatever they are fed.
#[inline]
pub(crate) fn ones_add(a: u64, b: u64) -> u64 {
    let (s, carry) = a.overflowing_add(b);
    s + u64::from(carry)
}

/// Adds `data` to a running one's-complement sum (RFC 1071) of big-endian
/// 16-bit words. An odd final byte is padded with zero, so when a sum is
/// chained over several slices every slice but the last must have an even
/// length. Eight bytes at a time with an end-around carry: 2^64 − 1 is a
/// multiple of 2^16 − 1, so [`checksum_fold`] still yields the 16-bit sum.
pub fn checksum_add(sum: u64, data: &[u8]) -> u64 {
    let mut acc = sum;
    let mut rest = data;
    while let Some((word, tail)) = rest.split_first_chunk::<8>() {
        acc = ones_add(acc, u64::from_be_bytes(*word));
        rest = tail;
    }
    if !rest.is_empty() {
        let mut last = [0u8; 8];
        last[..rest.len()].copy_from_slice(rest);
        acc = ones_add(acc, u64::from_be_bytes(last));
    }
    acc
}

/// Folds a running sum into 16 bits, not complemented: what goes into the
/// checksum field of a CHECKSUM_PARTIAL packet (the pseudo-header sum).
/// A fixed number of steps rather than a loop: this runs per segment.
pub fn checksum_fold(sum: u64) -> u16 {
    let s = (sum & 0xffff_ffff) + (sum >> 32); // < 2^33
    let s = (s & 0xffff) + (s >> 16); // < 2^17 + 2^16
    let s = (s & 0xffff) + (s >> 16); // <= 0xffff + 2
    let s = (s & 0xffff) + (s >> 16); // <= 0xffff
    s as u16
}

/// The value for a checksum field: the complemented folded sum.
pub fn checksum_finish(sum: u64) -> u16 {
    !checksum_fold(sum)
}

/// The Internet checksum of `data`; over data that includes a correct
/// checksum field it is 0.
pub fn checksum(data: &[u8]) -> u16 {
    checksum_finish(checksum_add(0, data))
}

/// Sum of the TCP/UDP pseudo-header: `src` and `dst` are the 4- or 16-byte
/// addresses as they appear in the IP header, `len` the L4 length.
pub fn pseudo_header_sum(src: &[u8], dst: &[u8], proto: u8, len: u32) -> u64 {
    // The zero byte and the protocol form one 16-bit word; the length's two
    // halves are congruent to the length itself modulo 0xffff.
    let sum = checksum_add(checksum_add(0, src), dst);
    ones_add(ones_add(sum, u64::from(proto)), u64::from(len))
}

/// The IPv4 pseudo-header's share of a TCP/UDP checksum; `len` is the
/// transport length (header and payload).
pub fn pseudo_header_v4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, len: u16) -> u64 {
    pseudo_header_sum(&src.octets(), &dst.octets(), protocol, u32::from(len))
}

/// The IPv6 pseudo-header's share of a TCP/UDP/ICMPv6 checksum (RFC 8200
/// 8.1); `len` is the upper-layer length.
pub fn pseudo_header_v6(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, len: u32) -> u64 {
    pseudo_header_sum(&src.octets(), &dst.octets(), next_header, len)
}

/// RFC 1122 3.2.2 and RFC 4443 2.4(e): no ICMP error about a frame sent to
/// a group (a storm of answers) or from one (nobody to tell).
fn may_answer(eth: &Ethernet) -> bool {
    !is_multicast(&eth.dst) && !is_multicast(&eth.src)
}

/// Addresses that can be both the source of the offending packet and the
/// destination of our answer, and vice versa.
fn unicast_v4(ip: Ipv4Addr) -> bool {
    !(ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() || ip.is_loopback())
}

fn unicast_v6(ip: Ipv6Addr) -> bool {
    !(ip.is_unspecified() || ip.is_multicast() || ip.is_loopback())
}

/// The length of an IPv4 header without options.
pub const IPV4_HLEN: usize = 20;
/// The length of the fixed IPv6 header.
pub const IPV6_HLEN: usize = 40;

/// An IPv4 header without options for a packet we originate (TTL [`TTL`],
/// identification 0, no fragment flags), its checksum filled in. `None` when
/// `l4_len` does not fit the total length field.
pub fn ipv4_header(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    tos: u8,
    l4_len: usize,
) -> Option<[u8; IPV4_HLEN]> {
    let total = u16::try_from(IPV4_HLEN + l4_len).ok()?;
    let mut h = [0u8; IPV4_HLEN];
    let [t0, t1] = total.to_be_bytes();
    h[..4].copy_from_slice(&[0x45, tos, t0, t1]);
    h[8] = TTL;
    h[9] = protocol;
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    let sum = checksum(&h);
    h[10..12].copy_from_slice(&sum.to_be_bytes());
    Some(h)
}

/// An Ethernet frame carrying the IPv4 packet `l4` from pod `src` to pod
/// `dst` (their derived MACs), as a pod would send it: what tests and
/// benchmarks feed the data path, which itself never builds one.
pub fn pod_ipv4_frame(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, l4: &[u8]) -> Option<Vec<u8>> {
    let mut f = Vec::with_capacity(ETH_HLEN + IPV4_HLEN + l4.len());
    f.extend_from_slice(&pod_mac(dst));
    f.extend_from_slice(&pod_mac(src));
    f.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    f.extend_from_slice(&ipv4_header(src, dst, protocol, 0, l4.len())?);
    f.extend_from_slice(l4);
    Some(f)
}

fn ethernet_reply(w: &mut Writer, eth: &Ethernet) -> Option<()> {
    w.put(&eth.src)?.put(&eth.dst)?.u16(eth.ethertype)?;
    Some(())
}

/// Answers the IPv4 packet in `frame` with ICMP "fragmentation needed"
/// (type 3 code 4, RFC 1191 next-hop MTU `mtu`), as if the packet's
/// destination had sent it: Ethernet and IP addresses swapped, so that the
/// sender's stack accepts it from the neighbour it was talking to. The body
/// quotes the IP header and [`ICMPV4_QUOTE`] bytes. `None` when the packet
/// must not be answered (an ICMP error, a non-first fragment, a group or
/// unspecified address on either side) or `out` is too small.
pub fn build_icmpv4_frag_needed(frame: &[u8], mtu: u16, out: &mut [u8]) -> Option<usize> {
    let eth = Ethernet::parse(frame)?;
    if eth.ethertype != ETHERTYPE_IPV4 || !may_answer(&eth) {
        return None;
    }
    let ip = Ipv4::parse(eth.payload)?;
    if !ip.is_first_fragment() || !unicast_v4(ip.src) || !unicast_v4(ip.dst) {
        return None;
    }
    // A truncated ICMP header can't be told apart from an error: stay silent.
    if ip.protocol == IPPROTO_ICMP && Icmp::parse(ip.payload).is_none_or(|m| m.is_v4_error()) {
        return None;
    }
    let quote = eth
        .payload
        .get(..ip.header.len() + ip.payload.len().min(ICMPV4_QUOTE))?;
    let icmp_len = 8 + quote.len();

    let mut w = Writer::new(out);
    ethernet_reply(&mut w, &eth)?;
    // Precedence "internetwork control", as Linux marks its ICMP errors, so
    // that a QoS-aware queue keeps the signal that unblocks the flow.
    w.put(&ipv4_header(ip.dst, ip.src, IPPROTO_ICMP, 0xc0, icmp_len)?)?;
    w.u8(3)?.u8(4)?.u16(0)?.u16(0)?.u16(mtu)?.put(quote)?;

    let icmp_start = ETH_HLEN + IPV4_HLEN;
    let icmp_sum = checksum(w.written(icmp_start)?);
    w.patch16(icmp_start + 2, icmp_sum)?;
    Some(w.len)
}

/// Answers the IPv6 packet in `frame` with ICMPv6 "packet too big" (type 2,
/// MTU `mtu`), from the packet's destination to its source like
/// [`build_icmpv4_frag_needed`], quoting as much of the packet as keeps the
/// answer within 1280 bytes (RFC 4443 3.2). `None` when the packet must not
/// be answered (an ICMPv6 error, a multicast or unspecified address on
/// either side) or `out` is too small. An ICMPv6 error behind extension
/// headers is not recognised: those are opaque here.
pub fn build_icmpv6_packet_too_big(frame: &[u8], mtu: u32, out: &mut [u8]) -> Option<usize> {
    let eth = Ethernet::parse(frame)?;
    if eth.ethertype != ETHERTYPE_IPV6 || !may_answer(&eth) {
        return None;
    }
    let ip = Ipv6::parse(eth.payload)?;
    if !unicast_v6(ip.src) || !unicast_v6(ip.dst) {
        return None;
    }
    if ip.next_header == IPPROTO_ICMPV6 && Icmp::parse(ip.payload).is_none_or(|m| m.is_v6_error()) {
        return None;
    }
    let packet_len = ip.header.len() + ip.payload.len();
    let quote = eth.payload.get(..packet_len.min(IPV6_MIN_MTU - 40 - 8))?;
    let icmp_len = 8 + quote.len();
    let payload_len = u16::try_from(icmp_len).ok()?;

    let mut w = Writer::new(out);
    ethernet_reply(&mut w, &eth)?;
    w.u32(6 << 28)?
        .u16(payload_len)?
        .u8(IPPROTO_ICMPV6)?
        .u8(TTL)?;
    w.put(&ip.dst.octets())?.put(&ip.src.octets())?;
    w.u8(2)?.u8(0)?.u16(0)?.u32(mtu)?.put(quote)?;

    let icmp_start = ETH_HLEN + IPV6_HLEN;
    let pseudo = pseudo_header_v6(ip.dst, ip.src, IPPROTO_ICMPV6, u32::from(payload_len));
    let sum = checksum_finish(checksum_add(pseudo, w.written(icmp_start)?));
    w.patch16(icmp_start + 2, sum)?;
    Some(w.len)
}

/// Frame builders for tests (here and in `l2`): plain, allocating, correct.
#[cfg(test)]
pub(crate) mod build {
    use super::*;

    pub fn eth(dst: Mac, src: Mac, ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::with_capacity(ETH_HLEN + payload.len());
        f.extend_from_slice(&dst);
        f.extend_from_slice(&src);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, df: bool, payload: &[u8]) -> Vec<u8> {
        let total = (20 + payload.len()) as u16;
        let mut p = vec![0x45, 0];
        p.extend_from_slice(&total.to_be_bytes());
        p.extend_from_slice(&[0x12, 0x34]);
        p.extend_from_slice(&(if df { 0x4000u16 } else { 0 }).to_be_bytes());
        p.extend_from_slice(&[64, protocol, 0, 0]);
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        let sum = checksum(&p);
        p[10..12].copy_from_slice(&sum.to_be_bytes());
        p.extend_from_slice(payload);
        p
    }

    pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0];
        p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        p.extend_from_slice(&[next_header, 64]);
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(payload);
        p
    }

    pub fn udp(src_port: u16, dst_port: u16, payload: &[u8]) -> Vec<u8> {
        let mut s = Vec::new();
        s.extend_from_slice(&src_port.to_be_bytes());
        s.extend_from_slice(&dst_port.to_be_bytes());
        s.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        s.extend_from_slice(&[0, 0]);
        s.extend_from_slice(payload);
        s
    }

    /// An ICMP message with a zero checksum (the switch doesn't check it).
    pub fn icmp(ty: u8, code: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![ty, code, 0, 0];
        m.extend_from_slice(body);
        m
    }

    pub fn neighbor_solicit(target: Ipv6Addr) -> Vec<u8> {
        let mut body = vec![0; 4];
        body.extend_from_slice(&target.octets());
        icmp(ICMPV6_NEIGHBOR_SOLICIT, 0, &body)
    }

    pub fn arp(op: u16, sender: (Mac, Ipv4Addr), target: (Mac, Ipv4Addr)) -> Vec<u8> {
        let mut p = vec![0, 1, 0x08, 0, 6, 4];
        p.extend_from_slice(&op.to_be_bytes());
        p.extend_from_slice(&sender.0);
        p.extend_from_slice(&sender.1.octets());
        p.extend_from_slice(&target.0);
        p.extend_from_slice(&target.1.octets());
        p
    }
}

#[cfg(test)]
mod tests {
    use super::build::*;
    use super::*;
    use proptest::prelude::*;

    const A: Mac = [0x0a, 0x58, 10, 244, 3, 2];
    const B: Mac = [0x0a, 0x58, 10, 244, 5, 7];

    fn v4(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn v6(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    /// RFC 1071 literally: 16-bit words into a wide accumulator.
    fn reference_checksum(data: &[u8]) -> u16 {
        let mut sum: u64 = data
            .chunks(2)
            .map(|c| u64::from(c[0]) << 8 | u64::from(*c.get(1).unwrap_or(&0)))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    #[test]
    fn checksum_matches_rfc1071_example() {
        // RFC 1071 section 3: the sum of these words is ddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum_fold(checksum_add(0, &data)), 0xddf2);
        assert_eq!(checksum(&data), !0xddf2);
        assert_eq!(checksum(&[]), 0xffff);
        assert_eq!(checksum(&[0xab]), !0xab00);
    }

    #[test]
    fn checksum_verifies_to_zero_over_its_own_field() {
        let p = ipv4(
            v4("10.244.3.2"),
            v4("10.244.5.7"),
            IPPROTO_UDP,
            true,
            &[1, 2, 3],
        );
        let ip = Ipv4::parse(&p).unwrap();
        assert!(ip.header_checksum_ok());
        let mut bad = p.clone();
        bad[8] = 63;
        assert!(!Ipv4::parse(&bad).unwrap().header_checksum_ok());
    }

    #[test]
    fn pseudo_header_sums_match_the_bytes_they_stand_for() {
        let (s, d) = (v4("10.244.3.2"), v4("192.0.2.1"));
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&s.octets());
        bytes.extend_from_slice(&d.octets());
        bytes.extend_from_slice(&[0, IPPROTO_UDP, 0x05, 0xdc]);
        assert_eq!(
            checksum_fold(pseudo_header_v4(s, d, IPPROTO_UDP, 1500)),
            checksum_fold(checksum_add(0, &bytes))
        );

        let (s, d) = (v6("fd00::1"), v6("fd00::abcd:2"));
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&s.octets());
        bytes.extend_from_slice(&d.octets());
        bytes.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, IPPROTO_ICMPV6]);
        assert_eq!(
            checksum_fold(pseudo_header_v6(s, d, IPPROTO_ICMPV6, 65536)),
            checksum_fold(checksum_add(0, &bytes))
        );
    }

    #[test]
    fn mac_helpers() {
        assert!(is_multicast(&BROADCAST) && is_broadcast(&BROADCAST));
        assert!(is_multicast(&[0x33, 0x33, 0xff, 0, 0, 1]));
        assert!(!is_multicast(&A) && !is_broadcast(&A));
        assert!(is_link_local_group(&[0x01, 0x80, 0xc2, 0, 0, 0]));
        assert!(is_link_local_group(&[0x01, 0x80, 0xc2, 0, 0, 0x0e]));
        assert!(!is_link_local_group(&[0x01, 0x80, 0xc2, 0, 0, 0x10]));
        assert!(!is_link_local_group(&[0x01, 0x80, 0xc2, 0, 1, 0]));

        assert_eq!(pod_mac(v4("10.244.3.2")), A);
        assert_eq!(pod_mac_ipv4(&A), Some(v4("10.244.3.2")));
        assert_eq!(pod_mac_ipv4(&[0x0a, 0x59, 1, 2, 3, 4]), None);
        assert_eq!(pod_mac_ipv4(&BROADCAST), None);

        assert_eq!(fmt_mac(&A), "0a:58:0a:f4:03:02");
        assert_eq!(parse_mac("0a:58:0A:f4:03:02"), Some(A));
        for bad in [
            "",
            "0a:58:0a:f4:03",
            "0a:58:0a:f4:03:02:01",
            "0a:58:0a:f4:03:2",
            "zz:58:0a:f4:03:02",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }

    #[test]
    fn ethernet_reports_a_vlan_tag_as_the_ethertype() {
        let f = eth(B, A, ETHERTYPE_VLAN, &[0, 5, 0x08, 0]);
        let e = Ethernet::parse(&f).unwrap();
        assert_eq!((e.dst, e.src, e.ethertype), (B, A, ETHERTYPE_VLAN));
        assert_eq!(e.payload, &[0, 5, 0x08, 0]);
        assert!(Ethernet::parse(&f[..13]).is_none());
        assert!(Ethernet::parse(&f[..14]).unwrap().payload.is_empty());
    }

    #[test]
    fn ipv4_parse_checks_version_lengths_and_excludes_padding() {
        let p = ipv4(
            v4("10.244.3.2"),
            v4("10.244.5.7"),
            IPPROTO_UDP,
            true,
            &[7; 10],
        );
        let ip = Ipv4::parse(&p).unwrap();
        assert_eq!(
            (ip.src, ip.dst, ip.protocol, ip.ttl),
            (v4("10.244.3.2"), v4("10.244.5.7"), 17, 64)
        );
        assert!(ip.dont_fragment && !ip.more_fragments && ip.is_first_fragment());
        assert_eq!(
            (ip.header.len(), ip.payload.len(), ip.total_len()),
            (20, 10, 30)
        );

        let mut padded = p.clone();
        padded.extend_from_slice(&[0; 16]);
        assert_eq!(Ipv4::parse(&padded).unwrap().payload.len(), 10);

        let mut bad = p.clone();
        bad[0] = 0x65; // version 6
        assert!(Ipv4::parse(&bad).is_none());
        bad[0] = 0x44; // IHL 4
        assert!(Ipv4::parse(&bad).is_none());
        bad[0] = 0x4f; // IHL 15 (60 bytes) > total length 30
        assert!(Ipv4::parse(&bad).is_none());
        assert!(
            Ipv4::parse(&p[..29]).is_none(),
            "total length beyond the buffer"
        );
        let mut frag = p.clone();
        frag[6..8].copy_from_slice(&0x2003u16.to_be_bytes());
        let ip = Ipv4::parse(&frag).unwrap();
        assert!(ip.more_fragments && !ip.dont_fragment && ip.fragment_offset == 3);
        assert_eq!(Ip::V4(ip).transport(), None);
    }

    #[test]
    fn ipv6_parse_checks_the_payload_length() {
        let p = ipv6(v6("fd00::1"), v6("ff02::1"), IPPROTO_UDP, &[1; 12]);
        let ip = Ipv6::parse(&p).unwrap();
        assert_eq!(
            (ip.src, ip.dst, ip.next_header, ip.hop_limit),
            (v6("fd00::1"), v6("ff02::1"), 17, 64)
        );
        assert_eq!(ip.payload_len(), 12);
        assert!(Ipv6::parse(&p[..51]).is_none());
        assert!(Ipv4::parse(&p).is_none() && Ip::parse(&p).is_some());
        assert_eq!(Ip::parse(&p).unwrap().transport(), Some((17, &p[40..])));
        assert!(Ip::parse(&[0x50; 40]).is_none());
    }

    #[test]
    fn transport_headers() {
        let u = udp(68, 67, &[9; 3]);
        let u = Udp::parse(&u).unwrap();
        assert_eq!(
            (u.src_port, u.dst_port, u.length, u.payload),
            (68, 67, 11, &[9u8; 3][..])
        );
        assert!(Udp::parse(&[0; 7]).is_none());

        let ns = neighbor_solicit(v6("fd00::7:2"));
        let m = Icmp::parse(&ns).unwrap();
        assert_eq!(m.ns_target(), Some(v6("fd00::7:2")));
        assert!(!m.is_v6_error());
        assert_eq!(Icmp::parse(&ns[..23]).unwrap().ns_target(), None);
        assert_eq!(
            Icmp::parse(&icmp(136, 0, &[0; 20])).unwrap().ns_target(),
            None
        );
        assert!(Icmp::parse(&icmp(3, 1, &[])).unwrap().is_v4_error());
        assert!(!Icmp::parse(&icmp(8, 0, &[])).unwrap().is_v4_error());
        assert!(Icmp::parse(&[1, 2, 3]).is_none());
    }

    #[test]
    fn arp_reply_parses_back_as_the_answer() {
        let req = arp(
            ARP_REQUEST,
            (A, v4("10.244.3.2")),
            ([0; 6], v4("10.244.5.7")),
        );
        let req = Arp::parse(&req).unwrap();
        assert_eq!(req.op, ARP_REQUEST);
        let mut out = [0u8; 64];
        let n = build_arp_reply(&mut out, &req, B).unwrap();
        assert_eq!(n, ETH_HLEN + ARP_LEN);
        let e = Ethernet::parse(&out[..n]).unwrap();
        assert_eq!((e.dst, e.src, e.ethertype), (A, B, ETHERTYPE_ARP));
        let rep = Arp::parse(e.payload).unwrap();
        assert_eq!(
            rep,
            Arp {
                op: ARP_REPLY,
                sender_mac: B,
                sender_ip: v4("10.244.5.7"),
                target_mac: A,
                target_ip: v4("10.244.3.2")
            }
        );
        assert!(build_arp_reply(&mut out[..41], &req, B).is_none());
    }

    #[test]
    fn arp_parse_refuses_other_hardware_and_protocols() {
        let good = arp(ARP_REPLY, (A, v4("10.0.0.1")), (B, v4("10.0.0.2")));
        assert!(Arp::parse(&good).is_some());
        assert!(Arp::parse(&good[..27]).is_none());
        for (at, v) in [(1, 6), (2, 0x86), (4, 8), (5, 16)] {
            let mut bad = good.clone();
            bad[at] = v;
            assert!(Arp::parse(&bad).is_none(), "byte {at} = {v}");
        }
    }

    fn oversized_v4(protocol: u8, payload: &[u8]) -> Vec<u8> {
        eth(
            B,
            A,
            ETHERTYPE_IPV4,
            &ipv4(v4("10.244.3.2"), v4("10.244.5.7"), protocol, true, payload),
        )
    }

    #[test]
    fn frag_needed_is_addressed_back_and_checksummed() {
        let frame = oversized_v4(IPPROTO_TCP, &[0x5a; 1480]);
        let mut out = [0u8; 1600];
        let n = build_icmpv4_frag_needed(&frame, 1380, &mut out).unwrap();
        assert_eq!(n, 14 + 20 + 8 + 20 + ICMPV4_QUOTE);
        let e = Ethernet::parse(&out[..n]).unwrap();
        assert_eq!((e.dst, e.src), (A, B));
        let ip = Ipv4::parse(e.payload).unwrap();
        assert!(ip.header_checksum_ok());
        assert_eq!(
            (ip.src, ip.dst, ip.ttl, ip.protocol),
            (v4("10.244.5.7"), v4("10.244.3.2"), 64, 1)
        );
        assert_eq!(checksum(ip.payload), 0);
        let m = Icmp::parse(ip.payload).unwrap();
        assert_eq!((m.ty, m.code), (3, 4));
        assert_eq!(&m.body[..4], &[0, 0, 0x05, 0x64]);
        assert_eq!(&m.body[4..], &frame[14..14 + 20 + ICMPV4_QUOTE]);
    }

    #[test]
    fn frag_needed_quotes_short_packets_whole() {
        let frame = oversized_v4(IPPROTO_UDP, &[1; 10]);
        let mut out = [0u8; 1600];
        let n = build_icmpv4_frag_needed(&frame, 1380, &mut out).unwrap();
        assert_eq!(n, 14 + 20 + 8 + 30);
        assert!(build_icmpv4_frag_needed(&frame, 1380, &mut out[..n - 1]).is_none());
    }

    #[test]
    fn no_icmp_error_about_errors_groups_or_fragments() {
        let mut out = [0u8; 1600];
        let unreachable = icmp(3, 1, &[0; 100]);
        assert!(build_icmpv4_frag_needed(
            &oversized_v4(IPPROTO_ICMP, &unreachable),
            1380,
            &mut out
        )
        .is_none());
        assert!(
            build_icmpv4_frag_needed(&oversized_v4(IPPROTO_ICMP, &[8]), 1380, &mut out).is_none()
        );
        let echo = icmp(8, 0, &[0; 100]);
        assert!(
            build_icmpv4_frag_needed(&oversized_v4(IPPROTO_ICMP, &echo), 1380, &mut out).is_some()
        );

        let mut to_group = oversized_v4(IPPROTO_UDP, &[0; 100]);
        to_group[..6].copy_from_slice(&BROADCAST);
        assert!(build_icmpv4_frag_needed(&to_group, 1380, &mut out).is_none());
        for (src, dst) in [
            ("0.0.0.0", "10.0.0.1"),
            ("10.0.0.1", "224.0.0.251"),
            ("10.0.0.1", "255.255.255.255"),
        ] {
            let f = eth(
                B,
                A,
                ETHERTYPE_IPV4,
                &ipv4(v4(src), v4(dst), IPPROTO_UDP, true, &[0; 100]),
            );
            assert!(
                build_icmpv4_frag_needed(&f, 1380, &mut out).is_none(),
                "{src} -> {dst}"
            );
        }
        let mut frag = oversized_v4(IPPROTO_UDP, &[0; 100]);
        frag[14 + 6..14 + 8].copy_from_slice(&0x4010u16.to_be_bytes());
        assert!(build_icmpv4_frag_needed(&frag, 1380, &mut out).is_none());
        let v6 = eth(
            B,
            A,
            ETHERTYPE_IPV6,
            &ipv6(v6("fd00::1"), v6("fd00::2"), IPPROTO_UDP, &[0; 8]),
        );
        assert!(build_icmpv4_frag_needed(&v6, 1380, &mut out).is_none());
    }

    #[test]
    fn packet_too_big_fits_the_minimum_mtu_and_checksums_with_the_pseudo_header() {
        let (s, d) = (v6("fd00::3:2"), v6("fd00::5:7"));
        let frame = eth(
            B,
            A,
            ETHERTYPE_IPV6,
            &ipv6(s, d, IPPROTO_TCP, &[0x5a; 1460]),
        );
        let mut out = [0u8; 1600];
        let n = build_icmpv6_packet_too_big(&frame, 1380, &mut out).unwrap();
        assert_eq!(n, 14 + 1280);
        let e = Ethernet::parse(&out[..n]).unwrap();
        assert_eq!((e.dst, e.src, e.ethertype), (A, B, ETHERTYPE_IPV6));
        let ip = Ipv6::parse(e.payload).unwrap();
        assert_eq!(
            (ip.src, ip.dst, ip.next_header, ip.hop_limit),
            (d, s, IPPROTO_ICMPV6, 64)
        );
        let pseudo = pseudo_header_v6(ip.src, ip.dst, IPPROTO_ICMPV6, ip.payload.len() as u32);
        assert_eq!(checksum_finish(checksum_add(pseudo, ip.payload)), 0);
        let m = Icmp::parse(ip.payload).unwrap();
        assert_eq!((m.ty, m.code), (2, 0));
        assert_eq!(&m.body[..4], &1380u32.to_be_bytes());
        assert_eq!(&m.body[4..], &frame[14..14 + 1232]);
    }

    #[test]
    fn no_packet_too_big_about_errors_or_groups() {
        let mut out = [0u8; 1600];
        let f = |src: &str, dst: &str, nh: u8, payload: &[u8]| {
            eth(B, A, ETHERTYPE_IPV6, &ipv6(v6(src), v6(dst), nh, payload))
        };
        let err = icmp(1, 0, &[0; 1400]);
        assert!(
            build_icmpv6_packet_too_big(&f("fd00::1", "fd00::2", 58, &err), 1380, &mut out)
                .is_none()
        );
        let echo = icmp(128, 0, &[0; 1400]);
        assert!(
            build_icmpv6_packet_too_big(&f("fd00::1", "fd00::2", 58, &echo), 1380, &mut out)
                .is_some()
        );
        assert!(
            build_icmpv6_packet_too_big(&f("::", "fd00::2", 17, &[0; 1400]), 1380, &mut out)
                .is_none()
        );
        assert!(build_icmpv6_packet_too_big(
            &f("fd00::1", "ff02::1", 17, &[0; 1400]),
            1380,
            &mut out
        )
        .is_none());
        assert!(build_icmpv6_packet_too_big(
            &f("fd00::1", "fd00::2", 17, &[0; 1400]),
            1380,
            &mut out[..1000]
        )
        .is_none());
    }

    proptest! {
        #[test]
        fn checksum_equals_rfc1071_reference(data in proptest::collection::vec(any::<u8>(), 0..300), split in 0usize..150) {
            prop_assert_eq!(checksum(&data), reference_checksum(&data));
            // Chaining over an even-length prefix gives the same sum.
            let at = (split * 2).min(data.len() & !1);
            let chained = checksum_finish(checksum_add(checksum_add(0, &data[..at]), &data[at..]));
            prop_assert_eq!(chained, reference_checksum(&data));
        }

        #[test]
        fn parsers_and_builders_never_panic(data in proptest::collection::vec(any::<u8>(), 0..1600), mtu in any::<u16>()) {
            let mut out = [0u8; 1600];
            if let Some(e) = Ethernet::parse(&data) {
                let _ = (Ipv4::parse(e.payload), Ipv6::parse(e.payload), Arp::parse(e.payload));
            }
            if let Some(ip) = Ip::parse(&data) {
                if let Some((_, l4)) = ip.transport() {
                    let _ = (Udp::parse(l4), Icmp::parse(l4).and_then(|m| m.ns_target()));
                }
            }
            if let Some(req) = Arp::parse(&data) {
                let _ = build_arp_reply(&mut out[..usize::from(mtu) % 64], &req, A);
            }
            let _ = build_icmpv4_frag_needed(&data, mtu, &mut out);
            let _ = build_icmpv6_packet_too_big(&data, u32::from(mtu), &mut out);
            let _ = build_icmpv4_frag_needed(&data, mtu, &mut out[..usize::from(mtu) % 200]);
            let _ = build_icmpv6_packet_too_big(&data, u32::from(mtu), &mut out[..usize::from(mtu) % 1600]);
        }

        #[test]
        fn icmp_answers_to_valid_oversized_packets_always_verify(
            payload in proptest::collection::vec(any::<u8>(), 0..1500), v6_too in any::<bool>()
        ) {
            let mut out = [0u8; 1600];
            if v6_too {
                let f = eth(B, A, ETHERTYPE_IPV6, &ipv6(v6("fd00::1"), v6("fd00::2"), IPPROTO_UDP, &payload));
                let n = build_icmpv6_packet_too_big(&f, 1380, &mut out).unwrap();
                let ip = Ipv6::parse(&out[14..n]).unwrap();
                let pseudo = pseudo_header_v6(ip.src, ip.dst, IPPROTO_ICMPV6, ip.payload.len() as u32);
                prop_assert_eq!(checksum_finish(checksum_add(pseudo, ip.payload)), 0);
                prop_assert!(n - 14 <= 1280);
            } else {
                let f = oversized_v4(IPPROTO_UDP, &payload);
                let n = build_icmpv4_frag_needed(&f, 1380, &mut out).unwrap();
                let ip = Ipv4::parse(&out[14..n]).unwrap();
                prop_assert!(ip.header_checksum_ok());
                prop_assert_eq!(checksum(ip.payload), 0);
            }
        }
    }
}
