use super::*;
use crate::packet::build::*;
use crate::packet::{
    checksum, checksum_add, checksum_finish, pseudo_header_v6, BROADCAST, ETHERTYPE_VLAN, ETH_HLEN,
    IPPROTO_ICMP, IPPROTO_TCP,
};
use proptest::prelude::*;

use crate::alloc_count::allocations;

const L: Ipv4Addr = Ipv4Addr::new(10, 244, 3, 2);
const L_MAC: Mac = pod_mac(L);
const L_OTHER: Ipv4Addr = Ipv4Addr::new(10, 244, 3, 9);
const R1: Ipv4Addr = Ipv4Addr::new(10, 244, 5, 7);
const R1_MAC: Mac = pod_mac(R1);
const GW1: Ipv4Addr = Ipv4Addr::new(10, 244, 5, 1);
const GW1_MAC: Mac = [0x7a, 0x1c, 0x33, 0x44, 0x55, 0x01];
const HOST1: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 5);
const R2: Ipv4Addr = Ipv4Addr::new(10, 244, 6, 9);
const R2_MAC: Mac = pod_mac(R2);
const NOWHERE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const V6_LOCAL: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 3, 0, 0, 0, 2);
const V6_R7: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 7, 0, 0, 0, 2);
const TTL: Duration = Duration::from_secs(300);
/// This node's bridge and host address.
const L_BRIDGE: Mac = [0x7a, 0x1c, 0x99, 0, 0, 1];
const HOST_LOCAL: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 3);
const GW2: Ipv4Addr = Ipv4Addr::new(10, 244, 6, 1);

fn v6_mac(ip: Ipv6Addr) -> Mac {
    pod_mac_v6(ip)
}

fn counts(sw: &Switch) -> (usize, usize, usize) {
    let s = sw.stats();
    (s.peers, s.learned_macs, s.learned_ips)
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn cfg() -> SwitchConfig {
    SwitchConfig {
        local_subnet: net("10.244.3.0/24"),
        host_addr: Some(HOST_LOCAL.into()),
        host_addr6: None,
        bridge_mac: Some(L_BRIDGE),
        mtu: 1380,
        flood_rate: 10,
        flood_burst: 3,
        peer_flood_rate: 10,
        peer_flood_burst: 3,
        max_macs_per_peer: 4,
        mac_ttl: TTL,
    }
}

/// Peers 1 and 2 are IPv4 nodes with host addresses, 7 an IPv6 node.
fn switch() -> Switch {
    let mut sw = Switch::new(cfg());
    sw.set_peer(
        1,
        PeerAddrs {
            pod_subnet: net("10.244.5.0/24"),
            host_addr: Some(HOST1.into()),
            host_addr6: None,
            bridge_mac: None,
        },
    );
    sw.set_peer(
        2,
        PeerAddrs {
            pod_subnet: net("10.244.6.0/24"),
            host_addr: Some("10.10.0.6".parse().unwrap()),
            host_addr6: None,
            bridge_mac: None,
        },
    );
    sw.set_peer(
        7,
        PeerAddrs {
            pod_subnet: net("fd00:0:0:7::/64"),
            host_addr: None,
            host_addr6: None,
            bridge_mac: None,
        },
    );
    // As the engine does when a session with each comes up.
    for id in [1, 2, 7] {
        sw.reserve(id);
    }
    sw
}

fn mac(last: u8) -> Mac {
    [0x7a, 0x1c, 0, 0, 0, last]
}

fn local(sw: &mut Switch, now: Instant, frame: &[u8]) -> LocalVerdict {
    sw.from_local(now, frame, false, &mut [0; 1600])
}

fn reply(sw: &mut Switch, now: Instant, frame: &[u8]) -> Vec<u8> {
    let mut out = [0; 1600];
    match sw.from_local(now, frame, false, &mut out) {
        LocalVerdict::Reply(n) => out[..n].to_vec(),
        v => panic!("expected a reply, got {v:?}"),
    }
}

fn udp4(src_mac: Mac, dst_mac: Mac, src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    udp4_ports(src_mac, dst_mac, src, dst, 5000, 5001)
}

fn udp4_ports(
    src_mac: Mac,
    dst_mac: Mac,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sp: u16,
    dp: u16,
) -> Vec<u8> {
    eth(
        dst_mac,
        src_mac,
        ETHERTYPE_IPV4,
        &ipv4(src, dst, IPPROTO_UDP, true, &udp(sp, dp, &[0; 24])),
    )
}

fn arp_frame(dst_mac: Mac, op: u16, sender: (Mac, Ipv4Addr), target: (Mac, Ipv4Addr)) -> Vec<u8> {
    eth(dst_mac, sender.0, ETHERTYPE_ARP, &arp(op, sender, target))
}

fn who_has(target: Ipv4Addr) -> Vec<u8> {
    arp_frame(BROADCAST, ARP_REQUEST, (L_MAC, L), ([0; 6], target))
}

fn ip6(
    src_mac: Mac,
    dst_mac: Mac,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    nh: u8,
    payload: &[u8],
) -> Vec<u8> {
    eth(
        dst_mac,
        src_mac,
        ETHERTYPE_IPV6,
        &ipv6(src, dst, nh, payload),
    )
}

fn solicit(src: Ipv6Addr, target: Ipv6Addr) -> Vec<u8> {
    let t = target.octets();
    let group = Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | u16::from(t[13]),
        u16::from_be_bytes([t[14], t[15]]),
    );
    let dst_mac = [0x33, 0x33, 0xff, t[13], t[14], t[15]];
    ip6(
        L_MAC,
        dst_mac,
        src,
        group,
        IPPROTO_ICMPV6,
        &neighbor_solicit(target),
    )
}

#[test]
fn drop_reasons_have_distinct_snake_case_labels() {
    let labels: Vec<_> = DropReason::ALL.iter().map(|r| r.as_str()).collect();
    for (i, l) in labels.iter().enumerate() {
        assert!(l.chars().all(|c| c.is_ascii_lowercase() || c == '_'), "{l}");
        assert!(!labels[..i].contains(l), "{l} twice");
    }
    assert_eq!(DropReason::Dhcp.as_str(), "dhcp");
    assert_eq!(DropReason::LinkLocal.as_str(), "link_local");
}

#[test]
fn local_short_frames_and_group_sources_are_malformed() {
    let (mut sw, t) = (switch(), Instant::now());
    let frame = udp4(L_MAC, R1_MAC, L, R1);
    assert_eq!(
        local(&mut sw, t, &frame[..13]),
        LocalVerdict::Drop(Malformed)
    );
    assert_eq!(local(&mut sw, t, &[]), LocalVerdict::Drop(Malformed));
    assert_eq!(
        local(&mut sw, t, &udp4([0x33, 0x33, 0, 0, 0, 1], R1_MAC, L, R1)),
        LocalVerdict::Drop(Malformed)
    );
    // IPv4 ethertype with a broken header, ARP for other protocols, ARP op 3.
    assert_eq!(
        local(&mut sw, t, &eth(R1_MAC, L_MAC, ETHERTYPE_IPV4, &[0x45; 10])),
        LocalVerdict::Drop(Malformed)
    );
    let mut arp_v6 = who_has(R1);
    arp_v6[ETH_HLEN + 2] = 0x86;
    assert_eq!(local(&mut sw, t, &arp_v6), LocalVerdict::Drop(Malformed));
    let rarp = arp_frame(BROADCAST, 3, (L_MAC, L), ([0; 6], R1));
    assert_eq!(local(&mut sw, t, &rarp), LocalVerdict::Drop(Malformed));
    // UDP shorter than its header.
    let bad_udp = eth(
        R1_MAC,
        L_MAC,
        ETHERTYPE_IPV4,
        &ipv4(L, R1, IPPROTO_UDP, true, &[0; 5]),
    );
    assert_eq!(local(&mut sw, t, &bad_udp), LocalVerdict::Drop(Malformed));
}

#[test]
fn local_link_local_groups_are_never_forwarded() {
    let (mut sw, t) = (switch(), Instant::now());
    for last in [0x00, 0x01, 0x02, 0x0e, 0x0f] {
        let stp = eth(
            [0x01, 0x80, 0xc2, 0, 0, last],
            L_MAC,
            0x0026,
            &[0x42, 0x42, 0x03],
        );
        assert_eq!(
            local(&mut sw, t, &stp),
            LocalVerdict::Drop(LinkLocal),
            "{last:#x}"
        );
    }
    let not_reserved = udp4(L_MAC, [0x01, 0x80, 0xc2, 0, 0, 0x10], L, R1);
    assert_eq!(local(&mut sw, t, &not_reserved), LocalVerdict::Flood);
}

#[test]
fn both_directions_give_an_8023_frame_to_a_link_local_group_the_same_reason() {
    // STP BPDUs are 802.3 frames: a length field (here 38) where the
    // ethertype would be, so both the group and the type are wrong.
    let (mut sw, t) = (switch(), Instant::now());
    for last in [0x00, 0x0e] {
        let group = [0x01, 0x80, 0xc2, 0, 0, last];
        let from_bridge = eth(group, L_MAC, 0x0026, &[0x42; 38]);
        let from_peer = eth(group, R1_MAC, 0x0026, &[0x42; 38]);
        assert_eq!(
            local(&mut sw, t, &from_bridge),
            LocalVerdict::Drop(LinkLocal)
        );
        assert_eq!(sw.from_peer(t, 1, &from_peer), PeerVerdict::Drop(LinkLocal));
    }
}

#[test]
fn local_other_ethertypes_and_vlan_tags_are_dropped() {
    let (mut sw, t) = (switch(), Instant::now());
    let inner = udp4(L_MAC, R1_MAC, L, R1);
    let mut tagged = eth(R1_MAC, L_MAC, ETHERTYPE_VLAN, &[0, 5]);
    tagged.extend_from_slice(&inner[12..]);
    assert_eq!(local(&mut sw, t, &tagged), LocalVerdict::Drop(EtherType));
    for ethertype in [0x88a8, 0x0026, 0x8847, 0x88cc] {
        assert_eq!(
            local(&mut sw, t, &eth(R1_MAC, L_MAC, ethertype, &[0; 46])),
            LocalVerdict::Drop(EtherType)
        );
    }
}

#[test]
fn dhcp_never_crosses_in_either_direction() {
    let (mut sw, t) = (switch(), Instant::now());
    let discover = udp4_ports(
        L_MAC,
        BROADCAST,
        "0.0.0.0".parse().unwrap(),
        Ipv4Addr::BROADCAST,
        68,
        67,
    );
    assert_eq!(local(&mut sw, t, &discover), LocalVerdict::Drop(Dhcp));
    let offer = udp4_ports(L_MAC, R1_MAC, L, R1, 67, 68);
    assert_eq!(local(&mut sw, t, &offer), LocalVerdict::Drop(Dhcp));
    let solicit6 = ip6(
        L_MAC,
        [0x33, 0x33, 0, 1, 0, 2],
        V6_LOCAL,
        "ff02::1:2".parse().unwrap(),
        IPPROTO_UDP,
        &udp(546, 547, &[0; 8]),
    );
    assert_eq!(local(&mut sw, t, &solicit6), LocalVerdict::Drop(Dhcp));

    let from_server = udp4_ports(R1_MAC, BROADCAST, R1, Ipv4Addr::BROADCAST, 67, 68);
    assert_eq!(sw.from_peer(t, 1, &from_server), PeerVerdict::Drop(Dhcp));
    let advertise = ip6(
        mac(7),
        L_MAC,
        V6_R7,
        V6_LOCAL,
        IPPROTO_UDP,
        &udp(547, 546, &[0; 8]),
    );
    assert_eq!(sw.from_peer(t, 7, &advertise), PeerVerdict::Drop(Dhcp));
    // Port 67 in a non-first fragment is just payload.
    let mut frag = ipv4(L, R1, IPPROTO_UDP, false, &udp(68, 67, &[0; 8]));
    frag[6..8].copy_from_slice(&0x0010u16.to_be_bytes());
    let frag = eth(R1_MAC, L_MAC, ETHERTYPE_IPV4, &frag);
    assert_eq!(local(&mut sw, t, &frag), LocalVerdict::Unicast(1));
}

fn tcp4(df: bool, l3_len: usize) -> Vec<u8> {
    eth(
        R1_MAC,
        L_MAC,
        ETHERTYPE_IPV4,
        &ipv4(L, R1, IPPROTO_TCP, df, &vec![0x5a; l3_len - 20]),
    )
}

#[test]
fn oversized_ipv4_with_df_is_answered_with_fragmentation_needed() {
    let (mut sw, t) = (switch(), Instant::now());
    assert_eq!(
        local(&mut sw, t, &tcp4(true, 1380)),
        LocalVerdict::Unicast(1)
    );
    let frame = tcp4(true, 1381);
    let answer = reply(&mut sw, t, &frame);

    let e = Ethernet::parse(&answer).unwrap();
    assert_eq!((e.dst, e.src, e.ethertype), (L_MAC, R1_MAC, ETHERTYPE_IPV4));
    let ip = Ipv4::parse(e.payload).unwrap();
    assert_eq!(
        (ip.src, ip.dst, ip.ttl, ip.protocol),
        (R1, L, 64, IPPROTO_ICMP)
    );
    assert_eq!(ip.total_len(), e.payload.len());
    let mut header = ip.header.to_vec();
    header[10..12].fill(0);
    assert_eq!(checksum(&header), ip.checksum, "IP header checksum");
    let mut icmp = ip.payload.to_vec();
    let sent = u16::from_be_bytes([icmp[2], icmp[3]]);
    icmp[2..4].fill(0);
    assert_eq!(checksum(&icmp), sent, "ICMP checksum");
    assert_eq!(&icmp[..2], &[3, 4]);
    assert_eq!(u16::from_be_bytes([icmp[6], icmp[7]]), 1380, "next-hop MTU");
    assert_eq!(
        &icmp[8..],
        &frame[ETH_HLEN..ETH_HLEN + 20 + 64],
        "quotes header + 64 bytes"
    );
}

#[test]
fn oversized_ipv6_is_answered_with_packet_too_big() {
    let (mut sw, t) = (switch(), Instant::now());
    let frame = ip6(L_MAC, mac(7), V6_LOCAL, V6_R7, IPPROTO_TCP, &[0x5a; 1341]);
    let answer = reply(&mut sw, t, &frame);
    assert!(answer.len() - ETH_HLEN <= 1280);
    let e = Ethernet::parse(&answer).unwrap();
    assert_eq!((e.dst, e.src), (L_MAC, mac(7)));
    let ip = Ipv6::parse(e.payload).unwrap();
    assert_eq!(
        (ip.src, ip.dst, ip.next_header, ip.hop_limit),
        (V6_R7, V6_LOCAL, IPPROTO_ICMPV6, 64)
    );
    let mut icmp = ip.payload.to_vec();
    let sent = u16::from_be_bytes([icmp[2], icmp[3]]);
    icmp[2..4].fill(0);
    let pseudo = pseudo_header_v6(ip.src, ip.dst, IPPROTO_ICMPV6, icmp.len() as u32);
    assert_eq!(
        checksum_finish(checksum_add(pseudo, &icmp)),
        sent,
        "ICMPv6 checksum with pseudo-header"
    );
    assert_eq!((icmp[0], icmp[1]), (2, 0));
    assert_eq!(
        u32::from_be_bytes([icmp[4], icmp[5], icmp[6], icmp[7]]),
        1380
    );
    assert_eq!(&icmp[8..], &frame[ETH_HLEN..ETH_HLEN + icmp.len() - 8]);
}

#[test]
fn oversized_frames_that_may_not_be_answered_are_dropped() {
    let (mut sw, t) = (switch(), Instant::now());
    assert_eq!(
        local(&mut sw, t, &tcp4(false, 1381)),
        LocalVerdict::Drop(TooBig)
    );
    let unreachable = eth(
        R1_MAC,
        L_MAC,
        ETHERTYPE_IPV4,
        &ipv4(L, R1, IPPROTO_ICMP, true, &icmp(3, 1, &[0; 1400])),
    );
    assert_eq!(local(&mut sw, t, &unreachable), LocalVerdict::Drop(TooBig));
    let from_nowhere = ip6(
        L_MAC,
        mac(7),
        Ipv6Addr::UNSPECIFIED,
        V6_R7,
        IPPROTO_TCP,
        &[0; 1400],
    );
    assert_eq!(local(&mut sw, t, &from_nowhere), LocalVerdict::Drop(TooBig));
    let mut huge_arp = who_has(R1);
    huge_arp.resize(1500, 0);
    assert_eq!(local(&mut sw, t, &huge_arp), LocalVerdict::Drop(TooBig));
}

#[test]
fn gso_super_frames_are_not_measured_against_the_mtu() {
    let (mut sw, t) = (switch(), Instant::now());
    let frame = tcp4(true, 60_000);
    assert_eq!(
        sw.from_local(t, &frame, true, &mut [0; 1600]),
        LocalVerdict::Unicast(1)
    );
    assert_eq!(
        sw.from_local(t, &frame, false, &mut [0; 1600]),
        LocalVerdict::Reply(14 + 20 + 8 + 20 + 64)
    );
}

#[test]
fn arp_for_a_remote_pod_is_answered_with_its_derived_mac() {
    let (mut sw, t) = (switch(), Instant::now());
    for dst in [BROADCAST, R1_MAC] {
        let answer = reply(
            &mut sw,
            t,
            &arp_frame(dst, ARP_REQUEST, (L_MAC, L), ([0; 6], R1)),
        );
        let e = Ethernet::parse(&answer).unwrap();
        assert_eq!((e.dst, e.src, e.ethertype), (L_MAC, R1_MAC, ETHERTYPE_ARP));
        let a = Arp::parse(e.payload).unwrap();
        assert_eq!(
            a,
            Arp {
                op: ARP_REPLY,
                sender_mac: R1_MAC,
                sender_ip: R1,
                target_mac: L_MAC,
                target_ip: L
            }
        );
    }
    // Answers cost no flood budget.
    for _ in 0..10 {
        reply(&mut sw, t, &who_has(R2));
    }
}

#[test]
fn arp_about_the_local_link_or_nobody_stays_here() {
    let (mut sw, t) = (switch(), Instant::now());
    assert_eq!(
        local(&mut sw, t, &who_has(L_OTHER)),
        LocalVerdict::Drop(Local)
    );
    let announce = arp_frame(BROADCAST, ARP_REQUEST, (L_MAC, L), ([0; 6], L));
    assert_eq!(local(&mut sw, t, &announce), LocalVerdict::Drop(Local));
    let announce_reply = arp_frame(BROADCAST, ARP_REPLY, (L_MAC, L), (BROADCAST, L));
    assert_eq!(
        local(&mut sw, t, &announce_reply),
        LocalVerdict::Drop(Local)
    );
    let probe = arp_frame(
        BROADCAST,
        ARP_REQUEST,
        (L_MAC, Ipv4Addr::UNSPECIFIED),
        ([0; 6], R1),
    );
    assert_eq!(local(&mut sw, t, &probe), LocalVerdict::Drop(Local));
    assert_eq!(
        local(&mut sw, t, &who_has(NOWHERE)),
        LocalVerdict::Drop(NoRoute)
    );
    assert_eq!(
        local(&mut sw, t, &who_has(Ipv4Addr::new(10, 244, 9, 9))),
        LocalVerdict::Drop(NoRoute)
    );
}

#[test]
fn arp_for_a_remote_gateway_goes_to_its_owner_until_its_reply_is_learned() {
    let (mut sw, t) = (switch(), Instant::now());
    assert_eq!(local(&mut sw, t, &who_has(GW1)), LocalVerdict::Unicast(1));

    let gw_reply = arp_frame(L_MAC, ARP_REPLY, (GW1_MAC, GW1), (L_MAC, L));
    assert_eq!(sw.from_peer(t, 1, &gw_reply), PeerVerdict::Deliver);
    assert_eq!(counts(&sw), (3, 1, 1));

    let answer = reply(&mut sw, t + Duration::from_secs(1), &who_has(GW1));
    let a = Arp::parse(&answer[ETH_HLEN..]).unwrap();
    assert_eq!((a.sender_mac, a.sender_ip), (GW1_MAC, GW1));
    assert_eq!(Ethernet::parse(&answer).unwrap().src, GW1_MAC);

    // An expired binding is no answer.
    assert_eq!(
        local(&mut sw, t + TTL, &who_has(GW1)),
        LocalVerdict::Unicast(1)
    );
}

#[test]
fn resolution_and_floods_have_budgets_of_their_own_per_source() {
    let (mut sw, t) = (switch(), Instant::now());
    for _ in 0..3 {
        assert_eq!(local(&mut sw, t, &who_has(GW1)), LocalVerdict::Unicast(1));
    }
    assert_eq!(
        local(&mut sw, t, &who_has(GW1)),
        LocalVerdict::Drop(RateLimited)
    );
    // Floods are another budget ...
    assert_eq!(
        local(&mut sw, t, &udp4(L_MAC, BROADCAST, L, Ipv4Addr::BROADCAST)),
        LocalVerdict::Flood
    );
    // ... and another pod still resolves: one pod cannot deny neighbour
    // resolution to its whole node.
    let other = pod_mac(L_OTHER);
    let ask = arp_frame(BROADCAST, ARP_REQUEST, (other, L_OTHER), ([0; 6], GW1));
    for _ in 0..3 {
        assert_eq!(local(&mut sw, t, &ask), LocalVerdict::Unicast(1));
    }
    assert_eq!(local(&mut sw, t, &ask), LocalVerdict::Drop(RateLimited));
    let ns = |src: Mac| {
        let mut f = solicit(V6_LOCAL, V6_R7);
        f[6..12].copy_from_slice(&src);
        f
    };
    assert_eq!(
        local(&mut sw, t, &ns(L_MAC)),
        LocalVerdict::Drop(RateLimited),
        "ARP and ND share the source's resolution budget"
    );
    assert_eq!(local(&mut sw, t, &ns(mac(0x31))), LocalVerdict::Unicast(7));
}

#[test]
fn sources_past_the_table_share_one_budget_and_idle_ones_are_forgotten() {
    let (mut sw, t) = (switch(), Instant::now());
    for i in 0..MAX_SOURCES as u32 {
        let [_, a, b, c] = i.to_be_bytes();
        let f = udp4([0x06, 0, 0, a, b, c], BROADCAST, L, Ipv4Addr::BROADCAST);
        assert_eq!(local(&mut sw, t, &f), LocalVerdict::Flood);
    }
    let crowd = |n: u8| udp4([0x06, 0xff, 0, 0, 0, n], BROADCAST, L, Ipv4Addr::BROADCAST);
    for n in 0..3 {
        assert_eq!(local(&mut sw, t, &crowd(n)), LocalVerdict::Flood);
    }
    assert_eq!(
        local(&mut sw, t, &crowd(9)),
        LocalVerdict::Drop(RateLimited)
    );
    sw.check_invariants();
    // Full buckets are idle: forgotten, and the table has room again.
    sw.expire(t + Duration::from_secs(60));
    assert!(sw.sources.is_empty());
    assert_eq!(
        local(&mut sw, t + Duration::from_secs(60), &crowd(9)),
        LocalVerdict::Flood
    );
}

#[test]
fn a_learned_binding_beats_the_derived_mac() {
    let (mut sw, t) = (switch(), Instant::now());
    // A pod of node 1 with a second address: its MAC is derived from
    // the first.
    let second = Ipv4Addr::new(10, 244, 5, 8);
    let announce = arp_frame(BROADCAST, ARP_REQUEST, (R1_MAC, second), ([0; 6], L));
    assert_eq!(sw.from_peer(t, 1, &announce), PeerVerdict::Deliver);
    let answer = reply(&mut sw, t, &who_has(second));
    assert_eq!(Arp::parse(&answer[ETH_HLEN..]).unwrap().sender_mac, R1_MAC);
    // A binding from a peer that doesn't own the subnet is never made.
    let liar = arp_frame(BROADCAST, ARP_REQUEST, (R2_MAC, R1), ([0; 6], L));
    assert_eq!(sw.from_peer(t, 2, &liar), PeerVerdict::Drop(Spoofed));
    assert_eq!(
        Arp::parse(&reply(&mut sw, t, &who_has(R1))[ETH_HLEN..])
            .unwrap()
            .sender_mac,
        R1_MAC
    );
}

#[test]
fn arp_replies_from_local_pods_are_routed_by_destination_mac() {
    let (mut sw, t) = (switch(), Instant::now());
    let answer = arp_frame(R1_MAC, ARP_REPLY, (L_MAC, L), (R1_MAC, R1));
    assert_eq!(local(&mut sw, t, &answer), LocalVerdict::Unicast(1));
    let to_gw = arp_frame(GW1_MAC, ARP_REPLY, (L_MAC, L), (GW1_MAC, GW1));
    assert_eq!(
        local(&mut sw, t, &to_gw),
        LocalVerdict::Unicast(1),
        "by target address"
    );
    let broadcast = arp_frame(BROADCAST, ARP_REPLY, (L_MAC, L), (BROADCAST, R1));
    assert_eq!(local(&mut sw, t, &broadcast), LocalVerdict::Flood);
}

#[test]
fn neighbour_solicitations_go_to_the_owner_of_their_target_only() {
    let (mut sw, t) = (switch(), Instant::now());
    assert_eq!(
        local(&mut sw, t, &solicit(V6_LOCAL, V6_R7)),
        LocalVerdict::Unicast(7)
    );
    assert_eq!(
        local(
            &mut sw,
            t,
            &solicit(V6_LOCAL, "fd00:0:0:9::2".parse().unwrap())
        ),
        LocalVerdict::Drop(NoRoute)
    );
    assert_eq!(
        local(&mut sw, t, &solicit(Ipv6Addr::UNSPECIFIED, V6_R7)),
        LocalVerdict::Drop(Local),
        "DAD"
    );
    // Burst 3: one spent above, none by the drops.
    for _ in 0..2 {
        assert_eq!(
            local(&mut sw, t, &solicit(V6_LOCAL, V6_R7)),
            LocalVerdict::Unicast(7)
        );
    }
    assert_eq!(
        local(&mut sw, t, &solicit(V6_LOCAL, V6_R7)),
        LocalVerdict::Drop(RateLimited)
    );

    let mut sw6 = Switch::new(SwitchConfig {
        local_subnet: net("fd00:0:0:3::/64"),
        ..cfg()
    });
    sw6.set_peer(
        7,
        PeerAddrs {
            pod_subnet: net("fd00:0:0:7::/64"),
            host_addr: None,
            host_addr6: None,
            bridge_mac: None,
        },
    );
    let neighbour = "fd00:0:0:3::5".parse().unwrap();
    assert_eq!(
        local(&mut sw6, t, &solicit(V6_LOCAL, neighbour)),
        LocalVerdict::Drop(Local)
    );

    let mut short = solicit(V6_LOCAL, V6_R7);
    short.truncate(short.len() - 1);
    short[ETH_HLEN + 5] -= 1;
    assert_eq!(local(&mut sw6, t, &short), LocalVerdict::Drop(Malformed));
}

#[test]
fn other_ipv6_multicast_is_link_local() {
    let (mut sw, t) = (switch(), Instant::now());
    let all_nodes = [0x33, 0x33, 0, 0, 0, 1];
    let ra = ip6(
        L_MAC,
        all_nodes,
        V6_LOCAL,
        "ff02::1".parse().unwrap(),
        IPPROTO_ICMPV6,
        &icmp(134, 0, &[0; 12]),
    );
    assert_eq!(local(&mut sw, t, &ra), LocalVerdict::Drop(LinkLocal));
    let mld = ip6(
        L_MAC,
        [0x33, 0x33, 0, 0, 0, 0x16],
        V6_LOCAL,
        "ff02::16".parse().unwrap(),
        0,
        &[58, 0, 5, 2, 0, 0, 1, 0],
    );
    assert_eq!(local(&mut sw, t, &mld), LocalVerdict::Drop(LinkLocal));
    let mdns = ip6(
        L_MAC,
        [0x33, 0x33, 0, 0, 0, 0xfb],
        V6_LOCAL,
        "ff02::fb".parse().unwrap(),
        IPPROTO_UDP,
        &udp(5353, 5353, &[0; 12]),
    );
    assert_eq!(local(&mut sw, t, &mdns), LocalVerdict::Drop(LinkLocal));
}

#[test]
fn unicast_goes_by_learned_mac_then_derived_mac_then_destination_address() {
    let (mut sw, t) = (switch(), Instant::now());
    let gw2 = mac(0x22);
    assert_eq!(
        sw.from_peer(t, 2, &udp4(gw2, L_MAC, GW2, L)),
        PeerVerdict::Deliver
    );
    assert_eq!(
        local(&mut sw, t, &udp4(L_MAC, gw2, L, NOWHERE)),
        LocalVerdict::Unicast(2),
        "learned"
    );
    assert_eq!(
        local(&mut sw, t, &udp4(L_MAC, R1_MAC, L, NOWHERE)),
        LocalVerdict::Unicast(1),
        "derived"
    );
    assert_eq!(
        local(&mut sw, t, &udp4(L_MAC, pod_mac(L_OTHER), L, R1)),
        LocalVerdict::Drop(Local),
        "derived local"
    );
    assert_eq!(
        local(&mut sw, t, &udp4(L_MAC, mac(9), L, R2)),
        LocalVerdict::Unicast(2),
        "by address"
    );
    let stray = pod_mac(Ipv4Addr::new(10, 244, 9, 9));
    assert_eq!(
        local(&mut sw, t, &udp4(L_MAC, stray, L, R1)),
        LocalVerdict::Unicast(1),
        "underivable, by address"
    );
    assert_eq!(
        local(&mut sw, t, &udp4(L_MAC, mac(9), L, L_OTHER)),
        LocalVerdict::Drop(Local),
        "local address"
    );
    let v6 = ip6(L_MAC, mac(9), V6_LOCAL, V6_R7, IPPROTO_TCP, &[0; 20]);
    assert_eq!(local(&mut sw, t, &v6), LocalVerdict::Unicast(7));
    assert_eq!(
        local(&mut sw, t, &udp4(L_MAC, mac(9), L, NOWHERE)),
        LocalVerdict::Flood,
        "unknown unicast"
    );
}

#[test]
fn floods_are_rate_limited_and_the_bucket_refills_with_time() {
    let (mut sw, t) = (switch(), Instant::now());
    let broadcast = udp4(L_MAC, BROADCAST, L, Ipv4Addr::new(10, 244, 255, 255));
    let mdns = udp4(
        L_MAC,
        [0x01, 0, 0x5e, 0, 0, 0xfb],
        L,
        Ipv4Addr::new(224, 0, 0, 251),
    );
    let at = |ms: u64| t + Duration::from_millis(ms);
    for frame in [&broadcast, &mdns, &broadcast] {
        assert_eq!(local(&mut sw, t, frame), LocalVerdict::Flood);
    }
    assert_eq!(
        local(&mut sw, t, &broadcast),
        LocalVerdict::Drop(RateLimited)
    );
    // 10 per second: a token per 100 ms, and fractions are kept.
    assert_eq!(
        local(&mut sw, at(70), &broadcast),
        LocalVerdict::Drop(RateLimited)
    );
    assert_eq!(local(&mut sw, at(140), &broadcast), LocalVerdict::Flood);
    assert_eq!(
        local(&mut sw, at(150), &broadcast),
        LocalVerdict::Drop(RateLimited)
    );
    assert_eq!(local(&mut sw, at(200), &broadcast), LocalVerdict::Flood);
    // A long pause fills the bucket, never beyond the burst.
    for _ in 0..3 {
        assert_eq!(local(&mut sw, at(60_000), &mdns), LocalVerdict::Flood);
    }
    assert_eq!(
        local(&mut sw, at(60_000), &mdns),
        LocalVerdict::Drop(RateLimited)
    );
    // Time running backwards (a caller's bug) refills nothing.
    assert_eq!(local(&mut sw, t, &mdns), LocalVerdict::Drop(RateLimited));
}

#[test]
fn peer_frames_from_its_own_addresses_are_delivered_and_learned() {
    let (mut sw, t) = (switch(), Instant::now());
    assert_eq!(
        sw.from_peer(t, 1, &udp4(R1_MAC, L_MAC, R1, L)),
        PeerVerdict::Deliver
    );
    assert_eq!(
        sw.from_peer(t, 1, &udp4(GW1_MAC, L_MAC, HOST1, L)),
        PeerVerdict::Deliver
    );
    assert_eq!(
        sw.from_peer(
            t,
            1,
            &udp4(GW1_MAC, BROADCAST, GW1, Ipv4Addr::new(10, 244, 255, 255))
        ),
        PeerVerdict::Deliver
    );
    let mut sw6 = Switch::new(SwitchConfig {
        local_subnet: net("fd00:0:0:3::/64"),
        ..cfg()
    });
    sw6.set_peer(
        7,
        PeerAddrs {
            pod_subnet: net("fd00:0:0:7::/64"),
            host_addr: None,
            host_addr6: None,
            bridge_mac: None,
        },
    );
    let v6 = ip6(v6_mac(V6_R7), L_MAC, V6_R7, V6_LOCAL, IPPROTO_TCP, &[0; 20]);
    assert_eq!(sw6.from_peer(t, 7, &v6), PeerVerdict::Deliver);
    assert_eq!(sw6.stats().learned_macs, 1);
    assert_eq!(counts(&sw), (3, 2, 0));
    sw.check_invariants();
}

#[test]
fn peer_ipv4_sources_outside_its_subnet_are_spoofed() {
    let (mut sw, t) = (switch(), Instant::now());
    for src in [
        R2,
        L,
        NOWHERE,
        Ipv4Addr::UNSPECIFIED,
        "10.10.0.6".parse().unwrap(),
    ] {
        assert_eq!(
            sw.from_peer(t, 1, &udp4(mac(1), L_MAC, src, L)),
            PeerVerdict::Drop(Spoofed),
            "{src}"
        );
    }
    let v6_from_v4_node = ip6(mac(1), L_MAC, V6_R7, V6_LOCAL, IPPROTO_TCP, &[0; 20]);
    assert_eq!(
        sw.from_peer(t, 1, &v6_from_v4_node),
        PeerVerdict::Drop(Spoofed)
    );
    // A record claiming the whole pod CIDR still can't speak for us.
    sw.set_peer(
        9,
        PeerAddrs {
            pod_subnet: net("10.244.0.0/16"),
            host_addr: None,
            host_addr6: None,
            bridge_mac: None,
        },
    );
    assert_eq!(
        sw.from_peer(t, 9, &udp4(mac(9), L_MAC, L, L)),
        PeerVerdict::Drop(Spoofed)
    );
    assert_eq!(
        sw.from_peer(
            t,
            9,
            &udp4(
                pod_mac(Ipv4Addr::new(10, 244, 200, 1)),
                L_MAC,
                Ipv4Addr::new(10, 244, 200, 1),
                L
            )
        ),
        PeerVerdict::Deliver
    );
    assert_eq!(
        sw.from_peer(t, 42, &udp4(mac(1), L_MAC, R1, L)),
        PeerVerdict::Drop(Spoofed),
        "unknown peer"
    );
}

#[test]
fn peer_arp_senders_must_be_its_own() {
    let (mut sw, t) = (switch(), Instant::now());
    let request = |sender: (Mac, Ipv4Addr)| arp_frame(BROADCAST, ARP_REQUEST, sender, ([0; 6], L));
    assert_eq!(
        sw.from_peer(t, 1, &request((mac(1), R2))),
        PeerVerdict::Drop(Spoofed),
        "other subnet"
    );
    assert_eq!(
        sw.from_peer(t, 1, &request((mac(1), L))),
        PeerVerdict::Drop(Spoofed),
        "our subnet"
    );
    assert_eq!(
        sw.from_peer(t, 1, &request((mac(1), Ipv4Addr::UNSPECIFIED))),
        PeerVerdict::Drop(Spoofed),
        "probe"
    );
    let mismatched = eth(
        BROADCAST,
        GW1_MAC,
        ETHERTYPE_ARP,
        &arp(ARP_REQUEST, (L_MAC, GW1), ([0; 6], L)),
    );
    assert_eq!(
        sw.from_peer(t, 1, &mismatched),
        PeerVerdict::Drop(Spoofed),
        "sender MAC != source MAC"
    );
    assert_eq!(sw.stats().learned_macs, 0, "spoofed frames teach nothing");

    assert_eq!(
        sw.from_peer(t, 1, &request((GW1_MAC, HOST1))),
        PeerVerdict::Deliver,
        "host address"
    );
    assert_eq!(
        sw.stats().learned_ips,
        0,
        "only pod-subnet addresses are bound"
    );
    assert_eq!(
        sw.from_peer(t, 1, &request((GW1_MAC, GW1))),
        PeerVerdict::Deliver
    );
    assert_eq!(sw.stats().learned_ips, 1);
}

#[test]
fn derived_source_macs_must_encode_the_peers_subnet() {
    let (mut sw, t) = (switch(), Instant::now());
    assert_eq!(
        sw.from_peer(t, 1, &udp4(R2_MAC, L_MAC, R1, L)),
        PeerVerdict::Drop(Spoofed)
    );
    assert_eq!(
        sw.from_peer(t, 1, &udp4(pod_mac(L_OTHER), L_MAC, R1, L)),
        PeerVerdict::Drop(Spoofed),
        "a derived MAC of our subnet"
    );
    let arp_with_foreign_mac = arp_frame(BROADCAST, ARP_REQUEST, (R2_MAC, R1), ([0; 6], L));
    assert_eq!(
        sw.from_peer(t, 1, &arp_with_foreign_mac),
        PeerVerdict::Drop(Spoofed)
    );
    assert_eq!(sw.stats().learned_macs, 0);
    assert_eq!(
        sw.from_peer(t, 1, &udp4(R1_MAC, L_MAC, R1, L)),
        PeerVerdict::Deliver
    );
    // Whatever another pod of the subnet is called: the MAC is ours.
    assert_eq!(
        local(&mut sw, t, &udp4(L_MAC, R1_MAC, L, R1)),
        LocalVerdict::Unicast(1)
    );
}

#[test]
fn ipv6_pod_macs_are_derived_from_the_whole_address() {
    // The n-th pod of every node has the same low 32 bits: with those
    // alone their MACs collided across nodes.
    let a: Ipv6Addr = "fd00:10::2".parse().unwrap();
    let b: Ipv6Addr = "fd00:10:0:1::2".parse().unwrap();
    assert_ne!(v6_mac(a), v6_mac(b));
    let mut seen = std::collections::HashSet::new();
    for node in 0..64u16 {
        for host in 2..66u16 {
            let ip = Ipv6Addr::new(0xfd00, 0x10, 0, node, 0, 0, 0, host);
            let m = v6_mac(ip);
            assert!(seen.insert(m), "{ip} collides");
            assert_eq!(m[0], 0x0a, "locally administered unicast");
            assert_ne!(m[1], 0x58, "never the IPv4 form");
            assert_eq!(pod_mac_ipv4(&m), None);
        }
    }
    // A v6 peer's frame must carry the MAC of its own source address.
    let mut sw = Switch::new(SwitchConfig {
        local_subnet: net("fd00:10::/64"),
        ..cfg()
    });
    sw.set_peer(
        1,
        PeerAddrs {
            pod_subnet: net("fd00:10:0:1::/64"),
            host_addr: None,
            host_addr6: None,
            bridge_mac: None,
        },
    );
    let t = Instant::now();
    let other: Ipv6Addr = "fd00:10:0:1::3".parse().unwrap();
    let from = |m: Mac| ip6(m, L_MAC, b, a, IPPROTO_TCP, &[0; 20]);
    assert_eq!(
        sw.from_peer(t, 1, &from(v6_mac(other))),
        PeerVerdict::Drop(Spoofed),
        "another pod's MAC"
    );
    assert_eq!(
        sw.from_peer(t, 1, &from(v6_mac(a))),
        PeerVerdict::Drop(Spoofed),
        "our pod's MAC"
    );
    assert_eq!(
        sw.from_peer(t, 1, &from(pod_mac(Ipv4Addr::new(0, 0, 0, 2)))),
        PeerVerdict::Drop(Spoofed),
        "the old low-32-bit form"
    );
    assert_eq!(sw.from_peer(t, 1, &from(v6_mac(b))), PeerVerdict::Deliver);
    assert_eq!(
        sw.from_peer(t + Duration::from_secs(1), 1, &from(v6_mac(b))),
        PeerVerdict::Deliver,
        "again, from the learned entry"
    );
}

#[test]
fn peer_ipv6_sources_must_be_global_addresses_of_its_subnet() {
    let t = Instant::now();
    let mut sw = Switch::new(SwitchConfig {
        local_subnet: net("fd00:0:0:3::/64"),
        ..cfg()
    });
    sw.set_peer(
        7,
        PeerAddrs {
            pod_subnet: net("fd00:0:0:7::/64"),
            host_addr: None,
            host_addr6: None,
            bridge_mac: None,
        },
    );
    let from = |src: &str| {
        let src: Ipv6Addr = src.parse().unwrap();
        ip6(v6_mac(src), L_MAC, src, V6_LOCAL, IPPROTO_TCP, &[0; 20])
    };
    for src in ["fe80::1", "::", "fd00:0:0:8::2", "ff02::1", "::1"] {
        assert_eq!(
            sw.from_peer(t, 7, &from(src)),
            PeerVerdict::Drop(Spoofed),
            "{src}"
        );
    }
    assert_eq!(
        sw.from_peer(t, 7, &from("fd00:0:0:7::2")),
        PeerVerdict::Deliver
    );
    // A router advertisement from a peer is about its link only.
    let ra = ip6(
        mac(7),
        [0x33, 0x33, 0, 0, 0, 1],
        "fe80::1".parse().unwrap(),
        "ff02::1".parse().unwrap(),
        IPPROTO_ICMPV6,
        &icmp(134, 0, &[0; 12]),
    );
    assert_eq!(sw.from_peer(t, 7, &ra), PeerVerdict::Drop(LinkLocal));
}

#[test]
fn peer_checks_run_in_order() {
    let (mut sw, t) = (switch(), Instant::now());
    let good = udp4(R1_MAC, L_MAC, R1, L);
    assert_eq!(
        sw.from_peer(t, 1, &good[..13]),
        PeerVerdict::Drop(Malformed)
    );
    assert_eq!(
        sw.from_peer(t, 1, &udp4(BROADCAST, L_MAC, R1, L)),
        PeerVerdict::Drop(Malformed)
    );
    assert_eq!(
        sw.from_peer(t, 1, &eth(L_MAC, R1_MAC, ETHERTYPE_VLAN, &good[12..])),
        PeerVerdict::Drop(EtherType)
    );
    assert_eq!(
        sw.from_peer(
            t,
            1,
            &eth([0x01, 0x80, 0xc2, 0, 0, 0], R1_MAC, 0x0026, &[0; 40])
        ),
        PeerVerdict::Drop(LinkLocal)
    );
    assert_eq!(
        sw.from_peer(t, 1, &udp4(R1_MAC, [0x01, 0x80, 0xc2, 0, 0, 0x0e], R1, L)),
        PeerVerdict::Drop(LinkLocal)
    );
    assert_eq!(
        sw.from_peer(
            t,
            1,
            &eth(L_MAC, R1_MAC, ETHERTYPE_IPV4, &good[ETH_HLEN..30])
        ),
        PeerVerdict::Drop(Malformed)
    );
    // DHCP is dropped even from a source that would be spoofed.
    assert_eq!(
        sw.from_peer(t, 1, &udp4_ports(R1_MAC, L_MAC, NOWHERE, L, 67, 68)),
        PeerVerdict::Drop(Dhcp)
    );
    assert_eq!(sw.from_peer(t, 1, &good), PeerVerdict::Deliver);
}

#[test]
fn a_mac_owned_by_one_peer_cannot_be_taken_by_another_until_it_expires() {
    let (mut sw, t) = (switch(), Instant::now());
    let shared = mac(0x55);
    assert_eq!(
        sw.from_peer(t, 1, &udp4(shared, L_MAC, GW1, L)),
        PeerVerdict::Deliver
    );
    // Node 2's bridge claiming node 1's bridge MAC.
    let claim = udp4(shared, L_MAC, GW2, L);
    assert_eq!(
        sw.from_peer(t + Duration::from_secs(299), 2, &claim),
        PeerVerdict::Drop(Spoofed)
    );
    assert_eq!(
        local(&mut sw, t, &udp4(L_MAC, shared, L, NOWHERE)),
        LocalVerdict::Unicast(1)
    );
    let arp_claim = arp_frame(BROADCAST, ARP_REQUEST, (shared, GW2), ([0; 6], L));
    assert_eq!(
        sw.from_peer(t + Duration::from_secs(299), 2, &arp_claim),
        PeerVerdict::Drop(Spoofed)
    );

    let later = t + TTL;
    assert_eq!(sw.from_peer(later, 2, &arp_claim), PeerVerdict::Deliver);
    assert_eq!(
        local(&mut sw, later, &udp4(L_MAC, shared, L, NOWHERE)),
        LocalVerdict::Unicast(2)
    );
    assert_eq!(counts(&sw), (3, 1, 1));
    sw.check_invariants();
}

#[test]
fn at_the_bound_new_macs_are_dropped_not_evicted() {
    let (mut sw, t) = (switch(), Instant::now());
    let at = |s: u64| t + Duration::from_secs(s);
    let pod = |i: u8| Ipv4Addr::new(10, 244, 5, 10 + i);
    let from = |i: u8| udp4(pod_mac(pod(i)), L_MAC, pod(i), L);
    for i in 0..4 {
        assert_eq!(
            sw.from_peer(at(u64::from(i)), 1, &from(i)),
            PeerVerdict::Deliver
        );
    }
    // A fifth pod MAC: dropped, and nobody was evicted for it.
    assert_eq!(
        sw.from_peer(at(10), 1, &from(4)),
        PeerVerdict::Drop(MacLimit)
    );
    for i in 0..4 {
        assert_eq!(sw.from_peer(at(20), 1, &from(i)), PeerVerdict::Deliver);
    }
    // Its bridge still gets in, once.
    let gw = udp4(GW1_MAC, L_MAC, GW1, L);
    assert_eq!(sw.from_peer(at(20), 1, &gw), PeerVerdict::Deliver);
    assert_eq!(sw.stats().learned_macs, 5);
    // Another peer's quota is its own.
    assert_eq!(
        sw.from_peer(at(20), 2, &udp4(R2_MAC, L_MAC, R2, L)),
        PeerVerdict::Deliver
    );
    sw.check_invariants();
    let route = |sw: &mut Switch, m: Mac| local(sw, at(30), &udp4(L_MAC, m, L, NOWHERE));
    assert_eq!(route(&mut sw, GW1_MAC), LocalVerdict::Unicast(1));
    assert_eq!(route(&mut sw, R2_MAC), LocalVerdict::Unicast(2));
    // Scanning for room per frame would make a MAC flood cost CPU:
    // expired entries make room when the housekeeping timer runs.
    assert_eq!(
        sw.from_peer(at(20) + TTL, 1, &from(4)),
        PeerVerdict::Drop(MacLimit)
    );
    sw.expire(at(20) + TTL);
    assert_eq!(
        sw.from_peer(at(20) + TTL, 1, &from(4)),
        PeerVerdict::Deliver
    );
}

#[test]
fn learned_entries_expire() {
    let (mut sw, t) = (switch(), Instant::now());
    let gw_reply = arp_frame(L_MAC, ARP_REPLY, (GW1_MAC, GW1), (L_MAC, L));
    assert_eq!(sw.from_peer(t, 1, &gw_reply), PeerVerdict::Deliver);
    assert_eq!(
        sw.from_peer(t + Duration::from_secs(100), 2, &udp4(R2_MAC, L_MAC, R2, L)),
        PeerVerdict::Deliver
    );
    let to_gw = udp4(L_MAC, GW1_MAC, L, NOWHERE);
    assert_eq!(
        local(&mut sw, t + TTL - Duration::from_millis(1), &to_gw),
        LocalVerdict::Unicast(1)
    );
    assert_eq!(local(&mut sw, t + TTL, &to_gw), LocalVerdict::Flood);

    sw.expire(t + TTL - Duration::from_secs(1));
    assert_eq!(sw.stats().learned_macs, 2);
    sw.expire(t + TTL);
    assert_eq!(counts(&sw), (3, 1, 0));
    sw.check_invariants();
    sw.expire(t + TTL * 2);
    assert_eq!(sw.stats().learned_macs, 0);
}

#[test]
fn removing_a_peer_forgets_everything_it_taught() {
    let (mut sw, t) = (switch(), Instant::now());
    let gw_reply = arp_frame(L_MAC, ARP_REPLY, (GW1_MAC, GW1), (L_MAC, L));
    assert_eq!(sw.from_peer(t, 1, &gw_reply), PeerVerdict::Deliver);
    assert_eq!(
        sw.from_peer(t, 2, &udp4(R2_MAC, L_MAC, R2, L)),
        PeerVerdict::Deliver
    );
    sw.remove_peer(1);
    sw.remove_peer(1);
    assert_eq!(counts(&sw), (2, 1, 0));
    sw.check_invariants();
    assert_eq!(
        local(&mut sw, t, &udp4(L_MAC, GW1_MAC, L, NOWHERE)),
        LocalVerdict::Flood
    );
    assert_eq!(local(&mut sw, t, &who_has(R1)), LocalVerdict::Drop(NoRoute));
    assert_eq!(sw.from_peer(t, 1, &gw_reply), PeerVerdict::Drop(Spoofed));
    assert_eq!(
        sw.host_from_local(&ipv4(L, HOST1, IPPROTO_UDP, false, &[0; 8])),
        LocalVerdict::Drop(NoRoute)
    );
}

#[test]
fn a_new_subnet_for_a_peer_forgets_what_the_old_one_vouched_for() {
    let (mut sw, t) = (switch(), Instant::now());
    assert_eq!(
        sw.from_peer(t, 1, &udp4(GW1_MAC, L_MAC, GW1, L)),
        PeerVerdict::Deliver
    );
    let new_host = PeerAddrs {
        pod_subnet: net("10.244.5.0/24"),
        host_addr: Some("10.10.1.5".parse().unwrap()),
        host_addr6: None,
        bridge_mac: None,
    };
    sw.set_peer(1, new_host);
    assert_eq!(sw.stats().learned_macs, 1, "same subnet: kept");
    assert_eq!(
        sw.host_from_local(&ipv4(
            L,
            "10.10.1.5".parse().unwrap(),
            IPPROTO_UDP,
            false,
            &[]
        )),
        LocalVerdict::Unicast(1)
    );
    assert_eq!(
        sw.host_from_local(&ipv4(L, HOST1, IPPROTO_UDP, false, &[])),
        LocalVerdict::Drop(NoRoute)
    );

    // Not normalised on purpose: the switch truncates it.
    sw.set_peer(
        1,
        PeerAddrs {
            pod_subnet: net("10.244.8.1/24"),
            host_addr: None,
            host_addr6: None,
            bridge_mac: None,
        },
    );
    assert_eq!(sw.stats().learned_macs, 0);
    sw.check_invariants();
    assert_eq!(local(&mut sw, t, &who_has(R1)), LocalVerdict::Drop(NoRoute));
    assert_eq!(
        local(&mut sw, t, &who_has(Ipv4Addr::new(10, 244, 8, 1))),
        LocalVerdict::Unicast(1)
    );
}

#[test]
fn subnets_resolve_longest_prefix_first_and_duplicates_to_the_lowest_id() {
    let (mut sw, t) = (switch(), Instant::now());
    sw.set_peer(
        8,
        PeerAddrs {
            pod_subnet: net("10.244.5.128/25"),
            host_addr: None,
            host_addr6: None,
            bridge_mac: None,
        },
    );
    sw.set_peer(
        0,
        PeerAddrs {
            pod_subnet: net("10.244.6.0/24"),
            host_addr: None,
            host_addr6: None,
            bridge_mac: None,
        },
    );
    assert_eq!(
        local(
            &mut sw,
            t,
            &udp4(L_MAC, mac(9), L, Ipv4Addr::new(10, 244, 5, 200))
        ),
        LocalVerdict::Unicast(8)
    );
    assert_eq!(
        local(&mut sw, t, &udp4(L_MAC, mac(9), L, R1)),
        LocalVerdict::Unicast(1)
    );
    assert_eq!(
        local(&mut sw, t, &udp4(L_MAC, mac(9), L, R2)),
        LocalVerdict::Unicast(0)
    );
}

#[test]
fn host_overlay_routes_by_host_address_and_checks_sources() {
    let sw = switch();
    let to = |dst: &str| {
        ipv4(
            "10.10.0.3".parse().unwrap(),
            dst.parse().unwrap(),
            IPPROTO_TCP,
            true,
            &[0; 20],
        )
    };
    assert_eq!(
        sw.host_from_local(&to("10.10.0.5")),
        LocalVerdict::Unicast(1)
    );
    assert_eq!(
        sw.host_from_local(&to("10.10.0.6")),
        LocalVerdict::Unicast(2)
    );
    assert_eq!(
        sw.host_from_local(&to("10.10.0.99")),
        LocalVerdict::Drop(NoRoute)
    );
    // A remote pod through the host overlay (the host answering it from
    // its host address): to the node whose subnet holds it.
    assert_eq!(
        sw.host_from_local(&to("10.244.5.7")),
        LocalVerdict::Unicast(1),
        "a remote pod goes to its node"
    );
    assert_eq!(
        sw.host_from_local(&to("10.99.5.7")),
        LocalVerdict::Drop(NoRoute)
    );
    assert_eq!(
        sw.host_from_local(&ipv6(V6_LOCAL, V6_R7, IPPROTO_TCP, &[])),
        LocalVerdict::Unicast(7),
        "an IPv6 remote pod goes to its node too"
    );
    assert_eq!(
        sw.host_from_local(&[0x45, 0, 0]),
        LocalVerdict::Drop(Malformed)
    );
    assert_eq!(sw.host_from_local(&[]), LocalVerdict::Drop(Malformed));

    let from = |src: Ipv4Addr| {
        ipv4(
            src,
            "10.10.0.3".parse().unwrap(),
            IPPROTO_TCP,
            true,
            &[0; 20],
        )
    };
    assert_eq!(sw.host_from_peer(1, &from(HOST1)), PeerVerdict::Deliver);
    assert_eq!(sw.host_from_peer(1, &from(R1)), PeerVerdict::Deliver);
    assert_eq!(
        sw.host_from_peer(1, &from("10.10.0.6".parse().unwrap())),
        PeerVerdict::Drop(Spoofed)
    );
    assert_eq!(sw.host_from_peer(1, &from(L)), PeerVerdict::Drop(Spoofed));
    assert_eq!(
        sw.host_from_peer(3, &from(HOST1)),
        PeerVerdict::Drop(Spoofed)
    );
    assert_eq!(
        sw.host_from_peer(7, &ipv6(V6_R7, V6_LOCAL, IPPROTO_TCP, &[])),
        PeerVerdict::Drop(Transit),
        "not our subnet"
    );
    // For this host, or its pods (the host forwards to them: a Service
    // routed through the host overlay), and nowhere else.
    let to = |dst: Ipv4Addr| ipv4(HOST1, dst, IPPROTO_TCP, true, &[0; 20]);
    assert_eq!(sw.host_from_peer(1, &to(L)), PeerVerdict::Deliver);
    assert_eq!(sw.host_from_peer(1, &to(L_OTHER)), PeerVerdict::Deliver);
    for dst in [
        NOWHERE,
        R2,
        "10.10.0.6".parse().unwrap(),
        "192.168.1.1".parse().unwrap(),
    ] {
        assert_eq!(
            sw.host_from_peer(1, &to(dst)),
            PeerVerdict::Drop(Transit),
            "{dst}"
        );
    }
    assert_eq!(
        sw.host_from_peer(1, &[0x60; 39]),
        PeerVerdict::Drop(Malformed)
    );
}

/// Issue 25: a dual-stack host overlay. Packets to a peer's IPv6 host
/// address go to it; from it, an IPv6 host packet is delivered when its
/// source is that address (or in its pod subnet) and it is for our IPv6
/// host address, with the same checks as IPv4.
#[test]
fn host_overlay_routes_and_checks_ipv6_host_addresses() {
    let me6: Ipv6Addr = "fd00:10::3".parse().unwrap();
    let p1: Ipv6Addr = "fd00:10::5".parse().unwrap();
    let p2: Ipv6Addr = "fd00:10::6".parse().unwrap();
    let mut sw = Switch::new(SwitchConfig {
        host_addr6: Some(me6.into()),
        ..cfg()
    });
    for (id, subnet, v4, v6) in [
        (1, "10.244.5.0/24", HOST1, p1),
        (2, "10.244.6.0/24", "10.10.0.6".parse().unwrap(), p2),
    ] {
        sw.set_peer(
            id,
            PeerAddrs {
                pod_subnet: net(subnet),
                host_addr: Some(v4.into()),
                host_addr6: Some(v6.into()),
                bridge_mac: None,
            },
        );
        sw.reserve(id);
    }
    let pkt = |src: Ipv6Addr, dst: Ipv6Addr| ipv6(src, dst, IPPROTO_TCP, &[]);
    assert_eq!(sw.host_from_local(&pkt(me6, p1)), LocalVerdict::Unicast(1));
    assert_eq!(sw.host_from_local(&pkt(me6, p2)), LocalVerdict::Unicast(2));
    assert_eq!(
        sw.host_from_local(&pkt(me6, "fd00:10::99".parse().unwrap())),
        LocalVerdict::Drop(NoRoute)
    );
    // IPv4 as before.
    let v4 = ipv4(
        "10.10.0.3".parse().unwrap(),
        HOST1,
        IPPROTO_TCP,
        true,
        &[0; 20],
    );
    assert_eq!(sw.host_from_local(&v4), LocalVerdict::Unicast(1));
    assert_eq!(sw.host_from_peer(1, &pkt(p1, me6)), PeerVerdict::Deliver);
    assert_eq!(sw.host_from_peer(2, &pkt(p2, me6)), PeerVerdict::Deliver);
    // Another peer's address, or one of nobody's: spoofed.
    assert_eq!(
        sw.host_from_peer(1, &pkt(p2, me6)),
        PeerVerdict::Drop(Spoofed)
    );
    assert_eq!(
        sw.host_from_peer(1, &pkt("fd00:10::77".parse().unwrap(), me6)),
        PeerVerdict::Drop(Spoofed)
    );
    // Not for us: transit.
    assert_eq!(
        sw.host_from_peer(1, &pkt(p1, p2)),
        PeerVerdict::Drop(Transit)
    );
    // Without an IPv6 host address of our own, nothing IPv6 is for us.
    let mut v4_only = Switch::new(cfg());
    v4_only.set_peer(
        1,
        PeerAddrs {
            pod_subnet: net("10.244.5.0/24"),
            host_addr: Some(HOST1.into()),
            host_addr6: Some(p1.into()),
            bridge_mac: None,
        },
    );
    assert_eq!(
        v4_only.host_from_peer(1, &pkt(p1, me6)),
        PeerVerdict::Drop(Transit)
    );
}

#[test]
fn the_data_path_does_not_allocate() {
    let mut sw = switch();
    let t = Instant::now();
    let pod = |i: u8| Ipv4Addr::new(10, 244, 5, 100 + i);
    let frames_in: Vec<(PeerId, Vec<u8>)> = (0..64u8)
        .map(|i| (1, udp4(pod_mac(pod(i)), L_MAC, pod(i), L)))
        .chain([
            (1, arp_frame(L_MAC, ARP_REPLY, (GW1_MAC, GW1), (L_MAC, L))),
            (2, udp4(R2_MAC, L_MAC, R2, L)),
        ])
        .chain([
            (
                7,
                ip6(v6_mac(V6_R7), L_MAC, V6_R7, V6_LOCAL, IPPROTO_TCP, &[0; 20]),
            ),
            (2, udp4(R1_MAC, L_MAC, R1, L)),
            (1, udp4(L_BRIDGE, L_MAC, R1, L)),
            (1, udp4(GW1_MAC, BROADCAST, GW1, Ipv4Addr::BROADCAST)),
            (1, udp4(R1_MAC, L_MAC, R1, NOWHERE)),
        ])
        .chain((0..64u8).map(|i| (1, udp4(pod_mac(pod(i)), L_MAC, pod(i), L))))
        .collect();
    let frames_out = [
        who_has(R1),
        who_has(GW1),
        udp4(L_MAC, BROADCAST, L, Ipv4Addr::BROADCAST),
        udp4(L_MAC, mac(3), L, NOWHERE),
        tcp4(true, 1500),
        ip6(L_MAC, mac(7), V6_LOCAL, V6_R7, IPPROTO_TCP, &[0; 1400]),
        solicit(V6_LOCAL, V6_R7),
        udp4(mac(0x44), BROADCAST, L, Ipv4Addr::BROADCAST),
    ];
    let mut out = [0u8; 1600];
    let before = allocations();
    for round in 0..50u64 {
        let now = t + Duration::from_secs(round * 10);
        for (peer, frame) in &frames_in {
            let _ = sw.from_peer(now, *peer, frame);
        }
        for frame in &frames_out {
            let _ = sw.from_local(now, frame, false, &mut out);
        }
        sw.expire(now);
    }
    assert_eq!(allocations() - before, 0);
    sw.check_invariants();
}

/// A peer's learning is reserved when the engine says it has a session,
/// for as many MACs as its subnet has addresses (and its bridge): every
/// pod of a /28 and its bridge are learned without allocating, though the
/// bound is far larger; a peer never reserved holds no list.
#[test]
fn learning_is_reserved_with_the_session_for_the_peers_subnet() {
    let mut sw = Switch::new(SwitchConfig {
        max_macs_per_peer: 1024,
        ..cfg()
    });
    let small = PeerAddrs {
        pod_subnet: net("10.244.5.0/28"),
        host_addr: None,
        host_addr6: None,
        bridge_mac: None,
    };
    sw.set_peer(1, small);
    sw.set_peer(
        2,
        PeerAddrs {
            pod_subnet: net("10.244.6.0/24"),
            ..small
        },
    );
    assert_eq!(sw.peers[&1].learned.capacity(), 0, "no session, no list");
    sw.reserve(1);
    assert_eq!(sw.peers[&1].learned.capacity(), 17);
    assert_eq!(sw.peers[&2].learned.capacity(), 0);
    let t = Instant::now();
    let pod = |i: u8| Ipv4Addr::new(10, 244, 5, i);
    let frames: Vec<Vec<u8>> = (0..16u8)
        .filter(|&i| i != 1)
        .map(|i| udp4(pod_mac(pod(i)), L_MAC, pod(i), L))
        .chain([arp_frame(L_MAC, ARP_REPLY, (GW1_MAC, GW1), (L_MAC, L))])
        .collect();
    let before = allocations();
    for f in &frames {
        assert_eq!(sw.from_peer(t, 1, f), PeerVerdict::Deliver);
    }
    assert_eq!(allocations() - before, 0);
    assert_eq!(counts(&sw).1, 16, "15 pods and the bridge");
    sw.check_invariants();
}

/// Churn at full tables (entries expiring, new ones taking their place)
/// leaves tombstones in the hash tables; the reservation must absorb
/// their clean-up without reallocating.
#[test]
fn learning_churn_at_the_bound_does_not_allocate() {
    let mut sw = Switch::new(SwitchConfig {
        max_macs_per_peer: 200,
        ..cfg()
    });
    for (id, third) in [(1, 5), (2, 6), (3, 7)] {
        let subnet = IpNet::new(Ipv4Addr::new(10, 244, third, 0).into(), 24).unwrap();
        sw.set_peer(
            id,
            PeerAddrs {
                pod_subnet: subnet,
                host_addr: None,
                host_addr6: None,
                bridge_mac: None,
            },
        );
        sw.reserve(id);
    }
    let frames: Vec<(PeerId, Vec<u8>)> = (0..3000u16)
        .map(|i| {
            let peer = PeerId::from(1 + i % 3);
            let src = Ipv4Addr::new(10, 244, 4 + peer as u8, 2 + (i % 250) as u8);
            let sender = (pod_mac(src), src);
            (peer, arp_frame(BROADCAST, ARP_REQUEST, sender, ([0; 6], L)))
        })
        .collect();
    let local_frames: Vec<Vec<u8>> = (0..3000u16)
        .map(|i| {
            let [hi, lo] = i.to_be_bytes();
            udp4([0x06, 0, 0, 0, hi, lo], BROADCAST, L, Ipv4Addr::BROADCAST)
        })
        .collect();
    let t = Instant::now();
    let mut out = [0u8; 1600];
    let before = allocations();
    for round in 0..4u64 {
        let start = t + TTL * round as u32;
        for (i, (peer, frame)) in frames.iter().enumerate() {
            let now = start + Duration::from_millis(i as u64);
            let _ = sw.from_peer(now, *peer, frame);
            let _ = sw.from_local(now, &local_frames[i], false, &mut out);
        }
        sw.expire(start + TTL);
    }
    assert_eq!(allocations() - before, 0);
    sw.check_invariants();
}

fn interesting_mac() -> impl Strategy<Value = Mac> {
    prop_oneof![
        Just(BROADCAST),
        Just(L_MAC),
        Just(R1_MAC),
        Just(R2_MAC),
        Just(GW1_MAC),
        Just(L_BRIDGE),
        Just(v6_mac(V6_R7)),
        Just([0x33, 0x33, 0xff, 0, 0, 2]),
        Just([0x01, 0x80, 0xc2, 0, 0, 0]),
        (0u8..8).prop_map(mac),
        any::<[u8; 6]>(),
    ]
}

fn valid_frames() -> Vec<Vec<u8>> {
    vec![
        who_has(R1),
        who_has(GW1),
        arp_frame(L_MAC, ARP_REPLY, (GW1_MAC, GW1), (L_MAC, L)),
        arp_frame(BROADCAST, ARP_REQUEST, (R1_MAC, R1), ([0; 6], L)),
        udp4(L_MAC, R1_MAC, L, R1),
        udp4(R1_MAC, L_MAC, R1, L),
        udp4_ports(L_MAC, BROADCAST, L, Ipv4Addr::BROADCAST, 68, 67),
        tcp4(true, 1500),
        eth(
            R1_MAC,
            L_MAC,
            ETHERTYPE_IPV4,
            &ipv4(L, R1, IPPROTO_ICMP, true, &icmp(8, 0, &[0; 1400])),
        ),
        solicit(V6_LOCAL, V6_R7),
        ip6(mac(7), L_MAC, V6_R7, V6_LOCAL, IPPROTO_TCP, &[0; 1400]),
        nd(
            ICMPV6_NEIGHBOR_ADVERT,
            v6_mac(V6_R7),
            L_MAC,
            V6_R7,
            V6_LOCAL,
            V6_R7,
            Some((2, v6_mac(V6_R7))),
        ),
        nd(
            ICMPV6_NEIGHBOR_SOLICIT,
            v6_mac(V6_R7),
            [0x33, 0x33, 0xff, 0, 0, 2],
            V6_R7,
            "ff02::1:ff00:2".parse().unwrap(),
            V6_LOCAL,
            Some((1, v6_mac(V6_R7))),
        ),
    ]
}

fn any_frame() -> impl Strategy<Value = Vec<u8>> {
    let ethertype = prop_oneof![
        Just(ETHERTYPE_IPV4),
        Just(ETHERTYPE_ARP),
        Just(ETHERTYPE_IPV6),
        Just(ETHERTYPE_VLAN),
        any::<u16>()
    ];
    let n = valid_frames().len();
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..64),
        (
            interesting_mac(),
            interesting_mac(),
            ethertype,
            proptest::collection::vec(any::<u8>(), 0..1500)
        )
            .prop_map(|(dst, src, ty, payload)| eth(dst, src, ty, &payload)),
        (
            0..n,
            proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
            any::<prop::sample::Index>()
        )
            .prop_map(|(i, edits, cut)| {
                let mut f = valid_frames().swap_remove(i);
                for (at, byte) in edits {
                    let at = at.index(f.len());
                    f[at] = byte;
                }
                f.truncate(cut.index(f.len() + 1));
                f
            }),
    ]
}

#[derive(Debug, Clone)]
enum Op {
    Local {
        frame: Vec<u8>,
        gso: bool,
        out_len: usize,
    },
    Peer {
        peer: PeerId,
        frame: Vec<u8>,
    },
    HostLocal(Vec<u8>),
    HostPeer {
        peer: PeerId,
        packet: Vec<u8>,
    },
    Expire,
    SetPeer(PeerId, u8),
    RemovePeer(PeerId),
}

fn any_op() -> impl Strategy<Value = Op> {
    let peer = prop_oneof![Just(1u32), Just(2), Just(7), Just(42)];
    prop_oneof![
        4 => (any_frame(), any::<bool>(), prop_oneof![Just(1600usize), 0..100usize])
            .prop_map(|(frame, gso, out_len)| Op::Local { frame, gso, out_len }),
        4 => (peer.clone(), any_frame()).prop_map(|(peer, frame)| Op::Peer { peer, frame }),
        1 => any_frame().prop_map(|f| Op::HostLocal(f.get(14..).unwrap_or_default().to_vec())),
        1 => (peer.clone(), any_frame()).prop_map(|(peer, f)| Op::HostPeer { peer, packet: f.get(14..).unwrap_or_default().to_vec() }),
        1 => Just(Op::Expire),
        1 => (peer.clone(), any::<u8>()).prop_map(|(p, third)| Op::SetPeer(p, third)),
        1 => peer.prop_map(Op::RemovePeer),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Random and mangled frames through every entry point, interleaved
    /// with peer changes and time passing: no panic, replies fit `out`
    /// and parse, the tables stay consistent and bounded.
    #[test]
    fn no_input_panics_or_breaks_the_tables(ops in proptest::collection::vec((any_op(), 0u64..200_000), 1..40)) {
        let mut sw = switch();
        let mut now = Instant::now();
        let mut out = vec![0u8; 1600];
        for (op, step_ms) in ops {
            now += Duration::from_millis(step_ms);
            match op {
                Op::Local { frame, gso, out_len } => {
                    let out = &mut out[..out_len];
                    if let LocalVerdict::Reply(n) = sw.from_local(now, &frame, gso, out) {
                        prop_assert!(n <= out.len());
                        prop_assert!(Ethernet::parse(&out[..n]).is_some());
                    }
                }
                Op::Peer { peer, frame } => {
                    let _ = sw.from_peer(now, peer, &frame);
                }
                Op::HostLocal(packet) => {
                    let _ = sw.host_from_local(&packet);
                }
                Op::HostPeer { peer, packet } => {
                    let _ = sw.host_from_peer(peer, &packet);
                }
                Op::Expire => sw.expire(now),
                Op::SetPeer(peer, third) => sw.set_peer(peer, PeerAddrs {
                    pod_subnet: IpNet::new(Ipv4Addr::new(10, 244, third, 0).into(), 24).unwrap(),
                    host_addr: None,
                    host_addr6: None,
                    bridge_mac: None,
                }),
                Op::RemovePeer(peer) => sw.remove_peer(peer),
            }
            sw.check_invariants();
            let stats = sw.stats();
            prop_assert!(stats.learned_macs <= stats.peers * cfg().max_macs_per_peer);
            prop_assert!(stats.learned_ips <= stats.learned_macs);
        }
    }
}

/// A neighbour solicitation or advertisement with one link-layer
/// option `(type, address)`, checksum left zero (nothing checks it).
fn nd(
    ty: u8,
    src_mac: Mac,
    dst_mac: Mac,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    target: Ipv6Addr,
    option: Option<(u8, Mac)>,
) -> Vec<u8> {
    let mut body = vec![
        if ty == ICMPV6_NEIGHBOR_ADVERT {
            0x20
        } else {
            0
        },
        0,
        0,
        0,
    ];
    body.extend_from_slice(&target.octets());
    if let Some((kind, m)) = option {
        body.extend_from_slice(&[kind, 1]);
        body.extend_from_slice(&m);
    }
    ip6(
        src_mac,
        dst_mac,
        src,
        dst,
        IPPROTO_ICMPV6,
        &icmp(ty, 0, &body),
    )
}

/// Node 0 of `fd00:10::/48` is us; node 1 a peer.
fn switch6() -> (Switch, Ipv6Addr, Ipv6Addr, Ipv6Addr, Ipv6Addr) {
    let mut sw = Switch::new(SwitchConfig {
        local_subnet: net("fd00:10::/64"),
        ..cfg()
    });
    sw.set_peer(
        1,
        PeerAddrs {
            pod_subnet: net("fd00:10:0:1::/64"),
            host_addr: Some(HOST1.into()),
            host_addr6: None,
            bridge_mac: None,
        },
    );
    let ours: Ipv6Addr = "fd00:10::2".parse().unwrap();
    let our_gw: Ipv6Addr = "fd00:10::1".parse().unwrap();
    let theirs: Ipv6Addr = "fd00:10:0:1::3".parse().unwrap();
    let their_gw: Ipv6Addr = "fd00:10:0:1::1".parse().unwrap();
    (sw, ours, our_gw, theirs, their_gw)
}

#[test]
fn a_peer_never_sources_our_bridge_or_a_local_mac() {
    let (mut sw, t) = (switch(), Instant::now());
    // What a pod of node 1 does after ARPing for our gateway: frames
    // from our bridge's MAC, with its own (valid) address.
    let takeover = udp4(L_BRIDGE, L_MAC, R1, L);
    assert_eq!(sw.from_peer(t, 1, &takeover), PeerVerdict::Drop(Spoofed));
    let as_gateway = arp_frame(BROADCAST, ARP_REQUEST, (L_BRIDGE, GW1), ([0; 6], L));
    assert_eq!(sw.from_peer(t, 1, &as_gateway), PeerVerdict::Drop(Spoofed));
    // Any MAC seen on the local side, even one not of the derived form
    // and even from a frame the switch then dropped.
    let odd = mac(0x66);
    let _ = local(
        &mut sw,
        t,
        &udp4_ports(odd, BROADCAST, L, Ipv4Addr::BROADCAST, 68, 67),
    );
    assert_eq!(sw.stats().local_macs, 1);
    assert_eq!(
        sw.from_peer(t, 1, &udp4(odd, L_MAC, GW1, L)),
        PeerVerdict::Drop(Spoofed),
        "a local MAC as the peer's bridge"
    );
    // A MAC a peer taught before it showed up here is the local one's.
    let moved = mac(0x67);
    assert_eq!(
        sw.from_peer(t, 2, &udp4(moved, L_MAC, GW2, L)),
        PeerVerdict::Deliver
    );
    assert_eq!(
        local(&mut sw, t, &udp4(moved, R1_MAC, L, R1)),
        LocalVerdict::Unicast(1)
    );
    assert_eq!(
        sw.from_peer(t, 2, &udp4(moved, L_MAC, GW2, L)),
        PeerVerdict::Drop(Spoofed)
    );
    sw.check_invariants();
    // Local MACs expire like learned ones.
    sw.expire(t + TTL);
    assert_eq!(sw.stats().local_macs, 0);
}

#[test]
fn a_peer_may_source_one_other_mac_its_bridge_pinned_when_it_speaks_for_itself() {
    let (mut sw, t) = (switch(), Instant::now());
    // A pod with a MAC of its own making.
    assert_eq!(
        sw.from_peer(t, 1, &udp4(mac(1), L_MAC, R1, L)),
        PeerVerdict::Drop(Spoofed)
    );
    // The bridge pins itself: its ARP for the gateway, or its host
    // speaking (a Service's reply from the peer's host address).
    assert_eq!(
        sw.from_peer(t, 1, &udp4(GW1_MAC, L_MAC, HOST1, L)),
        PeerVerdict::Deliver
    );
    // Pinned: it may route for the subnet's addresses now ...
    assert_eq!(
        sw.from_peer(t, 1, &udp4(GW1_MAC, L_MAC, R1, L)),
        PeerVerdict::Deliver
    );
    // ... and no second MAC speaks for the gateway.
    let second = arp_frame(BROADCAST, ARP_REQUEST, (mac(2), GW1), ([0; 6], L));
    assert_eq!(sw.from_peer(t, 1, &second), PeerVerdict::Drop(Spoofed));
    assert_eq!(
        sw.from_peer(t, 1, &udp4(mac(2), L_MAC, HOST1, L)),
        PeerVerdict::Drop(Spoofed)
    );
    // The pin lives while the bridge is heard; after that a recreated
    // bridge can pin itself again.
    let later = t + TTL;
    assert_eq!(sw.from_peer(later, 1, &second), PeerVerdict::Deliver);
    assert_eq!(
        sw.from_peer(later, 1, &udp4(GW1_MAC, L_MAC, GW1, L)),
        PeerVerdict::Drop(Spoofed)
    );
    sw.check_invariants();
}

#[test]
fn a_peers_bridge_named_by_its_record_may_route_for_its_pods_at_once() {
    let (mut sw, t) = (switch(), Instant::now());
    // What a Service's DNAT on node 1 sends us: its bridge's MAC, a pod
    // of its as the source. An older agent's record names no bridge:
    // its bridge has not spoken for itself yet, so this is refused ...
    let routed = udp4(GW1_MAC, L_MAC, R1, L);
    assert_eq!(sw.from_peer(t, 1, &routed), PeerVerdict::Drop(Spoofed));
    // ... and accepted at once when the record says whose MAC it is.
    let with_bridge = PeerAddrs {
        pod_subnet: net("10.244.5.0/24"),
        host_addr: Some(HOST1.into()),
        host_addr6: None,
        bridge_mac: Some(GW1_MAC),
    };
    sw.set_peer(1, with_bridge);
    assert_eq!(sw.from_peer(t, 1, &routed), PeerVerdict::Deliver);
    // The record's word is the only other MAC: nothing pins another,
    // speaking for the gateway or not.
    let impostor = arp_frame(BROADCAST, ARP_REQUEST, (mac(3), GW1), ([0; 6], L));
    assert_eq!(sw.from_peer(t, 1, &impostor), PeerVerdict::Drop(Spoofed));
    // A record naming our bridge, or another peer's live MAC, gets
    // nowhere with it.
    let liar = udp4(L_BRIDGE, L_MAC, GW2, L);
    sw.set_peer(
        2,
        PeerAddrs {
            pod_subnet: net("10.244.6.0/24"),
            host_addr: None,
            host_addr6: None,
            bridge_mac: Some(L_BRIDGE),
        },
    );
    assert_eq!(sw.from_peer(t, 2, &liar), PeerVerdict::Drop(Spoofed));
    sw.set_peer(
        2,
        PeerAddrs {
            pod_subnet: net("10.244.6.0/24"),
            host_addr: None,
            host_addr6: None,
            bridge_mac: Some(GW1_MAC),
        },
    );
    assert_eq!(
        sw.from_peer(t, 2, &udp4(GW1_MAC, L_MAC, GW2, L)),
        PeerVerdict::Drop(Spoofed),
        "node 1's bridge MAC is alive at node 1"
    );
    sw.check_invariants();
}

#[test]
fn neighbour_advertisements_speak_only_for_the_senders_own_addresses() {
    let (mut sw, ours, our_gw, theirs, their_gw) = switch6();
    let t = Instant::now();
    let pod = v6_mac(theirs);
    let na = |target: Ipv6Addr, option: Option<(u8, Mac)>| {
        nd(
            ICMPV6_NEIGHBOR_ADVERT,
            pod,
            v6_mac(ours),
            theirs,
            ours,
            target,
            option,
        )
    };
    // The attack: our gateway is at the attacker's MAC.
    assert_eq!(
        sw.from_peer(t, 1, &na(our_gw, Some((2, pod)))),
        PeerVerdict::Drop(Spoofed)
    );
    assert_eq!(
        sw.from_peer(t, 1, &na(ours, Some((2, pod)))),
        PeerVerdict::Drop(Spoofed)
    );
    let elsewhere: Ipv6Addr = "fd00:10:0:2::5".parse().unwrap();
    assert_eq!(
        sw.from_peer(t, 1, &na(elsewhere, Some((2, pod)))),
        PeerVerdict::Drop(Spoofed)
    );
    // Its own address, at another MAC (a neighbour of its own node).
    assert_eq!(
        sw.from_peer(t, 1, &na(theirs, Some((2, v6_mac(their_gw))))),
        PeerVerdict::Drop(Spoofed)
    );
    assert_eq!(
        sw.from_peer(t, 1, &na(theirs, Some((2, pod)))),
        PeerVerdict::Deliver
    );
    assert_eq!(sw.from_peer(t, 1, &na(theirs, None)), PeerVerdict::Deliver);
    // Behind a hop-by-hop header it is still looked at.
    let mut hidden = na(our_gw, Some((2, pod)));
    let at = ETH_HLEN + 40;
    hidden[ETH_HLEN + 6] = 0;
    hidden.splice(at..at, [IPPROTO_ICMPV6, 0, 1, 4, 0, 0, 0, 0]);
    let len = u16::from_be_bytes([hidden[ETH_HLEN + 4], hidden[ETH_HLEN + 5]]) + 8;
    hidden[ETH_HLEN + 4..ETH_HLEN + 6].copy_from_slice(&len.to_be_bytes());
    assert_eq!(sw.from_peer(t, 1, &hidden), PeerVerdict::Drop(Spoofed));
    // Solicitations: the source link-layer option is the sender's, and
    // the target ours.
    let group: Ipv6Addr = "ff02::1:ff00:2".parse().unwrap();
    let group_mac = [0x33, 0x33, 0xff, 0, 0, 2];
    let ns = |target: Ipv6Addr, ll: Mac| {
        nd(
            ICMPV6_NEIGHBOR_SOLICIT,
            pod,
            group_mac,
            theirs,
            group,
            target,
            Some((1, ll)),
        )
    };
    assert_eq!(
        sw.from_peer(t, 1, &ns(ours, v6_mac(their_gw))),
        PeerVerdict::Drop(Spoofed)
    );
    assert_eq!(
        sw.from_peer(t, 1, &ns(elsewhere, pod)),
        PeerVerdict::Drop(Transit)
    );
    assert_eq!(sw.from_peer(t, 1, &ns(ours, pod)), PeerVerdict::Deliver);
    // Two link-layer options, or one of length 0: invalid.
    let mut twice = na(theirs, Some((2, pod)));
    twice.extend_from_slice(&[2, 1, 1, 2, 3, 4, 5, 6]);
    let len = u16::from_be_bytes([twice[ETH_HLEN + 4], twice[ETH_HLEN + 5]]) + 8;
    twice[ETH_HLEN + 4..ETH_HLEN + 6].copy_from_slice(&len.to_be_bytes());
    assert_eq!(sw.from_peer(t, 1, &twice), PeerVerdict::Drop(Malformed));
    // Router discovery and redirects never cross, whatever the source.
    for ty in [ICMPV6_ROUTER_SOLICIT, ICMPV6_ROUTER_ADVERT, ICMPV6_REDIRECT] {
        let m = ip6(
            pod,
            v6_mac(ours),
            theirs,
            ours,
            IPPROTO_ICMPV6,
            &icmp(ty, 0, &[0; 40]),
        );
        assert_eq!(
            sw.from_peer(t, 1, &m),
            PeerVerdict::Drop(LinkLocal),
            "type {ty}"
        );
    }
    // The peer's bridge advertises its gateway: that pins it.
    let bridge = mac(0x77);
    let gw_na = nd(
        ICMPV6_NEIGHBOR_ADVERT,
        bridge,
        v6_mac(ours),
        their_gw,
        ours,
        their_gw,
        Some((2, bridge)),
    );
    assert_eq!(sw.from_peer(t, 1, &gw_na), PeerVerdict::Deliver);
    sw.check_invariants();
}

#[test]
fn frames_from_peers_must_be_for_this_node() {
    let (mut sw, t) = (switch(), Instant::now());
    // The attack: our gateway's MAC, any destination address: this node
    // would route it into its LAN or the internet.
    for dst in [NOWHERE, R2, HOST_LOCAL, "192.168.1.1".parse().unwrap()] {
        assert_eq!(
            sw.from_peer(t, 1, &udp4(R1_MAC, L_BRIDGE, R1, dst)),
            PeerVerdict::Drop(Transit),
            "{dst}"
        );
    }
    assert_eq!(
        sw.from_peer(t, 1, &udp4(R1_MAC, L_BRIDGE, R1, L)),
        PeerVerdict::Deliver
    );
    assert_eq!(
        sw.from_peer(
            t,
            1,
            &udp4(R1_MAC, L_BRIDGE, R1, Ipv4Addr::new(10, 244, 3, 1))
        ),
        PeerVerdict::Deliver,
        "our gateway"
    );
    // Groups are nobody's to route on.
    for (dst_mac, dst) in [
        (BROADCAST, Ipv4Addr::BROADCAST),
        (BROADCAST, Ipv4Addr::new(10, 244, 255, 255)),
        ([0x01, 0, 0x5e, 0, 0, 0xfb], Ipv4Addr::new(224, 0, 0, 251)),
        (L_MAC, Ipv4Addr::new(224, 0, 0, 251)),
    ] {
        assert_eq!(
            sw.from_peer(t, 1, &udp4(R1_MAC, dst_mac, R1, dst)),
            PeerVerdict::Deliver,
            "{dst}"
        );
    }
    // ARP for someone else's address.
    let arp = |target| arp_frame(BROADCAST, ARP_REQUEST, (R1_MAC, R1), ([0; 6], target));
    let t = t + Duration::from_secs(1);
    assert_eq!(sw.from_peer(t, 1, &arp(R2)), PeerVerdict::Drop(Transit));
    assert_eq!(sw.from_peer(t, 1, &arp(L)), PeerVerdict::Deliver);
    // IPv6: ours, link-local (an answer to our link-local source) and
    // multicast only.
    let (mut sw6, ours, _, theirs, _) = switch6();
    let to = |dst: &str| {
        ip6(
            v6_mac(theirs),
            L_BRIDGE,
            theirs,
            dst.parse().unwrap(),
            IPPROTO_UDP,
            &udp(1, 2, &[0; 8]),
        )
    };
    for dst in ["2001:db8::1", "fd00:10:0:2::2", "fd00:10:0:1::9"] {
        assert_eq!(
            sw6.from_peer(t, 1, &to(dst)),
            PeerVerdict::Drop(Transit),
            "{dst}"
        );
    }
    for dst in ["fd00:10::2", "fe80::1", "ff02::1"] {
        assert_eq!(sw6.from_peer(t, 1, &to(dst)), PeerVerdict::Deliver, "{dst}");
    }
    let _ = ours;
}

#[test]
fn frames_from_peers_over_the_mtu_are_dropped() {
    let (mut sw, t) = (switch(), Instant::now());
    let fits = eth(
        L_MAC,
        R1_MAC,
        ETHERTYPE_IPV4,
        &ipv4(R1, L, IPPROTO_TCP, true, &[0; 1360]),
    );
    assert_eq!(sw.from_peer(t, 1, &fits), PeerVerdict::Deliver);
    let over = eth(
        L_MAC,
        R1_MAC,
        ETHERTYPE_IPV4,
        &ipv4(R1, L, IPPROTO_TCP, true, &[0; 1361]),
    );
    assert_eq!(sw.from_peer(t, 1, &over), PeerVerdict::Drop(TooBig));
    let mut padded = fits.clone();
    padded.push(0);
    assert_eq!(
        sw.from_peer(t, 1, &padded),
        PeerVerdict::Drop(TooBig),
        "padding counts"
    );
}

#[test]
fn peer_broadcasts_are_rate_limited_on_receipt() {
    let (mut sw, t) = (switch(), Instant::now());
    let b = udp4(R1_MAC, BROADCAST, R1, Ipv4Addr::BROADCAST);
    for _ in 0..3 {
        assert_eq!(sw.from_peer(t, 1, &b), PeerVerdict::Deliver);
    }
    assert_eq!(sw.from_peer(t, 1, &b), PeerVerdict::Drop(RateLimited));
    // Unicast is not limited, nor another peer's broadcasts.
    assert_eq!(
        sw.from_peer(t, 1, &udp4(R1_MAC, L_MAC, R1, L)),
        PeerVerdict::Deliver
    );
    let b2 = udp4(R2_MAC, BROADCAST, R2, Ipv4Addr::BROADCAST);
    assert_eq!(sw.from_peer(t, 2, &b2), PeerVerdict::Deliver);
    assert_eq!(
        sw.from_peer(t + Duration::from_millis(100), 1, &b),
        PeerVerdict::Deliver
    );
}

/// A peer's frame for the property test: its source MAC and addresses
/// picked from pools that mix the legitimate with everything it must
/// not claim.
fn peer_frame() -> impl Strategy<Value = (PeerId, Vec<u8>)> {
    let peer = prop_oneof![Just(1u32), Just(2)];
    let ip = prop_oneof![
        Just(R1),
        Just(GW1),
        Just(HOST1),
        Just(R2),
        Just(GW2),
        Just(L),
        Just(Ipv4Addr::new(10, 244, 3, 1)),
        Just(NOWHERE),
        Just("10.10.0.6".parse().unwrap()),
        (0u8..=255).prop_map(|h| Ipv4Addr::new(10, 244, 5, h)),
    ];
    let mac = prop_oneof![
        Just(L_MAC),
        Just(L_BRIDGE),
        Just(R1_MAC),
        Just(R2_MAC),
        Just(GW1_MAC),
        Just(mac(0x42)),
        Just(pod_mac(L_OTHER)),
        Just(mac(0x66)),
        ip.clone().prop_map(pod_mac),
    ];
    (peer, mac, ip.clone(), ip, 0u8..3).prop_map(|(p, m, src, dst, kind)| {
        let f = match kind {
            0 => udp4(m, L_MAC, src, dst),
            1 => arp_frame(BROADCAST, ARP_REQUEST, (m, src), ([0; 6], dst)),
            _ => arp_frame(L_MAC, ARP_REPLY, (m, src), (L_MAC, dst)),
        };
        (p, f)
    })
}

fn owns(sw: &Switch, peer: PeerId, ip: Ipv4Addr) -> bool {
    let p = &sw.peers[&peer];
    let ip = IpAddr::V4(ip);
    (p.addrs.pod_subnet.contains(&ip) && !sw.is_local(ip)) || p.addrs.is_host(ip)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Whatever a peer sends, interleaved with the local side's frames:
    /// what is delivered never carries a local MAC, a MAC alive at
    /// another peer or an address that is not the sender's, is for this
    /// node, and each peer keeps at most one MAC not of its pods.
    #[test]
    fn no_peer_sources_a_local_mac_or_another_peers_addresses(
        ops in proptest::collection::vec((peer_frame(), any::<bool>(), 0u64..20_000), 1..60)
    ) {
        let mut sw = switch();
        let mut now = Instant::now();
        let teach = [mac(0x66), L_MAC];
        for (i, ((peer, frame), also_local, step_ms)) in ops.into_iter().enumerate() {
            now += Duration::from_millis(step_ms);
            if also_local {
                let m = teach[i % 2];
                let _ = local(&mut sw, now, &udp4(m, BROADCAST, L, Ipv4Addr::BROADCAST));
            }
            let owner_before = sw.mac_owner(now, &frame[6..12].try_into().unwrap());
            if sw.from_peer(now, peer, &frame) != PeerVerdict::Deliver {
                continue;
            }
            let e = Ethernet::parse(&frame).unwrap();
            prop_assert!(!sw.local.contains_key(&e.src) && e.src != L_BRIDGE);
            prop_assert!(owner_before.is_none_or(|o| o == peer), "taken from {owner_before:?}");
            prop_assert_eq!(sw.mac_owner(now, &e.src), Some(peer));
            let (src, dst) = match L3::parse(&e).unwrap() {
                L3::Arp(a) => (a.sender_ip, a.target_ip),
                L3::Ip(Ip::V4(ip)) => (ip.src, ip.dst),
                L3::Ip(Ip::V6(_)) => unreachable!(),
            };
            prop_assert!(owns(&sw, peer, src), "{src} is not node {peer}'s");
            prop_assert!(sw.is_local(dst.into()), "{dst} is not here");
            let p = &sw.peers[&peer];
            let foreign = p.learned.iter().filter(|l| pod_mac_ipv4(&l.mac).is_none()).count();
            prop_assert!(foreign <= 1, "{foreign} non-derived MACs");
            sw.check_invariants();
        }
    }

    /// Neighbour advertisements from a peer that get through name one of
    /// its own addresses, at the MAC that sent them.
    #[test]
    fn delivered_advertisements_are_the_senders_own(
        host in 0u16..8, node in 0u16..3, ll in prop_oneof![Just(None), (0u8..4).prop_map(Some)], src_host in 1u16..8
    ) {
        let (mut sw, ours, _, _, _) = switch6();
        let target = Ipv6Addr::new(0xfd00, 0x10, 0, node, 0, 0, 0, host);
        let src = Ipv6Addr::new(0xfd00, 0x10, 0, 1, 0, 0, 0, src_host);
        let macs = [v6_mac(src), v6_mac(target), L_BRIDGE, mac(9)];
        let sender = v6_mac(src);
        let option = ll.map(|i| (2, macs[usize::from(i)]));
        let f = nd(ICMPV6_NEIGHBOR_ADVERT, sender, v6_mac(ours), src, ours, target, option);
        if sw.from_peer(Instant::now(), 1, &f) == PeerVerdict::Deliver {
            prop_assert_eq!(node, 1);
            prop_assert!(option.is_none_or(|(_, m)| m == sender));
        }
    }
}
