//! Child processes of the harness: telling whether one still runs, and
//! stopping one within a bound however it reacts to the signal.

use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Whether `child` (if there is one) still runs; reaps it if it exited.
pub fn running(child: &mut Option<Child>) -> bool {
    match child.as_mut() {
        Some(c) => matches!(c.try_wait(), Ok(None)),
        None => false,
    }
}

/// Sends `sig` and waits up to `grace` for `child` to exit, then kills it.
/// Reaped either way; its status, or `None` if waiting for it failed.
pub fn stop(child: &mut Child, sig: Signal, grace: Duration) -> Option<ExitStatus> {
    if let Ok(Some(st)) = child.try_wait() {
        return Some(st);
    }
    let _ = kill(Pid::from_raw(child.id() as i32), sig);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    child.wait().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn a_process_that_ignores_the_signal_is_killed_after_the_grace() {
        let mut c = Command::new("sh")
            .args(["-c", "trap '' TERM; exec sleep 30"])
            .spawn()
            .unwrap();
        let t = Instant::now();
        let st = stop(&mut c, Signal::SIGTERM, Duration::from_millis(200)).unwrap();
        assert!(!st.success());
        assert!(t.elapsed() < Duration::from_secs(10));
        let mut c = Some(c);
        assert!(!running(&mut c));
    }

    #[test]
    fn a_process_that_exits_on_the_signal_is_not_killed() {
        use std::os::unix::process::ExitStatusExt;
        let mut c = Command::new("sleep").arg("30").spawn().unwrap();
        let mut opt = None;
        assert!(!running(&mut opt));
        let st = stop(&mut c, Signal::SIGTERM, Duration::from_secs(10)).unwrap();
        assert_eq!(st.signal(), Some(Signal::SIGTERM as i32));
    }
}
