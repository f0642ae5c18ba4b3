//! The container image: built offline by deploy/build-image.sh from the
//! workspace's binaries, run with podman, removed again. Everything podman
//! stores goes to a private temporary root, so the test neither depends on
//! nor changes the machine's images and containers.
// Test support: a harness that unwraps fails the test that called it, loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

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

/// A tag of its own per test and process, under deploy/image.env's name.
fn test_tag(which: &str) -> String {
    format!(
        "{}-test-{which}-{}:{}",
        image_repo(),
        std::process::id(),
        workspace_version()
    )
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
    let tag = test_tag("single");
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

const CROSS_TARGET: &str = "aarch64-unknown-linux-gnu";
/// Debian's arm64 cross sysroot (libc6-dev-arm64-cross): the libraries a
/// dynamically linked arm64 evio-node loads when run on this machine.
const SYSROOT: &str = "/usr/aarch64-linux-gnu";
const QEMU: &str = "qemu-aarch64-static";
/// A cold cross build of evio-node and the plugin, one job at a time, takes
/// many minutes; it happens once, later runs reuse its output.
const CROSS_BUILD: Duration = Duration::from_secs(3600);
const EM_AARCH64: u16 = 183;

/// target/aarch64-unknown-linux-gnu/release with `evio` and `evio-node`,
/// cross-built by the build script itself if either is missing, so the test
/// checks what the script produces and the build is paid for once.
fn arm64_bin_dir() -> PathBuf {
    let target = target_profile_dir()
        .parent()
        .expect("target/<profile> has a parent")
        .to_path_buf();
    let dir = target.join(CROSS_TARGET).join("release");
    if !(dir.join("evio").is_file() && dir.join("evio-node").is_file()) {
        let mut cmd = Command::new("bash");
        cmd.arg(deploy_dir().join("build-image.sh"))
            .args(["--build", "--platforms", "arm64", "--binaries-only"])
            .env("CARGO_TARGET_DIR", &target)
            // What this test checks is the script's cross toolchain wiring
            // and that its arm64 output runs, not the optimiser: without
            // these the cold cross build (LTO, opt-level 3) is several
            // minutes of CI's 45-minute budget. An operator's
            // `build-image.sh` uses the release profile as it is.
            .env("CARGO_PROFILE_RELEASE_OPT_LEVEL", "0")
            .env("CARGO_PROFILE_RELEASE_LTO", "off")
            .env("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "16");
        let r = run_bounded(&mut cmd, None, CROSS_BUILD);
        assert!(r.ok(), "arm64 cross build:\n{}", show(&r));
    }
    dir
}

/// (ELF machine, has a PT_INTERP program header, i.e. is dynamically linked).
fn elf_machine_and_interp(path: &Path) -> (u16, bool) {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    assert!(
        b.len() > 0x40 && b[..4] == *b"\x7fELF" && b[4] == 2 && b[5] == 1,
        "{} is not a 64-bit little-endian ELF file",
        path.display()
    );
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let machine = u16_at(18);
    let phoff = usize::try_from(u64::from_le_bytes(b[0x20..0x28].try_into().unwrap())).unwrap();
    let (phentsize, phnum) = (usize::from(u16_at(0x36)), usize::from(u16_at(0x38)));
    const PT_INTERP: u32 = 3;
    let interp = (0..phnum).any(|i| {
        let o = phoff + i * phentsize;
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) == PT_INTERP
    });
    (machine, interp)
}

/// `qemu-aarch64-static [-L ROOT] BIN ARGS...` called directly: binfmt_misc
/// need not be registered (it is not in this container) and nothing runs as
/// a container.
fn qemu(
    root: Option<&Path>,
    bin: &Path,
    args: &[&str],
    env: &[(&str, &str)],
    stdin: Option<&[u8]>,
) -> Run {
    let mut cmd = Command::new(QEMU);
    if let Some(r) = root {
        cmd.arg("-L").arg(r);
    }
    cmd.arg(bin).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    run_bounded(&mut cmd, stdin, STEP)
}

fn check_plugin_version(r: &Run) {
    assert!(r.ok(), "plugin VERSION under qemu:\n{}", show(r));
    let out: serde_json::Value = serde_json::from_str(r.stdout.trim())
        .unwrap_or_else(|e| panic!("VERSION output is not JSON ({e}):\n{}", show(r)));
    let versions = out["supportedVersions"]
        .as_array()
        .unwrap_or_else(|| panic!("no supportedVersions: {out}"));
    assert!(versions.iter().any(|v| v == "1.1.0"), "{out}");
}

#[test]
fn arm64_binaries_run_under_qemu_and_the_manifest_list_has_both_platforms() {
    for (tool, pkg) in [
        (QEMU, "qemu-user-static"),
        ("podman", "podman"),
        ("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"),
    ] {
        let ok = Command::new(tool).arg("--version").output();
        assert!(
            ok.is_ok_and(|o| o.status.success()),
            "{tool} is required (Debian package {pkg}); install it with .ci/install-deps"
        );
    }
    let bin_dir = target_profile_dir();
    require_bin("evio", "evio-plugin");
    require_bin("evio-node", "evio-node");
    let arm = arm64_bin_dir();
    let want = format!("evio-node {}", workspace_version());

    // What the build produced: arm64 code, evio-node dynamic (its libraries
    // come from the sysroot), the plugin static (it runs on hosts whose
    // libraries nobody controls).
    let (m, dynamic) = elf_machine_and_interp(&arm.join("evio-node"));
    assert_eq!(m, EM_AARCH64, "evio-node machine");
    assert!(dynamic, "evio-node is expected to be dynamically linked");
    let (m, dynamic) = elf_machine_and_interp(&arm.join("evio"));
    assert_eq!(m, EM_AARCH64, "evio machine");
    assert!(!dynamic, "the arm64 plugin must be statically linked");

    // The acceptance check: the arm64 binaries answer under qemu. The
    // plugin's version command is CNI's VERSION, it has no --version.
    let r = qemu(
        Some(Path::new(SYSROOT)),
        &arm.join("evio-node"),
        &["--version"],
        &[],
        None,
    );
    assert!(r.ok(), "arm64 evio-node --version:\n{}", show(&r));
    assert_eq!(r.stdout.trim(), want, "{}", show(&r));
    let r = qemu(
        None,
        &arm.join("evio"),
        &[],
        &[("CNI_COMMAND", "VERSION")],
        Some(br#"{"cniVersion":"1.1.0"}"#),
    );
    check_plugin_version(&r);

    // One manifest list with both platforms, built offline.
    let mut podman = Podman::new();
    let tag = test_tag("multi");
    let context = podman.path("context");
    let mut cmd = Command::new("bash");
    cmd.arg(deploy_dir().join("build-image.sh"))
        .arg("--bin-dir")
        .arg(&bin_dir)
        .arg("--cross-bin-dir")
        .arg(&arm)
        .args(["--platforms", "amd64,arm64", "--tag", &tag])
        .arg("--context")
        .arg(&context)
        .env("PODMAN_OPTS", podman.global_opts().join(" "));
    podman.env(&mut cmd);
    podman.images.push(tag.clone());
    for a in ["amd64", "arm64"] {
        podman.images.push(format!("{tag}-{a}"));
    }
    // Two images, each a full copy with vfs storage.
    let built = run_bounded(&mut cmd, None, 3 * STEP);
    assert!(built.ok(), "build-image.sh --platforms:\n{}", show(&built));

    let inspect = podman.run(&["manifest", "inspect", &tag], None);
    assert!(inspect.ok(), "{}", show(&inspect));
    let list: serde_json::Value = serde_json::from_str(&inspect.stdout)
        .unwrap_or_else(|e| panic!("manifest inspect is not JSON ({e}):\n{}", show(&inspect)));
    let platforms: BTreeSet<(String, String)> = list["manifests"]
        .as_array()
        .unwrap_or_else(|| panic!("no manifests: {list}"))
        .iter()
        .map(|m| {
            let p = &m["platform"];
            (
                p["os"].as_str().unwrap_or_default().to_string(),
                p["architecture"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let expect: BTreeSet<(String, String)> = [("linux", "amd64"), ("linux", "arm64")]
        .iter()
        .map(|(o, a)| (o.to_string(), a.to_string()))
        .collect();
    assert_eq!(platforms, expect, "{list}");
    assert_eq!(
        list["manifests"].as_array().map(Vec::len),
        Some(2),
        "{list}"
    );

    for a in ["amd64", "arm64"] {
        let r = podman.run(
            &[
                "image",
                "inspect",
                "--format",
                "{{.Os}}/{{.Architecture}}",
                &format!("{tag}-{a}"),
            ],
            None,
        );
        assert!(r.ok(), "{}", show(&r));
        assert_eq!(r.stdout.trim(), format!("linux/{a}"));
    }
    // The amd64 instance runs here natively.
    let v = podman.run_in(
        &format!("{tag}-amd64"),
        &[],
        &["evio-node", "--version"],
        None,
    );
    assert!(v.ok(), "{}", show(&v));
    assert_eq!(v.stdout.trim(), want);

    // The arm64 image's root file system, as staged, is enough on its own:
    // evio-node finds its loader and libraries there and nowhere else (the
    // host has no arm64 libraries outside the sysroot, which is not in it).
    let rootfs = context.join("arm64").join("rootfs");
    let r = qemu(
        Some(&rootfs),
        &rootfs.join("usr/local/bin/evio-node"),
        &["--version"],
        &[],
        None,
    );
    assert!(r.ok(), "arm64 image evio-node --version:\n{}", show(&r));
    assert_eq!(r.stdout.trim(), want);
    let r = qemu(
        Some(&rootfs),
        &rootfs.join("opt/evio/cni-bin/evio"),
        &[],
        &[("CNI_COMMAND", "VERSION")],
        Some(br#"{"cniVersion":"1.1.0"}"#),
    );
    check_plugin_version(&r);
}
