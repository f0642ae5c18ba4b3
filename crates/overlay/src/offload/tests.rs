//! Tests of the offload module. Checksums are checked against a reference
//! written here from RFC 1071 (16-bit words, u32 accumulator), independent
//! of the module's 64-bit one; frames are built from scratch with the
//! kernel's conventions.

use super::*;

// ---------------------------------------------------------------------------
// Reference checksum

/// RFC 1071 sum of 16-bit big-endian words, not folded.
fn ref_sum(data: &[u8]) -> u32 {
    data.chunks(2)
        .map(|w| (u32::from(w[0]) << 8) | u32::from(*w.get(1).unwrap_or(&0)))
        .sum()
}

fn ref_fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

fn ref_pseudo(src: &[u8], dst: &[u8], proto: u8, len: usize) -> u32 {
    ref_sum(src) + ref_sum(dst) + u32::from(proto) + (len as u32 >> 16) + (len as u32 & 0xffff)
}

/// Where a built frame's headers are.
#[derive(Clone, Copy, Debug)]
struct Layout {
    v6: bool,
    l3: usize,
    l4: usize,
}

impl Layout {
    fn of(frame: &[u8], framing: Framing) -> Layout {
        let l3 = framing.l3_offset();
        let v6 = frame[l3] >> 4 == 6;
        let l4 = if v6 {
            l3 + 40
        } else {
            l3 + usize::from(frame[l3] & 0xf) * 4
        };
        Layout { v6, l3, l4 }
    }

    fn addrs<'f>(&self, frame: &'f [u8]) -> (&'f [u8], &'f [u8]) {
        if self.v6 {
            (
                &frame[self.l3 + 8..self.l3 + 24],
                &frame[self.l3 + 24..self.l3 + 40],
            )
        } else {
            (
                &frame[self.l3 + 12..self.l3 + 16],
                &frame[self.l3 + 16..self.l3 + 20],
            )
        }
    }

    /// The seed a partial frame of this L4 length must carry.
    fn ref_seed(&self, frame: &[u8], proto: u8) -> u16 {
        let (s, d) = self.addrs(frame);
        ref_fold(ref_pseudo(s, d, proto, frame.len() - self.l4))
    }

    /// The complete L4 checksum computed from scratch (field taken as 0).
    fn ref_complete(&self, frame: &[u8], proto: u8, field: usize) -> u16 {
        let mut l4 = frame[self.l4..].to_vec();
        l4[field] = 0;
        l4[field + 1] = 0;
        let (s, d) = self.addrs(frame);
        !ref_fold(ref_pseudo(s, d, proto, l4.len()) + ref_sum(&l4))
    }

    fn l4_valid(&self, frame: &[u8], proto: u8) -> bool {
        let (s, d) = self.addrs(frame);
        ref_fold(ref_pseudo(s, d, proto, frame.len() - self.l4) + ref_sum(&frame[self.l4..]))
            == 0xffff
    }

    fn ipv4_hdr_valid(&self, frame: &[u8]) -> bool {
        ref_fold(ref_sum(&frame[self.l3..self.l4])) == 0xffff
    }

    fn csum(&self) -> Csum {
        Csum::Partial {
            start: self.l4 as u16,
            offset: 16,
        }
    }
}

// ---------------------------------------------------------------------------
// Frame builders

const MAC_A: [u8; 6] = [0x0a, 0x58, 10, 244, 1, 5];
const MAC_B: [u8; 6] = [0x0a, 0x58, 10, 244, 2, 7];

#[derive(Clone, Copy, Debug, PartialEq)]
enum CsumMode {
    /// Partial: the pseudo-header seed of this frame's L4 length.
    Seed,
    /// The final checksum.
    Complete,
}

/// A TCP segment or super-frame's headers.
#[derive(Clone, Debug)]
struct Tcp {
    framing: Framing,
    v6: bool,
    /// Last byte of the source address: different hosts.
    host: u8,
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    window: u16,
    /// TCP timestamps option (NOP NOP TS): 12 option bytes.
    ts: Option<(u32, u32)>,
    ip_id: u16,
    df: bool,
    ttl: u8,
    tos: u8,
    flow_label: u32,
}

impl Tcp {
    fn new(framing: Framing, v6: bool) -> Tcp {
        Tcp {
            framing,
            v6,
            host: 1,
            sport: 40000,
            dport: 5201,
            seq: 0xfff0_0000, // wraps within a 64 KiB burst
            ack: 0x1234_5678,
            flags: TCP_ACK | TCP_PSH,
            window: 502,
            ts: Some((0xdead_beef, 0x0102_0304)),
            ip_id: 0xfffa, // wraps too
            df: true,
            ttl: 64,
            tos: 0,
            flow_label: 0x5_4321,
        }
    }

    fn thl(&self) -> usize {
        if self.ts.is_some() {
            32
        } else {
            20
        }
    }

    fn l4(&self) -> usize {
        self.framing.l3_offset() + if self.v6 { 40 } else { 20 }
    }

    fn data(&self) -> usize {
        self.l4() + self.thl()
    }

    /// The largest payload the IP length field can carry.
    fn max_payload(&self) -> usize {
        65_535 - self.thl() - if self.v6 { 0 } else { 20 }
    }

    fn build(&self, payload: &[u8], mode: CsumMode) -> Vec<u8> {
        let mut f = Vec::new();
        let ip_hdr = if self.v6 { 40 } else { 20 };
        let l4_len = self.thl() + payload.len();
        if self.framing == Framing::Ethernet {
            f.extend_from_slice(&MAC_B);
            f.extend_from_slice(&MAC_A);
            f.extend_from_slice(if self.v6 {
                &[0x86, 0xdd]
            } else {
                &[0x08, 0x00]
            });
        }
        let l3 = f.len();
        if self.v6 {
            let word = (6u32 << 28) | (u32::from(self.tos) << 20) | self.flow_label;
            f.extend_from_slice(&word.to_be_bytes());
            f.extend_from_slice(&(l4_len as u16).to_be_bytes());
            f.extend_from_slice(&[IPPROTO_TCP, self.ttl]);
            f.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, self.host]);
            f.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10, 2]);
        } else {
            f.extend_from_slice(&[0x45, self.tos]);
            f.extend_from_slice(&((ip_hdr + l4_len) as u16).to_be_bytes());
            f.extend_from_slice(&self.ip_id.to_be_bytes());
            f.extend_from_slice(&[
                if self.df { 0x40 } else { 0 },
                0,
                self.ttl,
                IPPROTO_TCP,
                0,
                0,
            ]);
            f.extend_from_slice(&[10, 244, 1, self.host, 10, 244, 2, 7]);
            let c = !ref_fold(ref_sum(&f[l3..]));
            f[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
        }
        f.extend_from_slice(&self.sport.to_be_bytes());
        f.extend_from_slice(&self.dport.to_be_bytes());
        f.extend_from_slice(&self.seq.to_be_bytes());
        f.extend_from_slice(&self.ack.to_be_bytes());
        f.extend_from_slice(&[((self.thl() / 4) as u8) << 4, self.flags]);
        f.extend_from_slice(&self.window.to_be_bytes());
        f.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
        if let Some((val, ecr)) = self.ts {
            f.extend_from_slice(&[1, 1, 8, 10]);
            f.extend_from_slice(&val.to_be_bytes());
            f.extend_from_slice(&ecr.to_be_bytes());
        }
        f.extend_from_slice(payload);
        let lay = Layout::of(&f, self.framing);
        let c = match mode {
            CsumMode::Seed => lay.ref_seed(&f, IPPROTO_TCP),
            CsumMode::Complete => lay.ref_complete(&f, IPPROTO_TCP, 16),
        };
        f[lay.l4 + 16..lay.l4 + 18].copy_from_slice(&c.to_be_bytes());
        f
    }

    /// A super-frame as read from the device, with its vnet header.
    fn super_frame(&self, payload: &[u8], mss: u16) -> (VnetHdr, Vec<u8>) {
        let hdr = VnetHdr {
            flags: VnetHdr::F_NEEDS_CSUM,
            gso_type: if self.v6 {
                VnetHdr::GSO_TCPV6
            } else {
                VnetHdr::GSO_TCPV4
            },
            hdr_len: self.data() as u16,
            gso_size: mss,
            csum_start: self.l4() as u16,
            csum_offset: 16,
        };
        (hdr, self.build(payload, CsumMode::Seed))
    }
}

/// Payload bytes that differ from position to position and burst to burst.
fn payload(len: usize, salt: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ salt ^ (i >> 8) as u8)
        .collect()
}

fn udp_frame(framing: Framing, v6: bool, body: &[u8], mode: CsumMode) -> Vec<u8> {
    // Reuse the TCP builder's IP header, then replace the L4 part.
    let t = Tcp {
        ts: None,
        ..Tcp::new(framing, v6)
    };
    let mut f = t.build(&[], CsumMode::Seed);
    let lay = Layout::of(&f, framing);
    f.truncate(lay.l4);
    let ulen = (8 + body.len()) as u16;
    f.extend_from_slice(&[0x30, 0x39, 0x00, 0x35]);
    f.extend_from_slice(&ulen.to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(body);
    fix_ip_lengths(&mut f, lay, IPPROTO_UDP);
    let c = match mode {
        CsumMode::Seed => lay.ref_seed(&f, IPPROTO_UDP),
        CsumMode::Complete => match lay.ref_complete(&f, IPPROTO_UDP, 6) {
            0 => 0xffff,
            c => c,
        },
    };
    f[lay.l4 + 6..lay.l4 + 8].copy_from_slice(&c.to_be_bytes());
    f
}

fn icmp_frame(framing: Framing) -> Vec<u8> {
    let t = Tcp {
        ts: None,
        ..Tcp::new(framing, false)
    };
    let mut f = t.build(&[], CsumMode::Seed);
    let lay = Layout::of(&f, framing);
    f.truncate(lay.l4);
    let mut icmp = vec![8, 0, 0, 0, 0x12, 0x34, 0, 1];
    icmp.extend_from_slice(&payload(56, 9));
    let c = !ref_fold(ref_sum(&icmp));
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&icmp);
    fix_ip_lengths(&mut f, lay, 1);
    f
}

fn arp_frame() -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&MAC_A);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&MAC_A);
    f.extend_from_slice(&[10, 244, 1, 5, 0, 0, 0, 0, 0, 0, 10, 244, 1, 1]);
    f
}

/// Sets the IP length, protocol and (IPv4) header checksum after the L4
/// part of a built frame was replaced.
fn fix_ip_lengths(f: &mut [u8], lay: Layout, proto: u8) {
    let l3 = lay.l3;
    if lay.v6 {
        let n = (f.len() - l3 - 40) as u16;
        f[l3 + 4..l3 + 6].copy_from_slice(&n.to_be_bytes());
        f[l3 + 6] = proto;
    } else {
        let n = (f.len() - l3) as u16;
        f[l3 + 2..l3 + 4].copy_from_slice(&n.to_be_bytes());
        f[l3 + 9] = proto;
        f[l3 + 10] = 0;
        f[l3 + 11] = 0;
        let c = !ref_fold(ref_sum(&f[l3..lay.l4]));
        f[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
    }
}

/// All segments of a frame, through a buffer big enough for any frame.
fn split(
    hdr: &VnetHdr,
    frame: &[u8],
    framing: Framing,
) -> Result<Vec<(Vec<u8>, Csum)>, OffloadError> {
    let mut segs = segments(hdr, frame, framing)?;
    let mut out = vec![0u8; 70_000];
    let mut all = Vec::new();
    while let Some((n, csum)) = segs.next_into(&mut out)? {
        all.push((out[..n].to_vec(), csum));
    }
    assert_eq!(all.len(), segs.count());
    Ok(all)
}

type Emitted = Vec<(VnetHdr, Vec<u8>)>;

fn coalesce(co: &mut Coalescer, frames: &[(Vec<u8>, Csum)]) -> Emitted {
    let mut out = Vec::new();
    let mut emit = |h: &VnetHdr, f: &[u8]| out.push((*h, f.to_vec()));
    for (f, c) in frames {
        co.push(f, *c, &mut emit);
    }
    co.flush(&mut emit);
    assert_eq!(co.pending(), 0, "nothing may stay pending after flush");
    out
}

fn tcp_seq(f: &[u8], framing: Framing) -> u32 {
    let l4 = Layout::of(f, framing).l4;
    be32(f, l4 + 4)
}

// ---------------------------------------------------------------------------
// Checksum helpers

#[test]
fn checksum_rfc1071_example() {
    // RFC 1071 section 3: the sum of these words is 0xddf2.
    let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
    assert_eq!(fold(checksum_add(0, &data)), 0xddf2);
    // Split at an even offset, the sum is the same.
    assert_eq!(
        fold(checksum_add(checksum_add(0, &data[..2]), &data[2..])),
        0xddf2
    );
}

#[test]
fn checksum_matches_reference_for_every_length() {
    let data = payload(300, 0x5a);
    for len in 0..data.len() {
        assert_eq!(
            fold(checksum_add(0, &data[..len])),
            ref_fold(ref_sum(&data[..len])),
            "len {len}"
        );
    }
    let ones = vec![0xff; 4000];
    assert_eq!(fold(checksum_add(0, &ones)), 0xffff);
}

#[test]
fn fold_edges() {
    assert_eq!(fold(0), 0);
    assert_eq!(fold(0xffff), 0xffff);
    assert_eq!(fold(0x1_0000), 1);
    assert_eq!(fold(0x1_fffe), 0xffff);
    assert_eq!(fold(u64::MAX), 0xffff);
    // Accumulators near the top do not overflow.
    assert_eq!(fold(checksum_add(u64::MAX, &[0xff; 64])), 0xffff);
    assert_eq!(fold(checksum_add(u64::MAX - 1, &[0, 1])), 0xffff);
}

#[test]
fn pseudo_header_sum_matches_reference() {
    let v4 = ([10, 244, 1, 5], [10, 244, 2, 7]);
    assert_eq!(
        fold(pseudo_header_sum(&v4.0, &v4.1, 6, 1480)),
        ref_fold(ref_pseudo(&v4.0, &v4.1, 6, 1480))
    );
    let s: Vec<u8> = (0..16).map(|i| 0xf0 + i).collect();
    let d: Vec<u8> = (0..16).map(|i| 0x11 * i).collect();
    for len in [0, 1, 20, 65_535, 70_000] {
        assert_eq!(
            fold(pseudo_header_sum(&s, &d, 17, len as u32)),
            ref_fold(ref_pseudo(&s, &d, 17, len)),
            "len {len}"
        );
    }
}

// ---------------------------------------------------------------------------
// Vnet header

#[test]
fn vnet_header_layout_is_little_endian() {
    let h = VnetHdr {
        flags: 1,
        gso_type: 1,
        hdr_len: 66,
        gso_size: 1448,
        csum_start: 34,
        csum_offset: 16,
    };
    let b = h.to_bytes();
    assert_eq!(b, [1, 1, 66, 0, 0xa8, 0x05, 34, 0, 16, 0]);
    assert_eq!(VnetHdr::parse(&b), Some(h));
    let mut long = [0xeeu8; 12];
    h.write(&mut long).unwrap();
    assert_eq!(&long[..10], &b);
    assert_eq!(long[10..], [0xee, 0xee]);
    assert_eq!(VnetHdr::parse(&b[..9]), None);
    assert_eq!(
        h.write(&mut [0u8; 9]),
        Err(OffloadError::BufferTooSmall { need: 10 })
    );
}

#[test]
fn single_frame_headers() {
    assert_eq!(VnetHdr::single(Csum::Complete), VnetHdr::default());
    assert_eq!(
        VnetHdr::single(Csum::Partial {
            start: 34,
            offset: 6
        }),
        VnetHdr {
            flags: 1,
            gso_type: 0,
            hdr_len: 42,
            gso_size: 0,
            csum_start: 34,
            csum_offset: 6
        }
    );
    // A position the header cannot cover gets hdr_len 0 (the kernel's
    // "unknown"), not an overflow.
    let h = VnetHdr::single(Csum::Partial {
        start: u16::MAX,
        offset: 16,
    });
    assert_eq!((h.hdr_len, h.csum_start), (0, u16::MAX));
}

// ---------------------------------------------------------------------------
// Segmentation

/// Segments a super-frame and checks every segment against the original
/// and against from-scratch checksums.
fn check_segmentation(
    t: &Tcp,
    payload_len: usize,
    mss: u16,
    gso_ecn: bool,
) -> Vec<(Vec<u8>, Csum)> {
    let body = payload(payload_len, 0x33);
    let (mut hdr, sup) = t.super_frame(&body, mss);
    if gso_ecn {
        hdr.gso_type |= VnetHdr::GSO_ECN;
    }
    let segs = split(&hdr, &sup, t.framing).unwrap();
    let mss = usize::from(mss);
    let expect = payload_len.div_ceil(mss).max(1);
    assert_eq!(segs.len(), expect);
    let lay = Layout::of(&sup, t.framing);
    let data = t.data();
    let full_seed = be16(&sup, lay.l4 + 16);
    let full_l4 = sup.len() - lay.l4;
    for (i, (seg, csum)) in segs.iter().enumerate() {
        let last = i + 1 == segs.len();
        let chunk = &body[i * mss..((i + 1) * mss).min(payload_len)];
        assert_eq!(seg.len(), data + chunk.len(), "segment {i} length");
        assert_eq!(&seg[data..], chunk, "segment {i} payload");
        assert_eq!(*csum, lay.csum());
        // Link header unchanged.
        assert_eq!(seg[..lay.l3], sup[..lay.l3]);
        // IP header.
        if lay.v6 {
            assert_eq!(seg[lay.l3..lay.l3 + 4], sup[lay.l3..lay.l3 + 4]);
            assert_eq!(usize::from(be16(seg, lay.l3 + 4)), seg.len() - lay.l3 - 40);
            assert_eq!(seg[lay.l3 + 6..lay.l4], sup[lay.l3 + 6..lay.l4]);
        } else {
            assert_eq!(usize::from(be16(seg, lay.l3 + 2)), seg.len() - lay.l3);
            assert_eq!(be16(seg, lay.l3 + 4), t.ip_id.wrapping_add(i as u16));
            assert_eq!(seg[lay.l3 + 6], sup[lay.l3 + 6], "DF kept");
            assert_eq!(seg[lay.l3 + 8..lay.l3 + 10], sup[lay.l3 + 8..lay.l3 + 10]);
            assert_eq!(seg[lay.l3 + 12..lay.l4], sup[lay.l3 + 12..lay.l4]);
            assert!(lay.ipv4_hdr_valid(seg), "segment {i} IPv4 header checksum");
        }
        // TCP header.
        let l4 = lay.l4;
        assert_eq!(seg[l4..l4 + 4], sup[l4..l4 + 4], "ports");
        assert_eq!(be32(seg, l4 + 4), t.seq.wrapping_add((i * mss) as u32));
        assert_eq!(
            seg[l4 + 8..l4 + 13],
            sup[l4 + 8..l4 + 13],
            "ack, data offset"
        );
        let mut flags = t.flags;
        if !last {
            flags &= !(TCP_FIN | TCP_PSH);
        }
        if i != 0 {
            flags &= !TCP_CWR;
        }
        assert_eq!(seg[l4 + 13], flags, "segment {i} flags");
        assert_eq!(seg[l4 + 14..l4 + 16], sup[l4 + 14..l4 + 16], "window");
        assert_eq!(
            seg[l4 + 18..data],
            sup[l4 + 18..data],
            "urgent pointer, options"
        );
        // Seed: this segment's own pseudo-header sum ...
        let seed = be16(seg, l4 + 16);
        assert_eq!(seed, lay.ref_seed(seg, IPPROTO_TCP), "segment {i} seed");
        // ... which is what the kernel's tcp_gso_segment would derive from
        // the super-frame's: seed - full length + segment length.
        let derived =
            ref_fold(u32::from(full_seed) + u32::from(!(full_l4 as u16)) + (seg.len() - l4) as u32);
        assert_eq!(seed, derived, "segment {i} seed vs the kernel's derivation");
        // Completing it gives the from-scratch checksum.
        let mut done = seg.clone();
        complete_checksum(&mut done, *csum).unwrap();
        assert_eq!(be16(&done, l4 + 16), lay.ref_complete(seg, IPPROTO_TCP, 16));
        assert!(lay.l4_valid(&done, IPPROTO_TCP));
    }
    segs
}

fn all_shapes() -> Vec<Tcp> {
    let mut shapes = Vec::new();
    for framing in [Framing::Ethernet, Framing::Ip] {
        for v6 in [false, true] {
            for ts in [None, Some((7, 9))] {
                shapes.push(Tcp {
                    ts,
                    ..Tcp::new(framing, v6)
                });
            }
        }
    }
    shapes
}

#[test]
fn tso_split_ipv4_and_ipv6_tap_and_tun() {
    for t in all_shapes() {
        let mss = if t.v6 { 1428 } else { 1448 };
        // Short last segment, exact multiple, one segment, a full 64 KiB.
        for len in [10 * mss + 500, 7 * mss, mss, 17, t.max_payload()] {
            check_segmentation(&t, len, mss as u16, false);
        }
    }
}

#[test]
fn tso_split_flags_fin_psh_last_cwr_first() {
    for t in all_shapes() {
        let t = Tcp {
            flags: TCP_ACK | TCP_PSH | TCP_FIN | TCP_CWR | 0x40, // + ECE
            ..t
        };
        let segs = check_segmentation(&t, 5000, 1000, true);
        let l4 = t.l4();
        assert_eq!(segs[0].0[l4 + 13], TCP_ACK | TCP_CWR | 0x40);
        assert_eq!(segs[2].0[l4 + 13], TCP_ACK | 0x40);
        assert_eq!(segs[4].0[l4 + 13], TCP_ACK | TCP_PSH | TCP_FIN | 0x40);
    }
}

#[test]
fn tso_split_small_mss_and_wrapping_counters() {
    let t = Tcp {
        seq: u32::MAX - 10,
        ip_id: u16::MAX,
        df: false,
        ..Tcp::new(Framing::Ethernet, false)
    };
    let segs = check_segmentation(&t, 100, 1, false);
    assert_eq!(segs.len(), 100);
    check_segmentation(&t, 0, 1448, false);
}

#[test]
fn tso_split_ignores_hdr_len() {
    let t = Tcp::new(Framing::Ethernet, false);
    let (hdr, sup) = t.super_frame(&payload(4000, 1), 1448);
    let want = split(&hdr, &sup, t.framing).unwrap();
    for hdr_len in [0, 14, 54, 9999, u16::MAX] {
        let h = VnetHdr { hdr_len, ..hdr };
        assert_eq!(
            split(&h, &sup, t.framing).unwrap(),
            want,
            "hdr_len {hdr_len}"
        );
    }
}

#[test]
fn non_gso_frames_pass_unchanged() {
    // Partial (NEEDS_CSUM, gso_type 0): copied, with its position.
    let t = Tcp {
        flags: 0x02, // SYN
        ..Tcp::new(Framing::Ethernet, false)
    };
    let f = t.build(&[], CsumMode::Seed);
    let h = VnetHdr {
        flags: 1,
        csum_start: 34,
        csum_offset: 16,
        ..VnetHdr::default()
    };
    let segs = split(&h, &f, Framing::Ethernet).unwrap();
    assert_eq!(
        segs,
        vec![(
            f.clone(),
            Csum::Partial {
                start: 34,
                offset: 16
            }
        )]
    );

    // Complete (all-zero header, or DATA_VALID which is treated alike).
    for flags in [0, VnetHdr::F_DATA_VALID] {
        for f in [
            arp_frame(),
            icmp_frame(Framing::Ethernet),
            udp_frame(Framing::Ethernet, true, b"x", CsumMode::Complete),
        ] {
            let h = VnetHdr {
                flags,
                ..VnetHdr::default()
            };
            let mut s = segments(&h, &f, Framing::Ethernet).unwrap();
            assert_eq!((s.count(), s.max_segment_len()), (1, f.len()));
            let mut out = vec![0u8; f.len()];
            assert_eq!(s.next_into(&mut out), Ok(Some((f.len(), Csum::Complete))));
            assert_eq!(out, f);
            assert_eq!(s.next_into(&mut out), Ok(None));
        }
    }

    // A partial position outside the frame is refused.
    let h = VnetHdr {
        flags: 1,
        csum_start: (f.len() - 17) as u16,
        csum_offset: 16,
        ..VnetHdr::default()
    };
    assert_eq!(
        segments(&h, &f, Framing::Ethernet).err(),
        Some(OffloadError::CsumOutOfRange)
    );
}

#[test]
fn tso_split_refuses_malformed_frames() {
    use OffloadError::*;
    let t = Tcp::new(Framing::Ethernet, false);
    let (hdr, sup) = t.super_frame(&payload(3000, 2), 1448);
    let t6 = Tcp::new(Framing::Ethernet, true);
    let (hdr6, sup6) = t6.super_frame(&payload(3000, 2), 1428);
    let seg = |h: &VnetHdr, f: &[u8]| segments(h, f, Framing::Ethernet).err();
    let with = |f: &[u8], i: usize, v: u8| {
        let mut f = f.to_vec();
        f[i] = v;
        f
    };

    assert_eq!(
        seg(&VnetHdr { gso_size: 0, ..hdr }, &sup),
        Some(Malformed("gso_size 0"))
    );
    for gso_type in [
        VnetHdr::GSO_UDP,
        VnetHdr::GSO_UDP_L4,
        2,
        6,
        VnetHdr::GSO_ECN,
        0xff,
    ] {
        assert!(
            matches!(
                seg(&VnetHdr { gso_type, ..hdr }, &sup),
                Some(Unsupported(_))
            ),
            "{gso_type}"
        );
    }
    assert!(matches!(
        seg(&VnetHdr { flags: 0, ..hdr }, &sup),
        Some(Malformed(_))
    ));
    assert!(matches!(
        seg(&VnetHdr { flags: 2, ..hdr }, &sup),
        Some(Malformed(_))
    ));
    assert!(matches!(
        seg(
            &VnetHdr {
                csum_offset: 6,
                ..hdr
            },
            &sup
        ),
        Some(Malformed(_))
    ));
    for csum_start in [0, 33, 35, 54, 3000, u16::MAX] {
        assert!(
            matches!(
                seg(&VnetHdr { csum_start, ..hdr }, &sup),
                Some(Malformed(_))
            ),
            "{csum_start}"
        );
    }
    // GSO type and IP version disagree.
    assert!(matches!(
        seg(
            &VnetHdr {
                gso_type: VnetHdr::GSO_TCPV6,
                ..hdr
            },
            &sup
        ),
        Some(Malformed(_))
    ));
    let mut says_v4 = sup6.clone();
    says_v4[12..14].copy_from_slice(&[0x08, 0x00]);
    assert!(
        matches!(seg(&hdr6, &says_v4), Some(Malformed(_))),
        "EtherType says IPv4"
    );
    // Total length != frame: a byte missing, a byte of padding, a wrong field.
    assert!(matches!(
        seg(&hdr, &sup[..sup.len() - 1]),
        Some(Malformed(_))
    ));
    let mut padded = sup.clone();
    padded.push(0);
    assert!(matches!(seg(&hdr, &padded), Some(Malformed(_))));
    assert!(matches!(
        seg(&hdr6, &sup6[..sup6.len() - 1]),
        Some(Malformed(_))
    ));
    // Fragments, options of the wrong protocol, IPv6 extension headers.
    assert!(
        matches!(seg(&hdr, &with(&sup, 20, 0x60)), Some(Malformed(_))),
        "DF|MF"
    );
    assert!(
        matches!(seg(&hdr, &with(&sup, 21, 1)), Some(Malformed(_))),
        "offset"
    );
    assert!(
        matches!(seg(&hdr, &with(&sup, 23, 17)), Some(Malformed(_))),
        "UDP"
    );
    assert!(
        matches!(seg(&hdr, &with(&sup, 14, 0x44)), Some(Malformed(_))),
        "IHL 4"
    );
    assert!(
        matches!(seg(&hdr, &with(&sup, 14, 0x65)), Some(Malformed(_))),
        "version 6"
    );
    assert_eq!(
        seg(&hdr6, &with(&sup6, 20, 0)),
        Some(Unsupported("IPv6 extension headers"))
    );
    // TCP data offset below 5 words.
    assert!(matches!(
        seg(&hdr, &with(&sup, 46, 0x40)),
        Some(Malformed(_))
    ));
    // VLAN tags, ARP.
    let mut tagged = sup[..12].to_vec();
    tagged.extend_from_slice(&[0x81, 0x00, 0x00, 0x05]);
    tagged.extend_from_slice(&sup[12..]);
    assert_eq!(seg(&hdr, &tagged), Some(Unsupported("VLAN-tagged frame")));
    assert!(matches!(seg(&hdr, &arp_frame()), Some(Unsupported(_))));
    // A TUN packet that is not IP.
    let tun = Tcp::new(Framing::Ip, false);
    let (th, tf) = tun.super_frame(&payload(2000, 3), 1448);
    assert!(segments(&th, &with(&tf, 0, 0x15), Framing::Ip).is_err());

    // Every truncation is an error, never a panic.
    for f in [&sup, &sup6] {
        for n in 0..f.len() {
            assert!(seg(&hdr, &f[..n]).is_some(), "prefix {n}");
            assert!(seg(&hdr6, &f[..n]).is_some(), "prefix {n}");
        }
    }
}

#[test]
fn tso_split_output_buffer_too_small() {
    let t = Tcp::new(Framing::Ethernet, false);
    let (hdr, sup) = t.super_frame(&payload(3000, 4), 1448);
    let mut s = segments(&hdr, &sup, Framing::Ethernet).unwrap();
    assert_eq!((s.count(), s.max_segment_len()), (3, t.data() + 1448));
    let mut small = vec![0u8; t.data() + 1447];
    assert_eq!(
        s.next_into(&mut small),
        Err(OffloadError::BufferTooSmall {
            need: t.data() + 1448
        })
    );
    // The segment was not consumed.
    let mut out = vec![0u8; 2000];
    let (n, _) = s.next_into(&mut out).unwrap().unwrap();
    assert_eq!(tcp_seq(&out[..n], Framing::Ethernet), t.seq);
    // The short last segment fits a smaller buffer.
    s.next_into(&mut out).unwrap().unwrap();
    let mut last = vec![0u8; t.data() + 3000 - 2 * 1448];
    assert!(s.next_into(&mut last).unwrap().is_some());
    assert_eq!(s.next_into(&mut last), Ok(None));
}

// ---------------------------------------------------------------------------
// Completing checksums

#[test]
fn complete_checksum_tcp_and_udp() {
    for framing in [Framing::Ethernet, Framing::Ip] {
        for v6 in [false, true] {
            let f = udp_frame(framing, v6, &payload(333, 7), CsumMode::Seed);
            let lay = Layout::of(&f, framing);
            let mut done = f.clone();
            complete_checksum(
                &mut done,
                Csum::Partial {
                    start: lay.l4 as u16,
                    offset: 6,
                },
            )
            .unwrap();
            assert_eq!(
                done,
                udp_frame(framing, v6, &payload(333, 7), CsumMode::Complete)
            );
            assert!(lay.l4_valid(&done, IPPROTO_UDP));

            let t = Tcp::new(framing, v6);
            let f = t.build(&payload(1000, 8), CsumMode::Seed);
            let mut done = f.clone();
            complete_checksum(&mut done, Layout::of(&f, framing).csum()).unwrap();
            assert_eq!(done, t.build(&payload(1000, 8), CsumMode::Complete));
        }
    }
}

#[test]
fn complete_checksum_udp_zero_is_sent_as_ffff() {
    // Choose the last two payload bytes so that the data sums to 0xffff:
    // the checksum computes to 0, which UDP must send as 0xffff.
    let mut f = udp_frame(
        Framing::Ethernet,
        false,
        &[1, 2, 3, 4, 0, 0],
        CsumMode::Seed,
    );
    let lay = Layout::of(&f, Framing::Ethernet);
    let n = f.len();
    let s = ref_fold(ref_sum(&f[lay.l4..]));
    f[n - 2..].copy_from_slice(&(0xffff - s).to_be_bytes());
    assert_eq!(ref_fold(ref_sum(&f[lay.l4..])), 0xffff);
    complete_checksum(
        &mut f,
        Csum::Partial {
            start: lay.l4 as u16,
            offset: 6,
        },
    )
    .unwrap();
    assert_eq!(be16(&f, lay.l4 + 6), 0xffff);
    assert!(lay.l4_valid(&f, IPPROTO_UDP));
}

#[test]
fn complete_checksum_refuses_positions_outside() {
    let f = udp_frame(Framing::Ethernet, false, b"abcd", CsumMode::Seed);
    let mut g = f.clone();
    let n = f.len() as u16;
    for (start, offset) in [
        (n, 0),
        (n - 1, 0),
        (n - 2, 1),
        (34, n),
        (u16::MAX, u16::MAX),
    ] {
        assert_eq!(
            complete_checksum(&mut g, Csum::Partial { start, offset }),
            Err(OffloadError::CsumOutOfRange)
        );
        assert_eq!(g, f, "untouched");
    }
    // The last two bytes may be the field.
    assert!(complete_checksum(
        &mut g,
        Csum::Partial {
            start: n - 2,
            offset: 0
        }
    )
    .is_ok());
    let mut g = f.clone();
    assert_eq!(complete_checksum(&mut g, Csum::Complete), Ok(()));
    assert_eq!(g, f);
    assert_eq!(complete_checksum(&mut [], Csum::Complete), Ok(()));
}

// ---------------------------------------------------------------------------
// Coalescing

fn gso_hdr_of(t: &Tcp, mss: usize) -> VnetHdr {
    t.super_frame(&[], mss as u16).0
}

#[test]
fn round_trip_split_then_coalesce_gives_the_super_frame() {
    for t in all_shapes() {
        for df in [true, false] {
            let t = Tcp { df, ..t.clone() };
            let mss = if t.v6 { 1428 } else { 1448 };
            for len in [10 * mss + 500, 7 * mss, 2 * mss + 1, t.max_payload()] {
                let body = payload(len, 0x44);
                let (hdr, sup) = t.super_frame(&body, mss as u16);
                let segs = split(&hdr, &sup, t.framing).unwrap();
                let mut co = Coalescer::new(t.framing, 8, 65_535 + t.framing.l3_offset() + 40);
                let out = coalesce(&mut co, &segs);
                assert_eq!(out.len(), 1, "{t:?} {len}");
                let (h, f) = &out[0];
                // The very header and bytes the kernel gave the sender.
                assert_eq!(h, &hdr, "{t:?} {len}");
                assert_eq!(f, &sup, "{t:?} {len}");
                // The seed rule: the full L4 length, not inverted.
                let lay = Layout::of(f, t.framing);
                assert_eq!(be16(f, lay.l4 + 16), lay.ref_seed(f, IPPROTO_TCP));
                // Re-segmenting (as the kernel will) gives the segments back.
                assert_eq!(split(h, f, t.framing).unwrap(), segs);
            }
            // One segment: emitted as it came, a plain partial frame.
            let (hdr, sup) = t.super_frame(&payload(100, 1), 1448);
            let segs = split(&hdr, &sup, t.framing).unwrap();
            let out = coalesce(&mut Coalescer::new(t.framing, 8, 65_549), &segs);
            assert_eq!(out, vec![(VnetHdr::single(segs[0].1), segs[0].0.clone())]);
        }
    }
}

/// Consecutive segments of one flow built directly (as a peer's sender
/// would cut them), with per-segment tweaks.
struct Flow {
    t: Tcp,
    salt: u8,
}

impl Flow {
    fn new(t: Tcp) -> Flow {
        Flow { t, salt: 0 }
    }

    /// The next segment with `len` payload bytes and flags ACK (+PSH).
    fn seg(&mut self, len: usize, psh: bool) -> (Vec<u8>, Csum) {
        self.seg_with(len, |t| {
            t.flags = TCP_ACK | if psh { TCP_PSH } else { 0 };
        })
    }

    fn seg_with(&mut self, len: usize, tweak: impl FnOnce(&mut Tcp)) -> (Vec<u8>, Csum) {
        let mut t = self.t.clone();
        t.flags = TCP_ACK;
        tweak(&mut t);
        self.salt = self.salt.wrapping_add(1);
        let f = t.build(&payload(len, self.salt), CsumMode::Seed);
        self.t.seq = self.t.seq.wrapping_add(len as u32);
        self.t.ip_id = self.t.ip_id.wrapping_add(1);
        let csum = Layout::of(&f, t.framing).csum();
        (f, csum)
    }
}

/// Splits every emitted frame again and returns the segments with the
/// vnet headers' shapes, to compare with what was pushed.
fn resegment(out: &Emitted, framing: Framing) -> Vec<(Vec<u8>, Csum)> {
    out.iter()
        .flat_map(|(h, f)| split(h, f, framing).unwrap())
        .collect()
}

/// Number of segments each emitted frame holds.
fn shape(out: &Emitted, framing: Framing) -> Vec<usize> {
    out.iter()
        .map(|(h, f)| segments(h, f, framing).unwrap().count())
        .collect()
}

#[test]
fn merges_interleaved_flows_separately() {
    for t in all_shapes() {
        let mut a = Flow::new(t.clone());
        let mut b = Flow::new(Tcp {
            sport: 40001,
            ..t.clone()
        });
        let mut c = Flow::new(Tcp {
            host: 9,
            ..t.clone()
        });
        let mut input = Vec::new();
        for i in 0..4 {
            input.push(a.seg(1000, i == 3));
            input.push(b.seg(1000, false));
            input.push(c.seg(1000, false));
        }
        let out = coalesce(&mut Coalescer::new(t.framing, 8, 65_549), &input);
        // a leaves at its PSH, b and c at the flush, oldest first.
        assert_eq!(shape(&out, t.framing), vec![4, 4, 4]);
        assert_eq!(
            out[0].0,
            VnetHdr {
                gso_size: 1000,
                ..gso_hdr_of(&t, 1000)
            }
        );
        assert_eq!(be16(&out[0].1, t.l4()), 40000);
        assert_eq!(be16(&out[1].1, t.l4()), 40001);
        assert_eq!(out[2].1[t.l4() - if t.v6 { 17 } else { 5 }], 9, "host 9");
        let back = resegment(&out, t.framing);
        let mut want: Vec<_> = input.iter().step_by(3).cloned().collect();
        want.extend(input.iter().skip(1).step_by(3).cloned());
        want.extend(input.iter().skip(2).step_by(3).cloned());
        assert_eq!(back, want);
    }
}

#[test]
fn does_not_merge_gaps_reordering_or_different_headers() {
    for t in all_shapes() {
        let framing = t.framing;
        let fresh = || Flow::new(t.clone());
        type Case = (&'static str, Vec<(Vec<u8>, Csum)>, Vec<usize>);
        let mut cases: Vec<Case> = Vec::new();

        let mut f = fresh();
        let s0 = f.seg(1000, false);
        let _lost = f.seg(1000, false);
        let s2 = f.seg(1000, false);
        let s3 = f.seg(1000, false);
        cases.push(("gap", vec![s0.clone(), s2.clone(), s3.clone()], vec![1, 2]));
        let mut f = fresh();
        let (s0, s1, s2) = (f.seg(1000, false), f.seg(1000, false), f.seg(1000, false));
        cases.push((
            "reordered",
            vec![s1.clone(), s0.clone(), s2.clone()],
            vec![1, 1, 1],
        ));
        cases.push((
            "duplicate",
            vec![s0.clone(), s0.clone(), s1.clone()],
            vec![1, 2],
        ));
        let mut f = fresh();
        let v = vec![
            f.seg(1000, false),
            f.seg(1000, true),
            f.seg(1000, false),
            f.seg(1000, false),
        ];
        cases.push(("PSH in the middle", v, vec![2, 2]));
        let mut f = fresh();
        let v = vec![f.seg(1000, false), f.seg(999, false), f.seg(1000, false)];
        cases.push(("short segment closes", v, vec![2, 1]));
        let mut f = fresh();
        let v = vec![f.seg(800, false), f.seg(1000, false), f.seg(1000, false)];
        cases.push(("larger than the first", v, vec![1, 2]));
        let mut f = fresh();
        let v = vec![
            f.seg(1000, false),
            f.seg_with(1000, |t| t.flags = TCP_ACK | TCP_FIN),
        ];
        cases.push(("FIN", v, vec![1, 1]));

        type Tweak = fn(&mut Tcp);
        let mut tweaks: Vec<(&str, Tweak)> = vec![
            ("ack", |t| t.ack += 1),
            ("window", |t| t.window += 1),
            ("ttl", |t| t.ttl -= 1),
            ("tos/traffic class", |t| t.tos = 2),
            ("URG", |t| t.flags |= 0x20),
            ("ECE", |t| t.flags |= 0x40),
            ("CWR", |t| t.flags |= TCP_CWR),
            ("RST", |t| t.flags |= 0x04),
            ("no ACK", |t| t.flags = 0),
        ];
        if t.ts.is_some() {
            tweaks.push(("timestamp", |t| t.ts = Some((8, 9))));
            tweaks.push(("no options", |t| t.ts = None));
        } else {
            tweaks.push(("options", |t| t.ts = Some((7, 9))));
        }
        if t.v6 {
            tweaks.push(("flow label", |t| t.flow_label ^= 1));
        } else {
            tweaks.push(("DF", |t| t.df = !t.df));
        }
        for (name, tweak) in tweaks {
            let mut f = fresh();
            let v = vec![
                f.seg(1000, false),
                f.seg_with(1000, tweak),
                f.seg(1000, false),
            ];
            // The odd one out is never merged; the next starts afresh
            // (unless the odd one was a non-candidate, then 1 + 1 + 1).
            let n = coalesce(&mut Coalescer::new(framing, 8, 65_549), &v).len();
            assert!(n >= 2, "{name}: {n} frames");
            cases.push((name, v, vec![]));
        }

        for (name, input, want) in cases {
            let out = coalesce(&mut Coalescer::new(framing, 8, 65_549), &input);
            if !want.is_empty() {
                assert_eq!(shape(&out, framing), want, "{name} {t:?}");
            }
            // Whatever was or was not merged, nothing is lost, changed or
            // reordered.
            assert_eq!(resegment(&out, framing), input, "{name} {t:?}");
        }
    }
}

#[test]
fn ipv4_without_df_needs_consecutive_ids() {
    let t = Tcp {
        df: false,
        ..Tcp::new(Framing::Ethernet, false)
    };
    let mut f = Flow::new(t.clone());
    let v = vec![f.seg(1000, false), f.seg(1000, false), f.seg(1000, false)];
    assert_eq!(
        shape(
            &coalesce(&mut Coalescer::new(t.framing, 8, 65_549), &v),
            t.framing
        ),
        vec![3]
    );
    let mut f = Flow::new(t.clone());
    let v = vec![
        f.seg(1000, false),
        f.seg_with(1000, |t| t.ip_id = t.ip_id.wrapping_add(5)),
        f.seg(1000, false),
    ];
    let out = coalesce(&mut Coalescer::new(t.framing, 8, 65_549), &v);
    assert_eq!(shape(&out, t.framing), vec![1, 1, 1]);
    // With DF, ids carry no meaning and are not compared.
    let mut f = Flow::new(Tcp { df: true, ..t });
    let v = vec![
        f.seg(1000, false),
        f.seg_with(1000, |t| t.ip_id = t.ip_id.wrapping_add(5)),
        f.seg(1000, false),
    ];
    assert_eq!(
        shape(
            &coalesce(&mut Coalescer::new(Framing::Ethernet, 8, 65_549), &v),
            Framing::Ethernet
        ),
        vec![3]
    );
}

#[test]
fn complete_checksum_segments_are_not_merged() {
    let t = Tcp::new(Framing::Ethernet, false);
    let mut f = Flow::new(t.clone());
    let (s0, s1, s2) = (f.seg(1000, false), f.seg(1000, false), f.seg(1000, false));
    let mut done = s1.0.clone();
    complete_checksum(&mut done, s1.1).unwrap();
    let input = vec![s0.clone(), (done.clone(), Csum::Complete), s2.clone()];
    let out = coalesce(&mut Coalescer::new(t.framing, 8, 65_549), &input);
    assert_eq!(
        out,
        vec![
            (VnetHdr::single(s0.1), s0.0),
            (VnetHdr::default(), done),
            (VnetHdr::single(s2.1), s2.0.clone()),
        ]
    );
    // A partial checksum elsewhere than the TCP checksum is not ours either.
    let odd = Csum::Partial {
        start: 34,
        offset: 6,
    };
    let out = coalesce(
        &mut Coalescer::new(t.framing, 8, 65_549),
        &[(s1.0.clone(), odd), s2.clone()],
    );
    assert_eq!(out[0], (VnetHdr::single(odd), s1.0));
}

#[test]
fn other_traffic_passes_untouched_and_keeps_tcp_pending() {
    for framing in [Framing::Ethernet, Framing::Ip] {
        let t = Tcp::new(framing, false);
        let mut f = Flow::new(t.clone());
        let udp = udp_frame(framing, false, b"query", CsumMode::Seed);
        let udp_csum = Csum::Partial {
            start: t.l4() as u16,
            offset: 6,
        };
        let udp6 = udp_frame(framing, true, b"query", CsumMode::Complete);
        let icmp = icmp_frame(framing);
        let mut input = vec![
            f.seg(1000, false),
            (udp.clone(), udp_csum),
            f.seg(1000, false),
        ];
        input.push((icmp.clone(), Csum::Complete));
        input.push((udp6.clone(), Csum::Complete));
        if framing == Framing::Ethernet {
            input.push((arp_frame(), Csum::Complete));
        }
        input.push(f.seg(1000, false));
        let out = coalesce(&mut Coalescer::new(framing, 8, 65_549), &input);
        let mut want = vec![
            (VnetHdr::single(udp_csum), udp),
            (VnetHdr::default(), icmp),
            (VnetHdr::default(), udp6),
        ];
        if framing == Framing::Ethernet {
            want.push((VnetHdr::default(), arp_frame()));
        }
        assert_eq!(out[..out.len() - 1], want[..]);
        assert_eq!(shape(&out[out.len() - 1..].to_vec(), framing), vec![3]);
    }
}

#[test]
fn unknown_l4_between_the_same_hosts_flushes_first() {
    // An IPv4 fragment carrying TCP and an IPv6 packet with a hop-by-hop
    // header may belong to the pending connection: it leaves after it.
    for v6 in [false, true] {
        let t = Tcp::new(Framing::Ethernet, v6);
        let mut f = Flow::new(t.clone());
        let (s0, s1) = (f.seg(1000, false), f.seg(1000, false));
        let mut odd = f.seg(1000, false).0;
        if v6 {
            odd[20] = 0; // next header: hop-by-hop options
        } else {
            odd[20] |= 0x20; // MF
        }
        let other_host = Flow::new(Tcp {
            host: 77,
            ..t.clone()
        })
        .seg(100, false);
        let mut odd_elsewhere = other_host.0.clone();
        if v6 {
            odd_elsewhere[20] = 0;
        } else {
            odd_elsewhere[20] |= 0x20;
        }
        let input = vec![
            s0,
            s1,
            (odd_elsewhere.clone(), Csum::Complete),
            (odd.clone(), Csum::Complete),
        ];
        let out = coalesce(&mut Coalescer::new(Framing::Ethernet, 8, 65_549), &input);
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].1, odd_elsewhere, "unrelated: leaves at once");
        assert_eq!(out[1].0.gso_size, 1000, "the pending item before ...");
        assert_eq!(out[2].1, odd, "... the packet that may follow it");
    }
}

#[test]
fn eviction_when_all_slots_are_taken() {
    let t = Tcp::new(Framing::Ethernet, true);
    let mut flows: Vec<Flow> = (0..3)
        .map(|i| {
            Flow::new(Tcp {
                sport: 100 + i,
                ..t.clone()
            })
        })
        .collect();
    let mut input = Vec::new();
    for _ in 0..3 {
        for f in flows.iter_mut() {
            input.push(f.seg(500, false));
        }
    }
    for max_flows in [0, 1, 2, 3] {
        let out = coalesce(&mut Coalescer::new(t.framing, max_flows, 65_549), &input);
        let back = resegment(&out, t.framing);
        // Per flow, all segments in order.
        for port in 100..103 {
            let of = |v: &Vec<(Vec<u8>, Csum)>| -> Vec<_> {
                v.iter()
                    .filter(|(f, _)| be16(f, t.l4()) == port)
                    .cloned()
                    .collect()
            };
            assert_eq!(of(&back), of(&input), "max_flows {max_flows}");
        }
        match max_flows {
            0 => assert_eq!(out.len(), 9, "coalescing off"),
            3 => assert_eq!(shape(&out, t.framing), vec![3, 3, 3]),
            _ => assert!(out.len() > 3),
        }
    }
}

#[test]
fn max_len_caps_coalesced_frames() {
    for v6 in [false, true] {
        let t = Tcp::new(Framing::Ethernet, v6);
        let mut f = Flow::new(t.clone());
        let input: Vec<_> = (0..20).map(|_| f.seg(1000, false)).collect();
        let max_len = t.data() + 4500;
        let out = coalesce(&mut Coalescer::new(t.framing, 8, max_len), &input);
        assert!(out.iter().all(|(_, f)| f.len() <= max_len));
        assert_eq!(shape(&out, t.framing), vec![4, 4, 4, 4, 4]);
        assert_eq!(resegment(&out, t.framing), input);
        // A frame that does not fit at all passes as it is.
        let out = coalesce(&mut Coalescer::new(t.framing, 8, 100), &input[..3]);
        assert_eq!(shape(&out, t.framing), vec![1, 1, 1]);
        // The IP length fields cap it too, whatever max_len says.
        let mut f = Flow::new(t.clone());
        let input: Vec<_> = (0..80).map(|_| f.seg(1400, false)).collect();
        let out = coalesce(&mut Coalescer::new(t.framing, 8, 1 << 20), &input);
        // IPv4 total length, IPv6 payload length.
        assert!(out
            .iter()
            .all(|(_, f)| f.len() - 14 - if v6 { 40 } else { 0 } <= 65_535));
        assert_eq!(resegment(&out, t.framing), input);
    }
}

#[test]
fn coalesced_frame_completes_to_a_valid_checksum() {
    // A device that cannot take the GSO frame may complete it whole.
    let t = Tcp::new(Framing::Ethernet, false);
    let mut f = Flow::new(t.clone());
    let input: Vec<_> = (0..5).map(|_| f.seg(1200, false)).collect();
    let out = coalesce(&mut Coalescer::new(t.framing, 8, 65_549), &input);
    let (h, frame) = &out[0];
    let mut done = frame.clone();
    complete_checksum(
        &mut done,
        Csum::Partial {
            start: h.csum_start,
            offset: h.csum_offset,
        },
    )
    .unwrap();
    let lay = Layout::of(&done, t.framing);
    assert!(lay.l4_valid(&done, IPPROTO_TCP));
    assert!(lay.ipv4_hdr_valid(&done));
}

#[test]
fn damaged_ipv4_header_checksum_is_not_merged() {
    let t = Tcp::new(Framing::Ethernet, false);
    let mut f = Flow::new(t.clone());
    let (s0, mut s1, s2) = (f.seg(1000, false), f.seg(1000, false), f.seg(1000, false));
    s1.0[24] ^= 1;
    let out = coalesce(
        &mut Coalescer::new(t.framing, 8, 65_549),
        &[s0, s1.clone(), s2],
    );
    assert_eq!(out.len(), 3);
    assert_eq!(
        out[1],
        (VnetHdr::single(s1.1), s1.0),
        "passed on as it came"
    );
}

// ---------------------------------------------------------------------------
// Properties

mod props {
    use super::*;
    use proptest::prelude::*;

    fn framing() -> impl Strategy<Value = Framing> {
        prop_oneof![Just(Framing::Ethernet), Just(Framing::Ip)]
    }

    fn csum() -> impl Strategy<Value = Csum> {
        prop_oneof![
            Just(Csum::Complete),
            (any::<u16>(), any::<u16>())
                .prop_map(|(start, offset)| Csum::Partial { start, offset }),
            (0u16..100, prop_oneof![Just(6u16), Just(16u16)])
                .prop_map(|(start, offset)| Csum::Partial { start, offset }),
        ]
    }

    fn vnet() -> impl Strategy<Value = VnetHdr> {
        (
            0u8..4,
            prop_oneof![Just(0u8), Just(1), Just(4), Just(0x81), any::<u8>()],
            any::<u16>(),
            prop_oneof![Just(0u16), 1u16..3000, any::<u16>()],
            prop_oneof![0u16..80, any::<u16>()],
            prop_oneof![Just(16u16), Just(6), any::<u16>()],
        )
            .prop_map(
                |(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)| VnetHdr {
                    flags,
                    gso_type,
                    hdr_len,
                    gso_size,
                    csum_start,
                    csum_offset,
                },
            )
    }

    /// A valid super-frame with a few bytes overwritten at random.
    fn mangled() -> impl Strategy<Value = (Framing, VnetHdr, Vec<u8>)> {
        (
            framing(),
            any::<bool>(),
            0usize..5000,
            1u16..2000,
            proptest::collection::vec((0usize..200, any::<u8>()), 0..4),
            0usize..40,
        )
            .prop_map(|(framing, v6, len, mss, edits, cut)| {
                let t = Tcp::new(framing, v6);
                let (hdr, mut f) = t.super_frame(&payload(len, 5), mss);
                for (i, b) in edits {
                    if let Some(x) = f.get_mut(i) {
                        *x = b;
                    }
                }
                f.truncate(f.len().saturating_sub(cut));
                (framing, hdr, f)
            })
    }

    /// `n` consecutive segments of one flow (after skipping `skip`), with
    /// `edits` damaging the first and the `complete`-th completed.
    fn segment_run(
        v6: bool,
        skip: usize,
        n: usize,
        edits: &[(usize, u8)],
        complete: usize,
    ) -> Vec<(Vec<u8>, Csum)> {
        let mut f = Flow::new(Tcp::new(Framing::Ethernet, v6));
        let mut run: Vec<_> = (0..skip + n)
            .map(|_| f.seg(100, false))
            .skip(skip)
            .collect();
        for &(j, b) in edits {
            if let Some(x) = run[0].0.get_mut(j) {
                *x = b;
            }
        }
        if let Some((fr, c)) = run.get_mut(complete) {
            complete_checksum(fr, *c).unwrap();
            *c = Csum::Complete;
        }
        run
    }

    fn drain(hdr: &VnetHdr, frame: &[u8], framing: Framing) {
        if let Ok(mut s) = segments(hdr, frame, framing) {
            let max = s.max_segment_len();
            let mut out = vec![0u8; max];
            let mut n = 0;
            while let Ok(Some((len, csum))) = s.next_into(&mut out) {
                assert!(len <= max);
                let mut seg = out[..len].to_vec();
                assert!(complete_checksum(&mut seg, csum).is_ok());
                n += 1;
            }
            assert_eq!(n, s.count());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn checksum_add_is_rfc1071(data in proptest::collection::vec(any::<u8>(), 0..3000), cut in 0usize..1500) {
            let cut = (cut * 2).min(data.len() & !1);
            let split = checksum_add(checksum_add(0, &data[..cut]), &data[cut..]);
            prop_assert_eq!(fold(split), ref_fold(ref_sum(&data)));
        }

        #[test]
        fn segments_never_panics_on_random_input(
            framing in framing(),
            hdr in vnet(),
            frame in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            drain(&hdr, &frame, framing);
        }

        #[test]
        fn segments_never_panics_on_mangled_super_frames((framing, hdr, frame) in mangled(), other in vnet()) {
            drain(&hdr, &frame, framing);
            drain(&other, &frame, framing);
        }

        #[test]
        fn complete_checksum_never_panics(frame in proptest::collection::vec(any::<u8>(), 0..200), csum in csum()) {
            let mut f = frame.clone();
            let r = complete_checksum(&mut f, csum);
            if r.is_err() || csum == Csum::Complete {
                prop_assert_eq!(f, frame);
            }
        }

        /// Random and mangled frames never panic the coalescer, and what it
        /// emits as GSO is always a frame segments() accepts.
        #[test]
        fn coalescer_never_panics_and_emits_valid_gso(
            framing in framing(),
            max_flows in 0usize..4,
            max_len in prop_oneof![Just(65_549usize), 0usize..3000],
            runs in proptest::collection::vec(
                prop_oneof![
                    (proptest::collection::vec(any::<u8>(), 0..120), csum()).prop_map(|(f, c)| vec![(f, c)]),
                    (any::<bool>(), 0usize..3, 1usize..6, proptest::collection::vec((0usize..80, any::<u8>()), 0..3), 0usize..8)
                        .prop_map(|(v6, skip, n, edits, complete)| segment_run(v6, skip, n, &edits, complete)),
                ],
                0..12,
            ),
        ) {
            let frames: Vec<(Vec<u8>, Csum)> = runs.into_iter().flatten().collect();
            let mut co = Coalescer::new(framing, max_flows, max_len);
            let mut out: Emitted = Vec::new();
            let mut emit = |h: &VnetHdr, f: &[u8]| out.push((*h, f.to_vec()));
            for (f, c) in &frames {
                co.push(f, *c, &mut emit);
            }
            co.flush(&mut emit);
            prop_assert_eq!(co.pending(), 0);
            prop_assert!(out.len() <= frames.len());
            for (h, f) in &out {
                if h.gso_type != 0 {
                    prop_assert!(f.len() <= max_len);
                    let segs = split(h, f, framing);
                    prop_assert!(segs.is_ok(), "{:?}", segs);
                }
            }
        }
    }

    /// One step of a generated batch.
    #[derive(Clone, Debug)]
    enum Step {
        /// A segment of flow `flow`; `kind` picks gaps, PSH, FIN, complete
        /// checksums, option and window changes, short segments.
        Seg {
            flow: usize,
            len: usize,
            kind: u8,
        },
        Udp,
        Arp,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            8 => (0usize..3, prop_oneof![3 => Just(1000usize), 1 => 1usize..1200], 0u8..40)
                .prop_map(|(flow, len, kind)| Step::Seg { flow, len, kind }),
            1 => Just(Step::Udp),
            1 => Just(Step::Arp),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// The central property: whatever the batch, re-segmenting what
        /// the coalescer emits gives back exactly the frames pushed, in
        /// order per connection, and other frames unchanged and in order.
        #[test]
        fn coalescing_preserves_every_flow(
            framing in framing(),
            v6 in proptest::collection::vec(any::<bool>(), 3),
            df in proptest::collection::vec(any::<bool>(), 3),
            steps in proptest::collection::vec(step(), 0..60),
            max_flows in 0usize..4,
            max_len in prop_oneof![Just(65_549usize), 100usize..8000],
        ) {
            let mut flows: Vec<Flow> = (0..3)
                .map(|i| Flow::new(Tcp { sport: 1000 + i as u16, v6: v6[i], df: df[i], ..Tcp::new(framing, v6[i]) }))
                .collect();
            let mut input: Vec<(Vec<u8>, Csum)> = Vec::new();
            for s in &steps {
                match *s {
                    Step::Seg { flow, len, kind } => {
                        let f = &mut flows[flow];
                        let seg = match kind {
                            0 => { f.t.seq = f.t.seq.wrapping_add(77); f.seg(len, false) }
                            1 => f.seg(len, true),
                            2 => f.seg_with(len, |t| t.flags = TCP_ACK | TCP_FIN | TCP_PSH),
                            3 => {
                                let (mut fr, c) = f.seg(len, false);
                                complete_checksum(&mut fr, c).unwrap();
                                (fr, Csum::Complete)
                            }
                            4 => { f.t.ts = Some((u32::from(kind) + f.t.seq, 1)); f.seg(len, false) }
                            5 => { f.t.window = f.t.window.wrapping_add(1); f.seg(len, false) }
                            6 => { f.t.seq = f.t.seq.wrapping_sub(len as u32); f.seg(len, false) }
                            7 => { f.t.ip_id = f.t.ip_id.wrapping_add(3); f.seg(len, false) }
                            _ => f.seg(len, false),
                        };
                        input.push(seg);
                    }
                    Step::Udp => input.push((udp_frame(framing, false, b"dns?", CsumMode::Complete), Csum::Complete)),
                    Step::Arp if framing == Framing::Ethernet => input.push((arp_frame(), Csum::Complete)),
                    Step::Arp => input.push((icmp_frame(framing), Csum::Complete)),
                }
            }
            let out = coalesce(&mut Coalescer::new(framing, max_flows, max_len), &input);
            for (h, f) in &out {
                if h.gso_type != 0 {
                    prop_assert!(f.len() <= max_len);
                }
            }
            let back = resegment(&out, framing);
            // Group by TCP source port (1000..1003), others separately.
            let key = |f: &[u8]| -> u16 {
                if framing == Framing::Ethernet && be16(f, 12) == 0x0806 {
                    return 0;
                }
                let lay = Layout::of(f, framing);
                let proto = if lay.v6 { f[lay.l3 + 6] } else { f[lay.l3 + 9] };
                if proto == IPPROTO_TCP { be16(f, lay.l4) } else { 0 }
            };
            // The id of an IPv4 datagram with DF carries no meaning: the
            // coalescer merges regardless and re-segmentation renumbers.
            let normalise = |(f, c): &(Vec<u8>, Csum)| -> (Vec<u8>, Csum) {
                let mut f = f.clone();
                let lay = Layout::of(&f, framing);
                if key(&f) != 0 && !lay.v6 && f[lay.l3 + 6] & 0x40 != 0 {
                    f[lay.l3 + 4..lay.l3 + 6].fill(0);
                    f[lay.l3 + 10..lay.l3 + 12].fill(0);
                }
                (f, *c)
            };
            for k in [0u16, 1000, 1001, 1002] {
                let a: Vec<_> = input.iter().filter(|(f, _)| key(f) == k).map(normalise).collect();
                let b: Vec<_> = back.iter().filter(|(f, _)| key(f) == k).map(normalise).collect();
                prop_assert_eq!(a, b, "flow {}", k);
            }
            prop_assert_eq!(back.len(), input.len());
        }
    }
}
