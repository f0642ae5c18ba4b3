use std::path::PathBuf;
use std::time::Duration;

use evio_subnet::SubnetError;

/// Every failure of an `evio-node` command. Each renders as one line: it is
/// what the init container leaves in `kubectl logs`.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Subnet(#[from] SubnetError),

    #[error(transparent)]
    Doctor(#[from] evio_doctor::DoctorError),

    #[error("{source_name}: {reason}")]
    Config { source_name: String, reason: String },

    #[error("invalid network config: {0}")]
    Invalid(String),

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("store {store} did not complete within {after:?} (--timeout)")]
    Timeout { store: String, after: Duration },

    #[error("cannot determine the node name: {0}; pass --node-name or set NODE_NAME")]
    NodeName(String),

    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),

    /// What `uninstall` could not remove, every item on one line.
    #[error("{0}")]
    Uninstall(String),
}

impl NodeError {
    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> NodeError {
        let path = path.into();
        move |source| NodeError::Io { path, source }
    }
}
