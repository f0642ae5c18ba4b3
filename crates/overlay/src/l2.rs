//! The pod overlay's switch: for every frame, where it may go.
//!
//! The agent's TAP is one port of the local node bridge; every peer is a
//! node whose bridge is reachable through a tunnel. The switch sees frames
//! the local bridge sent into the TAP ([`Switch::from_local`]) and frames a
//! peer sent us ([`Switch::from_peer`]). A frame from a peer can only be
//! delivered to the TAP or dropped, so split horizon holds by construction:
//! nothing is ever relayed from one peer to another.
//!
//! # From the local bridge, first match wins
//!
//! 1. Shorter than an Ethernet header, or a multicast source MAC: `Malformed`.
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
//!    request goes to the owner alone (`Unicast`, from the flood budget) and
//!    its reply teaches us the binding. ARP replies are unicast frames
//!    (rule 8).
//! 7. IPv6 to a multicast MAC: a neighbour solicitation goes to the owner of
//!    its target only (`Unicast`, from the flood budget); a target in the
//!    local subnet or duplicate address detection (source `::`) is `Local`,
//!    a target nobody owns `NoRoute`. Any other IPv6 multicast (RS, RA,
//!    MLD, mDNS…) concerns the local link: `LinkLocal`.
//! 8. To a unicast MAC: a MAC learned from a peer goes to that peer; a
//!    derived pod MAC to the owner of the address it encodes (`Local` if that
//!    is ours); else the owner of the destination IP (`Local` if ours); else
//!    unknown unicast is flooded.
//! 9. Broadcast and other multicast: flooded.
//!
//! Floods and the requests of rules 6 and 7 share one token bucket
//! (`flood_rate` per second, `flood_burst`); an empty bucket is
//! `RateLimited`. A broadcast storm in one pod thus costs every node a
//! bounded amount.
//!
//! # From a peer
//!
//! `Malformed`, `EtherType`, `LinkLocal` and `Dhcp` as above, then the source
//! must belong to the peer, else `Spoofed`: an IPv4 source or ARP sender
//! address in its pod subnet or equal to its host address (never 0.0.0.0,
//! and the ARP sender MAC must be the frame's source MAC, since that is what
//! neighbours cache); an IPv6 source in its pod subnet and neither link-local
//! nor unspecified; a derived-form source MAC must encode an address of its
//! subnet. Nothing in this node's own subnet ever comes from a peer, whatever
//! a peer's record claims. An unknown peer owns nothing.
//!
//! # Learning
//!
//! Only frames that passed every check teach the switch: the source MAC
//! belongs to the peer, and an ARP sender address of the peer's subnet is
//! bound to that MAC (for rule 6). Bindings come from ARP only: an IP
//! packet's source MAC is its last hop's, which for a routed packet is not
//! the owner of its source address.
//!
//! A MAC learned from one peer is not taken over by another while the entry
//! is alive: the frame claiming it is `Spoofed`. Random MACs don't collide in
//! practice, so a second claimant is an impostor trying to draw traffic to
//! itself; once the owner has been silent for `mac_ttl` the MAC is free
//! again (a bridge recreated on another node). Entries are refreshed by
//! every frame from their owner, expire after `mac_ttl`, and each peer holds
//! at most `max_macs_per_peer`; a new MAC past the bound evicts the peer's
//! least recently heard one. A peer can thus crowd out only its own entries.
//!
//! # Costs
//!
//! No allocation per frame: the learning tables are reserved when a peer is
//! added, for twice the bound (hash tables rehash in place only below half
//! load). Subnet lookups hash the address once per distinct peer prefix
//! length (one, in a cluster built by `config-gen`).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use ipnet::IpNet;

use crate::packet::{
    build_arp_reply, build_icmpv4_frag_needed, build_icmpv6_packet_too_big, is_link_local_group,
    is_multicast, pod_mac, pod_mac_ipv4, Arp, Ethernet, Icmp, Ip, Ipv4, Ipv6, Mac, Udp, ARP_REPLY,
    ARP_REQUEST, ETHERTYPE_ARP, ETHERTYPE_IPV4, ETHERTYPE_IPV6, ICMPV6_NEIGHBOR_SOLICIT,
    IPPROTO_ICMPV6, IPPROTO_UDP,
};

pub type PeerId = u32;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SwitchConfig {
    /// This node's pod subnet, e.g. 10.244.3.0/24.
    pub local_subnet: IpNet,
    /// The largest IP packet a frame may carry across, e.g. 1380.
    pub mtu: usize,
    /// Token bucket for floods and for ARP/ND requests sent to one peer:
    /// tokens per second and bucket size.
    pub flood_rate: u32,
    pub flood_burst: u32,
    /// Learned MACs per peer; past it the least recently heard is evicted.
    pub max_macs_per_peer: usize,
    /// Learned entries not refreshed for this long are gone (300 s).
    pub mac_ttl: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerAddrs {
    pub pod_subnet: IpNet,
    pub host_addr: Option<IpAddr>,
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
    /// A source that doesn't belong to the peer that sent it.
    Spoofed,
    /// For this node's own subnet, or about the local link only.
    Local,
    Dhcp,
    /// 802.1D link-local groups; IPv6 multicast other than solicitations.
    LinkLocal,
    /// Neither IPv4, ARP nor IPv6 (VLAN-tagged frames included).
    EtherType,
    /// The flood budget is spent.
    RateLimited,
    /// No peer owns the destination.
    NoRoute,
    /// Over the MTU and not to be answered with ICMP.
    TooBig,
}

impl DropReason {
    pub const ALL: [DropReason; 9] = [
        DropReason::Malformed,
        DropReason::Spoofed,
        DropReason::Local,
        DropReason::Dhcp,
        DropReason::LinkLocal,
        DropReason::EtherType,
        DropReason::RateLimited,
        DropReason::NoRoute,
        DropReason::TooBig,
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
}

use DropReason::*;

/// A MAC heard from a peer, and the address it last announced in ARP.
#[derive(Clone, Copy, Debug)]
struct Learned {
    mac: Mac,
    ip: Option<Ipv4Addr>,
    seen: Instant,
}

/// Where a learned MAC lives: `peers[peer].learned[index]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Slot {
    peer: PeerId,
    index: u32,
}

struct Peer {
    addrs: PeerAddrs,
    /// The `.1` of its pod subnet: its bridge.
    gateway: Option<IpAddr>,
    /// At most `max_macs_per_peer`, in no particular order: eviction scans
    /// this short contiguous list instead of the whole table.
    learned: Vec<Learned>,
}

/// The lookup side of learning, apart from the peers so that a peer's list
/// and the tables can be borrowed mutably together.
#[derive(Default)]
struct Table {
    macs: HashMap<Mac, Slot>,
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

/// Whole tokens; `last` advances only by the time that paid for the tokens
/// added, so that fractions carry over when callers come often.
struct Bucket {
    rate: u32,
    burst: u32,
    tokens: u32,
    last: Option<Instant>,
}

impl Bucket {
    fn new(rate: u32, burst: u32) -> Bucket {
        Bucket {
            rate,
            burst,
            tokens: burst,
            last: None,
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        self.refill(now);
        match self.tokens.checked_sub(1) {
            Some(left) => {
                self.tokens = left;
                true
            }
            None => false,
        }
    }

    fn refill(&mut self, now: Instant) {
        const NANOS: u128 = 1_000_000_000;
        let last = match self.last {
            Some(last) if self.tokens < self.burst => last,
            // Time spent full must not count once tokens are taken.
            _ => {
                self.last = Some(now);
                return;
            }
        };
        let rate = u128::from(self.rate);
        let add = now
            .saturating_duration_since(last)
            .as_nanos()
            .saturating_mul(rate)
            / NANOS;
        if add == 0 {
            return;
        }
        let room = u128::from(self.burst - self.tokens);
        if add >= room {
            self.tokens = self.burst;
            self.last = Some(now);
        } else {
            // add < room ≤ u32::MAX, so neither conversion saturates.
            self.tokens += u32::try_from(add).unwrap_or(0);
            let paid = u64::try_from(add * NANOS / rate).unwrap_or(u64::MAX);
            self.last = Some(last.checked_add(Duration::from_nanos(paid)).unwrap_or(now));
        }
    }
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
}

fn is_switched_ethertype(ethertype: u16) -> bool {
    matches!(ethertype, ETHERTYPE_IPV4 | ETHERTYPE_ARP | ETHERTYPE_IPV6)
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

/// Whether a pod of `subnet` can have the derived MAC `0a:58` + `tail`: for
/// IPv4 the tail is its address; an IPv6-only pod gets the low 32 bits of
/// its address, so those must agree with the subnet's fixed bits.
fn derivable(subnet: &IpNet, tail: Ipv4Addr) -> bool {
    match subnet {
        IpNet::V4(n) => n.contains(&tail),
        IpNet::V6(n) => {
            let fixed = u32::from(n.prefix_len().saturating_sub(96));
            let mask = u32::MAX.checked_shl(32 - fixed).unwrap_or(0);
            let low = u128::from(n.network()) as u32;
            (low ^ u32::from(tail)) & mask == 0
        }
    }
}

pub struct Switch {
    cfg: SwitchConfig,
    peers: HashMap<PeerId, Peer>,
    /// Peer pod subnets (normalised) → owner, rebuilt when peers change.
    subnets: HashMap<IpNet, PeerId>,
    /// Prefix lengths present in `subnets`, longest first.
    v4_prefixes: Vec<u8>,
    v6_prefixes: Vec<u8>,
    hosts: HashMap<IpAddr, PeerId>,
    table: Table,
    flood: Bucket,
}

impl Switch {
    pub fn new(cfg: SwitchConfig) -> Switch {
        let cfg = SwitchConfig {
            local_subnet: cfg.local_subnet.trunc(),
            ..cfg
        };
        Switch {
            flood: Bucket::new(cfg.flood_rate, cfg.flood_burst),
            cfg,
            peers: HashMap::new(),
            subnets: HashMap::new(),
            v4_prefixes: Vec::new(),
            v6_prefixes: Vec::new(),
            hosts: HashMap::new(),
            table: Table::default(),
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
            }
            peer.addrs = addrs;
            peer.gateway = gateway;
        } else {
            // Reserved here so that learning never allocates on the data
            // path; `try_` so that an absurd bound can't abort the agent.
            let bound = self.cfg.max_macs_per_peer;
            let mut learned = Vec::new();
            let _ = learned.try_reserve_exact(bound);
            self.peers.insert(
                id,
                Peer {
                    addrs,
                    gateway,
                    learned,
                },
            );
            let want = bound.saturating_mul(self.peers.len()).saturating_mul(2);
            let _ = self
                .table
                .macs
                .try_reserve(want.saturating_sub(self.table.macs.len()));
            let _ = self
                .table
                .ips
                .try_reserve(want.saturating_sub(self.table.ips.len()));
        }
        self.reindex();
    }

    /// Forgets the peer and everything learned from it.
    pub fn remove_peer(&mut self, id: PeerId) {
        if let Some(mut peer) = self.peers.remove(&id) {
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
            if let Some(host) = peer.addrs.host_addr {
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
        }
    }

    /// Drops expired entries. Lookups already ignore them; this only frees
    /// their slots and keeps [`Switch::stats`] honest, so a slow timer will do.
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

    fn rate_limited(
        &mut self,
        now: Instant,
        verdict: LocalVerdict,
    ) -> Result<LocalVerdict, DropReason> {
        if self.flood.take(now) {
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
        let eth = Ethernet::parse(frame).ok_or(Malformed)?;
        if is_multicast(&eth.src) {
            return Err(Malformed);
        }
        if is_link_local_group(&eth.dst) {
            return Err(LinkLocal);
        }
        let l3 = L3::parse(&eth)?;
        if l3.is_dhcp()? {
            return Err(Dhcp);
        }
        if !gso && eth.payload.len() > self.cfg.mtu {
            return self.too_big(frame, &l3, out);
        }
        match l3 {
            L3::Arp(arp) => {
                if arp.sender_ip == arp.target_ip || arp.sender_ip.is_unspecified() {
                    return Err(Local);
                }
                if arp.op == ARP_REQUEST {
                    return self.answer_arp(now, &arp, out);
                }
            }
            L3::Ip(Ip::V6(ip)) if is_multicast(&eth.dst) => return self.solicit(now, &ip),
            L3::Ip(_) => {}
        }
        if is_multicast(&eth.dst) {
            return self.rate_limited(now, LocalVerdict::Flood);
        }
        self.unicast(now, &eth.dst, l3.dst())
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
        let mac = match self.binding(now, request.target_ip, owner) {
            Some(mac) => mac,
            None if is_gateway => return self.rate_limited(now, LocalVerdict::Unicast(owner)),
            None => pod_mac(request.target_ip),
        };
        match build_arp_reply(out, request, mac) {
            Some(n) => Ok(LocalVerdict::Reply(n)),
            // `out` too small to answer: the owner can.
            None => self.rate_limited(now, LocalVerdict::Unicast(owner)),
        }
    }

    fn solicit(&mut self, now: Instant, ip: &Ipv6) -> Result<LocalVerdict, DropReason> {
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
        self.rate_limited(now, LocalVerdict::Unicast(owner))
    }

    fn unicast(
        &mut self,
        now: Instant,
        dst: &Mac,
        dst_ip: IpAddr,
    ) -> Result<LocalVerdict, DropReason> {
        if let Some(peer) = self.mac_owner(now, dst) {
            return Ok(LocalVerdict::Unicast(peer));
        }
        // Our own subnet first: a peer whose record overlaps it must not
        // draw local traffic.
        let derived = pod_mac_ipv4(dst).map(IpAddr::V4);
        for ip in derived.into_iter().chain([dst_ip]) {
            if self.is_local(ip) {
                return Err(Local);
            }
            if let Some(peer) = self.owner(ip) {
                return Ok(LocalVerdict::Unicast(peer));
            }
        }
        self.rate_limited(now, LocalVerdict::Flood)
    }

    /// A decrypted frame from authenticated peer `peer`.
    pub fn from_peer(&mut self, now: Instant, peer: PeerId, frame: &[u8]) -> PeerVerdict {
        match self.remote(now, peer, frame) {
            Ok(()) => PeerVerdict::Deliver,
            Err(reason) => PeerVerdict::Drop(reason),
        }
    }

    fn remote(&mut self, now: Instant, id: PeerId, frame: &[u8]) -> Result<(), DropReason> {
        let eth = Ethernet::parse(frame).ok_or(Malformed)?;
        if is_multicast(&eth.src) {
            return Err(Malformed);
        }
        if !is_switched_ethertype(eth.ethertype) {
            return Err(EtherType);
        }
        if is_link_local_group(&eth.dst) {
            return Err(LinkLocal);
        }
        let l3 = L3::parse(&eth)?;
        if l3.is_dhcp()? {
            return Err(Dhcp);
        }
        let peer = self.peers.get(&id).ok_or(Spoofed)?;
        let binding = self.check_source(peer, &eth, &l3)?;
        self.learn(now, id, eth.src, binding)
    }

    /// Whether the frame's sources belong to `peer`; the address to bind
    /// to its source MAC, if it is an ARP sender of the peer's subnet.
    fn check_source(
        &self,
        peer: &Peer,
        eth: &Ethernet,
        l3: &L3,
    ) -> Result<Option<Ipv4Addr>, DropReason> {
        let in_subnet = |ip: IpAddr| peer.addrs.pod_subnet.contains(&ip) && !self.is_local(ip);
        let owns = |ip: IpAddr| in_subnet(ip) || peer.addrs.host_addr == Some(ip);
        let binding = match l3 {
            L3::Arp(arp) => {
                let sender = IpAddr::V4(arp.sender_ip);
                if arp.sender_mac != eth.src || arp.sender_ip.is_unspecified() || !owns(sender) {
                    return Err(Spoofed);
                }
                in_subnet(sender).then_some(arp.sender_ip)
            }
            L3::Ip(Ip::V4(ip)) => {
                if !owns(IpAddr::V4(ip.src)) {
                    return Err(Spoofed);
                }
                None
            }
            L3::Ip(Ip::V6(ip)) => {
                if is_link_local_v6(ip.src)
                    || ip.src.is_unspecified()
                    || !in_subnet(IpAddr::V6(ip.src))
                {
                    return Err(Spoofed);
                }
                None
            }
        };
        if let Some(tail) = pod_mac_ipv4(&eth.src) {
            if !derivable(&peer.addrs.pod_subnet, tail) || self.is_local(IpAddr::V4(tail)) {
                return Err(Spoofed);
            }
        }
        Ok(binding)
    }

    fn learn(
        &mut self,
        now: Instant,
        id: PeerId,
        mac: Mac,
        ip: Option<Ipv4Addr>,
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
        if bound == 0 {
            return Ok(());
        }
        if peer.learned.len() >= bound {
            let oldest = peer
                .learned
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.seen)
                .map(|(i, _)| i);
            if let Some(oldest) = oldest {
                self.table.remove(&mut peer.learned, oldest);
            }
        }
        let Ok(index) = u32::try_from(peer.learned.len()) else {
            return Ok(());
        };
        peer.learned.push(Learned { mac, ip, seen: now });
        self.table.macs.insert(mac, Slot { peer: id, index });
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
    /// peer's host address or in its pod subnet.
    pub fn host_from_peer(&self, peer: PeerId, packet: &[u8]) -> PeerVerdict {
        let Some(ip) = Ip::parse(packet) else {
            return PeerVerdict::Drop(Malformed);
        };
        let Some(peer) = self.peers.get(&peer) else {
            return PeerVerdict::Drop(Spoofed);
        };
        let src = ip.src();
        if peer.addrs.host_addr == Some(src)
            || (peer.addrs.pod_subnet.contains(&src) && !self.is_local(src))
        {
            PeerVerdict::Deliver
        } else {
            PeerVerdict::Drop(Spoofed)
        }
    }

    /// Every learned MAC is where its slot says, every binding points at a
    /// learned MAC, and no peer holds more than the bound.
    #[cfg(test)]
    fn check_invariants(&self) {
        let mut total = 0;
        for (&id, peer) in &self.peers {
            assert!(peer.learned.len() <= self.cfg.max_macs_per_peer);
            for (i, e) in peer.learned.iter().enumerate() {
                assert_eq!(
                    self.table.macs.get(&e.mac),
                    Some(&Slot {
                        peer: id,
                        index: i as u32
                    })
                );
            }
            total += peer.learned.len();
        }
        assert_eq!(total, self.table.macs.len());
        for (ip, mac) in &self.table.ips {
            let (_, e) = self.learned(mac).expect("binding to an unknown MAC");
            assert_eq!(e.ip, Some(*ip));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::build::*;
    use crate::packet::{
        checksum, checksum_add, checksum_finish, pseudo_header_v6, BROADCAST, ETHERTYPE_VLAN,
        ETH_HLEN, IPPROTO_ICMP, IPPROTO_TCP,
    };
    use proptest::prelude::*;
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    /// Counts this thread's allocations, to prove the data path makes none.
    struct Counting;

    thread_local! {
        static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
    }

    fn count() {
        let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
    }

    // SAFETY: forwards to the system allocator unchanged; the counter is a
    // const-initialised thread-local Cell, which neither allocates nor
    // registers a destructor.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            count();
            unsafe { System.alloc(layout) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            unsafe { System.dealloc(ptr, layout) }
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            count();
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }

    #[global_allocator]
    static GLOBAL: Counting = Counting;

    fn allocations() -> u64 {
        ALLOCATIONS.with(Cell::get)
    }

    const L: Ipv4Addr = Ipv4Addr::new(10, 244, 3, 2);
    const L_MAC: Mac = pod_mac(L);
    const L_OTHER: Ipv4Addr = Ipv4Addr::new(10, 244, 3, 9);
    const R1: Ipv4Addr = Ipv4Addr::new(10, 244, 5, 7);
    const R1_MAC: Mac = pod_mac(R1);
    const GW1: Ipv4Addr = Ipv4Addr::new(10, 244, 5, 1);
    const GW1_MAC: Mac = [0x7a, 0x1c, 0x33, 0x44, 0x55, 0x01];
    const HOST1: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 5);
    const R2: Ipv4Addr = Ipv4Addr::new(10, 244, 6, 9);
    const R2_MAC: Mac = pod_mac(R2);
    const NOWHERE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
    const V6_LOCAL: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 3, 0, 0, 0, 2);
    const V6_R7: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 7, 0, 0, 0, 2);
    const TTL: Duration = Duration::from_secs(300);

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn cfg() -> SwitchConfig {
        SwitchConfig {
            local_subnet: net("10.244.3.0/24"),
            mtu: 1380,
            flood_rate: 10,
            flood_burst: 3,
            max_macs_per_peer: 4,
            mac_ttl: TTL,
        }
    }

    /// Peers 1 and 2 are IPv4 nodes with host addresses, 7 an IPv6 node.
    fn switch() -> Switch {
        let mut sw = Switch::new(cfg());
        sw.set_peer(
            1,
            PeerAddrs {
                pod_subnet: net("10.244.5.0/24"),
                host_addr: Some(HOST1.into()),
            },
        );
        sw.set_peer(
            2,
            PeerAddrs {
                pod_subnet: net("10.244.6.0/24"),
                host_addr: Some("10.10.0.6".parse().unwrap()),
            },
        );
        sw.set_peer(
            7,
            PeerAddrs {
                pod_subnet: net("fd00:0:0:7::/64"),
                host_addr: None,
            },
        );
        sw
    }

    fn mac(last: u8) -> Mac {
        [0x7a, 0x1c, 0, 0, 0, last]
    }

    fn local(sw: &mut Switch, now: Instant, frame: &[u8]) -> LocalVerdict {
        sw.from_local(now, frame, false, &mut [0; 1600])
    }

    fn reply(sw: &mut Switch, now: Instant, frame: &[u8]) -> Vec<u8> {
        let mut out = [0; 1600];
        match sw.from_local(now, frame, false, &mut out) {
            LocalVerdict::Reply(n) => out[..n].to_vec(),
            v => panic!("expected a reply, got {v:?}"),
        }
    }

    fn udp4(src_mac: Mac, dst_mac: Mac, src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
        udp4_ports(src_mac, dst_mac, src, dst, 5000, 5001)
    }

    fn udp4_ports(
        src_mac: Mac,
        dst_mac: Mac,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        sp: u16,
        dp: u16,
    ) -> Vec<u8> {
        eth(
            dst_mac,
            src_mac,
            ETHERTYPE_IPV4,
            &ipv4(src, dst, IPPROTO_UDP, true, &udp(sp, dp, &[0; 24])),
        )
    }

    fn arp_frame(
        dst_mac: Mac,
        op: u16,
        sender: (Mac, Ipv4Addr),
        target: (Mac, Ipv4Addr),
    ) -> Vec<u8> {
        eth(dst_mac, sender.0, ETHERTYPE_ARP, &arp(op, sender, target))
    }

    fn who_has(target: Ipv4Addr) -> Vec<u8> {
        arp_frame(BROADCAST, ARP_REQUEST, (L_MAC, L), ([0; 6], target))
    }

    fn ip6(
        src_mac: Mac,
        dst_mac: Mac,
        src: Ipv6Addr,
        dst: Ipv6Addr,
        nh: u8,
        payload: &[u8],
    ) -> Vec<u8> {
        eth(
            dst_mac,
            src_mac,
            ETHERTYPE_IPV6,
            &ipv6(src, dst, nh, payload),
        )
    }

    fn solicit(src: Ipv6Addr, target: Ipv6Addr) -> Vec<u8> {
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
        ip6(
            L_MAC,
            dst_mac,
            src,
            group,
            IPPROTO_ICMPV6,
            &neighbor_solicit(target),
        )
    }

    #[test]
    fn drop_reasons_have_distinct_snake_case_labels() {
        let labels: Vec<_> = DropReason::ALL.iter().map(|r| r.as_str()).collect();
        for (i, l) in labels.iter().enumerate() {
            assert!(l.chars().all(|c| c.is_ascii_lowercase() || c == '_'), "{l}");
            assert!(!labels[..i].contains(l), "{l} twice");
        }
        assert_eq!(DropReason::Dhcp.as_str(), "dhcp");
        assert_eq!(DropReason::LinkLocal.as_str(), "link_local");
    }

    #[test]
    fn local_short_frames_and_group_sources_are_malformed() {
        let (mut sw, t) = (switch(), Instant::now());
        let frame = udp4(L_MAC, R1_MAC, L, R1);
        assert_eq!(
            local(&mut sw, t, &frame[..13]),
            LocalVerdict::Drop(Malformed)
        );
        assert_eq!(local(&mut sw, t, &[]), LocalVerdict::Drop(Malformed));
        assert_eq!(
            local(&mut sw, t, &udp4([0x33, 0x33, 0, 0, 0, 1], R1_MAC, L, R1)),
            LocalVerdict::Drop(Malformed)
        );
        // IPv4 ethertype with a broken header, ARP for other protocols, ARP op 3.
        assert_eq!(
            local(&mut sw, t, &eth(R1_MAC, L_MAC, ETHERTYPE_IPV4, &[0x45; 10])),
            LocalVerdict::Drop(Malformed)
        );
        let mut arp_v6 = who_has(R1);
        arp_v6[ETH_HLEN + 2] = 0x86;
        assert_eq!(local(&mut sw, t, &arp_v6), LocalVerdict::Drop(Malformed));
        let rarp = arp_frame(BROADCAST, 3, (L_MAC, L), ([0; 6], R1));
        assert_eq!(local(&mut sw, t, &rarp), LocalVerdict::Drop(Malformed));
        // UDP shorter than its header.
        let bad_udp = eth(
            R1_MAC,
            L_MAC,
            ETHERTYPE_IPV4,
            &ipv4(L, R1, IPPROTO_UDP, true, &[0; 5]),
        );
        assert_eq!(local(&mut sw, t, &bad_udp), LocalVerdict::Drop(Malformed));
    }

    #[test]
    fn local_link_local_groups_are_never_forwarded() {
        let (mut sw, t) = (switch(), Instant::now());
        for last in [0x00, 0x01, 0x02, 0x0e, 0x0f] {
            let stp = eth(
                [0x01, 0x80, 0xc2, 0, 0, last],
                L_MAC,
                0x0026,
                &[0x42, 0x42, 0x03],
            );
            assert_eq!(
                local(&mut sw, t, &stp),
                LocalVerdict::Drop(LinkLocal),
                "{last:#x}"
            );
        }
        let not_reserved = udp4(L_MAC, [0x01, 0x80, 0xc2, 0, 0, 0x10], L, R1);
        assert_eq!(local(&mut sw, t, &not_reserved), LocalVerdict::Flood);
    }

    #[test]
    fn local_other_ethertypes_and_vlan_tags_are_dropped() {
        let (mut sw, t) = (switch(), Instant::now());
        let inner = udp4(L_MAC, R1_MAC, L, R1);
        let mut tagged = eth(R1_MAC, L_MAC, ETHERTYPE_VLAN, &[0, 5]);
        tagged.extend_from_slice(&inner[12..]);
        assert_eq!(local(&mut sw, t, &tagged), LocalVerdict::Drop(EtherType));
        for ethertype in [0x88a8, 0x0026, 0x8847, 0x88cc] {
            assert_eq!(
                local(&mut sw, t, &eth(R1_MAC, L_MAC, ethertype, &[0; 46])),
                LocalVerdict::Drop(EtherType)
            );
        }
    }

    #[test]
    fn dhcp_never_crosses_in_either_direction() {
        let (mut sw, t) = (switch(), Instant::now());
        let discover = udp4_ports(
            L_MAC,
            BROADCAST,
            "0.0.0.0".parse().unwrap(),
            Ipv4Addr::BROADCAST,
            68,
            67,
        );
        assert_eq!(local(&mut sw, t, &discover), LocalVerdict::Drop(Dhcp));
        let offer = udp4_ports(L_MAC, R1_MAC, L, R1, 67, 68);
        assert_eq!(local(&mut sw, t, &offer), LocalVerdict::Drop(Dhcp));
        let solicit6 = ip6(
            L_MAC,
            [0x33, 0x33, 0, 1, 0, 2],
            V6_LOCAL,
            "ff02::1:2".parse().unwrap(),
            IPPROTO_UDP,
            &udp(546, 547, &[0; 8]),
        );
        assert_eq!(local(&mut sw, t, &solicit6), LocalVerdict::Drop(Dhcp));

        let from_server = udp4_ports(R1_MAC, BROADCAST, R1, Ipv4Addr::BROADCAST, 67, 68);
        assert_eq!(sw.from_peer(t, 1, &from_server), PeerVerdict::Drop(Dhcp));
        let advertise = ip6(
            mac(7),
            L_MAC,
            V6_R7,
            V6_LOCAL,
            IPPROTO_UDP,
            &udp(547, 546, &[0; 8]),
        );
        assert_eq!(sw.from_peer(t, 7, &advertise), PeerVerdict::Drop(Dhcp));
        // Port 67 in a non-first fragment is just payload.
        let mut frag = ipv4(L, R1, IPPROTO_UDP, false, &udp(68, 67, &[0; 8]));
        frag[6..8].copy_from_slice(&0x0010u16.to_be_bytes());
        let frag = eth(R1_MAC, L_MAC, ETHERTYPE_IPV4, &frag);
        assert_eq!(local(&mut sw, t, &frag), LocalVerdict::Unicast(1));
    }

    fn tcp4(df: bool, l3_len: usize) -> Vec<u8> {
        eth(
            R1_MAC,
            L_MAC,
            ETHERTYPE_IPV4,
            &ipv4(L, R1, IPPROTO_TCP, df, &vec![0x5a; l3_len - 20]),
        )
    }

    #[test]
    fn oversized_ipv4_with_df_is_answered_with_fragmentation_needed() {
        let (mut sw, t) = (switch(), Instant::now());
        assert_eq!(
            local(&mut sw, t, &tcp4(true, 1380)),
            LocalVerdict::Unicast(1)
        );
        let frame = tcp4(true, 1381);
        let answer = reply(&mut sw, t, &frame);

        let e = Ethernet::parse(&answer).unwrap();
        assert_eq!((e.dst, e.src, e.ethertype), (L_MAC, R1_MAC, ETHERTYPE_IPV4));
        let ip = Ipv4::parse(e.payload).unwrap();
        assert_eq!(
            (ip.src, ip.dst, ip.ttl, ip.protocol),
            (R1, L, 64, IPPROTO_ICMP)
        );
        assert_eq!(ip.total_len(), e.payload.len());
        let mut header = ip.header.to_vec();
        header[10..12].fill(0);
        assert_eq!(checksum(&header), ip.checksum, "IP header checksum");
        let mut icmp = ip.payload.to_vec();
        let sent = u16::from_be_bytes([icmp[2], icmp[3]]);
        icmp[2..4].fill(0);
        assert_eq!(checksum(&icmp), sent, "ICMP checksum");
        assert_eq!(&icmp[..2], &[3, 4]);
        assert_eq!(u16::from_be_bytes([icmp[6], icmp[7]]), 1380, "next-hop MTU");
        assert_eq!(
            &icmp[8..],
            &frame[ETH_HLEN..ETH_HLEN + 20 + 64],
            "quotes header + 64 bytes"
        );
    }

    #[test]
    fn oversized_ipv6_is_answered_with_packet_too_big() {
        let (mut sw, t) = (switch(), Instant::now());
        let frame = ip6(L_MAC, mac(7), V6_LOCAL, V6_R7, IPPROTO_TCP, &[0x5a; 1341]);
        let answer = reply(&mut sw, t, &frame);
        assert!(answer.len() - ETH_HLEN <= 1280);
        let e = Ethernet::parse(&answer).unwrap();
        assert_eq!((e.dst, e.src), (L_MAC, mac(7)));
        let ip = Ipv6::parse(e.payload).unwrap();
        assert_eq!(
            (ip.src, ip.dst, ip.next_header, ip.hop_limit),
            (V6_R7, V6_LOCAL, IPPROTO_ICMPV6, 64)
        );
        let mut icmp = ip.payload.to_vec();
        let sent = u16::from_be_bytes([icmp[2], icmp[3]]);
        icmp[2..4].fill(0);
        let pseudo = pseudo_header_v6(ip.src, ip.dst, IPPROTO_ICMPV6, icmp.len() as u32);
        assert_eq!(
            checksum_finish(checksum_add(pseudo, &icmp)),
            sent,
            "ICMPv6 checksum with pseudo-header"
        );
        assert_eq!((icmp[0], icmp[1]), (2, 0));
        assert_eq!(
            u32::from_be_bytes([icmp[4], icmp[5], icmp[6], icmp[7]]),
            1380
        );
        assert_eq!(&icmp[8..], &frame[ETH_HLEN..ETH_HLEN + icmp.len() - 8]);
    }

    #[test]
    fn oversized_frames_that_may_not_be_answered_are_dropped() {
        let (mut sw, t) = (switch(), Instant::now());
        assert_eq!(
            local(&mut sw, t, &tcp4(false, 1381)),
            LocalVerdict::Drop(TooBig)
        );
        let unreachable = eth(
            R1_MAC,
            L_MAC,
            ETHERTYPE_IPV4,
            &ipv4(L, R1, IPPROTO_ICMP, true, &icmp(3, 1, &[0; 1400])),
        );
        assert_eq!(local(&mut sw, t, &unreachable), LocalVerdict::Drop(TooBig));
        let from_nowhere = ip6(
            L_MAC,
            mac(7),
            Ipv6Addr::UNSPECIFIED,
            V6_R7,
            IPPROTO_TCP,
            &[0; 1400],
        );
        assert_eq!(local(&mut sw, t, &from_nowhere), LocalVerdict::Drop(TooBig));
        let mut huge_arp = who_has(R1);
        huge_arp.resize(1500, 0);
        assert_eq!(local(&mut sw, t, &huge_arp), LocalVerdict::Drop(TooBig));
    }

    #[test]
    fn gso_super_frames_are_not_measured_against_the_mtu() {
        let (mut sw, t) = (switch(), Instant::now());
        let frame = tcp4(true, 60_000);
        assert_eq!(
            sw.from_local(t, &frame, true, &mut [0; 1600]),
            LocalVerdict::Unicast(1)
        );
        assert_eq!(
            sw.from_local(t, &frame, false, &mut [0; 1600]),
            LocalVerdict::Reply(14 + 20 + 8 + 20 + 64)
        );
    }

    #[test]
    fn arp_for_a_remote_pod_is_answered_with_its_derived_mac() {
        let (mut sw, t) = (switch(), Instant::now());
        for dst in [BROADCAST, R1_MAC] {
            let answer = reply(
                &mut sw,
                t,
                &arp_frame(dst, ARP_REQUEST, (L_MAC, L), ([0; 6], R1)),
            );
            let e = Ethernet::parse(&answer).unwrap();
            assert_eq!((e.dst, e.src, e.ethertype), (L_MAC, R1_MAC, ETHERTYPE_ARP));
            let a = Arp::parse(e.payload).unwrap();
            assert_eq!(
                a,
                Arp {
                    op: ARP_REPLY,
                    sender_mac: R1_MAC,
                    sender_ip: R1,
                    target_mac: L_MAC,
                    target_ip: L
                }
            );
        }
        // Answers cost no flood budget.
        for _ in 0..10 {
            reply(&mut sw, t, &who_has(R2));
        }
    }

    #[test]
    fn arp_about_the_local_link_or_nobody_stays_here() {
        let (mut sw, t) = (switch(), Instant::now());
        assert_eq!(
            local(&mut sw, t, &who_has(L_OTHER)),
            LocalVerdict::Drop(Local)
        );
        let announce = arp_frame(BROADCAST, ARP_REQUEST, (L_MAC, L), ([0; 6], L));
        assert_eq!(local(&mut sw, t, &announce), LocalVerdict::Drop(Local));
        let announce_reply = arp_frame(BROADCAST, ARP_REPLY, (L_MAC, L), (BROADCAST, L));
        assert_eq!(
            local(&mut sw, t, &announce_reply),
            LocalVerdict::Drop(Local)
        );
        let probe = arp_frame(
            BROADCAST,
            ARP_REQUEST,
            (L_MAC, Ipv4Addr::UNSPECIFIED),
            ([0; 6], R1),
        );
        assert_eq!(local(&mut sw, t, &probe), LocalVerdict::Drop(Local));
        assert_eq!(
            local(&mut sw, t, &who_has(NOWHERE)),
            LocalVerdict::Drop(NoRoute)
        );
        assert_eq!(
            local(&mut sw, t, &who_has(Ipv4Addr::new(10, 244, 9, 9))),
            LocalVerdict::Drop(NoRoute)
        );
    }

    #[test]
    fn arp_for_a_remote_gateway_goes_to_its_owner_until_its_reply_is_learned() {
        let (mut sw, t) = (switch(), Instant::now());
        assert_eq!(local(&mut sw, t, &who_has(GW1)), LocalVerdict::Unicast(1));

        let gw_reply = arp_frame(L_MAC, ARP_REPLY, (GW1_MAC, GW1), (L_MAC, L));
        assert_eq!(sw.from_peer(t, 1, &gw_reply), PeerVerdict::Deliver);
        assert_eq!(
            sw.stats(),
            SwitchStats {
                peers: 3,
                learned_macs: 1,
                learned_ips: 1
            }
        );

        let answer = reply(&mut sw, t + Duration::from_secs(1), &who_has(GW1));
        let a = Arp::parse(&answer[ETH_HLEN..]).unwrap();
        assert_eq!((a.sender_mac, a.sender_ip), (GW1_MAC, GW1));
        assert_eq!(Ethernet::parse(&answer).unwrap().src, GW1_MAC);

        // An expired binding is no answer.
        assert_eq!(
            local(&mut sw, t + TTL, &who_has(GW1)),
            LocalVerdict::Unicast(1)
        );
    }

    #[test]
    fn arp_sent_to_an_owner_spends_the_flood_budget() {
        let (mut sw, t) = (switch(), Instant::now());
        for _ in 0..3 {
            assert_eq!(local(&mut sw, t, &who_has(GW1)), LocalVerdict::Unicast(1));
        }
        assert_eq!(
            local(&mut sw, t, &who_has(GW1)),
            LocalVerdict::Drop(RateLimited)
        );
        assert_eq!(
            local(&mut sw, t, &udp4(L_MAC, BROADCAST, L, Ipv4Addr::BROADCAST)),
            LocalVerdict::Drop(RateLimited)
        );
    }

    #[test]
    fn a_learned_binding_beats_the_derived_mac() {
        let (mut sw, t) = (switch(), Instant::now());
        let custom_ip = Ipv4Addr::new(10, 244, 5, 8);
        let custom = [0x02, 0x42, 0xac, 0x11, 0, 8];
        let announce = arp_frame(BROADCAST, ARP_REQUEST, (custom, custom_ip), ([0; 6], L));
        assert_eq!(sw.from_peer(t, 1, &announce), PeerVerdict::Deliver);
        let answer = reply(&mut sw, t, &who_has(custom_ip));
        assert_eq!(Arp::parse(&answer[ETH_HLEN..]).unwrap().sender_mac, custom);
        // A binding from a peer that doesn't own the subnet is never made.
        let liar = arp_frame(BROADCAST, ARP_REQUEST, (mac(2), R1), ([0; 6], L));
        assert_eq!(sw.from_peer(t, 2, &liar), PeerVerdict::Drop(Spoofed));
        assert_eq!(
            Arp::parse(&reply(&mut sw, t, &who_has(R1))[ETH_HLEN..])
                .unwrap()
                .sender_mac,
            R1_MAC
        );
    }

    #[test]
    fn arp_replies_from_local_pods_are_routed_by_destination_mac() {
        let (mut sw, t) = (switch(), Instant::now());
        let answer = arp_frame(R1_MAC, ARP_REPLY, (L_MAC, L), (R1_MAC, R1));
        assert_eq!(local(&mut sw, t, &answer), LocalVerdict::Unicast(1));
        let to_gw = arp_frame(GW1_MAC, ARP_REPLY, (L_MAC, L), (GW1_MAC, GW1));
        assert_eq!(
            local(&mut sw, t, &to_gw),
            LocalVerdict::Unicast(1),
            "by target address"
        );
        let broadcast = arp_frame(BROADCAST, ARP_REPLY, (L_MAC, L), (BROADCAST, R1));
        assert_eq!(local(&mut sw, t, &broadcast), LocalVerdict::Flood);
    }

    #[test]
    fn neighbour_solicitations_go_to_the_owner_of_their_target_only() {
        let (mut sw, t) = (switch(), Instant::now());
        assert_eq!(
            local(&mut sw, t, &solicit(V6_LOCAL, V6_R7)),
            LocalVerdict::Unicast(7)
        );
        assert_eq!(
            local(
                &mut sw,
                t,
                &solicit(V6_LOCAL, "fd00:0:0:9::2".parse().unwrap())
            ),
            LocalVerdict::Drop(NoRoute)
        );
        assert_eq!(
            local(&mut sw, t, &solicit(Ipv6Addr::UNSPECIFIED, V6_R7)),
            LocalVerdict::Drop(Local),
            "DAD"
        );
        // Burst 3: one spent above, none by the drops.
        for _ in 0..2 {
            assert_eq!(
                local(&mut sw, t, &solicit(V6_LOCAL, V6_R7)),
                LocalVerdict::Unicast(7)
            );
        }
        assert_eq!(
            local(&mut sw, t, &solicit(V6_LOCAL, V6_R7)),
            LocalVerdict::Drop(RateLimited)
        );

        let mut sw6 = Switch::new(SwitchConfig {
            local_subnet: net("fd00:0:0:3::/64"),
            ..cfg()
        });
        sw6.set_peer(
            7,
            PeerAddrs {
                pod_subnet: net("fd00:0:0:7::/64"),
                host_addr: None,
            },
        );
        let neighbour = "fd00:0:0:3::5".parse().unwrap();
        assert_eq!(
            local(&mut sw6, t, &solicit(V6_LOCAL, neighbour)),
            LocalVerdict::Drop(Local)
        );

        let mut short = solicit(V6_LOCAL, V6_R7);
        short.truncate(short.len() - 1);
        short[ETH_HLEN + 5] -= 1;
        assert_eq!(local(&mut sw6, t, &short), LocalVerdict::Drop(Malformed));
    }

    #[test]
    fn other_ipv6_multicast_is_link_local() {
        let (mut sw, t) = (switch(), Instant::now());
        let all_nodes = [0x33, 0x33, 0, 0, 0, 1];
        let ra = ip6(
            L_MAC,
            all_nodes,
            V6_LOCAL,
            "ff02::1".parse().unwrap(),
            IPPROTO_ICMPV6,
            &icmp(134, 0, &[0; 12]),
        );
        assert_eq!(local(&mut sw, t, &ra), LocalVerdict::Drop(LinkLocal));
        let mld = ip6(
            L_MAC,
            [0x33, 0x33, 0, 0, 0, 0x16],
            V6_LOCAL,
            "ff02::16".parse().unwrap(),
            0,
            &[58, 0, 5, 2, 0, 0, 1, 0],
        );
        assert_eq!(local(&mut sw, t, &mld), LocalVerdict::Drop(LinkLocal));
        let mdns = ip6(
            L_MAC,
            [0x33, 0x33, 0, 0, 0, 0xfb],
            V6_LOCAL,
            "ff02::fb".parse().unwrap(),
            IPPROTO_UDP,
            &udp(5353, 5353, &[0; 12]),
        );
        assert_eq!(local(&mut sw, t, &mdns), LocalVerdict::Drop(LinkLocal));
    }

    #[test]
    fn unicast_goes_by_learned_mac_then_derived_mac_then_destination_address() {
        let (mut sw, t) = (switch(), Instant::now());
        let gw2 = mac(0x22);
        assert_eq!(
            sw.from_peer(t, 2, &udp4(gw2, L_MAC, R2, L)),
            PeerVerdict::Deliver
        );
        assert_eq!(
            local(&mut sw, t, &udp4(L_MAC, gw2, L, NOWHERE)),
            LocalVerdict::Unicast(2),
            "learned"
        );
        assert_eq!(
            local(&mut sw, t, &udp4(L_MAC, R1_MAC, L, NOWHERE)),
            LocalVerdict::Unicast(1),
            "derived"
        );
        assert_eq!(
            local(&mut sw, t, &udp4(L_MAC, pod_mac(L_OTHER), L, R1)),
            LocalVerdict::Drop(Local),
            "derived local"
        );
        assert_eq!(
            local(&mut sw, t, &udp4(L_MAC, mac(9), L, R2)),
            LocalVerdict::Unicast(2),
            "by address"
        );
        let stray = pod_mac(Ipv4Addr::new(10, 244, 9, 9));
        assert_eq!(
            local(&mut sw, t, &udp4(L_MAC, stray, L, R1)),
            LocalVerdict::Unicast(1),
            "underivable, by address"
        );
        assert_eq!(
            local(&mut sw, t, &udp4(L_MAC, mac(9), L, L_OTHER)),
            LocalVerdict::Drop(Local),
            "local address"
        );
        let v6 = ip6(L_MAC, mac(9), V6_LOCAL, V6_R7, IPPROTO_TCP, &[0; 20]);
        assert_eq!(local(&mut sw, t, &v6), LocalVerdict::Unicast(7));
        assert_eq!(
            local(&mut sw, t, &udp4(L_MAC, mac(9), L, NOWHERE)),
            LocalVerdict::Flood,
            "unknown unicast"
        );
    }

    #[test]
    fn floods_are_rate_limited_and_the_bucket_refills_with_time() {
        let (mut sw, t) = (switch(), Instant::now());
        let broadcast = udp4(L_MAC, BROADCAST, L, Ipv4Addr::new(10, 244, 255, 255));
        let mdns = udp4(
            L_MAC,
            [0x01, 0, 0x5e, 0, 0, 0xfb],
            L,
            Ipv4Addr::new(224, 0, 0, 251),
        );
        let at = |ms: u64| t + Duration::from_millis(ms);
        for frame in [&broadcast, &mdns, &broadcast] {
            assert_eq!(local(&mut sw, t, frame), LocalVerdict::Flood);
        }
        assert_eq!(
            local(&mut sw, t, &broadcast),
            LocalVerdict::Drop(RateLimited)
        );
        // 10 per second: a token per 100 ms, and fractions are kept.
        assert_eq!(
            local(&mut sw, at(70), &broadcast),
            LocalVerdict::Drop(RateLimited)
        );
        assert_eq!(local(&mut sw, at(140), &broadcast), LocalVerdict::Flood);
        assert_eq!(
            local(&mut sw, at(150), &broadcast),
            LocalVerdict::Drop(RateLimited)
        );
        assert_eq!(local(&mut sw, at(200), &broadcast), LocalVerdict::Flood);
        // A long pause fills the bucket, never beyond the burst.
        for _ in 0..3 {
            assert_eq!(local(&mut sw, at(60_000), &mdns), LocalVerdict::Flood);
        }
        assert_eq!(
            local(&mut sw, at(60_000), &mdns),
            LocalVerdict::Drop(RateLimited)
        );
        // Time running backwards (a caller's bug) refills nothing.
        assert_eq!(local(&mut sw, t, &mdns), LocalVerdict::Drop(RateLimited));
    }

    #[test]
    fn a_silent_bucket_does_not_bank_tokens_while_full() {
        let mut bucket = Bucket::new(1, 2);
        let t = Instant::now();
        assert!(bucket.take(t + Duration::from_secs(100)));
        assert!(bucket.take(t + Duration::from_secs(100)));
        assert!(!bucket.take(t + Duration::from_secs(100)));
        assert!(bucket.take(t + Duration::from_secs(101)));
        let mut never = Bucket::new(0, 1);
        assert!(never.take(t));
        assert!(!never.take(t + Duration::from_secs(1000)));
    }

    #[test]
    fn peer_frames_from_its_own_addresses_are_delivered_and_learned() {
        let (mut sw, t) = (switch(), Instant::now());
        assert_eq!(
            sw.from_peer(t, 1, &udp4(R1_MAC, L_MAC, R1, L)),
            PeerVerdict::Deliver
        );
        assert_eq!(
            sw.from_peer(t, 1, &udp4(GW1_MAC, L_MAC, HOST1, L)),
            PeerVerdict::Deliver
        );
        assert_eq!(
            sw.from_peer(
                t,
                1,
                &udp4(GW1_MAC, BROADCAST, GW1, Ipv4Addr::new(10, 244, 255, 255))
            ),
            PeerVerdict::Deliver
        );
        let v6 = ip6(
            pod_mac(Ipv4Addr::new(0, 0, 0, 2)),
            L_MAC,
            V6_R7,
            V6_LOCAL,
            IPPROTO_TCP,
            &[0; 20],
        );
        assert_eq!(sw.from_peer(t, 7, &v6), PeerVerdict::Deliver);
        assert_eq!(
            sw.stats(),
            SwitchStats {
                peers: 3,
                learned_macs: 3,
                learned_ips: 0
            }
        );
        sw.check_invariants();
    }

    #[test]
    fn peer_ipv4_sources_outside_its_subnet_are_spoofed() {
        let (mut sw, t) = (switch(), Instant::now());
        for src in [
            R2,
            L,
            NOWHERE,
            Ipv4Addr::UNSPECIFIED,
            "10.10.0.6".parse().unwrap(),
        ] {
            assert_eq!(
                sw.from_peer(t, 1, &udp4(mac(1), L_MAC, src, L)),
                PeerVerdict::Drop(Spoofed),
                "{src}"
            );
        }
        let v6_from_v4_node = ip6(mac(1), L_MAC, V6_R7, V6_LOCAL, IPPROTO_TCP, &[0; 20]);
        assert_eq!(
            sw.from_peer(t, 1, &v6_from_v4_node),
            PeerVerdict::Drop(Spoofed)
        );
        // A record claiming the whole pod CIDR still can't speak for us.
        sw.set_peer(
            9,
            PeerAddrs {
                pod_subnet: net("10.244.0.0/16"),
                host_addr: None,
            },
        );
        assert_eq!(
            sw.from_peer(t, 9, &udp4(mac(9), L_MAC, L, L)),
            PeerVerdict::Drop(Spoofed)
        );
        assert_eq!(
            sw.from_peer(
                t,
                9,
                &udp4(mac(9), L_MAC, Ipv4Addr::new(10, 244, 200, 1), L)
            ),
            PeerVerdict::Deliver
        );
        assert_eq!(
            sw.from_peer(t, 42, &udp4(mac(1), L_MAC, R1, L)),
            PeerVerdict::Drop(Spoofed),
            "unknown peer"
        );
    }

    #[test]
    fn peer_arp_senders_must_be_its_own() {
        let (mut sw, t) = (switch(), Instant::now());
        let request =
            |sender: (Mac, Ipv4Addr)| arp_frame(BROADCAST, ARP_REQUEST, sender, ([0; 6], L));
        assert_eq!(
            sw.from_peer(t, 1, &request((mac(1), R2))),
            PeerVerdict::Drop(Spoofed),
            "other subnet"
        );
        assert_eq!(
            sw.from_peer(t, 1, &request((mac(1), L))),
            PeerVerdict::Drop(Spoofed),
            "our subnet"
        );
        assert_eq!(
            sw.from_peer(t, 1, &request((mac(1), Ipv4Addr::UNSPECIFIED))),
            PeerVerdict::Drop(Spoofed),
            "probe"
        );
        let mismatched = eth(
            BROADCAST,
            GW1_MAC,
            ETHERTYPE_ARP,
            &arp(ARP_REQUEST, (L_MAC, GW1), ([0; 6], L)),
        );
        assert_eq!(
            sw.from_peer(t, 1, &mismatched),
            PeerVerdict::Drop(Spoofed),
            "sender MAC != source MAC"
        );
        assert_eq!(sw.stats().learned_macs, 0, "spoofed frames teach nothing");

        assert_eq!(
            sw.from_peer(t, 1, &request((GW1_MAC, HOST1))),
            PeerVerdict::Deliver,
            "host address"
        );
        assert_eq!(
            sw.stats().learned_ips,
            0,
            "only pod-subnet addresses are bound"
        );
        assert_eq!(
            sw.from_peer(t, 1, &request((GW1_MAC, GW1))),
            PeerVerdict::Deliver
        );
        assert_eq!(sw.stats().learned_ips, 1);
    }

    #[test]
    fn derived_source_macs_must_encode_the_peers_subnet() {
        let (mut sw, t) = (switch(), Instant::now());
        assert_eq!(
            sw.from_peer(t, 1, &udp4(R2_MAC, L_MAC, R1, L)),
            PeerVerdict::Drop(Spoofed)
        );
        assert_eq!(
            sw.from_peer(t, 1, &udp4(L_MAC, R2_MAC, R1, R2)),
            PeerVerdict::Drop(Spoofed)
        );
        let arp_with_foreign_mac = arp_frame(BROADCAST, ARP_REQUEST, (R2_MAC, R1), ([0; 6], L));
        assert_eq!(
            sw.from_peer(t, 1, &arp_with_foreign_mac),
            PeerVerdict::Drop(Spoofed)
        );
        assert_eq!(sw.stats().learned_macs, 0);
        assert_eq!(
            sw.from_peer(t, 1, &udp4(R1_MAC, L_MAC, R1, L)),
            PeerVerdict::Deliver
        );
        // Whatever another pod of the subnet is called: the MAC is ours.
        assert_eq!(
            local(&mut sw, t, &udp4(L_MAC, R1_MAC, L, R1)),
            LocalVerdict::Unicast(1)
        );
    }

    #[test]
    fn derived_macs_of_ipv6_only_pods_use_the_low_32_bits() {
        let tail = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert!(derivable(&net("fd00:0:0:7::/64"), tail("1.2.3.4")));
        assert!(derivable(&net("fd00::7:0/120"), tail("0.7.0.5")));
        assert!(!derivable(&net("fd00::7:0/120"), tail("0.7.1.5")));
        assert!(derivable(&net("fd00::7:5/128"), tail("0.7.0.5")));
        assert!(!derivable(&net("fd00::7:5/128"), tail("0.7.0.6")));
        assert!(derivable(&net("10.244.5.0/24"), R1));
        assert!(!derivable(&net("10.244.5.0/24"), R2));
    }

    #[test]
    fn peer_ipv6_sources_must_be_global_addresses_of_its_subnet() {
        let (mut sw, t) = (switch(), Instant::now());
        let from = |src: &str| {
            ip6(
                mac(7),
                L_MAC,
                src.parse().unwrap(),
                V6_LOCAL,
                IPPROTO_TCP,
                &[0; 20],
            )
        };
        for src in ["fe80::1", "::", "fd00:0:0:8::2", "ff02::1", "::1"] {
            assert_eq!(
                sw.from_peer(t, 7, &from(src)),
                PeerVerdict::Drop(Spoofed),
                "{src}"
            );
        }
        assert_eq!(
            sw.from_peer(t, 7, &from("fd00:0:0:7::2")),
            PeerVerdict::Deliver
        );
        // A router advertisement from a peer has a link-local source.
        let ra = ip6(
            mac(7),
            [0x33, 0x33, 0, 0, 0, 1],
            "fe80::1".parse().unwrap(),
            "ff02::1".parse().unwrap(),
            IPPROTO_ICMPV6,
            &icmp(134, 0, &[0; 12]),
        );
        assert_eq!(sw.from_peer(t, 7, &ra), PeerVerdict::Drop(Spoofed));
    }

    #[test]
    fn peer_checks_run_in_order() {
        let (mut sw, t) = (switch(), Instant::now());
        let good = udp4(R1_MAC, L_MAC, R1, L);
        assert_eq!(
            sw.from_peer(t, 1, &good[..13]),
            PeerVerdict::Drop(Malformed)
        );
        assert_eq!(
            sw.from_peer(t, 1, &udp4(BROADCAST, L_MAC, R1, L)),
            PeerVerdict::Drop(Malformed)
        );
        assert_eq!(
            sw.from_peer(t, 1, &eth(L_MAC, R1_MAC, ETHERTYPE_VLAN, &good[12..])),
            PeerVerdict::Drop(EtherType)
        );
        assert_eq!(
            sw.from_peer(
                t,
                1,
                &eth([0x01, 0x80, 0xc2, 0, 0, 0], R1_MAC, 0x0026, &[0; 40])
            ),
            PeerVerdict::Drop(EtherType)
        );
        assert_eq!(
            sw.from_peer(t, 1, &udp4(R1_MAC, [0x01, 0x80, 0xc2, 0, 0, 0x0e], R1, L)),
            PeerVerdict::Drop(LinkLocal)
        );
        assert_eq!(
            sw.from_peer(
                t,
                1,
                &eth(L_MAC, R1_MAC, ETHERTYPE_IPV4, &good[ETH_HLEN..30])
            ),
            PeerVerdict::Drop(Malformed)
        );
        // DHCP is dropped even from a source that would be spoofed.
        assert_eq!(
            sw.from_peer(t, 1, &udp4_ports(R1_MAC, L_MAC, NOWHERE, L, 67, 68)),
            PeerVerdict::Drop(Dhcp)
        );
        assert_eq!(sw.from_peer(t, 1, &good), PeerVerdict::Deliver);
    }

    #[test]
    fn a_mac_owned_by_one_peer_cannot_be_taken_by_another_until_it_expires() {
        let (mut sw, t) = (switch(), Instant::now());
        let shared = mac(0x55);
        assert_eq!(
            sw.from_peer(t, 1, &udp4(shared, L_MAC, GW1, L)),
            PeerVerdict::Deliver
        );
        let claim = udp4(shared, L_MAC, R2, L);
        assert_eq!(
            sw.from_peer(t + Duration::from_secs(299), 2, &claim),
            PeerVerdict::Drop(Spoofed)
        );
        assert_eq!(
            local(&mut sw, t, &udp4(L_MAC, shared, L, NOWHERE)),
            LocalVerdict::Unicast(1)
        );
        let arp_claim = arp_frame(BROADCAST, ARP_REQUEST, (shared, R2), ([0; 6], L));
        assert_eq!(
            sw.from_peer(t + Duration::from_secs(299), 2, &arp_claim),
            PeerVerdict::Drop(Spoofed)
        );

        let later = t + TTL;
        assert_eq!(sw.from_peer(later, 2, &arp_claim), PeerVerdict::Deliver);
        assert_eq!(
            local(&mut sw, later, &udp4(L_MAC, shared, L, NOWHERE)),
            LocalVerdict::Unicast(2)
        );
        assert_eq!(
            sw.stats(),
            SwitchStats {
                peers: 3,
                learned_macs: 1,
                learned_ips: 1
            }
        );
        sw.check_invariants();
    }

    #[test]
    fn learning_is_bounded_per_peer_and_evicts_the_least_recently_heard() {
        let (mut sw, t) = (switch(), Instant::now());
        let at = |s: u64| t + Duration::from_secs(s);
        assert_eq!(
            sw.from_peer(t, 2, &udp4(mac(0x20), L_MAC, R2, L)),
            PeerVerdict::Deliver
        );
        for i in 0..4 {
            assert_eq!(
                sw.from_peer(at(u64::from(i)), 1, &udp4(mac(i), L_MAC, R1, L)),
                PeerVerdict::Deliver
            );
        }
        // mac(0) speaks again: mac(1) is now the least recently heard.
        assert_eq!(
            sw.from_peer(at(10), 1, &udp4(mac(0), L_MAC, R1, L)),
            PeerVerdict::Deliver
        );
        for i in 4..6 {
            assert_eq!(
                sw.from_peer(at(20), 1, &udp4(mac(i), L_MAC, R1, L)),
                PeerVerdict::Deliver
            );
        }
        assert_eq!(sw.stats().learned_macs, 5);
        sw.check_invariants();
        let route = |sw: &mut Switch, m: Mac| local(sw, at(30), &udp4(L_MAC, m, L, NOWHERE));
        for (m, expected) in [
            (mac(0), LocalVerdict::Unicast(1)),
            (mac(1), LocalVerdict::Flood),
            (mac(2), LocalVerdict::Flood),
            (mac(3), LocalVerdict::Unicast(1)),
            (mac(4), LocalVerdict::Unicast(1)),
            (mac(5), LocalVerdict::Unicast(1)),
            (mac(0x20), LocalVerdict::Unicast(2)),
        ] {
            assert_eq!(route(&mut sw, m), expected, "{m:02x?}");
        }
    }

    #[test]
    fn learned_entries_expire() {
        let (mut sw, t) = (switch(), Instant::now());
        let gw_reply = arp_frame(L_MAC, ARP_REPLY, (GW1_MAC, GW1), (L_MAC, L));
        assert_eq!(sw.from_peer(t, 1, &gw_reply), PeerVerdict::Deliver);
        assert_eq!(
            sw.from_peer(t + Duration::from_secs(100), 2, &udp4(mac(2), L_MAC, R2, L)),
            PeerVerdict::Deliver
        );
        let to_gw = udp4(L_MAC, GW1_MAC, L, NOWHERE);
        assert_eq!(
            local(&mut sw, t + TTL - Duration::from_millis(1), &to_gw),
            LocalVerdict::Unicast(1)
        );
        assert_eq!(local(&mut sw, t + TTL, &to_gw), LocalVerdict::Flood);

        sw.expire(t + TTL - Duration::from_secs(1));
        assert_eq!(sw.stats().learned_macs, 2);
        sw.expire(t + TTL);
        assert_eq!(
            sw.stats(),
            SwitchStats {
                peers: 3,
                learned_macs: 1,
                learned_ips: 0
            }
        );
        sw.check_invariants();
        sw.expire(t + TTL * 2);
        assert_eq!(sw.stats().learned_macs, 0);
    }

    #[test]
    fn removing_a_peer_forgets_everything_it_taught() {
        let (mut sw, t) = (switch(), Instant::now());
        let gw_reply = arp_frame(L_MAC, ARP_REPLY, (GW1_MAC, GW1), (L_MAC, L));
        assert_eq!(sw.from_peer(t, 1, &gw_reply), PeerVerdict::Deliver);
        assert_eq!(
            sw.from_peer(t, 2, &udp4(mac(2), L_MAC, R2, L)),
            PeerVerdict::Deliver
        );
        sw.remove_peer(1);
        sw.remove_peer(1);
        assert_eq!(
            sw.stats(),
            SwitchStats {
                peers: 2,
                learned_macs: 1,
                learned_ips: 0
            }
        );
        sw.check_invariants();
        assert_eq!(
            local(&mut sw, t, &udp4(L_MAC, GW1_MAC, L, NOWHERE)),
            LocalVerdict::Flood
        );
        assert_eq!(local(&mut sw, t, &who_has(R1)), LocalVerdict::Drop(NoRoute));
        assert_eq!(sw.from_peer(t, 1, &gw_reply), PeerVerdict::Drop(Spoofed));
        assert_eq!(
            sw.host_from_local(&ipv4(L, HOST1, IPPROTO_UDP, false, &[0; 8])),
            LocalVerdict::Drop(NoRoute)
        );
    }

    #[test]
    fn a_new_subnet_for_a_peer_forgets_what_the_old_one_vouched_for() {
        let (mut sw, t) = (switch(), Instant::now());
        assert_eq!(
            sw.from_peer(t, 1, &udp4(GW1_MAC, L_MAC, GW1, L)),
            PeerVerdict::Deliver
        );
        let new_host = PeerAddrs {
            pod_subnet: net("10.244.5.0/24"),
            host_addr: Some("10.10.1.5".parse().unwrap()),
        };
        sw.set_peer(1, new_host);
        assert_eq!(sw.stats().learned_macs, 1, "same subnet: kept");
        assert_eq!(
            sw.host_from_local(&ipv4(
                L,
                "10.10.1.5".parse().unwrap(),
                IPPROTO_UDP,
                false,
                &[]
            )),
            LocalVerdict::Unicast(1)
        );
        assert_eq!(
            sw.host_from_local(&ipv4(L, HOST1, IPPROTO_UDP, false, &[])),
            LocalVerdict::Drop(NoRoute)
        );

        // Not normalised on purpose: the switch truncates it.
        sw.set_peer(
            1,
            PeerAddrs {
                pod_subnet: net("10.244.8.1/24"),
                host_addr: None,
            },
        );
        assert_eq!(sw.stats().learned_macs, 0);
        sw.check_invariants();
        assert_eq!(local(&mut sw, t, &who_has(R1)), LocalVerdict::Drop(NoRoute));
        assert_eq!(
            local(&mut sw, t, &who_has(Ipv4Addr::new(10, 244, 8, 1))),
            LocalVerdict::Unicast(1)
        );
    }

    #[test]
    fn subnets_resolve_longest_prefix_first_and_duplicates_to_the_lowest_id() {
        let (mut sw, t) = (switch(), Instant::now());
        sw.set_peer(
            8,
            PeerAddrs {
                pod_subnet: net("10.244.5.128/25"),
                host_addr: None,
            },
        );
        sw.set_peer(
            0,
            PeerAddrs {
                pod_subnet: net("10.244.6.0/24"),
                host_addr: None,
            },
        );
        assert_eq!(
            local(
                &mut sw,
                t,
                &udp4(L_MAC, mac(9), L, Ipv4Addr::new(10, 244, 5, 200))
            ),
            LocalVerdict::Unicast(8)
        );
        assert_eq!(
            local(&mut sw, t, &udp4(L_MAC, mac(9), L, R1)),
            LocalVerdict::Unicast(1)
        );
        assert_eq!(
            local(&mut sw, t, &udp4(L_MAC, mac(9), L, R2)),
            LocalVerdict::Unicast(0)
        );
    }

    #[test]
    fn host_overlay_routes_by_host_address_and_checks_sources() {
        let sw = switch();
        let to = |dst: &str| {
            ipv4(
                "10.10.0.3".parse().unwrap(),
                dst.parse().unwrap(),
                IPPROTO_TCP,
                true,
                &[0; 20],
            )
        };
        assert_eq!(
            sw.host_from_local(&to("10.10.0.5")),
            LocalVerdict::Unicast(1)
        );
        assert_eq!(
            sw.host_from_local(&to("10.10.0.6")),
            LocalVerdict::Unicast(2)
        );
        assert_eq!(
            sw.host_from_local(&to("10.10.0.99")),
            LocalVerdict::Drop(NoRoute)
        );
        // A remote pod through the host overlay (the host answering it from
        // its host address): to the node whose subnet holds it.
        assert_eq!(
            sw.host_from_local(&to("10.244.5.7")),
            LocalVerdict::Unicast(1),
            "a remote pod goes to its node"
        );
        assert_eq!(
            sw.host_from_local(&to("10.99.5.7")),
            LocalVerdict::Drop(NoRoute)
        );
        assert_eq!(
            sw.host_from_local(&ipv6(V6_LOCAL, V6_R7, IPPROTO_TCP, &[])),
            LocalVerdict::Drop(NoRoute)
        );
        assert_eq!(
            sw.host_from_local(&[0x45, 0, 0]),
            LocalVerdict::Drop(Malformed)
        );
        assert_eq!(sw.host_from_local(&[]), LocalVerdict::Drop(Malformed));

        let from = |src: Ipv4Addr| {
            ipv4(
                src,
                "10.10.0.3".parse().unwrap(),
                IPPROTO_TCP,
                true,
                &[0; 20],
            )
        };
        assert_eq!(sw.host_from_peer(1, &from(HOST1)), PeerVerdict::Deliver);
        assert_eq!(sw.host_from_peer(1, &from(R1)), PeerVerdict::Deliver);
        assert_eq!(
            sw.host_from_peer(1, &from("10.10.0.6".parse().unwrap())),
            PeerVerdict::Drop(Spoofed)
        );
        assert_eq!(sw.host_from_peer(1, &from(L)), PeerVerdict::Drop(Spoofed));
        assert_eq!(
            sw.host_from_peer(3, &from(HOST1)),
            PeerVerdict::Drop(Spoofed)
        );
        assert_eq!(
            sw.host_from_peer(7, &ipv6(V6_R7, V6_LOCAL, IPPROTO_TCP, &[])),
            PeerVerdict::Deliver
        );
        assert_eq!(
            sw.host_from_peer(1, &[0x60; 39]),
            PeerVerdict::Drop(Malformed)
        );
    }

    #[test]
    fn the_data_path_does_not_allocate() {
        let mut sw = switch();
        let t = Instant::now();
        let frames_in: Vec<(PeerId, Vec<u8>)> = (0..64u8)
            .map(|i| (1, udp4(mac(i), L_MAC, R1, L)))
            .chain([
                (1, arp_frame(L_MAC, ARP_REPLY, (GW1_MAC, GW1), (L_MAC, L))),
                (2, udp4(R2_MAC, L_MAC, R2, L)),
            ])
            .chain([
                (
                    7,
                    ip6(mac(7), L_MAC, V6_R7, V6_LOCAL, IPPROTO_TCP, &[0; 20]),
                ),
                (2, udp4(R1_MAC, L_MAC, R1, L)),
            ])
            .collect();
        let frames_out = [
            who_has(R1),
            who_has(GW1),
            udp4(L_MAC, BROADCAST, L, Ipv4Addr::BROADCAST),
            udp4(L_MAC, mac(3), L, NOWHERE),
            tcp4(true, 1500),
            ip6(L_MAC, mac(7), V6_LOCAL, V6_R7, IPPROTO_TCP, &[0; 1400]),
            solicit(V6_LOCAL, V6_R7),
        ];
        let mut out = [0u8; 1600];
        let before = allocations();
        for round in 0..50u64 {
            let now = t + Duration::from_secs(round * 10);
            for (peer, frame) in &frames_in {
                let _ = sw.from_peer(now, *peer, frame);
            }
            for frame in &frames_out {
                let _ = sw.from_local(now, frame, false, &mut out);
            }
            sw.expire(now);
        }
        assert_eq!(allocations() - before, 0);
        sw.check_invariants();
    }

    /// Eviction churn at full tables leaves tombstones in the hash tables;
    /// the reservation must absorb their clean-up without reallocating.
    #[test]
    fn learning_churn_at_the_bound_does_not_allocate() {
        let mut sw = Switch::new(SwitchConfig {
            max_macs_per_peer: 200,
            ..cfg()
        });
        for (id, third) in [(1, 5), (2, 6), (3, 7)] {
            let subnet = IpNet::new(Ipv4Addr::new(10, 244, third, 0).into(), 24).unwrap();
            sw.set_peer(
                id,
                PeerAddrs {
                    pod_subnet: subnet,
                    host_addr: None,
                },
            );
        }
        let frames: Vec<(PeerId, Vec<u8>)> = (0..3000u16)
            .map(|i| {
                let [hi, lo] = i.to_be_bytes();
                let peer = PeerId::from(1 + lo % 3);
                let src = Ipv4Addr::new(10, 244, 4 + peer as u8, lo);
                let sender = ([0x7a, 0x1c, 0, peer as u8, hi, lo], src);
                (peer, arp_frame(BROADCAST, ARP_REQUEST, sender, ([0; 6], L)))
            })
            .collect();
        let t = Instant::now();
        let before = allocations();
        for (i, (peer, frame)) in frames.iter().enumerate() {
            let now = t + Duration::from_millis(i as u64);
            assert_eq!(sw.from_peer(now, *peer, frame), PeerVerdict::Deliver);
        }
        assert_eq!(allocations() - before, 0);
        assert_eq!(sw.stats().learned_macs, 600);
        sw.check_invariants();
    }

    fn interesting_mac() -> impl Strategy<Value = Mac> {
        prop_oneof![
            Just(BROADCAST),
            Just(L_MAC),
            Just(R1_MAC),
            Just(R2_MAC),
            Just(GW1_MAC),
            Just([0x33, 0x33, 0xff, 0, 0, 2]),
            Just([0x01, 0x80, 0xc2, 0, 0, 0]),
            (0u8..8).prop_map(mac),
            any::<[u8; 6]>(),
        ]
    }

    fn valid_frames() -> Vec<Vec<u8>> {
        vec![
            who_has(R1),
            who_has(GW1),
            arp_frame(L_MAC, ARP_REPLY, (GW1_MAC, GW1), (L_MAC, L)),
            arp_frame(BROADCAST, ARP_REQUEST, (R1_MAC, R1), ([0; 6], L)),
            udp4(L_MAC, R1_MAC, L, R1),
            udp4(R1_MAC, L_MAC, R1, L),
            udp4_ports(L_MAC, BROADCAST, L, Ipv4Addr::BROADCAST, 68, 67),
            tcp4(true, 1500),
            eth(
                R1_MAC,
                L_MAC,
                ETHERTYPE_IPV4,
                &ipv4(L, R1, IPPROTO_ICMP, true, &icmp(8, 0, &[0; 1400])),
            ),
            solicit(V6_LOCAL, V6_R7),
            ip6(mac(7), L_MAC, V6_R7, V6_LOCAL, IPPROTO_TCP, &[0; 1400]),
        ]
    }

    fn any_frame() -> impl Strategy<Value = Vec<u8>> {
        let ethertype = prop_oneof![
            Just(ETHERTYPE_IPV4),
            Just(ETHERTYPE_ARP),
            Just(ETHERTYPE_IPV6),
            Just(ETHERTYPE_VLAN),
            any::<u16>()
        ];
        let n = valid_frames().len();
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..64),
            (
                interesting_mac(),
                interesting_mac(),
                ethertype,
                proptest::collection::vec(any::<u8>(), 0..1500)
            )
                .prop_map(|(dst, src, ty, payload)| eth(dst, src, ty, &payload)),
            (
                0..n,
                proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
                any::<prop::sample::Index>()
            )
                .prop_map(|(i, edits, cut)| {
                    let mut f = valid_frames().swap_remove(i);
                    for (at, byte) in edits {
                        let at = at.index(f.len());
                        f[at] = byte;
                    }
                    f.truncate(cut.index(f.len() + 1));
                    f
                }),
        ]
    }

    #[derive(Debug, Clone)]
    enum Op {
        Local {
            frame: Vec<u8>,
            gso: bool,
            out_len: usize,
        },
        Peer {
            peer: PeerId,
            frame: Vec<u8>,
        },
        HostLocal(Vec<u8>),
        HostPeer {
            peer: PeerId,
            packet: Vec<u8>,
        },
        Expire,
        SetPeer(PeerId, u8),
        RemovePeer(PeerId),
    }

    fn any_op() -> impl Strategy<Value = Op> {
        let peer = prop_oneof![Just(1u32), Just(2), Just(7), Just(42)];
        prop_oneof![
            4 => (any_frame(), any::<bool>(), prop_oneof![Just(1600usize), 0..100usize])
                .prop_map(|(frame, gso, out_len)| Op::Local { frame, gso, out_len }),
            4 => (peer.clone(), any_frame()).prop_map(|(peer, frame)| Op::Peer { peer, frame }),
            1 => any_frame().prop_map(|f| Op::HostLocal(f.get(14..).unwrap_or_default().to_vec())),
            1 => (peer.clone(), any_frame()).prop_map(|(peer, f)| Op::HostPeer { peer, packet: f.get(14..).unwrap_or_default().to_vec() }),
            1 => Just(Op::Expire),
            1 => (peer.clone(), any::<u8>()).prop_map(|(p, third)| Op::SetPeer(p, third)),
            1 => peer.prop_map(Op::RemovePeer),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// Random and mangled frames through every entry point, interleaved
        /// with peer changes and time passing: no panic, replies fit `out`
        /// and parse, the tables stay consistent and bounded.
        #[test]
        fn no_input_panics_or_breaks_the_tables(ops in proptest::collection::vec((any_op(), 0u64..200_000), 1..40)) {
            let mut sw = switch();
            let mut now = Instant::now();
            let mut out = vec![0u8; 1600];
            for (op, step_ms) in ops {
                now += Duration::from_millis(step_ms);
                match op {
                    Op::Local { frame, gso, out_len } => {
                        let out = &mut out[..out_len];
                        if let LocalVerdict::Reply(n) = sw.from_local(now, &frame, gso, out) {
                            prop_assert!(n <= out.len());
                            prop_assert!(Ethernet::parse(&out[..n]).is_some());
                        }
                    }
                    Op::Peer { peer, frame } => {
                        let _ = sw.from_peer(now, peer, &frame);
                    }
                    Op::HostLocal(packet) => {
                        let _ = sw.host_from_local(&packet);
                    }
                    Op::HostPeer { peer, packet } => {
                        let _ = sw.host_from_peer(peer, &packet);
                    }
                    Op::Expire => sw.expire(now),
                    Op::SetPeer(peer, third) => sw.set_peer(peer, PeerAddrs {
                        pod_subnet: IpNet::new(Ipv4Addr::new(10, 244, third, 0).into(), 24).unwrap(),
                        host_addr: None,
                    }),
                    Op::RemovePeer(peer) => sw.remove_peer(peer),
                }
                sw.check_invariants();
                let stats = sw.stats();
                prop_assert!(stats.learned_macs <= stats.peers * cfg().max_macs_per_peer);
                prop_assert!(stats.learned_ips <= stats.learned_macs);
            }
        }
    }
}
