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

/// A PCP server's answer to MAP request `req`: `result`, and on success
/// `ext`:`port` for `lifetime`.
fn pcp_answer(req: &[u8], result: u8, ext: Ipv4Addr, port: u16, lifetime: u32) -> Vec<u8> {
    let mut r = req.to_vec();
    r[1] |= 0x80;
    r[2] = 0;
    r[3] = result;
    r[4..8].copy_from_slice(&lifetime.to_be_bytes());
    r[8..12].copy_from_slice(&1000u32.to_be_bytes());
    r[12..24].fill(0);
    r[42..44].copy_from_slice(&port.to_be_bytes());
    r[44..60].copy_from_slice(&ext.to_ipv6_mapped().octets());
    r
}

fn natpmp_address(ext: Ipv4Addr) -> Vec<u8> {
    let mut r = vec![0, 0x80, 0, 0, 0, 0, 3, 232];
    r.extend_from_slice(&ext.octets());
    r
}

fn natpmp_map(result: u16, port: u16, lifetime: u32) -> Vec<u8> {
    let mut r = vec![0, 0x81];
    r.extend_from_slice(&result.to_be_bytes());
    r.extend_from_slice(&1000u32.to_be_bytes());
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
    m.handle_datagram(t1, gw(), &pcp_answer(&renew[0], 0, EXT, PORT, 120));
    assert!(events(&mut m).is_empty(), "same mapping: nothing to tell");
    assert_eq!(m.poll_timeout(), Some(t1 + Duration::from_secs(60)));
    // Clean exit: lifetime 0, same nonce, done when the gateway answers.
    m.shutdown(t1);
    let del = sent(&mut m);
    assert_eq!(del.len(), 1);
    assert_eq!(lifetime_of_pcp(&del[0]), 0);
    assert_eq!(&del[0][24..36], &NONCE);
    assert!(!m.is_done());
    m.handle_datagram(t1, gw(), &pcp_answer(&del[0], 0, EXT, PORT, 0));
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
    m.handle_datagram(t1, gw(), &pcp_answer(&renew[0], 0, new, 6000, 100));
    assert!(matches!(
        &events(&mut m)[..],
        [MapEvent::Mapped { external, .. }] if *external == SocketAddrV4::new(new, 6000)
    ));
    // A refused renewal loses it.
    let t2 = t1 + Duration::from_secs(50);
    let renew = run_until(&mut m, t2);
    assert_eq!(renew.len(), 1);
    m.handle_datagram(t2, gw(), &pcp_answer(&renew[0], 8, EXT, 0, 0));
    assert!(
        matches!(&events(&mut m)[..], [MapEvent::Lost { why }] if why.contains("NO_RESOURCES"))
    );
}

proptest! {
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
