//! Local candidates, gathered again on every address or link change of the
//! host (a netlink subscription) and every 30 s as a backstop. The overlay's
//! own interfaces (bridge, TAP, host-overlay TUN) and addresses inside the
//! pod or host CIDR are never candidates: the tunnel must not route over
//! itself.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr as NlAddr};

use crate::dataplane::Command;
use crate::{AgentError, EngineHandle};

const RTMGRP_LINK: u32 = 0x1;
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
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
            let IpAddr::V4(v4) = ip else { return false };
            l.up && !exclude.contains(&l.name)
                && !v4.is_loopback()
                && !v4.is_link_local()
                && !v4.is_unspecified()
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
    stop: Arc<AtomicBool>,
    port: u16,
    exclude: Vec<String>,
    nets: Vec<IpNet>,
) -> Result<JoinHandle<()>, AgentError> {
    let mut sock = Socket::new(NETLINK_ROUTE).map_err(AgentError::io("netlink socket"))?;
    sock.bind(&NlAddr::new(0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR))
        .map_err(AgentError::io("netlink subscribe"))?;
    // A receive timeout lets the thread notice `stop`.
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 250_000,
    };
    // SAFETY: sets SO_RCVTIMEO from a live timeval.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
    }
    std::thread::Builder::new()
        .name("evio-netwatch".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            let mut last: Option<Vec<SocketAddr>> = None;
            let mut due = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                if Instant::now() >= due {
                    let c = local_candidates(port, &exclude, &nets);
                    if last.as_ref() != Some(&c) {
                        engine.send(Command::LocalCandidates(c.clone()));
                        last = Some(c);
                    }
                    due = Instant::now() + BACKSTOP;
                }
                match sock.recv(&mut &mut buf[..], 0) {
                    // Something changed: look again shortly (changes come
                    // in bursts: link up, then its addresses).
                    Ok(n) if n > 0 => due = due.min(Instant::now() + Duration::from_millis(100)),
                    _ => {}
                }
            }
        })
        .map_err(AgentError::io("spawn thread"))
}
