//! The ConfigMap's `net-conf.json`, merged with command-line overrides.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::NodeError;

/// Keys this program reads. Anything else is ignored (the ConfigMap may be
/// shared with other components), unless it differs from one of these only
/// in case: that is a typo that would otherwise silently fall back to a default.
const KNOWN_KEYS: &[&str] = &[
    "cniVersion",
    "name",
    "type",
    "podCIDR",
    "nodeBits",
    "dataStore",
    "bridge",
    "bridgeType",
    "ovsdb",
    "ovsDatapath",
    "ovsRunDir",
    "isGateway",
    "isDefaultGateway",
    "ipMasq",
    "isIPMasq",
    "mtu",
    "hairpinMode",
    "bridgeIPv4",
    "routes",
    "dataDir",
    "ipam",
    "etcdCACert",
    "etcdCert",
    "etcdKey",
    "etcdUsernameFile",
    "etcdPasswordFile",
    "etcdAllowPlaintextPassword",
    "hostCIDR",
    "hostAddress",
    "hostInterface",
    "overlay",
    "singleNode",
    "conflistName",
    "reclaimAfter",
];

/// A loaded (or empty, without `--config`) configuration object with typed,
/// lenient accessors: the original accepted numbers and booleans as strings.
#[derive(Debug, Default, Clone)]
pub struct RawConf {
    source: String,
    map: Map<String, Value>,
}

impl RawConf {
    pub fn load(path: Option<&Path>) -> Result<RawConf, NodeError> {
        let Some(path) = path else {
            return Ok(RawConf {
                source: "flags".into(),
                map: Map::new(),
            });
        };
        let bytes = std::fs::read(path).map_err(NodeError::io(path))?;
        RawConf::parse(&path.display().to_string(), &bytes)
    }

    pub fn parse(source: &str, bytes: &[u8]) -> Result<RawConf, NodeError> {
        let err = |reason: String| NodeError::Config {
            source_name: source.to_string(),
            reason,
        };
        let v: Value =
            serde_json::from_slice(bytes).map_err(|e| err(format!("not valid JSON: {e}")))?;
        let Value::Object(map) = v else {
            return Err(err("expected a JSON object".into()));
        };
        for k in map.keys() {
            if KNOWN_KEYS.contains(&k.as_str()) {
                continue;
            }
            if let Some(known) = KNOWN_KEYS.iter().find(|kk| kk.eq_ignore_ascii_case(k)) {
                return Err(err(format!("unknown key {k:?} (did you mean {known:?}?)")));
            }
        }
        Ok(RawConf {
            source: source.to_string(),
            map,
        })
    }

    fn err(&self, key: &str, reason: impl std::fmt::Display) -> NodeError {
        NodeError::Config {
            source_name: self.source.clone(),
            reason: format!("{key}: {reason}"),
        }
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    /// A key's raw JSON value (for nested objects such as `overlay`).
    pub fn raw(&self, key: &str) -> Option<&Value> {
        self.get(key)
    }

    pub fn string(&self, key: &str) -> Result<Option<String>, NodeError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(self.err(key, format!("expected a string, got {other}"))),
        }
    }

    pub fn path(&self, key: &str) -> Result<Option<PathBuf>, NodeError> {
        Ok(self
            .string(key)?
            .filter(|s| !s.is_empty())
            .map(PathBuf::from))
    }

    pub fn boolean(&self, key: &str) -> Result<Option<bool>, NodeError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(Value::String(s)) => parse_bool(s)
                .map(Some)
                .ok_or_else(|| self.err(key, format!("expected true or false, got {s:?}"))),
            Some(other) => Err(self.err(key, format!("expected true or false, got {other}"))),
        }
    }

    pub fn number(&self, key: &str) -> Result<Option<u64>, NodeError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_u64()
                .map(Some)
                .ok_or_else(|| self.err(key, format!("expected a whole number, got {n}"))),
            Some(Value::String(s)) => {
                let t = s.trim();
                if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(self.err(key, format!("expected a whole number, got {s:?}")));
                }
                t.parse()
                    .map(Some)
                    .map_err(|_| self.err(key, format!("number {s:?} is too large")))
            }
            Some(other) => Err(self.err(key, format!("expected a whole number, got {other}"))),
        }
    }

    /// `nodeBits`: a number or a numeric string.
    pub fn node_bits(&self) -> Result<Option<u32>, NodeError> {
        match self.get("nodeBits") {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_u64()
                .map(|v| u32::try_from(v).unwrap_or(u32::MAX))
                .map(Some)
                .ok_or_else(|| {
                    NodeError::Subnet(evio_subnet::SubnetError::InvalidNodeBits {
                        input: n.to_string(),
                    })
                }),
            Some(Value::String(s)) => Ok(Some(evio_subnet::parse_node_bits(s)?)),
            Some(other) => Err(NodeError::Subnet(
                evio_subnet::SubnetError::InvalidNodeBits {
                    input: other.to_string(),
                },
            )),
        }
    }

    /// A raw JSON value, from the top level or, as a fallback, from an
    /// `ipam` object (for configs written with the IPAM keys nested).
    pub fn ipam_value(&self, key: &str) -> Option<Value> {
        self.get(key).cloned().or_else(|| {
            self.get("ipam")
                .and_then(|i| i.get(key))
                .filter(|v| !v.is_null())
                .cloned()
        })
    }
}

pub fn parse_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" => Some(true),
        "false" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(j: &str) -> RawConf {
        RawConf::parse("t.json", j.as_bytes()).unwrap()
    }

    #[test]
    fn lenient_types() {
        let c = conf(r#"{"nodeBits":"8","mtu":"1400","ipMasq":"true","isGateway":false}"#);
        assert_eq!(c.node_bits().unwrap(), Some(8));
        assert_eq!(c.number("mtu").unwrap(), Some(1400));
        assert_eq!(c.boolean("ipMasq").unwrap(), Some(true));
        assert_eq!(c.boolean("isGateway").unwrap(), Some(false));
        assert_eq!(conf(r#"{"nodeBits":4}"#).node_bits().unwrap(), Some(4));
        assert_eq!(conf(r#"{"nodeBits":null}"#).node_bits().unwrap(), None);
    }

    #[test]
    fn type_errors_name_the_key() {
        let e = conf(r#"{"mtu":"big"}"#).number("mtu").unwrap_err();
        assert!(e.to_string().contains("mtu"), "{e}");
        let e = conf(r#"{"ipMasq":1}"#).boolean("ipMasq").unwrap_err();
        assert!(e.to_string().contains("ipMasq"), "{e}");
        assert!(conf(r#"{"nodeBits":-1}"#).node_bits().is_err());
        assert!(conf(r#"{"nodeBits":2.5}"#).node_bits().is_err());
        assert!(conf(r#"{"nodeBits":"eight"}"#).node_bits().is_err());
        assert!(conf(r#"{"nodeBits":[8]}"#).node_bits().is_err());
        assert!(conf(r#"{"bridge":5}"#).string("bridge").is_err());
    }

    #[test]
    fn near_miss_keys_are_rejected_others_ignored() {
        let e = RawConf::parse("t.json", br#"{"podCidr":"10.0.0.0/8"}"#).unwrap_err();
        assert!(e.to_string().contains("did you mean \"podCIDR\""), "{e}");
        RawConf::parse("t.json", br#"{"agentKey":1}"#).unwrap();
        assert!(RawConf::parse("t.json", b"[1]").is_err());
        assert!(RawConf::parse("t.json", b"{").is_err());
    }

    #[test]
    fn nested_ipam_fallback() {
        let c = conf(r#"{"ipam":{"dataDir":"/x"},"routes":[{"dst":"0.0.0.0/0"}]}"#);
        assert_eq!(c.ipam_value("dataDir"), Some(Value::String("/x".into())));
        assert!(c.ipam_value("routes").is_some());
    }
}
