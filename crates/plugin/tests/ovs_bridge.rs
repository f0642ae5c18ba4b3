//! The plugin on the Open vSwitch backend (`"bridgeType": "ovs"`): the same
//! behaviour suite as linux_bridge.rs, each test with its own OVS instance
//! (ovsdb-server + ovs-vswitchd) inside its node netns. This machine has no
//! OVS kernel module, so the plugin must pick the userspace datapath (and
//! turn TX checksum offload off, or the TCP tests fail while ping works).
// A test that unwraps fails loudly, which is what a test should do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use common::{behaviour_suite, host_veth, Backend, Fixture};
use evio_testkit::plugin::Pod;

behaviour_suite!(Backend::Ovs);

/// The host veth is a port of the OVS bridge named in the config, and the
/// bridge is an OVS bridge (not a kernel bridge of the same name).
#[test]
fn ovs_backend_plugs_host_veth_into_the_ovs_bridge() {
    let f = Fixture::new(Backend::Ovs);
    let pod = Pod::new();
    let res = f.add_ok(&pod, &f.conf());
    let veth = host_veth(&res, &f.bridge);
    let ovs = f.ovs.as_ref().unwrap_or_else(|| panic!("no OVS"));
    assert_eq!(ovs.vsctl(&["port-to-br", &veth]).trim(), f.bridge);
    assert!(
        ovs.vsctl(&["list-br"]).lines().any(|b| b == f.bridge),
        "bridge {} not in OVS",
        f.bridge
    );
}

/// OVS spelled as in the original config.
#[test]
fn ovs_uppercase_spelling_selects_ovs() {
    let f = Fixture::new(Backend::Ovs);
    let pod = Pod::new();
    let res = f.add_ok(&pod, &f.conf().bridge_type("OVS"));
    f.assert_port_on_bridge(&host_veth(&res, &f.bridge));
}

/// On the userspace datapath TX checksum offload must be off on the host
/// veth, or TCP between pods fails.
#[test]
fn netdev_datapath_turns_tx_checksum_offload_off() {
    let f = Fixture::new(Backend::Ovs);
    let pod = Pod::new();
    let res = f.add_ok(&pod, &f.conf());
    let veth = host_veth(&res, &f.bridge);
    let out = f.node.ok(&["ethtool", "-k", &veth]);
    let line = out
        .lines()
        .find(|l| l.trim_start().starts_with("tx-checksumming:"))
        .unwrap_or_else(|| panic!("no tx-checksumming in ethtool -k {veth}:\n{out}"));
    assert!(line.contains("off"), "host veth {veth}: {line}");
}

/// STATUS reports the backend: with the OVSDB endpoint unreachable the
/// plugin cannot serve ADDs, so code 50.
#[test]
fn status_is_50_when_ovsdb_is_unreachable() {
    let f = Fixture::new(Backend::Ovs);
    let gone = f.dir.path().join("no-such-db.sock");
    let c = f.conf().ovsdb(&format!("unix:{}", gone.display()));
    f.status(&c)
        .expect_error_code("STATUS with an unreachable OVSDB", 50);
}

/// Each pod port carries the attachment identity in `external_ids` (on the
/// Port and the Interface): that is how DEL and GC find exactly their own
/// ports, and how an operator finds a pod's port.
#[test]
fn pod_port_external_ids_identify_the_attachment() {
    let f = Fixture::new(Backend::Ovs);
    let pod = Pod::new();
    let res = f.add_ok(&pod, &f.conf());
    let veth = host_veth(&res, &f.bridge);
    let ovs = f.ovs.as_ref().unwrap_or_else(|| panic!("no OVS"));
    for table in ["Port", "Interface"] {
        let get = |key: &str| {
            ovs.vsctl(&["get", table, &veth, &format!("external_ids:{key}")])
                .trim()
                .trim_matches('"')
                .to_string()
        };
        assert_eq!(get("evio-owner"), "evio", "{table} {veth}");
        assert_eq!(get("evio-network"), f.net, "{table} {veth}");
        assert_eq!(get("evio-container-id"), pod.id, "{table} {veth}");
        assert_eq!(get("evio-ifname"), pod.ifname, "{table} {veth}");
        assert_eq!(
            get("evio-netns"),
            pod.path().display().to_string(),
            "{table} {veth}"
        );
    }
}

/// With ovsdb-server down, ADD fails with "try again later" (11) within a
/// bounded time and leaves nothing behind (no veth, no allocation); STATUS
/// says not ready; once the database is back, ADD works again.
#[test]
fn add_fails_cleanly_while_ovsdb_server_is_down() {
    let mut f = Fixture::new(Backend::Ovs);
    let c = f.conf();
    f.warm_up(&c);
    let pod = Pod::new();
    let before = f.leaks(&[&pod.ns]);

    f.ovs
        .as_mut()
        .unwrap_or_else(|| panic!("no OVS"))
        .kill_ovsdb();
    let started = std::time::Instant::now();
    let out = f.add(&pod, &c);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "ADD took {:?} with OVSDB down",
        started.elapsed()
    );
    out.expect_error_code("ADD with ovsdb-server down", 11);
    f.status(&c.clone().version("1.1.0"))
        .expect_error_code("STATUS with ovsdb-server down", 50);

    f.ovs
        .as_mut()
        .unwrap_or_else(|| panic!("no OVS"))
        .start_ovsdb();
    let after = f.leaks(&[&pod.ns]);
    before.assert_no_leaks(&after, "failed ADD with ovsdb-server down");
    let res = f.add_ok(&pod, &c);
    f.assert_port_on_bridge(&host_veth(&res, &f.bridge));
}

/// The bridge set-up installs evio's conntrack flows (cookie 0x6576696f...,
/// "evio") through vswitchd's OpenFlow socket, exactly once however many
/// pods come; a foreign flow stays; a deleted or edited evio flow comes
/// back with the next ADD, and nothing else of the bridge is touched.
#[test]
fn bridge_setup_installs_evio_flows_idempotently_and_leaves_foreign_flows() {
    let f = Fixture::new(Backend::Ovs);
    let ovs = f.ovs.as_ref().unwrap_or_else(|| panic!("no OVS"));
    let (p1, p2) = (Pod::new(), Pod::new());
    f.add_ok(&p1, &f.conf());
    let evio = |flows: &[String]| -> Vec<String> {
        flows
            .iter()
            .filter(|l| l.contains("cookie=0x6576696f00000002"))
            .cloned()
            .collect()
    };
    let first = ovs.flows(&f.bridge);
    let ours = evio(&first);
    assert_eq!(ours.len(), 10, "evio's flows:\n{}", first.join("\n"));
    for want in [
        "priority=200,ip,in_port=LOCAL actions=ct(commit,zone=59152,exec(set_field:0x1->ct_mark)),learn(table=229,idle_timeout=65535,priority=100,cookie=0x6576696f80000002,eth_type=0x800,NXM_OF_IP_SRC[]=NXM_OF_IP_DST[],NXM_OF_IP_DST[]=NXM_OF_IP_SRC[],load:0x1->NXM_NX_REG7[]),NORMAL",
        "priority=100,ipv6 actions=resubmit(,229),resubmit(,230)",
        "table=230, priority=200,ipv6,reg7=0x1 actions=ct(table=231,zone=59152)",
        "table=230, priority=0 actions=NORMAL",
        "table=231, priority=200,ct_state=+rpl+trk,ct_mark=0x1/0x1,ip actions=set_field:",
        "table=231, priority=0 actions=NORMAL",
    ] {
        assert!(
            ours.iter().any(|l| l.contains(want)),
            "no flow with {want:?} in:\n{}",
            ours.join("\n")
        );
    }
    // OVS's own default flow is not ours and stays.
    assert!(
        first
            .iter()
            .any(|l| l.contains("cookie=0x0") || l.starts_with("priority=0 actions=NORMAL")),
        "{first:?}"
    );

    // A foreign flow, one evio flow deleted and another edited in place.
    let foreign = "table=7,priority=5,cookie=0x1234,udp,tp_dst=9999,actions=drop";
    assert!(ovs
        .ofctl(&["add-flow", &f.bridge, foreign])
        .status
        .success());
    assert!(ovs
        .ofctl(&["--strict", "del-flows", &f.bridge, "table=231,priority=0"])
        .status
        .success());
    assert!(ovs
        .ofctl(&[
            "--strict",
            "mod-flows",
            &f.bridge,
            "priority=100,ip,actions=drop"
        ])
        .status
        .success());
    assert_eq!(evio(&ovs.flows(&f.bridge)).len(), 9);
    f.add_ok(&p2, &f.conf());
    let after = ovs.flows(&f.bridge);
    let mut a = evio(&after);
    let mut b = ours.clone();
    a.sort();
    b.sort();
    assert_eq!(a, b, "repaired to exactly the first set");
    assert!(
        after
            .iter()
            .any(|l| l.contains("cookie=0x1234") && l.contains("tp_dst=9999")),
        "foreign flow gone:\n{}",
        after.join("\n")
    );
    // Intact flows are not rewritten: their age keeps growing over the
    // next ADD (a replaced flow starts again from 0 s).
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let p3 = Pod::new();
    f.add_ok(&p3, &f.conf());
    let out = ovs.ofctl(&["dump-flows", &f.bridge, "cookie=0x6576696f00000002/-1"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let ages: Vec<f64> = text
        .split("duration=")
        .skip(1)
        .map(|d| d.split('s').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(ages.len(), 10, "{text}");
    assert!(
        ages.iter().all(|&a| a >= 1.0),
        "a flow was rewritten:\n{text}"
    );

    // An upgrade from the first pipeline (version 1: every IP packet
    // through conntrack), with one flow of its own that the new set does
    // not replace: the next ADD leaves exactly the new set.
    for v1 in [
        "cookie=0x6576696f00000001,priority=100,ip,actions=ct(table=231,zone=59152)",
        "cookie=0x6576696f00000001,table=231,priority=7,udp,actions=NORMAL",
    ] {
        assert!(ovs.ofctl(&["add-flow", &f.bridge, v1]).status.success());
    }
    let p4 = Pod::new();
    f.add_ok(&p4, &f.conf());
    let after = ovs.flows(&f.bridge);
    let mut a = evio(&after);
    a.sort();
    assert_eq!(a, b, "upgraded to exactly the new set");
    assert!(
        !after
            .iter()
            .any(|l| l.contains("cookie=0x6576696f00000001")),
        "a version-1 flow is left:\n{}",
        after.join("\n")
    );
    assert!(after.iter().any(|l| l.contains("cookie=0x1234")));
}

/// The reply flows rewrite to the bridge's MAC, and that is the MAC it
/// keeps: the pinned `hwaddr`. vswitchd gives the device a MAC of its own
/// first and applies the pinned one a moment later; flows installed in
/// between send every Service reply to a MAC the bridge no longer has (the
/// Services benchmark met it about once in ten runs). Ten fresh bridges in a
/// row, each created by one of four racing ADDs: the ADDs that find the
/// bridge just created wait for the creator's pinned MAC too.
#[test]
fn reply_flows_rewrite_to_the_pinned_bridge_mac_of_a_new_bridge() {
    let f = Fixture::new(Backend::Ovs);
    let ovs = f.ovs.as_ref().unwrap_or_else(|| panic!("no OVS"));
    for round in 0..10 {
        let pods: Vec<Pod> = (0..4).map(|_| Pod::new()).collect();
        let results = common::behaviour::add_all(&f, &pods, &f.conf());
        let hwaddr = ovs
            .vsctl(&["get", "bridge", &f.bridge, "other_config:hwaddr"])
            .trim()
            .trim_matches('"')
            .to_string();
        let dev = evio_testkit::plugin::link(&f.node, &f.bridge)
            .and_then(|l| l["address"].as_str().map(str::to_string))
            .unwrap_or_else(|| panic!("round {round}: no bridge device"));
        assert_eq!(dev, hwaddr, "round {round}: device vs pinned MAC");
        let rewrites: Vec<String> = ovs
            .flows(&f.bridge)
            .iter()
            .filter_map(|l| l.split_once("->eth_dst"))
            .filter_map(|(before, _)| before.rsplit("set_field:").next())
            .map(str::to_string)
            .collect();
        assert_eq!(rewrites.len(), 2, "round {round}: {rewrites:?}");
        for m in &rewrites {
            assert_eq!(m, &hwaddr, "round {round}: flows rewrite to another MAC");
        }
        common::behaviour::del_all(&f, &pods, &f.conf(), &results);
        ovs.vsctl(&["del-br", &f.bridge]);
    }
}

/// What keeps pod-to-pod traffic at plain L2 cost: only address pairs that
/// a connection from the host (LOCAL) joined go through evio's conntrack
/// zone. Every packet that went through the zone lands in table 231, so its
/// packet counters tell: the host's ping to pod A learns the pair and is
/// counted there; pods A and Z talking directly afterwards add nothing, and
/// learn no pair.
#[test]
fn only_pairs_the_host_joined_go_through_conntrack() {
    use common::pod_ip;
    use evio_testkit::plugin::{ping, tcp_roundtrip};
    use std::time::{Duration, Instant};
    let f = Fixture::new(Backend::Ovs);
    let ovs = f.ovs.as_ref().unwrap_or_else(|| panic!("no OVS"));
    let (a, z) = (Pod::new(), Pod::new());
    let (ra, rz) = (f.add_ok(&a, &f.conf()), f.add_ok(&z, &f.conf()));
    let (ia, iz) = (pod_ip(&ra, 4).to_string(), pod_ip(&rz, 4).to_string());
    let dump = |filter: &str| {
        let out = ovs.ofctl(&["dump-flows", &f.bridge, filter]);
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // Packets that went through conntrack (vswitchd pushes the datapath's
    // counters to the flows about every 0.5 s).
    let tracked = || -> u64 {
        dump("table=231")
            .split("n_packets=")
            .skip(1)
            .filter_map(|x| x.split(',').next()?.parse::<u64>().ok())
            .sum()
    };
    let pair_of = |ip: &str| {
        dump("cookie=0x6576696f80000002/-1")
            .lines()
            .any(|x| x.contains(&format!("nw_src={ip},")) && x.contains("load:0x1->NXM_NX_REG7[]"))
    };

    assert!(ping(&f.node, &ia), "the node cannot ping pod A");
    assert!(pair_of(&ia), "no pair learned for pod A");
    let deadline = Instant::now() + Duration::from_secs(10);
    while tracked() == 0 {
        assert!(
            Instant::now() < deadline,
            "the host's ping never went through conntrack:\n{}",
            dump("")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(1500));
    let base = tracked();

    assert!(ping(&a.ns, &iz), "pod A cannot ping pod Z");
    tcp_roundtrip(&z.ns, pod_ip(&rz, 4), &a.ns).unwrap_or_else(|e| panic!("TCP A -> Z: {e}"));
    tcp_roundtrip(&a.ns, pod_ip(&ra, 4), &z.ns).unwrap_or_else(|e| panic!("TCP Z -> A: {e}"));
    std::thread::sleep(Duration::from_millis(2000));
    assert_eq!(
        tracked(),
        base,
        "pod-to-pod packets went through conntrack:\n{}",
        dump("")
    );
    assert!(!pair_of(&iz), "a pair was learned from pod-to-pod traffic");
}
