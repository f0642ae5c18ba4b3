//! The plugin on the Linux-bridge backend (`"bridgeType": "linux"`), run as
//! a runtime runs it inside a node netns against the real host-local.
//! The shared behaviour bodies live in common/behaviour.rs; ovs_bridge.rs
//! runs the same suite with `Backend::Ovs`. Linux-bridge-only details
//! (kernel bridge kind, hairpin, name clashes) are below.
// A test that unwraps fails loudly, which is what a test should do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{behaviour_suite, host_veth, Backend, Fixture};
use evio_testkit::plugin::{link, Pod};

behaviour_suite!(Backend::Linux);

fn slave_data(f: &Fixture, veth: &str) -> serde_json::Value {
    let l = link(&f.node, veth).unwrap_or_else(|| panic!("no host veth {veth}"));
    l["linkinfo"]["info_slave_data"].clone()
}

#[test]
fn linux_backend_creates_a_kernel_bridge() {
    let f = Fixture::new(Backend::Linux);
    let pod = Pod::new();
    f.add_ok(&pod, &f.conf());
    let l = link(&f.node, &f.bridge).unwrap_or_else(|| panic!("no bridge {}", f.bridge));
    assert_eq!(l["linkinfo"]["info_kind"].as_str(), Some("bridge"), "{l}");
}

#[test]
fn lxbr_spelling_selects_the_linux_bridge() {
    let f = Fixture::new(Backend::Linux);
    let pod = Pod::new();
    f.add_ok(&pod, &f.conf().bridge_type("LXBR"));
    let l = link(&f.node, &f.bridge).unwrap_or_else(|| panic!("no bridge {}", f.bridge));
    assert_eq!(l["linkinfo"]["info_kind"].as_str(), Some("bridge"), "{l}");
}

#[test]
fn hairpin_mode_sets_hairpin_on_the_host_port() {
    let f = Fixture::new(Backend::Linux);
    let on = Pod::new();
    let off = Pod::new();
    let r_on = f.add_ok(&on, &f.conf().hairpin_mode(true));
    let r_off = f.add_ok(&off, &f.conf());
    let d_on = slave_data(&f, &host_veth(&r_on, &f.bridge));
    let d_off = slave_data(&f, &host_veth(&r_off, &f.bridge));
    assert_eq!(
        d_on["hairpin"].as_bool(),
        Some(true),
        "hairpinMode true: {d_on}"
    );
    assert_eq!(d_off["hairpin"].as_bool(), Some(false), "default: {d_off}");
}

#[test]
fn existing_bridge_is_reused() {
    let f = Fixture::new(Backend::Linux);
    f.node
        .ok(&["ip", "link", "add", &f.bridge, "type", "bridge"]);
    let idx = link(&f.node, &f.bridge).map(|l| l["ifindex"].clone());
    let pod = Pod::new();
    let res = f.add_ok(&pod, &f.conf());
    assert_eq!(
        link(&f.node, &f.bridge).map(|l| l["ifindex"].clone()),
        idx,
        "the existing bridge was replaced"
    );
    f.assert_port_on_bridge(&host_veth(&res, &f.bridge));
}

/// A link with the bridge's name that is not a bridge is an error, and the
/// ADD leaves nothing (and that link) as it found it.
#[test]
fn non_bridge_link_with_bridge_name_fails_add_cleanly() {
    let f = Fixture::new(Backend::Linux);
    // A veth, as this kernel has no dummy driver.
    let peer = format!("{}p", &f.bridge[..f.bridge.len().min(14)]);
    f.node.ok(&[
        "ip", "link", "add", &f.bridge, "type", "veth", "peer", "name", &peer,
    ]);
    let pod = Pod::new();
    let before = f.leaks(&[&pod.ns]);
    f.add(&pod, &f.conf())
        .expect_error("ADD when the bridge name is taken by a veth");
    before.assert_no_leaks(
        &f.leaks(&[&pod.ns]),
        "after ADD failed on a non-bridge link",
    );
    let l = link(&f.node, &f.bridge).unwrap_or_default();
    assert_eq!(l["linkinfo"]["info_kind"].as_str(), Some("veth"), "{l}");
}
