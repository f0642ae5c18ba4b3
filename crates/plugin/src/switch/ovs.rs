//! Open vSwitch backend (`"bridgeType": "ovs"`, the default; original
//! `"OVS"`), over one native OVSDB connection per plugin run.

use std::path::Path;
use std::time::{Duration, Instant};

use evio_cni::config::{Datapath, NetConf};
use evio_cni::{code, CniError, Result};
use evio_net::{Handle, Link};
use evio_overlay::packet::{fmt_mac, parse_mac};
use evio_ovsdb::vswitch::PortSpec;
use evio_ovsdb::Client;

use super::{flows, Port, Switch, VethOwner};
use crate::naming::ovs_ids as ids;
use crate::neterr;

/// How long to wait for ovsdb-server to accept the connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long vswitchd may take to create the bridge device or take a port.
/// Past this the runtime gets "try again later" rather than a hung ADD.
const VSWITCHD_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an ADD that found the bridge waits for its pinned MAC.
const MAC_SETTLE: Duration = Duration::from_secs(1);

pub struct OvsBridge {
    name: String,
    endpoint: String,
    datapath: Datapath,
    mtu: u32,
    /// The bridge's OpenFlow socket, for evio's conntrack flows.
    mgmt: std::path::PathBuf,
    client: Option<Client>,
    /// The datapath type of the bridge as it exists (learned in
    /// `ensure_bridge`), which decides the checksum workaround.
    actual_datapath: Option<String>,
}

impl OvsBridge {
    pub fn new(conf: &NetConf) -> OvsBridge {
        OvsBridge {
            name: conf.bridge.clone(),
            endpoint: conf.ovsdb.clone(),
            datapath: conf.ovs_datapath,
            mtu: conf.mtu,
            mgmt: flows::mgmt_socket(conf, &conf.bridge),
            client: None,
            actual_datapath: None,
        }
    }

    fn client(&mut self) -> Result<&mut Client> {
        if self.client.is_none() {
            let c = Client::connect(&self.endpoint, CONNECT_TIMEOUT).map_err(|e| {
                CniError::new(
                    code::TRY_AGAIN,
                    format!(
                        "Open vSwitch database at {} is not reachable",
                        self.endpoint
                    ),
                )
                .with_details(e.to_string())
            })?;
            self.client = Some(c);
        }
        // Just set above when it was None.
        self.client
            .as_mut()
            .ok_or_else(|| CniError::new(code::SWITCH, "no OVSDB connection"))
    }

    fn wanted_datapath(&self) -> &'static str {
        match self.datapath {
            Datapath::System => "system",
            Datapath::Netdev => "netdev",
            // The kernel datapath needs the openvswitch module; without it
            // vswitchd can only run bridges in userspace.
            Datapath::Auto if Path::new("/sys/module/openvswitch").exists() => "system",
            Datapath::Auto => "netdev",
        }
    }

    /// The external_ids that make a port this attachment's: a port is only
    /// ever deleted when all of them match.
    fn identity<'a>(container_id: &'a str, ifname: &'a str) -> [(&'static str, &'a str); 3] {
        [
            (ids::OWNER, ids::OWNER_VALUE),
            (ids::CONTAINER_ID, container_id),
            (ids::IFNAME, ifname),
        ]
    }
}

impl OvsBridge {
    /// evio's conntrack flows (see [`flows`]), installed or repaired. The
    /// management socket appears with the bridge, possibly a moment after
    /// its device: a missing socket is retried until `deadline`.
    fn ensure_flows(&self, bridge: &Link, deadline: Instant) -> Result<()> {
        let mac = bridge.mac.ok_or_else(|| {
            CniError::new(
                code::SWITCH,
                format!("OVS bridge {} has no MAC", bridge.name),
            )
        })?;
        loop {
            match flows::ensure(&self.mgmt, mac) {
                Ok(_) => return Ok(()),
                Err(e) if e.is_unavailable() && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => {
                    let code = if e.is_unavailable() {
                        code::TRY_AGAIN
                    } else {
                        code::SWITCH
                    };
                    return Err(CniError::new(
                        code,
                        format!(
                            "OVS: cannot install evio's flows on bridge {} through {} \
                             (set ovsRunDir to ovs-vswitchd's run directory if it is elsewhere)",
                            bridge.name,
                            self.mgmt.display()
                        ),
                    )
                    .with_details(e.to_string()));
                }
            }
        }
    }
}

fn ovserr(what: impl std::fmt::Display) -> impl FnOnce(evio_ovsdb::Error) -> CniError {
    move |e| CniError::new(code::SWITCH, format!("OVS: {what}")).with_details(e.to_string())
}

impl Switch for OvsBridge {
    fn ensure_bridge(&mut self, host: &mut Handle) -> Result<Link> {
        let want = self.wanted_datapath();
        let name = self.name.clone();
        let client = self.client()?;
        // OVS, like the Linux bridge, otherwise gives the bridge the lowest
        // MAC of its ports, which changes as pods come and go and leaves the
        // pods' ARP entries for the gateway stale. Pinned in the creating
        // transaction, so no crash window leaves it unpinned.
        let mut pinned = Some(super::random_mac());
        let mac = pinned.as_ref().map(fmt_mac).unwrap_or_default();
        let created = client
            .ensure_bridge(&name, want, &[("hwaddr", &mac)])
            .map_err(ovserr(format!("create bridge {name}")))?;
        let actual = if created {
            want.to_string()
        } else {
            // Another ADD may have created it a moment ago: its pinned MAC
            // is the one the device is about to have, whatever it has now.
            let info = client
                .bridge(&name)
                .map_err(ovserr(format!("read bridge {name}")))?;
            pinned = info
                .as_ref()
                .and_then(|b| b.other_config.get("hwaddr"))
                .and_then(|m| parse_mac(m));
            info.map(|b| b.datapath_type)
                .filter(|t| !t.is_empty())
                .unwrap_or_else(|| "system".to_string())
        };
        self.actual_datapath = Some(actual);
        // vswitchd creates the bridge's internal device asynchronously.
        let deadline = Instant::now() + VSWITCHD_TIMEOUT;
        // The pinned MAC follows the device within milliseconds; an ADD
        // that did not create the bridge waits for it only briefly, so a
        // MAC changed behind OVS's back (until its next reconfiguration)
        // does not cost every ADD the whole timeout.
        let mac_deadline = Instant::now()
            + if created {
                VSWITCHD_TIMEOUT
            } else {
                MAC_SETTLE
            };
        loop {
            let link = host
                .link_by_name(&name)
                .map_err(neterr(format!("look up bridge {name}")))?;
            // vswitchd creates the device with a MAC of its own and applies
            // the pinned hwaddr a moment later: the reply flows rewrite to
            // the bridge's MAC, so they must see the pinned one, or Service
            // replies go to a MAC the device no longer has.
            let settled = |l: &Link| pinned.is_none() || l.mac == pinned;
            if let Some(l) = link.filter(|l| settled(l) || Instant::now() >= mac_deadline) {
                if l.mtu != self.mtu {
                    host.set_mtu(l.index, self.mtu)
                        .map_err(neterr(format!("set MTU of bridge {name}")))?;
                }
                self.ensure_flows(&l, deadline)?;
                return Ok(l);
            }
            if Instant::now() >= deadline {
                return Err(CniError::new(
                    code::TRY_AGAIN,
                    format!(
                        "OVS bridge {name} is in the database but ovs-vswitchd has not created its device within {}s",
                        VSWITCHD_TIMEOUT.as_secs()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn existing_bridge(&mut self, host: &mut Handle) -> Result<Link> {
        let name = self.name.clone();
        let dp = self
            .client()?
            .bridge_datapath_type(&name)
            .map_err(ovserr(format!("read bridge {name}")))?
            .ok_or_else(|| {
                CniError::new(code::CHECK_FAILED, format!("OVS bridge {name} is missing"))
            })?;
        self.actual_datapath = Some(if dp.is_empty() { "system".into() } else { dp });
        host.link_by_name(&name)
            .map_err(neterr(format!("look up bridge {name}")))?
            .ok_or_else(|| {
                CniError::new(
                    code::CHECK_FAILED,
                    format!("OVS bridge {name} has no device in the node's netns"),
                )
            })
    }

    fn attach(&mut self, _host: &mut Handle, port: &Port) -> Result<()> {
        let (bridge, veth, owner) = (port.bridge, port.veth, port.owner);
        let netns = owner.netns.unwrap_or("");
        let external_ids = [
            (ids::OWNER, ids::OWNER_VALUE),
            (ids::NETWORK, owner.network),
            (ids::CONTAINER_ID, owner.container_id),
            (ids::IFNAME, owner.ifname),
            (ids::NETNS, netns),
        ];
        let spec = PortSpec {
            name: &veth.name,
            external_ids: &external_ids,
        };
        let identity = Self::identity(owner.container_id, owner.ifname);
        let client = self.client()?;
        client
            .add_port(&bridge.name, &spec)
            .map_err(ovserr(format!("add port {} to {}", veth.name, bridge.name)))?;
        match client.wait_ofport(&veth.name, VSWITCHD_TIMEOUT) {
            Ok(_) => Ok(()),
            Err(e) => {
                let _ = client.del_port_if(&veth.name, &identity);
                let timed_out = matches!(e, evio_ovsdb::Error::Timeout { .. });
                Err(CniError::new(
                    if timed_out {
                        code::TRY_AGAIN
                    } else {
                        code::SWITCH
                    },
                    format!(
                        "OVS did not take port {} on bridge {}",
                        veth.name, bridge.name
                    ),
                )
                .with_details(e.to_string()))
            }
        }
    }

    fn detach(&mut self, veth_name: &str, owner: &VethOwner) -> Result<()> {
        let identity = Self::identity(owner.container_id, owner.ifname);
        self.client()?
            .del_port_if(veth_name, &identity)
            .map_err(ovserr(format!("delete port {veth_name}")))?;
        Ok(())
    }

    fn check(&mut self, _host: &mut Handle, port: &Port) -> Result<()> {
        let (bridge, veth, owner) = (port.bridge, port.veth, port.owner);
        let port = self
            .client()?
            .port(&veth.name)
            .map_err(ovserr(format!("read port {}", veth.name)))?;
        let fail = |why: String| Err(CniError::new(code::CHECK_FAILED, why));
        let Some(port) = port else {
            return fail(format!(
                "no OVS port {} on bridge {}",
                veth.name, bridge.name
            ));
        };
        if port.bridge != bridge.name {
            return fail(format!(
                "OVS port {} is on bridge {}, expected {}",
                veth.name, port.bridge, bridge.name
            ));
        }
        for (k, v) in Self::identity(owner.container_id, owner.ifname) {
            if port.external_ids.get(k).map(String::as_str) != Some(v) {
                return fail(format!(
                    "OVS port {} does not belong to this attachment ({k} is {:?}, expected {v:?})",
                    veth.name,
                    port.external_ids.get(k)
                ));
            }
        }
        match port.ofport {
            Some(n) if n > 0 => Ok(()),
            _ => fail(format!(
                "OVS port {} has no OpenFlow port number ({})",
                veth.name,
                port.error
                    .unwrap_or_else(|| "vswitchd has not taken it".into())
            )),
        }
    }

    fn gc(
        &mut self,
        host: &mut Handle,
        network: &str,
        keep: &dyn Fn(&str, &str) -> bool,
    ) -> Result<Vec<String>> {
        let bridge = self.name.clone();
        let ports = self
            .client()?
            .ports(&bridge)
            .map_err(ovserr(format!("list ports of {bridge}")))?;
        let mut removed = Vec::new();
        for p in ports {
            let id = |k: &str| p.external_ids.get(k).map(String::as_str).unwrap_or("");
            // Ports evio does not own (tunnels, patch ports, other plugins)
            // are never touched, whatever state they are in.
            if id(ids::OWNER) != ids::OWNER_VALUE || id(ids::NETWORK) != network {
                continue;
            }
            let (cid, ifname) = (id(ids::CONTAINER_ID), id(ids::IFNAME));
            let gone = host
                .link_by_name(&p.name)
                .map_err(neterr(format!("look up {}", p.name)))?
                .is_none();
            if keep(cid, ifname) && !gone {
                continue;
            }
            let identity = Self::identity(cid, ifname);
            if self
                .client()?
                .del_port_if(&p.name, &identity)
                .map_err(ovserr(format!("delete port {}", p.name)))?
            {
                removed.push(p.name.clone());
            }
        }
        Ok(removed)
    }

    fn status(&mut self) -> Result<()> {
        let name = self.name.clone();
        self.client()
            .map_err(|e| CniError::new(code::NOT_AVAILABLE, e.msg).with_details(e.details))?
            .bridge_datapath_type(&name)
            .map_err(|e| {
                CniError::new(code::NOT_AVAILABLE, "Open vSwitch database does not answer")
                    .with_details(e.to_string())
            })?;
        Ok(())
    }

    fn needs_tx_checksum_off(&self) -> bool {
        self.actual_datapath.as_deref() == Some("netdev")
    }
}

#[cfg(test)]
mod tests {
    use evio_overlay::packet::parse_mac;

    #[test]
    fn pinned_hwaddr_parses_as_ovs_writes_it() {
        assert_eq!(
            parse_mac("02:ab:00:10:ff:01"),
            Some([2, 0xab, 0, 0x10, 0xff, 1])
        );
        for bad in [
            "",
            "02:ab:00:10:ff",
            "02:ab:00:10:ff:01:02",
            "zz:ab:00:10:ff:01",
            "0x2:ab",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad:?}");
        }
    }
}
