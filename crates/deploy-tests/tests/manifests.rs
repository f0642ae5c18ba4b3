//! The manifests in deploy/ parsed into the Kubernetes API types, and their
//! wiring checked: what kubectl would accept is not enough, the pieces have
//! to point at each other (volumes, flags, ports, names, RBAC subjects).
// Test support: a harness that unwraps fails the test that called it, loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;
use k8s_openapi::api::core::v1::{ConfigMap, Container, HTTPGetAction, PodSpec, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::Value;

const NAMESPACE: &str = "kube-system";
const CONF_FILE_KEY: &str = "net-conf.json";
const ETCD_EXAMPLE: &str = "examples/net-conf-etcd.json";
/// net-conf.json keys naming etcd credential files, and the Secret key each
/// is documented to come from.
const ETCD_FILE_KEYS: &[(&str, &str)] = &[
    ("etcdCACert", "ca.crt"),
    ("etcdCert", "tls.crt"),
    ("etcdKey", "tls.key"),
    ("etcdUsernameFile", "username"),
    ("etcdPasswordFile", "password"),
];

/// Containers allowed to run privileged, each justified by a
/// `# evio: privileged <container>: <reason>` comment in the manifest.
/// None needs it: NET_ADMIN is enough for what evio-node does.
const JUSTIFIED_PRIVILEGED: &[&str] = &[];
const ALLOWED_ADDED_CAPS: &[&str] = &["NET_ADMIN", "NET_RAW"];

fn setup() -> (Vec<Doc>, PodSpec) {
    let docs = load_manifests();
    let spec = pod_spec(&daemonset(&docs));
    (docs, spec)
}

fn config_map(docs: &[Doc]) -> ConfigMap {
    let cms: Vec<ConfigMap> = docs
        .iter()
        .filter_map(|d| match &d.object {
            Object::ConfigMap(c) => Some((**c).clone()),
            _ => None,
        })
        .collect();
    assert_eq!(cms.len(), 1, "expected exactly one ConfigMap");
    cms.into_iter().next().expect("one ConfigMap")
}

fn net_conf(docs: &[Doc]) -> Value {
    let cm = config_map(docs);
    let text = cm
        .data
        .as_ref()
        .and_then(|d| d.get(CONF_FILE_KEY))
        .unwrap_or_else(|| panic!("ConfigMap has no {CONF_FILE_KEY}"));
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{CONF_FILE_KEY} is not JSON: {e}"))
}

fn namespace_of(d: &Doc) -> Option<String> {
    let meta = match &d.object {
        Object::Namespace(_) | Object::ClusterRole(_) | Object::ClusterRoleBinding(_) => {
            return None
        }
        Object::ServiceAccount(o) => &o.metadata,
        Object::Role(o) => &o.metadata,
        Object::RoleBinding(o) => &o.metadata,
        Object::ConfigMap(o) => &o.metadata,
        Object::Secret(o) => &o.metadata,
        Object::DaemonSet(o) => &o.metadata,
    };
    Some(meta.namespace.clone().unwrap_or_default())
}

#[test]
fn every_document_parses_into_the_api_types_without_lost_fields() {
    let docs = load_manifests();
    let kinds: BTreeSet<&str> = docs
        .iter()
        .map(|d| match &d.object {
            Object::Namespace(_) => "Namespace",
            Object::ServiceAccount(_) => "ServiceAccount",
            Object::ClusterRole(_) => "ClusterRole",
            Object::ClusterRoleBinding(_) => "ClusterRoleBinding",
            Object::Role(_) => "Role",
            Object::RoleBinding(_) => "RoleBinding",
            Object::ConfigMap(_) => "ConfigMap",
            Object::Secret(_) => "Secret",
            Object::DaemonSet(_) => "DaemonSet",
        })
        .collect();
    for k in [
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "DaemonSet",
    ] {
        assert!(kinds.contains(k), "deploy/ has no {k}");
    }
    for d in &docs {
        if let Some(ns) = namespace_of(d) {
            assert_eq!(ns, NAMESPACE, "{}: namespace", d.origin);
        }
    }
}

#[test]
fn the_parser_rejects_unknown_kinds_misspelt_fields_and_wrong_api_versions() {
    let unknown = "apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n";
    assert!(parse_stream("t", unknown)
        .unwrap_err()
        .contains("unknown kind"));
    let typo = "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: x}\nautomountToken: false\n";
    assert!(parse_stream("t", typo)
        .unwrap_err()
        .contains("automountToken"));
    let nested_typo = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x, namespce: y}\n";
    assert!(parse_stream("t", nested_typo)
        .unwrap_err()
        .contains("namespce"));
    let wrong_api = "apiVersion: apps/v1beta2\nkind: DaemonSet\nmetadata: {name: x}\n";
    assert!(parse_stream("t", wrong_api).is_err());
    let ok = "# comment only\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {name: x}\n";
    assert_eq!(parse_stream("t", ok).map(|d| d.len()), Ok(1));
}

#[test]
fn daemonset_runs_on_every_node_in_the_host_network() {
    let docs = load_manifests();
    let ds = daemonset(&docs);
    let spec = pod_spec(&ds);
    assert_eq!(spec.host_network, Some(true), "hostNetwork");
    assert_ne!(spec.host_pid, Some(true), "hostPID is not needed");
    assert_ne!(spec.host_ipc, Some(true), "hostIPC is not needed");
    assert_eq!(
        spec.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    // Cluster DNS needs the pod network, so it cannot be what evio resolves with.
    assert_eq!(spec.dns_policy.as_deref(), Some("Default"));
    let tolerations = spec.tolerations.clone().unwrap_or_default();
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "needs a toleration for every taint (operator Exists, no key, no effect): {tolerations:?}"
    );
    let selector = ds.spec.selector.match_labels.clone().unwrap_or_default();
    let labels = ds
        .spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    assert!(!selector.is_empty(), "selector matchLabels");
    for (k, v) in &selector {
        assert_eq!(
            labels.get(k),
            Some(v),
            "template labels must match selector {k}"
        );
    }
    let sa_names: Vec<String> = docs
        .iter()
        .filter_map(|d| match &d.object {
            Object::ServiceAccount(sa) => sa.metadata.name.clone(),
            _ => None,
        })
        .collect();
    let sa = spec.service_account_name.clone().unwrap_or_default();
    assert!(
        sa_names.contains(&sa),
        "serviceAccountName {sa:?} not declared"
    );
}

#[test]
fn containers_are_install_cni_then_config_gen_then_run_from_one_image() {
    let (_, spec) = setup();
    let init: Vec<String> = spec
        .init_containers
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(subcommand)
        .collect();
    assert_eq!(init, ["install-cni", "config-gen"]);
    let main: Vec<String> = spec.containers.iter().map(subcommand).collect();
    assert_eq!(main, ["run"]);
    // Every container of both DaemonSets names the image through the one
    // placeholder render.sh fills in, never a reference of its own.
    for c in every_container(&load_manifests()) {
        assert_eq!(
            c.image.as_deref(),
            Some(IMAGE_PLACEHOLDER),
            "{} image",
            c.name
        );
    }
}

/// The rendered manifests, parsed: what `deploy/render.sh ... | kubectl
/// apply -f -` sends.
fn rendered(args: &[&str], env: &[(&str, &str)]) -> Vec<Doc> {
    let r = render(args, env);
    assert!(
        r.ok(),
        "render.sh {args:?}: status {}\n{}",
        r.status,
        r.stderr
    );
    parse_stream("render.sh output", &r.stdout).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn render_fills_every_image_with_the_build_scripts_default_tag_or_the_one_given() {
    let files = [
        deploy_dir().join("evio-cni.yaml").display().to_string(),
        deploy_dir().join("evio-agent.yaml").display().to_string(),
    ];
    let files: Vec<&str> = files.iter().map(String::as_str).collect();
    let raw = load_manifests();
    // Same documents as the files, in one stream: only the images differ.
    let docs = rendered(&files, &[]);
    assert_eq!(docs.len(), raw.len());
    let containers = every_container(&docs);
    assert_eq!(containers.len(), every_container(&raw).len());
    // deploy/image.env plus the workspace version: build-image.sh's default
    // tag (image.rs builds with the same file, so the two cannot drift).
    let want = default_image();
    for c in &containers {
        assert_eq!(c.image.as_deref(), Some(want.as_str()), "{} image", c.name);
    }

    let mine = "registry.example.com/edge/evio-cni:9.9.9";
    for (args, env) in [
        (vec!["--image", mine], vec![]),
        (vec![], vec![("EVIO_IMAGE", mine)]),
    ] {
        let mut a = args.clone();
        a.extend_from_slice(&files);
        for c in every_container(&rendered(&a, &env)) {
            assert_eq!(c.image.as_deref(), Some(mine), "{} image", c.name);
        }
    }

    // A reference that would break the sed expression or the YAML is refused.
    let bad = render(&["--image", "a|b c"], &[]);
    assert!(!bad.ok(), "{}", bad.stdout);
    assert!(
        bad.stderr.contains("not an image reference"),
        "{}",
        bad.stderr
    );
}

#[test]
fn no_manifest_or_test_hard_codes_an_image_reference() {
    let repo = image_repo();
    let manifests = manifest_files();
    let mut files = manifests.clone();
    for dir in [
        "crates/deploy-tests/tests",
        "crates/deploy-tests/tests/common",
    ] {
        for e in std::fs::read_dir(workspace_root().join(dir)).expect("read tests") {
            let p = e.expect("entry").path();
            if p.extension().is_some_and(|x| x == "rs") {
                files.push(p);
            }
        }
    }
    for f in files {
        let text = std::fs::read_to_string(&f).expect("read");
        for (n, line) in text.lines().enumerate() {
            // A registry-less `localhost/` name anywhere in a manifest is a
            // build-host-only leftover, whatever image.env says.
            let local = manifests.contains(&f) && line.contains("localhost/");
            assert!(
                !local && !line.contains(&repo),
                "{}:{}: image reference outside deploy/image.env: {line}",
                f.display(),
                n + 1
            );
        }
    }
}

#[test]
fn every_volume_mount_refers_to_a_declared_volume_and_every_volume_is_used() {
    for (_, ds) in daemonsets(&load_manifests()) {
        volumes_are_consistent(&pod_spec(&ds));
    }
}

fn volumes_are_consistent(spec: &PodSpec) {
    let declared: Vec<&str> = spec
        .volumes
        .as_deref()
        .unwrap_or_default()
        .iter()
        .map(|v| v.name.as_str())
        .collect();
    let unique: BTreeSet<&str> = declared.iter().copied().collect();
    assert_eq!(unique.len(), declared.len(), "duplicate volume names");
    let mut used = BTreeSet::new();
    for c in all_containers(spec) {
        let mut paths = BTreeSet::new();
        for m in c.volume_mounts.as_deref().unwrap_or_default() {
            assert!(
                unique.contains(m.name.as_str()),
                "{}: mount of undeclared volume {}",
                c.name,
                m.name
            );
            assert!(
                paths.insert(m.mount_path.clone()),
                "{}: two mounts at {}",
                c.name,
                m.mount_path
            );
            used.insert(m.name.clone());
        }
    }
    for v in unique {
        assert!(used.contains(v), "volume {v} is declared but never mounted");
    }
}

#[test]
fn cni_bin_host_path_is_where_install_cni_writes() {
    let (_, spec) = setup();
    let vol = host_path_volume(&spec, "/opt/cni/bin");
    for c in all_containers(&spec) {
        let m = mount(&c, &vol.name);
        if subcommand(&c) == "install-cni" {
            let m = m.expect("install-cni mounts the host's /opt/cni/bin");
            assert_ne!(m.read_only, Some(true), "install-cni must write it");
            assert_eq!(flag(&c, "--dest").as_deref(), Some(m.mount_path.as_str()));
            let src = flag(&c, "--src").expect("install-cni --src");
            assert!(src.starts_with('/'), "--src {src} must be absolute");
            // --src is inside the image, not a mount.
            assert!(c
                .volume_mounts
                .as_deref()
                .unwrap_or_default()
                .iter()
                .all(|other| !src.starts_with(&other.mount_path)));
        } else {
            assert!(m.is_none(), "{} has no business in /opt/cni/bin", c.name);
        }
    }
}

#[test]
fn cni_conf_dir_host_path_is_where_config_gen_and_run_write() {
    let (_, spec) = setup();
    let vol = host_path_volume(&spec, "/etc/cni/net.d");
    for sub in ["config-gen", "run"] {
        let c = container_by_sub(&spec, sub);
        let m = mount(&c, &vol.name).unwrap_or_else(|| panic!("{sub} mounts /etc/cni/net.d"));
        assert_ne!(m.read_only, Some(true), "{sub} writes the conflist");
        assert_eq!(
            flag(&c, "--cni-conf-dir").as_deref(),
            Some(m.mount_path.as_str()),
            "{sub} --cni-conf-dir"
        );
    }
    assert!(mount(&container_by_sub(&spec, "install-cni"), &vol.name).is_none());
}

#[test]
fn config_flag_points_at_the_mounted_configmap_key() {
    let (docs, spec) = setup();
    let cm = config_map(&docs);
    let cm_name = cm.metadata.name.clone().unwrap_or_default();
    let vols: Vec<_> = spec
        .volumes
        .as_deref()
        .unwrap_or_default()
        .iter()
        .filter(|v| v.config_map.as_ref().map(|c| c.name.as_str()) == Some(cm_name.as_str()))
        .collect();
    assert_eq!(vols.len(), 1, "one volume of ConfigMap {cm_name}");
    let vol = vols[0];
    assert!(
        vol.config_map
            .as_ref()
            .and_then(|c| c.items.as_ref())
            .is_none(),
        "all keys are projected, so the file is named after the key"
    );
    for sub in ["config-gen", "run"] {
        let c = container_by_sub(&spec, sub);
        let m = mount(&c, &vol.name).unwrap_or_else(|| panic!("{sub} mounts the ConfigMap"));
        let want = format!("{}/{CONF_FILE_KEY}", m.mount_path.trim_end_matches('/'));
        assert_eq!(flag(&c, "--config"), Some(want), "{sub} --config");
    }
}

/// The file store is the single-node opt-out ("singleNode": true with
/// evio_subnet's default URL): it must still mean the same host file in
/// every container.
#[test]
fn file_store_lives_on_the_host_at_the_same_path_in_every_container() {
    let (_, spec) = setup();
    let evio_subnet::StoreUrl::File(path) =
        evio_subnet::StoreUrl::parse(evio_subnet::DEFAULT_STORE).expect("default store parses")
    else {
        panic!("evio_subnet's default store is not a file");
    };
    let dir = path.parent().expect("file has a directory");
    let dir = dir.to_str().expect("utf-8 path");
    let vol = host_path_volume(&spec, dir);
    for sub in ["config-gen", "run"] {
        let c = container_by_sub(&spec, sub);
        let m = mount(&c, &vol.name).unwrap_or_else(|| panic!("{sub} mounts {dir}"));
        // Same path inside and out: `evio-node subnets list` on the host must
        // read the same file the URL names.
        assert_eq!(m.mount_path.trim_end_matches('/'), dir, "{sub}");
        assert_ne!(m.read_only, Some(true), "{sub} updates the store");
    }
}

#[test]
fn etcd_credentials_come_from_an_optional_secret_not_literals() {
    let (docs, spec) = setup();
    let secrets: Vec<_> = spec
        .volumes
        .as_deref()
        .unwrap_or_default()
        .iter()
        .filter_map(|v| v.secret.as_ref().map(|s| (v.name.clone(), s.clone())))
        .collect();
    assert_eq!(secrets.len(), 1, "one Secret volume for etcd credentials");
    let (vol, secret) = &secrets[0];
    assert_eq!(
        secret.optional,
        Some(true),
        "the file store needs no Secret"
    );
    let name = secret.secret_name.clone().expect("secretName");
    assert!(
        secret.default_mode.is_some_and(|m| m & 0o077 == 0),
        "credentials readable by their owner only: {:?}",
        secret.default_mode.map(|m| format!("{m:o}"))
    );
    for d in &docs {
        if let Object::Secret(s) = &d.object {
            assert!(
                s.data.is_none() && s.string_data.is_none(),
                "{}: Secret {name} with literal data in deploy/",
                d.origin
            );
        }
    }
    let mut mount_paths = BTreeSet::new();
    for sub in ["config-gen", "run"] {
        let c = container_by_sub(&spec, sub);
        let m = mount(&c, vol).unwrap_or_else(|| panic!("{sub} mounts the etcd Secret"));
        assert_eq!(m.read_only, Some(true), "{sub}");
        mount_paths.insert(m.mount_path.trim_end_matches('/').to_string());
    }
    assert_eq!(
        mount_paths.len(),
        1,
        "one path, so one net-conf.json serves both"
    );
    let dir = mount_paths.into_iter().next().expect("one path");

    // The etcd example operators copy into the ConfigMap points into that
    // mount, at the Secret keys the ConfigMap comment tells them to create.
    let example_path = deploy_dir().join(ETCD_EXAMPLE);
    let example: Value =
        serde_json::from_str(&std::fs::read_to_string(&example_path).expect("read etcd example"))
            .expect("etcd example is JSON");
    let store = example["dataStore"].as_str().expect("dataStore");
    assert!(matches!(
        evio_subnet::StoreUrl::parse(store),
        Ok(evio_subnet::StoreUrl::Etcd(_))
    ));
    let mut files = 0;
    let shipped = net_conf(&docs);
    for (k, v) in example.as_object().expect("object") {
        if let Some(file_key) = ETCD_FILE_KEYS.iter().find(|(key, _)| key == k) {
            let want = format!("{dir}/{}", file_key.1);
            assert_eq!(v.as_str(), Some(want.as_str()), "{k}");
            files += 1;
        } else if k != "dataStore" {
            assert_eq!(
                Some(v),
                shipped.get(k),
                "{k} differs from the shipped ConfigMap"
            );
        }
    }
    assert!(files >= 1, "the example sets no etcd credential file");
    let yaml = std::fs::read_to_string(deploy_dir().join("evio-cni.yaml")).expect("read");
    assert!(
        yaml.contains(ETCD_EXAMPLE),
        "the ConfigMap comment names the example"
    );
    for (key, secret_key) in ETCD_FILE_KEYS {
        assert!(
            yaml.contains(key) && yaml.contains(secret_key),
            "the ConfigMap comment documents {key} ({secret_key})"
        );
    }
    // No credential travels through env or args.
    for c in every_container(&docs) {
        for e in c.env.as_deref().unwrap_or_default() {
            let n = e.name.to_ascii_lowercase();
            assert!(
                !(n.contains("password") || n.contains("token") || n.contains("key")),
                "{}: env {} looks like a credential",
                c.name,
                e.name
            );
        }
    }
}

#[test]
fn node_name_comes_from_the_downward_api() {
    let docs = load_manifests();
    let spec = pod_spec(&daemonset(&docs));
    let agent = pod_spec(&agent_daemonset(&docs));
    for (sub, c) in [
        ("config-gen", container_by_sub(&spec, "config-gen")),
        ("run", container_by_sub(&spec, "run")),
        ("agent", container_by_sub(&agent, "agent")),
    ] {
        let env = c.env.clone().unwrap_or_default();
        let nn = env
            .iter()
            .find(|e| e.name == "NODE_NAME")
            .unwrap_or_else(|| panic!("{sub}: no NODE_NAME"));
        let field = nn
            .value_from
            .as_ref()
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.as_str());
        assert_eq!(field, Some("spec.nodeName"), "{sub}: NODE_NAME source");
        assert!(nn.value.is_none());
    }
}

/// Kubernetes expands `$(VAR)` in args only for variables the container
/// defines; anything else is passed literally.
#[test]
fn every_variable_reference_in_args_is_defined() {
    for c in every_container(&load_manifests()) {
        let defined: BTreeSet<String> = c
            .env
            .as_deref()
            .unwrap_or_default()
            .iter()
            .map(|e| e.name.clone())
            .collect();
        for a in args(&c) {
            let mut rest = a.as_str();
            while let Some(start) = rest.find("$(") {
                let after = &rest[start + 2..];
                let end = after
                    .find(')')
                    .unwrap_or_else(|| panic!("{}: unclosed $( in {a}", c.name));
                let var = &after[..end];
                assert!(defined.contains(var), "{}: $({var}) undefined", c.name);
                rest = &after[end..];
            }
        }
    }
}

/// Reasons in `# evio: privileged <container>: <reason>` comments.
fn privileged_justifications() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for f in manifest_files() {
        let text = std::fs::read_to_string(&f).expect("read manifest");
        for line in text.lines() {
            if let Some(rest) = line.trim_start().strip_prefix("# evio: privileged ") {
                if let Some((name, reason)) = rest.split_once(':') {
                    if !reason.trim().is_empty() {
                        out.insert(name.trim().to_string());
                    }
                }
            }
        }
    }
    out
}

#[test]
fn capabilities_not_privileged() {
    let docs = load_manifests();
    let mut privileged = BTreeSet::new();
    for c in every_container(&docs) {
        let sc = c
            .security_context
            .clone()
            .unwrap_or_else(|| panic!("{}: no securityContext", c.name));
        if sc.privileged == Some(true) {
            privileged.insert(c.name.clone());
        }
        assert_eq!(sc.allow_privilege_escalation, Some(false), "{}", c.name);
        assert_eq!(sc.read_only_root_filesystem, Some(true), "{}", c.name);
        let caps = sc.capabilities.clone().unwrap_or_default();
        assert_eq!(
            caps.drop.as_deref(),
            Some(&["ALL".to_string()][..]),
            "{}: start from no capabilities",
            c.name
        );
        let added = caps.add.clone().unwrap_or_default();
        for cap in &added {
            assert!(
                ALLOWED_ADDED_CAPS.contains(&cap.as_str()),
                "{}: capability {cap} beyond NET_ADMIN/NET_RAW",
                c.name
            );
        }
        // run brings the bridge up; the agent creates TAP/TUN devices and
        // configures links. Nothing opens raw sockets: no NET_RAW.
        let wants_net_admin = matches!(subcommand(&c).as_str(), "run" | "agent");
        assert_eq!(
            added.iter().any(|a| a == "NET_ADMIN"),
            wants_net_admin,
            "{}: NET_ADMIN only where the node's network is managed",
            c.name
        );
        assert!(
            !added.iter().any(|a| a == "NET_RAW"),
            "{}: NET_RAW is not needed",
            c.name
        );
    }
    let justified = privileged_justifications();
    assert_eq!(
        privileged, justified,
        "privileged containers and their justifying comments must match"
    );
    let expected: BTreeSet<String> = JUSTIFIED_PRIVILEGED.iter().map(|s| s.to_string()).collect();
    assert_eq!(privileged, expected, "privileged containers");
}

fn http_get(p: &Option<Probe>, what: &str) -> HTTPGetAction {
    p.as_ref()
        .and_then(|p| p.http_get.clone())
        .unwrap_or_else(|| panic!("{what}: needs an httpGet probe"))
}

fn resolve_port(c: &Container, port: &IntOrString) -> i32 {
    let ports = c.ports.clone().unwrap_or_default();
    let n = match port {
        IntOrString::Int(n) => *n,
        IntOrString::String(name) => {
            ports
                .iter()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .unwrap_or_else(|| panic!("{}: probe port {name} not declared", c.name))
                .container_port
        }
    };
    assert!(
        ports.iter().any(|p| p.container_port == n),
        "{}: probe port {n} not exposed",
        c.name
    );
    n
}

#[test]
fn probes_hit_livez_and_readyz_on_the_port_run_listens_on() {
    let (docs, spec) = setup();
    let c = container_by_sub(&spec, "run");
    // hostNetwork: kubelet probes the node's address, so a loopback-only
    // listener would fail every probe; the wildcard address would also
    // serve the pod bridge and the overlay. `run` serves HOST_IP, the
    // node's IP from the downward API, and --listen must not override it.
    assert!(
        flag(&c, "--listen").is_none(),
        "run --listen overrides HOST_IP"
    );
    let host_ip = c
        .env
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|e| e.name == "HOST_IP")
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.field_ref.as_ref())
        .map(|f| f.field_path.clone());
    assert_eq!(
        host_ip.as_deref(),
        Some("status.hostIP"),
        "run: HOST_IP source"
    );
    let port: u16 = flag(&c, "--port")
        .unwrap_or_else(|| "9471".into())
        .parse()
        .expect("--port is a port");
    assert_eq!(port, 9471);
    // Liveness is run's own loop (/livez): restarting run repairs neither
    // the store nor the agent. Readiness (/readyz) is the store's health
    // and the agent's.
    for (what, probe, want) in [
        ("livenessProbe", &c.liveness_probe, "/livez"),
        ("readinessProbe", &c.readiness_probe, "/readyz"),
    ] {
        let g = http_get(probe, what);
        assert_eq!(g.path.as_deref(), Some(want), "{what} path");
        assert_eq!(resolve_port(&c, &g.port), i32::from(port), "{what} port");
        assert!(g.host.is_none(), "{what}: the pod IP is the node IP");
    }
    for p in c.ports.as_deref().unwrap_or_default() {
        assert!(
            p.host_port.is_none() || p.host_port == Some(p.container_port),
            "hostNetwork requires hostPort == containerPort"
        );
    }
    let ann = daemonset(&docs)
        .spec
        .template
        .metadata
        .and_then(|m| m.annotations)
        .unwrap_or_default();
    assert_eq!(
        ann.get("prometheus.io/port").map(String::as_str),
        Some(port.to_string().as_str())
    );
    for c in all_containers(&spec) {
        if subcommand(&c) != "run" {
            assert!(c.liveness_probe.is_none() && c.readiness_probe.is_none());
        }
    }
}

#[test]
fn net_conf_json_parses_and_has_the_documented_defaults() {
    let docs = load_manifests();
    let conf = net_conf(&docs);
    let cidr = conf["podCIDR"].as_str().expect("podCIDR string");
    let bits = conf["nodeBits"].as_u64().expect("nodeBits number");
    let pod = evio_subnet::PodNetwork::parse(cidr, u32::try_from(bits).expect("small"))
        .expect("podCIDR + nodeBits accepted by evio-subnet");
    assert_eq!(pod.capacity(), 256);
    let store = conf["dataStore"].as_str().expect("dataStore");
    evio_subnet::StoreUrl::parse(store).expect("dataStore accepted by evio-subnet");
    let bridge = conf["bridge"].as_str().expect("bridge");
    assert!(!bridge.is_empty() && bridge.len() <= 15);
    let want = serde_json::json!({
        "name": "evio",
        "podCIDR": "10.244.0.0/16",
        "nodeBits": 8,
        "bridge": "evio0",
        "bridgeType": "ovs",
        "ovsDatapath": "auto",
        "ipMasq": true,
        "isDefaultGateway": true,
        "dataStore": "etcd://192.0.2.10:2379",
        "etcdCACert": "/etc/evio/etcd/ca.crt",
        "etcdCert": "/etc/evio/etcd/tls.crt",
        "etcdKey": "/etc/evio/etcd/tls.key",
        "hostCIDR": "10.10.0.0/16",
        "hostInterface": "evio-host",
        "overlay": {
            "listenPort": 5800,
            "stun": [],
            "turn": [],
            "keyFile": "/var/lib/evio/agent.key",
            "networkKeyFile": "/etc/evio/network-key/network.key",
        },
    });
    assert_eq!(conf, want);
    // With the overlay configured, config-gen picks the MTU that fits the
    // tunnel (1380 on a 1500 underlay): an explicit 1500 would be refused.
    assert!(conf.get("mtu").is_none(), "mtu left to config-gen");
}

/// The shipped defaults cannot hand two nodes one subnet (an etcd store,
/// not a per-node file, and no singleNode opt-out), pods get a default
/// route, and the store's TLS files are the `evio-etcd` Secret's keys at
/// its mount.
#[test]
fn shipped_config_uses_etcd_over_tls_from_the_secret_and_a_default_route() {
    let (docs, spec) = setup();
    let conf = net_conf(&docs);
    let store = conf["dataStore"].as_str().expect("dataStore");
    assert!(
        matches!(
            evio_subnet::StoreUrl::parse(store),
            Ok(evio_subnet::StoreUrl::Etcd(_))
        ),
        "{store}"
    );
    assert!(conf.get("singleNode").is_none(), "no single-node opt-out");
    assert_eq!(conf["isDefaultGateway"], true);
    let c = container_by_sub(&spec, "config-gen");
    let secret_vol = spec
        .volumes
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|v| {
            v.secret
                .as_ref()
                .is_some_and(|s| s.secret_name.as_deref() == Some("evio-etcd"))
        })
        .expect("the evio-etcd Secret volume")
        .name
        .clone();
    let dir = mount(&c, &secret_vol)
        .expect("config-gen mounts evio-etcd")
        .mount_path
        .clone();
    for (key, file) in [
        ("etcdCACert", "ca.crt"),
        ("etcdCert", "tls.crt"),
        ("etcdKey", "tls.key"),
    ] {
        assert_eq!(
            conf[key].as_str(),
            Some(format!("{}/{file}", dir.trim_end_matches('/')).as_str()),
            "{key}"
        );
    }
    let text = std::fs::read_to_string(deploy_dir().join("evio-cni.yaml")).expect("read");
    for word in [
        "singleNode",
        "isDefaultGateway",
        "conflistName",
        "192.0.2.10",
    ] {
        assert!(
            text.contains(word),
            "the ConfigMap comment documents {word}"
        );
    }
}

/// `kubectl exec ... evio-node doctor` runs in the `run` container: it
/// needs host-local's allocations (read-only) and the CNI configs.
#[test]
fn run_container_mounts_the_cni_state_read_only_for_doctor() {
    let (_, spec) = setup();
    let vol = host_path_volume(&spec, "/var/lib/cni");
    let c = container_by_sub(&spec, "run");
    let m = mount(&c, &vol.name).expect("run mounts /var/lib/cni");
    assert_eq!(m.mount_path.trim_end_matches('/'), "/var/lib/cni");
    assert_eq!(m.read_only, Some(true), "doctor changes nothing");
    for sub in ["config-gen", "install-cni"] {
        let c = container_by_sub(&spec, sub);
        assert!(mount(&c, &vol.name).is_none(), "{sub} has no use for it");
    }
    // The documented line names this container and the mounted config.
    let readme = readme();
    let line = readme
        .lines()
        .find(|l| l.contains("kubectl") && l.contains("exec") && l.contains("doctor"))
        .expect("README documents kubectl exec ... doctor");
    assert!(line.contains(&format!("-c {}", c.name)), "{line}");
    assert!(
        line.contains("--config /etc/evio/config/net-conf.json"),
        "{line}"
    );
}

#[test]
fn configmap_tells_operators_the_file_store_is_single_node() {
    let text = std::fs::read_to_string(deploy_dir().join("evio-cni.yaml")).expect("read");
    assert!(text.contains("only") && text.contains("coordinates one machine"));
    assert!(text.contains("etcd://"));
}

#[test]
fn rbac_is_read_nodes_only_and_bound_to_the_service_account() {
    let docs = load_manifests();
    let mut roles = BTreeMap::new();
    let mut bindings = Vec::new();
    let mut sas = BTreeSet::new();
    for d in &docs {
        match &d.object {
            Object::ClusterRole(r) => {
                roles.insert(r.metadata.name.clone().unwrap_or_default(), r.clone());
            }
            Object::ClusterRoleBinding(b) => bindings.push(b.clone()),
            Object::ServiceAccount(sa) => {
                sas.insert((
                    sa.metadata.namespace.clone().unwrap_or_default(),
                    sa.metadata.name.clone().unwrap_or_default(),
                ));
                assert_eq!(
                    sa.automount_service_account_token,
                    Some(false),
                    "nothing calls the API, so no token"
                );
            }
            Object::Role(_) | Object::RoleBinding(_) => panic!("no namespaced RBAC expected"),
            _ => {}
        }
    }
    assert_eq!(roles.len(), 1);
    for r in roles.values() {
        let rules = r.rules.clone().unwrap_or_default();
        assert_eq!(rules.len(), 1, "one rule");
        let rule = &rules[0];
        assert_eq!(rule.api_groups.as_deref(), Some(&[String::new()][..]));
        assert_eq!(rule.resources.as_deref(), Some(&["nodes".to_string()][..]));
        assert_eq!(rule.verbs, ["get"]);
        assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none());
        assert!(r.aggregation_rule.is_none());
    }
    assert_eq!(bindings.len(), 1);
    let b = &bindings[0];
    assert_eq!(b.role_ref.kind, "ClusterRole");
    assert!(
        roles.contains_key(&b.role_ref.name),
        "binding to a declared role"
    );
    for s in b.subjects.as_deref().unwrap_or_default() {
        assert_eq!(s.kind, "ServiceAccount");
        let key = (s.namespace.clone().unwrap_or_default(), s.name.clone());
        assert!(sas.contains(&key), "binding subject {key:?} not declared");
    }
    for (_, ds) in daemonsets(&docs) {
        let spec = pod_spec(&ds);
        assert_eq!(spec.automount_service_account_token, Some(false));
        let sa = spec.service_account_name.clone().unwrap_or_default();
        assert!(
            sas.contains(&(NAMESPACE.to_string(), sa.clone())),
            "serviceAccountName {sa:?} not declared"
        );
    }
}

/// CPU in millicores, memory in bytes; only the suffixes the manifests use.
fn quantity(resource: &str, q: &str) -> u64 {
    let num = |s: &str| {
        s.parse::<u64>()
            .unwrap_or_else(|_| panic!("{resource} quantity {q}"))
    };
    match resource {
        "cpu" => match q.strip_suffix('m') {
            Some(m) => num(m),
            None => num(q) * 1000,
        },
        "memory" => {
            for (suf, mul) in [("Ki", 1u64 << 10), ("Mi", 1 << 20), ("Gi", 1 << 30)] {
                if let Some(n) = q.strip_suffix(suf) {
                    return num(n) * mul;
                }
            }
            num(q)
        }
        _ => panic!("unexpected resource {resource}"),
    }
}

/// Every container requests CPU and memory and has a memory limit. CPU is
/// limited everywhere but in the agent: it is the data path between nodes
/// (all the encryption), and CFS throttling would cap every pod's
/// throughput and add latency spikes.
#[test]
fn every_container_has_bounded_resources() {
    for c in every_container(&load_manifests()) {
        let r = c.resources.clone().unwrap_or_default();
        let req = r.requests.clone().unwrap_or_default();
        let lim = r.limits.clone().unwrap_or_default();
        let is_agent = subcommand(&c) == "agent";
        for res in ["cpu", "memory"] {
            let rq = req
                .get(res)
                .unwrap_or_else(|| panic!("{}: no {res} request", c.name));
            if res == "cpu" && is_agent {
                assert!(
                    !lim.contains_key(res),
                    "{}: no CPU limit on the data path",
                    c.name
                );
                continue;
            }
            let lm = lim
                .get(res)
                .unwrap_or_else(|| panic!("{}: no {res} limit", c.name));
            assert!(
                quantity(res, &rq.0) <= quantity(res, &lm.0),
                "{}: {res} request above limit",
                c.name
            );
        }
    }
}

/// Lines of `text` that look like a literal credential.
fn credential_findings(text: &str) -> Vec<String> {
    const SECRET_KEYS: &[&str] = &[
        "password",
        "passwd",
        "token",
        "secret-key",
        "apikey",
        "api-key",
        "client-key-data",
    ];
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let l = line.to_ascii_lowercase();
        let pem = l.contains("-----begin") && (l.contains("key-----") || l.contains("certificate"));
        let literal_flag = l.contains("--from-literal");
        let key_value = SECRET_KEYS.iter().any(|k| {
            l.match_indices(k).any(|(i, _)| {
                let before_ok = l[..i]
                    .chars()
                    .last()
                    .is_none_or(|c| !c.is_ascii_alphanumeric() && c != '_');
                let after = l[i + k.len()..].trim_start_matches(['"', '\'']);
                after
                    .strip_prefix(':')
                    .is_some_and(|v| !v.trim().is_empty())
                    && before_ok
            })
        });
        if pem || literal_flag || key_value {
            out.push(format!("line {}: {}", n + 1, line.trim()));
        }
    }
    out
}

#[test]
fn credential_scan_catches_planted_secrets() {
    for bad in [
        "  password: hunter2",
        "  \"password\": \"hunter2\"",
        "# password: s3cret",
        "  token: abcdef",
        "-----BEGIN RSA PRIVATE KEY-----",
        "-----BEGIN PRIVATE KEY-----",
        "-----BEGIN CERTIFICATE-----",
        "kubectl create secret generic x --from-literal=password=x",
    ] {
        assert_eq!(credential_findings(bad).len(), 1, "missed: {bad}");
    }
    for fine in [
        "#   username  password   etcd user authentication",
        "  --from-file=tls.key=/etc/kubernetes/pki/x.key",
        "  passwordFile:",
        "  password:",
        "            - --etcd-secret-dir",
    ] {
        assert!(credential_findings(fine).is_empty(), "false alarm: {fine}");
    }
}

#[test]
fn no_literal_credentials_anywhere_in_deploy() {
    let mut findings = Vec::new();
    let mut files = 0;
    let mut dirs = vec![deploy_dir()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).expect("read deploy dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                dirs.push(p);
                continue;
            }
            files += 1;
            let bytes = std::fs::read(&p).expect("read");
            let text = String::from_utf8_lossy(&bytes);
            for f in credential_findings(&text) {
                findings.push(format!("{}: {f}", p.display()));
            }
        }
    }
    assert!(
        files >= 3,
        "manifests, Containerfile and build script expected"
    );
    assert!(findings.is_empty(), "literal credentials: {findings:#?}");
}

// ---- The overlay agent (deploy/evio-agent.yaml) and the overlay keys ----

/// The label that keeps the agent DaemonSet off nodes whose agent runs
/// from systemd (the bootstrap sets it with the kubelet's --node-labels).
const SYSTEMD_AGENT_LABEL: (&str, &str) = ("evio-cni/agent", "systemd");
const AGENT_FILE: &str = "evio-agent.yaml";
const MAIN_FILE: &str = "evio-cni.yaml";
/// The agent exits within 5 s of SIGTERM (OVERLAY.md).
const AGENT_CLEANUP_SECS: i64 = 5;

fn agent_setup() -> (Vec<Doc>, PodSpec, Container) {
    let docs = load_manifests();
    let spec = pod_spec(&agent_daemonset(&docs));
    let c = container_by_sub(&spec, "agent");
    (docs, spec, c)
}

fn readme() -> String {
    std::fs::read_to_string(workspace_root().join("README.md")).expect("read README.md")
}

#[test]
fn the_agent_daemonset_is_alone_in_its_optional_file_and_the_main_one_never_runs_the_agent() {
    let docs = load_manifests();
    let mut by_file: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (file, ds) in daemonsets(&docs) {
        by_file
            .entry(file)
            .or_default()
            .push(ds.metadata.name.clone().unwrap_or_default());
    }
    let want: BTreeMap<String, Vec<String>> = [
        (AGENT_FILE.to_string(), vec![AGENT_DAEMONSET.to_string()]),
        (MAIN_FILE.to_string(), vec![MAIN_DAEMONSET.to_string()]),
    ]
    .into_iter()
    .collect();
    assert_eq!(by_file, want, "DaemonSets per manifest file");
    // Everything but the agent DaemonSet is in the main file: applying it
    // alone gives a complete deployment without the agent.
    for d in &docs {
        if d.origin.starts_with(AGENT_FILE) {
            assert!(
                matches!(d.object, Object::DaemonSet(_)),
                "{}: only the DaemonSet belongs in {AGENT_FILE}",
                d.origin
            );
        }
    }
    let main = pod_spec(&daemonset(&docs));
    assert!(
        all_containers(&main)
            .iter()
            .all(|c| subcommand(c) != "agent"),
        "the main DaemonSet must not run the agent: on a node with the systemd \
         agent two agents would fight over the TAP and the port"
    );
    let spec = pod_spec(&agent_daemonset(&docs));
    assert!(spec.init_containers.is_none());
    let subs: Vec<String> = spec.containers.iter().map(subcommand).collect();
    assert_eq!(subs, ["agent"]);
    // The install instructions apply the main file by name: `kubectl apply
    // -f deploy/` would start the optional agent everywhere too. They render
    // it first: applied as is, its `image: EVIO_IMAGE` cannot be pulled.
    let text = readme();
    assert!(text.contains(&format!(
        "deploy/render.sh deploy/{MAIN_FILE} | kubectl apply -f -"
    )));
    for file in [MAIN_FILE, AGENT_FILE] {
        assert!(
            !text.contains(&format!("kubectl apply -f deploy/{file}")),
            "README applies deploy/{file} without deploy/render.sh"
        );
    }
    assert!(
        !text.contains("kubectl apply -f deploy/`") && !text.contains("kubectl apply -f deploy/\n"),
        "README still applies the whole deploy/ directory"
    );
}

#[test]
fn agent_daemonset_runs_in_the_host_network_on_every_node_without_a_systemd_agent() {
    let (docs, spec, _) = agent_setup();
    let ds = agent_daemonset(&docs);
    assert_eq!(
        spec.host_network,
        Some(true),
        "the tunnels and devices are the host's"
    );
    assert_eq!(spec.dns_policy.as_deref(), Some("Default"));
    assert_eq!(
        spec.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert_ne!(spec.host_pid, Some(true));
    assert_ne!(spec.host_ipc, Some(true));
    assert!(spec
        .tolerations
        .clone()
        .unwrap_or_default()
        .iter()
        .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none()));
    let selector = ds.spec.selector.match_labels.clone().unwrap_or_default();
    let labels = ds
        .spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    assert!(!selector.is_empty());
    for (k, v) in &selector {
        assert_eq!(
            labels.get(k),
            Some(v),
            "template labels must match selector {k}"
        );
    }
    // Disjoint from the main DaemonSet's pods.
    let main_sel = daemonset(&docs)
        .spec
        .selector
        .match_labels
        .unwrap_or_default();
    assert_ne!(selector, main_sel);

    let (key, value) = SYSTEMD_AGENT_LABEL;
    let terms = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| {
            n.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .map(|r| r.node_selector_terms.clone())
        .expect("required node affinity");
    // Every term must exclude the label (terms are ORed).
    for t in &terms {
        let ex = t.match_expressions.clone().unwrap_or_default();
        assert!(
            ex.iter().any(|e| e.key == key
                && e.operator == "NotIn"
                && e.values.as_deref() == Some(&[value.to_string()][..])),
            "term {t:?} does not keep the agent off {key}={value} nodes"
        );
    }
    assert!(!terms.is_empty());
    // The bootstrap that runs the agent from systemd sets that label.
    let label = format!("--node-labels={key}={value}");
    assert!(readme().contains(&label), "README's bootstrap sets {label}");
    let yaml = std::fs::read_to_string(deploy_dir().join(AGENT_FILE)).expect("read");
    assert!(
        yaml.contains(&format!("{key}={value}")),
        "{AGENT_FILE} explains the label"
    );
}

#[test]
fn agent_gets_net_admin_and_the_tun_device_and_nothing_more() {
    let (_, spec, c) = agent_setup();
    let sc = c.security_context.clone().expect("securityContext");
    assert_ne!(sc.privileged, Some(true));
    let caps = sc.capabilities.clone().unwrap_or_default();
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    assert_eq!(caps.add.as_deref(), Some(&["NET_ADMIN".to_string()][..]));
    // /dev/net/tun is not in a container's /dev: a CharDevice hostPath.
    let tun = host_path_volume(&spec, "/dev/net/tun");
    assert_eq!(
        tun.host_path.as_ref().and_then(|h| h.type_.as_deref()),
        Some("CharDevice")
    );
    let m = mount(&c, &tun.name).expect("the agent mounts /dev/net/tun");
    assert_eq!(m.mount_path, "/dev/net/tun");
    // The reason is written next to it.
    let yaml = std::fs::read_to_string(deploy_dir().join(AGENT_FILE)).expect("read");
    assert!(yaml.contains("CAP_NET_ADMIN") && yaml.contains("no NET_RAW"));
}

/// The agent's socket path from its DaemonSet args.
fn agent_socket(c: &Container) -> String {
    flag(c, "--control-socket").expect("agent --control-socket")
}

#[test]
fn agent_state_and_control_socket_live_on_the_host_where_run_and_peers_find_them() {
    let (docs, spec, c) = agent_setup();
    let conf = net_conf(&docs);
    // The key: overlay.keyFile or its default, on the host at the same path.
    let key = conf["overlay"]["keyFile"]
        .as_str()
        .unwrap_or("/var/lib/evio/agent.key");
    let key_dir = std::path::Path::new(key)
        .parent()
        .expect("dir")
        .to_str()
        .expect("utf-8");
    let vol = host_path_volume(&spec, key_dir);
    let m = mount(&c, &vol.name).expect("the agent mounts the key's directory");
    assert_eq!(
        m.mount_path.trim_end_matches('/'),
        key_dir,
        "same path inside and out"
    );
    assert_ne!(m.read_only, Some(true), "the key is created on first start");

    // The control socket: a host directory, shared with run in the main DaemonSet.
    let sock = agent_socket(&c);
    let sock_dir = std::path::Path::new(&sock)
        .parent()
        .expect("dir")
        .to_str()
        .expect("utf-8");
    let vol = host_path_volume(&spec, sock_dir);
    let m = mount(&c, &vol.name).expect("the agent mounts its socket's directory");
    assert_eq!(m.mount_path.trim_end_matches('/'), sock_dir);
    assert_ne!(m.read_only, Some(true), "the agent binds its socket there");

    let main = pod_spec(&daemonset(&docs));
    let run = container_by_sub(&main, "run");
    let vol = host_path_volume(&main, sock_dir);
    let m = mount(&run, &vol.name).expect("run mounts the agent's socket directory");
    assert_eq!(m.mount_path.trim_end_matches('/'), sock_dir);
    assert_eq!(
        m.read_only,
        Some(true),
        "connecting to a unix socket needs no write access"
    );
    // run uses its default socket (this path, checked against the binary in
    // cli_contract) and does not name it: named, it would require an agent
    // on every node.
    assert!(flag(&run, "--agent-socket").is_none());
    assert_eq!(sock, "/run/evio/agent.sock");
}

#[test]
fn agent_config_secrets_and_ovsdb_are_mounted_read_only() {
    let (docs, spec, c) = agent_setup();
    // The same ConfigMap as the main DaemonSet, same mount path.
    let cm_name = config_map(&docs).metadata.name.unwrap_or_default();
    let vol = spec
        .volumes
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|v| v.config_map.as_ref().map(|c| c.name.as_str()) == Some(cm_name.as_str()))
        .expect("the agent mounts the ConfigMap")
        .clone();
    let m = mount(&c, &vol.name).expect("mounted");
    assert_eq!(m.read_only, Some(true));
    let want = format!("{}/{CONF_FILE_KEY}", m.mount_path.trim_end_matches('/'));
    assert_eq!(flag(&c, "--config"), Some(want.clone()));
    let run = container_by_sub(&pod_spec(&daemonset(&docs)), "run");
    assert_eq!(
        flag(&run, "--config"),
        Some(want),
        "one path for both DaemonSets"
    );
    // OVSDB's socket directory (the plugin key `ovsdb`, default below).
    let conf = net_conf(&docs);
    let ovsdb = conf["ovsdb"]
        .as_str()
        .unwrap_or("unix:/var/run/openvswitch/db.sock");
    let sock = ovsdb.strip_prefix("unix:").expect("a unix ovsdb endpoint");
    let dir = std::path::Path::new(sock)
        .parent()
        .expect("dir")
        .to_str()
        .expect("utf-8");
    let vol = host_path_volume(&spec, dir);
    let m = mount(&c, &vol.name).expect("the agent mounts OVSDB's directory");
    assert_eq!(m.mount_path.trim_end_matches('/'), dir);
    assert_eq!(m.read_only, Some(true));
    // evio-cni's DaemonSet mounts it only into `evio-node run`, which puts
    // evio's OpenFlow flows back through <bridge>.mgmt after a vswitchd
    // restart (Kubernetes Services need them); no init container gets it.
    let main = pod_spec(&daemonset(&docs));
    let ovs = host_path_volume(&main, dir);
    for c in main.init_containers.as_deref().unwrap_or_default() {
        let mounts = c.volume_mounts.as_deref().unwrap_or_default();
        assert!(
            !mounts.iter().any(|m| m.name == ovs.name),
            "init container {} mounts {dir}",
            c.name
        );
    }
    let run = main
        .containers
        .iter()
        .find(|c| c.name == "evio-node")
        .expect("the evio-node container");
    assert!(
        mount(run, &ovs.name).is_some_and(|m| m.mount_path.trim_end_matches('/') == dir),
        "evio-node run does not mount {dir}"
    );
    // Every Secret is optional, owner-only, mounted read-only.
    for v in spec.volumes.as_deref().unwrap_or_default() {
        if let Some(sec) = &v.secret {
            assert_eq!(sec.optional, Some(true), "{}", v.name);
            assert!(
                sec.default_mode.is_some_and(|m| m & 0o077 == 0),
                "{}",
                v.name
            );
            assert_eq!(
                mount(&c, &v.name).and_then(|m| m.read_only),
                Some(true),
                "{}",
                v.name
            );
        }
    }
}

fn exec_probe(p: &Option<Probe>, what: &str) -> (Vec<String>, Probe) {
    let p = p.clone().unwrap_or_else(|| panic!("agent {what} missing"));
    let cmd = p
        .exec
        .as_ref()
        .and_then(|e| e.command.clone())
        .unwrap_or_else(|| panic!("agent {what}: an exec probe"));
    (cmd, p)
}

#[test]
fn agent_probes_ask_its_control_socket_and_the_grace_period_covers_its_cleanup() {
    let (_, spec, c) = agent_setup();
    let sock = agent_socket(&c);
    let exe = c.command.clone().unwrap_or_default()[0].clone();
    for (what, p) in [
        ("startupProbe", &c.startup_probe),
        ("livenessProbe", &c.liveness_probe),
        ("readinessProbe", &c.readiness_probe),
    ] {
        let (cmd, probe) = exec_probe(p, what);
        assert_eq!(
            cmd,
            [
                exe.clone(),
                "peers".into(),
                "--control-socket".into(),
                sock.clone()
            ],
            "{what}"
        );
        // The agent gives its engine 2 s to answer.
        assert!(probe.timeout_seconds.unwrap_or(1) >= 3, "{what} timeout");
    }
    // Start-up may wait for the store (--timeout, 30 s by default) before
    // the socket exists.
    let (_, s) = exec_probe(&c.startup_probe, "startupProbe");
    let window = s.period_seconds.unwrap_or(10) * s.failure_threshold.unwrap_or(3);
    assert!(window >= 45, "startupProbe allows only {window} s");
    let grace = spec.termination_grace_period_seconds.unwrap_or(30);
    assert!(
        grace >= 2 * AGENT_CLEANUP_SECS,
        "terminationGracePeriodSeconds {grace} leaves no margin over the agent's {AGENT_CLEANUP_SECS} s cleanup"
    );
    assert!(
        c.ports.is_none(),
        "the agent serves nothing over TCP; run reports it"
    );
}

// ---- Secrets: named by file in the ConfigMap, mounted from Secrets ----

/// Where a file named by net-conf.json must come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// A Secret of this name, the file name being one of its keys.
    Secret(&'static str),
    /// A host directory at the same path inside and out (the node's key).
    HostPath,
}

/// The net-conf.json keys that name files: (JSON pointer pattern, source,
/// the evio-node subcommands that read the file). `[]` stands for every
/// element of a list.
const FILE_KEYS: &[(&str, Source, &[&str])] = &[
    (
        "/etcdCACert",
        Source::Secret("evio-etcd"),
        &["config-gen", "run", "agent"],
    ),
    (
        "/etcdCert",
        Source::Secret("evio-etcd"),
        &["config-gen", "run", "agent"],
    ),
    (
        "/etcdKey",
        Source::Secret("evio-etcd"),
        &["config-gen", "run", "agent"],
    ),
    (
        "/etcdUsernameFile",
        Source::Secret("evio-etcd"),
        &["config-gen", "run", "agent"],
    ),
    (
        "/etcdPasswordFile",
        Source::Secret("evio-etcd"),
        &["config-gen", "run", "agent"],
    ),
    (
        "/overlay/networkKeyFile",
        Source::Secret("evio-network-key"),
        &["agent"],
    ),
    (
        "/overlay/turn/[]/passwordFile",
        Source::Secret("evio-turn"),
        &["agent"],
    ),
    ("/overlay/keyFile", Source::HostPath, &["agent"]),
];

/// Every (pointer, path) a net-conf.json names, for the patterns above.
fn named_files(conf: &Value) -> Vec<(String, String, Source, &'static [&'static str])> {
    let mut out = Vec::new();
    for (pattern, source, readers) in FILE_KEYS {
        let mut ptrs = vec![String::new()];
        for part in pattern.trim_start_matches('/').split('/') {
            let mut next = Vec::new();
            for p in ptrs {
                if part == "[]" {
                    if let Some(a) = conf.pointer(&p).and_then(Value::as_array) {
                        next.extend((0..a.len()).map(|i| format!("{p}/{i}")));
                    }
                } else {
                    next.push(format!("{p}/{part}"));
                }
            }
            ptrs = next;
        }
        for p in ptrs {
            if let Some(v) = conf.pointer(&p) {
                let path = v.as_str().unwrap_or_else(|| panic!("{p} is not a path"));
                out.push((p, path.to_string(), *source, *readers));
            }
        }
    }
    out
}

/// Keys and values that would be a secret written into the config.
fn literal_secrets(v: &Value, at: &str, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                let l = k.to_ascii_lowercase();
                let secretish = [
                    "password",
                    "passwd",
                    "secret",
                    "token",
                    "psk",
                    "privatekey",
                    "networkkey",
                ]
                .iter()
                .any(|w| l.contains(w));
                if secretish && !k.ends_with("File") {
                    out.push(format!(
                        "{at}/{k}: a secret-looking key that is not a file name"
                    ));
                }
                literal_secrets(x, &format!("{at}/{k}"), out);
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                literal_secrets(x, &format!("{at}/{i}"), out);
            }
        }
        Value::String(s) => {
            // A 32-byte key in base64 (what wg genkey/genpsk and `head -c
            // 32 /dev/urandom | base64` print), or PEM.
            let t = s.trim();
            let b64 = t.len() == 44
                && t.ends_with('=')
                && t[..43]
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/');
            if b64 || t.contains("-----BEGIN") {
                out.push(format!("{at}: a literal key"));
            }
        }
        _ => {}
    }
}

#[test]
fn literal_secret_scan_catches_planted_ones() {
    for bad in [
        r#"{"overlay":{"turn":[{"server":"a:1","username":"u","password":"hunter2"}]}}"#,
        r#"{"overlay":{"networkKey":"x"}}"#,
        r#"{"overlay":{"networkKeyFile":"Ot+QAOH8i4p/1W8XkFhtW3snRk3L/yKiLTa8JQwy4wY="}}"#,
        r#"{"etcdKey":"-----BEGIN PRIVATE KEY-----"}"#,
    ] {
        let mut out = Vec::new();
        literal_secrets(&serde_json::from_str(bad).expect("json"), "", &mut out);
        assert!(!out.is_empty(), "missed: {bad}");
    }
    let mut out = Vec::new();
    let fine = r#"{"overlay":{"networkKeyFile":"/etc/evio/network-key/network.key","turn":[{"passwordFile":"/p","username":"evio"}]}}"#;
    literal_secrets(&serde_json::from_str(fine).expect("json"), "", &mut out);
    assert!(out.is_empty(), "{out:?}");
}

/// Every net-conf.json operators are given: the shipped ConfigMap's, the
/// examples, and the host's (systemd) example, which is also pasted into
/// the ConfigMap.
fn every_net_conf(docs: &[Doc]) -> Vec<(String, Value)> {
    let mut v = vec![("ConfigMap net-conf.json".to_string(), net_conf(docs))];
    for rel in [ETCD_EXAMPLE, "systemd/net-conf.json"] {
        let text = std::fs::read_to_string(deploy_dir().join(rel)).expect("read example");
        v.push((
            rel.to_string(),
            serde_json::from_str(&text).expect("example is JSON"),
        ));
    }
    v
}

/// The ConfigMap (and every example of it) carries no secret; every file it
/// names reaches each container that reads it from the right Secret
/// (read-only, owner-only), or, for the node's own key, from the host
/// directory at the same path. Nothing secret is under the ConfigMap's
/// mount.
#[test]
fn no_secret_in_the_configmap_and_every_file_it_names_is_mounted_from_a_secret() {
    let docs = load_manifests();
    let yaml = std::fs::read_to_string(deploy_dir().join(MAIN_FILE)).expect("read");
    let mut covered = BTreeSet::new();
    for (what, conf) in every_net_conf(&docs) {
        let mut found = Vec::new();
        literal_secrets(&conf, "", &mut found);
        assert!(found.is_empty(), "{what}: {found:?}");
        for (ptr, path, source, readers) in named_files(&conf) {
            assert!(
                path.starts_with('/'),
                "{what} {ptr}: {path} must be absolute"
            );
            for (_, ds) in daemonsets(&docs) {
                let spec = pod_spec(&ds);
                for c in all_containers(&spec) {
                    if !readers.contains(&subcommand(&c).as_str()) {
                        continue;
                    }
                    // The deepest mount holding the path.
                    let m = c
                        .volume_mounts
                        .as_deref()
                        .unwrap_or_default()
                        .iter()
                        .filter(|m| {
                            path.starts_with(&format!("{}/", m.mount_path.trim_end_matches('/')))
                        })
                        .max_by_key(|m| m.mount_path.len())
                        .unwrap_or_else(|| {
                            panic!("{what} {ptr} = {path}: not mounted in {}", c.name)
                        });
                    let vol = volume(&spec, &m.name).expect("declared");
                    match source {
                        Source::Secret(name) => {
                            let sec = vol.secret.as_ref().unwrap_or_else(|| {
                                panic!(
                                    "{what} {ptr} = {path}: {} has it from {}, not a Secret",
                                    c.name, m.name
                                )
                            });
                            assert_eq!(
                                sec.secret_name.as_deref(),
                                Some(name),
                                "{what} {ptr} in {}",
                                c.name
                            );
                            assert_eq!(m.read_only, Some(true), "{what} {ptr} in {}", c.name);
                            assert!(sec.default_mode.is_some_and(|m| m & 0o077 == 0));
                            // The file is a key of the Secret, and the
                            // manifests say how to create it.
                            let file = &path[m.mount_path.trim_end_matches('/').len() + 1..];
                            assert!(!file.contains('/'), "{path}: Secret keys are flat");
                            let agent_yaml = std::fs::read_to_string(deploy_dir().join(AGENT_FILE))
                                .expect("read");
                            assert!(
                                yaml.contains(name)
                                    && (yaml.contains(file) || agent_yaml.contains(file)),
                                "the manifests document Secret {name} with key {file}"
                            );
                        }
                        Source::HostPath => {
                            let hp = vol.host_path.as_ref().unwrap_or_else(|| {
                                panic!(
                                    "{what} {ptr} = {path}: must be on the host, {} has it from {}",
                                    c.name, m.name
                                )
                            });
                            assert_eq!(
                                hp.path.trim_end_matches('/'),
                                m.mount_path.trim_end_matches('/')
                            );
                            assert_ne!(m.read_only, Some(true), "{ptr}: created on first start");
                        }
                    }
                    covered.insert(ptr.split('/').nth(1).unwrap_or_default().to_string());
                }
            }
        }
    }
    // The overlay's files are all exercised by some example.
    for k in ["overlay", "etcdCACert", "etcdCert", "etcdKey"] {
        assert!(covered.contains(k), "no example names a file under {k}");
    }
    // And the ConfigMap mount itself holds no secret: it is the config only.
    let cm_name = config_map(&docs).metadata.name.unwrap_or_default();
    for (_, ds) in daemonsets(&docs) {
        let spec = pod_spec(&ds);
        for c in all_containers(&spec) {
            for m in c.volume_mounts.as_deref().unwrap_or_default() {
                let v = volume(&spec, &m.name).expect("declared");
                if v.config_map.as_ref().map(|x| x.name.as_str()) == Some(cm_name.as_str()) {
                    for (_, conf) in every_net_conf(&docs) {
                        for (ptr, path, _, _) in named_files(&conf) {
                            assert!(
                                !path.starts_with(&format!(
                                    "{}/",
                                    m.mount_path.trim_end_matches('/')
                                )),
                                "{ptr} = {path} is inside the ConfigMap's mount"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// The host's net-conf.json (deploy/systemd/net-conf.json) is the
/// ConfigMap's plus the store's and NAT servers' settings: the same file
/// serves both, with the same paths.
#[test]
fn host_net_conf_example_is_the_configmap_with_a_store_and_nat_servers() {
    let docs = load_manifests();
    let shipped = net_conf(&docs);
    let text = std::fs::read_to_string(deploy_dir().join("systemd/net-conf.json")).expect("read");
    let host: Value = serde_json::from_str(&text).expect("JSON");
    let store = host["dataStore"].as_str().expect("dataStore");
    assert!(
        matches!(
            evio_subnet::StoreUrl::parse(store),
            Ok(evio_subnet::StoreUrl::Etcd(_))
        ),
        "a host overlay spans machines: the example's store must be etcd"
    );
    for (k, v) in host.as_object().expect("object") {
        if k == "dataStore" || ETCD_FILE_KEYS.iter().any(|(e, _)| e == k) {
            continue;
        }
        if k == "overlay" {
            for (ok, ov) in v.as_object().expect("overlay object") {
                if ok == "stun" || ok == "turn" {
                    assert!(
                        ov.as_array().is_some_and(|a| !a.is_empty()),
                        "the example shows {ok}"
                    );
                    continue;
                }
                assert_eq!(
                    Some(ov),
                    shipped["overlay"].get(ok),
                    "overlay.{ok} differs from the ConfigMap"
                );
            }
            continue;
        }
        assert_eq!(Some(v), shipped.get(k), "{k} differs from the ConfigMap");
    }
    for k in shipped.as_object().expect("object").keys() {
        assert!(host.get(k).is_some(), "the host example lacks {k}");
    }
    assert!(
        host["hostCIDR"].is_string(),
        "the host example configures the host overlay"
    );
    let turn = host["overlay"]["turn"].as_array().expect("turn");
    let transports: BTreeSet<&str> = turn
        .iter()
        .filter_map(|t| t["transport"].as_str())
        .collect();
    assert_eq!(
        transports,
        ["tcp", "udp"].into_iter().collect(),
        "TURN over UDP and TCP"
    );
}
