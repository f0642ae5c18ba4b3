//! The overlay keys of net-conf.json (docs/design.md, "The overlay's keys"):
//! `hostCIDR`, `hostInterface` and the `overlay` object. Secrets (the
//! network key, TURN passwords) are only ever named by file.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;

use ipnet::IpNet;
use serde_json::Value;

use crate::error::NodeError;
use crate::netconf::RawConf;

pub const DEFAULT_LISTEN_PORT: u16 = 5800;
pub const DEFAULT_KEY_FILE: &str = "/var/lib/evio/agent.key";
pub const DEFAULT_HOST_INTERFACE: &str = "evio-host";
pub const DEFAULT_UNDERLAY_MTU: u32 = 1500;
/// Linux's `nf_conntrack_udp_timeout`.
const DEFAULT_NAT_UDP_TIMEOUT: u32 = 30;
/// What a pod frame costs on the underlay, worst case: IPv6 40 + UDP 8 +
/// transport header 16 + inner header 4 + tag 16 + Ethernet 14 + TURN
/// ChannelData 4 = 102 bytes, summed where the wire format is defined.
pub const OVERHEAD: u32 = evio_overlay::wire::UNDERLAY_OVERHEAD as u32;
/// The default leaves 18 more bytes for underlays that are themselves
/// encapsulated (PPPoE, VLAN): 1500 gives the pods 1380.
pub const DEFAULT_MARGIN: u32 = 18;

/// The NAT layer's own type: one definition for the config and the agent.
pub use evio_overlay::nat::TurnTransport;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TurnConf {
    /// `host:port` as written.
    pub server: String,
    pub transport: TurnTransport,
    pub username: String,
    pub password_file: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayConf {
    /// Whether any overlay key was present: then the conflist's MTU must
    /// fit inside the tunnel.
    pub configured: bool,
    /// `hostCIDR`'s first prefix: the only one, or the IPv4 one of a
    /// dual-stack list. Its address is the record's `hostAddress`.
    pub host_cidr: Option<IpNet>,
    /// The IPv6 prefix of a dual-stack `hostCIDR` list (beside the IPv4
    /// `host_cidr`); `None` with one prefix, whatever its family.
    pub host_cidr6: Option<IpNet>,
    /// `hostAddress`: the host overlay address this node asks for in
    /// `host_cidr`.
    pub host_address: Option<IpAddr>,
    /// `hostAddress`'s address in `host_cidr6`.
    pub host_address6: Option<IpAddr>,
    pub host_interface: String,
    pub listen_port: u16,
    pub stun: Vec<String>,
    pub turn: Vec<TurnConf>,
    /// `overlay.announce`: extra candidates, published as they are.
    pub announce: Vec<SocketAddr>,
    /// `overlay.portMapping`: ask the default gateway for a port mapping
    /// (PCP, NAT-PMP, UPnP IGD). On unless false.
    pub port_mapping: bool,
    /// `overlay.ipv6`: an IPv6 underlay beside the IPv4 one (a socket on
    /// `[::]:listenPort`, global IPv6 addresses as candidates). On unless
    /// false; off, the node is the IPv4-only agent it was before.
    pub ipv6: bool,
    pub key_file: PathBuf,
    pub network_key_file: Option<PathBuf>,
    pub underlay_mtu: u32,
    /// `overlay.natUdpTimeout`: the UDP timeout of the NATs in front of
    /// the nodes (Linux: 30 s), which the silence of hole punching must
    /// outlast.
    pub nat_udp_timeout: u32,
}

fn invalid(key: &str, why: impl std::fmt::Display) -> NodeError {
    NodeError::Invalid(format!("{key}: {why}"))
}

fn string(v: &Value, key: &str) -> Result<String, NodeError> {
    match v {
        Value::String(s) if !s.is_empty() => Ok(s.clone()),
        other => Err(invalid(
            key,
            format!("expected a non-empty string, got {other}"),
        )),
    }
}

fn host_port(s: &str, key: &str) -> Result<(), NodeError> {
    match s.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0) => Ok(()),
        _ => Err(invalid(key, format!("{s:?} is not host:port"))),
    }
}

/// `overlay.<name>`: a switch, on when absent or null.
fn flag(o: &serde_json::Map<String, Value>, name: &str) -> Result<bool, NodeError> {
    match o.get(name) {
        None | Some(Value::Null) => Ok(true),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(invalid(
            &format!("overlay.{name}"),
            format!("expected true or false, got {other}"),
        )),
    }
}

/// `overlay.<name>`: absent or null is empty; otherwise a list whose items
/// `item` parses, given their key (`overlay.<name>[i]`).
fn list<T>(
    o: &serde_json::Map<String, Value>,
    name: &str,
    expected: &str,
    mut item: impl FnMut(&str, &Value) -> Result<T, NodeError>,
) -> Result<Vec<T>, NodeError> {
    match o.get(name) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, v)| item(&format!("overlay.{name}[{i}]"), v))
            .collect(),
        Some(other) => Err(invalid(
            &format!("overlay.{name}"),
            format!("expected {expected}, got {other}"),
        )),
    }
}

/// One entry of `overlay.announce`: a literal IPv4 `ip:port` (the underlay
/// is IPv4; a name would be resolved differently by every peer), neither
/// unspecified, nor loopback, nor multicast, nor port 0.
fn announced(key: &str, v: &Value) -> Result<SocketAddr, NodeError> {
    let s = string(v, key)?;
    let a: SocketAddr = s.parse().map_err(|_| {
        invalid(
            key,
            format!("{s:?} is not ip:port (e.g. \"203.0.113.5:5800\")"),
        )
    })?;
    let ip = a.ip();
    if !ip.is_ipv4() {
        return Err(invalid(key, format!("{s}: the underlay is IPv4")));
    }
    if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || a.port() == 0 {
        return Err(invalid(
            key,
            format!("{s} cannot be reached by a peer (unspecified, loopback, multicast or port 0)"),
        ));
    }
    Ok(a)
}

/// One entry of `overlay.turn`, whose key is `key`.
fn turn_server(key: &str, t: &Value) -> Result<TurnConf, NodeError> {
    let Value::Object(m) = t else {
        return Err(invalid(key, "expected an object"));
    };
    for k in m.keys() {
        if ![
            "server",
            "transport",
            "username",
            "passwordFile",
            "password",
        ]
        .contains(&k.as_str())
        {
            return Err(invalid(key, format!("unknown key {k:?}")));
        }
    }
    if m.contains_key("password") {
        return Err(invalid(
            key,
            "a password must not be in the config (a ConfigMap is not secret): use passwordFile",
        ));
    }
    let server = string(
        m.get("server").unwrap_or(&Value::Null),
        &format!("{key}.server"),
    )?;
    host_port(&server, &format!("{key}.server"))?;
    let transport = match m.get("transport").and_then(Value::as_str) {
        None | Some("udp") => TurnTransport::Udp,
        Some("tcp") => TurnTransport::Tcp,
        Some(x) => {
            return Err(invalid(
                &format!("{key}.transport"),
                format!("{x:?} is not \"udp\" or \"tcp\""),
            ))
        }
    };
    let username = string(
        m.get("username").unwrap_or(&Value::Null),
        &format!("{key}.username"),
    )?;
    let password_file = PathBuf::from(string(
        m.get("passwordFile").unwrap_or(&Value::Null),
        &format!("{key}.passwordFile"),
    )?);
    Ok(TurnConf {
        server,
        transport,
        username,
        password_file,
    })
}

const OVERLAY_KEYS: &[&str] = &[
    "listenPort",
    "announce",
    "portMapping",
    "ipv6",
    "stun",
    "turn",
    "keyFile",
    "networkKeyFile",
    "underlayMTU",
    "natUdpTimeout",
];

impl OverlayConf {
    pub fn parse(conf: &RawConf) -> Result<OverlayConf, NodeError> {
        let cidrs: Vec<IpNet> = match conf.raw("hostCIDR") {
            Some(Value::Array(a)) => a
                .iter()
                .enumerate()
                .map(|(i, v)| host_prefix(&string(v, &format!("hostCIDR[{i}]"))?))
                .collect::<Result<_, _>>()?,
            _ => conf
                .string("hostCIDR")?
                .map(|s| host_prefix(&s))
                .transpose()?
                .into_iter()
                .collect(),
        };
        let (host_cidr, host_cidr6) = split_families(&cidrs)?;
        if conf.raw("hostCIDR").is_some() && host_cidr.is_none() {
            return Err(invalid(
                "hostCIDR",
                "an empty list: give one prefix, or one IPv4 and one IPv6 prefix",
            ));
        }
        let mut host_address = None;
        let mut host_address6 = None;
        let requested: Vec<String> = match conf.raw("hostAddress") {
            Some(Value::Array(a)) => a
                .iter()
                .enumerate()
                .map(|(i, v)| string(v, &format!("hostAddress[{i}]")))
                .collect::<Result<_, _>>()?,
            _ => conf.string("hostAddress")?.into_iter().collect(),
        };
        if conf.raw("hostAddress").is_some() && requested.is_empty() {
            return Err(invalid("hostAddress", "an empty list"));
        }
        for s in &requested {
            let (slot6, a) = host_address_in(s, host_cidr, host_cidr6, "hostAddress")?;
            let to = if slot6 {
                &mut host_address6
            } else {
                &mut host_address
            };
            if to.is_some() {
                return Err(invalid(
                    "hostAddress",
                    "two addresses of one family: give at most one IPv4 and one IPv6 address",
                ));
            }
            *to = Some(a);
        }
        let host_interface = conf
            .string("hostInterface")?
            .unwrap_or_else(|| DEFAULT_HOST_INTERFACE.into());
        if host_interface.is_empty()
            || host_interface.len() > 15
            || !host_interface
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err(invalid(
                "hostInterface",
                format!(
                    "{host_interface:?} is not an interface name (1-15 letters, digits, -, _, .)"
                ),
            ));
        }
        let ov = conf.raw("overlay");
        let empty = serde_json::Map::new();
        let o = match ov {
            None => &empty,
            Some(Value::Object(m)) => m,
            Some(other) => {
                return Err(invalid(
                    "overlay",
                    format!("expected an object, got {other}"),
                ))
            }
        };
        for k in o.keys() {
            if !OVERLAY_KEYS.contains(&k.as_str()) {
                let hint = OVERLAY_KEYS
                    .iter()
                    .find(|x| x.eq_ignore_ascii_case(k))
                    .map(|x| format!(" (did you mean {x:?}?)"))
                    .unwrap_or_default();
                return Err(invalid("overlay", format!("unknown key {k:?}{hint}")));
            }
        }
        let listen_port = match o.get("listenPort") {
            None | Some(Value::Null) => DEFAULT_LISTEN_PORT,
            Some(Value::Number(n)) => n
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .filter(|p| *p != 0)
                .ok_or_else(|| {
                    invalid("overlay.listenPort", format!("{n} is not a port (1-65535)"))
                })?,
            Some(other) => {
                return Err(invalid(
                    "overlay.listenPort",
                    format!("expected a number, got {other}"),
                ))
            }
        };
        let stun = list(o, "stun", "a list of \"host:port\"", |key, s| {
            let s = string(s, key)?;
            host_port(&s, key)?;
            Ok(s)
        })?;
        let turn = list(o, "turn", "a list of objects", turn_server)?;
        let announce = list(o, "announce", "a list of \"ip:port\"", announced)?;
        let ipv6 = flag(o, "ipv6")?;
        let port_mapping = flag(o, "portMapping")?;
        let path = |k: &str| -> Result<Option<PathBuf>, NodeError> {
            match o.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => {
                    let s = string(v, &format!("overlay.{k}"))?;
                    if !s.starts_with('/') {
                        return Err(invalid(
                            &format!("overlay.{k}"),
                            format!("{s:?} must be an absolute path"),
                        ));
                    }
                    Ok(Some(PathBuf::from(s)))
                }
            }
        };
        let key_file = path("keyFile")?.unwrap_or_else(|| PathBuf::from(DEFAULT_KEY_FILE));
        let network_key_file = path("networkKeyFile")?;
        let underlay_mtu = match o.get("underlayMTU") {
            None | Some(Value::Null) => DEFAULT_UNDERLAY_MTU,
            Some(Value::Number(n)) => n
                .as_u64()
                .and_then(|m| u32::try_from(m).ok())
                .filter(|m| (1280..=65535).contains(m))
                .ok_or_else(|| {
                    invalid(
                        "overlay.underlayMTU",
                        format!("{n} is not an MTU (1280-65535)"),
                    )
                })?,
            Some(other) => {
                return Err(invalid(
                    "overlay.underlayMTU",
                    format!("expected a number, got {other}"),
                ))
            }
        };
        let nat_udp_timeout = match o.get("natUdpTimeout") {
            None | Some(Value::Null) => DEFAULT_NAT_UDP_TIMEOUT,
            Some(Value::Number(n)) => n
                .as_u64()
                .and_then(|m| u32::try_from(m).ok())
                .filter(|m| (1..=600).contains(m))
                .ok_or_else(|| {
                    invalid(
                        "overlay.natUdpTimeout",
                        format!("{n} is not a timeout in seconds (1-600)"),
                    )
                })?,
            Some(other) => {
                return Err(invalid(
                    "overlay.natUdpTimeout",
                    format!("expected a number of seconds, got {other}"),
                ))
            }
        };
        Ok(OverlayConf {
            configured: ov.is_some() || host_cidr.is_some(),
            host_cidr,
            host_cidr6,
            host_address,
            host_address6,
            host_interface,
            listen_port,
            stun,
            turn,
            announce,
            port_mapping,
            ipv6,
            key_file,
            network_key_file,
            underlay_mtu,
            nat_udp_timeout,
        })
    }

    /// The largest pod MTU whose frames fit the underlay.
    pub fn max_mtu(&self) -> u32 {
        self.underlay_mtu - OVERHEAD
    }

    pub fn default_mtu(&self) -> u32 {
        self.underlay_mtu - OVERHEAD - DEFAULT_MARGIN
    }

    /// Every prefix of `hostCIDR`, the first one first.
    pub fn host_cidrs(&self) -> Vec<IpNet> {
        self.host_cidr.into_iter().chain(self.host_cidr6).collect()
    }
}

/// One prefix of `hostCIDR`. IPv4: room for at least two hosts (/30).
/// IPv6: at most /120 (a host overlay smaller than 256 addresses has no
/// use, and /64 is what operators give), and a unicast range a host can
/// route: not link-local (every interface has its own fe80::/10, which
/// the kernel would not route through the overlay), multicast, loopback
/// or unspecified.
fn host_prefix(s: &str) -> Result<IpNet, NodeError> {
    let n: IpNet = s
        .parse()
        .map_err(|_| invalid("hostCIDR", format!("{s:?} is not a CIDR")))?;
    if n.trunc() != n {
        return Err(invalid(
            "hostCIDR",
            format!("{s} has host bits set: the network is {}", n.trunc()),
        ));
    }
    match n {
        IpNet::V4(_) if n.prefix_len() > 30 => {
            Err(invalid("hostCIDR", format!("{s} has no room for hosts")))
        }
        IpNet::V6(_) if n.prefix_len() > 120 => Err(invalid(
            "hostCIDR",
            format!("{s}: an IPv6 host overlay needs a prefix of /120 or shorter (e.g. /64)"),
        )),
        IpNet::V6(v6)
            if v6.prefix_len() < 10
                || v6.addr().is_unspecified()
                || v6.addr().is_loopback()
                || v6.addr().is_multicast()
                || (v6.addr().segments()[0] & 0xffc0) == 0xfe80 =>
        {
            Err(invalid(
                "hostCIDR",
                format!(
                    "{s} is not a usable IPv6 range (link-local, multicast, loopback, or too \
                     wide): use a unique local (fd00::/8) or global prefix"
                ),
            ))
        }
        _ => Ok(n),
    }
}

/// `hostCIDR`'s prefixes, at most one of each family: the first (the
/// IPv4 one when there are two, else the one there is) and the IPv6 one
/// beside an IPv4 one.
fn split_families(items: &[IpNet]) -> Result<(Option<IpNet>, Option<IpNet>), NodeError> {
    let v4 = items.iter().filter(|n| n.addr().is_ipv4()).count();
    if v4 > 1 || items.len() - v4 > 1 {
        return Err(invalid(
            "hostCIDR",
            "two prefixes of one family: give at most one IPv4 and one IPv6 prefix",
        ));
    }
    let first = |v6: bool| items.iter().copied().find(|n| n.addr().is_ipv6() == v6);
    Ok(match first(false) {
        Some(a) => (Some(a), first(true)),
        None => (first(true), None),
    })
}

/// A requested host address in whichever prefix of its family there is:
/// whether it is the IPv6 one beside an IPv4 one (`host_cidr6`), and the
/// address.
pub fn host_address_in(
    s: &str,
    cidr: Option<IpNet>,
    cidr6: Option<IpNet>,
    key: &str,
) -> Result<(bool, IpAddr), NodeError> {
    let v6 = s.parse::<IpAddr>().is_ok_and(|a| a.is_ipv6());
    match cidr6 {
        Some(c6) if v6 => Ok((true, host_address(s, Some(c6), key)?)),
        _ => Ok((false, host_address(s, cidr, key)?)),
    }
}

/// A requested host overlay address (`hostAddress`, `--host-address`,
/// named `key` in errors): a plain address, usable in `hostCIDR`.
pub fn host_address(s: &str, cidr: Option<IpNet>, key: &str) -> Result<IpAddr, NodeError> {
    let a: IpAddr = s.parse().map_err(|_| {
        invalid(
            key,
            format!("{s:?} is not an IP address (e.g. \"10.10.0.1\", without a prefix)"),
        )
    })?;
    let Some(cidr) = cidr else {
        return Err(invalid(
            key,
            "needs hostCIDR (there is no host overlay without it)",
        ));
    };
    if !evio_subnet::usable_host(cidr, a) {
        return Err(invalid(
            key,
            format!("{a} is not a usable address of hostCIDR {cidr} (inside it, neither its network nor its broadcast address)"),
        ));
    }
    Ok(a)
}

/// `host:port` of a STUN or TURN server to the address the agent talks
/// to. A literal is taken as written: `"[2001:db8::1]:3478"` is asked over
/// IPv6 (refused with `overlay.ipv6: false`, which binds no IPv6 socket).
/// A name: its first IPv4 address, as before IPv6, unless this host has no
/// route to it and has one to an IPv6 address of the name (an IPv6-only
/// host); with `overlay.ipv6: false`, IPv4 only.
pub fn resolve(hp: &str, key: &str, ipv6: bool) -> Result<SocketAddr, NodeError> {
    if let Ok(a) = hp.parse::<SocketAddr>() {
        if a.is_ipv6() && !ipv6 {
            return Err(invalid(
                key,
                format!("{hp:?} is an IPv6 address and overlay.ipv6 is false"),
            ));
        }
        return Ok(a);
    }
    let addrs: Vec<SocketAddr> = hp
        .to_socket_addrs()
        .map_err(|e| invalid(key, format!("cannot resolve {hp:?}: {e}")))?
        .collect();
    let v4 = addrs.iter().find(|a| a.is_ipv4()).copied();
    if let Some(a) = v4.filter(|a| routes(*a)) {
        return Ok(a);
    }
    let mut v6 = addrs.iter().filter(|a| ipv6 && a.is_ipv6()).copied();
    if let Some(a) = v6.clone().find(|a| routes(*a)) {
        return Ok(a);
    }
    v4.or_else(|| v6.next()).ok_or_else(|| {
        invalid(
            key,
            match ipv6 {
                true => format!("{hp:?} has no address"),
                false => format!("{hp:?} has no IPv4 address (overlay.ipv6 is false)"),
            },
        )
    })
}

/// Whether this host (its network namespace) has a route to `a`: a UDP
/// socket's connect is the kernel's route lookup, and sends nothing.
fn routes(a: SocketAddr) -> bool {
    let any: SocketAddr = match a {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    std::net::UdpSocket::bind(any)
        .and_then(|s| s.connect(a))
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(j: &str) -> Result<OverlayConf, NodeError> {
        OverlayConf::parse(&RawConf::parse("t.json", j.as_bytes()).unwrap())
    }

    #[test]
    fn overhead_is_the_wire_formats_102_bytes() {
        assert_eq!(OVERHEAD, 102);
    }

    #[test]
    fn defaults_and_full_config() {
        let d = parse("{}").unwrap();
        assert!(!d.configured);
        assert_eq!(d.listen_port, 5800);
        assert_eq!(d.host_interface, "evio-host");
        assert_eq!(d.default_mtu(), 1380);
        let f = parse(
            r#"{"hostCIDR":"10.10.0.0/16","hostInterface":"ovl0","overlay":{"listenPort":5900,
            "stun":["203.0.113.1:3478"],"turn":[{"server":"203.0.113.1:3478","transport":"tcp",
            "username":"u","passwordFile":"/etc/evio/turn"}],"keyFile":"/k","networkKeyFile":"/n"}}"#,
        )
        .unwrap();
        assert!(f.configured);
        assert_eq!(f.host_cidr.unwrap().to_string(), "10.10.0.0/16");
        assert_eq!(f.host_address, None);
        assert!(f.announce.is_empty());
        assert!(f.port_mapping, "on by default");
        assert!(f.ipv6, "on by default");
        assert!(!parse(r#"{"overlay":{"ipv6":false}}"#).unwrap().ipv6);
        assert!(
            !parse(r#"{"overlay":{"portMapping":false}}"#)
                .unwrap()
                .port_mapping
        );
        let a =
            parse(r#"{"overlay":{"announce":["203.0.113.5:5800","198.51.100.7:40000"]}}"#).unwrap();
        assert_eq!(
            a.announce,
            [
                "203.0.113.5:5800".parse().unwrap(),
                "198.51.100.7:40000".parse().unwrap()
            ]
        );
        assert_eq!(d.nat_udp_timeout, 30);
        let t = parse(r#"{"overlay":{"natUdpTimeout":5}}"#).unwrap();
        assert_eq!(t.nat_udp_timeout, 5);
        let h = parse(r#"{"hostCIDR":"10.10.0.0/16","hostAddress":"10.10.0.1"}"#).unwrap();
        assert_eq!(h.host_address, Some("10.10.0.1".parse().unwrap()));
        assert_eq!(f.turn[0].transport, TurnTransport::Tcp);
        assert_eq!(
            f.network_key_file.as_deref(),
            Some(std::path::Path::new("/n"))
        );
    }

    /// Issue 25: `hostCIDR` as a list of one IPv4 and one IPv6 prefix, in
    /// either order, or of one; the string form as ever.
    #[test]
    fn host_cidr_lists_one_prefix_per_family() {
        let v4: IpNet = "10.10.0.0/16".parse().unwrap();
        let v6: IpNet = "fd00:10::/64".parse().unwrap();
        for j in [
            r#"{"hostCIDR":["10.10.0.0/16","fd00:10::/64"]}"#,
            r#"{"hostCIDR":["fd00:10::/64","10.10.0.0/16"]}"#,
        ] {
            let c = parse(j).unwrap();
            assert_eq!((c.host_cidr, c.host_cidr6), (Some(v4), Some(v6)), "{j}");
            assert_eq!(c.host_cidrs(), [v4, v6]);
            assert!(c.configured);
        }
        // One element is the string form; an IPv6-only one is the first.
        for (j, want) in [
            (r#"{"hostCIDR":["10.10.0.0/16"]}"#, v4),
            (r#"{"hostCIDR":"10.10.0.0/16"}"#, v4),
            (r#"{"hostCIDR":["fd00:10::/64"]}"#, v6),
            (r#"{"hostCIDR":"fd00:10::/64"}"#, v6),
        ] {
            let c = parse(j).unwrap();
            assert_eq!((c.host_cidr, c.host_cidr6), (Some(want), None), "{j}");
        }
        // hostAddress: a string of either family, or one of each.
        let c = parse(
            r#"{"hostCIDR":["10.10.0.0/16","fd00:10::/64"],"hostAddress":["fd00:10::7","10.10.0.7"]}"#,
        )
        .unwrap();
        assert_eq!(c.host_address, Some("10.10.0.7".parse().unwrap()));
        assert_eq!(c.host_address6, Some("fd00:10::7".parse().unwrap()));
        let c = parse(r#"{"hostCIDR":["10.10.0.0/16","fd00:10::/64"],"hostAddress":"fd00:10::7"}"#)
            .unwrap();
        assert_eq!(
            (c.host_address, c.host_address6),
            (None, Some("fd00:10::7".parse().unwrap()))
        );
        let c = parse(r#"{"hostCIDR":"fd00:10::/64","hostAddress":"fd00:10::7"}"#).unwrap();
        assert_eq!(
            (c.host_address, c.host_address6),
            (Some("fd00:10::7".parse().unwrap()), None)
        );
        for (j, why) in [
            (r#"{"hostCIDR":[]}"#, "an empty list"),
            (
                r#"{"hostCIDR":["10.10.0.0/16","10.11.0.0/16"]}"#,
                "two prefixes of one family",
            ),
            (
                r#"{"hostCIDR":["fd00:10::/64","fd00:11::/64"]}"#,
                "two prefixes of one family",
            ),
            (
                r#"{"hostCIDR":["10.10.0.0/16","x"]}"#,
                "\"x\" is not a CIDR",
            ),
            (r#"{"hostCIDR":["10.10.0.0/16",""]}"#, "hostCIDR[1]"),
            (r#"{"hostCIDR":["10.10.0.0/16",7]}"#, "hostCIDR[1]"),
            (r#"{"hostCIDR":["fd00:10::1/64"]}"#, "host bits set"),
            (r#"{"hostCIDR":["fe80::/64"]}"#, "not a usable IPv6 range"),
            (r#"{"hostCIDR":"ff00::/64"}"#, "not a usable IPv6 range"),
            (r#"{"hostCIDR":"::/0"}"#, "not a usable IPv6 range"),
            (r#"{"hostCIDR":"fd00:10::/121"}"#, "/120 or shorter"),
            (r#"{"hostCIDR":"10.10.0.0/31"}"#, "no room for hosts"),
            (
                r#"{"hostCIDR":["10.10.0.0/16","fd00:10::/64"],"hostAddress":["10.10.0.1","10.10.0.2"]}"#,
                "two addresses of one family",
            ),
            (
                r#"{"hostCIDR":["10.10.0.0/16","fd00:10::/64"],"hostAddress":[]}"#,
                "hostAddress: an empty list",
            ),
            (
                r#"{"hostCIDR":["10.10.0.0/16","fd00:10::/64"],"hostAddress":"fd00:11::1"}"#,
                "not a usable address of hostCIDR fd00:10::/64",
            ),
            (
                r#"{"hostCIDR":"10.10.0.0/16","hostAddress":"fd00:10::1"}"#,
                "not a usable address of hostCIDR 10.10.0.0/16",
            ),
        ] {
            let e = parse(j).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(e.contains(why), "{j}: {e:?} lacks {why:?}");
        }
    }

    #[test]
    fn bad_values_name_their_key() {
        for (j, key) in [
            (r#"{"hostCIDR":"10.10.0.1/16"}"#, "hostCIDR"),
            (r#"{"hostCIDR":"x"}"#, "hostCIDR"),
            (
                r#"{"hostInterface":"way-too-long-interface"}"#,
                "hostInterface",
            ),
            (r#"{"overlay":{"listenPort":0}}"#, "overlay.listenPort"),
            (r#"{"overlay":{"listenPort":"5800"}}"#, "overlay.listenPort"),
            (r#"{"overlay":{"stun":["nohost"]}}"#, "overlay.stun[0]"),
            (
                r#"{"overlay":{"turn":[{"server":"a:1","username":"u","password":"p"}]}}"#,
                "overlay.turn[0]",
            ),
            (
                r#"{"overlay":{"turn":[{"server":"a:1","transport":"sctp","username":"u","passwordFile":"/p"}]}}"#,
                "overlay.turn[0].transport",
            ),
            (r#"{"overlay":{"keyFile":"rel/key"}}"#, "overlay.keyFile"),
            (
                r#"{"overlay":{"natUdpTimeout":0}}"#,
                "overlay.natUdpTimeout",
            ),
            (
                r#"{"overlay":{"natUdpTimeout":"30"}}"#,
                "overlay.natUdpTimeout",
            ),
            (
                r#"{"overlay":{"listenport":1}}"#,
                "did you mean \"listenPort\"",
            ),
            (r#"{"overlay":[]}"#, "overlay"),
            (r#"{"hostAddress":"10.10.0.1"}"#, "needs hostCIDR"),
            (
                r#"{"overlay":{"announce":"203.0.113.5:5800"}}"#,
                "overlay.announce",
            ),
            (
                r#"{"overlay":{"announce":["203.0.113.5"]}}"#,
                "overlay.announce[0]",
            ),
            (
                r#"{"overlay":{"announce":["host.example:5800"]}}"#,
                "overlay.announce[0]",
            ),
            (
                r#"{"overlay":{"announce":["203.0.113.5:0"]}}"#,
                "overlay.announce[0]",
            ),
            (
                r#"{"overlay":{"announce":["0.0.0.0:5800"]}}"#,
                "overlay.announce[0]",
            ),
            (
                r#"{"overlay":{"announce":["[2001:db8::1]:5800"]}}"#,
                "overlay.announce[0]",
            ),
            (r#"{"overlay":{"announce":[5800]}}"#, "overlay.announce[0]"),
            (r#"{"overlay":{"portMapping":"no"}}"#, "overlay.portMapping"),
            (r#"{"overlay":{"ipv6":"yes"}}"#, "overlay.ipv6"),
            (
                r#"{"hostCIDR":"10.10.0.0/16","hostAddress":"10.10.0.1/16"}"#,
                "hostAddress",
            ),
            (
                r#"{"hostCIDR":"10.10.0.0/16","hostAddress":"10.10.0.0"}"#,
                "hostAddress",
            ),
            (
                r#"{"hostCIDR":"10.10.0.0/16","hostAddress":"10.11.0.1"}"#,
                "hostAddress",
            ),
        ] {
            let e = parse(j).unwrap_err().to_string();
            assert!(e.contains(key), "{j}: {e}");
        }
    }
    #[test]
    fn servers_by_literal_of_either_family_and_by_name() {
        let v6 = resolve("[2001:db8::1]:3478", "k", true).unwrap();
        assert_eq!(v6, "[2001:db8::1]:3478".parse().unwrap());
        let v4 = resolve("203.0.113.1:3478", "k", true).unwrap();
        assert_eq!(v4, "203.0.113.1:3478".parse().unwrap());
        // No IPv6 socket with overlay.ipv6 false: nothing would answer.
        let e = resolve("[2001:db8::1]:3478", "overlay.stun[0]", false).unwrap_err();
        assert!(e.to_string().contains("overlay.ipv6 is false"), "{e}");
        assert_eq!(resolve("203.0.113.1:3478", "k", false).unwrap(), v4);
        // A name that has an IPv4 address this host routes to: that one.
        let l = resolve("localhost:3478", "k", true).unwrap();
        assert_eq!(l, "127.0.0.1:3478".parse().unwrap());
    }
}
