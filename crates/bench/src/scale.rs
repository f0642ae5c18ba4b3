//! Section 7: the overlay at scale (issue 22). `n` nodes of the routed lab
//! ([`OverlayOpts::routed`]: one /24 of 100.64.0.0/10 per node behind one
//! router namespace, etcd in the lab's internet namespace, Linux bridges,
//! one pod per node), for each `n` asked for:
//!
//! * every agent stops and the nodes' peer records are deleted, then all
//!   start again at once (a cold join: no agent knows a peer); the time until every agent reports
//!   every other node `connected` or `idle` and none `down`;
//! * the first reply between random pod pairs (ping every 0.2 s until one
//!   answers, see [`scale::first_reply`]);
//! * per agent over the idle interval: CPU as a share of one core, RSS and
//!   wake-ups (context switches) per second;
//! * etcd's own CPU over the join and over the idle interval, its watchers,
//!   the watch events it sent during the join and its unary requests (a
//!   store polled per peer shows up there).
//!
//! Nothing here asserts a figure; the goals of the issue are printed next to
//! the figures.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use evio_testkit::cluster::{BridgeType, Cluster, ClusterOpts, OverlayOpts};
use evio_testkit::netns::Netns;
use evio_testkit::scale::{self, Known};

use crate::alloc::grpc_counts;
use crate::cleanup;
use crate::error::{BenchError, Result};
use crate::latency::verdict;
use crate::node::Tools;
use crate::report::Table;

#[derive(Debug, Clone)]
pub struct Opts {
    /// Cluster sizes, one run each.
    pub nodes: Vec<usize>,
    /// Random pod pairs whose first reply is timed.
    pub pairs: usize,
    /// Seconds of the idle measurement.
    pub idle_seconds: u32,
    /// Bound for every agent to know every other node.
    pub timeout: Duration,
}

#[derive(Debug, Clone, Default)]
struct Etcd {
    cpu_join: f64,
    cpu_idle_pct: f64,
    watchers: f64,
    watch_streams: f64,
    events_join: f64,
    unary_join: BTreeMap<String, f64>,
    unary_idle: BTreeMap<String, f64>,
}

#[derive(Debug, Clone)]
struct Run {
    nodes: usize,
    setup: Duration,
    spread: Duration,
    known: Known,
    /// First reply per probed pair (`None`: no reply within 5 s).
    replies: Vec<Option<Duration>>,
    idle: scale::Idle,
    /// Agents with every other node healthy after the idle interval.
    healthy_after: usize,
    etcd: Etcd,
    arp_fulls: u64,
    load: String,
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// `GET path` from an HTTP server reachable inside `ns`.
fn http_get_in(ns: &Netns, addr: SocketAddr, path: &str) -> Result<String> {
    http_in(ns, addr, "GET", path, None)
}

/// One HTTP/1.0 request (a JSON `body` for POST) to a server reachable
/// inside `ns`: the body of a 200 answer, else an error with its start.
pub(crate) fn http_in(
    ns: &Netns,
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<String> {
    let what = format!("{method} http://{addr}{path}");
    let mut s = ns
        .tcp_connect(addr, Duration::from_secs(5))
        .map_err(BenchError::io(what.clone()))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(BenchError::io(what.clone()))?;
    let req = match body {
        Some(b) => format!(
            "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{b}",
            b.len()
        ),
        None => format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n"),
    };
    s.write_all(req.as_bytes())
        .map_err(BenchError::io(what.clone()))?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)
        .map_err(BenchError::io(what.clone()))?;
    match resp.split_once("\r\n\r\n") {
        Some((head, b)) if head.contains(" 200 ") => Ok(b.into()),
        _ => Err(BenchError::output(
            what,
            resp.chars().take(300).collect::<String>(),
        )),
    }
}

/// The value of an unlabelled metric line `name value`.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

struct EtcdProbe<'a> {
    ns: &'a Netns,
    addr: SocketAddr,
    pid: u32,
}

impl EtcdProbe<'_> {
    fn of(c: &Cluster) -> Result<EtcdProbe<'_>> {
        let e = c
            .etcd()
            .ok_or_else(|| BenchError::failed("scale", "the routed lab has no etcd"))?;
        let lab = c
            .lab()
            .ok_or_else(|| BenchError::failed("scale", "no lab"))?;
        let ep = e.endpoint();
        let addr = ep
            .rsplit("//")
            .next()
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| BenchError::failed("etcd endpoint", ep.clone()))?;
        let pid = e
            .member_pid(0)
            .and_then(|p| u32::try_from(p).ok())
            .ok_or_else(|| BenchError::failed("etcd", "not running"))?;
        Ok(EtcdProbe {
            ns: lab.internet(),
            addr,
            pid,
        })
    }

    fn metrics(&self) -> Result<String> {
        http_get_in(self.ns, self.addr, "/metrics")
    }

    fn cpu(&self) -> f64 {
        scale::cpu_secs(self.pid).unwrap_or(f64::NAN)
    }
}

fn diff(a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    b.iter()
        .map(|(k, v)| (k.clone(), v - a.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, v)| *v > 0.0)
        .collect()
}

fn up(tools: &Tools, n: usize) -> Result<Cluster> {
    let mut ov = OverlayOpts::routed(n);
    if let Ok(v) = std::env::var("EVIO_LOG") {
        ov.agent_env.push(("EVIO_LOG".into(), v));
    }
    let mut o = ClusterOpts::new(&tools.evio, &tools.evio_node);
    o.nodes = n;
    o.pods_per_node = 1;
    o.bridge_type = BridgeType::Linux;
    o.network = "evscale".into();
    o.cancel = Some(cleanup::cancel_flag());
    o.overlay = Some(ov);
    let c = Cluster::up(o).map_err(|e| BenchError::failed("routed cluster up", e.to_string()))?;
    cleanup::check()?;
    Ok(c)
}

/// Every agent stops, every node's peer record and liveness key go from
/// the store in one call, then all agents start again: the cold join that
/// is timed (no agent knows any peer, as after a fresh install). Not one
/// `--stop-and-leave` per agent: that also deletes the node's devices, and
/// at 128-256 namespaces a device deletion waits 3-10 s for the kernel's
/// one rtnl lock (load average 80-120 of tasks waiting on it), so the leaves
/// alone took longer than the join and one failed on its 3 s store bound.
fn rejoin(c: &mut Cluster) -> Result<Duration> {
    let n = c.nodes().len();
    for i in 0..n {
        cleanup::check()?;
        c.stop_agent(i);
    }
    let net = c.opts().network.clone();
    let etcd = c
        .etcd()
        .ok_or_else(|| BenchError::failed("cold join", "the scale lab runs without etcd"))?;
    for what in ["peers", "alive"] {
        let prefix = format!("/evio/{net}/{what}/");
        let out = etcd.etcdctl(&["del", "--prefix", &prefix]);
        if !out.status.success() {
            return Err(BenchError::failed(
                format!("etcdctl del --prefix {prefix}"),
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            ));
        }
    }
    for i in 0..n {
        cleanup::check()?;
        c.start_agent(i)
            .map_err(|e| BenchError::failed("start agent", e.to_string()))?;
    }
    let starts: Vec<Instant> = c
        .nodes()
        .iter()
        .filter_map(|x| x.agent.as_ref().map(|a| a.started))
        .collect();
    let first = starts.iter().min().copied().unwrap_or_else(Instant::now);
    let last = starts.iter().max().copied().unwrap_or(first);
    Ok(last.saturating_duration_since(first))
}

fn agent_pids(c: &Cluster) -> Result<Vec<u32>> {
    c.nodes()
        .iter()
        .map(|x| {
            x.agent
                .as_ref()
                .and_then(|a| a.pid())
                .ok_or_else(|| BenchError::failed(&x.name, "agent not running"))
        })
        .collect()
}

fn first_replies(c: &Cluster, pairs: usize) -> Vec<Option<Duration>> {
    let pods = c.pods();
    let seed = scale::seed();
    eprintln!("evio-bench: scale: pod pairs from seed {seed}");
    scale::random_pairs(pods.len(), pairs, seed)
        .into_iter()
        .take_while(|_| cleanup::check().is_ok())
        .map(|(a, b)| scale::first_reply(&pods[a].1.pod.ns, &pods[b].1.ip.to_string(), 5))
        .collect()
}

fn one(tools: &Tools, opts: &Opts, n: usize) -> Result<Run> {
    let fulls0 = crate::overlay::arp_fulls();
    let t = Instant::now();
    let mut c = up(tools, n)?;
    let setup = t.elapsed();
    let e = EtcdProbe::of(&c)?;
    let (etcd_pid, m0, cpu0) = (e.pid, e.metrics()?, e.cpu());
    let spread = rejoin(&mut c)?;
    let origin = c
        .nodes()
        .iter()
        .filter_map(|x| x.agent.as_ref().map(|a| a.started))
        .min()
        .unwrap_or_else(Instant::now);
    let known = scale::wait_known(&c, origin, opts.timeout);
    cleanup::check()?;
    let e = EtcdProbe::of(&c)?;
    let (m1, cpu1) = (e.metrics()?, e.cpu());
    let replies = first_replies(&c, opts.pairs);
    cleanup::check()?;
    // Nobody asks the agents anything during the idle interval.
    std::thread::sleep(Duration::from_secs(3));
    let m2 = e.metrics()?;
    let mut pids = agent_pids(&c)?;
    pids.push(etcd_pid);
    let mut idle = scale::idle(&pids, Duration::from_secs(u64::from(opts.idle_seconds)));
    let m3 = e.metrics()?;
    let etcd_idle = idle.pct.pop().unwrap_or(f64::NAN);
    idle.rss_kib.pop();
    idle.wakeups.pop();
    let healthy_after = c
        .peers()
        .iter()
        .filter(|p| p.as_ref().is_some_and(|v| scale::known(v) == (n - 1, 0)))
        .count();
    let etcd = Etcd {
        cpu_join: cpu1 - cpu0,
        cpu_idle_pct: etcd_idle,
        watchers: metric(&m1, "etcd_debugging_mvcc_watcher_total"),
        watch_streams: metric(&m1, "etcd_debugging_mvcc_watch_stream_total"),
        events_join: metric(&m1, "etcd_debugging_mvcc_events_total")
            - metric(&m0, "etcd_debugging_mvcc_events_total"),
        unary_join: diff(&grpc_counts(&m0), &grpc_counts(&m1)),
        unary_idle: diff(&grpc_counts(&m2), &grpc_counts(&m3)),
    };
    let load = loadavg();
    drop(c);
    Ok(Run {
        nodes: n,
        setup,
        spread,
        known,
        replies,
        idle,
        healthy_after,
        etcd,
        arp_fulls: crate::overlay::arp_fulls().saturating_sub(fulls0),
        load,
    })
}

/// Runs every size asked for; a size that fails is reported in place.
pub fn run(tools: &Tools, opts: &Opts) -> (String, Option<BenchError>) {
    if let Err(e) = tools.require(&[&tools.evio, &tools.evio_node]) {
        return (String::new(), Some(e));
    }
    let mut runs = Vec::new();
    let mut failed = String::new();
    let mut first_err = None;
    let load0 = loadavg();
    for &n in &opts.nodes {
        eprintln!("evio-bench: scale: {n} nodes ...");
        let t = Instant::now();
        match one(tools, opts, n) {
            Ok(r) => runs.push(r),
            Err(e) => {
                failed.push_str(&format!("\n**{n} nodes FAILED:** {e}\n"));
                first_err.get_or_insert(e);
            }
        }
        eprintln!(
            "evio-bench: scale: {n} nodes took {:.0} s",
            t.elapsed().as_secs_f64()
        );
        if cleanup::check().is_err() {
            break;
        }
    }
    let mut out = format!(
        "The routed lab of evio-testkit (`OverlayOpts::routed(n)`): every node a network \
         namespace with its own /24 of 100.64.0.0/10 on a veth to one router namespace (about \
         2n kernel neighbour entries, not n²), etcd in the lab's internet namespace, Linux \
         bridges, one pod per node added by the `evio` plugin, the real `evio-node config-gen` \
         and `evio-node agent` (release build, network key). Timed: every agent stops, their \
         peer records are deleted from etcd in one call, then all start at once (a cold join); \"all known\" is when the last agent first reported \
         every other node `connected` or `idle` and none `down` (agents asked one at a time, \
         about ten sweeps a second). First reply: {} random pod pairs on different or the same \
         node, ping every 0.2 s until the first reply, (its sequence number − 1) × 0.2 s + its \
         round trip. Idle: {} s in which nothing talks to the agents, CPU (utime+stime of all \
         threads, /proc/PID/stat) as a share of one core, wake-ups = voluntary + involuntary \
         context switches of all threads per second. Load average at the start {load0}.\n\n",
        opts.pairs, opts.idle_seconds
    );
    out.push_str(&render(&runs));
    out.push_str(&failed);
    (out, first_err)
}

fn f2(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.2}")
    } else {
        "n/a".into()
    }
}

fn pct(v: &[Duration], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort();
    if s.is_empty() {
        return f64::NAN;
    }
    crate::stats::percentile(&s, p).as_secs_f64()
}

fn render(runs: &[Run]) -> String {
    let mut t = Table::new([
        "nodes",
        "set-up (s)",
        "start spread (s)",
        "all known after (s)",
        "known at the end",
        "first reply p50 / p99 / max (ms)",
        "no reply",
        "idle CPU per agent mean / max (% of a core)",
        "RSS per agent mean / max (MiB)",
        "wake-ups / s per agent mean / max",
        "ARP table refusals",
        "load after",
    ]);
    for r in runs {
        let got: Vec<Duration> = r.replies.iter().flatten().copied().collect();
        let mx = |v: &[f64]| {
            v.iter()
                .copied()
                .filter(|x| x.is_finite())
                .fold(f64::NAN, f64::max)
        };
        let rss: Vec<f64> = r.idle.rss_kib.iter().map(|k| *k as f64 / 1024.0).collect();
        t.row([
            r.nodes.to_string(),
            format!("{:.0}", r.setup.as_secs_f64()),
            format!("{:.1}", r.spread.as_secs_f64()),
            r.known.all().map_or("not within the bound".into(), |d| {
                format!("{:.1}", d.as_secs_f64())
            }),
            format!(
                "{} of {} agents ({} after idle)",
                r.known.per_agent.iter().flatten().count(),
                r.nodes,
                r.healthy_after
            ),
            format!(
                "{:.1} / {:.1} / {:.1}",
                1e3 * pct(&got, 50.0),
                1e3 * pct(&got, 99.0),
                1e3 * pct(&got, 100.0)
            ),
            format!("{} of {}", r.replies.len() - got.len(), r.replies.len()),
            format!("{} / {}", f2(scale::mean(&r.idle.pct)), f2(mx(&r.idle.pct))),
            format!("{} / {}", f2(scale::mean(&rss)), f2(mx(&rss))),
            format!(
                "{:.1} / {:.1}",
                scale::mean(&r.idle.wakeups),
                mx(&r.idle.wakeups)
            ),
            r.arp_fulls.to_string(),
            r.load.clone(),
        ]);
    }
    let mut e = Table::new([
        "nodes",
        "etcd CPU during the join (s)",
        "etcd idle CPU (% of a core)",
        "watchers / watch streams",
        "watch events sent during the join",
        "per agent",
        "unary requests during the join",
        "unary requests while idle",
    ]);
    let show = |m: &BTreeMap<String, f64>| {
        if m.is_empty() {
            "none".to_string()
        } else {
            m.iter()
                .map(|(k, v)| format!("{k} {v:.0}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    for r in runs {
        e.row([
            r.nodes.to_string(),
            f2(r.etcd.cpu_join),
            f2(r.etcd.cpu_idle_pct),
            format!("{:.0} / {:.0}", r.etcd.watchers, r.etcd.watch_streams),
            format!("{:.0}", r.etcd.events_join),
            format!("{:.1}", r.etcd.events_join / r.nodes as f64),
            show(&r.etcd.unary_join),
            show(&r.etcd.unary_idle),
        ]);
    }
    let mut g = Table::new([
        "goal (issue 22, at 256 nodes)",
        "nodes",
        "measured",
        "verdict",
    ]);
    for r in runs {
        let all = r.known.all().map_or(f64::INFINITY, |d| d.as_secs_f64());
        let got: Vec<Duration> = r.replies.iter().flatten().copied().collect();
        let p99 = if got.len() == r.replies.len() {
            pct(&got, 99.0)
        } else {
            f64::INFINITY
        };
        let mx_rss = r.idle.rss_kib.iter().max().copied().unwrap_or(0) as f64 / 1024.0;
        let idle = scale::mean(&r.idle.pct);
        for (goal, m, target, unit) in [
            ("all nodes known ≤ 60 s", all, 60.0, "s"),
            ("first reply p99 ≤ 1 s", p99, 1.0, "s"),
            ("idle ≤ 0.15% of a core per node", idle, 0.15, "%"),
            ("RSS ≤ 16 MiB per agent", mx_rss, 16.0, "MiB"),
        ] {
            g.row([
                goal.to_string(),
                r.nodes.to_string(),
                if m.is_finite() && goal.starts_with("first reply") {
                    format!("{:.1} ms", 1e3 * m)
                } else if m.is_finite() {
                    format!("{m:.2} {unit}")
                } else {
                    "never / missing".into()
                },
                if m.is_finite() {
                    verdict(m, target)
                } else {
                    "MISSED".into()
                },
            ]);
        }
    }
    format!(
        "### Join, first reply and idle cost\n\n{}\n### etcd\n\n{}\n### Goals\n\n{}",
        t.render(),
        e.render(),
        g.render()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_reads_an_unlabelled_line_only() {
        let m = "# HELP x\netcd_debugging_mvcc_watcher_total 65\n\
                 etcd_debugging_mvcc_watcher_total_x 3\nother{a=\"b\"} 1\n";
        assert_eq!(metric(m, "etcd_debugging_mvcc_watcher_total"), 65.0);
        assert!(metric(m, "missing").is_nan());
    }
}
