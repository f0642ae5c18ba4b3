use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;

/// Everything that can go wrong while computing or allocating a node subnet.
/// Messages are single lines: `evio-node` prints them as its one stderr line.
#[derive(Debug, thiserror::Error)]
pub enum SubnetError {
    #[error("invalid podCIDR {input:?}: {reason}")]
    InvalidCidr { input: String, reason: String },

    #[error("podCIDR {input} has host bits set: the network address is {network}")]
    HostBitsSet { input: IpNet, network: IpNet },

    #[error(
        "invalid nodeBits {input:?}: expected a non-negative integer (number or numeric string)"
    )]
    InvalidNodeBits { input: String },

    #[error("nodeBits must be at least 1 (0 leaves a single node subnet: the whole podCIDR)")]
    NodeBitsZero,

    #[error(
        "nodeBits {node_bits} is too large for podCIDR {cidr}: it leaves only {available} bits"
    )]
    NodeBitsTooLarge {
        node_bits: u32,
        cidr: IpNet,
        available: u8,
    },

    #[error("podCIDR {cidr} with nodeBits {node_bits} leaves {host_bits} host bit(s) per node; at least 2 are needed (gateway + one pod)")]
    TooFewHostBits {
        cidr: IpNet,
        node_bits: u8,
        host_bits: u8,
    },

    #[error("node index {index} is outside 0..{capacity}")]
    IndexOutOfRange { index: u128, capacity: u128 },

    #[error("invalid {what} {name:?}: {reason}")]
    InvalidName {
        what: &'static str,
        name: String,
        reason: &'static str,
    },

    #[error("invalid store {url:?}: {reason}")]
    InvalidStore { url: String, reason: String },

    #[error("no free subnet left in network {network:?}: all {capacity} node subnets of {cidr} are allocated")]
    Exhausted {
        network: String,
        cidr: IpNet,
        capacity: u128,
    },

    #[error("gave up allocating a subnet for node {node:?} after {attempts} conflicting attempts")]
    TooManyConflicts { node: String, attempts: u32 },

    #[error("node {node:?} holds subnet {subnet}, which is not a node subnet of {cidr} with nodeBits {node_bits}; release it first (evio-node subnets release --node {node})")]
    ForeignSubnet {
        node: String,
        subnet: IpNet,
        cidr: IpNet,
        node_bits: u8,
    },

    #[error("host address {address} is taken: node {holder:?} holds it in network {network:?}; ask for another one (hostAddress, --host-address) or free it (evio-node nodes release {holder})")]
    HostAddressTaken {
        network: String,
        address: IpAddr,
        holder: String,
    },

    #[error("node {node:?} already holds host address {holds} in network {network:?}, not the requested {requested}; ask for {holds}, or free it first (evio-node nodes release {node})")]
    HostAddressHeld {
        network: String,
        node: String,
        holds: IpAddr,
        requested: IpAddr,
    },

    #[error("host address {address} is not usable in hostCIDR {cidr}: it must lie inside it and be neither its network nor its broadcast address")]
    HostAddressOutside { address: IpAddr, cidr: IpNet },

    #[error("node {node:?} has no subnet in network {network:?}")]
    NotFound { network: String, node: String },

    #[error("node {node:?} is live in network {network:?} ({why}): refusing to release it; stop its agent first, or give --force")]
    NodeLive {
        network: String,
        node: String,
        why: String,
    },

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("could not lock {path} within {after:?}")]
    LockTimeout { path: PathBuf, after: Duration },

    #[error("corrupt store data at {location}: {reason}")]
    Corrupt { location: String, reason: String },

    #[error("etcd credentials: {0}")]
    Credentials(String),

    #[error("etcd {endpoints}: {message}")]
    Etcd { endpoints: String, message: String },

    #[error("store {store} unreachable: gave up after {after:?}: {last}")]
    Unreachable {
        store: String,
        after: Duration,
        last: String,
        /// Every attempt ran out of time (no refusal, no transport error):
        /// the store is slow or the path to it hangs. A caller that keeps
        /// a session (connection, lease, watch) keeps it across this and
        /// tries again, rather than starting over, which costs a loaded
        /// store more (see the agent's store thread).
        slow: bool,
    },
}

impl SubnetError {
    /// A call that got no answer in time, as opposed to one that was
    /// refused or whose connection broke.
    pub fn is_slow(&self) -> bool {
        matches!(self, SubnetError::Unreachable { slow: true, .. })
    }
}
