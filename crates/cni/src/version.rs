//! CNI spec versions this plugin speaks.

use crate::error::{CniError, Result};

/// Every version we accept in a network config, oldest first.
pub const SUPPORTED: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The newest version: what VERSION and errors before config parsing report.
pub const LATEST: &str = "1.1.0";

/// A parsed spec version; ordered so commands can be gated (`>= 0.4.0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version(pub u16, pub u16, pub u16);

impl Version {
    pub const V0_3_0: Version = Version(0, 3, 0);
    pub const V0_4_0: Version = Version(0, 4, 0);
    pub const V1_0_0: Version = Version(1, 0, 0);
    pub const V1_1_0: Version = Version(1, 1, 0);

    /// Parses `major.minor.patch`; any other shape is a decode failure.
    pub fn parse(s: &str) -> Result<Version> {
        let mut it = s.split('.');
        let mut part = || -> Option<u16> {
            let p = it.next()?;
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            p.parse().ok()
        };
        let v = (part(), part(), part());
        match (v, it.next()) {
            ((Some(a), Some(b), Some(c)), None) => Ok(Version(a, b, c)),
            _ => Err(CniError::new(
                crate::code::DECODE,
                format!("invalid cniVersion {s:?}: expected major.minor.patch"),
            )),
        }
    }

    /// Parses and checks the version is one we implement (code 1 otherwise).
    pub fn supported(s: &str) -> Result<Version> {
        let v = Version::parse(s)?;
        if SUPPORTED.contains(&s) {
            Ok(v)
        } else {
            Err(CniError::incompatible(format!(
                "incompatible CNI versions: config is {s:?}, plugin supports [{}]",
                SUPPORTED.join(", ")
            )))
        }
    }

    /// Results before 1.0.0 carry `"version"` in every IP entry.
    pub fn ips_carry_version(self) -> bool {
        self < Version::V1_0_0
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

/// The VERSION command's output.
pub fn version_info() -> String {
    serde_json::json!({ "cniVersion": LATEST, "supportedVersions": SUPPORTED }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_order() {
        assert_eq!(Version::parse("0.4.0").unwrap(), Version(0, 4, 0));
        assert!(Version::parse("1.1.0").unwrap() > Version::V1_0_0);
        assert!(Version::parse("0.3.1").unwrap() < Version::V0_4_0);
        for bad in [
            "", "1", "1.0", "1.0.0.0", "a.b.c", "1.-1.0", "1..0", "+1.0.0",
        ] {
            assert_eq!(Version::parse(bad).unwrap_err().code, 6, "{bad}");
        }
    }

    #[test]
    fn unsupported_is_code_1() {
        assert_eq!(Version::supported("0.2.0").unwrap_err().code, 1);
        assert_eq!(Version::supported("9.9.9").unwrap_err().code, 1);
        for v in SUPPORTED {
            Version::supported(v).unwrap();
        }
    }

    #[test]
    fn version_info_lists_all() {
        let v: serde_json::Value = serde_json::from_str(&version_info()).unwrap();
        assert_eq!(v["cniVersion"], LATEST);
        assert_eq!(
            v["supportedVersions"].as_array().unwrap().len(),
            SUPPORTED.len()
        );
    }
}
