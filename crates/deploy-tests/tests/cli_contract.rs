//! The DaemonSet against the real `evio-node` binary: every flag the
//! manifests pass must exist, and the shipped ConfigMap and the init
//! containers' commands must do their job when pointed at temporary
//! directories. Needs the workspace's built `evio-node` (see `require_bin`).
//! Nothing here touches the machine's /etc/cni, /opt/cni or /var/lib/evio:
//! every path argument is remapped into a temp dir, and an unmapped one
//! fails the test before anything runs.
// Test support: a harness that unwraps fails the test that called it, loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use k8s_openapi::api::core::v1::Container;
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(30);

fn evio_node() -> PathBuf {
    require_bin("evio-node", "evio-node")
}

fn show(r: &Run) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        r.status, r.stdout, r.stderr
    )
}

/// The container's args with `$(NODE_NAME)` expanded and the values of the
/// flags in `remap` replaced. Panics if any other argument is an absolute
/// path: it would make the binary touch the machine's own directories.
fn remapped(c: &Container, node: &str, remap: &[(&str, &Path)]) -> Vec<String> {
    let a = args(c);
    let mut out = Vec::new();
    let mut i = 0;
    while i < a.len() {
        let arg = a[i].replace("$(NODE_NAME)", node);
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        if let Some((_, to)) = remap.iter().find(|(f, _)| *f == name) {
            out.push(name.clone());
            out.push(to.display().to_string());
            i += if inline.is_some() { 1 } else { 2 };
            continue;
        }
        assert!(
            !arg.starts_with('/') && !inline.as_deref().unwrap_or("").starts_with('/'),
            "{}: argument {arg} is a host path this test does not remap",
            c.name
        );
        out.push(arg);
        i += 1;
    }
    out
}

/// `evio-node SUB ARGS...` as a container command or an exec probe: the
/// subcommand exists and lists every flag.
fn check_command(bin: &Path, top: &str, what: &str, sub: &str, argv: &[String]) {
    assert!(
        top.lines()
            .any(|l| l.split_whitespace().next() == Some(sub)),
        "evio-node has no `{sub}` subcommand (needed by {what}):\n{top}"
    );
    let help = run_bounded(Command::new(bin).args([sub, "--help"]), None, LIMIT);
    assert!(help.ok(), "evio-node {sub} --help:\n{}", show(&help));
    for a in argv.iter().filter(|a| a.starts_with("--")) {
        let flag = a.split('=').next().unwrap_or(a);
        let listed = help
            .stdout
            .split_whitespace()
            .any(|w| w.trim_end_matches(',') == flag || w.starts_with(&format!("{flag}=")));
        assert!(
            listed,
            "`evio-node {sub}` has no {flag} ({what}):\n{}",
            help.stdout
        );
    }
}

#[test]
fn built_evio_node_accepts_every_flag_the_daemonsets_pass() {
    let bin = evio_node();
    let docs = load_manifests();
    let top = run_bounded(Command::new(&bin).arg("--help"), None, LIMIT);
    assert!(top.ok(), "evio-node --help:\n{}", show(&top));
    for c in every_container(&docs) {
        let what = format!("container {}", c.name);
        check_command(&bin, &top.stdout, &what, &subcommand(&c), &args(&c));
        // Exec probes run evio-node too.
        for (kind, p) in [
            ("startupProbe", &c.startup_probe),
            ("livenessProbe", &c.liveness_probe),
            ("readinessProbe", &c.readiness_probe),
        ] {
            let Some(cmd) = p
                .as_ref()
                .and_then(|p| p.exec.as_ref())
                .and_then(|e| e.command.clone())
            else {
                continue;
            };
            assert!(
                cmd.len() >= 2 && cmd[0].ends_with("/evio-node"),
                "{what} {kind}: {cmd:?}"
            );
            check_command(
                &bin,
                &top.stdout,
                &format!("{what} {kind}"),
                &cmd[1],
                &cmd[2..],
            );
        }
    }
}

/// `evio-node run` looks for the agent where the agent DaemonSet puts its
/// socket (the main DaemonSet names no --agent-socket).
#[test]
fn run_looks_for_the_agent_where_the_agent_daemonset_binds() {
    let bin = evio_node();
    let docs = load_manifests();
    let agent = container_by_sub(&pod_spec(&agent_daemonset(&docs)), "agent");
    let sock = flag(&agent, "--control-socket").expect("--control-socket");
    for sub in ["run", "peers", "agent"] {
        let help = run_bounded(Command::new(&bin).args([sub, "--help"]), None, LIMIT);
        assert!(help.ok(), "{}", show(&help));
        assert!(
            help.stdout.contains(&sock),
            "`{sub} --help` does not name {sock}:\n{}",
            help.stdout
        );
    }
}

#[test]
fn shipped_configmap_and_config_gen_args_write_a_conflist_with_built_evio_node() {
    let bin = evio_node();
    let docs = load_manifests();
    let spec = pod_spec(&daemonset(&docs));
    let c = container_by_sub(&spec, "config-gen");
    let tmp = tempfile::tempdir().expect("tempdir");
    let conf_text = docs
        .iter()
        .find_map(|d| match &d.object {
            Object::ConfigMap(cm) => cm.data.as_ref()?.get("net-conf.json").cloned(),
            _ => None,
        })
        .expect("ConfigMap net-conf.json");
    // The shipped store is etcd, its TLS files the evio-etcd Secret's:
    // the test replaces the store by a file of its own (below), so the
    // Secret's files, absent here, are dropped with it.
    let mut conf_json: Value = serde_json::from_str(&conf_text).expect("net-conf.json is JSON");
    for key in ["etcdCACert", "etcdCert", "etcdKey"] {
        assert!(
            conf_json.get(key).is_some(),
            "the shipped config names {key}"
        );
        conf_json.as_object_mut().expect("object").remove(key);
    }
    let conf = tmp.path().join("net-conf.json");
    std::fs::write(&conf, conf_json.to_string()).expect("write net-conf.json");
    let net_d = tmp.path().join("net.d");
    let mut argv = vec![subcommand(&c)];
    argv.extend(remapped(
        &c,
        "node-a",
        &[("--config", &conf), ("--cni-conf-dir", &net_d)],
    ));
    // The shipped dataStore is an etcd to edit: redirect it.
    let store = format!("file://{}/subnets.json", tmp.path().display());
    argv.extend(["--store".to_string(), store]);
    let r = run_bounded(
        Command::new(&bin)
            .args(&argv)
            .env("NODE_NAME", "node-a")
            .env_remove("KUBERNETES_SERVICE_HOST"),
        None,
        LIMIT,
    );
    assert!(r.ok(), "evio-node {argv:?}:\n{}", show(&r));
    let text = std::fs::read_to_string(net_d.join("10-evio.conflist")).expect("conflist written");
    let list: Value = serde_json::from_str(&text).expect("conflist is JSON");
    let plugin = &list["plugins"][0];
    assert_eq!(plugin["type"], "evio", "{list}");
    assert_eq!(plugin["bridge"], "evio0", "{list}");
    assert_eq!(plugin["isDefaultGateway"], true, "{list}");
    assert_eq!(
        plugin["ipam"]["ranges"][0][0]["subnet"], "10.244.0.0/16",
        "{list}"
    );
    // The shipped ConfigMap configures the overlay: the pods' MTU fits the
    // tunnel on a 1500-byte underlay.
    assert_eq!(plugin["mtu"], 1380, "{list}");
    let mode = std::fs::metadata(net_d.join("10-evio.conflist"))
        .expect("stat")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o644);
}

#[test]
fn install_cni_args_copy_the_plugin_atomically_with_built_evio_node() {
    let bin = evio_node();
    let docs = load_manifests();
    let spec = pod_spec(&daemonset(&docs));
    let c = container_by_sub(&spec, "install-cni");
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("src");
    let dest = tmp.path().join("dest");
    std::fs::create_dir_all(&src).expect("mkdir src");
    std::fs::create_dir_all(&dest).expect("mkdir dest");
    let payload = b"\x7fELF not really, but install-cni only copies";
    std::fs::write(src.join("evio"), payload).expect("write plugin");
    std::fs::set_permissions(src.join("evio"), std::fs::Permissions::from_mode(0o600))
        .expect("chmod");
    // An older plugin is replaced, and a stranger's plugin is left alone.
    std::fs::write(dest.join("evio"), b"old").expect("write old");
    std::fs::write(dest.join("host-local"), b"other").expect("write other");

    let mut argv = vec![subcommand(&c)];
    argv.extend(remapped(
        &c,
        "node-a",
        &[("--src", &src), ("--dest", &dest)],
    ));
    let r = run_bounded(Command::new(&bin).args(&argv), None, LIMIT);
    assert!(r.ok(), "evio-node {argv:?}:\n{}", show(&r));

    let got = std::fs::read(dest.join("evio")).expect("plugin installed");
    assert_eq!(got, payload);
    let mode = std::fs::metadata(dest.join("evio"))
        .expect("stat")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755, "installed mode {:o}", mode & 0o777);
    assert_eq!(
        std::fs::read(dest.join("host-local")).expect("other"),
        b"other"
    );
    let mut names: Vec<String> = std::fs::read_dir(&dest)
        .expect("read dest")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["evio", "host-local"], "no temp files left behind");
}

/// The etcd example's keys are ones config-gen reads: it fails on the
/// missing CA file it was told about (proving the key was honoured), within
/// its timeout, and writes nothing.
#[test]
fn etcd_example_keys_are_honoured_by_built_evio_node() {
    let bin = evio_node();
    let tmp = tempfile::tempdir().expect("tempdir");
    let example = deploy_dir().join("examples/net-conf-etcd.json");
    let conf: Value =
        serde_json::from_str(&std::fs::read_to_string(&example).expect("read")).expect("JSON");
    let ca = conf["etcdCACert"].as_str().expect("etcdCACert");
    assert!(
        !Path::new(ca).exists(),
        "{ca} exists on this machine; the test relies on it missing"
    );
    let net_d = tmp.path().join("net.d");
    let r = run_bounded(
        Command::new(&bin)
            .arg("config-gen")
            .arg("--config")
            .arg(&example)
            .args(["--node-name", "node-a", "--timeout", "5"])
            .arg("--cni-conf-dir")
            .arg(&net_d),
        None,
        LIMIT,
    );
    assert!(!r.ok(), "{}", show(&r));
    assert!(r.stderr.contains(ca), "{}", show(&r));
    assert_eq!(r.stderr.trim().lines().count(), 1, "one line: {}", show(&r));
    assert!(!net_d.join("10-evio.conflist").exists());
}
