//! `evio-doctor`: reconciles what evio holds on a node. For every evio
//! network in the CNI config directory it compares host-local's
//! allocations, the host veths evio tagged, the OVS ports evio owns, the
//! masquerade chain, and optionally the runtime's list of live attachments
//! and the allocation store's record for the node, and reports every orphan
//! and inconsistency. It changes nothing.
//!
//! Used by `evio-node doctor` and, as the leak detector, by the crash and
//! fault tests. Links are read in the calling thread's network namespace;
//! to inspect another one run it through `evio_net::run_in_netns`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

pub mod check;
pub mod collect;
pub mod conf;
mod error;

pub use check::{attachments, diagnose, AttachmentState, Kind, Problem, StoreView};
pub use collect::{collect, Inventory};
pub use conf::{configs_before, load_networks, Network};
pub use error::{DoctorError, Result};

/// (container ID, ifname): the identity of an attachment, as in CNI's
/// `cni.dev/valid-attachments`.
pub type AttachmentId = (String, String);

/// What to compare the node's state with, besides the config.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The attachments the runtime considers live. With it, anything held
    /// for another attachment is reported as stale.
    pub valid: Option<BTreeSet<AttachmentId>>,
    /// The store's record for this node, looked up by the caller (the
    /// store client is async and lives in `evio-node`).
    pub store: Option<StoreView>,
}

/// One network's findings.
#[derive(Debug, Clone, Serialize)]
pub struct NetworkReport {
    pub network: String,
    pub source: String,
    pub bridge: String,
    pub bridge_type: &'static str,
    pub inventory: Inventory,
    pub attachments: Vec<(AttachmentId, AttachmentState)>,
    pub problems: Vec<Problem>,
}

/// The doctor's findings for every network of the node.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub networks: Vec<NetworkReport>,
}

impl Report {
    pub fn problems(&self) -> impl Iterator<Item = &Problem> {
        self.networks.iter().flat_map(|n| n.problems.iter())
    }

    pub fn is_clean(&self) -> bool {
        self.problems().next().is_none()
    }

    /// Every attachment found, over all networks.
    pub fn attachment_ids(&self) -> BTreeSet<AttachmentId> {
        self.networks
            .iter()
            .flat_map(|n| n.attachments.iter().map(|(id, _)| id.clone()))
            .collect()
    }

    /// The human-readable report `evio-node doctor` prints.
    pub fn render(&self) -> String {
        let mut s = String::new();
        for n in &self.networks {
            let inv = &n.inventory;
            let _ = writeln!(
                s,
                "network {} ({}): bridge {} ({}), {} attachment(s), {} address(es), {} host veth(s){}",
                n.network,
                n.source,
                n.bridge,
                n.bridge_type,
                n.attachments.len(),
                inv.allocations.len(),
                inv.veths.len(),
                match &inv.ports {
                    collect::Ports::Listed(p) => format!(", {} OVS port(s)", p.len()),
                    _ => String::new(),
                }
            );
            for p in &n.problems {
                let _ = writeln!(s, "  PROBLEM {p}");
            }
        }
        let count = self.problems().count();
        if count == 0 {
            s.push_str("no problems found\n");
        } else {
            let _ = writeln!(s, "{count} problem(s) found");
        }
        s
    }
}

/// Examines every evio network configured in `conf_dir`, in the calling
/// thread's network namespace.
pub fn examine(conf_dir: &Path, opts: &Options) -> Result<Report> {
    let nets = load_networks(conf_dir)?;
    let mut networks = Vec::new();
    for net in &nets {
        networks.push(examine_network(net, opts)?);
    }
    Ok(Report { networks })
}

/// Examines one network.
pub fn examine_network(net: &Network, opts: &Options) -> Result<NetworkReport> {
    let inv = collect(net)?;
    let problems = diagnose(net, &inv, opts.valid.as_ref(), opts.store.as_ref());
    let attachments: BTreeMap<_, _> = attachments(&inv, net.name());
    Ok(NetworkReport {
        network: net.name().to_string(),
        source: net.source.display().to_string(),
        bridge: net.conf.bridge.clone(),
        bridge_type: match net.conf.bridge_type {
            evio_cni::config::BridgeType::Linux => "linux",
            evio_cni::config::BridgeType::Ovs => "ovs",
        },
        inventory: inv,
        attachments: attachments.into_iter().collect(),
        problems,
    })
}

/// Parses `CID/IFNAME[,CID/IFNAME...]` (an empty string: no attachment is
/// live).
pub fn parse_attachment_list(s: &str) -> Result<BTreeSet<AttachmentId>> {
    let mut out = BTreeSet::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let Some((cid, ifname)) = item.split_once('/') else {
            return Err(DoctorError::Attachment(item.to_string()));
        };
        if cid.is_empty() || ifname.is_empty() || ifname.contains('/') {
            return Err(DoctorError::Attachment(item.to_string()));
        }
        out.insert((cid.to_string(), ifname.to_string()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attachment_lists() {
        assert!(parse_attachment_list("").unwrap().is_empty());
        let l = parse_attachment_list("abc/eth0, def/net1,").unwrap();
        assert_eq!(l.len(), 2);
        assert!(l.contains(&("def".to_string(), "net1".to_string())));
        for bad in ["abc", "/eth0", "abc/", "a/b/c"] {
            assert!(parse_attachment_list(bad).is_err(), "{bad}");
        }
    }
}
