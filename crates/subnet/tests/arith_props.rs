//! Property tests of the subnet arithmetic: for any valid pod CIDR and
//! nodeBits, node subnets tile the CIDR without overlap and every range
//! stays inside its subnet.
// A test that unwraps fails loudly, which is what a test should do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use evio_subnet::{PodNetwork, SubnetError, UsedSet};
use ipnet::IpNet;
use proptest::prelude::*;

fn as_u128(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(v) => u128::from(u32::from(v)),
        IpAddr::V6(v) => u128::from(v),
    }
}

/// (pod network, width) for both families, any prefix leaving >= 2 host bits.
fn pod_network() -> impl Strategy<Value = PodNetwork> {
    let v4 = (any::<u32>(), 0u8..=30)
        .prop_flat_map(|(a, p)| (Just(a), Just(p), 1u32..=(30 - u32::from(p)).max(1)))
        .prop_filter_map("valid v4", |(a, p, b)| {
            let net = IpNet::new(IpAddr::V4(Ipv4Addr::from(a)), p).ok()?.trunc();
            PodNetwork::new(net, b).ok()
        });
    let v6 = (any::<u128>(), 0u8..=126)
        .prop_flat_map(|(a, p)| (Just(a), Just(p), 1u32..=(126 - u32::from(p)).max(1)))
        .prop_filter_map("valid v6", |(a, p, b)| {
            let net = IpNet::new(IpAddr::V6(Ipv6Addr::from(a)), p).ok()?.trunc();
            PodNetwork::new(net, b).ok()
        });
    prop_oneof![v4, v6]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn node_subnet_shape(pod in pod_network(), seed in any::<u128>()) {
        let i = seed % pod.capacity();
        let n = pod.node(i).unwrap();
        prop_assert_eq!(n.index, i);
        prop_assert_eq!(n.subnet.prefix_len(), pod.node_prefix_len());
        prop_assert_eq!(n.subnet.trunc(), n.subnet);
        prop_assert!(pod.cidr().contains(&n.subnet));
        // Exactly P + (i << h).
        let base = as_u128(pod.cidr().network());
        prop_assert_eq!(as_u128(n.subnet.network()), base + (i << pod.host_bits()));
        prop_assert_eq!(as_u128(n.gateway), as_u128(n.subnet.network()) + 1);
        prop_assert_eq!(as_u128(n.range_start), as_u128(n.subnet.network()) + 2);
        // The range ends one below the last address of the subnet.
        prop_assert_eq!(as_u128(n.range_end), as_u128(n.subnet.broadcast()) - 1);
        prop_assert!(n.range_start <= n.range_end);
        for a in [n.gateway, n.range_start, n.range_end] {
            prop_assert!(n.subnet.contains(&a));
        }
        prop_assert_eq!(n.pod_count(), (1u128 << pod.host_bits()) - 3);
        prop_assert_eq!(pod.index_of(&n.subnet), Some(i));
    }

    #[test]
    fn distinct_nodes_never_overlap(pod in pod_network(), a in any::<u128>(), b in any::<u128>()) {
        let (i, j) = (a % pod.capacity(), b % pod.capacity());
        prop_assume!(i != j);
        let (x, y) = (pod.node(i).unwrap(), pod.node(j).unwrap());
        prop_assert!(!x.subnet.contains(&y.subnet) && !y.subnet.contains(&x.subnet));
        prop_assert!(!x.subnet.contains(&y.gateway) && !y.subnet.contains(&x.range_end));
    }

    #[test]
    fn first_and_last_nodes_exist(pod in pod_network()) {
        let first = pod.node(0).unwrap();
        prop_assert_eq!(first.subnet.network(), pod.cidr().network());
        let last = pod.node(pod.capacity() - 1).unwrap();
        prop_assert_eq!(last.subnet.broadcast(), pod.cidr().broadcast());
        prop_assert!(pod.node(pod.capacity()).is_err());
    }

    #[test]
    fn host_bits_set_names_the_network(a in any::<u32>(), p in 1u8..=24) {
        let net = IpNet::new(IpAddr::V4(Ipv4Addr::from(a)), p).unwrap();
        prop_assume!(net.trunc() != net);
        match PodNetwork::new(net, 2) {
            Err(SubnetError::HostBitsSet { network, .. }) => prop_assert_eq!(network, net.trunc()),
            other => prop_assert!(false, "{:?}", other),
        }
    }

    #[test]
    fn too_few_host_bits_rejected(p in 0u8..=32, b in 1u32..=40) {
        let net = IpNet::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), p).unwrap();
        let r = PodNetwork::new(net, b);
        if u32::from(p) + b + 2 <= 32 {
            prop_assert!(r.is_ok());
        } else if u32::from(p) + b > 32 {
            let is_too_large = matches!(r, Err(SubnetError::NodeBitsTooLarge { .. }));
            prop_assert!(is_too_large);
        } else {
            let is_too_few = matches!(r, Err(SubnetError::TooFewHostBits { .. }));
            prop_assert!(is_too_few);
        }
    }

    #[test]
    fn pick_avoids_used(b in 1u32..=8, used in proptest::collection::vec(any::<u16>(), 0..300), seed in any::<u64>()) {
        use rand::SeedableRng;
        let pod = PodNetwork::parse("10.0.0.0/8", b).unwrap();
        let cap = pod.capacity();
        let taken: Vec<u128> = used.iter().map(|u| u128::from(*u) % cap).collect();
        let set = UsedSet::from_subnets(pod, taken.iter().map(|&i| pod.node(i).unwrap().subnet));
        let distinct: std::collections::BTreeSet<u128> = taken.iter().copied().collect();
        prop_assert_eq!(set.used_count(), distinct.len() as u128);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        match set.pick(&mut rng) {
            Some(i) => { prop_assert!(i < cap); prop_assert!(!distinct.contains(&i)); }
            None => prop_assert_eq!(distinct.len() as u128, cap),
        }
        match set.first_free() {
            Some(i) => {
                prop_assert!(!distinct.contains(&i));
                prop_assert!((0..i).all(|k| distinct.contains(&k)));
            }
            None => prop_assert_eq!(distinct.len() as u128, cap),
        }
    }
}
