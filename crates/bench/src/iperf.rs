//! iperf3 between two network namespaces, and what its JSON says: one
//! implementation for every section that measures throughput.

use std::time::{Duration, Instant};

use evio_testkit::netns::Netns;
use serde_json::Value;

use crate::error::{BenchError, Result};
use crate::exec::{self, Background, NsFd, Spec};

const PORT: &str = "5201";

#[derive(Debug, Clone, Copy)]
pub struct Transfer {
    pub gbits: f64,
    pub bytes: f64,
    /// TCP retransmissions the sender counted (lost or reordered segments).
    pub retransmits: u64,
}

/// `end.sum_received` of iperf3's JSON (Gbit/s, bytes) and the sender's
/// retransmissions.
pub fn transfer(json: &str) -> Option<Transfer> {
    let v: Value = serde_json::from_str(json).ok()?;
    let s = v.pointer("/end/sum_received")?;
    Some(Transfer {
        gbits: s.get("bits_per_second")?.as_f64()? / 1e9,
        bytes: s.get("bytes")?.as_f64()?,
        retransmits: v
            .pointer("/end/sum_sent/retransmits")
            .and_then(Value::as_u64)
            .unwrap_or(0),
    })
}

/// One bounded iperf3 run of `secs` seconds with `streams` parallel
/// streams from `client` to a one-shot server on `ip` in `server`.
pub fn run(
    server: &Netns,
    ip: &str,
    client: &Netns,
    secs: u32,
    streams: usize,
) -> Result<Transfer> {
    run_to(server, ip, client, ip, secs, streams)
}

/// [`run`] with the client connecting to `to` (a ClusterIP that DNATs to
/// the server's `ip`, say) rather than to `ip`.
pub fn run_to(
    server: &Netns,
    ip: &str,
    client: &Netns,
    to: &str,
    secs: u32,
    streams: usize,
) -> Result<Transfer> {
    let sfd = NsFd::open(&server.path())?;
    let cfd = NsFd::open(&client.path())?;
    let mut srv = Background::start(
        &Spec::new("iperf3")
            .args(["-s", "-1", "-B", ip, "-p", PORT])
            .netns(&sfd),
    )?;
    // The client fails at once on a closed port: wait until the server
    // listens, or has died.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let o = exec::run(&Spec::new("ss").args(["-Hltn"]).netns(&sfd))?.ok("ss -Hltn")?;
        if o.stdout.contains(&format!(":{PORT}")) {
            break;
        }
        if !srv.running() || Instant::now() >= deadline {
            return Err(BenchError::failed(
                "iperf3 server",
                format!("not listening: {}", srv.output().trim()),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let what = format!("iperf3 -P {streams} to {to}");
    let o = exec::run(
        &Spec::new("iperf3")
            .args([
                "-c",
                to,
                "-p",
                PORT,
                "-t",
                &secs.to_string(),
                "-P",
                &streams.to_string(),
                "-J",
                "--connect-timeout",
                "3000",
            ])
            .netns(&cfd)
            .timeout(Duration::from_secs(u64::from(secs) + 20)),
    )?
    .ok(&what)?;
    let _ = srv.wait(Duration::from_secs(5));
    transfer(&o.stdout).ok_or_else(|| BenchError::output(what, o.stdout))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iperf_totals_are_read() {
        let j = r#"{"end":{"sum_received":{"bits_per_second":4.5e9,"bytes":2.0e9},
                   "sum_sent":{"retransmits":17}}}"#;
        let t = transfer(j).unwrap();
        assert_eq!((t.gbits, t.bytes, t.retransmits), (4.5, 2.0e9, 17));
        assert!(transfer("{}").is_none());
        assert!(transfer(r#"{"error":"unable to connect"}"#).is_none());
    }
}
