//! `evio-node nodes list|release`: every node the store knows, and freeing
//! all of a dead node's allocations (subnet, host address, record) at once.

use evio_subnet::{open_overlay_store, NodeInfo, ReleaseRequest};

use crate::error::NodeError;
use crate::netconf::RawConf;
use crate::store_args::block_on_with_timeout;
use crate::subnets::Common;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Debug, clap::Subcommand)]
pub enum Cmd {
    /// Every node the store knows: subnet, host address, key, last seen,
    /// and whether it is live, stale, or released.
    List {
        #[command(flatten)]
        common: Common,
        /// One JSON object per node instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Free a node's pod subnet, host address and record in one
    /// transaction (a node that is gone for good). A live node is refused.
    Release {
        #[command(flatten)]
        common: Common,
        /// The node to release.
        #[arg(value_name = "NODE")]
        node: String,
        /// Release it even though it is live: it loses its addresses and
        /// tunnels at once.
        #[arg(long)]
        force: bool,
    },
}

pub fn run(args: Args) -> Result<(), NodeError> {
    match args.cmd {
        Cmd::List { common, json } => list(common, json),
        Cmd::Release {
            common,
            node,
            force,
        } => release(common, &node, force),
    }
}

/// `live`, `live (vouched)`: alive without the store hearing from it (a
/// peer has a working tunnel to it), `stale`, `released`.
pub fn state(n: &NodeInfo) -> &'static str {
    match (n.live, n.vouched, &n.released) {
        (true, _, _) => "live",
        (false, true, _) => "vouched",
        (false, false, Some(_)) if n.subnet.is_none() && n.public_key.is_none() => "released",
        _ => "stale",
    }
}

fn json_of(n: &NodeInfo) -> serde_json::Value {
    serde_json::json!({
        "node": n.node,
        "podSubnet": n.subnet.map(|s| s.to_string()),
        "hostAddress": n.host.map(|h| h.to_string()),
        // With a dual-stack host CIDR, the IPv6 one too.
        "hostAddresses": n.host.into_iter().chain(n.host6).map(|h| h.to_string()).collect::<Vec<_>>(),
        "publicKey": n.public_key,
        "lastSeen": n.last_seen,
        "state": state(n),
        "released": n.released.as_ref().map(|r| serde_json::json!({
            "reason": r.reason, "by": r.by, "time": r.time,
            "podSubnet": r.subnet, "hostAddress": r.host_address,
        })),
    })
}

fn list(c: Common, json: bool) -> Result<(), NodeError> {
    let conf = RawConf::load(c.config.as_deref())?;
    let network = c.network(&conf)?;
    let (url, opts) = c.store.resolve(&conf)?;
    let snap = block_on_with_timeout(&url, c.store.timeout, async {
        let store = open_overlay_store(&url, &opts).await?;
        Ok(store.peers(&network).await?)
    })?;
    let nodes = snap.nodes();
    if json {
        for n in &nodes {
            println!("{}", json_of(n));
        }
        return Ok(());
    }
    let dash = |s: Option<String>| s.unwrap_or_else(|| "-".into());
    let mut rows = vec![[
        "NODE".to_string(),
        "SUBNET".into(),
        "HOST".into(),
        "STATE".into(),
        "LAST SEEN".into(),
        "KEY".into(),
    ]];
    for n in &nodes {
        rows.push([
            n.node.clone(),
            dash(n.subnet.map(|s| s.to_string())),
            dash(n.host.map(|h| match n.host6 {
                Some(h6) => format!("{h},{h6}"),
                None => h.to_string(),
            })),
            state(n).to_string(),
            dash(n.last_seen.clone()),
            dash(n.public_key.clone()),
        ]);
    }
    print!("{}", evio_agent::metrics::columns(&rows));
    Ok(())
}

fn release(c: Common, node: &str, force: bool) -> Result<(), NodeError> {
    let conf = RawConf::load(c.config.as_deref())?;
    let network = c.network(&conf)?;
    let (url, opts) = c.store.resolve(&conf)?;
    let req = ReleaseRequest {
        force,
        reason: "release".into(),
        by: "evio-node nodes release".into(),
    };
    let freed = block_on_with_timeout(&url, c.store.timeout, async {
        let store = open_overlay_store(&url, &opts).await?;
        Ok(store.release_node(&network, node, &req).await?)
    })?;
    let show = |v: Option<String>| v.unwrap_or_else(|| "none".into());
    println!(
        "released node {node} (network {network}): subnet {}, host address {}, record {}{}",
        show(freed.subnet.map(|s| s.to_string())),
        show(freed.host.map(|h| h.to_string())),
        if freed.record { "removed" } else { "none" },
        if freed.was_live {
            " (it was live: --force)"
        } else {
            ""
        }
    );
    Ok(())
}
