//! The NAT lab's matrix, fallback and recovery on the simulator, over many
//! seeds, without root (crates/node/tests/overlay.rs runs the same on the
//! real lab with coturn and nftables). A failure names its seed; replay it
//! with `EVIO_SIM_SEED=<seed> cargo test --release -p evio-overlay --lib sim`.

use super::*;

const SEEDS: u64 = 16;

/// The path two nodes must end up on (the lab's rule).
fn expected(a: NatKind, b: NatKind, same_site: bool) -> &'static str {
    use NatKind::*;
    if same_site {
        return "direct";
    }
    let cone = |t: NatKind| t == PortRestrictedCone;
    match (a, b) {
        (UdpBlocked, _) | (_, UdpBlocked) => "relay",
        (Symmetric, Symmetric) => "relay",
        (Symmetric, x) | (x, Symmetric) if cone(x) => "relay",
        _ => "direct",
    }
}

fn lossy(kind: NatKind, nodes: usize, seed: u64, i: u64) -> SiteSpec {
    // Latency and loss vary with the seed: 2-20 ms, up to 2 % loss.
    let mut r = StdRng::seed_from_u64(seed * 1000 + i);
    SiteSpec {
        kind,
        nodes,
        latency: Duration::from_millis(r.gen_range(2..20)),
        loss: r.gen_range(0.0..0.02),
    }
}

fn matrix_sites(seed: u64) -> Vec<SiteSpec> {
    use NatKind::*;
    [
        (PortRestrictedCone, 2),
        (PortRestrictedCone, 1),
        (Symmetric, 1),
        (Symmetric, 1),
        (FullCone, 1),
        (Public, 1),
    ]
    .iter()
    .enumerate()
    .map(|(i, (k, n))| lossy(*k, *n, seed, i as u64))
    .collect()
}

/// Every pair's path, or what is wrong.
fn wrong_paths(sim: &Sim) -> Vec<String> {
    let n = sim.nodes.len();
    let mut wrong = Vec::new();
    for a in 0..n {
        for b in (0..n).filter(|b| *b != a) {
            let same = sim.nodes[a].site == sim.nodes[b].site;
            let want = expected(sim.kind_of(a), sim.kind_of(b), same);
            let got = sim.path(a, b);
            if got != Some(want) {
                wrong.push(format!(
                    "n{a} ({:?}) -> n{b} ({:?}): {got:?}, want {want}",
                    sim.kind_of(a),
                    sim.kind_of(b)
                ));
            }
        }
    }
    wrong
}

fn settle(sim: &mut Sim, limit: Duration) -> Result<Duration, String> {
    sim.run_until_ok(limit, |s| wrong_paths(s).is_empty())
        .ok_or_else(|| format!("after {:?}: {:#?}", sim.elapsed(), wrong_paths(sim)))
}

/// Runs `f` for every seed; reports every failing seed at once (also the
/// hard-NAT matrix's).
pub(super) fn each_seed(f: impl Fn(u64) -> Result<String, String>) {
    let mut failed = Vec::new();
    for seed in seeds(SEEDS) {
        match f(seed) {
            Ok(note) => eprintln!("seed {seed}: {note}"),
            Err(e) => failed.push(format!("seed {seed}: {e}")),
        }
    }
    assert!(
        failed.is_empty(),
        "failing seeds (replay one with EVIO_SIM_SEED=<seed>):\n{}",
        failed.join("\n")
    );
}

#[test]
fn every_pair_takes_the_path_its_nats_allow() {
    each_seed(|seed| {
        let mut sim = Sim::new(seed, &matrix_sites(seed));
        let t = settle(&mut sim, Duration::from_secs(30))?;
        Ok(format!("{} nodes settled in {t:?}", sim.nodes.len()))
    });
}

/// The recovery lab: two cone sites, a symmetric one, a public node.
fn recovery_sim(seed: u64) -> Result<Sim, String> {
    use NatKind::*;
    let sites: Vec<SiteSpec> = [PortRestrictedCone, PortRestrictedCone, Symmetric, Public]
        .iter()
        .enumerate()
        .map(|(i, k)| lossy(*k, 1, seed, i as u64))
        .collect();
    let mut sim = Sim::new(seed, &sites);
    settle(&mut sim, Duration::from_secs(30))?;
    Ok(sim)
}

fn within(
    sim: &mut Sim,
    what: &str,
    limit: Duration,
    f: impl Fn(&Sim) -> bool,
) -> Result<Duration, String> {
    sim.run_until_ok(limit, f)
        .ok_or_else(|| format!("{what}: not within {limit:?}: {:#?}", wrong_paths(sim)))
}

#[test]
fn direct_paths_fall_back_to_the_relay_and_come_back() {
    each_seed(|seed| {
        let mut sim = recovery_sim(seed)?;
        let (x, p) = (0, 3);
        sim.block(x, p, true);
        let down = within(
            &mut sim,
            "fallback to the relay",
            Duration::from_secs(5),
            |s| s.path(x, p) == Some("relay") && s.path(p, x) == Some("relay"),
        )?;
        sim.block(x, p, false);
        let up = within(&mut sim, "back to direct", Duration::from_secs(30), |s| {
            s.path(x, p) == Some("direct") && s.path(p, x) == Some("direct")
        })?;
        Ok(format!("relay after {down:?}, direct again after {up:?}"))
    });
}

fn ping(
    sim: &mut Sim,
    a: usize,
    b: usize,
    what: &str,
    limit: Duration,
) -> Result<Duration, String> {
    sim.ping(a, b, limit).ok_or_else(|| {
        format!(
            "{what}: n{a} -> n{b} not within {limit:?}: {:#?}",
            wrong_paths(sim)
        )
    })
}

#[test]
fn recovery_after_mapping_loss_address_change_relay_outage_and_nat_change() {
    each_seed(|seed| {
        let mut sim = recovery_sim(seed)?;
        let (x, y, s, p) = (0, 1, 2, 3);
        let both = |a: usize, b: usize, want: &'static str| {
            move |sim: &Sim| sim.path(a, b) == Some(want) && sim.path(b, a) == Some(want)
        };
        sim.flush_nat(x);
        let flush = ping(
            &mut sim,
            x,
            y,
            "after conntrack -F",
            Duration::from_secs(10),
        )?;
        sim.change_public_address(x);
        let moved = ping(
            &mut sim,
            y,
            x,
            "after an address change",
            Duration::from_secs(10),
        )?;
        ping(
            &mut sim,
            x,
            p,
            "x -> public after an address change",
            Duration::from_secs(10),
        )?;
        sim.turn_up(false);
        sim.run(Duration::from_secs(3));
        if sim.path(x, y) != Some("direct") {
            return Err(format!(
                "the direct pair noticed the relay outage: {:?} {:?}",
                sim.path(x, y),
                sim.path(y, x)
            ));
        }
        ping(
            &mut sim,
            x,
            y,
            "direct pair during the relay outage",
            Duration::from_secs(1),
        )?;
        sim.turn_up(true);
        let relay = ping(
            &mut sim,
            x,
            s,
            "relayed pair after the TURN restart",
            Duration::from_secs(45),
        )?;
        sim.set_nat(s, NatKind::PortRestrictedCone);
        let cone = within(
            &mut sim,
            "symmetric became a cone",
            Duration::from_secs(30),
            both(x, s, "direct"),
        )?;
        Ok(format!(
            "flush {flush:?}, address {moved:?}, relay back {relay:?}, cone {cone:?}"
        ))
    });
}

#[test]
fn a_seed_replays_exactly() {
    let run = |seed: u64| {
        let mut sim = Sim::new(seed, &matrix_sites(seed));
        sim.run(Duration::from_secs(20));
        sim.flush_nat(0);
        sim.run(Duration::from_secs(5));
        (sim.fingerprint(), sim.deliveries, wrong_paths(&sim))
    };
    let a = run(5);
    let b = run(5);
    assert_eq!(a, b, "the same seed, another run");
    assert_ne!(a.0, run(6).0, "another seed, the same run");
    assert!(a.1 > 100, "{} datagrams", a.1);
}

/// Two symmetric sites and a cone site: every pair relayed.
fn relayed_sim(seed: u64) -> Result<Sim, String> {
    use NatKind::*;
    let sites: Vec<SiteSpec> = [Symmetric, Symmetric, PortRestrictedCone]
        .iter()
        .enumerate()
        .map(|(i, k)| lossy(*k, 1, seed, i as u64))
        .collect();
    let mut sim = Sim::new(seed, &sites);
    settle(&mut sim, Duration::from_secs(30))?;
    // Sessions are made on demand, as soon as traffic flows: a pair can be
    // relayed through the peer's allocation before our own is made.
    let ready = |s: &Sim| (0..s.nodes.len()).all(|n| s.turn_ready(n));
    within(
        &mut sim,
        "every allocation made",
        Duration::from_secs(10),
        ready,
    )?;
    Ok(sim)
}

/// Relayed datagrams (ChannelData or data indications from the TURN server) go through the
/// stack's one feed path into the overlay and to the pod without a heap
/// allocation, once the pair is relayed and warm (its first frames may
/// learn MACs).
#[test]
fn relayed_datagrams_allocate_nothing() {
    let mut sim = relayed_sim(1).unwrap();
    assert!(
        sim.ping(0, 1, Duration::from_secs(2)).is_some(),
        "no warm-up ping"
    );
    for n in &mut sim.nodes {
        n.relayed_in = (0, 0);
    }
    for _ in 0..20 {
        assert!(sim.ping(0, 1, Duration::from_secs(2)).is_some());
        assert!(sim.ping(1, 0, Duration::from_secs(2)).is_some());
    }
    // Which side's frames arrive in TURN framing depends on the paths each
    // side chose (its own allocation or the peer's relayed address): count
    // both ends.
    let (datagrams, allocations) = (0..2).fold((0, 0), |(d, a), n| {
        let (dn, an) = sim.nodes[n].relayed_in;
        (d + dn, a + an)
    });
    // Frames a side sends from its own allocation reach the other end's
    // socket as plain datagrams from the relayed address (its NAT let the
    // relay in): only the rest arrive in TURN framing. Some must.
    assert!(
        datagrams >= 5,
        "{datagrams} relayed datagrams, paths {:?} {:?}",
        sim.path(0, 1),
        sim.path(1, 0)
    );
    assert_eq!(allocations, 0, "over {datagrams} relayed datagrams");
}

/// Node `n` has its own allocation again and every pair with it is
/// relayed both ways.
fn relayed_again(n: usize) -> impl Fn(&Sim) -> bool {
    move |s: &Sim| {
        s.turn_ready(n)
            && (0..s.nodes.len())
                .filter(|p| *p != n)
                .all(|p| s.path(n, p) == Some("relay") && s.path(p, n) == Some("relay"))
    }
}

/// Issue 21: a killed agent leaves its allocation on the server, which
/// answers the next agent on the same 5-tuple with 437. The new agent
/// releases it and allocates again: relayed within 10 s.
fn killed_agent_relayed_again(seed: u64, coturn: bool) -> Result<String, String> {
    let mut sim = relayed_sim(seed)?;
    sim.turn_like_coturn(coturn);
    // SIGKILL and restart at once, behind a symmetric NAT that keeps its
    // mapping toward the server.
    sim.restart_node(0);
    let killed = within(
        &mut sim,
        "relayed again after SIGKILL",
        Duration::from_secs(10),
        relayed_again(0),
    )
    .map_err(|e| format!("{e}\nturn: {:?}", sim.nodes[0].stack.nat.turn_states()))?;
    let ping_killed = ping(&mut sim, 1, 0, "after SIGKILL", Duration::from_secs(2))?;
    // A reboot behind a NAT that keeps the port: the mapping is new but
    // the server sees the same 5-tuple.
    sim.run(Duration::from_secs(2));
    sim.flush_nat(2);
    sim.restart_node(2);
    let rebooted = within(
        &mut sim,
        "relayed again after a reboot behind a port-keeping NAT",
        Duration::from_secs(10),
        relayed_again(2),
    )
    .map_err(|e| format!("{e}\nturn: {:?}", sim.nodes[2].stack.nat.turn_states()))?;
    let ping_rebooted = ping(&mut sim, 0, 2, "after the reboot", Duration::from_secs(2))?;
    Ok(format!(
        "SIGKILL: relayed after {killed:?} (+ ping {ping_killed:?}), reboot: {rebooted:?} (+ {ping_rebooted:?})"
    ))
}

#[test]
fn a_killed_agent_releases_its_leftover_allocation_and_is_relayed_again_coturn_order() {
    each_seed(|seed| killed_agent_relayed_again(seed, true));
}

#[test]
fn a_killed_agent_releases_its_leftover_allocation_turn_server_proto_order() {
    each_seed(|seed| killed_agent_relayed_again(seed, false));
}

/// A TURN server restarted (down and up at once: it forgot every
/// allocation, and no STUN binding went unanswered) twice within half a
/// minute: the relayed pairs come back each time within 10 s. The agent
/// asks the server whether it still knows an allocation whose relayed path
/// died, rather than renewing blindly at most once per 30 s (the second
/// restart then waited out that pause).
#[test]
fn relayed_pairs_come_back_after_two_turn_restarts_in_a_row() {
    each_seed(|seed| {
        let mut sim = relayed_sim(seed)?;
        let mut took = Vec::new();
        for round in 0..2 {
            sim.turn_up(false);
            sim.turn_up(true);
            let t0 = sim.elapsed();
            let what = format!("after TURN restart {}", round + 1);
            // The pairs believe in their paths for a while; traffic tells.
            for (a, b) in [(0, 1), (1, 2), (2, 0)] {
                let left = (t0 + Duration::from_secs(10)).saturating_sub(sim.elapsed());
                ping(&mut sim, a, b, &what, left)?;
            }
            took.push(sim.elapsed() - t0);
            // Traffic may come back before every allocation is remade
            // (a path to a peer's relay leaves through our own socket).
            let left = (t0 + Duration::from_secs(10)).saturating_sub(sim.elapsed());
            within(&mut sim, &what, left, |s| (0..3).all(|n| s.turn_ready(n)))?;
            sim.run(Duration::from_secs(5));
        }
        Ok(format!("relayed again after {took:?}"))
    });
}

/// Issue 21, the fallback: the TURN server will not let the leftover go
/// (`release`: it refuses the signed Refresh of lifetime 0, or says yes
/// and keeps answering 437). The new agent moves that server to a UDP
/// socket of its own on another port and is relayed again; from the move
/// on, the overlay's socket carries no TURN traffic to it (STUN Bindings
/// for our reflexive address still go). Killed again, the next agent does
/// the same (both leftovers stay).
fn unreleased_leftover(seed: u64, release: Release, limit: Duration) -> Result<String, String> {
    let mut sim = relayed_sim(seed)?;
    sim.turn_like_coturn(true);
    sim.turn_release(release);
    let mut took = Vec::new();
    for round in 0..2 {
        sim.restart_node(0);
        let t0 = sim.elapsed();
        let what = format!(
            "relayed again from another port after SIGKILL {}",
            round + 1
        );
        let t = within(&mut sim, &what, limit, relayed_again(0))
            .map_err(|e| format!("{e}\nturn: {:?}", sim.nodes[0].stack.nat.turn_states()))?;
        if sim.nodes[0].stack.nat.turn_sock(0) != Some(Sock::UdpOwn(0)) {
            return Err(format!(
                "{what}: {:?} after {t:?}: {:?}",
                sim.nodes[0].stack.nat.turn_sock(0),
                sim.nodes[0].stack.nat.turn_states()
            ));
        }
        // Traffic both ways with each peer, within the limit of the
        // restart (a peer notices its path into the old allocation died).
        for (a, b) in [(1, 0), (0, 1), (2, 0), (0, 2)] {
            let left = (t0 + limit).saturating_sub(sim.elapsed());
            ping(&mut sim, a, b, &what, left)?;
        }
        took.push((t, sim.elapsed() - t0));
        for _ in 0..4 {
            ping(&mut sim, 0, 1, &what, Duration::from_secs(2))?;
            ping(&mut sim, 2, 0, &what, Duration::from_secs(2))?;
            sim.run(Duration::from_secs(3));
        }
        let n = &sim.nodes[0];
        if n.turn_on_shared_at_move != Some(n.turn_on_shared) {
            return Err(format!(
                "{what}: TURN traffic on the overlay's socket after the move: {:?} then {}",
                n.turn_on_shared_at_move, n.turn_on_shared
            ));
        }
    }
    Ok(format!("(allocated, every pair pinged) after {took:?}"))
}

#[test]
fn a_leftover_the_server_will_not_release_is_left_for_another_local_port() {
    each_seed(|seed| unreleased_leftover(seed, Release::Refuses, Duration::from_secs(10)));
}

#[test]
fn a_leftover_that_outlasts_its_release_is_left_for_another_local_port() {
    each_seed(|seed| unreleased_leftover(seed, Release::Keeps, Duration::from_secs(10)));
}

/// Sessions on demand (issue 22): after a quiet start (candidates and
/// allocations made, no traffic: every peer idle), the first frame between
/// any two nodes of the matrix, direct or relayed, is answered within a
/// second; so is the next one after a quiet half minute (the session kept
/// up by traffic's keep-warm, NAT keepalives only).
#[test]
fn the_first_frame_to_an_idle_peer_is_answered_within_a_second() {
    each_seed(|seed| {
        let mut sim = Sim::new(seed, &matrix_sites(seed));
        sim.keep_busy(None);
        let ready = |s: &Sim| (0..s.nodes.len()).all(|n| s.turn_ready(n));
        within(&mut sim, "allocations", Duration::from_secs(10), ready)?;
        sim.run(Duration::from_secs(2));
        let n = sim.nodes.len();
        let idle = (0..n).all(|a| {
            let st = sim.nodes[a].stack.overlay.status();
            st.len() == n - 1 && st.iter().all(|p| p.state == PeerState::Idle)
        });
        if !idle {
            return Err("not every peer idle before any traffic".into());
        }
        let (mut cold, mut warm) = (Duration::ZERO, Duration::ZERO);
        for round in 0..2 {
            for a in 0..n {
                for b in a + 1..n {
                    let what = format!("round {round}");
                    let there = ping(&mut sim, a, b, &what, Duration::from_secs(1))?;
                    let back = ping(&mut sim, b, a, &what, Duration::from_secs(1))?;
                    let worst = if round == 0 { &mut cold } else { &mut warm };
                    *worst = (*worst).max(there + back);
                }
            }
            sim.run(Duration::from_secs(30));
        }
        if cold > Duration::from_secs(1) {
            return Err(format!("first reply after {cold:?}"));
        }
        Ok(format!("first reply at worst {cold:?} cold, {warm:?} warm"))
    });
}

/// A node whose site lets UDP out only to the TURN server (the lab's
/// UDP-blocked site) sends first to idle peers of every kind, and each
/// answers: on demand nobody else starts those sessions, and its own
/// socket reaches no peer, so it must handshake through its allocation
/// (finding 26 of docs/benchmarks.md: it stayed down with every peer it
/// was the first to send to).
#[test]
fn a_node_that_reaches_only_turn_starts_sessions_through_its_allocation() {
    use NatKind::*;
    each_seed(|seed| {
        let sites: Vec<SiteSpec> = [
            UdpBlocked,
            PortRestrictedCone,
            Symmetric,
            Public,
            Masquerade,
        ]
        .iter()
        .enumerate()
        .map(|(i, k)| lossy(*k, 1, seed, i as u64))
        .collect();
        let mut sim = Sim::new(seed, &sites);
        sim.keep_busy(None);
        let ready = |s: &Sim| (0..s.nodes.len()).all(|n| s.turn_ready(n));
        within(&mut sim, "allocations", Duration::from_secs(10), ready)?;
        sim.run(Duration::from_secs(2));
        let mut worst = Duration::ZERO;
        for p in 1..sim.nodes.len() {
            let there = ping(&mut sim, 0, p, "first", Duration::from_secs(5))?;
            let back = ping(&mut sim, p, 0, "back", Duration::from_secs(1))?;
            worst = worst.max(there + back);
        }
        Ok(format!("every peer answered, at worst after {worst:?}"))
    });
}

/// A gateway that lies about its external address: the port mapping it
/// "granted" is published as a direct candidate that nobody answers at.
/// The peer tries it and the pair stays on the relay, working, over every
/// seed; the path logic never picks the dead candidate.
#[test]
fn a_lying_port_mapping_is_tried_and_never_picked() {
    use NatKind::*;
    each_seed(|seed| {
        let sites = [
            lossy(PortRestrictedCone, 1, seed, 0),
            lossy(Symmetric, 1, seed, 1),
        ];
        let mut sim = Sim::new(seed, &sites);
        settle(&mut sim, Duration::from_secs(30))?;
        let lie: SocketAddr = "203.0.113.250:5800".parse().map_err(|e| format!("{e}"))?;
        sim.nodes[0].stack.set_mapped(Some(lie));
        sim.after(0);
        sim.run(Duration::from_secs(30));
        let detail = sim.nodes[1]
            .stack
            .overlay
            .peer_detail("n0")
            .ok_or("no peer n0")?;
        let tried = detail.paths.iter().find(|(p, _)| p.addr.remote == lie);
        match tried {
            Some((_, false)) => {}
            other => return Err(format!("the lie was not tried, or answered: {other:?}")),
        }
        if sim.path(1, 0) != Some("relay") || sim.path(0, 1) != Some("relay") {
            return Err(format!("paths: {:#?}", wrong_paths(&sim)));
        }
        ping(&mut sim, 1, 0, "over the relay", Duration::from_secs(5))?;
        Ok("relayed, the lie tried and dead".into())
    });
}

/// Issue 22, on demand: two port-restricted cones whose routers forget an
/// idle flow after 30 s (the lab's `an_idle_minute...` test) and a pair
/// behind the default timeouts (30 s unreplied, 120 s replied). Traffic
/// stops once the pair is direct. After a quiet minute (NAT keepalives
/// only) the first frame is answered within a second on the direct path;
/// after a quiet five minutes (the session lapsed, the mappings expired)
/// traffic brings the pair back to direct within seconds.
#[test]
fn port_restricted_cones_stay_direct_across_quiet_spells() {
    use NatKind::*;
    each_seed(|seed| {
        let mut notes = Vec::new();
        for (unreplied, replied) in [(30, 30), (30, 120)] {
            let sites = [
                lossy(PortRestrictedCone, 1, seed, 0),
                lossy(PortRestrictedCone, 1, seed, 1),
            ];
            let mut sim = Sim::new(seed, &sites);
            let secs = Duration::from_secs;
            for n in 0..2 {
                sim.set_udp_timeout(n, secs(unreplied), secs(replied));
            }
            settle(&mut sim, secs(30))?;
            sim.keep_busy(None);
            let both = |s: &Sim| s.path(0, 1) == Some("direct") && s.path(1, 0) == Some("direct");
            let mut note = format!("{unreplied}/{replied} s:");
            // (quiet, reply within, direct within): after a minute the
            // direct path held; after five it is punched again.
            for (quiet, limit, direct) in [(60, 1, 1), (300, 1, 15)] {
                sim.run(secs(quiet));
                if quiet < 120 && !both(&sim) {
                    let paths = (sim.path(0, 1), sim.path(1, 0));
                    return Err(format!(
                        "{note} not direct after {quiet} s quiet: {paths:?}"
                    ));
                }
                let t = ping(
                    &mut sim,
                    0,
                    1,
                    &format!("after {quiet} s quiet"),
                    secs(limit),
                )?;
                ping(
                    &mut sim,
                    1,
                    0,
                    &format!("back after {quiet} s quiet"),
                    secs(limit),
                )?;
                // Traffic flows (as a ping does) until the pair is direct.
                sim.keep_busy(Some(secs(1)));
                let up = within(
                    &mut sim,
                    &format!("direct after {quiet} s quiet"),
                    secs(direct),
                    both,
                )?;
                sim.keep_busy(None);
                note.push_str(&format!(" quiet {quiet} s: reply {t:?}, direct {up:?};"));
            }
            notes.push(note);
        }
        Ok(notes.join(" "))
    });
}

/// Issue 22, on demand: a direct pair of port-restricted cones whose
/// traffic stops (a ping, then nothing) at any moment of the probe cycle
/// stays direct through a quiet spell past the NATs' 30 s timeout, and the
/// next ping goes direct. Before the fix, the peer's standby probe of its
/// relay path, arriving while the active path had been quiet for a second
/// (as it always is without traffic), "roamed" the pair to the relay; no
/// probe ran after that to bring it back, the NAT keepalives went to the
/// relay, and the direct flows expired: 20 of 200 runs ended relayed.
#[test]
fn a_cone_pair_whose_traffic_stops_stays_direct() {
    use NatKind::*;
    each_seed(|seed| {
        let mut worst = Duration::ZERO;
        for off in 0..12u64 {
            let sites = [
                lossy(PortRestrictedCone, 1, seed, 0),
                lossy(PortRestrictedCone, 1, seed, 1),
            ];
            let mut sim = Sim::new(seed, &sites);
            let secs = Duration::from_secs;
            for n in 0..2 {
                sim.set_udp_timeout(n, secs(30), secs(30));
            }
            settle(&mut sim, secs(30))?;
            sim.keep_busy(None);
            sim.run(Duration::from_millis(400 * off));
            ping(&mut sim, 0, 1, "the last ping", secs(1))?;
            sim.run(secs(40));
            let direct = |s: &Sim| s.path(0, 1) == Some("direct") && s.path(1, 0) == Some("direct");
            if !direct(&sim) {
                let paths = (sim.path(0, 1), sim.path(1, 0));
                return Err(format!(
                    "stopped at +{off}x400 ms: after 40 s quiet {paths:?}"
                ));
            }
            let t = ping(&mut sim, 0, 1, "the next ping", secs(1))?;
            worst = worst.max(t);
            if !direct(&sim) {
                let paths = (sim.path(0, 1), sim.path(1, 0));
                return Err(format!("stopped at +{off}x400 ms: the next ping {paths:?}"));
            }
        }
        Ok(format!(
            "12 stops: direct throughout, next ping at worst {worst:?}"
        ))
    });
}

/// Issue 22, on demand, the benchmark's recovery round (docs/benchmarks.md
/// 5.3) without loss: a direct pair, port-restricted cone (n0) and full
/// cone (n1); a ping and its reply, a quiet moment, then n0's router
/// forgets every flow (`conntrack -F`) and n1 pings. n1's frames get in
/// only once n0 has sent something out again: every way in, the relay's
/// too (n0's flow to the TURN server went with the rest), stays closed
/// until then, so no message from n1 can ask for it. While n1's frames
/// came in within `busy`, n0 holds its side of the path open with a
/// keepalive every 500 ms (`OverlayConfig::busy_keepalive`): the ping
/// (every 200 ms) gets through within a second of the flush wherever in
/// that cycle the flush falls. Before, n1's probes had to fall back to the
/// relay (≈ 4 s) and n0 had to send to the TURN server or n1's relay on
/// its own (3.6-3.8 s here).
#[test]
fn a_far_sides_ping_gets_through_a_flushed_nat_within_a_second() {
    use NatKind::*;
    each_seed(|seed| {
        let mut worst = Duration::ZERO;
        let mut times = Vec::new();
        for off in 0..5u64 {
            let sites = [
                SiteSpec {
                    loss: 0.0,
                    ..lossy(PortRestrictedCone, 1, seed, 0)
                },
                SiteSpec {
                    loss: 0.0,
                    ..lossy(FullCone, 1, seed, 1)
                },
            ];
            let mut sim = Sim::new(seed, &sites);
            settle(&mut sim, Duration::from_secs(30))?;
            sim.keep_busy(None);
            // A pod ping that works: the request and its reply.
            ping(&mut sim, 1, 0, "before the flush", Duration::from_secs(1))?;
            ping(&mut sim, 0, 1, "the reply", Duration::from_secs(1))?;
            sim.run(Duration::from_millis(1500 + 200 * off));
            sim.flush_nat(0);
            let t = ping(&mut sim, 1, 0, "after the flush", Duration::from_secs(10))?;
            let direct = sim.path(0, 1) == Some("direct") && sim.path(1, 0) == Some("direct");
            if t > Duration::from_secs(1) || !direct {
                let paths = (sim.path(0, 1), sim.path(1, 0));
                return Err(format!(
                    "flushed after {} ms quiet: through after {t:?}, paths {paths:?}",
                    1500 + 200 * off
                ));
            }
            worst = worst.max(t);
            times.push(format!("{:.2}", t.as_secs_f64()));
        }
        Ok(format!(
            "through after {} s (worst {worst:?})",
            times.join(", ")
        ))
    });
}
