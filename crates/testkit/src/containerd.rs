//! containerd (Debian's 1.6) as a Kubernetes node runs it, confined to a
//! temp dir and started inside a node's netns: its own root, state, socket
//! and config, the CRI plugin pointed at the test's CNI dirs, the native
//! snapshotter, runc through `io.containerd.runc.v2`, and a pause image
//! built here and imported, because no registry is reachable.
//!
//! What it cannot confine: the shims' sockets live in `/run/containerd/s`
//! (1.6 hard-codes that dir; each shim removes its own socket when it
//! exits, the empty dir stays) and libcni's result cache in
//! `/var/lib/cni/results`. runc's state goes under our dir (the runc
//! options' `Root`; the default is `/run/containerd/runc`). Sandbox
//! netns mounts go under our state dir (`netns_mounts_under_state_dir`),
//! not `/run/netns`, and sandbox cgroups under a cgroup parent of our own.
//! Drop stops and removes every sandbox through the CRI, then stops
//! containerd, kills any shim and pause process left, unmounts what is
//! still mounted under our dir and removes our cgroups.

use std::io::Write;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::cri::{Cri, CriError};
use crate::netns::unique_name;
use crate::plugin::RUNTIME_PATH;
use crate::process::processes;

/// The sandbox image reference containerd's `sandbox_image` names.
pub const PAUSE_IMAGE: &str = "localhost/evio-pause:test";
/// Bound for one CRI call; RunPodSandbox includes the CNI ADD.
pub const CRI_TIMEOUT: Duration = Duration::from_secs(60);
const START_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// The pause process: busybox sh as PID 1 of the sandbox, exiting at once
/// on SIGTERM (a trapped signal interrupts `wait`; `sleep` alone would
/// delay it until the sleep ends). A PID 1 without a handler ignores
/// SIGTERM, which would leave containerd waiting for its stop timeout.
const PAUSE_SCRIPT: &str = "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done";

#[derive(Debug, thiserror::Error)]
pub enum ContainerdError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{what}: {detail}")]
    Step { what: String, detail: String },
    #[error(transparent)]
    Cri(#[from] CriError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ContainerdError {
    let what = what.into();
    move |source| ContainerdError::Io { what, source }
}

/// The node-side directories containerd's CRI plugin uses for CNI.
pub struct CniDirs {
    pub bin_dir: PathBuf,
    pub conf_dir: PathBuf,
}

/// A running containerd; see the module docs.
pub struct Containerd {
    dir: tempfile::TempDir,
    netns: PathBuf,
    child: Option<Child>,
    cgroup_parent: String,
}

impl Containerd {
    /// Writes the config, starts containerd in the netns at `netns`, waits
    /// until its CRI answers with the network ready, and imports the pause
    /// image.
    pub fn start(netns: &Path, cni: &CniDirs) -> Result<Containerd, ContainerdError> {
        let dir = tempfile::Builder::new()
            .prefix("evio-ctd-")
            .tempdir()
            .map_err(io("temp dir"))?;
        let mut c = Containerd {
            dir,
            netns: netns.to_path_buf(),
            child: None,
            cgroup_parent: format!("/{}", unique_name("evio-ctd-")),
        };
        c.write_config(cni)?;
        c.spawn()?;
        c.wait_ready()?;
        let archive = build_pause_image(&c.dir.path().join("image"))?;
        c.import(&archive)?;
        Ok(c)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    /// Where the CRI plugin mounts sandbox netns.
    pub fn netns_dir(&self) -> PathBuf {
        self.dir
            .path()
            .join("state/io.containerd.grpc.v1.cri/netns")
    }

    /// The cgroup parent to give sandboxes (cgroupfs path).
    pub fn cgroup_parent(&self) -> &str {
        &self.cgroup_parent
    }

    pub fn cri(&self) -> Result<Cri, CriError> {
        Cri::connect(&self.socket(), CRI_TIMEOUT)
    }

    fn write_config(&self, cni: &CniDirs) -> Result<(), ContainerdError> {
        let d = self.dir.path();
        // Only what a pod sandbox needs: the native snapshotter (overlayfs
        // over this machine's filesystem is not guaranteed), none of the
        // others, no /opt/containerd (the "opt" plugin), no tracing.
        // AppArmor is not loaded here and the OOM score adjustment must not
        // go below the test's own.
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = [
  "io.containerd.internal.v1.opt",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.overlayfs",
  "io.containerd.tracing.processor.v1.otlp",
]

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{sock}.ttrpc"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  netns_mounts_under_state_dir = true
  disable_apparmor = true
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{bin}"
    conf_dir = "{conf}"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = "{runc_root}"
"#,
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = self.socket().display(),
            pause = PAUSE_IMAGE,
            bin = cni.bin_dir.display(),
            conf = cni.conf_dir.display(),
            runc_root = d.join("runc").display(),
        );
        let path = d.join("config.toml");
        std::fs::write(&path, config).map_err(io(path.display().to_string()))
    }

    fn spawn(&mut self) -> Result<(), ContainerdError> {
        let d = self.dir.path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("containerd.log"))
            .map_err(io("containerd.log"))?;
        let log2 = log.try_clone().map_err(io("containerd.log"))?;
        // nsenter --net only: containerd keeps the machine's mount
        // namespace (its bind mounts must be visible to the shims) and
        // runs in the node netns, where libcni then runs our plugin.
        let child = Command::new("nsenter")
            .arg(format!("--net={}", self.netns.display()))
            .arg("--")
            .arg("containerd")
            .arg("--config")
            .arg(d.join("config.toml"))
            .env("PATH", RUNTIME_PATH)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(io("spawn containerd (install containerd)"))?;
        self.child = Some(child);
        Ok(())
    }

    /// Bounded wait until the CRI answers and reports the network ready
    /// (the CRI plugin has loaded our conflist).
    fn wait_ready(&mut self) -> Result<(), ContainerdError> {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut last = String::new();
        loop {
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                return Err(ContainerdError::Step {
                    what: "start containerd".into(),
                    detail: format!("exited with {st}:\n{}", self.log_tail(30)),
                });
            }
            if self.socket().exists() {
                match Cri::connect(&self.socket(), Duration::from_secs(5))
                    .and_then(|mut c| c.status())
                {
                    Ok(conds) => {
                        let ready = |t: &str| conds.get(t).is_some_and(|(ok, _)| *ok);
                        if ready("RuntimeReady") && ready("NetworkReady") {
                            return Ok(());
                        }
                        last = format!("{conds:?}");
                    }
                    Err(e) => last = e.to_string(),
                }
            }
            if Instant::now() >= deadline {
                return Err(ContainerdError::Step {
                    what: "start containerd".into(),
                    detail: format!(
                        "not ready within {START_TIMEOUT:?}: {last}\n{}",
                        self.log_tail(30)
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn import(&self, archive: &Path) -> Result<(), ContainerdError> {
        let out = crate::plugin::run_bounded(
            {
                let mut c = Command::new("ctr");
                c.arg("--address")
                    .arg(self.socket())
                    .args([
                        "-n",
                        "k8s.io",
                        "images",
                        "import",
                        "--snapshotter",
                        "native",
                    ])
                    .arg(archive);
                c
            },
            b"",
            START_TIMEOUT,
        );
        if !out.success() {
            return Err(ContainerdError::Step {
                what: "ctr images import".into(),
                detail: out.to_string(),
            });
        }
        Ok(())
    }

    /// Stops containerd (SIGTERM, bounded, then SIGKILL). Shims and their
    /// sandboxes keep running, as on a node where containerd restarts.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(st)) => return Some(st),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => {
                    let _ = child.kill();
                    return child.wait().ok();
                }
            }
        }
    }

    /// Stops and starts containerd again with the same root and state.
    pub fn restart(&mut self) -> Result<(), ContainerdError> {
        self.stop();
        self.spawn()?;
        self.wait_ready()
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text =
            std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Processes other than containerd itself that belong to this instance:
    /// the shims (their command line names our socket) and everything
    /// below them (pause processes, runc).
    pub fn leftover_processes(&self) -> Vec<(i32, String)> {
        let marker = self.dir.path().display().to_string();
        let me = self.child.as_ref().map(|c| c.id() as i32);
        // Zombies hold nothing: only live processes count as left over.
        let procs: Vec<_> = processes().into_iter().filter(|p| p.state != "Z").collect();
        let mut ours: Vec<i32> = procs
            .iter()
            .filter(|p| p.cmdline.contains(&marker) && Some(p.pid) != me)
            .map(|p| p.pid)
            .collect();
        // Descendants, to a fixed point.
        loop {
            let more: Vec<i32> = procs
                .iter()
                .filter(|p| ours.contains(&p.ppid) && !ours.contains(&p.pid))
                .map(|p| p.pid)
                .collect();
            if more.is_empty() {
                break;
            }
            ours.extend(more);
        }
        procs
            .into_iter()
            .filter(|p| ours.contains(&p.pid))
            .map(|p| (p.pid, format!("{} ({})", p.cmdline, p.comm)))
            .collect()
    }

    /// Mounts under our dir (sandbox netns, shm, rootfs), deepest first.
    pub fn mounts(&self) -> Vec<PathBuf> {
        let marker = self.dir.path();
        let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut v: Vec<PathBuf> = text
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .map(|m| PathBuf::from(m.replace("\\040", " ")))
            .filter(|m| m.starts_with(marker))
            .collect();
        v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        v
    }

    /// Our sandbox cgroups' parent dirs that still exist: per v1 hierarchy,
    /// or the one of the unified (v2) hierarchy.
    pub fn cgroups(&self) -> Vec<PathBuf> {
        let rel = self.cgroup_parent.trim_start_matches('/');
        let root = PathBuf::from("/sys/fs/cgroup");
        std::fs::read_dir(&root)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .chain(std::iter::once(root))
            .map(|h| h.join(rel))
            .filter(|p| p.is_dir())
            .collect()
    }

    fn cleanup(&mut self) -> Vec<String> {
        let mut errors = Vec::new();
        if self.is_running() {
            match self.cri() {
                Ok(mut cri) => {
                    for s in cri.list_pod_sandboxes().unwrap_or_default() {
                        if let Err(e) = cri.stop_pod_sandbox(&s.id) {
                            errors.push(format!("stop {}: {e}", s.id));
                        }
                        if let Err(e) = cri.remove_pod_sandbox(&s.id) {
                            errors.push(format!("remove {}: {e}", s.id));
                        }
                    }
                }
                Err(e) => errors.push(format!("CRI for cleanup: {e}")),
            }
        }
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            reap_adopted();
            let left = self.leftover_processes();
            if left.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                errors.push(format!("killed leftover processes: {left:?}"));
                for (pid, _) in left {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
                std::thread::sleep(Duration::from_millis(200));
                reap_adopted();
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        for m in self.mounts() {
            errors.push(format!("unmounted leftover {}", m.display()));
            let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
        }
        for cg in self.cgroups() {
            // Leaf cgroups first: rmdir only removes empty ones.
            let mut dirs: Vec<PathBuf> = walk_dirs(&cg);
            dirs.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
            for d in dirs {
                if let Err(e) = std::fs::remove_dir(&d) {
                    errors.push(format!("rmdir {}: {e}", d.display()));
                }
            }
        }
        errors
    }

    /// Tears down (see the module docs) and says what had to be forced.
    pub fn shutdown(mut self) -> Vec<String> {
        self.cleanup()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        for e in self.cleanup() {
            eprintln!("containerd teardown: {e}");
        }
    }
}

/// Reaps zombie shims re-parented to this process (a test that made itself
/// a child subreaper adopts them when their starter exits).
pub fn reap_adopted() {
    crate::process::reap_adopted(|comm| comm.starts_with("containerd-shim"));
}

fn walk_dirs(root: &Path) -> Vec<PathBuf> {
    let mut out = vec![root.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        let children: Vec<PathBuf> = std::fs::read_dir(&out[i])
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir() && !p.is_symlink())
            .collect();
        out.extend(children);
        i += 1;
    }
    out
}

fn sha256_hex(data: &[u8]) -> String {
    format!("{:x}", Sha256::digest(data))
}

/// Writes an OCI image archive of the pause image under `dir` and returns
/// its path: one uncompressed layer with busybox-static as `sh` and
/// `sleep`, a config whose entrypoint is [`PAUSE_SCRIPT`], and an index
/// naming it [`PAUSE_IMAGE`] (the `io.containerd.image.name` annotation is
/// what `ctr images import` names it by).
pub fn build_pause_image(dir: &Path) -> Result<PathBuf, ContainerdError> {
    let rootfs = dir.join("rootfs");
    let layout = dir.join("oci");
    let blobs = layout.join("blobs/sha256");
    for d in [&rootfs.join("bin"), &blobs] {
        std::fs::create_dir_all(d).map_err(io(d.display().to_string()))?;
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox"))
        .map_err(io("copy /bin/busybox (install busybox-static)"))?;
    for applet in ["sh", "sleep"] {
        symlink("busybox", rootfs.join("bin").join(applet)).map_err(io(applet))?;
    }
    let layer_tar = dir.join("layer.tar");
    tar(&[
        "--sort=name",
        "--owner=0",
        "--group=0",
        "--numeric-owner",
        "--mtime=@0",
        "-C",
        &rootfs.display().to_string(),
        "-cf",
        &layer_tar.display().to_string(),
        ".",
    ])?;
    let layer = std::fs::read(&layer_tar).map_err(io("read layer.tar"))?;
    let blob = |data: &[u8]| -> Result<(String, usize), ContainerdError> {
        let digest = sha256_hex(data);
        let path = blobs.join(&digest);
        std::fs::write(&path, data).map_err(io(path.display().to_string()))?;
        Ok((format!("sha256:{digest}"), data.len()))
    };
    let (layer_digest, layer_size) = blob(&layer)?;
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": ["/bin/sh", "-c", PAUSE_SCRIPT]},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    });
    let (config_digest, config_size) = blob(config.to_string().as_bytes())?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config_size,
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest,
            "size": layer_size,
        }],
    });
    let (manifest_digest, manifest_size) = blob(manifest.to_string().as_bytes())?;
    let tag = PAUSE_IMAGE.rsplit(':').next().unwrap_or("latest");
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest_size,
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {
                "io.containerd.image.name": PAUSE_IMAGE,
                "org.opencontainers.image.ref.name": tag,
            },
        }],
    });
    for (name, text) in [
        ("index.json", index.to_string()),
        (
            "oci-layout",
            json!({"imageLayoutVersion": "1.0.0"}).to_string(),
        ),
    ] {
        let mut f = std::fs::File::create(layout.join(name)).map_err(io(name))?;
        f.write_all(text.as_bytes()).map_err(io(name))?;
    }
    let archive = dir.join("pause.oci.tar");
    tar(&[
        "-C",
        &layout.display().to_string(),
        "-cf",
        &archive.display().to_string(),
        ".",
    ])?;
    Ok(archive)
}

fn tar(args: &[&str]) -> Result<(), ContainerdError> {
    let out = Command::new("tar")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(io("spawn tar"))?;
    if !out.status.success() {
        return Err(ContainerdError::Step {
            what: format!("tar {args:?}"),
            detail: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(())
}
