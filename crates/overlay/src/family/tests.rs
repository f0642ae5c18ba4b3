use std::time::{Duration, Instant};

use super::*;
use crate::engine::PeerCandidate;
use crate::path::{PathAddr, PathConfig, Paths};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn which_of_our_addresses_are_candidates() {
    let ok = AddrFlags::default();
    for good in [
        "2001:db8:1::2",
        "2a00:1450::1",
        "fd00::5",
        "192.168.1.2",
        "203.0.113.7",
    ] {
        assert!(local_candidate(ip(good), ok), "{good}");
    }
    for bad in [
        "fe80::1",
        "::1",
        "::",
        "ff02::1",
        "::ffff:192.0.2.1",
        "127.0.0.1",
        "169.254.1.1",
    ] {
        assert!(!local_candidate(ip(bad), ok), "{bad}");
    }
    let g = ip("2001:db8:1::2");
    for flags in [
        AddrFlags {
            deprecated: true,
            ..ok
        },
        AddrFlags {
            tentative: true,
            ..ok
        },
        AddrFlags {
            dadfailed: true,
            ..ok
        },
    ] {
        assert!(!local_candidate(g, flags), "{flags:?}");
    }
}

#[test]
fn a_global_ipv6_host_candidate_ranks_direct_and_a_ula_stays_local() {
    assert_eq!(
        rank_published(ip("2001:db8:1::2"), Rank::Local),
        Rank::Direct
    );
    assert_eq!(rank_published(ip("fd12::2"), Rank::Local), Rank::Local);
    assert_eq!(rank_published(ip("192.168.1.2"), Rank::Local), Rank::Local);
    assert_eq!(rank_published(ip("2001:db8::9"), Rank::Relay), Rank::Relay);
}

#[test]
fn a_node_uses_only_candidates_of_its_own_families() {
    let v4_only = Families::of(&[sa("192.168.1.2:5800")]);
    let dual = Families::of(&[sa("192.168.1.2:5800"), sa("[2001:db8:1::2]:5800")]);
    let v6_only = Families::of(&[sa("[2001:db8:1::2]:5800")]);
    let unknown = Families::of(&[]);
    let (v4, v6) = (sa("203.0.113.9:5800"), sa("[2001:db8:2::2]:5800"));
    assert!(v4_only.allows(v4) && !v4_only.allows(v6));
    assert!(dual.allows(v4) && dual.allows(v6));
    assert!(!v6_only.allows(v4) && v6_only.allows(v6));
    assert!(unknown.allows(v4) && !unknown.allows(v6));
    // Never, whatever our families: no scope id, or IPv4 in disguise.
    for never in ["[fe80::1]:5800", "[::ffff:203.0.113.9]:5800", "[::1]:5800"] {
        assert!(!dual.allows(sa(never)), "{never}");
    }
    let key = *crate::crypto::StaticKeys::from_rng(&mut rand::thread_rng()).public();
    let peer = PeerInfo {
        node: "p".into(),
        key,
        pod_subnet: "10.244.9.0/24".parse().unwrap(),
        host_addr: None,
        host_addr6: None,
        candidates: [v4, v6, sa("[fe80::2]:5800")]
            .iter()
            .map(|a| PeerCandidate {
                addr: *a,
                class: Rank::Local,
            })
            .collect(),
        stale: false,
        bridge_mac: None,
    };
    let kept = |f: Families| -> Vec<SocketAddr> {
        f.filter(std::slice::from_ref(&peer))[0]
            .candidates
            .iter()
            .map(|c| c.addr)
            .collect()
    };
    assert_eq!(kept(v4_only), vec![v4]);
    assert_eq!(kept(dual), vec![v4, v6]);
    assert_eq!(kept(v6_only), vec![v6]);
}

#[test]
fn an_ipv6_only_node_with_an_ipv4_relayed_address_keeps_the_public_ipv4_candidates() {
    let v6_only = Families::of(&[sa("[2001:db8:1::2]:5800")]);
    let v4_only = Families::of(&[sa("192.168.1.2:5800")]);
    let key = *crate::crypto::StaticKeys::from_rng(&mut rand::thread_rng()).public();
    let (lan, public, relayed, v6) = (
        sa("192.168.3.2:5800"),
        sa("203.0.113.30:40000"),
        sa("203.0.113.1:49200"),
        sa("[2001:db8:2::2]:5800"),
    );
    let peer = PeerInfo {
        node: "p".into(),
        key,
        pod_subnet: "10.244.9.0/24".parse().unwrap(),
        host_addr: None,
        host_addr6: None,
        candidates: [lan, public, relayed, v6]
            .iter()
            .map(|a| PeerCandidate {
                addr: *a,
                class: Rank::Direct,
            })
            .collect(),
        stale: false,
        bridge_mac: None,
    };
    let kept = |f: Families, relayed: [bool; 2]| -> Vec<SocketAddr> {
        f.filter_via(std::slice::from_ref(&peer), relayed)[0]
            .candidates
            .iter()
            .map(|c| c.addr)
            .collect()
    };
    // Through the relay: the peer's internet addresses, never its LAN.
    assert_eq!(kept(v6_only, [true, false]), vec![public, relayed, v6]);
    // No IPv4 allocation: IPv6 only, as before.
    assert_eq!(kept(v6_only, [false, false]), vec![v6]);
    // A family we have is never taken through a relay (it is direct).
    assert_eq!(kept(v4_only, [true, false]), vec![lan, public, relayed]);
}

/// Two direct paths, IPv4 and IPv6, answering with the given RTTs (ms):
/// which one is in use after they settle, starting from `first`.
fn settled(first_v6: bool, rtt4: u64, rtt6: u64) -> SocketAddr {
    let cfg = PathConfig::default();
    let t0 = Instant::now();
    let (a4, a6) = (
        PathAddr::direct(sa("203.0.113.9:5800")),
        PathAddr::direct(sa("[2001:db8:2::2]:5800")),
    );
    let mut p = Paths::default();
    p.set_candidates(t0, &cfg, &[(a4, Rank::Direct), (a6, Rank::Direct)]);
    let order = if first_v6 {
        [(a6, rtt6), (a4, rtt4)]
    } else {
        [(a4, rtt4), (a6, rtt6)]
    };
    let mut id = 0;
    let mut now = t0;
    for round in 0..20 {
        for (addr, rtt) in order {
            let mut due = Vec::new();
            p.poll(now, &cfg, &mut id, &mut due, &mut Vec::new());
            let i = p.find(&addr).unwrap();
            if let Some((pid, sent)) = p.list[i].probe {
                p.on_probe_reply(sent + Duration::from_millis(rtt), &cfg, pid);
            }
            if round == 0 && p.active.is_none() {
                p.on_rx(now, &cfg, addr, Rank::Direct);
            }
        }
        now += cfg.standby_interval;
    }
    p.active_addr().unwrap().remote
}

#[test]
fn ipv6_wins_within_the_hysteresis_and_ipv4_only_when_clearly_faster() {
    let v6 = |a: SocketAddr| a.is_ipv6();
    // Equal, or IPv6 slower within the 20 % hysteresis: IPv6, whichever answered first.
    for first_v6 in [false, true] {
        assert!(v6(settled(first_v6, 10, 10)), "equal, first_v6 {first_v6}");
        assert!(
            v6(settled(first_v6, 10, 11)),
            "v6 10% slower, first_v6 {first_v6}"
        );
        // IPv6 much slower: IPv4.
        assert!(
            !v6(settled(first_v6, 10, 30)),
            "v6 3x slower, first_v6 {first_v6}"
        );
    }
    // No flapping around the edge: from IPv6, IPv4 must beat the weighted
    // RTT by the hysteresis again.
    assert!(v6(settled(true, 10, 13)));
    assert!(!v6(settled(false, 10, 13)));
}
