//! The ADD result, read from the IPAM delegate or `prevResult` in any
//! supported version and written in the config's version.
//!
//! Internally it is the 1.x model. 0.3.x/0.4.0 differ only in the `"version"`
//! ("4"/"6") carried by every IP entry, which is derived from the address and
//! so is dropped on input and re-added on output.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{code, CniError, Result};
use crate::version::Version;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CniResult {
    #[serde(rename = "cniVersion", default)]
    pub cni_version: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub dns: Dns,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    #[serde(
        rename = "socketPath",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub socket_path: Option<String>,
    #[serde(rename = "pciID", default, skip_serializing_if = "Option::is_none")]
    pub pci_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IpConfig {
    pub address: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Route {
    pub dst: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advmss: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<u8>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl CniResult {
    /// Reads a result of any supported version. A missing or unsupported
    /// `cniVersion` is code 1; a malformed body is code 6 naming the field.
    pub fn from_value(v: &Value) -> Result<CniResult> {
        let ver = v
            .get("cniVersion")
            .and_then(Value::as_str)
            .ok_or_else(|| CniError::new(code::DECODE, "result has no cniVersion"))?;
        Version::supported(ver)?;
        let mut v = v.clone();
        // 0.3.x/0.4.0 "version" per IP: checked against the address, then
        // dropped (the 1.x model derives it).
        if let Some(ips) = v.get_mut("ips").and_then(Value::as_array_mut) {
            for ip in ips.iter_mut().filter_map(Value::as_object_mut) {
                ip.remove("version");
            }
        }
        serde_json::from_value(v)
            .map_err(|e| CniError::new(code::DECODE, format!("cannot decode result: {e}")))
    }

    pub fn from_slice(bytes: &[u8]) -> Result<CniResult> {
        let v: Value = serde_json::from_slice(bytes)
            .map_err(|e| CniError::new(code::DECODE, format!("result is not JSON: {e}")))?;
        CniResult::from_value(&v)
    }

    /// The result as the given spec version prints it.
    pub fn to_value(&self, version: &str) -> Result<Value> {
        let ver = Version::supported(version)?;
        let mut out = self.clone();
        out.cni_version = version.to_string();
        let mut v = serde_json::to_value(&out)
            .map_err(|e| CniError::new(code::IO, format!("cannot encode result: {e}")))?;
        if ver.ips_carry_version() {
            if let Some(ips) = v.get_mut("ips").and_then(Value::as_array_mut) {
                for ip in ips.iter_mut().filter_map(Value::as_object_mut) {
                    let fam = match ip.get("address").and_then(Value::as_str) {
                        Some(a) if a.contains(':') => "6",
                        _ => "4",
                    };
                    ip.insert("version".into(), Value::from(fam));
                }
            }
        }
        // Routes' 1.1.0 fields mean nothing to older readers.
        if ver < Version::V1_1_0 {
            if let Some(routes) = v.get_mut("routes").and_then(Value::as_array_mut) {
                for r in routes.iter_mut().filter_map(Value::as_object_mut) {
                    strip(r, &["mtu", "advmss", "priority", "table", "scope"]);
                }
            }
        }
        Ok(v)
    }
}

fn strip(m: &mut Map<String, Value>, keys: &[&str]) {
    for k in keys {
        m.remove(*k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn hostlocal_040() -> Value {
        json!({
            "cniVersion": "0.4.0",
            "ips": [
                {"version": "4", "address": "10.244.3.2/16", "gateway": "10.244.3.1"},
                {"version": "6", "address": "fd00::2/64", "gateway": "fd00::1"}
            ],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dns": {}
        })
    }

    #[test]
    fn reads_040_and_writes_each_version() {
        let r = CniResult::from_value(&hostlocal_040()).unwrap();
        assert_eq!(r.ips.len(), 2);
        assert_eq!(r.ips[0].address.to_string(), "10.244.3.2/16");
        let v1 = r.to_value("1.1.0").unwrap();
        assert_eq!(v1["cniVersion"], "1.1.0");
        assert!(v1["ips"][0].get("version").is_none());
        let v0 = r.to_value("0.3.1").unwrap();
        assert_eq!(v0["ips"][0]["version"], "4");
        assert_eq!(v0["ips"][1]["version"], "6");
        // Round trip through an old version loses nothing.
        assert_eq!(CniResult::from_value(&v0).unwrap().ips, r.ips);
    }

    #[test]
    fn interface_index_and_sandbox_roundtrip() {
        let mut r = CniResult::from_value(&hostlocal_040()).unwrap();
        r.interfaces.push(Interface {
            name: "eth0".into(),
            mac: Some("aa:bb:cc:dd:ee:ff".into()),
            sandbox: Some("/run/netns/p".into()),
            ..Default::default()
        });
        r.ips[0].interface = Some(0);
        let v = r.to_value("1.0.0").unwrap();
        assert_eq!(v["interfaces"][0]["sandbox"], "/run/netns/p");
        assert_eq!(v["ips"][0]["interface"], 0);
        assert!(v["interfaces"][0].get("mtu").is_none());
    }

    #[test]
    fn route_11_fields_dropped_for_older() {
        let r = CniResult {
            routes: vec![Route {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: None,
                mtu: Some(1400),
                advmss: None,
                priority: Some(5),
                table: None,
                scope: None,
            }],
            ..Default::default()
        };
        assert_eq!(r.to_value("1.1.0").unwrap()["routes"][0]["mtu"], 1400);
        assert!(r.to_value("1.0.0").unwrap()["routes"][0]
            .get("mtu")
            .is_none());
    }

    #[test]
    fn malformed_results_are_errors_not_panics() {
        for bad in [
            json!({}),
            json!({"cniVersion": 4}),
            json!({"cniVersion": "0.2.0"}),
            json!({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.300/24"}]}),
            json!({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.3/33"}]}),
            json!({"cniVersion": "1.0.0", "ips": "x"}),
            json!({"cniVersion": "1.0.0", "routes": [{"gw": "10.0.0.1"}]}),
            json!({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.3/24", "interface": -1}]}),
        ] {
            let e = CniResult::from_value(&bad).unwrap_err();
            assert!(e.code == 1 || e.code == 6, "{bad}: {e:?}");
        }
        assert_eq!(CniResult::from_slice(b"{nope").unwrap_err().code, 6);
    }
}
