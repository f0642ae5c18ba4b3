//! Birthday probing: a direct path between a node behind a symmetric NAT
//! (endpoint-dependent mapping) and one behind a cone NAT.
//!
//! A symmetric NAT gives every destination a mapping of its own, so the
//! reflexive port its node learns from STUN is of no use to the peer. What
//! that port is for a new destination decides the method:
//! - Port prediction guesses it from the STUN-observed ports (preserved, or
//!   the next in sequence). Linux never allocates sequentially: without
//!   `random`/`fully-random` it keeps the source port (a cone, in effect),
//!   and with them (what makes it symmetric: the NAT lab's `masquerade
//!   fully-random`) and on every clash it draws a random port; pf (pfSense,
//!   OPNsense) randomises by default too. Against those a prediction is a
//!   scan.
//! - Birthday probing (Tailscale's): the symmetric ("hard") side opens
//!   [`HuntConfig::ports`] sockets and sends one datagram from each to the
//!   cone ("easy") side's published endpoint, which makes as many mappings
//!   on its NAT (each open to that endpoint only); the easy side sends
//!   probes to random ports of the hard side's public IP. With `k` sockets
//!   out of `n` ports a probe hits one of the mappings with `k / n` (256 of
//!   64 512), whatever the allocator does, so this module does that.
//!
//! Which goes first matters. Tailscale's order (sockets first, then the
//! probes: a probe that hits reaches the hard node on that socket) needs
//! the easy NAT to drop the sockets' datagrams. A bare Linux gateway
//! (docs/natlab.md, case 1) instead keeps each as a conntrack entry to
//! itself, and the easy node's later probe to exactly that port clashes
//! with it and leaves from a random port, which the hard NAT's mapping
//! (open to the published endpoint only) drops: the ports that would hit
//! are the ones spoiled, and the node's new flows keep the random port.
//! So here the easy side probes first and the hard side sends from fresh
//! sockets in waves, each when the easy side says it has probed enough
//! ([`Msg::Fire`], after [`HuntConfig::wave_at`] probes): a socket whose
//! port the easy side already probed meets the easy NAT's mapping toward
//! it and gets in, whatever the easy router does with the rest; the easy
//! side answers through that mapping. Behind a firewalled cone the probes
//! after a wave still hit its sockets, as in Tailscale's order. Five waves
//! after 200, 400, 700, 1 100 and 1 600 probes: behind a bare gateway a
//! hunt finds its path with about 99.8 % (only probes sent before the
//! first clash count; each fresh wave is another draw on them), behind a
//! firewalled one after about 270 probes on average (Tailscale's order:
//! 260; a Monte Carlo of this model and the simulator's figures are in
//! docs/natlab.md).
//!
//! Each side learns whether its own mapping depends on the destination
//! from two STUN servers ([`Mapping`]; one server cannot tell) and says so
//! to the peer over the relayed session (inner kind
//! [`crate::wire::kind::HUNT`], [`Msg::Hello`]); older agents ignore it.
//! Only a hard side whose peer said "independent" hunts (never
//! symmetric–symmetric, where a hit needs two guesses to meet): it tells
//! the peer its public IP ([`Msg::Go`]) and opens sockets when asked to
//! fire. The probes are bounded by [`HuntConfig::rate`] and
//! [`HuntConfig::limit`], the sockets by [`HuntConfig::ports`] open at a
//! time and [`HuntConfig::waves`] per hunt; all stop as soon as a direct
//! path answers. The sockets are the agent's; the core names them
//! by index ([`crate::path::Via::Spare`]) and stays sans-IO.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

/// Bounds of a hunt.
#[derive(Debug, Clone)]
pub struct HuntConfig {
    pub enabled: bool,
    /// Sockets the hard side opens per wave (one mapping each; a wave's
    /// sockets no path uses are closed when the next opens).
    pub ports: u32,
    /// Waves of sockets per hunt, at most.
    pub waves: u32,
    /// The easy side asks for wave `j` after [`HuntConfig::wave_at`]`(j)`
    /// probes: this many times `j (j + 1) / 2 + 1`.
    pub wave_step: u32,
    /// Probes a second the easy side sends.
    pub rate: u32,
    /// How long the easy side probes; the hard side keeps its sockets a
    /// little longer.
    pub limit: Duration,
    /// A relayed peer whose direct paths have not answered for this long
    /// is hunted (most pairs are direct well within it).
    pub after: Duration,
    /// A hunt that found nothing is tried again after this.
    pub again: Duration,
}

impl Default for HuntConfig {
    fn default() -> Self {
        HuntConfig {
            enabled: true,
            ports: 256,
            waves: 5,
            wave_step: 100,
            rate: 200,
            limit: Duration::from_secs(15),
            after: Duration::from_secs(2),
            again: Duration::from_secs(300),
        }
    }
}

impl HuntConfig {
    /// Probes the easy side sends before it asks for wave `j` (from 1):
    /// 200, 400, 700, 1 100, 1 600 by default. The first comes early, so
    /// that behind a firewalled cone the hunt is about as fast as with the
    /// sockets out before any probe; the gaps grow, so that each wave has
    /// more probes before it to meet.
    pub fn wave_at(&self, j: u32) -> u32 {
        let j = j.min(1 << 15);
        self.wave_step.saturating_mul(j * (j + 1) / 2 + 1)
    }
}

/// Paths learned this long after the probing ended are the hunt's too:
/// the datagrams of a wave arrive together, and the first answer ends the
/// probing before the others are in.
const AFTERGLOW: Duration = Duration::from_secs(2);

/// A Hello the peer did not answer goes again after this.
const HELLO_RETRY: Duration = Duration::from_secs(10);

/// Whether our NAT's mapping depends on the destination, from the
/// reflexive addresses two or more STUN servers gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mapping {
    /// Fewer than two answers.
    #[default]
    Unknown,
    /// Every server saw the same address: a cone (or no NAT).
    Independent,
    /// Symmetric.
    Dependent,
}

impl Mapping {
    /// From the reflexive addresses of different servers (IPv4 only: the
    /// hunt probes IPv4 ports).
    pub fn of(reflexive: &[std::net::SocketAddr]) -> (Mapping, Option<Ipv4Addr>) {
        let v4: Vec<_> = reflexive.iter().filter(|a| a.is_ipv4()).collect();
        let ip = v4.first().and_then(|a| match a.ip() {
            std::net::IpAddr::V4(ip) => Some(ip),
            std::net::IpAddr::V6(_) => None,
        });
        let m = match v4.as_slice() {
            [] | [_] => Mapping::Unknown,
            [first, rest @ ..] if rest.iter().all(|a| a == first) => Mapping::Independent,
            _ => Mapping::Dependent,
        };
        (m, ip)
    }

    fn code(self) -> u8 {
        match self {
            Mapping::Unknown => 0,
            Mapping::Independent => 1,
            Mapping::Dependent => 2,
        }
    }

    fn from_code(c: u8) -> Mapping {
        match c {
            1 => Mapping::Independent,
            2 => Mapping::Dependent,
            _ => Mapping::Unknown,
        }
    }
}

/// The body of an inner HUNT message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Msg {
    /// What our mapping is.
    Hello(Mapping),
    /// The hard side hunts: probe ports of this IP.
    Go(Ipv4Addr),
    /// The easy side has probed enough for this wave (from 1): open fresh
    /// sockets and send from them. An older hard side ignores it (it sent
    /// from its sockets before its Go).
    Fire(u8),
}

impl Msg {
    pub const LEN: usize = 6;

    pub fn write(&self, out: &mut [u8]) {
        let Some(b) = out.get_mut(..Msg::LEN) else {
            return;
        };
        b.fill(0);
        match self {
            Msg::Hello(m) => b[1] = m.code(),
            Msg::Go(ip) => {
                b[0] = 1;
                b[2..6].copy_from_slice(&ip.octets());
            }
            Msg::Fire(wave) => {
                b[0] = 2;
                b[1] = *wave;
            }
        }
    }

    pub fn parse(b: &[u8]) -> Option<Msg> {
        let b = b.get(..Msg::LEN)?;
        match b[0] {
            0 => Some(Msg::Hello(Mapping::from_code(b[1]))),
            1 => {
                let ip = Ipv4Addr::new(b[2], b[3], b[4], b[5]);
                // Probing such an address would spray someone's LAN.
                let bad = ip.is_unspecified()
                    || ip.is_loopback()
                    || ip.is_multicast()
                    || ip.is_broadcast()
                    || ip.is_link_local();
                (!bad).then_some(Msg::Go(ip))
            }
            2 => Some(Msg::Fire(b[1])),
            _ => None,
        }
    }
}

/// The easy side's probing of one peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spray {
    pub ip: Ipv4Addr,
    pub since: Instant,
    pub sent: u32,
    /// Waves asked for so far ([`Msg::Fire`]).
    pub waves: u32,
}

impl Spray {
    /// How many probes may go now: `rate` a second from the start (the
    /// first at once), at most `rate * limit` in all, none after `limit`.
    pub fn due(&self, now: Instant, cfg: &HuntConfig) -> u32 {
        let t = now.saturating_duration_since(self.since);
        if t >= cfg.limit {
            return 0;
        }
        let cap = (cfg.limit.as_secs_f64() * f64::from(cfg.rate)) as u32;
        let allowed = ((t.as_secs_f64() * f64::from(cfg.rate)) as u32 + 1).min(cap);
        allowed.saturating_sub(self.sent)
    }

    pub fn over(&self, now: Instant, cfg: &HuntConfig) -> bool {
        now.saturating_duration_since(self.since) >= cfg.limit
    }

    /// The wave to ask for now, if the probes sent so far call for one
    /// (the latest they call for: waves skipped are not asked late).
    pub fn wave_due(&self, cfg: &HuntConfig) -> Option<u32> {
        let j = (self.waves + 1..=cfg.waves)
            .take_while(|j| self.sent >= cfg.wave_at(*j))
            .last()?;
        Some(j)
    }
}

/// The hunting state of one peer.
#[derive(Debug, Clone, Default)]
pub struct PeerHunt {
    /// Since when its direct paths have not answered (while relayed).
    pending_since: Option<Instant>,
    /// When we last told it our mapping.
    pub hello_at: Option<Instant>,
    /// What it told us.
    pub peer: Mapping,
    pub spray: Option<Spray>,
    /// When the last probing ended ([`AFTERGLOW`]).
    ended: Option<Instant>,
    /// No new hunt of this peer before then.
    pub next_round: Option<Instant>,
}

/// What [`PeerHunt::tick`] asks of the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    None,
    /// Tell the peer our mapping.
    Hello,
    /// Send this many probes to random ports of the spray's IP.
    Probe(u32),
    /// The spray is over (found or not).
    Done,
}

impl PeerHunt {
    /// `pending`: relayed, and its direct paths do not answer. `ours`: our
    /// mapping (told only once known).
    pub fn tick(&mut self, now: Instant, cfg: &HuntConfig, pending: bool, ours: Mapping) -> Action {
        if self.ended.is_some_and(|t| now >= t + AFTERGLOW) {
            self.ended = None;
        }
        if !pending || !cfg.enabled {
            self.pending_since = None;
            return match self.spray.take() {
                Some(_) => {
                    self.ended = Some(now);
                    Action::Done
                }
                None => Action::None,
            };
        }
        let since = *self.pending_since.get_or_insert(now);
        if let Some(s) = self.spray {
            if s.over(now, cfg) {
                self.spray = None;
                self.ended = Some(now);
                return Action::Done;
            }
            return Action::Probe(s.due(now, cfg));
        }
        let stale = self
            .hello_at
            .is_none_or(|t| now.saturating_duration_since(t) >= self.hello_every(cfg));
        if ours != Mapping::Unknown && stale && now.saturating_duration_since(since) >= cfg.after {
            self.hello_at = Some(now);
            return Action::Hello;
        }
        Action::None
    }

    /// Whether a path learned now is the hunt's: while probing and for
    /// [`AFTERGLOW`] after.
    pub fn hunting(&self) -> bool {
        self.spray.is_some() || self.ended.is_some()
    }

    /// Our Hello goes again after this: soon while the peer has not
    /// answered (the relay may lose it; an older agent never answers: a
    /// few bytes over the relay), else once a round.
    fn hello_every(&self, cfg: &HuntConfig) -> Duration {
        match self.peer {
            Mapping::Unknown => HELLO_RETRY.min(cfg.again),
            _ => cfg.again,
        }
    }

    /// The hard side's Go: probing starts (unless one runs). `pending` as
    /// for [`PeerHunt::tick`] (the Go may come before our own tick saw it).
    pub fn on_go(&mut self, now: Instant, ip: Ipv4Addr, ours: Mapping, pending: bool) -> bool {
        if ours != Mapping::Independent || self.spray.is_some() || !pending {
            return false;
        }
        self.pending_since.get_or_insert(now);
        self.spray = Some(Spray {
            ip,
            since: now,
            sent: 0,
            waves: 0,
        });
        true
    }

    /// Whether we, the hard side, should open sockets for this peer now
    /// (`pending` as for [`PeerHunt::tick`]).
    pub fn should_open(&self, now: Instant, ours: Mapping, pending: bool) -> bool {
        ours == Mapping::Dependent
            && self.peer == Mapping::Independent
            && pending
            && self.next_round.is_none_or(|t| now >= t)
    }

    /// When [`PeerHunt::tick`] has something to do next.
    pub fn deadline(&self, cfg: &HuntConfig, ours: Mapping) -> Option<Instant> {
        if let Some(s) = self.spray {
            // Past: the next timer-grid step, every step while probing.
            return Some(s.since);
        }
        let afterglow = self.ended.map(|t| t + AFTERGLOW);
        let Some(since) = self.pending_since else {
            return afterglow;
        };
        if ours == Mapping::Unknown || !cfg.enabled {
            return afterglow;
        }
        let hello = match self.hello_at {
            Some(t) => t + self.hello_every(cfg),
            None => since + cfg.after,
        };
        let hello = hello.max(since + cfg.after);
        Some(afterglow.map_or(hello, |t| t.min(hello)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn two_stun_answers_tell_the_mapping() {
        let a = sa("203.0.113.10:5800");
        assert_eq!(Mapping::of(&[a]).0, Mapping::Unknown);
        assert_eq!(Mapping::of(&[a, a]).0, Mapping::Independent);
        let (m, ip) = Mapping::of(&[a, sa("203.0.113.10:41000")]);
        assert_eq!(m, Mapping::Dependent);
        assert_eq!(ip, Some(Ipv4Addr::new(203, 0, 113, 10)));
        assert_eq!(Mapping::of(&[]).0, Mapping::Unknown);
    }

    #[test]
    fn messages_round_trip_and_a_bad_ip_is_refused() {
        let mut b = [0u8; Msg::LEN];
        for m in [
            Msg::Hello(Mapping::Dependent),
            Msg::Hello(Mapping::Independent),
            Msg::Go(Ipv4Addr::new(203, 0, 113, 9)),
            Msg::Fire(3),
        ] {
            m.write(&mut b);
            assert_eq!(Msg::parse(&b), Some(m));
        }
        Msg::Go(Ipv4Addr::LOCALHOST).write(&mut b);
        assert_eq!(Msg::parse(&b), None);
        assert_eq!(Msg::parse(&b[..5]), None);
        assert_eq!(Msg::parse(&[7, 0, 0, 0, 0, 0]), None);
    }

    /// The waves come after 200, 400, 700, 1 100 and 1 600 probes, one at
    /// a time, none past the last, and a late tick asks for the latest
    /// only.
    #[test]
    fn waves_are_asked_for_as_the_probes_add_up() {
        let cfg = HuntConfig::default();
        let at: Vec<u32> = (1..=cfg.waves).map(|j| cfg.wave_at(j)).collect();
        assert_eq!(at, [200, 400, 700, 1100, 1600]);
        assert!(cfg.wave_at(cfg.waves) < cfg.rate * cfg.limit.as_secs() as u32);
        let mut s = Spray {
            ip: Ipv4Addr::new(203, 0, 113, 9),
            since: Instant::now(),
            sent: 199,
            waves: 0,
        };
        assert_eq!(s.wave_due(&cfg), None);
        s.sent = 200;
        assert_eq!(s.wave_due(&cfg), Some(1));
        s.waves = 1;
        assert_eq!(s.wave_due(&cfg), None);
        s.sent = 800;
        assert_eq!(s.wave_due(&cfg), Some(3));
        s.waves = 3;
        s.sent = 3000;
        assert_eq!(s.wave_due(&cfg), Some(5));
        s.waves = 5;
        assert_eq!(s.wave_due(&cfg), None);
    }

    /// The rate holds at every moment, the total is capped, nothing after
    /// the limit.
    #[test]
    fn probes_are_bounded_by_rate_and_time() {
        let cfg = HuntConfig::default();
        let t0 = Instant::now();
        let mut s = Spray {
            ip: Ipv4Addr::new(203, 0, 113, 9),
            since: t0,
            sent: 0,
            waves: 0,
        };
        let mut t = t0;
        while t < t0 + cfg.limit + Duration::from_secs(5) {
            let n = s.due(t, &cfg);
            s.sent += n;
            let secs = t.duration_since(t0).as_secs_f64();
            assert!(f64::from(s.sent) <= secs * f64::from(cfg.rate) + 1.0);
            t += Duration::from_millis(250);
        }
        let all = cfg.rate * cfg.limit.as_secs() as u32;
        assert!(s.sent <= all && s.sent + cfg.rate / 2 >= all, "{}", s.sent);
    }

    #[test]
    fn hello_after_a_while_then_go_starts_the_probes_and_an_answer_ends_them() {
        let cfg = HuntConfig::default();
        let t0 = Instant::now();
        let mut h = PeerHunt::default();
        assert_eq!(h.tick(t0, &cfg, true, Mapping::Independent), Action::None);
        assert_eq!(h.deadline(&cfg, Mapping::Independent), Some(t0 + cfg.after));
        let t1 = t0 + cfg.after;
        assert_eq!(h.tick(t1, &cfg, true, Mapping::Independent), Action::Hello);
        assert_eq!(h.tick(t1, &cfg, true, Mapping::Independent), Action::None);
        // Unknown mapping: nothing said, no hunt.
        let mut u = PeerHunt::default();
        u.tick(t0, &cfg, true, Mapping::Unknown);
        assert_eq!(u.tick(t1, &cfg, true, Mapping::Unknown), Action::None);
        let ip = Ipv4Addr::new(203, 0, 113, 9);
        assert!(!u.on_go(t1, ip, Mapping::Unknown, true));
        // A symmetric side never probes, nor one with a direct path.
        assert!(!h.on_go(t1, ip, Mapping::Dependent, true));
        assert!(!h.on_go(t1, ip, Mapping::Independent, false));
        assert!(h.on_go(t1, ip, Mapping::Independent, true));
        assert_eq!(
            h.tick(t1, &cfg, true, Mapping::Independent),
            Action::Probe(1)
        );
        // A path answers.
        assert_eq!(h.tick(t1, &cfg, false, Mapping::Independent), Action::Done);
        assert!(h.spray.is_none());
    }

    #[test]
    fn only_a_symmetric_side_with_a_cone_peer_opens_sockets() {
        let cfg = HuntConfig::default();
        let t0 = Instant::now();
        let mut h = PeerHunt::default();
        h.tick(t0, &cfg, true, Mapping::Dependent);
        h.peer = Mapping::Dependent;
        assert!(
            !h.should_open(t0, Mapping::Dependent, true),
            "symmetric pair"
        );
        h.peer = Mapping::Independent;
        assert!(h.should_open(t0, Mapping::Dependent, true));
        assert!(
            !h.should_open(t0, Mapping::Dependent, false),
            "direct already"
        );
        assert!(!h.should_open(t0, Mapping::Independent, true), "cone pair");
        h.next_round = Some(t0 + cfg.again);
        assert!(
            !h.should_open(t0, Mapping::Dependent, true),
            "not again so soon"
        );
    }
}
