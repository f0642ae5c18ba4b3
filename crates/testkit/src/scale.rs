//! What the scale lab ([`crate::cluster::OverlayOpts::routed`]) measures:
//! when every agent knows every other node, and what an agent costs while
//! nothing happens (CPU, memory and wake-ups from /proc).
//!
//! Shared by the 64-node integration test and `evio-bench`'s scale section,
//! so that "known" means the same thing in both.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cluster::Cluster;

/// Peer states that count as healthy: `connected`, and `idle` (a peer with
/// a valid record that has no session because nothing needs one, see
/// OVERLAY.md). `connecting` and `down` do not.
pub fn healthy(state: &str) -> bool {
    matches!(state, "connected" | "idle")
}

/// How many peers of one `peers --json` answer are healthy, and how many are
/// `down`.
pub fn known(v: &Value) -> (usize, usize) {
    let peers = v["peers"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    let state = |p: &Value| p["state"].as_str().unwrap_or("").to_string();
    (
        peers.iter().filter(|p| healthy(&state(p))).count(),
        peers.iter().filter(|p| state(p) == "down").count(),
    )
}

/// The result of [`wait_known`].
#[derive(Debug, Clone)]
pub struct Known {
    /// Per agent: when it first answered with every other node healthy and
    /// none down, from `origin` (`None`: not within the timeout).
    pub per_agent: Vec<Option<Duration>>,
    /// Per agent: healthy peers in its last answer.
    pub last: Vec<usize>,
    /// Sweeps over all agents that were made.
    pub sweeps: usize,
}

impl Known {
    /// When the last agent got there; `None` if one never did.
    pub fn all(&self) -> Option<Duration> {
        self.per_agent
            .iter()
            .copied()
            .collect::<Option<Vec<_>>>()
            .map(|v| v.into_iter().max().unwrap_or_default())
    }
}

/// Asks every agent not yet complete for its peers, one at a time (a sweep
/// at 256 nodes is what one client costs; a thread per agent would load the
/// machine the agents are measured on), until every agent has every other
/// node healthy and none down, or `timeout` from now. Times are from
/// `origin` (e.g. the first agent's start).
pub fn wait_known(c: &Cluster, origin: Instant, timeout: Duration) -> Known {
    let n = c.nodes().len();
    let want = n.saturating_sub(1);
    let deadline = Instant::now() + timeout;
    let mut per_agent = vec![None; n];
    let mut last = vec![0; n];
    let mut sweeps = 0;
    while per_agent.iter().any(Option::is_none) && Instant::now() < deadline {
        let tick = Instant::now();
        sweeps += 1;
        for (i, node) in c.nodes().iter().enumerate() {
            if per_agent[i].is_some() {
                continue;
            }
            let Some(v) = node.agent.as_ref().and_then(|a| a.peers().ok()) else {
                continue;
            };
            let (ok, down) = known(&v);
            last[i] = ok;
            if ok >= want && down == 0 {
                per_agent[i] = Some(Instant::now().saturating_duration_since(origin));
            }
        }
        // At most ten sweeps a second when they are quick.
        std::thread::sleep(Duration::from_millis(100).saturating_sub(tick.elapsed()));
    }
    Known {
        per_agent,
        last,
        sweeps,
    }
}

/// utime + stime (every thread) in clock ticks from the text of
/// /proc/PID/stat.
pub fn stat_ticks(stat: &str) -> Option<u64> {
    // The command may contain spaces and parentheses: fields start after
    // the last ')'. There, index 0 is field 3 (state); utime is field 14.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no memory effects.
    let t = unsafe { nix::libc::sysconf(nix::libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// CPU seconds a live process has used (every thread).
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(stat_ticks(&s)? as f64 / clk_tck())
}

/// A `Key:   N` line of /proc/PID/status (kB for memory keys).
pub fn status_value(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// Resident memory in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_value(
        &std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?,
        "VmRSS",
    )
}

/// Context switches (voluntary + involuntary) of every thread: each one is
/// a thread that went to sleep and was woken, or was preempted.
pub fn ctx_switches(pid: u32) -> u64 {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    dir.flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .map(|s| {
            status_value(&s, "voluntary_ctxt_switches").unwrap_or(0)
                + status_value(&s, "nonvoluntary_ctxt_switches").unwrap_or(0)
        })
        .sum()
}

/// What some processes cost over a quiet interval.
#[derive(Debug, Clone, Default)]
pub struct Idle {
    pub secs: f64,
    /// Per process: share of one core in percent.
    pub pct: Vec<f64>,
    /// Per process: RSS at the end, KiB.
    pub rss_kib: Vec<u64>,
    /// Per process: context switches per second.
    pub wakeups: Vec<f64>,
}

/// Samples `pids` over `d` (the caller makes sure nobody talks to them).
/// A process that is gone counts NaN CPU and zero memory.
pub fn idle(pids: &[u32], d: Duration) -> Idle {
    let cpu0: Vec<f64> = pids
        .iter()
        .map(|p| cpu_secs(*p).unwrap_or(f64::NAN))
        .collect();
    let cs0: Vec<u64> = pids.iter().map(|p| ctx_switches(*p)).collect();
    let t = Instant::now();
    std::thread::sleep(d);
    let el = t.elapsed().as_secs_f64();
    let cpu1: Vec<f64> = pids
        .iter()
        .map(|p| cpu_secs(*p).unwrap_or(f64::NAN))
        .collect();
    let cs1: Vec<u64> = pids.iter().map(|p| ctx_switches(*p)).collect();
    Idle {
        secs: el,
        pct: cpu0
            .iter()
            .zip(&cpu1)
            .map(|(a, b)| 100.0 * (b - a) / el)
            .collect(),
        rss_kib: pids.iter().map(|p| rss_kib(*p).unwrap_or(0)).collect(),
        wakeups: cs0
            .iter()
            .zip(&cs1)
            .map(|(a, b)| b.saturating_sub(*a) as f64 / el)
            .collect(),
    }
}

/// Interval between the pings of [`first_reply`].
const PING_INTERVAL: f64 = 0.2;

/// The time from the first echo request to the first reply from `dst`,
/// pinging every 0.2 s for up to `max_secs`: (sequence number of the first
/// reply − 1) × 0.2 s + its round trip, so a first request that was
/// dropped costs the interval and one that was queued (e.g. behind a
/// handshake) shows its wait in its round trip. `None`: no reply.
pub fn first_reply(ns: &crate::netns::Netns, dst: &str, max_secs: u32) -> Option<Duration> {
    let w = max_secs.max(1).to_string();
    let out = crate::plugin::run_bounded(
        ns.command(&["ping", "-n", "-c", "1", "-i", "0.2", "-w", &w, dst]),
        b"",
        Duration::from_secs(u64::from(max_secs) + 5),
    );
    first_reply_of(&out.stdout)
}

/// [`first_reply`]'s reading of ping's output.
pub fn first_reply_of(out: &str) -> Option<Duration> {
    let line = out
        .lines()
        .find(|l| l.contains("icmp_seq=") && l.contains("time="))?;
    let field = |k: &str| {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(k))
            .and_then(|v| v.parse::<f64>().ok())
    };
    let seq = field("icmp_seq=")?;
    let ms = field("time=")?;
    let secs = (seq - 1.0).max(0.0) * PING_INTERVAL + ms / 1000.0;
    Some(Duration::from_secs_f64(secs))
}

/// Mean of the finite values (NaN if none).
pub fn mean(v: &[f64]) -> f64 {
    let f: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if f.is_empty() {
        f64::NAN
    } else {
        f.iter().sum::<f64>() / f.len() as f64
    }
}

/// `k` distinct ordered pairs `(a, b)`, `a != b`, of `0..n`, from a small
/// seeded generator (xorshift64*): the same seed gives the same pairs, so a
/// failing run can be repeated. Fewer when `n` has fewer pairs.
pub fn random_pairs(n: usize, k: usize, seed: u64) -> Vec<(usize, usize)> {
    let total = n.saturating_mul(n.saturating_sub(1));
    let k = k.min(total);
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let mut out = Vec::with_capacity(k);
    let mut seen = std::collections::BTreeSet::new();
    // Bounded: at most 64 draws per pair wanted, then whatever was found.
    for _ in 0..k.saturating_mul(64) {
        if out.len() == k {
            break;
        }
        let a = (next() % n as u64) as usize;
        let b = (next() % n as u64) as usize;
        if a != b && seen.insert((a, b)) {
            out.push((a, b));
        }
    }
    out
}

/// A seed that differs per run (printed by callers so a run can be redone).
pub fn seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        ^ u64::from(std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn idle_and_connected_are_known_connecting_and_down_are_not() {
        let v = json!({"peers": [
            {"state": "connected"}, {"state": "idle"},
            {"state": "connecting"}, {"state": "down"}, {}
        ]});
        assert_eq!(known(&v), (2, 1));
        assert_eq!(known(&json!({})), (0, 0));
    }

    #[test]
    fn random_pairs_are_distinct_and_never_self() {
        let p = random_pairs(64, 100, 7);
        assert_eq!(p.len(), 100);
        assert!(p.iter().all(|(a, b)| a != b && *a < 64 && *b < 64));
        let set: std::collections::BTreeSet<_> = p.iter().collect();
        assert_eq!(set.len(), 100);
        assert_eq!(random_pairs(64, 100, 7), p, "same seed, same pairs");
        assert_eq!(random_pairs(3, 100, 7).len(), 6, "only 6 pairs exist");
        assert!(random_pairs(1, 5, 7).is_empty());
    }

    #[test]
    fn first_reply_counts_the_lost_requests_before_it() {
        let out = "PING 10.244.1.2 (10.244.1.2) 56(84) bytes of data.\n\
                   64 bytes from 10.244.1.2: icmp_seq=3 ttl=63 time=1.50 ms\n";
        let d = first_reply_of(out).unwrap();
        assert!((d.as_secs_f64() - 0.4015).abs() < 1e-9, "{d:?}");
        assert_eq!(first_reply_of("PING x\n"), None);
    }

    #[test]
    fn stat_ticks_reads_utime_and_stime_after_the_command() {
        let stat = "42 (a (b) c) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14";
        // utime = field 14 = 11, stime = 12.
        assert_eq!(stat_ticks(stat), Some(23));
    }
}
