//! A real container runtime drives the plugin: Debian's podman 4.3 with the
//! CNI backend, run inside a simulated node's netns, reads the conflist
//! config-gen wrote and execs `evio` unmodified. Its own test binary: it
//! makes the test process a child subreaper to collect podman's daemonised
//! conmon processes, which nobody else would reap here.
// A test that unwraps fails loudly, which is what a test should do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use evio_testkit::cluster::{network_of, BridgeType, Cluster, SimNode, CONFLIST};
use evio_testkit::netns::Netns;
use evio_testkit::plugin::{files_under, ipam_allocations, run_bounded, CniOutput, OvsPorts};
use evio_testkit::process::{self, processes};
use evio_testkit::services::{ClusterIps, Endpoint, Mode};

const TIMEOUT: Duration = Duration::from_secs(60);
const BUSYBOX_APPLETS: &[&str] = &[
    "sh", "ip", "ping", "nc", "sleep", "cat", "wc", "head", "echo", "ls", "netstat",
];

/// A podman confined to a temp dir: its storage, run state, locks, config
/// and the rootfs its containers use. Removes every container on drop.
struct Podman {
    dir: tempfile::TempDir,
    node_netns: PathBuf,
}

impl Podman {
    fn new(node: &SimNode, evio: &Path, network_config_dir: &Path) -> Podman {
        let dir = tempfile::Builder::new()
            .prefix("evio-podman-")
            .tempdir()
            .unwrap_or_else(|e| panic!("tempdir: {e}"));
        let d = dir.path();
        let plugins = d.join("cni-bin");
        let rootfs = d.join("rootfs");
        for sub in [&plugins, &rootfs.join("bin"), &rootfs.join("tmp")] {
            std::fs::create_dir_all(sub).unwrap_or_else(|e| panic!("{}: {e}", sub.display()));
        }
        // The node's CNI bin dir as a runtime sees it: our plugin plus the
        // reference plugins the conflist chains or delegates to.
        for (name, target) in [
            ("evio", evio.to_path_buf()),
            ("host-local", PathBuf::from("/usr/lib/cni/host-local")),
            ("portmap", PathBuf::from("/usr/lib/cni/portmap")),
        ] {
            std::os::unix::fs::symlink(&target, plugins.join(name))
                .unwrap_or_else(|e| panic!("symlink {name}: {e}"));
        }
        // No registry is reachable: the containers' root is busybox-static.
        std::fs::copy("/bin/busybox", rootfs.join("bin/busybox"))
            .unwrap_or_else(|e| panic!("copy busybox (install busybox-static): {e}"));
        for applet in BUSYBOX_APPLETS {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))
                .unwrap_or_else(|e| panic!("symlink {applet}: {e}"));
        }
        let conf = format!(
            r#"[containers]
# The defaults exceed this machine's hard limits.
default_ulimits = ["nofile=10000:10000", "nproc=4096:4096"]

[network]
network_backend = "cni"
cni_plugin_dirs = ["{plugins}"]
network_config_dir = "{netconf}"

[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
events_logger = "none"
tmp_dir = "{tmp}"
# File locks in our dir rather than the machine-wide /dev/shm segment.
lock_type = "file"
volume_path = "{volumes}"
"#,
            plugins = plugins.display(),
            netconf = network_config_dir.display(),
            tmp = d.join("tmp").display(),
            volumes = d.join("volumes").display(),
        );
        std::fs::write(d.join("containers.conf"), conf).unwrap_or_else(|e| panic!("{e}"));
        let storage = format!(
            "[storage]\ndriver = \"vfs\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n",
            d.join("root").display(),
            d.join("runroot").display()
        );
        std::fs::write(d.join("storage.conf"), storage).unwrap_or_else(|e| panic!("{e}"));
        Podman {
            dir,
            node_netns: node.ns.path(),
        }
    }

    fn rootfs(&self) -> PathBuf {
        self.dir.path().join("rootfs")
    }

    /// `podman ARGS` inside the node netns. `nsenter --net`, not `ip netns
    /// exec`: the latter remounts /sys and podman then finds no cgroups.
    fn command(&self, args: &[&str]) -> Command {
        let d = self.dir.path();
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.node_netns.display()))
            .arg("--")
            .arg("podman")
            .arg("--root")
            .arg(d.join("root"))
            .arg("--runroot")
            .arg(d.join("runroot"))
            .args(["--storage-driver", "vfs"])
            .args(["--runtime", "runc"])
            .args(["--cgroup-manager", "cgroupfs"])
            .args(args)
            .env("CONTAINERS_CONF", d.join("containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", d.join("storage.conf"));
        c
    }

    fn run(&self, args: &[&str]) -> CniOutput {
        run_bounded(self.command(args), b"", TIMEOUT)
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.success(), "podman {args:?}: {out}");
        out.stdout
    }

    /// Runs `sh -c SCRIPT` in a container.
    fn sh(&self, container: &str, script: &str) -> CniOutput {
        self.run(&["exec", container, "sh", "-c", script])
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.run(&["rm", "--force", "--all", "--time", "0"]);
        let marker = self.dir.path().display().to_string();
        wait_for_no_processes(&marker, Duration::from_secs(20));
        for (pid, _) in processes_mentioning(&marker) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        reap_adopted();
    }
}

/// Live processes whose command line mentions `marker` (our temp dir):
/// conmon, `podman container cleanup`, runc.
fn processes_mentioning(marker: &str) -> Vec<(i32, String)> {
    let me = std::process::id() as i32;
    processes()
        .into_iter()
        .filter(|p| p.pid != me && p.cmdline.contains(marker))
        .map(|p| (p.pid, p.cmdline))
        .collect()
}

/// What podman daemonises (conmon, its cleanup podman, runc).
fn podmans(comm: &str) -> bool {
    ["conmon", "podman", "runc"].contains(&comm)
}

fn reap_adopted() {
    process::reap_adopted(podmans);
}

/// Waits (bounded) until nothing mentioning `marker` runs any more, reaping
/// adopted zombies on the way.
fn wait_for_no_processes(marker: &str, within: Duration) -> Vec<(i32, String)> {
    let deadline = Instant::now() + within;
    loop {
        reap_adopted();
        let left = processes_mentioning(marker);
        if left.is_empty() || Instant::now() >= deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn links(node: &SimNode) -> BTreeSet<String> {
    node.ns.links().into_iter().collect()
}

fn eth0_addr(podman: &Podman, c: &str) -> (IpAddr, u8) {
    let out = podman.ok(&["exec", c, "ip", "-o", "-4", "addr", "show", "dev", "eth0"]);
    let cidr = out
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .unwrap_or_else(|| panic!("no IPv4 on {c}'s eth0: {out}"));
    let (ip, prefix) = cidr
        .split_once('/')
        .unwrap_or_else(|| panic!("bad address {cidr}"));
    (
        ip.parse().unwrap_or_else(|e| panic!("{ip}: {e}")),
        prefix.parse().unwrap_or_else(|e| panic!("{prefix}: {e}")),
    )
}

fn assert_ping(podman: &Podman, from: &str, to: IpAddr, what: &str) {
    let out = podman.run(&["exec", from, "ping", "-c", "1", "-W", "3", &to.to_string()]);
    assert!(out.success(), "{from} -> {what} ({to}): {out}");
}

/// 256 KiB from `client` to a busybox `nc` listener in `server`; the server
/// writes the byte count it received.
fn assert_tcp(podman: &Podman, client: &str, server: &str, server_ip: IpAddr) {
    const BYTES: usize = 256 * 1024;
    let got = format!("/tmp/got-{server}-{client}");
    podman.ok(&[
        "exec",
        "-d",
        server,
        "sh",
        "-c",
        // busybox nc quits at EOF on its stdin, dropping what it has
        // not read yet: keep its stdin open.
        &format!("sleep 30 | nc -l -p 5000 | wc -c > {got}"),
    ]);
    let deadline = Instant::now() + Duration::from_secs(20);
    // The listener starts asynchronously: retry the connect, bounded.
    loop {
        let out = podman.sh(
            client,
            &format!("head -c {BYTES} /dev/zero | nc {server_ip} 5000"),
        );
        if out.success() {
            break;
        }
        assert!(Instant::now() < deadline, "{client} -> {server} TCP: {out}");
        std::thread::sleep(Duration::from_millis(200));
    }
    loop {
        let out = podman.sh(server, &format!("cat {got} 2>/dev/null"));
        if out.stdout.trim() == BYTES.to_string() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{client} -> {server} TCP: server got {:?} bytes",
            out.stdout.trim()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One ask of a ClusterIP from `client`: busybox `nc` in the container
/// reads the `PEER` line of the endpoint (a `PeerServer`).
fn service_peer(podman: &Podman, client: &str, to: SocketAddr) -> Result<IpAddr, String> {
    // busybox nc quits at EOF on its stdin: hold it open for the reply.
    let out = podman.sh(
        client,
        &format!("sleep 1 | nc -w 3 {} {}", to.ip(), to.port()),
    );
    out.stdout
        .lines()
        .find_map(|l| l.strip_prefix("PEER "))
        .and_then(|p| p.trim().parse().ok())
        .ok_or_else(|| out.to_string())
}

/// Issue 19: kube-proxy's own iptables rules in every node netns (the test
/// kit writes them as kube-proxy's sync loop would: no control plane runs
/// here); c1 reaches c2 (same node) and n1p0 (other node) through
/// ClusterIPs, and each endpoint sees c1's own address.
fn assert_cluster_ips(
    podman: &Podman,
    cluster: &Cluster,
    (ip1, ip2): (IpAddr, IpAddr),
    c2_netns: &Path,
) {
    let remote = &cluster.nodes()[1].pods[0];
    let endpoints = [
        Endpoint {
            name: "c2".into(),
            addr: SocketAddr::new(ip2, 8080),
            netns: c2_netns.to_path_buf(),
        },
        Endpoint {
            name: "n1p0".into(),
            addr: SocketAddr::new(remote.ip, 8080),
            netns: remote.pod.ns.path(),
        },
    ];
    let services: Vec<(SocketAddr, Endpoint)> = ["10.96.1.1:80", "10.96.1.2:80"]
        .iter()
        .map(|v| v.parse().unwrap())
        .zip(endpoints)
        .collect();
    let nodes: Vec<&Netns> = cluster.nodes().iter().map(|n| &n.ns).collect();
    let cips = ClusterIps::program(
        &nodes,
        Mode::Iptables,
        &cluster.opts().pod_cidr,
        "10.96.0.0/16",
        &services,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let t = Instant::now();
    cips.assert_seen(ip1, Duration::from_secs(20), |to| {
        service_peer(podman, "c1", to)
    });
    eprintln!("c1 reached both ClusterIPs in {:?}", t.elapsed());
}

fn need(tool: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(found, "{tool} not installed: run .ci/install-deps");
}

#[test]
fn podman_uses_evio_unmodified() {
    for tool in ["podman", "runc", "conmon", "busybox", "nsenter"] {
        need(tool);
    }
    // SAFETY: prctl with integer arguments only changes this process's
    // orphan handling: podman's daemonised conmon becomes our child, so we
    // can reap it (PID 1 here does not).
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(rc, 0, "PR_SET_CHILD_SUBREAPER");

    // node-0 for podman; node-1 with one plugin-made pod to reach across
    // the fabric.
    let mut opts = common::opts();
    opts.nodes = 2;
    opts.pods_per_node = 1;
    opts.bridge_type = BridgeType::Ovs;
    // As the DaemonSet's ConfigMap: containers route ClusterIPs to the
    // node's gateway, where kube-proxy's DNAT is.
    opts.netconf = vec![("isDefaultGateway".into(), true.into())];
    let evio = opts.evio_bin.clone();
    let cluster = Cluster::up(opts).unwrap_or_else(|e| panic!("cluster up: {e}"));
    let node = &cluster.nodes()[0];
    let remote = &cluster.nodes()[1].pods[0];
    let network = cluster.opts().network.clone();

    // podman reads the conflist as config-gen wrote it: its host-local
    // dataDir must already point into our temp dir.
    let types: Vec<&str> = node.conflist["plugins"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p["type"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(types, ["evio", "portmap"], "{}", node.conflist);
    assert!(
        node.conflist_has_data_dir,
        "config-gen did not write ipam.dataDir: {}",
        node.conflist
    );

    let podman = Podman::new(node, &evio, &node.conf_dir);
    let ovs = node
        .ovs
        .as_ref()
        .unwrap_or_else(|| panic!("node has no OVS"));
    let ports = OvsPorts {
        db: ovs.endpoint(),
        bridge: node.bridge.clone(),
    };
    let links_before = links(node);
    let ports_before = ports.list();
    let allocs_before = ipam_allocations(&node.data_dir, &network);
    let conf_before = files_under(&node.conf_dir);
    let conflist_text = std::fs::read_to_string(node.conf_dir.join(CONFLIST))
        .unwrap_or_else(|e| panic!("read conflist: {e}"));

    let rootfs = podman.rootfs().display().to_string();
    let mut ids = BTreeMap::new();
    for c in ["c1", "c2"] {
        let id = podman.ok(&[
            "run",
            "-d",
            "--name",
            c,
            "--network",
            &network,
            "--rootfs",
            &rootfs,
            "sleep",
            "600",
        ]);
        ids.insert(c, id.trim().to_string());
    }

    let (ip1, p1) = eth0_addr(&podman, "c1");
    let (ip2, p2) = eth0_addr(&podman, "c2");
    assert_ne!(ip1, ip2);
    for (ip, prefix) in [(ip1, p1), (ip2, p2)] {
        assert_eq!(format!("{}/24", network_of(ip, 24)), node.subnet, "{ip}");
        assert_eq!(prefix, 16, "the pod CIDR's prefix");
    }
    // host-local got podman's container IDs through our plugin.
    let allocs = ipam_allocations(&node.data_dir, &network);
    assert_eq!(
        allocs.get(&ip1).map(|a| a.0.as_str()),
        Some(ids["c1"].as_str())
    );
    assert_eq!(
        allocs.get(&ip2).map(|a| a.0.as_str()),
        Some(ids["c2"].as_str())
    );

    let new_links: BTreeSet<String> = links(node).difference(&links_before).cloned().collect();
    let new_ports: BTreeSet<String> = ports.list().difference(&ports_before).cloned().collect();
    assert_eq!(new_links.len(), 2, "host veths: {new_links:?}");
    assert_eq!(new_links, new_ports, "each host veth is an OVS port");

    assert_ping(&podman, "c1", node.gateway, "gateway");
    assert_ping(&podman, "c2", node.gateway, "gateway");
    assert_ping(&podman, "c1", ip2, "c2");
    assert_ping(&podman, "c2", ip1, "c1");
    assert_ping(&podman, "c1", remote.ip, "pod n1p0 on node-1");
    assert_tcp(&podman, "c1", "c2", ip2);

    let sandboxes: Vec<String> = ["c1", "c2"]
        .iter()
        .map(|c| {
            podman
                .ok(&["inspect", "-f", "{{.NetworkSettings.SandboxKey}}", c])
                .trim()
                .to_string()
        })
        .collect();
    for s in &sandboxes {
        assert!(Path::new(s).exists(), "sandbox {s}");
    }
    assert_cluster_ips(&podman, &cluster, (ip1, ip2), Path::new(&sandboxes[1]));

    podman.ok(&["rm", "--force", "--time", "0", "c1", "c2"]);

    assert_eq!(links(node), links_before, "host veths left");
    assert_eq!(ports.list(), ports_before, "OVS ports left");
    assert_eq!(
        ipam_allocations(&node.data_dir, &network),
        allocs_before,
        "host-local allocations left"
    );
    // podman keeps its CNI lock file next to the configs; nothing else.
    let mut conf_after = files_under(&node.conf_dir);
    conf_after.remove("cni.lock");
    assert_eq!(conf_after, conf_before, "conf dir changed");
    assert_eq!(
        std::fs::read_to_string(node.conf_dir.join(CONFLIST)).ok(),
        Some(conflist_text),
        "conflist changed"
    );
    for s in &sandboxes {
        assert!(!Path::new(s).exists(), "netns {s} left");
    }
    // libcni's result cache (podman 4.3 keeps it in the default
    // /var/lib/cni/results) is removed with the attachment.
    for id in ids.values() {
        let cached = PathBuf::from("/var/lib/cni/results").join(format!("{network}-{id}-eth0"));
        assert!(!cached.exists(), "{} left", cached.display());
    }
    let marker = podman.dir.path().display().to_string();
    let left = wait_for_no_processes(&marker, Duration::from_secs(20));
    assert!(left.is_empty(), "processes left: {left:#?}");
    let adopted: Vec<_> = process::children()
        .into_iter()
        .filter(|p| podmans(&p.comm))
        .map(|p| (p.pid, p.comm, p.state))
        .collect();
    assert!(adopted.is_empty(), "podman processes left: {adopted:?}");

    drop(podman);
    cluster.down().unwrap_or_else(|e| panic!("teardown: {e}"));
}
