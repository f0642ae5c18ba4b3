//! Store faults under load, through the real `evio-node` binary:
//! * an etcd member (the leader) is SIGKILLed while 32 nodes allocate their
//!   subnets concurrently from a 3-member cluster: every node still gets a
//!   subnet, no subnet is handed out twice, and each node's conflist agrees
//!   with the store (checked by `evio-node doctor`);
//! * the file store's disk is full (a 64 KiB tmpfs mounted in a private
//!   mount namespace that only this test's commands enter): allocating fails
//!   with one clear line, the old store file and the old conflist stay
//!   intact and readable, nothing half-written is left, and allocation works
//!   again once there is space.
// A test that unwraps fails loudly, which is what a test should do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use evio_testkit::etcd::EtcdCluster;
use serde_json::Value;

const NODE: &str = env!("CARGO_BIN_EXE_evio-node");

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("evio-node-faults")
        .tempdir()
        .unwrap_or_else(|e| panic!("tempdir: {e}"))
}

fn text(o: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}--- stderr\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Arguments of `config-gen` for `node` into `conf_dir`, with a Linux
/// bridge (so that the doctor, run later in an empty netns, has no OVS to
/// ask).
fn config_gen_args(store: &str, net: &str, node: &str, conf_dir: &Path) -> Vec<String> {
    [
        "config-gen",
        "--store",
        store,
        "--name",
        net,
        "--pod-cidr",
        "10.244.0.0/16",
        "--node-bits",
        "8",
        "--bridge-type",
        "linux",
        "--timeout",
        "60",
        "--node-name",
        node,
        "--cni-conf-dir",
    ]
    .into_iter()
    .map(String::from)
    .chain([conf_dir.display().to_string()])
    .collect()
}

fn config_gen(store: &str, net: &str, node: &str, conf_dir: &Path) -> Command {
    let mut c = Command::new(NODE);
    c.args(config_gen_args(store, net, node, conf_dir))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// Waits for `child`, killing it past `deadline`.
fn wait_until(mut child: Child, deadline: Instant) -> Output {
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                break;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("wait: {e}"),
        }
    }
    child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("wait: {e}"))
}

/// Index of the current leader, from `etcdctl endpoint status`.
fn leader(cluster: &EtcdCluster) -> usize {
    let out = cluster.etcdctl(&["endpoint", "status", "-w", "json"]);
    assert!(out.status.success(), "endpoint status: {}", text(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}"));
    let eps = cluster.endpoints();
    for s in v.as_array().into_iter().flatten() {
        let st = &s["Status"];
        if st["leader"] == st["header"]["member_id"] {
            let ep = s["Endpoint"].as_str().unwrap_or("");
            if let Some(i) = eps.iter().position(|e| ep.ends_with(e.as_str())) {
                return i;
            }
        }
    }
    panic!("no leader in {v}")
}

#[test]
fn etcd_leader_killed_during_32_concurrent_allocations() {
    let mut cluster = EtcdCluster::start(3);
    let store = cluster.store_url();
    let dir = tempdir();
    let net = "faultnet";
    let nodes: Vec<String> = (0..32).map(|i| format!("node-{i:02}")).collect();
    let conf = |n: &str| dir.path().join(n);

    let victim = leader(&cluster);
    let children: Vec<(String, Child)> = nodes
        .iter()
        .map(|n| {
            let child = config_gen(&store, net, n, &conf(n))
                .spawn()
                .unwrap_or_else(|e| panic!("spawn evio-node: {e}"));
            (n.clone(), child)
        })
        .collect();
    // Mid-flight: as soon as the first nodes have their conflist (written
    // right after their allocation), the others are still connecting and
    // transacting. The leader is found beforehand so that killing it costs
    // no round trip.
    let done = || {
        nodes
            .iter()
            .filter(|n| conf(n).join("10-evio.conflist").exists())
            .count()
    };
    let wait = Instant::now() + Duration::from_secs(60);
    let at_kill = loop {
        let n = done();
        if n >= 3 {
            break n;
        }
        assert!(Instant::now() < wait, "no allocation within 60 s");
        std::thread::sleep(Duration::from_millis(1));
    };
    cluster.stop_member(victim);
    assert!(
        at_kill < nodes.len(),
        "all {at_kill} allocations were done before the kill: nothing was tested"
    );

    let deadline = Instant::now() + Duration::from_secs(120);
    let mut retried = Vec::new();
    for (n, child) in children {
        let mut out = wait_until(child, deadline);
        // What the kubelet does with a failed init container: run it again.
        for _ in 0..2 {
            if out.status.success() {
                break;
            }
            retried.push(format!(
                "{n}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
            let child = config_gen(&store, net, &n, &conf(&n))
                .spawn()
                .unwrap_or_else(|e| panic!("spawn evio-node: {e}"));
            out = wait_until(child, deadline);
        }
        assert!(
            out.status.success(),
            "{n} never got a subnet: {}",
            text(&out)
        );
    }
    eprintln!(
        "etcd fault: member {victim} (leader) killed after {at_kill} of {} allocations; {} retries: {retried:?}",
        nodes.len(),
        retried.len()
    );

    // The store: one subnet per node, none twice, both keys consistent.
    let kv = cluster.get_prefix(&format!("/evio/{net}/"));
    let mut by_node: BTreeMap<String, String> = BTreeMap::new();
    let mut owner: BTreeMap<String, String> = BTreeMap::new();
    for (k, v) in &kv {
        if let Some(n) = k.strip_prefix(&format!("/evio/{net}/nodes/")) {
            by_node.insert(n.to_string(), v.clone());
        } else if let Some(s) = k.strip_prefix(&format!("/evio/{net}/subnets/")) {
            let rec: Value = serde_json::from_str(v).unwrap_or_else(|e| panic!("{k}: {e}"));
            owner.insert(
                s.to_string(),
                rec["node"].as_str().unwrap_or("").to_string(),
            );
        }
    }
    assert_eq!(
        by_node.keys().cloned().collect::<BTreeSet<_>>(),
        nodes.iter().cloned().collect::<BTreeSet<_>>(),
        "every node has exactly one record"
    );
    let distinct: BTreeSet<&String> = by_node.values().collect();
    assert_eq!(
        distinct.len(),
        nodes.len(),
        "a subnet was handed out twice: {by_node:?}"
    );
    assert_eq!(owner.len(), nodes.len(), "subnet keys: {owner:?}");
    for (n, s) in &by_node {
        let key = s.replace('/', "-");
        assert_eq!(
            owner.get(&key),
            Some(n),
            "subnet {s} of {n} is owned by someone else"
        );
    }

    // Each node's conflist agrees with the store: the doctor says so. It
    // runs in the test's own namespace (where etcd's loopback is) and only
    // reads there; the conflists name a network nothing on the machine
    // belongs to, so only the store check has anything to compare.
    let doctor = |conf_dir: &Path, node: &str| {
        let mut c = Command::new(NODE);
        c.args(["doctor", "--store", &store, "--node-name", node])
            .arg("--conf-dir")
            .arg(conf_dir)
            .stdin(Stdio::null());
        c.output().unwrap_or_else(|e| panic!("spawn doctor: {e}"))
    };
    for n in &nodes {
        let out = doctor(&conf(n), n);
        assert!(out.status.success(), "doctor for {n}: {}", text(&out));
    }
    // And it would have said otherwise: node-00's conflist is not node-01's.
    let out = doctor(&conf("node-00"), "node-01");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("store-mismatch"),
        "{}",
        text(&out)
    );
}

/// A node that (re)starts while one of three members is down must still get
/// its subnet: two members are a quorum, and the store URL lists all three.
#[test]
fn etcd_allocation_works_with_one_member_down_from_the_start() {
    let mut cluster = EtcdCluster::start(3);
    let store = cluster.store_url();
    let dir = tempdir();
    for down in [0, 2] {
        cluster.stop_member(down);
        let node = format!("late-{down}");
        let child = config_gen(&store, "downnet", &node, &dir.path().join(&node))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn evio-node: {e}"));
        let out = wait_until(child, Instant::now() + Duration::from_secs(60));
        assert!(
            out.status.success(),
            "allocation with member {down} of 3 down: {}",
            text(&out)
        );
        cluster.start_member(down);
    }
}

/// A tmpfs mounted in a private mount namespace held by a `sleep` process.
/// Only commands run through [`PrivateTmpfs::command`] see it; the test
/// reads and writes it through `/proc/<holder>/root`. Drop unmounts it and
/// ends the holder, whose namespace (and any mount left in it) goes away
/// with it: nothing is ever mounted in the machine's namespace.
struct PrivateTmpfs {
    holder: Child,
    mountpoint: PathBuf,
}

impl PrivateTmpfs {
    fn mount(mountpoint: &Path, size: &str) -> PrivateTmpfs {
        let holder = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "sleep", "600"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn unshare: {e}"));
        let t = PrivateTmpfs {
            holder,
            mountpoint: mountpoint.to_path_buf(),
        };
        // unshare execs sleep once the namespace exists.
        let ours = std::fs::read_link("/proc/self/ns/mnt").ok();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read_link(t.ns()).ok() == ours {
            assert!(
                Instant::now() < deadline,
                "unshare did not create a mount namespace"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let out = t
            .command(&["mount", "-t", "tmpfs", "-o"])
            .arg(format!("size={size},mode=0755"))
            .arg("evio-test-tmpfs")
            .arg(mountpoint)
            .output()
            .unwrap_or_else(|e| panic!("mount: {e}"));
        assert!(out.status.success(), "mount tmpfs: {}", text(&out));
        t
    }

    fn ns(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/mnt", self.holder.id()))
    }

    /// `argv` run inside the private mount namespace.
    fn command(&self, argv: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--mount={}", self.ns().display()))
            .arg("--")
            .args(argv)
            .stdin(Stdio::null());
        c
    }

    /// `path` (inside the tmpfs) as seen from the test process.
    fn view(&self, path: &Path) -> PathBuf {
        let rel = path.strip_prefix("/").unwrap_or(path);
        PathBuf::from(format!("/proc/{}/root", self.holder.id())).join(rel)
    }
}

impl Drop for PrivateTmpfs {
    fn drop(&mut self) {
        let _ = self
            .command(&["umount", "-l"])
            .arg(&self.mountpoint)
            .stderr(Stdio::null())
            .status();
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

#[test]
fn file_store_on_a_full_disk_keeps_the_old_file() {
    let dir = tempdir();
    let mnt = dir.path().join("tmpfs");
    std::fs::create_dir(&mnt).unwrap_or_else(|e| panic!("{e}"));
    let fs = PrivateTmpfs::mount(&mnt, "64k");
    let store_file = mnt.join("subnets.json");
    let store = format!("file://{}", store_file.display());
    let conf1 = mnt.join("conf-n1");
    let net = "fullnet";
    // evio-node inside the private mount namespace.
    let node = |args: Vec<String>| -> Output {
        let mut argv = vec![NODE];
        argv.extend(args.iter().map(String::as_str));
        fs.command(&argv)
            .output()
            .unwrap_or_else(|e| panic!("spawn {argv:?}: {e}"))
    };
    let gen = |name: &str, conf: &Path| node(config_gen_args(&store, net, name, conf));

    let out = gen("n1", &conf1);
    assert!(out.status.success(), "first allocation: {}", text(&out));
    // The mount is private: the test's own view of the directory is empty.
    assert!(
        !store_file.exists(),
        "the tmpfs leaked into the test's mount namespace"
    );
    let store_before = std::fs::read(fs.view(&store_file)).unwrap_or_else(|e| panic!("{e}"));
    let conflist = conf1.join("10-evio.conflist");
    let conf_before = std::fs::read(fs.view(&conflist)).unwrap_or_else(|e| panic!("{e}"));

    // Fill the disk.
    let filler = fs.view(&mnt.join("filler"));
    let mut f = std::fs::File::create(&filler).unwrap_or_else(|e| panic!("{e}"));
    let chunk = vec![0u8; 4096];
    let mut filled = 0usize;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("fill: {e}"),
        }
        assert!(filled < 1 << 20, "the 64k tmpfs took a megabyte");
    }
    let _ = f.sync_all();
    drop(f);

    // A new node cannot be recorded: one clear line, nothing written.
    let conf2 = dir.path().join("conf-n2");
    let out = gen("n2", &conf2);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        err.contains("No space left on device") && err.trim().lines().count() == 1,
        "expected one line naming ENOSPC: {}",
        text(&out)
    );
    assert!(
        !conf2.exists(),
        "a conflist was written without an allocation"
    );
    // The existing node keeps its subnet; an unchanged conflist needs no
    // write, a changed one cannot be written: that fails, the old one stays.
    let out = gen("n1", &conf1);
    assert!(
        out.status.success(),
        "unchanged n1 on a full disk: {}",
        text(&out)
    );
    let mut args = config_gen_args(&store, net, "n1", &conf1);
    args.extend(["--mtu".to_string(), "1400".to_string()]);
    let out = node(args.clone());
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("No space left"),
        "{}",
        text(&out)
    );

    let store_after = std::fs::read(fs.view(&store_file)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        store_after, store_before,
        "the store file changed on a full disk"
    );
    let conf_after = std::fs::read(fs.view(&conflist)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        conf_after, conf_before,
        "the conflist changed on a full disk"
    );
    serde_json::from_slice::<Value>(&conf_after).unwrap_or_else(|e| panic!("conflist: {e}"));
    let out = node(
        ["subnets", "list", "--network", net, "--store", &store]
            .into_iter()
            .map(String::from)
            .collect(),
    );
    assert!(out.status.success(), "list on a full disk: {}", text(&out));
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        listing.contains("n1") && !listing.contains("n2"),
        "{listing}"
    );
    // No temp file of a failed write is left behind.
    let names: BTreeSet<String> = std::fs::read_dir(fs.view(&mnt))
        .unwrap_or_else(|e| panic!("{e}"))
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let expected: BTreeSet<String> = ["subnets.json", "subnets.json.lock", "conf-n1", "filler"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(names, expected, "left in the store's directory");
    let conf_names: Vec<String> = std::fs::read_dir(fs.view(&conf1))
        .unwrap_or_else(|e| panic!("{e}"))
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(conf_names, vec!["10-evio.conflist"], "left in the conf dir");

    // With space again, allocation resumes where it was.
    std::fs::remove_file(&filler).unwrap_or_else(|e| panic!("{e}"));
    let out = gen("n2", &conf2);
    assert!(out.status.success(), "after freeing space: {}", text(&out));
    let out = node(args);
    assert!(
        out.status.success(),
        "n1 after freeing space: {}",
        text(&out)
    );
    let conf_now: Value = serde_json::from_slice(
        &std::fs::read(fs.view(&conflist)).unwrap_or_else(|e| panic!("{e}")),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(conf_now["plugins"][0]["mtu"], 1400, "{conf_now}");
    let data: Value = serde_json::from_slice(
        &std::fs::read(fs.view(&store_file)).unwrap_or_else(|e| panic!("{e}")),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let nodes = &data["networks"][net]["nodes"];
    assert!(
        nodes["n1"].is_string() && nodes["n2"].is_string() && nodes["n1"] != nodes["n2"],
        "{data}"
    );
}

/// Issue 21: config-gen starts from the node's last subnet (its cache in
/// --data-dir) when the store does not answer, and fails clearly, writing
/// nothing, when there is no cache; a cache of another node or store is
/// never used.
#[test]
fn config_gen_falls_back_to_its_cache_only_when_the_store_does_not_answer() {
    let mut cluster = EtcdCluster::start(1);
    let store = cluster.store_url();
    let dir = tempdir();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    // config-gen with --timeout `secs` and --data-dir `data`.
    let gen = |node: &str, conf: &str, data: &Path, secs: &str| -> Output {
        let mut args = config_gen_args(&store, "cachenet", node, &dir.path().join(conf));
        let at = args.iter().position(|a| a == "--timeout").unwrap() + 1;
        args[at] = secs.to_string();
        args.extend(["--data-dir".to_string(), data.display().to_string()]);
        let child = Command::new(NODE)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{e}"));
        wait_until(child, Instant::now() + Duration::from_secs(60))
    };
    let run = |node: &str, conf: &str, data: &Path| gen(node, conf, data, "20");
    let first = run("n1", "a", &data);
    assert!(first.status.success(), "{}", text(&first));
    let said = String::from_utf8_lossy(&first.stdout).to_string();
    assert!(said.contains("allocation=new"), "{said}");
    let conflist = std::fs::read(dir.path().join("a/10-evio.conflist")).unwrap();
    assert!(data.join("config-gen-cachenet-n1.json").exists());

    cluster.stop_member(0);
    // The store refuses: the cached subnet, said on stderr, within the
    // cache's wait.
    let t = Instant::now();
    let out = run("n1", "b", &data);
    assert!(out.status.success(), "{}", text(&out));
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("allocation=cached"),
        "{}",
        text(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("did not answer"),
        "{}",
        text(&out)
    );
    assert_eq!(
        std::fs::read(dir.path().join("b/10-evio.conflist")).unwrap(),
        conflist
    );
    // No cache for this node, or another data dir: the old clear failure,
    // nothing written.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    for (node, conf, d) in [("n2", "c", &data), ("n1", "d", &empty)] {
        let out = gen(node, conf, d, "3");
        assert!(!out.status.success(), "{node}: {}", text(&out));
        assert_eq!(
            String::from_utf8_lossy(&out.stderr)
                .trim_end()
                .lines()
                .count(),
            1,
            "{}",
            text(&out)
        );
        assert!(!dir.path().join(conf).join("10-evio.conflist").exists());
    }
    cluster.start_member(0);
}

/// Issue 21: a node whose subnet was released while it was away (and taken
/// by another node) is told, and config-gen gives it a fresh subnet: never
/// the other node's.
#[test]
fn config_gen_says_when_the_nodes_subnet_was_released_while_it_was_away() {
    let dir = tempdir();
    let store = format!("file://{}", dir.path().join("subnets.json").display());
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let run = |node: &str, conf: &str| -> Output {
        let mut c = config_gen(&store, "relnet", node, &dir.path().join(conf));
        c.args(["--data-dir", &data.display().to_string()]);
        c.output().unwrap_or_else(|e| panic!("{e}"))
    };
    let subnet = |o: &Output| -> String {
        String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .find_map(|w| w.strip_prefix("subnet=").map(str::to_string))
            .unwrap_or_default()
    };
    let a = run("n1", "a");
    assert!(a.status.success(), "{}", text(&a));
    let old = subnet(&a);
    let rel = Command::new(NODE)
        .args([
            "nodes",
            "release",
            "n1",
            "--store",
            &store,
            "--network",
            "relnet",
        ])
        .output()
        .unwrap();
    assert!(rel.status.success(), "{}", text(&rel));
    assert!(
        String::from_utf8_lossy(&rel.stdout).contains(&old),
        "{}",
        text(&rel)
    );
    // Someone else takes it (the file store gives out the first free one).
    let b = run("n2", "b");
    assert_eq!(subnet(&b), old, "{}", text(&b));
    let back = run("n1", "c");
    assert!(back.status.success(), "{}", text(&back));
    assert_ne!(subnet(&back), old);
    let err = String::from_utf8_lossy(&back.stderr).to_string();
    assert!(
        err.contains(&format!("subnet {old} was released while it was away")),
        "{err}"
    );
}
