//! Kubernetes Services without a control plane: kube-proxy's own NAT rules,
//! written into a node netns the way kube-proxy writes them, plus the
//! servers and clients the Services tests and the simulator use.
//!
//! No API server, kubelet or kube-proxy binary can be installed here, so
//! this module stands in for kube-proxy's *sync loop* only: given Services
//! and their endpoints it emits exactly the rule shapes kube-proxy emits
//! (taken from kube-proxy's TestOverallIPTablesRules and
//! TestOverallNFTablesRules, pkg/proxy/{iptables,nftables}/proxier_test.go,
//! and the jump chains of proxier.go) and loads them with the same tools
//! kube-proxy uses (`iptables-restore` with the nft backend, `nft -f`).
//! Chain names use kube-proxy's hash (base32 of SHA-256). Left out:
//! `-m nfacct` counters (no nfacct in this kernel), health-check node
//! ports, LoadBalancer source ranges, session affinity.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::netns::{run_in_netns_path, Netns};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// One port of one Service with its endpoints.
#[derive(Debug, Clone)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    pub port_name: String,
    pub proto: Proto,
    pub cluster_ip: IpAddr,
    pub port: u16,
    pub node_port: Option<u16>,
    pub endpoints: Vec<SocketAddr>,
}

impl Service {
    pub fn new(name: &str, proto: Proto, cluster_ip: IpAddr, port: u16) -> Service {
        Service {
            namespace: "default".into(),
            name: name.into(),
            port_name: proto.as_str().into(),
            proto,
            cluster_ip,
            port,
            node_port: None,
            endpoints: Vec::new(),
        }
    }

    pub fn endpoint(mut self, ep: SocketAddr) -> Service {
        self.endpoints.push(ep);
        self
    }

    pub fn node_port(mut self, p: u16) -> Service {
        self.node_port = Some(p);
        self
    }

    /// `ns/name:port`, kube-proxy's ServicePortName.
    fn port_name(&self) -> String {
        format!("{}/{}:{}", self.namespace, self.name, self.port_name)
    }
}

/// kube-proxy's chain hash: the first 16 characters of base32(SHA-256).
fn hash16(s: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let digest = Sha256::digest(s.as_bytes());
    let mut out = String::new();
    let (mut acc, mut bits) = (0u32, 0);
    for b in digest.iter() {
        acc = (acc << 8) | u32::from(*b);
        bits += 8;
        while bits >= 5 && out.len() < 16 {
            bits -= 5;
            out.push(ALPHABET[((acc >> bits) & 31) as usize] as char);
        }
    }
    out
}

fn ep_str(ep: &SocketAddr) -> String {
    ep.to_string()
}

/// What kube-proxy's iptables mode loads (`iptables-restore --noflush`)
/// for `services` with `--cluster-cidr cluster_cidr`; for IPv6 the same
/// text goes to `ip6tables-restore`.
pub fn iptables_rules(services: &[Service], cluster_cidr: &str) -> String {
    let mut f = String::from(
        "*filter\n:KUBE-SERVICES - [0:0]\n:KUBE-EXTERNAL-SERVICES - [0:0]\n:KUBE-FORWARD - [0:0]\n:KUBE-NODEPORTS - [0:0]\n",
    );
    for (chain, src, comment, extra) in [
        (
            "KUBE-EXTERNAL-SERVICES",
            "INPUT",
            "kubernetes externally-visible service portals",
            "-m conntrack --ctstate NEW ",
        ),
        (
            "KUBE-NODEPORTS",
            "INPUT",
            "kubernetes health check service ports",
            "",
        ),
        (
            "KUBE-SERVICES",
            "FORWARD",
            "kubernetes service portals",
            "-m conntrack --ctstate NEW ",
        ),
        (
            "KUBE-EXTERNAL-SERVICES",
            "FORWARD",
            "kubernetes externally-visible service portals",
            "-m conntrack --ctstate NEW ",
        ),
        ("KUBE-FORWARD", "FORWARD", "kubernetes forwarding rules", ""),
        (
            "KUBE-SERVICES",
            "OUTPUT",
            "kubernetes service portals",
            "-m conntrack --ctstate NEW ",
        ),
    ] {
        let _ = writeln!(
            f,
            "-A {src} {extra}-m comment --comment \"{comment}\" -j {chain}"
        );
    }
    f.push_str("-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n");
    f.push_str("-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n");
    f.push_str("-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n");
    f.push_str("COMMIT\n");

    let mut chains = vec![
        "KUBE-SERVICES".to_string(),
        "KUBE-NODEPORTS".into(),
        "KUBE-POSTROUTING".into(),
        "KUBE-MARK-MASQ".into(),
    ];
    let mut rules = String::new();
    for (src, chain, comment) in [
        ("PREROUTING", "KUBE-SERVICES", "kubernetes service portals"),
        ("OUTPUT", "KUBE-SERVICES", "kubernetes service portals"),
        (
            "POSTROUTING",
            "KUBE-POSTROUTING",
            "kubernetes postrouting rules",
        ),
    ] {
        let _ = writeln!(
            rules,
            "-A {src} -m comment --comment \"{comment}\" -j {chain}"
        );
    }
    rules.push_str("-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n");
    rules.push_str("-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n");
    rules.push_str("-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n");
    rules.push_str("-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n");
    for s in services {
        iptables_service(s, cluster_cidr, &mut chains, &mut rules);
    }
    rules.push_str("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n");
    let mut n = String::from("*nat\n");
    for c in &chains {
        let _ = writeln!(n, ":{c} - [0:0]");
    }
    n.push_str(&rules);
    n.push_str("COMMIT\n");
    f + &n
}

fn iptables_service(s: &Service, cluster_cidr: &str, chains: &mut Vec<String>, r: &mut String) {
    let pn = s.port_name();
    let proto = s.proto.as_str();
    let h = hash16(&format!("{pn}{proto}"));
    let svc = format!("KUBE-SVC-{h}");
    let ext = format!("KUBE-EXT-{h}");
    chains.push(svc.clone());
    let (ip, port) = (s.cluster_ip, s.port);
    let _ = writeln!(r, "-A KUBE-SERVICES -m comment --comment \"{pn} cluster IP\" -m {proto} -p {proto} -d {ip} --dport {port} -j {svc}");
    let _ = writeln!(r, "-A {svc} -m comment --comment \"{pn} cluster IP\" -m {proto} -p {proto} -d {ip} --dport {port} ! -s {cluster_cidr} -j KUBE-MARK-MASQ");
    let n = s.endpoints.len();
    for (i, ep) in s.endpoints.iter().enumerate() {
        let sep = format!("KUBE-SEP-{}", hash16(&format!("{pn}{proto}{ep}")));
        chains.push(sep.clone());
        let prob = if i + 1 < n {
            format!(
                "-m statistic --mode random --probability {:.10} ",
                1.0 / (n - i) as f64
            )
        } else {
            String::new()
        };
        let _ = writeln!(
            r,
            "-A {svc} -m comment --comment \"{pn} -> {}\" {prob}-j {sep}",
            ep_str(ep)
        );
        let _ = writeln!(
            r,
            "-A {sep} -m comment --comment {pn} -s {} -j KUBE-MARK-MASQ",
            ep.ip()
        );
        let _ = writeln!(
            r,
            "-A {sep} -m comment --comment {pn} -m {proto} -p {proto} -j DNAT --to-destination {}",
            ep_str(ep)
        );
    }
    if let Some(np) = s.node_port {
        chains.push(ext.clone());
        let _ = writeln!(r, "-A KUBE-NODEPORTS -m comment --comment {pn} -m {proto} -p {proto} --dport {np} -j {ext}");
        let _ = writeln!(r, "-A {ext} -m comment --comment \"masquerade traffic for {pn} external destinations\" -j KUBE-MARK-MASQ");
        let _ = writeln!(r, "-A {ext} -j {svc}");
    }
}

/// What kube-proxy's nftables mode loads (`nft -f`) into `ip kube-proxy`
/// (`ip6` for IPv6) for `services`, with `--cluster-cidr cluster_cidr`,
/// the service CIDR and the node addresses that take NodePorts.
pub fn nft_rules(
    services: &[Service],
    cluster_cidr: &str,
    service_cidr: &str,
    nodeport_ips: &[IpAddr],
) -> String {
    let v6 = cluster_cidr.contains(':');
    let (fam, addr, ip) = if v6 {
        ("ip6", "ipv6_addr", "ip6")
    } else {
        ("ip", "ipv4_addr", "ip")
    };
    let t = format!("{fam} kube-proxy");
    let mut o = String::new();
    let _ = writeln!(o, "add table {t} {{ comment \"rules for kube-proxy\" ; }}");
    let _ = writeln!(
        o,
        "add set {t} cluster-ips {{ type {addr} ; comment \"Active ClusterIPs\" ; }}"
    );
    let _ = writeln!(o, "add set {t} nodeport-ips {{ type {addr} ; comment \"IPs that accept NodePort traffic\" ; }}");
    let _ = writeln!(o, "add map {t} firewall-ips {{ type {addr} . inet_proto . inet_service : verdict ; comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }}");
    let _ = writeln!(o, "add map {t} no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ; }}");
    let _ = writeln!(o, "add map {t} no-endpoint-services {{ type {addr} . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }}");
    let _ = writeln!(o, "add map {t} service-ips {{ type {addr} . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}");
    let _ = writeln!(o, "add map {t} service-nodeports {{ type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }}");
    for c in [
        "cluster-ips-check",
        "filter-prerouting-pre-dnat { type filter hook prerouting priority -110 ; }",
        "filter-output-pre-dnat { type filter hook output priority -110 ; }",
        "filter-forward { type filter hook forward priority 0 ; }",
        "filter-input { type filter hook input priority 0 ; }",
        "filter-output { type filter hook output priority 0 ; }",
        "firewall-check",
        "mark-for-masquerade",
        "masquerading",
        "nat-output { type nat hook output priority -100 ; }",
        "nat-postrouting { type nat hook postrouting priority 100 ; }",
        "nat-prerouting { type nat hook prerouting priority -100 ; }",
        "nodeport-endpoints-check",
        "reject-chain { comment \"helper for @no-endpoint-services / @no-endpoint-nodeports\" ; }",
        "services",
        "service-endpoints-check",
    ] {
        let _ = writeln!(o, "add chain {t} {c}");
    }
    for r in [
        format!("cluster-ips-check {ip} daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\""),
        format!("cluster-ips-check {ip} daddr {{ {service_cidr} }} drop comment \"Drop traffic to unallocated ClusterIPs\""),
        "filter-prerouting-pre-dnat ct state new jump firewall-check".into(),
        "filter-forward ct state new jump service-endpoints-check".into(),
        "filter-forward ct state new jump cluster-ips-check".into(),
        "filter-input ct state new jump nodeport-endpoints-check".into(),
        "filter-input ct state new jump service-endpoints-check".into(),
        "filter-output ct state new jump service-endpoints-check".into(),
        "filter-output-pre-dnat ct state new jump firewall-check".into(),
        "filter-output ct state new jump cluster-ips-check".into(),
        format!("firewall-check {ip} daddr . meta l4proto . th dport vmap @firewall-ips"),
        "mark-for-masquerade mark set mark or 0x4000".into(),
        "masquerading mark and 0x4000 == 0 return".into(),
        "masquerading mark set mark xor 0x4000".into(),
        "masquerading masquerade fully-random".into(),
        "nat-output jump services".into(),
        "nat-postrouting jump masquerading".into(),
        "nat-prerouting jump services".into(),
        format!("nodeport-endpoints-check {ip} daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports"),
        "reject-chain reject".into(),
        format!("services {ip} daddr . meta l4proto . th dport vmap @service-ips"),
        format!("services {ip} daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports"),
        format!("service-endpoints-check {ip} daddr . meta l4proto . th dport vmap @no-endpoint-services"),
    ] {
        let _ = writeln!(o, "add rule {t} {r}");
    }
    for n in nodeport_ips {
        let _ = writeln!(o, "add element {t} nodeport-ips {{ {n} }}");
    }
    for s in services {
        nft_service(s, &t, ip, cluster_cidr, &mut o);
    }
    o
}

/// kube-proxy's nftables chain name base: `HASH-name`, HASH the first 8
/// characters of base32(SHA-256(name)) (its hashAndTruncate; our names
/// stay far below its 240-byte limit).
fn nft_chain_base(name: &str) -> String {
    format!("{}-{name}", &hash16(name)[..8])
}

fn nft_service(s: &Service, t: &str, ip: &str, cluster_cidr: &str, o: &mut String) {
    let proto = s.proto.as_str();
    let base = format!("{}/{}/{proto}/{}", s.namespace, s.name, s.port_name);
    let svc = format!("service-{}", nft_chain_base(&base));
    let (cip, port) = (s.cluster_ip, s.port);
    let _ = writeln!(o, "add chain {t} {svc}");
    let _ = writeln!(
        o,
        "add rule {t} {svc} {ip} daddr {cip} {ip} saddr != {cluster_cidr} jump mark-for-masquerade"
    );
    let mut vmap = Vec::new();
    for (i, ep) in s.endpoints.iter().enumerate() {
        // Colons are not allowed in a chain name: kube-proxy writes an
        // IPv6 endpoint's with dots.
        let ep_ip = ep.ip().to_string().replace(':', ".");
        let epc = format!(
            "endpoint-{}",
            nft_chain_base(&format!("{base}__{ep_ip}/{}", ep.port()))
        );
        let _ = writeln!(o, "add chain {t} {epc}");
        let _ = writeln!(
            o,
            "add rule {t} {epc} {ip} saddr {} jump mark-for-masquerade",
            ep.ip()
        );
        let _ = writeln!(o, "add rule {t} {epc} meta l4proto {proto} dnat to {ep}");
        vmap.push(format!("{i} : goto {epc}"));
    }
    let _ = writeln!(
        o,
        "add rule {t} {svc} numgen random mod {} vmap {{ {} }}",
        s.endpoints.len(),
        vmap.join(" , ")
    );
    let _ = writeln!(o, "add element {t} cluster-ips {{ {cip} }}");
    let _ = writeln!(
        o,
        "add element {t} service-ips {{ {cip} . {proto} . {port} : goto {svc} }}"
    );
    if let Some(np) = s.node_port {
        let ext = format!("external-{}", nft_chain_base(&base));
        let _ = writeln!(o, "add chain {t} {ext}");
        let _ = writeln!(o, "add rule {t} {ext} jump mark-for-masquerade");
        let _ = writeln!(o, "add rule {t} {ext} goto {svc}");
        let _ = writeln!(
            o,
            "add element {t} service-nodeports {{ {proto} . {np} : goto {ext} }}"
        );
    }
}

/// How kube-proxy programs a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Iptables,
    Nftables,
}

/// Loads kube-proxy's rules for `mode` into `ns` after removing what
/// kube-proxy of either mode left there for the same family (kube-proxy
/// cleans up the mode it does not run). The other family is left alone, so
/// a dual-stack node is programmed with one call per family, as
/// kube-proxy's one proxier per family does.
pub fn program(
    ns: &Netns,
    mode: Mode,
    services: &[Service],
    cluster_cidr: &str,
    service_cidr: &str,
    node_ips: &[IpAddr],
) -> Result<(), String> {
    let v6 = cluster_cidr.contains(':');
    clear_family(ns, v6)?;
    match mode {
        Mode::Iptables => {
            let prog = if v6 {
                "ip6tables-restore"
            } else {
                "iptables-restore"
            };
            let text = iptables_rules(services, cluster_cidr);
            load(ns, &[prog, "--noflush"], &text)
        }
        Mode::Nftables => {
            let text = nft_rules(services, cluster_cidr, service_cidr, node_ips);
            load(ns, &["nft", "-f", "-"], &text)
        }
    }
}

/// Runs `argv` in `ns` with `text` on its stdin; its stderr and the text
/// are the error when it fails.
fn load(ns: &Netns, argv: &[&str], text: &str) -> Result<(), String> {
    let prog = argv.first().copied().unwrap_or("?");
    let mut cmd = ns.command(argv);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| format!("spawn {prog}: {e}"))?;
    if let Some(mut i) = child.stdin.take() {
        i.write_all(text.as_bytes())
            .map_err(|e| format!("{prog} stdin: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{prog}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{prog} refused the rules: {}\n{text}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// Removes what kube-proxy of either mode owns in `ns`, for both families,
/// and nothing else: other plugins' rules (portmap's CNI-HOSTPORT-* chains,
/// evio's `inet evio` masquerade table) stay. Best effort, as kube-proxy's
/// own cleanup: a failure is reported on stderr.
pub fn clear(ns: &Netns) {
    for v6 in [false, true] {
        if let Err(e) = clear_family(ns, v6) {
            eprintln!("clearing kube-proxy's rules in {}: {e}", ns.name());
        }
    }
}

/// [`clear`] for one family: the `ip`/`ip6 kube-proxy` table of the
/// nftables mode, and what [`iptables_cleanup`] finds of the iptables mode.
fn clear_family(ns: &Netns, v6: bool) -> Result<(), String> {
    let (fam, save, restore) = if v6 {
        ("ip6", "ip6tables-save", "ip6tables-restore")
    } else {
        ("ip", "iptables-save", "iptables-restore")
    };
    let listed = ns.exec(&["nft", "list", "table", fam, "kube-proxy"]);
    if listed.status.success() {
        let out = ns.exec(&["nft", "delete", "table", fam, "kube-proxy"]);
        if !out.status.success() {
            return Err(format!(
                "nft delete table {fam} kube-proxy: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    let out = ns.exec(&[save]);
    if !out.status.success() {
        return Err(format!("{save}: {}", String::from_utf8_lossy(&out.stderr)));
    }
    let script = iptables_cleanup(&String::from_utf8_lossy(&out.stdout));
    if script.is_empty() {
        return Ok(());
    }
    load(ns, &[restore, "--noflush"], &script)
}

/// The built-in chains, the only ones kube-proxy jumps to its own from.
const BUILTIN_CHAINS: [&str; 5] = ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"];

/// What removes kube-proxy's iptables rules from `save` (iptables-save
/// output), for `iptables-restore --noflush`, as kube-proxy's cleanup does
/// it: per table, each KUBE-* chain declared (which empties it under
/// --noflush, so the jumps between them are gone), the jumps from the
/// built-in chains to them deleted, then the chains deleted. Empty when
/// there is nothing of kube-proxy's.
pub fn iptables_cleanup(save: &str) -> String {
    let mut out = String::new();
    let mut table = "";
    let (mut chains, mut jumps) = (Vec::new(), Vec::new());
    for line in save.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t.trim();
            chains.clear();
            jumps.clear();
        } else if let Some(decl) = line.strip_prefix(':') {
            let name = decl.split_whitespace().next().unwrap_or("");
            if name.starts_with("KUBE-") {
                chains.push(name.to_string());
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let chain = rule.split_whitespace().next().unwrap_or("");
            if BUILTIN_CHAINS.contains(&chain) && jump_target(rule).starts_with("KUBE-") {
                jumps.push(rule.to_string());
            }
        } else if line.trim() == "COMMIT" && !(chains.is_empty() && jumps.is_empty()) {
            let _ = writeln!(out, "*{table}");
            for c in &chains {
                let _ = writeln!(out, ":{c} - [0:0]");
            }
            for j in &jumps {
                let _ = writeln!(out, "-D {j}");
            }
            for c in &chains {
                let _ = writeln!(out, "-X {c}");
            }
            out.push_str("COMMIT\n");
        }
    }
    out
}

/// The chain a saved rule jumps or goes to (`-j`/`-g`), or "". Quoted
/// words (comments, with `\"` escapes as iptables-save writes them) are
/// one word each: a comment is never a target.
fn jump_target(rule: &str) -> String {
    let mut words = Vec::new();
    let (mut word, mut quoted, mut escaped) = (String::new(), false, false);
    for ch in rule.chars() {
        match ch {
            _ if escaped => {
                word.push(ch);
                escaped = false;
            }
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    words.push(word);
    words
        .windows(2)
        .find(|w| w[0] == "-j" || w[0] == "-g")
        .map(|w| w[1].clone())
        .unwrap_or_default()
}

/// A TCP server in a netns that tells each client the address it sees the
/// client connect from (`PEER ip\n`), then echoes lines until EOF: the
/// endpoint's view of who called, and a connection that can live long.
pub struct PeerServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    pub addr: SocketAddr,
}

impl PeerServer {
    pub fn start(ns_path: PathBuf, addr: SocketAddr) -> PeerServer {
        let listener = run_in_netns_path(&ns_path, || TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("listen on {addr}: {e}"));
        listener
            .set_nonblocking(true)
            .unwrap_or_else(|e| panic!("{e}"));
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, peer)) => {
                        let s = s.clone();
                        std::thread::spawn(move || echo(conn, peer, &s));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        PeerServer {
            stop,
            thread: Some(thread),
            addr,
        }
    }
}

fn echo(mut conn: TcpStream, peer: SocketAddr, stop: &AtomicBool) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
    if writeln!(conn, "PEER {}", peer.ip()).is_err() {
        return;
    }
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        match conn.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

impl Drop for PeerServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A client connection opened from a netns, kept open.
pub struct Conn {
    reader: BufReader<TcpStream>,
    /// The address the endpoint saw the client connect from.
    pub peer: IpAddr,
}

impl Conn {
    /// Connects to `to` from `ns_path` within `timeout` and reads the
    /// endpoint's `PEER` line.
    pub fn open(
        ns_path: &std::path::Path,
        to: SocketAddr,
        timeout: Duration,
    ) -> Result<Conn, String> {
        let s = run_in_netns_path(ns_path, || TcpStream::connect_timeout(&to, timeout))
            .map_err(|e| format!("connect to {to}: {e}"))?;
        s.set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        s.set_write_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        let mut reader = BufReader::new(s);
        let mut line = String::new();
        reader
            .read_line(&mut line)
            .map_err(|e| format!("read from {to}: {e}"))?;
        let peer = line
            .strip_prefix("PEER ")
            .and_then(|p| p.trim().parse().ok())
            .ok_or_else(|| format!("{to} answered {line:?}"))?;
        Ok(Conn { reader, peer })
    }

    /// Sends `n` bytes and reads them back.
    pub fn echo(&mut self, n: usize) -> Result<(), String> {
        let data: Vec<u8> = (0..n).map(|i| b'a' + (i % 26) as u8).collect();
        let mut w = self
            .reader
            .get_ref()
            .try_clone()
            .map_err(|e| e.to_string())?;
        let writer = std::thread::spawn(move || w.write_all(&data));
        let mut got = vec![0u8; n];
        self.reader
            .read_exact(&mut got)
            .map_err(|e| format!("echo read: {e}"))?;
        writer
            .join()
            .map_err(|_| "writer panicked".to_string())?
            .map_err(|e| format!("echo write: {e}"))?;
        if got
            .iter()
            .enumerate()
            .any(|(i, b)| *b != b'a' + (i % 26) as u8)
        {
            return Err("echo returned other bytes".into());
        }
        Ok(())
    }
}

/// Asks `to` once from `ns_path`: the address the endpoint saw.
pub fn peer_seen(ns_path: &std::path::Path, to: SocketAddr) -> Result<IpAddr, String> {
    let mut c = Conn::open(ns_path, to, Duration::from_secs(5))?;
    c.echo(64 * 1024)?;
    Ok(c.peer)
}

/// A Service endpoint for [`ClusterIps`]: a name for messages, the
/// address it listens on and the netns it listens in.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub name: String,
    pub addr: SocketAddr,
    pub netns: PathBuf,
}

/// TCP ClusterIPs, each backed by one endpoint running a [`PeerServer`],
/// with kube-proxy's rules of one mode and family on every node given: what
/// the runtime end-to-end tests and the plugin's Services tests check pods
/// against. On drop the servers stop and the nodes lose kube-proxy's rules
/// of that family (and nothing else).
pub struct ClusterIps {
    /// (endpoint name, ClusterIP:port) per Service.
    pub services: Vec<(String, SocketAddr)>,
    nodes: Vec<Netns>,
    v6: bool,
    _servers: Vec<PeerServer>,
}

impl ClusterIps {
    /// Programs `services` (ClusterIP:port, endpoint) on `nodes` in `mode`
    /// with `--cluster-cidr cluster_cidr`, whose family picks iptables or
    /// ip6tables (`ip` or `ip6 kube-proxy`).
    pub fn program(
        nodes: &[&Netns],
        mode: Mode,
        cluster_cidr: &str,
        service_cidr: &str,
        services: &[(SocketAddr, Endpoint)],
    ) -> Result<ClusterIps, String> {
        let svcs: Vec<Service> = services
            .iter()
            .map(|(vip, ep)| {
                Service::new(&ep.name, Proto::Tcp, vip.ip(), vip.port()).endpoint(ep.addr)
            })
            .collect();
        let servers = services
            .iter()
            .map(|(_, ep)| PeerServer::start(ep.netns.clone(), ep.addr))
            .collect();
        let guard = ClusterIps {
            services: services
                .iter()
                .map(|(vip, ep)| (ep.name.clone(), *vip))
                .collect(),
            nodes: nodes.iter().map(|n| Netns::borrowed(n.name())).collect(),
            v6: cluster_cidr.contains(':'),
            _servers: servers,
        };
        for n in nodes {
            program(n, mode, &svcs, cluster_cidr, service_cidr, &[])
                .map_err(|e| format!("kube-proxy's rules in {}: {e}", n.name()))?;
        }
        Ok(guard)
    }

    /// Asks every ClusterIP through `ask` (one attempt: connect from the
    /// client pod, return the address the endpoint saw), retried within
    /// `within` while it fails; panics unless each endpoint saw `client`,
    /// the client pod's own address (no masquerade on the way).
    pub fn assert_seen(
        &self,
        client: IpAddr,
        within: Duration,
        mut ask: impl FnMut(SocketAddr) -> Result<IpAddr, String>,
    ) {
        for (name, vip) in &self.services {
            let start = Instant::now();
            let deadline = start + within;
            loop {
                match ask(*vip) {
                    Ok(seen) => {
                        assert_eq!(seen, client, "ClusterIP {vip} -> {name}: the endpoint saw");
                        eprintln!("ClusterIP {vip} -> {name} in {:?}", start.elapsed());
                        break;
                    }
                    Err(e) => assert!(
                        Instant::now() < deadline,
                        "ClusterIP {vip} -> {name} from {client}: {e}"
                    ),
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

impl Drop for ClusterIps {
    fn drop(&mut self) {
        for n in &self.nodes {
            if let Err(e) = clear_family(n, self.v6) {
                eprintln!("clearing kube-proxy's rules in {}: {e}", n.name());
            }
        }
    }
}

/// Debian's dnsmasq as a cluster DNS server in a netns: authoritative for
/// the records given, no upstream, foreground child killed on drop.
pub struct Dnsmasq {
    child: Child,
}

impl Dnsmasq {
    pub fn start(ns: &Netns, listen: IpAddr, records: &[(&str, IpAddr)]) -> Dnsmasq {
        let mut args: Vec<String> = [
            "dnsmasq",
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--pid-file=",
            "--user=root",
            "--port=53",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(format!("--listen-address={listen}"));
        for (name, ip) in records {
            args.push(format!("--host-record={name},{ip}"));
        }
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut cmd: Command = ns.command(&argv);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn dnsmasq: {e}"));
        // Ready once it answers on TCP.
        let deadline = Instant::now() + Duration::from_secs(10);
        let path = ns.path();
        while run_in_netns_path(&path, || {
            TcpStream::connect_timeout(&SocketAddr::new(listen, 53), Duration::from_millis(200))
        })
        .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "dnsmasq did not come up on {listen}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Dnsmasq { child }
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `dig @server name +short` from `ns` over UDP or TCP: the answer lines.
pub fn dig(ns: &Netns, server: IpAddr, name: &str, tcp: bool) -> Result<Vec<String>, String> {
    let at = format!("@{server}");
    let mut args = vec!["dig", at.as_str(), name, "+short", "+time=2", "+tries=2"];
    if tcp {
        args.push("+tcp");
    }
    let out = ns.exec(&args);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() || text.contains("timed out") || text.contains("no servers") {
        return Err(format!(
            "dig {args:?}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(text
        .lines()
        .map(str::to_string)
        .filter(|l| !l.is_empty())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_names_are_kube_proxys() {
        // kube-proxy's own test: ns1/svc1:p80 over tcp is KUBE-SVC-XPGD46QRK7WJZT7O.
        assert_eq!(hash16("ns1/svc1:p80tcp"), "XPGD46QRK7WJZT7O");
        // Its nftables mode's own test (TestOverallNFTablesRules).
        let mut s = Service::new("svc1", Proto::Tcp, "172.30.0.41".parse().unwrap(), 80)
            .endpoint("10.180.0.1:80".parse().unwrap());
        s.namespace = "ns1".into();
        s.port_name = "p80".into();
        let nft = nft_rules(&[s], "10.0.0.0/8", "172.30.0.0/16", &[]);
        assert!(nft.contains("add chain ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80\n"));
        assert!(nft.contains(
            "add chain ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80\n"
        ));
        // An IPv6 endpoint's colons become dots in the chain name only.
        let s = Service::new("web", Proto::Tcp, "fd10:96::10".parse().unwrap(), 80)
            .endpoint("[fd10:244::3:6]:8080".parse().unwrap());
        let nft = nft_rules(&[s], "fd10:244::/64", "fd10:96::/112", &[]);
        assert!(nft.contains("-default/web/tcp/tcp__fd10.244..3.6/8080 meta l4proto tcp dnat to [fd10:244::3:6]:8080\n"), "{nft}");
    }

    #[test]
    fn rules_carry_the_shapes() {
        let s = Service::new("web", Proto::Tcp, "10.96.0.10".parse().unwrap(), 80)
            .endpoint("10.244.2.2:8080".parse().unwrap())
            .node_port(30080);
        let ipt = iptables_rules(std::slice::from_ref(&s), "10.244.0.0/16");
        assert!(ipt.contains("! -s 10.244.0.0/16 -j KUBE-MARK-MASQ"));
        assert!(ipt.contains("-j DNAT --to-destination 10.244.2.2:8080"));
        assert!(ipt.contains("--dport 30080 -j KUBE-EXT-"));
        let nft = nft_rules(&[s], "10.244.0.0/16", "10.96.0.0/16", &[]);
        assert!(nft.contains("meta l4proto tcp dnat to 10.244.2.2:8080"));
        assert!(nft.contains("service-nodeports { tcp . 30080 : goto external-"));
    }

    /// Saved rules of kube-proxy (as [`iptables_rules`] writes them), of
    /// portmap and of the firewall plugin, in two tables.
    const SAVED: &str = r#"# Generated by iptables-save v1.8.9 (nf_tables)
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:CNI-FORWARD - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-SERVICES - [0:0]
-A FORWARD -m comment --comment "CNI firewall plugin rules" -j CNI-FORWARD
-A FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:CNI-HOSTPORT-DNAT - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT
-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A POSTROUTING -m comment --comment "not \"-j KUBE-SERVICES\"" -j MASQUERADE
-A KUBE-SERVICES -d 10.96.0.10/32 -j KUBE-SVC-XPGD46QRK7WJZT7O
COMMIT
"#;

    #[test]
    fn cleanup_removes_what_kube_proxy_owns_and_nothing_else() {
        let got = iptables_cleanup(SAVED);
        let want = r#"*filter
:KUBE-FORWARD - [0:0]
:KUBE-SERVICES - [0:0]
-D FORWARD -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-D FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-X KUBE-FORWARD
-X KUBE-SERVICES
COMMIT
*nat
:KUBE-SERVICES - [0:0]
:KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
-D PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-X KUBE-SERVICES
-X KUBE-SVC-XPGD46QRK7WJZT7O
COMMIT
"#;
        assert_eq!(got, want);
        let without: String = SAVED
            .lines()
            .filter(|l| !l.contains("KUBE-"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(iptables_cleanup(&without), "", "nothing of kube-proxy's");
        assert_eq!(iptables_cleanup(""), "");
    }

    /// portmap's chains and jumps (CNI-HOSTPORT-*, a per-pod CNI-DN-*) and
    /// the firewall plugin's CNI-FORWARD, for `iptables-restore --noflush`.
    fn other_plugins_rules(pod: &str) -> String {
        format!(
            "*nat\n:CNI-HOSTPORT-DNAT - [0:0]\n:CNI-HOSTPORT-MASQ - [0:0]\n\
             :CNI-HOSTPORT-SETMARK - [0:0]\n:CNI-DN-0123456789abcdef01234 - [0:0]\n\
             -A PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT\n\
             -A OUTPUT -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT\n\
             -A POSTROUTING -m comment --comment \"CNI portfwd requiring masquerade\" -j CNI-HOSTPORT-MASQ\n\
             -A CNI-HOSTPORT-MASQ -m mark --mark 0x2000/0x2000 -j MASQUERADE\n\
             -A CNI-HOSTPORT-SETMARK -m comment --comment \"CNI portfwd masquerade mark\" -j MARK --set-xmark 0x2000/0x2000\n\
             -A CNI-HOSTPORT-DNAT -p tcp -m comment --comment \"dnat name: \\\"evio\\\" id: \\\"abc\\\"\" -m multiport --dports 30080 -j CNI-DN-0123456789abcdef01234\n\
             -A CNI-DN-0123456789abcdef01234 -p tcp -m tcp --dport 30080 -j DNAT --to-destination {pod}\n\
             COMMIT\n*filter\n:CNI-FORWARD - [0:0]\n\
             -A FORWARD -m comment --comment \"CNI firewall plugin rules\" -j CNI-FORWARD\n\
             COMMIT\n"
        )
    }

    /// Both families' iptables rules as saved, without the timestamps.
    fn saved(ns: &Netns) -> String {
        ["iptables-save", "ip6tables-save"]
            .iter()
            .flat_map(|p| {
                String::from_utf8_lossy(&ns.exec(&[p]).stdout)
                    .lines()
                    .filter(|l| !l.starts_with('#'))
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn nft_tables(ns: &Netns) -> String {
        String::from_utf8_lossy(&ns.exec(&["nft", "list", "tables"]).stdout).into_owned()
    }

    /// kube-proxy's cleanup leaves what other plugins own in the node
    /// netns: portmap's and the firewall plugin's iptables chains (both
    /// families), and evio's masquerade (its `inet evio` table, written by
    /// the plugin's own evio_net::nft). Programmed in both modes and both
    /// families, cleared, and each time the node is exactly as before.
    #[test]
    fn clear_leaves_other_plugins_rules() {
        let ns = Netns::new("evks");
        load(
            &ns,
            &["iptables-restore", "--noflush"],
            &other_plugins_rules("10.244.3.5:8080"),
        )
        .unwrap();
        load(
            &ns,
            &["ip6tables-restore", "--noflush"],
            &other_plugins_rules("[fd10:244::3:5]:8080"),
        )
        .unwrap();
        let cidrs: Vec<ipnet::IpNet> = vec![
            "10.244.0.0/16".parse().unwrap(),
            "fd10:244::/64".parse().unwrap(),
        ];
        let exempt: Vec<ipnet::IpNet> = vec!["10.10.0.0/16".parse().unwrap()];
        ns.run(|| evio_net::nft::ensure_masquerade_except("evio-ks", &cidrs, &exempt))
            .unwrap();
        let masq = || {
            ns.run(|| evio_net::nft::masquerade_rules("evio-ks"))
                .unwrap()
        };
        let evio_table = || {
            String::from_utf8_lossy(&ns.exec(&["nft", "list", "table", "inet", "evio"]).stdout)
                .into_owned()
        };
        let before = (saved(&ns), evio_table(), masq());
        assert!(before.0.contains("-j CNI-HOSTPORT-DNAT"), "{}", before.0);
        assert!(before.1.contains("masq-evio-ks"), "{}", before.1);

        let svc = |ip: &str, ep: &str| {
            [Service::new("web", Proto::Tcp, ip.parse().unwrap(), 80)
                .endpoint(ep.parse().unwrap())
                .node_port(30081)]
        };
        let v4 = svc("10.96.0.10", "10.244.3.6:8080");
        let v6 = svc("fd10:96::10", "[fd10:244::3:6]:8080");
        for mode in [Mode::Iptables, Mode::Nftables] {
            program(&ns, mode, &v4, "10.244.0.0/16", "10.96.0.0/16", &[]).unwrap();
            program(&ns, mode, &v6, "fd10:244::/64", "fd10:96::/112", &[]).unwrap();
            // The second family did not remove the first.
            match mode {
                Mode::Iptables => {
                    let s = saved(&ns);
                    assert!(s.contains("-d 10.96.0.10/32"), "{s}");
                    assert!(s.contains("-d fd10:96::10/128"), "{s}");
                }
                Mode::Nftables => {
                    let t = nft_tables(&ns);
                    assert!(t.contains("table ip kube-proxy"), "{t}");
                    assert!(t.contains("table ip6 kube-proxy"), "{t}");
                }
            }
            clear(&ns);
            assert_eq!(saved(&ns), before.0, "{mode:?}: iptables rules");
            assert_eq!(evio_table(), before.1, "{mode:?}: inet evio");
            assert_eq!(masq(), before.2, "{mode:?}: evio's masquerade");
            assert!(!nft_tables(&ns).contains("kube-proxy"), "{mode:?}");
        }
        // A mode switch removes the other mode's rules, as kube-proxy does.
        program(
            &ns,
            Mode::Nftables,
            &v4,
            "10.244.0.0/16",
            "10.96.0.0/16",
            &[],
        )
        .unwrap();
        program(
            &ns,
            Mode::Iptables,
            &v4,
            "10.244.0.0/16",
            "10.96.0.0/16",
            &[],
        )
        .unwrap();
        assert!(!nft_tables(&ns).contains("ip kube-proxy"));
        clear(&ns);
        assert_eq!(saved(&ns), before.0, "after a mode switch");
    }
}
