//! The evio network configuration (the plugin entry of a conflist, or a
//! single .conf), validated up front so that nothing is created from a
//! config that is wrong anywhere.
//!
//! JSON that does not parse is a decode failure (code 6); JSON that parses
//! but has a wrong type or value is an invalid config (code 7) naming the
//! key and the value.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde_json::{Map, Value};

use crate::env::{validate_ifname, validate_network_name};
use crate::error::{code, CniError, Result};
use crate::version::Version;

/// Largest config accepted on stdin: far above any real one, small enough
/// that hostile input cannot make the plugin allocate without bound.
pub const MAX_CONFIG_BYTES: u64 = 4 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BridgeType {
    Ovs,
    Linux,
}

impl BridgeType {
    /// `bridgeType` as docs/design.md gives it: `ovs` or `linux`, or the
    /// original plugin's spellings `OVS` and `LXBR`; nothing else (no other
    /// case), so that every reader of a config agrees on it.
    pub fn parse(s: &str) -> Option<BridgeType> {
        match s {
            "ovs" | "OVS" => Some(BridgeType::Ovs),
            "linux" | "LXBR" => Some(BridgeType::Linux),
            _ => None,
        }
    }

    /// The canonical spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            BridgeType::Ovs => "ovs",
            BridgeType::Linux => "linux",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Datapath {
    Auto,
    System,
    Netdev,
}

impl Datapath {
    pub fn as_str(self) -> &'static str {
        match self {
            Datapath::Auto => "auto",
            Datapath::System => "system",
            Datapath::Netdev => "netdev",
        }
    }
}

/// The explicit bridge address of the original plugin (`bridgeIPv4`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BridgeAddr {
    /// With a prefix: used as given.
    Cidr(IpNet),
    /// Without: the prefix comes from the pod's IPAM address.
    Addr(IpAddr),
}

/// One entry of `cni.dev/valid-attachments` (GC).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValidAttachment {
    pub container_id: String,
    pub ifname: String,
}

#[derive(Debug, Clone)]
pub struct NetConf {
    pub cni_version: String,
    pub version: Version,
    pub name: String,
    pub plugin_type: String,
    pub bridge: String,
    pub bridge_type: BridgeType,
    pub ovsdb: String,
    pub ovs_datapath: Datapath,
    pub is_gateway: bool,
    pub is_default_gateway: bool,
    pub ip_masq: bool,
    pub mtu: u32,
    pub hairpin_mode: bool,
    pub bridge_ipv4: Option<BridgeAddr>,
    pub ipam_type: String,
    /// Bound on each exec of the IPAM delegate (`ipamTimeoutSeconds`).
    pub ipam_timeout: Duration,
    pub prev_result: Option<Value>,
    pub log_file: Option<PathBuf>,
    /// Open vSwitch's run directory, where ovs-vswitchd listens for
    /// OpenFlow on `<bridge>.mgmt` (`ovsRunDir`); `None`: the directory of
    /// a `unix:` OVSDB socket, else /var/run/openvswitch.
    pub ovs_run_dir: Option<PathBuf>,
    /// The host overlay (`hostCIDR`: one prefix, or a list of one IPv4
    /// and one IPv6 prefix): pod traffic to it is never masqueraded, so a
    /// hostNetwork endpoint sees the client pod's own IP.
    pub host_cidrs: Vec<IpNet>,
    pub valid_attachments: Option<Vec<ValidAttachment>>,
    /// The config exactly as received: what the IPAM delegate gets on stdin.
    pub raw: Vec<u8>,
}

/// The plugin's own `type`: never a valid `ipam.type`.
pub const OWN_TYPE: &str = "evio";
/// Longest `ipamTimeoutSeconds`: runtimes give a CNI call minutes at most.
pub const MAX_IPAM_TIMEOUT_SECONDS: f64 = 300.0;
pub const DEFAULT_BRIDGE: &str = "evio0";
pub const DEFAULT_OVSDB: &str = "unix:/var/run/openvswitch/db.sock";
pub const DEFAULT_MTU: u32 = 1500;
pub const DEFAULT_BRIDGE_TYPE: BridgeType = BridgeType::Ovs;
pub const DEFAULT_DATAPATH: Datapath = Datapath::Auto;
pub const DEFAULT_IS_GATEWAY: bool = true;
pub const DEFAULT_IS_DEFAULT_GATEWAY: bool = false;
pub const DEFAULT_IP_MASQ: bool = false;
pub const DEFAULT_HAIRPIN_MODE: bool = false;
/// IPv4's minimum MTU (RFC 791); below it the kernel refuses the address.
pub const MIN_MTU: u32 = 68;
/// Largest MTU a veth accepts (ETH_MAX_MTU).
pub const MAX_MTU: u32 = 65535;

/// The version field alone, for printing an error in the right version when
/// the rest of the config is broken. Falls back to the latest.
pub fn peek_version(raw: &[u8]) -> String {
    serde_json::from_slice::<Value>(raw)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_string))
        .filter(|v| crate::version::SUPPORTED.contains(&v.as_str()))
        .unwrap_or_else(|| crate::version::LATEST.to_string())
}

impl NetConf {
    pub fn parse(raw: &[u8]) -> Result<NetConf> {
        let v: Value = serde_json::from_slice(raw).map_err(|e| {
            CniError::new(code::DECODE, "failed to decode network config")
                .with_details(e.to_string())
        })?;
        let Value::Object(o) = v else {
            return Err(CniError::new(
                code::DECODE,
                "network config is not a JSON object",
            ));
        };
        let cni_version = req_str(&o, "cniVersion")?.to_string();
        let version = Version::supported(&cni_version)?;
        let name = req_str(&o, "name")?.to_string();
        validate_network_name(&name)?;
        let plugin_type = req_str(&o, "type")?.to_string();

        let bridge = opt_str(&o, "bridge")?.unwrap_or(DEFAULT_BRIDGE).to_string();
        validate_ifname(&bridge).map_err(|e| {
            CniError::invalid_config(format!("bridge: {}", e.msg)).with_details(e.details)
        })?;
        let bridge_type = match opt_str(&o, "bridgeType")? {
            None => DEFAULT_BRIDGE_TYPE,
            Some(t) => BridgeType::parse(t).ok_or_else(|| {
                CniError::invalid_config(format!(
                    "bridgeType {t:?} is not supported: use \"ovs\" or \"linux\""
                ))
            })?,
        };
        let ovsdb = opt_str(&o, "ovsdb")?.unwrap_or(DEFAULT_OVSDB).to_string();
        let endpoint_ok =
            matches!(ovsdb.split_once(':'), Some(("unix" | "tcp", rest)) if !rest.is_empty());
        if !endpoint_ok {
            return Err(CniError::invalid_config(format!(
                "ovsdb {ovsdb:?} is not an OVSDB endpoint: expected unix:PATH or tcp:HOST:PORT"
            )));
        }
        let ovs_datapath = match opt_str(&o, "ovsDatapath")? {
            None => DEFAULT_DATAPATH,
            Some("auto") => Datapath::Auto,
            Some("system") => Datapath::System,
            Some("netdev") => Datapath::Netdev,
            Some(other) => {
                return Err(CniError::invalid_config(format!(
                    "ovsDatapath {other:?} is not supported: use \"auto\", \"system\" or \"netdev\""
                )))
            }
        };
        let is_default_gateway =
            opt_bool(&o, "isDefaultGateway")?.unwrap_or(DEFAULT_IS_DEFAULT_GATEWAY);
        // A default route via the gateway needs the gateway on the bridge.
        let is_gateway =
            opt_bool(&o, "isGateway")?.unwrap_or(DEFAULT_IS_GATEWAY) || is_default_gateway;
        let ip_masq = match (opt_bool(&o, "ipMasq")?, opt_bool(&o, "isIPMasq")?) {
            (Some(a), _) => a,
            (None, Some(b)) => b,
            (None, None) => DEFAULT_IP_MASQ,
        };
        let mtu = match o.get("mtu") {
            None | Some(Value::Null) => DEFAULT_MTU,
            Some(v) => {
                let n = v.as_u64().ok_or_else(|| {
                    CniError::invalid_config(format!("mtu must be a whole number, got {v}"))
                })?;
                if !(u64::from(MIN_MTU)..=u64::from(MAX_MTU)).contains(&n) {
                    return Err(CniError::invalid_config(format!(
                        "mtu {n} is out of range {MIN_MTU}..={MAX_MTU}"
                    )));
                }
                n as u32
            }
        };
        let hairpin_mode = opt_bool(&o, "hairpinMode")?.unwrap_or(DEFAULT_HAIRPIN_MODE);
        let bridge_ipv4 = match opt_str(&o, "bridgeIPv4")? {
            None | Some("") => None,
            Some(s) => Some(parse_bridge_addr(s)?),
        };
        let ipam = match o.get("ipam") {
            Some(Value::Object(m)) => m,
            Some(other) => {
                return Err(CniError::invalid_config(format!(
                    "ipam must be an object, got {other}"
                )))
            }
            None => {
                return Err(CniError::invalid_config(
                    "ipam is required (e.g. host-local)",
                ))
            }
        };
        let ipam_type = req_str(ipam, "type")
            .map_err(|e| e.context("ipam"))?
            .to_string();
        // The delegate is looked up by name in CNI_PATH: a path would let
        // the config execute anything.
        if ipam_type.is_empty() || ipam_type.contains('/') || ipam_type == "." || ipam_type == ".."
        {
            return Err(CniError::invalid_config(format!(
                "ipam.type {ipam_type:?} is not a plugin name"
            )));
        }
        // evio as its own IPAM would execute itself with the same input,
        // level after level, without end (each level a process and an OVSDB
        // connection). A renamed copy is stopped by DEPTH_ENV instead.
        if ipam_type == OWN_TYPE || ipam_type == plugin_type {
            return Err(CniError::invalid_config(format!(
                "ipam.type {ipam_type:?} is this plugin itself: it would delegate to itself \
                 without end; use an IPAM plugin such as host-local"
            )));
        }
        let ipam_timeout = match o.get("ipamTimeoutSeconds") {
            None | Some(Value::Null) => crate::ipam::DEFAULT_TIMEOUT,
            Some(v) => match v.as_f64() {
                Some(n) if n > 0.0 && n <= MAX_IPAM_TIMEOUT_SECONDS => Duration::from_secs_f64(n),
                _ => {
                    return Err(CniError::invalid_config(format!(
                        "ipamTimeoutSeconds must be a number of seconds above 0 and at most \
                         {MAX_IPAM_TIMEOUT_SECONDS}, got {v}"
                    )))
                }
            },
        };
        let prev_result = match o.get("prevResult") {
            None | Some(Value::Null) => None,
            Some(v @ Value::Object(_)) => Some(v.clone()),
            Some(other) => {
                return Err(CniError::invalid_config(format!(
                    "prevResult must be an object, got {other}"
                )))
            }
        };
        let log_file = opt_str(&o, "logFile")?
            .filter(|s| !s.is_empty())
            .map(|s| checked_path("logFile", s))
            .transpose()?;
        // host-local writes there, and GC deletes files there: a relative
        // or `..` path would make both act outside the directory meant.
        if let Some(dir) = ipam.get("dataDir") {
            match dir {
                Value::Null => {}
                Value::String(s) if s.is_empty() => {}
                Value::String(s) => {
                    checked_path("ipam.dataDir", s)?;
                }
                other => {
                    return Err(CniError::invalid_config(format!(
                        "ipam.dataDir must be a string, got {other}"
                    )))
                }
            }
        }
        let ovs_run_dir = opt_str(&o, "ovsRunDir")?
            .filter(|s| !s.is_empty())
            .map(|s| checked_path("ovsRunDir", s))
            .transpose()?;
        let host_cidrs = host_cidrs(&o)?;
        let valid_attachments = match o
            .get("cni.dev/valid-attachments")
            .or_else(|| o.get("cni.dev/attachments"))
        {
            None | Some(Value::Null) => None,
            Some(v) => Some(parse_attachments(v)?),
        };
        Ok(NetConf {
            cni_version,
            version,
            name,
            plugin_type,
            bridge,
            bridge_type,
            ovsdb,
            ovs_datapath,
            is_gateway,
            is_default_gateway,
            ip_masq,
            mtu,
            hairpin_mode,
            bridge_ipv4,
            ipam_type,
            ipam_timeout,
            prev_result,
            log_file,
            ovs_run_dir,
            host_cidrs,
            valid_attachments,
            raw: raw.to_vec(),
        })
    }
}

/// A path the plugin (or its delegate) writes to: absolute, without `..`
/// and without NUL, so it means the same whatever the working directory.
fn checked_path(key: &str, s: &str) -> Result<PathBuf> {
    let p = PathBuf::from(s);
    let bad = |why: &str| Err(CniError::invalid_config(format!("{key} {s:?} {why}")));
    if s.contains('\0') {
        return bad("contains a NUL character");
    }
    if !p.is_absolute() {
        return bad("must be an absolute path");
    }
    if p.components().any(|c| c == std::path::Component::ParentDir) {
        return bad("must not contain ..");
    }
    Ok(p)
}

fn parse_bridge_addr(s: &str) -> Result<BridgeAddr> {
    if let Ok(n) = s.parse::<IpNet>() {
        return Ok(BridgeAddr::Cidr(n));
    }
    if let Ok(a) = s.parse::<IpAddr>() {
        return Ok(BridgeAddr::Addr(a));
    }
    Err(CniError::invalid_config(format!(
        "bridgeIPv4 {s:?} is not an address or address/prefix"
    )))
}

fn parse_attachments(v: &Value) -> Result<Vec<ValidAttachment>> {
    let bad = || {
        CniError::invalid_config(
            "cni.dev/valid-attachments must be a list of {\"containerID\", \"ifname\"}",
        )
    };
    let list = v.as_array().ok_or_else(bad)?;
    list.iter()
        .map(|a| {
            let cid = a
                .get("containerID")
                .and_then(Value::as_str)
                .ok_or_else(bad)?;
            let ifname = a.get("ifname").and_then(Value::as_str).ok_or_else(bad)?;
            Ok(ValidAttachment {
                container_id: cid.to_string(),
                ifname: ifname.to_string(),
            })
        })
        .collect()
}

fn req_str<'a>(o: &'a Map<String, Value>, key: &str) -> Result<&'a str> {
    match o.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s),
        Some(Value::String(_)) | None | Some(Value::Null) => {
            Err(CniError::invalid_config(format!("{key} is required")))
        }
        Some(other) => Err(CniError::invalid_config(format!(
            "{key} must be a string, got {other}"
        ))),
    }
}

/// `hostCIDR`: absent, a string (empty: none), or a list of at most one
/// IPv4 and one IPv6 prefix (config-gen writes what net-conf.json says).
fn host_cidrs(o: &Map<String, Value>) -> Result<Vec<IpNet>> {
    let one = |s: &str| {
        s.parse::<IpNet>()
            .map(|n| n.trunc())
            .map_err(|_| CniError::invalid_config(format!("hostCIDR {s:?} is not a CIDR")))
    };
    let out: Vec<IpNet> = match o.get("hostCIDR") {
        Some(Value::Array(a)) => {
            let out = a
                .iter()
                .map(|v| match v {
                    Value::String(s) => one(s),
                    other => Err(CniError::invalid_config(format!(
                        "hostCIDR entries must be strings, got {other}"
                    ))),
                })
                .collect::<Result<Vec<_>>>()?;
            let v4 = out.iter().filter(|n| n.addr().is_ipv4()).count();
            if out.is_empty() || v4 > 1 || out.len() - v4 > 1 {
                return Err(CniError::invalid_config(format!(
                    "hostCIDR {out:?}: give one prefix, or one IPv4 and one IPv6 prefix"
                )));
            }
            out
        }
        _ => match opt_str(o, "hostCIDR")? {
            None | Some("") => Vec::new(),
            Some(s) => vec![one(s)?],
        },
    };
    Ok(out)
}

fn opt_str<'a>(o: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(CniError::invalid_config(format!(
            "{key} must be a string, got {other}"
        ))),
    }
}

fn opt_bool(o: &Map<String, Value>, key: &str) -> Result<Option<bool>> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(CniError::invalid_config(format!(
            "{key} must be true or false, got {other}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn conf(extra: Value) -> Value {
        let mut base = json!({
            "cniVersion": "1.0.0", "name": "evio-net", "type": "evio",
            "ipam": {"type": "host-local", "subnet": "10.244.0.0/16"}
        });
        for (k, v) in extra.as_object().unwrap() {
            base[k] = v.clone();
        }
        base
    }

    fn parse(v: &Value) -> Result<NetConf> {
        NetConf::parse(v.to_string().as_bytes())
    }

    #[test]
    fn defaults_follow_the_contract() {
        let c = parse(&conf(json!({}))).unwrap();
        assert_eq!(c.ipam_timeout, crate::ipam::DEFAULT_TIMEOUT);
        let t = parse(&conf(json!({"ipamTimeoutSeconds": 1.5}))).unwrap();
        assert_eq!(t.ipam_timeout, Duration::from_millis(1500));
        assert_eq!(c.bridge, "evio0");
        assert_eq!(c.bridge_type, BridgeType::Ovs);
        assert_eq!(c.ovsdb, DEFAULT_OVSDB);
        assert_eq!(c.ovs_datapath, Datapath::Auto);
        assert!(c.is_gateway && !c.is_default_gateway && !c.ip_masq && !c.hairpin_mode);
        assert_eq!(c.mtu, 1500);
        assert_eq!(c.ipam_type, "host-local");
    }

    /// Issue 25: a dual-stack host overlay's two prefixes, both exempt
    /// from masquerade; the string form as ever.
    #[test]
    fn host_cidr_is_a_string_or_one_prefix_per_family() {
        let n = |s: &str| s.parse::<IpNet>().unwrap();
        let c = parse(&conf(json!({"hostCIDR": "10.10.0.0/16"}))).unwrap();
        assert_eq!(c.host_cidrs, [n("10.10.0.0/16")]);
        assert!(parse(&conf(json!({"hostCIDR": ""})))
            .unwrap()
            .host_cidrs
            .is_empty());
        assert!(parse(&conf(json!({}))).unwrap().host_cidrs.is_empty());
        let c = parse(&conf(json!({"hostCIDR": ["fd00:10::/64", "10.10.0.0/16"]}))).unwrap();
        assert_eq!(c.host_cidrs, [n("fd00:10::/64"), n("10.10.0.0/16")]);
        for bad in [
            json!([]),
            json!(["10.10.0.0/16", "10.11.0.0/16"]),
            json!(["fd00:10::/64", "fd00:11::/64"]),
            json!(["10.10.0.0/16", "x"]),
            json!(["10.10.0.0/16", 7]),
            json!(7),
        ] {
            let e = parse(&conf(json!({ "hostCIDR": bad }))).unwrap_err();
            assert!(e.to_string().contains("hostCIDR"), "{bad}: {e}");
        }
    }

    #[test]
    fn bridge_type_spellings_are_exact() {
        for (s, want) in [
            ("ovs", BridgeType::Ovs),
            ("OVS", BridgeType::Ovs),
            ("linux", BridgeType::Linux),
            ("LXBR", BridgeType::Linux),
        ] {
            assert_eq!(BridgeType::parse(s), Some(want), "{s}");
        }
        for s in ["Ovs", "oVs", "Linux", "LINUX", "lxbr", "Lxbr", " ovs", ""] {
            assert_eq!(BridgeType::parse(s), None, "{s:?}");
        }
    }

    #[test]
    fn original_spellings_and_aliases() {
        let c = parse(&conf(json!({"bridgeType": "LXBR", "isIPMasq": true}))).unwrap();
        assert_eq!(c.bridge_type, BridgeType::Linux);
        assert!(c.ip_masq);
        let c = parse(&conf(
            json!({"bridgeType": "OVS", "ipMasq": false, "isIPMasq": true}),
        ))
        .unwrap();
        assert_eq!(c.bridge_type, BridgeType::Ovs);
        assert!(!c.ip_masq, "ipMasq wins over its alias");
        let c = parse(&conf(json!({"isGateway": false, "isDefaultGateway": true}))).unwrap();
        assert!(c.is_gateway);
        let c = parse(&conf(json!({"bridgeIPv4": "10.244.3.1"}))).unwrap();
        assert!(matches!(c.bridge_ipv4, Some(BridgeAddr::Addr(_))));
    }

    #[test]
    fn bad_configs_name_the_key() {
        let cases: &[(Value, u32, &str)] = &[
            (conf(json!({"mtu": "1500"})), 7, "mtu"),
            (conf(json!({"mtu": 20})), 7, "mtu"),
            (conf(json!({"mtu": 1_000_000})), 7, "mtu"),
            (conf(json!({"mtu": -1})), 7, "mtu"),
            (
                conf(json!({"bridge": "averyveryverylongname"})),
                7,
                "bridge",
            ),
            (conf(json!({"bridge": "../x"})), 7, "bridge"),
            (conf(json!({"bridgeType": "vpp"})), 7, "bridgeType"),
            (conf(json!({"ovsDatapath": "dpdk"})), 7, "ovsDatapath"),
            (conf(json!({"ovsdb": "/var/run/db.sock"})), 7, "ovsdb"),
            (conf(json!({"isGateway": "yes"})), 7, "isGateway"),
            (conf(json!({"ipMasq": 1})), 7, "ipMasq"),
            (conf(json!({"bridgeIPv4": "10.0.0.300"})), 7, "bridgeIPv4"),
            (conf(json!({"ipam": "host-local"})), 7, "ipam"),
            (conf(json!({"ipam": {}})), 7, "type"),
            (
                conf(json!({"ipam": {"type": "../../bin/sh"}})),
                7,
                "ipam.type",
            ),
            (
                conf(json!({"ipam": {"type": "evio"}})),
                7,
                "this plugin itself",
            ),
            (
                conf(json!({"type": "evio-renamed", "ipam": {"type": "evio-renamed"}})),
                7,
                "this plugin itself",
            ),
            (
                conf(json!({"ipamTimeoutSeconds": 0})),
                7,
                "ipamTimeoutSeconds",
            ),
            (
                conf(json!({"ipamTimeoutSeconds": "5"})),
                7,
                "ipamTimeoutSeconds",
            ),
            (
                conf(json!({"ipamTimeoutSeconds": 301})),
                7,
                "ipamTimeoutSeconds",
            ),
            (conf(json!({"name": "a/b"})), 7, "network name"),
            (conf(json!({"cniVersion": "0.2.0"})), 1, "incompatible"),
            (conf(json!({"cniVersion": "x"})), 6, "cniVersion"),
            (conf(json!({"prevResult": []})), 7, "prevResult"),
            (conf(json!({"logFile": "evio.log"})), 7, "logFile"),
            (
                conf(json!({"logFile": "/var/log/../../etc/x"})),
                7,
                "logFile",
            ),
            (
                conf(json!({"ipam": {"type": "host-local", "dataDir": "../x"}})),
                7,
                "ipam.dataDir",
            ),
            (
                conf(json!({"ipam": {"type": "host-local", "dataDir": "/var/lib/cni/../../etc"}})),
                7,
                "ipam.dataDir",
            ),
            (
                conf(json!({"ipam": {"type": "host-local", "dataDir": "/a\u{0}b"}})),
                7,
                "ipam.dataDir",
            ),
            (
                conf(json!({"ipam": {"type": "host-local", "dataDir": 5}})),
                7,
                "ipam.dataDir",
            ),
            (conf(json!({"bridge": "br\u{0}x"})), 7, "bridge"),
            (
                conf(json!({"cni.dev/valid-attachments": [{"containerID": 1}]})),
                7,
                "attachments",
            ),
            (json!([1, 2]), 6, "object"),
        ];
        for (v, code, word) in cases {
            let e = parse(v).unwrap_err();
            assert_eq!(e.code, *code, "{v}: {e:?}");
            assert!(
                format!("{} {}", e.msg, e.details).contains(word),
                "{v}: message {e} should name {word}"
            );
        }
        assert_eq!(NetConf::parse(b"{\"cniVersion\":").unwrap_err().code, 6);
        assert_eq!(NetConf::parse(&[0xff, 0xfe]).unwrap_err().code, 6);
    }

    #[test]
    fn gc_attachments_both_keys() {
        let c = parse(&conf(json!({"cni.dev/valid-attachments": [
            {"containerID": "a", "ifname": "eth0"}]})))
        .unwrap();
        assert_eq!(c.valid_attachments.unwrap().len(), 1);
        let c = parse(&conf(json!({"cni.dev/attachments": []}))).unwrap();
        assert_eq!(c.valid_attachments.unwrap().len(), 0);
    }

    #[test]
    fn peek_version_falls_back() {
        assert_eq!(peek_version(br#"{"cniVersion":"0.4.0"}"#), "0.4.0");
        assert_eq!(peek_version(b"junk"), crate::version::LATEST);
        assert_eq!(
            peek_version(br#"{"cniVersion":"9.0.0"}"#),
            crate::version::LATEST
        );
    }
}
