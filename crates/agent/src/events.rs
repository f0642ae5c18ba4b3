//! What happens to peers, told at info level: handshakes completed or
//! failed and why, paths chosen or changed and why, TURN allocations
//! changing state (from the engine's events), peers added or removed and
//! records ignored (from the store thread). Every line is limited per peer
//! and kind by a token bucket ([`LogLimiter`]): no peer, and no stranger
//! sending handshakes, can flood the log; the next line that gets through
//! says how many were held back.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use evio_overlay::bucket::TokenBucket;
use evio_overlay::engine::Event;
use evio_overlay::nat::{TurnState, TurnTransport};
use evio_overlay::path::{PathAddr, Rank, Via};
use evio_overlay::reason::PathWhy;

/// Lines per peer and kind: this many at once...
const BURST: u32 = 5;
/// ...then one per this period.
const PERIOD: Duration = Duration::from_secs(10);
/// Peers and kinds remembered; past it, strangers share one bucket per kind.
const MAX_KEYS: usize = 4096;
/// Who shares a bucket when the table is full.
const OTHERS: &str = "*";

/// One token bucket per (who, kind).
pub struct LogLimiter {
    buckets: HashMap<(String, &'static str), (TokenBucket, u32)>,
}

impl Default for LogLimiter {
    fn default() -> Self {
        LogLimiter::new()
    }
}

impl LogLimiter {
    pub fn new() -> LogLimiter {
        LogLimiter {
            buckets: HashMap::new(),
        }
    }

    /// Whether a line about `who` of `kind` may be logged now: `Some(n)`
    /// with the lines held back since the last one, `None` to hold it.
    pub fn allow(&mut self, now: Instant, who: &str, kind: &'static str) -> Option<u32> {
        let mut key = (who.to_string(), kind);
        if !self.buckets.contains_key(&key) && self.buckets.len() >= MAX_KEYS {
            // A full bucket is what a newcomer gets: forgetting one changes
            // nothing.
            self.buckets
                .retain(|_, (b, held)| *held > 0 || !b.idle(now));
            if self.buckets.len() >= MAX_KEYS {
                key.0 = OTHERS.to_string();
            }
        }
        let (bucket, held) = self
            .buckets
            .entry(key)
            .or_insert_with(|| (TokenBucket::per(1, PERIOD, BURST), 0));
        if bucket.take(now) {
            Some(std::mem::take(held))
        } else {
            *held = held.saturating_add(1);
            None
        }
    }
}

/// A path as a person reads it: its class and address, and the TURN server
/// it goes through when it leaves through one of our allocations.
pub fn show_path(p: Option<(PathAddr, Rank)>, turn: &[SocketAddr]) -> String {
    let Some((a, class)) = p else {
        return "none".into();
    };
    let class = match class {
        Rank::Local => "local",
        Rank::Direct => "direct",
        Rank::Relay => "relay",
    };
    match a.via {
        Via::Direct => format!("{class} {}", a.remote),
        Via::Spare(i) => format!("{class} {} from spare port #{i}", a.remote),
        Via::Turn(i) => match turn.get(usize::from(i)) {
            Some(s) => format!("{class} {} via TURN {s}", a.remote),
            None => format!("{class} {} via TURN #{i}", a.remote),
        },
    }
}

/// Why a path changed, in the operator's words: a fall back to the relay
/// and an upgrade from it are named as such.
pub fn path_reason(old: Option<Rank>, new: Option<Rank>, why: PathWhy) -> String {
    match (old, new, why) {
        (Some(o), Some(Rank::Relay), PathWhy::ProbesLost) if o != Rank::Relay => {
            "relay fallback: the direct path lost its probes".into()
        }
        (Some(o), Some(Rank::Relay), PathWhy::Roamed) if o != Rank::Relay => {
            "relay fallback: the direct path went quiet, the peer reaches us through a relay".into()
        }
        (_, None, PathWhy::ProbesLost) => "probes lost: no path answers".into(),
        (Some(Rank::Relay), Some(n), PathWhy::BetterClass) if n != Rank::Relay => {
            "a direct path answers: upgraded from the relay".into()
        }
        _ => why.as_str().into(),
    }
}

/// The engine thread's log of its events, and what `peers --explain`
/// reuses from it: the last failure and path change of each peer.
#[derive(Default)]
pub struct EventLog {
    limiter: LogLimiter,
    /// Per peer: the last handshake failure, and the last path change.
    pub last_failure: HashMap<String, (Instant, String)>,
    pub last_path: HashMap<String, (Instant, String)>,
}

impl EventLog {
    /// Logs `e` (if its peer and kind are within their rate), `turn` being
    /// the TURN servers by index.
    pub fn peer_event(&mut self, now: Instant, e: &Event, turn: &[SocketAddr]) {
        if self.last_failure.len() + self.last_path.len() > MAX_KEYS {
            self.last_failure.clear();
            self.last_path.clear();
        }
        match e {
            Event::PeerUp { node } => {
                if let Some(held) = self.limiter.allow(now, node, "up") {
                    tracing::info!(peer = %node, held, "peer connected");
                }
            }
            Event::PeerDown { node } => {
                if let Some(held) = self.limiter.allow(now, node, "down") {
                    tracing::info!(peer = %node, held, "peer down: no session or no path answers");
                }
            }
            Event::Handshake {
                node,
                via,
                initiator,
                rekey,
            } => {
                let role = if *initiator { "initiator" } else { "responder" };
                let kind = if *rekey { "rekey" } else { "handshake" };
                match self.limiter.allow(now, node, kind) {
                    // Rekeys come every two minutes per peer: not news.
                    Some(_) if *rekey => {
                        tracing::debug!(peer = %node, via = %via.remote, role = %role, "rekeyed")
                    }
                    Some(held) => tracing::info!(
                        peer = %node, via = %via.remote, role = %role, held, "handshake completed"
                    ),
                    None => {}
                }
            }
            Event::HandshakeFailed { node, from, why } => {
                let who = match (node, from) {
                    (Some(n), _) => n.clone(),
                    (None, Some(f)) => f.remote.ip().to_string(),
                    (None, None) => OTHERS.to_string(),
                };
                if let Some(n) = node {
                    self.last_failure.insert(n.clone(), (now, why.to_string()));
                }
                if let Some(held) = self.limiter.allow(now, &who, why.kind()) {
                    let from = from.map(|f| f.remote.to_string());
                    tracing::info!(
                        peer = %node.as_deref().unwrap_or("?"),
                        from = %from.as_deref().unwrap_or("-"),
                        reason = %why,
                        held,
                        "handshake failed: {}",
                        why.kind()
                    );
                }
            }
            Event::PathChanged {
                node,
                old,
                new,
                why,
            } => {
                let reason = path_reason(old.map(|o| o.1), new.map(|n| n.1), *why);
                let (o, n) = (show_path(*old, turn), show_path(*new, turn));
                let what = if old.is_none() {
                    "path chosen"
                } else {
                    "path changed"
                };
                let line = format!("{what}: {o} -> {n} ({reason})");
                self.last_path.insert(node.clone(), (now, line));
                if let Some(held) = self.limiter.allow(now, node, "path") {
                    tracing::info!(peer = %node, old = %o, new = %n, reason = %reason, held, "{what}");
                }
            }
            Event::ActivePathLost { .. }
            | Event::RelaySuspect(_)
            | Event::OpenSpares { .. }
            | Event::CloseSpares(_) => {}
        }
    }

    /// Logs a TURN allocation's change of state.
    pub fn turn_event(
        &mut self,
        now: Instant,
        server: SocketAddr,
        transport: TurnTransport,
        old: &TurnState,
        new: &TurnState,
    ) {
        let Some(held) = self.limiter.allow(now, &server.to_string(), "turn") else {
            return;
        };
        let transport = format!("{transport:?}").to_lowercase();
        let (old, new) = (turn_state(old), turn_state(new));
        tracing::info!(server = %server, transport = %transport, old = %old, new = %new, held, "TURN allocation: {new}");
    }
}

/// A TURN state as a word, with its address or error.
pub fn turn_state(s: &TurnState) -> String {
    match s {
        TurnState::Idle => "idle".into(),
        TurnState::Connecting => "connecting".into(),
        TurnState::Allocating => "allocating".into(),
        TurnState::Ready(a) => format!("ready (relayed address {a})"),
        TurnState::Failed(e) => format!("failed ({e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_peer_and_kind_gets_its_burst_then_one_line_per_period() {
        let (mut l, t) = (LogLimiter::new(), Instant::now());
        for _ in 0..BURST {
            assert_eq!(l.allow(t, "n1", "path"), Some(0));
        }
        // A flood from n1 is held back; n1's other kinds and other peers
        // are not touched by it.
        for _ in 0..1000 {
            assert_eq!(l.allow(t, "n1", "path"), None);
        }
        assert_eq!(l.allow(t, "n1", "handshake"), Some(0));
        assert_eq!(l.allow(t, "n2", "path"), Some(0));
        // The next line says how many were held back.
        assert_eq!(l.allow(t + PERIOD / 2, "n1", "path"), None);
        assert_eq!(l.allow(t + PERIOD, "n1", "path"), Some(1001));
        assert_eq!(l.allow(t + PERIOD, "n1", "path"), None);
    }

    #[test]
    fn strangers_past_the_table_share_one_bucket() {
        let (mut l, t) = (LogLimiter::new(), Instant::now());
        for i in 0..MAX_KEYS {
            // Each takes a token: none is idle, none can be forgotten.
            assert!(l.allow(t, &format!("198.51.100.{i}"), "cookie").is_some());
        }
        let allowed = (0..100)
            .filter(|i| l.allow(t, &format!("203.0.113.{i}"), "cookie").is_some())
            .count();
        assert_eq!(allowed, BURST as usize);
        assert!(l.buckets.len() <= MAX_KEYS + 1);
    }

    #[test]
    fn paths_and_their_reasons_read_as_an_operator_would_say_them() {
        let direct = PathAddr::direct("203.0.113.12:5800".parse().unwrap());
        let relayed = PathAddr {
            via: Via::Turn(0),
            remote: "203.0.113.12:5800".parse().unwrap(),
        };
        let turn = ["203.0.113.1:3478".parse().unwrap()];
        assert_eq!(
            show_path(Some((relayed, Rank::Relay)), &turn),
            "relay 203.0.113.12:5800 via TURN 203.0.113.1:3478"
        );
        assert_eq!(
            show_path(Some((direct, Rank::Direct)), &turn),
            "direct 203.0.113.12:5800"
        );
        assert_eq!(show_path(None, &turn), "none");
        let r = |o, n, w| path_reason(o, n, w);
        assert!(
            r(Some(Rank::Local), Some(Rank::Relay), PathWhy::Roamed).starts_with("relay fallback")
        );
        assert!(
            r(Some(Rank::Direct), Some(Rank::Relay), PathWhy::ProbesLost)
                .starts_with("relay fallback")
        );
        assert!(
            r(Some(Rank::Relay), Some(Rank::Direct), PathWhy::BetterClass).contains("upgraded")
        );
        assert_eq!(
            r(None, Some(Rank::Direct), PathWhy::First),
            "first path to answer"
        );
        assert_eq!(
            r(Some(Rank::Direct), None, PathWhy::ProbesLost),
            "probes lost: no path answers"
        );
        assert_eq!(
            r(Some(Rank::Direct), Some(Rank::Direct), PathWhy::BetterRtt),
            "better RTT"
        );
    }
}
