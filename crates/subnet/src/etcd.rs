use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, KeyValue,
    TlsOptions, Txn, TxnOp, TxnOpResponse, TxnResponse,
};
use ipnet::IpNet;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::store::existing;
use crate::{
    parse_subnet_key, subnet_key, validate_name, Allocation, Lease, OwnerRecord, PodNetwork,
    SubnetError, SubnetStore, UsedSet,
};

/// Conflicts are only possible when another node won the same slot since
/// our last read, so each retry means progress elsewhere; this bound is far
/// above what 32-way contention needs and only stops pathological loops.
const MAX_ATTEMPTS: u32 = 64;

/// Connection settings for an `etcd://` store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdOptions {
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Files rather than values, so secrets come from mounted Secrets and
    /// never show up in `ps` or the ConfigMap.
    pub username_file: Option<PathBuf>,
    pub password_file: Option<PathBuf>,
    /// Send the password even without TLS, where anyone on the path reads
    /// it (config key `etcdAllowPlaintextPassword`). Off: a password
    /// without TLS is refused before any file is read.
    pub allow_plaintext_password: bool,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions {
            ca_file: None,
            cert_file: None,
            key_file: None,
            username_file: None,
            password_file: None,
            allow_plaintext_password: false,
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(5),
        }
    }
}

impl EtcdOptions {
    pub fn uses_tls(&self) -> bool {
        self.ca_file.is_some() || self.cert_file.is_some() || self.key_file.is_some()
    }
}

/// The cluster store: keys under `/evio/<network>/` in etcd v3.
pub struct EtcdStore {
    pub(crate) client: Client,
    pub(crate) endpoints: String,
    pub(crate) timeout: Duration,
    trips: AtomicU64,
    /// The lease this process's overlay record hangs on (peers_etcd).
    pub(crate) lease: std::sync::Mutex<Option<i64>>,
    /// The overlay's one watch and what it keeps current (peers_etcd).
    pub(crate) watching: tokio::sync::Mutex<Option<crate::peers_etcd::Watching>>,
}

/// A secret kept in a file (a mounted Secret): its content without the
/// trailing newline such files usually end in; an empty one is an error.
pub fn read_secret(what: &str, path: &Path) -> Result<String, SubnetError> {
    let s = std::fs::read_to_string(path).map_err(|e| {
        SubnetError::Credentials(format!("cannot read {what} file {}: {e}", path.display()))
    })?;
    // Secrets mounted from files usually end in a newline that is not part
    // of the value.
    let v = s.trim_end_matches(['\n', '\r']).to_string();
    if v.is_empty() {
        return Err(SubnetError::Credentials(format!(
            "{what} file {} is empty",
            path.display()
        )));
    }
    Ok(v)
}

fn read_pem(what: &str, path: &Path) -> Result<Vec<u8>, SubnetError> {
    std::fs::read(path).map_err(|e| {
        SubnetError::Credentials(format!("cannot read {what} {}: {e}", path.display()))
    })
}

/// The error in a few words plus its root cause, on one line: tonic's
/// errors say "transport error" at the top, keep the useful part
/// ("Connection refused", a certificate problem) at the bottom of the
/// source chain, and embed Debug dumps in between.
pub(crate) fn chain(e: &etcd_client::Error) -> String {
    use std::error::Error as _;
    let top = match e {
        etcd_client::Error::GRpcStatus(s) => {
            let m = s.message();
            if m.is_empty() {
                format!("{:?}", s.code())
            } else {
                format!("{:?}: {m}", s.code())
            }
        }
        other => other.to_string(),
    };
    let mut root: Option<&(dyn std::error::Error + 'static)> = match e {
        etcd_client::Error::GRpcStatus(s) => s.source(),
        etcd_client::Error::TransportError(t) => t.source(),
        other => other.source(),
    };
    while let Some(next) = root.and_then(|r| r.source()) {
        root = Some(next);
    }
    let mut s = match root.map(|r| r.to_string()) {
        Some(r) if !top.contains(&r) => format!("{top}: {r}"),
        _ => top,
    };
    s = s.replace('\n', " ");
    s
}

/// Whether trying again (possibly on another member) can help.
fn retryable(e: &etcd_client::Error) -> bool {
    use etcd_client::Error as E;
    match e {
        E::TransportError(_) | E::IoError(_) => true,
        // gRPC status numbers (tonic is not a direct dependency): CANCELLED 1,
        // UNKNOWN 2, DEADLINE_EXCEEDED 4, ABORTED 10, INTERNAL 13,
        // UNAVAILABLE 14. etcd answers "no leader" and "request timed out"
        // with UNAVAILABLE; transport failures mid-call surface as UNKNOWN.
        E::GRpcStatus(s) => matches!(s.code() as i32, 1 | 2 | 4 | 10 | 13 | 14),
        _ => false,
    }
}

/// A request the client's own per-request timeout cut short (tonic says
/// CANCELLED "Timeout expired") or the server's DEADLINE_EXCEEDED: slow,
/// not broken.
fn timed_out_status(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if matches!(s.code() as i32, 1 | 4))
}

fn get_kvs(resp: &TxnOpResponse) -> &[KeyValue] {
    match resp {
        TxnOpResponse::Get(g) => g.kvs(),
        _ => &[],
    }
}

/// Runs `attempt` until it succeeds, fails for good, or `deadline` passes,
/// pausing between transient failures with jittered exponential backoff
/// (the jitter spreads the retries of nodes that failed together). Used
/// for connecting and for every request: one retry policy for the store.
/// `budget` is what the caller was given, for the message.
async fn retry<T, F, Fut>(
    endpoints: &str,
    deadline: Instant,
    budget: Duration,
    timed_out: &str,
    mut attempt: F,
) -> Result<T, SubnetError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, etcd_client::Error>>,
{
    let mut pause = Duration::from_millis(25);
    let mut last = String::new();
    let mut slow = true;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        last = match tokio::time::timeout(remaining, attempt()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) if retryable(&e) => {
                slow &= timed_out_status(&e);
                chain(&e)
            }
            Ok(Err(e)) => {
                return Err(SubnetError::Etcd {
                    endpoints: endpoints.to_string(),
                    message: chain(&e),
                })
            }
            // An attempt cut short by the deadline says less than the
            // error before it ("connection refused").
            Err(_) if !last.is_empty() => last,
            Err(_) => timed_out.to_string(),
        };
        // Use the whole budget: the last attempt may be the one that finds
        // a member back.
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(SubnetError::Unreachable {
                store: format!("etcd://{endpoints}"),
                after: budget,
                last,
                slow,
            });
        }
        let jitter =
            Duration::from_millis(rand::thread_rng().gen_range(0..=pause.as_millis() as u64 / 2));
        tokio::time::sleep((pause + jitter).min(remaining)).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

impl EtcdStore {
    /// Builds the client for `endpoints` (`host:port`). With credentials this
    /// authenticates right away, retrying with backoff until `timeout`.
    pub async fn connect(
        endpoints: &[String],
        opts: &EtcdOptions,
        timeout: Duration,
    ) -> Result<EtcdStore, SubnetError> {
        let desc = endpoints.join(",");
        let tls = opts.uses_tls();
        if opts.password_file.is_some() && !tls && !opts.allow_plaintext_password {
            return Err(SubnetError::Credentials(format!(
                "refusing to send the etcd password to {desc} in clear text: configure TLS \
                 (etcdCACert) or, on a network you trust, set etcdAllowPlaintextPassword"
            )));
        }
        let mut co = ConnectOptions::new()
            .with_connect_timeout(opts.connect_timeout.min(timeout))
            .with_timeout(opts.request_timeout.min(timeout))
            // A member cut off from the others answers "no leader" at once
            // instead of hanging, so the retry can reach a healthy one.
            .with_require_leader(true)
            .with_auto_token_refresh(true);
        match (&opts.username_file, &opts.password_file) {
            (Some(u), Some(p)) => {
                co = co.with_user(read_secret("username", u)?, read_secret("password", p)?);
            }
            (None, None) => {}
            _ => {
                return Err(SubnetError::Credentials(
                    "username file and password file must be given together".into(),
                ))
            }
        }
        if tls {
            let mut t = TlsOptions::new();
            match &opts.ca_file {
                Some(ca) => t = t.ca_certificate(Certificate::from_pem(read_pem("CA file", ca)?)),
                None => {
                    return Err(SubnetError::Credentials(
                        "TLS to etcd needs a CA file (--etcd-ca) to verify the server".into(),
                    ))
                }
            }
            match (&opts.cert_file, &opts.key_file) {
                (Some(c), Some(k)) => {
                    t = t.identity(Identity::from_pem(
                        read_pem("client certificate", c)?,
                        read_pem("client key", k)?,
                    ))
                }
                (None, None) => {}
                _ => {
                    return Err(SubnetError::Credentials(
                        "client certificate and key must be given together".into(),
                    ))
                }
            }
            co = co.with_tls(t);
        }
        let scheme = if tls { "https" } else { "http" };
        let urls: Vec<String> = endpoints
            .iter()
            .map(|e| format!("{scheme}://{e}"))
            .collect();
        let deadline = Instant::now() + timeout;
        let client = retry(&desc, deadline, timeout, "connect timed out", || {
            Client::connect(&urls, Some(co.clone()))
        })
        .await?;
        Ok(EtcdStore {
            client,
            endpoints: desc,
            timeout,
            trips: AtomicU64::new(0),
            lease: std::sync::Mutex::new(None),
            watching: tokio::sync::Mutex::new(None),
        })
    }

    /// Runs one request, retrying transient failures with jittered
    /// exponential backoff until `deadline`.
    pub(crate) async fn call<T, F, Fut>(
        &self,
        deadline: Instant,
        mut f: F,
    ) -> Result<T, SubnetError>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        retry(
            &self.endpoints,
            deadline,
            self.timeout,
            "request timed out",
            || {
                self.trips.fetch_add(1, Ordering::Relaxed);
                f(self.client.clone())
            },
        )
        .await
    }

    pub(crate) async fn txn(
        &self,
        deadline: Instant,
        txn: Txn,
    ) -> Result<TxnResponse, SubnetError> {
        self.call(deadline, |mut c| {
            let t = txn.clone();
            async move { c.txn(t).await }
        })
        .await
    }

    fn corrupt(&self, key: &str, reason: String) -> SubnetError {
        SubnetError::Corrupt {
            location: format!("etcd://{} key {key}", self.endpoints),
            reason,
        }
    }

    fn parse_node_value(&self, kv: &KeyValue) -> Result<IpNet, SubnetError> {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        let v = kv
            .value_str()
            .map_err(|_| self.corrupt(&key, "value is not UTF-8".into()))?;
        v.parse()
            .map_err(|_| self.corrupt(&key, format!("{v:?} is not a CIDR")))
    }

    /// Subnets named by the keys of a `subnets/` prefix read.
    fn subnets_of(kvs: &[KeyValue], prefix: &str) -> Vec<IpNet> {
        kvs.iter()
            .filter_map(|kv| {
                let k = std::str::from_utf8(kv.key()).ok()?;
                parse_subnet_key(k.strip_prefix(prefix)?)
            })
            .collect()
    }

    /// The node key survived but its subnet key did not (deleted by hand, a
    /// partial restore). Without the subnet key the slot looks free to every
    /// other node, so it is recreated before the subnet is handed out again.
    async fn repair_subnet_key(
        &self,
        deadline: Instant,
        k: &Keys,
        node: &str,
        subnet: &IpNet,
        node_rev: i64,
    ) -> Result<(), SubnetError> {
        let skey = format!("{}{}", k.subnets, subnet_key(subnet));
        let record = serde_json::to_string(&OwnerRecord::now(node, subnet))
            .map_err(|e| self.corrupt(&skey, e.to_string()))?;
        let r = self
            .txn(
                deadline,
                Txn::new()
                    .when(vec![
                        Compare::create_revision(skey.clone(), CompareOp::Equal, 0),
                        Compare::mod_revision(k.node.clone(), CompareOp::Equal, node_rev),
                    ])
                    .and_then(vec![TxnOp::put(skey.clone(), record, None)])
                    .or_else(vec![TxnOp::get(skey.clone(), None)]),
            )
            .await?;
        if r.succeeded() {
            return Ok(());
        }
        let ops = r.op_responses();
        let owner = ops
            .first()
            .and_then(|o| get_kvs(o).first())
            .map(|kv| serde_json::from_slice::<OwnerRecord>(kv.value()).map(|r| r.node));
        match owner {
            // A concurrent run for the same node repaired it first.
            Some(Ok(o)) if o == node => Ok(()),
            Some(Ok(o)) => Err(self.corrupt(
                &skey,
                format!("node {node:?} records {subnet} but the subnet is owned by {o:?}"),
            )),
            Some(Err(e)) => Err(self.corrupt(&skey, format!("owner record: {e}"))),
            None => Err(self.corrupt(
                &k.node,
                "changed while its subnet key was being repaired; run again".into(),
            )),
        }
    }

    /// Subnet keys whose owner record names `node`, with their revisions.
    async fn owned_by(
        &self,
        deadline: Instant,
        prefix: &str,
        node: &str,
    ) -> Result<Vec<(String, i64, IpNet)>, SubnetError> {
        let resp = self
            .call(deadline, |mut c| {
                let p = prefix.to_string();
                async move { c.get(p, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        Ok(resp
            .kvs()
            .iter()
            .filter_map(|kv| {
                let key = std::str::from_utf8(kv.key()).ok()?;
                let subnet = parse_subnet_key(key.strip_prefix(prefix)?)?;
                let rec: OwnerRecord = serde_json::from_slice(kv.value()).ok()?;
                (rec.node == node).then(|| (key.to_string(), kv.mod_revision(), subnet))
            })
            .collect())
    }

    /// Ensures the client can talk to the cluster (one round trip).
    pub async fn ping(&self) -> Result<(), SubnetError> {
        let deadline = Instant::now() + self.timeout;
        self.call(deadline, |mut c| async move {
            c.get(
                "/evio/",
                Some(GetOptions::new().with_keys_only().with_limit(1)),
            )
            .await
        })
        .await
        .map(|_| ())
    }
}

struct Keys {
    node: String,
    subnets: String,
}

fn keys(network: &str, node: &str) -> Keys {
    Keys {
        node: format!("/evio/{network}/nodes/{node}"),
        subnets: format!("/evio/{network}/subnets/"),
    }
}

#[async_trait]
impl SubnetStore for EtcdStore {
    async fn allocate(
        &self,
        network: &str,
        node: &str,
        pod: &PodNetwork,
    ) -> Result<Allocation, SubnetError> {
        validate_name("network name", network)?;
        validate_name("node name", node)?;
        let deadline = Instant::now() + self.timeout;
        let k = keys(network, node);
        // The node's own key and every taken slot, in one round trip; the
        // same pair of reads is the else-branch of the create below, so a
        // lost race also costs a single round trip.
        let snapshot = || {
            vec![
                TxnOp::get(k.node.clone(), None),
                TxnOp::get(
                    k.subnets.clone(),
                    Some(GetOptions::new().with_prefix().with_keys_only()),
                ),
            ]
        };
        let mut resp = self.txn(deadline, Txn::new().and_then(snapshot())).await?;
        let mut rng = StdRng::from_entropy();
        for attempt in 0..=MAX_ATTEMPTS {
            let ops = resp.op_responses();
            let (Some(node_r), Some(subnets_r)) = (ops.first(), ops.get(1)) else {
                return Err(self.corrupt(&k.node, "short transaction response".into()));
            };
            if let Some(kv) = get_kvs(node_r).first() {
                let subnet = self.parse_node_value(kv)?;
                let ns = existing(pod, node, subnet)?;
                if !Self::subnets_of(get_kvs(subnets_r), &k.subnets).contains(&subnet) {
                    self.repair_subnet_key(deadline, &k, node, &subnet, kv.mod_revision())
                        .await?;
                }
                return Ok(Allocation {
                    subnet: ns,
                    existing: true,
                });
            }
            if attempt == MAX_ATTEMPTS {
                break;
            }
            let used =
                UsedSet::from_subnets(*pod, Self::subnets_of(get_kvs(subnets_r), &k.subnets));
            let index = used.pick(&mut rng).ok_or_else(|| SubnetError::Exhausted {
                network: network.to_string(),
                cidr: pod.cidr(),
                capacity: pod.capacity(),
            })?;
            let ns = pod.node(index)?;
            let skey = format!("{}{}", k.subnets, subnet_key(&ns.subnet));
            let record = serde_json::to_string(&OwnerRecord::now(node, &ns.subnet))
                .map_err(|e| self.corrupt(&skey, e.to_string()))?;
            let create = Txn::new()
                .when(vec![
                    Compare::create_revision(k.node.clone(), CompareOp::Equal, 0),
                    Compare::create_revision(skey.clone(), CompareOp::Equal, 0),
                ])
                .and_then(vec![
                    TxnOp::put(k.node.clone(), ns.subnet.to_string(), None),
                    TxnOp::put(skey, record, None),
                ])
                .or_else(snapshot());
            resp = self.txn(deadline, create).await?;
            if resp.succeeded() {
                return Ok(Allocation {
                    subnet: ns,
                    existing: false,
                });
            }
        }
        Err(SubnetError::TooManyConflicts {
            node: node.to_string(),
            attempts: MAX_ATTEMPTS,
        })
    }

    async fn lookup(&self, network: &str, node: &str) -> Result<Option<IpNet>, SubnetError> {
        validate_name("network name", network)?;
        validate_name("node name", node)?;
        let deadline = Instant::now() + self.timeout;
        let k = keys(network, node);
        let resp = self
            .call(deadline, |mut c| {
                let key = k.node.clone();
                async move { c.get(key, None).await }
            })
            .await?;
        resp.kvs()
            .first()
            .map(|kv| self.parse_node_value(kv))
            .transpose()
    }

    async fn list(&self, network: &str) -> Result<Vec<Lease>, SubnetError> {
        validate_name("network name", network)?;
        let deadline = Instant::now() + self.timeout;
        let prefix = format!("/evio/{network}/subnets/");
        let resp = self
            .call(deadline, |mut c| {
                let p = prefix.clone();
                async move { c.get(p, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        let mut out = Vec::new();
        for kv in resp.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let Some(subnet) = key.strip_prefix(&prefix).and_then(parse_subnet_key) else {
                continue;
            };
            let record: OwnerRecord = serde_json::from_slice(kv.value())
                .map_err(|e| self.corrupt(&key, format!("owner record: {e}")))?;
            out.push(Lease { subnet, record });
        }
        out.sort_by_key(|l| (l.subnet.network(), l.subnet.prefix_len()));
        Ok(out)
    }

    async fn release(&self, network: &str, node: &str) -> Result<IpNet, SubnetError> {
        validate_name("network name", network)?;
        validate_name("node name", node)?;
        let deadline = Instant::now() + self.timeout;
        let k = keys(network, node);
        for _ in 0..MAX_ATTEMPTS {
            let resp = self
                .call(deadline, |mut c| {
                    let key = k.node.clone();
                    async move { c.get(key, None).await }
                })
                .await?;
            let Some(kv) = resp.kvs().first() else {
                // No node key, but maybe subnet keys still naming the node
                // (a partial delete): free those so their slots come back.
                let orphans = self.owned_by(deadline, &k.subnets, node).await?;
                let Some(first) = orphans.first().map(|o| o.2) else {
                    return Err(SubnetError::NotFound {
                        network: network.to_string(),
                        node: node.to_string(),
                    });
                };
                let when: Vec<Compare> = orphans
                    .iter()
                    .map(|(key, rev, _)| Compare::mod_revision(key.clone(), CompareOp::Equal, *rev))
                    .collect();
                let ops: Vec<TxnOp> = orphans
                    .iter()
                    .map(|(key, _, _)| TxnOp::delete(key.clone(), None))
                    .collect();
                if self
                    .txn(deadline, Txn::new().when(when).and_then(ops))
                    .await?
                    .succeeded()
                {
                    return Ok(first);
                }
                continue;
            };
            let subnet = self.parse_node_value(kv)?;
            let node_rev = kv.mod_revision();
            let skey = format!("{}{}", k.subnets, subnet_key(&subnet));
            let sresp = self
                .call(deadline, |mut c| {
                    let key = skey.clone();
                    async move { c.get(key, None).await }
                })
                .await?;
            let mut when = vec![Compare::mod_revision(
                k.node.clone(),
                CompareOp::Equal,
                node_rev,
            )];
            let mut ops = vec![TxnOp::delete(k.node.clone(), None)];
            // Only free the subnet key if its record names this node: an
            // inconsistent record must not take a subnet from another node.
            if let Some(skv) = sresp.kvs().first() {
                let owned = serde_json::from_slice::<OwnerRecord>(skv.value())
                    .is_ok_and(|r| r.node == node);
                if owned {
                    when.push(Compare::mod_revision(
                        skey.clone(),
                        CompareOp::Equal,
                        skv.mod_revision(),
                    ));
                    ops.push(TxnOp::delete(skey.clone(), None));
                }
            }
            let r = self
                .txn(deadline, Txn::new().when(when).and_then(ops))
                .await?;
            if r.succeeded() {
                return Ok(subnet);
            }
        }
        Err(SubnetError::TooManyConflicts {
            node: node.to_string(),
            attempts: MAX_ATTEMPTS,
        })
    }

    fn round_trips(&self) -> u64 {
        self.trips.load(Ordering::Relaxed)
    }

    fn describe(&self) -> String {
        format!("etcd://{}", self.endpoints)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The password file is a path in a ConfigMap: without TLS, anyone
    /// who can point dataStore at their own server would receive what it
    /// names. Refused before the file is read or anything is dialled.
    #[tokio::test]
    async fn a_password_without_tls_is_refused_unless_allowed() {
        let d = tempfile::tempdir().unwrap();
        let (user, pass) = (d.path().join("u"), d.path().join("p"));
        std::fs::write(&user, "evio").unwrap();
        std::fs::write(&pass, "secret").unwrap();
        let mut opts = EtcdOptions {
            username_file: Some(user),
            password_file: Some(pass),
            ..EtcdOptions::default()
        };
        // A port nothing listens on: only the refusal can answer at once.
        let eps = ["127.0.0.1:9".to_string()];
        let e = EtcdStore::connect(&eps, &opts, Duration::from_millis(300))
            .await
            .err()
            .unwrap();
        assert!(
            matches!(&e, SubnetError::Credentials(m) if m.contains("clear text")),
            "{e}"
        );
        opts.allow_plaintext_password = true;
        let e = EtcdStore::connect(&eps, &opts, Duration::from_millis(300))
            .await
            .err()
            .unwrap();
        assert!(!matches!(e, SubnetError::Credentials(_)), "{e}");
    }
}
