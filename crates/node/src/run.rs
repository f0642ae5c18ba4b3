//! `evio-node run`: the DaemonSet's long-running container. Every
//! `--interval` it re-checks this node's allocation and rewrites the
//! conflist if it was removed or drifted, and brings the node bridge back up
//! if it went down (ovs-vswitchd recreates a userspace bridge's device down
//! after a restart, which cuts pods off from their gateway). It serves
//! `/healthz` and Prometheus `/metrics`, and exits cleanly on SIGTERM.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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
    {
        let state = Arc::clone(&state);
        std::thread::spawn(move || serve(listener, state, args.interval));
    }
    eprintln!(
        "evio-node run: serving /healthz and /metrics on {}",
        args.listen
    );
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
    let prefix = format!("evio|{network}|");
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

fn serve(listener: TcpListener, state: Arc<Mutex<State>>, interval: Duration) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        // One request per connection, bounded in time and size: a slow or
        // hostile client cannot hold the (single) serving thread.
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
        let _ = handle(stream, &state, interval);
    }
}

fn handle(stream: TcpStream, state: &Mutex<State>, interval: Duration) -> std::io::Result<()> {
    let mut reader = BufReader::new(std::io::Read::take(stream.try_clone()?, 8192));
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("");
    let (status, ctype, body) = {
        let st = state.lock().unwrap_or_else(|p| p.into_inner());
        match path {
            "/healthz" => healthz(&st, interval),
            "/metrics" => ("200 OK", "text/plain; version=0.0.4", metrics(&st)),
            _ => ("404 Not Found", "text/plain", "not found\n".to_string()),
        }
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
/// intervals): a store that stays unreachable makes the pod unready.
fn healthz(st: &State, interval: Duration) -> (&'static str, &'static str, String) {
    let fresh = st
        .last_ok
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age <= interval * 3 + Duration::from_secs(5));
    if fresh {
        ("200 OK", "text/plain", "ok\n".into())
    } else {
        let why = st
            .last_error
            .as_deref()
            .unwrap_or("no successful reconcile yet");
        ("503 Service Unavailable", "text/plain", format!("{why}\n"))
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
