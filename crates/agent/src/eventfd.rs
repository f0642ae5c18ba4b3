//! One eventfd(2), the way every thread of the agent is woken: the engine
//! by its command senders ([`crate::Waker`]), the helper threads by the stop
//! ([`crate::Stop`]). Non-blocking, so a reader that drains it after a
//! wake never sleeps on it.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

pub struct EventFd(OwnedFd);

impl EventFd {
    pub fn new() -> io::Result<EventFd> {
        // SAFETY: plain eventfd(2); the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just created and nothing else owns it.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Makes the fd readable. A full counter (2^64 - 2 unread wakes) fails
    /// with EAGAIN, which still leaves it readable: nothing to report.
    pub fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to an fd we own.
        unsafe { libc::write(self.raw(), (&one as *const u64).cast(), 8) };
    }

    pub fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// Resets a readable eventfd, so that level-triggered polling sleeps
/// again until the next [`EventFd::signal`]. The caller holds only the raw
/// fd (the engine thread's epoll set); the owner outlives it.
pub fn drain(fd: RawFd) {
    let mut v = 0u64;
    // SAFETY: reads at most 8 bytes into a live u64; EAGAIN when nothing
    // was signalled is harmless.
    unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readable(fd: RawFd) -> bool {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one live pollfd, zero timeout.
        unsafe { libc::poll(&mut p, 1, 0) == 1 }
    }

    #[test]
    fn signal_makes_readable_and_drain_resets() {
        let e = EventFd::new().unwrap();
        assert!(!readable(e.raw()));
        e.signal();
        e.signal();
        assert!(readable(e.raw()));
        drain(e.raw());
        assert!(!readable(e.raw()));
        drain(e.raw()); // nothing signalled: does not block
    }
}
