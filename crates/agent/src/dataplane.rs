//! The engine thread: one epoll loop over the TAP, the host TUN, the UDP
//! socket, the TURN TCP sockets and a command eventfd. It owns the overlay
//! state machine; everything on the data path happens here, in batches:
//! a TAP read yields a 64 KiB super-frame that leaves as one GSO send, a
//! `recvmmsg` yields runs of datagrams whose frames are coalesced back into
//! super-frames before they are written to the TAP.
//!
//! When idle it sleeps until the overlay's or the NAT layer's next timer:
//! no periodic wake-up of its own.

use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::mpsc::{Receiver, Sender, SyncSender};
use std::time::{Duration, Instant, SystemTime};

use evio_overlay::engine::{Io, Overlay, PeerInfo, PeerStatus, Stats, MAX_FRAME};
use evio_overlay::offload::{complete_checksum, Coalescer, Csum, Framing, VnetHdr, VNET_HDR_LEN};
use evio_overlay::path::{PathAddr, Via};

use crate::device::Device;
use crate::nat::{Nat, TurnState, TurnTransport};
use crate::udp::{RecvBatch, SendBatch, Udp};

const TOKEN_EVENT: u64 = 1;
const TOKEN_UDP: u64 = 2;
const TOKEN_TAP: u64 = 3;
const TOKEN_TUN: u64 = 4;
const TOKEN_TCP: u64 = 100;
/// Frames read from a device per wake-up before the socket gets a turn.
const DEVICE_BUDGET: usize = 64;
const RECV_BATCH: usize = 32;
/// Datagrams taken from the socket per wake-up (GRO runs count each of
/// theirs): past it the devices, the commands and the timers get their turn
/// before the socket's next, so a datagram flood cannot starve them. The
/// descriptors are level-triggered: what is left is read on the next round.
const UDP_BUDGET: usize = 1024;
/// Commands waiting for the engine: a bound, not a queue that grows while
/// the engine is busy.
pub const COMMAND_QUEUE: usize = 64;

/// What the other threads ask of the engine.
pub enum Command {
    Peers(Vec<PeerInfo>),
    /// Local-interface candidates (from the address watcher).
    LocalCandidates(Vec<SocketAddr>),
    Status(SyncSender<Snapshot>),
    Shutdown,
}

/// Everything `peers` and the metrics need, taken in one go.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub peers: Vec<PeerStatus>,
    pub stats: Stats,
    pub candidates: Vec<(SocketAddr, evio_subnet::CandidateKind)>,
    pub turn: Vec<(SocketAddr, TurnTransport, TurnState)>,
    pub udp_dropped: u64,
    pub nat_junk: u64,
    pub learned_macs: usize,
    pub taken: Instant,
}

/// Sent to the store thread when our candidates change.
pub type CandidateSink = Sender<Vec<(SocketAddr, evio_subnet::CandidateKind)>>;

pub struct Dataplane {
    pub overlay: Overlay,
    pub udp: Udp,
    pub tap: Option<Device>,
    pub tun: Option<Device>,
    pub nat: Nat,
    pub commands: Receiver<Command>,
    pub event_fd: RawFd,
    pub epoll: RawFd,
    pub candidates_out: CandidateSink,
    local_candidates: Vec<SocketAddr>,
}

struct Ctx<'a> {
    send: &'a mut SendBatch,
    udp: &'a Udp,
    tap: Option<&'a Device>,
    tun: Option<&'a Device>,
    pod_gro: &'a mut Coalescer,
    host_gro: &'a mut Coalescer,
    nat: &'a mut Nat,
    now: Instant,
    write_errors: &'a mut u64,
}

/// The engine's [`Io`] over the loop's buffers (a macro: the borrows of
/// `self`'s fields must stay disjoint from the overlay's).
macro_rules! ctx {
    ($self:ident, $send:ident, $pod:ident, $host:ident, $errors:ident, $now:expr) => {
        Ctx {
            send: &mut $send,
            udp: &$self.udp,
            tap: $self.tap.as_ref(),
            tun: $self.tun.as_ref(),
            pod_gro: &mut $pod,
            host_gro: &mut $host,
            nat: &mut $self.nat,
            now: $now,
            write_errors: &mut $errors,
        }
    };
}

fn write_dev(dev: &Device, hdr: &VnetHdr, frame: &[u8], errors: &mut u64) {
    if dev.write2(&hdr.to_bytes(), frame).is_err() {
        *errors += 1;
    }
}

fn deliver(
    dev: Option<&Device>,
    gro: &mut Coalescer,
    frame: &mut [u8],
    csum: Csum,
    errors: &mut u64,
) {
    let Some(dev) = dev else { return };
    if dev.offload() {
        gro.push(frame, csum, &mut |h, f| write_dev(dev, h, f, errors));
    } else {
        // The reader of this device cannot take partial checksums (OVS's
        // userspace datapath): finish them here.
        if complete_checksum(frame, csum).is_err() {
            *errors += 1;
            return;
        }
        write_dev(dev, &VnetHdr::default(), frame, errors);
    }
}

impl Ctx<'_> {
    /// End of a receive batch: what the coalescers still hold goes to the
    /// devices.
    fn flush_gro(&mut self) {
        let errors = &mut *self.write_errors;
        let tap = self.tap;
        self.pod_gro.flush(&mut |h, f| {
            if let Some(t) = tap {
                write_dev(t, h, f, errors)
            }
        });
        let tun = self.tun;
        self.host_gro.flush(&mut |h, f| {
            if let Some(t) = tun {
                write_dev(t, h, f, errors)
            }
        });
    }
}

impl Io for Ctx<'_> {
    fn datagram(&mut self) -> &mut [u8] {
        self.send.slot()
    }

    fn commit(&mut self, to: PathAddr, len: usize) {
        match to.via {
            Via::Direct => {
                if self.send.push(to.remote, len) {
                    self.send.flush(self.udp);
                }
            }
            Via::Turn(i) => {
                // Relayed traffic takes the slow path through the TURN
                // client (it frames ChannelData itself).
                let data = &self.send.slot()[..len];
                let copy = data.to_vec();
                self.nat.send_via(self.now, i, to.remote, &copy, self.udp);
            }
        }
    }

    fn pod(&mut self, frame: &mut [u8], csum: Csum) {
        deliver(self.tap, self.pod_gro, frame, csum, self.write_errors);
    }

    fn host(&mut self, packet: &mut [u8], csum: Csum) {
        deliver(self.tun, self.host_gro, packet, csum, self.write_errors);
    }
}

fn wall() -> Duration {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
}

pub fn epoll_add(epoll: RawFd, fd: RawFd, token: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: token,
    };
    // SAFETY: registers a live fd with a valid event struct.
    if unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Dataplane {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        overlay: Overlay,
        udp: Udp,
        tap: Option<Device>,
        tun: Option<Device>,
        nat: Nat,
        commands: Receiver<Command>,
        event_fd: RawFd,
        epoll: RawFd,
        candidates_out: CandidateSink,
    ) -> io::Result<Dataplane> {
        epoll_add(epoll, event_fd, TOKEN_EVENT)?;
        epoll_add(epoll, udp.as_raw_fd(), TOKEN_UDP)?;
        if let Some(t) = &tap {
            epoll_add(epoll, t.as_raw_fd(), TOKEN_TAP)?;
        }
        if let Some(t) = &tun {
            epoll_add(epoll, t.as_raw_fd(), TOKEN_TUN)?;
        }
        Ok(Dataplane {
            overlay,
            udp,
            tap,
            tun,
            nat,
            commands,
            event_fd,
            epoll,
            candidates_out,
            local_candidates: Vec::new(),
        })
    }

    fn publish_candidates(&mut self) {
        let mut all: Vec<(SocketAddr, evio_subnet::CandidateKind)> = self
            .local_candidates
            .iter()
            .map(|a| (*a, evio_subnet::CandidateKind::Local))
            .collect();
        for c in self.nat.candidates() {
            if !all.iter().any(|(a, _)| *a == c.0) {
                all.push(c);
            }
        }
        let _ = self.candidates_out.send(all);
        self.overlay.set_relay_ips(self.nat.relay_ips());
    }

    /// Runs until a Shutdown command; then deletes TURN allocations.
    pub fn run(mut self) -> io::Result<()> {
        let mut recv = RecvBatch::new(RECV_BATCH);
        let mut send = SendBatch::new(1 << 20);
        let mut dev_buf = vec![0u8; VNET_HDR_LEN + MAX_FRAME];
        let mut pod_gro = Coalescer::new(Framing::Ethernet, 8, 65_000);
        let mut host_gro = Coalescer::new(Framing::Ip, 8, 65_000);
        let mut write_errors = 0u64;
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 16];
        let mut nat_wake = Instant::now();
        let mut peer_ips_seen: BTreeSet<IpAddr> = BTreeSet::new();
        loop {
            let now = Instant::now();
            let mut wake = nat_wake;
            if let Some(w) = self.overlay.next_wake() {
                wake = wake.min(w);
            }
            let timeout_ms =
                wake.saturating_duration_since(now).as_millis().min(60_000) as libc::c_int;
            // Round up: waking a millisecond early would spin once more.
            let timeout_ms = if wake > now && timeout_ms == 0 {
                1
            } else {
                timeout_ms
            };
            // SAFETY: events is a live buffer of the stated length.
            let n = unsafe {
                libc::epoll_wait(
                    self.epoll,
                    events.as_mut_ptr(),
                    events.len() as libc::c_int,
                    timeout_ms,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let now = Instant::now();
            let mut shutdown = false;
            for ev in &events[..n as usize] {
                let token = ev.u64;
                let writable = ev.events & libc::EPOLLOUT as u32 != 0;
                let mut ctx = ctx!(self, send, pod_gro, host_gro, write_errors, now);
                match token {
                    TOKEN_EVENT => {
                        let mut v = 0u64;
                        // SAFETY: reads 8 bytes into v.
                        unsafe { libc::read(self.event_fd, (&mut v as *mut u64).cast(), 8) };
                    }
                    TOKEN_UDP => {
                        let ov = &mut self.overlay;
                        let mut taken = 0;
                        while taken < UDP_BUDGET {
                            let got = recv.recv(&self.udp).unwrap_or_default();
                            for i in 0..got {
                                let Some(r) = recv.get(i) else { break };
                                let from = r.from;
                                let seg = r.segment;
                                for d in r.data.chunks(seg) {
                                    taken += 1;
                                    match d.first() {
                                        Some(0x80..=0xff) => {
                                            let _ = ov.from_network(
                                                now,
                                                PathAddr::direct(from),
                                                d,
                                                &mut ctx,
                                            );
                                        }
                                        Some(_) => {
                                            let mut relayed: Vec<(PathAddr, Vec<u8>)> = Vec::new();
                                            ctx.nat.on_udp(now, from, d, &mut |p, data| {
                                                relayed.push((p, data.to_vec()))
                                            });
                                            for (p, data) in relayed {
                                                if data.first().is_some_and(|b| *b >= 0x80) {
                                                    let _ =
                                                        ov.from_network(now, p, &data, &mut ctx);
                                                }
                                            }
                                        }
                                        None => {}
                                    }
                                }
                            }
                            if got < RECV_BATCH {
                                break;
                            }
                        }
                        ctx.flush_gro();
                    }
                    TOKEN_TAP | TOKEN_TUN => {
                        let dev = if token == TOKEN_TAP {
                            self.tap.as_ref()
                        } else {
                            self.tun.as_ref()
                        };
                        let Some(dev) = dev else { continue };
                        for _ in 0..DEVICE_BUDGET {
                            match dev.read(&mut dev_buf) {
                                Ok(Some(len)) if len > VNET_HDR_LEN => {
                                    let Some(hdr) = VnetHdr::parse(&dev_buf[..VNET_HDR_LEN]) else {
                                        continue;
                                    };
                                    let frame = &dev_buf[VNET_HDR_LEN..len];
                                    if token == TOKEN_TAP {
                                        self.overlay.from_pod(now, &hdr, frame, &mut ctx);
                                    } else {
                                        self.overlay.from_host(now, &hdr, frame, &mut ctx);
                                    }
                                }
                                Ok(Some(_)) => continue,
                                Ok(None) | Err(_) => break,
                            }
                        }
                    }
                    t if t >= TOKEN_TCP => {
                        let idx = (t - TOKEN_TCP) as usize;
                        let mut relayed: Vec<(PathAddr, Vec<u8>)> = Vec::new();
                        ctx.nat.on_tcp(now, idx, writable, &mut |p, data| {
                            relayed.push((p, data.to_vec()))
                        });
                        for (p, data) in relayed {
                            if data.first().is_some_and(|b| *b >= 0x80) {
                                let _ = self.overlay.from_network(now, p, &data, &mut ctx);
                            }
                        }
                        ctx.flush_gro();
                        nat_wake = now;
                    }
                    _ => {}
                }
            }
            // Commands.
            while let Ok(cmd) = self.commands.try_recv() {
                match cmd {
                    Command::Peers(peers) => {
                        let ips: BTreeSet<IpAddr> = peers
                            .iter()
                            .flat_map(|p| p.candidates.iter().map(|c| c.addr.ip()))
                            .filter(|ip| !is_private(ip))
                            .collect();
                        if ips != peer_ips_seen {
                            self.nat.set_peer_ips(now, ips.clone());
                            peer_ips_seen = ips;
                        }
                        self.overlay.set_peers(now, &peers);
                    }
                    Command::LocalCandidates(c) => {
                        if c != self.local_candidates {
                            self.local_candidates = c;
                            self.nat.gather_soon(now);
                            nat_wake = now;
                            self.publish_candidates();
                        }
                    }
                    Command::Status(reply) => {
                        let _ = reply.send(Snapshot {
                            peers: self.overlay.status(),
                            stats: self.overlay.stats().clone(),
                            candidates: {
                                let mut v: Vec<_> = self
                                    .local_candidates
                                    .iter()
                                    .map(|a| (*a, evio_subnet::CandidateKind::Local))
                                    .collect();
                                v.extend(self.nat.candidates());
                                v
                            },
                            turn: self.nat.turn_states(),
                            udp_dropped: send.dropped,
                            nat_junk: self.nat.junk,
                            learned_macs: self.overlay.switch_stats().learned_macs,
                            taken: now,
                        });
                    }
                    Command::Shutdown => shutdown = true,
                }
            }
            let now = Instant::now();
            if now >= nat_wake {
                nat_wake = self.nat.poll(now, Some(&self.udp));
            }
            if self.nat.take_changed() {
                self.publish_candidates();
            }
            if self.nat.take_poll_soon() {
                nat_wake = self.nat.poll(Instant::now(), Some(&self.udp));
            }
            let mut ctx = ctx!(self, send, pod_gro, host_gro, write_errors, now);
            if self.overlay.next_wake().is_some_and(|w| now >= w) {
                self.overlay.tick(now, wall(), &mut ctx);
                if self.overlay.take_path_losses() > 0 {
                    // A path died: our public address may have changed.
                    ctx.nat.gather_soon(now);
                    nat_wake = now;
                }
                for i in self.overlay.take_turn_losses() {
                    ctx.nat.renew(now, usize::from(i));
                    nat_wake = now;
                }
            }
            if !send.is_empty() {
                send.flush(&self.udp);
            }
            if shutdown {
                self.nat
                    .shutdown(Instant::now(), &self.udp, Duration::from_millis(1500));
                return Ok(());
            }
        }
    }
}

fn is_private(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => a.is_private() || a.is_loopback() || a.is_link_local(),
        IpAddr::V6(a) => a.is_loopback() || (a.segments()[0] & 0xfe00) == 0xfc00,
    }
}
