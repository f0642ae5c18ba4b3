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

pub use error::{Error, Result};
pub use hash::fnv1a;
pub use link::{Address, Family, Link, Route};
pub use netlink::Handle;
pub use netns::{run_in_netns, NetnsFd, NetnsGuard};
