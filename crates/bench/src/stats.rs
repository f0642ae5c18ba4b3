//! Order statistics of a set of timings.

use std::time::Duration;

/// Median and tail of one set of samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub n: usize,
    pub median: Duration,
    pub p95: Duration,
    pub p99: Duration,
    pub min: Duration,
    pub max: Duration,
}

/// Nearest-rank percentile of sorted samples (`p` in 0..=100): the
/// smallest sample that at least p% of the samples do not exceed. With few
/// samples the tail is the maximum, never an interpolation that no run had.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The middle sample, or the mean of the two middle ones.
pub fn median(sorted: &[Duration]) -> Duration {
    let n = sorted.len();
    if n == 0 {
        return Duration::ZERO;
    }
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2
    }
}

impl Summary {
    pub fn of(samples: &[Duration]) -> Summary {
        let mut s = samples.to_vec();
        s.sort();
        Summary {
            n: s.len(),
            median: median(&s),
            p95: percentile(&s, 95.0),
            p99: percentile(&s, 99.0),
            min: s.first().copied().unwrap_or_default(),
            max: s.last().copied().unwrap_or_default(),
        }
    }
}

/// Milliseconds with two decimals.
pub fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

/// `a / b` as `0.12×`, or `n/a` when `b` is zero.
pub fn ratio(a: f64, b: f64) -> String {
    if b <= 0.0 || !a.is_finite() || !b.is_finite() {
        return "n/a".into();
    }
    format!("{:.2}×", a / b)
}

pub fn ratio_d(a: Duration, b: Duration) -> String {
    ratio(a.as_secs_f64(), b.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms_list(v: &[u64]) -> Vec<Duration> {
        v.iter().map(|&x| Duration::from_millis(x)).collect()
    }

    #[test]
    fn median_of_odd_and_even_sets() {
        assert_eq!(
            Summary::of(&ms_list(&[5, 1, 3])).median,
            Duration::from_millis(3)
        );
        assert_eq!(
            Summary::of(&ms_list(&[4, 1, 3, 2])).median,
            Duration::from_micros(2500)
        );
        assert_eq!(Summary::of(&[]).median, Duration::ZERO);
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        let s = Summary::of(&ms_list(&v));
        assert_eq!(s.p95, Duration::from_millis(95));
        assert_eq!(s.p99, Duration::from_millis(99));
        assert_eq!(s.min, Duration::from_millis(1));
        assert_eq!(s.max, Duration::from_millis(100));
        // With 10 samples the 95th and 99th percentiles are the maximum.
        let s = Summary::of(&ms_list(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 50]));
        assert_eq!(s.p95, Duration::from_millis(50));
        assert_eq!(s.p99, Duration::from_millis(50));
        assert_eq!(s.n, 10);
    }

    #[test]
    fn formatting() {
        assert_eq!(ms(Duration::from_micros(1234)), "1.23");
        assert_eq!(ratio(1.0, 4.0), "0.25×");
        assert_eq!(ratio(1.0, 0.0), "n/a");
        assert_eq!(
            ratio_d(Duration::from_millis(3), Duration::from_millis(2)),
            "1.50×"
        );
    }
}
