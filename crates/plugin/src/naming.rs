//! Names and tags derived from the attachment identity (container ID +
//! ifname). Everything the plugin creates on the host can be found again from
//! that identity alone, so DEL and GC work when the pod's netns is gone and
//! after a crash at any point of ADD. The doctor and evio-node read the same
//! rules from here.

use std::net::IpAddr;

use evio_net::Link;

/// Longest container ID we accept: the host veth's alias carries it and the
/// kernel caps aliases at 255 bytes.
pub const MAX_CONTAINER_ID: usize = 200;

/// Longest alias the kernel keeps on a link (IFALIASZ - 1).
pub const MAX_ALIAS: usize = 255;

/// What every alias evio puts on a host veth starts with.
pub const ALIAS_PREFIX: &str = "evio|";

/// Host veth names: this prefix and [`HOST_VETH_HEX`] lowercase hex digits.
const HOST_VETH_PREFIX: &str = "ev";
const HOST_VETH_HEX: usize = 13;

/// Host end of the pod's veth: `ev` + 13 hex digits of a 64-bit FNV-1a hash
/// of the identity (15 bytes, the kernel's limit). Deterministic, so DEL
/// needs no state; 52 bits make a collision between two live pods on one
/// node practically impossible.
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    let identity = [container_id.as_bytes(), &[0], ifname.as_bytes()].concat();
    let h = evio_net::fnv1a(identity);
    format!("{HOST_VETH_PREFIX}{:013x}", h >> (64 - 4 * HOST_VETH_HEX))
}

/// The pod's MAC, derived from its address so that any node can answer ARP
/// for any pod and a pod given a freed address also gets the previous
/// owner's MAC (neighbours' caches stay right). The derivation is the
/// overlay's (`evio_overlay::packet::pod_mac`, `pod_mac_v6`), the one the
/// switch checks frames against: one function, so the plugin and the switch
/// cannot drift apart.
pub fn pod_mac(ip: IpAddr) -> [u8; 6] {
    match ip {
        IpAddr::V4(a) => evio_overlay::packet::pod_mac(a),
        IpAddr::V6(a) => evio_overlay::packet::pod_mac_v6(a),
    }
}

/// Whether `name` has exactly the shape [`host_veth_name`] produces: `ev`
/// and 13 lowercase hex digits, nothing else.
pub fn is_host_veth_name(name: &str) -> bool {
    name.len() == HOST_VETH_PREFIX.len() + HOST_VETH_HEX
        && name.starts_with(HOST_VETH_PREFIX)
        && name[HOST_VETH_PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The alias put on the host veth at creation. GC finds evio's veths of a
/// network by it; the fields cannot contain `|` (container IDs, ifnames and
/// network names are validated before).
pub fn alias(network: &str, container_id: &str, ifname: &str) -> String {
    format!("{ALIAS_PREFIX}{network}|{container_id}|{ifname}")
}

/// The prefix of every alias of `network`'s host veths.
pub fn network_alias_prefix(network: &str) -> String {
    format!("{ALIAS_PREFIX}{network}|")
}

/// The identity in an alias written by [`alias`] for `network`.
pub fn parse_alias<'a>(alias: &'a str, network: &str) -> Option<(&'a str, &'a str)> {
    let rest = alias.strip_prefix(ALIAS_PREFIX)?.strip_prefix(network)?;
    let rest = rest.strip_prefix('|')?;
    let (cid, ifname) = rest.split_once('|')?;
    Some((cid, ifname))
}

/// A host veth evio made, as GC and the doctor see it.
#[derive(Debug, PartialEq, Eq)]
pub enum HostVeth<'a> {
    /// Tagged for this network, with its attachment identity.
    Tagged(&'a str, &'a str),
    /// Made by an ADD that stopped between creating the pair and tagging
    /// it: the alias cannot be set in the creating message (the kernel
    /// ignores IFLA_IFALIAS there), so this window cannot be closed at
    /// creation; GC closes it by attributing the veth by its name.
    Untagged,
}

/// Whether `link` is evio's host veth of `network`: what GC removes when
/// its attachment is not valid, and what the doctor checks.
///
/// Untagged ones are recognised by name alone, so the test is strict: a veth,
/// named exactly `ev` + 13 lowercase hex digits, with no alias at all and on
/// no bridge. ADD tags the veth right after creating it and plugs it in only
/// later, so evio's untagged veths are never ports of anything; foreign
/// interfaces that merely look similar (other name shapes such as Docker's
/// `veth` + 7 hex or the bridge plugin's `veth` + 8, any alias, a master,
/// another kind) are never touched. What is left is a foreign tool naming an
/// unplugged, untagged veth in evio's own format, which only imitation does;
/// and two evio names colliding needs two identities with the same 52-bit
/// hash on one node. Which network an untagged veth was for is unknown: any
/// network's GC removes it, which is right because no attachment whose ADD
/// succeeded has one (an ADD racing with GC in that microsecond window fails
/// at tagging and rolls back, so the runtime sees an error, never a half pod).
pub fn host_veth_of<'a>(link: &'a Link, network: &str) -> Option<HostVeth<'a>> {
    match link.alias.as_deref() {
        Some(alias) => parse_alias(alias, network).map(|(c, i)| HostVeth::Tagged(c, i)),
        None if link.kind.as_deref() == Some("veth")
            && link.master.is_none()
            && is_host_veth_name(&link.name) =>
        {
            Some(HostVeth::Untagged)
        }
        None => None,
    }
}

/// OVS `external_ids` keys on the ports evio owns.
pub mod ovs_ids {
    pub const OWNER: &str = "evio-owner";
    pub const OWNER_VALUE: &str = "evio";
    /// The agent's own port (its TAP): distinct from [`OWNER_VALUE`] so
    /// that the plugin's DEL and GC keep their hands off it.
    pub const OWNER_AGENT: &str = "evio-agent";
    pub const NETWORK: &str = "evio-network";
    pub const CONTAINER_ID: &str = "evio-container-id";
    pub const IFNAME: &str = "evio-ifname";
    pub const NETNS: &str = "evio-netns";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_name_is_stable_short_and_distinct() {
        let a = host_veth_name("abc", "eth0");
        assert_eq!(a, host_veth_name("abc", "eth0"));
        assert_eq!(a.len(), 15);
        assert!(a.starts_with("ev"));
        assert_ne!(a, host_veth_name("abc", "eth1"));
        assert_ne!(a, host_veth_name("abd", "eth0"));
        // The separator keeps ("ab","ceth0") and ("abc","eth0") apart.
        assert_ne!(host_veth_name("ab", "ceth0"), a);
        let names: std::collections::HashSet<_> = (0..5000)
            .map(|i| host_veth_name(&format!("c{i}"), "eth0"))
            .collect();
        assert_eq!(names.len(), 5000);
    }

    /// Names on live nodes were made by the previous code: the shared hash
    /// must give exactly the same ones.
    #[test]
    fn host_name_is_unchanged_from_earlier_releases() {
        assert_eq!(host_veth_name("abc", "eth0"), "ev540c4ae81be81");
    }

    #[test]
    fn host_veth_shape() {
        assert!(is_host_veth_name(&host_veth_name("abc", "eth0")));
        assert!(is_host_veth_name("ev0123456789abc"));
        assert!(!is_host_veth_name("ev0123456789abC"));
        assert!(!is_host_veth_name("ev0123456789ab"));
        assert!(!is_host_veth_name("ev0123456789abcd"));
        assert!(!is_host_veth_name("eth0"));
        assert!(!is_host_veth_name("evio0"));
        assert!(!is_host_veth_name("ex0123456789abc"));
    }

    #[test]
    fn alias_roundtrip_is_per_network() {
        let a = alias("net1", "cid", "eth0");
        assert!(a.starts_with(&network_alias_prefix("net1")));
        assert_eq!(parse_alias(&a, "net1"), Some(("cid", "eth0")));
        assert_eq!(parse_alias(&a, "net"), None);
        assert_eq!(parse_alias(&a, "net12"), None);
        assert_eq!(parse_alias("something else", "net1"), None);
    }

    fn link(name: &str, kind: &str, alias: Option<&str>, master: Option<u32>) -> Link {
        Link {
            index: 7,
            name: name.into(),
            kind: Some(kind.into()),
            mac: None,
            mtu: 1500,
            up: false,
            master,
            alias: alias.map(Into::into),
            bridge_nf: None,
        }
    }

    #[test]
    fn which_links_are_evio_host_veths() {
        let ours = host_veth_name("cid", "eth0");
        let tagged = alias("net1", "cid", "eth0");
        assert_eq!(
            host_veth_of(&link(&ours, "veth", Some(&tagged), Some(3)), "net1"),
            Some(HostVeth::Tagged("cid", "eth0"))
        );
        // Another network's veth is that network's business.
        assert_eq!(
            host_veth_of(&link(&ours, "veth", Some(&tagged), None), "net2"),
            None
        );
        assert_eq!(
            host_veth_of(&link(&ours, "veth", None, None), "net1"),
            Some(HostVeth::Untagged)
        );
        // Look-alikes: a foreign alias, a master, another kind, another shape.
        for foreign in [
            link(&ours, "veth", Some("docker"), None),
            link(&ours, "veth", None, Some(3)),
            link(&ours, "dummy", None, None),
            link("ev0123456789ABC", "veth", None, None),
            link("ev0123456789abcd", "veth", None, None),
            link("veth0123abc", "veth", None, None),
        ] {
            assert_eq!(host_veth_of(&foreign, "net1"), None, "{foreign:?}");
        }
    }
}
