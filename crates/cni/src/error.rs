//! The CNI error type: what the plugin prints on stdout when a command fails.

use serde::Serialize;

/// Well-known error codes of CNI spec 1.1.0 ("Error" section) and our own.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    pub const NOT_AVAILABLE_LIMITED: u32 = 51;
    /// Our own: a host networking (netlink, sysctl, firewall) operation failed.
    pub const NETWORK: u32 = 100;
    /// Our own: the switch (OVS / Linux bridge) refused or failed an operation.
    pub const SWITCH: u32 = 101;
    /// Our own: the delegated IPAM plugin failed without a CNI error of its own.
    pub const IPAM: u32 = 102;
    /// Our own: CHECK found the attachment differs from prevResult.
    pub const CHECK_FAILED: u32 = 103;
    /// Our own: an attachment with this container ID and ifname already exists.
    pub const ALREADY_EXISTS: u32 = 104;
}

/// A CNI error: `{cniVersion, code, msg, details}` on stdout, non-zero exit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}{}", if details.is_empty() { String::new() } else { format!(": {details}") })]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> CniError {
        self.details = details.into();
        self
    }

    pub fn invalid_config(msg: impl Into<String>) -> CniError {
        CniError::new(code::INVALID_CONFIG, msg)
    }

    pub fn invalid_env(msg: impl Into<String>) -> CniError {
        CniError::new(code::INVALID_ENV, msg)
    }

    pub fn incompatible(msg: impl Into<String>) -> CniError {
        CniError::new(code::INCOMPATIBLE_VERSION, msg)
    }

    /// Prepends context to the message, keeping code and details.
    pub fn context(mut self, ctx: impl std::fmt::Display) -> CniError {
        self.msg = format!("{ctx}: {}", self.msg);
        self
    }

    /// The JSON the spec prescribes, in the given result version.
    pub fn to_json(&self, cni_version: &str) -> String {
        #[derive(Serialize)]
        struct Out<'a> {
            #[serde(rename = "cniVersion")]
            cni_version: &'a str,
            code: u32,
            msg: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            details: &'a str,
        }
        let out = Out {
            cni_version,
            code: self.code,
            msg: &self.msg,
            details: &self.details,
        };
        // Serializing a struct of strings and integers cannot fail.
        serde_json::to_string(&out).unwrap_or_default()
    }

    /// Reads an error another plugin (the IPAM delegate) printed.
    pub fn from_plugin_output(stdout: &[u8]) -> Option<CniError> {
        #[derive(serde::Deserialize)]
        struct In {
            code: u32,
            #[serde(default)]
            msg: String,
            #[serde(default)]
            details: String,
        }
        let e: In = serde_json::from_slice(stdout).ok()?;
        Some(CniError {
            code: e.code,
            msg: e.msg,
            details: e.details,
        })
    }
}

pub type Result<T, E = CniError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_has_spec_fields_and_omits_empty_details() {
        let e = CniError::new(code::DECODE, "bad json");
        let v: serde_json::Value = serde_json::from_str(&e.to_json("1.1.0")).unwrap();
        assert_eq!(v["cniVersion"], "1.1.0");
        assert_eq!(v["code"], 6);
        assert_eq!(v["msg"], "bad json");
        assert!(v.get("details").is_none());
        let e = e.with_details("line 1");
        let v: serde_json::Value = serde_json::from_str(&e.to_json("0.4.0")).unwrap();
        assert_eq!(v["details"], "line 1");
    }

    #[test]
    fn parses_delegate_error() {
        let e = CniError::from_plugin_output(br#"{"cniVersion":"1.0.0","code":11,"msg":"busy"}"#)
            .unwrap();
        assert_eq!(e.code, 11);
        assert_eq!(e.msg, "busy");
        assert!(CniError::from_plugin_output(b"not json").is_none());
    }
}
