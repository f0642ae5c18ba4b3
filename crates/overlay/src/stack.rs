//! One node's overlay and NAT layer together, sans-IO: what the agent's
//! engine thread and the simulator both run. It takes datagrams, TCP bytes
//! of TURN connections, frames and time; it hands back datagrams, frames
//! and [`StackEvent`]s through [`NetIo`] and [`Stack::poll_event`]. The
//! rules that join the two layers live here once: the first-byte demux,
//! relayed datagrams in and out, which engine events renew an allocation or
//! gather candidates again, our candidate list, the peers' public IPs that
//! allocations permit.

use std::collections::{BTreeSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use crate::engine::{Event, Io, Overlay, PeerInfo, MAX_DATAGRAM};
use crate::family::Families;
use crate::nat::{Datagram, Nat, NatEvent, Sock, Transmit, TurnState, TurnTransport};
use crate::offload::{Csum, VnetHdr};
use crate::path::{PathAddr, Rank, Via};
use crate::wire::{self, Demux};

/// [`Io`], plus raw transmits of the NAT layer (STUN, TURN control,
/// relayed datagrams framed for the server).
pub trait NetIo: Io {
    fn transmit(&mut self, t: Transmit<'_>);
}

/// What the caller acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StackEvent {
    /// Our candidates changed: publish them.
    Candidates(Vec<(SocketAddr, Rank)>),
    /// Open a TCP connection to TURN server `conn` at `to`.
    TcpConnect {
        conn: usize,
        to: SocketAddr,
    },
    /// Close the TCP connection of TURN server `conn`.
    TcpClose {
        conn: usize,
    },
    /// Open a UDP socket on an ephemeral port for TURN server `conn` at
    /// `to`; its datagrams come back through [`Stack::handle_datagram_on`]
    /// with [`Sock::UdpOwn`]`(conn)`.
    UdpOpen {
        conn: usize,
        to: SocketAddr,
    },
    /// Close the UDP socket of TURN server `conn`.
    UdpClose {
        conn: usize,
    },
    /// Open spare UDP sockets `first..first + count` (birthday probing,
    /// [`crate::hunt`]) and tell [`Stack::spares_opened`]; their datagrams
    /// come back through [`Stack::handle_datagram_on`] with
    /// [`Sock::Spare`], and [`Io::commit`] sends on them for
    /// [`Via::Spare`] paths.
    SpareOpen {
        first: u32,
        count: u32,
    },
    SpareClose(Vec<u32>),
    /// What happened to a peer (up, down, handshakes, paths): for logs,
    /// `peers --explain` and tests.
    Overlay(Event),
    /// TURN server `conn`'s allocation changed state.
    Turn {
        conn: usize,
        server: SocketAddr,
        transport: TurnTransport,
        old: TurnState,
        new: TurnState,
    },
}

pub struct Stack {
    pub overlay: Overlay,
    pub nat: Nat,
    local: Vec<SocketAddr>,
    /// `overlay.announce`: published as they are (a port forward, a cloud
    /// VM's 1:1 NAT address), which no gathering can find.
    announced: Vec<SocketAddr>,
    /// The port mapping the gateway granted (`portmap`): published before
    /// the reflexive addresses, which it often equals.
    mapped: Option<SocketAddr>,
    /// Where relayed datagrams are framed for the TURN server.
    relay_buf: Vec<u8>,
    /// Where datagrams relayed over TCP are copied out of the stream.
    tcp_buf: Vec<u8>,
    events: VecDeque<StackEvent>,
    /// The TURN states last told (by server index).
    turn_seen: Vec<TurnState>,
    /// Our direct (reflexive, announced) candidates when last looked at.
    direct_seen: Vec<SocketAddr>,
    /// The peer set as the store gave it, and the address families we
    /// can send on (from our local candidates): the overlay gets only the
    /// candidates of our families ([`crate::family`]).
    peers: Vec<PeerInfo>,
    families: Families,
}

/// The caller's [`NetIo`] with relayed sends framed by the NAT layer.
struct Relaying<'a> {
    io: &'a mut dyn NetIo,
    nat: &'a mut Nat,
    buf: &'a mut [u8],
    now: Instant,
}

impl Io for Relaying<'_> {
    fn datagram(&mut self) -> &mut [u8] {
        self.io.datagram()
    }

    fn commit(&mut self, to: PathAddr, len: usize) {
        let Via::Turn(i) = to.via else {
            return self.io.commit(to, len);
        };
        let payload = &self.io.datagram()[..len];
        if let Some((via, server, n)) = self.nat.relay(self.now, i, to.remote, payload, self.buf) {
            self.io.transmit(Transmit {
                via,
                to: server,
                data: &self.buf[..n],
            });
        }
    }

    fn pod(&mut self, frame: &mut [u8], csum: Csum) {
        self.io.pod(frame, csum);
    }

    fn host(&mut self, packet: &mut [u8], csum: Csum) {
        self.io.host(packet, csum);
    }
}

/// Addresses a TURN server need not permit: they never reach it.
fn is_private(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => a.is_private() || a.is_loopback() || a.is_link_local(),
        IpAddr::V6(a) => a.is_loopback() || (a.segments()[0] & 0xfe00) == 0xfc00,
    }
}

impl Stack {
    pub fn new(overlay: Overlay, nat: Nat) -> Stack {
        Stack {
            overlay,
            nat,
            local: Vec::new(),
            announced: Vec::new(),
            mapped: None,
            relay_buf: vec![0; MAX_DATAGRAM + 64],
            tcp_buf: vec![0; 1 << 16],
            events: VecDeque::new(),
            turn_seen: Vec::new(),
            direct_seen: Vec::new(),
            peers: Vec::new(),
            families: Families::of(&[]),
        }
    }

    /// Our reflexive address changed (our NAT changed, or its address):
    /// peers silent toward each other's direct endpoints try again now.
    fn retry_if_moved(&mut self, now: Instant) {
        let direct: Vec<SocketAddr> = (self.candidates().into_iter())
            .filter(|(_, r)| *r == Rank::Direct)
            .map(|(a, _)| a)
            .collect();
        if direct.is_empty() || direct == self.direct_seen {
            return;
        }
        let moved = !self.direct_seen.is_empty();
        self.direct_seen = direct;
        if moved {
            self.overlay.retry_direct(now);
        }
    }

    /// Splits `self` for a call into the overlay whose relayed sends go
    /// through the NAT layer.
    fn parts<'a>(
        &'a mut self,
        now: Instant,
        io: &'a mut dyn NetIo,
    ) -> (&'a mut Overlay, Relaying<'a>) {
        let io = Relaying {
            io,
            nat: &mut self.nat,
            buf: &mut self.relay_buf,
            now,
        };
        (&mut self.overlay, io)
    }

    /// A datagram from the UDP socket.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        from: SocketAddr,
        d: &[u8],
        io: &mut dyn NetIo,
    ) {
        self.handle_datagram_on(now, Sock::Udp, from, d, io);
    }

    /// A datagram from UDP socket `via`: the overlay's, or a TURN server's
    /// own, which carries nothing but that server's traffic.
    pub fn handle_datagram_on(
        &mut self,
        now: Instant,
        via: Sock,
        from: SocketAddr,
        d: &[u8],
        io: &mut dyn NetIo,
    ) {
        match wire::demux(d) {
            Demux::Stun | Demux::ChannelData => {
                let got = self.nat.handle_datagram_on(now, via, from, d);
                if let Datagram::Relayed(p, inner) = got {
                    self.feed_relayed(now, p, inner, io);
                }
                self.pump(now, io);
            }
            Demux::Overlay if matches!(via, Sock::Spare(_)) => {
                let Sock::Spare(i) = via else { return };
                let from = PathAddr {
                    via: Via::Spare(i),
                    remote: from,
                };
                let (ov, mut rio) = self.parts(now, io);
                let _ = ov.from_network(now, from, d, &mut rio);
            }
            _ if via != Sock::Udp => self.nat.junk += 1,
            // Ours, or garbage the overlay counts as malformed.
            Demux::Overlay | Demux::Unknown => {
                let (ov, mut rio) = self.parts(now, io);
                let _ = ov.from_network(now, PathAddr::direct(from), d, &mut rio);
            }
        }
        // What a datagram asked of the caller (a hunt's spare sockets, on a
        // message relayed through the peer's allocation) goes out now, not
        // at the next timeout; datagrams that ask nothing skip the pump.
        if self.overlay.has_events() {
            self.pump(now, io);
        }
    }

    /// Bytes from the TCP connection of TURN server `conn`.
    pub fn handle_tcp_bytes(&mut self, now: Instant, conn: usize, d: &[u8], io: &mut dyn NetIo) {
        self.nat.handle_tcp_bytes(now, conn, d);
        // Taken out for the loop (a move, no allocation) so that the
        // datagram it holds can be fed through `&mut self`.
        let mut buf = std::mem::take(&mut self.tcp_buf);
        while let Some((p, n)) = self.nat.poll_relayed(now, &mut buf) {
            self.feed_relayed(now, p, &buf[..n], io);
        }
        self.tcp_buf = buf;
        self.pump(now, io);
    }

    /// A datagram a TURN server relayed from the peer at `p`, on either
    /// transport: the overlay's only when it is an overlay message (the
    /// relay passes on whatever the permitted address sends).
    fn feed_relayed(&mut self, now: Instant, p: PathAddr, bytes: &[u8], io: &mut dyn NetIo) {
        if wire::demux(bytes) == Demux::Overlay {
            let (ov, mut rio) = self.parts(now, io);
            let _ = ov.from_network(now, p, bytes, &mut rio);
        }
    }

    pub fn tcp_connected(
        &mut self,
        now: Instant,
        conn: usize,
        local: SocketAddr,
        io: &mut dyn NetIo,
    ) {
        self.nat.tcp_connected(now, conn, local);
        self.pump(now, io);
    }

    pub fn tcp_closed(&mut self, now: Instant, conn: usize, why: &str, io: &mut dyn NetIo) {
        self.nat.tcp_closed(now, conn, why);
        self.pump(now, io);
    }

    /// The UDP socket of TURN server `conn` is open, bound to `local`.
    pub fn udp_opened(&mut self, now: Instant, conn: usize, local: SocketAddr, io: &mut dyn NetIo) {
        self.nat.udp_opened(now, conn, local);
        self.pump(now, io);
    }

    /// Spare sockets `first..first + count` are open ([`StackEvent::SpareOpen`]).
    pub fn spares_opened(&mut self, now: Instant, first: u32, count: u32, io: &mut dyn NetIo) {
        let (ov, mut rio) = self.parts(now, io);
        ov.spares_opened(now, first, count, &mut rio);
        self.pump(now, io);
    }

    /// The UDP socket of TURN server `conn` could not be opened.
    pub fn udp_closed(&mut self, now: Instant, conn: usize, why: &str, io: &mut dyn NetIo) {
        self.nat.udp_closed(now, conn, why);
        self.pump(now, io);
    }

    /// A frame from the TAP.
    pub fn from_pod(&mut self, now: Instant, hdr: &VnetHdr, frame: &[u8], io: &mut dyn NetIo) {
        let (ov, mut rio) = self.parts(now, io);
        ov.from_pod(now, hdr, frame, &mut rio);
    }

    /// A packet from the host-overlay TUN.
    pub fn from_host(&mut self, now: Instant, hdr: &VnetHdr, packet: &[u8], io: &mut dyn NetIo) {
        let (ov, mut rio) = self.parts(now, io);
        ov.from_host(now, hdr, packet, &mut rio);
    }

    /// The peer set from the store: every allocation permits their public
    /// addresses.
    pub fn set_peers(&mut self, now: Instant, peers: &[PeerInfo]) {
        let ips: BTreeSet<IpAddr> = peers
            .iter()
            .flat_map(|p| p.candidates.iter().map(|c| c.addr.ip()))
            .filter(|ip| !is_private(ip))
            .collect();
        self.nat.set_peer_ips(now, ips);
        self.peers = peers.to_vec();
        self.give_peers(now);
    }

    /// Gives the overlay the peers' candidates it can use: those of our
    /// families, and those of a family we lack when one of our allocations
    /// has a relayed address of it (reached through that allocation).
    fn give_peers(&mut self, now: Instant) {
        let cross = self.cross_relays();
        let relayed = [cross[0].is_some(), cross[1].is_some()];
        self.overlay
            .set_peers_via(now, &self.families.filter_via(&self.peers, relayed), cross);
    }

    /// For each family we cannot send on (0 IPv4, 1 IPv6), the first of
    /// our ready allocations with a relayed address of that family: an
    /// IPv6-only node allocates over IPv6 and gets an IPv4 relayed address
    /// (coturn's default when no family is asked for), its one way to
    /// IPv4-only peers. Over TCP as over UDP.
    fn cross_relays(&self) -> [Option<u8>; 2] {
        let lacking = [!self.families.v4, !self.families.v6];
        let mut out = [None; 2];
        for i in 0..=usize::from(u8::MAX) {
            let Some((_, _, state)) = self.nat.turn_state(i) else {
                break;
            };
            if let TurnState::Ready(a) = state {
                let fam = usize::from(a.is_ipv6());
                if lacking[fam] && out[fam].is_none() {
                    out[fam] = u8::try_from(i).ok();
                }
            }
        }
        out
    }

    /// Our local-interface candidates (from the address watcher).
    pub fn set_local_candidates(&mut self, now: Instant, local: Vec<SocketAddr>) {
        if local != self.local {
            self.local = local;
            let families = Families::of(&self.local);
            if families != self.families {
                // An address family came or went: the peers' candidates
                // of that family become usable, or stop being tried.
                self.families = families;
                self.give_peers(now);
            }
            self.nat.gather_soon(now);
            self.publish();
        }
    }

    /// Candidates the operator announces (`overlay.announce`); peers
    /// probe them as they probe a reflexive address.
    pub fn set_announced(&mut self, announced: Vec<SocketAddr>) {
        if announced != self.announced {
            self.announced = announced;
            self.publish();
        }
    }

    /// The gateway's port mapping for us, or none any more; peers probe
    /// it as they probe a reflexive address.
    pub fn set_mapped(&mut self, mapped: Option<SocketAddr>) {
        if mapped != self.mapped {
            self.mapped = mapped;
            self.publish();
        }
    }

    pub fn mapped(&self) -> Option<SocketAddr> {
        self.mapped
    }

    /// Our candidates: local, announced, mapped, then reflexive and
    /// relayed, each address once.
    pub fn candidates(&self) -> Vec<(SocketAddr, Rank)> {
        let mut all: Vec<(SocketAddr, Rank)> =
            self.local.iter().map(|a| (*a, Rank::Local)).collect();
        let announced = self.announced.iter().chain(&self.mapped);
        let announced = announced.map(|a| (*a, Rank::Direct));
        for c in announced.chain(self.nat.candidates()) {
            if !all.iter().any(|(a, _)| *a == c.0) {
                all.push(c);
            }
        }
        all
    }

    fn publish(&mut self) {
        self.overlay.set_relay_ips(self.nat.relay_ips());
        self.events
            .push_back(StackEvent::Candidates(self.candidates()));
    }

    /// When [`Stack::handle_timeout`] must run next.
    pub fn poll_timeout(&self) -> Instant {
        self.overlay.poll_timeout().min(self.nat.poll_timeout())
    }

    /// Runs the timers that are due.
    pub fn handle_timeout(&mut self, now: Instant, wall: Duration, io: &mut dyn NetIo) {
        if now >= self.overlay.poll_timeout() {
            let (ov, mut rio) = self.parts(now, io);
            ov.handle_timeout(now, wall, &mut rio);
        }
        self.pump(now, io);
    }

    pub fn poll_event(&mut self) -> Option<StackEvent> {
        self.events.pop_front()
    }

    /// Carries events between the layers and sends what the NAT layer
    /// queued.
    fn pump(&mut self, now: Instant, io: &mut dyn NetIo) {
        while let Some(e) = self.overlay.poll_event() {
            match e {
                // Our public address may have changed, or the relay
                // restarted and forgot every allocation (the peer's that
                // this path went to, and ours).
                Event::ActivePathLost { .. } => {
                    self.nat.gather_soon(now);
                    self.nat.check_all(now);
                }
                Event::RelaySuspect(i) => self.nat.renew(now, usize::from(i)),
                Event::OpenSpares { first, count } => self
                    .events
                    .push_back(StackEvent::SpareOpen { first, count }),
                Event::CloseSpares(v) => self.events.push_back(StackEvent::SpareClose(v)),
                Event::PeerUp { .. }
                | Event::PeerDown { .. }
                | Event::Handshake { .. }
                | Event::HandshakeFailed { .. }
                | Event::PathChanged { .. } => self.events.push_back(StackEvent::Overlay(e)),
            }
        }
        if now >= self.nat.poll_timeout() {
            self.nat.handle_timeout(now);
        }
        self.turn_changes();
        if self.cross_relays() != self.overlay.cross_relays() {
            // An allocation of a family we lack came or went.
            self.give_peers(now);
        }
        while let Some(e) = self.nat.poll_event() {
            match e {
                NatEvent::CandidatesChanged => {
                    let (m, ip) = self.nat.mapping();
                    self.overlay.set_mapping(m, ip);
                    self.overlay.set_relays(now, self.nat.ready_relays());
                    self.publish();
                    self.retry_if_moved(now);
                }
                NatEvent::TcpConnect { conn, to } => {
                    self.events.push_back(StackEvent::TcpConnect { conn, to })
                }
                NatEvent::TcpClose { conn } => self.events.push_back(StackEvent::TcpClose { conn }),
                NatEvent::UdpOpen { conn, to } => {
                    self.events.push_back(StackEvent::UdpOpen { conn, to })
                }
                NatEvent::UdpClose { conn } => self.events.push_back(StackEvent::UdpClose { conn }),
            }
        }
        while let Some(t) = self.nat.poll_transmit() {
            io.transmit(t);
        }
    }

    /// Tells the TURN states that changed since the last call.
    fn turn_changes(&mut self) {
        for conn in 0.. {
            let Some((server, transport, state)) = self.nat.turn_state(conn) else {
                break;
            };
            if self.turn_seen.len() <= conn {
                self.turn_seen.push(TurnState::Idle);
            }
            if self.turn_seen[conn] != *state {
                let old = std::mem::replace(&mut self.turn_seen[conn], state.clone());
                self.events.push_back(StackEvent::Turn {
                    conn,
                    server,
                    transport,
                    old,
                    new: state.clone(),
                });
            }
        }
    }

    /// Starts deleting our TURN allocations; keep feeding datagrams,
    /// TCP bytes and timeouts until [`Stack::shut_down`].
    pub fn shutdown(&mut self, now: Instant, io: &mut dyn NetIo) {
        self.nat.shutdown(now);
        self.pump(now, io);
    }

    pub fn shut_down(&self) -> bool {
        self.nat.shut_down()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{seed_from_u64, StaticKeys};
    use crate::engine::OverlayConfig;
    use crate::nat::NatConfig;
    use crate::tunnel::Identity;

    fn stack() -> Stack {
        let now = Instant::now();
        let cfg = OverlayConfig::new("t", "10.244.1.0/24".parse().unwrap(), 1380);
        let id = Identity::new(StaticKeys::generate(), None, "t");
        let overlay = Overlay::new(now, cfg, id, seed_from_u64(1));
        let nat_cfg = NatConfig {
            port: 5800,
            stun: Vec::new(),
            turn: Vec::new(),
        };
        Stack::new(overlay, Nat::new(now, nat_cfg, seed_from_u64(2)))
    }

    /// Announced candidates are published as they are, after the local
    /// ones, each address once, and announcing them publishes at once.
    #[test]
    fn announced_candidates_are_published_after_the_local_ones() {
        let mut s = stack();
        let now = Instant::now();
        let lan: SocketAddr = "192.168.1.2:5800".parse().unwrap();
        let fwd: SocketAddr = "203.0.113.5:5800".parse().unwrap();
        s.set_local_candidates(now, vec![lan]);
        s.events.clear();
        s.set_announced(vec![fwd, lan]);
        assert_eq!(s.candidates(), [(lan, Rank::Local), (fwd, Rank::Direct)]);
        assert!(s
            .events
            .iter()
            .any(|e| matches!(e, StackEvent::Candidates(c) if c.contains(&(fwd, Rank::Direct)))));
        s.events.clear();
        s.set_announced(vec![fwd, lan]);
        assert!(s.events.is_empty(), "no change, nothing to publish");
    }

    /// A mapping is published once, before the reflexive address it
    /// usually equals, and withdrawn when it is lost.
    #[test]
    fn a_mapping_is_published_and_withdrawn() {
        let mut s = stack();
        let now = Instant::now();
        let lan: SocketAddr = "192.168.1.2:5800".parse().unwrap();
        let map: SocketAddr = "203.0.113.10:5800".parse().unwrap();
        s.set_local_candidates(now, vec![lan]);
        s.events.clear();
        s.set_mapped(Some(map));
        assert_eq!(s.candidates(), [(lan, Rank::Local), (map, Rank::Direct)]);
        assert_eq!(s.mapped(), Some(map));
        assert_eq!(s.events.len(), 1);
        s.set_mapped(Some(map));
        assert_eq!(s.events.len(), 1, "no change, nothing to publish");
        s.set_mapped(None);
        assert_eq!(s.candidates(), [(lan, Rank::Local)]);
        assert_eq!(s.events.len(), 2);
    }
}
