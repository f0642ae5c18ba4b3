//! The plugin on the Linux-bridge backend (`"bridgeType": "linux"`), run as
//! a runtime runs it inside a node netns against the real host-local.
//! The shared behaviour bodies live in common/behaviour.rs; ovs_bridge.rs
//! runs the same suite with `Backend::Ovs`. Linux-bridge-only details
//! (kernel bridge kind, hairpin, name clashes) are below.
// A test that unwraps fails loudly, which is what a test should do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

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

/// evio turns netfilter on for its own bridge, per bridge: with the node
/// netns's global `bridge-nf-call-*` at 0 the new bridge has
/// `nf_call_iptables` and `nf_call_ip6tables` on, and an ADD turns them
/// back on when someone turned them off.
#[test]
fn the_bridge_gets_its_own_netfilter_options() {
    let f = Fixture::new(Backend::Linux);
    f.node
        .ok(&["sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=0"]);
    f.node
        .ok(&["sysctl", "-qw", "net.bridge.bridge-nf-call-ip6tables=0"]);
    let nf = |f: &Fixture| {
        let l = link(&f.node, &f.bridge).unwrap_or_else(|| panic!("no bridge"));
        let d = &l["linkinfo"]["info_data"];
        (
            d["nf_call_iptables"].as_u64(),
            d["nf_call_ip6tables"].as_u64(),
        )
    };
    f.add_ok(&Pod::new(), &f.conf());
    assert_eq!(nf(&f), (Some(1), Some(1)));
    f.node.ok(&[
        "ip",
        "link",
        "set",
        &f.bridge,
        "type",
        "bridge",
        "nf_call_iptables",
        "0",
        "nf_call_ip6tables",
        "0",
    ]);
    assert_eq!(nf(&f), (Some(0), Some(0)));
    f.add_ok(&Pod::new(), &f.conf());
    assert_eq!(nf(&f), (Some(1), Some(1)), "repaired by the next ADD");
    // The machine-wide (per-netns) sysctl was left as it was.
    assert_eq!(
        f.node
            .ok(&["sysctl", "-n", "net.bridge.bridge-nf-call-iptables"])
            .trim(),
        "0"
    );
}

/// A kernel without bridge netfilter (simulated honestly: the real plugin
/// runs in a private mount namespace where /proc/sys/net/bridge, which the
/// br_netfilter module creates, is hidden under an empty tmpfs): STATUS is
/// 50 and ADD is 11, both naming `modprobe br_netfilter`, and ADD leaves
/// nothing behind (no bridge, no address taken).
#[test]
fn without_bridge_netfilter_status_and_add_refuse_and_name_the_fix() {
    use std::os::unix::fs::PermissionsExt;
    let f = Fixture::new(Backend::Linux);
    let script = f.dir.path().join("evio-without-br-netfilter");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nexec unshare --mount --propagation private sh -c \
             'mount -t tmpfs none /proc/sys/net/bridge && exec \"$0\" \"$@\"' {} \"$@\"\n",
            common::plugin_bin().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut cni = f.cni();
    cni.bin = script;
    let c = f.conf();
    let status = cni.run("STATUS", "", None, "", None, &c.json());
    status.expect_error_code("STATUS without br_netfilter", 50);
    assert!(
        status.error_text().contains("modprobe br_netfilter"),
        "{}",
        status.error_text()
    );
    let pod = Pod::new();
    let add = cni.run(
        "ADD",
        &pod.id,
        Some(&pod.path()),
        &pod.ifname,
        Some(&pod.k8s_args()),
        &c.json(),
    );
    add.expect_error_code("ADD without br_netfilter", 11);
    assert!(
        add.error_text().contains("modprobe br_netfilter"),
        "{}",
        add.error_text()
    );
    assert!(!f.node.has_link(&f.bridge), "ADD created the bridge");
    assert!(f.allocations().is_empty(), "ADD took an address");
    // The same plugin on the real /proc: both fine.
    assert!(f.status(&c).success(), "STATUS with br_netfilter");
    f.add_ok(&pod, &c);
}
