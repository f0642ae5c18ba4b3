//! Per-node pod subnets for evio: the arithmetic that splits a pod CIDR into
//! `2^nodeBits` node subnets, and the stores (`file://`, `etcd://`) that hand
//! each node one of them exactly once, across processes and machines.
//!
//! The contract (key layout, ranges, error cases) is `docs/design.md`,
//! sections "Subnet arithmetic", "config-gen" and "Stores and their layout".

mod arith;
mod choose;
mod dirwatch;
mod error;
mod etcd;
mod etcd_mirror;
mod file;
mod peers;
mod peers_etcd;
mod peers_file;
mod record;
mod store;

pub use arith::{ip_offset, ip_to_u128, parse_node_bits, NodeSubnet, PodNetwork};
pub use choose::UsedSet;
pub use error::SubnetError;
pub use etcd::{read_secret, EtcdOptions, EtcdStore};
pub use file::{remove_leftover_temps, write_file_atomic, FileStore};
pub use peers::{
    now_rfc3339, usable_host, Alive, Allocations, Candidate, CandidateKind, Followed,
    HostAllocation, HostSlot, Liveness, Name, NodeInfo, OverlayBackend, OverlayStore, PeerRecord,
    PeerSnapshot, ReleaseRequest, Released, ReleasedNode, FILE_STALE_AFTER,
};
pub use record::{node_key, parse_subnet_key, subnet_key, validate_name, OwnerRecord};
pub use store::{
    open_overlay_store, open_store, Allocation, Lease, StoreOptions, StoreUrl, SubnetStore,
    DEFAULT_STORE,
};
