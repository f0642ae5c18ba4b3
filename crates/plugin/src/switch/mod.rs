//! The node bridge a pod's host veth is plugged into: a Linux bridge or an
//! Open vSwitch bridge. Everything else of ADD/DEL is the same for both.

use evio_cni::config::{BridgeType, NetConf};
use evio_cni::Result;
use evio_net::{Handle, Link};

pub mod flows;
pub mod gateway;
pub mod linux;
pub mod ovs;

/// Who a host veth belongs to: the attachment identity plus the network
/// and netns it was made for (what OVS ports carry in external_ids).
pub struct VethOwner<'a> {
    pub network: &'a str,
    pub container_id: &'a str,
    pub ifname: &'a str,
    pub netns: Option<&'a str>,
}

/// A host veth as a port of the node bridge, and whose it is.
pub struct Port<'a> {
    pub bridge: &'a Link,
    pub veth: &'a Link,
    pub owner: &'a VethOwner<'a>,
}

pub trait Switch {
    /// What the host must provide before pods can be plugged in and reach
    /// Services (ADD fails early, touching nothing, when it is missing).
    fn prerequisites(&self) -> Result<()> {
        Ok(())
    }

    /// Creates the bridge if missing (racing plugin processes both succeed)
    /// and returns its link in the node namespace.
    fn ensure_bridge(&mut self, host: &mut Handle) -> Result<Link>;

    /// The bridge as it exists, without creating it (CHECK). Missing is a
    /// failed check.
    fn existing_bridge(&mut self, host: &mut Handle) -> Result<Link>;

    /// Plugs the host veth in. On error nothing of the port is left.
    fn attach(&mut self, host: &mut Handle, port: &Port) -> Result<()>;

    /// Unplugs the attachment's port, if the switch keeps one apart from the
    /// link (OVS does). Succeeds when it is already gone.
    fn detach(&mut self, veth_name: &str, owner: &VethOwner) -> Result<()>;

    /// Verifies the host veth is plugged into the bridge as this attachment.
    fn check(&mut self, host: &mut Handle, port: &Port) -> Result<()>;

    /// Removes evio's ports of this network whose attachment (container
    /// ID, ifname) `keep` rejects or whose interface is gone. Returns the
    /// names it removed.
    fn gc(
        &mut self,
        host: &mut Handle,
        network: &str,
        keep: &dyn Fn(&str, &str) -> bool,
    ) -> Result<Vec<String>>;

    /// Whether the switch can take pods now (STATUS).
    fn status(&mut self) -> Result<()>;

    /// The userspace OVS datapath corrupts TCP from veths that leave the
    /// checksum to offload: such veths need TX checksumming off.
    fn needs_tx_checksum_off(&self) -> bool;
}

/// A random locally administered unicast MAC.
pub(crate) fn random_mac() -> [u8; 6] {
    let mut mac = [0u8; 6];
    // getrandom(2) cannot fail for 6 bytes once the pool is initialised;
    // if it somehow does, the bytes below still make a valid address.
    // SAFETY: the buffer is valid for 6 bytes.
    let n = unsafe { libc::getrandom(mac.as_mut_ptr().cast(), mac.len(), 0) };
    if n != 6 {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
            ^ u128::from(std::process::id());
        mac.copy_from_slice(&t.to_le_bytes()[..6]);
    }
    mac[0] = (mac[0] & 0xfe) | 0x02;
    mac
}

pub fn for_conf(conf: &NetConf) -> Box<dyn Switch> {
    match conf.bridge_type {
        BridgeType::Linux => Box::new(linux::LinuxBridge::new(conf)),
        BridgeType::Ovs => Box::new(ovs::OvsBridge::new(conf)),
    }
}
