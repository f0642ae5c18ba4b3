//! `evio-node doctor`: reconciles what evio holds on this node (see the
//! `evio-doctor` crate) and exits non-zero if anything is inconsistent.

use std::path::PathBuf;

use evio_doctor::{
    configs_before, examine_network, load_networks, parse_attachment_list, DoctorError, Kind,
    Network, Options, Problem, Report, StoreView,
};
use evio_subnet::{open_store, validate_name};

use crate::config_gen::node_name;
use crate::error::NodeError;
use crate::netconf::RawConf;
use crate::store_args::{block_on_with_timeout, StoreArgs};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The config to diagnose. A CNI conflist (or .conf) with an evio
    /// plugin is examined instead of --conf-dir's files. Otherwise it is
    /// the network config (the ConfigMap's net-conf.json): its dataStore
    /// and etcd keys select the store to check (as --store does), and the
    /// networks are read from --conf-dir.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Directory with the CNI config written by config-gen.
    #[arg(long, value_name = "DIR", default_value = "/etc/cni/net.d")]
    pub conf_dir: PathBuf,

    /// The attachments the runtime considers live, as CONTAINERID/IFNAME
    /// pairs separated by commas ("" for none). Anything else holding state
    /// is reported as stale.
    #[arg(long, value_name = "LIST")]
    pub valid_attachments: Option<String>,

    /// This node's name, for the store check [default: $NODE_NAME, else
    /// the hostname in lower case].
    #[arg(long, value_name = "NAME")]
    pub node_name: Option<String>,

    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,

    /// The store is only checked when --store is given, or a --config
    /// net-conf.json names a dataStore.
    #[command(flatten)]
    pub store: StoreArgs,
}

pub fn run(args: Args) -> Result<(), NodeError> {
    let valid = args
        .valid_attachments
        .as_deref()
        .map(parse_attachment_list)
        .transpose()?;
    let (networks, conf, from_dir) = load(&args)?;
    let store_named = args.store.store.is_some() || conf.string("dataStore")?.is_some();
    let store = match store_named {
        false => None,
        true => {
            let node = node_name(args.node_name.as_deref())?;
            validate_name("node name", &node)?;
            let (url, opts) = args.store.resolve(&conf)?;
            let names: Vec<String> = networks.iter().map(|n| n.name().to_string()).collect();
            let found = block_on_with_timeout(&url, args.store.timeout, async {
                let store = open_store(&url, &opts).await?;
                let mut found = Vec::new();
                for name in &names {
                    found.push(store.lookup(name, &node).await?);
                }
                Ok(found)
            })?;
            Some((node, url.to_string(), found))
        }
    };
    let mut reports = Vec::new();
    for (i, net) in networks.iter().enumerate() {
        let opts = Options {
            valid: valid.clone(),
            store: store.as_ref().map(|(node, url, found)| StoreView {
                node: node.clone(),
                store: url.clone(),
                subnet: found.get(i).copied().flatten(),
            }),
        };
        reports.push(examine_network(net, &opts)?);
    }
    if from_dir {
        if let (Some(first), Some(report)) = (networks.first(), reports.first_mut()) {
            report.problems.extend(shadowing(&args.conf_dir, first)?);
        }
    }
    let report = Report { networks: reports };
    if args.json {
        let text = serde_json::to_string_pretty(&report)
            .map_err(|e| NodeError::Invalid(format!("cannot encode the report: {e}")))?;
        println!("{text}");
    } else {
        print!("{}", report.render());
    }
    let count = report.problems().count();
    if count > 0 {
        return Err(DoctorError::ProblemsFound(count).into());
    }
    Ok(())
}

/// The networks to examine, the network config (empty unless --config is
/// one), and whether the networks came from --conf-dir.
fn load(args: &Args) -> Result<(Vec<Network>, RawConf, bool), NodeError> {
    let Some(path) = &args.config else {
        return Ok((load_networks(&args.conf_dir)?, RawConf::default(), true));
    };
    let bytes = std::fs::read(path).map_err(NodeError::io(path))?;
    let value: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| NodeError::Invalid(format!("{}: not valid JSON: {e}", path.display())))?;
    // A CNI config has plugins (a list) or an ipam section (a single
    // plugin); net-conf.json has neither.
    if value.get("plugins").is_some() || value.get("ipam").is_some() {
        let nets = evio_doctor::conf::networks_in(path, &bytes)?;
        if nets.is_empty() {
            return Err(NodeError::Invalid(format!(
                "{}: no evio plugin in this CNI config",
                path.display()
            )));
        }
        return Ok((nets, RawConf::default(), false));
    }
    let conf = RawConf::parse(&path.display().to_string(), &bytes)?;
    Ok((load_networks(&args.conf_dir)?, conf, true))
}

/// Every CNI config in `dir` that sorts before the first evio one: the
/// runtime uses the first, so pods would never get evio.
fn shadowing(dir: &std::path::Path, first: &Network) -> Result<Vec<Problem>, NodeError> {
    let Some(own) = first.source.file_name() else {
        return Ok(Vec::new());
    };
    let own = own.to_string_lossy();
    Ok(configs_before(dir, &own)?
        .into_iter()
        .map(|p| Problem {
            kind: Kind::ConflistShadowed,
            network: first.name().to_string(),
            subject: p.display().to_string(),
            detail: format!(
                "sorts before {own}: the runtime uses the first CNI config in lexical order, \
                 so pods do not get evio; remove it, or give evio's an earlier name \
                 (config-gen --conflist-name, conflistName)"
            ),
        })
        .collect())
}
