//! The simulator's IPv6 internet: sites get a routed prefix
//! 2001:db8:K::/64 (K = site + 1) beside their IPv4 NAT, without NAT66,
//! behind a stateful firewall or open; a node may also lose its IPv4
//! (IPv6-only). Datagrams between families never happen: a node sends
//! from its socket of the destination's family, or not at all.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use super::{Flight, Sim, SimNode, V6Site, PORT};
use crate::path::PathAddr;

impl SimNode {
    /// Its addresses, as the agent's address watcher would list them.
    pub(super) fn local_addrs(&self) -> Vec<SocketAddr> {
        let v4 = self.v4.then_some(self.lan);
        v4.into_iter().chain(self.lan6).collect()
    }
}

impl Sim {
    /// An IPv6 datagram from node address `lan` of `site`: it leaves
    /// unchanged (no NAT66), opening the site firewall for the answer.
    pub(super) fn send_v6(&mut self, site: usize, lan: SocketAddr, f: Flight) {
        if let Some(v6) = self.sites[site].v6.as_mut() {
            v6.open.insert((lan, f.to));
        }
        let at = self.now + self.sites[site].spec.latency;
        self.schedule(at, f);
    }

    /// An IPv6 datagram crossed `site`'s link: its firewall decides.
    pub(super) fn arrive_v6(&mut self, site: usize, f: Flight) {
        let admitted = (self.sites[site].v6.as_ref()).is_some_and(|v| v.admits(f.to, f.from));
        let node = self
            .nodes
            .iter()
            .position(|n| n.site == site && n.sock_at(f.to).is_some());
        if let (true, Some(n)) = (admitted, node) {
            self.deliver(n, f);
        }
    }

    /// Every node of `site` gets a global IPv6 address
    /// 2001:db8:(site+1)::(n+2), on the overlay port; `firewall`: the
    /// router lets in only answers.
    pub fn add_ipv6(&mut self, site: usize, firewall: bool) {
        self.sites[site].v6 = Some(V6Site {
            firewall,
            open: Default::default(),
        });
        let now = self.now;
        for n in 0..self.nodes.len() {
            let node = &mut self.nodes[n];
            if node.site != site {
                continue;
            }
            let ip = Ipv6Addr::new(0x2001, 0xdb8, site as u16 + 1, 0, 0, 0, 0, n as u16 + 2);
            node.lan6 = Some(SocketAddr::new(IpAddr::V6(ip), PORT));
            let local = node.local_addrs();
            node.stack.set_local_candidates(now, local);
            self.after(n);
        }
    }

    /// Node `n` loses its IPv4 (call after [`Sim::add_ipv6`] on its site).
    pub fn ipv6_only(&mut self, n: usize) {
        let now = self.now;
        let node = &mut self.nodes[n];
        node.v4 = false;
        let local = node.local_addrs();
        node.stack.set_local_candidates(now, local);
        self.after(n);
    }

    /// The path node `from` uses toward node `to`.
    pub fn path_addr(&self, from: usize, to: usize) -> Option<PathAddr> {
        let name = format!("n{to}");
        let st = self.nodes[from].stack.overlay.status();
        st.iter().find(|s| s.node == name)?.path
    }
}
