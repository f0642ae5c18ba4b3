//! Operator docs that must follow the code: docs/operations.md's metrics
//! reference against the metric names `evio-node run` and the agent export.
// A test that unwraps fails loudly, which is what a test should do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use common::workspace_root;

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
