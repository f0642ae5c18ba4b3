//! The `evio-sim` binary as a user runs it: the printed table and matrix,
//! exit codes, and teardown on SIGTERM of a kept cluster.
// A test that unwraps fails loudly, which is what a test should do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use evio_testkit::plugin::run_bounded;
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

const SIM: &str = env!("CARGO_BIN_EXE_evio-sim");

fn sim(args: &[&str]) -> Command {
    let (evio, node) = common::bins();
    let mut c = Command::new(SIM);
    c.arg("up")
        .args(args)
        .arg("--evio")
        .arg(evio)
        .arg("--evio-node")
        .arg(node);
    c
}

#[test]
fn up_prints_the_cluster_and_a_full_matrix_then_tears_down() {
    let out = run_bounded(
        sim(&["--nodes", "2", "--pods", "1"]),
        b"",
        Duration::from_secs(120),
    );
    assert!(out.success(), "{out}");
    for want in [
        "NODE",
        "SUBNET",
        "GATEWAY",
        "node-0",
        "node-1",
        "n0p0",
        "n1p0",
        "4/4 pairs fully reachable",
        // The Services row: kube-proxy's rules, a ClusterIP per node backed
        // by the other node's pod, dnsmasq behind a ClusterIP.
        "kube-proxy iptables mode rules in every node netns",
        "2/2 pods reach a ClusterIP on another node, cluster DNS answered 4/4",
    ] {
        assert!(out.stdout.contains(want), "no {want:?} in:\n{}", out.stdout);
    }
    let failed_cells = out
        .stdout
        .lines()
        .filter(|l| l.starts_with('n') && l.contains('✗'))
        .count();
    assert_eq!(failed_cells, 0, "{}", out.stdout);
    assert!(out.stderr.contains("torn down"), "{}", out.stderr);
}

#[test]
fn a_failing_set_up_exits_non_zero_with_one_clear_error() {
    // A /30 pod CIDR leaves no host bits for 8 node bits: config-gen refuses.
    let out = run_bounded(
        sim(&["--nodes", "1", "--pods", "1", "--pod-cidr", "10.244.0.0/30"]),
        b"",
        Duration::from_secs(60),
    );
    assert_eq!(out.code, 2, "{out}");
    assert!(out.stderr.contains("config-gen"), "{out}");
}

/// Stops a kept `evio-sim` whatever happens to the test.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = kill(Pid::from_raw(self.0.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.0.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[test]
fn sigterm_tears_down_a_kept_cluster() {
    kept_cluster_stops_on(Signal::SIGTERM, false);
}

/// A terminal's Ctrl-C: SIGINT to the whole foreground process group, so the
/// OVS daemons (children of evio-sim) get it too. The pods must still be
/// DELeted through the plugin (exit 0 means every DEL succeeded).
#[test]
fn ctrl_c_to_the_process_group_still_dels_every_pod() {
    kept_cluster_stops_on(Signal::SIGINT, true);
}

fn kept_cluster_stops_on(signal: Signal, whole_group: bool) {
    let mut cmd = sim(&["--nodes", "2", "--pods", "1", "--keep"]);
    if whole_group {
        cmd.process_group(0);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawn evio-sim: {e}"));
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let mut running = Running(child);

    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        if let Some(s) = stdout {
            for line in BufReader::new(s).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        }
    });
    let (etx, erx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(s) = stderr {
            for line in BufReader::new(s).lines().map_while(Result::ok) {
                text.push_str(&line);
                text.push('\n');
            }
        }
        let _ = etx.send(text);
    });

    // The hints are printed once the cluster is up and probed; the last
    // one is the last pod's.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut lines = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no hints within 120 s:\n{}", lines.join("\n")));
        let last = line.contains("nsenter --net=") && line.trim_start().starts_with("n1p0");
        lines.push(line);
        if last {
            break;
        }
    }
    let text = lines.join("\n");
    assert!(text.contains("stays up until Ctrl-C"), "{text}");
    let netns: Vec<String> = text
        .split("nsenter --net=/run/netns/")
        .skip(1)
        .filter_map(|s| s.split_whitespace().next())
        .map(str::to_string)
        .collect();
    let paths: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| {
            l.split_whitespace().find_map(|w| {
                w.strip_prefix("--db=unix:")
                    .or_else(|| w.starts_with('/').then_some(w))
            })
        })
        .map(|p| {
            PathBuf::from(p)
                .parent()
                .map(PathBuf::from)
                .unwrap_or_default()
        })
        .collect();
    // The default lab puts both nodes behind one NAT router.
    assert_eq!(
        netns.len(),
        6,
        "internet, the site's router, 2 nodes, 2 pods: {text}"
    );
    assert_eq!(paths.len(), 4, "2 OVS dirs, 2 conf dirs: {text}");
    for ns in &netns {
        assert!(PathBuf::from("/run/netns").join(ns).exists(), "{ns}");
    }

    // Still up a while later: --keep really keeps.
    std::thread::sleep(Duration::from_millis(500));
    assert!(matches!(running.0.try_wait(), Ok(None)), "exited early");

    let pid = Pid::from_raw(running.0.id() as i32);
    if whole_group {
        killpg(pid, signal).unwrap_or_else(|e| panic!("killpg: {e}"));
    } else {
        kill(pid, signal).unwrap_or_else(|e| panic!("kill: {e}"));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Ok(Some(st)) = running.0.try_wait() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "no exit within 60 s of {signal:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let err = erx
        .recv_timeout(Duration::from_secs(10))
        .unwrap_or_default();
    assert!(status.success(), "{status:?}\n{err}");
    assert!(err.contains("tearing"), "{err}");
    for ns in &netns {
        assert!(
            !PathBuf::from("/run/netns").join(ns).exists(),
            "netns {ns} left"
        );
    }
    for p in &paths {
        assert!(!p.exists(), "{} left", p.display());
    }
}
