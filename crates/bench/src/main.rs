//! `evio-bench`: see the crate docs and `--help`.
// Test support: a harness that unwraps fails the test that called it, loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use evio_bench::node::Tools;
use evio_bench::report::write_into;
use evio_bench::{
    alloc, cleanup, datapath, latency, machine, overlay, scale, services, Config, Part,
};

#[derive(Debug, Parser)]
#[command(
    name = "evio-bench",
    about = "Benchmarks evio against the reference CNI plugins on this machine and prints markdown tables",
    long_about = "Benchmarks evio against the reference CNI plugins on this machine and prints \
                  markdown tables. Needs root (it creates network namespaces; nothing is \
                  configured in the root namespace) and the programs of .ci/install-deps. Exits \
                  non-zero only if a run failed, never because of a figure."
)]
struct Cli {
    /// Pods per plugin in the latency section.
    #[arg(long, default_value_t = 40)]
    pods: usize,

    /// Concurrent plugin invocations in the concurrent latency phase.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,

    /// Small counts and short runs: a smoke run that proves the benchmark works.
    #[arg(long)]
    quick: bool,

    /// Run only these sections (comma-separated): latency, alloc, datapath, footprint, overlay,
    /// services, scale, natpaths, peermem (the last three run only when named here). With
    /// `--output`, only these sections of the file are replaced.
    #[arg(long, value_delimiter = ',', value_name = "SECTION")]
    only: Vec<Part>,

    /// Also write the report into this markdown file, between its generated-part
    /// markers (text outside them is kept).
    #[arg(long, value_name = "FILE")]
    output: Option<PathBuf>,

    /// The evio plugin [default: `evio` next to this program].
    #[arg(long, value_name = "PATH")]
    plugin: Option<PathBuf>,

    /// evio-node [default: `evio-node` next to this program].
    #[arg(long, value_name = "PATH")]
    node_bin: Option<PathBuf>,

    /// Directory of the reference plugins (bridge, host-local).
    #[arg(long, value_name = "DIR", default_value = "/usr/lib/cni")]
    cni_dir: PathBuf,

    /// One-byte TCP round trips per path in the Services section.
    #[arg(long, default_value_t = 2000)]
    round_trips: usize,

    /// New TCP connections per path in the Services section.
    #[arg(long, default_value_t = 300)]
    connects: usize,

    /// config-gen allocations in the allocation section.
    #[arg(long, default_value_t = 256)]
    allocations: usize,

    /// Concurrent config-gen processes.
    #[arg(long, default_value_t = 32)]
    alloc_concurrency: usize,

    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 3)]
    iperf_seconds: u32,

    /// iperf3 runs per topology (evio and hand-built alternate).
    #[arg(long, default_value_t = 2)]
    iperf_repeats: usize,

    /// Traced ADDs per plugin in the footprint section.
    #[arg(long, default_value_t = 5)]
    footprint_samples: usize,

    /// Seconds per iperf3 run in the overlay section.
    #[arg(long, default_value_t = 5)]
    overlay_seconds: u32,

    /// Pings per path in the overlay section (10 ms apart).
    #[arg(long, default_value_t = 200)]
    overlay_pings: usize,

    /// Before each overlay path, wait up to this many seconds for other work
    /// on the machine to drop below 10% of its CPUs.
    #[arg(long, default_value_t = 60)]
    quiet_wait: u64,

    /// Nodes of the overlay connect-time run without NAT.
    #[arg(long, default_value_t = 8)]
    connect_nodes: usize,

    /// Restarts of every agent timed in that run.
    #[arg(long, default_value_t = 3)]
    connect_rounds: usize,

    /// Nodes of the overlay idle run (each agent has one peer fewer).
    #[arg(long, default_value_t = 17)]
    idle_nodes: usize,

    /// Nodes of the largest overlay run.
    #[arg(long, default_value_t = 32)]
    large_nodes: usize,

    /// Seconds of idle CPU measurement per overlay cluster.
    #[arg(long, default_value_t = 30)]
    idle_seconds: u32,

    /// Conntrack flushes per side in the overlay recovery run.
    #[arg(long, default_value_t = 3)]
    recovery_rounds: usize,

    /// boringtun-cli [default: from PATH or cargo's bin directory; the
    /// column is skipped when there is none].
    #[arg(long, value_name = "PATH")]
    boringtun: Option<PathBuf>,

    /// Parts of the overlay section to run (comma-separated): paths,
    /// connect, nat, idle, large [default: all].
    #[arg(long, value_delimiter = ',', value_name = "PART")]
    overlay_parts: Vec<String>,

    /// Cluster sizes of the scale section (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "32,64,128,256")]
    scale_nodes: Vec<usize>,

    /// Random pod pairs whose first reply the scale section times.
    #[arg(long, default_value_t = 100)]
    scale_pairs: usize,

    /// Seconds the scale section waits for every agent to know every other
    /// node.
    #[arg(long, default_value_t = 300)]
    scale_timeout: u64,

    /// Seconds each phase (before, after) of the natpaths section watches
    /// the NAT lab's pairs: long enough for the three silence-and-
    /// alternate attempts (coordinator first, peer first, both at once:
    /// the last ~150-160 s after the start) at the default 30 s NAT timeout.
    #[arg(long, default_value_t = 180)]
    nat_window: u64,

    /// One-way delay in ms into every router of the natpaths section's NAT
    /// lab (0: none, the lab's default).
    #[arg(long, default_value_t = 15)]
    nat_delay_ms: u64,

    /// Rounds of both phases in the natpaths section.
    #[arg(long, default_value_t = 2)]
    nat_rounds: usize,

    /// Synthetic peer counts of the peermem section (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "0,32,128,256,1024")]
    peermem_peers: Vec<usize>,

    /// boringtun thread counts to run (its best is compared).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    boringtun_threads: Vec<usize>,
}

fn sibling(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(name)))
        .unwrap_or_else(|| PathBuf::from(name))
}

/// The command line as the report shows it: without `--output FILE`, which
/// says where the report went, not how it was measured.
fn shown_args(args: impl Iterator<Item = String>) -> String {
    let mut out = String::new();
    let mut skip = false;
    for a in args {
        if skip {
            skip = false;
            continue;
        }
        if a == "--output" {
            skip = true;
            continue;
        }
        if a.starts_with("--output=") {
            continue;
        }
        out.push(' ');
        out.push_str(&a);
    }
    out
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    cleanup::install();
    if nix::unistd::geteuid().as_raw() != 0 {
        eprintln!("evio-bench: needs root (it creates network namespaces)");
        return ExitCode::from(2);
    }
    let explicit = |name: &str| {
        std::env::args().any(|a| a == format!("--{name}") || a.starts_with(&format!("--{name}=")))
    };
    let q = |name: &str, normal: usize, quick: usize| {
        if cli.quick && !explicit(name) {
            quick
        } else {
            normal
        }
    };
    let cfg = Config {
        tools: Tools {
            evio: cli.plugin.clone().unwrap_or_else(|| sibling("evio")),
            evio_node: cli.node_bin.clone().unwrap_or_else(|| sibling("evio-node")),
            cni_dir: cli.cni_dir.clone(),
        },
        parts: if cli.only.is_empty() {
            Part::ALL.to_vec()
        } else {
            cli.only.clone()
        },
        latency: latency::Opts {
            pods: q("pods", cli.pods, 4),
            concurrency: q("concurrency", cli.concurrency, 4),
        },
        alloc: alloc::Opts {
            allocations: q("allocations", cli.allocations, 32),
            concurrency: q("alloc-concurrency", cli.alloc_concurrency, 8),
        },
        datapath: datapath::Opts {
            seconds: q("iperf-seconds", cli.iperf_seconds as usize, 1) as u32,
            repeats: q("iperf-repeats", cli.iperf_repeats, 1),
        },
        services: services::Opts {
            seconds: q("iperf-seconds", cli.iperf_seconds as usize, 1) as u32,
            repeats: q("iperf-repeats", cli.iperf_repeats, 1),
            round_trips: q("round-trips", cli.round_trips, 200),
            connects: q("connects", cli.connects, 30),
        },
        scale: scale::Opts {
            nodes: if cli.quick && !explicit("scale-nodes") {
                vec![8]
            } else {
                cli.scale_nodes.clone()
            },
            pairs: q("scale-pairs", cli.scale_pairs, 10),
            idle_seconds: q("idle-seconds", cli.idle_seconds as usize, 2) as u32,
            timeout: std::time::Duration::from_secs(cli.scale_timeout),
        },
        natpaths: evio_bench::natpaths::Opts {
            window: std::time::Duration::from_secs(
                q("nat-window", cli.nat_window as usize, 30) as u64
            ),
            rounds: q("nat-rounds", cli.nat_rounds, 1),
            delay: std::time::Duration::from_millis(cli.nat_delay_ms),
        },
        peermem: evio_bench::peermem::Opts {
            peers: if cli.quick && !explicit("peermem-peers") {
                vec![0, 32]
            } else {
                cli.peermem_peers.clone()
            },
            idle_seconds: q("idle-seconds", cli.idle_seconds as usize, 2) as u32,
        },
        footprint_samples: q("footprint-samples", cli.footprint_samples, 2),
        overlay: overlay::Opts {
            seconds: q("overlay-seconds", cli.overlay_seconds as usize, 1) as u32,
            quiet_wait: std::time::Duration::from_secs(
                q("quiet-wait", cli.quiet_wait as usize, 0) as u64
            ),
            pings: q("overlay-pings", cli.overlay_pings, 30),
            quick: cli.quick,
            connect_nodes: cli.connect_nodes,
            connect_rounds: cli.connect_rounds,
            idle_nodes: cli.idle_nodes,
            large_nodes: cli.large_nodes,
            idle_seconds: q("idle-seconds", cli.idle_seconds as usize, 2) as u32,
            recovery_rounds: cli.recovery_rounds,
            boringtun: match &cli.boringtun {
                // An explicit path that is not there: the column says so.
                Some(p) => Some(p.clone()).filter(|p| p.is_file()),
                None => overlay::find_boringtun(),
            },
            parts: cli.overlay_parts.clone(),
            boringtun_threads: if cli.quick && !explicit("boringtun-threads") {
                vec![2]
            } else {
                cli.boringtun_threads.clone()
            },
        },
    };

    let mut doc = format!(
        "Generated by `scripts/bench.sh` (`evio-bench{}`). Ratios are what compare across \
         machines; absolute times are this machine's.\n\n## Machine\n\n{}\n",
        shown_args(std::env::args().skip(1)),
        machine::describe(&cfg.tools)
    );
    println!("{doc}");
    let sections = evio_bench::run(&cfg, |s| println!("{}", s.render()));
    for s in &sections {
        doc.push_str(&s.render());
        doc.push('\n');
    }
    let failed = sections.iter().filter(|s| s.error.is_some()).count();
    if let Some(path) = &cli.output {
        if let Err(e) = write_into(path, &doc, !cli.only.is_empty()) {
            eprintln!("evio-bench: {e}");
            return ExitCode::FAILURE;
        }
        eprintln!("evio-bench: wrote {}", path.display());
    }
    if cleanup::check().is_err() {
        return ExitCode::from(130);
    }
    if failed > 0 {
        eprintln!("evio-bench: {failed} section(s) failed");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
