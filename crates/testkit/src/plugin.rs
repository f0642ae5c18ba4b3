//! Runs a CNI plugin binary the way a container runtime (libcni) does, and
//! inspects what it left behind.
//!
//! Everything here acts inside namespaces the caller created: the plugin is
//! started inside a node netns, pods are their own netns, and the IPAM data
//! directory is always given explicitly (never host-local's default
//! `/var/lib/cni`), so tests can run in parallel and never touch the machine.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use crate::netns::Netns;

/// Re-exported so that tests using this runner need no dependency of their
/// own to hold a per-test IPAM `dataDir`.
pub use tempfile::TempDir;

/// A fresh temp dir (removed on drop) for one test's IPAM data and logs.
pub fn test_dir(prefix: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .unwrap_or_else(|e| panic!("tempdir: {e}"))
}

/// Where Debian's containernetworking-plugins (host-local, bridge) live.
pub const CNI_PLUGIN_DIR: &str = "/usr/lib/cni";

/// The PATH a runtime typically passes on; the plugin gets nothing else from
/// the test process's environment.
pub const RUNTIME_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A plugin that has not answered by then is hung: kill it rather than the
/// whole test run.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Every CNI spec version the evio contract supports.
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// IPv4 pod network of a simulated node: the pod CIDR is the subnet (pods get
/// its /16 prefix), the node's share is 10.244.3.0/24 with gateway .1.
pub const POD_CIDR4: &str = "10.244.0.0/16";
pub const GATEWAY4: &str = "10.244.3.1";
pub const RANGE4_START: &str = "10.244.3.2";
pub const RANGE4_END: &str = "10.244.3.254";

/// IPv6 counterpart of the above.
pub const POD_CIDR6: &str = "fd10:244::/64";
pub const GATEWAY6: &str = "fd10:244::3:1";
pub const RANGE6_START: &str = "fd10:244::3:2";
pub const RANGE6_END: &str = "fd10:244::3:ff";

/// What one plugin invocation produced.
#[derive(Debug, Clone)]
pub struct CniOutput {
    /// Exit code; 128 + signal when killed by a signal, -1 on timeout.
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    /// stdout parsed as one JSON document; `None` when empty or not JSON
    /// (the spec allows nothing but the result or error on stdout).
    pub json: Option<Value>,
    pub timed_out: bool,
}

impl fmt::Display for CniOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "exit code {}{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code,
            if self.timed_out { " (timed out)" } else { "" },
            self.stdout,
            self.stderr
        )
    }
}

impl CniOutput {
    pub fn success(&self) -> bool {
        self.code == 0 && !self.timed_out
    }

    /// The `code` of an error JSON on stdout, if any.
    pub fn error_code(&self) -> Option<u64> {
        self.json.as_ref()?.get("code")?.as_u64()
    }

    /// Panics (with the full output) unless the plugin exited 0 and stdout is
    /// empty or exactly one JSON document. Returns that document or Null.
    pub fn expect_success(&self, what: &str) -> Value {
        assert!(self.success(), "{what}: expected success, got {self}");
        if self.stdout.trim().is_empty() {
            return Value::Null;
        }
        match &self.json {
            Some(v) => v.clone(),
            None => panic!("{what}: stdout is not one JSON document: {self}"),
        }
    }

    /// Panics unless the plugin failed the way the spec says a plugin fails:
    /// non-zero exit and an error JSON `{cniVersion, code, msg}` on stdout
    /// whose code matches the exit's intent. Returns the error code.
    pub fn expect_error(&self, what: &str) -> u64 {
        assert!(!self.timed_out, "{what}: plugin timed out: {self}");
        assert_ne!(self.code, 0, "{what}: expected failure, got {self}");
        assert!(
            self.code < 128,
            "{what}: plugin died from a signal (panic/abort?): {self}"
        );
        let Some(v) = &self.json else {
            panic!("{what}: error output on stdout is not one JSON document: {self}")
        };
        let code = v
            .get("code")
            .and_then(Value::as_u64)
            .unwrap_or_else(|| panic!("{what}: error JSON has no numeric code: {self}"));
        assert!(
            v.get("msg")
                .and_then(Value::as_str)
                .is_some_and(|m| !m.is_empty()),
            "{what}: error JSON has no msg: {self}"
        );
        assert!(
            v.get("cniVersion").and_then(Value::as_str).is_some(),
            "{what}: error JSON has no cniVersion: {self}"
        );
        code
    }

    /// Like [`expect_error`](Self::expect_error) and also checks the code.
    pub fn expect_error_code(&self, what: &str, want: u64) {
        let code = self.expect_error(what);
        assert_eq!(code, want, "{what}: wrong error code: {self}");
    }

    /// msg and details of an error, lower-cased, for "names the key" checks.
    pub fn error_text(&self) -> String {
        let Some(v) = &self.json else {
            return String::new();
        };
        let msg = v.get("msg").and_then(Value::as_str).unwrap_or("");
        let details = v.get("details").and_then(Value::as_str).unwrap_or("");
        format!("{msg} {details}").to_lowercase()
    }
}

/// Executes a CNI plugin binary exactly as a runtime does: inside the node's
/// netns, with the environment cleared except PATH and the six `CNI_*`
/// variables, the network config on stdin, bounded by a timeout.
pub struct Cni<'a> {
    pub bin: PathBuf,
    /// `CNI_PATH`: where the plugin finds its delegated IPAM plugin.
    pub cni_path: String,
    pub node: &'a Netns,
    pub timeout: Duration,
}

impl<'a> Cni<'a> {
    /// `CNI_PATH` is the plugin's own directory plus [`CNI_PLUGIN_DIR`]
    /// (host-local), as a node's runtime would be configured.
    pub fn new(bin: impl Into<PathBuf>, node: &'a Netns) -> Cni<'a> {
        let bin = bin.into();
        let dir = bin
            .parent()
            .map(|d| d.display().to_string())
            .unwrap_or_default();
        Cni {
            cni_path: format!("{dir}:{CNI_PLUGIN_DIR}"),
            bin,
            node,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Runs `cmd` the way libcni does: all six variables are always set,
    /// empty when the runtime has no value (GC and STATUS have no container),
    /// which the spec's library treats as missing.
    pub fn run(
        &self,
        cmd: &str,
        container_id: &str,
        netns_path: Option<&Path>,
        ifname: &str,
        args: Option<&str>,
        config: &Value,
    ) -> CniOutput {
        let netns = netns_path
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let env = [
            ("CNI_COMMAND", cmd),
            ("CNI_CONTAINERID", container_id),
            ("CNI_NETNS", netns.as_str()),
            ("CNI_IFNAME", ifname),
            ("CNI_ARGS", args.unwrap_or("")),
            ("CNI_PATH", self.cni_path.as_str()),
        ];
        self.run_env(&env, config.to_string().as_bytes())
    }

    /// Runs the plugin with exactly `env` (plus PATH) and `stdin`: for tests
    /// of missing or malformed variables and undecodable input.
    pub fn run_env(&self, env: &[(&str, &str)], stdin: &[u8]) -> CniOutput {
        let bin = self.bin.display().to_string();
        let mut cmd = self.node.command(&[&bin]);
        cmd.env_clear().env("PATH", RUNTIME_PATH);
        for (k, v) in env {
            cmd.env(k, v);
        }
        run_bounded(cmd, stdin, self.timeout)
    }

    /// `VERSION` with only `CNI_COMMAND` set, as the spec allows.
    pub fn version(&self, cni_version: &str) -> CniOutput {
        self.run_env(
            &[("CNI_COMMAND", "VERSION")],
            json!({ "cniVersion": cni_version }).to_string().as_bytes(),
        )
    }
}

/// Spawns `cmd` in its own process group, feeds `stdin`, collects output,
/// and kills the whole group if it outlives `timeout` (a plugin's delegated
/// IPAM child included).
pub fn run_bounded(mut cmd: Command, stdin: &[u8], timeout: Duration) -> CniOutput {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let pgid = child.id() as i32;

    let input = stdin.to_vec();
    let mut child_stdin = child.stdin.take();
    // A plugin that exits without reading stdin makes this write fail with
    // EPIPE; that is the plugin's business, not a harness error.
    let writer = std::thread::spawn(move || {
        if let Some(mut s) = child_stdin.take() {
            let _ = s.write_all(&input);
        }
    });
    let out_rx = drain(child.stdout.take());
    let err_rx = drain(child.stderr.take());

    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if Instant::now() >= deadline => {
                timed_out = true;
                // Not yet reaped, so the group id is still certainly ours.
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pgid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                break child.wait().ok();
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("wait for {cmd:?}: {e}"),
        }
    };
    let _ = writer.join();
    // A leftover grandchild holding the pipes open would block reads forever.
    let grace = Duration::from_secs(5);
    let stdout = out_rx
        .recv_timeout(grace)
        .unwrap_or_else(|_| b"<stdout still held open by a leftover process>".to_vec());
    let stderr = err_rx
        .recv_timeout(grace)
        .unwrap_or_else(|_| b"<stderr still held open by a leftover process>".to_vec());
    let code = match status {
        _ if timed_out => -1,
        Some(st) => st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0)),
        None => -1,
    };
    let stdout = String::from_utf8_lossy(&stdout).into_owned();
    let json = if stdout.trim().is_empty() {
        None
    } else {
        serde_json::from_str(stdout.trim()).ok()
    };
    CniOutput {
        code,
        stdout,
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
        json,
        timed_out,
    }
}

fn drain<R: Read + Send + 'static>(r: Option<R>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut r) = r {
            let _ = r.read_to_end(&mut buf);
        }
        let _ = tx.send(buf);
    });
    rx
}

static ID_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A container ID shaped like a runtime's (64 hex digits), unique across
/// parallel tests and test processes.
pub fn container_id() -> String {
    let n = ID_COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{:032x}{:016x}{:016x}",
        nanos,
        u64::from(std::process::id()),
        n
    )
}

/// A pod: its own netns plus the attachment identity (container ID, ifname)
/// the runtime passes to the plugin.
pub struct Pod {
    pub ns: Netns,
    pub id: String,
    pub ifname: String,
}

impl Pod {
    pub fn new() -> Pod {
        Pod::with_ifname("eth0")
    }

    pub fn with_ifname(ifname: &str) -> Pod {
        Pod {
            ns: Netns::new("evp"),
            id: container_id(),
            ifname: ifname.to_string(),
        }
    }

    /// `CNI_NETNS`.
    pub fn path(&self) -> PathBuf {
        self.ns.path()
    }

    /// `CNI_ARGS` as kubelet/CRI runtimes pass them.
    pub fn k8s_args(&self) -> String {
        format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={}",
            self.ns.name(),
            self.id
        )
    }
}

impl Default for Pod {
    fn default() -> Self {
        Pod::new()
    }
}

/// The IPv4 range of [`POD_CIDR4`] as host-local takes it.
pub fn range4() -> Value {
    json!({
        "subnet": POD_CIDR4,
        "rangeStart": RANGE4_START,
        "rangeEnd": RANGE4_END,
        "gateway": GATEWAY4,
    })
}

/// The IPv6 range of [`POD_CIDR6`] as host-local takes it.
pub fn range6() -> Value {
    json!({
        "subnet": POD_CIDR6,
        "rangeStart": RANGE6_START,
        "rangeEnd": RANGE6_END,
        "gateway": GATEWAY6,
    })
}

/// Builder for an evio network config (also usable for the reference
/// `bridge` plugin, which shares the keys). Holds JSON so that tests can also
/// set keys the builder does not know about, or invalid values.
#[derive(Debug, Clone)]
pub struct NetConf {
    conf: Map<String, Value>,
}

/// Starts a network config: `plugin_type` ("evio"), `cni_version`, network
/// `name`, `bridge`, and the host-local `data_dir` (always explicit: never
/// the shared /var/lib/cni). IPv4 only, gateway on the bridge.
pub fn conf(
    plugin_type: &str,
    cni_version: &str,
    name: &str,
    bridge: &str,
    data_dir: &Path,
) -> NetConf {
    let v = json!({
        "cniVersion": cni_version,
        "name": name,
        "type": plugin_type,
        "bridge": bridge,
        "isGateway": true,
        "ipam": {
            "type": "host-local",
            "dataDir": data_dir.display().to_string(),
            "ranges": [[range4()]],
        },
    });
    let Value::Object(conf) = v else {
        unreachable!("json! object literal")
    };
    NetConf { conf }
}

impl NetConf {
    /// Sets any top-level key.
    pub fn set(mut self, key: &str, value: Value) -> NetConf {
        self.conf.insert(key.to_string(), value);
        self
    }

    pub fn remove(mut self, key: &str) -> NetConf {
        self.conf.remove(key);
        self
    }

    /// Sets a key of the `ipam` object.
    pub fn set_ipam(mut self, key: &str, value: Value) -> NetConf {
        if let Some(Value::Object(ipam)) = self.conf.get_mut("ipam") {
            ipam.insert(key.to_string(), value);
        }
        self
    }

    pub fn version(self, v: &str) -> NetConf {
        self.set("cniVersion", json!(v))
    }

    pub fn name(self, v: &str) -> NetConf {
        self.set("name", json!(v))
    }

    pub fn bridge(self, v: &str) -> NetConf {
        self.set("bridge", json!(v))
    }

    /// `"linux"`, `"ovs"`, or the original spellings `"LXBR"` / `"OVS"`.
    pub fn bridge_type(self, v: &str) -> NetConf {
        self.set("bridgeType", json!(v))
    }

    pub fn ovsdb(self, endpoint: &str) -> NetConf {
        self.set("ovsdb", json!(endpoint))
    }

    pub fn is_gateway(self, on: bool) -> NetConf {
        self.set("isGateway", json!(on))
    }

    pub fn is_default_gateway(self, on: bool) -> NetConf {
        self.set("isDefaultGateway", json!(on))
    }

    pub fn ip_masq(self, on: bool) -> NetConf {
        self.set("ipMasq", json!(on))
    }

    pub fn mtu(self, mtu: u32) -> NetConf {
        self.set("mtu", json!(mtu))
    }

    pub fn hairpin_mode(self, on: bool) -> NetConf {
        self.set("hairpinMode", json!(on))
    }

    pub fn ipam_type(self, t: &str) -> NetConf {
        self.set_ipam("type", json!(t))
    }

    /// host-local `ranges`: one inner list per address family.
    pub fn ranges(self, ranges: Value) -> NetConf {
        self.set_ipam("ranges", ranges)
    }

    /// host-local `routes` (e.g. `[{"dst": "10.96.0.0/12"}]`).
    pub fn routes(self, routes: Value) -> NetConf {
        self.set_ipam("routes", routes)
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.conf.get(key)
    }

    pub fn json(&self) -> Value {
        Value::Object(self.conf.clone())
    }

    /// The config as a runtime sends it for CHECK/DEL: with `prevResult`.
    pub fn with_prev_result(&self, prev: &Value) -> Value {
        let mut c = self.conf.clone();
        c.insert("prevResult".into(), prev.clone());
        Value::Object(c)
    }

    /// The config as a runtime sends it for GC: with the attachments still
    /// valid under `key` (`cni.dev/valid-attachments`, or the older
    /// `cni.dev/attachments`).
    pub fn with_attachments(&self, key: &str, live: &[(&str, &str)]) -> Value {
        let list: Vec<Value> = live
            .iter()
            .map(|(id, ifname)| json!({ "containerID": id, "ifname": ifname }))
            .collect();
        let mut c = self.conf.clone();
        c.insert(key.into(), Value::Array(list));
        Value::Object(c)
    }
}

/// An OVS bridge whose ports [`Leaks`] should account for.
#[derive(Debug, Clone)]
pub struct OvsPorts {
    /// OVSDB endpoint as ovs-vsctl takes it, e.g. `unix:/tmp/x/db.sock`.
    pub db: String,
    pub bridge: String,
}

impl OvsPorts {
    /// The ports of `bridge` on a test's OVS instance.
    pub fn of(ovs: &crate::ovs::Ovs, bridge: &str) -> OvsPorts {
        OvsPorts {
            db: ovs.endpoint(),
            bridge: bridge.to_string(),
        }
    }

    pub fn list(&self) -> BTreeSet<String> {
        let out = Command::new("ovs-vsctl")
            .arg(format!("--db={}", self.db))
            .args(["--timeout=10", "list-ports", &self.bridge])
            .stdin(Stdio::null())
            .output();
        match out {
            // A bridge that does not exist (yet) has no ports.
            Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(str::to_string)
                .collect(),
            _ => BTreeSet::new(),
        }
    }
}

/// A snapshot of everything a plugin invocation can leave behind: links in
/// the node and in pods, host-local's files, the node's nftables ruleset and
/// the OVS bridge's ports. Take one before, one after, compare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leaks {
    pub node_links: BTreeSet<String>,
    pub pod_links: BTreeMap<String, BTreeSet<String>>,
    pub ipam_files: BTreeSet<String>,
    pub nft: String,
    pub ovs_ports: Option<BTreeSet<String>>,
}

impl Leaks {
    pub fn snapshot(
        node: &Netns,
        pods: &[&Netns],
        data_dir: &Path,
        ovs: Option<&OvsPorts>,
    ) -> Leaks {
        Leaks {
            node_links: node.links().into_iter().collect(),
            pod_links: pods
                .iter()
                .map(|p| (p.name().to_string(), p.links().into_iter().collect()))
                .collect(),
            ipam_files: files_under(data_dir),
            nft: nft_ruleset(node),
            ovs_ports: ovs.map(OvsPorts::list),
        }
    }

    /// Panics with a readable diff unless `after` equals this snapshot
    /// (`self` is the "before").
    pub fn assert_no_leaks(&self, after: &Leaks, what: &str) {
        let mut problems = Vec::new();
        diff_sets(
            "node links",
            &self.node_links,
            &after.node_links,
            &mut problems,
        );
        for (pod, before) in &self.pod_links {
            if let Some(now) = after.pod_links.get(pod) {
                diff_sets(&format!("links in pod {pod}"), before, now, &mut problems);
            }
        }
        diff_sets(
            "host-local files",
            &self.ipam_files,
            &after.ipam_files,
            &mut problems,
        );
        if self.nft != after.nft {
            problems.push(format!(
                "nft ruleset changed\n--- before ---\n{}\n--- after ---\n{}",
                self.nft, after.nft
            ));
        }
        if let (Some(b), Some(a)) = (&self.ovs_ports, &after.ovs_ports) {
            diff_sets("OVS ports", b, a, &mut problems);
        }
        assert!(
            problems.is_empty(),
            "{what}: leaked state:\n{}",
            problems.join("\n")
        );
    }
}

fn diff_sets(
    what: &str,
    before: &BTreeSet<String>,
    after: &BTreeSet<String>,
    out: &mut Vec<String>,
) {
    let added: Vec<_> = after.difference(before).collect();
    let removed: Vec<_> = before.difference(after).collect();
    if !added.is_empty() || !removed.is_empty() {
        out.push(format!("{what}: added {added:?}, removed {removed:?}"));
    }
}

/// Paths of all files under `dir`, relative to it (empty if `dir` is absent).
pub fn files_under(dir: &Path) -> BTreeSet<String> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeSet<String>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(base, &p, out);
            } else if let Ok(rel) = p.strip_prefix(base) {
                out.insert(rel.display().to_string());
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(dir, dir, &mut out);
    out
}

/// host-local's allocations for network `name`: the files named by an IP
/// under `<data_dir>/<name>/`, each holding `<containerID>\r\n<ifname>`.
pub fn ipam_allocations(data_dir: &Path, name: &str) -> BTreeMap<IpAddr, (String, String)> {
    let mut out = BTreeMap::new();
    let Ok(rd) = std::fs::read_dir(data_dir.join(name)) else {
        return out;
    };
    for e in rd.flatten() {
        let fname = e.file_name().to_string_lossy().into_owned();
        let Ok(ip) = fname.parse::<IpAddr>() else {
            continue;
        };
        let content = std::fs::read_to_string(e.path()).unwrap_or_default();
        let mut lines = content.split("\r\n").chain(std::iter::repeat(""));
        let id = lines.next().unwrap_or("").trim().to_string();
        let ifname = lines.next().unwrap_or("").trim().to_string();
        out.insert(ip, (id, ifname));
    }
    out
}

/// `nft list ruleset` in `ns`, with packet/byte counters blanked: counters
/// move with unrelated traffic and are not state.
pub fn nft_ruleset(ns: &Netns) -> String {
    let out = ns.exec(&["nft", "list", "ruleset"]);
    blank_counters(&String::from_utf8_lossy(&out.stdout))
}

/// Replaces every `counter packets N bytes M` with `counter`.
pub fn blank_counters(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("counter packets") {
            Some(i) => {
                // "counter packets N bytes M" is five tokens.
                let tail: Vec<&str> = l[i..].split_whitespace().skip(5).collect();
                format!("{}counter {}", &l[..i], tail.join(" "))
                    .trim_end()
                    .to_string()
            }
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `ip -j ARGS` in `ns`, parsed. Panics if ip fails.
pub fn ip_json(ns: &Netns, args: &[&str]) -> Value {
    let mut argv = vec!["ip", "-j"];
    argv.extend_from_slice(args);
    let out = ns.ok(&argv);
    if out.trim().is_empty() {
        return Value::Array(Vec::new());
    }
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("ip {args:?}: bad JSON ({e}): {out}"))
}

/// `ip -d link show dev NAME` as JSON, or None if no such link.
pub fn link(ns: &Netns, name: &str) -> Option<Value> {
    if !ns.has_link(name) {
        return None;
    }
    ip_json(ns, &["-d", "link", "show", "dev", name])
        .as_array()
        .and_then(|a| a.first().cloned())
}

/// One address of a link, as `ip -j addr` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addr {
    pub ip: IpAddr,
    pub prefix: u8,
    pub scope: String,
    /// DAD still running: the address cannot be used as a source yet.
    pub tentative: bool,
    pub dadfailed: bool,
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.ip, self.prefix)
    }
}

/// Addresses on link `dev` in `ns` (empty if the link does not exist).
pub fn addrs(ns: &Netns, dev: &str) -> Vec<Addr> {
    if !ns.has_link(dev) {
        return Vec::new();
    }
    let v = ip_json(ns, &["addr", "show", "dev", dev]);
    let mut out = Vec::new();
    for l in v.as_array().into_iter().flatten() {
        for a in l["addr_info"].as_array().into_iter().flatten() {
            let Some(ip) = a["local"].as_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            out.push(Addr {
                ip,
                prefix: a["prefixlen"].as_u64().unwrap_or(0) as u8,
                scope: a["scope"].as_str().unwrap_or("").to_string(),
                tentative: a["tentative"].as_bool().unwrap_or(false),
                dadfailed: a["dadfailed"].as_bool().unwrap_or(false),
            });
        }
    }
    out
}

/// Routes in `ns` for one family (`"-4"` or `"-6"`), as `ip -j route` JSON.
pub fn routes(ns: &Netns, family: &str) -> Vec<Value> {
    ip_json(ns, &[family, "route", "show"])
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// A `/proc/sys/...` value as seen from inside `ns` (the net sysctls are
/// per namespace), e.g. `sysctl(ns, "net/ipv4/ip_forward")`.
pub fn sysctl(ns: &Netns, key: &str) -> String {
    ns.ok(&["cat", &format!("/proc/sys/{key}")])
        .trim()
        .to_string()
}

/// Whether `dst` answers ICMP echo from `ns`: three echoes 0.2 s apart, each
/// waited for at most 2 s, and any answer counts. A single echo made the
/// simulated cluster's matrix flaky: with every pod probing at once, three
/// userspace-datapath vswitchds on two cores occasionally drop one packet
/// (the TCP probe right after, which retransmits, always passed). A wrong
/// path (stale neighbour entry, missing route) still fails all three.
pub fn ping(ns: &Netns, dst: &str) -> bool {
    ns.exec(&["ping", "-n", "-q", "-c", "3", "-i", "0.2", "-W", "2", dst])
        .status
        .success()
}

/// Runs `f` on a fresh thread that has entered `ns` and does nothing else,
/// so sockets it creates live in that namespace.
pub fn in_netns<T: Send + 'static>(
    ns_path: PathBuf,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<Result<T, String>> {
    std::thread::spawn(move || {
        let file = File::open(&ns_path).map_err(|e| format!("open {}: {e}", ns_path.display()))?;
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("setns {}: {e}", ns_path.display()))?;
        Ok(f())
    })
}

/// A TCP round trip: an echo server listening on `server_ip` inside
/// `server`, a client inside `client` sending 256 KiB (many full-size
/// segments, so checksum/offload problems show) and checking the echo. Every
/// step is bounded; the error says which step failed.
pub fn tcp_roundtrip(server: &Netns, server_ip: IpAddr, client: &Netns) -> Result<(), String> {
    tcp_roundtrip_n(server, server_ip, client, 256 * 1024)
}

/// [`tcp_roundtrip`] with `bytes` echoed.
pub fn tcp_roundtrip_n(
    server: &Netns,
    server_ip: IpAddr,
    client: &Netns,
    bytes: usize,
) -> Result<(), String> {
    const STEP: Duration = Duration::from_secs(10);
    let payload: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
    let (port_tx, port_rx) = mpsc::channel::<Result<u16, String>>();

    let srv = in_netns(server.path(), move || -> Result<(), String> {
        let listener = match TcpListener::bind(SocketAddr::new(server_ip, 0)) {
            Ok(l) => l,
            Err(e) => {
                let _ = port_tx.send(Err(format!("bind {server_ip}: {e}")));
                return Err(format!("bind {server_ip}: {e}"));
            }
        };
        let port = listener.local_addr().map_err(|e| e.to_string())?.port();
        let _ = port_tx.send(Ok(port));
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + STEP;
        let mut conn = loop {
            match listener.accept() {
                Ok((c, _)) => break c,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err("server: no connection within 10 s".into());
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(format!("server accept: {e}")),
            }
        };
        conn.set_nonblocking(false).map_err(|e| e.to_string())?;
        conn.set_read_timeout(Some(STEP))
            .map_err(|e| e.to_string())?;
        conn.set_write_timeout(Some(STEP))
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        conn.read_to_end(&mut buf)
            .map_err(|e| format!("server read: {e}"))?;
        conn.write_all(&buf)
            .map_err(|e| format!("server write: {e}"))?;
        Ok(())
    });

    let port = match port_rx.recv_timeout(STEP) {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            let r = srv.join();
            return Err(format!("server did not start: {r:?}"));
        }
    };
    let expect = payload.clone();
    let cli = in_netns(client.path(), move || -> Result<(), String> {
        let dst = SocketAddr::new(server_ip, port);
        let mut s = TcpStream::connect_timeout(&dst, STEP)
            .map_err(|e| format!("client connect {dst}: {e}"))?;
        s.set_read_timeout(Some(STEP)).map_err(|e| e.to_string())?;
        s.set_write_timeout(Some(STEP)).map_err(|e| e.to_string())?;
        s.write_all(&payload)
            .map_err(|e| format!("client write: {e}"))?;
        s.shutdown(std::net::Shutdown::Write)
            .map_err(|e| format!("client shutdown: {e}"))?;
        let mut back = Vec::new();
        s.read_to_end(&mut back)
            .map_err(|e| format!("client read: {e}"))?;
        if back != expect {
            return Err(format!(
                "echo differs: sent {} bytes, got {}",
                expect.len(),
                back.len()
            ));
        }
        Ok(())
    });
    let c = cli
        .join()
        .map_err(|_| "client thread panicked".to_string())?;
    let s = srv
        .join()
        .map_err(|_| "server thread panicked".to_string())?;
    c.and_then(|r| r)?;
    s.and_then(|r| r)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_bounded_kills_a_hung_program_and_reports_timeout() {
        let mut c = Command::new("sleep");
        c.arg("30");
        let t = Instant::now();
        let out = run_bounded(c, b"", Duration::from_millis(300));
        assert!(out.timed_out, "{out}");
        assert_eq!(out.code, -1);
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn run_bounded_passes_stdin_and_collects_stdout_json() {
        let c = Command::new("cat");
        let out = run_bounded(c, br#"{"a": 1}"#, DEFAULT_TIMEOUT);
        assert!(out.success(), "{out}");
        assert_eq!(out.json, Some(json!({"a": 1})));
    }

    #[test]
    fn expect_error_accepts_a_spec_error_and_returns_its_code() {
        let out = CniOutput {
            code: 1,
            stdout: r#"{"cniVersion":"1.1.0","code":7,"msg":"bad"}"#.into(),
            stderr: String::new(),
            json: Some(json!({"cniVersion":"1.1.0","code":7,"msg":"bad"})),
            timed_out: false,
        };
        assert_eq!(out.expect_error("x"), 7);
    }

    #[test]
    #[should_panic(expected = "no msg")]
    fn expect_error_rejects_an_error_without_msg() {
        let out = CniOutput {
            code: 1,
            stdout: String::new(),
            stderr: String::new(),
            json: Some(json!({"cniVersion":"1.1.0","code":7})),
            timed_out: false,
        };
        out.expect_error("x");
    }

    #[test]
    fn nft_counters_are_blanked() {
        let text = "table ip t {\n\tip saddr 10.0.0.0/8 counter packets 12 bytes 3400 masquerade\n\tcounter packets 1 bytes 2\n}";
        assert_eq!(
            blank_counters(text),
            "table ip t {\n\tip saddr 10.0.0.0/8 counter masquerade\n\tcounter\n}"
        );
    }

    #[test]
    fn ipam_allocations_parse_host_local_files() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let net = dir.path().join("n1");
        std::fs::create_dir_all(&net).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(net.join("10.244.3.2"), "abc\r\neth0").unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(net.join("lock"), "").unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(net.join("last_reserved_ip.0"), "10.244.3.2")
            .unwrap_or_else(|e| panic!("{e}"));
        let a = ipam_allocations(dir.path(), "n1");
        assert_eq!(a.len(), 1);
        let ip: IpAddr = "10.244.3.2".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.get(&ip), Some(&("abc".to_string(), "eth0".to_string())));
    }
}
