//! The per-node OVS launcher itself: isolated instances, restartable
//! daemons, nothing left running.
// A test that unwraps fails loudly, which is what a test should do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use evio_testkit::netns::Netns;
use evio_testkit::ovs::Ovs;

#[test]
fn starts_isolated_and_cleans_up() {
    let ns = Netns::new("ovk");
    let mut ovs = Ovs::start(&ns);
    let dir = ovs.dir().to_path_buf();
    ovs.vsctl(&[
        "add-br",
        "brk",
        "--",
        "set",
        "bridge",
        "brk",
        "datapath_type=netdev",
    ]);
    assert!(
        ns.has_link("brk"),
        "internal port not created in the node netns"
    );
    assert!(
        dir.join("brk.mgmt").exists(),
        "bridge mgmt socket not in run dir"
    );
    ovs.kill_vswitchd();
    assert!(!ovs.vswitchd_running());
    ovs.start_vswitchd();
    ovs.kill_ovsdb();
    assert!(!ovs.try_vsctl(&["show"]).status.success());
    ovs.start_ovsdb();
    assert!(
        ovs.vsctl(&["list-br"]).contains("brk"),
        "db lost across restart"
    );
    assert!(ovs
        .appctl("vswitchd", &["version"])
        .contains("Open vSwitch"));

    // Crashes leave stale sockets and pid files; restarts must cope.
    ovs.crash_vswitchd();
    ovs.start_vswitchd();
    assert!(ovs
        .appctl("vswitchd", &["version"])
        .contains("Open vSwitch"));
    ovs.crash_ovsdb();
    assert!(!ovs.try_vsctl(&["show"]).status.success());
    ovs.start_ovsdb();
    assert!(ovs.vsctl(&["list-br"]).contains("brk"));
    drop(ovs);
    assert!(!dir.exists());
}

#[test]
fn instances_are_independent() {
    let (ns1, ns2) = (Netns::new("ovi"), Netns::new("ovi"));
    let a = Ovs::start(&ns1);
    let mut b = Ovs::start(&ns2);
    assert_ne!(a.db_sock(), b.db_sock());
    a.vsctl(&[
        "add-br",
        "bra",
        "--",
        "set",
        "bridge",
        "bra",
        "datapath_type=netdev",
    ]);
    assert!(b.vsctl(&["list-br"]).trim().is_empty());
    assert!(ns1.has_link("bra") && !ns2.has_link("bra"));
    b.kill_vswitchd();
    b.kill_ovsdb();
    // Stopping one leaves the other serving.
    a.vsctl(&[
        "add-port",
        "bra",
        "pa",
        "--",
        "set",
        "Interface",
        "pa",
        "type=internal",
    ]);
    assert_eq!(a.vsctl(&["list-ports", "bra"]).trim(), "pa");
}
