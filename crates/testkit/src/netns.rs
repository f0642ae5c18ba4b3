//! Named network namespaces owned by a test. Creating one is the only way the
//! tests get a place to put links, addresses and rules: nothing goes into the
//! machine's root namespace.

use std::fs::File;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use nix::sched::{setns, CloneFlags};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name that is unique across parallel tests and test binaries: prefix,
/// pid and a per-process counter. Kept short because derived interface names
/// are limited to 15 bytes.
pub fn unique_name(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{}x{n}", std::process::id() % 100_000)
}

/// Runs a command and panics with its output if it fails: for test set-up
/// steps that must not fail silently.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `f` inside the network namespace at `path` and returns its result.
///
/// `setns` changes the namespace of the calling *thread* only, for good: so
/// `f` runs on a fresh thread that does nothing else and ends with it, and the
/// caller's thread never leaves its namespace. Sockets created by `f` stay
/// in the namespace they were created in wherever they are used afterwards,
/// which is how a test drives traffic of many namespaces from one thread.
/// A panic in `f` is re-raised in the caller.
pub fn run_in_netns_path<T, F>(path: &Path, f: F) -> T
where
    F: FnOnce() -> T + Send,
    T: Send,
{
    let ns = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    std::thread::scope(|s| {
        let handle = s.spawn(move || {
            setns(&ns, CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("setns {}: {e}", path.display()));
            drop(ns);
            f()
        });
        match handle.join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// A named netns (`ip netns add`), deleted on drop. Links inside it vanish
/// with it; veth peers in other namespaces vanish too.
pub struct Netns {
    name: String,
    /// Deleted on drop; false for a handle on a namespace someone else
    /// owns (a NAT lab node used as a cluster node).
    owned: bool,
}

impl Netns {
    /// Creates `<prefix><pid>x<n>` with loopback up.
    pub fn new(prefix: &str) -> Netns {
        let name = unique_name(prefix);
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name, owned: true };
        ns.ok(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// A handle on an existing namespace that its owner deletes: dropping
    /// it does nothing.
    pub fn borrowed(name: &str) -> Netns {
        Netns {
            name: name.to_string(),
            owned: false,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/NAME`: what CNI_NETNS points at.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// A command that will run inside this namespace. `nsenter --net` rather
    /// than `ip netns exec`: the latter remounts /sys, which breaks programs
    /// (podman) that need the host's cgroup view.
    pub fn command(&self, argv: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", self.path().display()))
            .arg("--")
            .args(argv);
        c
    }

    /// Runs `f` on a dedicated thread inside this namespace; see
    /// [`run_in_netns_path`].
    pub fn run<T, F>(&self, f: F) -> T
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        run_in_netns_path(&self.path(), f)
    }

    /// A UDP socket bound to `addr` inside this namespace.
    pub fn udp_bind(&self, addr: SocketAddr) -> io::Result<UdpSocket> {
        self.run(|| UdpSocket::bind(addr))
    }

    /// A TCP listener bound to `addr` inside this namespace.
    pub fn tcp_listen(&self, addr: SocketAddr) -> io::Result<TcpListener> {
        self.run(|| TcpListener::bind(addr))
    }

    /// A TCP connection to `addr` made from inside this namespace, bounded
    /// by `timeout`.
    pub fn tcp_connect(&self, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
        self.run(|| TcpStream::connect_timeout(&addr, timeout))
    }

    /// Runs `argv` in the namespace; returns its output whatever the status.
    pub fn exec(&self, argv: &[&str]) -> Output {
        self.command(argv)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("spawn {argv:?}: {e}"))
    }

    /// Runs `argv` in the namespace and panics if it fails; returns stdout.
    pub fn ok(&self, argv: &[&str]) -> String {
        let out = run_ok(&mut self.command(argv));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Whether a link of that name exists in the namespace.
    pub fn has_link(&self, name: &str) -> bool {
        self.exec(&["ip", "link", "show", "dev", name])
            .status
            .success()
    }

    /// Names of all links in the namespace (without the `@peer` suffix).
    pub fn links(&self) -> Vec<String> {
        let out = self.ok(&["ip", "-o", "link", "show"]);
        out.lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .collect()
    }

    /// Kills every process still running inside the namespace, so that
    /// deleting it really frees it.
    fn kill_all(&self) {
        let out = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .stdin(Stdio::null())
            .output();
        if let Ok(out) = out {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        self.kill_all();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
