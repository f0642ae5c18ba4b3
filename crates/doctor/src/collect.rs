//! What exists on the node for one network: host-local's files, links of
//! the calling thread's network namespace, OVS ports, the masquerade chain.
//! Read-only: nothing here changes anything.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use evio_cni::config::BridgeType;
use evio_cni::host_local::NetworkDir;
use evio_net::Handle;
use evio_plugin::naming::{host_veth_of, ovs_ids as ids, HostVeth};
use ipnet::IpNet;
use serde::Serialize;

use crate::conf::Network;
use crate::error::{DoctorError, Result};
use crate::AttachmentId;

/// How long to wait for ovsdb-server; the doctor must not hang on a dead
/// daemon, it reports it.
const OVSDB_TIMEOUT: Duration = Duration::from_secs(3);

/// One address host-local holds for this network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Allocation {
    pub ip: IpAddr,
    /// Container ID from the file; empty when the file is empty (host-local
    /// killed between creating and writing it).
    pub container_id: String,
    /// Absent in files written before CNI 0.4.
    pub ifname: Option<String>,
}

/// A host veth evio tagged for this network (its alias).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Veth {
    pub name: String,
    pub id: AttachmentId,
    /// Name of the bridge (or other master) it is a port of.
    pub master: Option<String>,
    pub up: bool,
}

/// An OVS port of the network's bridge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Port {
    pub name: String,
    /// `evio-owner=evio`.
    pub evio_owned: bool,
    /// `evio-network`.
    pub network: Option<String>,
    /// `evio-container-id` / `evio-ifname`.
    pub id: Option<AttachmentId>,
    pub ofport: Option<i64>,
    pub error: Option<String>,
}

/// The node bridge's link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Bridge {
    pub name: String,
    pub kind: Option<String>,
    pub up: bool,
    pub addresses: Vec<IpNet>,
}

/// OVS side of the inventory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", content = "value", rename_all = "kebab-case")]
pub enum Ports {
    /// Linux bridge network: no port table apart from the links.
    NotOvs,
    /// The bridge is not in the OVS database.
    NoBridge,
    Listed(Vec<Port>),
    /// ovsdb-server could not be asked; why.
    Unavailable(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", content = "value", rename_all = "kebab-case")]
pub enum Masquerade {
    Absent,
    /// The chain exists with these source prefixes.
    Present(Vec<IpNet>),
    Unavailable(String),
}

/// What makes kube-proxy's NAT work across the bridge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum ServicesPath {
    /// No bridge yet: nothing to check.
    NoBridge,
    /// Linux bridge: whether bridge netfilter is in the kernel and the
    /// bridge's options (`None`: not reported).
    Linux {
        netfilter: bool,
        nf_call_iptables: Option<bool>,
        nf_call_ip6tables: Option<bool>,
    },
    /// OVS: evio's flows compared with the wanted ones.
    Flows { missing: usize, extra: usize },
    /// The flows could not be read; why.
    Unavailable { why: String },
}

/// Everything found for one network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Inventory {
    pub allocations: Vec<Allocation>,
    pub veths: Vec<Veth>,
    /// Links named like evio's host veths (`ev` + 13 hex digits) that carry
    /// no evio alias at all: an ADD stopped between creating the pair and
    /// tagging it. Which network they belong to is unknown.
    pub untagged: Vec<String>,
    pub bridge: Option<Bridge>,
    pub ports: Ports,
    pub masquerade: Masquerade,
    pub services: ServicesPath,
}

/// Takes the inventory of `net` in the calling thread's network namespace.
pub fn collect(net: &Network) -> Result<Inventory> {
    let allocations = read_allocations(&net.ipam_dir)?;
    let mut host = Handle::new().map_err(|source| DoctorError::Net {
        what: "open netlink".into(),
        source,
    })?;
    let links = host.links().map_err(|source| DoctorError::Net {
        what: "list links".into(),
        source,
    })?;
    let name_of: BTreeMap<u32, &str> = links.iter().map(|l| (l.index, l.name.as_str())).collect();
    let mut veths = Vec::new();
    let mut untagged = Vec::new();
    for l in &links {
        match host_veth_of(l, net.name()) {
            Some(HostVeth::Tagged(cid, ifname)) => veths.push(Veth {
                name: l.name.clone(),
                id: (cid.to_string(), ifname.to_string()),
                master: l
                    .master
                    .and_then(|m| name_of.get(&m).map(|n| n.to_string())),
                up: l.up,
            }),
            Some(HostVeth::Untagged) => untagged.push(l.name.clone()),
            None => {}
        }
    }
    let services = services_path(net, links.iter().find(|l| l.name == net.conf.bridge));
    let bridge = match links.iter().find(|l| l.name == net.conf.bridge) {
        Some(l) => {
            let addresses = host
                .addresses(Some(l.index))
                .map_err(|source| DoctorError::Net {
                    what: format!("list addresses of {}", l.name),
                    source,
                })?
                .into_iter()
                .map(|a| a.addr)
                .collect();
            Some(Bridge {
                name: l.name.clone(),
                kind: l.kind.clone(),
                up: l.up,
                addresses,
            })
        }
        None => None,
    };
    let ports = match net.conf.bridge_type {
        BridgeType::Linux => Ports::NotOvs,
        BridgeType::Ovs => ovs_ports(&net.conf.ovsdb, &net.conf.bridge),
    };
    let masquerade = match evio_net::nft::masquerade_cidrs(net.name()) {
        Ok(None) => Masquerade::Absent,
        Ok(Some(cidrs)) => Masquerade::Present(cidrs),
        Err(e) => Masquerade::Unavailable(e.to_string()),
    };
    Ok(Inventory {
        allocations,
        veths,
        untagged,
        bridge,
        ports,
        masquerade,
        services,
    })
}

fn services_path(net: &Network, bridge: Option<&evio_net::Link>) -> ServicesPath {
    let Some(b) = bridge else {
        return ServicesPath::NoBridge;
    };
    match net.conf.bridge_type {
        BridgeType::Linux => ServicesPath::Linux {
            netfilter: evio_net::bridge_netfilter_available(),
            nf_call_iptables: b.bridge_nf.map(|n| n.iptables),
            nf_call_ip6tables: b.bridge_nf.map(|n| n.ip6tables),
        },
        BridgeType::Ovs => {
            let Some(mac) = b.mac else {
                return ServicesPath::Unavailable {
                    why: "the bridge has no MAC".into(),
                };
            };
            let socket = evio_plugin::switch::flows::mgmt_socket(&net.conf, &b.name);
            match evio_plugin::switch::flows::check(&socket, mac) {
                Ok(c) => ServicesPath::Flows {
                    missing: c.missing,
                    extra: c.extra,
                },
                Err(e) => ServicesPath::Unavailable { why: e.to_string() },
            }
        }
    }
}

/// host-local's allocations in `dir`, read by the same code as the
/// plugin's GC (`evio_cni::host_local`): what GC would release is exactly
/// what is reported stale here. A missing directory is no allocation at all.
pub fn read_allocations(dir: &Path) -> Result<Vec<Allocation>> {
    let io = |e: evio_cni::CniError| DoctorError::Io {
        path: dir.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    };
    let Some(d) = NetworkDir::open(dir).map_err(io)? else {
        return Ok(Vec::new());
    };
    let listing = d.allocations().map_err(io)?;
    Ok(listing
        .allocations
        .into_iter()
        .map(|a| Allocation {
            ip: a.ip,
            container_id: a.owner.container_id,
            ifname: a.owner.ifname,
        })
        .collect())
}

fn ovs_ports(endpoint: &str, bridge: &str) -> Ports {
    let mut client = match evio_ovsdb::Client::connect(endpoint, OVSDB_TIMEOUT) {
        Ok(c) => c,
        Err(e) => return Ports::Unavailable(format!("{endpoint}: {e}")),
    };
    match client.ports(bridge) {
        Ok(ports) => Ports::Listed(
            ports
                .into_iter()
                .map(|p| {
                    let id = |k: &str| p.external_ids.get(k).cloned();
                    let cid = id(ids::CONTAINER_ID);
                    let ifname = id(ids::IFNAME);
                    Port {
                        evio_owned: id(ids::OWNER).as_deref() == Some(ids::OWNER_VALUE),
                        network: id(ids::NETWORK),
                        id: cid.zip(ifname),
                        name: p.name,
                        ofport: p.ofport,
                        error: p.error,
                    }
                })
                .collect(),
        ),
        Err(evio_ovsdb::Error::NotFound(_)) => Ports::NoBridge,
        Err(e) => Ports::Unavailable(format!("{endpoint}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_files() {
        let d = tempfile::tempdir().unwrap();
        assert!(read_allocations(&d.path().join("none")).unwrap().is_empty());
        std::fs::write(d.path().join("10.0.0.2"), "c1\r\neth0").unwrap();
        std::fs::write(d.path().join("lock"), "").unwrap();
        std::fs::write(d.path().join("last_reserved_ip.0"), "10.0.0.2").unwrap();
        // Not UTF-8: nobody's, as GC sees it (shown as an empty owner).
        std::fs::write(d.path().join("10.0.0.3"), b"c\xff\r\neth0").unwrap();
        // Not a file host-local wrote: not an allocation.
        std::os::unix::fs::symlink("/dev/zero", d.path().join("10.0.0.4")).unwrap();
        let a = read_allocations(d.path()).unwrap();
        assert_eq!(a.len(), 2);
        assert_eq!(a[0].container_id, "c1");
        assert_eq!(a[0].ifname.as_deref(), Some("eth0"));
        assert_eq!(a[1].container_id, "");
        assert_eq!(a[1].ifname, None);
    }
}
