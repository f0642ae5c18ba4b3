//! `evio-node agent`: the overlay of one node (docs/overlay-design.md).
//!
//! [`run`] sets the node up (bridge and the agent's port on it, the host
//! overlay interface, the UDP socket), starts the threads (engine, store,
//! control socket, address watcher), waits for SIGTERM/SIGINT and removes
//! what it created on the node: the OVS port, the TAP and TUN devices (and
//! with them the host address and its route), its record in the store.

pub mod control;
pub mod dataplane;
pub mod device;
pub mod hostroute;
pub mod keys;
pub mod metrics;
pub mod netwatch;
pub mod port;
pub mod signal;
pub mod udp;

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use evio_cni::config::NetConf;
use evio_overlay::crypto::{b64, Secret};
use evio_overlay::engine::{Overlay, OverlayConfig};
use evio_overlay::tunnel::Identity;
use evio_subnet::{PeerRecord, StoreOptions, StoreUrl};
use ipnet::IpNet;

use crate::dataplane::{Command, Dataplane, Devices};
use crate::device::{Device, Kind};
use evio_overlay::nat::{Nat, NatConfig, TurnServer};
use evio_overlay::stack::Stack;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Config(String),
    #[error("key file {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("node bridge: {0}")]
    Port(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("host networking: {0}")]
    Net(String),
    #[error("the engine stopped: {0}")]
    EngineDied(String),
}

impl AgentError {
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> AgentError {
        let what = what.into();
        move |source| AgentError::Io { what, source }
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
    /// The host-overlay address with the host CIDR's prefix.
    pub host_addr: Option<IpNet>,
    pub host_interface: String,
    pub tap_name: String,
    pub listen_port: u16,
    pub stun: Vec<SocketAddr>,
    pub turn: Vec<TurnServer>,
    pub private_key: Secret,
    pub network_key: Option<Secret>,
    pub store_url: StoreUrl,
    pub store_opts: StoreOptions,
    pub control_socket: PathBuf,
}

impl std::fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let turn: Vec<String> = self.turn.iter().map(|t| t.server.to_string()).collect();
        f.debug_struct("AgentConfig")
            .field("network", &self.network)
            .field("node", &self.node)
            .field("pod_subnet", &self.pod_subnet)
            .field("host_addr", &self.host_addr)
            .field("listen_port", &self.listen_port)
            .field("stun", &self.stun)
            .field("turn", &turn)
            .field("network_key", &self.network_key.is_some())
            .field("store_url", &self.store_url)
            .field("control_socket", &self.control_socket)
            .finish_non_exhaustive()
    }
}

/// Wakes the engine thread (an eventfd it polls).
#[derive(Clone)]
pub struct Waker(Arc<OwnedFd>);

impl Waker {
    fn new() -> Result<Waker, AgentError> {
        // SAFETY: plain eventfd(2).
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(AgentError::io("eventfd")(std::io::Error::last_os_error()));
        }
        // SAFETY: fd was just created and is owned here.
        Ok(Waker(Arc::new(unsafe { OwnedFd::from_raw_fd(fd) })))
    }

    pub fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64.
        unsafe {
            libc::write(
                std::os::fd::AsRawFd::as_raw_fd(&*self.0),
                (&one as *const u64).cast(),
                8,
            )
        };
    }

    fn raw(&self) -> RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&*self.0)
    }
}

/// Tells the helper threads to end: a flag, an eventfd they can poll next
/// to their own file descriptor, and a watch for the async store thread.
/// Nobody wakes up to check it: an idle agent's threads sleep.
pub struct Stop {
    flag: AtomicBool,
    fd: OwnedFd,
    tx: tokio::sync::watch::Sender<bool>,
}

impl Stop {
    fn new() -> Result<Arc<Stop>, AgentError> {
        // SAFETY: plain eventfd(2).
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(AgentError::io("eventfd")(std::io::Error::last_os_error()));
        }
        let (tx, _) = tokio::sync::watch::channel(false);
        Ok(Arc::new(Stop {
            flag: AtomicBool::new(false),
            // SAFETY: fd was just created and is owned here.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            tx,
        }))
    }

    pub fn stop(&self) {
        self.flag.store(true, Ordering::SeqCst);
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64.
        unsafe {
            libc::write(
                std::os::fd::AsRawFd::as_raw_fd(&self.fd),
                (&one as *const u64).cast(),
                8,
            )
        };
        self.tx.send_replace(true);
    }

    pub fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// Becomes readable once [`Stop::stop`] was called.
    pub fn fd(&self) -> RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.fd)
    }

    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<bool> {
        self.tx.subscribe()
    }
}

/// Waits until `fd` is readable or `stop` fires or `timeout` passes;
/// true when `fd` is readable.
pub fn wait_readable(fd: RawFd, stop: &Stop, timeout: Option<Duration>) -> bool {
    let mut fds = [
        libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as libc::c_int);
    // SAFETY: fds is a live array of two pollfd.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) };
    n > 0 && fds[0].revents & libc::POLLIN != 0 && !stop.is_set()
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
    pub pod_subnet: IpNet,
    pub listen: SocketAddr,
    pub started: Instant,
}

/// The signal the engine thread sends the main thread when it ends on its
/// own (see [`engine_ended`]).
const ENGINE_ENDED: nix::sys::signal::Signal = nix::sys::signal::Signal::SIGUSR1;

/// Exit code when teardown did not finish in time: systemd and the kubelet
/// see a failure, and the log says what hung.
pub const EXIT_CLEANUP_HUNG: i32 = 3;

/// Blocks SIGTERM, SIGINT, SIGHUP and [`ENGINE_ENDED`] in this thread (and
/// so in every thread spawned after), so the main thread can wait for them.
fn block_signals() -> Result<nix::sys::signal::SigSet, AgentError> {
    use nix::sys::signal::{SigSet, SigmaskHow, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.add(Signal::SIGHUP);
    set.add(ENGINE_ENDED);
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None)
        .map_err(|e| AgentError::Net(format!("block signals: {e}")))?;
    Ok(set)
}

/// How waiting for the end of the agent ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    Signal(nix::sys::signal::Signal),
    /// The engine thread ended while nobody had asked it to.
    EngineEnded,
}

/// Waits for a stop signal, or for the engine thread to end on its own
/// (it signals `ENGINE_ENDED` to this thread).
fn wait_for_end(sigs: &nix::sys::signal::SigSet) -> End {
    loop {
        match sigs.wait() {
            Ok(s) if s == ENGINE_ENDED => return End::EngineEnded,
            Ok(s) => return End::Signal(s),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return End::EngineEnded,
        }
    }
}

/// Runs on the engine thread when it ends: an end nobody asked for (an
/// error of its event loop) must not leave a process that publishes its
/// record with no data plane behind it, so it wakes the main thread, which
/// tears down and exits non-zero for systemd or the kubelet to restart it.
fn engine_ended(main: libc::pthread_t, result: &std::io::Result<()>) {
    if let Err(e) = result {
        tracing::error!("the engine stopped: {e}");
    }
    // SAFETY: `main` is the live main thread, which outlives this one (it
    // joins it); the signal is blocked there and waited for.
    unsafe { libc::pthread_kill(main, ENGINE_ENDED as libc::c_int) };
}

/// Runs the agent until SIGTERM/SIGINT; returns after cleaning up.
pub fn run(cfg: AgentConfig) -> Result<(), AgentError> {
    let sigs = block_signals()?;
    // SAFETY: plain pthread_self(3).
    let main_thread = unsafe { libc::pthread_self() };
    let started = Instant::now();
    let keys =
        evio_overlay::crypto::StaticKeys::from_private(&mut cfg.private_key.expose().to_owned());
    let public_key = b64(keys.public());
    let id = Identity::new(
        keys,
        cfg.network_key.as_ref().map(|k| *k.expose()),
        &cfg.network,
    );

    let mut host = evio_net::Handle::new().map_err(|e| AgentError::Net(e.to_string()))?;
    let bridge = port::ensure_bridge(&mut host, &cfg.plugin, cfg.gateway)?;
    // Offloads on the TAP only where the bridge's reader takes GSO frames:
    // the kernel's bridge does, OVS's userspace datapath does not.
    let offload = cfg.plugin.bridge_type == evio_cni::config::BridgeType::Linux;
    let tap = Device::open(&cfg.tap_name, Kind::Tap, offload)
        .map_err(AgentError::io(format!("create TAP {}", cfg.tap_name)))?;
    let mut cleanup = Cleanup {
        plugin: cfg.plugin.clone(),
        tap: cfg.tap_name.clone(),
        attached: false,
        host_rule: None,
    };
    port::attach(&mut host, &cfg.plugin, &bridge, &cfg.tap_name)?;
    cleanup.attached = true;

    let tun = match cfg.host_addr {
        Some(addr) => {
            let t = Device::open(&cfg.host_interface, Kind::Tun, true)
                .map_err(AgentError::io(format!("create {}", cfg.host_interface)))?;
            let link = host
                .link_by_name(&cfg.host_interface)
                .map_err(|e| AgentError::Net(e.to_string()))?
                .ok_or_else(|| AgentError::Net(format!("{} vanished", cfg.host_interface)))?;
            host.set_mtu(link.index, cfg.plugin.mtu)
                .map_err(|e| AgentError::Net(format!("MTU of {}: {e}", cfg.host_interface)))?;
            match host.add_address(link.index, addr) {
                Ok(()) => {}
                Err(e) if e.is_exists() => {}
                Err(e) => {
                    return Err(AgentError::Net(format!(
                        "address {addr} on {}: {e}",
                        cfg.host_interface
                    )))
                }
            }
            host.set_up(link.index)
                .map_err(|e| AgentError::Net(format!("bring up {}: {e}", cfg.host_interface)))?;
            cleanup.host_rule = Some((addr, cfg.pod_cidr));
            hostroute::install(&mut host, link.index, addr, cfg.pod_cidr, cfg.pod_subnet)?;
            Some(t)
        }
        None => None,
    };

    let udp = udp::Udp::bind(cfg.listen_port)
        .map_err(AgentError::io(format!("UDP port {}", cfg.listen_port)))?;
    let listen = SocketAddr::new(IpAddr::from([0, 0, 0, 0]), udp.port());
    // SAFETY: plain epoll_create1(2).
    let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if epoll < 0 {
        return Err(AgentError::io("epoll")(std::io::Error::last_os_error()));
    }
    // SAFETY: epoll was just created and is owned here.
    let epoll_owned = unsafe { OwnedFd::from_raw_fd(epoll) };
    let now = Instant::now();
    let mut ocfg = OverlayConfig::new(&cfg.network, cfg.pod_subnet, cfg.plugin.mtu as usize);
    ocfg.host_addr = cfg.host_addr.map(|a| a.addr());
    ocfg.bridge_mac = bridge.mac;
    // Every random draw of the engine comes from this one OS-seeded stream.
    let seed = evio_overlay::crypto::os_seed();
    let overlay = Overlay::new(now, ocfg, id, seed);
    let nat_cfg = NatConfig {
        port: udp.port(),
        stun: cfg.stun.clone(),
        turn: cfg.turn.clone(),
    };
    let nat = Nat::new(now, nat_cfg, evio_overlay::crypto::os_seed());
    let waker = Waker::new()?;
    let (cmd_tx, cmd_rx) = mpsc::sync_channel(dataplane::COMMAND_QUEUE);
    let (cand_tx, cand_rx) = tokio::sync::mpsc::unbounded_channel();
    let (cand_std_tx, cand_std_rx) =
        mpsc::channel::<Vec<(SocketAddr, evio_subnet::CandidateKind)>>();
    let dp = Dataplane::new(
        Stack::new(overlay, nat),
        Devices::new(udp, Some(tap), tun, epoll),
        cmd_rx,
        waker.raw(),
        cand_std_tx,
    )
    .map_err(AgentError::io("engine set-up"))?;
    let engine = EngineHandle {
        commands: cmd_tx,
        waker: waker.clone(),
    };
    let stop = Stop::new()?;
    let health = Arc::new(Mutex::new(signal::StoreHealth::default()));

    // Candidates flow engine -> store thread (std channel bridged into the
    // store's async world by a forwarding thread that ends with the engine).
    let fwd = std::thread::Builder::new()
        .name("evio-cand".into())
        .spawn(move || {
            while let Ok(c) = cand_std_rx.recv() {
                if cand_tx.send(c).is_err() {
                    break;
                }
            }
        })
        .map_err(AgentError::io("spawn thread"))?;
    let engine_thread = std::thread::Builder::new()
        .name("evio-engine".into())
        .spawn(move || {
            let r = dp.run();
            engine_ended(main_thread, &r);
            r
        })
        .map_err(AgentError::io("spawn thread"))?;

    let record = PeerRecord {
        node: cfg.node.clone(),
        public_key: public_key.clone(),
        host_address: cfg.host_addr.map(|a| a.to_string()),
        pod_subnet: cfg.pod_subnet.to_string(),
        endpoints: Vec::new(),
        candidates: Vec::new(),
        heartbeat: evio_subnet::now_rfc3339(),
        extra: bridge
            .mac
            .map(|m| {
                let v = serde_json::Value::from(evio_overlay::packet::fmt_mac(&m));
                serde_json::Map::from_iter([(signal::BRIDGE_MAC.to_string(), v)])
            })
            .unwrap_or_default(),
    };
    let sig = signal::Signalling {
        network: cfg.network.clone(),
        url: cfg.store_url.clone(),
        opts: cfg.store_opts.clone(),
        record,
        commands: engine.commands.clone(),
        waker: waker.clone(),
        stop: stop.clone(),
        health: health.clone(),
        candidates: cand_rx,
    };
    let store_thread = std::thread::Builder::new()
        .name("evio-store".into())
        .spawn(move || sig.run())
        .map_err(AgentError::io("spawn thread"))?;

    let exclude = vec![
        cfg.plugin.bridge.clone(),
        cfg.tap_name.clone(),
        cfg.host_interface.clone(),
    ];
    let mut nets = vec![cfg.pod_cidr];
    if let Some(h) = cfg.host_addr {
        nets.push(h.trunc());
    }
    let watch_thread = netwatch::spawn(engine.clone(), stop.clone(), listen.port(), exclude, nets)?;

    let me = SelfInfo {
        node: cfg.node.clone(),
        public_key,
        host_address: cfg.host_addr,
        pod_subnet: cfg.pod_subnet,
        listen,
        started,
    };
    let control_thread = control::spawn(
        &cfg.control_socket,
        engine.clone(),
        me,
        health.clone(),
        stop.clone(),
    )?;
    tracing::info!(
        node = %cfg.node,
        subnet = %cfg.pod_subnet,
        host = ?cfg.host_addr.map(|a| a.to_string()),
        port = listen.port(),
        "agent up"
    );

    let end = wait_for_end(&sigs);
    tracing::info!(?end, "stopping");
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
    let engine_result = engine_thread.join();
    let _ = store_thread.join();
    let _ = watch_thread.join();
    let _ = control_thread.join();
    let _ = fwd.join();
    let _ = std::fs::remove_file(&cfg.control_socket);
    drop(epoll_owned);
    cleanup.run();
    match (end, engine_result) {
        (End::Signal(_), _) => Ok(()),
        (End::EngineEnded, Ok(Err(e))) => Err(AgentError::EngineDied(e.to_string())),
        (End::EngineEnded, _) => Err(AgentError::EngineDied("it ended on its own".into())),
    }
}

/// What SIGTERM removes; the devices go by themselves when their file
/// descriptors close.
struct Cleanup {
    plugin: NetConf,
    tap: String,
    attached: bool,
    /// The host-overlay address and pod CIDR of the policy rule installed.
    host_rule: Option<(IpNet, IpNet)>,
}

impl Cleanup {
    fn run(&mut self) {
        if std::mem::take(&mut self.attached) {
            if let Err(e) = port::detach(&self.plugin, &self.tap) {
                tracing::warn!("{e}");
            }
        }
        if let Some((addr, cidr)) = self.host_rule.take() {
            let removed = evio_net::Handle::new()
                .map_err(|e| AgentError::Net(e.to_string()))
                .and_then(|mut h| hostroute::remove(&mut h, addr, cidr));
            if let Err(e) = removed {
                tracing::warn!("{e}");
            }
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.run();
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
        assert_eq!(wait_for_end(&sigs), End::EngineEnded);
        t.join().unwrap();
    }
}
