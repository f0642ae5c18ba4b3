//! [`OverlayStore`] over etcd: records are attached to a lease that the
//! agent keeps alive, so a dead node's record disappears by itself; peers
//! are followed with a watch, never by polling.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use etcd_client::{
    Compare, CompareOp, EventType, GetOptions, PutOptions, Txn, TxnOp, WatchOptions,
};
use ipnet::IpNet;

use crate::peers::{host_key, host_owner as owner, pick_host, Name};
use crate::{
    peers::Allocations, EtcdStore, HostAllocation, Liveness, OverlayBackend, PeerRecord,
    PeerSnapshot, SubnetError,
};

/// Bound on create attempts that lose a race for the same address.
const MAX_ATTEMPTS: u32 = 64;

fn peers_prefix(network: &str) -> String {
    format!("/evio/{network}/peers/")
}

fn peer_key(network: Name<'_>, node: Name<'_>) -> String {
    format!("/evio/{network}/peers/{node}")
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

    async fn snapshot(
        &self,
        deadline: Instant,
        network: &str,
    ) -> Result<PeerSnapshot, SubnetError> {
        let prefix = peers_prefix(network);
        let resp = self
            .call(deadline, |mut c| {
                let p = prefix.clone();
                async move { c.get(p, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        let token = resp.header().map(|h| h.revision()).unwrap_or(0).max(0) as u128;
        let mut records = Vec::new();
        for kv in resp.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            // One bad record must not hide every other peer: skip it (the
            // agent that owns it rewrites it).
            match serde_json::from_slice::<PeerRecord>(kv.value()) {
                Ok(r) if key.ends_with(&format!("/{}", r.node)) => records.push(r),
                _ => {}
            }
        }
        Ok(PeerSnapshot { records, token })
    }
}

#[async_trait]
impl OverlayBackend for EtcdStore {
    async fn allocate_host(
        &self,
        network: Name<'_>,
        node: Name<'_>,
        cidr: IpNet,
        preferred: Option<IpAddr>,
    ) -> Result<HostAllocation, SubnetError> {
        let deadline = Instant::now() + self.timeout;
        let node_key = format!("/evio/{network}/hostnodes/{node}");
        let addrs = format!("/evio/{network}/hostaddrs/");
        let snapshot = || {
            vec![
                TxnOp::get(node_key.clone(), None),
                TxnOp::get(
                    addrs.clone(),
                    Some(GetOptions::new().with_prefix().with_keys_only()),
                ),
            ]
        };
        let mut resp = self.txn(deadline, Txn::new().and_then(snapshot())).await?;
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
            let used: std::collections::HashSet<String> = kvs(1)
                .iter()
                .filter_map(|kv| {
                    std::str::from_utf8(kv.key())
                        .ok()
                        .and_then(|k| k.strip_prefix(&addrs))
                        .map(str::to_string)
                })
                .collect();
            let taken = |a: IpAddr| used.contains(&host_key(a));
            let addr =
                pick_host(cidr, preferred, &taken, &mut rand::thread_rng())?.ok_or_else(|| {
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
            if resp.succeeded() {
                return Ok(HostAllocation {
                    addr,
                    existing: false,
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
    ) -> Result<Option<IpAddr>, SubnetError> {
        let deadline = Instant::now() + self.timeout;
        let node_key = format!("/evio/{network}/hostnodes/{node}");
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
        let key = peer_key(network, node);
        let value = serde_json::to_string(record).map_err(|e| SubnetError::Corrupt {
            location: key.clone(),
            reason: e.to_string(),
        })?;
        self.call(deadline, |mut c| {
            let (k, v) = (key.clone(), value.clone());
            async move { c.put(k, v, Some(PutOptions::new().with_lease(lease))).await }
        })
        .await?;
        Ok(())
    }

    async fn refresh(&self, network: Name<'_>, node: Name<'_>) -> Result<Liveness, SubnetError> {
        let deadline = Instant::now() + self.timeout;
        let Some(lease) = self.lease() else {
            return Ok(Liveness::Expired);
        };
        if self.keep_alive(deadline, lease).await? <= 0 {
            self.set_lease(None);
            return Ok(Liveness::Expired);
        }
        let key = peer_key(network, node);
        let resp = self
            .call(deadline, |mut c| {
                let k = key.clone();
                async move { c.get(k, None).await }
            })
            .await?;
        Ok(match resp.kvs().first() {
            // Our lease is alive but the record is gone: deleted by hand.
            None => Liveness::Revoked,
            // Someone else (another agent with our node name, or an older
            // instance) owns it now: ours expired in effect.
            Some(kv) if kv.lease() != lease => Liveness::Expired,
            Some(_) => Liveness::Alive,
        })
    }

    async fn peers(&self, network: Name<'_>) -> Result<PeerSnapshot, SubnetError> {
        let deadline = Instant::now() + self.timeout;
        self.snapshot(deadline, &network).await
    }

    async fn watch_peers(
        &self,
        network: Name<'_>,
        since: &PeerSnapshot,
        wait: Duration,
    ) -> Result<Option<PeerSnapshot>, SubnetError> {
        let prefix = peers_prefix(&network);
        let start = i64::try_from(since.token).unwrap_or(0) + 1;
        let waited = tokio::time::timeout(wait, async {
            let mut client = self.client.clone();
            let mut stream = client
                .watch(
                    prefix.clone(),
                    Some(WatchOptions::new().with_prefix().with_start_revision(start)),
                )
                .await?;
            loop {
                match stream.message().await? {
                    // Compacted past our revision or cancelled: re-read.
                    Some(r) if r.canceled() || r.compact_revision() > 0 => return Ok(()),
                    Some(r)
                        if r.events().iter().any(|e| {
                            matches!(e.event_type(), EventType::Put | EventType::Delete)
                        }) =>
                    {
                        return Ok(())
                    }
                    Some(_) => continue,
                    None => return Ok(()),
                }
            }
        })
        .await;
        match waited {
            Err(_) => Ok(None),
            Ok(Err(e)) => Err(SubnetError::Etcd {
                endpoints: self.endpoints.clone(),
                message: crate::etcd::chain(&e),
            }),
            Ok(Ok(())) => {
                let deadline = Instant::now() + self.timeout;
                self.snapshot(deadline, &network).await.map(Some)
            }
        }
    }

    async fn remove_peer(&self, network: Name<'_>, node: Name<'_>) -> Result<bool, SubnetError> {
        let deadline = Instant::now() + self.timeout;
        let key = peer_key(network, node);
        let r = self
            .call(deadline, |mut c| {
                let k = key.clone();
                async move { c.delete(k, None).await }
            })
            .await?;
        Ok(r.deleted() > 0)
    }

    async fn allocations(&self, network: Name<'_>) -> Result<Allocations, SubnetError> {
        let deadline = Instant::now() + self.timeout;
        let mut out = Allocations::default();
        for (prefix, hosts) in [
            (format!("/evio/{network}/nodes/"), false),
            (format!("/evio/{network}/hostnodes/"), true),
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
                if hosts {
                    if let Ok(a) = v.parse() {
                        out.hosts.insert(node.to_string(), a);
                    }
                } else if let Ok(n) = v.parse() {
                    out.subnets.insert(node.to_string(), n);
                }
            }
        }
        Ok(out)
    }
}
