use std::path::PathBuf;
use std::time::Duration;

/// Why a benchmark run (not a measurement target) failed. Every variant
/// says what was being done, because the report prints it as one line.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot start {program}: {source}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{what} did not finish within {after:?}")]
    Timeout { what: String, after: Duration },

    #[error("{what} failed: {detail}")]
    Failed { what: String, detail: String },

    #[error("{what}: unexpected output: {detail}")]
    Output { what: String, detail: String },

    #[error("{what}: {source}")]
    Store {
        what: String,
        #[source]
        source: evio_subnet::SubnetError,
    },

    #[error("{what}: {source}")]
    Net {
        what: String,
        #[source]
        source: evio_net::Error,
    },

    #[error("required program {0} is missing (build it first, or run scripts/bench.sh)")]
    Missing(PathBuf),

    #[error("interrupted")]
    Interrupted,
}

impl BenchError {
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
        let what = what.into();
        move |source| BenchError::Io { what, source }
    }

    pub fn net(what: impl Into<String>) -> impl FnOnce(evio_net::Error) -> BenchError {
        let what = what.into();
        move |source| BenchError::Net { what, source }
    }

    pub fn failed(what: impl Into<String>, detail: impl Into<String>) -> BenchError {
        BenchError::Failed {
            what: what.into(),
            detail: detail.into(),
        }
    }

    pub fn output(what: impl Into<String>, detail: impl Into<String>) -> BenchError {
        BenchError::Output {
            what: what.into(),
            detail: detail.into(),
        }
    }
}

pub type Result<T, E = BenchError> = std::result::Result<T, E>;
