//! Behaviour of the plugin on a node, written once and run per backend (see
//! `backend_tests!`). Each body builds its own node fixture and pods, so the
//! bodies run in parallel without sharing anything.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use evio_testkit::netns::Netns;
use evio_testkit::plugin::{
    addrs, ipam_allocations, link, nft_ruleset, ping, range4, range6, routes, sysctl,
    tcp_roundtrip, NetConf, Pod, GATEWAY4, GATEWAY6, POD_CIDR4, POD_CIDR6, RANGE4_START,
};
use evio_testkit::services::{peer_seen, ClusterIps, Endpoint, Mode};
use serde_json::{json, Value};

use super::{
    host_veth, interfaces, ip, parse_cidr, pod_iface_index, pod_ip, result_addrs, Backend, Fixture,
};

const LIVE: &str = "cni.dev/valid-attachments";
const LEGACY: &str = "cni.dev/attachments";

fn flags(l: &Value) -> Vec<String> {
    l["flags"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f.as_str().map(str::to_string))
        .collect()
}

fn mac_of(ns: &Netns, dev: &str) -> String {
    link(ns, dev)
        .and_then(|l| l["address"].as_str().map(str::to_lowercase))
        .unwrap_or_else(|| panic!("no link {dev} in {}", ns.name()))
}

fn has_addr(ns: &Netns, dev: &str, cidr: &str) -> bool {
    let (want, prefix) = parse_cidr(cidr);
    addrs(ns, dev)
        .iter()
        .any(|a| a.ip == want && a.prefix == prefix)
}

/// The route to `dst` ("default" or CIDR) in `ns`, if any.
fn route_to(ns: &Netns, family: &str, dst: &str) -> Option<Value> {
    routes(ns, family)
        .into_iter()
        .find(|r| r["dst"].as_str() == Some(dst))
}

// ---------------------------------------------------------------- ADD result

/// ADD's result in config version `version`: cniVersion echoed; interfaces
/// list holding the bridge, the host veth and the pod's interface (with its
/// sandbox) with their real MACs; ips pointing at the pod interface, with the
/// pod CIDR's prefix and the gateway; `version` per IP only before 1.0.0.
fn add_result_shape(b: Backend, version: &str) {
    let f = Fixture::new(b);
    let pod = Pod::new();
    let c = f.conf().version(version);
    let res = f.add_ok(&pod, &c);

    assert_eq!(res["cniVersion"].as_str(), Some(version), "result: {res}");
    let ifs = interfaces(&res);
    let pi = pod_iface_index(&res, &pod.ifname);
    let pod_if = &ifs[pi];
    assert_eq!(
        pod_if["sandbox"].as_str(),
        Some(pod.path().display().to_string().as_str()),
        "pod interface sandbox must be the netns path: {res}"
    );
    assert_eq!(
        pod_if["mac"].as_str().map(str::to_lowercase),
        Some(mac_of(&pod.ns, &pod.ifname)),
        "pod interface MAC in result differs from the real one: {res}"
    );

    let br = ifs
        .iter()
        .find(|i| i["name"].as_str() == Some(f.bridge.as_str()))
        .unwrap_or_else(|| panic!("bridge {} missing from interfaces: {res}", f.bridge));
    assert!(
        br["sandbox"].as_str().unwrap_or("").is_empty(),
        "bridge must not have a sandbox: {res}"
    );
    assert_eq!(
        br["mac"].as_str().map(str::to_lowercase),
        Some(mac_of(&f.node, &f.bridge)),
        "bridge MAC in result differs from the real one: {res}"
    );

    let veth = host_veth(&res, &f.bridge);
    let vi = ifs
        .iter()
        .find(|i| i["name"].as_str() == Some(veth.as_str()))
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        vi["mac"].as_str().map(str::to_lowercase),
        Some(mac_of(&f.node, &veth)),
        "host veth MAC in result differs from the real one: {res}"
    );

    let ips = res["ips"].as_array().cloned().unwrap_or_default();
    assert_eq!(ips.len(), 1, "one IPv4 range gives one IP: {res}");
    for entry in &ips {
        assert_eq!(
            entry["interface"].as_u64(),
            Some(pi as u64),
            "ips[].interface must index the pod interface: {res}"
        );
        let (addr, prefix) = parse_cidr(entry["address"].as_str().unwrap_or(""));
        assert_eq!(addr, ip(RANGE4_START), "first address of the range: {res}");
        assert_eq!(
            prefix, 16,
            "pod address carries the pod CIDR's prefix: {res}"
        );
        assert_eq!(entry["gateway"].as_str(), Some(GATEWAY4), "gateway: {res}");
        if version.starts_with("0.") {
            assert_eq!(
                entry["version"].as_str(),
                Some("4"),
                "{version} results carry \"version\" in each IP: {res}"
            );
        } else {
            assert!(
                entry.get("version").is_none(),
                "{version} results have no \"version\" in IPs: {res}"
            );
        }
    }
}

pub fn add_result_shape_v0_3_0(b: Backend) {
    add_result_shape(b, "0.3.0")
}
pub fn add_result_shape_v0_3_1(b: Backend) {
    add_result_shape(b, "0.3.1")
}
pub fn add_result_shape_v0_4_0(b: Backend) {
    add_result_shape(b, "0.4.0")
}
pub fn add_result_shape_v1_0_0(b: Backend) {
    add_result_shape(b, "1.0.0")
}
pub fn add_result_shape_v1_1_0(b: Backend) {
    add_result_shape(b, "1.1.0")
}

/// A dual-stack result in `version`: one IP per family, both on the pod
/// interface, each with its family's gateway, and `"version": "4"/"6"` only
/// before 1.0.0.
fn add_result_shape_dual_stack(b: Backend, version: &str) {
    let f = Fixture::new(b);
    let pod = Pod::new();
    let c = f
        .conf()
        .version(version)
        .ranges(json!([[range4()], [range6()]]));
    let res = f.add_ok(&pod, &c);
    let pi = pod_iface_index(&res, &pod.ifname) as u64;
    let ips = res["ips"].as_array().cloned().unwrap_or_default();
    assert_eq!(ips.len(), 2, "one IP per family: {res}");
    for entry in &ips {
        let (addr, prefix) = parse_cidr(entry["address"].as_str().unwrap_or(""));
        let (fam, gw, want_prefix) = if addr.is_ipv4() {
            ("4", GATEWAY4, 16)
        } else {
            ("6", GATEWAY6, 64)
        };
        assert_eq!(entry["interface"].as_u64(), Some(pi), "{res}");
        assert_eq!(prefix, want_prefix, "pod CIDR prefix: {res}");
        assert_eq!(entry["gateway"].as_str(), Some(gw), "{res}");
        if version.starts_with("0.") {
            assert_eq!(entry["version"].as_str(), Some(fam), "{version}: {res}");
        } else {
            assert!(entry.get("version").is_none(), "{version}: {res}");
        }
    }
}

pub fn add_result_shape_dual_stack_v0_4_0(b: Backend) {
    add_result_shape_dual_stack(b, "0.4.0")
}
pub fn add_result_shape_dual_stack_v1_1_0(b: Backend) {
    add_result_shape_dual_stack(b, "1.1.0")
}

// ------------------------------------------------------------ ADD host state

/// Pod side: link up with the configured MTU, the IPAM address with the pod
/// CIDR prefix, a default route and the IPAM routes via the gateway,
/// arp_notify on. Node side: host veth up, same MTU, on the bridge; bridge
/// up holding the gateway with the pod CIDR prefix; forwarding enabled.
pub fn add_configures_pod_and_node(b: Backend) {
    let f = Fixture::new(b);
    assert_eq!(
        sysctl(&f.node, "net/ipv4/ip_forward"),
        "0",
        "a fresh node netns starts with forwarding off"
    );
    let pod = Pod::new();
    let c = f
        .conf()
        .mtu(1400)
        .is_default_gateway(true)
        .routes(json!([{ "dst": "10.96.0.0/12" }]));
    let res = f.add_ok(&pod, &c);
    let pod_addr = pod_ip(&res, 4);

    let l = link(&pod.ns, &pod.ifname).unwrap_or_else(|| panic!("pod has no {}", pod.ifname));
    assert!(
        flags(&l).contains(&"UP".to_string()),
        "pod link not up: {l}"
    );
    assert!(
        flags(&l).contains(&"LOWER_UP".to_string()),
        "pod link has no carrier (host end down?): {l}"
    );
    assert_eq!(l["mtu"].as_u64(), Some(1400), "pod link MTU: {l}");
    assert!(
        has_addr(&pod.ns, &pod.ifname, &format!("{pod_addr}/16")),
        "pod lacks {pod_addr}/16: {:?}",
        addrs(&pod.ns, &pod.ifname)
    );
    let def = route_to(&pod.ns, "-4", "default")
        .unwrap_or_else(|| panic!("no default route in pod: {:?}", routes(&pod.ns, "-4")));
    assert_eq!(
        def["gateway"].as_str(),
        Some(GATEWAY4),
        "default route: {def}"
    );
    assert_eq!(
        def["dev"].as_str(),
        Some(pod.ifname.as_str()),
        "default route: {def}"
    );
    let svc = route_to(&pod.ns, "-4", "10.96.0.0/12")
        .unwrap_or_else(|| panic!("no IPAM route in pod: {:?}", routes(&pod.ns, "-4")));
    assert_eq!(svc["gateway"].as_str(), Some(GATEWAY4), "IPAM route: {svc}");
    assert_eq!(
        sysctl(&pod.ns, &format!("net/ipv4/conf/{}/arp_notify", pod.ifname)),
        "1",
        "arp_notify must be on so neighbours learn the new MAC"
    );
    let rroutes = res["routes"].as_array().cloned().unwrap_or_default();
    assert!(
        rroutes
            .iter()
            .any(|r| r["dst"].as_str() == Some("10.96.0.0/12")),
        "result must carry the IPAM routes: {res}"
    );

    let veth = host_veth(&res, &f.bridge);
    let hl = link(&f.node, &veth).unwrap_or_else(|| panic!("host veth {veth} missing"));
    assert!(
        flags(&hl).contains(&"UP".to_string()),
        "host veth down: {hl}"
    );
    assert_eq!(hl["mtu"].as_u64(), Some(1400), "host veth MTU: {hl}");
    f.assert_port_on_bridge(&veth);

    let bl = link(&f.node, &f.bridge).unwrap_or_else(|| panic!("no bridge {}", f.bridge));
    assert!(flags(&bl).contains(&"UP".to_string()), "bridge down: {bl}");
    assert!(
        has_addr(&f.node, &f.bridge, &format!("{GATEWAY4}/16")),
        "bridge must hold {GATEWAY4}/16: {:?}",
        addrs(&f.node, &f.bridge)
    );
    assert_eq!(
        sysctl(&f.node, "net/ipv4/ip_forward"),
        "1",
        "isGateway must enable forwarding"
    );
}

/// Without isDefaultGateway the pod gets no default route (only the
/// connected pod CIDR).
pub fn add_without_default_gateway_adds_no_default_route(b: Backend) {
    let f = Fixture::new(b);
    let pod = Pod::new();
    f.add_ok(&pod, &f.conf().is_default_gateway(false));
    assert!(
        route_to(&pod.ns, "-4", "default").is_none(),
        "unexpected default route: {:?}",
        routes(&pod.ns, "-4")
    );
    assert!(
        route_to(&pod.ns, "-4", POD_CIDR4).is_some(),
        "the pod CIDR must be on-link: {:?}",
        routes(&pod.ns, "-4")
    );
}

/// isGateway false: the bridge gets no gateway address and forwarding stays
/// as it was.
pub fn is_gateway_false_puts_no_address_on_bridge(b: Backend) {
    let f = Fixture::new(b);
    let pod = Pod::new();
    f.add_ok(&pod, &f.conf().is_gateway(false));
    let v4: Vec<_> = addrs(&f.node, &f.bridge)
        .into_iter()
        .filter(|a| a.ip.is_ipv4())
        .collect();
    assert!(v4.is_empty(), "bridge has addresses: {v4:?}");
    assert_eq!(sysctl(&f.node, "net/ipv4/ip_forward"), "0");
}

/// An ifname of exactly 15 bytes (the kernel's limit) is valid.
pub fn fifteen_byte_ifname_is_accepted(b: Backend) {
    let f = Fixture::new(b);
    let pod = Pod::with_ifname("abcdefghijklmno");
    let res = f.add_ok(&pod, &f.conf());
    assert!(pod.ns.has_link("abcdefghijklmno"), "pod interface missing");
    pod_iface_index(&res, "abcdefghijklmno");
}

/// The host end's name is a function of container ID + ifname: the same
/// attachment gets the same name again, a different ifname another one.
pub fn host_veth_name_is_deterministic(b: Backend) {
    let f = Fixture::new(b);
    let c = f.conf();
    let pod = Pod::new();
    let r1 = f.add_ok(&pod, &c);
    let v1 = host_veth(&r1, &f.bridge);
    f.del_ok(&pod, &c, Some(&r1));
    let r2 = f.add_ok(&pod, &c);
    let v2 = host_veth(&r2, &f.bridge);
    assert_eq!(v1, v2, "same container+ifname must give the same host veth");
    let r3 = f
        .run("ADD", &pod.id, Some(&pod.path()), "net1", &c.json())
        .expect_success("ADD net1");
    let v3 = host_veth(&r3, &f.bridge);
    assert_ne!(v1, v3, "another ifname must give another host veth");
}

/// Two interfaces of one container are two attachments: deleting one leaves
/// the other (link, address, allocation) intact.
pub fn second_ifname_for_same_container_is_independent(b: Backend) {
    let f = Fixture::new(b);
    let c = f.conf();
    let pod = Pod::new();
    let r0 = f.add_ok(&pod, &c);
    let r1 = f
        .run("ADD", &pod.id, Some(&pod.path()), "net1", &c.json())
        .expect_success("ADD net1");
    let ip0 = pod_ip(&r0, 4);
    let ip1 = pod_ip(&r1, 4);
    assert_ne!(ip0, ip1, "each attachment gets its own address");
    assert_ne!(host_veth(&r0, &f.bridge), host_veth(&r1, &f.bridge));

    f.run(
        "DEL",
        &pod.id,
        Some(&pod.path()),
        "net1",
        &c.with_prev_result(&r1),
    )
    .expect_success("DEL net1");
    assert!(!pod.ns.has_link("net1"), "net1 still in pod after its DEL");
    assert!(pod.ns.has_link("eth0"), "DEL of net1 removed eth0");
    let alloc = f.allocations();
    assert!(
        alloc.contains_key(&ip0),
        "eth0's allocation released: {alloc:?}"
    );
    assert!(
        !alloc.contains_key(&ip1),
        "net1's allocation kept: {alloc:?}"
    );
    assert!(
        ping(&pod.ns, GATEWAY4),
        "eth0 lost connectivity after DEL of net1"
    );
    f.check(&pod, &c, &r0)
        .expect_success("CHECK eth0 after DEL net1");
}

// -------------------------------------------------------------- connectivity

pub fn pod_reaches_gateway_by_ping_and_tcp(b: Backend) {
    let f = Fixture::new(b);
    let pod = Pod::new();
    f.add_ok(&pod, &f.conf());
    assert!(ping(&pod.ns, GATEWAY4), "pod cannot ping the gateway");
    tcp_roundtrip(&f.node, ip(GATEWAY4), &pod.ns)
        .unwrap_or_else(|e| panic!("TCP pod -> gateway: {e}"));
}

pub fn pods_reach_each_other_by_ping_and_tcp(b: Backend) {
    let f = Fixture::new(b);
    let c = f.conf();
    let a = Pod::new();
    let z = Pod::new();
    let ra = f.add_ok(&a, &c);
    let rz = f.add_ok(&z, &c);
    let ia = pod_ip(&ra, 4);
    let iz = pod_ip(&rz, 4);
    assert_ne!(ia, iz);
    assert!(ping(&a.ns, &iz.to_string()), "pod A cannot ping pod Z");
    assert!(ping(&z.ns, &ia.to_string()), "pod Z cannot ping pod A");
    tcp_roundtrip(&z.ns, iz, &a.ns).unwrap_or_else(|e| panic!("TCP A -> Z: {e}"));
    tcp_roundtrip(&a.ns, ia, &z.ns).unwrap_or_else(|e| panic!("TCP Z -> A: {e}"));
}

/// A new pod that gets a just-freed address (with a new MAC) is reachable at
/// once from a pod that still has the old MAC cached: the gratuitous ARP
/// (arp_notify) of the new pod's interface updates the neighbour entry.
pub fn reused_address_is_reachable_at_once(b: Backend) {
    let f = Fixture::new(b);
    let c = f.conf().ranges(json!([[{
        "subnet": POD_CIDR4,
        "rangeStart": "10.244.3.2",
        "rangeEnd": "10.244.3.3",
        "gateway": GATEWAY4,
    }]]));
    let a = Pod::new();
    let z = Pod::new();
    f.add_ok(&a, &c);
    let rz = f.add_ok(&z, &c);
    let iz = pod_ip(&rz, 4).to_string();
    assert!(ping(&a.ns, &iz), "A cannot ping Z");
    f.del_ok(&z, &c, Some(&rz));
    let y = Pod::new();
    let ry = f.add_ok(&y, &c);
    assert_eq!(
        pod_ip(&ry, 4).to_string(),
        iz,
        "the only free address is Z's"
    );
    assert!(
        ping(&a.ns, &iz),
        "A cannot reach the new owner of {iz} at once (stale neighbour entry: no gratuitous ARP?)"
    );
}

/// The bridge (the pods' gateway) keeps its MAC while pods come and go:
/// unpinned, a Linux or OVS bridge takes the lowest MAC of its ports, so the
/// gateway's MAC would change whenever that pod left and every other pod's
/// ARP entry for the gateway would go stale.
pub fn gateway_mac_survives_pods_leaving(b: Backend) {
    let f = Fixture::new(b);
    let c = f.conf();
    let pods: Vec<Pod> = (0..3).map(|_| Pod::new()).collect();
    let results: Vec<Value> = pods.iter().map(|p| f.add_ok(p, &c)).collect();
    let mac = mac_of(&f.node, &f.bridge);
    for (p, r) in pods.iter().zip(&results).take(2) {
        f.del_ok(p, &c, Some(r));
        assert_eq!(
            mac_of(&f.node, &f.bridge),
            mac,
            "bridge MAC changed after a DEL"
        );
    }
    let last = &pods[2];
    assert!(
        ping(&last.ns, GATEWAY4),
        "the remaining pod cannot reach the gateway"
    );
    // Without ports an unpinned Linux bridge falls back to 00:00:00:00:00:00.
    f.del_ok(last, &c, Some(&results[2]));
    assert_eq!(
        mac_of(&f.node, &f.bridge),
        mac,
        "bridge MAC changed after the last DEL"
    );
}

/// The pod's MAC is derived from its address (0a:58 + the IPv4 address), so
/// a re-used address keeps its MAC; the result reports it.
pub fn pod_mac_follows_its_address(b: Backend) {
    let f = Fixture::new(b);
    let pod = Pod::new();
    let res = f.add_ok(&pod, &f.conf());
    let ip = match pod_ip(&res, 4) {
        IpAddr::V4(a) => a.octets(),
        other => panic!("not IPv4: {other}"),
    };
    let want = format!(
        "0a:58:{:02x}:{:02x}:{:02x}:{:02x}",
        ip[0], ip[1], ip[2], ip[3]
    );
    assert_eq!(mac_of(&pod.ns, &pod.ifname), want);
    let idx = pod_iface_index(&res, &pod.ifname);
    assert_eq!(res["interfaces"][idx]["mac"], want.as_str(), "{res}");
}

// --------------------------------------------------------------------- CHECK

pub fn check_passes_after_add(b: Backend) {
    let f = Fixture::new(b);
    let pod = Pod::new();
    let c = f.conf().is_default_gateway(true);
    let res = f.add_ok(&pod, &c);
    let out = f.check(&pod, &c, &res);
    out.expect_success("CHECK right after ADD");
    assert!(
        out.stdout.trim().is_empty(),
        "CHECK prints nothing on success: {out}"
    );
}

pub fn check_fails_after_pod_lost_its_address(b: Backend) {
    let f = Fixture::new(b);
    let pod = Pod::new();
    let c = f.conf();
    let res = f.add_ok(&pod, &c);
    let addr = res["ips"][0]["address"].as_str().unwrap_or("").to_string();
    pod.ns.ok(&["ip", "addr", "del", &addr, "dev", &pod.ifname]);
    f.check(&pod, &c, &res)
        .expect_error("CHECK after the pod's address was removed");
}

pub fn check_fails_when_host_veth_left_the_bridge(b: Backend) {
    let f = Fixture::new(b);
    let pod = Pod::new();
    let c = f.conf();
    let res = f.add_ok(&pod, &c);
    f.detach_port(&host_veth(&res, &f.bridge));
    f.check(&pod, &c, &res)
        .expect_error("CHECK after the host veth left the bridge");
}

pub fn check_fails_when_pod_interface_is_gone(b: Backend) {
    let f = Fixture::new(b);
    let pod = Pod::new();
    let c = f.conf();
    let res = f.add_ok(&pod, &c);
    pod.ns.ok(&["ip", "link", "del", "dev", &pod.ifname]);
    f.check(&pod, &c, &res)
        .expect_error("CHECK after the pod interface was deleted");
}

// ----------------------------------------------------------------------- DEL

/// DEL with prevResult, then DEL again without it (libcni dropped its cache):
/// both exit 0 and everything the ADD created is gone.
pub fn del_twice_succeeds_and_releases_everything(b: Backend) {
    let f = Fixture::new(b);
    let c = f.conf().ip_masq(true);
    f.warm_up(&c);
    let pod = Pod::new();
    let before = f.leaks(&[&pod.ns]);
    let res = f.add_ok(&pod, &c);
    f.del_ok(&pod, &c, Some(&res));
    f.del_ok(&pod, &c, None);
    before.assert_no_leaks(&f.leaks(&[&pod.ns]), "after ADD, DEL, DEL");
}

/// The runtime lost the pod's netns before DEL: DEL still exits 0, and the
/// host veth, the address and any per-pod masquerade state are released.
pub fn del_after_netns_is_gone_releases_veth_and_address(b: Backend) {
    let f = Fixture::new(b);
    let c = f.conf().ip_masq(true);
    f.warm_up(&c);
    let before = f.leaks(&[]);
    let pod = Pod::new();
    let res = f.add_ok(&pod, &c);
    let veth = host_veth(&res, &f.bridge);
    let Pod { ns, id, ifname } = pod;
    let path = ns.path();
    drop(ns);
    assert!(!path.exists(), "netns {} should be gone", path.display());

    f.run("DEL", &id, Some(&path), &ifname, &c.with_prev_result(&res))
        .expect_success("DEL with the netns gone");
    assert!(
        f.wait_link_gone(&veth, Duration::from_secs(5)),
        "host veth {veth} still on the node after DEL"
    );
    before.assert_no_leaks(&f.leaks(&[]), "after DEL of a pod whose netns was gone");
    // And a repeat is still fine.
    f.run("DEL", &id, Some(&path), &ifname, &c.json())
        .expect_success("second DEL with the netns gone");
}

/// DEL with no CNI_NETNS and no prevResult (spec: clean up as much as
/// possible, return success): the allocation and the host veth, which are
/// both keyed by container ID + ifname, are released.
pub fn del_without_netns_releases_address_and_veth(b: Backend) {
    let f = Fixture::new(b);
    let c = f.conf();
    let pod = Pod::new();
    let res = f.add_ok(&pod, &c);
    let veth = host_veth(&res, &f.bridge);
    let addr = pod_ip(&res, 4);
    f.run("DEL", &pod.id, None, &pod.ifname, &c.json())
        .expect_success("DEL without CNI_NETNS");
    assert!(
        !f.allocations().contains_key(&addr),
        "allocation of {addr} kept: {:?}",
        f.allocations()
    );
    assert!(
        f.wait_link_gone(&veth, Duration::from_secs(5)),
        "host veth {veth} kept after DEL without netns"
    );
}

/// DEL of an attachment that was never added (the runtime retries after a
/// failed ADD) succeeds and touches nothing.
pub fn del_of_never_added_attachment_succeeds(b: Backend) {
    let f = Fixture::new(b);
    let c = f.conf().ip_masq(true);
    let other = Pod::new();
    let other_res = f.add_ok(&other, &c);
    let pod = Pod::new();
    let before = f.leaks(&[&pod.ns, &other.ns]);
    f.del_ok(&pod, &c, None);
    before.assert_no_leaks(&f.leaks(&[&pod.ns, &other.ns]), "after DEL of nothing");
    f.check(&other, &c, &other_res)
        .expect_success("CHECK of another pod after DEL of nothing");
}

// --------------------------------------------------------- ADD all-or-nothing

/// A range of two addresses: two pods fit, the third ADD fails and leaves
/// nothing behind (no veth in the node or the pod, no allocation), and the
/// two pods keep working.
pub fn ipam_exhaustion_rolls_back_everything(b: Backend) {
    let f = Fixture::new(b);
    let c = f.conf().ranges(json!([[{
        "subnet": POD_CIDR4,
        "rangeStart": "10.244.3.2",
        "rangeEnd": "10.244.3.3",
        "gateway": GATEWAY4,
    }]]));
    let a = Pod::new();
    let z = Pod::new();
    f.add_ok(&a, &c);
    f.add_ok(&z, &c);
    let third = Pod::new();
    let before = f.leaks(&[&third.ns]);
    let out = f.add(&third, &c);
    out.expect_error("ADD with the range exhausted");
    // host-local's own explanation must reach the runtime (error JSON or
    // the passed-through stderr), or an operator cannot tell why.
    assert!(
        out.error_text().contains("no ip addresses available")
            || out
                .stderr
                .to_lowercase()
                .contains("no ip addresses available"),
        "IPAM's error is lost: {out}"
    );
    before.assert_no_leaks(&f.leaks(&[&third.ns]), "after the failed ADD");
    assert!(ping(&a.ns, GATEWAY4), "pod A lost connectivity");
    assert!(ping(&z.ns, GATEWAY4), "pod Z lost connectivity");
}

/// A failure after IPAM succeeded (the ifname is taken in the pod) releases
/// the allocation and leaves the pod's own link alone.
pub fn failure_after_ipam_releases_allocation(b: Backend) {
    let f = Fixture::new(b);
    let c = f.conf();
    f.warm_up(&c);
    let pod = Pod::new();
    // A veth, as this kernel has no dummy driver.
    pod.ns.ok(&[
        "ip",
        "link",
        "add",
        &pod.ifname,
        "type",
        "veth",
        "peer",
        "name",
        "evpeer0",
    ]);
    let before = f.leaks(&[&pod.ns]);
    f.add(&pod, &c)
        .expect_error("ADD when the pod already has that ifname");
    before.assert_no_leaks(
        &f.leaks(&[&pod.ns]),
        "after ADD failed on an existing ifname",
    );
    let l = link(&pod.ns, &pod.ifname).unwrap_or_default();
    assert_eq!(
        l["linkinfo"]["info_kind"].as_str(),
        Some("veth"),
        "the pod's own {} was replaced: {l}",
        pod.ifname
    );
}

/// ADD into a netns path that does not exist fails and keeps nothing.
pub fn add_to_missing_netns_fails_and_keeps_nothing(b: Backend) {
    let f = Fixture::new(b);
    let c = f.conf();
    f.warm_up(&c);
    let before = f.leaks(&[]);
    let path = std::path::PathBuf::from(format!("/run/netns/{}-missing", f.node.name()));
    f.run(
        "ADD",
        &evio_testkit::plugin::container_id(),
        Some(&path),
        "eth0",
        &c.json(),
    )
    .expect_error("ADD into a missing netns");
    before.assert_no_leaks(&f.leaks(&[]), "after ADD into a missing netns");
}

/// A second ADD of an existing attachment fails and changes nothing: the
/// first pod keeps its address, allocation, veth and connectivity.
pub fn duplicate_add_fails_and_existing_pod_keeps_working(b: Backend) {
    let f = Fixture::new(b);
    let c = f.conf();
    let pod = Pod::new();
    let res = f.add_ok(&pod, &c);
    let before = f.leaks(&[&pod.ns]);
    let alloc = f.allocations();
    f.add(&pod, &c).expect_error("duplicate ADD");
    before.assert_no_leaks(&f.leaks(&[&pod.ns]), "after the duplicate ADD");
    assert_eq!(f.allocations(), alloc, "allocations changed");
    let addr = res["ips"][0]["address"].as_str().unwrap_or("");
    assert!(
        has_addr(&pod.ns, &pod.ifname, addr),
        "pod lost {addr}: {:?}",
        addrs(&pod.ns, &pod.ifname)
    );
    assert!(ping(&pod.ns, GATEWAY4), "pod lost connectivity");
    f.check(&pod, &c, &res)
        .expect_success("CHECK of the original pod after a duplicate ADD");
}

// --------------------------------------------------------------- concurrency

const PARALLEL: usize = 16;

pub fn add_all(f: &Fixture, pods: &[Pod], c: &NetConf) -> Vec<Value> {
    std::thread::scope(|s| {
        let hs: Vec<_> = pods.iter().map(|p| s.spawn(|| f.add(p, c))).collect();
        hs.into_iter()
            .zip(pods)
            .map(|(h, p)| {
                h.join()
                    .unwrap_or_else(|_| panic!("ADD thread panicked"))
                    .expect_success(&format!("parallel ADD in {}", p.ns.name()))
            })
            .collect()
    })
}

pub fn del_all(f: &Fixture, pods: &[Pod], c: &NetConf, results: &[Value]) {
    std::thread::scope(|s| {
        let hs: Vec<_> = pods
            .iter()
            .zip(results)
            .map(|(p, r)| s.spawn(move || f.del(p, c, Some(r))))
            .collect();
        for (h, p) in hs.into_iter().zip(pods) {
            h.join()
                .unwrap_or_else(|_| panic!("DEL thread panicked"))
                .expect_success(&format!("parallel DEL in {}", p.ns.name()));
        }
    });
}

/// 16 ADDs at once then 16 DELs at once on a node that has served a pod
/// before: all succeed, distinct addresses, every pod reaches the gateway,
/// and afterwards the node is exactly as before.
pub fn parallel_adds_and_dels_leave_nothing_behind(b: Backend) {
    let f = Fixture::new(b);
    let c = f.conf().ip_masq(true);
    f.warm_up(&c);
    let pods: Vec<Pod> = (0..PARALLEL).map(|_| Pod::new()).collect();
    let ns: Vec<&Netns> = pods.iter().map(|p| &p.ns).collect();
    let before = f.leaks(&ns);

    let results = add_all(&f, &pods, &c);
    let ips: BTreeSet<IpAddr> = results.iter().map(|r| pod_ip(r, 4)).collect();
    assert_eq!(ips.len(), PARALLEL, "addresses not distinct: {ips:?}");
    for p in &pods {
        assert!(
            ping(&p.ns, GATEWAY4),
            "{} cannot reach the gateway",
            p.ns.name()
        );
    }
    del_all(&f, &pods, &c, &results);
    before.assert_no_leaks(&f.leaks(&ns), "after 16 parallel ADDs and DELs");
}

/// The first ADDs on a fresh node racing each other: the bridge, its
/// gateway address and the masquerade state are created exactly once and
/// every ADD succeeds; the DELs leave only the per-network state.
pub fn parallel_first_adds_on_fresh_node_do_not_race(b: Backend) {
    let f = Fixture::new(b);
    let c = f.conf().ip_masq(true);
    let pods: Vec<Pod> = (0..PARALLEL).map(|_| Pod::new()).collect();
    let links_before: BTreeSet<String> = f.node.links().into_iter().collect();

    let results = add_all(&f, &pods, &c);
    let ips: BTreeSet<IpAddr> = results.iter().map(|r| pod_ip(r, 4)).collect();
    assert_eq!(ips.len(), PARALLEL, "addresses not distinct: {ips:?}");
    let v4: Vec<String> = addrs(&f.node, &f.bridge)
        .into_iter()
        .filter(|a| a.ip.is_ipv4())
        .map(|a| a.to_string())
        .collect();
    assert_eq!(v4, vec![format!("{GATEWAY4}/16")], "bridge addresses");
    for p in &pods {
        assert!(
            ping(&p.ns, GATEWAY4),
            "{} cannot reach the gateway",
            p.ns.name()
        );
    }
    del_all(&f, &pods, &c, &results);

    assert!(
        f.allocations().is_empty(),
        "allocations left: {:?}",
        f.allocations()
    );
    let mut allowed = links_before.clone();
    allowed.insert(f.bridge.clone());
    allowed.extend(f.backend_links());
    let now: BTreeSet<String> = f.node.links().into_iter().collect();
    let extra: Vec<_> = now.difference(&allowed).collect();
    assert!(extra.is_empty(), "links left in the node: {extra:?}");
    for p in &pods {
        assert_eq!(
            p.ns.links(),
            vec!["lo".to_string()],
            "{} not empty",
            p.ns.name()
        );
    }
    let nft = nft_ruleset(&f.node);
    for (r, p) in results.iter().zip(&pods) {
        let a = pod_ip(r, 4).to_string();
        assert!(
            !mentions_addr(&nft, &a),
            "nft still mentions pod address {a}:\n{nft}"
        );
        assert!(!nft.contains(&p.id), "nft still mentions {}:\n{nft}", p.id);
    }
}

/// Whether `text` names `addr` itself (not merely a longer address that
/// starts with the same digits).
fn mentions_addr(text: &str, addr: &str) -> bool {
    text.match_indices(addr).any(|(i, _)| {
        let next = text[i + addr.len()..].chars().next();
        let prev = text[..i].chars().next_back();
        !next.is_some_and(|c| c.is_ascii_hexdigit() || c == '.' || c == ':')
            && !prev.is_some_and(|c| c.is_ascii_hexdigit() || c == '.' || c == ':')
    })
}

/// DELs of 8 pods racing ADDs of 8 others: all succeed, exactly the new
/// pods hold addresses and veths afterwards, and once they are gone too the
/// node is as before.
pub fn concurrent_adds_and_dels_of_different_pods(b: Backend) {
    let f = Fixture::new(b);
    let c = f.conf().ip_masq(true);
    f.warm_up(&c);
    let before = f.leaks(&[]);
    let old: Vec<Pod> = (0..PARALLEL / 2).map(|_| Pod::new()).collect();
    let old_res = add_all(&f, &old, &c);
    let new: Vec<Pod> = (0..PARALLEL / 2).map(|_| Pod::new()).collect();

    let new_res = std::thread::scope(|s| {
        let dels: Vec<_> = old
            .iter()
            .zip(&old_res)
            .map(|(p, r)| {
                let (f, c) = (&f, &c);
                s.spawn(move || f.del(p, c, Some(r)))
            })
            .collect();
        let adds: Vec<_> = new
            .iter()
            .map(|p| {
                let (f, c) = (&f, &c);
                s.spawn(move || f.add(p, c))
            })
            .collect();
        for h in dels {
            h.join()
                .unwrap_or_else(|_| panic!("DEL thread panicked"))
                .expect_success("DEL racing ADDs");
        }
        adds.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| panic!("ADD thread panicked"))
                    .expect_success("ADD racing DELs")
            })
            .collect::<Vec<_>>()
    });

    let owners: BTreeSet<String> = f.allocations().values().map(|(id, _)| id.clone()).collect();
    let want: BTreeSet<String> = new.iter().map(|p| p.id.clone()).collect();
    assert_eq!(
        owners, want,
        "allocations must belong to exactly the new pods"
    );
    for (p, r) in new.iter().zip(&new_res) {
        f.assert_port_on_bridge(&host_veth(r, &f.bridge));
        assert!(
            ping(&p.ns, GATEWAY4),
            "{} cannot reach the gateway",
            p.ns.name()
        );
    }
    for r in &old_res {
        let v = host_veth(r, &f.bridge);
        assert!(!f.node.has_link(&v), "deleted pod's veth {v} still there");
    }
    del_all(&f, &new, &c, &new_res);
    before.assert_no_leaks(&f.leaks(&[]), "after the racing ADDs/DELs and cleanup");
}

// ------------------------------------------------------------------------ GC

fn gc_releases_stale_attachment(b: Backend, key: &str) {
    let f = Fixture::new(b);
    let c = f.conf().ip_masq(true);
    f.warm_up(&c);
    let live = Pod::new();
    let live_res = f.add_ok(&live, &c);
    let before = f.leaks(&[]);
    let stale = Pod::new();
    let stale_res = f.add_ok(&stale, &c);
    let stale_veth = host_veth(&stale_res, &f.bridge);
    let stale_ip = pod_ip(&stale_res, 4);

    f.gc(&c, key, &[(&live.id, &live.ifname)])
        .expect_success(&format!("GC with {key}"));
    assert!(
        !f.allocations().contains_key(&stale_ip),
        "GC kept the stale allocation {stale_ip}: {:?}",
        f.allocations()
    );
    assert!(
        !f.node.has_link(&stale_veth),
        "GC kept the stale host veth {stale_veth}"
    );
    before.assert_no_leaks(&f.leaks(&[]), &format!("after GC ({key}) of the stale pod"));

    assert!(
        ping(&live.ns, GATEWAY4),
        "live pod lost connectivity after GC"
    );
    f.check(&live, &c, &live_res)
        .expect_success("CHECK of the live pod after GC");

    // Nothing stale left: a second GC changes nothing.
    f.gc(&c, key, &[(&live.id, &live.ifname)])
        .expect_success("second GC");
    before.assert_no_leaks(&f.leaks(&[]), "after the second GC");
}

/// GC of one network leaves another network on the same node (same IPAM
/// dataDir, its own bridge) alone, and never removes bridge ports it did not
/// create (an uplink or overlay tunnel port added by someone else).
pub fn gc_leaves_other_networks_and_foreign_ports_alone(b: Backend) {
    let f = Fixture::new(b);
    let c = f.conf();
    let stale = Pod::new();
    f.add_ok(&stale, &c);
    let foreign = f.attach_foreign_port();

    let net2 = format!("{}-2", f.net);
    let bridge2 = evio_testkit::netns::unique_name("evc");
    let c2 = f.conf().name(&net2).bridge(&bridge2).ranges(json!([[{
        "subnet": "10.245.0.0/16",
        "rangeStart": "10.245.3.2",
        "rangeEnd": "10.245.3.254",
        "gateway": "10.245.3.1",
    }]]));
    let other = Pod::new();
    let other_res = f.add_ok(&other, &c2);
    let other_ip = pod_ip(&other_res, 4);
    let other_veth = host_veth(&other_res, &bridge2);

    f.gc(&c, LIVE, &[])
        .expect_success("GC with no valid attachments");
    assert!(
        f.allocations().is_empty(),
        "stale pod's allocation kept: {:?}",
        f.allocations()
    );
    let alloc2 = ipam_allocations(&f.data_dir(), &net2);
    assert!(
        alloc2.contains_key(&other_ip),
        "GC of {} released {other_ip} of network {net2}: {alloc2:?}",
        f.net
    );
    assert!(
        f.node.has_link(&other_veth),
        "GC removed the other network's veth {other_veth}"
    );
    assert!(
        ping(&other.ns, "10.245.3.1"),
        "other network's pod lost connectivity after GC"
    );
    assert!(
        f.node.has_link(&foreign),
        "GC deleted the foreign port {foreign}"
    );
    f.assert_port_on_bridge(&foreign);
}

pub fn gc_valid_attachments_releases_stale_pod_and_keeps_live_one(b: Backend) {
    gc_releases_stale_attachment(b, LIVE)
}

pub fn gc_legacy_attachments_key_releases_stale_pod_and_keeps_live_one(b: Backend) {
    gc_releases_stale_attachment(b, LEGACY)
}

// -------------------------------------------------------------------- STATUS

pub fn status_is_ok_with_host_local(b: Backend) {
    let f = Fixture::new(b);
    let out = f.status(&f.conf());
    out.expect_success("STATUS with host-local");
    assert!(
        out.stdout.trim().is_empty(),
        "STATUS prints nothing on success: {out}"
    );
}

pub fn status_is_50_when_ipam_plugin_is_missing(b: Backend) {
    let f = Fixture::new(b);
    f.status(&f.conf().ipam_type("evio-no-such-ipam"))
        .expect_error_code("STATUS with a missing IPAM plugin", 50);
}

// ---------------------------------------------------------------- masquerade

fn assert_masquerade_for_pod_cidr(f: &Fixture, what: &str) {
    let nft = nft_ruleset(&f.node);
    assert!(
        nft.contains("masquerade") && nft.contains(POD_CIDR4),
        "{what}: node ruleset must masquerade the pod CIDR {POD_CIDR4}:\n{nft}"
    );
}

pub fn ip_masq_installs_masquerade_for_pod_cidr(b: Backend) {
    let f = Fixture::new(b);
    assert!(
        !nft_ruleset(&f.node).contains("masquerade"),
        "fresh node already masquerades"
    );
    let pod = Pod::new();
    f.add_ok(&pod, &f.conf().ip_masq(true));
    assert_masquerade_for_pod_cidr(&f, "ipMasq");
}

pub fn is_ip_masq_alias_installs_masquerade(b: Backend) {
    let f = Fixture::new(b);
    let pod = Pod::new();
    f.add_ok(&pod, &f.conf().set("isIPMasq", json!(true)));
    assert_masquerade_for_pod_cidr(&f, "isIPMasq");
}

/// An "outside" netns on 192.168.77.0/24 behind the node, with no route
/// back to the pod CIDR: pods reach it only if the node SNATs them.
fn outside_network(f: &Fixture) -> Netns {
    let out = Netns::new("evo");
    f.node.ok(&[
        "ip",
        "link",
        "add",
        "evout0",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        out.name(),
    ]);
    f.node
        .ok(&["ip", "addr", "add", "192.168.77.1/24", "dev", "evout0"]);
    f.node.ok(&["ip", "link", "set", "evout0", "up"]);
    out.ok(&["ip", "addr", "add", "192.168.77.2/24", "dev", "eth0"]);
    out.ok(&["ip", "link", "set", "eth0", "up"]);
    out
}

/// With ipMasq a pod reaches a network that has no route back to pods;
/// the same set-up without ipMasq does not (so the first result is the
/// masquerade's doing).
pub fn ip_masq_lets_pod_reach_network_without_route_back(b: Backend) {
    let f = Fixture::new(b);
    let outside = outside_network(&f);
    let pod = Pod::new();
    f.add_ok(&pod, &f.conf().ip_masq(true).is_default_gateway(true));
    assert!(
        ping(&pod.ns, "192.168.77.2"),
        "pod cannot reach the outside network with ipMasq"
    );
    tcp_roundtrip(&outside, ip("192.168.77.2"), &pod.ns)
        .unwrap_or_else(|e| panic!("TCP pod -> outside with ipMasq: {e}"));

    let g = Fixture::new(b);
    let _outside2 = outside_network(&g);
    let pod2 = Pod::new();
    g.add_ok(&pod2, &g.conf().ip_masq(false).is_default_gateway(true));
    assert!(
        !ping(&pod2.ns, "192.168.77.2"),
        "control: without ipMasq the outside network must be unreachable"
    );
}

// ---------------------------------------------------------------------- IPv6

fn assert_v6_usable(f: &Fixture, pod: &Pod, res: &Value) {
    let a6 = pod_ip(res, 6);
    let (_, prefix) = result_addrs(res)
        .into_iter()
        .find(|(i, _)| *i == a6)
        .unwrap_or_else(|| panic!("no v6 in {res}"));
    assert_eq!(
        prefix, 64,
        "v6 pod address carries the pod CIDR prefix: {res}"
    );
    let pa = addrs(&pod.ns, &pod.ifname);
    let mine = pa
        .iter()
        .find(|a| a.ip == a6)
        .unwrap_or_else(|| panic!("pod lacks {a6}: {pa:?}"));
    assert!(
        !mine.tentative && !mine.dadfailed,
        "pod address {mine} still tentative/dadfailed when ADD returned: {mine:?}"
    );
    let ba = addrs(&f.node, &f.bridge);
    let gw = ba
        .iter()
        .find(|a| a.ip == ip(GATEWAY6))
        .unwrap_or_else(|| panic!("bridge lacks {GATEWAY6}: {ba:?}"));
    assert_eq!(gw.prefix, 64, "bridge gateway prefix: {ba:?}");
    assert!(
        !gw.tentative && !gw.dadfailed,
        "bridge gateway {gw} still tentative when ADD returned: {gw:?}"
    );
    assert_eq!(
        res["ips"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|i| i["address"].as_str() == Some(&format!("{a6}/64")))
            .and_then(|i| i["gateway"].as_str()),
        Some(GATEWAY6),
        "v6 gateway in result: {res}"
    );
    assert_eq!(
        sysctl(&f.node, "net/ipv6/conf/all/forwarding"),
        "1",
        "isGateway with IPv6 must enable IPv6 forwarding"
    );
    let def = route_to(&pod.ns, "-6", "default")
        .unwrap_or_else(|| panic!("no v6 default route: {:?}", routes(&pod.ns, "-6")));
    assert_eq!(def["gateway"].as_str(), Some(GATEWAY6), "v6 default: {def}");
    // No retry: usable means usable as soon as ADD has returned.
    assert!(
        ping(&pod.ns, GATEWAY6),
        "pod cannot ping {GATEWAY6} right after ADD"
    );
    tcp_roundtrip(&f.node, ip(GATEWAY6), &pod.ns)
        .unwrap_or_else(|e| panic!("TCP over IPv6 pod -> gateway: {e}"));
}

pub fn ipv6_add_gives_usable_address(b: Backend) {
    let f = Fixture::new(b);
    let c = f
        .conf()
        .ranges(json!([[range6()]]))
        .is_default_gateway(true);
    let pod = Pod::new();
    let res = f.add_ok(&pod, &c);
    assert_eq!(result_addrs(&res).len(), 1, "one v6 address: {res}");
    assert_v6_usable(&f, &pod, &res);
}

pub fn dual_stack_add_configures_both_families(b: Backend) {
    let f = Fixture::new(b);
    let c = f
        .conf()
        .ranges(json!([[range4()], [range6()]]))
        .is_default_gateway(true);
    let a = Pod::new();
    let z = Pod::new();
    let ra = f.add_ok(&a, &c);
    let rz = f.add_ok(&z, &c);
    assert_eq!(result_addrs(&ra).len(), 2, "v4 + v6: {ra}");
    let a4 = pod_ip(&ra, 4);
    assert!(
        has_addr(&a.ns, &a.ifname, &format!("{a4}/16")),
        "pod lacks {a4}/16"
    );
    assert!(
        has_addr(&f.node, &f.bridge, &format!("{GATEWAY4}/16")),
        "bridge lacks the v4 gateway"
    );
    let def4 = route_to(&a.ns, "-4", "default")
        .unwrap_or_else(|| panic!("no v4 default route: {:?}", routes(&a.ns, "-4")));
    assert_eq!(def4["gateway"].as_str(), Some(GATEWAY4));
    assert!(ping(&a.ns, GATEWAY4), "v4 gateway unreachable");
    assert_v6_usable(&f, &a, &ra);
    let z6 = pod_ip(&rz, 6);
    assert!(
        ping(&a.ns, &z6.to_string()),
        "pod A cannot ping pod Z over v6"
    );
    tcp_roundtrip(&z.ns, z6, &a.ns).unwrap_or_else(|e| panic!("TCP v6 A -> Z: {e}"));
}

// ------------------------------------------------------------------ Services

/// Issue 19, IPv4 and IPv6 on a dual-stack pod network (host-local with
/// one range per family): kube-proxy's rules in the node netns, as its sync
/// loop writes them (no control plane runs here), per family: its iptables
/// mode through iptables-restore and ip6tables-restore, then its nftables
/// mode through `ip kube-proxy` and `ip6 kube-proxy`. Pod A reaches pod Z
/// through a ClusterIP of each family and Z sees A's own address: the reply
/// went back through the host's conntrack (OVS: evio's flows; Linux bridge:
/// evio's per-bridge netfilter options, the node netns's global
/// `bridge-nf-call-ip*tables` being 0 here).
pub fn dual_stack_cluster_ips_reach_pods(b: Backend) {
    let f = Fixture::new(b);
    if b == Backend::Linux {
        for k in ["iptables", "ip6tables"] {
            f.node
                .ok(&["sysctl", "-qw", &format!("net.bridge.bridge-nf-call-{k}=0")]);
        }
    }
    let c = f
        .conf()
        .ranges(json!([[range4()], [range6()]]))
        .is_default_gateway(true);
    let (a, z) = (Pod::new(), Pod::new());
    let ra = f.add_ok(&a, &c);
    let rz = f.add_ok(&z, &c);
    let endpoint = |family: u8| Endpoint {
        name: format!("z{family}"),
        addr: SocketAddr::new(pod_ip(&rz, family), 8080),
        netns: z.path(),
    };
    let families = [
        (4, POD_CIDR4, "10.96.0.0/16", "10.96.0.10:80"),
        (6, POD_CIDR6, "fd10:96::/112", "[fd10:96::10]:80"),
    ];
    for mode in [Mode::Iptables, Mode::Nftables] {
        // Both families programmed before either is asked: one family's
        // rules must not disturb the other's.
        let cips: Vec<(u8, ClusterIps)> = families
            .iter()
            .map(|(family, cidr, service_cidr, vip)| {
                let svc = [(ip_port(vip), endpoint(*family))];
                let c = ClusterIps::program(&[&f.node], mode, cidr, service_cidr, &svc)
                    .unwrap_or_else(|e| panic!("{mode:?}: {e}"));
                (*family, c)
            })
            .collect();
        for (family, c) in &cips {
            c.assert_seen(pod_ip(&ra, *family), Duration::from_secs(10), |to| {
                peer_seen(&a.path(), to)
            });
        }
    }
}

fn ip_port(s: &str) -> SocketAddr {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}
