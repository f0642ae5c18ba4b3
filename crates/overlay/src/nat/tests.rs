//! The NAT layer against turn-server-proto in memory, and against coturn's
//! message shapes where the two differ.

use super::*;
use turn_server_proto::api::TurnServerApi;
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
            crate::sim::grant_sockets(srv, st, || "203.0.113.1:49152".parse().unwrap());
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
        .any(|(_, c)| *c == crate::path::Rank::Relay));
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
/// coturn's 437 to an Allocate from a 5-tuple that holds an allocation.
fn coturn_437(req: &[u8]) -> Vec<u8> {
    coturn_error(
        req,
        437,
        "Mismatched allocation: wrong transaction ID",
        None,
    )
}

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
    let mismatch = coturn_437(&alloc);
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
    let late = coturn_437(&again);
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
fn a_refused_release_asks_for_another_port_at_once() {
    let t0 = Instant::now();
    let mut n = nat(t0, "right");
    n.handle_timeout(t0);
    let alloc = request_of(&sent(&mut n), ALLOCATE);
    let mismatch = coturn_437(&alloc);
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
    assert_eq!(n.turn_states()[0].2, TurnState::Connecting);
    assert!(n.slots[0]
        .logged
        .as_deref()
        .is_some_and(|l| l.contains("did not release it (441")));
    let events: Vec<NatEvent> = std::iter::from_fn(|| n.poll_event()).collect();
    assert!(
        events.contains(&NatEvent::UdpOpen {
            conn: 0,
            to: server_addr()
        }),
        "{events:?}"
    );
    // Not retried on the overlay's socket.
    n.handle_timeout(t0 + RETRY_MAX);
    assert!(request_of_opt(&sent(&mut n), ALLOCATE).is_none());
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
    let mismatch = coturn_437(&alloc);
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

// --- A leftover the server will not release: another local port ---

/// The address the server sees the NAT layer's own UDP socket for server
/// 0 at, and the local address the caller bound it to.
const ME_OWN: &str = "198.51.100.7:40001";
const OWN_LOCAL: &str = "0.0.0.0:40001";

/// Everything the NAT layer sent through one driver, in order.
type Log = Vec<(Sock, Vec<u8>)>;

/// An in-memory server reached from both of the NAT layer's UDP sockets,
/// refusing releases as coturn does when the leftover was made under
/// another username (441); the caller's part of the UDP sockets is played
/// too (a UdpOpen is answered with OWN_LOCAL).
struct Refusing {
    srv: Server,
    next_relay: u16,
    log: Log,
    opened: u32,
}

fn public_of(via: Sock) -> SocketAddr {
    match via {
        Sock::UdpOwn(0) => ME_OWN.parse().unwrap(),
        Sock::Udp => ME.parse().unwrap(),
        other => panic!("{other:?}"),
    }
}

fn sock_of(to: SocketAddr) -> Sock {
    if to == ME_OWN.parse().unwrap() {
        Sock::UdpOwn(0)
    } else {
        Sock::Udp
    }
}

fn is_signed_release(d: &[u8]) -> bool {
    Message::from_bytes(d).is_ok_and(|m| {
        m.has_class(MessageClass::Request)
            && m.has_method(REFRESH)
            && m.attribute::<Lifetime>().is_ok_and(|l| l.seconds() == 0)
            && m.attribute::<MessageIntegrity>().is_ok()
    })
}

impl Refusing {
    fn new() -> Refusing {
        Refusing {
            srv: server(),
            next_relay: 49152,
            log: Vec::new(),
            opened: 0,
        }
    }

    /// Hands one datagram from `from` to the server; its answers, by the
    /// client address they go to.
    fn serve(
        &mut self,
        t0: Instant,
        now: Instant,
        from: SocketAddr,
        to: SocketAddr,
        d: &[u8],
    ) -> Vec<(SocketAddr, Vec<u8>)> {
        let st = sio(t0, now);
        let mut answers = Vec::new();
        if is_signed_release(d) {
            answers.push((from, coturn_error(d, 441, "Wrong credentials", None)));
            return answers;
        }
        let tr = TurnTransmit::new(d, TransportType::Udp, from, to);
        if let Some(out) = self.srv.recv(tr, st) {
            let a = out.data.build();
            let dest = if out.to == server_addr() {
                from
            } else {
                out.to
            };
            answers.push((dest, crate::sim::rfc_401(&a).unwrap_or(a)));
        }
        let next = &mut self.next_relay;
        crate::sim::grant_sockets(&mut self.srv, st, || {
            *next += 1;
            SocketAddr::new(server_addr().ip(), *next - 1)
        });
        while let Some(t) = self.srv.poll_transmit(st) {
            answers.push((t.to, t.data));
        }
        answers
    }

    /// 600 ms rounds from `t0 + start` for `rounds` rounds: what the NAT
    /// layer sends goes to the server from the address of the socket it
    /// left by, answers come back on the socket they are addressed to.
    fn rounds(&mut self, n: &mut Nat, t0: Instant, start: u64, rounds: u64) -> Instant {
        let mut now = t0;
        for round in start..start + rounds {
            now = t0 + Duration::from_millis(600 * round);
            n.handle_timeout(now);
            self.pump(n, t0, now);
        }
        now
    }

    fn pump(&mut self, n: &mut Nat, t0: Instant, now: Instant) {
        for _ in 0..20 {
            while let Some(e) = n.poll_event() {
                if let NatEvent::UdpOpen { conn: 0, to } = e {
                    assert_eq!(to, server_addr());
                    self.opened += 1;
                    n.udp_opened(now, 0, OWN_LOCAL.parse().unwrap());
                }
            }
            let out = sent(n);
            if out.is_empty() {
                return;
            }
            for (via, d) in out {
                self.log.push((via, d.clone()));
                let from = public_of(via);
                for (to, a) in self.serve(t0, now, from, server_addr(), &d) {
                    if to.ip() == from.ip() {
                        let _ = n.handle_datagram_on(now, sock_of(to), server_addr(), &a);
                    }
                }
            }
        }
    }
}

/// Whether `d` is TURN traffic: anything but a STUN Binding.
fn is_turn(d: &[u8]) -> bool {
    wire::demux(d) == Demux::ChannelData
        || Message::from_bytes(d).is_ok_and(|m| !m.has_method(BINDING))
}

#[test]
fn a_refused_release_moves_the_server_to_a_port_of_its_own_and_relays_through_it() {
    let t0 = Instant::now();
    let peer: SocketAddr = "203.0.113.50:5800".parse().unwrap();
    let mut wire = Refusing::new();
    // A killed agent's allocation, under our overlay port.
    let mut old = nat(t0, "right");
    wire.rounds(&mut old, t0, 0, 6);
    assert!(matches!(old.turn_states()[0].2, TurnState::Ready(_)));
    drop(old);
    wire.log.clear();
    // The new agent: 437, a release the server refuses, another port.
    let mut n = nat(t0, "right");
    n.set_peer_ips(t0, [peer.ip()].into_iter().collect());
    let now = wire.rounds(&mut n, t0, 10, 8);
    let relayed = match n.turn_states()[0].2 {
        TurnState::Ready(a) => a,
        ref s => panic!("{s:?}"),
    };
    assert_eq!(wire.opened, 1, "one socket asked for");
    assert_eq!(n.turn_sock(0), Some(Sock::UdpOwn(0)));
    let refused = wire
        .log
        .iter()
        .position(|(_, d)| is_signed_release(d))
        .expect("a signed release was tried first");
    assert!(wire.log[..refused].iter().all(|(v, _)| *v == Sock::Udp));
    // Nothing of TURN on the overlay's socket after the refusal.
    let after = &wire.log[refused + 1..];
    assert!(
        after
            .iter()
            .all(|(v, d)| *v == Sock::UdpOwn(0) || !is_turn(d)),
        "{after:?}"
    );
    assert!(after.iter().any(|(v, d)| *v == Sock::UdpOwn(0)
        && Message::from_bytes(d).is_ok_and(|m| m.has_method(ALLOCATE))));
    // Out: a peer datagram leaves through the port of its own and the
    // server passes it on from our relayed address.
    let mut out = [0u8; 256];
    let (via, to, len) = n
        .relay(now, 0, peer, b"\x84\0\0\0payload", &mut out)
        .unwrap();
    assert_eq!((via, to), (Sock::UdpOwn(0), server_addr()));
    let fwd = wire.serve(t0, now, ME_OWN.parse().unwrap(), server_addr(), &out[..len]);
    assert!(
        fwd.iter()
            .any(|(to, d)| *to == peer && d.ends_with(b"payload")),
        "{fwd:?}"
    );
    // In: the peer's datagram to our relayed address arrives on that
    // socket and is handed up; on the overlay's socket it is not ours.
    let back = wire.serve(t0, now, peer, relayed, b"\x84\0\0\0reply");
    let [(to, back)] = &back[..] else {
        panic!("{back:?}")
    };
    assert_eq!(*to, ME_OWN.parse::<SocketAddr>().unwrap());
    let junk = n.junk;
    assert_eq!(
        n.handle_datagram_on(now, Sock::Udp, server_addr(), back),
        Datagram::NotMine
    );
    assert_eq!(n.junk, junk + 1);
    match n.handle_datagram_on(now, Sock::UdpOwn(0), server_addr(), back) {
        Datagram::Relayed(p, inner) => {
            assert_eq!(p.via, Via::Turn(0));
            assert_eq!(p.remote, peer);
            assert_eq!(inner, b"\x84\0\0\0reply");
        }
        other => panic!("{other:?}"),
    }
    // A check of the allocation goes the same way.
    n.renew(now, 0);
    let check = sent(&mut n);
    assert!(!check.is_empty());
    assert!(check.iter().all(|(v, _)| *v == Sock::UdpOwn(0)));
    // With nothing relayed, a Binding indication every gather interval
    // keeps the NAT's mapping of the new port (the overlay port's are kept
    // by its STUN bindings).
    let mut indications = 0;
    for k in 1..=3u32 {
        let at = now + GATHER_INTERVAL * k;
        n.handle_timeout(at);
        indications += sent(&mut n)
            .iter()
            .filter(|(v, d)| {
                *v == Sock::UdpOwn(0)
                    && Message::from_bytes(d).is_ok_and(|m| {
                        m.has_class(MessageClass::Indication) && m.has_method(BINDING)
                    })
            })
            .count();
    }
    assert!(indications >= 3, "{indications} keepalives over 30 s");
}

#[test]
fn a_437_that_outlasts_the_release_moves_to_another_port_and_a_second_refusal_to_a_third() {
    let t0 = Instant::now();
    let mut n = nat(t0, "right");
    let alloc_437 = |n: &mut Nat, now: Instant, via: Sock| {
        n.handle_timeout(now);
        let out = sent(n);
        assert!(out.iter().all(|(v, _)| *v == via), "{out:?}");
        let alloc = request_of(&out, ALLOCATE);
        let m = coturn_437(&alloc);
        let _ = n.handle_datagram_on(now, via, server_addr(), &m);
        sent(n)
    };
    // The server takes the release, and keeps the allocation.
    let first = request_of(&alloc_437(&mut n, t0, Sock::Udp), REFRESH);
    let challenge = coturn_error(&first, 401, "Unauthorized", Some(("evio.test", "aa")));
    let _ = n.handle_datagram(t0, server_addr(), &challenge);
    let signed = request_of(&sent(&mut n), REFRESH);
    let _ = n.handle_datagram(t0, server_addr(), &coturn_refresh_ok(&signed, 0));
    // 437s within the grace: waited for, on the same socket.
    let mut now = t0;
    while now + RELEASE_SETTLE < t0 + RELEASE_GRACE {
        now += RELEASE_SETTLE;
        let out = alloc_437(&mut n, now, Sock::Udp);
        assert!(request_of_opt(&out, REFRESH).is_none(), "no second release");
        assert!(
            std::iter::from_fn(|| n.poll_event()).all(|e| !matches!(e, NatEvent::UdpOpen { .. }))
        );
        assert_eq!(n.turn_sock(0), Some(Sock::Udp));
    }
    // Past it: another port.
    now += RELEASE_SETTLE;
    let out = alloc_437(&mut n, now, Sock::Udp);
    assert!(request_of_opt(&out, REFRESH).is_none(), "no second release");
    let events: Vec<NatEvent> = std::iter::from_fn(|| n.poll_event()).collect();
    assert!(
        events.contains(&NatEvent::UdpOpen {
            conn: 0,
            to: server_addr()
        }),
        "{events:?}"
    );
    assert_eq!(n.turn_sock(0), Some(Sock::UdpOwn(0)));
    // Nothing leaves before the socket is there; it times out if never.
    n.handle_timeout(now + Duration::from_millis(100));
    assert!(sent(&mut n).is_empty());
    n.udp_opened(now, 0, OWN_LOCAL.parse().unwrap());
    // The same on the new port, refused this time: a third port, the
    // second closed.
    let out = sent(&mut n);
    let alloc = request_of(&out, ALLOCATE);
    assert!(out.iter().all(|(v, _)| *v == Sock::UdpOwn(0)));
    let m = coturn_437(&alloc);
    assert_eq!(
        n.handle_datagram(now, server_addr(), &m),
        Datagram::NotMine,
        "not heard on the overlay's socket"
    );
    let _ = n.handle_datagram_on(now, Sock::UdpOwn(0), server_addr(), &m);
    let out = sent(&mut n);
    let first = request_of(&out, REFRESH);
    assert!(out.iter().all(|(v, _)| *v == Sock::UdpOwn(0)));
    let challenge = coturn_error(&first, 401, "Unauthorized", Some(("evio.test", "bb")));
    let _ = n.handle_datagram_on(now, Sock::UdpOwn(0), server_addr(), &challenge);
    let signed = request_of(&sent(&mut n), REFRESH);
    let refusal = coturn_error(&signed, 441, "Wrong credentials", None);
    let _ = n.handle_datagram_on(now, Sock::UdpOwn(0), server_addr(), &refusal);
    let events: Vec<NatEvent> = std::iter::from_fn(|| n.poll_event()).collect();
    let close = events
        .iter()
        .position(|e| *e == NatEvent::UdpClose { conn: 0 });
    let open = events
        .iter()
        .position(|e| matches!(e, NatEvent::UdpOpen { conn: 0, .. }));
    assert!(close.is_some() && close < open, "{events:?}");
    // A second move in a row waits the backoff before it allocates: a
    // server that refuses on every port is not hammered.
    n.udp_opened(now, 0, OWN_LOCAL.parse().unwrap());
    assert!(
        sent(&mut n).is_empty(),
        "allocated at once after a second move"
    );
    n.handle_timeout(now + RETRY_MAX);
    request_of(&sent(&mut n), ALLOCATE);
    // A socket that cannot (or can no longer) be used: back to the
    // overlay's, after a pause.
    n.udp_closed(now, 0, "EMFILE");
    assert_eq!(n.turn_sock(0), Some(Sock::Udp));
    assert!(matches!(&n.turn_states()[0].2, TurnState::Failed(w) if w.contains("EMFILE")));
    n.handle_timeout(now + RETRY_MAX);
    let out = sent(&mut n);
    request_of(&out, ALLOCATE);
    assert!(out.iter().all(|(v, _)| *v == Sock::Udp));
}

#[test]
fn a_release_nobody_answers_moves_to_another_port_and_a_socket_never_opened_times_out() {
    let t0 = Instant::now();
    let mut n = nat(t0, "right");
    n.handle_timeout(t0);
    let alloc = request_of(&sent(&mut n), ALLOCATE);
    let m = coturn_437(&alloc);
    let _ = n.handle_datagram(t0, server_addr(), &m);
    request_of(&sent(&mut n), REFRESH);
    // Silence: three sends over 3 s, then another port.
    let mut now = t0;
    while n.turn_sock(0) == Some(Sock::Udp) {
        now = n.poll_timeout();
        assert!(now < t0 + SETUP_TIMEOUT, "still on the overlay's socket");
        n.handle_timeout(now);
        let _ = sent(&mut n);
    }
    let events: Vec<NatEvent> = std::iter::from_fn(|| n.poll_event()).collect();
    assert!(
        events.contains(&NatEvent::UdpOpen {
            conn: 0,
            to: server_addr()
        }),
        "{events:?}"
    );
    // The caller never answers: given up after the set-up timeout, the
    // socket closed, and the next try is on the overlay's socket.
    assert!(n.poll_timeout() <= now + SETUP_TIMEOUT);
    n.handle_timeout(now + SETUP_TIMEOUT);
    let events: Vec<NatEvent> = std::iter::from_fn(|| n.poll_event()).collect();
    assert!(
        events.contains(&NatEvent::UdpClose { conn: 0 }),
        "{events:?}"
    );
    assert_eq!(n.turn_sock(0), Some(Sock::Udp));
    // A late answer to the open is not taken, and its socket goes back to
    // be closed.
    n.udp_opened(now + SETUP_TIMEOUT, 0, OWN_LOCAL.parse().unwrap());
    assert_eq!(n.turn_sock(0), Some(Sock::Udp));
    let events: Vec<NatEvent> = std::iter::from_fn(|| n.poll_event()).collect();
    assert_eq!(events, [NatEvent::UdpClose { conn: 0 }]);
}

/// STUN over IPv6 (issue 25): a server with an IPv6 address is asked like
/// an IPv4 one (the agent sends to it from its IPv6 socket), and its answer
/// is a reflexive candidate of that family, beside the IPv4 one.
#[test]
fn a_stun_server_on_ipv6_gives_an_ipv6_reflexive_candidate() {
    let t0 = Instant::now();
    let (s4, s6): (SocketAddr, SocketAddr) = (
        "203.0.113.1:3478".parse().unwrap(),
        "[2001:db8::1]:3478".parse().unwrap(),
    );
    let (me4, me6): (SocketAddr, SocketAddr) =
        (ME.parse().unwrap(), "[2001:db8:1::2]:5800".parse().unwrap());
    let cfg = NatConfig {
        port: 5800,
        stun: vec![s4, s6],
        turn: Vec::new(),
    };
    let mut n = Nat::new(t0, cfg, crate::crypto::seed_from_u64(2));
    n.handle_timeout(t0);
    let mut asked = Vec::new();
    while let Some(t) = n.poll_transmit() {
        asked.push((t.via, t.to, t.data.to_vec()));
    }
    assert_eq!(asked.len(), 2, "{asked:?}");
    for (via, to, req) in asked {
        assert_eq!(via, Sock::Udp);
        let tid = Message::from_bytes(&req).unwrap().transaction_id();
        let mapped = if to.is_ipv6() { me6 } else { me4 };
        let mtype = MessageType::from_class_method(MessageClass::Success, BINDING);
        let mut m = Message::builder(mtype, tid, MessageWriteVec::new());
        m.add_attribute(&XorMappedAddress::new(mapped, tid))
            .unwrap();
        let answer = m.finish();
        assert_eq!(n.handle_datagram(t0, to, &answer), Datagram::Consumed);
    }
    let got: Vec<SocketAddr> = n.candidates().iter().map(|c| c.0).collect();
    assert_eq!(got, vec![me4, me6]);
}

/// The server relays on a channel once it bound it; the success answer
/// to our ChannelBind may come later or be lost (then a retransmission,
/// 0.5-1.5 s, brings it). Meanwhile the peer's ChannelData is the peer's
/// data, not junk: the simulator's first frame to an idle symmetric peer
/// waited 1.6 s for it (seed 10, the answer and the retransmission lost).
#[test]
fn channel_data_on_a_channel_we_asked_for_is_the_peers_before_the_answer() {
    let t0 = Instant::now();
    let (mut n, mut srv) = (nat(t0, "right"), server());
    let peer: SocketAddr = "203.0.113.50:5800".parse().unwrap();
    n.set_peer_ips(t0, [peer.ip()].into_iter().collect());
    let now = exchange(&mut n, &mut srv, t0, |_| {});
    let relayed: SocketAddr = "203.0.113.1:49152".parse().unwrap();
    assert_eq!(n.turn_states()[0].2, TurnState::Ready(relayed));
    let mut out = [0u8; 256];
    n.relay(now, 0, peer, b"\x84\0\0\0first", &mut out).unwrap();
    n.handle_timeout(now);
    let bind = request_of(&sent(&mut n), CHANNEL_BIND);
    // The server binds the channel; its answer is lost.
    let (me, st) = (ME.parse().unwrap(), sio(t0, now));
    let tr = TurnTransmit::new(&bind[..], TransportType::Udp, me, server_addr());
    let answer = srv.recv(tr, st).map(|o| o.data.build());
    assert!(
        answer.is_some_and(
            |a| Message::from_bytes(&a).is_ok_and(|m| m.has_class(MessageClass::Success))
        )
    );
    // The peer answers: ChannelData from the server.
    let tr = TurnTransmit::new(&b"\x84\0\0\0reply"[..], TransportType::Udp, peer, relayed);
    let cd = srv.recv(tr, st).map(|o| o.data.build()).unwrap();
    assert_eq!(wire::demux(&cd), Demux::ChannelData);
    match n.handle_datagram(now, server_addr(), &cd) {
        Datagram::Relayed(path, data) => {
            assert_eq!(
                path,
                PathAddr {
                    via: Via::Turn(0),
                    remote: peer
                }
            );
            assert_eq!(data, b"\x84\0\0\0reply");
        }
        other => panic!("{other:?}"),
    }
}
