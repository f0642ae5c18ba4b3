//! `evio-node agent`: the overlay of one node (docs/overlay-design.md).
//!
//! [`run`] sets the node up (bridge and the agent's port on it, the host
//! overlay interface, the UDP socket), starts the threads (engine, store,
//! control socket, address watcher) and runs until SIGTERM/SIGINT. A stop
//! keeps the node on the network: the TAP and TUN are persistent, so the
//! host address, its route, the bridge port and the store record stay, and
//! the next agent adopts them (a restart costs the tunnels a handshake,
//! not a teardown). Leaving is explicit (`evio-node agent --stop-and-leave`,
//! the control socket's `leave`): then the port, the devices and the
//! record go.

pub mod cache;
pub mod certs;
pub mod control;
pub mod dataplane;
pub mod device;
pub mod eventfd;
pub mod events;
pub mod explain;
pub mod heap;
pub mod hostroute;
pub mod keys;
pub mod metrics;
pub mod netwatch;
pub mod port;
pub mod portmap;
pub mod retry;
pub mod signal;
pub mod udp;
pub mod upnp;

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use evio_cni::config::NetConf;
use evio_net::Handle;
use evio_overlay::crypto::{b64, Secret};
use evio_overlay::engine::{Overlay, OverlayConfig};
use evio_overlay::tunnel::Identity;
use evio_subnet::{PeerRecord, StoreOptions, StoreUrl};
use ipnet::IpNet;

use crate::cache::Cache;
use crate::dataplane::{Command, Dataplane, Devices};
use crate::device::{Device, Kind};
use crate::eventfd::EventFd;
use evio_overlay::nat::{Nat, NatConfig, TurnServer};
use evio_overlay::stack::Stack;

/// Why the agent could not start or ended. Each failure of a call below
/// keeps that call's error as its source (what it was doing is the
/// message); the variants without a source are the agent's own verdicts.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Config(String),
    /// A key file that exists but must not be used (mode, content).
    #[error("key file {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("key file {path}: {source}")]
    KeyIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The node bridge or the agent's port is not as it must be.
    #[error("node bridge: {0}")]
    Port(String),
    /// The plugin's switch library refused (the bridge, its gateway).
    #[error("node bridge: {what}: {source}")]
    Bridge {
        what: String,
        #[source]
        source: evio_cni::CniError,
    },
    #[error("node bridge: {what}: {source}")]
    Ovsdb {
        what: String,
        #[source]
        source: evio_ovsdb::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("host networking: {what}: {source}")]
    Net {
        what: String,
        #[source]
        source: evio_net::Error,
    },
    /// A device that was there a moment ago is gone.
    #[error("host networking: {0} vanished")]
    Vanished(String),
    #[error("the engine stopped: {0}")]
    EngineDied(#[source] std::io::Error),
    #[error("the engine stopped: it ended on its own")]
    EngineEnded,
}

impl AgentError {
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> AgentError {
        let what = what.into();
        move |source| AgentError::Io { what, source }
    }

    pub fn net(what: impl Into<String>) -> impl FnOnce(evio_net::Error) -> AgentError {
        let what = what.into();
        move |source| AgentError::Net { what, source }
    }

    pub fn ovsdb(what: impl Into<String>) -> impl FnOnce(evio_ovsdb::Error) -> AgentError {
        let what = what.into();
        move |source| AgentError::Ovsdb { what, source }
    }

    pub fn bridge(what: impl Into<String>) -> impl FnOnce(evio_cni::CniError) -> AgentError {
        let what = what.into();
        move |source| AgentError::Bridge { what, source }
    }
}

/// Everything the agent needs, resolved by `evio-node agent` from the
/// network config, the flags and the store. Its `Debug` leaves the secrets
/// out (keys, TURN passwords).
pub struct AgentConfig {
    pub network: String,
    pub node: String,
    /// The plugin's network config (the conflist's `evio` entry), parsed:
    /// the bridge is made from exactly this.
    pub plugin: NetConf,
    pub pod_cidr: IpNet,
    pub pod_subnet: IpNet,
    /// The bridge's gateway with the pod CIDR's prefix.
    pub gateway: IpNet,
    /// The host-overlay address with the host CIDR's prefix: the only
    /// one, or the IPv4 one of a dual-stack host CIDR (the record's
    /// `hostAddress`).
    pub host_addr: Option<IpNet>,
    /// The IPv6 host-overlay address of a dual-stack host CIDR.
    pub host_addr6: Option<IpNet>,
    pub host_interface: String,
    pub tap_name: String,
    pub listen_port: u16,
    pub stun: Vec<SocketAddr>,
    pub turn: Vec<TurnServer>,
    /// `overlay.announce`: candidates published as they are.
    pub announce: Vec<SocketAddr>,
    /// `overlay.natUdpTimeout`: what the punching silence must outlast.
    pub nat_udp_timeout: Duration,
    /// `overlay.portMapping`: ask the default gateway for a mapping.
    pub port_mapping: bool,
    /// `overlay.ipv6`: the IPv6 socket and candidates.
    pub ipv6: bool,
    pub private_key: Secret,
    pub network_key: Option<Secret>,
    /// The second line of a two-key network key file: accepted, not sent.
    pub network_key_also: Option<Secret>,
    pub store_url: StoreUrl,
    pub store_opts: StoreOptions,
    pub control_socket: PathBuf,
    /// The state cache (cache.rs): where it lives and what it holds now.
    pub cache_path: PathBuf,
    pub cache: Cache,
    /// The store did not answer at start: the allocations come from the
    /// cache.
    pub from_cache: bool,
    /// The gateway of an allocation this node held before and lost
    /// (released while it was away): taken off the bridge.
    pub stale_gateway: Option<IpNet>,
    /// `reclaimAfter`: release nodes absent this long.
    pub reclaim_after: Option<Duration>,
}

impl AgentConfig {
    /// Every host-overlay address, the record's `hostAddress` first.
    pub fn host_addrs(&self) -> Vec<IpNet> {
        self.host_addr.into_iter().chain(self.host_addr6).collect()
    }
}

impl std::fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let turn: Vec<String> = self.turn.iter().map(|t| t.server.to_string()).collect();
        f.debug_struct("AgentConfig")
            .field("network", &self.network)
            .field("node", &self.node)
            .field("pod_subnet", &self.pod_subnet)
            .field("host_addr", &self.host_addr)
            .field("host_addr6", &self.host_addr6)
            .field("listen_port", &self.listen_port)
            .field("stun", &self.stun)
            .field("turn", &turn)
            .field("network_key", &self.network_key.is_some())
            .field("store_url", &self.store_url)
            .field("control_socket", &self.control_socket)
            .field("cache_path", &self.cache_path)
            .field("from_cache", &self.from_cache)
            .field("reclaim_after", &self.reclaim_after)
            .finish_non_exhaustive()
    }
}

/// Wakes the engine thread (an eventfd it polls).
#[derive(Clone)]
pub struct Waker(Arc<EventFd>);

impl Waker {
    fn new() -> Result<Waker, AgentError> {
        Ok(Waker(Arc::new(
            EventFd::new().map_err(AgentError::io("eventfd"))?,
        )))
    }

    pub fn wake(&self) {
        self.0.signal();
    }

    fn raw(&self) -> RawFd {
        self.0.raw()
    }
}

/// Tells the helper threads to end: a flag, an eventfd they can poll next
/// to their own file descriptor, and a watch for the async store thread.
/// Nobody wakes up to check it: an idle agent's threads sleep.
pub struct Stop {
    flag: AtomicBool,
    fd: EventFd,
    tx: tokio::sync::watch::Sender<bool>,
}

impl Stop {
    fn new() -> Result<Arc<Stop>, AgentError> {
        let (tx, _) = tokio::sync::watch::channel(false);
        Ok(Arc::new(Stop {
            flag: AtomicBool::new(false),
            fd: EventFd::new().map_err(AgentError::io("eventfd"))?,
            tx,
        }))
    }

    pub fn stop(&self) {
        self.flag.store(true, Ordering::SeqCst);
        self.fd.signal();
        self.tx.send_replace(true);
    }

    pub fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// Becomes readable once [`Stop::stop`] was called.
    pub fn fd(&self) -> RawFd {
        self.fd.raw()
    }

    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<bool> {
        self.tx.subscribe()
    }
}

/// Waits until `fd` is readable or `stop` fires or `timeout` passes;
/// true when `fd` is readable.
pub fn wait_readable(fd: RawFd, stop: &Stop, timeout: Option<Duration>) -> bool {
    wait_either_readable(fd, -1, stop, timeout)
}

/// [`wait_readable`] on two descriptors (`b` negative: none, which poll
/// skips); true when either is readable.
pub fn wait_either_readable(a: RawFd, b: RawFd, stop: &Stop, timeout: Option<Duration>) -> bool {
    let fd = |fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let mut fds = [fd(a), fd(b), fd(stop.fd())];
    let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as libc::c_int);
    // SAFETY: fds is a live array of three pollfd.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 3, ms) };
    n > 0 && (fds[0].revents | fds[1].revents) & libc::POLLIN != 0 && !stop.is_set()
}

/// The handle other threads use to talk to the engine.
#[derive(Clone)]
pub struct EngineHandle {
    pub commands: mpsc::SyncSender<Command>,
    pub waker: Waker,
}

impl EngineHandle {
    /// Queues a command unless the queue is full (the engine is not
    /// draining it: nobody should wait on it then); false if not queued.
    pub fn send(&self, c: Command) -> bool {
        let queued = self.commands.try_send(c).is_ok();
        self.waker.wake();
        queued
    }

    /// Peer `node` in depth from the engine: `None` if the engine does not
    /// answer, `Some(None)` if it has no such peer.
    pub fn explain(&self, node: &str, timeout: Duration) -> Option<Option<explain::Explain>> {
        let (tx, rx) = mpsc::sync_channel(1);
        if !self.send(Command::Explain(node.to_string(), tx)) {
            return None;
        }
        rx.recv_timeout(timeout).ok()
    }

    /// A status snapshot from the engine, or None if it does not answer.
    pub fn snapshot(&self, timeout: Duration) -> Option<dataplane::Snapshot> {
        let (tx, rx) = mpsc::sync_channel(1);
        if !self.send(Command::Status(tx)) {
            return None;
        }
        rx.recv_timeout(timeout).ok()
    }
}

/// What `peers` prints about this node.
#[derive(Debug, Clone)]
pub struct SelfInfo {
    pub node: String,
    pub public_key: String,
    pub host_address: Option<IpNet>,
    /// Every host address, `host_address` first.
    pub host_addresses: Vec<IpNet>,
    pub pod_subnet: IpNet,
    pub listen: SocketAddr,
    pub started: Instant,
}

/// The signal the engine thread sends the main thread when it ends on its
/// own (see [`engine_ended`]).
const ENGINE_ENDED: nix::sys::signal::Signal = nix::sys::signal::Signal::SIGUSR2;

/// Exit code when teardown did not finish in time: systemd and the kubelet
/// see a failure, and the log says what hung.
pub const EXIT_CLEANUP_HUNG: i32 = 3;

/// Blocks SIGTERM, SIGINT, SIGHUP, SIGUSR1 and [`ENGINE_ENDED`] in this
/// thread (and so in every thread spawned after), so the main thread can
/// wait for them.
fn block_signals() -> Result<nix::sys::signal::SigSet, AgentError> {
    use nix::sys::signal::{SigSet, SigmaskHow, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.add(Signal::SIGHUP);
    // The control socket's `leave` (evio-node agent --stop-and-leave).
    set.add(Signal::SIGUSR1);
    set.add(ENGINE_ENDED);
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None)
        .map_err(|e| AgentError::io("block signals")(e.into()))?;
    Ok(set)
}

/// The node's devices: the TAP on the bridge, the host overlay's TUN, and
/// the bridge's MAC (published in the record for the peers' switches).
struct NodeDevices {
    tap: Device,
    tun: Option<Device>,
    bridge_mac: Option<[u8; 6]>,
}

/// Whether `name` is a TUN/TAP device already (a previous agent's).
fn exists_tun(host: &mut Handle, name: &str) -> bool {
    host.link_by_name(name)
        .ok()
        .flatten()
        .is_some_and(|l| l.kind.as_deref() == Some("tun"))
}

/// Opens (or adopts) the TAP and the TUN and plugs the TAP into the
/// bridge; `cleanup` learns what to undo if the start fails.
fn open_devices(
    cfg: &AgentConfig,
    host: &mut Handle,
    cleanup: &mut Cleanup,
) -> Result<NodeDevices, AgentError> {
    let bridge = port::ensure_bridge(host, &cfg.plugin, cfg.gateway)?;
    if let Some(old) = cfg.stale_gateway.filter(|g| *g != cfg.gateway) {
        // The gateway of an allocation this node lost (released while it
        // was away): another node may hold that subnet now.
        match host.del_address(bridge.index, old) {
            Ok(()) => tracing::warn!(gateway = %old, "removed the old gateway from the bridge"),
            Err(e) => tracing::debug!("old gateway {old}: {e}"),
        }
    }
    // Offloads on the TAP only where the bridge's reader takes GSO frames:
    // the kernel's bridge does, OVS's userspace datapath does not.
    let offload = cfg.plugin.bridge_type == evio_cni::config::BridgeType::Linux;
    let adopted = exists_tun(host, &cfg.tap_name);
    let tap = Device::open(&cfg.tap_name, Kind::Tap, offload)
        .map_err(AgentError::io(format!("create TAP {}", cfg.tap_name)))?;
    cleanup.created.push((cfg.tap_name.clone(), !adopted));
    tap.set_persist(true)
        .map_err(AgentError::io(format!("keep TAP {}", cfg.tap_name)))?;
    cleanup.attached = true;
    port::attach(host, &cfg.plugin, &bridge, &cfg.tap_name, adopted)?;
    if adopted {
        tracing::info!(tap = %cfg.tap_name, "adopted the TAP of the previous agent");
    }
    let tun = match cfg.host_addr {
        Some(_) => Some(open_tun(cfg, host, &cfg.host_addrs(), cleanup)?),
        None => None,
    };
    Ok(NodeDevices {
        tap,
        tun,
        bridge_mac: bridge.mac,
    })
}

fn open_tun(
    cfg: &AgentConfig,
    host: &mut Handle,
    addrs: &[IpNet],
    cleanup: &mut Cleanup,
) -> Result<Device, AgentError> {
    let name = &cfg.host_interface;
    let adopted = exists_tun(host, name);
    let t =
        Device::open(name, Kind::Tun, true).map_err(AgentError::io(format!("create {name}")))?;
    cleanup.created.push((name.clone(), !adopted));
    t.set_persist(true)
        .map_err(AgentError::io(format!("keep {name}")))?;
    let link = host
        .link_by_name(name)
        .map_err(AgentError::net(format!("look up {name}")))?
        .ok_or_else(|| AgentError::Vanished(name.to_string()))?;
    host.set_mtu(link.index, cfg.plugin.mtu)
        .map_err(AgentError::net(format!("MTU of {name}")))?;
    // An adopted device may hold an address this node no longer has (its
    // allocation was released while it was away): only ours stays.
    for a in host
        .addresses(Some(link.index))
        .map_err(AgentError::net(format!("addresses of {name}")))?
    {
        let old = addrs
            .iter()
            .any(|addr| a.addr != *addr && addr.trunc().contains(&a.addr.addr()));
        if old && !addrs.contains(&a.addr) {
            tracing::warn!(old = %a.addr, "removed an old host address from {name}");
            let _ = host.del_address(link.index, a.addr);
        }
    }
    // Each address with its prefix, so the kernel routes the prefix here;
    // IPv6 without duplicate address detection: the store made it unique,
    // and a tentative address would not answer for a second.
    for addr in addrs {
        match host.add_address_nodad(link.index, *addr) {
            Ok(()) => {}
            Err(e) if e.is_exists() => {}
            Err(e) => return Err(AgentError::net(format!("address {addr} on {name}"))(e)),
        }
    }
    host.set_up(link.index)
        .map_err(AgentError::net(format!("bring up {name}")))?;
    // The rule for replies to pods: the host address of the pods' family.
    let addr = addrs
        .iter()
        .copied()
        .find(|a| a.addr().is_ipv4() == cfg.pod_cidr.addr().is_ipv4())
        .or(addrs.first().copied());
    if let Some(addr) = addr {
        cleanup.host_rule = Some((addr, cfg.pod_cidr));
        hostroute::install(host, link.index, addr, cfg.pod_cidr, cfg.pod_subnet)?;
    }
    if adopted {
        tracing::info!(device = %name, "adopted the host interface of the previous agent");
    }
    Ok(t)
}

/// The threads of a running agent.
struct Threads {
    engine: std::thread::JoinHandle<std::io::Result<()>>,
    store: std::thread::JoinHandle<()>,
    watch: std::thread::JoinHandle<()>,
    control: std::thread::JoinHandle<()>,
    fwd: std::thread::JoinHandle<()>,
    /// Deletes its mapping before it ends.
    portmap: Option<std::thread::JoinHandle<()>>,
}

/// Runs the agent until SIGTERM/SIGINT (the node stays on the network: its
/// devices, addresses, bridge port and store record remain for the next
/// agent) or a `leave` request (all of that is removed); returns after
/// that.
pub fn run(cfg: AgentConfig) -> Result<(), AgentError> {
    let sigs = block_signals()?;
    let agent = start(&cfg)?;
    let end = wait_for_end(&sigs, &agent.leave);
    teardown(&cfg, agent, end)
}

/// A started agent: what the main thread holds until the end.
struct Running {
    threads: Threads,
    engine: EngineHandle,
    stop: Arc<Stop>,
    leave: Arc<AtomicBool>,
    /// Disarmed once started; kept for `leave`.
    cleanup: Cleanup,
    /// The engine's epoll fd, closed after the engine thread is joined.
    epoll: OwnedFd,
}

/// Opens the devices and the socket, builds the engine and starts the
/// threads; a failure undoes what was created.
fn start(cfg: &AgentConfig) -> Result<Running, AgentError> {
    // SAFETY: plain pthread_self(3).
    let main_thread = unsafe { libc::pthread_self() };
    let started = Instant::now();
    let keys =
        evio_overlay::crypto::StaticKeys::from_private(&mut cfg.private_key.expose().to_owned());
    let public_key = b64(keys.public());
    let mut id = Identity::new(
        keys,
        cfg.network_key.as_ref().map(|k| *k.expose()),
        &cfg.network,
    );
    if let Some(k) = &cfg.network_key_also {
        id = id.also_accepting(*k.expose());
    }

    let mut host = evio_net::Handle::new().map_err(AgentError::net("netlink"))?;
    let mut cleanup = Cleanup {
        plugin: cfg.plugin.clone(),
        tap: cfg.tap_name.clone(),
        attached: false,
        created: Vec::new(),
        armed: true,
        host_rule: None,
    };
    let devices = open_devices(cfg, &mut host, &mut cleanup)?;

    let udp = udp::Udp::bind(cfg.listen_port)
        .map_err(AgentError::io(format!("UDP port {}", cfg.listen_port)))?;
    let listen = SocketAddr::new(IpAddr::from([0, 0, 0, 0]), udp.port());
    let epoll = epoll_create()?;
    // The last known peers first: handshakes go out before the store has
    // answered (or while it does not), and at once: those peers still hold
    // sessions with this node's previous agent and would not initiate.
    let initial = signal::cached_peers(&cfg.cache);
    let bridge_mac = devices.bridge_mac;
    let (dp, engine, cand_std_rx) = build_engine(cfg, id, devices, udp, &epoll, &initial)?;
    // Also through the engine's command path, which tells the NAT layer
    // about the peers' addresses.
    engine.send(Command::Peers(initial.clone()));
    let stop = Stop::new()?;
    let leave = Arc::new(AtomicBool::new(false));
    let me = SelfInfo {
        node: cfg.node.clone(),
        public_key,
        host_address: cfg.host_addr,
        host_addresses: cfg.host_addrs(),
        pod_subnet: cfg.pod_subnet,
        listen,
        started,
    };
    let spawn = Spawn {
        main_thread,
        bridge_mac,
        initial,
        cand_std_rx,
    };
    let threads = spawn_threads(cfg, dp, &engine, &stop, &leave, me, spawn)?;
    cleanup.armed = false;
    tracing::info!(
        node = %cfg.node,
        subnet = %cfg.pod_subnet,
        host = ?cfg.host_addrs().iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        port = listen.port(),
        from_cache = cfg.from_cache,
        took_ms = started.elapsed().as_millis() as u64,
        "agent up"
    );
    Ok(Running {
        threads,
        engine,
        stop,
        leave,
        cleanup,
        epoll,
    })
}

fn epoll_create() -> Result<OwnedFd, AgentError> {
    // SAFETY: plain epoll_create1(2).
    let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if epoll < 0 {
        return Err(AgentError::io("epoll")(std::io::Error::last_os_error()));
    }
    // SAFETY: epoll was just created and is owned here.
    Ok(unsafe { OwnedFd::from_raw_fd(epoll) })
}

type CandidateRx = mpsc::Receiver<Vec<(SocketAddr, evio_subnet::CandidateKind)>>;

/// The engine (overlay core, NAT layer, devices) and the handle that
/// commands it; the receiver gets our candidates when they change.
fn build_engine(
    cfg: &AgentConfig,
    id: Identity,
    devices: NodeDevices,
    udp: udp::Udp,
    epoll: &OwnedFd,
    initial: &[evio_overlay::engine::PeerInfo],
) -> Result<(Dataplane, EngineHandle, CandidateRx), AgentError> {
    let now = Instant::now();
    let mut ocfg = OverlayConfig::new(&cfg.network, cfg.pod_subnet, cfg.plugin.mtu as usize);
    ocfg.host_addr = cfg.host_addr.map(|a| a.addr());
    ocfg.host_addr6 = cfg.host_addr6.map(|a| a.addr());
    ocfg.bridge_mac = devices.bridge_mac;
    ocfg.punch = evio_overlay::punch::PunchConfig::for_udp_timeout(cfg.nat_udp_timeout);
    // Sessions on demand (the core's default): a path quiet for longer than
    // the routers' UDP timeout is proven again when a new session begins.
    ocfg.paths.stale_after = cfg.nat_udp_timeout;
    // Every random draw of the engine comes from this one OS-seeded stream.
    let overlay = Overlay::new(now, ocfg, id, evio_overlay::crypto::os_seed());
    let nat_cfg = NatConfig {
        port: udp.port(),
        stun: cfg.stun.clone(),
        turn: cfg.turn.clone(),
    };
    let udp6 = if cfg.ipv6 {
        bind_v6(nat_cfg.port)
    } else {
        tracing::info!("no IPv6 underlay: overlay.ipv6 is false");
        None
    };
    let nat = Nat::new(now, nat_cfg, evio_overlay::crypto::os_seed());
    let waker = Waker::new()?;
    let (cmd_tx, cmd_rx) = mpsc::sync_channel(dataplane::COMMAND_QUEUE);
    let (cand_std_tx, cand_std_rx) = mpsc::channel();
    let mut stack = Stack::new(overlay, nat);
    stack.set_announced(cfg.announce.clone());
    if !initial.is_empty() {
        // Through the stack, which keeps the peer set: it gives the
        // overlay only the candidates of our address families.
        stack.set_peers(now, initial);
        stack.overlay.hurry(now);
    }
    let dp = Dataplane::new(
        stack,
        Devices::new(udp, Some(devices.tap), devices.tun, epoll.as_raw_fd()).with_v6(udp6),
        cmd_rx,
        waker.raw(),
        cand_std_tx,
    )
    .map_err(AgentError::io("engine set-up"))?;
    let engine = EngineHandle {
        commands: cmd_tx,
        waker,
    };
    Ok((dp, engine, cand_std_rx))
}

/// Stops the threads, within a bounded time, and on `leave` removes the
/// node's devices, port and rule.
fn teardown(cfg: &AgentConfig, agent: Running, end: End) -> Result<(), AgentError> {
    let Running {
        threads,
        engine,
        stop,
        leave: _,
        mut cleanup,
        epoll,
    } = agent;
    // Bounded teardown: whatever hangs, the process exits within 5 s, and
    // says so with its exit code.
    let deadline = Instant::now() + Duration::from_millis(4500);
    std::thread::spawn(move || {
        std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
        tracing::error!("teardown did not finish within 4.5 s; exiting with what is left behind");
        std::process::exit(EXIT_CLEANUP_HUNG);
    });
    stop.stop();
    engine.send(Command::Shutdown);
    let engine_result = threads.engine.join();
    if end == End::Leave {
        // Devices, port and rule go now; the store thread takes the record
        // out meanwhile.
        cleanup.leave();
    }
    let _ = threads.store.join();
    let _ = threads.watch.join();
    let _ = threads.control.join();
    let _ = threads.fwd.join();
    if let Some(t) = threads.portmap {
        let _ = t.join();
    }
    let _ = std::fs::remove_file(&cfg.control_socket);
    drop(epoll);
    match (end, engine_result) {
        (End::Stop | End::Leave, _) => Ok(()),
        (End::EngineEnded, Ok(Err(e))) => Err(AgentError::EngineDied(e)),
        (End::EngineEnded, _) => Err(AgentError::EngineEnded),
    }
}

/// How waiting for the end of the agent ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// SIGTERM/SIGINT/SIGHUP: stop, keep the node on the network.
    Stop,
    /// The control socket's `leave`.
    Leave,
    /// The engine thread ended while nobody had asked it to: the node
    /// stays on the network (a restart adopts it) and the exit is non-zero.
    EngineEnded,
}

/// Waits for a stop signal, the control socket's `leave`, or for the
/// engine thread to end on its own (it signals [`ENGINE_ENDED`] to this
/// thread).
fn wait_for_end(sigs: &nix::sys::signal::SigSet, leave: &AtomicBool) -> End {
    use nix::sys::signal::Signal;
    let leaving = || {
        if leave.load(Ordering::SeqCst) {
            End::Leave
        } else {
            End::Stop
        }
    };
    loop {
        match sigs.wait() {
            Ok(s) if s == ENGINE_ENDED => {
                tracing::warn!("stopping: the engine ended on its own");
                return End::EngineEnded;
            }
            Ok(Signal::SIGUSR1) if leave.load(Ordering::SeqCst) => {
                tracing::info!("leaving the network");
                return End::Leave;
            }
            Ok(Signal::SIGUSR1) => continue,
            Ok(s) => {
                tracing::info!(signal = ?s, "stopping; the node stays on the network");
                return leaving();
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return End::EngineEnded,
        }
    }
}

/// Runs on the engine thread when it ends: an end nobody asked for (an
/// error of its event loop) must not leave a process that publishes its
/// record with no data plane behind it, so it wakes the main thread, which
/// stops and exits non-zero for systemd or the kubelet to restart it.
fn engine_ended(main: libc::pthread_t, result: &std::io::Result<()>) {
    if let Err(e) = result {
        tracing::error!("the engine stopped: {e}");
    }
    // SAFETY: `main` is the live main thread, which outlives this one (it
    // joins it); the signal is blocked there and waited for.
    unsafe { libc::pthread_kill(main, ENGINE_ENDED as libc::c_int) };
}

/// What the threads are started with besides the config.
struct Spawn {
    main_thread: libc::pthread_t,
    bridge_mac: Option<[u8; 6]>,
    initial: Vec<evio_overlay::engine::PeerInfo>,
    cand_std_rx: CandidateRx,
}

fn spawn_threads(
    cfg: &AgentConfig,
    dp: Dataplane,
    engine: &EngineHandle,
    stop: &Arc<Stop>,
    leave: &Arc<AtomicBool>,
    me: SelfInfo,
    spawn: Spawn,
) -> Result<Threads, AgentError> {
    let Spawn {
        main_thread,
        bridge_mac,
        initial,
        cand_std_rx,
    } = spawn;
    let health = Arc::new(Mutex::new(signal::StoreHealth {
        from_cache: cfg.from_cache,
        ..signal::StoreHealth::default()
    }));
    let (cand_tx, cand_rx) = tokio::sync::mpsc::unbounded_channel();
    let fwd = spawn_forwarder(cand_std_rx, cand_tx)?;
    let engine_thread = std::thread::Builder::new()
        .name("evio-engine".into())
        .spawn(move || {
            let r = dp.run();
            engine_ended(main_thread, &r);
            r
        })
        .map_err(AgentError::io("spawn thread"))?;
    let record = own_record(cfg, &me.public_key, bridge_mac);
    let sig = signal::Signalling {
        network: cfg.network.clone(),
        url: cfg.store_url.clone(),
        opts: cfg.store_opts.clone(),
        record,
        own: signal::Own {
            pod_subnet: cfg.pod_subnet,
            host_addr: cfg.host_addr,
            host_addr6: cfg.host_addr6,
        },
        engine: engine.clone(),
        stop: stop.clone(),
        leave: leave.clone(),
        health: health.clone(),
        candidates: cand_rx,
        cache_path: cfg.cache_path.clone(),
        cache: cfg.cache.clone(),
        initial,
        reclaim_after: cfg.reclaim_after,
    };
    let store = std::thread::Builder::new()
        .name("evio-store".into())
        .spawn(move || sig.run())
        .map_err(AgentError::io("spawn thread"))?;
    let portmap = match cfg.port_mapping {
        true => Some(portmap::spawn(
            engine.clone(),
            stop.clone(),
            me.listen.port(),
        )?),
        false => None,
    };
    let watch = spawn_netwatch(cfg, engine, stop, me.listen.port())?;
    let control = control::spawn(
        &cfg.control_socket,
        engine.clone(),
        me,
        health,
        stop.clone(),
        leave.clone(),
    )?;
    Ok(Threads {
        engine: engine_thread,
        store,
        watch,
        control,
        fwd,
        portmap,
    })
}

/// Candidates flow engine -> store thread: a std channel bridged into the
/// store's async world by this thread, which ends with the engine.
fn spawn_forwarder(
    from: CandidateRx,
    to: tokio::sync::mpsc::UnboundedSender<Vec<(SocketAddr, evio_subnet::CandidateKind)>>,
) -> Result<std::thread::JoinHandle<()>, AgentError> {
    std::thread::Builder::new()
        .name("evio-cand".into())
        .spawn(move || {
            while let Ok(c) = from.recv() {
                if to.send(c).is_err() {
                    break;
                }
            }
        })
        .map_err(AgentError::io("spawn thread"))
}

/// The overlay's IPv6 socket on the IPv4 one's port: none where the host
/// has no IPv6 (or the port is taken for IPv6), and the underlay stays
/// IPv4 as before.
fn bind_v6(port: u16) -> Option<udp::Udp> {
    match udp::Udp::bind_v6(port) {
        Ok(u) => Some(u),
        Err(e) => {
            tracing::info!("no IPv6 underlay: [::]:{port}: {e}");
            None
        }
    }
}

/// This node's record as first published (candidates follow from the
/// engine).
fn own_record(cfg: &AgentConfig, public_key: &str, bridge_mac: Option<[u8; 6]>) -> PeerRecord {
    PeerRecord {
        node: cfg.node.clone(),
        public_key: public_key.to_string(),
        host_address: cfg.host_addr.map(|a| a.to_string()),
        // Only with two: one address is `hostAddress` alone, as ever.
        host_addresses: match cfg.host_addr6 {
            Some(_) => cfg.host_addrs().iter().map(|a| a.to_string()).collect(),
            None => Vec::new(),
        },
        pod_subnet: cfg.pod_subnet.to_string(),
        endpoints: Vec::new(),
        candidates: Vec::new(),
        heartbeat: evio_subnet::now_rfc3339(),
        extra: bridge_mac
            .map(|m| {
                let v = serde_json::Value::from(evio_overlay::packet::fmt_mac(&m));
                serde_json::Map::from_iter([(signal::BRIDGE_MAC.to_string(), v)])
            })
            .unwrap_or_default(),
    }
}

/// The thread that follows the host's addresses, minus evio's own devices
/// and networks.
fn spawn_netwatch(
    cfg: &AgentConfig,
    engine: &EngineHandle,
    stop: &Arc<Stop>,
    listen: u16,
) -> Result<std::thread::JoinHandle<()>, AgentError> {
    let exclude = vec![
        cfg.plugin.bridge.clone(),
        cfg.tap_name.clone(),
        cfg.host_interface.clone(),
    ];
    let mut nets = vec![cfg.pod_cidr];
    nets.extend(cfg.host_addrs().iter().map(IpNet::trunc));
    netwatch::spawn(engine.clone(), stop.clone(), listen, exclude, nets)
}

/// What a failed start undoes, and what leaving removes: the agent's OVS
/// port and its devices. A stop (SIGTERM) leaves all of it in place.
struct Cleanup {
    plugin: NetConf,
    tap: String,
    attached: bool,
    /// Device names, and whether this run created them (a failed start
    /// removes only those; leaving removes all).
    created: Vec<(String, bool)>,
    /// Until the agent is up, dropping this undoes the start.
    armed: bool,
    /// The host-overlay address and pod CIDR of the policy rule installed
    /// (hostroute.rs): it stays with the devices, and goes with them.
    host_rule: Option<(IpNet, IpNet)>,
}

impl Cleanup {
    fn detach(&mut self) {
        if std::mem::take(&mut self.attached) {
            if let Err(e) = port::detach(&self.plugin, &self.tap) {
                tracing::warn!("{e}");
            }
        }
    }

    fn delete(&mut self, only_created: bool) {
        let Ok(mut h) = evio_net::Handle::new() else {
            return;
        };
        if let Some((addr, cidr)) = self.host_rule.take() {
            if let Err(e) = hostroute::remove(&mut h, addr, cidr) {
                tracing::warn!("{e}");
            }
        }
        for (name, created) in std::mem::take(&mut self.created) {
            if only_created && !created {
                continue;
            }
            if let Err(e) = h.delete_link_by_name(&name) {
                tracing::warn!("remove {name}: {e}");
            }
        }
    }

    /// The node leaves: port and devices (with the host address) go.
    fn leave(&mut self) {
        self.detach();
        self.delete(false);
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if self.armed {
            self.detach();
            self.delete(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The engine thread's end reaches the main thread's wait as an end of
    /// its own, not as a stop signal, and not never.
    #[test]
    fn an_engine_that_ends_wakes_the_main_thread() {
        let sigs = block_signals().unwrap();
        // SAFETY: plain pthread_self(3).
        let me = unsafe { libc::pthread_self() };
        let t = std::thread::spawn(move || {
            engine_ended(me, &Err(std::io::Error::other("epoll broke")));
        });
        assert_eq!(
            wait_for_end(&sigs, &AtomicBool::new(false)),
            End::EngineEnded
        );
        t.join().unwrap();
    }
}
