use std::io;
use std::time::Duration;

/// Everything that can go wrong talking to OVSDB. The variants separate
/// "the server is not there" (`Endpoint`, `Connect`, `Io`, `Closed`) from
/// "the server said no" (`Rpc`, `Transaction`, `PortExists`, `NotFound`,
/// `Interface`) and "it took too long" (`Timeout`), because callers map them
/// to different CNI error codes.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid OVSDB endpoint {0:?}: expected unix:PATH or tcp:HOST:PORT")]
    Endpoint(String),

    #[error("cannot connect to OVSDB at {endpoint}: {source}")]
    Connect {
        endpoint: String,
        #[source]
        source: io::Error,
    },

    #[error("OVSDB connection I/O error: {0}")]
    Io(#[source] io::Error),

    #[error("OVSDB server closed the connection")]
    Closed,

    /// The peer sent something that is not valid RFC 7047 (bad JSON, wrong
    /// shapes, unexpected types in a reply).
    #[error("OVSDB protocol error: {0}")]
    Protocol(String),

    /// A JSON-RPC request as a whole was rejected (e.g. unknown database).
    #[error("OVSDB {method} request failed: {error}")]
    Rpc { method: String, error: String },

    /// Operation `op` of a transaction failed; `op == ops.len()` means the
    /// commit itself failed (e.g. a constraint violation).
    #[error("OVSDB transaction failed at operation {op}: {error}{}", details_suffix(.details))]
    Transaction {
        op: usize,
        error: String,
        details: Option<String>,
    },

    #[error("timed out after {after:?} waiting for {what}")]
    Timeout { after: Duration, what: String },

    #[error("{0} not found in OVSDB")]
    NotFound(String),

    #[error("port {0} already exists in OVSDB")]
    PortExists(String),

    /// A bridge was not deleted because ports other than its own are on it.
    #[error("{0}")]
    NotEmpty(String),

    /// ovs-vswitchd could not set the interface up; `error` is its text
    /// from the Interface table's `error` column.
    #[error("interface {iface}: {error}")]
    Interface { iface: String, error: String },

    /// The bridge's OpenFlow socket could not be reached or broke.
    #[error("OpenFlow: {what}: {source}")]
    OpenFlowIo {
        what: String,
        #[source]
        source: io::Error,
    },

    /// The switch said something this client does not understand.
    #[error("OpenFlow at {socket}: {detail}")]
    OpenFlow { socket: String, detail: String },

    /// The switch answered a request with OFPT_ERROR.
    #[error("OpenFlow: {what} refused by the switch (error type {error_type}, code {code})")]
    OpenFlowRefused {
        what: String,
        error_type: u16,
        code: u16,
    },
}

impl Error {
    /// True when the server could not be reached or the connection broke:
    /// the cases a CNI STATUS reports as "plugin not available".
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            Error::Endpoint(_)
                | Error::Connect { .. }
                | Error::Io(_)
                | Error::Closed
                | Error::OpenFlowIo { .. }
        )
    }
}

fn details_suffix(details: &Option<String>) -> String {
    match details {
        Some(d) if !d.is_empty() => format!(" ({d})"),
        _ => String::new(),
    }
}

pub type Result<T> = std::result::Result<T, Error>;
