//! Long-running helper daemons (etcd, coturn) tied to the test process.
//!
//! Each daemon runs under a small `sh` keeper whose stdin is a pipe from the
//! test process. When the test process goes away, for whatever reason, the
//! pipe closes, the keeper's `read` returns and it kills the daemon. The
//! daemon itself is started through `setpriv --pdeathsig KILL`, so it also
//! dies if its keeper dies. (A `PR_SET_PDEATHSIG` on the daemon from the test
//! process would fire when the spawning *thread* ends, which for a
//! lazily-started shared instance is the first test's thread, not the
//! process.)

use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `$@` until either it exits or stdin closes, whichever comes first;
/// in the second case it kills the job. The keeper exiting therefore means
/// the job is gone. The watcher reads a copy of stdin (fd 3) because
/// background jobs get /dev/null as stdin. The job's output goes to the
/// keeper's stderr (the daemon's log).
pub(crate) const KEEPER_SCRIPT: &str = r#"exec 3<&0
setpriv --pdeathsig KILL -- "$@" </dev/null 1>&2 &
p=$!
( read _ignored <&3; kill -9 "$p" 2>/dev/null ) &
wait "$p"
exit 0"#;

/// A `sh` process holding a job until its stdin closes.
pub(crate) struct Keeper {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Keeper {
    pub(crate) fn spawn(script: &str, args: &[String], log: Option<&Path>) -> Keeper {
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(script).arg("sh").args(args);
        cmd.stdin(Stdio::piped()).stdout(Stdio::null());
        match log.and_then(|p| std::fs::File::create(p).ok()) {
            Some(f) => cmd.stderr(f),
            None => cmd.stderr(Stdio::null()),
        };
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn sh keeper: {e}"));
        let stdin = child.stdin.take();
        Keeper { child, stdin }
    }

    /// The pid of the job (the keeper's child that is not its watcher
    /// subshell), once it runs.
    pub(crate) fn job_pid(&self, comm: &str) -> Option<i32> {
        let me = self.child.id() as i32;
        crate::process::processes()
            .into_iter()
            .find(|p| p.ppid == me && p.comm == comm)
            .map(|p| p.pid)
    }

    pub(crate) fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Closes the keeper's stdin (which kills the job) and waits, bounded,
    /// for the keeper to exit.
    pub(crate) fn stop(mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
