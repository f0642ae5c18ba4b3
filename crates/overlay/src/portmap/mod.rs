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
//!
//! A gateway that reboots forgets the mapping while peers still aim at it.
//! Every answer carries the server's epoch (seconds since it started or
//! lost its state): one that does not advance with our own clock (RFC 6887
//! 8.5, RFC 6886 3.6) means the mapping is gone, and it is asked for again
//! at once. The caller also feeds the servers' multicast restart
//! announcements into [`PortMapper::handle_announcement`], so a reboot is
//! noticed when the gateway is back, not at the next renewal.

pub mod natpmp;
pub mod pcp;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

/// Where PCP and NAT-PMP servers listen.
pub const SERVER_PORT: u16 = 5351;
/// Where their unsolicited announcements go (RFC 6887 14.1.3, RFC 6886
/// 3.2.1), to [`ANNOUNCE_GROUP`].
pub const ANNOUNCE_PORT: u16 = 5350;
/// All hosts on the link.
pub const ANNOUNCE_GROUP: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 1);
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
/// Announcements carry no nonce: any host on the LAN can send one from
/// the gateway's address. So one makes us act (renew, or ask again) at
/// most once per this long, later ones bringing the next renewal forward
/// to the gap's end (deferred, not dropped: a real reboot right after a
/// restart is still seen). Likewise a lost state, whatever told us: a
/// withdrawn and republished candidate at most once per gap.
const ANNOUNCE_RENEW_GAP: Duration = Duration::from_secs(10);
/// A granted lifetime below this is renewed as if it were this long:
/// a gateway answering 0 or 1 s must not make us spin.
const MIN_LIFETIME: u32 = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Pcp,
    NatPmp,
}

impl Protocol {
    fn index(self) -> usize {
        match self {
            Protocol::Pcp => 0,
            Protocol::NatPmp => 1,
        }
    }

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
    /// The mapping is gone (a renewal was refused or never answered, or
    /// the gateway lost its state): withdraw the candidate. A new attempt
    /// follows at once.
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
    /// Announcements taken from the gateway.
    pub announcements: u64,
    /// When an announcement last made us act (or is due to).
    announce_renewed: Option<Instant>,
    /// When the gateway was last found to have lost its state.
    lost_at: Option<Instant>,
    /// Per protocol: the server epoch last heard from the gateway and when
    /// (its servers may keep apart epochs, so each is checked alone).
    epochs: [Option<(u32, Instant)>; 2],
    /// The external port to suggest when asking: the last one granted, so
    /// a gateway that lost its state gives the same back if it can, and
    /// the address peers know is valid again.
    suggest: u16,
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
        let cfg_port = cfg.internal_port;
        let mut m = PortMapper {
            cfg,
            nonce,
            phase: Phase::Idle,
            pcp_why: None,
            out: VecDeque::new(),
            events: VecDeque::new(),
            junk: 0,
            announcements: 0,
            announce_renewed: None,
            lost_at: None,
            epochs: [None; 2],
            suggest: cfg_port,
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
        let port = self.suggest;
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
        let (answer, epoch) = match proto {
            Protocol::Pcp => self.pcp_answer(data),
            Protocol::NatPmp => self.natpmp_answer(data),
        };
        self.heard |= !matches!(answer, Answer::Junk);
        if let (Some(e), false) = (epoch, matches!(answer, Answer::Junk)) {
            // A refusal ends the mapping anyway (below).
            if let (Epoch::Lost(why), false) = (
                self.epoch(now, proto, e),
                matches!(answer, Answer::Refused(_)),
            ) {
                self.state_lost(now, why);
            }
        }
        match answer {
            Answer::Junk => self.junk += 1,
            Answer::Refused(why) => self.refused(now, proto, why),
            Answer::Address(ip) => self.on_address(now, ip),
            Answer::Mapping { port, lifetime, ip } => self.on_mapping(now, port, lifetime, ip),
        }
    }

    /// The answer, and the server epoch it carries.
    fn pcp_answer(&self, data: &[u8]) -> (Answer, Option<u32>) {
        if pcp::is_natpmp_version_error(data) {
            let refused = Answer::Refused("the gateway speaks NAT-PMP only".into());
            return (refused, None);
        }
        let Some(r) = pcp::parse_map_response(data) else {
            return (Answer::Junk, None);
        };
        (self.pcp_map_answer(&r), Some(r.epoch))
    }

    fn pcp_map_answer(&self, r: &pcp::MapResponse) -> Answer {
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

    fn natpmp_answer(&self, data: &[u8]) -> (Answer, Option<u32>) {
        match natpmp::parse_response(data) {
            Some(r) => (self.natpmp_response(r), Some(r.epoch())),
            None => (Answer::Junk, None),
        }
    }

    fn natpmp_response(&self, r: natpmp::Response) -> Answer {
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
        } else if let Phase::Mapped {
            proto: Protocol::NatPmp,
            external,
            ..
        } = self.phase
        {
            // Asked after an announcement: the mapping's address moved.
            if addr != *external.ip() {
                let why = format!("nat-pmp: the gateway's external address is now {addr}");
                self.state_lost(now, why);
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
        self.suggest = external.port();
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

    /// Checks `epoch`, heard from the gateway's `proto` server at `now`,
    /// against the one heard before, and keeps it for the next check.
    fn epoch(&mut self, now: Instant, proto: Protocol, epoch: u32) -> Epoch {
        let Some((prev, at)) = self.epochs[proto.index()].replace((epoch, now)) else {
            return Epoch::First;
        };
        match epoch_lost(proto, prev, epoch, now.saturating_duration_since(at)) {
            true => Epoch::Lost(format!(
                "{}: the gateway lost its mappings (epoch {epoch} s, {prev} s before)",
                proto.as_str()
            )),
            false => Epoch::Consistent,
        }
    }

    /// The gateway forgot what it held for us: whatever we have or were
    /// told is void, so ask again at once, same protocol (the answer in
    /// hand, parsed as one of its, may still complete the new request).
    fn state_lost(&mut self, now: Instant, why: String) {
        if let Some(t) = self
            .lost_at
            .filter(|t| now.saturating_duration_since(*t) < ANNOUNCE_RENEW_GAP)
        {
            // Again so soon: a renewal at the gap's end checks once more.
            self.renew_by(t + ANNOUNCE_RENEW_GAP);
            return;
        }
        match self.phase {
            Phase::Mapped { proto, .. } => {
                self.lost_at = Some(now);
                self.events.push_back(MapEvent::Lost { why });
                self.pcp_why = None;
                self.ask(now, proto);
            }
            Phase::Asking { proto, .. } => self.ask(now, proto),
            Phase::Idle | Phase::Deleting { .. } | Phase::Done => {}
        }
    }

    /// A datagram from `from` on the caller's announcement socket
    /// ([`ANNOUNCE_GROUP`]:[`ANNOUNCE_PORT`]): a PCP ANNOUNCE or a NAT-PMP
    /// external address, unsolicited. Taken from the gateway's address
    /// only; as it carries no nonce it is a hint, never a fact: it brings
    /// our next request forward at most once per [`ANNOUNCE_RENEW_GAP`]
    /// (a renewal, plus NAT-PMP's address request; a new try when asking
    /// or idle), and what the *answers* say (their epoch, the address)
    /// decides whether the mapping was lost. Neither its epoch nor its
    /// address is believed or kept.
    pub fn handle_announcement(&mut self, now: Instant, from: SocketAddr, data: &[u8]) {
        // Any source port: servers differ in which socket they send from.
        if from.ip() != IpAddr::V4(self.cfg.gateway) {
            self.junk += 1;
            return;
        }
        let announced = pcp::parse_announce(data).is_some()
            || matches!(
                natpmp::parse_response(data),
                Some(natpmp::Response::Address {
                    result: natpmp::SUCCESS,
                    ..
                })
            );
        if !announced {
            self.junk += 1;
            return;
        }
        self.announcements += 1;
        if let Some(last) = self
            .announce_renewed
            .filter(|t| now.saturating_duration_since(*t) < ANNOUNCE_RENEW_GAP)
        {
            self.renew_by(last + ANNOUNCE_RENEW_GAP);
            return;
        }
        self.announce_renewed = Some(now);
        match self.phase {
            // Whatever it says: a server may also restart and forget its
            // mappings without resetting its epoch (miniupnpd with
            // `system_uptime=yes`, its sample config). The renewal puts a
            // forgotten mapping back, its answer's epoch tells a reboot,
            // and NAT-PMP's address answer a new external address.
            Phase::Mapped { proto: held, .. } => {
                if held == Protocol::NatPmp {
                    self.out.push_back(natpmp::address_request().to_vec());
                }
                self.renew_by(now);
                self.handle_timeout(now);
            }
            // A server that just came up (or back): no need to wait for
            // the next try, or for the caller's retry after giving up.
            Phase::Asking { proto, .. } => self.ask(now, proto),
            Phase::Idle => self.restart(now),
            Phase::Deleting { .. } | Phase::Done => {}
        }
    }

    /// Brings a held mapping's next renewal forward to `when` at the
    /// latest.
    fn renew_by(&mut self, when: Instant) {
        if let Phase::Mapped { next, tries, .. } = &mut self.phase {
            if when < *next {
                *next = when;
                *tries = 0;
            }
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

/// What an epoch says.
enum Epoch {
    /// Nothing to compare it with.
    First,
    Consistent,
    /// The server lost its state, and why we think so.
    Lost(String),
}

/// Whether a server whose epoch was `prev` and is `curr`, `elapsed` later
/// by our clock, lost its state in between. Whole seconds, as the RFCs
/// count; `elapsed` is capped so that the sums cannot overflow.
pub fn epoch_lost(proto: Protocol, prev: u32, curr: u32, elapsed: Duration) -> bool {
    let (prev, curr) = (i64::from(prev), i64::from(curr));
    let client = elapsed.as_secs().min(u64::from(u32::MAX)) as i64;
    match proto {
        // RFC 6887 8.5: back by more than a second (a reordered answer may
        // be one behind), or the two clocks' advance differs by more than
        // 2 s plus 1/16 of it, either way.
        Protocol::Pcp => {
            let server = curr - prev;
            curr < prev - 1
                || client + 2 < server - server / 16
                || server + 2 < client - client / 16
        }
        // RFC 6886 3.6: more than 2 s behind the previous epoch plus 7/8
        // of the time that passed here.
        Protocol::NatPmp => curr < prev + client * 7 / 8 - 2,
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
