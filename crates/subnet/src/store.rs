use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use ipnet::IpNet;

use crate::{EtcdOptions, EtcdStore, FileStore, NodeSubnet, OwnerRecord, PodNetwork, SubnetError};

/// The embedded store used when neither `--store` nor `dataStore` is given.
pub const DEFAULT_STORE: &str = "file:///var/lib/evio/subnets.json";

/// Result of [`SubnetStore::allocate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub subnet: NodeSubnet,
    /// The node already held this subnet (a restart), nothing was written.
    pub existing: bool,
}

/// One allocated subnet as listed by [`SubnetStore::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub subnet: IpNet,
    pub record: OwnerRecord,
}

/// Where allocations live. Every method is safe to call concurrently from
/// many processes (and, for etcd, many machines): an allocation creates the
/// node's key and the subnet's key together or not at all.
#[async_trait]
pub trait SubnetStore: Send + Sync {
    /// Returns the node's subnet, allocating a free one if it has none.
    /// Fails with [`SubnetError::Exhausted`] when every slot is taken and
    /// with [`SubnetError::ForeignSubnet`] when the node holds a subnet that
    /// is not part of `pod`'s layout.
    async fn allocate(
        &self,
        network: &str,
        node: &str,
        pod: &PodNetwork,
    ) -> Result<Allocation, SubnetError>;

    /// The subnet recorded for `node`, if any.
    async fn lookup(&self, network: &str, node: &str) -> Result<Option<IpNet>, SubnetError>;

    /// All allocated subnets of `network`, sorted by address.
    async fn list(&self, network: &str) -> Result<Vec<Lease>, SubnetError>;

    /// Frees the node's subnet and returns it.
    async fn release(&self, network: &str, node: &str) -> Result<IpNet, SubnetError>;

    /// Requests sent to the backing store so far (etcd RPCs including
    /// retries; for the file store, one per locked read or read-modify-write).
    fn round_trips(&self) -> u64;

    /// Human-readable location, for messages.
    fn describe(&self) -> String;
}

/// A parsed `--store` / `dataStore` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    File(PathBuf),
    /// `host:port` endpoints, at least one.
    Etcd(Vec<String>),
}

impl StoreUrl {
    pub fn parse(url: &str) -> Result<StoreUrl, SubnetError> {
        let bad = |reason: &str| SubnetError::InvalidStore {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        if let Some(path) = url.strip_prefix("file://") {
            if !path.starts_with('/') || path.len() < 2 || path.ends_with('/') {
                return Err(bad(
                    "file store needs an absolute file path, e.g. file:///var/lib/evio/subnets.json",
                ));
            }
            return Ok(StoreUrl::File(PathBuf::from(path)));
        }
        if let Some(rest) = url.strip_prefix("etcd://") {
            let rest = rest.trim_end_matches('/');
            let mut eps = Vec::new();
            for ep in rest.split(',') {
                let ep = ep.trim();
                let Some((host, port)) = ep.rsplit_once(':') else {
                    return Err(bad("each etcd endpoint must be HOST:PORT"));
                };
                let host_ok = !host.is_empty()
                    && !host.contains(['/', '@', '?', '#', ' '])
                    && (!host.contains(':') || (host.starts_with('[') && host.ends_with(']')));
                if !host_ok {
                    return Err(bad(
                        "each etcd endpoint must be HOST:PORT (IPv6 as [ADDR]:PORT)",
                    ));
                }
                match port.parse::<u16>() {
                    Ok(p) if p != 0 => {}
                    _ => return Err(bad("etcd endpoint port must be 1..=65535")),
                }
                eps.push(ep.to_string());
            }
            return Ok(StoreUrl::Etcd(eps));
        }
        Err(bad(
            "unsupported store; use file:///PATH or etcd://HOST:PORT[,HOST:PORT...]",
        ))
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreUrl::File(p) => write!(f, "file://{}", p.display()),
            StoreUrl::Etcd(eps) => write!(f, "etcd://{}", eps.join(",")),
        }
    }
}

/// Knobs shared by all stores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreOptions {
    /// Upper bound for one store operation including retries (and, for the
    /// file store, waiting for the lock).
    pub timeout: Duration,
    pub etcd: EtcdOptions,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            timeout: Duration::from_secs(30),
            etcd: EtcdOptions::default(),
        }
    }
}

/// Opens the store `url` names. For etcd this connects (and authenticates),
/// retrying until `opts.timeout`.
pub async fn open_store(
    url: &StoreUrl,
    opts: &StoreOptions,
) -> Result<Box<dyn SubnetStore>, SubnetError> {
    Ok(match url {
        StoreUrl::File(p) => Box::new(FileStore::new(p.clone(), opts.timeout)),
        StoreUrl::Etcd(eps) => Box::new(EtcdStore::connect(eps, &opts.etcd, opts.timeout).await?),
    })
}

/// Opens the store `url` names for the overlay's records.
pub async fn open_overlay_store(
    url: &StoreUrl,
    opts: &StoreOptions,
) -> Result<Box<dyn crate::OverlayStore>, SubnetError> {
    Ok(match url {
        StoreUrl::File(p) => Box::new(FileStore::new(p.clone(), opts.timeout)),
        StoreUrl::Etcd(eps) => Box::new(EtcdStore::connect(eps, &opts.etcd, opts.timeout).await?),
    })
}

/// Checks that a subnet a node already holds fits the current layout.
pub(crate) fn existing(
    pod: &PodNetwork,
    node: &str,
    subnet: IpNet,
) -> Result<NodeSubnet, SubnetError> {
    pod.index_of(&subnet)
        .and_then(|i| pod.node(i).ok())
        .ok_or_else(|| SubnetError::ForeignSubnet {
            node: node.to_string(),
            subnet,
            cidr: pod.cidr(),
            node_bits: pod.node_bits(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            StoreUrl::parse(DEFAULT_STORE).unwrap(),
            StoreUrl::File("/var/lib/evio/subnets.json".into())
        );
        assert_eq!(
            StoreUrl::parse("etcd://127.0.0.1:2379,10.0.0.2:2379/").unwrap(),
            StoreUrl::Etcd(vec!["127.0.0.1:2379".into(), "10.0.0.2:2379".into()])
        );
        assert_eq!(
            StoreUrl::parse("etcd://[::1]:2379").unwrap(),
            StoreUrl::Etcd(vec!["[::1]:2379".into()])
        );
        for bad in [
            "",
            "/var/lib/x.json",
            "file://",
            "file://rel/x.json",
            "file:///dir/",
            "etcd://",
            "etcd://host",
            "etcd://host:0",
            "etcd://host:99999",
            "etcd://:2379",
            "etcd://::1:2379",
            "etcd://a:1,,b:2",
            "http://x:2379",
            "etcd://u@h:1",
        ] {
            assert!(
                matches!(StoreUrl::parse(bad), Err(SubnetError::InvalidStore { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn display_roundtrip() {
        for u in ["file:///tmp/a.json", "etcd://127.0.0.1:1,127.0.0.1:2"] {
            assert_eq!(StoreUrl::parse(u).unwrap().to_string(), u);
        }
    }
}
