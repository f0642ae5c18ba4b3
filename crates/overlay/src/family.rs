//! The IPv6 underlay's rules, in one place: which of our own addresses
//! are candidates, how a peer's IPv6 candidate is ranked, which peer
//! candidates a node can use at all (its own families), and the IPv6
//! preference of path selection.
//!
//! * A global unicast IPv6 address is reachable from anywhere its
//!   firewall lets traffic in (no NAT66): published as a host ("local")
//!   candidate, it is ranked as a direct one by the peer, beside the IPv4
//!   reflexive addresses, so that RTT and the family preference decide.
//! * A ULA (fc00::/7) reaches only within the site: a local candidate.
//! * Link-local (fe80::/10) needs a scope id and works on one link only;
//!   IPv4-mapped (::ffff:0:0/96) is an IPv4 address in disguise (a
//!   dual-stack socket's view): neither is ever a candidate. Loopback,
//!   multicast and unspecified neither.
//! * Deprecated and tentative (or DAD-failed) addresses are skipped: the
//!   first is on its way out, the others cannot be used yet.
//! * A pair never crosses families: the agent has one socket per family,
//!   and a node uses a peer's candidate only if it has an address of that
//!   family itself.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use crate::engine::PeerInfo;
use crate::path::Rank;

/// What the kernel says about one of our addresses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AddrFlags {
    pub deprecated: bool,
    pub tentative: bool,
    pub dadfailed: bool,
}

fn is_ula(a: &Ipv6Addr) -> bool {
    (a.segments()[0] & 0xfe00) == 0xfc00
}

fn is_link_local_v6(a: &Ipv6Addr) -> bool {
    (a.segments()[0] & 0xffc0) == 0xfe80
}

fn is_mapped(a: &Ipv6Addr) -> bool {
    a.to_ipv4_mapped().is_some()
}

/// An IPv6 address that routes on the internet: not one of the special
/// ranges above. (The documentation prefix 2001:db8::/32 counts: the NAT
/// lab's internet is made of it.)
pub fn is_global_v6(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(_) => false,
        IpAddr::V6(a) => {
            !(a.is_unspecified()
                || a.is_loopback()
                || a.is_multicast()
                || is_ula(&a)
                || is_link_local_v6(&a)
                || is_mapped(&a))
        }
    }
}

/// An IPv4 address outside the private, shared (100.64.0.0/10, carrier
/// NAT) and special ranges: a host without NAT. (The documentation
/// ranges count: the NAT lab's internet is 203.0.113.0/24.)
pub fn is_public_v4(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V6(_) => false,
        IpAddr::V4(a) => {
            let shared = a.octets()[0] == 100 && (a.octets()[1] & 0xc0) == 64;
            !(a.is_private()
                || shared
                || a.is_loopback()
                || a.is_link_local()
                || a.is_unspecified()
                || a.is_broadcast()
                || a.is_multicast())
        }
    }
}

/// Whether an IPv6 address may be a candidate at all, ours or a peer's.
fn v6_usable(a: &Ipv6Addr) -> bool {
    is_global_v6(IpAddr::V6(*a)) || is_ula(a)
}

/// Whether one of our interface addresses is a local candidate. IPv4 keeps
/// its rules (the address watcher's); IPv6 follows the module's.
pub fn local_candidate(ip: IpAddr, flags: AddrFlags) -> bool {
    match ip {
        IpAddr::V4(v4) => !(v4.is_loopback() || v4.is_link_local() || v4.is_unspecified()),
        IpAddr::V6(v6) => {
            v6_usable(&v6) && !flags.deprecated && !flags.tentative && !flags.dadfailed
        }
    }
}

/// The class of a peer's published candidate: a host candidate on a
/// global IPv6 address is on the internet, not a same-LAN hint.
pub fn rank_published(ip: IpAddr, published: Rank) -> Rank {
    match published {
        Rank::Local if is_global_v6(ip) => Rank::Direct,
        c => c,
    }
}

/// The address families a node can send on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Families {
    pub v4: bool,
    pub v6: bool,
}

impl Families {
    /// From our local candidates: IPv6 when we have a usable IPv6 address;
    /// IPv4 unless every address we have is IPv6 (an IPv6-only node). No
    /// addresses at all (not gathered yet, or gathering failed) keeps
    /// IPv4, as before IPv6 was known.
    pub fn of(local: &[SocketAddr]) -> Families {
        let v6 = local.iter().any(|a| a.is_ipv6());
        let v4 = local.is_empty() || local.iter().any(|a| a.is_ipv4());
        Families { v4, v6 }
    }

    /// Whether we can use a peer's candidate at `addr`.
    pub fn allows(&self, addr: SocketAddr) -> bool {
        match addr.ip() {
            IpAddr::V4(_) => self.v4,
            IpAddr::V6(a) => self.v6 && v6_usable(&a),
        }
    }

    /// `peers` with only the candidates we can use.
    pub fn filter(&self, peers: &[PeerInfo]) -> Vec<PeerInfo> {
        self.filter_via(peers, [false; 2])
    }

    /// [`Families::filter`], keeping too the candidates of a family we
    /// cannot send on when `relayed` says we have an allocation of that
    /// family (index 0 IPv4, 1 IPv6) to reach them through: only those on
    /// the internet, as a relay reaches no private network.
    pub fn filter_via(&self, peers: &[PeerInfo], relayed: [bool; 2]) -> Vec<PeerInfo> {
        let via_relay = |a: SocketAddr| match a.ip() {
            IpAddr::V4(_) => !self.v4 && relayed[0] && is_public_v4(a.ip()),
            IpAddr::V6(_) => !self.v6 && relayed[1] && is_global_v6(a.ip()),
        };
        peers
            .iter()
            .map(|p| {
                let mut p = p.clone();
                p.candidates
                    .retain(|c| self.allows(c.addr) || via_relay(c.addr));
                p
            })
            .collect()
    }
}

/// `"ipv4"` or `"ipv6"`: the family of an underlay address (`peers`).
pub fn name(addr: SocketAddr) -> &'static str {
    match addr {
        SocketAddr::V4(_) => "ipv4",
        SocketAddr::V6(_) => "ipv6",
    }
}

#[cfg(test)]
mod tests;
