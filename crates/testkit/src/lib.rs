//! Test infrastructure shared by the integration tests and the simulated
//! cluster: everything here creates resources only inside network namespaces
//! it made itself, and deletes them on drop (success or panic).

pub mod agent;
pub mod cluster;
pub mod etcd;
mod keeper;
pub mod natlab;
pub mod netns;
pub mod ovs;
pub mod plugin;
