//! `evio-node config-gen`: the init container. Gets this node a pod subnet
//! from the store and writes the CNI config the kubelet picks up.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use evio_subnet::{
    open_store, remove_leftover_temps, validate_name, write_file_atomic, Allocation, StoreOptions,
    StoreUrl, SubnetStore,
};
use ipnet::IpNet;

use crate::conflist::{conflist_name, GenConfig, Overrides};
use crate::error::NodeError;
use crate::netconf::RawConf;
use crate::store_args::{block_on_with_timeout, runtime, timeout_on, StoreArgs};

/// What every command that allocates for this node is told: the config,
/// the node, the store, and flags over the config's keys.
#[derive(Debug, clap::Args)]
pub struct NodeArgs {
    /// The network config (the ConfigMap's net-conf.json).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// This node's name [default: $NODE_NAME, else the hostname in lower case].
    #[arg(long, value_name = "NAME")]
    pub node_name: Option<String>,

    #[command(flatten)]
    pub store: StoreArgs,

    #[command(flatten)]
    pub overrides: Overrides,
}

/// [`NodeArgs`] read and checked.
pub struct Resolved {
    pub conf: RawConf,
    pub gen: GenConfig,
    pub node: String,
    pub url: StoreUrl,
    pub opts: StoreOptions,
}

impl NodeArgs {
    /// Reads the config (again on every call: an edited ConfigMap takes
    /// effect without a restart) and merges the flags over it.
    pub fn resolve(&self) -> Result<Resolved, NodeError> {
        let conf = RawConf::load(self.config.as_deref())?;
        let gen = GenConfig::resolve(&conf, &self.overrides)?;
        let node = node_name(self.node_name.as_deref())?;
        validate_name("node name", &node)?;
        let (url, opts) = self.store.resolve(&conf)?;
        Ok(Resolved {
            conf,
            gen,
            node,
            url,
            opts,
        })
    }
}

impl NodeArgs {
    /// The config and flags alone, without the node name or the store: what
    /// `run` needs to keep the bridge up while the store is unreachable.
    pub fn config_only(&self) -> Result<GenConfig, NodeError> {
        let conf = RawConf::load(self.config.as_deref())?;
        GenConfig::resolve(&conf, &self.overrides)
    }
}

/// Where the conflist lives: config-gen writes it, uninstall removes it.
#[derive(Debug, clap::Args)]
pub struct ConflistArgs {
    /// Directory the kubelet reads CNI configs from.
    #[arg(long, value_name = "DIR", default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,

    /// File name of the conflist in --cni-conf-dir (config key
    /// `conflistName`); the runtime uses the first config in lexical order,
    /// so it must sort before any other [default: 10-evio.conflist].
    #[arg(long, value_name = "NAME")]
    pub conflist_name: Option<String>,
}

impl ConflistArgs {
    /// The conflist's file name: the flag, else the config's `conflistName`,
    /// else the default; refused unless it is a bare `*.conflist` name.
    pub fn name(&self, conf: &RawConf) -> Result<String, NodeError> {
        conflist_name(self.conflist_name.as_deref(), conf)
    }
}

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub node: NodeArgs,

    #[command(flatten)]
    pub conflist: ConflistArgs,

    /// Where this node's last allocation is cached, to start from when the
    /// store does not answer (a reboot during a store outage). Used only if
    /// the directory exists (the DaemonSet and the systemd unit make it).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
}

pub const DEFAULT_DATA_DIR: &str = "/var/lib/evio";
/// How long config-gen with a cache waits for the store before it uses the
/// cache.
const CACHED_WAIT: Duration = Duration::from_secs(5);

/// config-gen's cache: the node's subnet as the store last gave it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct SubnetCache {
    network: String,
    node: String,
    store: String,
    pod_cidr: String,
    node_bits: u8,
    subnet: String,
}

impl SubnetCache {
    fn of(plan: &Resolved, subnet: &IpNet) -> SubnetCache {
        SubnetCache {
            network: plan.gen.name.clone(),
            node: plan.node.clone(),
            store: plan.url.to_string(),
            pod_cidr: plan.gen.pod.cidr().to_string(),
            node_bits: plan.gen.pod.node_bits(),
            subnet: subnet.to_string(),
        }
    }

    /// The cache file, if the data dir exists.
    fn path(dir: &Path, plan: &Resolved) -> Option<PathBuf> {
        dir.is_dir()
            .then(|| dir.join(format!("config-gen-{}-{}.json", plan.gen.name, plan.node)))
    }

    /// The cached subnet of the node `plan` describes, if any fits.
    fn load(path: &Path, plan: &Resolved) -> Option<evio_subnet::NodeSubnet> {
        let c: SubnetCache = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
        let subnet: IpNet = c.subnet.parse().ok()?;
        let fits = SubnetCache::of(plan, &subnet) == c;
        let index = plan.gen.pod.index_of(&subnet).filter(|_| fits)?;
        plan.gen.pod.node(index).ok()
    }

    fn save(path: &Path, plan: &Resolved, subnet: &IpNet) {
        let c = SubnetCache::of(plan, subnet);
        let saved = serde_json::to_vec_pretty(&c)
            .map_err(|e| e.to_string())
            .and_then(|b| write_file_atomic(path, &b, 0o644).map_err(|e| e.to_string()));
        if let Err(e) = saved {
            eprintln!(
                "evio-node config-gen: warning: cannot cache the allocation in {}: {e}",
                path.display()
            );
        }
    }
}

/// Refuses the embedded file store inside a Kubernetes cluster (a pod sees
/// `KUBERNETES_SERVICE_HOST`) unless the config says `"singleNode": true`:
/// the file is on this node's disk, so every node would allocate on its own
/// and two nodes would get the same subnet.
fn check_store_fits_cluster(plan: &Resolved) -> Result<(), NodeError> {
    let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some_and(|v| !v.is_empty());
    if !in_cluster || !matches!(plan.url, StoreUrl::File(_)) {
        return Ok(());
    }
    if plan.conf.boolean("singleNode")?.unwrap_or(false) {
        return Ok(());
    }
    Err(NodeError::Invalid(format!(
        "refusing dataStore {} in a Kubernetes cluster (KUBERNETES_SERVICE_HOST is set): \
         it is this node's own file, so every node would allocate alone and subnets would \
         collide; use an etcd dataStore, or set \"singleNode\": true if the cluster has \
         exactly one node",
        plan.url
    )))
}

fn hostname() -> Result<String, NodeError> {
    let mut buf = [0u8; 256];
    // SAFETY: the pointer and length describe `buf`, which outlives the call.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return Err(NodeError::NodeName(
            std::io::Error::last_os_error().to_string(),
        ));
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let h = String::from_utf8_lossy(&buf[..end]).into_owned();
    if h.is_empty() {
        return Err(NodeError::NodeName("the hostname is empty".into()));
    }
    Ok(h)
}

/// `--node-name`, else `NODE_NAME` (the downward API), else the hostname
/// lower-cased as the kubelet does when it registers the node.
pub fn node_name(flag: Option<&str>) -> Result<String, NodeError> {
    if let Some(n) = flag {
        return Ok(n.to_string());
    }
    match std::env::var("NODE_NAME") {
        Ok(n) if !n.is_empty() => Ok(n),
        _ => Ok(hostname()?.to_ascii_lowercase()),
    }
}

/// What one allocation + conflist pass did.
pub struct Outcome {
    pub node: String,
    pub gen: GenConfig,
    pub subnet: evio_subnet::NodeSubnet,
    pub existing: bool,
    /// The store did not answer: the subnet is the cached one.
    pub cached: bool,
    pub url: String,
    pub path: PathBuf,
    /// The conflist was missing or differed from what the store says.
    pub rewritten: bool,
}

impl Resolved {
    /// Makes the conflist say `alloc`. The file is rewritten only when it
    /// is missing, differs, or has the wrong mode, so a periodic reconcile
    /// does not make the kubelet re-read it.
    fn write(self, args: &Args, alloc: Allocation, cached: bool) -> Result<Outcome, NodeError> {
        // If a previous file disagrees with the store (a restored disk, a
        // hand edit), the store is the truth.
        // Created only now so that a failed allocation leaves nothing behind;
        // a failure here is retried by the kubelet and gets the same subnet back.
        let name = args.conflist.name(&self.conf)?;
        let dir = &args.conflist.cni_conf_dir;
        std::fs::create_dir_all(dir).map_err(NodeError::io(dir))?;
        remove_leftover_temps(dir, &name);
        let path = dir.join(&name);
        let want = self.gen.render(&alloc.subnet)?;
        let current = std::fs::read(&path).ok();
        let mode_ok = std::fs::metadata(&path)
            .map(|m| m.permissions().mode() & 0o777 == 0o644)
            .unwrap_or(false);
        let rewritten = current.as_deref() != Some(want.as_slice()) || !mode_ok;
        if rewritten {
            write_file_atomic(&path, &want, 0o644)?;
        }
        Ok(Outcome {
            node: self.node,
            gen: self.gen,
            subnet: alloc.subnet,
            existing: alloc.existing,
            cached,
            url: self.url.to_string(),
            path,
            rewritten,
        })
    }
}

/// Gets (or keeps) this node's subnet and makes the conflist say so, with
/// a store connection of its own (the init container's single pass). When
/// the store does not answer, the subnet the store last gave this node (the
/// cache in --data-dir) is used; without a cache that is an error.
pub fn reconcile(args: &Args) -> Result<Outcome, NodeError> {
    let plan = args.node.resolve()?;
    check_store_fits_cluster(&plan)?;
    // Checked before allocating: a bad name must not cost a subnet.
    args.conflist.name(&plan.conf)?;
    let cache = SubnetCache::path(&args.data_dir, &plan);
    let cached = cache.as_deref().and_then(|p| SubnetCache::load(p, &plan));
    let budget = match cached {
        Some(_) => args.node.store.timeout.min(CACHED_WAIT),
        None => args.node.store.timeout,
    };
    let opts = StoreOptions {
        timeout: plan.opts.timeout.min(budget),
        ..plan.opts.clone()
    };
    let got = block_on_with_timeout(&plan.url, budget, async {
        let store = open_store(&plan.url, &opts).await?;
        Ok(store
            .allocate(&plan.gen.name, &plan.node, &plan.gen.pod)
            .await?)
    });
    match (got, cached) {
        (Ok(a), cached) => {
            if let Some(old) = cached.filter(|c| c.subnet != a.subnet.subnet) {
                eprintln!(
                    "evio-node config-gen: error: this node's subnet {} was released while it was \
                     away (see `evio-node nodes list`); it now has {}: pods still using the old \
                     addresses must be restarted",
                    old.subnet, a.subnet.subnet
                );
            }
            if let Some(p) = &cache {
                SubnetCache::save(p, &plan, &a.subnet.subnet);
            }
            plan.write(args, a, false)
        }
        (Err(e), Some(subnet)) if crate::agent::unanswered(&e) => {
            eprintln!(
                "evio-node config-gen: warning: the store did not answer ({e}): using this \
                 node's last subnet {} from {}",
                subnet.subnet,
                cache
                    .as_deref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            );
            let alloc = Allocation {
                subnet,
                existing: true,
            };
            plan.write(args, alloc, true)
        }
        (Err(e), _) => Err(e),
    }
}

/// An open store and what it was opened with.
struct Connection {
    url: StoreUrl,
    opts: StoreOptions,
    store: Box<dyn SubnetStore>,
}

/// The long-running side of [`reconcile`]: one runtime and one store
/// connection (one etcd login) for the life of the process, opened again
/// only after a failure or when the config names another store.
pub struct Reconciler {
    rt: tokio::runtime::Runtime,
    conn: Option<Connection>,
}

impl Reconciler {
    pub fn new() -> Result<Reconciler, NodeError> {
        Ok(Reconciler {
            rt: runtime()?,
            conn: None,
        })
    }

    /// Whether a store connection is being kept (for tests and metrics).
    pub fn connected(&self) -> bool {
        self.conn.is_some()
    }

    pub fn reconcile(&mut self, args: &Args) -> Result<Outcome, NodeError> {
        let plan = args.node.resolve()?;
        check_store_fits_cluster(&plan)?;
        args.conflist.name(&plan.conf)?;
        if self
            .conn
            .as_ref()
            .is_some_and(|c| c.url != plan.url || c.opts != plan.opts)
        {
            self.conn = None;
        }
        let result = self.allocate(&plan, args.node.store.timeout);
        if result.is_err() {
            // The connection may be what failed (a member gone, a revoked
            // token): the next pass starts from a fresh one.
            self.conn = None;
        }
        let alloc = result?;
        if let Some(p) = SubnetCache::path(&args.data_dir, &plan) {
            if SubnetCache::load(&p, &plan).map(|s| s.subnet) != Some(alloc.subnet.subnet) {
                SubnetCache::save(&p, &plan, &alloc.subnet.subnet);
            }
        }
        plan.write(args, alloc, false)
    }

    fn allocate(&mut self, plan: &Resolved, timeout: Duration) -> Result<Allocation, NodeError> {
        let conn = &mut self.conn;
        timeout_on(&self.rt, &plan.url, timeout, async {
            if conn.is_none() {
                let store = open_store(&plan.url, &plan.opts).await?;
                *conn = Some(Connection {
                    url: plan.url.clone(),
                    opts: plan.opts.clone(),
                    store,
                });
            }
            match conn.as_ref() {
                Some(c) => Ok(c
                    .store
                    .allocate(&plan.gen.name, &plan.node, &plan.gen.pod)
                    .await?),
                None => Err(NodeError::Invalid("no store connection".into())),
            }
        })
    }
}

pub fn run(args: Args) -> Result<(), NodeError> {
    let o = reconcile(&args)?;
    warn_if_shadowed(&o.path);
    let ns = &o.subnet;
    println!(
        "node={} subnet={} gateway={} range={}-{} allocation={} network={} store={} conf={}",
        o.node,
        ns.subnet,
        ns.gateway,
        ns.range_start,
        ns.range_end,
        if o.cached {
            "cached"
        } else if o.existing {
            "existing"
        } else {
            "new"
        },
        o.gen.name,
        o.url,
        o.path.display()
    );
    Ok(())
}

/// One stderr line per CNI config that sorts before ours in its directory:
/// the runtime would use that one and evio's would silently never apply.
pub fn warn_if_shadowed(path: &std::path::Path) {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return;
    };
    let name = name.to_string_lossy();
    match evio_doctor::configs_before(dir, &name) {
        Ok(earlier) => {
            for p in earlier {
                eprintln!(
                    "evio-node config-gen: warning: {} sorts before {name}, and the container \
                     runtime uses the first CNI config in lexical order: remove it, or give \
                     evio's an earlier name (--conflist-name, conflistName)",
                    p.display()
                );
            }
        }
        Err(e) => eprintln!(
            "evio-node config-gen: warning: cannot list {}: {e}",
            dir.display()
        ),
    }
}
