//! host-local's on-disk state, the one reader of it (the plugin's GC and the
//! doctor both call this).
//!
//! host-local keeps, per network, one file per allocated IP in
//! `<dataDir>/<network>/`, named by the IP and holding
//! `<containerID>\r\n<ifname>` (before CNI 0.4 just the container ID),
//! plus `lock` (an flock guards every change) and `last_reserved_ip.N`.
//!
//! The directory is writable by whoever can write the node's CNI state, so
//! nothing in it is trusted to be what it claims: entries are opened with
//! O_NOFOLLOW (a symlink is not followed to a file elsewhere) and O_NONBLOCK
//! (a FIFO does not block the open), accepted only when fstat says regular
//! file, and read up to [`MAX_ENTRY_BYTES`]. Reading `/dev/zero` through a
//! symlink, or a FIFO nobody writes, would otherwise hang GC while it holds
//! host-local's lock, and with it every ADD and DEL of the network.

use std::fs::File;
use std::io::Read;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::{openat, Flock, FlockArg, OFlag};
use nix::sys::stat::Mode;
use nix::unistd::{unlinkat, UnlinkatFlags};
use serde_json::Value;

use crate::error::{code, CniError, Result};
use crate::files::regular;

/// Where host-local keeps its state when the config sets no `dataDir`.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/networks";

/// Largest allocation file read: a container ID (the plugin accepts at most
/// 200 bytes), CRLF and an interface name (15) fit many times over.
pub const MAX_ENTRY_BYTES: u64 = 4096;

/// How long GC waits for host-local's lock. host-local holds it for a few
/// milliseconds per ADD or DEL; a holder past this is stuck, and GC fails
/// with "try again later" rather than hang the runtime's call.
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(10);

/// The directory host-local keeps this network's allocations in.
pub fn network_dir(conf: &Value, network: &str) -> PathBuf {
    let base = conf
        .get("ipam")
        .and_then(|i| i.get("dataDir"))
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .unwrap_or(DEFAULT_DATA_DIR);
    Path::new(base).join(network)
}

/// Who an allocation file says holds the address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Owner {
    /// Empty when the file is empty (host-local killed between creating
    /// and writing it) or not UTF-8.
    pub container_id: String,
    /// `None` in files written before CNI 0.4.
    pub ifname: Option<String>,
}

impl Owner {
    /// Whether this allocation belongs to none of `valid` (container ID,
    /// ifname): the rule GC releases by and the doctor reports by. An
    /// old-format file (no ifname) is kept while any valid attachment has
    /// its container ID.
    pub fn is_stale<'a>(&self, mut valid: impl Iterator<Item = (&'a str, &'a str)>) -> bool {
        match &self.ifname {
            Some(ifname) => !valid.any(|(c, i)| c == self.container_id && i == ifname),
            None => !valid.any(|(c, _)| c == self.container_id),
        }
    }
}

/// The owner in an allocation file's content. Content that is not UTF-8
/// cannot have been written for any attachment (CNI_CONTAINERID and
/// CNI_IFNAME are UTF-8, and host-local writes them verbatim), so it is
/// nobody's, exactly like an empty file: GC releases it and the doctor
/// reports it, both through this function.
pub fn parse_owner(content: &[u8]) -> Owner {
    let Ok(text) = std::str::from_utf8(content) else {
        return Owner::default();
    };
    let mut lines = text.split("\r\n").map(str::trim);
    let container_id = lines.next().unwrap_or("").to_string();
    let ifname = lines.next().filter(|s| !s.is_empty()).map(str::to_string);
    Owner {
        container_id,
        ifname,
    }
}

/// One address host-local holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub ip: IpAddr,
    pub owner: Owner,
}

/// What a listing found.
#[derive(Debug, Default)]
pub struct Listing {
    /// Sorted by IP.
    pub allocations: Vec<Allocation>,
    /// Entries named by an IP that are no allocation file host-local wrote
    /// (a symlink, a FIFO, a device, a directory, an oversized file), with
    /// why. Nothing acts on them.
    pub refused: Vec<(String, String)>,
}

/// A network's host-local directory, held open: every entry is opened
/// relative to it, so replacing the directory (or a parent) by a symlink
/// after it was opened redirects nothing.
#[derive(Debug)]
pub struct NetworkDir {
    fd: OwnedFd,
    path: PathBuf,
}

/// host-local's lock on a [`NetworkDir`], released on drop.
pub struct DirLock {
    _lock: Flock<File>,
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> CniError {
    move |e| CniError::new(code::IO, what).with_details(e.to_string())
}

impl NetworkDir {
    /// Opens `path` without following a symlink in its last component;
    /// `None` if it does not exist (nothing was ever allocated).
    pub fn open(path: &Path) -> Result<Option<NetworkDir>> {
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        match nix::fcntl::open(path, flags, Mode::empty()) {
            Ok(fd) => Ok(Some(NetworkDir {
                fd,
                path: path.to_path_buf(),
            })),
            Err(nix::Error::ENOENT) => Ok(None),
            Err(e) => Err(io_err(format!(
                "open host-local directory {} (a symlink is refused)",
                path.display()
            ))(e.into())),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Takes host-local's lock, waiting at most `timeout` (see
    /// [`LOCK_TIMEOUT`]); past it the error is code 11, try again later.
    pub fn lock(&self, timeout: Duration) -> Result<DirLock> {
        let what = || format!("{}/lock", self.path.display());
        let fd = openat(
            self.fd.as_fd(),
            "lock",
            OFlag::O_RDWR
                | OFlag::O_CREAT
                | OFlag::O_NOFOLLOW
                | OFlag::O_NONBLOCK
                | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o644),
        )
        .map_err(|e| io_err(format!("open {}", what()))(e.into()))?;
        regular(&fd).map_err(|why| CniError::new(code::IO, format!("{} is {why}", what())))?;
        let mut file = File::from(fd);
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(1);
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => return Ok(DirLock { _lock: lock }),
                Err((f, nix::Error::EWOULDBLOCK)) | Err((f, nix::Error::EINTR)) => file = f,
                Err((_, e)) => return Err(io_err(format!("lock {}", what()))(e.into())),
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(CniError::new(
                    code::TRY_AGAIN,
                    format!(
                        "{} has been locked by another process for {timeout:?}: host-local is stuck",
                        what()
                    ),
                ));
            }
            std::thread::sleep(pause.min(deadline - now));
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// The allocation files (entries named by an IP). Other entries (`lock`,
    /// `last_reserved_ip.N`) are not listed.
    pub fn allocations(&self) -> Result<Listing> {
        // The open directory itself, not its path again.
        let proc_path = format!("/proc/self/fd/{}", self.fd.as_raw_fd());
        let entries = std::fs::read_dir(&proc_path)
            .map_err(io_err(format!("list {}", self.path.display())))?;
        let mut out = Listing::default();
        for entry in entries {
            let entry = entry.map_err(io_err(format!("list {}", self.path.display())))?;
            let name = entry.file_name();
            let Some((name, ip)) = name
                .to_str()
                .and_then(|n| Some((n, n.parse::<IpAddr>().ok()?)))
            else {
                continue;
            };
            match self.read_entry(name) {
                Ok(Some(content)) => out.allocations.push(Allocation {
                    ip,
                    owner: parse_owner(&content),
                }),
                // Released between listing and reading.
                Ok(None) => {}
                Err(why) => out.refused.push((name.to_string(), why)),
            }
        }
        out.allocations.sort_by_key(|a| a.ip);
        Ok(out)
    }

    /// The content of one entry: `Ok(None)` if it is gone, `Err(why)` if it
    /// is not a regular file of at most [`MAX_ENTRY_BYTES`].
    fn read_entry(&self, name: &str) -> std::result::Result<Option<Vec<u8>>, String> {
        let fd = match openat(
            self.fd.as_fd(),
            name,
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(nix::Error::ENOENT) => return Ok(None),
            Err(nix::Error::ELOOP) => return Err("a symlink".into()),
            Err(e) => return Err(format!("unreadable: {e}")),
        };
        regular(&fd)?;
        let mut content = Vec::new();
        File::from(fd)
            .take(MAX_ENTRY_BYTES + 1)
            .read_to_end(&mut content)
            .map_err(|e| format!("unreadable: {e}"))?;
        if content.len() as u64 > MAX_ENTRY_BYTES {
            return Err(format!("larger than {MAX_ENTRY_BYTES} bytes"));
        }
        Ok(Some(content))
    }

    /// Removes the allocation of `ip` (hold the lock); `false` if it was
    /// already gone.
    pub fn release(&self, ip: IpAddr) -> Result<bool> {
        let name = ip.to_string();
        match unlinkat(self.fd.as_fd(), name.as_str(), UnlinkatFlags::NoRemoveDir) {
            Ok(()) => Ok(true),
            Err(nix::Error::ENOENT) => Ok(false),
            Err(e) => Err(io_err(format!("remove {}/{name}", self.path.display()))(
                e.into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn owners() {
        let o = parse_owner(b"abc\r\neth0");
        assert_eq!(o.container_id, "abc");
        assert_eq!(o.ifname.as_deref(), Some("eth0"));
        assert_eq!(
            parse_owner(b"abc"),
            Owner {
                container_id: "abc".into(),
                ifname: None
            }
        );
        assert_eq!(parse_owner(b""), Owner::default());
        // Not UTF-8: nobody's, like an empty file, whatever bytes follow.
        assert_eq!(parse_owner(b"ab\xff\r\neth0"), Owner::default());
    }

    #[test]
    fn staleness() {
        let valid: HashSet<(&str, &str)> = [("c1", "eth0")].into_iter().collect();
        let owner = |c: &str, i: Option<&str>| Owner {
            container_id: c.into(),
            ifname: i.map(Into::into),
        };
        assert!(!owner("c1", Some("eth0")).is_stale(valid.iter().copied()));
        assert!(owner("c1", Some("eth1")).is_stale(valid.iter().copied()));
        assert!(!owner("c1", None).is_stale(valid.iter().copied()));
        assert!(owner("c2", None).is_stale(valid.iter().copied()));
        assert!(parse_owner(b"c1\xff\r\neth0").is_stale(valid.iter().copied()));
        assert!(Owner::default().is_stale(valid.iter().copied()));
    }

    #[test]
    fn network_dir_default_and_custom() {
        let v: Value = serde_json::json!({"ipam": {"dataDir": "/tmp/x"}});
        assert_eq!(network_dir(&v, "n"), PathBuf::from("/tmp/x/n"));
        assert_eq!(
            network_dir(&serde_json::json!({}), "n"),
            PathBuf::from("/var/lib/cni/networks/n")
        );
    }

    /// Symlinks (to /dev/zero and to a file elsewhere), a FIFO and an
    /// oversized file are refused without blocking; real files are read.
    /// Before the fix a FIFO hung the listing and /dev/zero filled memory.
    #[test]
    fn hostile_entries_are_refused_without_blocking() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        std::fs::write(p.join("10.0.0.2"), "c1\r\neth0").unwrap();
        std::fs::write(p.join("lock"), "").unwrap();
        std::fs::write(p.join("last_reserved_ip.0"), "10.0.0.2").unwrap();
        std::os::unix::fs::symlink("/dev/zero", p.join("10.0.0.3")).unwrap();
        let outside = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(outside.path(), "c9\r\neth0").unwrap();
        std::os::unix::fs::symlink(outside.path(), p.join("10.0.0.4")).unwrap();
        nix::unistd::mkfifo(&p.join("10.0.0.5"), Mode::from_bits_truncate(0o600)).unwrap();
        std::fs::write(p.join("10.0.0.6"), vec![b'a'; MAX_ENTRY_BYTES as usize + 1]).unwrap();
        std::fs::create_dir(p.join("10.0.0.7")).unwrap();

        let dir = NetworkDir::open(p).unwrap().unwrap();
        // Bounded: a listing that blocks on the FIFO fails the test instead
        // of hanging it.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(dir.allocations().map(|l| (l.allocations, l.refused)));
        });
        let (allocs, refused) = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("listing blocked")
            .unwrap();
        assert_eq!(allocs.len(), 1, "{allocs:?}");
        assert_eq!(allocs[0].owner.container_id, "c1");
        let refused: std::collections::BTreeMap<_, _> = refused.into_iter().collect();
        assert_eq!(refused["10.0.0.3"], "a symlink");
        assert_eq!(refused["10.0.0.4"], "a symlink");
        assert_eq!(refused["10.0.0.5"], "a FIFO");
        assert!(refused["10.0.0.6"].contains("larger than"));
        assert_eq!(refused["10.0.0.7"], "a directory");
        // The file behind the symlink is untouched.
        assert_eq!(std::fs::read(outside.path()).unwrap(), b"c9\r\neth0");
    }

    #[test]
    fn missing_dir_symlinked_dir_and_release() {
        let d = tempfile::tempdir().unwrap();
        assert!(NetworkDir::open(&d.path().join("none")).unwrap().is_none());
        let real = d.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, d.path().join("link")).unwrap();
        let e = NetworkDir::open(&d.path().join("link")).unwrap_err();
        assert_eq!(e.code, code::IO);
        std::fs::write(real.join("10.0.0.2"), "c1\r\neth0").unwrap();
        let dir = NetworkDir::open(&real).unwrap().unwrap();
        let _lock = dir.lock(LOCK_TIMEOUT).unwrap();
        assert!(dir.release("10.0.0.2".parse().unwrap()).unwrap());
        assert!(!dir.release("10.0.0.2".parse().unwrap()).unwrap());
    }

    /// A lock held elsewhere makes `lock` give up with code 11, not wait
    /// for ever (before the fix GC blocked in flock(LOCK_EX)).
    #[test]
    fn held_lock_times_out() {
        let d = tempfile::tempdir().unwrap();
        let dir = NetworkDir::open(d.path()).unwrap().unwrap();
        let holder = dir.lock(LOCK_TIMEOUT).unwrap();
        // flock locks belong to the open file description: a second open
        // of the same file conflicts even within this process.
        let e = dir.lock(Duration::from_millis(50)).err().unwrap();
        assert_eq!(e.code, code::TRY_AGAIN, "{e}");
        drop(holder);
        // Not 50 ms: a delegate forked by another test of this binary
        // while `holder` was open shares its lock until the child's exec.
        dir.lock(LOCK_TIMEOUT).unwrap();
    }
}
