//! The per-node OVS launcher itself: isolated instances, restartable
//! daemons, nothing left running.

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
    drop(ovs);
    assert!(!dir.exists());
}
