//! `evio-node run` and `install-cni`, as the DaemonSet runs them: run inside a
//! node netns the test creates (it may bring a bridge up, and it listens on
//! that namespace's loopback), and stopped with SIGTERM.
//!
//! `run` also gets a private mount namespace whose /run/evio is a directory
//! of the test: the default agent socket (/run/evio/agent.sock) is then the
//! test's to create or not, whatever runs on the machine.
// A test that unwraps fails loudly, which is what a test should do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use evio_testkit::netns::Netns;
use evio_testkit::plugin::in_netns;

const BIN: &str = env!("CARGO_BIN_EXE_evio-node");
const PORT: u16 = 19471;

/// Kills the daemon if the test ends before it was stopped.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `evio-node run ARGS` in `ns` with `run_dir` mounted at /run/evio
/// (over a private tmpfs /run), stdio discarded.
fn spawn_run(ns: &Netns, run_dir: &Path, args: &[&OsStr]) -> Daemon {
    const SCRIPT: &str = "mount -t tmpfs evio-test /run && mkdir /run/evio \
        && mount --bind \"$1\" /run/evio && shift && exec \"$@\"";
    let child = ns
        .command(&["unshare", "--mount", "--propagation", "private", "--"])
        .args(["sh", "-c", SCRIPT, "sh"])
        .arg(run_dir)
        .args([BIN, "run"])
        .args(args)
        // The tests use the file store, refused inside a cluster.
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Daemon(child)
}

/// Stands in for the agent's control socket (crates/agent/src/control.rs):
/// one request line, one answer, close. A unit-level seam for `run`'s HTTP
/// side; the real agent is exercised by the agent's and the cluster's tests.
struct FakeAgent {
    stop: Arc<AtomicBool>,
    health: Arc<Mutex<String>>,
    thread: Option<JoinHandle<()>>,
}

const AGENT_METRICS: &str = "# HELP evio_peer_up Whether the peer is connected.\n# TYPE evio_peer_up gauge\nevio_peer_up{node=\"node-a\",peer=\"node-b\"} 1\n";

fn agent_health(ok: bool, revoked: bool) -> String {
    serde_json::json!({
        "ok": ok, "node": "node-a", "peers": 1, "connected": u8::from(ok),
        "revoked": revoked, "storeError": null, "uptimeSeconds": 3
    })
    .to_string()
}

impl FakeAgent {
    fn start(path: &Path) -> FakeAgent {
        let listener = UnixListener::bind(path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let health = Arc::new(Mutex::new(agent_health(true, false)));
        let thread = {
            let (stop, health) = (stop.clone(), health.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok((s, _)) = listener.accept() else {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    };
                    s.set_nonblocking(false).unwrap();
                    let mut line = String::new();
                    let _ = BufReader::new(&s).read_line(&mut line);
                    let answer = match line.trim() {
                        "health" => format!("{}\n", health.lock().unwrap()),
                        "metrics" => AGENT_METRICS.to_string(),
                        other => format!("{{\"error\":\"unknown request {other:?}\"}}\n"),
                    };
                    let _ = (&s).write_all(answer.as_bytes());
                }
            })
        };
        FakeAgent {
            stop,
            health,
            thread: Some(thread),
        }
    }

    fn set_health(&self, json: String) {
        *self.health.lock().unwrap() = json;
    }
}

impl Drop for FakeAgent {
    /// Stops answering; the socket file stays, as after a killed agent.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// GET `path` from the daemon inside `ns`; (status line, body).
fn get(ns: &Netns, path: &str) -> Option<(String, String)> {
    get_port(ns, PORT, path)
}

fn get_port(ns: &Netns, port: u16, path: &str) -> Option<(String, String)> {
    let path = path.to_string();
    in_netns(ns.path(), move || -> Option<(String, String)> {
        let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        let (head, body) = text.split_once("\r\n\r\n")?;
        Some((head.lines().next()?.to_string(), body.to_string()))
    })
    .join()
    .ok()?
    .ok()?
}

fn metric(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn write_conf(dir: &Path, bridge: &str) -> PathBuf {
    let conf = dir.join("net-conf.json");
    std::fs::write(
        &conf,
        serde_json::json!({
            "name": "runnet", "podCIDR": "10.244.0.0/16", "nodeBits": 8,
            "bridge": bridge, "bridgeType": "linux"
        })
        .to_string(),
    )
    .unwrap();
    conf
}

#[test]
fn run_rewrites_deleted_conflist_repairs_bridge_serves_health_and_metrics_and_stops_on_sigterm() {
    let ns = Netns::new("evrun");
    let tmp = tempfile::tempdir().unwrap();
    let conf = write_conf(tmp.path(), "evrun0");
    let net_d = tmp.path().join("net.d");
    let store = format!("file://{}/subnets.json", tmp.path().display());
    let run_dir = tmp.path().join("run-evio");
    std::fs::create_dir(&run_dir).unwrap();
    let listen = format!("127.0.0.1:{PORT}");
    let mut daemon = spawn_run(
        &ns,
        &run_dir,
        &[
            "--config".as_ref(),
            conf.as_os_str(),
            "--node-name".as_ref(),
            "node-r".as_ref(),
            "--store".as_ref(),
            store.as_ref(),
            "--cni-conf-dir".as_ref(),
            net_d.as_os_str(),
            "--listen".as_ref(),
            listen.as_ref(),
            "--interval".as_ref(),
            "0.2".as_ref(),
        ],
    );
    let conflist = net_d.join("10-evio.conflist");

    wait_for("the first conflist", Duration::from_secs(10), || {
        conflist.exists()
    });
    let first = std::fs::read_to_string(&conflist).unwrap();
    assert_eq!(
        std::fs::metadata(&conflist).unwrap().permissions().mode() & 0o777,
        0o644
    );
    std::fs::remove_file(&conflist).unwrap();
    wait_for(
        "the conflist to be rewritten",
        Duration::from_secs(10),
        || conflist.exists(),
    );
    assert_eq!(
        std::fs::read_to_string(&conflist).unwrap(),
        first,
        "same subnet back"
    );

    wait_for("/healthz", Duration::from_secs(10), || {
        get(&ns, "/healthz").is_some_and(|(s, b)| s.contains("200") && b == "ok\n")
    });
    let (status, _) = get(&ns, "/nope").unwrap();
    assert!(status.contains("404"), "{status}");

    // A bridge found down (as after an ovs-vswitchd restart) is brought up.
    ns.ok(&["ip", "link", "add", "evrun0", "type", "bridge"]);
    wait_for(
        "the bridge to be brought up",
        Duration::from_secs(10),
        || {
            ns.ok(&["ip", "-o", "link", "show", "evrun0"])
                .contains(",UP")
        },
    );

    let (status, body) = get(&ns, "/metrics").unwrap();
    assert!(status.contains("200"), "{status}");
    assert!(
        metric(&body, "evio_node_conflist_rewrites_total").unwrap() >= 2.0,
        "{body}"
    );
    assert!(
        metric(&body, "evio_node_bridge_repairs_total").unwrap() >= 1.0,
        "{body}"
    );
    assert!(
        metric(&body, "evio_node_reconciles_total").unwrap() >= 2.0,
        "{body}"
    );
    assert_eq!(
        metric(&body, "evio_node_reconcile_failures_total"),
        Some(0.0),
        "{body}"
    );
    assert_eq!(metric(&body, "evio_node_store_ok"), Some(1.0), "{body}");
    assert_eq!(metric(&body, "evio_node_pods"), Some(0.0), "{body}");
    assert!(
        body.contains(
            "evio_node_allocation_info{node=\"node-r\",network=\"runnet\",subnet=\"10.244."
        ),
        "{body}"
    );

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(s) = daemon.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "run did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "run exited with {status}");
}

/// A store outage makes the pod unready, not dead: /readyz (and its old
/// name /healthz) says 503, /livez stays 200 because the loop keeps coming
/// round, and the bridge is still repaired every pass.
#[test]
fn run_is_unready_but_alive_and_repairs_the_bridge_while_the_store_is_unusable() {
    let ns = Netns::new("evrunb");
    let tmp = tempfile::tempdir().unwrap();
    let conf = write_conf(tmp.path(), "evrunb0");
    // A store path under a regular file can never be created.
    std::fs::write(tmp.path().join("file"), b"").unwrap();
    let store = format!("file://{}/file/subnets.json", tmp.path().display());
    let run_dir = tmp.path().join("run-evio");
    std::fs::create_dir(&run_dir).unwrap();
    let listen = format!("127.0.0.1:{PORT}");
    let net_d = tmp.path().join("net.d");
    let _daemon = spawn_run(
        &ns,
        &run_dir,
        &[
            "--config".as_ref(),
            conf.as_os_str(),
            "--node-name".as_ref(),
            "node-b".as_ref(),
            "--store".as_ref(),
            store.as_ref(),
            "--timeout".as_ref(),
            "2".as_ref(),
            "--cni-conf-dir".as_ref(),
            net_d.as_os_str(),
            "--listen".as_ref(),
            listen.as_ref(),
            "--interval".as_ref(),
            "0.2".as_ref(),
        ],
    );
    wait_for("/metrics", Duration::from_secs(10), || {
        get(&ns, "/metrics").is_some_and(|(_, b)| {
            metric(&b, "evio_node_reconcile_failures_total").unwrap_or(0.0) >= 1.0
        })
    });
    for path in ["/readyz", "/healthz"] {
        let (status, body) = get(&ns, path).unwrap();
        assert!(status.contains("503"), "{path}: {status} {body}");
        // The store's error names its path: anonymous callers get the kind of
        // problem only, the log has the rest.
        assert_eq!(
            body, "reconcile failing (see the log of evio-node run)\n",
            "{path}: {status}"
        );
        assert!(!body.contains(tmp.path().to_str().unwrap()), "{body}");
    }
    // Several store timeouts later the loop is still alive.
    std::thread::sleep(Duration::from_secs(3));
    let (status, body) = get(&ns, "/livez").unwrap();
    assert!(status.contains("200") && body == "ok\n", "{status} {body}");
    assert!(!tmp.path().join("net.d/10-evio.conflist").exists());

    // The bridge name comes from the config, not the store: a bridge found
    // down is brought up although no reconcile succeeds.
    ns.ok(&["ip", "link", "add", "evrunb0", "type", "bridge"]);
    wait_for(
        "the bridge to be brought up without a store",
        Duration::from_secs(15),
        || {
            ns.ok(&["ip", "-o", "link", "show", "evrunb0"])
                .contains(",UP")
        },
    );
    let (_, body) = get(&ns, "/metrics").unwrap();
    assert!(
        metric(&body, "evio_node_bridge_repairs_total").unwrap() >= 1.0,
        "{body}"
    );
    assert_eq!(metric(&body, "evio_node_bridge_up"), Some(1.0), "{body}");
    assert_eq!(metric(&body, "evio_node_store_ok"), Some(0.0), "{body}");
    assert!(get(&ns, "/readyz").unwrap().0.contains("503"));
    assert!(get(&ns, "/livez").unwrap().0.contains("200"));
}

/// The agent seen through `run`: absent (no socket at the default path) is
/// fine; present, its health decides /healthz and its metrics follow
/// `run`'s; gone without cleaning up (socket left, nobody answering) or
/// reporting ok=false is a 503; /livez ignores it. An explicitly named
/// socket is required.
#[test]
fn run_reports_the_agents_health_and_metrics_from_its_control_socket() {
    let ns = Netns::new("evruna");
    let tmp = tempfile::tempdir().unwrap();
    let conf = write_conf(tmp.path(), "evruna0");
    let store = format!("file://{}/subnets.json", tmp.path().display());
    let net_d = tmp.path().join("net.d");
    let run_dir = tmp.path().join("run-evio");
    std::fs::create_dir(&run_dir).unwrap();
    let socket = run_dir.join("agent.sock");
    let common = |port: u16| -> Vec<std::ffi::OsString> {
        let listen = format!("127.0.0.1:{port}");
        [
            "--config".as_ref(),
            conf.as_os_str(),
            "--node-name".as_ref(),
            "node-a".as_ref(),
            "--store".as_ref(),
            store.as_ref(),
            "--cni-conf-dir".as_ref(),
            net_d.as_os_str(),
            "--listen".as_ref(),
            listen.as_ref(),
            "--interval".as_ref(),
            "0.2".as_ref(),
        ]
        .iter()
        .map(|s: &&OsStr| s.to_os_string())
        .collect()
    };
    let args = common(PORT);
    let argv: Vec<&OsStr> = args.iter().map(|s| s.as_os_str()).collect();
    let _daemon = spawn_run(&ns, &run_dir, &argv);

    // No agent on this node: healthy, and no agent series.
    wait_for("/healthz without an agent", Duration::from_secs(10), || {
        get(&ns, "/healthz").is_some_and(|(s, b)| s.contains("200") && b == "ok\n")
    });
    let (_, body) = get(&ns, "/metrics").unwrap();
    assert!(!body.contains("evio_node_agent_up"), "{body}");

    let agent = FakeAgent::start(&socket);
    let (status, body) = get(&ns, "/healthz").unwrap();
    assert!(status.contains("200"), "{status} {body}");
    assert_eq!(body, "ok\nagent: ok\n");
    let (status, body) = get(&ns, "/readyz").unwrap();
    assert!(
        status.contains("200") && body == "ok\nagent: ok\n",
        "{status} {body}"
    );
    let (_, body) = get(&ns, "/metrics").unwrap();
    assert_eq!(metric(&body, "evio_node_agent_up"), Some(1.0), "{body}");
    assert!(body.contains(AGENT_METRICS), "{body}");
    assert!(
        metric(&body, "evio_node_reconciles_total").unwrap() >= 1.0,
        "run's own metrics come first: {body}"
    );

    // Not all peers connected or idle: reported with a count, still ready
    // (one node down must not make every node unready).
    agent.set_health(
        serde_json::json!({"ok": true, "node": "node-a", "peers": 3, "connected": 1,
            "healthyPeers": 2, "degraded": true})
        .to_string(),
    );
    let (status, body) = get(&ns, "/readyz").unwrap();
    assert!(
        status.contains("200")
            && body == "ok\nagent: ok, degraded: 2 of 3 peers connected or idle\n",
        "{status} {body}"
    );
    agent.set_health(agent_health(false, true));
    let (status, body) = get(&ns, "/healthz").unwrap();
    assert!(status.contains("503"), "{status} {body}");
    // The agent's JSON (which may carry its store's error) stays in the log.
    assert!(
        body.contains("ok=false") && !body.contains("revoked"),
        "{body}"
    );
    let (status, body) = get(&ns, "/livez").unwrap();
    assert!(status.contains("200") && body == "ok\n", "{status} {body}");

    // Killed: the socket file stays and nobody answers.
    drop(agent);
    let (status, body) = get(&ns, "/healthz").unwrap();
    assert!(status.contains("503"), "{status} {body}");
    assert!(body.contains("agent: down"), "{body}");
    assert!(
        !body.contains(socket.to_str().unwrap()),
        "the reason (with the socket's path) goes to the log, not to the caller: {body}"
    );
    let (_, body) = get(&ns, "/metrics").unwrap();
    assert_eq!(metric(&body, "evio_node_agent_up"), Some(0.0), "{body}");
    assert!(get(&ns, "/livez").unwrap().0.contains("200"));

    // Stopped cleanly (the agent removes its socket): no agent again.
    std::fs::remove_file(&socket).unwrap();
    let (status, body) = get(&ns, "/healthz").unwrap();
    assert!(status.contains("200") && body == "ok\n", "{status} {body}");

    // Named explicitly, the agent is required even before its socket exists.
    let mut args = common(PORT + 1);
    args.push("--agent-socket".into());
    args.push(run_dir.join("other.sock").into_os_string());
    let argv: Vec<&OsStr> = args.iter().map(|s| s.as_os_str()).collect();
    let _required = spawn_run(&ns, &run_dir, &argv);
    wait_for("/livez of the second run", Duration::from_secs(10), || {
        get_port(&ns, PORT + 1, "/livez").is_some_and(|(s, _)| s.contains("200"))
    });
    let (status, body) = get_port(&ns, PORT + 1, "/healthz").unwrap();
    assert!(status.contains("503"), "{status} {body}");
    assert!(
        body.contains("agent: down") && !body.contains("other.sock"),
        "{body}"
    );
}

#[test]
fn install_cni_copies_every_file_atomically_with_mode_0755_and_leaves_others() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let dest = tmp.path().join("dest");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::create_dir_all(&dest).unwrap();
    std::fs::write(src.join("evio"), b"new plugin").unwrap();
    std::fs::write(dest.join("evio"), b"old plugin").unwrap();
    std::fs::write(dest.join("host-local"), b"someone else's").unwrap();
    let out = Command::new(BIN)
        .args(["install-cni".as_ref(), "--src".as_ref(), src.as_os_str()])
        .args(["--dest".as_ref(), dest.as_os_str()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(std::fs::read(dest.join("evio")).unwrap(), b"new plugin");
    assert_eq!(
        std::fs::metadata(dest.join("evio"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o755
    );
    assert_eq!(
        std::fs::read(dest.join("host-local")).unwrap(),
        b"someone else's"
    );
    let names: Vec<_> = std::fs::read_dir(&dest)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "no temp files left: {names:?}");

    // An empty source is an error, not a silent no-op.
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let out = Command::new(BIN)
        .args(["install-cni".as_ref(), "--src".as_ref(), empty.as_os_str()])
        .args(["--dest".as_ref(), dest.as_os_str()])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

/// A crash between install-cni's temp file and its rename leaves
/// `.evio.tmp.PID.XXXXXXXX` in the host's CNI bin dir; the next start
/// removes it, and nothing else (not another name, not a symlink).
#[test]
fn install_cni_removes_its_own_leftover_temp_files_and_nothing_else() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let dest = tmp.path().join("dest");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::create_dir_all(&dest).unwrap();
    std::fs::write(src.join("evio"), b"new plugin").unwrap();
    let old = std::time::SystemTime::now() - Duration::from_secs(3600);
    let backdated = |path: &Path| {
        std::fs::write(path, b"half a binary").unwrap();
        std::fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(old)
            .unwrap();
    };
    let leftover = dest.join(".evio.tmp.4242.0a1b2c3d");
    backdated(&leftover);
    let foreign = dest.join(".bridge.tmp.4242.0a1b2c3d");
    backdated(&foreign);
    let target = tmp.path().join("not-ours");
    backdated(&target);
    let link = dest.join(".evio.tmp.4243.0a1b2c3d");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let out = Command::new(BIN)
        .args(["install-cni".as_ref(), "--src".as_ref(), src.as_os_str()])
        .args(["--dest".as_ref(), dest.as_os_str()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(!leftover.exists(), "the leftover is removed");
    assert!(foreign.exists(), "another file's temp is not ours");
    assert!(link.symlink_metadata().is_ok(), "a symlink is not removed");
    assert_eq!(std::fs::read(&target).unwrap(), b"half a binary");
}

/// A client that trickles its request a byte at a time (each read well
/// within any per-read timeout) holds one connection until the request
/// deadline, not the server: probes keep being answered meanwhile, the slow
/// connection is closed within a few seconds, and connections beyond the
/// cap are refused at once instead of queueing.
#[test]
fn run_answers_probes_while_slow_clients_hold_connections() {
    let ns = Netns::new("evruns");
    let tmp = tempfile::tempdir().unwrap();
    let conf = write_conf(tmp.path(), "evruns0");
    let store = format!("file://{}/subnets.json", tmp.path().display());
    let net_d = tmp.path().join("net.d");
    let run_dir = tmp.path().join("run-evio");
    std::fs::create_dir(&run_dir).unwrap();
    let port = PORT + 7;
    let listen = format!("127.0.0.1:{port}");
    let _daemon = spawn_run(
        &ns,
        &run_dir,
        &[
            "--config".as_ref(),
            conf.as_os_str(),
            "--node-name".as_ref(),
            "node-s".as_ref(),
            "--store".as_ref(),
            store.as_ref(),
            "--cni-conf-dir".as_ref(),
            net_d.as_os_str(),
            "--listen".as_ref(),
            listen.as_ref(),
            "--interval".as_ref(),
            "0.2".as_ref(),
        ],
    );
    wait_for("/livez", Duration::from_secs(10), || {
        get_port(&ns, port, "/livez").is_some_and(|(s, _)| s.contains("200"))
    });

    // One slow client, sending a byte every 300 ms for up to 10 s.
    let stop = Arc::new(AtomicBool::new(false));
    let slow = {
        let stop = Arc::clone(&stop);
        in_netns(ns.path(), move || -> Option<Duration> {
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.set_write_timeout(Some(Duration::from_secs(1))).unwrap();
            let start = Instant::now();
            for b in b"GET /healthz HTTP/1.1 and on and on and on and on"
                .iter()
                .cycle()
            {
                if stop.load(Ordering::SeqCst) || start.elapsed() > Duration::from_secs(10) {
                    return None;
                }
                if s.write_all(&[*b]).is_err() {
                    // Closed by the server: how long it let us hold it.
                    return Some(start.elapsed());
                }
                std::thread::sleep(Duration::from_millis(300));
            }
            None
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..5 {
        let t = Instant::now();
        let (status, body) = get_port(&ns, port, "/livez").expect("an answer");
        assert!(status.contains("200"), "{status} {body}");
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "took {:?}",
            t.elapsed()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let held = slow.join().unwrap().unwrap();
    stop.store(true, Ordering::SeqCst);
    let held = held.expect("the server closes a connection that never finishes its request");
    assert!(held < Duration::from_secs(5), "held for {held:?}");

    // More silent connections than the cap: the ones past it are answered
    // 503 at once, and once the deadline frees the slots, probes pass.
    let refused = in_netns(ns.path(), move || -> usize {
        let mut held = Vec::new();
        let mut refused = 0;
        for _ in 0..12 {
            let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            held.push(s);
        }
        std::thread::sleep(Duration::from_millis(200));
        for s in &mut held {
            let mut buf = [0u8; 64];
            if let Ok(n) = s.read(&mut buf) {
                if String::from_utf8_lossy(&buf[..n]).contains("503") {
                    refused += 1;
                }
            }
        }
        refused
    })
    .join()
    .unwrap()
    .unwrap();
    assert!(
        refused >= 4,
        "connections past the cap are refused: {refused}"
    );
    wait_for(
        "/livez after the slots free",
        Duration::from_secs(5),
        || get_port(&ns, port, "/livez").is_some_and(|(s, _)| s.contains("200")),
    );
}
