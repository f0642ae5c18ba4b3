use std::path::PathBuf;

/// Why the doctor could not produce a report at all. Inconsistencies it
/// finds are not errors: they are [`crate::Problem`]s in the report.
#[derive(Debug, thiserror::Error)]
pub enum DoctorError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{}: {reason}", path.display())]
    Config { path: PathBuf, reason: String },

    #[error("no network config with an evio plugin in {}", .0.display())]
    NoNetwork(PathBuf),

    #[error("{what}: {source}")]
    Net {
        what: String,
        #[source]
        source: evio_net::Error,
    },

    #[error("invalid valid-attachments entry {0:?}: expected CONTAINERID/IFNAME")]
    Attachment(String),

    /// Returned by callers that turn a report with problems into a failure.
    #[error("{0} problem(s) found")]
    ProblemsFound(usize),
}

pub type Result<T, E = DoctorError> = std::result::Result<T, E>;
