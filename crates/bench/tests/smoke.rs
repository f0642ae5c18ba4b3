//! CI proof that the benchmark still works: a tiny latency run of the real
//! binary against the real plugins. No figure is checked, only that every
//! run succeeded, the report has its rows, and nothing was left behind.
//!
//! Needs the `evio` plugin built next to `evio-bench` (as
//! `cargo test --workspace` does) and root.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn quick_latency_run_succeeds_and_cleans_up() {
    let exe = env!("CARGO_BIN_EXE_evio-bench");
    let out_file = tempfile::NamedTempFile::new().unwrap();
    let mut child = Command::new(exe)
        .args(["--quick", "--only", "latency", "--pods", "2", "--output"])
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
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if Instant::now() >= deadline {
            // SIGTERM first: the benchmark then cleans up after itself.
            let _ = Command::new("kill").arg(pid.to_string()).status();
            std::thread::sleep(Duration::from_secs(5));
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = out_t.join().unwrap();
    let stderr = err_t.join().unwrap();
    let status = status.unwrap_or_else(|| panic!("evio-bench hung\n{stdout}\n{stderr}"));
    assert!(
        status.success(),
        "evio-bench failed: {status}\n{stdout}\n{stderr}"
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
        assert!(stdout.contains(needle), "no {needle:?} in\n{stdout}");
    }
    assert!(!stdout.contains("RUN FAILED"), "{stdout}");
    let doc = std::fs::read_to_string(out_file.path()).unwrap();
    assert!(doc.contains("<!-- BEGIN GENERATED") && doc.contains("| evio linux |"));

    // Every namespace it made carries its pid: none may survive it.
    let ns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let ns = String::from_utf8_lossy(&ns.stdout);
    let tag = format!("{}x", pid % 100_000);
    let left: Vec<&str> = ns
        .lines()
        .filter(|l| l.starts_with("eb") && l.contains(&tag))
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
}
