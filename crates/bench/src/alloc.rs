//! Section 2: node subnet allocation with `evio-node config-gen` against
//! etcd (started here) and the file store: contended whole fill,
//! uncontended sequential, and store round trips per allocation.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use evio_subnet::{open_store, PodNetwork, StoreOptions, StoreUrl};
use evio_testkit::etcd::EtcdCluster;
use serde_json::json;

use crate::cleanup;
use crate::error::{BenchError, Result};
use crate::exec::{self, Spec};
use crate::latency::{fan_out, verdict};
use crate::node::Tools;
use crate::report::Table;
use crate::stats::{ms, Summary};

const POD_CIDR: &str = "10.244.0.0/16";
const UNCONTENDED: usize = 32;

#[derive(Debug, Clone)]
pub struct Opts {
    pub allocations: usize,
    pub concurrency: usize,
}

/// nodeBits whose 2^bits slots `n` allocations fill exactly (when `n` is a
/// power of two): the benchmark is a whole fill, the hardest case for
/// collisions.
pub fn node_bits_for(n: usize) -> u32 {
    let mut b = 1;
    while (1usize << b) < n && b < 14 {
        b += 1;
    }
    b
}

/// The `subnet=` token of config-gen's success line.
pub fn subnet_of(stdout: &str) -> Option<String> {
    stdout
        .split_whitespace()
        .find_map(|t| t.strip_prefix("subnet="))
        .map(str::to_string)
}

struct Run {
    times: Vec<Duration>,
    wall: Duration,
    /// CPU (user+sys) of each process; empty for in-process runs.
    cpu: Vec<Duration>,
}

/// `count` config-gens (node names `<network>-n<i>`), `workers` at a time.
fn config_gens(
    tools: &Tools,
    dir: &Path,
    store: &str,
    network: &str,
    node_bits: u32,
    count: usize,
    workers: usize,
) -> Result<Run> {
    let conf_path = dir.join(format!("{network}.json"));
    let conf = json!({
        "name": network,
        "podCIDR": POD_CIDR,
        "nodeBits": node_bits,
        "bridgeType": "linux",
    });
    std::fs::write(&conf_path, conf.to_string())
        .map_err(BenchError::io(format!("write {}", conf_path.display())))?;
    let subnets = Mutex::new(BTreeSet::new());
    let cpu = Mutex::new(vec![Duration::ZERO; count]);
    let (times, wall) = fan_out(count, workers, |i| {
        let node = format!("{network}-n{i}");
        let out_dir = dir.join(&node);
        let spec = Spec::new(&tools.evio_node)
            .args([
                "config-gen".to_string(),
                "--config".into(),
                conf_path.display().to_string(),
                "--node-name".into(),
                node.clone(),
                "--store".into(),
                store.to_string(),
                "--cni-conf-dir".into(),
                out_dir.display().to_string(),
                "--timeout".into(),
                "30".into(),
            ])
            .timeout(Duration::from_secs(40));
        let o = exec::run(&spec)?.ok(&format!("config-gen {node} ({store})"))?;
        let subnet = subnet_of(&o.stdout).ok_or_else(|| {
            BenchError::output(format!("config-gen {node}"), o.stdout.trim().to_string())
        })?;
        if let Ok(mut s) = subnets.lock() {
            if !s.insert(subnet.clone()) {
                return Err(BenchError::failed(
                    format!("config-gen {node}"),
                    format!("subnet {subnet} was handed out twice"),
                ));
            }
        }
        if let Ok(mut c) = cpu.lock() {
            c[i] = o.cpu;
        }
        Ok(o.wall)
    })?;
    Ok(Run {
        times,
        wall,
        cpu: cpu.into_inner().unwrap_or_default(),
    })
}

/// The same allocations through the evio-subnet library in this process
/// (one store, `workers` tasks), which exposes the store's round-trip
/// counter.
fn library(
    store: &str,
    network: &str,
    node_bits: u32,
    count: usize,
    workers: usize,
) -> Result<(Run, u64)> {
    let url = StoreUrl::parse(store).map_err(|source| BenchError::Store {
        what: format!("parse {store}"),
        source,
    })?;
    let pod = PodNetwork::parse(POD_CIDR, node_bits).map_err(|source| BenchError::Store {
        what: "pod network".into(),
        source,
    })?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(BenchError::io("start tokio runtime"))?;
    rt.block_on(async move {
        let s = open_store(&url, &StoreOptions::default())
            .await
            .map_err(|source| BenchError::Store {
                what: format!("open {store}"),
                source,
            })?;
        let s: Arc<dyn evio_subnet::SubnetStore> = Arc::from(s);
        let before = s.round_trips();
        let next = Arc::new(AtomicUsize::new(0));
        let times = Arc::new(Mutex::new(vec![Duration::ZERO; count]));
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..workers.clamp(1, count.max(1)) {
            let (s, next, times) = (s.clone(), next.clone(), times.clone());
            let network = network.to_string();
            tasks.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= count {
                        return Ok(());
                    }
                    cleanup::check()?;
                    let t = Instant::now();
                    s.allocate(&network, &format!("{network}-n{i}"), &pod)
                        .await
                        .map_err(|source| BenchError::Store {
                            what: format!("allocate {network}-n{i}"),
                            source,
                        })?;
                    if let Ok(mut v) = times.lock() {
                        v[i] = t.elapsed();
                    }
                }
            }));
        }
        for t in tasks {
            t.await
                .map_err(|e| BenchError::failed("allocation task", e.to_string()))??;
        }
        let wall = start.elapsed();
        let trips = s.round_trips() - before;
        let times = times.lock().map(|v| v.clone()).unwrap_or_default();
        Ok((
            Run {
                times,
                wall,
                cpu: Vec::new(),
            },
            trips,
        ))
    })
}

/// `grpc_server_handled_total` per method from etcd's /metrics: every
/// request the server answered, whoever sent it.
pub fn grpc_counts(metrics: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in metrics.lines() {
        let Some(rest) = line.strip_prefix("grpc_server_handled_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once('}') else {
            continue;
        };
        let method = labels
            .split(',')
            .find_map(|kv| kv.trim().strip_prefix("grpc_method="))
            .map(|m| m.trim_matches('"').to_string());
        if let (Some(m), Ok(v)) = (method, value.trim().parse::<f64>()) {
            *out.entry(m).or_insert(0.0) += v;
        }
    }
    out.retain(|_, v| *v > 0.0);
    out
}

fn http_get(addr: &str, path: &str) -> Result<String> {
    let what = format!("GET http://{addr}{path}");
    let sa: SocketAddr = addr
        .parse()
        .map_err(|e| BenchError::failed(&what, format!("{e}")))?;
    let mut s = TcpStream::connect_timeout(&sa, Duration::from_secs(5))
        .map_err(BenchError::io(what.clone()))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .and_then(|()| s.set_write_timeout(Some(Duration::from_secs(10))))
        .map_err(BenchError::io(what.clone()))?;
    // HTTP/1.0: the server closes after the body and does not chunk it.
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .map_err(BenchError::io(what.clone()))?;
    let mut body = String::new();
    s.read_to_string(&mut body)
        .map_err(BenchError::io(what.clone()))?;
    match body.split_once("\r\n\r\n") {
        Some((head, b)) if head.starts_with("HTTP/1.") && head.contains(" 200 ") => Ok(b.into()),
        _ => Err(BenchError::output(
            what,
            body.chars().take(200).collect::<String>(),
        )),
    }
}

fn diff(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, v)| *v > 0.0)
        .collect()
}

struct Row {
    store: String,
    how: String,
    n: usize,
    workers: usize,
    run: Run,
    trips: Option<f64>,
    trips_note: String,
}

pub fn run(tools: &Tools, opts: &Opts) -> Result<String> {
    tools.require(&[&tools.evio_node])?;
    let n = opts.allocations.max(1);
    let workers = opts.concurrency.max(1);
    let bits = node_bits_for(n);
    let seq_n = UNCONTENDED.min(n);
    let dir = tempfile::Builder::new()
        .prefix("evio-bench-alloc-")
        .tempdir()
        .map_err(BenchError::io("create alloc dir"))?;
    let etcd = EtcdCluster::start(1);
    let ep = etcd.endpoints().into_iter().next().unwrap_or_default();
    let file_url = format!("file://{}", dir.path().join("subnets.json").display());
    let mut rows = Vec::new();
    for (label, url) in [("etcd", etcd.store_url()), ("file", file_url)] {
        let is_etcd = label == "etcd";
        let metrics = || -> Result<BTreeMap<String, f64>> {
            if is_etcd {
                Ok(grpc_counts(&http_get(&ep, "/metrics")?))
            } else {
                Ok(BTreeMap::new())
            }
        };
        cleanup::check()?;
        let before = metrics()?;
        let fill = config_gens(tools, dir.path(), &url, "fill", bits, n, workers)?;
        let per = diff(&before, &metrics()?);
        let total: f64 = per.values().sum();
        rows.push(Row {
            store: label.into(),
            how: "config-gen processes, whole fill".into(),
            n,
            workers,
            run: fill,
            trips: is_etcd.then_some(total / n as f64),
            trips_note: if is_etcd {
                per.iter()
                    .map(|(k, v)| format!("{k} {:.2}", v / n as f64))
                    .collect::<Vec<_>>()
                    .join(", ")
            } else {
                "not observable from outside the process".into()
            },
        });
        cleanup::check()?;
        let before = metrics()?;
        let seq = config_gens(tools, dir.path(), &url, "seq", bits, seq_n, 1)?;
        let per = diff(&before, &metrics()?);
        let total: f64 = per.values().sum();
        rows.push(Row {
            store: label.into(),
            how: "config-gen processes, one at a time (uncontended)".into(),
            n: seq_n,
            workers: 1,
            run: seq,
            trips: is_etcd.then_some(total / seq_n as f64),
            trips_note: String::new(),
        });
        cleanup::check()?;
        let (lib_seq, trips) = library(&url, "libseq", bits, seq_n, 1)?;
        rows.push(Row {
            store: label.into(),
            how: "evio-subnet library in one process, one at a time".into(),
            n: seq_n,
            workers: 1,
            run: lib_seq,
            trips: Some(trips as f64 / seq_n as f64),
            trips_note: String::new(),
        });
        cleanup::check()?;
        let (lib, trips) = library(&url, "lib", bits, n, workers)?;
        rows.push(Row {
            store: label.into(),
            how: "evio-subnet library in one process, whole fill".into(),
            n,
            workers,
            run: lib,
            trips: Some(trips as f64 / n as f64),
            trips_note: "the store's own round-trip counter".into(),
        });
    }
    drop(etcd);
    Ok(render(n, bits, &rows))
}

fn render(n: usize, bits: u32, rows: &[Row]) -> String {
    let mut t = Table::new([
        "store",
        "run",
        "allocations",
        "concurrency",
        "median ms",
        "p99 ms",
        "max ms",
        "CPU ms / process (median)",
        "whole run (s)",
        "round trips / allocation",
        "per request type",
    ]);
    for r in rows {
        let s = Summary::of(&r.run.times);
        t.row([
            r.store.clone(),
            r.how.clone(),
            r.n.to_string(),
            r.workers.to_string(),
            ms(s.median),
            ms(s.p99),
            ms(s.max),
            if r.run.cpu.is_empty() {
                "n/a".into()
            } else {
                ms(Summary::of(&r.run.cpu).median)
            },
            format!("{:.2}", r.run.wall.as_secs_f64()),
            r.trips.map_or("n/a".into(), |x| format!("{x:.2}")),
            r.trips_note.clone(),
        ]);
    }
    let mut targets = Table::new(["target", "store", "measured", "verdict"]);
    for store in ["etcd", "file"] {
        let find = |how: &str| {
            rows.iter()
                .find(|r| r.store == store && r.how.starts_with(how))
        };
        for (kind, fill_how) in [
            ("config-gen processes", "config-gen processes, whole"),
            (
                "library in one process",
                "evio-subnet library in one process, whole",
            ),
        ] {
            let Some(fill) = find(fill_how) else {
                continue;
            };
            let s = Summary::of(&fill.run.times);
            let r = s.max.as_secs_f64() / s.median.as_secs_f64();
            targets.row([
                format!(
                    "fairness: no allocation of the {}-way fill waits > 10× its median ({kind})",
                    fill.workers
                ),
                store.to_string(),
                format!("{r:.2}× (max {} ms)", ms(s.max)),
                verdict(r, 10.0),
            ]);
            if kind.starts_with("config-gen") {
                let w = fill.run.wall.as_secs_f64();
                targets.row([
                    format!("whole fill ({n}) < 5 s"),
                    store.to_string(),
                    format!("{w:.2} s"),
                    verdict(w, 5.0),
                ]);
            }
        }
    }
    format!(
        "`evio-node config-gen` processes, each its own store client, allocating in podCIDR \
         {POD_CIDR} with nodeBits {bits}: {n} allocations fill every slot. etcd is a \
         single member on loopback (data in /dev/shm) started by the benchmark; the file \
         store is a locked JSON file in a temp dir. etcd round trips are every gRPC request \
         the server answered during the run (its `grpc_server_handled_total`), divided by \
         the number of allocations.\n\n{}\n### Targets\n\n{}",
        t.render(),
        targets.render()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_bits_cover_the_allocations() {
        assert_eq!(node_bits_for(256), 8);
        assert_eq!(node_bits_for(200), 8);
        assert_eq!(node_bits_for(32), 5);
        assert_eq!(node_bits_for(1), 1);
    }

    #[test]
    fn subnet_is_read_from_the_success_line() {
        let l = "node=a subnet=10.244.3.0/24 gateway=10.244.3.1 range=x-y allocation=new";
        assert_eq!(subnet_of(l).as_deref(), Some("10.244.3.0/24"));
        assert_eq!(subnet_of("nothing"), None);
    }

    #[test]
    fn grpc_counters_are_summed_per_method() {
        let m = r#"# HELP grpc_server_handled_total x
grpc_server_handled_total{grpc_code="OK",grpc_method="Range",grpc_service="etcdserverpb.KV",grpc_type="unary"} 12
grpc_server_handled_total{grpc_code="Unavailable",grpc_method="Range",grpc_service="etcdserverpb.KV",grpc_type="unary"} 1
grpc_server_handled_total{grpc_code="OK",grpc_method="Txn",grpc_service="etcdserverpb.KV",grpc_type="unary"} 5
grpc_server_handled_total{grpc_code="OK",grpc_method="Put",grpc_service="etcdserverpb.KV",grpc_type="unary"} 0
grpc_server_started_total{grpc_method="Txn"} 9
"#;
        let c = grpc_counts(m);
        assert_eq!(c.get("Range"), Some(&13.0));
        assert_eq!(c.get("Txn"), Some(&5.0));
        assert!(!c.contains_key("Put"));
        let d = diff(&BTreeMap::from([("Txn".to_string(), 2.0)]), &c);
        assert_eq!(d.get("Txn"), Some(&3.0));
    }
}
