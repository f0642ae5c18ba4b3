//! A NAT lab in network namespaces, for testing NAT traversal (STUN hole
//! punching, TURN relay) without leaving the machine.
//!
//! Layout:
//! * an "internet" netns with a bridge [`INTERNET_BRIDGE`] on 203.0.113.0/24
//!   (a documentation range that exists only inside the lab). It holds the
//!   servers: [`SERVER_ADDR`] (coturn, etcd, test servers) and extra
//!   addresses from [`Lab::add_server_addr`];
//! * per site, a router netns with a `wan` veth on that bridge (a public
//!   address from the pool .10-.250) and a LAN bridge [`LAN_BRIDGE`] on
//!   192.168.K.0/24 (K = site index + 1). nftables in the router gives the
//!   NAT type, see [`NatType`]. A double NAT is two routers in series joined
//!   by 10.200.K.0/24, the nodes sitting behind the inner one;
//! * per node, a netns with `eth0` on its site's LAN (or, for a
//!   [`NatType::Public`] site, directly on the internet bridge);
//! * a [`NatType::Routed`] site is the scale lab: its router forwards
//!   without NAT and each node has its own point-to-point veth to it, with
//!   its own /24 of 100.64.0.0/10 ([`routed_subnet`]). The kernel's
//!   neighbour table (one table shared by every namespace, limited by the
//!   root namespace's `gc_thresh3`, 1024 by default) then holds about two
//!   entries per node instead of one per pair of nodes on a shared bridge.
//!
//! Router defaults and why (see docs/natlab.md for the experiment behind
//! this): every router also has a stateful input firewall on its WAN side
//! (`ct state established,related accept`, then drop), as home routers have.
//! Without it, a Linux router accepts a peer's unsolicited hole-punching
//! datagram as a connection *to the router itself*; that conntrack entry
//! then forces the router to give the node's own mapping toward that peer a
//! different external port, and sequential punching between two such
//! routers never succeeds. [`Lab::set_router_firewall`] turns the firewall
//! off to reproduce that case.
//!
//! The lab's paths have no latency of their own (a datagram crosses both
//! routers within the sender's `sendto`); [`Lab::set_wan_delay`] adds a
//! one-way delay into a router, which lets hole-punching datagrams cross in
//! flight (`natlab/delay.rs`).
//!
//! Everything is created inside namespaces made here and removed on drop,
//! also when a test panics (set-up steps panic with the failing command's
//! output). Nothing touches the caller's namespace: veths are created from
//! inside a lab namespace with their peer moved straight into another lab
//! namespace. Every command and every wait is bounded.
//!
//! Driving traffic: sockets created inside a namespace keep it, so a test
//! creates them with [`Netns::udp_bind`] and friends (or any code through
//! [`Netns::run`]) and then uses them from its own thread.

use std::collections::BTreeSet;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket};
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::etcd::Etcd;
use crate::keeper::{Keeper, KEEPER_SCRIPT};
use crate::miniupnpd::MiniUpnpd;
use crate::netns::Netns;
use crate::plugin::run_bounded;

mod delay;
mod v6;
use delay::DelayLine;
pub use v6::INTERNET6;

/// The bridge in the internet netns that every WAN port and public node
/// plugs into.
pub const INTERNET_BRIDGE: &str = "inet0";
/// The LAN bridge in a router netns (the inner router of a double NAT).
pub const LAN_BRIDGE: &str = "lan0";
/// A router's public-side interface (also the inner router's uplink in a
/// double NAT): the nft rules match on it.
pub const WAN_IF: &str = "wan";
/// A node's interface.
pub const NODE_IF: &str = "eth0";
/// The internet namespace's own address: coturn, etcd and test servers.
pub const SERVER_ADDR: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// Extra server addresses ([`Lab::add_server_addr`]): 203.0.113.2-9.
const SERVER_EXTRA: RangeInclusive<u8> = 2..=9;
/// Router WAN and public node addresses: 203.0.113.10-250.
const PUBLIC_POOL: RangeInclusive<u8> = 10..=250;
/// Bound for one `ip`/`nft`/`conntrack`/`sysctl` command.
const CMD_TIMEOUT: Duration = Duration::from_secs(20);
/// coturn's listening port (the standard one).
pub const TURN_PORT: u16 = 3478;
/// coturn's relay ports: fixed so that tests and firewall rules know them.
pub const TURN_RELAY_PORTS: RangeInclusive<u16> = 49152..=49407;
/// Bound for coturn to start answering.
const TURN_READY_TIMEOUT: Duration = Duration::from_secs(15);

/// How a site reaches the internet. Mapping = which external port a node's
/// socket gets per destination; filtering = which inbound datagrams reach
/// the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatType {
    /// No NAT: nodes sit on the internet bridge with a 203.0.113.x address.
    Public,
    /// nft `masquerade`: endpoint-independent mapping (Linux keeps the
    /// source port when it is free), address-and-port-dependent filtering.
    PortRestrictedCone,
    /// nft `masquerade fully-random`: a new random external port per
    /// destination (endpoint-dependent mapping).
    Symmetric,
    /// `snat` to the WAN address plus `dnat` of every new inbound UDP
    /// datagram to the site's first node: endpoint-independent mapping and
    /// filtering.
    FullCone,
    /// Port-restricted cone for TCP; forwarded UDP toward the WAN is dropped.
    UdpBlocked,
    /// Two port-restricted cone routers in series.
    DoubleNat,
    /// No NAT, no shared segment: every node on its own /24 of
    /// 100.64.0.0/10 behind the site's router, which forwards (the scale lab).
    Routed,
    /// A home router: port-restricted cone (as [`NatType::PortRestrictedCone`])
    /// running Debian's miniupnpd, which grants port mappings over PCP,
    /// NAT-PMP and UPnP IGD ([`crate::miniupnpd`]).
    Upnp,
}

impl fmt::Display for NatType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// A site of the lab (index into [`Lab`]'s sites).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SiteId(pub usize);

/// A node of the lab (index into [`Lab`]'s nodes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub usize);

/// A lab node: a netns with [`NODE_IF`] on its site's LAN (or the internet
/// bridge) and a default route.
pub struct LabNode {
    pub ns: Netns,
    /// The address of its own interface (private behind a NAT).
    pub addr: IpAddr,
    pub site: SiteId,
    pub id: NodeId,
    /// Short label, `n<index>`.
    pub name: String,
}

struct Site {
    /// The delay on the router's WAN ingress ([`Lab::set_wan_delay`]).
    /// First, so that it goes before the router namespace on drop.
    delay: Mutex<Option<DelayLine>>,
    kind: NatType,
    /// K of 192.168.K.0/24 (and 10.200.K.0/24 of a double NAT).
    lan: u8,
    /// The router on the internet bridge; `None` for a public site.
    router: Option<Netns>,
    /// The router the nodes sit behind in a double NAT.
    inner: Option<Netns>,
    /// Nodes added to this site, in order (the first is a full cone's
    /// inside host).
    nodes: Vec<NodeId>,
    state: Mutex<SiteState>,
    /// A routed site: its router's WAN address, where the internet
    /// namespace routes the site's node subnets.
    routed_via: Option<Ipv4Addr>,
    /// The port-mapping daemon of a [`NatType::Upnp`] router.
    upnp: Option<MiniUpnpd>,
}

impl Site {
    /// The router whose LAN bridge holds the nodes.
    fn lan_router(&self) -> Option<&Netns> {
        self.inner.as_ref().or(self.router.as_ref())
    }

    fn routers(&self) -> impl Iterator<Item = &Netns> {
        self.router.iter().chain(self.inner.iter())
    }
}

struct SiteState {
    /// Behaviour of the WAN-side router: one of PortRestrictedCone,
    /// Symmetric, FullCone, UdpBlocked.
    nat: NatType,
    wan: Option<Ipv4Addr>,
    firewall: bool,
    /// Servers whose STUN answers (ports 3478-3479) the input firewall lets
    /// in: miniupnpd's check that nothing filters in front of it.
    stun_open: Vec<Ipv4Addr>,
}

struct LabState {
    used_public: BTreeSet<u8>,
    next_server: u8,
    /// Node pairs whose direct UDP is dropped.
    blocks: Vec<(NodeId, NodeId)>,
    /// Whether block tables were ever loaded (until then there is nothing
    /// to keep up to date when nodes are added or addresses change).
    blocks_loaded: bool,
    /// The IPv6 internet is on ([`Lab::enable_ipv6`]).
    ipv6: bool,
}

/// The NAT lab. Field order is drop order: nodes, then routers, then the
/// internet (each netns deletion kills what still runs inside it).
pub struct Lab {
    nodes: Vec<LabNode>,
    sites: Vec<Site>,
    internet: Netns,
    state: Mutex<LabState>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A test that panicked while holding the lock leaves consistent data
    // (every update is a single assignment): keep going for the teardown.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `argv` inside `ns`, bounded, and panics with its output on failure.
/// A veth pair: `name` in `ns`, `port` in `bridge_ns` on `bridge`, up.
fn plug(ns: &Netns, name: &str, bridge_ns: &Netns, port: &str, bridge: &str) {
    must(
        bridge_ns,
        &[
            "ip",
            "link",
            "add",
            port,
            "type",
            "veth",
            "peer",
            "name",
            name,
            "netns",
            ns.name(),
        ],
    );
    must(
        bridge_ns,
        &["ip", "link", "set", port, "master", bridge, "up"],
    );
}

/// `dev` in `ns` up with `cidr`, and the default route via `gw`.
fn uplink(ns: &Netns, dev: &str, cidr: &str, gw: Ipv4Addr) {
    must(ns, &["ip", "addr", "add", cidr, "dev", dev]);
    must(ns, &["ip", "link", "set", dev, "up"]);
    must(
        ns,
        &["ip", "route", "add", "default", "via", &gw.to_string()],
    );
}

fn must(ns: &Netns, argv: &[&str]) -> String {
    must_stdin(ns, argv, "")
}

fn must_stdin(ns: &Netns, argv: &[&str], stdin: &str) -> String {
    let out = run_bounded(ns.command(argv), stdin.as_bytes(), CMD_TIMEOUT);
    assert!(
        out.code == 0 && !out.timed_out,
        "in netns {}: {argv:?} failed (code {}, timed out {}): {}{}\n{stdin}",
        ns.name(),
        out.code,
        out.timed_out,
        out.stdout,
        out.stderr
    );
    out.stdout
}

/// Loads an nft ruleset text atomically (one `nft -f` transaction).
fn nft(ns: &Netns, text: &str) {
    must_stdin(ns, &["nft", "-f", "-"], text);
}

/// The text that replaces table `family name` with `body` in one
/// transaction: declaring the table first makes the delete valid when it
/// did not exist yet.
fn replace_table(family: &str, name: &str, body: &str) -> String {
    format!(
        "table {family} {name}\ndelete table {family} {name}\ntable {family} {name} {{\n{body}}}\n"
    )
}

fn public(host: u8) -> Ipv4Addr {
    Ipv4Addr::new(203, 0, 113, host)
}

/// nft rules of a router. `nat` is the WAN-side behaviour, `wan` the
/// address a full cone snats to, `inside` the host a full cone forwards
/// inbound UDP to (none yet: no forwarding).
fn router_rules(
    nat: NatType,
    wan: Ipv4Addr,
    inside: Option<Ipv4Addr>,
    firewall: bool,
    stun_open: &[Ipv4Addr],
) -> String {
    let mut pre = String::new();
    let post = match nat {
        NatType::PortRestrictedCone | NatType::UdpBlocked | NatType::DoubleNat | NatType::Upnp => {
            "masquerade".to_string()
        }
        NatType::Symmetric => "masquerade fully-random".to_string(),
        NatType::FullCone => {
            if let Some(inside) = inside {
                // Only new inbound flows reach a nat chain: replies to the
                // inside host's own flows are translated by conntrack.
                // Matching the WAN address keeps datagrams to a former WAN
                // address (still in a neighbour cache) from getting in.
                pre = format!(
                    "    iifname \"{WAN_IF}\" ip daddr {wan} meta l4proto udp dnat to {inside}\n"
                );
            }
            format!("snat to {wan}")
        }
        NatType::Public | NatType::Routed => panic!("a router cannot NAT as {nat}"),
    };
    let fwd = if nat == NatType::UdpBlocked {
        format!("    oifname \"{WAN_IF}\" meta l4proto udp drop\n")
    } else {
        String::new()
    };
    // A datagram dropped here never gets its conntrack entry confirmed, so
    // an early hole-punching datagram leaves no entry behind that would
    // later move the node's own mapping (docs/natlab.md).
    let input = if firewall {
        let stun =
            match stun_open {
                [] => String::new(),
                ips => format!(
                "    iifname \"{WAN_IF}\" ip saddr {{ {} }} udp sport {{ 3478, 3479 }} accept\n",
                ips.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ")
            ),
            };
        format!(
            "    iifname \"{WAN_IF}\" ct state established,related accept\n{stun}    iifname \"{WAN_IF}\" drop\n"
        )
    } else {
        String::new()
    };
    // The forward chain is not called `fwd`: that is an nft keyword.
    replace_table(
        "ip",
        "natlab",
        &format!(
            r#"  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
{pre}  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname "{WAN_IF}" {post}
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
{fwd}  }}
  chain input {{
    type filter hook input priority filter; policy accept;
{input}  }}
"#
        ),
    )
}

/// A routed node's /24 of 100.64.0.0/10 (by node index, so unique in the
/// lab): network, the router's address on it (.1) and the node's (.2).
pub fn routed_subnet(id: NodeId) -> (Ipv4Addr, Ipv4Addr, Ipv4Addr) {
    // 2^14 /24s in 100.64.0.0/10: far more nodes than one machine runs.
    let i = id.0 % (1 << 14);
    let (a, b) = (64 + (i >> 8) as u8, (i & 0xff) as u8);
    (
        Ipv4Addr::new(100, a, b, 0),
        Ipv4Addr::new(100, a, b, 1),
        Ipv4Addr::new(100, a, b, 2),
    )
}

impl Lab {
    /// Creates the internet netns with its bridge and [`SERVER_ADDR`].
    pub fn new() -> Lab {
        let internet = Netns::new("nli");
        must(
            &internet,
            &["ip", "link", "add", INTERNET_BRIDGE, "type", "bridge"],
        );
        must(
            &internet,
            &[
                "ip",
                "addr",
                "add",
                &format!("{SERVER_ADDR}/24"),
                "dev",
                INTERNET_BRIDGE,
            ],
        );
        must(&internet, &["ip", "link", "set", INTERNET_BRIDGE, "up"]);
        Lab {
            nodes: Vec::new(),
            sites: Vec::new(),
            internet,
            state: Mutex::new(LabState {
                used_public: BTreeSet::new(),
                next_server: *SERVER_EXTRA.start(),
                blocks: Vec::new(),
                blocks_loaded: false,
                ipv6: false,
            }),
        }
    }

    /// The internet namespace (servers live here).
    pub fn internet(&self) -> &Netns {
        &self.internet
    }

    /// [`SERVER_ADDR`] as an `IpAddr`.
    pub fn server_addr(&self) -> IpAddr {
        IpAddr::V4(SERVER_ADDR)
    }

    /// Adds another address (203.0.113.2-9) to the internet bridge: a second
    /// "server" for mapping and filtering checks.
    pub fn add_server_addr(&self) -> IpAddr {
        let host = {
            let mut st = lock(&self.state);
            let h = st.next_server;
            assert!(SERVER_EXTRA.contains(&h), "no more server addresses");
            st.next_server += 1;
            h
        };
        let addr = public(host);
        must(
            &self.internet,
            &[
                "ip",
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                INTERNET_BRIDGE,
            ],
        );
        IpAddr::V4(addr)
    }

    fn alloc_public(&self) -> Ipv4Addr {
        let mut st = lock(&self.state);
        let host = PUBLIC_POOL
            .clone()
            .find(|h| !st.used_public.contains(h))
            .unwrap_or_else(|| panic!("lab out of public addresses"));
        st.used_public.insert(host);
        public(host)
    }

    /// Puts a veth into `ns` named `name`, its peer `peer` into the internet
    /// netns on the internet bridge.
    fn plug_into_internet(&self, ns: &Netns, name: &str, peer: &str) {
        plug(ns, name, &self.internet, peer, INTERNET_BRIDGE);
    }

    /// A router netns: `wan` with `wan_addr/prefix`, default route via `gw`,
    /// forwarding on, its rules loaded.
    fn setup_router(ns: &Netns, wan_cidr: &str, gw: Ipv4Addr) {
        uplink(ns, WAN_IF, wan_cidr, gw);
        must(ns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    }

    fn setup_lan_bridge(ns: &Netns, lan: u8) {
        must(ns, &["ip", "link", "add", LAN_BRIDGE, "type", "bridge"]);
        must(
            ns,
            &[
                "ip",
                "addr",
                "add",
                &format!("192.168.{lan}.1/24"),
                "dev",
                LAN_BRIDGE,
            ],
        );
        must(ns, &["ip", "link", "set", LAN_BRIDGE, "up"]);
    }

    /// Adds a site of the given type; nodes come with [`Lab::add_node`].
    pub fn add_site(&mut self, kind: NatType) -> SiteId {
        let id = SiteId(self.sites.len());
        let lan = u8::try_from(id.0 + 1)
            .ok()
            .filter(|k| *k < 255)
            .unwrap_or_else(|| panic!("too many sites"));
        let mut site = Site {
            delay: Mutex::new(None),
            kind,
            lan,
            router: None,
            inner: None,
            nodes: Vec::new(),
            routed_via: None,
            upnp: None,
            state: Mutex::new(SiteState {
                nat: match kind {
                    NatType::DoubleNat | NatType::Public | NatType::Routed | NatType::Upnp => {
                        NatType::PortRestrictedCone
                    }
                    k => k,
                },
                wan: None,
                firewall: true,
                stun_open: Vec::new(),
            }),
        };
        if kind == NatType::Routed {
            let router = Netns::new("nlr");
            let wan = self.alloc_public();
            self.plug_into_internet(&router, WAN_IF, &format!("r{}", id.0));
            Lab::setup_router(&router, &format!("{wan}/24"), SERVER_ADDR);
            site.routed_via = Some(wan);
            site.router = Some(router);
        } else if kind != NatType::Public {
            // Locals until the site is complete: a failing step drops them,
            // which deletes the namespaces again.
            let router = Netns::new("nlr");
            let wan = self.alloc_public();
            self.plug_into_internet(&router, WAN_IF, &format!("r{}", id.0));
            Lab::setup_router(&router, &format!("{wan}/24"), SERVER_ADDR);
            let nat = {
                let mut st = lock(&site.state);
                st.wan = Some(wan);
                st.nat
            };
            nft(&router, &router_rules(nat, wan, None, true, &[]));
            if kind == NatType::DoubleNat {
                let inner = Netns::new("nlq");
                let mid_outer = Ipv4Addr::new(10, 200, lan, 1);
                let mid_inner = Ipv4Addr::new(10, 200, lan, 2);
                must(
                    &router,
                    &[
                        "ip",
                        "link",
                        "add",
                        "lan",
                        "type",
                        "veth",
                        "peer",
                        "name",
                        WAN_IF,
                        "netns",
                        inner.name(),
                    ],
                );
                must(
                    &router,
                    &[
                        "ip",
                        "addr",
                        "add",
                        &format!("{mid_outer}/24"),
                        "dev",
                        "lan",
                    ],
                );
                must(&router, &["ip", "link", "set", "lan", "up"]);
                Lab::setup_router(&inner, &format!("{mid_inner}/24"), mid_outer);
                Lab::setup_lan_bridge(&inner, lan);
                nft(
                    &inner,
                    &router_rules(NatType::PortRestrictedCone, mid_inner, None, true, &[]),
                );
                site.inner = Some(inner);
            } else {
                Lab::setup_lan_bridge(&router, lan);
            }
            if kind == NatType::Upnp {
                site.upnp = Some(self.start_miniupnpd(&site, &router, wan));
            }
            site.router = Some(router);
        }
        self.sites.push(site);
        id
    }

    /// Adds a node to `site` (several nodes on one site share its router).
    pub fn add_node(&mut self, site: SiteId) -> &LabNode {
        let id = NodeId(self.nodes.len());
        let s = self
            .sites
            .get(site.0)
            .unwrap_or_else(|| panic!("no site {site:?}"));
        let ns = Netns::new("nln");
        let addr = match (s.routed_via, s.router.as_ref()) {
            (Some(via), Some(router)) => self.add_routed_node(&ns, router, via, id),
            _ => self.add_lan_node(&ns, site, id),
        };
        self.sites[site.0].nodes.push(id);
        self.nodes.push(LabNode {
            ns,
            addr: IpAddr::V4(addr),
            site,
            id,
            name: format!("n{}", id.0),
        });
        if self.sites[site.0].nodes.len() == 1 {
            // A full cone forwards to its first node: now there is one.
            self.apply_router(site);
        }
        self.apply_blocks();
        &self.nodes[id.0]
    }

    /// A node on its site's LAN bridge, or on the internet bridge for a
    /// public site: its address.
    fn add_lan_node(&self, ns: &Netns, site: SiteId, id: NodeId) -> Ipv4Addr {
        let s = self.site(site);
        match s.lan_router() {
            None => {
                let addr = self.alloc_public();
                self.plug_into_internet(ns, NODE_IF, &format!("p{}", id.0));
                uplink(ns, NODE_IF, &format!("{addr}/24"), SERVER_ADDR);
                addr
            }
            Some(router) => {
                let host = u8::try_from(s.nodes.len() + 2)
                    .ok()
                    .filter(|h| *h < 255)
                    .unwrap_or_else(|| panic!("too many nodes on site {site:?}"));
                let addr = Ipv4Addr::new(192, 168, s.lan, host);
                let port = format!("n{}", id.0);
                plug(ns, NODE_IF, router, &port, LAN_BRIDGE);
                let gw = Ipv4Addr::new(192, 168, s.lan, 1);
                uplink(ns, NODE_IF, &format!("{addr}/24"), gw);
                addr
            }
        }
    }

    /// A node of a routed site: a veth straight to the router (no bridge,
    /// so the router's neighbour entry for it is the only one), the node's
    /// /24 routed to the router from the internet namespace.
    fn add_routed_node(&self, ns: &Netns, router: &Netns, via: Ipv4Addr, id: NodeId) -> Ipv4Addr {
        let (net, gw, addr) = routed_subnet(id);
        let port = format!("n{}", id.0);
        must(
            router,
            &[
                "ip",
                "link",
                "add",
                &port,
                "type",
                "veth",
                "peer",
                "name",
                NODE_IF,
                "netns",
                ns.name(),
            ],
        );
        must(
            router,
            &["ip", "addr", "add", &format!("{gw}/24"), "dev", &port],
        );
        must(router, &["ip", "link", "set", &port, "up"]);
        uplink(ns, NODE_IF, &format!("{addr}/24"), gw);
        must(
            &self.internet,
            &[
                "ip",
                "route",
                "add",
                &format!("{net}/24"),
                "via",
                &via.to_string(),
            ],
        );
        addr
    }

    fn site(&self, site: SiteId) -> &Site {
        self.sites
            .get(site.0)
            .unwrap_or_else(|| panic!("no site {site:?}"))
    }

    pub fn node(&self, id: NodeId) -> &LabNode {
        self.nodes
            .get(id.0)
            .unwrap_or_else(|| panic!("no node {id:?}"))
    }

    pub fn nodes(&self) -> &[LabNode] {
        &self.nodes
    }

    /// The sites, in the order they were added.
    pub fn site_ids(&self) -> impl Iterator<Item = SiteId> {
        (0..self.sites.len()).map(SiteId)
    }

    /// The type the site was created with.
    pub fn kind(&self, site: SiteId) -> NatType {
        self.site(site).kind
    }

    /// The site's router on the internet bridge (`None` for a public site).
    pub fn router(&self, site: SiteId) -> Option<&Netns> {
        self.site(site).router.as_ref()
    }

    /// The inner router of a double NAT.
    pub fn inner_router(&self, site: SiteId) -> Option<&Netns> {
        self.site(site).inner.as_ref()
    }

    /// The site's current public address (its router's WAN address); `None`
    /// for a public site, whose nodes each have their own.
    pub fn wan_addr(&self, site: SiteId) -> Option<IpAddr> {
        lock(&self.site(site).state).wan.map(IpAddr::V4)
    }

    /// The address the internet sees for `node`.
    pub fn public_addr(&self, node: NodeId) -> IpAddr {
        let n = self.node(node);
        self.wan_addr(n.site).unwrap_or(n.addr)
    }

    fn router_or_panic(&self, site: SiteId, what: &str) -> &Netns {
        self.router(site)
            .unwrap_or_else(|| panic!("{what}: site {site:?} is public and has no router"))
    }

    /// Reloads the WAN-side router's rules from the site state.
    fn apply_router(&self, site: SiteId) {
        let s = self.site(site);
        let (Some(router), Some(wan)) = (s.router.as_ref(), lock(&s.state).wan) else {
            return;
        };
        let inside = match &s.inner {
            Some(_) => Some(Ipv4Addr::new(10, 200, s.lan, 2)),
            None => s.nodes.first().and_then(|n| match self.node(*n).addr {
                IpAddr::V4(a) => Some(a),
                IpAddr::V6(_) => None,
            }),
        };
        let st = lock(&s.state);
        nft(
            router,
            &router_rules(st.nat, wan, inside, st.firewall, &st.stun_open),
        );
        if let Some(inner) = &s.inner {
            nft(
                inner,
                &router_rules(
                    NatType::PortRestrictedCone,
                    Ipv4Addr::new(10, 200, s.lan, 2),
                    None,
                    st.firewall,
                    &[],
                ),
            );
        }
    }

    /// A [`NatType::Upnp`] router: its STUN server's two addresses opened
    /// in the input firewall, then miniupnpd.
    fn start_miniupnpd(&self, site: &Site, router: &Netns, wan: Ipv4Addr) -> MiniUpnpd {
        let ip = |a: IpAddr| match a {
            IpAddr::V4(v4) => v4,
            IpAddr::V6(_) => panic!("server addresses are IPv4"),
        };
        let stun = [ip(self.add_server_addr()), ip(self.add_server_addr())];
        let st = {
            let mut st = lock(&site.state);
            st.stun_open = stun.to_vec();
            router_rules(st.nat, wan, None, st.firewall, &st.stun_open)
        };
        nft(router, &st);
        MiniUpnpd::start(&self.internet, router, stun)
    }

    /// The miniupnpd of a [`NatType::Upnp`] site.
    pub fn miniupnpd(&self, site: SiteId) -> Option<&MiniUpnpd> {
        self.site(site).upnp.as_ref()
    }

    /// `conntrack -F` in every router of the site: the NAT forgets every
    /// mapping (a router reboot, a mapping timeout).
    pub fn flush_conntrack(&self, site: SiteId) {
        let s = self.site(site);
        assert!(
            s.router.is_some(),
            "flush_conntrack: site {site:?} is public"
        );
        for r in s.routers() {
            must(r, &["conntrack", "-F"]);
        }
    }

    /// `conntrack -L` of the site's routers (outer first), for diagnostics.
    pub fn conntrack_list(&self, site: SiteId) -> String {
        let s = self.site(site);
        let mut out = String::new();
        for r in s.routers() {
            out.push_str(&format!("# conntrack -L in {}\n", r.name()));
            let o = run_bounded(r.command(&["conntrack", "-L"]), b"", CMD_TIMEOUT);
            out.push_str(&o.stdout);
        }
        out
    }

    /// Sets `nf_conntrack_udp_timeout` (unreplied flows) and
    /// `nf_conntrack_udp_timeout_stream` (flows that saw replies) in every
    /// router of the site: mappings then expire after `secs` idle seconds.
    /// Existing entries keep the timeout they were last refreshed with.
    pub fn set_udp_timeout(&self, site: SiteId, secs: u32) {
        let s = self.site(site);
        assert!(
            s.router.is_some(),
            "set_udp_timeout: site {site:?} is public"
        );
        for r in s.routers() {
            must(
                r,
                &[
                    "sysctl",
                    "-qw",
                    &format!("net.netfilter.nf_conntrack_udp_timeout={secs}"),
                    &format!("net.netfilter.nf_conntrack_udp_timeout_stream={secs}"),
                ],
            );
        }
    }

    /// Gives the site's router a new, never used public address and returns
    /// it. The NAT keeps working with the new address; the router's
    /// conntrack is flushed, as the old mappings point at an address that
    /// no longer exists (a real router loses them too).
    pub fn change_wan_address(&self, site: SiteId) -> IpAddr {
        let router = self.router_or_panic(site, "change_wan_address");
        let s = self.site(site);
        let old = lock(&s.state)
            .wan
            .unwrap_or_else(|| panic!("site {site:?} has no WAN address"));
        let new = self.alloc_public();
        // Delete first: deleting a primary address also deletes the
        // secondaries of its subnet (promote_secondaries is off).
        must(
            router,
            &["ip", "addr", "del", &format!("{old}/24"), "dev", WAN_IF],
        );
        must(
            router,
            &["ip", "addr", "add", &format!("{new}/24"), "dev", WAN_IF],
        );
        must(
            router,
            &[
                "ip",
                "route",
                "replace",
                "default",
                "via",
                &SERVER_ADDR.to_string(),
            ],
        );
        lock(&s.state).wan = Some(new);
        self.apply_router(site);
        must(router, &["conntrack", "-F"]);
        self.apply_blocks();
        IpAddr::V4(new)
    }

    /// Changes the behaviour of the site's (WAN-side) router at run time,
    /// e.g. symmetric to cone. Existing mappings stay until they expire or
    /// [`Lab::flush_conntrack`]. `nat` must be a router type:
    /// PortRestrictedCone, Symmetric, FullCone or UdpBlocked.
    pub fn set_nat(&self, site: SiteId, nat: NatType) {
        self.router_or_panic(site, "set_nat");
        assert!(
            !matches!(nat, NatType::Public | NatType::DoubleNat),
            "set_nat: {nat} is a topology, not a router behaviour"
        );
        lock(&self.site(site).state).nat = nat;
        self.apply_router(site);
    }

    /// A port forward on the site's router, as a home router's "forward
    /// UDP port P to this host" or a cloud's 1:1 NAT does: new UDP flows to
    /// the WAN address's `port` go to `node`'s same port. A table of its
    /// own, so NAT changes keep it. Only for single-router sites.
    pub fn forward_udp(&self, site: SiteId, port: u16, node: NodeId) {
        let router = self.router_or_panic(site, "forward_udp");
        assert!(
            self.site(site).inner.is_none(),
            "forward_udp: a double NAT needs two forwards"
        );
        let wan = lock(&self.site(site).state).wan;
        let (Some(wan), IpAddr::V4(inside)) = (wan, self.node(node).addr) else {
            panic!("forward_udp: site {site:?} has no IPv4 WAN address or node");
        };
        let text = replace_table(
            "ip",
            "natlab_forward",
            &format!(
                "  chain prerouting {{\n    type nat hook prerouting priority dstnat - 1; policy accept;\n    iifname \"{WAN_IF}\" ip daddr {wan} udp dport {port} dnat to {inside}:{port}\n  }}\n"
            ),
        );
        nft(router, &text);
    }

    /// Turns the routers' stateful WAN input firewall on (the default) or
    /// off. Off reproduces a bare Linux gateway, on which sequential hole
    /// punching between two such sites fails (see the module docs).
    pub fn set_router_firewall(&self, site: SiteId, on: bool) {
        self.router_or_panic(site, "set_router_firewall");
        lock(&self.site(site).state).firewall = on;
        self.apply_router(site);
    }

    /// Delays every IPv4 packet that reaches the site's (outer) router from
    /// the internet by `delay` before the router sees it (conntrack, NAT,
    /// firewall), or removes the delay (`Duration::ZERO`, the default).
    /// One-way latency on the link into this router: with it on two sites,
    /// a round trip between them grows by twice the delay, and datagrams
    /// the two sides send less than the delay apart cross in flight, which
    /// is what punching between two bare Linux gateways needs
    /// (docs/natlab.md, "Latency"). Made with NFQUEUE and a holder thread
    /// of this process, see `natlab/delay.rs`.
    pub fn set_wan_delay(&self, site: SiteId, delay: Duration) {
        let router = self.router_or_panic(site, "set_wan_delay");
        let mut line = lock(&self.site(site).delay);
        if let Some(old) = line.take() {
            old.remove()
                .unwrap_or_else(|e| panic!("set_wan_delay: removing the old delay: {e}"));
        }
        if !delay.is_zero() {
            *line = Some(
                DelayLine::start(router, delay)
                    .unwrap_or_else(|e| panic!("set_wan_delay {delay:?}: {e}")),
            );
        }
    }

    /// The site's WAN delay ([`Lab::set_wan_delay`]) and how many packets
    /// it has held so far.
    pub fn wan_delay(&self, site: SiteId) -> (Duration, u64) {
        lock(&self.site(site).delay)
            .as_ref()
            .map_or((Duration::ZERO, 0), |l| (l.delay(), l.delayed()))
    }

    /// Black-holes TCP between the site and `server:port` at the site's
    /// router (`on`), or lets it through again: packets are dropped, not
    /// refused, so connections hang as they do across a real partition,
    /// while everything else (direct paths between nodes, TURN, STUN)
    /// keeps flowing. A table of its own, so NAT changes keep it.
    pub fn blackhole_tcp(&self, site: SiteId, server: Ipv4Addr, port: u16, on: bool) {
        let router = self.router_or_panic(site, "blackhole_tcp");
        let rules = if on {
            format!(
                "    ip daddr {server} tcp dport {port} drop\n    ip saddr {server} tcp sport {port} drop\n"
            )
        } else {
            String::new()
        };
        let text = replace_table(
            "ip",
            "natlab_blackhole",
            &format!(
                "  chain forward {{\n    type filter hook forward priority filter - 1; policy accept;\n{rules}  }}\n"
            ),
        );
        nft(router, &text);
    }

    /// Drops every UDP datagram between the two nodes' addresses (their own
    /// and their public ones), in both directions, on the internet bridge
    /// and on LAN bridges: their direct path is dead while their traffic
    /// with the servers (coturn) still flows. Nodes sharing a public address
    /// with one of them (same router) are affected as well.
    pub fn block_udp_between(&self, a: NodeId, b: NodeId) {
        self.node(a);
        self.node(b);
        {
            let mut st = lock(&self.state);
            if !st.blocks.contains(&(a, b)) && !st.blocks.contains(&(b, a)) {
                st.blocks.push((a, b));
            }
        }
        self.apply_blocks();
    }

    /// Undoes [`Lab::block_udp_between`].
    pub fn unblock_udp_between(&self, a: NodeId, b: NodeId) {
        lock(&self.state)
            .blocks
            .retain(|p| *p != (a, b) && *p != (b, a));
        self.apply_blocks();
    }

    /// (Re)loads the block rules into the internet netns and every LAN
    /// router: a bridge-family table, since this traffic is bridged, not
    /// routed, in both places.
    fn apply_blocks(&self) {
        let blocks = {
            let mut st = lock(&self.state);
            if st.blocks.is_empty() && !st.blocks_loaded {
                return;
            }
            st.blocks_loaded = true;
            st.blocks.clone()
        };
        let addrs = |n: NodeId| {
            let mut set: BTreeSet<IpAddr> = BTreeSet::new();
            set.insert(self.node(n).addr);
            set.insert(self.public_addr(n));
            set.iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut rules = String::new();
        for (a, b) in &blocks {
            let (sa, sb) = (addrs(*a), addrs(*b));
            for (src, dst) in [(&sa, &sb), (&sb, &sa)] {
                rules.push_str(&format!(
                    "    ip saddr {{ {src} }} ip daddr {{ {dst} }} meta l4proto udp drop\n"
                ));
            }
        }
        let text = replace_table(
            "bridge",
            "natlab_block",
            &format!(
                "  chain forward {{\n    type filter hook forward priority filter; policy accept;\n{rules}  }}\n"
            ),
        );
        nft(&self.internet, &text);
        for s in &self.sites {
            if let Some(r) = s.lan_router() {
                nft(r, &text);
            }
        }
    }

    /// Starts coturn on [`SERVER_ADDR`]:[`TURN_PORT`] in the internet netns,
    /// relaying to any lab address; see [`Coturn`].
    pub fn start_coturn(&self) -> Coturn {
        Coturn::start_in(&self.internet, SERVER_ADDR)
    }

    /// Starts a single etcd member in the internet netns serving clients on
    /// [`SERVER_ADDR`] (reachable over TCP from every node).
    pub fn start_etcd(&self) -> Etcd {
        Etcd::start_in(&self.internet.path(), self.server_addr())
    }
}

impl Default for Lab {
    fn default() -> Lab {
        Lab::new()
    }
}

// ---------------------------------------------------------------------------
// STUN (RFC 5389) binding: just enough to learn a mapping.

/// The STUN magic cookie.
pub const STUN_MAGIC: u32 = 0x2112_A442;
const STUN_BINDING_REQUEST: u16 = 0x0001;
const STUN_BINDING_SUCCESS: u16 = 0x0101;
const ATTR_MAPPED_ADDRESS: u16 = 0x0001;
const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;

/// A transaction id that differs per call, per process and per run.
pub fn stun_transaction_id() -> [u8; 12] {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut id = [0u8; 12];
    id[..8].copy_from_slice(&nanos.to_be_bytes());
    let n = COUNTER.fetch_add(1, Ordering::Relaxed) ^ std::process::id().rotate_left(20);
    id[8..].copy_from_slice(&n.to_be_bytes());
    id
}

/// A binding request without attributes.
pub fn stun_binding_request(txid: &[u8; 12]) -> [u8; 20] {
    let mut m = [0u8; 20];
    m[..2].copy_from_slice(&STUN_BINDING_REQUEST.to_be_bytes());
    m[4..8].copy_from_slice(&STUN_MAGIC.to_be_bytes());
    m[8..].copy_from_slice(txid);
    m
}

/// The mapped address of a binding success response to `txid`
/// (XOR-MAPPED-ADDRESS, else MAPPED-ADDRESS; IPv6 as XOR-MAPPED-ADDRESS).
pub fn parse_stun_binding_response(buf: &[u8], txid: &[u8; 12]) -> Option<SocketAddr> {
    if buf.len() < 20
        || u16::from_be_bytes([buf[0], buf[1]]) != STUN_BINDING_SUCCESS
        || u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]) != STUN_MAGIC
        || &buf[8..20] != txid
    {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
    let body = buf.get(20..20 + len)?;
    let mut plain = None;
    let mut i = 0;
    while i + 4 <= body.len() {
        let t = u16::from_be_bytes([body[i], body[i + 1]]);
        let l = usize::from(u16::from_be_bytes([body[i + 2], body[i + 3]]));
        let v = body.get(i + 4..i + 4 + l)?;
        if (t == ATTR_XOR_MAPPED_ADDRESS || t == ATTR_MAPPED_ADDRESS) && l == 8 && v[1] == 1 {
            let mut port = u16::from_be_bytes([v[2], v[3]]);
            let mut ip = u32::from_be_bytes([v[4], v[5], v[6], v[7]]);
            if t == ATTR_XOR_MAPPED_ADDRESS {
                port ^= (STUN_MAGIC >> 16) as u16;
                ip ^= STUN_MAGIC;
                return Some(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(ip), port)));
            }
            plain = Some(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(ip), port)));
        }
        if t == ATTR_XOR_MAPPED_ADDRESS && l == 20 && v[1] == 2 {
            // IPv6: XORed with the magic cookie and the transaction ID.
            let port = u16::from_be_bytes([v[2], v[3]]) ^ (STUN_MAGIC >> 16) as u16;
            let mut key = [0u8; 16];
            key[..4].copy_from_slice(&STUN_MAGIC.to_be_bytes());
            key[4..].copy_from_slice(txid);
            let mut ip = [0u8; 16];
            for (k, b) in ip.iter_mut().enumerate() {
                *b = v[4 + k] ^ key[k];
            }
            return Some(SocketAddr::new(IpAddr::V6(ip.into()), port));
        }
        i += 4 + l.div_ceil(4) * 4;
    }
    plain
}

/// The binding success response carrying `mapped` as XOR-MAPPED-ADDRESS.
fn stun_binding_response(txid: &[u8], mapped: SocketAddrV4) -> [u8; 32] {
    let mut m = [0u8; 32];
    m[..2].copy_from_slice(&STUN_BINDING_SUCCESS.to_be_bytes());
    m[2..4].copy_from_slice(&12u16.to_be_bytes());
    m[4..8].copy_from_slice(&STUN_MAGIC.to_be_bytes());
    m[8..20].copy_from_slice(txid);
    m[20..22].copy_from_slice(&ATTR_XOR_MAPPED_ADDRESS.to_be_bytes());
    m[22..24].copy_from_slice(&8u16.to_be_bytes());
    m[25] = 1;
    m[26..28].copy_from_slice(&(mapped.port() ^ (STUN_MAGIC >> 16) as u16).to_be_bytes());
    m[28..32].copy_from_slice(&(u32::from(*mapped.ip()) ^ STUN_MAGIC).to_be_bytes());
    m
}

/// Asks `server` which address `sock`'s datagrams come from, retrying every
/// 200 ms until `timeout`. Datagrams that are not the answer are discarded.
/// The socket's read timeout is restored afterwards.
pub fn stun_binding(
    sock: &UdpSocket,
    server: SocketAddr,
    timeout: Duration,
) -> io::Result<SocketAddr> {
    let saved = sock.read_timeout()?;
    let deadline = Instant::now() + timeout;
    let txid = stun_transaction_id();
    let req = stun_binding_request(&txid);
    let mut buf = [0u8; 1500];
    let result = 'outer: loop {
        let now = Instant::now();
        if now >= deadline {
            break Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no STUN answer from {server} in {timeout:?}"),
            ));
        }
        if let Err(e) = sock.send_to(&req, server) {
            break Err(e);
        }
        let retry = (now + Duration::from_millis(200)).min(deadline);
        loop {
            let left = retry.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            sock.set_read_timeout(Some(left))?;
            match sock.recv_from(&mut buf) {
                Ok((n, from)) if from == server => {
                    if let Some(a) = parse_stun_binding_response(&buf[..n], &txid) {
                        break 'outer Ok(a);
                    }
                }
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::ConnectionRefused
                            // A socket with SO_RCVTIMEO returns EINTR after
                            // the process was stopped and continued, even
                            // without a signal handler (signal(7)).
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => break 'outer Err(e),
            }
        }
    };
    sock.set_read_timeout(saved)?;
    result
}

/// A binding request over an established TCP connection (STUN over TCP
/// has no extra framing); bounded by `timeout`.
pub fn stun_binding_tcp(stream: &mut TcpStream, timeout: Duration) -> io::Result<SocketAddr> {
    let txid = stun_transaction_id();
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(&stun_binding_request(&txid))?;
    let mut head = [0u8; 20];
    stream.read_exact(&mut head)?;
    let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
    let mut msg = head.to_vec();
    msg.resize(20 + len, 0);
    stream.read_exact(&mut msg[20..])?;
    parse_stun_binding_response(&msg, &txid)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not a binding success response"))
}

/// A minimal STUN binding server on a thread (answers binding requests with
/// the source address it saw, records the source of every datagram).
/// Stopped and joined on drop.
pub struct StunServer {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl StunServer {
    /// Binds `addr` inside `ns` and serves it.
    pub fn start(ns: &Netns, addr: SocketAddr) -> StunServer {
        let sock = ns
            .udp_bind(addr)
            .unwrap_or_else(|e| panic!("STUN server bind {addr} in {}: {e}", ns.name()));
        let addr = sock
            .local_addr()
            .unwrap_or_else(|e| panic!("STUN server local_addr: {e}"));
        // The timeout bounds how long drop waits for the thread.
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap_or_else(|e| panic!("set_read_timeout: {e}"));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen2, stop2) = (seen.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !stop2.load(Ordering::Relaxed) {
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    continue;
                };
                lock(&seen2).push(from);
                let m = &buf[..n];
                let is_request = n >= 20
                    && u16::from_be_bytes([m[0], m[1]]) == STUN_BINDING_REQUEST
                    && u32::from_be_bytes([m[4], m[5], m[6], m[7]]) == STUN_MAGIC;
                if let (true, SocketAddr::V4(from4)) = (is_request, from) {
                    let _ = sock.send_to(&stun_binding_response(&m[8..20], from4), from);
                }
            }
        });
        StunServer {
            addr,
            seen,
            stop,
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sources of every datagram received so far, in order.
    pub fn seen(&self) -> Vec<SocketAddr> {
        lock(&self.seen).clone()
    }
}

impl Drop for StunServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends UDP datagrams with any source address and port from inside a lab
/// namespace: a raw socket (IPPROTO_RAW, so the IP header is ours; the
/// kernel fills in its checksum and ID). For tests that forge packets
/// "from" a server, e.g. the internet namespace posing as coturn.
pub struct Spoofer {
    fd: std::os::fd::OwnedFd,
}

impl Spoofer {
    pub fn new(ns: &Netns) -> io::Result<Spoofer> {
        use nix::sys::socket::{socket, AddressFamily, SockFlag, SockProtocol, SockType};
        let fd = ns.run(|| {
            socket(
                AddressFamily::Inet,
                SockType::Raw,
                SockFlag::SOCK_CLOEXEC,
                SockProtocol::Raw,
            )
        })?;
        Ok(Spoofer { fd })
    }

    /// One datagram `from` -> `to` (UDP checksum 0: none, as IPv4 allows).
    pub fn send(&self, from: SocketAddrV4, to: SocketAddrV4, payload: &[u8]) -> io::Result<()> {
        use nix::sys::socket::{sendto, MsgFlags, SockaddrIn};
        use std::os::fd::AsRawFd;
        let udp_len = 8 + payload.len();
        let total = 20 + udp_len;
        let (Ok(total16), Ok(udp16)) = (u16::try_from(total), u16::try_from(udp_len)) else {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "too long"));
        };
        let mut p = Vec::with_capacity(total);
        p.extend_from_slice(&[0x45, 0]);
        p.extend_from_slice(&total16.to_be_bytes());
        // ID and checksum 0: the kernel fills them in; TTL 64, UDP.
        p.extend_from_slice(&[0, 0, 0, 0, 64, 17, 0, 0]);
        p.extend_from_slice(&from.ip().octets());
        p.extend_from_slice(&to.ip().octets());
        p.extend_from_slice(&from.port().to_be_bytes());
        p.extend_from_slice(&to.port().to_be_bytes());
        p.extend_from_slice(&udp16.to_be_bytes());
        p.extend_from_slice(&[0, 0]);
        p.extend_from_slice(payload);
        let dst = SockaddrIn::from(to);
        sendto(self.fd.as_raw_fd(), &p, &dst, MsgFlags::empty())?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// coturn

/// coturn (`turnserver`) running in a lab namespace, with long-term
/// credentials, UDP and TCP on [`TURN_PORT`], relay ports
/// [`TURN_RELAY_PORTS`], relaying only to 203.0.113.0/24 peers. Killed on
/// drop (and by its keeper if the test process dies).
///
/// With an IPv6 address ([`Coturn::start_dual_in`]) it also listens there
/// (STUN and TURN over IPv6), but its relayed addresses stay IPv4: a client
/// that asks for no family (RFC 8656 REQUESTED-ADDRESS-FAMILY absent) gets
/// an IPv4 one whatever its own family, which is what an IPv6-only node
/// needs to be reached by IPv4-only peers (coturn 4.6.1 does exactly this;
/// docs/overlay-design.md, IPv6).
pub struct Coturn {
    netns: PathBuf,
    addr: Ipv4Addr,
    addr6: Option<std::net::Ipv6Addr>,
    user: String,
    password: String,
    realm: String,
    dir: tempfile::TempDir,
    keeper: Option<Keeper>,
}

impl Coturn {
    /// Starts coturn inside `ns` on `addr` and waits until it answers a
    /// STUN binding request (bounded).
    pub fn start_in(ns: &Netns, addr: Ipv4Addr) -> Coturn {
        Coturn::start_with(ns, addr, None)
    }

    /// [`Coturn::start_in`], listening on `addr6` too (the namespace must
    /// have it, e.g. the lab internet's [`v6::INTERNET6`]).
    pub fn start_dual_in(ns: &Netns, addr: Ipv4Addr, addr6: std::net::Ipv6Addr) -> Coturn {
        Coturn::start_with(ns, addr, Some(addr6))
    }

    fn start_with(ns: &Netns, addr: Ipv4Addr, addr6: Option<std::net::Ipv6Addr>) -> Coturn {
        let dir = tempfile::Builder::new()
            .prefix("evio-turn-")
            .tempdir()
            .unwrap_or_else(|e| panic!("coturn temp dir: {e}"));
        let mut c = Coturn {
            netns: ns.path(),
            addr,
            addr6,
            user: "evio".into(),
            password: "evio-turn-pw".into(),
            realm: "evio.test".into(),
            dir,
            keeper: None,
        };
        c.start();
        c
    }

    fn args(&self) -> Vec<String> {
        let d = self.dir.path();
        let (lo, hi) = (TURN_RELAY_PORTS.start(), TURN_RELAY_PORTS.end());
        let mut v = vec![
            "nsenter".into(),
            format!("--net={}", self.netns.display()),
            "--".into(),
            "turnserver".into(),
            // No config file: everything is on the command line.
            "-n".into(),
            format!("--listening-ip={}", self.addr),
            format!("--listening-port={TURN_PORT}"),
            format!("--relay-ip={}", self.addr),
            format!("--external-ip={}", self.addr),
            format!("--min-port={lo}"),
            format!("--max-port={hi}"),
            "--lt-cred-mech".into(),
            format!("--user={}:{}", self.user, self.password),
            format!("--realm={}", self.realm),
            "--fingerprint".into(),
            "--no-tls".into(),
            "--no-dtls".into(),
            "--no-cli".into(),
            "--no-multicast-peers".into(),
            // Lab peers live in a documentation range; allow exactly it.
            "--allowed-peer-ip=203.0.113.0-203.0.113.255".into(),
            // Keep coturn's state out of /var/lib/turn and /var/run.
            format!("--userdb={}", d.join("turndb").display()),
            format!("--pidfile={}", d.join("turn.pid").display()),
            format!("--log-file={}", d.join("turn.log").display()),
            "--simple-log".into(),
            "--no-stdout-log".into(),
        ];
        if let Some(a6) = self.addr6 {
            // Listening only: no --relay-ip for it, so relayed addresses
            // stay IPv4 (see the type's doc).
            v.push(format!("--listening-ip={a6}"));
        }
        v
    }

    /// Starts coturn again after [`Coturn::stop`] (same address, port and
    /// credentials); a no-op while it runs.
    pub fn start(&mut self) {
        if self.keeper.is_some() {
            return;
        }
        let stderr = self.dir.path().join("stderr.log");
        self.keeper = Some(Keeper::spawn(KEEPER_SCRIPT, &self.args(), Some(&stderr)));
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + TURN_READY_TIMEOUT;
        let server = self.addr();
        let netns = self.netns.clone();
        let sock = crate::netns::run_in_netns_path(&netns, || {
            UdpSocket::bind(SocketAddr::new(IpAddr::V4(self.addr), 0))
        })
        .unwrap_or_else(|e| panic!("coturn probe socket: {e}"));
        let v6 = self.addr6.map(|a6| {
            crate::netns::run_in_netns_path(&netns, || {
                UdpSocket::bind(SocketAddr::new(IpAddr::V6(a6), 0))
            })
            .unwrap_or_else(|e| panic!("coturn IPv6 probe socket: {e}"))
        });
        loop {
            let ok6 = match (&v6, self.addr6()) {
                (Some(s6), Some(server6)) => {
                    stun_binding(s6, server6, Duration::from_millis(300)).is_ok()
                }
                _ => true,
            };
            if ok6 && stun_binding(&sock, server, Duration::from_millis(300)).is_ok() {
                return;
            }
            let exited = self.keeper.as_mut().is_some_and(|k| k.exited());
            if exited || Instant::now() > deadline {
                panic!(
                    "coturn at {server} not answering STUN (exited: {exited}); log:\n{}",
                    self.log()
                );
            }
        }
    }

    /// Kills coturn (SIGKILL, as a crash would) and waits until it is gone.
    pub fn stop(&mut self) {
        if let Some(k) = self.keeper.take() {
            k.stop();
        }
    }

    pub fn is_running(&self) -> bool {
        self.keeper.is_some()
    }

    /// `addr:3478` (UDP and TCP).
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.addr), TURN_PORT)
    }

    /// `[addr6]:3478` when it listens on IPv6 too.
    pub fn addr6(&self) -> Option<SocketAddr> {
        self.addr6
            .map(|a| SocketAddr::new(IpAddr::V6(a), TURN_PORT))
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    pub fn password(&self) -> &str {
        &self.password
    }

    pub fn realm(&self) -> &str {
        &self.realm
    }

    /// coturn's directory (log, pid file, user database); removed on drop.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// coturn's log and whatever it printed on stderr, for diagnostics.
    pub fn log(&self) -> String {
        let read = |n: &str| std::fs::read_to_string(self.dir.path().join(n)).unwrap_or_default();
        format!("{}{}", read("turn.log"), read("stderr.log"))
    }
}

impl Drop for Coturn {
    fn drop(&mut self) {
        self.stop();
    }
}
