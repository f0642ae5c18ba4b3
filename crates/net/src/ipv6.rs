//! IPv6 duplicate address detection.

use std::time::{Duration, Instant};

use ipnet::IpNet;

use crate::{Error, Handle, Result};

/// Waits until no IPv6 address of interface `index` is tentative, polling
/// at most until `timeout`. An address whose DAD failed is an error: it will
/// never become usable. Returns at once when DAD is off (`accept_dad=0` or
/// `nodad` addresses are never tentative). The link must be up, or DAD
/// never completes.
pub fn wait_dad(handle: &mut Handle, index: u32, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    // DAD takes about a second by default (1 probe, retrans 1 s); short
    // polls keep the added latency small without a busy loop.
    let mut pause = Duration::from_millis(10);
    loop {
        let mut tentative = false;
        for a in handle.addresses(Some(index))? {
            if !matches!(a.addr, IpNet::V6(_)) {
                continue;
            }
            if a.dadfailed {
                return Err(Error::DadFailed {
                    index,
                    addr: a.addr,
                });
            }
            tentative |= a.tentative;
        }
        if !tentative {
            return Ok(());
        }
        let elapsed = start.elapsed();
        if elapsed >= timeout {
            return Err(Error::Timeout {
                what: format!("IPv6 duplicate address detection on interface index {index}"),
                after: timeout,
            });
        }
        std::thread::sleep(pause.min(timeout - elapsed));
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}
