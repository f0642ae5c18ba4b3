use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every failure of this crate. Kernel refusals keep their errno so callers
/// can tell "already there" and "already gone" apart from real failures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel answered a netlink request with an error.
    #[error("{}", netlink_display(.op, .errno, .message))]
    Netlink {
        /// What was being done, naming the interface/address/route.
        op: String,
        /// Positive errno (EEXIST, ENODEV, ...).
        errno: i32,
        /// The kernel's extended-ack message, when it sent one.
        message: Option<String>,
    },

    /// A system call or file operation failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    /// The namespace path does not exist (typically: the container is gone).
    #[error("network namespace {} does not exist", .0.display())]
    NetnsNotFound(PathBuf),

    /// The path exists but is not a network namespace.
    #[error("{} is not a network namespace", .0.display())]
    NotNetns(PathBuf),

    /// The kernel sent something this crate cannot make sense of.
    #[error("netlink protocol error while trying to {op}: {detail}")]
    Protocol { op: String, detail: String },

    /// An argument was rejected before anything was sent to the kernel.
    #[error("invalid {what}: {value:?}")]
    Invalid { what: &'static str, value: String },

    /// IPv6 duplicate address detection found another holder of the address.
    #[error("IPv6 duplicate address detected for {addr} on interface index {index}")]
    DadFailed { index: u32, addr: IpNet },

    /// A bounded wait ran out.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout { what: String, after: Duration },
}

fn netlink_display(op: &str, errno: &i32, message: &Option<String>) -> String {
    let err = std::io::Error::from_raw_os_error(*errno);
    match message {
        Some(m) => format!("{op}: {err} ({m})"),
        None => format!("{op}: {err}"),
    }
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn nix(context: impl Into<String>, errno: nix::Error) -> Error {
        Error::io(context, std::io::Error::from_raw_os_error(errno as i32))
    }

    pub(crate) fn invalid(what: &'static str, value: impl Into<String>) -> Error {
        Error::Invalid {
            what,
            value: value.into(),
        }
    }

    /// The errno behind this error, if there is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Netlink { errno, .. } => Some(*errno),
            Error::Io { source, .. } => source.raw_os_error(),
            Error::NetnsNotFound(_) => Some(libc::ENOENT),
            _ => None,
        }
    }

    /// The object the operation was about does not exist: missing
    /// namespace or file (ENOENT), interface (ENODEV), route (ESRCH) or
    /// address (EADDRNOTAVAIL). What DEL treats as "already gone".
    pub fn is_not_found(&self) -> bool {
        matches!(
            self.errno(),
            Some(libc::ENOENT | libc::ENODEV | libc::ESRCH | libc::EADDRNOTAVAIL)
        )
    }

    /// The object being created already exists (EEXIST).
    pub fn is_exists(&self) -> bool {
        self.errno() == Some(libc::EEXIST)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_classification() {
        let nl = |errno| Error::Netlink {
            op: "x".into(),
            errno,
            message: None,
        };
        assert!(nl(libc::EEXIST).is_exists());
        assert!(!nl(libc::EEXIST).is_not_found());
        for e in [libc::ENOENT, libc::ENODEV, libc::ESRCH, libc::EADDRNOTAVAIL] {
            assert!(nl(e).is_not_found(), "{e}");
            assert!(!nl(e).is_exists(), "{e}");
        }
        assert!(!nl(libc::EBUSY).is_not_found());
        assert_eq!(nl(libc::EBUSY).errno(), Some(libc::EBUSY));
        assert!(Error::NetnsNotFound("/x".into()).is_not_found());
        let io = Error::io("open", std::io::Error::from_raw_os_error(libc::EPERM));
        assert_eq!(io.errno(), Some(libc::EPERM));
        assert_eq!(Error::invalid("name", "x").errno(), None);
    }

    #[test]
    fn netlink_error_message_names_operation_and_errno() {
        let e = Error::Netlink {
            op: "create bridge br0".into(),
            errno: libc::EEXIST,
            message: Some("already there".into()),
        };
        let s = e.to_string();
        assert!(s.starts_with("create bridge br0: File exists"), "{s}");
        assert!(s.ends_with("(already there)"), "{s}");
    }
}
