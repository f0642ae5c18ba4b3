//! The data path allocates nothing per frame: two overlays joined by an
//! in-memory wire carry pod frames (plain and TSO super-frames) both ways
//! while a counting global allocator watches the steady state.
// A test that unwraps fails loudly, which is what a test should do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use evio_overlay::crypto::{seed_from_u64, StaticKeys};
use evio_overlay::engine::{Io, Overlay, OverlayConfig, PeerCandidate, PeerInfo, MAX_DATAGRAM};
use evio_overlay::offload::{Csum, VnetHdr};
use evio_overlay::packet::{pod_ipv4_frame, IPPROTO_TCP};
use evio_overlay::path::{PathAddr, Rank};
use evio_overlay::tunnel::Identity;

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
thread_local!(static WATCH: Cell<bool> = const { Cell::new(false) });

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if WATCH.with(Cell::get) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        if WATCH.with(Cell::get) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// An Io whose buffers are all allocated up front: a ring of datagrams in
/// flight, counters for what reaches the pods.
struct Wire {
    slot: Vec<u8>,
    ring: Vec<(PathAddr, usize, [u8; 2048])>,
    len: usize,
    delivered: u64,
}

impl Wire {
    fn new() -> Wire {
        Wire {
            slot: vec![0; MAX_DATAGRAM],
            ring: (0..256)
                .map(|_| {
                    (
                        PathAddr::direct(SocketAddr::from(([0, 0, 0, 0], 0))),
                        0,
                        [0u8; 2048],
                    )
                })
                .collect(),
            len: 0,
            delivered: 0,
        }
    }
}

impl Io for Wire {
    fn datagram(&mut self) -> &mut [u8] {
        &mut self.slot
    }
    fn commit(&mut self, to: PathAddr, len: usize) {
        let e = &mut self.ring[self.len];
        e.0 = to;
        e.1 = len;
        e.2[..len].copy_from_slice(&self.slot[..len]);
        self.len += 1;
    }
    fn pod(&mut self, _frame: &mut [u8], _csum: Csum) {
        self.delivered += 1;
    }
    fn host(&mut self, _p: &mut [u8], _csum: Csum) {}
}

fn info(i: u8, key: &StaticKeys) -> PeerInfo {
    PeerInfo {
        node: format!("n{i}"),
        key: *key.public(),
        pod_subnet: format!("10.244.{i}.0/24").parse().unwrap(),
        host_addr: None,
        host_addr6: None,
        candidates: vec![PeerCandidate {
            addr: format!("203.0.113.{}:5800", 10 + i).parse().unwrap(),
            class: Rank::Direct,
        }],
        stale: false,
        bridge_mac: None,
    }
}

fn tcp_frame(src: Ipv4Addr, dst: Ipv4Addr, payload: usize) -> Vec<u8> {
    let mut tcp = Vec::with_capacity(20 + payload);
    // TCP: ports, seq, ack, data offset 5, ACK, window; checksum field
    // holds the pseudo-header seed (partial, as the kernel hands it over).
    tcp.extend_from_slice(&[
        0x9c, 0x40, 0x14, 0x51, 0, 0, 0, 1, 0, 0, 0, 1, 0x50, 0x10, 0x01, 0xf5, 0, 0, 0, 0,
    ]);
    tcp.extend((0..payload).map(|i| i as u8));
    pod_ipv4_frame(src, dst, IPPROTO_TCP, &tcp).unwrap()
}

#[test]
fn steady_state_frames_allocate_nothing() {
    let start = Instant::now();
    let ka = StaticKeys::generate();
    let kb = StaticKeys::generate();
    let (ia, ib) = (info(1, &ka), info(2, &kb));
    let mut a = Overlay::new(
        start,
        OverlayConfig::new("t", ia.pod_subnet, 1380),
        Identity::new(ka, None, "t"),
        seed_from_u64(1),
    );
    let mut b = Overlay::new(
        start,
        OverlayConfig::new("t", ib.pod_subnet, 1380),
        Identity::new(kb, None, "t"),
        seed_from_u64(2),
    );
    a.set_peers(start, &[ia.clone(), ib.clone()]);
    b.set_peers(start, &[ia.clone(), ib.clone()]);
    let (mut wa, mut wb) = (Wire::new(), Wire::new());
    let addr_a = PathAddr::direct(ia.candidates[0].addr);
    let addr_b = PathAddr::direct(ib.candidates[0].addr);
    let mut now = start;
    // Deliver what each side sent to the other.
    fn pump(now: Instant, from: PathAddr, w: &mut Wire, to: &mut Overlay, tw: &mut Wire) {
        for i in 0..w.len {
            let (_, len, buf) = &w.ring[i];
            let _ = to.from_network(now, from, &buf[..*len], tw);
        }
        w.len = 0;
    }
    let wall = Duration::from_secs(1_700_000_000);
    // Sessions are made on demand: a first frame (queued) starts them.
    let first = tcp_frame(
        Ipv4Addr::new(10, 244, 1, 2),
        Ipv4Addr::new(10, 244, 2, 3),
        10,
    );
    a.from_pod(now, &VnetHdr::default(), &first, &mut wa);
    for _ in 0..60 {
        now += Duration::from_millis(50);
        a.handle_timeout(now, wall + now.duration_since(start), &mut wa);
        b.handle_timeout(now, wall + now.duration_since(start), &mut wb);
        for _ in 0..4 {
            pump(now, addr_a, &mut wa, &mut b, &mut wb);
            pump(now, addr_b, &mut wb, &mut a, &mut wa);
        }
    }
    let plain = tcp_frame(
        Ipv4Addr::new(10, 244, 1, 2),
        Ipv4Addr::new(10, 244, 2, 3),
        1000,
    );
    let back = tcp_frame(
        Ipv4Addr::new(10, 244, 2, 3),
        Ipv4Addr::new(10, 244, 1, 2),
        100,
    );
    let tso = tcp_frame(
        Ipv4Addr::new(10, 244, 1, 2),
        Ipv4Addr::new(10, 244, 2, 3),
        1300 * 40,
    );
    let partial = VnetHdr::single(Csum::Partial {
        start: 34,
        offset: 16,
    });
    let gso = VnetHdr {
        flags: VnetHdr::F_NEEDS_CSUM,
        gso_type: VnetHdr::GSO_TCPV4,
        hdr_len: 54,
        gso_size: 1300,
        csum_start: 34,
        csum_offset: 16,
    };
    let round = |count: bool, a: &mut Overlay, b: &mut Overlay, wa: &mut Wire, wb: &mut Wire| {
        WATCH.with(|w| w.set(count));
        a.from_pod(now, &partial, &plain, wa);
        a.from_pod(now, &gso, &tso, wa);
        b.from_pod(now, &partial, &back, wb);
        pump(now, addr_a, wa, b, wb);
        pump(now, addr_b, wb, a, wa);
        WATCH.with(|w| w.set(false));
    };
    // Warm-up: first frames teach the switch, size the tables.
    for _ in 0..20 {
        round(false, &mut a, &mut b, &mut wa, &mut wb);
    }
    let before = (wb.delivered, wa.delivered);
    ALLOCS.store(0, Ordering::Relaxed);
    for _ in 0..200 {
        round(true, &mut a, &mut b, &mut wa, &mut wb);
    }
    let allocs = ALLOCS.load(Ordering::Relaxed);
    let frames = (wb.delivered - before.0) + (wa.delivered - before.1);
    assert!(frames >= 200 * 42, "the frames crossed ({frames})");
    assert_eq!(allocs, 0, "{allocs} allocations for {frames} frames");
}
