//! The plugin's environment: `CNI_*` variables, validated the way the spec's
//! reference library (libcni `pkg/skel`, `pkg/utils`) validates them.

use std::path::PathBuf;

use crate::error::{code, CniError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Gc,
    Status,
}

impl Command {
    pub fn parse(s: &str) -> Result<Command> {
        Ok(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "GC" => Command::Gc,
            "STATUS" => Command::Status,
            "" => return Err(CniError::invalid_env("CNI_COMMAND is empty")),
            other => {
                return Err(CniError::invalid_env(format!(
                    "unknown CNI_COMMAND {other:?}: expected ADD, DEL, CHECK, VERSION, GC or STATUS"
                )))
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Version => "VERSION",
            Command::Gc => "GC",
            Command::Status => "STATUS",
        }
    }
}

/// Everything the runtime passed in the environment.
#[derive(Debug, Clone)]
pub struct Env {
    pub command: Command,
    pub container_id: String,
    pub netns: Option<PathBuf>,
    pub ifname: String,
    pub args: Vec<(String, String)>,
    pub path: Vec<PathBuf>,
}

impl Env {
    /// Reads the process environment.
    pub fn from_process() -> Result<Env> {
        Env::from_lookup(|k| std::env::var_os(k))
    }

    /// Reads from any lookup (tests pass a map). Values must be UTF-8: a
    /// non-UTF-8 variable is reported, not silently replaced.
    pub fn from_lookup(get: impl Fn(&str) -> Option<std::ffi::OsString>) -> Result<Env> {
        let var = |k: &str| -> Result<Option<String>> {
            match get(k) {
                None => Ok(None),
                Some(v) => v
                    .into_string()
                    .map(Some)
                    .map_err(|_| CniError::invalid_env(format!("{k} is not valid UTF-8"))),
            }
        };
        let command = match var("CNI_COMMAND")? {
            Some(c) => Command::parse(&c)?,
            None => {
                return Err(CniError::invalid_env(
                    "required env variables [CNI_COMMAND] missing",
                ))
            }
        };
        let container_id = var("CNI_CONTAINERID")?.unwrap_or_default();
        let netns = var("CNI_NETNS")?.filter(|s| !s.is_empty());
        let ifname = var("CNI_IFNAME")?.unwrap_or_default();
        let args_raw = var("CNI_ARGS")?.unwrap_or_default();
        let path_raw = var("CNI_PATH")?.unwrap_or_default();

        let mut missing = Vec::new();
        let (need_cid, need_netns, need_if, need_path) = match command {
            Command::Add | Command::Check => (true, true, true, true),
            Command::Del => (true, false, true, true),
            Command::Gc | Command::Status => (false, false, false, true),
            Command::Version => (false, false, false, false),
        };
        if need_cid && container_id.is_empty() {
            missing.push("CNI_CONTAINERID");
        }
        if need_netns && netns.is_none() {
            missing.push("CNI_NETNS");
        }
        if need_if && ifname.is_empty() {
            missing.push("CNI_IFNAME");
        }
        if need_path && path_raw.is_empty() {
            missing.push("CNI_PATH");
        }
        if !missing.is_empty() {
            return Err(CniError::invalid_env(format!(
                "required env variables [{}] missing",
                missing.join(",")
            )));
        }
        if need_cid {
            validate_container_id(&container_id)?;
        }
        if need_if {
            validate_ifname(&ifname)?;
        }
        let path = std::env::split_paths(&path_raw)
            .filter(|p| !p.as_os_str().is_empty())
            .collect();
        Ok(Env {
            command,
            container_id,
            netns: netns.map(PathBuf::from),
            ifname,
            args: parse_args(&args_raw)?,
            path,
        })
    }

    /// A `CNI_ARGS` value by key (e.g. `K8S_POD_NAME`).
    pub fn arg(&self, key: &str) -> Option<&str> {
        self.args
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// `^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`, as libcni's `ValidateContainerID`.
pub fn validate_container_id(id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(CniError::new(
            code::UNKNOWN_CONTAINER,
            "missing containerID",
        ));
    }
    if !valid_id_chars(id) {
        return Err(CniError::invalid_env("invalid characters in containerID").with_details(id));
    }
    Ok(())
}

/// Network names follow the container-ID character rule (libcni
/// `ValidateNetworkName`), but a bad one is a config error.
pub fn validate_network_name(name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(CniError::invalid_config("missing network name"));
    }
    if !valid_id_chars(name) {
        return Err(
            CniError::invalid_config("invalid characters found in network name").with_details(name),
        );
    }
    Ok(())
}

fn valid_id_chars(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// Linux interface name rules, as libcni's `ValidateInterfaceName`.
pub fn validate_ifname(name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(CniError::invalid_env("interface name is empty"));
    }
    if name.len() > 15 {
        return Err(CniError::invalid_env(format!(
            "interface name {name:?} is too long: {} bytes, at most 15",
            name.len()
        )));
    }
    if name == "." || name == ".." {
        return Err(CniError::invalid_env(format!(
            "interface name {name:?} is . or .."
        )));
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        return Err(CniError::invalid_env(format!(
            "interface name {name:?} contains / or : or whitespace characters"
        )));
    }
    // The kernel stops a name at NUL: "br\0x" would silently be "br".
    if name.chars().any(char::is_control) {
        return Err(CniError::invalid_env(format!(
            "interface name {name:?} contains control characters"
        )));
    }
    Ok(())
}

/// `CNI_ARGS`: `K1=V1;K2=V2`. Empty pairs (a trailing `;`) are tolerated.
pub fn parse_args(raw: &str) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for pair in raw.split(';').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some((k, v)) if !k.is_empty() => out.push((k.to_string(), v.to_string())),
            _ => {
                return Err(
                    CniError::invalid_env("CNI_ARGS: invalid pair, expected KEY=VALUE")
                        .with_details(pair.to_string()),
                )
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::ffi::OsString;

    fn env(pairs: &[(&str, &str)]) -> Result<Env> {
        let m: HashMap<String, OsString> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        Env::from_lookup(|k| m.get(k).cloned())
    }

    const ADD: &[(&str, &str)] = &[
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "abc123"),
        ("CNI_NETNS", "/run/netns/x"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin:/usr/lib/cni"),
        ("CNI_ARGS", "K8S_POD_NAME=p;IgnoreUnknown=1"),
    ];

    #[test]
    fn add_env_parses() {
        let e = env(ADD).unwrap();
        assert_eq!(e.command, Command::Add);
        assert_eq!(e.path.len(), 2);
        assert_eq!(e.arg("K8S_POD_NAME"), Some("p"));
    }

    #[test]
    fn missing_vars_are_code_4_and_named() {
        let e = env(&ADD[..3]).unwrap_err();
        assert_eq!(e.code, 4);
        assert!(
            e.msg.contains("CNI_IFNAME") && e.msg.contains("CNI_PATH"),
            "{}",
            e.msg
        );
        assert_eq!(env(&[]).unwrap_err().code, 4);
        assert_eq!(env(&[("CNI_COMMAND", "FOO")]).unwrap_err().code, 4);
        // DEL needs no netns; VERSION needs nothing.
        let del: Vec<_> = ADD
            .iter()
            .copied()
            .filter(|(k, _)| *k != "CNI_NETNS")
            .map(|(k, v)| {
                if k == "CNI_COMMAND" {
                    (k, "DEL")
                } else {
                    (k, v)
                }
            })
            .collect();
        assert!(env(&del).unwrap().netns.is_none());
        env(&[("CNI_COMMAND", "VERSION")]).unwrap();
    }

    #[test]
    fn ifname_rules() {
        for bad in [
            "",
            "0123456789abcdef",
            ".",
            "..",
            "a/b",
            "a:b",
            "a b",
            "a\tb",
            "br\0x",
            "a\u{7f}b",
        ] {
            assert_eq!(validate_ifname(bad).unwrap_err().code, 4, "{bad:?}");
        }
        for ok in ["eth0", "0123456789abcde", "net1.100", "a-b_c"] {
            validate_ifname(ok).unwrap();
        }
    }

    #[test]
    fn container_id_rules() {
        assert_eq!(validate_container_id("").unwrap_err().code, 3);
        for bad in ["-abc", "a b", "a/b", "../x", "ä"] {
            assert_eq!(validate_container_id(bad).unwrap_err().code, 4, "{bad:?}");
        }
        validate_container_id("0a1B.c_d-e").unwrap();
        assert_eq!(validate_network_name("bad/name").unwrap_err().code, 7);
        assert_eq!(validate_network_name("").unwrap_err().code, 7);
    }

    #[test]
    fn args_parse() {
        assert_eq!(parse_args("").unwrap(), vec![]);
        assert_eq!(parse_args("A=1;B=;").unwrap().len(), 2);
        assert_eq!(parse_args("A=1;junk").unwrap_err().code, 4);
        assert_eq!(parse_args("=v").unwrap_err().code, 4);
    }
}
