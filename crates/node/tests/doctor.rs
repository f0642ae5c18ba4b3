//! `evio-node doctor` as an operator runs it (`kubectl exec` into the
//! DaemonSet's container): the conflist-precedence finding and `--config`,
//! in a node netns the test creates (the doctor reads links and nftables of
//! the namespace it runs in).
// A test that unwraps fails loudly, which is what a test should do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Output;

use evio_testkit::netns::Netns;

const BIN: &str = env!("CARGO_BIN_EXE_evio-node");

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn doctor(ns: &Netns, args: &[&str]) -> Output {
    let mut argv = vec![BIN, "doctor"];
    argv.extend_from_slice(args);
    ns.command(&argv)
        .env_remove("NODE_NAME")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn doctor_reports_a_shadowing_config_and_takes_config() {
    let ns = Netns::new("evdoc");
    let tmp = tempfile::tempdir().unwrap();
    let net = format!("doc-{}", ns.name());
    let store = format!("file://{}/subnets.json", tmp.path().display());
    let ipam = tmp.path().join("ipam");
    let conf = tmp.path().join("net-conf.json");
    std::fs::write(
        &conf,
        serde_json::json!({
            "name": net, "podCIDR": "10.244.0.0/16", "nodeBits": 8,
            "bridge": "evdoc0", "bridgeType": "linux", "dataStore": store
        })
        .to_string(),
    )
    .unwrap();
    let net_d = tmp.path().join("net.d");
    let out = std::process::Command::new(BIN)
        .args(["config-gen", "--config", s(&conf), "--node-name", "node-d"])
        .args(["--cni-conf-dir", s(&net_d), "--ipam-data-dir", s(&ipam)])
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));

    let out = doctor(&ns, &["--conf-dir", s(&net_d)]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );

    // The runtime's own default sorts before 10-evio.conflist.
    let shadow = net_d.join("10-containerd-net.conflist");
    std::fs::write(
        &shadow,
        r#"{"cniVersion":"1.0.0","name":"containerd-net","plugins":[{"type":"bridge"}]}"#,
    )
    .unwrap();
    let out = doctor(&ns, &["--conf-dir", s(&net_d)]);
    let stdout = text(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    let line = stdout
        .lines()
        .find(|l| l.contains("conflist-shadowed"))
        .unwrap_or_else(|| panic!("no finding: {stdout}"));
    assert!(
        line.contains(s(&shadow)) && line.contains("10-evio.conflist"),
        "{line}"
    );
    let out = doctor(&ns, &["--conf-dir", s(&net_d), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["networks"][0]["problems"][0]["kind"], "conflist-shadowed");

    // --config with the conflist itself: that file is examined, wherever
    // it is, and the directory's other files are not the question.
    let alone = tmp.path().join("alone");
    std::fs::create_dir(&alone).unwrap();
    std::fs::copy(net_d.join("10-evio.conflist"), alone.join("x.conflist")).unwrap();
    let out = doctor(&ns, &["--config", s(&alone.join("x.conflist"))]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(text(&out.stdout).contains(&net), "{}", text(&out.stdout));

    // --config with the net-conf.json: its dataStore is checked for the
    // node, without --store.
    std::fs::remove_file(&shadow).unwrap();
    let out = doctor(
        &ns,
        &[
            "--config",
            s(&conf),
            "--conf-dir",
            s(&net_d),
            "--node-name",
            "node-d",
        ],
    );
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let out = doctor(
        &ns,
        &[
            "--config",
            s(&conf),
            "--conf-dir",
            s(&net_d),
            "--node-name",
            "node-x",
        ],
    );
    assert!(
        !out.status.success() && text(&out.stdout).contains("store-no-record"),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );

    // A CNI config without an evio plugin is refused in one line.
    let out = doctor(&ns, &["--config", s(&shadow.with_extension("x"))]);
    assert!(!out.status.success());
    std::fs::write(
        &shadow,
        r#"{"cniVersion":"1.0.0","name":"c","plugins":[{"type":"bridge"}]}"#,
    )
    .unwrap();
    let out = doctor(&ns, &["--config", s(&shadow)]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("no evio plugin"), "{stderr}");
}
