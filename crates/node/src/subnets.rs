//! `evio-node subnets list|release`: inspect and free allocations.

use std::path::PathBuf;

use evio_subnet::open_store;

use crate::conflist::DEFAULT_NETWORK;
use crate::error::NodeError;
use crate::netconf::RawConf;
use crate::store_args::{block_on_with_timeout, StoreArgs};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Debug, clap::Subcommand)]
pub enum Cmd {
    /// Table of allocated subnets: subnet, node, since.
    List(Common),
    /// Free a node's subnet (e.g. after the node left the cluster).
    Release {
        #[command(flatten)]
        common: Common,
        /// The node whose subnet to free.
        #[arg(long, value_name = "NAME")]
        node: String,
    },
}

#[derive(Debug, clap::Args)]
pub struct Common {
    /// Network config to take `name` and `dataStore` from.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Network name [default: `name` from --config, else evio].
    #[arg(long, value_name = "NAME")]
    pub network: Option<String>,

    #[command(flatten)]
    pub store: StoreArgs,
}

impl Common {
    pub(crate) fn network(&self, conf: &RawConf) -> Result<String, NodeError> {
        Ok(match &self.network {
            Some(n) => n.clone(),
            None => conf
                .string("name")?
                .unwrap_or_else(|| DEFAULT_NETWORK.into()),
        })
    }
}

pub fn run(args: Args) -> Result<(), NodeError> {
    match args.cmd {
        Cmd::List(c) => list(c),
        Cmd::Release { common, node } => release(common, node),
    }
}

fn list(c: Common) -> Result<(), NodeError> {
    let conf = RawConf::load(c.config.as_deref())?;
    let network = c.network(&conf)?;
    let (url, opts) = c.store.resolve(&conf)?;
    let leases = block_on_with_timeout(&url, c.store.timeout, async {
        let store = open_store(&url, &opts).await?;
        Ok(store.list(&network).await?)
    })?;
    let rows: Vec<[String; 3]> = leases
        .into_iter()
        .map(|l| [l.subnet.to_string(), l.record.node, l.record.time])
        .collect();
    let header = ["SUBNET".to_string(), "NODE".into(), "SINCE".into()];
    let w0 = rows
        .iter()
        .map(|r| r[0].len())
        .chain([header[0].len()])
        .max()
        .unwrap_or(0);
    let w1 = rows
        .iter()
        .map(|r| r[1].len())
        .chain([header[1].len()])
        .max()
        .unwrap_or(0);
    for r in std::iter::once(&header).chain(rows.iter()) {
        println!("{:<w0$}  {:<w1$}  {}", r[0], r[1], r[2]);
    }
    Ok(())
}

fn release(c: Common, node: String) -> Result<(), NodeError> {
    let conf = RawConf::load(c.config.as_deref())?;
    let network = c.network(&conf)?;
    let (url, opts) = c.store.resolve(&conf)?;
    let subnet = block_on_with_timeout(&url, c.store.timeout, async {
        let store = open_store(&url, &opts).await?;
        Ok(store.release(&network, &node).await?)
    })?;
    println!("released {subnet} from node {node} (network {network})");
    Ok(())
}
