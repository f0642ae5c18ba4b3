//! `evio-node run`: the DaemonSet's long-running container. Every
//! `--interval` it re-checks this node's allocation and rewrites the
//! conflist if it was removed or drifted, and brings the node bridge back up
//! if it went down (ovs-vswitchd recreates a userspace bridge's device down
//! after a restart, which cuts pods off from their gateway). It serves
//! `/healthz`, `/livez` and Prometheus `/metrics`, and exits cleanly on
//! SIGTERM.
//!
//! The overlay agent (`evio-node agent`, usually a systemd unit) is a
//! separate process; `run` reports on it through its control socket
//! (`--agent-socket`): `/metrics` appends the agent's metrics and `/healthz`
//! its health. `/livez` is `run`'s own health only, so that a liveness
//! probe does not restart this container for an agent it cannot repair.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::agent::DEFAULT_CONTROL_SOCKET;
use crate::config_gen;
use crate::error::NodeError;
use crate::store_args::parse_secs;

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub gen: config_gen::Args,

    /// Address for /healthz and /metrics.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:9471")]
    pub listen: SocketAddr,

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

/// How long /healthz and /metrics wait for the agent. The agent answers
/// within 2 s (it gives its engine that long), so more than that.
const AGENT_TIMEOUT: Duration = Duration::from_millis(2500);

/// Where the agent is and whether it must be there.
struct AgentProbe {
    path: PathBuf,
    required: bool,
}

/// What the agent said, if it is configured at all.
enum AgentAnswer {
    NotConfigured,
    /// Configured but not answering, or answering with an error.
    Down(String),
    /// The JSON of its `health` request (`ok`, `node`, `peers`, ...).
    Health {
        ok: bool,
        json: String,
    },
}

impl AgentProbe {
    fn from_args(path: Option<&Path>) -> AgentProbe {
        match path {
            Some(p) => AgentProbe {
                path: p.to_path_buf(),
                required: true,
            },
            None => AgentProbe {
                path: PathBuf::from(DEFAULT_CONTROL_SOCKET),
                required: false,
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
            Err(e) => return AgentAnswer::Down(e),
        };
        let json = text.trim().to_string();
        match serde_json::from_str::<serde_json::Value>(&json)
            .ok()
            .and_then(|v| v.get("ok").and_then(|o| o.as_bool()))
        {
            Some(ok) => AgentAnswer::Health { ok, json },
            None => AgentAnswer::Down(format!("the agent's health answer has no \"ok\": {json}")),
        }
    }

    /// The agent's Prometheus text preceded by `evio_node_agent_up`, or
    /// nothing when there is no agent on this node.
    fn metrics(&self) -> String {
        if !self.configured() {
            return String::new();
        }
        let head = "# HELP evio_node_agent_up Whether the overlay agent answered on its control socket.\n# TYPE evio_node_agent_up gauge\n";
        match self.ask("metrics") {
            Ok(mut text) => {
                if !text.ends_with('\n') {
                    text.push('\n');
                }
                format!("{head}evio_node_agent_up 1\n{text}")
            }
            Err(e) => {
                eprintln!("evio-node run: /metrics: {e}");
                format!("{head}evio_node_agent_up 0\n")
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
    last_ok: Option<SystemTime>,
    last_error: Option<String>,
    node: String,
    network: String,
    subnet: String,
    gateway: String,
    bridge: String,
    pods: Option<usize>,
    bridge_up: Option<bool>,
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
    let listener = TcpListener::bind(args.listen).map_err(|e| NodeError::Io {
        path: args.listen.to_string().into(),
        source: e,
    })?;
    let state = Arc::new(Mutex::new(State::default()));
    let agent = AgentProbe::from_args(args.agent_socket.as_deref());
    eprintln!(
        "evio-node run: serving /healthz, /livez and /metrics on {}; the overlay agent's socket: {} ({})",
        args.listen,
        agent.path.display(),
        if agent.required {
            "required"
        } else {
            "used when it exists"
        }
    );
    {
        let state = Arc::clone(&state);
        let interval = args.interval;
        std::thread::spawn(move || serve(listener, state, interval, agent));
    }
    while !TERMINATE.load(Ordering::SeqCst) {
        reconcile_once(&args, &state);
        let until = Instant::now() + args.interval;
        while Instant::now() < until && !TERMINATE.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    eprintln!("evio-node run: terminating");
    Ok(())
}

fn reconcile_once(args: &RunArgs, state: &Mutex<State>) {
    let result = config_gen::reconcile(&args.gen);
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
            st.last_error = None;
            st.node = o.node;
            st.network = o.gen.name.clone();
            st.subnet = o.subnet.subnet.to_string();
            st.gateway = o.subnet.gateway.to_string();
            st.bridge = o.gen.bridge().to_string();
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
        }
        Err(e) => {
            st.failures += 1;
            eprintln!("evio-node run: reconcile failed: {e}");
            st.last_error = Some(e.to_string());
        }
    }
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

fn serve(listener: TcpListener, state: Arc<Mutex<State>>, interval: Duration, agent: AgentProbe) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        // One request per connection, bounded in time and size: a slow or
        // hostile client cannot hold the (single) serving thread. The agent
        // is asked with its own bound (AGENT_TIMEOUT).
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
        let _ = handle(stream, &state, interval, &agent);
    }
}

fn handle(
    stream: TcpStream,
    state: &Mutex<State>,
    interval: Duration,
    agent: &AgentProbe,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(std::io::Read::take(stream.try_clone()?, 8192));
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let target = line.split_whitespace().nth(1).unwrap_or("");
    let path = target.split('?').next().unwrap_or("");
    // The agent is asked before the state is locked: the reconcile loop
    // never waits for the agent.
    let (status, ctype, body) = match path {
        "/healthz" => {
            let a = agent.health();
            let st = state.lock().unwrap_or_else(|p| p.into_inner());
            healthz(&st, interval, &a)
        }
        "/livez" => {
            let st = state.lock().unwrap_or_else(|p| p.into_inner());
            healthz(&st, interval, &AgentAnswer::NotConfigured)
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
    let mut out = stream;
    write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    out.flush()
}

/// Healthy once a reconcile succeeded and the last success is recent (three
/// intervals): a store that stays unreachable makes the pod unready. With
/// an agent configured, it must also answer and say `ok` (its record is
/// published and not revoked). The first line is `ok` or the first reason;
/// an `agent: ` line follows whenever an agent is configured.
fn healthz(
    st: &State,
    interval: Duration,
    agent: &AgentAnswer,
) -> (&'static str, &'static str, String) {
    let fresh = st
        .last_ok
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age <= interval * 3 + Duration::from_secs(5));
    let mut problems = Vec::new();
    if !fresh {
        problems.push(
            st.last_error
                .clone()
                .unwrap_or_else(|| "no successful reconcile yet".into()),
        );
    }
    let agent_line = match agent {
        AgentAnswer::NotConfigured => None,
        AgentAnswer::Down(why) => {
            problems.push(why.clone());
            Some(format!("agent: down: {why}"))
        }
        AgentAnswer::Health { ok, json } => {
            if !ok {
                problems.push("the agent reports ok=false".into());
            }
            Some(format!("agent: {json}"))
        }
    };
    let mut body = match problems.first() {
        None => "ok\n".to_string(),
        Some(p) => format!("{}\n", p.replace('\n', " ")),
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

fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn metrics(st: &State) -> String {
    let mut m = String::new();
    let mut put = |name: &str, help: &str, kind: &str, value: String| {
        m.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        ));
    };
    put(
        "evio_node_reconciles_total",
        "Reconcile passes run.",
        "counter",
        st.reconciles.to_string(),
    );
    put(
        "evio_node_reconcile_failures_total",
        "Reconcile passes that failed.",
        "counter",
        st.failures.to_string(),
    );
    put(
        "evio_node_conflist_rewrites_total",
        "Times the conflist was missing or drifted and was rewritten.",
        "counter",
        st.rewrites.to_string(),
    );
    put(
        "evio_node_bridge_repairs_total",
        "Times the node bridge was found down and brought up.",
        "counter",
        st.bridge_repairs.to_string(),
    );
    let last = st
        .last_ok
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    put(
        "evio_node_last_reconcile_success_timestamp_seconds",
        "Unix time of the last successful reconcile (0: none yet).",
        "gauge",
        format!("{last}"),
    );
    if !st.subnet.is_empty() {
        m.push_str(&format!(
            "# HELP evio_node_allocation_info This node's pod subnet allocation.\n# TYPE evio_node_allocation_info gauge\nevio_node_allocation_info{{node=\"{}\",network=\"{}\",subnet=\"{}\",gateway=\"{}\",bridge=\"{}\"}} 1\n",
            label(&st.node),
            label(&st.network),
            label(&st.subnet),
            label(&st.gateway),
            label(&st.bridge)
        ));
    }
    if let Some(p) = st.pods {
        m.push_str(&format!(
            "# HELP evio_node_pods Pods of this network attached on this node.\n# TYPE evio_node_pods gauge\nevio_node_pods {p}\n"
        ));
    }
    if let Some(up) = st.bridge_up {
        m.push_str(&format!(
            "# HELP evio_node_bridge_up Whether the node bridge is up.\n# TYPE evio_node_bridge_up gauge\nevio_node_bridge_up {}\n",
            u8::from(up)
        ));
    }
    m
}
