//! The overlay's signalling data in the same stores as the subnets: one
//! record per node under `/evio/<network>/peers/<node>` (public key, host
//! address, pod subnet, candidates, liveness), and the host-overlay address
//! allocation (`hostaddrs/<ip>` + `hostnodes/<node>`, created together or
//! not at all, like `subnets/` + `nodes/`).

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

pub use crate::peers_etcd::Followed;
use ipnet::IpNet;
use rand::seq::SliceRandom;
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
    /// A port mapping the node's gateway granted (PCP, NAT-PMP or UPnP
    /// IGD): reachable from anywhere the gateway's external address is,
    /// ranked like a reflexive one.
    Mapped,
    /// A kind this agent does not know (a newer agent's record): kept
    /// readable, never probed.
    #[serde(other)]
    Unknown,
}

impl CandidateKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CandidateKind::Local => "local",
            CandidateKind::Reflexive => "reflexive",
            CandidateKind::Relay => "relay",
            CandidateKind::Mapped => "mapped",
            CandidateKind::Unknown => "unknown",
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
    /// Every host-overlay address of the node, one per family of a
    /// dual-stack `hostCIDR` (`hostAddress` is one of them: the IPv4 one
    /// when there is one); absent from older agents' records, where
    /// `hostAddress` alone is the node's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_addresses: Vec<String>,
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

/// A file-store node whose heartbeat is older than this is not live (the
/// file store has no leases; every node of it shares one machine's clock).
pub const FILE_STALE_AFTER: Duration = Duration::from_secs(60);

/// What a running agent says about its node, kept apart from the record:
/// etcd keeps it under `alive/<node>` on the agent's lease, so it goes
/// when the lease expires while the record stays; the file store keeps it
/// beside the record and calls it live while its heartbeat is fresh.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Alive {
    /// When the agent last said so (RFC 3339, its own clock: for display
    /// only, never compared with another node's clock).
    pub heartbeat: String,
    /// The nodes this agent has a working tunnel with: they are alive
    /// whatever the store hears from them, so nobody reclaims them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub connected: Vec<String>,
}

/// Why a node's allocations were freed: kept under `released/<node>` so
/// that the node, when it comes back, is told what happened instead of
/// silently getting other addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Released {
    pub node: String,
    /// RFC 3339, the releaser's clock.
    pub time: String,
    /// `release` (an operator) or `reclaimAfter` (an agent, automatically).
    pub reason: String,
    /// Who did it: the command, or the reclaiming node's name.
    pub by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_address: Option<String>,
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// The overlay state of a network at one point, read at one revision: the
/// records, which nodes are live, the allocations the records are checked
/// against and the release notes; with a token that changes whenever any
/// of them changes (etcd: the header revision; file: the file's identity
/// and modification time).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PeerSnapshot {
    pub records: Vec<PeerRecord>,
    /// Live nodes and what they say (see [`Alive`]). A record whose node is
    /// not here is stale: its agent is gone or cannot reach the store.
    pub live: std::collections::BTreeMap<String, Alive>,
    pub alloc: Allocations,
    pub released: std::collections::BTreeMap<String, Released>,
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
    /// Our liveness expired (etcd lease lost, e.g. after a partition) while
    /// the record stayed: publish again.
    Expired,
}

/// How [`OverlayStore::release_node`] goes about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseRequest {
    /// Release even a live node.
    pub force: bool,
    /// See [`Released::reason`].
    pub reason: String,
    /// See [`Released::by`].
    pub by: String,
}

/// What [`OverlayStore::release_node`] freed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReleasedNode {
    pub subnet: Option<IpNet>,
    pub host: Option<IpAddr>,
    pub record: bool,
    /// The node was live (only with `force`).
    pub was_live: bool,
}

/// One row of `evio-node nodes list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub node: String,
    pub subnet: Option<IpNet>,
    pub host: Option<IpAddr>,
    /// Its IPv6 host address beside `host` (a dual-stack host CIDR).
    pub host6: Option<IpAddr>,
    pub public_key: Option<String>,
    /// The node's own last word (its alive heartbeat, else its record's).
    pub last_seen: Option<String>,
    pub live: bool,
    /// Vouched for by a live node with a working tunnel to it.
    pub vouched: bool,
    pub released: Option<Released>,
}

impl PeerSnapshot {
    /// Whether `node` is alive: live in the store, or vouched for by a live
    /// node that has a working tunnel to it (a node cut off from the store
    /// only).
    pub fn alive(&self, node: &str) -> bool {
        self.live.contains_key(node) || self.vouched(node)
    }

    pub fn vouched(&self, node: &str) -> bool {
        self.vouched_by_others(node, node)
    }

    /// Whether a live node other than `node` and `me` has a working tunnel
    /// to `node`: what `me` may believe about it beyond its own tunnel.
    pub fn vouched_by_others(&self, node: &str, me: &str) -> bool {
        self.live
            .iter()
            .any(|(n, a)| n != node && n != me && a.connected.iter().any(|c| c == node))
    }

    /// Every node the store knows, by name: allocations, records, release
    /// notes.
    pub fn nodes(&self) -> Vec<NodeInfo> {
        let mut names: std::collections::BTreeSet<&str> = std::collections::BTreeSet::new();
        names.extend(self.alloc.subnets.keys().map(String::as_str));
        names.extend(self.alloc.hosts.keys().map(String::as_str));
        names.extend(self.alloc.hosts6.keys().map(String::as_str));
        names.extend(self.records.iter().map(|r| r.node.as_str()));
        names.extend(self.released.keys().map(String::as_str));
        names
            .into_iter()
            .map(|n| {
                let rec = self.records.iter().find(|r| r.node == n);
                let alive = self.live.get(n);
                NodeInfo {
                    node: n.to_string(),
                    subnet: self.alloc.subnets.get(n).copied(),
                    host: self.alloc.hosts.get(n).copied(),
                    host6: self.alloc.hosts6.get(n).copied(),
                    public_key: rec.map(|r| r.public_key.clone()),
                    last_seen: alive
                        .map(|a| a.heartbeat.clone())
                        .or_else(|| rec.map(|r| r.heartbeat.clone())),
                    live: alive.is_some(),
                    vouched: self.vouched(n),
                    released: self.released.get(n).cloned(),
                }
            })
            .collect()
    }
}

/// A host-overlay address held by a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostAllocation {
    pub addr: IpAddr,
    /// The node already held it (a restart); nothing was written.
    pub existing: bool,
    /// Write transactions it took: 1 unless racing nodes took the pick
    /// first (0 when `existing`). Reported so contention is measurable.
    pub rounds: u32,
}

/// Which of a node's host addresses an allocation is: the one its record's
/// `hostAddress` names (`hostnodes/<node>`: the only one, or the IPv4 one
/// of a dual-stack host overlay), or the IPv6 one beside an IPv4 one
/// (`hostnodes6/<node>`). Both share `hostaddrs/<ip>`, the addresses
/// themselves never colliding; an older agent knows only the first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HostSlot {
    First,
    Ipv6,
}

impl HostSlot {
    /// The key kind of the node's entry: `/evio/<net>/<kind>/<node>`.
    pub fn kind(self) -> &'static str {
        match self {
            HostSlot::First => "hostnodes",
            HostSlot::Ipv6 => "hostnodes6",
        }
    }
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
    /// `requested` when given (refused with [`SubnetError::HostAddressTaken`]
    /// when another node holds it, [`SubnetError::HostAddressHeld`] when
    /// this node holds another), else the lowest free one. Restart-stable;
    /// nothing is written when it is refused.
    async fn allocate_host(
        &self,
        network: &str,
        node: &str,
        cidr: IpNet,
        requested: Option<IpAddr>,
    ) -> Result<HostAllocation, SubnetError>;

    /// Frees the node's host address; `None` if it had none.
    async fn release_host(&self, network: &str, node: &str) -> Result<Option<IpAddr>, SubnetError>;

    /// [`OverlayStore::allocate_host`] for one slot: `HostSlot::First` is
    /// the same call.
    async fn allocate_host_in(
        &self,
        network: &str,
        node: &str,
        slot: HostSlot,
        cidr: IpNet,
        requested: Option<IpAddr>,
    ) -> Result<HostAllocation, SubnetError>;

    /// [`OverlayStore::release_host`] for one slot.
    async fn release_host_in(
        &self,
        network: &str,
        node: &str,
        slot: HostSlot,
    ) -> Result<Option<IpAddr>, SubnetError>;

    /// Creates or replaces the node's record. etcd attaches it to a lease of
    /// `ttl` that [`OverlayStore::refresh`] keeps alive, so a dead agent's
    /// record disappears by itself; the file store relies on the heartbeat.
    async fn publish(
        &self,
        network: &str,
        record: &PeerRecord,
        ttl: Duration,
    ) -> Result<(), SubnetError>;

    /// Keeps the node's liveness (etcd: lease keep-alive; file: a new
    /// heartbeat), says which nodes it has working tunnels with, and tells
    /// whether its record is still there.
    async fn refresh(
        &self,
        network: &str,
        node: &str,
        connected: &[String],
    ) -> Result<Liveness, SubnetError>;

    /// Everything the agent follows, at one revision.
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

    /// Deletes a node's record and liveness (the node leaves the overlay;
    /// its allocations stay); whether there was a record.
    async fn remove_peer(&self, network: &str, node: &str) -> Result<bool, SubnetError>;

    /// What the allocation records say each node holds: its pod subnet
    /// (`nodes/`) and host address (`hostnodes/`). A peer record is only
    /// believed where it agrees with them.
    async fn allocations(&self, network: &str) -> Result<Allocations, SubnetError>;

    /// Frees everything of `node` in one transaction: its pod subnet, host
    /// address, record and liveness, and leaves a [`Released`] note. A live
    /// node is refused ([`SubnetError::NodeLive`]) unless `req.force`; a
    /// node the store knows nothing of is [`SubnetError::NotFound`].
    async fn release_node(
        &self,
        network: &str,
        node: &str,
        req: &ReleaseRequest,
    ) -> Result<ReleasedNode, SubnetError>;

    /// Deletes `node`'s release note (it was told, or allocated afresh);
    /// whether there was one.
    async fn forget_released(&self, network: &str, node: &str) -> Result<bool, SubnetError>;

    /// The lease this client's liveness hangs on (etcd), to hand to the
    /// next agent of the node across a restart.
    fn lease_id(&self) -> Option<i64> {
        None
    }

    /// Takes over a lease a previous agent of the node held: if it is still
    /// alive, the node's liveness never lapses across the restart.
    fn adopt_lease(&self, _id: i64) {}

    /// What this store's watch knew (etcd: the network's keys at one
    /// revision), taken out of it to hand to the next connection with
    /// [`OverlayStore::resume_watch`], which then watches on from that
    /// revision instead of reading the whole network again.
    fn detach_watch(&self) -> Option<Followed> {
        None
    }

    /// Takes what an earlier connection's watch knew (see
    /// [`OverlayStore::detach_watch`]).
    fn resume_watch(&self, _f: Followed) {}
}

/// A store of overlay records (etcd, the file store). Names arrive
/// validated; see [`OverlayStore`] for what each method means.
#[async_trait]
pub trait OverlayBackend: Send + Sync {
    /// See [`OverlayStore::allocate_host_in`].
    async fn allocate_host(
        &self,
        network: Name<'_>,
        node: Name<'_>,
        slot: HostSlot,
        cidr: IpNet,
        requested: Option<IpAddr>,
    ) -> Result<HostAllocation, SubnetError>;

    /// Frees the node's host address in `slot`; `None` if it had none.
    async fn release_host(
        &self,
        network: Name<'_>,
        node: Name<'_>,
        slot: HostSlot,
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

    /// Keeps the node's liveness and tells whether its record is still
    /// there.
    async fn refresh(
        &self,
        network: Name<'_>,
        node: Name<'_>,
        connected: &[String],
    ) -> Result<Liveness, SubnetError>;

    /// Everything the agent follows, at one revision.
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

    /// Deletes a node's record and liveness; whether there was a record.
    async fn remove_peer(&self, network: Name<'_>, node: Name<'_>) -> Result<bool, SubnetError>;

    /// What the allocation records say each node holds: its pod subnet
    /// (`nodes/`) and host address (`hostnodes/`). A peer record is only
    /// believed where it agrees with them.
    async fn allocations(&self, network: Name<'_>) -> Result<Allocations, SubnetError>;

    /// See [`OverlayStore::release_node`].
    async fn release_node(
        &self,
        network: Name<'_>,
        node: Name<'_>,
        req: &ReleaseRequest,
    ) -> Result<ReleasedNode, SubnetError>;

    /// See [`OverlayStore::forget_released`].
    async fn forget_released(&self, network: Name<'_>, node: Name<'_>)
        -> Result<bool, SubnetError>;

    fn lease_id(&self) -> Option<i64> {
        None
    }

    fn adopt_lease(&self, _id: i64) {}

    /// See [`OverlayStore::detach_watch`].
    fn detach_watch(&self) -> Option<Followed> {
        None
    }

    /// See [`OverlayStore::resume_watch`].
    fn resume_watch(&self, _f: Followed) {}
}

#[async_trait]
impl<T: OverlayBackend + ?Sized> OverlayStore for T {
    async fn allocate_host(
        &self,
        network: &str,
        node: &str,
        cidr: IpNet,
        requested: Option<IpAddr>,
    ) -> Result<HostAllocation, SubnetError> {
        self.allocate_host_in(network, node, HostSlot::First, cidr, requested)
            .await
    }

    async fn release_host(&self, network: &str, node: &str) -> Result<Option<IpAddr>, SubnetError> {
        self.release_host_in(network, node, HostSlot::First).await
    }

    async fn allocate_host_in(
        &self,
        network: &str,
        node: &str,
        slot: HostSlot,
        cidr: IpNet,
        requested: Option<IpAddr>,
    ) -> Result<HostAllocation, SubnetError> {
        let (network, node) = (Name::network(network)?, Name::node(node)?);
        OverlayBackend::allocate_host(self, network, node, slot, cidr, requested).await
    }

    async fn release_host_in(
        &self,
        network: &str,
        node: &str,
        slot: HostSlot,
    ) -> Result<Option<IpAddr>, SubnetError> {
        let (network, node) = (Name::network(network)?, Name::node(node)?);
        OverlayBackend::release_host(self, network, node, slot).await
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

    async fn refresh(
        &self,
        network: &str,
        node: &str,
        connected: &[String],
    ) -> Result<Liveness, SubnetError> {
        let (network, node) = (Name::network(network)?, Name::node(node)?);
        OverlayBackend::refresh(self, network, node, connected).await
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

    async fn release_node(
        &self,
        network: &str,
        node: &str,
        req: &ReleaseRequest,
    ) -> Result<ReleasedNode, SubnetError> {
        let (network, node) = (Name::network(network)?, Name::node(node)?);
        OverlayBackend::release_node(self, network, node, req).await
    }

    async fn forget_released(&self, network: &str, node: &str) -> Result<bool, SubnetError> {
        let (network, node) = (Name::network(network)?, Name::node(node)?);
        OverlayBackend::forget_released(self, network, node).await
    }

    fn lease_id(&self) -> Option<i64> {
        OverlayBackend::lease_id(self)
    }

    fn adopt_lease(&self, id: i64) {
        OverlayBackend::adopt_lease(self, id)
    }

    fn detach_watch(&self) -> Option<Followed> {
        OverlayBackend::detach_watch(self)
    }

    fn resume_watch(&self, f: Followed) {
        OverlayBackend::resume_watch(self, f)
    }
}

/// The allocation records of a network, by node name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allocations {
    pub subnets: std::collections::BTreeMap<String, IpNet>,
    pub hosts: std::collections::BTreeMap<String, IpAddr>,
    /// The IPv6 host addresses of a dual-stack host overlay
    /// (`hostnodes6/`), beside the IPv4 ones in `hosts`.
    pub hosts6: std::collections::BTreeMap<String, IpAddr>,
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

/// Whether `a` is a usable host address of `cidr` (not the network
/// address, not the IPv4 broadcast address).
pub fn usable_host(cidr: IpNet, a: IpAddr) -> bool {
    host_range(cidr).is_ok_and(|(lo, hi)| cidr.contains(&a) && (lo..=hi).contains(&addr_value(a)))
}

/// The most of the lowest free addresses a node that lost races picks
/// among (the spread doubles per lost race up to this). With every racer on
/// the lowest one, N nodes starting together would need N rounds (one
/// winner each); spread over this many, each round settles up to this
/// many. Small enough that addresses stay near the bottom of the CIDR.
pub(crate) const HOST_SPREAD_AFTER_LOSS: u128 = 64;

/// Picks the host address of `node`: exactly `requested` when given (an
/// error naming the holder when another node has it), else one of the
/// `spread` lowest free ones, uniformly. The first attempt passes 1, so
/// the first node of a network gets `.1` and addresses are predictable;
/// after lost races the caller passes more, up to [`HOST_SPREAD_AFTER_LOSS`],
/// so racers stop colliding. Racing nodes that pick the same one are settled by the
/// store's transaction: the loser looks again. `owner` says who holds an
/// address; `Ok(None)` when the CIDR is full.
pub(crate) fn pick_host(
    network: &str,
    node: &str,
    cidr: IpNet,
    requested: Option<IpAddr>,
    spread: u128,
    owner: &dyn Fn(IpAddr) -> Option<String>,
) -> Result<Option<IpAddr>, SubnetError> {
    let (lo, hi) = host_range(cidr)?;
    if let Some(a) = requested {
        if !usable_host(cidr, a) {
            return Err(SubnetError::HostAddressOutside { address: a, cidr });
        }
        return match owner(a) {
            Some(holder) if holder != node => Err(SubnetError::HostAddressTaken {
                network: network.to_string(),
                address: a,
                holder,
            }),
            _ => Ok(Some(a)),
        };
    }
    // Every step that finds no free address is a taken one, so this ends
    // after at most (addresses in use + spread) steps, however large the CIDR.
    let want = spread.clamp(1, HOST_SPREAD_AFTER_LOSS) as usize;
    let mut free = Vec::with_capacity(want);
    let mut v = lo;
    while free.len() < want {
        let a = addr_from(cidr, v);
        if owner(a).is_none() {
            free.push(a);
        }
        if v == hi {
            break;
        }
        v += 1;
    }
    Ok(free.choose(&mut rand::thread_rng()).copied())
}

/// A node that already holds `holds` asks for `requested`: moving a host
/// address under a running kubelet is the operator's decision, so it is
/// refused rather than done silently.
pub(crate) fn check_held(
    network: &str,
    node: &str,
    holds: IpAddr,
    requested: Option<IpAddr>,
) -> Result<(), SubnetError> {
    match requested {
        Some(r) if r != holds => Err(SubnetError::HostAddressHeld {
            network: network.to_string(),
            node: node.to_string(),
            holds,
            requested: r,
        }),
        _ => Ok(()),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 25: `hostAddresses` is written only when there is one (a
    /// dual-stack node), read as empty from an older record; and a reader
    /// that does not know it (an older agent: the record before this
    /// field) keeps it through a read-modify-write (`extra`).
    #[test]
    fn host_addresses_round_trip_and_survive_an_older_reader() {
        let newer = serde_json::json!({
            "node": "n1", "publicKey": "k", "hostAddress": "10.10.0.3/16",
            "hostAddresses": ["10.10.0.3/16", "fd00:10::3/64"],
            "podSubnet": "10.244.3.0/24", "endpoints": [], "candidates": [],
            "heartbeat": "2026-01-01T00:00:00Z"});
        let r: PeerRecord = serde_json::from_value(newer.clone()).unwrap();
        assert_eq!(r.host_addresses, ["10.10.0.3/16", "fd00:10::3/64"]);
        assert!(r.extra.is_empty());
        assert_eq!(serde_json::to_value(&r).unwrap(), newer);
        let mut older = newer.clone();
        older.as_object_mut().unwrap().remove("hostAddresses");
        let r: PeerRecord = serde_json::from_value(older.clone()).unwrap();
        assert!(r.host_addresses.is_empty());
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            older,
            "not written when empty"
        );
        // The record as an older agent has it.
        #[derive(serde::Serialize, serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Older {
            node: String,
            public_key: String,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            host_address: Option<String>,
            pod_subnet: String,
            #[serde(default)]
            endpoints: Vec<String>,
            #[serde(default)]
            candidates: Vec<Candidate>,
            heartbeat: String,
            #[serde(flatten)]
            extra: serde_json::Map<String, serde_json::Value>,
        }
        let o: Older = serde_json::from_value(newer.clone()).unwrap();
        assert_eq!(o.host_address.as_deref(), Some("10.10.0.3/16"));
        assert_eq!(serde_json::to_value(&o).unwrap(), newer);
    }

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
                invalid(s.refresh(net, node, &[]).await.map(drop));
                invalid(s.forget_released(net, node).await.map(drop));
                let req = ReleaseRequest { force: true, reason: "t".into(), by: "t".into() };
                invalid(s.release_node(net, node, &req).await.map(drop));
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
        // A newer agent's kinds: "mapped" is known, anything else is read
        // as Unknown instead of failing the whole record.
        let newer = j.replace(
            r#"[{"addr":"1.2.3.4:5800","kind":"reflexive"}]"#,
            r#"[{"addr":"1.2.3.4:5800","kind":"mapped"},{"addr":"1.2.3.4:5801","kind":"teleported"}]"#,
        );
        let n: PeerRecord = serde_json::from_str(&newer).unwrap();
        assert_eq!(n.candidates[0].kind, CandidateKind::Mapped);
        assert_eq!(n.candidates[1].kind, CandidateKind::Unknown);
        assert_eq!(
            serde_json::to_value(CandidateKind::Mapped).unwrap(),
            serde_json::json!("mapped")
        );
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
        assert!(host_range("10.0.0.0/30".parse().unwrap()).is_ok());
        let ok = |c: &str, a: &str| usable_host(c.parse().unwrap(), a.parse().unwrap());
        assert!(ok("10.10.0.0/16", "10.10.0.1") && ok("10.10.0.0/16", "10.10.255.254"));
        assert!(!ok("10.10.0.0/16", "10.10.0.0") && !ok("10.10.0.0/16", "10.10.255.255"));
        assert!(!ok("10.10.0.0/16", "10.11.0.1") && !ok("10.10.0.0/16", "fd00::1"));
        assert!(ok("fd00::/64", "fd00::ffff:ffff:ffff:ffff"));
    }

    fn owners(held: &[(&str, &str)]) -> impl Fn(IpAddr) -> Option<String> {
        let m: std::collections::HashMap<IpAddr, String> = held
            .iter()
            .map(|(a, n)| (a.parse().unwrap(), n.to_string()))
            .collect();
        move |a| m.get(&a).cloned()
    }

    fn pick(
        cidr: &str,
        req: Option<&str>,
        held: &[(&str, &str)],
    ) -> Result<Option<String>, SubnetError> {
        let req = req.map(|r| r.parse().unwrap());
        pick_host("net", "me", cidr.parse().unwrap(), req, 1, &owners(held))
            .map(|a| a.map(|a| a.to_string()))
    }

    #[test]
    fn without_a_request_the_lowest_free_address_in_order() {
        assert_eq!(
            pick("10.10.0.0/16", None, &[]).unwrap().as_deref(),
            Some("10.10.0.1")
        );
        let held = [("10.10.0.1", "a"), ("10.10.0.2", "b"), ("10.10.0.4", "c")];
        assert_eq!(
            pick("10.10.0.0/16", None, &held).unwrap().as_deref(),
            Some("10.10.0.3")
        );
        // Carries over the octet boundary.
        let full: Vec<(String, &str)> = (1..=255).map(|i| (format!("10.10.0.{i}"), "x")).collect();
        let full: Vec<(&str, &str)> = full.iter().map(|(a, n)| (a.as_str(), *n)).collect();
        assert_eq!(
            pick("10.10.0.0/16", None, &full).unwrap().as_deref(),
            Some("10.10.1.0")
        );
        // A /29 has .1-.6; full means None (the caller says Exhausted).
        let six: Vec<(String, &str)> = (1..=6).map(|i| (format!("10.0.0.{i}"), "x")).collect();
        let six: Vec<(&str, &str)> = six.iter().map(|(a, n)| (a.as_str(), *n)).collect();
        assert_eq!(pick("10.0.0.0/29", None, &six).unwrap(), None);
        assert_eq!(
            pick("10.0.0.0/29", None, &six[..5]).unwrap().as_deref(),
            Some("10.0.0.6")
        );
        assert_eq!(
            pick("fd00::/64", None, &[("fd00::1", "a")])
                .unwrap()
                .as_deref(),
            Some("fd00::2")
        );
    }

    #[test]
    fn after_a_lost_race_one_of_the_lowest_free_addresses_uniformly() {
        let cidr: IpNet = "10.10.0.0/16".parse().unwrap();
        let held = owners(&[("10.10.0.1", "a"), ("10.10.0.3", "b")]);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..2000 {
            let a = pick_host("net", "me", cidr, None, HOST_SPREAD_AFTER_LOSS, &held)
                .unwrap()
                .unwrap();
            assert!(held(a).is_none());
            seen.insert(addr_value(a) - addr_value("10.10.0.0".parse().unwrap()));
        }
        // The 64 lowest free: .2 and .4 to .66, every one of them seen.
        let want: std::collections::BTreeSet<u128> = std::iter::once(2).chain(4..=66).collect();
        assert_eq!(seen, want);
        // A requested address is not spread; a nearly full CIDR still gives
        // its last free one.
        let req = Some("10.10.0.9".parse().unwrap());
        let got = pick_host("net", "me", cidr, req, HOST_SPREAD_AFTER_LOSS, &held).unwrap();
        assert_eq!(got, req);
        let five: Vec<(String, &str)> = (1..=5).map(|i| (format!("10.0.0.{i}"), "x")).collect();
        let five: Vec<(&str, &str)> = five.iter().map(|(a, n)| (a.as_str(), *n)).collect();
        let small: IpNet = "10.0.0.0/29".parse().unwrap();
        let got = pick_host(
            "net",
            "me",
            small,
            None,
            HOST_SPREAD_AFTER_LOSS,
            &owners(&five),
        );
        assert_eq!(got.unwrap(), Some("10.0.0.6".parse().unwrap()));
    }

    #[test]
    fn a_requested_address_is_given_exactly_or_refused_naming_the_holder() {
        let held = [("10.10.0.1", "public"), ("10.10.0.2", "me")];
        assert_eq!(
            pick("10.10.0.0/16", Some("10.10.0.7"), &held)
                .unwrap()
                .as_deref(),
            Some("10.10.0.7")
        );
        // An address this node already owns is its own.
        assert_eq!(
            pick("10.10.0.0/16", Some("10.10.0.2"), &held)
                .unwrap()
                .as_deref(),
            Some("10.10.0.2")
        );
        let e = pick("10.10.0.0/16", Some("10.10.0.1"), &held).unwrap_err();
        assert!(
            matches!(&e, SubnetError::HostAddressTaken { holder, .. } if holder == "public"),
            "{e:?}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains("10.10.0.1") && msg.contains("\"public\""),
            "{msg}"
        );
        for bad in ["10.10.0.0", "10.10.255.255", "10.11.0.1"] {
            let e = pick("10.10.0.0/16", Some(bad), &[]).unwrap_err();
            assert!(
                matches!(e, SubnetError::HostAddressOutside { .. }),
                "{bad}: {e:?}"
            );
        }
    }

    #[test]
    fn a_node_holding_another_address_is_refused_a_move() {
        let a: IpAddr = "10.10.0.5".parse().unwrap();
        assert!(check_held("n", "me", a, None).is_ok());
        assert!(check_held("n", "me", a, Some(a)).is_ok());
        let e = check_held("n", "me", a, Some("10.10.0.1".parse().unwrap())).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("10.10.0.5") && msg.contains("10.10.0.1"),
            "{msg}"
        );
    }
}
