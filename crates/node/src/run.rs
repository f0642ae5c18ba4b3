//! `evio-node run`: the DaemonSet's long-running container. Every
//! `--interval` it re-checks this node's allocation and rewrites the
//! conflist if it was removed or drifted, and brings the node bridge back up
//! if it went down (ovs-vswitchd recreates a userspace bridge's device down
//! after a restart, which cuts pods off from their gateway); the bridge is
//! checked every pass even while the store is unreachable. It serves
//! `/livez` (the loop is alive), `/readyz` (the store answers; `/healthz`
//! is its older name) and Prometheus `/metrics`, and exits cleanly on
//! SIGTERM.
//!
//! The overlay agent (`evio-node agent`, usually a systemd unit) is a
//! separate process; `run` reports on it through its control socket
//! (`--agent-socket`): `/metrics` appends the agent's metrics and `/readyz`
//! its health. `/livez` is `run`'s own loop only, so that a liveness probe
//! does not restart this container for an agent or a store it cannot repair.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use evio_agent::metrics::Exposition;

use crate::agent::DEFAULT_CONTROL_SOCKET;
use crate::config_gen;
use crate::error::NodeError;
use crate::store_args::parse_secs;

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub gen: config_gen::Args,

    /// This node's IP, where /healthz and /metrics are served (the
    /// DaemonSet sets HOST_IP from the downward API's status.hostIP). The
    /// kubelet probes it there; loopback would fail its probes and the
    /// wildcard address would expose the server on every interface.
    #[arg(long, value_name = "IP", env = "HOST_IP")]
    pub host_ip: Option<IpAddr>,

    /// Port for /healthz and /metrics on --host-ip.
    #[arg(long, value_name = "PORT", default_value_t = DEFAULT_PORT)]
    pub port: u16,

    /// Serve on exactly this address instead of --host-ip:--port (any
    /// address but the wildcard: 127.0.0.1:9471 when only local scrapers
    /// and probes need it).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,

    /// Time between reconciles.
    #[arg(long, value_name = "SECS", default_value = "30", value_parser = parse_secs)]
    pub interval: Duration,

    /// The overlay agent's control socket. Given explicitly, the agent is
    /// required: /healthz fails while it does not answer. By default
    /// /run/evio/agent.sock is used when it exists (a node without the agent
    /// is not unhealthy).
    #[arg(long, value_name = "PATH")]
    pub agent_socket: Option<PathBuf>,
}

pub const DEFAULT_PORT: u16 = 9471;

/// How long a client has to send its request line, in total: a per-read
/// timeout would let a client that sends a byte now and then hold a
/// connection for hours.
const REQUEST_DEADLINE: Duration = Duration::from_secs(2);

/// Bound on writing the answer, in total.
const WRITE_DEADLINE: Duration = Duration::from_secs(2);

/// Connections served at once. Beyond that a connection gets a 503 at once
/// rather than a place in a queue slow clients could fill; with the
/// deadlines above, a slot frees within seconds.
const MAX_CONNECTIONS: usize = 8;

/// Longest request line read.
const MAX_REQUEST_LINE: usize = 8192;

impl RunArgs {
    /// The address to serve on: --listen, else --host-ip:--port, and never
    /// the wildcard address.
    pub fn listen_addr(&self) -> Result<SocketAddr, NodeError> {
        let addr = match (self.listen, self.host_ip) {
            (Some(a), _) => a,
            (None, Some(ip)) => SocketAddr::new(ip, self.port),
            (None, None) => {
                return Err(NodeError::Invalid(
                    "no address to serve /healthz and /metrics on: set HOST_IP (the \
                     downward API's status.hostIP), --host-ip or --listen"
                        .into(),
                ))
            }
        };
        if addr.ip().is_unspecified() {
            return Err(NodeError::Invalid(format!(
                "refusing to serve /healthz and /metrics on {addr}, every interface of the \
                 node: give this node's IP (--host-ip, HOST_IP) or --listen with an address"
            )));
        }
        Ok(addr)
    }
}

/// How long /healthz and /metrics wait for the agent. The agent answers
/// within 2 s (it gives its engine that long), so more than that.
const AGENT_TIMEOUT: Duration = Duration::from_millis(2500);

/// Where the agent is and whether it must be there.
struct AgentProbe {
    path: PathBuf,
    required: bool,
    /// The last reason logged for the agent being unhealthy: probes come
    /// every few seconds, the log gets each new reason once.
    logged: Mutex<Option<String>>,
}

/// What the agent said, if it is configured at all.
enum AgentAnswer {
    NotConfigured,
    /// Configured but not answering, or answering with an error (logged).
    Down,
    /// Its `health` answer's `ok` (a `false` one is logged with its JSON),
    /// and when fewer than all its peers are healthy (connected or idle),
    /// how many are, of how many.
    Health {
        ok: bool,
        degraded: Option<(u64, u64)>,
    },
}

impl AgentProbe {
    fn from_args(path: Option<&Path>) -> AgentProbe {
        match path {
            Some(p) => AgentProbe {
                path: p.to_path_buf(),
                required: true,
                logged: Mutex::new(None),
            },
            None => AgentProbe {
                path: PathBuf::from(DEFAULT_CONTROL_SOCKET),
                required: false,
                logged: Mutex::new(None),
            },
        }
    }

    /// A socket left behind by a killed agent still counts: the agent was
    /// running here and is not now.
    fn configured(&self) -> bool {
        self.required || self.path.symlink_metadata().is_ok()
    }

    fn ask(&self, what: &str) -> Result<String, String> {
        let text = evio_agent::control::request(&self.path, what, AGENT_TIMEOUT)
            .map_err(|e| format!("the agent does not answer on {}: {e}", self.path.display()))?;
        // Errors come back as {"error": "..."}; metrics never start with '{'.
        if text.trim_start().starts_with('{') {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(text.trim()) {
                if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
                    return Err(format!("the agent: {e}"));
                }
            }
        }
        if text.trim().is_empty() {
            return Err(format!(
                "the agent closed {} without answering",
                self.path.display()
            ));
        }
        Ok(text)
    }

    fn health(&self) -> AgentAnswer {
        if !self.configured() {
            return AgentAnswer::NotConfigured;
        }
        let text = match self.ask("health") {
            Ok(t) => t,
            Err(e) => return self.down(e),
        };
        let json = text.trim().to_string();
        let v = serde_json::from_str::<serde_json::Value>(&json).ok();
        let num = |k: &str| v.as_ref().and_then(|v| v.get(k)?.as_u64());
        let degraded = match (num("healthyPeers"), num("peers")) {
            (Some(h), Some(n)) if h < n => Some((h, n)),
            _ => None,
        };
        match v.as_ref().and_then(|v| v.get("ok")?.as_bool()) {
            Some(true) => {
                self.log(None);
                AgentAnswer::Health { ok: true, degraded }
            }
            Some(false) => {
                self.log(Some(format!("the agent reports ok=false: {json}")));
                AgentAnswer::Health {
                    ok: false,
                    degraded,
                }
            }
            None => self.down(format!("the agent's health answer has no \"ok\": {json}")),
        }
    }

    fn down(&self, why: String) -> AgentAnswer {
        self.log(Some(why));
        AgentAnswer::Down
    }

    /// Logs `why` unless it is what was logged last.
    fn log(&self, why: Option<String>) {
        let mut logged = self.logged.lock().unwrap_or_else(|p| p.into_inner());
        if *logged != why {
            if let Some(w) = &why {
                eprintln!("evio-node run: /healthz: {w}");
            }
            *logged = why;
        }
    }

    /// The agent's Prometheus text preceded by `evio_node_agent_up`, or
    /// nothing when there is no agent on this node.
    fn metrics(&self) -> String {
        if !self.configured() {
            return String::new();
        }
        let up = (
            "evio_node_agent_up",
            "Whether the overlay agent answered on its control socket.",
            "gauge",
        );
        let mut m = Exposition::default();
        match self.ask("metrics") {
            Ok(mut text) => {
                if !text.ends_with('\n') {
                    text.push('\n');
                }
                m.series(up, &[], 1);
                m.into_text() + &text
            }
            Err(e) => {
                eprintln!("evio-node run: /metrics: {e}");
                m.series(up, &[], 0);
                m.into_text()
            }
        }
    }
}

/// What /metrics and /healthz report; updated by the reconcile loop.
#[derive(Default)]
struct State {
    reconciles: u64,
    failures: u64,
    rewrites: u64,
    bridge_repairs: u64,
    flow_repairs: u64,
    /// Where the Services path of the bridge is repaired (flows, bridge
    /// netfilter): from the config, so it works through a store outage.
    bridge_kind: Option<BridgeKind>,
    last_ok: Option<SystemTime>,
    /// The last pass failed (its error is in the log, not in /healthz).
    failing: bool,
    node: String,
    network: String,
    subnet: String,
    gateway: String,
    bridge: String,
    pods: Option<usize>,
    bridge_up: Option<bool>,
    /// When the reconcile loop last started or finished a pass: /livez
    /// follows it, so a loop that hangs (not a store that fails) restarts
    /// the container.
    heartbeat: Option<Instant>,
}

static TERMINATE: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    TERMINATE.store(true, Ordering::SeqCst);
}

pub fn run(args: RunArgs) -> Result<(), NodeError> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let act = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGTERM, Signal::SIGINT] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe.
        unsafe { sigaction(sig, &act) }
            .map_err(|e| NodeError::Invalid(format!("cannot install the {sig} handler: {e}")))?;
    }
    let listen = args.listen_addr()?;
    let listener = TcpListener::bind(listen).map_err(|e| NodeError::Io {
        path: listen.to_string().into(),
        source: e,
    })?;
    let mut reconciler = config_gen::Reconciler::new()?;
    let state = Arc::new(Mutex::new(State {
        heartbeat: Some(Instant::now()),
        ..State::default()
    }));
    let agent = AgentProbe::from_args(args.agent_socket.as_deref());
    eprintln!(
        "evio-node run: serving /livez, /readyz and /metrics on {}; the overlay agent's socket: {} ({})",
        listen,
        agent.path.display(),
        if agent.required {
            "required"
        } else {
            "used when it exists"
        }
    );
    {
        let state = Arc::clone(&state);
        let windows = Windows {
            interval: args.interval,
            // A pass may legitimately block for the whole store timeout
            // (an unreachable etcd): only well beyond that is the loop stuck.
            live: args.interval * 3 + args.gen.node.store.timeout + Duration::from_secs(5),
        };
        std::thread::spawn(move || serve(listener, state, windows, agent));
    }
    while !TERMINATE.load(Ordering::SeqCst) {
        reconcile_once(&mut reconciler, &args, &state);
        let until = Instant::now() + args.interval;
        while Instant::now() < until && !TERMINATE.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    eprintln!("evio-node run: terminating");
    Ok(())
}

fn reconcile_once(reconciler: &mut config_gen::Reconciler, args: &RunArgs, state: &Mutex<State>) {
    beat(state);
    let result = reconciler.reconcile(&args.gen);
    let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
    st.reconciles += 1;
    match result {
        Ok(o) => {
            if o.rewritten {
                st.rewrites += 1;
                eprintln!(
                    "evio-node run: wrote {} (subnet {})",
                    o.path.display(),
                    o.subnet.subnet
                );
            }
            st.last_ok = Some(SystemTime::now());
            st.failing = false;
            st.node = o.node;
            st.network = o.gen.name.clone();
            st.subnet = o.subnet.subnet.to_string();
            st.gateway = o.subnet.gateway.to_string();
            st.bridge = o.gen.bridge().to_string();
            st.bridge_kind = Some(BridgeKind::of(&o.gen));
        }
        Err(e) => {
            st.failures += 1;
            eprintln!("evio-node run: reconcile failed: {e}");
            st.failing = true;
            // The bridge and network come from the config, not the store:
            // pods already running keep their gateway through a store outage.
            if let Ok(gen) = args.gen.node.config_only() {
                st.network = gen.name.clone();
                st.bridge = gen.bridge().to_string();
                st.bridge_kind = Some(BridgeKind::of(&gen));
            }
        }
    }
    if !st.bridge.is_empty() {
        let (pods, up, repaired) = inspect_bridge(&st.bridge, &st.network);
        st.pods = pods;
        st.bridge_up = up;
        if repaired {
            st.bridge_repairs += 1;
            eprintln!(
                "evio-node run: bridge {} was down, brought it up",
                st.bridge
            );
        }
        if let Some(kind) = st.bridge_kind.clone() {
            if repair_services_path(&st.bridge, &kind) {
                st.flow_repairs += 1;
            }
        }
    }
    st.heartbeat = Some(Instant::now());
}

/// Marks the loop alive (at the start of a pass, which may block on the
/// store for up to its timeout).
fn beat(state: &Mutex<State>) {
    state.lock().unwrap_or_else(|p| p.into_inner()).heartbeat = Some(Instant::now());
}

/// Pods of this network on the node (evio's host veths, found by alias),
/// whether the bridge is up, and whether it had to be brought up. The bridge
/// not existing yet (no pod so far) is not an error.
fn inspect_bridge(bridge: &str, network: &str) -> (Option<usize>, Option<bool>, bool) {
    let Ok(mut h) = evio_net::Handle::new() else {
        return (None, None, false);
    };
    let prefix = evio_plugin::naming::network_alias_prefix(network);
    let pods = h.links().ok().map(|links| {
        links
            .iter()
            .filter(|l| l.alias.as_deref().is_some_and(|a| a.starts_with(&prefix)))
            .count()
    });
    match h.link_by_name(bridge) {
        Ok(Some(l)) if !l.up => {
            let repaired = h.set_up(l.index).is_ok();
            (pods, Some(repaired), repaired)
        }
        Ok(Some(_)) => (pods, Some(true), false),
        _ => (pods, None, false),
    }
}

/// The bridge type and, for OVS, its OpenFlow socket.
#[derive(Clone, Debug)]
enum BridgeKind {
    Linux,
    Ovs { mgmt: PathBuf },
}

impl BridgeKind {
    fn of(gen: &crate::conflist::GenConfig) -> BridgeKind {
        if gen.bridge_type() == evio_cni::config::BridgeType::Linux.as_str() {
            return BridgeKind::Linux;
        }
        let dir =
            evio_plugin::switch::flows::run_dir_of(gen.ovs_run_dir().map(Path::new), gen.ovsdb());
        BridgeKind::Ovs {
            mgmt: dir.join(format!("{}.mgmt", gen.bridge())),
        }
    }
}

/// What makes kube-proxy's NAT work across the bridge, put back if it was
/// lost (a vswitchd restart forgets flows; someone flushed them or turned
/// the bridge's netfilter off): evio's conntrack flows on OVS, the bridge
/// netfilter options on a Linux bridge. Returns whether it repaired
/// anything. A missing bridge (no pod yet) is not an error.
fn repair_services_path(bridge: &str, kind: &BridgeKind) -> bool {
    let Ok(mut h) = evio_net::Handle::new() else {
        return false;
    };
    let Ok(Some(link)) = h.link_by_name(bridge) else {
        return false;
    };
    let (what, result) = match kind {
        BridgeKind::Linux => (
            "bridge netfilter options (nf_call_iptables, nf_call_ip6tables)",
            evio_plugin::switch::linux::ensure_bridge_nf(&mut h, &link).map_err(|e| e.to_string()),
        ),
        BridgeKind::Ovs { mgmt } => {
            let Some(mac) = link.mac else { return false };
            (
                "conntrack flows",
                evio_plugin::switch::flows::ensure(mgmt, mac).map_err(|e| e.to_string()),
            )
        }
    };
    match result {
        Ok(true) => {
            eprintln!("evio-node run: bridge {bridge}: restored evio's {what}");
            true
        }
        Ok(false) => false,
        Err(e) => {
            eprintln!("evio-node run: bridge {bridge}: cannot check evio's {what}: {e}");
            false
        }
    }
}

/// One thread per connection, at most MAX_CONNECTIONS of them, each
/// bounded in time (REQUEST_DEADLINE, WRITE_DEADLINE, AGENT_TIMEOUT): a
/// slow or hostile client holds one slot for seconds, and a probe still
/// gets an answer.
/// How old a successful reconcile (readiness) and the loop's heartbeat
/// (liveness) may be.
#[derive(Clone, Copy)]
struct Windows {
    interval: Duration,
    live: Duration,
}

fn serve(listener: TcpListener, state: Arc<Mutex<State>>, windows: Windows, agent: AgentProbe) {
    let agent = Arc::new(agent);
    let active = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let _ = stream.set_write_timeout(Some(WRITE_DEADLINE));
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::SeqCst);
            let _ = respond(stream, "503 Service Unavailable", "text/plain", "busy\n");
            continue;
        }
        let slot = Slot(Arc::clone(&active));
        let (state, agent) = (Arc::clone(&state), Arc::clone(&agent));
        let spawned = std::thread::Builder::new()
            .name("evio-http".into())
            .spawn(move || {
                let _slot = slot;
                let _ = handle(stream, &state, windows, &agent);
            });
        if let Err(e) = spawned {
            eprintln!("evio-node run: cannot start a thread for a connection: {e}");
        }
    }
}

/// Frees a connection slot however the handler ends.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The request line, read within REQUEST_DEADLINE in total.
fn read_request_line(stream: &mut TcpStream) -> std::io::Result<String> {
    let deadline = Instant::now() + REQUEST_DEADLINE;
    let mut line = Vec::new();
    let mut buf = [0u8; 512];
    while !line.contains(&b'\n') && line.len() < MAX_REQUEST_LINE {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        stream.set_read_timeout(Some(left))?;
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        line.extend_from_slice(&buf[..n]);
    }
    let end = line.iter().position(|&b| b == b'\n').unwrap_or(line.len());
    Ok(String::from_utf8_lossy(&line[..end]).into_owned())
}

fn handle(
    mut stream: TcpStream,
    state: &Mutex<State>,
    windows: Windows,
    agent: &AgentProbe,
) -> std::io::Result<()> {
    let line = read_request_line(&mut stream)?;
    let target = line.split_whitespace().nth(1).unwrap_or("");
    let path = target.split('?').next().unwrap_or("");
    // The agent is asked before the state is locked: the reconcile loop
    // never waits for the agent.
    let (status, ctype, body) = match path {
        // /healthz is the old name of /readyz, kept for scrapers and
        // probes written against earlier manifests.
        "/readyz" | "/healthz" => {
            let a = agent.health();
            let st = state.lock().unwrap_or_else(|p| p.into_inner());
            readyz(&st, windows.interval, &a)
        }
        "/livez" => {
            let st = state.lock().unwrap_or_else(|p| p.into_inner());
            livez(&st, windows.live)
        }
        "/metrics" => {
            let a = agent.metrics();
            let st = state.lock().unwrap_or_else(|p| p.into_inner());
            let mut m = metrics(&st);
            m.push_str(&a);
            ("200 OK", "text/plain; version=0.0.4", m)
        }
        _ => ("404 Not Found", "text/plain", "not found\n".to_string()),
    };
    respond(stream, status, ctype, &body)
}

fn respond(mut out: TcpStream, status: &str, ctype: &str, body: &str) -> std::io::Result<()> {
    write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    out.flush()
}

/// Alive while the reconcile loop keeps coming round, whatever the store
/// says: restarting the container cannot bring an etcd back, and a
/// liveness probe tied to the store would crash-loop every node during an
/// etcd outage.
fn livez(st: &State, window: Duration) -> (&'static str, &'static str, String) {
    let alive = st.heartbeat.is_some_and(|t| t.elapsed() <= window);
    if alive {
        ("200 OK", "text/plain", "ok\n".to_string())
    } else {
        (
            "503 Service Unavailable",
            "text/plain",
            "the reconcile loop is stuck (see the log of evio-node run)\n".to_string(),
        )
    }
}

/// Ready once a reconcile succeeded and the last success is recent (three
/// intervals): a store that stays unreachable makes the pod unready. With
/// an agent configured, it must also answer and say `ok` (its record is
/// published and not revoked). The first line is `ok` or the first reason;
/// an `agent: ` line follows whenever an agent is configured, saying
/// `degraded` with a count when not all its peers are connected or idle.
fn readyz(
    st: &State,
    interval: Duration,
    agent: &AgentAnswer,
) -> (&'static str, &'static str, String) {
    let fresh = st
        .last_ok
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age <= interval * 3 + Duration::from_secs(5));
    // Anyone who reaches the node's port may ask: the answer names the
    // kind of problem and leaves the details (store addresses, paths,
    // errors) to the container log, where each is written when it happens.
    let mut problems: Vec<&str> = Vec::new();
    if !fresh {
        problems.push(if st.failing {
            "reconcile failing (see the log of evio-node run)"
        } else {
            "no successful reconcile yet"
        });
    }
    let agent_line = match agent {
        AgentAnswer::NotConfigured => None,
        AgentAnswer::Down => {
            problems.push("the agent does not answer (see the log of evio-node run)");
            Some("agent: down".to_string())
        }
        // The agent's own JSON may carry a store error: it goes to the log.
        AgentAnswer::Health { ok, degraded } => {
            if !ok {
                problems.push("the agent reports ok=false (see the log of evio-node run)");
            }
            let word = if *ok { "ok" } else { "not ok" };
            // Reported, not failed: one node that is down must not make
            // every other node's pod unready.
            Some(match degraded {
                Some((h, n)) => {
                    format!("agent: {word}, degraded: {h} of {n} peers connected or idle")
                }
                None => format!("agent: {word}"),
            })
        }
    };
    let mut body = match problems.first() {
        None => "ok\n".to_string(),
        Some(p) => format!("{p}\n"),
    };
    if let Some(l) = agent_line {
        body.push_str(&l);
        body.push('\n');
    }
    if problems.is_empty() {
        ("200 OK", "text/plain", body)
    } else {
        ("503 Service Unavailable", "text/plain", body)
    }
}

fn metrics(st: &State) -> String {
    let mut m = Exposition::default();
    let counters = [
        (
            "evio_node_reconciles_total",
            "Reconcile passes run.",
            st.reconciles,
        ),
        (
            "evio_node_reconcile_failures_total",
            "Reconcile passes that failed.",
            st.failures,
        ),
        (
            "evio_node_conflist_rewrites_total",
            "Times the conflist was missing or drifted and was rewritten.",
            st.rewrites,
        ),
        (
            "evio_node_bridge_repairs_total",
            "Times the node bridge was found down and brought up.",
            st.bridge_repairs,
        ),
        (
            "evio_node_flow_repairs_total",
            "Times evio's bridge flows (OVS) or bridge netfilter options (Linux bridge) were found missing and restored.",
            st.flow_repairs,
        ),
    ];
    for (name, help, value) in counters {
        m.series((name, help, "counter"), &[], value);
    }
    let last = st
        .last_ok
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    m.series(
        (
            "evio_node_last_reconcile_success_timestamp_seconds",
            "Unix time of the last successful reconcile (0: none yet).",
            "gauge",
        ),
        &[],
        last,
    );
    // The store's health as /readyz sees it, without the agent: the last
    // pass reached the store and it answered.
    m.series(
        (
            "evio_node_store_ok",
            "Whether the last reconcile reached the allocation store and succeeded.",
            "gauge",
        ),
        &[],
        u8::from(st.last_ok.is_some() && !st.failing),
    );
    if !st.subnet.is_empty() {
        let labels = [
            ("node", st.node.as_str()),
            ("network", &st.network),
            ("subnet", &st.subnet),
            ("gateway", &st.gateway),
            ("bridge", &st.bridge),
        ];
        let help = "This node's pod subnet allocation.";
        m.series(("evio_node_allocation_info", help, "gauge"), &labels, 1);
    }
    if let Some(p) = st.pods {
        let help = "Pods of this network attached on this node.";
        m.series(("evio_node_pods", help, "gauge"), &[], p);
    }
    if let Some(up) = st.bridge_up {
        let help = "Whether the node bridge is up.";
        m.series(("evio_node_bridge_up", help, "gauge"), &[], u8::from(up));
    }
    m.into_text()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exposition text, byte for byte, of a fixed state: what scrapers
    /// see must not move with a refactor.
    #[test]
    fn metrics_text_of_a_fixed_state() {
        let st = State {
            reconciles: 5,
            failures: 1,
            rewrites: 2,
            bridge_repairs: 3,
            flow_repairs: 4,
            last_ok: Some(UNIX_EPOCH + Duration::from_millis(1_700_000_000_250)),
            node: "node-\"r\"".to_string(),
            network: "net\\1".to_string(),
            subnet: "10.244.3.0/24".to_string(),
            gateway: "10.244.3.1".to_string(),
            bridge: "br\nx".to_string(),
            pods: Some(7),
            bridge_up: Some(true),
            ..State::default()
        };
        let text = metrics(&st);
        assert_eq!(text, include_str!("run_metrics_golden.txt"));
        assert_eq!(
            metrics(&State::default()),
            include_str!("run_metrics_golden_empty.txt")
        );
    }
}
