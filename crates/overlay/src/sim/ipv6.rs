//! The IPv6 underlay on the simulator (issue 25): a global IPv6 address
//! beside a symmetric IPv4 NAT goes direct over IPv6, IPv6-only nodes
//! reach each other, IPv6 is preferred when both families work, and
//! without IPv6 a symmetric pair stays relayed. Sites' IPv6 sits behind
//! the stateful firewall home routers have, so the direct path needs
//! both sides to send (the punching the overlay does anyway).

use super::tests::each_seed;
use super::*;

fn sites(seed: u64, kinds: &[NatKind]) -> Vec<SiteSpec> {
    let mut r = StdRng::seed_from_u64(seed);
    kinds
        .iter()
        .map(|k| SiteSpec {
            latency: Duration::from_millis(r.gen_range(2..20)),
            loss: r.gen_range(0.0..0.02),
            ..SiteSpec::new(*k, 1)
        })
        .collect()
}

/// Both directions' paths, or why not.
fn both_paths(sim: &Sim, a: usize, b: usize) -> Result<(PathAddr, PathAddr), String> {
    match (sim.path_addr(a, b), sim.path_addr(b, a)) {
        (Some(x), Some(y)) => Ok((x, y)),
        other => Err(format!("no path both ways: {other:?}")),
    }
}

fn direct_v6(sim: &Sim, a: usize, b: usize) -> bool {
    both_paths(sim, a, b).is_ok_and(|(x, y)| {
        [x, y]
            .iter()
            .all(|p| p.via == crate::path::Via::Direct && p.remote.is_ipv6())
    })
}

fn settle_v6(sim: &mut Sim, a: usize, b: usize) -> Result<Duration, String> {
    sim.run_until_ok(Duration::from_secs(30), |s| direct_v6(s, a, b))
        .ok_or_else(|| format!("not direct over IPv6: {:?}", both_paths(sim, a, b)))
}

#[test]
fn a_symmetric_ipv4_node_with_ipv6_goes_direct_over_ipv6() {
    use NatKind::*;
    each_seed(|seed| {
        // Symmetric on both sides: IPv4 can only relay; IPv6 (firewalled
        // both ends) goes direct. And a cone peer with IPv6.
        let mut sim = Sim::new(
            seed,
            &sites(seed, &[Symmetric, Symmetric, PortRestrictedCone]),
        );
        for s in 0..3 {
            sim.add_ipv6(s, true);
        }
        let t = settle_v6(&mut sim, 0, 1)?;
        let t2 = settle_v6(&mut sim, 0, 2)?;
        sim.ping(0, 1, Duration::from_secs(2))
            .ok_or("no ping over the IPv6 path")?;
        Ok(format!("direct over IPv6 in {t:?} and {t2:?}"))
    });
}

#[test]
fn ipv6_only_nodes_reach_each_other_directly() {
    use NatKind::*;
    each_seed(|seed| {
        let mut sim = Sim::new(seed, &sites(seed, &[PortRestrictedCone, Symmetric]));
        for n in 0..2 {
            sim.add_ipv6(n, true);
            sim.ipv6_only(n);
        }
        let t = settle_v6(&mut sim, 0, 1)?;
        // Nothing of IPv4 is tried: no candidate of a family it lacks.
        let d = sim.nodes[0]
            .stack
            .overlay
            .peer_detail("n1")
            .ok_or("no n1")?;
        if let Some(c) = d.candidates.iter().find(|c| c.addr.is_ipv4()) {
            return Err(format!("an IPv6-only node kept {c:?}"));
        }
        sim.ping(1, 0, Duration::from_secs(2)).ok_or("no ping")?;
        Ok(format!("direct in {t:?}"))
    });
}

#[test]
fn ipv6_is_preferred_when_both_families_go_direct() {
    use NatKind::*;
    each_seed(|seed| {
        let mut sim = Sim::new(seed, &sites(seed, &[FullCone, Public]));
        // IPv4 goes direct first; IPv6 comes later and takes over.
        sim.run_until_ok(Duration::from_secs(30), |s| {
            s.path(0, 1) == Some("direct") && s.path(1, 0) == Some("direct")
        })
        .ok_or("not direct over IPv4")?;
        sim.add_ipv6(0, true);
        sim.add_ipv6(1, false);
        let t = settle_v6(&mut sim, 0, 1)?;
        Ok(format!("moved to IPv6 in {t:?}"))
    });
}

#[test]
fn without_ipv6_symmetric_pairs_stay_relayed_and_families_never_cross() {
    use NatKind::*;
    each_seed(|seed| {
        let mut sim = Sim::new(seed, &sites(seed, &[Symmetric, Symmetric]));
        // Only the second has IPv6: the first cannot use it.
        sim.add_ipv6(1, false);
        sim.run(Duration::from_secs(30));
        for (a, b) in [(0, 1), (1, 0)] {
            if sim.path(a, b) != Some("relay") {
                return Err(format!("n{a} -> n{b}: {:?}", sim.path_addr(a, b)));
            }
        }
        let d = sim.nodes[0]
            .stack
            .overlay
            .peer_detail("n1")
            .ok_or("no n1")?;
        if d.paths.iter().any(|(p, _)| p.addr.remote.is_ipv6()) {
            return Err(format!("an IPv4-only node tries IPv6: {:?}", d.paths));
        }
        Ok("relayed".into())
    });
}
