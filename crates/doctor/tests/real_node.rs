//! The doctor's collection against a real kernel and a real OVS: state is
//! planted by hand (ip, ovs-vsctl, files) inside a node netns the test
//! creates, then the doctor must find exactly the planted inconsistencies.
//! The plugin-driven crash and fault tests (crates/plugin/tests) use the
//! doctor as their leak detector; this test keeps the detector honest on its
//! own, independently of the plugin.
// A test that unwraps fails loudly, which is what a test should do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::path::Path;

use evio_doctor::{examine, Kind, Options, Report};
use evio_plugin::naming::host_veth_name;
use evio_testkit::netns::Netns;
use evio_testkit::ovs::Ovs;
use evio_testkit::plugin::test_dir;
use serde_json::json;

fn write_conflist(dir: &Path, name: &str, bridge: &str, extra: serde_json::Value) {
    let mut plugin = json!({
        "type": "evio",
        "bridge": bridge,
        "bridgeType": "linux",
        "ipam": {
            "type": "host-local",
            "dataDir": dir.join("ipam").display().to_string(),
            "ranges": [[{"subnet": "10.244.0.0/16", "rangeStart": "10.244.3.2",
                         "rangeEnd": "10.244.3.254", "gateway": "10.244.3.1"}]],
        },
    });
    for (k, v) in extra.as_object().into_iter().flatten() {
        plugin[k] = v.clone();
    }
    let list = json!({"cniVersion": "1.0.0", "name": name, "plugins": [plugin]});
    std::fs::create_dir_all(dir.join("conf")).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(dir.join("conf/10-evio.conflist"), list.to_string())
        .unwrap_or_else(|e| panic!("{e}"));
}

fn allocate(dir: &Path, net: &str, ip: &str, content: &str) {
    let d = dir.join("ipam").join(net);
    std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(d.join(ip), content).unwrap_or_else(|e| panic!("{e}"));
}

/// A veth pair in `node` whose first end is named and tagged like a pod's.
fn plant_veth(node: &Netns, name: &str, alias: Option<&str>, master: Option<&str>) {
    let peer = format!("p{}", &name[name.len() - 12..]);
    node.ok(&[
        "ip", "link", "add", name, "type", "veth", "peer", "name", &peer,
    ]);
    if let Some(a) = alias {
        node.ok(&["ip", "link", "set", "dev", name, "alias", a]);
    }
    if let Some(m) = master {
        node.ok(&["ip", "link", "set", "dev", name, "master", m]);
    }
    node.ok(&["ip", "link", "set", "dev", name, "up"]);
}

fn run(node: &Netns, dir: &Path, opts: Options) -> Report {
    let ns = evio_net::NetnsFd::open(&node.path()).unwrap_or_else(|e| panic!("{e}"));
    let conf = dir.join("conf");
    evio_net::run_in_netns(&ns, move || examine(&conf, &opts))
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|e| panic!("{e}"))
}

fn kinds(r: &Report) -> Vec<(Kind, String)> {
    r.problems().map(|p| (p.kind, p.subject.clone())).collect()
}

#[test]
fn linux_bridge_node_orphans_are_found_and_healthy_pods_pass() {
    let node = Netns::new("evdn");
    let dir = test_dir("evio-doctor-test");
    let net = format!("net-{}", node.name());
    let bridge = "evbr0";
    write_conflist(dir.path(), &net, bridge, json!({}));
    // As evio makes it: its own netfilter options on (Services need them).
    node.ok(&[
        "ip",
        "link",
        "add",
        bridge,
        "type",
        "bridge",
        "nf_call_iptables",
        "1",
        "nf_call_ip6tables",
        "1",
    ]);
    node.ok(&["ip", "link", "set", bridge, "up"]);
    node.ok(&["ip", "addr", "add", "10.244.3.1/16", "dev", bridge]);

    // A healthy pod: allocation, tagged veth on the bridge.
    let ok = host_veth_name("healthy", "eth0");
    allocate(dir.path(), &net, "10.244.3.2", "healthy\r\neth0");
    plant_veth(
        &node,
        &ok,
        Some(&format!("evio|{net}|healthy|eth0")),
        Some(bridge),
    );
    let report = run(&node, dir.path(), Options::default());
    assert!(report.is_clean(), "{}", report.render());
    assert_eq!(
        report.attachment_ids(),
        BTreeSet::from([("healthy".to_string(), "eth0".to_string())])
    );

    // Orphans of every kind a crashed or half-cleaned ADD/DEL leaves.
    allocate(dir.path(), &net, "10.244.3.3", "gone\r\neth0");
    allocate(dir.path(), &net, "10.244.3.4", "");
    let noip = host_veth_name("noip", "eth0");
    plant_veth(
        &node,
        &noip,
        Some(&format!("evio|{net}|noip|eth0")),
        Some(bridge),
    );
    let untagged = host_veth_name("untagged", "eth0");
    plant_veth(&node, &untagged, None, None);
    // Another network's veth is not this network's business.
    let other = host_veth_name("other", "eth0");
    plant_veth(&node, &other, Some("evio|othernet|other|eth0"), None);

    let report = run(&node, dir.path(), Options::default());
    let mut want = vec![
        (Kind::AllocationWithoutVeth, "10.244.3.3".to_string()),
        (Kind::AllocationWithoutOwner, "10.244.3.4".to_string()),
        (Kind::VethWithoutAllocation, noip.clone()),
        (Kind::UntaggedVeth, untagged.clone()),
    ];
    want.sort();
    assert_eq!(kinds(&report), want, "{}", report.render());

    // With the runtime's list, the healthy pod alone is expected.
    let valid = BTreeSet::from([("healthy".to_string(), "eth0".to_string())]);
    let report = run(
        &node,
        dir.path(),
        Options {
            valid: Some(valid),
            store: None,
        },
    );
    let stale: Vec<String> = report
        .problems()
        .filter(|p| p.kind == Kind::StaleAttachment)
        .map(|p| p.subject.clone())
        .collect();
    assert_eq!(stale, vec!["gone/eth0", "noip/eth0"], "{}", report.render());
}

#[test]
fn masquerade_chain_is_read_from_nftables() {
    let node = Netns::new("evdm");
    let dir = test_dir("evio-doctor-test");
    let net = format!("net-{}", node.name());
    write_conflist(dir.path(), &net, "evbr0", json!({"ipMasq": false}));
    node.ok(&["ip", "link", "add", "evbr0", "type", "bridge"]);
    // A chain the plugin would have made, left behind after ipMasq was
    // turned off.
    let script = format!(
        "add table inet evio\nadd chain inet evio masq-{net} {{ type nat hook postrouting priority srcnat; policy accept; }}\nadd rule inet evio masq-{net} ip saddr 10.244.0.0/16 ip daddr != 10.244.0.0/16 masquerade\n"
    );
    let path = dir.path().join("masq.nft");
    std::fs::write(&path, script).unwrap_or_else(|e| panic!("{e}"));
    node.ok(&["nft", "-f", &path.display().to_string()]);
    let report = run(&node, dir.path(), Options::default());
    assert_eq!(
        kinds(&report),
        vec![(Kind::MasqueradeStale, "masquerade".to_string())],
        "{}",
        report.render()
    );
}

#[test]
fn ovs_ports_are_reconciled_with_links() {
    let node = Netns::new("evdo");
    let dir = test_dir("evio-doctor-test");
    let ovs = Ovs::start(&node);
    let net = format!("net-{}", node.name());
    let bridge = "evbr0";
    write_conflist(
        dir.path(),
        &net,
        bridge,
        json!({"bridgeType": "ovs", "ovsdb": ovs.endpoint(), "isGateway": false}),
    );
    ovs.vsctl(&[
        "add-br",
        bridge,
        "--",
        "set",
        "bridge",
        bridge,
        "datapath_type=netdev",
    ]);
    let ids = |cid: &str| {
        vec![
            "--".to_string(),
            "set".to_string(),
            "port".to_string(),
            host_veth_name(cid, "eth0"),
            "external_ids:evio-owner=evio".to_string(),
            format!("external_ids:evio-network={net}"),
            format!("external_ids:evio-container-id={cid}"),
            "external_ids:evio-ifname=eth0".to_string(),
        ]
    };
    // A pod with everything.
    let good = host_veth_name("good", "eth0");
    allocate(dir.path(), &net, "10.244.3.2", "good\r\neth0");
    plant_veth(&node, &good, Some(&format!("evio|{net}|good|eth0")), None);
    let mut args = vec!["add-port".to_string(), bridge.into(), good.clone()];
    args.extend(ids("good"));
    ovs.vsctl(&args.iter().map(String::as_str).collect::<Vec<_>>());
    // A port whose link is gone (pod netns deleted, DEL not run yet).
    let ghost = host_veth_name("ghost", "eth0");
    allocate(dir.path(), &net, "10.244.3.3", "ghost\r\neth0");
    let mut args = vec!["add-port".to_string(), bridge.into(), ghost.clone()];
    args.extend(ids("ghost"));
    ovs.vsctl(&args.iter().map(String::as_str).collect::<Vec<_>>());
    // A tagged veth never plugged in (ADD stopped before attach).
    let loose = host_veth_name("loose", "eth0");
    allocate(dir.path(), &net, "10.244.3.4", "loose\r\neth0");
    plant_veth(&node, &loose, Some(&format!("evio|{net}|loose|eth0")), None);
    // Someone else's port: never evio's business.
    plant_veth(&node, "evforeign00000", None, None);
    ovs.vsctl(&["add-port", bridge, "evforeign00000"]);

    let report = run(&node, dir.path(), Options::default());
    let got: Vec<(Kind, String)> = kinds(&report);
    assert!(
        got.contains(&(Kind::PortWithoutLink, ghost.clone())),
        "{}",
        report.render()
    );
    assert!(
        got.contains(&(Kind::AllocationWithoutVeth, "10.244.3.3".to_string())),
        "{}",
        report.render()
    );
    assert!(
        got.contains(&(Kind::LinkWithoutPort, loose.clone())),
        "{}",
        report.render()
    );
    assert!(
        got.iter().all(|(_, s)| s != &good && s != "evforeign00000"),
        "{}",
        report.render()
    );

    // OVSDB down: the doctor says it cannot verify, it does not pass.
    drop(ovs);
    let report = run(&node, dir.path(), Options::default());
    assert!(
        report.problems().any(|p| p.kind == Kind::Unverifiable),
        "{}",
        report.render()
    );
}
