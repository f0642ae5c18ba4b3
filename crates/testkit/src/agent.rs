//! `evio-node agent` as a test runs it: a process inside a node netns,
//! taken off the network on drop (`--stop-and-leave`: its devices, bridge
//! port and store record go; SIGTERM alone would keep them for a next
//! agent, and SIGKILL follows if it does not go), with its control socket,
//! logs and the helpers tests need around it.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::netns::Netns;
use crate::process;

/// How an agent is started (kept for restarts).
#[derive(Debug, Clone)]
pub struct AgentSpec {
    pub bin: PathBuf,
    pub netns: String,
    pub config: PathBuf,
    pub node: String,
    pub store: String,
    pub socket: PathBuf,
    pub log: PathBuf,
    /// More flags (e.g. `--tap-name`).
    pub extra: Vec<String>,
    /// Environment (e.g. EVIO_LOG=debug).
    pub env: Vec<(String, String)>,
}

pub struct Agent {
    spec: AgentSpec,
    child: Option<Child>,
    pub started: Instant,
}

impl Agent {
    pub fn start(spec: AgentSpec) -> Result<Agent, String> {
        let mut a = Agent {
            spec,
            child: None,
            started: Instant::now(),
        };
        a.spawn()?;
        Ok(a)
    }

    fn spawn(&mut self) -> Result<(), String> {
        let s = &self.spec;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&s.log)
            .map_err(|e| format!("{}: {e}", s.log.display()))?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = Command::new("setpriv");
        // If the test process dies, the agent gets SIGTERM and cleans up.
        cmd.args(["--pdeathsig", "TERM", "--", "nsenter"])
            .arg(format!("--net=/run/netns/{}", s.netns))
            .arg("--")
            .arg(&s.bin)
            .arg("agent")
            .arg("--config")
            .arg(&s.config)
            .arg("--node-name")
            .arg(&s.node)
            .arg("--store")
            .arg(&s.store)
            .arg("--control-socket")
            .arg(&s.socket)
            .args(&s.extra)
            .envs(s.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        let child = cmd.spawn().map_err(|e| format!("spawn the agent: {e}"))?;
        self.child = Some(child);
        self.started = Instant::now();
        Ok(())
    }

    pub fn spec(&self) -> &AgentSpec {
        &self.spec
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process still runs (reaps it if it exited).
    pub fn running(&mut self) -> bool {
        process::running(&mut self.child)
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        if let Some(pid) = self.pid() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
        }
    }

    /// SIGTERM (a restart's stop: the node stays on the network), then
    /// waits up to `grace`; SIGKILL after that. Returns the exit status and
    /// how long the agent took.
    pub fn terminate(&mut self, grace: Duration) -> Option<(ExitStatus, Duration)> {
        let mut child = self.child.take()?;
        let t = Instant::now();
        let st = process::stop(&mut child, nix::sys::signal::Signal::SIGTERM, grace)?;
        Some((st, t.elapsed()))
    }

    /// SIGKILL (a crash): nothing of the agent's cleanup runs.
    pub fn kill(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGKILL);
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }

    /// `evio-node agent --stop-and-leave` with the agent's own arguments:
    /// the agent takes the node off the network and exits (within `grace`,
    /// or it is killed). Also cleans up after an agent that is not running.
    /// Returns the agent's exit status (if it ran) and how long it took.
    pub fn leave(&mut self, grace: Duration) -> Result<(Option<ExitStatus>, Duration), String> {
        let t = Instant::now();
        let s = &self.spec;
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", s.netns))
            .arg("--")
            .arg(&s.bin)
            .args(["agent", "--stop-and-leave", "--config"])
            .arg(&s.config)
            .arg("--node-name")
            .arg(&s.node)
            .arg("--store")
            .arg(&s.store)
            .arg("--control-socket")
            .arg(&s.socket)
            // A store that is down must not hold a test's teardown for
            // the default 30 s.
            .args(["--timeout", "3"])
            .args(&s.extra)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("spawn evio-node agent --stop-and-leave: {e}"));
        let status = self.child.take().and_then(|mut c| {
            let deadline = Instant::now() + grace;
            loop {
                if let Ok(Some(st)) = c.try_wait() {
                    return Some(st);
                }
                if Instant::now() >= deadline {
                    return process::stop(&mut c, nix::sys::signal::Signal::SIGKILL, grace);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        let out = out?;
        if !out.status.success() {
            return Err(format!(
                "{}: --stop-and-leave failed ({}): {}{}",
                s.node,
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok((status, t.elapsed()))
    }

    /// Starts the agent again with the same arguments.
    pub fn restart(&mut self) -> Result<(), String> {
        if self.child.is_some() {
            self.terminate(Duration::from_secs(6));
        }
        self.spawn()
    }

    /// One request on the control socket (`peers`, `metrics`, `health`).
    pub fn request(&self, what: &str) -> Result<String, String> {
        let mut s = UnixStream::connect(&self.spec.socket)
            .map_err(|e| format!("{}: {e}", self.spec.socket.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        s.write_all(format!("{what}\n").as_bytes())
            .map_err(|e| e.to_string())?;
        let mut out = String::new();
        s.read_to_string(&mut out).map_err(|e| e.to_string())?;
        Ok(out)
    }

    /// `peers --json`, parsed.
    pub fn peers(&self) -> Result<Value, String> {
        let t = self.request("peers")?;
        serde_json::from_str(t.trim()).map_err(|e| format!("{e}: {t}"))
    }

    pub fn metrics(&self) -> Result<String, String> {
        self.request("metrics")
    }

    /// The value of one metric line (`name{labels}` exactly as printed,
    /// labels in the agent's order), 0 if absent.
    pub fn metric(&self, prefix: &str) -> u64 {
        self.metrics()
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|v| v as u64)
            .sum()
    }

    /// Waits until `n` peers are connected (a session and a path that
    /// answers); returns how long it took from the agent's start. With
    /// sessions on demand a peer is connected only once traffic went to
    /// it: send some first (e.g. [`crate::cluster::Cluster::touch`]).
    pub fn wait_connected(&self, n: usize, timeout: Duration) -> Result<Duration, String> {
        self.wait_peers(n, timeout, connected, "connected")
    }

    /// Waits until `n` peers are healthy: `connected`, or `idle` (known and
    /// valid, no session because no traffic needs one: OVERLAY.md).
    pub fn wait_healthy(&self, n: usize, timeout: Duration) -> Result<Duration, String> {
        self.wait_peers(n, timeout, healthy, "healthy (connected or idle)")
    }

    fn wait_peers(
        &self,
        n: usize,
        timeout: Duration,
        count: fn(&Value) -> usize,
        what: &str,
    ) -> Result<Duration, String> {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        loop {
            if let Ok(v) = self.peers() {
                let c = count(&v);
                if c >= n {
                    return Ok(self.started.elapsed());
                }
                last = v.to_string();
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{}: not {n} peers {what} within {timeout:?}: {last}\n{}",
                    self.spec.node,
                    self.log_tail(40)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.spec.log).unwrap_or_default()
    }

    pub fn log_tail(&self, n: usize) -> String {
        let l = self.log();
        let lines: Vec<&str> = l.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    pub fn socket(&self) -> &Path {
        &self.spec.socket
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.is_some() {
            if let Err(e) = self.leave(Duration::from_secs(6)) {
                eprintln!("agent teardown: {e}");
            }
        }
        self.terminate(Duration::from_secs(6));
    }
}

/// The frames of a pcap capture (classic pcap, as tcpdump -w writes).
pub fn pcap_frames(pcap: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut at = 24;
    while at + 16 <= pcap.len() {
        let incl =
            u32::from_le_bytes([pcap[at + 8], pcap[at + 9], pcap[at + 10], pcap[at + 11]]) as usize;
        let end = (at + 16 + incl).min(pcap.len());
        out.push(&pcap[at + 16..end]);
        at = end;
    }
    out
}

/// How many peers a `peers --json` answer lists as connected.
pub fn connected(v: &Value) -> usize {
    v["peers"]
        .as_array()
        .map(|a| a.iter().filter(|p| p["state"] == "connected").count())
        .unwrap_or(0)
}

/// How many peers a `peers --json` answer lists as healthy (`connected`
/// or `idle`).
pub fn healthy(v: &Value) -> usize {
    crate::scale::known(v).0
}

/// The entry for `node` in a `peers --json` answer.
pub fn peer<'a>(v: &'a Value, node: &str) -> Option<&'a Value> {
    v["peers"].as_array()?.iter().find(|p| p["node"] == node)
}

/// Runs `tcpdump` in `ns` on `iface` while `f` runs; returns the raw
/// capture (pcap bytes) for byte searches.
pub fn capture<T>(ns: &Netns, iface: &str, filter: &str, f: impl FnOnce() -> T) -> (T, Vec<u8>) {
    capture_with(ns, iface, &[], filter, f)
}

/// [`capture`] with more tcpdump options (e.g. `-Q in`).
pub fn capture_with<T>(
    ns: &Netns,
    iface: &str,
    opts: &[&str],
    filter: &str,
    f: impl FnOnce() -> T,
) -> (T, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let file = dir.path().join("cap.pcap");
    let file_s = file.display().to_string();
    // --immediate-mode: without it tcpdump hands packets over in blocks and
    // drops the last, partly filled block when it is stopped.
    let mut argv = vec![
        "tcpdump",
        "--immediate-mode",
        "-i",
        iface,
        "-U",
        "-s",
        "0",
        "-w",
        &file_s,
    ];
    argv.extend_from_slice(opts);
    argv.push(filter);
    let mut child = ns
        .command(&argv)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn tcpdump: {e}"));
    // tcpdump says "listening on" once the capture is armed.
    let mut err = child.stderr.take();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        let mut seen = String::new();
        if let Some(e) = err.as_mut() {
            while let Ok(n) = e.read(&mut buf) {
                if n == 0 {
                    break;
                }
                seen.push_str(&String::from_utf8_lossy(&buf[..n]));
                if seen.contains("listening on") {
                    let _ = tx.send(());
                }
            }
        }
    });
    let _ = rx.recv_timeout(Duration::from_secs(10));
    let out = f();
    std::thread::sleep(Duration::from_millis(300));
    // SIGINT: tcpdump writes out what it holds and exits.
    let _ = process::stop(
        &mut child,
        nix::sys::signal::Signal::SIGINT,
        Duration::from_secs(5),
    );
    let bytes = std::fs::read(&file).unwrap_or_default();
    (out, bytes)
}
