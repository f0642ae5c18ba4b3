//! Signalling through the store, on its own thread with a current-thread
//! tokio runtime (etcd's client is async): publish this node's record,
//! keep its liveness (etcd lease keep-alive / file heartbeat), follow the
//! network (etcd watch / file stat) and hand the peer set to the engine.
//!
//! The store is the control plane; the tunnels are the data plane and do
//! not depend on it (docs/operations.md, "What happens when"):
//! * a store that fails or hangs only delays this thread: every call is
//!   bounded ([`CALL_LIMIT`]) and the engine keeps the last peer set. A
//!   call that gets no answer in time is tried again on the same session
//!   (connection, lease, watch); a broken connection, or calls unanswered
//!   for [`crate::retry::SLOW_HOLD`], make a new connection after a
//!   jittered backoff, which keeps the lease and watches on from the last
//!   revision seen (see [`crate::retry`]);
//! * a peer whose liveness lapses (its lease expired: it lost the store)
//!   is marked stale, not removed: its tunnel stays while the session
//!   works, and it goes only when the session dies;
//! * a peer is removed when its record is deleted (it left, or was
//!   released), or its key changes (the engine starts over);
//! * with `reclaimAfter`, nodes absent that long (by this agent's own
//!   monotonic clock: no clock of another node is trusted) and vouched for
//!   by nobody are released.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use evio_overlay::crypto::{b64, parse_key, Key};
use evio_overlay::engine::{shared_keys, PeerCandidate, PeerInfo, PeerState};
use evio_overlay::path::Rank;
use evio_subnet::{
    open_overlay_store, Candidate as StoreCandidate, CandidateKind, Liveness, OverlayStore,
    PeerRecord, PeerSnapshot, ReleaseRequest, StoreOptions, StoreUrl, SubnetError,
};
use ipnet::IpNet;

use crate::cache::Cache;
use crate::dataplane::{Command, Snapshot};
use crate::retry::{Failure, Next, Policy, RECONNECT_MAX, SLOW_HOLD};
use crate::EngineHandle;

/// The record field naming the node bridge's MAC (kept in the record's
/// `extra`, so older agents carry it through a read-modify-write).
pub const BRIDGE_MAC: &str = "bridgeMac";

/// Liveness keep-alive period.
pub const REFRESH: Duration = Duration::from_secs(10);
/// etcd lease TTL: a dead agent's node turns stale after this.
pub const LEASE_TTL: Duration = Duration::from_secs(30);
/// Bound of one store call (connecting included): a store that hangs holds
/// this thread no longer, and a partition's end is noticed within about
/// this much plus [`crate::retry::RECONNECT_MAX`].
pub const CALL_LIMIT: Duration = Duration::from_secs(4);
// A loaded etcd must not expire the lease of a live agent: between two
// renewals (a period, then slow calls tried again for up to SLOW_HOLD)
// the lease has to outlive the slowest answer by a margin.
const _: () = assert!(LEASE_TTL.as_secs() >= 2 * (REFRESH.as_secs() + CALL_LIMIT.as_secs()));
const _: () = assert!(SLOW_HOLD.as_secs() + CALL_LIMIT.as_secs() < LEASE_TTL.as_secs());
/// A stale peer without a session for this long is removed: its session
/// died, and nothing says it will come back.
pub const STALE_GRACE: Duration = Duration::from_secs(15);
/// How long leaving may take to delete the node's record.
const LEAVE_LIMIT: Duration = Duration::from_secs(2);
/// A peer stays in this node's vouch list (its liveness record's
/// `connected`) this long after it was last seen connected: sessions come
/// and go with traffic (on demand: one lapses 2-3 minutes after the last
/// frame), and every rewrite of the record reaches every agent's watch, so
/// the list follows traffic episodes, not each session.
pub const VOUCH_HOLD: Duration = Duration::from_secs(300);
/// A node cut off from the store this long keeps sessions with this many
/// live peers (chosen by hash, so the load spreads) warm, renewed this
/// often, so that they vouch for it although it may carry no traffic
/// (sessions on demand lapse 2-3 minutes after the last frame).
const CUT_OFF_AFTER: Duration = REFRESH;
const WATCHERS: usize = 3;
const WATCH_RENEW: Duration = Duration::from_secs(60);

/// What the store thread reports to the rest of the agent.
#[derive(Debug, Clone, Default)]
pub struct StoreHealth {
    pub published: bool,
    pub revoked: bool,
    pub last_error: Option<String>,
    pub peers_seen: usize,
    /// Peers kept while their liveness lapsed.
    pub stale: BTreeSet<String>,
    /// The agent runs from its cache: the store has not answered yet.
    pub from_cache: bool,
    /// Why the node is no longer part of the network, when it is not.
    pub revoked_why: Option<String>,
    /// When the store last confirmed this node's record (a publish or a
    /// liveness refresh that succeeded).
    pub confirmed: Option<Instant>,
    /// Records of the network that are no peer of this node, and why
    /// (node, reason), sorted.
    pub ignored: Vec<(String, String)>,
    /// The etcd client's certificate files and their expiry, as last read
    /// (when they changed on disk).
    pub certs: Vec<crate::certs::CertFile>,
    /// The kind each peer published its candidates with: which kind of
    /// candidate a working path goes to (`peers`), e.g. `mapped`, which
    /// the core ranks as one with reflexive.
    pub peer_kinds: HashMap<SocketAddr, CandidateKind>,
}

impl StoreHealth {
    /// The kind of candidate a path to `addr` goes to: what the peer
    /// published for it, else `peer-reflexive` (an address learned from
    /// the peer's own packets, e.g. after it came in through our mapping).
    /// How the working path was found, as `peers` reports it: the core's
    /// method, except that a path to a candidate the peer published as its
    /// gateway's port mapping is `mapped` (the core ranks it as one with
    /// reflexive and cannot tell them apart; it may also have learned the
    /// address from the peer's datagrams before the record came).
    pub fn path_method(
        &self,
        method: Option<evio_overlay::path::Method>,
        addr: Option<evio_overlay::path::PathAddr>,
    ) -> Option<&'static str> {
        let m = method?;
        let mapped = addr.is_some_and(|a| self.path_candidate(a) == CandidateKind::Mapped.as_str());
        use evio_overlay::path::Method;
        Some(
            if matches!(m, Method::Reflexive | Method::Learned) && mapped {
                "mapped"
            } else {
                m.as_str()
            },
        )
    }

    pub fn path_candidate(&self, addr: evio_overlay::path::PathAddr) -> &'static str {
        match addr.via {
            evio_overlay::path::Via::Turn(_) => "relay",
            evio_overlay::path::Via::Direct | evio_overlay::path::Via::Spare(_) => self
                .peer_kinds
                .get(&addr.remote)
                .map_or("peer-reflexive", |k| k.as_str()),
        }
    }
}

impl StoreHealth {
    /// `evio_overlay_store_ok`: published, not revoked, and confirmed by
    /// the store within one refresh period (plus the time a call may take):
    /// a store that stops answering turns it off within that time, while
    /// a record published once stays "published".
    pub fn store_ok(&self) -> bool {
        self.published
            && !self.revoked
            && self
                .confirmed
                .is_some_and(|t| t.elapsed() <= REFRESH + CALL_LIMIT)
    }
}

/// This node's allocations, to check the store still agrees.
#[derive(Debug, Clone)]
pub struct Own {
    pub pod_subnet: IpNet,
    pub host_addr: Option<IpNet>,
    /// The IPv6 host address of a dual-stack host CIDR (`hostnodes6/`).
    pub host_addr6: Option<IpNet>,
}

pub struct Signalling {
    pub network: String,
    pub url: StoreUrl,
    pub opts: StoreOptions,
    pub record: PeerRecord,
    pub own: Own,
    pub engine: EngineHandle,
    pub stop: Arc<crate::Stop>,
    /// Set with `stop` when the node leaves the network.
    pub leave: Arc<AtomicBool>,
    pub health: Arc<Mutex<StoreHealth>>,
    pub candidates: tokio::sync::mpsc::UnboundedReceiver<Vec<(SocketAddr, CandidateKind)>>,
    pub cache_path: PathBuf,
    pub cache: Cache,
    /// The peers the engine was started with (from the cache).
    pub initial: Vec<PeerInfo>,
    pub reclaim_after: Option<Duration>,
}

// The record's candidate kinds and the core's path classes, both ways, in
// one place: what a peer publishes as Reflexive is what we probe as
// Direct, and what we publish is read back by the same table.

/// The core's class of a published candidate; `None` for a kind this
/// agent does not know (a newer agent's), which is never probed.
pub(crate) fn class_of(k: CandidateKind) -> Option<Rank> {
    match k {
        CandidateKind::Local => Some(Rank::Local),
        // A gateway's port mapping is as direct as a reflexive address.
        CandidateKind::Reflexive | CandidateKind::Mapped => Some(Rank::Direct),
        CandidateKind::Relay => Some(Rank::Relay),
        CandidateKind::Unknown => None,
    }
}

/// The kind we publish for one of our candidates.
pub(crate) fn kind_of(c: Rank) -> CandidateKind {
    match c {
        Rank::Local => CandidateKind::Local,
        Rank::Direct => CandidateKind::Reflexive,
        Rank::Relay => CandidateKind::Relay,
    }
}

/// The engine's view of a record; `None` for a record it cannot use (its
/// own, or malformed: see [`check_record`]).
pub fn peer_info(rec: &PeerRecord, own: &str, stale: bool) -> Option<PeerInfo> {
    if rec.node == own {
        return None;
    }
    check_record(rec, stale).ok()
}

/// The engine's view of a record, or why it cannot be used.
pub fn check_record(rec: &PeerRecord, stale: bool) -> Result<PeerInfo, String> {
    let Some(key) = parse_key(&rec.public_key) else {
        return Err("its publicKey is not a base64 X25519 key".into());
    };
    let Ok(pod_subnet) = rec.pod_subnet.parse::<IpNet>() else {
        return Err(format!("its podSubnet {:?} is not a CIDR", rec.pod_subnet));
    };
    let host_addr = rec
        .host_address
        .as_deref()
        .and_then(|h| h.parse::<IpNet>().ok());
    // A dual-stack host CIDR's IPv6 address, beside an IPv4 `hostAddress`.
    let host_addr6 = match host_addr {
        Some(IpNet::V4(_)) => other_hosts(rec).into_iter().find(|n| n.addr().is_ipv6()),
        _ => None,
    };
    let mut candidates: Vec<PeerCandidate> = rec
        .candidates
        .iter()
        .filter_map(|c| {
            Some(PeerCandidate {
                addr: c.addr.parse().ok()?,
                class: class_of(c.kind)?,
            })
        })
        .collect();
    // The flat list only stands in for a record without kinds (an older
    // agent's): a newer one whose kinds are all unknown to us is not
    // probed through it either.
    if rec.candidates.is_empty() {
        candidates = rec
            .endpoints
            .iter()
            .filter_map(|e| {
                Some(PeerCandidate {
                    addr: e.parse().ok()?,
                    class: Rank::Direct,
                })
            })
            .collect();
    }
    // An older agent publishes none; a malformed one is as good as none.
    let bridge_mac = rec
        .extra
        .get(BRIDGE_MAC)
        .and_then(serde_json::Value::as_str)
        .and_then(evio_overlay::packet::parse_mac);
    Ok(PeerInfo {
        node: rec.node.clone(),
        key,
        pod_subnet,
        host_addr,
        host_addr6,
        candidates,
        stale,
        bridge_mac,
    })
}

/// The record's host addresses besides `hostAddress` (`hostAddresses`,
/// from a dual-stack node; an entry that does not parse is ignored).
fn other_hosts(r: &PeerRecord) -> Vec<IpNet> {
    let first = r
        .host_address
        .as_deref()
        .and_then(|h| h.parse::<IpNet>().ok());
    r.host_addresses
        .iter()
        .filter_map(|h| h.parse::<IpNet>().ok())
        .filter(|n| Some(*n) != first)
        .collect()
}

/// The records of `snap` a peer is believed for: its pod subnet must be
/// the one `nodes/<node>` holds and its host address the one
/// `hostnodes/<node>` holds, so a record cannot claim another node's
/// addresses (and pass source enforcement for them).
pub fn believed(snap: &PeerSnapshot) -> Vec<&PeerRecord> {
    snap.records
        .iter()
        .filter(|r| not_allocated(snap, r).is_none())
        .collect()
}

/// Why record `r` claims addresses the store did not allocate to its node.
fn not_allocated(snap: &PeerSnapshot, r: &PeerRecord) -> Option<String> {
    let alloc = &snap.alloc;
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
    // The IPv6 address beside it: what `hostnodes6/<node>` holds.
    let others_ok = other_hosts(r)
        .iter()
        .all(|n| alloc.hosts6.get(&r.node) == Some(&n.addr()));
    (!(subnet_ok && host_ok && others_ok)).then(|| {
        format!(
            "its podSubnet {} / hostAddress {} / hostAddresses {:?} are not what the store \
             allocated to it",
            r.pod_subnet,
            r.host_address.as_deref().unwrap_or("none"),
            r.host_addresses
        )
    })
}

fn set_health(h: &Mutex<StoreHealth>, f: impl FnOnce(&mut StoreHealth)) {
    if let Ok(mut g) = h.lock() {
        f(&mut g);
    }
}

/// A store call that failed, and how.
#[derive(Debug)]
struct CallErr {
    msg: String,
    failure: Failure,
}

impl std::fmt::Display for CallErr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.msg)
    }
}

impl CallErr {
    fn of(what: &str, e: &SubnetError) -> CallErr {
        CallErr {
            msg: format!("{what}: {e}"),
            failure: if e.is_slow() {
                Failure::Slow
            } else {
                Failure::Broken
            },
        }
    }
}

/// Runs a store call within [`CALL_LIMIT`].
async fn bounded<T>(
    what: &str,
    fut: impl std::future::Future<Output = Result<T, SubnetError>>,
) -> Result<T, CallErr> {
    match tokio::time::timeout(CALL_LIMIT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(CallErr::of(what, &e)),
        Err(_) => Err(CallErr {
            msg: format!("{what}: no answer within {CALL_LIMIT:?}"),
            failure: Failure::Slow,
        }),
    }
}

/// A seed for this agent's backoff jitter: different on every node and
/// every start, so agents that failed together spread out.
fn jitter_seed(node: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    node.hash(&mut h);
    std::process::id().hash(&mut h);
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default()
        .hash(&mut h);
    h.finish()
}

/// Why a session with the store ended.
enum End {
    Stopped,
    /// Connect again after the pause.
    Failed(String, Duration),
    /// The etcd client's certificate files changed: connect again with
    /// them, at once.
    Reconnect,
}

/// What the etcd TLS files (CA, client certificate, key) look like on disk:
/// identity, size and modification time, `None` for a file that is absent
/// or not configured. A rotation (new files, or a `mv` over them) changes
/// it; the connection made with the old ones is then replaced.
fn tls_files_stamp(opts: &StoreOptions) -> Vec<Option<(u64, u64, SystemTime)>> {
    use std::os::unix::fs::MetadataExt;
    let e = &opts.etcd;
    [&e.ca_file, &e.cert_file, &e.key_file]
        .into_iter()
        .map(|f| {
            let m = std::fs::metadata(f.as_ref()?).ok()?;
            Some((m.ino(), m.len(), m.modified().ok()?))
        })
        .collect()
}

/// What the thread keeps across store connections.
#[derive(Default)]
struct State {
    published: bool,
    revoked: bool,
    /// The peer set last handed to the engine.
    sent: Vec<PeerInfo>,
    snap: PeerSnapshot,
    /// Stale peers seen without a session, since when.
    sessionless: HashMap<String, Instant>,
    /// Stale peers removed because their session died.
    dropped: BTreeSet<String>,
    /// Nodes absent (not live, vouched for by nobody), since when, by our
    /// own clock: the reclaim timer.
    absent: HashMap<String, Instant>,
    lease: Option<i64>,
    /// The engine's queue refused the last peer set: the next tick hands
    /// it over again (no store change may come to do it).
    unsent: bool,
    /// Keys that several records claim, as last said (one warning per
    /// change, not per update).
    shared: Vec<(Key, Vec<String>)>,
    /// The peers and ignored records as last logged: node -> (key, stale),
    /// and (node, reason).
    told: HashMap<String, (Key, bool)>,
    told_ignored: Vec<(String, String)>,
    limiter: crate::events::LogLimiter,
    /// The TLS files' stamp when their certificates were last read.
    certs_read: Option<Vec<Option<(u64, u64, SystemTime)>>>,
    certs: Vec<crate::certs::CertFile>,
    expiry: crate::certs::ExpiryLog,
    /// Peers this node vouches for, and when each was last seen connected.
    vouch: HashMap<String, Instant>,
    /// A vouched-for node's record went: refresh the liveness record now,
    /// not at the next tick (`nodes release` refuses a vouched node).
    revouch: bool,
    /// The peers that vouch for this node were woken (once, at start).
    woke: bool,
    /// The store has failed since then (None: it answers).
    cut_off: Option<Instant>,
    /// When the watchers' sessions were last renewed.
    watched: Option<Instant>,
    /// When the store last renewed this node's liveness.
    kept: Option<Instant>,
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

    async fn main(&mut self) {
        let mut st = State {
            sent: self.initial.clone(),
            lease: self.cache.lease,
            told: (self.initial.iter())
                .map(|p| (p.node.clone(), (p.key, p.stale)))
                .collect(),
            ..State::default()
        };
        if !self.initial.is_empty() {
            tracing::info!(
                peers = self.initial.len(),
                "peers from the state cache, until the store answers"
            );
        }
        let mut stopped = self.stop.subscribe();
        let mut policy = Policy::new(jitter_seed(&self.record.node));
        // What the last connection's watch knew: the next one watches on
        // from there instead of reading the whole network again.
        let mut followed: Option<evio_subnet::Followed> = None;
        // An outage is said once, and again a minute on, not every retry.
        let mut warned: Option<Instant> = None;
        while !self.stop.is_set() {
            let tls = tls_files_stamp(&self.opts);
            self.read_certs(&mut st, &tls);
            let end = match self.connect().await {
                Ok(store) => {
                    if let Some(l) = st.lease {
                        store.adopt_lease(l);
                    }
                    let resumed = followed.take().is_some_and(|f| {
                        store.resume_watch(f);
                        true
                    });
                    let end = self
                        .session(
                            store.as_ref(),
                            &mut st,
                            &mut warned,
                            &tls,
                            &mut policy,
                            resumed,
                        )
                        .await;
                    if let Some(l) = store.lease_id() {
                        st.lease = Some(l);
                    }
                    followed = store.detach_watch();
                    end
                }
                Err(e) => End::Failed(e.msg, policy.connect_failed()),
            };
            match end {
                End::Stopped => break,
                End::Reconnect => {
                    tracing::info!(
                        "the etcd client certificates changed on disk: connecting again with them"
                    );
                }
                End::Failed(e, pause) => {
                    if warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                        tracing::warn!(
                            "store {}: {e}; the tunnels carry on, connecting again (backoff up to {RECONNECT_MAX:?})",
                            self.url
                        );
                        warned = Some(Instant::now());
                    } else {
                        tracing::debug!("store {}: {e}", self.url);
                    }
                    set_health(&self.health, |h| h.last_error = Some(e));
                    self.keep_watched(&mut st);
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = stopped.changed() => {}
                    }
                }
            }
        }
        if self.leave.load(Ordering::SeqCst) {
            self.leave_store().await;
        }
    }

    /// Cut off from the store for [`CUT_OFF_AFTER`]: keeps the sessions of
    /// a few live peers warm (handshakes now if there are none), renewed
    /// every [`WATCH_RENEW`], so that they vouch for this node in the
    /// store and `reclaimAfter` never takes it while it is alive, traffic
    /// or not.
    fn keep_watched(&self, st: &mut State) {
        let now = Instant::now();
        let since = *st.cut_off.get_or_insert(now);
        let renew = st
            .watched
            .is_none_or(|t| now.duration_since(t) >= WATCH_RENEW);
        if now.duration_since(since) < CUT_OFF_AFTER || !renew || st.revoked {
            return;
        }
        st.watched = Some(now);
        let me = &self.record.node;
        let w = watchers(me, st.snap.live.keys().filter(|n| *n != me), WATCHERS);
        if !w.is_empty() {
            tracing::debug!(peers = ?w, "cut off from the store: keeping sessions with peers that vouch for this node");
            self.engine.send(Command::Wake(w));
        }
    }

    /// Reads the certificates' expiry when the files are new (at start, and
    /// whenever a rotation makes the thread connect again), and warns of
    /// any that ends soon.
    fn read_certs(&self, st: &mut State, tls: &[Option<(u64, u64, SystemTime)>]) {
        if !matches!(self.url, StoreUrl::Etcd(_)) {
            return;
        }
        if st.certs_read.as_deref() != Some(tls) {
            st.certs = crate::certs::read(&self.opts.etcd);
            st.certs_read = Some(tls.to_vec());
            set_health(&self.health, |h| h.certs = st.certs.clone());
        }
        st.expiry
            .check(&st.certs, SystemTime::now(), Instant::now());
    }

    /// A fresh connection: after a failure the old one may be what hangs
    /// (a TCP connection that crossed a partition can take minutes of
    /// retransmission back-off to recover).
    async fn connect(&self) -> Result<Box<dyn OverlayStore>, CallErr> {
        let mut opts = self.opts.clone();
        opts.timeout = opts.timeout.min(CALL_LIMIT);
        bounded("connecting", open_overlay_store(&self.url, &opts)).await
    }

    /// Takes the node out of the store on `--stop-and-leave`.
    async fn leave_store(&self) {
        let r = tokio::time::timeout(LEAVE_LIMIT, async {
            let store = self.connect().await?;
            bounded(
                "removing this node's record",
                store.remove_peer(&self.network, &self.record.node),
            )
            .await
        })
        .await;
        match r {
            Ok(Ok(_)) => tracing::info!("left: this node's record is removed from the store"),
            Ok(Err(e)) => tracing::warn!("leaving: {e}"),
            Err(_) => tracing::warn!("leaving: the store did not answer within {LEAVE_LIMIT:?}"),
        }
    }

    /// One session with the store: publish (unless the record stands),
    /// read the network (unless the last connection's watch resumes),
    /// then follow it and keep the node's liveness. A slow call is tried
    /// again on this session; what ends it is in [`Policy`].
    async fn session(
        &mut self,
        store: &dyn OverlayStore,
        st: &mut State,
        warned: &mut Option<Instant>,
        tls: &[Option<(u64, u64, SystemTime)>],
        policy: &mut Policy,
        resumed: bool,
    ) -> End {
        let mut stopped = self.stop.subscribe();
        while !st.revoked && !st.published {
            match self.publish(store, st).await {
                Ok(()) => self.answered(st, warned, policy),
                Err(e) => {
                    if let Err(end) = self.hold(st, policy, e, &mut stopped).await {
                        return end;
                    }
                }
            }
        }
        // A resumed watch brings what changed since the last view; without
        // one the network is read (and that read seeds the watch).
        if !resumed {
            loop {
                match bounded("reading the network", store.peers(&self.network)).await {
                    Ok(s) => {
                        self.apply(st, s);
                        self.answered(st, warned, policy);
                        break;
                    }
                    Err(e) => {
                        if let Err(end) = self.hold(st, policy, e, &mut stopped).await {
                            return end;
                        }
                    }
                }
                // Reads that stay slow must not let the lease lapse.
                if st.kept.is_none_or(|t| t.elapsed() >= REFRESH) {
                    match self.tick(store, st).await {
                        Ok(()) => self.answered(st, warned, policy),
                        Err(e) => {
                            if let Err(end) = self.hold(st, policy, e, &mut stopped).await {
                                return end;
                            }
                        }
                    }
                }
            }
        }
        // The first tick is at once: after an outage the node's liveness
        // has probably lapsed and must be restored now, not a period later.
        let every = self.tick_every();
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A watch whose read was slow waits this long before the next try.
        let mut watch_after: Option<tokio::time::Instant> = None;
        loop {
            if self.stop.is_set() {
                return End::Stopped;
            }
            // Ok(true): the store answered a call.
            let (watching, r): (bool, Result<bool, CallErr>) = tokio::select! {
                _ = stopped.changed() => return End::Stopped,
                c = self.candidates.recv() => {
                    let Some(c) = c else { return End::Stopped };
                    self.set_candidates(&c);
                    (false, if st.revoked { Ok(false) } else { self.publish(store, st).await.map(|()| true) })
                }
                _ = tick.tick() => {
                    if tls_files_stamp(&self.opts) != tls {
                        return End::Reconnect;
                    }
                    st.expiry.check(&st.certs, SystemTime::now(), Instant::now());
                    (false, self.tick(store, st).await.map(|()| true))
                }
                w = async {
                    if let Some(t) = watch_after {
                        tokio::time::sleep_until(t).await;
                    }
                    store.watch_peers(&self.network, &st.snap, Duration::from_secs(30)).await
                } => {
                    watch_after = None;
                    let r = match w {
                        Ok(Some(s)) => {
                            self.apply(st, s);
                            if std::mem::take(&mut st.revouch) {
                                self.tick(store, st).await.map(|()| true)
                            } else {
                                Ok(true)
                            }
                        }
                        // Waiting without news says nothing of the store:
                        // a connection that hangs waits just as well.
                        Ok(None) => Ok(false),
                        Err(e) => Err(CallErr::of("watching the network", &e)),
                    };
                    (true, r)
                }
            };
            match r {
                Ok(true) => self.answered(st, warned, policy),
                Ok(false) => {}
                Err(e) => match policy.failed(e.failure, Instant::now()) {
                    Next::Retry(d) => {
                        self.will_retry(st, e, d);
                        if watching {
                            watch_after = Some(tokio::time::Instant::now() + d);
                        } else {
                            // The tick publishes what did not get out.
                            tick.reset_after(d);
                        }
                    }
                    Next::Reconnect(d) => return End::Failed(e.msg, d),
                },
            }
        }
    }

    /// A call failed and is tried again in `d` on this connection: said,
    /// and the session's watched state kept.
    fn will_retry(&self, st: &mut State, e: CallErr, d: Duration) {
        tracing::debug!(
            "store {}: {e}; trying again in {d:?} on this connection",
            self.url
        );
        set_health(&self.health, |h| h.last_error = Some(e.msg));
        self.keep_watched(st);
    }

    /// The store answered: the session holds, and an outage is over.
    fn answered(&self, st: &mut State, warned: &mut Option<Instant>, policy: &mut Policy) {
        policy.answered();
        let was_down = self
            .health
            .lock()
            .map(|h| h.last_error.is_some() || h.from_cache)
            .unwrap_or(false);
        if was_down {
            tracing::info!("store {} answers again", self.url);
        }
        *warned = None;
        st.cut_off = None;
        set_health(&self.health, |h| {
            h.last_error = None;
            h.from_cache = false;
        });
    }

    /// After a failed call before the session's loop: wait to try again on
    /// this connection, or end the session.
    async fn hold(
        &self,
        st: &mut State,
        policy: &mut Policy,
        e: CallErr,
        stopped: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), End> {
        match policy.failed(e.failure, Instant::now()) {
            Next::Retry(d) => {
                self.will_retry(st, e, d);
                tokio::select! {
                    _ = tokio::time::sleep(d) => Ok(()),
                    _ = stopped.changed() => Err(End::Stopped),
                }
            }
            Next::Reconnect(d) => Err(End::Failed(e.msg, d)),
        }
    }

    fn tick_every(&self) -> Duration {
        match self.reclaim_after {
            Some(a) => (a / 4).clamp(Duration::from_secs(1), REFRESH),
            None => REFRESH,
        }
    }

    fn set_candidates(&mut self, c: &[(SocketAddr, CandidateKind)]) {
        self.record.candidates = c
            .iter()
            .map(|(a, k)| StoreCandidate {
                addr: a.to_string(),
                kind: *k,
            })
            .collect();
        self.record.endpoints = c.iter().map(|(a, _)| a.to_string()).collect();
    }

    async fn publish(&mut self, store: &dyn OverlayStore, st: &mut State) -> Result<(), CallErr> {
        self.record.stamp();
        let r = bounded(
            "publishing this node's record",
            store.publish(&self.network, &self.record, LEASE_TTL),
        )
        .await;
        st.published = r.is_ok();
        if r.is_ok() {
            st.kept = Some(Instant::now());
            set_health(&self.health, |h| {
                h.published = true;
                h.last_error = None;
                h.confirmed = Some(Instant::now());
            });
            let lease = store.lease_id();
            if lease != self.cache.lease {
                self.cache.lease = lease;
                self.save_cache();
            }
        }
        r
    }

    /// Keep-alive, then what follows from the engine's view: who vouches,
    /// which stale peers died, whom to reclaim.
    async fn tick(&mut self, store: &dyn OverlayStore, st: &mut State) -> Result<(), CallErr> {
        if st.revoked {
            return Ok(());
        }
        if !st.published {
            // A publish that got no answer in time, tried again.
            return self.publish(store, st).await;
        }
        if std::mem::take(&mut st.unsent) {
            let snap = st.snap.clone();
            self.apply(st, snap);
        }
        let status = self.engine_status().await;
        let up: Option<Vec<&str>> = status.as_ref().map(|s| {
            (s.peers.iter())
                .filter(|p| p.state == PeerState::Connected)
                .map(|p| p.node.as_str())
                .collect()
        });
        let connected = vouch_list(
            &mut st.vouch,
            up.as_deref(),
            &st.snap.records,
            Instant::now(),
        );
        let live = bounded(
            "keeping this node's liveness",
            store.refresh(&self.network, &self.record.node, &connected),
        )
        .await?;
        if live == Liveness::Alive {
            st.kept = Some(Instant::now());
            set_health(&self.health, |h| h.confirmed = Some(Instant::now()));
        }
        match live {
            Liveness::Alive => {}
            Liveness::Expired => {
                tracing::warn!("this node's liveness lapsed in the store (it was cut off); publishing again");
                self.publish(store, st).await?;
            }
            Liveness::Revoked => self.revoke(
                st,
                "this node's record was deleted from the store: the node was removed from the overlay"
                    .into(),
            ),
        }
        if let Some(s) = &status {
            self.expire_stale(st, s);
        }
        if let Some(after) = self.reclaim_after {
            self.reclaim(store, st, after, &connected).await;
        }
        Ok(())
    }

    /// A status snapshot from the engine, without blocking this thread's
    /// runtime (the engine answers within a wake-up).
    async fn engine_status(&self) -> Option<Snapshot> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.engine.send(Command::Status(tx));
        for _ in 0..200 {
            if let Ok(s) = rx.try_recv() {
                return Some(s);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    }

    /// Stale peers whose session died (none for [`STALE_GRACE`]) go.
    fn expire_stale(&mut self, st: &mut State, s: &Snapshot) {
        let now = Instant::now();
        let stale: BTreeSet<&str> = st
            .sent
            .iter()
            .filter(|p| p.stale)
            .map(|p| p.node.as_str())
            .collect();
        st.sessionless.retain(|n, _| stale.contains(n.as_str()));
        let mut gone = Vec::new();
        for p in s.peers.iter().filter(|p| stale.contains(p.node.as_str())) {
            if p.session_born.is_some() {
                st.sessionless.remove(&p.node);
                continue;
            }
            let since = *st.sessionless.entry(p.node.clone()).or_insert(now);
            if now.duration_since(since) >= STALE_GRACE {
                gone.push(p.node.clone());
            }
        }
        if gone.is_empty() {
            return;
        }
        for n in gone {
            st.sessionless.remove(&n);
            st.dropped.insert(n);
        }
        let snap = st.snap.clone();
        self.apply(st, snap);
    }

    /// Releases nodes absent for `after` (see the module docs).
    async fn reclaim(
        &mut self,
        store: &dyn OverlayStore,
        st: &mut State,
        after: Duration,
        connected: &[String],
    ) {
        let now = Instant::now();
        let me = self.record.node.clone();
        let absent: BTreeSet<String> = st
            .snap
            .nodes()
            .into_iter()
            .filter(|n| n.subnet.is_some() || n.host.is_some() || n.public_key.is_some())
            .filter(|n| n.node != me && !st.snap.alive(&n.node))
            .filter(|n| !connected.contains(&n.node))
            .map(|n| n.node)
            .collect();
        st.absent.retain(|n, _| absent.contains(n));
        for n in &absent {
            st.absent.entry(n.clone()).or_insert(now);
        }
        let due: Vec<String> = st
            .absent
            .iter()
            .filter(|(_, since)| now.duration_since(**since) >= after)
            .map(|(n, _)| n.clone())
            .collect();
        for n in due {
            let req = ReleaseRequest {
                force: false,
                reason: "reclaimAfter".into(),
                by: me.clone(),
            };
            match bounded("reclaiming", store.release_node(&self.network, &n, &req)).await {
                Ok(r) => tracing::warn!(
                    node = %n,
                    subnet = ?r.subnet.map(|s| s.to_string()),
                    host = ?r.host.map(|h| h.to_string()),
                    "reclaimed: the node was absent for {} (reclaimAfter)",
                    humantime::format_duration(after)
                ),
                Err(e) => tracing::info!(node = %n, "not reclaimed: {e}"),
            }
            st.absent.remove(&n);
        }
    }

    /// The store says this node is out of the network: no more publishing,
    /// no tunnels, until the agent is started again.
    fn revoke(&mut self, st: &mut State, why: String) {
        if st.revoked {
            return;
        }
        tracing::error!("{why}; tunnels are down until the agent is restarted");
        st.revoked = true;
        st.sent.clear();
        set_health(&self.health, |h| {
            h.revoked = true;
            h.revoked_why = Some(why);
        });
        self.engine.send(Command::Peers(Vec::new()));
    }

    /// Whether the store still gives this node the addresses it runs with;
    /// the reason when it does not.
    fn own_allocation_lost(&self, snap: &PeerSnapshot) -> Option<String> {
        let me = &self.record.node;
        let subnet = snap.alloc.subnets.get(me);
        let host = snap.alloc.hosts.get(me);
        let host_ok = match self.own.host_addr {
            None => true,
            Some(h) => host == Some(&h.addr()),
        } && self
            .own
            .host_addr6
            .is_none_or(|h| snap.alloc.hosts6.get(me) == Some(&h.addr()));
        if subnet == Some(&self.own.pod_subnet) && host_ok {
            return None;
        }
        let what = match snap.released.get(me) {
            Some(r) => format!("were released ({}, by {}, at {})", r.reason, r.by, r.time),
            None => format!(
                "are no longer this node's in the store (it holds {} / {})",
                subnet.map_or("no subnet".to_string(), |s| s.to_string()),
                host.map_or("no host address".to_string(), |h| h.to_string())
            ),
        };
        Some(format!(
            "this node's allocations (subnet {}, host address {}) {what}: another node may hold \
             them now, so this node stops using them; restart the agent (and config-gen) to get \
             a fresh allocation",
            self.own.pod_subnet,
            self.own
                .host_addr
                .map_or("none".to_string(), |h| h.to_string()),
        ))
    }

    /// Takes a new view of the network: the believed peers, stale where
    /// their liveness lapsed, go to the engine if they changed.
    fn apply(&mut self, st: &mut State, snap: PeerSnapshot) {
        if !st.revoked {
            if let Some(why) = self.own_allocation_lost(&snap) {
                self.revoke(st, why);
            }
        }
        let me = self.record.node.clone();
        let believed = believed(&snap);
        let recorded = |n: &str| snap.records.iter().any(|r| r.node == n);
        if st.vouch.keys().any(|n| !recorded(n)) {
            st.revouch = true;
        }
        // A peer that is live again may be dropped no longer.
        st.dropped.retain(|n| !snap.live.contains_key(n));
        // Stale for the engine (no new session from us): not live in the
        // store and vouched for by no one else. Our own tunnel to it counts
        // for nothing here: it is what staleness is about.
        let engine_stale = |n: &str| !snap.live.contains_key(n) && !snap.vouched_by_others(n, &me);
        let mut ignored = Vec::new();
        let mut peers: Vec<PeerInfo> = Vec::new();
        for r in snap.records.iter().filter(|r| r.node != me) {
            if let Some(why) = not_allocated(&snap, r) {
                ignored.push((r.node.clone(), why));
            } else if st.dropped.contains(&r.node) {
                let why = "stale: its liveness lapsed and its tunnel died; taken back when it is live again";
                ignored.push((r.node.clone(), why.to_string()));
            } else {
                match check_record(r, engine_stale(&r.node)) {
                    Ok(p) => peers.push(p),
                    Err(why) => ignored.push((r.node.clone(), why)),
                }
            }
        }
        let records: Vec<PeerRecord> = believed
            .iter()
            .filter(|r| r.node != me)
            .map(|r| (*r).clone())
            .collect();
        // Stale for `peers`: its liveness lapsed in the store.
        let stale: BTreeSet<String> = peers
            .iter()
            .filter(|p| !snap.live.contains_key(&p.node))
            .map(|p| p.node.clone())
            .collect();
        // Records that claim one key are refused by the engine, all of them.
        let shared = shared_keys(&peers);
        if shared != st.shared {
            for (key, nodes) in &shared {
                tracing::warn!(
                    key = %b64(key),
                    nodes = ?nodes,
                    "peer records claim one public key: none of them is believed until all but one are gone"
                );
            }
            st.shared = shared;
        }
        ignored.extend(self.refused_by_engine(&peers, &st.shared));
        ignored.sort();
        self.tell_changes(st, &peers, &ignored);
        let kinds = (records.iter().flat_map(|r| &r.candidates))
            .filter_map(|c| Some((c.addr.parse().ok()?, c.kind)))
            .collect();
        set_health(&self.health, |h| {
            h.peers_seen = peers.len();
            h.stale = stale;
            h.ignored = ignored;
            h.peer_kinds = kinds;
        });
        if !st.revoked && peers != st.sent {
            // Not queued (the engine is behind): the next tick tries again.
            st.unsent = !self.engine.send(Command::Peers(peers.clone()));
            if !st.unsent {
                st.sent = peers;
            }
        }
        if !st.woke && !st.revoked && !st.unsent {
            // A restart: the peers that vouch for this node had a tunnel
            // with its previous instance and may still send on it.
            st.woke = true;
            let vouching: Vec<String> = (snap.live.iter())
                .filter(|(n, a)| **n != me && a.connected.contains(&me))
                .map(|(n, _)| n.clone())
                .collect();
            if !vouching.is_empty() {
                tracing::info!(
                    peers = vouching.len(),
                    "handshaking at once with the peers that had a tunnel to this node"
                );
                self.engine.send(Command::Wake(vouching));
            }
        }
        let changed = records != self.cache.peers;
        if changed && !st.revoked {
            self.cache.peers = records;
            self.save_cache();
        }
        st.snap = snap;
        if changed {
            // The snapshot's copies of every record are gone.
            crate::heap::trim();
        }
    }

    /// Records the engine refuses although they parse: this node's own key
    /// under another name, a key no session can be made with, a key that
    /// several records claim.
    fn refused_by_engine(
        &self,
        peers: &[PeerInfo],
        shared: &[(Key, Vec<String>)],
    ) -> Vec<(String, String)> {
        let own = parse_key(&self.record.public_key);
        let mut out = Vec::new();
        for p in peers {
            if Some(p.key) == own {
                out.push((
                    p.node.clone(),
                    "it claims this node's public key".to_string(),
                ));
            } else if evio_overlay::crypto::low_order(&p.key) {
                out.push((
                    p.node.clone(),
                    "its publicKey is a low-order point".to_string(),
                ));
            }
        }
        for (_, nodes) in shared {
            for n in nodes {
                let others: Vec<&str> = (nodes.iter().map(String::as_str))
                    .filter(|o| o != n)
                    .collect();
                let why = format!("its public key is also claimed by {}", others.join(", "));
                out.push((n.clone(), why));
            }
        }
        out
    }

    /// Logs, rate-limited per node, how the peer set changed and why:
    /// peers added or removed, keys changed, liveness lapsed or back,
    /// records ignored.
    fn tell_changes(&self, st: &mut State, peers: &[PeerInfo], ignored: &[(String, String)]) {
        let now = Instant::now();
        let why_ignored = |n: &str| {
            ignored
                .iter()
                .find(|(i, _)| i == n)
                .map(|(_, w)| w.as_str())
        };
        for (node, why) in ignored {
            if !st.told_ignored.iter().any(|(n, w)| n == node && w == why)
                && st.limiter.allow(now, node, "ignored").is_some()
            {
                tracing::warn!(peer = %node, reason = %why, "peer record ignored");
            }
        }
        let mut told = HashMap::new();
        for p in peers {
            let was = st.told.get(&p.node).copied();
            let why = match was {
                None if st.told_ignored.iter().any(|(n, _)| *n == p.node) => {
                    Some(("peer added", "its record is believed again".to_string()))
                }
                None => Some(("peer added", "new record".to_string())),
                Some((key, _)) if key != p.key => Some((
                    "peer key changed",
                    "its record names a new public key: the tunnel starts over".to_string(),
                )),
                Some((_, false)) if p.stale => Some((
                    "peer stale",
                    "its liveness lapsed in the store (lease expired): kept while its tunnel works"
                        .to_string(),
                )),
                Some((_, true)) if !p.stale => {
                    Some(("peer live", "its liveness is back".to_string()))
                }
                Some(_) => None,
            };
            if let Some((what, why)) = why {
                if st.limiter.allow(now, &p.node, what).is_some() {
                    tracing::info!(peer = %p.node, reason = %why, "{what}");
                }
            }
            told.insert(p.node.clone(), (p.key, p.stale));
        }
        for node in st.told.keys().filter(|n| !told.contains_key(*n)) {
            let why = match why_ignored(node) {
                Some(w) => format!("record ignored: {w}"),
                None => {
                    "record gone: deleted from the store (the node left or was released)".into()
                }
            };
            if st.limiter.allow(now, node, "peer removed").is_some() {
                tracing::info!(peer = %node, reason = %why, "peer removed");
            }
        }
        st.told = told;
        st.told_ignored = ignored.to_vec();
    }

    fn save_cache(&self) {
        if let Err(e) = crate::cache::save(&self.cache_path, &self.cache) {
            tracing::warn!("state cache {}: {e}", self.cache_path.display());
        }
    }
}

/// Whom this node vouches for in its liveness record (`connected`: "a
/// working tunnel to it", which keeps a node cut off from the store from
/// being reclaimed): the peers connected now, and those seen connected
/// within [`VOUCH_HOLD`]; an idle peer without that is not vouched for
/// (nothing says it is alive). A node whose record is gone (it left, or
/// was released) is dropped at once. Without an engine answer the list
/// stands as it was.
fn vouch_list(
    vouch: &mut HashMap<String, Instant>,
    connected: Option<&[&str]>,
    records: &[PeerRecord],
    now: Instant,
) -> Vec<String> {
    for n in connected.unwrap_or_default() {
        vouch.insert(n.to_string(), now);
    }
    vouch.retain(|n, seen| {
        records.iter().any(|r| &r.node == n) && now.saturating_duration_since(*seen) < VOUCH_HOLD
    });
    let mut v: Vec<String> = vouch.keys().cloned().collect();
    v.sort();
    v
}

/// The `k` of `nodes` that watch node `me`: the highest hashes of the
/// pair (rendezvous hashing), so every node picks others and a cluster's
/// watching spreads evenly; the same set on every call.
fn watchers<'a>(me: &str, nodes: impl Iterator<Item = &'a String>, k: usize) -> Vec<String> {
    use std::hash::{Hash, Hasher};
    let score = |n: &str| {
        // Fixed keys: the same choice in every run and on every node.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (me, n).hash(&mut h);
        h.finish()
    };
    let mut v: Vec<(u64, &String)> = nodes.map(|n| (score(n), n)).collect();
    v.sort_unstable_by(|a, b| b.cmp(a));
    v.into_iter().take(k).map(|(_, n)| n.clone()).collect()
}

/// The peers of a cache as the engine takes them: not stale (the cache
/// does not know, and a node starting from it must reach its peers).
pub fn cached_peers(c: &Cache) -> Vec<PeerInfo> {
    c.peers
        .iter()
        .filter_map(|r| peer_info(r, &c.node, false))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A certificate rotated the usual ways (rewritten, or a new file moved
    /// over it) changes the stamp; nothing configured never does.
    #[test]
    fn tls_file_stamps_change_with_a_rotation() {
        let d = tempfile::tempdir().unwrap();
        let (cert, key) = (d.path().join("c.crt"), d.path().join("c.key"));
        std::fs::write(&cert, "old cert").unwrap();
        std::fs::write(&key, "old key").unwrap();
        let mut opts = StoreOptions::default();
        assert_eq!(tls_files_stamp(&opts), [None, None, None]);
        opts.etcd.cert_file = Some(cert.clone());
        opts.etcd.key_file = Some(key.clone());
        let before = tls_files_stamp(&opts);
        assert!(before[1].is_some() && before[2].is_some());
        assert_eq!(tls_files_stamp(&opts), before);
        let next = d.path().join("next.key");
        std::fs::write(&next, "new key").unwrap();
        std::fs::rename(&next, &key).unwrap();
        let moved = tls_files_stamp(&opts);
        assert_ne!(moved, before, "a file moved over the key");
        std::fs::write(&cert, "a new certificate").unwrap();
        assert_ne!(tls_files_stamp(&opts), moved, "a rewritten certificate");
        std::fs::remove_file(&cert).unwrap();
        assert_eq!(tls_files_stamp(&opts)[1], None);
    }

    /// A cut-off node's watchers: three, stable, not itself, spread over
    /// the cluster (every node is somebody's watcher, none of many).
    #[test]
    fn watchers_are_few_stable_and_spread() {
        let nodes: Vec<String> = (0..64).map(|i| format!("node-{i}")).collect();
        let pick = |me: &str| watchers(me, nodes.iter().filter(|n| n.as_str() != me), 3);
        let w = pick("node-0");
        assert_eq!(w.len(), 3);
        assert!(!w.contains(&"node-0".to_string()));
        assert_eq!(w, pick("node-0"));
        let mut load: HashMap<String, usize> = HashMap::new();
        for me in &nodes {
            for n in pick(me) {
                *load.entry(n).or_default() += 1;
            }
        }
        let most = load.values().max().copied().unwrap_or(0);
        assert!(most <= 12, "one node watches {most} of 64");
        assert!(watchers("a", std::iter::empty(), 3).is_empty());
    }

    /// The vouch list holds a peer for a while after its session lapsed
    /// (it follows traffic episodes, not sessions), drops it when that
    /// passed, and drops a node whose record went at once.
    #[test]
    fn the_vouch_list_holds_through_idle_spells_and_drops_a_gone_node_at_once() {
        let rec = |n: &str| -> PeerRecord {
            serde_json::from_value(serde_json::json!({
                "node": n, "publicKey": "", "podSubnet": "", "heartbeat": ""}))
            .unwrap()
        };
        let records = vec![rec("a"), rec("b"), rec("c")];
        let mut vouch = HashMap::new();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let l = vouch_list(&mut vouch, Some(&["a", "b"]), &records, at(0));
        assert_eq!(l, ["a", "b"]);
        // b's session lapsed (idle), the engine did not answer once: held.
        assert_eq!(
            vouch_list(&mut vouch, Some(&["a"]), &records, at(200)),
            ["a", "b"]
        );
        assert_eq!(vouch_list(&mut vouch, None, &records, at(210)), ["a", "b"]);
        // Idle for longer than the hold: no longer vouched for.
        assert_eq!(
            vouch_list(&mut vouch, Some(&["a"]), &records, at(301)),
            ["a"]
        );
        // a left: its record is gone, and so is the vouch, connected or not.
        let left = vec![rec("b"), rec("c")];
        assert!(vouch_list(&mut vouch, Some(&["a"]), &left, at(302)).is_empty());
    }

    /// Issue 25: a dual-stack node's IPv6 host address (`hostAddresses`)
    /// reaches the engine only where the store allocated it to that node
    /// (`hostnodes6/`), as its `hostAddress` does; an older record (no
    /// `hostAddresses`) is believed as before.
    #[test]
    fn a_records_ipv6_host_address_is_believed_only_where_allocated() {
        let rec = |host: &str, all: &[&str]| -> PeerRecord {
            serde_json::from_value(serde_json::json!({
                "node": "a", "publicKey": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
                "podSubnet": "10.244.1.0/24", "heartbeat": "",
                "hostAddress": host, "hostAddresses": all}))
            .unwrap()
        };
        let mut snap = PeerSnapshot::default();
        snap.alloc
            .subnets
            .insert("a".into(), "10.244.1.0/24".parse().unwrap());
        snap.alloc
            .hosts
            .insert("a".into(), "10.10.0.1".parse().unwrap());
        let dual = rec("10.10.0.1/16", &["10.10.0.1/16", "fd00:10::1/64"]);
        let old = rec("10.10.0.1/16", &[]);
        snap.records = vec![old.clone()];
        assert_eq!(believed(&snap).len(), 1, "an older record");
        let info = check_record(&old, false).unwrap();
        assert_eq!(info.host_addr6, None);
        // Claimed without the allocation: not believed.
        snap.records = vec![dual.clone()];
        assert!(believed(&snap).is_empty());
        snap.alloc
            .hosts6
            .insert("a".into(), "fd00:10::2".parse().unwrap());
        assert!(believed(&snap).is_empty(), "another node's address");
        snap.alloc
            .hosts6
            .insert("a".into(), "fd00:10::1".parse().unwrap());
        assert_eq!(believed(&snap).len(), 1);
        let info = check_record(&dual, false).unwrap();
        assert_eq!(info.host_addr, Some("10.10.0.1/16".parse().unwrap()));
        assert_eq!(info.host_addr6, Some("fd00:10::1/64".parse().unwrap()));
        // An IPv6-only node's one address is its hostAddress.
        let v6 = rec("fd00:10::3/64", &[]);
        let info = check_record(&v6, false).unwrap();
        assert_eq!(info.host_addr, Some("fd00:10::3/64".parse().unwrap()));
        assert_eq!(info.host_addr6, None);
    }

    #[test]
    fn candidate_kinds_and_classes_map_both_ways() {
        for (kind, class) in [
            (CandidateKind::Local, Rank::Local),
            (CandidateKind::Reflexive, Rank::Direct),
            (CandidateKind::Relay, Rank::Relay),
        ] {
            assert_eq!(class_of(kind), Some(class));
            assert_eq!(kind_of(class), kind);
        }
        assert_eq!(class_of(CandidateKind::Mapped), Some(Rank::Direct));
        assert_eq!(class_of(CandidateKind::Unknown), None);
    }

    /// A newer agent's record: its mapped candidate is probed as a direct
    /// one, a kind unknown to us is not probed at all (not even through
    /// the flat `endpoints` list), and `peers` says which kind a path
    /// goes to.
    #[test]
    fn mapped_and_unknown_kinds_in_a_record() {
        let j = serde_json::json!({
            "node": "n1", "publicKey": b64(&[7u8; 32]), "podSubnet": "10.244.1.0/24",
            "endpoints": ["203.0.113.10:5800", "203.0.113.10:5801"],
            "candidates": [{"addr": "203.0.113.10:5800", "kind": "mapped"},
                           {"addr": "203.0.113.10:5801", "kind": "wormhole"}],
            "heartbeat": "2026-01-01T00:00:00Z"});
        let rec: PeerRecord = serde_json::from_value(j).unwrap();
        let p = check_record(&rec, false).unwrap();
        let addr: SocketAddr = "203.0.113.10:5800".parse().unwrap();
        assert_eq!(
            p.candidates,
            [PeerCandidate {
                addr,
                class: Rank::Direct
            }]
        );
        let mut only_unknown = rec.clone();
        only_unknown.candidates.remove(0);
        assert!(check_record(&only_unknown, false)
            .unwrap()
            .candidates
            .is_empty());
        let h = StoreHealth {
            peer_kinds: [(addr, CandidateKind::Mapped)].into_iter().collect(),
            ..StoreHealth::default()
        };
        let direct = |remote| evio_overlay::path::PathAddr {
            remote,
            via: evio_overlay::path::Via::Direct,
        };
        assert_eq!(h.path_candidate(direct(addr)), "mapped");
        use evio_overlay::path::Method;
        for m in [Method::Reflexive, Method::Learned] {
            assert_eq!(h.path_method(Some(m), Some(direct(addr))), Some("mapped"));
        }
        assert_eq!(
            h.path_method(Some(Method::Punched), Some(direct(addr))),
            Some("punched")
        );
        let elsewhere = direct("198.51.100.9:4000".parse().unwrap());
        assert_eq!(
            h.path_method(Some(Method::Reflexive), Some(elsewhere)),
            Some("reflexive")
        );
        assert_eq!(h.path_method(None, Some(elsewhere)), None);
        assert_eq!(
            h.path_candidate(direct("198.51.100.9:4000".parse().unwrap())),
            "peer-reflexive"
        );
        let relayed = evio_overlay::path::PathAddr {
            remote: addr,
            via: evio_overlay::path::Via::Turn(0),
        };
        assert_eq!(h.path_candidate(relayed), "relay");
    }
}
