//! `evio-node config-gen`: the init container. Gets this node a pod subnet
//! from the store and writes the CNI config the kubelet picks up.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use evio_subnet::{open_store, validate_name, write_file_atomic};

use crate::conflist::{GenConfig, Overrides, CONFLIST_NAME};
use crate::error::NodeError;
use crate::netconf::RawConf;
use crate::store_args::{block_on_with_timeout, StoreArgs};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The network config (the ConfigMap's net-conf.json).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// This node's name [default: $NODE_NAME, else the hostname in lower case].
    #[arg(long, value_name = "NAME")]
    pub node_name: Option<String>,

    /// Directory the kubelet reads CNI configs from.
    #[arg(long, value_name = "DIR", default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,

    #[command(flatten)]
    pub store: StoreArgs,

    #[command(flatten)]
    pub overrides: Overrides,
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
    pub url: String,
    pub path: PathBuf,
    /// The conflist was missing or differed from what the store says.
    pub rewritten: bool,
}

/// Gets (or keeps) this node's subnet and makes the conflist say so. The
/// file is rewritten only when it is missing, differs, or has the wrong
/// mode, so a periodic reconcile does not make the kubelet re-read it.
pub fn reconcile(args: &Args) -> Result<Outcome, NodeError> {
    let conf = RawConf::load(args.config.as_deref())?;
    let gen = GenConfig::resolve(&conf, &args.overrides)?;
    let node = node_name(args.node_name.as_deref())?;
    validate_name("node name", &node)?;
    let (url, opts) = args.store.resolve(&conf)?;
    let alloc = block_on_with_timeout(&url, args.store.timeout, async {
        let store = open_store(&url, &opts).await?;
        Ok(store.allocate(&gen.name, &node, &gen.pod).await?)
    })?;

    // If a previous file disagrees with the store (a restored disk, a hand
    // edit), the store is the truth.
    // Created only now so that a failed allocation leaves nothing behind; a
    // failure here is retried by the kubelet and gets the same subnet back.
    std::fs::create_dir_all(&args.cni_conf_dir).map_err(NodeError::io(&args.cni_conf_dir))?;
    let path = args.cni_conf_dir.join(CONFLIST_NAME);
    let want = gen.render(&alloc.subnet)?;
    let current = std::fs::read(&path).ok();
    let mode_ok = std::fs::metadata(&path)
        .map(|m| m.permissions().mode() & 0o777 == 0o644)
        .unwrap_or(false);
    let rewritten = current.as_deref() != Some(want.as_slice()) || !mode_ok;
    if rewritten {
        write_file_atomic(&path, &want, 0o644)?;
    }
    Ok(Outcome {
        node,
        gen,
        subnet: alloc.subnet,
        existing: alloc.existing,
        url: url.to_string(),
        path,
        rewritten,
    })
}

pub fn run(args: Args) -> Result<(), NodeError> {
    let o = reconcile(&args)?;
    let ns = &o.subnet;
    println!(
        "node={} subnet={} gateway={} range={}-{} allocation={} network={} store={} conf={}",
        o.node,
        ns.subnet,
        ns.gateway,
        ns.range_start,
        ns.range_end,
        if o.existing { "existing" } else { "new" },
        o.gen.name,
        o.url,
        o.path.display()
    );
    Ok(())
}
