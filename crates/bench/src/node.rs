//! Simulated nodes and the plugins under test: a node is a network
//! namespace (with its own OVS when the mode needs one) plus a host-local
//! data directory of its own; a pod is a namespace the plugin wires up.

use std::path::{Path, PathBuf};
use std::time::Duration;

use evio_testkit::netns::Netns;
use evio_testkit::ovs::Ovs;
use evio_testkit::plugin::{conf, container_id, ipam_allocations, TempDir};
use serde_json::{json, Value};

use crate::cleanup;
use crate::error::{BenchError, Result};
use crate::exec::{self, NsFd, Outcome, Spec};

/// CNI version both plugins are configured with: the newest the Debian
/// reference plugins (1.1.1) speak.
pub const CNI_VERSION: &str = "1.0.0";
pub const NETWORK: &str = "evbench";
pub const BRIDGE: &str = "evb0";
pub const IFNAME: &str = "eth0";
const PLUGIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the programs under test are.
#[derive(Debug, Clone)]
pub struct Tools {
    pub evio: PathBuf,
    pub evio_node: PathBuf,
    /// Debian's containernetworking-plugins: `bridge`, `host-local`.
    pub cni_dir: PathBuf,
}

impl Tools {
    pub fn bridge(&self) -> PathBuf {
        self.cni_dir.join("bridge")
    }

    pub fn host_local(&self) -> PathBuf {
        self.cni_dir.join("host-local")
    }

    pub fn require(&self, paths: &[&Path]) -> Result<()> {
        for p in paths {
            if !p.is_file() {
                return Err(BenchError::Missing(p.to_path_buf()));
            }
        }
        Ok(())
    }
}

/// Who wires the pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The reference `bridge` plugin on a Linux bridge.
    Reference,
    EvioLinux,
    /// evio on an OVS bridge with the userspace (netdev) datapath.
    EvioOvs,
}

impl Mode {
    pub fn label(self) -> &'static str {
        match self {
            Mode::Reference => "reference bridge",
            Mode::EvioLinux => "evio linux",
            Mode::EvioOvs => "evio ovs (netdev)",
        }
    }

    pub fn plugin(self, tools: &Tools) -> PathBuf {
        match self {
            Mode::Reference => tools.bridge(),
            Mode::EvioLinux | Mode::EvioOvs => tools.evio.clone(),
        }
    }
}

/// The host-local range of node `octet`: pods get 10.244.<octet>.2-254 with
/// the pod CIDR's /16 prefix and gateway .1, as config-gen would write it.
pub fn range(octet: u8) -> Value {
    json!({
        "subnet": "10.244.0.0/16",
        "rangeStart": format!("10.244.{octet}.2"),
        "rangeEnd": format!("10.244.{octet}.254"),
        "gateway": format!("10.244.{octet}.1"),
    })
}

/// A plugin configuration's name in the tables.
pub fn label(mode: Mode, masq: bool) -> String {
    if masq {
        format!("{}, ipMasq", mode.label())
    } else {
        mode.label().to_string()
    }
}

/// A pod's attachment identity for one ADD/DEL pair.
pub struct Attach {
    pub netns: PathBuf,
    pub id: String,
    pub name: String,
}

impl Attach {
    pub fn new(pod: &Netns) -> Attach {
        Attach {
            netns: pod.path(),
            id: container_id(),
            name: pod.name().to_string(),
        }
    }
}

/// One simulated node. Field order is drop order: OVS stops before its
/// namespace goes away.
pub struct Node {
    pub ovs: Option<Ovs>,
    pub fd: NsFd,
    pub ns: Netns,
    pub ipam_dir: TempDir,
    pub mode: Mode,
    /// `ipMasq` on: the reference then runs iptables, evio nftables.
    pub masq: bool,
    pub conf: Value,
    plugin: PathBuf,
    cni_path: String,
}

impl Node {
    pub fn new(mode: Mode, tools: &Tools, octet: u8) -> Result<Node> {
        Node::with_masq(mode, tools, octet, false)
    }

    pub fn with_masq(mode: Mode, tools: &Tools, octet: u8, masq: bool) -> Result<Node> {
        let ns = cleanup::netns("ebn");
        let fd = NsFd::open(&ns.path())?;
        let ipam_dir = tempfile::Builder::new()
            .prefix("evio-bench-ipam-")
            .tempdir()
            .map_err(BenchError::io("create IPAM data dir"))?;
        let ovs = match mode {
            Mode::EvioOvs => Some(Ovs::start(&ns)),
            _ => None,
        };
        let plugin_type = match mode {
            Mode::Reference => "bridge",
            _ => "evio",
        };
        let mut c = conf(plugin_type, CNI_VERSION, NETWORK, BRIDGE, ipam_dir.path())
            .mtu(1500)
            .ip_masq(masq)
            .ranges(json!([[range(octet)]]));
        match mode {
            Mode::Reference => {}
            Mode::EvioLinux => c = c.bridge_type("linux"),
            Mode::EvioOvs => {
                let ep = ovs.as_ref().map(Ovs::endpoint).unwrap_or_default();
                c = c
                    .bridge_type("ovs")
                    .ovsdb(&ep)
                    .set("ovsDatapath", json!("netdev"));
            }
        }
        Ok(Node {
            ovs,
            fd,
            ns,
            ipam_dir,
            mode,
            masq,
            conf: c.json(),
            plugin: mode.plugin(tools),
            cni_path: tools.cni_dir.display().to_string(),
        })
    }

    pub fn label(&self) -> String {
        label(self.mode, self.masq)
    }

    /// The plugin invocation a runtime would make for `cmd` on `att`.
    pub fn spec(&self, cmd: &str, att: &Attach) -> Spec<'_> {
        self.spec_for(&self.plugin.clone(), cmd, att, &self.conf)
    }

    /// Same environment and config, another program (the host-local floor).
    pub fn spec_for(&self, program: &Path, cmd: &str, att: &Attach, conf: &Value) -> Spec<'_> {
        let netns = att.netns.display().to_string();
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={}",
            att.name, att.id
        );
        Spec::new(program)
            .env("CNI_COMMAND", cmd)
            .env("CNI_CONTAINERID", &att.id)
            .env("CNI_NETNS", &netns)
            .env("CNI_IFNAME", IFNAME)
            .env("CNI_ARGS", &args)
            .env("CNI_PATH", &self.cni_path)
            .stdin(conf.to_string().into_bytes())
            .netns(&self.fd)
            .timeout(PLUGIN_TIMEOUT)
    }

    /// ADD; fails unless the plugin succeeded with at least one address.
    pub fn add(&self, att: &Attach) -> Result<Outcome> {
        let what = format!("{} ADD {}", self.label(), att.name);
        let o = exec::run(&self.spec("ADD", att))?.ok(&what)?;
        check_add_result(&what, &o.stdout)?;
        Ok(o)
    }

    pub fn del(&self, att: &Attach) -> Result<Outcome> {
        let what = format!("{} DEL {}", self.label(), att.name);
        exec::run(&self.spec("DEL", att))?.ok(&what)
    }

    /// Runs `argv` inside the node (set-up and checks, not timed).
    pub fn sh(&self, argv: &[&str]) -> Result<String> {
        sh(&self.ns, argv)
    }

    /// Number of veth links in the node: one per attached pod.
    pub fn veth_count(&self) -> Result<usize> {
        Ok(self
            .sh(&["ip", "-o", "link", "show", "type", "veth"])?
            .lines()
            .count())
    }

    /// Addresses host-local currently has handed out on this node.
    pub fn ipam_count(&self) -> usize {
        ipam_allocations(self.ipam_dir.path(), NETWORK).len()
    }
}

/// The pod's IPv4 address from an ADD result, without the prefix.
pub fn add_result_ip(stdout: &str) -> Option<String> {
    let v: Value = serde_json::from_str(stdout.trim()).ok()?;
    let addr = v
        .get("ips")?
        .as_array()?
        .first()?
        .get("address")?
        .as_str()?;
    Some(addr.split('/').next()?.to_string())
}

fn check_add_result(what: &str, stdout: &str) -> Result<()> {
    match add_result_ip(stdout) {
        Some(_) => Ok(()),
        None => Err(BenchError::output(
            what,
            format!("no ips[0].address in the result: {}", stdout.trim()),
        )),
    }
}

/// Runs `argv` in `ns` via nsenter, bounded; stdout on success.
/// A veth pair: `name` in `ns`, `peer` in `peer_ns`, both down.
pub fn veth(ns: &Netns, name: &str, peer_ns: &Netns, peer: &str) -> Result<()> {
    sh(
        ns,
        &[
            "ip",
            "link",
            "add",
            name,
            "type",
            "veth",
            "peer",
            "name",
            peer,
            "netns",
            peer_ns.name(),
        ],
    )
    .map(drop)
}

pub fn sh(ns: &Netns, argv: &[&str]) -> Result<String> {
    let path = ns.path();
    let mut full = vec![format!("--net={}", path.display()), "--".to_string()];
    full.extend(argv.iter().map(|s| s.to_string()));
    let spec = Spec::new("nsenter")
        .inherit_env()
        .args(full)
        .timeout(Duration::from_secs(30));
    let o = exec::run(&spec)?;
    let what = format!("[{}] {}", ns.name(), argv.join(" "));
    Ok(o.ok(&what)?.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_is_read_from_a_cni_result() {
        let r =
            r#"{"cniVersion":"1.0.0","ips":[{"address":"10.244.3.7/16","gateway":"10.244.3.1"}]}"#;
        assert_eq!(add_result_ip(r).as_deref(), Some("10.244.3.7"));
        assert_eq!(add_result_ip(r#"{"ips":[]}"#), None);
        assert_eq!(add_result_ip("not json"), None);
    }

    #[test]
    fn node_range_is_inside_the_pod_cidr() {
        let r = range(4);
        assert_eq!(r["rangeStart"], "10.244.4.2");
        assert_eq!(r["gateway"], "10.244.4.1");
        assert_eq!(r["subnet"], "10.244.0.0/16");
    }
}
