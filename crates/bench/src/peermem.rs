//! Section 9: what one agent costs per peer it knows (issue 22), without
//! the many-namespace lab. One node of the routed lab (the real
//! `evio-node agent`, release build, etcd in the lab's internet namespace)
//! and `n` synthetic peers published into the store: each a valid record
//! (key, pod subnet and host address allocated as config-gen and the agent
//! would, liveness), with no process behind it. Sessions are made on
//! demand, so the agent never sends to them: what is measured is what
//! knowing `n` peers costs, the part of an agent that grows with the
//! cluster.
//!
//! For each `n`, ascending: the missing records are written (etcd's JSON
//! gateway, 100 keys per transaction), the agent is restarted (a cold
//! start that reads `n` records at once), and once it lists all `n` peers
//! and has had a few seconds to settle: its memory from /proc/PID/status
//! (VmRSS, VmHWM, RssAnon), threads, and CPU and wake-ups over an idle
//! interval. Then every synthetic record is rewritten (a new heartbeat) in
//! bursts of 50, 100 ms apart, as a cluster's join or restart storm
//! rewrites them, and the memory is read again: what the watch's snapshots
//! leave behind.
//!
//! Nothing here asserts a figure.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use evio_subnet::PodNetwork;
use evio_testkit::cluster::{BridgeType, Cluster, ClusterOpts, OverlayOpts};
use evio_testkit::netns::Netns;
use evio_testkit::scale;
use serde_json::{json, Value};

use crate::cleanup;
use crate::error::{BenchError, Result};
use crate::node::Tools;
use crate::report::Table;

const NETWORK: &str = "evpeers";
const POD_CIDR: &str = "10.244.0.0/16";
/// /28 per node: 4096 nodes fit.
const NODE_BITS: u8 = 12;
/// Keys per etcd transaction (etcd's default limit is 128 operations).
const BATCH: usize = 100;

#[derive(Debug, Clone)]
pub struct Opts {
    /// Synthetic peer counts, one measurement each.
    pub peers: Vec<usize>,
    /// Seconds of the idle CPU measurement per count.
    pub idle_seconds: u32,
}

#[derive(Debug, Clone, Default)]
struct Mem {
    rss_kib: u64,
    hwm_kib: u64,
    anon_kib: u64,
    threads: u64,
}

fn mem(pid: u32) -> Mem {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let v = |k| scale::status_value(&s, k).unwrap_or(0);
    Mem {
        rss_kib: v("VmRSS"),
        hwm_kib: v("VmHWM"),
        anon_kib: v("RssAnon"),
        threads: v("Threads"),
    }
}

#[derive(Debug, Clone)]
struct Row {
    peers: usize,
    known: usize,
    known_after: Option<Duration>,
    settled: Mem,
    idle: scale::Idle,
    churned: Mem,
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding (etcd's JSON gateway takes keys and values
/// so; a record's public key is written so too).
pub fn base64(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= c.len() {
                out.push(char::from(B64[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `POST path` with a JSON body to an HTTP server reachable inside `ns`.
fn http_post_in(ns: &Netns, addr: SocketAddr, path: &str, body: &Value) -> Result<String> {
    crate::scale::http_in(ns, addr, "POST", path, Some(&body.to_string()))
}

/// Writes `kvs` in transactions of [`BATCH`] puts.
fn put_all(ns: &Netns, addr: SocketAddr, kvs: &[(String, String)]) -> Result<()> {
    for chunk in kvs.chunks(BATCH) {
        let ops: Vec<Value> = chunk
            .iter()
            .map(|(k, v)| {
                json!({"requestPut": {"key": base64(k.as_bytes()), "value": base64(v.as_bytes())}})
            })
            .collect();
        http_post_in(ns, addr, "/v3/kv/txn", &json!({ "success": ops }))?;
    }
    Ok(())
}

/// A deterministic 32-byte public key for synthetic peer `i` (any 32 bytes
/// are an X25519 public key; nobody holds the private one).
fn key_of(i: usize) -> String {
    let mut x = (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut k = [0u8; 32];
    for b in &mut k {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        *b = (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8;
    }
    base64(&k)
}

/// The synthetic nodes' allocations, avoiding what the real node holds.
struct Synth {
    /// `(name, pod subnet, host address, candidate)`.
    nodes: Vec<(String, String, IpAddr, String)>,
}

impl Synth {
    fn new(count: usize, taken_subnets: &[String], taken_hosts: &[String]) -> Result<Synth> {
        let pod = PodNetwork::parse(POD_CIDR, u32::from(NODE_BITS))
            .map_err(|e| BenchError::failed("pod network", e.to_string()))?;
        let mut nodes = Vec::with_capacity(count);
        let mut idx = 0u128;
        // Host addresses from 10.10.16.1 up: the lab's one real node holds
        // a low one (checked anyway).
        let mut host = 16u32 * 256 + 1;
        while nodes.len() < count {
            let sub = pod
                .node(idx)
                .map_err(|e| BenchError::failed("synthetic subnet", e.to_string()))?
                .subnet
                .to_string();
            idx += 1;
            if taken_subnets.contains(&sub) {
                continue;
            }
            let h = loop {
                let a = IpAddr::from([10, 10, (host >> 8) as u8, host as u8]);
                host += 1;
                if host & 0xff != 0 && host & 0xff != 0xff && !taken_hosts.contains(&a.to_string())
                {
                    break a;
                }
            };
            let i = nodes.len();
            // 100.127.0.0/16: inside the lab's 100.64.0.0/10, outside any
            // node's /24; nothing answers there and nothing is sent.
            let cand = format!("100.127.{}.{}:51820", i / 250, i % 250 + 1);
            nodes.push((format!("syn-{i:04}"), sub, h, cand));
        }
        Ok(Synth { nodes })
    }

    /// Every key of synthetic nodes `range`, as config-gen, the agent's host
    /// allocation and its publish write them.
    fn kvs(&self, range: std::ops::Range<usize>, heartbeat: &str) -> Vec<(String, String)> {
        let root = format!("/evio/{NETWORK}");
        let mut out = Vec::new();
        for i in range {
            let Some((name, sub, host, cand)) = self.nodes.get(i) else {
                continue;
            };
            let record = json!({
                "node": name,
                "publicKey": key_of(i),
                "hostAddress": format!("{host}/16"),
                "podSubnet": sub,
                "endpoints": [cand],
                "candidates": [{"addr": cand, "kind": "local"}],
                "heartbeat": heartbeat,
            });
            let owner = json!({"node": name, "time": heartbeat, "subnet": sub});
            let sub_key = sub.replace('/', "-");
            out.push((format!("{root}/subnets/{sub_key}"), owner.to_string()));
            out.push((format!("{root}/nodes/{name}"), sub.clone()));
            let host_owner = json!({"node": name, "time": heartbeat, "address": host});
            out.push((format!("{root}/hostaddrs/{host}"), host_owner.to_string()));
            out.push((format!("{root}/hostnodes/{name}"), host.to_string()));
            out.push((format!("{root}/peers/{name}"), record.to_string()));
            out.push((
                format!("{root}/alive/{name}"),
                json!({ "heartbeat": heartbeat }).to_string(),
            ));
        }
        out
    }

    /// Only the record and liveness keys: what an agent's restart rewrites.
    fn records(&self, range: std::ops::Range<usize>, heartbeat: &str) -> Vec<(String, String)> {
        self.kvs(range, heartbeat)
            .into_iter()
            .filter(|(k, _)| k.contains("/peers/") || k.contains("/alive/"))
            .collect()
    }
}

fn up(tools: &Tools) -> Result<Cluster> {
    let mut ov = OverlayOpts::routed(1);
    if let Ok(v) = std::env::var("EVIO_LOG") {
        ov.agent_env.push(("EVIO_LOG".into(), v));
    }
    let mut o = ClusterOpts::new(&tools.evio, &tools.evio_node);
    o.nodes = 1;
    o.pods_per_node = 1;
    o.bridge_type = BridgeType::Linux;
    o.node_bits = NODE_BITS;
    o.network = NETWORK.into();
    o.cancel = Some(cleanup::cancel_flag());
    o.overlay = Some(ov);
    let c = Cluster::up(o).map_err(|e| BenchError::failed("one-node cluster up", e.to_string()))?;
    cleanup::check()?;
    Ok(c)
}

fn values(c: &Cluster, kind: &str) -> Result<Vec<String>> {
    let e = c
        .etcd()
        .ok_or_else(|| BenchError::failed("peermem", "no etcd"))?;
    Ok(e.get_prefix(&format!("/evio/{NETWORK}/{kind}/"))
        .into_iter()
        .map(|(_, v)| v)
        .collect())
}

/// How many peers the agent lists healthy; waits up to `timeout` for
/// `want`.
fn wait_known(c: &Cluster, want: usize, timeout: Duration) -> (usize, Option<Duration>) {
    let t = Instant::now();
    let mut last = 0;
    while t.elapsed() < timeout && cleanup::check().is_ok() {
        if let Some(v) = c.agent(0).and_then(|a| a.peers().ok()) {
            let (ok, down) = scale::known(&v);
            last = ok;
            if ok >= want && down == 0 {
                return (ok, Some(t.elapsed()));
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    (last, None)
}

fn one(
    c: &mut Cluster,
    synth: &Synth,
    etcd: (&Netns, SocketAddr),
    n: usize,
    opts: &Opts,
) -> Result<Row> {
    c.stop_agent(0);
    c.start_agent(0)
        .map_err(|e| BenchError::failed("start agent", e.to_string()))?;
    let (known, known_after) = wait_known(c, n, Duration::from_secs(120));
    cleanup::check()?;
    // The store thread's first snapshots and the engine's first timers.
    std::thread::sleep(Duration::from_secs(5));
    let pid = c
        .agent(0)
        .and_then(|a| a.pid())
        .ok_or_else(|| BenchError::failed("peermem", "agent not running"))?;
    let settled = mem(pid);
    let idle = scale::idle(&[pid], Duration::from_secs(u64::from(opts.idle_seconds)));
    cleanup::check()?;
    for (k, chunk) in (0..n).collect::<Vec<_>>().chunks(50).enumerate() {
        let hb = format!("2026-12-07T05:00:{:02}Z", k % 60);
        let range = chunk[0]..chunk[chunk.len() - 1] + 1;
        put_all(etcd.0, etcd.1, &synth.records(range, &hb))?;
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(3));
    let churned = mem(pid);
    Ok(Row {
        peers: n,
        known,
        known_after,
        settled,
        idle,
        churned,
    })
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

fn render(rows: &[Row], load: (&str, &str)) -> String {
    let base = rows
        .iter()
        .find(|r| r.peers == 0)
        .map(|r| r.settled.rss_kib);
    let mut t = Table::new([
        "peers",
        "known (after s)",
        "VmRSS MiB",
        "VmHWM MiB",
        "RssAnon MiB",
        "threads",
        "RSS per peer over 0 peers (bytes)",
        "after rewrite storm: VmRSS / VmHWM MiB",
        "idle CPU % of a core",
        "wake-ups / s",
    ]);
    for r in rows {
        let per = match base {
            Some(b) if r.peers > 0 => format!(
                "{:.0}",
                (r.settled.rss_kib as f64 - b as f64) * 1024.0 / r.peers as f64
            ),
            _ => String::new(),
        };
        t.row([
            r.peers.to_string(),
            format!(
                "{} ({})",
                r.known,
                r.known_after
                    .map_or("not all".into(), |d| format!("{:.1}", d.as_secs_f64()))
            ),
            mib(r.settled.rss_kib),
            mib(r.settled.hwm_kib),
            mib(r.settled.anon_kib),
            r.settled.threads.to_string(),
            per,
            format!("{} / {}", mib(r.churned.rss_kib), mib(r.churned.hwm_kib)),
            format!("{:.3}", r.idle.pct.first().copied().unwrap_or(f64::NAN)),
            format!("{:.1}", r.idle.wakeups.first().copied().unwrap_or(f64::NAN)),
        ]);
    }
    format!(
        "One node of the routed lab (`OverlayOpts::routed(1)`, etcd in the lab's internet \
         namespace, one pod, the real `evio-node agent`, release build) and N synthetic peers \
         written into the store: record, liveness, pod subnet and host address each, valid \
         but with no process behind them (sessions are made on demand, so none is made). For \
         each N the agent is restarted, and once it lists all N peers healthy and 5 s passed: \
         its memory (/proc/PID/status), then {} s of idle CPU and wake-ups (context switches \
         of all threads), then every synthetic record and liveness key is rewritten in bursts \
         of 50, 100 ms apart (a join or restart storm) and the memory read again 3 s later. \
         Load average at the start {}, at the end {}.\n\n{}",
        rows.first().map_or(0.0, |r| r.idle.secs).round(),
        load.0,
        load.1,
        t.render()
    )
}

/// Runs every count asked for, ascending, on one cluster.
pub fn run(tools: &Tools, opts: &Opts) -> (String, Option<BenchError>) {
    if let Err(e) = tools.require(&[&tools.evio, &tools.evio_node]) {
        return (String::new(), Some(e));
    }
    let load0 = crate::overlay::loadavg();
    let mut rows = Vec::new();
    let r = (|| -> Result<()> {
        let mut c = up(tools)?;
        let lab_ns = c
            .lab()
            .ok_or_else(|| BenchError::failed("peermem", "no lab"))?
            .internet()
            .name()
            .to_string();
        let ns = Netns::borrowed(&lab_ns);
        let ep = c
            .etcd()
            .ok_or_else(|| BenchError::failed("peermem", "no etcd"))?
            .endpoint();
        let addr: SocketAddr = ep
            .rsplit("//")
            .next()
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| BenchError::failed("etcd endpoint", ep.clone()))?;
        let mut counts = opts.peers.clone();
        counts.sort_unstable();
        counts.dedup();
        let max = counts.last().copied().unwrap_or(0);
        let synth = Synth::new(max, &values(&c, "nodes")?, &values(&c, "hostnodes")?)?;
        let mut written = 0;
        for n in counts {
            eprintln!("evio-bench: peermem: {n} synthetic peers ...");
            put_all(&ns, addr, &synth.kvs(written..n, "2026-12-07T05:00:00Z"))?;
            written = written.max(n);
            let row = one(&mut c, &synth, (&ns, addr), n, opts)?;
            eprintln!(
                "evio-bench: peermem: {n}: RSS {} MiB, HWM {} MiB, after storm {} MiB",
                mib(row.settled.rss_kib),
                mib(row.settled.hwm_kib),
                mib(row.churned.rss_kib)
            );
            rows.push(row);
        }
        drop(c);
        Ok(())
    })();
    let body = render(&rows, (&load0, &crate::overlay::loadavg()));
    (body, r.err())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard_alphabet_and_padding() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(key_of(3).len(), 44);
    }
}
