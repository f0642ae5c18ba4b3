//! What the agent knew last, kept in its data dir (the directory of
//! `overlay.keyFile`): its allocations, the lease its liveness hangs on and
//! the last peer set it believed. Every start hands the cached peers to the
//! engine before the store has been read, so handshakes go out at once; a
//! start while the store does not answer (a reboot during an etcd outage)
//! runs from it entirely, and reconciles when the store comes back.
//!
//! The cache is a hint, never the truth: a cache of another network, node,
//! store or layout is not used, and what the store says wins whenever it
//! answers.

use std::path::{Path, PathBuf};

use evio_subnet::PeerRecord;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Cache {
    pub network: String,
    pub node: String,
    /// The store it came from (`file://…`, `etcd://…`).
    pub store: String,
    /// The pod CIDR and node bits the subnet was carved with.
    pub pod_cidr: String,
    pub node_bits: u8,
    pub pod_subnet: String,
    /// The host CIDR the address came from, and the address with its
    /// prefix (`10.10.0.3/16`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_cidr: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_address: Option<String>,
    /// The IPv6 host address of a dual-stack host CIDR (`host_cidr` then
    /// names both prefixes, comma-separated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_address6: Option<String>,
    /// etcd's lease id of the node's liveness: a restart within its TTL
    /// takes it over and the node never turns stale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<i64>,
    /// The peer records last believed (already checked against the
    /// allocations).
    #[serde(default)]
    pub peers: Vec<PeerRecord>,
}

impl Cache {
    /// Whether this cache describes the node a config asks for.
    pub fn fits(&self, want: &Cache) -> bool {
        self.network == want.network
            && self.node == want.node
            && self.store == want.store
            && self.pod_cidr == want.pod_cidr
            && self.node_bits == want.node_bits
            && self.host_cidr == want.host_cidr
    }
}

/// The cache file of `node` in `network`, in `dir`.
pub fn path(dir: &Path, network: &str, node: &str) -> PathBuf {
    dir.join(format!("state-{network}-{node}.json"))
}

/// The cache at `path`; `None` when there is none, or it cannot be read
/// (said once on the log: a broken cache costs only the head start).
pub fn load(path: &Path) -> Option<Cache> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!("state cache {}: {e}; not used", path.display());
            return None;
        }
    };
    match serde_json::from_slice(&bytes) {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!("state cache {}: {e}; not used", path.display());
            None
        }
    }
}

/// Writes the cache atomically (a crash leaves the old one), mode 0600:
/// it names the node's endpoints.
pub fn save(path: &Path, c: &Cache) -> Result<(), String> {
    let mut bytes = serde_json::to_vec_pretty(c).map_err(|e| e.to_string())?;
    bytes.push(b'\n');
    evio_subnet::write_file_atomic(path, &bytes, 0o600).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_fit_and_broken_files() {
        let d = tempfile::tempdir().unwrap();
        let p = path(d.path(), "evio", "n1");
        assert_eq!(load(&p), None);
        let c = Cache {
            network: "evio".into(),
            node: "n1".into(),
            store: "etcd://203.0.113.1:2379".into(),
            pod_cidr: "10.244.0.0/16".into(),
            node_bits: 8,
            pod_subnet: "10.244.3.0/24".into(),
            host_cidr: Some("10.10.0.0/16".into()),
            host_address: Some("10.10.0.3/16".into()),
            host_address6: Some("fd00:10::3/64".into()),
            lease: Some(7),
            peers: Vec::new(),
        };
        save(&p, &c).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let back = load(&p).unwrap();
        assert_eq!(back, c);
        assert!(back.fits(&c));
        for f in [
            |c: &mut Cache| c.store = "etcd://other:2379".into(),
            |c: &mut Cache| c.node_bits = 6,
            |c: &mut Cache| c.host_cidr = None,
            |c: &mut Cache| c.node = "n2".into(),
        ] {
            let mut other = c.clone();
            f(&mut other);
            assert!(!back.fits(&other));
        }
        std::fs::write(&p, "{not json").unwrap();
        assert_eq!(load(&p), None);
    }
}
