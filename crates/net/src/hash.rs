//! FNV-1a (64-bit): the one hash evio derives stable names from (host veth
//! names, long nftables chain names). Not for anything adversarial: it only
//! has to be stable across versions and spread similar inputs apart.

const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const PRIME: u64 = 0x0100_0000_01b3;

/// FNV-1a of `data`. Names derived from it are on disk and in the kernel
/// across upgrades, so the constants must never change.
pub fn fnv1a(data: impl AsRef<[u8]>) -> u64 {
    data.as_ref()
        .iter()
        .fold(OFFSET_BASIS, |h, b| (h ^ u64::from(*b)).wrapping_mul(PRIME))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_vectors() {
        // From the FNV reference test suite (draft-eastlake-fnv).
        assert_eq!(fnv1a(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a("foobar"), 0x8594_4171_f739_67e8);
    }
}
