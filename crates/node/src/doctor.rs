//! `evio-node doctor`: reconciles what evio holds on this node (see the
//! `evio-doctor` crate) and exits non-zero if anything is inconsistent.

use std::path::PathBuf;

use evio_doctor::{
    examine_network, parse_attachment_list, DoctorError, Options, Report, StoreView,
};
use evio_subnet::{open_store, validate_name};

use crate::config_gen::node_name;
use crate::error::NodeError;
use crate::netconf::RawConf;
use crate::store_args::{block_on_with_timeout, StoreArgs};

#[derive(Debug, clap::Args)]
pub struct Args {
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

    /// The store is only checked when --store is given.
    #[command(flatten)]
    pub store: StoreArgs,
}

pub fn run(args: Args) -> Result<(), NodeError> {
    let valid = args
        .valid_attachments
        .as_deref()
        .map(parse_attachment_list)
        .transpose()?;
    let networks = evio_doctor::load_networks(&args.conf_dir)?;
    let store = match &args.store.store {
        None => None,
        Some(_) => {
            let node = node_name(args.node_name.as_deref())?;
            validate_name("node name", &node)?;
            let (url, opts) = args.store.resolve(&RawConf::default())?;
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
