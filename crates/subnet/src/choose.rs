use ipnet::IpNet;
use rand::Rng;

use crate::PodNetwork;

/// Node indices already taken, as sorted disjoint inclusive ranges, so that
/// even an IPv6 layout with 2^100 slots costs memory only per allocation.
#[derive(Debug, Clone)]
pub struct UsedSet {
    pod: PodNetwork,
    ranges: Vec<(u128, u128)>,
}

impl UsedSet {
    pub fn new(pod: PodNetwork) -> UsedSet {
        UsedSet {
            pod,
            ranges: Vec::new(),
        }
    }

    /// Marks every slot overlapped by one of `subnets`. A subnet from another
    /// layout (nodeBits changed under the same network name) blocks all the
    /// slots it touches rather than being double-allocated.
    pub fn from_subnets<I: IntoIterator<Item = IpNet>>(pod: PodNetwork, subnets: I) -> UsedSet {
        let mut s = UsedSet::new(pod);
        for n in subnets {
            if let Some(r) = pod.overlapping_indices(&n) {
                s.ranges.push(r);
            }
        }
        s.normalize();
        s
    }

    pub fn insert_subnet(&mut self, net: &IpNet) {
        if let Some(r) = self.pod.overlapping_indices(net) {
            self.ranges.push(r);
            self.normalize();
        }
    }

    fn normalize(&mut self) {
        self.ranges.sort_unstable();
        let mut out: Vec<(u128, u128)> = Vec::with_capacity(self.ranges.len());
        for &(lo, hi) in &self.ranges {
            match out.last_mut() {
                Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
                _ => out.push((lo, hi)),
            }
        }
        self.ranges = out;
    }

    pub fn contains(&self, index: u128) -> bool {
        self.ranges
            .iter()
            .any(|&(lo, hi)| lo <= index && index <= hi)
    }

    pub fn used_count(&self) -> u128 {
        self.ranges.iter().map(|&(lo, hi)| hi - lo + 1).sum()
    }

    pub fn free_count(&self) -> u128 {
        self.pod.capacity().saturating_sub(self.used_count())
    }

    /// The lowest free index: for stores that allocate under a lock, where
    /// there is nothing to collide with and small indices read best.
    pub fn first_free(&self) -> Option<u128> {
        let mut x = 0u128;
        for &(lo, hi) in &self.ranges {
            if x < lo {
                break;
            }
            x = x.max(hi.saturating_add(1));
        }
        (x < self.pod.capacity()).then_some(x)
    }

    /// A free index chosen uniformly at random, `None` when full. Uniform
    /// choice over the whole free set is what keeps concurrent joiners that
    /// read the same snapshot from picking the same slot: with `f` free slots
    /// two of them collide with probability `1/f`.
    pub fn pick<R: Rng + ?Sized>(&self, rng: &mut R) -> Option<u128> {
        let free = self.free_count();
        if free == 0 {
            return None;
        }
        // The k-th free slot: walk the sorted used ranges, skipping each one
        // that starts at or before the running position.
        let mut x = rng.gen_range(0..free);
        for &(lo, hi) in &self.ranges {
            if x >= lo {
                x += hi - lo + 1;
            } else {
                break;
            }
        }
        Some(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn picks_only_free_and_reports_full() {
        let pod = PodNetwork::parse("10.0.0.0/24", 3).unwrap();
        let mut used = UsedSet::new(pod);
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..8 {
            let i = used.pick(&mut rng).unwrap();
            assert!(!used.contains(i));
            used.insert_subnet(&pod.node(i).unwrap().subnet);
        }
        assert_eq!(used.used_count(), 8);
        assert_eq!(used.first_free(), None);
        assert_eq!(used.pick(&mut rng), None);
    }

    #[test]
    fn foreign_layout_blocks_overlap() {
        let pod = PodNetwork::parse("10.244.0.0/16", 8).unwrap();
        let used = UsedSet::from_subnets(
            pod,
            [
                "10.244.0.0/20".parse().unwrap(),
                "10.244.16.0/24".parse().unwrap(),
                "192.168.0.0/24".parse().unwrap(),
            ],
        );
        assert_eq!(used.used_count(), 17);
        assert_eq!(used.first_free(), Some(17));
        assert_eq!(UsedSet::new(pod).first_free(), Some(0));
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..1000 {
            assert!(used.pick(&mut rng).unwrap() > 16);
        }
    }

    #[test]
    fn pick_is_roughly_uniform() {
        let pod = PodNetwork::parse("10.0.0.0/16", 4).unwrap();
        let used = UsedSet::from_subnets(
            pod,
            [pod.node(3).unwrap().subnet, pod.node(9).unwrap().subnet],
        );
        let mut counts = [0u32; 16];
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..14_000 {
            counts[used.pick(&mut rng).unwrap() as usize] += 1;
        }
        assert_eq!(counts[3], 0);
        assert_eq!(counts[9], 0);
        for (i, c) in counts.iter().enumerate() {
            if i != 3 && i != 9 {
                assert!((800..1200).contains(c), "slot {i}: {c}");
            }
        }
    }

    #[test]
    fn huge_v6_space() {
        let pod = PodNetwork::parse("fd00::/8", 100).unwrap();
        let used = UsedSet::from_subnets(pod, [pod.node(0).unwrap().subnet]);
        assert_eq!(used.free_count(), (1u128 << 100) - 1);
        let mut rng = StdRng::seed_from_u64(5);
        let i = used.pick(&mut rng).unwrap();
        assert!(i > 0 && i < 1u128 << 100);
    }
}
