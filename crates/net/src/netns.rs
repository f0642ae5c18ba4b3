use std::marker::PhantomData;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use nix::fcntl::{open, OFlag};
use nix::sched::{setns, CloneFlags};
use nix::sys::stat::Mode;

use crate::{Error, Result};

/// A network namespace, held open by a file descriptor (so it stays valid
/// even if its bind mount is removed meanwhile).
#[derive(Debug)]
pub struct NetnsFd {
    fd: OwnedFd,
}

impl NetnsFd {
    /// Opens a namespace file such as `/run/netns/NAME` or `/proc/PID/ns/net`
    /// (what `CNI_NETNS` points at). A missing path is
    /// [`Error::NetnsNotFound`]; any other file is [`Error::NotNetns`].
    pub fn open(path: &Path) -> Result<NetnsFd> {
        let fd = match open(path, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty()) {
            Ok(fd) => fd,
            Err(nix::Error::ENOENT) => return Err(Error::NetnsNotFound(path.to_path_buf())),
            Err(e) => return Err(Error::nix(format!("open netns {}", path.display()), e)),
        };
        // setns() would reject a non-namespace fd too, but only later and
        // with a bare EINVAL; checking here names the culprit.
        let st = nix::sys::statfs::fstatfs(&fd)
            .map_err(|e| Error::nix(format!("statfs {}", path.display()), e))?;
        if st.filesystem_type() != nix::sys::statfs::NSFS_MAGIC {
            return Err(Error::NotNetns(path.to_path_buf()));
        }
        Ok(NetnsFd { fd })
    }

    /// The namespace of the calling thread (not of the process: after
    /// [`NetnsFd::enter`] they differ).
    pub fn current() -> Result<NetnsFd> {
        NetnsFd::open(Path::new("/proc/thread-self/ns/net"))
    }

    /// Wraps an already open namespace descriptor.
    pub fn from_fd(fd: OwnedFd) -> NetnsFd {
        NetnsFd { fd }
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Whether both handles refer to the same namespace.
    pub fn is_same(&self, other: &NetnsFd) -> Result<bool> {
        let a = ns_id(&self.fd)?;
        let b = ns_id(&other.fd)?;
        Ok(a == b)
    }

    /// Moves the calling thread into this namespace; dropping the guard moves
    /// it back to the namespace it was in before.
    ///
    /// `setns` changes only the calling thread, so this is meant for the
    /// single-threaded plugin process or a thread that does nothing else in
    /// the meantime (no async runtime, no thread pool that could run other
    /// work on this thread while the guard lives). Threads spawned while the
    /// guard lives start in this namespace. Multi-threaded code should prefer
    /// [`run_in_netns`]. The guard is `!Send` so it is restored on the thread
    /// it was taken on.
    pub fn enter(&self) -> Result<NetnsGuard> {
        enter_fd(self.fd())
    }
}

pub(crate) fn enter_fd(fd: BorrowedFd) -> Result<NetnsGuard> {
    let prev = NetnsFd::current()?;
    setns(fd, CloneFlags::CLONE_NEWNET).map_err(|e| Error::nix("setns into netns", e))?;
    Ok(NetnsGuard {
        prev: Some(prev),
        _not_send: PhantomData,
    })
}

impl AsFd for NetnsFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn ns_id(fd: &OwnedFd) -> Result<(u64, u64)> {
    // Device and inode of the nsfs file are the namespace's identity.
    let st = nix::sys::stat::fstat(fd).map_err(|e| Error::nix("fstat netns", e))?;
    Ok((st.st_dev, st.st_ino))
}

/// Returned by [`NetnsFd::enter`]; restores the previous namespace on drop.
#[must_use = "the namespace is restored when the guard is dropped"]
pub struct NetnsGuard {
    prev: Option<NetnsFd>,
    // setns() is per thread: restoring from another thread would move the
    // wrong thread.
    _not_send: PhantomData<*const ()>,
}

impl NetnsGuard {
    /// Restores the previous namespace now and reports failure, instead of
    /// the abort that a failure during drop leads to.
    pub fn restore(mut self) -> Result<()> {
        match self.prev.take() {
            Some(prev) => setns(prev.fd(), CloneFlags::CLONE_NEWNET)
                .map_err(|e| Error::nix("setns back to previous netns", e)),
            None => Ok(()),
        }
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        if let Some(prev) = self.prev.take() {
            if setns(prev.fd(), CloneFlags::CLONE_NEWNET).is_err() {
                // Carrying on would configure the host as if it were the
                // container (or the reverse); nothing can be trusted now.
                eprintln!("evio-net: cannot restore the network namespace, aborting");
                std::process::abort();
            }
        }
    }
}

/// Runs `f` on a fresh OS thread that first enters `ns`; the thread ends
/// with `f`, so no thread is ever left (or reused) in a foreign namespace and
/// the caller's thread never changes namespace. A panic in `f` is resumed
/// on the caller's thread.
pub fn run_in_netns<T: Send>(ns: &NetnsFd, f: impl FnOnce() -> T + Send) -> Result<T> {
    std::thread::scope(|s| {
        let worker = s.spawn(move || -> Result<T> {
            setns(ns.fd(), CloneFlags::CLONE_NEWNET)
                .map_err(|e| Error::nix("setns into netns", e))?;
            Ok(f())
        });
        match worker.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}
