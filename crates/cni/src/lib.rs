//! The CNI protocol as evio speaks it: spec versions, environment, network
//! config, results across versions, errors with well-known codes, and the
//! delegated IPAM plugin. No host networking here (see `evio-net`).

pub mod config;
pub mod env;
pub mod error;
pub mod files;
pub mod host_local;
pub mod ipam;
pub mod result;
pub mod version;

pub use error::{code, CniError, Result};
