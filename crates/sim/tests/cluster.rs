//! The simulated cluster end to end: real OVS per node, the real plugin and
//! config-gen, pods probing each other across the fabric.
// A test that unwraps fails loudly, which is what a test should do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;

use evio_testkit::cluster::{network_of, BridgeType, Cluster, Target};

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
