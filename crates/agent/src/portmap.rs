//! The port-mapping thread: finds the default gateway in the routing table
//! (netlink), drives the core's sans-IO PCP/NAT-PMP client
//! ([`evio_overlay::portmap`]) on a UDP socket of its own, falls back to
//! UPnP IGD ([`crate::upnp`]) when neither answers, and tells the engine
//! the mapped address, which it publishes as a `mapped` candidate. On stop
//! the mapping is deleted (bounded: well within the agent's teardown)
//! before the thread ends; a gateway that changes gets the same.
//!
//! Logged once: a network without any port mapping is the common case, so
//! "unavailable" is said once per distinct reason, at info level.
//!
//! A second socket, best effort, hears what PCP and NAT-PMP servers
//! multicast to 224.0.0.1:5350 when they start (miniupnpd sends a PCP
//! ANNOUNCE) or their external address changes: a rebooted gateway has
//! forgotten the mapping, and this gets it back at once instead of at the
//! next renewal, up to an hour later. Without that socket (the port is
//! taken without SO_REUSEADDR, no multicast) the renewals' epoch check is
//! all there is.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use evio_overlay::portmap::{
    MapEvent, PortMapConfig, PortMapper, ANNOUNCE_GROUP, ANNOUNCE_PORT, LIFETIME,
};

use crate::dataplane::Command;
use crate::upnp::Upnp;
use crate::{wait_either_readable, wait_readable, AgentError, EngineHandle, Stop};
use socket2::{Domain, Socket, Type};

/// How often the default gateway is looked up again.
const RECHECK: Duration = Duration::from_secs(30);
/// After every protocol failed: try again this much later (a router whose
/// UPnP was switched on, a new gateway).
const RETRY: Duration = Duration::from_secs(600);
/// Bound for the deletions on the way out.
const DELETE_WITHIN: Duration = Duration::from_millis(1500);

/// The IPv4 default route's gateway with the lowest metric, and our
/// address on its link (the one whose subnet holds the gateway).
pub fn default_gateway() -> Option<(Ipv4Addr, Ipv4Addr)> {
    let mut h = evio_net::Handle::new().ok()?;
    let routes = h.routes(evio_net::Family::V4).ok()?;
    let route = routes
        .iter()
        .filter(|r| r.dst.prefix_len() == 0)
        .filter_map(|r| match r.gateway {
            Some(IpAddr::V4(g)) => Some((r.metric.unwrap_or(0), g, r.oif)),
            _ => None,
        })
        .min()?;
    let (_, gw, oif) = route;
    let addrs = h.addresses(oif).ok()?;
    let v4 = |a: &evio_net::Address| match a.addr.addr() {
        IpAddr::V4(ip) => Some((a.addr.contains(&IpAddr::V4(gw)), ip)),
        IpAddr::V6(_) => None,
    };
    // Our address in the gateway's subnet, else any of the link's.
    let (_, me) = addrs
        .iter()
        .filter_map(v4)
        .max_by_key(|(on_link, _)| *on_link)?;
    Some((gw, me))
}

pub fn spawn(
    engine: EngineHandle,
    stop: Arc<Stop>,
    port: u16,
) -> Result<JoinHandle<()>, AgentError> {
    std::thread::Builder::new()
        .name("evio-portmap".into())
        .spawn(move || {
            let mut t = Thread {
                engine,
                stop,
                port,
                told: None,
                published: false,
                announce_failed: false,
            };
            t.run();
        })
        .map_err(AgentError::io("spawn thread"))
}

struct Thread {
    engine: EngineHandle,
    stop: Arc<Stop>,
    port: u16,
    /// The last "no mapping" reason logged.
    told: Option<String>,
    /// A mapped candidate is out: only then is there one to take back.
    published: bool,
    /// The announcement socket could not be had (said once).
    announce_failed: bool,
}

impl Thread {
    fn run(&mut self) {
        while !self.stop.is_set() {
            match default_gateway() {
                Some((gw, me)) => self.serve(gw, me),
                None => {
                    self.unavailable("no IPv4 default gateway".into());
                    wait_readable(self.stop.fd(), &self.stop, Some(RECHECK));
                }
            }
        }
    }

    fn unavailable(&mut self, why: String) {
        if self.told.as_ref() != Some(&why) {
            tracing::info!(%why, "no port mapping from the gateway: peers reach this node by its other candidates");
            self.told = Some(why);
        }
    }

    /// Tells the engine the mapped candidate, or that there is none. No
    /// "none" when none was out, nor on the way out: the engine is going
    /// down, and a candidate change then is a record rewrite that holds up
    /// the stop (a restart keeps the record anyway).
    fn publish(&mut self, m: Option<SocketAddrV4>) {
        if m.is_none() && (!self.published || self.stop.is_set()) {
            return;
        }
        self.published = m.is_some();
        self.engine.send(Command::Mapped(m.map(SocketAddr::V4)));
    }

    /// Holds a mapping on gateway `gw` until stop or until the default
    /// gateway changes; deletes it on the way out.
    fn serve(&mut self, gw: Ipv4Addr, me: Ipv4Addr) {
        let sock = match UdpSocket::bind(SocketAddr::new(IpAddr::V4(me), 0)) {
            Ok(s) => s,
            Err(e) => {
                self.unavailable(format!("no socket on {me}: {e}"));
                wait_readable(self.stop.fd(), &self.stop, Some(RECHECK));
                return;
            }
        };
        let _ = sock.set_nonblocking(true);
        let cfg = PortMapConfig {
            gateway: gw,
            client: me,
            internal_port: self.port,
            lifetime: LIFETIME,
        };
        let mut nonce = [0u8; 12];
        nonce.copy_from_slice(&evio_overlay::crypto::os_seed()[..12]);
        let mut pm = PortMapper::new(Instant::now(), cfg, nonce);
        let announce = match announce_socket(me) {
            Ok(s) => Some(s),
            Err(e) => {
                if !self.announce_failed {
                    tracing::info!(error = %e, "no socket for the gateway's restart announcements (224.0.0.1:{ANNOUNCE_PORT}): a rebooted gateway is noticed at the next renewal");
                    self.announce_failed = true;
                }
                None
            }
        };
        let mut upnp: Option<Upnp> = None;
        let mut retry: Option<Instant> = None;
        let mut recheck = Instant::now() + RECHECK;
        loop {
            flush(&sock, &mut pm);
            while let Some(e) = pm.poll_event() {
                self.on_event(e, gw, me, &mut upnp, &mut retry);
            }
            if self.stop.is_set() {
                break;
            }
            let now = Instant::now();
            if now >= recheck {
                if default_gateway() != Some((gw, me)) {
                    break;
                }
                recheck = now + RECHECK;
            }
            if let Some(u) = upnp.as_mut() {
                if let Err(why) = u.renew_if_due(now) {
                    tracing::warn!(%why, "UPnP port mapping lost");
                    self.publish(None);
                    upnp = None;
                    retry = Some(now + RETRY);
                }
            }
            if retry.is_some_and(|t| now >= t) {
                retry = None;
                pm.restart(now);
                continue;
            }
            let wake = [pm.poll_timeout(), retry, upnp.as_ref().map(Upnp::due)]
                .into_iter()
                .flatten()
                .fold(recheck, Instant::min);
            let left = wake.saturating_duration_since(Instant::now());
            let ann_fd = announce.as_ref().map_or(-1, AsRawFd::as_raw_fd);
            if wait_either_readable(sock.as_raw_fd(), ann_fd, &self.stop, Some(left)) {
                receive(&sock, &mut pm);
                if let Some(a) = &announce {
                    // Not while UPnP holds the mapping: the mapper is idle
                    // then, and would ask for a second one.
                    receive_announcements(a, &mut pm, upnp.is_none());
                }
            }
            let now = Instant::now();
            if pm.poll_timeout().is_some_and(|t| now >= t) {
                pm.handle_timeout(now);
            }
        }
        self.publish(None);
        delete(&sock, &mut pm);
        if let Some(u) = upnp {
            u.delete();
        }
    }

    fn on_event(
        &mut self,
        e: MapEvent,
        gw: Ipv4Addr,
        me: Ipv4Addr,
        upnp: &mut Option<Upnp>,
        retry: &mut Option<Instant>,
    ) {
        match e {
            MapEvent::Mapped {
                protocol,
                external,
                lifetime,
            } => {
                tracing::info!(protocol = protocol.as_str(), %external, gateway = %gw, lifetime, "port mapped by the gateway: published as a candidate");
                self.told = None;
                self.publish(Some(external));
            }
            MapEvent::Lost { why } => {
                tracing::warn!(%why, gateway = %gw, "port mapping lost; asking again");
                self.publish(None);
            }
            MapEvent::Unavailable { why } => match Upnp::map(gw, me, self.port, &self.stop) {
                Ok(u) => {
                    tracing::info!(protocol = "upnp", external = %u.external(), gateway = %gw, "port mapped by the gateway: published as a candidate");
                    self.told = None;
                    self.publish(Some(u.external()));
                    *upnp = Some(u);
                }
                Err(upnp_why) => {
                    self.unavailable(format!("{why}; upnp: {upnp_why}"));
                    *retry = Some(Instant::now() + RETRY);
                }
            },
        }
    }
}

fn flush(sock: &UdpSocket, pm: &mut PortMapper) {
    let to = pm.server();
    while let Some(d) = pm.poll_transmit() {
        // A send that fails is a lost datagram: the client retransmits.
        let _ = sock.send_to(&d, to);
    }
}

fn receive(sock: &UdpSocket, pm: &mut PortMapper) {
    let mut buf = [0u8; 1100];
    for _ in 0..64 {
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => pm.handle_datagram(Instant::now(), from, &buf[..n]),
            Err(_) => break,
        }
    }
}

/// A socket on 0.0.0.0:[`ANNOUNCE_PORT`] in [`ANNOUNCE_GROUP`] on the
/// link toward the gateway (where `me` is), nonblocking, close-on-exec
/// (socket2). Shared (SO_REUSEADDR, SO_REUSEPORT): other port-mapping
/// clients on the host listen there too, and each gets every multicast.
fn announce_socket(me: Ipv4Addr) -> std::io::Result<UdpSocket> {
    let sock = Socket::new(Domain::IPV4, Type::DGRAM, None)?;
    sock.set_reuse_address(true)?;
    crate::udp::setsockopt_int(sock.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
    sock.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, ANNOUNCE_PORT)).into())?;
    sock.join_multicast_v4(&ANNOUNCE_GROUP, &me)?;
    sock.set_nonblocking(true)?;
    Ok(sock.into())
}

/// Drains the announcement socket; `feed`: into the mapper, else dropped.
fn receive_announcements(sock: &UdpSocket, pm: &mut PortMapper, feed: bool) {
    let mut buf = [0u8; 1100];
    for _ in 0..64 {
        match sock.recv_from(&mut buf) {
            // No line per datagram: anyone on the LAN can send them. What
            // they can bring about (a lost mapping) is logged, 1 per 10 s.
            Ok((n, from)) if feed => pm.handle_announcement(Instant::now(), from, &buf[..n]),
            Ok(_) => {}
            Err(_) => break,
        }
    }
}

/// Deletes the PCP/NAT-PMP mapping, bounded by [`DELETE_WITHIN`].
fn delete(sock: &UdpSocket, pm: &mut PortMapper) {
    let end = Instant::now() + DELETE_WITHIN;
    pm.shutdown(Instant::now());
    let _ = sock.set_nonblocking(false);
    while !pm.is_done() {
        flush(sock, pm);
        let now = Instant::now();
        let Some(t) = pm.poll_timeout() else { break };
        if now >= end {
            break;
        }
        let wait = t.min(end).saturating_duration_since(now);
        let _ = sock.set_read_timeout(Some(wait.max(Duration::from_millis(1))));
        let mut buf = [0u8; 1100];
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => pm.handle_datagram(Instant::now(), from, &buf[..n]),
            Err(_) => pm.handle_timeout(Instant::now()),
        }
    }
}
