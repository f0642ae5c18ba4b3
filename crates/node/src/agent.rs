//! `evio-node agent`: resolves the network config, this node's subnet and
//! host address (from the store, restart-stable; from the agent's cache
//! when the store does not answer), the keys and the NAT servers, then
//! runs the overlay agent (crate `evio-agent`) until SIGTERM/SIGINT, which
//! keep the node on the network. `--stop-and-leave` takes it off.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use evio_agent::cache::Cache;
use evio_agent::AgentConfig;
use evio_overlay::nat::TurnServer;
use evio_plugin::naming::ovs_ids;
use evio_subnet::{
    open_overlay_store, open_store, read_secret, HostAllocation, HostSlot, NodeSubnet, Released,
    StoreOptions, StoreUrl, SubnetError,
};
use ipnet::IpNet;

use crate::config_gen::{NodeArgs, Resolved};
use crate::error::NodeError;
use crate::netconf::RawConf;
use crate::overlay::{resolve, OverlayConf};
use crate::store_args::block_on_with_timeout;

pub const DEFAULT_CONTROL_SOCKET: &str = "/run/evio/agent.sock";
/// How long a start with a cache waits for the store before it runs from
/// the cache (the store thread reconciles when the store comes back).
const CACHED_START_WAIT: Duration = Duration::from_secs(5);
/// How long `--stop-and-leave` waits for a running agent to be gone.
const LEAVE_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub node: NodeArgs,

    /// Where `evio-node peers` and `evio-node run` reach the agent.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_CONTROL_SOCKET)]
    pub control_socket: PathBuf,

    /// Ask for this host overlay address (e.g. 10.10.0.1) instead of the
    /// lowest free one; overrides `hostAddress` in the config. Refused,
    /// naming the holder, when another node holds it.
    #[arg(long, value_name = "IP")]
    pub host_address: Option<String>,

    /// The agent's port on the node bridge [default: <bridge>-ovl].
    #[arg(long, value_name = "IFNAME")]
    pub tap_name: Option<String>,

    /// Take this node off the overlay and stop its agent: the running agent
    /// (or, if none runs, this command) removes the node's record from the
    /// store, the agent's bridge port and its devices with the host
    /// address. A plain stop (SIGTERM) keeps all of that for the next
    /// agent. The allocations stay (`evio-node nodes release` frees them).
    #[arg(long)]
    pub stop_and_leave: bool,
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

/// `reclaimAfter` from the config: off when absent.
pub fn reclaim_after(conf: &RawConf) -> Result<Option<Duration>, NodeError> {
    let Some(s) = conf.string("reclaimAfter")?.filter(|s| !s.is_empty()) else {
        return Ok(None);
    };
    let d = humantime::parse_duration(&s).map_err(|e| {
        NodeError::Invalid(format!(
            "reclaimAfter: {s:?} is not a duration (e.g. \"168h\"): {e}"
        ))
    })?;
    if d < Duration::from_secs(1) {
        return Err(NodeError::Invalid(format!(
            "reclaimAfter: {s:?} is too short (at least 1s; days are usual)"
        )));
    }
    Ok(Some(d))
}

/// The agent's data dir: where its key lives.
fn data_dir(ov: &OverlayConf) -> PathBuf {
    ov.key_file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/var/lib/evio"))
}

/// Whether an error means the store did not answer (as opposed to an
/// answer the node cannot live with, or a bad config).
pub fn unanswered(e: &NodeError) -> bool {
    matches!(
        e,
        NodeError::Timeout { .. }
            | NodeError::Subnet(
                SubnetError::Unreachable { .. }
                    | SubnetError::Etcd { .. }
                    | SubnetError::LockTimeout { .. }
                    | SubnetError::Io { .. }
            )
    )
}

/// What the store gave the node.
struct Allocated {
    subnet: NodeSubnet,
    host: Option<IpNet>,
    /// The IPv6 host address of a dual-stack host CIDR.
    host6: Option<IpNet>,
    /// Why its previous allocations were freed, if they were.
    released: Option<Released>,
}

fn allocate(plan: &Resolved, ov: &OverlayConf, budget: Duration) -> Result<Allocated, NodeError> {
    let (url, opts, network, node) = (&plan.url, &plan.opts, &plan.gen.name, &plan.node);
    let opts = StoreOptions {
        timeout: opts.timeout.min(budget),
        ..opts.clone()
    };
    block_on_with_timeout(url, budget, async {
        let ostore = open_overlay_store(url, &opts).await?;
        // The host address first: a refused hostAddress then leaves nothing
        // behind in the store.
        let host = match ov.host_cidr {
            Some(cidr) => Some(
                ostore
                    .allocate_host(network, node, cidr, ov.host_address)
                    .await?,
            ),
            None => None,
        };
        // Undoes what this call allocated (best effort: the store may be
        // what failed), so that a node gets all of its addresses or none.
        let undo = |h: Option<HostAllocation>, slot| {
            let ostore = &ostore;
            async move {
                if h.is_some_and(|h| !h.existing) {
                    let _ = ostore.release_host_in(network, node, slot).await;
                }
            }
        };
        // The IPv6 address of a dual-stack host overlay, after the first
        // (the one older agents know).
        let host6 = match ov.host_cidr6 {
            Some(cidr) => match ostore
                .allocate_host_in(network, node, HostSlot::Ipv6, cidr, ov.host_address6)
                .await
            {
                Ok(h) => Some(h),
                Err(e) => {
                    undo(host, HostSlot::First).await;
                    return Err(e.into());
                }
            },
            None => None,
        };
        let store = open_store(url, &opts).await?;
        let alloc = match store.allocate(network, node, &plan.gen.pod).await {
            Ok(a) => a,
            Err(e) => {
                undo(host, HostSlot::First).await;
                undo(host6, HostSlot::Ipv6).await;
                return Err(e.into());
            }
        };
        let with_prefix = |h: Option<HostAllocation>, cidr: Option<IpNet>| match (h, cidr) {
            (Some(h), Some(cidr)) => IpNet::new(h.addr, cidr.prefix_len())
                .map(Some)
                .map_err(|e| NodeError::Invalid(e.to_string())),
            _ => Ok(None),
        };
        let host = with_prefix(host, ov.host_cidr)?;
        let host6 = with_prefix(host6, ov.host_cidr6)?;
        // A fresh allocation: were this node's old ones released?
        let released = if alloc.existing {
            None
        } else {
            let note = ostore.peers(network).await?.released.remove(node);
            if note.is_some() {
                ostore.forget_released(network, node).await?;
            }
            note
        };
        Ok(Allocated {
            subnet: alloc.subnet,
            host,
            host6,
            released,
        })
    })
}

/// A node's host addresses: the first (the record's `hostAddress`) and
/// the IPv6 one of a dual-stack host CIDR.
type Hosts = (Option<IpNet>, Option<IpNet>);

/// The allocation a fitting cache holds.
fn from_cache(c: &Cache, plan: &Resolved) -> Option<(NodeSubnet, Hosts)> {
    let subnet: IpNet = c.pod_subnet.parse().ok()?;
    let index = plan.gen.pod.index_of(&subnet)?;
    let ns = plan.gen.pod.node(index).ok()?;
    let parse = |h: &Option<String>| match h {
        Some(h) => h.parse().ok().map(Some),
        None => Some(None),
    };
    Some((ns, (parse(&c.host_address)?, parse(&c.host_address6)?)))
}

/// Host addresses as a person reads them.
fn show_hosts(h: Hosts) -> String {
    match h {
        (None, _) => "none".to_string(),
        (Some(a), None) => a.to_string(),
        (Some(a), Some(b)) => format!("{a} and {b}"),
    }
}

/// Says, once and clearly, that the node's allocation changed under it.
fn report_change(old: &Cache, new: &Allocated) {
    let why = match &new.released {
        Some(r) => format!(
            "they were released ({}) by {} at {}",
            r.reason, r.by, r.time
        ),
        None => "the store no longer held them".to_string(),
    };
    tracing::error!(
        "this node's allocations (subnet {}, host address {}) were lost while it was away: {why}. \
         It now has subnet {} and host address {}: pods still using the old addresses must be \
         restarted, and the old addresses may belong to another node now",
        old.pod_subnet,
        old.host_address.as_deref().unwrap_or("none"),
        new.subnet.subnet,
        show_hosts((new.host, new.host6)),
    );
}

pub fn run(args: Args) -> Result<(), NodeError> {
    init_logging();
    if args.stop_and_leave {
        return stop_and_leave(&args);
    }
    let plan = args.node.resolve()?;
    let mut ov = OverlayConf::parse(&plan.conf)?;
    if let Some(h) = &args.host_address {
        let (slot6, a) =
            crate::overlay::host_address_in(h, ov.host_cidr, ov.host_cidr6, "--host-address")?;
        if slot6 {
            ov.host_address6 = Some(a);
        } else {
            ov.host_address = Some(a);
        }
    }
    let reclaim = reclaim_after(&plan.conf)?;
    let network = plan.gen.name.clone();
    let cache_path = evio_agent::cache::path(&data_dir(&ov), &network, &plan.node);
    let want = Cache {
        network: network.clone(),
        node: plan.node.clone(),
        store: plan.url.to_string(),
        pod_cidr: plan.gen.pod.cidr().to_string(),
        node_bits: plan.gen.pod.node_bits(),
        host_cidr: ov.host_cidr.map(|_| {
            let all: Vec<String> = ov.host_cidrs().iter().map(|c| c.to_string()).collect();
            all.join(",")
        }),
        ..Cache::default()
    };
    let cached = evio_agent::cache::load(&cache_path).filter(|c| c.fits(&want));
    let budget = match &cached {
        Some(_) => CACHED_START_WAIT.min(args.node.store.timeout),
        None => args.node.store.timeout,
    };
    let t = Instant::now();
    let (subnet, host, cache, from_cache, stale_gateway) = match allocate(&plan, &ov, budget) {
        Ok(a) => {
            let mut cache = cached.clone().unwrap_or_else(|| want.clone());
            let old_gw = cached.as_ref().and_then(|c| from_cache(c, &plan));
            let moved = old_gw
                .as_ref()
                .is_some_and(|(s, h)| s.subnet != a.subnet.subnet || *h != (a.host, a.host6));
            let mut stale_gateway = None;
            if moved || a.released.is_some() {
                report_change(cached.as_ref().unwrap_or(&want), &a);
                stale_gateway = old_gw.and_then(|(s, _)| {
                    IpNet::new(s.gateway, plan.gen.pod.cidr().prefix_len()).ok()
                });
                // The old peer set and lease belong to the old allocation.
                cache.peers.clear();
                cache.lease = None;
            }
            cache.pod_subnet = a.subnet.subnet.to_string();
            cache.host_address = a.host.map(|h| h.to_string());
            cache.host_address6 = a.host6.map(|h| h.to_string());
            (a.subnet, (a.host, a.host6), cache, false, stale_gateway)
        }
        Err(e) if unanswered(&e) => {
            let Some((subnet, host, c)) = cached
                .as_ref()
                .and_then(|c| from_cache(c, &plan).map(|(s, h)| (s, h, c.clone())))
            else {
                return Err(e);
            };
            tracing::warn!(
                "the store did not answer within {:?} ({e}): starting from the cached state in {} \
                 (subnet {}, host address {}); reconciling when it answers",
                t.elapsed(),
                cache_path.display(),
                subnet.subnet,
                show_hosts(host)
            );
            (subnet, host, c, true, None)
        }
        Err(e) => return Err(e),
    };
    if let Err(e) = evio_agent::cache::save(&cache_path, &cache) {
        tracing::warn!("state cache {}: {e}", cache_path.display());
    }
    let cfg = agent_config(
        &args,
        plan,
        &ov,
        subnet,
        host,
        Started {
            cache_path,
            cache,
            from_cache,
            stale_gateway,
            reclaim,
        },
    )?;
    evio_agent::run(cfg).map_err(|e| NodeError::Invalid(e.to_string()))
}

/// How the agent starts, besides the config.
struct Started {
    cache_path: PathBuf,
    cache: Cache,
    from_cache: bool,
    stale_gateway: Option<IpNet>,
    reclaim: Option<Duration>,
}

fn agent_config(
    args: &Args,
    plan: Resolved,
    ov: &OverlayConf,
    ns: NodeSubnet,
    host: Hosts,
    s: Started,
) -> Result<AgentConfig, NodeError> {
    let Resolved {
        gen,
        node,
        url,
        opts,
        ..
    } = plan;
    let plugin = gen.plugin_conf(&ns)?;
    let gateway = IpNet::new(ns.gateway, gen.pod.cidr().prefix_len())
        .map_err(|e| NodeError::Invalid(e.to_string()))?;
    let private_key = evio_agent::keys::load_or_create(&ov.key_file)
        .map_err(|e| NodeError::Invalid(e.to_string()))?;
    let (network_key, network_key_also) = match &ov.network_key_file {
        Some(p) => {
            let (k, also) =
                evio_agent::keys::network_keys(p).map_err(|e| NodeError::Invalid(e.to_string()))?;
            (Some(k), also)
        }
        None => (None, None),
    };
    let stun = ov
        .stun
        .iter()
        .enumerate()
        .map(|(i, s)| resolve(s, &format!("overlay.stun[{i}]"), ov.ipv6))
        .collect::<Result<Vec<_>, _>>()?;
    let turn = turn_servers(ov)?;
    let tap = args
        .tap_name
        .clone()
        .unwrap_or_else(|| tap_name(gen.bridge()));
    Ok(AgentConfig {
        network: gen.name.clone(),
        node,
        plugin,
        pod_cidr: gen.pod.cidr(),
        pod_subnet: ns.subnet,
        gateway,
        host_addr: host.0,
        host_addr6: host.1,
        host_interface: ov.host_interface.clone(),
        tap_name: tap,
        listen_port: ov.listen_port,
        stun,
        turn,
        announce: ov.announce.clone(),
        nat_udp_timeout: Duration::from_secs(u64::from(ov.nat_udp_timeout)),
        port_mapping: ov.port_mapping,
        ipv6: ov.ipv6,
        private_key,
        network_key,
        network_key_also,
        store_url: url,
        store_opts: opts,
        control_socket: args.control_socket.clone(),
        cache_path: s.cache_path,
        cache: s.cache,
        from_cache: s.from_cache,
        stale_gateway: s.stale_gateway,
        reclaim_after: s.reclaim,
    })
}

fn turn_servers(ov: &OverlayConf) -> Result<Vec<TurnServer>, NodeError> {
    ov.turn
        .iter()
        .enumerate()
        .map(|(i, t)| {
            Ok(TurnServer {
                server: resolve(&t.server, &format!("overlay.turn[{i}].server"), ov.ipv6)?,
                transport: t.transport,
                username: t.username.clone(),
                password: read_secret(
                    &format!("overlay.turn[{i}].passwordFile"),
                    &t.password_file,
                )?,
            })
        })
        .collect()
}

/// `--stop-and-leave`: the running agent leaves and exits; then whatever
/// is still there (no agent ran, or it could not finish) is removed here.
fn stop_and_leave(args: &Args) -> Result<(), NodeError> {
    let socket = &args.control_socket;
    match evio_agent::control::request(socket, "leave", Duration::from_secs(2)) {
        Ok(answer) if answer.contains("\"leaving\":true") => {
            let t = Instant::now();
            while evio_agent::control::request(socket, "health", Duration::from_millis(500)).is_ok()
            {
                if t.elapsed() > LEAVE_WAIT {
                    return Err(NodeError::Invalid(format!(
                        "the agent at {} did not exit within {LEAVE_WAIT:?}",
                        socket.display()
                    )));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            println!("agent stopped and left the network");
        }
        _ => println!("no agent answers at {}", socket.display()),
    }
    leave_offline(args)
}

/// What leaving removes, done without an agent: the record in the store,
/// the agent's OVS port, its TAP and TUN. Idempotent.
fn leave_offline(args: &Args) -> Result<(), NodeError> {
    let plan = args.node.resolve()?;
    let ov = OverlayConf::parse(&plan.conf)?;
    let tap = args
        .tap_name
        .clone()
        .unwrap_or_else(|| tap_name(plan.gen.bridge()));
    let mut failed = Vec::new();
    if plan.gen.bridge_type() == "ovs"
        && Path::new(plan.gen.ovsdb().trim_start_matches("unix:")).exists()
    {
        let del = evio_ovsdb::Client::connect(plan.gen.ovsdb(), Duration::from_secs(5))
            .and_then(|mut c| c.del_port_if(&tap, &[(ovs_ids::OWNER, ovs_ids::OWNER_AGENT)]));
        match del {
            Ok(true) => println!("removed OVS port {tap}"),
            Ok(false) => {}
            Err(e) => failed.push(format!("OVS port {tap}: {e}")),
        }
    }
    match evio_net::Handle::new() {
        Ok(mut h) => {
            for name in [tap.as_str(), ov.host_interface.as_str()] {
                let ours = h
                    .link_by_name(name)
                    .ok()
                    .flatten()
                    .is_some_and(|l| l.kind.as_deref() == Some("tun"));
                if !ours {
                    continue;
                }
                match h.delete_link_by_name(name) {
                    Ok(true) => println!("removed interface {name}"),
                    Ok(false) => {}
                    Err(e) => failed.push(format!("interface {name}: {e}")),
                }
            }
        }
        Err(e) => failed.push(format!("interfaces: {e}")),
    }
    match remove_record(&plan, args.node.store.timeout) {
        Ok(true) => println!("removed the record of node {} from {}", plan.node, plan.url),
        Ok(false) => {}
        Err(e) => failed.push(format!("the record in {}: {e}", plan.url)),
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(NodeError::Invalid(format!(
            "could not leave completely: {}",
            failed.join("; ")
        )))
    }
}

/// Deletes the node's record; a file store that does not exist holds none
/// (and must not be created by looking).
pub(crate) fn remove_record(plan: &Resolved, timeout: Duration) -> Result<bool, NodeError> {
    if let StoreUrl::File(path) = &plan.url {
        if !path.exists() {
            return Ok(false);
        }
    }
    block_on_with_timeout(&plan.url, timeout, async {
        let store = open_overlay_store(&plan.url, &plan.opts).await?;
        Ok(store.remove_peer(&plan.gen.name, &plan.node).await?)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(v: serde_json::Value) -> RawConf {
        RawConf::parse("t.json", v.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn reclaim_after_is_off_by_default_and_checked() {
        assert_eq!(reclaim_after(&conf(serde_json::json!({}))).unwrap(), None);
        assert_eq!(
            reclaim_after(&conf(serde_json::json!({"reclaimAfter": "168h"}))).unwrap(),
            Some(Duration::from_secs(168 * 3600))
        );
        for bad in ["soon", "0s", "-1h"] {
            let e = reclaim_after(&conf(serde_json::json!({ "reclaimAfter": bad })))
                .unwrap_err()
                .to_string();
            assert!(e.contains("reclaimAfter"), "{bad}: {e}");
        }
    }
}
