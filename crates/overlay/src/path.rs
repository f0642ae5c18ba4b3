//! Paths to one peer and which one carries its traffic. A path is where
//! datagrams go (`remote`) and how they leave (`via` our own socket or one of
//! our TURN allocations). Paths come from the peer's published candidates
//! and from authenticated datagrams that arrive from somewhere new (NAT
//! rebinding, the Linux NAT's port reallocation, a peer sending through its
//! relay). Every path is checked with authenticated probes inside the
//! session; only a path that answered is ever used, so "direct" in `peers`
//! means a direct path that carries authenticated traffic right now.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// A punching cue goes on at most this many paths that answer.
pub const MAX_CUE_PATHS: usize = 4;

use crate::reason::PathWhy;

/// How a datagram leaves this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Via {
    /// The agent's UDP socket.
    Direct,
    /// Through our allocation on TURN server `n` (index into the config).
    Turn(u8),
    /// From the agent's spare UDP socket `n`, opened for birthday probing
    /// ([`crate::hunt`]): the mapping of our symmetric NAT a peer's probe
    /// found.
    Spare(u32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PathAddr {
    pub via: Via,
    pub remote: SocketAddr,
}

impl PathAddr {
    pub fn direct(remote: SocketAddr) -> PathAddr {
        PathAddr {
            via: Via::Direct,
            remote,
        }
    }
}

/// Ranking class: lower is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Rank {
    /// To a local-interface candidate of the peer: same LAN, no hairpin.
    Local = 0,
    Direct = 1,
    Relay = 2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Published by the peer in the store.
    Candidate,
    /// Learned from an authenticated datagram.
    Learned,
}

/// Timing of path checks.
#[derive(Debug, Clone)]
pub struct PathConfig {
    /// Probe interval of the path in use (when nothing else arrived on it).
    pub active_interval: Duration,
    /// Probe interval of other paths that answer.
    pub standby_interval: Duration,
    /// Probe interval of paths that never answered (hole punching retries).
    pub unproven_interval: Duration,
    /// A probe not answered within this is lost.
    pub probe_timeout: Duration,
    /// Consecutive lost probes that make a path dead.
    pub dead_after: u32,
    /// A better path must beat the current one's RTT by this fraction.
    pub hysteresis: f64,
    /// Keep at most this many paths per peer.
    pub max_paths: usize,
    /// A path not heard from for this long is not trusted when a new
    /// session begins ([`Paths::demote_stale`]): the NATs' UDP timeout.
    pub stale_after: Duration,
}

impl Default for PathConfig {
    fn default() -> Self {
        PathConfig {
            active_interval: Duration::from_secs(1),
            standby_interval: Duration::from_secs(5),
            unproven_interval: Duration::from_secs(5),
            probe_timeout: Duration::from_secs(1),
            dead_after: 3,
            hysteresis: 0.2,
            max_paths: 16,
            stale_after: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Path {
    pub addr: PathAddr,
    pub class: Rank,
    pub origin: Origin,
    /// Last authenticated datagram that arrived on it.
    pub last_rx: Option<Instant>,
    /// Probe in flight: id and when it left.
    pub probe: Option<(u64, Instant)>,
    pub next_probe: Instant,
    /// Consecutive probes lost.
    pub lost: u32,
    /// Smoothed round-trip time.
    pub rtt: Option<Duration>,
    /// Unanswered since it was added: backs off.
    pub tries: u32,
    /// When it was added (how long an unanswered path has been tried).
    pub since: Instant,
    /// It first answered during a coordinated punching attempt
    /// ([`crate::punch`]).
    pub punched: bool,
    /// Found by birthday probing ([`crate::hunt`]).
    pub predicted: bool,
}

impl Path {
    fn new(addr: PathAddr, class: Rank, origin: Origin, now: Instant) -> Path {
        Path {
            addr,
            class,
            origin,
            last_rx: None,
            probe: None,
            next_probe: now,
            lost: 0,
            rtt: None,
            tries: 0,
            since: now,
            punched: false,
            predicted: matches!(addr.via, Via::Spare(_)),
        }
    }

    /// Answered, and not lost since.
    pub fn alive(&self, cfg: &PathConfig) -> bool {
        self.last_rx.is_some() && self.lost < cfg.dead_after
    }

    /// Class, then RTT; an IPv6 direct path's RTT counts `1 + hysteresis`
    /// times less, so that it wins while it is within the hysteresis of
    /// an IPv4 one (crate::family).
    fn score(&self, hysteresis: f64) -> (Rank, Duration) {
        let rtt = self.rtt.unwrap_or(Duration::from_secs(1));
        let rtt = match self.direct_v6() {
            true => rtt.div_f64(1.0 + hysteresis.max(0.0)),
            false => rtt,
        };
        (self.select_class(), rtt)
    }

    /// The class path selection compares: a peer's host address that is
    /// a public IPv4 one (a node without NAT) is on the internet, not on
    /// our LAN, so it competes with IPv6 on RTT as a direct path does.
    fn select_class(&self) -> Rank {
        match self.class {
            Rank::Local if crate::family::is_public_v4(self.addr.remote.ip()) => Rank::Direct,
            c => c,
        }
    }

    /// A private IPv4 address of the peer that never answered: its host
    /// address on a LAN that is not ours. Coordinated punching attempts
    /// leave it out. Every datagram to it makes a flow through our NAT
    /// beside the one to the peer's public address, and behind a bare Linux
    /// gateway two such flows, made at the same instant in every attempt,
    /// hand a moved port on to each other: the router gives a new flow the
    /// port of the node's newest entry, and the other flow's entry from the
    /// last attempt, expired but not yet reaped by conntrack's garbage
    /// collector, still counts. The attempt in the right order then fails
    /// too (docs/natlab.md, "Why bare-first attempts still failed"). A pair
    /// on one LAN connects on its plain tries, before any attempt, and one
    /// whose LAN path broke keeps trying it (it answered once).
    fn behind_other_lan(&self) -> bool {
        self.class == Rank::Local
            && self.select_class() == Rank::Local
            && self.addr.remote.is_ipv4()
            && self.last_rx.is_none()
    }

    /// Leaves our own socket for an IPv6 address.
    pub fn direct_v6(&self) -> bool {
        self.addr.via == Via::Direct && self.addr.remote.is_ipv6()
    }

    /// How it came to carry traffic, for `peers`: its class, and for a
    /// direct path whether the peer published it, we learned it from a
    /// datagram (peer-reflexive), or a coordinated punch opened it.
    pub fn method(&self) -> Method {
        match (self.class, self.origin) {
            (Rank::Relay, _) => Method::Relay,
            (Rank::Local, _) => Method::Local,
            _ if self.predicted => Method::Predicted,
            _ if self.punched => Method::Punched,
            (Rank::Direct, Origin::Learned) => Method::Learned,
            (Rank::Direct, Origin::Candidate) => Method::Reflexive,
        }
    }
}

/// How the working path was found (`peers --json`'s `method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// The peer's local-interface address (same LAN).
    Local,
    /// A reflexive (or announced) address the peer published.
    Reflexive,
    /// An address authenticated datagrams came from (peer-reflexive: a
    /// full-cone peer's moved port, NAT rebinding).
    Learned,
    /// Opened by a coordinated silence-and-alternate attempt.
    Punched,
    /// Found by birthday probing of a symmetric NAT ([`crate::hunt`]).
    Predicted,
    /// Through a TURN relay.
    Relay,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Local => "local",
            Method::Reflexive => "reflexive",
            Method::Learned => "learned",
            Method::Punched => "punched",
            Method::Predicted => "predicted",
            Method::Relay => "relay",
        }
    }
}

/// The path set of one peer.
#[derive(Debug, Clone, Default)]
pub struct Paths {
    pub list: Vec<Path>,
    /// Index of the path in use.
    pub active: Option<usize>,
    /// When `active` last changed (for `peers`), and why.
    pub changed: Option<Instant>,
    pub why: PathWhy,
    /// Nothing goes to the peer's own endpoints that do not answer (the
    /// silence of [`crate::punch`]); relayed paths are not muted.
    pub mute: bool,
    /// A coordinated punching attempt is under way: a path that first
    /// answers now was punched.
    pub punching: bool,
    /// We probe the peer's symmetric NAT ([`crate::hunt`]): a path learned
    /// now was found that way.
    pub hunting: bool,
    /// The last direct path that came up did so on plain probes (neither a
    /// coordinated punching attempt nor birthday probing opened it), and
    /// the peer's NAT has not shown a moved port since: both NATs let a
    /// datagram in once their own side sent one, as cones do. A new
    /// direct candidate then gets a quick second probe
    /// ([`Paths::poll`]).
    pub plain: bool,
}

/// What a direct path that just answered says of the pair's NATs
/// ([`Paths::plain`]); nothing for a relayed or same-LAN one.
fn plain_evidence(p: &Path) -> Option<bool> {
    (p.class == Rank::Direct).then_some(!p.punched && !p.predicted)
}

/// What [`Paths::poll`] wants sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeDue {
    pub addr: PathAddr,
    pub id: u64,
}

impl Paths {
    pub fn active(&self) -> Option<&Path> {
        self.active.and_then(|i| self.list.get(i))
    }

    pub fn active_addr(&self) -> Option<PathAddr> {
        self.active().map(|p| p.addr)
    }

    pub fn find(&self, addr: &PathAddr) -> Option<usize> {
        self.list.iter().position(|p| &p.addr == addr)
    }

    /// Replaces the published candidates with `cands` (address, class),
    /// keeping the state of those that stay. Learned paths stay too; the
    /// active path stays while it works, wherever it came from.
    /// Returns whether a candidate is new (not known before).
    pub fn set_candidates(
        &mut self,
        now: Instant,
        cfg: &PathConfig,
        cands: &[(PathAddr, Rank)],
    ) -> bool {
        let active = self.active_addr();
        self.list.retain(|p| {
            p.origin == Origin::Learned
                || Some(p.addr) == active
                || cands.iter().any(|(a, _)| *a == p.addr)
        });
        let mut added = false;
        for (a, class) in cands {
            match self.list.iter_mut().find(|p| p.addr == *a) {
                Some(p) => {
                    p.class = *class;
                    p.origin = Origin::Candidate;
                }
                None => {
                    self.list
                        .push(Path::new(*a, *class, Origin::Candidate, now));
                    added = true;
                }
            }
        }
        self.trim(cfg);
        self.active = active.and_then(|a| self.find(&a));
        added
    }

    /// Drops the worst surplus paths, never the active one.
    fn trim(&mut self, cfg: &PathConfig) {
        while self.list.len() > cfg.max_paths {
            let active = self.active_addr();
            let victim = self
                .list
                .iter()
                .enumerate()
                .filter(|(_, p)| Some(p.addr) != active)
                .max_by_key(|(_, p)| (p.alive(cfg) as u8 ^ 1, p.origin == Origin::Learned, p.lost))
                .map(|(i, _)| i);
            match victim {
                Some(i) => {
                    self.list.remove(i);
                    self.active = active.and_then(|a| self.find(&a));
                }
                None => break,
            }
        }
    }

    /// An authenticated datagram arrived on `addr`. Returns true when the
    /// path was new (learned). `class` classifies it if new.
    pub fn on_rx(&mut self, now: Instant, cfg: &PathConfig, addr: PathAddr, class: Rank) -> bool {
        self.on_rx_of(now, cfg, addr, class, true)
    }

    /// [`Paths::on_rx`]; `answer` false for a keepalive: the peer sends
    /// those on its own clock (`busy_keepalive` for 10 s after our last
    /// frame reached it), so one tells the way from the peer works and
    /// nothing of ours: the path's lost probes stay counted, its probe
    /// stays due, and a path found dead stays dead, or a path dead our way
    /// would stay up on them. A new path (the peer's NAT moved) is learned
    /// all the same, and probed at once.
    pub fn on_rx_of(
        &mut self,
        now: Instant,
        cfg: &PathConfig,
        addr: PathAddr,
        class: Rank,
        answer: bool,
    ) -> bool {
        let is_active = self.active_addr() == Some(addr);
        let learned = match self.find(&addr) {
            Some(i) if !answer => {
                let p = &mut self.list[i];
                let dead = !p.alive(cfg);
                p.last_rx = Some(now);
                if dead {
                    // Nor is a path found dead taken up again on one: our
                    // frames would vanish on it until it died once more.
                    return false;
                }
                false
            }
            Some(i) => {
                let p = &mut self.list[i];
                let up = !p.alive(cfg);
                // Dead (or never answered) until a coordinated attempt.
                p.punched |= self.punching && up;
                p.last_rx = Some(now);
                p.lost = 0;
                p.tries = 0;
                if up {
                    self.plain = plain_evidence(p).unwrap_or(self.plain);
                }
                let p = &mut self.list[i];
                if is_active && p.probe.is_none() {
                    // Traffic proves the path: no probe until it stops.
                    p.next_probe = p.next_probe.max(now + cfg.active_interval);
                }
                false
            }
            None => {
                let mut p = Path::new(addr, class, Origin::Learned, now);
                p.punched = self.punching;
                p.predicted |= self.hunting;
                p.last_rx = Some(now);
                // Probe it right away to learn its RTT.
                p.next_probe = now;
                self.plain = plain_evidence(&p).unwrap_or(self.plain);
                self.list.push(p);
                self.trim(cfg);
                true
            }
        };
        // Roaming: the path in use went quiet while the peer reaches us on
        // another one (its NAT mapping changed, or it fell back to a
        // relay): switch now rather than after the dead-path timeout. To
        // a worse class only once the path in use lost a probe: without
        // traffic it is always quiet (nothing probes it), and the peer's
        // probe of its standby relay path would move an idle pair to the
        // relay for good (issue 22).
        let quiet = self.active().is_none_or(|a| {
            a.addr != addr
                && a.last_rx
                    .is_none_or(|t| now.saturating_duration_since(t) > cfg.active_interval)
                && (a.lost > 0
                    || self
                        .find(&addr)
                        .is_none_or(|i| self.list[i].class <= a.class))
        });
        if quiet {
            match self.find(&addr) {
                Some(i) if self.active != Some(i) => {
                    self.why = if self.active.is_some() {
                        PathWhy::Roamed
                    } else {
                        PathWhy::First
                    };
                    // Left for a worse class (the path in use lost a probe,
                    // the peer fell back first): every better path that went
                    // quiet as well is dead until it answers a probe again,
                    // sent now. Alive on their older answers, the next
                    // reselect took one straight back, and frames flapped
                    // between a dead path and the relay until it lost two
                    // probes more.
                    let class = self.list[i].class;
                    if self.active.is_some_and(|a| self.list[a].class < class) {
                        for p in self.list.iter_mut().filter(|p| {
                            p.class < class
                                && p.last_rx.is_some_and(|t| {
                                    now.saturating_duration_since(t) > cfg.active_interval
                                })
                        }) {
                            p.lost = cfg.dead_after;
                            p.probe = None;
                            p.tries = 0;
                            p.next_probe = now;
                        }
                    }
                    self.active = Some(i);
                    self.changed = Some(now);
                    self.list[i].next_probe = self.list[i].next_probe.min(now);
                }
                _ => self.reselect(now, cfg, false),
            }
        }
        learned
    }

    /// A direct address of the peer that nothing came from yet and that it
    /// did not publish (where a relay saw its datagrams come from): probed
    /// as a candidate is, kept as a learned path. Returns whether it was
    /// new.
    pub fn learn_untried(&mut self, now: Instant, cfg: &PathConfig, addr: PathAddr) -> bool {
        if self.find(&addr).is_some() {
            return false;
        }
        // The peer's NAT gave a new flow another port than the one it
        // published: a bare Linux gateway's doing (docs/natlab.md), whose
        // punching early datagrams upset.
        self.plain = false;
        self.list
            .push(Path::new(addr, Rank::Direct, Origin::Learned, now));
        self.trim(cfg);
        self.find(&addr).is_some()
    }

    /// A probe reply with `id` arrived (on any path of this peer).
    pub fn on_probe_reply(&mut self, now: Instant, cfg: &PathConfig, id: u64) {
        let Some(p) = self
            .list
            .iter_mut()
            .find(|p| p.probe.is_some_and(|(probe, _)| probe == id))
        else {
            return;
        };
        if let Some((_, sent)) = p.probe.take() {
            let sample = now.saturating_duration_since(sent);
            p.rtt = Some(match p.rtt {
                // RFC 6298's smoothing.
                Some(r) => (r * 7 + sample) / 8,
                None => sample,
            });
        }
        let up = !p.alive(cfg);
        p.punched |= self.punching && up;
        if up {
            self.plain = plain_evidence(p).unwrap_or(self.plain);
        }
        p.last_rx = Some(now);
        p.lost = 0;
        p.tries = 0;
        self.reselect(now, cfg, false);
    }

    /// Picks the path to use. `force` switches to the best path even within
    /// the hysteresis.
    pub fn reselect(&mut self, now: Instant, cfg: &PathConfig, force: bool) {
        let best = self
            .list
            .iter()
            .enumerate()
            .filter(|(_, p)| p.alive(cfg))
            .min_by_key(|(_, p)| p.score(cfg.hysteresis))
            .map(|(i, _)| i);
        let Some(b) = best else {
            if self.active.is_some_and(|a| !self.list[a].alive(cfg)) {
                self.active = None;
                self.changed = Some(now);
                self.why = PathWhy::ProbesLost;
            }
            return;
        };
        let switch = match self.active.and_then(|a| self.list.get(a).map(|p| (a, p))) {
            None => Some(PathWhy::First),
            Some((a, _)) if a == b => None,
            Some((_, cur)) if !cur.alive(cfg) => Some(PathWhy::ProbesLost),
            Some((_, cur)) => {
                let new = &self.list[b];
                let (nc, cc) = (new.select_class(), cur.select_class());
                if nc != cc {
                    (force || nc < cc).then_some(PathWhy::BetterClass)
                } else {
                    let h = cfg.hysteresis;
                    let faster = match (new.rtt, cur.rtt) {
                        (Some(_), Some(_)) => {
                            let n = new.score(h).1.as_secs_f64();
                            let c = cur.score(h).1.as_secs_f64();
                            // To IPv6: within the hysteresis is enough;
                            // back to IPv4 (or within a family): faster by
                            // the hysteresis, on the weighted RTTs.
                            match new.direct_v6() && !cur.direct_v6() {
                                true => n <= c,
                                false => n < c * (1.0 - h),
                            }
                        }
                        _ => false,
                    };
                    (force || faster).then_some(PathWhy::BetterRtt)
                }
            }
        };
        if let Some(why) = switch {
            self.why = why;
            self.active = Some(b);
            self.changed = Some(now);
            let p = &mut self.list[b];
            p.next_probe = p.next_probe.min(now + cfg.active_interval);
        }
    }

    /// Expires lost probes and returns the probes due now (at most one per
    /// path), given fresh `ids`. TURN allocations (by index) one of whose
    /// answering paths just died go to `dead_relays`: the allocation may be
    /// gone (the server restarted).
    pub fn poll(
        &mut self,
        now: Instant,
        cfg: &PathConfig,
        next_id: &mut u64,
        out: &mut Vec<ProbeDue>,
        dead_relays: &mut Vec<u8>,
    ) {
        let active = self.active;
        let quick = self.plain && !self.punching;
        let mut lost_any = false;
        for (i, p) in self.list.iter_mut().enumerate() {
            if let Some((_, sent)) = p.probe {
                if now.saturating_duration_since(sent) >= cfg.probe_timeout {
                    p.probe = None;
                    p.lost += 1;
                    lost_any = true;
                    if p.lost == cfg.dead_after && p.last_rx.is_some() {
                        if let Via::Turn(i) = p.addr.via {
                            dead_relays.push(i);
                        }
                    }
                }
            }
            if p.probe.is_some() || now < p.next_probe || muted(self.mute, self.punching, p, cfg) {
                continue;
            }
            let interval = if Some(i) == active {
                cfg.active_interval
            } else if p.alive(cfg) {
                cfg.standby_interval
            } else if p.class == Rank::Relay && p.last_rx.is_none() && p.tries < 3 {
                // A relayed path is not punched: it works once the
                // allocations at both ends permit each other. A fresh one
                // loses its first datagrams while they do not yet (the
                // TURN client sends nothing to an IP before the server
                // confirmed its permission, paced one request per 50 ms,
                // and the peer's new allocation drops ours until it has
                // one for us): retried a punching interval later, that
                // lost probe cost most of a pair's recovery after a TURN
                // restart, when both sides allocate again at once (sim:
                // 7-10 s instead of 4-5 s).
                p.tries += 1;
                cfg.active_interval
            } else if quick && p.class == Rank::Direct && p.last_rx.is_none() && p.tries == 0 {
                // A new direct candidate of a pair whose NATs are cones
                // (the peer moved): a lost first probe would cost a whole
                // punching interval, with the peer's datagrams filtered by
                // our NAT until one of ours goes out. Not where punching
                // needs silence (bare gateways): there every early
                // datagram refreshes the flows that spoil the next
                // attempt.
                p.tries += 1;
                cfg.active_interval
            } else {
                // Unproven or dead: keep punching, backing off to twice
                // the interval (a relayed pair retries direct paths at
                // least every 10 s).
                p.tries = p.tries.saturating_add(1);
                cfg.unproven_interval * (1 + (p.tries > 3) as u32)
            };
            p.next_probe = now + interval;
            *next_id = next_id.wrapping_add(1);
            p.probe = Some((*next_id, now));
            out.push(ProbeDue {
                addr: p.addr,
                id: *next_id,
            });
        }
        if lost_any {
            self.reselect(now, cfg, false);
        }
    }

    /// No probe of the active path before its interval from now (it was
    /// heard from since traffic last went to it): as traffic on it does.
    pub fn defer_active(&mut self, now: Instant, cfg: &PathConfig) {
        if let Some(p) = self.active.and_then(|i| self.list.get_mut(i)) {
            if p.probe.is_none() {
                p.next_probe = p.next_probe.max(now + cfg.active_interval);
            }
        }
    }

    /// Earliest moment `poll` has something to do (`skip_active`: on
    /// paths other than the active one).
    pub fn next_deadline(&self, cfg: &PathConfig, skip_active: bool) -> Option<Instant> {
        self.list
            .iter()
            .enumerate()
            .filter(|(i, _)| !skip_active || self.active != Some(*i))
            .filter(|(_, p)| p.probe.is_some() || !muted(self.mute, self.punching, p, cfg))
            .map(|(_, p)| match p.probe {
                // Nothing is sent on a path while its probe is out.
                Some((_, sent)) => sent + cfg.probe_timeout,
                None => p.next_probe,
            })
            .min()
    }

    /// Every path a handshake initiation should be sent on: all of them,
    /// the active one first (up to `max`).
    /// Muted paths get nothing (the silence of [`crate::punch`]).
    pub fn handshake_targets<'a>(
        &'a self,
        max: usize,
        cfg: &'a PathConfig,
    ) -> impl Iterator<Item = PathAddr> + 'a {
        let active = self.active_addr();
        active
            .into_iter()
            .chain(
                self.list
                    .iter()
                    .filter(move |p| !muted(self.mute, self.punching, p, cfg))
                    .map(|p| p.addr)
                    .filter(move |a| Some(*a) != active),
            )
            .take(max)
    }

    /// Drops the paths through spare sockets ([`crate::hunt`]) but the one
    /// through `keep` (and the active one).
    pub fn drop_spares_but(&mut self, keep: Option<u32>) {
        let active = self.active_addr();
        self.list.retain(|p| match p.addr.via {
            Via::Spare(i) => Some(i) == keep || Some(p.addr) == active,
            _ => true,
        });
        self.active = active.and_then(|a| self.find(&a));
    }

    /// The paths a punching cue goes on: every path that answers, at most
    /// [`MAX_CUE_PATHS`] (a lost cue leaves the two sides out of step).
    pub fn cue_paths<'a>(&'a self, cfg: &'a PathConfig) -> impl Iterator<Item = &'a Path> + 'a {
        self.list
            .iter()
            .filter(move |x| x.alive(cfg))
            .take(MAX_CUE_PATHS)
    }

    /// How long a cue takes there and back: the least round trip measured
    /// on the paths it goes on. The peer starts at the first cue to arrive
    /// (a repeat is ignored), so half of this is when it starts. Not the
    /// active path's alone: traffic proves the active path without probes,
    /// so a busy one often has no sample at all, and a both-at-once
    /// attempt timed with none starts the coordinator a whole one-way
    /// latency before the peer (the 12-node benchmark's bare pair:
    /// docs/natlab.md, "Two bare gateways among many peers").
    pub fn cue_rtt(&self, cfg: &PathConfig) -> Option<Duration> {
        self.cue_paths(cfg)
            .filter_map(|x| x.rtt)
            .min()
            .or_else(|| self.active().and_then(|a| a.rtt))
    }

    /// Whether a direct path should be found: the peer has direct
    /// candidates (or learned addresses) and none of them answers.
    pub fn direct_pending(&self, cfg: &PathConfig) -> bool {
        let direct = |p: &&Path| p.class != Rank::Relay;
        self.list.iter().filter(direct).count() > 0
            && !self.list.iter().filter(direct).any(|p| p.alive(cfg))
    }

    /// The silence is over: the direct paths that do not answer are probed
    /// now, from the shortest retry interval again.
    pub fn wake_direct(&mut self, now: Instant, cfg: &PathConfig) {
        for p in &mut self.list {
            if p.class != Rank::Relay && !p.alive(cfg) {
                p.next_probe = p.next_probe.min(now);
                p.tries = 0;
            }
        }
    }

    /// Paths not heard from within `stale_after` count as dead until they
    /// answer again, and are probed at once (from the shortest retry
    /// interval). If the path in use is one of them, there is none until a
    /// path answers.
    pub fn demote_stale(&mut self, now: Instant, cfg: &PathConfig) {
        let active = self.active;
        for (i, p) in self.list.iter_mut().enumerate() {
            let stale = p
                .last_rx
                .is_some_and(|t| now.saturating_duration_since(t) >= cfg.stale_after);
            if !stale || !p.alive(cfg) {
                continue;
            }
            p.lost = cfg.dead_after;
            p.probe = None;
            p.tries = 0;
            p.next_probe = now;
            if active == Some(i) {
                self.active = None;
                self.changed = Some(now);
                self.why = PathWhy::ProbesLost;
            }
        }
    }

    /// Forgets RTTs and liveness (the session was reset).
    pub fn reset(&mut self, now: Instant) {
        for p in &mut self.list {
            p.last_rx = None;
            p.probe = None;
            p.lost = 0;
            p.tries = 0;
            p.next_probe = now;
        }
        self.list.retain(|p| p.origin == Origin::Candidate);
        self.active = None;
        self.changed = Some(now);
        self.why = PathWhy::Reset;
    }
}

/// Whether path `p` is muted (`mute`: the peer's silence is on): a path to
/// the peer's own endpoint that does not answer.
fn muted(mute: bool, punching: bool, p: &Path, cfg: &PathConfig) -> bool {
    (mute && p.class != Rank::Relay && !p.alive(cfg)) || (punching && p.behind_other_lan())
}

/// The class of a path: through a relay when it goes through our
/// allocation; else what the peer published for that address
/// (`published`); else, for an address it did not publish, relay when it
/// is on a relay's IP (a peer's allocation reached from our own socket),
/// direct otherwise. The peer's own word comes before the relay's IP: a
/// node on the same address as a TURN server (the public node that runs
/// coturn, in the README's bootstrap) is reached directly on its own port.
pub fn classify(relay_ips: &[IpAddr], addr: PathAddr, published: Option<Rank>) -> Rank {
    if matches!(addr.via, Via::Turn(_)) {
        return Rank::Relay;
    }
    match published {
        Some(c) => crate::family::rank_published(addr.remote.ip(), c),
        None if relay_ips.contains(&addr.remote.ip()) => Rank::Relay,
        None => Rank::Direct,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pa(s: &str) -> PathAddr {
        PathAddr::direct(s.parse().unwrap())
    }

    fn probe_all(p: &mut Paths, now: Instant, cfg: &PathConfig, id: &mut u64) -> Vec<ProbeDue> {
        let mut v = Vec::new();
        p.poll(now, cfg, id, &mut v, &mut Vec::new());
        v
    }

    /// The benchmark's bare pair: the relayed path in use carries pings
    /// (so it is never probed and has no RTT), the standby relayed paths
    /// are probed. The cue's timing must come from those, not be zero.
    #[test]
    fn the_cue_rtt_comes_from_the_paths_the_cue_goes_on_when_the_active_has_none() {
        let cfg = PathConfig::default();
        let t0 = Instant::now();
        let busy = PathAddr {
            via: Via::Turn(0),
            remote: "203.0.113.1:49345".parse().unwrap(),
        };
        let standby = pa("203.0.113.1:49345");
        let direct = pa("203.0.113.19:5800");
        let mut p = Paths::default();
        p.set_candidates(
            t0,
            &cfg,
            &[
                (busy, Rank::Relay),
                (standby, Rank::Relay),
                (direct, Rank::Direct),
            ],
        );
        p.on_rx(t0, &cfg, busy, Rank::Relay);
        assert_eq!(p.active_addr(), Some(busy));
        assert_eq!(p.cue_rtt(&cfg), None, "nothing measured yet");
        let mut id = 0;
        let probes = probe_all(&mut p, t0, &cfg, &mut id);
        let of = |a: PathAddr| probes.iter().find(|d| d.addr == a).map(|d| d.id);
        let standby_probe = of(standby).expect("the standby is probed");
        p.on_probe_reply(t0 + Duration::from_millis(31), &cfg, standby_probe);
        // Traffic keeps the busy path in use, unmeasured.
        p.active = p.find(&busy);
        p.list.iter_mut().for_each(|x| {
            if x.addr == busy {
                x.rtt = None;
            }
        });
        assert_eq!(p.active().and_then(|a| a.rtt), None);
        assert_eq!(p.cue_rtt(&cfg), Some(Duration::from_millis(31)));
        // The least of those measured: the peer starts at the first cue.
        let i = p.find(&busy).unwrap();
        p.list[i].rtt = Some(Duration::from_millis(20));
        assert_eq!(p.cue_rtt(&cfg), Some(Duration::from_millis(20)));
        // A path that does not answer carries no cue and does not count.
        let j = p.find(&direct).unwrap();
        p.list[j].rtt = Some(Duration::from_millis(1));
        assert!(!p.list[j].alive(&cfg));
        assert_eq!(p.cue_rtt(&cfg), Some(Duration::from_millis(20)));
    }

    #[test]
    fn a_published_candidate_on_a_relay_ip_keeps_its_class() {
        let relay_ips: Vec<IpAddr> = vec!["203.0.113.10".parse().unwrap()];
        // The public node's own port, on the TURN server's address.
        let node = pa("203.0.113.10:5800");
        assert_eq!(classify(&relay_ips, node, Some(Rank::Local)), Rank::Local);
        assert_eq!(classify(&relay_ips, node, Some(Rank::Direct)), Rank::Direct);
        // A peer's allocation on that server, published or only learned.
        let alloc = pa("203.0.113.10:49160");
        assert_eq!(classify(&relay_ips, alloc, Some(Rank::Relay)), Rank::Relay);
        assert_eq!(classify(&relay_ips, alloc, None), Rank::Relay);
        // Through our own allocation, whatever the peer says.
        let via = PathAddr {
            via: Via::Turn(0),
            remote: "203.0.113.20:5800".parse().unwrap(),
        };
        assert_eq!(classify(&relay_ips, via, Some(Rank::Direct)), Rank::Relay);
        assert_eq!(
            classify(&relay_ips, pa("203.0.113.20:5800"), None),
            Rank::Direct
        );
    }

    #[test]
    fn candidates_are_probed_and_the_best_answering_one_wins() {
        let cfg = PathConfig::default();
        let t0 = Instant::now();
        let mut p = Paths::default();
        let relay = PathAddr {
            via: Via::Turn(0),
            remote: "203.0.113.1:50000".parse().unwrap(),
        };
        p.set_candidates(
            t0,
            &cfg,
            &[
                (pa("192.168.1.2:5800"), Rank::Local),
                (pa("203.0.113.20:5800"), Rank::Direct),
                (relay, Rank::Relay),
            ],
        );
        let mut id = 0;
        let probes = probe_all(&mut p, t0, &cfg, &mut id);
        assert_eq!(probes.len(), 3);
        assert!(p.active.is_none(), "nothing answered yet");
        // The relay answers first: used at once.
        let relay_probe = probes.iter().find(|d| d.addr == relay).unwrap().id;
        p.on_probe_reply(t0 + Duration::from_millis(5), &cfg, relay_probe);
        assert_eq!(p.active_addr(), Some(relay));
        assert_eq!(p.why, PathWhy::First);
        // The direct reflexive path answers: it replaces the relay.
        let direct = probes
            .iter()
            .find(|d| d.addr == pa("203.0.113.20:5800"))
            .unwrap()
            .id;
        p.on_probe_reply(t0 + Duration::from_millis(8), &cfg, direct);
        assert_eq!(p.active_addr(), Some(pa("203.0.113.20:5800")));
        assert_eq!(p.why, PathWhy::BetterClass);
        // The LAN candidate beats both.
        let local = probes
            .iter()
            .find(|d| d.addr == pa("192.168.1.2:5800"))
            .unwrap()
            .id;
        p.on_probe_reply(t0 + Duration::from_millis(9), &cfg, local);
        assert_eq!(p.active_addr(), Some(pa("192.168.1.2:5800")));
        assert!(p.list.iter().all(|x| x.rtt.is_some()));
    }

    #[test]
    fn a_new_relayed_path_that_lost_its_first_probes_is_retried_within_seconds() {
        let cfg = PathConfig::default();
        let t0 = Instant::now();
        let mut p = Paths::default();
        let relay = PathAddr {
            via: Via::Turn(0),
            remote: "203.0.113.1:50000".parse().unwrap(),
        };
        let direct = pa("203.0.113.20:5800");
        p.set_candidates(t0, &cfg, &[(relay, Rank::Relay), (direct, Rank::Direct)]);
        let mut id = 0;
        // Nothing answers for a while (the allocations' permissions are
        // being made): when is each path probed?
        let mut sent: Vec<(PathAddr, Duration)> = Vec::new();
        for ms in (0..12_000).step_by(50) {
            let now = t0 + Duration::from_millis(ms);
            for d in probe_all(&mut p, now, &cfg, &mut id) {
                sent.push((d.addr, now - t0));
            }
        }
        let at = |a: PathAddr| -> Vec<u64> {
            (sent.iter().filter(|(x, _)| *x == a))
                .map(|(_, t)| t.as_secs())
                .collect()
        };
        // The relayed path three more times a second apart, then backing
        // off; the direct one on the punching schedule.
        assert_eq!(at(relay), vec![0, 1, 2, 3], "{sent:?}");
        assert_eq!(at(direct), vec![0, 5, 10], "{sent:?}");
    }

    /// When each probe of `addr` leaves in the first 12 s with nothing
    /// answering, in whole seconds.
    fn probe_seconds(p: &mut Paths, t0: Instant, cfg: &PathConfig, addr: PathAddr) -> Vec<u64> {
        let mut id = 0;
        let mut at = Vec::new();
        for ms in (0..12_000).step_by(50) {
            let now = t0 + Duration::from_millis(ms);
            for d in probe_all(p, now, cfg, &mut id) {
                if d.addr == addr {
                    at.push((now - t0).as_secs());
                }
            }
        }
        at
    }

    #[test]
    fn a_moved_peer_of_a_cone_pair_gets_a_quick_second_probe_but_not_a_bare_gateway() {
        let cfg = PathConfig::default();
        let t0 = Instant::now();
        let old = pa("203.0.113.10:5800");
        let new = pa("203.0.113.110:5800");
        // The pair came up on plain probes; then the peer's address
        // changed.
        let moved = |punched: bool| {
            let mut p = Paths::default();
            p.set_candidates(t0, &cfg, &[(old, Rank::Direct)]);
            p.punching = punched;
            p.on_rx(t0, &cfg, old, Rank::Direct);
            p.punching = false;
            p.set_candidates(t0, &cfg, &[(new, Rank::Direct)]);
            p
        };
        let mut cones = moved(false);
        assert_eq!(probe_seconds(&mut cones, t0, &cfg, new), vec![0, 1, 6, 11]);
        // Opened by a coordinated attempt: the punching schedule's pace.
        let mut punched = moved(true);
        assert_eq!(probe_seconds(&mut punched, t0, &cfg, new), vec![0, 5, 10]);
        // The peer's NAT moved a port (what a bare gateway does): too.
        let mut bare = moved(false);
        bare.learn_untried(t0, &cfg, pa("203.0.113.110:31000"));
        assert_eq!(probe_seconds(&mut bare, t0, &cfg, new), vec![0, 5, 10]);
        // Nothing known yet (a pair's first contact): too.
        let mut first = Paths::default();
        first.set_candidates(t0, &cfg, &[(new, Rank::Direct)]);
        assert_eq!(probe_seconds(&mut first, t0, &cfg, new), vec![0, 5, 10]);
    }

    #[test]
    fn coordinated_attempts_leave_out_a_private_lan_address_that_never_answered() {
        let cfg = PathConfig::default();
        let t0 = Instant::now();
        let lan = pa("192.168.2.2:5800");
        let public = pa("203.0.113.11:5800");
        let cands = [(lan, Rank::Local), (public, Rank::Direct)];
        let probed = |p: &mut Paths, at: Duration| -> Vec<PathAddr> {
            let mut id = 0;
            let out = probe_all(p, t0 + at, &cfg, &mut id);
            out.iter().map(|d| d.addr).collect()
        };
        let mut p = Paths::default();
        p.set_candidates(t0, &cfg, &cands);
        // Plain tries: both.
        assert_eq!(probed(&mut p, Duration::ZERO), vec![lan, public]);
        // A coordinated attempt: the public address alone.
        p.punching = true;
        p.wake_direct(t0 + Duration::from_secs(20), &cfg);
        let attempt = probed(&mut p, Duration::from_secs(21));
        assert_eq!(attempt, vec![public]);
        assert_eq!(
            p.handshake_targets(8, &cfg).collect::<Vec<_>>(),
            vec![public]
        );
        // A LAN path that answered once (the pair shares a LAN whose path
        // broke) is still tried.
        let mut same = Paths::default();
        same.set_candidates(t0, &cfg, &cands);
        same.on_rx(t0, &cfg, lan, Rank::Local);
        same.list.iter_mut().for_each(|x| x.lost = cfg.dead_after);
        same.punching = true;
        same.wake_direct(t0 + Duration::from_secs(20), &cfg);
        let mut got = probed(&mut same, Duration::from_secs(21));
        got.sort();
        assert!(got.contains(&lan), "{got:?}");
        // A public host address (a node without NAT) too.
        let mut open = Paths::default();
        let host = pa("203.0.113.12:5800");
        open.set_candidates(t0, &cfg, &[(host, Rank::Local)]);
        open.punching = true;
        assert_eq!(probed(&mut open, Duration::ZERO), vec![host]);
    }

    #[test]
    fn a_dead_active_path_falls_back_within_the_dead_time() {
        let cfg = PathConfig::default();
        let t0 = Instant::now();
        let mut p = Paths::default();
        let direct = pa("203.0.113.20:5800");
        let relay = PathAddr {
            via: Via::Turn(0),
            remote: "203.0.113.1:50000".parse().unwrap(),
        };
        p.set_candidates(t0, &cfg, &[(direct, Rank::Direct), (relay, Rank::Relay)]);
        let mut id = 0;
        for d in probe_all(&mut p, t0, &cfg, &mut id) {
            p.on_probe_reply(t0 + Duration::from_millis(2), &cfg, d.id);
        }
        assert_eq!(p.active_addr(), Some(direct));
        // From now on the direct path drops everything; the relay answers.
        let mut now = t0;
        let mut switched = None;
        for step in 1..=100 {
            now = t0 + Duration::from_millis(100 * step);
            for d in probe_all(&mut p, now, &cfg, &mut id) {
                if d.addr == relay {
                    p.on_probe_reply(now, &cfg, d.id);
                }
            }
            if p.active_addr() == Some(relay) {
                switched = Some(now);
                break;
            }
        }
        let took = switched.expect("fell back").duration_since(t0);
        assert_eq!(p.why, PathWhy::ProbesLost);
        assert!(took <= Duration::from_secs(5), "fell back after {took:?}");
        assert!(
            took >= Duration::from_secs(2),
            "not on a single lost probe: {took:?}"
        );
        let _ = now;
    }

    #[test]
    fn roaming_switches_to_a_new_source_when_the_old_went_quiet() {
        let cfg = PathConfig::default();
        let t0 = Instant::now();
        let mut p = Paths::default();
        let old = pa("203.0.113.20:5800");
        p.set_candidates(t0, &cfg, &[(old, Rank::Direct)]);
        p.on_rx(t0, &cfg, old, Rank::Direct);
        assert_eq!(p.active_addr(), Some(old));
        // Traffic from a new port while the old one is still fresh: learned
        // but not used yet.
        let new = pa("203.0.113.20:40001");
        assert!(p.on_rx(t0 + Duration::from_millis(100), &cfg, new, Rank::Direct));
        assert_eq!(p.active_addr(), Some(old));
        // The old one is quiet for a while: the next datagram from the new
        // address moves us.
        p.on_rx(t0 + Duration::from_secs(3), &cfg, new, Rank::Direct);
        assert_eq!(p.active_addr(), Some(new));
        assert_eq!(p.why, PathWhy::Roamed);
    }

    #[test]
    fn a_quiet_path_in_use_does_not_roam_to_a_worse_class() {
        let cfg = PathConfig::default();
        let t0 = Instant::now();
        let mut p = Paths::default();
        let direct = pa("203.0.113.20:5800");
        let relay = PathAddr {
            via: Via::Turn(0),
            remote: "203.0.113.20:5800".parse().unwrap(),
        };
        p.set_candidates(t0, &cfg, &[(direct, Rank::Direct)]);
        p.on_rx(t0, &cfg, direct, Rank::Direct);
        // No traffic for a while (on demand nothing probes the path in
        // use), then the peer's probe of its relay path arrives.
        p.on_rx(t0 + Duration::from_secs(3), &cfg, relay, Rank::Relay);
        assert_eq!(p.active_addr(), Some(direct));
        // A new source of the same class still moves us (NAT rebinding).
        let moved = pa("203.0.113.20:40001");
        p.on_rx(t0 + Duration::from_secs(4), &cfg, moved, Rank::Direct);
        assert_eq!(p.active_addr(), Some(moved));
        assert_eq!(p.why, PathWhy::Roamed);
        // Once the path in use lost a probe, the peer reaching us through
        // the relay moves us there at once (it fell back first).
        let i = p.find(&moved).unwrap();
        p.list[i].lost = 1;
        p.on_rx(t0 + Duration::from_secs(6), &cfg, relay, Rank::Relay);
        assert_eq!(p.active_addr(), Some(relay));
        // And stays there: the path it left is not taken back on its older
        // answers (it used to be at the next reselect, flapping), only
        // once it answers the probe now due.
        p.reselect(t0 + Duration::from_secs(6), &cfg, false);
        assert_eq!(p.active_addr(), Some(relay));
        for q in [direct, moved] {
            let q = &p.list[p.find(&q).unwrap()];
            assert!(!q.alive(&cfg));
            assert_eq!(q.next_probe, t0 + Duration::from_secs(6));
        }
        p.list[i].probe = Some((77, t0 + Duration::from_secs(6)));
        p.on_probe_reply(t0 + Duration::from_secs(7), &cfg, 77);
        assert_eq!(p.active_addr(), Some(moved));
        assert_eq!(p.why, PathWhy::BetterClass);
    }

    #[test]
    fn paths_quiet_past_the_nat_timeout_are_proven_again() {
        let cfg = PathConfig::default();
        let t0 = Instant::now();
        let mut p = Paths::default();
        let direct = pa("203.0.113.20:5800");
        let relay = pa("203.0.113.1:50000");
        p.set_candidates(t0, &cfg, &[(direct, Rank::Direct), (relay, Rank::Relay)]);
        p.on_rx(t0, &cfg, direct, Rank::Direct);
        p.on_rx(t0, &cfg, relay, Rank::Relay);
        assert_eq!(p.active_addr(), Some(direct));
        // Heard from within the timeout: nothing changes.
        let t1 = t0 + cfg.stale_after - Duration::from_secs(1);
        p.demote_stale(t1, &cfg);
        assert_eq!(p.active_addr(), Some(direct));
        // Past it: nothing is trusted; the new session's path is taken and
        // the old direct one is probed at once.
        let t2 = t0 + cfg.stale_after * 4;
        p.demote_stale(t2, &cfg);
        assert_eq!(p.active_addr(), None);
        assert!(p.list.iter().all(|x| !x.alive(&cfg)));
        p.on_rx(t2, &cfg, relay, Rank::Relay);
        assert_eq!(p.active_addr(), Some(relay));
        let mut id = 0;
        let probes = probe_all(&mut p, t2, &cfg, &mut id);
        let to_direct = probes.iter().find(|d| d.addr == direct).unwrap();
        // It answers: upgraded.
        p.on_probe_reply(t2 + Duration::from_millis(3), &cfg, to_direct.id);
        assert_eq!(p.active_addr(), Some(direct));
    }

    #[test]
    fn candidate_updates_keep_state_and_bound_the_list() {
        let cfg = PathConfig {
            max_paths: 4,
            ..PathConfig::default()
        };
        let t0 = Instant::now();
        let mut p = Paths::default();
        let a = pa("203.0.113.20:5800");
        p.set_candidates(t0, &cfg, &[(a, Rank::Direct)]);
        p.on_rx(t0, &cfg, a, Rank::Direct);
        p.set_candidates(t0, &cfg, &[(pa("203.0.113.21:5800"), Rank::Direct)]);
        // The active path stays although no longer published.
        assert_eq!(p.active_addr(), Some(a));
        for i in 0..10 {
            p.on_rx(
                t0,
                &cfg,
                pa(&format!("203.0.113.30:{}", 1000 + i)),
                Rank::Direct,
            );
        }
        assert!(p.list.len() <= 4);
        assert!(p.active().is_some());
    }

    #[test]
    fn idle_active_path_is_probed_once_per_interval_and_busy_one_not_at_all() {
        let cfg = PathConfig::default();
        let t0 = Instant::now();
        let mut p = Paths::default();
        let a = pa("203.0.113.20:5800");
        p.set_candidates(t0, &cfg, &[(a, Rank::Direct)]);
        let mut id = 0;
        let d = probe_all(&mut p, t0, &cfg, &mut id);
        p.on_probe_reply(t0, &cfg, d[0].id);
        let mut sent = 0;
        for ms in (0..10_000).step_by(50) {
            let now = t0 + Duration::from_millis(ms);
            for d in probe_all(&mut p, now, &cfg, &mut id) {
                sent += 1;
                p.on_probe_reply(now, &cfg, d.id);
            }
        }
        assert!((9..=11).contains(&sent), "{sent} probes in 10 s");
        // Traffic arriving all the time: no probes.
        let t1 = t0 + Duration::from_secs(20);
        let mut busy = 0;
        for ms in (0..10_000).step_by(50) {
            let now = t1 + Duration::from_millis(ms);
            p.on_rx(now, &cfg, a, Rank::Direct);
            busy += probe_all(&mut p, now, &cfg, &mut id).len();
        }
        assert!(busy <= 1, "{busy} probes while traffic flowed");
    }
}
