//! What the control socket answers: `peers` as the JSON of OVERLAY.md (plus
//! a few extra fields), Prometheus metrics, and a health summary.

use std::fmt::{Display, Write as _};
use std::time::{Duration, Instant, SystemTime};

use evio_overlay::crypto::b64;
use evio_overlay::engine::{PeerState, PeerStatus};
use evio_overlay::l2::DropReason;
use evio_overlay::path::Via;
use evio_overlay::tunnel::Reject;
use serde_json::{json, Value};

use crate::dataplane::Snapshot;
use crate::signal::StoreHealth;
use crate::SelfInfo;
use evio_overlay::nat::TurnState;

pub(crate) fn wall_of(taken: Instant, t: Instant) -> String {
    let ago = taken.saturating_duration_since(t);
    let when = SystemTime::now()
        .checked_sub(ago)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    humantime::format_rfc3339_seconds(when).to_string()
}

pub(crate) fn round_ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// The underlay family of path `a`: its remote's, or for a relayed path
/// that of the TURN server it goes through.
pub fn path_family(
    a: evio_overlay::path::PathAddr,
    turn: &[(
        std::net::SocketAddr,
        evio_overlay::nat::TurnTransport,
        TurnState,
    )],
) -> &'static str {
    let on = match a.via {
        Via::Direct | Via::Spare(_) => a.remote,
        Via::Turn(i) => turn.get(usize::from(i)).map_or(a.remote, |t| t.0),
    };
    evio_overlay::family::name(on)
}

pub fn peers_json(me: &SelfInfo, snap: &Snapshot, health: &StoreHealth) -> Value {
    let mut peers: Vec<Value> = snap
        .peers
        .iter()
        .map(|p| {
            let path = p.relayed.map(|r| if r { "relay" } else { "direct" });
            let via = p.path.map(|a| match a.via {
                Via::Direct => "socket".to_string(),
                Via::Spare(_) => "spare".to_string(),
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
                // Every host address, `hostAddress` first (an IPv6 one
                // beside it with a dual-stack host CIDR).
                "hostAddresses": p.host_addr.into_iter().chain(p.host_addr6).map(|a| a.to_string()).collect::<Vec<_>>(),
                "podSubnet": p.pod_subnet.to_string(),
                "state": p.state.as_str(),
                "path": path,
                // How the working path was found: local, reflexive,
                // mapped, learned (peer-reflexive), punched, relay.
                "method": health.path_method(p.method, p.path),
                "endpoint": p.path.map(|a| a.remote.to_string()),
                // The underlay family the path's datagrams leave on:
                // "ipv4" or "ipv6" (a relayed path: the TURN server's).
                "family": p.path.map(|a| path_family(a, &snap.turn)),
                // Which kind of the peer's candidates the path goes to.
                "candidate": p.path.map(|a| health.path_candidate(a)),
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
        "hostAddresses": me.host_addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
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
        // Records that are no peer of this node, and why: a key of its
        // own, so consumers of "peers" see only peers.
        "ignored": health.ignored.iter().map(|(n, w)| json!({"node": n, "reason": w})).collect::<Vec<_>>(),
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
    for i in v["ignored"].as_array().into_iter().flatten() {
        let _ = writeln!(out, "ignored {}: {}", s(&i["node"]), s(&i["reason"]));
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

/// Prometheus' text exposition format, one family after another: the
/// agent's and `evio-node run`'s metrics share it, so HELP/TYPE lines and
/// label escaping are written once.
#[derive(Default)]
pub struct Exposition {
    text: String,
}

impl Exposition {
    /// The HELP and TYPE lines that open a family.
    pub fn family(&mut self, name: &str, help: &str, kind: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    /// One sample; `labels` in order, their values escaped here (node names
    /// are validated, escaped anyway).
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl Display) {
        self.text.push_str(name);
        for (i, (k, v)) in labels.iter().enumerate() {
            let open = if i == 0 { '{' } else { ',' };
            let _ = write!(self.text, "{open}{k}=\"{}\"", label_value(v));
        }
        if !labels.is_empty() {
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {value}");
    }

    /// A family of one sample.
    pub fn series(
        &mut self,
        (name, help, kind): (&str, &str, &str),
        labels: &[(&str, &str)],
        value: impl Display,
    ) {
        self.family(name, help, kind);
        self.sample(name, labels, value);
    }

    pub fn into_text(self) -> String {
        self.text
    }
}

/// A label value as the text format wants it.
pub fn label_value(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

type PeerValue = fn(&PeerStatus) -> u64;

const PER_PEER_COUNTERS: [(&str, &str, PeerValue); 5] = [
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

pub fn prometheus(me: &SelfInfo, snap: &Snapshot, health: &StoreHealth) -> String {
    let mut e = Exposition::default();
    let node = me.node.as_str();
    peer_counters(&mut e, node, snap);
    overlay_counters(&mut e, node, snap);
    peer_gauges(&mut e, node, snap);
    overlay_gauges(&mut e, node, snap, health);
    cert_gauges(&mut e, node, health);
    e.into_text()
}

/// Each etcd certificate file's expiry, as Unix time (Prometheus' way: an
/// alert is `... - time() < 30 * 86400`). A bundle gives its earliest
/// certificate; a file that gave none (unreadable, no certificate) has no
/// sample, and the log says why.
fn cert_gauges(e: &mut Exposition, node: &str, health: &StoreHealth) {
    let name = "evio_overlay_cert_not_after_timestamp_seconds";
    e.family(
        name,
        "When each etcd TLS certificate file the agent uses expires (the earliest notAfter of a bundle), in Unix seconds.",
        "gauge",
    );
    for c in &health.certs {
        if let Ok(t) = c.not_after {
            let file = c.path.to_string_lossy();
            e.sample(
                name,
                &[("node", node), ("role", c.role), ("file", &file)],
                t,
            );
        }
    }
}

/// Traffic, handshakes and drops, per peer.
fn peer_counters(e: &mut Exposition, node: &str, snap: &Snapshot) {
    for (name, help, f) in PER_PEER_COUNTERS {
        e.family(name, help, "counter");
        for p in &snap.peers {
            e.sample(name, &[("node", node), ("peer", &p.node)], f(p));
        }
    }
    let name = "evio_peer_drops_total";
    e.family(
        name,
        "Datagrams or frames from the peer that were dropped, by reason.",
        "counter",
    );
    for p in &snap.peers {
        let switch = p.stats.dropped.saturating_sub(p.stats.spoofed);
        for (reason, v) in [
            ("spoofed", p.stats.spoofed),
            ("replay", p.stats.replay),
            ("auth", p.stats.auth),
            ("switch", switch),
        ] {
            let labels = [("node", node), ("peer", &p.node), ("reason", reason)];
            e.sample(name, &labels, v);
        }
    }
}

/// Node-wide refusals and drops, by reason.
fn overlay_counters(e: &mut Exposition, node: &str, snap: &Snapshot) {
    let name = "evio_overlay_rejected_total";
    e.family(
        name,
        "Datagrams refused before reaching a peer's session (replay, auth, no_session, malformed, rate_limited, unknown_peer).",
        "counter",
    );
    for r in Reject::ALL {
        let v = snap.stats.rejects.get(r.as_str()).copied().unwrap_or(0);
        e.sample(name, &[("node", node), ("reason", r.as_str())], v);
    }
    let junk = [("node", node), ("reason", "stun_turn_junk")];
    e.sample(name, &junk, snap.nat_junk);
    let name = "evio_overlay_switch_drops_total";
    e.family(name, "Frames the L2 switch dropped, by reason.", "counter");
    for r in DropReason::ALL {
        let v = snap
            .stats
            .switch_drops
            .get(r.as_str())
            .copied()
            .unwrap_or(0);
        e.sample(name, &[("node", node), ("reason", r.as_str())], v);
    }
    let node_only = [("node", node)];
    e.series(
        (
            "evio_overlay_no_path_total",
            "Frames for a peer without a session or working path.",
            "counter",
        ),
        &node_only,
        snap.stats.no_path,
    );
    e.series(
        (
            "evio_overlay_udp_send_drops_total",
            "Datagrams the kernel refused to send.",
            "counter",
        ),
        &node_only,
        snap.udp_dropped,
    );
    on_demand(e, node, snap);
}

/// The cost and queue of sessions on demand (issue 22).
fn on_demand(e: &mut Exposition, node: &str, snap: &Snapshot) {
    let node_only = [("node", node)];
    let s = &snap.stats;
    e.series(
        (
            "evio_overlay_wakes_total",
            "Runs of the engine's timers: the idle cost is their rate.",
            "counter",
        ),
        &node_only,
        s.wakes,
    );
    e.series(
        (
            "evio_overlay_queued_frames",
            "Frames held now for peers whose sessions are being made.",
            "gauge",
        ),
        &node_only,
        s.queue_len,
    );
    e.series(
        (
            "evio_overlay_queue_drops_total",
            "Frames held for a handshake and dropped: the queue was full, the handshake failed, or they waited over 3 s.",
            "counter",
        ),
        &node_only,
        s.queue_drops,
    );
}

/// Each peer's state, relaying and RTT.
fn peer_gauges(e: &mut Exposition, node: &str, snap: &Snapshot) {
    let name = "evio_peer_up";
    e.family(name, "Whether the peer is connected.", "gauge");
    for p in &snap.peers {
        let up = u8::from(p.state == PeerState::Connected);
        e.sample(name, &[("node", node), ("peer", &p.node)], up);
    }
    let name = "evio_peer_relayed";
    e.family(
        name,
        "Whether the peer's path goes through a TURN relay.",
        "gauge",
    );
    for p in &snap.peers {
        let relayed = u8::from(p.relayed == Some(true));
        e.sample(name, &[("node", node), ("peer", &p.node)], relayed);
    }
    let name = "evio_peer_rtt_seconds";
    e.family(
        name,
        "Smoothed round-trip time of the peer's path.",
        "gauge",
    );
    for p in &snap.peers {
        if let Some(r) = p.rtt {
            let v = format_args!("{:.6}", r.as_secs_f64());
            e.sample(name, &[("node", node), ("peer", &p.node)], v);
        }
    }
}

/// Peers, TURN allocations, learned MACs and the store, for the node.
fn overlay_gauges(e: &mut Exposition, node: &str, snap: &Snapshot, health: &StoreHealth) {
    let connected = snap
        .peers
        .iter()
        .filter(|p| p.state == PeerState::Connected)
        .count();
    let idle = snap
        .peers
        .iter()
        .filter(|p| p.state == PeerState::Idle)
        .count();
    let name = "evio_overlay_peers";
    e.family(
        name,
        "Peers known from the store, connected, and idle (no session needed).",
        "gauge",
    );
    let known = snap.peers.len();
    e.sample(name, &[("node", node), ("state", "known")], known);
    e.sample(name, &[("node", node), ("state", "connected")], connected);
    e.sample(name, &[("node", node), ("state", "idle")], idle);
    let name = "evio_overlay_turn_ready";
    e.family(
        name,
        "Whether the allocation on each TURN server is up.",
        "gauge",
    );
    for (s, _, st) in &snap.turn {
        let ready = u8::from(matches!(st, TurnState::Ready(_)));
        e.sample(name, &[("node", node), ("server", &s.to_string())], ready);
    }
    let node_only = [("node", node)];
    e.series(
        (
            "evio_overlay_learned_macs",
            "MACs learned from peers.",
            "gauge",
        ),
        &node_only,
        snap.learned_macs,
    );
    e.series(
        (
            "evio_overlay_stale_peers",
            "Peers whose liveness lapsed in the store, kept while their tunnel works.",
            "gauge",
        ),
        &node_only,
        health.stale.len(),
    );
    e.series(
        (
            "evio_overlay_store_ok",
            "Whether this node's record is published, not revoked, and confirmed by the store within its refresh period.",
            "gauge",
        ),
        &node_only,
        u8::from(health.store_ok()),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use evio_overlay::engine::{PeerStats, Stats};
    use evio_overlay::nat::TurnTransport;
    use evio_overlay::path::PathAddr;

    fn peer(node: &str, n: u64, state: PeerState, relayed: Option<bool>) -> PeerStatus {
        PeerStatus {
            node: node.to_string(),
            key: [n as u8; 32],
            pod_subnet: "10.244.1.0/24".parse().unwrap(),
            host_addr: None,
            host_addr6: None,
            state,
            relayed,
            path: Some(PathAddr::direct("203.0.113.7:5800".parse().unwrap())),
            method: None,
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
            host_addresses: Vec::new(),
            pod_subnet: "10.244.0.0/24".parse().unwrap(),
            listen: "203.0.113.1:5800".parse().unwrap(),
            started: now,
        };
        let mut stats = Stats::default();
        stats.rejects.insert(Reject::ALL[0].as_str(), 7);
        stats.switch_drops.insert(DropReason::ALL[1].as_str(), 9);
        stats.no_path = 4;
        (stats.wakes, stats.queue_len, stats.queue_drops) = (15, 2, 1);
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
        let cert = |role, path: &str, not_after| crate::certs::CertFile {
            role,
            path: path.into(),
            not_after,
        };
        let health = StoreHealth {
            published: true,
            confirmed: Some(std::time::Instant::now()),
            stale: ["x".to_string()].into(),
            certs: vec![
                cert("ca", "/etc/evio/etcd/ca.crt", Ok(1_798_761_600)),
                cert("client", "/etc/evio/etcd/tls\"x\".crt", Ok(1_767_225_600)),
                cert("client", "/etc/evio/etcd/bad.crt", Err("no PEM".into())),
            ],
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

    /// store_ok needs a confirmation within the refresh period: a record
    /// published once does not keep it on when the store stops answering.
    #[test]
    fn store_ok_needs_a_recent_confirmation() {
        let ago = |s| std::time::Instant::now().checked_sub(Duration::from_secs(s));
        let h = |confirmed, revoked| StoreHealth {
            published: true,
            revoked,
            confirmed,
            ..StoreHealth::default()
        };
        assert!(h(ago(1), false).store_ok());
        assert!(!h(ago(1), true).store_ok());
        assert!(!h(None, false).store_ok());
        assert!(!h(ago(15), false).store_ok());
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
