//! The Services row of `evio-sim up`: kube-proxy's own NAT rules (written
//! by `evio_testkit::services`, standing in for kube-proxy's sync loop: no
//! API server can run here) in every node netns, one ClusterIP per node
//! backed by a pod on the next node, and Debian's dnsmasq as the cluster DNS
//! in a pod behind a ClusterIP. Each node's first pod connects to its
//! ClusterIP over TCP and asks the cluster DNS for it over UDP and TCP.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use evio_testkit::cluster::Cluster;
pub use evio_testkit::services::Mode;
use evio_testkit::services::{self, dig, peer_seen, Dnsmasq, PeerServer, Proto, Service};

pub const SERVICE_CIDR: &str = "10.96.0.0/16";
const DNS_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 53);
const ENDPOINT_PORT: u16 = 8080;
/// Bounds each probe's retries: a tunnel the reachability matrix just used
/// is up, so this only absorbs a slow first handshake.
const PROBE_FOR: Duration = Duration::from_secs(15);

fn cluster_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 96, 1, (i % 250) as u8 + 1))
}

fn dns_name(i: usize) -> String {
    format!("svc-{i}.default.svc.cluster.local")
}

/// One client pod's probes.
pub struct Row {
    client: String,
    client_ip: IpAddr,
    to: SocketAddr,
    endpoint: String,
    /// The source address the endpoint saw (the client's own, unless
    /// something masqueraded).
    tcp: Result<IpAddr, String>,
    dns_udp: Result<Vec<String>, String>,
    dns_tcp: Result<Vec<String>, String>,
    want_dns: String,
}

pub struct Report {
    mode: Mode,
    dns_pod: String,
    rows: Vec<Row>,
}

/// Why the cluster has no Services row, if it cannot have one.
pub fn unsupported(c: &Cluster) -> Option<&'static str> {
    if c.nodes().len() < 2 {
        Some("needs 2 nodes or more (endpoints on another node)")
    } else if c.nodes().iter().any(|n| n.pods.is_empty()) {
        Some("needs a pod on every node")
    } else if !c.opts().pod_cidr.contains('.') {
        Some("IPv4 pod CIDRs only here")
    } else {
        None
    }
}

/// Programs the rules, starts the servers, probes, and removes the rules
/// again (servers and dnsmasq stop on return).
pub fn probe(c: &Cluster, mode: Mode) -> Result<Report, String> {
    let nodes = c.nodes();
    let n = nodes.len();
    let last = &nodes[n - 1];
    let dns_pod = &last.pods[last.pods.len() - 1];
    let mut svcs = Vec::new();
    let mut servers = Vec::new();
    let mut records = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let ep = &nodes[(i + 1) % n].pods[0];
        let addr = SocketAddr::new(ep.ip, ENDPOINT_PORT);
        servers.push(PeerServer::start(
            node.pods[0].pod.ns.path(),
            SocketAddr::new(node.pods[0].ip, ENDPOINT_PORT),
        ));
        svcs.push(Service::new(&format!("svc-{i}"), Proto::Tcp, cluster_ip(i), 80).endpoint(addr));
        records.push((dns_name(i), cluster_ip(i)));
    }
    let dns_ep = SocketAddr::new(dns_pod.ip, 53);
    for proto in [Proto::Udp, Proto::Tcp] {
        svcs.push(Service::new("kube-dns", proto, IpAddr::V4(DNS_IP), 53).endpoint(dns_ep));
    }
    let recs: Vec<(&str, IpAddr)> = records.iter().map(|(s, ip)| (s.as_str(), *ip)).collect();
    let _dns = Dnsmasq::start(&dns_pod.pod.ns, dns_pod.ip, &recs);
    for node in nodes {
        services::program(&node.ns, mode, &svcs, &c.opts().pod_cidr, SERVICE_CIDR, &[])
            .map_err(|e| format!("{}: {e}", node.name))?;
    }
    let rows = nodes
        .iter()
        .enumerate()
        .map(|(i, node)| probe_one(c, i, &node.pods[0]))
        .collect();
    for node in nodes {
        services::clear(&node.ns);
    }
    drop(servers);
    Ok(Report {
        mode,
        dns_pod: format!("{} {}", dns_pod.name, dns_pod.ip),
        rows,
    })
}

fn probe_one(c: &Cluster, i: usize, client: &evio_testkit::cluster::SimPod) -> Row {
    let nodes = c.nodes();
    let ep = &nodes[(i + 1) % nodes.len()].pods[0];
    let to = SocketAddr::new(cluster_ip(i), 80);
    let path = client.pod.ns.path();
    let tcp = retry(|| peer_seen(&path, to));
    let dns = IpAddr::V4(DNS_IP);
    let ask = |tcp| retry(|| dig(&client.pod.ns, dns, &dns_name(i), tcp));
    Row {
        client: client.name.clone(),
        client_ip: client.ip,
        to,
        endpoint: format!("{} {}:{ENDPOINT_PORT}", ep.name, ep.ip),
        tcp,
        dns_udp: ask(false),
        dns_tcp: ask(true),
        want_dns: cluster_ip(i).to_string(),
    }
}

fn retry<T>(mut f: impl FnMut() -> Result<T, String>) -> Result<T, String> {
    let deadline = Instant::now() + PROBE_FOR;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(300)),
        }
    }
}

impl Row {
    fn tcp_ok(&self) -> bool {
        self.tcp.as_ref().is_ok_and(|seen| *seen == self.client_ip)
    }

    fn dns_ok(r: &Result<Vec<String>, String>, want: &str) -> bool {
        r.as_ref().is_ok_and(|a| a.len() == 1 && a[0] == want)
    }

    fn cells(&self) -> [String; 6] {
        let tcp = match &self.tcp {
            Ok(_) if self.tcp_ok() => "✓ (endpoint saw the pod)".to_string(),
            Ok(seen) => format!("✗ endpoint saw {seen}"),
            Err(_) => "✗".to_string(),
        };
        let dns = |r: &Result<Vec<String>, String>| {
            if Row::dns_ok(r, &self.want_dns) {
                format!("✓ {}", self.want_dns)
            } else {
                "✗".to_string()
            }
        };
        [
            self.client.clone(),
            self.to.to_string(),
            self.endpoint.clone(),
            tcp,
            dns(&self.dns_udp),
            dns(&self.dns_tcp),
        ]
    }
}

impl Report {
    pub fn render(&self) -> String {
        let head = [
            "CLIENT",
            "CLUSTER-IP",
            "ENDPOINT (next node)",
            "TCP",
            "DNS UDP",
            "DNS TCP",
        ];
        let rows: Vec<[String; 6]> = self.rows.iter().map(Row::cells).collect();
        let mut w = head.map(|h| h.chars().count());
        for r in &rows {
            for (k, c) in r.iter().enumerate() {
                w[k] = w[k].max(c.chars().count());
            }
        }
        let line = |cells: Vec<String>| -> String {
            let padded: Vec<String> = cells
                .iter()
                .zip(w)
                .map(|(c, w)| format!("{c}{}", " ".repeat(w - c.chars().count())))
                .collect();
            format!("  {}\n", padded.join("  ").trim_end())
        };
        let mut out = format!(
            "  kube-proxy {} mode rules in every node netns; cluster DNS: dnsmasq in {} behind {DNS_IP}:53\n",
            match self.mode {
                Mode::Iptables => "iptables",
                Mode::Nftables => "nftables",
            },
            self.dns_pod
        );
        out += &line(head.iter().map(|s| s.to_string()).collect());
        for r in rows {
            out += &line(r.to_vec());
        }
        let ok = self.rows.iter().filter(|r| r.tcp_ok()).count();
        let dns = self
            .rows
            .iter()
            .flat_map(|r| [&r.dns_udp, &r.dns_tcp].map(|d| Row::dns_ok(d, &r.want_dns)))
            .filter(|ok| *ok)
            .count();
        out += &format!(
            "  {ok}/{} pods reach a ClusterIP on another node, cluster DNS answered {dns}/{}\n",
            self.rows.len(),
            2 * self.rows.len()
        );
        out
    }

    pub fn failures(&self) -> Vec<String> {
        let mut f = Vec::new();
        for r in &self.rows {
            match &r.tcp {
                Err(e) => f.push(format!("{} -> Service {}: {e}", r.client, r.to)),
                Ok(seen) if *seen != r.client_ip => f.push(format!(
                    "{} -> Service {}: the endpoint saw {seen}, not the pod",
                    r.client, r.to
                )),
                Ok(_) => {}
            }
            for (what, d) in [("UDP", &r.dns_udp), ("TCP", &r.dns_tcp)] {
                if !Row::dns_ok(d, &r.want_dns) {
                    f.push(format!(
                        "{} cluster DNS over {what}: {d:?}, want {}",
                        r.client, r.want_dns
                    ));
                }
            }
        }
        f
    }
}
