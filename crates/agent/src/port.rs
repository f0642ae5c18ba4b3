//! The node bridge and the agent's port on it. The bridge is made by the
//! plugin's own switch code from the same network config, so it is exactly
//! what the first pod's ADD would make (name, type, datapath, pinned MAC,
//! MTU), and then given the gateway `.1` with the pod CIDR's prefix as ADD
//! does. The agent's port is its TAP: on OVS a port whose `external_ids` say
//! `evio-owner=evio-agent` (the plugin's DEL and GC only touch
//! `evio-owner=evio` ports); on a Linux bridge a TAP, which the plugin's GC
//! (tagged veths only) never looks at. The agent touches no other port.

use std::time::Duration;

use evio_cni::config::{BridgeType, NetConf};
use evio_net::{sysctl, Handle, Link};
use evio_ovsdb::vswitch::PortSpec;
use evio_ovsdb::Client;
use evio_plugin::naming::ovs_ids::{NETWORK as NETWORK_KEY, OWNER as OWNER_KEY, OWNER_AGENT};
use evio_plugin::switch::gateway;
use ipnet::IpNet;

use crate::AgentError;

const OVSDB_TIMEOUT: Duration = Duration::from_secs(5);

/// Makes sure the bridge exists with the gateway on it, as the plugin
/// would; returns its link.
pub fn ensure_bridge(
    host: &mut Handle,
    conf: &NetConf,
    gateway: IpNet,
) -> Result<Link, AgentError> {
    let mut sw = evio_plugin::switch::for_conf(conf);
    // The agent serves the host overlay too (what kubeadm join needs): a
    // missing prerequisite of Services is logged, not fatal, here.
    if let Err(e) = sw.prerequisites() {
        tracing::warn!("{}", e.msg);
    }
    let bridge = sw
        .ensure_bridge(host)
        .map_err(AgentError::bridge(format!("bridge {}", conf.bridge)))?;
    let gateways = if conf.is_gateway {
        vec![
            gateway::bridge_addr(conf, gateway.addr(), gateway.prefix_len())
                .map_err(AgentError::bridge("gateway"))?,
        ]
    } else {
        Vec::new()
    };
    gateway::configure_gateway(host, &bridge, &gateways)
        .map_err(AgentError::bridge(format!("bridge {}", conf.bridge)))?;
    host.link_by_name(&conf.bridge)
        .map_err(AgentError::net("look up the bridge"))?
        .ok_or_else(|| AgentError::Vanished(format!("bridge {}", conf.bridge)))
}

/// Plugs the TAP `tap` into the bridge. `adopted`: the TAP is the device a
/// previous agent left (persistent), so an OVS port of ours that works is
/// kept as it is: the datapath never stops reading it. A port of ours on a
/// device that is new (the old one went with a crash or a reboot) is
/// replaced (vswitchd re-opens the new device of the same name), never
/// duplicated; a port of that name owned by anyone else is an error.
pub fn attach(
    host: &mut Handle,
    conf: &NetConf,
    bridge: &Link,
    tap: &str,
    adopted: bool,
) -> Result<(), AgentError> {
    let link = host
        .link_by_name(tap)
        .map_err(AgentError::net(format!("look up {tap}")))?
        .ok_or_else(|| AgentError::Port(format!("{tap} does not exist")))?;
    quiet(tap);
    match conf.bridge_type {
        BridgeType::Linux => {
            if link.master != Some(bridge.index) {
                host.set_master(link.index, bridge.index)
                    .map_err(AgentError::net(format!("plug {tap} into {}", bridge.name)))?;
            }
        }
        BridgeType::Ovs => {
            let mut c = Client::connect(&conf.ovsdb, OVSDB_TIMEOUT)
                .map_err(AgentError::ovsdb(format!("OVSDB at {}", conf.ovsdb)))?;
            let existing = c.port(tap).map_err(AgentError::ovsdb("read OVS ports"))?;
            let ours = |p: &evio_ovsdb::vswitch::PortInfo| {
                p.external_ids.get(OWNER_KEY).map(String::as_str) == Some(OWNER_AGENT)
            };
            let working = existing.as_ref().is_some_and(|p| {
                ours(p)
                    && p.bridge == bridge.name
                    && p.ofport.is_some_and(|o| o > 0)
                    && p.error.is_none()
            });
            if adopted && working {
                tracing::info!(
                    port = tap,
                    "kept the OVS port of the previous agent (same device)"
                );
                return up(host, conf, &link, tap);
            }
            match existing {
                // A killed agent's port: its device is gone and the new TAP
                // of that name is a different device, which the userspace
                // datapath does not pick up on its own. Reclaim the port by
                // replacing its record (same name: never a duplicate).
                Some(p) if ours(&p) => {
                    c.del_port_if(tap, &[(OWNER_KEY, OWNER_AGENT)])
                        .map_err(AgentError::ovsdb(format!("reclaim OVS port {tap}")))?;
                    // Let vswitchd drop the port before it comes back, or
                    // it folds both changes into none and keeps reading
                    // the dead device.
                    if let Err(e) = c.wait_reconfigured(OVSDB_TIMEOUT) {
                        tracing::warn!("reclaiming OVS port {tap}: {e}");
                    }
                    tracing::info!(port = tap, bridge = %p.bridge, "reclaimed the OVS port of a previous agent");
                }
                Some(p) => {
                    return Err(AgentError::Port(format!(
                        "OVS port {tap} exists on bridge {} and is not the agent's",
                        p.bridge
                    )))
                }
                None => {}
            }
            let ids = [(OWNER_KEY, OWNER_AGENT), (NETWORK_KEY, conf.name.as_str())];
            c.add_port(
                &bridge.name,
                &PortSpec {
                    name: tap,
                    external_ids: &ids,
                },
            )
            .map_err(AgentError::ovsdb(format!("add OVS port {tap}")))?;
            c.wait_ofport(tap, OVSDB_TIMEOUT)
                .map_err(AgentError::ovsdb(format!("OVS did not take {tap}")))?;
        }
    }
    up(host, conf, &link, tap)
}

fn up(host: &mut Handle, conf: &NetConf, link: &Link, tap: &str) -> Result<(), AgentError> {
    host.set_mtu(link.index, conf.mtu.max(1500))
        .map_err(AgentError::net(format!("MTU of {tap}")))?;
    host.set_up(link.index)
        .map_err(AgentError::net(format!("bring up {tap}")))?;
    Ok(())
}

/// Keeps the host's own stack off the TAP: it is a port, not an interface
/// of the host. On OVS's userspace datapath nothing takes frames away from
/// the kernel before its IP stack sees them, so the host answered ARP for
/// its gateway with the TAP's MAC and would route what peers send to that
/// MAC. Hardening only (the switch refuses such frames anyway), so a
/// failure is a warning.
fn quiet(tap: &str) {
    for (key, value) in [
        (format!("net/ipv4/conf/{tap}/arp_ignore"), "8"),
        (format!("net/ipv4/conf/{tap}/forwarding"), "0"),
        (format!("net/ipv6/conf/{tap}/disable_ipv6"), "1"),
    ] {
        if let Err(e) = sysctl::set(&key, value) {
            tracing::warn!("{key}: {e}");
        }
    }
}

/// Removes the agent's port (leaving the network, or a start that
/// failed). The TAP device itself is deleted by the caller.
pub fn detach(conf: &NetConf, tap: &str) -> Result<(), AgentError> {
    if conf.bridge_type == BridgeType::Ovs {
        let mut c = Client::connect(&conf.ovsdb, OVSDB_TIMEOUT)
            .map_err(AgentError::ovsdb(format!("OVSDB at {}", conf.ovsdb)))?;
        c.del_port_if(tap, &[(OWNER_KEY, OWNER_AGENT)])
            .map_err(AgentError::ovsdb(format!("remove OVS port {tap}")))?;
    }
    Ok(())
}
