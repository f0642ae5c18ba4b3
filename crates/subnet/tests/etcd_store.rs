//! The `etcd://` store against a real etcd (one shared instance per test
//! binary; each test uses its own network name).
// A test that unwraps fails loudly, which is what a test should do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use evio_subnet::{
    open_store, EtcdOptions, EtcdStore, PodNetwork, StoreOptions, StoreUrl, SubnetError,
    SubnetStore,
};
use evio_testkit::etcd::Etcd;
use evio_testkit::netns::unique_name;

async fn connect(e: &Etcd) -> EtcdStore {
    EtcdStore::connect(
        &e.endpoints(),
        &EtcdOptions::default(),
        Duration::from_secs(20),
    )
    .await
    .unwrap()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn keys_round_trips_existing_release() {
    let e = Etcd::shared();
    let net = unique_name("t");
    let pod = PodNetwork::parse("10.244.0.0/16", 8).unwrap();
    rt().block_on(async {
        let s = connect(e).await;
        let a = s.allocate(&net, "node-a", &pod).await.unwrap();
        assert!(!a.existing);
        // One read (own key + taken slots), one create.
        assert_eq!(s.round_trips(), 2);
        let again = s.allocate(&net, "node-a", &pod).await.unwrap();
        assert!(again.existing);
        assert_eq!(again.subnet, a.subnet);
        assert_eq!(s.round_trips(), 3);

        let kv = e.get_prefix(&format!("/evio/{net}/"));
        let sub = a.subnet.subnet;
        let skey = format!("/evio/{net}/subnets/{}-{}", sub.network(), sub.prefix_len());
        assert_eq!(kv.len(), 2, "{kv:?}");
        assert_eq!(
            kv[0],
            (format!("/evio/{net}/nodes/node-a"), sub.to_string())
        );
        assert_eq!(kv[1].0, skey);
        let rec: serde_json::Value = serde_json::from_str(&kv[1].1).unwrap();
        assert_eq!(rec["node"], "node-a");
        assert!(rec["time"].as_str().unwrap().ends_with('Z'));

        let list = s.list(&net).await.unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].subnet, sub);
        assert_eq!(s.lookup(&net, "node-a").await.unwrap(), Some(sub));
        assert_eq!(s.release(&net, "node-a").await.unwrap(), sub);
        assert!(e.get_prefix(&format!("/evio/{net}/")).is_empty());
        assert!(matches!(
            s.release(&net, "node-a").await,
            Err(SubnetError::NotFound { .. })
        ));
    });
}

#[test]
fn precreated_keys_are_respected() {
    let e = Etcd::shared();
    let net = unique_name("t");
    // Another writer (an older layout, or an admin) holds everything but one
    // slot, with keys only in the subnets/ space.
    let pod = PodNetwork::parse("10.9.0.0/24", 3).unwrap();
    for i in 0..8u128 {
        if i == 5 {
            continue;
        }
        let n = pod.node(i).unwrap().subnet;
        let key = format!("/evio/{net}/subnets/{}-{}", n.network(), n.prefix_len());
        assert!(e
            .etcdctl(&[
                "put",
                &key,
                r#"{"node":"someone","time":"2024-01-01T00:00:00Z"}"#
            ])
            .status
            .success());
    }
    rt().block_on(async {
        let s = connect(e).await;
        let a = s.allocate(&net, "x", &pod).await.unwrap();
        assert_eq!(a.subnet.index, 5);
        let err = s.allocate(&net, "y", &pod).await.unwrap_err();
        assert!(
            matches!(err, SubnetError::Exhausted { capacity: 8, .. }),
            "{err}"
        );
        // A foreign-layout node value is refused, naming the fix.
        let other = PodNetwork::parse("10.9.0.0/24", 2).unwrap();
        let err = s.allocate(&net, "x", &other).await.unwrap_err();
        assert!(matches!(err, SubnetError::ForeignSubnet { .. }), "{err}");
    });
}

#[test]
fn concurrent_clients_in_process_get_distinct_subnets() {
    let e = Etcd::shared();
    let net = unique_name("t");
    let pod = PodNetwork::parse("10.60.0.0/16", 4).unwrap();
    rt().block_on(async {
        let mut tasks = Vec::new();
        for i in 0..24 {
            let eps = e.endpoints();
            let net = net.clone();
            tasks.push(tokio::spawn(async move {
                let s = EtcdStore::connect(&eps, &EtcdOptions::default(), Duration::from_secs(20))
                    .await
                    .unwrap();
                s.allocate(&net, &format!("n{i}"), &pod).await
            }));
        }
        let mut ok = Vec::new();
        let mut exhausted = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(a) => ok.push(a.subnet.subnet),
                Err(SubnetError::Exhausted { .. }) => exhausted += 1,
                Err(other) => panic!("{other}"),
            }
        }
        ok.sort();
        ok.dedup();
        assert_eq!(ok.len(), 16, "exactly the capacity is handed out");
        assert_eq!(exhausted, 8);
    });
}

#[test]
fn unreachable_gives_up_within_timeout() {
    // A port nothing listens on: bind, note, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = StoreUrl::parse(&format!("etcd://127.0.0.1:{port}")).unwrap();
    let opts = StoreOptions {
        timeout: Duration::from_millis(1500),
        etcd: EtcdOptions::default(),
    };
    let pod = PodNetwork::parse("10.244.0.0/16", 8).unwrap();
    let t = Instant::now();
    let r = rt().block_on(async {
        let s = open_store(&url, &opts).await?;
        s.allocate("n", "a", &pod).await
    });
    let err = r.unwrap_err();
    assert!(matches!(err, SubnetError::Unreachable { .. }), "{err}");
    assert!(err.to_string().contains("refused"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
}

/// Benchmark, not a test: `cargo test -p evio-subnet --release --test
/// etcd_store -- --ignored --nocapture bench_`. 256 allocations at
/// concurrency 32 into a /16 split 8 ways (256 slots: the last joiners
/// contend for the last free slots), each with its own client as separate
/// nodes would have.
#[test]
#[ignore]
fn bench_fill_256_at_concurrency_32() {
    let e = Etcd::shared();
    let pod = PodNetwork::parse("10.200.0.0/16", 8).unwrap();
    let rt = rt();
    let pct = |v: &mut Vec<Duration>, p: f64| {
        v.sort();
        v[((v.len() as f64 - 1.0) * p).round() as usize]
    };

    // Uncontended baseline: one allocation at a time.
    let net = unique_name("bench");
    let mut solo = Vec::new();
    rt.block_on(async {
        for i in 0..32 {
            let s = connect(e).await;
            let t = Instant::now();
            s.allocate(&net, &format!("solo{i}"), &pod).await.unwrap();
            solo.push(t.elapsed());
        }
    });
    let solo_median = pct(&mut solo, 0.5);

    let net = unique_name("bench");
    let started = Instant::now();
    let (mut lat, trips) = rt.block_on(async {
        let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(32));
        let mut tasks = Vec::new();
        for i in 0..256 {
            let sem = sem.clone();
            let eps = e.endpoints();
            let net = net.clone();
            tasks.push(tokio::spawn(async move {
                let _permit = sem.acquire().await.unwrap();
                let s = EtcdStore::connect(&eps, &EtcdOptions::default(), Duration::from_secs(30))
                    .await
                    .unwrap();
                let t = Instant::now();
                s.allocate(&net, &format!("node{i}"), &pod).await.unwrap();
                (t.elapsed(), s.round_trips())
            }));
        }
        let mut lat = Vec::new();
        let mut trips = 0;
        for t in tasks {
            let (l, r) = t.await.unwrap();
            lat.push(l);
            trips += r;
        }
        (lat, trips)
    });
    let total = started.elapsed();
    let median = pct(&mut lat, 0.5);
    let p99 = pct(&mut lat, 0.99);
    println!(
        "uncontended median {solo_median:?}; 256 @ 32: median {median:?} p99 {p99:?} \
         ({:.1}x uncontended median), {:.2} round trips/allocation, fill {total:?}",
        p99.as_secs_f64() / solo_median.as_secs_f64(),
        trips as f64 / 256.0
    );
    let s = rt.block_on(connect(e));
    assert_eq!(rt.block_on(s.list(&net)).unwrap().len(), 256);
}

#[test]
fn lost_subnet_key_is_repaired_and_orphans_are_releasable() {
    let e = Etcd::shared();
    let net = unique_name("t");
    let pod = PodNetwork::parse("10.70.0.0/24", 2).unwrap();
    rt().block_on(async {
        let s = connect(e).await;
        let a = s.allocate(&net, "a", &pod).await.unwrap().subnet.subnet;
        let skey = format!("/evio/{net}/subnets/{}-{}", a.network(), a.prefix_len());
        // The subnet key vanishes (hand edit): the restart puts it back, so
        // the slot cannot be given to someone else.
        assert!(e.etcdctl(&["del", &skey]).status.success());
        let again = s.allocate(&net, "a", &pod).await.unwrap();
        assert!(again.existing);
        let kv = e.get_prefix(&skey);
        assert_eq!(kv.len(), 1, "subnet key recreated");
        assert!(kv[0].1.contains("\"node\":\"a\""));
        for n in ["b", "c", "d"] {
            assert_ne!(s.allocate(&net, n, &pod).await.unwrap().subnet.subnet, a);
        }
        // Now the node key vanishes instead: release still frees the slot.
        assert!(e
            .etcdctl(&["del", &format!("/evio/{net}/nodes/a")])
            .status
            .success());
        assert!(matches!(
            s.allocate(&net, "e", &pod).await,
            Err(SubnetError::Exhausted { .. })
        ));
        assert_eq!(s.release(&net, "a").await.unwrap(), a);
        assert_eq!(s.allocate(&net, "e", &pod).await.unwrap().subnet.subnet, a);
    });
}

mod overlay {
    use super::*;
    use evio_subnet::{Liveness, OverlayStore, PeerRecord, ReleaseRequest};
    use std::net::IpAddr;

    fn record(node: &str, key: &str) -> PeerRecord {
        serde_json::from_value(serde_json::json!({
            "node": node, "publicKey": key, "podSubnet": "10.244.3.0/24",
            "endpoints": [], "heartbeat": "2026-01-01T00:00:00Z"
        }))
        .unwrap()
    }

    /// 128 nodes starting together: the first attempt of each goes for
    /// the lowest free address, losers spread over 1, 2, 4 ... 64 of the
    /// lowest free ones, so all succeed with distinct addresses in a dozen
    /// rounds (with every loser on the lowest free one, the last would need
    /// 128 rounds and hit the 64-attempt cap).
    #[test]
    fn host_addresses_race_to_the_lowest_free_values_and_survive_reconnects() {
        const RACERS: usize = 128;
        let e = Etcd::shared();
        let net = unique_name("h");
        let cidr: ipnet::IpNet = "10.10.0.0/23".parse().unwrap();
        rt().block_on(async {
            let mut tasks = Vec::new();
            for i in 0..RACERS {
                let (eps, net) = (e.endpoints(), net.clone());
                tasks.push(tokio::spawn(async move {
                    let s =
                        EtcdStore::connect(&eps, &EtcdOptions::default(), Duration::from_secs(30))
                            .await
                            .unwrap();
                    s.allocate_host(&net, &format!("n{i}"), cidr, None)
                        .await
                        .unwrap()
                }));
            }
            let mut got: Vec<IpAddr> = Vec::new();
            let mut rounds = Vec::new();
            for t in tasks {
                let a = t.await.unwrap();
                assert!(!a.existing);
                got.push(a.addr);
                rounds.push(a.rounds);
            }
            got.sort();
            got.dedup();
            assert_eq!(got.len(), RACERS, "distinct addresses");
            let max = *rounds.iter().max().unwrap();
            let mean = rounds.iter().sum::<u32>() as f64 / RACERS as f64;
            eprintln!("{RACERS} racers: max {max} rounds, mean {mean:.2}");
            // Someone went first with the lowest free address.
            assert_eq!(got[0], "10.10.0.1".parse::<IpAddr>().unwrap());
            assert!(rounds.contains(&1));
            // Spread by at most 64 per lost round: nothing far above the
            // lowest free addresses.
            let top: IpAddr = "10.10.0.192".parse().unwrap();
            assert!(*got.last().unwrap() <= top, "{:?}", got.last());
            assert!(max < 32, "contention settled in {max} rounds");
            let s = connect(e).await;
            let first = s.allocate_host(&net, "n0", cidr, None).await.unwrap();
            assert!(first.existing);
            assert_eq!(s.release_host(&net, "n0").await.unwrap(), Some(first.addr));
            assert_eq!(s.release_host(&net, "n0").await.unwrap(), None);
            // A lone newcomer, with no race, fills the lowest gap.
            let held: Vec<IpAddr> = got.into_iter().filter(|a| *a != first.addr).collect();
            let lowest = (1..=255)
                .map(|i| format!("10.10.0.{i}").parse::<IpAddr>().unwrap())
                .find(|a| !held.contains(a))
                .unwrap();
            let lone = s.allocate_host(&net, "late", cidr, None).await.unwrap();
            assert_eq!((lone.addr, lone.rounds), (lowest, 1));
            // Two nodes starting together still get .1 and .2 (the one
            // loss of the slower one spreads over 1 address).
            let net2 = unique_name("h2");
            let s2 = connect(e).await;
            let (a, b) = tokio::join!(
                s.allocate_host(&net2, "x", cidr, None),
                s2.allocate_host(&net2, "y", cidr, None)
            );
            let mut two = [a.unwrap().addr, b.unwrap().addr];
            two.sort();
            assert_eq!(two.map(|a| a.to_string()), ["10.10.0.1", "10.10.0.2"]);
        });
    }

    /// Nodes racing for the same requested address: exactly one gets it,
    /// the others are refused naming the winner and hold nothing.
    #[test]
    fn a_requested_host_address_goes_to_one_racer_and_is_refused_to_the_rest() {
        let e = Etcd::shared();
        let net = unique_name("hr");
        let cidr: ipnet::IpNet = "10.10.0.0/16".parse().unwrap();
        let want: IpAddr = "10.10.0.1".parse().unwrap();
        rt().block_on(async {
            let mut tasks = Vec::new();
            for i in 0..8 {
                let (eps, net) = (e.endpoints(), net.clone());
                tasks.push(tokio::spawn(async move {
                    let s =
                        EtcdStore::connect(&eps, &EtcdOptions::default(), Duration::from_secs(20))
                            .await
                            .unwrap();
                    let node = format!("n{i}");
                    (
                        node.clone(),
                        s.allocate_host(&net, &node, cidr, Some(want)).await,
                    )
                }));
            }
            let mut winners = Vec::new();
            let mut refused = Vec::new();
            for t in tasks {
                match t.await.unwrap() {
                    (n, Ok(h)) => {
                        assert_eq!(h.addr, want);
                        winners.push(n);
                    }
                    (
                        n,
                        Err(SubnetError::HostAddressTaken {
                            holder, address, ..
                        }),
                    ) => {
                        assert_eq!(address, want);
                        refused.push((n, holder));
                    }
                    (n, Err(e)) => panic!("{n}: {e}"),
                }
            }
            assert_eq!(winners.len(), 1, "{winners:?}");
            assert_eq!(refused.len(), 7);
            assert!(refused.iter().all(|(_, h)| *h == winners[0]), "{refused:?}");
            // Only the winner's two keys exist.
            let kv = e.get_prefix(&format!("/evio/{net}/"));
            let keys: Vec<&str> = kv.iter().map(|(k, _)| k.as_str()).collect();
            assert_eq!(
                keys,
                [
                    format!("/evio/{net}/hostaddrs/10.10.0.1"),
                    format!("/evio/{net}/hostnodes/{}", winners[0])
                ],
                "{kv:?}"
            );
            // The winner restarts and asks again: its own; a loser without
            // the request gets the next one.
            let s = connect(e).await;
            let again = s
                .allocate_host(&net, &winners[0], cidr, Some(want))
                .await
                .unwrap();
            assert!(again.existing);
            let other = s
                .allocate_host(&net, &refused[0].0, cidr, None)
                .await
                .unwrap();
            assert_eq!(other.addr.to_string(), "10.10.0.2");
            let e2 = s
                .allocate_host(
                    &net,
                    &refused[0].0,
                    cidr,
                    Some("10.10.0.9".parse().unwrap()),
                )
                .await
                .unwrap_err();
            assert!(matches!(e2, SubnetError::HostAddressHeld { .. }), "{e2:?}");
        });
    }

    fn now_record(node: &str, key: &str) -> PeerRecord {
        let mut r = record(node, key);
        r.stamp();
        r
    }

    /// Issue 22: a new connection takes the last one's watch and sees
    /// what changed in between from the revision it had, without reading
    /// the network again; only after etcd compacted past that revision does
    /// it read everything.
    #[test]
    fn a_new_connection_resumes_the_watch_and_reads_again_only_after_a_compaction() {
        let e = Etcd::shared();
        let net = unique_name("r");
        let names = |s: &evio_subnet::PeerSnapshot| -> Vec<String> {
            s.records.iter().map(|r| r.node.clone()).collect()
        };
        let ttl = Duration::from_secs(30);
        let wait = Duration::from_secs(10);
        rt().block_on(async {
            let s = connect(e).await;
            let w = connect(e).await;
            let empty = w.peers(&net).await.unwrap();
            s.publish(&net, &now_record("a", "ka"), ttl).await.unwrap();
            let seen = w.watch_peers(&net, &empty, wait).await.unwrap().expect("a");
            assert_eq!(names(&seen), ["a"]);
            let followed = w.detach_watch().expect("a watch to carry over");
            drop(w);
            // Written while no connection watched.
            s.publish(&net, &now_record("b", "kb"), ttl).await.unwrap();
            let w = connect(e).await;
            w.resume_watch(followed);
            let trips = w.round_trips();
            let next = w.watch_peers(&net, &seen, wait).await.unwrap().expect("b");
            assert_eq!(names(&next), ["a", "b"]);
            assert_eq!(w.round_trips(), trips, "the resumed watch read the network");

            let followed = w.detach_watch().expect("a watch to carry over");
            drop(w);
            s.publish(&net, &now_record("c", "kc"), ttl).await.unwrap();
            // One revision more, outside the network, so that compacting at
            // the newest revision removes the one the watch resumes from.
            let other = format!("/evio-test/{net}");
            assert!(e.etcdctl(&["put", &other, "x"]).status.success());
            let out = e.etcdctl(&["get", &other, "-w", "json"]);
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let rev = v["header"]["revision"].as_i64().expect("a revision");
            let out = e.etcdctl(&["compact", &rev.to_string()]);
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let w = connect(e).await;
            w.resume_watch(followed);
            let trips = w.round_trips();
            let after = w.watch_peers(&net, &next, wait).await.unwrap().expect("c");
            assert_eq!(names(&after), ["a", "b", "c"]);
            assert!(w.round_trips() > trips, "compacted, yet not read again");
        });
    }

    #[test]
    fn liveness_hangs_on_a_lease_and_watchers_see_changes() {
        let e = Etcd::shared();
        let net = unique_name("p");
        rt().block_on(async {
            let s = connect(e).await;
            let w = connect(e).await;
            let empty = w.peers(&net).await.unwrap();
            assert!(empty.records.is_empty());
            let watch = {
                let net = net.clone();
                tokio::spawn(
                    async move { w.watch_peers(&net, &empty, Duration::from_secs(10)).await },
                )
            };
            tokio::time::sleep(Duration::from_millis(200)).await;
            s.publish(&net, &now_record("a", "k"), Duration::from_secs(5))
                .await
                .unwrap();
            let seen = watch.await.unwrap().unwrap().expect("the watch fires");
            assert_eq!(seen.records.len(), 1);
            assert!(seen.live.contains_key("a"), "{seen:?}");
            let connected = vec!["b".to_string()];
            assert_eq!(
                s.refresh(&net, "a", &connected).await.unwrap(),
                Liveness::Alive
            );
            let snap = s.peers(&net).await.unwrap();
            assert_eq!(snap.live["a"].connected, connected);
            // The record is durable, the liveness is what hangs on the lease.
            let json = e.etcdctl(&["get", "--prefix", &format!("/evio/{net}/"), "-w", "json"]);
            let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
            for kv in v["kvs"].as_array().unwrap() {
                let k = String::from_utf8(base64_decode(kv["key"].as_str().unwrap())).unwrap();
                let leased = kv.get("lease").is_some_and(|l| l.as_i64() != Some(0));
                assert_eq!(leased, k.contains("/alive/"), "{k}: {kv}");
            }
            // Deleted by someone else while our lease lives: revoked, and
            // the liveness went with the record.
            assert!(s.remove_peer(&net, "a").await.unwrap());
            assert_eq!(s.refresh(&net, "a", &[]).await.unwrap(), Liveness::Revoked);
            let snap = s.peers(&net).await.unwrap();
            assert!(snap.records.is_empty() && snap.live.is_empty(), "{snap:?}");
        });
    }

    /// Issue 22: the watcher keeps one watch and applies its events to
    /// what it read once; after puts, liveness updates and deletes by
    /// another client, and changes made while nobody waited, what it sees
    /// is what a fresh read sees.
    #[test]
    fn a_watcher_follows_puts_and_deletes_as_a_fresh_read_sees_them() {
        let e = Etcd::shared();
        let net = unique_name("w");
        rt().block_on(async {
            let s = connect(e).await;
            let w = connect(e).await;
            let mut seen = w.peers(&net).await.unwrap();
            let same = |a: &evio_subnet::PeerSnapshot, b: &evio_subnet::PeerSnapshot| {
                a.records == b.records && a.live == b.live && a.alloc == b.alloc
            };
            for round in 0..3 {
                for i in 0..8 {
                    let node = format!("n{i}");
                    match round {
                        0 => s
                            .publish(
                                &net,
                                &now_record(&node, &format!("k{i}")),
                                Duration::from_secs(30),
                            )
                            .await
                            .unwrap(),
                        1 => {
                            s.refresh(&net, &node, &["n0".to_string()]).await.unwrap();
                        }
                        _ => {
                            if i % 2 == 0 {
                                s.remove_peer(&net, &node).await.unwrap();
                            }
                        }
                    }
                }
                // Some changes land while nobody waits on the watch.
                let deadline = Instant::now() + Duration::from_secs(20);
                loop {
                    let want = s.peers(&net).await.unwrap();
                    if same(&seen, &want) {
                        break;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "round {round}: the watcher sees {seen:?}\nthe store has {want:?}"
                    );
                    if let Some(next) = w
                        .watch_peers(&net, &seen, Duration::from_secs(2))
                        .await
                        .unwrap()
                    {
                        seen = next;
                    }
                }
            }
            assert_eq!(seen.records.len(), 4);
            assert!(seen.live.values().all(|a| a.connected == ["n0"]));
        });
    }

    /// etcdctl's JSON output has base64 keys.
    fn base64_decode(s: &str) -> Vec<u8> {
        let out = std::process::Command::new("base64")
            .arg("-d")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin.take().unwrap().write_all(s.as_bytes())?;
                c.wait_with_output()
            })
            .unwrap();
        out.stdout
    }

    #[test]
    fn a_lapsed_lease_makes_the_node_stale_keeps_its_record_and_a_restart_adopts_the_lease() {
        let e = Etcd::shared();
        let net = unique_name("l");
        rt().block_on(async {
            let s = connect(e).await;
            // etcd's minimum TTL is 5 s (the store clamps to it).
            s.publish(&net, &now_record("a", "k"), Duration::from_secs(5))
                .await
                .unwrap();
            // A restarted agent (a new client) takes the lease over: the
            // node stays live without publishing again.
            let lease = s.lease_id().expect("a lease");
            let restarted = connect(e).await;
            restarted.adopt_lease(lease);
            assert_eq!(
                restarted.refresh(&net, "a", &[]).await.unwrap(),
                Liveness::Alive
            );
            drop(restarted);
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let snap = s.peers(&net).await.unwrap();
                if !snap.live.contains_key("a") {
                    // Stale, not gone: the record is still there.
                    assert_eq!(snap.records.len(), 1, "{snap:?}");
                    break;
                }
                assert!(Instant::now() < deadline, "liveness outlived its lease");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            assert_eq!(s.refresh(&net, "a", &[]).await.unwrap(), Liveness::Expired);
            // Publishing again takes a fresh lease.
            s.publish(&net, &now_record("a", "k"), Duration::from_secs(5))
                .await
                .unwrap();
            assert_eq!(s.refresh(&net, "a", &[]).await.unwrap(), Liveness::Alive);
            assert!(s.peers(&net).await.unwrap().live.contains_key("a"));
        });
    }

    /// `nodes release`: a node's subnet, host address, record and
    /// liveness go in one transaction and a note says why; a live node, or
    /// one a live node vouches for, is refused without force.
    #[test]
    fn dual_stack_host_addresses_in_etcd() {
        let e = Etcd::shared();
        let net = unique_name("d6");
        rt().block_on(async {
            let s = connect(e).await;
            crate::file_store::overlay::dual_stack_host_addresses(&s, &net).await;
        });
        // The IPv6 literal is the key as it is (etcd keys are bytes).
        assert_eq!(
            e.get_prefix(&format!("/evio/{net}/hostaddrs/fd00:10::7"))
                .len(),
            1
        );
        assert_eq!(
            e.get_prefix(&format!("/evio/{net}/hostnodes6/e")),
            vec![(
                format!("/evio/{net}/hostnodes6/e"),
                "fd00:10::7".to_string()
            )]
        );
    }

    #[test]
    fn release_node_frees_everything_at_once_and_refuses_live_nodes() {
        let e = Etcd::shared();
        let net = unique_name("r");
        let pod = PodNetwork::parse("10.244.0.0/16", 8).unwrap();
        let cidr: ipnet::IpNet = "10.10.0.0/16".parse().unwrap();
        let req = |force| ReleaseRequest {
            force,
            reason: "release".into(),
            by: "test".into(),
        };
        rt().block_on(async {
            let s = connect(e).await;
            for n in ["a", "b", "c"] {
                s.allocate(&net, n, &pod).await.unwrap();
                s.allocate_host(&net, n, cidr, None).await.unwrap();
            }
            // a is live; b is live and has a tunnel to c; c's agent is gone.
            let sa = connect(e).await;
            sa.publish(&net, &now_record("a", "ka"), Duration::from_secs(30))
                .await
                .unwrap();
            let sb = connect(e).await;
            sb.publish(&net, &now_record("b", "kb"), Duration::from_secs(30))
                .await
                .unwrap();
            sb.refresh(&net, "b", &["c".to_string()]).await.unwrap();
            s.publish(&net, &record("c", "kc"), Duration::from_secs(30))
                .await
                .unwrap();
            // c's liveness goes as a lapsed lease would take it.
            e.etcdctl(&["del", &format!("/evio/{net}/alive/c")]);

            for n in ["a", "c"] {
                let err = s.release_node(&net, n, &req(false)).await.unwrap_err();
                assert!(matches!(err, SubnetError::NodeLive { .. }), "{n}: {err}");
            }
            assert!(e.get_prefix(&format!("/evio/{net}/released/")).is_empty());
            // b stops vouching: c is released.
            sb.refresh(&net, "b", &[]).await.unwrap();
            let before = s.peers(&net).await.unwrap();
            let c_subnet = before.alloc.subnets["c"];
            let freed = s.release_node(&net, "c", &req(false)).await.unwrap();
            assert_eq!(freed.subnet, Some(c_subnet));
            assert_eq!(freed.host, before.alloc.hosts.get("c").copied());
            assert!(freed.record && !freed.was_live);
            let c_host = before.alloc.hosts["c"].to_string();
            let c_key = format!("{}-{}", c_subnet.network(), c_subnet.prefix_len());
            let left: Vec<String> = e
                .get_prefix(&format!("/evio/{net}/"))
                .into_iter()
                .map(|(k, _)| k)
                .filter(|k| k.ends_with("/c") || k.ends_with(&c_key) || k.ends_with(&c_host))
                .collect();
            assert_eq!(left, vec![format!("/evio/{net}/released/c")]);
            let snap = s.peers(&net).await.unwrap();
            let note = &snap.released["c"];
            assert_eq!(note.reason, "release");
            assert_eq!(note.subnet, Some(c_subnet.to_string()));
            let row = snap.nodes().into_iter().find(|n| n.node == "c").unwrap();
            assert!(row.subnet.is_none() && row.released.is_some());
            // The freed subnet is free again.
            let used: Vec<_> = s.list(&net).await.unwrap();
            assert!(!used.iter().any(|l| l.subnet == c_subnet));
            // Forced: a live node goes too, and its agent learns it.
            let freed = s.release_node(&net, "a", &req(true)).await.unwrap();
            assert!(freed.was_live && freed.subnet.is_some());
            assert_eq!(sa.refresh(&net, "a", &[]).await.unwrap(), Liveness::Revoked);
            assert!(matches!(
                s.release_node(&net, "zz", &req(true)).await,
                Err(SubnetError::NotFound { .. })
            ));
            assert!(s.forget_released(&net, "c").await.unwrap());
            assert!(!s.forget_released(&net, "c").await.unwrap());
        });
    }
}
