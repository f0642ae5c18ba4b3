//! Hole punching between bare Linux NATs: the silence-and-alternate retry
//! of docs/natlab.md, Decision 3.
//!
//! A Linux router with an open input chain turns the first datagram that
//! reaches it from a peer into a conntrack entry to itself; when its own
//! node then sends to that peer, NAT moves the mapping to a random port and
//! the peer's port-restricted NAT drops everything. Every retry refreshes
//! those entries, so retrying more often never helps. What does: both sides
//! stop sending toward each other's direct endpoints for longer than the
//! routers' UDP timeout, then retry in a chosen order, so that one attempt
//! has the open side send first (or, where the path has latency, both sides
//! send at the same moment).
//!
//! The order is agreed over the session, which works on the relay: the
//! peer with the smaller key coordinates. When its silence ends it sends a
//! cue ([`Cue`], inner kind [`crate::wire::kind::PUNCH`]) that says when
//! the other side starts, and starts itself at the matching moment. The
//! other side stays silent until a cue comes (or, from an agent that never
//! cues, until a long fallback). Attempts cycle through three orders:
//! coordinator first, peer first, both at once.
//!
//! Relay traffic goes to the TURN server and is not silenced; only paths to
//! the peer's own endpoints that do not answer are muted.

use std::time::{Duration, Instant};

/// Timing of the punching schedule.
#[derive(Debug, Clone)]
pub struct PunchConfig {
    /// Direct candidates are tried the usual way this long before the pair
    /// goes silent: most pairs are direct within a second, and a path that
    /// was blocked for a moment comes back within the usual retry.
    pub fast: Duration,
    /// Silence toward the peer's direct endpoints: longer than the routers'
    /// UDP timeout (Linux: 30 s for an unreplied flow).
    pub silence: Duration,
    /// Up to this much is added to the coordinator's silence, so that pairs
    /// do not retry in lockstep.
    pub jitter: Duration,
    /// How long a coordinated attempt is tried before the next silence.
    pub attempt: Duration,
    /// The follower starts this long after the leader's first datagram
    /// could have reached its router.
    pub follow: Duration,
}

impl Default for PunchConfig {
    fn default() -> Self {
        PunchConfig::for_udp_timeout(Duration::from_secs(30))
    }
}

impl PunchConfig {
    /// The schedule for NATs that forget an unreplied UDP flow after `t`
    /// (Linux: 30 s, giving 20 s of plain tries, 35-40 s of silence and
    /// attempts of 10 s). Shorter timeouts shorten everything, within
    /// bounds: a few seconds of plain tries stay.
    pub fn for_udp_timeout(t: Duration) -> PunchConfig {
        PunchConfig {
            fast: (t * 2 / 3).clamp(Duration::from_secs(5), Duration::from_secs(20)),
            silence: t + Duration::from_secs(5),
            jitter: t / 6,
            attempt: (t / 3).clamp(Duration::from_secs(4), Duration::from_secs(10)),
            follow: Duration::from_millis(250),
        }
    }
}

/// Who sends first in a coordinated attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// The coordinator (smaller key).
    CoordinatorFirst,
    /// The other peer.
    PeerFirst,
    /// Both at the same moment (works where the path's latency exceeds the
    /// skew; never on a lab without latency).
    Together,
}

impl Order {
    /// Attempts 1, 2, 3, 4 ... cycle through the three orders.
    pub fn of(attempt: u32) -> Order {
        match attempt.saturating_sub(1) % 3 {
            0 => Order::CoordinatorFirst,
            1 => Order::PeerFirst,
            _ => Order::Together,
        }
    }
}

/// What the coordinator tells the peer: the attempt's number and how long
/// after receiving it the peer starts sending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cue {
    pub attempt: u32,
    pub delay: Duration,
}

impl Cue {
    pub const LEN: usize = 8;

    pub fn write(&self, out: &mut [u8]) {
        let ms = u32::try_from(self.delay.as_millis()).unwrap_or(u32::MAX);
        if let Some(b) = out.get_mut(..Cue::LEN) {
            b[..4].copy_from_slice(&self.attempt.to_le_bytes());
            b[4..].copy_from_slice(&ms.to_le_bytes());
        }
    }

    /// A cue's body; delays are bounded (a peer cannot silence us for long).
    pub fn parse(b: &[u8]) -> Option<Cue> {
        let attempt = crate::wire::u32_at(b, 0)?;
        let ms = crate::wire::u32_at(b, 4)?.min(MAX_CUE_DELAY_MS);
        Some(Cue {
            attempt,
            delay: Duration::from_millis(u64::from(ms)),
        })
    }
}

/// The longest start delay a cue may ask for.
const MAX_CUE_DELAY_MS: u32 = 5_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing to punch: a direct path works, there is no direct
    /// candidate, or the peer carries no traffic.
    Off,
    /// Direct candidates are probed, since then.
    Trying { since: Instant },
    /// Nothing goes to the peer's direct endpoints until then.
    Silent { until: Instant },
    /// An attempt is agreed: silent until then, trying after.
    Starting { at: Instant },
}

/// The punching state of one peer.
#[derive(Debug, Clone)]
pub struct Punch {
    state: State,
    /// Coordinated attempts so far (0: the first, uncoordinated one).
    pub attempt: u32,
}

impl Default for Punch {
    fn default() -> Self {
        Punch {
            state: State::Off,
            attempt: 0,
        }
    }
}

/// What [`Punch::tick`] asks of the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    None,
    /// Direct paths may be tried again: probe them now.
    Start,
    /// Send this cue to the peer (over the working path), then start at
    /// the moment [`Punch::deadline`] says.
    Cue(Cue),
}

impl Punch {
    /// Moves the schedule on. `pending`: the peer has direct candidates and
    /// none answers. `coordinator`: our key is the smaller. `rtt`: of the
    /// path the cue travels (the relay). `jitter`: a random draw in
    /// `0..=cfg.jitter`.
    pub fn tick(
        &mut self,
        now: Instant,
        cfg: &PunchConfig,
        pending: bool,
        coordinator: bool,
        rtt: Duration,
        jitter: Duration,
    ) -> Action {
        if !pending {
            *self = Punch::default();
            return Action::None;
        }
        match self.state {
            State::Off => {
                self.state = State::Trying { since: now };
                Action::None
            }
            State::Trying { since } => {
                let window = if self.attempt == 0 {
                    cfg.fast
                } else {
                    cfg.attempt
                };
                if now.saturating_duration_since(since) >= window {
                    // The other side waits for the coordinator's cue; if
                    // none comes (an agent without this schedule), it
                    // retries on its own after twice the silence.
                    let quiet = if coordinator {
                        cfg.silence + jitter
                    } else {
                        cfg.silence * 2 + cfg.jitter
                    };
                    self.state = State::Silent { until: now + quiet };
                }
                Action::None
            }
            State::Silent { until } if now >= until => {
                self.attempt = self.attempt.saturating_add(1);
                if !coordinator {
                    self.state = State::Trying { since: now };
                    return Action::Start;
                }
                let (own, peer) = match Order::of(self.attempt) {
                    Order::CoordinatorFirst => (Duration::ZERO, cfg.follow),
                    Order::PeerFirst => (rtt + cfg.follow, Duration::ZERO),
                    Order::Together => (rtt / 2, Duration::ZERO),
                };
                self.state = State::Starting { at: now + own };
                Action::Cue(Cue {
                    attempt: self.attempt,
                    delay: peer,
                })
            }
            State::Starting { at } if now >= at => {
                self.state = State::Trying { since: now };
                Action::Start
            }
            State::Silent { .. } | State::Starting { .. } => Action::None,
        }
    }

    /// Whether the peer's direct endpoints must hear nothing from us now.
    pub fn muted(&self, now: Instant) -> bool {
        match self.state {
            State::Silent { .. } => true,
            State::Starting { at } => now < at,
            _ => false,
        }
    }

    /// The coordinator's cue arrived (the coordinator ignores cues). Only
    /// while punching: a pair with a working direct path has nothing to
    /// agree on.
    pub fn on_cue(&mut self, now: Instant, cue: Cue, coordinator: bool) {
        if coordinator || self.state == State::Off {
            return;
        }
        // The same cue again (it goes on every working path): the start
        // it set stands.
        let agreed = matches!(self.state, State::Starting { .. } | State::Trying { .. });
        if agreed && cue.attempt == self.attempt && self.attempt > 0 {
            return;
        }
        self.attempt = cue.attempt;
        self.state = State::Starting {
            at: now + cue.delay,
        };
    }

    /// When [`Punch::tick`] has something to do next.
    pub fn deadline(&self, cfg: &PunchConfig) -> Option<Instant> {
        match self.state {
            State::Off => None,
            State::Trying { since } => Some(
                since
                    + if self.attempt == 0 {
                        cfg.fast
                    } else {
                        cfg.attempt
                    },
            ),
            State::Silent { until } => Some(until),
            State::Starting { at } => Some(at),
        }
    }

    /// Starts over (a new candidate, our own address changed): the next
    /// tick tries the direct paths the usual way again.
    pub fn reset(&mut self) {
        *self = Punch::default();
    }

    /// When an agreed attempt starts: the engine wakes at that very
    /// moment, off its timer grid (both sides must send within the path's
    /// latency of each other).
    pub fn start_at(&self) -> Option<Instant> {
        match self.state {
            State::Starting { at } => Some(at),
            _ => None,
        }
    }

    /// Whether a coordinated attempt is under way (a path that comes up now
    /// was punched).
    pub fn coordinated(&self) -> bool {
        self.attempt > 0 && self.state != State::Off
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RTT: Duration = Duration::from_millis(40);

    fn run(
        p: &mut Punch,
        t0: Instant,
        until: Duration,
        coord: bool,
        cfg: &PunchConfig,
    ) -> Vec<(Duration, Action)> {
        let mut out = Vec::new();
        let mut t = t0;
        while t < t0 + until {
            let a = p.tick(t, cfg, true, coord, RTT, Duration::ZERO);
            if a != Action::None {
                out.push((t - t0, a));
            }
            t += Duration::from_millis(50);
        }
        out
    }

    #[test]
    fn silence_outlasts_the_nat_timeout_and_attempts_alternate_the_first_sender() {
        let cfg = PunchConfig::default();
        let t0 = Instant::now();
        let mut c = Punch::default();
        let acts = run(&mut c, t0, Duration::from_secs(200), true, &cfg);
        let cues: Vec<(Duration, Cue)> = acts
            .iter()
            .filter_map(|(t, a)| match a {
                Action::Cue(c) => Some((*t, *c)),
                _ => None,
            })
            .collect();
        // fast 20 s, silence 35 s, cue; attempt 10 s, silence 35 s, cue ...
        assert_eq!(cues[0].0, Duration::from_secs(55));
        assert_eq!(cues[0].1.attempt, 1);
        assert_eq!(cues[0].1.delay, cfg.follow, "coordinator first");
        assert_eq!(cues[1].1.delay, Duration::ZERO, "peer first");
        assert!(cues[1].0 - cues[0].0 >= cfg.attempt + cfg.silence);
        assert_eq!(Order::of(cues[2].1.attempt), Order::Together);
        // Between the end of an attempt and the next cue, muted.
        let t = t0 + Duration::from_secs(30);
        let mut m = Punch::default();
        let _ = run(&mut m, t0, Duration::from_secs(30), true, &cfg);
        assert!(m.muted(t), "silent 10 s into the silence");
        assert_eq!(m.deadline(&cfg), Some(t0 + cfg.fast + cfg.silence));
        // New candidates are new chances: tried at once.
        m.reset();
        assert!(!m.muted(t));
        assert_eq!(m.deadline(&cfg), None);
    }

    #[test]
    fn the_other_side_waits_for_the_cue_and_starts_when_it_says() {
        let cfg = PunchConfig::default();
        let t0 = Instant::now();
        let mut p = Punch::default();
        let _ = run(&mut p, t0, Duration::from_secs(30), false, &cfg);
        assert!(p.muted(t0 + Duration::from_secs(30)));
        // No cue yet at the coordinator's time: still silent.
        let t1 = t0 + Duration::from_secs(60);
        assert_eq!(
            p.tick(t1, &cfg, true, false, RTT, Duration::ZERO),
            Action::None
        );
        assert!(p.muted(t1));
        let cue = Cue {
            attempt: 2,
            delay: Duration::from_millis(300),
        };
        p.on_cue(t1, cue, false);
        assert!(p.muted(t1 + Duration::from_millis(299)));
        let start = t1 + Duration::from_millis(300);
        assert_eq!(p.deadline(&cfg), Some(start));
        assert_eq!(
            p.tick(start, &cfg, true, false, RTT, Duration::ZERO),
            Action::Start
        );
        assert!(!p.muted(start));
        assert_eq!(p.attempt, 2);
        assert!(p.coordinated());
        // A working direct path ends it all.
        p.tick(start, &cfg, false, false, RTT, Duration::ZERO);
        assert_eq!(p.deadline(&cfg), None);
        assert!(!p.muted(start));
    }

    #[test]
    fn without_a_cue_the_other_side_retries_alone_after_twice_the_silence() {
        let cfg = PunchConfig::default();
        let t0 = Instant::now();
        let mut p = Punch::default();
        let acts = run(&mut p, t0, Duration::from_secs(120), false, &cfg);
        let first = acts.iter().find(|(_, a)| *a == Action::Start).map(|x| x.0);
        let want = cfg.fast + cfg.silence * 2 + cfg.jitter;
        assert_eq!(first.map(|d| d.as_secs()), Some(want.as_secs()));
    }

    #[test]
    fn cues_round_trip_and_their_delay_is_bounded() {
        let mut b = [0u8; Cue::LEN];
        let c = Cue {
            attempt: 7,
            delay: Duration::from_millis(1234),
        };
        c.write(&mut b);
        assert_eq!(Cue::parse(&b), Some(c));
        let long = Cue {
            attempt: 1,
            delay: Duration::from_secs(3600),
        };
        long.write(&mut b);
        assert_eq!(
            Cue::parse(&b).map(|c| c.delay),
            Some(Duration::from_millis(u64::from(MAX_CUE_DELAY_MS)))
        );
        assert_eq!(Cue::parse(&b[..5]), None);
        // Ignored by the coordinator and when nothing is being punched.
        let mut p = Punch::default();
        p.on_cue(Instant::now(), c, false);
        assert_eq!(p.attempt, 0);
    }
}
