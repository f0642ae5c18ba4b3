//! The crypto state of one peer: WireGuard's handshake (Noise IKpsk2 via
//! snow), its sessions with explicit counters and replay windows, and its
//! timers (rekey on age and on message count, handshake retransmission,
//! session expiry). Paths are not known here: any datagram that
//! authenticates counts, wherever it came from.

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::Rng;
use snow::resolvers::DefaultResolver;
use snow::{HandshakeState, StatelessTransportState};

use zeroize::Zeroize;

use crate::crypto::{self, Key, SeededResolver, StaticKeys, MAC_LEN};
use crate::path::PathAddr;
use crate::replay::ReplayWindow;
use crate::wire::{self, INITIATION, RESPONSE, TRANSPORT};

pub const NOISE_PATTERN: &str = "Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s";

/// Cookies kept per tunnel, one per path (handshakes go to at most eight).
const MAX_COOKIES: usize = 8;

/// WireGuard's timers and limits (its paper, section 6), as fields so tests
/// can shrink them.
#[derive(Debug, Clone)]
pub struct TunnelConfig {
    pub rekey_after_time: Duration,
    pub reject_after_time: Duration,
    pub rekey_attempt_time: Duration,
    /// Longest wait between handshake retransmissions.
    pub rekey_timeout: Duration,
    /// First wait: retransmissions start here and double up to
    /// `rekey_timeout`, so a lost first initiation costs a fraction of a
    /// second at start-up rather than WireGuard's five.
    pub retry_initial: Duration,
    pub keepalive_timeout: Duration,
    pub rekey_after_messages: u64,
    pub reject_after_messages: u64,
}

impl Default for TunnelConfig {
    fn default() -> Self {
        TunnelConfig {
            rekey_after_time: Duration::from_secs(120),
            reject_after_time: Duration::from_secs(180),
            rekey_attempt_time: Duration::from_secs(90),
            rekey_timeout: Duration::from_secs(5),
            retry_initial: Duration::from_millis(250),
            keepalive_timeout: Duration::from_secs(10),
            rekey_after_messages: 1 << 60,
            reject_after_messages: u64::MAX - (1 << 13),
        }
    }
}

/// Why a datagram was refused (metrics labels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reject {
    /// Failed authentication: bad mac1, failed decryption, wrong key.
    Auth,
    /// A replayed transport counter or handshake timestamp.
    Replay,
    /// A transport message for no session we hold (expired, or forged index).
    NoSession,
    /// Not a message we know, or truncated.
    Malformed,
    /// A handshake refused by the flood protection.
    RateLimited,
    /// A valid handshake from a key not in the store.
    UnknownPeer,
}

impl Reject {
    pub const ALL: [Reject; 6] = [
        Reject::Auth,
        Reject::Replay,
        Reject::NoSession,
        Reject::Malformed,
        Reject::RateLimited,
        Reject::UnknownPeer,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reject::Auth => "auth",
            Reject::Replay => "replay",
            Reject::NoSession => "no_session",
            Reject::Malformed => "malformed",
            Reject::RateLimited => "rate_limited",
            Reject::UnknownPeer => "unknown_peer",
        }
    }
}

/// What every tunnel of this node shares: the static key, the network key
/// (the Noise PSK, zero when unset, as WireGuard's default) and the
/// prologue that binds sessions to this network. No `Debug`: it holds
/// secrets, wiped on drop.
pub struct Identity {
    pub keys: StaticKeys,
    /// The network key we send with: our initiations' PSK and mac1.
    pub network_key: Key,
    pub prologue: Vec<u8>,
    /// mac1 key of messages sent to us.
    pub mac1_key: Key,
    /// A second network key we accept during a rotation, with its mac1
    /// key: an initiation's mac1 tells which of the two its sender holds,
    /// and the response uses that one as PSK.
    also: Option<(Key, Key)>,
}

impl Identity {
    pub fn new(keys: StaticKeys, network_key: Option<Key>, network: &str) -> Identity {
        let network_key = network_key.unwrap_or([0; 32]);
        let mac1_key = crypto::mac1_key(keys.public(), &network_key);
        let mut prologue = b"evio-overlay v1 ".to_vec();
        prologue.extend_from_slice(network.as_bytes());
        Identity {
            keys,
            network_key,
            prologue,
            mac1_key,
            also: None,
        }
    }

    /// Also accepts `key` (the other line of a two-key network key file),
    /// so that nodes on either key reach this one during a rotation.
    pub fn also_accepting(mut self, key: Key) -> Identity {
        if key != self.network_key {
            let mac1 = crypto::mac1_key(self.keys.public(), &key);
            self.also = Some((key, mac1));
        }
        self
    }

    /// The network key a handshake message sent to us was sealed with
    /// (its mac1 matches), `None` when it matches neither of ours.
    pub fn key_of(&self, msg: &[u8]) -> Option<&Key> {
        if check_mac1(&self.mac1_key, msg) {
            return Some(&self.network_key);
        }
        self.also
            .as_ref()
            .filter(|(_, mac1)| check_mac1(mac1, msg))
            .map(|(k, _)| k)
    }

    /// A handshake builder whose ephemeral key comes from `rng` (see
    /// [`crypto::Seed`]).
    fn builder(&self, rng: &mut StdRng) -> snow::Builder<'_> {
        let resolver = SeededResolver::new(rng.gen());
        // The pattern is a constant that parses.
        let params = NOISE_PATTERN
            .parse()
            .unwrap_or_else(|_| unreachable!("constant Noise pattern"));
        snow::Builder::with_resolver(params, Box::new(resolver))
    }

    /// Whether `peer` is a usable X25519 public key against ours: a
    /// low-order point would make the shared secret all zeros.
    pub fn valid_peer_key(&self, peer: &Key) -> bool {
        use snow::resolvers::CryptoResolver;
        let Some(mut dh) = DefaultResolver.resolve_dh(&snow::params::DHChoice::Curve25519) else {
            return false;
        };
        dh.set(self.keys.private());
        let mut out = [0u8; 32];
        dh.dh(peer, &mut out).is_ok() && out != [0u8; 32]
    }
}

impl Drop for Identity {
    fn drop(&mut self) {
        self.network_key.zeroize();
        self.mac1_key.zeroize();
        if let Some((k, m)) = self.also.as_mut() {
            k.zeroize();
            m.zeroize();
        }
    }
}

/// TAI64N of a wall-clock time (seconds since the Unix epoch): the
/// initiation's anti-replay timestamp, which must grow per initiator even
/// across restarts, hence wall time.
pub fn tai64n(since_epoch: Duration) -> [u8; 12] {
    let mut t = [0u8; 12];
    t[..8].copy_from_slice(&(0x4000_0000_0000_000a_u64 + since_epoch.as_secs()).to_be_bytes());
    t[8..].copy_from_slice(&since_epoch.subsec_nanos().to_be_bytes());
    t
}

pub struct Session {
    pub local_index: u32,
    remote_index: u32,
    transport: StatelessTransportState,
    sent: u64,
    replay: ReplayWindow,
    born: Instant,
    /// We sent the initiation that made it: the initiator rekeys.
    pub we_initiated: bool,
}

impl Session {
    /// A session fresh from a completed handshake: nothing sent, nothing
    /// received yet.
    fn new(
        now: Instant,
        local_index: u32,
        remote_index: u32,
        transport: StatelessTransportState,
        we_initiated: bool,
    ) -> Self {
        Session {
            local_index,
            remote_index,
            transport,
            sent: 0,
            replay: ReplayWindow::default(),
            born: now,
            we_initiated,
        }
    }

    /// When the session may no longer be used, whatever its counters.
    fn expires_at(&self, cfg: &TunnelConfig) -> Instant {
        self.born + cfg.reject_after_time
    }

    fn expired(&self, now: Instant, cfg: &TunnelConfig) -> bool {
        now >= self.expires_at(cfg) || self.sent >= cfg.reject_after_messages
    }

    /// When this side starts a new handshake for the session's age. The
    /// initiator rekeys first; the responder only if the initiator has not
    /// done it well before expiry.
    fn rekey_at(&self, cfg: &TunnelConfig) -> Instant {
        self.born
            + if self.we_initiated {
                cfg.rekey_after_time
            } else {
                cfg.reject_after_time
                    .saturating_sub(cfg.keepalive_timeout + cfg.rekey_timeout)
            }
    }
}

struct Pending {
    hs: HandshakeState,
    local_index: u32,
    /// First attempt of this round: give up after `rekey_attempt_time`.
    started: Instant,
    sent: Instant,
    attempts: u32,
    mac1: [u8; MAC_LEN],
}

/// A completed handshake read from a peer's initiation, to be answered by
/// the tunnel of the peer it names.
pub struct Initiation {
    hs: HandshakeState,
    pub peer: Key,
    pub sender_index: u32,
    timestamp: [u8; 12],
}

/// Reads an initiation addressed to us (mac1 already checked by the
/// caller). The initiator's static key is known only after two DH
/// operations: that is why mac1 and cookies gate this.
pub fn read_initiation(id: &Identity, rng: &mut StdRng, msg: &[u8]) -> Result<Initiation, Reject> {
    if msg.len() != wire::INITIATION_LEN {
        return Err(Reject::Malformed);
    }
    // The initiator's ephemeral key, in clear at the start of the Noise
    // message: a small-order one would make both DH results it enters
    // (es, then ee) all zeros. One more DH, after mac1 and cookies.
    if crypto::low_order(&msg[8..8 + crypto::KEY_LEN]) {
        return Err(Reject::Auth);
    }
    let sender_index = wire::u32_at(msg, 4).ok_or(Reject::Malformed)?;
    let mut hs = id
        .builder(rng)
        .prologue(&id.prologue)
        .and_then(|b| b.local_private_key(id.keys.private()))
        .and_then(|b| b.build_responder())
        .map_err(|_| Reject::Auth)?;
    let mut ts = [0u8; 64];
    let n = hs
        .read_message(&msg[8..8 + wire::NOISE_INIT_LEN], &mut ts)
        .map_err(|_| Reject::Auth)?;
    if n != 12 {
        return Err(Reject::Auth);
    }
    let peer: Key = hs
        .get_remote_static()
        .and_then(|k| k.try_into().ok())
        .ok_or(Reject::Auth)?;
    let mut timestamp = [0u8; 12];
    timestamp.copy_from_slice(&ts[..12]);
    Ok(Initiation {
        hs,
        peer,
        sender_index,
        timestamp,
    })
}

/// The sender index of a response or the receiver index of a cookie reply
/// or transport message: where to look the datagram up.
pub fn receiver_index(msg: &[u8]) -> Option<u32> {
    match wire::message_type(msg)? {
        RESPONSE => wire::u32_at(msg, 8),
        wire::COOKIE_REPLY | TRANSPORT => wire::u32_at(msg, 4),
        _ => None,
    }
}

/// The per-peer state machine.
pub struct Tunnel {
    pub peer: Key,
    peer_mac1_key: Key,
    // Boxed: a session is about 430 bytes and a handshake in flight 900,
    // and every peer of the cluster has these slots while most of them,
    // with sessions on demand, never hold one (issue 22: 2.9 KiB per idle
    // peer inline, 0.6 KiB boxed). A box is made per handshake, never per
    // datagram.
    pub current: Option<Box<Session>>,
    previous: Option<Box<Session>>,
    /// Responder side, until the initiator's first transport message
    /// confirms it (then it becomes `current`).
    next: Option<Box<Session>>,
    pending: Option<Box<Pending>>,
    /// Cookies the peer sent us (for mac2), per path, with when each
    /// arrived: a cookie proves the address the peer saw us at, and that
    /// differs from path to path (a relay's address, another NAT mapping).
    /// One slot for all used to let a cookie for one path spoil the
    /// handshakes on the others.
    cookies: Vec<(PathAddr, [u8; MAC_LEN], Instant)>,
    /// Local index and mac1 of the last response we sent: a peer under
    /// load answers it with a cookie, as it would an initiation.
    responded: Option<(u32, [u8; MAC_LEN])>,
    last_timestamp: [u8; 12],
    /// A handshake round that ran out of time: wait this long before the
    /// next one (the caller still wants the peer).
    backoff_until: Option<Instant>,
    pub handshakes: u64,
}

/// What the tunnel's timers ask for.
#[derive(Debug, PartialEq, Eq)]
pub enum TimerAction {
    None,
    /// Send a (new) initiation.
    Initiate,
}

impl Tunnel {
    pub fn new(id: &Identity, peer: Key) -> Tunnel {
        Tunnel {
            peer,
            peer_mac1_key: crypto::mac1_key(&peer, &id.network_key),
            current: None,
            previous: None,
            next: None,
            pending: None,
            cookies: Vec::new(),
            responded: None,
            last_timestamp: [0; 12],
            backoff_until: None,
            handshakes: 0,
        }
    }

    /// The established sessions: current, previous, next.
    fn sessions(&self) -> impl Iterator<Item = &Session> + '_ {
        [&self.current, &self.previous, &self.next]
            .into_iter()
            .filter_map(Option::as_deref)
    }

    /// The session slots, to find a session by index or to empty a slot.
    fn slots_mut(&mut self) -> [&mut Option<Box<Session>>; 3] {
        [&mut self.current, &mut self.previous, &mut self.next]
    }

    /// Local indices this tunnel owns (for the caller's index map).
    pub fn indices(&self) -> impl Iterator<Item = u32> + '_ {
        self.sessions()
            .map(|s| s.local_index)
            .chain(self.pending.as_ref().map(|p| p.local_index))
    }

    /// Makes a pending initiation due now (a new candidate of the peer
    /// appeared: no reason to wait for the retransmission timer).
    pub fn retry_now(&mut self, cfg: &TunnelConfig) {
        if let Some(p) = self.pending.as_mut() {
            if let Some(t) = p.sent.checked_sub(cfg.rekey_timeout) {
                p.sent = t;
            }
        }
        self.backoff_until = None;
    }

    pub fn has_session(&self) -> bool {
        self.current.is_some()
    }

    pub fn handshaking(&self) -> bool {
        self.pending.is_some()
    }

    /// When the pending handshake round started, and how many initiations
    /// it sent.
    pub fn pending_since(&self) -> Option<(Instant, u32)> {
        self.pending.as_ref().map(|p| (p.started, p.attempts))
    }

    /// Writes an initiation with `local_index` (fresh and unique, from the
    /// caller) into `out`. A retransmission is a new initiation, as in
    /// WireGuard, so a lost one never leaves a half-made session.
    pub fn initiate(
        &mut self,
        id: &Identity,
        rng: &mut StdRng,
        now: Instant,
        wall: Duration,
        local_index: u32,
        out: &mut [u8; wire::INITIATION_LEN],
    ) -> Result<(), Reject> {
        let mut hs = id
            .builder(rng)
            .prologue(&id.prologue)
            .and_then(|b| b.local_private_key(id.keys.private()))
            .and_then(|b| b.remote_public_key(&self.peer))
            .and_then(|b| b.psk(2, &id.network_key))
            .and_then(|b| b.build_initiator())
            .map_err(|_| Reject::Auth)?;
        wire::put_prefix(out, INITIATION);
        out[4..8].copy_from_slice(&local_index.to_le_bytes());
        let n = hs
            .write_message(&tai64n(wall), &mut out[8..8 + wire::NOISE_INIT_LEN])
            .map_err(|_| Reject::Auth)?;
        debug_assert_eq!(n, wire::NOISE_INIT_LEN);
        let mac1 = self.seal_macs(now, &mut out[..], None);
        let (started, attempts) = match &self.pending {
            Some(p) => (p.started, p.attempts + 1),
            None => (now, 1),
        };
        self.pending = Some(Box::new(Pending {
            hs,
            local_index,
            started,
            sent: now,
            attempts,
            mac1,
        }));
        Ok(())
    }

    /// mac1 and mac2 at the end of a handshake message for path `to`
    /// (`None`: mac2 left zero, to be put per path with [`Tunnel::put_mac2`]).
    fn seal_macs(&self, now: Instant, msg: &mut [u8], to: Option<PathAddr>) -> [u8; MAC_LEN] {
        let l = msg.len();
        let mac1 = crypto::mac(&self.peer_mac1_key, &[&msg[..l - 32]]);
        msg[l - 32..l - 16].copy_from_slice(&mac1);
        msg[l - 16..].fill(0);
        if let Some(to) = to {
            self.put_mac2(now, msg, to);
        }
        mac1
    }

    /// mac2 of a sealed handshake message sent on `to`: with a fresh cookie
    /// the peer gave us for that path, else zero.
    pub fn put_mac2(&self, now: Instant, msg: &mut [u8], to: PathAddr) {
        let l = msg.len();
        if l < 32 {
            return;
        }
        let cookie = self.cookies.iter().find(|(p, _, at)| {
            *p == to && now.saturating_duration_since(*at) < crypto::COOKIE_SECRET_LIFETIME
        });
        let mac2 = match cookie {
            Some((_, c, _)) => crypto::mac(c, &[&msg[..l - 16]]),
            None => [0; MAC_LEN],
        };
        msg[l - 16..].copy_from_slice(&mac2);
    }

    /// Answers an initiation that named this peer: checks its timestamp
    /// and writes the response into `out`. The new session waits in `next`
    /// for the initiator's first transport message.
    pub fn respond(
        &mut self,
        now: Instant,
        mut init: Initiation,
        network_key: &Key,
        (local_index, to): (u32, PathAddr),
        out: &mut [u8; wire::RESPONSE_LEN],
    ) -> Result<(), Reject> {
        // TAI64N compares as big-endian bytes: strictly greater only.
        if init.timestamp <= self.last_timestamp {
            return Err(Reject::Replay);
        }
        init.hs.set_psk(2, network_key).map_err(|_| Reject::Auth)?;
        wire::put_prefix(out, RESPONSE);
        out[4..8].copy_from_slice(&local_index.to_le_bytes());
        out[8..12].copy_from_slice(&init.sender_index.to_le_bytes());
        init.hs
            .write_message(&[], &mut out[12..12 + wire::NOISE_RESP_LEN])
            .map_err(|_| Reject::Auth)?;
        let transport = init
            .hs
            .into_stateless_transport_mode()
            .map_err(|_| Reject::Auth)?;
        let mac1 = self.seal_macs(now, &mut out[..], Some(to));
        self.responded = Some((local_index, mac1));
        self.last_timestamp = init.timestamp;
        self.next = Some(Box::new(Session::new(
            now,
            local_index,
            init.sender_index,
            transport,
            false,
        )));
        self.handshakes += 1;
        Ok(())
    }

    /// Completes our initiation with the peer's response (mac1 checked by
    /// the caller). The caller then sends a keepalive so the responder can
    /// start using the session.
    pub fn on_response(&mut self, now: Instant, msg: &[u8]) -> Result<(), Reject> {
        if msg.len() != wire::RESPONSE_LEN {
            return Err(Reject::Malformed);
        }
        let sender = wire::u32_at(msg, 4).ok_or(Reject::Malformed)?;
        let receiver = wire::u32_at(msg, 8).ok_or(Reject::Malformed)?;
        let Some(p) = self.pending.as_mut().filter(|p| p.local_index == receiver) else {
            return Err(Reject::NoSession);
        };
        if crypto::low_order(&msg[12..12 + crypto::KEY_LEN]) {
            return Err(Reject::Auth);
        }
        let mut empty = [0u8; 16];
        p.hs.read_message(&msg[12..12 + wire::NOISE_RESP_LEN], &mut empty)
            .map_err(|_| Reject::Auth)?;
        let Some(p) = self.pending.take() else {
            return Err(Reject::NoSession);
        };
        let transport =
            p.hs.into_stateless_transport_mode()
                .map_err(|_| Reject::Auth)?;
        self.previous = self.current.take();
        self.current = Some(Box::new(Session::new(
            now,
            p.local_index,
            sender,
            transport,
            true,
        )));
        self.backoff_until = None;
        self.handshakes += 1;
        Ok(())
    }

    /// A cookie reply, arrived on `from`, to our pending initiation or to
    /// the last response we sent (WireGuard takes both): remember the cookie
    /// for mac2 of the next handshake message on that path. Without the
    /// second, a node under load never completed a handshake it started
    /// itself: it refused every response.
    pub fn on_cookie(&mut self, now: Instant, msg: &[u8], from: PathAddr) -> Result<(), Reject> {
        if msg.len() != wire::COOKIE_REPLY_LEN {
            return Err(Reject::Malformed);
        }
        let receiver = wire::u32_at(msg, 4).ok_or(Reject::Malformed)?;
        let pending = self
            .pending
            .as_ref()
            .filter(|p| p.local_index == receiver)
            .map(|p| p.mac1);
        let responded = self
            .responded
            .filter(|(index, _)| *index == receiver)
            .map(|(_, mac1)| mac1);
        let mac1 = pending.or(responded).ok_or(Reject::NoSession)?;
        let cookie = crypto::open_cookie(&self.peer, &mac1, &msg[8..]).ok_or(Reject::Auth)?;
        self.cookies.retain(|(p, _, _)| *p != from);
        if self.cookies.len() >= MAX_COOKIES {
            // The oldest goes (a handshake targets at most this many paths).
            if let Some(i) = (0..self.cookies.len()).min_by_key(|&i| self.cookies[i].2) {
                self.cookies.swap_remove(i);
            }
        }
        self.cookies.push((from, cookie, now));
        Ok(())
    }

    /// Encrypts `plaintext` (inner header + body) into a transport message
    /// in `out` on the current session; returns its length. None without a
    /// usable session.
    pub fn encrypt(
        &mut self,
        now: Instant,
        cfg: &TunnelConfig,
        plaintext: &[u8],
        out: &mut [u8],
    ) -> Option<usize> {
        let s = self.current.as_mut()?;
        if s.expired(now, cfg) {
            return None;
        }
        let need = wire::TRANSPORT_HEADER + plaintext.len() + wire::TAG_LEN;
        let out = out.get_mut(..need)?;
        let counter = s.sent;
        let n = s
            .transport
            .write_message(counter, plaintext, &mut out[wire::TRANSPORT_HEADER..])
            .ok()?;
        s.sent += 1;
        wire::put_prefix(out, TRANSPORT);
        out[4..8].copy_from_slice(&s.remote_index.to_le_bytes());
        out[8..16].copy_from_slice(&counter.to_le_bytes());
        Some(wire::TRANSPORT_HEADER + n)
    }

    /// Decrypts a transport message for local index `index` into `out`.
    /// The replay check happens before and after decryption: before to not
    /// spend a decryption on a known replay, after so that only datagrams
    /// that authenticated move the window.
    pub fn decrypt(
        &mut self,
        now: Instant,
        cfg: &TunnelConfig,
        index: u32,
        msg: &[u8],
        out: &mut [u8],
    ) -> Result<usize, Reject> {
        let counter = wire::u64_at(msg, 8).ok_or(Reject::Malformed)?;
        let body = msg.get(wire::TRANSPORT_HEADER..).ok_or(Reject::Malformed)?;
        if body.len() < wire::TAG_LEN {
            return Err(Reject::Malformed);
        }
        let is_next = self.next.as_ref().is_some_and(|s| s.local_index == index);
        let s = self
            .slots_mut()
            .into_iter()
            .flatten()
            .find(|s| s.local_index == index)
            .ok_or(Reject::NoSession)?;
        if s.expired(now, cfg) {
            return Err(Reject::NoSession);
        }
        if counter >= cfg.reject_after_messages || !s.replay.check(counter) {
            return Err(Reject::Replay);
        }
        let out = out.get_mut(..body.len()).ok_or(Reject::Malformed)?;
        let n = s
            .transport
            .read_message(counter, body, out)
            .map_err(|_| Reject::Auth)?;
        if !s.replay.accept(counter) {
            return Err(Reject::Replay);
        }
        if is_next {
            // Key confirmation: the initiator uses the session, so do we.
            self.previous = self.current.take();
            self.current = self.next.take();
            self.backoff_until = None;
        }
        Ok(n)
    }

    /// Drops expired sessions and says whether a handshake is due: no
    /// session, a session old enough or used enough to rekey, or a pending
    /// initiation due for retransmission. `wanted` is whether the peer
    /// should be connected at all.
    pub fn tick(&mut self, now: Instant, cfg: &TunnelConfig, wanted: bool) -> TimerAction {
        for slot in self.slots_mut() {
            if slot.as_ref().is_some_and(|s| s.expired(now, cfg)) {
                *slot = None;
            }
        }
        if !wanted {
            self.pending = None;
            return TimerAction::None;
        }
        if let Some(p) = &self.pending {
            if now.saturating_duration_since(p.started) >= cfg.rekey_attempt_time {
                // Give this round up; start over after a pause (the peer
                // may be down for a while: no busy retrying).
                self.pending = None;
                self.backoff_until = Some(now + cfg.rekey_timeout);
                return TimerAction::None;
            }
            return if now >= p.sent + retry_delay(cfg, p.attempts) {
                TimerAction::Initiate
            } else {
                TimerAction::None
            };
        }
        if self.backoff_until.is_some_and(|t| now < t) {
            return TimerAction::None;
        }
        match &self.current {
            None => TimerAction::Initiate,
            Some(s) => {
                if now >= s.rekey_at(cfg) || s.sent >= cfg.rekey_after_messages {
                    TimerAction::Initiate
                } else {
                    TimerAction::None
                }
            }
        }
    }

    /// When `tick` next has something to do.
    pub fn next_deadline(&self, cfg: &TunnelConfig, wanted: bool) -> Option<Instant> {
        let mut d: Option<Instant> = None;
        let mut at = |t: Instant| d = Some(d.map_or(t, |x| x.min(t)));
        for s in self.sessions() {
            at(s.expires_at(cfg));
        }
        if !wanted {
            return d;
        }
        if let Some(p) = &self.pending {
            at(p.sent + retry_delay(cfg, p.attempts));
            at(p.started + cfg.rekey_attempt_time);
        } else if let Some(b) = self.backoff_until {
            at(b);
        } else if let Some(s) = &self.current {
            at(s.rekey_at(cfg));
        }
        d
    }

    /// Forgets all sessions and handshakes (the peer left, or its key
    /// changed).
    pub fn reset(&mut self) {
        self.responded = None;
        self.current = None;
        self.previous = None;
        self.next = None;
        self.pending = None;
        self.backoff_until = None;
    }

    /// Age of the current session, for `lastHandshake`.
    pub fn session_born(&self) -> Option<Instant> {
        self.current.as_ref().map(|s| s.born)
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        // Derived from the network key; a cookie proves our address.
        self.peer_mac1_key.zeroize();
        for (_, c, _) in &mut self.cookies {
            c.zeroize();
        }
    }
}

/// 250 ms, 500 ms, 1 s, ... up to `rekey_timeout`.
fn retry_delay(cfg: &TunnelConfig, attempts: u32) -> Duration {
    let shift = attempts.saturating_sub(1).min(16);
    cfg.retry_initial
        .saturating_mul(1 << shift)
        .min(cfg.rekey_timeout)
}

/// Checks mac1 of a handshake message addressed to `mac1_key`'s owner.
pub fn check_mac1(mac1_key: &Key, msg: &[u8]) -> bool {
    let l = msg.len();
    l >= 32
        && crypto::ct_eq(
            &crypto::mac(mac1_key, &[&msg[..l - 32]]),
            &msg[l - 32..l - 16],
        )
}

/// The mac1 field of a handshake message (a cookie reply is bound to it).
pub fn mac1_of(msg: &[u8]) -> Option<&[u8]> {
    let l = msg.len();
    msg.get(l.checked_sub(32)?..l - 16)
}
