//! The overlay's signalling data in the same stores as the subnets: one
//! record per node under `/evio/<network>/peers/<node>` (public key, host
//! address, pod subnet, candidates, liveness), and the host-overlay address
//! allocation (`hostaddrs/<ip>` + `hostnodes/<node>`, created together or
//! not at all, like `subnets/` + `nodes/`).

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use ipnet::IpNet;
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::{validate_name, SubnetError};

/// How a candidate was learned; the peer uses it to rank paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CandidateKind {
    /// An address of one of the node's own interfaces (same-LAN peers).
    Local,
    /// The node's address as a STUN server sees it (outside its NAT).
    Reflexive,
    /// A TURN relay allocation: reachable from anywhere, costs a relay hop.
    Relay,
}

impl CandidateKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CandidateKind::Local => "local",
            CandidateKind::Reflexive => "reflexive",
            CandidateKind::Relay => "relay",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidate {
    /// `ip:port` (IPv6 as `[ip]:port`).
    pub addr: String,
    pub kind: CandidateKind,
}

/// A node's record. Unknown fields are kept so that a newer agent's record
/// survives a read-modify-write by an older one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerRecord {
    pub node: String,
    /// X25519 public key, standard base64 (as `wg pubkey` prints it).
    pub public_key: String,
    /// The node's host-overlay address with the host CIDR's prefix,
    /// e.g. `10.10.0.3/16`; absent without a host overlay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_address: Option<String>,
    pub pod_subnet: String,
    /// Every candidate `ip:port`, best first (the contract's flat list).
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// The same candidates with their kind.
    #[serde(default)]
    pub candidates: Vec<Candidate>,
    /// When the agent last said it is alive (RFC 3339, UTC).
    pub heartbeat: String,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl PeerRecord {
    /// Seconds since the heartbeat, `None` if it does not parse.
    pub fn heartbeat_age(&self, now: SystemTime) -> Option<Duration> {
        let t = humantime::parse_rfc3339_weak(&self.heartbeat).ok()?;
        Some(now.duration_since(t).unwrap_or_default())
    }

    pub fn stamp(&mut self) {
        self.heartbeat = now_rfc3339();
    }
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// The peer records of a network at one point, with a token that changes
/// whenever any of them changes (etcd: the header revision; file: the
/// file's identity and modification time).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PeerSnapshot {
    pub records: Vec<PeerRecord>,
    pub token: u128,
}

/// What [`OverlayStore::refresh`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// Our record is there and was kept alive.
    Alive,
    /// Our record was deleted by someone else while we held it: the node
    /// was removed from the overlay. The agent stops publishing.
    Revoked,
    /// Our record expired (etcd lease lost, e.g. after a partition): publish
    /// it again.
    Expired,
}

/// A host-overlay address held by a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostAllocation {
    pub addr: IpAddr,
    /// The node already held it (a restart); nothing was written.
    pub existing: bool,
}

/// A network or node name that passed [`validate_name`]. Backends take
/// only these, so the check that keeps a name inside its key prefix or file
/// entry is made once, in [`OverlayStore`], and no backend can skip it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Name<'a>(&'a str);

impl<'a> Name<'a> {
    pub fn network(name: &'a str) -> Result<Self, SubnetError> {
        validate_name("network name", name).map(|()| Name(name))
    }

    pub fn node(name: &'a str) -> Result<Self, SubnetError> {
        validate_name("node name", name).map(|()| Name(name))
    }

    pub fn as_str(self) -> &'a str {
        self.0
    }
}

impl std::ops::Deref for Name<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        self.0
    }
}

impl std::fmt::Display for Name<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

/// The overlay's store as the agent uses it. Implemented for every
/// [`OverlayBackend`]: it validates the names, then hands them on.
#[async_trait]
pub trait OverlayStore: Send + Sync {
    /// The node's host address in `cidr`, allocating one if it has none:
    /// `preferred` when free, else a random free one. Restart-stable.
    async fn allocate_host(
        &self,
        network: &str,
        node: &str,
        cidr: IpNet,
        preferred: Option<IpAddr>,
    ) -> Result<HostAllocation, SubnetError>;

    /// Frees the node's host address; `None` if it had none.
    async fn release_host(&self, network: &str, node: &str) -> Result<Option<IpAddr>, SubnetError>;

    /// Creates or replaces the node's record. etcd attaches it to a lease of
    /// `ttl` that [`OverlayStore::refresh`] keeps alive, so a dead agent's
    /// record disappears by itself; the file store relies on the heartbeat.
    async fn publish(
        &self,
        network: &str,
        record: &PeerRecord,
        ttl: Duration,
    ) -> Result<(), SubnetError>;

    /// Keeps the node's published record alive (etcd: lease keep-alive;
    /// file: a new heartbeat) and tells whether it is still there.
    async fn refresh(&self, network: &str, node: &str) -> Result<Liveness, SubnetError>;

    /// Every record of the network.
    async fn peers(&self, network: &str) -> Result<PeerSnapshot, SubnetError>;

    /// Waits until the store changed after `since`, at most `wait`; returns
    /// the new snapshot (whose records may still equal the old ones: the
    /// caller compares), or `None` when nothing changed in time.
    async fn watch_peers(
        &self,
        network: &str,
        since: &PeerSnapshot,
        wait: Duration,
    ) -> Result<Option<PeerSnapshot>, SubnetError>;

    /// Deletes a node's record; whether there was one.
    async fn remove_peer(&self, network: &str, node: &str) -> Result<bool, SubnetError>;

    /// What the allocation records say each node holds: its pod subnet
    /// (`nodes/`) and host address (`hostnodes/`). A peer record is only
    /// believed where it agrees with them.
    async fn allocations(&self, network: &str) -> Result<Allocations, SubnetError>;
}

/// A store of overlay records (etcd, the file store). Names arrive
/// validated; see [`OverlayStore`] for what each method means.
#[async_trait]
pub trait OverlayBackend: Send + Sync {
    /// The node's host address in `cidr`, allocating one if it has none:
    /// `preferred` when free, else a random free one. Restart-stable.
    async fn allocate_host(
        &self,
        network: Name<'_>,
        node: Name<'_>,
        cidr: IpNet,
        preferred: Option<IpAddr>,
    ) -> Result<HostAllocation, SubnetError>;

    /// Frees the node's host address; `None` if it had none.
    async fn release_host(
        &self,
        network: Name<'_>,
        node: Name<'_>,
    ) -> Result<Option<IpAddr>, SubnetError>;

    /// Creates or replaces the node's record. etcd attaches it to a lease of
    /// `ttl` that [`OverlayBackend::refresh`] keeps alive, so a dead agent's
    /// record disappears by itself; the file store relies on the heartbeat.
    async fn publish(
        &self,
        network: Name<'_>,
        node: Name<'_>,
        record: &PeerRecord,
        ttl: Duration,
    ) -> Result<(), SubnetError>;

    /// Keeps the node's published record alive (etcd: lease keep-alive;
    /// file: a new heartbeat) and tells whether it is still there.
    async fn refresh(&self, network: Name<'_>, node: Name<'_>) -> Result<Liveness, SubnetError>;

    /// Every record of the network.
    async fn peers(&self, network: Name<'_>) -> Result<PeerSnapshot, SubnetError>;

    /// Waits until the store changed after `since`, at most `wait`; returns
    /// the new snapshot (whose records may still equal the old ones: the
    /// caller compares), or `None` when nothing changed in time.
    async fn watch_peers(
        &self,
        network: Name<'_>,
        since: &PeerSnapshot,
        wait: Duration,
    ) -> Result<Option<PeerSnapshot>, SubnetError>;

    /// Deletes a node's record; whether there was one.
    async fn remove_peer(&self, network: Name<'_>, node: Name<'_>) -> Result<bool, SubnetError>;

    /// What the allocation records say each node holds: its pod subnet
    /// (`nodes/`) and host address (`hostnodes/`). A peer record is only
    /// believed where it agrees with them.
    async fn allocations(&self, network: Name<'_>) -> Result<Allocations, SubnetError>;
}

#[async_trait]
impl<T: OverlayBackend + ?Sized> OverlayStore for T {
    async fn allocate_host(
        &self,
        network: &str,
        node: &str,
        cidr: IpNet,
        preferred: Option<IpAddr>,
    ) -> Result<HostAllocation, SubnetError> {
        let (network, node) = (Name::network(network)?, Name::node(node)?);
        OverlayBackend::allocate_host(self, network, node, cidr, preferred).await
    }

    async fn release_host(&self, network: &str, node: &str) -> Result<Option<IpAddr>, SubnetError> {
        let (network, node) = (Name::network(network)?, Name::node(node)?);
        OverlayBackend::release_host(self, network, node).await
    }

    async fn publish(
        &self,
        network: &str,
        record: &PeerRecord,
        ttl: Duration,
    ) -> Result<(), SubnetError> {
        let (network, node) = (Name::network(network)?, Name::node(&record.node)?);
        OverlayBackend::publish(self, network, node, record, ttl).await
    }

    async fn refresh(&self, network: &str, node: &str) -> Result<Liveness, SubnetError> {
        let (network, node) = (Name::network(network)?, Name::node(node)?);
        OverlayBackend::refresh(self, network, node).await
    }

    async fn peers(&self, network: &str) -> Result<PeerSnapshot, SubnetError> {
        OverlayBackend::peers(self, Name::network(network)?).await
    }

    async fn watch_peers(
        &self,
        network: &str,
        since: &PeerSnapshot,
        wait: Duration,
    ) -> Result<Option<PeerSnapshot>, SubnetError> {
        OverlayBackend::watch_peers(self, Name::network(network)?, since, wait).await
    }

    async fn remove_peer(&self, network: &str, node: &str) -> Result<bool, SubnetError> {
        let (network, node) = (Name::network(network)?, Name::node(node)?);
        OverlayBackend::remove_peer(self, network, node).await
    }

    async fn allocations(&self, network: &str) -> Result<Allocations, SubnetError> {
        OverlayBackend::allocations(self, Name::network(network)?).await
    }
}

/// The allocation records of a network, by node name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allocations {
    pub subnets: std::collections::BTreeMap<String, IpNet>,
    pub hosts: std::collections::BTreeMap<String, IpAddr>,
}

/// The usable host addresses of `cidr`: all but the network address and,
/// for IPv4, the broadcast address.
pub(crate) fn host_range(cidr: IpNet) -> Result<(u128, u128), SubnetError> {
    let (base, bits, v4) = match cidr {
        IpNet::V4(n) => (u128::from(u32::from(n.network())), 32u32, true),
        IpNet::V6(n) => (u128::from(n.network()), 128u32, false),
    };
    let host_bits = bits - u32::from(cidr.prefix_len());
    if host_bits < 2 {
        return Err(SubnetError::InvalidCidr {
            input: cidr.to_string(),
            reason: "hostCIDR needs at least 2 host bits".into(),
        });
    }
    let size: u128 = if host_bits >= 128 {
        u128::MAX
    } else {
        1u128 << host_bits
    };
    let last = if v4 { size - 2 } else { size - 1 };
    Ok((base + 1, base + last))
}

pub(crate) fn addr_from(cidr: IpNet, v: u128) -> IpAddr {
    match cidr {
        // In range by construction: v stays within the /prefix of a v4 net.
        IpNet::V4(_) => IpAddr::V4(std::net::Ipv4Addr::from(v as u32)),
        IpNet::V6(_) => IpAddr::V6(std::net::Ipv6Addr::from(v)),
    }
}

fn addr_value(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// Picks a free host address: `preferred` if it is usable and free, else a
/// random free one (random, as for subnets, so that nodes allocating at the
/// same time rarely collide). `taken` says whether an address is in use.
pub(crate) fn pick_host(
    cidr: IpNet,
    preferred: Option<IpAddr>,
    taken: &dyn Fn(IpAddr) -> bool,
    rng: &mut impl Rng,
) -> Result<Option<IpAddr>, SubnetError> {
    let (lo, hi) = host_range(cidr)?;
    if let Some(p) = preferred {
        let v = addr_value(p);
        if cidr.contains(&p) && (lo..=hi).contains(&v) && !taken(p) {
            return Ok(Some(p));
        }
    }
    let span = hi - lo + 1;
    // Random probes find a free address quickly unless the space is nearly
    // full; then a linear scan from a random start settles it.
    for _ in 0..64 {
        let a = addr_from(cidr, lo + rng.gen_range(0..span));
        if !taken(a) {
            return Ok(Some(a));
        }
    }
    let start = rng.gen_range(0..span);
    let scan = span.min(1 << 20);
    for i in 0..scan {
        let a = addr_from(cidr, lo + (start + i) % span);
        if !taken(a) {
            return Ok(Some(a));
        }
    }
    Ok(None)
}

/// The owner record of a host address (`hostaddrs/<ip>`).
pub(crate) fn host_owner(node: &str, addr: IpAddr) -> crate::OwnerRecord {
    let mut extra = serde_json::Map::new();
    extra.insert("address".into(), addr.to_string().into());
    crate::OwnerRecord {
        node: node.to_string(),
        time: now_rfc3339(),
        subnet: None,
        extra,
    }
}

/// The key of a host address: the address itself (no `/` to add a level).
pub fn host_key(a: IpAddr) -> String {
    a.to_string()
}

/// The address suggested for the node with subnet `index` of `capacity`:
/// the host CIDR's base plus the index, so that node 10.244.3.0/24 gets
/// 10.10.0.3 (the seed's figure pairs them this way). Index 0 would be the
/// network address: it gets base + capacity (10.10.1.0 with 256 subnets).
pub fn preferred_host(cidr: IpNet, index: u128, capacity: u128) -> Option<IpAddr> {
    let (lo, hi) = host_range(cidr).ok()?;
    let base = lo - 1;
    let offset = if index == 0 { capacity } else { index };
    let v = base.checked_add(offset)?;
    (lo..=hi).contains(&v).then(|| addr_from(cidr, v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// Every method of every backend goes through the one check: a name
    /// that could leave its key prefix or file entry is refused before the
    /// store is read or written.
    #[test]
    fn bad_names_are_refused_before_any_backend_sees_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("subnets.json");
        let s: Box<dyn OverlayStore> =
            Box::new(crate::FileStore::new(path.clone(), Duration::from_secs(5)));
        let cidr: IpNet = "10.10.0.0/16".parse().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let invalid = |r: Result<(), SubnetError>| {
            assert!(matches!(r, Err(SubnetError::InvalidName { .. })), "{r:?}");
        };
        rt.block_on(async {
            for (net, node) in [("n", "../x"), ("a/b", "x"), ("", "x"), ("n", "")] {
                let mut rec: PeerRecord = serde_json::from_str(
                    r#"{"node":"x","publicKey":"k","hostAddress":"10.10.0.3/16",
                    "podSubnet":"10.244.3.0/24","endpoints":[],"heartbeat":"2026-01-01T00:00:00Z"}"#,
                )
                .unwrap();
                rec.node = node.to_string();
                let since = PeerSnapshot::default();
                invalid(s.allocate_host(net, node, cidr, None).await.map(drop));
                invalid(s.release_host(net, node).await.map(drop));
                invalid(s.publish(net, &rec, Duration::from_secs(1)).await);
                invalid(s.refresh(net, node).await.map(drop));
                invalid(s.remove_peer(net, node).await.map(drop));
                if net != "n" {
                    invalid(s.peers(net).await.map(drop));
                    invalid(s.allocations(net).await.map(drop));
                    let w = s.watch_peers(net, &since, Duration::from_millis(1)).await;
                    invalid(w.map(drop));
                }
            }
        });
        assert!(!path.exists(), "the store was written");
    }

    #[test]
    fn record_roundtrip_and_unknown_fields() {
        let j = r#"{"node":"n1","publicKey":"k","hostAddress":"10.10.0.3/16",
            "podSubnet":"10.244.3.0/24","endpoints":["1.2.3.4:5800"],
            "candidates":[{"addr":"1.2.3.4:5800","kind":"reflexive"}],
            "heartbeat":"2026-01-01T00:00:00Z","zone":"x"}"#;
        let r: PeerRecord = serde_json::from_str(j).unwrap();
        assert_eq!(r.candidates[0].kind, CandidateKind::Reflexive);
        assert_eq!(r.extra["zone"], "x");
        let back: PeerRecord = serde_json::from_value(serde_json::to_value(&r).unwrap()).unwrap();
        assert_eq!(back, r);
        let v = serde_json::to_value(&r).unwrap();
        assert!(v.get("publicKey").is_some() && v.get("podSubnet").is_some());
    }

    #[test]
    fn host_ranges() {
        let c: IpNet = "10.10.0.0/16".parse().unwrap();
        let (lo, hi) = host_range(c).unwrap();
        assert_eq!(addr_from(c, lo).to_string(), "10.10.0.1");
        assert_eq!(addr_from(c, hi).to_string(), "10.10.255.254");
        assert!(host_range("10.0.0.0/31".parse().unwrap()).is_err());
        let pref = |c, i, n| preferred_host(c, i, n).map(|a| a.to_string());
        assert_eq!(pref(c, 3, 256).as_deref(), Some("10.10.0.3"));
        // Index 0 would be the network address: it goes past the others.
        assert_eq!(pref(c, 0, 256).as_deref(), Some("10.10.1.0"));
        let small: IpNet = "10.0.0.0/30".parse().unwrap();
        assert_eq!(pref(small, 3, 4), None);
        assert_eq!(pref(small, 0, 4), None);
        let v6: IpNet = "fd00::/64".parse().unwrap();
        assert_eq!(pref(v6, 7, 256).as_deref(), Some("fd00::7"));
    }

    #[test]
    fn pick_prefers_then_falls_back_then_exhausts() {
        let c: IpNet = "10.0.0.0/29".parse().unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let p: IpAddr = "10.0.0.3".parse().unwrap();
        assert_eq!(
            pick_host(c, Some(p), &|_| false, &mut rng).unwrap(),
            Some(p)
        );
        let got = pick_host(c, Some(p), &|a| a == p, &mut rng)
            .unwrap()
            .unwrap();
        assert_ne!(got, p);
        assert!(c.contains(&got));
        let all_but_6 = |a: IpAddr| a.to_string() != "10.0.0.6";
        assert_eq!(
            pick_host(c, None, &all_but_6, &mut rng)
                .unwrap()
                .map(|a| a.to_string()),
            Some("10.0.0.6".into())
        );
        assert_eq!(pick_host(c, None, &|_| true, &mut rng).unwrap(), None);
        // Never the network or broadcast address.
        for _ in 0..200 {
            let a = pick_host(c, None, &|_| false, &mut rng).unwrap().unwrap();
            assert!(!["10.0.0.0", "10.0.0.7"].contains(&a.to_string().as_str()));
        }
    }
}
