//! What the store thread does after a store call failed: try the call
//! again on the same session, or drop the connection and make a new one,
//! and how long to wait first. Pure (time and randomness passed in), so
//! the policy is tested without a store; the thread in `signal.rs` only
//! carries it out.
//!
//! Why a slow call does not end the session: at a few hundred nodes a
//! loaded etcd answers some calls after the bound. Starting over then
//! (new connection, new watch, often a new lease and a republished record
//! that every other agent processes) costs etcd far more than the call
//! that was slow, so load fed more timeouts: a reconnect storm
//! (docs/benchmarks.md, finding 27). The session (connection, lease,
//! watch) is kept and the call tried again after a jittered pause; only a
//! broken connection, or calls that stay unanswered for longer than
//! [`SLOW_HOLD`] (a path that hangs: a half-open TCP connection after a
//! partition recovers only on a new one), make a new connection.

use std::time::{Duration, Instant};

/// How a store call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No answer within the bound: the store is slow (or the path hangs).
    Slow,
    /// Refused, the connection broke, or an error the store answered.
    Broken,
}

/// What to do after a failed call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Keep the session; call again after this pause.
    Retry(Duration),
    /// Drop the connection; connect again after this pause.
    Reconnect(Duration),
}

/// Calls that stay unanswered this long since the session's last answer
/// end it: by then the connection itself is suspect. Shorter than the
/// lease's TTL, so a new connection still finds the lease alive.
pub const SLOW_HOLD: Duration = Duration::from_secs(20);

/// Longest pause before connecting again: a store that comes back is
/// noticed within about this.
pub const RECONNECT_MAX: Duration = Duration::from_secs(2);

/// Jittered exponential backoff: the n-th pause is drawn from
/// `[cap/2, cap]` with `cap = min(first * 2^n, max)`, so agents that failed
/// together (one slow etcd fails them all) come back spread over half the
/// pause, not together.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    n: u32,
    rng: u64,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration, seed: u64) -> Backoff {
        Backoff {
            first,
            max,
            n: 0,
            rng: seed,
        }
    }

    pub fn next_pause(&mut self) -> Duration {
        let cap = self
            .first
            .saturating_mul(1u32 << self.n.min(16))
            .min(self.max);
        self.n = self.n.saturating_add(1);
        let half = cap / 2;
        let span = (cap - half).as_millis() as u64;
        half + Duration::from_millis(splitmix(&mut self.rng) % (span + 1))
    }

    pub fn reset(&mut self) {
        self.n = 0;
    }
}

/// splitmix64: a few lines of well-spread randomness, no dependency.
fn splitmix(s: &mut u64) -> u64 {
    *s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *s;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The retry and reconnect policy of the store thread.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Since when calls have gone unanswered (`None`: the last one was).
    slow_since: Option<Instant>,
    retry: Backoff,
    reconnect: Backoff,
}

impl Policy {
    pub fn new(seed: u64) -> Policy {
        Policy {
            slow_since: None,
            retry: Backoff::new(Duration::from_millis(500), Duration::from_secs(4), seed),
            reconnect: Backoff::new(
                Duration::from_millis(200),
                RECONNECT_MAX,
                seed.rotate_left(32) ^ 0x5851_f42d_4c95_7f2d,
            ),
        }
    }

    /// A call was answered.
    pub fn answered(&mut self) {
        self.slow_since = None;
        self.retry.reset();
        self.reconnect.reset();
    }

    /// A call failed at `now`.
    pub fn failed(&mut self, f: Failure, now: Instant) -> Next {
        if f == Failure::Slow {
            let since = *self.slow_since.get_or_insert(now);
            if now.saturating_duration_since(since) < SLOW_HOLD {
                return Next::Retry(self.retry.next_pause());
            }
        }
        self.slow_since = None;
        self.retry.reset();
        Next::Reconnect(self.reconnect.next_pause())
    }

    /// A connection attempt failed: wait before the next one.
    pub fn connect_failed(&mut self) -> Duration {
        self.reconnect.next_pause()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    /// Pauses grow to the cap, each in [cap/2, cap], the same for a seed,
    /// and spread for agents of different seeds that failed together.
    #[test]
    fn backoff_grows_jittered_and_deterministic_per_seed() {
        let mut b = Backoff::new(secs(0.2), secs(8.0), 7);
        let caps = [0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 8.0, 8.0, 8.0];
        let mut got = Vec::new();
        for cap in caps {
            let p = b.next_pause();
            assert!(
                p >= secs(cap / 2.0) && p <= secs(cap),
                "{p:?} for cap {cap}"
            );
            got.push(p);
        }
        let mut again = Backoff::new(secs(0.2), secs(8.0), 7);
        assert_eq!(
            (0..caps.len())
                .map(|_| again.next_pause())
                .collect::<Vec<_>>(),
            got
        );
        b.reset();
        assert!(b.next_pause() <= secs(0.2));
        // 64 agents failing together at the 8 s cap do not come back at
        // one instant.
        let firsts: std::collections::BTreeSet<Duration> = (0..64u64)
            .map(|seed| {
                let mut b = Backoff::new(secs(0.2), secs(8.0), seed);
                (0..7).map(|_| b.next_pause()).last().unwrap()
            })
            .collect();
        assert!(firsts.len() > 32, "only {} distinct pauses", firsts.len());
    }

    /// A slow call keeps the session and is tried again, with growing
    /// pauses, until calls have gone unanswered for SLOW_HOLD; an answer
    /// in between starts that count again.
    #[test]
    fn a_slow_call_keeps_the_session_until_calls_stay_unanswered() {
        let t0 = Instant::now();
        let mut p = Policy::new(1);
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert!(matches!(p.failed(Failure::Slow, at(0)), Next::Retry(d) if d <= secs(0.5)));
        assert!(matches!(p.failed(Failure::Slow, at(5)), Next::Retry(_)));
        assert!(matches!(p.failed(Failure::Slow, at(19)), Next::Retry(_)));
        p.answered();
        assert!(matches!(p.failed(Failure::Slow, at(30)), Next::Retry(d) if d <= secs(0.5)));
        assert!(matches!(p.failed(Failure::Slow, at(45)), Next::Retry(_)));
        assert!(matches!(
            p.failed(Failure::Slow, at(50)),
            Next::Reconnect(_)
        ));
        // The next session's slow calls count from their own start.
        assert!(matches!(p.failed(Failure::Slow, at(51)), Next::Retry(_)));
    }

    /// A broken connection is replaced at once (after the backoff), and
    /// reconnects that keep failing back off to the cap.
    #[test]
    fn a_broken_connection_reconnects_with_backoff() {
        let t0 = Instant::now();
        let mut p = Policy::new(2);
        let Next::Reconnect(first) = p.failed(Failure::Broken, t0) else {
            panic!("a broken call kept the session");
        };
        assert!(first <= secs(0.2));
        let mut last = first;
        for _ in 0..10 {
            last = p.connect_failed();
        }
        assert!(
            last >= RECONNECT_MAX / 2 && last <= RECONNECT_MAX,
            "{last:?}"
        );
        p.answered();
        assert!(matches!(p.failed(Failure::Broken, t0), Next::Reconnect(d) if d <= secs(0.2)));
    }
}
