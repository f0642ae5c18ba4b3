//! The plugin on the Linux-bridge backend (`"bridgeType": "linux"`), run as
//! a runtime runs it inside a node netns against the real host-local.
//! The shared behaviour bodies live in common/behaviour.rs; an OVS test file
//! runs the same list with `Backend::Ovs`.

mod common;

use common::{backend_tests, host_veth, Backend, Fixture};
use evio_testkit::plugin::{link, Pod};

backend_tests!(Backend::Linux =>
    add_result_shape_v0_3_0,
    add_result_shape_v0_3_1,
    add_result_shape_v0_4_0,
    add_result_shape_v1_0_0,
    add_result_shape_v1_1_0,
    add_configures_pod_and_node,
    add_without_default_gateway_adds_no_default_route,
    is_gateway_false_puts_no_address_on_bridge,
    fifteen_byte_ifname_is_accepted,
    host_veth_name_is_deterministic,
    second_ifname_for_same_container_is_independent,
    pod_reaches_gateway_by_ping_and_tcp,
    pods_reach_each_other_by_ping_and_tcp,
    check_passes_after_add,
    check_fails_after_pod_lost_its_address,
    check_fails_when_host_veth_left_the_bridge,
    check_fails_when_pod_interface_is_gone,
    del_twice_succeeds_and_releases_everything,
    del_after_netns_is_gone_releases_veth_and_address,
    del_without_netns_releases_address_and_veth,
    ipam_exhaustion_rolls_back_everything,
    failure_after_ipam_releases_allocation,
    add_to_missing_netns_fails_and_keeps_nothing,
    duplicate_add_fails_and_existing_pod_keeps_working,
    parallel_adds_and_dels_leave_nothing_behind,
    parallel_first_adds_on_fresh_node_do_not_race,
    gc_valid_attachments_releases_stale_pod_and_keeps_live_one,
    gc_legacy_attachments_key_releases_stale_pod_and_keeps_live_one,
    status_is_ok_with_host_local,
    status_is_50_when_ipam_plugin_is_missing,
    ip_masq_installs_masquerade_for_pod_cidr,
    is_ip_masq_alias_installs_masquerade,
    ip_masq_lets_pod_reach_network_without_route_back,
    ipv6_add_gives_usable_address,
    dual_stack_add_configures_both_families,
);

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
