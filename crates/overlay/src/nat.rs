//! NAT traversal, sans-IO: STUN (RFC 8489) for the server-reflexive
//! candidates and TURN (RFC 8656) allocations for the relayed ones, over the
//! agent's UDP socket or over TCP to the TURN server for sites where UDP
//! cannot get out. The protocol work is done by `stun-proto` and
//! `turn-client-proto` (sans-IO themselves); this module owns their timers,
//! retries and our policy, and never touches a socket: datagrams and TCP
//! bytes come in through [`Nat::handle_datagram`] and
//! [`Nat::handle_tcp_bytes`], what must leave comes out of
//! [`Nat::poll_transmit`] and [`Nat::relay`], and TCP connections are asked
//! for with [`NatEvent::TcpConnect`].
//!
//! Relayed data stays end-to-end encrypted: what goes through TURN is our
//! transport datagrams, so the relay sees only ciphertext. The relayed path
//! allocates nothing per datagram: ChannelData is cut out of the buffer it
//! arrived in, and written into the caller's buffer on the way out.
//!
//! Two gaps of turn-client-proto 0.7 are covered here (see
//! docs/overlay-design.md): over TCP it neither pads outgoing ChannelData to
//! 4 bytes nor skips the server's padding (RFC 8656 12.5), so frames are cut
//! and padded here; and an error answer to the authenticated Allocate
//! (wrong credentials) is passed back as "ignored" and would only time out
//! after half a minute, so it is recognised here. Only an error that answers
//! one of our own recent requests (same transaction ID) counts: anyone can
//! send error-class STUN from the server's address.
//!
//! Two Refreshes of our own ([`refresh`]) cover what the client cannot: an
//! allocation that a killed agent left under our 5-tuple is released when
//! the server answers our Allocate with 437, and a relayed path that died
//! makes us ask the server whether it still knows our allocation (a
//! restarted server forgets allocations without telling). When the server
//! will not release the leftover, that server's traffic moves to a UDP
//! socket of its own on another local port ([`Sock::UdpOwn`], asked for
//! with [`NatEvent::UdpOpen`]): a new 5-tuple, as a TCP connection is.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use stun_proto::agent::{StunAgent, StunAgentPollRet};
use stun_proto::types::attribute::{ErrorCode, XorMappedAddress};
use stun_proto::types::message::{
    Message, MessageClass, MessageType, MessageWriteVec, TransactionId, BINDING,
};
use stun_proto::types::prelude::*;
use stun_proto::Instant as SioInstant;
use turn_client_proto::api::{Transmit as TurnTransmit, TurnConfig, TurnEvent, TurnPollRet};
use turn_client_proto::api::{TurnPeerData, TurnRecvRet};
use turn_client_proto::prelude::*;
use turn_client_proto::tcp::TurnClientTcp;
use turn_client_proto::types::attribute::{ChannelNumber, XorPeerAddress};
use turn_client_proto::types::channel::ChannelData;
use turn_client_proto::types::message::{ALLOCATE, CHANNEL_BIND};
use turn_client_proto::types::{TransportType, TurnCredentials};
use turn_client_proto::udp::TurnClientUdp;

use crate::crypto::Seed;
use crate::path::{PathAddr, Via};
use crate::wire::{self, Demux};

mod refresh;
use refresh::{Outcome, Refresh, Step};

turn_client_proto::impl_client!(TurnClient, (Udp, TurnClientUdp), (Tcp, TurnClientTcp));

/// How often server-reflexive candidates are gathered again: often enough
/// that a NAT that changed behaviour (symmetric to cone) or a new public
/// address is noticed well within the 30 s a relayed pair may wait for a
/// direct path.
pub const GATHER_INTERVAL: Duration = Duration::from_secs(10);
/// An allocation made this long after the last gathering gathers again.
const REGATHER_AFTER: Duration = Duration::from_secs(1);
/// A reflexive address not confirmed for this long is dropped.
const REFLEXIVE_TTL: Duration = Duration::from_secs(35);
/// Retry pauses of a failed allocation: 1 s doubling to 10 s (a TURN server
/// that comes back is used again within seconds).
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(10);
/// Wrong credentials will not fix themselves quickly.
const RETRY_AUTH: Duration = Duration::from_secs(30);
/// Least time between two checks of one allocation for dead paths.
const CHECK_PAUSE: Duration = Duration::from_secs(5);
/// Every allocation is checked this often regardless (at the next
/// gathering): with sessions on demand no relayed path may be probed for
/// hours, and a TURN server that restarted would leave an idle node's
/// relayed address dead, unreachable for a peer that needs it.
const CHECK_EVERY: Duration = Duration::from_secs(15);
/// The lifetime turn-client-proto asks for; a check asks for the same, so
/// that it never shortens what the client believes.
const LIFETIME: u32 = 1800;
/// coturn deletes a released allocation a second after the Refresh (its
/// lifetime becomes 1 s, not 0): an Allocate before that draws 437 again.
const RELEASE_SETTLE: Duration = Duration::from_millis(1200);
/// A 437 this soon after a release is that same allocation, still going:
/// wait for it instead of releasing again (which would restart coturn's
/// second).
const RELEASE_GRACE: Duration = Duration::from_secs(6);
/// A TCP connect or an allocation that takes longer failed.
const SETUP_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests of one client whose answers we still accept (a few
/// retransmissions and refreshes).
const RECENT_REQUESTS: usize = 8;
/// Bytes of a TURN TCP stream kept before a whole frame (a ChannelData
/// frame is at most 64 KiB).
const TCP_RX_MAX: usize = 1 << 17;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TurnTransport {
    Udp,
    Tcp,
}

/// One configured TURN server.
#[derive(Clone)]
pub struct TurnServer {
    pub server: SocketAddr,
    pub transport: TurnTransport,
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for TurnServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TurnServer")
            .field("server", &self.server)
            .field("transport", &self.transport)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// The state of one TURN allocation, for `peers`/metrics and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TurnState {
    Idle,
    Connecting,
    Allocating,
    Ready(SocketAddr),
    Failed(String),
}

/// What the NAT layer works with.
#[derive(Debug, Clone)]
pub struct NatConfig {
    /// Our UDP port (the overlay's).
    pub port: u16,
    pub stun: Vec<SocketAddr>,
    pub turn: Vec<TurnServer>,
}

/// How a transmit leaves: the UDP socket, the TCP connection to TURN
/// server `n` (the index in [`NatConfig::turn`]), or the UDP socket of its
/// own that TURN server `n` was given (see [`NatEvent::UdpOpen`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Sock {
    Udp,
    Tcp(usize),
    UdpOwn(usize),
    /// A spare socket of birthday probing ([`crate::hunt`]): overlay
    /// datagrams only.
    Spare(u32),
}

/// Bytes to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transmit<'a> {
    pub via: Sock,
    pub to: SocketAddr,
    pub data: &'a [u8],
}

/// What a datagram from the UDP socket was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Datagram<'a> {
    /// STUN or TURN control traffic, handled.
    Consumed,
    /// A peer's datagram that came through our allocation: a sub-slice of
    /// the input.
    Relayed(PathAddr, &'a [u8]),
    /// Nobody's (counted in [`Nat::junk`]).
    NotMine,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NatEvent {
    /// Our reflexive or relayed candidates changed.
    CandidatesChanged,
    /// Open a TCP connection to `to` for TURN server `conn`; answer with
    /// [`Nat::tcp_connected`] or [`Nat::tcp_closed`].
    TcpConnect { conn: usize, to: SocketAddr },
    /// Close the TCP connection of TURN server `conn`.
    TcpClose { conn: usize },
    /// Open a UDP socket on an ephemeral port for the traffic of TURN
    /// server `conn` (at `to`): the server holds an allocation under our
    /// overlay port that it would not release. Feed what it receives to
    /// [`Nat::handle_datagram_on`] with [`Sock::UdpOwn`]; answer with
    /// [`Nat::udp_opened`] or [`Nat::udp_closed`].
    UdpOpen { conn: usize, to: SocketAddr },
    /// Close the UDP socket of TURN server `conn`.
    UdpClose { conn: usize },
}

/// Which local UDP socket a TURN server over UDP is spoken to from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Port {
    /// The overlay's own socket (the usual case: one port through the NAT).
    Shared,
    /// A socket of its own was asked for and is not open yet.
    Opening,
    /// A socket of its own, bound to this address.
    Own(SocketAddr),
}

/// A TCP connection to a TURN server, as far as the protocol is concerned:
/// whether it is up and what arrived but is not a whole frame yet.
struct TcpLink {
    local: Option<SocketAddr>,
    rx: Vec<u8>,
}

/// Why we run a Refresh of our own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// Delete the allocation a previous agent left under our 5-tuple.
    Release,
    /// Ask whether the server still knows our allocation.
    Check,
}

/// One configured TURN server and our allocation on it.
struct TurnSlot {
    conf: TurnServer,
    client: Option<TurnClient>,
    tcp: Option<TcpLink>,
    state: TurnState,
    started: Instant,
    retry_at: Instant,
    backoff: Duration,
    channels: HashSet<SocketAddr>,
    /// Channel numbers this client asked the server to bind, and to whom
    /// (from the ChannelBind requests as they leave): the server relays
    /// on a channel as soon as it bound it, and the client drops that
    /// ChannelData until it has the success answer itself, a second
    /// round trip later, or a retransmission later if that answer is lost.
    asked_channels: HashMap<u16, SocketAddr>,
    /// Why the server refused our allocation (401 and friends).
    auth_error: Option<String>,
    /// Where its UDP traffic leaves from: once moved to a socket of its
    /// own, it stays there (the overlay port's 5-tuple still holds the
    /// allocation the server would not release).
    port: Port,
    /// A Refresh of our own in flight.
    refresh: Option<(Purpose, Refresh)>,
    /// When a check last started, and when we last released a leftover.
    checked: Option<Instant>,
    released: Option<Instant>,
    /// When the periodic check ([`CHECK_EVERY`]) last ran (or its clock
    /// started).
    watched: Option<Instant>,
    /// Moves to another local port since the last allocation: past the
    /// first, each waits the slot's backoff, so a server that refuses on
    /// every port costs a socket and an Allocate every 10 s at most.
    moves: u32,
    /// Transaction IDs of the requests this client sent last.
    requests: [Option<TransactionId>; RECENT_REQUESTS],
    next_request: usize,
    /// The last line logged about this slot: a line is logged once per
    /// state change, never once per datagram.
    logged: Option<String>,
}

impl TurnSlot {
    fn new(conf: TurnServer, now: Instant) -> TurnSlot {
        TurnSlot {
            conf,
            client: None,
            tcp: None,
            state: TurnState::Idle,
            started: now,
            retry_at: now,
            backoff: RETRY_MIN,
            channels: HashSet::new(),
            asked_channels: HashMap::new(),
            auth_error: None,
            port: Port::Shared,
            refresh: None,
            watched: None,
            checked: None,
            released: None,
            moves: 0,
            requests: [None; RECENT_REQUESTS],
            next_request: 0,
            logged: None,
        }
    }

    fn ready(&self) -> bool {
        matches!(self.state, TurnState::Ready(_))
    }

    /// Logs `line` unless it is what was logged last about this slot.
    fn warn_once(&mut self, line: String) {
        if self.logged.as_deref() != Some(line.as_str()) {
            tracing::warn!(server = %self.conf.server, "TURN: {line}");
            self.logged = Some(line);
        }
    }

    /// Remembers the transaction ID of an outgoing request, and the
    /// channel a ChannelBind asks for.
    fn note_request(&mut self, data: &[u8]) {
        if wire::demux(data) != Demux::Stun {
            return;
        }
        if let Ok(msg) = Message::from_bytes(data) {
            if msg.has_class(MessageClass::Request) {
                self.requests[self.next_request] = Some(msg.transaction_id());
                self.next_request = (self.next_request + 1) % RECENT_REQUESTS;
            }
            if msg.has_class(MessageClass::Request) && msg.has_method(CHANNEL_BIND) {
                let number = msg.attribute::<ChannelNumber>();
                let peer = msg.attribute::<XorPeerAddress>();
                if let (Ok(n), Ok(p)) = (number, peer) {
                    let peer = p.addr(msg.transaction_id());
                    self.asked_channels.insert(n.channel(), peer);
                }
            }
        }
    }

    /// Forgets its channels (a new client, a new allocation).
    fn forget_channels(&mut self) {
        self.channels.clear();
        self.asked_channels.clear();
    }

    /// Whether `tid` is that of one of the requests this client sent last.
    fn asked_recently(&self, tid: TransactionId) -> bool {
        self.requests.contains(&Some(tid))
    }

    /// How this slot's traffic leaves.
    fn via(&self, idx: usize) -> Sock {
        match self.port {
            _ if self.tcp.is_some() => Sock::Tcp(idx),
            Port::Shared => Sock::Udp,
            Port::Opening | Port::Own(_) => Sock::UdpOwn(idx),
        }
    }

    /// The local address its UDP client speaks from.
    fn udp_local(&self, shared: SocketAddr) -> SocketAddr {
        match self.port {
            Port::Own(a) => a,
            _ => shared,
        }
    }

    /// Whether `tid` is that of the request this client sent last: a
    /// late duplicate answer to an earlier one (a retransmitted
    /// unauthenticated Allocate draws a second 401) is not a refusal.
    fn asked_last(&self, tid: TransactionId) -> bool {
        let last = (self.next_request + RECENT_REQUESTS - 1) % RECENT_REQUESTS;
        self.requests[last] == Some(tid)
    }
}

pub struct Nat {
    base: Instant,
    local: SocketAddr,
    stun_servers: Vec<SocketAddr>,
    stun: StunAgent,
    bindings: HashMap<TransactionId, usize>,
    reflexive: Vec<Option<(SocketAddr, Instant)>>,
    /// STUN transactions to each server that timed out since its last
    /// answer: a server that answers again after that has restarted or
    /// been unreachable, and our allocation on it is probably gone.
    stun_misses: Vec<u32>,
    next_gather: Instant,
    slots: Vec<TurnSlot>,
    peer_ips: BTreeSet<IpAddr>,
    /// Control traffic waiting for [`Nat::poll_transmit`], and the one it
    /// handed out last (borrowed by the caller until the next call).
    out: VecDeque<(Sock, SocketAddr, Vec<u8>)>,
    sent: Option<(Sock, SocketAddr, Vec<u8>)>,
    events: VecDeque<NatEvent>,
    /// A TURN request was queued outside [`Nat::handle_timeout`] (a
    /// permission, a channel): the caller runs it at once.
    soon: bool,
    /// Payload copy of [`Nat::relay`] (the caller's datagram buffer is
    /// where the framed result goes).
    scratch: Vec<u8>,
    rng: StdRng,
    /// The STUN agent's and the TURN clients' own next deadlines, as they
    /// said at the last [`Nat::handle_timeout`].
    stun_wake: Instant,
    turn_wake: Instant,
    /// STUN/TURN datagrams that were neither (counted as malformed).
    pub junk: u64,
}

fn sio(base: Instant, t: Instant) -> SioInstant {
    SioInstant::from_nanos(
        t.saturating_duration_since(base)
            .as_nanos()
            .min(i64::MAX as u128) as i64,
    )
}

fn std_of(base: Instant, t: SioInstant) -> Instant {
    base + Duration::from_nanos(t.as_nanos().max(0) as u64)
}

impl Nat {
    /// `seed` feeds the transaction IDs of our STUN bindings (the TURN
    /// client draws its own).
    pub fn new(now: Instant, cfg: NatConfig, seed: Seed) -> Nat {
        let local = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), cfg.port);
        // TURN servers over UDP answer STUN too: with no STUN server
        // configured they still give us our reflexive address.
        let mut stun_list = cfg.stun;
        for t in &cfg.turn {
            if t.transport == TurnTransport::Udp && !stun_list.contains(&t.server) {
                stun_list.push(t.server);
            }
        }
        Nat {
            base: now,
            local,
            reflexive: vec![None; stun_list.len()],
            stun_misses: vec![0; stun_list.len()],
            stun_servers: stun_list,
            // Short transactions (about 3.5 s in all): a binding that goes
            // unanswered must end before the server is back, so that its
            // next answer is seen as a return (and allocations renewed).
            stun: StunAgent::builder(TransportType::Udp, local)
                .request_retransmits(
                    Duration::from_millis(500),
                    Duration::from_secs(1),
                    3,
                    Duration::from_secs(1),
                )
                .build(),
            bindings: HashMap::new(),
            next_gather: now,
            slots: cfg
                .turn
                .into_iter()
                .map(|c| TurnSlot::new(c, now))
                .collect(),
            peer_ips: BTreeSet::new(),
            out: VecDeque::new(),
            sent: None,
            events: VecDeque::new(),
            soon: false,
            scratch: Vec::new(),
            rng: StdRng::from_seed(seed),
            stun_wake: now,
            turn_wake: now,
            junk: 0,
        }
    }

    /// Candidates of ours the NAT layer knows: reflexive and relayed, each
    /// address once.
    pub fn candidates(&self) -> Vec<(SocketAddr, crate::path::Rank)> {
        use crate::path::Rank;
        let reflexive = self
            .reflexive
            .iter()
            .flatten()
            .map(|(a, _)| (*a, Rank::Direct));
        let relayed = self.slots.iter().filter_map(|s| match s.state {
            TurnState::Ready(a) => Some((a, Rank::Relay)),
            _ => None,
        });
        let mut out = Vec::new();
        for c in reflexive.chain(relayed) {
            if !out.iter().any(|(a, _)| *a == c.0) {
                out.push(c);
            }
        }
        out
    }

    /// Whether our NAT's mapping depends on the destination, and our
    /// public IPv4 address: from the reflexive addresses the STUN servers
    /// gave (two or more are needed to tell).
    pub fn mapping(&self) -> (crate::hunt::Mapping, Option<Ipv4Addr>) {
        let seen: Vec<SocketAddr> = self.reflexive.iter().flatten().map(|(a, _)| *a).collect();
        crate::hunt::Mapping::of(&seen)
    }

    /// IPs of relays: our allocations and the TURN servers.
    pub fn relay_ips(&self) -> Vec<IpAddr> {
        let mut v: Vec<IpAddr> = self.slots.iter().map(|s| s.conf.server.ip()).collect();
        v.extend(self.slots.iter().filter_map(|s| match s.state {
            TurnState::Ready(a) => Some(a.ip()),
            _ => None,
        }));
        v.sort();
        v.dedup();
        v
    }

    /// The indices of the TURN servers whose allocation is up.
    pub fn ready_relays(&self) -> Vec<u8> {
        (0..self.slots.len())
            .filter(|&i| self.slots[i].ready())
            .filter_map(|i| u8::try_from(i).ok())
            .collect()
    }

    pub fn turn_states(&self) -> Vec<(SocketAddr, TurnTransport, TurnState)> {
        self.slots
            .iter()
            .map(|s| (s.conf.server, s.conf.transport, s.state.clone()))
            .collect()
    }

    /// The state of TURN server `idx`'s allocation, without a copy (the
    /// stack compares it after every turn to tell changes).
    pub fn turn_state(&self, idx: usize) -> Option<(SocketAddr, TurnTransport, &TurnState)> {
        self.slots
            .get(idx)
            .map(|s| (s.conf.server, s.conf.transport, &s.state))
    }

    /// Where the traffic of TURN server `idx` leaves from (for status and
    /// tests): the overlay's socket, a TCP connection, or a UDP socket of
    /// its own.
    pub fn turn_sock(&self, idx: usize) -> Option<Sock> {
        self.slots.get(idx).map(|s| s.via(idx))
    }

    /// The next thing the caller must act on.
    pub fn poll_event(&mut self) -> Option<NatEvent> {
        self.events.pop_front()
    }

    fn changed(&mut self) {
        if !self.events.contains(&NatEvent::CandidatesChanged) {
            self.events.push_back(NatEvent::CandidatesChanged);
        }
    }

    /// When [`Nat::handle_timeout`] must run next.
    pub fn poll_timeout(&self) -> Instant {
        if self.soon {
            return self.base;
        }
        let mut wake = self.next_gather;
        for s in &self.slots {
            let t = match &s.state {
                _ if s.refresh.is_some() => s.refresh.as_ref().map_or(wake, |r| r.1.deadline()),
                _ if s.port == Port::Opening => s.started + SETUP_TIMEOUT,
                _ if s.client.is_none() && s.tcp.is_none() => s.retry_at,
                TurnState::Connecting | TurnState::Allocating => s.started + SETUP_TIMEOUT,
                _ => continue,
            };
            wake = wake.min(t);
        }
        wake.min(self.stun_wake).min(self.turn_wake)
    }
}

/// What the caller does with ChannelData or a data indication.
fn relayed<T: AsRef<[u8]> + std::fmt::Debug>(idx: usize, pd: &TurnPeerData<T>) -> PathAddr {
    PathAddr {
        via: Via::Turn(idx as u8),
        remote: pd.peer,
    }
}

impl Nat {
    /// A path through our allocation on TURN server `idx` died: asks the
    /// server whether it still knows the allocation (a restarted server
    /// forgets allocations without telling, and the client would notice
    /// only at its next refresh, minutes away), and allocates again when it
    /// does not or does not answer. A peer that is simply gone costs a
    /// Refresh, not our relayed address. At most once per [`CHECK_PAUSE`].
    pub fn renew(&mut self, now: Instant, idx: usize) {
        let Some(s) = self.slots.get_mut(idx) else {
            return;
        };
        let recent = s
            .checked
            .is_some_and(|t| now.saturating_duration_since(t) < CHECK_PAUSE);
        if !s.ready() || s.refresh.is_some() || recent {
            return;
        }
        s.checked = Some(now);
        let r = Refresh::new(
            now,
            &s.conf.username,
            &s.conf.password,
            LIFETIME,
            self.rng.gen(),
        );
        let (via, server) = (s.via(idx), s.conf.server);
        self.out.push_back((via, server, r.request().to_vec()));
        s.refresh = Some((Purpose::Check, r));
    }

    /// [`Nat::renew`] for every allocation.
    pub fn check_all(&mut self, now: Instant) {
        for idx in 0..self.slots.len() {
            self.renew(now, idx);
        }
    }

    /// The server answered our Allocate with 437: it holds an allocation
    /// under our 5-tuple that we did not make, left by an agent that was
    /// killed (or a node that rebooted behind a NAT that kept its port).
    /// Over UDP it is released with the credentials it was made with, then
    /// we allocate again; a TCP connection is a new 5-tuple, so over TCP we
    /// just connect again. A 437 that outlasts the release's grace (the
    /// server says it released it but keeps it) moves the server to a UDP
    /// socket of its own: a new 5-tuple too.
    fn mismatch(&mut self, now: Instant, idx: usize) {
        let s = &mut self.slots[idx];
        s.client = None;
        let server = s.conf.server;
        let since = s.released.map(|t| now.saturating_duration_since(t));
        let settling = since.is_some_and(|d| d < RELEASE_GRACE);
        if s.tcp.is_some() || settling {
            let why = format!("{server} still holds an allocation for our address: retrying");
            self.fail(idx, now, why);
            let pause = if settling {
                RELEASE_SETTLE
            } else {
                Duration::ZERO
            };
            self.slots[idx].retry_at = now + pause;
            return;
        }
        if let Some(d) = since {
            let why = format!(
                "{server} still holds an allocation for our address {}s after it said it \
                 released it",
                d.as_secs()
            );
            return self.fallback(now, idx, why);
        }
        s.warn_once(format!(
            "{server} holds an allocation for our address that a previous agent left \
             (killed without deleting it): releasing it"
        ));
        let r = Refresh::new(now, &s.conf.username, &s.conf.password, 0, self.rng.gen());
        self.out
            .push_back((s.via(idx), server, r.request().to_vec()));
        s.refresh = Some((Purpose::Release, r));
        s.started = now;
        s.state = TurnState::Allocating;
    }

    /// Acts on a step of slot `idx`'s Refresh.
    fn refresh_step(&mut self, now: Instant, idx: usize, step: Step) {
        let s = &mut self.slots[idx];
        let Some((purpose, r)) = s.refresh.as_ref() else {
            return;
        };
        let purpose = *purpose;
        match step {
            Step::Wait => {}
            Step::Send => {
                let data = r.request().to_vec();
                let via = s.via(idx);
                self.out.push_back((via, s.conf.server, data));
            }
            Step::Finished(outcome) => {
                s.refresh = None;
                self.refresh_done(now, idx, purpose, outcome);
            }
        }
    }

    fn refresh_done(&mut self, now: Instant, idx: usize, purpose: Purpose, outcome: Outcome) {
        let s = &mut self.slots[idx];
        let server = s.conf.server;
        match (purpose, outcome) {
            (Purpose::Check, Outcome::Done) => {
                tracing::debug!(%server, "TURN: the server still knows our allocation");
            }
            (Purpose::Check, o) => {
                let why = match o {
                    Outcome::Failed(why) => {
                        format!("{server} did not confirm our allocation ({why}): allocating again")
                    }
                    _ => format!("{server} no longer knows our allocation: allocating again"),
                };
                self.fail(idx, now, why);
                self.slots[idx].retry_at = now;
            }
            (Purpose::Release, Outcome::Done | Outcome::NoAllocation) => {
                tracing::info!(%server, "TURN: released the allocation a previous agent left");
                s.released = Some(now);
                s.logged = None;
                s.retry_at = now + RELEASE_SETTLE;
                s.backoff = RETRY_MIN;
            }
            (Purpose::Release, Outcome::Failed(why)) => {
                let why = format!(
                    "{server} holds an allocation for our address that a previous agent left, \
                     and did not release it ({why})"
                );
                self.fallback(now, idx, why);
            }
        }
    }

    /// The server of slot `idx` (over UDP) holds an allocation under our
    /// 5-tuple that it will not release: its traffic moves to a UDP socket
    /// of its own, on another local port (a new one, if it had one). The
    /// overlay's socket is never used for it again: the leftover would
    /// answer every Allocate from it with 437 until it expires.
    fn fallback(&mut self, now: Instant, idx: usize, why: String) {
        let s = &mut self.slots[idx];
        s.warn_once(format!("{why}: moving to another local port"));
        s.moves = s.moves.saturating_add(1);
        if s.port != Port::Shared {
            self.events.push_back(NatEvent::UdpClose { conn: idx });
        }
        s.port = Port::Opening;
        s.client = None;
        s.refresh = None;
        s.released = None;
        s.forget_channels();
        s.started = now;
        s.state = TurnState::Connecting;
        let to = s.conf.server;
        self.events.push_back(NatEvent::UdpOpen { conn: idx, to });
        self.changed();
    }

    /// The UDP socket of TURN server `conn` is open, bound to `local`: the
    /// allocation starts over it, at once after the first move, after the
    /// slot's backoff after later ones. A socket nobody waits for any more
    /// (it timed out) is handed back to be closed.
    pub fn udp_opened(&mut self, now: Instant, conn: usize, local: SocketAddr) {
        let Some(s) = self.slots.get_mut(conn) else {
            return;
        };
        if s.port != Port::Opening {
            if s.port == Port::Shared {
                self.events.push_back(NatEvent::UdpClose { conn });
            }
            return;
        }
        tracing::info!(server = %s.conf.server, %local, "TURN: allocating from a port of its own");
        s.port = Port::Own(local);
        if s.moves > 1 {
            s.retry_at = now + s.backoff;
            s.backoff = (s.backoff * 2).min(RETRY_MAX);
            self.changed();
            return;
        }
        s.backoff = RETRY_MIN;
        self.start(now, conn);
        self.handle_timeout(now);
    }

    /// The UDP socket of TURN server `conn` could not be opened (or broke):
    /// back to the overlay's socket after the usual pause; a 437 there asks
    /// for another.
    pub fn udp_closed(&mut self, now: Instant, conn: usize, why: &str) {
        let Some(s) = self.slots.get_mut(conn) else {
            return;
        };
        if s.port == Port::Shared {
            return;
        }
        s.port = Port::Shared;
        let server = s.conf.server;
        self.fail(conn, now, format!("UDP socket for {server}: {why}"));
    }

    /// Gathers reflexive candidates again as soon as possible (an address
    /// changed, a path died).
    pub fn gather_soon(&mut self, now: Instant) {
        self.next_gather = self.next_gather.min(now);
        for s in &mut self.slots {
            if !s.ready() && s.auth_error.is_none() {
                s.retry_at = s.retry_at.min(now);
                s.backoff = RETRY_MIN;
            }
        }
    }

    /// The public IPs of the peers: every allocation permits them, so that
    /// what they send to our relayed address reaches us.
    pub fn set_peer_ips(&mut self, now: Instant, ips: BTreeSet<IpAddr>) {
        if ips == self.peer_ips {
            return;
        }
        self.peer_ips = ips;
        let t = sio(self.base, now);
        for s in &mut self.slots {
            if let Some(c) = s.client.as_mut() {
                permit(c, &self.peer_ips, t);
            }
        }
        self.soon = true;
    }

    /// A datagram from the UDP socket whose first byte says STUN or
    /// ChannelData.
    pub fn handle_datagram<'a>(
        &mut self,
        now: Instant,
        from: SocketAddr,
        data: &'a [u8],
    ) -> Datagram<'a> {
        self.handle_datagram_on(now, Sock::Udp, from, data)
    }

    /// A datagram from UDP socket `via`: the overlay's, or one of a TURN
    /// server's own ([`Sock::UdpOwn`]).
    pub fn handle_datagram_on<'a>(
        &mut self,
        now: Instant,
        via: Sock,
        from: SocketAddr,
        data: &'a [u8],
    ) -> Datagram<'a> {
        if via == Sock::Udp && self.stun_answer(now, from, data) {
            return Datagram::Consumed;
        }
        let Some(idx) = self.slot_of(via, from) else {
            self.junk += 1;
            return Datagram::NotMine;
        };
        if self.control(now, idx, data) {
            return Datagram::Consumed;
        }
        let t = sio(self.base, now);
        let s = &mut self.slots[idx];
        let local = s.udp_local(self.local);
        let Some(c) = s.client.as_mut() else {
            self.junk += 1;
            return Datagram::NotMine;
        };
        let got = match c.recv(TurnTransmit::new(data, TransportType::Udp, from, local), t) {
            TurnRecvRet::PeerData(pd) => match within(data, pd.data()) {
                Some(r) => Datagram::Relayed(relayed(idx, &pd), &data[r]),
                // turn-client-proto cuts ChannelData and data indications
                // out of the input; anything else is not ours to pass on.
                None => Datagram::Consumed,
            },
            TurnRecvRet::Ignored(tr) => match asked_channel_data(&s.asked_channels, tr.data) {
                Some((peer, r)) => {
                    let path = PathAddr {
                        via: Via::Turn(idx as u8),
                        remote: peer,
                    };
                    Datagram::Relayed(path, &data[r])
                }
                None => {
                    if !self.error_answer(idx, tr.data) {
                        self.junk += 1;
                    }
                    Datagram::Consumed
                }
            },
            TurnRecvRet::Handled | TurnRecvRet::PeerIcmp { .. } => Datagram::Consumed,
        };
        if !matches!(got, Datagram::Relayed(..)) {
            // What the answer unblocked (the signed Allocate after a 401,
            // a channel after a permission) goes out now, not at the
            // client's next timer.
            self.poll_client(now, idx);
        }
        self.process_events(now);
        got
    }

    /// The UDP slot whose traffic arrives on `via` from `from`: a server
    /// that moved to a socket of its own is not heard on the overlay's (what
    /// comes there is its leftover allocation's).
    fn slot_of(&self, via: Sock, from: SocketAddr) -> Option<usize> {
        let idx = match via {
            Sock::Udp => self.slots.iter().position(|s| {
                s.conf.transport == TurnTransport::Udp
                    && s.port == Port::Shared
                    && s.conf.server == from
            })?,
            Sock::UdpOwn(i) => i,
            Sock::Tcp(_) | Sock::Spare(_) => return None,
        };
        let s = self.slots.get(idx)?;
        (s.conf.server == from && s.via(idx) == via).then_some(idx)
    }

    /// Control traffic of slot `idx` that is ours rather than its client's:
    /// answers to our own Refresh, and a 437 to the client's Allocate.
    /// Returns whether it was.
    fn control(&mut self, now: Instant, idx: usize, data: &[u8]) -> bool {
        if wire::demux(data) != Demux::Stun {
            return false;
        }
        let Ok(msg) = Message::from_bytes(data) else {
            return false;
        };
        let s = &mut self.slots[idx];
        if let Some((_, r)) = s.refresh.as_mut() {
            if r.answers(&msg) {
                let step = r.handle(now, &msg, self.rng.gen());
                self.refresh_step(now, idx, step);
                return true;
            }
        }
        // Once allocated, a 437 answers a retransmit of the Allocate that
        // made it (turn-server-proto answers those so): not a leftover.
        let mismatch = s.client.is_some()
            && !s.ready()
            && msg.has_class(MessageClass::Error)
            && msg.has_method(ALLOCATE)
            && msg
                .attribute::<ErrorCode>()
                .is_ok_and(|e| e.code() == ErrorCode::ALLOCATION_MISMATCH)
            && s.asked_recently(msg.transaction_id());
        if mismatch {
            self.mismatch(now, idx);
        }
        mismatch
    }

    /// An answer to one of our STUN bindings: our reflexive address.
    fn stun_answer(&mut self, now: Instant, from: SocketAddr, data: &[u8]) -> bool {
        let Ok(msg) = Message::from_bytes(data) else {
            return false;
        };
        let tid = msg.transaction_id();
        let Some(i) = self.bindings.get(&tid).copied() else {
            return false;
        };
        if !msg.is_response()
            || !self
                .stun
                .handle_stun_message_with_time(&msg, from, sio(self.base, now))
        {
            return false;
        }
        self.bindings.remove(&tid);
        if std::mem::take(&mut self.stun_misses[i]) > 0 {
            self.server_returned(now, self.stun_servers[i]);
        }
        if let Ok(x) = msg.attribute::<XorMappedAddress>() {
            let a = x.addr(tid);
            if self.reflexive[i].map(|(o, _)| o) != Some(a) {
                tracing::info!(server = %self.stun_servers[i], reflexive = %a, "STUN: reflexive address");
                self.changed();
            }
            self.reflexive[i] = Some((a, now));
        }
        true
    }

    /// A STUN server that missed bindings answers again: our allocation on
    /// it (if it is also our TURN server) is probably gone.
    fn server_returned(&mut self, now: Instant, server: SocketAddr) {
        for idx in 0..self.slots.len() {
            let s = &self.slots[idx];
            if s.conf.server == server && s.ready() {
                self.fail(
                    idx,
                    now,
                    format!("{server} was unreachable: renewing the allocation"),
                );
                self.slots[idx].retry_at = now;
            }
        }
    }

    /// turn-client-proto hands back an error answer to the authenticated
    /// Allocate as "ignored"; that is how wrong credentials show. Acted on
    /// only while allocating and only when it answers a request of ours.
    /// Returns whether it was such an answer.
    fn error_answer(&mut self, idx: usize, data: &[u8]) -> bool {
        let s = &mut self.slots[idx];
        if s.ready() {
            return false;
        }
        let Ok(msg) = Message::from_bytes(data) else {
            return false;
        };
        if !msg.has_class(MessageClass::Error) || !s.asked_last(msg.transaction_id()) {
            return false;
        }
        let Ok(e) = msg.attribute::<ErrorCode>() else {
            return false;
        };
        let why = format!(
            "TURN server {} ({:?}) refused the allocation: {} {} ({})",
            s.conf.server,
            s.conf.transport,
            e.code(),
            e.reason(),
            refusal_hint(e.code())
        );
        if s.logged.as_deref() != Some(why.as_str()) {
            tracing::error!("{why}");
            s.logged = Some(why.clone());
        }
        s.auth_error = Some(why);
        if let Some(c) = s.client.as_mut() {
            c.protocol_error();
        }
        true
    }

    /// Bytes that arrived on the TCP connection of TURN server `conn`.
    /// Whole frames are taken out by [`Nat::poll_relayed`].
    pub fn handle_tcp_bytes(&mut self, now: Instant, conn: usize, data: &[u8]) {
        let Some(link) = self.slots.get_mut(conn).and_then(|s| s.tcp.as_mut()) else {
            return;
        };
        if link.rx.len() + data.len() > TCP_RX_MAX {
            let server = self.slots[conn].conf.server;
            self.fail(
                conn,
                now,
                format!("TURN server {server}: oversized frame on the TCP stream"),
            );
            return;
        }
        link.rx.extend_from_slice(data);
    }

    /// The next peer datagram that came through a TURN TCP connection,
    /// copied into `out` (control frames on the way are handled).
    pub fn poll_relayed(&mut self, now: Instant, out: &mut [u8]) -> Option<(PathAddr, usize)> {
        for conn in 0..self.slots.len() {
            while let Some(step) = self.next_tcp_frame(now, conn, out) {
                if let Some(got) = step {
                    return Some(got);
                }
            }
        }
        self.process_events(now);
        None
    }

    /// Cuts and handles one frame of connection `conn`: None when no whole
    /// frame is left, Some(Some(..)) for peer data copied into `out`.
    fn next_tcp_frame(
        &mut self,
        now: Instant,
        conn: usize,
        out: &mut [u8],
    ) -> Option<Option<(PathAddr, usize)>> {
        let t = sio(self.base, now);
        let s = self.slots.get_mut(conn)?;
        let link = s.tcp.as_mut()?;
        let local = link.local?;
        let Some((frame, consumed)) = tcp_frame(&link.rx) else {
            let garbage = link.rx.len() >= 4
                && !matches!(wire::demux(&link.rx), Demux::Stun | Demux::ChannelData);
            if garbage {
                let why = format!("TURN server {}: garbage on the TCP stream", s.conf.server);
                self.fail(conn, now, why);
            }
            return None;
        };
        if wire::demux(&link.rx) == Demux::Stun {
            // Lent out while [`Nat::control`] looks at it: no copy.
            let rx = std::mem::take(&mut link.rx);
            let mine = self.control(now, conn, &rx[..frame]);
            // Gone if that closed the connection.
            let link = self.slots[conn].tcp.as_mut()?;
            link.rx = rx;
            if mine {
                link.rx.drain(..consumed);
                return Some(None);
            }
        }
        let s = &mut self.slots[conn];
        let link = s.tcp.as_mut()?;
        let mut got = None;
        let mut ignored = false;
        if let Some(c) = s.client.as_mut() {
            let tr = TurnTransmit::new(&link.rx[..frame], TransportType::Tcp, s.conf.server, local);
            match c.recv(tr, t) {
                TurnRecvRet::PeerData(pd) => {
                    let n = pd.data().len();
                    if let Some(dst) = out.get_mut(..n) {
                        dst.copy_from_slice(pd.data());
                        got = Some((relayed(conn, &pd), n));
                    }
                }
                TurnRecvRet::Ignored(_) => {
                    let frame = &link.rx[..frame];
                    match asked_channel_data(&s.asked_channels, frame) {
                        Some((peer, r)) => {
                            let n = r.len();
                            if let Some(dst) = out.get_mut(..n) {
                                dst.copy_from_slice(&frame[r]);
                                let path = PathAddr {
                                    via: Via::Turn(conn as u8),
                                    remote: peer,
                                };
                                got = Some((path, n));
                            }
                        }
                        None => ignored = true,
                    }
                }
                _ => {}
            }
        }
        let answered = got.is_none();
        // Control traffic only: a copy keeps the borrows apart.
        let frame_bytes = ignored.then(|| link.rx[..frame].to_vec());
        link.rx.drain(..consumed);
        if let Some(f) = frame_bytes {
            if !self.error_answer(conn, &f) {
                self.junk += 1;
            }
        }
        if answered {
            // As for UDP: what the answer unblocked goes out now.
            self.poll_client(now, conn);
        }
        Some(got)
    }

    /// The TCP connection of TURN server `conn` is up, from `local`.
    pub fn tcp_connected(&mut self, now: Instant, conn: usize, local: SocketAddr) {
        let Some(s) = self.slots.get_mut(conn) else {
            return;
        };
        let Some(link) = s.tcp.as_mut() else {
            return;
        };
        link.local = Some(local);
        let cfg = TurnConfig::new(TurnCredentials::new(&s.conf.username, &s.conf.password));
        s.client = Some(TurnClient::Tcp(TurnClientTcp::allocate(
            local,
            s.conf.server,
            cfg,
        )));
        s.state = TurnState::Allocating;
        self.handle_timeout(now);
    }

    /// The TCP connection of TURN server `conn` failed or was closed.
    pub fn tcp_closed(&mut self, now: Instant, conn: usize, why: &str) {
        if self.slots.get(conn).is_some_and(|s| s.tcp.is_some()) {
            let server = self.slots[conn].conf.server;
            self.fail(conn, now, format!("TCP to {server}: {why}"));
        }
    }

    /// Frames `payload` for peer `to` through our allocation on TURN
    /// server `idx`, into `out`: where it goes and its length. None when
    /// that allocation cannot carry it (yet).
    pub fn relay(
        &mut self,
        now: Instant,
        idx: u8,
        to: SocketAddr,
        payload: &[u8],
        out: &mut [u8],
    ) -> Option<(Sock, SocketAddr, usize)> {
        let t = sio(self.base, now);
        let s = self.slots.get_mut(usize::from(idx))?;
        if !s.ready() {
            return None;
        }
        let c = s.client.as_mut()?;
        if !c.have_permission(TransportType::Udp, to.ip()) {
            let _ = c.create_permission(TransportType::Udp, to.ip(), t);
            self.soon = true;
        }
        if s.channels.insert(to) {
            let _ = c.bind_channel(TransportType::Udp, to, t);
            self.soon = true;
        }
        self.scratch.clear();
        self.scratch.extend_from_slice(payload);
        let tb = c
            .send_to(TransportType::Udp, to, self.scratch.as_slice(), t)
            .ok()??;
        let len = tb.data.len();
        let padded = match s.tcp {
            Some(_) => (len + 3) & !3,
            None => len,
        };
        let dst = out.get_mut(..padded)?;
        tb.data.write_into(&mut dst[..len]);
        // ChannelData on a stream is padded to 4 bytes (RFC 8656 12.5);
        // STUN messages are 4-aligned already.
        dst[len..].fill(0);
        Some((s.via(usize::from(idx)), s.conf.server, padded))
    }

    /// The next control datagram or TCP frame to send. The data stays
    /// valid until the next call.
    pub fn poll_transmit(&mut self) -> Option<Transmit<'_>> {
        self.sent = self.out.pop_front();
        self.sent.as_ref().map(|(via, to, data)| Transmit {
            via: *via,
            to: *to,
            data,
        })
    }

    fn queue(&mut self, via: Sock, to: SocketAddr, data: Vec<u8>) {
        self.out.push_back((via, to, data));
    }
}

/// Where `part` lies inside `whole`, if it is a sub-slice of it.
/// ChannelData a client ignored on a channel it asked for (`asked`,
/// [`TurnSlot::asked_channels`]) and has no answer to yet: the server
/// relays on a channel only once it bound it to the peer we asked for, so
/// what comes on it is that peer's (and authenticated by the overlay's
/// session like any relayed datagram). The peer, and where its data is in
/// `data`.
fn asked_channel_data(
    asked: &HashMap<u16, SocketAddr>,
    data: &[u8],
) -> Option<(SocketAddr, std::ops::Range<usize>)> {
    let cd = ChannelData::parse(data).ok()?;
    let peer = *asked.get(&cd.id())?;
    Some((peer, within(data, cd.data())?))
}

fn within(whole: &[u8], part: &[u8]) -> Option<std::ops::Range<usize>> {
    let start = (part.as_ptr() as usize).checked_sub(whole.as_ptr() as usize)?;
    let end = start.checked_add(part.len())?;
    (end <= whole.len()).then_some(start..end)
}

/// A whole frame at the start of a TURN TCP stream: STUN (20 + length,
/// always 4-aligned) or ChannelData (4 + length, padded to 4 on a stream).
/// Returns the frame's length and how many bytes it takes on the stream.
fn tcp_frame(b: &[u8]) -> Option<(usize, usize)> {
    let len = usize::from(u16::from_be_bytes([*b.get(2)?, *b.get(3)?]));
    let (frame, consumed) = match wire::demux(b) {
        Demux::Stun => (20 + len, 20 + len),
        Demux::ChannelData => (4 + len, (4 + len + 3) & !3),
        _ => return None,
    };
    (b.len() >= consumed).then_some((frame, consumed))
}

fn refusal_hint(code: u16) -> &'static str {
    match code {
        401 | 431 => "check username and passwordFile",
        // The server keys allocations by our address and port: an agent
        // killed without deleting its allocation leaves one that refuses
        // the next (released in `Nat::mismatch` when the 437 answers our
        // Allocate, or left behind for another local port).
        437 => "it holds an allocation for our address and port that we did not make",
        486 => "its allocation quota for this user is used up",
        _ => "see the TURN server's log",
    }
}

fn permit(c: &mut TurnClient, ips: &BTreeSet<IpAddr>, t: SioInstant) {
    for ip in ips {
        if ip.is_ipv4() && !c.have_permission(TransportType::Udp, *ip) {
            let _ = c.create_permission(TransportType::Udp, *ip, t);
        }
    }
}

impl Nat {
    /// Timers: STUN gathering, TURN set-up, refreshes and retries; queues
    /// what they send.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.soon = false;
        self.gather(now);
        for idx in 0..self.slots.len() {
            self.run_slot(now, idx);
        }
        self.turn_wake = now + GATHER_INTERVAL;
        for idx in 0..self.slots.len() {
            self.poll_client(now, idx);
        }
        self.process_events(now);
        // What ran is done for now: a deadline that did not move would
        // wake the caller again at once.
        let soonest = now + Duration::from_millis(1);
        self.stun_wake = self.stun_wake.max(soonest);
        self.turn_wake = self.turn_wake.max(soonest);
    }

    /// STUN bindings to every server every [`GATHER_INTERVAL`], and their
    /// retransmissions and timeouts.
    fn gather(&mut self, now: Instant) {
        let t = sio(self.base, now);
        if now >= self.next_gather {
            self.next_gather = now + GATHER_INTERVAL;
            for i in 0..self.stun_servers.len() {
                if !self.bindings.values().any(|&b| b == i) {
                    self.send_binding(i, t);
                }
            }
            self.keep_own_ports_open();
            for idx in 0..self.slots.len() {
                let s = &mut self.slots[idx];
                let since = *s.watched.get_or_insert(now);
                if now.saturating_duration_since(since) >= CHECK_EVERY {
                    s.watched = Some(now);
                    self.renew(now, idx);
                }
            }
        }
        for r in self.reflexive.iter_mut() {
            if r.is_some_and(|(_, at)| now.saturating_duration_since(at) > REFLEXIVE_TTL) {
                *r = None;
                if !self.events.contains(&NatEvent::CandidatesChanged) {
                    self.events.push_back(NatEvent::CandidatesChanged);
                }
            }
        }
        loop {
            match self.stun.poll(t) {
                StunAgentPollRet::WaitUntil(w) => {
                    self.stun_wake = std_of(self.base, w);
                    break;
                }
                StunAgentPollRet::TransactionTimedOut(id)
                | StunAgentPollRet::TransactionCancelled(id) => {
                    if let Some(i) = self.bindings.remove(&id) {
                        self.stun_misses[i] = self.stun_misses[i].saturating_add(1);
                    }
                }
            }
        }
        while let Some(tr) = self.stun.poll_transmit(t) {
            let (to, data) = (tr.to, tr.data.to_vec());
            self.queue(Sock::Udp, to, data);
        }
    }

    /// A server on a port of its own hears nothing else from that port
    /// while no peer is relayed through it, and the NAT would forget the
    /// mapping the allocation hangs on: a Binding indication (no answer,
    /// RFC 8489 §6.3.2) keeps it, as the overlay port's bindings keep its.
    fn keep_own_ports_open(&mut self) {
        let mtype = MessageType::from_class_method(MessageClass::Indication, BINDING);
        for idx in 0..self.slots.len() {
            let s = &self.slots[idx];
            if !matches!(s.port, Port::Own(_)) || s.client.is_none() {
                continue;
            }
            let tid = TransactionId::from(self.rng.gen::<u128>());
            let msg = Message::builder(mtype, tid, MessageWriteVec::new()).finish();
            let server = s.conf.server;
            self.queue(Sock::UdpOwn(idx), server, msg);
        }
    }

    fn send_binding(&mut self, i: usize, t: SioInstant) {
        let tid = TransactionId::from(self.rng.gen::<u128>());
        let mtype = MessageType::from_class_method(MessageClass::Request, BINDING);
        let req = Message::builder(mtype, tid, MessageWriteVec::new());
        let server = self.stun_servers[i];
        if let Ok(tr) = self.stun.send_request(req.finish(), server, t) {
            let data = tr.data.to_vec();
            self.queue(Sock::Udp, server, data);
            self.bindings.insert(tid, i);
        }
    }

    /// Starts, or gives up on, the allocation of slot `idx`.
    fn run_slot(&mut self, now: Instant, idx: usize) {
        let s = &mut self.slots[idx];
        if let Some((_, r)) = s.refresh.as_mut() {
            let step = r.timeout(now);
            self.refresh_step(now, idx, step);
            return;
        }
        if s.port == Port::Opening {
            if now.saturating_duration_since(s.started) >= SETUP_TIMEOUT {
                // Back to the shared socket: the next 437 asks again.
                s.port = Port::Shared;
                self.events.push_back(NatEvent::UdpClose { conn: idx });
                let why = format!("no UDP socket of its own for {}", s.conf.server);
                self.fail(idx, now, why);
            }
            return;
        }
        if s.client.is_none() && s.tcp.is_none() {
            if now < s.retry_at {
                return;
            }
            self.start(now, idx);
            return;
        }
        let setting_up = matches!(s.state, TurnState::Connecting | TurnState::Allocating);
        if setting_up && now.saturating_duration_since(s.started) >= SETUP_TIMEOUT {
            let why = s.auth_error.clone().unwrap_or_else(|| {
                format!(
                    "no allocation from {} within {}s",
                    s.conf.server,
                    SETUP_TIMEOUT.as_secs()
                )
            });
            self.fail(idx, now, why);
        }
    }

    /// Polls the TURN client of slot `idx` and queues what it sends.
    fn poll_client(&mut self, now: Instant, idx: usize) {
        let t = sio(self.base, now);
        let s = &mut self.slots[idx];
        let (via, server) = (s.via(idx), s.conf.server);
        let Some(c) = s.client.as_mut() else {
            return;
        };
        match c.poll(t) {
            TurnPollRet::WaitUntil(w) => self.turn_wake = self.turn_wake.min(std_of(self.base, w)),
            TurnPollRet::Closed => {
                // Drain its events first: they may explain it.
                while c.poll_event().is_some() {}
                let why = s
                    .auth_error
                    .clone()
                    .unwrap_or_else(|| format!("allocation on {} closed", s.conf.server));
                self.fail(idx, now, why);
                return;
            }
            _ => {}
        }
        let mut sent = Vec::new();
        while let Some(tr) = c.poll_transmit(t) {
            sent.push(tr.data.to_vec());
        }
        for data in sent {
            self.slots[idx].note_request(&data);
            self.queue(via, server, data);
        }
    }

    fn start(&mut self, now: Instant, idx: usize) {
        let s = &mut self.slots[idx];
        let local = s.udp_local(self.local);
        s.started = now;
        s.forget_channels();
        s.auth_error = None;
        match s.conf.transport {
            TurnTransport::Udp => {
                let cfg = TurnConfig::new(TurnCredentials::new(&s.conf.username, &s.conf.password));
                s.client = Some(TurnClient::Udp(TurnClientUdp::allocate(
                    local,
                    s.conf.server,
                    cfg,
                )));
                s.state = TurnState::Allocating;
            }
            TurnTransport::Tcp => {
                s.tcp = Some(TcpLink {
                    local: None,
                    rx: Vec::new(),
                });
                s.state = TurnState::Connecting;
                let to = s.conf.server;
                self.events
                    .push_back(NatEvent::TcpConnect { conn: idx, to });
            }
        }
    }

    /// TurnSlot `idx` failed: drop its client (and connection), retry later.
    fn fail(&mut self, idx: usize, now: Instant, why: String) {
        let s = &mut self.slots[idx];
        s.warn_once(why.clone());
        if s.tcp.take().is_some() {
            self.events.push_back(NatEvent::TcpClose { conn: idx });
        }
        s.client = None;
        s.refresh = None;
        let pause = if s.auth_error.is_some() {
            RETRY_AUTH
        } else {
            s.backoff
        };
        s.retry_at = now + pause;
        s.backoff = (s.backoff * 2).min(RETRY_MAX);
        s.state = TurnState::Failed(why);
        s.forget_channels();
        self.changed();
    }

    fn process_events(&mut self, now: Instant) {
        let t = sio(self.base, now);
        for idx in 0..self.slots.len() {
            let mut lost = false;
            let mut created = false;
            let s = &mut self.slots[idx];
            let Some(c) = s.client.as_mut() else { continue };
            while let Some(ev) = c.poll_event() {
                match ev {
                    TurnEvent::AllocationCreated(_, addr) => {
                        tracing::info!(server = %s.conf.server, relayed = %addr, transport = ?s.conf.transport, "TURN: allocation created");
                        s.state = TurnState::Ready(addr);
                        s.backoff = RETRY_MIN;
                        s.auth_error = None;
                        s.logged = None;
                        s.released = None;
                        s.moves = 0;
                        s.channels.clear();
                        s.asked_channels.clear();
                        permit(c, &self.peer_ips, t);
                        created = true;
                    }
                    // A refresh of a permission or channel refused: the
                    // server no longer knows the allocation (it restarted).
                    TurnEvent::PermissionCreateFailed(..) | TurnEvent::ChannelCreateFailed(..)
                        if matches!(s.state, TurnState::Ready(_)) =>
                    {
                        lost = true;
                    }
                    TurnEvent::AllocationCreateFailed(_) => {
                        let why = s
                            .auth_error
                            .clone()
                            .unwrap_or_else(|| "allocation refused".into());
                        s.state = TurnState::Failed(why);
                    }
                    _ => {}
                }
            }
            // An allocation made well after our reflexive addresses were
            // last gathered (a lost one made again, or a first one that took
            // long): it may come from a new public address, and then our
            // published reflexive address is wrong too. Confirmed now, not
            // at the next gathering up to 10 s away while peers punch toward
            // the old one (sim: recovery after an address change).
            let gathered = self.next_gather.checked_sub(GATHER_INTERVAL);
            if created
                && gathered.is_some_and(|g| now.saturating_duration_since(g) >= REGATHER_AFTER)
            {
                self.next_gather = self.next_gather.min(now);
            }
            if created {
                self.soon = true;
                self.changed();
            }
            if lost {
                let server = self.slots[idx].conf.server;
                self.fail(idx, now, format!("{server} no longer knows our allocation"));
                self.slots[idx].retry_at = now;
            }
        }
    }

    /// Starts deleting the allocations (shutdown): an allocation left
    /// behind would refuse the next agent on this address (the server keys
    /// it by the 5-tuple) until it expires, minutes later. The caller keeps
    /// feeding datagrams and timeouts until [`Nat::shut_down`] (a
    /// stale-nonce answer is retried by the client).
    pub fn shutdown(&mut self, now: Instant) {
        let t = sio(self.base, now);
        for s in &mut self.slots {
            if let Some(c) = s.client.as_mut() {
                if !matches!(s.state, TurnState::Ready(_)) || c.delete(t).is_err() {
                    s.client = None;
                }
            }
            // Nothing new starts.
            s.refresh = None;
            s.retry_at = now + Duration::from_secs(3600);
        }
        self.handle_timeout(now);
    }

    /// Whether every allocation is deleted (or given up).
    pub fn shut_down(&self) -> bool {
        self.slots.iter().all(|s| s.client.is_none())
    }
}

#[cfg(test)]
mod tests;
