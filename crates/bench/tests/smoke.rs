//! CI proof that the benchmark still works: tiny latency, overlay and Services runs of
//! the real binary against the real plugins and agents. No figure is checked, only that every
//! run succeeded, the report has its rows, and nothing was left behind.
//!
//! Needs the `evio` plugin and `evio-node` built next to `evio-bench` (as
//! `cargo test --workspace` does) and root. boringtun is optional: without
//! `boringtun-cli` its column says "not installed".
// Test support: a harness that unwraps fails the test that called it, loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Run {
    pid: u32,
    stdout: String,
    doc: String,
}

/// Runs evio-bench with `args` and `--output FILE`, bounded by `limit`;
/// fails the test unless it succeeded without a failed section.
fn run_bench(args: &[&str], limit: Duration) -> Run {
    let exe = env!("CARGO_BIN_EXE_evio-bench");
    let out_file = tempfile::NamedTempFile::new().unwrap();
    let mut child = Command::new(exe)
        .args(args)
        .arg("--output")
        .arg(out_file.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let started = Instant::now();
    let deadline = started + limit;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if Instant::now() >= deadline {
            // SIGTERM first: the benchmark then cleans up after itself.
            let _ = Command::new("kill").arg(pid.to_string()).status();
            std::thread::sleep(Duration::from_secs(8));
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = out_t.join().unwrap();
    let stderr = err_t.join().unwrap();
    let status = status
        .unwrap_or_else(|| panic!("evio-bench took longer than {limit:?}\n{stdout}\n{stderr}"));
    assert!(
        status.success(),
        "evio-bench failed: {status}\n{stdout}\n{stderr}"
    );
    assert!(!stdout.contains("FAILED"), "{stdout}\n{stderr}");
    eprintln!("evio-bench {args:?} took {:?}", started.elapsed());
    let doc = std::fs::read_to_string(out_file.path()).unwrap();
    assert!(doc.contains("<!-- BEGIN GENERATED"), "{doc}");
    Run { pid, stdout, doc }
}

/// Namespaces whose name carries `pid`'s tag (`<prefix><pid % 100000>x<n>`,
/// as evio-testkit names them), of whatever prefix.
fn namespaces_of(pid: u32) -> Vec<String> {
    let ns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let tag = format!("{}x", pid % 100_000);
    String::from_utf8_lossy(&ns.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| {
            name.match_indices(&tag)
                .any(|(i, _)| i > 0 && !name.as_bytes()[i - 1].is_ascii_digit())
        })
        .map(str::to_string)
        .collect()
}

#[test]
fn quick_latency_run_succeeds_and_cleans_up() {
    let r = run_bench(
        &["--quick", "--only", "latency", "--pods", "2"],
        Duration::from_secs(60),
    );
    for needle in [
        "## 1. Pod ADD/DEL latency",
        "| reference bridge |",
        "| evio linux |",
        "| evio ovs (netdev) |",
        "| host-local alone (floor) |",
        "evio linux: ADD ≤ 1.3× floor",
        "evio linux: DEL ≤ 1.3× floor",
        "evio linux: ipMasq adds ≤ 0.5 ms",
    ] {
        assert!(r.stdout.contains(needle), "no {needle:?} in\n{}", r.stdout);
    }
    assert!(r.doc.contains("| evio linux |"));
    // Every namespace it made carries its pid: none may survive it.
    let left = namespaces_of(r.pid);
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
}

/// The overlay section's quick variant: two nodes with agents, the plain
/// link and VXLAN (boringtun only where it is installed), connect time and
/// idle cost. CI runs it; it must stay short.
#[test]
fn quick_overlay_run_succeeds_and_cleans_up() {
    let r = run_bench(&["--quick", "--only", "overlay"], Duration::from_secs(60));
    for needle in [
        "## 5. Overlay",
        "| evio overlay (Linux bridge) |",
        "| plain veth between the node bridges (the limit) |",
        "| kernel VXLAN, unencrypted (Linux bridge) |",
        "boringtun",
        "added RTT ≤ 0.1 ms (median)",
        "all connected ≤ 2 s",
        "idle ≤ 0.5 % of a core",
    ] {
        assert!(r.stdout.contains(needle), "no {needle:?} in\n{}", r.stdout);
    }
    assert!(r.doc.contains("| evio overlay (Linux bridge) |"));
    let left = namespaces_of(r.pid);
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    let tag = format!("ebw{}t", r.pid % 100_000);
    let sockets: Vec<String> = std::fs::read_dir("/var/run/wireguard")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&tag))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        sockets.is_empty(),
        "boringtun sockets left behind: {sockets:?}"
    );
}

/// The Services section's quick variant (issue 19): both bridge types, pod
/// to pod with evio's Services path off and on, and pod to a ClusterIP
/// through kube-proxy's rules.
#[test]
fn quick_services_run_succeeds_and_cleans_up() {
    let r = run_bench(
        &[
            "--quick",
            "--only",
            "services",
            "--round-trips",
            "50",
            "--connects",
            "10",
        ],
        Duration::from_secs(60),
    );
    for needle in [
        "## 6. Services",
        "| Linux bridge, same node | pod → pod, Services path off (before) |",
        "| OVS netdev, two nodes | pod → pod, Services path off (before) |",
        "| pod → ClusterIP → pod |",
        "| pod → pod, the pair also uses the ClusterIP |",
    ] {
        assert!(r.stdout.contains(needle), "no {needle:?} in\n{}", r.stdout);
    }
    let left = namespaces_of(r.pid);
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
}
