//! `evio-node`: the node-side companion of the `evio` CNI plugin. The
//! subcommands live in the `evio_node` library; this file only dispatches
//! and reports errors.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use evio_node::{agent, config_gen, doctor, install_cni, nodes, peers, run, subnets, uninstall};

#[derive(Debug, Parser)]
#[command(
    name = "evio-node",
    version,
    about = "evio node side: pod subnet allocation, CNI config, the overlay agent"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Allocate this node's pod subnet and write the CNI config (init container).
    ConfigGen(Box<config_gen::Args>),
    /// Copy the plugin binaries onto the host atomically (init container).
    InstallCni(install_cni::Args),
    /// Long-running: keep the allocation and conflist right, serve /healthz and /metrics.
    Run(Box<run::RunArgs>),
    /// Inspect or free subnet allocations.
    Subnets(Box<subnets::Args>),
    /// Every node the store knows (live, stale, released), and freeing all of
    /// a dead node's allocations at once.
    Nodes(Box<nodes::Args>),
    /// Run the overlay agent: encrypted tunnels joining the node bridges, and
    /// the host overlay (long-running; SIGTERM stops it and keeps the node on
    /// the network, --stop-and-leave takes it off).
    Agent(Box<agent::Args>),
    /// Show the agent's peers: state, path (direct/relay), endpoint, RTT.
    Peers(peers::Args),
    /// Report orphaned or inconsistent evio state on this node (exit 1 if any);
    /// the allocation store is checked when --store, or a --config with a dataStore, is given.
    Doctor(Box<doctor::Args>),
    /// Remove evio from this node: conflist, plugin binary, bridge, agent
    /// interfaces, pod veths, nftables table, data dir; --release frees the
    /// node's allocations in the store. Idempotent.
    Uninstall(Box<uninstall::Args>),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion)
                || e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            {
                let _ = e.print();
                return if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                    ExitCode::from(2)
                } else {
                    ExitCode::SUCCESS
                };
            }
            // One line, like every other failure: clap's message up to its
            // usage section, joined, without the "error: " prefix.
            let text = e.render().to_string();
            let msg: Vec<&str> = text
                .lines()
                .map(str::trim)
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .filter(|l| !l.is_empty())
                .collect();
            eprintln!(
                "evio-node: {} (see --help)",
                msg.join(" ").trim_start_matches("error: ")
            );
            return ExitCode::from(2);
        }
    };
    let result = match cli.cmd {
        Cmd::ConfigGen(a) => config_gen::run(*a),
        Cmd::Subnets(a) => subnets::run(*a),
        Cmd::Nodes(a) => nodes::run(*a),
        Cmd::InstallCni(a) => install_cni::run(a),
        Cmd::Run(a) => run::run(*a),
        Cmd::Doctor(a) => doctor::run(*a),
        Cmd::Agent(a) => agent::run(*a),
        Cmd::Peers(a) => peers::run(a),
        Cmd::Uninstall(a) => uninstall::run(*a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("evio-node: {}", e.to_string().replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}
