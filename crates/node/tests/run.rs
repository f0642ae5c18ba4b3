//! `evio-node run` and `install-cni`, as the DaemonSet runs them: run inside a
//! node netns the test creates (it may bring a bridge up, and it listens on
//! that namespace's loopback), and stopped with SIGTERM.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// GET `path` from the daemon inside `ns`; (status line, body).
fn get(ns: &Netns, path: &str) -> Option<(String, String)> {
    let path = path.to_string();
    in_netns(ns.path(), move || -> Option<(String, String)> {
        let mut s = TcpStream::connect(("127.0.0.1", PORT)).ok()?;
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
    let child = ns
        .command(&[BIN, "run"])
        .args(["--config".as_ref(), conf.as_os_str()])
        .args(["--node-name", "node-r", "--store", &store])
        .args(["--cni-conf-dir".as_ref(), net_d.as_os_str()])
        .args([
            "--listen",
            &format!("127.0.0.1:{PORT}"),
            "--interval",
            "0.2",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut daemon = Daemon(child);
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

#[test]
fn run_is_unhealthy_while_the_store_is_unusable() {
    let ns = Netns::new("evrunb");
    let tmp = tempfile::tempdir().unwrap();
    let conf = write_conf(tmp.path(), "evrunb0");
    // A store path under a regular file can never be created.
    std::fs::write(tmp.path().join("file"), b"").unwrap();
    let store = format!("file://{}/file/subnets.json", tmp.path().display());
    let child = ns
        .command(&[BIN, "run"])
        .args(["--config".as_ref(), conf.as_os_str()])
        .args(["--node-name", "node-b", "--store", &store, "--timeout", "2"])
        .args([
            "--cni-conf-dir".as_ref(),
            tmp.path().join("net.d").as_os_str(),
        ])
        .args([
            "--listen",
            &format!("127.0.0.1:{PORT}"),
            "--interval",
            "0.2",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _daemon = Daemon(child);
    wait_for("/metrics", Duration::from_secs(10), || {
        get(&ns, "/metrics").is_some_and(|(_, b)| {
            metric(&b, "evio_node_reconcile_failures_total").unwrap_or(0.0) >= 1.0
        })
    });
    let (status, body) = get(&ns, "/healthz").unwrap();
    assert!(status.contains("503"), "{status} {body}");
    assert!(!tmp.path().join("net.d/10-evio.conflist").exists());
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
