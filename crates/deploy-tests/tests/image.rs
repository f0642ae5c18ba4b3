//! The container image: built offline by deploy/build-image.sh from the
//! workspace's binaries, run with podman, removed again. Everything podman
//! stores goes to a private temporary root, so the test neither depends on
//! nor changes the machine's images and containers.
// Test support: a harness that unwraps fails the test that called it, loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

const STEP: Duration = Duration::from_secs(120);

/// Podman with private storage and this machine's required settings:
/// runc (crun refuses the hybrid cgroup layout), cgroupfs, ulimits within
/// the hard limits, vfs storage (no overlay mounts can outlive a failed run).
struct Podman {
    dir: tempfile::TempDir,
    images: Vec<String>,
}

impl Podman {
    fn new() -> Podman {
        let dir = tempfile::Builder::new()
            .prefix("evio-image-test.")
            .tempdir()
            .expect("tempdir");
        let cni = dir.path().join("cni");
        std::fs::create_dir_all(&cni).expect("mkdir cni");
        let conf = format!(
            "[containers]\n\
             default_ulimits = [\"nofile=10000:10000\", \"nproc=4096:4096\"]\n\
             [network]\n\
             network_backend = \"cni\"\n\
             cni_plugin_dirs = [\"/usr/lib/cni\"]\n\
             network_config_dir = \"{}\"\n\
             [engine]\n\
             events_logger = \"none\"\n",
            cni.display()
        );
        std::fs::write(dir.path().join("containers.conf"), conf).expect("write containers.conf");
        std::fs::create_dir_all(dir.path().join("tmp")).expect("mkdir tmp");
        Podman {
            dir,
            images: Vec::new(),
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn global_opts(&self) -> Vec<String> {
        let mut v = Vec::new();
        for (flag, sub) in [
            ("--root", "root"),
            ("--runroot", "runroot"),
            ("--tmpdir", "libpod-tmp"),
        ] {
            v.push(flag.to_string());
            v.push(self.path(sub).display().to_string());
        }
        for o in [
            "--storage-driver",
            "vfs",
            "--runtime",
            "runc",
            "--cgroup-manager",
            "cgroupfs",
        ] {
            v.push(o.to_string());
        }
        v
    }

    fn env(&self, cmd: &mut Command) {
        cmd.env("CONTAINERS_CONF", self.path("containers.conf"))
            .env("TMPDIR", self.path("tmp"));
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("podman");
        c.args(self.global_opts()).args(args);
        self.env(&mut c);
        c
    }

    fn run(&self, args: &[&str], stdin: Option<&[u8]>) -> Run {
        run_bounded(&mut self.command(args), stdin, STEP)
    }

    fn build_image(&mut self, bin_dir: &Path, tag: &str) -> Run {
        let mut cmd = Command::new("bash");
        cmd.arg(deploy_dir().join("build-image.sh"))
            .arg("--bin-dir")
            .arg(bin_dir)
            .args(["--tag", tag])
            .env("PODMAN_OPTS", self.global_opts().join(" "));
        self.env(&mut cmd);
        self.images.push(tag.to_string());
        run_bounded(&mut cmd, None, STEP)
    }

    /// `podman run --rm --network none IMAGE ARGV...`: the container gets no
    /// network at all, so nothing touches the machine's network namespace.
    fn run_in(&self, image: &str, extra: &[&str], argv: &[&str], stdin: Option<&[u8]>) -> Run {
        let mut a = vec!["run", "--rm", "--network", "none"];
        if stdin.is_some() {
            a.push("-i");
        }
        a.extend_from_slice(extra);
        a.push(image);
        a.extend_from_slice(argv);
        self.run(&a, stdin)
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = run_bounded(&mut self.command(&["rm", "-a", "-f"]), None, STEP);
        for img in &self.images {
            let _ = run_bounded(&mut self.command(&["rmi", "-f", img]), None, STEP);
        }
        // The storage is private, so removing everything in it is safe;
        // TempDir then deletes the directory itself.
        let _ = run_bounded(&mut self.command(&["rmi", "-a", "-f"]), None, STEP);
    }
}

fn show(r: &Run) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        r.status, r.stdout, r.stderr
    )
}

#[test]
fn image_from_workspace_built_evio_and_evio_node_builds_offline_and_runs() {
    let bin_dir = target_profile_dir();
    require_bin("evio", "evio-plugin");
    require_bin("evio-node", "evio-node");
    let have_podman = Command::new("podman").arg("--version").output();
    assert!(
        have_podman.is_ok_and(|o| o.status.success()),
        "podman is required; install it with .ci/install-deps"
    );

    let mut podman = Podman::new();
    let tag = format!(
        "localhost/evio-cni-test-{}:{}",
        std::process::id(),
        workspace_version()
    );
    let built = podman.build_image(&bin_dir, &tag);
    assert!(built.ok(), "build-image.sh failed:\n{}", show(&built));

    // The acceptance check: `evio-node --version` found through PATH.
    let v = podman.run_in(&tag, &[], &["evio-node", "--version"], None);
    assert!(v.ok(), "evio-node --version in the image:\n{}", show(&v));
    let want = format!("evio-node {}", workspace_version());
    assert_eq!(v.stdout.trim(), want, "{}", show(&v));

    // The exact executables the DaemonSets run, and their exec probes run,
    // exist in the image.
    let docs = load_manifests();
    let spec = pod_spec(&daemonset(&docs));
    let mut commands = BTreeSet::new();
    for c in every_container(&docs) {
        commands.extend(c.command.as_ref().and_then(|cmd| cmd.first().cloned()));
        for p in [&c.startup_probe, &c.liveness_probe, &c.readiness_probe] {
            commands.extend(
                p.as_ref()
                    .and_then(|p| p.exec.as_ref())
                    .and_then(|e| e.command.as_ref())
                    .and_then(|cmd| cmd.first().cloned()),
            );
        }
    }
    for exe in &commands {
        let r = podman.run_in(&tag, &[], &[exe, "--version"], None);
        assert!(r.ok(), "{exe} from the DaemonSet:\n{}", show(&r));
        assert_eq!(r.stdout.trim(), want);
    }

    // install-cni's --src holds the plugin, and the plugin answers VERSION
    // with the image's libraries (it runs on the host later; a static build
    // needs none).
    let src = flag(&container_by_sub(&spec, "install-cni"), "--src").expect("--src");
    let plugin = format!("{}/evio", src.trim_end_matches('/'));
    let r = podman.run_in(
        &tag,
        &["-e", "CNI_COMMAND=VERSION"],
        &[&plugin],
        Some(br#"{"cniVersion":"1.1.0"}"#),
    );
    assert!(r.ok(), "{plugin} VERSION in the image:\n{}", show(&r));
    let out: serde_json::Value = serde_json::from_str(r.stdout.trim())
        .unwrap_or_else(|e| panic!("VERSION output is not JSON ({e}):\n{}", show(&r)));
    let versions = out["supportedVersions"]
        .as_array()
        .unwrap_or_else(|| panic!("no supportedVersions: {out}"));
    assert!(versions.iter().any(|v| v == "1.1.0"), "{out}");

    let inspect = podman.run(
        &[
            "image",
            "inspect",
            "--format",
            "{{index .Labels \"org.opencontainers.image.version\"}}",
            &tag,
        ],
        None,
    );
    assert!(inspect.ok(), "{}", show(&inspect));
    assert_eq!(inspect.stdout.trim(), workspace_version());

    // Removal is part of the test, not just cleanup: a stuck image would
    // make every later build leak storage.
    let rm = podman.run(&["rmi", &tag], None);
    assert!(rm.ok(), "rmi:\n{}", show(&rm));
    podman.images.clear();
    let left = podman.run(&["images", "-q"], None);
    assert!(
        left.ok() && left.stdout.trim().is_empty(),
        "{}",
        show(&left)
    );
}

#[test]
fn build_script_names_the_missing_binary_and_how_to_build_it() {
    let empty = tempfile::tempdir().expect("tempdir");
    let mut cmd = Command::new("bash");
    cmd.arg(deploy_dir().join("build-image.sh"))
        .arg("--bin-dir")
        .arg(empty.path())
        // Never reached: the script must stop before calling podman.
        .env("PODMAN", "/nonexistent/podman");
    let r = run_bounded(&mut cmd, None, STEP);
    assert!(!r.ok(), "{}", show(&r));
    assert!(r.stderr.contains("/evio is missing"), "{}", show(&r));
    assert!(r.stderr.contains("cargo build --release"), "{}", show(&r));
}
