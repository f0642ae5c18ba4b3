//! The embedded `file://` store: allocation semantics, locking between
//! independent openers, and what it refuses to touch.
// A test that unwraps fails loudly, which is what a test should do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use evio_subnet::{FileStore, PodNetwork, SubnetError, SubnetStore};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn store(dir: &tempfile::TempDir) -> FileStore {
    FileStore::new(
        dir.path().join("state/subnets.json"),
        Duration::from_secs(10),
    )
}

#[test]
fn allocate_existing_release_list() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(&dir);
    let pod = PodNetwork::parse("10.244.0.0/16", 8).unwrap();
    rt().block_on(async {
        let a = s.allocate("net1", "a", &pod).await.unwrap();
        assert!(!a.existing);
        assert_eq!(a.subnet.subnet.to_string(), "10.244.0.0/24");
        let b = s.allocate("net1", "b", &pod).await.unwrap();
        assert_eq!(b.subnet.subnet.to_string(), "10.244.1.0/24");
        // Networks are independent namespaces.
        let other = s.allocate("net2", "a", &pod).await.unwrap();
        assert_eq!(other.subnet.index, 0);
        let again = s.allocate("net1", "a", &pod).await.unwrap();
        assert!(again.existing);
        assert_eq!(again.subnet, a.subnet);
        assert_eq!(s.lookup("net1", "b").await.unwrap(), Some(b.subnet.subnet));
        let list = s.list("net1").await.unwrap();
        let names: Vec<_> = list
            .iter()
            .map(|l| (l.subnet.to_string(), l.record.node.clone()))
            .collect();
        assert_eq!(
            names,
            vec![
                ("10.244.0.0/24".into(), "a".into()),
                ("10.244.1.0/24".into(), "b".into())
            ]
        );
        assert!(!list[0].record.time.is_empty());
        assert_eq!(s.release("net1", "a").await.unwrap(), a.subnet.subnet);
        assert!(matches!(
            s.release("net1", "a").await,
            Err(SubnetError::NotFound { .. })
        ));
        assert_eq!(s.lookup("net1", "a").await.unwrap(), None);
        // The freed slot is handed out again.
        let c = s.allocate("net1", "c", &pod).await.unwrap();
        assert_eq!(c.subnet.subnet.to_string(), "10.244.0.0/24");
    });
    let meta = std::fs::metadata(dir.path().join("state/subnets.json")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o777, 0o644);
}

#[test]
fn exhaustion_is_clean() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(&dir);
    let pod = PodNetwork::parse("192.168.7.0/24", 2).unwrap();
    rt().block_on(async {
        for n in ["n0", "n1", "n2", "n3"] {
            s.allocate("x", n, &pod).await.unwrap();
        }
        let before = std::fs::read(s.path()).unwrap();
        let e = s.allocate("x", "n4", &pod).await.unwrap_err();
        assert!(
            matches!(e, SubnetError::Exhausted { capacity: 4, .. }),
            "{e}"
        );
        assert_eq!(std::fs::read(s.path()).unwrap(), before);
        // An existing node still gets its subnet when the space is full.
        assert!(s.allocate("x", "n2", &pod).await.unwrap().existing);
    });
}

#[test]
fn layout_change_is_refused_and_overlaps_blocked() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(&dir);
    let old = PodNetwork::parse("10.244.0.0/16", 8).unwrap();
    let new = PodNetwork::parse("10.244.0.0/16", 4).unwrap();
    rt().block_on(async {
        s.allocate("n", "a", &old).await.unwrap();
        let e = s.allocate("n", "a", &new).await.unwrap_err();
        assert!(matches!(e, SubnetError::ForeignSubnet { .. }), "{e}");
        assert!(e.to_string().contains("release"), "{e}");
        // 10.244.0.0/24 (old layout) lies inside new slot 0 (10.244.0.0/20).
        let b = s.allocate("n", "b", &new).await.unwrap();
        assert_eq!(b.subnet.subnet.to_string(), "10.244.16.0/20");
    });
}

#[test]
fn corrupt_file_is_reported_not_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(&dir);
    std::fs::create_dir_all(s.path().parent().unwrap()).unwrap();
    std::fs::write(s.path(), b"{ not json").unwrap();
    let pod = PodNetwork::parse("10.244.0.0/16", 8).unwrap();
    let e = rt().block_on(s.allocate("n", "a", &pod)).unwrap_err();
    assert!(matches!(e, SubnetError::Corrupt { .. }), "{e}");
    assert_eq!(std::fs::read(s.path()).unwrap(), b"{ not json");
}

#[test]
fn bad_names_rejected_before_touching_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(&dir);
    let pod = PodNetwork::parse("10.244.0.0/16", 8).unwrap();
    rt().block_on(async {
        for (net, node) in [("n", "../x"), ("a/b", "x"), ("", "x"), ("n", "")] {
            assert!(matches!(
                s.allocate(net, node, &pod).await,
                Err(SubnetError::InvalidName { .. })
            ));
        }
    });
    assert!(!s.path().exists());
}

/// Separate `FileStore`s open separate file descriptions, so their flocks
/// exclude each other exactly as separate processes' would.
#[test]
fn concurrent_openers_get_distinct_subnets() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let pod = PodNetwork::parse("10.50.0.0/16", 5).unwrap();
    let handles: Vec<_> = (0..32)
        .map(|i| {
            let dir = Arc::clone(&dir);
            std::thread::spawn(move || {
                let s = store(&dir);
                rt().block_on(s.allocate("c", &format!("node{i}"), &pod))
                    .unwrap()
                    .subnet
                    .subnet
            })
        })
        .collect();
    let mut got: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    got.sort();
    got.dedup();
    assert_eq!(got.len(), 32);
    let s = store(&dir);
    assert_eq!(rt().block_on(s.list("c")).unwrap().len(), 32);
    assert!(matches!(
        rt().block_on(s.allocate("c", "one-too-many", &pod)),
        Err(SubnetError::Exhausted { .. })
    ));
}

#[test]
fn lock_wait_is_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("subnets.json");
    let lock = dir.path().join("subnets.json.lock");
    std::fs::write(&lock, b"").unwrap();
    // Another process holds the lock for longer than our timeout.
    // --no-fork: the lock holder is the process we kill below, not a child
    // that would keep the lock after flock itself dies.
    let mut holder = Command::new("flock")
        .arg("--no-fork")
        .arg(&lock)
        .args(["sleep", "5"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the holder really has it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Command::new("flock")
        .args(["-n"])
        .arg(&lock)
        .arg("true")
        .status()
        .unwrap()
        .success()
    {
        assert!(
            Instant::now() < deadline,
            "flock holder never took the lock"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let s = FileStore::new(path.clone(), Duration::from_millis(300));
    let pod = PodNetwork::parse("10.244.0.0/16", 8).unwrap();
    let t = Instant::now();
    let e = rt().block_on(s.allocate("n", "a", &pod)).unwrap_err();
    assert!(matches!(e, SubnetError::LockTimeout { .. }), "{e}");
    assert!(t.elapsed() < Duration::from_secs(2));
    assert!(!path.exists());
    let _ = holder.kill();
    let _ = holder.wait();
    // Released: now it works.
    let s = FileStore::new(path, Duration::from_secs(5));
    rt().block_on(s.allocate("n", "a", &pod)).unwrap();
}

#[test]
fn lost_subnet_entry_is_repaired_and_orphans_are_releasable() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(&dir);
    let pod = PodNetwork::parse("10.70.0.0/24", 1).unwrap();
    let edit = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(s.path()).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(s.path(), serde_json::to_vec(&v).unwrap()).unwrap();
    };
    rt().block_on(async {
        let a = s.allocate("n", "a", &pod).await.unwrap().subnet.subnet;
        edit(&|v| {
            v["networks"]["n"]["subnets"]
                .as_object_mut()
                .unwrap()
                .clear();
        });
        assert!(s.allocate("n", "a", &pod).await.unwrap().existing);
        let b = s.allocate("n", "b", &pod).await.unwrap().subnet.subnet;
        assert_ne!(a, b, "repaired entry keeps the slot taken");
        edit(&|v| {
            v["networks"]["n"]["nodes"]
                .as_object_mut()
                .unwrap()
                .remove("a");
        });
        assert!(matches!(
            s.allocate("n", "c", &pod).await,
            Err(SubnetError::Exhausted { .. })
        ));
        assert_eq!(s.release("n", "a").await.unwrap(), a);
        assert_eq!(s.allocate("n", "c", &pod).await.unwrap().subnet.subnet, a);
    });
}

pub mod overlay {
    use super::*;
    use evio_subnet::{Liveness, OverlayStore, PeerRecord, PeerSnapshot, ReleaseRequest};
    use std::net::IpAddr;

    pub fn record(node: &str, key: &str) -> PeerRecord {
        serde_json::from_value(serde_json::json!({
            "node": node, "publicKey": key, "hostAddress": "10.10.0.3/16",
            "podSubnet": "10.244.3.0/24", "endpoints": ["192.168.1.2:5800"],
            "candidates": [{"addr": "192.168.1.2:5800", "kind": "local"}],
            "heartbeat": "2026-01-01T00:00:00Z"
        }))
        .unwrap()
    }

    /// Issue 25, for both stores: a dual-stack host overlay gives a node
    /// one address per family, the IPv6 one in its own slot
    /// (`hostnodes6/`) beside the first (`hostnodes/`, what older agents
    /// read), from the one `hostaddrs/` space keyed by the IPv6 literal;
    /// lowest free, requested, restart-stable, released with the node.
    pub async fn dual_stack_host_addresses(s: &dyn OverlayStore, net: &str) {
        use evio_subnet::HostSlot::{First, Ipv6};
        let v4: ipnet::IpNet = "10.10.0.0/16".parse().unwrap();
        let v6: ipnet::IpNet = "fd00:10::/64".parse().unwrap();
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let a4 = s.allocate_host_in(net, "a", First, v4, None).await.unwrap();
        let a6 = s.allocate_host_in(net, "a", Ipv6, v6, None).await.unwrap();
        assert_eq!((a4.addr, a6.addr), (ip("10.10.0.1"), ip("fd00:10::1")));
        let b4 = s.allocate_host_in(net, "b", First, v4, None).await.unwrap();
        let b6 = s
            .allocate_host_in(net, "b", Ipv6, v6, Some(ip("fd00:10::7")))
            .await
            .unwrap();
        assert_eq!((b4.addr, b6.addr), (ip("10.10.0.2"), ip("fd00:10::7")));
        // Taken, naming the holder; nothing written for c.
        let e = s
            .allocate_host_in(net, "c", Ipv6, v6, Some(ip("fd00:10::7")))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, SubnetError::HostAddressTaken { holder, .. } if holder == "b"),
            "{e:?}"
        );
        // Restart-stable, both.
        let again = s.allocate_host_in(net, "a", Ipv6, v6, None).await.unwrap();
        assert_eq!((again.addr, again.existing), (a6.addr, true));
        let again = s.allocate_host(net, "a", v4, None).await.unwrap();
        assert_eq!((again.addr, again.existing), (a4.addr, true));
        // An IPv6-only host overlay (one prefix) uses the first slot, from
        // the same addresses: fd00:10::1 is a's.
        let d = s.allocate_host(net, "d", v6, None).await.unwrap();
        assert_eq!(d.addr, ip("fd00:10::2"));
        let alloc = s.allocations(net).await.unwrap();
        assert_eq!(alloc.hosts["a"], a4.addr);
        assert_eq!(alloc.hosts["d"], d.addr);
        assert_eq!(alloc.hosts6["a"], a6.addr);
        assert_eq!(alloc.hosts6["b"], b6.addr);
        assert_eq!(alloc.hosts6.len(), 2);
        // The snapshot the agents follow says the same, and so does
        // `evio-node nodes list`.
        let snap = s.peers(net).await.unwrap();
        assert_eq!(snap.alloc, alloc);
        let row = snap.nodes().into_iter().find(|n| n.node == "a").unwrap();
        assert_eq!((row.host, row.host6), (Some(a4.addr), Some(a6.addr)));
        // One slot released leaves the other.
        assert_eq!(
            s.release_host_in(net, "a", Ipv6).await.unwrap(),
            Some(a6.addr)
        );
        let alloc = s.allocations(net).await.unwrap();
        assert!(!alloc.hosts6.contains_key("a") && alloc.hosts["a"] == a4.addr);
        // Releasing the node frees both of its addresses.
        let req = ReleaseRequest {
            force: false,
            reason: "release".into(),
            by: "test".into(),
        };
        s.release_node(net, "b", &req).await.unwrap();
        let alloc = s.allocations(net).await.unwrap();
        assert!(!alloc.hosts.contains_key("b") && !alloc.hosts6.contains_key("b"));
        let e6 = s
            .allocate_host_in(net, "e", Ipv6, v6, Some(ip("fd00:10::7")))
            .await
            .unwrap();
        assert_eq!(e6.addr, ip("fd00:10::7"));
    }

    #[test]
    fn dual_stack_host_addresses_in_the_file_store() {
        let dir = tempfile::tempdir().unwrap();
        rt().block_on(async {
            dual_stack_host_addresses(&store(&dir), "n").await;
        });
        // An older version's fields would survive a rewrite: the network
        // keeps keys it does not know.
        let path = dir.path().join("state/subnets.json");
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert!(v["networks"]["n"]["hostnodes6"]["e"] == "fd00:10::7", "{v}");
        v["networks"]["n"]["future"] = serde_json::json!({"x": 1});
        std::fs::write(&path, v.to_string()).unwrap();
        rt().block_on(async {
            let s = store(&dir);
            s.allocate_host("n", "f", "10.10.0.0/16".parse().unwrap(), None)
                .await
                .unwrap();
        });
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(v["networks"]["n"]["future"]["x"], 1, "{v}");
    }

    #[test]
    fn host_addresses_are_lowest_free_requested_and_restart_stable() {
        let dir = tempfile::tempdir().unwrap();
        let cidr: ipnet::IpNet = "10.10.0.0/16".parse().unwrap();
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        rt().block_on(async {
            let s = store(&dir);
            // The public node asks for .1 before anyone else is there.
            let p = s
                .allocate_host("n", "public", cidr, Some(ip("10.10.0.1")))
                .await
                .unwrap();
            assert_eq!((p.addr, p.existing), (ip("10.10.0.1"), false));
            // The others take the lowest free addresses in order.
            let a = s.allocate_host("n", "a", cidr, None).await.unwrap();
            assert_eq!((a.addr, a.existing), (ip("10.10.0.2"), false));
            let b = s.allocate_host("n", "b", cidr, None).await.unwrap();
            assert_eq!(b.addr, ip("10.10.0.3"));
            // A taken address is refused, naming its holder, and nothing is
            // written: "c" holds no address afterwards.
            let before = std::fs::read(dir.path().join("state/subnets.json")).unwrap();
            let e = s
                .allocate_host("n", "c", cidr, Some(ip("10.10.0.1")))
                .await
                .unwrap_err();
            assert!(
                matches!(&e, SubnetError::HostAddressTaken { holder, .. } if holder == "public"),
                "{e:?}"
            );
            assert!(e.to_string().contains("\"public\""), "{e}");
            let after = std::fs::read(dir.path().join("state/subnets.json")).unwrap();
            assert_eq!(before, after, "a refused request wrote to the store");
            assert_eq!(s.allocations("n").await.unwrap().hosts.get("c"), None);
            // A restarted agent (a second opener) gets its address back...
            let again = store(&dir)
                .allocate_host("n", "a", cidr, None)
                .await
                .unwrap();
            assert_eq!((again.addr, again.existing), (a.addr, true));
            let again = store(&dir)
                .allocate_host("n", "a", cidr, Some(a.addr))
                .await
                .unwrap();
            assert_eq!((again.addr, again.existing), (a.addr, true));
            // ...but asking for another one while holding one is refused.
            let e = s
                .allocate_host("n", "a", cidr, Some(ip("10.10.0.9")))
                .await
                .unwrap_err();
            assert!(matches!(e, SubnetError::HostAddressHeld { .. }), "{e:?}");
            let e = s
                .allocate_host("n", "c", cidr, Some(ip("10.11.0.1")))
                .await
                .unwrap_err();
            assert!(matches!(e, SubnetError::HostAddressOutside { .. }), "{e:?}");
            assert_eq!(s.release_host("n", "a").await.unwrap(), Some(a.addr));
            assert_eq!(s.release_host("n", "a").await.unwrap(), None);
            let c = s.allocate_host("n", "c", cidr, None).await.unwrap();
            assert_eq!(
                c.addr, a.addr,
                "a released address is the lowest free again"
            );
        });
    }

    #[test]
    fn concurrent_host_allocations_never_collide() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/subnets.json");
        // A /27 has 30 usable addresses: 24 nodes racing for the lowest
        // free one must end up with .1 to .24, each once.
        let cidr: ipnet::IpNet = "10.10.0.0/27".parse().unwrap();
        let handles: Vec<_> = (0..24)
            .map(|i| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let s = FileStore::new(path, Duration::from_secs(20));
                    rt().block_on(s.allocate_host("n", &format!("node{i}"), cidr, None))
                        .unwrap()
                        .addr
                })
            })
            .collect();
        let mut got: Vec<IpAddr> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        got.sort();
        got.dedup();
        let want: Vec<IpAddr> = (1..=24)
            .map(|i| format!("10.10.0.{i}").parse().unwrap())
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn publish_refresh_watch_and_revocation() {
        let dir = tempfile::tempdir().unwrap();
        rt().block_on(async {
            let s = store(&dir);
            let empty = s.peers("n").await.unwrap();
            assert!(empty.records.is_empty());
            // Nothing changes: the watch times out.
            assert_eq!(
                s.watch_peers("n", &empty, Duration::from_millis(300))
                    .await
                    .unwrap(),
                None
            );
            let mut r = record("a", "k1");
            s.publish("n", &r, Duration::from_secs(30)).await.unwrap();
            let snap: PeerSnapshot = s
                .watch_peers("n", &empty, Duration::from_secs(5))
                .await
                .unwrap()
                .expect("a publish is seen by a watcher");
            assert_eq!(snap.records, vec![r.clone()]);
            // A heartbeat changes the record's liveness time.
            let before = s.peers("n").await.unwrap().records[0].heartbeat.clone();
            assert_eq!(s.refresh("n", "a", &[]).await.unwrap(), Liveness::Alive);
            let after = s.peers("n").await.unwrap().records[0].heartbeat.clone();
            assert_ne!(before, after);
            r.endpoints.push("203.0.113.9:5800".into());
            s.publish("n", &r, Duration::from_secs(30)).await.unwrap();
            assert_eq!(s.peers("n").await.unwrap().records[0].endpoints.len(), 2);
            // Someone deletes the record: the owner learns it was revoked.
            assert!(s.remove_peer("n", "a").await.unwrap());
            assert!(!s.remove_peer("n", "a").await.unwrap());
            assert_eq!(s.refresh("n", "a", &[]).await.unwrap(), Liveness::Revoked);
            assert!(s.peers("n").await.unwrap().records.is_empty());
            // Subnet allocations in the same file are untouched by all this.
            let pod = PodNetwork::parse("10.244.0.0/16", 8).unwrap();
            s.allocate("n", "a", &pod).await.unwrap();
            s.publish("n", &r, Duration::from_secs(30)).await.unwrap();
            assert_eq!(
                s.lookup("n", "a").await.unwrap().map(|n| n.to_string()),
                Some("10.244.0.0/24".into())
            );
        });
    }

    /// The file store's liveness is the heartbeat: a node whose agent
    /// stopped refreshing turns stale (its record stays); release frees
    /// everything of a stale node at once and refuses a live one.
    #[test]
    fn stale_by_heartbeat_release_and_its_note() {
        let dir = tempfile::tempdir().unwrap();
        let pod = PodNetwork::parse("10.244.0.0/16", 8).unwrap();
        let cidr: ipnet::IpNet = "10.10.0.0/16".parse().unwrap();
        let req = |force| ReleaseRequest {
            force,
            reason: "reclaimAfter".into(),
            by: "node-x".into(),
        };
        rt().block_on(async {
            let s = store(&dir);
            for n in ["a", "b"] {
                s.allocate("n", n, &pod).await.unwrap();
                s.allocate_host("n", n, cidr, None).await.unwrap();
            }
            let mut live = record("a", "ka");
            live.stamp();
            s.publish("n", &live, Duration::from_secs(30))
                .await
                .unwrap();
            // b's agent last spoke long ago.
            s.publish("n", &record("b", "kb"), Duration::from_secs(30))
                .await
                .unwrap();
            let snap = s.peers("n").await.unwrap();
            assert!(snap.live.contains_key("a") && !snap.live.contains_key("b"));
            assert_eq!(snap.records.len(), 2, "a stale record stays");
            // a vouches for b while it has a tunnel to it.
            s.refresh("n", "a", &["b".to_string()]).await.unwrap();
            let e = s.release_node("n", "b", &req(false)).await.unwrap_err();
            assert!(matches!(e, SubnetError::NodeLive { .. }), "{e}");
            s.refresh("n", "a", &[]).await.unwrap();
            let e = s.release_node("n", "a", &req(false)).await.unwrap_err();
            assert!(e.to_string().contains("--force"), "{e}");
            let b_subnet = snap.alloc.subnets["b"];
            let freed = s.release_node("n", "b", &req(false)).await.unwrap();
            assert_eq!(freed.subnet, Some(b_subnet));
            assert!(freed.host.is_some() && freed.record);
            let after = s.peers("n").await.unwrap();
            let row = after.nodes().into_iter().find(|r| r.node == "b").unwrap();
            assert_eq!((row.subnet, row.host, row.public_key), (None, None, None));
            assert_eq!(row.released.as_ref().map(|r| r.by.as_str()), Some("node-x"));
            assert_eq!(s.lookup("n", "b").await.unwrap(), None);
            // The subnet is free: the next node takes it (first free).
            let c = s.allocate("n", "c", &pod).await.unwrap();
            assert_eq!(c.subnet.subnet, b_subnet);
            assert!(s.forget_released("n", "b").await.unwrap());
            assert!(matches!(
                s.release_node("n", "b", &req(true)).await,
                Err(SubnetError::NotFound { .. })
            ));
        });
    }
}
