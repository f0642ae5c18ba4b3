//! Kernel parameters under /proc/sys. The `net/` ones belong to the network
//! namespace of the thread that opens the file, so call these after entering
//! the namespace (or from [`crate::run_in_netns`]).

use std::fs;
use std::io::Write;
use std::path::PathBuf;

use crate::{Error, Result};

/// `key` is relative to /proc/sys with '/' separators, so interface names
/// containing dots work: `net/ipv4/conf/eth0.100/arp_notify`.
fn path(key: &str) -> Result<PathBuf> {
    let bad = key.is_empty()
        || key.contains('\0')
        || key
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..");
    if bad {
        return Err(Error::invalid("sysctl key", key));
    }
    Ok(PathBuf::from("/proc/sys").join(key))
}

/// The current value, without the trailing newline.
pub fn get(key: &str) -> Result<String> {
    let p = path(key)?;
    let v = fs::read_to_string(&p).map_err(|e| Error::io(format!("read sysctl {key}"), e))?;
    Ok(v.trim_end().to_string())
}

/// Sets `key` to `value` unless it already has that value: one read instead
/// of a write, and no failure on a read-only /proc/sys that is already right.
pub fn set(key: &str, value: &str) -> Result<()> {
    if get(key)? == value.trim() {
        return Ok(());
    }
    let p = path(key)?;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .map_err(|e| Error::io(format!("open sysctl {key} for writing"), e))?;
    f.write_all(value.as_bytes())
        .map_err(|e| Error::io(format!("write {value:?} to sysctl {key}"), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_validation() {
        assert_eq!(
            path("net/ipv4/conf/eth0.100/arp_notify").unwrap(),
            PathBuf::from("/proc/sys/net/ipv4/conf/eth0.100/arp_notify")
        );
        for bad in [
            "",
            "/net/ipv4/ip_forward",
            "net//x",
            "net/../../etc",
            "net/ipv4/",
            "a\0b",
        ] {
            assert!(path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn reads_a_global_value() {
        // Present on every Linux; only checks that reading and trimming work.
        let v = get("kernel/ostype").unwrap();
        assert_eq!(v, "Linux");
    }
}
