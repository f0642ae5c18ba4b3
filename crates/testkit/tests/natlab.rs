//! The NAT lab behaves as named: real UDP/TCP traffic between sockets
//! created inside the lab's namespaces. The `punch_*` tests are the hole
//! punching experiment of docs/natlab.md, kept as regression tests: they
//! pin down which router configurations let sequential punching between two
//! Linux cone NATs succeed.
// A test that unwraps fails loudly, which is what a test should do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{self, Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::thread::sleep;
use std::time::{Duration, Instant};

use evio_testkit::natlab::{
    stun_binding, stun_binding_tcp, Lab, NatType, NodeId, SiteId, StunServer, SERVER_ADDR,
};
use evio_testkit::netns::Netns;
use evio_testkit::plugin::run_bounded;

const STUN_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a datagram that should arrive may take (the lab's paths take
/// well under a millisecond; generous for a loaded machine).
const ARRIVAL: Duration = Duration::from_millis(300);
const PORT: u16 = 5800;

fn any(port: u16) -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], port))
}

fn udp(ns: &Netns, port: u16) -> UdpSocket {
    ns.udp_bind(any(port))
        .unwrap_or_else(|e| panic!("bind :{port} in {}: {e}", ns.name()))
}

fn mapped(sock: &UdpSocket, server: SocketAddr) -> SocketAddr {
    stun_binding(sock, server, STUN_TIMEOUT).unwrap_or_else(|e| panic!("STUN via {server}: {e}"))
}

/// Every datagram that arrives within `wait` (and until the socket is
/// quiet), as (payload, source).
fn recv_all(sock: &UdpSocket, wait: Duration) -> Vec<(String, SocketAddr)> {
    let deadline = Instant::now() + wait;
    let mut got = Vec::new();
    let mut buf = [0u8; 1500];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return got;
        }
        sock.set_read_timeout(Some(left)).expect("set_read_timeout");
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => got.push((String::from_utf8_lossy(&buf[..n]).into_owned(), from)),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return got
            }
            // An ICMP error from an earlier send: not a datagram. EINTR:
            // a socket with SO_RCVTIMEO returns it after the process was
            // stopped and continued, even without a signal handler.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionRefused | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => panic!("recv: {e}"),
        }
    }
}

/// Whether `payload` sent from `from` to `to` arrives at `at`.
fn arrives(from: &UdpSocket, to: SocketAddr, at: &UdpSocket, payload: &str) -> bool {
    from.send_to(payload.as_bytes(), to).expect("send");
    recv_all(at, ARRIVAL).iter().any(|(p, _)| p == payload)
}

fn lab_with(kind: NatType) -> (Lab, SiteId, NodeId) {
    let mut lab = Lab::new();
    let s = lab.add_site(kind);
    let n = lab.add_node(s).id;
    (lab, s, n)
}

const ALL_TYPES: [NatType; 6] = [
    NatType::Public,
    NatType::PortRestrictedCone,
    NatType::Symmetric,
    NatType::FullCone,
    NatType::UdpBlocked,
    NatType::DoubleNat,
];

#[test]
fn mapping_behaviour_per_nat_type() {
    let mut lab = Lab::new();
    let s2 = lab.add_server_addr();
    let one = StunServer::start(lab.internet(), SocketAddr::new(lab.server_addr(), 3479));
    let two = StunServer::start(lab.internet(), SocketAddr::new(s2, 3479));
    for kind in ALL_TYPES {
        if kind == NatType::UdpBlocked {
            continue;
        }
        let s = lab.add_site(kind);
        let n = lab.add_node(s).id;
        let sock = udp(&lab.node(n).ns, PORT);
        let m1 = mapped(&sock, one.addr());
        let m2 = mapped(&sock, two.addr());
        assert_eq!(m1.ip(), lab.public_addr(n), "{kind}: mapped address");
        assert_eq!(m2.ip(), lab.public_addr(n), "{kind}: mapped address");
        if kind == NatType::Symmetric {
            assert_ne!(
                m1.port(),
                m2.port(),
                "{kind}: one port for two destinations"
            );
        } else {
            assert_eq!(m1.port(), m2.port(), "{kind}: a port per destination");
            // Linux keeps the source port when it is free.
            assert_eq!(m1.port(), PORT, "{kind}: source port not kept");
        }
        eprintln!("{kind}: {m1} and {m2}");
    }
}

#[test]
fn filtering_behaviour_per_nat_type() {
    let mut lab = Lab::new();
    let s2 = lab.add_server_addr();
    let at = |port| SocketAddr::new(lab.server_addr(), port);
    let srv = lab.internet().udp_bind(at(3479)).expect("bind");
    let same_ip_other_port = lab.internet().udp_bind(at(3480)).expect("bind");
    let other_ip = lab
        .internet()
        .udp_bind(SocketAddr::new(s2, 3479))
        .expect("bind second server address");
    let stun = StunServer::start(lab.internet(), SocketAddr::new(lab.server_addr(), 3478));
    for kind in ALL_TYPES {
        if kind == NatType::UdpBlocked {
            continue;
        }
        let s = lab.add_site(kind);
        let n = lab.add_node(s).id;
        let sock = udp(&lab.node(n).ns, PORT);
        // Open a mapping toward `srv`, learn it from the STUN server.
        let m = mapped(&sock, stun.addr());
        sock.send_to(b"open", SocketAddr::new(lab.server_addr(), 3479))
            .expect("send");
        let got = recv_all(&srv, ARRIVAL);
        assert!(
            got.iter().any(|(p, _)| p == "open"),
            "{kind}: nothing arrived"
        );
        let reply = arrives(&srv, got[0].1, &sock, "reply");
        let port = arrives(&same_ip_other_port, m, &sock, "other port");
        let addr = arrives(&other_ip, m, &sock, "other address");
        eprintln!("{kind}: reply {reply}, same address other port {port}, other address {addr}");
        assert!(
            reply,
            "{kind}: the reply to an outbound datagram was dropped"
        );
        let open = matches!(kind, NatType::Public | NatType::FullCone);
        assert_eq!(
            port, open,
            "{kind}: unsolicited from a known address, new port"
        );
        assert_eq!(addr, open, "{kind}: unsolicited from a new address");
    }
}

#[test]
fn udp_blocked_site_only_tcp_gets_out() {
    let (lab, _, n) = lab_with(NatType::UdpBlocked);
    let stun = StunServer::start(lab.internet(), SocketAddr::new(lab.server_addr(), 3478));
    let node = lab.node(n);
    let sock = udp(&node.ns, PORT);
    let r = stun_binding(&sock, stun.addr(), Duration::from_secs(1));
    assert!(r.is_err(), "UDP got out of a UDP-blocked site: {r:?}");
    assert!(stun.seen().is_empty(), "server saw {:?}", stun.seen());

    let listener = lab
        .internet()
        .tcp_listen(SocketAddr::new(lab.server_addr(), 8080))
        .expect("listen");
    let mut c = node
        .ns
        .tcp_connect(SocketAddr::new(lab.server_addr(), 8080), STUN_TIMEOUT)
        .expect("TCP out of a UDP-blocked site");
    // The connection is in the backlog already: accept returns at once.
    let (mut s, peer) = listener.accept().expect("accept");
    assert_eq!(
        peer.ip(),
        lab.public_addr(n),
        "TCP not NATed to the WAN address"
    );
    c.write_all(b"ping").expect("write");
    let mut buf = [0u8; 4];
    s.set_read_timeout(Some(STUN_TIMEOUT)).expect("timeout");
    s.read_exact(&mut buf).expect("read");
    assert_eq!(&buf, b"ping");
}

#[test]
fn two_nodes_behind_one_router_share_its_address() {
    let mut lab = Lab::new();
    let s = lab.add_site(NatType::PortRestrictedCone);
    let a = lab.add_node(s).id;
    let b = lab.add_node(s).id;
    let stun = StunServer::start(lab.internet(), SocketAddr::new(lab.server_addr(), 3478));
    let sa = udp(&lab.node(a).ns, PORT);
    let sb = udp(&lab.node(b).ns, PORT);
    let ma = mapped(&sa, stun.addr());
    let mb = mapped(&sb, stun.addr());
    assert_eq!(ma.ip(), mb.ip());
    assert_eq!(ma.ip(), lab.public_addr(a));
    // Same source port on both: the second mapping cannot keep it.
    assert_ne!(ma.port(), mb.port());
    // They reach each other directly on their LAN.
    assert!(arrives(
        &sa,
        SocketAddr::new(lab.node(b).addr, PORT),
        &sb,
        "lan"
    ));
}

#[test]
fn conntrack_flush_forgets_mappings() {
    for kind in [
        NatType::PortRestrictedCone,
        NatType::Symmetric,
        NatType::DoubleNat,
    ] {
        let (lab, s, n) = lab_with(kind);
        let stun = StunServer::start(lab.internet(), SocketAddr::new(lab.server_addr(), 3478));
        let srv = udp(lab.internet(), 3479);
        let sock = udp(&lab.node(n).ns, PORT);
        let m1 = mapped(&sock, stun.addr());
        sock.send_to(b"x", SocketAddr::new(lab.server_addr(), 3479))
            .expect("send");
        let from = recv_all(&srv, ARRIVAL)
            .first()
            .map(|(_, f)| *f)
            .expect("nothing arrived");
        assert!(
            arrives(&srv, from, &sock, "before"),
            "{kind}: reply before flush"
        );
        lab.flush_conntrack(s);
        assert!(
            !arrives(&srv, from, &sock, "after"),
            "{kind}: the mapping survived conntrack -F"
        );
        let m2 = mapped(&sock, stun.addr());
        eprintln!("{kind}: before flush {m1}, after {m2}");
        if kind == NatType::Symmetric {
            assert_ne!(m1, m2, "{kind}: same random port again");
        } else {
            assert_eq!(m1, m2, "{kind}: a cone keeps the free source port");
        }
    }
}

#[test]
fn udp_timeout_expires_idle_mappings() {
    let root_timeout = std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_udp_timeout");
    let (lab, s, n) = lab_with(NatType::PortRestrictedCone);
    // 2 s, not 1: the fresh reply below must not race the timeout on a
    // loaded machine.
    lab.set_udp_timeout(s, 2);
    let router = lab.router(s).expect("router");
    let out = router.ok(&["sysctl", "-n", "net.netfilter.nf_conntrack_udp_timeout"]);
    assert_eq!(out.trim(), "2");
    let srv = udp(lab.internet(), 3479);
    let sock = udp(&lab.node(n).ns, PORT);
    sock.send_to(b"x", SocketAddr::new(lab.server_addr(), 3479))
        .expect("send");
    srv.set_read_timeout(Some(ARRIVAL))
        .expect("set_read_timeout");
    let mut buf = [0u8; 16];
    let (_, from) = srv.recv_from(&mut buf).expect("nothing arrived");
    assert!(arrives(&srv, from, &sock, "fresh"));
    // The reply made the flow "stream" (timeout 2 s as well).
    sleep(Duration::from_millis(4500));
    assert!(
        !arrives(&srv, from, &sock, "expired"),
        "mapping outlived its timeout"
    );
    // The sysctl is per namespace: the machine's own value is untouched.
    let root_after = std::fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_udp_timeout");
    assert_eq!(root_timeout.ok(), root_after.ok());
}

#[test]
fn wan_address_change_keeps_nat_working() {
    for kind in [
        NatType::PortRestrictedCone,
        NatType::FullCone,
        NatType::DoubleNat,
    ] {
        let (lab, s, n) = lab_with(kind);
        let stun = StunServer::start(lab.internet(), SocketAddr::new(lab.server_addr(), 3478));
        let sock = udp(&lab.node(n).ns, PORT);
        let before = mapped(&sock, stun.addr());
        let old = lab.wan_addr(s).expect("wan");
        assert_eq!(before.ip(), old);
        let new = lab.change_wan_address(s);
        assert_ne!(new, old);
        assert_eq!(lab.wan_addr(s), Some(new));
        let after = mapped(&sock, stun.addr());
        eprintln!("{kind}: {before} -> {after}");
        assert_eq!(after.ip(), new, "{kind}: NAT still uses the old address");
        // Nothing answers on the old address any more.
        let probe = udp(lab.internet(), 3480);
        assert!(
            !arrives(&probe, SocketAddr::new(old, PORT), &sock, "old"),
            "{kind}: old address still leads to the node"
        );
    }
}

#[test]
fn set_nat_switches_symmetric_to_cone_at_run_time() {
    let mut lab = Lab::new();
    let s = lab.add_site(NatType::Symmetric);
    let n = lab.add_node(s).id;
    let s2 = lab.add_server_addr();
    let one = StunServer::start(lab.internet(), SocketAddr::new(lab.server_addr(), 3478));
    let two = StunServer::start(lab.internet(), SocketAddr::new(s2, 3478));
    let sock = udp(&lab.node(n).ns, PORT);
    assert_ne!(
        mapped(&sock, one.addr()).port(),
        mapped(&sock, two.addr()).port()
    );
    lab.set_nat(s, NatType::PortRestrictedCone);
    // Existing flows keep their mappings: a fresh socket sees the new type.
    let sock = udp(&lab.node(n).ns, PORT + 1);
    let (m1, m2) = (mapped(&sock, one.addr()), mapped(&sock, two.addr()));
    assert_eq!(m1, m2);
    lab.set_nat(s, NatType::Symmetric);
    let sock = udp(&lab.node(n).ns, PORT + 2);
    assert_ne!(
        mapped(&sock, one.addr()).port(),
        mapped(&sock, two.addr()).port()
    );
    lab.set_nat(s, NatType::UdpBlocked);
    let sock = udp(&lab.node(n).ns, PORT + 3);
    assert!(stun_binding(&sock, one.addr(), Duration::from_millis(600)).is_err());
}

#[test]
fn block_udp_between_kills_the_direct_path_only() {
    let mut lab = Lab::new();
    let sp = lab.add_site(NatType::Public);
    let sc = lab.add_site(NatType::FullCone);
    let p = lab.add_node(sp).id;
    let c = lab.add_node(sc).id;
    let c2 = lab.add_node(sc).id;
    let turn = lab.start_coturn();
    let (up, uc, uc2) = (
        udp(&lab.node(p).ns, PORT),
        udp(&lab.node(c).ns, PORT),
        udp(&lab.node(c2).ns, PORT),
    );
    let to_c = SocketAddr::new(lab.public_addr(c), PORT);
    let to_p = SocketAddr::new(lab.public_addr(p), PORT);
    let c2_lan = SocketAddr::new(lab.node(c2).addr, PORT);
    assert!(arrives(&up, to_c, &uc, "before"));
    assert!(arrives(
        &uc2,
        SocketAddr::new(lab.node(c).addr, PORT),
        &uc,
        "lan before"
    ));

    lab.block_udp_between(p, c);
    lab.block_udp_between(c, c2);
    assert!(!arrives(&up, to_c, &uc, "p->c"), "p->c still flows");
    assert!(!arrives(&uc, to_p, &up, "c->p"), "c->p still flows");
    assert!(!arrives(&uc, c2_lan, &uc2, "c->c2"), "LAN UDP still flows");
    // The servers are still reachable over UDP from both.
    for (n, s) in [(p, &up), (c, &uc), (c2, &uc2)] {
        assert_eq!(mapped(s, turn.addr()).ip(), lab.public_addr(n));
    }
    // TCP is not affected (toward the public node: a full cone forwards
    // only UDP).
    let l = lab.node(p).ns.tcp_listen(any(PORT)).expect("listen");
    lab.node(c)
        .ns
        .tcp_connect(to_p, STUN_TIMEOUT)
        .expect("TCP between blocked nodes");
    l.accept().expect("accept");

    lab.unblock_udp_between(c, p);
    lab.unblock_udp_between(c2, c);
    assert!(arrives(&up, to_c, &uc, "after"));
    assert!(arrives(&uc, c2_lan, &uc2, "lan after"));
}

/// `turnutils_uclient` in `ns`: two clients allocate relays on `turn` and
/// exchange messages through them. Returns its last lines when not all
/// messages arrived.
fn turn_relay_check(
    ns: &Netns,
    turn: &evio_testkit::natlab::Coturn,
    tcp: bool,
) -> Result<(), String> {
    let server = turn.addr().ip().to_string();
    let mut argv = vec![
        "turnutils_uclient",
        "-u",
        turn.user(),
        "-w",
        turn.password(),
        "-r",
        turn.realm(),
        "-n",
        "3",
        "-m",
        "1",
        "-y",
    ];
    if tcp {
        argv.push("-t");
    }
    argv.push(&server);
    let out = run_bounded(ns.command(&argv), b"", Duration::from_secs(30));
    let text = format!("{}{}", out.stdout, out.stderr);
    // The summary line: "start_mclient: tot_send_msgs=12, tot_recv_msgs=12".
    let counts = text
        .lines()
        .find_map(|l| l.split_once("start_mclient: tot_send_msgs="))
        .and_then(|(_, rest)| rest.split_once(", tot_recv_msgs="))
        .map(|(sent, recv)| (sent.trim().to_string(), recv.trim().to_string()));
    let ok = out.code == 0
        && counts.is_some_and(|(s, r)| s == r && s != "0")
        && text.contains("Total lost packets 0 ");
    if ok {
        Ok(())
    } else {
        let tail: Vec<&str> = text.lines().rev().take(8).collect();
        Err(format!("code {}: {}", out.code, tail.join(" | ")))
    }
}

#[test]
fn coturn_serves_stun_and_turn_behind_every_nat_type() {
    let mut lab = Lab::new();
    let mut turn = lab.start_coturn();
    let mut nodes = Vec::new();
    for kind in ALL_TYPES {
        let s = lab.add_site(kind);
        nodes.push((kind, lab.add_node(s).id));
    }
    for (kind, n) in &nodes {
        let node = lab.node(*n);
        let want = lab.public_addr(*n);
        if *kind == NatType::UdpBlocked {
            let mut c = node
                .ns
                .tcp_connect(turn.addr(), STUN_TIMEOUT)
                .expect("TCP to coturn");
            let m = stun_binding_tcp(&mut c, STUN_TIMEOUT).expect("STUN over TCP");
            assert_eq!(m.ip(), want, "{kind}");
        } else {
            let m = mapped(&udp(&node.ns, PORT), turn.addr());
            assert_eq!(m.ip(), want, "{kind}");
            // coturn's own client agrees.
            let out = run_bounded(
                node.ns
                    .command(&["turnutils_stunclient", &turn.addr().ip().to_string()]),
                b"",
                Duration::from_secs(20),
            );
            assert!(
                out.stdout.contains(&format!("UDP reflexive addr: {want}:")),
                "{kind}: turnutils_stunclient: {}{}",
                out.stdout,
                out.stderr
            );
        }
        eprintln!("{kind}: STUN ok");
    }
    // TURN relaying with coturn's own client, over UDP (except where UDP
    // cannot get out) and TCP. Each run takes ~5 s of fixed waits, mostly
    // asleep: run them all at once.
    let runs: Vec<(NatType, NodeId, bool)> = nodes
        .iter()
        .flat_map(|(k, n)| [(*k, *n, false), (*k, *n, true)])
        .filter(|(k, _, tcp)| *tcp || *k != NatType::UdpBlocked)
        .collect();
    let failures: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = runs
            .iter()
            .map(|(k, n, tcp)| {
                let (ns, turn) = (&lab.node(*n).ns, &turn);
                s.spawn(move || {
                    turn_relay_check(ns, turn, *tcp)
                        .err()
                        .map(|e| format!("{k} tcp={tcp}: {e}"))
                })
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| h.join().expect("uclient thread"))
            .collect()
    });
    assert!(
        failures.is_empty(),
        "TURN relay failed: {failures:#?}\n{}",
        turn.log()
    );
    assert!(!turn.log().is_empty(), "coturn wrote no log");

    // Stop and start again on the same address.
    let probe = udp(&lab.node(nodes[1].1).ns, PORT + 1);
    turn.stop();
    assert!(!turn.is_running());
    assert!(stun_binding(&probe, turn.addr(), Duration::from_millis(600)).is_err());
    turn.start();
    assert!(turn.is_running());
    mapped(&probe, turn.addr());
    drop(turn);
    assert_eq!(pids_in(lab.internet()), "", "left running after drop");
}

fn pids_in(ns: &Netns) -> String {
    let out = Command::new("ip")
        .args(["netns", "pids", ns.name()])
        .output()
        .expect("ip netns pids");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn etcd_in_the_internet_is_reachable_from_behind_every_nat() {
    let mut lab = Lab::new();
    let etcd = lab.start_etcd();
    assert_eq!(etcd.netns(), Some(lab.internet().path().as_path()));
    let ep = etcd.endpoint();
    assert!(ep.starts_with(&format!("{SERVER_ADDR}:")), "{ep}");
    for kind in ALL_TYPES {
        let s = lab.add_site(kind);
        let n = lab.add_node(s).id;
        let key = format!("/evio/lab/{kind}");
        let out = run_bounded(
            lab.node(n).ns.command(&[
                "etcdctl",
                &format!("--endpoints={ep}"),
                "--dial-timeout=3s",
                "--command-timeout=5s",
                "put",
                &key,
                "here",
            ]),
            b"",
            Duration::from_secs(20),
        );
        assert_eq!(out.code, 0, "{kind}: etcdctl put: {}", out.stderr);
    }
    let got = etcd.get_prefix("/evio/lab/");
    assert_eq!(got.len(), ALL_TYPES.len(), "{got:?}");
    drop(etcd);
    assert_eq!(pids_in(lab.internet()), "", "etcd left running");
}

#[test]
fn netns_run_is_confined_to_its_thread() {
    let mut lab = Lab::new();
    let s = lab.add_site(NatType::PortRestrictedCone);
    let id = lab.add_node(s).id;
    let node = lab.node(id);
    let mine = std::fs::read_link("/proc/thread-self/ns/net").expect("own netns");
    let inside = node
        .ns
        .run(|| std::fs::read_link("/proc/thread-self/ns/net").expect("netns"));
    assert_ne!(inside, mine);
    assert_eq!(
        std::fs::read_link("/proc/thread-self/ns/net").expect("netns"),
        mine
    );
    // The node's address exists only inside its namespace.
    let a = SocketAddr::new(node.addr, 0);
    assert!(node.ns.udp_bind(a).is_ok());
    assert!(lab.internet().udp_bind(a).is_err());
    // A panic inside is the caller's panic.
    let r = std::panic::catch_unwind(|| node.ns.run(|| panic!("inside")));
    assert!(r.is_err());
}

#[test]
fn everything_is_removed_on_drop_even_after_a_panic() {
    let (names, markers) = {
        let mut lab = Lab::new();
        let mut names: Vec<String> = vec![lab.internet().name().to_string()];
        for kind in ALL_TYPES {
            let s = lab.add_site(kind);
            lab.add_node(s);
            for r in [lab.router(s), lab.inner_router(s)].into_iter().flatten() {
                names.push(r.name().to_string());
            }
        }
        names.extend(lab.nodes().iter().map(|n| n.ns.name().to_string()));
        assert_eq!(names.len(), 1 + 6 + 5 + 1, "{names:?}");
        let turn = lab.start_coturn();
        let etcd = lab.start_etcd();
        // turnserver's and etcd's command lines name their directories.
        let markers = [
            turn.dir().display().to_string(),
            etcd.root().display().to_string(),
        ];
        for m in &markers {
            assert!(!pgrep(m).is_empty(), "no process found by {m}");
        }
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _lab = lab;
            let _turn = turn;
            let _etcd = etcd;
            panic!("test failure");
        }));
        assert!(r.is_err());
        (names, markers)
    };
    let list = String::from_utf8_lossy(
        &Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip netns list")
            .stdout,
    )
    .into_owned();
    for n in &names {
        assert!(
            !list.lines().any(|l| l.split_whitespace().next() == Some(n)),
            "{n} left"
        );
    }
    for m in &markers {
        assert_eq!(pgrep(m), "", "processes left");
    }
}

fn pgrep(pattern: &str) -> String {
    let out = Command::new("pgrep")
        .args(["-f", pattern])
        .output()
        .expect("pgrep");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

// ---------------------------------------------------------------------------
// The hole punching experiment (docs/natlab.md).

/// Two nodes A and B on two sites, each with a socket on PORT whose
/// external address was learned from a STUN server first.
struct Pair {
    lab: Lab,
    sites: [SiteId; 2],
    socks: [UdpSocket; 2],
    ext: [SocketAddr; 2],
    _stun: StunServer,
}

fn pair(kinds: [NatType; 2], firewall: [bool; 2]) -> Pair {
    let mut lab = Lab::new();
    let sites = [lab.add_site(kinds[0]), lab.add_site(kinds[1])];
    let nodes = [lab.add_node(sites[0]).id, lab.add_node(sites[1]).id];
    for (s, fw) in sites.iter().zip(firewall) {
        lab.set_router_firewall(*s, fw);
    }
    let stun = StunServer::start(lab.internet(), SocketAddr::new(lab.server_addr(), 3478));
    let socks = nodes.map(|n| udp(&lab.node(n).ns, PORT));
    let ext = [
        mapped(&socks[0], stun.addr()),
        mapped(&socks[1], stun.addr()),
    ];
    Pair {
        lab,
        sites,
        socks,
        ext,
        _stun: stun,
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Order {
    AFirst,
    BFirst,
}

struct Outcome {
    /// What each side received: (payload, source).
    got: [Vec<(String, SocketAddr)>; 2],
    log: String,
}

impl Outcome {
    fn both_ways(&self) -> bool {
        !self.got[0].is_empty() && !self.got[1].is_empty()
    }
    fn nothing(&self) -> bool {
        self.got[0].is_empty() && self.got[1].is_empty()
    }
}

impl Pair {
    /// One side punches, `gap` later the other, then both send `rounds`
    /// more datagrams 100 ms apart. With `learn`, a side that receives from
    /// an address other than the one it sends to switches to it (a
    /// peer-reflexive endpoint).
    fn punch(&self, order: Order, gap: Duration, rounds: usize, learn: bool) -> Outcome {
        let mut dst = [self.ext[1], self.ext[0]];
        let mut got: [Vec<(String, SocketAddr)>; 2] = [Vec::new(), Vec::new()];
        let t0 = Instant::now();
        let mut log = format!("A external {}, B external {}\n", self.ext[0], self.ext[1]);
        let name = ["A", "B"];
        let send = |i: usize, tag: String, dst: &[SocketAddr; 2], log: &mut String| {
            self.socks[i].send_to(tag.as_bytes(), dst[i]).expect("send");
            log.push_str(&format!(
                "{:7.1} ms {} sent {tag} to {}\n",
                t0.elapsed().as_secs_f64() * 1000.0,
                name[i],
                dst[i]
            ));
        };
        let collect = |dst: &mut [SocketAddr; 2],
                       got: &mut [Vec<(String, SocketAddr)>; 2],
                       log: &mut String,
                       wait: Duration| {
            for i in 0..2 {
                for (p, from) in recv_all(&self.socks[i], wait) {
                    log.push_str(&format!(
                        "{:7.1} ms {} got {p} from {from}\n",
                        t0.elapsed().as_secs_f64() * 1000.0,
                        name[i]
                    ));
                    if learn && from != dst[i] {
                        log.push_str(&format!("           {} now sends to {from}\n", name[i]));
                        dst[i] = from;
                    }
                    got[i].push((p, from));
                }
            }
        };
        let (first, second) = match order {
            Order::AFirst => (0, 1),
            Order::BFirst => (1, 0),
        };
        send(
            first,
            format!("{}0", name[first].to_lowercase()),
            &dst,
            &mut log,
        );
        if !gap.is_zero() {
            // Listens on each socket for half the gap in turn.
            collect(&mut dst, &mut got, &mut log, gap / 2);
        }
        send(
            second,
            format!("{}0", name[second].to_lowercase()),
            &dst,
            &mut log,
        );
        for r in 1..=rounds {
            collect(&mut dst, &mut got, &mut log, Duration::from_millis(50));
            send(0, format!("a{r}"), &dst, &mut log);
            send(1, format!("b{r}"), &dst, &mut log);
        }
        collect(&mut dst, &mut got, &mut log, ARRIVAL);
        for s in self.sites {
            log.push_str(&self.lab.conntrack_list(s));
        }
        Outcome { got, log }
    }

    /// Whether `site`'s router holds an unsolicited inbound entry from the
    /// peer's external address to this side's (the quirk's cause): a
    /// conntrack line whose *original* direction (the first tuple) is
    /// peer-external -> own-external.
    fn unsolicited_entry_at(&self, site: usize) -> bool {
        let (from, to) = (self.ext[1 - site], self.ext[site]);
        let needle = format!(
            "src={} dst={} sport={} dport={}",
            from.ip(),
            to.ip(),
            from.port(),
            to.port()
        );
        self.lab
            .conntrack_list(self.sites[site])
            .lines()
            .any(|l| l.find("src=").is_some_and(|i| l[i..].starts_with(&needle)))
    }
}

const PRC: [NatType; 2] = [NatType::PortRestrictedCone, NatType::PortRestrictedCone];

/// Case 1: routers without an input firewall (a bare `masquerade`). A's
/// first datagram reaches B's router before B has sent anything and
/// becomes a conntrack entry for a flow *to the router*; B's own datagram
/// to A then cannot keep port 5800 (its reply tuple would clash with that
/// entry) and leaves from a random port, which A's router drops. Neither
/// side ever receives anything, however long both keep sending.
#[test]
fn punch_sequential_fails_between_open_linux_routers() {
    for order in [Order::AFirst, Order::BFirst] {
        let p = pair(PRC, [false, false]);
        let o = p.punch(order, Duration::from_millis(100), 5, true);
        eprintln!("{}", o.log);
        assert!(o.nothing(), "something arrived:\n{}", o.log);
        let receiver = if order == Order::AFirst { 1 } else { 0 };
        assert!(
            p.unsolicited_entry_at(receiver),
            "no unsolicited entry:\n{}",
            o.log
        );
    }
}

/// Case 2: both send "at once" (back to back from one thread, tens of
/// microseconds apart). The lab's paths are shorter than that: the first
/// datagram has crossed both routers before the second is sent, so this is
/// case 1 again. Reported, and only checked for consistency, because a
/// scheduler delay can in principle reorder them.
#[test]
fn punch_same_instant_is_still_sequential_in_the_lab() {
    let mut failed = 0;
    for _ in 0..3 {
        let p = pair(PRC, [false, false]);
        let o = p.punch(Order::AFirst, Duration::ZERO, 3, true);
        eprintln!("{}", o.log);
        assert!(o.nothing() || o.both_ways(), "one-sided:\n{}", o.log);
        if o.nothing() {
            assert!(
                p.unsolicited_entry_at(1),
                "failed without the quirk:\n{}",
                o.log
            );
            failed += 1;
        }
    }
    eprintln!("same-instant punching failed {failed} of 3 times");
}

fn assert_direct(p: &Pair, o: &Outcome) {
    assert!(o.both_ways(), "punching failed:\n{}", o.log);
    for i in 0..2 {
        // Everything came from the peer's STUN-learned address: the
        // routers kept the ports.
        assert!(
            o.got[i].iter().all(|(_, from)| *from == p.ext[1 - i]),
            "unexpected source:\n{}",
            o.log
        );
    }
    assert!(
        !p.unsolicited_entry_at(0) && !p.unsolicited_entry_at(1),
        "{}",
        o.log
    );
}

/// Case 2 with latency (`Lab::set_wan_delay` on both routers): datagrams
/// sent less than the one-way delay apart cross in flight, each reaches the
/// peer's router after that router has confirmed its own node's outbound
/// flow, and two bare Linux gateways punch through, at once or 10 ms
/// apart. A gap longer than the delay is case 1 again. Fails without the
/// delay (`punch_same_instant_is_still_sequential_in_the_lab`).
#[test]
fn punch_crosses_in_flight_between_open_routers_with_wan_delay() {
    // 100 ms: a loaded machine may stall the test thread tens of ms
    // between the two sends, and a gap past the delay is case 1.
    let delay = Duration::from_millis(100);
    for (gap, works) in [
        (Duration::ZERO, true),
        (Duration::from_millis(10), true),
        (Duration::from_millis(300), false),
    ] {
        let p = pair(PRC, [false, false]);
        for s in p.sites {
            p.lab.set_wan_delay(s, delay);
        }
        let o = p.punch(Order::AFirst, gap, 5, false);
        eprintln!("gap {gap:?}:\n{}", o.log);
        if works {
            assert_direct(&p, &o);
        } else {
            assert!(o.nothing(), "{}", o.log);
            assert!(p.unsolicited_entry_at(1), "{}", o.log);
        }
        for s in p.sites {
            assert!(p.lab.wan_delay(s).1 > 0, "nothing went through the delay");
        }
    }
}

/// The delay line itself: a round trip between two delayed routers takes
/// at least twice the delay, one to a server from behind one delayed
/// router at least the delay; UDP through the NAT works; removing the
/// delay removes the rule and the holder (and so does dropping the lab).
#[test]
fn wan_delay_adds_one_way_latency_into_the_router_and_is_removed() {
    let delay = Duration::from_millis(50);
    let mut lab = Lab::new();
    let sites = [
        lab.add_site(NatType::PortRestrictedCone),
        lab.add_site(NatType::PortRestrictedCone),
    ];
    let node = lab.add_node(sites[0]).id;
    // The input firewall would drop the routers' pings to each other.
    lab.set_router_firewall(sites[1], false);
    for s in sites {
        lab.set_wan_delay(s, delay);
        assert_eq!(lab.wan_delay(s).0, delay);
    }
    let r0 = lab.router(sites[0]).expect("router");
    let wan1 = lab.wan_addr(sites[1]).expect("wan").to_string();
    let rtts = ping_rtts(r0, &wan1, 5);
    eprintln!("router-router RTT with {delay:?} each way: {rtts:?}");
    assert_eq!(rtts.len(), 5, "ping lost packets");
    assert!(rtts.iter().all(|r| *r >= 2 * delay), "{rtts:?}");

    // A ruleset change in the router drops the packets queued there (the
    // kernel flushes its queues when a hook goes): the line must keep
    // going. A fast ping keeps a few packets held at every change.
    let burst = std::thread::scope(|s| {
        let pinger = s.spawn(|| {
            let out = run_bounded(
                r0.command(&["ping", "-n", "-q", "-c", "300", "-i", "0.005", &wan1]),
                b"",
                Duration::from_secs(30),
            );
            out.stdout
        });
        for on in [true, false].repeat(5) {
            sleep(Duration::from_millis(100));
            lab.set_router_firewall(sites[0], on);
        }
        pinger.join().expect("pinger")
    });
    eprintln!("fast ping across ruleset changes: {burst}");
    let rtts = ping_rtts(r0, &wan1, 3);
    assert_eq!(rtts.len(), 3, "ping lost packets after ruleset changes");
    assert!(rtts.iter().all(|r| *r >= 2 * delay), "{rtts:?}");

    let stun = StunServer::start(lab.internet(), SocketAddr::new(lab.server_addr(), 3478));
    let sock = udp(&lab.node(node).ns, PORT);
    let t = Instant::now();
    let ext = mapped(&sock, stun.addr());
    let took = t.elapsed();
    eprintln!("STUN round trip behind one delayed router: {took:?}, mapped {ext}");
    assert!(took >= delay, "{took:?}");
    assert_eq!(ext.ip(), lab.wan_addr(sites[0]).expect("wan"));

    let rules = |r: &Netns| {
        r.ok(&[
            "iptables-legacy",
            "-w",
            "5",
            "-t",
            "raw",
            "-S",
            "PREROUTING",
        ])
    };
    assert!(rules(r0).contains("NFQUEUE"), "{}", rules(r0));
    lab.set_wan_delay(sites[0], Duration::ZERO);
    assert!(!rules(r0).contains("NFQUEUE"), "{}", rules(r0));
    assert_eq!(lab.wan_delay(sites[0]), (Duration::ZERO, 0));
    // Undelayed again: the answer still comes (no packet is lost on removal).
    assert!(stun_binding(&sock, stun.addr(), STUN_TIMEOUT).is_ok());
    // And delayed once more: the queue was released although a child
    // started meanwhile (as a lab starts daemons) holds a copy of the
    // holder's socket.
    lab.set_wan_delay(sites[0], delay);
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .expect("sleep");
    let _reaped = Reap(&mut child);
    lab.set_wan_delay(sites[0], Duration::ZERO);
    lab.set_wan_delay(sites[0], delay);
    let t = Instant::now();
    assert!(stun_binding(&sock, stun.addr(), STUN_TIMEOUT).is_ok());
    assert!(t.elapsed() >= delay, "{:?}", t.elapsed());
    lab.set_wan_delay(sites[0], Duration::ZERO);
    let threads = |name: &str| {
        std::fs::read_dir("/proc/self/task")
            .expect("tasks")
            .flatten()
            .filter(|t| {
                std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim_end() == name)
            })
            .count()
    };
    // Thread names are cut to 15 bytes: "d" and the router's name fit,
    // so no other lab's delay line (tests run in parallel) is counted.
    let r1_thread = format!("d{}", lab.router(sites[1]).expect("router").name());
    assert!(r1_thread.len() <= 15, "{r1_thread}");
    assert_eq!(threads(&r1_thread), 1, "the other site's holder runs");
    drop(stun);
    drop(lab);
    assert_eq!(threads(&r1_thread), 0, "a holder outlived the lab");
}

/// Kills and reaps a child on drop, whatever the test's outcome.
struct Reap<'a>(&'a mut std::process::Child);

impl Drop for Reap<'_> {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Round-trip times of `count` pings from `ns` to `dst`, user to user
/// (`-U`): by default ping takes the reply's receive time from the kernel's
/// timestamp, set before the packet is queued, which leaves out a delay on
/// the way in.
fn ping_rtts(ns: &Netns, dst: &str, count: u32) -> Vec<Duration> {
    let out = run_bounded(
        ns.command(&[
            "ping",
            "-n",
            "-U",
            "-c",
            &count.to_string(),
            "-i",
            "0.2",
            "-W",
            "2",
            dst,
        ]),
        b"",
        Duration::from_secs(20),
    );
    out.stdout
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.split_whitespace().next()?.parse::<f64>().ok())
        .map(|ms| Duration::from_secs_f64(ms / 1000.0))
        .collect()
}

/// Case 3: the default lab router, with a stateful input firewall on the
/// WAN. The early datagram is dropped in the input hook before its
/// conntrack entry is confirmed, so no entry remains, B's mapping keeps
/// port 5800, and sequential punching works in either order.
#[test]
fn punch_sequential_succeeds_with_router_firewall() {
    for order in [Order::AFirst, Order::BFirst] {
        let p = pair(PRC, [true, true]);
        let o = p.punch(order, Duration::from_millis(100), 5, false);
        eprintln!("{}", o.log);
        assert_direct(&p, &o);
        // Only the first datagram (sent before the peer had a mapping) is
        // lost.
        assert_eq!(o.got[0].len() + o.got[1].len(), 11, "{}", o.log);
    }
}

/// Case 4a: a raw `ct state new drop` of WAN traffic in a prerouting
/// filter chain (after conntrack, before NAT) works the same way.
#[test]
fn punch_sequential_succeeds_with_prerouting_new_drop() {
    let p = pair(PRC, [false, false]);
    for s in p.sites {
        let r = p.lab.router(s).expect("router");
        r.ok(&["nft", "add", "table", "inet", "pre"]);
        r.ok(&[
            "nft",
            "add chain inet pre pre { type filter hook prerouting priority -150; policy accept; }",
        ]);
        r.ok(&["nft", "add rule inet pre pre iifname wan ct state new drop"]);
    }
    let o = p.punch(Order::AFirst, Duration::from_millis(100), 5, false);
    eprintln!("{}", o.log);
    assert_direct(&p, &o);
}

/// Case 4b: only the router of the side that sends *second* matters: its
/// firewall must drop the early datagram. With one open router, punching
/// works when the open side sends first and fails the other way round.
#[test]
fn punch_only_the_second_senders_router_matters() {
    // A's router firewalled, B's open.
    let p = pair(PRC, [true, false]);
    let o = p.punch(Order::BFirst, Duration::from_millis(100), 5, false);
    eprintln!("{}", o.log);
    assert_direct(&p, &o);
    let p = pair(PRC, [true, false]);
    let o = p.punch(Order::AFirst, Duration::from_millis(100), 5, true);
    eprintln!("{}", o.log);
    assert!(o.nothing(), "{}", o.log);
    assert!(p.unsolicited_entry_at(1), "{}", o.log);
}

/// Case 4c: after a failed attempt, both sides stay silent longer than the
/// routers' UDP timeout (all entries expire), then punch again in the
/// other order: that works when the new second sender's router filters.
#[test]
fn punch_retry_after_udp_timeout_in_the_other_order() {
    let p = pair(PRC, [true, false]);
    for s in p.sites {
        p.lab.set_udp_timeout(s, 1);
    }
    let o = p.punch(Order::AFirst, Duration::from_millis(100), 3, true);
    assert!(o.nothing(), "{}", o.log);
    sleep(Duration::from_millis(2500));
    // The STUN flows were created before the timeout was shortened and
    // remain; every entry between the two sites is gone.
    for (site, peer) in [(0, 1), (1, 0)] {
        let after = p.lab.conntrack_list(p.sites[site]);
        let peer_ip = format!("={} ", p.ext[peer].ip());
        assert!(
            !after.contains(&peer_ip),
            "entries left after the timeout:\n{after}"
        );
    }
    // The usual timeout again, so a stalled test thread cannot let the
    // new flows expire halfway through the punch.
    for s in p.sites {
        p.lab.set_udp_timeout(s, 30);
    }
    let o = p.punch(Order::BFirst, Duration::from_millis(100), 3, false);
    eprintln!("{}", o.log);
    assert_direct(&p, &o);
}

/// Case 4d: with a full cone on one side (endpoint-independent filtering),
/// the quirk still moves B's port, but A's router lets B's datagram from
/// the new port in; A learns it (peer-reflexive) and answers there. Without
/// learning, B never hears from A.
#[test]
fn punch_full_cone_side_learns_the_moved_port() {
    let kinds = [NatType::FullCone, NatType::PortRestrictedCone];
    let p = pair(kinds, [false, false]);
    let o = p.punch(Order::AFirst, Duration::from_millis(100), 5, false);
    eprintln!("{}", o.log);
    assert!(!o.got[0].is_empty() && o.got[1].is_empty(), "{}", o.log);
    let moved = o.got[0][0].1;
    assert_ne!(moved, p.ext[1], "B's port did not move");

    let p = pair(kinds, [false, false]);
    let o = p.punch(Order::AFirst, Duration::from_millis(100), 5, true);
    eprintln!("{}", o.log);
    assert!(o.both_ways(), "{}", o.log);
    assert!(o.got[0].iter().all(|(_, f)| f.port() != PORT), "{}", o.log);
}

// ---------------------------------------------------------------------------
// Port mapping: the overlay core's PCP/NAT-PMP client against Debian's
// miniupnpd in a `NatType::Upnp` router.

/// Drives `pm` on `sock` until `done` says so or `within` passes.
fn drive(
    pm: &mut evio_overlay::portmap::PortMapper,
    sock: &UdpSocket,
    within: Duration,
    done: impl Fn(&evio_overlay::portmap::PortMapper) -> bool,
) -> Vec<evio_overlay::portmap::MapEvent> {
    let end = Instant::now() + within;
    let mut events = Vec::new();
    let mut buf = [0u8; 1100];
    while Instant::now() < end && !done(pm) {
        while let Some(d) = pm.poll_transmit() {
            sock.send_to(&d, pm.server()).unwrap();
        }
        events.extend(std::iter::from_fn(|| pm.poll_event()));
        if done(pm) {
            break;
        }
        let wake = pm.poll_timeout().unwrap_or(end).min(end);
        let left = wake.saturating_duration_since(Instant::now());
        sock.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => pm.handle_datagram(Instant::now(), from, &buf[..n]),
            Err(_) => pm.handle_timeout(Instant::now()),
        }
    }
    events.extend(std::iter::from_fn(|| pm.poll_event()));
    events
}

/// A `NatType::Upnp` router filters like a port-restricted cone until its
/// miniupnpd grants a PCP mapping; then a stranger on the internet reaches
/// the node there. The mapping is renewed (the lab grants 20 s), and gone
/// from miniupnpd's leases and nftables after the client deletes it.
/// NAT-PMP against the same daemon gives the same address.
#[test]
fn miniupnpd_router_grants_pcp_and_natpmp_mappings() {
    use evio_overlay::portmap::{natpmp, MapEvent, PortMapConfig, PortMapper, Protocol};
    let t0 = Instant::now();
    let (lab, s, n) = lab_with(NatType::Upnp);
    let node = lab.node(n);
    let std::net::IpAddr::V4(me) = node.addr else {
        panic!()
    };
    let wan = lab.wan_addr(s).unwrap();
    let sock = udp(&node.ns, PORT);
    let stranger = udp(lab.internet(), 0);
    let ext = SocketAddr::new(wan, PORT);
    assert!(!arrives(&stranger, ext, &sock, "before"), "filtered before");
    let ctl = node.ns.udp_bind(any(0)).unwrap();
    let cfg = PortMapConfig {
        gateway: std::net::Ipv4Addr::new(192, 168, 1, 1),
        client: me,
        internal_port: PORT,
        lifetime: 7200,
    };
    let mut pm = PortMapper::new(Instant::now(), cfg, [5; 12]);
    let ev = drive(&mut pm, &ctl, Duration::from_secs(5), |p| {
        p.mapped().is_some()
    });
    let up = lab.miniupnpd(s).unwrap();
    let Some(MapEvent::Mapped {
        protocol,
        external,
        lifetime,
    }) = ev.first().cloned()
    else {
        panic!("{ev:?}\n{}", up.log())
    };
    assert_eq!((protocol, SocketAddr::V4(external)), (Protocol::Pcp, ext));
    assert_eq!(lifetime, 20, "miniupnpd's max_lifetime");
    assert!(
        up.leases()
            .iter()
            .any(|l| l.starts_with("UDP:5800:") && l.contains("PCP")),
        "{:?}",
        up.leases()
    );
    assert!(arrives(&stranger, ext, &sock, "through the mapping"));
    // Renewed at 10 s: still mapped, no event, past the first lifetime.
    let ev = drive(&mut pm, &ctl, Duration::from_secs(11), |_| false);
    assert!(ev.is_empty(), "{ev:?}");
    assert!(arrives(&stranger, ext, &sock, "after the renewal"));
    pm.shutdown(Instant::now());
    drive(&mut pm, &ctl, Duration::from_secs(3), |p| p.is_done());
    assert!(pm.is_done());
    assert!(up.leases().is_empty(), "{:?}", up.leases());
    assert!(up.nft_forwards().is_empty(), "{:?}", up.nft_forwards());
    lab.flush_conntrack(s);
    assert!(!arrives(&stranger, ext, &sock, "after"), "filtered again");
    // NAT-PMP, by its codec: the same external address and port.
    ctl.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let gw = pm.server();
    let mut buf = [0u8; 64];
    ctl.send_to(&natpmp::address_request(), gw).unwrap();
    let (len, _) = ctl.recv_from(&mut buf).unwrap();
    let addr = natpmp::parse_response(&buf[..len]);
    assert!(
        matches!(addr, Some(natpmp::Response::Address { result: 0, ip, .. }) if std::net::IpAddr::V4(ip) == wan),
        "{addr:?}"
    );
    ctl.send_to(&natpmp::map_request(PORT, PORT, 60), gw)
        .unwrap();
    let (len, _) = ctl.recv_from(&mut buf).unwrap();
    let map = natpmp::parse_response(&buf[..len]);
    assert!(
        matches!(
            map,
            Some(natpmp::Response::Map {
                result: 0,
                external_port: PORT,
                ..
            })
        ),
        "{map:?}"
    );
    assert!(arrives(&stranger, ext, &sock, "through NAT-PMP's mapping"));
    ctl.send_to(&natpmp::map_request(PORT, 0, 0), gw).unwrap();
    ctl.recv_from(&mut buf).unwrap();
    assert!(up.leases().is_empty(), "{:?}", up.leases());
    eprintln!("took {:?}", t0.elapsed());
}
