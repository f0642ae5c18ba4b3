//! The CNI configuration list written for the kubelet: the `evio` plugin
//! with host-local IPAM over this node's range, then `portmap`.

use std::net::IpAddr;
use std::path::Path;

use evio_cni::config as cni;
use evio_subnet::{NodeSubnet, PodNetwork};
use serde::Serialize;
use serde_json::Value;

use crate::error::NodeError;
use crate::netconf::{parse_bool, RawConf};

pub const CONFLIST_NAME: &str = "10-evio.conflist";

/// The conflist's file name: `--conflist-name`, else the config's
/// `conflistName`, else [`CONFLIST_NAME`]. Configurable because the runtime
/// takes the first config of the directory in lexical order, and a runtime's
/// own default (`10-containerd-net.conflist`, `10-crio-bridge.conflist`)
/// sorts before `10-evio.conflist`.
pub fn conflist_name(flag: Option<&str>, conf: &RawConf) -> Result<String, NodeError> {
    let name = match flag {
        Some(n) => n.to_string(),
        None => conf
            .string("conflistName")?
            .unwrap_or_else(|| CONFLIST_NAME.to_string()),
    };
    let stem = name.strip_suffix(".conflist").unwrap_or("");
    // A bare name in the directory, and a .conflist: the runtime reads a
    // .conf or .json as a single plugin config, not a list.
    if stem.is_empty() || stem.starts_with('.') || name.contains('/') || name.len() > 255 {
        return Err(NodeError::Invalid(format!(
            "conflist name {name:?} must be a file name ending in .conflist, e.g. {CONFLIST_NAME}"
        )));
    }
    Ok(name)
}
pub const DEFAULT_CNI_VERSION: &str = "1.0.0";
pub const DEFAULT_NETWORK: &str = "evio";

/// Flags that override keys of the network config file.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Overrides {
    /// Network name (`name`): the CNI network and the store namespace.
    #[arg(long, visible_alias = "network", value_name = "NAME")]
    pub name: Option<String>,
    /// Pod CIDR (`podCIDR`), e.g. 10.244.0.0/16.
    #[arg(long, value_name = "CIDR")]
    pub pod_cidr: Option<String>,
    /// Bits of the pod CIDR that number nodes (`nodeBits`).
    #[arg(long, value_name = "N")]
    pub node_bits: Option<String>,
    /// `cniVersion` of the written conflist.
    #[arg(long, value_name = "VERSION")]
    pub cni_version: Option<String>,
    /// Bridge the pods are plugged into, at most 15 bytes (`bridge`)
    /// [default: evio0].
    #[arg(long, value_name = "IFNAME")]
    pub bridge: Option<String>,
    /// `bridgeType`: ovs (Open vSwitch) or linux; the original plugin's
    /// OVS and LXBR are accepted [default: ovs].
    #[arg(long, value_name = "TYPE")]
    pub bridge_type: Option<String>,
    /// OVSDB endpoint, unix:PATH or tcp:HOST:PORT (`ovsdb`)
    /// [default: unix:/var/run/openvswitch/db.sock].
    #[arg(long, value_name = "ENDPOINT")]
    pub ovsdb: Option<String>,
    /// `ovsDatapath`: auto (system when the kernel module is loaded),
    /// system or netdev (userspace) [default: auto].
    #[arg(long, value_name = "DATAPATH")]
    pub ovs_datapath: Option<String>,
    /// Put the node's gateway address on the bridge and enable forwarding
    /// (`isGateway`) [default: true].
    #[arg(long, value_name = "BOOL", value_parser = bool_flag)]
    pub is_gateway: Option<bool>,
    /// Give pods a default route via the gateway (`isDefaultGateway`;
    /// implies --is-gateway) [default: false].
    #[arg(long, value_name = "BOOL", value_parser = bool_flag)]
    pub is_default_gateway: Option<bool>,
    /// Masquerade pod traffic leaving the pod CIDR (`ipMasq`, alias
    /// `isIPMasq`) [default: false].
    #[arg(long, value_name = "BOOL", value_parser = bool_flag)]
    pub ip_masq: Option<bool>,
    /// MTU of the bridge and the pods' veths (`mtu`) [default: 1500; with
    /// the overlay, what fits its tunnel: 1380 on a 1500-byte underlay].
    #[arg(long, value_name = "BYTES")]
    pub mtu: Option<u32>,
    /// Linux bridge: let a pod reach itself through a service (`hairpinMode`)
    /// [default: true with --bridge-type linux, else false].
    #[arg(long, value_name = "BOOL", value_parser = bool_flag)]
    pub hairpin_mode: Option<bool>,
    /// Explicit bridge address (`bridgeIPv4`).
    #[arg(long, value_name = "ADDR[/PREFIX]")]
    pub bridge_ipv4: Option<String>,
    /// host-local `dataDir`.
    #[arg(long, value_name = "DIR")]
    pub ipam_data_dir: Option<String>,
}

fn bool_flag(s: &str) -> Result<bool, String> {
    parse_bool(s).ok_or_else(|| format!("{s:?} is not true or false"))
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct Range {
    subnet: String,
    range_start: IpAddr,
    range_end: IpAddr,
    gateway: IpAddr,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct Ipam {
    #[serde(rename = "type")]
    ipam_type: &'static str,
    ranges: Vec<Vec<Range>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    routes: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data_dir: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct EvioPlugin {
    #[serde(rename = "type")]
    plugin_type: &'static str,
    bridge: String,
    bridge_type: String,
    ovsdb: String,
    ovs_datapath: String,
    is_gateway: bool,
    is_default_gateway: bool,
    ip_masq: bool,
    mtu: u32,
    hairpin_mode: bool,
    #[serde(rename = "bridgeIPv4", skip_serializing_if = "Option::is_none")]
    bridge_ipv4: Option<String>,
    /// ovs-vswitchd's run directory, when set (`ovsRunDir`).
    #[serde(skip_serializing_if = "Option::is_none")]
    ovs_run_dir: Option<String>,
    /// The host overlay, whose nodes see pods' own addresses (the plugin
    /// never masquerades pod traffic to it): a string as ever, a list of
    /// the two prefixes of a dual-stack host overlay.
    #[serde(rename = "hostCIDR", skip_serializing_if = "Option::is_none")]
    host_cidr: Option<serde_json::Value>,
    ipam: Ipam,
}

#[derive(Debug, Clone, Serialize)]
struct Capabilities {
    #[serde(rename = "portMappings")]
    port_mappings: bool,
}

#[derive(Debug, Clone, Serialize)]
struct Portmap {
    #[serde(rename = "type")]
    plugin_type: &'static str,
    capabilities: Capabilities,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct Conflist {
    cni_version: String,
    name: String,
    plugins: (EvioPlugin, Portmap),
}

/// Everything needed to write the conflist except this node's subnet.
#[derive(Debug, Clone)]
pub struct GenConfig {
    pub cni_version: String,
    pub name: String,
    pub pod: PodNetwork,
    plugin: EvioPlugin,
}

fn pick_str(flag: &Option<String>, conf: &RawConf, key: &str) -> Result<Option<String>, NodeError> {
    match flag {
        Some(v) => Ok(Some(v.clone())),
        None => conf.string(key),
    }
}

fn pick_bool(flag: Option<bool>, conf: &RawConf, key: &str) -> Result<Option<bool>, NodeError> {
    match flag {
        Some(v) => Ok(Some(v)),
        None => conf.boolean(key),
    }
}

fn invalid(msg: impl Into<String>) -> NodeError {
    NodeError::Invalid(msg.into())
}

fn check_routes(routes: &Value) -> Result<(), NodeError> {
    let Value::Array(items) = routes else {
        return Err(invalid(
            "routes must be an array of {\"dst\": CIDR, \"gw\": IP}",
        ));
    };
    for r in items {
        let dst = r
            .get("dst")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid(format!("route {r} needs a \"dst\" CIDR")))?;
        dst.parse::<ipnet::IpNet>()
            .map_err(|_| invalid(format!("route dst {dst:?} is not a CIDR")))?;
        match r.get("gw") {
            None | Some(Value::Null) => {}
            Some(Value::String(g)) if g.parse::<IpAddr>().is_ok() => {}
            Some(g) => return Err(invalid(format!("route gw {g} is not an IP address"))),
        }
    }
    Ok(())
}

impl GenConfig {
    /// The bridge name pods of this network are plugged into.
    pub fn bridge(&self) -> &str {
        &self.plugin.bridge
    }

    /// The canonical `bridgeType` written: "ovs" or "linux".
    pub fn bridge_type(&self) -> &str {
        &self.plugin.bridge_type
    }

    /// The OVSDB endpoint written (`ovsdb`).
    pub fn ovsdb(&self) -> &str {
        &self.plugin.ovsdb
    }

    /// ovs-vswitchd's run directory (`ovsRunDir`) if the config sets one.
    pub fn ovs_run_dir(&self) -> Option<&str> {
        self.plugin.ovs_run_dir.as_deref()
    }

    /// host-local's `dataDir` if the config sets one.
    pub fn ipam_data_dir(&self) -> Option<&str> {
        self.plugin.ipam.data_dir.as_deref()
    }

    /// Merges flags over the file and validates the result, including by
    /// the plugin's own config parser so that nothing is written that the
    /// `evio` plugin would refuse at the first pod.
    pub fn resolve(conf: &RawConf, o: &Overrides) -> Result<GenConfig, NodeError> {
        let name = pick_str(&o.name, conf, "name")?.unwrap_or_else(|| DEFAULT_NETWORK.into());
        evio_subnet::validate_name("network name", &name)?;
        let cni_version = pick_str(&o.cni_version, conf, "cniVersion")?
            .unwrap_or_else(|| DEFAULT_CNI_VERSION.into());
        if !evio_cni::version::SUPPORTED.contains(&cni_version.as_str()) {
            return Err(invalid(format!(
                "cniVersion {cni_version:?} is not supported (one of {})",
                evio_cni::version::SUPPORTED.join(", ")
            )));
        }
        let cidr = pick_str(&o.pod_cidr, conf, "podCIDR")?
            .ok_or_else(|| invalid("podCIDR is required (in --config or --pod-cidr)"))?;
        let node_bits = match &o.node_bits {
            Some(s) => Some(evio_subnet::parse_node_bits(s)?),
            None => conf.node_bits()?,
        }
        .ok_or_else(|| invalid("nodeBits is required (in --config or --node-bits)"))?;
        let pod = PodNetwork::parse(&cidr, node_bits)?;

        // The plugin's rule, so that config-gen writes the canonical name
        // of exactly the spellings the plugin accepts.
        let bridge_type = match pick_str(&o.bridge_type, conf, "bridgeType")?.as_deref() {
            None => cni::DEFAULT_BRIDGE_TYPE,
            Some(t) => cni::BridgeType::parse(t).ok_or_else(|| {
                invalid(format!(
                    "bridgeType {t:?} is not supported: use \"ovs\" or \"linux\""
                ))
            })?,
        }
        .as_str()
        .to_string();
        // With the overlay, pod frames travel inside the tunnel: the MTU
        // must leave room for its headers on the underlay, or large
        // transfers between nodes stall while ping works.
        let overlay = crate::overlay::OverlayConf::parse(conf)?;
        let mtu = match o.mtu {
            Some(m) => Some(m),
            None => match conf.number("mtu")? {
                None => None,
                Some(m) => Some(
                    u32::try_from(m).map_err(|_| invalid(format!("mtu {m} is out of range")))?,
                ),
            },
        };
        let mtu = match (mtu, overlay.configured) {
            (None, false) => cni::DEFAULT_MTU,
            (None, true) => overlay.default_mtu(),
            (Some(m), true) if m > overlay.max_mtu() => {
                return Err(invalid(format!(
                    "mtu {m} does not fit the overlay: pod frames cross a {}-byte underlay inside the tunnel, \
                     so at most {} (default {}); set overlay.underlayMTU if the underlay is larger",
                    overlay.underlay_mtu,
                    overlay.max_mtu(),
                    overlay.default_mtu()
                )))
            }
            (Some(m), _) => m,
        };
        if pod.cidr().addr().is_ipv6() && mtu < 1280 {
            return Err(invalid(format!(
                "mtu {mtu} is below IPv6's minimum of 1280"
            )));
        }
        let ip_masq = match o.ip_masq {
            Some(v) => v,
            None => conf
                .boolean("ipMasq")?
                .or(conf.boolean("isIPMasq")?)
                .unwrap_or(cni::DEFAULT_IP_MASQ),
        };
        let routes = conf.ipam_value("routes");
        if let Some(r) = &routes {
            check_routes(r)?;
        }
        let data_dir = match &o.ipam_data_dir {
            Some(d) => Some(Value::String(d.clone())),
            None => conf.ipam_value("dataDir"),
        };
        let data_dir = match data_dir {
            None => None,
            Some(Value::String(d)) if d.is_empty() => None,
            Some(Value::String(d)) if Path::new(&d).is_absolute() => Some(d),
            Some(other) => {
                return Err(invalid(format!("dataDir {other} must be an absolute path")))
            }
        };
        let linux = bridge_type == cni::BridgeType::Linux.as_str();
        let plugin = EvioPlugin {
            plugin_type: "evio",
            bridge: pick_str(&o.bridge, conf, "bridge")?
                .unwrap_or_else(|| cni::DEFAULT_BRIDGE.into()),
            bridge_type,
            ovsdb: pick_str(&o.ovsdb, conf, "ovsdb")?.unwrap_or_else(|| cni::DEFAULT_OVSDB.into()),
            ovs_datapath: pick_str(&o.ovs_datapath, conf, "ovsDatapath")?
                .unwrap_or_else(|| cni::DEFAULT_DATAPATH.as_str().into()),
            is_gateway: pick_bool(o.is_gateway, conf, "isGateway")?
                .unwrap_or(cni::DEFAULT_IS_GATEWAY),
            is_default_gateway: pick_bool(o.is_default_gateway, conf, "isDefaultGateway")?
                .unwrap_or(cni::DEFAULT_IS_DEFAULT_GATEWAY),
            ip_masq,
            mtu,
            // On a Linux bridge evio turns bridge netfilter on (Services need
            // it), and a pod reaching itself through a Service then needs
            // hairpin on its port, as with flannel's default config.
            hairpin_mode: pick_bool(o.hairpin_mode, conf, "hairpinMode")?.unwrap_or(linux),
            bridge_ipv4: pick_str(&o.bridge_ipv4, conf, "bridgeIPv4")?.filter(|s| !s.is_empty()),
            ovs_run_dir: conf.string("ovsRunDir")?.filter(|s| !s.is_empty()),
            host_cidr: match overlay.host_cidrs().as_slice() {
                [] => None,
                [one] => Some(one.to_string().into()),
                all => Some(all.iter().map(|c| c.to_string()).collect::<Vec<_>>().into()),
            },
            ipam: Ipam {
                ipam_type: "host-local",
                ranges: Vec::new(),
                routes,
                data_dir,
            },
        };
        let g = GenConfig {
            cni_version,
            name,
            pod,
            plugin,
        };
        // Check with a placeholder range: the plugin's parser does not look
        // at the ranges, only at the keys this config controls.
        let probe = g.plugin_json(&pod.node(0)?)?;
        evio_cni::config::NetConf::parse(&probe).map_err(|e| invalid(e.to_string()))?;
        Ok(g)
    }

    fn conflist(&self, ns: &NodeSubnet) -> Conflist {
        let mut plugin = self.plugin.clone();
        plugin.ipam.ranges = vec![vec![Range {
            // Pods take the pod CIDR's prefix (one flat L2 network across
            // nodes); only the range and gateway are this node's.
            subnet: self.pod.cidr().to_string(),
            range_start: ns.range_start,
            range_end: ns.range_end,
            gateway: ns.gateway,
        }]];
        Conflist {
            cni_version: self.cni_version.clone(),
            name: self.name.clone(),
            plugins: (
                plugin,
                Portmap {
                    plugin_type: "portmap",
                    capabilities: Capabilities {
                        port_mappings: true,
                    },
                },
            ),
        }
    }

    /// The plugin entry as the runtime hands it to `evio` (with the list's
    /// `cniVersion` and `name` injected, as libcni does).
    fn plugin_json(&self, ns: &NodeSubnet) -> Result<Vec<u8>, NodeError> {
        let list = self.conflist(ns);
        let mut v = serde_json::to_value(&list.plugins.0).map_err(|e| invalid(e.to_string()))?;
        if let Value::Object(m) = &mut v {
            m.insert("cniVersion".into(), Value::String(list.cni_version));
            m.insert("name".into(), Value::String(list.name));
        }
        serde_json::to_vec(&v).map_err(|e| invalid(e.to_string()))
    }

    /// The plugin's network config for this node, parsed as the plugin
    /// parses it (what the agent builds the bridge from).
    pub fn plugin_conf(&self, ns: &NodeSubnet) -> Result<evio_cni::config::NetConf, NodeError> {
        let raw = self.plugin_json(ns)?;
        evio_cni::config::NetConf::parse(&raw).map_err(|e| invalid(e.to_string()))
    }

    /// The file content for this node.
    pub fn render(&self, ns: &NodeSubnet) -> Result<Vec<u8>, NodeError> {
        let mut out =
            serde_json::to_vec_pretty(&self.conflist(ns)).map_err(|e| invalid(e.to_string()))?;
        out.push(b'\n');
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gen(j: &str, o: Overrides) -> Result<GenConfig, NodeError> {
        GenConfig::resolve(&RawConf::parse("t.json", j.as_bytes()).unwrap(), &o)
    }

    /// Services on a Linux bridge need hairpin for a pod reaching itself
    /// (evio turns bridge netfilter on); pods reach the host overlay with
    /// their own addresses; vswitchd's run dir passes through.
    #[test]
    fn linux_bridge_defaults_to_hairpin_and_host_cidr_reaches_the_plugin() {
        let g = gen(
            r#"{"podCIDR":"10.244.0.0/16","nodeBits":8,"bridgeType":"linux","hostCIDR":"10.10.0.0/16","ovsRunDir":"/run/ovs"}"#,
            Overrides::default(),
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&g.render(&g.pod.node(1).unwrap()).unwrap()).unwrap();
        let p = &v["plugins"][0];
        assert_eq!(p["hairpinMode"], true);
        assert_eq!(p["hostCIDR"], "10.10.0.0/16");
        assert_eq!(p["ovsRunDir"], "/run/ovs");
        // A dual-stack host overlay: both prefixes, as a list the plugin
        // reads back.
        let d = gen(
            r#"{"podCIDR":"10.244.0.0/16","nodeBits":8,"hostCIDR":["fd00:10::/64","10.10.0.0/16"]}"#,
            Overrides::default(),
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&d.render(&d.pod.node(1).unwrap()).unwrap()).unwrap();
        let p = &v["plugins"][0];
        assert_eq!(
            p["hostCIDR"],
            serde_json::json!(["10.10.0.0/16", "fd00:10::/64"])
        );
        // The runtime hands the plugin its entry with the list's name and
        // version.
        let mut entry = p.clone();
        entry["cniVersion"] = v["cniVersion"].clone();
        entry["name"] = v["name"].clone();
        let back = cni::NetConf::parse(entry.to_string().as_bytes()).unwrap();
        assert_eq!(back.host_cidrs.len(), 2);
        let off = gen(
            r#"{"podCIDR":"10.244.0.0/16","nodeBits":8,"bridgeType":"linux","hairpinMode":false}"#,
            Overrides::default(),
        )
        .unwrap();
        let v: Value =
            serde_json::from_slice(&off.render(&off.pod.node(1).unwrap()).unwrap()).unwrap();
        assert_eq!(v["plugins"][0]["hairpinMode"], false);
    }

    #[test]
    fn renders_contract_shape() {
        let g = gen(
            r#"{"name":"k8s","podCIDR":"10.244.0.0/16","nodeBits":"8"}"#,
            Overrides::default(),
        )
        .unwrap();
        let ns = g.pod.node(3).unwrap();
        let v: Value = serde_json::from_slice(&g.render(&ns).unwrap()).unwrap();
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["name"], "k8s");
        let p = &v["plugins"][0];
        assert_eq!(p["type"], "evio");
        assert_eq!(p["bridge"], "evio0");
        assert_eq!(p["bridgeType"], "ovs");
        assert_eq!(p["ovsdb"], "unix:/var/run/openvswitch/db.sock");
        assert_eq!(p["ovsDatapath"], "auto");
        assert_eq!(p["isGateway"], true);
        assert_eq!(p["isDefaultGateway"], false);
        assert_eq!(p["ipMasq"], false);
        assert_eq!(p["mtu"], 1500);
        assert_eq!(p["hairpinMode"], false);
        assert!(p.get("bridgeIPv4").is_none());
        assert!(p.get("hostCIDR").is_none() && p.get("ovsRunDir").is_none());
        assert_eq!(p["ipam"]["type"], "host-local");
        let r = &p["ipam"]["ranges"][0][0];
        assert_eq!(r["subnet"], "10.244.0.0/16");
        assert_eq!(r["rangeStart"], "10.244.3.2");
        assert_eq!(r["rangeEnd"], "10.244.3.254");
        assert_eq!(r["gateway"], "10.244.3.1");
        assert!(p["ipam"].get("routes").is_none());
        assert!(p["ipam"].get("dataDir").is_none());
        assert_eq!(v["plugins"][1]["type"], "portmap");
        assert_eq!(v["plugins"][1]["capabilities"]["portMappings"], true);
        assert_eq!(v["plugins"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn flags_override_file_and_aliases_normalize() {
        let o = Overrides {
            bridge: Some("br-pods".into()),
            ip_masq: Some(true),
            mtu: Some(1400),
            node_bits: Some("4".into()),
            ..Overrides::default()
        };
        let g = gen(
            r#"{"podCIDR":"10.1.0.0/16","nodeBits":8,"bridge":"x","bridgeType":"LXBR","isIPMasq":false,
                "hairpinMode":"true","bridgeIPv4":"10.1.0.1/16","routes":[{"dst":"0.0.0.0/0"}],"dataDir":"/run/ipam"}"#,
            o,
        )
        .unwrap();
        assert_eq!(g.name, "evio");
        assert_eq!(g.pod.node_bits(), 4);
        let v: Value = serde_json::from_slice(&g.render(&g.pod.node(0).unwrap()).unwrap()).unwrap();
        let p = &v["plugins"][0];
        assert_eq!(p["bridge"], "br-pods");
        assert_eq!(p["bridgeType"], "linux");
        assert_eq!(p["ipMasq"], true);
        assert_eq!(p["mtu"], 1400);
        assert_eq!(p["hairpinMode"], true);
        assert_eq!(p["bridgeIPv4"], "10.1.0.1/16");
        assert_eq!(p["ipam"]["routes"][0]["dst"], "0.0.0.0/0");
        assert_eq!(p["ipam"]["dataDir"], "/run/ipam");
        assert_eq!(p["ipam"]["ranges"][0][0]["rangeEnd"], "10.1.15.254");
    }

    #[test]
    fn ipv6_ranges() {
        let g = gen(
            r#"{"podCIDR":"fd00:10::/48","nodeBits":16,"cniVersion":"1.1.0"}"#,
            Overrides::default(),
        )
        .unwrap();
        let v: Value =
            serde_json::from_slice(&g.render(&g.pod.node(0xab).unwrap()).unwrap()).unwrap();
        let r = &v["plugins"][0]["ipam"]["ranges"][0][0];
        assert_eq!(r["subnet"], "fd00:10::/48");
        assert_eq!(r["gateway"], "fd00:10:0:ab::1");
        assert_eq!(r["rangeStart"], "fd00:10:0:ab::2");
        assert_eq!(v["cniVersion"], "1.1.0");
    }

    #[test]
    fn rejects_bad_values() {
        let base = |extra: &str| format!(r#"{{"podCIDR":"10.244.0.0/16","nodeBits":8{extra}}}"#);
        for extra in [
            r#","bridge":"this-name-is-too-long""#,
            r#","bridgeType":"vpp""#,
            // Only the spellings the plugin accepts (docs/design.md).
            r#","bridgeType":"Linux""#,
            r#","bridgeType":"lxbr""#,
            r#","bridgeType":"Ovs""#,
            r#","ovsDatapath":"dpdk""#,
            r#","ovsdb":"nonsense""#,
            r#","mtu":10"#,
            r#","mtu":70000"#,
            r#","cniVersion":"0.2.0""#,
            r#","name":"bad/name""#,
            r#","bridgeIPv4":"not-an-ip""#,
            r#","routes":{"dst":"x"}"#,
            r#","routes":[{"dst":"x"}]"#,
            r#","routes":[{"dst":"0.0.0.0/0","gw":"nope"}]"#,
            r#","dataDir":"relative/dir""#,
            r#","isGateway":"yes""#,
        ] {
            assert!(gen(&base(extra), Overrides::default()).is_err(), "{extra}");
        }
        assert!(gen(r#"{"nodeBits":8}"#, Overrides::default()).is_err());
        assert!(gen(r#"{"podCIDR":"10.244.0.0/16"}"#, Overrides::default()).is_err());
        assert!(gen(
            r#"{"podCIDR":"fd00::/48","nodeBits":8,"mtu":1000}"#,
            Overrides::default()
        )
        .is_err());
    }
}
