//! Delegation to the IPAM plugin, as the spec's "Delegated plugin protocol"
//! says: found by name in `CNI_PATH`, run with our environment (only
//! `CNI_COMMAND` may differ), the network config on stdin, its stderr passed
//! through, its stdout a result or a CNI error.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command as Proc, Stdio};

use serde_json::Value;

use crate::env::Command;
use crate::error::{code, CniError, Result};
use crate::result::CniResult;
use crate::version::{Version, SUPPORTED};

pub struct Delegate {
    pub name: String,
    pub path: PathBuf,
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

    /// Runs one command; stdout on success. A failure that printed a CNI
    /// error keeps its code; anything else is our IPAM error code.
    pub fn exec(&self, cmd: Command, stdin: &[u8]) -> Result<Vec<u8>> {
        let mut child = Proc::new(&self.path)
            .env("CNI_COMMAND", cmd.as_str())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| {
                CniError::new(
                    code::IO,
                    format!("cannot execute ipam plugin {}", self.path.display()),
                )
                .with_details(e.to_string())
            })?;
        if let Some(mut input) = child.stdin.take() {
            // A delegate that exits without reading stdin closes the pipe:
            // its exit status tells what happened, so EPIPE is not an error.
            if let Err(e) = input.write_all(stdin) {
                if e.kind() != std::io::ErrorKind::BrokenPipe {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(CniError::new(code::IO, "cannot write to ipam plugin")
                        .with_details(e.to_string()));
                }
            }
        }
        let out = child.wait_with_output().map_err(|e| {
            CniError::new(code::IO, "cannot read ipam plugin output").with_details(e.to_string())
        })?;
        if out.status.success() {
            return Ok(out.stdout);
        }
        Err(match CniError::from_plugin_output(&out.stdout) {
            Some(e) => e.context(format!("ipam plugin {} {}", self.name, cmd.as_str())),
            None => CniError::new(
                code::IPAM,
                format!(
                    "ipam plugin {} {} failed: {}",
                    self.name,
                    cmd.as_str(),
                    out.status
                ),
            )
            .with_details(String::from_utf8_lossy(&out.stdout).trim().to_string()),
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

/// The directory `host-local` keeps its allocations in for this network.
pub fn host_local_dir(conf: &Value, network: &str) -> PathBuf {
    let base = conf
        .get("ipam")
        .and_then(|i| i.get("dataDir"))
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .unwrap_or("/var/lib/cni/networks");
    Path::new(base).join(network)
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

    #[test]
    fn find_rejects_missing() {
        let e = Delegate::find("no-such-ipam", &[PathBuf::from("/nonexistent")])
            .err()
            .unwrap();
        assert_eq!(e.code, 7);
        assert!(e.msg.contains("no-such-ipam"));
    }

    #[test]
    fn host_local_dir_default_and_custom() {
        let v: Value = serde_json::json!({"ipam": {"dataDir": "/tmp/x"}});
        assert_eq!(host_local_dir(&v, "n"), PathBuf::from("/tmp/x/n"));
        assert_eq!(
            host_local_dir(&serde_json::json!({}), "n"),
            PathBuf::from("/var/lib/cni/networks/n")
        );
    }
}
