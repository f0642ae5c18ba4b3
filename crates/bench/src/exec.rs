//! Runs one program the way a container runtime runs a CNI plugin, and
//! measures it: wall time from fork to reap, and memory high-water marks.
//!
//! The child enters the node's network namespace itself (`setns` between
//! fork and exec) instead of going through `nsenter`, so the measured time
//! is the plugin's alone, not the plugin's plus another program's start-up,
//! and the child we wait for is the plugin itself. Standard streams are
//! memfds, so no helper thread runs while the clock does, and waiting is a
//! poll on a pidfd: no sleep-based polling that would round every figure
//! up to the poll interval.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::error::{BenchError, Result};

/// An open handle on a named network namespace (`/run/netns/NAME`).
pub struct NsFd {
    file: File,
    path: PathBuf,
}

impl NsFd {
    pub fn open(path: &Path) -> Result<NsFd> {
        let file = File::open(path).map_err(BenchError::io(format!("open {}", path.display())))?;
        Ok(NsFd {
            file,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn raw(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// What to run.
pub struct Spec<'a> {
    pub program: PathBuf,
    pub args: Vec<String>,
    /// The environment is cleared (a runtime passes nothing else) unless
    /// `inherit_env`; these are set on top.
    pub env: Vec<(String, String)>,
    pub inherit_env: bool,
    pub stdin: Vec<u8>,
    pub netns: Option<&'a NsFd>,
    pub timeout: Duration,
}

impl<'a> Spec<'a> {
    pub fn new(program: impl Into<PathBuf>) -> Spec<'a> {
        Spec {
            program: program.into(),
            args: Vec::new(),
            env: vec![("PATH".into(), RUNTIME_PATH.into())],
            inherit_env: false,
            stdin: Vec::new(),
            netns: None,
            timeout: Duration::from_secs(30),
        }
    }

    pub fn args<I, S>(mut self, args: I) -> Spec<'a>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, k: &str, v: &str) -> Spec<'a> {
        self.env.push((k.into(), v.into()));
        self
    }

    pub fn inherit_env(mut self) -> Spec<'a> {
        self.inherit_env = true;
        self
    }

    pub fn stdin(mut self, bytes: Vec<u8>) -> Spec<'a> {
        self.stdin = bytes;
        self
    }

    pub fn netns(mut self, ns: &'a NsFd) -> Spec<'a> {
        self.netns = Some(ns);
        self
    }

    pub fn timeout(mut self, t: Duration) -> Spec<'a> {
        self.timeout = t;
        self
    }

    /// Program and arguments, for messages.
    pub fn describe(&self) -> String {
        let mut s = self.program.display().to_string();
        for a in &self.args {
            s.push(' ');
            s.push_str(a);
        }
        s
    }
}

/// The PATH a runtime typically hands to a plugin.
pub const RUNTIME_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Exited(i32),
    Signaled(i32),
    TimedOut,
}

/// What one run produced.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// From just before fork to just after the reap.
    pub wall: Duration,
    pub status: Status,
    pub stdout: String,
    pub stderr: String,
    /// `ru_maxrss` from wait4, KiB. The kernel reports the larger of the
    /// process's own peak and that of the children it waited for (here: the
    /// delegated IPAM plugin), so it is an upper bound of the plugin's own.
    pub maxrss_kib: u64,
    /// The process's own peak RSS (VmHWM read at its exit), KiB; only from
    /// [`run_traced`].
    pub own_hwm_kib: Option<u64>,
    /// User + system CPU time from wait4, including the children it waited
    /// for (the delegated IPAM plugin): what is not waiting.
    pub cpu: Duration,
}

fn cpu_of(ru: &libc::rusage) -> Duration {
    let tv = |t: libc::timeval| {
        Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
    };
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

impl Outcome {
    pub fn success(&self) -> bool {
        self.status == Status::Exited(0)
    }

    /// Ok(self) if it exited 0, else an error carrying its output.
    pub fn ok(self, what: &str) -> Result<Outcome> {
        if self.success() {
            return Ok(self);
        }
        let status = match self.status {
            Status::Exited(c) => format!("exit code {c}"),
            Status::Signaled(s) => format!("killed by signal {s}"),
            Status::TimedOut => "timed out".to_string(),
        };
        Err(BenchError::failed(
            what,
            format!(
                "{status}; stdout: {}; stderr: {}",
                self.stdout.trim(),
                self.stderr.trim()
            ),
        ))
    }
}

fn memfd(name: &str) -> Result<File> {
    let cname = std::ffi::CString::new(name).unwrap_or_default();
    // SAFETY: cname is a valid NUL-terminated string for the call's duration.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(BenchError::io("memfd_create")(
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: fd was just returned by memfd_create and is owned by nobody else.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

fn read_all(mut f: File) -> String {
    let mut s = Vec::new();
    let _ = f.seek(SeekFrom::Start(0));
    let _ = f.read_to_end(&mut s);
    String::from_utf8_lossy(&s).into_owned()
}

fn pidfd_open(pid: i32) -> Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(BenchError::io("pidfd_open")(std::io::Error::last_os_error()));
    }
    // SAFETY: a non-negative return is a new fd owned by us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn pidfd_kill(fd: &OwnedFd) {
    // SAFETY: signals the process the pidfd refers to; no pointers but null.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        );
    }
}

/// Waits until the pidfd is readable (the process exited) or `timeout`.
/// True if it exited.
fn poll_exit(fd: &OwnedFd, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r > 0 {
            return true;
        }
        if r == 0 {
            return false;
        }
        // EINTR (Ctrl-C flag handler): keep waiting; the caller checks the
        // flag between runs.
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return false;
        }
    }
}

/// wait4 with flags, retried on EINTR. Returns (status, rusage).
fn wait4(pid: i32, flags: i32) -> Result<(i32, libc::rusage)> {
    loop {
        let mut status = 0;
        // SAFETY: rusage is plain data; zeroed is a valid value.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: valid out-pointers for the call's duration.
        let r = unsafe { libc::wait4(pid, &mut status, flags, &mut ru) };
        if r == pid {
            return Ok((status, ru));
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(BenchError::io(format!("wait4 {pid}"))(e));
        }
    }
}

fn decode(status: i32) -> Status {
    if libc::WIFEXITED(status) {
        Status::Exited(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        Status::Signaled(libc::WTERMSIG(status))
    } else {
        Status::Signaled(0)
    }
}

struct Prepared {
    cmd: Command,
    out: File,
    err: File,
}

fn prepare(spec: &Spec, trace: bool) -> Result<Prepared> {
    let mut input = memfd("stdin")?;
    input
        .write_all(&spec.stdin)
        .and_then(|()| input.seek(SeekFrom::Start(0)).map(|_| ()))
        .map_err(BenchError::io("write stdin memfd"))?;
    let out = memfd("stdout")?;
    let err = memfd("stderr")?;
    let mut cmd = Command::new(&spec.program);
    cmd.args(&spec.args);
    if !spec.inherit_env {
        cmd.env_clear();
    }
    cmd.envs(spec.env.iter().map(|(k, v)| (k, v)));
    cmd.stdin(Stdio::from(input))
        .stdout(Stdio::from(
            out.try_clone().map_err(BenchError::io("dup memfd"))?,
        ))
        .stderr(Stdio::from(
            err.try_clone().map_err(BenchError::io("dup memfd"))?,
        ))
        // Its own group, so a timeout can kill the delegated IPAM child too
        // and Ctrl-C reaches only us.
        .process_group(0);
    let ns = spec.netns.map(NsFd::raw);
    // SAFETY: between fork and exec the closure only makes raw syscalls
    // (setns, ptrace), which are async-signal-safe; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(fd) = ns {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if trace
                && libc::ptrace(
                    libc::PTRACE_TRACEME,
                    0,
                    std::ptr::null_mut::<libc::c_void>(),
                    std::ptr::null_mut::<libc::c_void>(),
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(Prepared { cmd, out, err })
}

/// A process started from a [`Spec`], its output going to files.
struct Launched {
    /// Taken just before the spawn, so that the setup is not timed.
    start: Instant,
    child: Child,
    pidfd: OwnedFd,
    out: File,
    err: File,
}

fn launch(spec: &Spec, trace: bool) -> Result<Launched> {
    let Prepared { mut cmd, out, err } = prepare(spec, trace)?;
    let start = Instant::now();
    let child = cmd.spawn().map_err(|source| BenchError::Spawn {
        program: spec.program.to_path_buf(),
        source,
    })?;
    let pidfd = pidfd_open(child.id() as i32)?;
    Ok(Launched {
        start,
        child,
        pidfd,
        out,
        err,
    })
}

/// What a reaped process did: `ru` from wait4, `status` unless it was
/// killed for running past its timeout.
fn outcome(
    wall: Duration,
    status: Option<i32>,
    ru: &libc::rusage,
    out: File,
    err: File,
    own_hwm_kib: Option<u64>,
) -> Outcome {
    Outcome {
        wall,
        status: status.map_or(Status::TimedOut, decode),
        stdout: read_all(out),
        stderr: read_all(err),
        maxrss_kib: u64::try_from(ru.ru_maxrss).unwrap_or(0),
        own_hwm_kib,
        cpu: cpu_of(ru),
    }
}

/// Runs `spec` to completion (or its timeout) and measures it.
pub fn run(spec: &Spec) -> Result<Outcome> {
    let l = launch(spec, false)?;
    let pid = l.child.id() as i32;
    let exited = poll_exit(&l.pidfd, spec.timeout);
    if !exited {
        // Not reaped yet, so the group id is still certainly ours.
        // SAFETY: plain killpg.
        unsafe {
            libc::killpg(pid, libc::SIGKILL);
        }
    }
    let (status, ru) = wait4(pid, 0)?;
    let wall = l.start.elapsed();
    Ok(outcome(
        wall,
        exited.then_some(status),
        &ru,
        l.out,
        l.err,
        None,
    ))
}

/// Like [`run`] but under ptrace, stopping the process at its exit to read
/// its own peak RSS (VmHWM) before its memory is gone: wait4's figure also
/// covers its children. Slower; not for timing.
pub fn run_traced(spec: &Spec) -> Result<Outcome> {
    let l = launch(spec, true)?;
    let pid = l.child.id() as i32;
    // A tracee's stops do not make the pidfd readable, so the timeout is a
    // watchdog thread; the pidfd makes its kill safe against pid reuse.
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let (timeout, pidfd) = (spec.timeout, l.pidfd);
    let watchdog = std::thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = done_rx.recv_timeout(timeout) {
            pidfd_kill(&pidfd);
            return true;
        }
        false
    });
    let mut hwm = None;
    let mut configured = false;
    let result = loop {
        let (status, ru) = match wait4(pid, libc::__WALL) {
            Ok(x) => x,
            Err(e) => break Err(e),
        };
        if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
            break Ok((status, ru));
        }
        if !libc::WIFSTOPPED(status) {
            continue;
        }
        let sig = libc::WSTOPSIG(status);
        let event = (status >> 16) & 0xff;
        let mut deliver = 0;
        if event == libc::PTRACE_EVENT_EXIT {
            hwm = read_hwm(pid);
        } else if sig == libc::SIGTRAP && !configured {
            // The stop right after exec.
            configured = true;
            let opts = libc::PTRACE_O_TRACEEXIT | libc::PTRACE_O_EXITKILL;
            // SAFETY: ptrace on our stopped tracee.
            unsafe {
                libc::ptrace(
                    libc::PTRACE_SETOPTIONS,
                    pid,
                    std::ptr::null_mut::<libc::c_void>(),
                    opts as usize as *mut libc::c_void,
                );
            }
        } else {
            // A signal for the tracee (SIGCHLD from its IPAM child, Go's
            // preemption signals): pass it on.
            deliver = sig;
        }
        // SAFETY: ptrace on our stopped tracee.
        unsafe {
            libc::ptrace(
                libc::PTRACE_CONT,
                pid,
                std::ptr::null_mut::<libc::c_void>(),
                deliver as usize as *mut libc::c_void,
            );
        }
    };
    let wall = l.start.elapsed();
    let _ = done_tx.send(());
    let timed_out = watchdog.join().unwrap_or(false);
    let (status, ru) = result?;
    Ok(outcome(
        wall,
        (!timed_out).then_some(status),
        &ru,
        l.out,
        l.err,
        hwm,
    ))
}

fn read_hwm(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_hwm(&s)
}

/// The `VmHWM:` line of /proc/PID/status, in KiB.
pub fn parse_hwm(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// A long-running program (a server), killed and reaped on drop.
pub struct Background {
    child: Option<Child>,
    pidfd: OwnedFd,
    out: File,
    err: File,
    what: String,
}

impl Background {
    pub fn start(spec: &Spec) -> Result<Background> {
        let Launched {
            child,
            pidfd,
            out,
            err,
            ..
        } = launch(spec, false)?;
        Ok(Background {
            child: Some(child),
            pidfd,
            out,
            err,
            what: spec.describe(),
        })
    }

    /// Its process id while it has not been reaped.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn running(&mut self) -> bool {
        evio_testkit::process::running(&mut self.child)
    }

    /// Waits (bounded) for it to exit on its own; kills it past `timeout`.
    pub fn wait(mut self, timeout: Duration) -> Result<Outcome> {
        let start = Instant::now();
        let exited = poll_exit(&self.pidfd, timeout);
        let Some(mut child) = self.child.take() else {
            return Err(BenchError::failed(&self.what, "already reaped"));
        };
        if !exited {
            let _ = child.kill();
        }
        let st = child
            .wait()
            .map_err(BenchError::io(format!("wait for {}", self.what)))?;
        use std::os::unix::process::ExitStatusExt;
        let status = if !exited {
            Status::TimedOut
        } else if let Some(c) = st.code() {
            Status::Exited(c)
        } else {
            Status::Signaled(st.signal().unwrap_or(0))
        };
        let out = self.out.try_clone().map_err(BenchError::io("dup memfd"))?;
        let err = self.err.try_clone().map_err(BenchError::io("dup memfd"))?;
        Ok(Outcome {
            wall: start.elapsed(),
            status,
            stdout: read_all(out),
            stderr: read_all(err),
            maxrss_kib: 0,
            own_hwm_kib: None,
            cpu: Duration::ZERO,
        })
    }

    pub fn output(&self) -> String {
        match (self.out.try_clone(), self.err.try_clone()) {
            (Ok(o), Ok(e)) => format!("{}{}", read_all(o), read_all(e)),
            _ => String::new(),
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_collects_output_status_and_rss() {
        let spec = Spec::new("/bin/sh")
            .args(["-c", "cat; echo err >&2; exit 3"])
            .stdin(b"hello".to_vec());
        let o = run(&spec).unwrap();
        assert_eq!(o.status, Status::Exited(3));
        assert_eq!(o.stdout, "hello");
        assert_eq!(o.stderr, "err\n");
        assert!(o.maxrss_kib > 0);
        assert!(o.cpu <= o.wall, "{:?} > {:?}", o.cpu, o.wall);
        assert!(o.clone().ok("sh").is_err());
    }

    #[test]
    fn cpu_time_counts_busy_children_but_not_sleep() {
        let busy = run(&Spec::new("/bin/sh").inherit_env().args([
            "-c",
            "head -c 30000000 /dev/urandom | md5sum >/dev/null; exit 0",
        ]))
        .unwrap();
        assert!(busy.cpu > Duration::from_millis(20), "{:?}", busy.cpu);
        let idle = run(&Spec::new("/bin/sleep").args(["0.2"])).unwrap();
        assert!(idle.cpu < Duration::from_millis(50), "{:?}", idle.cpu);
        assert!(idle.wall >= Duration::from_millis(200));
    }

    #[test]
    fn run_clears_the_environment_but_path() {
        std::env::set_var("EVIO_BENCH_SHOULD_NOT_LEAK", "1");
        let o = run(&Spec::new("/usr/bin/env").env("CNI_COMMAND", "ADD")).unwrap();
        assert!(o.success());
        let mut vars: Vec<&str> = o.stdout.lines().collect();
        vars.sort();
        assert_eq!(
            vars,
            vec!["CNI_COMMAND=ADD", &format!("PATH={RUNTIME_PATH}")]
        );
    }

    #[test]
    fn run_kills_at_the_timeout() {
        let t = Instant::now();
        let o = run(&Spec::new("/bin/sleep")
            .args(["30"])
            .timeout(Duration::from_millis(200)))
        .unwrap();
        assert_eq!(o.status, Status::TimedOut);
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn run_measures_wall_time_without_polling_granularity() {
        let o = run(&Spec::new("/bin/true")).unwrap();
        assert!(o.success());
        // A sleep-polling waiter would never report less than its period.
        assert!(o.wall < Duration::from_millis(200), "{:?}", o.wall);
    }

    #[test]
    fn traced_run_reports_own_peak_separately_from_children() {
        // The shell stays small; its sort child holds one 40 MB line.
        // wait4's figure includes the child, the traced one must not.
        let spec = Spec::new("/bin/sh")
            .inherit_env()
            .args(["-c", "head -c 40000000 /dev/zero | sort >/dev/null; exit 0"]);
        let o = run_traced(&spec).unwrap();
        assert!(o.success(), "{o:?}");
        let own = o.own_hwm_kib.unwrap();
        assert!(own > 0 && own < 16 * 1024, "own {own} KiB");
        assert!(o.maxrss_kib > 35 * 1024, "maxrss {} KiB", o.maxrss_kib);
    }

    #[test]
    fn traced_run_still_times_out() {
        let spec = Spec::new("/bin/sleep")
            .args(["30"])
            .timeout(Duration::from_millis(200));
        let o = run_traced(&spec).unwrap();
        assert_eq!(o.status, Status::TimedOut);
    }

    #[test]
    fn hwm_is_parsed_from_proc_status() {
        let s = "Name:\tx\nVmPeak:\t 10 kB\nVmHWM:\t    1234 kB\nVmRSS:\t 1000 kB\n";
        assert_eq!(parse_hwm(s), Some(1234));
        assert_eq!(parse_hwm("Name:\tx\n"), None);
    }
}
