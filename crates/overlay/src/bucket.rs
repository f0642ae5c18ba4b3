//! One token bucket for every rate limit of the core (the switch's floods
//! and address resolutions, the engine's handshakes per source address), so
//! that "how many, how often" is decided by one rule. Whole tokens in
//! integers: no float drift, and a silent source costs nothing to forget.
//! The agent's log lines per peer use it too, at rates below one a second
//! ([`TokenBucket::per`]).

use std::time::{Duration, Instant};

/// Whole tokens; `last` advances only by the time that paid for the tokens
/// added, so that fractions carry over when callers come often.
#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    rate: u32,
    /// Nanoseconds that pay for `rate` tokens.
    period: u128,
    burst: u32,
    tokens: u32,
    last: Option<Instant>,
}

impl TokenBucket {
    /// `rate` tokens a second, at most `burst` banked.
    pub fn new(rate: u32, burst: u32) -> TokenBucket {
        TokenBucket::per(rate, Duration::from_secs(1), burst)
    }

    /// `rate` tokens every `period` (e.g. one per ten seconds).
    pub fn per(rate: u32, period: Duration, burst: u32) -> TokenBucket {
        TokenBucket {
            rate,
            period: period.as_nanos().max(1),
            burst,
            tokens: burst,
            last: None,
        }
    }

    pub fn take(&mut self, now: Instant) -> bool {
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
    pub fn idle(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.burst
    }

    fn refill(&mut self, now: Instant) {
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
            / self.period;
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
            let paid = u64::try_from(add * self.period / rate).unwrap_or(u64::MAX);
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

    #[test]
    fn a_bucket_slower_than_one_a_second_pays_by_its_period() {
        // One log line per peer and kind every 10 s after a burst of 2.
        let (mut bucket, t) = (
            TokenBucket::per(1, Duration::from_secs(10), 2),
            Instant::now(),
        );
        assert!(bucket.take(t) && bucket.take(t));
        assert!(!bucket.take(t + Duration::from_secs(9)));
        assert!(bucket.take(t + Duration::from_secs(10)));
        assert!(!bucket.take(t + Duration::from_secs(19)));
        assert!(bucket.take(t + Duration::from_secs(20)));
    }
}
