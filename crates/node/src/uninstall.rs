//! `evio-node uninstall`: removes what evio put on this node, for an
//! operator taking evio off (after deleting the DaemonSet, so that nothing
//! recreates it meanwhile).
//!
//! Every step runs whatever the previous ones did and its failure is
//! collected, not returned (the way netavark tears down): one stuck item
//! must not leave everything after it in place. The exit status is non-zero
//! only when something evio made is still there. Everything is looked up
//! first, so a second run finds nothing and says so.
//!
//! Only what evio's own rules say is evio's is touched: the conflist when
//! its `name` and plugin `type` are this network's and `evio`; pod veths by
//! the plugin's naming rules (`evio_plugin::naming`); OVS ports tagged
//! `evio-owner=evio` (the plugin) or `evio-owner=evio-agent` (the agent);
//! the agent's TAP and TUN by name *and* kind `tun`. The node bridge carries
//! no marker of its own (neither OVS nor the kernel keeps one that survives
//! as evio writes it), so it is taken as evio's when it has the configured
//! name and right kind, and removed only once no port other than evio's is
//! on it: a bridge someone else also uses is left, and reported.

use std::path::{Path, PathBuf};
use std::time::Duration;

use evio_net::Handle;
use evio_plugin::naming::{host_veth_of, ovs_ids};
use evio_subnet::{
    open_overlay_store, remove_leftover_temps, ReleaseRequest, StoreUrl, SubnetError,
};

use crate::config_gen::{ConflistArgs, NodeArgs, Resolved};
use crate::error::NodeError;
use crate::overlay::OverlayConf;
use crate::store_args::block_on_with_timeout;

/// The plugin binary install-cni puts into the CNI bin dir.
const PLUGIN_BIN: &str = "evio";
const OVSDB_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub node: NodeArgs,

    #[command(flatten)]
    pub conflist: ConflistArgs,

    /// The CNI binary directory the plugin was installed into.
    #[arg(long, value_name = "DIR", default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,

    /// evio's data directory (agent key, file store), removed unless
    /// --keep-data.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/evio")]
    pub data_dir: PathBuf,

    /// Leave the data directory in place.
    #[arg(long)]
    pub keep_data: bool,

    /// Also free this node's pod subnet and host address in the store, so
    /// that another node can have them. Without it the node only leaves the
    /// overlay (its record is removed) and keeps its allocations.
    #[arg(long)]
    pub release: bool,

    /// The agent's control socket: a running agent is asked to leave first.
    #[arg(long, value_name = "PATH", default_value = crate::agent::DEFAULT_CONTROL_SOCKET)]
    pub control_socket: PathBuf,
}

/// What a run did, item by item.
#[derive(Debug, Default)]
struct Teardown {
    removed: Vec<String>,
    notes: Vec<String>,
    errors: Vec<String>,
}

impl Teardown {
    fn removed(&mut self, what: impl Into<String>) {
        let what = what.into();
        println!("removed {what}");
        self.removed.push(what);
    }

    fn note(&mut self, what: impl Into<String>) {
        let what = what.into();
        println!("kept {what}");
        self.notes.push(what);
    }

    fn failed(&mut self, what: impl std::fmt::Display, err: impl std::fmt::Display) {
        let line = format!("{what}: {err}");
        eprintln!("evio-node: could not remove {line}");
        self.errors.push(line);
    }

    fn temps(&mut self, dir: &Path, name: &str) {
        for p in remove_leftover_temps(dir, name) {
            self.removed(format!("leftover {}", p.display()));
        }
    }
}

pub fn run(args: Args) -> Result<(), NodeError> {
    let plan = args.node.resolve()?;
    let overlay = OverlayConf::parse(&plan.conf)?;
    let mut t = Teardown::default();
    let network = plan.gen.name.clone();
    let name = args.conflist.name(&plan.conf)?;

    // The conflist first: from then on the runtime sends no new pods here.
    conflist(&mut t, &args.conflist.cni_conf_dir, &name, &network);
    plugin_binary(&mut t, &args.cni_bin_dir);
    // A running agent leaves first (a stop would keep its devices).
    stop_agent(&mut t, &args.control_socket);
    match Handle::new() {
        Ok(mut h) => {
            interfaces(&mut t, &mut h, &plan, &overlay);
            host_rules(&mut t, &mut h);
            if plan.gen.bridge_type() == "ovs" {
                ovs_bridge(&mut t, &mut h, &plan);
            } else {
                linux_bridge(&mut t, &mut h, plan.gen.bridge());
            }
        }
        Err(e) => t.failed("the node's interfaces", e),
    }
    match evio_net::nft::remove_table() {
        Ok(true) => t.removed("nftables table inet evio"),
        Ok(false) => {}
        Err(e) => t.failed("nftables table inet evio", e),
    }
    ipam_dir(&mut t, &plan);
    if args.release {
        release(&mut t, &plan, &args);
    } else {
        match crate::agent::remove_record(&plan, args.node.store.timeout) {
            Ok(true) => t.removed(format!("peer record of node {} in {}", plan.node, plan.url)),
            Ok(false) => {}
            Err(e) => t.failed(
                format!("node {}'s peer record in {}", plan.node, plan.url),
                e,
            ),
        }
    }
    data_dir(&mut t, &args);

    if !t.errors.is_empty() {
        return Err(NodeError::Uninstall(format!(
            "{} item(s) could not be removed: {}",
            t.errors.len(),
            t.errors.join("; ")
        )));
    }
    if t.removed.is_empty() {
        println!("nothing to do: no evio state of network {network} on this node");
    } else {
        println!("evio removed ({} item(s))", t.removed.len());
    }
    Ok(())
}

/// Whether the conflist text is the one config-gen writes for `network`.
fn is_our_conflist(bytes: &[u8], network: &str) -> bool {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(bytes) else {
        return false;
    };
    let plugins = v.get("plugins").and_then(|p| p.as_array());
    v.get("name").and_then(|n| n.as_str()) == Some(network)
        && plugins.is_some_and(|ps| {
            ps.iter()
                .any(|p| p.get("type").and_then(|t| t.as_str()) == Some(PLUGIN_BIN))
        })
}

fn conflist(t: &mut Teardown, dir: &Path, name: &str, network: &str) {
    t.temps(dir, name);
    let path = dir.join(name);
    match std::fs::read(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => t.failed(path.display(), e),
        Ok(bytes) if is_our_conflist(&bytes, network) => match std::fs::remove_file(&path) {
            Ok(()) => t.removed(path.display().to_string()),
            Err(e) => t.failed(path.display(), e),
        },
        // Someone else's file of the same name: theirs to remove.
        Ok(_) => t.note(format!(
            "{}: not evio's conflist for network {network}",
            path.display()
        )),
    }
}

fn plugin_binary(t: &mut Teardown, dir: &Path) {
    t.temps(dir, PLUGIN_BIN);
    let path = dir.join(PLUGIN_BIN);
    match std::fs::symlink_metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => t.failed(path.display(), e),
        Ok(m) if m.is_file() => match std::fs::remove_file(&path) {
            Ok(()) => t.removed(path.display().to_string()),
            Err(e) => t.failed(path.display(), e),
        },
        // install-cni writes regular files only.
        Ok(_) => t.note(format!("{}: not a regular file", path.display())),
    }
}

/// Pod veths the plugin's naming says are this network's (or evio's,
/// untagged), and the agent's TAP and TUN.
fn interfaces(t: &mut Teardown, h: &mut Handle, plan: &Resolved, overlay: &OverlayConf) {
    let links = match h.links() {
        Ok(l) => l,
        Err(e) => return t.failed("pod veths (listing links)", e),
    };
    let network = &plan.gen.name;
    let agent = [
        crate::agent::tap_name(plan.gen.bridge()),
        overlay.host_interface.clone(),
    ];
    for l in &links {
        let ours = host_veth_of(l, network).is_some()
            || (agent.contains(&l.name) && l.kind.as_deref() == Some("tun"));
        if !ours {
            continue;
        }
        match h.delete_link_by_name(&l.name) {
            Ok(true) => t.removed(format!("interface {}", l.name)),
            // Gone meanwhile (a pod's DEL, the agent exiting).
            Ok(false) => {}
            Err(e) => t.failed(format!("interface {}", l.name), e),
        }
    }
}

/// The agent's policy rule for host-overlay replies (its routes went with
/// the host-overlay interface): every rule that looks up evio's table.
fn host_rules(t: &mut Teardown, h: &mut Handle) {
    for family in [evio_net::Family::V4, evio_net::Family::V6] {
        let rules = match h.rules(family) {
            Ok(r) => r,
            Err(e) => return t.failed("policy routing rules", e),
        };
        for r in rules
            .iter()
            .filter(|r| r.table == evio_agent::hostroute::TABLE)
        {
            match h.del_rule(r) {
                Ok(()) => t.removed(format!("routing rule {r:?}")),
                Err(e) if e.is_not_found() => {}
                Err(e) => t.failed(format!("routing rule {r:?}"), e),
            }
        }
    }
}

fn ovs_bridge(t: &mut Teardown, h: &mut Handle, plan: &Resolved) {
    let bridge = plan.gen.bridge();
    let endpoint = plan.gen.ovsdb();
    // No OVSDB socket: no OVS on this node, so no OVS bridge, unless its
    // device is still there (a stopped OVS), which only OVS can remove.
    if let Some(path) = endpoint.strip_prefix("unix:") {
        if !Path::new(path).exists() {
            match h.link_by_name(bridge) {
                Ok(Some(l)) if l.kind.as_deref() == Some("openvswitch") => t.failed(
                    format!("OVS bridge {bridge}"),
                    format!("its device exists but OVSDB ({endpoint}) is not running"),
                ),
                Ok(_) => {}
                Err(e) => t.failed(format!("OVS bridge {bridge}"), e),
            }
            return;
        }
    }
    let mut client = match evio_ovsdb::Client::connect(endpoint, OVSDB_TIMEOUT) {
        Ok(c) => c,
        Err(e) => return t.failed(format!("OVS bridge {bridge}"), e),
    };
    let ports = match client.ports(bridge) {
        Ok(p) => p,
        Err(evio_ovsdb::Error::NotFound(_)) => return,
        Err(e) => return t.failed(format!("OVS bridge {bridge}"), e),
    };
    // evio's conntrack flows, found by their cookie: on a bridge that stays
    // (foreign ports) they must not outlive evio; other flows stay.
    let mgmt =
        evio_plugin::switch::flows::run_dir_of(plan.gen.ovs_run_dir().map(Path::new), endpoint)
            .join(format!("{bridge}.mgmt"));
    if mgmt.exists() {
        match evio_plugin::switch::flows::remove(&mgmt) {
            Ok(()) => t.removed(format!("evio's OpenFlow flows on {bridge}")),
            Err(e) => t.failed(format!("evio's OpenFlow flows on {bridge}"), e),
        }
    }
    let mut foreign = Vec::new();
    for p in ports {
        let owner = p.external_ids.get(ovs_ids::OWNER).map(String::as_str);
        let Some(owner @ (ovs_ids::OWNER_VALUE | ovs_ids::OWNER_AGENT)) = owner else {
            foreign.push(p.name);
            continue;
        };
        match client.del_port_if(&p.name, &[(ovs_ids::OWNER, owner)]) {
            Ok(true) => t.removed(format!("OVS port {}", p.name)),
            Ok(false) => {}
            Err(e) => t.failed(format!("OVS port {}", p.name), e),
        }
    }
    if !foreign.is_empty() {
        return t.failed(
            format!("OVS bridge {bridge}"),
            format!(
                "ports evio did not add are on it ({}); remove them or the bridge by hand",
                foreign.join(", ")
            ),
        );
    }
    match client.del_bridge_if_empty(bridge) {
        Ok(true) => t.removed(format!("OVS bridge {bridge}")),
        Ok(false) => return,
        Err(e) => return t.failed(format!("OVS bridge {bridge}"), e),
    }
    // OVSDB has forgotten the bridge, but ovs-vswitchd removes its device
    // only when it next reconfigures: wait for that (as `ovs-vsctl del-br`
    // does), so that "removed" means the device is gone too.
    if let Err(e) = client.wait_reconfigured(OVSDB_TIMEOUT) {
        t.failed(format!("OVS bridge {bridge} device"), e);
    }
}

fn linux_bridge(t: &mut Teardown, h: &mut Handle, bridge: &str) {
    let what = format!("Linux bridge {bridge}");
    let links = match h.links() {
        Ok(l) => l,
        Err(e) => return t.failed(what, e),
    };
    let Some(br) = links.iter().find(|l| l.name == bridge) else {
        return;
    };
    if br.kind.as_deref() != Some("bridge") {
        return t.note(format!(
            "{bridge}: a {} device, not the Linux bridge evio makes",
            br.kind.as_deref().unwrap_or("physical")
        ));
    }
    // evio's ports (pod veths, the agent's TAP) are gone by now.
    let others: Vec<&str> = links
        .iter()
        .filter(|l| l.master == Some(br.index))
        .map(|l| l.name.as_str())
        .collect();
    if !others.is_empty() {
        return t.failed(
            what,
            format!(
                "ports evio did not add are on it ({}); remove them or the bridge by hand",
                others.join(", ")
            ),
        );
    }
    match h.delete_link_by_name(bridge) {
        Ok(true) => t.removed(what),
        Ok(false) => {}
        Err(e) => t.failed(what, e),
    }
}

/// host-local's reservations for this network: a later install would
/// otherwise inherit addresses of pods that are long gone.
fn ipam_dir(t: &mut Teardown, plan: &Resolved) {
    let base = plan
        .gen
        .ipam_data_dir()
        .unwrap_or(evio_cni::host_local::DEFAULT_DATA_DIR);
    remove_dir(t, &Path::new(base).join(&plan.gen.name));
}

fn remove_dir(t: &mut Teardown, dir: &Path) {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => t.removed(dir.display().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => t.failed(dir.display(), e),
    }
}

/// Asks a running agent to leave and waits (bounded) until it is gone.
fn stop_agent(t: &mut Teardown, socket: &Path) {
    let ask = |what| evio_agent::control::request(socket, what, Duration::from_secs(2));
    if !ask("leave").is_ok_and(|a| a.contains("\"leaving\":true")) {
        return;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while ask("health").is_ok() {
        if std::time::Instant::now() > deadline {
            return t.failed(
                format!("the agent at {}", socket.display()),
                "it did not exit within 10 s of being asked to leave",
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    t.removed(format!(
        "the agent at {} (it left the network)",
        socket.display()
    ));
}

fn release(t: &mut Teardown, plan: &Resolved, args: &Args) {
    let (network, node) = (plan.gen.name.as_str(), plan.node.as_str());
    // Opening a file store creates it (and its lock file): a store that is
    // not there holds no allocation, and a second run must not make one.
    if let StoreUrl::File(path) = &plan.url {
        if !path.exists() {
            return;
        }
    }
    // The node itself goes: live or not, and no note is left for it (it
    // knows; a reinstall starts afresh).
    let req = ReleaseRequest {
        force: true,
        reason: "release".into(),
        by: "evio-node uninstall".into(),
    };
    let done = block_on_with_timeout(&plan.url, args.node.store.timeout, async {
        let store = open_overlay_store(&plan.url, &plan.opts).await?;
        let freed = match store.release_node(network, node, &req).await {
            Ok(f) => Some(f),
            Err(SubnetError::NotFound { .. }) => None,
            Err(e) => return Err(e.into()),
        };
        store.forget_released(network, node).await?;
        Ok(freed)
    });
    match done {
        Ok(Some(f)) => {
            if let Some(s) = f.subnet {
                t.removed(format!("subnet {s} of node {node} in {}", plan.url));
            }
            if let Some(a) = f.host {
                t.removed(format!("host address {a} of node {node} in {}", plan.url));
            }
            if f.record {
                t.removed(format!("peer record of node {node} in {}", plan.url));
            }
        }
        Ok(None) => {}
        Err(e) => t.failed(format!("node {node}'s allocations in {}", plan.url), e),
    }
}

fn data_dir(t: &mut Teardown, args: &Args) {
    let dir = &args.data_dir;
    if args.keep_data {
        if dir.exists() {
            t.note(format!("{} (--keep-data)", dir.display()));
        }
        return;
    }
    // A mistyped flag must not become `rm -rf /`.
    if !dir.is_absolute() || dir.parent().is_none() {
        return t.failed(dir.display(), "--data-dir must be an absolute path below /");
    }
    remove_dir(t, dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_our_conflist_is_ours() {
        let ours = br#"{"name":"evio","plugins":[{"type":"evio"},{"type":"portmap"}]}"#;
        assert!(is_our_conflist(ours, "evio"));
        assert!(!is_our_conflist(ours, "other"));
        let theirs = br#"{"name":"evio","plugins":[{"type":"bridge"}]}"#;
        assert!(!is_our_conflist(theirs, "evio"));
        assert!(!is_our_conflist(b"not json", "evio"));
    }
}
