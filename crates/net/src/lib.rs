//! Synchronous host networking for the `evio` CNI plugin and `evio-node`.
//!
//! The plugin is a short-lived, single-threaded process run once per pod, so
//! everything here is blocking and cheap to start: one rtnetlink socket per
//! network namespace ([`Handle`]), plain files for sysctls, one ioctl for
//! ethtool, one nf_tables netlink socket per masquerade change ([`nft`]).
//! No program is ever executed.

mod error;
pub mod ethtool;
mod hash;
pub mod ipv6;
mod link;
mod netlink;
mod netns;
pub mod nft;
pub mod sysctl;

/// Where the kernel shows bridge netfilter's switches once the
/// `br_netfilter` module is loaded (or built in); per network namespace.
pub const BRIDGE_NF_SYSCTL: &str = "/proc/sys/net/bridge/bridge-nf-call-iptables";

/// Whether bridge netfilter (`br_netfilter`) is in the running kernel, as
/// the calling thread's network namespace sees it. Without it a bridge's
/// `nf_call_iptables` is accepted and does nothing.
pub fn bridge_netfilter_available() -> bool {
    std::path::Path::new(BRIDGE_NF_SYSCTL).exists()
}

pub use error::{Error, Result};
pub use hash::fnv1a;
pub use link::{Address, BridgeNf, Family, Link, Route, Rule};
pub use netlink::Handle;
pub use netns::{run_in_netns, NetnsFd, NetnsGuard};
