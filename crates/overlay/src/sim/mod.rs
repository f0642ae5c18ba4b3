//! An in-memory network for whole nodes ([`Stack`]s): sites behind
//! simulated NATs, a simulated TURN server (turn-server-proto, the sans-IO
//! server of the same family as our client: allocations, permissions,
//! channels, refreshes, long-term credentials), latency and loss per site
//! link, and event-driven time that jumps to the next deadline — a node's
//! timer, a datagram's arrival, the server's timer, the store — as quinn's
//! test `Pair` does. Nothing reads a clock and every random draw (keys,
//! losses, symmetric NAT ports) comes from the seed, so a run is a function
//! of its seed: a failing seed replays exactly.
//!
//! NAT kinds are rows of a table of RFC 4787 behaviours (mapping and
//! filtering), so more kinds are one row each; addresses are `SocketAddr`
//! throughout, so an IPv6 underlay is a matter of the address plan.

#[cfg(test)]
mod hard_nat;
#[cfg(test)]
mod ipv6;
#[cfg(test)]
mod tests;
mod v6net;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use turn_server_proto::api::{TurnServerApi, TurnServerPollRet};
use turn_server_proto::server::TurnServer as ServerProto;
use turn_server_proto::stun::agent::Transmit as ServerTransmit;
use turn_server_proto::stun::Instant as SioInstant;
use turn_server_proto::types::prelude::DelayedTransmitBuild;
use turn_server_proto::types::TransportType;

use stun_proto::types::attribute::{
    ErrorCode, Nonce, PasswordAlgorithmValue, PasswordAlgorithms, Realm, XorMappedAddress,
};
use stun_proto::types::message::{
    Message, MessageClass, MessageType, MessageWriteVec, TransactionId, BINDING,
};
use stun_proto::types::prelude::*;
use turn_client_proto::types::attribute::Lifetime;
use turn_client_proto::types::message::{ALLOCATE, REFRESH};

use crate::crypto::{seed_from_u64, StaticKeys};
use crate::engine::{Io, Overlay, OverlayConfig, PeerCandidate, PeerInfo, PeerState, MAX_DATAGRAM};
use crate::nat::{Nat, NatConfig, Sock, Transmit, TurnServer, TurnTransport};
use crate::offload::Csum;
use crate::path::PathAddr;
use crate::stack::{NetIo, Stack, StackEvent};
use crate::tunnel::Identity;

pub const TURN_USER: &str = "evio";
pub const TURN_PASSWORD: &str = "sim-secret";
/// The overlay's port on every node.
pub const PORT: u16 = 5800;

/// Polls a TURN server, giving each allocation it asks a socket for the
/// relayed address `relay` returns, until it wants something else: that
/// is returned. The simulator and the NAT layer's tests run their servers
/// through this one loop.
pub(crate) fn grant_sockets(
    srv: &mut ServerProto,
    t: SioInstant,
    mut relay: impl FnMut() -> SocketAddr,
) -> TurnServerPollRet {
    loop {
        match srv.poll(t) {
            TurnServerPollRet::AllocateSocket {
                transport,
                listen_addr,
                client_addr,
                allocation_transport,
                family,
            } => srv.allocated_socket(
                transport,
                listen_addr,
                client_addr,
                allocation_transport,
                family,
                Ok(relay()),
                t,
            ),
            other => return other,
        }
    }
}

/// The second STUN server of [`Sim::with_two_stun`].
pub fn stun2_addr() -> SocketAddr {
    SocketAddr::from(([203, 0, 113, 2], 3478))
}

pub fn turn_addr() -> SocketAddr {
    SocketAddr::from(([203, 0, 113, 1], 3478))
}

/// What a site's router does (RFC 4787 terms).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NatKind {
    /// No NAT: the node's address is public.
    Public,
    /// Endpoint-independent mapping, address-and-port-dependent filtering.
    PortRestrictedCone,
    /// A mapping (random port) per destination, filtered to it.
    Symmetric,
    /// Endpoint-independent mapping and filtering.
    FullCone,
    /// A bare Linux gateway: `masquerade` with an open input chain
    /// (docs/natlab.md, case 1). Port-restricted, but a datagram to a port
    /// it has no mapping for becomes a conntrack entry to the router
    /// itself, and a later mapping whose reply would equal it gets a
    /// random port. A new flow takes the public port of the newest flow
    /// from the same LAN endpoint (Linux's `find_appropriate_src`), so
    /// after such a clash the node's new flows leave from the random port
    /// while its old ones (STUN) keep theirs. Entries expire as
    /// conntrack's do.
    Masquerade,
    /// A port-restricted cone whose firewall lets UDP out only to the TURN
    /// server: the lab's UDP-blocked site, whose node speaks TURN over
    /// TCP; for the overlay it is the same, its own socket reaches no peer.
    UdpBlocked,
}

/// Whether a mapping or a filter depends on the remote endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dependence {
    Independent,
    AddressAndPort,
}

/// (mapping, filtering) of a NAT kind; None for no NAT.
fn behaviour(kind: NatKind) -> Option<(Dependence, Dependence)> {
    use Dependence::*;
    match kind {
        NatKind::Public => None,
        NatKind::PortRestrictedCone | NatKind::UdpBlocked => Some((Independent, AddressAndPort)),
        NatKind::Symmetric => Some((AddressAndPort, AddressAndPort)),
        NatKind::FullCone => Some((Independent, Independent)),
        // Modelled by `Conntrack` instead.
        NatKind::Masquerade => None,
    }
}

/// A site: its router and its link to the internet.
#[derive(Debug, Clone, Copy)]
pub struct SiteSpec {
    pub kind: NatKind,
    pub nodes: usize,
    /// One-way latency of its link to the internet.
    pub latency: Duration,
    /// Probability that a datagram over its link is lost.
    pub loss: f64,
}

impl SiteSpec {
    pub fn new(kind: NatKind, nodes: usize) -> SiteSpec {
        SiteSpec {
            kind,
            nodes,
            latency: Duration::from_millis(5),
            loss: 0.0,
        }
    }
}

struct Mapping {
    lan: SocketAddr,
    /// Remote endpoints this mapping sent to (what filtering lets in).
    sent_to: BTreeMap<SocketAddr, Flow>,
}

/// One remote endpoint of a mapping, as conntrack sees the flow: its last
/// datagram either way, and whether one came back.
#[derive(Debug, Clone, Copy)]
struct Flow {
    last: Instant,
    replied: bool,
}

/// A site's router: a NAT of one kind on one public address.
struct Router {
    kind: NatKind,
    public: IpAddr,
    /// (LAN endpoint, remote if the mapping depends on it) -> public port.
    out: BTreeMap<(SocketAddr, Option<SocketAddr>), u16>,
    by_port: BTreeMap<u16, Mapping>,
    /// The Linux connection table ([`NatKind::Masquerade`]).
    ct: Conntrack,
    /// Idle flows of the other kinds expire after (unreplied, replied), as
    /// conntrack's do, and a mapping with none left is gone
    /// ([`Sim::set_udp_timeout`]); `None`: they never do.
    timeouts: Option<(Duration, Duration)>,
}

/// conntrack's UDP timeouts: an entry that never saw a reply, and one
/// that did.
const CT_UNREPLIED: Duration = Duration::from_secs(30);
const CT_REPLIED: Duration = Duration::from_secs(120);

/// One conntrack entry, keyed by its reply direction (remote, our public
/// port): where it leads (None: to the router itself), its last datagram,
/// and whether it saw traffic both ways.
#[derive(Debug, Clone, Copy)]
struct CtEntry {
    lan: Option<SocketAddr>,
    last: Instant,
    replied: bool,
    /// Creation order: the newest flow of a LAN endpoint is the first
    /// that `find_appropriate_src` finds (its bysource chain adds at the
    /// head).
    born: u64,
}

impl CtEntry {
    fn live(&self, now: Instant, (unreplied, replied): (Duration, Duration)) -> bool {
        let ttl = if self.replied { replied } else { unreplied };
        now.saturating_duration_since(self.last) < ttl
    }
}

/// A Linux router's connection table, as far as UDP masquerade with an
/// open input chain needs it.
#[derive(Default)]
struct Conntrack {
    /// (remote, public port) -> entry.
    by_reply: BTreeMap<(SocketAddr, u16), CtEntry>,
    /// (LAN endpoint, remote) -> public port of its entry.
    by_orig: BTreeMap<(SocketAddr, SocketAddr), u16>,
    /// Entries made so far ([`CtEntry::born`]).
    born: u64,
    /// (unreplied, replied) timeouts: conntrack's defaults unless
    /// [`Sim::set_udp_timeout`] says otherwise.
    timeouts: Option<(Duration, Duration)>,
}

impl Conntrack {
    fn ttl(&self) -> (Duration, Duration) {
        self.timeouts.unwrap_or((CT_UNREPLIED, CT_REPLIED))
    }

    fn expire(&mut self, now: Instant) {
        let ttl = self.ttl();
        self.by_reply.retain(|_, e| e.live(now, ttl));
        let live = &self.by_reply;
        self.by_orig
            .retain(|(lan, to), port| live.get(&(*to, *port)).is_some_and(|e| e.lan == Some(*lan)));
    }

    /// The public port of a datagram from `lan` to `to`: the entry's; for
    /// a new flow (`get_unique_tuple`) the port of `lan`'s newest flow if
    /// no entry's reply uses it toward `to`, else the source port if free,
    /// else random.
    fn outbound(&mut self, now: Instant, lan: SocketAddr, to: SocketAddr, rng: &mut StdRng) -> u16 {
        self.expire(now);
        if let Some(port) = self.by_orig.get(&(lan, to)).copied() {
            if let Some(e) = self.by_reply.get_mut(&(to, port)) {
                e.last = now;
                return port;
            }
        }
        let newest = self
            .by_reply
            .iter()
            .filter(|(_, e)| e.lan == Some(lan))
            .max_by_key(|(_, e)| e.born)
            .map(|((_, port), _)| *port);
        let free = |ct: &Conntrack, p: u16| !ct.by_reply.contains_key(&(to, p));
        let mut port = match newest {
            Some(p) if free(self, p) => p,
            _ => lan.port(),
        };
        while !free(self, port) {
            port = rng.gen_range(20_000..60_000);
        }
        self.born += 1;
        let e = CtEntry {
            lan: Some(lan),
            last: now,
            replied: false,
            born: self.born,
        };
        self.by_reply.insert((to, port), e);
        self.by_orig.insert((lan, to), port);
        port
    }

    /// Where a datagram from `from` to public `port` goes: an entry's LAN
    /// end. Anything else is for the router itself, and (open input) stays
    /// as an entry of its own.
    fn inbound(&mut self, now: Instant, port: u16, from: SocketAddr) -> Option<SocketAddr> {
        self.expire(now);
        match self.by_reply.get_mut(&(from, port)) {
            Some(e) => {
                e.last = now;
                e.replied |= e.lan.is_some();
                e.lan
            }
            None => {
                self.born += 1;
                let e = CtEntry {
                    lan: None,
                    last: now,
                    replied: false,
                    born: self.born,
                };
                self.by_reply.insert((from, port), e);
                None
            }
        }
    }

    /// The entries, as `conntrack -L` counts them.
    fn len(&self, now: Instant) -> usize {
        let ttl = self.ttl();
        self.by_reply.values().filter(|e| e.live(now, ttl)).count()
    }
}

impl Router {
    fn new(kind: NatKind, public: IpAddr) -> Router {
        Router {
            kind,
            public,
            out: BTreeMap::new(),
            by_port: BTreeMap::new(),
            ct: Conntrack::default(),
            timeouts: None,
        }
    }

    /// Forgets the flows idle past their timeout, and mappings left without one.
    fn expire(&mut self, now: Instant) {
        let Some((unreplied, replied)) = self.timeouts else {
            return;
        };
        let live = |f: &Flow| {
            let ttl = if f.replied { replied } else { unreplied };
            now.saturating_duration_since(f.last) < ttl
        };
        for m in self.by_port.values_mut() {
            m.sent_to.retain(|_, f| live(f));
        }
        self.by_port.retain(|_, m| !m.sent_to.is_empty());
        let by_port = &self.by_port;
        self.out.retain(|_, port| by_port.contains_key(port));
    }

    /// The public source of a datagram from `lan` to `to`.
    fn outbound(
        &mut self,
        now: Instant,
        lan: SocketAddr,
        to: SocketAddr,
        rng: &mut StdRng,
    ) -> SocketAddr {
        if self.kind == NatKind::Masquerade {
            return SocketAddr::new(self.public, self.ct.outbound(now, lan, to, rng));
        }
        let Some((mapping, _)) = behaviour(self.kind) else {
            return lan;
        };
        self.expire(now);
        let key = (lan, (mapping == Dependence::AddressAndPort).then_some(to));
        let port = match self.out.get(&key) {
            Some(p) => *p,
            None => {
                // Cones keep the source port when it is free (Linux does).
                let mut p = lan.port();
                if mapping == Dependence::AddressAndPort || self.by_port.contains_key(&p) {
                    p = loop {
                        let c = rng.gen_range(20_000..60_000);
                        if !self.by_port.contains_key(&c) {
                            break c;
                        }
                    };
                }
                self.out.insert(key, p);
                let sent_to = BTreeMap::new();
                self.by_port.insert(p, Mapping { lan, sent_to });
                p
            }
        };
        if let Some(m) = self.by_port.get_mut(&port) {
            let f = m.sent_to.entry(to).or_insert(Flow {
                last: now,
                replied: false,
            });
            f.last = now;
        }
        SocketAddr::new(self.public, port)
    }

    /// Where a datagram from `from` to our public `port` goes, if anywhere.
    fn inbound(&mut self, now: Instant, port: u16, from: SocketAddr) -> Option<SocketAddr> {
        if self.kind == NatKind::Masquerade {
            return self.ct.inbound(now, port, from);
        }
        let (_, filtering) = behaviour(self.kind)?;
        self.expire(now);
        let m = self.by_port.get_mut(&port)?;
        let flow = m.sent_to.get_mut(&from);
        let open = filtering == Dependence::Independent || flow.is_some();
        if let Some(f) = flow {
            f.last = now;
            f.replied = true;
        }
        open.then_some(m.lan)
    }

    /// conntrack -F: every mapping forgotten.
    fn flush(&mut self) {
        self.out.clear();
        self.by_port.clear();
        self.ct = Conntrack {
            timeouts: self.ct.timeouts,
            ..Conntrack::default()
        };
    }
}

struct Site {
    spec: SiteSpec,
    router: Router,
    /// Its IPv6, if it has any ([`Sim::add_ipv6`]).
    v6: Option<V6Site>,
}

/// A site's IPv6: a routed prefix, no NAT66; with `firewall`, the
/// router's stateful filter lets in only what answers traffic a node sent
/// (address-and-port dependent, RFC 6092's recommendation and what home
/// routers do), without it everything.
struct V6Site {
    firewall: bool,
    /// (node address, remote) pairs a node sent to.
    open: BTreeSet<(SocketAddr, SocketAddr)>,
}

impl V6Site {
    fn admits(&self, to: SocketAddr, from: SocketAddr) -> bool {
        !self.firewall || self.open.contains(&(to, from))
    }
}

/// The NetIo of a simulated node: what it sent (from which of its UDP
/// sockets) and delivered.
#[derive(Default)]
struct SimIo {
    slot: Vec<u8>,
    out: Vec<(Sock, SocketAddr, Vec<u8>)>,
    pods: u64,
    /// Allocations of the simulator's own queue (it copies what a node
    /// sends), told apart from the stack's (lib tests count them).
    #[cfg(test)]
    queue_allocs: u64,
}

impl SimIo {
    fn queue(&mut self, sock: Sock, to: SocketAddr, data: &[u8]) {
        #[cfg(test)]
        let before = crate::alloc_count::allocations();
        self.out.push((sock, to, data.to_vec()));
        #[cfg(test)]
        {
            self.queue_allocs += crate::alloc_count::allocations() - before;
        }
    }
}

impl Io for SimIo {
    fn datagram(&mut self) -> &mut [u8] {
        if self.slot.len() < MAX_DATAGRAM {
            self.slot.resize(MAX_DATAGRAM, 0);
        }
        &mut self.slot
    }

    fn commit(&mut self, to: PathAddr, len: usize) {
        let slot = std::mem::take(&mut self.slot);
        let sock = match to.via {
            crate::path::Via::Spare(i) => Sock::Spare(i),
            _ => Sock::Udp,
        };
        self.queue(sock, to.remote, &slot[..len]);
        self.slot = slot;
    }

    fn pod(&mut self, frame: &mut [u8], _csum: Csum) {
        // Background traffic ([`Sim::keep_busy`]) is not what a test waits for.
        if !frame.ends_with(BUSY) {
            self.pods += 1;
        }
    }

    fn host(&mut self, _packet: &mut [u8], _csum: Csum) {}
}

impl NetIo for SimIo {
    fn transmit(&mut self, t: Transmit<'_>) {
        if matches!(t.via, Sock::Udp | Sock::UdpOwn(_) | Sock::Spare(_)) {
            self.queue(t.via, t.to, t.data);
        }
    }
}

pub struct SimNode {
    pub stack: Stack,
    io: SimIo,
    pub site: usize,
    pub lan: SocketAddr,
    /// Its global IPv6 address (same port), if its site has IPv6.
    pub lan6: Option<SocketAddr>,
    /// It has IPv4 (an IPv6-only node has not: [`Sim::ipv6_only`]).
    pub v4: bool,
    pub info: PeerInfo,
    /// Its private key (kept across a restart, as the agent's key file).
    private: crate::crypto::Key,
    /// UDP sockets of their own that TURN servers were given: (server
    /// index, local address), and the next ephemeral port.
    own: Vec<(usize, SocketAddr)>,
    next_port: u16,
    /// Spare sockets of birthday probing: (index, local address).
    spares: Vec<(u32, SocketAddr)>,
    /// TURN traffic (anything but a STUN Binding) sent to the TURN server
    /// from the overlay's socket, and how much of it there was when the
    /// node last opened a socket of its own.
    pub turn_on_shared: u64,
    pub turn_on_shared_at_move: Option<u64>,
    /// Datagrams it sent (any socket, any kind), and those of them that
    /// went to a peer's own endpoint (not to the TURN server).
    pub sent: u64,
    pub sent_direct: u64,
    /// Relayed datagrams (ChannelData, data indications) the stack took, and
    /// the allocations it made while taking them (lib tests count them).
    #[cfg(test)]
    pub relayed_in: (u64, u64),
}

/// The first ephemeral port a node's extra sockets get.
const EPHEMERAL: u16 = 40_000;

impl SimNode {
    /// The local address its socket `via` sends to `to` from, if open: the
    /// overlay's socket of `to`'s family (the agent has one per family).
    fn sock_addr(&self, via: Sock, to: SocketAddr) -> Option<SocketAddr> {
        match via {
            Sock::Udp if to.is_ipv6() => self.lan6,
            Sock::Udp => self.v4.then_some(self.lan),
            Sock::UdpOwn(_) if to.is_ipv6() => None,
            Sock::UdpOwn(c) => self.own.iter().find(|o| o.0 == c).map(|o| o.1),
            Sock::Spare(c) => self.spares.iter().find(|o| o.0 == c).map(|o| o.1),
            Sock::Tcp(_) => None,
        }
    }

    /// Its socket bound to `addr`, if any.
    fn sock_at(&self, addr: SocketAddr) -> Option<Sock> {
        if (addr == self.lan && self.v4) || Some(addr) == self.lan6 {
            return Some(Sock::Udp);
        }
        let spare = self.spares.iter().find(|o| o.1 == addr);
        self.own
            .iter()
            .find(|o| o.1 == addr)
            .map(|o| Sock::UdpOwn(o.0))
            .or(spare.map(|o| Sock::Spare(o.0)))
    }
}

/// A datagram in flight to `to` (a public or LAN address), sent by node
/// `sender` (None: the TURN server).
struct Flight {
    from: SocketAddr,
    to: SocketAddr,
    data: Vec<u8>,
    sender: Option<usize>,
    /// The site whose link it still crosses on arrival (None: LAN).
    via_site: Option<usize>,
}

struct Relay {
    proto: ServerProto,
    up: bool,
    relays: BTreeSet<SocketAddr>,
    next_port: u16,
    wake: Instant,
    /// coturn's order of checks, see [`Relay::coturn_mismatch`].
    coturn: bool,
    /// Allocations as coturn keys them: client 5-tuple -> the transaction
    /// that made it and when it ends.
    allocations: BTreeMap<SocketAddr, (TransactionId, Instant)>,
    release: Release,
}

/// What the TURN server does with a signed Refresh of lifetime 0 (a
/// release) when it answers as coturn does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// Deletes the allocation a second later (coturn).
    Deletes,
    /// Refuses it (441, as coturn does when the allocation was made under
    /// another username): the leftover stays.
    Refuses,
    /// Says it deleted it, and keeps answering 437 for its 5-tuple.
    Keeps,
}

impl Relay {
    fn new(now: Instant, coturn: bool) -> Relay {
        let mut proto = ServerProto::new(TransportType::Udp, turn_addr(), "evio-sim".into());
        proto.add_user(TURN_USER.into(), TURN_PASSWORD.into());
        Relay {
            proto,
            up: true,
            relays: BTreeSet::new(),
            next_port: 49_152,
            wake: now,
            coturn,
            allocations: BTreeMap::new(),
            release: Release::Deletes,
        }
    }

    /// A signed Refresh of lifetime 0, when this server refuses those:
    /// its 441 (unsigned, as coturn's errors are).
    fn refused_release(&self, data: &[u8]) -> Option<Vec<u8>> {
        use stun_proto::types::attribute::MessageIntegrity;
        if !self.coturn || self.release != Release::Refuses {
            return None;
        }
        let msg = Message::from_bytes(data).ok()?;
        let release = msg.has_class(MessageClass::Request)
            && msg.has_method(REFRESH)
            && msg.attribute::<Lifetime>().is_ok_and(|l| l.seconds() == 0)
            && msg.attribute::<MessageIntegrity>().is_ok();
        if !release {
            return None;
        }
        let mut m = Message::builder_error(&msg, MessageWriteVec::new());
        let code = ErrorCode::builder(441)
            .reason("Wrong credentials")
            .build()
            .ok()?;
        m.add_attribute(&code).ok()?;
        m.add_fingerprint().ok()?;
        Some(m.finish())
    }

    /// coturn answers an Allocate from a 5-tuple that holds an allocation
    /// made by another transaction with 437 before it looks at
    /// credentials: unsigned, without realm or nonce (turn-server-proto
    /// authenticates first and signs its 437). Returns that answer.
    fn coturn_mismatch(&self, now: Instant, from: SocketAddr, data: &[u8]) -> Option<Vec<u8>> {
        if !self.coturn {
            return None;
        }
        let msg = Message::from_bytes(data).ok()?;
        let (tid, ends) = self.allocations.get(&from)?;
        let asks = msg.has_class(MessageClass::Request) && msg.has_method(ALLOCATE);
        if !asks || *tid == msg.transaction_id() || *ends <= now {
            return None;
        }
        let mut m = Message::builder_error(&msg, MessageWriteVec::new());
        let code = ErrorCode::builder(ErrorCode::ALLOCATION_MISMATCH)
            .reason("Mismatched allocation: wrong transaction ID")
            .build()
            .ok()?;
        m.add_attribute(&code).ok()?;
        m.add_fingerprint().ok()?;
        Some(m.finish())
    }

    /// Follows the allocations the server's answers make, refresh and
    /// delete, as coturn keys them. coturn deletes an allocation refreshed
    /// with lifetime 0 one second later, not at once.
    fn observe(&mut self, now: Instant, to: SocketAddr, data: &[u8]) {
        if !self.coturn || data.first().is_some_and(|b| b & 0xc0 != 0) {
            return;
        }
        let Ok(msg) = Message::from_bytes(data) else {
            return;
        };
        if !msg.has_class(MessageClass::Success) {
            return;
        }
        let secs = msg
            .attribute::<Lifetime>()
            .map(|l| l.seconds())
            .unwrap_or(0);
        let ends = now + Duration::from_secs(u64::from(secs.max(1)));
        if msg.has_method(ALLOCATE) {
            self.allocations.insert(to, (msg.transaction_id(), ends));
        } else if msg.has_method(REFRESH) && !(secs == 0 && self.release == Release::Keeps) {
            if let Some(a) = self.allocations.get_mut(&to) {
                a.1 = ends;
            }
        }
    }
}

/// turn-server-proto 0.7.3 signs its 401 to a client address it already
/// knows with that client's key and leaves out PASSWORD-ALGORITHMS,
/// although its nonce says it supports them (RFC 8489 9.2.4 wants the
/// attribute): stun-proto's client then refuses the challenge, so a new
/// agent on the address of one that died could never authenticate.
/// coturn challenges unsigned. This rewrites such a 401 into the shape
/// the RFC gives (same realm and nonce).
/// (The nat unit tests' server uses it too.)
pub(crate) fn rfc_401(data: &[u8]) -> Option<Vec<u8>> {
    let msg = Message::from_bytes(data).ok()?;
    let code = msg.attribute::<ErrorCode>().ok()?;
    if code.code() != ErrorCode::UNAUTHORIZED || msg.attribute::<PasswordAlgorithms>().is_ok() {
        return None;
    }
    let (realm, nonce) = (
        msg.attribute::<Realm>().ok()?,
        msg.attribute::<Nonce>().ok()?,
    );
    if !nonce.nonce().starts_with("obMatJos2") {
        return None;
    }
    let mtype = MessageType::from_class_method(MessageClass::Error, msg.method());
    let mut m = Message::builder(mtype, msg.transaction_id(), MessageWriteVec::new());
    m.add_attribute(&code).ok()?;
    m.add_attribute(&realm).ok()?;
    m.add_attribute(&nonce).ok()?;
    let algos = [PasswordAlgorithmValue::SHA256, PasswordAlgorithmValue::MD5];
    m.add_attribute(&PasswordAlgorithms::new(&algos)).ok()?;
    Some(m.finish())
}

/// The simulated world.
pub struct Sim {
    pub now: Instant,
    start: Instant,
    rng: StdRng,
    sites: Vec<Site>,
    pub nodes: Vec<SimNode>,
    turn: Relay,
    queue: BinaryHeap<Reverse<(Instant, u64)>>,
    flights: HashMap<u64, Flight>,
    seq: u64,
    /// Node pairs whose direct datagrams are dropped (both ways).
    blocked: BTreeSet<(usize, usize)>,
    store_due: Option<Instant>,
    /// Background traffic: a frame between every pair of nodes this often,
    /// next at `busy_due`.
    busy_every: Option<Duration>,
    busy_due: Instant,
    /// The sum of every delivery's hash (time, endpoints, size): equal for
    /// equal runs. A sum, not one hash of the sequence: datagrams that
    /// leave at the same instant may do so in another order from run to
    /// run (stun-proto draws transaction ids from the OS's RNG and
    /// retransmits outstanding requests in id order), with the same
    /// outcome.
    trace: u64,
    pub deliveries: u64,
    /// Nodes also ask [`stun2_addr`].
    two_stun: bool,
}

/// How long the store takes to tell every node about a change.
const STORE_DELAY: Duration = Duration::from_millis(50);
const LAN_LATENCY: Duration = Duration::from_micros(200);

fn sio(base: Instant, t: Instant) -> SioInstant {
    SioInstant::from_nanos(t.saturating_duration_since(base).as_nanos() as i64)
}

impl Sim {
    /// Sites in order; nodes are numbered site by site.
    pub fn new(seed: u64, sites: &[SiteSpec]) -> Sim {
        Sim::build(seed, sites, false)
    }

    /// As [`Sim::new`], with a second STUN server ([`stun2_addr`]) in every
    /// node's configuration: nodes can tell their NAT's mapping
    /// ([`crate::hunt::Mapping`]), so symmetric ones hunt.
    pub fn with_two_stun(seed: u64, sites: &[SiteSpec]) -> Sim {
        Sim::build(seed, sites, true)
    }

    fn build(seed: u64, sites: &[SiteSpec], two_stun: bool) -> Sim {
        // Any fixed instant will do: only differences are used.
        let now = Instant::now();
        let mut rng = StdRng::seed_from_u64(seed);
        let mut sim = Sim {
            now,
            start: now,
            sites: Vec::new(),
            nodes: Vec::new(),
            turn: Relay::new(now, true),
            queue: BinaryHeap::new(),
            flights: HashMap::new(),
            seq: 0,
            blocked: BTreeSet::new(),
            store_due: Some(now),
            busy_every: Some(Duration::from_secs(1)),
            busy_due: now,
            trace: 0,
            deliveries: 0,
            rng: StdRng::seed_from_u64(rng.gen()),
            two_stun,
        };
        for (s, spec) in sites.iter().enumerate() {
            let public = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 10 + s as u8));
            sim.sites.push(Site {
                spec: *spec,
                router: Router::new(spec.kind, public),
                v6: None,
            });
            for _ in 0..spec.nodes {
                let n = sim.nodes.len();
                let node = sim.make_node(n, s, &mut rng);
                sim.nodes.push(node);
            }
        }
        let now = sim.now;
        for n in &mut sim.nodes {
            let local = n.local_addrs();
            n.stack.set_local_candidates(now, local);
        }
        sim
    }

    fn make_node(&self, n: usize, site: usize, rng: &mut StdRng) -> SimNode {
        let spec = self.sites[site].spec;
        let lan = if spec.kind == NatKind::Public {
            SocketAddr::from(([203, 0, 113, 100 + n as u8], PORT))
        } else {
            SocketAddr::from(([192, 168, site as u8, 2 + n as u8], PORT))
        };
        let keys = StaticKeys::from_rng(rng);
        let subnet = ipnet::Ipv4Net::new(Ipv4Addr::new(10, 244, n as u8, 0), 24)
            .map(ipnet::IpNet::V4)
            .unwrap_or_default();
        let info = PeerInfo {
            node: format!("n{n}"),
            key: *keys.public(),
            pod_subnet: subnet,
            host_addr: None,
            host_addr6: None,
            candidates: Vec::new(),
            stale: false,
            bridge_mac: None,
        };
        let private = *keys.private();
        SimNode {
            stack: self.stack(keys, subnet, rng),
            io: SimIo::default(),
            site,
            lan,
            lan6: None,
            v4: true,
            info,
            private,
            own: Vec::new(),
            next_port: EPHEMERAL,
            spares: Vec::new(),
            turn_on_shared: 0,
            turn_on_shared_at_move: None,
            sent: 0,
            sent_direct: 0,
            #[cfg(test)]
            relayed_in: (0, 0),
        }
    }

    /// A node's protocol stack, fresh (as an agent starts).
    fn stack(&self, keys: StaticKeys, subnet: ipnet::IpNet, rng: &mut StdRng) -> Stack {
        let cfg = OverlayConfig::new("sim", subnet, 1380);
        let overlay = Overlay::new(self.now, cfg, Identity::new(keys, None, "sim"), rng.gen());
        let nat = Nat::new(
            self.now,
            NatConfig {
                port: PORT,
                stun: if self.two_stun {
                    vec![stun2_addr()]
                } else {
                    Vec::new()
                },
                turn: vec![TurnServer {
                    server: turn_addr(),
                    transport: TurnTransport::Udp,
                    username: TURN_USER.into(),
                    password: TURN_PASSWORD.into(),
                }],
            },
            rng.gen(),
        );
        Stack::new(overlay, nat)
    }

    fn wall(&self) -> Duration {
        Duration::from_secs(1_700_000_000) + self.now.duration_since(self.start)
    }

    /// Time since the start of the run.
    pub fn elapsed(&self) -> Duration {
        self.now.duration_since(self.start)
    }

    fn note_delivery(&mut self, f: &Flight) {
        let mut h = DefaultHasher::new();
        (self.elapsed(), f.from, f.to, f.data.len()).hash(&mut h);
        self.trace = self.trace.wrapping_add(h.finish());
    }

    /// A hash of the run so far: equal seeds give equal values.
    pub fn fingerprint(&self) -> u64 {
        self.trace
    }
}

impl Sim {
    /// Runs for `d` of simulated time.
    pub fn run(&mut self, d: Duration) {
        let end = self.now + d;
        let _ = self.run_until(end, |_| false);
    }

    /// Runs until `done` holds (checked after every step) or `limit` of
    /// simulated time passed; returns the time it took.
    pub fn run_until_ok(
        &mut self,
        limit: Duration,
        done: impl Fn(&Sim) -> bool,
    ) -> Option<Duration> {
        let t0 = self.now;
        let end = self.now + limit;
        self.run_until(end, done)
            .then(|| self.now.duration_since(t0))
    }

    // A test harness: a livelock is a test failure, loudly.
    #[allow(clippy::panic)]
    fn run_until(&mut self, end: Instant, done: impl Fn(&Sim) -> bool) -> bool {
        // Bounded: a livelock (a deadline that never moves) fails loudly.
        for _ in 0..20_000_000u64 {
            if done(self) {
                return true;
            }
            let next = self.next_event();
            if next > end {
                self.now = end;
                return done(self);
            }
            self.now = self.now.max(next);
            self.step();
        }
        panic!("simulation livelock at {:?}", self.elapsed());
    }

    fn next_event(&self) -> Instant {
        let mut t = self.turn.wake;
        if let Some(Reverse((at, _))) = self.queue.peek() {
            t = t.min(*at);
        }
        if let Some(s) = self.store_due {
            t = t.min(s);
        }
        if self.busy_every.is_some() {
            t = t.min(self.busy_due);
        }
        self.nodes
            .iter()
            .map(|n| n.stack.poll_timeout())
            .fold(t, Instant::min)
    }

    /// Everything due at `now`.
    fn step(&mut self) {
        let now = self.now;
        while let Some(Reverse((at, id))) = self.queue.peek().copied() {
            if at > now {
                break;
            }
            self.queue.pop();
            if let Some(f) = self.flights.remove(&id) {
                self.arrive(f);
            }
        }
        let wall = self.wall();
        for i in 0..self.nodes.len() {
            if now >= self.nodes[i].stack.poll_timeout() {
                let n = &mut self.nodes[i];
                n.stack.handle_timeout(now, wall, &mut n.io);
                self.after(i);
            }
        }
        if now >= self.turn.wake {
            self.turn_poll();
        }
        if self.store_due.is_some_and(|t| now >= t) {
            self.store_due = None;
            self.publish_peers();
        }
        if let Some(every) = self.busy_every.filter(|_| now >= self.busy_due) {
            self.busy_due = now + every;
            self.busy_frames();
        }
    }

    /// Background traffic between every pair of nodes (on by default,
    /// every second: sessions are made on demand, so the path tests need
    /// traffic that flows); `None` stops it.
    pub fn keep_busy(&mut self, every: Option<Duration>) {
        self.busy_every = every;
        self.busy_due = self.now;
    }

    fn busy_frames(&mut self) {
        let n = self.nodes.len();
        for a in 0..n {
            for b in (0..n).filter(|b| *b != a) {
                let Some(frame) = pod_frame(a, b, BUSY) else {
                    continue;
                };
                let now = self.now;
                let x = &mut self.nodes[a];
                let hdr = crate::offload::VnetHdr::default();
                x.stack.from_pod(now, &hdr, &frame, &mut x.io);
            }
            self.after(a);
        }
    }

    /// What node `i` sent and asked for after it ran (opening a socket
    /// makes it run again).
    fn after(&mut self, i: usize) {
        loop {
            let out = std::mem::take(&mut self.nodes[i].io.out);
            for (via, to, data) in out {
                self.send_from_node(i, via, to, data);
            }
            let Some(e) = self.nodes[i].stack.poll_event() else {
                return;
            };
            match e {
                StackEvent::Candidates(c) => {
                    self.nodes[i].info.candidates = c
                        .into_iter()
                        .map(|(addr, class)| PeerCandidate { addr, class })
                        .collect();
                    self.store_due.get_or_insert(self.now + STORE_DELAY);
                }
                StackEvent::UdpOpen { conn, .. } => self.open_udp(i, conn),
                StackEvent::UdpClose { conn } => self.nodes[i].own.retain(|o| o.0 != conn),
                StackEvent::SpareOpen { first, count } => self.open_spares(i, first, count),
                StackEvent::SpareClose(v) => self.nodes[i].spares.retain(|o| !v.contains(&o.0)),
                _ => {}
            }
        }
    }

    /// Node `i` binds a UDP socket on its next ephemeral port for TURN
    /// server `conn`.
    fn open_udp(&mut self, i: usize, conn: usize) {
        let now = self.now;
        let n = &mut self.nodes[i];
        let local = SocketAddr::new(n.lan.ip(), n.next_port);
        n.next_port += 1;
        n.turn_on_shared_at_move = Some(n.turn_on_shared);
        n.own.retain(|o| o.0 != conn);
        n.own.push((conn, local));
        n.stack.udp_opened(now, conn, local, &mut n.io);
    }

    /// Node `i` binds spare sockets `first..first + count` on its next
    /// ephemeral ports (wrapping within the ephemeral range).
    fn open_spares(&mut self, i: usize, first: u32, count: u32) {
        let now = self.now;
        let n = &mut self.nodes[i];
        for k in first..first + count {
            let local = SocketAddr::new(n.lan.ip(), n.next_port);
            n.next_port = n.next_port.checked_add(1).unwrap_or(EPHEMERAL);
            n.spares.push((k, local));
        }
        n.stack.spares_opened(now, first, count, &mut n.io);
    }

    /// The store tells every node the current peer set.
    fn publish_peers(&mut self) {
        let infos: Vec<PeerInfo> = self.nodes.iter().map(|n| n.info.clone()).collect();
        let now = self.now;
        for i in 0..self.nodes.len() {
            self.nodes[i].stack.set_peers(now, &infos);
            self.after(i);
        }
    }

    fn schedule(&mut self, at: Instant, f: Flight) {
        self.seq += 1;
        self.flights.insert(self.seq, f);
        self.queue.push(Reverse((at, self.seq)));
    }

    fn send_from_node(&mut self, i: usize, via: Sock, to: SocketAddr, data: Vec<u8>) {
        let site = self.nodes[i].site;
        let Some(lan) = self.nodes[i].sock_addr(via, to) else {
            return;
        };
        self.nodes[i].sent += 1;
        if to != turn_addr() && !self.turn.relays.contains(&to) {
            self.nodes[i].sent_direct += 1;
        }
        if via == Sock::Udp && to == turn_addr() && !is_binding(&data) {
            self.nodes[i].turn_on_shared += 1;
        }
        let same_lan = self.nodes.iter().any(|n| {
            n.lan == to && n.site == site && self.sites[site].spec.kind != NatKind::Public
        });
        let flight = Flight {
            from: lan,
            to,
            data,
            sender: Some(i),
            via_site: None,
        };
        if same_lan {
            return self.schedule(self.now + LAN_LATENCY, flight);
        }
        let blocked = self.sites[site].router.kind == NatKind::UdpBlocked;
        if self.lost(site) || (blocked && flight.to != turn_addr()) {
            return;
        }
        if to.is_ipv6() {
            return self.send_v6(site, lan, flight);
        }
        let now = self.now;
        let from = self.sites[site]
            .router
            .outbound(now, lan, to, &mut self.rng);
        let at = self.now + self.sites[site].spec.latency;
        self.schedule(at, Flight { from, ..flight });
    }

    fn lost(&mut self, site: usize) -> bool {
        let p = self.sites[site].spec.loss;
        p > 0.0 && self.rng.gen_bool(p)
    }

    /// A datagram reaches the internet side of its destination.
    fn arrive(&mut self, f: Flight) {
        if let Some(site) = f.via_site {
            return self.arrive_at_site(site, f);
        }
        if f.to == turn_addr() || self.turn.relays.contains(&f.to) {
            return self.turn_recv(f);
        }
        if f.to == stun2_addr() {
            return self.stun2_recv(f);
        }
        // A LAN delivery, a public node, or a router's public address.
        if let Some(n) = self.nodes.iter().position(|n| n.sock_at(f.to).is_some()) {
            let site = self.nodes[n].site;
            let public = self.sites[site].router.kind == NatKind::Public;
            let same_site = f.sender.is_some_and(|s| self.nodes[s].site == site);
            return match (same_site, public || f.to.is_ipv6()) {
                (true, _) => self.deliver(n, f),
                (false, true) => self.cross_link(site, f),
                // A private address of another site leads nowhere.
                (false, false) => {}
            };
        }
        if let Some(site) = self.sites.iter().position(|s| s.router.public == f.to.ip()) {
            self.cross_link(site, f);
        }
    }

    /// Sends `f` over `site`'s link toward its router.
    fn cross_link(&mut self, site: usize, f: Flight) {
        if self.lost(site) {
            return;
        }
        let at = self.now + self.sites[site].spec.latency;
        self.schedule(
            at,
            Flight {
                via_site: Some(site),
                ..f
            },
        );
    }

    fn arrive_at_site(&mut self, site: usize, f: Flight) {
        if f.to.is_ipv6() {
            return self.arrive_v6(site, f);
        }
        let now = self.now;
        let router = &mut self.sites[site].router;
        let lan = if router.kind == NatKind::Public {
            Some(f.to)
        } else if router.public == f.to.ip() {
            router.inbound(now, f.to.port(), f.from)
        } else {
            None
        };
        let Some(lan) = lan else { return };
        if let Some(n) = self
            .nodes
            .iter()
            .position(|n| n.sock_at(lan).is_some() && n.site == site)
        {
            self.deliver(n, Flight { to: lan, ..f });
        }
    }

    fn deliver(&mut self, n: usize, f: Flight) {
        if let Some(s) = f.sender {
            if self.blocked.contains(&(s.min(n), s.max(n))) {
                return;
            }
        }
        let Some(via) = self.nodes[n].sock_at(f.to) else {
            return;
        };
        self.note_delivery(&f);
        self.deliveries += 1;
        let now = self.now;
        let node = &mut self.nodes[n];
        #[cfg(test)]
        let relayed =
            is_relayed(&f.data).then(|| (crate::alloc_count::allocations(), node.io.queue_allocs));
        node.stack
            .handle_datagram_on(now, via, f.from, &f.data, &mut node.io);
        #[cfg(test)]
        if let Some((before, queue_before)) = relayed {
            let queue = node.io.queue_allocs - queue_before;
            node.relayed_in.0 += 1;
            node.relayed_in.1 += crate::alloc_count::allocations() - before - queue;
        }
        self.after(n);
    }
}

impl Sim {
    fn turn_recv(&mut self, f: Flight) {
        if !self.turn.up {
            return;
        }
        self.note_delivery(&f);
        let t = sio(self.start, self.now);
        if f.to == turn_addr() {
            let coturn = self.turn.coturn_mismatch(self.now, f.from, &f.data);
            if let Some(reply) = coturn.or_else(|| self.turn.refused_release(&f.data)) {
                return self.send_from_internet(turn_addr(), f.from, reply);
            }
        }
        let tr = ServerTransmit::new(&f.data[..], TransportType::Udp, f.from, f.to);
        if let Some(out) = self.turn.proto.recv(tr, t) {
            // turn-server-proto 0.7.3 addresses its Binding answers to its
            // own listening address (handle_stun_binding sends to
            // `transmit.to`): they go back to the sender, as coturn's do.
            let to = if out.to == turn_addr() {
                f.from
            } else {
                out.to
            };
            let from = out.from;
            let mut data = out.data.build();
            if let Some(fixed) = rfc_401(&data) {
                data = fixed;
            }
            self.turn.observe(self.now, to, &data);
            self.send_from_internet(from, to, data);
        }
        self.turn_poll();
    }

    /// The server's timers, socket allocations and queued answers.
    fn turn_poll(&mut self) {
        let t = sio(self.start, self.now);
        self.turn.wake = self.now + Duration::from_secs(3600);
        if !self.turn.up {
            return;
        }
        let turn = &mut self.turn;
        let mut relay = || {
            let relay = SocketAddr::new(turn_addr().ip(), turn.next_port);
            turn.next_port += 1;
            turn.relays.insert(relay);
            relay
        };
        loop {
            if let TurnServerPollRet::WaitUntil(w) = grant_sockets(&mut turn.proto, t, &mut relay) {
                let w = self.start + Duration::from_nanos(w.as_nanos().max(0) as u64);
                turn.wake = w.max(self.now + Duration::from_millis(1));
                break;
            }
        }
        while let Some(tr) = self.turn.proto.poll_transmit(t) {
            self.turn.observe(self.now, tr.to, &tr.data);
            self.send_from_internet(tr.from, tr.to, tr.data);
        }
    }

    /// The second STUN server: Binding requests get the sender's address.
    fn stun2_recv(&mut self, f: Flight) {
        let Ok(msg) = Message::from_bytes(&f.data) else {
            return;
        };
        if msg.method() != BINDING || !msg.has_class(MessageClass::Request) {
            return;
        }
        let mut m = Message::builder_success(&msg, MessageWriteVec::new());
        if m.add_attribute(&XorMappedAddress::new(f.from, msg.transaction_id()))
            .is_err()
        {
            return;
        }
        self.send_from_internet(stun2_addr(), f.from, m.finish());
    }

    fn send_from_internet(&mut self, from: SocketAddr, to: SocketAddr, data: Vec<u8>) {
        let f = Flight {
            from,
            to,
            data,
            sender: None,
            via_site: None,
        };
        self.arrive(f);
    }
}

/// What the tests change in the world.
impl Sim {
    /// The router of node `n`'s site forgets every mapping.
    pub fn flush_nat(&mut self, n: usize) {
        let site = self.nodes[n].site;
        self.sites[site].router.flush();
    }

    /// Node `n`'s site gets a new public address (and forgets mappings).
    pub fn change_public_address(&mut self, n: usize) {
        let site = self.nodes[n].site;
        let r = &mut self.sites[site].router;
        if let IpAddr::V4(a) = r.public {
            let o = a.octets();
            r.public = IpAddr::V4(Ipv4Addr::new(o[0], o[1], o[2], o[3].wrapping_add(100)));
        }
        r.flush();
    }

    /// Node `n`'s site's NAT becomes `kind` (new mappings follow it).
    pub fn set_nat(&mut self, n: usize, kind: NatKind) {
        let site = self.nodes[n].site;
        self.sites[site].router.kind = kind;
        self.sites[site].router.flush();
    }

    /// Flows through node `n`'s site's router (a cone or symmetric one)
    /// expire after `unreplied` idle, or `replied` once a datagram came
    /// back (conntrack's `nf_conntrack_udp_timeout` and `..._stream`, the
    /// lab's `set_udp_timeout`); by default they never do.
    pub fn set_udp_timeout(&mut self, n: usize, unreplied: Duration, replied: Duration) {
        let site = self.nodes[n].site;
        self.sites[site].router.timeouts = Some((unreplied, replied));
        self.sites[site].router.ct.timeouts = Some((unreplied, replied));
    }

    /// Drops (or stops dropping) direct datagrams between `a` and `b`.
    pub fn block(&mut self, a: usize, b: usize, on: bool) {
        let k = (a.min(b), a.max(b));
        if on {
            self.blocked.insert(k);
        } else {
            self.blocked.remove(&k);
        }
    }

    /// Node `n`'s agent is killed (SIGKILL: nothing deleted, its TURN
    /// allocation left on the server) and started again at once, with the
    /// same key, address and port; the store hands it the peer set. Its
    /// router keeps the mappings (a reboot behind a NAT that keeps the
    /// port: [`Sim::flush_nat`] too).
    pub fn restart_node(&mut self, n: usize) {
        let keys = StaticKeys::from_private(&mut self.nodes[n].private.to_owned());
        let subnet = self.nodes[n].info.pod_subnet;
        let mut rng = StdRng::seed_from_u64(self.rng.gen());
        let stack = self.stack(keys, subnet, &mut rng);
        let now = self.now;
        let node = &mut self.nodes[n];
        node.stack = stack;
        node.io = SimIo::default();
        // Its sockets died with it.
        node.own.clear();
        node.spares.clear();
        node.turn_on_shared_at_move = None;
        node.info.candidates.clear();
        let local = node.local_addrs();
        node.stack.set_local_candidates(now, local);
        self.after(n);
        self.store_due = Some(now);
    }

    /// Whether the TURN server checks as coturn does (the default) or as
    /// turn-server-proto does: see [`Relay::coturn_mismatch`].
    pub fn turn_like_coturn(&mut self, on: bool) {
        self.turn.coturn = on;
    }

    /// What the TURN server (answering as coturn) does with a release.
    pub fn turn_release(&mut self, release: Release) {
        self.turn.release = release;
    }

    /// Node `n`'s TURN allocation state.
    pub fn turn_ready(&self, n: usize) -> bool {
        self.nodes[n]
            .stack
            .nat
            .turn_states()
            .iter()
            .all(|(_, _, s)| matches!(s, crate::nat::TurnState::Ready(_)))
    }

    /// Stops the TURN server, or starts a fresh one (it forgot every
    /// allocation, as a restarted coturn has).
    pub fn turn_up(&mut self, up: bool) {
        if up && !self.turn.up {
            let (next_port, release) = (self.turn.next_port, self.turn.release);
            self.turn = Relay::new(self.now, self.turn.coturn);
            self.turn.next_port = next_port;
            self.turn.release = release;
        }
        self.turn.up = up;
    }

    /// The state `from` reports for `to`.
    pub fn path(&self, from: usize, to: usize) -> Option<&'static str> {
        let name = format!("n{to}");
        let st = self.nodes[from].stack.overlay.status();
        let p = st.iter().find(|s| s.node == name)?;
        match (p.state, p.relayed) {
            (PeerState::Connected, Some(true)) => Some("relay"),
            (PeerState::Connected, Some(false)) => Some("direct"),
            _ => None,
        }
    }

    /// Sends a pod frame from node `a` to a pod of node `b` every 200 ms
    /// until one arrives (a ping): how long that took, within `limit`.
    pub fn ping(&mut self, a: usize, b: usize, limit: Duration) -> Option<Duration> {
        let frame = pod_frame(a, b, b"ping")?;
        let (t0, before) = (self.now, self.nodes[b].io.pods);
        while self.now < t0 + limit {
            let now = self.now;
            let n = &mut self.nodes[a];
            let hdr = crate::offload::VnetHdr::default();
            n.stack.from_pod(now, &hdr, &frame, &mut n.io);
            self.after(a);
            let arrived = |s: &Sim| s.nodes[b].io.pods > before;
            if self
                .run_until_ok(Duration::from_millis(200), arrived)
                .is_some()
            {
                return Some(self.now.duration_since(t0));
            }
        }
        None
    }

    /// Entries in node `n`'s router's connection table (a bare Linux
    /// router's; other kinds keep none): what `conntrack -L` would count.
    pub fn conntrack_entries(&self, n: usize) -> usize {
        self.sites[self.nodes[n].site].router.ct.len(self.now)
    }

    /// Datagrams node `n` sent so far (overlay, STUN and TURN alike), and
    /// those to peers' own endpoints.
    pub fn sent_by(&self, n: usize) -> (u64, u64) {
        (self.nodes[n].sent, self.nodes[n].sent_direct)
    }

    /// Every node's punching schedule becomes `cfg`.
    pub fn set_punch(&mut self, cfg: &crate::punch::PunchConfig) {
        for n in &mut self.nodes {
            n.stack.overlay.set_punch(cfg.clone());
        }
    }

    pub fn kind_of(&self, n: usize) -> NatKind {
        self.sites[self.nodes[n].site].router.kind
    }
}

/// Peer traffic a TURN server relayed to us: ChannelData, or a data
/// indication (STUN method 0x0017) when we have no channel to that peer
/// address, because we never sent to it through our own allocation.
#[cfg(test)]
fn is_relayed(d: &[u8]) -> bool {
    match crate::wire::demux(d) {
        crate::wire::Demux::ChannelData => true,
        crate::wire::Demux::Stun => d.get(..2) == Some(&[0x00, 0x17]),
        _ => false,
    }
}

/// The payload of background frames.
const BUSY: &[u8; 4] = b"busy";

/// A UDP frame from a pod of node `a` to a pod of node `b` with a 4-byte
/// payload.
fn pod_frame(a: usize, b: usize, payload: &[u8; 4]) -> Option<Vec<u8>> {
    let ip = |n: usize| Ipv4Addr::new(10, 244, n as u8, 2);
    let mut udp = vec![0x30, 0x39, 0x30, 0x3a, 0, 12, 0, 0];
    udp.extend_from_slice(payload);
    crate::packet::pod_ipv4_frame(ip(a), ip(b), crate::packet::IPPROTO_UDP, &udp)
}

/// Whether `data` is a STUN Binding (reflexive addresses: not TURN).
fn is_binding(data: &[u8]) -> bool {
    Message::from_bytes(data).is_ok_and(|m| m.has_method(stun_proto::types::message::BINDING))
}

/// Seeds for a test: `EVIO_SIM_SEED` replays one, else `0..count`.
pub fn seeds(count: u64) -> Vec<u64> {
    match std::env::var("EVIO_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        Some(s) => vec![s],
        None => (0..count).collect(),
    }
}

/// A seed for a node's overlay (tests that build nodes by hand).
pub fn node_seed(n: u64) -> crate::crypto::Seed {
    seed_from_u64(n)
}
