//! [`OverlayStore`] over the embedded file store: the records live in the
//! same JSON file as the subnets, under the same lock.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use ipnet::IpNet;

use crate::file::NetData;
use crate::peers::{
    check_held, host_key, host_owner as owner, now_rfc3339, pick_host, HostSlot, Name,
};
use crate::{
    parse_subnet_key, peers::Allocations, subnet_key, Alive, FileStore, HostAllocation, Liveness,
    OverlayBackend, PeerRecord, PeerSnapshot, ReleaseRequest, Released, ReleasedNode, SubnetError,
    FILE_STALE_AFTER,
};

/// Whether a heartbeat (RFC 3339) is recent enough to call its node live.
fn fresh(heartbeat: &str, now: SystemTime) -> bool {
    humantime::parse_rfc3339_weak(heartbeat)
        .ok()
        .is_some_and(|t| now.duration_since(t).unwrap_or_default() <= FILE_STALE_AFTER)
}

/// The snapshot of one network's data, liveness judged at `now`.
fn snapshot_of(n: &NetData, token: u128, now: SystemTime) -> PeerSnapshot {
    let mut live = std::collections::BTreeMap::new();
    for (node, a) in &n.alive {
        if fresh(&a.heartbeat, now) && n.peers.contains_key(node) {
            live.insert(node.clone(), a.clone());
        }
    }
    // A record refreshed by an agent that keeps no alive entry (an older
    // version) is live by its own heartbeat.
    for (node, r) in &n.peers {
        if !live.contains_key(node) && !n.alive.contains_key(node) && fresh(&r.heartbeat, now) {
            let a = Alive {
                heartbeat: r.heartbeat.clone(),
                connected: Vec::new(),
            };
            live.insert(node.clone(), a);
        }
    }
    PeerSnapshot {
        records: n.peers.values().cloned().collect(),
        live,
        alloc: allocations_of(n),
        released: n.released.clone(),
        token,
    }
}

/// The node -> address map of `slot`.
fn nodes_of(n: &mut NetData, slot: HostSlot) -> &mut std::collections::BTreeMap<String, String> {
    match slot {
        HostSlot::First => &mut n.hostnodes,
        HostSlot::Ipv6 => &mut n.hostnodes6,
    }
}

fn allocations_of(n: &NetData) -> Allocations {
    let mut out = Allocations::default();
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
    for (node, v) in &n.hostnodes6 {
        if let Ok(a) = v.parse() {
            out.hosts6.insert(node.clone(), a);
        }
    }
    out
}

/// Takes `node` out of `n` (see [`OverlayBackend::release_node`]): only
/// entries that are really its own.
fn release_from(n: &mut NetData, node: &str, req: &ReleaseRequest) -> ReleasedNode {
    let mut out = ReleasedNode::default();
    if let Some(v) = n.nodes.remove(node) {
        out.subnet = v.parse().ok();
    }
    let owned: Vec<String> = n
        .subnets
        .iter()
        .filter(|(_, r)| r.node == node)
        .map(|(k, _)| k.clone())
        .collect();
    for k in owned {
        n.subnets.remove(&k);
        out.subnet = out.subnet.or_else(|| parse_subnet_key(&k));
    }
    if let Some(v) = n.hostnodes.remove(node) {
        out.host = v.parse().ok();
    }
    n.hostnodes6.remove(node);
    let hosts: Vec<String> = n
        .hostaddrs
        .iter()
        .filter(|(_, r)| r.node == node)
        .map(|(k, _)| k.clone())
        .collect();
    for k in hosts {
        n.hostaddrs.remove(&k);
        out.host = out.host.or_else(|| k.parse().ok());
    }
    out.record = n.peers.remove(node).is_some();
    n.alive.remove(node);
    n.released.insert(
        node.to_string(),
        Released {
            node: node.to_string(),
            time: now_rfc3339(),
            reason: req.reason.clone(),
            by: req.by.clone(),
            subnet: out.subnet.map(|s| s.to_string()),
            host_address: out.host.map(|h| h.to_string()),
            extra: serde_json::Map::new(),
        },
    );
    // The subnet key's own spelling, in case only the node entry named it.
    if let Some(s) = out.subnet {
        n.subnets.remove(&subnet_key(&s));
    }
    out
}

/// How often a watcher looks at the file when inotify is not available. A
/// `stat` is all it costs, and this bounds how late a new peer is seen.
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
        let now = SystemTime::now();
        Ok(data
            .networks
            .get(network)
            .map(|n| snapshot_of(n, token, now))
            .unwrap_or(PeerSnapshot {
                token,
                ..PeerSnapshot::default()
            }))
    }
}

#[async_trait]
impl OverlayBackend for FileStore {
    async fn allocate_host(
        &self,
        network: Name<'_>,
        node: Name<'_>,
        slot: HostSlot,
        cidr: IpNet,
        requested: Option<IpAddr>,
    ) -> Result<HostAllocation, SubnetError> {
        let (network, node) = (network.as_str(), node.as_str());
        let _guard = self.lock().await?;
        let mut data = self.read()?;
        let net = data.networks.entry(network.to_string()).or_default();
        let held = match slot {
            HostSlot::First => net.hostnodes.get(node),
            HostSlot::Ipv6 => net.hostnodes6.get(node),
        };
        if let Some(v) = held {
            let addr: IpAddr = v.parse().map_err(|_| SubnetError::Corrupt {
                location: format!(
                    "{} networks.{network}.{}.{node}",
                    self.path().display(),
                    slot.kind()
                ),
                reason: format!("{v:?} is not an IP address"),
            })?;
            if cidr.contains(&addr) {
                check_held(network, node, addr, requested)?;
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
                    rounds: 0,
                });
            }
            // The host CIDR changed: the old address is meaningless now.
            nodes_of(net, slot).remove(node);
            net.hostaddrs.remove(&host_key(addr));
        }
        let holder = |a: IpAddr| net.hostaddrs.get(&host_key(a)).map(|r| r.node.clone());
        // Under the file lock there is no race: always the lowest free.
        let addr = pick_host(network, node, cidr, requested, 1, &holder)?.ok_or_else(|| {
            SubnetError::Exhausted {
                network: network.to_string(),
                cidr,
                capacity: net.hostaddrs.len() as u128,
            }
        })?;
        nodes_of(net, slot).insert(node.to_string(), addr.to_string());
        net.hostaddrs.insert(host_key(addr), owner(node, addr));
        self.write(&data)?;
        Ok(HostAllocation {
            addr,
            existing: false,
            rounds: 1,
        })
    }

    async fn release_host(
        &self,
        network: Name<'_>,
        node: Name<'_>,
        slot: HostSlot,
    ) -> Result<Option<IpAddr>, SubnetError> {
        let (network, node) = (network.as_str(), node.as_str());
        let _guard = self.lock().await?;
        let mut data = self.read()?;
        let Some(net) = data.networks.get_mut(network) else {
            return Ok(None);
        };
        let Some(v) = nodes_of(net, slot).remove(node) else {
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
        let connected = net
            .alive
            .get(node.as_str())
            .map(|a| a.connected.clone())
            .unwrap_or_default();
        net.alive.insert(
            node.to_string(),
            Alive {
                heartbeat: record.heartbeat.clone(),
                connected,
            },
        );
        net.peers.insert(node.to_string(), record.clone());
        self.write(&data)
    }

    async fn refresh(
        &self,
        network: Name<'_>,
        node: Name<'_>,
        connected: &[String],
    ) -> Result<Liveness, SubnetError> {
        let (network, node) = (network.as_str(), node.as_str());
        let _guard = self.lock().await?;
        let mut data = self.read()?;
        let Some(net) = data.networks.get_mut(network) else {
            return Ok(Liveness::Revoked);
        };
        let Some(rec) = net.peers.get_mut(node) else {
            return Ok(Liveness::Revoked);
        };
        let now = now_rfc3339();
        rec.heartbeat = now.clone();
        net.alive.insert(
            node.to_string(),
            Alive {
                heartbeat: now,
                connected: connected.to_vec(),
            },
        );
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
        // Made before the first look, so that no change falls between the
        // look and the wait. Without inotify (none left, say), a stat every
        // POLL.
        let watch = crate::dirwatch::DirWatch::new(self.path()).ok();
        loop {
            if self.version_token() != since.token {
                return self.snapshot(network).map(Some);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            match &watch {
                Some(w) => {
                    // An error of the watch: look again (bounded by `wait`).
                    let _ = tokio::time::timeout(left, w.changed()).await;
                }
                None => tokio::time::sleep(POLL.min(left)).await,
            }
        }
    }

    async fn remove_peer(&self, network: Name<'_>, node: Name<'_>) -> Result<bool, SubnetError> {
        let (network, node) = (network.as_str(), node.as_str());
        let _guard = self.lock().await?;
        let mut data = self.read()?;
        let Some(n) = data.networks.get_mut(network) else {
            return Ok(false);
        };
        let removed = n.peers.remove(node).is_some();
        let alive = n.alive.remove(node).is_some();
        if removed || alive {
            self.write(&data)?;
        }
        Ok(removed)
    }

    async fn allocations(&self, network: Name<'_>) -> Result<Allocations, SubnetError> {
        let data = self.read()?;
        Ok(data
            .networks
            .get(network.as_str())
            .map(allocations_of)
            .unwrap_or_default())
    }

    async fn release_node(
        &self,
        network: Name<'_>,
        node: Name<'_>,
        req: &ReleaseRequest,
    ) -> Result<ReleasedNode, SubnetError> {
        let (network, node) = (network.as_str(), node.as_str());
        let not_found = || SubnetError::NotFound {
            network: network.to_string(),
            node: node.to_string(),
        };
        let _guard = self.lock().await?;
        let mut data = self.read()?;
        let n = data.networks.get_mut(network).ok_or_else(not_found)?;
        let snap = snapshot_of(n, 0, SystemTime::now());
        let known = snap.nodes().into_iter().any(|i| {
            i.node == node && (i.subnet.is_some() || i.host.is_some() || i.public_key.is_some())
        }) || n.subnets.values().any(|r| r.node == node)
            || n.hostaddrs.values().any(|r| r.node == node);
        if !known {
            return Err(not_found());
        }
        let was_live = snap.alive(node);
        if was_live && !req.force {
            return Err(SubnetError::NodeLive {
                network: network.to_string(),
                node: node.to_string(),
                why: live_why(&snap, node),
            });
        }
        let mut out = release_from(n, node, req);
        out.was_live = was_live;
        self.write(&data)?;
        Ok(out)
    }

    async fn forget_released(
        &self,
        network: Name<'_>,
        node: Name<'_>,
    ) -> Result<bool, SubnetError> {
        let _guard = self.lock().await?;
        let mut data = self.read()?;
        let gone = data
            .networks
            .get_mut(network.as_str())
            .and_then(|n| n.released.remove(node.as_str()))
            .is_some();
        if gone {
            self.write(&data)?;
        }
        Ok(gone)
    }
}

/// Why a node counts as live, for [`SubnetError::NodeLive`].
pub(crate) fn live_why(snap: &PeerSnapshot, node: &str) -> String {
    if let Some(a) = snap.live.get(node) {
        return format!("its agent said so at {}", a.heartbeat);
    }
    let by: Vec<&str> = snap
        .live
        .iter()
        .filter(|(_, a)| a.connected.iter().any(|c| c == node))
        .map(|(n, _)| n.as_str())
        .collect();
    format!("{} has a working tunnel to it", by.join(", "))
}
