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

/// One process as /proc shows it.
#[derive(Debug, Clone)]
pub struct ProcInfo {
    pub pid: i32,
    pub ppid: i32,
    /// The state letter of /proc/PID/stat (`R`, `S`, `Z`, ...).
    pub state: String,
    pub comm: String,
    /// The command line, NULs as spaces (empty for zombies and kernel threads).
    pub cmdline: String,
}

/// Every process /proc lists now; those that exit while being read are
/// skipped. comm is taken between the first `(` and the last `)` of
/// /proc/PID/stat, since a command name may itself contain parentheses.
pub fn processes() -> Vec<ProcInfo> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let mut f = stat[close + 1..].split_whitespace();
        let state = f.next().unwrap_or("").to_string();
        let ppid = f.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        let cmdline = std::fs::read(e.path().join("cmdline"))
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .unwrap_or_default();
        out.push(ProcInfo {
            pid,
            ppid,
            state,
            comm: stat[open + 1..close].to_string(),
            cmdline,
        });
    }
    out
}

/// Processes whose parent is this test process.
pub fn children() -> Vec<ProcInfo> {
    let me = std::process::id() as i32;
    processes().into_iter().filter(|p| p.ppid == me).collect()
}

/// Reaps the zombie children whose comm `adopted` accepts: processes a
/// runtime daemonised and that were re-parented to a test that made itself
/// a child subreaper. Only those: other children belong to `Child` handles
/// that reap their own.
pub fn reap_adopted(adopted: impl Fn(&str) -> bool) {
    for p in children() {
        if p.state == "Z" && adopted(&p.comm) {
            let _ = nix::sys::wait::waitpid(Pid::from_raw(p.pid), None);
        }
    }
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
