//! The NAT layer against turn-server-proto in memory, and against coturn's
//! message shapes where the two differ.

use super::*;
use turn_server_proto::api::{TurnServerApi, TurnServerPollRet};
use turn_server_proto::server::TurnServer as Server;

const SERVER: &str = "203.0.113.1:3478";
const ME: &str = "198.51.100.7:5800";

fn server_addr() -> SocketAddr {
    SERVER.parse().unwrap()
}

fn nat(now: Instant, password: &str) -> Nat {
    let cfg = NatConfig {
        port: 5800,
        stun: Vec::new(),
        turn: vec![TurnServer {
            server: server_addr(),
            transport: TurnTransport::Udp,
            username: "evio".into(),
            password: password.into(),
        }],
    };
    Nat::new(now, cfg, crate::crypto::seed_from_u64(1))
}

fn server() -> Server {
    let mut s = Server::new(TransportType::Udp, server_addr(), "test".into());
    s.add_user("evio".into(), "right".into());
    s
}

/// Moves datagrams between the NAT layer and the server for a few
/// seconds, 600 ms a round (the client sends its authenticated Allocate
/// on its timer); `spoof` runs before each of the NAT layer's datagrams
/// is answered. Returns the time reached.
fn exchange(
    nat: &mut Nat,
    srv: &mut Server,
    t0: Instant,
    mut spoof: impl FnMut(&mut Nat),
) -> Instant {
    let me: SocketAddr = ME.parse().unwrap();
    let mut now = t0;
    for round in 0..6 {
        now = t0 + Duration::from_millis(600 * round);
        nat.handle_timeout(now);
        let mut sent = Vec::new();
        while let Some(t) = nat.poll_transmit() {
            sent.push(t.data.to_vec());
        }
        let st = sio(t0, now);
        for d in sent {
            spoof(nat);
            let tr = TurnTransmit::new(&d[..], TransportType::Udp, me, server_addr());
            let mut answers = Vec::new();
            if let Some(out) = srv.recv(tr, st) {
                let d = out.data.build();
                answers.push(crate::sim::rfc_401(&d).unwrap_or(d));
            }
            while let TurnServerPollRet::AllocateSocket {
                transport,
                listen_addr,
                client_addr,
                allocation_transport,
                family,
            } = srv.poll(st)
            {
                let relay = "203.0.113.1:49152".parse().unwrap();
                srv.allocated_socket(
                    transport,
                    listen_addr,
                    client_addr,
                    allocation_transport,
                    family,
                    Ok(relay),
                    st,
                );
            }
            while let Some(t) = srv.poll_transmit(st) {
                answers.push(t.data);
            }
            for a in answers {
                let _ = nat.handle_datagram(now, server_addr(), &a);
            }
        }
    }
    now
}

/// An error-class answer with a transaction ID nobody asked.
fn forged_error() -> Vec<u8> {
    let mtype = MessageType::from_class_method(MessageClass::Error, BINDING);
    let mut m = Message::builder(mtype, TransactionId::from(42u128), MessageWriteVec::new());
    let e = ErrorCode::builder(401)
        .reason("Unauthorized")
        .build()
        .unwrap();
    m.add_attribute(&e).unwrap();
    m.finish()
}

#[test]
fn allocates_on_a_real_server_and_relays_without_copies_into_the_heap() {
    let t0 = Instant::now();
    let (mut n, mut srv) = (nat(t0, "right"), server());
    let peer: SocketAddr = "203.0.113.50:5800".parse().unwrap();
    n.set_peer_ips(t0, [peer.ip()].into_iter().collect());
    let now = exchange(&mut n, &mut srv, t0, |_| {});
    assert!(
        matches!(n.turn_states()[0].2, TurnState::Ready(_)),
        "{:?}",
        n.turn_states()
    );
    assert!(n
        .candidates()
        .iter()
        .any(|(_, c)| *c == crate::path::Class::Relay));
    assert!(
        n.candidates().iter().any(|(a, _)| a.to_string() == ME),
        "reflexive from the server"
    );
    // A datagram for a peer: framed into the caller's buffer.
    let mut out = [0u8; 256];
    let (via, to, len) = n
        .relay(now, 0, peer, b"\x84\0\0\0payload", &mut out)
        .unwrap();
    assert_eq!((via, to), (Sock::Udp, server_addr()));
    assert!(len > 11);
}

#[test]
fn spoofed_errors_from_the_servers_address_change_nothing() {
    let t0 = Instant::now();
    let (mut n, mut srv) = (nat(t0, "right"), server());
    let forged = forged_error();
    exchange(&mut n, &mut srv, t0, |n| {
        let _ = n.handle_datagram(t0, server_addr(), &forged);
    });
    assert!(
        matches!(n.turn_states()[0].2, TurnState::Ready(_)),
        "{:?}",
        n.turn_states()
    );
    assert!(n.junk > 0, "the forgeries were counted");
    // And once ready, more of them still change nothing.
    for _ in 0..100 {
        let _ = n.handle_datagram(t0, server_addr(), &forged);
    }
    assert!(matches!(n.turn_states()[0].2, TurnState::Ready(_)));
}

#[test]
fn wrong_credentials_are_reported_at_once_not_after_a_timeout() {
    let t0 = Instant::now();
    let (mut n, mut srv) = (nat(t0, "wrong"), server());
    let now = exchange(&mut n, &mut srv, t0, |_| {});
    match &n.turn_states()[0].2 {
        TurnState::Failed(why) => assert!(why.contains("401"), "{why}"),
        s => panic!("{s:?}"),
    }
    // Not retried before the credentials pause.
    n.handle_timeout(now + Duration::from_secs(20));
    assert!(matches!(n.turn_states()[0].2, TurnState::Failed(_)));
}

#[test]
fn tcp_frames_are_cut_with_channel_data_padding() {
    // ChannelData of 5 bytes takes 12 on a stream; STUN is 20 + length.
    let mut stream = vec![0x40, 0x00, 0x00, 0x05, 1, 2, 3, 4, 5, 0, 0, 0];
    assert_eq!(tcp_frame(&stream), Some((9, 12)));
    assert_eq!(tcp_frame(&stream[..11]), None, "padding not there yet");
    stream = vec![0x01, 0x01, 0x00, 0x04];
    stream.extend([0u8; 20]);
    assert_eq!(tcp_frame(&stream), Some((24, 24)));
    assert_eq!(tcp_frame(&[0x99, 0, 0, 0]), None);
    assert_eq!(tcp_frame(&[0x40, 0]), None);
}

#[test]
fn a_relayed_sub_slice_is_found_in_its_buffer() {
    let buf = [0u8; 32];
    assert_eq!(within(&buf, &buf[4..10]), Some(4..10));
    let other = [0u8; 8];
    assert_eq!(within(&buf, &other), None);
}

// --- A killed agent's leftover allocation (issue 21), coturn's shapes ---

use stun_proto::types::attribute::{MessageIntegrity, Nonce, Realm, Software, Username};
use stun_proto::types::message::{IntegrityAlgorithm, LongTermCredentials};
use turn_client_proto::types::attribute::Lifetime;
use turn_client_proto::types::message::REFRESH;

/// Everything the NAT layer wants sent now, parsed owners.
fn sent(n: &mut Nat) -> Vec<(Sock, Vec<u8>)> {
    let mut v = Vec::new();
    while let Some(t) = n.poll_transmit() {
        v.push((t.via, t.data.to_vec()));
    }
    v
}

/// The one request of `method` among `out`.
fn request_of(out: &[(Sock, Vec<u8>)], method: stun_proto::types::message::Method) -> Vec<u8> {
    let found: Vec<&Vec<u8>> = out
        .iter()
        .map(|(_, d)| d)
        .filter(|d| {
            Message::from_bytes(d)
                .is_ok_and(|m| m.has_class(MessageClass::Request) && m.has_method(method))
        })
        .collect();
    assert_eq!(found.len(), 1, "{} of {method:?} in {out:?}", found.len());
    found[0].clone()
}

/// coturn 4.6.1's error answer to `req` (ns_turn_server.c): ERROR-CODE,
/// SOFTWARE, FINGERPRINT; a 401 also REALM and NONCE (a plain hex nonce,
/// no RFC 8489 cookie); nothing is signed.
fn coturn_error(req: &[u8], code: u16, reason: &str, realm_nonce: Option<(&str, &str)>) -> Vec<u8> {
    let req = Message::from_bytes(req).unwrap();
    let mut m = Message::builder_error(&req, MessageWriteVec::new());
    m.add_attribute(&ErrorCode::builder(code).reason(reason).build().unwrap())
        .unwrap();
    if let Some((realm, nonce)) = realm_nonce {
        m.add_attribute(&Nonce::new(nonce).unwrap()).unwrap();
        m.add_attribute(&Realm::new(realm).unwrap()).unwrap();
    }
    m.add_attribute(&Software::new("Coturn-4.6.1 'Gorst'").unwrap())
        .unwrap();
    m.add_fingerprint().unwrap();
    m.finish()
}

fn key(password: &str) -> stun_proto::types::message::IntegrityKey {
    LongTermCredentials::new("evio".into(), password.into())
        .to_key("evio.test".into())
        .make_key(IntegrityAlgorithm::Sha1)
}

/// coturn's success answer to a signed Refresh: LIFETIME, signed.
fn coturn_refresh_ok(req: &[u8], lifetime: u32) -> Vec<u8> {
    let req = Message::from_bytes(req).unwrap();
    let mut m = Message::builder_success(&req, MessageWriteVec::new());
    m.add_attribute(&Lifetime::new(lifetime)).unwrap();
    m.add_message_integrity_with_key(&key("right"), IntegrityAlgorithm::Sha1)
        .unwrap();
    m.add_fingerprint().unwrap();
    m.finish()
}

#[test]
fn a_437_to_our_allocate_releases_the_leftover_with_a_signed_refresh_then_allocates() {
    let t0 = Instant::now();
    let mut n = nat(t0, "right");
    n.handle_timeout(t0);
    let alloc = request_of(&sent(&mut n), ALLOCATE);
    // A forged 437 (a transaction nobody asked) changes nothing.
    let nobody = Message::builder(
        MessageType::from_class_method(MessageClass::Request, ALLOCATE),
        TransactionId::from(42u128),
        MessageWriteVec::new(),
    )
    .finish();
    let forged = coturn_error(&nobody, 437, "Forged", None);
    let _ = n.handle_datagram(t0, server_addr(), &forged);
    assert!(sent(&mut n).is_empty());
    // coturn answers the unsigned Allocate of the new agent with 437.
    let mismatch = coturn_error(
        &alloc,
        437,
        "Mismatched allocation: wrong transaction ID",
        None,
    );
    assert_eq!(
        n.handle_datagram(t0, server_addr(), &mismatch),
        Datagram::Consumed
    );
    let out = sent(&mut n);
    let first = request_of(&out, REFRESH);
    let m = Message::from_bytes(&first).unwrap();
    assert_eq!(m.attribute::<Lifetime>().unwrap().seconds(), 0);
    assert!(m.attribute::<MessageIntegrity>().is_err(), "unsigned first");
    assert_eq!(n.turn_states()[0].2, TurnState::Allocating);
    // Its challenge, then our signed Refresh with the realm and nonce.
    let challenge = coturn_error(
        &first,
        401,
        "Unauthorized",
        Some(("evio.test", "4a3f09be51c2d7e8")),
    );
    let _ = n.handle_datagram(t0, server_addr(), &challenge);
    let signed = request_of(&sent(&mut n), REFRESH);
    let m = Message::from_bytes(&signed).unwrap();
    assert_eq!(m.attribute::<Username>().unwrap().username(), "evio");
    assert_eq!(m.attribute::<Nonce>().unwrap().nonce(), "4a3f09be51c2d7e8");
    assert_eq!(m.attribute::<Lifetime>().unwrap().seconds(), 0);
    m.validate_integrity_with_key(&key("right"))
        .expect("signed with the long-term key");
    // Deleted: coturn frees it a second later, so we wait a little.
    let t1 = t0 + Duration::from_millis(40);
    let _ = n.handle_datagram(t1, server_addr(), &coturn_refresh_ok(&signed, 0));
    n.handle_timeout(t1 + Duration::from_millis(500));
    assert!(sent(&mut n)
        .iter()
        .all(|(_, d)| !Message::from_bytes(d).is_ok_and(|m| m.has_method(ALLOCATE))));
    let t2 = t1 + RELEASE_SETTLE;
    n.handle_timeout(t2);
    let again = request_of(&sent(&mut n), ALLOCATE);
    assert_ne!(
        Message::from_bytes(&again).unwrap().transaction_id(),
        Message::from_bytes(&alloc).unwrap().transaction_id()
    );
    // A 437 right after a release is that allocation still going: wait
    // for it, no second release (it would restart coturn's second).
    let late = coturn_error(
        &again,
        437,
        "Mismatched allocation: wrong transaction ID",
        None,
    );
    let _ = n.handle_datagram(t2, server_addr(), &late);
    assert!(sent(&mut n).is_empty());
    n.handle_timeout(t2 + RELEASE_SETTLE);
    request_of(&sent(&mut n), ALLOCATE);
    // And a real server gives us the allocation.
    let mut n = nat(t0, "right");
    let mut srv = server();
    exchange(&mut n, &mut srv, t0, |_| {});
    assert!(matches!(n.turn_states()[0].2, TurnState::Ready(_)));
}

#[test]
fn a_refused_release_is_reported_and_retried_later() {
    let t0 = Instant::now();
    let mut n = nat(t0, "right");
    n.handle_timeout(t0);
    let alloc = request_of(&sent(&mut n), ALLOCATE);
    let mismatch = coturn_error(
        &alloc,
        437,
        "Mismatched allocation: wrong transaction ID",
        None,
    );
    let _ = n.handle_datagram(t0, server_addr(), &mismatch);
    let first = request_of(&sent(&mut n), REFRESH);
    let challenge = coturn_error(&first, 401, "Unauthorized", Some(("evio.test", "aa")));
    let _ = n.handle_datagram(t0, server_addr(), &challenge);
    let signed = request_of(&sent(&mut n), REFRESH);
    // The leftover was made under another username: coturn says 441.
    let _ = n.handle_datagram(
        t0,
        server_addr(),
        &coturn_error(&signed, 441, "Wrong credentials", None),
    );
    match &n.turn_states()[0].2 {
        TurnState::Failed(why) => assert!(why.contains("did not release it (441"), "{why}"),
        s => panic!("{s:?}"),
    }
    // Tried again after the usual pause.
    n.handle_timeout(t0 + RETRY_MIN);
    request_of(&sent(&mut n), ALLOCATE);
}

#[test]
fn over_tcp_a_437_means_a_new_connection_not_a_release() {
    let t0 = Instant::now();
    let cfg = NatConfig {
        port: 5800,
        stun: Vec::new(),
        turn: vec![TurnServer {
            server: server_addr(),
            transport: TurnTransport::Tcp,
            username: "evio".into(),
            password: "right".into(),
        }],
    };
    let mut n = Nat::new(t0, cfg, crate::crypto::seed_from_u64(1));
    n.handle_timeout(t0);
    assert_eq!(
        n.poll_event(),
        Some(NatEvent::TcpConnect {
            conn: 0,
            to: server_addr()
        })
    );
    n.tcp_connected(t0, 0, "198.51.100.7:40000".parse().unwrap());
    let out = sent(&mut n);
    assert!(out.iter().all(|(via, _)| *via == Sock::Tcp(0)));
    let alloc = request_of(&out, ALLOCATE);
    let mismatch = coturn_error(
        &alloc,
        437,
        "Mismatched allocation: wrong transaction ID",
        None,
    );
    n.handle_tcp_bytes(t0, 0, &mismatch);
    let mut buf = [0u8; 64];
    assert_eq!(n.poll_relayed(t0, &mut buf), None);
    assert!(request_of_opt(&sent(&mut n), REFRESH).is_none());
    n.handle_timeout(t0);
    let events: Vec<NatEvent> = std::iter::from_fn(|| n.poll_event()).collect();
    assert!(
        events.contains(&NatEvent::TcpClose { conn: 0 }),
        "{events:?}"
    );
    assert!(
        events.contains(&NatEvent::TcpConnect {
            conn: 0,
            to: server_addr()
        }),
        "{events:?}"
    );
}

fn request_of_opt(
    out: &[(Sock, Vec<u8>)],
    method: stun_proto::types::message::Method,
) -> Option<Vec<u8>> {
    out.iter()
        .map(|(_, d)| d)
        .find(|d| Message::from_bytes(d).is_ok_and(|m| m.has_method(method)))
        .cloned()
}

// --- Is our allocation still there? (a TURN server restart) ---

/// Hands `req` to `srv` and its answer (turn-server-proto's 401 made
/// RFC-shaped, as in the simulator) back to `n`; what `n` sends next.
fn answer(
    n: &mut Nat,
    srv: &mut Server,
    t0: Instant,
    now: Instant,
    req: &[u8],
) -> Vec<(Sock, Vec<u8>)> {
    let me: SocketAddr = ME.parse().unwrap();
    let tr = TurnTransmit::new(req, TransportType::Udp, me, server_addr());
    let a = srv.recv(tr, sio(t0, now)).map(|a| a.data.build()).unwrap();
    let a = crate::sim::rfc_401(&a).unwrap_or(a);
    let _ = n.handle_datagram(now, server_addr(), &a);
    sent(n)
}

#[test]
fn a_dead_relayed_path_asks_the_server_and_renews_only_when_it_forgot() {
    let t0 = Instant::now();
    let (mut n, mut srv) = (nat(t0, "right"), server());
    let now = exchange(&mut n, &mut srv, t0, |_| {});
    let ready = n.turn_states()[0].2.clone();
    assert!(matches!(ready, TurnState::Ready(_)), "{ready:?}");
    // The server still knows it: a Refresh of our usual lifetime (first
    // unsigned, then signed after the challenge), nothing renewed.
    n.renew(now, 0);
    let check = request_of(&sent(&mut n), REFRESH);
    let m = Message::from_bytes(&check).unwrap();
    assert_eq!(m.attribute::<Lifetime>().unwrap().seconds(), LIFETIME);
    let signed = request_of(&answer(&mut n, &mut srv, t0, now, &check), REFRESH);
    assert!(answer(&mut n, &mut srv, t0, now, &signed).is_empty());
    n.handle_timeout(now);
    assert!(request_of_opt(&sent(&mut n), ALLOCATE).is_none());
    assert_eq!(n.turn_states()[0].2, ready);
    // Not again within the pause.
    n.renew(now + Duration::from_secs(1), 0);
    assert!(request_of_opt(&sent(&mut n), REFRESH).is_none());
    // The server restarted: it answers 437, and we allocate again at once.
    let mut srv = server();
    let later = now + CHECK_PAUSE;
    n.renew(later, 0);
    let check = request_of(&sent(&mut n), REFRESH);
    let signed = request_of(&answer(&mut n, &mut srv, t0, later, &check), REFRESH);
    let _ = answer(&mut n, &mut srv, t0, later, &signed);
    match &n.turn_states()[0].2 {
        TurnState::Failed(why) => assert!(why.contains("no longer knows"), "{why}"),
        s => panic!("{s:?}"),
    }
    n.handle_timeout(later);
    request_of(&sent(&mut n), ALLOCATE);
}
