//! `evio-node config-gen` and `subnets` as the init container runs them:
//! the built binary against real etcd instances and the file store.
// A test that unwraps fails loudly, which is what a test should do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use evio_subnet::{EtcdOptions, EtcdStore, Liveness, OverlayStore, PeerRecord};
use evio_testkit::etcd::{Etcd, EtcdCluster};
use evio_testkit::netns::unique_name;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_evio-node");

fn cmd<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args)
        .env_remove("NODE_NAME")
        // Run outside a cluster unless a test says otherwise: in a pod the
        // file store is refused.
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn run<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    cmd(args).output().unwrap()
}

fn spawn<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Child {
    cmd(args).spawn().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// One test's scratch: a net-conf.json and per-node conf dirs.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Scratch {
        Scratch {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
    fn s(&self, rel: &str) -> String {
        self.path(rel).to_string_lossy().into_owned()
    }
    fn write(&self, rel: &str, content: &str) -> String {
        let p = self.path(rel);
        std::fs::write(&p, content).unwrap();
        p.to_string_lossy().into_owned()
    }
    fn file_store(&self) -> String {
        format!("file://{}", self.s("store/subnets.json"))
    }
}

/// The `key=value` fields of config-gen's success line.
fn fields(out: &Output) -> std::collections::BTreeMap<String, String> {
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "config-gen failed: {}{stdout}",
        text(&out.stderr)
    );
    assert_eq!(stdout.lines().count(), 1, "one line on stdout: {stdout:?}");
    stdout
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn conflist(dir: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join("10-evio.conflist")).unwrap()).unwrap()
}

/// A failure as the contract wants it: non-zero, exactly one stderr line
/// mentioning `needle`, nothing on stdout, no conf file.
fn assert_clean_failure(out: &Output, conf_dir: &Path, needle: &str) {
    let stderr = text(&out.stderr);
    assert!(
        !out.status.success(),
        "unexpected success: {}",
        text(&out.stdout)
    );
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "one stderr line: {stderr:?}"
    );
    assert!(
        stderr.to_lowercase().contains(&needle.to_lowercase()),
        "{needle:?} not in {stderr:?}"
    );
    assert!(
        text(&out.stdout).is_empty(),
        "stdout: {}",
        text(&out.stdout)
    );
    assert!(
        !conf_dir.join("10-evio.conflist").exists(),
        "conf file written on failure"
    );
}

fn gen_args(conf: &str, node: &str, store: &str, dir: &str) -> Vec<String> {
    [
        "config-gen",
        "--config",
        conf,
        "--node-name",
        node,
        "--store",
        store,
        "--cni-conf-dir",
        dir,
    ]
    .map(String::from)
    .to_vec()
}

fn net_conf(name: &str, cidr: &str, bits: &str) -> String {
    format!(r#"{{"name":"{name}","podCIDR":"{cidr}","nodeBits":{bits}}}"#)
}

#[test]
fn version_flag() {
    let out = run(&["--version"]);
    assert!(out.status.success());
    assert_eq!(
        text(&out.stdout).trim(),
        format!("evio-node {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn thirty_two_concurrent_nodes_get_distinct_subnets() {
    let e = Etcd::shared();
    let sc = Scratch::new();
    let net = unique_name("c");
    let conf = sc.write("net-conf.json", &net_conf(&net, "10.244.0.0/16", "\"8\""));
    let store = e.store_url();
    let dirs: Vec<String> = (0..32).map(|i| sc.s(&format!("n{i}"))).collect();
    let children: Vec<Child> = (0..32)
        .map(|i| {
            let node = format!("node-{i}");
            spawn(&gen_args(&conf, &node, &store, &dirs[i]))
        })
        .collect();
    let outs: Vec<Output> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let mut subnets = BTreeSet::new();
    for (i, out) in outs.iter().enumerate() {
        let f = fields(out);
        assert_eq!(f["node"], format!("node-{i}"));
        assert_eq!(f["allocation"], "new");
        subnets.insert(f["subnet"].clone());
        // The file agrees with the line.
        let v = conflist(Path::new(&dirs[i]));
        let r = &v["plugins"][0]["ipam"]["ranges"][0][0];
        assert_eq!(r["subnet"], "10.244.0.0/16");
        assert_eq!(r["gateway"].as_str().unwrap(), f["gateway"]);
        let (start, end) = f["range"].split_once('-').unwrap();
        assert_eq!(r["rangeStart"].as_str().unwrap(), start);
        assert_eq!(r["rangeEnd"].as_str().unwrap(), end);
    }
    assert_eq!(subnets.len(), 32);

    let list = run(&["subnets", "list", "--store", &store, "--network", &net]);
    assert!(list.status.success(), "{}", text(&list.stderr));
    let rows: Vec<String> = text(&list.stdout)
        .lines()
        .skip(1)
        .map(str::to_string)
        .collect();
    assert_eq!(rows.len(), 32);
    for r in &rows {
        let cols: Vec<&str> = r.split_whitespace().collect();
        assert_eq!(cols.len(), 3, "{r}");
        assert!(subnets.contains(cols[0]), "{r}");
        assert!(cols[1].starts_with("node-"));
        assert!(cols[2].ends_with('Z'));
    }
}

#[test]
fn filling_the_space_then_one_more_fails_cleanly() {
    let e = Etcd::shared();
    let sc = Scratch::new();
    let net = unique_name("f");
    let conf = sc.write("net-conf.json", &net_conf(&net, "10.77.0.0/16", "4"));
    let store = e.store_url();
    // All 16 at once: the last ones compete for the last free slots.
    let dirs: Vec<String> = (0..16).map(|i| sc.s(&format!("n{i}"))).collect();
    let children: Vec<Child> = (0..16)
        .map(|i| spawn(&gen_args(&conf, &format!("n{i}"), &store, &dirs[i])))
        .collect();
    let mut subnets = BTreeSet::new();
    for c in children {
        subnets.insert(fields(&c.wait_with_output().unwrap())["subnet"].clone());
    }
    let expected: BTreeSet<String> = (0..16).map(|i| format!("10.77.{}.0/20", i * 16)).collect();
    assert_eq!(subnets, expected, "every slot, first and last included");

    let extra = sc.s("extra");
    let out = run(&gen_args(&conf, "n16", &store, &extra));
    assert_clean_failure(&out, Path::new(&extra), "no free subnet");
    assert!(!Path::new(&extra).exists());
    assert_eq!(e.get_prefix(&format!("/evio/{net}/nodes/")).len(), 16);
}

#[test]
fn restart_returns_the_same_subnet_and_store_wins_over_the_file() {
    let e = Etcd::shared();
    let sc = Scratch::new();
    let net = unique_name("r");
    let conf = sc.write("net-conf.json", &net_conf(&net, "10.10.0.0/16", "8"));
    let store = e.store_url();
    let dir = sc.s("net.d");
    let first = fields(&run(&gen_args(&conf, "node-r", &store, &dir)));
    let original = std::fs::read(sc.path("net.d/10-evio.conflist")).unwrap();

    // Plain restart.
    let again = fields(&run(&gen_args(&conf, "node-r", &store, &dir)));
    assert_eq!(again["subnet"], first["subnet"]);
    assert_eq!(again["allocation"], "existing");

    // Conf file deleted (a reinstalled node with the same name).
    std::fs::remove_file(sc.path("net.d/10-evio.conflist")).unwrap();
    let again = fields(&run(&gen_args(&conf, "node-r", &store, &dir)));
    assert_eq!(again["subnet"], first["subnet"]);
    assert_eq!(
        std::fs::read(sc.path("net.d/10-evio.conflist")).unwrap(),
        original
    );

    // A conf file that disagrees with the store is rewritten.
    std::fs::write(
        sc.path("net.d/10-evio.conflist"),
        String::from_utf8_lossy(&original).replace(&first["gateway"], "10.10.99.1"),
    )
    .unwrap();
    fields(&run(&gen_args(&conf, "node-r", &store, &dir)));
    assert_eq!(
        std::fs::read(sc.path("net.d/10-evio.conflist")).unwrap(),
        original
    );
}

#[test]
fn release_frees_the_subnet() {
    let e = Etcd::shared();
    let sc = Scratch::new();
    let net = unique_name("l");
    let conf = sc.write("net-conf.json", &net_conf(&net, "172.20.0.0/23", "1"));
    let store = e.store_url();
    let a = fields(&run(&gen_args(&conf, "a", &store, &sc.s("a"))));
    fields(&run(&gen_args(&conf, "b", &store, &sc.s("b"))));
    assert_clean_failure(
        &run(&gen_args(&conf, "c", &store, &sc.s("c"))),
        &sc.path("c"),
        "no free subnet",
    );

    let rel = run(&[
        "subnets", "release", "--store", &store, "--config", &conf, "--node", "a",
    ]);
    assert!(rel.status.success(), "{}", text(&rel.stderr));
    assert!(text(&rel.stdout).contains(&a["subnet"]));
    assert!(e.get_prefix(&format!("/evio/{net}/nodes/a")).is_empty());

    let c = fields(&run(&gen_args(&conf, "c", &store, &sc.s("c"))));
    assert_eq!(c["subnet"], a["subnet"]);

    let list = run(&["subnets", "list", "--store", &store, "--network", &net]);
    let t = text(&list.stdout);
    assert!(t.lines().next().unwrap().starts_with("SUBNET"));
    assert!(
        t.contains(" c ") && t.contains(" b ") && !t.contains(" a "),
        "{t}"
    );

    // Releasing an unknown node fails with one line.
    let out = run(&[
        "subnets",
        "release",
        "--store",
        &store,
        "--network",
        &net,
        "--node",
        "zz",
    ]);
    assert!(!out.status.success());
    assert_eq!(text(&out.stderr).trim_end().lines().count(), 1);
    assert!(text(&out.stderr).contains("no subnet"));
}

#[test]
fn unreachable_etcd_fails_within_the_timeout() {
    let sc = Scratch::new();
    let conf = sc.write("net-conf.json", &net_conf("u", "10.244.0.0/16", "8"));
    // Refused: a port with no listener.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let store = format!("etcd://127.0.0.1:{port}");
    let dir = sc.s("refused");
    let t = Instant::now();
    let mut args = gen_args(&conf, "n", &store, &dir);
    args.extend(["--timeout", "2"].map(String::from));
    let out = run(&args);
    let took = t.elapsed();
    assert_clean_failure(&out, Path::new(&dir), "unreachable");
    assert!(
        took >= Duration::from_millis(1500),
        "gave up early: {took:?}"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(!Path::new(&dir).exists());

    // Silent: accepts TCP but never answers (a hung member).
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let store = format!("etcd://{}", silent.local_addr().unwrap());
    let dir = sc.s("silent");
    let t = Instant::now();
    let mut args = gen_args(&conf, "n", &store, &dir);
    args.extend(["--timeout", "2"].map(String::from));
    let out = run(&args);
    let took = t.elapsed();
    assert_clean_failure(&out, Path::new(&dir), "etcd://");
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[test]
fn three_member_cluster_with_one_member_down_still_allocates() {
    let mut c = EtcdCluster::start(3);
    let sc = Scratch::new();
    let conf = sc.write("net-conf.json", &net_conf("cl", "10.30.0.0/16", "8"));
    let store = c.store_url();
    fields(&run(&gen_args(&conf, "before", &store, &sc.s("before"))));
    // The first endpoint in the list is the dead one.
    c.stop_member(0);
    let mut args = gen_args(&conf, "during", &store, &sc.s("during"));
    args.extend(["--timeout", "20"].map(String::from));
    let t = Instant::now();
    let during = fields(&run(&args));
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    assert_eq!(during["allocation"], "new");
    let again = fields(&run(&gen_args(&conf, "before", &store, &sc.s("before"))));
    assert_eq!(again["allocation"], "existing");
    c.start_member(0);
    let rows = c.get_prefix("/evio/cl/nodes/");
    assert_eq!(rows.len(), 2, "{rows:?}");
}

#[test]
fn etcd_with_tls_client_certificates() {
    let e = Etcd::start_tls();
    let t = e.tls().unwrap().clone();
    let sc = Scratch::new();
    let conf = sc.write("net-conf.json", &net_conf("tls", "10.40.0.0/16", "8"));
    let store = e.store_url();
    let (ca, cert, key) = (
        t.ca.to_string_lossy().into_owned(),
        t.client_cert.to_string_lossy().into_owned(),
        t.client_key.to_string_lossy().into_owned(),
    );
    let mut args = gen_args(&conf, "t1", &store, &sc.s("t1"));
    args.extend(["--etcd-ca", &ca, "--etcd-cert", &cert, "--etcd-key", &key].map(String::from));
    let first = fields(&run(&args));

    // The same through the config file's keys.
    let conf2 = sc.write(
        "net-conf2.json",
        &format!(
            r#"{{"name":"tls","podCIDR":"10.40.0.0/16","nodeBits":8,"dataStore":"{store}",
                "etcdCACert":"{ca}","etcdCert":"{cert}","etcdKey":"{key}"}}"#
        ),
    );
    // Named by the config file, credentials must be in the Secret's mount:
    // refused under the default, read from the directory the flag names.
    let secret_dir = t.ca.parent().unwrap().to_string_lossy().into_owned();
    let mut args: Vec<String> = [
        "config-gen",
        "--config",
        &conf2,
        "--node-name",
        "t1",
        "--cni-conf-dir",
        &sc.s("t1b"),
    ]
    .map(String::from)
    .to_vec();
    assert_clean_failure(&run(&args), &sc.path("t1b"), "etcd-secret-dir");
    args.extend(["--etcd-secret-dir".to_string(), secret_dir]);
    let out = run(&args);
    assert_eq!(fields(&out)["subnet"], first["subnet"]);

    // Without a client certificate the server refuses us: clean failure.
    let mut args = gen_args(&conf, "t2", &store, &sc.s("t2"));
    args.extend(["--etcd-ca", &ca, "--timeout", "2"].map(String::from));
    assert_clean_failure(&run(&args), &sc.path("t2"), "etcd");
    // Plain HTTP to a TLS port: clean failure too.
    let mut args = gen_args(&conf, "t3", &store, &sc.s("t3"));
    args.extend(["--timeout", "2"].map(String::from));
    assert_clean_failure(&run(&args), &sc.path("t3"), "etcd");
    // A certificate without its key is a configuration error.
    let mut args = gen_args(&conf, "t4", &store, &sc.s("t4"));
    args.extend(["--etcd-ca", &ca, "--etcd-cert", &cert].map(String::from));
    assert_clean_failure(&run(&args), &sc.path("t4"), "together");
}

#[test]
fn etcd_with_username_and_password_files() {
    let e = Etcd::start_auth();
    let a = e.auth().unwrap().clone();
    let sc = Scratch::new();
    let conf = sc.write("net-conf.json", &net_conf("auth", "10.41.0.0/16", "8"));
    let store = e.store_url();
    let (uf, pf) = (
        a.username_file.to_string_lossy().into_owned(),
        a.password_file.to_string_lossy().into_owned(),
    );
    // This etcd speaks plain HTTP: the password is refused until the
    // operator says the network may see it.
    let mut args = gen_args(&conf, "u1", &store, &sc.s("u1"));
    args.extend(["--etcd-username-file", &uf, "--etcd-password-file", &pf].map(String::from));
    assert_clean_failure(&run(&args), &sc.path("u1"), "clear text");
    assert!(e.get_prefix("/evio/auth/nodes/").is_empty());
    args.push("--etcd-allow-plaintext-password".into());
    let f = fields(&run(&args));
    assert_eq!(f["allocation"], "new");
    assert_eq!(e.get_prefix("/evio/auth/nodes/").len(), 1);

    let list = run(&[
        "subnets",
        "list",
        "--store",
        &store,
        "--network",
        "auth",
        "--etcd-username-file",
        &uf,
        "--etcd-password-file",
        &pf,
        "--etcd-allow-plaintext-password",
    ]);
    assert!(text(&list.stdout).contains("u1"), "{}", text(&list.stderr));

    // Wrong password: refused at once, not retried until the timeout.
    let bad = sc.write("bad-pw", "nope\n");
    let mut args = gen_args(&conf, "u2", &store, &sc.s("u2"));
    args.extend(
        [
            "--etcd-username-file",
            &uf,
            "--etcd-password-file",
            &bad,
            "--etcd-allow-plaintext-password",
            "--timeout",
            "10",
        ]
        .map(String::from),
    );
    let t = Instant::now();
    assert_clean_failure(&run(&args), &sc.path("u2"), "auth");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // No credentials at all: the anonymous write is refused.
    let mut args = gen_args(&conf, "u3", &store, &sc.s("u3"));
    args.extend(["--timeout", "5"].map(String::from));
    assert_clean_failure(&run(&args), &sc.path("u3"), "etcd");
    // Only one of the two files.
    let mut args = gen_args(&conf, "u4", &store, &sc.s("u4"));
    args.extend(["--etcd-username-file", &uf].map(String::from));
    assert_clean_failure(&run(&args), &sc.path("u4"), "together");
    assert_eq!(e.get_prefix("/evio/auth/nodes/").len(), 1);
}

/// Least privilege: etcd with auth on, the user `evio` holding only the
/// role `evio` (readwrite on the prefix `/evio/`, as docs/operations.md
/// sets it up), logged in by password over TLS and by a client certificate
/// whose CN is the user. With either, everything evio does works: config-gen,
/// `subnets list` and `release`, and the agent's overlay store (host
/// address, peer record on a lease, peer list). Outside the prefix the same
/// login is refused for reading and writing.
#[test]
fn etcd_least_privilege_role_by_password_and_by_certificate() {
    let e = Etcd::start_tls_auth();
    let t = e.tls().unwrap().clone();
    let a = e.auth().unwrap().clone();
    let sc = Scratch::new();
    let store = e.store_url();
    let s = |p: &Path| p.to_string_lossy().into_owned();
    assert!(e.etcdctl(&["put", "/other", "root's"]).status.success());
    // Over TLS the server wants a certificate from every client; this
    // one's CN names no user, so only the password grants anything.
    let by_password = vec![
        "--etcd-ca".to_string(),
        s(&t.ca),
        "--etcd-cert".into(),
        s(&t.client_cert),
        "--etcd-key".into(),
        s(&t.client_key),
        "--etcd-username-file".into(),
        s(&a.username_file),
        "--etcd-password-file".into(),
        s(&a.password_file),
    ];
    let by_cert = vec![
        "--etcd-ca".to_string(),
        s(&t.ca),
        "--etcd-cert".into(),
        s(&t.user_cert),
        "--etcd-key".into(),
        s(&t.user_key),
    ];
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for (variant, cert, creds) in [("pw", false, by_password), ("cert", true, by_cert)] {
        let net = format!("lp{variant}");
        let conf = sc.write(&format!("{net}.json"), &net_conf(&net, "10.42.0.0/16", "8"));
        let mut args = gen_args(&conf, "n1", &store, &sc.s(&net));
        args.extend(creds.iter().cloned());
        assert_eq!(fields(&run(&args))["allocation"], "new", "{variant}");
        let nodes = format!("/evio/{net}/nodes/");
        assert_eq!(e.get_prefix(&nodes).len(), 1, "{variant}");

        let common: Vec<String> = ["--store", &store, "--network", &net]
            .map(String::from)
            .into_iter()
            .chain(creds.iter().cloned())
            .collect();
        let list = run(&[vec!["subnets".to_string(), "list".into()], common.clone()].concat());
        assert!(list.status.success(), "{variant}: {}", text(&list.stderr));
        assert!(text(&list.stdout).contains("n1"), "{variant}");
        let release = run(&[
            vec!["subnets".to_string(), "release".into()],
            common,
            vec!["--node".into(), "n1".into()],
        ]
        .concat());
        assert!(
            release.status.success(),
            "{variant}: {}",
            text(&release.stderr)
        );
        assert!(e.get_prefix(&nodes).is_empty(), "{variant}: not released");

        // The agent's store operations, through the library the agent uses.
        let opts = EtcdOptions {
            ca_file: Some(t.ca.clone()),
            cert_file: Some(if cert { &t.user_cert } else { &t.client_cert }.clone()),
            key_file: Some(if cert { &t.user_key } else { &t.client_key }.clone()),
            username_file: (!cert).then(|| a.username_file.clone()),
            password_file: (!cert).then(|| a.password_file.clone()),
            ..EtcdOptions::default()
        };
        rt.block_on(async {
            let st = EtcdStore::connect(&e.endpoints(), &opts, Duration::from_secs(10))
                .await
                .unwrap();
            let h = st
                .allocate_host(&net, "n1", "10.99.0.0/24".parse().unwrap(), None)
                .await
                .unwrap();
            let rec: PeerRecord = serde_json::from_value(serde_json::json!({
                "node": "n1", "publicKey": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
                "hostAddress": format!("{}/24", h.addr), "podSubnet": "10.42.1.0/24",
                "endpoints": ["192.0.2.1:5800"], "heartbeat": "2026-01-01T00:00:00Z"
            }))
            .unwrap();
            st.publish(&net, &rec, Duration::from_secs(30))
                .await
                .unwrap();
            assert_eq!(st.refresh(&net, "n1", &[]).await.unwrap(), Liveness::Alive);
            let snap = st.peers(&net).await.unwrap();
            assert_eq!(snap.records.len(), 1, "{variant}");
            assert_eq!(snap.records[0].node, "n1");
            assert_eq!(st.release_host(&net, "n1").await.unwrap(), Some(h.addr));
        });
        assert_eq!(e.get_prefix(&format!("/evio/{net}/peers/")).len(), 1);

        // The same login inside the prefix works, so the refusals below
        // are the role's, not a failed login.
        let ok = e.etcdctl_as_user(cert, &["put", "/evio/probe", variant]);
        assert!(ok.status.success(), "{variant}: {}", text(&ok.stderr));
        for op in [
            &["get", "/other"][..],
            &["put", "/other", "x"],
            &["get", "--prefix", "/"],
        ] {
            let out = e.etcdctl_as_user(cert, op);
            assert!(!out.status.success(), "{variant} {op:?} allowed");
            assert!(
                text(&out.stderr).contains("permission denied"),
                "{variant} {op:?}: {}",
                text(&out.stderr)
            );
        }
    }
    assert_eq!(
        e.get_prefix("/other"),
        vec![("/other".into(), "root's".into())]
    );
    // A certificate whose CN is no user, without a password, gets nothing.
    let conf = sc.write("nouser.json", &net_conf("lpnone", "10.42.0.0/16", "8"));
    let mut args = gen_args(&conf, "n2", &store, &sc.s("nouser"));
    args.extend(
        [
            "--etcd-ca",
            &s(&t.ca),
            "--etcd-cert",
            &s(&t.client_cert),
            "--etcd-key",
            &s(&t.client_key),
            "--timeout",
            "3",
        ]
        .map(String::from),
    );
    assert_clean_failure(&run(&args), &sc.path("nouser"), "etcd");
    assert!(e.get_prefix("/evio/lpnone/").is_empty());
}

#[test]
fn file_store_under_concurrent_processes() {
    let sc = Scratch::new();
    let conf = sc.write("net-conf.json", &net_conf("fs", "10.88.0.0/16", "5"));
    let store = sc.file_store();
    let dirs: Vec<String> = (0..33).map(|i| sc.s(&format!("n{i}"))).collect();
    let children: Vec<Child> = (0..33)
        .map(|i| spawn(&gen_args(&conf, &format!("n{i}"), &store, &dirs[i])))
        .collect();
    let mut ok = BTreeSet::new();
    let mut failed = 0;
    for (i, c) in children.into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        if out.status.success() {
            ok.insert(fields(&out)["subnet"].clone());
        } else {
            assert_clean_failure(&out, Path::new(&dirs[i]), "no free subnet");
            failed += 1;
        }
    }
    assert_eq!(ok.len(), 32, "capacity 2^5, all distinct");
    assert_eq!(failed, 1);
    let data: Value =
        serde_json::from_slice(&std::fs::read(sc.path("store/subnets.json")).unwrap()).unwrap();
    assert_eq!(
        data["networks"]["fs"]["nodes"].as_object().unwrap().len(),
        32
    );
    assert_eq!(
        data["networks"]["fs"]["subnets"].as_object().unwrap().len(),
        32
    );
    // No temp files left behind by the atomic writes.
    let leftovers: Vec<_> = std::fs::read_dir(sc.path("store"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp."))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn full_disk_leaves_the_store_intact() {
    let sc = Scratch::new();
    let conf = sc.write("net-conf.json", &net_conf("disk", "10.90.0.0/16", "8"));
    let mnt = sc.path("small");
    std::fs::create_dir(&mnt).unwrap();
    let store = format!("file://{}/subnets.json", mnt.display());
    // A private mount namespace: the tiny tmpfs exists only for this shell
    // and its children, and vanishes with them.
    let script = r#"
        set -u
        mount -t tmpfs -o size=64k tmpfs "$MNT" || exit 90
        "$BIN" config-gen --config "$CONF" --node-name a --store "$STORE" --cni-conf-dir "$DIR/a" >/dev/null || exit 91
        cp "$MNT/subnets.json" "$DIR/before.json"
        dd if=/dev/zero of="$MNT/fill" bs=4096 2>/dev/null
        "$BIN" config-gen --config "$CONF" --node-name b --store "$STORE" --cni-conf-dir "$DIR/b" 2>"$DIR/b.err" && exit 92
        cmp -s "$MNT/subnets.json" "$DIR/before.json" || exit 93
        ls -a "$MNT" | grep -q '\.tmp\.' && exit 94
        rm -f "$MNT/fill"
        "$BIN" config-gen --config "$CONF" --node-name a --store "$STORE" --cni-conf-dir "$DIR/a2" >/dev/null || exit 95
        exit 0
    "#;
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", script])
        .env("MNT", &mnt)
        .env("BIN", BIN)
        .env("CONF", &conf)
        .env("STORE", &store)
        .env("DIR", sc.dir.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "step failed with {:?}: {}{}",
        out.status.code(),
        text(&out.stderr),
        std::fs::read_to_string(sc.path("b.err")).unwrap_or_default()
    );
    let err = std::fs::read_to_string(sc.path("b.err")).unwrap();
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("No space left"), "{err}");
    assert!(!sc.path("b/10-evio.conflist").exists());
    // The tmpfs was never visible outside the namespace.
    assert!(!mnt.join("subnets.json").exists());
}

#[test]
fn ipv6_pod_cidr() {
    let sc = Scratch::new();
    let conf = sc.write("net-conf.json", &net_conf("v6", "fd00:10::/48", "\"16\""));
    let out = run(&gen_args(&conf, "six", &sc.file_store(), &sc.s("d")));
    let f = fields(&out);
    assert_eq!(f["subnet"], "fd00:10::/64");
    assert_eq!(f["gateway"], "fd00:10::1");
    let v = conflist(&sc.path("d"));
    let r = &v["plugins"][0]["ipam"]["ranges"][0][0];
    assert_eq!(r["subnet"], "fd00:10::/48");
    assert_eq!(r["rangeEnd"], "fd00:10::ffff:ffff:ffff:fffe");
}

#[test]
fn conf_file_shape_mode_and_neighbours() {
    let sc = Scratch::new();
    let conf = sc.write(
        "net-conf.json",
        r#"{"name":"shape","podCIDR":"10.244.0.0/16","nodeBits":8,"bridgeType":"LXBR",
            "ipMasq":true,"mtu":1450,"cniVersion":"1.1.0","bridge":"evio1"}"#,
    );
    let dir = sc.path("net.d");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("99-other.conflist"), "{\"keep\":true}").unwrap();
    std::fs::write(dir.join("05-first.conf"), "untouched").unwrap();
    let out = run(&[
        "config-gen",
        "--config",
        &conf,
        "--node-name",
        "shape-node",
        "--store",
        &sc.file_store(),
        "--cni-conf-dir",
        &sc.s("net.d"),
        "--bridge",
        "br-flag",
        "--hairpin-mode",
        "true",
    ]);
    fields(&out);
    let v = conflist(&dir);
    assert_eq!(v["cniVersion"], "1.1.0");
    assert_eq!(v["name"], "shape");
    let p = &v["plugins"][0];
    assert_eq!(p["type"], "evio");
    assert_eq!(p["bridge"], "br-flag", "flag overrides the file");
    assert_eq!(p["bridgeType"], "linux");
    assert_eq!(p["ipMasq"], true);
    assert_eq!(p["mtu"], 1450);
    assert_eq!(p["hairpinMode"], true);
    assert_eq!(p["ipam"]["type"], "host-local");
    assert_eq!(
        v["plugins"][1],
        serde_json::json!({"type":"portmap","capabilities":{"portMappings":true}})
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.join("10-evio.conflist"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o644);
    assert_eq!(
        std::fs::read_to_string(dir.join("99-other.conflist")).unwrap(),
        "{\"keep\":true}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("05-first.conf")).unwrap(),
        "untouched"
    );
    let names: BTreeSet<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
}

#[test]
fn node_name_from_env_then_hostname_and_store_precedence() {
    let sc = Scratch::new();
    let other_store = format!("file://{}", sc.s("cfgstore/s.json"));
    let conf = sc.write(
        "net-conf.json",
        &format!(
            r#"{{"name":"nm","podCIDR":"10.5.0.0/16","nodeBits":8,"dataStore":"{other_store}"}}"#
        ),
    );
    let out = cmd(&[
        "config-gen",
        "--config",
        &conf,
        "--cni-conf-dir",
        &sc.s("a"),
    ])
    .env("NODE_NAME", "from-env")
    .output()
    .unwrap();
    assert_eq!(fields(&out)["node"], "from-env");
    assert!(
        sc.path("cfgstore/s.json").exists(),
        "dataStore from the config is used"
    );

    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let out = run(&[
        "config-gen",
        "--config",
        &conf,
        "--cni-conf-dir",
        &sc.s("b"),
        "--store",
        &sc.file_store(),
    ]);
    assert_eq!(fields(&out)["node"], host.trim().to_lowercase());
    assert!(
        sc.path("store/subnets.json").exists(),
        "--store overrides dataStore"
    );
}

/// Every bad configuration: non-zero, one clear stderr line, no file, and
/// nothing allocated.
#[test]
fn bad_configurations_fail_cleanly() {
    let sc = Scratch::new();
    let ok = r#""name":"bad","podCIDR":"10.244.0.0/16","nodeBits":8"#;
    let cases: Vec<(&str, String, Vec<&str>, &str)> = vec![
        (
            "nodeBits 0",
            r#"{"podCIDR":"10.244.0.0/16","nodeBits":0}"#.into(),
            vec![],
            "at least 1",
        ),
        (
            "nodeBits too large",
            r#"{"podCIDR":"10.244.0.0/16","nodeBits":17}"#.into(),
            vec![],
            "too large",
        ),
        (
            "nodeBits huge",
            r#"{"podCIDR":"10.244.0.0/16","nodeBits":"4294967296"}"#.into(),
            vec![],
            "nodeBits",
        ),
        (
            "host bits < 2",
            r#"{"podCIDR":"10.244.0.0/16","nodeBits":15}"#.into(),
            vec![],
            "at least 2",
        ),
        (
            "v6 host bits < 2",
            r#"{"podCIDR":"fd00::/64","nodeBits":63}"#.into(),
            vec![],
            "at least 2",
        ),
        (
            "nodeBits word",
            r#"{"podCIDR":"10.244.0.0/16","nodeBits":"eight"}"#.into(),
            vec![],
            "nodeBits",
        ),
        (
            "nodeBits negative",
            r#"{"podCIDR":"10.244.0.0/16","nodeBits":-1}"#.into(),
            vec![],
            "nodeBits",
        ),
        (
            "nodeBits fraction",
            r#"{"podCIDR":"10.244.0.0/16","nodeBits":2.5}"#.into(),
            vec![],
            "nodeBits",
        ),
        (
            "nodeBits missing",
            r#"{"podCIDR":"10.244.0.0/16"}"#.into(),
            vec![],
            "nodeBits is required",
        ),
        (
            "podCIDR missing",
            r#"{"nodeBits":8}"#.into(),
            vec![],
            "podCIDR is required",
        ),
        (
            "podCIDR no prefix",
            r#"{"podCIDR":"10.244.0.0","nodeBits":8}"#.into(),
            vec![],
            "ADDRESS/PREFIX",
        ),
        (
            "podCIDR garbage",
            r#"{"podCIDR":"banana/16","nodeBits":8}"#.into(),
            vec![],
            "not an IP address",
        ),
        (
            "podCIDR short",
            r#"{"podCIDR":"10.244.0/16","nodeBits":8}"#.into(),
            vec![],
            "invalid podCIDR",
        ),
        (
            "podCIDR prefix 33",
            r#"{"podCIDR":"10.244.0.0/33","nodeBits":8}"#.into(),
            vec![],
            "prefix length",
        ),
        (
            "podCIDR host bits",
            r#"{"podCIDR":"10.244.1.0/16","nodeBits":8}"#.into(),
            vec![],
            "10.244.0.0/16",
        ),
        (
            "v6 host bits",
            r#"{"podCIDR":"fd00:10::1/48","nodeBits":8}"#.into(),
            vec![],
            "fd00:10::/48",
        ),
        (
            "podCIDR number",
            r#"{"podCIDR":10,"nodeBits":8}"#.into(),
            vec![],
            "podCIDR",
        ),
        ("not json", "{ nope".into(), vec![], "not valid JSON"),
        ("json array", "[]".into(), vec![], "JSON object"),
        (
            "near-miss key",
            r#"{"podCIDR":"10.244.0.0/16","nodebits":8}"#.into(),
            vec![],
            "did you mean",
        ),
        (
            "bridgeType",
            format!(r#"{{{ok},"bridgeType":"vpp"}}"#),
            vec![],
            "bridgeType",
        ),
        (
            "bridge name",
            format!(r#"{{{ok},"bridge":"a-very-long-bridge-name"}}"#),
            vec![],
            "bridge",
        ),
        ("mtu", format!(r#"{{{ok},"mtu":20}}"#), vec![], "mtu"),
        (
            "ovsDatapath",
            format!(r#"{{{ok},"ovsDatapath":"dpdk"}}"#),
            vec![],
            "ovsDatapath",
        ),
        (
            "cniVersion",
            format!(r#"{{{ok},"cniVersion":"9.9.9"}}"#),
            vec![],
            "cniVersion",
        ),
        (
            "isGateway type",
            format!(r#"{{{ok},"isGateway":"maybe"}}"#),
            vec![],
            "isGateway",
        ),
        (
            "network name",
            r#"{"name":"a/b","podCIDR":"10.244.0.0/16","nodeBits":8}"#.into(),
            vec![],
            "network name",
        ),
        (
            "dataStore scheme",
            format!(r#"{{{ok},"dataStore":"redis://x:1"}}"#),
            vec!["--no-store-flag"],
            "unsupported store",
        ),
        (
            "store flag",
            format!("{{{ok}}}"),
            vec!["--store", "etcd://nohost"],
            "HOST:PORT",
        ),
        (
            "node name",
            format!("{{{ok}}}"),
            vec!["--node-name", "a/b"],
            "node name",
        ),
        (
            "node bits flag",
            format!("{{{ok}}}"),
            vec!["--node-bits", "x"],
            "nodeBits",
        ),
        (
            "timeout flag",
            format!("{{{ok}}}"),
            vec!["--timeout", "0"],
            "timeout",
        ),
        (
            "unknown flag",
            format!("{{{ok}}}"),
            vec!["--frobnicate"],
            "--frobnicate",
        ),
        (
            "missing config file",
            String::new(),
            vec!["--config", "/nonexistent/net-conf.json"],
            "/nonexistent/net-conf.json",
        ),
    ];
    let store = sc.file_store();
    for (i, (what, json, extra, needle)) in cases.iter().enumerate() {
        let conf = sc.write(&format!("c{i}.json"), json);
        let dir = sc.s(&format!("d{i}"));
        let mut args: Vec<&str> = vec!["config-gen", "--config", &conf, "--cni-conf-dir", &dir];
        if !extra.contains(&"--node-name") {
            args.extend(["--node-name", "n"]);
        }
        if !extra.contains(&"--no-store-flag") && !extra.contains(&"--store") {
            args.extend(["--store", &store]);
        }
        let extra: Vec<&str> = extra
            .iter()
            .copied()
            .filter(|a| *a != "--no-store-flag")
            .collect();
        // A later --config wins in clap for single-value flags: replace instead.
        if let Some(pos) = extra.iter().position(|a| *a == "--config") {
            args[2] = extra[pos + 1];
        } else {
            args.extend(extra.iter().copied());
        }
        let out = run(&args);
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{what}: unexpected success");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{what}: {stderr:?}");
        assert!(
            stderr.to_lowercase().contains(&needle.to_lowercase()),
            "{what}: {needle:?} not in {stderr:?}"
        );
        assert!(
            !Path::new(&dir).join("10-evio.conflist").exists(),
            "{what}: file written"
        );
    }
    assert!(
        !sc.path("store/subnets.json").exists(),
        "a bad config allocated something"
    );
}

/// Every flag of the commands an operator configures says what it does.
#[test]
fn every_flag_has_a_help_line() {
    for cmd in [
        "config-gen",
        "run",
        "agent",
        "doctor",
        "install-cni",
        "uninstall",
    ] {
        let out = run(&[cmd, "--help"]);
        let help = text(&out.stdout);
        let flags: Vec<&str> = help
            .lines()
            .filter(|l| l.trim_start().starts_with('-'))
            .collect();
        assert!(flags.len() > 2, "{cmd}: {help}");
        for l in flags {
            // `  -x, --flag <VALUE>   What it does`: the text after the
            // flag and its value name, separated by two or more spaces.
            let described = l
                .trim()
                .split_once("  ")
                .is_some_and(|(_, d)| !d.trim().is_empty());
            assert!(described, "{cmd}: no help for {l:?}");
        }
    }
}

// ---- uninstall ----------------------------------------------------------

fn plugin_bin() -> PathBuf {
    evio_testkit::cluster::profile_dir_of_current_exe()
        .map(|d| d.join("evio"))
        .unwrap_or_else(|| PathBuf::from("target/release/evio"))
}

/// The conflist's evio entry as the runtime hands it to the plugin.
fn plugin_conf(conflist: &Value) -> Value {
    let mut p = conflist["plugins"][0].clone();
    p["name"] = conflist["name"].clone();
    p["cniVersion"] = conflist["cniVersion"].clone();
    p
}

/// A node netns where config-gen ran, the plugin was installed, pods were
/// added (one deleted again, one left behind as after a drained node),
/// and the agent's TAP exists: everything uninstall has to take away.
fn uninstall_scenario(ovs: bool) {
    use evio_testkit::netns::Netns;
    use evio_testkit::plugin::{Cni, Pod};

    let ns = Netns::new("evun");
    let ovs_daemons = ovs.then(|| evio_testkit::ovs::Ovs::start(&ns));
    let tmp = tempfile::tempdir().unwrap();
    let d = |p: &str| tmp.path().join(p);
    let network = unique_name("un");
    let mut conf = serde_json::json!({
        "name": network, "podCIDR": "10.244.0.0/16", "nodeBits": 8,
        "bridge": "evun0", "bridgeType": if ovs { "ovs" } else { "linux" },
        "ipMasq": true,
    });
    if let Some(o) = &ovs_daemons {
        conf["ovsdb"] = o.endpoint().into();
    }
    std::fs::write(d("net-conf.json"), conf.to_string()).unwrap();
    std::fs::create_dir_all(d("bin")).unwrap();
    std::fs::copy(plugin_bin(), d("bin/evio")).unwrap();
    std::fs::create_dir_all(d("data")).unwrap();
    std::fs::write(d("data/agent.key"), "k").unwrap();
    let store = format!("file://{}", d("subnets.json").display());
    let s = |p: &str| d(p).display().to_string();
    let common = [
        "--config".to_string(),
        s("net-conf.json"),
        "--node-name".into(),
        "n1".into(),
        "--store".into(),
        store.clone(),
        "--cni-conf-dir".into(),
        s("net.d"),
        "--ipam-data-dir".into(),
        s("ipam"),
    ];
    let mut gen = vec![BIN.to_string(), "config-gen".into()];
    gen.extend(common.iter().cloned());
    let argv: Vec<&str> = gen.iter().map(String::as_str).collect();
    ns.ok(&argv);
    let conflist_json = conflist(&d("net.d"));
    let pconf = plugin_conf(&conflist_json);

    let cni = Cni::new(d("bin/evio"), &ns);
    let (p1, p2) = (Pod::new(), Pod::new());
    for p in [&p1, &p2] {
        cni.run("ADD", &p.id, Some(&p.path()), &p.ifname, None, &pconf)
            .expect_success("ADD");
    }
    cni.run("DEL", &p1.id, Some(&p1.path()), &p1.ifname, None, &pconf)
        .expect_success("DEL");
    ns.ok(&["ip", "tuntap", "add", "evun0-ovl", "mode", "tap"]);
    if let Some(o) = &ovs_daemons {
        o.vsctl(&[
            "add-port",
            "evun0",
            "evun0-ovl",
            "--",
            "set",
            "port",
            "evun0-ovl",
            "external_ids:evio-owner=evio-agent",
        ]);
    } else {
        ns.ok(&["ip", "link", "set", "evun0-ovl", "master", "evun0"]);
    }
    // Foreign interfaces: a veth pair of someone else's, and (for now) a
    // port evio did not add on the bridge.
    ns.ok(&[
        "ip",
        "link",
        "add",
        "vethforeign",
        "type",
        "veth",
        "peer",
        "name",
        "vethforeign1",
    ]);
    ns.ok(&[
        "ip",
        "link",
        "add",
        "foreignport",
        "type",
        "veth",
        "peer",
        "name",
        "foreignpeer",
    ]);
    match &ovs_daemons {
        Some(o) => {
            o.vsctl(&["add-port", "evun0", "foreignport"]);
        }
        None => {
            ns.ok(&["ip", "link", "set", "foreignport", "master", "evun0"]);
        }
    }
    assert!(ns
        .links()
        .iter()
        .any(|l| l.starts_with("ev") && l.len() == 15));
    assert!(ns.ok(&["nft", "list", "tables"]).contains("inet evio"));
    assert!(d(&format!("ipam/{network}")).exists());

    let mut un = vec![BIN.to_string(), "uninstall".into()];
    un.extend(common[..8].iter().cloned());
    un.extend(
        [
            "--cni-bin-dir",
            &s("bin"),
            "--data-dir",
            &s("data"),
            "--ipam-data-dir",
            &s("ipam"),
            "--release",
        ]
        .map(String::from),
    );
    let argv: Vec<&str> = un.iter().map(String::as_str).collect();

    // The foreign port keeps the bridge: reported, non-zero, and every
    // other item is removed all the same.
    let out = ns.exec(&argv);
    assert!(!out.status.success(), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains("foreignport"),
        "{}",
        text(&out.stderr)
    );
    assert!(ns.has_link("evun0"));
    assert!(!d("net.d/10-evio.conflist").exists());
    assert!(!d("bin/evio").exists());
    assert!(!d("data").exists());
    match &ovs_daemons {
        Some(o) => {
            o.vsctl(&["del-port", "evun0", "foreignport"]);
        }
        None => {
            ns.ok(&["ip", "link", "set", "foreignport", "nomaster"]);
        }
    }

    let out = ns.exec(&argv);
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(text(&out.stdout).contains("evun0"), "{}", text(&out.stdout));

    // Nothing of evio's is left; the foreign interfaces are.
    let links = ns.links();
    assert!(
        !links
            .iter()
            .any(|l| (l.starts_with("ev") && l.len() == 15) || l.starts_with("evun0")),
        "{links:?}"
    );
    for keep in ["vethforeign", "vethforeign1", "foreignport", "foreignpeer"] {
        assert!(links.iter().any(|l| l == keep), "{keep} removed: {links:?}");
    }
    if let Some(o) = &ovs_daemons {
        assert_eq!(o.vsctl(&["list-br"]).trim(), "");
    }
    assert!(!ns.ok(&["nft", "list", "tables"]).contains("inet evio"));
    assert!(!d(&format!("ipam/{network}")).exists());
    let stored = std::fs::read_to_string(d("subnets.json")).unwrap();
    assert!(!stored.contains("\"n1\""), "{stored}");
    // The doctor, given the old conflist back, finds nothing of evio's.
    std::fs::create_dir_all(d("old.d")).unwrap();
    std::fs::write(d("old.d/10-evio.conflist"), conflist_json.to_string()).unwrap();
    let doc = ns.exec(&[BIN, "doctor", "--conf-dir", &s("old.d")]);
    let said = text(&doc.stdout);
    assert!(doc.status.success(), "{said}{}", text(&doc.stderr));
    assert!(
        said.contains("0 attachment(s), 0 address(es), 0 host veth(s)")
            && said.contains("no problems found"),
        "{said}"
    );

    // Idempotent: a second run succeeds and says there was nothing to do.
    let out = ns.exec(&argv);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("nothing to do"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn uninstall_removes_everything_of_evio_on_a_linux_bridge_node() {
    uninstall_scenario(false);
}

#[test]
fn uninstall_removes_everything_of_evio_on_an_ovs_node() {
    uninstall_scenario(true);
}

/// In a pod (KUBERNETES_SERVICE_HOST set) the node-local file store would
/// let every node allocate alone: refused in one line, before anything is
/// written, unless the config says the cluster has a single node.
#[test]
fn file_store_is_refused_in_a_cluster_unless_single_node() {
    let sc = Scratch::new();
    let conf = sc.write(
        "net-conf.json",
        &net_conf("incluster", "10.244.0.0/16", "8"),
    );
    let dir = sc.s("net.d");
    let args = gen_args(&conf, "node-k", &sc.file_store(), &dir);
    let out = cmd(&args)
        .env("KUBERNETES_SERVICE_HOST", "10.96.0.1")
        .output()
        .unwrap();
    assert_clean_failure(&out, &sc.path("net.d"), "\"singleNode\": true");
    assert!(text(&out.stderr).contains("etcd"), "{}", text(&out.stderr));
    assert!(
        !sc.path("store/subnets.json").exists(),
        "nothing allocated in the refused store"
    );

    let single = sc.write(
        "single.json",
        r#"{"name":"incluster","podCIDR":"10.244.0.0/16","nodeBits":8,"singleNode":true}"#,
    );
    let out = cmd(&gen_args(&single, "node-k", &sc.file_store(), &dir))
        .env("KUBERNETES_SERVICE_HOST", "10.96.0.1")
        .output()
        .unwrap();
    assert_eq!(fields(&out)["network"], "incluster");
    assert!(sc.path("net.d/10-evio.conflist").exists());

    // "singleNode": false is not an opt-out.
    let multi = sc.write(
        "multi.json",
        r#"{"name":"incluster","podCIDR":"10.244.0.0/16","nodeBits":8,"singleNode":false}"#,
    );
    let out = cmd(&gen_args(
        &multi,
        "node-k",
        &sc.file_store(),
        &sc.s("net.d2"),
    ))
    .env("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    .output()
    .unwrap();
    assert_clean_failure(&out, &sc.path("net.d2"), "singleNode");
}

/// A config that sorts before evio's wins at the runtime: config-gen says
/// so on stderr, one line naming it, and the conflist's name can be moved
/// ahead by flag or config key.
#[test]
fn an_earlier_config_is_warned_about_and_the_conflist_name_is_configurable() {
    let sc = Scratch::new();
    let dir = sc.path("net.d");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("10-containerd-net.conflist"), "{}").unwrap();
    std::fs::write(dir.join("50-later.conflist"), "{}").unwrap();
    std::fs::write(dir.join("00-notes.txt"), "not a config").unwrap();
    let conf = sc.write("net-conf.json", &net_conf("prec", "10.244.0.0/16", "8"));
    let out = run(&gen_args(&conf, "node-p", &sc.file_store(), &sc.s("net.d")));
    fields(&out);
    let stderr = text(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("warning")
            && stderr.contains(&dir.join("10-containerd-net.conflist").display().to_string())
            && stderr.contains("10-evio.conflist"),
        "{stderr}"
    );

    // By flag: 05-evio.conflist sorts first, no warning.
    let mut args = gen_args(&conf, "node-p", &sc.file_store(), &sc.s("net.d"));
    args.extend([
        "--conflist-name".to_string(),
        "05-evio.conflist".to_string(),
    ]);
    let out = run(&args);
    assert_eq!(
        fields(&out)["conf"],
        dir.join("05-evio.conflist").display().to_string()
    );
    assert!(text(&out.stderr).is_empty(), "{}", text(&out.stderr));
    let v: Value =
        serde_json::from_slice(&std::fs::read(dir.join("05-evio.conflist")).unwrap()).unwrap();
    assert_eq!(v["name"], "prec");

    // By config key.
    let keyed = sc.write(
        "keyed.json",
        r#"{"name":"prec","podCIDR":"10.244.0.0/16","nodeBits":8,"conflistName":"01-evio.conflist"}"#,
    );
    let out = run(&gen_args(
        &keyed,
        "node-p",
        &sc.file_store(),
        &sc.s("net.d"),
    ));
    assert_eq!(
        fields(&out)["conf"],
        dir.join("01-evio.conflist").display().to_string()
    );

    // Not a bare .conflist name: refused before allocating.
    for bad in [
        "evio.conf",
        "../10-evio.conflist",
        ".conflist",
        "a/b.conflist",
    ] {
        let mut args = gen_args(&conf, "node-bad", &sc.file_store(), &sc.s("net.e"));
        args.extend(["--conflist-name".to_string(), bad.to_string()]);
        let out = run(&args);
        assert_clean_failure(&out, &sc.path("net.e"), "conflist name");
    }
    let out = run(&[
        "subnets",
        "list",
        "--store",
        &sc.file_store(),
        "--network",
        "prec",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("node-p"),
        "{}",
        text(&out.stdout)
    );
    assert!(
        !text(&out.stdout).contains("node-bad"),
        "a refused name cost a subnet: {}",
        text(&out.stdout)
    );
}
