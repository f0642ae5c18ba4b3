//! The control socket: one request line, one answer, then close.
//! `peers` → the JSON of OVERLAY.md; `metrics` → Prometheus text;
//! `health` → a JSON summary (`evio-node run` serves it on /healthz);
//! `explain NODE` → one peer in depth with a verdict (explain.rs);
//! `leave` → the agent takes the node off the network and exits
//! (`evio-node agent --stop-and-leave`).
//! The socket is born mode 0600 in a directory of mode 0700 (when the agent
//! makes it): what it tells (endpoints, keys) is for root, at no moment for
//! anyone else.

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
    let listener = bind_private(path)?;
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

/// Binds the socket at `path` so that it never exists there with a mode
/// other than 0600: the umask applies to bind(2) and is process-wide (no
/// thread can change it for itself alone), so the socket is bound in a
/// fresh 0700 directory beside `path`, made 0600 there, and renamed into
/// place. A missing parent is created 0700; an existing one is left as it
/// is (it may be shared, e.g. /run).
fn bind_private(path: &Path) -> Result<UnixListener, AgentError> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(d) => d.to_path_buf(),
        None => std::path::PathBuf::from("."),
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(AgentError::io(format!("create {}", dir.display())))?;
    // A socket file left by a killed agent: nobody listens on it any more.
    if UnixStream::connect(path).is_ok() {
        return Err(AgentError::Config(format!(
            "control socket {} is in use: is another agent running?",
            path.display()
        )));
    }
    let staging = dir.join(format!(".evio-control.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&staging)
        .map_err(AgentError::io(format!("create {}", staging.display())))?;
    let result = (|| {
        let born = staging.join("sock");
        let listener = UnixListener::bind(&born)
            .map_err(AgentError::io(format!("bind {}", born.display())))?;
        std::fs::set_permissions(&born, std::fs::Permissions::from_mode(0o600))
            .map_err(AgentError::io(format!("chmod {}", born.display())))?;
        std::fs::rename(&born, path).map_err(AgentError::io(format!(
            "move the socket to {}",
            path.display()
        )))?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(&staging);
    result
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
    if let Some(node) = line.trim().strip_prefix("explain ") {
        let answer = explain(engine, &h, node.trim());
        let mut w = &s;
        let _ = w.write_all(format!("{answer}\n").as_bytes());
        return;
    }
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
                // `idle` (no session because none is needed) is as healthy
                // as connected (OVERLAY.md).
                let healthy = snap
                    .peers
                    .iter()
                    .filter(|p| matches!(p.state.as_str(), "connected" | "idle"))
                    .count();
                json!({
                    "ok": h.published && !h.revoked,
                    "node": me.node,
                    "peers": snap.peers.len(),
                    "connected": connected,
                    "healthyPeers": healthy,
                    "degraded": healthy < snap.peers.len(),
                    "storeOk": h.store_ok(),
                    "revoked": h.revoked,
                    "storeError": h.last_error,
                    "uptimeSeconds": me.started.elapsed().as_secs(),
                })
                .to_string()
            }
            other => {
                json!({"error": format!("unknown request {other:?}: peers, explain NODE, metrics, health or leave")})
                    .to_string()
            }
        },
    };
    let mut w = &s;
    let _ = w.write_all(answer.as_bytes());
    let _ = w.write_all(b"\n");
    drop((answer, h));
    // An answer about every peer was built and dropped: O(n) of the
    // cluster, not to stay resident until the next one.
    crate::heap::trim();
}

/// The answer to `explain NODE`: the peer in depth, or why it is none.
fn explain(engine: &EngineHandle, h: &StoreHealth, node: &str) -> serde_json::Value {
    match engine.explain(node, ENGINE_TIMEOUT) {
        None => json!({"error": "the engine does not answer"}),
        Some(Some(ex)) => crate::explain::explain_json(&ex, h),
        Some(None) => match h.ignored.iter().find(|(n, _)| n == node) {
            Some((_, why)) => {
                json!({"error": format!("{node} is no peer: its record is ignored: {why}")})
            }
            None => {
                json!({"error": format!("{node} is no peer of this node: no record of it is believed")})
            }
        },
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().mode() & 0o777
    }

    #[test]
    fn the_socket_is_born_0600_in_a_0700_directory() {
        let d = tempfile::tempdir().unwrap();
        // An existing directory is left alone; a missing one is made 0700
        // whatever the umask (the test process has the usual 022).
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = d.path().join("run/evio/agent.sock");
        let l = bind_private(&path).unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&d.path().join("run/evio")), 0o700);
        assert_eq!(mode(d.path()), 0o755);
        // Nothing left but the socket, and it is the one listening.
        let names: Vec<_> = std::fs::read_dir(d.path().join("run/evio"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("agent.sock")]);
        let _c = UnixStream::connect(&path).unwrap();
        assert!(l.accept().is_ok());
        // Taken: refused. Left by a dead agent: replaced.
        assert!(bind_private(&path).is_err());
        drop(l);
        // Other tests of this process spawn children (openssl): one forked
        // while `l` was open holds a copy of it until its exec, and the
        // socket still answers then. Only such a copy can, so wait it out
        // (bounded) rather than call that a live agent.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let again = loop {
            match bind_private(&path) {
                Ok(l) => break l,
                Err(e) if std::time::Instant::now() >= deadline => panic!("{e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        assert_eq!(mode(&path), 0o600);
        drop(again);
    }
}
