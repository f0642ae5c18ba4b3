//! Datagram layouts (docs/overlay-design.md, "Wire format"). Our types start
//! at 0x81 so one socket can also carry STUN (first byte 0x00-0x03) and
//! TURN ChannelData (0x40-0x7F), as RFC 7983 demultiplexes them.

pub const INITIATION: u8 = 0x81;
pub const RESPONSE: u8 = 0x82;
pub const COOKIE_REPLY: u8 = 0x83;
pub const TRANSPORT: u8 = 0x84;

/// Noise message 1 of IKpsk2: e (32), encrypted s (32 + 16), encrypted
/// timestamp (12 + 16).
pub const NOISE_INIT_LEN: usize = 108;
/// Noise message 2: e (32), encrypted empty payload (16).
pub const NOISE_RESP_LEN: usize = 48;
pub const INITIATION_LEN: usize = 8 + NOISE_INIT_LEN + 32;
pub const RESPONSE_LEN: usize = 12 + NOISE_RESP_LEN + 32;
pub const COOKIE_REPLY_LEN: usize = 8 + 56;
pub const TRANSPORT_HEADER: usize = 16;
pub const TAG_LEN: usize = 16;
/// The plaintext header inside a transport message.
pub const INNER_HEADER: usize = 4;
/// Transport overhead on top of the frame: header, inner header, tag.
pub const TRANSPORT_OVERHEAD: usize = TRANSPORT_HEADER + INNER_HEADER + TAG_LEN;

/// Headers around a transport message on the underlay, worst case, for the
/// MTU a pod can be given: the carried frame's Ethernet header, the outer
/// UDP and IPv6 headers, and the TURN ChannelData header when relayed.
pub const ETHERNET_HEADER: usize = crate::packet::ETH_HLEN;
pub const UDP_HEADER: usize = 8;
pub const IPV6_HEADER: usize = crate::packet::IPV6_HLEN;
pub const CHANNEL_DATA_HEADER: usize = 4;
/// What a pod frame costs on the underlay beyond its IP packet, worst case
/// (IPv6 underlay, relayed through TURN).
pub const UNDERLAY_OVERHEAD: usize =
    TRANSPORT_OVERHEAD + ETHERNET_HEADER + UDP_HEADER + IPV6_HEADER + CHANNEL_DATA_HEADER;

/// Kinds of inner payload.
pub mod kind {
    pub const KEEPALIVE: u8 = 0;
    pub const POD_FRAME: u8 = 1;
    pub const HOST_PACKET: u8 = 2;
    pub const PROBE: u8 = 3;
    pub const PROBE_REPLY: u8 = 4;
    /// The punching coordinator's cue (`crate::punch::Cue`); older agents
    /// ignore it.
    pub const PUNCH: u8 = 5;
    /// Birthday probing (`crate::hunt::Msg`); older agents ignore it.
    pub const HUNT: u8 = 6;
}

pub fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_le_bytes)
}

pub fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_le_bytes)
}

/// The common prefix: type, three zero bytes. Non-zero reserved bytes are
/// refused, so the field stays usable for later versions.
pub fn message_type(d: &[u8]) -> Option<u8> {
    match d {
        [t @ INITIATION..=TRANSPORT, 0, 0, 0, ..] => Some(*t),
        _ => None,
    }
}

/// What a datagram on the shared socket is, by its first byte (RFC 7983):
/// the one place that tells STUN, TURN ChannelData and ours apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Demux {
    /// 0x00-0x3F: STUN (requests, answers, TURN control).
    Stun,
    /// 0x40-0x7F: TURN ChannelData.
    ChannelData,
    /// 0x81-0x84: one of our messages.
    Overlay,
    /// Anything else, or empty.
    Unknown,
}

pub fn demux(d: &[u8]) -> Demux {
    match d.first() {
        Some(0x00..=0x3f) => Demux::Stun,
        Some(0x40..=0x7f) => Demux::ChannelData,
        Some(INITIATION..=TRANSPORT) => Demux::Overlay,
        _ => Demux::Unknown,
    }
}

pub fn put_prefix(out: &mut [u8], t: u8) {
    out[0] = t;
    out[1..4].fill(0);
}

/// Inner header: kind, checksum offset (0 = checksum complete), checksum
/// start (big-endian, from the start of the frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inner {
    pub kind: u8,
    pub csum_offset: u8,
    pub csum_start: u16,
}

impl Inner {
    pub fn parse(b: &[u8]) -> Option<Inner> {
        let h = b.get(..INNER_HEADER)?;
        Some(Inner {
            kind: h[0],
            csum_offset: h[1],
            csum_start: u16::from_be_bytes([h[2], h[3]]),
        })
    }

    pub fn write(&self, out: &mut [u8]) {
        out[0] = self.kind;
        out[1] = self.csum_offset;
        out[2..4].copy_from_slice(&self.csum_start.to_be_bytes());
    }

    pub fn plain(kind: u8) -> Inner {
        Inner {
            kind,
            csum_offset: 0,
            csum_start: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_match_wireguard() {
        assert_eq!(INITIATION_LEN, 148);
        assert_eq!(RESPONSE_LEN, 92);
        assert_eq!(COOKIE_REPLY_LEN, 64);
    }

    #[test]
    fn underlay_overhead_is_102_bytes() {
        assert_eq!(TRANSPORT_OVERHEAD, 36);
        assert_eq!(UNDERLAY_OVERHEAD, 102);
    }

    #[test]
    fn types_and_reserved_bytes() {
        assert_eq!(message_type(&[0x81, 0, 0, 0, 9]), Some(INITIATION));
        assert_eq!(message_type(&[0x84, 0, 0, 0]), Some(TRANSPORT));
        assert_eq!(message_type(&[0x84, 0, 1, 0]), None);
        assert_eq!(message_type(&[0x85, 0, 0, 0]), None);
        assert_eq!(message_type(&[0x00, 0x01, 0, 0]), None);
        assert_eq!(message_type(&[0x81, 0, 0]), None);
        assert_eq!(message_type(&[]), None);
    }

    #[test]
    fn inner_roundtrip() {
        let i = Inner {
            kind: kind::POD_FRAME,
            csum_offset: 16,
            csum_start: 34,
        };
        let mut b = [0u8; 4];
        i.write(&mut b);
        assert_eq!(Inner::parse(&b), Some(i));
        assert_eq!(Inner::parse(&b[..3]), None);
    }
}
