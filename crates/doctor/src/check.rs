//! The reconciliation itself: pure functions from (config, inventory,
//! runtime and store views) to problems, so every rule is unit-tested
//! without a kernel.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use evio_cni::config::BridgeType;
use evio_plugin::naming::host_veth_name;
use evio_subnet::PodNetwork;
use ipnet::IpNet;
use serde::Serialize;

use crate::collect::{Inventory, Masquerade, Ports, ServicesPath, Veth};
use crate::conf::Network;
use crate::AttachmentId;

/// What kind of inconsistency. The kebab-case name is what the CLI prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// host-local holds an address for an attachment that has no host veth.
    AllocationWithoutVeth,
    /// host-local's file for an address names nobody (empty, or not
    /// UTF-8): nobody can release it by container ID, only GC can.
    AllocationWithoutOwner,
    /// An address outside every range of the config (the node's range
    /// changed, or a foreign file).
    AllocationOutOfRange,
    /// One attachment holds two addresses of the same range.
    DuplicateAllocation,
    /// An evio host veth without an address held for its attachment.
    VethWithoutAllocation,
    /// A link named like evio's host veths without an evio alias.
    UntaggedVeth,
    /// The veth's name is not the one derived from its alias.
    VethNameMismatch,
    /// Linux bridge: the host veth is not a port of the bridge.
    VethNotOnBridge,
    /// OVS: an evio port whose interface does not exist.
    PortWithoutLink,
    /// OVS: an evio host veth with no port on the bridge.
    LinkWithoutPort,
    /// OVS: port and veth of the same name disagree on the attachment.
    PortIdentityMismatch,
    /// OVS: vswitchd could not attach the port.
    PortNotAttached,
    /// A piece of state could not be inspected (OVSDB down, nft failed).
    Unverifiable,
    /// Attachments exist but the bridge is missing or down, or lacks the
    /// gateway address.
    BridgeBroken,
    /// Masquerade chain present although `ipMasq` is off.
    MasqueradeStale,
    /// `ipMasq` is on and pods exist, but their traffic is not masqueraded
    /// (chain missing or for other prefixes).
    MasqueradeMissing,
    /// The runtime does not list this attachment as valid, yet it holds state.
    StaleAttachment,
    /// The runtime lists this attachment as valid but it has nothing.
    MissingAttachment,
    /// The store has no subnet for this node.
    StoreNoRecord,
    /// The store's subnet for this node and the config's range disagree.
    StoreMismatch,
    /// Another CNI config in the directory sorts before evio's: the
    /// runtime uses that one and pods never reach evio.
    ConflistShadowed,
    /// Replies of Service traffic would bypass the host's conntrack:
    /// evio's OVS flows missing or altered, the Linux bridge's netfilter
    /// options off, or bridge netfilter missing from the kernel.
    ServicesBroken,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::AllocationWithoutVeth => "allocation-without-veth",
            Kind::AllocationWithoutOwner => "allocation-without-owner",
            Kind::AllocationOutOfRange => "allocation-out-of-range",
            Kind::DuplicateAllocation => "duplicate-allocation",
            Kind::VethWithoutAllocation => "veth-without-allocation",
            Kind::UntaggedVeth => "untagged-veth",
            Kind::VethNameMismatch => "veth-name-mismatch",
            Kind::VethNotOnBridge => "veth-not-on-bridge",
            Kind::PortWithoutLink => "port-without-link",
            Kind::LinkWithoutPort => "link-without-port",
            Kind::PortIdentityMismatch => "port-identity-mismatch",
            Kind::PortNotAttached => "port-not-attached",
            Kind::Unverifiable => "unverifiable",
            Kind::BridgeBroken => "bridge-broken",
            Kind::MasqueradeStale => "masquerade-stale",
            Kind::MasqueradeMissing => "masquerade-missing",
            Kind::StaleAttachment => "stale-attachment",
            Kind::MissingAttachment => "missing-attachment",
            Kind::StoreNoRecord => "store-no-record",
            Kind::StoreMismatch => "store-mismatch",
            Kind::ConflistShadowed => "conflist-shadowed",
            Kind::ServicesBroken => "services-broken",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One inconsistency: what, about which object, and what the operator
/// should know about it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Problem {
    pub kind: Kind,
    pub network: String,
    /// The object: an address, a link or port name, an attachment
    /// (`cid/ifname`), a node.
    pub subject: String,
    pub detail: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} [{}] {}: {}",
            self.kind, self.network, self.subject, self.detail
        )
    }
}

/// What the allocation store says about this node, looked up by the caller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoreView {
    pub node: String,
    /// Where it was asked, for messages.
    pub store: String,
    pub subnet: Option<IpNet>,
}

/// Everything evio holds for one attachment, gathered from all sources.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AttachmentState {
    pub ips: Vec<IpAddr>,
    pub veth: Option<String>,
    pub port: Option<String>,
}

impl AttachmentState {
    pub fn is_empty(&self) -> bool {
        self.ips.is_empty() && self.veth.is_none() && self.port.is_none()
    }
}

pub fn fmt_id(id: &AttachmentId) -> String {
    format!("{}/{}", id.0, id.1)
}

/// Attachments of the network as the inventory shows them, keyed by
/// identity. Allocations in the pre-0.4 format (no ifname) are listed under
/// ifname `""`.
pub fn attachments(inv: &Inventory, network: &str) -> BTreeMap<AttachmentId, AttachmentState> {
    let mut out: BTreeMap<AttachmentId, AttachmentState> = BTreeMap::new();
    for a in &inv.allocations {
        if a.container_id.is_empty() {
            continue;
        }
        let id = (a.container_id.clone(), a.ifname.clone().unwrap_or_default());
        out.entry(id).or_default().ips.push(a.ip);
    }
    for v in &inv.veths {
        out.entry(v.id.clone()).or_default().veth = Some(v.name.clone());
    }
    if let Ports::Listed(ports) = &inv.ports {
        for p in ports {
            if !p.evio_owned || p.network.as_deref() != Some(network) {
                continue;
            }
            if let Some(id) = &p.id {
                out.entry(id.clone()).or_default().port = Some(p.name.clone());
            }
        }
    }
    out
}

/// Checks one network. `valid`: the attachments the runtime considers live
/// (as GC's `cni.dev/valid-attachments`), if known.
pub fn diagnose(
    net: &Network,
    inv: &Inventory,
    valid: Option<&BTreeSet<AttachmentId>>,
    store: Option<&StoreView>,
) -> Vec<Problem> {
    let mut f = Findings {
        network: net.name().to_string(),
        out: Vec::new(),
    };
    check_allocations(&mut f, net, inv);
    check_links(&mut f, net, inv);
    check_ports(&mut f, net, inv);
    check_bridge(&mut f, net, inv);
    check_masquerade(&mut f, net, inv);
    check_services(&mut f, net, inv);
    if let Some(valid) = valid {
        check_runtime_view(&mut f, net, inv, valid);
    }
    if let Some(s) = store {
        check_store_view(&mut f, net, s);
    }
    f.out.sort();
    f.out
}

/// The problems found so far in one network.
struct Findings {
    network: String,
    out: Vec<Problem>,
}

impl Findings {
    fn add(&mut self, kind: Kind, subject: String, detail: String) {
        self.out.push(Problem {
            kind,
            network: self.network.clone(),
            subject,
            detail,
        })
    }
}

/// host-local's side: every address in a range, owned, by an attachment
/// with a host veth, and one per range.
fn check_allocations(f: &mut Findings, net: &Network, inv: &Inventory) {
    let veth_ids: BTreeSet<&AttachmentId> = inv.veths.iter().map(|v| &v.id).collect();
    let veth_cids: BTreeSet<&str> = inv.veths.iter().map(|v| v.id.0.as_str()).collect();
    let mut per_range: BTreeMap<(AttachmentId, usize), Vec<IpAddr>> = BTreeMap::new();
    for a in &inv.allocations {
        let range = net.ranges.iter().position(|r| r.contains(a.ip));
        if range.is_none() {
            f.add(
                Kind::AllocationOutOfRange,
                a.ip.to_string(),
                format!(
                    "host-local holds it (file in {}) but no range of the config contains it",
                    net.ipam_dir.display()
                ),
            );
        }
        if a.container_id.is_empty() {
            f.add(
                Kind::AllocationWithoutOwner,
                a.ip.to_string(),
                format!(
                    "host-local's file in {} names no container (empty or not UTF-8): \
                     DEL cannot release it, GC will",
                    net.ipam_dir.display()
                ),
            );
            continue;
        }
        let has_veth = match &a.ifname {
            Some(ifname) => veth_ids.contains(&(a.container_id.clone(), ifname.clone())),
            None => veth_cids.contains(a.container_id.as_str()),
        };
        let owner = format!(
            "{}/{}",
            a.container_id,
            a.ifname.as_deref().unwrap_or("<any ifname>")
        );
        if !has_veth {
            f.add(
                Kind::AllocationWithoutVeth,
                a.ip.to_string(),
                format!("held by {owner} but that attachment has no host veth"),
            );
        }
        if let Some(r) = range {
            let id = (a.container_id.clone(), a.ifname.clone().unwrap_or_default());
            per_range.entry((id, r)).or_default().push(a.ip);
        }
    }
    for ((id, _), ips) in &per_range {
        if ips.len() > 1 {
            let list: Vec<String> = ips.iter().map(ToString::to_string).collect();
            f.add(
                Kind::DuplicateAllocation,
                fmt_id(id),
                format!(
                    "holds {} addresses of one range: {}",
                    ips.len(),
                    list.join(", ")
                ),
            );
        }
    }
}

/// The host veths: each with an address, named after its alias, and (Linux
/// bridge) a port of the bridge; links named like ours without an alias.
fn check_links(f: &mut Findings, net: &Network, inv: &Inventory) {
    let alloc_ids: BTreeSet<(&str, Option<&str>)> = inv
        .allocations
        .iter()
        .map(|a| (a.container_id.as_str(), a.ifname.as_deref()))
        .collect();
    for v in &inv.veths {
        let (cid, ifname) = (&v.id.0, &v.id.1);
        if !alloc_ids.contains(&(cid.as_str(), Some(ifname.as_str())))
            && !alloc_ids.contains(&(cid.as_str(), None))
        {
            f.add(
                Kind::VethWithoutAllocation,
                v.name.clone(),
                format!(
                    "host veth of {} has no address held in {}",
                    fmt_id(&v.id),
                    net.ipam_dir.display()
                ),
            );
        }
        let want = host_veth_name(cid, ifname);
        if v.name != want {
            f.add(
                Kind::VethNameMismatch,
                v.name.clone(),
                format!(
                    "tagged as {} whose host veth is named {want}",
                    fmt_id(&v.id)
                ),
            );
        }
        if net.conf.bridge_type == BridgeType::Linux
            && v.master.as_deref() != Some(net.conf.bridge.as_str())
        {
            f.add(
                Kind::VethNotOnBridge,
                v.name.clone(),
                format!(
                    "host veth of {} is {} instead of a port of bridge {}",
                    fmt_id(&v.id),
                    match &v.master {
                        Some(m) => format!("a port of {m}"),
                        None => "on no bridge".to_string(),
                    },
                    net.conf.bridge
                ),
            );
        }
    }
    for u in &inv.untagged {
        f.add(
            Kind::UntaggedVeth,
            u.clone(),
            "named like an evio host veth but carries no evio alias: an ADD stopped \
             right after creating it; DEL of its attachment or the next GC removes it"
                .to_string(),
        );
    }
}

/// OVS: ports and host veths name each other, and vswitchd attached them.
fn check_ports(f: &mut Findings, net: &Network, inv: &Inventory) {
    match &inv.ports {
        Ports::NotOvs => {}
        Ports::Unavailable(why) => f.add(
            Kind::Unverifiable,
            format!("ovs bridge {}", net.conf.bridge),
            format!("cannot list OVS ports: {why}"),
        ),
        Ports::NoBridge => {
            for v in &inv.veths {
                link_without_port(f, v, "but OVS has no bridge", &net.conf.bridge);
            }
        }
        Ports::Listed(ports) => {
            let link_names: BTreeMap<&str, &AttachmentId> =
                inv.veths.iter().map(|v| (v.name.as_str(), &v.id)).collect();
            let mut ported = BTreeSet::new();
            for p in ports {
                if !p.evio_owned || p.network.as_deref() != Some(net.name()) {
                    continue;
                }
                ported.insert(p.name.as_str());
                let pid =
                    p.id.as_ref()
                        .map(fmt_id)
                        .unwrap_or_else(|| "<no identity>".into());
                match link_names.get(p.name.as_str()) {
                    None => f.add(
                        Kind::PortWithoutLink,
                        p.name.clone(),
                        format!("evio port of {pid} but no such host veth of this network"),
                    ),
                    Some(id) if p.id.as_ref() != Some(*id) => f.add(
                        Kind::PortIdentityMismatch,
                        p.name.clone(),
                        format!("port says {pid}, host veth says {}", fmt_id(id)),
                    ),
                    Some(_) => {}
                }
                if let Some(err) = &p.error {
                    f.add(
                        Kind::PortNotAttached,
                        p.name.clone(),
                        format!("ovs-vswitchd cannot use it: {err}"),
                    );
                } else if p.ofport == Some(-1) {
                    f.add(
                        Kind::PortNotAttached,
                        p.name.clone(),
                        "ovs-vswitchd failed to attach it (ofport -1)".to_string(),
                    );
                }
            }
            for v in &inv.veths {
                if !ported.contains(v.name.as_str()) {
                    link_without_port(f, v, "is not a port of OVS bridge", &net.conf.bridge);
                }
            }
        }
    }
}

fn link_without_port(f: &mut Findings, v: &Veth, why: &str, bridge: &str) {
    let detail = format!("host veth of {} {why} {bridge}", fmt_id(&v.id));
    f.add(Kind::LinkWithoutPort, v.name.clone(), detail);
}

/// The bridge, when pods depend on it: present, up, holding the gateway.
fn check_bridge(f: &mut Findings, net: &Network, inv: &Inventory) {
    if !inv.veths.is_empty() {
        match &inv.bridge {
            None => f.add(
                Kind::BridgeBroken,
                net.conf.bridge.clone(),
                format!(
                    "{} pod(s) attached but the bridge is missing",
                    inv.veths.len()
                ),
            ),
            Some(b) => {
                if !b.up {
                    f.add(
                        Kind::BridgeBroken,
                        b.name.clone(),
                        "pods are attached but the bridge is down (after an ovs-vswitchd \
                         restart: the next ADD brings it up)"
                            .to_string(),
                    );
                }
                if net.conf.is_gateway && net.conf.bridge_ipv4.is_none() {
                    for r in &net.ranges {
                        let want = IpNet::new(r.gateway, r.subnet.prefix_len()).ok();
                        if let Some(want) = want {
                            if !b.addresses.contains(&want) {
                                f.add(
                                    Kind::BridgeBroken,
                                    b.name.clone(),
                                    format!("gateway {want} is not on the bridge"),
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

/// kube-proxy's NAT can be reversed for pods: the bridge netfilter module
/// and options (Linux bridge), evio's conntrack flows (OVS).
fn check_services(f: &mut Findings, net: &Network, inv: &Inventory) {
    let bridge = net.conf.bridge.clone();
    // Off or missing hurts only once pods use the bridge (the next ADD
    // repairs it); a kernel without bridge netfilter always matters.
    let pods = !inv.veths.is_empty();
    match &inv.services {
        ServicesPath::NoBridge => {}
        ServicesPath::Linux { netfilter: false, .. } => f.add(
            Kind::ServicesBroken,
            bridge,
            evio_plugin::switch::linux::NO_BRIDGE_NETFILTER.to_string(),
        ),
        ServicesPath::Linux {
            nf_call_iptables,
            nf_call_ip6tables,
            ..
        } => {
            if pods && (*nf_call_iptables != Some(true) || *nf_call_ip6tables != Some(true)) {
                f.add(
                    Kind::ServicesBroken,
                    bridge,
                    format!(
                        "nf_call_iptables {nf_call_iptables:?}, nf_call_ip6tables {nf_call_ip6tables:?}:                          Service replies between pods bypass the host's conntrack                          (`evio-node run` or the next ADD turns them on)"
                    ),
                );
            }
        }
        ServicesPath::Flows { missing, extra } if pods && (*missing > 0 || *extra > 0) => f.add(
            Kind::ServicesBroken,
            bridge,
            format!(
                "{missing} of evio's OpenFlow flows missing or altered, {extra} stray                  (cookie 0x6576696f...): Service replies between pods bypass the host's                  conntrack (`evio-node run` or the next ADD restores them)"
            ),
        ),
        ServicesPath::Flows { .. } => {}
        ServicesPath::Unavailable { why } if pods => f.add(
            Kind::Unverifiable,
            bridge,
            format!("cannot read evio's OpenFlow flows: {why}"),
        ),
        ServicesPath::Unavailable { .. } => {}
    }
}

/// Masquerading matches `ipMasq` and the pod CIDR.
fn check_masquerade(f: &mut Findings, net: &Network, inv: &Inventory) {
    let want_masq: BTreeSet<IpNet> = net.ranges.iter().map(|r| r.subnet.trunc()).collect();
    match &inv.masquerade {
        Masquerade::Unavailable(why) => f.add(
            Kind::Unverifiable,
            "masquerade".into(),
            format!("cannot read nftables: {why}"),
        ),
        Masquerade::Present(cidrs) if !net.conf.ip_masq => f.add(
            Kind::MasqueradeStale,
            "masquerade".into(),
            format!("chain with {cidrs:?} exists but ipMasq is off"),
        ),
        Masquerade::Present(cidrs) => {
            let have: BTreeSet<IpNet> = cidrs.iter().map(IpNet::trunc).collect();
            if !inv.veths.is_empty() && have != want_masq {
                f.add(
                    Kind::MasqueradeMissing,
                    "masquerade".into(),
                    format!("chain masquerades {have:?}, pods need {want_masq:?}"),
                );
            }
        }
        Masquerade::Absent => {
            if net.conf.ip_masq && !inv.veths.is_empty() {
                f.add(
                    Kind::MasqueradeMissing,
                    "masquerade".into(),
                    format!(
                        "ipMasq is on and {} pod(s) are attached, but there is no chain",
                        inv.veths.len()
                    ),
                );
            }
        }
    }
}

/// The runtime's view: what it lists as valid holds state, and nothing else does.
fn check_runtime_view(
    f: &mut Findings,
    net: &Network,
    inv: &Inventory,
    valid: &BTreeSet<AttachmentId>,
) {
    let held = attachments(inv, net.name());
    for (id, st) in &held {
        let live = valid.contains(id) || (id.1.is_empty() && valid.iter().any(|(c, _)| *c == id.0));
        if !live {
            f.add(Kind::StaleAttachment, fmt_id(id), describe(st));
        }
    }
    for id in valid {
        let has = held.get(id).is_some_and(|s| !s.is_empty())
            || held.contains_key(&(id.0.clone(), String::new()));
        if !has {
            f.add(
                Kind::MissingAttachment,
                fmt_id(id),
                "listed as valid but evio holds nothing for it".into(),
            );
        }
    }
}

/// The store's view: it has a subnet for this node, the one the config's
/// range was derived from.
fn check_store_view(f: &mut Findings, net: &Network, s: &StoreView) {
    match s.subnet {
        None => f.add(
            Kind::StoreNoRecord,
            s.node.clone(),
            format!("{} has no subnet for this node", s.store),
        ),
        Some(subnet) => {
            if let Some(why) = store_mismatch(net, subnet) {
                f.add(
                    Kind::StoreMismatch,
                    s.node.clone(),
                    format!("{} says {subnet}, but {why}", s.store),
                );
            }
        }
    }
}

fn describe(st: &AttachmentState) -> String {
    let mut parts = Vec::new();
    if !st.ips.is_empty() {
        let ips: Vec<String> = st.ips.iter().map(ToString::to_string).collect();
        parts.push(format!("addresses {}", ips.join(", ")));
    }
    if let Some(v) = &st.veth {
        parts.push(format!("host veth {v}"));
    }
    if let Some(p) = &st.port {
        parts.push(format!("OVS port {p}"));
    }
    format!("not a valid attachment, yet holds {}", parts.join(", "))
}

/// Why the config's range of the subnet's family is not the one
/// `evio-node config-gen` derives from `subnet`, if it is not.
pub fn store_mismatch(net: &Network, subnet: IpNet) -> Option<String> {
    let subnet = subnet.trunc();
    let Some(r) = net
        .ranges
        .iter()
        .find(|r| r.start.is_ipv4() == subnet.addr().is_ipv4())
    else {
        return Some(format!(
            "{} has no IPv{} range",
            net.source.display(),
            if subnet.addr().is_ipv4() { 4 } else { 6 }
        ));
    };
    // The pod CIDR is the range's subnet and the node prefix the store's:
    // evio-subnet's layout says which node subnet it is and what its
    // gateway and pod range are.
    let pod_prefix = r.subnet.prefix_len();
    let node_bits = u32::from(subnet.prefix_len().saturating_sub(pod_prefix));
    let Some(ns) = PodNetwork::new(r.subnet.trunc(), node_bits)
        .ok()
        .and_then(|pod| pod.node(pod.index_of(&subnet)?).ok())
    else {
        return Some(format!(
            "{} has pod CIDR {}, of which {subnet} is not a node subnet",
            net.source.display(),
            r.subnet.trunc()
        ));
    };
    let (gateway, start, end) = (ns.gateway, ns.range_start, ns.range_end);
    if r.gateway == gateway && r.start == start && r.end == end {
        return None;
    }
    Some(format!(
        "{} has range {}-{} gateway {} (expected {start}-{end} gateway {gateway})",
        net.source.display(),
        r.start,
        r.end,
        r.gateway
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collect::{Allocation, Bridge, Port, Veth};
    use crate::conf::networks_in;
    use serde_json::json;
    use std::path::Path;

    fn net(bridge_type: &str, masq: bool) -> Network {
        let c = json!({
            "cniVersion": "1.1.0", "name": "n1", "type": "evio", "bridge": "br0",
            "bridgeType": bridge_type, "ipMasq": masq,
            "ipam": {"type": "host-local", "dataDir": "/d",
                     "ranges": [[{"subnet": "10.244.0.0/16", "rangeStart": "10.244.3.2",
                                  "rangeEnd": "10.244.3.254", "gateway": "10.244.3.1"}]]},
        });
        networks_in(Path::new("c.conf"), &serde_json::to_vec(&c).unwrap())
            .unwrap()
            .remove(0)
    }

    fn id(c: &str) -> AttachmentId {
        (c.to_string(), "eth0".to_string())
    }

    fn alloc(ip: &str, c: &str) -> Allocation {
        Allocation {
            ip: ip.parse().unwrap(),
            container_id: c.into(),
            ifname: Some("eth0".into()),
        }
    }

    fn veth(c: &str, master: Option<&str>) -> Veth {
        Veth {
            name: host_veth_name(c, "eth0"),
            id: id(c),
            master: master.map(str::to_string),
            up: true,
        }
    }

    fn port(c: &str) -> Port {
        Port {
            name: host_veth_name(c, "eth0"),
            evio_owned: true,
            network: Some("n1".into()),
            id: Some(id(c)),
            ofport: Some(3),
            error: None,
        }
    }

    fn bridge() -> Option<Bridge> {
        Some(Bridge {
            name: "br0".into(),
            kind: Some("bridge".into()),
            up: true,
            addresses: vec!["10.244.3.1/16".parse().unwrap()],
        })
    }

    fn healthy_linux() -> Inventory {
        Inventory {
            allocations: vec![alloc("10.244.3.2", "a"), alloc("10.244.3.3", "b")],
            veths: vec![veth("a", Some("br0")), veth("b", Some("br0"))],
            untagged: vec![],
            bridge: bridge(),
            ports: Ports::NotOvs,
            masquerade: Masquerade::Absent,
            services: ServicesPath::Linux {
                netfilter: true,
                nf_call_iptables: Some(true),
                nf_call_ip6tables: Some(true),
            },
        }
    }

    #[test]
    fn services_path_problems_name_the_fix() {
        let n = net("linux", false);
        let mut inv = healthy_linux();
        inv.services = ServicesPath::Linux {
            netfilter: false,
            nf_call_iptables: None,
            nf_call_ip6tables: None,
        };
        let p = diagnose(&n, &inv, None, None);
        assert_eq!(kinds(&p), [Kind::ServicesBroken]);
        assert!(
            p[0].detail.contains("modprobe br_netfilter"),
            "{}",
            p[0].detail
        );
        inv.services = ServicesPath::Linux {
            netfilter: true,
            nf_call_iptables: Some(true),
            nf_call_ip6tables: Some(false),
        };
        assert_eq!(
            kinds(&diagnose(&n, &inv, None, None)),
            [Kind::ServicesBroken]
        );
        inv.services = ServicesPath::Flows {
            missing: 2,
            extra: 0,
        };
        assert_eq!(
            kinds(&diagnose(&n, &inv, None, None)),
            [Kind::ServicesBroken]
        );
        inv.services = ServicesPath::Flows {
            missing: 0,
            extra: 0,
        };
        assert!(diagnose(&n, &inv, None, None).is_empty());
        inv.services = ServicesPath::NoBridge;
        assert!(diagnose(&n, &inv, None, None).is_empty());
    }

    fn kinds(p: &[Problem]) -> Vec<Kind> {
        p.iter().map(|p| p.kind).collect()
    }

    #[test]
    fn healthy_node_has_no_problem() {
        let n = net("linux", false);
        let valid: BTreeSet<_> = [id("a"), id("b")].into();
        assert_eq!(
            diagnose(&n, &healthy_linux(), Some(&valid), None),
            Vec::new()
        );
        let mut inv = healthy_linux();
        inv.ports = Ports::Listed(vec![port("a"), port("b")]);
        inv.masquerade = Masquerade::Present(vec!["10.244.0.0/16".parse().unwrap()]);
        assert_eq!(
            diagnose(&net("ovs", true), &inv, Some(&valid), None),
            vec![]
        );
    }

    #[test]
    fn orphans_on_each_side_are_found() {
        let n = net("linux", false);
        let mut inv = healthy_linux();
        inv.allocations.push(alloc("10.244.3.9", "gone"));
        inv.allocations.push(Allocation {
            ip: "10.244.3.10".parse().unwrap(),
            container_id: String::new(),
            ifname: None,
        });
        inv.allocations.push(alloc("10.244.9.9", "a2"));
        inv.veths.push(veth("noip", Some("br0")));
        inv.veths.push(veth("loose", None));
        inv.allocations.push(alloc("10.244.3.11", "loose"));
        inv.untagged.push("ev0000000000000".into());
        let k = kinds(&diagnose(&n, &inv, None, None));
        for want in [
            Kind::AllocationWithoutVeth,
            Kind::AllocationWithoutOwner,
            Kind::AllocationOutOfRange,
            Kind::VethWithoutAllocation,
            Kind::VethNotOnBridge,
            Kind::UntaggedVeth,
        ] {
            assert!(k.contains(&want), "{want} missing from {k:?}");
        }
    }

    #[test]
    fn ovs_ports_and_links_are_reconciled() {
        let n = net("ovs", false);
        let mut inv = healthy_linux();
        let mut foreign = port("x");
        foreign.evio_owned = false;
        let mut other_net = port("y");
        other_net.network = Some("n2".into());
        let mut wrong = port("b");
        wrong.id = Some(id("z"));
        let mut failed = port("a");
        failed.ofport = Some(-1);
        inv.ports = Ports::Listed(vec![failed, wrong, port("ghost"), foreign, other_net]);
        inv.veths.push(veth("c", None));
        inv.allocations.push(alloc("10.244.3.4", "c"));
        let p = diagnose(&n, &inv, None, None);
        let k = kinds(&p);
        assert_eq!(
            k,
            vec![
                Kind::PortWithoutLink,
                Kind::LinkWithoutPort,
                Kind::PortIdentityMismatch,
                Kind::PortNotAttached,
            ],
            "{p:#?}"
        );
        inv.ports = Ports::Unavailable("refused".into());
        assert_eq!(
            kinds(&diagnose(&n, &inv, None, None)),
            vec![Kind::Unverifiable]
        );
    }

    #[test]
    fn valid_attachments_mark_stale_and_missing() {
        let n = net("linux", false);
        let valid: BTreeSet<_> = [id("a"), id("c")].into();
        let p = diagnose(&n, &healthy_linux(), Some(&valid), None);
        assert_eq!(
            kinds(&p),
            vec![Kind::StaleAttachment, Kind::MissingAttachment],
            "{p:#?}"
        );
        assert_eq!(p[0].subject, "b/eth0");
        assert_eq!(p[1].subject, "c/eth0");
    }

    #[test]
    fn masquerade_rules() {
        let mut inv = healthy_linux();
        assert_eq!(
            kinds(&diagnose(&net("linux", true), &inv, None, None)),
            vec![Kind::MasqueradeMissing]
        );
        inv.masquerade = Masquerade::Present(vec!["10.99.0.0/16".parse().unwrap()]);
        assert_eq!(
            kinds(&diagnose(&net("linux", true), &inv, None, None)),
            vec![Kind::MasqueradeMissing]
        );
        assert_eq!(
            kinds(&diagnose(&net("linux", false), &inv, None, None)),
            vec![Kind::MasqueradeStale]
        );
        // No pods: a leftover chain is per-network state, like the bridge.
        inv.veths.clear();
        inv.allocations.clear();
        inv.masquerade = Masquerade::Present(vec!["10.244.0.0/16".parse().unwrap()]);
        assert!(diagnose(&net("linux", true), &inv, None, None).is_empty());
    }

    #[test]
    fn bridge_state_matters_only_with_pods() {
        let n = net("ovs", false);
        let mut inv = healthy_linux();
        inv.ports = Ports::Listed(vec![port("a"), port("b")]);
        if let Some(b) = inv.bridge.as_mut() {
            b.up = false;
            b.addresses.clear();
        }
        assert_eq!(
            kinds(&diagnose(&n, &inv, None, None)),
            vec![Kind::BridgeBroken, Kind::BridgeBroken]
        );
        inv.bridge = None;
        assert_eq!(
            kinds(&diagnose(&n, &inv, None, None)),
            vec![Kind::BridgeBroken]
        );
        inv.veths.clear();
        inv.allocations.clear();
        inv.ports = Ports::Listed(vec![]);
        assert!(diagnose(&n, &inv, None, None).is_empty());
    }

    #[test]
    fn store_view_is_compared_with_the_range() {
        let n = net("linux", false);
        let view = |s: Option<&str>| StoreView {
            node: "node1".into(),
            store: "file:///x".into(),
            subnet: s.map(|s| s.parse().unwrap()),
        };
        let inv = healthy_linux();
        assert!(diagnose(&n, &inv, None, Some(&view(Some("10.244.3.0/24")))).is_empty());
        assert_eq!(
            kinds(&diagnose(
                &n,
                &inv,
                None,
                Some(&view(Some("10.244.4.0/24")))
            )),
            vec![Kind::StoreMismatch]
        );
        assert_eq!(
            kinds(&diagnose(&n, &inv, None, Some(&view(Some("fd00::/64"))))),
            vec![Kind::StoreMismatch]
        );
        assert_eq!(
            kinds(&diagnose(&n, &inv, None, Some(&view(None)))),
            vec![Kind::StoreNoRecord]
        );
    }

    #[test]
    fn duplicate_and_renamed() {
        let n = net("linux", false);
        let mut inv = healthy_linux();
        inv.allocations.push(alloc("10.244.3.20", "a"));
        inv.veths[1].name = "ev0000000000001".into();
        let k = kinds(&diagnose(&n, &inv, None, None));
        assert_eq!(k, vec![Kind::DuplicateAllocation, Kind::VethNameMismatch]);
    }
}
