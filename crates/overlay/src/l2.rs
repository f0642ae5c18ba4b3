//! The pod overlay's switch: for every frame, where it may go.
//!
//! The agent's TAP is one port of the local node bridge; every peer is a
//! node whose bridge is reachable through a tunnel. The switch sees frames
//! the local bridge sent into the TAP ([`Switch::from_local`]) and frames a
//! peer sent us ([`Switch::from_peer`]). A frame from a peer can only be
//! delivered to the TAP or dropped, so split horizon holds by construction:
//! nothing is ever relayed from one peer to another.
//!
//! The overlay port is secured the way OVN secures a logical switch port
//! (what a peer may source) and Tailscale filters packets (where they may
//! go): a peer is a node, trusted for its own pod subnet and host address
//! and for nothing else, whatever its pods put in their frames.
//!
//! # From the local bridge, first match wins
//!
//! 1. Shorter than an Ethernet header, or a multicast source MAC: `Malformed`.
//!    Every other source MAC is remembered as local (see Learning).
//! 2. To an 802.1D link-local group (STP, pause, LLDP…): `LinkLocal`. Each
//!    bridge runs its own link; joining them would merge spanning trees.
//! 3. Not IPv4, ARP or IPv6 (a VLAN tag included): `EtherType`. An IP header
//!    or UDP header that doesn't parse, ARP other than an Ethernet/IPv4
//!    request or reply: `Malformed`.
//! 4. DHCPv4 (UDP 67/68) or DHCPv6 (UDP 546/547): `Dhcp`. Every node has its
//!    own address management; a DHCP server leaking across would hand out
//!    another node's addresses.
//! 5. Longer than `mtu` after the Ethernet header (unless a GSO super-frame,
//!    which the segmenter cuts): IPv4 with DF is answered with ICMP
//!    "fragmentation needed", IPv6 with "packet too big", both written into
//!    `out` as if the destination's path had sent them; anything else
//!    (IPv4 without DF, ARP, or a packet that must not be answered) `TooBig`.
//!    Without this a large TCP transfer stalls silently (an MTU black hole).
//! 6. ARP. A gratuitous announcement (sender = target) or an RFC 5227 probe
//!    (sender 0.0.0.0) is about the local link: `Local`. A request is
//!    answered here when it can be, so that ARP broadcasts never cross: a
//!    target in the local subnet `Local`; otherwise its owner is the peer
//!    whose pod subnet holds it (none: `NoRoute`). The answer is a binding
//!    learned from that peer's own ARP when there is one; else the derived
//!    pod MAC (`0a:58` + IPv4, what the CNI plugin assigns), except for the
//!    peer's gateway `.1`: that is its bridge, whose MAC is random, so the
//!    request goes to the owner alone (`Unicast`, from the sender's
//!    resolution budget) and its reply teaches us the binding. ARP replies
//!    are unicast frames (rule 8).
//! 7. IPv6 to a multicast MAC: a neighbour solicitation goes to the owner of
//!    its target only (`Unicast`, from the resolution budget); a target in
//!    the local subnet or duplicate address detection (source `::`) is
//!    `Local`, a target nobody owns `NoRoute`. Any other IPv6 multicast (RS,
//!    RA, MLD, mDNS…) concerns the local link: `LinkLocal`.
//! 8. To a unicast MAC: a MAC learned from a peer goes to that peer; a
//!    derived IPv4 pod MAC to the owner of the address it encodes (`Local`
//!    if that is ours); else the owner of the destination IP (`Local` if
//!    ours); else unknown unicast is flooded (flood budget).
//! 9. Broadcast and other multicast: flooded (flood budget).
//!
//! Budgets are token buckets per local source MAC (`flood_rate` per second,
//! `flood_burst`), one for floods and one for resolution (ARP and ND sent to
//! an owner), so that one pod's storm neither costs the other nodes more
//! than a bounded amount nor takes neighbour resolution from the other pods
//! of its node. An empty bucket is `RateLimited`. Sources past the table's
//! bound share one bucket pair.
//!
//! # From a peer, first match wins
//!
//! 1. `Malformed`, `LinkLocal`, `EtherType` and `Dhcp` as above, in that
//!    order (the same checks as from the bridge); longer than `mtu` after
//!    the Ethernet header: `TooBig` (the sender cuts to it).
//! 2. Neighbour discovery (ICMPv6 past any hop-by-hop, routing and
//!    destination options headers): router solicitations, advertisements
//!    and redirects concern one link: `LinkLocal`. A solicitation's source
//!    link-layer option and an advertisement's target link-layer option must
//!    be the frame's source MAC, and an advertisement's target an address of
//!    the peer's subnet that is not ours: else `Spoofed`. This is the IPv6
//!    form of the ARP-sender rule; without it one advertisement rewrites a
//!    pod's neighbour entry for its own gateway.
//! 3. The source must belong to the peer, else `Spoofed`: an IPv4 source or
//!    ARP sender address in its pod subnet or equal to its host address
//!    (never 0.0.0.0, and the ARP sender MAC must be the frame's source MAC,
//!    since that is what neighbours cache); an IPv6 source in its pod subnet
//!    and neither link-local nor unspecified. Nothing in this node's own
//!    subnet ever comes from a peer, whatever a peer's record claims. An
//!    unknown peer owns nothing.
//! 4. The destination must be here, else `Transit`: an ARP or solicitation
//!    target in the local subnet; an IP destination in the local subnet (the
//!    gateway included), a broadcast or multicast address, or IPv6
//!    link-local; or a broadcast/multicast MAC, which no host forwards. A
//!    peer's pod could otherwise send to our gateway MAC for any address and
//!    have this node route it into its LAN or the internet.
//! 5. The source MAC, as port security on a logical switch port: never the
//!    local bridge's nor any MAC seen on the local side; a derived MAC must
//!    be one of the peer's pods (IPv4: `0a:58` + an address of its subnet;
//!    IPv6: [`pod_mac_v6`] of the packet's source); any other MAC only if it
//!    is the peer's bridge: the MAC its record names (`bridgeMac`, what its
//!    agent publishes), else the first one that speaks for the bridge (an
//!    ARP sender, or an IP source, that is the peer's gateway or host
//!    address), held while it is heard. The record's word matters: a
//!    peer's host routes its pods' traffic to our pods (a Service's DNAT)
//!    from its bridge's MAC, with the pods' addresses, before the bridge
//!    ever speaks for itself. Anything else is `Spoofed`.
//! 6. Broadcast and multicast frames spend the peer's receive budget
//!    (`peer_flood_rate`, `peer_flood_burst`): `RateLimited`.
//!
//! # Learning
//!
//! Every source MAC the local bridge sends us is local (bounded, refreshed,
//! expiring like the peers' entries); a local MAC a peer had taught is
//! forgotten there. Frames from peers that passed every check teach the
//! switch their source MAC, and an ARP sender address of the peer's subnet
//! is bound to it (for local rule 6). Bindings come from ARP only: an IP
//! packet's source MAC is its last hop's, which for a routed packet is not
//! the owner of its source address.
//!
//! A MAC learned from one peer is not taken over by another while the entry
//! is alive: the frame claiming it is `Spoofed`. Random MACs don't collide in
//! practice, so a second claimant is an impostor trying to draw traffic to
//! itself; once the owner has been silent for `mac_ttl` the MAC is free
//! again (a bridge recreated on another node). Entries are refreshed by
//! every frame from their owner, expire after `mac_ttl`, and each peer holds
//! at most `max_macs_per_peer` besides its bridge: past that, frames from a
//! new MAC are dropped (`MacLimit`), never make room by evicting, so a flood
//! of source MACs cannot fill the local bridge's forwarding table.
//!
//! # Costs
//!
//! No allocation per frame: every table is reserved up front, for twice its
//! bound (hash tables rehash in place only below half load); what a peer's
//! frames teach, once it has a session ([`Switch::reserve`]): a peer that
//! never sends costs no learning table. Subnet lookups
//! hash the address once per distinct peer prefix length (one, in a cluster
//! built by `config-gen`). The IPv6 MAC check hashes an address only for a
//! MAC not yet learned from that source address.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use ipnet::IpNet;

use crate::bucket::TokenBucket;

use crate::packet::{
    build_arp_reply, build_icmpv4_frag_needed, build_icmpv6_packet_too_big, is_link_local_group,
    is_multicast, pod_mac, pod_mac_ipv4, pod_mac_v6, Arp, Ethernet, Icmp, Ip, Ipv4, Ipv6, Mac, Udp,
    ARP_REPLY, ARP_REQUEST, ETHERTYPE_ARP, ETHERTYPE_IPV4, ETHERTYPE_IPV6, ICMPV6_NEIGHBOR_ADVERT,
    ICMPV6_NEIGHBOR_SOLICIT, ICMPV6_REDIRECT, ICMPV6_ROUTER_ADVERT, ICMPV6_ROUTER_SOLICIT,
    IPPROTO_ICMPV6, IPPROTO_UDP, ND_SOURCE_LLADDR, ND_TARGET_LLADDR,
};

pub type PeerId = u32;

/// Local source MACs remembered (never accepted from a peer).
const MAX_LOCAL_MACS: usize = 4096;
/// Local sources with budgets of their own; the rest share one pair.
const MAX_SOURCES: usize = 1024;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SwitchConfig {
    /// This node's pod subnet, e.g. 10.244.3.0/24.
    pub local_subnet: IpNet,
    /// This node's host-overlay address: host packets from peers go there
    /// or to the pod subnet, nowhere else.
    pub host_addr: Option<IpAddr>,
    /// Its IPv6 host-overlay address beside an IPv4 `host_addr`.
    pub host_addr6: Option<IpAddr>,
    /// The local bridge's MAC, never a peer's.
    pub bridge_mac: Option<Mac>,
    /// The largest IP packet a frame may carry across, e.g. 1380.
    pub mtu: usize,
    /// Token buckets of each local source, one for floods and one for
    /// ARP/ND requests sent to one peer: tokens per second and bucket size.
    pub flood_rate: u32,
    pub flood_burst: u32,
    /// Token bucket of each peer for the broadcasts and multicasts it sends.
    pub peer_flood_rate: u32,
    pub peer_flood_burst: u32,
    /// Learned MACs per peer, its bridge aside; past it new MACs are dropped.
    pub max_macs_per_peer: usize,
    /// Learned entries not refreshed for this long are gone (300 s).
    pub mac_ttl: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerAddrs {
    pub pod_subnet: IpNet,
    pub host_addr: Option<IpAddr>,
    /// Its IPv6 host-overlay address beside an IPv4 `host_addr` (a
    /// dual-stack host CIDR): as much its own as `host_addr`.
    pub host_addr6: Option<IpAddr>,
    /// Its bridge's MAC, as its record says: pinned from the start, so
    /// that what its host routes to our pods (a Service's DNAT) gets
    /// through before its bridge ever speaks for itself. `None` (an older
    /// agent): pinned when it first does.
    pub bridge_mac: Option<Mac>,
}

impl PeerAddrs {
    /// Whether `ip` is one of the peer's host-overlay addresses.
    pub fn is_host(&self, ip: IpAddr) -> bool {
        self.host_addr == Some(ip) || self.host_addr6 == Some(ip)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocalVerdict {
    /// Send to this peer only.
    Unicast(PeerId),
    /// Send to every peer.
    Flood,
    /// Write this many bytes of `out` back into the TAP; send nothing.
    Reply(usize),
    Drop(DropReason),
}

/// A frame from a peer goes to the TAP or nowhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerVerdict {
    Deliver,
    Drop(DropReason),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Too short, a multicast source MAC, an IP/ARP/UDP header that doesn't
    /// parse.
    Malformed,
    /// A source (address or MAC) that doesn't belong to the peer that sent
    /// it.
    Spoofed,
    /// For this node's own subnet, or about the local link only.
    Local,
    Dhcp,
    /// 802.1D link-local groups; IPv6 multicast other than solicitations;
    /// router discovery and redirects from peers.
    LinkLocal,
    /// Neither IPv4, ARP nor IPv6 (VLAN-tagged frames included).
    EtherType,
    /// A flood or resolution budget is spent.
    RateLimited,
    /// No peer owns the destination.
    NoRoute,
    /// Over the MTU and not to be answered with ICMP.
    TooBig,
    /// From a peer, for somewhere other than this node.
    Transit,
    /// From a peer that already has as many MACs as it may.
    MacLimit,
}

impl DropReason {
    pub const ALL: [DropReason; 11] = [
        DropReason::Malformed,
        DropReason::Spoofed,
        DropReason::Local,
        DropReason::Dhcp,
        DropReason::LinkLocal,
        DropReason::EtherType,
        DropReason::RateLimited,
        DropReason::NoRoute,
        DropReason::TooBig,
        DropReason::Transit,
        DropReason::MacLimit,
    ];

    /// The metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::Spoofed => "spoofed",
            DropReason::Local => "local",
            DropReason::Dhcp => "dhcp",
            DropReason::LinkLocal => "link_local",
            DropReason::EtherType => "ether_type",
            DropReason::RateLimited => "rate_limited",
            DropReason::NoRoute => "no_route",
            DropReason::TooBig => "too_big",
            DropReason::Transit => "transit",
            DropReason::MacLimit => "mac_limit",
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SwitchStats {
    pub peers: usize,
    /// MACs learned from peers, expired ones included until
    /// [`Switch::expire`] runs.
    pub learned_macs: usize,
    /// IPv4 → MAC bindings learned from peers' ARP.
    pub learned_ips: usize,
    /// Source MACs seen on the local side.
    pub local_macs: usize,
}

use DropReason::*;

/// A MAC heard from a peer, and the address it last announced in ARP.
#[derive(Clone, Copy, Debug)]
struct Learned {
    mac: Mac,
    ip: Option<Ipv4Addr>,
    /// For an IPv6 pod MAC, the source address it was checked against, so
    /// that the next frame from that address need not hash it again.
    v6: Option<Ipv6Addr>,
    seen: Instant,
}

/// Where a learned MAC lives: `peers[peer].learned[index]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct MacRef {
    peer: PeerId,
    index: u32,
}

struct SwitchPeer {
    addrs: PeerAddrs,
    /// The `.1` of its pod subnet: its bridge.
    gateway: Option<IpAddr>,
    /// At most `max_macs_per_peer` + its bridge, in no particular order.
    learned: Vec<Learned>,
    /// Its bridge's MAC, the one non-derived MAC it may source, while its
    /// entry in `learned` lives.
    bridge: Option<Mac>,
    /// Its broadcasts and multicasts.
    flood: TokenBucket,
}

/// The lookup side of learning, apart from the peers so that a peer's list
/// and the tables can be borrowed mutably together.
#[derive(Default)]
struct Table {
    macs: HashMap<Mac, MacRef>,
    ips: HashMap<Ipv4Addr, Mac>,
}

impl Table {
    fn remove(&mut self, learned: &mut Vec<Learned>, index: usize) {
        if index >= learned.len() {
            return;
        }
        let gone = learned.swap_remove(index);
        if let Some(moved) = learned.get(index) {
            if let Some(slot) = self.macs.get_mut(&moved.mac) {
                slot.index = index as u32;
            }
        }
        self.macs.remove(&gone.mac);
        if let Some(ip) = gone.ip {
            self.unbind(ip, gone.mac);
        }
    }

    fn remove_all(&mut self, learned: &mut Vec<Learned>) {
        for gone in learned.drain(..) {
            self.macs.remove(&gone.mac);
            if let Some(ip) = gone.ip {
                self.unbind(ip, gone.mac);
            }
        }
    }

    /// A newer ARP may have bound the address to another MAC since.
    fn unbind(&mut self, ip: Ipv4Addr, mac: Mac) {
        if self.ips.get(&ip) == Some(&mac) {
            self.ips.remove(&ip);
        }
    }
}

/// The two budgets of one local source.
#[derive(Clone, Copy)]
struct Budgets {
    flood: TokenBucket,
    resolve: TokenBucket,
}

impl Budgets {
    fn new(cfg: &SwitchConfig) -> Budgets {
        Budgets {
            flood: TokenBucket::new(cfg.flood_rate, cfg.flood_burst),
            resolve: TokenBucket::new(cfg.flood_rate, cfg.flood_burst),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Spend {
    Flood,
    Resolve,
}

/// Why a peer may source a MAC.
#[derive(Clone, Copy, PartialEq, Eq)]
enum MacKind {
    /// One of its pods'.
    Pod,
    /// Its pinned bridge.
    Bridge,
    /// Its bridge, pinned by this frame.
    Pin,
}

/// The network layer of a frame the switch carries.
#[derive(Clone, Copy)]
enum L3<'a> {
    Arp(Arp),
    Ip(Ip<'a>),
}

impl<'a> L3<'a> {
    fn parse(eth: &Ethernet<'a>) -> Result<Self, DropReason> {
        let l3 = match eth.ethertype {
            ETHERTYPE_ARP => Arp::parse(eth.payload)
                .filter(|arp| matches!(arp.op, ARP_REQUEST | ARP_REPLY))
                .map(L3::Arp),
            ETHERTYPE_IPV4 => Ipv4::parse(eth.payload).map(|ip| L3::Ip(Ip::V4(ip))),
            ETHERTYPE_IPV6 => Ipv6::parse(eth.payload).map(|ip| L3::Ip(Ip::V6(ip))),
            _ => return Err(EtherType),
        };
        l3.ok_or(Malformed)
    }

    fn dst(&self) -> IpAddr {
        match self {
            L3::Arp(arp) => arp.target_ip.into(),
            L3::Ip(ip) => ip.dst(),
        }
    }

    /// Either port, so that client, server and relay traffic all match.
    fn is_dhcp(&self) -> Result<bool, DropReason> {
        let L3::Ip(ip) = self else { return Ok(false) };
        let ports = match ip {
            Ip::V4(_) => [67, 68],
            Ip::V6(_) => [546, 547],
        };
        match ip.transport() {
            Some((IPPROTO_UDP, segment)) => {
                let udp = Udp::parse(segment).ok_or(Malformed)?;
                Ok(ports.contains(&udp.src_port) || ports.contains(&udp.dst_port))
            }
            _ => Ok(false),
        }
    }

    /// The ICMPv6 message of an IPv6 packet, past its extension headers.
    fn icmpv6(&self) -> Result<Option<Icmp<'a>>, DropReason> {
        let L3::Ip(Ip::V6(ip)) = self else {
            return Ok(None);
        };
        match ip.upper_layer().ok_or(Malformed)? {
            (IPPROTO_ICMPV6, message) => Icmp::parse(message).map(Some).ok_or(Malformed),
            _ => Ok(None),
        }
    }
}

/// Rule 1 of both directions: a frame with an Ethernet header and a source
/// that can be a station.
fn ethernet(frame: &[u8]) -> Result<Ethernet<'_>, DropReason> {
    let eth = Ethernet::parse(frame).ok_or(Malformed)?;
    if is_multicast(&eth.src) {
        return Err(Malformed);
    }
    Ok(eth)
}

/// Rules 2 to 4 of both directions, in one order, so that a frame gets the
/// same drop reason whichever side it came from (an STP frame with an 802.3
/// length field is `LinkLocal` both ways, not `EtherType` from a peer).
fn common_checks<'a>(eth: &Ethernet<'a>) -> Result<L3<'a>, DropReason> {
    if is_link_local_group(&eth.dst) {
        return Err(LinkLocal);
    }
    let l3 = L3::parse(eth)?;
    if l3.is_dhcp()? {
        return Err(Dhcp);
    }
    Ok(l3)
}

fn is_link_local_v6(ip: Ipv6Addr) -> bool {
    ip.segments()[0] & 0xffc0 == 0xfe80
}

/// The `.1` of a subnet, where the plugin puts the bridge.
fn gateway_of(subnet: &IpNet) -> Option<IpAddr> {
    let gateway = match subnet {
        IpNet::V4(n) => IpAddr::V4(u32::from(n.network()).checked_add(1)?.into()),
        IpNet::V6(n) => IpAddr::V6(u128::from(n.network()).checked_add(1)?.into()),
    };
    subnet.contains(&gateway).then_some(gateway)
}

/// Addresses a frame may be for without being for a host here: nobody
/// routes them on.
fn is_group_or_link(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => a.is_broadcast() || a.is_multicast(),
        IpAddr::V6(a) => a.is_multicast() || is_link_local_v6(a),
    }
}

pub struct Switch {
    cfg: SwitchConfig,
    peers: HashMap<PeerId, SwitchPeer>,
    /// Peer pod subnets (normalised) → owner, rebuilt when peers change.
    subnets: HashMap<IpNet, PeerId>,
    /// Prefix lengths present in `subnets`, longest first.
    v4_prefixes: Vec<u8>,
    v6_prefixes: Vec<u8>,
    hosts: HashMap<IpAddr, PeerId>,
    table: Table,
    /// Entries of the peers' `learned` lists reserved so far: what the
    /// tables are sized for ([`Switch::reserve`]).
    reserved: usize,
    /// Source MACs of the local side, when last seen.
    local: HashMap<Mac, Instant>,
    /// Budgets per local source MAC, and the pair shared past the bound.
    sources: HashMap<Mac, Budgets>,
    crowd: Budgets,
}

impl Switch {
    pub fn new(cfg: SwitchConfig) -> Switch {
        let cfg = SwitchConfig {
            local_subnet: cfg.local_subnet.trunc(),
            ..cfg
        };
        let mut local = HashMap::new();
        let _ = local.try_reserve(MAX_LOCAL_MACS * 2);
        let mut sources = HashMap::new();
        let _ = sources.try_reserve(MAX_SOURCES * 2);
        Switch {
            crowd: Budgets::new(&cfg),
            cfg,
            peers: HashMap::new(),
            subnets: HashMap::new(),
            v4_prefixes: Vec::new(),
            v6_prefixes: Vec::new(),
            hosts: HashMap::new(),
            table: Table::default(),
            reserved: 0,
            local,
            sources,
        }
    }

    /// Adds a peer or updates its addresses. A changed pod subnet forgets
    /// what the peer taught: those entries were vouched for by the old one.
    pub fn set_peer(&mut self, id: PeerId, addrs: PeerAddrs) {
        let addrs = PeerAddrs {
            pod_subnet: addrs.pod_subnet.trunc(),
            ..addrs
        };
        let gateway = gateway_of(&addrs.pod_subnet);
        if let Some(peer) = self.peers.get_mut(&id) {
            if peer.addrs.pod_subnet != addrs.pod_subnet {
                self.table.remove_all(&mut peer.learned);
                peer.bridge = None;
            }
            peer.addrs = addrs;
            peer.gateway = gateway;
        } else {
            // Nothing reserved yet: most peers of a large cluster never
            // send us a frame (sessions are made on demand), and learning
            // reserved for every peer it knows was most of an agent's
            // memory per peer (issue 22). `reserve` does it when a session
            // comes up, before the peer's first frame.
            self.peers.insert(
                id,
                SwitchPeer {
                    addrs,
                    gateway,
                    learned: Vec::new(),
                    bridge: None,
                    flood: TokenBucket::new(self.cfg.peer_flood_rate, self.cfg.peer_flood_burst),
                },
            );
        }
        self.reindex();
    }

    /// Reserves what learning from peer `id` may need, so that no frame of
    /// it allocates: its list for as many MACs as it can hold (the
    /// addresses of its IPv4 subnet, its bridge, at most
    /// `max_macs_per_peer` + 1), and room in the tables for twice every
    /// reserved list (hash tables rehash in place only below half load).
    /// The engine calls it when a session with the peer comes up: frames
    /// only come through one. Idempotent; `try_` so that an absurd bound
    /// can't abort the agent (learning then allocates, nothing else).
    pub fn reserve(&mut self, id: PeerId) {
        let bound = self.cfg.max_macs_per_peer;
        let Some(peer) = self.peers.get_mut(&id) else {
            return;
        };
        let pods = match peer.addrs.pod_subnet {
            IpNet::V4(n) => 1usize
                .checked_shl(u32::from(32 - n.prefix_len()))
                .unwrap_or(usize::MAX),
            IpNet::V6(_) => usize::MAX,
        };
        let want = pods.min(bound).saturating_add(1);
        let before = peer.learned.capacity();
        if before >= want {
            return;
        }
        let _ = peer
            .learned
            .try_reserve_exact(want.saturating_sub(peer.learned.len()));
        self.reserved = self
            .reserved
            .saturating_add(peer.learned.capacity().saturating_sub(before));
        let room = self.reserved.saturating_mul(2);
        let _ = self
            .table
            .macs
            .try_reserve(room.saturating_sub(self.table.macs.len()));
        let _ = self
            .table
            .ips
            .try_reserve(room.saturating_sub(self.table.ips.len()));
    }

    /// Forgets the peer and everything learned from it.
    pub fn remove_peer(&mut self, id: PeerId) {
        if let Some(mut peer) = self.peers.remove(&id) {
            self.reserved = self.reserved.saturating_sub(peer.learned.capacity());
            self.table.remove_all(&mut peer.learned);
            self.reindex();
        }
    }

    fn reindex(&mut self) {
        self.subnets.clear();
        self.hosts.clear();
        self.v4_prefixes.clear();
        self.v6_prefixes.clear();
        let mut ids: Vec<PeerId> = self.peers.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            let Some(peer) = self.peers.get(&id) else {
                continue;
            };
            // The allocator hands out each subnet once; should two records
            // claim one anyway, the lowest id wins, whatever the order of
            // arrival.
            self.subnets.entry(peer.addrs.pod_subnet).or_insert(id);
            for host in peer
                .addrs
                .host_addr
                .into_iter()
                .chain(peer.addrs.host_addr6)
            {
                self.hosts.entry(host).or_insert(id);
            }
            let prefixes = match peer.addrs.pod_subnet {
                IpNet::V4(_) => &mut self.v4_prefixes,
                IpNet::V6(_) => &mut self.v6_prefixes,
            };
            let len = peer.addrs.pod_subnet.prefix_len();
            if !prefixes.contains(&len) {
                prefixes.push(len);
            }
        }
        self.v4_prefixes.sort_unstable_by(|a, b| b.cmp(a));
        self.v6_prefixes.sort_unstable_by(|a, b| b.cmp(a));
    }

    pub fn stats(&self) -> SwitchStats {
        SwitchStats {
            peers: self.peers.len(),
            learned_macs: self.table.macs.len(),
            learned_ips: self.table.ips.len(),
            local_macs: self.local.len(),
        }
    }

    /// Drops expired entries and idle budgets. Lookups already ignore
    /// expired entries; this only frees their slots and keeps
    /// [`Switch::stats`] honest, so a slow timer will do.
    pub fn expire(&mut self, now: Instant) {
        let ttl = self.cfg.mac_ttl;
        for peer in self.peers.values_mut() {
            let mut i = 0;
            while let Some(entry) = peer.learned.get(i) {
                if now.saturating_duration_since(entry.seen) >= ttl {
                    self.table.remove(&mut peer.learned, i);
                } else {
                    i += 1;
                }
            }
        }
        self.local
            .retain(|_, seen| now.saturating_duration_since(*seen) < ttl);
        self.sources
            .retain(|_, b| !(b.flood.idle(now) && b.resolve.idle(now)));
    }

    fn is_local(&self, ip: IpAddr) -> bool {
        self.cfg.local_subnet.contains(&ip)
    }

    /// The peer whose pod subnet holds `ip`, longest prefix first.
    fn owner(&self, ip: IpAddr) -> Option<PeerId> {
        let prefixes = if ip.is_ipv4() {
            &self.v4_prefixes
        } else {
            &self.v6_prefixes
        };
        prefixes.iter().find_map(|&len| {
            let subnet = IpNet::new(ip, len).ok()?.trunc();
            self.subnets.get(&subnet).copied()
        })
    }

    fn learned(&self, mac: &Mac) -> Option<(PeerId, &Learned)> {
        let slot = self.table.macs.get(mac)?;
        let entry = self
            .peers
            .get(&slot.peer)?
            .learned
            .get(slot.index as usize)?;
        Some((slot.peer, entry))
    }

    fn alive(&self, now: Instant, entry: &Learned) -> bool {
        now.saturating_duration_since(entry.seen) < self.cfg.mac_ttl
    }

    /// The peer a MAC was learned from, unless the entry expired.
    fn mac_owner(&self, now: Instant, mac: &Mac) -> Option<PeerId> {
        let (peer, entry) = self.learned(mac)?;
        self.alive(now, entry).then_some(peer)
    }

    /// A live ARP binding for `ip`, learned from `owner` (the peer whose
    /// subnet holds it: a subnet may have moved since).
    fn binding(&self, now: Instant, ip: Ipv4Addr, owner: PeerId) -> Option<Mac> {
        let mac = *self.table.ips.get(&ip)?;
        (self.mac_owner(now, &mac)? == owner).then_some(mac)
    }

    /// Remembers a source MAC of the local side; one a peer had taught is
    /// forgotten there (it lives here).
    fn saw_local(&mut self, now: Instant, mac: Mac) {
        if let Some(seen) = self.local.get_mut(&mac) {
            *seen = now;
            return;
        }
        if self.local.len() < MAX_LOCAL_MACS {
            self.local.insert(mac, now);
        }
        if let Some(slot) = self.table.macs.get(&mac).copied() {
            if let Some(peer) = self.peers.get_mut(&slot.peer) {
                self.table.remove(&mut peer.learned, slot.index as usize);
            }
        }
    }

    fn spend(
        &mut self,
        now: Instant,
        src: &Mac,
        what: Spend,
        verdict: LocalVerdict,
    ) -> Result<LocalVerdict, DropReason> {
        let fresh = Budgets::new(&self.cfg);
        let budgets = if self.sources.contains_key(src) || self.sources.len() < MAX_SOURCES {
            self.sources.entry(*src).or_insert(fresh)
        } else {
            &mut self.crowd
        };
        let bucket = match what {
            Spend::Flood => &mut budgets.flood,
            Spend::Resolve => &mut budgets.resolve,
        };
        if bucket.take(now) {
            Ok(verdict)
        } else {
            Err(RateLimited)
        }
    }

    /// A frame the local bridge sent into our TAP port. `gso` is true for a
    /// TSO super-frame (its length is the segmenter's business, not the
    /// MTU's). `out` (≥ 1600 bytes) receives a frame to write back into the
    /// TAP when the verdict is `Reply`.
    pub fn from_local(
        &mut self,
        now: Instant,
        frame: &[u8],
        gso: bool,
        out: &mut [u8],
    ) -> LocalVerdict {
        self.local(now, frame, gso, out)
            .unwrap_or_else(LocalVerdict::Drop)
    }

    fn local(
        &mut self,
        now: Instant,
        frame: &[u8],
        gso: bool,
        out: &mut [u8],
    ) -> Result<LocalVerdict, DropReason> {
        let eth = ethernet(frame)?;
        self.saw_local(now, eth.src);
        let l3 = common_checks(&eth)?;
        if !gso && eth.payload.len() > self.cfg.mtu {
            return self.too_big(frame, &l3, out);
        }
        match l3 {
            L3::Arp(arp) => {
                if arp.sender_ip == arp.target_ip || arp.sender_ip.is_unspecified() {
                    return Err(Local);
                }
                if arp.op == ARP_REQUEST {
                    return self.answer_arp(now, &eth.src, &arp, out);
                }
            }
            L3::Ip(Ip::V6(ip)) if is_multicast(&eth.dst) => {
                return self.solicit(now, &eth.src, &ip)
            }
            L3::Ip(_) => {}
        }
        if is_multicast(&eth.dst) {
            return self.spend(now, &eth.src, Spend::Flood, LocalVerdict::Flood);
        }
        self.unicast(now, &eth, l3.dst())
    }

    fn too_big(&self, frame: &[u8], l3: &L3, out: &mut [u8]) -> Result<LocalVerdict, DropReason> {
        let mtu = self.cfg.mtu;
        let written = match l3 {
            L3::Ip(Ip::V4(ip)) if ip.dont_fragment => {
                build_icmpv4_frag_needed(frame, u16::try_from(mtu).unwrap_or(u16::MAX), out)
            }
            L3::Ip(Ip::V6(_)) => {
                build_icmpv6_packet_too_big(frame, u32::try_from(mtu).unwrap_or(u32::MAX), out)
            }
            _ => None,
        };
        written.map(LocalVerdict::Reply).ok_or(TooBig)
    }

    fn answer_arp(
        &mut self,
        now: Instant,
        src: &Mac,
        request: &Arp,
        out: &mut [u8],
    ) -> Result<LocalVerdict, DropReason> {
        let target = IpAddr::V4(request.target_ip);
        if self.is_local(target) {
            return Err(Local);
        }
        let owner = self.owner(target).ok_or(NoRoute)?;
        let is_gateway = self
            .peers
            .get(&owner)
            .is_some_and(|p| p.gateway == Some(target));
        let ask = LocalVerdict::Unicast(owner);
        let mac = match self.binding(now, request.target_ip, owner) {
            Some(mac) => mac,
            None if is_gateway => return self.spend(now, src, Spend::Resolve, ask),
            None => pod_mac(request.target_ip),
        };
        match build_arp_reply(out, request, mac) {
            Some(n) => Ok(LocalVerdict::Reply(n)),
            // `out` too small to answer: the owner can.
            None => self.spend(now, src, Spend::Resolve, ask),
        }
    }

    fn solicit(&mut self, now: Instant, src: &Mac, ip: &Ipv6) -> Result<LocalVerdict, DropReason> {
        if ip.next_header != IPPROTO_ICMPV6 {
            return Err(LinkLocal);
        }
        let message = Icmp::parse(ip.payload).ok_or(Malformed)?;
        if message.ty != ICMPV6_NEIGHBOR_SOLICIT {
            return Err(LinkLocal);
        }
        let target = IpAddr::V6(message.ns_target().ok_or(Malformed)?);
        if ip.src.is_unspecified() || self.is_local(target) {
            return Err(Local);
        }
        let owner = self.owner(target).ok_or(NoRoute)?;
        self.spend(now, src, Spend::Resolve, LocalVerdict::Unicast(owner))
    }

    fn unicast(
        &mut self,
        now: Instant,
        eth: &Ethernet,
        dst_ip: IpAddr,
    ) -> Result<LocalVerdict, DropReason> {
        if let Some(peer) = self.mac_owner(now, &eth.dst) {
            return Ok(LocalVerdict::Unicast(peer));
        }
        // Our own subnet first: a peer whose record overlaps it must not
        // draw local traffic.
        let derived = pod_mac_ipv4(&eth.dst).map(IpAddr::V4);
        for ip in derived.into_iter().chain([dst_ip]) {
            if self.is_local(ip) {
                return Err(Local);
            }
            if let Some(peer) = self.owner(ip) {
                return Ok(LocalVerdict::Unicast(peer));
            }
        }
        self.spend(now, &eth.src, Spend::Flood, LocalVerdict::Flood)
    }

    /// A decrypted frame from authenticated peer `peer`.
    pub fn from_peer(&mut self, now: Instant, peer: PeerId, frame: &[u8]) -> PeerVerdict {
        match self.remote(now, peer, frame) {
            Ok(()) => PeerVerdict::Deliver,
            Err(reason) => PeerVerdict::Drop(reason),
        }
    }

    fn remote(&mut self, now: Instant, id: PeerId, frame: &[u8]) -> Result<(), DropReason> {
        let eth = ethernet(frame)?;
        let l3 = common_checks(&eth)?;
        if eth.payload.len() > self.cfg.mtu {
            return Err(TooBig);
        }
        let peer = self.peers.get(&id).ok_or(Spoofed)?;
        self.check_nd(peer, &eth, &l3)?;
        let binding = self.check_source(peer, &eth, &l3)?;
        self.check_destination(&eth, &l3)?;
        let kind = self.check_mac(now, id, peer, &eth, &l3)?;
        if is_multicast(&eth.dst) {
            let peer = self.peers.get_mut(&id).ok_or(Spoofed)?;
            if !peer.flood.take(now) {
                return Err(RateLimited);
            }
        }
        let v6 = match l3 {
            L3::Ip(Ip::V6(ip)) if kind == MacKind::Pod => Some(ip.src),
            _ => None,
        };
        self.learn(now, id, eth.src, (binding, v6), kind)
    }

    /// Router discovery and redirects are the local link's business; a
    /// solicitation's or advertisement's link-layer address must be the
    /// frame's source, and an advertisement may only speak for the peer's
    /// own addresses (the IPv6 form of the ARP-sender rule).
    fn check_nd(&self, peer: &SwitchPeer, eth: &Ethernet, l3: &L3) -> Result<(), DropReason> {
        let Some(message) = l3.icmpv6()? else {
            return Ok(());
        };
        let lladdr_ok = |ll: Option<Mac>| ll.is_none_or(|m| m == eth.src);
        match message.ty {
            ICMPV6_ROUTER_SOLICIT | ICMPV6_ROUTER_ADVERT | ICMPV6_REDIRECT => Err(LinkLocal),
            ICMPV6_NEIGHBOR_SOLICIT => {
                let (_, ll) = message.nd(ND_SOURCE_LLADDR).ok_or(Malformed)?;
                lladdr_ok(ll).then_some(()).ok_or(Spoofed)
            }
            ICMPV6_NEIGHBOR_ADVERT => {
                let (target, ll) = message.nd(ND_TARGET_LLADDR).ok_or(Malformed)?;
                let target = IpAddr::V6(target);
                let owned = peer.addrs.pod_subnet.contains(&target) && !self.is_local(target);
                (owned && lladdr_ok(ll)).then_some(()).ok_or(Spoofed)
            }
            _ => Ok(()),
        }
    }

    /// Whether the frame's sources belong to `peer`; the address to bind
    /// to its source MAC, if it is an ARP sender of the peer's subnet.
    fn check_source(
        &self,
        peer: &SwitchPeer,
        eth: &Ethernet,
        l3: &L3,
    ) -> Result<Option<Ipv4Addr>, DropReason> {
        let in_subnet = |ip: IpAddr| peer.addrs.pod_subnet.contains(&ip) && !self.is_local(ip);
        let owns = |ip: IpAddr| in_subnet(ip) || peer.addrs.is_host(ip);
        match l3 {
            L3::Arp(arp) => {
                let sender = IpAddr::V4(arp.sender_ip);
                if arp.sender_mac != eth.src || arp.sender_ip.is_unspecified() || !owns(sender) {
                    return Err(Spoofed);
                }
                Ok(in_subnet(sender).then_some(arp.sender_ip))
            }
            L3::Ip(Ip::V4(ip)) => owns(IpAddr::V4(ip.src)).then_some(None).ok_or(Spoofed),
            L3::Ip(Ip::V6(ip)) => {
                let ok = !is_link_local_v6(ip.src)
                    && !ip.src.is_unspecified()
                    && in_subnet(IpAddr::V6(ip.src));
                ok.then_some(None).ok_or(Spoofed)
            }
        }
    }

    /// Whether the frame is for this node: nothing from a peer is routed on.
    fn check_destination(&self, eth: &Ethernet, l3: &L3) -> Result<(), DropReason> {
        let here = match l3 {
            L3::Arp(arp) => self.is_local(IpAddr::V4(arp.target_ip)),
            L3::Ip(ip) => {
                let solicited = match l3.icmpv6()? {
                    Some(m) if m.ty == ICMPV6_NEIGHBOR_SOLICIT => m.ns_target(),
                    _ => None,
                };
                let dst = ip.dst();
                solicited.is_none_or(|t| self.is_local(IpAddr::V6(t)))
                    && (is_multicast(&eth.dst) || self.is_local(dst) || is_group_or_link(dst))
            }
        };
        here.then_some(()).ok_or(Transit)
    }

    /// Port security: which of the peer's MACs this frame's source is.
    fn check_mac(
        &self,
        now: Instant,
        id: PeerId,
        peer: &SwitchPeer,
        eth: &Ethernet,
        l3: &L3,
    ) -> Result<MacKind, DropReason> {
        let src = eth.src;
        if self.cfg.bridge_mac == Some(src) || self.local.contains_key(&src) {
            return Err(Spoofed);
        }
        if let (Some(tail), IpNet::V4(subnet)) = (pod_mac_ipv4(&src), peer.addrs.pod_subnet) {
            let ours = subnet.contains(&tail) && !self.is_local(IpAddr::V4(tail));
            return ours.then_some(MacKind::Pod).ok_or(Spoofed);
        }
        if let L3::Ip(Ip::V6(ip)) = l3 {
            let checked = self
                .learned(&src)
                .is_some_and(|(owner, e)| owner == id && e.v6 == Some(ip.src));
            if checked || pod_mac_v6(ip.src) == src {
                return Ok(MacKind::Pod);
            }
        }
        // Its record's word first; else the MAC that spoke for its bridge,
        // while it lives.
        let pinned = peer
            .addrs
            .bridge_mac
            .or_else(|| peer.bridge.filter(|&m| self.mac_owner(now, &m) == Some(id)));
        match pinned {
            Some(m) if m == src => Ok(MacKind::Bridge),
            None if self.speaks_for_bridge(peer, l3) => Ok(MacKind::Pin),
            _ => Err(Spoofed),
        }
    }

    /// The peer's bridge speaking for itself: an ARP sender, or an IP
    /// source, that is its gateway or its host address.
    fn speaks_for_bridge(&self, peer: &SwitchPeer, l3: &L3) -> bool {
        let src = match l3 {
            L3::Arp(arp) => IpAddr::V4(arp.sender_ip),
            L3::Ip(ip) => ip.src(),
        };
        peer.gateway == Some(src) || peer.addrs.is_host(src)
    }

    fn learn(
        &mut self,
        now: Instant,
        id: PeerId,
        mac: Mac,
        (ip, v6): (Option<Ipv4Addr>, Option<Ipv6Addr>),
        kind: MacKind,
    ) -> Result<(), DropReason> {
        let ttl = self.cfg.mac_ttl;
        if let Some(&slot) = self.table.macs.get(&mac) {
            let owner = self.peers.get_mut(&slot.peer);
            let Some(learned) = owner.map(|p| &mut p.learned) else {
                return Ok(());
            };
            let index = slot.index as usize;
            let Some(entry) = learned.get_mut(index) else {
                return Ok(());
            };
            if slot.peer == id {
                entry.seen = now;
                if v6.is_some() {
                    entry.v6 = v6;
                }
                if let Some(ip) = ip {
                    if let Some(old) = entry.ip.replace(ip).filter(|&old| old != ip) {
                        self.table.unbind(old, mac);
                    }
                    self.table.ips.insert(ip, mac);
                }
                return Ok(());
            }
            if now.saturating_duration_since(entry.seen) < ttl {
                return Err(Spoofed);
            }
            self.table.remove(learned, index);
        }
        let bound = self.cfg.max_macs_per_peer;
        let Some(peer) = self.peers.get_mut(&id) else {
            return Ok(());
        };
        // A new pin replaces the old one, whose entry lapsed but may not be
        // swept yet: a peer never holds two MACs not of its pods.
        if kind == MacKind::Pin {
            if let Some(old) = peer.bridge.take().filter(|&m| m != mac) {
                if let Some(slot) = self.table.macs.get(&old).copied().filter(|s| s.peer == id) {
                    self.table.remove(&mut peer.learned, slot.index as usize);
                }
            }
        }
        let bridge_room = kind != MacKind::Pod && peer.learned.len() == bound;
        if peer.learned.len() >= bound && !bridge_room {
            return Err(MacLimit);
        }
        let Ok(index) = u32::try_from(peer.learned.len()) else {
            return Err(MacLimit);
        };
        peer.learned.push(Learned {
            mac,
            ip,
            v6,
            seen: now,
        });
        if kind != MacKind::Pod {
            peer.bridge = Some(mac);
        }
        self.table.macs.insert(mac, MacRef { peer: id, index });
        if let Some(ip) = ip {
            self.table.ips.insert(ip, mac);
        }
        Ok(())
    }

    /// Host overlay: the peer an IP packet read from the host interface
    /// goes to, the one whose host address is its destination, else the one
    /// whose pod subnet holds it (the host answering a remote pod from its
    /// host address, e.g. a hostNetwork Service endpoint: the reply must
    /// return through the client node's conntrack, not over L2).
    pub fn host_from_local(&self, packet: &[u8]) -> LocalVerdict {
        let Some(ip) = Ip::parse(packet) else {
            return LocalVerdict::Drop(Malformed);
        };
        match self.hosts.get(&ip.dst()).or(self.owner(ip.dst()).as_ref()) {
            Some(&peer) => LocalVerdict::Unicast(peer),
            None => LocalVerdict::Drop(NoRoute),
        }
    }

    /// Host overlay: a packet from `peer` is delivered when its source is the
    /// peer's host address or in its pod subnet, and it is for this host:
    /// its host address or its pod subnet (this host forwards to its own
    /// pods; that is not transit).
    pub fn host_from_peer(&self, peer: PeerId, packet: &[u8]) -> PeerVerdict {
        let Some(ip) = Ip::parse(packet) else {
            return PeerVerdict::Drop(Malformed);
        };
        let Some(peer) = self.peers.get(&peer) else {
            return PeerVerdict::Drop(Spoofed);
        };
        let (src, dst) = (ip.src(), ip.dst());
        let pod = peer.addrs.pod_subnet.contains(&src) && !self.is_local(src);
        if !pod && !peer.addrs.is_host(src) {
            return PeerVerdict::Drop(Spoofed);
        }
        let mine = self.cfg.host_addr == Some(dst) || self.cfg.host_addr6 == Some(dst);
        if !mine && !self.is_local(dst) {
            return PeerVerdict::Drop(Transit);
        }
        PeerVerdict::Deliver
    }

    /// Every learned MAC is where its slot says, every binding points at a
    /// learned MAC, no peer holds more than the bound (and its bridge), and
    /// no local MAC is a peer's.
    #[cfg(test)]
    fn check_invariants(&self) {
        let mut total = 0;
        for (&id, peer) in &self.peers {
            assert!(peer.learned.len() <= self.cfg.max_macs_per_peer + 1);
            for (i, e) in peer.learned.iter().enumerate() {
                assert_eq!(
                    self.table.macs.get(&e.mac),
                    Some(&MacRef {
                        peer: id,
                        index: i as u32
                    })
                );
                assert!(!self.local.contains_key(&e.mac), "local MAC learned");
                assert_ne!(self.cfg.bridge_mac, Some(e.mac), "our bridge learned");
            }
            total += peer.learned.len();
        }
        assert_eq!(total, self.table.macs.len());
        for (ip, mac) in &self.table.ips {
            let (_, e) = self.learned(mac).expect("binding to an unknown MAC");
            assert_eq!(e.ip, Some(*ip));
        }
        assert!(self.local.len() <= MAX_LOCAL_MACS);
        assert!(self.sources.len() <= MAX_SOURCES);
    }
}

#[cfg(test)]
mod tests;
