//! Section 1: per-pod ADD and DEL latency, reference vs evio, sequential and
//! concurrent, next to the floors (process spawn, host-local exec).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use evio_testkit::netns::Netns;
use serde_json::json;

use crate::cleanup;
use crate::error::{BenchError, Result};
use crate::exec::{self, Spec};
use crate::node::{label, Attach, Mode, Node, Tools, CNI_VERSION};
use crate::report::Table;
use crate::stats::{ms, ratio_d, Summary};
use evio_net::Handle;

#[derive(Debug, Clone)]
pub struct Opts {
    pub pods: usize,
    pub concurrency: usize,
}

/// ADD and DEL timings of one phase; index i is pod i.
#[derive(Debug, Clone, Default)]
pub struct Phase {
    pub add: Vec<Duration>,
    pub del: Vec<Duration>,
    pub add_wall: Duration,
    pub del_wall: Duration,
    /// CPU time (user+sys, incl. the IPAM child) of each ADD / DEL.
    pub add_cpu: Vec<Duration>,
    pub del_cpu: Vec<Duration>,
}

impl Phase {
    /// Per-pod ADD+DEL of the same pod.
    pub fn sum(&self) -> Vec<Duration> {
        add_del(&self.add, &self.del)
    }
}

/// Per-pod ADD+DEL: the `i`th DEL undid the `i`th ADD.
fn add_del(add: &[Duration], del: &[Duration]) -> Vec<Duration> {
    add.iter().zip(del).map(|(a, d)| *a + *d).collect()
}

/// The median and p95 of ADD, DEL and ADD+DEL, as table cells; and the
/// ADD+DEL median.
fn timing_cells(add: &[Duration], del: &[Duration]) -> ([String; 6], Duration) {
    let (a, d) = (Summary::of(add), Summary::of(del));
    let s = Summary::of(&add_del(add, del));
    let cells = [
        ms(a.median),
        ms(a.p95),
        ms(d.median),
        ms(d.p95),
        ms(s.median),
        ms(s.p95),
    ];
    (cells, s.median)
}

#[derive(Debug, Clone)]
pub struct ModeResult {
    pub mode: Mode,
    pub masq: bool,
    pub seq: Phase,
    pub conc: Phase,
}

/// Runs `job(i)` for i in 0..n on `workers` threads; returns each job's
/// duration (by index) and the wall time of the whole set. Stops at the
/// first error.
pub fn fan_out(
    n: usize,
    workers: usize,
    job: impl Fn(usize) -> Result<Duration> + Sync,
) -> Result<(Vec<Duration>, Duration)> {
    let next = AtomicUsize::new(0);
    let times = Mutex::new(vec![Duration::ZERO; n]);
    let error: Mutex<Option<BenchError>> = Mutex::new(None);
    let failed = || error.lock().map(|e| e.is_some()).unwrap_or(true);
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..workers.clamp(1, n.max(1)) {
            s.spawn(|| loop {
                if failed() {
                    return;
                }
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= n {
                    return;
                }
                match cleanup::check().and_then(|()| job(i)) {
                    Ok(d) => {
                        if let Ok(mut t) = times.lock() {
                            t[i] = d;
                        }
                    }
                    Err(e) => {
                        if let Ok(mut slot) = error.lock() {
                            slot.get_or_insert(e);
                        }
                        return;
                    }
                }
            });
        }
    });
    let wall = start.elapsed();
    if let Some(e) = error.into_inner().ok().flatten() {
        return Err(e);
    }
    let times = times
        .into_inner()
        .map_err(|_| BenchError::failed("collect timings", "a worker panicked"))?;
    Ok((times, wall))
}

/// All pods ADDed, then all DELeted, `workers` at a time, with checks that
/// the node really holds N attachments in between and none after.
fn phase(node: &Node, pods: &[Netns], workers: usize) -> Result<Phase> {
    let atts: Vec<Attach> = pods.iter().map(Attach::new).collect();
    let n = atts.len();
    let label = node.label();
    let add_cpu = Mutex::new(vec![Duration::ZERO; n]);
    let del_cpu = Mutex::new(vec![Duration::ZERO; n]);
    let timed = |cpu: &Mutex<Vec<Duration>>, i: usize, o: crate::exec::Outcome| {
        if let Ok(mut c) = cpu.lock() {
            c[i] = o.cpu;
        }
        o.wall
    };
    let (add, add_wall) = fan_out(n, workers, |i| {
        node.add(&atts[i]).map(|o| timed(&add_cpu, i, o))
    })?;
    let veths = node.veth_count()?;
    if veths != n {
        return Err(BenchError::failed(
            format!("{label} after {n} ADDs"),
            format!("the node has {veths} veths, expected {n}"),
        ));
    }
    let (del, del_wall) = fan_out(n, workers, |i| {
        node.del(&atts[i]).map(|o| timed(&del_cpu, i, o))
    })?;
    let (veths, ips) = (node.veth_count()?, node.ipam_count());
    if veths != 0 || ips != 0 {
        return Err(BenchError::failed(
            format!("{label} after {n} DELs"),
            format!("{veths} veths and {ips} IPAM allocations left behind"),
        ));
    }
    Ok(Phase {
        add,
        del,
        add_wall,
        del_wall,
        add_cpu: add_cpu.into_inner().unwrap_or_default(),
        del_cpu: del_cpu.into_inner().unwrap_or_default(),
    })
}

fn bench_mode(
    mode: Mode,
    masq: bool,
    tools: &Tools,
    pods: &[Netns],
    opts: &Opts,
) -> Result<ModeResult> {
    let node = Node::with_masq(mode, tools, 3, masq)?;
    // The first ADD creates the bridge; every later pod finds it. Measured
    // pods are the steady state, as on a node that already runs pods.
    let warm = Attach::new(&pods[0]);
    node.add(&warm)?;
    node.del(&warm)?;
    let seq = phase(&node, pods, 1)?;
    cleanup::check()?;
    let conc = phase(&node, pods, opts.concurrency)?;
    Ok(ModeResult {
        mode,
        masq,
        seq,
        conc,
    })
}

/// Floors, all exec'd into a node namespace exactly like the plugins.
#[derive(Debug, Clone, Default)]
pub struct Floors {
    pub spawn: Vec<Duration>,
    pub evio_version: Vec<Duration>,
    pub bridge_version: Vec<Duration>,
    /// host-local ADD then DEL with the plugins' config, per pod.
    pub hl_add: Vec<Duration>,
    pub hl_del: Vec<Duration>,
    /// The kernel's part alone: one RTM_NEWLINK creating a veth pair from
    /// the pod into the node, and one RTM_DELLINK deleting it, from this
    /// process (no exec).
    pub veth_add: Vec<Duration>,
    pub veth_del: Vec<Duration>,
    /// ipMasq's part alone, from this process in the node namespace: the
    /// check every ADD makes (is the network's masquerade chain as wanted?)
    /// and the rewrite (one nf_tables batch) it makes when it is not.
    pub masq_check: Vec<Duration>,
    pub masq_write: Vec<Duration>,
}

/// Runs `f` on a fresh thread that first enters `ns` and ends with `f`, so
/// no thread of this process is left in a foreign namespace.
fn in_netns<T: Send>(ns: &evio_net::NetnsFd, f: impl FnOnce() -> T + Send) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(move || {
            nix::sched::setns(ns.fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| BenchError::failed("setns", e.to_string()))?;
            Ok(f())
        })
        .join()
        .map_err(|_| BenchError::failed("netns worker", "panicked"))?
    })
}

/// Creates and deletes a veth pair per pod the way a plugin does, timing
/// each netlink request.
fn kernel_floor(node: &Node, pods: &[Netns], f: &mut Floors) -> Result<()> {
    let node_ns =
        evio_net::NetnsFd::open(&node.ns.path()).map_err(BenchError::net("open node netns"))?;
    for (i, pod) in pods.iter().enumerate() {
        cleanup::check()?;
        let pod_ns =
            evio_net::NetnsFd::open(&pod.path()).map_err(BenchError::net("open pod netns"))?;
        let host = format!("evkf{i}");
        let t = in_netns(&pod_ns, || -> Result<Duration> {
            let mut h = Handle::new().map_err(BenchError::net("netlink in pod"))?;
            let start = Instant::now();
            h.create_veth("eth0", &host, node_ns.fd(), 1500, None)
                .map_err(BenchError::net(format!("create veth eth0/{host}")))?;
            Ok(start.elapsed())
        })??;
        f.veth_add.push(t);
        let t = in_netns(&node_ns, || -> Result<Duration> {
            let mut h = Handle::new().map_err(BenchError::net("netlink in node"))?;
            let start = Instant::now();
            h.delete_link_by_name(&host)
                .map_err(BenchError::net(format!("delete {host}")))?;
            Ok(start.elapsed())
        })??;
        f.veth_del.push(t);
    }
    let cidrs = ["10.244.0.0/16"
        .parse::<ipnet::IpNet>()
        .map_err(|e| BenchError::failed("pod CIDR", e.to_string()))?];
    in_netns(&node_ns, || -> Result<()> {
        for i in 0..pods.len() {
            cleanup::check()?;
            // A new network each time, so every write creates its chain as
            // a node's first ipMasq ADD does; every check then finds it.
            let net = format!("bench{i}");
            let start = Instant::now();
            evio_net::nft::ensure_masquerade(&net, &cidrs)
                .map_err(BenchError::net(format!("masquerade {net}")))?;
            f.masq_write.push(start.elapsed());
            let start = Instant::now();
            let have = evio_net::nft::masquerade_cidrs(&net)
                .map_err(BenchError::net(format!("list masquerade {net}")))?;
            f.masq_check.push(start.elapsed());
            if have.as_deref() != Some(&cidrs[..]) {
                return Err(BenchError::failed(
                    format!("masquerade {net}"),
                    format!("reads back as {have:?}"),
                ));
            }
        }
        Ok(())
    })??;
    Ok(())
}

fn floors(tools: &Tools, pods: &[Netns]) -> Result<Floors> {
    // A Linux-bridge node, only for its namespace and IPAM directory.
    let node = Node::new(Mode::EvioLinux, tools, 3)?;
    let mut f = Floors::default();
    let version = json!({ "cniVersion": CNI_VERSION })
        .to_string()
        .into_bytes();
    for _ in pods {
        cleanup::check()?;
        let t = exec::run(&Spec::new("/bin/true").netns(&node.fd))?.ok("/bin/true")?;
        f.spawn.push(t.wall);
        for (prog, out) in [
            (&tools.evio, &mut f.evio_version),
            (&tools.bridge(), &mut f.bridge_version),
        ] {
            let spec = Spec::new(prog)
                .env("CNI_COMMAND", "VERSION")
                .stdin(version.clone())
                .netns(&node.fd);
            let o = exec::run(&spec)?.ok(&format!("{} VERSION", prog.display()))?;
            out.push(o.wall);
        }
    }
    let atts: Vec<Attach> = pods.iter().map(Attach::new).collect();
    let hl = tools.host_local();
    for (cmd, out) in [("ADD", &mut f.hl_add), ("DEL", &mut f.hl_del)] {
        for a in &atts {
            cleanup::check()?;
            let spec = node.spec_for(&hl, cmd, a, &node.conf);
            let o = exec::run(&spec)?.ok(&format!("host-local {cmd}"))?;
            out.push(o.wall);
        }
    }
    if node.ipam_count() != 0 {
        return Err(BenchError::failed(
            "host-local floor",
            "allocations left after DEL",
        ));
    }
    kernel_floor(&node, pods, &mut f)?;
    Ok(f)
}

pub fn run(tools: &Tools, opts: &Opts) -> Result<String> {
    tools.require(&[&tools.evio, &tools.bridge(), &tools.host_local()])?;
    if opts.pods == 0 {
        return Err(BenchError::failed("latency", "--pods must be at least 1"));
    }
    let pods: Vec<Netns> = (0..opts.pods).map(|_| cleanup::netns("ebp")).collect();
    let floors = floors(tools, &pods)?;
    let mut results = Vec::new();
    for masq in [false, true] {
        for mode in [Mode::Reference, Mode::EvioLinux, Mode::EvioOvs] {
            cleanup::check()?;
            results.push(bench_mode(mode, masq, tools, &pods, opts)?);
        }
    }
    Ok(render(opts, &floors, &results))
}

fn phase_table(results: &[ModeResult], floor: &[Duration], conc: bool) -> Table {
    let mut t = Table::new([
        "plugin",
        "ADD median",
        "ADD p95",
        "DEL median",
        "DEL p95",
        "ADD+DEL median",
        "ADD+DEL p95",
        "ADD+DEL vs reference",
        "ADD+DEL vs host-local floor",
        "all ADDs / all DELs (wall)",
    ]);
    let floor = Summary::of(floor).median;
    for r in results {
        let reference = results
            .iter()
            .find(|x| x.mode == Mode::Reference && x.masq == r.masq)
            .map(|x| Summary::of(&pick(x, conc).sum()).median);
        let p = pick(r, conc);
        let (cells, sum) = timing_cells(&p.add, &p.del);
        t.row(std::iter::once(label(r.mode, r.masq)).chain(cells).chain([
            reference.map_or("n/a".into(), |x| ratio_d(sum, x)),
            ratio_d(sum, floor),
            format!("{} / {}", ms(p.add_wall), ms(p.del_wall)),
        ]));
    }
    t
}

fn pick(r: &ModeResult, conc: bool) -> &Phase {
    if conc {
        &r.conc
    } else {
        &r.seq
    }
}

/// One target line: measured ratio, target, and whether (and by how much)
/// it is missed.
pub fn verdict(measured: f64, target: f64) -> String {
    if !measured.is_finite() {
        return "n/a".into();
    }
    if measured <= target {
        "met".into()
    } else {
        let by = measured / target;
        // Near the target one decimal would say "by 1.0×".
        let by = if by < 1.1 {
            format!("{by:.2}")
        } else {
            format!("{by:.1}")
        };
        format!("MISSED by {by}× ({measured:.2} vs ≤ {target})")
    }
}

fn render(opts: &Opts, f: &Floors, results: &[ModeResult]) -> String {
    let floor_sum: Vec<Duration> = f
        .hl_add
        .iter()
        .zip(&f.hl_del)
        .map(|(a, d)| *a + *d)
        .collect();
    let mut out = format!(
        "{} pods per plugin configuration, each ADDed then DELeted inside one simulated node (a netns; \
         OVS with its own ovsdb-server/vswitchd for evio ovs); every pod is its own netns. \
         One untimed warm-up pod first creates the bridge. Times are per plugin process, \
         fork to reap, in ms; the plugin enters the node netns itself (setns before exec), as a \
         runtime's child would be there already. The host-local floor is host-local exec'd \
         directly with the same config and environment (ADD then DEL). Every configuration \
         runs twice: `ipMasq` off (both plugins' default) and on (the reference then runs \
         iptables; evio reads the network's masquerade chain over nf_tables netlink and \
         rewrites it, one netlink batch, only when it differs: no program is run).\n\n",
        opts.pods
    );
    out.push_str("### Sequential (one pod at a time)\n\n");
    let mut seq = phase_table(results, &floor_sum, false);
    floor_row(&mut seq, f);
    out.push_str(&seq.render());
    out.push_str(
        "\n#### Where the sequential time goes: CPU vs waiting\n\nCPU is user+system time \
         from wait4 (the plugin and the children it waited for: host-local, iptables); \
         the rest of the wall time the process sat blocked (kernel waits such as RCU grace \
         periods, IPC with OVS, children's exec).\n\n",
    );
    let mut t = Table::new([
        "plugin",
        "ADD wall",
        "ADD CPU",
        "DEL wall",
        "DEL CPU",
        "blocked share of ADD+DEL",
    ]);
    for r in results {
        let p = &r.seq;
        let (aw, ac, dw, dc) = (
            Summary::of(&p.add).median,
            Summary::of(&p.add_cpu).median,
            Summary::of(&p.del).median,
            Summary::of(&p.del_cpu).median,
        );
        let wall = (aw + dw).as_secs_f64();
        let blocked = if wall > 0.0 {
            format!(
                "{:.0}%",
                100.0 * (1.0 - (ac + dc).as_secs_f64() / wall).max(0.0)
            )
        } else {
            "n/a".into()
        };
        t.row([
            label(r.mode, r.masq),
            ms(aw),
            ms(ac),
            ms(dw),
            ms(dc),
            blocked,
        ]);
    }
    out.push_str(&t.render());
    out.push_str(&format!(
        "\n### {}-way concurrent\n\n",
        opts.concurrency.min(opts.pods)
    ));
    out.push_str(&phase_table(results, &floor_sum, true).render());

    out.push_str("\n### Start-up floors (median of the same count, ms)\n\n");
    let mut t = Table::new(["exec", "median", "p95"]);
    for (label, v) in [
        ("/bin/true (fork+setns+exec+reap)", &f.spawn),
        ("evio VERSION (start-up, parse, print)", &f.evio_version),
        ("reference bridge VERSION", &f.bridge_version),
        ("host-local ADD", &f.hl_add),
        ("host-local DEL", &f.hl_del),
        (
            "kernel: create veth pair (one netlink request)",
            &f.veth_add,
        ),
        (
            "kernel: delete veth pair (one netlink request)",
            &f.veth_del,
        ),
        (
            "kernel: ipMasq check, as every ADD (nf_tables chain + rule dump)",
            &f.masq_check,
        ),
        (
            "kernel: ipMasq rewrite, first ADD (one nf_tables batch)",
            &f.masq_write,
        ),
    ] {
        let s = Summary::of(v);
        t.row([label.to_string(), ms(s.median), ms(s.p95)]);
    }
    out.push_str(&t.render());

    out.push_str(&targets(f, results));
    out
}

/// The floors the ADD and DEL targets are measured against, in seconds:
/// what any plugin that execs host-local and creates (deletes) the veth
/// itself cannot go below.
pub fn op_floors(f: &Floors) -> (f64, f64) {
    let m = |v: &[Duration]| Summary::of(v).median.as_secs_f64();
    (
        m(&f.hl_add) + m(&f.evio_version) + m(&f.veth_add),
        m(&f.hl_del) + m(&f.veth_del),
    )
}

fn targets(f: &Floors, results: &[ModeResult]) -> String {
    let get = |m: Mode, masq: bool| results.iter().find(|r| r.mode == m && r.masq == masq);
    let med = |m: Mode, masq: bool, conc: bool, v: fn(&Phase) -> Vec<Duration>| {
        get(m, masq)
            .map(|r| Summary::of(&v(pick(r, conc))).median.as_secs_f64())
            .unwrap_or(f64::NAN)
    };
    let add: fn(&Phase) -> Vec<Duration> = |p| p.add.clone();
    let del: fn(&Phase) -> Vec<Duration> = |p| p.del.clone();
    let sum: fn(&Phase) -> Vec<Duration> = |p| p.sum();
    let (add_floor, del_floor) = op_floors(f);
    let hl_floor = Summary::of(
        &f.hl_add
            .iter()
            .zip(&f.hl_del)
            .map(|(a, d)| *a + *d)
            .collect::<Vec<_>>(),
    )
    .median
    .as_secs_f64();
    let mut out = format!(
        "\n### Targets\n\nADD floor = host-local ADD + evio start (`evio VERSION`) + one veth \
         creation = {} ms; DEL floor = host-local DEL + one veth deletion = {} ms (medians of \
         the start-up floors above, measured sequentially: the concurrent columns compare \
         against the same floors). ipMasq's cost is the ADD (or ADD+DEL) median with ipMasq \
         minus without, same plugin.\n\n",
        ms(Duration::from_secs_f64(add_floor)),
        ms(Duration::from_secs_f64(del_floor)),
    );
    let mut t = Table::new(["target", "sequential", "verdict", "concurrent", "verdict"]);
    for masq in [false, true] {
        let cfg = if masq { ", ipMasq" } else { "" };
        for mode in [Mode::EvioLinux, Mode::EvioOvs] {
            for (what, v, floor) in [("ADD", add, add_floor), ("DEL", del, del_floor)] {
                let mut cells = vec![format!("{}{cfg}: {what} ≤ 1.3× floor", mode.label())];
                for conc in [false, true] {
                    let r = med(mode, masq, conc, v) / floor;
                    cells.push(format!("{r:.2}×"));
                    cells.push(verdict(r, 1.3));
                }
                t.row(cells);
            }
        }
    }
    for mode in [Mode::EvioLinux, Mode::EvioOvs] {
        let mut cells = vec![format!(
            "{}: ADD with ipMasq vs without ≤ 1 ms",
            mode.label()
        )];
        for conc in [false, true] {
            let d = (med(mode, true, conc, add) - med(mode, false, conc, add)) * 1000.0;
            cells.push(format!("{d:.2} ms"));
            cells.push(verdict(d, 1.0));
        }
        t.row(cells);
    }
    for mode in [Mode::EvioLinux, Mode::EvioOvs] {
        let mut cells = vec![format!("{}: ipMasq adds ≤ 0.5 ms (ADD+DEL)", mode.label())];
        for conc in [false, true] {
            let d = (med(mode, true, conc, sum) - med(mode, false, conc, sum)) * 1000.0;
            cells.push(format!("{d:.2} ms"));
            cells.push(verdict(d, 0.5));
        }
        t.row(cells);
    }
    for masq in [false, true] {
        let cfg = if masq { ", both ipMasq" } else { "" };
        for (what, num, den, target) in [
            (
                "evio linux ≤ 3× host-local floor",
                Mode::EvioLinux,
                None,
                3.0,
            ),
            ("evio ovs ≤ 3× host-local floor", Mode::EvioOvs, None, 3.0),
            (
                "evio ovs ≤ 1.5× evio linux (issue 3)",
                Mode::EvioOvs,
                Some(Mode::EvioLinux),
                1.5,
            ),
        ] {
            let mut cells = vec![format!("{what} (ADD+DEL){cfg}")];
            for conc in [false, true] {
                let d = match den {
                    Some(m) => med(m, masq, conc, sum),
                    // The floor is measured sequentially only.
                    None => hl_floor,
                };
                let r = med(num, masq, conc, sum) / d;
                cells.push(format!("{r:.2}×"));
                cells.push(verdict(r, target));
            }
            t.row(cells);
        }
    }
    out.push_str(&t.render());
    out
}

fn floor_row(t: &mut Table, f: &Floors) {
    let (cells, _) = timing_cells(&f.hl_add, &f.hl_del);
    t.row(
        std::iter::once("host-local alone (floor)".to_string())
            .chain(cells)
            .chain([String::new(), "1.00×".into(), String::new()]),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fan_out_runs_every_job_once_and_keeps_order() {
        let seen = Mutex::new(Vec::new());
        let (t, _) = fan_out(20, 4, |i| {
            seen.lock().unwrap().push(i);
            Ok(Duration::from_millis(i as u64))
        })
        .unwrap();
        let mut s = seen.into_inner().unwrap();
        s.sort();
        assert_eq!(s, (0..20).collect::<Vec<_>>());
        assert_eq!(t[7], Duration::from_millis(7));
    }

    #[test]
    fn fan_out_stops_at_the_first_error() {
        let count = AtomicUsize::new(0);
        let r = fan_out(100, 1, |i| {
            count.fetch_add(1, Ordering::SeqCst);
            if i == 3 {
                Err(BenchError::failed("job", "boom"))
            } else {
                Ok(Duration::ZERO)
            }
        });
        assert!(matches!(r, Err(BenchError::Failed { .. })));
        assert_eq!(count.load(Ordering::SeqCst), 4);
    }

    #[test]
    fn verdicts_say_by_how_much() {
        assert_eq!(verdict(0.1, 0.15), "met");
        assert_eq!(verdict(0.3, 0.15), "MISSED by 2.0× (0.30 vs ≤ 0.15)");
        assert_eq!(verdict(f64::NAN, 1.0), "n/a");
        assert_eq!(verdict(1.34, 1.3), "MISSED by 1.03× (1.34 vs ≤ 1.3)");
    }
}
