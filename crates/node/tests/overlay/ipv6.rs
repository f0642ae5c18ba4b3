//! Issue 25, the IPv6 underlay in the NAT lab: two nodes behind symmetric
//! IPv4 NATs (relayed over IPv4, as their NATs allow nothing else) get
//! global IPv6 addresses behind their routers' stateful IPv6 firewalls;
//! the agents notice the addresses, publish them and move the pair to a
//! direct IPv6 path, which carries the traffic with the relay gone, and
//! on when one of them loses IPv4 altogether.

use evio_testkit::natlab::{SiteId, NODE_IF};

use super::*;

/// `from`'s peers entry for `to` once it is direct over IPv6.
fn wait_direct_v6(c: &Cluster, from: usize, to: usize, limit: Duration) -> Value {
    let t = Instant::now();
    let mut last = Value::Null;
    while t.elapsed() < limit {
        last = peer(&peers(c, from), &name(to))
            .cloned()
            .unwrap_or_default();
        if last["path"] == "direct" && last["family"] == "ipv6" {
            return last;
        }
        c.touch(&[(from, to)]);
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!(
        "{} -> {}: not direct over IPv6 within {limit:?}: {last}\n{}",
        name(from),
        name(to),
        dump(c)
    );
}

#[test]
fn a_symmetric_ipv4_pair_with_ipv6_goes_direct_over_ipv6() {
    use NatType::*;
    let t0 = Instant::now();
    let ov = OverlayOpts {
        sites: vec![(Symmetric, 1), (Symmetric, 1)],
        turn: true,
        ..OverlayOpts::flat(0)
    };
    let mut c = up(opts(BridgeType::Linux, 1, ov));
    // Sessions are made on demand: traffic first.
    c.connect_overlay(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}\n{}", dump(&c)));
    let before = peer(&peers(&c, 0), &name(1)).cloned().expect("node-1");
    assert_eq!(
        before["path"], "relay",
        "symmetric both sides, IPv4 only: {before}"
    );
    assert_eq!(before["family"], "ipv4", "{before}");
    let up_at = t0.elapsed();
    let lab = c.lab().expect("lab");
    for i in 0..2 {
        lab.add_ipv6(SiteId(site_of(&c, i).1));
    }
    let t = Instant::now();
    for (a, b) in [(0, 1), (1, 0)] {
        let p = wait_direct_v6(&c, a, b, Duration::from_secs(15));
        let want = SocketAddr::new(IpAddr::V6(lab.node_addr6(lab_node(&c, b))), 5800);
        assert_eq!(p["endpoint"], want.to_string(), "{p}");
        assert_eq!(p["via"], "socket", "{p}");
    }
    let took = t.elapsed();
    // Published as a host candidate (the address watcher found it).
    let own = peers(&c, 0);
    let mine = SocketAddr::new(IpAddr::V6(lab.node_addr6(lab_node(&c, 0))), 5800).to_string();
    assert!(
        own["candidates"].as_array().is_some_and(|a| a
            .iter()
            .any(|x| x["addr"] == mine.as_str() && x["kind"] == "local")),
        "{own}"
    );
    let (text, v) = explain(&c, 0, &name(1));
    assert_eq!(v["family"], "ipv6", "{v}");
    assert!(text.contains("over ipv6"), "{text}");
    // The relay carries nothing: without it, traffic still flows, direct.
    c.coturn().expect("coturn").stop();
    assert!(
        pod_ping_once(&c, 0, 1) || pod_ping_once(&c, 0, 1),
        "{}",
        dump(&c)
    );
    assert!(
        pod_ping_once(&c, 1, 0) || pod_ping_once(&c, 1, 0),
        "{}",
        dump(&c)
    );
    let after = peer(&peers(&c, 0), &name(1)).cloned().expect("node-1");
    assert_eq!(
        (after["path"].as_str(), after["family"].as_str()),
        (Some("direct"), Some("ipv6")),
        "{after}"
    );
    // Node 1 loses IPv4 altogether (an IPv6-only node; the store is a
    // file here, which needs no network): its address watcher drops its
    // IPv4 candidate and the pair keeps going over IPv6.
    c.lab().expect("lab").remove_ipv4(lab_node(&c, 1));
    let v4_local = |v: &Value| {
        v["candidates"].as_array().is_some_and(|a| {
            a.iter().any(|x| {
                x["kind"] == "local" && x["addr"].as_str().is_some_and(|s| !s.starts_with('['))
            })
        })
    };
    wait(
        "node-1's IPv4 candidate gone",
        Duration::from_secs(5),
        || !v4_local(&peers(&c, 1)),
    );
    assert!(
        pod_ping_once(&c, 1, 0) || pod_ping_once(&c, 1, 0),
        "{}",
        dump(&c)
    );
    assert!(
        pod_ping_once(&c, 0, 1) || pod_ping_once(&c, 0, 1),
        "{}",
        dump(&c)
    );
    let last = peer(&peers(&c, 1), &name(0)).cloned().expect("node-0");
    assert_eq!(
        (last["path"].as_str(), last["family"].as_str()),
        (Some("direct"), Some("ipv6")),
        "{last}"
    );
    eprintln!(
        "relayed up in {up_at:?}; direct over IPv6 {took:?} after the addresses; took {:?}",
        t0.elapsed()
    );
}

/// Issue 25, an IPv6-only site: node 0 has no IPv4 at all and reaches
/// etcd and coturn over IPv6 only (both listen on the lab internet's IPv6
/// address too). It goes direct over IPv6 to a dual-stack peer (behind a
/// symmetric IPv4 NAT), and reaches an IPv4-only peer through its TURN
/// allocation, made over UDP/IPv6 with an IPv4 relayed address: the one
/// address family the two share is the relay's.
#[test]
fn an_ipv6_only_node_uses_the_store_and_turn_over_ipv6_and_reaches_both_families() {
    use NatType::*;
    let t0 = Instant::now();
    let ov = OverlayOpts {
        sites: vec![
            (PortRestrictedCone, 1),
            (Symmetric, 1),
            (PortRestrictedCone, 1),
        ],
        etcd: true,
        turn: true,
        ipv6_sites: vec![1],
        ipv6_only_sites: vec![0],
        ..OverlayOpts::flat(0)
    };
    let c = up(opts(BridgeType::Linux, 1, ov));
    let lab = c.lab().expect("lab");
    let v6_server = SocketAddr::new(IpAddr::V6(evio_testkit::natlab::INTERNET6), 3478);
    // No IPv4 underlay on node 0 (its overlay devices have IPv4, the
    // underlay neither an address nor a route): the peer set it has came
    // from etcd over IPv6.
    let ns = &c.nodes()[0].ns;
    let v4 = ns.ok(&["ip", "-4", "-o", "addr", "show", "dev", NODE_IF]);
    let route = ns.ok(&["ip", "-4", "route", "show", "default"]);
    assert_eq!((v4.trim(), route.trim()), ("", ""), "node-0 has IPv4");
    wait(
        "node-0 knows both peers from the store",
        Duration::from_secs(10),
        || {
            let v = peers(&c, 0);
            peer(&v, &name(1)).is_some() && peer(&v, &name(2)).is_some()
        },
    );
    // TURN over IPv6, with an IPv4 relayed address.
    let mut turn = Value::Null;
    wait(
        "node-0's allocation over IPv6",
        Duration::from_secs(10),
        || {
            turn = peers(&c, 0)["turn"][0].clone();
            turn["state"] == "ready"
        },
    );
    assert_eq!(turn["server"], v6_server.to_string(), "{turn}");
    let relayed: SocketAddr = turn["relayed"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{turn}"));
    assert!(relayed.is_ipv4(), "{turn}");
    let up_at = t0.elapsed();
    // (a) The dual-stack peer: direct over IPv6. Node 0 sends first; its
    // handshake to node 1's IPv6 address meets node 1's firewall, so the
    // first session goes through node 0's allocation to node 1's IPv4
    // relayed address, and both then punch IPv6.
    for (a, b) in [(0, 1), (1, 0)] {
        let p = wait_direct_v6(&c, a, b, Duration::from_secs(15));
        let want = SocketAddr::new(IpAddr::V6(lab.node_addr6(lab_node(&c, b))), 5800);
        assert_eq!(p["endpoint"], want.to_string(), "{p}");
    }
    // (b) The IPv4-only peer, node 0 sending first (sessions are made on
    // demand: nothing has gone between the two yet): through the relay.
    for (a, b) in [(0, 2), (2, 0)] {
        let p = peer(&peers(&c, a), &name(b)).cloned().unwrap_or_default();
        assert_ne!(
            p["state"], "connected",
            "{a} -> {b} before any traffic: {p}"
        );
    }
    let t = Instant::now();
    let limit = Duration::from_secs(15);
    let mut last = Value::Null;
    while t.elapsed() < limit {
        c.touch(&[(0, 2)]);
        last = peer(&peers(&c, 0), &name(2)).cloned().unwrap_or_default();
        if last["state"] == "connected" && last["path"] == "relay" {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        (last["path"].as_str(), last["via"].as_str()),
        (Some("relay"), Some(format!("turn:{v6_server}").as_str())),
        "{last}\n{}",
        dump(&c)
    );
    let relayed_in = t.elapsed();
    let theirs = peer(&peers(&c, 2), &name(0)).cloned().expect("node-0");
    assert_eq!(theirs["family"], "ipv4", "{theirs}");
    for (a, b) in [(0, 1), (1, 0), (0, 2), (2, 0)] {
        assert!(
            pod_ping_once(&c, a, b) || pod_ping_once(&c, a, b),
            "pod {a} -> {b}\n{}",
            dump(&c)
        );
    }
    let host = c.touch(&[(0, 1), (1, 0), (0, 2), (2, 0)]);
    assert!(
        host.iter().all(|ok| *ok),
        "host overlay: {host:?}\n{}",
        dump(&c)
    );
    eprintln!(
        "up (store and allocation over IPv6) in {up_at:?}; relayed to the IPv4-only peer {relayed_in:?} after; took {:?}",
        t0.elapsed()
    );
}

/// `overlay.ipv6: false` on a host with a global IPv6 address: no socket
/// on `[::]:5800`, no IPv6 candidate published, and its peer (IPv6 on)
/// reaches it over IPv4, directly.
#[test]
fn overlay_ipv6_false_keeps_the_agent_ipv4_only() {
    let ov = OverlayOpts {
        ipv6_sites: vec![0],
        node_netconf: vec![(0, json!({"overlay": {"ipv6": false}}))],
        ..OverlayOpts::flat(2)
    };
    let c = up(opts(BridgeType::Linux, 1, ov));
    let lab = c.lab().expect("lab");
    let udp = |i: usize| c.nodes()[i].ns.ok(&["ss", "-H", "-u", "-l", "-n"]);
    assert!(
        !udp(0).contains("[::]:5800") && udp(0).contains("0.0.0.0:5800"),
        "{}",
        udp(0)
    );
    assert!(udp(1).contains("[::]:5800"), "{}", udp(1));
    let v6_cands = |i: usize| -> Vec<String> {
        peers(&c, i)["candidates"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x["addr"].as_str())
                    .filter(|s| s.starts_with('['))
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    };
    let mine6 = SocketAddr::new(IpAddr::V6(lab.node_addr6(lab_node(&c, 1))), 5800);
    wait(
        "node-1 publishes its IPv6 address",
        Duration::from_secs(10),
        || v6_cands(1).contains(&mine6.to_string()),
    );
    assert_eq!(v6_cands(0), Vec::<String>::new(), "node-0 has IPv6 off");
    c.connect_overlay(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}\n{}", dump(&c)));
    for (a, b) in [(0, 1), (1, 0)] {
        let p = peer(&peers(&c, a), &name(b)).cloned().expect("peer");
        assert_eq!(
            (p["path"].as_str(), p["family"].as_str()),
            (Some("direct"), Some("ipv4")),
            "{p}"
        );
    }
}

/// Issue 25's dual-stack host overlay: two nodes whose `hostCIDR` lists
/// an IPv4 and an IPv6 prefix each get an address of both, publish them
/// (`hostAddress` stays the IPv4 one) and ping each other's IPv6 host
/// address over the host overlay; a third node with the string form lives
/// with them over IPv4, as an older agent would.
#[test]
fn a_dual_stack_host_cidr_carries_ipv6_host_addresses() {
    let mut ov = OverlayOpts::flat(3);
    let dual = json!({"hostCIDR": ["10.10.0.0/16", "fd00:10::/64"]});
    ov.node_netconf = vec![(0, dual.clone()), (1, dual)];
    let c = up(opts(BridgeType::Linux, 1, ov));
    // Pods, and every node's IPv4 host address from every node.
    assert_all_reachable(&c);
    let own: Vec<Value> = (0..3).map(|i| peers(&c, i)).collect();
    let v6_of = |v: &Value| -> Option<String> {
        v["hostAddresses"]
            .as_array()?
            .iter()
            .filter_map(Value::as_str)
            .find(|a| a.contains(':'))
            .map(|a| a.split('/').next().unwrap_or_default().to_string())
    };
    let mut v6 = Vec::new();
    for (i, me) in own.iter().enumerate().take(2) {
        let h = me["hostAddress"].as_str().unwrap_or_default();
        assert!(h.starts_with("10.10.0.") && h.ends_with("/16"), "{me}");
        let a = v6_of(me).unwrap_or_else(|| panic!("node {i} has no IPv6 host address: {me}"));
        assert!(a.starts_with("fd00:10::"), "{me}");
        assert!(
            me["hostAddresses"][1]
                .as_str()
                .is_some_and(|s| s.ends_with("/64")),
            "{me}"
        );
        v6.push(a);
    }
    // The lowest free of the IPv6 prefix, one each.
    let mut sorted = v6.clone();
    sorted.sort();
    assert_eq!(sorted, ["fd00:10::1", "fd00:10::2"]);
    // The string form: one address, as before.
    assert_eq!(
        own[2]["hostAddresses"].as_array().map(Vec::len),
        Some(1),
        "{}",
        own[2]
    );
    assert_eq!(v6_of(&own[2]), None);
    // Each dual-stack node knows the other's IPv6 host address.
    let seen = peer(&own[0], &name(1)).cloned().expect("node-1");
    assert_eq!(v6_of(&seen).as_deref(), Some(v6[1].as_str()), "{seen}");
    for (from, to) in [(0, 1), (1, 0)] {
        let out = c.nodes()[from]
            .ns
            .exec(&["ping", "-c", "2", "-i", "0.2", "-W", "2", &v6[to]]);
        assert!(
            out.status.success(),
            "node {from} -> {} over the host overlay: {}\n{}",
            v6[to],
            String::from_utf8_lossy(&out.stdout),
            dump(&c)
        );
    }
    // The string-form node has no route there; its IPv4 peers still work
    // (assert_all_reachable above), and the record it reads carries the
    // IPv6 address as a field it keeps without using.
    let seen2 = peer(&own[2], &name(0)).cloned().expect("node-0");
    assert_eq!(v6_of(&seen2).as_deref(), Some(v6[0].as_str()), "{seen2}");
    // The allocations as `evio-node nodes list` shows them.
    let net = c.opts().network.clone();
    let rows = nodes_list(&c.nodes()[0].ns, &c.store_url(), &net);
    let row = &rows[&name(1)];
    assert_eq!(row["hostAddresses"][1], v6[1].as_str(), "{row}");
    assert_eq!(
        rows[&name(2)]["hostAddresses"].as_array().map(Vec::len),
        Some(1)
    );
}
