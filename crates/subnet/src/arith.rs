use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::Serialize;

use crate::SubnetError;

/// A validated pod CIDR split into `2^node_bits` equal node subnets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodNetwork {
    cidr: IpNet,
    node_bits: u8,
}

/// One node's share of the pod CIDR. Pods get addresses from
/// `range_start..=range_end` with the pod CIDR's prefix and `gateway` as
/// their gateway; the bridge holds `gateway`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct NodeSubnet {
    pub index: u128,
    pub subnet: IpNet,
    pub gateway: IpAddr,
    pub range_start: IpAddr,
    pub range_end: IpAddr,
}

impl NodeSubnet {
    /// Number of pod addresses in the range.
    pub fn pod_count(&self) -> u128 {
        ip_to_u128(self.range_end) - ip_to_u128(self.range_start) + 1
    }
}

fn width(cidr: &IpNet) -> u8 {
    match cidr {
        IpNet::V4(_) => 32,
        IpNet::V6(_) => 128,
    }
}

/// An address as a number (IPv4 in the low 32 bits): the one conversion
/// every range computation of evio uses.
pub fn ip_to_u128(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// `ip + delta`, wrapping within the address family (callers stay inside
/// a subnet).
pub fn ip_offset(ip: IpAddr, delta: i128) -> IpAddr {
    let n = ip_to_u128(ip).wrapping_add_signed(delta);
    match ip {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(n as u32)),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(n)),
    }
}

/// Builds an address of the same family as `like`. Callers only pass values
/// that fit the family (they stay inside a validated CIDR).
fn from_u128(like: &IpNet, v: u128) -> IpAddr {
    match like {
        IpNet::V4(_) => IpAddr::V4(Ipv4Addr::from(v as u32)),
        IpNet::V6(_) => IpAddr::V6(Ipv6Addr::from(v)),
    }
}

fn make_net(like: &IpNet, addr: u128, prefix: u8) -> IpNet {
    // Prefixes here are at most the family width by construction, so the
    // constructors cannot fail; fall back to the host route defensively.
    match from_u128(like, addr) {
        IpAddr::V4(a) => IpNet::V4(Ipv4Net::new(a, prefix).unwrap_or_else(|_| Ipv4Net::from(a))),
        IpAddr::V6(a) => IpNet::V6(Ipv6Net::new(a, prefix).unwrap_or_else(|_| Ipv6Net::from(a))),
    }
}

/// Parses `nodeBits` given as text (a flag, or a JSON string as the original
/// accepted). Leading/trailing blanks are tolerated; signs and fractions are not.
pub fn parse_node_bits(input: &str) -> Result<u32, SubnetError> {
    let t = input.trim();
    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
        return Err(SubnetError::InvalidNodeBits {
            input: input.to_string(),
        });
    }
    t.parse::<u32>().map_err(|_| SubnetError::InvalidNodeBits {
        input: input.to_string(),
    })
}

impl PodNetwork {
    /// Validates the combination: network address without host bits,
    /// `1 <= node_bits`, and at least 2 host bits left per node.
    pub fn new(cidr: IpNet, node_bits: u32) -> Result<PodNetwork, SubnetError> {
        if cidr.trunc() != cidr {
            return Err(SubnetError::HostBitsSet {
                input: cidr,
                network: cidr.trunc(),
            });
        }
        if node_bits == 0 {
            return Err(SubnetError::NodeBitsZero);
        }
        let available = width(&cidr) - cidr.prefix_len();
        if node_bits > u32::from(available) {
            return Err(SubnetError::NodeBitsTooLarge {
                node_bits,
                cidr,
                available,
            });
        }
        // Fits in u8: bounded by `available` above.
        let nb = node_bits as u8;
        let host_bits = available - nb;
        if host_bits < 2 {
            return Err(SubnetError::TooFewHostBits {
                cidr,
                node_bits: nb,
                host_bits,
            });
        }
        Ok(PodNetwork {
            cidr,
            node_bits: nb,
        })
    }

    /// Parses a CIDR string such as `10.244.0.0/16` or `fd00:10::/48`.
    pub fn parse(cidr: &str, node_bits: u32) -> Result<PodNetwork, SubnetError> {
        PodNetwork::new(parse_cidr(cidr)?, node_bits)
    }

    pub fn cidr(&self) -> IpNet {
        self.cidr
    }

    pub fn node_bits(&self) -> u8 {
        self.node_bits
    }

    pub fn host_bits(&self) -> u8 {
        width(&self.cidr) - self.cidr.prefix_len() - self.node_bits
    }

    /// Prefix length of every node subnet.
    pub fn node_prefix_len(&self) -> u8 {
        self.cidr.prefix_len() + self.node_bits
    }

    /// Number of node subnets, `2^node_bits` (fits: node_bits <= 126).
    pub fn capacity(&self) -> u128 {
        1u128 << self.node_bits
    }

    fn base(&self) -> u128 {
        ip_to_u128(self.cidr.network())
    }

    /// Node `index` subnet: `P + (index << h)`, gateway `+1`, range `+2 ..= +2^h-2`.
    pub fn node(&self, index: u128) -> Result<NodeSubnet, SubnetError> {
        if index >= self.capacity() {
            return Err(SubnetError::IndexOutOfRange {
                index,
                capacity: self.capacity(),
            });
        }
        let h = self.host_bits();
        let start = self.base() + (index << h);
        let size = 1u128 << h;
        Ok(NodeSubnet {
            index,
            subnet: make_net(&self.cidr, start, self.node_prefix_len()),
            gateway: from_u128(&self.cidr, start + 1),
            range_start: from_u128(&self.cidr, start + 2),
            // `size - 2` first: the last IPv6 subnet ends at 2^128 - 1.
            range_end: from_u128(&self.cidr, start + (size - 2)),
        })
    }

    /// The index of `subnet` if it is exactly one of this layout's node subnets.
    pub fn index_of(&self, subnet: &IpNet) -> Option<u128> {
        if width(subnet) != width(&self.cidr)
            || subnet.prefix_len() != self.node_prefix_len()
            || subnet.trunc() != *subnet
            || !self.cidr.contains(subnet)
        {
            return None;
        }
        Some((ip_to_u128(subnet.network()) - self.base()) >> self.host_bits())
    }

    /// Inclusive range of node indices whose subnets overlap `net`, if any.
    /// Used to keep allocations made under a different layout (an edited
    /// nodeBits) from being handed out again.
    pub fn overlapping_indices(&self, net: &IpNet) -> Option<(u128, u128)> {
        if width(net) != width(&self.cidr) {
            return None;
        }
        let (a0, a1) = (ip_to_u128(net.network()), ip_to_u128(net.broadcast()));
        let (b0, b1) = (self.base(), ip_to_u128(self.cidr.broadcast()));
        if a1 < b0 || a0 > b1 {
            return None;
        }
        let lo = a0.max(b0);
        let hi = a1.min(b1);
        let h = self.host_bits();
        Some(((lo - b0) >> h, (hi - b0) >> h))
    }
}

/// Parses a CIDR with a reason a human can act on.
pub(crate) fn parse_cidr(input: &str) -> Result<IpNet, SubnetError> {
    let bad = |reason: &str| SubnetError::InvalidCidr {
        input: input.to_string(),
        reason: reason.to_string(),
    };
    let t = input.trim();
    let Some((addr, prefix)) = t.split_once('/') else {
        return Err(bad("expected ADDRESS/PREFIX, e.g. 10.244.0.0/16"));
    };
    let addr: IpAddr = addr.parse().map_err(|_| bad("not an IP address"))?;
    if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad("prefix length is not a number"));
    }
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let p: u8 = prefix.parse().ok().filter(|p| *p <= max).ok_or_else(|| {
        bad(if max == 32 {
            "prefix length must be 0..=32"
        } else {
            "prefix length must be 0..=128"
        })
    })?;
    IpNet::new(addr, p).map_err(|_| bad("invalid prefix length"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pn(c: &str, b: u32) -> PodNetwork {
        PodNetwork::parse(c, b).unwrap()
    }

    #[test]
    fn design_example_v4() {
        let p = pn("10.244.0.0/16", 8);
        assert_eq!(p.capacity(), 256);
        assert_eq!(p.host_bits(), 8);
        let n3 = p.node(3).unwrap();
        assert_eq!(n3.subnet.to_string(), "10.244.3.0/24");
        assert_eq!(n3.gateway.to_string(), "10.244.3.1");
        assert_eq!(n3.range_start.to_string(), "10.244.3.2");
        assert_eq!(n3.range_end.to_string(), "10.244.3.254");
        assert_eq!(n3.pod_count(), 253);
        // First and last are both usable (the original skipped 0 and overflowed past 255).
        assert_eq!(p.node(0).unwrap().subnet.to_string(), "10.244.0.0/24");
        let last = p.node(255).unwrap();
        assert_eq!(last.subnet.to_string(), "10.244.255.0/24");
        assert_eq!(last.range_end.to_string(), "10.244.255.254");
        assert!(p.node(256).is_err());
    }

    #[test]
    fn odd_split_v4() {
        let p = pn("10.0.0.0/8", 12);
        assert_eq!(p.node_prefix_len(), 20);
        let n = p.node(1).unwrap();
        assert_eq!(n.subnet.to_string(), "10.0.16.0/20");
        assert_eq!(n.gateway.to_string(), "10.0.16.1");
        assert_eq!(n.range_end.to_string(), "10.0.31.254");
    }

    #[test]
    fn smallest_host_part() {
        let p = pn("192.168.0.0/24", 6);
        assert_eq!(p.host_bits(), 2);
        let n = p.node(63).unwrap();
        assert_eq!(n.subnet.to_string(), "192.168.0.252/30");
        assert_eq!(n.gateway.to_string(), "192.168.0.253");
        assert_eq!(n.range_start, n.range_end);
        assert_eq!(n.range_start.to_string(), "192.168.0.254");
    }

    #[test]
    fn v6() {
        let p = pn("fd00:10::/48", 16);
        assert_eq!(p.capacity(), 65536);
        let n = p.node(0xabcd).unwrap();
        assert_eq!(n.subnet.to_string(), "fd00:10:0:abcd::/64");
        assert_eq!(n.gateway.to_string(), "fd00:10:0:abcd::1");
        assert_eq!(n.range_start.to_string(), "fd00:10:0:abcd::2");
        assert_eq!(
            n.range_end.to_string(),
            "fd00:10:0:abcd:ffff:ffff:ffff:fffe"
        );
        let last = p.node(0xffff).unwrap();
        assert_eq!(last.subnet.to_string(), "fd00:10:0:ffff::/64");
        // The widest split the family allows: /0 into 2^126 nodes of /2.
        let wide = pn("::/0", 126);
        assert_eq!(wide.capacity(), 1u128 << 126);
        let top = wide.node((1u128 << 126) - 1).unwrap();
        assert_eq!(
            top.subnet.to_string(),
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffc/126"
        );
        assert_eq!(
            top.range_end.to_string(),
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe"
        );
    }

    #[test]
    fn index_of_roundtrip_and_rejects() {
        let p = pn("10.244.0.0/16", 8);
        for i in [0u128, 1, 77, 255] {
            let n = p.node(i).unwrap();
            assert_eq!(p.index_of(&n.subnet), Some(i));
        }
        for other in [
            "10.245.0.0/24",
            "10.244.3.0/25",
            "10.244.0.0/16",
            "fd00::/120",
        ] {
            assert_eq!(p.index_of(&other.parse().unwrap()), None, "{other}");
        }
    }

    #[test]
    fn overlapping_indices() {
        let p = pn("10.244.0.0/16", 8);
        let o = |s: &str| p.overlapping_indices(&s.parse().unwrap());
        assert_eq!(o("10.244.4.0/22"), Some((4, 7)));
        assert_eq!(o("10.244.9.128/25"), Some((9, 9)));
        assert_eq!(o("10.0.0.0/8"), Some((0, 255)));
        assert_eq!(o("10.245.0.0/24"), None);
        assert_eq!(o("fd00::/8"), None);
    }

    #[test]
    fn errors() {
        let e = PodNetwork::parse("10.244.1.0/16", 8).unwrap_err();
        assert!(matches!(e, SubnetError::HostBitsSet { .. }));
        assert!(e.to_string().contains("10.244.0.0/16"), "{e}");
        let e = PodNetwork::parse("fd00:10::1/48", 8).unwrap_err();
        assert!(e.to_string().contains("fd00:10::/48"), "{e}");
        assert!(matches!(
            PodNetwork::parse("10.244.0.0/16", 0),
            Err(SubnetError::NodeBitsZero)
        ));
        assert!(matches!(
            PodNetwork::parse("10.244.0.0/16", 17),
            Err(SubnetError::NodeBitsTooLarge { available: 16, .. })
        ));
        assert!(matches!(
            PodNetwork::parse("10.244.0.0/16", 4000),
            Err(SubnetError::NodeBitsTooLarge { .. })
        ));
        assert!(matches!(
            PodNetwork::parse("10.244.0.0/16", 15),
            Err(SubnetError::TooFewHostBits { host_bits: 1, .. })
        ));
        assert!(matches!(
            PodNetwork::parse("10.244.0.0/16", 16),
            Err(SubnetError::TooFewHostBits { host_bits: 0, .. })
        ));
        assert!(matches!(
            PodNetwork::parse("fd00::/64", 63),
            Err(SubnetError::TooFewHostBits { .. })
        ));
        for bad in [
            "",
            "10.244.0.0",
            "10.244.0/16",
            "10.244.0.0/33",
            "10.244.0.0/",
            "10.244.0.0/-1",
            "10.244.0.0/1x",
            "fd00::/129",
            "hello/16",
            "10.244.0.0/16/2",
            "300.1.1.1/8",
        ] {
            assert!(
                matches!(
                    PodNetwork::parse(bad, 4),
                    Err(SubnetError::InvalidCidr { .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn node_bits_text() {
        assert_eq!(parse_node_bits("8").unwrap(), 8);
        assert_eq!(parse_node_bits(" 12 ").unwrap(), 12);
        for bad in ["", "x", "-1", "+3", "1.5", "8 bits", "99999999999"] {
            assert!(parse_node_bits(bad).is_err(), "{bad:?}");
        }
    }
}
