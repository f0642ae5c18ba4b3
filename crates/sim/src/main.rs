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
    /// sites only.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=32))]
    nodes: Option<u16>,
    /// The cluster store: the embedded file store, or etcd in the lab's
    /// internet namespace.
    #[arg(long, value_enum, default_value_t = Store::File)]
    store: Store,
    /// Pods per node.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(0..=32))]
    pods: u16,
    /// Node bridge type (the plugin's `bridgeType`).
    #[arg(long, value_enum, default_value_t = Bridge::Ovs)]
    bridge_type: Bridge,
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

fn up(args: UpArgs, cancel: Arc<AtomicBool>) -> Result<ExitCode, SimError> {
    let here = std::env::current_exe()
        .map_err(SimError::SelfPath)?
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default();
    let mut opts = ClusterOpts::new(
        args.evio.unwrap_or_else(|| here.join("evio")),
        args.evio_node.unwrap_or_else(|| here.join("evio-node")),
    );
    opts.pods_per_node = usize::from(args.pods);
    opts.overlay = if args.plain_link {
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
    if let Some(o) = opts.overlay.as_mut() {
        o.etcd = args.store == Store::Etcd;
        if args.no_nat {
            o.turn = false;
        }
    }
    opts.nodes = match &opts.overlay {
        Some(o) => o.nodes(),
        None => usize::from(args.nodes.unwrap_or(3)),
    };
    opts.bridge_type = match args.bridge_type {
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
        "evio-sim: up in {:.1} s; probing every pod pair…",
        started.elapsed().as_secs_f64()
    );
    println!("\n{}", cluster.summary());
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
    for f in &failures {
        println!("  ✗ {f}");
    }
    eprintln!(
        "evio-sim: probes took {:.1} s",
        probed.elapsed().as_secs_f64()
    );

    if args.keep {
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
