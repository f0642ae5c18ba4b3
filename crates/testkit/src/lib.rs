//! Test infrastructure shared by the integration tests and the simulated
//! cluster: everything here creates resources only inside network namespaces
//! it made itself, and deletes them on drop (success or panic).
// Test support: a harness that unwraps fails the test that called it, loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod agent;
pub mod cluster;
pub mod containerd;
pub mod cri;
pub mod etcd;
mod keeper;
pub mod miniupnpd;
pub mod natlab;
pub mod netns;
pub mod ovs;
pub mod plugin;
pub mod process;
pub mod raw;
pub mod scale;
pub mod services;
