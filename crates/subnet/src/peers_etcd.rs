//! [`OverlayStore`] over etcd. A node's record (`peers/<node>`) is durable:
//! it goes only when someone deletes it (the node leaves, or is released).
//! Its liveness (`alive/<node>`) hangs on a lease the agent keeps alive, so
//! a dead or cut-off agent's node turns stale by itself while its record,
//! and the tunnels that still work, stay. Everything is followed with one
//! watch on the network's prefix, never by polling.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use etcd_client::{
    Compare, CompareOp, EventType, GetOptions, KeyValue, PutOptions, Txn, TxnOp, TxnOpResponse,
    WatchOptions, WatchStream,
};
use ipnet::IpNet;

use crate::etcd_mirror::{Mirror, KINDS};
use crate::peers::{
    check_held, host_key, host_owner as owner, now_rfc3339, pick_host, HostSlot, Name,
    HOST_SPREAD_AFTER_LOSS,
};
use crate::{
    parse_subnet_key, peers::Allocations, Alive, EtcdStore, HostAllocation, Liveness,
    OverlayBackend, OwnerRecord, PeerRecord, PeerSnapshot, ReleaseRequest, Released, ReleasedNode,
    SubnetError,
};

/// Bound on create attempts that lose a race for the same address.
const MAX_ATTEMPTS: u32 = 64;

/// After a first change, how long further events are gathered into the
/// same snapshot: a node's join is a few writes in a row, a cluster's
/// start is hundreds, and each snapshot costs the engine an O(n) update.
const SETTLE: Duration = Duration::from_millis(100);

/// The one watch of an [`EtcdStore`] on a network, and the keys it keeps
/// current.
pub(crate) struct Watching {
    mirror_of: String,
    mirror: Mirror,
    // Dropping it ends the watch on the server. `None`: no watch on the
    // server (yet, or any more) but the mirror is good up to its revision,
    // so the next watch starts there instead of reading everything again.
    stream: Option<WatchStream>,
}

/// What a store's watch knew, carried to the next connection (see
/// [`crate::OverlayStore::detach_watch`]): the network's keys at one
/// revision. Opaque to the agent.
pub struct Followed(Watching);

impl std::fmt::Debug for Followed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Followed")
            .field("network", &self.0.mirror_of)
            .field("rev", &self.0.mirror.rev)
            .finish()
    }
}

/// Why a watch stopped giving events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WatchEnd {
    /// etcd compacted past the revision it was to start from
    /// (`compact_revision` in the answer): the events in between are gone.
    Compacted,
    /// etcd cancelled it for another reason.
    Cancelled,
    /// The store's revision is behind the mirror's: it was restored from a
    /// snapshot (or replaced). A watch from the mirror's revision would
    /// wait for revisions the store reuses for other changes.
    Rewound,
    /// The stream ended or broke (the connection went, the server
    /// restarted): nothing says events were lost.
    Closed,
}

/// How following a network goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Start {
    /// Watch from `rev + 1` of the mirror held, without reading.
    Resume,
    /// Read every key again, then watch from that read.
    Read,
}

/// The plan for a network whose mirror (of `held_network` at `held_rev`)
/// the store holds when asked for changes after `since`: resume from the
/// mirror unless it is of another network or older than what the caller
/// already has (its events would hand the caller an older view).
pub(crate) fn start_plan(held: Option<(&str, i64)>, network: &str, since: u128) -> Start {
    match held {
        Some((n, rev)) if n == network && rev.max(0) as u128 >= since => Start::Resume,
        _ => Start::Read,
    }
}

/// After a watch ended: only a compaction (or a cancel whose reason we do
/// not know) loses events; a stream that merely closed resumes where the
/// mirror is.
pub(crate) fn after_end(end: WatchEnd) -> Start {
    match end {
        WatchEnd::Closed => Start::Resume,
        WatchEnd::Compacted | WatchEnd::Cancelled | WatchEnd::Rewound => Start::Read,
    }
}

/// Whether a store at revision `store` is behind a mirror at `mirror`:
/// etcd's revision never goes back, unless the store was restored from a
/// snapshot or is another cluster.
pub(crate) fn rewound(store: Option<i64>, mirror: i64) -> bool {
    store.is_some_and(|r| r < mirror)
}

impl Watching {
    /// The next response: `Ok(None)` when it changed something,
    /// `Ok(Some(end))` when the watch is over. Without a stream: over.
    async fn next(&mut self) -> Result<Option<WatchEnd>, etcd_client::Error> {
        let Some(stream) = self.stream.as_mut() else {
            return Ok(Some(WatchEnd::Closed));
        };
        loop {
            let Some(r) = stream.message().await? else {
                return Ok(Some(WatchEnd::Closed));
            };
            if r.compact_revision() > 0 {
                return Ok(Some(WatchEnd::Compacted));
            }
            if r.canceled() {
                return Ok(Some(WatchEnd::Cancelled));
            }
            // The answer that creates the watch carries the store's
            // revision: lower than one we have seen only after a restore.
            if r.created() && rewound(r.header().map(|h| h.revision()), self.mirror.rev) {
                return Ok(Some(WatchEnd::Rewound));
            }
            let mut changed = false;
            for e in r.events() {
                let Some(kv) = e.kv() else { continue };
                let value = match e.event_type() {
                    EventType::Put => Some(kv.value()),
                    EventType::Delete => None,
                };
                self.mirror.apply(kv.key(), value);
                self.mirror.rev = self.mirror.rev.max(kv.mod_revision());
                changed = true;
            }
            if changed {
                return Ok(None);
            }
        }
    }
}

fn prefix(network: &str, kind: &str) -> String {
    format!("/evio/{network}/{kind}/")
}

fn key(network: Name<'_>, kind: &str, node: Name<'_>) -> String {
    format!("/evio/{network}/{kind}/{node}")
}

fn kvs(r: Option<&TxnOpResponse>) -> &[KeyValue] {
    match r {
        Some(TxnOpResponse::Get(g)) => g.kvs(),
        _ => &[],
    }
}

/// `(node, value)` of every key under `prefix` in a range read.
fn by_node<'a>(
    kvs: &'a [KeyValue],
    prefix: &'a str,
) -> impl Iterator<Item = (&'a str, &'a KeyValue)> {
    kvs.iter().filter_map(move |kv| {
        let node = std::str::from_utf8(kv.key()).ok()?.strip_prefix(prefix)?;
        (!node.is_empty() && !node.contains('/')).then_some((node, kv))
    })
}

impl EtcdStore {
    fn lease(&self) -> Option<i64> {
        self.lease.lock().ok().and_then(|l| *l)
    }

    fn set_lease(&self, v: Option<i64>) {
        if let Ok(mut l) = self.lease.lock() {
            *l = v;
        }
    }

    async fn grant(&self, deadline: Instant, ttl: Duration) -> Result<i64, SubnetError> {
        let secs = ttl.as_secs().clamp(5, 3600) as i64;
        let r = self
            .call(
                deadline,
                |mut c| async move { c.lease_grant(secs, None).await },
            )
            .await?;
        Ok(r.id())
    }

    /// Renews `lease`: > 0 while it lives, 0 once it expired.
    async fn keep_alive(&self, deadline: Instant, lease: i64) -> Result<i64, SubnetError> {
        // Opening the keep-alive stream already renews the lease once and
        // reads the answer: an expired lease fails it with "lease not found".
        self.call(deadline, |mut c| async move {
            match c.lease_keep_alive(lease).await {
                Ok(_) => Ok(1),
                Err(etcd_client::Error::LeaseKeepAliveError(m)) if m.contains("not found") => Ok(0),
                Err(e) => Err(e),
            }
        })
        .await
    }

    /// One read transaction: `gets`, each a key or (ending in `/`) a prefix.
    async fn read(
        &self,
        deadline: Instant,
        gets: &[String],
    ) -> Result<etcd_client::TxnResponse, SubnetError> {
        let ops: Vec<TxnOp> = gets
            .iter()
            .map(|k| {
                let opts = k.ends_with('/').then(|| GetOptions::new().with_prefix());
                TxnOp::get(k.clone(), opts)
            })
            .collect();
        self.txn(deadline, Txn::new().and_then(ops)).await
    }

    async fn snapshot(
        &self,
        deadline: Instant,
        network: &str,
    ) -> Result<PeerSnapshot, SubnetError> {
        Ok(self.mirror(deadline, network).await?.snapshot())
    }

    /// The network's overlay keys in one read, at one revision.
    async fn mirror(&self, deadline: Instant, network: &str) -> Result<Mirror, SubnetError> {
        let gets: Vec<String> = KINDS.iter().map(|k| prefix(network, k)).collect();
        let resp = self.read(deadline, &gets).await?;
        let rev = resp.header().map(|h| h.revision()).unwrap_or(0).max(0);
        let mut m = Mirror::new(network, rev);
        // One bad value must not hide every other node: it is skipped (the
        // agent that owns it rewrites it).
        for (i, get) in gets.iter().enumerate() {
            for (_, kv) in by_node(kvs(resp.op_responses().get(i)), get) {
                m.apply(kv.key(), Some(kv.value()));
            }
        }
        Ok(m)
    }

    /// Waits up to `wait` for the network to change after `since` on this
    /// store's one watch (made on the first call, kept across calls and
    /// across callers that give up waiting), and takes every event that
    /// comes within [`SETTLE`] of the first into the mirror. `Ok(None)`:
    /// nothing changed in time. A watch that has to be made again starts
    /// from the mirror's revision (the keys are read again only when etcd
    /// compacted past it), so a broken stream or a new connection costs
    /// etcd one watch, not a read of the whole network.
    async fn follow(
        &self,
        network: &str,
        since: u128,
        wait: Duration,
    ) -> Result<Option<PeerSnapshot>, SubnetError> {
        let Ok(mut slot) = tokio::time::timeout(wait, self.watching.lock()).await else {
            return Ok(None);
        };
        let held = slot.as_ref().map(|w| (w.mirror_of.as_str(), w.mirror.rev));
        if start_plan(held, network, since) == Start::Read {
            *slot = None;
            let deadline = Instant::now() + self.timeout;
            let mirror = self.mirror(deadline, network).await?;
            *slot = Some(Watching {
                mirror_of: network.to_string(),
                mirror,
                stream: None,
            });
        }
        let Some(w) = slot.as_mut() else {
            return Ok(None);
        };
        if w.stream.is_none() {
            w.stream = Some(self.watch_from(network, w.mirror.rev).await?);
        }
        if w.mirror.rev.max(0) as u128 > since {
            // Events the last caller took but did not live to return, or a
            // read newer than the caller's view.
            return Ok(Some(w.mirror.snapshot()));
        }
        let changed = match tokio::time::timeout(wait, w.next()).await {
            Err(_) => return Ok(None),
            Ok(r) => r,
        };
        match changed {
            Ok(None) => {
                // A join or a restart comes as a burst: one snapshot for it.
                let settle = tokio::time::sleep(SETTLE);
                tokio::pin!(settle);
                loop {
                    tokio::select! {
                        _ = &mut settle => break,
                        r = w.next() => if !matches!(r, Ok(None)) { break },
                    }
                }
                Ok(Some(w.mirror.snapshot()))
            }
            Ok(Some(end)) => {
                match after_end(end) {
                    // The next call watches again from the mirror.
                    Start::Resume => {
                        w.stream = None;
                        Ok(None)
                    }
                    Start::Read => {
                        *slot = None;
                        let mirror = self.mirror(Instant::now() + self.timeout, network).await?;
                        let snap = mirror.snapshot();
                        *slot = Some(Watching {
                            mirror_of: network.to_string(),
                            mirror,
                            stream: None,
                        });
                        Ok(Some(snap))
                    }
                }
            }
            Err(e) => {
                // The mirror is still good up to its revision.
                w.stream = None;
                Err(SubnetError::Etcd {
                    endpoints: self.endpoints.clone(),
                    message: crate::etcd::chain(&e),
                })
            }
        }
    }

    async fn watch_from(&self, network: &str, rev: i64) -> Result<WatchStream, SubnetError> {
        let mut client = self.client.clone();
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(rev + 1);
        let stream = tokio::time::timeout(
            self.timeout,
            client.watch(format!("/evio/{network}/"), Some(opts)),
        )
        .await
        .map_err(|_| SubnetError::Unreachable {
            store: format!("etcd://{}", self.endpoints),
            after: self.timeout,
            last: "watch request timed out".into(),
            slow: true,
        })?
        .map_err(|e| SubnetError::Etcd {
            endpoints: self.endpoints.clone(),
            message: crate::etcd::chain(&e),
        })?;
        Ok(stream)
    }

    /// The network read in full, which also seeds the watch when there is
    /// none: the first watch then starts at this read's revision instead
    /// of reading everything a second time.
    async fn read_network(&self, network: &str) -> Result<PeerSnapshot, SubnetError> {
        let mirror = self.mirror(Instant::now() + self.timeout, network).await?;
        let snap = mirror.snapshot();
        if let Ok(mut slot) = self.watching.try_lock() {
            let newer = slot
                .as_ref()
                .is_none_or(|w| w.mirror_of != network || w.mirror.rev < mirror.rev);
            if newer && slot.as_ref().is_none_or(|w| w.stream.is_none()) {
                *slot = Some(Watching {
                    mirror_of: network.to_string(),
                    mirror,
                    stream: None,
                });
            }
        }
        Ok(snap)
    }

    /// Puts our liveness on `lease`.
    async fn put_alive(
        &self,
        deadline: Instant,
        key: &str,
        alive: &Alive,
        lease: i64,
    ) -> Result<(), SubnetError> {
        let value = serde_json::to_string(alive).map_err(|e| SubnetError::Corrupt {
            location: key.to_string(),
            reason: e.to_string(),
        })?;
        self.call(deadline, |mut c| {
            let (k, v) = (key.to_string(), value.clone());
            async move { c.put(k, v, Some(PutOptions::new().with_lease(lease))).await }
        })
        .await?;
        Ok(())
    }
}

/// What a release has to delete, read in one transaction.
struct ReleasePlan {
    /// Keys with the mod revision they were read at (0: absent).
    guards: Vec<(String, i64)>,
    deletes: Vec<String>,
    freed: ReleasedNode,
    known: bool,
}

impl ReleasePlan {
    fn read(network: Name<'_>, node: Name<'_>, ops: &[TxnOpResponse]) -> ReleasePlan {
        let mut p = ReleasePlan {
            guards: Vec::new(),
            deletes: Vec::new(),
            freed: ReleasedNode::default(),
            known: false,
        };
        for (i, kind) in ["nodes", "hostnodes", "peers", "alive"].iter().enumerate() {
            let k = key(network, kind, node);
            let kv = kvs(ops.get(i)).first();
            p.guards
                .push((k.clone(), kv.map_or(0, KeyValue::mod_revision)));
            let Some(kv) = kv else { continue };
            p.deletes.push(k);
            let v = kv.value_str().unwrap_or_default();
            match *kind {
                "nodes" => p.freed.subnet = v.parse().ok(),
                "hostnodes" => p.freed.host = v.parse().ok(),
                "peers" => p.freed.record = true,
                _ => {}
            }
            p.known |= *kind != "alive";
        }
        // A dual-stack node's IPv6 entry (its address key is among the
        // owned ones below).
        let k6 = key(network, HostSlot::Ipv6.kind(), node);
        let kv6 = kvs(ops.get(6)).first();
        p.guards
            .push((k6.clone(), kv6.map_or(0, KeyValue::mod_revision)));
        if kv6.is_some() {
            p.deletes.push(k6);
            p.known = true;
        }
        // The subnet and address keys that name this node as their owner.
        for (i, kind) in [(4, "subnets"), (5, "hostaddrs")] {
            let pre = prefix(&network, kind);
            for kv in kvs(ops.get(i)) {
                let Ok(k) = std::str::from_utf8(kv.key()) else {
                    continue;
                };
                let owned = serde_json::from_slice::<OwnerRecord>(kv.value())
                    .is_ok_and(|r| r.node == node.as_str());
                if !owned {
                    continue;
                }
                let name = k.strip_prefix(&pre).unwrap_or_default();
                if kind == "subnets" {
                    p.freed.subnet = p.freed.subnet.or_else(|| parse_subnet_key(name));
                } else {
                    p.freed.host = p.freed.host.or_else(|| name.parse().ok());
                }
                p.guards.push((k.to_string(), kv.mod_revision()));
                p.deletes.push(k.to_string());
                p.known = true;
            }
        }
        p
    }
}

#[async_trait]
impl OverlayBackend for EtcdStore {
    async fn allocate_host(
        &self,
        network: Name<'_>,
        node: Name<'_>,
        slot: HostSlot,
        cidr: IpNet,
        requested: Option<IpAddr>,
    ) -> Result<HostAllocation, SubnetError> {
        let deadline = Instant::now() + self.timeout;
        let node_key = key(network, slot.kind(), node);
        let addrs = format!("/evio/{network}/hostaddrs/");
        let snapshot = || {
            vec![
                TxnOp::get(node_key.clone(), None),
                // With values: a refused request names the holder.
                TxnOp::get(addrs.clone(), Some(GetOptions::new().with_prefix())),
            ]
        };
        let mut resp = self.txn(deadline, Txn::new().and_then(snapshot())).await?;
        let mut rounds = 0u32;
        for _ in 0..MAX_ATTEMPTS {
            let ops = resp.op_responses();
            let kvs = |i: usize| match ops.get(i) {
                Some(etcd_client::TxnOpResponse::Get(g)) => g.kvs().to_vec(),
                _ => Vec::new(),
            };
            if let Some(kv) = kvs(0).first() {
                let v = kv.value_str().unwrap_or_default();
                let addr: IpAddr = v.parse().map_err(|_| SubnetError::Corrupt {
                    location: format!("etcd key {node_key}"),
                    reason: format!("{v:?} is not an IP address"),
                })?;
                if cidr.contains(&addr) {
                    check_held(&network, &node, addr, requested)?;
                    // Restart-stable; put the address key back if someone
                    // removed it by hand, so it does not look free.
                    let akey = format!("{addrs}{}", host_key(addr));
                    let rec = serde_json::to_string(&owner(&node, addr)).unwrap_or_default();
                    self.txn(
                        deadline,
                        Txn::new()
                            .when(vec![Compare::create_revision(
                                akey.clone(),
                                CompareOp::Equal,
                                0,
                            )])
                            .and_then(vec![TxnOp::put(akey, rec, None)]),
                    )
                    .await?;
                    return Ok(HostAllocation {
                        addr,
                        existing: true,
                        rounds: 0,
                    });
                }
                // The host CIDR changed: drop the old allocation first.
                let akey = format!("{addrs}{}", host_key(addr));
                self.txn(
                    deadline,
                    Txn::new().and_then(vec![
                        TxnOp::delete(node_key.clone(), None),
                        TxnOp::delete(akey, None),
                    ]),
                )
                .await?;
                resp = self.txn(deadline, Txn::new().and_then(snapshot())).await?;
                continue;
            }
            let used: std::collections::HashMap<String, String> = kvs(1)
                .iter()
                .filter_map(|kv| {
                    let k = std::str::from_utf8(kv.key()).ok()?.strip_prefix(&addrs)?;
                    // An owner record that does not parse still holds it.
                    let holder = serde_json::from_slice::<crate::OwnerRecord>(kv.value())
                        .map_or_else(|_| "(unreadable owner record)".to_string(), |r| r.node);
                    Some((k.to_string(), holder))
                })
                .collect();
            let holder = |a: IpAddr| used.get(&host_key(a)).cloned();
            // Lowest free first, then over 1, 2, 4 ... 64 of the lowest free
            // after each lost race: two nodes starting together still get
            // .1 and .2, while a hundred settle in a dozen rounds.
            let spread = (1u128 << rounds.saturating_sub(1).min(6)).min(HOST_SPREAD_AFTER_LOSS);
            let addr =
                pick_host(&network, &node, cidr, requested, spread, &holder)?.ok_or_else(|| {
                    SubnetError::Exhausted {
                        network: network.to_string(),
                        cidr,
                        capacity: used.len() as u128,
                    }
                })?;
            let akey = format!("{addrs}{}", host_key(addr));
            let rec =
                serde_json::to_string(&owner(&node, addr)).map_err(|e| SubnetError::Corrupt {
                    location: akey.clone(),
                    reason: e.to_string(),
                })?;
            resp = self
                .txn(
                    deadline,
                    Txn::new()
                        .when(vec![
                            Compare::create_revision(node_key.clone(), CompareOp::Equal, 0),
                            Compare::create_revision(akey.clone(), CompareOp::Equal, 0),
                        ])
                        .and_then(vec![
                            TxnOp::put(node_key.clone(), addr.to_string(), None),
                            TxnOp::put(akey, rec, None),
                        ])
                        .or_else(snapshot()),
                )
                .await?;
            rounds += 1;
            if resp.succeeded() {
                return Ok(HostAllocation {
                    addr,
                    existing: false,
                    rounds,
                });
            }
        }
        Err(SubnetError::TooManyConflicts {
            node: node.to_string(),
            attempts: MAX_ATTEMPTS,
        })
    }

    async fn release_host(
        &self,
        network: Name<'_>,
        node: Name<'_>,
        slot: HostSlot,
    ) -> Result<Option<IpAddr>, SubnetError> {
        let deadline = Instant::now() + self.timeout;
        let node_key = key(network, slot.kind(), node);
        let resp = self
            .call(deadline, |mut c| {
                let k = node_key.clone();
                async move { c.get(k, None).await }
            })
            .await?;
        let Some(kv) = resp.kvs().first() else {
            return Ok(None);
        };
        let addr = kv.value_str().ok().and_then(|v| v.parse::<IpAddr>().ok());
        let mut ops = vec![TxnOp::delete(node_key.clone(), None)];
        if let Some(a) = addr {
            ops.push(TxnOp::delete(
                format!("/evio/{network}/hostaddrs/{}", host_key(a)),
                None,
            ));
        }
        self.txn(deadline, Txn::new().and_then(ops)).await?;
        Ok(addr)
    }

    async fn publish(
        &self,
        network: Name<'_>,
        node: Name<'_>,
        record: &PeerRecord,
        ttl: Duration,
    ) -> Result<(), SubnetError> {
        let deadline = Instant::now() + self.timeout;
        let lease = match self.lease() {
            Some(l) if self.keep_alive(deadline, l).await? > 0 => l,
            _ => {
                let l = self.grant(deadline, ttl).await?;
                self.set_lease(Some(l));
                l
            }
        };
        let key_rec = key(network, "peers", node);
        let value = serde_json::to_string(record).map_err(|e| SubnetError::Corrupt {
            location: key_rec.clone(),
            reason: e.to_string(),
        })?;
        let alive = Alive {
            heartbeat: record.heartbeat.clone(),
            connected: Vec::new(),
        };
        let key_alive = key(network, "alive", node);
        let alive = serde_json::to_string(&alive).map_err(|e| SubnetError::Corrupt {
            location: key_alive.clone(),
            reason: e.to_string(),
        })?;
        // Record and liveness in one revision: a watcher never sees a
        // record without its liveness (it would take the node for stale).
        let txn = Txn::new().and_then(vec![
            TxnOp::put(key_rec, value, None),
            TxnOp::put(key_alive, alive, Some(PutOptions::new().with_lease(lease))),
        ]);
        self.txn(deadline, txn).await?;
        Ok(())
    }

    async fn refresh(
        &self,
        network: Name<'_>,
        node: Name<'_>,
        connected: &[String],
    ) -> Result<Liveness, SubnetError> {
        let deadline = Instant::now() + self.timeout;
        let Some(lease) = self.lease() else {
            return Ok(Liveness::Expired);
        };
        if self.keep_alive(deadline, lease).await? <= 0 {
            self.set_lease(None);
            return Ok(Liveness::Expired);
        }
        let (krec, kalive) = (key(network, "peers", node), key(network, "alive", node));
        let resp = self.read(deadline, &[krec, kalive.clone()]).await?;
        let ops = resp.op_responses();
        if kvs(ops.first()).is_empty() {
            // Our lease is alive but the record is gone: deleted by someone.
            return Ok(Liveness::Revoked);
        }
        let Some(kv) = kvs(ops.get(1)).first() else {
            return Ok(Liveness::Expired);
        };
        if kv.lease() != lease {
            // Someone else (another agent with our node name, or an older
            // instance) owns it now: ours expired in effect.
            return Ok(Liveness::Expired);
        }
        let said: Alive = serde_json::from_slice(kv.value()).unwrap_or_default();
        if said.connected != connected {
            let alive = Alive {
                heartbeat: now_rfc3339(),
                connected: connected.to_vec(),
            };
            self.put_alive(deadline, &kalive, &alive, lease).await?;
        }
        Ok(Liveness::Alive)
    }

    async fn peers(&self, network: Name<'_>) -> Result<PeerSnapshot, SubnetError> {
        self.read_network(&network).await
    }

    async fn watch_peers(
        &self,
        network: Name<'_>,
        since: &PeerSnapshot,
        wait: Duration,
    ) -> Result<Option<PeerSnapshot>, SubnetError> {
        self.follow(&network, since.token, wait).await
    }

    async fn remove_peer(&self, network: Name<'_>, node: Name<'_>) -> Result<bool, SubnetError> {
        let deadline = Instant::now() + self.timeout;
        let ops = vec![
            TxnOp::delete(key(network, "peers", node), None),
            TxnOp::delete(key(network, "alive", node), None),
        ];
        let r = self.txn(deadline, Txn::new().and_then(ops)).await?;
        Ok(matches!(
            r.op_responses().first(),
            Some(TxnOpResponse::Delete(d)) if d.deleted() > 0
        ))
    }

    async fn allocations(&self, network: Name<'_>) -> Result<Allocations, SubnetError> {
        let deadline = Instant::now() + self.timeout;
        let mut out = Allocations::default();
        for (prefix, hosts) in [
            (format!("/evio/{network}/nodes/"), None),
            (format!("/evio/{network}/hostnodes/"), Some(HostSlot::First)),
            (format!("/evio/{network}/hostnodes6/"), Some(HostSlot::Ipv6)),
        ] {
            let resp = self
                .call(deadline, |mut c| {
                    let p = prefix.clone();
                    async move { c.get(p, Some(GetOptions::new().with_prefix())).await }
                })
                .await?;
            for kv in resp.kvs() {
                let (Ok(k), Ok(v)) = (kv.key_str(), kv.value_str()) else {
                    continue;
                };
                let Some(node) = k.strip_prefix(&prefix) else {
                    continue;
                };
                if let Some(slot) = hosts {
                    if let Ok(a) = v.parse() {
                        let m = match slot {
                            HostSlot::First => &mut out.hosts,
                            HostSlot::Ipv6 => &mut out.hosts6,
                        };
                        m.insert(node.to_string(), a);
                    }
                } else if let Ok(n) = v.parse() {
                    out.subnets.insert(node.to_string(), n);
                }
            }
        }
        Ok(out)
    }

    async fn release_node(
        &self,
        network: Name<'_>,
        node: Name<'_>,
        req: &ReleaseRequest,
    ) -> Result<ReleasedNode, SubnetError> {
        let deadline = Instant::now() + self.timeout;
        for _ in 0..MAX_ATTEMPTS {
            let mut gets: Vec<String> = ["nodes", "hostnodes", "peers", "alive"]
                .iter()
                .map(|k| key(network, k, node))
                .collect();
            gets.push(prefix(&network, "subnets"));
            gets.push(prefix(&network, "hostaddrs"));
            gets.push(key(network, HostSlot::Ipv6.kind(), node));
            let resp = self.read(deadline, &gets).await?;
            let plan = ReleasePlan::read(network, node, resp.op_responses().as_slice());
            if !plan.known {
                return Err(SubnetError::NotFound {
                    network: network.to_string(),
                    node: node.to_string(),
                });
            }
            let snap = self.snapshot(deadline, &network).await?;
            let was_live = snap.alive(&node);
            if was_live && !req.force {
                return Err(SubnetError::NodeLive {
                    network: network.to_string(),
                    node: node.to_string(),
                    why: crate::peers_file::live_why(&snap, &node),
                });
            }
            let note = Released {
                node: node.to_string(),
                time: now_rfc3339(),
                reason: req.reason.clone(),
                by: req.by.clone(),
                subnet: plan.freed.subnet.map(|s| s.to_string()),
                host_address: plan.freed.host.map(|h| h.to_string()),
                extra: serde_json::Map::new(),
            };
            let note = serde_json::to_string(&note).map_err(|e| SubnetError::Corrupt {
                location: key(network, "released", node),
                reason: e.to_string(),
            })?;
            let when: Vec<Compare> = plan
                .guards
                .iter()
                .map(|(k, rev)| Compare::mod_revision(k.clone(), CompareOp::Equal, *rev))
                .collect();
            let mut ops: Vec<TxnOp> = plan
                .deletes
                .iter()
                .map(|k| TxnOp::delete(k.clone(), None))
                .collect();
            ops.push(TxnOp::put(key(network, "released", node), note, None));
            let r = self
                .txn(deadline, Txn::new().when(when).and_then(ops))
                .await?;
            if r.succeeded() {
                return Ok(ReleasedNode {
                    was_live,
                    ..plan.freed
                });
            }
            // Something of the node changed in between (its agent came
            // back, a concurrent release): look again.
        }
        Err(SubnetError::TooManyConflicts {
            node: node.to_string(),
            attempts: MAX_ATTEMPTS,
        })
    }

    async fn forget_released(
        &self,
        network: Name<'_>,
        node: Name<'_>,
    ) -> Result<bool, SubnetError> {
        let deadline = Instant::now() + self.timeout;
        let k = key(network, "released", node);
        let r = self
            .call(deadline, |mut c| {
                let k = k.clone();
                async move { c.delete(k, None).await }
            })
            .await?;
        Ok(r.deleted() > 0)
    }

    fn lease_id(&self) -> Option<i64> {
        self.lease()
    }

    fn adopt_lease(&self, id: i64) {
        self.set_lease(Some(id));
    }

    fn detach_watch(&self) -> Option<Followed> {
        let mut slot = self.watching.try_lock().ok()?;
        let mut w = slot.take()?;
        w.stream = None;
        Some(Followed(w))
    }

    fn resume_watch(&self, f: Followed) {
        if let Ok(mut slot) = self.watching.try_lock() {
            if slot.is_none() {
                *slot = Some(f.0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A new connection, or a watch stream that broke, goes on from the
    /// mirror held; the whole network is read again only when there is
    /// none, it is of another network, or it is older than the caller's
    /// view.
    #[test]
    fn a_watch_resumes_from_the_mirror_and_reads_only_without_one() {
        assert_eq!(start_plan(None, "net", 0), Start::Read);
        assert_eq!(start_plan(Some(("net", 40)), "net", 40), Start::Resume);
        assert_eq!(start_plan(Some(("net", 41)), "net", 40), Start::Resume);
        assert_eq!(start_plan(Some(("net", 39)), "net", 40), Start::Read);
        assert_eq!(start_plan(Some(("other", 40)), "net", 40), Start::Read);
        // A fresh agent (its view is empty, token 0) takes any mirror.
        assert_eq!(start_plan(Some(("net", 7)), "net", 0), Start::Resume);
    }

    /// Only a compaction (or a cancel we cannot explain) loses events.
    #[test]
    fn only_a_compaction_or_a_cancel_reads_everything_again() {
        assert_eq!(after_end(WatchEnd::Closed), Start::Resume);
        assert_eq!(after_end(WatchEnd::Compacted), Start::Read);
        assert_eq!(after_end(WatchEnd::Cancelled), Start::Read);
        assert_eq!(after_end(WatchEnd::Rewound), Start::Read);
    }

    /// A store restored from a snapshot is at a revision below the
    /// mirror's; one that merely restarted is not.
    #[test]
    fn a_store_behind_the_mirror_was_restored() {
        assert!(rewound(Some(90), 120));
        assert!(!rewound(Some(120), 120));
        assert!(!rewound(Some(200), 120));
        assert!(!rewound(None, 120));
    }
}
