//! Signalling through the store, on its own thread with a current-thread
//! tokio runtime (etcd's client is async): publish this node's record,
//! keep it alive (etcd lease keep-alive / file heartbeat), follow the other
//! records (etcd watch / file stat) and hand the peer set to the engine.

use std::net::SocketAddr;
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use evio_overlay::crypto::parse_key;
use evio_overlay::crypto::{b64, Key};
use evio_overlay::engine::{shared_keys, Candidate, PeerInfo};
use evio_overlay::path::Class;
use evio_subnet::{
    open_overlay_store, Candidate as StoreCandidate, CandidateKind, Liveness, OverlayStore,
    PeerRecord, PeerSnapshot, StoreOptions, StoreUrl,
};
use ipnet::IpNet;

use crate::dataplane::Command;
use crate::Waker;

/// The record field naming the node bridge's MAC (kept in the record's
/// `extra`, so older agents carry it through a read-modify-write).
pub const BRIDGE_MAC: &str = "bridgeMac";

/// Heartbeat / lease keep-alive period.
pub const REFRESH: Duration = Duration::from_secs(10);
/// etcd lease TTL: a dead agent's record goes after this.
pub const LEASE_TTL: Duration = Duration::from_secs(30);
/// File store: a record whose heartbeat is older is a dead agent's.
pub const STALE_AFTER: Duration = Duration::from_secs(60);

/// What the store thread reports to the rest of the agent.
#[derive(Debug, Clone, Default)]
pub struct StoreHealth {
    pub published: bool,
    pub revoked: bool,
    pub last_error: Option<String>,
    pub peers_seen: usize,
}

pub struct Signalling {
    pub network: String,
    pub url: StoreUrl,
    pub opts: StoreOptions,
    pub record: PeerRecord,
    pub commands: SyncSender<Command>,
    pub waker: Waker,
    pub stop: Arc<crate::Stop>,
    pub health: Arc<Mutex<StoreHealth>>,
    pub candidates: tokio::sync::mpsc::UnboundedReceiver<Vec<(SocketAddr, CandidateKind)>>,
}

fn class_of(k: CandidateKind) -> Class {
    match k {
        CandidateKind::Local => Class::Local,
        CandidateKind::Reflexive => Class::Direct,
        CandidateKind::Relay => Class::Relay,
    }
}

/// The engine's view of a record; `None` for a record it cannot use (its
/// own, or malformed: logged).
pub fn peer_info(rec: &PeerRecord, own: &str, file_store: bool) -> Option<PeerInfo> {
    if rec.node == own {
        return None;
    }
    let Some(key) = parse_key(&rec.public_key) else {
        tracing::warn!(node = %rec.node, "peer record: publicKey is not a base64 X25519 key; ignored");
        return None;
    };
    let Ok(pod_subnet) = rec.pod_subnet.parse::<IpNet>() else {
        tracing::warn!(node = %rec.node, "peer record: podSubnet {:?} is not a CIDR; ignored", rec.pod_subnet);
        return None;
    };
    let host_addr = rec
        .host_address
        .as_deref()
        .and_then(|h| h.parse::<IpNet>().ok());
    let mut candidates: Vec<Candidate> = rec
        .candidates
        .iter()
        .filter_map(|c| {
            Some(Candidate {
                addr: c.addr.parse().ok()?,
                class: class_of(c.kind),
            })
        })
        .collect();
    if candidates.is_empty() {
        candidates = rec
            .endpoints
            .iter()
            .filter_map(|e| {
                Some(Candidate {
                    addr: e.parse().ok()?,
                    class: Class::Direct,
                })
            })
            .collect();
    }
    let stale = file_store
        && rec
            .heartbeat_age(SystemTime::now())
            .is_none_or(|a| a > STALE_AFTER);
    // An older agent publishes none; a malformed one is as good as none.
    let bridge_mac = rec
        .extra
        .get(BRIDGE_MAC)
        .and_then(serde_json::Value::as_str)
        .and_then(evio_overlay::packet::parse_mac);
    Some(PeerInfo {
        node: rec.node.clone(),
        key,
        pod_subnet,
        host_addr,
        candidates,
        stale,
        bridge_mac,
    })
}

fn set_health(h: &Mutex<StoreHealth>, f: impl FnOnce(&mut StoreHealth)) {
    if let Ok(mut g) = h.lock() {
        f(&mut g);
    }
}

impl Signalling {
    pub fn run(mut self) {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!("store thread: no runtime: {e}");
                return;
            }
        };
        rt.block_on(self.main());
    }

    /// The store, retried until it answers; None if the agent stops first.
    async fn connect(&self) -> Option<Box<dyn OverlayStore>> {
        let mut pause = Duration::from_millis(200);
        let mut stopped = self.stop.subscribe();
        loop {
            match open_overlay_store(&self.url, &self.opts).await {
                Ok(s) => return Some(s),
                Err(e) => {
                    tracing::warn!("store {}: {e}; retrying", self.url);
                    set_health(&self.health, |h| h.last_error = Some(e.to_string()));
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = stopped.changed() => return None,
                    }
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Hands the peer set to the engine. A record is believed only where
    /// it agrees with the allocation records: its pod subnet must be the one
    /// `nodes/<node>` holds and its host address the one `hostnodes/<node>`
    /// holds, so a record cannot claim another node's addresses (and pass
    /// source enforcement for them).
    /// Records that claim one key are refused by the engine, all of them;
    /// `last` (what was said before) keeps this to one line per change.
    async fn send_peers(
        &self,
        store: &dyn OverlayStore,
        snap: &PeerSnapshot,
        last: &mut Vec<(Key, Vec<String>)>,
    ) {
        let file = matches!(self.url, StoreUrl::File(_));
        let alloc = match store.allocations(&self.network).await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!("reading allocations to check peer records: {e}");
                return;
            }
        };
        let peers: Vec<PeerInfo> = snap
            .records
            .iter()
            .filter(|r| {
                let subnet_ok = r
                    .pod_subnet
                    .parse::<IpNet>()
                    .ok()
                    .is_some_and(|n| alloc.subnets.get(&r.node) == Some(&n));
                let host_ok = match r.host_address.as_deref() {
                    None => true,
                    Some(h) => h
                        .parse::<IpNet>()
                        .ok()
                        .is_some_and(|n| alloc.hosts.get(&r.node) == Some(&n.addr())),
                };
                if !(subnet_ok && host_ok) && r.node != self.record.node {
                    tracing::warn!(
                        node = %r.node,
                        "peer record ignored: its podSubnet {} / hostAddress {:?} are not what the store allocated to it",
                        r.pod_subnet,
                        r.host_address
                    );
                }
                subnet_ok && host_ok
            })
            .filter_map(|r| peer_info(r, &self.record.node, file))
            .collect();
        let shared = shared_keys(&peers);
        if shared != *last {
            for (key, nodes) in &shared {
                tracing::warn!(
                    key = %b64(key),
                    nodes = ?nodes,
                    "peer records claim one public key: none of them is believed until all but one are gone"
                );
            }
            *last = shared;
        }
        set_health(&self.health, |h| h.peers_seen = peers.len());
        let _ = self.commands.send(Command::Peers(peers));
        self.waker.wake();
    }

    async fn publish(&mut self, store: &dyn OverlayStore) -> bool {
        self.record.stamp();
        match store.publish(&self.network, &self.record, LEASE_TTL).await {
            Ok(()) => {
                set_health(&self.health, |h| {
                    h.published = true;
                    h.last_error = None;
                });
                true
            }
            Err(e) => {
                tracing::warn!("publishing this node's record: {e}");
                set_health(&self.health, |h| h.last_error = Some(e.to_string()));
                false
            }
        }
    }

    async fn main(&mut self) {
        let Some(store) = self.connect().await else {
            return;
        };
        let mut published = self.publish(store.as_ref()).await;
        let mut revoked = false;
        let mut snap = PeerSnapshot::default();
        let mut shared = Vec::new();
        match store.peers(&self.network).await {
            Ok(s) => {
                self.send_peers(store.as_ref(), &s, &mut shared).await;
                snap = s;
            }
            Err(e) => tracing::warn!("reading peer records: {e}"),
        }
        let mut refresh = tokio::time::interval(REFRESH);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        refresh.tick().await;
        let mut stopped = self.stop.subscribe();
        loop {
            if self.stop.is_set() {
                break;
            }
            tokio::select! {
                _ = stopped.changed() => {}
                c = self.candidates.recv() => {
                    let Some(c) = c else { break };
                    self.record.candidates = c
                        .iter()
                        .map(|(a, k)| StoreCandidate { addr: a.to_string(), kind: *k })
                        .collect();
                    self.record.endpoints = c.iter().map(|(a, _)| a.to_string()).collect();
                    if !revoked {
                        published = self.publish(store.as_ref()).await;
                    }
                }
                _ = refresh.tick() => {
                    if revoked {
                        continue;
                    }
                    if !published {
                        published = self.publish(store.as_ref()).await;
                        continue;
                    }
                    match store.refresh(&self.network, &self.record.node).await {
                        Ok(Liveness::Alive) => {}
                        Ok(Liveness::Expired) => {
                            tracing::warn!("this node's record expired in the store; publishing it again");
                            published = self.publish(store.as_ref()).await;
                        }
                        Ok(Liveness::Revoked) => {
                            tracing::error!(
                                "this node's record was deleted from the store: the node was removed from the overlay; \
                                 tunnels are down until the agent is restarted"
                            );
                            revoked = true;
                            set_health(&self.health, |h| h.revoked = true);
                            let _ = self.commands.send(Command::Peers(Vec::new()));
                            self.waker.wake();
                        }
                        Err(e) => {
                            tracing::warn!("keeping this node's record alive: {e}");
                            set_health(&self.health, |h| h.last_error = Some(e.to_string()));
                        }
                    }
                }
                w = store.watch_peers(&self.network, &snap, Duration::from_secs(30)) => {
                    match w {
                        Ok(Some(s)) => {
                            if s.records != snap.records && !revoked {
                                self.send_peers(store.as_ref(), &s, &mut shared).await;
                            }
                            snap = s;
                        }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!("watching peer records: {e}");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                }
            }
        }
        // Leaving cleanly: take our record out so the others drop our
        // tunnels now rather than after the lease or heartbeat runs out.
        if published && !revoked {
            let r = tokio::time::timeout(
                Duration::from_secs(2),
                store.remove_peer(&self.network, &self.record.node),
            )
            .await;
            if !matches!(r, Ok(Ok(_))) {
                tracing::warn!("could not remove this node's record on shutdown");
            }
        }
    }
}
