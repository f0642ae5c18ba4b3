//! Port mapping, sans-IO: ask the default gateway to forward a UDP port to
//! us, with PCP (RFC 6887, MAP) first and NAT-PMP (RFC 6886) when the
//! gateway does not speak PCP. The mapped external address is a candidate
//! of its own: a peer behind a NAT that changes ports per destination
//! (symmetric) reaches us there, which no hole punching gives it.
//!
//! Like the NAT layer this owns no socket and no clock: datagrams for the
//! gateway come out of [`PortMapper::poll_transmit`], its answers go into
//! [`PortMapper::handle_datagram`], and [`PortMapper::poll_timeout`] says
//! when [`PortMapper::handle_timeout`] must run. What the caller acts on
//! comes out of [`PortMapper::poll_event`]. UPnP IGD (HTTP and SOAP) is
//! the caller's third try when this gives up ([`MapEvent::Unavailable`]).
//!
//! A mapping is renewed at half its granted lifetime and deleted on
//! [`PortMapper::shutdown`] (lifetime 0). Refusals and garbage never panic:
//! garbage is counted and ignored, a refusal moves on to the next protocol,
//! and an answer whose external address cannot be anyone's is deleted at
//! once (a mapping we will not use must not stay on the gateway).

pub mod natpmp;
pub mod pcp;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

/// Where PCP and NAT-PMP servers listen.
pub const SERVER_PORT: u16 = 5351;
/// The lifetime asked for (RFC 6886's recommendation); gateways grant what
/// they like, often less.
pub const LIFETIME: u32 = 7200;
/// First retransmission timeout, doubled per try. Shorter than the RFCs'
/// (3 s for PCP): a gateway on the LAN answers within milliseconds, and
/// the fallback chain must end within seconds of the agent's start.
const RTO: Duration = Duration::from_millis(250);
/// Requests per protocol before the next one is tried: 0.25 + 0.5 + 1 s.
const TRIES: u32 = 3;
/// Deletion requests on shutdown before giving up (bounded exit).
const DELETE_TRIES: u32 = 2;
/// Longest pause between renewal retransmissions.
const RENEW_RTO_MAX: Duration = Duration::from_secs(8);
/// A granted lifetime below this is renewed as if it were this long:
/// a gateway answering 0 or 1 s must not make us spin.
const MIN_LIFETIME: u32 = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Pcp,
    NatPmp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Pcp => "pcp",
            Protocol::NatPmp => "nat-pmp",
        }
    }
}

#[derive(Debug, Clone)]
pub struct PortMapConfig {
    /// The default gateway (the PCP/NAT-PMP server).
    pub gateway: Ipv4Addr,
    /// Our address on the gateway's network (PCP carries it).
    pub client: Ipv4Addr,
    /// The UDP port to map (the agent's overlay port).
    pub internal_port: u16,
    /// Lifetime to ask for, seconds.
    pub lifetime: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapEvent {
    /// A mapping (new, or its external address changed): publish
    /// `external` as a mapped candidate.
    Mapped {
        protocol: Protocol,
        external: SocketAddrV4,
        lifetime: u32,
    },
    /// The mapping is gone (a renewal was refused or never answered):
    /// withdraw the candidate. A new attempt follows at once.
    Lost { why: String },
    /// Neither protocol gave a mapping, and why; nothing more happens until
    /// [`PortMapper::restart`].
    Unavailable { why: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Asking for a mapping with `proto`; `ip` is NAT-PMP's external
    /// address once it answered (its map answer has only the port).
    Asking {
        proto: Protocol,
        tries: u32,
        next: Instant,
        ip: Option<Ipv4Addr>,
        mapped: Option<(u16, u32)>,
    },
    Mapped {
        proto: Protocol,
        external: SocketAddrV4,
        expires: Instant,
        /// When the next renewal request goes out.
        next: Instant,
        tries: u32,
    },
    /// Both protocols failed.
    Idle,
    Deleting {
        proto: Protocol,
        tries: u32,
        next: Instant,
    },
    Done,
}

pub struct PortMapper {
    cfg: PortMapConfig,
    nonce: [u8; 12],
    phase: Phase,
    /// Why PCP failed, kept for the Unavailable event.
    pcp_why: Option<String>,
    out: VecDeque<Vec<u8>>,
    events: VecDeque<MapEvent>,
    /// Datagrams that were no answer to us (counted, ignored).
    pub junk: u64,
    /// The gateway has answered us at all (a mapping, an address or a
    /// refusal). One that never did runs no PCP/NAT-PMP server: on exit
    /// there is nothing to delete, and waiting for its answer would hold
    /// up a restart for the whole deletion bound.
    heard: bool,
}

/// An external address a mapping could be reached at: not "nowhere", not
/// this host, not a group. Anything else (a private address of a double
/// NAT, or a lie) is published and left to the path checks.
pub fn usable(ip: Ipv4Addr) -> bool {
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.is_link_local())
}

impl PortMapper {
    /// Starts asking at once with PCP. `nonce` identifies our PCP mapping
    /// (random per agent start: RFC 6887 11.1).
    pub fn new(now: Instant, cfg: PortMapConfig, nonce: [u8; 12]) -> PortMapper {
        let mut m = PortMapper {
            cfg,
            nonce,
            phase: Phase::Idle,
            pcp_why: None,
            out: VecDeque::new(),
            events: VecDeque::new(),
            junk: 0,
            heard: false,
        };
        m.ask(now, Protocol::Pcp);
        m
    }

    /// Where requests go.
    pub fn server(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(self.cfg.gateway, SERVER_PORT))
    }

    /// The mapping in place, if any.
    pub fn mapped(&self) -> Option<(Protocol, SocketAddrV4)> {
        match self.phase {
            Phase::Mapped {
                proto, external, ..
            } => Some((proto, external)),
            _ => None,
        }
    }

    /// After [`MapEvent::Unavailable`]: try again from PCP.
    pub fn restart(&mut self, now: Instant) {
        if self.phase == Phase::Idle {
            self.ask(now, Protocol::Pcp);
        }
    }

    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.out.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<MapEvent> {
        self.events.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::Asking { next, .. } | Phase::Mapped { next, .. } => Some(next),
            Phase::Deleting { next, .. } => Some(next),
            Phase::Idle | Phase::Done => None,
        }
    }

    /// Whether shutdown has finished (deleted, or given up on it).
    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    fn ask(&mut self, now: Instant, proto: Protocol) {
        self.phase = Phase::Asking {
            proto,
            tries: 0,
            next: now,
            ip: None,
            mapped: None,
        };
        self.handle_timeout(now);
    }

    /// The request for `proto`: `lifetime` 0 deletes.
    fn request(&mut self, proto: Protocol, lifetime: u32, suggested: u16) {
        let port = self.cfg.internal_port;
        let m = match proto {
            Protocol::Pcp => {
                pcp::map_request(self.cfg.client, &self.nonce, port, suggested, lifetime).to_vec()
            }
            Protocol::NatPmp => natpmp::map_request(port, suggested, lifetime).to_vec(),
        };
        self.out.push_back(m);
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        let port = self.cfg.internal_port;
        match self.phase {
            Phase::Asking {
                proto,
                tries,
                next,
                ip,
                mapped,
            } if now >= next => {
                if tries >= TRIES {
                    return self.give_up(now, proto, "no answer".into());
                }
                if proto == Protocol::NatPmp && ip.is_none() {
                    self.out.push_back(natpmp::address_request().to_vec());
                }
                if mapped.is_none() {
                    self.request(proto, self.cfg.lifetime, port);
                }
                self.phase = Phase::Asking {
                    proto,
                    tries: tries + 1,
                    next: now + RTO * 2u32.pow(tries),
                    ip,
                    mapped,
                };
            }
            Phase::Mapped {
                proto,
                external,
                expires,
                next,
                tries,
            } if now >= next => {
                if now >= expires {
                    self.events.push_back(MapEvent::Lost {
                        why: format!("{}: the renewal was not answered", proto.as_str()),
                    });
                    self.pcp_why = None;
                    return self.ask(now, Protocol::Pcp);
                }
                self.request(proto, self.cfg.lifetime, external.port());
                let rto = (RTO * 2u32.pow(tries.min(6))).min(RENEW_RTO_MAX);
                self.phase = Phase::Mapped {
                    proto,
                    external,
                    expires,
                    next: (now + rto).min(expires),
                    tries: tries + 1,
                };
            }
            Phase::Deleting { proto, tries, next } if now >= next => {
                if tries >= DELETE_TRIES {
                    self.phase = Phase::Done;
                    return;
                }
                self.delete_request(proto);
                self.phase = Phase::Deleting {
                    proto,
                    tries: tries + 1,
                    next: now + RTO * 2u32.pow(tries),
                };
            }
            _ => {}
        }
    }

    fn delete_request(&mut self, proto: Protocol) {
        // NAT-PMP deletes with suggested port 0 (RFC 6886 3.4); PCP
        // matches the mapping by nonce and internal port.
        self.request(proto, 0, 0);
    }

    /// `proto` failed: NAT-PMP after PCP, then nothing.
    fn give_up(&mut self, now: Instant, proto: Protocol, why: String) {
        match proto {
            Protocol::Pcp => {
                self.pcp_why = Some(why);
                self.ask(now, Protocol::NatPmp);
            }
            Protocol::NatPmp => {
                let pcp = self.pcp_why.take().unwrap_or_default();
                self.events.push_back(MapEvent::Unavailable {
                    why: format!("pcp: {pcp}; nat-pmp: {why}"),
                });
                self.phase = Phase::Idle;
            }
        }
    }

    /// A datagram from `from` on the caller's port-mapping socket.
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, data: &[u8]) {
        if from != self.server() {
            self.junk += 1;
            return;
        }
        let proto = match self.phase {
            Phase::Asking { proto, .. }
            | Phase::Mapped { proto, .. }
            | Phase::Deleting { proto, .. } => proto,
            Phase::Idle | Phase::Done => {
                self.junk += 1;
                return;
            }
        };
        let answer = match proto {
            Protocol::Pcp => self.pcp_answer(data),
            Protocol::NatPmp => self.natpmp_answer(data),
        };
        self.heard |= !matches!(answer, Answer::Junk);
        match answer {
            Answer::Junk => self.junk += 1,
            Answer::Refused(why) => self.refused(now, proto, why),
            Answer::Address(ip) => self.on_address(now, ip),
            Answer::Mapping { port, lifetime, ip } => self.on_mapping(now, port, lifetime, ip),
        }
    }

    fn pcp_answer(&self, data: &[u8]) -> Answer {
        if pcp::is_natpmp_version_error(data) {
            return Answer::Refused("the gateway speaks NAT-PMP only".into());
        }
        let Some(r) = pcp::parse_map_response(data) else {
            return Answer::Junk;
        };
        // An error answer may come without the payload (no nonce).
        if r.result != pcp::SUCCESS {
            let ours = r.nonce == self.nonce || r.nonce == [0; 12];
            return match ours {
                true => Answer::Refused(format!("{} ({})", pcp::result_name(r.result), r.result)),
                false => Answer::Junk,
            };
        }
        if r.nonce != self.nonce || r.internal_port != self.cfg.internal_port {
            return Answer::Junk;
        }
        match r.external_ip {
            Some(ip) => Answer::Mapping {
                port: r.external_port,
                lifetime: r.lifetime,
                ip: Some(ip),
            },
            None => Answer::Junk,
        }
    }

    fn natpmp_answer(&self, data: &[u8]) -> Answer {
        let Some(r) = natpmp::parse_response(data) else {
            return Answer::Junk;
        };
        if r.result() != natpmp::SUCCESS {
            return Answer::Refused(format!(
                "{} ({})",
                natpmp::result_name(r.result()),
                r.result()
            ));
        }
        match r {
            natpmp::Response::Address { ip, .. } => Answer::Address(ip),
            natpmp::Response::Map {
                internal_port,
                external_port,
                lifetime,
                ..
            } if internal_port == self.cfg.internal_port => Answer::Mapping {
                port: external_port,
                lifetime,
                ip: None,
            },
            natpmp::Response::Map { .. } => Answer::Junk,
        }
    }

    fn refused(&mut self, now: Instant, proto: Protocol, why: String) {
        match self.phase {
            Phase::Asking { .. } => self.give_up(now, proto, format!("refused: {why}")),
            Phase::Mapped { .. } => {
                self.events.push_back(MapEvent::Lost {
                    why: format!("{}: renewal refused: {why}", proto.as_str()),
                });
                self.pcp_why = None;
                self.ask(now, Protocol::Pcp);
            }
            // Whatever it says, we are done with it.
            Phase::Deleting { .. } => self.phase = Phase::Done,
            Phase::Idle | Phase::Done => {}
        }
    }

    fn on_address(&mut self, now: Instant, addr: Ipv4Addr) {
        if let Phase::Asking {
            proto: Protocol::NatPmp,
            tries,
            next,
            mapped,
            ..
        } = self.phase
        {
            self.phase = Phase::Asking {
                proto: Protocol::NatPmp,
                tries,
                next,
                ip: Some(addr),
                mapped,
            };
            if let Some((port, lifetime)) = mapped {
                self.on_mapping(now, port, lifetime, Some(addr));
            }
        }
    }

    fn on_mapping(&mut self, now: Instant, port: u16, lifetime: u32, ip: Option<Ipv4Addr>) {
        match self.phase {
            Phase::Deleting { .. } => {
                // The answer to our deletion (lifetime 0), or a late one
                // to a renewal: either way, ask once more only if needed.
                if lifetime == 0 {
                    self.phase = Phase::Done;
                }
            }
            Phase::Asking {
                proto,
                tries,
                next,
                ip: known,
                ..
            } => {
                let Some(ip) = ip.or(known) else {
                    // NAT-PMP: the address answer is still to come.
                    self.phase = Phase::Asking {
                        proto,
                        tries,
                        next,
                        ip: None,
                        mapped: Some((port, lifetime)),
                    };
                    return;
                };
                self.granted(now, proto, SocketAddrV4::new(ip, port), lifetime);
            }
            Phase::Mapped {
                proto, external, ..
            } => {
                let ip = ip.unwrap_or(*external.ip());
                self.granted(now, proto, SocketAddrV4::new(ip, port), lifetime);
            }
            Phase::Idle | Phase::Done => {}
        }
    }

    /// The gateway granted `external` for `lifetime` seconds.
    fn granted(&mut self, now: Instant, proto: Protocol, external: SocketAddrV4, lifetime: u32) {
        if !usable(*external.ip()) || external.port() == 0 || lifetime == 0 {
            let why = format!("it answered an unusable mapping {external} for {lifetime} s");
            // Whatever it holds for us must not stay.
            self.delete_request(proto);
            let was_mapped = matches!(self.phase, Phase::Mapped { .. });
            self.phase = Phase::Asking {
                proto,
                tries: TRIES,
                next: now,
                ip: None,
                mapped: None,
            };
            if was_mapped {
                self.events.push_back(MapEvent::Lost { why: why.clone() });
            }
            return self.give_up(now, proto, why);
        }
        let known = self.mapped().map(|(_, e)| e);
        let life = Duration::from_secs(u64::from(lifetime.max(MIN_LIFETIME)));
        self.phase = Phase::Mapped {
            proto,
            external,
            expires: now + life,
            next: now + life / 2,
            tries: 0,
        };
        if known != Some(external) {
            self.events.push_back(MapEvent::Mapped {
                protocol: proto,
                external,
                lifetime,
            });
        }
    }

    /// Clean exit: delete the mapping (lifetime 0), bounded by
    /// [`DELETE_TRIES`]; [`PortMapper::is_done`] says when it is over. A
    /// request still unanswered may have created one: it is deleted too.
    pub fn shutdown(&mut self, now: Instant) {
        let proto = match self.phase {
            Phase::Asking { .. } if !self.heard => {
                self.phase = Phase::Done;
                return;
            }
            Phase::Mapped { proto, .. } | Phase::Asking { proto, .. } => proto,
            Phase::Deleting { .. } => return,
            Phase::Idle | Phase::Done => {
                self.phase = Phase::Done;
                return;
            }
        };
        self.phase = Phase::Deleting {
            proto,
            tries: 0,
            next: now,
        };
        self.handle_timeout(now);
    }
}

enum Answer {
    Junk,
    Refused(String),
    /// NAT-PMP's external address.
    Address(Ipv4Addr),
    /// A mapping of our port to `port` (PCP says the address too).
    Mapping {
        port: u16,
        lifetime: u32,
        ip: Option<Ipv4Addr>,
    },
}
