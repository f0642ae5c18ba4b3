//! `evio-node agent`: resolves the network config, this node's subnet and
//! host address (from the store, restart-stable), the keys and the NAT
//! servers, then runs the overlay agent (crate `evio-agent`) until
//! SIGTERM/SIGINT.

use std::path::PathBuf;

use evio_agent::AgentConfig;
use evio_overlay::nat::TurnServer;
use evio_subnet::{open_overlay_store, open_store, preferred_host, read_secret};
use ipnet::IpNet;

use crate::config_gen::{NodeArgs, Resolved};
use crate::error::NodeError;
use crate::overlay::{resolve, OverlayConf};
use crate::store_args::block_on_with_timeout;

pub const DEFAULT_CONTROL_SOCKET: &str = "/run/evio/agent.sock";

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub node: NodeArgs,

    /// Where `evio-node peers` and `evio-node run` reach the agent.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_CONTROL_SOCKET)]
    pub control_socket: PathBuf,

    /// The agent's port on the node bridge [default: <bridge>-ovl].
    #[arg(long, value_name = "IFNAME")]
    pub tap_name: Option<String>,
}

/// The agent's TAP on the node bridge (also what `uninstall` removes).
pub(crate) fn tap_name(bridge: &str) -> String {
    let n = format!("{bridge}-ovl");
    if n.len() <= 15 {
        n
    } else {
        "evio-ovl".to_string()
    }
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    // The TURN/STUN crates log every event (and benign races as errors);
    // the agent logs what matters itself (nat.rs): keep them quiet.
    let filter = EnvFilter::try_from_env("EVIO_LOG").unwrap_or_else(|_| {
        EnvFilter::new("info,turn_client_proto=off,stun_proto=off,stun_types=off,turn_types=off")
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

pub fn run(args: Args) -> Result<(), NodeError> {
    init_logging();
    let Resolved {
        conf,
        gen,
        node,
        url,
        opts,
    } = args.node.resolve()?;
    let ov = OverlayConf::parse(&conf)?;
    let network = gen.name.clone();
    let (alloc, host) = block_on_with_timeout(&url, args.node.store.timeout, async {
        let store = open_store(&url, &opts).await?;
        let alloc = store.allocate(&network, &node, &gen.pod).await?;
        let host = match ov.host_cidr {
            Some(cidr) => {
                let ostore = open_overlay_store(&url, &opts).await?;
                let pref = preferred_host(cidr, alloc.subnet.index, gen.pod.capacity());
                let h = ostore.allocate_host(&network, &node, cidr, pref).await?;
                Some(
                    IpNet::new(h.addr, cidr.prefix_len())
                        .map_err(|e| NodeError::Invalid(e.to_string()))?,
                )
            }
            None => None,
        };
        Ok((alloc, host))
    })?;
    let ns = alloc.subnet;
    let plugin = gen.plugin_conf(&ns)?;
    let gateway = IpNet::new(ns.gateway, gen.pod.cidr().prefix_len())
        .map_err(|e| NodeError::Invalid(e.to_string()))?;
    let private_key = evio_agent::keys::load_or_create(&ov.key_file)
        .map_err(|e| NodeError::Invalid(e.to_string()))?;
    let network_key = match &ov.network_key_file {
        Some(p) => {
            Some(evio_agent::keys::network_key(p).map_err(|e| NodeError::Invalid(e.to_string()))?)
        }
        None => None,
    };
    let stun = ov
        .stun
        .iter()
        .enumerate()
        .map(|(i, s)| resolve(s, &format!("overlay.stun[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    let turn = ov
        .turn
        .iter()
        .enumerate()
        .map(|(i, t)| {
            Ok(TurnServer {
                server: resolve(&t.server, &format!("overlay.turn[{i}].server"))?,
                transport: t.transport,
                username: t.username.clone(),
                password: read_secret(
                    &format!("overlay.turn[{i}].passwordFile"),
                    &t.password_file,
                )?,
            })
        })
        .collect::<Result<Vec<_>, NodeError>>()?;
    let tap = args
        .tap_name
        .clone()
        .unwrap_or_else(|| tap_name(gen.bridge()));
    let cfg = AgentConfig {
        network,
        node,
        plugin,
        pod_cidr: gen.pod.cidr(),
        pod_subnet: ns.subnet,
        gateway,
        host_addr: host,
        host_interface: ov.host_interface.clone(),
        tap_name: tap,
        listen_port: ov.listen_port,
        stun,
        turn,
        private_key,
        network_key,
        store_url: url,
        store_opts: opts,
        control_socket: args.control_socket.clone(),
    };
    evio_agent::run(cfg).map_err(|e| NodeError::Invalid(e.to_string()))
}
