//! Section 6: Kubernetes Services through evio (issue 19). Pod to pod and
//! pod to a ClusterIP (kube-proxy's own iptables rules in the node netns,
//! written by `evio_testkit::services`), side by side on both bridge types,
//! and what evio's Services path costs pod-to-pod traffic: on OVS its
//! conntrack flows (every IP packet goes through a `ct` lookup in evio's
//! zone), on a Linux bridge its per-bridge `nf_call_iptables`. The anchor
//! is the same bed with that path switched off, measured in the same run,
//! alternating: on OVS a higher-priority `ip,actions=NORMAL` flow (another
//! cookie) bypasses evio's pipeline, which is the bridge as it was before
//! issue 19; on Linux the bridge's `nf_call_iptables` goes to 0.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use evio_testkit::netns::{run_in_netns_path, Netns};
use evio_testkit::services::{self, PeerServer, Proto, Service};

use crate::cleanup;
use crate::datapath::{at_least, uplink, Kind};
use crate::error::{BenchError, Result};
use crate::iperf;
use crate::node::{add_result_ip, Attach, Mode, Node, Tools, BRIDGE};
use crate::report::Table;
use crate::stats::Summary;

#[derive(Debug, Clone)]
pub struct Opts {
    pub seconds: u32,
    pub repeats: usize,
    /// Request/response round trips per latency measurement.
    pub round_trips: usize,
    /// New connections per connect-time measurement.
    pub connects: usize,
}

const CLUSTER_IP: &str = "10.96.0.10";
const IPERF_PORT: u16 = 5201;
const ECHO_PORT: u16 = 7000;
/// Cookie of the bypass flow: not evio's, so evio never touches it.
const BYPASS_COOKIE: &str = "0x62797061737300";

/// Field order is drop order: servers, then nodes (OVS before its netns).
struct Bed {
    _echo: PeerServer,
    nodes: Vec<Node>,
    server: Netns,
    client: Netns,
    server_ip: IpAddr,
    kind: Kind,
    label: &'static str,
}

fn bed(tools: &Tools, label: &'static str, kind: Kind, cross: bool) -> Result<Bed> {
    let mode = match kind {
        Kind::Linux => Mode::EvioLinux,
        Kind::Ovs => Mode::EvioOvs,
    };
    let node = |octet| -> Result<Node> {
        let mut n = Node::new(mode, tools, octet)?;
        // As the DaemonSet's ConfigMap: ClusterIPs route to the gateway.
        n.conf["isDefaultGateway"] = true.into();
        if kind == Kind::Linux {
            // Only evio's per-bridge option may send bridged traffic
            // through iptables, as in the Services tests.
            for v in ["iptables", "ip6tables"] {
                n.sh(&["sysctl", "-qw", &format!("net.bridge.bridge-nf-call-{v}=0")])?;
            }
        }
        Ok(n)
    };
    let n1 = node(3)?;
    let server = cleanup::netns("ebp");
    let client = cleanup::netns("ebp");
    let out = n1.add(&Attach::new(&server))?;
    let server_ip: IpAddr = add_result_ip(&out.stdout)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| BenchError::output("evio ADD", out.stdout.clone()))?;
    let mut nodes = vec![n1];
    if cross {
        let n2 = node(4)?;
        n2.add(&Attach::new(&client))?;
        uplink(
            &nodes[0].ns,
            &n2.ns,
            kind,
            [nodes[0].ovs.as_ref(), n2.ovs.as_ref()],
        )?;
        nodes.push(n2);
    } else {
        nodes[0].add(&Attach::new(&client))?;
    }
    let cip: IpAddr = CLUSTER_IP
        .parse()
        .map_err(|_| BenchError::output("ClusterIP", CLUSTER_IP))?;
    let svcs = [
        Service::new("iperf", Proto::Tcp, cip, IPERF_PORT)
            .endpoint(SocketAddr::new(server_ip, IPERF_PORT)),
        Service::new("echo", Proto::Tcp, cip, ECHO_PORT)
            .endpoint(SocketAddr::new(server_ip, ECHO_PORT)),
    ];
    for n in &nodes {
        services::program(
            &n.ns,
            services::Mode::Iptables,
            &svcs,
            "10.244.0.0/16",
            "10.96.0.0/16",
            &[],
        )
        .map_err(|e| BenchError::failed("kube-proxy rules", e))?;
    }
    let echo = PeerServer::start(server.path(), SocketAddr::new(server_ip, ECHO_PORT));
    Ok(Bed {
        _echo: echo,
        nodes,
        server,
        client,
        server_ip,
        kind,
        label,
    })
}

impl Bed {
    /// Switches evio's Services path on every node: on, as evio leaves it;
    /// off, the bridge as before issue 19.
    fn services_path(&self, on: bool) -> Result<()> {
        for n in &self.nodes {
            match (self.kind, n.ovs.as_ref()) {
                (Kind::Linux, _) => {
                    let v = if on { "1" } else { "0" };
                    n.sh(&[
                        "ip",
                        "link",
                        "set",
                        BRIDGE,
                        "type",
                        "bridge",
                        "nf_call_iptables",
                        v,
                        "nf_call_ip6tables",
                        v,
                    ])?;
                }
                (Kind::Ovs, Some(o)) => {
                    let out = if on {
                        o.ofctl(&["del-flows", BRIDGE, &format!("cookie={BYPASS_COOKIE}/-1")])
                    } else {
                        let f = format!("cookie={BYPASS_COOKIE},priority=300,ip,actions=NORMAL");
                        let f6 = f.replace(",ip,", ",ipv6,");
                        let a = o.ofctl(&["add-flow", BRIDGE, &f]);
                        if !a.status.success() {
                            a
                        } else {
                            o.ofctl(&["add-flow", BRIDGE, &f6])
                        }
                    };
                    if !out.status.success() {
                        return Err(BenchError::failed(
                            "ovs-ofctl (Services path switch)",
                            String::from_utf8_lossy(&out.stderr).trim().to_string(),
                        ));
                    }
                }
                (Kind::Ovs, None) => return Err(BenchError::failed("ovs", "no OVS on the node")),
            }
        }
        Ok(())
    }

    /// Removes the address pairs the OVS pipeline learned (nothing to do
    /// on a Linux bridge), so the next pod-to-pod run is a pair's first.
    fn forget_pairs(&self) -> Result<()> {
        for n in &self.nodes {
            if let Some(o) = n.ovs.as_ref() {
                let out = o.ofctl(&["del-flows", BRIDGE, &format!("cookie={LEARNED_COOKIE}/-1")]);
                if !out.status.success() {
                    return Err(BenchError::failed(
                        "ovs-ofctl (forget learned pairs)",
                        String::from_utf8_lossy(&out.stderr).trim().to_string(),
                    ));
                }
            }
        }
        Ok(())
    }

    fn to(&self, service: bool, port: u16) -> SocketAddr {
        let ip = if service {
            CLUSTER_IP.parse().unwrap_or(self.server_ip)
        } else {
            self.server_ip
        };
        SocketAddr::new(ip, port)
    }
}

/// What one path measured.
#[derive(Default)]
struct Sample {
    gbits: Vec<f64>,
    rr: Vec<Duration>,
    connect: Vec<Duration>,
}

fn io(what: &'static str) -> impl Fn(std::io::Error) -> BenchError {
    move |e| BenchError::failed(what, e.to_string())
}

/// `n` one-byte round trips over one connection to the echo server.
fn round_trips(client: &Netns, to: SocketAddr, n: usize) -> Result<Vec<Duration>> {
    let s = run_in_netns_path(&client.path(), || {
        TcpStream::connect_timeout(&to, Duration::from_secs(3))
    })
    .map_err(io("connect to the echo server"))?;
    s.set_nodelay(true).map_err(io("nodelay"))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))
        .map_err(io("read timeout"))?;
    let mut r = BufReader::new(s.try_clone().map_err(io("clone"))?);
    let mut w = s;
    let mut greeting = String::new();
    r.read_line(&mut greeting).map_err(io("echo greeting"))?;
    let mut b = [0u8; 1];
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        w.write_all(b"x").map_err(io("echo write"))?;
        r.read_exact(&mut b).map_err(io("echo read"))?;
        out.push(t.elapsed());
    }
    Ok(out)
}

/// Time of `n` TCP handshakes (connect() returning), each a new connection
/// and, through a ClusterIP, a new DNAT.
fn connects(client: &Netns, to: SocketAddr, n: usize) -> Result<Vec<Duration>> {
    run_in_netns_path(&client.path(), || {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            let s = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
            out.push(t.elapsed());
            drop(s);
        }
        Ok(out)
    })
    .map_err(io("connect"))
}

/// Paths measured on each bed, in the order of the table.
/// The cookie of the address pairs evio's OVS pipeline learns
/// (`evio_plugin::switch::flows::LEARNED_COOKIE`).
const LEARNED_COOKIE: &str = "0x6576696f80000002";

/// Label, Services path on, through the ClusterIP, the pair forgotten
/// first (OVS: a pair that never talked through a Service).
const PATHS: [(&str, bool, bool, bool); 4] = [
    ("pod → pod, Services path off (before)", false, false, true),
    ("pod → pod", true, false, true),
    ("pod → ClusterIP → pod", true, true, false),
    (
        "pod → pod, the pair also uses the ClusterIP",
        true,
        false,
        false,
    ),
];

fn measure(b: &Bed, opts: &Opts, samples: &mut [Sample; 4]) -> Result<()> {
    for (k, (path, on, service, forget)) in PATHS.iter().enumerate() {
        cleanup::check()?;
        b.services_path(*on)?;
        if *forget {
            b.forget_pairs()?;
        }
        measure_path(b, opts, *service, &mut samples[k])
            .map_err(|e| BenchError::failed(format!("{}: {path}", b.label), e.to_string()))?;
    }
    b.services_path(true)
}

fn measure_path(b: &Bed, opts: &Opts, service: bool, s: &mut Sample) -> Result<()> {
    let ip = b.server_ip.to_string();
    let to = b.to(service, IPERF_PORT).ip().to_string();
    let t = iperf::run_to(&b.server, &ip, &b.client, &to, opts.seconds, 1)?;
    s.gbits.push(t.gbits);
    let echo = b.to(service, ECHO_PORT);
    s.rr.extend(round_trips(&b.client, echo, opts.round_trips)?);
    s.connect.extend(connects(&b.client, echo, opts.connects)?);
    Ok(())
}

fn us(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1e6)
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

pub fn run(tools: &Tools, opts: &Opts) -> Result<String> {
    tools.require(&[&tools.evio, &tools.host_local()])?;
    let mut t = Table::new([
        "bridge, topology",
        "path",
        "Gbit/s (mean of runs)",
        "vs before",
        "RR median µs",
        "RR p99 µs",
        "connect median µs",
        "connect p99 µs",
        "pod → pod ≥ 0.95× before",
    ]);
    for (label, kind, cross) in [
        ("Linux bridge, same node", Kind::Linux, false),
        ("Linux bridge, two nodes", Kind::Linux, true),
        ("OVS netdev, same node", Kind::Ovs, false),
        ("OVS netdev, two nodes", Kind::Ovs, true),
    ] {
        cleanup::check()?;
        let b = bed(tools, label, kind, cross)?;
        let mut samples: [Sample; 4] = Default::default();
        for _ in 0..opts.repeats.max(1) {
            measure(&b, opts, &mut samples)?;
        }
        let before = mean(&samples[0].gbits);
        for (k, (path, ..)) in PATHS.iter().enumerate() {
            let s = &samples[k];
            let (rr, c) = (Summary::of(&s.rr), Summary::of(&s.connect));
            let ratio = mean(&s.gbits) / before;
            t.row([
                if k == 0 {
                    label.to_string()
                } else {
                    String::new()
                },
                path.to_string(),
                format!(
                    "{:.2} ({})",
                    mean(&s.gbits),
                    s.gbits
                        .iter()
                        .map(|g| format!("{g:.2}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                if k == 0 {
                    "1.00×".into()
                } else {
                    format!("{ratio:.2}×")
                },
                us(rr.median),
                us(rr.p99),
                us(c.median),
                us(c.p99),
                if k == 1 || k == 3 {
                    at_least(ratio, 0.95)
                } else {
                    String::new()
                },
            ]);
        }
    }
    Ok(format!(
        "Pods added by the `evio` plugin (`isDefaultGateway`), kube-proxy's own iptables-mode \
         rules (written by `evio_testkit::services` as kube-proxy's sync loop would; no control \
         plane runs here) in every node netns, the node netns's global `bridge-nf-call-iptables` \
         0. Two nodes: each its own netns and bridge (and OVS), joined by a veth uplink. Per \
         path and run: iperf3, one TCP stream, {} s (to the pod, or to the ClusterIP that DNATs \
         to it); {} one-byte request/response round trips over one TCP connection; {} TCP \
         connects (each a new connection, through a ClusterIP a new DNAT). {} run(s) per bed, \
         the four paths alternating. On OVS only pairs of addresses a connection from the host \
         joined go through conntrack: *pod → pod* is a pair that never talked through a Service \
         (learned pairs removed first), the last row the same pair right after it did. *Services path off (before)*: the same bed with evio's \
         Services path bypassed: on OVS a priority-300 `ip,actions=NORMAL` flow above evio's \
         conntrack pipeline (the bridge as before issue 19), on a Linux bridge \
         `nf_call_iptables 0`; ClusterIPs do not work then. *vs before* is throughput against \
         that anchor.\n\n{}",
        opts.seconds,
        opts.round_trips,
        opts.connects,
        opts.repeats.max(1),
        t.render()
    ))
}
