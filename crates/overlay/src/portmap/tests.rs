//! The client state machine against scripted gateways: answers built from
//! the requests it sent, in the wire format the codecs' tests pin.

use super::*;
use proptest::prelude::*;

const GW: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 1);
const ME: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 2);
const EXT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const PORT: u16 = 5800;
const NONCE: [u8; 12] = [9; 12];

fn gw() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(GW, SERVER_PORT))
}

fn mapper(now: Instant) -> PortMapper {
    let cfg = PortMapConfig {
        gateway: GW,
        client: ME,
        internal_port: PORT,
        lifetime: LIFETIME,
    };
    PortMapper::new(now, cfg, NONCE)
}

fn sent(m: &mut PortMapper) -> Vec<Vec<u8>> {
    std::iter::from_fn(|| m.poll_transmit()).collect()
}

fn events(m: &mut PortMapper) -> Vec<MapEvent> {
    std::iter::from_fn(|| m.poll_event()).collect()
}

/// The scripted gateways' epoch at the start of a test.
const EPOCH: u32 = 1000;

/// A PCP server's answer to MAP request `req`: `result`, and on success
/// `ext`:`port` for `lifetime`.
fn pcp_answer(req: &[u8], result: u8, ext: Ipv4Addr, port: u16, lifetime: u32) -> Vec<u8> {
    pcp_answer_at(EPOCH, req, result, ext, port, lifetime)
}

/// The same from a server at `epoch`.
fn pcp_answer_at(
    epoch: u32,
    req: &[u8],
    result: u8,
    ext: Ipv4Addr,
    port: u16,
    lifetime: u32,
) -> Vec<u8> {
    let mut r = req.to_vec();
    r[1] |= 0x80;
    r[2] = 0;
    r[3] = result;
    r[4..8].copy_from_slice(&lifetime.to_be_bytes());
    r[8..12].copy_from_slice(&epoch.to_be_bytes());
    r[12..24].fill(0);
    r[42..44].copy_from_slice(&port.to_be_bytes());
    r[44..60].copy_from_slice(&ext.to_ipv6_mapped().octets());
    r
}

fn natpmp_address(ext: Ipv4Addr) -> Vec<u8> {
    natpmp_address_at(EPOCH, ext)
}

fn natpmp_address_at(epoch: u32, ext: Ipv4Addr) -> Vec<u8> {
    let mut r = vec![0, 0x80, 0, 0];
    r.extend_from_slice(&epoch.to_be_bytes());
    r.extend_from_slice(&ext.octets());
    r
}

fn natpmp_map(result: u16, port: u16, lifetime: u32) -> Vec<u8> {
    natpmp_map_at(EPOCH, result, port, lifetime)
}

fn natpmp_map_at(epoch: u32, result: u16, port: u16, lifetime: u32) -> Vec<u8> {
    let mut r = vec![0, 0x81];
    r.extend_from_slice(&result.to_be_bytes());
    r.extend_from_slice(&epoch.to_be_bytes());
    r.extend_from_slice(&PORT.to_be_bytes());
    r.extend_from_slice(&port.to_be_bytes());
    r.extend_from_slice(&lifetime.to_be_bytes());
    r
}

fn lifetime_of_pcp(req: &[u8]) -> u32 {
    u32::from_be_bytes([req[4], req[5], req[6], req[7]])
}

/// Runs timers until `until`, collecting what was sent.
fn run_until(m: &mut PortMapper, until: Instant) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for _ in 0..1000 {
        match m.poll_timeout() {
            Some(t) if t <= until => m.handle_timeout(t),
            _ => break,
        }
        out.extend(sent(m));
    }
    out
}

#[test]
fn pcp_maps_renews_at_half_the_lifetime_and_deletes_on_exit() {
    let t0 = Instant::now();
    let mut m = mapper(t0);
    let req = sent(&mut m);
    assert_eq!(req.len(), 1, "one PCP request at once");
    assert_eq!(req[0].len(), pcp::REQUEST_LEN);
    assert_eq!(lifetime_of_pcp(&req[0]), LIFETIME);
    m.handle_datagram(t0, gw(), &pcp_answer(&req[0], 0, EXT, PORT, 120));
    let mapped = SocketAddrV4::new(EXT, PORT);
    assert_eq!(
        events(&mut m),
        [MapEvent::Mapped {
            protocol: Protocol::Pcp,
            external: mapped,
            lifetime: 120
        }]
    );
    assert_eq!(m.mapped(), Some((Protocol::Pcp, mapped)));
    // Nothing until half the lifetime, then a renewal with the same nonce.
    assert_eq!(m.poll_timeout(), Some(t0 + Duration::from_secs(60)));
    let renew = run_until(&mut m, t0 + Duration::from_secs(60));
    assert_eq!(renew.len(), 1);
    assert_eq!(&renew[0][24..36], &NONCE);
    let t1 = t0 + Duration::from_secs(60);
    let answer = pcp_answer_at(EPOCH + 60, &renew[0], 0, EXT, PORT, 120);
    m.handle_datagram(t1, gw(), &answer);
    assert!(events(&mut m).is_empty(), "same mapping: nothing to tell");
    assert_eq!(m.poll_timeout(), Some(t1 + Duration::from_secs(60)));
    // Clean exit: lifetime 0, same nonce, done when the gateway answers.
    m.shutdown(t1);
    let del = sent(&mut m);
    assert_eq!(del.len(), 1);
    assert_eq!(lifetime_of_pcp(&del[0]), 0);
    assert_eq!(&del[0][24..36], &NONCE);
    assert!(!m.is_done());
    let answer = pcp_answer_at(EPOCH + 60, &del[0], 0, EXT, PORT, 0);
    m.handle_datagram(t1, gw(), &answer);
    assert!(m.is_done());
    assert_eq!(m.poll_timeout(), None);
}

#[test]
fn silent_pcp_falls_back_to_natpmp_within_two_seconds() {
    let t0 = Instant::now();
    let mut m = mapper(t0);
    let mut pcp_sent = sent(&mut m).len();
    let natpmp = loop {
        let now = m.poll_timeout().unwrap();
        m.handle_timeout(now);
        let out = sent(&mut m);
        if out.iter().any(|d| d.len() == 2) {
            break (now, out);
        }
        pcp_sent += out.len();
    };
    let (now, natpmp) = natpmp;
    assert_eq!(pcp_sent, TRIES as usize);
    assert!(now - t0 <= Duration::from_secs(2), "{:?}", now - t0);
    // Address and mapping requests together.
    assert_eq!(natpmp[0], natpmp::address_request());
    assert_eq!(natpmp[1], natpmp::map_request(PORT, PORT, LIFETIME));
    // The answers may come in any order.
    m.handle_datagram(now, gw(), &natpmp_map(0, 40000, 3600));
    assert!(events(&mut m).is_empty());
    m.handle_datagram(now, gw(), &natpmp_address(EXT));
    assert_eq!(
        events(&mut m),
        [MapEvent::Mapped {
            protocol: Protocol::NatPmp,
            external: SocketAddrV4::new(EXT, 40000),
            lifetime: 3600
        }]
    );
    // Renewal suggests the port we got; deletion asks for port 0.
    let renew = run_until(&mut m, now + Duration::from_secs(1800));
    assert_eq!(renew, [natpmp::map_request(PORT, 40000, LIFETIME).to_vec()]);
    m.shutdown(now);
    assert_eq!(sent(&mut m), [natpmp::map_request(PORT, 0, 0).to_vec()]);
    m.handle_datagram(now, gw(), &natpmp_map(0, 0, 0));
    assert!(m.is_done());
}

#[test]
fn refusals_fall_through_to_unavailable_and_a_restart_begins_again() {
    let t0 = Instant::now();
    let mut m = mapper(t0);
    let req = sent(&mut m);
    // NOT_AUTHORIZED, cut after the header as RFC 6887 allows.
    m.handle_datagram(t0, gw(), &pcp_answer(&req[0], 2, EXT, 0, 0)[..24]);
    let pmp = sent(&mut m);
    assert_eq!(pmp.len(), 2, "NAT-PMP at once after a PCP refusal");
    m.handle_datagram(t0, gw(), &natpmp_map(2, 0, 0)[..8]);
    let ev = events(&mut m);
    let [MapEvent::Unavailable { why }] = &ev[..] else {
        panic!("{ev:?}")
    };
    assert!(
        why.contains("NOT_AUTHORIZED") && why.contains("not authorized"),
        "{why}"
    );
    assert_eq!(m.poll_timeout(), None, "idle after giving up");
    assert!(m.mapped().is_none());
    m.restart(t0);
    assert_eq!(sent(&mut m).len(), 1, "PCP again");
    // Exit while asking: the request in flight may have made a mapping.
    m.shutdown(t0);
    let del = sent(&mut m);
    assert_eq!(lifetime_of_pcp(&del[0]), 0);
    let end = run_until(&mut m, t0 + Duration::from_secs(5));
    assert!(m.is_done(), "bounded: {} more tries", end.len());
}

#[test]
fn exit_while_asking_a_gateway_that_never_answered_sends_nothing_and_is_done() {
    let t0 = Instant::now();
    let mut m = mapper(t0);
    assert_eq!(sent(&mut m).len(), 1, "the first PCP request");
    // A stranger's datagram is no answer from the gateway.
    let stranger: SocketAddr = "198.51.100.7:5351".parse().unwrap();
    m.handle_datagram(t0, stranger, &natpmp_map(0, 40000, 3600));
    m.shutdown(t0 + Duration::from_millis(300));
    assert!(sent(&mut m).is_empty(), "no deletion to a silent gateway");
    assert!(m.is_done());
    assert_eq!(m.poll_timeout(), None);
}

#[test]
fn a_natpmp_only_gateway_is_recognised_at_once() {
    let t0 = Instant::now();
    let mut m = mapper(t0);
    sent(&mut m);
    m.handle_datagram(t0, gw(), &[0, 0x81, 0, 1, 0, 0, 3, 232]);
    assert_eq!(sent(&mut m).len(), 2);
    m.handle_datagram(t0, gw(), &natpmp_address(EXT));
    m.handle_datagram(t0, gw(), &natpmp_map(0, PORT, 7200));
    assert_eq!(m.mapped().map(|(p, _)| p), Some(Protocol::NatPmp));
}

#[test]
fn garbage_and_strangers_change_nothing() {
    let t0 = Instant::now();
    let mut m = mapper(t0);
    let req = sent(&mut m);
    let stranger = SocketAddr::V4(SocketAddrV4::new(EXT, SERVER_PORT));
    let ok = pcp_answer(&req[0], 0, EXT, PORT, 120);
    m.handle_datagram(t0, stranger, &ok);
    let mut other_nonce = ok.clone();
    other_nonce[24] ^= 1;
    m.handle_datagram(t0, gw(), &other_nonce);
    let mut other_port = ok.clone();
    other_port[40] ^= 1;
    m.handle_datagram(t0, gw(), &other_port);
    m.handle_datagram(t0, gw(), b"HTTP/1.1 200 OK\r\n\r\n");
    m.handle_datagram(t0, gw(), &[]);
    assert_eq!(m.junk, 5);
    assert!(events(&mut m).is_empty() && m.mapped().is_none());
    m.handle_datagram(t0, gw(), &ok);
    assert!(m.mapped().is_some());
}

#[test]
fn an_unusable_external_address_is_deleted_and_not_published() {
    let t0 = Instant::now();
    let mut m = mapper(t0);
    let req = sent(&mut m);
    m.handle_datagram(
        t0,
        gw(),
        &pcp_answer(&req[0], 0, Ipv4Addr::UNSPECIFIED, PORT, 120),
    );
    let out = sent(&mut m);
    assert_eq!(lifetime_of_pcp(&out[0]), 0, "the PCP mapping deleted");
    assert_eq!(out.len(), 3, "then NAT-PMP: {out:?}");
    // NAT-PMP says 127.0.0.1: deleted too, and nothing is published.
    m.handle_datagram(t0, gw(), &natpmp_address(Ipv4Addr::LOCALHOST));
    m.handle_datagram(t0, gw(), &natpmp_map(0, PORT, 60));
    assert_eq!(sent(&mut m), [natpmp::map_request(PORT, 0, 0).to_vec()]);
    let ev = events(&mut m);
    assert!(
        matches!(&ev[..], [MapEvent::Unavailable { why }] if why.contains("unusable")),
        "{ev:?}"
    );
}

#[test]
fn an_unanswered_renewal_loses_the_mapping_at_expiry_and_asks_again() {
    let t0 = Instant::now();
    let mut m = mapper(t0);
    let req = sent(&mut m);
    m.handle_datagram(t0, gw(), &pcp_answer(&req[0], 0, EXT, PORT, 20));
    events(&mut m);
    let renewals = run_until(&mut m, t0 + Duration::from_millis(19_999));
    assert!(
        renewals.len() >= 3 && renewals.len() <= 8,
        "retransmitted, bounded: {}",
        renewals.len()
    );
    assert!(m.mapped().is_some(), "kept until it expires");
    run_until(&mut m, t0 + Duration::from_secs(20));
    let ev = events(&mut m);
    assert!(matches!(&ev[..], [MapEvent::Lost { .. }]), "{ev:?}");
    assert!(m.mapped().is_none());
    assert!(m.poll_timeout().is_some(), "asking again");
}

#[test]
fn a_new_external_address_on_renewal_is_told() {
    let t0 = Instant::now();
    let mut m = mapper(t0);
    let req = sent(&mut m);
    m.handle_datagram(t0, gw(), &pcp_answer(&req[0], 0, EXT, PORT, 100));
    events(&mut m);
    let renew = run_until(&mut m, t0 + Duration::from_secs(50));
    let new = Ipv4Addr::new(203, 0, 113, 77);
    let t1 = t0 + Duration::from_secs(50);
    let answer = pcp_answer_at(EPOCH + 50, &renew[0], 0, new, 6000, 100);
    m.handle_datagram(t1, gw(), &answer);
    assert!(matches!(
        &events(&mut m)[..],
        [MapEvent::Mapped { external, .. }] if *external == SocketAddrV4::new(new, 6000)
    ));
    // A refused renewal loses it.
    let t2 = t1 + Duration::from_secs(50);
    let renew = run_until(&mut m, t2);
    assert_eq!(renew.len(), 1);
    let answer = pcp_answer_at(EPOCH + 100, &renew[0], 8, EXT, 0, 0);
    m.handle_datagram(t2, gw(), &answer);
    assert!(
        matches!(&events(&mut m)[..], [MapEvent::Lost { why }] if why.contains("NO_RESOURCES"))
    );
}

// Issue 25: a gateway that lost its state (rebooted), noticed by its epoch.

const MAPPED: SocketAddrV4 = SocketAddrV4::new(EXT, PORT);

/// A mapper holding `MAPPED` over PCP for 7200 s, granted at `t0` by a
/// server at [`EPOCH`].
fn mapped_pcp(t0: Instant) -> PortMapper {
    let mut m = mapper(t0);
    let req = sent(&mut m);
    m.handle_datagram(t0, gw(), &pcp_answer(&req[0], 0, EXT, PORT, 7200));
    assert!(matches!(&events(&mut m)[..], [MapEvent::Mapped { .. }]));
    m
}

/// The same over NAT-PMP (PCP refused).
fn mapped_natpmp(t0: Instant) -> PortMapper {
    let mut m = mapper(t0);
    sent(&mut m);
    m.handle_datagram(t0, gw(), &[0, 0x81, 0, 1, 0, 0, 3, 232]);
    assert_eq!(sent(&mut m).len(), 2);
    m.handle_datagram(t0, gw(), &natpmp_address(EXT));
    m.handle_datagram(t0, gw(), &natpmp_map(0, PORT, 7200));
    assert!(matches!(&events(&mut m)[..], [MapEvent::Mapped { .. }]));
    m
}

/// A PCP ANNOUNCE as miniupnpd multicasts it: the header only.
fn announce(epoch: u32) -> Vec<u8> {
    let mut a = vec![2, 0x80, 0, 0, 0, 0, 0, 0];
    a.extend_from_slice(&epoch.to_be_bytes());
    a.extend_from_slice(&[0; 12]);
    a
}

/// Where the gateway's announcements come from.
fn gw_announcing() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(GW, SERVER_PORT))
}

#[test]
fn the_rfc_epoch_tests() {
    let s = Duration::from_secs;
    use Protocol::*;
    for (proto, prev, curr, elapsed, lost) in [
        (Pcp, 1000, 1060, s(60), false),
        // Clock jitter and rate differences within the tolerance.
        (Pcp, 1000, 1058, s(60), false),
        (Pcp, 1000, 1062, s(59), false),
        (Pcp, 1000, 999, s(0), false),
        (Pcp, 1000, 3600 + 1000 - 200, s(3600), false),
        // Back by more than a second, reset, stood still, raced ahead.
        (Pcp, 1000, 998, s(0), true),
        (Pcp, 1000, 5, s(60), true),
        (Pcp, 1000, 1000, s(60), true),
        (Pcp, 1000, 1300, s(60), true),
        (Pcp, 0, 0, s(3), true),
        (NatPmp, 1000, 1060, s(60), false),
        (NatPmp, 1000, 1050, s(60), false),
        (NatPmp, 1000, 998, s(0), false),
        (NatPmp, 1000, 5000, s(1), false),
        (NatPmp, 1000, 1049, s(60), true),
        (NatPmp, 1000, 997, s(0), true),
        (NatPmp, 1000, 5, s(60), true),
        // Whatever the numbers, no overflow.
        (NatPmp, u32::MAX, 0, Duration::MAX, true),
        (Pcp, 0, u32::MAX, Duration::MAX, false),
    ] {
        assert_eq!(
            epoch_lost(proto, prev, curr, elapsed),
            lost,
            "{proto:?} {prev} -> {curr} in {elapsed:?}"
        );
    }
}

#[test]
fn a_rebooted_pcp_gateway_is_noticed_by_its_epoch_and_mapped_again_at_once() {
    let t0 = Instant::now();
    let mut m = mapped_pcp(t0);
    // A renewal 3600 s later, answered by a server up for 30 s: it mapped
    // us anew (perhaps elsewhere); what it held before is gone.
    let t1 = t0 + Duration::from_secs(3600);
    let renew = run_until(&mut m, t1);
    assert_eq!(renew.len(), 1);
    let moved = Ipv4Addr::new(203, 0, 113, 99);
    m.handle_datagram(
        t1,
        gw(),
        &pcp_answer_at(30, &renew[0], 0, moved, PORT, 7200),
    );
    let ev = events(&mut m);
    assert!(
        matches!(&ev[..], [MapEvent::Lost { why }, MapEvent::Mapped { external, .. }]
            if why.contains("lost its mappings") && *external.ip() == moved),
        "{ev:?}"
    );
    let again = sent(&mut m);
    assert_eq!(again.len(), 1, "asked again at once");
    assert_eq!(lifetime_of_pcp(&again[0]), LIFETIME);
    // Its answer agrees with the new epoch: nothing more.
    let t2 = t1 + Duration::from_millis(5);
    m.handle_datagram(
        t2,
        gw(),
        &pcp_answer_at(30, &again[0], 0, moved, PORT, 7200),
    );
    assert!(events(&mut m).is_empty());
    assert!(sent(&mut m).is_empty());
    assert_eq!(m.poll_timeout(), Some(t2 + Duration::from_secs(3600)));
}

#[test]
fn a_consistent_epoch_or_clock_jitter_asks_nothing_more() {
    let t0 = Instant::now();
    let mut m = mapped_pcp(t0);
    let mut now = t0;
    // Renewals answered by a server whose clock is a second behind, then
    // two ahead of ours: within the tolerance.
    for (i, skew) in [(1, -1i64), (2, 2)] {
        now = t0 + Duration::from_secs(3600 * i);
        let renew = run_until(&mut m, now);
        assert_eq!(renew.len(), 1);
        let epoch = (i64::from(EPOCH) + 3600 * i as i64 + skew) as u32;
        m.handle_datagram(
            now,
            gw(),
            &pcp_answer_at(epoch, &renew[0], 0, EXT, PORT, 7200),
        );
        assert!(events(&mut m).is_empty(), "renewal {i}");
        assert!(sent(&mut m).is_empty(), "renewal {i}");
        assert_eq!(m.mapped(), Some((Protocol::Pcp, MAPPED)));
    }
    // The same answer twice (a duplicate): nothing either.
    let renew = run_until(&mut m, now + Duration::from_secs(3600));
    now += Duration::from_secs(3600);
    let answer = pcp_answer_at(EPOCH + 3 * 3600, &renew[0], 0, EXT, PORT, 7200);
    m.handle_datagram(now, gw(), &answer);
    m.handle_datagram(now + Duration::from_millis(300), gw(), &answer);
    assert!(events(&mut m).is_empty() && sent(&mut m).is_empty());
}

#[test]
fn a_rebooted_natpmp_gateway_is_asked_its_address_again() {
    let t0 = Instant::now();
    let mut m = mapped_natpmp(t0);
    let t1 = t0 + Duration::from_secs(3600);
    let renew = run_until(&mut m, t1);
    assert_eq!(renew, [natpmp::map_request(PORT, PORT, LIFETIME).to_vec()]);
    // The map answer has no address: after a reboot it must be asked.
    m.handle_datagram(t1, gw(), &natpmp_map_at(12, 0, PORT, 7200));
    let ev = events(&mut m);
    assert!(matches!(&ev[..], [MapEvent::Lost { .. }]), "{ev:?}");
    let again = sent(&mut m);
    assert_eq!(again[0], natpmp::address_request(), "{again:?}");
    let moved = Ipv4Addr::new(203, 0, 113, 99);
    m.handle_datagram(t1, gw(), &natpmp_address_at(12, moved));
    let ev = events(&mut m);
    assert!(
        matches!(&ev[..], [MapEvent::Mapped { protocol: Protocol::NatPmp, external, .. }]
            if *external == SocketAddrV4::new(moved, PORT)),
        "{ev:?}"
    );
}

#[test]
fn a_pcp_announce_of_a_restarted_gateway_maps_again_at_once() {
    let t0 = Instant::now();
    let mut m = mapped_pcp(t0);
    // Long before the renewal, the gateway is back from a reboot.
    let t1 = t0 + Duration::from_secs(600);
    m.handle_announcement(t1, gw_announcing(), &announce(2));
    assert_eq!(m.announcements, 1);
    // A hint: renewed at once, the mapping kept until the answer says.
    assert!(events(&mut m).is_empty());
    let req = sent(&mut m);
    assert_eq!(req.len(), 1, "renewed at once");
    assert_eq!(&req[0][24..36], &NONCE);
    assert_eq!(&req[0][42..44], &PORT.to_be_bytes(), "the same port asked");
    // Its epoch says the gateway lost its state: withdrawn, asked again
    // (the answer in hand completes that), published again.
    m.handle_datagram(t1, gw(), &pcp_answer_at(2, &req[0], 0, EXT, PORT, 7200));
    let ev = events(&mut m);
    assert!(
        matches!(&ev[..], [MapEvent::Lost { .. }, MapEvent::Mapped { external, .. }]
            if *external == MAPPED),
        "{ev:?}"
    );
    sent(&mut m);
    // The same announcement again (it is repeated): a renewal at most.
    m.handle_announcement(t1, gw_announcing(), &announce(2));
    assert!(events(&mut m).is_empty());
    assert!(sent(&mut m).len() <= 1);
}

#[test]
fn the_port_granted_is_suggested_again_after_a_loss() {
    let t0 = Instant::now();
    let mut m = mapper(t0);
    let req = sent(&mut m);
    m.handle_datagram(t0, gw(), &pcp_answer(&req[0], 0, EXT, 40123, 7200));
    events(&mut m);
    let t1 = t0 + Duration::from_secs(100);
    m.handle_announcement(t1, gw_announcing(), &announce(1));
    let req = sent(&mut m);
    assert_eq!(
        &req[0][40..44],
        &[0x16, 0xa8, 0x9c, 0xbb],
        "internal 5800, suggested 40123"
    );
}

#[test]
fn announcements_that_say_nothing_new_renew_at_most_once_per_gap() {
    let t0 = Instant::now();
    let mut m = mapped_pcp(t0);
    let t1 = t0 + Duration::from_secs(600);
    // A consistent epoch (a server that restarted without resetting it,
    // or re-announces): one renewal, the mapping kept meanwhile.
    m.handle_announcement(t1, gw_announcing(), &announce(EPOCH + 600));
    let renew = sent(&mut m);
    assert_eq!(renew.len(), 1);
    assert_eq!(lifetime_of_pcp(&renew[0]), LIFETIME);
    assert!(events(&mut m).is_empty());
    assert_eq!(m.mapped(), Some((Protocol::Pcp, MAPPED)));
    // Its NAT-PMP side, first heard, at the address we have: within the
    // gap, nothing more.
    m.handle_announcement(t1, gw_announcing(), &natpmp_address_at(EPOCH + 600, EXT));
    assert_eq!(m.announcements, 2);
    assert!(sent(&mut m).is_empty());
    let answer = pcp_answer_at(EPOCH + 600, &renew[0], 0, EXT, PORT, 7200);
    m.handle_datagram(t1, gw(), &answer);
    assert_eq!(m.poll_timeout(), Some(t1 + Duration::from_secs(3600)));
    // Strangers, and garbage from the gateway.
    let stranger = SocketAddr::V4(SocketAddrV4::new(ME, SERVER_PORT));
    m.handle_announcement(t1, stranger, &announce(0));
    m.handle_announcement(t1, gw_announcing(), &[]);
    m.handle_announcement(t1, gw_announcing(), &announce(0)[..20]);
    m.handle_announcement(t1, gw_announcing(), &natpmp_map_at(0, 0, PORT, 60));
    let mut refusal = natpmp_address_at(0, EXT);
    refusal[3] = 3;
    m.handle_announcement(t1, gw_announcing(), &refusal);
    assert_eq!(m.junk, 5);
    assert_eq!(m.announcements, 2);
    assert!(events(&mut m).is_empty() && sent(&mut m).is_empty());
    assert_eq!(m.mapped(), Some((Protocol::Pcp, MAPPED)));
    // After the gap, the next one renews again.
    let t2 = t1 + ANNOUNCE_RENEW_GAP;
    m.handle_announcement(t2, gw_announcing(), &announce(EPOCH + 610));
    assert_eq!(sent(&mut m).len(), 1);
}

/// Announcements carry no nonce: a host on the LAN sending them from the
/// gateway's address, with epochs that say "rebooted" and addresses that
/// say "moved", withdraws nothing (the real gateway's answers to what they
/// bring forward say otherwise) and brings at most two requests per gap.
#[test]
fn forged_announcements_withdraw_nothing_and_bring_few_requests() {
    for natpmp in [false, true] {
        let t0 = Instant::now();
        let mut m = if natpmp {
            mapped_natpmp(t0)
        } else {
            mapped_pcp(t0)
        };
        let t1 = t0 + Duration::from_secs(600);
        let (mut lost, mut asked) = (0, 0);
        // 100 a second for 30 s.
        for i in 0..3000u32 {
            let now = t1 + Duration::from_millis(10 * u64::from(i));
            let forged = match natpmp {
                false => announce(i % 3),
                true => natpmp_address_at(i % 3, Ipv4Addr::new(203, 0, 113, 66)),
            };
            m.handle_announcement(now, gw_announcing(), &forged);
            while m.poll_timeout().is_some_and(|t| t <= now) {
                m.handle_timeout(now);
            }
            // The real gateway answers each request, its epoch going on.
            let epoch = EPOCH + (now - t0).as_secs() as u32;
            for req in sent(&mut m) {
                asked += 1;
                let answer = match (natpmp, req.len()) {
                    (false, _) => pcp_answer_at(epoch, &req, 0, EXT, PORT, 7200),
                    (true, 2) => natpmp_address_at(epoch, EXT),
                    (true, _) => natpmp_map_at(epoch, 0, PORT, 7200),
                };
                m.handle_datagram(now, gw(), &answer);
            }
            for ev in events(&mut m) {
                lost += usize::from(matches!(ev, MapEvent::Lost { .. }));
            }
        }
        assert_eq!(m.announcements, 3000);
        assert_eq!(lost, 0, "natpmp {natpmp}");
        // A renewal (and NAT-PMP's address request) at once, and one
        // deferred to the gap's end, per gap of 10 s.
        let per = if natpmp { 2 } else { 1 };
        assert!(
            asked <= 2 * 3 * per + per,
            "natpmp {natpmp}: {asked} requests in 30 s"
        );
        let ext = if natpmp { EXT } else { *MAPPED.ip() };
        assert_eq!(m.mapped().map(|(_, e)| *e.ip()), Some(ext));
    }
}

/// NAT-PMP answers carry no nonce either: forged ones from the gateway's
/// address with epochs that say "rebooted" make the candidate flap at
/// most once per gap.
#[test]
fn forged_natpmp_answers_lose_the_mapping_once_per_gap_at_most() {
    let t0 = Instant::now();
    let mut m = mapped_natpmp(t0);
    let t1 = t0 + Duration::from_secs(600);
    let mut lost = 0;
    for i in 0..3000u32 {
        let now = t1 + Duration::from_millis(10 * u64::from(i));
        // Far ahead, then back to near 0: "rebooted" every other time.
        let epoch = if i % 2 == 0 { 1_000_000 } else { 5 };
        m.handle_datagram(now, gw(), &natpmp_map_at(epoch, 0, PORT, 7200));
        m.handle_datagram(now, gw(), &natpmp_address_at(epoch, EXT));
        sent(&mut m);
        for ev in events(&mut m) {
            lost += usize::from(matches!(ev, MapEvent::Lost { .. }));
        }
    }
    assert!((1..=3).contains(&lost), "{lost} losses in 30 s");
}

/// A restart that keeps the epoch (a renewal), then a real reboot a
/// second later: that announcement waits for the gap, but is not lost:
/// the renewal at the gap's end gets an answer whose epoch says the
/// gateway lost its state, and the mapping is asked again.
#[test]
fn a_reboot_right_after_a_restart_is_seen_at_the_gaps_end() {
    let t0 = Instant::now();
    let mut m = mapped_pcp(t0);
    let t1 = t0 + Duration::from_secs(600);
    m.handle_announcement(t1, gw_announcing(), &announce(EPOCH + 600));
    let renew = sent(&mut m);
    assert_eq!(renew.len(), 1);
    m.handle_datagram(
        t1,
        gw(),
        &pcp_answer_at(EPOCH + 600, &renew[0], 0, EXT, PORT, 7200),
    );
    let t2 = t1 + Duration::from_secs(1);
    m.handle_announcement(t2, gw_announcing(), &announce(0));
    assert!(sent(&mut m).is_empty() && events(&mut m).is_empty());
    assert_eq!(m.poll_timeout(), Some(t1 + ANNOUNCE_RENEW_GAP));
    let renew = run_until(&mut m, t1 + ANNOUNCE_RENEW_GAP);
    assert_eq!(renew.len(), 1);
    let t3 = t1 + ANNOUNCE_RENEW_GAP;
    // The answer in hand completes the new request at once.
    m.handle_datagram(t3, gw(), &pcp_answer_at(9, &renew[0], 0, EXT, PORT, 7200));
    let ev = events(&mut m);
    assert!(
        matches!(&ev[..], [MapEvent::Lost { .. }, MapEvent::Mapped { .. }]),
        "{ev:?}"
    );
    assert_eq!(m.mapped(), Some((Protocol::Pcp, MAPPED)));
}

#[test]
fn a_natpmp_announcement_of_a_new_external_address_maps_again() {
    let t0 = Instant::now();
    let mut m = mapped_natpmp(t0);
    let t1 = t0 + Duration::from_secs(600);
    // The epoch is consistent, the address is not ours any more.
    let moved = Ipv4Addr::new(203, 0, 113, 99);
    m.handle_announcement(t1, gw_announcing(), &natpmp_address_at(EPOCH + 600, moved));
    assert!(events(&mut m).is_empty(), "a hint, not believed");
    let req = sent(&mut m);
    assert_eq!(req.len(), 2, "address asked, mapping renewed: {req:?}");
    // The gateway's own answer says so.
    m.handle_datagram(t1, gw(), &natpmp_address_at(EPOCH + 600, moved));
    let ev = events(&mut m);
    assert!(
        matches!(&ev[..], [MapEvent::Lost { why }] if why.contains("203.0.113.99")),
        "{ev:?}"
    );
    let req = sent(&mut m);
    assert_eq!(req.len(), 2, "address and mapping asked again: {req:?}");
    m.handle_datagram(t1, gw(), &natpmp_address_at(EPOCH + 600, moved));
    m.handle_datagram(t1, gw(), &natpmp_map_at(EPOCH + 600, 0, PORT, 7200));
    assert!(
        matches!(&events(&mut m)[..], [MapEvent::Mapped { external, .. }]
        if *external == SocketAddrV4::new(moved, PORT))
    );
}

#[test]
fn a_gateway_that_starts_its_server_later_is_asked_at_once() {
    let t0 = Instant::now();
    let mut m = mapper(t0);
    // Nothing answers: both protocols give up.
    run_until(&mut m, t0 + Duration::from_secs(10));
    assert!(matches!(
        &events(&mut m)[..],
        [MapEvent::Unavailable { .. }]
    ));
    assert_eq!(m.poll_timeout(), None);
    // The gateway's daemon comes up and announces itself.
    let t1 = t0 + Duration::from_secs(60);
    m.handle_announcement(t1, gw_announcing(), &announce(0));
    let req = sent(&mut m);
    assert_eq!(req.len(), 1, "PCP at once");
    m.handle_datagram(t1, gw(), &pcp_answer_at(0, &req[0], 0, EXT, PORT, 7200));
    assert!(matches!(&events(&mut m)[..], [MapEvent::Mapped { .. }]));
    // While deleting on the way out, announcements are ignored.
    m.shutdown(t1);
    sent(&mut m);
    m.handle_announcement(t1 + Duration::from_secs(9), gw_announcing(), &announce(0));
    assert!(sent(&mut m).is_empty() && events(&mut m).is_empty());
}

proptest! {
    /// Any bytes on the announcement port, in any phase: no panic, and a
    /// mapping only from a proper answer.
    #[test]
    fn random_announcements_never_panic(data in proptest::collection::vec(any::<u8>(), 0..80), phase in 0u8..4) {
        let t0 = Instant::now();
        let mut m = mapper(t0);
        let req = sent(&mut m);
        if phase >= 1 {
            m.handle_datagram(t0, gw(), &pcp_answer(&req[0], 0, EXT, PORT, 60));
        }
        if phase == 2 {
            m.shutdown(t0);
        }
        if phase == 3 {
            run_until(&mut m, t0 + Duration::from_secs(100));
        }
        let t1 = t0 + Duration::from_secs(30);
        m.handle_announcement(t1, gw_announcing(), &data);
        let _ = run_until(&mut m, t0 + Duration::from_secs(200));
        if let Some((_, e)) = m.mapped() {
            prop_assert!(usable(*e.ip()));
        }
    }

    /// Any bytes from the gateway, in any phase: no panic, and never a
    /// mapping it did not answer for properly.
    #[test]
    fn random_answers_never_panic(data in proptest::collection::vec(any::<u8>(), 0..80), phase in 0u8..3) {
        let t0 = Instant::now();
        let mut m = mapper(t0);
        let req = sent(&mut m);
        if phase >= 1 {
            m.handle_datagram(t0, gw(), &pcp_answer(&req[0], 0, EXT, PORT, 60));
        }
        if phase == 2 {
            m.shutdown(t0);
        }
        m.handle_datagram(t0, gw(), &data);
        let _ = run_until(&mut m, t0 + Duration::from_secs(120));
        if let Some((_, e)) = m.mapped() {
            prop_assert!(usable(*e.ip()));
        }
    }
}
