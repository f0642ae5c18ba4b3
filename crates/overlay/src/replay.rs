//! Anti-replay for transport counters: a sliding window of the last
//! [`WINDOW`] counters (RFC 6479's bitmap, as WireGuard uses), so datagrams
//! may arrive out of order (multipath, GSO batches, relay hops) but none is
//! accepted twice.

/// Counters this far behind the highest one seen are still accepted if
/// new. 2048 covers reordering across a 64 KiB GSO batch many times over.
pub const WINDOW: u64 = 2048;
/// One word more than the window: the word the head moves into is cleared,
/// and it must not be one still holding bits of counters inside the window.
const WORDS: usize = (WINDOW / 64) as usize + 1;

#[derive(Debug, Clone)]
pub struct ReplayWindow {
    /// One past the highest counter accepted so far.
    next: u64,
    /// Bit `c % WINDOW` says counter `c` was seen, for `c` in the window.
    bits: [u64; WORDS],
}

impl Default for ReplayWindow {
    fn default() -> Self {
        ReplayWindow {
            next: 0,
            bits: [0; WORDS],
        }
    }
}

impl ReplayWindow {
    /// Whether `counter` could be new: the cheap test done before spending
    /// a decryption on it.
    pub fn check(&self, counter: u64) -> bool {
        if counter >= self.next {
            return true;
        }
        if self.next - counter > WINDOW {
            return false;
        }
        let (w, b) = Self::slot(counter);
        self.bits[w] & (1 << b) == 0
    }

    /// Records `counter` after its datagram authenticated; false if it was
    /// seen before or is too old (then the datagram must be dropped).
    pub fn accept(&mut self, counter: u64) -> bool {
        if !self.check(counter) {
            return false;
        }
        if counter >= self.next {
            // Clear the words that the window slides over. Counting in
            // whole words from the old head keeps this O(WORDS) at most.
            // The head is the highest counter, not `next`: when that one
            // ends a word, `next` starts the following word, which still
            // holds bits of a lap ago and must be cleared too.
            let old_word = self.next.saturating_sub(1) / 64;
            let new_word = counter / 64;
            let clear = (new_word - old_word).min(WORDS as u64);
            for i in 1..=clear {
                self.bits[((old_word + i) % WORDS as u64) as usize] = 0;
            }
            self.next = counter + 1;
        }
        let (w, b) = Self::slot(counter);
        self.bits[w] |= 1 << b;
        true
    }

    fn slot(counter: u64) -> (usize, u32) {
        (
            ((counter / 64) % WORDS as u64) as usize,
            (counter % 64) as u32,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn in_order_out_of_order_duplicates_and_too_old() {
        let mut w = ReplayWindow::default();
        assert!(w.accept(0));
        assert!(!w.accept(0));
        assert!(w.accept(2));
        assert!(w.accept(1));
        assert!(!w.accept(1));
        assert!(w.accept(5000));
        // 5001 - 2048 = 2953: the oldest still acceptable.
        assert!(!w.check(2952));
        assert!(w.accept(2953));
        assert!(!w.accept(2953));
        assert!(w.accept(4999));
        // A huge jump wipes the window: old counters are too old, not "seen".
        assert!(w.accept(1 << 40));
        assert!(!w.accept(4999));
        assert!(w.accept((1 << 40) - 1));
    }

    #[test]
    fn sliding_clears_stale_bits() {
        let mut w = ReplayWindow::default();
        for c in 0..64 {
            assert!(w.accept(c));
        }
        // Move ahead by exactly one window: counter 64+2048 shares a bit
        // position with 64; the stale bit must not make it look seen.
        assert!(w.accept(64 + WINDOW));
        assert!(w.accept(65 + WINDOW));
        assert!(!w.accept(64 + WINDOW));
    }

    #[test]
    fn a_head_at_the_end_of_a_word_does_not_keep_last_laps_bits() {
        // Found by `matches_a_model`: 5823 ends word 90, so the next
        // counters start word 91, which shares its slot with word 58, where
        // 3728 left a bit at the position 5840 takes.
        let mut w = ReplayWindow::default();
        for c in [3728, 5823, 5841] {
            assert!(w.accept(c), "{c}");
        }
        assert!(w.accept(5840));
        assert!(!w.accept(5840));
    }

    proptest! {
        /// Against a model that remembers everything: the window accepts a
        /// counter exactly when it is new and not older than the window.
        #[test]
        fn matches_a_model(seq in proptest::collection::vec(0u64..6000, 1..400)) {
            let mut w = ReplayWindow::default();
            let mut seen = std::collections::HashSet::new();
            let mut max: Option<u64> = None;
            for c in seq {
                let too_old = max.is_some_and(|m| m >= c + WINDOW);
                let want = !too_old && !seen.contains(&c);
                prop_assert_eq!(w.accept(c), want, "counter {}", c);
                if want {
                    seen.insert(c);
                    max = Some(max.map_or(c, |m| m.max(c)));
                }
            }
        }
    }
}
