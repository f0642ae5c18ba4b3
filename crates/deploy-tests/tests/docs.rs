//! Operator docs that must follow the code: docs/operations.md's metrics
//! reference against the metric names `evio-node run` and the agent export,
//! and the README's bootstrap and operations.md's backup recipe, run as
//! written by scripts/bootstrap-demo.sh in a 3-node NAT lab.
// A test that unwraps fails loudly, which is what a test should do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{require_bin, workspace_root};

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let p = e.unwrap().path();
        if p.is_dir() {
            rs_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// Every identifier-like word starting with `evio_` in `text`.
fn evio_words(text: &str) -> BTreeSet<String> {
    let b = text.as_bytes();
    let mut out = BTreeSet::new();
    let mut i = 0;
    while let Some(off) = text[i..].find("evio_") {
        let start = i + off;
        let mut end = start + "evio_".len();
        while end < b.len() && is_ident(b[end]) {
            end += 1;
        }
        if start == 0 || !is_ident(b[start - 1]) {
            out.insert(text[start..end].to_string());
        }
        i = end;
    }
    out
}

/// Metric names in the sources of the two programs that serve /metrics:
/// every `evio_*` word that is not one of the workspace's crate names
/// (`evio_overlay::…` in a `use` line). Any new metric is a string literal
/// in these sources, so it shows up here.
fn exported_metrics() -> BTreeSet<String> {
    let root = workspace_root();
    let crates: BTreeSet<String> = std::fs::read_dir(root.join("crates"))
        .unwrap()
        .map(|e| {
            format!(
                "evio_{}",
                e.unwrap().file_name().to_string_lossy().replace('-', "_")
            )
        })
        .collect();
    let mut files = Vec::new();
    for dir in ["crates/node/src", "crates/agent/src"] {
        rs_files(&root.join(dir), &mut files);
    }
    let mut names = BTreeSet::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        names.extend(
            evio_words(&text)
                .into_iter()
                .filter(|w| !crates.contains(w)),
        );
    }
    names
}

/// The names in the first column of docs/operations.md's metrics table.
fn documented_metrics() -> BTreeSet<String> {
    let doc = std::fs::read_to_string(workspace_root().join("docs/operations.md")).unwrap();
    let section = doc
        .split("\n## Metrics reference")
        .nth(1)
        .expect("docs/operations.md has a \"Metrics reference\" section");
    let section = section.split("\n## ").next().unwrap_or(section);
    section
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split_once('`'))
        .map(|(name, _)| name.to_string())
        .collect()
}

#[test]
fn metrics_reference_lists_exactly_the_exported_metrics() {
    let code = exported_metrics();
    let doc = documented_metrics();
    // Guards the scanner itself: a metric of each program must be found.
    for known in ["evio_node_reconciles_total", "evio_peer_up"] {
        assert!(code.contains(known), "scanner missed {known}: {code:?}");
    }
    let missing: Vec<_> = code.difference(&doc).collect();
    let stale: Vec<_> = doc.difference(&code).collect();
    assert!(
        missing.is_empty(),
        "metrics exported but not in docs/operations.md's reference: {missing:?}"
    );
    assert!(
        stale.is_empty(),
        "docs/operations.md lists metrics the code no longer exports: {stale:?}"
    );
}

#[test]
fn scanner_finds_words_and_skips_longer_identifiers() {
    let w = evio_words("use evio_overlay::x; \"# TYPE evio_peer_up gauge\" my_evio_thing evio_a{");
    let want: BTreeSet<String> = ["evio_overlay", "evio_peer_up", "evio_a"]
        .map(String::from)
        .into();
    assert_eq!(w, want);
}

#[test]
fn readme_links_the_operations_guide() {
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).unwrap();
    assert!(readme.contains("docs/operations.md"));
}

/// What `scripts/bootstrap-demo.sh` (PID `pid`) may leave when it is
/// killed before its own teardown: the network namespaces named
/// `bsd{pid}-*` and the processes in them. Dropped, it kills those
/// processes and deletes those namespaces, and nothing else.
struct LabGuard {
    pid: u32,
}

impl LabGuard {
    fn namespaces(&self) -> Vec<String> {
        let prefix = format!("bsd{}-", self.pid);
        let out = Command::new("ip").args(["netns", "list"]).output();
        let text = out
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        text.lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| n.starts_with(&prefix))
            .map(String::from)
            .collect()
    }

    fn clean(&self) -> Vec<String> {
        let left = self.namespaces();
        for ns in &left {
            for _ in 0..50 {
                let pids = Command::new("ip").args(["netns", "pids", ns]).output();
                let pids = pids
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default();
                let pids: Vec<&str> = pids.split_whitespace().collect();
                if pids.is_empty() {
                    break;
                }
                let _ = Command::new("kill").arg("-KILL").args(&pids).status();
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        left
    }
}

impl Drop for LabGuard {
    fn drop(&mut self) {
        self.clean();
    }
}

/// Runs the script with a deadline: SIGTERM first, so its teardown runs,
/// then SIGKILL after `grace`; the guard removes what a SIGKILL left.
fn run_demo(cmd: &mut Command, limit: Duration, grace: Duration) -> (Option<i32>, String, bool) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let guard = LabGuard { pid: child.id() };
    let mut out_pipe = child.stdout.take().expect("piped stdout");
    let mut err_pipe = child.stderr.take().expect("piped stderr");
    let out_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out_pipe.read_to_end(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err_pipe.read_to_end(&mut s);
        s
    });
    let start = Instant::now();
    let mut termed = false;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break Some(s);
        }
        let t = start.elapsed();
        if t >= limit + grace {
            let _ = child.kill();
            break child.wait().ok();
        }
        if t >= limit && !termed {
            termed = true;
            // Not yet reaped: the PID is still the child's.
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // Before reading to the end: a leftover holding the pipes would block.
    let left = guard.clean();
    let out = String::from_utf8_lossy(&out_t.join().unwrap_or_default()).into_owned();
    let err = String::from_utf8_lossy(&err_t.join().unwrap_or_default()).into_owned();
    assert!(
        left.is_empty(),
        "the script left namespaces {left:?} behind (removed now):\n{out}{err}"
    );
    (status.and_then(|s| s.code()), format!("{out}{err}"), termed)
}

/// The README's "Bootstrapping a cluster over the host overlay" and
/// docs/operations.md's "Backing up the store", every block run as written
/// on three nodes of a NAT lab (public node with etcd and coturn, two home
/// nodes behind a port-restricted cone and a symmetric NAT), then pods and
/// pings across them, a snapshot, a wiped etcd, the restore. The script
/// checks every step itself; here its verdict and its key lines. ~30 s
/// alone on the 2-core machine.
#[test]
fn bootstrap_demo_runs_the_readme_and_the_backup_recipe() {
    let evio = require_bin("evio", "evio-plugin");
    let node = require_bin("evio-node", "evio-node");
    assert_eq!(evio.parent(), node.parent());
    let dir = evio.parent().unwrap();
    let started = Instant::now();
    // The script stops itself (and tears down) after 200 s; a SIGTERM at
    // 240 s does the same, a SIGKILL 60 s later ends it regardless.
    let (code, out, termed) = run_demo(
        Command::new("bash")
            .arg(workspace_root().join("scripts/bootstrap-demo.sh"))
            .env("EVIO_BIN_DIR", dir),
        Duration::from_secs(240),
        Duration::from_secs(60),
    );
    assert!(
        code == Some(0) && !termed,
        "scripts/bootstrap-demo.sh failed ({code:?}, stopped by the test: {termed}):\n{out}"
    );
    for want in [
        "kubeadm init --apiserver-advertise-address=10.10.0.1",
        "kubeadm join 10.10.0.1:6443",
        "pods: pod on home-a -> pod on home-b",
        "store down: pod on home-b -> pod on cloud",
        "3 of 3 nodes live in the restored store",
        "after restore: pod on home-b -> pod on home-a",
        "bootstrap-demo: PASSED",
    ] {
        assert!(
            out.contains(want),
            "no {want:?} in the script's output:\n{out}"
        );
    }
    eprintln!("bootstrap-demo: {:?}", started.elapsed());
}
