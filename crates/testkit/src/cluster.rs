//! A simulated multi-node cluster on one machine, shared by the `evio-sim`
//! binary (the README's main job) and the integration tests, so that the
//! code that builds simulated nodes exists once.
//!
//! Layout:
//! * a "fabric" netns holding a Linux bridge that stands in for the overlay:
//!   every node has exactly one uplink veth into it, so the node bridges form
//!   one loop-free L2 segment;
//! * per node: a netns with its own Open vSwitch (userspace datapath) or none
//!   for the Linux-bridge type, and the conflist written by the real
//!   `evio-node config-gen` against one embedded file store shared by all
//!   nodes of the cluster;
//! * per pod: a netns attached by the real `evio` plugin, invoked exactly as
//!   a runtime invokes the first plugin of a conflist.
//!
//! Everything lives in namespaces and temp dirs created here and is removed
//! by [`Cluster::down`] or on drop. Set-up steps return errors instead of
//! panicking because `evio-sim` is built with `panic = "abort"` in release,
//! where a panic would skip every destructor; for the remaining panics of the
//! lower layers (netns creation, OVS start-up) [`emergency_cleanup`] removes
//! what a panic hook can still reach.

use std::fmt;
use std::net::IpAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use crate::agent::{Agent, AgentSpec};
use crate::etcd::{Etcd, EtcdTlsFiles};
use crate::natlab::{Coturn, Lab, NatType, NodeId};
use crate::netns::Netns;
use crate::ovs::Ovs;
use crate::plugin::{ping, run_bounded, tcp_roundtrip_n, Cni, Pod, CNI_PLUGIN_DIR};

/// The Linux bridge in the fabric netns that joins the node uplinks.
pub const FABRIC_BRIDGE: &str = "fabric0";
/// Name of a node's uplink veth inside the node netns (its bridge port).
pub const UPLINK: &str = "uplink";
/// Name of the conflist `evio-node config-gen` writes.
pub const CONFLIST: &str = "10-evio.conflist";
/// Bound for one `ip`/`ovs-vsctl` set-up command.
const CMD_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound for one `config-gen` run; its own store timeout defaults to 30 s.
const CONFIG_GEN_TIMEOUT: Duration = Duration::from_secs(45);

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("interrupted")]
    Interrupted,
    #[error("{what} not found at {path}: build it first with `{build}`")]
    MissingBinary {
        what: &'static str,
        path: PathBuf,
        build: &'static str,
    },
    #[error("invalid option: {0}")]
    Option(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} failed: {detail}")]
    Step { what: String, detail: String },
    #[error("teardown incomplete:\n{}", .0.join("\n"))]
    Teardown(Vec<String>),
}

impl ClusterError {
    fn step(what: impl Into<String>, detail: impl fmt::Display) -> ClusterError {
        ClusterError::Step {
            what: what.into(),
            detail: detail.to_string(),
        }
    }

    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ClusterError + '_ {
        move |source| ClusterError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BridgeType {
    Ovs,
    Linux,
}

impl BridgeType {
    /// The `bridgeType` value of the plugin config.
    pub fn as_str(self) -> &'static str {
        match self {
            BridgeType::Ovs => "ovs",
            BridgeType::Linux => "linux",
        }
    }
}

impl fmt::Display for BridgeType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What to bring up.
#[derive(Debug, Clone)]
pub struct ClusterOpts {
    pub nodes: usize,
    pub pods_per_node: usize,
    pub bridge_type: BridgeType,
    pub pod_cidr: String,
    pub node_bits: u8,
    /// Network name (`name` of net-conf.json and of the conflist).
    pub network: String,
    /// The `evio` plugin executable; its directory goes first in `CNI_PATH`.
    pub evio_bin: PathBuf,
    /// The `evio-node` executable.
    pub evio_node_bin: PathBuf,
    /// Set (e.g. by a signal handler) to make set-up and probes stop at the
    /// next step with [`ClusterError::Interrupted`].
    pub cancel: Option<Arc<AtomicBool>>,
    /// Join the nodes with `evio-node agent` over a NAT lab instead of the
    /// plain fabric link.
    pub overlay: Option<OverlayOpts>,
    /// Keys merged into every node's net-conf.json (the ConfigMap's), e.g.
    /// `isDefaultGateway`, which pods need to reach ClusterIPs.
    pub netconf: Vec<(String, Value)>,
}

/// How an overlay cluster is laid out.
#[derive(Debug, Clone)]
pub struct OverlayOpts {
    /// Sites of the NAT lab: each a NAT type and how many nodes sit behind
    /// it. The cluster's node count is their sum.
    pub sites: Vec<(NatType, usize)>,
    pub host_cidr: String,
    /// etcd in the internet namespace instead of the embedded file store.
    pub etcd: bool,
    /// That etcd serves TLS and wants client certificates; every node gets
    /// a copy of the client files ([`Cluster::etcd_client_tls`]) and
    /// config-gen and the agents their `--etcd-ca/cert/key` flags.
    pub etcd_tls: bool,
    /// coturn in the internet namespace as every node's STUN and TURN
    /// server (TURN over TCP for a site where UDP cannot get out).
    pub turn: bool,
    /// A network key every node holds (`overlay.networkKeyFile`).
    pub network_key: bool,
    /// Environment for the agents (e.g. `EVIO_LOG`).
    pub agent_env: Vec<(String, String)>,
    /// Per node (by index): JSON merged into its net-conf.json (an
    /// `overlay` object is merged key by key), e.g. a different network key.
    pub node_netconf: Vec<(usize, Value)>,
    /// Sites (by index into `sites`) that also get the lab's IPv6 internet
    /// before the agents start ([`crate::natlab::Lab::add_ipv6`]): a
    /// global 2001:db8:K::/64 behind the router's stateful firewall, or
    /// on the internet segment for a public site. Not a double NAT.
    pub ipv6_sites: Vec<usize>,
    /// With `turn`: a second coturn (on the lab's first extra server
    /// address) as every node's second STUN server, so that a node behind
    /// a symmetric NAT sees two mappings and knows it (birthday probing
    /// needs that; docs/natlab.md).
    pub stun2: bool,
    /// Sites (by index into `sites`) whose nodes are IPv6-only (issue 25):
    /// the site gets the IPv6 internet as with `ipv6_sites`, its nodes lose
    /// IPv4 before config-gen runs, and they reach the store (etcd, which
    /// then serves on the lab internet's IPv6 address too) and coturn (it
    /// listens there too) over IPv6. Not with `etcd_tls`.
    pub ipv6_only_sites: Vec<usize>,
}

impl OverlayOpts {
    /// `n` nodes with public addresses on one routed internet: no NAT.
    pub fn flat(n: usize) -> OverlayOpts {
        OverlayOpts {
            sites: vec![(NatType::Public, n)],
            host_cidr: "10.10.0.0/16".into(),
            etcd: false,
            etcd_tls: false,
            turn: false,
            network_key: true,
            agent_env: Vec::new(),
            node_netconf: Vec::new(),
            ipv6_sites: Vec::new(),
            stun2: false,
            ipv6_only_sites: Vec::new(),
        }
    }

    /// The scale lab: `n` nodes, each on its own /24 of 100.64.0.0/10
    /// behind one router namespace (no shared segment, no NAT), the etcd
    /// store in the internet namespace. See [`NatType::Routed`].
    pub fn routed(n: usize) -> OverlayOpts {
        OverlayOpts {
            sites: vec![(NatType::Routed, n)],
            host_cidr: "10.10.0.0/16".into(),
            etcd: true,
            etcd_tls: false,
            turn: false,
            network_key: true,
            agent_env: Vec::new(),
            node_netconf: Vec::new(),
            ipv6_sites: Vec::new(),
            stun2: false,
            ipv6_only_sites: Vec::new(),
        }
    }

    /// The main job's lab: sites behind different NATs, one pair that only
    /// a relay can join (symmetric-symmetric), a site where UDP cannot get
    /// out, two nodes behind one router, and a home router that grants
    /// port mappings (miniupnpd). `scripts/cluster.sh` and the benchmark's
    /// NAT sections (5.2, 8) run exactly these sites.
    pub fn nat_lab() -> OverlayOpts {
        OverlayOpts {
            sites: vec![
                (NatType::PortRestrictedCone, 2),
                (NatType::Symmetric, 1),
                (NatType::Symmetric, 1),
                (NatType::FullCone, 1),
                (NatType::DoubleNat, 1),
                (NatType::UdpBlocked, 1),
                (NatType::Public, 1),
                (NatType::Upnp, 1),
                // Dual-stack (issue 25): behind a symmetric IPv4 NAT with a
                // global IPv6 address, as `ipv6_sites` below says, like
                // site 2: the two go direct over IPv6, where over IPv4
                // only the relay joins them.
                (NatType::Symmetric, 1),
            ],
            host_cidr: "10.10.0.0/16".into(),
            etcd: false,
            etcd_tls: false,
            turn: true,
            network_key: true,
            agent_env: Vec::new(),
            node_netconf: Vec::new(),
            // Site 2 (symmetric), the public site and the last one.
            ipv6_sites: vec![2, 6, 8],
            stun2: true,
            ipv6_only_sites: Vec::new(),
        }
    }

    pub fn nodes(&self) -> usize {
        self.sites.iter().map(|(_, n)| n).sum()
    }
}

impl ClusterOpts {
    /// Defaults: 3 nodes × 2 pods on OVS, 10.244.0.0/16 split with 8 node bits.
    pub fn new(evio_bin: impl Into<PathBuf>, evio_node_bin: impl Into<PathBuf>) -> ClusterOpts {
        ClusterOpts {
            nodes: 3,
            pods_per_node: 2,
            bridge_type: BridgeType::Ovs,
            pod_cidr: "10.244.0.0/16".into(),
            node_bits: 8,
            network: "evio-sim".into(),
            evio_bin: evio_bin.into(),
            evio_node_bin: evio_node_bin.into(),
            cancel: None,
            overlay: None,
            netconf: Vec::new(),
        }
    }

    fn cancelled(&self) -> bool {
        self.cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed))
    }

    fn check_cancel(&self) -> Result<(), ClusterError> {
        if self.cancelled() {
            Err(ClusterError::Interrupted)
        } else {
            Ok(())
        }
    }

    fn pod_prefix(&self) -> Result<u8, ClusterError> {
        let (addr, prefix) = self
            .pod_cidr
            .split_once('/')
            .ok_or_else(|| ClusterError::Option(format!("pod CIDR {:?}", self.pod_cidr)))?;
        let bad = || ClusterError::Option(format!("pod CIDR {:?}", self.pod_cidr));
        let ip: IpAddr = addr.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        if prefix > max_prefix(ip) {
            return Err(bad());
        }
        Ok(prefix)
    }
}

/// Where the binaries of the current cargo profile are when running from a
/// test executable (`target/<profile>/deps/NAME`): `target/<profile>`.
pub fn profile_dir_of_current_exe() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    Some(exe.parent()?.parent()?.to_path_buf())
}

/// One pod of the cluster.
pub struct SimPod {
    /// Short label, `n<node>p<pod>`.
    pub name: String,
    pub pod: Pod,
    pub ip: IpAddr,
    pub prefix: u8,
    /// The plugin's ADD result, kept as a runtime's cache keeps it: it is the
    /// `prevResult` of the DEL.
    pub result: Value,
}

/// One node of the cluster. Field order is drop order: pods, then OVS, then
/// the node netns (killing the daemons by netns first would skip their
/// orderly stop).
pub struct SimNode {
    pub pods: Vec<SimPod>,
    /// The overlay agent (stopped after the pods' DEL, before OVS).
    pub agent: Option<Agent>,
    pub ovs: Option<Ovs>,
    pub ns: Netns,
    /// The Kubernetes node name given to config-gen.
    pub name: String,
    pub conf_dir: PathBuf,
    /// The conflist exactly as config-gen wrote it.
    pub conflist: Value,
    /// The conflist's `evio` entry with `name` and `cniVersion` copied in and
    /// `ipam.dataDir` pointing into the cluster's temp dir.
    pub plugin_conf: Value,
    /// Whether config-gen itself put our `dataDir` into the conflist (else
    /// only `plugin_conf` has it).
    pub conflist_has_data_dir: bool,
    /// host-local's data dir for this node.
    pub data_dir: PathBuf,
    pub subnet: String,
    pub gateway: IpAddr,
    pub bridge: String,
    /// config-gen's one-line report on stdout.
    pub config_gen_output: String,
    /// The node's net-conf.json.
    pub netconf_path: PathBuf,
    /// Overlay clusters: the lab node, its site's NAT type and site index.
    pub lab: Option<(NodeId, NatType, usize)>,
}

impl SimNode {
    pub fn cni<'a>(&'a self, evio_bin: &Path) -> Cni<'a> {
        Cni::new(evio_bin, &self.ns)
    }

    /// Restarts OVS daemons that died (a terminal's Ctrl-C reaches them too,
    /// being in our process group), so that DEL can still remove ports.
    fn revive_ovs(&mut self, errors: &mut Vec<String>) {
        let Some(ovs) = self.ovs.as_mut() else { return };
        let r = catch_unwind(AssertUnwindSafe(|| {
            if !ovs.ovsdb_running() {
                ovs.kill_ovsdb();
                ovs.start_ovsdb();
            }
            if !ovs.vswitchd_running() {
                ovs.kill_vswitchd();
                ovs.start_vswitchd();
            }
        }));
        if let Err(p) = r {
            errors.push(format!(
                "{}: restarting OVS for teardown: {}",
                self.name,
                panic_message(&p)
            ));
        }
    }
}

/// A running simulated cluster. See the module docs.
pub struct Cluster {
    nodes: Vec<SimNode>,
    fabric: Option<Netns>,
    dir: Option<tempfile::TempDir>,
    opts: ClusterOpts,
    tracked: Vec<Tracked>,
    // Servers and the lab go after the nodes (field order is drop order).
    coturn: Option<Coturn>,
    coturn2: Option<Coturn>,
    etcd: Option<Etcd>,
    lab: Option<Lab>,
}

impl Cluster {
    /// Builds the whole cluster. On any error (or cancellation) everything
    /// built so far is torn down before returning.
    pub fn up(opts: ClusterOpts) -> Result<Cluster, ClusterError> {
        let cancel = opts.cancel.clone();
        Cluster::build(opts).map_err(|e| interrupted_or(e, cancel.as_deref()))
    }

    fn build(opts: ClusterOpts) -> Result<Cluster, ClusterError> {
        check_binaries(&opts)?;
        if opts.nodes == 0 {
            return Err(ClusterError::Option("at least one node".into()));
        }
        let pod_prefix = opts.pod_prefix()?;
        let dir = tempfile::Builder::new()
            .prefix("evio-sim-")
            .tempdir()
            .map_err(ClusterError::io(Path::new("temp dir")))?;
        let mut c = Cluster {
            nodes: Vec::new(),
            fabric: None,
            tracked: Vec::new(),
            dir: None,
            opts,
            coturn: None,
            coturn2: None,
            etcd: None,
            lab: None,
        };
        c.track(Tracked::Dir(dir.path().to_path_buf()));
        c.dir = Some(dir);

        if c.opts.overlay.is_some() {
            c.build_overlay(pod_prefix)?;
            return Ok(c);
        }
        c.opts.check_cancel()?;
        let fabric = c.new_netns("evf")?;
        cmd_ok(
            fabric.command(&["ip", "link", "add", FABRIC_BRIDGE, "type", "bridge"]),
            "create the fabric bridge",
        )?;
        cmd_ok(
            fabric.command(&["ip", "link", "set", FABRIC_BRIDGE, "up"]),
            "bring up the fabric bridge",
        )?;
        c.fabric = Some(fabric);

        for i in 0..c.opts.nodes {
            c.opts.check_cancel()?;
            let ns = c.new_netns("evn")?;
            let node = c.new_node(i, pod_prefix, ns, None)?;
            c.nodes.push(node);
        }
        for i in 0..c.nodes.len() {
            for j in 0..c.opts.pods_per_node {
                c.opts.check_cancel()?;
                c.add_pod(i, j)?;
            }
        }
        for i in 0..c.nodes.len() {
            c.opts.check_cancel()?;
            c.plug_uplink(i)?;
        }
        Ok(c)
    }

    pub fn opts(&self) -> &ClusterOpts {
        &self.opts
    }

    pub fn nodes(&self) -> &[SimNode] {
        &self.nodes
    }

    /// All pods, node by node, with the index of their node.
    pub fn pods(&self) -> Vec<(usize, &SimPod)> {
        self.nodes
            .iter()
            .enumerate()
            .flat_map(|(i, n)| n.pods.iter().map(move |p| (i, p)))
            .collect()
    }

    pub fn fabric(&self) -> Option<&Netns> {
        self.fabric.as_ref()
    }

    /// The cluster's temp dir (file store, conf dirs, host-local data).
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_ref().map(|d| d.path())
    }

    /// The shared store, as config-gen's `--store` takes it: the embedded
    /// file store, or etcd in the lab's internet namespace.
    pub fn store_url(&self) -> String {
        match &self.etcd {
            Some(e) => format!("etcd://{}", e.endpoint()),
            None => format!("file://{}", self.store_path().display()),
        }
    }

    /// Whether lab site `site` is IPv6-only ([`OverlayOpts::ipv6_only_sites`]).
    fn v6_only_site(&self, site: Option<usize>) -> bool {
        let only = self.opts.overlay.as_ref().map(|o| &o.ipv6_only_sites);
        site.is_some_and(|s| only.is_some_and(|v| v.contains(&s)))
    }

    /// [`Cluster::store_url`] as a node of lab site `site` reaches it: etcd
    /// over IPv6 from an IPv6-only site.
    fn store_url_from(&self, site: Option<usize>) -> String {
        match self.etcd.as_ref().and_then(|e| e.endpoint6()) {
            Some(ep) if self.v6_only_site(site) => format!("etcd://{ep}"),
            _ => self.store_url(),
        }
    }

    /// The NAT lab of an overlay cluster.
    pub fn lab(&self) -> Option<&Lab> {
        self.lab.as_ref()
    }

    pub fn coturn(&mut self) -> Option<&mut Coturn> {
        self.coturn.as_mut()
    }

    pub fn etcd(&self) -> Option<&Etcd> {
        self.etcd.as_ref()
    }

    pub fn etcd_mut(&mut self) -> Option<&mut Etcd> {
        self.etcd.as_mut()
    }

    /// The etcd client files every node's config-gen and agent use (copies
    /// of the CA's, so a test can rotate them as an operator would, in
    /// place): `None` without [`OverlayOpts::etcd_tls`].
    pub fn etcd_client_tls(&self) -> Option<EtcdTlsFiles> {
        let on = self
            .opts
            .overlay
            .as_ref()
            .is_some_and(|o| o.etcd && o.etcd_tls);
        let dir = self.dir()?.join("etcd-tls");
        on.then(|| EtcdTlsFiles {
            ca: dir.join("ca.crt"),
            client_cert: dir.join("tls.crt"),
            client_key: dir.join("tls.key"),
            user_cert: dir.join("tls.crt"),
            user_key: dir.join("tls.key"),
        })
    }

    /// `--etcd-ca/--etcd-cert/--etcd-key` for the store, when it has TLS.
    fn store_flags(&self) -> Vec<String> {
        let Some(t) = self.etcd_client_tls() else {
            return Vec::new();
        };
        [
            ("--etcd-ca", &t.ca),
            ("--etcd-cert", &t.client_cert),
            ("--etcd-key", &t.client_key),
        ]
        .into_iter()
        .flat_map(|(f, p)| [f.to_string(), p.display().to_string()])
        .collect()
    }

    pub fn node_mut(&mut self, i: usize) -> Option<&mut SimNode> {
        self.nodes.get_mut(i)
    }

    pub fn lab_mut(&mut self) -> Option<&mut Lab> {
        self.lab.as_mut()
    }

    /// The agent of node `i`.
    pub fn agent(&self, i: usize) -> Option<&Agent> {
        self.nodes.get(i).and_then(|n| n.agent.as_ref())
    }

    pub fn agent_mut(&mut self, i: usize) -> Option<&mut Agent> {
        self.nodes.get_mut(i).and_then(|n| n.agent.as_mut())
    }

    fn store_path(&self) -> PathBuf {
        self.dir
            .as_ref()
            .map(|d| d.path().join("subnets.json"))
            .unwrap_or_default()
    }

    fn track(&mut self, t: Tracked) {
        if let Ok(mut live) = LIVE.lock() {
            live.push(t.clone());
        }
        self.tracked.push(t);
    }

    fn new_netns(&mut self, prefix: &str) -> Result<Netns, ClusterError> {
        let ns = guarded("create a network namespace", || Netns::new(prefix))?;
        self.track(Tracked::Netns(ns.name().to_string()));
        Ok(ns)
    }

    fn new_node(
        &mut self,
        i: usize,
        pod_prefix: u8,
        ns: Netns,
        lab: Option<(NodeId, NatType, usize)>,
    ) -> Result<SimNode, ClusterError> {
        let name = format!("node-{i}");
        let ovs = match self.opts.bridge_type {
            BridgeType::Ovs => Some(guarded(&format!("start OVS for {name}"), || {
                Ovs::start(&ns)
            })?),
            BridgeType::Linux => None,
        };
        if let Some(o) = &ovs {
            self.track(Tracked::Dir(o.dir().to_path_buf()));
        }
        let base = self
            .dir()
            .map(|d| d.join(&name))
            .ok_or_else(|| ClusterError::step("node dir", "cluster dir is gone"))?;
        let conf_dir = base.join("net.d");
        let data_dir = base.join("ipam");
        std::fs::create_dir_all(&conf_dir).map_err(ClusterError::io(&conf_dir))?;

        // The ConfigMap's net-conf.json for this node: the same for every
        // node except the OVSDB endpoint, which points at the node's own OVS.
        let mut netconf = json!({
            "name": self.opts.network,
            "podCIDR": self.opts.pod_cidr,
            "nodeBits": self.opts.node_bits,
            "bridgeType": self.opts.bridge_type.as_str(),
            "dataDir": data_dir.display().to_string(),
            "dataStore": self.store_url_from(lab.map(|l| l.2)),
        });
        if let Some(o) = &ovs {
            netconf["ovsdb"] = json!(o.endpoint());
            // vswitchd here runs in userspace whatever modules the machine
            // has: a kernel datapath would be shared by all simulated nodes.
            netconf["ovsDatapath"] = json!("netdev");
        }
        for (k, v) in &self.opts.netconf {
            netconf[k.as_str()] = v.clone();
        }
        if let Some(ov) = self.opts.overlay.clone() {
            self.overlay_netconf(&mut netconf, &ov, &base, lab.map(|l| (l.1, l.2)), i)?;
        }
        let netconf_path = base.join("net-conf.json");
        std::fs::write(&netconf_path, netconf.to_string())
            .map_err(ClusterError::io(&netconf_path))?;

        let bin = self.opts.evio_node_bin.display().to_string();
        let store = self.store_url_from(lab.map(|l| l.2));
        let conf_path = netconf_path.display().to_string();
        let conf_dir_s = conf_dir.display().to_string();
        let mut args = vec![
            bin.as_str(),
            "config-gen",
            "--config",
            &conf_path,
            "--node-name",
            &name,
            "--store",
            &store,
            "--cni-conf-dir",
            &conf_dir_s,
        ];
        let tls = self.store_flags();
        args.extend(tls.iter().map(String::as_str));
        let cmd = ns.command(&args);
        let out = guarded("run config-gen", || {
            run_bounded(cmd, b"", CONFIG_GEN_TIMEOUT)
        })?;
        if !out.success() {
            let why = match out.stderr.trim() {
                "" => out.to_string(),
                e => format!("exit code {}: {e}", out.code),
            };
            return Err(ClusterError::step(format!("config-gen for {name}"), why));
        }
        let conflist_path = conf_dir.join(CONFLIST);
        let text =
            std::fs::read_to_string(&conflist_path).map_err(ClusterError::io(&conflist_path))?;
        let conflist: Value = serde_json::from_str(&text)
            .map_err(|e| ClusterError::step(format!("parse {}", conflist_path.display()), e))?;
        let (plugin_conf, conflist_has_data_dir) = plugin_entry(&conflist, &data_dir)
            .map_err(|e| ClusterError::step(format!("use {}", conflist_path.display()), e))?;
        let gateway = range_gateway(&plugin_conf)
            .map_err(|e| ClusterError::step(format!("use {}", conflist_path.display()), e))?;
        let node_prefix = pod_prefix.saturating_add(self.opts.node_bits);
        let subnet = format!("{}/{node_prefix}", network_of(gateway, node_prefix));
        let bridge = plugin_conf
            .get("bridge")
            .and_then(Value::as_str)
            .unwrap_or("evio0")
            .to_string();
        Ok(SimNode {
            pods: Vec::new(),
            agent: None,
            ovs,
            ns,
            name,
            conf_dir,
            conflist,
            plugin_conf,
            conflist_has_data_dir,
            data_dir,
            subnet,
            gateway,
            bridge,
            config_gen_output: out.stdout.trim().to_string(),
            netconf_path,
            lab,
        })
    }

    /// Overlay clusters: the NAT lab, its servers, one lab node per cluster
    /// node, config-gen and `evio-node agent` on each, then the pods.
    fn build_overlay(&mut self, pod_prefix: u8) -> Result<(), ClusterError> {
        let ov = self
            .opts
            .overlay
            .clone()
            .ok_or_else(|| ClusterError::Option("no overlay options".into()))?;
        if ov.nodes() == 0 {
            return Err(ClusterError::Option("at least one node".into()));
        }
        let lab = guarded("build the NAT lab", Lab::new)?;
        self.track(Tracked::Netns(lab.internet().name().to_string()));
        self.lab = Some(lab);
        let lab = self
            .lab
            .as_ref()
            .ok_or_else(|| ClusterError::step("lab", "gone"))?;
        let v6_only = !ov.ipv6_only_sites.is_empty();
        if v6_only {
            if ov.etcd_tls {
                return Err(ClusterError::Option(
                    "IPv6-only sites with etcd TLS: the certificates name the IPv4 address only"
                        .into(),
                ));
            }
            // The servers listen on the lab's IPv6 internet too: it must be
            // there before they start.
            guarded("the IPv6 internet", || lab.enable_ipv6())?;
        }
        if ov.turn && v6_only {
            self.coturn = Some(guarded("start coturn", || {
                Coturn::start_dual_in(
                    lab.internet(),
                    crate::natlab::SERVER_ADDR,
                    crate::natlab::INTERNET6,
                )
            })?);
        } else if ov.turn {
            self.coturn = Some(guarded("start coturn", || lab.start_coturn())?);
        }
        if ov.turn && ov.stun2 {
            let second = guarded("start a second coturn", || match lab.add_server_addr() {
                std::net::IpAddr::V4(a) => Coturn::start_in(lab.internet(), a),
                std::net::IpAddr::V6(a) => panic!("{a}: not an IPv4 server address"),
            })?;
            self.coturn2 = Some(second);
        }
        if ov.etcd && ov.etcd_tls {
            let (ns, host) = (lab.internet().path(), lab.server_addr());
            let e = guarded("start etcd", || Etcd::start_tls_in(&ns, host))?;
            self.etcd = Some(e);
            self.copy_etcd_client_tls()?;
        } else if ov.etcd && v6_only {
            let (ns, host) = (lab.internet().path(), lab.server_addr());
            let six = std::net::IpAddr::V6(crate::natlab::INTERNET6);
            self.etcd = Some(guarded("start etcd", || {
                Etcd::start_dual_in(&ns, host, six)
            })?);
        } else if ov.etcd {
            self.etcd = Some(guarded("start etcd", || lab.start_etcd())?);
        }
        let mut plan = Vec::new();
        for (si, (nat, count)) in ov.sites.iter().enumerate() {
            self.opts.check_cancel()?;
            let lab = self
                .lab
                .as_mut()
                .ok_or_else(|| ClusterError::step("lab", "gone"))?;
            let site = guarded("add a lab site", || lab.add_site(*nat))?;
            for _ in 0..*count {
                let id = guarded("add a lab node", || lab.add_node(site).id)?;
                plan.push((id, *nat, si));
            }
        }
        for &si in ov.ipv6_sites.iter().chain(&ov.ipv6_only_sites) {
            let lab = self
                .lab
                .as_ref()
                .ok_or_else(|| ClusterError::step("lab", "gone"))?;
            if si >= ov.sites.len() {
                return Err(ClusterError::step(
                    "IPv6 on a lab site",
                    format!("no site {si}"),
                ));
            }
            guarded("IPv6 on a lab site", || {
                lab.add_ipv6(crate::natlab::SiteId(si))
            })?;
        }
        for (id, _, si) in &plan {
            if ov.ipv6_only_sites.contains(si) {
                let lab = self
                    .lab
                    .as_ref()
                    .ok_or_else(|| ClusterError::step("lab", "gone"))?;
                guarded("an IPv6-only node", || lab.remove_ipv4(*id))?;
            }
        }
        let names: Vec<String> = {
            let lab = self
                .lab
                .as_ref()
                .ok_or_else(|| ClusterError::step("lab", "gone"))?;
            let mut v: Vec<String> = lab
                .nodes()
                .iter()
                .map(|n| n.ns.name().to_string())
                .collect();
            for si in 0..ov.sites.len() {
                let s = crate::natlab::SiteId(si);
                v.extend(lab.router(s).map(|r| r.name().to_string()));
                v.extend(lab.inner_router(s).map(|r| r.name().to_string()));
            }
            v
        };
        for n in names {
            self.track(Tracked::Netns(n));
        }
        for (i, (id, nat, si)) in plan.iter().enumerate() {
            self.opts.check_cancel()?;
            let name = self
                .lab
                .as_ref()
                .map(|l| l.node(*id).ns.name().to_string())
                .ok_or_else(|| ClusterError::step("lab", "gone"))?;
            let node = self.new_node(
                i,
                pod_prefix,
                Netns::borrowed(&name),
                Some((*id, *nat, *si)),
            )?;
            self.nodes.push(node);
        }
        for i in 0..self.nodes.len() {
            self.opts.check_cancel()?;
            self.start_agent(i)?;
        }
        // Not an error if some pair does not connect in time: the report
        // (and the tests' assertions) say which.
        let _ = self.wait_overlay(Duration::from_secs(20));
        for i in 0..self.nodes.len() {
            for j in 0..self.opts.pods_per_node {
                self.opts.check_cancel()?;
                self.add_pod(i, j)?;
            }
        }
        Ok(())
    }

    fn copy_etcd_client_tls(&self) -> Result<(), ClusterError> {
        let (Some(to), Some(from)) = (
            self.etcd_client_tls(),
            self.etcd.as_ref().and_then(|e| e.tls()),
        ) else {
            return Ok(());
        };
        if let Some(d) = to.ca.parent() {
            std::fs::create_dir_all(d).map_err(ClusterError::io(d))?;
        }
        for (a, b) in [
            (&from.ca, &to.ca),
            (&from.client_cert, &to.client_cert),
            (&from.client_key, &to.client_key),
        ] {
            std::fs::copy(a, b).map_err(ClusterError::io(b))?;
        }
        Ok(())
    }

    /// The overlay keys of a node's net-conf.json.
    fn overlay_netconf(
        &self,
        netconf: &mut Value,
        ov: &OverlayOpts,
        base: &Path,
        site: Option<(NatType, usize)>,
        index: usize,
    ) -> Result<(), ClusterError> {
        let nat = site.map(|s| s.0);
        let v6_only = self.v6_only_site(site.map(|s| s.1));
        let dir = self
            .dir()
            .ok_or_else(|| ClusterError::step("node dir", "cluster dir is gone"))?;
        netconf["hostCIDR"] = json!(ov.host_cidr);
        let mut o = json!({
            "keyFile": base.join("agent.key").display().to_string(),
            "listenPort": 5800,
        });
        if ov.network_key {
            let path = dir.join("network.key");
            if !path.exists() {
                let mut k = [0u8; 32];
                std::fs::File::open("/dev/urandom")
                    .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut k))
                    .map_err(ClusterError::io(Path::new("/dev/urandom")))?;
                std::fs::write(&path, format!("{}\n", b64(&k))).map_err(ClusterError::io(&path))?;
            }
            o["networkKeyFile"] = json!(path.display().to_string());
        }
        if let Some(t) = &self.coturn {
            let pw = dir.join("turn.password");
            if !pw.exists() {
                std::fs::write(&pw, t.password()).map_err(ClusterError::io(&pw))?;
            }
            // An IPv6-only node knows the server by its IPv6 literal: STUN
            // and TURN over IPv6 (the relayed address it gets is IPv4).
            let server = match t.addr6() {
                Some(a6) if v6_only => a6.to_string(),
                _ => t.addr().to_string(),
            };
            // UDP cannot leave that site: TURN over TCP is its only way out.
            let transport = if nat == Some(NatType::UdpBlocked) {
                "tcp"
            } else {
                "udp"
            };
            o["stun"] = match &self.coturn2 {
                // No NAT on IPv6: a second mapping tells nothing.
                _ if v6_only => json!([server]),
                Some(t2) => json!([server, t2.addr().to_string()]),
                None => json!([server]),
            };
            o["turn"] = json!([{
                "server": server,
                "transport": transport,
                "username": t.user(),
                "passwordFile": pw.display().to_string(),
            }]);
        }
        netconf["overlay"] = o;
        for (_, extra) in ov.node_netconf.iter().filter(|(i, _)| *i == index) {
            if let Some(m) = extra.as_object() {
                for (k, v) in m {
                    match (k.as_str(), v.as_object()) {
                        ("overlay", Some(o)) => {
                            for (ok, ov) in o {
                                netconf["overlay"][ok] = ov.clone();
                            }
                        }
                        _ => netconf[k] = v.clone(),
                    }
                }
            }
        }
        Ok(())
    }

    /// Starts node `i`'s agent.
    pub fn start_agent(&mut self, i: usize) -> Result<(), ClusterError> {
        let site = self.nodes.get(i).and_then(|n| n.lab).map(|l| l.2);
        let store = self.store_url_from(site);
        let env = self
            .opts
            .overlay
            .as_ref()
            .map(|o| o.agent_env.clone())
            .unwrap_or_default();
        let bin = self.opts.evio_node_bin.clone();
        let extra = self.store_flags();
        let node = self
            .nodes
            .get_mut(i)
            .ok_or_else(|| ClusterError::step("start agent", "no such node"))?;
        let base = node
            .conf_dir
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let spec = AgentSpec {
            bin,
            netns: node.ns.name().to_string(),
            config: node.netconf_path.clone(),
            node: node.name.clone(),
            store,
            socket: base.join("agent.sock"),
            log: base.join("agent.log"),
            extra,
            env,
        };
        let a = Agent::start(spec)
            .map_err(|e| ClusterError::step(format!("agent of {}", node.name), e))?;
        node.agent = Some(a);
        Ok(())
    }

    /// Stops node `i`'s agent as a restart does (SIGTERM, SIGKILL after
    /// 6 s): the bridge, the pods, the store and the agent's devices stay.
    /// Returns its exit status and how long it took, `None` if it had no
    /// agent. [`Cluster::start_agent`] starts it again.
    pub fn stop_agent(&mut self, i: usize) -> Option<(std::process::ExitStatus, Duration)> {
        let mut a = self.nodes.get_mut(i)?.agent.take()?;
        a.terminate(Duration::from_secs(6))
    }

    /// Takes node `i` off the network (`evio-node agent --stop-and-leave`):
    /// its agent exits and its devices, bridge port and record go; the
    /// bridge, the pods and the allocations stay. `None` if it had no
    /// agent. [`Cluster::start_agent`] joins it again, from scratch.
    pub fn leave_agent(
        &mut self,
        i: usize,
    ) -> Option<Result<(Option<std::process::ExitStatus>, Duration), String>> {
        let mut a = self.nodes.get_mut(i)?.agent.take()?;
        Some(a.leave(Duration::from_secs(6)))
    }

    /// Waits until every agent has every other node healthy (`connected`,
    /// or `idle`: sessions are made on demand, so a pair that exchanged
    /// nothing has no tunnel and needs none); the time it took (or the
    /// first agent still waiting). A test that needs live tunnels waits
    /// with [`Cluster::connect_overlay`].
    pub fn wait_overlay(&self, timeout: Duration) -> Result<Duration, ClusterError> {
        let t = std::time::Instant::now();
        let want = self.nodes.len().saturating_sub(1);
        for n in &self.nodes {
            let Some(a) = &n.agent else { continue };
            let left = timeout.saturating_sub(t.elapsed());
            a.wait_healthy(want, left)
                .map_err(|e| ClusterError::step(format!("overlay of {}", n.name), e))?;
        }
        Ok(t.elapsed())
    }

    /// Brings up a tunnel between every pair of nodes and waits until every
    /// agent has every other node connected: traffic first (one ping over
    /// the host overlay to each peer not yet connected, again every round),
    /// because an idle pair makes no session. The time it took.
    pub fn connect_overlay(&self, timeout: Duration) -> Result<Duration, ClusterError> {
        let t = std::time::Instant::now();
        self.wait_overlay(timeout)?;
        let names: Vec<&str> = self.nodes.iter().map(|n| n.name.as_str()).collect();
        loop {
            let mut missing = Vec::new();
            for (from, v) in self.peers().iter().enumerate() {
                for to in (0..names.len()).filter(|&to| to != from) {
                    let up = v
                        .as_ref()
                        .and_then(|v| crate::agent::peer(v, names[to]))
                        .is_some_and(|p| p["state"] == "connected");
                    if !up {
                        missing.push((from, to));
                    }
                }
            }
            if missing.is_empty() {
                return Ok(t.elapsed());
            }
            if t.elapsed() >= timeout {
                let pairs: Vec<String> = (missing.iter())
                    .map(|&(a, b)| format!("{} -> {}", names[a], names[b]))
                    .collect();
                let why = format!("not connected within {timeout:?}: {}", pairs.join(", "));
                return Err(ClusterError::step("overlay tunnels", why));
            }
            self.touch(&missing);
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Every node's host-overlay address, as its agent says or, when it
    /// does not answer, as another agent lists it (`None`: no agent knows
    /// one, or no host overlay).
    pub fn host_addrs(&self) -> Vec<Option<IpAddr>> {
        let all = self.peers();
        let parse = |v: &Value| -> Option<IpAddr> {
            v["hostAddress"].as_str()?.split('/').next()?.parse().ok()
        };
        self.nodes
            .iter()
            .zip(&all)
            .map(|(n, own)| {
                // A node whose agent is stopped keeps its record: the other
                // agents still list its address, and traffic to it is what
                // has them find it gone (sessions are on demand).
                own.as_ref().and_then(parse).or_else(|| {
                    all.iter()
                        .flatten()
                        .filter_map(|v| v["peers"].as_array())
                        .flatten()
                        .find(|p| p["node"].as_str() == Some(n.name.as_str()))
                        .and_then(parse)
                })
            })
            .collect()
    }

    /// One ping over the host overlay for each `(from, to)` pair, all at
    /// once (bounded: 1 s each, killed after 3 s): traffic, which is what
    /// brings up the tunnel of an idle pair. Whether each got a reply.
    pub fn touch(&self, pairs: &[(usize, usize)]) -> Vec<bool> {
        let hosts = self.host_addrs();
        let mut children: Vec<Option<std::process::Child>> = pairs
            .iter()
            .map(|&(from, to)| {
                let host = hosts.get(to).copied().flatten()?.to_string();
                let argv = ["ping", "-n", "-q", "-c", "1", "-W", "1", &host];
                let mut cmd = self.nodes.get(from)?.ns.command(&argv);
                cmd.stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null());
                cmd.spawn().ok()
            })
            .collect();
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        let mut ok = vec![false; pairs.len()];
        while std::time::Instant::now() < deadline && children.iter().any(Option::is_some) {
            for (i, slot) in children.iter_mut().enumerate() {
                let Some(c) = slot else { continue };
                if let Ok(Some(st)) = c.try_wait() {
                    ok[i] = st.success();
                    *slot = None;
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        for c in children.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
        ok
    }

    /// [`Cluster::touch`] between every ordered pair of nodes.
    pub fn touch_all(&self) -> Vec<bool> {
        let n = self.nodes.len();
        let pairs: Vec<(usize, usize)> = (0..n)
            .flat_map(|a| (0..n).filter(move |&b| b != a).map(move |b| (a, b)))
            .collect();
        self.touch(&pairs)
    }

    /// Every node's `peers --json` (None for a node without an answering
    /// agent).
    pub fn peers(&self) -> Vec<Option<Value>> {
        self.nodes
            .iter()
            .map(|n| n.agent.as_ref().and_then(|a| a.peers().ok()))
            .collect()
    }

    /// The overlay from every node to every other: host-overlay ping and
    /// the path its agent uses, read after the pings (which bring up an
    /// idle pair's tunnel). Probes from different nodes run in parallel.
    pub fn overlay_report(&self) -> OverlayReport {
        let hosts = self.host_addrs();
        let n = self.nodes.len();
        let mut checks: Vec<HostCheck> = from_every_source(n, |from| {
            let mut pinged = Vec::new();
            for to in (0..n).filter(|&t| t != from) {
                if self.opts.cancelled() {
                    break;
                }
                let ping_ok = hosts[to].is_some_and(|h| {
                    catch_unwind(AssertUnwindSafe(|| {
                        ping(&self.nodes[from].ns, &h.to_string())
                    }))
                    .unwrap_or(false)
                });
                pinged.push((to, ping_ok));
            }
            let view = self.nodes[from].agent.as_ref().and_then(|a| a.peers().ok());
            let mut out = Vec::new();
            for (to, ping_ok) in pinged {
                let entry = view
                    .as_ref()
                    .and_then(|v| crate::agent::peer(v, &self.nodes[to].name).cloned());
                let get = |k: &str| {
                    entry
                        .as_ref()
                        .and_then(|e| e[k].as_str().map(str::to_string))
                };
                out.push(HostCheck {
                    from,
                    to,
                    ping: ping_ok,
                    state: get("state"),
                    path: get("path"),
                    method: get("method"),
                    family: get("family"),
                    endpoint: get("endpoint"),
                    rtt_ms: entry.as_ref().and_then(|e| e["rttMs"].as_f64()),
                });
            }
            out
        });
        checks.sort_by_key(|c| (c.from, c.to));
        OverlayReport {
            nodes: self
                .nodes
                .iter()
                .map(|n| (n.name.clone(), n.lab.map(|l| l.1)))
                .collect(),
            hosts,
            checks,
        }
    }

    /// ADD of one pod through the plugin, as a runtime does it.
    /// Deletes every pod of node `node` through the plugin (DEL) and drops
    /// their namespaces, as a node's reboot ends them.
    pub fn del_pods(&mut self, node: usize) -> Result<(), ClusterError> {
        let evio = self.opts.evio_bin.clone();
        let n = self
            .nodes
            .get_mut(node)
            .ok_or_else(|| ClusterError::step("delete pods", "no such node"))?;
        while let Some(p) = n.pods.pop() {
            let mut conf = n.plugin_conf.clone();
            if let Some(o) = conf.as_object_mut() {
                o.insert("prevResult".into(), p.result.clone());
            }
            let out = guarded("run the plugin", || {
                n.cni(&evio).run(
                    "DEL",
                    &p.pod.id,
                    Some(&p.pod.path()),
                    &p.pod.ifname,
                    Some(&p.pod.k8s_args()),
                    &conf,
                )
            })?;
            if !out.success() {
                return Err(ClusterError::step(format!("DEL of pod {}", p.name), out));
            }
        }
        Ok(())
    }

    /// Adds pod number `j` to node `node` through the plugin (ADD).
    pub fn add_pod(&mut self, node: usize, j: usize) -> Result<(), ClusterError> {
        let pod = guarded("create a pod namespace", Pod::new)?;
        self.track(Tracked::Netns(pod.ns.name().to_string()));
        let evio = self.opts.evio_bin.clone();
        let n = self
            .nodes
            .get_mut(node)
            .ok_or_else(|| ClusterError::step("add pod", "no such node"))?;
        let name = format!("n{node}p{j}");
        let out = guarded("run the plugin", || {
            n.cni(&evio).run(
                "ADD",
                &pod.id,
                Some(&pod.path()),
                &pod.ifname,
                Some(&pod.k8s_args()),
                &n.plugin_conf,
            )
        })?;
        if !out.success() {
            return Err(ClusterError::step(
                format!("ADD of pod {name} on {}", n.name),
                out,
            ));
        }
        let result = out.json.clone().unwrap_or(Value::Null);
        let (ip, prefix) = first_ip(&result)
            .ok_or_else(|| ClusterError::step(format!("ADD of pod {name}"), out))?;
        n.pods.push(SimPod {
            name,
            pod,
            ip,
            prefix,
            result,
        });
        Ok(())
    }

    /// Joins node `i` to the fabric: a veth from the fabric bridge to the
    /// node bridge.
    fn plug_uplink(&mut self, i: usize) -> Result<(), ClusterError> {
        let fabric = self
            .fabric
            .as_ref()
            .ok_or_else(|| ClusterError::step("plug uplink", "no fabric"))?;
        let node = self
            .nodes
            .get(i)
            .ok_or_else(|| ClusterError::step("plug uplink", "no such node"))?;
        ensure_bridge(node)?;
        let far = format!("up{i}");
        // Created in the fabric with the peer put straight into the node:
        // nothing passes through the root namespace.
        cmd_ok(
            fabric.command(&[
                "ip",
                "link",
                "add",
                &far,
                "type",
                "veth",
                "peer",
                "name",
                UPLINK,
                "netns",
                node.ns.name(),
            ]),
            &format!("create uplink of {}", node.name),
        )?;
        cmd_ok(
            fabric.command(&["ip", "link", "set", &far, "master", FABRIC_BRIDGE, "up"]),
            &format!("attach uplink of {} to the fabric", node.name),
        )?;
        match &node.ovs {
            Some(ovs) => {
                vsctl_ok(
                    ovs,
                    &["add-port", &node.bridge, UPLINK],
                    &format!("add {UPLINK} to {} on {}", node.bridge, node.name),
                )?;
                cmd_ok(
                    node.ns.command(&["ip", "link", "set", UPLINK, "up"]),
                    &format!("bring up {UPLINK} on {}", node.name),
                )?;
                // add-port returns once vswitchd reconfigured; a port it
                // could not open has ofport -1 and an error set.
                let out = guarded("ovs-vsctl", || {
                    ovs.try_vsctl(&["get", "Interface", UPLINK, "ofport"])
                })?;
                let ofport = String::from_utf8_lossy(&out.stdout).trim().to_string();
                if !out.status.success() || ofport.parse::<i64>().map_or(true, |p| p <= 0) {
                    return Err(ClusterError::step(
                        format!("OVS port {UPLINK} on {}", node.name),
                        format!("ofport {ofport:?}\n{}", ovs.log("vswitchd")),
                    ));
                }
            }
            None => cmd_ok(
                node.ns
                    .command(&["ip", "link", "set", UPLINK, "master", &node.bridge, "up"]),
                &format!("attach {UPLINK} to {} on {}", node.bridge, node.name),
            )?,
        }
        // The veth gets carrier a moment after both ends are up; a Linux
        // bridge drops what arrives before (the first ARP, and with it a
        // SYN retransmit's second of a first connection).
        wait_carrier(&node.ns, UPLINK, node.ovs.is_none())
            .map_err(|e| ClusterError::step(format!("uplink of {}", node.name), e))
    }

    /// Every pod pings and opens a TCP connection (256 KiB echoed) to every
    /// other pod and to its own node's gateway. Probes from different pods
    /// run in parallel; each one is bounded (ping 3 s, TCP 10 s per step).
    pub fn reachability(&self) -> Result<Reachability, ClusterError> {
        let pods = self.pods();
        let labels: Vec<PodLabel> = pods
            .iter()
            .map(|(n, p)| PodLabel {
                name: p.name.clone(),
                node: *n,
                ip: p.ip,
            })
            .collect();
        let n = pods.len();
        let mut checks: Vec<Check> = from_every_source(n, |from| {
            let targets = (0..n)
                .filter(|&t| t != from)
                .map(Target::Pod)
                .chain(std::iter::once(Target::Gateway));
            let mut out = Vec::new();
            for to in targets {
                if self.opts.cancelled() {
                    break;
                }
                out.extend(self.probe(from, to));
            }
            out
        });
        self.opts.check_cancel()?;
        checks.sort_by_key(|c| (c.from, c.to));
        Ok(Reachability {
            tcp_bytes: if self.opts.overlay.is_some() {
                1 << 20
            } else {
                256 * 1024
            },
            pods: labels,
            gateways: self.nodes.iter().map(|n| n.gateway).collect(),
            checks,
        })
    }

    /// One probe (ping, then a TCP echo) from pod `from` (an index into
    /// [`Cluster::pods`]) to `to`. `None` if `from` or `to` does not exist.
    pub fn probe(&self, from: usize, to: Target) -> Option<Check> {
        let pods = self.pods();
        let (node, src) = pods.get(from)?;
        let (server, ip) = match to {
            Target::Pod(t) => pods.get(t).map(|(_, p)| (&p.pod.ns, p.ip))?,
            Target::Gateway => self.nodes.get(*node).map(|n| (&n.ns, n.gateway))?,
        };
        let ping_ok =
            catch_unwind(AssertUnwindSafe(|| ping(&src.pod.ns, &ip.to_string()))).unwrap_or(false);
        // Across the overlay: 1 MiB, so that a path MTU problem cannot hide
        // behind small segments.
        let bytes = if self.opts.overlay.is_some() {
            1 << 20
        } else {
            256 * 1024
        };
        let tcp = catch_unwind(AssertUnwindSafe(|| {
            tcp_roundtrip_n(server, ip, &src.pod.ns, bytes)
        }))
        .unwrap_or_else(|p| Err(panic_message(&p)));
        Some(Check {
            from,
            to,
            ping: ping_ok,
            tcp,
        })
    }

    /// The table `evio-sim up` prints: node, subnet, gateway, pods with
    /// addresses.
    pub fn summary(&self) -> String {
        if self.opts.overlay.is_some() {
            return self.overlay_summary();
        }
        let mut rows = Vec::new();
        for n in &self.nodes {
            let bridge = format!("{} ({})", n.bridge, self.opts.bridge_type);
            if n.pods.is_empty() {
                rows.push(vec![
                    n.name.clone(),
                    n.subnet.clone(),
                    n.gateway.to_string(),
                    bridge.clone(),
                    "-".into(),
                    "-".into(),
                ]);
            }
            for (k, p) in n.pods.iter().enumerate() {
                let first = k == 0;
                let cell = |s: String| if first { s } else { String::new() };
                rows.push(vec![
                    cell(n.name.clone()),
                    cell(n.subnet.clone()),
                    cell(n.gateway.to_string()),
                    cell(bridge.clone()),
                    p.name.clone(),
                    format!("{}/{}", p.ip, p.prefix),
                ]);
            }
        }
        render_table(
            &["NODE", "SUBNET", "GATEWAY", "BRIDGE", "POD", "ADDRESS"],
            &rows,
        )
    }

    /// Nodes of an overlay cluster: site, NAT type, underlay and host
    /// addresses, subnet, pods.
    fn overlay_summary(&self) -> String {
        let peers = self.peers();
        let mut rows = Vec::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let (site, nat, underlay) = match (n.lab, self.lab.as_ref()) {
                (Some((id, nat, si)), Some(lab)) => (
                    format!("site{si}"),
                    nat.to_string(),
                    format!("{} (public {})", lab.node(id).addr, lab.public_addr(id)),
                ),
                _ => ("-".into(), "-".into(), "-".into()),
            };
            let host = peers
                .get(i)
                .and_then(|p| p.as_ref())
                .and_then(|v| v["hostAddress"].as_str().map(str::to_string))
                .unwrap_or_else(|| "-".into());
            let pods: Vec<String> = n
                .pods
                .iter()
                .map(|p| format!("{} {}", p.name, p.ip))
                .collect();
            rows.push(vec![
                n.name.clone(),
                site,
                nat,
                underlay,
                host,
                n.subnet.clone(),
                n.gateway.to_string(),
                if pods.is_empty() {
                    "-".into()
                } else {
                    pods.join(", ")
                },
            ]);
        }
        render_table(
            &[
                "NODE",
                "SITE",
                "NAT",
                "UNDERLAY",
                "HOST OVERLAY",
                "SUBNET",
                "GATEWAY",
                "PODS",
            ],
            &rows,
        )
    }

    /// How to look inside: one `nsenter` line per namespace of the lab
    /// (internet, routers), node and pod.
    pub fn enter_hints(&self) -> String {
        let mut s = String::new();
        if let Some(f) = &self.fabric {
            s.push_str(&format!(
                "fabric      nsenter --net={}   (bridge {FABRIC_BRIDGE})\n",
                f.path().display()
            ));
        }
        if let Some(lab) = &self.lab {
            s.push_str(&format!(
                "internet    nsenter --net={}   (bridge {}; coturn and etcd run here)\n",
                lab.internet().path().display(),
                crate::natlab::INTERNET_BRIDGE
            ));
            for site in lab.site_ids() {
                let routers = [
                    ("router", lab.router(site)),
                    ("inner", lab.inner_router(site)),
                ];
                for (what, r) in routers {
                    if let Some(r) = r {
                        s.push_str(&format!(
                            "{:<11} nsenter --net={}   ({:?} NAT: nft list ruleset, conntrack -L)\n",
                            format!("site{}-{what}", site.0),
                            r.path().display(),
                            lab.kind(site)
                        ));
                    }
                }
            }
        }
        for n in &self.nodes {
            s.push_str(&format!(
                "{:<11} nsenter --net={}\n",
                n.name,
                n.ns.path().display()
            ));
            if let Some(o) = &n.ovs {
                s.push_str(&format!(
                    "{:<11} ovs-vsctl --db={} show\n",
                    "",
                    o.endpoint()
                ));
            }
            s.push_str(&format!(
                "{:<11} conflist {}\n",
                "",
                n.conf_dir.join(CONFLIST).display()
            ));
            for p in &n.pods {
                s.push_str(&format!(
                    "  {:<9} nsenter --net={}\n",
                    p.name,
                    p.pod.path().display()
                ));
            }
        }
        s
    }

    /// Everything of this cluster that must be gone after teardown.
    pub fn footprint(&self) -> Footprint {
        let mut netns = Vec::new();
        if let Some(f) = &self.fabric {
            netns.push(f.name().to_string());
        }
        let mut paths: Vec<PathBuf> = self.dir().map(Path::to_path_buf).into_iter().collect();
        let mut pids = Vec::new();
        for n in &self.nodes {
            netns.push(n.ns.name().to_string());
            netns.extend(n.pods.iter().map(|p| p.pod.ns.name().to_string()));
            if let Some(o) = &n.ovs {
                paths.push(o.dir().to_path_buf());
                for f in ["ovsdb.pid", "vswitchd.pid"] {
                    if let Ok(s) = std::fs::read_to_string(o.dir().join(f)) {
                        pids.extend(s.trim().parse::<i32>().ok());
                    }
                }
            }
        }
        for ns in &netns {
            pids.extend(netns_pids(ns));
        }
        pids.sort_unstable();
        pids.dedup();
        let processes = pids
            .into_iter()
            .filter_map(|p| proc_comm(p).map(|c| (p, c)))
            .collect();
        Footprint {
            netns,
            processes,
            paths,
        }
    }

    /// Tears down: DEL of every pod through the plugin, then OVS, the
    /// namespaces and the temp dir. Errors of the DELs are reported, but the
    /// rest is removed regardless.
    pub fn down(mut self) -> Result<(), ClusterError> {
        let errors = self.teardown();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ClusterError::Teardown(errors))
        }
    }

    fn teardown(&mut self) -> Vec<String> {
        let mut errors = Vec::new();
        let evio = self.opts.evio_bin.clone();
        for node in self.nodes.iter_mut().rev() {
            if !node.pods.is_empty() {
                node.revive_ovs(&mut errors);
            }
            while let Some(p) = node.pods.pop() {
                let mut conf = node.plugin_conf.clone();
                if let Some(o) = conf.as_object_mut() {
                    if !p.result.is_null() {
                        o.insert("prevResult".into(), p.result.clone());
                    }
                }
                let out = catch_unwind(AssertUnwindSafe(|| {
                    node.cni(&evio).run(
                        "DEL",
                        &p.pod.id,
                        Some(&p.pod.path()),
                        &p.pod.ifname,
                        Some(&p.pod.k8s_args()),
                        &conf,
                    )
                }));
                match out {
                    Ok(o) if o.success() => {}
                    Ok(o) => errors.push(format!("DEL of {} on {}: {o}", p.name, node.name)),
                    Err(e) => errors.push(format!(
                        "DEL of {} on {}: {}",
                        p.name,
                        node.name,
                        panic_message(&e)
                    )),
                }
                drop(p);
            }
        }
        // Leaving, not a plain stop: SIGTERM would keep the node's devices
        // and record for a next agent. In parallel: every remaining agent
        // handles each leave, so one after another costs n² at scale
        // (256 nodes: ~7 s per leave, half an hour in all).
        let agents: Vec<(String, Agent)> = self
            .nodes
            .iter_mut()
            .rev()
            .filter_map(|n| n.agent.take().map(|a| (n.name.clone(), a)))
            .collect();
        errors.extend(leave_all(agents));
        // SimNode's field order stops OVS before its netns goes.
        while let Some(n) = self.nodes.pop() {
            drop(n);
        }
        self.fabric = None;
        self.coturn = None;
        self.coturn2 = None;
        self.etcd = None;
        self.lab = None;
        if let Some(d) = self.dir.take() {
            let path = d.path().to_path_buf();
            if let Err(e) = d.close() {
                errors.push(format!("remove {}: {e}", path.display()));
            }
        }
        if let Ok(mut live) = LIVE.lock() {
            live.retain(|t| !self.tracked.contains(t));
        }
        self.tracked.clear();
        errors
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for e in self.teardown() {
            eprintln!("evio-sim teardown: {e}");
        }
    }
}

/// How many `--stop-and-leave` run at once at teardown: enough to take 256
/// nodes off in well under a minute, few enough that the leaves themselves
/// (each a process) do not swamp two cores.
const PARALLEL_LEAVES: usize = 8;

/// Takes every agent off the network, [`PARALLEL_LEAVES`] at a time; the
/// errors of all of them, none lost to the first.
fn leave_all(agents: Vec<(String, Agent)>) -> Vec<String> {
    let queue = Mutex::new(agents);
    let errors = Mutex::new(Vec::new());
    let workers = PARALLEL_LEAVES.min(queue.lock().map(|q| q.len()).unwrap_or(0));
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let next = queue.lock().ok().and_then(|mut q| q.pop());
                let Some((name, mut a)) = next else { break };
                let err = match a.leave(Duration::from_secs(6)) {
                    Ok((Some(st), took)) if st.success() && took <= Duration::from_secs(5) => None,
                    Ok((None, _)) => None,
                    Ok((Some(st), took)) => Some(format!(
                        "agent of {name}: exit {st} after {took:?} on --stop-and-leave\n{}",
                        a.log_tail(20)
                    )),
                    Err(e) => Some(format!("agent of {name}: {e}\n{}", a.log_tail(20))),
                };
                if let (Some(e), Ok(mut all)) = (err, errors.lock()) {
                    all.push(e);
                }
            });
        }
    });
    errors.into_inner().unwrap_or_default()
}

/// A signal that interrupts us also reaches the commands we run (they are
/// in our process group): their failure is then the interruption, not an
/// error to report.
fn interrupted_or(e: ClusterError, cancel: Option<&AtomicBool>) -> ClusterError {
    if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
        ClusterError::Interrupted
    } else {
        e
    }
}

/// The bridge normally appears with the first pod's ADD; a node without pods
/// gets it here, the way the plugin would make it.
fn ensure_bridge(node: &SimNode) -> Result<(), ClusterError> {
    if node.ns.has_link(&node.bridge) {
        return Ok(());
    }
    match &node.ovs {
        Some(ovs) => {
            let datapath = node
                .plugin_conf
                .get("ovsDatapath")
                .and_then(Value::as_str)
                .filter(|d| *d != "auto")
                .unwrap_or("netdev");
            vsctl_ok(
                ovs,
                &[
                    "--may-exist",
                    "add-br",
                    &node.bridge,
                    "--",
                    "set",
                    "Bridge",
                    &node.bridge,
                    &format!("datapath_type={datapath}"),
                ],
                &format!("create bridge {} on {}", node.bridge, node.name),
            )?;
            cmd_ok(
                node.ns.command(&["ip", "link", "set", &node.bridge, "up"]),
                "bring up the bridge",
            )
        }
        None => {
            cmd_ok(
                node.ns
                    .command(&["ip", "link", "add", &node.bridge, "type", "bridge"]),
                "create the bridge",
            )?;
            cmd_ok(
                node.ns.command(&["ip", "link", "set", &node.bridge, "up"]),
                "bring up the bridge",
            )
        }
    }
}

fn check_binaries(opts: &ClusterOpts) -> Result<(), ClusterError> {
    let want = [
        (
            "the evio plugin",
            opts.evio_bin.clone(),
            "cargo build --release -p evio-plugin",
        ),
        (
            "evio-node",
            opts.evio_node_bin.clone(),
            "cargo build --release -p evio-node",
        ),
        (
            "host-local",
            Path::new(CNI_PLUGIN_DIR).join("host-local"),
            ".ci/install-deps",
        ),
    ];
    for (what, path, build) in want {
        if !path.is_file() {
            return Err(ClusterError::MissingBinary { what, path, build });
        }
    }
    Ok(())
}

/// The conflist's `evio` entry as libcni hands it to the plugin: with the
/// list's `name` and `cniVersion` copied in. `ipam.dataDir` is set to
/// `data_dir` when config-gen did not already write exactly that; the bool
/// says whether it had.
pub fn plugin_entry(conflist: &Value, data_dir: &Path) -> Result<(Value, bool), String> {
    let plugins = conflist
        .get("plugins")
        .and_then(Value::as_array)
        .ok_or("no plugins list")?;
    let mut entry = plugins
        .iter()
        .find(|p| p.get("type").and_then(Value::as_str) == Some("evio"))
        .cloned()
        .ok_or("no plugin of type evio")?;
    let obj = entry.as_object_mut().ok_or("evio entry is not an object")?;
    for key in ["name", "cniVersion"] {
        let v = conflist.get(key).cloned().ok_or(format!("no {key}"))?;
        obj.insert(key.into(), v);
    }
    let want = data_dir.display().to_string();
    let ipam = obj
        .get_mut("ipam")
        .and_then(Value::as_object_mut)
        .ok_or("evio entry has no ipam object")?;
    let had = ipam.get("dataDir").and_then(Value::as_str) == Some(want.as_str());
    ipam.insert("dataDir".into(), json!(want));
    Ok((entry, had))
}

/// `ipam.ranges[0][0].gateway` of a plugin config.
pub fn range_gateway(plugin: &Value) -> Result<IpAddr, String> {
    let gw = plugin
        .pointer("/ipam/ranges/0/0/gateway")
        .and_then(Value::as_str)
        .ok_or("no ipam.ranges[0][0].gateway")?;
    gw.parse().map_err(|e| format!("gateway {gw:?}: {e}"))
}

/// First address of a CNI result (any version): `ips[0].address`.
pub fn first_ip(result: &Value) -> Option<(IpAddr, u8)> {
    let addr = result.pointer("/ips/0/address")?.as_str()?;
    let (ip, prefix) = addr.split_once('/')?;
    Some((ip.parse().ok()?, prefix.parse().ok()?))
}

fn max_prefix(ip: IpAddr) -> u8 {
    if ip.is_ipv4() {
        32
    } else {
        128
    }
}

/// `ip` with all bits past `prefix` cleared.
pub fn network_of(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let mask = u32::MAX
                .checked_shl(32 - u32::from(prefix.min(32)))
                .unwrap_or(0);
            IpAddr::V4((bits & mask).into())
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let mask = u128::MAX
                .checked_shl(128 - u32::from(prefix.min(128)))
                .unwrap_or(0);
            IpAddr::V6((bits & mask).into())
        }
    }
}

/// Runs a set-up command (bounded) and turns a failure into an error that
/// carries its output.
/// Waits (bounded, 5 s) until `dev` in `ns` has carrier and, when it is a
/// Linux bridge port (`bridge_port`), forwards.
fn wait_carrier(ns: &Netns, dev: &str, bridge_port: bool) -> Result<(), String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let link = ns.exec(&["ip", "-o", "link", "show", "dev", dev]);
        let up = String::from_utf8_lossy(&link.stdout).contains("LOWER_UP");
        let forwarding = !bridge_port || {
            let port = ns.exec(&["bridge", "link", "show", "dev", dev]);
            String::from_utf8_lossy(&port.stdout).contains("state forwarding")
        };
        if up && forwarding {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(format!(
                "{dev} has no carrier or does not forward after 5 s: {}",
                String::from_utf8_lossy(&link.stdout).trim()
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn cmd_ok(cmd: Command, what: &str) -> Result<(), ClusterError> {
    let out = guarded(what, || run_bounded(cmd, b"", CMD_TIMEOUT))?;
    if out.success() {
        Ok(())
    } else {
        Err(ClusterError::step(what, out))
    }
}

/// Runs `ovs-vsctl` (bounded by its own --timeout) and turns a failure into
/// an error that carries its stderr.
fn vsctl_ok(ovs: &Ovs, args: &[&str], what: &str) -> Result<(), ClusterError> {
    let out = guarded("ovs-vsctl", || ovs.try_vsctl(args))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(ClusterError::step(
            what,
            String::from_utf8_lossy(&out.stderr),
        ))
    }
}

/// Runs a lower-layer helper that reports failure by panicking (the test
/// kit's style) and turns the panic into an error, so that set-up failures
/// unwind through our own teardown rather than through a test harness.
fn guarded<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, ClusterError> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|p| ClusterError::step(what, panic_message(&p)))
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else {
        "panic".into()
    }
}

/// Where a probe goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Target {
    /// Index into [`Reachability::pods`].
    Pod(usize),
    /// The gateway of the source pod's own node.
    Gateway,
}

#[derive(Debug, Clone)]
pub struct PodLabel {
    pub name: String,
    pub node: usize,
    pub ip: IpAddr,
}

/// One probe: ping and TCP from one pod to one target.
#[derive(Debug, Clone)]
pub struct Check {
    pub from: usize,
    pub to: Target,
    pub ping: bool,
    pub tcp: Result<(), String>,
}

impl Check {
    pub fn ok(&self) -> bool {
        self.ping && self.tcp.is_ok()
    }
}

/// The reachability matrix.
#[derive(Debug, Clone)]
pub struct Reachability {
    /// Bytes each TCP probe echoed.
    pub tcp_bytes: usize,
    pub pods: Vec<PodLabel>,
    /// Gateway of each node.
    pub gateways: Vec<IpAddr>,
    pub checks: Vec<Check>,
}

impl Reachability {
    pub fn get(&self, from: usize, to: Target) -> Option<&Check> {
        self.checks.iter().find(|c| c.from == from && c.to == to)
    }

    /// Every pair that was expected: each pod to each other pod and to its
    /// gateway. A probe that did not run (interrupted) counts as failed.
    pub fn expected(&self) -> Vec<(usize, Target)> {
        let n = self.pods.len();
        let mut v = Vec::new();
        for from in 0..n {
            v.extend(
                (0..n)
                    .filter(|&t| t != from)
                    .map(|t| (from, Target::Pod(t))),
            );
            v.push((from, Target::Gateway));
        }
        v
    }

    /// One line per failed or missing probe.
    pub fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (from, to) in self.expected() {
            let src = &self.pods[from];
            let dst = match to {
                Target::Pod(t) => format!("{} ({})", self.pods[t].name, self.pods[t].ip),
                Target::Gateway => format!(
                    "gateway ({})",
                    self.gateways
                        .get(src.node)
                        .map(ToString::to_string)
                        .unwrap_or_default()
                ),
            };
            match self.get(from, to) {
                None => out.push(format!("{} -> {dst}: not probed", src.name)),
                Some(c) => {
                    if !c.ping {
                        out.push(format!("{} -> {dst}: ping failed", src.name));
                    }
                    if let Err(e) = &c.tcp {
                        out.push(format!("{} -> {dst}: TCP failed: {e}", src.name));
                    }
                }
            }
        }
        out
    }

    pub fn all_ok(&self) -> bool {
        self.failures().is_empty()
    }

    /// The matrix: rows are sources, columns targets (pods, then the
    /// source's own gateway); each cell is ping then TCP.
    pub fn render(&self) -> String {
        if self.pods.is_empty() {
            return "no pods: nothing to probe\n".into();
        }
        let mark = |b: bool| if b { "✓" } else { "✗" };
        let mut headers: Vec<String> = vec!["FROM \\ TO".into()];
        headers.extend(self.pods.iter().map(|p| p.name.clone()));
        headers.push("gateway".into());
        let mut rows = Vec::new();
        for (from, p) in self.pods.iter().enumerate() {
            let mut row = vec![p.name.clone()];
            let targets = (0..self.pods.len())
                .map(Target::Pod)
                .chain(std::iter::once(Target::Gateway));
            for to in targets {
                let cell = if to == Target::Pod(from) {
                    "·".to_string()
                } else {
                    match self.get(from, to) {
                        Some(c) => format!("{}{}", mark(c.ping), mark(c.tcp.is_ok())),
                        None => "??".into(),
                    }
                };
                row.push(cell);
            }
            rows.push(row);
        }
        let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
        let ok = self.expected().len() - self.failed_pairs();
        format!(
            "{}each cell: ping then TCP ({} echoed), ✓ ok, ✗ failed, ?? not probed\n{ok}/{} pairs fully reachable\n",
            render_table(&headers, &rows),
            if self.tcp_bytes >= 1 << 20 { "1 MiB" } else { "256 KiB" },
            self.expected().len()
        )
    }

    fn failed_pairs(&self) -> usize {
        self.expected()
            .into_iter()
            .filter(|(f, t)| !self.get(*f, *t).is_some_and(Check::ok))
            .count()
    }
}

/// One node-to-node check of the overlay.
#[derive(Debug, Clone)]
pub struct HostCheck {
    pub from: usize,
    pub to: usize,
    /// The source node pinged the target's host-overlay address.
    pub ping: bool,
    /// What the source's agent says of the target.
    pub state: Option<String>,
    pub path: Option<String>,
    /// What produced the path (`peers --json`'s `method`: local,
    /// reflexive, learned, punched, mapped, ... for a direct path, relay).
    pub method: Option<String>,
    /// The working path's underlay family (`ipv4`, `ipv6`).
    pub family: Option<String>,
    pub endpoint: Option<String>,
    pub rtt_ms: Option<f64>,
}

impl HostCheck {
    pub fn ok(&self) -> bool {
        self.ping && self.state.as_deref() == Some("connected")
    }
}

#[derive(Debug, Clone)]
pub struct OverlayReport {
    /// Node name and site NAT type.
    pub nodes: Vec<(String, Option<NatType>)>,
    pub hosts: Vec<Option<IpAddr>>,
    pub checks: Vec<HostCheck>,
}

impl OverlayReport {
    pub fn get(&self, from: usize, to: usize) -> Option<&HostCheck> {
        self.checks.iter().find(|c| c.from == from && c.to == to)
    }

    pub fn failures(&self) -> Vec<String> {
        let n = self.nodes.len();
        let mut out = Vec::new();
        for from in 0..n {
            for to in (0..n).filter(|&t| t != from) {
                let name = |i: usize| self.nodes[i].0.clone();
                match self.get(from, to) {
                    None => out.push(format!("{} -> {}: not probed", name(from), name(to))),
                    Some(c) if !c.ok() => out.push(format!(
                        "{} -> {}: host ping {}, peer state {}",
                        name(from),
                        name(to),
                        if c.ping { "ok" } else { "failed" },
                        c.state.as_deref().unwrap_or("unknown")
                    )),
                    Some(_) => {}
                }
            }
        }
        out
    }

    /// How many node pairs (both directions counted once, the source's
    /// view of the lower-numbered node) each method ended on, direct
    /// methods first: "direct 30 (reflexive 20, local 1, ...), relay 6".
    pub fn methods(&self) -> String {
        let mut direct = std::collections::BTreeMap::<String, usize>::new();
        let mut other = std::collections::BTreeMap::<String, usize>::new();
        for c in self.checks.iter().filter(|c| c.from < c.to) {
            let m = c
                .method
                .clone()
                .or_else(|| c.path.clone())
                .unwrap_or_else(|| "down".into());
            let to = if c.path.as_deref() == Some("direct") {
                &mut direct
            } else {
                &mut other
            };
            *to.entry(m).or_default() += 1;
        }
        let list = |m: &std::collections::BTreeMap<String, usize>| {
            m.iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut out = format!("direct {}", direct.values().sum::<usize>());
        if !direct.is_empty() {
            out.push_str(&format!(" ({})", list(&direct)));
        }
        if !other.is_empty() {
            out.push_str(&format!(", {}", list(&other)));
        }
        out
    }

    /// Rows are sources, columns targets; each cell is the host-overlay
    /// ping, then how the path was made (`method`; the path when the agent
    /// gives none) with its RTT.
    pub fn render(&self) -> String {
        let n = self.nodes.len();
        let mut headers: Vec<String> = vec!["FROM \\ TO".into()];
        headers.extend(self.nodes.iter().map(|(name, _)| name.clone()));
        let mut rows = Vec::new();
        for from in 0..n {
            let mut row = vec![self.nodes[from].0.clone()];
            for to in 0..n {
                if to == from {
                    row.push("·".into());
                    continue;
                }
                row.push(match self.get(from, to) {
                    None => "??".into(),
                    Some(c) => format!(
                        "{} {}{} {}",
                        if c.ping { "✓" } else { "✗" },
                        c.method
                            .as_deref()
                            .or(c.path.as_deref())
                            .unwrap_or(c.state.as_deref().unwrap_or("down")),
                        if c.family.as_deref() == Some("ipv6") {
                            "/v6"
                        } else {
                            ""
                        },
                        c.rtt_ms.map(|r| format!("{r:.2}ms")).unwrap_or_default()
                    )
                    .trim_end()
                    .to_string(),
                });
            }
            rows.push(row);
        }
        let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
        let ok = self.checks.iter().filter(|c| c.ok()).count();
        format!(
            "{}each cell: host-overlay ping (✓/✗), then how the source's agent made its path (local, reflexive, learned, punched, mapped, predicted: direct; relay: through TURN; method/v6: over the IPv6 underlay) and its RTT\n{ok}/{} node pairs connected and reachable; paths by method: {}\n",
            render_table(&headers, &rows),
            n * n.saturating_sub(1),
            self.methods()
        )
    }
}

fn b64(b: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in b.chunks(3) {
        let v = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[((v >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A plain text table, columns padded to the widest cell (in characters).
pub fn render_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let cols = headers.len();
    let mut width: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate().take(cols) {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            let pad = width[i].saturating_sub(c.chars().count());
            s.push_str(c);
            if i + 1 < cells.len() {
                s.push_str(&" ".repeat(pad + 2));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(headers.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

/// What a cluster consists of, recorded before teardown and checked after.
#[derive(Debug, Clone)]
pub struct Footprint {
    pub netns: Vec<String>,
    /// (pid, comm) of every process that ran in one of the namespaces,
    /// OVS daemons included.
    pub processes: Vec<(i32, String)>,
    pub paths: Vec<PathBuf>,
}

impl Footprint {
    /// What of this footprint still exists, one line each.
    pub fn leftovers(&self) -> Vec<String> {
        let mut out = Vec::new();
        let list = Command::new("ip")
            .args(["netns", "list"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let live: Vec<&str> = list
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        for ns in &self.netns {
            if live.contains(&ns.as_str()) || Path::new("/run/netns").join(ns).exists() {
                out.push(format!("netns {ns}"));
            }
        }
        for (pid, comm) in &self.processes {
            // Same pid and same command: not a recycled pid. A zombie has
            // exited: it only waits for a parent that may never reap it
            // (PID 1 on this kind of machine does not).
            if proc_comm(*pid).as_deref() == Some(comm.as_str()) && !is_zombie(*pid) {
                out.push(format!("process {pid} ({comm})"));
            }
        }
        for p in &self.paths {
            if p.exists() {
                out.push(format!("path {}", p.display()));
            }
        }
        out
    }
}

fn netns_pids(ns: &str) -> Vec<i32> {
    Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, t)| t.split_whitespace().next().map(|st| st == "Z"))
        })
        .unwrap_or(false)
}

fn proc_comm(pid: i32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// Something a cluster created that [`emergency_cleanup`] can remove
/// without the `Cluster` value.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Tracked {
    Netns(String),
    Dir(PathBuf),
}

static LIVE: Mutex<Vec<Tracked>> = Mutex::new(Vec::new());

/// Removes what every live cluster of this process created, without running
/// any destructor: kills the processes in its namespaces (OVS daemons
/// included), deletes the namespaces and temp dirs. For a panic hook in a
/// `panic = "abort"` build, where `Drop` never runs. Pods are not DELeted
/// through the plugin: their state goes with the namespaces and temp dirs.
pub fn emergency_cleanup() {
    // try_lock: the panic may have happened while the lock was held.
    let items: Vec<Tracked> = match LIVE.try_lock() {
        Ok(mut live) => live.drain(..).collect(),
        Err(_) => return,
    };
    for t in items.iter().rev() {
        match t {
            Tracked::Netns(ns) => {
                for pid in netns_pids(ns) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                let _ = Command::new("ip").args(["netns", "del", ns]).output();
            }
            Tracked::Dir(d) => {
                let _ = std::fs::remove_dir_all(d);
            }
        }
    }
}

/// `each(from)` for every source `0..n` at once, one thread each (the
/// checks wait on pings and timeouts), the results in one list; a source
/// whose thread panicked contributes nothing.
fn from_every_source<T: Send>(n: usize, each: impl Fn(usize) -> Vec<T> + Sync) -> Vec<T> {
    std::thread::scope(|s| {
        let each = &each;
        let handles: Vec<_> = (0..n).map(|from| s.spawn(move || each(from))).collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_of_masks_host_bits() {
        let ip: IpAddr = "10.244.17.1".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(network_of(ip, 24).to_string(), "10.244.17.0");
        assert_eq!(network_of(ip, 0).to_string(), "0.0.0.0");
        assert_eq!(network_of(ip, 32).to_string(), "10.244.17.1");
        let ip6: IpAddr = "fd10:244::3:1".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(network_of(ip6, 112).to_string(), "fd10:244::3:0");
    }

    fn conflist() -> Value {
        json!({
            "cniVersion": "1.0.0",
            "name": "evio-sim",
            "plugins": [
                {"type": "evio", "bridge": "evio0", "ipam": {"type": "host-local",
                  "ranges": [[{"subnet": "10.244.0.0/16", "rangeStart": "10.244.5.2",
                               "rangeEnd": "10.244.5.254", "gateway": "10.244.5.1"}]]}},
                {"type": "portmap", "capabilities": {"portMappings": true}}
            ]
        })
    }

    #[test]
    fn plugin_entry_copies_name_and_version_and_sets_data_dir() {
        let (e, had) =
            plugin_entry(&conflist(), Path::new("/tmp/x/ipam")).unwrap_or_else(|e| panic!("{e}"));
        assert!(!had);
        assert_eq!(e["name"], "evio-sim");
        assert_eq!(e["cniVersion"], "1.0.0");
        assert_eq!(e["type"], "evio");
        assert_eq!(e["ipam"]["dataDir"], "/tmp/x/ipam");
        assert_eq!(
            range_gateway(&e).map(|g| g.to_string()),
            Ok("10.244.5.1".to_string())
        );
    }

    #[test]
    fn plugin_entry_reports_a_data_dir_config_gen_already_wrote() {
        let mut c = conflist();
        c["plugins"][0]["ipam"]["dataDir"] = json!("/tmp/x/ipam");
        let (_, had) = plugin_entry(&c, Path::new("/tmp/x/ipam")).unwrap_or_else(|e| panic!("{e}"));
        assert!(had);
    }

    #[test]
    fn plugin_entry_rejects_a_conflist_without_evio() {
        let mut c = conflist();
        c["plugins"] = json!([{"type": "portmap"}]);
        assert!(plugin_entry(&c, Path::new("/x")).is_err());
    }

    #[test]
    fn first_ip_reads_any_result_version() {
        let r = json!({"ips": [{"version": "4", "address": "10.244.5.2/16"}]});
        assert_eq!(
            first_ip(&r),
            Some(("10.244.5.2".parse().unwrap_or_else(|e| panic!("{e}")), 16))
        );
        assert_eq!(first_ip(&json!({})), None);
    }

    fn label(name: &str, node: usize) -> PodLabel {
        PodLabel {
            name: name.into(),
            node,
            ip: "10.0.0.1".parse().unwrap_or_else(|e| panic!("{e}")),
        }
    }

    #[test]
    fn reachability_counts_missing_and_failed_probes() {
        let mut r = Reachability {
            tcp_bytes: 256 * 1024,
            pods: vec![label("a", 0), label("b", 1)],
            gateways: vec![
                "10.0.0.1".parse().unwrap_or_else(|e| panic!("{e}")),
                "10.0.1.1".parse().unwrap_or_else(|e| panic!("{e}")),
            ],
            checks: Vec::new(),
        };
        assert_eq!(r.expected().len(), 4);
        assert_eq!(r.failures().len(), 4, "nothing probed is not success");
        for (from, to) in r.expected() {
            r.checks.push(Check {
                from,
                to,
                ping: true,
                tcp: Ok(()),
            });
        }
        assert!(r.all_ok());
        r.checks[0].tcp = Err("timeout".into());
        assert!(!r.all_ok());
        assert_eq!(r.failures().len(), 1);
        let text = r.render();
        assert!(text.contains("✓✗"), "{text}");
        assert!(text.contains("3/4 pairs"), "{text}");
    }

    #[test]
    fn table_pads_columns() {
        let t = render_table(&["A", "BB"], &[vec!["xxx".into(), "y".into()]]);
        assert_eq!(t, "A    BB\nxxx  y\n");
    }
}
