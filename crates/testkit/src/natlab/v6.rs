//! The lab's IPv6 internet, beside the IPv4 one (issue 25): documentation
//! addresses only (2001:db8::/32), only inside the lab's namespaces.
//!
//! * The internet namespace is the IPv6 core router: [`INTERNET6`] on the
//!   internet bridge (2001:db8::/64), forwarding on, a route to each
//!   site's prefix via that site's router.
//! * A site with IPv6 ([`Lab::add_ipv6`]) gets 2001:db8:K::/64 on its LAN
//!   (K = the site's LAN number), routed, no NAT66, and its router a
//!   stateful forward filter on the WAN side: only answers to what a node
//!   sent come in, as home routers do (RFC 6092), so a direct IPv6 path
//!   needs both sides to send, as hole punching does. A public site's
//!   nodes get addresses on the internet segment itself, unfiltered.
//! * [`Lab::remove_ipv4`] makes a node IPv6-only.
//!
//! Addresses are added with `nodad` (no duplicate address detection: the
//! lab hands out unique ones), so they are usable at once, not tentative.

use std::net::{IpAddr, Ipv6Addr};

use super::{
    must, nft, replace_table, Lab, NodeId, SiteId, INTERNET_BRIDGE, LAN_BRIDGE, NODE_IF, WAN_IF,
};

/// The internet namespace's IPv6 address: the core router (and a server
/// address for STUN over IPv6).
pub const INTERNET6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);

fn addr6(prefix: u16, host: u16) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, prefix, 0, 0, 0, 0, host)
}

fn add_addr(ns: &crate::netns::Netns, a: Ipv6Addr, dev: &str) {
    must(
        ns,
        &[
            "ip",
            "-6",
            "addr",
            "add",
            &format!("{a}/64"),
            "dev",
            dev,
            "nodad",
        ],
    );
}

fn forward(ns: &crate::netns::Netns) {
    must(ns, &["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
}

fn default_via(ns: &crate::netns::Netns, gw: Ipv6Addr) {
    must(
        ns,
        &[
            "ip",
            "-6",
            "route",
            "add",
            "default",
            "via",
            &gw.to_string(),
        ],
    );
}

/// The router's IPv6 filter: answers in, nothing new from the WAN.
fn firewall6() -> String {
    replace_table(
        "ip6",
        "natlab6",
        &format!(
            r#"  chain forward {{
    type filter hook forward priority filter; policy accept;
    iifname "{WAN_IF}" ct state established,related accept
    iifname "{WAN_IF}" drop
  }}
"#
        ),
    )
}

impl Lab {
    /// Turns the IPv6 internet on (once; [`Lab::add_ipv6`] does it too).
    pub fn enable_ipv6(&self) {
        let mut st = super::lock(&self.state);
        if st.ipv6 {
            return;
        }
        add_addr(&self.internet, INTERNET6, INTERNET_BRIDGE);
        forward(&self.internet);
        st.ipv6 = true;
    }

    /// Site `site` gets IPv6 (see the module); its nodes' addresses are
    /// [`Lab::node_addr6`]. Only for sites with one router or none (not a
    /// double NAT, not the routed scale lab).
    pub fn add_ipv6(&self, site: SiteId) {
        self.enable_ipv6();
        let s = self.site(site);
        assert!(
            s.inner.is_none() && s.routed_via.is_none(),
            "IPv6 on {:?}: not supported",
            s.kind
        );
        if let Some(router) = s.router.as_ref() {
            let wan6 = addr6(0, 0x100 + u16::from(s.lan));
            add_addr(router, wan6, WAN_IF);
            default_via(router, INTERNET6);
            forward(router);
            add_addr(router, addr6(u16::from(s.lan), 1), LAN_BRIDGE);
            nft(router, &firewall6());
            let net = format!("{}/64", addr6(u16::from(s.lan), 0));
            must(
                &self.internet,
                &["ip", "-6", "route", "add", &net, "via", &wan6.to_string()],
            );
        }
        for id in &s.nodes {
            let n = self.node(*id);
            add_addr(&n.ns, self.node_addr6(*id), NODE_IF);
            let gw = match s.router {
                Some(_) => addr6(u16::from(s.lan), 1),
                None => INTERNET6,
            };
            default_via(&n.ns, gw);
        }
    }

    /// Node `id`'s IPv6 address once its site has IPv6: 2001:db8:K::H on a
    /// site's LAN (H as in its 192.168.K.H), 2001:db8::2HH for a public
    /// node (by node index).
    pub fn node_addr6(&self, id: NodeId) -> Ipv6Addr {
        let n = self.node(id);
        let s = self.site(n.site);
        match (&s.router, n.addr) {
            (Some(_), IpAddr::V4(a)) => addr6(u16::from(s.lan), u16::from(a.octets()[3])),
            _ => addr6(0, 0x200 + id.0 as u16),
        }
    }

    /// Node `id` loses its IPv4 address and route: IPv6-only.
    pub fn remove_ipv4(&self, id: NodeId) {
        let n = self.node(id);
        must(&n.ns, &["ip", "-4", "route", "flush", "dev", NODE_IF]);
        must(&n.ns, &["ip", "-4", "addr", "flush", "dev", NODE_IF]);
    }
}
