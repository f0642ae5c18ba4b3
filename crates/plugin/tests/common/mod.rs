//! Shared fixture of the plugin's integration tests: a simulated node (its
//! own netns, IPAM data dir and bridge name) and the plugin under test run
//! through `evio_testkit::plugin::Cni` exactly as a runtime runs it.
//!
//! `behaviour_suite!(Backend::Linux)` / `(Backend::Ovs)` expands to one test
//! per body of behaviour.rs.
//!
//! Which binary is tested: `evio` built from this crate, unless
//! `EVIO_TEST_PLUGIN` names another one. Pointing it at the reference plugin
//! (`EVIO_TEST_PLUGIN=/usr/lib/cni/bridge EVIO_TEST_CNI_VERSION=1.0.0`) is
//! how the harness itself was validated: the tests of behaviour the two
//! share pass there. `EVIO_TEST_CNI_VERSION` sets the default cniVersion of
//! the configs (1.1.0 otherwise).

// Each test binary uses its own subset of the helpers.
#![allow(dead_code)]

pub mod behaviour;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use evio_testkit::netns::{unique_name, Netns};
use evio_testkit::ovs::Ovs;
use evio_testkit::plugin::{
    conf, ipam_allocations, link, test_dir, Cni, CniOutput, Leaks, NetConf, OvsPorts, Pod, TempDir,
};
use serde_json::Value;

/// The switch a pod's host veth is plugged into. The behaviour tests take
/// this so that the same bodies run against both backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `"bridgeType": "linux"`: a kernel bridge.
    Linux,
    /// `"bridgeType": "ovs"`: an Open vSwitch bridge of an OVS instance
    /// (`evio_testkit::ovs::Ovs`) running inside the node netns; the
    /// userspace datapath on machines without the kernel module.
    Ovs,
}

/// Generates one `#[test]` per behaviour body for `backend`:
/// `backend_tests!(Backend::Linux => add_result_shape_v1_1_0, ...)`.
#[allow(unused_macros)]
macro_rules! backend_tests {
    ($backend:expr => $($name:ident),+ $(,)?) => {
        $(
            #[test]
            fn $name() {
                $crate::common::behaviour::$name($backend)
            }
        )+
    };
}
#[allow(unused_imports)]
pub(crate) use backend_tests;

/// The whole behaviour suite for one backend: every body in
/// behaviour.rs, so that no backend silently misses a test.
#[allow(unused_macros)]
macro_rules! behaviour_suite {
    ($backend:expr) => {
        $crate::common::backend_tests!($backend =>
            add_result_shape_v0_3_0,
            add_result_shape_v0_3_1,
            add_result_shape_v0_4_0,
            add_result_shape_v1_0_0,
            add_result_shape_v1_1_0,
            add_result_shape_dual_stack_v0_4_0,
            add_result_shape_dual_stack_v1_1_0,
            add_configures_pod_and_node,
            add_without_default_gateway_adds_no_default_route,
            is_gateway_false_puts_no_address_on_bridge,
            fifteen_byte_ifname_is_accepted,
            host_veth_name_is_deterministic,
            second_ifname_for_same_container_is_independent,
            pod_reaches_gateway_by_ping_and_tcp,
            pods_reach_each_other_by_ping_and_tcp,
            reused_address_is_reachable_at_once,
            gateway_mac_survives_pods_leaving,
            pod_mac_follows_its_address,
            check_passes_after_add,
            check_fails_after_pod_lost_its_address,
            check_fails_when_host_veth_left_the_bridge,
            check_fails_when_pod_interface_is_gone,
            del_twice_succeeds_and_releases_everything,
            del_after_netns_is_gone_releases_veth_and_address,
            del_without_netns_releases_address_and_veth,
            del_of_never_added_attachment_succeeds,
            ipam_exhaustion_rolls_back_everything,
            failure_after_ipam_releases_allocation,
            add_to_missing_netns_fails_and_keeps_nothing,
            duplicate_add_fails_and_existing_pod_keeps_working,
            parallel_adds_and_dels_leave_nothing_behind,
            parallel_first_adds_on_fresh_node_do_not_race,
            concurrent_adds_and_dels_of_different_pods,
            gc_valid_attachments_releases_stale_pod_and_keeps_live_one,
            gc_legacy_attachments_key_releases_stale_pod_and_keeps_live_one,
            gc_leaves_other_networks_and_foreign_ports_alone,
            status_is_ok_with_host_local,
            status_is_50_when_ipam_plugin_is_missing,
            ip_masq_installs_masquerade_for_pod_cidr,
            is_ip_masq_alias_installs_masquerade,
            ip_masq_lets_pod_reach_network_without_route_back,
            ipv6_add_gives_usable_address,
            dual_stack_add_configures_both_families,
            dual_stack_cluster_ips_reach_pods,
        );
    };
}
#[allow(unused_imports)]
pub(crate) use behaviour_suite;

pub fn plugin_bin() -> PathBuf {
    std::env::var_os("EVIO_TEST_PLUGIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_evio")))
}

/// The `type` of the config: the executable's file name, as a runtime
/// resolves it.
pub fn plugin_type() -> String {
    plugin_bin()
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "evio".into())
}

pub fn default_version() -> String {
    std::env::var("EVIO_TEST_CNI_VERSION").unwrap_or_else(|_| "1.1.0".into())
}

/// A simulated node: netns, a temp dir for host-local's `dataDir`, and a
/// bridge and network name unique to this test.
pub struct Fixture {
    /// Declared first so it stops before the node netns is deleted.
    pub ovs: Option<Ovs>,
    pub backend: Backend,
    pub node: Netns,
    pub dir: TempDir,
    pub bridge: String,
    pub net: String,
    pub version: String,
}

impl Fixture {
    pub fn new(backend: Backend) -> Fixture {
        let node = Netns::new("evn");
        let dir = test_dir("evio-plugin-test");
        let ovs = match backend {
            Backend::Linux => None,
            Backend::Ovs => Some(Ovs::start(&node)),
        };
        Fixture {
            ovs,
            backend,
            bridge: unique_name("evb"),
            net: format!("net-{}", node.name()),
            node,
            dir,
            version: default_version(),
        }
    }

    /// OVSDB endpoint of the node's OVS instance (OVS backend only).
    pub fn ovsdb(&self) -> Option<String> {
        self.ovs.as_ref().map(Ovs::endpoint)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("ipam")
    }

    pub fn cni(&self) -> Cni<'_> {
        Cni::new(plugin_bin(), &self.node)
    }

    /// The node's network config for this backend: IPv4 pod range, gateway
    /// on the bridge, no masquerade, no default route.
    pub fn conf(&self) -> NetConf {
        let c = conf(
            &plugin_type(),
            &self.version,
            &self.net,
            &self.bridge,
            &self.data_dir(),
        );
        match self.ovsdb() {
            Some(db) => c.bridge_type("ovs").ovsdb(&db),
            None => c.bridge_type("linux"),
        }
    }

    pub fn run(
        &self,
        cmd: &str,
        id: &str,
        netns: Option<&Path>,
        ifname: &str,
        config: &Value,
    ) -> CniOutput {
        self.cni().run(cmd, id, netns, ifname, None, config)
    }

    pub fn add(&self, pod: &Pod, c: &NetConf) -> CniOutput {
        self.cni().run(
            "ADD",
            &pod.id,
            Some(&pod.path()),
            &pod.ifname,
            Some(&pod.k8s_args()),
            &c.json(),
        )
    }

    /// ADD that must succeed; returns the result.
    pub fn add_ok(&self, pod: &Pod, c: &NetConf) -> Value {
        let out = self.add(pod, c);
        out.expect_success(&format!("ADD {} in {}", pod.ifname, pod.ns.name()))
    }

    /// DEL as a runtime sends it: with `prevResult` when it has one.
    pub fn del(&self, pod: &Pod, c: &NetConf, prev: Option<&Value>) -> CniOutput {
        let config = match prev {
            Some(p) => c.with_prev_result(p),
            None => c.json(),
        };
        self.cni().run(
            "DEL",
            &pod.id,
            Some(&pod.path()),
            &pod.ifname,
            Some(&pod.k8s_args()),
            &config,
        )
    }

    pub fn del_ok(&self, pod: &Pod, c: &NetConf, prev: Option<&Value>) {
        self.del(pod, c, prev)
            .expect_success(&format!("DEL {} in {}", pod.ifname, pod.ns.name()));
    }

    pub fn check(&self, pod: &Pod, c: &NetConf, prev: &Value) -> CniOutput {
        self.cni().run(
            "CHECK",
            &pod.id,
            Some(&pod.path()),
            &pod.ifname,
            Some(&pod.k8s_args()),
            &c.with_prev_result(prev),
        )
    }

    /// GC with `live` as the still-valid attachments under `key`.
    pub fn gc(&self, c: &NetConf, key: &str, live: &[(&str, &str)]) -> CniOutput {
        self.run("GC", "", None, "", &c.with_attachments(key, live))
    }

    pub fn status(&self, c: &NetConf) -> CniOutput {
        self.run("STATUS", "", None, "", &c.json())
    }

    /// ADD then DEL of a throwaway pod, so that per-network state (bridge,
    /// firewall table, host-local's bookkeeping files) exists before a
    /// snapshot and only per-pod state shows up in a later diff.
    pub fn warm_up(&self, c: &NetConf) {
        let pod = Pod::new();
        let res = self.add_ok(&pod, c);
        self.del_ok(&pod, c, Some(&res));
    }

    pub fn ovs_ports(&self) -> Option<OvsPorts> {
        self.ovs.as_ref().map(|o| OvsPorts::of(o, &self.bridge))
    }

    pub fn leaks(&self, pods: &[&Netns]) -> Leaks {
        Leaks::snapshot(
            &self.node,
            pods,
            &self.data_dir(),
            self.ovs_ports().as_ref(),
        )
    }

    /// host-local's current allocations of this network.
    pub fn allocations(&self) -> BTreeMap<IpAddr, (String, String)> {
        ipam_allocations(&self.data_dir(), &self.net)
    }

    /// Links the backend itself may add to the node besides the bridge.
    pub fn backend_links(&self) -> BTreeSet<String> {
        match self.backend {
            Backend::Linux => BTreeSet::new(),
            Backend::Ovs => ["ovs-netdev", "ovs-system"]
                .into_iter()
                .map(String::from)
                .collect(),
        }
    }

    /// Panics unless `veth` (in the node netns) is a port of the bridge.
    pub fn assert_port_on_bridge(&self, veth: &str) {
        match self.backend {
            Backend::Linux => {
                let l = link(&self.node, veth)
                    .unwrap_or_else(|| panic!("host veth {veth} missing from node"));
                assert_eq!(
                    l["master"].as_str(),
                    Some(self.bridge.as_str()),
                    "host veth {veth} is not a port of bridge {}: {l}",
                    self.bridge
                );
            }
            Backend::Ovs => {
                let ports = self.ovs_ports().map(|p| p.list()).unwrap_or_default();
                assert!(
                    ports.contains(veth),
                    "host veth {veth} is not a port of OVS bridge {}: ports {ports:?}",
                    self.bridge
                );
            }
        }
    }

    /// Plugs a veth the plugin did not create into the bridge (as an uplink
    /// or overlay tunnel port would be); returns its name.
    pub fn attach_foreign_port(&self) -> String {
        let name = "evforeign0";
        self.node.ok(&[
            "ip",
            "link",
            "add",
            name,
            "type",
            "veth",
            "peer",
            "name",
            "evforeign1",
        ]);
        self.node.ok(&["ip", "link", "set", name, "up"]);
        match &self.ovs {
            None => {
                self.node
                    .ok(&["ip", "link", "set", "dev", name, "master", &self.bridge]);
            }
            Some(ovs) => {
                ovs.vsctl(&["add-port", &self.bridge, name]);
            }
        }
        name.to_string()
    }

    /// Unplugs `veth` from the bridge behind the plugin's back.
    pub fn detach_port(&self, veth: &str) {
        match self.backend {
            Backend::Linux => {
                self.node
                    .ok(&["ip", "link", "set", "dev", veth, "nomaster"]);
            }
            Backend::Ovs => {
                let db = self.ovsdb().unwrap_or_default();
                self.node.ok(&[
                    "ovs-vsctl",
                    &format!("--db={db}"),
                    "--timeout=10",
                    "del-port",
                    &self.bridge,
                    veth,
                ]);
            }
        }
    }

    /// Waits (bounded) until `name` is gone from the node: the kernel tears
    /// down a deleted netns's veths asynchronously.
    pub fn wait_link_gone(&self, name: &str, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if !self.node.has_link(name) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The interfaces list of a result.
pub fn interfaces(res: &Value) -> Vec<Value> {
    res["interfaces"].as_array().cloned().unwrap_or_default()
}

/// Index of the sandboxed interface `ifname` in the result's list.
pub fn pod_iface_index(res: &Value, ifname: &str) -> usize {
    interfaces(res)
        .iter()
        .position(|i| {
            i["name"].as_str() == Some(ifname)
                && i["sandbox"].as_str().is_some_and(|s| !s.is_empty())
        })
        .unwrap_or_else(|| panic!("no sandboxed interface {ifname} in result: {res}"))
}

/// The host end of the pod's veth: the result's interface that is neither
/// in a sandbox nor the bridge.
pub fn host_veth(res: &Value, bridge: &str) -> String {
    let hosts: Vec<String> = interfaces(res)
        .iter()
        .filter(|i| i["sandbox"].as_str().unwrap_or("").is_empty())
        .filter_map(|i| i["name"].as_str().map(str::to_string))
        .filter(|n| n != bridge)
        .collect();
    assert_eq!(
        hosts.len(),
        1,
        "expected exactly one host veth in result interfaces: {res}"
    );
    hosts[0].clone()
}

/// (address, prefix) of each `ips` entry of the result.
pub fn result_addrs(res: &Value) -> Vec<(IpAddr, u8)> {
    res["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|ip| {
            let a = ip["address"]
                .as_str()
                .unwrap_or_else(|| panic!("ip without address in {res}"));
            parse_cidr(a)
        })
        .collect()
}

/// The pod's address of one family (4 or 6) from the result.
pub fn pod_ip(res: &Value, family: u8) -> IpAddr {
    result_addrs(res)
        .into_iter()
        .map(|(ip, _)| ip)
        .find(|ip| (family == 4) == ip.is_ipv4())
        .unwrap_or_else(|| panic!("no IPv{family} address in result {res}"))
}

pub fn parse_cidr(s: &str) -> (IpAddr, u8) {
    let (ip, prefix) = s
        .split_once('/')
        .unwrap_or_else(|| panic!("{s} is not CIDR"));
    (
        ip.parse().unwrap_or_else(|e| panic!("{s}: {e}")),
        prefix.parse().unwrap_or_else(|e| panic!("{s}: {e}")),
    )
}

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

/// Writes a plugin config as the node's conflist (`cniVersion` and `name`
/// lifted to the list, as libcni reads it), for the doctor.
pub fn write_conflist(dir: &Path, config: &Value) {
    let mut plugin = config.clone();
    let (version, name) = (plugin["cniVersion"].clone(), plugin["name"].clone());
    if let Some(o) = plugin.as_object_mut() {
        o.remove("cniVersion");
        o.remove("name");
    }
    let list = serde_json::json!({"cniVersion": version, "name": name, "plugins": [plugin]});
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(dir.join("10-evio.conflist"), list.to_string())
        .unwrap_or_else(|e| panic!("{e}"));
}
