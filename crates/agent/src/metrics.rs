//! What the control socket answers: `peers` as the JSON of OVERLAY.md (plus
//! a few extra fields), Prometheus metrics, and a health summary.

use std::fmt::Write as _;
use std::time::{Duration, Instant, SystemTime};

use evio_overlay::crypto::b64;
use evio_overlay::engine::PeerState;
use evio_overlay::l2::DropReason;
use evio_overlay::path::Via;
use evio_overlay::tunnel::Reject;
use serde_json::{json, Value};

use crate::dataplane::Snapshot;
use crate::signal::StoreHealth;
use crate::SelfInfo;
use evio_overlay::nat::TurnState;

fn wall_of(taken: Instant, t: Instant) -> String {
    let ago = taken.saturating_duration_since(t);
    let when = SystemTime::now()
        .checked_sub(ago)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    humantime::format_rfc3339_seconds(when).to_string()
}

fn round_ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

pub fn peers_json(me: &SelfInfo, snap: &Snapshot, health: &StoreHealth) -> Value {
    let mut peers: Vec<Value> = snap
        .peers
        .iter()
        .map(|p| {
            let path = p.relayed.map(|r| if r { "relay" } else { "direct" });
            let via = p.path.map(|a| match a.via {
                Via::Direct => "socket".to_string(),
                Via::Turn(i) => snap
                    .turn
                    .get(usize::from(i))
                    .map(|t| format!("turn:{}", t.0))
                    .unwrap_or_else(|| "turn".into()),
            });
            json!({
                "node": p.node,
                "publicKey": b64(&p.key),
                "hostAddress": p.host_addr.map(|a| a.to_string()),
                "podSubnet": p.pod_subnet.to_string(),
                "state": p.state.as_str(),
                "path": path,
                "endpoint": p.path.map(|a| a.remote.to_string()),
                "rttMs": p.rtt.map(round_ms),
                "lastHandshake": p.session_born.map(|t| wall_of(snap.taken, t)),
                "rxBytes": p.stats.rx_bytes,
                "txBytes": p.stats.tx_bytes,
                "rxPackets": p.stats.rx_packets,
                "txPackets": p.stats.tx_packets,
                "handshakes": p.stats.handshakes,
                "pathChanged": p.path_changed.map(|t| wall_of(snap.taken, t)),
                "via": via,
                "paths": p.paths,
                "alivePaths": p.alive_paths,
                // Its liveness lapsed in the store (it lost the store, or
                // its agent is gone): kept while the tunnel works.
                "stale": health.stale.contains(&p.node),
            })
        })
        .collect();
    peers.sort_by(|a, b| a["node"].as_str().cmp(&b["node"].as_str()));
    json!({
        "node": me.node,
        "publicKey": me.public_key,
        "hostAddress": me.host_address.map(|a| a.to_string()),
        "podSubnet": me.pod_subnet.to_string(),
        "listen": me.listen.to_string(),
        "peers": peers,
        "candidates": snap.candidates.iter().map(|(a, k)| json!({"addr": a.to_string(), "kind": k.as_str()})).collect::<Vec<_>>(),
        "turn": snap.turn.iter().map(|(s, t, st)| json!({
            "server": s.to_string(),
            "transport": format!("{t:?}").to_lowercase(),
            "state": match st {
                TurnState::Ready(_) => "ready",
                TurnState::Idle => "idle",
                TurnState::Connecting => "connecting",
                TurnState::Allocating => "allocating",
                TurnState::Failed(_) => "failed",
            },
            "relayed": match st { TurnState::Ready(a) => Some(a.to_string()), _ => None },
            "error": match st { TurnState::Failed(e) => Some(e.clone()), _ => None },
        })).collect::<Vec<_>>(),
        "store": {
            "published": health.published,
            "revoked": health.revoked,
            "error": health.last_error,
            "fromCache": health.from_cache,
            "revokedWhy": health.revoked_why,
        },
    })
}

/// `rows` as left-aligned columns two spaces apart, one line each (the
/// first row is the header): what the CLI's tables look like.
pub fn columns<R: AsRef<[String]>>(rows: &[R]) -> String {
    let n = rows.first().map_or(0, |r| r.as_ref().len());
    let widths: Vec<usize> = (0..n)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.as_ref().get(c))
                .map(|x| x.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .as_ref()
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// A table for a person, from the JSON (so the CLI can render what any
/// agent version sends).
pub fn peers_table(v: &Value) -> String {
    let s = |x: &Value| x.as_str().unwrap_or("-").to_string();
    let mut out = format!(
        "node {}  key {}  host {}  pods {}  listen {}\n",
        s(&v["node"]),
        s(&v["publicKey"]),
        s(&v["hostAddress"]),
        s(&v["podSubnet"]),
        s(&v["listen"])
    );
    let mut rows = vec![vec![
        "PEER".to_string(),
        "STATE".into(),
        "PATH".into(),
        "ENDPOINT".into(),
        "RTT".into(),
        "HOST".into(),
        "PODS".into(),
        "HANDSHAKE".into(),
        "RX".into(),
        "TX".into(),
    ]];
    for p in v["peers"].as_array().into_iter().flatten() {
        let state = match p["stale"].as_bool() {
            Some(true) => format!("{} (stale)", s(&p["state"])),
            _ => s(&p["state"]),
        };
        rows.push(vec![
            s(&p["node"]),
            state,
            s(&p["path"]),
            s(&p["endpoint"]),
            p["rttMs"]
                .as_f64()
                .map(|r| format!("{r:.2} ms"))
                .unwrap_or_else(|| "-".into()),
            s(&p["hostAddress"]),
            s(&p["podSubnet"]),
            s(&p["lastHandshake"]),
            bytes(p["rxBytes"].as_u64().unwrap_or(0)),
            bytes(p["txBytes"].as_u64().unwrap_or(0)),
        ]);
    }
    out.push_str(&columns(&rows));
    if let Some(t) = v["turn"].as_array() {
        for t in t {
            let _ = writeln!(
                out,
                "turn {} ({}): {}{}",
                s(&t["server"]),
                s(&t["transport"]),
                s(&t["state"]),
                t["error"]
                    .as_str()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            );
        }
    }
    if v["store"]["revoked"].as_bool() == Some(true) {
        let why = v["store"]["revokedWhy"]
            .as_str()
            .unwrap_or("this node's record was deleted from the store");
        let _ = writeln!(out, "{why}: restart the agent to rejoin");
    } else if v["store"]["fromCache"].as_bool() == Some(true) {
        let _ = writeln!(
            out,
            "running from the cached state: the store has not answered yet ({})",
            s(&v["store"]["error"])
        );
    }
    out
}

fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

/// Label values are node names (validated: no quotes or backslashes),
/// escaped anyway.
fn label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub fn prometheus(me: &SelfInfo, snap: &Snapshot, health: &StoreHealth) -> String {
    let mut o = String::new();
    let node = label(&me.node);
    let mut counter = |name: &str, help: &str, rows: Vec<(String, u64)>| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter");
        for (labels, v) in rows {
            let _ = writeln!(o, "{name}{{node=\"{node}\"{labels}}} {v}");
        }
    };
    type PeerStatus = evio_overlay::engine::PeerStatus;
    type PeerValue = fn(&PeerStatus) -> u64;
    let per_peer = |f: PeerValue| {
        snap.peers
            .iter()
            .map(|p| (format!(",peer=\"{}\"", label(&p.node)), f(p)))
            .collect::<Vec<_>>()
    };
    let per_peer_counters: [(&str, &str, PeerValue); 5] = [
        (
            "evio_peer_rx_bytes_total",
            "Bytes received from the peer (datagrams).",
            |p| p.stats.rx_bytes,
        ),
        (
            "evio_peer_tx_bytes_total",
            "Bytes sent to the peer (datagrams).",
            |p| p.stats.tx_bytes,
        ),
        (
            "evio_peer_rx_packets_total",
            "Authenticated datagrams received from the peer.",
            |p| p.stats.rx_packets,
        ),
        (
            "evio_peer_tx_packets_total",
            "Datagrams sent to the peer.",
            |p| p.stats.tx_packets,
        ),
        (
            "evio_peer_handshakes_total",
            "Completed handshakes with the peer.",
            |p| p.stats.handshakes,
        ),
    ];
    for (name, help, f) in per_peer_counters {
        counter(name, help, per_peer(f));
    }
    let mut drops = Vec::new();
    for p in &snap.peers {
        let pl = label(&p.node);
        let switch = p.stats.dropped.saturating_sub(p.stats.spoofed);
        for (reason, v) in [
            ("spoofed", p.stats.spoofed),
            ("replay", p.stats.replay),
            ("auth", p.stats.auth),
            ("switch", switch),
        ] {
            drops.push((format!(",peer=\"{pl}\",reason=\"{reason}\""), v));
        }
    }
    counter(
        "evio_peer_drops_total",
        "Datagrams or frames from the peer that were dropped, by reason.",
        drops,
    );
    let rejects: Vec<(String, u64)> = Reject::ALL
        .iter()
        .map(|r| {
            (
                format!(",reason=\"{}\"", r.as_str()),
                snap.stats.rejects.get(r.as_str()).copied().unwrap_or(0),
            )
        })
        .chain(std::iter::once((
            ",reason=\"stun_turn_junk\"".to_string(),
            snap.nat_junk,
        )))
        .collect();
    counter(
        "evio_overlay_rejected_total",
        "Datagrams refused before reaching a peer's session (replay, auth, no_session, malformed, rate_limited, unknown_peer).",
        rejects,
    );
    let sw: Vec<(String, u64)> = DropReason::ALL
        .iter()
        .map(|r| {
            (
                format!(",reason=\"{}\"", r.as_str()),
                snap.stats
                    .switch_drops
                    .get(r.as_str())
                    .copied()
                    .unwrap_or(0),
            )
        })
        .collect();
    counter(
        "evio_overlay_switch_drops_total",
        "Frames the L2 switch dropped, by reason.",
        sw,
    );
    counter(
        "evio_overlay_no_path_total",
        "Frames for a peer without a session or working path.",
        vec![(String::new(), snap.stats.no_path)],
    );
    counter(
        "evio_overlay_udp_send_drops_total",
        "Datagrams the kernel refused to send.",
        vec![(String::new(), snap.udp_dropped)],
    );
    let _ = writeln!(
        o,
        "# HELP evio_peer_up Whether the peer is connected.\n# TYPE evio_peer_up gauge"
    );
    for p in &snap.peers {
        let _ = writeln!(
            o,
            "evio_peer_up{{node=\"{node}\",peer=\"{}\"}} {}",
            label(&p.node),
            u8::from(p.state == PeerState::Connected)
        );
    }
    let _ = writeln!(o, "# HELP evio_peer_relayed Whether the peer's path goes through a TURN relay.\n# TYPE evio_peer_relayed gauge");
    for p in &snap.peers {
        let _ = writeln!(
            o,
            "evio_peer_relayed{{node=\"{node}\",peer=\"{}\"}} {}",
            label(&p.node),
            u8::from(p.relayed == Some(true))
        );
    }
    let _ = writeln!(o, "# HELP evio_peer_rtt_seconds Smoothed round-trip time of the peer's path.\n# TYPE evio_peer_rtt_seconds gauge");
    for p in &snap.peers {
        if let Some(r) = p.rtt {
            let _ = writeln!(
                o,
                "evio_peer_rtt_seconds{{node=\"{node}\",peer=\"{}\"}} {:.6}",
                label(&p.node),
                r.as_secs_f64()
            );
        }
    }
    let connected = snap
        .peers
        .iter()
        .filter(|p| p.state == PeerState::Connected)
        .count();
    let _ = writeln!(o, "# HELP evio_overlay_peers Peers known from the store, and connected.\n# TYPE evio_overlay_peers gauge");
    let _ = writeln!(
        o,
        "evio_overlay_peers{{node=\"{node}\",state=\"known\"}} {}",
        snap.peers.len()
    );
    let _ = writeln!(
        o,
        "evio_overlay_peers{{node=\"{node}\",state=\"connected\"}} {connected}"
    );
    let _ = writeln!(o, "# HELP evio_overlay_turn_ready Whether the allocation on each TURN server is up.\n# TYPE evio_overlay_turn_ready gauge");
    for (s, _, st) in &snap.turn {
        let _ = writeln!(
            o,
            "evio_overlay_turn_ready{{node=\"{node}\",server=\"{s}\"}} {}",
            u8::from(matches!(st, TurnState::Ready(_)))
        );
    }
    let _ = writeln!(o, "# HELP evio_overlay_learned_macs MACs learned from peers.\n# TYPE evio_overlay_learned_macs gauge");
    let _ = writeln!(
        o,
        "evio_overlay_learned_macs{{node=\"{node}\"}} {}",
        snap.learned_macs
    );
    let _ = writeln!(o, "# HELP evio_overlay_stale_peers Peers whose liveness lapsed in the store, kept while their tunnel works.\n# TYPE evio_overlay_stale_peers gauge");
    let _ = writeln!(
        o,
        "evio_overlay_stale_peers{{node=\"{node}\"}} {}",
        health.stale.len()
    );
    let _ = writeln!(o, "# HELP evio_overlay_store_ok Whether this node's record is published and not revoked.\n# TYPE evio_overlay_store_ok gauge");
    let _ = writeln!(
        o,
        "evio_overlay_store_ok{{node=\"{node}\"}} {}",
        u8::from(health.published && !health.revoked)
    );
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use evio_overlay::engine::{PeerStats, PeerStatus, Stats};
    use evio_overlay::nat::TurnTransport;
    use evio_overlay::path::PathAddr;

    fn peer(node: &str, n: u64, state: PeerState, relayed: Option<bool>) -> PeerStatus {
        PeerStatus {
            node: node.to_string(),
            key: [n as u8; 32],
            pod_subnet: "10.244.1.0/24".parse().unwrap(),
            host_addr: None,
            state,
            relayed,
            path: Some(PathAddr::direct("203.0.113.7:5800".parse().unwrap())),
            rtt: relayed.map(|_| Duration::from_micros(1234 * n)),
            session_born: None,
            path_changed: None,
            stats: PeerStats {
                rx_bytes: 1000 * n,
                tx_bytes: 2000 * n,
                rx_packets: 10 * n,
                tx_packets: 20 * n,
                handshakes: n,
                spoofed: n,
                dropped: 5 * n,
                replay: 2 * n,
                auth: 3 * n,
            },
            paths: 2,
            alive_paths: 1,
        }
    }

    /// A snapshot touching every family: peers up and down, relayed or not,
    /// with and without an RTT, a name that needs escaping, counters by
    /// reason, two TURN servers.
    fn fixture() -> (SelfInfo, Snapshot, StoreHealth) {
        let now = Instant::now();
        let me = SelfInfo {
            node: "node-\"a\"".to_string(),
            public_key: String::new(),
            host_address: None,
            pod_subnet: "10.244.0.0/24".parse().unwrap(),
            listen: "203.0.113.1:5800".parse().unwrap(),
            started: now,
        };
        let mut stats = Stats::default();
        stats.rejects.insert(Reject::ALL[0].as_str(), 7);
        stats.switch_drops.insert(DropReason::ALL[1].as_str(), 9);
        stats.no_path = 4;
        let turn_ready = TurnState::Ready("203.0.113.9:40000".parse().unwrap());
        let snap = Snapshot {
            peers: vec![
                peer("b", 1, PeerState::Connected, Some(true)),
                peer("c\\d\nx", 2, PeerState::Connecting, Some(false)),
                peer("e", 3, PeerState::Down, None),
            ],
            stats,
            candidates: Vec::new(),
            turn: vec![
                (
                    "203.0.113.9:3478".parse().unwrap(),
                    TurnTransport::Udp,
                    turn_ready,
                ),
                (
                    "203.0.113.10:3478".parse().unwrap(),
                    TurnTransport::Tcp,
                    TurnState::Idle,
                ),
            ],
            udp_dropped: 11,
            nat_junk: 13,
            learned_macs: 6,
            taken: now,
        };
        let health = StoreHealth {
            published: true,
            stale: ["x".to_string()].into(),
            ..StoreHealth::default()
        };
        (me, snap, health)
    }

    /// The exposition text, byte for byte, of the fixed snapshot: what
    /// scrapers and the node's /metrics see must not move with a refactor.
    #[test]
    fn prometheus_text_of_a_fixed_snapshot() {
        let (me, snap, health) = fixture();
        let text = prometheus(&me, &snap, &health);
        assert_eq!(text, include_str!("metrics_golden.txt"));
    }

    /// Widths count characters, not bytes, and no line ends in spaces.
    #[test]
    fn columns_align_by_characters() {
        let rows = [
            ["A".to_string(), "B".to_string()],
            ["ü-long".to_string(), "x".to_string()],
            ["c".to_string(), String::new()],
        ];
        assert_eq!(columns(&rows), "A       B\nü-long  x\nc\n");
    }
}
