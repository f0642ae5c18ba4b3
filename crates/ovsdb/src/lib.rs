//! A small synchronous OVSDB client (RFC 7047 JSON-RPC over `unix:PATH` or
//! `tcp:HOST:PORT`) for a short-lived, single-threaded CNI plugin: no async
//! runtime, one connection, bounded waits everywhere.
//!
//! Layers, bottom up:
//! * [`framing`] splits the delimiter-less JSON stream into messages;
//! * [`datum`] encodes and decodes OVSDB atoms, sets and maps;
//! * [`ops`] builds transaction operations;
//! * [`Client`] does JSON-RPC (`transact`, `list_dbs`, answering the
//!   server's `echo`);
//! * [`vswitch`] adds the `Open_vSwitch` helpers evio uses (bridge, ports
//!   identified by `external_ids`, waiting for vswitchd).
//!
//! Beside it, [`openflow`]: the few OpenFlow 1.3 messages (with Nicira's
//! conntrack extensions) evio needs for the flows on its own bridge.

mod client;
pub mod datum;
mod error;
pub mod framing;
pub mod openflow;
pub mod ops;
pub mod vswitch;

pub use client::{Client, Endpoint};
pub use datum::{Atom, Datum, Row};
pub use error::{Error, Result};
pub use vswitch::{PortInfo, PortSpec};
