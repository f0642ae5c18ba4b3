//! The plain data types of this crate and their translation to and from
//! rtnetlink messages (pure functions, unit-tested without a kernel).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use netlink_packet_route::link::{
    InfoBridge, InfoData, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::AddressFamily;

use crate::{Error, Result};

/// A network interface as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// `IFLA_INFO_KIND`: "bridge", "veth", "openvswitch", "tun", ...; `None`
    /// for physical devices and loopback.
    pub kind: Option<String>,
    pub mac: Option<[u8; 6]>,
    pub mtu: u32,
    /// Administratively up (IFF_UP), not carrier.
    pub up: bool,
    /// Index of the bridge (or other master) this link is a port of.
    pub master: Option<u32>,
    pub alias: Option<String>,
    /// A Linux bridge's per-bridge netfilter options (`nf_call_iptables`,
    /// `nf_call_ip6tables`), when the kernel reports them (it does when
    /// it is built with bridge netfilter).
    pub bridge_nf: Option<BridgeNf>,
}

/// Whether a Linux bridge passes bridged IPv4 and IPv6 through the
/// iptables/ip6tables (and nftables ip/ip6) hooks: what kube-proxy's NAT
/// needs for pods on one L2 segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BridgeNf {
    pub iptables: bool,
    pub ip6tables: bool,
}

/// An interface address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    pub index: u32,
    pub addr: IpNet,
    /// IPv6 duplicate address detection still running (IFA_F_TENTATIVE).
    pub tentative: bool,
    /// IPv6 duplicate address detection failed (IFA_F_DADFAILED).
    pub dadfailed: bool,
    /// Its preferred lifetime ran out (IFA_F_DEPRECATED): kept for what
    /// uses it, not for anything new.
    pub deprecated: bool,
}

/// A unicast route in the main table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dst: IpNet,
    pub gateway: Option<IpAddr>,
    /// Output interface index.
    pub oif: Option<u32>,
    pub metric: Option<u32>,
    /// Scope link: destination directly reachable on `oif` (no gateway).
    pub scope_link: bool,
}

impl Route {
    /// A route to `dst` with nothing else set.
    pub fn new(dst: IpNet) -> Route {
        Route {
            dst,
            gateway: None,
            oif: None,
            metric: None,
            scope_link: false,
        }
    }

    /// The default route (0.0.0.0/0 or ::/0) via `gateway`.
    pub fn default_via(gateway: IpAddr) -> Route {
        // The defaults of Ipv4Net/Ipv6Net are 0.0.0.0/0 and ::/0.
        let dst = match gateway {
            IpAddr::V4(_) => IpNet::V4(Ipv4Net::default()),
            IpAddr::V6(_) => IpNet::V6(Ipv6Net::default()),
        };
        Route {
            gateway: Some(gateway),
            ..Route::new(dst)
        }
    }

    pub fn family(&self) -> Family {
        Family::of(&self.dst.addr())
    }
}

/// A policy routing rule: packets from `src` to `dst` (each optional)
/// look up `table`, at `priority`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub src: Option<IpNet>,
    pub dst: Option<IpNet>,
    pub table: u32,
    pub priority: u32,
}

impl Rule {
    pub fn family(&self) -> Option<Family> {
        self.src.or(self.dst).map(|n| Family::of(&n.addr()))
    }
}

/// Address family selector for dumps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(addr: &IpAddr) -> Family {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    pub(crate) fn af(self) -> AddressFamily {
        match self {
            Family::V4 => AddressFamily::Inet,
            Family::V6 => AddressFamily::Inet6,
        }
    }
}

const IFNAMSIZ: usize = 16;

/// Rejects names the kernel would refuse (or, worse, interpret): at most 15
/// bytes, no '/', ':' or whitespace, not "." or "..".
pub(crate) fn validate_ifname(name: &str) -> Result<()> {
    let bad = name.is_empty()
        || name.len() >= IFNAMSIZ
        || name == "."
        || name == ".."
        || name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace());
    if bad {
        return Err(Error::invalid("interface name", name));
    }
    Ok(())
}

pub(crate) fn link_from_msg(msg: LinkMessage) -> Link {
    let mut link = Link {
        index: msg.header.index,
        name: String::new(),
        kind: None,
        mac: None,
        mtu: 0,
        up: msg.header.flags.contains(LinkFlags::Up),
        master: None,
        alias: None,
        bridge_nf: None,
    };
    for attr in msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => link.name = n,
            LinkAttribute::Mtu(m) => link.mtu = m,
            LinkAttribute::Controller(m) if m != 0 => link.master = Some(m),
            LinkAttribute::IfAlias(a) if !a.is_empty() => link.alias = Some(a),
            LinkAttribute::Address(a) => link.mac = <[u8; 6]>::try_from(a.as_slice()).ok(),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    match info {
                        LinkInfo::Kind(k) => link.kind = Some(k.to_string()),
                        LinkInfo::Data(InfoData::Bridge(opts)) => {
                            link.bridge_nf = bridge_nf_of(&opts);
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    link
}

fn bridge_nf_of(opts: &[InfoBridge]) -> Option<BridgeNf> {
    let mut nf = None;
    for o in opts {
        match o {
            InfoBridge::NfCallIpTables(v) => nf.get_or_insert(BridgeNf::default()).iptables = *v,
            InfoBridge::NfCallIp6Tables(v) => nf.get_or_insert(BridgeNf::default()).ip6tables = *v,
            _ => {}
        }
    }
    nf
}

pub(crate) fn address_msg(index: u32, addr: IpNet) -> AddressMessage {
    let mut msg = AddressMessage::default();
    msg.header.index = index;
    msg.header.prefix_len = addr.prefix_len();
    msg.header.family = Family::of(&addr.addr()).af();
    // IFA_LOCAL is the interface's own address, IFA_ADDRESS the peer (equal
    // on non point-to-point links); `ip addr add` sends both.
    msg.attributes.push(AddressAttribute::Local(addr.addr()));
    msg.attributes.push(AddressAttribute::Address(addr.addr()));
    if let IpNet::V4(v4) = addr {
        // /31 and /32 have no broadcast address (RFC 3021).
        if v4.prefix_len() < 31 {
            msg.attributes
                .push(AddressAttribute::Broadcast(v4.broadcast()));
        }
    }
    msg
}

pub(crate) fn address_from_msg(msg: &AddressMessage) -> Option<Address> {
    let mut local = None;
    let mut address = None;
    let mut flags = AddressFlags::from_bits_retain(u32::from(msg.header.flags.bits()));
    for attr in &msg.attributes {
        match attr {
            AddressAttribute::Local(a) => local = Some(*a),
            AddressAttribute::Address(a) => address = Some(*a),
            // The 32-bit attribute supersedes the 8-bit header field.
            AddressAttribute::Flags(f) => flags = *f,
            _ => {}
        }
    }
    let ip = local.or(address)?;
    let addr = IpNet::new(ip, msg.header.prefix_len).ok()?;
    Some(Address {
        index: msg.header.index,
        addr,
        tentative: flags.contains(AddressFlags::Tentative),
        dadfailed: flags.contains(AddressFlags::Dadfailed),
        deprecated: flags.contains(AddressFlags::Deprecated),
    })
}

fn route_address(ip: IpAddr) -> RouteAddress {
    match ip {
        IpAddr::V4(a) => RouteAddress::Inet(a),
        IpAddr::V6(a) => RouteAddress::Inet6(a),
    }
}

fn ip_of(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(a) => Some(IpAddr::V4(*a)),
        RouteAddress::Inet6(a) => Some(IpAddr::V6(*a)),
        _ => None,
    }
}

/// The message that adds (or, with `delete`, removes) `route` in the main
/// table.
pub(crate) fn route_msg(route: &Route, delete: bool) -> Result<RouteMessage> {
    route_msg_in(route, delete, u32::from(RouteHeader::RT_TABLE_MAIN))
}

/// [`route_msg`] for routing table `table`.
pub(crate) fn route_msg_in(route: &Route, delete: bool, table: u32) -> Result<RouteMessage> {
    let family = route.family();
    if let Some(gw) = route.gateway {
        if Family::of(&gw) != family {
            return Err(Error::invalid(
                "route (gateway family differs from destination)",
                format!("{} via {gw}", route.dst),
            ));
        }
    }
    let mut msg = RouteMessage::default();
    msg.header.address_family = family.af();
    msg.header.destination_prefix_length = route.dst.prefix_len();
    // Tables above 255 exist only as the RTA_TABLE attribute.
    msg.header.table = u8::try_from(table).unwrap_or(RouteHeader::RT_TABLE_UNSPEC);
    if table > 255 {
        msg.attributes.push(RouteAttribute::Table(table));
    }
    msg.header.kind = RouteType::Unicast;
    if delete {
        // NOWHERE and UNSPEC act as wildcards when the kernel looks for the
        // route to remove, as `ip route del` does.
        msg.header.scope = RouteScope::NoWhere;
        msg.header.protocol = RouteProtocol::Unspec;
    } else {
        msg.header.scope = if route.scope_link {
            RouteScope::Link
        } else {
            RouteScope::Universe
        };
        // What `ip route add` uses: an administrator's route.
        msg.header.protocol = RouteProtocol::Boot;
    }
    if route.dst.prefix_len() > 0 {
        msg.attributes
            .push(RouteAttribute::Destination(route_address(
                route.dst.network(),
            )));
    }
    if let Some(gw) = route.gateway {
        msg.attributes
            .push(RouteAttribute::Gateway(route_address(gw)));
    }
    if let Some(oif) = route.oif {
        msg.attributes.push(RouteAttribute::Oif(oif));
    }
    if let Some(metric) = route.metric {
        msg.attributes.push(RouteAttribute::Priority(metric));
    }
    Ok(msg)
}

/// The route in a dump message, if it is a unicast route of the main table.
pub(crate) fn route_from_msg(msg: &RouteMessage) -> Option<Route> {
    route_from_msg_in(msg, u32::from(RouteHeader::RT_TABLE_MAIN))
}

/// [`route_from_msg`] for routing table `want`.
pub(crate) fn route_from_msg_in(msg: &RouteMessage, want: u32) -> Option<Route> {
    if msg.header.kind != RouteType::Unicast {
        return None;
    }
    let mut table = u32::from(msg.header.table);
    let mut dst = None;
    let mut route = Route::new(IpNet::default());
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(a) => dst = ip_of(a),
            RouteAttribute::Gateway(a) => route.gateway = ip_of(a),
            RouteAttribute::Oif(i) => route.oif = Some(*i),
            RouteAttribute::Priority(p) => route.metric = Some(*p),
            _ => {}
        }
    }
    if table != want {
        return None;
    }
    let dst = match (dst, msg.header.address_family) {
        (Some(ip), _) => ip,
        (None, AddressFamily::Inet) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        (None, AddressFamily::Inet6) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        (None, _) => return None,
    };
    route.dst = IpNet::new(dst, msg.header.destination_prefix_length).ok()?;
    route.scope_link = msg.header.scope == RouteScope::Link;
    Some(route)
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{Emitable, Parseable};
    use netlink_packet_route::address::AddressHeaderFlags;
    use netlink_packet_route::link::{InfoKind, LinkHeader};

    fn roundtrip_route(msg: &RouteMessage) -> RouteMessage {
        let mut buf = vec![0; msg.buffer_len()];
        msg.emit(&mut buf);
        RouteMessage::parse(buf.as_slice()).unwrap()
    }

    #[test]
    fn ifname_validation() {
        for ok in ["eth0", "evio0", "veth1234567890a", "a.b-c_d"] {
            validate_ifname(ok).unwrap();
        }
        for bad in [
            "",
            "veth1234567890ab",
            ".",
            "..",
            "a/b",
            "a:b",
            "a b",
            "a\0",
        ] {
            assert!(validate_ifname(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn route_roundtrip_through_wire_format() {
        let r = Route {
            dst: "10.244.0.0/16".parse().unwrap(),
            gateway: Some("10.244.3.1".parse().unwrap()),
            oif: Some(7),
            metric: Some(100),
            scope_link: false,
        };
        let back = route_from_msg(&roundtrip_route(&route_msg(&r, false).unwrap())).unwrap();
        assert_eq!(back, r);

        let link = Route {
            oif: Some(3),
            scope_link: true,
            ..Route::new("fd00:1::/64".parse().unwrap())
        };
        let back = route_from_msg(&roundtrip_route(&route_msg(&link, false).unwrap())).unwrap();
        assert_eq!(back, link);
    }

    #[test]
    fn default_route_has_no_destination_attribute() {
        let r = Route::default_via("10.0.0.1".parse().unwrap());
        assert_eq!(r.dst, "0.0.0.0/0".parse::<IpNet>().unwrap());
        let msg = route_msg(&r, false).unwrap();
        assert!(!msg
            .attributes
            .iter()
            .any(|a| matches!(a, RouteAttribute::Destination(_))));
        assert_eq!(route_from_msg(&roundtrip_route(&msg)).unwrap(), r);

        let r6 = Route::default_via("fe80::1".parse().unwrap());
        assert_eq!(r6.dst, "::/0".parse::<IpNet>().unwrap());
        assert_eq!(
            route_from_msg(&roundtrip_route(&route_msg(&r6, false).unwrap())).unwrap(),
            r6
        );
    }

    #[test]
    fn route_destination_is_normalised_and_families_must_match() {
        let msg = route_msg(&Route::new("10.244.3.7/16".parse().unwrap()), false).unwrap();
        assert!(msg
            .attributes
            .contains(&RouteAttribute::Destination(RouteAddress::Inet(
                "10.244.0.0".parse().unwrap()
            ))));
        let mixed = Route {
            gateway: Some("fe80::1".parse().unwrap()),
            ..Route::new("10.0.0.0/8".parse().unwrap())
        };
        assert!(route_msg(&mixed, false).is_err());
    }

    #[test]
    fn delete_uses_wildcard_scope() {
        let msg = route_msg(&Route::new("10.0.0.0/8".parse().unwrap()), true).unwrap();
        assert_eq!(msg.header.scope, RouteScope::NoWhere);
        assert_eq!(msg.header.protocol, RouteProtocol::Unspec);
    }

    #[test]
    fn dump_filter_keeps_only_main_unicast() {
        let mut msg = route_msg(&Route::new("10.0.0.0/8".parse().unwrap()), false).unwrap();
        msg.header.table = 255;
        assert_eq!(route_from_msg(&msg), None);
        msg.header.table = RouteHeader::RT_TABLE_MAIN;
        msg.header.kind = RouteType::Local;
        assert_eq!(route_from_msg(&msg), None);
        msg.header.kind = RouteType::Unicast;
        // Table ids above 255 are carried in RTA_TABLE.
        msg.attributes.push(RouteAttribute::Table(1000));
        assert_eq!(route_from_msg(&msg), None);
    }

    #[test]
    fn address_message_v4_has_broadcast_v6_not() {
        let msg = address_msg(4, "10.244.3.2/16".parse().unwrap());
        assert_eq!(msg.header.prefix_len, 16);
        assert!(msg.attributes.contains(&AddressAttribute::Broadcast(
            "10.244.255.255".parse().unwrap()
        )));
        let p2p = address_msg(4, "10.0.0.1/32".parse().unwrap());
        assert!(!p2p
            .attributes
            .iter()
            .any(|a| matches!(a, AddressAttribute::Broadcast(_))));
        let v6 = address_msg(4, "fd00::2/64".parse().unwrap());
        assert_eq!(v6.header.family, AddressFamily::Inet6);
        assert!(!v6
            .attributes
            .iter()
            .any(|a| matches!(a, AddressAttribute::Broadcast(_))));
    }

    #[test]
    fn address_flags_from_attribute_and_header() {
        let mut msg = address_msg(9, "fd00::2/64".parse().unwrap());
        msg.header.flags = AddressHeaderFlags::Tentative;
        let a = address_from_msg(&msg).unwrap();
        assert_eq!(a.index, 9);
        assert_eq!(a.addr, "fd00::2/64".parse::<IpNet>().unwrap());
        assert!(a.tentative && !a.dadfailed);
        msg.attributes
            .push(AddressAttribute::Flags(AddressFlags::Dadfailed));
        let a = address_from_msg(&msg).unwrap();
        assert!(!a.tentative && a.dadfailed);
    }

    #[test]
    fn link_fields() {
        let mut msg = LinkMessage::default();
        msg.header = LinkHeader {
            index: 5,
            flags: LinkFlags::Up | LinkFlags::Broadcast,
            ..LinkHeader::default()
        };
        msg.attributes = vec![
            LinkAttribute::IfName("veth0".into()),
            LinkAttribute::Mtu(1400),
            LinkAttribute::Controller(3),
            LinkAttribute::IfAlias("pod/x".into()),
            LinkAttribute::Address(vec![2, 0, 0, 0, 0, 1]),
            LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Veth)]),
        ];
        let l = link_from_msg(msg);
        assert_eq!(
            l,
            Link {
                index: 5,
                name: "veth0".into(),
                kind: Some("veth".into()),
                mac: Some([2, 0, 0, 0, 0, 1]),
                mtu: 1400,
                up: true,
                master: Some(3),
                alias: Some("pod/x".into()),
                bridge_nf: None,
            }
        );
        let mut lo = LinkMessage::default();
        lo.attributes = vec![
            LinkAttribute::IfName("lo".into()),
            LinkAttribute::Controller(0),
            LinkAttribute::Address(vec![0; 4]),
        ];
        let l = link_from_msg(lo);
        assert_eq!((l.master, l.mac, l.kind, l.up), (None, None, None, false));
    }
}
