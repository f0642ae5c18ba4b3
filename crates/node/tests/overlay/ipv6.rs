//! Issue 25, the IPv6 underlay in the NAT lab: two nodes behind symmetric
//! IPv4 NATs (relayed over IPv4, as their NATs allow nothing else) get
//! global IPv6 addresses behind their routers' stateful IPv6 firewalls;
//! the agents notice the addresses, publish them and move the pair to a
//! direct IPv6 path, which carries the traffic with the relay gone, and
//! on when one of them loses IPv4 altogether.

use evio_testkit::natlab::SiteId;

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
