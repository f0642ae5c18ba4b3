//! The client against real ovsdb-server + ovs-vswitchd (userspace datapath)
//! running in a network namespace of the test's own; results are checked
//! with `ovs-vsctl`, not with the client itself.
// A test that unwraps fails loudly, which is what a test should do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use evio_ovsdb::{Client, Error, PortSpec};
use evio_testkit::netns::Netns;
use evio_testkit::ovs::Ovs;
use nix::sys::socket::{
    bind, getsockname, socket, AddressFamily, SockFlag, SockType, SockaddrIn, SockaddrLike,
    UnixAddr,
};

const T: Duration = Duration::from_secs(5);

/// Field order is drop order: client, then daemons, then the namespace.
struct Node {
    client: Client,
    ovs: Ovs,
    ns: Netns,
}

fn node() -> Node {
    let ns = Netns::new("ovd");
    let ovs = Ovs::start(&ns);
    let client = Client::connect(&ovs.endpoint(), T).expect("connect to fresh ovsdb-server");
    Node { client, ovs, ns }
}

/// A veth pair inside the node netns; `a` is the end that goes on the
/// bridge. Vanishes with the namespace.
fn veth(ns: &Netns, a: &str, b: &str) {
    ns.ok(&["ip", "link", "add", a, "type", "veth", "peer", "name", b]);
    ns.ok(&["ip", "link", "set", a, "up"]);
    ns.ok(&["ip", "link", "set", b, "up"]);
}

/// A stream socket bound to `addr` and never listened on: a connect to it
/// is refused for as long as it lives, whatever copies of it exist.
fn unlistened(family: AddressFamily, addr: &dyn SockaddrLike) -> OwnedFd {
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).unwrap();
    bind(fd.as_raw_fd(), addr).unwrap();
    fd
}

fn lines(s: &str) -> Vec<String> {
    s.lines()
        .map(str::to_owned)
        .filter(|l| !l.is_empty())
        .collect()
}

#[test]
fn ensure_bridge_creates_once_with_datapath_type() {
    let mut n = node();
    assert_eq!(n.client.bridge_datapath_type("br0").unwrap(), None);
    assert!(n
        .client
        .ensure_bridge("br0", "netdev", &[("hwaddr", "02:00:00:00:00:aa")])
        .unwrap());
    // Set by the creating transaction itself: nothing else ran in between.
    assert_eq!(
        n.ovs
            .vsctl(&["get", "Bridge", "br0", "other_config:hwaddr"])
            .trim(),
        "\"02:00:00:00:00:aa\""
    );
    assert!(!n.client.ensure_bridge("br0", "netdev", &[]).unwrap());
    // An existing bridge is not changed, whatever was asked for.
    assert!(!n.client.ensure_bridge("br0", "system", &[]).unwrap());

    assert_eq!(lines(&n.ovs.vsctl(&["list-br"])), ["br0"]);
    assert_eq!(
        n.ovs
            .vsctl(&["get", "Bridge", "br0", "datapath_type"])
            .trim(),
        "netdev"
    );
    assert_eq!(
        n.client.bridge_datapath_type("br0").unwrap().as_deref(),
        Some("netdev")
    );
    assert_eq!(
        n.ovs.vsctl(&["get", "Interface", "br0", "type"]).trim(),
        "internal"
    );
    // vswitchd creates the internal port as the bridge's LOCAL port.
    assert_eq!(n.client.wait_ofport("br0", T).unwrap(), 65534);
    assert!(n.ns.has_link("br0"));
    // The bridge's own port is not one of "its ports".
    assert!(n.client.ports("br0").unwrap().is_empty());
}

#[test]
fn ensure_bridge_races_create_exactly_one() {
    let n = node();
    let threads = 6;
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let endpoint = n.ovs.endpoint();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut c = Client::connect(&endpoint, T).unwrap();
                barrier.wait();
                c.ensure_bridge("brace", "netdev", &[]).unwrap()
            })
        })
        .collect();
    let created: Vec<bool> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(created.iter().filter(|c| **c).count(), 1, "{created:?}");
    assert_eq!(lines(&n.ovs.vsctl(&["list-br"])), ["brace"]);
    assert_eq!(
        lines(
            &n.ovs
                .vsctl(&["--bare", "--columns=_uuid", "find", "Port", "name=brace"])
        )
        .len(),
        1
    );
    assert_eq!(
        lines(
            &n.ovs
                .vsctl(&["--bare", "--columns=bridges", "list", "Open_vSwitch"])
        )
        .len(),
        1
    );
}

#[test]
fn veth_port_lifecycle_with_identity() {
    let mut n = node();
    n.client.ensure_bridge("brp", "netdev", &[]).unwrap();
    veth(&n.ns, "vp1", "vp1c");
    let ids = [
        ("evio.owner", "evio"),
        ("evio.container", "c0ffee"),
        ("evio.ifname", "eth0"),
    ];
    n.client
        .add_port(
            "brp",
            &PortSpec {
                name: "vp1",
                external_ids: &ids,
            },
        )
        .unwrap();
    let ofport = n.client.wait_ofport("vp1", T).unwrap();
    assert!(ofport > 0 && ofport != 65534, "ofport {ofport}");

    // What ovs-vsctl sees.
    assert_eq!(lines(&n.ovs.vsctl(&["list-ports", "brp"])), ["vp1"]);
    assert_eq!(
        n.ovs
            .vsctl(&["get", "Port", "vp1", "external_ids:evio.container"])
            .trim(),
        "c0ffee"
    );
    assert_eq!(
        n.ovs
            .vsctl(&["get", "Interface", "vp1", "external_ids:evio.ifname"])
            .trim(),
        "eth0"
    );
    assert_eq!(
        n.ovs.vsctl(&["get", "Interface", "vp1", "ofport"]).trim(),
        ofport.to_string()
    );

    // What the client reads back.
    let info = n.client.port("vp1").unwrap().expect("port vp1");
    assert_eq!(info.name, "vp1");
    assert_eq!(info.bridge, "brp");
    assert_eq!(info.ofport, Some(ofport));
    assert_eq!(info.error, None);
    assert_eq!(info.external_ids.len(), 3);
    assert_eq!(info.external_ids["evio.owner"], "evio");
    assert_eq!(
        info.port_uuid,
        n.ovs.vsctl(&["get", "Port", "vp1", "_uuid"]).trim()
    );
    assert_eq!(
        info.interface_uuid,
        n.ovs.vsctl(&["get", "Interface", "vp1", "_uuid"]).trim()
    );
    assert_eq!(n.client.ports("brp").unwrap(), vec![info]);
    assert_eq!(n.client.port("nope").unwrap(), None);

    // Same name again, on this or another bridge: refused, nothing changed.
    n.client.ensure_bridge("brq", "netdev", &[]).unwrap();
    for br in ["brp", "brq"] {
        match n.client.add_port(
            br,
            &PortSpec {
                name: "vp1",
                external_ids: &[],
            },
        ) {
            Err(Error::PortExists(p)) => assert_eq!(p, "vp1"),
            other => panic!("expected PortExists, got {other:?}"),
        }
    }
    assert!(n.ovs.vsctl(&["list-ports", "brq"]).trim().is_empty());
    match n.client.add_port(
        "nobr",
        &PortSpec {
            name: "vp9",
            external_ids: &[],
        },
    ) {
        Err(Error::NotFound(what)) => assert!(what.contains("nobr"), "{what}"),
        other => panic!("expected NotFound, got {other:?}"),
    }
    assert!(n
        .ovs
        .vsctl(&["--bare", "--columns=name", "find", "Port", "name=vp9"])
        .trim()
        .is_empty());

    // Wrong identity: left alone.
    assert!(!n
        .client
        .del_port_if(
            "vp1",
            &[("evio.owner", "evio"), ("evio.container", "other")]
        )
        .unwrap());
    assert!(!n
        .client
        .del_port_if("vp1", &[("evio.missing", "x")])
        .unwrap());
    assert_eq!(lines(&n.ovs.vsctl(&["list-ports", "brp"])), ["vp1"]);

    // Right identity: port and interface gone, device untouched.
    assert!(n
        .client
        .del_port_if(
            "vp1",
            &[("evio.owner", "evio"), ("evio.container", "c0ffee")]
        )
        .unwrap());
    assert!(n.ovs.vsctl(&["list-ports", "brp"]).trim().is_empty());
    assert!(n
        .ovs
        .vsctl(&["--bare", "--columns=name", "find", "Interface", "name=vp1"])
        .trim()
        .is_empty());
    assert!(n.ns.has_link("vp1"));
    // Already gone: not an error.
    assert!(!n.client.del_port_if("vp1", &ids).unwrap());
    assert_eq!(lines(&n.ovs.vsctl(&["list-br"])), ["brp", "brq"]);
}

#[test]
fn foreign_port_is_not_deleted() {
    let mut n = node();
    n.client.ensure_bridge("brf", "netdev", &[]).unwrap();
    veth(&n.ns, "vf1", "vf1c");
    n.ovs.vsctl(&["add-port", "brf", "vf1"]);
    n.ovs.vsctl(&[
        "add-port",
        "brf",
        "patch0",
        "--",
        "set",
        "Interface",
        "patch0",
        "type=patch",
        "options:peer=patch1",
    ]);
    for p in ["vf1", "patch0"] {
        assert!(!n.client.del_port_if(p, &[("evio.owner", "evio")]).unwrap());
    }
    let ports = n.client.ports("brf").unwrap();
    let names: Vec<&str> = ports.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["patch0", "vf1"]);
    assert!(ports.iter().all(|p| p.external_ids.is_empty()));
    assert_eq!(
        lines(&n.ovs.vsctl(&["list-ports", "brf"])),
        ["patch0", "vf1"]
    );
}

#[test]
fn missing_device_reports_vswitchd_error_quickly() {
    let mut n = node();
    n.client.ensure_bridge("brg", "netdev", &[]).unwrap();
    n.client
        .add_port(
            "brg",
            &PortSpec {
                name: "ghost0",
                external_ids: &[("k", "v")],
            },
        )
        .unwrap();
    match n.client.wait_ofport("ghost0", Duration::from_secs(10)) {
        Err(Error::Interface { iface, error }) => {
            assert_eq!(iface, "ghost0");
            assert!(error.contains("No such device"), "{error}");
        }
        other => panic!("expected an interface error, got {other:?}"),
    }
    // An interface error rather than Timeout: vswitchd's answer was read,
    // not waited out.
    let info = n.client.port("ghost0").unwrap().unwrap();
    assert_eq!(info.ofport, Some(-1));
    assert!(info.error.is_some());
}

#[test]
fn wait_ofport_is_bounded_and_resumes_after_vswitchd_restart() {
    let mut n = node();
    n.client.ensure_bridge("brw", "netdev", &[]).unwrap();
    veth(&n.ns, "vw1", "vw1c");
    n.ovs.kill_vswitchd();
    n.client
        .add_port(
            "brw",
            &PortSpec {
                name: "vw1",
                external_ids: &[],
            },
        )
        .unwrap();
    let t0 = Instant::now();
    match n.client.wait_ofport("vw1", Duration::from_millis(700)) {
        Err(Error::Timeout { .. }) => {}
        other => panic!("expected Timeout, got {other:?}"),
    }
    // It waited (no upper bound: under load any bound flakes).
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(650), "{took:?}");
    // The connection is still usable after a timed-out wait.
    assert_eq!(n.client.port("vw1").unwrap().unwrap().ofport, None);

    // A wait already in progress sees vswitchd's work as it happens.
    let endpoint = n.ovs.endpoint();
    let waiter = std::thread::spawn(move || {
        let mut c = Client::connect(&endpoint, T).unwrap();
        c.wait_ofport("vw1", Duration::from_secs(20))
    });
    std::thread::sleep(Duration::from_millis(200));
    n.ovs.start_vswitchd();
    let ofport = waiter.join().unwrap().unwrap();
    assert!(ofport > 0);
    assert_eq!(n.client.wait_ofport("vw1", T).unwrap(), ofport);
}

#[test]
fn wait_ofport_on_unknown_interface_is_not_found() {
    let mut n = node();
    match n.client.wait_ofport("nosuch", T) {
        Err(Error::NotFound(what)) => assert!(what.contains("nosuch")),
        other => panic!("expected NotFound, got {other:?}"),
    }
    // An absurd timeout is not an overflow panic.
    assert!(matches!(
        n.client.wait_ofport("nosuch", Duration::MAX),
        Err(Error::NotFound(_))
    ));
}

#[test]
fn missing_or_refusing_socket_fails_fast() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let missing = format!("unix:{}/db.sock", dir.display());
    let err = Client::connect(&missing, Duration::from_secs(10)).unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    assert!(err.is_unavailable());
    assert!(err.to_string().contains(&missing), "{err}");

    // A socket file nobody listens on any more (server died hard). Bound
    // and never listened on, rather than a listener dropped: this binary
    // spawns processes all the time, and a child forked while a listener
    // was open would keep it accepting until its exec.
    let stale = dir.join("stale.sock");
    let _bound = unlistened(AddressFamily::Unix, &UnixAddr::new(&stale).unwrap());
    let err = Client::connect(
        &format!("unix:{}", stale.display()),
        Duration::from_secs(10),
    )
    .unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");

    // A TCP port on loopback nobody listens on (held, so nobody can).
    let held = unlistened(AddressFamily::Inet, &SockaddrIn::new(127, 0, 0, 1, 0));
    let port = getsockname::<SockaddrIn>(held.as_raw_fd()).unwrap().port();
    let err =
        Client::connect(&format!("tcp:127.0.0.1:{port}"), Duration::from_secs(10)).unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");

    let err = Client::connect("ssl:1.2.3.4:6640", T).unwrap_err();
    assert!(matches!(err, Error::Endpoint(_)), "{err:?}");
}

#[test]
fn ovsdb_server_killed_gives_clear_error() {
    let mut n = node();
    n.client.ensure_bridge("brk", "netdev", &[]).unwrap();
    assert!(n
        .client
        .list_dbs()
        .unwrap()
        .iter()
        .any(|d| d == "Open_vSwitch"));
    n.ovs.kill_ovsdb();
    let err = n.client.ports("brk").unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    assert!(err.to_string().contains("closed"), "{err}");
    let err = Client::connect(&n.ovs.endpoint(), T).unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");

    // Back up: a new connection sees the persisted bridge.
    n.ovs.start_ovsdb();
    let mut c = Client::connect(&n.ovs.endpoint(), T).unwrap();
    assert_eq!(
        c.bridge_datapath_type("brk").unwrap().as_deref(),
        Some("netdev")
    );
}

#[test]
fn transaction_errors_name_the_operation() {
    let mut n = node();
    let err = n
        .client
        .transact(
            "Open_vSwitch",
            vec![
                evio_ovsdb::ops::select("Bridge", vec![], None),
                evio_ovsdb::ops::select("NoSuchTable", vec![], None),
            ],
        )
        .unwrap_err();
    match err {
        Error::Transaction { op, error, .. } => {
            assert_eq!(op, 1);
            assert!(!error.is_empty());
        }
        other => panic!("expected Transaction, got {other:?}"),
    }
    match n.client.transact("NoSuchDb", vec![]) {
        Err(Error::Rpc { method, error }) => {
            assert_eq!(method, "transact");
            assert!(error.contains("unknown database"), "{error}");
        }
        other => panic!("expected Rpc error, got {other:?}"),
    }
    // The connection survives both.
    n.client.echo().unwrap();
}

#[test]
fn ovsdb_server_crash_leaves_refusing_socket() {
    let mut n = node();
    n.ovs.crash_ovsdb();
    assert!(
        n.ovs.db_sock().exists(),
        "stale socket expected after SIGKILL"
    );
    let err = n.client.bridge_datapath_type("x").unwrap_err();
    assert!(err.is_unavailable(), "{err:?}");
    let err = Client::connect(&n.ovs.endpoint(), Duration::from_secs(10)).unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    assert!(err.to_string().contains("refused"), "{err}");
}

#[test]
fn ensure_bridge_without_root_row_is_an_error() {
    let mut n = node();
    n.client
        .transact(
            "Open_vSwitch",
            vec![evio_ovsdb::ops::delete("Open_vSwitch", vec![])],
        )
        .unwrap();
    match n.client.ensure_bridge("brz", "netdev", &[]) {
        Err(Error::NotFound(what)) => assert!(what.contains("Open_vSwitch"), "{what}"),
        other => panic!("expected NotFound, got {other:?}"),
    }
    assert!(n
        .ovs
        .vsctl(&["--bare", "--columns=name", "find", "Bridge"])
        .trim()
        .is_empty());
}
