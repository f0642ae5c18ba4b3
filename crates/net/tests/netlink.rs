//! evio-net against the real kernel. Every test works in network namespaces
//! it creates (testkit `Netns`, deleted on drop) and runs the crate's code
//! on threads entered into them (`run_in_netns`): the test threads never
//! change namespace and nothing touches the root namespace.
// A test that unwraps fails loudly, which is what a test should do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::IpAddr;
use std::time::{Duration, Instant};

use evio_net::{ethtool, ipv6, nft, run_in_netns, sysctl, Error, Family, Handle, NetnsFd, Route};
use evio_testkit::netns::Netns as TestNs;
use ipnet::IpNet;

fn open(ns: &TestNs) -> NetnsFd {
    NetnsFd::open(&ns.path()).expect("open test netns")
}

/// Runs `f` with a fresh handle inside `ns`, on a thread entered into it.
fn in_ns<T: Send>(ns: &TestNs, f: impl FnOnce(&mut Handle) -> T + Send) -> T {
    let target = open(ns);
    run_in_netns(&target, || {
        let mut h = Handle::new().expect("handle");
        f(&mut h)
    })
    .expect("run_in_netns")
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn index(h: &mut Handle, name: &str) -> u32 {
    h.link_by_name(name)
        .unwrap()
        .unwrap_or_else(|| panic!("no link {name}"))
        .index
}

/// A veth pair with both ends in the handle's namespace.
fn veth_pair(h: &mut Handle, a: &str, b: &str) -> (u32, u32) {
    let here = NetnsFd::current().unwrap();
    h.create_veth(a, b, here.fd(), 0, None).unwrap();
    (index(h, a), index(h, b))
}

#[test]
fn bridge_create_lookup_and_exists() {
    let ns = TestNs::new("nbr");
    let (br, again, by_index, all) = in_ns(&ns, |h| {
        h.create_bridge("br0", 1400, None).unwrap();
        let br = h.link_by_name("br0").unwrap().unwrap();
        let again = h.create_bridge("br0", 1400, None).unwrap_err();
        let by_index = h.link_by_index(br.index).unwrap();
        let all = h.links().unwrap();
        (br, again, by_index, all)
    });
    assert_eq!(br.name, "br0");
    assert_eq!(br.kind.as_deref(), Some("bridge"));
    assert_eq!(br.mtu, 1400);
    assert!(!br.up);
    assert_eq!(br.master, None);
    assert!(br.mac.is_some());
    assert!(again.is_exists(), "{again}");
    assert!(again.to_string().contains("br0"), "{again}");
    assert_eq!(by_index.as_ref(), Some(&br));
    let names: Vec<&str> = all.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names.contains(&"lo") && names.contains(&"br0"), "{names:?}");
    // Cross-check with iproute2.
    let out = ns.ok(&["ip", "-d", "link", "show", "br0"]);
    assert!(out.contains("mtu 1400") && out.contains("bridge "), "{out}");
}

/// The MAC given at creation is the bridge's from the first moment and stays
/// when a port with a lower MAC joins and leaves (addr_assign_type 3,
/// NET_ADDR_SET): no second message, so no crash window leaves it unpinned.
#[test]
fn bridge_created_with_its_mac_keeps_it() {
    let ns = TestNs::new("nbrmac");
    let want = [0x0a, 0xee, 0x00, 0x00, 0x00, 0x42];
    let (created, with_port, after) = in_ns(&ns, |h| {
        h.create_bridge("brm", 0, Some(want)).unwrap();
        let br = h.link_by_name("brm").unwrap().unwrap();
        let (v0, _) = veth_pair(h, "vlow0", "vlow1");
        h.set_mac(v0, [0x02, 0, 0, 0, 0, 1]).unwrap();
        h.set_master(v0, br.index).unwrap();
        let with_port = h.link_by_index(br.index).unwrap().unwrap().mac;
        h.delete_link(v0).unwrap();
        let after = h.link_by_index(br.index).unwrap().unwrap().mac;
        (br.mac, with_port, after)
    });
    assert_eq!(created, Some(want));
    assert_eq!(with_port, Some(want));
    // A port with a lower MAC would otherwise have lent the bridge its own.
    assert_eq!(after, Some(want));
}

#[test]
fn lookups_of_absent_links_are_none() {
    let ns = TestNs::new("nabs");
    let (by_name, by_index, bad_name) = in_ns(&ns, |h| {
        (
            h.link_by_name("nothere").unwrap(),
            h.link_by_index(424242).unwrap(),
            h.link_by_name("much-too-long-name").unwrap_err(),
        )
    });
    assert_eq!(by_name, None);
    assert_eq!(by_index, None);
    assert!(matches!(bad_name, Error::Invalid { .. }), "{bad_name}");
}

#[test]
fn veth_peer_created_in_other_netns_with_alias() {
    let host = TestNs::new("nvh");
    let pod = TestNs::new("nvp");
    let pod_ns = open(&pod);
    let (host_end, host_has_peer) = in_ns(&host, |h| {
        h.create_veth("vhost0", "eth0", pod_ns.fd(), 1450, Some("evio:pod-a/eth0"))
            .unwrap();
        (
            h.link_by_name("vhost0").unwrap().unwrap(),
            h.link_by_name("eth0").unwrap(),
        )
    });
    assert_eq!(host_end.kind.as_deref(), Some("veth"));
    assert_eq!(host_end.mtu, 1450);
    assert_eq!(host_end.alias, None);
    assert_eq!(
        host_has_peer, None,
        "peer must not exist in the creating netns"
    );

    let peer = in_ns(&pod, |h| h.link_by_name("eth0").unwrap().unwrap());
    assert_eq!(peer.kind.as_deref(), Some("veth"));
    assert_eq!(peer.mtu, 1450);
    assert_eq!(peer.alias.as_deref(), Some("evio:pod-a/eth0"));
    let out = pod.ok(&["ip", "link", "show", "eth0"]);
    assert!(out.contains("alias evio:pod-a/eth0"), "{out}");

    // Same peer name again: the pod already has eth0.
    let err = in_ns(&host, |h| {
        h.create_veth("vhost1", "eth0", pod_ns.fd(), 0, None)
            .unwrap_err()
    });
    assert!(err.is_exists(), "{err}");
    assert!(!host.has_link("vhost1"));

    // An alias the kernel refuses (longer than IFALIASZ) undoes the pair.
    let long = "x".repeat(300);
    let err = in_ns(&host, |h| {
        h.create_veth("vhost2", "eth1", pod_ns.fd(), 0, Some(&long))
            .unwrap_err()
    });
    assert!(err.errno().is_some(), "{err}");
    assert!(!host.has_link("vhost2"));
    assert!(!pod.has_link("eth1"));

    // Deleting one end removes the other.
    assert!(in_ns(&host, |h| h.delete_link_by_name("vhost0").unwrap()));
    assert!(!pod.has_link("eth0"));
}

#[test]
fn bridge_port_master_up_mtu_hairpin_alias() {
    let ns = TestNs::new("nport");
    let (br, port, not_port_err) = in_ns(&ns, |h| {
        h.create_bridge("br0", 0, None).unwrap();
        let br = index(h, "br0");
        let (v0, v1) = veth_pair(h, "v0", "v1");
        h.set_master(v0, br).unwrap();
        h.set_mtu(v0, 1300).unwrap();
        h.set_up(v0).unwrap();
        h.set_up(v1).unwrap();
        h.set_up(br).unwrap();
        h.set_hairpin(v0, true).unwrap();
        h.set_alias(v0, "tag").unwrap();
        // v1 is no bridge port: the kernel refuses hairpin on it.
        let err = h.set_hairpin(v1, true).unwrap_err();
        (br, h.link_by_index(v0).unwrap().unwrap(), err)
    });
    assert_eq!(port.master, Some(br));
    assert!(port.up);
    assert_eq!(port.mtu, 1300);
    assert_eq!(port.alias.as_deref(), Some("tag"));
    assert!(not_port_err.errno().is_some(), "{not_port_err}");
    let out = ns.ok(&["ip", "-d", "link", "show", "v0"]);
    assert!(out.contains("master br0"), "{out}");
    assert!(out.contains("mtu 1300"), "{out}");
    assert!(out.contains("<BROADCAST,MULTICAST,UP"), "{out}");
    assert!(out.contains("hairpin on"), "{out}");
    assert!(out.contains("alias tag"), "{out}");

    in_ns(&ns, |h| {
        let v0 = index(h, "v0");
        h.set_hairpin(v0, false).unwrap();
    });
    let out = ns.ok(&["ip", "-d", "link", "show", "v0"]);
    assert!(out.contains("hairpin off"), "{out}");

    in_ns(&ns, |h| {
        let v0 = index(h, "v0");
        h.set_alias(v0, "").unwrap();
        h.set_master(v0, 0).unwrap();
    });
    let out = ns.ok(&["ip", "-d", "link", "show", "v0"]);
    assert!(!out.contains("master br0"), "{out}");
    assert!(!out.contains("hairpin"), "no longer a bridge port: {out}");
    assert!(!out.contains("alias"), "{out}");
    let port = in_ns(&ns, |h| h.link_by_name("v0").unwrap().unwrap());
    assert_eq!(port.master, None);
    assert_eq!(port.alias, None);
}

#[test]
fn addresses_v4_v6_without_dad() {
    let ns = TestNs::new("naddr");
    let (addrs, dup, after_del, del_again) = in_ns(&ns, |h| {
        let (v0, _) = veth_pair(h, "v0", "v1");
        sysctl::set("net/ipv6/conf/v0/accept_dad", "0").unwrap();
        h.set_up(v0).unwrap();
        h.add_address(v0, net("10.1.0.2/24")).unwrap();
        h.add_address(v0, net("fd00:1::2/64")).unwrap();
        let dup = h.add_address(v0, net("10.1.0.2/24")).unwrap_err();
        // DAD off: nothing is ever tentative, the wait returns at once.
        let t = Instant::now();
        ipv6::wait_dad(h, v0, Duration::from_secs(5)).unwrap();
        assert!(t.elapsed() < Duration::from_millis(500));
        let addrs = h.addresses(Some(v0)).unwrap();
        h.del_address(v0, net("10.1.0.2/24")).unwrap();
        let after_del = h.addresses(Some(v0)).unwrap();
        let del_again = h.del_address(v0, net("10.1.0.2/24")).unwrap_err();
        (addrs, dup, after_del, del_again)
    });
    let v4 = addrs.iter().find(|a| a.addr == net("10.1.0.2/24"));
    let v6 = addrs.iter().find(|a| a.addr == net("fd00:1::2/64"));
    assert!(v4.is_some(), "{addrs:?}");
    let v6 = v6.unwrap_or_else(|| panic!("{addrs:?}"));
    assert!(!v6.tentative && !v6.dadfailed, "{v6:?}");
    // The link-local address of v0 is listed too, nothing from other links.
    assert!(addrs.iter().all(|a| a.index == addrs[0].index));
    assert!(dup.is_exists(), "{dup}");
    assert!(!after_del.iter().any(|a| a.addr == net("10.1.0.2/24")));
    assert!(del_again.is_not_found(), "{del_again}");

    let out = ns.ok(&["ip", "addr", "show", "v0"]);
    assert!(out.contains("inet6 fd00:1::2/64"), "{out}");
    assert!(!out.contains("10.1.0.2"), "{out}");
}

#[test]
fn ipv4_address_gets_broadcast() {
    let ns = TestNs::new("nbrd");
    in_ns(&ns, |h| {
        let (v0, _) = veth_pair(h, "v0", "v1");
        h.add_address(v0, net("10.244.3.2/16")).unwrap();
    });
    let out = ns.ok(&["ip", "-4", "addr", "show", "v0"]);
    assert!(
        out.contains("inet 10.244.3.2/16 brd 10.244.255.255"),
        "{out}"
    );
}

#[test]
fn dad_enabled_waits_until_address_is_usable() {
    let ns = TestNs::new("ndad");
    let (tentative_at_first, elapsed, after) = in_ns(&ns, |h| {
        let (v0, v1) = veth_pair(h, "v0", "v1");
        sysctl::set("net/ipv6/conf/v0/accept_dad", "1").unwrap();
        h.set_up(v1).unwrap();
        h.set_up(v0).unwrap();
        h.add_address(v0, net("fd00:2::2/64")).unwrap();
        let first = h.addresses(Some(v0)).unwrap();
        let t = Instant::now();
        ipv6::wait_dad(h, v0, Duration::from_secs(10)).unwrap();
        let elapsed = t.elapsed();
        let tentative = first
            .iter()
            .any(|a| a.addr == net("fd00:2::2/64") && a.tentative);
        (tentative, elapsed, h.addresses(Some(v0)).unwrap())
    });
    assert!(tentative_at_first, "DAD should start tentative");
    assert!(elapsed > Duration::from_millis(50), "{elapsed:?}");
    let a = after
        .iter()
        .find(|a| a.addr == net("fd00:2::2/64"))
        .unwrap();
    assert!(!a.tentative && !a.dadfailed, "{a:?}");
}

#[test]
fn dad_failure_and_timeout_are_errors() {
    let ns = TestNs::new("ndadf");
    let other = TestNs::new("ndado");
    let other_ns = open(&other);
    let (failed, timeout) = in_ns(&ns, |h| {
        h.create_veth("v0", "p0", other_ns.fd(), 0, None).unwrap();
        let v0 = index(h, "v0");
        // Down link: DAD cannot run, the address stays tentative.
        h.add_address(v0, net("fd00:4::1/64")).unwrap();
        let timeout = ipv6::wait_dad(h, v0, Duration::from_millis(200)).unwrap_err();
        h.del_address(v0, net("fd00:4::1/64")).unwrap();
        h.set_up(v0).unwrap();
        (v0, timeout)
    });
    assert!(matches!(timeout, Error::Timeout { .. }), "{timeout}");
    in_ns(&other, |h| {
        // The peer end already holds the address (DAD off there). Up
        // before the address is added: only then does it join the
        // solicited-node group and answer the other end's probes.
        let p0 = index(h, "p0");
        sysctl::set("net/ipv6/conf/p0/accept_dad", "0").unwrap();
        h.set_up(p0).unwrap();
        h.add_address(p0, net("fd00:3::9/64")).unwrap();
        ipv6::wait_dad(h, p0, Duration::from_secs(5)).unwrap();
    });
    let v0 = failed;
    let err = in_ns(&ns, |h| {
        h.add_address(v0, net("fd00:3::9/64")).unwrap();
        ipv6::wait_dad(h, v0, Duration::from_secs(10)).unwrap_err()
    });
    match err {
        Error::DadFailed { index, addr } => {
            assert_eq!(index, v0);
            assert_eq!(addr, net("fd00:3::9/64"));
        }
        e => panic!("expected DadFailed, got {e}"),
    }
}

#[test]
fn routes_v4_v6_add_dump_delete() {
    let ns = TestNs::new("nrt");
    let (v4, v6, dup, gone4, del_again, v0) = in_ns(&ns, |h| {
        let (v0, v1) = veth_pair(h, "v0", "v1");
        sysctl::set("net/ipv6/conf/v0/accept_dad", "0").unwrap();
        h.set_up(v1).unwrap();
        h.set_up(v0).unwrap();
        h.add_address(v0, net("10.2.0.2/24")).unwrap();
        h.add_address(v0, net("fd00:5::2/64")).unwrap();

        let default = Route::default_via(ip("10.2.0.1"));
        h.add_route(&default).unwrap();
        let dup = h.add_route(&default).unwrap_err();
        h.add_route(&Route {
            oif: Some(v0),
            metric: Some(50),
            scope_link: true,
            ..Route::new(net("10.3.0.0/16"))
        })
        .unwrap();
        h.add_route(&Route {
            gateway: Some(ip("fd00:5::1")),
            ..Route::new(net("fd00:6::/64"))
        })
        .unwrap();
        let v4 = h.routes(Family::V4).unwrap();
        let v6 = h.routes(Family::V6).unwrap();
        h.del_route(&default).unwrap();
        h.del_route(&Route::new(net("10.3.0.0/16"))).unwrap();
        let gone4 = h.routes(Family::V4).unwrap();
        let del_again = h.del_route(&default).unwrap_err();
        (v4, v6, dup, gone4, del_again, v0)
    });
    assert!(
        v4.contains(&Route {
            gateway: Some(ip("10.2.0.1")),
            oif: Some(v0),
            ..Route::new(net("0.0.0.0/0"))
        }),
        "{v4:?}"
    );
    assert!(
        v4.contains(&Route {
            oif: Some(v0),
            metric: Some(50),
            scope_link: true,
            ..Route::new(net("10.3.0.0/16"))
        }),
        "{v4:?}"
    );
    // The kernel's own prefix route of the address.
    assert!(
        v4.iter()
            .any(|r| r.dst == net("10.2.0.0/24") && r.scope_link && r.gateway.is_none()),
        "{v4:?}"
    );
    // Local-table routes (the address itself) are not listed.
    assert!(!v4.iter().any(|r| r.dst == net("10.2.0.2/32")), "{v4:?}");
    assert!(
        v6.iter()
            .any(|r| r.dst == net("fd00:6::/64") && r.gateway == Some(ip("fd00:5::1"))),
        "{v6:?}"
    );
    assert!(v6.iter().all(|r| matches!(r.dst, IpNet::V6(_))), "{v6:?}");
    assert!(dup.is_exists(), "{dup}");
    assert!(
        !gone4.iter().any(|r| r.dst == net("0.0.0.0/0")),
        "{gone4:?}"
    );
    assert!(
        !gone4.iter().any(|r| r.dst == net("10.3.0.0/16")),
        "{gone4:?}"
    );
    assert!(del_again.is_not_found(), "{del_again}");

    let out = ns.ok(&["ip", "-6", "route", "show"]);
    assert!(out.contains("fd00:6::/64 via fd00:5::1 dev v0"), "{out}");
}

#[test]
fn delete_links_present_and_absent() {
    let ns = TestNs::new("ndel");
    in_ns(&ns, |h| {
        h.create_bridge("br0", 0, None).unwrap();
        h.create_bridge("br1", 0, None).unwrap();
        let br0 = index(h, "br0");
        h.delete_link(br0).unwrap();
        assert_eq!(h.link_by_name("br0").unwrap(), None);
        let err = h.delete_link(br0).unwrap_err();
        assert!(err.is_not_found(), "{err}");
        assert!(h.delete_link_by_name("br1").unwrap());
        assert!(!h.delete_link_by_name("br1").unwrap());
        assert!(!h.delete_link_by_name("neverwas").unwrap());
    });
    assert!(!ns.has_link("br0") && !ns.has_link("br1"));
}

#[test]
fn netns_open_missing_and_not_a_netns() {
    let err = NetnsFd::open(std::path::Path::new(
        "/run/netns/evio-net-test-does-not-exist",
    ))
    .unwrap_err();
    assert!(matches!(err, Error::NetnsNotFound(_)), "{err}");
    assert!(err.is_not_found());
    let err = NetnsFd::open(std::path::Path::new("/proc/self/status")).unwrap_err();
    assert!(matches!(err, Error::NotNetns(_)), "{err}");
}

#[test]
fn run_in_netns_and_enter_leave_the_caller_alone() {
    let ns = TestNs::new("nenter");
    let target = open(&ns);
    let before = NetnsFd::current().unwrap();
    let inside_is_target = run_in_netns(&target, || {
        NetnsFd::current().unwrap().is_same(&target).unwrap()
    })
    .unwrap();
    assert!(inside_is_target);
    assert!(NetnsFd::current().unwrap().is_same(&before).unwrap());
    assert!(!before.is_same(&target).unwrap());

    // A panic inside is the caller's panic.
    let caught = std::panic::catch_unwind(|| run_in_netns(&target, || panic!("boom")));
    assert!(caught.is_err());

    // enter()/guard and Handle::new_in on a dedicated thread.
    let target2 = open(&ns);
    std::thread::spawn(move || {
        let start = NetnsFd::current().unwrap();
        {
            let _guard = target2.enter().unwrap();
            assert!(NetnsFd::current().unwrap().is_same(&target2).unwrap());
        }
        assert!(NetnsFd::current().unwrap().is_same(&start).unwrap());
        let guard = target2.enter().unwrap();
        guard.restore().unwrap();
        assert!(NetnsFd::current().unwrap().is_same(&start).unwrap());

        let mut h = Handle::new_in(&target2).unwrap();
        assert!(NetnsFd::current().unwrap().is_same(&start).unwrap());
        h.create_bridge("brin", 0, None).unwrap();
    })
    .join()
    .unwrap();
    assert!(ns.has_link("brin"));
}

#[test]
fn sysctl_is_per_netns() {
    let ns = TestNs::new("nsys");
    let outside = sysctl::get("net/ipv4/ip_forward").unwrap();
    let (before, after) = run_in_netns(&open(&ns), || {
        let before = sysctl::get("net/ipv4/ip_forward").unwrap();
        sysctl::set("net/ipv4/ip_forward", "1").unwrap();
        // Already right: no write needed, still fine.
        sysctl::set("net/ipv4/ip_forward", "1").unwrap();
        (before, sysctl::get("net/ipv4/ip_forward").unwrap())
    })
    .unwrap();
    assert_eq!(before, "0", "a new netns starts without forwarding");
    assert_eq!(after, "1");
    assert_eq!(ns.ok(&["cat", "/proc/sys/net/ipv4/ip_forward"]).trim(), "1");
    assert_eq!(sysctl::get("net/ipv4/ip_forward").unwrap(), outside);
    let err = run_in_netns(&open(&ns), || {
        sysctl::get("net/ipv4/conf/nosuchif/arp_notify").unwrap_err()
    })
    .unwrap();
    assert!(err.is_not_found(), "{err}");
}

#[test]
fn ethtool_tx_checksum_off_and_on() {
    let ns = TestNs::new("neth");
    let target = open(&ns);
    run_in_netns(&target, || {
        let mut h = Handle::new().unwrap();
        veth_pair(&mut h, "v0", "v1");
        assert!(ethtool::tx_checksum("v0").unwrap(), "veth default is on");
        ethtool::set_tx_checksum("v0", false).unwrap();
        assert!(!ethtool::tx_checksum("v0").unwrap());
    })
    .unwrap();
    let out = ns.ok(&["ethtool", "-k", "v0"]);
    assert!(out.contains("tx-checksumming: off"), "{out}");
    run_in_netns(&target, || ethtool::set_tx_checksum("v0", true).unwrap()).unwrap();
    let out = ns.ok(&["ethtool", "-k", "v0"]);
    assert!(out.contains("tx-checksumming: on"), "{out}");
    let err = run_in_netns(&target, || ethtool::tx_checksum("nosuch").unwrap_err()).unwrap();
    assert_eq!(err.errno(), Some(libc::ENODEV), "{err}");
}

#[test]
fn nft_masquerade_idempotent_concurrent_and_removable() {
    let ns = TestNs::new("nnft");
    let target = open(&ns);
    let cidrs = vec![net("10.244.0.0/16"), net("fd00:10::/64")];
    let rules = || {
        ns.ok(&["nft", "list", "chain", "inet", "evio", "masq-net1"])
            .lines()
            .filter(|l| l.contains("masquerade"))
            .count()
    };

    run_in_netns(&target, || {
        assert_eq!(nft::masquerade_cidrs("net1").unwrap(), None);
        nft::ensure_masquerade("net1", &cidrs).unwrap();
        nft::ensure_masquerade("net1", &cidrs).unwrap();
        assert_eq!(nft::masquerade_cidrs("net1").unwrap(), Some(cidrs.clone()));
    })
    .unwrap();
    assert_eq!(rules(), 2);

    // Several "plugin processes" at once, each on its own fresh thread.
    std::thread::scope(|s| {
        for _ in 0..6 {
            s.spawn(|| {
                run_in_netns(&target, || nft::ensure_masquerade("net1", &cidrs).unwrap()).unwrap()
            });
        }
    });
    assert_eq!(rules(), 2);
    let out = ns.ok(&["nft", "list", "chain", "inet", "evio", "masq-net1"]);
    assert!(
        out.contains(
            "ip saddr 10.244.0.0/16 ip daddr != 10.244.0.0/16 masquerade comment \"evio:net1\""
        ),
        "{out}"
    );
    assert!(
        out.contains("type nat hook postrouting priority srcnat"),
        "{out}"
    );

    run_in_netns(&target, || {
        // Another network's chain is independent; a new set replaces.
        nft::ensure_masquerade("net2", &[net("10.9.0.0/16")]).unwrap();
        nft::ensure_masquerade("net1", &[net("10.245.0.0/16")]).unwrap();
        assert_eq!(
            nft::masquerade_cidrs("net1").unwrap(),
            Some(vec![net("10.245.0.0/16")])
        );
        nft::remove_masquerade("net1").unwrap();
        nft::remove_masquerade("net1").unwrap();
        assert_eq!(nft::masquerade_cidrs("net1").unwrap(), None);
        assert_eq!(
            nft::masquerade_cidrs("net2").unwrap(),
            Some(vec![net("10.9.0.0/16")])
        );
        assert!(matches!(
            nft::ensure_masquerade("bad name;", &[]),
            Err(Error::Invalid { .. })
        ));
    })
    .unwrap();
    // Nothing leaked into the test's own namespace... and the rules really
    // were in the test netns.
    assert!(ns
        .ok(&["nft", "list", "table", "inet", "evio"])
        .contains("masq-net2"));
}

/// A refused change is a kernel errno, names the request refused, and
/// changes nothing: the flush in the same batch is rolled back too.
#[test]
fn nft_refusal_is_an_errno_and_atomic() {
    let ns = TestNs::new("nnfr");
    let target = open(&ns);
    // Not ours to take over: a filter chain of that name, with a rule.
    let script = "add table inet evio\n\
                  add chain inet evio masq-taken { type filter hook input priority 0; }\n\
                  add rule inet evio masq-taken ip saddr 10.1.0.0/16 accept\n";
    let mut child = ns
        .command(&["nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success());
    let before = ns.ok(&["nft", "list", "table", "inet", "evio"]);

    let err = run_in_netns(&target, || {
        nft::ensure_masquerade("taken", &[net("10.244.0.0/16")]).unwrap_err()
    })
    .unwrap();
    // The errno is the kernel's choice (EOPNOTSUPP on 6.18 for a changed
    // chain type); what matters is that it is one.
    assert!(
        matches!(err, Error::Netlink { errno, .. } if errno > 0),
        "{err:?}"
    );
    assert!(err.to_string().contains("add chain masq-taken"), "{err}");
    assert_eq!(ns.ok(&["nft", "list", "table", "inet", "evio"]), before);
    // Not a masquerade chain, so nothing reads as masqueraded.
    let cidrs = run_in_netns(&target, || nft::masquerade_cidrs("taken").unwrap()).unwrap();
    assert_eq!(cidrs, Some(vec![]));
}

/// Masquerade runs no program: this test re-runs itself (filtered to
/// itself) in a mount namespace where the `nft` binary is covered by
/// /dev/null and PATH is empty, which is where an nft exec failed or, with
/// PATH's empty entry meaning the working directory, ran whatever `nft` lay
/// there.
#[test]
fn masquerade_needs_no_nft_program() {
    const CHILD: &str = "EVIO_TEST_NO_NFT_NETNS";
    if let Some(path) = std::env::var_os(CHILD) {
        let target = NetnsFd::open(std::path::Path::new(&path)).unwrap();
        run_in_netns(&target, || {
            assert_eq!(nft::masquerade_cidrs("plain").unwrap(), None);
            nft::ensure_masquerade("plain", &[net("10.244.0.0/16")]).unwrap();
            assert_eq!(
                nft::masquerade_cidrs("plain").unwrap(),
                Some(vec![net("10.244.0.0/16")])
            );
            nft::ensure_masquerade("gone", &[net("10.9.0.0/16")]).unwrap();
            nft::remove_masquerade("gone").unwrap();
        })
        .unwrap();
        return;
    }
    let ns = TestNs::new("nnon");
    let out = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--", "/bin/sh", "-c"])
        .arg(
            "mount --bind /dev/null \"$(command -v nft)\" && \
             PATH= exec \"$0\" --exact masquerade_needs_no_nft_program --test-threads=1",
        )
        .arg(std::env::current_exe().unwrap())
        .env(CHILD, ns.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A filter that matched nothing would succeed too.
    assert!(stdout.contains("1 passed"), "{stdout}");
    // Checked from outside, with the real nft, in the test's netns.
    let table = ns.ok(&["nft", "list", "table", "inet", "evio"]);
    assert!(
        table.contains("ip saddr 10.244.0.0/16 ip daddr != 10.244.0.0/16 masquerade"),
        "{table}"
    );
    assert!(!table.contains("masq-gone"), "{table}");
}

/// End to end: pod -> node (forwarding, masquerade) -> outside, where the
/// outside has no route back to the pod network. Replies only come back if
/// the node really rewrites the source address.
#[test]
fn masquerade_lets_pod_traffic_out() {
    let pod = TestNs::new("mpod");
    let node = TestNs::new("mnod");
    let ext = TestNs::new("mext");
    let (pod_ns, ext_ns) = (open(&pod), open(&ext));
    in_ns(&node, |h| {
        h.create_veth("vpod", "eth0", pod_ns.fd(), 0, None).unwrap();
        h.create_veth("vext", "eth0", ext_ns.fd(), 0, None).unwrap();
        let (vpod, vext) = (index(h, "vpod"), index(h, "vext"));
        h.add_address(vpod, net("10.244.0.1/16")).unwrap();
        h.add_address(vext, net("192.168.77.1/24")).unwrap();
        h.set_up(vpod).unwrap();
        h.set_up(vext).unwrap();
        sysctl::set("net/ipv4/ip_forward", "1").unwrap();
    });
    in_ns(&pod, |h| {
        let eth0 = index(h, "eth0");
        h.add_address(eth0, net("10.244.0.2/16")).unwrap();
        h.set_up(eth0).unwrap();
        h.add_route(&Route::default_via(ip("10.244.0.1"))).unwrap();
    });
    in_ns(&ext, |h| {
        let eth0 = index(h, "eth0");
        h.add_address(eth0, net("192.168.77.2/24")).unwrap();
        h.set_up(eth0).unwrap();
    });
    let ping = || {
        pod.exec(&["ping", "-c", "1", "-W", "1", "192.168.77.2"])
            .status
            .success()
    };
    assert!(!ping(), "without masquerade the outside cannot answer");
    run_in_netns(&open(&node), || {
        nft::ensure_masquerade("podnet", &[net("10.244.0.0/16")]).unwrap()
    })
    .unwrap();
    assert!(ping(), "masqueraded traffic must get replies");
}

/// Dumps larger than one datagram (the kernel starts with ~8 KiB ones) are
/// read to the end, and the socket stays usable for the next request.
#[test]
fn large_dumps_span_several_datagrams() {
    let ns = TestNs::new("nbig");
    let (links, addrs, after) = in_ns(&ns, |h| {
        for i in 0..80 {
            h.create_bridge(&format!("b{i}"), 0, None).unwrap();
        }
        let b0 = index(h, "b0");
        for i in 0..300u32 {
            let a = format!("10.{}.{}.1/24", 100 + i / 256, i % 256);
            h.add_address(b0, net(&a)).unwrap();
        }
        let links = h.links().unwrap();
        let addrs = h.addresses(Some(b0)).unwrap();
        // A targeted request right after the dumps still gets its answer.
        let after = h.link_by_name("b79").unwrap();
        (links, addrs, after)
    });
    assert_eq!(links.len(), 81);
    assert_eq!(addrs.len(), 300);
    assert!(addrs.iter().any(|a| a.addr == net("10.101.43.1/24")));
    assert_eq!(after.map(|l| l.name), Some("b79".to_string()));
}
