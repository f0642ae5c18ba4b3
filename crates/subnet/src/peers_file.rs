//! [`OverlayStore`] over the embedded file store: the records live in the
//! same JSON file as the subnets, under the same lock.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use ipnet::IpNet;

use crate::peers::{host_key, host_owner as owner, now_rfc3339, pick_host, Name};
use crate::{
    peers::Allocations, FileStore, HostAllocation, Liveness, OverlayBackend, PeerRecord,
    PeerSnapshot, SubnetError,
};

/// How often a watcher looks at the file. A `stat` is all it costs, and
/// this bounds how late a new peer is seen.
const POLL: Duration = Duration::from_millis(200);

impl FileStore {
    /// Identity of the current file version: the file is replaced by rename
    /// on every write, so inode, size and mtime change with every version.
    fn version_token(&self) -> u128 {
        match std::fs::metadata(self.path()) {
            Ok(m) => {
                let mut h = DefaultHasher::new();
                (m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec()).hash(&mut h);
                u128::from(h.finish()) | 1
            }
            Err(_) => 0,
        }
    }

    fn snapshot(&self, network: &str) -> Result<PeerSnapshot, SubnetError> {
        // Token first: a write between the two reads then shows up as a
        // change at the next poll instead of being missed.
        let token = self.version_token();
        let data = self.read()?;
        let records = data
            .networks
            .get(network)
            .map(|n| n.peers.values().cloned().collect())
            .unwrap_or_default();
        Ok(PeerSnapshot { records, token })
    }
}

#[async_trait]
impl OverlayBackend for FileStore {
    async fn allocate_host(
        &self,
        network: Name<'_>,
        node: Name<'_>,
        cidr: IpNet,
        preferred: Option<IpAddr>,
    ) -> Result<HostAllocation, SubnetError> {
        let (network, node) = (network.as_str(), node.as_str());
        let _guard = self.lock().await?;
        let mut data = self.read()?;
        let net = data.networks.entry(network.to_string()).or_default();
        if let Some(v) = net.hostnodes.get(node) {
            let addr: IpAddr = v.parse().map_err(|_| SubnetError::Corrupt {
                location: format!(
                    "{} networks.{network}.hostnodes.{node}",
                    self.path().display()
                ),
                reason: format!("{v:?} is not an IP address"),
            })?;
            if cidr.contains(&addr) {
                let key = host_key(addr);
                match net.hostaddrs.get(&key) {
                    Some(r) if r.node == node => {}
                    Some(r) => {
                        return Err(SubnetError::Corrupt {
                            location: format!(
                                "{} networks.{network}.hostaddrs.{key}",
                                self.path().display()
                            ),
                            reason: format!(
                                "node {node:?} records {addr} but it is owned by {:?}",
                                r.node
                            ),
                        })
                    }
                    None => {
                        net.hostaddrs.insert(key, owner(node, addr));
                        self.write(&data)?;
                    }
                }
                return Ok(HostAllocation {
                    addr,
                    existing: true,
                });
            }
            // The host CIDR changed: the old address is meaningless now.
            net.hostnodes.remove(node);
            net.hostaddrs.remove(&host_key(addr));
        }
        let taken = |a: IpAddr| net.hostaddrs.contains_key(&host_key(a));
        let addr =
            pick_host(cidr, preferred, &taken, &mut rand::thread_rng())?.ok_or_else(|| {
                SubnetError::Exhausted {
                    network: network.to_string(),
                    cidr,
                    capacity: net.hostaddrs.len() as u128,
                }
            })?;
        net.hostnodes.insert(node.to_string(), addr.to_string());
        net.hostaddrs.insert(host_key(addr), owner(node, addr));
        self.write(&data)?;
        Ok(HostAllocation {
            addr,
            existing: false,
        })
    }

    async fn release_host(
        &self,
        network: Name<'_>,
        node: Name<'_>,
    ) -> Result<Option<IpAddr>, SubnetError> {
        let (network, node) = (network.as_str(), node.as_str());
        let _guard = self.lock().await?;
        let mut data = self.read()?;
        let Some(net) = data.networks.get_mut(network) else {
            return Ok(None);
        };
        let Some(v) = net.hostnodes.remove(node) else {
            return Ok(None);
        };
        let addr = v.parse::<IpAddr>().ok();
        if let Some(a) = addr {
            if net
                .hostaddrs
                .get(&host_key(a))
                .is_some_and(|r| r.node == node)
            {
                net.hostaddrs.remove(&host_key(a));
            }
        }
        self.write(&data)?;
        Ok(addr)
    }

    async fn publish(
        &self,
        network: Name<'_>,
        node: Name<'_>,
        record: &PeerRecord,
        _ttl: Duration,
    ) -> Result<(), SubnetError> {
        let _guard = self.lock().await?;
        let mut data = self.read()?;
        let net = data.networks.entry(network.to_string()).or_default();
        if net.peers.get(node.as_str()) == Some(record) {
            return Ok(());
        }
        net.peers.insert(node.to_string(), record.clone());
        self.write(&data)
    }

    async fn refresh(&self, network: Name<'_>, node: Name<'_>) -> Result<Liveness, SubnetError> {
        let (network, node) = (network.as_str(), node.as_str());
        let _guard = self.lock().await?;
        let mut data = self.read()?;
        let Some(rec) = data
            .networks
            .get_mut(network)
            .and_then(|n| n.peers.get_mut(node))
        else {
            return Ok(Liveness::Revoked);
        };
        rec.heartbeat = now_rfc3339();
        self.write(&data)?;
        Ok(Liveness::Alive)
    }

    async fn peers(&self, network: Name<'_>) -> Result<PeerSnapshot, SubnetError> {
        let network = network.as_str();
        self.snapshot(network)
    }

    async fn watch_peers(
        &self,
        network: Name<'_>,
        since: &PeerSnapshot,
        wait: Duration,
    ) -> Result<Option<PeerSnapshot>, SubnetError> {
        let network = network.as_str();
        let deadline = Instant::now() + wait;
        loop {
            if self.version_token() != since.token {
                return self.snapshot(network).map(Some);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            tokio::time::sleep(POLL.min(left)).await;
        }
    }

    async fn remove_peer(&self, network: Name<'_>, node: Name<'_>) -> Result<bool, SubnetError> {
        let (network, node) = (network.as_str(), node.as_str());
        let _guard = self.lock().await?;
        let mut data = self.read()?;
        let removed = data
            .networks
            .get_mut(network)
            .and_then(|n| n.peers.remove(node))
            .is_some();
        if removed {
            self.write(&data)?;
        }
        Ok(removed)
    }

    async fn allocations(&self, network: Name<'_>) -> Result<Allocations, SubnetError> {
        let network = network.as_str();
        let data = self.read()?;
        let mut out = Allocations::default();
        if let Some(n) = data.networks.get(network) {
            for (node, v) in &n.nodes {
                if let Ok(net) = v.parse() {
                    out.subnets.insert(node.clone(), net);
                }
            }
            for (node, v) in &n.hostnodes {
                if let Ok(a) = v.parse() {
                    out.hosts.insert(node.clone(), a);
                }
            }
        }
        Ok(out)
    }
}
