//! Operator docs that must follow the code: docs/operations.md's metrics
//! reference against the metric names `evio-node run` and the agent export,
//! and the README's bootstrap and operations.md's backup recipe, run as
//! written by scripts/bootstrap-demo.sh in a 3-node NAT lab.
// A test that unwraps fails loudly, which is what a test should do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{require_bin, run_bounded, workspace_root};

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

/// The README's "Bootstrapping a cluster over the host overlay" and
/// docs/operations.md's "Backing up the store", every block run as written
/// on three nodes of a NAT lab (public node with etcd and coturn, two home
/// nodes behind a port-restricted cone and a symmetric NAT), then pods and
/// pings across them, a snapshot, a wiped etcd, the restore. The script
/// checks every step itself; here its verdict and its key lines. ~20 s
/// alone on the 2-core machine.
#[test]
fn bootstrap_demo_runs_the_readme_and_the_backup_recipe() {
    let evio = require_bin("evio", "evio-plugin");
    let node = require_bin("evio-node", "evio-node");
    assert_eq!(evio.parent(), node.parent());
    let dir = evio.parent().unwrap();
    let started = Instant::now();
    let run = run_bounded(
        Command::new("bash")
            .arg(workspace_root().join("scripts/bootstrap-demo.sh"))
            .env("EVIO_BIN_DIR", dir),
        None,
        // The script stops itself (and tears down) after 200 s.
        Duration::from_secs(240),
    );
    let out = format!("{}{}", run.stdout, run.stderr);
    assert!(run.ok(), "scripts/bootstrap-demo.sh failed:\n{out}");
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
