//! The overlay's keys of one network as this process last saw them: loaded
//! by one range read, then kept current by the events of one watch. An
//! agent so reads the whole network once and afterwards only what changed
//! (O(n) events for a cluster of n joining nodes, not a re-read of all n
//! records per event, which made a join cost O(n²) reads per agent).
//!
//! Pure bookkeeping over keys and values, so it is tested without etcd.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::{Alive, PeerRecord, PeerSnapshot, Released};

/// The kinds of key under `/evio/<network>/` the overlay follows.
pub(crate) const KINDS: [&str; 6] = [
    "peers",
    "alive",
    "nodes",
    "hostnodes",
    "hostnodes6",
    "released",
];

#[derive(Debug, Clone, Default)]
pub(crate) struct Mirror {
    /// `/evio/<network>/`.
    root: String,
    /// The etcd revision everything here is current at.
    pub(crate) rev: i64,
    records: BTreeMap<String, PeerRecord>,
    live: BTreeMap<String, Alive>,
    subnets: BTreeMap<String, IpNet>,
    hosts: BTreeMap<String, IpAddr>,
    hosts6: BTreeMap<String, IpAddr>,
    released: BTreeMap<String, Released>,
}

impl Mirror {
    pub(crate) fn new(network: &str, rev: i64) -> Mirror {
        Mirror {
            root: format!("/evio/{network}/"),
            rev,
            ..Mirror::default()
        }
    }

    /// Takes a put (`Some(value)`) or a delete (`None`) of `key`. Keys of
    /// other kinds or networks are ignored; a value that does not parse
    /// counts as absent (the agent that owns it rewrites it), as in a read.
    pub(crate) fn apply(&mut self, key: &[u8], value: Option<&[u8]>) {
        let Some((kind, node)) = std::str::from_utf8(key)
            .ok()
            .and_then(|k| k.strip_prefix(self.root.as_str()))
            .and_then(|k| k.split_once('/'))
            .filter(|(_, n)| !n.is_empty() && !n.contains('/'))
        else {
            return;
        };
        let node = node.to_string();
        let text = || value.and_then(|v| std::str::from_utf8(v).ok());
        match kind {
            "peers" => set(
                &mut self.records,
                node.clone(),
                value
                    .and_then(|v| serde_json::from_slice::<PeerRecord>(v).ok())
                    .filter(|r| r.node == node),
            ),
            "alive" => set(
                &mut self.live,
                node,
                value.and_then(|v| serde_json::from_slice(v).ok()),
            ),
            "nodes" => set(&mut self.subnets, node, text().and_then(|v| v.parse().ok())),
            "hostnodes" => set(&mut self.hosts, node, text().and_then(|v| v.parse().ok())),
            "hostnodes6" => set(&mut self.hosts6, node, text().and_then(|v| v.parse().ok())),
            "released" => set(
                &mut self.released,
                node,
                value.and_then(|v| serde_json::from_slice(v).ok()),
            ),
            _ => {}
        }
    }

    /// What the overlay reads: liveness without a record is a leftover of
    /// a node that left, and is not shown.
    pub(crate) fn snapshot(&self) -> PeerSnapshot {
        let mut snap = PeerSnapshot {
            records: self.records.values().cloned().collect(),
            live: self.live.clone(),
            released: self.released.clone(),
            token: self.rev.max(0) as u128,
            ..PeerSnapshot::default()
        };
        snap.alloc.subnets = self.subnets.clone();
        snap.alloc.hosts = self.hosts.clone();
        snap.alloc.hosts6 = self.hosts6.clone();
        snap.live.retain(|n, _| self.records.contains_key(n));
        snap
    }
}

fn set<T>(m: &mut BTreeMap<String, T>, k: String, v: Option<T>) {
    match v {
        Some(v) => {
            m.insert(k, v);
        }
        None => {
            m.remove(&k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(node: &str) -> Vec<u8> {
        serde_json::to_vec(&PeerRecord {
            node: node.into(),
            public_key: "k".into(),
            host_address: None,
            host_addresses: Vec::new(),
            pod_subnet: "10.244.1.0/24".into(),
            endpoints: Vec::new(),
            candidates: Vec::new(),
            heartbeat: "2026-01-01T00:00:00Z".into(),
            extra: Default::default(),
        })
        .unwrap()
    }

    #[test]
    fn puts_and_deletes_follow_the_keys_and_others_are_ignored() {
        let mut m = Mirror::new("net", 5);
        m.apply(b"/evio/net/peers/a", Some(&rec("a")));
        m.apply(b"/evio/net/peers/b", Some(&rec("b")));
        m.apply(b"/evio/net/alive/a", Some(br#"{"heartbeat":"t"}"#));
        m.apply(b"/evio/net/nodes/a", Some(b"10.244.1.0/24"));
        m.apply(b"/evio/net/hostnodes/a", Some(b"10.10.0.1"));
        // Another network, a nested key, a record under the wrong name.
        m.apply(b"/evio/other/peers/c", Some(&rec("c")));
        m.apply(b"/evio/net/peers/x/y", Some(&rec("x")));
        m.apply(b"/evio/net/peers/d", Some(&rec("e")));
        let s = m.snapshot();
        let nodes: Vec<&str> = s.records.iter().map(|r| r.node.as_str()).collect();
        assert_eq!(nodes, ["a", "b"]);
        assert!(s.live.contains_key("a"));
        assert_eq!(s.alloc.subnets["a"].to_string(), "10.244.1.0/24");
        assert_eq!(s.alloc.hosts["a"].to_string(), "10.10.0.1");
        assert_eq!(s.token, 5);

        m.apply(b"/evio/net/peers/a", None);
        m.apply(b"/evio/net/peers/b", Some(b"not json"));
        let s = m.snapshot();
        assert!(s.records.is_empty(), "deleted, and unreadable");
        assert!(s.live.is_empty(), "liveness without a record is not shown");
        assert!(
            m.live.contains_key("a"),
            "but kept for when the record returns"
        );
    }
}
