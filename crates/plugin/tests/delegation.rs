//! The plugin against what lies outside its process: its IPAM delegate
//! (hanging, or evio itself), host-local's directory and the log file (not
//! what their names claim), and veths an interrupted ADD left untagged.
//! Each test would hang or leave state behind without the guard it tests;
//! every wait here is bounded (the harness kills a plugin after 30 s).
// A test that unwraps fails loudly, which is what a test should do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{plugin_bin, Backend, Fixture};
use evio_plugin::naming::host_veth_name;
use evio_testkit::plugin::{link, nft_ruleset, test_dir, Cni, Pod};
use nix::sys::stat::Mode;
use serde_json::json;

/// A `Cni` whose `CNI_PATH` starts with `dir`.
fn cni_with<'a>(f: &'a Fixture, dir: &Path) -> Cni<'a> {
    let mut cni = f.cni();
    cni.cni_path = format!("{}:{}", dir.display(), cni.cni_path);
    cni
}

fn write_script(path: &Path, body: &str) {
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// Whether `pid` has exited (gone, or a zombie waiting for its reaper).
fn exited(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

fn wait_exited(pid_file: &Path, what: &str) {
    let pid: i32 = std::fs::read_to_string(pid_file)
        .unwrap_or_else(|e| panic!("{what}: {}: {e}", pid_file.display()))
        .trim()
        .parse()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !exited(pid) {
        assert!(
            Instant::now() < deadline,
            "{what} (pid {pid}) is still running"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn ev_links(f: &Fixture) -> Vec<String> {
    f.node
        .links()
        .into_iter()
        .filter(|l| l.len() == 15 && l.starts_with("ev"))
        .collect()
}

/// An IPAM plugin that takes an address (a marker file) and then hangs,
/// with a child of its own that hangs too. ADD must fail with code 11 once
/// `ipamTimeoutSeconds` has passed, with the delegate and its child killed,
/// the address released by the rollback's DEL, and nothing else left: no
/// veth, no pod interface, no masquerade.
fn hanging_ipam(b: Backend) {
    let f = Fixture::new(b);
    let bin = test_dir("evio-hang-ipam");
    let dir = bin.path();
    write_script(
        &dir.join("hang-ipam"),
        r#"d=$(dirname "$0")
case "$CNI_COMMAND" in
ADD)
    echo "$CNI_CONTAINERID" > "$d/allocated"
    echo $$ > "$d/ipam.pid"
    sleep 1000 &
    echo $! > "$d/child.pid"
    wait
    ;;
DEL) rm -f "$d/allocated" ;;
VERSION) echo '{"cniVersion":"1.1.0","supportedVersions":["1.0.0","1.1.0"]}' ;;
esac"#,
    );
    let c = f
        .conf()
        .ipam_type("hang-ipam")
        .ip_masq(true)
        .set("ipamTimeoutSeconds", json!(1));
    let pod = Pod::new();
    let out = cni_with(&f, dir).run(
        "ADD",
        &pod.id,
        Some(&pod.path()),
        &pod.ifname,
        Some(&pod.k8s_args()),
        &c.json(),
    );
    assert!(!out.timed_out, "ADD hung with its IPAM delegate: {out}");
    out.expect_error_code("ADD with a hanging IPAM plugin", 11);
    assert!(out.error_text().contains("did not finish"), "{out}");
    wait_exited(&dir.join("ipam.pid"), "the hanging IPAM plugin");
    wait_exited(&dir.join("child.pid"), "the IPAM plugin's child");
    assert!(
        !dir.join("allocated").exists(),
        "the rollback did not release the delegate's address"
    );
    assert_eq!(ev_links(&f), Vec::<String>::new(), "host veth left");
    assert!(link(&pod.ns, &pod.ifname).is_none(), "pod interface left");
    if let Some(ports) = f.ovs_ports() {
        assert!(ports.list().is_empty(), "OVS port left: {:?}", ports.list());
    }
    assert!(
        !nft_ruleset(&f.node).contains(&format!("masq-{}", f.net)),
        "masquerade left"
    );
}

#[test]
fn hanging_ipam_is_killed_and_add_rolls_back_linux_bridge() {
    hanging_ipam(Backend::Linux);
}

#[test]
fn hanging_ipam_is_killed_and_add_rolls_back_ovs() {
    hanging_ipam(Backend::Ovs);
}

/// `ipam.type` naming evio itself is refused before anything is done; a
/// renamed copy (a symlink to evio under another name) is stopped after one
/// level by the delegation depth. Without the guards the plugin executed
/// itself until the harness killed it (or the node ran out of processes).
#[test]
fn evio_as_its_own_ipam_is_refused() {
    let f = Fixture::new(Backend::Linux);
    let pod = Pod::new();
    let run = |cni: &Cni, c: &serde_json::Value| {
        cni.run(
            "ADD",
            &pod.id,
            Some(&pod.path()),
            &pod.ifname,
            Some(&pod.k8s_args()),
            c,
        )
    };
    let own = run(&f.cni(), &f.conf().ipam_type("evio").json());
    assert!(!own.timed_out, "{own}");
    own.expect_error_code("ipam.type evio", 7);
    assert!(own.error_text().contains("itself"), "{own}");

    let bin = test_dir("evio-self-ipam");
    std::os::unix::fs::symlink(plugin_bin(), bin.path().join("not-evio")).unwrap();
    let renamed = run(
        &cni_with(&f, bin.path()),
        &f.conf().ipam_type("not-evio").json(),
    );
    assert!(!renamed.timed_out, "{renamed}");
    renamed.expect_error_code("ipam.type a renamed evio", 7);
    assert!(
        renamed.error_text().contains("evio_delegation_depth"),
        "{renamed}"
    );
    assert_eq!(ev_links(&f), Vec::<String>::new());
    assert!(f.allocations().is_empty());
}

/// A FIFO, a symlink to /dev/zero and an oversized file named like
/// allocations in host-local's directory: GC finishes (it used to block on
/// the FIFO, or read /dev/zero without end, holding host-local's lock),
/// leaves them alone and still releases the real stale allocation.
#[test]
fn gc_survives_hostile_host_local_entries() {
    let f = Fixture::new(Backend::Linux);
    let c = f.conf();
    let stale = Pod::new();
    let res = f.add_ok(&stale, &c);
    let ip = common::pod_ip(&res, 4).to_string();
    let dir: PathBuf = f.data_dir().join(&f.net);
    assert!(dir.join(&ip).exists());
    nix::unistd::mkfifo(&dir.join("10.244.3.200"), Mode::from_bits_truncate(0o600)).unwrap();
    std::os::unix::fs::symlink("/dev/zero", dir.join("10.244.3.201")).unwrap();
    std::fs::write(dir.join("10.244.3.202"), vec![b'x'; 1 << 20]).unwrap();

    let out = f.gc(&c, "cni.dev/valid-attachments", &[]);
    assert!(!out.timed_out, "GC hung on a hostile entry: {out}");
    out.expect_success("GC with hostile entries in host-local's directory");
    // (Not f.allocations(): the test's own reader would block on the FIFO.)
    assert!(
        !dir.join(&ip).exists(),
        "the stale allocation {ip} was kept"
    );
    for name in ["10.244.3.200", "10.244.3.201", "10.244.3.202"] {
        assert!(
            dir.join(name).symlink_metadata().is_ok(),
            "{name} is not GC's to remove"
        );
    }
}

/// host-local's lock held by a stuck process: GC gives up with code 11
/// instead of waiting for ever.
#[test]
fn gc_gives_up_on_a_held_host_local_lock() {
    let f = Fixture::new(Backend::Linux);
    let c = f.conf();
    f.warm_up(&c);
    let lock = std::fs::OpenOptions::new()
        .write(true)
        .open(f.data_dir().join(&f.net).join("lock"))
        .unwrap();
    let _held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive).unwrap();
    let out = f.gc(&c, "cni.dev/valid-attachments", &[]);
    assert!(!out.timed_out, "GC waited for the lock: {out}");
    out.expect_error_code("GC with host-local's lock held", 11);
}

/// `logFile` a FIFO nobody reads (used to block every command) or a symlink
/// (used to redirect the plugin's writes): the command still works, the log
/// is not used, and the symlink's target is untouched.
#[test]
fn log_file_that_is_no_regular_file_is_not_used() {
    let f = Fixture::new(Backend::Linux);
    let d = test_dir("evio-logfile");
    let fifo = d.path().join("fifo.log");
    nix::unistd::mkfifo(&fifo, Mode::from_bits_truncate(0o600)).unwrap();
    let target = d.path().join("elsewhere");
    std::fs::write(&target, "").unwrap();
    let link = d.path().join("link.log");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    for log in [&fifo, &link] {
        let c = f.conf().set("logFile", json!(log.display().to_string()));
        let pod = Pod::new();
        let out = f.del(&pod, &c, None);
        assert!(
            !out.timed_out,
            "blocked on logFile {}: {out}",
            log.display()
        );
        out.expect_success(&format!("DEL with logFile {}", log.display()));
        assert!(out.stderr.contains("logFile"), "{out}");
    }
    assert_eq!(std::fs::read(&target).unwrap(), b"");
}

/// A veth named as evio names host veths, untagged and on no bridge (an ADD
/// killed between creating it and tagging it) is removed by GC, and by name
/// alone; look-alikes are not: a foreign alias, a bridge port, another kind,
/// another name shape, and the untagged veth of a still valid attachment.
#[test]
fn gc_removes_untagged_host_veths_and_spares_look_alikes() {
    let f = Fixture::new(Backend::Linux);
    let c = f.conf();
    f.warm_up(&c);
    let n = &f.node;
    let stale = host_veth_name("killed-add", "eth0");
    let valid = host_veth_name("still-adding", "eth0");
    let aliased = host_veth_name("foreign-alias", "eth0");
    let ported = host_veth_name("foreign-port", "eth0");
    let other_kind = host_veth_name("foreign-bridge", "eth0");
    let upper = "ev0123456789ABC";
    for (name, peer) in [
        (stale.as_str(), "pk0"),
        (valid.as_str(), "pk1"),
        (aliased.as_str(), "pk2"),
        (ported.as_str(), "pk3"),
        (upper, "pk4"),
    ] {
        n.ok(&[
            "ip", "link", "add", name, "type", "veth", "peer", "name", peer,
        ]);
    }
    n.ok(&["ip", "link", "add", &other_kind, "type", "bridge"]);
    n.ok(&[
        "ip",
        "link",
        "set",
        "dev",
        &aliased,
        "alias",
        "someone else's",
    ]);
    n.ok(&["ip", "link", "add", "evforeignbr", "type", "bridge"]);
    n.ok(&["ip", "link", "set", "dev", &ported, "master", "evforeignbr"]);

    f.gc(&c, "cni.dev/valid-attachments", &[("still-adding", "eth0")])
        .expect_success("GC");
    let left = n.links();
    assert!(!left.contains(&stale), "untagged veth of a dead ADD left");
    for keep in [&valid, &aliased, &ported, &other_kind, &upper.to_string()] {
        assert!(left.contains(keep), "GC removed {keep}, which it must not");
    }
}
