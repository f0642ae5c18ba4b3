//! Waiting for the store file to be replaced without polling it: inotify
//! on its directory (the file is replaced by rename, so a watch on the file
//! itself would follow the old inode), filtered by the file's name so that
//! the lock file and other writers' temp files wake nobody.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::libc;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// What counts as the file changing: renamed into place (every write of
/// the store), written in place, created or deleted (by hand).
const MASK: u32 = libc::IN_MOVED_TO | libc::IN_CLOSE_WRITE | libc::IN_CREATE | libc::IN_DELETE;

/// Size of `struct inotify_event` without its name.
const HEADER: usize = 16;

pub(crate) struct DirWatch {
    fd: AsyncFd<OwnedFd>,
    name: Vec<u8>,
}

impl DirWatch {
    /// Watches the directory of `file` for changes to `file`.
    pub(crate) fn new(file: &Path) -> io::Result<DirWatch> {
        let dir = match file.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let name = file
            .file_name()
            .map(|n| n.as_bytes().to_vec())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
        let cdir = CString::new(dir.as_os_str().as_bytes())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: plain inotify_init1(2); the fd is owned right below.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: raw is a new fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: cdir is a live NUL-terminated path.
        if unsafe { libc::inotify_add_watch(fd.as_raw_fd(), cdir.as_ptr(), MASK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the AsyncFd owns the OwnedFd, which stays open and the
        // same descriptor until the AsyncFd is dropped.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(DirWatch { fd, name })
    }

    /// Returns once the file changed (or the kernel dropped events, which
    /// may have been about it).
    pub(crate) async fn changed(&self) -> io::Result<()> {
        let mut buf = [0u8; 4096];
        loop {
            let mut ready = self.fd.readable().await?;
            let r = ready.try_io(|fd| {
                // SAFETY: reads into a live buffer of its own length.
                let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match r {
                Ok(Ok(n)) if names_file(&buf[..n], &self.name) => return Ok(()),
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}

/// Whether a buffer of inotify events holds one about `name`, or an
/// overflow (events lost).
pub(crate) fn names_file(mut buf: &[u8], name: &[u8]) -> bool {
    while buf.len() >= HEADER {
        let word = |i: usize| u32::from_ne_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
        let (mask, len) = (word(4), word(12) as usize);
        if mask & libc::IN_Q_OVERFLOW != 0 {
            return true;
        }
        let Some(raw) = buf.get(HEADER..HEADER + len) else {
            return false;
        };
        // The name is NUL-padded to an alignment.
        let ev = raw.split(|b| *b == 0).next().unwrap_or_default();
        if ev == name {
            return true;
        }
        buf = &buf[HEADER + len..];
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(mask: u32, name: &str) -> Vec<u8> {
        let mut padded = name.as_bytes().to_vec();
        padded.resize(name.len().div_ceil(16) * 16, 0);
        let mut v = Vec::new();
        v.extend_from_slice(&1i32.to_ne_bytes());
        v.extend_from_slice(&mask.to_ne_bytes());
        v.extend_from_slice(&0u32.to_ne_bytes());
        v.extend_from_slice(&(padded.len() as u32).to_ne_bytes());
        v.extend_from_slice(&padded);
        v
    }

    #[test]
    fn only_events_about_the_file_or_an_overflow_count() {
        let mut b = event(libc::IN_CLOSE_WRITE, "subnets.json.lock");
        b.extend(event(libc::IN_CREATE, ".subnets.json.tmp1"));
        assert!(!names_file(&b, b"subnets.json"));
        b.extend(event(libc::IN_MOVED_TO, "subnets.json"));
        assert!(names_file(&b, b"subnets.json"));
        assert!(names_file(&event(libc::IN_Q_OVERFLOW, ""), b"x"));
        assert!(!names_file(&b[..20], b"subnets.json"), "a cut event");
    }

    #[tokio::test]
    async fn a_rename_into_place_wakes_the_watch_and_the_lock_file_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("subnets.json");
        let w = DirWatch::new(&file).unwrap();
        std::fs::write(dir.path().join("subnets.json.lock"), b"").unwrap();
        let quiet = tokio::time::timeout(std::time::Duration::from_millis(200), w.changed());
        assert!(quiet.await.is_err(), "the lock file woke the watch");
        let tmp = dir.path().join(".tmp");
        std::fs::write(&tmp, b"{}").unwrap();
        std::fs::rename(&tmp, &file).unwrap();
        let seen = tokio::time::timeout(std::time::Duration::from_secs(5), w.changed());
        seen.await.unwrap().unwrap();
    }
}
