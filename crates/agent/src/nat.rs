//! NAT traversal on the agent's one UDP socket: STUN (RFC 8489) for the
//! server-reflexive candidates and TURN (RFC 8656) allocations for the
//! relayed ones, over UDP, or over TCP to the TURN server for sites where
//! UDP cannot get out. The protocol work is done by `stun-proto` and
//! `turn-client-proto` (sans-IO); this module owns their sockets, timers
//! and retries.
//!
//! Relayed data stays end-to-end encrypted: what goes through TURN is our
//! transport datagrams, so the relay sees only ciphertext.
//!
//! Two gaps of turn-client-proto 0.7 are covered here (see the research in
//! docs/overlay-design.md): over TCP it neither pads outgoing ChannelData
//! to 4 bytes nor skips the server's padding (RFC 8656 12.5), so frames are
//! cut and padded here; and a 401 to the authenticated Allocate (wrong
//! credentials) is passed back as "ignored" and only times out after half a
//! minute, so it is recognised here and reported at once.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use evio_overlay::path::{PathAddr, Via};
use stun_proto::agent::{StunAgent, StunAgentPollRet};
use stun_proto::types::attribute::{ErrorCode, XorMappedAddress};
use stun_proto::types::message::{Message, MessageClass, MessageWriteVec, TransactionId, BINDING};
use stun_proto::types::prelude::*;
use stun_proto::Instant as SioInstant;
use turn_client_proto::api::{Transmit, TurnConfig, TurnEvent, TurnPollRet, TurnRecvRet};
use turn_client_proto::prelude::*;
use turn_client_proto::tcp::TurnClientTcp;
use turn_client_proto::types::{TransportType, TurnCredentials};
use turn_client_proto::udp::TurnClientUdp;

use crate::udp::Udp;

turn_client_proto::impl_client!(TurnClient, (Udp, TurnClientUdp), (Tcp, TurnClientTcp));

/// How often server-reflexive candidates are gathered again: often enough
/// that a NAT that changed behaviour (symmetric to cone) or a new public
/// address is noticed well within the 30 s a relayed pair may wait for a
/// direct path.
pub const GATHER_INTERVAL: Duration = Duration::from_secs(10);
/// A reflexive address not confirmed for this long is dropped.
const REFLEXIVE_TTL: Duration = Duration::from_secs(35);
/// Retry pauses of a failed allocation: 1 s doubling to 10 s (a TURN server
/// that comes back is used again within seconds).
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(10);
/// Wrong credentials will not fix themselves quickly.
const RETRY_AUTH: Duration = Duration::from_secs(30);
/// Least time between two renewals of one allocation for dead paths.
const RENEW_PAUSE: Duration = Duration::from_secs(30);
/// A TCP connect or an allocation that takes longer failed.
const SETUP_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TurnTransport {
    Udp,
    Tcp,
}

/// One configured TURN server.
#[derive(Debug, Clone)]
pub struct TurnServer {
    pub server: SocketAddr,
    pub transport: TurnTransport,
    pub username: String,
    pub password: String,
}

/// The state of one TURN allocation, for `peers`/metrics and logs.
#[derive(Debug, Clone, PartialEq)]
pub enum TurnState {
    Idle,
    Connecting,
    Allocating,
    Ready(SocketAddr),
    Failed(String),
}

struct TcpConn {
    stream: TcpStream,
    connected: bool,
    local: SocketAddr,
    rx: Vec<u8>,
    tx: Vec<u8>,
    epoll: RawFd,
    token: u64,
    /// Whether EPOLLOUT is asked for (only while a backlog waits).
    want_out: bool,
}

struct Slot {
    conf: TurnServer,
    client: Option<TurnClient>,
    tcp: Option<TcpConn>,
    state: TurnState,
    started: Instant,
    retry_at: Instant,
    backoff: Duration,
    channels: HashSet<SocketAddr>,
    /// Error class responses seen while allocating (401 and friends).
    auth_error: Option<String>,
    /// Last [`Nat::renew`] of this allocation.
    renewed: Option<Instant>,
}

/// What arrived for the overlay through a relay.
pub type Deliver<'a> = dyn FnMut(PathAddr, &[u8]) + 'a;

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
    slots: Vec<Slot>,
    peer_ips: BTreeSet<IpAddr>,
    epoll: RawFd,
    /// Base of the epoll tokens of the TURN TCP sockets.
    token_base: u64,
    changed: bool,
    /// A TURN request was queued outside [`Nat::poll`] (a permission, a
    /// channel): the engine polls at once instead of at the next timer.
    poll_soon: bool,
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

fn epoll_set(epoll: RawFd, op: libc::c_int, fd: RawFd, events: u32, token: u64) {
    let mut ev = libc::epoll_event { events, u64: token };
    // SAFETY: ev is a valid epoll_event; errors (e.g. deleting an fd that
    // was never added) are harmless here.
    unsafe {
        libc::epoll_ctl(epoll, op, fd, &mut ev);
    }
}

impl Nat {
    pub fn new(
        now: Instant,
        port: u16,
        stun_servers: Vec<SocketAddr>,
        turn: Vec<TurnServer>,
        epoll: RawFd,
        token_base: u64,
    ) -> Nat {
        let local = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port);
        // TURN servers over UDP answer STUN too: with no STUN server
        // configured they still give us our reflexive address.
        let mut stun_list = stun_servers;
        for t in &turn {
            if t.transport == TurnTransport::Udp && !stun_list.contains(&t.server) {
                stun_list.push(t.server);
            }
        }
        let slots = turn
            .into_iter()
            .map(|conf| Slot {
                conf,
                client: None,
                tcp: None,
                state: TurnState::Idle,
                started: now,
                retry_at: now,
                backoff: RETRY_MIN,
                channels: HashSet::new(),
                auth_error: None,
                renewed: None,
            })
            .collect();
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
            slots,
            peer_ips: BTreeSet::new(),
            epoll,
            token_base,
            changed: false,
            poll_soon: false,
            junk: 0,
        }
    }

    /// Candidates of ours the NAT layer knows: reflexive and relayed.
    pub fn candidates(&self) -> Vec<(SocketAddr, evio_subnet::CandidateKind)> {
        let mut out: Vec<(SocketAddr, evio_subnet::CandidateKind)> = Vec::new();
        for (a, _) in self.reflexive.iter().flatten() {
            if !out.iter().any(|(x, _)| x == a) {
                out.push((*a, evio_subnet::CandidateKind::Reflexive));
            }
        }
        for s in &self.slots {
            if let TurnState::Ready(a) = s.state {
                out.push((a, evio_subnet::CandidateKind::Relay));
            }
        }
        out
    }

    /// IPs of relays: our allocations and the TURN servers.
    pub fn relay_ips(&self) -> Vec<IpAddr> {
        let mut v: Vec<IpAddr> = self.slots.iter().map(|s| s.conf.server.ip()).collect();
        for s in &self.slots {
            if let TurnState::Ready(a) = s.state {
                v.push(a.ip());
            }
        }
        v.sort();
        v.dedup();
        v
    }

    pub fn turn_states(&self) -> Vec<(SocketAddr, TurnTransport, TurnState)> {
        self.slots
            .iter()
            .map(|s| (s.conf.server, s.conf.transport, s.state.clone()))
            .collect()
    }

    /// Whether candidates changed since the last call.
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// Whether something waits to be sent by [`Nat::poll`] now.
    pub fn take_poll_soon(&mut self) -> bool {
        std::mem::take(&mut self.poll_soon)
    }

    /// Re-allocates on TURN server `idx` at once: a path through our
    /// allocation died, and a restarted server forgets allocations without
    /// telling (the client would notice only at its next refresh, minutes
    /// away). At most once per [`RENEW_PAUSE`], so a peer that is simply gone
    /// does not churn allocations.
    pub fn renew(&mut self, now: Instant, idx: usize) {
        let epoll = self.epoll;
        let Some(s) = self.slots.get_mut(idx) else {
            return;
        };
        if !matches!(s.state, TurnState::Ready(_))
            || s.renewed
                .is_some_and(|t| now.saturating_duration_since(t) < RENEW_PAUSE)
        {
            return;
        }
        s.renewed = Some(now);
        let server = s.conf.server;
        fail(
            s,
            epoll,
            now,
            format!("a relayed path through {server} stopped answering: renewing the allocation"),
        );
        s.retry_at = now;
        self.changed = true;
    }

    /// Gathers reflexive candidates again as soon as possible (an address
    /// changed, a path died).
    pub fn gather_soon(&mut self, now: Instant) {
        self.next_gather = self.next_gather.min(now);
        for s in &mut self.slots {
            if !matches!(s.state, TurnState::Ready(_)) && s.auth_error.is_none() {
                s.retry_at = s.retry_at.min(now);
                s.backoff = RETRY_MIN;
            }
        }
    }

    /// The public IPs of the peers: every allocation permits them, so that
    /// what they send to our relayed address reaches us.
    pub fn set_peer_ips(&mut self, now: Instant, ips: BTreeSet<IpAddr>) {
        self.peer_ips = ips;
        let t = sio(self.base, now);
        for s in &mut self.slots {
            if let Some(c) = s.client.as_mut() {
                permit(c, &self.peer_ips, t);
            }
        }
        self.poll_soon = true;
    }

    /// A datagram from the UDP socket whose first byte says STUN or
    /// ChannelData. Relayed peer data goes to `deliver`. False when it was
    /// nobody's (junk).
    pub fn on_udp(
        &mut self,
        now: Instant,
        from: SocketAddr,
        data: &[u8],
        deliver: &mut Deliver<'_>,
    ) -> bool {
        let t = sio(self.base, now);
        if let Ok(msg) = Message::from_bytes(data) {
            if msg.is_response() {
                if let Some(i) = self.bindings.get(&msg.transaction_id()).copied() {
                    if self.stun.handle_stun_message_with_time(&msg, from, t) {
                        self.bindings.remove(&msg.transaction_id());
                        if std::mem::take(&mut self.stun_misses[i]) > 0 {
                            let server = self.stun_servers[i];
                            for s in self.slots.iter_mut() {
                                if s.conf.server == server && matches!(s.state, TurnState::Ready(_))
                                {
                                    tracing::info!(%server, "TURN server answers again: renewing the allocation");
                                    fail(s, self.epoll, now, format!("{server} was unreachable"));
                                    s.retry_at = now;
                                    self.changed = true;
                                }
                            }
                        }
                        if let Ok(x) = msg.attribute::<XorMappedAddress>() {
                            let a = x.addr(msg.transaction_id());
                            let old = self.reflexive[i].map(|(o, _)| o);
                            if old != Some(a) {
                                tracing::info!(server = %self.stun_servers[i], reflexive = %a, "STUN: reflexive address");
                                self.changed = true;
                            }
                            self.reflexive[i] = Some((a, now));
                        }
                        return true;
                    }
                }
            }
        }
        for (idx, s) in self.slots.iter_mut().enumerate() {
            if s.conf.transport != TurnTransport::Udp || s.conf.server != from {
                continue;
            }
            let Some(c) = s.client.as_mut() else { continue };
            match c.recv(Transmit::new(data, TransportType::Udp, from, self.local), t) {
                TurnRecvRet::Handled => {}
                TurnRecvRet::PeerData(pd) => deliver(
                    PathAddr {
                        via: Via::Turn(idx as u8),
                        remote: pd.peer,
                    },
                    pd.data(),
                ),
                TurnRecvRet::PeerIcmp { .. } => {}
                TurnRecvRet::Ignored(tr) => note_auth_error(
                    s_conf_name(&s.conf),
                    &mut s.auth_error,
                    c,
                    tr.data,
                    &s.state,
                ),
            }
            self.process_events(now);
            return true;
        }
        self.junk += 1;
        false
    }

    /// Readiness of TURN TCP socket `idx`.
    pub fn on_tcp(&mut self, now: Instant, idx: usize, writable: bool, deliver: &mut Deliver<'_>) {
        let t = sio(self.base, now);
        let epoll = self.epoll;
        let token = self.token_base + idx as u64;
        let Some(s) = self.slots.get_mut(idx) else {
            return;
        };
        let Some(conn) = s.tcp.as_mut() else { return };
        if !conn.connected {
            if !writable {
                return;
            }
            match conn.stream.take_error() {
                Ok(None) => {}
                Ok(Some(e)) | Err(e) => {
                    fail(
                        s,
                        epoll,
                        now,
                        format!("TCP connect to {}: {e}", s.conf.server),
                    );
                    return;
                }
            }
            let Ok(local) = conn.stream.local_addr() else {
                fail(
                    s,
                    epoll,
                    now,
                    format!("TCP connect to {}: not connected", s.conf.server),
                );
                return;
            };
            conn.connected = true;
            conn.local = local;
            epoll_set(
                epoll,
                libc::EPOLL_CTL_MOD,
                conn.stream.as_raw_fd(),
                libc::EPOLLIN as u32,
                token,
            );
            let cfg = TurnConfig::new(TurnCredentials::new(&s.conf.username, &s.conf.password));
            s.client = Some(TurnClient::Tcp(TurnClientTcp::allocate(
                local,
                s.conf.server,
                cfg,
            )));
            s.state = TurnState::Allocating;
            self.poll(now, None);
            return;
        }
        if writable {
            flush_tcp(conn);
        }
        let mut buf = [0u8; 16 * 1024];
        loop {
            match conn.stream.read(&mut buf) {
                Ok(0) => {
                    fail(
                        s,
                        epoll,
                        now,
                        format!("TURN server {} closed the TCP connection", s.conf.server),
                    );
                    self.changed = true;
                    return;
                }
                Ok(n) => conn.rx.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    fail(s, epoll, now, format!("TURN server {}: {e}", s.conf.server));
                    self.changed = true;
                    return;
                }
            }
        }
        // Cut whole frames: STUN (20 + length, always 4-aligned) and
        // ChannelData (4 + length, padded to 4 on a stream).
        let server = s.conf.server;
        let mut used = 0;
        while conn.rx.len() - used >= 4 {
            let b = &conn.rx[used..];
            let len = usize::from(u16::from_be_bytes([b[2], b[3]]));
            let (frame, consumed) = match b[0] {
                0x00..=0x3f => (20 + len, 20 + len),
                0x40..=0x7f => (4 + len, (4 + len + 3) & !3),
                _ => {
                    fail(
                        s,
                        epoll,
                        now,
                        format!("TURN server {server}: garbage on the TCP stream"),
                    );
                    self.changed = true;
                    return;
                }
            };
            if b.len() < consumed {
                break;
            }
            let local = conn.local;
            if let Some(c) = s.client.as_mut() {
                match c.recv(
                    Transmit::new(&b[..frame], TransportType::Tcp, server, local),
                    t,
                ) {
                    TurnRecvRet::PeerData(pd) => deliver(
                        PathAddr {
                            via: Via::Turn(idx as u8),
                            remote: pd.peer,
                        },
                        pd.data(),
                    ),
                    TurnRecvRet::Ignored(tr) => note_auth_error(
                        s_conf_name(&s.conf),
                        &mut s.auth_error,
                        c,
                        tr.data,
                        &s.state,
                    ),
                    _ => {}
                }
                while let Some(pd) = c.poll_recv(t) {
                    deliver(
                        PathAddr {
                            via: Via::Turn(idx as u8),
                            remote: pd.peer,
                        },
                        pd.data(),
                    );
                }
            }
            used += consumed;
        }
        conn.rx.drain(..used);
        self.process_events(now);
    }

    /// Sends `data` to `to` through our allocation on server `idx`.
    pub fn send_via(
        &mut self,
        now: Instant,
        idx: u8,
        to: SocketAddr,
        data: &[u8],
        udp: &Udp,
    ) -> bool {
        let t = sio(self.base, now);
        let Some(s) = self.slots.get_mut(usize::from(idx)) else {
            return false;
        };
        let Some(c) = s.client.as_mut() else {
            return false;
        };
        if !matches!(s.state, TurnState::Ready(_)) {
            return false;
        }
        if !c.have_permission(TransportType::Udp, to.ip()) {
            let _ = c.create_permission(TransportType::Udp, to.ip(), t);
            self.poll_soon = true;
        }
        if s.channels.insert(to) {
            let _ = c.bind_channel(TransportType::Udp, to, t);
            self.poll_soon = true;
        }
        let Ok(Some(tb)) = c.send_to(TransportType::Udp, to, data, t) else {
            return false;
        };
        let tr = tb.build();
        match s.tcp.as_mut() {
            Some(conn) => {
                write_tcp(conn, &tr.data);
                true
            }
            None => udp.send_to(&tr.data, tr.to).is_ok(),
        }
    }

    /// Timers: STUN gathering, TURN set-up, refreshes and retries. Returns
    /// when it next needs to run.
    pub fn poll(&mut self, now: Instant, udp: Option<&Udp>) -> Instant {
        let t = sio(self.base, now);
        let mut wake = now + GATHER_INTERVAL;
        // STUN gathering.
        if now >= self.next_gather {
            self.next_gather = now + GATHER_INTERVAL;
            for (i, server) in self.stun_servers.iter().enumerate() {
                if self.bindings.values().any(|&b| b == i) {
                    continue;
                }
                let req = Message::builder_request(BINDING, MessageWriteVec::new());
                let tid = req.transaction_id();
                if let Ok(tr) = self.stun.send_request(req.finish(), *server, t) {
                    if let Some(u) = udp {
                        let _ = u.send_to(&tr.data, tr.to);
                    }
                    self.bindings.insert(tid, i);
                }
            }
        }
        for r in self.reflexive.iter_mut() {
            if r.is_some_and(|(_, at)| now.saturating_duration_since(at) > REFLEXIVE_TTL) {
                *r = None;
                self.changed = true;
            }
        }
        wake = wake.min(self.next_gather);
        loop {
            match self.stun.poll(t) {
                StunAgentPollRet::WaitUntil(w) => {
                    wake = wake.min(std_of(self.base, w));
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
            if let Some(u) = udp {
                let _ = u.send_to(tr.data, tr.to);
            }
        }
        // TURN.
        let epoll = self.epoll;
        for (idx, s) in self.slots.iter_mut().enumerate() {
            let token = self.token_base + idx as u64;
            if s.client.is_none() && s.tcp.is_none() {
                if now < s.retry_at {
                    wake = wake.min(s.retry_at);
                    continue;
                }
                start(s, self.local, epoll, token, now);
            }
            if matches!(s.state, TurnState::Connecting | TurnState::Allocating)
                && now.saturating_duration_since(s.started) > SETUP_TIMEOUT
            {
                let why = s.auth_error.clone().unwrap_or_else(|| {
                    format!(
                        "no allocation from {} within {}s",
                        s.conf.server,
                        SETUP_TIMEOUT.as_secs()
                    )
                });
                fail(s, epoll, now, why);
                self.changed = true;
                continue;
            }
            if let TurnState::Connecting = s.state {
                wake = wake.min(s.started + SETUP_TIMEOUT);
                continue;
            }
            let Some(c) = s.client.as_mut() else { continue };
            match c.poll(t) {
                TurnPollRet::WaitUntil(w) => wake = wake.min(std_of(self.base, w)),
                TurnPollRet::Closed => {
                    let why = s
                        .auth_error
                        .clone()
                        .unwrap_or_else(|| format!("allocation on {} closed", s.conf.server));
                    // Drain its events first: they may explain it.
                    while c.poll_event().is_some() {}
                    fail(s, epoll, now, why);
                    self.changed = true;
                    continue;
                }
                _ => {}
            }
            while let Some(tr) = c.poll_transmit(t) {
                match s.tcp.as_mut() {
                    Some(conn) => write_tcp(conn, &tr.data),
                    None => {
                        if let Some(u) = udp {
                            let _ = u.send_to(&tr.data, tr.to);
                        }
                    }
                }
            }
            if matches!(s.state, TurnState::Allocating) {
                wake = wake.min(s.started + SETUP_TIMEOUT);
            }
        }
        self.process_events(now);
        wake.max(now)
    }

    fn process_events(&mut self, now: Instant) {
        let t = sio(self.base, now);
        let mut lost = Vec::new();
        for (idx, s) in self.slots.iter_mut().enumerate() {
            let Some(c) = s.client.as_mut() else { continue };
            while let Some(ev) = c.poll_event() {
                match ev {
                    TurnEvent::AllocationCreated(_, addr) => {
                        tracing::info!(server = %s.conf.server, relayed = %addr, transport = ?s.conf.transport, "TURN: allocation created");
                        s.state = TurnState::Ready(addr);
                        s.backoff = RETRY_MIN;
                        s.auth_error = None;
                        s.channels.clear();
                        permit(c, &self.peer_ips, t);
                        self.changed = true;
                    }
                    // A refresh of a permission or channel refused: the
                    // server no longer knows the allocation (it restarted).
                    TurnEvent::PermissionCreateFailed(..) | TurnEvent::ChannelCreateFailed(..)
                        if matches!(s.state, TurnState::Ready(_)) =>
                    {
                        lost.push(idx);
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
        }
        for idx in lost {
            if let Some(s) = self.slots.get_mut(idx) {
                let server = s.conf.server;
                fail(
                    s,
                    self.epoll,
                    now,
                    format!("{server} no longer knows our allocation"),
                );
                s.retry_at = now;
                self.changed = true;
            }
        }
    }

    /// Deletes the allocations (shutdown) and waits, at most `wait`, for
    /// the servers to confirm: an allocation left behind would refuse the
    /// next agent on this address (the server keys it by the 5-tuple) until
    /// it expires, minutes later. A stale-nonce answer is retried by the
    /// client, which is why this keeps reading.
    pub fn shutdown(&mut self, now: Instant, udp: &Udp, wait: Duration) {
        let t = sio(self.base, now);
        for s in &mut self.slots {
            if let Some(c) = s.client.as_mut() {
                if !matches!(s.state, TurnState::Ready(_)) || c.delete(t).is_err() {
                    s.client = None;
                }
            }
        }
        let deadline = now + wait;
        let mut buf = vec![0u8; 4096];
        loop {
            let now = Instant::now();
            self.poll(now, Some(udp));
            let pending: Vec<usize> = (0..self.slots.len())
                .filter(|&i| self.slots[i].client.is_some())
                .collect();
            if pending.is_empty() || now >= deadline {
                return;
            }
            let mut fds = vec![libc::pollfd {
                fd: udp.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            for &i in &pending {
                if let Some(conn) = &self.slots[i].tcp {
                    fds.push(libc::pollfd {
                        fd: conn.stream.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    });
                }
            }
            let ms = deadline.saturating_duration_since(now).as_millis().min(50) as libc::c_int;
            // SAFETY: fds is a live array of pollfd of the stated length.
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms.max(1)) };
            while let Ok(Some((n, from))) = udp.recv_from(&mut buf) {
                if buf.first().is_some_and(|b| *b < 0x80) {
                    let data = buf[..n].to_vec();
                    self.on_udp(Instant::now(), from, &data, &mut |_, _| {});
                }
            }
            for &i in &pending {
                if self.slots[i].tcp.is_some() {
                    self.on_tcp(Instant::now(), i, false, &mut |_, _| {});
                }
            }
        }
    }
}

fn s_conf_name(c: &TurnServer) -> String {
    format!("{} ({:?})", c.server, c.transport)
}

/// turn-client-proto hands back an error answer to the authenticated
/// Allocate as "ignored"; that is how wrong credentials show.
fn note_auth_error(
    server: String,
    slot_err: &mut Option<String>,
    c: &mut TurnClient,
    data: &[u8],
    state: &TurnState,
) {
    if matches!(state, TurnState::Ready(_)) {
        return;
    }
    let Ok(msg) = Message::from_bytes(data) else {
        return;
    };
    if !msg.has_class(MessageClass::Error) {
        return;
    }
    if let Ok(e) = msg.attribute::<ErrorCode>() {
        let hint = match e.code() {
            401 | 431 => "check username and passwordFile",
            // The server keys allocations by our address and port: an
            // agent killed without deleting its allocation leaves one that
            // refuses the next until its lifetime (10 min by default) ends.
            437 => {
                "it still holds the allocation of a previous agent on this address \
                    (killed without deleting it); relayed paths resume when that expires"
            }
            486 => "its allocation quota for this user is used up",
            _ => "see the TURN server's log",
        };
        let why = format!(
            "TURN server {server} refused the allocation: {} {} ({hint})",
            e.code(),
            e.reason()
        );
        tracing::error!("{why}");
        *slot_err = Some(why);
        c.protocol_error();
    }
}

fn permit(c: &mut TurnClient, ips: &BTreeSet<IpAddr>, t: SioInstant) {
    for ip in ips {
        if ip.is_ipv4() && !c.have_permission(TransportType::Udp, *ip) {
            let _ = c.create_permission(TransportType::Udp, *ip, t);
        }
    }
}

fn start(s: &mut Slot, local: SocketAddr, epoll: RawFd, token: u64, now: Instant) {
    s.started = now;
    s.channels.clear();
    s.auth_error = None;
    let cfg = TurnConfig::new(TurnCredentials::new(&s.conf.username, &s.conf.password));
    match s.conf.transport {
        TurnTransport::Udp => {
            s.client = Some(TurnClient::Udp(TurnClientUdp::allocate(
                local,
                s.conf.server,
                cfg,
            )));
            s.state = TurnState::Allocating;
        }
        TurnTransport::Tcp => match connect_nonblocking(s.conf.server) {
            Ok(stream) => {
                epoll_set(
                    epoll,
                    libc::EPOLL_CTL_ADD,
                    stream.as_raw_fd(),
                    (libc::EPOLLIN | libc::EPOLLOUT) as u32,
                    token,
                );
                s.tcp = Some(TcpConn {
                    stream,
                    connected: false,
                    local,
                    rx: Vec::with_capacity(64 * 1024),
                    tx: Vec::new(),
                    epoll,
                    token,
                    want_out: true,
                });
                s.state = TurnState::Connecting;
            }
            Err(e) => {
                s.state = TurnState::Failed(format!("TCP to {}: {e}", s.conf.server));
                s.retry_at = now + s.backoff;
                s.backoff = (s.backoff * 2).min(RETRY_MAX);
            }
        },
    }
}

fn fail(s: &mut Slot, epoll: RawFd, now: Instant, why: String) {
    tracing::warn!(server = %s.conf.server, "TURN: {why}");
    if let Some(conn) = s.tcp.take() {
        epoll_set(epoll, libc::EPOLL_CTL_DEL, conn.stream.as_raw_fd(), 0, 0);
    }
    s.client = None;
    let pause = if s.auth_error.is_some() {
        RETRY_AUTH
    } else {
        s.backoff
    };
    s.retry_at = now + pause;
    s.backoff = (s.backoff * 2).min(RETRY_MAX);
    s.state = TurnState::Failed(why);
    s.channels.clear();
}

fn connect_nonblocking(to: SocketAddr) -> io::Result<TcpStream> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket(2).
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is ours; TcpStream owns and closes it.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    let SocketAddr::V4(v4) = to else {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "IPv6 TURN server",
        ));
    };
    // SAFETY: sockaddr_in is plain old data.
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    sa.sin_family = libc::AF_INET as libc::sa_family_t;
    sa.sin_port = v4.port().to_be();
    sa.sin_addr.s_addr = u32::from(*v4.ip()).to_be();
    // SAFETY: sa is a valid sockaddr_in.
    let r = unsafe {
        libc::connect(
            fd,
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e);
        }
    }
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

fn write_tcp(conn: &mut TcpConn, frame: &[u8]) {
    conn.tx.extend_from_slice(frame);
    // ChannelData on a stream is padded to 4 bytes (RFC 8656 12.5); STUN
    // messages are 4-aligned already.
    if frame.first().is_some_and(|b| (0x40..=0x7f).contains(b)) {
        let pad = ((frame.len() + 3) & !3) - frame.len();
        conn.tx.extend_from_slice(&[0u8; 3][..pad]);
    }
    flush_tcp(conn);
}

fn flush_tcp(conn: &mut TcpConn) {
    if !conn.connected {
        return;
    }
    let mut done = 0;
    while done < conn.tx.len() {
        match conn.stream.write(&conn.tx[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    conn.tx.drain(..done);
    // A relay over TCP is the slow path: bound the backlog and drop beyond
    // it, as a congested link would.
    if conn.tx.len() > 4 << 20 {
        conn.tx.clear();
    }
    // Ask for EPOLLOUT only while something waits, so an idle connection
    // never wakes the engine.
    let want = !conn.tx.is_empty();
    if want != conn.want_out {
        conn.want_out = want;
        let ev = libc::EPOLLIN as u32 | if want { libc::EPOLLOUT as u32 } else { 0 };
        epoll_set(
            conn.epoll,
            libc::EPOLL_CTL_MOD,
            conn.stream.as_raw_fd(),
            ev,
            conn.token,
        );
    }
}
