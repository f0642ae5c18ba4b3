//! Names and tags derived from the attachment identity (container ID +
//! ifname). Everything the plugin creates on the host can be found again from
//! that identity alone, so DEL and GC work when the pod's netns is gone and
//! after a crash at any point of ADD.

/// Longest container ID we accept: the host veth's alias carries it and the
//  kernel caps aliases at 255 bytes.
pub const MAX_CONTAINER_ID: usize = 200;

/// Longest alias the kernel keeps on a link (IFALIASZ - 1).
pub const MAX_ALIAS: usize = 255;

/// Host end of the pod's veth: `ev` + 13 hex digits of a 64-bit FNV-1a hash
/// of the identity (15 bytes, the kernel's limit). Deterministic, so DEL
/// needs no state; 52 bits make a collision between two live pods on one
/// node practically impossible.
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in container_id
        .bytes()
        .chain(std::iter::once(0))
        .chain(ifname.bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("ev{:013x}", h >> 12)
}

/// The alias put on the host veth at creation. GC finds evio's veths of a
/// network by it; the fields cannot contain `|` (container IDs, ifnames and
/// network names are validated before).
pub fn alias(network: &str, container_id: &str, ifname: &str) -> String {
    format!("evio|{network}|{container_id}|{ifname}")
}

/// The identity in an alias written by [`alias`] for `network`.
pub fn parse_alias<'a>(alias: &'a str, network: &str) -> Option<(&'a str, &'a str)> {
    let rest = alias.strip_prefix("evio|")?.strip_prefix(network)?;
    let rest = rest.strip_prefix('|')?;
    let (cid, ifname) = rest.split_once('|')?;
    Some((cid, ifname))
}

/// OVS `external_ids` keys on the ports evio owns.
pub mod ovs_ids {
    pub const OWNER: &str = "evio-owner";
    pub const OWNER_VALUE: &str = "evio";
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

    #[test]
    fn alias_roundtrip_is_per_network() {
        let a = alias("net1", "cid", "eth0");
        assert_eq!(parse_alias(&a, "net1"), Some(("cid", "eth0")));
        assert_eq!(parse_alias(&a, "net"), None);
        assert_eq!(parse_alias(&a, "net12"), None);
        assert_eq!(parse_alias("something else", "net1"), None);
    }
}
