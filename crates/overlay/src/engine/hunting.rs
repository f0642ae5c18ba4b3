//! The engine's side of birthday probing ([`crate::hunt`]): the HUNT
//! messages, the cone side's probes, the symmetric side's spare sockets
//! (asked of the caller by index, [`Event::OpenSpares`]) in waves, each
//! when the cone side has probed enough for it.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use rand::Rng;

use super::{peer_mut, sooner, Event, Io, Overlay, PeerCandidate, PeerId, Wake};
use crate::hunt::{Action, Mapping, Msg};
use crate::path::{Origin, PathAddr, Paths, Rank, Via};
use crate::wire::{kind, Inner, INNER_HEADER};

/// How long the symmetric side keeps its sockets past the cone side's
/// probing (the Go message's trip, the last probe's answer).
const GRACE: Duration = Duration::from_secs(3);
/// The Go message goes over the relay, which may lose it: sent this many
/// times, this far apart (the cone side ignores a Go while it probes),
/// until the peer asks for a wave.
const GO_TIMES: u8 = 3;
const GO_EVERY: Duration = Duration::from_secs(1);
/// The first wave goes this long after the Go if the peer has not asked
/// for it: its Fire was lost, or an older agent that probes without
/// asking (behind a firewalled cone one wave is enough for it).
const FIRST_WAVE_ANYWAY: Duration = Duration::from_secs(3);
/// A wave's sockets stay this long after the next wave opens: a hit's
/// answer may still be on its way (the peer asks for the next wave
/// without knowing whether the last one got in).
const LAST_WAVE_KEPT: Duration = Duration::from_secs(1);
/// Learned addresses of the cone peer a wave goes to besides its published
/// ones, at most (each costs a wave's worth of datagrams).
const MAX_LEARNED_TARGETS: usize = 2;
/// Paths through spare sockets kept per peer, at most.
const SPARE_PATHS: usize = 4;

/// What birthday probing cost and found, for `peers`/metrics and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct HuntStats {
    /// Hunts this node took part in (as either side).
    pub hunts: u64,
    /// Probes this node sent to guessed ports (cone side).
    pub probes: u64,
    /// Spare sockets opened, and the datagrams sent from them.
    pub ports: u64,
    pub port_datagrams: u64,
    /// Hunts that found a path (either side).
    pub found: u64,
}

/// The symmetric side's hunt under way (one at a time per node).
#[derive(Debug, Clone, Copy)]
pub(super) struct Current {
    peer: PeerId,
    /// The current wave's sockets (none before the first wave).
    first: u32,
    count: u32,
    /// Waves opened so far.
    wave: u32,
    /// The wave before (first, count), kept until then.
    last: Option<(u32, u32, Instant)>,
    started: Instant,
    until: Instant,
    /// The current wave's sockets are out.
    ready: bool,
    /// The peer asked for a wave: it has the Go.
    heard: bool,
    /// Go messages sent, the last when.
    gos: u8,
    go_at: Instant,
}

/// The node-wide state.
#[derive(Debug, Default)]
pub(super) struct Hunter {
    pub(super) mapping: Mapping,
    public: Option<Ipv4Addr>,
    /// Spare sockets the caller has open.
    open: BTreeSet<u32>,
    current: Option<Current>,
    next: u32,
    pub(super) stats: HuntStats,
}

impl Overlay {
    /// Our NAT's mapping and public IPv4 address, from the NAT layer's
    /// STUN answers ([`Mapping::of`]).
    pub fn set_mapping(&mut self, m: Mapping, public: Option<Ipv4Addr>) {
        if m != self.hunter.mapping {
            tracing::info!(mapping = ?m, "NAT mapping (from STUN)");
        }
        self.hunter.mapping = m;
        self.hunter.public = public;
    }

    /// Replaces the hunt's bounds (tests; an agent that switches it off).
    pub fn set_hunt(&mut self, cfg: crate::hunt::HuntConfig) {
        self.cfg.hunt = cfg;
    }

    pub fn mapping(&self) -> Mapping {
        self.hunter.mapping
    }

    pub fn hunt_stats(&self) -> HuntStats {
        self.hunter.stats
    }

    /// Spare sockets `first..first + count` are open (fewer than asked if
    /// the caller could not open them all): one datagram leaves each
    /// toward the peer's endpoints (the peer has probed for them).
    pub fn spares_opened(&mut self, now: Instant, first: u32, count: u32, io: &mut dyn Io) {
        self.hunter.open.extend(first..first.saturating_add(count));
        let cur = self.hunter.current.as_mut();
        let Some(cur) = cur.filter(|c| c.first == first && !c.ready && count > 0) else {
            self.close_unused(self.hunter.current);
            return;
        };
        cur.ready = true;
        cur.count = count;
        let peer_id = cur.peer;
        let Some(p) = peer_mut(&mut self.peers, peer_id) else {
            self.close_unused(None);
            return;
        };
        let targets = wave_targets(&p.info.candidates, &p.paths);
        let wave = cur.wave;
        tracing::info!(peer = %p.info.node, wave, ports = count, targets = ?targets, "hunt: spare ports out");
        for i in first..first + count {
            for t in &targets {
                let to = PathAddr {
                    via: Via::Spare(i),
                    remote: *t,
                };
                self.scratch[INNER_HEADER..INNER_HEADER + 8].fill(0);
                if self.send_inner(now, peer_id, Some(to), Inner::plain(kind::PROBE), 8, io) {
                    self.hunter.stats.port_datagrams += 1;
                }
            }
        }
        self.hunter.stats.ports += u64::from(count);
    }

    /// Tells the peer of the hunt under way to probe (again, while the
    /// relay may have lost it and the peer has not asked for a wave).
    fn send_go(&mut self, now: Instant, io: &mut dyn Io) {
        let (Some(c), Some(ip)) = (self.hunter.current.as_mut(), self.hunter.public) else {
            return;
        };
        if c.heard || c.gos >= GO_TIMES || (c.gos > 0 && now < c.go_at + GO_EVERY) {
            return;
        }
        c.gos += 1;
        c.go_at = now;
        let peer_id = c.peer;
        self.send_hunt(now, peer_id, Msg::Go(ip), io);
    }

    /// A HUNT message in the first `n` bytes of the scratch.
    pub(super) fn on_hunt(&mut self, now: Instant, peer_id: PeerId, n: usize, io: &mut dyn Io) {
        let Some(msg) = self.scratch.get(INNER_HEADER..n).and_then(Msg::parse) else {
            return;
        };
        let (cfg, ours) = (self.cfg.hunt.clone(), self.hunter.mapping);
        let pending = self.hunt_pending(peer_id);
        let Some(p) = peer_mut(&mut self.peers, peer_id) else {
            return;
        };
        match msg {
            Msg::Hello(m) => {
                tracing::debug!(peer = %p.info.node, mapping = ?m, "hunt: the peer's mapping");
                // A peer repeats its hello only while it has not heard ours
                // (every 10 s at most): ours was lost, say it again. Without
                // this, two hellos that crossed, one of them lost, left a
                // side without the other's mapping for a whole round.
                let repeated = p.hunt.peer != Mapping::Unknown;
                p.hunt.peer = m;
                // Answered once, so that it learns ours if it spoke first.
                let stale =
                    (p.hunt.hello_at).is_none_or(|t| now.saturating_duration_since(t) >= cfg.again);
                if ours != Mapping::Unknown && cfg.enabled && (stale || repeated) {
                    p.hunt.hello_at = Some(now);
                    self.send_hunt(now, peer_id, Msg::Hello(ours), io);
                }
                self.open_if_due(now, peer_id, io);
            }
            Msg::Go(ip) => {
                // Only an address the peer's record publishes: the message
                // must not aim our probes at a third party.
                let published = p.info.candidates.iter().any(|c| c.addr.ip() == ip);
                if published && p.hunt.on_go(now, ip, ours, pending) {
                    tracing::info!(peer = %p.info.node, %ip, rate = cfg.rate, limit = ?cfg.limit, "hunt: probing the peer's ports");
                    self.hunter.stats.hunts += 1;
                    sooner(&mut self.deadlines, p, peer_id, now, Wake::Probe);
                }
            }
            Msg::Fire(wave) => self.open_wave(now, peer_id, u32::from(wave)),
        }
    }

    /// As the symmetric side: the peer has probed enough for `wave`, or
    /// the first wave is due anyway. The last wave's sockets no path uses
    /// are closed (their datagrams are out: a bare cone router has made
    /// them entries to itself, and a later probe to one of them leaves from
    /// another port), fresh ones opened.
    fn open_wave(&mut self, now: Instant, peer_id: PeerId, wave: u32) {
        let waves = self.cfg.hunt.waves;
        let Some(c) = self.hunter.current.as_mut().filter(|c| c.peer == peer_id) else {
            return;
        };
        c.heard |= wave > 0;
        let wave = wave.max(1);
        if wave <= c.wave || wave > waves {
            return;
        }
        let (first, count) = (self.hunter.next, self.cfg.hunt.ports);
        self.hunter.next = first.wrapping_add(count);
        c.last = (c.wave > 0).then_some((c.first, c.count, now + LAST_WAVE_KEPT));
        c.wave = wave;
        c.first = first;
        c.count = count;
        c.ready = false;
        let keep = *c;
        self.close_unused(Some(keep));
        tracing::info!(peer = ?peer_id, wave, count, "hunt: opening spare ports");
        self.push_event(Event::OpenSpares { first, count });
    }

    fn send_hunt(&mut self, now: Instant, peer_id: PeerId, msg: Msg, io: &mut dyn Io) {
        msg.write(&mut self.scratch[INNER_HEADER..INNER_HEADER + Msg::LEN]);
        self.send_inner(now, peer_id, None, Inner::plain(kind::HUNT), Msg::LEN, io);
    }

    /// As the symmetric side: starts a hunt (the peer probes first, our
    /// sockets follow in waves) when the peer is a cone, nothing else is
    /// hunted, and our public IP is known.
    fn open_if_due(&mut self, now: Instant, peer_id: PeerId, io: &mut dyn Io) {
        let (cfg, ours) = (&self.cfg.hunt, self.hunter.mapping);
        let free = self.hunter.current.is_none() && self.hunter.public.is_some();
        let pending = self.hunt_pending(peer_id);
        let Some(p) = peer_mut(&mut self.peers, peer_id) else {
            return;
        };
        if !cfg.enabled || !free || !p.hunt.should_open(now, ours, pending) {
            return;
        }
        p.hunt.next_round = Some(now + cfg.again);
        let first = self.hunter.next;
        self.hunter.current = Some(Current {
            peer: peer_id,
            first,
            count: 0,
            wave: 0,
            last: None,
            started: now,
            until: now + cfg.limit + GRACE,
            ready: false,
            heard: false,
            gos: 0,
            go_at: now,
        });
        tracing::info!(peer = %p.info.node, "hunt: asking the peer to probe");
        sooner(&mut self.deadlines, p, peer_id, now + GO_EVERY, Wake::Probe);
        self.hunter.stats.hunts += 1;
        self.send_go(now, io);
    }

    /// Moves peer `peer_id`'s hunt on (from its path timers).
    pub(super) fn hunt_tick(&mut self, now: Instant, peer_id: PeerId, io: &mut dyn Io) {
        let (cfg, ours) = (self.cfg.hunt.clone(), self.hunter.mapping);
        let pending = self.hunt_pending(peer_id);
        self.one_spare_path(peer_id);
        let Some(p) = peer_mut(&mut self.peers, peer_id) else {
            return;
        };
        let before = p.hunt.spray;
        let action = p.hunt.tick(now, &cfg, pending, ours);
        p.paths.hunting = p.hunt.hunting();
        match action {
            Action::None => {}
            Action::Hello => {
                self.send_hunt(now, peer_id, Msg::Hello(ours), io);
                self.open_if_due(now, peer_id, io);
            }
            Action::Probe(n) => {
                self.spray(now, peer_id, n, io);
                self.ask_for_wave(now, peer_id, io);
            }
            Action::Done => {
                let found = !pending;
                self.hunter.stats.found += u64::from(found);
                let (sent, took) = before.map_or((0, Duration::ZERO), |s| (s.sent, now - s.since));
                tracing::info!(peer = %p.info.node, found, probes = sent, took = ?took, "hunt: probing ended");
            }
        }
        self.end_if_done(now, peer_id, io);
        if let Some(c) = self.hunter.current.filter(|c| c.peer == peer_id) {
            if c.wave == 0 && now >= c.started + FIRST_WAVE_ANYWAY {
                self.open_wave(now, peer_id, 0);
            }
            if c.last.is_some_and(|(_, _, until)| now >= until) {
                let cur = self.hunter.current.as_mut().map(|c| {
                    c.last = None;
                    *c
                });
                self.close_unused(cur);
            }
            self.send_go(now, io);
        }
    }

    /// As the cone side: asks the peer for its next wave of sockets once
    /// our probes add up to it (over the relay; a lost one is skipped, the
    /// next wave asked for later).
    fn ask_for_wave(&mut self, now: Instant, peer_id: PeerId, io: &mut dyn Io) {
        let cfg = &self.cfg.hunt;
        let Some(s) = peer_mut(&mut self.peers, peer_id).and_then(|p| p.hunt.spray.as_mut()) else {
            return;
        };
        let Some(wave) = s.wave_due(cfg) else {
            return;
        };
        s.waves = wave;
        let sent = s.sent;
        tracing::debug!(peer = ?peer_id, wave, probes = sent, "hunt: asking for a wave");
        let wave = u8::try_from(wave).unwrap_or(u8::MAX);
        self.send_hunt(now, peer_id, Msg::Fire(wave), io);
    }

    /// Relayed, and no direct path answers: what a hunt is for.
    fn hunt_pending(&self, peer_id: PeerId) -> bool {
        self.peer(peer_id).is_some_and(|p| {
            p.paths.active().is_some_and(|a| a.class == Rank::Relay)
                && p.paths.direct_pending(&self.cfg.paths)
        })
    }

    /// A wave can hit several of our mappings at once (all the probes
    /// before it count), and the peer picks its own path among those it
    /// learned: the spare paths that answer are kept (the active one and
    /// up to [`SPARE_PATHS`] in all), so that whichever the peer uses
    /// still reaches a socket; the others, and those that stop answering,
    /// go with their sockets.
    fn one_spare_path(&mut self, peer_id: PeerId) {
        let pcfg = &self.cfg.paths;
        let Some(p) = peer_mut(&mut self.peers, peer_id) else {
            return;
        };
        let active = p.paths.active_addr();
        let before = p.paths.list.len();
        let mut kept = usize::from(active.is_some_and(|a| matches!(a.via, Via::Spare(_))));
        p.paths.list.retain(|x| {
            if !matches!(x.addr.via, Via::Spare(_)) || Some(x.addr) == active {
                return true;
            }
            let keep = x.alive(pcfg) && kept < SPARE_PATHS;
            kept += usize::from(keep);
            keep
        });
        if p.paths.list.len() == before {
            return;
        }
        p.paths.active = active.and_then(|a| p.paths.find(&a));
        if self.hunter.current.is_none_or(|c| c.peer != peer_id) {
            self.close_unused(self.hunter.current);
        }
    }

    /// As the cone side: `n` probes to random ports of the peer's IP.
    fn spray(&mut self, now: Instant, peer_id: PeerId, n: u32, io: &mut dyn Io) {
        let Some(s) = self.peer(peer_id).and_then(|p| p.hunt.spray) else {
            return;
        };
        for _ in 0..n {
            let port = self.rng.gen_range(1024..=u16::MAX);
            let to = PathAddr::direct(SocketAddr::new(s.ip.into(), port));
            self.probe_id = self.probe_id.wrapping_add(1);
            let id = self.probe_id.to_le_bytes();
            self.scratch[INNER_HEADER..INNER_HEADER + 8].copy_from_slice(&id);
            self.send_inner(now, peer_id, Some(to), Inner::plain(kind::PROBE), 8, io);
        }
        self.hunter.stats.probes += u64::from(n);
        if let Some(sp) = peer_mut(&mut self.peers, peer_id).and_then(|p| p.hunt.spray.as_mut()) {
            sp.sent += n;
        }
    }

    /// As the symmetric side: the hunt of `peer_id` found its path or ran
    /// out: the sockets no path uses are closed.
    fn end_if_done(&mut self, now: Instant, peer_id: PeerId, io: &mut dyn Io) {
        let Some(cur) = self.hunter.current.filter(|c| c.peer == peer_id) else {
            return;
        };
        let pcfg = &self.cfg.paths;
        let found = self.peer(peer_id).is_some_and(|p| {
            (p.paths.list.iter()).any(|x| matches!(x.addr.via, Via::Spare(_)) && x.alive(pcfg))
        });
        if found || now >= cur.until {
            self.hunter.stats.found += u64::from(found && cur.ready);
            tracing::info!(found, ports = cur.count, "hunt: spare ports done");
            self.hunter.current = None;
            self.one_spare_path(peer_id);
            self.close_unused(None);
            self.open_next(now, io);
        }
    }

    /// As the symmetric side, once a hunt is over: the next peer that
    /// wants one. A peer that asked while another hunt ran was turned away
    /// by [`Overlay::open_if_due`], and the Hello that would ask again
    /// comes only once a round (5 minutes): without this, of a symmetric
    /// node's cone peers only the first was hunted in time (natpaths
    /// benchmark: half the cone – symmetric pairs still relayed after
    /// 120 s).
    fn open_next(&mut self, now: Instant, io: &mut dyn Io) {
        if self.hunter.current.is_some() || self.hunter.mapping != Mapping::Dependent {
            return;
        }
        for peer_id in 0..self.peers.len() as PeerId {
            self.open_if_due(now, peer_id, io);
            if self.hunter.current.is_some() {
                return;
            }
        }
    }

    /// Closes the spare sockets no path of any peer uses (but those of the
    /// hunt under way); a hunt whose peer went or whose time is up ends.
    pub(super) fn hunt_housekeeping(&mut self, now: Instant, io: &mut dyn Io) {
        if let Some(c) = self.hunter.current {
            let gone = self.peer(c.peer).is_none();
            if gone || now >= c.until {
                self.hunter.current = None;
            }
        }
        self.close_unused(self.hunter.current);
        self.open_next(now, io);
    }

    fn close_unused(&mut self, keep: Option<Current>) {
        let used: BTreeSet<u32> = (self.peers.iter().flatten())
            .flat_map(|p| p.paths.list.iter())
            .filter_map(|x| match x.addr.via {
                Via::Spare(i) => Some(i),
                _ => None,
            })
            .collect();
        let keep = |i: &u32| {
            keep.is_some_and(|c| {
                let last = c.last.is_some_and(|(f, n, _)| (f..f + n).contains(i));
                last || (c.first..c.first + c.count).contains(i)
            })
        };
        let close: Vec<u32> = (self.hunter.open.iter())
            .filter(|i| !used.contains(i) && !keep(i))
            .copied()
            .collect();
        if close.is_empty() {
            return;
        }
        for i in &close {
            self.hunter.open.remove(i);
        }
        self.push_event(Event::CloseSpares(close));
    }

    /// When peer `peer_id`'s hunt needs its timers (with its paths').
    pub(super) fn hunt_deadline(&self, peer_id: PeerId) -> Option<Instant> {
        let p = self.peer(peer_id)?;
        let own = p.hunt.deadline(&self.cfg.hunt, self.hunter.mapping);
        let cur = self.hunter.current.filter(|c| c.peer == peer_id);
        let spares = cur.map(|c| c.until);
        let go = cur
            .filter(|c| !c.heard && c.gos < GO_TIMES)
            .map(|c| c.go_at + GO_EVERY);
        let first_wave = cur
            .filter(|c| c.wave == 0)
            .map(|c| c.started + FIRST_WAVE_ANYWAY);
        let last = cur.and_then(|c| c.last).map(|(_, _, until)| until);
        (own.into_iter()
            .chain(spares)
            .chain(go)
            .chain(first_wave)
            .chain(last))
        .min()
    }
}

/// Where a wave's datagrams go: the cone peer's published direct IPv4
/// endpoints, and where its new flows really leave from if a relay showed
/// us (`relayed_source`): behind a bare gateway whose node talks to many
/// peers, a clash has often moved the port of its new flows, the probes
/// it sends us among them, away from the published one (natpaths
/// benchmark: every symmetric – bare pair relayed while the two-node lab
/// test went direct). At most [`MAX_LEARNED_TARGETS`] of those, newest
/// first, each on an IP the peer publishes.
fn wave_targets(candidates: &[PeerCandidate], paths: &Paths) -> Vec<SocketAddr> {
    let mut targets: Vec<SocketAddr> = candidates
        .iter()
        .filter(|c| c.class == Rank::Direct && c.addr.is_ipv4())
        .map(|c| c.addr)
        .collect();
    let learned: Vec<SocketAddr> = (paths.list.iter().rev())
        .filter(|x| x.origin == Origin::Learned && matches!(x.addr.via, Via::Direct))
        .map(|x| x.addr.remote)
        .filter(|a| a.is_ipv4() && !targets.contains(a))
        .filter(|a| targets.iter().any(|t| t.ip() == a.ip()))
        .take(MAX_LEARNED_TARGETS)
        .collect();
    targets.extend(learned);
    targets
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::path::PathConfig;

    #[test]
    fn a_wave_also_goes_to_the_newest_learned_ports_of_a_published_ip() {
        let now = Instant::now();
        let cfg = PathConfig::default();
        let a = |s: &str| -> SocketAddr { s.parse().expect("addr") };
        let candidates = [
            PeerCandidate {
                addr: a("192.168.1.2:5800"),
                class: Rank::Local,
            },
            PeerCandidate {
                addr: a("203.0.113.10:5800"),
                class: Rank::Direct,
            },
            PeerCandidate {
                addr: a("203.0.113.1:49152"),
                class: Rank::Relay,
            },
        ];
        let mut paths = Paths::default();
        for learned in [
            "203.0.113.10:26659",
            "198.51.100.7:4000",
            "203.0.113.10:2792",
            "203.0.113.10:31000",
        ] {
            paths.learn_untried(now, &cfg, PathAddr::direct(a(learned)));
        }
        assert_eq!(
            wave_targets(&candidates, &paths),
            [
                a("203.0.113.10:5800"),
                a("203.0.113.10:31000"),
                a("203.0.113.10:2792")
            ],
            "published direct first, then the two newest learned on its IP; never the LAN, \
             the relay or an IP it does not publish"
        );
        assert_eq!(
            wave_targets(&candidates, &Paths::default()),
            [a("203.0.113.10:5800")]
        );
    }
}
