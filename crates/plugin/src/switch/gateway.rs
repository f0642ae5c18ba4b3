//! The node bridge as the pods' gateway: ADD (per pod) and the agent (once,
//! at start) both put it there this way, so the two cannot disagree on the
//! address, the DAD setting or the forwarding sysctls.

use std::net::IpAddr;

use evio_cni::config::{BridgeAddr, NetConf};
use evio_cni::{CniError, Result};
use evio_net::{sysctl, Handle, Link};
use ipnet::IpNet;

use crate::neterr;

/// The bridge's address for a gateway `gw` of a pod network with prefix
/// `prefix` (the pod CIDR's): an explicit `bridgeIPv4` wins for IPv4.
pub fn bridge_addr(conf: &NetConf, gw: IpAddr, prefix: u8) -> Result<IpNet> {
    match (gw, conf.bridge_ipv4) {
        (IpAddr::V4(_), Some(BridgeAddr::Cidr(n))) => Ok(n),
        (IpAddr::V4(_), Some(BridgeAddr::Addr(a))) => net(a, prefix),
        _ => net(gw, prefix),
    }
}

fn net(addr: IpAddr, prefix: u8) -> Result<IpNet> {
    IpNet::new(addr, prefix).map_err(|e| {
        CniError::invalid_config(format!(
            "gateway {addr}/{prefix} is not a valid network: {e}"
        ))
    })
}

/// Puts `addrs` on the bridge (with the pod CIDR's prefix: that is what
/// makes the pod overlay one flat L2 network across nodes), brings it up
/// and turns forwarding on for each family present. An address already
/// there is fine (every ADD after the first, an agent restart). With no
/// address (`isGateway: false`) it only brings the bridge up.
pub fn configure_gateway(host: &mut Handle, bridge: &Link, addrs: &[IpNet]) -> Result<()> {
    let v4 = addrs.iter().any(|a| a.addr().is_ipv4());
    let v6 = addrs.iter().any(|a| a.addr().is_ipv6());
    // Before the address goes on: a tentative gateway would not answer
    // the pods' first neighbour solicitations.
    if v6 {
        sysctl::set(&format!("net/ipv6/conf/{}/accept_dad", bridge.name), "0")
            .map_err(neterr("sysctl accept_dad on the bridge"))?;
    }
    for &addr in addrs {
        match host.add_address(bridge.index, addr) {
            Ok(()) => {}
            Err(e) if e.is_exists() => {}
            Err(e) => return Err(neterr(format!("add gateway {addr} to {}", bridge.name))(e)),
        }
    }
    if !bridge.up {
        host.set_up(bridge.index)
            .map_err(neterr(format!("bring up bridge {}", bridge.name)))?;
    }
    if v4 {
        sysctl::set("net/ipv4/ip_forward", "1").map_err(neterr("enable IPv4 forwarding"))?;
    }
    if v6 {
        sysctl::set("net/ipv6/conf/all/forwarding", "1")
            .map_err(neterr("enable IPv6 forwarding"))?;
    }
    Ok(())
}
