//! deploy/systemd: the agent's unit, the kubelet drop-in and the host's
//! net-conf.json, parsed (a small INI reader with systemd's list rules) and
//! checked against each other, against the built `evio-node` (every flag
//! the unit passes exists) and against `systemd-analyze verify`. The last
//! test runs the built agent under the unit's own sandbox settings
//! (capability bounding set, no_new_privs, a read-only file system but for
//! ReadWritePaths) in a network namespace it creates, as ExecStart,
//! ExecStartPost and KillSignal would.
// Test support: a harness that unwraps fails the test that called it, loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(30);
const UNIT: &str = "systemd/evio-agent.service";
const DROP_IN: &str = "systemd/kubelet.service.d/10-evio.conf";
const HOST_CONF: &str = "systemd/net-conf.json";
const ENV_FILE: &str = "systemd/evio-agent.env";
/// The agent exits within 5 s of SIGTERM (OVERLAY.md), keeping the node on
/// the network.
const AGENT_CLEANUP_SECS: u64 = 5;

/// A unit file: sections in order, each with its assignments in order.
struct UnitFile {
    sections: Vec<(String, Vec<(String, String)>)>,
}

impl UnitFile {
    fn parse(text: &str) -> Result<UnitFile, String> {
        let mut sections: Vec<(String, Vec<(String, String)>)> = Vec::new();
        for (n, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            if line.ends_with('\\') {
                return Err(format!(
                    "line {}: continuation lines are not used here",
                    n + 1
                ));
            }
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                sections.push((name.to_string(), Vec::new()));
                continue;
            }
            let (k, v) = line
                .split_once('=')
                .ok_or_else(|| format!("line {}: not key=value: {line}", n + 1))?;
            let sec = sections
                .last_mut()
                .ok_or_else(|| format!("line {}: assignment before any section", n + 1))?;
            sec.1.push((k.trim().to_string(), v.trim().to_string()));
        }
        Ok(UnitFile { sections })
    }

    fn load(rel: &str) -> UnitFile {
        let text = std::fs::read_to_string(deploy_dir().join(rel)).expect("read unit file");
        UnitFile::parse(&text).unwrap_or_else(|e| panic!("{rel}: {e}"))
    }

    fn section_names(&self) -> Vec<&str> {
        self.sections.iter().map(|(n, _)| n.as_str()).collect()
    }

    fn values(&self, section: &str, key: &str) -> Vec<String> {
        self.sections
            .iter()
            .filter(|(n, _)| n == section)
            .flat_map(|(_, kv)| kv.iter())
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// A single-valued setting: the last assignment wins, as in systemd.
    fn one(&self, section: &str, key: &str) -> Option<String> {
        self.values(section, key).pop()
    }

    /// A list setting: assignments accumulate, an empty one resets.
    fn list(&self, section: &str, key: &str) -> Vec<String> {
        let mut out = Vec::new();
        for v in self.values(section, key) {
            if v.is_empty() {
                out.clear();
            }
            out.extend(v.split_whitespace().map(str::to_string));
        }
        out
    }

    fn yes(&self, section: &str, key: &str) -> bool {
        matches!(
            self.one(section, key).as_deref(),
            Some("yes" | "true" | "on" | "1")
        )
    }
}

/// A command line as systemd splits it (quotes, no shell), without the
/// special prefixes (`-`, `+`, `@`, `!`, `:`).
fn exec_argv(line: &str) -> Vec<String> {
    let line = line.trim_start_matches(['-', '+', '@', '!', ':']);
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut any = false;
    for ch in line.chars() {
        match (quote, ch) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '\'' | '"') => {
                quote = Some(ch);
                any = true;
            }
            (None, c) if c.is_whitespace() => {
                if any || !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            (None, c) => cur.push(c),
        }
    }
    assert!(quote.is_none(), "unbalanced quote in {line}");
    if any || !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn seconds(v: &str) -> u64 {
    let v = v.trim();
    v.strip_suffix('s')
        .unwrap_or(v)
        .parse()
        .unwrap_or_else(|_| panic!("{v}: expected plain seconds"))
}

fn exec_start(u: &UnitFile) -> Vec<String> {
    let all = u.values("Service", "ExecStart");
    assert_eq!(all.len(), 1, "one ExecStart");
    exec_argv(&all[0])
}

/// ExecStartPost: `timeout N sh -c 'SCRIPT'`; (N, the script's words).
fn exec_start_post(u: &UnitFile) -> (u64, Vec<String>) {
    let all = u.values("Service", "ExecStartPost");
    assert_eq!(all.len(), 1, "one ExecStartPost (the wait for the agent)");
    let argv = exec_argv(&all[0]);
    assert!(
        argv[0].ends_with("/timeout") && argv[2].ends_with("/sh") && argv[3] == "-c",
        "ExecStartPost is `timeout N sh -c SCRIPT`: {argv:?}"
    );
    (seconds(&argv[1]), exec_argv(&argv[4]))
}

/// The `--control-socket` the ExecStartPost script waits on.
fn waited_socket(u: &UnitFile) -> String {
    let (_, script) = exec_start_post(u);
    let i = script
        .iter()
        .position(|w| w == "--control-socket")
        .expect("the wait names the control socket");
    script[i + 1].clone()
}

fn host_conf() -> Value {
    let text = std::fs::read_to_string(deploy_dir().join(HOST_CONF)).expect("read");
    serde_json::from_str(&text).expect("host net-conf.json is JSON")
}

fn under(path: &str, dir: &str) -> bool {
    let dir = dir.trim_end_matches('/');
    path == dir || path.starts_with(&format!("{dir}/"))
}

#[test]
fn unit_files_parse_with_known_sections_only() {
    let u = UnitFile::load(UNIT);
    assert_eq!(u.section_names(), ["Unit", "Service", "Install"]);
    let d = UnitFile::load(DROP_IN);
    assert_eq!(d.section_names(), ["Unit"], "the drop-in only orders");
    assert!(UnitFile::parse("Key=v\n").is_err());
    assert!(UnitFile::parse("[Unit]\nnot an assignment\n").is_err());
    let l = UnitFile::parse("[S]\nA=x y\nA=z\nA=\nA=w\n").expect("parses");
    assert_eq!(l.list("S", "A"), ["w"]);
    assert_eq!(l.one("S", "A").as_deref(), Some("w"));
    assert_eq!(
        exec_argv(r#"-/bin/sh -c 'a "b" c' d"#),
        ["/bin/sh", "-c", r#"a "b" c"#, "d"]
    );
}

#[test]
fn agent_starts_after_the_network_and_ovs_and_before_the_kubelet() {
    let u = UnitFile::load(UNIT);
    let after = u.list("Unit", "After");
    for want in ["network-online.target", "openvswitch-switch.service"] {
        assert!(
            after.iter().any(|a| a == want),
            "After= lacks {want}: {after:?}"
        );
    }
    assert!(u
        .list("Unit", "Wants")
        .contains(&"network-online.target".to_string()));
    assert!(u
        .list("Unit", "Before")
        .contains(&"kubelet.service".to_string()));
    assert_eq!(u.list("Install", "WantedBy"), ["multi-user.target"]);
}

#[test]
fn kubelet_drop_in_pulls_in_and_follows_the_agent() {
    let unit_name = Path::new(UNIT)
        .file_name()
        .and_then(|n| n.to_str())
        .expect("name")
        .to_string();
    let dir = Path::new(DROP_IN).parent().and_then(|p| p.file_name());
    assert_eq!(dir.and_then(|d| d.to_str()), Some("kubelet.service.d"));
    let d = UnitFile::load(DROP_IN);
    assert!(
        d.list("Unit", "After").contains(&unit_name),
        "After={unit_name}"
    );
    assert!(
        d.list("Unit", "Wants").contains(&unit_name),
        "Wants={unit_name}"
    );
    // Wants, not Requires/BindsTo: an agent restart must not stop the kubelet.
    for k in ["Requires", "BindsTo", "PartOf", "Requisite"] {
        assert!(
            d.values("Unit", k).is_empty(),
            "{k}= would tie the kubelet to the agent"
        );
    }
}

#[test]
fn service_runs_the_agent_in_the_foreground_restarts_it_and_bounds_its_stop() {
    let u = UnitFile::load(UNIT);
    // The agent does not implement sd_notify.
    assert_eq!(u.one("Service", "Type").as_deref(), Some("simple"));
    assert_eq!(
        exec_start(&u),
        [
            "/usr/local/bin/evio-node",
            "agent",
            "--config",
            "/etc/evio/net-conf.json"
        ]
    );
    assert_eq!(u.one("Service", "Restart").as_deref(), Some("always"));
    assert!(seconds(&u.one("Service", "RestartSec").expect("RestartSec")) > 0);
    assert_eq!(u.one("Service", "KillSignal").as_deref(), Some("SIGTERM"));
    let stop = seconds(&u.one("Service", "TimeoutStopSec").expect("TimeoutStopSec"));
    assert!(
        stop >= 2 * AGENT_CLEANUP_SECS,
        "TimeoutStopSec {stop} leaves no margin over the agent's {AGENT_CLEANUP_SECS} s cleanup"
    );
    // The wait for the agent fits in the start timeout, and it waits on
    // the agent's own command (not on a socket file a killed agent left).
    let (wait, script) = exec_start_post(&u);
    let start = seconds(
        &u.one("Service", "TimeoutStartSec")
            .expect("TimeoutStartSec"),
    );
    assert!(
        wait < start,
        "ExecStartPost waits {wait} s, TimeoutStartSec is {start}"
    );
    assert!(
        script.iter().any(|w| w == exec_start(&u)[0].as_str()) && script.contains(&"peers".into()),
        "{script:?}"
    );
    assert!(
        u.values("Service", "ExecStartPost")[0].find('$').is_none(),
        "systemd expands $ in Exec lines: keep the shell free of variables"
    );
    assert_eq!(
        u.one("Service", "EnvironmentFile").as_deref(),
        Some("-/etc/default/evio-agent"),
        "optional environment file"
    );
}

#[test]
fn sandbox_keeps_what_the_agent_needs() {
    let u = UnitFile::load(UNIT);
    let s = "Service";
    assert_eq!(u.list(s, "CapabilityBoundingSet"), ["CAP_NET_ADMIN"]);
    assert!(u.list(s, "AmbientCapabilities").is_empty());
    assert!(matches!(u.one(s, "User").as_deref(), None | Some("root")));
    assert!(u.yes(s, "NoNewPrivileges"));
    assert_eq!(u.one(s, "ProtectSystem").as_deref(), Some("strict"));
    assert!(u.yes(s, "ProtectHome"));
    // It writes net.ipv4.ip_forward (and IPv6 sysctls) under /proc/sys.
    assert!(
        !u.yes(s, "ProtectKernelTunables"),
        "would make /proc/sys read-only"
    );
    assert_ne!(
        u.one(s, "ProcSubset").as_deref(),
        Some("pid"),
        "would hide /proc/sys"
    );
    // It opens /dev/net/tun.
    assert!(!u.yes(s, "PrivateDevices"), "would hide /dev/net/tun");
    if matches!(
        u.one(s, "DevicePolicy").as_deref(),
        Some("closed" | "strict")
    ) {
        let allow = u.values(s, "DeviceAllow");
        assert!(allow.iter().any(|a| a == "/dev/net/tun rw"), "{allow:?}");
    }
    // It is the host's network: host namespace, any address.
    assert!(!u.yes(s, "PrivateNetwork"));
    assert!(
        !u.yes(s, "PrivateUsers"),
        "capabilities must hold in the host's namespace"
    );
    assert!(u.values(s, "IPAddressDeny").is_empty());
    let fams: BTreeSet<String> = u.list(s, "RestrictAddressFamilies").into_iter().collect();
    if !fams.is_empty() {
        for f in ["AF_UNIX", "AF_NETLINK", "AF_INET"] {
            assert!(fams.contains(f), "RestrictAddressFamilies lacks {f}");
        }
    }
    // /run/evio survives a stop: evio-cni's run container has it mounted.
    assert!(u.yes(s, "RuntimeDirectoryPreserve"));
}

/// Where the unit lets the agent write: ReadWritePaths plus the
/// StateDirectory/RuntimeDirectory systemd creates writable.
fn writable(u: &UnitFile) -> (Vec<String>, Vec<String>) {
    let rw: Vec<String> = u
        .list("Service", "ReadWritePaths")
        .into_iter()
        .map(|p| p.trim_start_matches(['-', '+']).to_string())
        .collect();
    let mut all = rw.clone();
    all.extend(
        u.list("Service", "StateDirectory")
            .iter()
            .map(|d| format!("/var/lib/{d}")),
    );
    all.extend(
        u.list("Service", "RuntimeDirectory")
            .iter()
            .map(|d| format!("/run/{d}")),
    );
    (rw, all)
}

/// Files the agent creates or writes with `conf`: its key, the file
/// store, its control socket.
fn agent_writes(conf: &Value, socket: &str) -> Vec<(String, String)> {
    let mut w = vec![
        (
            "overlay.keyFile".to_string(),
            conf["overlay"]["keyFile"]
                .as_str()
                .unwrap_or("/var/lib/evio/agent.key")
                .to_string(),
        ),
        ("control socket".to_string(), socket.to_string()),
    ];
    if let Some(s) = conf["dataStore"].as_str() {
        if let Ok(evio_subnet::StoreUrl::File(p)) = evio_subnet::StoreUrl::parse(s) {
            w.push(("dataStore".into(), p.display().to_string()));
        }
    }
    w
}

#[test]
fn writable_paths_are_exactly_what_the_host_config_writes_and_secrets_are_read_only() {
    let u = UnitFile::load(UNIT);
    let (rw, all_rw) = writable(&u);
    let socket = waited_socket(&u);
    let docs = load_manifests();
    let shipped: Value = docs
        .iter()
        .find_map(|d| match &d.object {
            Object::ConfigMap(cm) => cm.data.as_ref()?.get("net-conf.json").cloned(),
            _ => None,
        })
        .map(|t| serde_json::from_str(&t).expect("JSON"))
        .expect("ConfigMap net-conf.json");
    let mut used = BTreeSet::new();
    // The host example, and the ConfigMap (which is the same file with the
    // file store) as it would be used on a host.
    for (what, conf) in [("host example", host_conf()), ("ConfigMap", shipped)] {
        for (k, p) in agent_writes(&conf, &socket) {
            let dir = rw.iter().find(|d| under(&p, d));
            assert!(
                dir.is_some(),
                "{what}: {k} = {p} is not under ReadWritePaths {rw:?}"
            );
            used.insert(dir.cloned().unwrap_or_default());
        }
        // What it only reads (its config, secrets) is not writable, and
        // lives under /etc/evio, where the bootstrap puts it.
        let mut reads = vec![exec_start(&u)[3].clone()];
        for k in [
            "etcdCACert",
            "etcdCert",
            "etcdKey",
            "etcdUsernameFile",
            "etcdPasswordFile",
        ] {
            reads.extend(conf[k].as_str().map(str::to_string));
        }
        reads.extend(
            conf["overlay"]["networkKeyFile"]
                .as_str()
                .map(str::to_string),
        );
        for t in conf["overlay"]["turn"].as_array().into_iter().flatten() {
            reads.extend(t["passwordFile"].as_str().map(str::to_string));
        }
        for p in reads {
            assert!(under(&p, "/etc/evio"), "{what}: {p} outside /etc/evio");
            assert!(
                !all_rw.iter().any(|d| under(&p, d)),
                "{what}: {p} (read-only input) is writable"
            );
        }
    }
    for d in &rw {
        assert!(
            used.contains(d),
            "ReadWritePaths {d} is never written: drop it"
        );
    }
}

/// `--help` of a subcommand of the built binary.
fn help(bin: &Path, sub: &str) -> String {
    let r = run_bounded(Command::new(bin).args([sub, "--help"]), None, LIMIT);
    assert!(r.ok(), "evio-node {sub} --help: {}", r.stderr);
    r.stdout
}

fn listed(help: &str, flag: &str) -> bool {
    help.split_whitespace()
        .any(|w| w.trim_end_matches(',') == flag || w.starts_with(&format!("{flag}=")))
}

/// The `[default: ...]` clap prints for `flag`.
fn default_of(help: &str, flag: &str) -> Option<String> {
    let at = help.find(&format!("{flag} "))?;
    let rest = &help[at..];
    let end = rest.find("\n  -").unwrap_or(rest.len());
    let block = &rest[..end];
    let d = block.split("[default: ").nth(1)?;
    Some(d.split(']').next()?.to_string())
}

#[test]
fn every_flag_the_unit_passes_exists_in_the_built_evio_node() {
    let bin = require_bin("evio-node", "evio-node");
    let u = UnitFile::load(UNIT);
    let argv = exec_start(&u);
    assert!(argv[0].ends_with("/evio-node"));
    let agent = help(&bin, &argv[1]);
    for f in argv.iter().filter(|a| a.starts_with("--")) {
        assert!(
            listed(&agent, f),
            "`evio-node {}` has no {f}:\n{agent}",
            argv[1]
        );
    }
    let (_, script) = exec_start_post(&u);
    let at = script
        .iter()
        .position(|w| w.ends_with("/evio-node"))
        .expect("the wait runs evio-node");
    let sub = &script[at + 1];
    let peers = help(&bin, sub);
    for f in script[at + 2..]
        .iter()
        .take_while(|w| w.starts_with("--") || !w.starts_with('>'))
    {
        if f.starts_with("--") {
            assert!(listed(&peers, f), "`evio-node {sub}` has no {f}:\n{peers}");
        }
    }
    // The socket the unit waits on is where the agent binds by default,
    // where `peers` looks and where evio-cni's `run` looks.
    let socket = waited_socket(&u);
    assert!(
        !argv.contains(&"--control-socket".to_string()),
        "ExecStart uses the default"
    );
    assert_eq!(
        default_of(&agent, "--control-socket").as_deref(),
        Some(socket.as_str())
    );
    assert_eq!(
        default_of(&peers, "--control-socket").as_deref(),
        Some(socket.as_str())
    );
    let run = help(&bin, "run");
    assert!(run.contains(&socket), "`run --help` names {socket}:\n{run}");
    // The environment file sets what the agent reads.
    let env = std::fs::read_to_string(deploy_dir().join(ENV_FILE)).expect("read env file");
    assert!(env.contains("NODE_NAME=") && agent.contains("$NODE_NAME"));
    assert!(env.contains("EVIO_LOG="));
}

/// `systemd-analyze verify` on the unit and the drop-in, in a scratch root
/// with the built binary where ExecStart expects it and stub targets.
#[test]
fn systemd_analyze_verify_accepts_the_unit_and_the_drop_in() {
    let bin = require_bin("evio-node", "evio-node");
    let have = Command::new("systemd-analyze").arg("--version").output();
    assert!(
        have.is_ok_and(|o| o.status.success()),
        "systemd-analyze is required (Debian package systemd; .ci/install-deps installs it)"
    );
    let root = tempfile::tempdir().expect("tempdir");
    let r = root.path();
    let put = |rel: &str, text: &[u8]| {
        let p = r.join(rel.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().expect("dir")).expect("mkdir");
        std::fs::write(&p, text).expect("write");
    };
    let read = |rel: &str| std::fs::read(deploy_dir().join(rel)).expect("read");
    put("etc/systemd/system/evio-agent.service", &read(UNIT));
    put(
        "etc/systemd/system/kubelet.service.d/10-evio.conf",
        &read(DROP_IN),
    );
    put(
        "etc/systemd/system/kubelet.service",
        b"[Service]\nExecStart=/usr/bin/timeout 1 /bin/sh\n",
    );
    for t in [
        "sysinit.target",
        "basic.target",
        "shutdown.target",
        "network-online.target",
        "multi-user.target",
    ] {
        put(
            &format!("usr/lib/systemd/system/{t}"),
            b"[Unit]\nDescription=stub\n",
        );
    }
    let u = UnitFile::load(UNIT);
    let mut exes = vec![exec_start(&u)[0].clone()];
    let post = exec_argv(&u.values("Service", "ExecStartPost")[0]);
    exes.push(post[0].clone());
    exes.push(post[2].clone());
    for exe in exes {
        let src = if exe.ends_with("/evio-node") {
            bin.clone()
        } else {
            PathBuf::from(&exe)
        };
        put(&exe, &std::fs::read(&src).expect("read executable"));
        let dst = r.join(exe.trim_start_matches('/'));
        std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let out = run_bounded(
        Command::new("systemd-analyze")
            .arg("verify")
            .arg(format!("--root={}", r.display()))
            .args(["evio-agent.service", "kubelet.service"]),
        None,
        LIMIT,
    );
    assert!(
        out.ok() && out.stdout.trim().is_empty() && out.stderr.trim().is_empty(),
        "systemd-analyze verify:\nstatus {}\n{}{}",
        out.status,
        out.stdout,
        out.stderr
    );
}

/// Deletes the namespace and kills what runs in it, whatever happens.
struct Netns(String);

impl Netns {
    fn new() -> Netns {
        let name = format!("evsd{}", std::process::id());
        let st = Command::new("ip").args(["netns", "add", &name]).status();
        assert!(
            st.is_ok_and(|s| s.success()),
            "ip netns add {name} (needs root)"
        );
        let ns = Netns(name);
        assert!(ns
            .cmd(&["ip", "link", "set", "lo", "up"])
            .status()
            .is_ok_and(|s| s.success()));
        ns
    }

    fn cmd(&self, argv: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.0))
            .arg("--")
            .args(argv);
        c
    }

    fn out(&self, argv: &[&str]) -> String {
        let o = self.cmd(argv).output().expect("run in netns");
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Ok(o) = Command::new("ip").args(["netns", "pids", &self.0]).output() {
            for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-KILL", pid]).status();
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Builds the sandbox script: ProtectSystem=strict (every mount read-only
/// but /dev, /proc, /sys) with ReadWritePaths writable, each on a private
/// tmpfs so nothing of the machine's is touched; the built binary at the
/// unit's ExecStart path; then the capability bounding set and
/// no_new_privs of the unit, applied by setpriv to "$@".
fn sandbox_script(rw: &[String], exe: &str, caps: &[String], nnp: bool) -> String {
    let mut s = String::from("set -e\n");
    let mut parents = BTreeSet::new();
    for p in rw.iter().map(String::as_str).chain([exe]) {
        let parent = Path::new(p).parent().expect("parent").display().to_string();
        if parents.insert(parent.clone()) {
            s += &format!("mount -t tmpfs evio-sandbox {parent}\n");
        }
    }
    for p in rw {
        s += &format!("mkdir -p {p}\n");
    }
    s += &format!("cp \"$EVIO_NODE\" {exe}\n");
    s += "for m in $(awk '{print $5}' /proc/self/mountinfo | sort -u); do\n\
          case $m in /proc|/proc/*|/sys|/sys/*|/dev|/dev/*) continue;; esac\n\
          mount -o remount,bind,ro \"$m\" 2>/dev/null || true\n\
          done\n";
    for p in rw {
        s += &format!("mount --bind {p} {p} && mount -o remount,bind,rw {p}\n");
    }
    let caps: Vec<String> = caps
        .iter()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_ascii_lowercase()))
        .collect();
    s += &format!(
        "exec setpriv --bounding-set=-all,{} --inh-caps=-all {} -- \"$@\"\n",
        caps.join(","),
        if nnp { "--no-new-privs" } else { "" }
    );
    s
}

/// The agent under the unit's sandbox, started as ExecStart, waited for as
/// ExecStartPost, stopped as KillSignal: it brings the pod bridge port and
/// the host overlay up with CAP_NET_ADMIN only, writes only where
/// ReadWritePaths allow, and exits cleanly within TimeoutStopSec. Not
/// emulated (systemd does them): DeviceAllow, SystemCallFilter,
/// RestrictAddressFamilies, ProtectKernel*, ProtectProc.
#[test]
fn the_agent_runs_under_the_units_sandbox() {
    let bin = require_bin("evio-node", "evio-node");
    let u = UnitFile::load(UNIT);
    let argv = exec_start(&u);
    let (rw, _) = writable(&u);
    let caps = u.list("Service", "CapabilityBoundingSet");
    let script = sandbox_script(&rw, &argv[0], &caps, u.yes("Service", "NoNewPrivileges"));

    // The host example, made runnable here: a Linux bridge (no OVS in the
    // namespace), the file store (under ReadWritePaths, as the shipped
    // ConfigMap's), no NAT servers (the example's names are placeholders),
    // the network key from a file the sandbox can only read.
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut conf = host_conf();
    let o = conf.as_object_mut().expect("object");
    o.retain(|k, _| !k.starts_with("etcd"));
    o.insert("bridge".into(), "evsd0".into());
    o.insert("bridgeType".into(), "linux".into());
    o.insert(
        "dataStore".into(),
        "file:///var/lib/evio/subnets.json".into(),
    );
    let key_file = tmp.path().join("network.key");
    std::fs::write(&key_file, "Ot+QAOH8i4p/1W8XkFhtW3snRk3L/yKiLTa8JQwy4wY=\n").expect("write");
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o400)).expect("chmod");
    conf["overlay"]["stun"] = Value::Array(vec![]);
    conf["overlay"]["turn"] = Value::Array(vec![]);
    conf["overlay"]["networkKeyFile"] = key_file.display().to_string().into();
    let conf_path = tmp.path().join("net-conf.json");
    std::fs::write(&conf_path, conf.to_string()).expect("write conf");
    let mut args = argv.clone();
    assert_eq!(args[2], "--config");
    args[3] = conf_path.display().to_string();

    let ns = Netns::new();
    let sh = tmp.path().join("sandbox.sh");
    std::fs::write(&sh, &script).expect("write script");
    let log = tmp.path().join("agent.log");
    let mut child = ns
        .cmd(&["unshare", "--mount", "--propagation", "private", "--", "sh"])
        .arg(&sh)
        .args(&args)
        .env("EVIO_NODE", &bin)
        .env("NODE_NAME", "sandboxed")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn the sandbox");
    let pid = child.id().to_string();
    let show = || std::fs::read_to_string(&log).unwrap_or_default();
    // nsenter, unshare, sh and setpriv all exec: the same pid becomes the
    // agent once the sandbox (its mount namespace) is in place.
    let t = Instant::now();
    while std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|e| e != Path::new(&argv[0]))
        .unwrap_or(true)
    {
        assert!(
            child.try_wait().expect("wait").is_none(),
            "sandbox failed:\n{}",
            show()
        );
        assert!(
            t.elapsed() < LIMIT,
            "the sandbox never exec'd the agent:\n{}",
            show()
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // ExecStartPost, verbatim, inside the same sandbox (setns into it).
    let post = exec_argv(&u.values("Service", "ExecStartPost")[0]);
    let mut wait = Command::new("nsenter")
        .args(["-t", &pid, "-m", "-n", "--"])
        .args(&post)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn ExecStartPost");
    let started = Instant::now();
    let waited = loop {
        if let Some(s) = wait.try_wait().expect("wait") {
            break s;
        }
        if let Some(s) = child.try_wait().expect("wait") {
            let _ = wait.kill();
            let _ = wait.wait();
            panic!("the agent exited ({s}) during ExecStartPost:\n{}", show());
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "ExecStartPost hangs"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        waited.success(),
        "ExecStartPost failed after {:?}:\n{}",
        started.elapsed(),
        show()
    );
    // By then the host overlay is up: the kubelet may start.
    let addr = ns.out(&["ip", "-o", "-4", "addr", "show", "dev", "evio-host"]);
    assert!(
        addr.contains("inet 10.10."),
        "evio-host: {addr}\n{}",
        show()
    );
    let tap = ns.out(&["ip", "-o", "link", "show", "master", "evsd0"]);
    assert!(
        tap.contains("evsd0-ovl"),
        "the agent's port on the bridge: {tap}"
    );
    // With exactly the bounding set's capabilities and no_new_privs.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    assert_eq!(field("CapEff:"), "0000000000001000", "CAP_NET_ADMIN only");
    assert_eq!(field("NoNewPrivs:"), "1");
    // It wrote a sysctl (forwarding on: off in a fresh namespace).
    assert_eq!(
        ns.out(&["cat", "/proc/sys/net/ipv4/ip_forward"]).trim(),
        "1"
    );

    // KillSignal=SIGTERM; it must be gone well within TimeoutStopSec.
    let stop = Duration::from_secs(seconds(&u.one("Service", "TimeoutStopSec").expect("stop")));
    let t = Instant::now();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            t.elapsed() < stop,
            "not stopped within TimeoutStopSec:\n{}",
            show()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "exit {status}:\n{}", show());
    assert!(
        t.elapsed() < Duration::from_secs(AGENT_CLEANUP_SECS),
        "took {:?}",
        t.elapsed()
    );
    // A stop (systemctl stop/restart) keeps the node on the network: the
    // devices and the host address stay for the next agent, which adopts
    // them (`evio-node agent --stop-and-leave` and uninstall take them
    // away; the namespace goes with this test).
    let links = ns.out(&["ip", "-o", "link", "show"]);
    assert!(
        links.contains("evsd0-ovl") && links.contains("evio-host"),
        "the devices went with the stop: {links}"
    );
    let addr = ns.out(&["ip", "-o", "-4", "addr", "show", "dev", "evio-host"]);
    assert!(
        addr.contains("inet 10.10."),
        "evio-host lost its address: {addr}"
    );
    let text = show();
    assert!(
        !text.contains("Read-only file system") && !text.contains("Operation not permitted"),
        "{text}"
    );
}
