//! Local candidates, gathered again on every address or link change of the
//! host (a netlink subscription) and every 30 s as a backstop. The overlay's
//! own interfaces (bridge, TAP, host-overlay TUN) and addresses inside the
//! pod or host CIDR are never candidates: the tunnel must not route over
//! itself. IPv6 addresses follow `evio_overlay::family`'s rules (global
//! and ULA; never link-local, IPv4-mapped, deprecated or tentative).

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use evio_overlay::family::{self, AddrFlags};
use ipnet::IpNet;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr as NlAddr};

use crate::dataplane::Command;
use crate::{wait_readable, AgentError, EngineHandle, Stop};

const RTMGRP_LINK: u32 = 0x1;
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV6_IFADDR: u32 = 0x100;
const BACKSTOP: Duration = Duration::from_secs(30);

/// The host's usable local candidates right now.
pub fn local_candidates(port: u16, exclude: &[String], nets: &[IpNet]) -> Vec<SocketAddr> {
    let Ok(mut h) = evio_net::Handle::new() else {
        return Vec::new();
    };
    let links = h.links().unwrap_or_default();
    let addrs = h.addresses(None).unwrap_or_default();
    let mut out: Vec<SocketAddr> = addrs
        .iter()
        .filter(|a| {
            let Some(l) = links.iter().find(|l| l.index == a.index) else {
                return false;
            };
            let ip = a.addr.addr();
            let flags = AddrFlags {
                deprecated: a.deprecated,
                tentative: a.tentative,
                dadfailed: a.dadfailed,
            };
            l.up && !exclude.contains(&l.name)
                && family::local_candidate(ip, flags)
                && !nets.iter().any(|n| n.contains(&ip))
        })
        .map(|a| SocketAddr::new(a.addr.addr(), port))
        .collect();
    out.sort();
    out.dedup();
    out
}

pub fn spawn(
    engine: EngineHandle,
    stop: Arc<Stop>,
    port: u16,
    exclude: Vec<String>,
    nets: Vec<IpNet>,
) -> Result<JoinHandle<()>, AgentError> {
    let mut sock = Socket::new(NETLINK_ROUTE).map_err(AgentError::io("netlink socket"))?;
    let groups = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR;
    sock.bind(&NlAddr::new(0, groups))
        .map_err(AgentError::io("netlink subscribe"))?;
    // Non-blocking: the thread sleeps in poll() on the socket and the stop
    // fd, never on a timer of its own.
    let _ = sock.set_non_blocking(true);
    std::thread::Builder::new()
        .name("evio-netwatch".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            let mut last: Option<Vec<SocketAddr>> = None;
            let mut due = Instant::now();
            while !stop.is_set() {
                let now = Instant::now();
                if now >= due {
                    let c = local_candidates(port, &exclude, &nets);
                    if last.as_ref() != Some(&c) {
                        engine.send(Command::LocalCandidates(c.clone()));
                        last = Some(c);
                    }
                    due = Instant::now() + BACKSTOP;
                }
                let left = due.saturating_duration_since(Instant::now());
                if wait_readable(sock.as_raw_fd(), &stop, Some(left)) {
                    // Something changed: look again shortly (changes come in
                    // bursts: link up, then its addresses).
                    while let Ok(n) = sock.recv(&mut &mut buf[..], 0) {
                        if n == 0 {
                            break;
                        }
                    }
                    due = due.min(Instant::now() + Duration::from_millis(100));
                }
            }
        })
        .map_err(AgentError::io("spawn thread"))
}
