//! `peers NODE --explain`: one peer in depth (the candidates of both
//! sides, every path with its state, RTT, lost probes and last packet, the
//! handshake in progress, the last failure and path change) and a one-line
//! verdict of why the pair is where it is, e.g. "direct blocked: no reply
//! from 203.0.113.12:5800 for 10 s; relayed via 203.0.113.1:3478".

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use evio_overlay::crypto::b64;
use evio_overlay::engine::{PeerDetail, PeerState};
use evio_overlay::nat::{TurnState, TurnTransport};
use evio_overlay::path::{Origin, Rank, Via};
use serde_json::{json, Value};

use crate::events::path_reason;
use crate::metrics::{round_ms, wall_of};

/// What the engine answers to an explain request.
#[derive(Debug, Clone)]
pub struct Explain {
    pub detail: PeerDetail,
    /// Our own candidates.
    pub ours: Vec<(SocketAddr, evio_subnet::CandidateKind)>,
    pub turn: Vec<(SocketAddr, TurnTransport, TurnState)>,
    pub last_failure: Option<(Instant, String)>,
    pub last_path: Option<(Instant, String)>,
    pub taken: Instant,
}

/// Where a path stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathState {
    /// It carries the traffic.
    Active,
    /// It answers; another is better.
    Standby,
    /// It answered once and lost its probes since.
    Dead,
    /// Nothing ever came back on it.
    Unanswered,
}

impl PathState {
    fn as_str(self) -> &'static str {
        match self {
            PathState::Active => "active",
            PathState::Standby => "standby",
            PathState::Dead => "dead",
            PathState::Unanswered => "unanswered",
        }
    }
}

/// One path, as the verdict needs it.
#[derive(Debug, Clone)]
pub struct PathFacts {
    pub remote: SocketAddr,
    pub class: Rank,
    /// The TURN server it goes through (our allocation), if any.
    pub turn: Option<SocketAddr>,
    pub state: PathState,
    /// Since the last packet on it, or since it was first tried.
    pub quiet: Duration,
    pub lost: u32,
    pub rtt: Option<Duration>,
}

/// A peer, as the verdict needs it.
#[derive(Debug, Clone)]
pub struct Facts {
    pub state: PeerState,
    pub stale: bool,
    pub session: bool,
    pub paths: Vec<PathFacts>,
    /// The handshake round in progress: for how long, initiations sent.
    pub handshake: Option<(Duration, u32)>,
    pub last_failure: Option<String>,
}

fn secs(d: Duration) -> String {
    format!("{} s", d.as_secs())
}

/// "no reply from A for 10 s, B for 12 s" for the paths that do not answer.
fn no_reply(paths: &[&PathFacts]) -> String {
    let mut parts: Vec<String> = (paths.iter().take(3))
        .map(|p| format!("{} for {}", p.remote, secs(p.quiet)))
        .collect();
    if paths.len() > 3 {
        parts.push(format!("{} more", paths.len() - 3));
    }
    format!("no reply from {}", parts.join(", "))
}

/// Why the pair is where it is, in one line.
pub fn verdict(f: &Facts) -> String {
    let silent: Vec<&PathFacts> = (f.paths.iter())
        .filter(|p| matches!(p.state, PathState::Dead | PathState::Unanswered))
        .collect();
    let direct_silent: Vec<&PathFacts> = (silent.iter().copied())
        .filter(|p| p.class != Rank::Relay)
        .collect();
    if !f.session {
        if f.stale {
            return "its record is stale (its liveness lapsed in the store): not contacted; \
                    answered if it speaks"
                .into();
        }
        if f.paths.is_empty() {
            return "no path to try: its record publishes no usable candidate".into();
        }
        let tried = format!("{} path(s) tried: {}", f.paths.len(), no_reply(&silent));
        return match (&f.last_failure, f.handshake) {
            (Some(why), _) => format!("no session: handshake failed ({why}); {tried}"),
            (None, Some((t, n))) => {
                format!(
                    "handshaking for {} ({n} initiations), no response yet; {tried}",
                    secs(t)
                )
            }
            (None, None) => format!("no session yet; {tried}"),
        };
    }
    let Some(active) = f.paths.iter().find(|p| p.state == PathState::Active) else {
        return format!("session up, but no path answers: {}", no_reply(&silent));
    };
    let rtt = active
        .rtt
        .map(|r| format!(", rtt {:.1} ms", r.as_secs_f64() * 1e3))
        .unwrap_or_default();
    if active.class != Rank::Relay {
        let class = if active.class == Rank::Local {
            "local (same LAN)"
        } else {
            "direct"
        };
        return format!("{class} via {}{rtt}", active.remote);
    }
    let relay = match active.turn {
        Some(server) => format!("relayed via {server}{rtt}"),
        None => format!("relayed via its relay address {}{rtt}", active.remote),
    };
    if direct_silent.is_empty() {
        let answering = f
            .paths
            .iter()
            .any(|p| p.class != Rank::Relay && p.state == PathState::Standby);
        if answering {
            return format!("a direct path answers; moving to it soon; {relay}");
        }
        return format!("no direct candidate to try; {relay}");
    }
    format!("direct blocked: {}; {relay}", no_reply(&direct_silent))
}

/// The verdict's view of an engine answer.
pub fn facts(ex: &Explain) -> Facts {
    let d = &ex.detail;
    let active = d.status.path;
    let paths = d
        .paths
        .iter()
        .map(|(p, alive)| {
            let state = match (Some(p.addr) == active, alive, p.last_rx) {
                (true, _, _) => PathState::Active,
                (false, true, _) => PathState::Standby,
                (false, false, Some(_)) => PathState::Dead,
                (false, false, None) => PathState::Unanswered,
            };
            let turn = match p.addr.via {
                Via::Turn(i) => ex.turn.get(usize::from(i)).map(|t| t.0),
                Via::Direct | Via::Spare(_) => None,
            };
            PathFacts {
                remote: p.addr.remote,
                class: p.class,
                turn,
                state,
                quiet: ex
                    .taken
                    .saturating_duration_since(p.last_rx.unwrap_or(p.since)),
                lost: p.lost,
                rtt: p.rtt,
            }
        })
        .collect();
    Facts {
        state: d.status.state,
        stale: d.stale,
        session: d.status.session_born.is_some(),
        paths,
        handshake: d
            .handshake
            .map(|(t, n)| (ex.taken.saturating_duration_since(t), n)),
        last_failure: ex.last_failure.as_ref().map(|(_, w)| w.clone()),
    }
}

fn class_str(c: Rank) -> &'static str {
    match c {
        Rank::Local => "local",
        Rank::Direct => "direct",
        Rank::Relay => "relay",
    }
}

/// The answer of the control socket's `explain NODE`; `h` knows the
/// kinds the peer published.
pub fn explain_json(ex: &Explain, h: &crate::signal::StoreHealth) -> Value {
    let d = &ex.detail;
    let f = facts(ex);
    let ago = |t: Instant| (ex.taken.saturating_duration_since(t).as_millis() as f64) / 1e3;
    let paths: Vec<Value> = d
        .paths
        .iter()
        .zip(&f.paths)
        .map(|((p, _), pf)| {
            json!({
                "addr": p.addr.remote.to_string(),
                "via": pf.turn.map_or("socket".to_string(), |s| format!("turn:{s}")),
                "class": class_str(p.class),
                "origin": if p.origin == Origin::Learned { "learned" } else { "candidate" },
                "state": pf.state.as_str(),
                "rttMs": p.rtt.map(round_ms),
                "lostProbes": p.lost,
                "lastReceived": p.last_rx.map(|t| wall_of(ex.taken, t)),
                "quietSeconds": pf.quiet.as_secs(),
            })
        })
        .collect();
    let tried = |a: SocketAddr| d.paths.iter().any(|(p, _)| p.addr.remote == a);
    let last_rx = d.paths.iter().filter_map(|(p, _)| p.last_rx).max();
    json!({
        "node": d.status.node,
        "publicKey": b64(&d.status.key),
        "state": d.status.state.as_str(),
        "stale": d.stale,
        "path": d.status.relayed.map(|r| if r { "relay" } else { "direct" }),
        "method": h.path_method(d.status.method, d.status.path),
        "endpoint": d.status.path.map(|a| a.remote.to_string()),
        "candidate": d.status.path.map(|a| h.path_candidate(a)),
        "family": d.status.path.map(|a| crate::metrics::path_family(a, &ex.turn)),
        "rttMs": d.status.rtt.map(round_ms),
        "lastHandshake": d.status.session_born.map(|t| wall_of(ex.taken, t)),
        "lastReceived": last_rx.map(|t| wall_of(ex.taken, t)),
        "handshake": d.handshake.map(|(t, n)| json!({"seconds": ago(t), "initiations": n})),
        "candidates": {
            "local": ex.ours.iter().map(|(a, k)| json!({"addr": a.to_string(), "kind": k.as_str()})).collect::<Vec<_>>(),
            "peer": d.candidates.iter().map(|c| json!({
                "addr": c.addr.to_string(),
                "kind": h.peer_kinds.get(&c.addr).copied()
                    .unwrap_or(crate::signal::kind_of(c.class)).as_str(),
                "tried": tried(c.addr),
            })).collect::<Vec<_>>(),
        },
        "paths": paths,
        "pathReason": d.status.path.map(|_| path_reason(None, None, d.path_why)),
        "lastFailure": ex.last_failure.as_ref().map(|(t, w)| json!({"reason": w, "secondsAgo": ago(*t)})),
        "lastPathChange": ex.last_path.as_ref().map(|(t, w)| json!({"change": w, "secondsAgo": ago(*t)})),
        "verdict": verdict(&f),
    })
}

/// The explain JSON for a person (rendered from the JSON, as `peers` is,
/// so the CLI can show what any agent version sends).
pub fn explain_text(v: &Value) -> String {
    let mut out = format!(
        "peer {}  key {}\nstate {}{}  path {}{}  endpoint {}  rtt {} ms\n",
        text(&v["node"]),
        text(&v["publicKey"]),
        text(&v["state"]),
        if v["stale"] == true { " (stale)" } else { "" },
        text(&v["path"]),
        v["method"]
            .as_str()
            .map(|m| format!(" ({m})"))
            .unwrap_or_default(),
        text(&v["endpoint"]),
        text(&v["rttMs"]),
    );
    if let Some(kind) = v["candidate"].as_str() {
        let family = v["family"].as_str().unwrap_or("?");
        let _ = writeln!(out, "the path goes to its {kind} candidate, over {family}");
    }
    let _ = writeln!(
        out,
        "last handshake {}  last packet received {}",
        text(&v["lastHandshake"]),
        text(&v["lastReceived"])
    );
    if let Some(h) = v["handshake"].as_object() {
        let _ = writeln!(
            out,
            "handshaking for {} s, {} initiations",
            text(&h["seconds"]),
            text(&h["initiations"])
        );
    }
    candidates_text(v, &mut out);
    out.push_str(&crate::metrics::columns(&path_rows(v)));
    for (k, f, title) in [
        ("lastPathChange", "change", "last path change"),
        ("lastFailure", "reason", "last handshake failure"),
    ] {
        if v[k].is_object() {
            let _ = writeln!(
                out,
                "{title} ({} s ago): {}",
                text(&v[k]["secondsAgo"]),
                text(&v[k][f])
            );
        }
    }
    let _ = writeln!(out, "verdict: {}", text(&v["verdict"]));
    out
}

/// A JSON value as a cell: `-` for null, strings without quotes.
fn text(x: &Value) -> String {
    match x {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// One line per side: its candidates, and which were never tried.
fn candidates_text(v: &Value, out: &mut String) {
    for (side, title) in [("local", "our candidates"), ("peer", "its candidates")] {
        let list: Vec<String> = (v["candidates"][side].as_array().into_iter().flatten())
            .map(|c| {
                let untried = if c["tried"] == false {
                    ", not tried"
                } else {
                    ""
                };
                format!("{} ({}{untried})", text(&c["addr"]), text(&c["kind"]))
            })
            .collect();
        let list = if list.is_empty() {
            "none".to_string()
        } else {
            list.join(", ")
        };
        let _ = writeln!(out, "{title}: {list}");
    }
}

/// The paths table: a header row, then one row per path.
fn path_rows(v: &Value) -> Vec<Vec<String>> {
    let mut rows = vec![[
        "PATH",
        "VIA",
        "CLASS",
        "STATE",
        "RTT",
        "LOST",
        "QUIET",
        "LAST RECEIVED",
    ]
    .map(String::from)
    .to_vec()];
    for p in v["paths"].as_array().into_iter().flatten() {
        rows.push(vec![
            text(&p["addr"]),
            text(&p["via"]),
            text(&p["class"]),
            text(&p["state"]),
            p["rttMs"]
                .as_f64()
                .map_or("-".into(), |r| format!("{r:.2} ms")),
            text(&p["lostProbes"]),
            format!("{} s", text(&p["quietSeconds"])),
            text(&p["lastReceived"]),
        ]);
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_names_how_the_working_path_was_found() {
        let v = serde_json::json!({"node": "n1", "state": "connected", "path": "direct",
            "method": "punched", "endpoint": "203.0.113.12:5800"});
        assert!(explain_text(&v).contains("path direct (punched)  endpoint"));
        // An older agent's answer has no method.
        let old = serde_json::json!({"node": "n1", "state": "connected", "path": "relay"});
        assert!(explain_text(&old).contains("path relay  endpoint"));
    }

    fn path(remote: &str, class: Rank, state: PathState, quiet: u64) -> PathFacts {
        PathFacts {
            remote: remote.parse().unwrap(),
            class,
            turn: None,
            state,
            quiet: Duration::from_secs(quiet),
            lost: 0,
            rtt: None,
        }
    }

    fn connected(paths: Vec<PathFacts>) -> Facts {
        Facts {
            state: PeerState::Connected,
            stale: false,
            session: true,
            paths,
            handshake: None,
            last_failure: None,
        }
    }

    #[test]
    fn a_relayed_pair_names_the_direct_paths_that_do_not_answer_and_the_relay() {
        let mut relay = path("203.0.113.12:5800", Rank::Relay, PathState::Active, 0);
        relay.turn = Some("203.0.113.1:3478".parse().unwrap());
        let f = connected(vec![
            path("203.0.113.12:5800", Rank::Direct, PathState::Unanswered, 10),
            relay,
            path("203.0.113.1:49152", Rank::Relay, PathState::Standby, 0),
        ]);
        assert_eq!(
            verdict(&f),
            "direct blocked: no reply from 203.0.113.12:5800 for 10 s; relayed via 203.0.113.1:3478"
        );
        // Its relay address rather than our allocation, and no direct
        // candidate at all.
        let f = connected(vec![path(
            "203.0.113.1:49152",
            Rank::Relay,
            PathState::Active,
            0,
        )]);
        assert_eq!(
            verdict(&f),
            "no direct candidate to try; relayed via its relay address 203.0.113.1:49152"
        );
    }

    #[test]
    fn a_direct_pair_says_so_with_its_rtt() {
        let mut p = path("192.168.1.3:5800", Rank::Local, PathState::Active, 0);
        p.rtt = Some(Duration::from_micros(400));
        assert_eq!(
            verdict(&connected(vec![p])),
            "local (same LAN) via 192.168.1.3:5800, rtt 0.4 ms"
        );
    }

    #[test]
    fn without_a_session_the_failure_or_the_wait_is_named() {
        let mut f = connected(vec![
            path("203.0.113.12:5800", Rank::Direct, PathState::Unanswered, 12),
            path("192.168.3.2:5800", Rank::Local, PathState::Unanswered, 12),
        ]);
        f.session = false;
        f.state = PeerState::Connecting;
        f.handshake = Some((Duration::from_secs(7), 5));
        assert_eq!(
            verdict(&f),
            "handshaking for 7 s (5 initiations), no response yet; 2 path(s) tried: \
             no reply from 203.0.113.12:5800 for 12 s, 192.168.3.2:5800 for 12 s"
        );
        f.last_failure = Some("wrong network key".into());
        assert!(verdict(&f).starts_with("no session: handshake failed (wrong network key); "));
        f.stale = true;
        assert!(verdict(&f).starts_with("its record is stale"));
        f.stale = false;
        f.paths.clear();
        assert!(verdict(&f).starts_with("no path to try"));
    }

    #[test]
    fn a_session_without_a_path_lists_what_went_quiet() {
        let mut f = connected(vec![path(
            "203.0.113.12:5800",
            Rank::Direct,
            PathState::Dead,
            4,
        )]);
        f.state = PeerState::Connecting;
        assert_eq!(
            verdict(&f),
            "session up, but no path answers: no reply from 203.0.113.12:5800 for 4 s"
        );
    }
}
