//! Linux bridge backend (`"bridgeType": "linux"`, original `"LXBR"`).

use evio_cni::config::NetConf;
use evio_cni::{code, CniError, Result};
use evio_net::{BridgeNf, Handle, Link};

use super::{random_mac, Port, Switch, VethOwner};
use crate::neterr;

pub struct LinuxBridge {
    name: String,
    mtu: u32,
    hairpin: bool,
}

impl LinuxBridge {
    pub fn new(conf: &NetConf) -> LinuxBridge {
        LinuxBridge {
            name: conf.bridge.clone(),
            mtu: conf.mtu,
            hairpin: conf.hairpin_mode,
        }
    }

    fn lookup(&self, host: &mut Handle) -> Result<Option<Link>> {
        let link = host
            .link_by_name(&self.name)
            .map_err(neterr(format!("look up bridge {}", self.name)))?;
        match link {
            Some(l) if l.kind.as_deref() != Some("bridge") => Err(CniError::new(
                code::INVALID_CONFIG,
                format!(
                    "bridge {:?} exists but is a {} device, not a Linux bridge",
                    self.name,
                    l.kind.as_deref().unwrap_or("non-bridge")
                ),
            )),
            other => Ok(other),
        }
    }
}

/// Both families through iptables/nftables: kube-proxy's NAT of Service
/// traffic between pods on this bridge (and across the overlay, which is
/// the same L2 segment) is only reversed if bridged replies pass the host's
/// conntrack. Per bridge: the machine's global sysctls stay as they are.
pub const BRIDGE_NF: BridgeNf = BridgeNf {
    iptables: true,
    ip6tables: true,
};

/// Turns on the bridge's netfilter options if the kernel reports them off;
/// returns whether it changed anything. Shared with `evio-node run`.
pub fn ensure_bridge_nf(host: &mut Handle, bridge: &Link) -> evio_net::Result<bool> {
    match bridge.bridge_nf {
        Some(nf) if nf == BRIDGE_NF => Ok(false),
        // Not reported: a kernel without bridge netfilter, where the
        // options do not exist (STATUS says so).
        None => Ok(false),
        Some(_) => host.set_bridge_nf(bridge.index, BRIDGE_NF).map(|()| true),
    }
}

/// The message STATUS, ADD and doctor give when bridge netfilter is
/// missing from the kernel.
pub const NO_BRIDGE_NETFILTER: &str = "bridge netfilter is not in the kernel     (no /proc/sys/net/bridge): Kubernetes Services cannot work on a Linux bridge     without it; load it with `modprobe br_netfilter` (and list br_netfilter in     /etc/modules-load.d/ to keep it after a reboot)";

impl Switch for LinuxBridge {
    fn prerequisites(&self) -> Result<()> {
        if evio_net::bridge_netfilter_available() {
            Ok(())
        } else {
            Err(CniError::new(code::TRY_AGAIN, NO_BRIDGE_NETFILTER))
        }
    }

    fn ensure_bridge(&mut self, host: &mut Handle) -> Result<Link> {
        if let Some(l) = self.lookup(host)? {
            ensure_bridge_nf(host, &l)
                .map_err(neterr(format!("bridge netfilter options of {}", self.name)))?;
            return Ok(l);
        }
        // The gateway's MAC must not change when the pod whose veth has the
        // lowest MAC leaves, or every pod's ARP entry for the gateway goes
        // stale; it is pinned in the creating message itself.
        match host.create_bridge_with(&self.name, self.mtu, Some(random_mac()), Some(BRIDGE_NF)) {
            Ok(()) => {}
            // Another plugin process created it between our lookup and now.
            Err(e) if e.is_exists() => {}
            Err(e) => return Err(neterr(format!("create bridge {}", self.name))(e)),
        }
        self.lookup(host)?.ok_or_else(|| {
            CniError::new(
                code::NETWORK,
                format!("bridge {} vanished right after creation", self.name),
            )
        })
    }

    fn existing_bridge(&mut self, host: &mut Handle) -> Result<Link> {
        self.lookup(host)?.ok_or_else(|| {
            CniError::new(
                code::CHECK_FAILED,
                format!("bridge {} is missing", self.name),
            )
        })
    }

    fn attach(&mut self, host: &mut Handle, port: &Port) -> Result<()> {
        let (bridge, veth) = (port.bridge, port.veth);
        host.set_master(veth.index, bridge.index)
            .map_err(neterr(format!(
                "attach {} to bridge {}",
                veth.name, bridge.name
            )))?;
        if self.hairpin {
            host.set_hairpin(veth.index, true)
                .map_err(neterr(format!("hairpin mode on {}", veth.name)))?;
        }
        Ok(())
    }

    fn detach(&mut self, _veth_name: &str, _owner: &VethOwner) -> Result<()> {
        // A bridge port is the link itself: deleting the veth unplugs it.
        Ok(())
    }

    fn check(&mut self, _host: &mut Handle, port: &Port) -> Result<()> {
        if port.veth.master != Some(port.bridge.index) {
            return Err(CniError::new(
                code::CHECK_FAILED,
                format!(
                    "host veth {} is not attached to bridge {}",
                    port.veth.name, port.bridge.name
                ),
            ));
        }
        Ok(())
    }

    fn gc(
        &mut self,
        _host: &mut Handle,
        _network: &str,
        _keep: &dyn Fn(&str, &str) -> bool,
    ) -> Result<Vec<String>> {
        // Ports are the veths themselves, which GC removes by alias.
        Ok(Vec::new())
    }

    fn status(&mut self) -> Result<()> {
        self.prerequisites()
            .map_err(|e| CniError::new(code::NOT_AVAILABLE, e.msg))
    }

    fn needs_tx_checksum_off(&self) -> bool {
        false
    }
}
