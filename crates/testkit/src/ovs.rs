//! One Open vSwitch instance (ovsdb-server + ovs-vswitchd) per simulated
//! node, running inside that node's network namespace with everything it
//! writes (database, sockets, pid files, logs, bridge management sockets) in
//! its own temporary directory, so that any number of instances can run side
//! by side and none touches the machine's /var/run/openvswitch.
//!
//! The daemons are started without `--detach` and kept as child processes of
//! the test: a detached daemon is re-parented to PID 1, which on this kind of
//! machine does not reap promptly, so killed daemons would linger as zombies
//! that `pgrep ovs` still shows. As children they are killed and reaped by
//! `Drop`, and they also die with the test's process group on Ctrl-C.

use std::fs::File;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::netns::Netns;

const SCHEMA: &str = "/usr/share/openvswitch/vswitch.ovsschema";
/// Upper bound for a daemon to become ready or to exit after a signal.
const DAEMON_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(10);

/// A running OVS for one simulated node. See the module docs.
pub struct Ovs {
    dir: tempfile::TempDir,
    netns: PathBuf,
    ovsdb: Option<Child>,
    vswitchd: Option<Child>,
}

impl Ovs {
    /// Creates a fresh database and starts both daemons inside `ns`. Returns
    /// once ovsdb-server accepts connections and ovs-vswitchd has applied the
    /// initial configuration. Panics (after cleaning up) if either fails.
    pub fn start(ns: &Netns) -> Ovs {
        let dir = tempfile::Builder::new()
            .prefix("evio-ovs-")
            .tempdir()
            .unwrap_or_else(|e| panic!("create OVS run dir: {e}"));
        let mut ovs = Ovs {
            dir,
            netns: ns.path(),
            ovsdb: None,
            vswitchd: None,
        };
        let db = ovs.path("conf.db");
        let out = ovs
            .host_command("ovsdb-tool")
            .arg("create")
            .arg(&db)
            .arg(SCHEMA)
            .output();
        check_output("ovsdb-tool create", out);
        ovs.start_ovsdb();
        // Creates the Open_vSwitch root row; --no-wait because vswitchd is
        // not running yet to acknowledge it.
        ovs.vsctl(&["--no-wait", "init"]);
        ovs.start_vswitchd();
        ovs
    }

    /// The run directory holding db, sockets, pid files and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn db_sock(&self) -> PathBuf {
        self.path("db.sock")
    }

    /// The OVSDB endpoint in the form the plugin's `ovsdb` key takes.
    pub fn endpoint(&self) -> String {
        format!("unix:{}", self.db_sock().display())
    }

    /// Runs `ovs-vsctl` against this instance and returns its stdout; panics
    /// on failure. Meant for test set-up and assertions.
    pub fn vsctl(&self, args: &[&str]) -> String {
        let out = self.try_vsctl(args);
        assert!(
            out.status.success(),
            "ovs-vsctl {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Like [`Ovs::vsctl`] but returns the output whatever the exit status,
    /// for tests that expect a failure.
    pub fn try_vsctl(&self, args: &[&str]) -> Output {
        let mut cmd = self.host_command("ovs-vsctl");
        cmd.arg(format!("--db={}", self.endpoint()))
            .arg("--timeout=10")
            .args(args);
        cmd.output()
            .unwrap_or_else(|e| panic!("spawn ovs-vsctl {args:?}: {e}"))
    }

    /// Runs `ovs-ofctl -O OpenFlow13 ARGS...` against this instance's
    /// bridges (their management sockets are in the run dir) and returns
    /// its output whatever the exit status: the tests inspect and plant
    /// flows with OVS's own tool, never with the client under test.
    pub fn ofctl(&self, args: &[&str]) -> Output {
        let mut cmd = self.host_command("ovs-ofctl");
        cmd.arg("-O")
            .arg("OpenFlow13")
            .arg("--timeout=10")
            .args(args);
        cmd.output()
            .unwrap_or_else(|e| panic!("spawn ovs-ofctl {args:?}: {e}"))
    }

    /// `ovs-ofctl dump-flows BRIDGE` with the statistics stripped: one
    /// line per flow, `cookie=..., table=..., priority=...,MATCH actions=...`.
    pub fn flows(&self, bridge: &str) -> Vec<String> {
        let out = self.ofctl(&["dump-flows", bridge, "--no-stats"]);
        assert!(
            out.status.success(),
            "ovs-ofctl dump-flows {bridge}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty() && !l.starts_with("OFPST_FLOW"))
            .collect()
    }

    /// Whether ovsdb-server is running (it may have died on its own).
    pub fn ovsdb_running(&mut self) -> bool {
        running(&mut self.ovsdb)
    }

    /// Whether ovs-vswitchd is running.
    pub fn vswitchd_running(&mut self) -> bool {
        running(&mut self.vswitchd)
    }

    /// Starts ovsdb-server on the existing database (whose contents survive
    /// a kill/start cycle) and waits until its socket accepts connections.
    pub fn start_ovsdb(&mut self) {
        assert!(self.ovsdb.is_none(), "ovsdb-server already started");
        let sock = self.db_sock();
        // A SIGKILLed server leaves its socket behind; waiting for the path
        // to appear would then prove nothing.
        let _ = std::fs::remove_file(&sock);
        let child = self.spawn_daemon(
            "ovsdb",
            &[
                "ovsdb-server",
                &format!("--remote=punix:{}", sock.display()),
                &format!("--pidfile={}", self.path("ovsdb.pid").display()),
                &format!("--unixctl={}", self.path("ovsdb.ctl").display()),
                &format!("--log-file={}", self.path("ovsdb.log").display()),
                &self.path("conf.db").display().to_string(),
            ],
        );
        self.ovsdb = Some(child);
        let deadline = Instant::now() + DAEMON_TIMEOUT;
        // The socket file exists from bind(), before listen(): only a
        // successful connect proves readiness.
        while UnixStream::connect(&sock).is_err() {
            if !self.ovsdb_running() || Instant::now() >= deadline {
                let log = self.log("ovsdb");
                self.stop_all();
                panic!("ovsdb-server did not come up at {}:\n{log}", sock.display());
            }
            sleep(POLL);
        }
    }

    /// Starts ovs-vswitchd and waits until it has applied the current
    /// database configuration.
    pub fn start_vswitchd(&mut self) {
        assert!(self.vswitchd.is_none(), "ovs-vswitchd already started");
        let child = self.spawn_daemon(
            "vswitchd",
            &[
                "ovs-vswitchd",
                &format!("unix:{}", self.db_sock().display()),
                &format!("--pidfile={}", self.path("vswitchd.pid").display()),
                &format!("--unixctl={}", self.path("vswitchd.ctl").display()),
                &format!("--log-file={}", self.path("vswitchd.log").display()),
            ],
        );
        self.vswitchd = Some(child);
        // vswitchd copies next_cfg into cur_cfg once it has applied the
        // database: bumping next_cfg and waiting for cur_cfg (bounded by
        // --timeout) is the readiness signal ovs-vsctl itself relies on.
        let next = self
            .vsctl(&["get", "Open_vSwitch", ".", "next_cfg"])
            .trim()
            .parse::<i64>()
            .unwrap_or(0)
            + 1;
        self.vsctl(&[
            "--no-wait",
            "set",
            "Open_vSwitch",
            ".",
            &format!("next_cfg={next}"),
        ]);
        let out = self.try_vsctl(&[
            "wait-until",
            "Open_vSwitch",
            ".",
            &format!("cur_cfg>={next}"),
        ]);
        if !out.status.success() || !self.vswitchd_running() {
            let log = self.log("vswitchd");
            self.stop_all();
            panic!(
                "ovs-vswitchd did not come up: {}\n{log}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// Stops ovs-vswitchd (SIGTERM, then SIGKILL after a bounded wait). The
    /// database keeps its bridges and ports.
    pub fn kill_vswitchd(&mut self) {
        stop(&mut self.vswitchd);
    }

    /// Stops ovsdb-server (SIGTERM, then SIGKILL after a bounded wait).
    pub fn kill_ovsdb(&mut self) {
        stop(&mut self.ovsdb);
    }

    /// Kills ovs-vswitchd with SIGKILL: a crash, with no exit handlers run
    /// (stale pid file and control socket left behind).
    pub fn crash_vswitchd(&mut self) {
        crash(&mut self.vswitchd);
    }

    /// Freezes ovsdb-server (SIGSTOP): its socket still accepts connections
    /// and nothing answers, as with a daemon that hangs. [`Ovs::resume_ovsdb`]
    /// thaws it; drop does too, before stopping it.
    pub fn pause_ovsdb(&self) {
        signal(&self.ovsdb, nix::sys::signal::Signal::SIGSTOP);
    }

    pub fn resume_ovsdb(&self) {
        signal(&self.ovsdb, nix::sys::signal::Signal::SIGCONT);
    }

    /// Kills ovsdb-server with SIGKILL (its socket file stays behind,
    /// refusing connections).
    pub fn crash_ovsdb(&mut self) {
        crash(&mut self.ovsdb);
    }

    /// Runs `ovs-appctl` against a daemon's control socket (`"ovsdb"` or
    /// `"vswitchd"`) and returns stdout; panics on failure.
    pub fn appctl(&self, daemon: &str, args: &[&str]) -> String {
        let ctl = self.path(&format!("{daemon}.ctl"));
        let mut cmd = self.host_command("ovs-appctl");
        cmd.arg("--timeout=10").arg("-t").arg(&ctl).args(args);
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("spawn ovs-appctl {args:?}: {e}"));
        assert!(
            out.status.success(),
            "ovs-appctl -t {} {args:?} failed: {}",
            ctl.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The last lines of a daemon's log (`"ovsdb"` or `"vswitchd"`), for
    /// failure messages.
    pub fn log(&self, which: &str) -> String {
        let mut text = String::new();
        for file in [format!("{which}.log"), format!("{which}.out")] {
            if let Ok(s) = std::fs::read_to_string(self.path(&file)) {
                let lines: Vec<&str> = s.lines().collect();
                let from = lines.len().saturating_sub(40);
                text.push_str(&format!("--- {file}\n{}\n", lines[from..].join("\n")));
            }
        }
        text
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A command with the OVS directory variables pointing into this
    /// instance's run dir, so nothing falls back to the global defaults.
    fn env(&self, cmd: &mut Command) {
        let dir = self.dir.path();
        cmd.env("OVS_RUNDIR", dir)
            .env("OVS_DBDIR", dir)
            .env("OVS_LOGDIR", dir)
            .env("OVS_SYSCONFDIR", dir)
            .stdin(Stdio::null());
    }

    fn host_command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        self.env(&mut cmd);
        cmd
    }

    /// Spawns a daemon inside the netns. `nsenter --net` without `--fork`
    /// execs the program, so the child's pid is the daemon's pid. Console
    /// output goes to a file: a pipe nobody reads could block the daemon.
    fn spawn_daemon(&self, name: &str, argv: &[&str]) -> Child {
        let out_path = self.path(&format!("{name}.out"));
        let out = File::create(&out_path)
            .unwrap_or_else(|e| panic!("create {}: {e}", out_path.display()));
        let err = out
            .try_clone()
            .unwrap_or_else(|e| panic!("dup {}: {e}", out_path.display()));
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns.display()))
            .arg("--")
            .args(argv);
        self.env(&mut cmd);
        cmd.stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {argv:?}: {e}"))
    }

    fn stop_all(&mut self) {
        // A paused daemon would ignore SIGTERM until SIGKILL.
        self.resume_ovsdb();
        stop(&mut self.vswitchd);
        stop(&mut self.ovsdb);
    }
}

impl Drop for Ovs {
    fn drop(&mut self) {
        // vswitchd first: it would otherwise spin reconnecting to the db.
        self.stop_all();
    }
}

fn signal(child: &Option<Child>, sig: nix::sys::signal::Signal) {
    if let Some(c) = child {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), sig);
    }
}

fn running(child: &mut Option<Child>) -> bool {
    match child {
        Some(c) => matches!(c.try_wait(), Ok(None)),
        None => false,
    }
}

/// SIGTERM, bounded wait, then SIGKILL and reap. Leaves `None` behind.
fn stop(child: &mut Option<Child>) {
    let Some(mut c) = child.take() else { return };
    if let Ok(Some(_)) = c.try_wait() {
        return;
    }
    let pid = i32::try_from(c.id()).map(Pid::from_raw);
    if let Ok(pid) = pid {
        let _ = kill(pid, Signal::SIGTERM);
    }
    let deadline = Instant::now() + DAEMON_TIMEOUT;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        sleep(POLL);
    }
    let _ = c.kill();
    let _ = c.wait();
}

fn crash(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

fn check_output(what: &str, out: std::io::Result<Output>) {
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "{what} failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!("spawn {what}: {e}"),
    }
}
