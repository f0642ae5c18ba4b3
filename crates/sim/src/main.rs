//! `evio-sim up`: brings up a simulated evio cluster on this machine (one
//! network namespace with its own Open vSwitch per node, pods attached by the
//! real `evio` plugin, subnets from the real `evio-node config-gen`), prints
//! it and a pod-to-pod reachability matrix, then tears everything down, also
//! on failure, Ctrl-C or SIGTERM.

mod services;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};
use evio_testkit::cluster::{
    emergency_cleanup, BridgeType, Cluster, ClusterError, ClusterOpts, OverlayOpts,
};
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

#[derive(Debug, thiserror::Error)]
enum SimError {
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("cannot install the signal handler: {0}")]
    Signals(nix::Error),
    #[error("Services row: {0}")]
    Services(String),
    #[error("cannot locate the evio-sim executable (to find the binaries next to it): {0}")]
    SelfPath(std::io::Error),
}

#[derive(Parser)]
#[command(name = "evio-sim", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Bring up a simulated cluster, print its nodes, pods and reachability
    /// matrix, then tear it down. Exits non-zero if any probe fails.
    Up(UpArgs),
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Store {
    File,
    Etcd,
}

/// How kube-proxy programs the nodes for the Services row.
#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum KubeProxy {
    Iptables,
    Nftables,
    /// No Services row.
    None,
}

#[derive(Clone, Copy, ValueEnum)]
enum Bridge {
    Ovs,
    Linux,
}

#[derive(Args)]
struct UpArgs {
    /// No NAT: the nodes have public addresses on one routed internet (still
    /// joined by the agent's encrypted tunnels).
    #[arg(long, conflicts_with = "plain_link")]
    no_nat: bool,
    /// No overlay agent: node bridges joined by a plain link (the
    /// pre-overlay topology, for comparison).
    #[arg(long)]
    plain_link: bool,
    /// Number of simulated nodes [default: one per place of the NAT lab's
    /// sites (`OverlayOpts::nat_lab()`: 10, the ninth behind a miniupnpd
    /// router, the tenth dual-stack), 3 otherwise]; fewer takes the first
    /// sites only. More than 32 (up to 256, the seed's `nodeBits: 8`):
    /// the routed scale lab instead (one /24 per node behind one router, no
    /// NAT, etcd, Linux bridges, one pod per node unless asked otherwise),
    /// and sampled pairs instead of the full matrices.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=256))]
    nodes: Option<u16>,
    /// The cluster store: the embedded file store, or etcd in the lab's
    /// internet namespace [default: file; etcd beyond 32 nodes].
    #[arg(long, value_enum)]
    store: Option<Store>,
    /// Pods per node [default: 2; 1 beyond 32 nodes].
    #[arg(long, value_parser = clap::value_parser!(u16).range(0..=32))]
    pods: Option<u16>,
    /// Node bridge type (the plugin's `bridgeType`) [default: ovs; linux
    /// beyond 32 nodes, where an Open vSwitch per node would take most of
    /// this machine's memory and CPU before any pod exists].
    #[arg(long, value_enum)]
    bridge_type: Option<Bridge>,
    /// Cluster pod CIDR (`podCIDR`).
    #[arg(long, default_value = "10.244.0.0/16")]
    pod_cidr: String,
    /// Bits of the pod CIDR that number the nodes (`nodeBits`).
    #[arg(long, default_value_t = 8)]
    node_bits: u8,
    /// kube-proxy's mode for the Services row (its rules in every node
    /// netns, a ClusterIP per node backed by a pod on the next node, dnsmasq
    /// as the cluster DNS); `none` skips the row.
    #[arg(long, value_enum, default_value_t = KubeProxy::Iptables)]
    kube_proxy: KubeProxy,
    /// Keep the cluster up for inspection until Ctrl-C / SIGTERM.
    #[arg(long)]
    keep: bool,
    /// The `evio` plugin executable [default: next to evio-sim].
    #[arg(long, env = "EVIO_BIN")]
    evio: Option<PathBuf>,
    /// The `evio-node` executable [default: next to evio-sim].
    #[arg(long, env = "EVIO_NODE_BIN")]
    evio_node: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cancel = Arc::new(AtomicBool::new(false));
    if let Err(e) = install_signal_handler(cancel.clone()) {
        eprintln!("evio-sim: {e}");
        return ExitCode::from(2);
    }
    install_panic_cleanup();
    let cli = Cli::parse();
    match cli.command {
        Cmd::Up(args) => match up(args, cancel.clone()) {
            Ok(code) => code,
            // Teardown problems are reported whatever caused the teardown.
            Err(e @ SimError::Cluster(ClusterError::Teardown(_))) => {
                eprintln!("evio-sim: {e}");
                ExitCode::from(2)
            }
            // A signal also reaches the commands we run (same process group),
            // so the step that failed failed because of the interruption.
            Err(_) if cancel.load(Ordering::Relaxed) || SIGNALLED.load(Ordering::Relaxed) => {
                eprintln!("evio-sim: interrupted; everything was torn down");
                ExitCode::from(130)
            }
            Err(e) => {
                eprintln!("evio-sim: {e}");
                ExitCode::from(2)
            }
        },
    }
}

/// Beyond this many nodes `up` runs the routed scale lab and probes
/// samples: the NAT lab's sites share L2 segments (the kernel's one neighbour
/// table, 1024 entries for every namespace, overflows at about 33 nodes on
/// one segment), and the full matrices grow with n² (65 280 pod pairs at
/// 256 nodes).
const FULL_MATRIX_MAX: u16 = 32;
/// Random pairs probed beyond [`FULL_MATRIX_MAX`] nodes (pods, and nodes
/// over the host overlay).
const SAMPLED_PAIRS: usize = 100;

fn up(args: UpArgs, cancel: Arc<AtomicBool>) -> Result<ExitCode, SimError> {
    let large = args.nodes.is_some_and(|n| n > FULL_MATRIX_MAX);
    if large && args.plain_link {
        eprintln!(
            "evio-sim: --plain-link joins at most {FULL_MATRIX_MAX} nodes (one L2 segment); \
             larger clusters need the agent"
        );
        return Ok(ExitCode::from(2));
    }
    let here = std::env::current_exe()
        .map_err(SimError::SelfPath)?
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default();
    let mut opts = ClusterOpts::new(
        args.evio.unwrap_or_else(|| here.join("evio")),
        args.evio_node.unwrap_or_else(|| here.join("evio-node")),
    );
    opts.pods_per_node = usize::from(args.pods.unwrap_or(if large { 1 } else { 2 }));
    opts.overlay = if large {
        // --no-nat or not: the routed lab has no NAT either way.
        Some(OverlayOpts::routed(usize::from(
            args.nodes.unwrap_or(FULL_MATRIX_MAX),
        )))
    } else if args.plain_link {
        None
    } else if args.no_nat {
        Some(OverlayOpts::flat(usize::from(args.nodes.unwrap_or(3))))
    } else {
        let mut o = OverlayOpts::nat_lab();
        if let Some(n) = args.nodes {
            // More nodes than the lab's sites: extra ones join the first
            // (cone) site; fewer: the first sites only.
            let mut left = usize::from(n);
            let mut sites = Vec::new();
            for (nat, count) in o.sites {
                let take = count.min(left);
                if take > 0 {
                    sites.push((nat, take));
                }
                left -= take;
            }
            if left > 0 {
                sites[0].1 += left;
            }
            o.sites = sites;
            let n = o.sites.len();
            o.ipv6_sites.retain(|&s| s < n);
        }
        Some(o)
    };
    let store = args
        .store
        .unwrap_or(if large { Store::Etcd } else { Store::File });
    if let Some(o) = opts.overlay.as_mut() {
        o.etcd = store == Store::Etcd;
        if args.no_nat {
            o.turn = false;
        }
    }
    opts.nodes = match &opts.overlay {
        Some(o) => o.nodes(),
        None => usize::from(args.nodes.unwrap_or(3)),
    };
    let bridge = args
        .bridge_type
        .unwrap_or(if large { Bridge::Linux } else { Bridge::Ovs });
    opts.bridge_type = match bridge {
        Bridge::Ovs => BridgeType::Ovs,
        Bridge::Linux => BridgeType::Linux,
    };
    opts.pod_cidr = args.pod_cidr;
    opts.node_bits = args.node_bits;
    opts.cancel = Some(cancel.clone());
    if args.kube_proxy != KubeProxy::None {
        // As the DaemonSet's ConfigMap: pods route ClusterIPs to their
        // node's gateway, where kube-proxy's DNAT is.
        opts.netconf = vec![
            ("isDefaultGateway".into(), true.into()),
            ("ipMasq".into(), true.into()),
        ];
    }

    let topology = match &opts.overlay {
        None => "joined by a plain link".to_string(),
        Some(_) if large => format!(
            "joined by evio-node agent, routed scale lab (one /24 per node behind one router, \
             no NAT; more than {FULL_MATRIX_MAX} nodes: {SAMPLED_PAIRS} random pod pairs and \
             {SAMPLED_PAIRS} random node pairs are probed instead of the full matrices, and the \
             Services row is skipped)"
        ),
        Some(o)
            if o.sites
                .iter()
                .all(|(n, _)| *n == evio_testkit::natlab::NatType::Public) =>
        {
            "joined by evio-node agent, no NAT".to_string()
        }
        Some(o) => format!(
            "joined by evio-node agent across NATs ({})",
            o.sites
                .iter()
                .map(|(n, c)| format!("{c}×{n}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    eprintln!(
        "evio-sim: bringing up {} node(s) × {} pod(s) on {} bridges ({}, nodeBits {}), {topology}…",
        opts.nodes, opts.pods_per_node, opts.bridge_type, opts.pod_cidr, opts.node_bits
    );
    let started = Instant::now();
    let cluster = Cluster::up(opts)?;
    eprintln!(
        "evio-sim: up in {:.1} s; probing {}…",
        started.elapsed().as_secs_f64(),
        if large {
            "sampled pairs"
        } else {
            "every pod pair"
        }
    );
    println!("\n{}", cluster.summary());
    if large {
        let failures = sampled(&cluster, &cancel);
        return finish(cluster, failures, args.keep, &cancel);
    }
    if cluster.opts().overlay.is_some() {
        // Sessions are made on demand: traffic between every pair first,
        // so that a relayed pair (seconds to its first handshake through
        // TURN) is up before the probes' 3 s pings. Not an error if some
        // pair does not connect: the node matrix says which.
        let t = Instant::now();
        match cluster.connect_overlay(Duration::from_secs(30)) {
            Ok(_) => eprintln!(
                "evio-sim: every node pair connected in {:.1} s",
                t.elapsed().as_secs_f64()
            ),
            Err(e) => eprintln!("evio-sim: {e}"),
        }
    }
    let probed = Instant::now();
    let reach = cluster.reachability()?;
    println!("pods:\n{}", reach.render());
    let mut failures = reach.failures();
    if cluster.opts().overlay.is_some() {
        let overlay = cluster.overlay_report();
        println!("nodes (host overlay and paths):\n{}", overlay.render());
        failures.extend(overlay.failures());
    }
    failures.extend(services_row(&cluster, args.kube_proxy)?);
    eprintln!(
        "evio-sim: probes took {:.1} s",
        probed.elapsed().as_secs_f64()
    );
    finish(cluster, failures, args.keep, &cancel)
}

/// Beyond [`FULL_MATRIX_MAX`] nodes: every agent knows every other node
/// (none down), then [`SAMPLED_PAIRS`] random node pairs over the host
/// overlay and as many random pod pairs (ping and 1 MiB over TCP). The
/// pairs come from a printed seed, so a failing run can be redone. The
/// failures.
fn sampled(cluster: &Cluster, cancel: &AtomicBool) -> Vec<String> {
    use evio_testkit::cluster::Target;
    use evio_testkit::scale;
    let mut failures = Vec::new();
    let n = cluster.nodes().len();
    let t = Instant::now();
    let known = scale::wait_known(cluster, t, Duration::from_secs(300));
    match known.all() {
        Some(d) => println!(
            "overlay: every agent knows all {} other nodes, none down, {:.1} s after the cluster was up",
            n - 1,
            d.as_secs_f64()
        ),
        None => {
            let short = known.last.iter().filter(|&&k| k + 1 < n).count();
            failures.push(format!(
                "{short} agent(s) did not know every other node within 300 s (healthy peers per \
                 agent: min {})",
                known.last.iter().min().copied().unwrap_or(0)
            ));
        }
    }
    let seed = scale::seed();
    println!("sampled pairs from seed {seed}:");
    // Host overlay: one ping each, all at once (it also makes the sessions
    // of these idle pairs); a pair whose first echo was lost gets one more.
    let nodes = scale::random_pairs(n, SAMPLED_PAIRS, seed);
    let mut ok = cluster.touch(&nodes);
    let first = ok.iter().filter(|&&b| b).count();
    let retry: Vec<usize> = (0..nodes.len()).filter(|&i| !ok[i]).collect();
    let again = cluster.touch(&retry.iter().map(|&i| nodes[i]).collect::<Vec<_>>());
    for (&i, r) in retry.iter().zip(again) {
        ok[i] = r;
    }
    let names: Vec<&str> = cluster.nodes().iter().map(|x| x.name.as_str()).collect();
    for (&(a, b), _) in nodes.iter().zip(&ok).filter(|(_, &o)| !o) {
        failures.push(format!(
            "{} -> {}: no echo over the host overlay",
            names[a], names[b]
        ));
    }
    println!(
        "  nodes (host overlay, one ping): {}/{} answered ({first} at the first echo)",
        ok.iter().filter(|&&b| b).count(),
        nodes.len()
    );
    // Pods: four probing threads; each probe is bounded (ping 3 s, TCP
    // 10 s per step).
    let pods = cluster.pods();
    let pairs = scale::random_pairs(pods.len(), SAMPLED_PAIRS, seed.rotate_left(17));
    let checks: Vec<(usize, usize, Option<evio_testkit::cluster::Check>)> =
        std::thread::scope(|s| {
            let handles: Vec<_> = pairs
                .chunks(pairs.len().div_ceil(4).max(1))
                .map(|chunk| {
                    s.spawn(move || {
                        chunk
                            .iter()
                            .take_while(|_| !cancel.load(Ordering::Relaxed))
                            .map(|&(a, b)| (a, b, cluster.probe(a, Target::Pod(b))))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap_or_default())
                .collect()
        });
    let name = |i: usize| pods.get(i).map_or("?", |(_, p)| p.name.as_str());
    let mut good = 0;
    for (a, b, c) in &checks {
        match c {
            Some(c) if c.ok() => good += 1,
            Some(c) => failures.push(format!(
                "{} -> {}: ping {}, TCP {}",
                name(*a),
                name(*b),
                if c.ping { "ok" } else { "failed" },
                match &c.tcp {
                    Ok(()) => "ok".to_string(),
                    Err(e) => format!("failed: {e}"),
                }
            )),
            None => failures.push(format!("{} -> {}: not probed", name(*a), name(*b))),
        }
    }
    if checks.len() < pairs.len() {
        failures.push(format!(
            "{} pod pair(s) not probed (interrupted)",
            pairs.len() - checks.len()
        ));
    }
    println!(
        "  pods (ping, then 1 MiB over TCP): {good}/{} pairs fully reachable",
        pairs.len()
    );
    println!(
        "  the full pod matrix ({} pairs) and node matrix are skipped beyond {FULL_MATRIX_MAX} nodes",
        pods.len() * pods.len().saturating_sub(1)
    );
    failures
}

/// Prints the failures, keeps the cluster up if asked, tears it down and
/// says what was left behind; the exit code.
fn finish(
    cluster: Cluster,
    failures: Vec<String>,
    keep: bool,
    cancel: &AtomicBool,
) -> Result<ExitCode, SimError> {
    for f in &failures {
        println!("  ✗ {f}");
    }
    if keep {
        println!(
            "\nThe cluster stays up until Ctrl-C (or SIGTERM). To look inside:\n{}",
            cluster.enter_hints()
        );
        while !cancel.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    eprintln!("evio-sim: tearing down (DEL of every pod through the plugin)…");
    let footprint = cluster.footprint();
    let down = cluster.down();
    let leftovers = footprint.leftovers();
    for l in &leftovers {
        eprintln!("evio-sim: left behind: {l}");
    }
    down?;
    if leftovers.is_empty() {
        eprintln!(
            "evio-sim: torn down: {} namespace(s), {} process(es), {} dir(s) removed",
            footprint.netns.len(),
            footprint.processes.len(),
            footprint.paths.len()
        );
    }
    if !failures.is_empty() {
        eprintln!("evio-sim: {} probe(s) failed", failures.len());
        return Ok(ExitCode::from(1));
    }
    if !leftovers.is_empty() {
        return Ok(ExitCode::from(2));
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints the Services row; its failures.
fn services_row(cluster: &Cluster, mode: KubeProxy) -> Result<Vec<String>, SimError> {
    let mode = match mode {
        KubeProxy::None => return Ok(Vec::new()),
        KubeProxy::Iptables => services::Mode::Iptables,
        KubeProxy::Nftables => services::Mode::Nftables,
    };
    if let Some(why) = services::unsupported(cluster) {
        println!("services: skipped ({why})");
        return Ok(Vec::new());
    }
    let report = services::probe(cluster, mode).map_err(SimError::Services)?;
    println!(
        "services (ClusterIPs from {}):\n{}",
        services::SERVICE_CIDR,
        report.render()
    );
    Ok(report.failures())
}

/// Set by the signal handler; nothing else is async-signal-safe enough.
static SIGNALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    SIGNALLED.store(true, Ordering::Relaxed);
}

/// SIGINT/SIGTERM/SIGHUP only raise a flag, which a watcher thread turns
/// into `cancel`: the main flow then stops at its next bounded step and
/// tears down through the normal code path. A handler rather than blocking
/// the signals: a blocked mask would be inherited by the OVS daemons we
/// spawn, which then ignore the SIGTERM that stops them; handlers are reset
/// by exec.
fn install_signal_handler(cancel: Arc<AtomicBool>) -> Result<(), SimError> {
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { sigaction(s, &action) }.map_err(SimError::Signals)?;
    }
    std::thread::spawn(move || {
        let mut told = false;
        loop {
            if SIGNALLED.swap(false, Ordering::Relaxed) {
                cancel.store(true, Ordering::Relaxed);
                if told {
                    eprintln!("evio-sim: still tearing down, please wait");
                } else {
                    eprintln!("\nevio-sim: signal received: stopping and tearing everything down…");
                    told = true;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    Ok(())
}

/// Release builds abort on panic without running destructors: remove the
/// namespaces (killing what runs in them) and temp dirs from the hook.
fn install_panic_cleanup() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        if cfg!(panic = "abort") {
            emergency_cleanup();
        }
    }));
}
