//! Hostile and malformed input through the real plugin binary: each case
//! must be refused with the right CNI error code, name the offending key or
//! variable where there is one, exit normally (no panic, no signal), and
//! create nothing at all — no link in the node or the pod, not even the
//! bridge; no file or directory under the IPAM dataDir; no nftables state;
//! no OVS bridge or port. The node is fresh (never warmed up) so that any
//! side effect before validation shows.
//!
//! Codes (CNI spec 1.1.0 "Error" and docs/design.md):
//!   6  the bytes are not a JSON object at all (not JSON, not UTF-8, too
//!      large, nested past the parser's limit, a number JSON cannot hold)
//!      or a field that must be decoded is not decodable (`cniVersion`
//!      "1.1", per the spec's "failed to decode version info from string");
//!   1  a well-formed `cniVersion` this plugin does not implement;
//!   7  JSON that decodes but where a key has a wrong type or value,
//!      including names that would escape their namespace (`../`, NUL,
//!      too long) and delegates/paths that are not what they claim;
//!   4  a `CNI_*` variable that is missing or malformed, or a CNI_NETNS that
//!      is not a network namespace other than the node's own;
//!   3  a CNI_NETNS that does not exist (the spec's "container unknown or
//!      does not exist").
// A test that unwraps fails loudly, which is what a test should do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use common::{plugin_bin, Backend, Fixture};
use evio_testkit::plugin::{run_bounded, CniOutput, Pod, DEFAULT_TIMEOUT, RUNTIME_PATH};
use serde_json::{json, Value};

/// One invocation: the environment (besides PATH) and stdin.
struct Input {
    env: Vec<(String, OsString)>,
    stdin: Vec<u8>,
}

impl Input {
    fn set_env(&mut self, k: &str, v: impl AsRef<OsStr>) {
        self.env.retain(|(key, _)| key != k);
        self.env.push((k.to_string(), v.as_ref().to_os_string()));
    }

    fn unset_env(&mut self, k: &str) {
        self.env.retain(|(key, _)| key != k);
    }
}

type Mutate = Box<dyn Fn(&mut Input, &Value)>;

struct Case {
    what: &'static str,
    code: u64,
    /// Words the error's msg or details must contain (case-insensitive):
    /// the offending key or variable.
    names: &'static [&'static str],
    mutate: Mutate,
}

/// A case that edits the JSON config.
fn conf(
    what: &'static str,
    code: u64,
    names: &'static [&'static str],
    edit: impl Fn(&mut Value) + 'static,
) -> Case {
    Case {
        what,
        code,
        names,
        mutate: Box::new(move |input, base| {
            let mut c = base.clone();
            edit(&mut c);
            input.stdin = c.to_string().into_bytes();
        }),
    }
}

/// A case that replaces stdin with raw bytes built from the config.
fn raw(
    what: &'static str,
    code: u64,
    names: &'static [&'static str],
    bytes: impl Fn(&Value) -> Vec<u8> + 'static,
) -> Case {
    Case {
        what,
        code,
        names,
        mutate: Box::new(move |input, base| input.stdin = bytes(base)),
    }
}

/// A case that edits the environment.
fn env(
    what: &'static str,
    code: u64,
    names: &'static [&'static str],
    edit: impl Fn(&mut Input) + 'static,
) -> Case {
    Case {
        what,
        code,
        names,
        mutate: Box::new(move |input, _| edit(input)),
    }
}

fn set(key: &'static str, v: Value) -> impl Fn(&mut Value) {
    move |c| c[key] = v.clone()
}

fn set_ipam(key: &'static str, v: Value) -> impl Fn(&mut Value) {
    move |c| c["ipam"][key] = v.clone()
}

/// `{"x": [[[...]]], <config>}`: nesting far past serde_json's limit of 128.
fn deeply_nested(c: &Value) -> Vec<u8> {
    let depth = 100_000;
    let body = c.to_string();
    let mut s = String::with_capacity(depth * 2 + body.len() + 8);
    s.push_str("{\"x\":");
    s.push_str(&"[".repeat(depth));
    s.push_str(&"]".repeat(depth));
    s.push(',');
    s.push_str(&body[1..]);
    s.into_bytes()
}

fn cases() -> Vec<Case> {
    vec![
        // ---- 6: not decodable
        raw("truncated JSON", 6, &[], |_| b"{\"cniVersion\":".to_vec()),
        raw("empty stdin", 6, &[], |_| Vec::new()),
        raw("non-UTF-8 bytes", 6, &[], |c| {
            let mut b = vec![0xff, 0xfe, 0xfd];
            b.extend(c.to_string().into_bytes());
            b
        }),
        raw("invalid UTF-8 inside a string", 6, &[], |c| {
            c.to_string()
                .replacen("\"name\":\"", "\"name\":\"\u{1}", 1)
                .into_bytes()
                .into_iter()
                .map(|b| if b == 1 { 0xc3 } else { b })
                .collect()
        }),
        raw("raw NUL byte inside a string", 6, &[], |c| {
            c.to_string()
                .replacen("\"name\":\"", "\"name\":\"\0", 1)
                .into_bytes()
        }),
        raw("a JSON array", 6, &["object"], |_| b"[1,2,3]".to_vec()),
        raw("trailing garbage", 6, &[], |c| {
            let mut b = c.to_string().into_bytes();
            b.extend_from_slice(b" {}");
            b
        }),
        raw("nested 100000 deep", 6, &["recursion"], deeply_nested),
        raw("5 MB config", 6, &["bytes"], |c| {
            let mut v = c.clone();
            v["padding"] = json!("x".repeat(5 << 20));
            v.to_string().into_bytes()
        }),
        raw("number beyond f64", 6, &["number"], |c| {
            c.to_string()
                .replacen("{", "{\"mtu\":1e999,", 1)
                .into_bytes()
        }),
        conf(
            "cniVersion 1.1",
            6,
            &["cniversion"],
            set("cniVersion", json!("1.1")),
        ),
        conf(
            "cniVersion with a path",
            6,
            &["cniversion"],
            set("cniVersion", json!("../1.0.0")),
        ),
        // ---- 1: a version we do not speak
        conf(
            "cniVersion 0.2.0",
            1,
            &["0.2.0"],
            set("cniVersion", json!("0.2.0")),
        ),
        conf(
            "cniVersion 99.0.0",
            1,
            &["99.0.0"],
            set("cniVersion", json!("99.0.0")),
        ),
        // ---- 7: decodes, but a key is wrong
        conf(
            "cniVersion a number",
            7,
            &["cniversion"],
            set("cniVersion", json!(1.1)),
        ),
        conf("cniVersion missing", 7, &["cniversion"], |c| {
            c.as_object_mut().map(|o| o.remove("cniVersion"));
        }),
        conf("name missing", 7, &["name"], |c| {
            c.as_object_mut().map(|o| o.remove("name"));
        }),
        conf("name a number", 7, &["name"], set("name", json!(12))),
        conf(
            "name with ../",
            7,
            &["network name"],
            set("name", json!("../../etc/passwd")),
        ),
        conf(
            "name with NUL",
            7,
            &["network name"],
            set("name", json!("ne\u{0}t")),
        ),
        conf(
            "name 300 bytes long",
            7,
            &["name"],
            set("name", json!("n".repeat(300))),
        ),
        conf("type missing", 7, &["type"], |c| {
            c.as_object_mut().map(|o| o.remove("type"));
        }),
        conf(
            "bridge with a space",
            7,
            &["bridge"],
            set("bridge", json!("br 0")),
        ),
        conf(
            "bridge 16 bytes",
            7,
            &["bridge"],
            set("bridge", json!("abcdefghijklmnop")),
        ),
        conf("bridge ../x", 7, &["bridge"], set("bridge", json!("../x"))),
        conf(
            "bridge with NUL",
            7,
            &["bridge"],
            set("bridge", json!("br\u{0}x")),
        ),
        conf("bridge empty", 7, &["bridge"], set("bridge", json!(""))),
        conf(
            "bridge an object",
            7,
            &["bridge"],
            set("bridge", json!({"a": 1})),
        ),
        conf(
            "bridgeType vpp",
            7,
            &["bridgetype"],
            set("bridgeType", json!("vpp")),
        ),
        conf(
            "bridgeType a number",
            7,
            &["bridgetype"],
            set("bridgeType", json!(1)),
        ),
        conf("mtu a string", 7, &["mtu"], set("mtu", json!("1500"))),
        conf("mtu 0", 7, &["mtu"], set("mtu", json!(0))),
        conf("mtu 67", 7, &["mtu"], set("mtu", json!(67))),
        conf("mtu 65536", 7, &["mtu"], set("mtu", json!(65536))),
        conf("mtu -1", 7, &["mtu"], set("mtu", json!(-1))),
        conf("mtu 1500.5", 7, &["mtu"], set("mtu", json!(1500.5))),
        conf("mtu 1e12", 7, &["mtu"], set("mtu", json!(1e12))),
        conf(
            "mtu 2^64",
            7,
            &["mtu"],
            set("mtu", json!(18_446_744_073_709_551_615u64)),
        ),
        conf(
            "isGateway \"yes\"",
            7,
            &["isgateway"],
            set("isGateway", json!("yes")),
        ),
        conf(
            "isDefaultGateway \"true\"",
            7,
            &["isdefaultgateway"],
            set("isDefaultGateway", json!("true")),
        ),
        conf("ipMasq 1", 7, &["ipmasq"], set("ipMasq", json!(1))),
        conf(
            "hairpinMode a list",
            7,
            &["hairpinmode"],
            set("hairpinMode", json!([])),
        ),
        conf(
            "ovsdb a bare path",
            7,
            &["ovsdb"],
            set("ovsdb", json!("/var/run/openvswitch/db.sock")),
        ),
        conf(
            "ovsdb scheme only",
            7,
            &["ovsdb"],
            set("ovsdb", json!("tcp:")),
        ),
        conf(
            "ovsDatapath dpdk",
            7,
            &["ovsdatapath"],
            set("ovsDatapath", json!("dpdk")),
        ),
        conf(
            "bridgeIPv4 not an address",
            7,
            &["bridgeipv4"],
            set("bridgeIPv4", json!("10.0.0.300")),
        ),
        conf("ipam missing", 7, &["ipam"], |c| {
            c.as_object_mut().map(|o| o.remove("ipam"));
        }),
        conf(
            "ipam a string",
            7,
            &["ipam"],
            set("ipam", json!("host-local")),
        ),
        conf(
            "ipam.type an absolute path",
            7,
            &["ipam.type"],
            set_ipam("type", json!("/bin/sh")),
        ),
        conf(
            "ipam.type with ../",
            7,
            &["ipam.type"],
            set_ipam("type", json!("../../../bin/sh")),
        ),
        conf(
            "ipam.type not installed",
            7,
            &["no-such-ipam"],
            set_ipam("type", json!("no-such-ipam")),
        ),
        conf(
            "ipam.type with NUL",
            7,
            &["ipam"],
            set_ipam("type", json!("host-local\u{0}")),
        ),
        // Relative to the plugin's cwd, which `run` puts two levels deep in
        // the test's temp dir: a plugin that followed it stays contained.
        conf(
            "ipam.dataDir relative with ../",
            7,
            &["datadir"],
            set_ipam("dataDir", json!("../../escaped")),
        ),
        conf("ipam.dataDir with /../", 7, &["datadir"], |c| {
            let d = c["ipam"]["dataDir"].as_str().unwrap_or("/x").to_string();
            c["ipam"]["dataDir"] = json!(format!("{d}/sub/../../escaped"));
        }),
        conf(
            "ipam.dataDir with NUL",
            7,
            &["datadir"],
            set_ipam("dataDir", json!("/tmp/a\u{0}b")),
        ),
        conf(
            "logFile relative",
            7,
            &["logfile"],
            set("logFile", json!("evio-hostile.log")),
        ),
        conf("logFile with ../", 7, &["logfile"], |c| {
            let d = c["ipam"]["dataDir"].as_str().unwrap_or("/x").to_string();
            c["logFile"] = json!(format!("{d}/../escaped.log"));
        }),
        conf(
            "prevResult a string",
            7,
            &["prevresult"],
            set("prevResult", json!("x")),
        ),
        // ---- 4: the environment
        env("CNI_COMMAND missing", 4, &["cni_command"], |i| {
            i.unset_env("CNI_COMMAND")
        }),
        env("CNI_COMMAND lower case", 4, &["cni_command"], |i| {
            i.set_env("CNI_COMMAND", "add")
        }),
        env("CNI_CONTAINERID with ../", 4, &["containerid"], |i| {
            i.set_env("CNI_CONTAINERID", "../../etc")
        }),
        env("CNI_CONTAINERID with a newline", 4, &["containerid"], |i| {
            i.set_env("CNI_CONTAINERID", "abc\ndef")
        }),
        env("CNI_CONTAINERID 300 bytes", 4, &["cni_containerid"], |i| {
            i.set_env("CNI_CONTAINERID", "c".repeat(300))
        }),
        env("CNI_IFNAME with a path", 4, &["interface name"], |i| {
            i.set_env("CNI_IFNAME", "eth0/../x")
        }),
        env("CNI_IFNAME 16 bytes", 4, &["interface name"], |i| {
            i.set_env("CNI_IFNAME", "abcdefghijklmnop")
        }),
        env("CNI_IFNAME with a space", 4, &["interface name"], |i| {
            i.set_env("CNI_IFNAME", "eth 0")
        }),
        env("CNI_ARGS without =", 4, &["cni_args"], |i| {
            i.set_env("CNI_ARGS", "a;b;c")
        }),
        env("CNI_ARGS with an empty key", 4, &["cni_args"], |i| {
            i.set_env("CNI_ARGS", "=value")
        }),
        env("CNI_ARGS not UTF-8", 4, &["cni_args"], |i| {
            i.set_env("CNI_ARGS", OsStr::from_bytes(b"K8S_POD_NAME=\xff\xfe"))
        }),
        env("CNI_NETNS missing", 4, &["cni_netns"], |i| {
            i.unset_env("CNI_NETNS")
        }),
        env("CNI_NETNS does not exist", 3, &["cni_netns"], |i| {
            i.set_env("CNI_NETNS", "/run/netns/evio-no-such-netns")
        }),
        env("CNI_NETNS a regular file", 4, &["cni_netns"], |i| {
            i.set_env("CNI_NETNS", "/etc/hostname")
        }),
        env("CNI_NETNS a directory", 4, &["cni_netns"], |i| {
            i.set_env("CNI_NETNS", "/run")
        }),
        env("CNI_NETNS relative", 4, &["cni_netns"], |i| {
            i.set_env("CNI_NETNS", "netns")
        }),
        env("CNI_NETNS not UTF-8", 4, &["cni_netns"], |i| {
            i.set_env("CNI_NETNS", OsStr::from_bytes(b"/run/netns/\xff"))
        }),
        // The plugin runs in the node's netns: its own namespace is the
        // node's, and treating it as the pod's would plumb the node itself.
        env("CNI_NETNS the node's own netns", 4, &["cni_netns"], |i| {
            i.set_env("CNI_NETNS", "/proc/self/ns/net")
        }),
        env("CNI_PATH missing", 4, &["cni_path"], |i| {
            i.unset_env("CNI_PATH")
        }),
        env("CNI_PATH without host-local", 7, &["host-local"], |i| {
            i.set_env("CNI_PATH", "/nonexistent")
        }),
    ]
}

fn base_input(f: &Fixture, pod: &Pod, config: &Value) -> Input {
    let mut i = Input {
        env: Vec::new(),
        stdin: config.to_string().into_bytes(),
    };
    i.set_env("CNI_COMMAND", "ADD");
    i.set_env("CNI_CONTAINERID", &pod.id);
    i.set_env("CNI_NETNS", pod.path());
    i.set_env("CNI_IFNAME", &pod.ifname);
    i.set_env("CNI_ARGS", pod.k8s_args());
    i.set_env("CNI_PATH", f.cni().cni_path);
    i
}

fn run(f: &Fixture, input: &Input) -> CniOutput {
    let bin = plugin_bin().display().to_string();
    let mut cmd = f.node.command(&[&bin]);
    cmd.env_clear().env("PATH", RUNTIME_PATH);
    for (k, v) in &input.env {
        cmd.env(k, v);
    }
    // A relative path the plugin wrongly used lands inside the temp dir.
    cmd.current_dir(cwd(f));
    run_bounded(cmd, &input.stdin, DEFAULT_TIMEOUT)
}

fn ovs_bridges(f: &Fixture) -> String {
    match &f.ovs {
        Some(ovs) => ovs.vsctl(&["list-br"]),
        None => String::new(),
    }
}

/// The plugin's working directory: deep enough in the test's temp dir
/// that `../../x` still resolves inside it.
fn cwd(f: &Fixture) -> PathBuf {
    f.dir.path().join("cwd/a/b")
}

/// Every file and directory under the test's temp dir.
fn tree(dir: &Path) -> BTreeSet<String> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeSet<String>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            if let Ok(rel) = p.strip_prefix(base) {
                out.insert(rel.display().to_string());
            }
            if p.is_dir() {
                walk(base, &p, out);
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(dir, dir, &mut out);
    out
}

fn hostile_table(backend: Backend) {
    let f = Fixture::new(backend);
    std::fs::create_dir_all(cwd(&f)).unwrap_or_else(|e| panic!("{e}"));
    let pod = Pod::new();
    let config = f.conf().ip_masq(true).json();
    let table = cases();
    assert!(table.len() >= 30, "the table must have at least 30 cases");
    let mut failures = Vec::new();
    for case in &table {
        let mut input = base_input(&f, &pod, &config);
        (case.mutate)(&mut input, &config);
        let before = f.leaks(&[&pod.ns]);
        let bridges = ovs_bridges(&f);
        let files = tree(f.dir.path());
        let out = run(&f, &input);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            out.expect_error_code(case.what, case.code);
            let text = out.error_text();
            for word in case.names {
                assert!(
                    text.contains(&word.to_lowercase()),
                    "{}: the error should name {word:?}: {out}",
                    case.what
                );
            }
            before.assert_no_leaks(&f.leaks(&[&pod.ns]), case.what);
            assert_eq!(
                ovs_bridges(&f),
                bridges,
                "{}: OVS bridges changed",
                case.what
            );
            let now = tree(f.dir.path());
            let new: Vec<_> = now.difference(&files).collect();
            assert!(
                new.is_empty(),
                "{}: files appeared in the test's dir (IPAM dataDir, log, cwd): {new:?}",
                case.what
            );
        }));
        if let Err(e) = result {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            failures.push(msg);
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} hostile cases failed on {backend:?}:\n\n{}",
        failures.len(),
        table.len(),
        failures.join("\n\n")
    );
}

#[test]
fn hostile_input_is_refused_and_creates_nothing_linux_bridge() {
    hostile_table(Backend::Linux);
}

#[test]
fn hostile_input_is_refused_and_creates_nothing_ovs() {
    hostile_table(Backend::Ovs);
}

/// GC's own input: a malformed attachment list is a config error, and GC
/// removes nothing because of it.
#[test]
fn gc_with_malformed_attachment_list_is_error_7() {
    let f = Fixture::new(Backend::Linux);
    let c = f.conf();
    let pod = Pod::new();
    f.add_ok(&pod, &c);
    let before = f.leaks(&[&pod.ns]);
    for bad in [
        json!("all"),
        json!([{"containerID": 5, "ifname": "eth0"}]),
        json!([{"ifname": "eth0"}]),
        json!({"containerID": "x"}),
    ] {
        let config = c
            .clone()
            .set("cni.dev/valid-attachments", bad.clone())
            .json();
        let out = f.run("GC", "", None, "", &config);
        out.expect_error_code(&format!("GC with attachments {bad}"), 7);
        assert!(out.error_text().contains("valid-attachments"), "{out}");
        before.assert_no_leaks(&f.leaks(&[&pod.ns]), &format!("GC with {bad}"));
    }
}
