//! Shared by the deploy tests: loading deploy/*.yaml into the Kubernetes API
//! types, finding the workspace's built binaries, bounded process runs.
//! Each test binary uses a different subset.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Namespace, PodSpec, Secret, ServiceAccount, Volume, VolumeMount,
};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub fn workspace_root() -> PathBuf {
    // crates/deploy-tests -> workspace root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("crate lives two levels below the workspace root")
        .to_path_buf()
}

pub fn deploy_dir() -> PathBuf {
    workspace_root().join("deploy")
}

/// Every object kind the manifests may contain. Anything else is a test
/// failure: a new kind needs its own wiring checks here.
#[derive(Debug, Clone)]
pub enum Object {
    Namespace(Box<Namespace>),
    ServiceAccount(Box<ServiceAccount>),
    ClusterRole(Box<ClusterRole>),
    ClusterRoleBinding(Box<ClusterRoleBinding>),
    Role(Box<Role>),
    RoleBinding(Box<RoleBinding>),
    ConfigMap(Box<ConfigMap>),
    Secret(Box<Secret>),
    DaemonSet(Box<DaemonSet>),
}

#[derive(Debug, Clone)]
pub struct Doc {
    /// `file#index`, for messages.
    pub origin: String,
    pub object: Object,
}

/// Deserializes into `T` and proves nothing was dropped on the way:
/// k8s-openapi silently ignores unknown fields, so a misspelt key
/// (`hostNetwrok: true`) would otherwise pass and do nothing in a cluster.
fn typed<T: DeserializeOwned + Serialize>(raw: &Value) -> Result<T, String> {
    let t: T = serde_json::from_value(raw.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&t).map_err(|e| e.to_string())?;
    let mut diffs = Vec::new();
    diff("", raw, &back, &mut diffs);
    if diffs.is_empty() {
        Ok(t)
    } else {
        Err(format!(
            "fields lost or changed by the API types (misspelt or misplaced keys?): {}",
            diffs.join("; ")
        ))
    }
}

fn diff(path: &str, want: &Value, got: &Value, out: &mut Vec<String>) {
    match (want, got) {
        (Value::Object(w), Value::Object(g)) => {
            for (k, wv) in w {
                let p = format!("{path}.{k}");
                match g.get(k) {
                    Some(gv) => diff(&p, wv, gv, out),
                    None => out.push(format!("{p} unknown")),
                }
            }
            for k in g.keys().filter(|k| !w.contains_key(*k)) {
                out.push(format!("{path}.{k} added"));
            }
        }
        (Value::Array(w), Value::Array(g)) if w.len() == g.len() => {
            for (i, (wv, gv)) in w.iter().zip(g).enumerate() {
                diff(&format!("{path}[{i}]"), wv, gv, out);
            }
        }
        _ if want == got => {}
        _ => out.push(format!("{path}: {want} became {got}")),
    }
}

/// Parses a YAML stream (several `---` documents) into typed objects.
pub fn parse_stream(name: &str, text: &str) -> Result<Vec<Doc>, String> {
    let mut docs = Vec::new();
    for (i, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let origin = format!("{name}#{i}");
        let raw = Value::deserialize(de).map_err(|e| format!("{origin}: YAML: {e}"))?;
        // Comment-only documents are skipped by kubectl too.
        if raw.is_null() {
            continue;
        }
        let kind = raw
            .get("kind")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("{origin}: no kind"))?;
        let object = match kind {
            "Namespace" => typed(&raw).map(Object::Namespace),
            "ServiceAccount" => typed(&raw).map(Object::ServiceAccount),
            "ClusterRole" => typed(&raw).map(Object::ClusterRole),
            "ClusterRoleBinding" => typed(&raw).map(Object::ClusterRoleBinding),
            "Role" => typed(&raw).map(Object::Role),
            "RoleBinding" => typed(&raw).map(Object::RoleBinding),
            "ConfigMap" => typed(&raw).map(Object::ConfigMap),
            "Secret" => typed(&raw).map(Object::Secret),
            "DaemonSet" => typed(&raw).map(Object::DaemonSet),
            other => Err(format!("unknown kind {other:?}")),
        }
        .map_err(|e| format!("{origin} ({kind}): {e}"))?;
        docs.push(Doc { origin, object });
    }
    Ok(docs)
}

/// The manifest files `kubectl apply -f deploy/` would read.
pub fn manifest_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .expect("read deploy/")
        .map(|e| e.expect("deploy/ entry").path())
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            )
        })
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "no manifests in {}",
        deploy_dir().display()
    );
    files
}

/// Every document of every manifest; panics on the first that fails to parse.
pub fn load_manifests() -> Vec<Doc> {
    let mut all = Vec::new();
    for f in manifest_files() {
        let text = std::fs::read_to_string(&f).expect("read manifest");
        let name = f.file_name().map(|n| n.to_string_lossy().into_owned());
        let name = name.unwrap_or_default();
        match parse_stream(&name, &text) {
            Ok(docs) => all.extend(docs),
            Err(e) => panic!("{e}"),
        }
    }
    all
}

/// The DaemonSet every cluster applies (plugin, config-gen, run).
pub const MAIN_DAEMONSET: &str = "evio-cni";
/// The optional DaemonSet running the overlay agent (deploy/evio-agent.yaml).
pub const AGENT_DAEMONSET: &str = "evio-agent";

/// Every DaemonSet with the manifest file it comes from.
pub fn daemonsets(docs: &[Doc]) -> Vec<(String, DaemonSet)> {
    docs.iter()
        .filter_map(|d| match &d.object {
            Object::DaemonSet(ds) => {
                let file = d.origin.split('#').next().unwrap_or_default();
                Some((file.to_string(), (**ds).clone()))
            }
            _ => None,
        })
        .collect()
}

pub fn daemonset_named(docs: &[Doc], name: &str) -> DaemonSet {
    let found: Vec<DaemonSet> = daemonsets(docs)
        .into_iter()
        .map(|(_, ds)| ds)
        .filter(|ds| ds.metadata.name.as_deref() == Some(name))
        .collect();
    assert_eq!(found.len(), 1, "expected exactly one DaemonSet {name}");
    found.into_iter().next().expect("one DaemonSet")
}

/// The main DaemonSet of the deployment.
pub fn daemonset(docs: &[Doc]) -> DaemonSet {
    daemonset_named(docs, MAIN_DAEMONSET)
}

/// The optional overlay agent DaemonSet.
pub fn agent_daemonset(docs: &[Doc]) -> DaemonSet {
    daemonset_named(docs, AGENT_DAEMONSET)
}

/// Every container of every DaemonSet, init containers first.
pub fn every_container(docs: &[Doc]) -> Vec<Container> {
    daemonsets(docs)
        .iter()
        .flat_map(|(_, ds)| all_containers(&pod_spec(ds)))
        .collect()
}

pub fn pod_spec(ds: &DaemonSet) -> PodSpec {
    ds.spec
        .template
        .spec
        .clone()
        .expect("DaemonSet has a pod template spec")
}

/// The `evio-node` subcommand a container runs (`install-cni`, `config-gen`,
/// `run`): containers are identified by what they do, not by their names.
pub fn subcommand(c: &Container) -> String {
    let cmd = c.command.as_deref().unwrap_or_default();
    assert!(
        cmd.len() >= 2 && cmd[0].ends_with("/evio-node"),
        "container {} must run `/…/evio-node SUBCOMMAND`, has command {cmd:?}",
        c.name
    );
    cmd[1].clone()
}

pub fn args(c: &Container) -> Vec<String> {
    c.args.clone().unwrap_or_default()
}

/// Value of `--flag V` or `--flag=V`.
pub fn flag(c: &Container, name: &str) -> Option<String> {
    let a = args(c);
    let prefix = format!("{name}=");
    for (i, x) in a.iter().enumerate() {
        if x == name {
            return a.get(i + 1).cloned();
        }
        if let Some(v) = x.strip_prefix(&prefix) {
            return Some(v.to_string());
        }
    }
    None
}

/// All containers, init containers first, in start order.
pub fn all_containers(spec: &PodSpec) -> Vec<Container> {
    let mut v = spec.init_containers.clone().unwrap_or_default();
    v.extend(spec.containers.clone());
    v
}

pub fn container_by_sub(spec: &PodSpec, sub: &str) -> Container {
    let found: Vec<Container> = all_containers(spec)
        .into_iter()
        .filter(|c| subcommand(c) == sub)
        .collect();
    assert_eq!(found.len(), 1, "expected one container running `{sub}`");
    found.into_iter().next().expect("one container")
}

pub fn volume<'a>(spec: &'a PodSpec, name: &str) -> Option<&'a Volume> {
    spec.volumes.as_deref()?.iter().find(|v| v.name == name)
}

pub fn host_path_volume<'a>(spec: &'a PodSpec, path: &str) -> &'a Volume {
    let vols = spec.volumes.as_deref().unwrap_or_default();
    let found: Vec<&Volume> = vols
        .iter()
        .filter(|v| {
            v.host_path
                .as_ref()
                .is_some_and(|h| h.path.trim_end_matches('/') == path)
        })
        .collect();
    assert_eq!(found.len(), 1, "expected one hostPath volume for {path}");
    found[0]
}

pub fn mount<'a>(c: &'a Container, volume: &str) -> Option<&'a VolumeMount> {
    c.volume_mounts
        .as_deref()?
        .iter()
        .find(|m| m.name == volume)
}

pub fn workspace_version() -> &'static str {
    // This package takes its version from [workspace.package] like the binaries.
    env!("CARGO_PKG_VERSION")
}

/// target/<profile>/ of the running test: tests live in target/<profile>/deps/.
pub fn target_profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps")
        .to_path_buf()
}

/// A workspace binary built by Cargo. `cargo test -p evio-deploy-tests` does
/// not build other packages' binaries (a workspace-wide `cargo test` does,
/// for their own integration tests), so a missing one fails with the command
/// that builds it instead of silently skipping.
pub fn require_bin(name: &str, package: &str) -> PathBuf {
    let dir = target_profile_dir();
    let p = dir.join(name);
    let profile = if dir.ends_with("release") {
        " --release"
    } else {
        ""
    };
    assert!(
        p.is_file(),
        "{} is missing: this test uses the workspace's built binaries; run \
         `cargo build{profile} -p {package}` (or a workspace-wide `cargo test`, which builds it) first",
        p.display()
    );
    p
}

pub struct Run {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn ok(&self) -> bool {
        self.status.success()
    }
}

/// Runs `cmd` with an optional stdin payload and a hard deadline: a hung
/// podman or binary fails the test instead of hanging it.
pub fn run_bounded(cmd: &mut Command, stdin: Option<&[u8]>, limit: Duration) -> Run {
    let mut child = cmd
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    if let (Some(data), Some(mut w)) = (stdin, child.stdin.take()) {
        // Dropping `w` afterwards closes the pipe so the child sees EOF.
        let _ = w.write_all(data);
    }
    let mut out_pipe = child.stdout.take().expect("piped stdout");
    let mut err_pipe = child.stderr.take().expect("piped stderr");
    let out_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out_pipe.read_to_end(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err_pipe.read_to_end(&mut s);
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait().expect("wait") {
            Some(s) => break s,
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{cmd:?} did not finish within {limit:?}");
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let stdout = String::from_utf8_lossy(&out_t.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err_t.join().unwrap_or_default()).into_owned();
    Run {
        status,
        stdout,
        stderr,
    }
}

/// What every `image:` line of deploy/*.yaml says until deploy/render.sh
/// fills in the reference.
pub const IMAGE_PLACEHOLDER: &str = "EVIO_IMAGE";

/// `EVIO_IMAGE_REPO` from deploy/image.env, the one place the image name
/// lives (build-image.sh and render.sh source the same file).
pub fn image_repo() -> String {
    let path = deploy_dir().join("image.env");
    let text = std::fs::read_to_string(&path).expect("read deploy/image.env");
    let values: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("EVIO_IMAGE_REPO="))
        .collect();
    assert_eq!(
        values.len(),
        1,
        "one EVIO_IMAGE_REPO= line in {}",
        path.display()
    );
    let repo = values[0].trim().to_string();
    assert!(
        !repo.is_empty(),
        "empty EVIO_IMAGE_REPO in {}",
        path.display()
    );
    repo
}

/// The reference build-image.sh tags and render.sh writes by default.
pub fn default_image() -> String {
    format!("{}:{}", image_repo(), workspace_version())
}

/// `deploy/render.sh ARGS...` with the caller's extra environment.
pub fn render(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new("bash");
    cmd.arg(deploy_dir().join("render.sh"))
        .args(args)
        .env_remove("EVIO_IMAGE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    run_bounded(&mut cmd, None, Duration::from_secs(30))
}
