//! containerd drives the plugin the way a Kubernetes node does: the test is
//! the kubelet, speaking CRI v1 (RunPodSandbox, PodSandboxStatus,
//! StopPodSandbox, RemovePodSandbox) to Debian's containerd 1.6, which runs
//! inside a simulated node's netns and executes config-gen's conflist
//! through its CRI plugin's libcni (1.1.2: CNI spec up to 1.0.0, so no GC or
//! STATUS, which need libcni 1.2). The plugins in the CNI bin dir are the
//! real ones behind a recorder that logs what libcni passed (command,
//! CNI_ARGS, netns, config), so the test also checks what containerd sends.
//! Its own test binary: it makes the process a child subreaper to collect
//! the shims containerd daemonises.
// A test that unwraps fails loudly, which is what a test should do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use evio_testkit::cluster::{network_of, BridgeType, Cluster, SimNode, CONFLIST};
use evio_testkit::containerd::{reap_adopted, CniDirs, Containerd};
use evio_testkit::cri::{sandbox_config, Cri, PodSandboxConfig, SandboxStatus};
use evio_testkit::netns::{run_in_netns_path, Netns};
use evio_testkit::plugin::{ipam_allocations, run_bounded, CniOutput, OvsPorts, CNI_PLUGIN_DIR};
use evio_testkit::services::{peer_seen, ClusterIps, Endpoint, Mode};
use serde_json::Value;

const CMD_TIMEOUT: Duration = Duration::from_secs(30);
const CONTAINER_PORT: u16 = 8080;
const HOST_PORT: u16 = 30080;
const POD_NAMESPACE: &str = "evio-e2e";

/// One plugin invocation as the recorder saw it.
#[derive(Debug, Clone)]
struct Call {
    plugin: String,
    command: String,
    container_id: String,
    netns: String,
    args: BTreeMap<String, String>,
    config: Value,
}

/// The node's CNI bin dir as containerd sees it: `evio` and `portmap` are
/// recorders that log each invocation to `log/` and exec the real plugin
/// with the same stdin, args and environment; host-local and loopback (the
/// CRI plugin always sets up `lo` with it) are the reference plugins.
struct CniBin {
    dir: tempfile::TempDir,
}

impl CniBin {
    fn new(evio: &Path) -> CniBin {
        let dir = tempfile::Builder::new()
            .prefix("evio-ctd-cni-")
            .tempdir()
            .unwrap();
        let log = dir.path().join("log");
        std::fs::create_dir_all(&log).unwrap();
        for (name, real) in [
            ("evio", evio.to_path_buf()),
            ("portmap", Path::new(CNI_PLUGIN_DIR).join("portmap")),
        ] {
            // One file per call (no interleaving of concurrent calls); the
            // nanosecond prefix keeps them in call order.
            let script = format!(
                "#!/bin/sh\n\
                 in=$(cat)\n\
                 printf '%s\\n%s\\n%s\\n%s\\n%s\\n' \"$CNI_COMMAND\" \"$CNI_CONTAINERID\" \
                 \"$CNI_NETNS\" \"$CNI_ARGS\" \"$in\" > '{log}/'$(date +%s%N)-$$-{name}\n\
                 printf '%s' \"$in\" | exec '{real}' \"$@\"\n",
                log = log.display(),
                real = real.display(),
            );
            let path = dir.path().join(name);
            std::fs::write(&path, script).unwrap();
            let mut perms = std::fs::metadata(&path).unwrap().permissions();
            std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
            std::fs::set_permissions(&path, perms).unwrap();
        }
        for name in ["host-local", "loopback"] {
            std::os::unix::fs::symlink(Path::new(CNI_PLUGIN_DIR).join(name), dir.path().join(name))
                .unwrap();
        }
        CniBin { dir }
    }

    fn calls(&self) -> Vec<Call> {
        let mut names: Vec<PathBuf> = std::fs::read_dir(self.dir.path().join("log"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        names.sort();
        names
            .iter()
            .map(|p| {
                let text = std::fs::read_to_string(p).unwrap();
                let mut l = text.splitn(5, '\n');
                let mut next = || l.next().unwrap_or("").to_string();
                let (command, container_id, netns, args, config) =
                    (next(), next(), next(), next(), next());
                Call {
                    plugin: p
                        .file_name()
                        .unwrap()
                        .to_string_lossy()
                        .rsplit('-')
                        .next()
                        .unwrap()
                        .to_string(),
                    command,
                    container_id,
                    netns,
                    args: args
                        .split(';')
                        .filter_map(|kv| kv.split_once('='))
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    config: serde_json::from_str(config.trim()).unwrap_or(Value::Null),
                }
            })
            .collect()
    }
}

/// What must be back to its earlier state once every sandbox is gone.
#[derive(Debug, PartialEq)]
struct NodeState {
    links: BTreeSet<String>,
    ovs_ports: Option<BTreeSet<String>>,
    allocations: BTreeMap<IpAddr, (String, String)>,
    nat: String,
}

fn node_state(node: &SimNode, network: &str) -> NodeState {
    NodeState {
        links: node.ns.links().into_iter().collect(),
        ovs_ports: node
            .ovs
            .as_ref()
            .map(|o| OvsPorts::of(o, &node.bridge).list()),
        allocations: ipam_allocations(&node.data_dir, network),
        nat: nat_rules(node),
    }
}

/// The node's iptables NAT rules and custom chains, without counters and
/// without what portmap creates once and keeps (its top-level chains and
/// their jumps hold no per-pod state) or the built-in chains that appear
/// with the table.
fn nat_rules(node: &SimNode) -> String {
    const KEPT: &[&str] = &[
        "CNI-HOSTPORT-DNAT",
        "CNI-HOSTPORT-MASQ",
        "CNI-HOSTPORT-SETMARK",
        "PREROUTING",
        "INPUT",
        "OUTPUT",
        "POSTROUTING",
    ];
    let out = node.ns.exec(&["iptables-save", "-t", "nat"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| {
            let mut w = l.split_whitespace();
            match (w.next(), w.next()) {
                (Some(c), _) if c.starts_with(':') => !KEPT.contains(&&c[1..]),
                (Some("-A"), Some(chain)) => {
                    !(KEPT.contains(&chain) && !l.contains("CNI-DN-") && !l.contains("CNI-SN-"))
                }
                _ => false,
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn in_pod(netns: &Path, argv: &[&str]) -> CniOutput {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net={}", netns.display()))
        .arg("--")
        .args(argv);
    run_bounded(c, b"", CMD_TIMEOUT)
}

/// One ping, retried (bounded) while the first ARP/learning settles.
fn assert_ping(netns: &Path, to: IpAddr, what: &str) {
    let mut last = None;
    for _ in 0..3 {
        let out = in_pod(netns, &["ping", "-c", "1", "-W", "2", &to.to_string()]);
        if out.success() {
            return;
        }
        last = Some(out);
    }
    panic!("{what} ({to}): {}", last.unwrap());
}

/// `evio-node doctor` in the node netns with the attachments the runtime
/// considers live.
fn doctor(node: &SimNode, evio_node: &Path, live: &[String]) -> CniOutput {
    let valid: Vec<String> = live.iter().map(|id| format!("{id}/eth0")).collect();
    let c = node.ns.command(&[
        &evio_node.display().to_string(),
        "doctor",
        "--conf-dir",
        &node.conf_dir.display().to_string(),
        "--valid-attachments",
        &valid.join(","),
    ]);
    run_bounded(c, b"", CMD_TIMEOUT)
}

fn pod_cidr(ip: &IpAddr, node: &SimNode) {
    assert_eq!(
        format!("{}/24", network_of(*ip, 24)),
        node.subnet,
        "pod IP {ip} not in the node's subnet"
    );
}

struct Harness<'a> {
    node: &'a SimNode,
    network: String,
    ctd: Containerd,
    cri: Cri,
    cni: CniBin,
    evio_node: PathBuf,
    serial: usize,
}

impl Harness<'_> {
    fn configs(&mut self, n: usize, ports: &[(i32, i32)]) -> Vec<PodSandboxConfig> {
        (0..n)
            .map(|_| {
                self.serial += 1;
                let name = format!("pod{}", self.serial);
                sandbox_config(
                    &name,
                    POD_NAMESPACE,
                    &format!("uid-{}-{}", std::process::id(), self.serial),
                    self.ctd.cgroup_parent(),
                    ports,
                )
            })
            .collect()
    }

    fn run(&mut self, n: usize, ports: &[(i32, i32)]) -> Vec<String> {
        let configs = self.configs(n, ports);
        self.cri
            .run_pod_sandboxes(configs)
            .into_iter()
            .map(|r| r.unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", self.ctd.log_tail(30))))
            .collect()
    }

    /// PodSandboxStatus: ready, an IP in the node subnet that host-local
    /// allocated to this sandbox, a netns containerd mounted under its state
    /// dir, with that address on eth0 at the pod CIDR's prefix.
    fn status(&mut self, id: &str) -> (SandboxStatus, IpAddr, PathBuf) {
        let s = self.cri.pod_sandbox_status(id).unwrap();
        assert!(s.ready, "sandbox {id} not ready: {s:?}");
        let ip: IpAddr =
            s.ip.parse()
                .unwrap_or_else(|e| panic!("pod IP {:?}: {e}", s.ip));
        pod_cidr(&ip, self.node);
        let allocs = ipam_allocations(&self.node.data_dir, &self.network);
        assert_eq!(
            allocs.get(&ip),
            Some(&(id.to_string(), "eth0".to_string())),
            "host-local allocation of {ip}"
        );
        let netns = s
            .netns
            .clone()
            .unwrap_or_else(|| panic!("no netns in {:?}", s.info));
        assert!(
            netns.starts_with(self.ctd.netns_dir()),
            "{}",
            netns.display()
        );
        let out = in_pod(&netns, &["ip", "-o", "-4", "addr", "show", "dev", "eth0"]);
        assert!(
            out.stdout.contains(&format!("inet {ip}/16 ")),
            "eth0 of {id}: {out}"
        );
        (s, ip, netns)
    }

    fn stop_remove(&mut self, ids: &[String]) {
        for id in ids {
            self.cri.stop_pod_sandbox(id).unwrap();
            self.cri.remove_pod_sandbox(id).unwrap();
        }
    }

    /// Nothing of `ids` is left: doctor clean, node state as `before`,
    /// netns mounts, libcni's cache, shims and pause processes gone.
    fn assert_gone(&mut self, ids: &[String], before: &NodeState, what: &str) {
        let listed: Vec<String> = self
            .cri
            .list_pod_sandboxes()
            .unwrap()
            .into_iter()
            .map(|s| s.id)
            .collect();
        assert!(
            listed.is_empty(),
            "{what}: sandboxes still listed: {listed:?}"
        );
        let out = doctor(self.node, &self.evio_node, &[]);
        assert!(out.success(), "{what}: doctor found residue: {out}");
        assert_eq!(&node_state(self.node, &self.network), before, "{what}");
        let netns: Vec<_> = std::fs::read_dir(self.ctd.netns_dir())
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(netns.is_empty(), "{what}: netns left: {netns:?}");
        for id in ids {
            let cached =
                PathBuf::from("/var/lib/cni/results").join(format!("{}-{id}-eth0", self.network));
            assert!(!cached.exists(), "{what}: {} left", cached.display());
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            reap_adopted();
            let left = self.ctd.leftover_processes();
            if left.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: processes left: {left:#?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(
            self.ctd.mounts().is_empty(),
            "{what}: mounts left: {:?}",
            self.ctd.mounts()
        );
    }
}

/// A TCP listener inside the pod netns at CONTAINER_PORT; the node connects
/// to its gateway address at HOST_PORT and must land there through
/// portmap's DNAT.
fn assert_port_mapping(node: &SimNode, pod_netns: &Path) {
    let listener = run_in_netns_path(pod_netns, || {
        std::net::TcpListener::bind(("0.0.0.0", CONTAINER_PORT))
    })
    .unwrap();
    listener.set_nonblocking(false).unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, peer) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).unwrap();
        s.write_all(b"pong").unwrap();
        (buf, peer)
    });
    let to = SocketAddr::new(node.gateway, HOST_PORT);
    let mut c = node
        .ns
        .tcp_connect(to, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("node -> {to} (hostPort): {e}"));
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"ping").unwrap();
    let mut got = [0u8; 4];
    c.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"pong");
    let (sent, _peer) = server.join().unwrap();
    assert_eq!(&sent, b"ping");
}

/// Issue 19 under a CRI runtime: kube-proxy's rules, as its sync loop
/// writes them (no control plane runs here), on both nodes in each mode in
/// turn; sandbox 0 reaches sandbox 1 (same node) and n1p0 (node-1) through
/// ClusterIPs, each endpoint seeing sandbox 0's own address. portmap's
/// hostPort answers while kube-proxy's rules are there and after they are
/// gone again: kube-proxy's cleanup leaves portmap's chains alone.
fn assert_cluster_ips(cluster: &Cluster, st: &[(SandboxStatus, IpAddr, PathBuf)]) {
    let node = &cluster.nodes()[0];
    let remote = &cluster.nodes()[1].pods[0];
    let (client, client_ns) = (st[0].1, st[0].2.clone());
    let services = [
        (
            SocketAddr::from(([10, 96, 2, 1], 80)),
            Endpoint {
                name: "sandbox1".into(),
                addr: SocketAddr::new(st[1].1, CONTAINER_PORT),
                netns: st[1].2.clone(),
            },
        ),
        (
            SocketAddr::from(([10, 96, 2, 2], 80)),
            Endpoint {
                name: "n1p0".into(),
                addr: SocketAddr::new(remote.ip, CONTAINER_PORT),
                netns: remote.pod.ns.path(),
            },
        ),
    ];
    let nodes: Vec<&Netns> = cluster.nodes().iter().map(|n| &n.ns).collect();
    for mode in [Mode::Iptables, Mode::Nftables] {
        let cips = ClusterIps::program(
            &nodes,
            mode,
            &cluster.opts().pod_cidr,
            "10.96.0.0/16",
            &services,
        )
        .unwrap_or_else(|e| panic!("{mode:?}: {e}"));
        let t = Instant::now();
        cips.assert_seen(client, Duration::from_secs(20), |to| {
            peer_seen(&client_ns, to)
        });
        eprintln!("{mode:?}: both ClusterIPs answered in {:?}", t.elapsed());
        assert_port_mapping(node, &st[2].2);
    }
    let nat = nat_rules(node);
    assert!(
        nat.contains(&format!("--to-destination {}:{CONTAINER_PORT}", st[2].1)),
        "portmap's DNAT gone with kube-proxy's rules:\n{nat}"
    );
    assert!(!nat.contains("KUBE-"), "kube-proxy's rules left:\n{nat}");
    assert_port_mapping(node, &st[2].2);
}

/// scripts/containerd-demo.sh sets EVIO_CONTAINERD_DEMO: with the first
/// sandboxes up, say where everything is and wait (at most 10 minutes) for
/// Enter on the terminal before tearing down.
fn demo_pause(h: &Harness, st: &[(SandboxStatus, IpAddr, PathBuf)]) {
    if std::env::var_os("EVIO_CONTAINERD_DEMO").is_none() {
        return;
    }
    let node = h.node;
    let mut text = format!(
        "\n=== {} node {}: netns {} (nsenter --net={} -- bash)\n\
         containerd: socket {}, log {}/containerd.log\n\
         ctr --address {} -n k8s.io containers ls\n\
         conflist: {}\n",
        node.plugin_conf["bridgeType"].as_str().unwrap_or("?"),
        node.name,
        node.ns.name(),
        node.ns.path().display(),
        h.ctd.socket().display(),
        h.ctd.dir().display(),
        h.ctd.socket().display(),
        node.conf_dir.display(),
    );
    for (s, ip, ns) in st {
        text += &format!(
            "sandbox {} ip {ip}: nsenter --net={} -- ip addr\n",
            &s.id[..12],
            ns.display()
        );
    }
    text += &format!(
        "the last one maps {}:{HOST_PORT} to its port {CONTAINER_PORT}\n\
         press Enter to continue (stop, remove, 20 sandboxes, restart)\n",
        node.gateway
    );
    eprint!("{text}");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        if let Ok(tty) = std::fs::File::open("/dev/tty") {
            let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(tty), &mut line);
        }
        let _ = tx.send(());
    });
    let _ = rx.recv_timeout(Duration::from_secs(600));
}

fn need(tool: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
        || ["/usr/sbin", "/sbin"]
            .iter()
            .any(|d| Path::new(d).join(tool).is_file());
    assert!(found, "{tool} not installed: run .ci/install-deps");
}

fn containerd_drives_evio(bridge_type: BridgeType) {
    let t0 = Instant::now();
    for tool in [
        "containerd",
        "containerd-shim-runc-v2",
        "ctr",
        "runc",
        "busybox",
        "nsenter",
        "iptables-save",
        "tar",
    ] {
        need(tool);
    }
    // SAFETY: prctl with integer arguments only changes this process's
    // orphan handling: the shims containerd daemonises become our children
    // (when their starter exits), so we can reap them.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(rc, 0, "PR_SET_CHILD_SUBREAPER");

    // containerd runs on node-0; node-1 holds one plugin-made pod behind a
    // ClusterIP, reached across the fabric.
    let mut opts = common::opts();
    opts.nodes = 2;
    opts.pods_per_node = 0;
    opts.bridge_type = bridge_type;
    // As the DaemonSet's ConfigMap: pods route ClusterIPs to the node's
    // gateway, where kube-proxy's DNAT is.
    opts.netconf = vec![("isDefaultGateway".into(), true.into())];
    let (evio, evio_node) = (opts.evio_bin.clone(), opts.evio_node_bin.clone());
    let mut cluster = Cluster::up(opts).unwrap_or_else(|e| panic!("cluster up: {e}"));
    cluster
        .add_pod(1, 0)
        .unwrap_or_else(|e| panic!("pod on node-1: {e}"));
    let node = &cluster.nodes()[0];
    let network = cluster.opts().network.clone();
    let types: Vec<&str> = node.conflist["plugins"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p["type"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(types, ["evio", "portmap"], "{}", node.conflist);
    assert!(node.conflist_has_data_dir, "{}", node.conflist);
    let cni_version = node.conflist["cniVersion"].as_str().unwrap().to_string();

    let cni = CniBin::new(&evio);
    let ctd = Containerd::start(
        &node.ns.path(),
        &CniDirs {
            bin_dir: cni.dir.path().to_path_buf(),
            conf_dir: node.conf_dir.clone(),
        },
    )
    .unwrap_or_else(|e| panic!("start containerd: {e}"));
    let cri = ctd.cri().unwrap();
    let mut h = Harness {
        node,
        network: network.clone(),
        ctd,
        cri,
        cni,
        evio_node,
        serial: 0,
    };
    let v = h.cri.version().unwrap();
    eprintln!(
        "{bridge_type}: {} {} (CRI {}) up after {:?}",
        v.runtime_name,
        v.runtime_version,
        v.runtime_api_version,
        t0.elapsed()
    );
    let before = node_state(node, &network);

    // 1. Two sandboxes at once, then one with a host port.
    let mut ids = h.run(2, &[]);
    ids.extend(h.run(1, &[(CONTAINER_PORT.into(), HOST_PORT.into())]));
    // 2. Status: IPs in the node subnet, distinct.
    let st: Vec<(SandboxStatus, IpAddr, PathBuf)> = ids.iter().map(|id| h.status(id)).collect();
    let ips: BTreeSet<IpAddr> = st.iter().map(|s| s.1).collect();
    assert_eq!(ips.len(), 3, "pod IPs: {ips:?}");
    if let Some(ports) = &before.ovs_ports {
        let now = OvsPorts::of(node.ovs.as_ref().unwrap(), &node.bridge).list();
        assert_eq!(now.difference(ports).count(), 3, "one OVS port per sandbox");
    }
    // The doctor agrees with the runtime about what is live, and would say
    // otherwise if the runtime considered nothing live.
    let out = doctor(node, &h.evio_node, &ids);
    assert!(out.success(), "doctor with the live sandboxes: {out}");
    let out = doctor(node, &h.evio_node, &[]);
    assert_eq!(out.code, 1, "doctor with no sandbox live: {out}");

    // 3. Pods reach each other and the gateway.
    for (i, (_, _, ns)) in st.iter().enumerate() {
        assert_ping(ns, node.gateway, &format!("pod {i} -> gateway"));
        let (_, other, _) = &st[(i + 1) % st.len()];
        assert_ping(
            ns,
            *other,
            &format!("pod {i} -> pod {}", (i + 1) % st.len()),
        );
    }
    // 4. portMappings through portmap, DNAT to the third pod.
    let nat = nat_rules(node);
    assert!(
        nat.contains(&format!("--to-destination {}:{CONTAINER_PORT}", st[2].1)),
        "no DNAT to the port-mapped pod:\n{nat}"
    );
    assert_port_mapping(node, &st[2].2);
    assert_cluster_ips(&cluster, &st);
    demo_pause(&h, &st);

    // What containerd passed: the kubelet's pod identity in CNI_ARGS, the
    // conflist's cniVersion, our netns, the port mapping as a capability.
    let calls = h.cni.calls();
    for (id, (s, _, ns)) in ids.iter().zip(&st) {
        let add: Vec<&Call> = calls
            .iter()
            .filter(|c| c.command == "ADD" && &c.container_id == id)
            .collect();
        assert_eq!(add.len(), 2, "ADD calls of {id}: {add:#?}");
        assert_eq!(add[0].plugin, "evio");
        assert_eq!(add[1].plugin, "portmap");
        let a = add[0];
        assert_eq!(a.netns, ns.display().to_string());
        assert_eq!(
            a.config["cniVersion"],
            cni_version.as_str(),
            "{:?}",
            a.config
        );
        assert_eq!(
            a.args.get("K8S_POD_NAMESPACE").map(String::as_str),
            Some(POD_NAMESPACE)
        );
        assert_eq!(a.args.get("K8S_POD_INFRA_CONTAINER_ID"), Some(id));
        assert_eq!(a.args.get("IgnoreUnknown").map(String::as_str), Some("1"));
        let meta = h.cri.pod_sandbox_status(id).unwrap();
        assert_eq!(a.args.get("K8S_POD_NAME"), Some(&meta.name), "{:?}", a.args);
        assert_eq!(a.args.get("K8S_POD_UID"), Some(&meta.uid), "{:?}", a.args);
        assert_eq!(s.id, *id);
    }
    let pm = calls
        .iter()
        .find(|c| c.plugin == "portmap" && c.command == "ADD" && c.container_id == ids[2])
        .unwrap();
    // go-cni 1.1 (containerd 1.6) marshals its Go struct field names, not
    // the conventions document's camelCase keys: portmap reads them only
    // because Go's JSON decoding ignores case. A plugin that declared the
    // capability would have to do the same.
    assert_eq!(
        pm.config["runtimeConfig"]["portMappings"],
        serde_json::json!([{"HostPort": HOST_PORT, "ContainerPort": CONTAINER_PORT,
                            "Protocol": "tcp", "HostIP": ""}]),
        "{:?}",
        pm.config
    );
    assert!(pm.config["prevResult"]["ips"].is_array(), "{:?}", pm.config);
    let first_add_args: Vec<String> = calls
        .iter()
        .filter(|c| c.command == "ADD" && c.plugin == "evio")
        .map(|c| c.args.keys().cloned().collect::<Vec<_>>().join(","))
        .collect();
    eprintln!(
        "{bridge_type}: CNI_ARGS keys of ADD: {:?}",
        first_add_args.first()
    );

    // 5. Stop, then remove: containerd runs the DEL of the whole list
    // (portmap, then evio) at each, so the second meets nothing to delete
    // and must still succeed.
    let dels = |h: &Harness, id: &str| -> Vec<String> {
        h.cni
            .calls()
            .into_iter()
            .filter(|c| c.command == "DEL" && c.container_id == id)
            .map(|c| c.plugin)
            .collect()
    };
    let t = Instant::now();
    for id in &ids {
        h.cri.stop_pod_sandbox(id).unwrap();
        assert_eq!(dels(&h, id), ["portmap", "evio"], "DEL at stop of {id}");
    }
    // Stopped sandboxes hold nothing of the network any more.
    let out = doctor(node, &h.evio_node, &[]);
    assert!(out.success(), "doctor after StopPodSandbox: {out}");
    for id in &ids {
        h.cri.remove_pod_sandbox(id).unwrap();
        assert_eq!(
            dels(&h, id),
            ["portmap", "evio", "portmap", "evio"],
            "DEL at remove of {id}"
        );
    }
    eprintln!("{bridge_type}: stop + remove of 3 in {:?}", t.elapsed());
    // 6. Nothing left.
    h.assert_gone(&ids, &before, "after stop + remove of 3");

    // 20 sandboxes, all at once.
    let t = Instant::now();
    let ids = h.run(20, &[]);
    let ips: BTreeSet<IpAddr> = ids.iter().map(|id| h.status(id).1).collect();
    assert_eq!(ips.len(), 20, "distinct pod IPs");
    eprintln!("{bridge_type}: 20 sandboxes up in {:?}", t.elapsed());
    let t = Instant::now();
    h.stop_remove(&ids);
    eprintln!("{bridge_type}: 20 stopped+removed in {:?}", t.elapsed());
    h.assert_gone(&ids, &before, "after 20 sandboxes");

    // A containerd restart while sandboxes exist: it finds them again (same
    // IP, still reachable), and stop + remove afterwards leaves nothing.
    let ids = h.run(2, &[]);
    let st: Vec<(SandboxStatus, IpAddr, PathBuf)> = ids.iter().map(|id| h.status(id)).collect();
    let t = Instant::now();
    h.ctd
        .restart()
        .unwrap_or_else(|e| panic!("restart containerd: {e}"));
    eprintln!("{bridge_type}: containerd restarted in {:?}", t.elapsed());
    h.cri = h.ctd.cri().unwrap();
    for (id, (_, ip, ns)) in ids.iter().zip(&st) {
        let (_, ip2, ns2) = h.status(id);
        assert_eq!((&ip2, &ns2), (ip, ns), "{id} after the restart");
        assert_ping(ns, node.gateway, "after the restart");
    }
    h.stop_remove(&ids);
    h.assert_gone(&ids, &before, "after a containerd restart");

    // The limit of containerd 1.6: its libcni (1.1.2) knows CNI up to
    // 1.0.0. With the conflist at 1.1.0 evio's ADD succeeds but libcni
    // cannot read the result, so the sandbox fails; containerd's DEL of the
    // list then stops at Debian's portmap (plugins 1.1.1), which refuses a
    // 1.1.0 config, so the sandbox can be neither stopped nor removed.
    let mut list = node.conflist.clone();
    list["cniVersion"] = "1.1.0".into();
    std::fs::write(node.conf_dir.join(CONFLIST), list.to_string()).unwrap();
    h.ctd.restart().unwrap();
    h.cri = h.ctd.cri().unwrap();
    let configs = h.configs(1, &[]);
    let err = match h.cri.run_pod_sandboxes(configs).remove(0) {
        Ok(id) => panic!("containerd 1.6 accepted a CNI 1.1.0 result for {id}"),
        Err(e) => e.to_string(),
    };
    eprintln!("{bridge_type}: with cniVersion 1.1.0: {err}");
    assert!(err.contains("unsupported CNI result version"), "{err}");
    let wedged: Vec<String> = h
        .cri
        .list_pod_sandboxes()
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(wedged.len(), 1, "{wedged:?}");
    let err = h.cri.stop_pod_sandbox(&wedged[0]).unwrap_err().to_string();
    assert!(err.contains("incompatible CNI versions"), "{err}");
    // Back to config-gen's 1.0.0 conflist, stop and remove run the DEL,
    // which removes what the failed ADD made.
    std::fs::write(node.conf_dir.join(CONFLIST), node.conflist.to_string()).unwrap();
    h.ctd.restart().unwrap();
    h.cri = h.ctd.cri().unwrap();
    h.stop_remove(&wedged);
    h.assert_gone(&wedged, &before, "after a failed 1.1.0 sandbox");

    let Harness { ctd, cri, .. } = h;
    drop(cri);
    let forced = ctd.shutdown();
    assert!(
        forced.is_empty(),
        "containerd teardown had to force: {forced:?}"
    );
    cluster.down().unwrap_or_else(|e| panic!("teardown: {e}"));
    eprintln!("{bridge_type}: whole test {:?}", t0.elapsed());
}

#[test]
fn containerd_cri_on_ovs() {
    containerd_drives_evio(BridgeType::Ovs);
}

#[test]
fn containerd_cri_on_linux_bridge() {
    containerd_drives_evio(BridgeType::Linux);
}
