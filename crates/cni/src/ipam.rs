//! Delegation to the IPAM plugin, as the spec's "Delegated plugin protocol"
//! says: found by name in `CNI_PATH`, run with our environment (only
//! `CNI_COMMAND` may differ, plus [`DEPTH_ENV`]), the network config on
//! stdin, its stderr passed through, its stdout a result or a CNI error.
//!
//! The delegate is outside this process, so every wait on it is bounded
//! ([`Delegate::timeout`], [`DEFAULT_TIMEOUT`] unless the config's
//! `ipamTimeoutSeconds` says otherwise). It runs in its own process group,
//! and on overrun the whole group is SIGKILLed and the delegate reaped: a
//! hanging plugin and whatever it forked are gone before the error returns.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command as Proc, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde_json::Value;

use crate::env::Command;
use crate::error::{code, CniError, Result};
use crate::result::CniResult;
use crate::version::{Version, SUPPORTED};

/// Set by evio on every delegate it starts: how many evio processes are
/// above it. evio refuses to run (except VERSION) when it is set at all,
/// so a config that names evio as its own IPAM, under any file name, stops
/// after one level instead of forking itself until the node runs out of
/// processes.
pub const DEPTH_ENV: &str = "EVIO_DELEGATION_DEPTH";

/// How long a delegate may take by default: well inside the runtime's
/// patience (the kubelet gives the whole sandbox set-up minutes, CRI-O and
/// containerd their CNI calls no less), far above host-local's milliseconds.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(20);

/// Largest output accepted from a delegate: a result is a few hundred bytes.
const MAX_OUTPUT: usize = 4 << 20;

/// How deep in a delegation chain this process is (0: started by the
/// runtime). A value that is not a number is refused: it was not set by
/// evio.
pub fn delegation_depth() -> Result<u32> {
    match std::env::var_os(DEPTH_ENV) {
        None => Ok(0),
        Some(v) => v
            .to_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| CniError::invalid_env(format!("{DEPTH_ENV} is not a number"))),
    }
}

pub struct Delegate {
    pub name: String,
    pub path: PathBuf,
    /// Bound on each exec of the delegate, output and exit included.
    pub timeout: Duration,
}

impl Delegate {
    /// Finds `name` in the `CNI_PATH` directories (first match wins).
    pub fn find(name: &str, cni_path: &[PathBuf]) -> Result<Delegate> {
        for dir in cni_path {
            let p = dir.join(name);
            if p.is_file() {
                return Ok(Delegate {
                    name: name.to_string(),
                    path: p,
                    timeout: DEFAULT_TIMEOUT,
                });
            }
        }
        Err(CniError::invalid_config(format!(
            "ipam plugin {name:?} not found in CNI_PATH [{}]",
            cni_path
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(":")
        )))
    }

    /// The config's delegate (`ipam.type`), bounded by its
    /// `ipamTimeoutSeconds`.
    pub fn of(conf: &crate::config::NetConf, cni_path: &[PathBuf]) -> Result<Delegate> {
        Ok(Delegate::find(&conf.ipam_type, cni_path)?.with_timeout(conf.ipam_timeout))
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Delegate {
        self.timeout = timeout;
        self
    }

    /// Runs one command; stdout on success. A failure that printed a CNI
    /// error keeps its code; anything else is our IPAM error code. Past
    /// [`Delegate::timeout`] the delegate's process group is killed and the
    /// error is code 11 (try again later): a stuck delegate is transient
    /// from the runtime's point of view, and nothing of it is left running.
    pub fn exec(&self, cmd: Command, stdin: &[u8]) -> Result<Vec<u8>> {
        let depth = delegation_depth()?;
        let parent = std::process::id();
        let mut proc = Proc::new(&self.path);
        proc.env("CNI_COMMAND", cmd.as_str())
            .env(DEPTH_ENV, (depth + 1).to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            // Its own group: the timeout kills it and everything it forked
            // without touching the runtime's group, which evio is in.
            .process_group(0);
        // SAFETY: only async-signal-safe calls (prctl, getppid) between fork
        // and exec.
        unsafe {
            proc.pre_exec(move || {
                // Leaving its own group, the delegate would no longer die
                // with evio when the runtime kills evio's group: it dies
                // when evio does instead. PDEATHSIG follows the forking
                // *thread*, which is the one that waits in `talk` below for
                // the delegate's whole life, so it never fires early.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // evio died before the prctl took effect.
                if libc::getppid() as u32 != parent {
                    return Err(std::io::Error::other("evio exited"));
                }
                Ok(())
            });
        }
        let mut child = proc.spawn().map_err(|e| {
            CniError::new(
                code::IO,
                format!("cannot execute ipam plugin {}", self.path.display()),
            )
            .with_details(e.to_string())
        })?;
        let deadline = Instant::now() + self.timeout;
        let outcome = talk(&mut child, stdin, deadline);
        let (status, stdout) = match outcome {
            Ok(done) => done,
            Err(Talk::TimedOut) => {
                kill_group(&mut child);
                return Err(CniError::new(
                    code::TRY_AGAIN,
                    format!(
                        "ipam plugin {} {} did not finish within {:?}; it and its children were killed",
                        self.name,
                        cmd.as_str(),
                        self.timeout
                    ),
                ));
            }
            Err(Talk::Failed(e)) => {
                kill_group(&mut child);
                return Err(e.context(format!("ipam plugin {} {}", self.name, cmd.as_str())));
            }
        };
        if status.success() {
            return Ok(stdout);
        }
        Err(match CniError::from_plugin_output(&stdout) {
            Some(e) => e.context(format!("ipam plugin {} {}", self.name, cmd.as_str())),
            None => CniError::new(
                code::IPAM,
                format!(
                    "ipam plugin {} {} failed: {}",
                    self.name,
                    cmd.as_str(),
                    status
                ),
            )
            .with_details(String::from_utf8_lossy(&stdout).trim().to_string()),
        })
    }

    /// The versions the delegate supports (its VERSION command).
    pub fn versions(&self) -> Result<Vec<String>> {
        let out = self.exec(Command::Version, br#"{"cniVersion":"0.4.0"}"#)?;
        let v: Value = serde_json::from_slice(&out).map_err(|e| {
            CniError::new(
                code::DECODE,
                format!("ipam plugin {} VERSION output", self.name),
            )
            .with_details(e.to_string())
        })?;
        Ok(v.get("supportedVersions")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default())
    }

    /// The newest version both we and the delegate speak, at most `cap`.
    pub fn best_version(&self, cap: Version) -> Result<Option<String>> {
        let theirs = self.versions()?;
        Ok(SUPPORTED
            .iter()
            .rev()
            .filter(|v| Version::parse(v).map(|p| p <= cap).unwrap_or(false))
            .find(|v| theirs.iter().any(|t| t == *v))
            .map(|v| v.to_string()))
    }

    /// Runs ADD/DEL/CHECK. Older IPAM plugins (Debian's host-local is CNI
    /// 1.0.0) refuse a 1.1.0 config with code 1 although nothing in it is
    /// new to them; then the config is re-sent in the newest version they
    /// speak. Costs one VERSION exec only when the first attempt is refused.
    pub fn run(&self, cmd: Command, conf: &[u8], conf_version: Version) -> Result<Vec<u8>> {
        match self.exec(cmd, conf) {
            Err(e) if e.code == code::INCOMPATIBLE_VERSION => {
                let Some(v) = self.best_version(conf_version)? else {
                    return Err(e);
                };
                if Version::parse(&v)? >= conf_version {
                    return Err(e);
                }
                self.exec(cmd, &with_version(conf, &v)?)
            }
            other => other,
        }
    }

    /// ADD: the delegate's result, in our internal model.
    pub fn add(&self, conf: &[u8], conf_version: Version) -> Result<CniResult> {
        let out = self.run(Command::Add, conf, conf_version)?;
        CniResult::from_slice(&out).map_err(|e| e.context(format!("ipam plugin {}", self.name)))
    }
}

/// The same config with another `cniVersion`.
pub fn with_version(conf: &[u8], version: &str) -> Result<Vec<u8>> {
    let mut v: Value = serde_json::from_slice(conf)
        .map_err(|e| CniError::new(code::DECODE, "config").with_details(e.to_string()))?;
    if let Some(o) = v.as_object_mut() {
        o.insert("cniVersion".into(), Value::from(version));
        // prevResult must match the version it is declared in.
        if let Some(prev) = o.get("prevResult").cloned() {
            if let Ok(r) = CniResult::from_value(&prev) {
                o.insert("prevResult".into(), r.to_value(version)?);
            }
        }
    }
    serde_json::to_vec(&v).map_err(|e| CniError::new(code::IO, e.to_string()))
}

enum Talk {
    TimedOut,
    Failed(CniError),
}

/// Feeds `stdin` to the child and collects its stdout until it closes it,
/// then waits for its exit, all before `deadline`. Single-threaded (poll),
/// like the rest of the plugin.
fn talk(
    child: &mut Child,
    input: &[u8],
    deadline: Instant,
) -> std::result::Result<(ExitStatus, Vec<u8>), Talk> {
    let io = |what: &str, e: std::io::Error| {
        Talk::Failed(CniError::new(code::IO, what.to_string()).with_details(e.to_string()))
    };
    let mut stdin: Option<ChildStdin> = child.stdin.take();
    let mut stdout: Option<ChildStdout> = child.stdout.take();
    for fd in [
        stdin.as_ref().map(|s| s.as_fd()),
        stdout.as_ref().map(|s| s.as_fd()),
    ]
    .into_iter()
    .flatten()
    {
        fcntl(fd, FcntlArg::F_SETFL(OFlag::O_NONBLOCK))
            .map_err(|e| io("cannot set up the pipes", e.into()))?;
    }
    let mut written = 0;
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    if input.is_empty() {
        stdin = None;
    }
    while stdin.is_some() || stdout.is_some() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Talk::TimedOut);
        }
        let (w_ready, r_ready) = {
            let mut fds = Vec::with_capacity(2);
            if let Some(s) = &stdin {
                fds.push(PollFd::new(s.as_fd(), PollFlags::POLLOUT));
            }
            if let Some(s) = &stdout {
                fds.push(PollFd::new(s.as_fd(), PollFlags::POLLIN));
            }
            let timeout = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
            match poll(&mut fds, timeout) {
                Ok(_) => {}
                Err(nix::Error::EINTR) => continue,
                Err(e) => return Err(io("cannot wait for the ipam plugin", e.into())),
            }
            let ready = |fd: &PollFd| fd.revents().is_some_and(|r| !r.is_empty());
            let w = stdin.is_some() && ready(&fds[0]);
            let r = stdout.is_some() && ready(&fds[fds.len() - 1]);
            (w, r)
        };
        if w_ready {
            if let Some(s) = stdin.as_mut() {
                match s.write(&input[written..]) {
                    Ok(n) => written += n,
                    // A delegate that exits without reading stdin closes the
                    // pipe: its exit status tells what happened.
                    Err(e) if e.kind() == ErrorKind::BrokenPipe => written = input.len(),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Err(io("cannot write to ipam plugin", e)),
                }
                if written >= input.len() {
                    // Closing it is the delegate's end of input.
                    stdin = None;
                }
            }
        }
        if r_ready {
            if let Some(s) = stdout.as_mut() {
                match s.read(&mut buf) {
                    Ok(0) => stdout = None,
                    Ok(n) => {
                        out.extend_from_slice(&buf[..n]);
                        if out.len() > MAX_OUTPUT {
                            return Err(Talk::Failed(CniError::new(
                                code::IPAM,
                                format!("output is larger than {MAX_OUTPUT} bytes"),
                            )));
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Err(io("cannot read ipam plugin output", e)),
                }
            }
        }
    }
    // Stdout is closed; the exit follows at once for any real plugin, but
    // it is a wait on another process all the same.
    let mut pause = Duration::from_micros(50);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok((status, out)),
            Ok(None) => {}
            Err(e) => return Err(io("cannot wait for the ipam plugin", e)),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Talk::TimedOut);
        }
        std::thread::sleep(pause.min(left));
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// SIGKILLs the delegate's whole process group and reaps the delegate.
/// The group is the delegate's pid (`process_group(0)`), still ours while
/// the delegate is not reaped.
fn kill_group(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_version_rewrites_prev_result() {
        let conf = br#"{"cniVersion":"1.1.0","name":"n","prevResult":{"cniVersion":"1.1.0","ips":[{"address":"10.0.0.2/24"}]}}"#;
        let v: Value = serde_json::from_slice(&with_version(conf, "0.4.0").unwrap()).unwrap();
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(v["prevResult"]["cniVersion"], "0.4.0");
        assert_eq!(v["prevResult"]["ips"][0]["version"], "4");
    }

    /// A delegate script in a fresh directory.
    fn script(body: &str) -> (tempfile::TempDir, Delegate) {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ipam-under-test");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        let d = Delegate::find("ipam-under-test", &[dir.path().to_path_buf()]).unwrap();
        (dir, d)
    }

    /// Whether `pid` has exited (gone, or a zombie waiting for its reaper).
    fn exited(pid: i32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => stat
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z')),
        }
    }

    /// A delegate that hangs after forking a child that also hangs: exec
    /// gives up with code 11 and leaves neither running. Before the fix it
    /// waited for ever (the test's own wait is bounded, so it fails).
    #[test]
    fn hanging_delegate_and_its_children_are_killed() {
        let (dir, d) = script(&format!(
            "sleep 1000 &\necho $! > {}/child.pid\nexec sleep 1000",
            "$(dirname \"$0\")"
        ));
        // Long enough for a loaded machine's sh to write child.pid first.
        let d = d.with_timeout(Duration::from_secs(2));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(d.exec(Command::Add, b"{}"));
        });
        let res = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("exec of a hanging delegate must give up");
        let e = res.unwrap_err();
        assert_eq!(e.code, code::TRY_AGAIN, "{e}");
        assert!(e.msg.contains("did not finish"), "{e}");
        let pid: i32 = std::fs::read_to_string(dir.path().join("child.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !exited(pid) {
            assert!(
                Instant::now() < deadline,
                "the delegate's child {pid} survived"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The delegate reads all of stdin, answers, and sees the depth.
    #[test]
    fn delegate_gets_input_and_depth() {
        let (_dir, d) = script(&format!(
            "in=$(cat)\nprintf '%s|%s|%s' \"$CNI_COMMAND\" \"${DEPTH_ENV}\" \"$in\""
        ));
        let big = vec![b'x'; 200_000];
        let out = d.exec(Command::Del, &big).unwrap();
        let want = format!("DEL|1|{}", "x".repeat(200_000));
        assert!(out == want.as_bytes(), "{} bytes back", out.len());
    }

    /// A delegate that exits without reading stdin: its exit status and
    /// output count, not the broken pipe.
    #[test]
    fn delegate_that_ignores_stdin() {
        let (_dir, d) = script(r#"echo '{"code":11,"msg":"busy"}'; exit 1"#);
        let e = d.exec(Command::Add, &vec![b'x'; 1 << 20]).unwrap_err();
        assert_eq!(e.code, 11);
        assert!(e.msg.contains("busy"), "{e}");
    }

    #[test]
    fn find_rejects_missing() {
        let e = Delegate::find("no-such-ipam", &[PathBuf::from("/nonexistent")])
            .err()
            .unwrap();
        assert_eq!(e.code, 7);
        assert!(e.msg.contains("no-such-ipam"));
    }
}
