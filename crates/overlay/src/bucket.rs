//! One token bucket for every rate limit of the core (the switch's floods
//! and address resolutions, the engine's handshakes per source address), so
//! that "how many, how often" is decided by one rule. Whole tokens in
//! integers: no float drift, and a silent source costs nothing to forget.

use std::time::{Duration, Instant};

/// Whole tokens; `last` advances only by the time that paid for the tokens
/// added, so that fractions carry over when callers come often.
#[derive(Clone, Copy)]
pub(crate) struct TokenBucket {
    rate: u32,
    burst: u32,
    tokens: u32,
    last: Option<Instant>,
}

impl TokenBucket {
    pub(crate) fn new(rate: u32, burst: u32) -> TokenBucket {
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: None,
        }
    }

    pub(crate) fn take(&mut self, now: Instant) -> bool {
        self.refill(now);
        match self.tokens.checked_sub(1) {
            Some(left) => {
                self.tokens = left;
                true
            }
            None => false,
        }
    }

    /// Full again after time unused: nothing to remember.
    pub(crate) fn idle(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.burst
    }

    fn refill(&mut self, now: Instant) {
        const NANOS: u128 = 1_000_000_000;
        let last = match self.last {
            Some(last) if self.tokens < self.burst => last,
            // Time spent full must not count once tokens are taken.
            _ => {
                self.last = Some(now);
                return;
            }
        };
        let rate = u128::from(self.rate);
        let add = now
            .saturating_duration_since(last)
            .as_nanos()
            .saturating_mul(rate)
            / NANOS;
        if add == 0 {
            return;
        }
        let room = u128::from(self.burst - self.tokens);
        if add >= room {
            self.tokens = self.burst;
            self.last = Some(now);
        } else {
            // add < room ≤ u32::MAX, so neither conversion saturates.
            self.tokens += u32::try_from(add).unwrap_or(0);
            let paid = u64::try_from(add * NANOS / rate).unwrap_or(u64::MAX);
            self.last = Some(last.checked_add(Duration::from_nanos(paid)).unwrap_or(now));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_bucket_does_not_bank_tokens_while_full() {
        let mut bucket = TokenBucket::new(1, 2);
        let t = Instant::now();
        assert!(bucket.take(t + Duration::from_secs(100)));
        assert!(bucket.take(t + Duration::from_secs(100)));
        assert!(!bucket.take(t + Duration::from_secs(100)));
        assert!(bucket.take(t + Duration::from_secs(101)));
        let mut never = TokenBucket::new(0, 1);
        assert!(never.take(t));
        assert!(!never.take(t + Duration::from_secs(1000)));
    }

    #[test]
    fn a_new_source_gets_its_burst_then_the_rate_with_fractions_carried() {
        // The engine's handshakes per source address: burst = rate = 8.
        let (mut bucket, t) = (TokenBucket::new(8, 8), Instant::now());
        for _ in 0..8 {
            assert!(bucket.take(t));
        }
        assert!(!bucket.take(t));
        // 1/8 s pays for one token; 100 ms alone does not, but it is not
        // lost: 25 ms more completes the token.
        assert!(!bucket.take(t + Duration::from_millis(100)));
        assert!(bucket.take(t + Duration::from_millis(125)));
        assert!(!bucket.take(t + Duration::from_millis(125)));
        // Long silence refills to the burst, not beyond.
        let later = t + Duration::from_secs(60);
        assert!(bucket.idle(later));
        for _ in 0..8 {
            assert!(bucket.take(later));
        }
        assert!(!bucket.take(later));
        assert!(!bucket.idle(later));
    }
}
