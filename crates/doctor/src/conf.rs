//! The evio networks a node is configured with, read from the CNI config
//! directory the way the runtime reads it.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use evio_cni::config::NetConf;
use evio_cni::host_local;
use evio_subnet::{ip_offset, ip_to_u128};
use ipnet::IpNet;
use serde_json::{Map, Value};

use crate::error::{DoctorError, Result};

/// The plugin `type` the doctor looks for.
pub const PLUGIN_TYPE: &str = "evio";

/// Larger files are not CNI configs; reading them whole would only cost
/// memory.
const MAX_CONF_BYTES: u64 = 4 << 20;

/// One host-local range, with host-local's defaults filled in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Range {
    /// The subnet as configured: evio writes the pod CIDR here, so that
    /// pods get its prefix.
    pub subnet: IpNet,
    pub start: IpAddr,
    pub end: IpAddr,
    pub gateway: IpAddr,
}

impl Range {
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.start.is_ipv4()
            && ip_to_u128(ip) >= ip_to_u128(self.start)
            && ip_to_u128(ip) <= ip_to_u128(self.end)
    }
}

/// An evio network of this node: the plugin's own view of its config plus
/// what host-local makes of the `ipam` section.
#[derive(Debug, Clone)]
pub struct Network {
    /// The file it came from.
    pub source: PathBuf,
    pub conf: NetConf,
    pub ranges: Vec<Range>,
    /// host-local's directory for this network (`dataDir/<name>`).
    pub ipam_dir: PathBuf,
}

impl Network {
    pub fn name(&self) -> &str {
        &self.conf.name
    }

    /// Parses one plugin entry as the runtime hands it to the plugin:
    /// `cniVersion` and `name` injected from the list.
    pub fn from_plugin_json(source: &Path, plugin: &Value) -> Result<Network> {
        let bad = |reason: String| DoctorError::Config {
            path: source.to_path_buf(),
            reason,
        };
        let raw = serde_json::to_vec(plugin).map_err(|e| bad(e.to_string()))?;
        let conf = NetConf::parse(&raw).map_err(|e| bad(format!("evio plugin entry: {e}")))?;
        let ipam = plugin.get("ipam").cloned().unwrap_or(Value::Null);
        let ranges = parse_ranges(&ipam).map_err(|e| bad(format!("ipam: {e}")))?;
        Ok(Network {
            source: source.to_path_buf(),
            ipam_dir: host_local::network_dir(plugin, &conf.name),
            conf,
            ranges,
        })
    }
}

/// The CNI config files in `dir` (`*.conf`, `*.conflist`, `*.json`, as
/// libcni looks for them) whose names sort before `name`. The runtime uses
/// the first one in that order, so any of them silently wins over evio's.
pub fn configs_before(dir: &Path, name: &str) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|source| DoctorError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut out: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            // Byte order, as Go's sort.Strings in libcni's ConfFiles.
            n.as_bytes() < name.as_bytes()
                && matches!(
                    Path::new(&*n).extension().and_then(|x| x.to_str()),
                    Some("conflist" | "conf" | "json")
                )
                && e.path().is_file()
        })
        .map(|e| e.path())
        .collect();
    out.sort();
    Ok(out)
}

/// Every evio network configured in `dir`: `*.conflist` files with an
/// `evio` plugin and `*.conf`/`*.json` files of type `evio`, in the
/// lexical order the runtime uses. A file that is not valid JSON or whose
/// evio entry the plugin would refuse is an error: the node cannot run pods
/// with it, which is the first thing an operator needs to know.
pub fn load_networks(dir: &Path) -> Result<Vec<Network>> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DoctorError::Io { path, source }
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("conflist" | "conf" | "json")
            )
        })
        .collect();
    files.sort();
    let mut out = Vec::new();
    for path in files {
        let meta = std::fs::metadata(&path).map_err(io(&path))?;
        if !meta.is_file() {
            continue;
        }
        if meta.len() > MAX_CONF_BYTES {
            return Err(DoctorError::Config {
                path,
                reason: format!("larger than {MAX_CONF_BYTES} bytes"),
            });
        }
        let bytes = std::fs::read(&path).map_err(io(&path))?;
        out.extend(networks_in(&path, &bytes)?);
    }
    if out.is_empty() {
        return Err(DoctorError::NoNetwork(dir.to_path_buf()));
    }
    Ok(out)
}

/// The evio networks in one config file's content.
pub fn networks_in(path: &Path, bytes: &[u8]) -> Result<Vec<Network>> {
    let bad = |reason: String| DoctorError::Config {
        path: path.to_path_buf(),
        reason,
    };
    let v: Value = serde_json::from_slice(bytes).map_err(|e| bad(format!("not JSON: {e}")))?;
    let Value::Object(top) = v else {
        return Err(bad("not a JSON object".into()));
    };
    let mut out = Vec::new();
    match top.get("plugins") {
        Some(Value::Array(plugins)) => {
            for p in plugins {
                if p.get("type").and_then(Value::as_str) != Some(PLUGIN_TYPE) {
                    continue;
                }
                let Value::Object(entry) = p else { continue };
                let mut entry: Map<String, Value> = entry.clone();
                // As libcni does: the list's version and name win.
                for key in ["cniVersion", "name"] {
                    if let Some(v) = top.get(key) {
                        entry.insert(key.to_string(), v.clone());
                    }
                }
                out.push(Network::from_plugin_json(path, &Value::Object(entry))?);
            }
        }
        Some(_) => return Err(bad("plugins must be a list".into())),
        None => {
            if top.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE) {
                out.push(Network::from_plugin_json(path, &Value::Object(top))?);
            }
        }
    }
    Ok(out)
}

/// host-local's ranges: `ranges` (a list of range sets) or the older
/// top-level `subnet`/`rangeStart`/`rangeEnd`/`gateway`.
pub fn parse_ranges(ipam: &Value) -> std::result::Result<Vec<Range>, String> {
    let mut out = Vec::new();
    match ipam.get("ranges") {
        Some(Value::Array(sets)) => {
            for set in sets {
                let Value::Array(ranges) = set else {
                    return Err("ranges must be a list of lists".into());
                };
                for r in ranges {
                    out.push(parse_range(r)?);
                }
            }
        }
        Some(Value::Null) | None => {
            if ipam.get("subnet").is_some() {
                out.push(parse_range(ipam)?);
            }
        }
        Some(_) => return Err("ranges must be a list of lists".into()),
    }
    Ok(out)
}

fn parse_range(r: &Value) -> std::result::Result<Range, String> {
    let field = |k: &str| -> std::result::Result<Option<&str>, String> {
        match r.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(format!("{k} must be a string, got {other}")),
        }
    };
    let ip = |k: &str| -> std::result::Result<Option<IpAddr>, String> {
        field(k)?
            .map(|s| {
                s.parse()
                    .map_err(|_| format!("{k} {s:?} is not an IP address"))
            })
            .transpose()
    };
    let subnet: IpNet = field("subnet")?
        .ok_or("a range needs a subnet")?
        .parse()
        .map_err(|_| "subnet is not a CIDR".to_string())?;
    let net = subnet.trunc();
    // host-local's defaults: the first and last usable address, gateway .1.
    let first = ip_offset(net.network(), 1);
    let last = match net {
        IpNet::V4(_) => ip_offset(net.broadcast(), -1),
        IpNet::V6(_) => net.broadcast(),
    };
    Ok(Range {
        subnet,
        start: ip("rangeStart")?.unwrap_or(first),
        end: ip("rangeEnd")?.unwrap_or(last),
        gateway: ip("gateway")?.unwrap_or(first),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn conflist(plugin: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "cniVersion": "1.0.0",
            "name": "k8s",
            "plugins": [plugin, {"type": "portmap", "capabilities": {"portMappings": true}}],
        }))
        .unwrap()
    }

    fn evio() -> Value {
        json!({
            "type": "evio",
            "bridge": "evio0",
            "ipam": {
                "type": "host-local",
                "dataDir": "/run/ipam",
                "ranges": [[{"subnet": "10.244.0.0/16", "rangeStart": "10.244.3.2",
                             "rangeEnd": "10.244.3.254", "gateway": "10.244.3.1"}]],
            },
        })
    }

    #[test]
    fn finds_the_evio_entry_and_injects_list_keys() {
        let nets = networks_in(Path::new("x.conflist"), &conflist(evio())).unwrap();
        assert_eq!(nets.len(), 1);
        let n = &nets[0];
        assert_eq!(n.name(), "k8s");
        assert_eq!(n.conf.cni_version, "1.0.0");
        assert_eq!(n.ipam_dir, PathBuf::from("/run/ipam/k8s"));
        assert_eq!(n.ranges.len(), 1);
        assert_eq!(n.ranges[0].gateway.to_string(), "10.244.3.1");
        assert!(n.ranges[0].contains("10.244.3.254".parse().unwrap()));
        assert!(!n.ranges[0].contains("10.244.4.2".parse().unwrap()));
    }

    #[test]
    fn other_plugins_are_ignored_and_single_confs_read() {
        let other = serde_json::to_vec(&json!({"cniVersion": "1.0.0", "name": "x",
            "plugins": [{"type": "bridge"}]}))
        .unwrap();
        assert!(networks_in(Path::new("a"), &other).unwrap().is_empty());
        let mut single = evio();
        single["cniVersion"] = json!("0.4.0");
        single["name"] = json!("one");
        let nets = networks_in(Path::new("a"), &serde_json::to_vec(&single).unwrap()).unwrap();
        assert_eq!(nets[0].name(), "one");
    }

    #[test]
    fn a_config_the_plugin_refuses_is_an_error() {
        let mut p = evio();
        p["mtu"] = json!("big");
        let e = networks_in(Path::new("a"), &conflist(p)).unwrap_err();
        assert!(e.to_string().contains("mtu"), "{e}");
        assert!(networks_in(Path::new("a"), b"{").is_err());
    }

    #[test]
    fn range_defaults_follow_host_local() {
        let r = parse_ranges(&json!({"subnet": "10.1.2.0/24"})).unwrap();
        assert_eq!(r[0].start.to_string(), "10.1.2.1");
        assert_eq!(r[0].end.to_string(), "10.1.2.254");
        assert_eq!(r[0].gateway.to_string(), "10.1.2.1");
        let r = parse_ranges(&json!({"ranges": [[{"subnet": "fd00::/120"}]]})).unwrap();
        assert_eq!(r[0].end.to_string(), "fd00::ff");
        assert!(parse_ranges(&json!({"ranges": [[{"subnet": 5}]]})).is_err());
        assert!(parse_ranges(&json!({"ranges": [{"subnet": "10.0.0.0/8"}]})).is_err());
    }

    #[test]
    fn load_networks_reads_a_directory_in_order() {
        let d = tempfile::tempdir().unwrap();
        assert!(matches!(
            load_networks(d.path()),
            Err(DoctorError::NoNetwork(_))
        ));
        std::fs::write(d.path().join("10-evio.conflist"), conflist(evio())).unwrap();
        std::fs::write(d.path().join("README"), "not a config").unwrap();
        let nets = load_networks(d.path()).unwrap();
        assert_eq!(nets.len(), 1);
        assert!(load_networks(&d.path().join("missing")).is_err());
    }

    #[test]
    fn configs_before_lists_what_the_runtime_would_pick_first() {
        let d = tempfile::tempdir().unwrap();
        for f in [
            "10-evio.conflist",
            "10-containerd-net.conflist",
            "05-old.conf",
            "00-x.json",
            "01-notes.txt",
            "99-later.conflist",
        ] {
            std::fs::write(d.path().join(f), "{}").unwrap();
        }
        std::fs::create_dir(d.path().join("00-dir.conf")).unwrap();
        let names: Vec<String> = configs_before(d.path(), "10-evio.conflist")
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            ["00-x.json", "05-old.conf", "10-containerd-net.conflist"]
        );
        assert!(configs_before(d.path(), "00-evio.conflist")
            .unwrap()
            .is_empty());
    }
}
