//! The simulated cluster end to end: real OVS per node, the real plugin and
//! config-gen, pods probing each other across the fabric.
// A test that unwraps fails loudly, which is what a test should do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use evio_testkit::cluster::{network_of, BridgeType, Cluster, Target};
use evio_testkit::netns::Netns;
use evio_testkit::services::{peer_seen, ClusterIps, Endpoint, Mode};

#[test]
fn cluster_3_nodes_full_reachability() {
    let opts = common::opts();
    assert_eq!((opts.nodes, opts.pods_per_node), (3, 2));
    assert_eq!(opts.bridge_type, BridgeType::Ovs);
    let c = Cluster::up(opts).unwrap_or_else(|e| panic!("cluster up: {e}"));

    // Every node got its own subnet from the shared store and a conflist
    // that sends the plugin to the node's own OVS.
    let subnets: BTreeSet<&str> = c.nodes().iter().map(|n| n.subnet.as_str()).collect();
    assert_eq!(subnets.len(), 3, "subnets: {subnets:?}");
    for n in c.nodes() {
        let ovs = n
            .ovs
            .as_ref()
            .unwrap_or_else(|| panic!("{} has no OVS", n.name));
        assert_eq!(n.plugin_conf["ovsdb"], ovs.endpoint(), "{}", n.name);
        assert!(
            n.conflist_has_data_dir,
            "config-gen did not write ipam.dataDir for {}: {}",
            n.name, n.conflist
        );
        let ports = ovs.vsctl(&["list-ports", &n.bridge]);
        let ports: Vec<&str> = ports.lines().collect();
        assert!(ports.contains(&"uplink"), "{}: ports {ports:?}", n.name);
        assert_eq!(ports.len(), 1 + n.pods.len(), "{}: ports {ports:?}", n.name);
        for p in &n.pods {
            assert_eq!(
                format!("{}/24", network_of(p.ip, 24)),
                n.subnet,
                "{} got {} outside {}",
                p.name,
                p.ip,
                n.subnet
            );
            assert_eq!(p.prefix, 16, "pods carry the pod CIDR's prefix");
        }
    }

    let r = c
        .reachability()
        .unwrap_or_else(|e| panic!("reachability: {e}"));
    assert!(
        r.all_ok(),
        "{}\n{}\n{}",
        c.summary(),
        r.render(),
        r.failures().join("\n")
    );
    let pods = &r.pods;
    let cross_node_ok = r
        .checks
        .iter()
        .filter(|ch| matches!(ch.to, Target::Pod(t) if pods[t].node != pods[ch.from].node))
        .filter(|ch| ch.ok())
        .count();
    assert_eq!(
        cross_node_ok,
        6 * 4,
        "each of 6 pods to the 4 on other nodes"
    );
    let gateway_ok = r
        .checks
        .iter()
        .filter(|ch| ch.to == Target::Gateway && ch.ok())
        .count();
    assert_eq!(gateway_ok, 6);

    // The probe can fail: with node-2's uplink down, node-0 no longer
    // reaches it, while node-0's own pods still reach each other.
    let fabric = c.fabric().unwrap_or_else(|| panic!("no fabric"));
    fabric.ok(&["ip", "link", "set", "up2", "down"]);
    let n2p0 = pods
        .iter()
        .position(|p| p.name == "n2p0")
        .unwrap_or_else(|| panic!("no n2p0"));
    let cut = c
        .probe(0, Target::Pod(n2p0))
        .unwrap_or_else(|| panic!("no probe"));
    assert!(!cut.ping && cut.tcp.is_err(), "{cut:?}");
    let local = c
        .probe(0, Target::Pod(1))
        .unwrap_or_else(|| panic!("no probe"));
    assert!(local.ok(), "{local:?}");

    let fp = c.footprint();
    let count = |name: &str| fp.processes.iter().filter(|(_, c)| c == name).count();
    assert_eq!(count("ovsdb-server"), 3, "{:?}", fp.processes);
    assert_eq!(count("ovs-vswitchd"), 3, "{:?}", fp.processes);
    assert_eq!(fp.netns.len(), 1 + 3 + 6, "fabric, nodes, pods");
    assert!(
        fp.leftovers().len() >= fp.netns.len() + 6,
        "the leftover check sees a live cluster"
    );
    let dir = c.dir().map(|d| d.to_path_buf());

    c.down().unwrap_or_else(|e| panic!("teardown: {e}"));
    let left = fp.leftovers();
    assert!(left.is_empty(), "left behind: {left:#?}");
    assert!(dir.is_some_and(|d| !d.exists()));
}

#[test]
fn linux_bridge_cluster_reachability() {
    let mut opts = common::opts();
    opts.nodes = 2;
    opts.bridge_type = BridgeType::Linux;
    let c = Cluster::up(opts).unwrap_or_else(|e| panic!("cluster up: {e}"));
    for n in c.nodes() {
        assert!(n.ovs.is_none());
        let uplink = n.ns.ok(&["ip", "-o", "link", "show", "dev", "uplink"]);
        assert!(uplink.contains(&format!("master {}", n.bridge)), "{uplink}");
    }
    let r = c
        .reachability()
        .unwrap_or_else(|e| panic!("reachability: {e}"));
    assert!(r.all_ok(), "{}\n{}", r.render(), r.failures().join("\n"));
    assert_eq!(r.checks.len(), 4 * 4, "4 pods: 3 peers and a gateway each");
    let fp = c.footprint();
    c.down().unwrap_or_else(|e| panic!("teardown: {e}"));
    let left = fp.leftovers();
    assert!(left.is_empty(), "left behind: {left:#?}");
}

/// Issue 19, IPv6 across nodes: a pod network that is IPv6 only
/// (config-gen writes one range from one `podCIDR`, so a cluster it
/// configures cannot be dual-stack), two nodes of two pods on the plain
/// fabric (no agent). kube-proxy's rules as its sync loop writes them (no
/// control plane runs here) on both nodes, iptables mode through
/// ip6tables-restore, then nftables mode in `ip6 kube-proxy`; n0p0 reaches
/// n0p1 (same node) and n1p0 (other node) through IPv6 ClusterIPs and each
/// endpoint sees n0p0's own address. On the Linux bridge with the node
/// netns's global `bridge-nf-call-ip6tables` at 0.
fn ipv6_cluster_ips_across_nodes(bridge: BridgeType) {
    let mut opts = common::opts();
    opts.nodes = 2;
    opts.bridge_type = bridge;
    opts.pod_cidr = "fd10:244::/48".into();
    opts.node_bits = 16;
    opts.netconf = vec![("isDefaultGateway".into(), true.into())];
    let c = Cluster::up(opts).unwrap_or_else(|e| panic!("cluster up: {e}"));
    if bridge == BridgeType::Linux {
        for n in c.nodes() {
            n.ns.ok(&["sysctl", "-qw", "net.bridge.bridge-nf-call-ip6tables=0"]);
        }
    }
    let pod = |n: usize, p: usize| &c.nodes()[n].pods[p];
    assert!(pod(0, 0).ip.is_ipv6(), "{}", pod(0, 0).ip);
    let endpoint = |n: usize, p: usize| Endpoint {
        name: pod(n, p).name.clone(),
        addr: SocketAddr::new(pod(n, p).ip, 8080),
        netns: pod(n, p).pod.ns.path(),
    };
    let vip = |s: &str| -> SocketAddr { s.parse().unwrap() };
    let services = [
        (vip("[fd10:96::1:1]:80"), endpoint(0, 1)),
        (vip("[fd10:96::1:2]:80"), endpoint(1, 0)),
    ];
    let nodes: Vec<&Netns> = c.nodes().iter().map(|n| &n.ns).collect();
    let client = pod(0, 0).pod.ns.path();
    for mode in [Mode::Iptables, Mode::Nftables] {
        let cips = ClusterIps::program(&nodes, mode, "fd10:244::/48", "fd10:96::/112", &services)
            .unwrap_or_else(|e| panic!("{bridge} {mode:?}: {e}"));
        let t = std::time::Instant::now();
        cips.assert_seen(pod(0, 0).ip, Duration::from_secs(20), |to| {
            peer_seen(&client, to)
        });
        eprintln!(
            "{bridge} {mode:?}: both IPv6 ClusterIPs in {:?}",
            t.elapsed()
        );
    }
    c.down().unwrap_or_else(|e| panic!("teardown: {e}"));
}

#[test]
fn ipv6_cluster_ips_across_nodes_on_ovs() {
    ipv6_cluster_ips_across_nodes(BridgeType::Ovs);
}

#[test]
fn ipv6_cluster_ips_across_nodes_on_linux_bridge() {
    ipv6_cluster_ips_across_nodes(BridgeType::Linux);
}
