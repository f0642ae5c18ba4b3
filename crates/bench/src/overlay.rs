//! Section 5: the overlay agent (`evio-node agent`) between nodes, side by
//! side with boringtun, kernel VXLAN and a plain link between the same two
//! node namespaces; then how fast agents connect (flat and behind the NAT
//! lab), how fast a direct pair recovers from a NAT that forgot its
//! mappings, and what an idle agent costs with 16 and with 31 peers.
//!
//! Every node, pod and router is a namespace made by an evio-testkit
//! [`Cluster`] (the real `evio-node config-gen`, `evio-node agent` and
//! `evio` plugin); the alternatives are built by hand inside the same node
//! namespaces after the agents are stopped. Every process started here is
//! killed on drop (agents by the cluster, boringtun and iperf3 by
//! [`Background`]), also when a step fails.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use evio_testkit::agent::Agent;
use evio_testkit::cluster::{BridgeType, Cluster, ClusterOpts, OverlayOpts, SimNode};
use evio_testkit::natlab::{NatType, SiteId};
use evio_testkit::netns::Netns;

use crate::cleanup;
use crate::datapath::at_least;
use crate::error::{BenchError, Result};
use crate::exec::{self, Background, NsFd, Spec};
use crate::iperf;
use crate::latency::verdict;
use crate::node::{sh, veth, Tools};
use crate::report::Table;

/// boringtun's interface MTU, as WireGuard's default.
const WG_MTU: &str = "1420";
const WG_PORT: u16 = 51820;
/// The share of all CPUs that other work may take for the machine to count
/// as quiet before a throughput measurement.
const QUIET: f64 = 0.1;
/// How often connect timing asks every agent for its peers.
const POLL: Duration = Duration::from_millis(50);

#[derive(Debug, Clone)]
pub struct Opts {
    /// Seconds per iperf3 run.
    pub seconds: u32,
    /// Before each path, wait up to this long for the machine to be quiet
    /// (other work below [`QUIET`] of its CPUs); zero: only sample.
    pub quiet_wait: Duration,
    /// Pings per RTT measurement (10 ms apart).
    pub pings: usize,
    /// Small run: two nodes only, no OVS, no NAT lab, no large clusters.
    pub quick: bool,
    /// Nodes of the flat connect-time run (8).
    pub connect_nodes: usize,
    /// Restarts of all agents timed in the flat connect-time run.
    pub connect_rounds: usize,
    /// Nodes of the idle run: each agent has this many minus one peers (17).
    pub idle_nodes: usize,
    /// Nodes of the large run (32).
    pub large_nodes: usize,
    /// Seconds of idle CPU measurement.
    pub idle_seconds: u32,
    /// Conntrack flushes in the recovery run.
    pub recovery_rounds: usize,
    /// `boringtun-cli`, when installed.
    pub boringtun: Option<PathBuf>,
    /// Which parts run (all when empty): paths, connect, nat, idle, large.
    pub parts: Vec<String>,
    /// boringtun thread counts to try; its best is compared.
    pub boringtun_threads: Vec<usize>,
}

/// `boringtun-cli` on PATH or in cargo's bin directory.
pub fn find_boringtun() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(h) = std::env::var_os("CARGO_HOME") {
        dirs.push(PathBuf::from(h).join("bin"));
    }
    if let Some(h) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(h).join(".cargo/bin"));
    }
    dirs.push(PathBuf::from("/root/.cargo/bin"));
    dirs.into_iter()
        .map(|d| d.join("boringtun-cli"))
        .find(|p| p.is_file())
}

// ---------------------------------------------------------------------------
// /proc

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no memory effects.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// utime + stime of a process (all its threads) from the text of
/// /proc/PID/stat, in clock ticks.
pub fn stat_ticks(stat: &str) -> Option<u64> {
    // The command may contain spaces and parentheses: fields start after
    // the last ')'. There, index 0 is field 3 (state); utime is field 14.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// CPU seconds (user + system, every thread) a live process has used.
pub fn proc_cpu(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(stat_ticks(&s)? as f64 / clk_tck())
}

fn cpu_of(pids: &[u32]) -> Result<f64> {
    pids.iter()
        .map(|p| {
            proc_cpu(*p)
                .ok_or_else(|| BenchError::failed("read CPU time", format!("pid {p} is gone")))
        })
        .sum()
}

/// A `Key:   N kB` line of /proc/PID/status.
pub fn status_kib(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(
        &std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?,
        "VmRSS",
    )
}

/// Context switches of every thread of a process: how often its threads
/// went to sleep and were woken (voluntary) or preempted.
fn ctx_switches(pid: u32) -> u64 {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    dir.flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .map(|s| {
            status_kib(&s, "voluntary_ctxt_switches").unwrap_or(0)
                + status_kib(&s, "nonvoluntary_ctxt_switches").unwrap_or(0)
        })
        .sum()
}

/// Busy CPU seconds of the whole machine (every CPU: user, nice, system,
/// irq, softirq; not idle, iowait or steal) from the text of /proc/stat.
pub fn machine_busy_ticks(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    Some(v.first()? + v.get(1)? + v.get(2)? + v.get(5)? + v.get(6)?)
}

fn machine_busy() -> f64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| machine_busy_ticks(&s))
        .unwrap_or(0) as f64
        / clk_tck()
}

/// The share of all CPUs busy over `d` (nothing of ours runs meanwhile
/// but idle agents: this is other work on the machine).
fn background(d: Duration) -> f64 {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let b0 = machine_busy();
    let t = Instant::now();
    std::thread::sleep(d);
    (machine_busy() - b0) / t.elapsed().as_secs_f64() / cpus
}

/// Samples the background load for up to `max` until it is below
/// [`QUIET`]; returns the last sample.
fn wait_quiet(max: Duration) -> Result<f64> {
    let end = Instant::now() + max;
    loop {
        cleanup::check()?;
        let b = background(if max.is_zero() {
            Duration::from_millis(300)
        } else {
            Duration::from_secs(1)
        });
        if b < QUIET || Instant::now() >= end {
            return Ok(b);
        }
    }
}

pub(crate) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// `table_fulls` of the kernel's ARP table (/proc/net/stat/arp_cache, hex,
/// one row per CPU): how often it refused an entry. The table is shared
/// by every network namespace.
pub fn arp_table_fulls(stat: &str) -> u64 {
    let mut lines = stat.lines();
    let Some(col) = lines
        .next()
        .and_then(|h| h.split_whitespace().position(|c| c == "table_fulls"))
    else {
        return 0;
    };
    lines
        .filter_map(|l| l.split_whitespace().nth(col))
        .filter_map(|v| u64::from_str_radix(v, 16).ok())
        .sum()
}

pub fn arp_fulls() -> u64 {
    arp_table_fulls(&std::fs::read_to_string("/proc/net/stat/arp_cache").unwrap_or_default())
}

fn mem_total_kib() -> Option<u64> {
    status_kib(&std::fs::read_to_string("/proc/meminfo").ok()?, "MemTotal")
}

// ---------------------------------------------------------------------------
// Clusters

pub(crate) fn up(
    tools: &Tools,
    bridge: BridgeType,
    mut ov: OverlayOpts,
    pods: usize,
) -> Result<Cluster> {
    // The agents log what EVIO_LOG asks for (see `logs` of the NAT run).
    if let Ok(v) = std::env::var("EVIO_LOG") {
        ov.agent_env.push(("EVIO_LOG".into(), v));
    }
    let mut o = ClusterOpts::new(&tools.evio, &tools.evio_node);
    o.nodes = ov.nodes();
    o.pods_per_node = pods;
    o.bridge_type = bridge;
    o.network = "evbench".into();
    o.cancel = Some(cleanup::cancel_flag());
    o.overlay = Some(ov);
    let c = Cluster::up(o).map_err(|e| BenchError::failed("overlay cluster up", e.to_string()))?;
    cleanup::check()?;
    Ok(c)
}

pub(crate) fn agent_of(n: &SimNode) -> Result<&Agent> {
    n.agent
        .as_ref()
        .ok_or_else(|| BenchError::failed(&n.name, "no agent"))
}

/// The agent's own pid (setpriv and nsenter exec it, so the child is it).
fn agent_pid(n: &SimNode) -> Result<u32> {
    let pid = agent_of(n)?
        .pid()
        .ok_or_else(|| BenchError::failed(&n.name, "agent not running"))?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if comm.trim() != "evio-node" {
        return Err(BenchError::failed(
            format!("agent of {}", n.name),
            format!("pid {pid} is {:?}, not evio-node", comm.trim()),
        ));
    }
    Ok(pid)
}

fn wait_all(c: &Cluster, timeout: Duration) -> Result<Duration> {
    c.wait_overlay(timeout)
        .map_err(|e| BenchError::failed("overlay connect", e.to_string()))
}

/// Takes every node off the network (a stop would keep their devices on
/// the bridges and their records in the store).
pub(crate) fn stop_agents(c: &mut Cluster) -> Result<()> {
    for i in 0..c.nodes().len() {
        let failed = |why: String| BenchError::failed(format!("stop agent of node-{i}"), why);
        match c.leave_agent(i) {
            None | Some(Ok((None, _))) => {}
            Some(Ok((Some(st), took))) if !st.success() => {
                return Err(failed(format!("exit {st} after {took:?}")))
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(failed(e)),
        }
    }
    Ok(())
}

fn sleep_checked(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        cleanup::check()?;
        std::thread::sleep(
            end.saturating_duration_since(Instant::now())
                .min(Duration::from_millis(100)),
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Traffic

/// The `time=X ms` of every reply in ping's output.
pub fn ping_times(out: &str) -> Vec<f64> {
    out.lines()
        .filter_map(|l| {
            l.split_once("time=")?
                .1
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// `count` pings `interval` apart (after three untimed ones that resolve ARP
/// and wake everything up); RTTs in ms.
fn rtts(from: &Netns, to: IpAddr, count: usize, interval: &str) -> Result<Vec<f64>> {
    let fd = NsFd::open(&from.path())?;
    let to = to.to_string();
    let _ = exec::run(
        &Spec::new("ping")
            .args(["-n", "-q", "-c", "3", "-i", "0.05", "-W", "1", &to])
            .netns(&fd),
    )?;
    let what = format!("ping {to}");
    let o = exec::run(
        &Spec::new("ping")
            .args([
                "-n",
                "-c",
                &count.to_string(),
                "-i",
                interval,
                "-W",
                "1",
                &to,
            ])
            .netns(&fd)
            .timeout(Duration::from_secs(30)),
    )?;
    let v = ping_times(&o.stdout);
    if v.len() * 10 < count * 9 {
        return Err(BenchError::output(
            what,
            format!("{} of {count} replies: {}", v.len(), o.stdout.trim()),
        ));
    }
    Ok(v)
}

/// Whether one ping gets a reply within `wait`.
fn ping_once(fd: &NsFd, to: &str, wait: &str) -> Result<bool> {
    Ok(exec::run(
        &Spec::new("ping")
            .args(["-n", "-q", "-c", "1", "-W", wait, to])
            .netns(fd)
            .timeout(Duration::from_secs(5)),
    )?
    .success())
}

pub(crate) fn median(v: &[f64]) -> f64 {
    // Infinity (never happened) counts: it is the worst sample.
    let mut s: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NAN, f64::max)
}

// ---------------------------------------------------------------------------
// 5.1 Pod-to-pod across two nodes

/// One path between the two pods, measured.
#[derive(Debug, Clone)]
struct PathRow {
    label: String,
    single: f64,
    multi: f64,
    rtt: Vec<f64>,
    /// Pings 0.2 ms apart: the tunnel never sleeps between them, so this is
    /// its processing without the cost of waking up.
    rtt_busy: Vec<f64>,
    /// Sender's TCP retransmissions in the 1- and 4-stream runs.
    retransmits: [u64; 2],
    /// CPU seconds per GB of the tunnel's processes (both nodes), pooled
    /// over both iperf3 runs; None where there is no such process.
    proc_per_gb: Option<f64>,
    /// Busy CPU seconds of the whole machine per GB, same runs.
    machine_per_gb: f64,
    /// Other work on the machine just before and just after, share of all
    /// CPUs.
    background: [f64; 2],
}

/// The two nodes and their pods, as the alternatives need them.
struct Two<'a> {
    nodes: [&'a SimNode; 2],
    underlay: [IpAddr; 2],
}

impl<'a> Two<'a> {
    fn of(c: &'a Cluster) -> Result<Two<'a>> {
        let n = c.nodes();
        if n.len() < 2 || n[0].pods.is_empty() || n[1].pods.is_empty() {
            return Err(BenchError::failed(
                "two-node cluster",
                "needs 2 nodes with a pod each",
            ));
        }
        let lab = c
            .lab()
            .ok_or_else(|| BenchError::failed("two-node cluster", "no lab"))?;
        let addr = |s: &SimNode| -> Result<IpAddr> {
            s.lab
                .map(|(id, _, _)| lab.node(id).addr)
                .ok_or_else(|| BenchError::failed(&s.name, "not a lab node"))
        };
        Ok(Two {
            nodes: [&n[0], &n[1]],
            underlay: [addr(&n[0])?, addr(&n[1])?],
        })
    }

    fn pod(&self, i: usize) -> &'a Netns {
        &self.nodes[i].pods[0].pod.ns
    }

    fn ip(&self, i: usize) -> IpAddr {
        self.nodes[i].pods[0].ip
    }
}

/// iperf3 from pod 1 to pod 0 with 1 and 4 streams, then pings; CPU of
/// `pids` and of the machine around the transfers.
fn measure(label: &str, t: &Two, pids: &[u32], opts: &Opts) -> Result<PathRow> {
    cleanup::check()?;
    let before = wait_quiet(opts.quiet_wait)?;
    let (mut proc_cpu, mut machine, mut bytes) = (0.0, 0.0, 0.0);
    let mut rates = Vec::new();
    let mut retransmits = [0; 2];
    for (k, streams) in [1, 4].into_iter().enumerate() {
        let (p0, m0) = (cpu_of(pids)?, machine_busy());
        let r = iperf::run(
            t.pod(0),
            &t.ip(0).to_string(),
            t.pod(1),
            opts.seconds,
            streams,
        )?;
        let (p1, m1) = (cpu_of(pids)?, machine_busy());
        proc_cpu += p1 - p0;
        machine += m1 - m0;
        bytes += r.bytes;
        rates.push(r.gbits);
        retransmits[k] = r.retransmits;
    }
    let rtt = rtts(t.pod(1), t.ip(0), opts.pings, "0.01")?;
    let rtt_busy = rtts(t.pod(1), t.ip(0), opts.pings * 5, "0.0002")?;
    let after = background(Duration::from_millis(300));
    let gb = bytes / 1e9;
    Ok(PathRow {
        label: label.into(),
        single: rates[0],
        multi: rates[1],
        rtt,
        rtt_busy,
        retransmits,
        proc_per_gb: (!pids.is_empty() && gb > 0.0).then(|| proc_cpu / gb),
        machine_per_gb: if gb > 0.0 { machine / gb } else { f64::NAN },
        background: [before, after],
    })
}

/// Measures a path that `link` builds by hand (no evio process to watch)
/// and takes it down again, also when the measurement failed, so that the
/// next row starts from the bare cluster.
fn measure_over(
    label: &str,
    t: &Two,
    link: fn(&Two, bool) -> Result<()>,
    opts: &Opts,
) -> Result<PathRow> {
    link(t, true)?;
    let row = measure(label, t, &[], opts);
    let down = link(t, false);
    let row = row?;
    down.map(|()| row)
}

fn evio_pids(t: &Two) -> Result<Vec<u32>> {
    t.nodes.iter().map(|n| agent_pid(n)).collect()
}

/// Joins the two node bridges with a veth pair (the agents stopped).
fn plain_link(t: &Two, up: bool) -> Result<()> {
    let [a, b] = t.nodes;
    if !up {
        // Deleting one end deletes both (and OVS forgets the port's device).
        for n in [a, b] {
            if let Some(o) = &n.ovs {
                let _ = o.try_vsctl(&["--if-exists", "del-port", &n.bridge, "evpl"]);
            }
        }
        sh(&a.ns, &["ip", "link", "del", "evpl"])?;
        return Ok(());
    }
    veth(&a.ns, "evpl", &b.ns, "evpl")?;
    for n in [a, b] {
        match &n.ovs {
            None => {
                sh(&n.ns, &["ip", "link", "set", "evpl", "master", &n.bridge])?;
            }
            Some(o) => {
                let out = o.try_vsctl(&["add-port", &n.bridge, "evpl"]);
                if !out.status.success() {
                    return Err(BenchError::failed(
                        format!("ovs-vsctl add-port {} evpl", n.bridge),
                        String::from_utf8_lossy(&out.stderr).trim().to_string(),
                    ));
                }
                // The userspace datapath cannot take partial checksums.
                sh(&n.ns, &["ethtool", "-K", "evpl", "tx", "off"])?;
            }
        }
        sh(&n.ns, &["ip", "link", "set", "evpl", "up"])?;
    }
    Ok(())
}

/// Kernel VXLAN between the nodes' underlay addresses, in both bridges.
fn vxlan(t: &Two, up: bool) -> Result<()> {
    for i in 0..2 {
        let n = t.nodes[i];
        if !up {
            sh(&n.ns, &["ip", "link", "del", "evvx"])?;
            continue;
        }
        let (me, other) = (t.underlay[i].to_string(), t.underlay[1 - i].to_string());
        sh(
            &n.ns,
            &[
                "ip", "link", "add", "evvx", "type", "vxlan", "id", "42", "local", &me, "remote",
                &other, "dstport", "4789", "dev", "eth0",
            ],
        )?;
        sh(&n.ns, &["ip", "link", "set", "evvx", "master", &n.bridge])?;
        sh(&n.ns, &["ip", "link", "set", "evvx", "up"])?;
    }
    Ok(())
}

/// boringtun between the two nodes: one `boringtun-cli` per node, its
/// interface routing the other node's pod subnet.
struct Boringtun {
    procs: Vec<Background>,
    sockets: Vec<PathBuf>,
}

impl Boringtun {
    fn pids(&self) -> Vec<u32> {
        self.procs.iter().filter_map(Background::pid).collect()
    }
}

impl Drop for Boringtun {
    fn drop(&mut self) {
        // Killed (and reaped) first; a killed boringtun leaves its UAPI
        // socket behind: ours, remove it.
        self.procs.clear();
        for s in &self.sockets {
            let _ = std::fs::remove_file(s);
        }
    }
}

fn wg(args: &[&str], stdin: &str) -> Result<String> {
    let o = exec::run(
        &Spec::new("wg")
            .args(args.iter().copied())
            .stdin(stdin.as_bytes().to_vec()),
    )?;
    Ok(o.ok(&format!("wg {}", args.join(" ")))?
        .stdout
        .trim()
        .to_string())
}

fn start_boringtun(bin: &Path, t: &Two, threads: usize, dir: &Path) -> Result<Boringtun> {
    let mut bt = Boringtun {
        procs: Vec::new(),
        sockets: Vec::new(),
    };
    let tag = std::process::id() % 100_000;
    let names: Vec<String> = (0..2).map(|i| format!("ebw{tag}t{threads}{i}")).collect();
    let mut keys = Vec::new();
    for i in 0..2 {
        let key = wg(&["genkey"], "")?;
        let public = wg(&["pubkey"], &format!("{key}\n"))?;
        let file = dir.join(format!("wg{threads}-{i}.key"));
        std::fs::write(&file, format!("{key}\n"))
            .map_err(BenchError::io(format!("write {}", file.display())))?;
        keys.push((file, public));
    }
    for (node, name) in t.nodes.iter().zip(&names) {
        let fd = NsFd::open(&node.ns.path())?;
        let sock = PathBuf::from(format!("/var/run/wireguard/{name}.sock"));
        let _ = std::fs::remove_file(&sock);
        let log = dir.join(format!("{name}.log"));
        bt.procs.push(Background::start(
            &Spec::new(bin)
                .args([
                    "--foreground".to_string(),
                    "--disable-drop-privileges".into(),
                    "--threads".into(),
                    threads.to_string(),
                    "--log".into(),
                    log.display().to_string(),
                    name.clone(),
                ])
                .env("WG_SUDO", "1")
                .netns(&fd),
        )?);
        bt.sockets.push(sock.clone());
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            let proc = bt.procs.last_mut().expect("just pushed");
            if Instant::now() >= deadline || !proc.running() {
                return Err(BenchError::failed(
                    format!("boringtun-cli {name}"),
                    format!(
                        "no UAPI socket {}: {}",
                        sock.display(),
                        proc.output().trim()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    for i in 0..2 {
        let (n, o) = (t.nodes[i], t.nodes[1 - i]);
        let endpoint = format!("{}:{WG_PORT}", t.underlay[1 - i]);
        wg(
            &[
                "set",
                &names[i],
                "private-key",
                &keys[i].0.display().to_string(),
                "listen-port",
                &WG_PORT.to_string(),
                "peer",
                &keys[1 - i].1,
                "allowed-ips",
                &o.subnet,
                "endpoint",
                &endpoint,
            ],
            "",
        )?;
        sh(
            &n.ns,
            &["ip", "link", "set", &names[i], "mtu", WG_MTU, "up"],
        )?;
        sh(
            &n.ns,
            &["ip", "route", "replace", &o.subnet, "dev", &names[i]],
        )?;
    }
    Ok(bt)
}

/// Pods reach the other pod subnet through their gateway (the node routes
/// it into boringtun) instead of on-link through the bridge.
fn routed_pods(t: &Two, up: bool) -> Result<()> {
    for i in 0..2 {
        let (n, o) = (t.nodes[i], t.nodes[1 - i]);
        let gw = n.gateway.to_string();
        if up {
            sh(&n.ns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
            sh(t.pod(i), &["ip", "route", "replace", &o.subnet, "via", &gw])?;
        } else {
            sh(t.pod(i), &["ip", "route", "del", &o.subnet])?;
            sh(&n.ns, &["sysctl", "-qw", "net.ipv4.ip_forward=0"])?;
        }
    }
    Ok(())
}

#[derive(Debug, Default)]
struct Datapath {
    rows: Vec<PathRow>,
    /// Every boringtun thread count tried (label says which).
    boringtun: Vec<PathRow>,
    boringtun_note: Option<String>,
    ovs_note: Option<String>,
    quick_connect: Option<Connect>,
    quick_idle: Option<Idle>,
}

/// A two-node cluster on `bridge` with its agents connected, and the row of
/// evio's own path through it.
fn measure_evio(
    tools: &Tools,
    bridge: BridgeType,
    label: &str,
    opts: &Opts,
) -> Result<(Cluster, PathRow)> {
    let c = up(tools, bridge, OverlayOpts::flat(2), 1)?;
    wait_all(&c, Duration::from_secs(20))?;
    let t = Two::of(&c)?;
    let pids = evio_pids(&t)?;
    let row = measure(label, &t, &pids, opts)?;
    Ok((c, row))
}

fn datapath(tools: &Tools, opts: &Opts, d: &mut Datapath) -> Result<()> {
    let (mut c, row) = measure_evio(
        tools,
        BridgeType::Linux,
        "evio overlay (Linux bridge)",
        opts,
    )?;
    d.rows.push(row);
    if opts.quick {
        // The small cluster stands in for the connect and idle runs.
        d.quick_connect = Some(restart_and_time(
            &mut c,
            Duration::from_secs(20),
            Duration::ZERO,
        )?);
        wait_all(&c, Duration::from_secs(20))?;
        d.quick_idle = Some(idle(&c, opts.idle_seconds)?);
    }
    stop_agents(&mut c)?;
    let t = Two::of(&c)?;
    d.rows.push(measure_over(
        "plain veth between the node bridges (the limit)",
        &t,
        plain_link,
        opts,
    )?);
    d.rows.push(measure_over(
        "kernel VXLAN, unencrypted (Linux bridge)",
        &t,
        vxlan,
        opts,
    )?);
    match &opts.boringtun {
        None => {
            d.boringtun_note = Some(
                "boringtun: not installed (`cargo install boringtun-cli --locked`; \
                 scripts/bench.sh does it): column skipped"
                    .into(),
            )
        }
        Some(bin) => {
            let dir = tempfile::Builder::new()
                .prefix("evio-bench-wg-")
                .tempdir()
                .map_err(BenchError::io("create boringtun dir"))?;
            routed_pods(&t, true)?;
            let mut result = Ok(());
            for &threads in &opts.boringtun_threads {
                let r = start_boringtun(bin, &t, threads, dir.path()).and_then(|bt| {
                    let label = format!("boringtun --threads {threads} (routed, MTU {WG_MTU})");
                    measure(&label, &t, &bt.pids(), opts)
                });
                match r {
                    Ok(row) => d.boringtun.push(row),
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
            routed_pods(&t, false)?;
            result?;
        }
    }
    c.down()
        .map_err(|e| BenchError::failed("overlay cluster down", e.to_string()))?;
    if opts.quick {
        d.ovs_note = Some("OVS row: skipped in --quick".into());
        return Ok(());
    }
    cleanup::check()?;
    let (mut c, row) = measure_evio(tools, BridgeType::Ovs, "evio overlay (OVS netdev)", opts)?;
    d.rows.push(row);
    stop_agents(&mut c)?;
    {
        let t = Two::of(&c)?;
        d.rows.push(measure_over(
            "plain veth between the OVS bridges (OVS limit)",
            &t,
            plain_link,
            opts,
        )?);
    }
    c.down()
        .map_err(|e| BenchError::failed("overlay cluster down", e.to_string()))?;
    Ok(())
}

// ---------------------------------------------------------------------------
// 5.2 Connect time

/// What one agent saw of one peer while being polled.
#[derive(Debug, Clone, Default)]
struct Seen {
    connected: Option<Instant>,
    direct: Option<Instant>,
    first_path: Option<String>,
    last_path: Option<String>,
}

/// One node pair after a simultaneous start of every agent.
#[derive(Debug, Clone)]
pub struct PairTime {
    pub a: usize,
    pub b: usize,
    /// Until both agents reported the other connected, from the later of
    /// their two starts.
    pub connected: Option<Duration>,
    /// Until both reported the direct path (same origin).
    pub direct: Option<Duration>,
    /// The path at the end of the run (a's view; "mixed" if b disagrees).
    pub path: Option<String>,
    /// The path when the pair first became connected (a's view).
    pub first_path: Option<String>,
    pub nat: (Option<NatType>, Option<NatType>),
}

#[derive(Debug, Clone)]
struct Connect {
    nodes: usize,
    pairs: Vec<PairTime>,
    /// Until every pair was connected, from the first agent's start.
    all: Option<Duration>,
    /// First to last agent start.
    spread: Duration,
}

/// Stops every agent, starts them all again at once (their records are
/// gone: each agent leaves the network, so this is a cold join) and
/// polls every agent's `peers` every 50 ms until every pair is connected
/// and no path changed for `settle`, or `timeout`. Sessions are made on
/// demand, so traffic waits from the start: each poller pings (host
/// overlay, one echo) every peer its agent knows and does not list
/// connected, again every 300 ms; the time is that of a tunnel for
/// traffic that is waiting, as the eager agent's was for none.
fn restart_and_time(c: &mut Cluster, timeout: Duration, settle: Duration) -> Result<Connect> {
    let n = c.nodes().len();
    stop_agents(c)?;
    for i in 0..n {
        c.start_agent(i)
            .map_err(|e| BenchError::failed("start agent", e.to_string()))?;
    }
    let nodes = c.nodes();
    let names: BTreeMap<String, usize> = nodes
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.clone(), i))
        .collect();
    let agents: Vec<&Agent> = nodes.iter().map(agent_of).collect::<Result<_>>()?;
    let starts: Vec<Instant> = agents.iter().map(|a| a.started).collect();
    let t0 = *starts.iter().min().unwrap_or(&Instant::now());
    let deadline = Instant::now() + timeout;
    let seen: Vec<Vec<Seen>> = std::thread::scope(|s| {
        let handles: Vec<_> = agents
            .iter()
            .zip(nodes)
            .map(|(a, node)| {
                let names = &names;
                s.spawn(move || {
                    let mut v = vec![Seen::default(); n];
                    let mut changed = Instant::now();
                    let mut pings = Pings::default();
                    loop {
                        let tick = Instant::now();
                        pings.reap();
                        if let Ok(p) = a.peers() {
                            let now = Instant::now();
                            for e in p["peers"].as_array().into_iter().flatten() {
                                let Some(&j) = e["node"].as_str().and_then(|x| names.get(x)) else {
                                    continue;
                                };
                                if e["state"] != "connected" {
                                    pings.touch(&node.ns, j, e["hostAddress"].as_str());
                                }
                                let path = e["path"].as_str().map(str::to_string);
                                let w = &mut v[j];
                                if e["state"] == "connected" {
                                    if w.connected.is_none() {
                                        w.connected = Some(now);
                                        w.first_path = path.clone();
                                    }
                                    if path.as_deref() == Some("direct") && w.direct.is_none() {
                                        w.direct = Some(now);
                                    }
                                }
                                if path != w.last_path {
                                    w.last_path = path;
                                    changed = now;
                                }
                            }
                            let done = v.iter().filter(|w| w.connected.is_some()).count() + 1 >= n;
                            if done && now.duration_since(changed) >= settle {
                                break;
                            }
                        }
                        if Instant::now() >= deadline || cleanup::check().is_err() {
                            break;
                        }
                        std::thread::sleep(POLL.saturating_sub(tick.elapsed()));
                    }
                    v
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    cleanup::check()?;
    let nat = |i: usize| nodes[i].lab.map(|l| l.1);
    let mut pairs = Vec::new();
    for a in 0..n {
        for b in a + 1..n {
            let (x, y) = (&seen[a][b], &seen[b][a]);
            let origin = starts[a].max(starts[b]);
            let both = |p: Option<Instant>, q: Option<Instant>| {
                Some(p?.max(q?).saturating_duration_since(origin))
            };
            let path = match (&x.last_path, &y.last_path) {
                (p, q) if p == q => p.clone(),
                (Some(_), Some(_)) => Some("mixed".into()),
                (p, q) => p.clone().or(q.clone()),
            };
            pairs.push(PairTime {
                a,
                b,
                connected: both(x.connected, y.connected),
                direct: both(x.direct, y.direct),
                path,
                first_path: x.first_path.clone(),
                nat: (nat(a), nat(b)),
            });
        }
    }
    let all = pairs
        .iter()
        .map(|p| {
            let (x, y) = (&seen[p.a][p.b], &seen[p.b][p.a]);
            Some(x.connected?.max(y.connected?).saturating_duration_since(t0))
        })
        .collect::<Option<Vec<_>>>()
        .map(|v| v.into_iter().max().unwrap_or_default());
    let spread = starts
        .iter()
        .max()
        .map(|m| m.saturating_duration_since(t0))
        .unwrap_or_default();
    Ok(Connect {
        nodes: n,
        pairs,
        all,
        spread,
    })
}

/// One-echo pings a connect poller has running, by peer, and when each
/// last started; all killed when it goes.
#[derive(Default)]
struct Pings {
    running: Vec<std::process::Child>,
    last: BTreeMap<usize, Instant>,
}

impl Pings {
    /// A ping to `host` (`a.b.c.d/len`, from `peers --json`) from `ns`,
    /// unless one went to peer `j` within 300 ms.
    fn touch(&mut self, ns: &Netns, j: usize, host: Option<&str>) {
        let Some(host) = host.and_then(|h| h.split('/').next()) else {
            return;
        };
        if self
            .last
            .get(&j)
            .is_some_and(|t| t.elapsed() < Duration::from_millis(300))
        {
            return;
        }
        self.last.insert(j, Instant::now());
        let mut cmd = ns.command(&["ping", "-n", "-q", "-c", "1", "-W", "1", host]);
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        if let Ok(c) = cmd.spawn() {
            self.running.push(c);
        }
    }

    fn reap(&mut self) {
        self.running
            .retain_mut(|c| !matches!(c.try_wait(), Ok(Some(_)) | Err(_)));
    }
}

impl Drop for Pings {
    fn drop(&mut self) {
        for c in &mut self.running {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn secs(d: Option<Duration>) -> String {
    d.map_or("never".into(), |d| format!("{:.2}", d.as_secs_f64()))
}

fn dsecs(v: &[Option<Duration>]) -> Vec<f64> {
    v.iter()
        .map(|d| d.map_or(f64::INFINITY, |d| d.as_secs_f64()))
        .collect()
}

// ---------------------------------------------------------------------------
// 5.3 Recovery

#[derive(Debug, Clone)]
struct Recovery {
    /// Which side pinged: "far" (its pings enter through the flushed NAT)
    /// or "near" (behind the flushed NAT).
    side: &'static str,
    took: Option<Duration>,
    /// The flushed side's view of the pair afterwards: state and path.
    after: String,
}

#[derive(Debug, Clone)]
struct NatRun {
    /// Where the agents' logs were kept because a pair did not connect.
    logs: Option<PathBuf>,
    connect: Connect,
    /// (flushed node, far node) and their NAT types.
    pair: Option<(String, String)>,
    recovery: Vec<Recovery>,
}

fn nat_run(tools: &Tools, opts: &Opts) -> Result<NatRun> {
    let mut c = up(tools, BridgeType::Linux, OverlayOpts::nat_lab(), 1)?;
    let connect = restart_and_time(&mut c, Duration::from_secs(30), Duration::from_secs(3))?;
    cleanup::check()?;
    let logs = if connect.pairs.iter().any(|p| p.connected.is_none()) {
        keep_logs(&c)
    } else {
        None
    };
    // A direct pair, both behind NATs, on different sites; neither
    // symmetric if there is one (the pair the figure was first taken on,
    // a port-restricted cone and a full cone): since birthday probing a
    // symmetric node's pairs go direct too, through a spare socket's
    // mapping, which is another recovery than the one measured here.
    let direct_pair = |p: &&PairTime, cones: bool| {
        let (a, b) = (&c.nodes()[p.a], &c.nodes()[p.b]);
        let sym = |t: NatType| cones && t == NatType::Symmetric;
        p.path.as_deref() == Some("direct")
            && matches!((a.lab, b.lab), (Some(x), Some(y)) if x.1 != NatType::Public && y.1 != NatType::Public && x.2 != y.2 && !sym(x.1) && !sym(y.1))
    };
    let pick = (connect.pairs.iter().find(|p| direct_pair(p, true)))
        .or_else(|| connect.pairs.iter().find(|p| direct_pair(p, false)));
    let Some(p) = pick.cloned() else {
        return Ok(NatRun {
            logs,
            connect,
            pair: None,
            recovery: Vec::new(),
        });
    };
    let (near, far) = (&c.nodes()[p.a], &c.nodes()[p.b]);
    let site = SiteId(near.lab.map(|l| l.2).unwrap_or(0));
    let lab = c
        .lab()
        .ok_or_else(|| BenchError::failed("NAT lab", "gone"))?;
    let label = |s: &SimNode| {
        format!(
            "{} ({})",
            s.name,
            s.lab.map(|l| l.1.to_string()).unwrap_or_default()
        )
    };
    let mut recovery = Vec::new();
    for round in 0..opts.recovery_rounds * 2 {
        cleanup::check()?;
        let (side, from, to) = if round % 2 == 0 {
            ("far", far, near)
        } else {
            ("near", near, far)
        };
        let fd = NsFd::open(&from.pods[0].pod.ns.path())?;
        let dst = to.pods[0].ip.to_string();
        // Working before, then quiet for a moment: the flush hits an
        // established tunnel between its probes, not mid-burst.
        let mut ok = false;
        for _ in 0..20 {
            if ping_once(&fd, &dst, "1")? {
                ok = true;
                break;
            }
        }
        if !ok {
            return Err(BenchError::failed(
                format!("ping {} -> {}", from.name, to.name),
                "no reply before the conntrack flush",
            ));
        }
        sleep_checked(Duration::from_millis(1500))?;
        let t = Instant::now();
        lab.flush_conntrack(site);
        let mut took = None;
        while t.elapsed() < Duration::from_secs(30) {
            cleanup::check()?;
            if ping_once(&fd, &dst, "0.2")? {
                took = Some(t.elapsed());
                break;
            }
        }
        let after = agent_of(near)?
            .peers()
            .ok()
            .and_then(|v| evio_testkit::agent::peer(&v, &far.name).cloned())
            .map(|e| {
                format!(
                    "{} {}",
                    e["state"].as_str().unwrap_or("?"),
                    e["path"].as_str().unwrap_or("-")
                )
            })
            .unwrap_or_else(|| "unknown".into());
        recovery.push(Recovery { side, took, after });
    }
    let pair = Some((label(near), label(far)));
    drop(c);
    Ok(NatRun {
        logs,
        connect,
        pair,
        recovery,
    })
}

/// Copies every agent's log out of the cluster (whose directory goes with
/// it) into `/tmp/evio-bench-logs-<pid>`.
fn keep_logs(c: &Cluster) -> Option<PathBuf> {
    let dir = std::env::temp_dir().join(format!("evio-bench-logs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).ok()?;
    for n in c.nodes() {
        if let Some(a) = &n.agent {
            std::fs::write(dir.join(format!("{}.log", n.name)), a.log()).ok()?;
        }
    }
    Some(dir)
}

// ---------------------------------------------------------------------------
// 5.4 / 5.5 Idle cost and scale

#[derive(Debug, Clone)]
struct Idle {
    nodes: usize,
    secs: u32,
    /// Per agent: % of one core, RSS KiB, wake-ups (context switches) / s.
    pct: Vec<f64>,
    rss: Vec<u64>,
    wakeups: Vec<f64>,
    /// Peers still connected at the end, per agent.
    connected: Vec<usize>,
}

fn idle(c: &Cluster, secs: u32) -> Result<Idle> {
    let pids: Vec<u32> = c.nodes().iter().map(agent_pid).collect::<Result<_>>()?;
    // Nobody asks the agents anything from here on: the timing run polled
    // them 20 times a second, which is not idle.
    sleep_checked(Duration::from_secs(3))?;
    let cpu0: Vec<f64> = pids
        .iter()
        .map(|p| proc_cpu(*p).unwrap_or(f64::NAN))
        .collect();
    let cs0: Vec<u64> = pids.iter().map(|p| ctx_switches(*p)).collect();
    let t = Instant::now();
    sleep_checked(Duration::from_secs(u64::from(secs)))?;
    let el = t.elapsed().as_secs_f64();
    let cpu1: Vec<f64> = pids
        .iter()
        .map(|p| proc_cpu(*p).unwrap_or(f64::NAN))
        .collect();
    let cs1: Vec<u64> = pids.iter().map(|p| ctx_switches(*p)).collect();
    let rss = pids.iter().map(|p| rss_kib(*p).unwrap_or(0)).collect();
    let connected = c
        .nodes()
        .iter()
        .map(|n| {
            n.agent
                .as_ref()
                .and_then(|a| a.peers().ok())
                .map_or(0, |v| evio_testkit::agent::connected(&v))
        })
        .collect();
    Ok(Idle {
        nodes: pids.len(),
        secs,
        pct: cpu0
            .iter()
            .zip(&cpu1)
            .map(|(a, b)| 100.0 * (b - a) / el)
            .collect(),
        rss,
        wakeups: cs0
            .iter()
            .zip(&cs1)
            .map(|(a, b)| b.saturating_sub(*a) as f64 / el)
            .collect(),
        connected,
    })
}

#[derive(Debug, Clone)]
struct Scale {
    connect: Connect,
    idle: Idle,
    setup: Duration,
}

fn flat_run(
    tools: &Tools,
    opts: &Opts,
    n: usize,
    rounds: usize,
) -> Result<(Vec<Connect>, Option<Scale>)> {
    let t = Instant::now();
    let fulls = arp_fulls();
    let mut c = up(tools, BridgeType::Linux, OverlayOpts::flat(n), 0)?;
    if wait_all(&c, Duration::from_secs(60)).is_err() {
        return Err(not_converged(&c, t.elapsed(), arp_fulls() - fulls));
    }
    let setup = t.elapsed();
    let timeout = Duration::from_secs(30 + n as u64);
    let mut runs = Vec::new();
    for _ in 0..rounds.max(1) {
        cleanup::check()?;
        runs.push(restart_and_time(&mut c, timeout, Duration::ZERO)?);
    }
    wait_all(&c, Duration::from_secs(60))?;
    let idle = idle(&c, opts.idle_seconds)?;
    let connect = runs.last().cloned();
    drop(c);
    Ok((
        runs,
        connect.map(|connect| Scale {
            connect,
            idle,
            setup,
        }),
    ))
}

/// What a cluster that did not converge looks like: pairs connected, and
/// the first agent's refusals and handshake counters.
fn not_converged(c: &Cluster, after: Duration, arp_fulls: u64) -> BenchError {
    let n = c.nodes().len();
    let connected: usize = c
        .peers()
        .iter()
        .map(|p| p.as_ref().map_or(0, evio_testkit::agent::connected))
        .sum();
    let m = c
        .nodes()
        .first()
        .and_then(|x| x.agent.as_ref())
        .and_then(|a| a.metrics().ok())
        .unwrap_or_default();
    let counters: Vec<String> = m
        .lines()
        .filter(|l| {
            l.starts_with("evio_overlay_rejected_total") || l.starts_with("evio_overlay_cookie")
        })
        .filter(|l| !l.ends_with(" 0"))
        .map(|l| l.replace("evio_overlay_", ""))
        .collect();
    BenchError::failed(
        format!("{n}-node cluster"),
        format!(
            "not every pair connected {:.0} s after set-up began: {connected} of {} \
             directed pairs; node-0's refusals: {}{}",
            after.as_secs_f64(),
            n * (n - 1),
            if counters.is_empty() {
                "none".to_string()
            } else {
                counters.join(", ")
            },
            if arp_fulls > 0 {
                format!(
                    "; the kernel's ARP table, shared by all namespaces, refused {arp_fulls} \
                     entries (net.ipv4.neigh.default.gc_thresh3 = {}; a flat mesh of {n} nodes \
                     needs {} neighbour entries)",
                    std::fs::read_to_string("/proc/sys/net/ipv4/neigh/default/gc_thresh3")
                        .unwrap_or_default()
                        .trim(),
                    n * (n - 1)
                )
            } else {
                String::new()
            }
        ),
    )
}

// ---------------------------------------------------------------------------
// The section

/// Runs every part it can; a failed part is reported in place and the
/// first error is returned with the text (the run then exits non-zero).
pub fn run(tools: &Tools, opts: &Opts) -> (String, Option<BenchError>) {
    let mut first_err: Option<BenchError> = None;
    let mut fail = |part: &str, e: BenchError, out: &mut String| {
        out.push_str(&format!("\n**{part} FAILED:** {e}\n"));
        if first_err.is_none() {
            first_err = Some(e);
        }
    };
    if let Err(e) = tools.require(&[&tools.evio, &tools.evio_node]) {
        return (String::new(), Some(e));
    }
    let load0 = loadavg();
    let started = Instant::now();
    let mut out = String::new();
    let mut body = String::new();

    let wants = |p: &str| opts.parts.is_empty() || opts.parts.iter().any(|x| x == p);
    let mut d = Datapath::default();
    if wants("paths") {
        eprintln!("evio-bench: overlay: pod-to-pod paths ...");
        let dp = datapath(tools, opts, &mut d);
        body.push_str(&render_datapath(opts, &d));
        if let Err(e) = dp {
            fail("pod-to-pod", e, &mut body);
        }
    }

    let mut flat: Vec<Connect> = Vec::new();
    let mut nat: Option<NatRun> = None;
    let mut idle16: Option<Idle> = None;
    let mut large: Option<Scale> = None;
    if opts.quick {
        if let Some(c) = &d.quick_connect {
            flat.push(c.clone());
        }
        idle16 = d.quick_idle.clone();
    } else {
        if wants("connect") {
            eprintln!("evio-bench: overlay: {} nodes flat ...", opts.connect_nodes);
            match flat_run(tools, opts, opts.connect_nodes, opts.connect_rounds) {
                Ok((runs, _)) => flat = runs,
                Err(e) => fail("connect (flat)", e, &mut body),
            }
        }
        if wants("nat") {
            eprintln!("evio-bench: overlay: NAT lab ...");
            match nat_run(tools, opts) {
                Ok(r) => nat = Some(r),
                Err(e) => fail("NAT lab", e, &mut body),
            }
        }
        if wants("idle") {
            eprintln!("evio-bench: overlay: {} nodes idle ...", opts.idle_nodes);
            match flat_run(tools, opts, opts.idle_nodes, 1) {
                Ok((_, s)) => idle16 = s.map(|s| s.idle),
                Err(e) => fail("idle", e, &mut body),
            }
        }
        if wants("large") {
            eprintln!("evio-bench: overlay: {} nodes ...", opts.large_nodes);
            match flat_run(tools, opts, opts.large_nodes, 1) {
                Ok((_, s)) => large = s,
                Err(e) => fail("large", e, &mut body),
            }
        }
    }
    body.push_str(&render_connect(opts, &flat, nat.as_ref()));
    body.push_str(&render_recovery(nat.as_ref()));
    body.push_str(&render_idle(opts, idle16.as_ref(), large.as_ref()));
    body.push_str(&render_targets(&d, &flat, nat.as_ref(), idle16.as_ref()));
    out.push_str(&format!(
        "Nodes are network namespaces of the evio-testkit NAT lab (`OverlayOpts::flat(n)`: \
         public addresses on one bridged \"internet\", no NAT; `OverlayOpts::nat_lab()`: sites \
         behind nftables NATs with coturn), each with the real `evio-node config-gen`, \
         `evio-node agent` (release build, network key set) and pods added by the `evio` \
         plugin. Load average at the start of this section {load0}, at its end {}; it took \
         {:.0} s.\n\n",
        loadavg(),
        started.elapsed().as_secs_f64()
    ));
    out.push_str(&body);
    (out, first_err)
}

fn secs_or_never(x: f64) -> String {
    if x == f64::INFINITY {
        "never".into()
    } else {
        format!("{} s", f2(x))
    }
}

/// [`verdict`], with "never" for a time that never came.
fn within(measured: f64, target: f64) -> String {
    if measured == f64::INFINITY {
        "MISSED (never happened within the run)".into()
    } else {
        verdict(measured, target)
    }
}

fn f2(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.2}")
    } else if x == f64::INFINITY {
        // Times: a time that never came.
        "never".into()
    } else {
        "n/a".into()
    }
}

fn f3(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.3}")
    } else {
        "n/a".into()
    }
}

/// The best boringtun run by single-stream throughput.
fn best_bt(d: &Datapath) -> Option<&PathRow> {
    d.boringtun
        .iter()
        .max_by(|a, b| a.single.total_cmp(&b.single))
}

fn plain_rtt(d: &Datapath) -> f64 {
    d.rows
        .iter()
        .find(|r| r.label.starts_with("plain veth between the node"))
        .map_or(f64::NAN, |r| median(&r.rtt))
}

fn evio_row(d: &Datapath) -> Option<&PathRow> {
    d.rows
        .iter()
        .find(|r| r.label == "evio overlay (Linux bridge)")
}

fn render_datapath(opts: &Opts, d: &Datapath) -> String {
    let base = plain_rtt(d);
    let mut t = Table::new([
        "path between the two pods",
        "1 stream Gbit/s",
        "4 streams Gbit/s",
        "TCP retransmits (1 / 4 streams)",
        "RTT median ms",
        "RTT p90 ms",
        "added RTT (median) ms",
        "RTT median, pings 0.2 ms apart",
        "tunnel process CPU s/GB",
        "whole machine CPU s/GB",
        "other work before / after, % of all CPUs",
    ]);
    let busy_base = d
        .rows
        .iter()
        .find(|r| r.label.starts_with("plain veth between the node"))
        .map_or(f64::NAN, |r| median(&r.rtt_busy));
    let row = |t: &mut Table, r: &PathRow, label: String| {
        let mut s = r.rtt.clone();
        s.sort_by(f64::total_cmp);
        let p90 = s
            .get((s.len() * 9 / 10).min(s.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN);
        t.row([
            label,
            f2(r.single),
            f2(r.multi),
            format!("{} / {}", r.retransmits[0], r.retransmits[1]),
            f3(median(&r.rtt)),
            f3(p90),
            f3(median(&r.rtt) - base),
            format!(
                "{} (+{})",
                f3(median(&r.rtt_busy)),
                f3(median(&r.rtt_busy) - busy_base)
            ),
            r.proc_per_gb.map_or("n/a (kernel)".into(), f2),
            f2(r.machine_per_gb),
            format!(
                "{:.0} / {:.0}",
                100.0 * r.background[0],
                100.0 * r.background[1]
            ),
        ]);
    };
    for r in &d.rows {
        row(&mut t, r, r.label.clone());
        if r.label.starts_with("kernel VXLAN") {
            match best_bt(d) {
                Some(b) => row(
                    &mut t,
                    b,
                    format!(
                        "best boringtun: {}",
                        b.label.trim_start_matches("boringtun ")
                    ),
                ),
                None => t.row([
                    "boringtun".to_string(),
                    d.boringtun_note.clone().unwrap_or_else(|| "not run".into()),
                ]),
            }
        }
    }
    let mut bt = Table::new([
        "boringtun run",
        "1 stream Gbit/s",
        "4 streams Gbit/s",
        "RTT median ms",
        "boringtun CPU s/GB",
    ]);
    for r in &d.boringtun {
        bt.row([
            r.label.clone(),
            f2(r.single),
            f2(r.multi),
            f3(median(&r.rtt)),
            r.proc_per_gb.map_or("n/a".into(), f2),
        ]);
    }
    let mut s = format!(
        "### 5.1 Pod to pod across two nodes\n\nTwo nodes (`OverlayOpts::flat(2)`, one pod \
         each, pod MTU as config-gen writes it with the overlay on), iperf3 from the pod on \
         node-1 to the pod on node-0, {} s per run, 1 then 4 parallel TCP streams; then {} \
         pings 10 ms apart (after 3 untimed), then {} pings 0.2 ms apart (at that rate a \
         tunnel process never gets to sleep: the difference between the two RTTs is what \
         waking it up costs). Same nodes and pods for every path: evio is \
         measured with the agents running, then the agents are stopped (they leave bridge and \
         pods) and the alternatives are built in the same node namespaces: a veth pair \
         plugged into both bridges (the limit), kernel VXLAN (id 42, the nodes' underlay \
         addresses, in both bridges), and boringtun (`boringtun-cli --foreground`, configured \
         with `wg`, interface MTU {WG_MTU}, routing the other node's pod subnet; the pods \
         then route it through their gateway). *Added RTT* is the path's median minus the \
         plain link's median. *Tunnel process CPU* is utime+stime (/proc/PID/stat, every \
         thread) of both nodes' agents (or boringtun processes) across both iperf3 runs, \
         divided by the bytes iperf3 received; not applicable to the kernel paths, whose \
         work happens in softirq and in iperf3's own system calls. *Whole machine CPU* is \
         the busy time of every CPU (user, system, irq, softirq from /proc/stat) over the \
         same runs per GB: iperf3 at both ends, the kernel and the tunnel together, \
         comparable across all rows (and moved by anything else running on the \
         machine). *Other work* is the machine's busy share sampled while nothing of the \
         benchmark runs but idle agents, just before the path (after waiting up to {} s for it \
         to drop below {:.0}%) and just after: a row with much other work is noise.\n\n{}",
        opts.seconds,
        opts.pings,
        opts.pings * 5,
        opts.quiet_wait.as_secs(),
        QUIET * 100.0,
        t.render()
    );
    if !d.boringtun.is_empty() {
        s.push_str(&format!(
            "\nboringtun by thread count (its best single stream is compared):\n\n{}",
            bt.render()
        ));
    }
    if let Some(n) = &d.ovs_note {
        s.push_str(&format!("\n{n}\n"));
    }
    s
}

fn render_connect(opts: &Opts, flat: &[Connect], nat: Option<&NatRun>) -> String {
    let mut s = String::from(
        "\n### 5.2 Time from agent start to peers connected\n\nAll agents of a running \
         cluster are stopped (SIGTERM: each removes its store record) and started again at \
         once; every agent's `peers --json` is polled every 50 ms. A pair counts as \
         connected when both agents report the other `connected`, timed from the later of \
         the two agents' starts; *all connected* is from the first agent's start to the \
         last pair. Paths are the agents' `path` field.\n\n",
    );
    let mut t = Table::new([
        "run",
        "nodes",
        "pairs",
        "start spread s",
        "all connected s",
        "pair median s",
        "pair max s",
    ]);
    for (i, c) in flat.iter().enumerate() {
        let v = dsecs(&c.pairs.iter().map(|p| p.connected).collect::<Vec<_>>());
        t.row([
            if opts.quick {
                format!("flat, quick (2 nodes), round {}", i + 1)
            } else {
                format!("flat (no NAT), round {}", i + 1)
            },
            c.nodes.to_string(),
            c.pairs.len().to_string(),
            f2(c.spread.as_secs_f64()),
            secs(c.all),
            f2(median(&v)),
            f2(max(&v)),
        ]);
    }
    if let Some(n) = nat {
        let c = &n.connect;
        let v = dsecs(&c.pairs.iter().map(|p| p.connected).collect::<Vec<_>>());
        t.row([
            "NAT lab (`nat_lab()`), all pairs".to_string(),
            c.nodes.to_string(),
            c.pairs.len().to_string(),
            f2(c.spread.as_secs_f64()),
            secs(c.all),
            f2(median(&v)),
            f2(max(&v)),
        ]);
        for class in ["direct", "relay", "mixed", "never"] {
            let ps: Vec<&PairTime> = c
                .pairs
                .iter()
                .filter(|p| match class {
                    "never" => p.connected.is_none(),
                    _ => p.connected.is_some() && p.path.as_deref() == Some(class),
                })
                .collect();
            if ps.is_empty() {
                continue;
            }
            let v = dsecs(&ps.iter().map(|p| p.connected).collect::<Vec<_>>());
            t.row([
                if class == "never" {
                    "NAT lab, pairs never connected within 30 s".to_string()
                } else {
                    format!("NAT lab, pairs ending {class}: connected")
                },
                String::new(),
                ps.len().to_string(),
                String::new(),
                String::new(),
                f2(median(&v)),
                f2(max(&v)),
            ]);
            if class == "direct" {
                let v = dsecs(&ps.iter().map(|p| p.direct).collect::<Vec<_>>());
                t.row([
                    "NAT lab, pairs ending direct: on the direct path".to_string(),
                    String::new(),
                    ps.len().to_string(),
                    String::new(),
                    String::new(),
                    f2(median(&v)),
                    f2(max(&v)),
                ]);
            }
        }
    }
    if t.is_empty() {
        s.push_str("not run\n");
        return s;
    }
    s.push_str(&t.render());
    if let Some(n) = nat {
        let mut p = Table::new([
            "pair",
            "NAT types",
            "connected s",
            "direct s",
            "first path",
            "final path",
        ]);
        for x in &n.connect.pairs {
            let nt = |o: Option<NatType>| o.map_or("?".into(), |n| n.to_string());
            p.row([
                format!("node-{} – node-{}", x.a, x.b),
                format!("{} – {}", nt(x.nat.0), nt(x.nat.1)),
                secs(x.connected),
                secs(x.direct),
                x.first_path.clone().unwrap_or_else(|| "-".into()),
                x.path.clone().unwrap_or_else(|| "-".into()),
            ]);
        }
        s.push_str(&format!("\nNAT lab, every pair:\n\n{}", p.render()));
        if let Some(l) = &n.logs {
            s.push_str(&format!(
                "\nA pair did not connect: the agents' logs are kept in {}.\n",
                l.display()
            ));
        }
    }
    s
}

fn render_recovery(nat: Option<&NatRun>) -> String {
    let mut s = String::from("\n### 5.3 Recovery after the NAT forgets its mappings\n\n");
    let Some(n) = nat else {
        s.push_str("not run (needs the NAT lab; skipped in --quick)\n");
        return s;
    };
    let Some((near, far)) = &n.pair else {
        s.push_str("no direct pair with both nodes behind NATs on different sites: not run\n");
        return s;
    };
    s.push_str(&format!(
        "Pair {near} – {far}, direct. Each round: pod ping works, 1.5 s quiet, then \
         `conntrack -F` in {near}'s router (`Lab::flush_conntrack`), then one ping every \
         ≤ 0.2 s until a reply; *far* rounds ping from {far}'s pod (its packets must come in \
         through the flushed NAT: they get through once {near}'s agent has sent something \
         out again), *near* rounds from {near}'s pod. Time from the flush to the first \
         reply.\n\n"
    ));
    let mut t = Table::new([
        "round",
        "pinging side",
        "recovered after s",
        "agent's view after",
    ]);
    for (i, r) in n.recovery.iter().enumerate() {
        t.row([
            (i + 1).to_string(),
            r.side.to_string(),
            secs(r.took),
            r.after.clone(),
        ]);
    }
    s.push_str(&t.render());
    s
}

fn idle_row(t: &mut Table, label: String, peers: usize, i: &Idle) {
    let mib = |k: u64| format!("{:.1}", k as f64 / 1024.0);
    let mut rss = i.rss.clone();
    rss.sort_unstable();
    t.row([
        label,
        i.nodes.to_string(),
        peers.to_string(),
        i.secs.to_string(),
        f3(i.pct.first().copied().unwrap_or(f64::NAN)),
        format!("{} / {}", f3(median(&i.pct)), f3(max(&i.pct))),
        f2(i.pct.iter().sum::<f64>()),
        mib(i.rss.first().copied().unwrap_or(0)),
        mib(rss.last().copied().unwrap_or(0)),
        f2(median(&i.wakeups)),
        format!(
            "{}/{}",
            i.connected.iter().filter(|c| **c + 1 >= i.nodes).count(),
            i.nodes
        ),
    ]);
}

fn render_idle(opts: &Opts, idle16: Option<&Idle>, large: Option<&Scale>) -> String {
    let mut s = format!(
        "\n### 5.4 Idle agents, and 5.5 the largest cluster run here\n\nFlat clusters \
         (no NAT, no pods), every pair connected; after 3 s of nobody asking the agents \
         anything, each agent's utime+stime over {} s (/proc/PID/stat), VmRSS at the end \
         (/proc/PID/status), context switches of all its threads per second (≈ wake-ups). \
         *node-0* is one agent; median / max over all agents of the cluster.\n\n",
        opts.idle_seconds
    );
    let mut t = Table::new([
        "cluster",
        "nodes",
        "peers each",
        "s",
        "node-0 agent % of a core",
        "all agents median / max %",
        "all agents together %",
        "node-0 RSS MiB",
        "max RSS MiB",
        "wake-ups/s per agent (median)",
        "agents with every peer connected after",
    ]);
    if let Some(i) = idle16 {
        idle_row(&mut t, "idle".into(), i.nodes.saturating_sub(1), i);
    }
    if let Some(l) = large {
        idle_row(
            &mut t,
            "largest".into(),
            l.idle.nodes.saturating_sub(1),
            &l.idle,
        );
    }
    if t.is_empty() {
        s.push_str("not run\n");
    } else {
        s.push_str(&t.render());
    }
    if let Some(l) = large {
        let v = dsecs(
            &l.connect
                .pairs
                .iter()
                .map(|p| p.connected)
                .collect::<Vec<_>>(),
        );
        s.push_str(&format!(
            "\n{} nodes: cluster set-up (lab, config-gen, agents, first convergence) {:.1} s; \
             after a restart of every agent, all {} pairs connected {} s after the first start \
             (pair median {} s, max {} s; starts spread over {:.2} s); agents' RSS together {:.0} \
             MiB of {:.1} GiB; all agents' idle CPU together {}% of one of the {} cores.\n",
            l.idle.nodes,
            l.setup.as_secs_f64(),
            l.connect.pairs.len(),
            secs(l.connect.all),
            f2(median(&v)),
            f2(max(&v)),
            l.connect.spread.as_secs_f64(),
            l.idle.rss.iter().sum::<u64>() as f64 / 1024.0,
            mem_total_kib().unwrap_or(0) as f64 / (1024.0 * 1024.0),
            f2(l.idle.pct.iter().sum::<f64>()),
            std::thread::available_parallelism().map_or(0, |n| n.get()),
        ));
    }
    s
}

fn render_targets(
    d: &Datapath,
    flat: &[Connect],
    nat: Option<&NatRun>,
    idle16: Option<&Idle>,
) -> String {
    let mut t = Table::new(["target", "measured", "verdict"]);
    let evio = evio_row(d);
    let vx = d.rows.iter().find(|r| r.label.starts_with("kernel VXLAN"));
    let bt = best_bt(d);
    let e1 = evio.map_or(f64::NAN, |r| r.single);
    match bt {
        Some(b) => {
            let r = e1 / b.single;
            t.row([
                "single stream ≥ 3× boringtun (its best)".to_string(),
                format!("{r:.2}× ({} vs {} Gbit/s)", f2(e1), f2(b.single)),
                at_least(r, 3.0),
            ]);
        }
        None => t.row([
            "single stream ≥ 3× boringtun (its best)".to_string(),
            d.boringtun_note.clone().unwrap_or_else(|| "not run".into()),
            "n/a".into(),
        ]),
    }
    if let Some(v) = vx {
        let r = e1 / v.single;
        t.row([
            "single stream ≥ 0.2× kernel VXLAN".to_string(),
            format!("{r:.2}× ({} vs {} Gbit/s)", f2(e1), f2(v.single)),
            at_least(r, 0.2),
        ]);
    }
    if let Some(e) = evio {
        let a = median(&e.rtt) - plain_rtt(d);
        t.row([
            "added RTT ≤ 0.1 ms (median)".to_string(),
            format!("{} ms", f3(a)),
            verdict(a, 0.1),
        ]);
    }
    match (
        evio.and_then(|e| e.proc_per_gb),
        bt.and_then(|b| b.proc_per_gb),
    ) {
        (Some(e), Some(b)) => t.row([
            "agent CPU per GB ≤ boringtun's".to_string(),
            format!("{} vs {} s/GB ({:.2}×)", f2(e), f2(b), e / b),
            verdict(e / b, 1.0),
        ]),
        (Some(e), None) => t.row([
            "agent CPU per GB ≤ boringtun's".to_string(),
            format!("{} s/GB; boringtun not measured", f2(e)),
            "n/a".into(),
        ]),
        _ => {}
    }
    if !flat.is_empty() {
        let v: Vec<f64> = dsecs(&flat.iter().map(|c| c.all).collect::<Vec<_>>());
        let n = flat[0].nodes;
        t.row([
            format!("{n} nodes (no NAT) all connected ≤ 2 s"),
            format!(
                "median {} s, worst {} s over {} round(s)",
                f2(median(&v)),
                f2(max(&v)),
                v.len()
            ),
            within(max(&v), 2.0),
        ]);
    }
    if let Some(n) = nat {
        // Pairs that do not end direct need the relay; one that never
        // connected counts as never.
        let relayed: Vec<&PairTime> = n
            .connect
            .pairs
            .iter()
            .filter(|p| p.path.as_deref() != Some("direct"))
            .collect();
        let v = dsecs(&relayed.iter().map(|p| p.connected).collect::<Vec<_>>());
        let never = relayed.iter().filter(|p| p.connected.is_none()).count();
        if v.is_empty() {
            t.row(["relayed pairs connected ≤ 5 s", "no relayed pair", "n/a"]);
        } else {
            t.row([
                "relayed pairs connected ≤ 5 s".to_string(),
                format!(
                    "max {} over {} pair(s) not ending direct{}",
                    secs_or_never(max(&v)),
                    v.len(),
                    if never > 0 {
                        format!(", {never} never connected within 30 s")
                    } else {
                        String::new()
                    }
                ),
                within(max(&v), 5.0),
            ]);
        }
        let r = dsecs(&n.recovery.iter().map(|r| r.took).collect::<Vec<_>>());
        if !r.is_empty() {
            t.row([
                "recovery after conntrack flush ≤ 10 s".to_string(),
                format!("worst {} s, median {} s", f2(max(&r)), f2(median(&r))),
                within(max(&r), 10.0),
            ]);
        }
    }
    if let Some(i) = idle16 {
        let p = i.pct.first().copied().unwrap_or(f64::NAN);
        t.row([
            format!(
                "idle ≤ 0.5 % of a core with {} peers (node-0's agent)",
                i.nodes.saturating_sub(1)
            ),
            format!("{} % (all agents: max {} %)", f3(p), f3(max(&i.pct))),
            verdict(p, 0.5),
        ]);
    }
    format!("\n### Targets\n\n{}", t.render())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_read_past_the_command() {
        let s = "1234 (evio (x) y) S 1 2 3 4 5 6 7 8 9 10 250 37 0 0 20 0 5 0 100 1000 50";
        assert_eq!(stat_ticks(s), Some(287));
        assert_eq!(stat_ticks("garbage"), None);
    }

    #[test]
    fn proc_status_and_stat_are_parsed() {
        let st = "Name:\tevio-node\nVmRSS:\t   12345 kB\nvoluntary_ctxt_switches:\t17\n";
        assert_eq!(status_kib(st, "VmRSS"), Some(12345));
        assert_eq!(status_kib(st, "voluntary_ctxt_switches"), Some(17));
        assert_eq!(status_kib(st, "VmHWM"), None);
        let m = "cpu  10 1 5 1000 7 2 3 50 0 0\ncpu0 1 1 1 1 1 1 1 1 0 0\n";
        assert_eq!(machine_busy_ticks(m), Some(21));
    }

    #[test]
    fn arp_table_fulls_are_summed_over_cpus() {
        let s =
            "entries  allocs table_fulls\n00000000 0000000a 00000010\n00000000 00000001 00000002\n";
        assert_eq!(arp_table_fulls(s), 18);
        assert_eq!(arp_table_fulls(""), 0);
    }

    #[test]
    fn ping_replies_are_collected() {
        let o = "PING 10.0.0.1 (10.0.0.1) 56(84) bytes of data.\n\
                 64 bytes from 10.0.0.1: icmp_seq=1 ttl=64 time=0.045 ms\n\
                 64 bytes from 10.0.0.1: icmp_seq=2 ttl=64 time=1.10 ms\n\n\
                 rtt min/avg/max/mdev = 0.045/0.5/1.1/0.4 ms\n";
        assert_eq!(ping_times(o), vec![0.045, 1.10]);
    }

    #[test]
    fn medians_skip_nothing_but_non_finite() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
        assert_eq!(median(&[1.0, f64::INFINITY, f64::INFINITY]), f64::INFINITY);
        assert_eq!(
            within(f64::INFINITY, 1.0),
            "MISSED (never happened within the run)"
        );
        assert_eq!(max(&[1.0, f64::INFINITY]), f64::INFINITY);
    }
}
