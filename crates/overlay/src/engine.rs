//! The overlay of one node as a state machine: peers from the store, their
//! tunnels and paths, the L2 switch of the pod overlay and the router of the
//! host overlay. The agent feeds it datagrams, frames and time; it answers
//! through [`Io`] (datagrams to send, frames and packets to deliver) and
//! says when it next needs the time ([`Overlay::poll_timeout`]).
//!
//! Split horizon holds by construction: a frame from a peer only ever goes
//! to [`Io::pod`] or [`Io::host`], never back into a tunnel.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::bucket::TokenBucket;
use crate::crypto::{CookieJar, Key, Seed};
use crate::hunt::{HuntConfig, PeerHunt};
use crate::l2::{DropReason, LocalVerdict, PeerAddrs, PeerId, PeerVerdict, Switch, SwitchConfig};
use crate::offload::{segments, Csum, Framing, VnetHdr};
use crate::path::{PathAddr, PathConfig, Paths, ProbeDue, Rank, Via};
use crate::punch::{Action, Cue, Punch, PunchConfig};
use crate::reason::{HandshakeFailure, PathWhy};
use crate::timers::Deadlines;
use crate::tunnel::{self, Identity, Reject, TimerAction, Tunnel, TunnelConfig};
use crate::wire::{self, kind, Inner, INNER_HEADER};

/// Largest frame the data path handles (a TSO super-frame plus headers).
pub const MAX_FRAME: usize = 65_550;
/// Largest datagram the core writes (an inner frame of `mtu` + Ethernet +
/// transport overhead; generous so a misconfigured MTU fails visibly in the
/// switch rather than in a buffer).
pub const MAX_DATAGRAM: usize = 9_216;
/// Step of the timer grid (see `Overlay::on_grid`).
const TIMER_GRID: Duration = Duration::from_millis(250);
/// Handshake initiations go to at most this many paths of a peer.
const MAX_HANDSHAKE_TARGETS: usize = 8;
/// Frames held for a peer whose session is being made (on demand): per
/// peer and in total, in frames and bytes. Beyond, a frame is dropped
/// (counted), as a full device queue would.
const QUEUE_PER_PEER: usize = 32;
const QUEUE_BYTES_PER_PEER: usize = 256 * 1024;
const QUEUE_BYTES_TOTAL: usize = 2 * 1024 * 1024;
/// A queued frame older than this is dropped (counted), not sent: its
/// sender has retransmitted or given up by then, and a burst of stale
/// frames would only delay the fresh ones.
const QUEUE_AGE: Duration = Duration::from_secs(3);

/// How the agent hands results back.
pub trait Io {
    /// A buffer for the next datagram, at least [`MAX_DATAGRAM`] bytes.
    fn datagram(&mut self) -> &mut [u8];
    /// Sends the first `len` bytes of [`Io::datagram`] on `to`.
    fn commit(&mut self, to: PathAddr, len: usize);
    /// A frame for the local bridge (the TAP).
    fn pod(&mut self, frame: &mut [u8], csum: Csum);
    /// A packet for the host overlay interface (the TUN).
    fn host(&mut self, packet: &mut [u8], csum: Csum);
}

#[derive(Debug, Clone)]
pub struct OverlayConfig {
    pub network: String,
    /// This node's pod subnet.
    pub pod_subnet: IpNet,
    /// This node's host-overlay address, if there is a host overlay.
    pub host_addr: Option<IpAddr>,
    /// Its IPv6 host-overlay address beside an IPv4 `host_addr` (a
    /// dual-stack host CIDR).
    pub host_addr6: Option<IpAddr>,
    /// Largest IP packet carried across (the pods' MTU).
    pub mtu: usize,
    pub tunnel: TunnelConfig,
    pub paths: PathConfig,
    /// The silence-and-alternate schedule for direct paths that do not
    /// answer ([`crate::punch`]).
    pub punch: PunchConfig,
    /// Birthday probing of symmetric NATs ([`crate::hunt`]).
    pub hunt: HuntConfig,
    /// Handshake messages per second before flood protection starts
    /// demanding cookies (mac2).
    pub handshake_load: u32,
    /// Valid-cookie handshakes per second and source IP under load.
    pub handshake_per_ip: u32,
    /// Per pod (source MAC): broadcast / unknown-unicast floods per second
    /// (and burst), and as many ARP/ND requests sent to an owner.
    pub flood_rate: u32,
    pub flood_burst: u32,
    /// Per peer: broadcasts and multicasts accepted per second (and burst).
    pub peer_flood_rate: u32,
    pub peer_flood_burst: u32,
    /// The local bridge's MAC: a peer sourcing it is spoofing.
    pub bridge_mac: Option<[u8; 6]>,
    /// A peer without a working path for this long gets a new handshake.
    pub path_loss_rehandshake: Duration,
    /// `Some(d)`: sessions on demand. A peer starts idle; the first frame
    /// for it starts the handshake (frames meanwhile queued); its session
    /// is renewed while it carried traffic within `d`, and let expire
    /// after. `None`: every peer is handshaken at once and kept up.
    pub keep_warm: Option<Duration>,
    /// Traffic flows to a peer when a frame went or came within this: only
    /// then are its paths probed (the active one only once the peer has
    /// gone quiet: WireGuard's passive keepalive).
    pub busy: Duration,
    /// An up peer with nothing sent to it for this long gets a keepalive,
    /// where a NAT is on its path (not on a path to its local candidate).
    pub nat_keepalive: Duration,
    /// On demand, while the peer's frames come in (one within `busy`):
    /// its direct active path carries something from us at least this
    /// often (a keepalive when nothing else went). Only our own sending
    /// reopens a flow our NAT forgot (flushed, rebooted): every way in,
    /// the relay's too, is closed until we send, and nothing else would
    /// go for up to `nat_keepalive` (issue 22's recovery figure).
    pub busy_keepalive: Duration,
}

impl OverlayConfig {
    pub fn new(network: &str, pod_subnet: IpNet, mtu: usize) -> OverlayConfig {
        OverlayConfig {
            network: network.to_string(),
            pod_subnet,
            host_addr: None,
            host_addr6: None,
            mtu,
            tunnel: TunnelConfig::default(),
            paths: PathConfig::default(),
            punch: PunchConfig::default(),
            hunt: HuntConfig::default(),
            handshake_load: 64,
            handshake_per_ip: 8,
            flood_rate: 200,
            flood_burst: 400,
            peer_flood_rate: 400,
            peer_flood_burst: 800,
            bridge_mac: None,
            path_loss_rehandshake: Duration::from_secs(4),
            keep_warm: Some(Duration::from_secs(120)),
            busy: Duration::from_secs(10),
            nat_keepalive: Duration::from_secs(25),
            busy_keepalive: Duration::from_millis(500),
        }
    }
}

/// A candidate endpoint of a peer, as published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCandidate {
    pub addr: SocketAddr,
    pub class: Rank,
}

/// A peer as the store describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerInfo {
    pub node: String,
    pub key: Key,
    pub pod_subnet: IpNet,
    /// Host-overlay address with the host CIDR's prefix.
    pub host_addr: Option<IpNet>,
    /// Its IPv6 host-overlay address beside an IPv4 `host_addr` (the
    /// record's `hostAddresses`).
    pub host_addr6: Option<IpNet>,
    pub candidates: Vec<PeerCandidate>,
    /// The record's liveness lapsed (its lease expired, its heartbeat is
    /// old): the node lost the store or its agent is gone. Its session, if
    /// it has one, is kept (rekeys included); without one, do not
    /// initiate, but answer if it speaks.
    pub stale: bool,
    /// Its bridge's MAC, if its record says (the one MAC not of a pod it
    /// may source).
    pub bridge_mac: Option<[u8; 6]>,
}

/// Per-peer counters.
#[derive(Debug, Clone, Copy, Default)]
pub struct PeerStats {
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub handshakes: u64,
    pub spoofed: u64,
    pub dropped: u64,
    /// Transport datagrams of this peer's sessions refused as replays.
    pub replay: u64,
    /// Transport datagrams of this peer's sessions that failed to decrypt.
    pub auth: u64,
}

struct Peer {
    info: PeerInfo,
    tunnel: Tunnel,
    paths: Paths,
    punch: Punch,
    hunt: PeerHunt,
    /// Local session indices registered in the index map for this peer.
    indices: Vec<u32>,
    phase: Phase,
    /// When this peer's timers next run (on the timer grid), and why:
    /// stored, so that [`Overlay::poll_timeout`] and
    /// [`Overlay::handle_timeout`] read the same thing (through the
    /// heap, [`Deadlines`]). `None`: nothing is due (an idle peer).
    deadline: Option<Instant>,
    wake: Wake,
    stats: PeerStats,
    /// The path last reported in [`Event::PathChanged`].
    reported: Option<(PathAddr, Rank)>,
    /// Last frame to or from it (not probes, not keepalives).
    used: Option<Instant>,
    /// Last frame sent to it: its active path is probed only when nothing
    /// came back since (WireGuard's passive keepalive).
    sent_data: Option<Instant>,
    /// Last frame that came from it (not a flood): while its frames come
    /// in, our side of the path is held open tighter
    /// ([`OverlayConfig::busy_keepalive`]).
    got_data: Option<Instant>,
    /// Last datagram from it that was not a keepalive, and the path it came
    /// by: what tells its active path works (its busy keepalives go on for
    /// `busy` after our last frame reached it, so they would also come
    /// while our direction of the path is dead).
    answer: Option<(PathAddr, Instant)>,
    /// Last datagram sent on its active path, of any kind (the NAT
    /// keepalive's clock: probes of other paths hold no flow of the path
    /// in use).
    last_tx: Option<Instant>,
    /// Frames and bytes of it in [`Overlay::queue`].
    queued: usize,
    queued_bytes: usize,
}

impl Peer {
    /// Whether it should have a session now: always without on-demand
    /// sessions, else while it carries traffic.
    fn wanted(&self, now: Instant, keep_warm: Option<Duration>) -> bool {
        match keep_warm {
            None => true,
            Some(d) => self
                .used
                .is_some_and(|t| now.saturating_duration_since(t) < d),
        }
    }

    fn busy(&self, now: Instant, busy: Duration) -> bool {
        self.used
            .is_some_and(|t| now.saturating_duration_since(t) < busy)
    }

    /// Its active path answered since the last frame went to it, and has
    /// an RTT: nothing to check on it until a frame goes unanswered.
    fn answered(&self) -> bool {
        self.paths.active().is_some_and(|a| {
            a.rtt.is_some()
                && self.answer.is_some_and(|(from, h)| {
                    from == a.addr && self.sent_data.is_none_or(|s| h >= s)
                })
        })
    }

    /// A NAT is on its path: the active path is not to its local-interface
    /// candidate (reflexive, learned from a translated source, relayed).
    fn behind_nat(&self) -> bool {
        self.paths.active().is_some_and(|a| a.class != Rank::Local)
    }

    /// How long its active path may carry nothing from us before a
    /// keepalive goes, if one ever should: `busy_keepalive` while its
    /// frames come in over a direct path through a NAT (sessions on
    /// demand; eager probing holds the path anyway), else
    /// `nat_keepalive` where a NAT is on the path. A relayed path's flows
    /// are the TURN client's (its bindings and refreshes hold them).
    fn keepalive_every(&self, now: Instant, cfg: &OverlayConfig) -> Option<Duration> {
        let direct = self.paths.active().is_some_and(|a| a.class == Rank::Direct);
        let fed = self
            .got_data
            .is_some_and(|t| now.saturating_duration_since(t) < cfg.busy);
        match () {
            _ if cfg.keep_warm.is_some() && direct && fed => Some(cfg.busy_keepalive),
            _ if self.behind_nat() => Some(cfg.nat_keepalive),
            _ => None,
        }
    }
}

/// A frame for a peer whose session is being made.
struct Queued {
    peer_id: PeerId,
    at: Instant,
    kind: u8,
    hdr: VnetHdr,
    framing: Framing,
    frame: Vec<u8>,
}

/// Where a peer is in its life. Stored and changed in one place
/// ([`Overlay::refresh_phase`]); `peers` and the events follow from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// No session, none needed (no traffic, sessions on demand): nothing
    /// is sent to it and none of its timers run; the first frame for it
    /// starts a handshake.
    Idle,
    /// The peer with the larger key waits until then before its first
    /// initiation, so that two nodes meeting do not both handshake (both
    /// would work; one is enough).
    Waiting { until: Instant },
    /// No session yet: handshaking, or backing off between rounds.
    Connecting,
    /// A session and a path that answers.
    Connected,
    /// A session, but no path has answered since then: after
    /// [`OverlayConfig::path_loss_rehandshake`] the session is dropped and
    /// a new handshake goes out on every path.
    Pathless { since: Instant },
    /// Its record is stale (file store) and there is no session: we do not
    /// initiate, but answer if it speaks.
    Stale,
}

/// Why a peer's timers run (logged at trace level).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// Its record or its session changed: everything is looked at now.
    Changed,
    /// Its turn to initiate comes.
    Waiting,
    /// A handshake (first, retransmitted, rekey) or a session expiry.
    Tunnel,
    /// A path probe is due or one was lost.
    Probe,
    /// It has been without a working path for long enough to start over.
    Pathless,
    /// Its NAT mapping needs a keepalive.
    Keepalive,
}

/// What happened that the layers around the overlay act on, drained with
/// [`Overlay::poll_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A peer got a session and a working path.
    PeerUp { node: String },
    /// A peer lost its session or its last working path.
    PeerDown { node: String },
    /// A peer's active path changed or died: our public address may have
    /// changed, so candidates are gathered again.
    ActivePathLost { node: String },
    /// A path through our allocation on TURN server `n` stopped answering:
    /// a restarted server forgets allocations without telling.
    RelaySuspect(u8),
    /// A handshake with `node` completed on `via` (we initiated it, or
    /// answered its initiation); `rekey` when a session existed before.
    Handshake {
        node: String,
        via: PathAddr,
        initiator: bool,
        rekey: bool,
    },
    /// A handshake failed: with `node` when the peer is known (by the
    /// session index, or the address a mac1 failure came from), else only
    /// the address it came from. Failures of unknown senders are bounded
    /// by [`ANON_EVENTS`] so a flood cannot grow the queue.
    HandshakeFailed {
        node: Option<String>,
        from: Option<PathAddr>,
        why: HandshakeFailure,
    },
    /// The path carrying `node`'s traffic changed: `None` is no path.
    PathChanged {
        node: String,
        old: Option<(PathAddr, Rank)>,
        new: Option<(PathAddr, Rank)>,
        why: PathWhy,
    },
    /// Open spare UDP sockets `first..first + count` on ephemeral ports
    /// (birthday probing, [`crate::hunt`]); tell
    /// [`Overlay::spares_opened`]. Their datagrams come in on
    /// [`crate::path::Via::Spare`] paths.
    OpenSpares { first: u32, count: u32 },
    /// Close these spare sockets.
    CloseSpares(Vec<u32>),
}

/// Events about senders that are no peer (a bad mac1, an unknown key, a
/// cookie demanded): this many a second, and as many at once.
pub const ANON_EVENTS: u32 = 20;

/// The state `peers` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerState {
    Connected,
    Connecting,
    /// Valid and reachable as far as we know, without a session because
    /// none is needed now: healthy (OVERLAY.md).
    Idle,
    Down,
}

impl PeerState {
    pub fn as_str(self) -> &'static str {
        match self {
            PeerState::Connected => "connected",
            PeerState::Connecting => "connecting",
            PeerState::Idle => "idle",
            PeerState::Down => "down",
        }
    }

    /// What anything waiting for a peer counts as fine.
    pub fn healthy(self) -> bool {
        matches!(self, PeerState::Connected | PeerState::Idle)
    }
}

#[derive(Debug, Clone)]
pub struct PeerStatus {
    pub node: String,
    pub key: Key,
    pub pod_subnet: IpNet,
    pub host_addr: Option<IpNet>,
    pub host_addr6: Option<IpNet>,
    pub state: PeerState,
    /// `Some(true)` relayed, `Some(false)` direct, `None` no path.
    pub relayed: Option<bool>,
    pub path: Option<PathAddr>,
    /// How the path in use was found.
    pub method: Option<crate::path::Method>,
    pub rtt: Option<Duration>,
    pub session_born: Option<Instant>,
    pub path_changed: Option<Instant>,
    pub stats: PeerStats,
    /// Paths known, alive ones.
    pub paths: usize,
    pub alive_paths: usize,
}

/// Node-wide counters of refused datagrams and frames.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub rejects: HashMap<&'static str, u64>,
    pub switch_drops: HashMap<&'static str, u64>,
    /// Frames for a peer without a session or path (dropped).
    pub no_path: u64,
    pub cookies_sent: u64,
    /// Handshakes let through under load on a valid mac2 (a cookie round
    /// that worked).
    pub mac2_accepted: u64,
    /// Frames held for a peer until its session is up, and those dropped
    /// because the queue was full, the handshake failed, or they waited
    /// longer than [`QUEUE_AGE`].
    pub queued: u64,
    pub queue_drops: u64,
    /// Frames held now (the queue's length).
    pub queue_len: usize,
    /// Handshakes started because a peer sent on a session we do not know
    /// (see `Overlay::unknown_session`).
    pub stale_sessions: u64,
    /// Flood frames not sent to a peer because it was idle (one per frame
    /// and peer; see `Overlay::flood`).
    pub flood_idle: u64,
    /// Runs of [`Overlay::handle_timeout`], and of one peer's timers within
    /// them: the idle cost (issue 22) is their ratio and their rate.
    pub wakes: u64,
    pub peer_runs: u64,
}

/// The most sources the per-source handshake table holds. Spoofed sources
/// cannot get into it (they hold no cookie), so it is small in practice;
/// clearing past this bounds it regardless.
const MAX_HANDSHAKE_SOURCES: usize = 4096;

/// Learned MACs expire lazily; a slow housekeeping timer keeps the tables
/// tidy.
const HOUSEKEEPING: Duration = Duration::from_secs(30);

pub struct Overlay {
    cfg: OverlayConfig,
    id: Identity,
    switch: Switch,
    peers: Vec<Option<Peer>>,
    by_key: HashMap<Key, PeerId>,
    by_node: HashMap<String, PeerId>,
    /// Local session index -> peer.
    index: HashMap<u32, PeerId>,
    cookies: CookieJar,
    hs_window: (Instant, u32),
    hs_per_ip: HashMap<IpAddr, TokenBucket>,
    /// Addresses of TURN relays (ours and the peers'): a path to one that
    /// leaves through our own socket counts as relayed unless the peer
    /// published that address itself (`path::classify`: a node may share
    /// its address with a TURN server and be reached directly).
    relay_ips: Vec<IpAddr>,
    /// Our TURN allocations that are up (by server index): each gives a
    /// path to every peer's relayed address ([`Overlay::set_relays`]).
    relays: Vec<u8>,
    /// For an address family we cannot send on (index 0 IPv4, 1 IPv6):
    /// our TURN allocation whose relayed address is of that family. The
    /// peers' candidates of that family are reached through it (an
    /// IPv6-only node's way to an IPv4-only peer); `None`: not at all.
    cross_relays: [Option<u8>; 2],
    /// Plaintext scratch: inner header + frame.
    scratch: Vec<u8>,
    reply: Vec<u8>,
    probe_id: u64,
    probes: Vec<ProbeDue>,
    /// Relays whose paths died in this run of a peer's timers (reused).
    dead_relays: Vec<u8>,
    stats: Stats,
    /// Node-wide timers (learned MACs, the flood tables).
    housekeeping: Instant,
    /// Every peer's stored deadline, earliest first.
    deadlines: Deadlines,
    /// Peers due in this wake (reused).
    due: Vec<PeerId>,
    /// Free slots of `peers`.
    free: Vec<PeerId>,
    /// Frames for peers whose sessions are being made, oldest first.
    queue: VecDeque<Queued>,
    queue_bytes: usize,
    /// Origin of the timer grid.
    epoch: Instant,
    events: VecDeque<Event>,
    /// Bounds the events about senders that are no peer.
    anon_events: TokenBucket,
    /// Bounds the peer lookups of [`Overlay::unknown_session`].
    stale_sessions: TokenBucket,
    /// Every random draw: indices, probe ids, ephemeral keys, cookies.
    rng: StdRng,
    /// Birthday probing, node-wide ([`hunting`]).
    hunter: hunting::Hunter,
}

impl Overlay {
    /// `seed` is the source of every random draw ([`crate::crypto::Seed`]):
    /// [`crate::crypto::os_seed`] in production, a number in tests.
    pub fn new(now: Instant, cfg: OverlayConfig, id: Identity, seed: Seed) -> Overlay {
        let switch = Switch::new(SwitchConfig {
            local_subnet: cfg.pod_subnet,
            host_addr: cfg.host_addr,
            host_addr6: cfg.host_addr6,
            bridge_mac: cfg.bridge_mac,
            mtu: cfg.mtu,
            flood_rate: cfg.flood_rate,
            flood_burst: cfg.flood_burst,
            peer_flood_rate: cfg.peer_flood_rate,
            peer_flood_burst: cfg.peer_flood_burst,
            max_macs_per_peer: 1024,
            mac_ttl: Duration::from_secs(300),
        });
        let mut rng = StdRng::from_seed(seed);
        let cookies = CookieJar::new(id.keys.public(), rng.gen());
        Overlay {
            cfg,
            id,
            switch,
            peers: Vec::new(),
            by_key: HashMap::new(),
            by_node: HashMap::new(),
            index: HashMap::new(),
            cookies,
            hs_window: (now, 0),
            hs_per_ip: HashMap::new(),
            relay_ips: Vec::new(),
            relays: Vec::new(),
            cross_relays: [None; 2],
            scratch: vec![0; MAX_FRAME + INNER_HEADER],
            reply: vec![0; 2048],
            probe_id: rng.gen(),
            probes: Vec::with_capacity(64),
            dead_relays: Vec::with_capacity(8),
            stats: Stats::default(),
            housekeeping: now + HOUSEKEEPING,
            deadlines: Deadlines::default(),
            due: Vec::with_capacity(64),
            free: Vec::new(),
            queue: VecDeque::new(),
            queue_bytes: 0,
            epoch: now,
            events: VecDeque::new(),
            anon_events: TokenBucket::new(ANON_EVENTS, ANON_EVENTS),
            stale_sessions: TokenBucket::new(ANON_EVENTS, ANON_EVENTS),
            rng,
            hunter: hunting::Hunter::default(),
        }
    }

    /// The next thing that happened, oldest first.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Whether [`Overlay::poll_event`] has something (cheap: for callers
    /// that drain events only when there are some).
    pub fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    fn push_event(&mut self, e: Event) {
        if !self.events.contains(&e) {
            self.events.push_back(e);
        }
    }

    pub fn identity(&self) -> &Identity {
        &self.id
    }

    pub fn config(&self) -> &OverlayConfig {
        &self.cfg
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// When [`Overlay::handle_timeout`] must run next: the earliest stored
    /// deadline.
    pub fn poll_timeout(&self) -> Instant {
        // Every entry point that moves deadlines ends with `tidy`: the top
        // of the heap is a current deadline.
        self.deadlines
            .peek()
            .map_or(self.housekeeping, |t| t.min(self.housekeeping))
    }

    /// Drops outdated heap entries above the earliest current one, and
    /// rebuilds a heap grown far past the peer count.
    fn tidy(&mut self) {
        let peers = &self.peers;
        if self.deadlines.len() > 4 * peers.len() + 64 {
            let live = peers.iter().enumerate().filter_map(|(i, p)| {
                let at = p.as_ref()?.deadline?;
                Some((at, i as PeerId))
            });
            self.deadlines.rebuild(live);
        }
        self.deadlines
            .earliest(|at, peer_id| is_due_at(peers, at, peer_id));
    }

    /// Replaces the punching schedule (tests, and agents whose routers
    /// have other UDP timeouts).
    pub fn set_punch(&mut self, cfg: PunchConfig) {
        self.cfg.punch = cfg;
    }

    /// Our own candidates changed (our NAT or address did): every peer's
    /// direct paths are tried again at once, silence or not.
    pub fn retry_direct(&mut self, now: Instant) {
        for (peer_id, p) in self.peers.iter_mut().enumerate() {
            let Some(p) = p.as_mut().filter(|p| p.paths.mute || p.punch.attempt > 0) else {
                continue;
            };
            p.punch.reset();
            p.paths.mute = false;
            p.paths.wake_direct(now, &self.cfg.paths);
            sooner(
                &mut self.deadlines,
                p,
                peer_id as PeerId,
                now,
                Wake::Changed,
            );
        }
        self.tidy();
    }

    /// The allocations the candidates of a family we lack go through
    /// ([`Overlay::set_peers_via`]).
    pub fn cross_relays(&self) -> [Option<u8>; 2] {
        self.cross_relays
    }

    /// IP addresses of TURN relays, for path classification.
    pub fn set_relay_ips(&mut self, ips: Vec<IpAddr>) {
        self.relay_ips = ips;
    }

    /// Our TURN allocations that are up, by server index. Through each,
    /// every peer's relayed candidate is a path: the one pairing that
    /// needs nothing of either side's NAT. Our own socket may reach no
    /// peer at all (a site that lets only TURN over TCP out), and on
    /// demand a peer with no traffic for us never handshakes with our
    /// relayed address: without these paths such a node could never
    /// start a session (docs/benchmarks.md, finding 26).
    pub fn set_relays(&mut self, now: Instant, relays: Vec<u8>) {
        if relays == self.relays {
            return;
        }
        self.relays = relays;
        let infos: Vec<PeerInfo> = self
            .peers
            .iter()
            .flatten()
            .map(|p| p.info.clone())
            .collect();
        let ranges = Ranges::new(self.overlay_ranges(&infos));
        for info in &infos {
            if let Some(&peer_id) = self.by_node.get(&info.node) {
                self.update_peer(now, peer_id, info, &ranges, true);
            }
        }
        self.tidy();
    }

    fn count_reject(&mut self, r: Reject) {
        *self.stats.rejects.entry(r.as_str()).or_default() += 1;
    }

    fn count_drop(&mut self, r: DropReason) {
        *self.stats.switch_drops.entry(r.as_str()).or_default() += 1;
    }

    /// Replaces the peer set with what the store says. Peers whose key
    /// changed start over; peers that disappeared are forgotten with
    /// everything learned from them. A key that two records claim is
    /// nobody's ([`shared_keys`] says which); candidates inside the
    /// overlay's own ranges are ignored.
    pub fn set_peers(&mut self, now: Instant, infos: &[PeerInfo]) {
        self.set_peers_via(now, infos, self.cross_relays);
    }

    /// [`Overlay::set_peers`], with the allocations through which the
    /// candidates of a family we cannot send on are reached (see
    /// `cross_relays`); a change applies to every peer's candidates.
    pub fn set_peers_via(&mut self, now: Instant, infos: &[PeerInfo], cross: [Option<u8>; 2]) {
        let recheck = cross != self.cross_relays;
        self.cross_relays = cross;
        let own = *self.id.keys.public();
        let shared = shared_keys(infos);
        let ranges = Ranges::new(self.overlay_ranges(infos));
        let mut keep = vec![false; self.peers.len()];
        for info in infos {
            if info.key == own
                || !self.id.valid_peer_key(&info.key)
                || shared.iter().any(|(k, _)| *k == info.key)
            {
                continue;
            }
            let (peer_id, fresh) = match self.by_node.get(&info.node).copied() {
                Some(peer_id) => {
                    let key_changed = self.peer(peer_id).is_some_and(|p| p.info.key != info.key);
                    if key_changed {
                        self.remove_peer(peer_id);
                        (self.add_peer(now, info.clone()), true)
                    } else {
                        (peer_id, false)
                    }
                }
                None => {
                    // The same key under another name: the node was renamed.
                    if let Some(old) = self.by_key.get(&info.key).copied() {
                        self.remove_peer(old);
                    }
                    (self.add_peer(now, info.clone()), true)
                }
            };
            self.update_peer(now, peer_id, info, &ranges, fresh || recheck);
            if keep.len() <= peer_id as usize {
                keep.resize(peer_id as usize + 1, false);
            }
            keep[peer_id as usize] = true;
        }
        for peer_id in 0..self.peers.len() {
            if self.peers[peer_id].is_some() && !keep.get(peer_id).copied().unwrap_or(false) {
                self.remove_peer(peer_id as PeerId);
            }
        }
        self.tidy();
    }

    /// Makes peer `peer_id`'s timers run at the next wake-up.
    fn due_now(&mut self, now: Instant, peer_id: PeerId) {
        if let Some(p) = peer_mut(&mut self.peers, peer_id) {
            sooner(&mut self.deadlines, p, peer_id, now, Wake::Changed);
        }
    }

    /// Lets every peer without a session be contacted now, skipping the
    /// tie-break wait of the larger key. For a restarted agent: its peers
    /// still hold sessions with its previous instance and will not
    /// initiate until they notice it is gone (seconds); waiting for them
    /// would be the whole cost of the restart.
    pub fn hurry(&mut self, now: Instant) {
        let tcfg = &self.cfg.tunnel;
        for (peer_id, p) in self.peers.iter_mut().enumerate() {
            let Some(p) = p.as_mut().filter(|p| !p.tunnel.has_session()) else {
                continue;
            };
            match p.phase {
                Phase::Waiting { .. } => p.phase = Phase::Connecting,
                // Nobody asked for it: on demand, it stays idle.
                Phase::Idle => continue,
                _ => {}
            }
            p.tunnel.retry_now(tcfg);
            sooner(
                &mut self.deadlines,
                p,
                peer_id as PeerId,
                now,
                Wake::Changed,
            );
        }
        self.tidy();
    }

    fn peer(&self, peer_id: PeerId) -> Option<&Peer> {
        self.peers.get(peer_id as usize).and_then(Option::as_ref)
    }

    fn add_peer(&mut self, now: Instant, info: PeerInfo) -> PeerId {
        let tunnel = Tunnel::new(&self.id, info.key);
        let delay = if self.id.keys.public() < &info.key {
            Duration::ZERO
        } else {
            Duration::from_secs(1)
        };
        let phase = match self.cfg.keep_warm {
            Some(_) => Phase::Idle,
            None => Phase::Waiting { until: now + delay },
        };
        let peer = Peer {
            tunnel,
            paths: Paths::default(),
            punch: Punch::default(),
            hunt: PeerHunt::default(),
            indices: Vec::new(),
            phase,
            deadline: None,
            wake: Wake::Changed,
            stats: PeerStats::default(),
            reported: None,
            info,
            used: None,
            sent_data: None,
            got_data: None,
            answer: None,
            last_tx: None,
            queued: 0,
            queued_bytes: 0,
        };
        let peer_id = match self.free.pop() {
            Some(i) => {
                self.peers[i as usize] = Some(peer);
                i
            }
            None => {
                self.peers.push(Some(peer));
                (self.peers.len() - 1) as PeerId
            }
        };
        if let Some((key, node)) = self
            .peer(peer_id)
            .map(|p| (p.info.key, p.info.node.clone()))
        {
            self.by_key.insert(key, peer_id);
            self.by_node.insert(node, peer_id);
        }
        peer_id
    }

    /// Addresses that are the overlay itself: pod subnets, host-overlay
    /// networks. A candidate there would route the tunnel over itself
    /// (ZeroTierOne#779); only a store writer can publish one.
    fn overlay_ranges(&self, infos: &[PeerInfo]) -> Vec<IpNet> {
        let mut ranges = vec![self.cfg.pod_subnet.trunc()];
        ranges.extend(self.cfg.host_addr.map(IpNet::from));
        ranges.extend(self.cfg.host_addr6.map(IpNet::from));
        for i in infos {
            ranges.push(i.pod_subnet.trunc());
            ranges.extend(i.host_addr.map(|h| h.trunc()));
            ranges.extend(i.host_addr6.map(|h| h.trunc()));
        }
        ranges
    }

    /// Takes the record of peer `peer_id` (`fresh`: just added). An unchanged
    /// record changes nothing: a store update of one node does not wake
    /// every peer.
    fn update_peer(
        &mut self,
        now: Instant,
        peer_id: PeerId,
        info: &PeerInfo,
        ranges: &Ranges,
        fresh: bool,
    ) {
        let relay_ips = &self.relay_ips;
        let cross = self.cross_relays;
        let Some(p) = peer_mut(&mut self.peers, peer_id) else {
            return;
        };
        if !fresh && p.info == *info {
            return;
        }
        p.info = info.clone();
        let usable = info
            .candidates
            .iter()
            .filter(|c| !ranges.contains(c.addr.ip()));
        let mut cands: Vec<(PathAddr, Rank)> = usable
            .clone()
            .map(|c| {
                let a = match cross[usize::from(c.addr.is_ipv6())] {
                    Some(i) => PathAddr {
                        via: Via::Turn(i),
                        remote: c.addr,
                    },
                    None => PathAddr::direct(c.addr),
                };
                (a, crate::path::classify(relay_ips, a, Some(c.class)))
            })
            .collect();
        // Our relayed address to theirs reaches the peer whatever either
        // NAT lets through (our allocations are IPv4 only).
        let relayed = usable.filter(|c| c.class == Rank::Relay && c.addr.is_ipv4());
        for c in relayed {
            for &i in &self.relays {
                let a = PathAddr {
                    via: Via::Turn(i),
                    remote: c.addr,
                };
                cands.push((a, Rank::Relay));
            }
        }
        let added = p.paths.set_candidates(now, &self.cfg.paths, &cands);
        if added && !p.tunnel.has_session() {
            // A candidate to try (a relay allocation came up, a NAT mapping
            // was learned): handshake on it now, not at the next retry.
            p.tunnel.retry_now(&self.cfg.tunnel);
        }
        if added {
            // New information (its NAT changed, a mapping appeared): no
            // silence holds it back.
            p.punch.reset();
            p.paths.mute = false;
        }
        sooner(&mut self.deadlines, p, peer_id, now, Wake::Changed);
        self.switch.set_peer(
            peer_id,
            PeerAddrs {
                pod_subnet: info.pod_subnet,
                host_addr: info.host_addr.map(|n| n.addr()),
                host_addr6: info.host_addr6.map(|n| n.addr()),
                bridge_mac: info.bridge_mac,
            },
        );
    }

    fn remove_peer(&mut self, peer_id: PeerId) {
        let Some(p) = self.peers.get_mut(peer_id as usize).and_then(Option::take) else {
            return;
        };
        if p.phase == Phase::Connected {
            self.push_event(Event::PeerDown {
                node: p.info.node.clone(),
            });
        }
        for i in &p.indices {
            self.index.remove(i);
        }
        if p.queued > 0 {
            self.drop_queued(peer_id);
        }
        self.free.push(peer_id);
        self.by_key.remove(&p.info.key);
        self.by_node.remove(&p.info.node);
        self.switch.remove_peer(peer_id);
    }

    /// A fresh random local index.
    fn alloc_index(&mut self) -> u32 {
        loop {
            let i: u32 = self.rng.gen();
            if !self.index.contains_key(&i) {
                return i;
            }
        }
    }

    /// Makes the index map agree with the peer's tunnel after sessions came
    /// or went.
    fn sync_indices(&mut self, peer_id: PeerId) {
        let Some(p) = peer_mut(&mut self.peers, peer_id) else {
            return;
        };
        // At most four sessions/handshakes per tunnel: a fixed array keeps
        // this off the heap (it runs for every transport message).
        let mut live = [0u32; 4];
        let mut n = 0;
        for i in p.tunnel.indices().take(4) {
            live[n] = i;
            n += 1;
        }
        let live = &live[..n];
        if p.indices.as_slice() == live {
            return;
        }
        for i in p.indices.iter().filter(|i| !live.contains(i)) {
            self.index.remove(i);
        }
        for &i in live {
            self.index.insert(i, peer_id);
        }
        p.indices.clear();
        p.indices.extend_from_slice(live);
    }

    /// A datagram from `from` authenticated as peer `peer_id`: the path it came
    /// by works, and the tunnel may have gained or lost sessions.
    /// `answer`: it was no keepalive ([`Peer::answer`]).
    fn heard_from(
        &mut self,
        now: Instant,
        peer_id: PeerId,
        from: PathAddr,
        answer: bool,
        io: &mut dyn Io,
    ) {
        let class = self.classify(peer_id, from);
        let cfg = &self.cfg.paths;
        let Some(p) = peer_mut(&mut self.peers, peer_id) else {
            return;
        };
        if answer {
            p.answer = Some((from, now));
        }
        let before = p.paths.active_addr();
        let mut learned = p.paths.on_rx_of(now, cfg, from, class, answer);
        let symmetric = p.hunt.peer == crate::hunt::Mapping::Dependent;
        if let Some(seen) = relayed_source(&self.relay_ips, &p.info, from).filter(|_| !symmetric) {
            learned |= p.paths.learn_untried(now, cfg, PathAddr::direct(seen));
        }
        // A new path is probed at once, a new active one on its interval:
        // neither may wait for a deadline computed before it existed.
        if learned || p.paths.active_addr() != before {
            if let Some(t) = p.paths.next_deadline(cfg, false) {
                sooner(&mut self.deadlines, p, peer_id, t, Wake::Probe);
            }
        }
        if p.phase != Phase::Connected {
            self.refresh_phase(now, peer_id);
        }
        self.sync_indices(peer_id);
        self.note_path(peer_id);
        self.flush_queued(now, peer_id, io);
    }

    /// A session with peer `peer_id` begins after none: its paths not heard
    /// from within the NATs' UDP timeout are proven again before use (on
    /// demand, after a quiet spell, the NAT flows of a port-restricted
    /// cone are gone; traffic on such a path would vanish until its probes
    /// were lost). The handshake's own path carries traffic meanwhile.
    fn revalidate(&mut self, now: Instant, peer_id: PeerId) {
        let cfg = &self.cfg.paths;
        if let Some(p) = peer_mut(&mut self.peers, peer_id) {
            p.paths.demote_stale(now, cfg);
        }
    }

    /// Tells, once, that the path carrying peer `peer_id`'s traffic changed.
    fn note_path(&mut self, peer_id: PeerId) {
        let Some(p) = peer_mut(&mut self.peers, peer_id) else {
            return;
        };
        let new = p.paths.active().map(|a| (a.addr, a.class));
        if new == p.reported {
            return;
        }
        let old = std::mem::replace(&mut p.reported, new);
        let (node, why) = (p.info.node.clone(), p.paths.why);
        self.push_event(Event::PathChanged {
            node,
            old,
            new,
            why,
        });
    }

    /// Moves peer `peer_id` to the phase its session and paths say, and tells
    /// when it comes up or goes down.
    fn refresh_phase(&mut self, now: Instant, peer_id: PeerId) {
        let Some(p) = peer_mut(&mut self.peers, peer_id) else {
            return;
        };
        let session = p.tunnel.has_session();
        let path = p.paths.active().is_some();
        let wanted = p.wanted(now, self.cfg.keep_warm) || p.queued > 0;
        let next = match p.phase {
            _ if session && path => Phase::Connected,
            Phase::Pathless { since } if session => Phase::Pathless { since },
            _ if session => Phase::Pathless { since: now },
            Phase::Waiting { until } if now < until => Phase::Waiting { until },
            _ if p.info.stale => Phase::Stale,
            _ if wanted || p.tunnel.handshaking() => Phase::Connecting,
            _ => Phase::Idle,
        };
        let was = std::mem::replace(&mut p.phase, next);
        let node = || p.info.node.clone();
        // A session let go for want of traffic is not a peer going down.
        let event = match (was == Phase::Connected, next) {
            (false, Phase::Connected) => Some(Event::PeerUp { node: node() }),
            (true, Phase::Connected | Phase::Idle) => None,
            (true, _) => Some(Event::PeerDown { node: node() }),
            _ => None,
        };
        if let Some(e) = event {
            self.push_event(e);
        }
    }

    fn classify(&self, peer_id: PeerId, addr: PathAddr) -> Rank {
        let published = self
            .peer(peer_id)
            .and_then(|p| p.info.candidates.iter().find(|c| c.addr == addr.remote))
            .map(|c| c.class);
        crate::path::classify(&self.relay_ips, addr, published)
    }

    fn under_load(&mut self, now: Instant) -> bool {
        let (start, n) = &mut self.hs_window;
        if now.saturating_duration_since(*start) >= Duration::from_secs(1) {
            *start = now;
            *n = 0;
        }
        *n += 1;
        *n > self.cfg.handshake_load
    }

    fn per_ip_allows(&mut self, now: Instant, ip: IpAddr) -> bool {
        if self.hs_per_ip.len() > MAX_HANDSHAKE_SOURCES {
            self.hs_per_ip.clear();
        }
        // A new source starts full: `rate` handshakes at once, then `rate`
        // a second.
        let rate = self.cfg.handshake_per_ip;
        self.hs_per_ip
            .entry(ip)
            .or_insert_with(|| TokenBucket::new(rate, rate))
            .take(now)
    }

    /// A datagram that arrived on `from` and is not the NAT layer's
    /// ([`crate::wire::demux`]): one of ours (0x81-0x84), or anything else,
    /// refused as malformed.
    /// Errors are also counted in [`Overlay::stats`].
    pub fn from_network(
        &mut self,
        now: Instant,
        from: PathAddr,
        d: &[u8],
        io: &mut dyn Io,
    ) -> Result<(), Reject> {
        let r = match wire::message_type(d) {
            Some(wire::INITIATION) => self.on_initiation(now, from, d, io),
            Some(wire::RESPONSE) => self.on_response(now, from, d, io),
            Some(wire::COOKIE_REPLY) => self.on_cookie(now, from, d),
            Some(wire::TRANSPORT) => self.on_transport(now, from, d, io),
            _ => Err(Reject::Malformed),
        };
        if let Err(e) = r {
            self.count_reject(e);
            self.note_reject(now, from, d, e);
        }
        r
    }

    /// A refused handshake message that tells something about a set-up (a
    /// network key that differs, a forged or corrupted handshake): an
    /// event, bounded, attributed to the peer whose path it came by.
    fn note_reject(&mut self, now: Instant, from: PathAddr, d: &[u8], e: Reject) {
        let handshake = matches!(
            wire::message_type(d),
            Some(wire::INITIATION | wire::RESPONSE)
        );
        if e != Reject::Auth || !handshake || !self.anon_events.take(now) {
            return;
        }
        let why = if self.id.key_of(d).is_some() {
            HandshakeFailure::Crypto
        } else {
            HandshakeFailure::WrongNetworkKey
        };
        let node = self.node_at(from.remote);
        self.push_event(Event::HandshakeFailed {
            node,
            from: Some(from),
            why,
        });
    }

    /// An event about a sender that may be no peer: bounded.
    fn push_anon(&mut self, now: Instant, e: Event) {
        if self.anon_events.take(now) {
            self.push_event(e);
        }
    }

    /// The peer that publishes `addr` or was heard from it.
    fn node_at(&self, addr: SocketAddr) -> Option<String> {
        let p = self.peer(self.peer_at(addr)?)?;
        Some(p.info.node.clone())
    }

    fn peer_at(&self, addr: SocketAddr) -> Option<PeerId> {
        let found = self.peers.iter().position(|p| {
            p.as_ref().is_some_and(|p| {
                p.info.candidates.iter().any(|c| c.addr == addr)
                    || p.paths.list.iter().any(|x| x.addr.remote == addr)
            })
        })?;
        PeerId::try_from(found).ok()
    }

    /// Transport for a session we do not know, from a peer we have no
    /// session with: it still sends on one made with our previous
    /// instance (this agent restarted). Handshake now rather than leave it
    /// to notice by its path-loss timer (seconds of a one-way flow lost).
    /// Bounded: the lookup scans the peers, so it runs at most
    /// [`ANON_EVENTS`] times a second (garbage sprayed at us gets no more),
    /// and a spoofed source costs at most one initiation to that peer.
    fn unknown_session(&mut self, now: Instant, from: PathAddr) {
        if !self.stale_sessions.take(now) {
            return;
        }
        let Some(peer_id) = self.peer_at(from.remote) else {
            return;
        };
        if self.wake_peer(now, peer_id) {
            self.stats.stale_sessions += 1;
            self.tidy();
        }
    }

    /// Has peer `peer_id` handshake now, as if traffic waited for it,
    /// unless it has a session, one is being made, or it is stale.
    fn wake_peer(&mut self, now: Instant, peer_id: PeerId) -> bool {
        let Some(p) = peer_mut(&mut self.peers, peer_id) else {
            return false;
        };
        if p.tunnel.has_session() || p.tunnel.handshaking() || p.phase == Phase::Stale {
            return false;
        }
        p.used = Some(now);
        if matches!(p.phase, Phase::Idle | Phase::Waiting { .. }) {
            p.phase = Phase::Connecting;
        }
        p.tunnel.retry_now(&self.cfg.tunnel);
        sooner(&mut self.deadlines, p, peer_id, now, Wake::Changed);
        true
    }

    /// Handshakes now with these peers (idle ones included): for a
    /// restarted agent, the peers that still hold sessions with its
    /// previous instance (the store says which: they vouch for this
    /// node), so that their traffic is not one-way until their path-loss
    /// timers run. The others stay idle.
    /// A peer that has a session (or one on the way) is kept warm, as if
    /// traffic went to it: for a node cut off from the store, whose
    /// session with a few peers keeps it vouched for.
    pub fn wake(&mut self, now: Instant, nodes: &[String]) {
        for n in nodes {
            if let Some(&peer_id) = self.by_node.get(n) {
                if !self.wake_peer(now, peer_id) {
                    if let Some(p) = peer_mut(&mut self.peers, peer_id) {
                        p.used = Some(now);
                        sooner(&mut self.deadlines, p, peer_id, now, Wake::Changed);
                    }
                }
            }
        }
        self.tidy();
    }

    /// What a handshake message of length `len` must pass before any DH
    /// work is spent on it: its exact length, mac1, and under load a cookie
    /// and the per-address rate.
    fn handshake_gate(
        &mut self,
        now: Instant,
        from: PathAddr,
        d: &[u8],
        len: usize,
        io: &mut dyn Io,
    ) -> Result<(), Reject> {
        if d.len() != len {
            return Err(Reject::Malformed);
        }
        if self.id.key_of(d).is_none() {
            return Err(Reject::Auth);
        }
        if self.under_load(now) {
            let l = d.len();
            if !self
                .cookies
                .check_mac2(now, from.remote, &d[..l - 16], &d[l - 16..])
            {
                // Answer with a cookie instead of doing any DH work: a
                // flood from spoofed addresses never gets one.
                let sender = wire::u32_at(d, 4).unwrap_or(0);
                let mac1 = tunnel::mac1_of(d).unwrap_or(&[0; 16]).to_vec();
                let mut body = [0u8; 56];
                self.cookies.seal(now, from.remote, &mac1, &mut body);
                let out = io.datagram();
                wire::put_prefix(out, wire::COOKIE_REPLY);
                out[4..8].copy_from_slice(&sender.to_le_bytes());
                out[8..64].copy_from_slice(&body);
                io.commit(from, wire::COOKIE_REPLY_LEN);
                self.stats.cookies_sent += 1;
                let node = self.node_at(from.remote);
                let why = HandshakeFailure::CookieNeeded;
                let from = Some(from);
                self.push_anon(now, Event::HandshakeFailed { node, from, why });
                return Err(Reject::RateLimited);
            }
            if !self.per_ip_allows(now, from.remote.ip()) {
                return Err(Reject::RateLimited);
            }
            self.stats.mac2_accepted += 1;
        }
        Ok(())
    }

    fn on_initiation(
        &mut self,
        now: Instant,
        from: PathAddr,
        d: &[u8],
        io: &mut dyn Io,
    ) -> Result<(), Reject> {
        self.handshake_gate(now, from, d, wire::INITIATION_LEN, io)?;
        let init = tunnel::read_initiation(&self.id, &mut self.rng, d)?;
        let Some(&peer_id) = self.by_key.get(&init.peer) else {
            let why = HandshakeFailure::UnknownKey(init.peer);
            let (node, from) = (None, Some(from));
            self.push_anon(now, Event::HandshakeFailed { node, from, why });
            return Err(Reject::UnknownPeer);
        };
        let local = self.alloc_index();
        let mut msg = [0u8; wire::RESPONSE_LEN];
        // The PSK is the key the initiator sealed its mac1 with (during a
        // rotation, either of ours).
        let network_key = *self.id.key_of(d).ok_or(Reject::Auth)?;
        let tunnel = &mut peer_mut(&mut self.peers, peer_id)
            .ok_or(Reject::UnknownPeer)?
            .tunnel;
        let rekey = tunnel.has_session();
        tunnel.respond(now, init, &network_key, (local, from), &mut msg)?;
        if !rekey {
            self.revalidate(now, peer_id);
        }
        self.heard_from(now, peer_id, from, true, io);
        let out = io.datagram();
        out[..msg.len()].copy_from_slice(&msg);
        io.commit(from, msg.len());
        if let Some(p) = peer_mut(&mut self.peers, peer_id) {
            if p.paths.active_addr() == Some(from) {
                p.last_tx = Some(now);
            }
        }
        self.due_now(now, peer_id);
        self.note_handshake(peer_id, from, false, rekey);
        Ok(())
    }

    fn on_response(
        &mut self,
        now: Instant,
        from: PathAddr,
        d: &[u8],
        io: &mut dyn Io,
    ) -> Result<(), Reject> {
        self.handshake_gate(now, from, d, wire::RESPONSE_LEN, io)?;
        let receiver = wire::u32_at(d, 8).ok_or(Reject::Malformed)?;
        let peer_id = *self.index.get(&receiver).ok_or(Reject::NoSession)?;
        let tunnel = &mut peer_mut(&mut self.peers, peer_id)
            .ok_or(Reject::NoSession)?
            .tunnel;
        let rekey = tunnel.has_session();
        tunnel.on_response(now, d)?;
        if !rekey {
            self.revalidate(now, peer_id);
        }
        let sent =
            |peers: &mut [Option<Peer>]| peer_mut(peers, peer_id).map(|p| p.stats.tx_packets);
        let before = sent(&mut self.peers);
        self.heard_from(now, peer_id, from, true, io);
        // The first transport message confirms the session to the
        // responder: the frames queued for it, else a keepalive.
        if sent(&mut self.peers) == before {
            self.send_inner(
                now,
                peer_id,
                Some(from),
                Inner::plain(kind::KEEPALIVE),
                0,
                io,
            );
        }
        self.due_now(now, peer_id);
        self.note_handshake(peer_id, from, true, rekey);
        Ok(())
    }

    fn note_handshake(&mut self, peer_id: PeerId, via: PathAddr, initiator: bool, rekey: bool) {
        // A session is up: the peer's frames may come from now on, and
        // learning from them must not allocate. Not earlier: a peer never
        // spoken to costs no learning table.
        self.switch.reserve(peer_id);
        if let Some(node) = self.peer(peer_id).map(|p| p.info.node.clone()) {
            self.push_event(Event::Handshake {
                node,
                via,
                initiator,
                rekey,
            });
        }
    }

    fn on_cookie(&mut self, now: Instant, from: PathAddr, d: &[u8]) -> Result<(), Reject> {
        let receiver = wire::u32_at(d, 4).ok_or(Reject::Malformed)?;
        let peer_id = *self.index.get(&receiver).ok_or(Reject::NoSession)?;
        let p = peer_mut(&mut self.peers, peer_id).ok_or(Reject::NoSession)?;
        p.tunnel.on_cookie(now, d, from)?;
        // The peer is under load: our next handshake carries the cookie.
        let node = Some(p.info.node.clone());
        let why = HandshakeFailure::CookieNeeded;
        let from = Some(from);
        self.push_event(Event::HandshakeFailed { node, from, why });
        Ok(())
    }

    fn on_transport(
        &mut self,
        now: Instant,
        from: PathAddr,
        d: &[u8],
        io: &mut dyn Io,
    ) -> Result<(), Reject> {
        let receiver = wire::u32_at(d, 4).ok_or(Reject::Malformed)?;
        let Some(&peer_id) = self.index.get(&receiver) else {
            self.unknown_session(now, from);
            return Err(Reject::NoSession);
        };
        let tcfg = &self.cfg.tunnel;
        let p = peer_mut(&mut self.peers, peer_id).ok_or(Reject::NoSession)?;
        let n = match p.tunnel.decrypt(now, tcfg, receiver, d, &mut self.scratch) {
            Ok(n) => n,
            Err(e) => {
                match e {
                    Reject::Replay => p.stats.replay += 1,
                    Reject::Auth => p.stats.auth += 1,
                    _ => {}
                }
                return Err(e);
            }
        };
        p.stats.rx_packets += 1;
        p.stats.rx_bytes += d.len() as u64;
        let keepalive = Inner::parse(&self.scratch[..n]).is_some_and(|i| i.kind == kind::KEEPALIVE);
        self.heard_from(now, peer_id, from, !keepalive, io);
        let inner = Inner::parse(&self.scratch[..n]).ok_or(Reject::Malformed)?;
        // A broadcast or multicast frame keeps no session warm (see
        // `Overlay::flood`): its first byte is the destination MAC's.
        let flood = inner.kind == kind::POD_FRAME
            && self.scratch.get(INNER_HEADER).is_some_and(|b| b & 1 == 1);
        if matches!(inner.kind, kind::POD_FRAME | kind::HOST_PACKET) && !flood {
            let busy = self.cfg.busy;
            if let Some(p) = peer_mut(&mut self.peers, peer_id) {
                let was_busy = p.busy(now, busy);
                p.used = Some(now);
                p.got_data = Some(now);
                if !was_busy {
                    // Traffic starts: its paths are probed from now on
                    // (the responder of a new session too, whose unproven
                    // paths must punch while the initiator's do), not
                    // from the deadline computed while it was quiet.
                    sooner(&mut self.deadlines, p, peer_id, now, Wake::Probe);
                }
            }
        }
        let body = INNER_HEADER..n;
        // A checksum position outside the frame would make the device
        // refuse the write (or the completion fail): drop it here.
        if inner.csum_offset != 0
            && usize::from(inner.csum_start) + usize::from(inner.csum_offset) + 2 > n - INNER_HEADER
        {
            return Err(Reject::Malformed);
        }
        match inner.kind {
            kind::KEEPALIVE => Ok(()),
            kind::POD_FRAME => {
                match self
                    .switch
                    .from_peer(now, peer_id, &self.scratch[body.clone()])
                {
                    PeerVerdict::Deliver => io.pod(&mut self.scratch[body], csum_of(inner)),
                    PeerVerdict::Drop(r) => self.drop_from_peer(peer_id, r),
                }
                Ok(())
            }
            kind::HOST_PACKET => {
                match self
                    .switch
                    .host_from_peer(peer_id, &self.scratch[body.clone()])
                {
                    PeerVerdict::Deliver => io.host(&mut self.scratch[body], csum_of(inner)),
                    PeerVerdict::Drop(r) => self.drop_from_peer(peer_id, r),
                }
                Ok(())
            }
            kind::PROBE | kind::PROBE_REPLY => self.on_probe(now, peer_id, from, inner.kind, n, io),
            kind::PUNCH => {
                self.on_cue(now, peer_id, n);
                Ok(())
            }
            kind::HUNT => {
                self.on_hunt(now, peer_id, n, io);
                Ok(())
            }
            // A kind from a newer version: authenticated, so not an attack;
            // ignore it.
            _ => Ok(()),
        }
    }

    /// A probe (answered on the path it came by) or a probe's reply, in
    /// the first `n` bytes of the scratch.
    fn on_probe(
        &mut self,
        now: Instant,
        peer_id: PeerId,
        from: PathAddr,
        inner_kind: u8,
        n: usize,
        io: &mut dyn Io,
    ) -> Result<(), Reject> {
        let id = wire::u64_at(&self.scratch[..n], INNER_HEADER).ok_or(Reject::Malformed)?;
        if inner_kind == kind::PROBE {
            // Within what was decrypted: the scratch beyond holds an
            // earlier plaintext, which an empty probe used to echo.
            self.scratch[INNER_HEADER..INNER_HEADER + 8].copy_from_slice(&id.to_le_bytes());
            // Answer on the path it came by: that is the path being
            // checked.
            let reply = Inner::plain(kind::PROBE_REPLY);
            self.send_inner(now, peer_id, Some(from), reply, 8, io);
            return Ok(());
        }
        let cfg = &self.cfg.paths;
        if let Some(p) = peer_mut(&mut self.peers, peer_id) {
            p.paths.on_probe_reply(now, cfg, id);
            if let Some(t) = p.paths.next_deadline(cfg, false) {
                sooner(&mut self.deadlines, p, peer_id, t, Wake::Probe);
            }
        }
        self.refresh_phase(now, peer_id);
        self.note_path(peer_id);
        Ok(())
    }

    /// The punching coordinator's cue, in the first `n` bytes of the
    /// scratch: our silence ends when it says.
    fn on_cue(&mut self, now: Instant, peer_id: PeerId, n: usize) {
        let Some(cue) = self.scratch.get(INNER_HEADER..n).and_then(Cue::parse) else {
            return;
        };
        let coordinator = self.id.keys.public().as_slice() < self.peer_key(peer_id).as_slice();
        let cfg = &self.cfg.punch;
        if let Some(p) = peer_mut(&mut self.peers, peer_id) {
            tracing::debug!(peer = %p.info.node, attempt = cue.attempt, delay = ?cue.delay, "punch: cue received");
            p.punch.on_cue(now, cue, coordinator);
            p.paths.mute = p.punch.muted(now);
            if let Some(t) = p.punch.deadline(cfg) {
                sooner(&mut self.deadlines, p, peer_id, t, Wake::Probe);
            }
        }
    }

    fn peer_key(&self, peer_id: PeerId) -> Key {
        self.peer(peer_id).map(|p| p.info.key).unwrap_or_default()
    }

    /// Moves peer `peer_id`'s punching schedule on: mutes or wakes its
    /// direct paths, and sends the coordinator's cue over the working path.
    fn punch_tick(&mut self, now: Instant, peer_id: PeerId, io: &mut dyn Io) {
        let coordinator = self.id.keys.public().as_slice() < self.peer_key(peer_id).as_slice();
        let jitter = self.cfg.punch.jitter.mul_f64(self.rng.gen_range(0.0..=1.0));
        // Copies (no heap): the cue is sent through `&mut self`.
        let (pcfg, cfg) = (&self.cfg.paths.clone(), &self.cfg.punch.clone());
        let Some(p) = peer_mut(&mut self.peers, peer_id) else {
            return;
        };
        let pending = p.paths.direct_pending(pcfg);
        let rtt = p.paths.cue_rtt(pcfg).unwrap_or_default();
        let action = p.punch.tick(now, cfg, pending, coordinator, rtt, jitter);
        let was_muted = p.paths.mute;
        p.paths.mute = p.punch.muted(now);
        p.paths.punching = p.punch.coordinated();
        if p.paths.mute != was_muted {
            tracing::debug!(peer = %p.info.node, attempt = p.punch.attempt, mute = p.paths.mute, "punch");
        }
        match action {
            Action::None => {}
            Action::Start => {
                tracing::debug!(peer = %p.info.node, attempt = p.punch.attempt, "punch: attempt starts");
                p.paths.wake_direct(now, pcfg)
            }
            Action::Cue(cue) => {
                tracing::debug!(peer = %p.info.node, attempt = cue.attempt, "punch: cue sent");
                // On every path that answers, not the active one alone: a
                // lost cue leaves the other side retrying on its own, out
                // of step (it then sends first into a bare router, which
                // poisons the next attempt), and a relayed path whose NAT
                // flow lapsed loses it silently.
                let mut to = [None; crate::path::MAX_CUE_PATHS];
                for (slot, x) in to.iter_mut().zip(p.paths.cue_paths(pcfg)) {
                    *slot = Some(x.addr);
                }
                cue.write(&mut self.scratch[INNER_HEADER..INNER_HEADER + Cue::LEN]);
                for addr in to.into_iter().flatten() {
                    let inner = Inner::plain(kind::PUNCH);
                    self.send_inner(now, peer_id, Some(addr), inner, Cue::LEN, io);
                }
                // Its own start may be now (it leads).
                if let Some(p) = peer_mut(&mut self.peers, peer_id) {
                    if p.punch.tick(now, cfg, pending, coordinator, rtt, jitter) == Action::Start {
                        p.paths.wake_direct(now, pcfg);
                    }
                    p.paths.mute = p.punch.muted(now);
                }
            }
        }
    }

    fn drop_from_peer(&mut self, peer_id: PeerId, r: DropReason) {
        if let Some(p) = peer_mut(&mut self.peers, peer_id) {
            p.stats.dropped += 1;
            if r == DropReason::Spoofed {
                p.stats.spoofed += 1;
            }
        }
        self.count_drop(r);
    }

    /// Encrypts `scratch[..INNER_HEADER + body]` (header written here) to
    /// peer `peer_id` on `to` (default: its active path) and sends it.
    fn send_inner(
        &mut self,
        now: Instant,
        peer_id: PeerId,
        to: Option<PathAddr>,
        inner: Inner,
        body: usize,
        io: &mut dyn Io,
    ) -> bool {
        let Some(p) = peer_mut(&mut self.peers, peer_id) else {
            return false;
        };
        let Some(to) = to.or_else(|| p.paths.active_addr()) else {
            self.stats.no_path += 1;
            return false;
        };
        inner.write(&mut self.scratch[..INNER_HEADER]);
        let plain = &self.scratch[..INNER_HEADER + body];
        match p
            .tunnel
            .encrypt(now, &self.cfg.tunnel, plain, io.datagram())
        {
            Some(n) => {
                p.stats.tx_packets += 1;
                p.stats.tx_bytes += n as u64;
                if p.paths.active_addr() == Some(to) {
                    p.last_tx = Some(now);
                }
                io.commit(to, n);
                true
            }
            None => {
                self.stats.no_path += 1;
                false
            }
        }
    }

    /// A frame the local bridge sent into the TAP, with its vnet header
    /// (all zero when the device has no offloads).
    pub fn from_pod(&mut self, now: Instant, hdr: &VnetHdr, frame: &[u8], io: &mut dyn Io) {
        let gso = hdr.gso_type != 0;
        if gso && self.gso_too_big(hdr, frame, io) {
            return;
        }
        match self.switch.from_local(now, frame, gso, &mut self.reply) {
            LocalVerdict::Unicast(peer_id) => self.send_frame(
                now,
                peer_id,
                kind::POD_FRAME,
                hdr,
                frame,
                Framing::Ethernet,
                io,
            ),
            LocalVerdict::Flood => self.flood(now, hdr, frame, io),
            LocalVerdict::Reply(n) => {
                let n = n.min(self.reply.len());
                io.pod(&mut self.reply[..n], Csum::Complete);
            }
            LocalVerdict::Drop(r) => self.count_drop(r),
        }
    }

    /// A broadcast, multicast or unknown-unicast frame: to every peer in
    /// use (up, or its handshake under way: queued), not to idle ones.
    /// ARP and ND never come here (answered locally, or sent to the owner
    /// of the target, which wakes that one peer); what does is IP
    /// broadcast and multicast, which Kubernetes' network model does not
    /// carry between nodes, and unicast to an address no peer owns, which
    /// every peer drops as transit. Waking every idle peer for it would
    /// cost n handshakes per broadcast, and any pod that announces itself
    /// (mDNS, SSDP) would keep the full mesh up. For the same reason a
    /// flood does not count as use: it keeps no session warm.
    fn flood(&mut self, now: Instant, hdr: &VnetHdr, frame: &[u8], io: &mut dyn Io) {
        for peer_id in 0..self.peers.len() as PeerId {
            let Some(p) = self.peer(peer_id) else {
                continue;
            };
            if !(p.tunnel.has_session() || p.tunnel.handshaking() || p.queued > 0) {
                self.stats.flood_idle += 1;
                continue;
            }
            let (used, sent) = (p.used, p.sent_data);
            let eth = Framing::Ethernet;
            self.send_frame(now, peer_id, kind::POD_FRAME, hdr, frame, eth, io);
            if let Some(p) = peer_mut(&mut self.peers, peer_id) {
                (p.used, p.sent_data) = (used, sent);
            }
        }
    }

    /// A TSO super-frame whose segments would not fit the tunnel (a pod
    /// whose MTU is larger than the overlay's): answered like an oversized
    /// frame, with "fragmentation needed" / "packet too big", so the sender
    /// lowers its segment size instead of losing every segment.
    fn gso_too_big(&mut self, hdr: &VnetHdr, frame: &[u8], io: &mut dyn Io) -> bool {
        let l4 = usize::from(hdr.csum_start);
        let Some(off) = frame.get(l4 + 12) else {
            return false;
        };
        let seg_l3 = l4.saturating_sub(14) + usize::from(off >> 4) * 4 + usize::from(hdr.gso_size);
        if seg_l3 <= self.cfg.mtu {
            return false;
        }
        let mtu = self.cfg.mtu;
        let n = match frame.get(12..14) {
            Some([0x08, 0x00]) => {
                crate::packet::build_icmpv4_frag_needed(frame, mtu as u16, &mut self.reply)
            }
            Some([0x86, 0xdd]) => {
                crate::packet::build_icmpv6_packet_too_big(frame, mtu as u32, &mut self.reply)
            }
            _ => None,
        };
        match n {
            Some(n) => io.pod(&mut self.reply[..n], Csum::Complete),
            None => self.count_drop(DropReason::TooBig),
        }
        true
    }

    /// A packet the host sent into the host-overlay interface.
    pub fn from_host(&mut self, now: Instant, hdr: &VnetHdr, packet: &[u8], io: &mut dyn Io) {
        match self.switch.host_from_local(packet) {
            LocalVerdict::Unicast(peer_id) => self.send_frame(
                now,
                peer_id,
                kind::HOST_PACKET,
                hdr,
                packet,
                Framing::Ip,
                io,
            ),
            LocalVerdict::Drop(r) => self.count_drop(r),
            LocalVerdict::Flood | LocalVerdict::Reply(_) => self.count_drop(DropReason::NoRoute),
        }
    }

    /// Cuts a (possibly TSO) frame into segments and sends each as one
    /// transport message.
    #[allow(clippy::too_many_arguments)]
    fn send_frame(
        &mut self,
        now: Instant,
        peer_id: PeerId,
        k: u8,
        hdr: &VnetHdr,
        frame: &[u8],
        framing: Framing,
        io: &mut dyn Io,
    ) {
        let Some(p) = peer_mut(&mut self.peers, peer_id) else {
            return;
        };
        let passive = self.cfg.keep_warm.is_some();
        let recheck = passive && (!p.busy(now, self.cfg.busy) || p.answered());
        p.used = Some(now);
        p.sent_data = Some(now);
        let up = p.tunnel.has_session() && p.paths.active().is_some();
        if !up && p.phase != Phase::Stale {
            self.enqueue(now, peer_id, k, hdr, frame, framing);
            return;
        }
        if up && recheck {
            // The first frame after a quiet spell, or the first since the
            // peer last answered: if nothing comes back, its path is
            // checked an interval from now.
            let at = self.on_grid(now + self.cfg.paths.active_interval);
            if let Some(p) = peer_mut(&mut self.peers, peer_id) {
                sooner(&mut self.deadlines, p, peer_id, at, Wake::Probe);
            }
        }
        let Ok(mut segs) = segments(hdr, frame, framing) else {
            self.count_drop(DropReason::Malformed);
            return;
        };
        while let Ok(Some((n, csum))) = segs.next_into(&mut self.scratch[INNER_HEADER..]) {
            let inner = match csum {
                Csum::Partial { start, offset } => Inner {
                    kind: k,
                    csum_offset: offset as u8,
                    csum_start: start,
                },
                Csum::Complete => Inner::plain(k),
            };
            if !self.send_inner(now, peer_id, None, inner, n, io) {
                break;
            }
        }
    }

    /// Holds a frame for peer `peer_id` until its session is up, and has the
    /// handshake start at the next wake (on demand).
    #[allow(clippy::too_many_arguments)]
    fn enqueue(
        &mut self,
        now: Instant,
        peer_id: PeerId,
        kind: u8,
        hdr: &VnetHdr,
        frame: &[u8],
        framing: Framing,
    ) {
        let Some(p) = peer_mut(&mut self.peers, peer_id) else {
            return;
        };
        let len = frame.len();
        let fits = p.queued < QUEUE_PER_PEER
            && p.queued_bytes + len <= QUEUE_BYTES_PER_PEER
            && self.queue_bytes + len <= QUEUE_BYTES_TOTAL;
        if fits {
            p.queued += 1;
            p.queued_bytes += len;
            self.queue_bytes += len;
            self.stats.queued += 1;
            self.queue.push_back(Queued {
                peer_id,
                at: now,
                kind,
                hdr: *hdr,
                framing,
                frame: frame.to_vec(),
            });
            self.stats.queue_len = self.queue.len();
        } else {
            self.stats.queue_drops += 1;
        }
        let start = match p.phase {
            // Traffic is reason enough not to wait for the tie-break.
            Phase::Waiting { .. } => {
                p.phase = Phase::Connecting;
                true
            }
            Phase::Idle => true,
            Phase::Connecting => !p.tunnel.handshaking(),
            _ => false,
        };
        if start {
            p.tunnel.retry_now(&self.cfg.tunnel);
            sooner(&mut self.deadlines, p, peer_id, now, Wake::Changed);
            self.tidy();
        }
    }

    /// Sends the frames queued for peer `peer_id` once it is up, in order.
    fn flush_queued(&mut self, now: Instant, peer_id: PeerId, io: &mut dyn Io) {
        let Some(p) = peer_mut(&mut self.peers, peer_id) else {
            return;
        };
        if p.queued == 0 || !p.tunnel.has_session() || p.paths.active().is_none() {
            return;
        }
        (p.queued, p.queued_bytes) = (0, 0);
        for _ in 0..self.queue.len() {
            let Some(q) = self.queue.pop_front() else {
                break;
            };
            if q.peer_id != peer_id {
                self.queue.push_back(q);
                continue;
            }
            self.queue_bytes -= q.frame.len();
            if now.saturating_duration_since(q.at) >= QUEUE_AGE {
                self.stats.queue_drops += 1;
                continue;
            }
            self.send_frame(now, peer_id, q.kind, &q.hdr, &q.frame, q.framing, io);
        }
        self.stats.queue_len = self.queue.len();
    }

    /// Drops peer `peer_id`'s queued frames older than [`QUEUE_AGE`].
    fn expire_queued(&mut self, now: Instant, peer_id: PeerId) {
        let (mut frames, mut bytes) = (0, 0);
        self.queue.retain(|q| {
            let old = q.peer_id == peer_id && now.saturating_duration_since(q.at) >= QUEUE_AGE;
            if old {
                frames += 1;
                bytes += q.frame.len();
            }
            !old
        });
        self.queue_bytes -= bytes;
        self.stats.queue_drops += frames as u64;
        self.stats.queue_len = self.queue.len();
        if let Some(p) = peer_mut(&mut self.peers, peer_id) {
            p.queued -= frames;
            p.queued_bytes -= bytes;
        }
    }

    /// Drops the frames queued for peer `peer_id` (gone, or its handshake
    /// failed).
    fn drop_queued(&mut self, peer_id: PeerId) {
        let before = self.queue.len();
        let mut bytes = 0;
        self.queue.retain(|q| {
            let mine = q.peer_id == peer_id;
            if mine {
                bytes += q.frame.len();
            }
            !mine
        });
        self.queue_bytes -= bytes;
        self.stats.queue_drops += (before - self.queue.len()) as u64;
        self.stats.queue_len = self.queue.len();
        if let Some(p) = peer_mut(&mut self.peers, peer_id) {
            (p.queued, p.queued_bytes) = (0, 0);
        }
    }

    /// Runs the timers that are due: handshakes (initial, retransmitted,
    /// rekey), path probes, expiry. Call when [`Overlay::poll_timeout`] has
    /// passed; peers whose deadline has not come are not looked at.
    pub fn handle_timeout(&mut self, now: Instant, wall: Duration, io: &mut dyn Io) {
        self.stats.wakes += 1;
        if now >= self.housekeeping {
            tracing::trace!("overlay wake: housekeeping");
            // A full bucket is what a new source gets: forgetting it changes
            // no decision, and keeps the table to the sources still limited.
            self.hs_per_ip.retain(|_, b| !b.idle(now));
            self.switch.expire(now);
            self.hunt_housekeeping(now, io);
            self.housekeeping = self.on_grid(now + HOUSEKEEPING);
        }
        let mut due = std::mem::take(&mut self.due);
        due.clear();
        while let Some(peer_id) = self
            .deadlines
            .pop_due(now, |at, peer_id| is_due_at(&self.peers, at, peer_id))
        {
            due.push(peer_id);
        }
        for &peer_id in &due {
            // Listed twice, or already run: its deadline moved on.
            let Some(p) = self
                .peer(peer_id)
                .filter(|p| p.deadline.is_some_and(|d| d <= now))
            else {
                continue;
            };
            tracing::trace!(peer = %p.info.node, reason = ?p.wake, "overlay wake");
            self.run_peer(now, wall, peer_id, io);
        }
        self.due = due;
        self.tidy();
    }

    /// One peer's timers, then its next deadline.
    fn run_peer(&mut self, now: Instant, wall: Duration, peer_id: PeerId, io: &mut dyn Io) {
        self.stats.peer_runs += 1;
        if self.peer(peer_id).is_some_and(|p| p.queued > 0) {
            self.expire_queued(now, peer_id);
        }
        self.refresh_phase(now, peer_id);
        let keep_warm = self.cfg.keep_warm;
        let Some(p) = peer_mut(&mut self.peers, peer_id) else {
            return;
        };
        if let Phase::Pathless { since } = p.phase {
            if now.saturating_duration_since(since) >= self.cfg.path_loss_rehandshake {
                // The peer restarted and lost its keys, or every path broke:
                // handshake again on every path (if it is still wanted;
                // else it is idle now).
                p.tunnel.reset();
                p.paths.reset(now);
            }
        }
        let wanted = !matches!(p.phase, Phase::Waiting { .. } | Phase::Stale)
            && (p.wanted(now, keep_warm) || p.queued > 0);
        let action = p.tunnel.tick(now, &self.cfg.tunnel, wanted);
        let gave_up = p.queued > 0 && !p.tunnel.handshaking() && !p.tunnel.has_session();
        if action == TimerAction::Initiate {
            self.send_initiation(now, wall, peer_id, io);
        } else if gave_up {
            // A handshake round ran out of time: its frames are stale.
            self.drop_queued(peer_id);
        }
        self.probe_paths(now, peer_id, io);
        self.sync_indices(peer_id);
        self.refresh_phase(now, peer_id);
        self.note_path(peer_id);
        self.set_deadline(now, peer_id);
        if let Some(p) = peer_mut(&mut self.peers, peer_id) {
            if let Some(at) = p.punch.start_at() {
                sooner(&mut self.deadlines, p, peer_id, at, Wake::Probe);
            }
        }
    }

    /// Sends the probes due on peer `peer_id`'s paths and reports what died.
    fn probe_paths(&mut self, now: Instant, peer_id: PeerId, io: &mut dyn Io) {
        let Some(p) = peer_mut(&mut self.peers, peer_id) else {
            return;
        };
        if !p.tunnel.has_session() {
            return;
        }
        if !self
            .cfg
            .keep_warm
            .is_none_or(|_| p.busy(now, self.cfg.busy))
        {
            // No traffic: nothing is probed; a NAT on the path gets what
            // holds its mapping.
            self.keepalive_if_due(now, peer_id, io);
            return;
        }
        if self.cfg.keep_warm.is_some() && p.answered() {
            // Heard from since the last frame went: the path works.
            p.paths.defer_active(now, &self.cfg.paths);
        }
        self.punch_tick(now, peer_id, io);
        self.hunt_tick(now, peer_id, io);
        let Some(p) = peer_mut(&mut self.peers, peer_id) else {
            return;
        };
        self.probes.clear();
        self.dead_relays.clear();
        let before = p.paths.active_addr();
        p.paths.poll(
            now,
            &self.cfg.paths,
            &mut self.probe_id,
            &mut self.probes,
            &mut self.dead_relays,
        );
        if before.is_some() && p.paths.active_addr() != before {
            let node = p.info.node.clone();
            self.push_event(Event::ActivePathLost { node });
        }
        for i in 0..self.dead_relays.len() {
            self.push_event(Event::RelaySuspect(self.dead_relays[i]));
        }
        let probes = std::mem::take(&mut self.probes);
        for d in &probes {
            self.scratch[INNER_HEADER..INNER_HEADER + 8].copy_from_slice(&d.id.to_le_bytes());
            self.send_inner(now, peer_id, Some(d.addr), Inner::plain(kind::PROBE), 8, io);
        }
        self.probes = probes;
        // After the probes: one on the active path holds its flow too.
        if self.cfg.keep_warm.is_some() {
            self.keepalive_if_due(now, peer_id, io);
        }
    }

    /// A keepalive on peer `peer_id`'s active path if nothing went on it
    /// for [`Peer::keepalive_every`].
    fn keepalive_if_due(&mut self, now: Instant, peer_id: PeerId, io: &mut dyn Io) {
        let Some(p) = self.peer(peer_id) else {
            return;
        };
        let Some(every) = p.keepalive_every(now, &self.cfg) else {
            return;
        };
        let quiet = p
            .last_tx
            .is_none_or(|t| now.saturating_duration_since(t) >= every);
        if quiet {
            self.send_inner(now, peer_id, None, Inner::plain(kind::KEEPALIVE), 0, io);
        }
    }

    /// Stores when peer `peer_id`'s timers next run, and why.
    fn set_deadline(&mut self, now: Instant, peer_id: PeerId) {
        let (tcfg, pcfg) = (&self.cfg.tunnel, &self.cfg.paths);
        let Some(p) = self.peer(peer_id) else {
            return;
        };
        let keep_warm = self.cfg.keep_warm;
        let wanted = !matches!(p.phase, Phase::Waiting { .. } | Phase::Stale)
            && (p.wanted(now, keep_warm) || p.queued > 0);
        let busy = keep_warm.is_none() || p.busy(now, self.cfg.busy);
        let mut next: Option<(Instant, Wake)> = None;
        let mut at = |t: Option<Instant>, why: Wake| {
            if let Some(t) = t.filter(|t| next.is_none_or(|(n, _)| *t < n)) {
                next = Some((t, why));
            }
        };
        if let Phase::Waiting { until } = p.phase {
            at(Some(until), Wake::Waiting);
        }
        at(p.tunnel.next_deadline(tcfg, wanted), Wake::Tunnel);
        if p.tunnel.has_session() && busy {
            // The active path waits for a frame to go unanswered
            // (`send_frame` schedules that check).
            let passive = keep_warm.is_some() && p.answered();
            at(p.paths.next_deadline(pcfg, passive), Wake::Probe);
            at(p.punch.deadline(&self.cfg.punch), Wake::Probe);
            at(self.hunt_deadline(peer_id), Wake::Probe);
            // When traffic stops, the NAT keepalive takes over.
            let quiet = keep_warm.and(p.used).map(|t| t + self.cfg.busy);
            at(quiet, Wake::Keepalive);
            // Meanwhile, while the peer's frames come in, our side of its
            // path is held open tighter.
            if let Some(d) = keep_warm.and(p.keepalive_every(now, &self.cfg)) {
                let last = p.last_tx.unwrap_or(now);
                at(Some(last + d), Wake::Keepalive);
            }
        } else if p.tunnel.has_session() && p.behind_nat() {
            let last = p.last_tx.unwrap_or(now);
            at(Some(last + self.cfg.nat_keepalive), Wake::Keepalive);
        }
        if let Phase::Pathless { since } = p.phase {
            at(Some(since + self.cfg.path_loss_rehandshake), Wake::Pathless);
        }
        // Its timers just ran: nothing more is due before the next grid
        // step (a deadline in the past would wake the caller at once, and
        // again). Nothing due at all (idle): no deadline.
        let next = next.map(|(t, why)| (self.on_grid(t.max(now + Duration::from_nanos(1))), why));
        if let Some(p) = peer_mut(&mut self.peers, peer_id) {
            match next {
                Some((t, why)) if p.deadline != Some(t) => {
                    p.deadline = Some(t);
                    p.wake = why;
                    self.deadlines.push(t, peer_id);
                }
                Some(_) => {}
                None => p.deadline = None,
            }
        }
    }

    /// `t` rounded up to the timer grid: every peer's probes and
    /// retransmissions due within one grid step are handled in one wake-up,
    /// so an idle agent wakes a few times a second however many peers it
    /// has (its timers are a second or longer; a step delays them little).
    fn on_grid(&self, t: Instant) -> Instant {
        let step = TIMER_GRID.as_nanos();
        let since = t.saturating_duration_since(self.epoch).as_nanos();
        let up = since.div_ceil(step) * step;
        self.epoch + Duration::from_nanos(u64::try_from(up).unwrap_or(u64::MAX))
    }

    fn send_initiation(&mut self, now: Instant, wall: Duration, peer_id: PeerId, io: &mut dyn Io) {
        let local = self.alloc_index();
        let mut msg = [0u8; wire::INITIATION_LEN];
        let Some(p) = peer_mut(&mut self.peers, peer_id) else {
            return;
        };
        // A retransmission: the last initiation went unanswered. Said once
        // the round is older than the longest retry wait, not for the
        // quick first retries of a start-up.
        let timeout = p.tunnel.pending_since().and_then(|(started, attempts)| {
            let waited = now.saturating_duration_since(started);
            (waited >= self.cfg.tunnel.rekey_timeout)
                .then_some(HandshakeFailure::Timeout { waited, attempts })
        });
        if p.tunnel
            .initiate(&self.id, &mut self.rng, now, wall, local, &mut msg)
            .is_err()
        {
            return;
        }
        let targets: Vec<PathAddr> = (p.paths)
            .handshake_targets(MAX_HANDSHAKE_TARGETS, &self.cfg.paths)
            .collect();
        for &t in &targets {
            let out = io.datagram();
            out[..msg.len()].copy_from_slice(&msg);
            // mac2 with the cookie of that path, if the peer gave one.
            p.tunnel.put_mac2(now, &mut out[..msg.len()], t);
            io.commit(t, msg.len());
        }
        if let Some(why) = timeout {
            let node = Some(p.info.node.clone());
            self.push_event(Event::HandshakeFailed {
                node,
                from: None,
                why,
            });
        }
        self.sync_indices(peer_id);
    }

    /// The state of every peer, for `peers` and metrics.
    pub fn status(&self) -> Vec<PeerStatus> {
        let pc = &self.cfg.paths;
        self.peers
            .iter()
            .flatten()
            .map(|p| {
                let active = p.paths.active();
                let state = match p.phase {
                    Phase::Connected => PeerState::Connected,
                    Phase::Idle => PeerState::Idle,
                    Phase::Pathless { .. } if !p.info.stale => PeerState::Connecting,
                    Phase::Connecting if p.tunnel.handshaking() => PeerState::Connecting,
                    _ => PeerState::Down,
                };
                PeerStatus {
                    node: p.info.node.clone(),
                    key: p.info.key,
                    pod_subnet: p.info.pod_subnet,
                    host_addr: p.info.host_addr,
                    host_addr6: p.info.host_addr6,
                    state,
                    relayed: active.map(|a| a.class == Rank::Relay),
                    path: active.map(|a| a.addr),
                    method: active.map(|a| a.method()),
                    rtt: active.and_then(|a| a.rtt),
                    session_born: p.tunnel.session_born(),
                    path_changed: p.paths.changed,
                    stats: PeerStats {
                        handshakes: p.tunnel.handshakes,
                        ..p.stats
                    },
                    paths: p.paths.list.len(),
                    alive_paths: p.paths.list.iter().filter(|x| x.alive(pc)).count(),
                }
            })
            .collect()
    }

    /// Learned-table sizes of the switch (metrics).
    pub fn switch_stats(&self) -> crate::l2::SwitchStats {
        self.switch.stats()
    }

    /// Peer `node` in depth, for `peers --explain`.
    pub fn peer_detail(&self, node: &str) -> Option<PeerDetail> {
        let p = self.peer(*self.by_node.get(node)?)?;
        let status = self.status().into_iter().find(|s| s.node == node)?;
        Some(PeerDetail {
            status,
            candidates: p.info.candidates.clone(),
            paths: (p.paths.list.iter())
                .map(|x| (x.clone(), x.alive(&self.cfg.paths)))
                .collect(),
            path_why: p.paths.why,
            handshake: p.tunnel.pending_since(),
            stale: p.info.stale,
        })
    }
}

/// One peer in depth ([`Overlay::peer_detail`]).
#[derive(Debug, Clone)]
pub struct PeerDetail {
    pub status: PeerStatus,
    /// What its record publishes (those inside the overlay's own ranges
    /// are not tried).
    pub candidates: Vec<PeerCandidate>,
    /// Every path known, and whether it is alive.
    pub paths: Vec<(crate::path::Path, bool)>,
    /// Why the path in use is the one (or why there is none).
    pub path_why: PathWhy,
    /// The handshake round in progress: when it started, initiations sent.
    pub handshake: Option<(Instant, u32)>,
    pub stale: bool,
}

/// Keys that more than one record claims, with the nodes claiming each. A
/// record is believed for the key it names; two records naming one key mean
/// a store writer claims someone else's (the victim's traffic would be
/// dropped as spoofed and its tunnel reset on every update), or a renamed
/// node's old record has not expired yet: neither is believed until one of
/// them goes.
pub fn shared_keys(infos: &[PeerInfo]) -> Vec<(Key, Vec<String>)> {
    let mut by_key: HashMap<Key, Vec<String>> = HashMap::new();
    for i in infos {
        by_key.entry(i.key).or_default().push(i.node.clone());
    }
    let mut shared: Vec<(Key, Vec<String>)> =
        by_key.into_iter().filter(|(_, n)| n.len() > 1).collect();
    shared.sort();
    shared
}

/// Moves peer `peer_id`'s deadline to `at` if that is sooner (or it had none).
fn sooner(deadlines: &mut Deadlines, p: &mut Peer, peer_id: PeerId, at: Instant, why: Wake) {
    if p.deadline.is_none_or(|d| at < d) {
        p.deadline = Some(at);
        p.wake = why;
        deadlines.push(at, peer_id);
    }
}

/// Whether a heap entry (`at`, `peer_id`) is peer `peer_id`'s current deadline.
fn is_due_at(peers: &[Option<Peer>], at: Instant, peer_id: PeerId) -> bool {
    peers
        .get(peer_id as usize)
        .and_then(Option::as_ref)
        .is_some_and(|p| p.deadline == Some(at))
}

/// The overlay's own ranges by prefix length: an address is looked up in
/// one set per distinct length (two or three), not against every peer's
/// subnet, so that `set_peers` stays O(n).
struct Ranges(HashMap<(bool, u8), std::collections::HashSet<IpNet>>);

impl Ranges {
    fn new(nets: Vec<IpNet>) -> Ranges {
        let mut m: HashMap<(bool, u8), std::collections::HashSet<IpNet>> = HashMap::new();
        for n in nets {
            let n = n.trunc();
            m.entry((n.addr().is_ipv6(), n.prefix_len()))
                .or_default()
                .insert(n);
        }
        Ranges(m)
    }

    fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|((v6, len), set)| {
            *v6 == ip.is_ipv6() && IpNet::new(ip, *len).is_ok_and(|n| set.contains(&n.trunc()))
        })
    }
}

/// Where the peer's NAT maps its datagrams now, when a relay tells: a
/// datagram relayed to us through our allocation from `from` that is not
/// the peer's own allocation left the peer's socket through its NAT, and
/// the relay saw that mapping. A bare Linux gateway gives a node's new
/// flows the port of its newest flow, which after one clash differs from
/// the port its long-lived STUN flow shows (docs/natlab.md, "Why the
/// bare-gateway lab pair was flaky"): the peer's published address is
/// then wrong for every new flow, and only this address is right. Only an
/// IP the peer publishes (a direct candidate of it) is taken: nothing
/// aims our probes at a third party.
fn relayed_source(relay_ips: &[IpAddr], info: &PeerInfo, from: PathAddr) -> Option<SocketAddr> {
    if !matches!(from.via, Via::Turn(_)) || relay_ips.contains(&from.remote.ip()) {
        return None;
    }
    let published = |c: &&PeerCandidate| c.class != Rank::Relay;
    let cands = || info.candidates.iter().filter(published);
    let ours = cands().any(|c| c.addr.ip() == from.remote.ip());
    let known = cands().any(|c| c.addr == from.remote);
    (ours && !known).then_some(from.remote)
}

/// Peer `peer_id`, if it is still there. A free function rather than a method so
/// that callers can hold it while they read the engine's other fields.
fn peer_mut(peers: &mut [Option<Peer>], peer_id: PeerId) -> Option<&mut Peer> {
    peers.get_mut(peer_id as usize).and_then(Option::as_mut)
}

fn csum_of(inner: Inner) -> Csum {
    if inner.csum_offset == 0 {
        Csum::Complete
    } else {
        Csum::Partial {
            start: inner.csum_start,
            offset: u16::from(inner.csum_offset),
        }
    }
}

mod hunting;
pub use hunting::HuntStats;

#[cfg(test)]
mod tests;
