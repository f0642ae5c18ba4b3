//! Replies from this host's host-overlay address to pods of other nodes go
//! back through the host overlay, not over the pods' L2 segment.
//!
//! Why: a pod on node A reaches a Service whose endpoint is this host's
//! host-overlay address (a hostNetwork pod, the API server behind the
//! `kubernetes` Service). Node A DNATs the ClusterIP and routes the packet
//! here through the host overlay, with the pod's own source address. The
//! main table would send the reply out of the bridge (the whole pod CIDR
//! is on-link there) straight to the pod, past node A's conntrack, and the
//! pod would drop a reply from an address it never talked to.
//!
//! So one policy rule, `from <host address> to <pod CIDR> lookup`
//! [`TABLE`], and in that table the pod CIDR minus this node's own subnet
//! through the host-overlay interface: at most `nodeBits` routes, computed
//! from the two prefixes alone, so nodes joining later are covered and
//! nothing follows the peer list. Everything else (pods among themselves,
//! the host's other traffic to pods, which leaves from the gateway address)
//! is untouched. The routes go with the interface when the agent exits; the
//! rule is removed on SIGTERM (and by `evio-node uninstall`), and one left
//! by a killed agent points at an empty table, which changes nothing.

use evio_net::{Handle, Route, Rule};
use ipnet::IpNet;

use crate::AgentError;

/// evio's routing table ("e710").
pub const TABLE: u32 = 0xe710;
/// Before the main table (32766), after the local one (0).
pub const PRIORITY: u32 = 31000;

/// `cidr` without `hole`: the largest blocks covering the rest, one per
/// prefix length between them (none if `hole` is not inside `cidr`).
pub fn without(cidr: IpNet, hole: IpNet) -> Vec<IpNet> {
    let (cidr, hole) = (cidr.trunc(), hole.trunc());
    if !cidr.contains(&hole) || hole.prefix_len() <= cidr.prefix_len() {
        return if cidr.contains(&hole) {
            Vec::new()
        } else {
            vec![cidr]
        };
    }
    let mut out = Vec::new();
    for len in cidr.prefix_len() + 1..=hole.prefix_len() {
        // The sibling of the hole's ancestor at this length.
        let Ok(ancestor) = IpNet::new(hole.addr(), len).map(|n| n.trunc()) else {
            continue;
        };
        let Ok(parent) = IpNet::new(hole.addr(), len - 1).map(|n| n.trunc()) else {
            continue;
        };
        if let Some(sibling) = parent
            .subnets(len)
            .ok()
            .and_then(|mut s| s.find(|n| *n != ancestor))
        {
            out.push(sibling);
        }
    }
    out
}

/// The rule for `host_addr` and `pod_cidr`, if they are of one family.
pub fn rule(host_addr: IpNet, pod_cidr: IpNet) -> Option<Rule> {
    (host_addr.addr().is_ipv4() == pod_cidr.addr().is_ipv4()).then(|| Rule {
        src: IpNet::new(host_addr.addr(), host_addr.max_prefix_len()).ok(),
        dst: Some(pod_cidr.trunc()),
        table: TABLE,
        priority: PRIORITY,
    })
}

/// Installs the routes through interface `tun` and the rule. Idempotent.
pub fn install(
    host: &mut Handle,
    tun: u32,
    host_addr: IpNet,
    pod_cidr: IpNet,
    pod_subnet: IpNet,
) -> Result<(), AgentError> {
    let Some(rule) = rule(host_addr, pod_cidr) else {
        return Ok(());
    };
    for dst in without(pod_cidr, pod_subnet) {
        let route = Route {
            oif: Some(tun),
            scope_link: true,
            ..Route::new(dst)
        };
        match host.add_route_in(TABLE, &route) {
            Ok(()) => {}
            Err(e) if e.is_exists() => {}
            Err(e) => return Err(AgentError::net(format!("route {dst} table {TABLE}"))(e)),
        }
    }
    let family = evio_net::Family::of(&host_addr.addr());
    let have = host.rules(family).map_err(AgentError::net("list rules"))?;
    if !have.contains(&rule) {
        match host.add_rule(&rule) {
            Ok(()) => {}
            Err(e) if e.is_exists() => {}
            Err(e) => return Err(AgentError::net(format!("rule {rule:?}"))(e)),
        }
    }
    Ok(())
}

/// Removes the rule (the routes leave with the interface).
pub fn remove(host: &mut Handle, host_addr: IpNet, pod_cidr: IpNet) -> Result<(), AgentError> {
    let Some(rule) = rule(host_addr, pod_cidr) else {
        return Ok(());
    };
    match host.del_rule(&rule) {
        Ok(()) => Ok(()),
        Err(e) if e.is_not_found() => Ok(()),
        Err(e) => Err(AgentError::net(format!("remove rule {rule:?}"))(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn the_pod_cidr_without_this_nodes_subnet() {
        let got = without(n("10.244.0.0/16"), n("10.244.3.0/24"));
        assert_eq!(got.len(), 8);
        for a in [
            "10.244.0.1",
            "10.244.2.9",
            "10.244.4.1",
            "10.244.255.1",
            "10.244.128.0",
        ] {
            let ip: std::net::IpAddr = a.parse().unwrap();
            assert_eq!(got.iter().filter(|g| g.contains(&ip)).count(), 1, "{a}");
        }
        let own: std::net::IpAddr = "10.244.3.7".parse().unwrap();
        assert!(!got.iter().any(|g| g.contains(&own)));
        // Blocks never overlap.
        for (i, a) in got.iter().enumerate() {
            for b in &got[i + 1..] {
                assert!(!a.contains(b) && !b.contains(a), "{a} {b}");
            }
        }
        let v6 = without(n("fd00:10::/56"), n("fd00:10:0:5::/64"));
        assert_eq!(v6.len(), 8);
        assert!(v6
            .iter()
            .any(|g| g.contains(&"fd00:10:0:ff::1".parse::<std::net::IpAddr>().unwrap())));
        assert_eq!(without(n("10.244.0.0/16"), n("10.244.0.0/16")), vec![]);
        assert_eq!(
            without(n("10.244.0.0/16"), n("10.9.0.0/24")),
            vec![n("10.244.0.0/16")]
        );
    }

    #[test]
    fn rule_only_within_one_family() {
        let r = rule(n("10.10.0.2/16"), n("10.244.0.0/16")).unwrap();
        assert_eq!(r.src, Some(n("10.10.0.2/32")));
        assert_eq!(r.dst, Some(n("10.244.0.0/16")));
        assert!(rule(n("10.10.0.2/16"), n("fd00:10::/56")).is_none());
    }
}
