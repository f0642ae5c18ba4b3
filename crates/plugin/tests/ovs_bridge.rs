//! The plugin on the Open vSwitch backend (`"bridgeType": "ovs"`): the same
//! behaviour suite as linux_bridge.rs, each test with its own OVS instance
//! (ovsdb-server + ovs-vswitchd) inside its node netns. This machine has no
//! OVS kernel module, so the plugin must pick the userspace datapath (and
//! turn TX checksum offload off, or the TCP tests fail while ping works).

mod common;

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
