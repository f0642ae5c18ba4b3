//! Linux bridge backend (`"bridgeType": "linux"`, original `"LXBR"`).

use evio_cni::config::NetConf;
use evio_cni::{code, CniError, Result};
use evio_net::{Handle, Link};

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

impl Switch for LinuxBridge {
    fn ensure_bridge(&mut self, host: &mut Handle) -> Result<Link> {
        if let Some(l) = self.lookup(host)? {
            return Ok(l);
        }
        // The gateway's MAC must not change when the pod whose veth has the
        // lowest MAC leaves, or every pod's ARP entry for the gateway goes
        // stale; it is pinned in the creating message itself.
        match host.create_bridge(&self.name, self.mtu, Some(random_mac())) {
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
        Ok(())
    }

    fn needs_tx_checksum_off(&self) -> bool {
        false
    }
}
