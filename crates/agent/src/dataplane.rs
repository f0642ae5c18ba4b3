//! The engine thread: one epoll loop over the TAP, the host TUN, the UDP
//! socket, the TURN TCP sockets, the UDP sockets of their own that TURN
//! servers may be given (a leftover allocation the server would not release
//! blocks the overlay port) and a command eventfd. The protocol —
//! overlay and NAT layer — is `evio_overlay::stack::Stack`, sans-IO; this
//! module owns only the descriptors and moves bytes between them and the
//! stack, in batches: a TAP read yields a 64 KiB super-frame that leaves as
//! one GSO send, a `recvmmsg` yields runs of datagrams whose frames are
//! coalesced back into super-frames before they are written to the TAP.
//!
//! When idle it sleeps until the stack's next deadline: no periodic
//! wake-up of its own. Each turn of the loop is wait → dispatch → commands
//! → timers → flush.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::mpsc::{Receiver, Sender, SyncSender};
use std::time::{Duration, Instant, SystemTime};

use evio_overlay::engine::{Io, PeerInfo, PeerStatus, Stats, MAX_FRAME};
use evio_overlay::nat::{Sock, Transmit, TurnState, TurnTransport};
use evio_overlay::offload::{complete_checksum, Coalescer, Csum, Framing, VnetHdr, VNET_HDR_LEN};
use evio_overlay::path::{PathAddr, Rank, Via};
use evio_overlay::stack::{NetIo, Stack, StackEvent};

use crate::device::Device;
use crate::events::EventLog;
use crate::explain::Explain;
use crate::signal::kind_of;
use crate::udp::{RecvBatch, SendBatch, Udp};

const TOKEN_EVENT: u64 = 1;
const TOKEN_UDP: u64 = 2;
const TOKEN_TAP: u64 = 3;
const TOKEN_TUN: u64 = 4;
/// The overlay's IPv6 socket.
const TOKEN_UDP6: u64 = 5;
/// Tokens of the TURN TCP connections: this plus the server's index.
const TOKEN_TCP: u64 = 100;
/// Tokens of the TURN servers' own UDP sockets: this plus the server's
/// index (above every TCP token).
const TOKEN_UDP_OWN: u64 = 1 << 32;
/// Tokens of the spare sockets of birthday probing: this plus the index
/// (above every TURN server's own).
const TOKEN_SPARE: u64 = 1 << 48;
/// Spare sockets open at once, at most (a hunt asks for waves of 256, two
/// of them open for a second when the next opens).
const MAX_SPARES: usize = 1024;
/// Frames read from a device per wake-up before the socket gets a turn.
const DEVICE_BUDGET: usize = 64;
const RECV_BATCH: usize = 32;
/// A relay over TCP is the slow path: a backlog beyond this is dropped, as
/// a congested link would.
const TCP_BACKLOG: usize = 4 << 20;
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
    /// The gateway's port mapping for us (portmap.rs), or none any more.
    Mapped(Option<SocketAddr>),
    Status(SyncSender<Snapshot>),
    /// One peer in depth (`peers NODE --explain`).
    Explain(String, SyncSender<Option<Explain>>),
    /// Handshake now with these peers (see `Overlay::wake`).
    Wake(Vec<String>),
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

/// A TCP connection to a TURN server: the stream and what waits to be
/// written (the protocol state is the stack's).
struct TcpConn {
    stream: TcpStream,
    connected: bool,
    tx: Vec<u8>,
    /// Whether EPOLLOUT is asked for (only while connecting or a backlog
    /// waits), so an idle connection never wakes the engine.
    want_out: bool,
}

/// The descriptors and the buffers the stack writes into: the engine's
/// [`NetIo`].
pub struct Devices {
    pub udp: Udp,
    /// The overlay's IPv6 socket on the same port, if the host has IPv6
    /// ([`Devices::with_v6`]); its own batch, as `sendmmsg` takes one
    /// socket.
    pub udp6: Option<Udp>,
    send6: SendBatch,
    pub tap: Option<Device>,
    pub tun: Option<Device>,
    tcp: Vec<Option<TcpConn>>,
    /// UDP sockets of their own, by TURN server index.
    own: Vec<Option<Udp>>,
    /// Spare sockets of birthday probing, by index.
    spares: std::collections::BTreeMap<u32, Udp>,
    send: SendBatch,
    pod_gro: Coalescer,
    host_gro: Coalescer,
    write_errors: u64,
    epoll: RawFd,
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

impl Devices {
    pub fn new(udp: Udp, tap: Option<Device>, tun: Option<Device>, epoll: RawFd) -> Devices {
        Devices {
            udp,
            udp6: None,
            send6: SendBatch::new(1 << 18),
            tap,
            tun,
            tcp: Vec::new(),
            own: Vec::new(),
            spares: std::collections::BTreeMap::new(),
            send: SendBatch::new(1 << 20),
            pod_gro: Coalescer::new(Framing::Ethernet, 8, 65_000),
            host_gro: Coalescer::new(Framing::Ip, 8, 65_000),
            write_errors: 0,
            epoll,
        }
    }

    /// Adds the IPv6 socket.
    pub fn with_v6(mut self, udp6: Option<Udp>) -> Devices {
        self.udp6 = udp6;
        self
    }

    /// Sends what both families' batches hold.
    fn flush_sends(&mut self) {
        if !self.send.is_empty() {
            self.send.flush(&self.udp);
        }
        if let (false, Some(u)) = (self.send6.is_empty(), self.udp6.as_ref()) {
            self.send6.flush(u);
        }
    }

    /// Datagrams the kernel refused, both families.
    fn dropped(&self) -> u64 {
        self.send.dropped + self.send6.dropped
    }

    /// End of a receive batch: what the coalescers still hold goes to the
    /// devices.
    fn flush_gro(&mut self) {
        let errors = &mut self.write_errors;
        let tap = self.tap.as_ref();
        self.pod_gro.flush(&mut |h, f| {
            if let Some(t) = tap {
                write_dev(t, h, f, errors)
            }
        });
        let tun = self.tun.as_ref();
        self.host_gro.flush(&mut |h, f| {
            if let Some(t) = tun {
                write_dev(t, h, f, errors)
            }
        });
    }

    fn conn(&mut self, conn: usize) -> Option<&mut TcpConn> {
        self.tcp.get_mut(conn).and_then(Option::as_mut)
    }

    /// Opens the TCP connection of TURN server `conn` (non-blocking).
    fn connect(&mut self, conn: usize, to: SocketAddr) -> io::Result<()> {
        self.close(conn);
        let stream = connect_nonblocking(to)?;
        epoll_set(
            self.epoll,
            libc::EPOLL_CTL_ADD,
            stream.as_raw_fd(),
            (libc::EPOLLIN | libc::EPOLLOUT) as u32,
            TOKEN_TCP + conn as u64,
        );
        if self.tcp.len() <= conn {
            self.tcp.resize_with(conn + 1, || None);
        }
        self.tcp[conn] = Some(TcpConn {
            stream,
            connected: false,
            tx: Vec::new(),
            want_out: true,
        });
        Ok(())
    }

    fn close(&mut self, conn: usize) {
        if let Some(c) = self.tcp.get_mut(conn).and_then(Option::take) {
            epoll_set(self.epoll, libc::EPOLL_CTL_DEL, c.stream.as_raw_fd(), 0, 0);
        }
    }

    /// Opens a UDP socket on an ephemeral port for TURN server `conn` at
    /// `to` (replacing one it had), of the server's family (an IPv6-only
    /// node's server is an IPv6 one): the local address it is bound to.
    fn open_udp(&mut self, conn: usize, to: SocketAddr) -> io::Result<SocketAddr> {
        self.close_udp(conn);
        let udp = match to {
            SocketAddr::V4(_) => Udp::bind(0)?,
            SocketAddr::V6(_) => Udp::bind_v6(0)?,
        };
        epoll_add(self.epoll, udp.as_raw_fd(), TOKEN_UDP_OWN + conn as u64)?;
        let local = match to {
            SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], udp.port())),
            SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], udp.port())),
        };
        if self.own.len() <= conn {
            self.own.resize_with(conn + 1, || None);
        }
        self.own[conn] = Some(udp);
        Ok(local)
    }

    fn close_udp(&mut self, conn: usize) {
        if let Some(u) = self.own.get_mut(conn).and_then(Option::take) {
            epoll_set(self.epoll, libc::EPOLL_CTL_DEL, u.as_raw_fd(), 0, 0);
        }
    }

    /// The UDP socket `via` names, for `to`'s family, if open.
    fn udp_to(&self, via: Sock, to: SocketAddr) -> Option<&Udp> {
        match (via, to.is_ipv6()) {
            (Sock::Udp, true) => self.udp6.as_ref(),
            _ => self.udp_of(via),
        }
    }

    /// Opens spare sockets `first..first + count` on ephemeral ports: how
    /// many opened (from `first` on, stopping at the first failure).
    fn open_spares(&mut self, first: u32, count: u32) -> u32 {
        let mut n = 0;
        for i in first..first.saturating_add(count) {
            if self.spares.len() >= MAX_SPARES {
                break;
            }
            let Ok(udp) = Udp::bind(0) else { break };
            if epoll_add(self.epoll, udp.as_raw_fd(), TOKEN_SPARE + u64::from(i)).is_err() {
                break;
            }
            self.spares.insert(i, udp);
            n += 1;
        }
        n
    }

    fn close_spares(&mut self, which: &[u32]) {
        for i in which {
            if let Some(u) = self.spares.remove(i) {
                epoll_set(self.epoll, libc::EPOLL_CTL_DEL, u.as_raw_fd(), 0, 0);
            }
        }
    }

    /// The UDP socket `via` names (the IPv4 one for [`Sock::Udp`]), if open.
    fn udp_of(&self, via: Sock) -> Option<&Udp> {
        match via {
            Sock::Udp => Some(&self.udp),
            Sock::UdpOwn(conn) => self.own.get(conn).and_then(Option::as_ref),
            Sock::Spare(i) => self.spares.get(&i),
            Sock::Tcp(_) => None,
        }
    }

    /// Writes what waits on connection `conn`, and asks for EPOLLOUT only
    /// while something is left.
    fn flush_tcp(&mut self, conn: usize) {
        let epoll = self.epoll;
        let Some(c) = self.conn(conn) else { return };
        if !c.connected {
            return;
        }
        let mut done = 0;
        while done < c.tx.len() {
            match c.stream.write(&c.tx[done..]) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        c.tx.drain(..done);
        if c.tx.len() > TCP_BACKLOG {
            c.tx.clear();
        }
        let want = !c.tx.is_empty();
        if want != c.want_out {
            c.want_out = want;
            let ev = libc::EPOLLIN as u32 | if want { libc::EPOLLOUT as u32 } else { 0 };
            let token = TOKEN_TCP + conn as u64;
            epoll_set(epoll, libc::EPOLL_CTL_MOD, c.stream.as_raw_fd(), ev, token);
        }
    }
}

impl Io for Devices {
    fn datagram(&mut self) -> &mut [u8] {
        // Written before `commit` says where it goes: the IPv4 batch's
        // slot, copied into the IPv6 batch when it is for IPv6.
        self.send.slot()
    }

    fn commit(&mut self, to: PathAddr, len: usize) {
        if let Via::Spare(i) = to.via {
            // Rare (a path found by birthday probing): sent alone.
            if let Some(udp) = self.spares.get(&i) {
                let _ = udp.send_to(&self.send.slot()[..len], to.remote);
            }
            return;
        }
        if to.remote.is_ipv6() {
            // Without an IPv6 socket the core has no IPv6 path (it has no
            // IPv6 address): nothing to send it on.
            let Some(u) = self.udp6.as_ref() else { return };
            let len = len.min(crate::udp::SLOT);
            self.send6.slot()[..len].copy_from_slice(&self.send.slot()[..len]);
            if self.send6.push(to.remote, len) {
                self.send6.flush(u);
            }
        } else if self.send.push(to.remote, len) {
            self.send.flush(&self.udp);
        }
    }

    fn pod(&mut self, frame: &mut [u8], csum: Csum) {
        let errors = &mut self.write_errors;
        deliver(self.tap.as_ref(), &mut self.pod_gro, frame, csum, errors);
    }

    fn host(&mut self, packet: &mut [u8], csum: Csum) {
        let errors = &mut self.write_errors;
        deliver(self.tun.as_ref(), &mut self.host_gro, packet, csum, errors);
    }
}

impl NetIo for Devices {
    fn transmit(&mut self, t: Transmit<'_>) {
        match t.via {
            Sock::Udp | Sock::UdpOwn(_) | Sock::Spare(_) => {
                if let Some(udp) = self.udp_to(t.via, t.to) {
                    let _ = udp.send_to(t.data, t.to);
                }
            }
            Sock::Tcp(conn) => {
                if let Some(c) = self.conn(conn) {
                    c.tx.extend_from_slice(t.data);
                }
                self.flush_tcp(conn);
            }
        }
    }
}

fn wall() -> Duration {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
}

fn epoll_set(epoll: RawFd, op: libc::c_int, fd: RawFd, events: u32, token: u64) {
    let mut ev = libc::epoll_event { events, u64: token };
    // SAFETY: ev is a valid epoll_event; errors (e.g. deleting an fd that
    // was never added) are harmless here.
    unsafe {
        libc::epoll_ctl(epoll, op, fd, &mut ev);
    }
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

fn connect_nonblocking(to: SocketAddr) -> io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let sock = Socket::new(Domain::for_address(to), Type::STREAM.cloexec(), None)?;
    sock.set_nonblocking(true)?;
    match sock.connect(&to.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let _ = sock.set_tcp_nodelay(true);
    Ok(sock.into())
}

/// The engine thread's state.
pub struct Dataplane {
    pub stack: Stack,
    pub io: Devices,
    pub commands: Receiver<Command>,
    pub event_fd: RawFd,
    pub epoll: RawFd,
    pub candidates_out: CandidateSink,
    dev_buf: Vec<u8>,
    tcp_buf: Vec<u8>,
    shutdown: bool,
    /// The info-level account of peer events, rate-limited.
    log: EventLog,
}

impl Dataplane {
    pub fn new(
        stack: Stack,
        io: Devices,
        commands: Receiver<Command>,
        event_fd: RawFd,
        candidates_out: CandidateSink,
    ) -> io::Result<Dataplane> {
        let epoll = io.epoll;
        epoll_add(epoll, event_fd, TOKEN_EVENT)?;
        epoll_add(epoll, io.udp.as_raw_fd(), TOKEN_UDP)?;
        if let Some(u) = &io.udp6 {
            epoll_add(epoll, u.as_raw_fd(), TOKEN_UDP6)?;
        }
        for (dev, token) in [(&io.tap, TOKEN_TAP), (&io.tun, TOKEN_TUN)] {
            if let Some(d) = dev {
                epoll_add(epoll, d.as_raw_fd(), token)?;
            }
        }
        Ok(Dataplane {
            stack,
            io,
            commands,
            event_fd,
            epoll,
            candidates_out,
            dev_buf: vec![0u8; VNET_HDR_LEN + MAX_FRAME],
            tcp_buf: vec![0u8; 16 * 1024],
            shutdown: false,
            log: EventLog::default(),
        })
    }

    /// Runs until a Shutdown command; then deletes TURN allocations.
    pub fn run(mut self) -> io::Result<()> {
        // Its buffers hold raw pointers: made on this thread.
        let mut recv = RecvBatch::new(RECV_BATCH);
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 16];
        while !self.shutdown {
            let n = self.wait(&mut events)?;
            let now = Instant::now();
            for ev in &events[..n] {
                let out = ev.events & libc::EPOLLOUT as u32 != 0;
                self.dispatch(now, ev.u64, out, &mut recv);
            }
            self.drain_commands(Instant::now());
            self.timers(Instant::now());
            self.io.flush_sends();
        }
        self.shut_down(Duration::from_millis(1500), &mut recv);
        Ok(())
    }

    /// Sleeps until a descriptor is ready or the stack's next deadline.
    fn wait(&mut self, events: &mut [libc::epoll_event]) -> io::Result<usize> {
        loop {
            let now = Instant::now();
            let wake = self.stack.poll_timeout();
            let ms = wake.saturating_duration_since(now).as_millis().min(60_000) as libc::c_int;
            // Round up: waking a millisecond early would spin once more.
            let ms = if wake > now && ms == 0 { 1 } else { ms };
            // SAFETY: events is a live buffer of the stated length.
            let n = unsafe {
                libc::epoll_wait(
                    self.epoll,
                    events.as_mut_ptr(),
                    events.len() as libc::c_int,
                    ms,
                )
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    fn dispatch(&mut self, now: Instant, token: u64, writable: bool, recv: &mut RecvBatch) {
        match token {
            TOKEN_EVENT => crate::eventfd::drain(self.event_fd),
            TOKEN_UDP => self.on_udp(now, Sock::Udp, false, recv),
            TOKEN_UDP6 => self.on_udp(now, Sock::Udp, true, recv),
            TOKEN_TAP | TOKEN_TUN => self.on_device(now, token == TOKEN_TAP),
            t if t >= TOKEN_SPARE => {
                let i = u32::try_from(t - TOKEN_SPARE).unwrap_or(u32::MAX);
                self.on_udp(now, Sock::Spare(i), false, recv)
            }
            t if t >= TOKEN_UDP_OWN => {
                self.on_udp(now, Sock::UdpOwn((t - TOKEN_UDP_OWN) as usize), false, recv)
            }
            t if t >= TOKEN_TCP => self.on_tcp(now, (t - TOKEN_TCP) as usize, writable),
            _ => {}
        }
    }

    /// Datagrams of UDP socket `via` (`v6`: the overlay's IPv6 one): the
    /// overlay's, or a TURN server's own (the same batches, tagged with
    /// the socket they came on).
    fn on_udp(&mut self, now: Instant, via: Sock, v6: bool, recv: &mut RecvBatch) {
        let mut taken = 0;
        while taken < UDP_BUDGET {
            let udp = match v6 {
                true => self.io.udp6.as_ref(),
                false => self.io.udp_of(via),
            };
            let Some(udp) = udp else {
                break;
            };
            let got = recv.recv(udp).unwrap_or_default();
            for i in 0..got {
                let Some(r) = recv.get(i) else { break };
                let (from, seg) = (r.from, r.segment);
                for d in r.data.chunks(seg) {
                    taken += 1;
                    self.stack
                        .handle_datagram_on(now, via, from, d, &mut self.io);
                }
            }
            if got < RECV_BATCH {
                break;
            }
        }
        self.io.flush_gro();
    }

    fn on_device(&mut self, now: Instant, tap: bool) {
        for _ in 0..DEVICE_BUDGET {
            let dev = if tap {
                self.io.tap.as_ref()
            } else {
                self.io.tun.as_ref()
            };
            let Some(dev) = dev else { return };
            let len = match dev.read(&mut self.dev_buf) {
                Ok(Some(len)) if len > VNET_HDR_LEN => len,
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => return,
            };
            let Some(hdr) = VnetHdr::parse(&self.dev_buf[..VNET_HDR_LEN]) else {
                continue;
            };
            let frame = &self.dev_buf[VNET_HDR_LEN..len];
            if tap {
                self.stack.from_pod(now, &hdr, frame, &mut self.io);
            } else {
                self.stack.from_host(now, &hdr, frame, &mut self.io);
            }
        }
    }

    /// Readiness of the TCP connection of TURN server `conn`.
    fn on_tcp(&mut self, now: Instant, conn: usize, writable: bool) {
        let Some(c) = self.io.conn(conn) else { return };
        if !c.connected {
            if writable {
                self.on_connect(now, conn);
            }
            return;
        }
        if writable {
            self.io.flush_tcp(conn);
        }
        loop {
            let Some(c) = self.io.conn(conn) else { return };
            let why = match c.stream.read(&mut self.tcp_buf) {
                Ok(0) => "the server closed the connection".to_string(),
                Ok(n) => {
                    let data = &self.tcp_buf[..n];
                    self.stack.handle_tcp_bytes(now, conn, data, &mut self.io);
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => e.to_string(),
            };
            self.io.close(conn);
            self.stack.tcp_closed(now, conn, &why, &mut self.io);
            break;
        }
        self.io.flush_gro();
        self.events();
    }

    /// A non-blocking connect finished (or failed).
    fn on_connect(&mut self, now: Instant, conn: usize) {
        let Some(c) = self.io.conn(conn) else { return };
        let local = match c.stream.take_error() {
            Ok(None) => c.stream.local_addr(),
            Ok(Some(e)) | Err(e) => Err(e),
        };
        match local {
            Ok(local) => {
                c.connected = true;
                self.io.flush_tcp(conn);
                self.stack.tcp_connected(now, conn, local, &mut self.io);
            }
            Err(e) => {
                self.io.close(conn);
                self.stack
                    .tcp_closed(now, conn, &e.to_string(), &mut self.io);
            }
        }
        self.events();
    }

    fn drain_commands(&mut self, now: Instant) {
        while let Ok(cmd) = self.commands.try_recv() {
            match cmd {
                Command::Peers(peers) => self.stack.set_peers(now, &peers),
                Command::LocalCandidates(mut c) => {
                    // Without an IPv6 socket (none on the host, the port
                    // taken, or `overlay.ipv6: false`) an IPv6 candidate
                    // would be published that nothing answers on.
                    if self.io.udp6.is_none() {
                        c.retain(SocketAddr::is_ipv4);
                    }
                    self.stack.set_local_candidates(now, c)
                }
                Command::Mapped(m) => self.stack.set_mapped(m),
                Command::Status(reply) => {
                    let _ = reply.send(self.snapshot(now));
                }
                Command::Explain(node, reply) => {
                    let _ = reply.send(self.explain(now, &node));
                }
                Command::Wake(nodes) => self.stack.overlay.wake(now, &nodes),
                Command::Shutdown => self.shutdown = true,
            }
        }
        self.events();
    }

    fn snapshot(&self, now: Instant) -> Snapshot {
        let ov = &self.stack.overlay;
        Snapshot {
            peers: ov.status(),
            stats: ov.stats().clone(),
            candidates: self.kinds(self.stack.candidates()),
            turn: self.stack.nat.turn_states(),
            udp_dropped: self.io.dropped(),
            nat_junk: self.stack.nat.junk,
            learned_macs: ov.switch_stats().learned_macs,
            taken: now,
        }
    }

    /// The kinds we publish our candidates with: the port mapping is a
    /// kind of its own, which the core ranks as direct.
    fn kinds(&self, c: Vec<(SocketAddr, Rank)>) -> Vec<(SocketAddr, evio_subnet::CandidateKind)> {
        let mapped = self.stack.mapped();
        c.into_iter()
            .map(|(a, r)| match Some(a) == mapped {
                true => (a, evio_subnet::CandidateKind::Mapped),
                false => (a, kind_of(r)),
            })
            .collect()
    }

    fn explain(&self, now: Instant, node: &str) -> Option<Explain> {
        let detail = self.stack.overlay.peer_detail(node)?;
        let snap = self.snapshot(now);
        Some(Explain {
            detail,
            ours: snap.candidates,
            turn: snap.turn,
            last_failure: self.log.last_failure.get(node).cloned(),
            last_path: self.log.last_path.get(node).cloned(),
            taken: now,
        })
    }

    /// The TURN servers' addresses, by index.
    fn turn_servers(&self) -> Vec<SocketAddr> {
        (0..)
            .map_while(|i| self.stack.nat.turn_state(i).map(|t| t.0))
            .collect()
    }

    fn timers(&mut self, now: Instant) {
        if now >= self.stack.poll_timeout() {
            self.stack.handle_timeout(now, wall(), &mut self.io);
        }
        self.events();
    }

    /// What the stack asks for: candidates to publish, TCP connections.
    fn events(&mut self) {
        while let Some(e) = self.stack.poll_event() {
            match e {
                StackEvent::Candidates(c) => {
                    let _ = self.candidates_out.send(self.kinds(c));
                }
                StackEvent::TcpConnect { conn, to } => {
                    if let Err(e) = self.io.connect(conn, to) {
                        let now = Instant::now();
                        self.stack
                            .tcp_closed(now, conn, &e.to_string(), &mut self.io);
                    }
                }
                StackEvent::TcpClose { conn } => self.io.close(conn),
                StackEvent::UdpOpen { conn, to } => {
                    let now = Instant::now();
                    match self.io.open_udp(conn, to) {
                        Ok(local) => self.stack.udp_opened(now, conn, local, &mut self.io),
                        Err(e) => self
                            .stack
                            .udp_closed(now, conn, &e.to_string(), &mut self.io),
                    }
                }
                StackEvent::UdpClose { conn } => self.io.close_udp(conn),
                StackEvent::SpareOpen { first, count } => {
                    let n = self.io.open_spares(first, count);
                    let now = Instant::now();
                    self.stack.spares_opened(now, first, n, &mut self.io);
                }
                StackEvent::SpareClose(v) => self.io.close_spares(&v),
                StackEvent::Overlay(e) => {
                    let turn = self.turn_servers();
                    self.log.peer_event(Instant::now(), &e, &turn);
                }
                StackEvent::Turn {
                    server,
                    transport,
                    old,
                    new,
                    ..
                } => self
                    .log
                    .turn_event(Instant::now(), server, transport, &old, &new),
            }
        }
    }

    /// Deletes the allocations and waits, at most `wait`, for the servers
    /// to confirm.
    fn shut_down(&mut self, wait: Duration, recv: &mut RecvBatch) {
        let deadline = Instant::now() + wait;
        self.stack.shutdown(Instant::now(), &mut self.io);
        self.events();
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 16];
        while !self.stack.shut_down() && Instant::now() < deadline {
            let ms = deadline
                .saturating_duration_since(Instant::now())
                .as_millis()
                .clamp(1, 50) as libc::c_int;
            // SAFETY: events is a live buffer of the stated length.
            let n = unsafe {
                libc::epoll_wait(
                    self.epoll,
                    events.as_mut_ptr(),
                    events.len() as libc::c_int,
                    ms,
                )
            };
            let now = Instant::now();
            for ev in &events[..n.max(0) as usize] {
                let (token, out) = (ev.u64, ev.events & libc::EPOLLOUT as u32 != 0);
                // The overlay's socket, and the TURN servers' TCP and UDP.
                if token == TOKEN_UDP || token == TOKEN_UDP6 || token >= TOKEN_TCP {
                    self.dispatch(now, token, out, recv);
                }
            }
            self.timers(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{FromRawFd, OwnedFd};

    /// One socket per family on one port: datagrams for an IPv6 address
    /// (data batches and control sends alike) leave from the IPv6 one,
    /// the rest from the IPv4 one, both from the overlay's port; the
    /// IPv6 socket takes no IPv4 (V6ONLY); without it IPv6 goes nowhere.
    #[test]
    fn each_family_leaves_from_its_own_socket_on_the_overlay_port() {
        // SAFETY: plain epoll_create1(2); owned below.
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        assert!(epoll >= 0);
        // SAFETY: just created, owned here.
        let _owned = unsafe { OwnedFd::from_raw_fd(epoll) };
        let udp = Udp::bind(0).unwrap();
        let port = udp.port();
        let udp6 = Udp::bind_v6(port).unwrap();
        let mut io = Devices::new(udp, None, None, epoll).with_v6(Some(udp6));
        let peer4 = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let peer6 = std::net::UdpSocket::bind("[::1]:0").unwrap();
        for s in [&peer4, &peer6] {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        }
        let recv = |s: &std::net::UdpSocket| {
            let mut buf = [0u8; 64];
            let (n, from) = s.recv_from(&mut buf).unwrap();
            (buf[..n].to_vec(), from)
        };
        for (peer, data) in [(&peer6, &b"over v6"[..]), (&peer4, &b"over v4"[..])] {
            let to = PathAddr::direct(peer.local_addr().unwrap());
            io.datagram()[..data.len()].copy_from_slice(data);
            io.commit(to, data.len());
            io.flush_sends();
            let (got, from) = recv(peer);
            assert_eq!(got, data);
            assert_eq!(
                (from.is_ipv6(), from.port()),
                (peer.local_addr().unwrap().is_ipv6(), port)
            );
            io.transmit(Transmit {
                via: Sock::Udp,
                to: to.remote,
                data: b"stun",
            });
            assert_eq!(recv(peer).0, b"stun");
        }
        // V6ONLY: IPv4 to the port reaches the IPv4 socket, not the v6 one.
        peer4.send_to(b"to v4", ("127.0.0.1", port)).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let mut buf = [0u8; 64];
        assert!(io
            .udp6
            .as_ref()
            .unwrap()
            .recv_from(&mut buf)
            .unwrap()
            .is_none());
        assert_eq!(io.udp.recv_from(&mut buf).unwrap().map(|r| r.0), Some(5));
        // Without the IPv6 socket: dropped, the IPv4 batch untouched.
        io.udp6 = None;
        let to = PathAddr::direct(peer6.local_addr().unwrap());
        io.commit(to, 4);
        assert!(io.send.is_empty() && io.send6.is_empty());
    }

    /// A TURN server's own socket: opened on another port and watched by
    /// epoll under its token, its sends leave from that port, and once
    /// closed it is gone from epoll and sends through it go nowhere.
    /// An IPv6 TURN server's own socket is an IPv6 one (an IPv4 socket
    /// could not send to it).
    #[test]
    fn a_turn_servers_own_socket_is_of_the_servers_family() {
        let Ok(server) = std::net::UdpSocket::bind("[::1]:0") else {
            return; // no IPv6 on this host: nothing to check
        };
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        // SAFETY: plain epoll_create1(2); owned below.
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        assert!(epoll >= 0);
        // SAFETY: just created, owned here.
        let _owned = unsafe { OwnedFd::from_raw_fd(epoll) };
        let mut io = Devices::new(Udp::bind(0).unwrap(), None, None, epoll);
        let to = server.local_addr().unwrap();
        let local = io.open_udp(0, to).unwrap();
        assert!(local.is_ipv6(), "{local}");
        io.transmit(Transmit {
            via: Sock::UdpOwn(0),
            to,
            data: b"allocate",
        });
        let mut buf = [0u8; 64];
        let (n, from) = server.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from.port()), (&b"allocate"[..], local.port()));
    }

    #[test]
    fn a_turn_servers_own_socket_is_opened_watched_used_and_closed() {
        // SAFETY: plain epoll_create1(2); owned below.
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        assert!(epoll >= 0);
        // SAFETY: just created, owned here.
        let _owned = unsafe { OwnedFd::from_raw_fd(epoll) };
        let mut io = Devices::new(Udp::bind(0).unwrap(), None, None, epoll);
        let server = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let to = server.local_addr().unwrap();
        let local = io.open_udp(1, to).unwrap();
        assert_ne!(local.port(), io.udp.port());
        io.transmit(Transmit {
            via: Sock::UdpOwn(1),
            to,
            data: b"allocate",
        });
        let mut buf = [0u8; 64];
        let (n, from) = server.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from.port()), (&b"allocate"[..], local.port()));
        // An answer wakes epoll with the socket's token.
        server.send_to(b"answer", from).unwrap();
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 4];
        // SAFETY: events is a live buffer of the stated length.
        let got = unsafe { libc::epoll_wait(epoll, events.as_mut_ptr(), 4, 5000) };
        assert_eq!(got, 1);
        assert_eq!({ events[0].u64 }, TOKEN_UDP_OWN + 1);
        let mut rb = RecvBatch::new(4);
        assert_eq!(rb.recv(io.udp_of(Sock::UdpOwn(1)).unwrap()).unwrap(), 1);
        assert_eq!(rb.get(0).unwrap().data, b"answer");
        // Closed: out of epoll, and a send through it goes nowhere.
        io.close_udp(1);
        assert!(io.udp_of(Sock::UdpOwn(1)).is_none());
        server.send_to(b"late", from).unwrap();
        // SAFETY: as above.
        let got = unsafe { libc::epoll_wait(epoll, events.as_mut_ptr(), 4, 100) };
        assert_eq!(got, 0);
        io.transmit(Transmit {
            via: Sock::UdpOwn(1),
            to,
            data: b"nothing",
        });
        server
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        assert!(server.recv_from(&mut buf).is_err());
    }
}
