//! The control socket: one request line, one answer, then close.
//! `peers` → the JSON of OVERLAY.md; `metrics` → Prometheus text;
//! `health` → a JSON summary (`evio-node run` serves it on /healthz);
//! `leave` → the agent takes the node off the network and exits
//! (`evio-node agent --stop-and-leave`).
//! The socket is mode 0600: what it tells (endpoints, keys) is for root.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::json;

use crate::signal::StoreHealth;
use crate::{metrics, wait_readable, AgentError, EngineHandle, SelfInfo, Stop};

const ENGINE_TIMEOUT: Duration = Duration::from_secs(2);

pub fn spawn(
    path: &Path,
    engine: EngineHandle,
    me: SelfInfo,
    health: Arc<Mutex<StoreHealth>>,
    stop: Arc<Stop>,
    leave: Arc<AtomicBool>,
) -> Result<JoinHandle<()>, AgentError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(AgentError::io(format!("create {}", dir.display())))?;
    }
    // A socket file left by a killed agent: nobody listens on it any more.
    if UnixStream::connect(path).is_ok() {
        return Err(AgentError::Config(format!(
            "control socket {} is in use: is another agent running?",
            path.display()
        )));
    }
    let _ = std::fs::remove_file(path);
    let listener =
        UnixListener::bind(path).map_err(AgentError::io(format!("bind {}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(AgentError::io(format!("chmod {}", path.display())))?;
    listener
        .set_nonblocking(true)
        .map_err(AgentError::io("control socket"))?;
    std::thread::Builder::new()
        .name("evio-control".into())
        .spawn(move || {
            use std::os::fd::AsRawFd;
            while !stop.is_set() {
                if !wait_readable(listener.as_raw_fd(), &stop, None) {
                    continue;
                }
                while let Ok((s, _)) = listener.accept() {
                    serve(s, &engine, &me, &health, &leave);
                }
            }
        })
        .map_err(AgentError::io("spawn thread"))
}

fn serve(
    s: UnixStream,
    engine: &EngineHandle,
    me: &SelfInfo,
    health: &Mutex<StoreHealth>,
    leave: &AtomicBool,
) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
    let mut line = String::new();
    let mut r = BufReader::new(&s).take(256);
    if r.read_line(&mut line).is_err() {
        return;
    }
    if line.trim() == "leave" {
        let mut w = &s;
        let _ = w.write_all(b"{\"leaving\":true}\n");
        leave.store(true, Ordering::SeqCst);
        // The main thread waits for signals: this one says "leave".
        // SAFETY: plain kill(2) of our own process.
        unsafe { libc::kill(libc::getpid(), libc::SIGUSR1) };
        return;
    }
    let h = health.lock().map(|g| g.clone()).unwrap_or_default();
    let answer = match engine.snapshot(ENGINE_TIMEOUT) {
        None => json!({"error": "the engine does not answer"}).to_string(),
        Some(snap) => match line.trim() {
            "peers" => metrics::peers_json(me, &snap, &h).to_string(),
            "metrics" => metrics::prometheus(me, &snap, &h),
            "health" => {
                let connected = snap
                    .peers
                    .iter()
                    .filter(|p| p.state == evio_overlay::engine::PeerState::Connected)
                    .count();
                json!({
                    "ok": h.published && !h.revoked,
                    "node": me.node,
                    "peers": snap.peers.len(),
                    "connected": connected,
                    "revoked": h.revoked,
                    "storeError": h.last_error,
                    "uptimeSeconds": me.started.elapsed().as_secs(),
                })
                .to_string()
            }
            other => {
                json!({"error": format!("unknown request {other:?}: peers, metrics, health or leave")})
                    .to_string()
            }
        },
    };
    let mut w = &s;
    let _ = w.write_all(answer.as_bytes());
    let _ = w.write_all(b"\n");
}

use std::io::Read as _;

/// Client side, for `evio-node peers` and `evio-node run`.
pub fn request(path: &Path, what: &str, timeout: Duration) -> std::io::Result<String> {
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(format!("{what}\n").as_bytes())?;
    let mut out = String::new();
    s.take(16 << 20).read_to_string(&mut out)?;
    Ok(out)
}
