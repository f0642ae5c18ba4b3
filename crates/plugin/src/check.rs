//! CHECK: the attachment still is what `prevResult` says it is.

use evio_cni::config::NetConf;
use evio_cni::env::{Command, Env};
use evio_cni::ipam::Delegate;
use evio_cni::result::CniResult;
use evio_cni::{code, CniError, Result};
use evio_net::{ethtool, Family, Handle};

use crate::add::open_netns;
use crate::naming::host_veth_name;
use crate::neterr;
use crate::switch::{self, Port, VethOwner};
use evio_overlay::packet::fmt_mac;

fn failed(msg: String) -> CniError {
    CniError::new(code::CHECK_FAILED, msg)
}

pub fn check(env: &Env, conf: &NetConf) -> Result<()> {
    let prev = conf
        .prev_result
        .as_ref()
        .ok_or_else(|| CniError::invalid_config("CHECK needs prevResult"))?;
    let prev = CniResult::from_value(prev).map_err(|e| e.context("prevResult"))?;

    let ipam = Delegate::of(conf, &env.path)?;
    ipam.run(Command::Check, &conf.raw, conf.version)?;

    let netns_path = env
        .netns
        .as_deref()
        .ok_or_else(|| CniError::invalid_env("required env variables [CNI_NETNS] missing"))?;
    let pod_ns = open_netns(netns_path)?;
    let ifname = &env.ifname;

    // The pod interface of prevResult: the one with a sandbox and our name.
    let (pod_idx, pod_if) = prev
        .interfaces
        .iter()
        .enumerate()
        .find(|(_, i)| i.sandbox.is_some() && &i.name == ifname)
        .ok_or_else(|| {
            failed(format!(
                "prevResult has no interface {ifname} inside a sandbox"
            ))
        })?;

    let mut sw = switch::for_conf(conf);
    let (pod_link, pod_addrs, pod_routes, tx_on) = {
        let _in_pod = pod_ns.enter().map_err(neterr("enter the pod's netns"))?;
        let mut pod = Handle::new().map_err(neterr("open netlink in the pod's netns"))?;
        let link = pod
            .link_by_name(ifname)
            .map_err(neterr(format!("look up {ifname}")))?
            .ok_or_else(|| {
                failed(format!(
                    "interface {ifname} is missing from {}",
                    netns_path.display()
                ))
            })?;
        let addrs = pod
            .addresses(Some(link.index))
            .map_err(neterr(format!("list addresses of {ifname}")))?;
        let mut routes = pod.routes(Family::V4).map_err(neterr("list routes"))?;
        routes.extend(pod.routes(Family::V6).map_err(neterr("list routes"))?);
        let tx_on = ethtool::tx_checksum(ifname).ok();
        (link, addrs, routes, tx_on)
    };

    if let Some(mac) = &pod_if.mac {
        let have = pod_link.mac.as_ref().map(fmt_mac).unwrap_or_default();
        if !have.eq_ignore_ascii_case(mac) {
            return Err(failed(format!(
                "{ifname} has MAC {have}, prevResult says {mac}"
            )));
        }
    }
    for ip in prev
        .ips
        .iter()
        .filter(|ip| ip.interface.is_none_or(|i| i == pod_idx))
    {
        if !pod_addrs.iter().any(|a| a.addr == ip.address) {
            return Err(failed(format!(
                "{ifname} lacks address {} from prevResult",
                ip.address
            )));
        }
    }
    for r in &prev.routes {
        let found = pod_routes
            .iter()
            .any(|have| have.dst == r.dst && (r.gw.is_none() || have.gateway == r.gw));
        if !found {
            return Err(failed(format!(
                "route {} via {:?} from prevResult is missing in the pod",
                r.dst, r.gw
            )));
        }
    }

    let mut host = Handle::new().map_err(neterr("open netlink in the node's netns"))?;
    let veth_name = host_veth_name(&env.container_id, ifname);
    let veth = host
        .link_by_name(&veth_name)
        .map_err(neterr(format!("look up {veth_name}")))?
        .ok_or_else(|| failed(format!("host veth {veth_name} is missing")))?;
    let bridge = sw.existing_bridge(&mut host)?;
    let owner = VethOwner {
        network: &conf.name,
        container_id: &env.container_id,
        ifname,
        netns: netns_path.to_str(),
    };
    sw.check(
        &mut host,
        &Port {
            bridge: &bridge,
            veth: &veth,
            owner: &owner,
        },
    )?;
    if sw.needs_tx_checksum_off() && tx_on != Some(false) {
        return Err(failed(format!(
            "TX checksum offload is on for {ifname} on a userspace OVS bridge: TCP would fail"
        )));
    }
    Ok(())
}
