use std::time::SystemTime;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::arith::parse_cidr;
use crate::SubnetError;

/// Value stored under `/evio/<network>/subnets/<addr>-<prefix>`: who holds
/// the subnet and since when. Unknown fields are kept so that newer writers
/// can add some without older readers dropping them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerRecord {
    pub node: String,
    /// RFC 3339, UTC, seconds.
    pub time: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<String>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl OwnerRecord {
    pub fn now(node: &str, subnet: &IpNet) -> OwnerRecord {
        OwnerRecord {
            node: node.to_string(),
            time: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            subnet: Some(subnet.to_string()),
            extra: serde_json::Map::new(),
        }
    }
}

/// `<addr>-<prefix>`: a `/` would add a level to the key hierarchy.
pub fn subnet_key(subnet: &IpNet) -> String {
    format!("{}-{}", subnet.network(), subnet.prefix_len())
}

/// Inverse of [`subnet_key`]; `None` for anything that is not one.
pub fn parse_subnet_key(key: &str) -> Option<IpNet> {
    let (addr, prefix) = key.rsplit_once('-')?;
    let net = parse_cidr(&format!("{addr}/{prefix}")).ok()?;
    (net.trunc() == net).then_some(net)
}

/// Path of a node's key, relative to the network's prefix.
pub fn node_key(node: &str) -> String {
    format!("nodes/{node}")
}

/// Network and node names become key segments and file keys: keep them to
/// the characters Kubernetes allows in node names (plus upper case, which
/// hostnames may have) so no name can escape its prefix.
pub fn validate_name(what: &'static str, name: &str) -> Result<(), SubnetError> {
    let bad = |reason| SubnetError::InvalidName {
        what,
        name: name.to_string(),
        reason,
    };
    if name.is_empty() {
        return Err(bad("must not be empty"));
    }
    if name.len() > 253 {
        return Err(bad("longer than 253 characters"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
    {
        return Err(bad("only letters, digits, '-', '.' and '_' are allowed"));
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(bad("must start with a letter or digit"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        let n: IpNet = "10.244.3.0/24".parse().unwrap();
        assert_eq!(subnet_key(&n), "10.244.3.0-24");
        assert_eq!(parse_subnet_key("10.244.3.0-24"), Some(n));
        let v6: IpNet = "fd00:10:0:abcd::/64".parse().unwrap();
        assert_eq!(subnet_key(&v6), "fd00:10:0:abcd::-64");
        assert_eq!(parse_subnet_key(&subnet_key(&v6)), Some(v6));
        for bad in ["10.244.3.0", "10.244.3.1-24", "x-24", "10.244.3.0-33", ""] {
            assert_eq!(parse_subnet_key(bad), None, "{bad}");
        }
    }

    #[test]
    fn names() {
        for ok in ["node-1", "a", "ip-10-0-0-1.ec2.internal", "Host_A"] {
            validate_name("node name", ok).unwrap();
        }
        for bad in ["", "a/b", "../x", "-x", ".x", "a b", "é", &"x".repeat(254)] {
            assert!(validate_name("node name", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn record_roundtrip_keeps_unknown_fields() {
        let j = r#"{"node":"n1","time":"2024-01-01T00:00:00Z","zone":"edge-3"}"#;
        let r: OwnerRecord = serde_json::from_str(j).unwrap();
        assert_eq!(r.node, "n1");
        let back = serde_json::to_value(&r).unwrap();
        assert_eq!(back["zone"], "edge-3");
    }
}
