//! ADD: all or nothing. The order of the steps is chosen so that a crash
//! between any two of them leaves only state that DEL or GC can find from the
//! attachment identity alone: the IPAM allocation (keyed by container ID and
//! ifname), the host veth (named and aliased from the identity at creation),
//! the OVS port (external_ids carry the identity from the insert on).

use std::net::IpAddr;
use std::path::Path;

use evio_cni::config::NetConf;
use evio_cni::env::{Command, Env};
use evio_cni::ipam::Delegate;
use evio_cni::result::{CniResult, Interface, Route as CniRoute};
use evio_cni::{code, CniError, Result};
use evio_net::{ethtool, sysctl, Handle, Link, NetnsFd, Route};
use evio_overlay::packet::fmt_mac;
use ipnet::IpNet;

use crate::naming::{alias, host_veth_name, MAX_ALIAS, MAX_CONTAINER_ID};
use crate::switch::{self, gateway, Port, Switch, VethOwner};
use crate::{neterr, Log};

pub fn add(env: &Env, conf: &NetConf, log: &Log) -> Result<CniResult> {
    if env.container_id.len() > MAX_CONTAINER_ID {
        return Err(CniError::invalid_env(format!(
            "CNI_CONTAINERID is {} bytes long, at most {MAX_CONTAINER_ID} are supported",
            env.container_id.len()
        )));
    }
    let netns_path = env
        .netns
        .as_deref()
        .ok_or_else(|| CniError::invalid_env("required env variables [CNI_NETNS] missing"))?;
    // Checked before anything is touched: the kernel refuses a longer tag
    // only after the IPAM allocation, the bridge and the veth exist.
    let tag = alias(&conf.name, &env.container_id, &env.ifname);
    if tag.len() > MAX_ALIAS {
        return Err(CniError::invalid_config(format!(
            "network name is {} bytes long: with this container ID the host veth's tag \
             would be {} bytes, at most {MAX_ALIAS} are possible",
            conf.name.len(),
            tag.len()
        )));
    }
    let pod_ns = open_netns(netns_path)?;
    let host_ns = NetnsFd::current().map_err(neterr("open the node's netns"))?;
    // The node's own namespace given as the pod's (e.g. /proc/self/ns/net)
    // would have the node plumbed as if it were a pod.
    if pod_ns
        .is_same(&host_ns)
        .map_err(neterr("compare the pod's and the node's netns"))?
    {
        return Err(CniError::invalid_env(format!(
            "CNI_NETNS {} is the node's own network namespace",
            netns_path.display()
        )));
    }
    let mut host = Handle::new().map_err(neterr("open netlink in the node's netns"))?;
    let veth_name = host_veth_name(&env.container_id, &env.ifname);

    // A second ADD of a live attachment must fail before it touches
    // anything, IPAM included (host-local would hand out a second address).
    if host
        .link_by_name(&veth_name)
        .map_err(neterr(format!("look up {veth_name}")))?
        .is_some()
    {
        return Err(already_exists(
            env,
            &format!("host veth {veth_name} exists"),
        ));
    }
    let mut pod = {
        let _in_pod = pod_ns.enter().map_err(neterr("enter the pod's netns"))?;
        Handle::new().map_err(neterr("open netlink in the pod's netns"))?
    };
    if pod
        .link_by_name(&env.ifname)
        .map_err(neterr(format!("look up {} in the pod", env.ifname)))?
        .is_some()
    {
        return Err(already_exists(
            env,
            &format!(
                "interface {} exists in {}",
                env.ifname,
                netns_path.display()
            ),
        ));
    }

    // Found before the bridge is created: a missing delegate is a config
    // error that must leave a fresh node untouched.
    let ipam = Delegate::of(conf, &env.path)?;
    let mut sw = switch::for_conf(conf);
    // A pod plugged into a bridge whose Service replies vanish would look
    // healthy and fail every ClusterIP: refuse it, loudly, before anything
    // is created.
    sw.prerequisites()?;
    let bridge = sw.ensure_bridge(&mut host)?;
    let ipam_result = match ipam.add(&conf.raw, conf.version) {
        Ok(r) => r,
        Err(e) => {
            // A delegate killed on timeout (or one that failed half-way) may
            // hold an address already; releasing is a no-op otherwise.
            release_ipam(&ipam, env, conf, log);
            return Err(e);
        }
    };

    let owner = VethOwner {
        network: &conf.name,
        container_id: &env.container_id,
        ifname: &env.ifname,
        netns: netns_path.to_str(),
    };
    let mut plumbing = Plumbing {
        env,
        conf,
        netns_path,
        pod_ns: &pod_ns,
        host_ns: &host_ns,
        bridge: &bridge,
        owner: &owner,
        veth_name: &veth_name,
        veth_created: false,
        port_attached: false,
        log,
    };
    let res = plumbing.run(&mut host, &mut pod, sw.as_mut(), ipam_result);
    match res {
        Ok(r) => Ok(r),
        Err(e) => {
            plumbing.rollback(&mut host, sw.as_mut());
            release_ipam(&ipam, env, conf, log);
            Err(e)
        }
    }
}

/// Rollback's IPAM DEL: its failure is logged, the ADD's error is what the
/// runtime gets (and its DEL of the failed ADD retries the release).
fn release_ipam(ipam: &Delegate, env: &Env, conf: &NetConf, log: &Log) {
    if let Err(e) = ipam.run(Command::Del, &conf.raw, conf.version) {
        log.warn(format_args!(
            "rollback: ipam DEL for {} failed: {e}",
            env.container_id
        ));
    }
}

fn already_exists(env: &Env, what: &str) -> CniError {
    CniError::new(
        code::ALREADY_EXISTS,
        format!(
            "attachment {}/{} already exists: {what}",
            env.container_id, env.ifname
        ),
    )
}

/// A CNI_NETNS that does not exist is "container unknown" (code 3), like
/// a netns that vanishes later; one that is no netns, or a relative path
/// (which names nothing in particular), is a bad variable (4).
pub(crate) fn open_netns(path: &Path) -> Result<NetnsFd> {
    NetnsFd::open(path).map_err(|e| {
        let code = match e {
            evio_net::Error::NetnsNotFound(_) if path.is_absolute() => code::UNKNOWN_CONTAINER,
            _ => code::INVALID_ENV,
        };
        CniError::new(
            code,
            format!("CNI_NETNS {} cannot be opened", path.display()),
        )
        .with_details(e.to_string())
    })
}

/// One ADD's plumbing after IPAM: what it works on, and how far it got
/// (what rollback must undo).
struct Plumbing<'a> {
    env: &'a Env,
    conf: &'a NetConf,
    netns_path: &'a Path,
    pod_ns: &'a NetnsFd,
    host_ns: &'a NetnsFd,
    bridge: &'a Link,
    owner: &'a VethOwner<'a>,
    veth_name: &'a str,
    veth_created: bool,
    port_attached: bool,
    log: &'a Log,
}

impl Plumbing<'_> {
    fn run(
        &mut self,
        host: &mut Handle,
        pod: &mut Handle,
        sw: &mut dyn Switch,
        mut result: CniResult,
    ) -> Result<CniResult> {
        let conf = self.conf;
        let ifname = &self.env.ifname;
        let (pod_ns, host_ns, bridge) = (self.pod_ns, self.host_ns, self.bridge);
        if result.ips.is_empty() {
            return Err(CniError::new(
                code::IPAM,
                format!("ipam plugin {} returned no IP address", conf.ipam_type),
            ));
        }
        let has_v6 = result.ips.iter().any(|ip| ip.address.addr().is_ipv6());
        let tx_off = sw.needs_tx_checksum_off();

        // The veth is created from inside the pod with its peer put straight
        // into the node: the pod's ifname (often eth0) never appears in the
        // node's namespace, where it could clash with a real interface.
        let tag = alias(&conf.name, &self.env.container_id, ifname);
        pod.create_veth(ifname, self.veth_name, host_ns.fd(), conf.mtu, Some(&tag))
            .map_err(|e| {
                if e.is_exists() {
                    already_exists(self.env, "created concurrently")
                } else {
                    neterr(format!("create veth {ifname}/{}", self.veth_name))(e)
                }
            })?;
        self.veth_created = true;

        {
            let _in_pod = pod_ns.enter().map_err(neterr("enter the pod's netns"))?;
            // Neighbours learn the new MAC from a gratuitous ARP when the
            // link comes up.
            sysctl::set(&format!("net/ipv4/conf/{ifname}/arp_notify"), "1")
                .map_err(neterr("sysctl arp_notify"))?;
            if has_v6 {
                // Duplicate address detection would leave the address
                // tentative (unusable) for a second or more after ADD
                // returns; IPAM already guarantees uniqueness.
                sysctl::set(&format!("net/ipv6/conf/{ifname}/accept_dad"), "0")
                    .map_err(neterr("sysctl accept_dad"))?;
            }
            if tx_off {
                ethtool::set_tx_checksum(ifname, false)
                    .map_err(neterr(format!("turn off TX checksum offload on {ifname}")))?;
            }
        }

        let mut pod_link = pod
            .link_by_name(ifname)
            .map_err(neterr(format!("look up {ifname}")))?
            .ok_or_else(|| {
                CniError::new(code::NETWORK, format!("{ifname} vanished from the pod"))
            })?;
        if let Some(mac) = mac_for(&result) {
            pod.set_mac(pod_link.index, mac)
                .map_err(neterr(format!("set MAC of {ifname}")))?;
            pod_link.mac = Some(mac);
        }
        for ip in &result.ips {
            pod.add_address(pod_link.index, ip.address)
                .map_err(neterr(format!("add {} to {ifname}", ip.address)))?;
        }
        // The host end is plugged in before the pod end comes up, so that the
        // pod's first packets (and arp_notify's announcement) find a port.
        let veth = host
            .link_by_name(self.veth_name)
            .map_err(neterr(format!("look up {}", self.veth_name)))?
            .ok_or_else(|| CniError::new(code::NETWORK, format!("{} vanished", self.veth_name)))?;
        if tx_off {
            ethtool::set_tx_checksum(self.veth_name, false).map_err(neterr(format!(
                "turn off TX checksum offload on {}",
                self.veth_name
            )))?;
        }
        host.set_up(veth.index)
            .map_err(neterr(format!("bring up {}", self.veth_name)))?;
        sw.attach(
            host,
            &Port {
                bridge,
                veth: &veth,
                owner: self.owner,
            },
        )?;
        self.port_attached = true;
        pod.set_up(pod_link.index)
            .map_err(neterr(format!("bring up {ifname}")))?;

        let mut routes = result.routes.clone();
        if conf.is_default_gateway {
            for ip in &result.ips {
                let Some(gw) = ip.gateway else { continue };
                let default: IpNet = if gw.is_ipv4() {
                    IpNet::V4(Default::default())
                } else {
                    IpNet::V6(Default::default())
                };
                if !routes.iter().any(|r| r.dst == default) {
                    routes.push(CniRoute {
                        dst: default,
                        gw: Some(gw),
                        mtu: None,
                        advmss: None,
                        priority: None,
                        table: None,
                        scope: None,
                    });
                }
            }
        }
        for r in &routes {
            let gw = r.gw.or_else(|| family_gateway(&result, r.dst.addr()));
            let route = Route {
                gateway: gw,
                oif: Some(pod_link.index),
                metric: r.priority,
                ..Route::new(r.dst)
            };
            pod.add_route(&route).map_err(|e| {
                if e.is_exists() {
                    CniError::invalid_config(format!("route {} is given twice", r.dst))
                } else {
                    neterr(format!("add route {} via {gw:?}", r.dst))(e)
                }
            })?;
        }
        result.routes = routes;

        let gateways = if conf.is_gateway {
            self.gateway_addrs(&result)?
        } else {
            Vec::new()
        };
        gateway::configure_gateway(host, bridge, &gateways)?;

        if conf.ip_masq {
            ensure_masquerade(&conf.name, &result, &conf.host_cidrs)?;
        }

        let bridge_mac = host
            .link_by_index(bridge.index)
            .ok()
            .flatten()
            .and_then(|l| l.mac)
            .or(bridge.mac);
        result.interfaces = vec![
            Interface {
                name: bridge.name.clone(),
                mac: bridge_mac.as_ref().map(fmt_mac),
                ..Default::default()
            },
            Interface {
                name: veth.name.clone(),
                mac: veth.mac.as_ref().map(fmt_mac),
                ..Default::default()
            },
            Interface {
                name: ifname.clone(),
                mac: pod_link.mac.as_ref().map(fmt_mac),
                mtu: Some(conf.mtu),
                sandbox: Some(self.netns_path.display().to_string()),
                ..Default::default()
            },
        ];
        for ip in &mut result.ips {
            ip.interface = Some(2);
        }
        Ok(result)
    }

    /// The bridge address of each of the pod's gateways (its IPAM
    /// address's prefix is the pod CIDR's).
    fn gateway_addrs(&self, result: &CniResult) -> Result<Vec<IpNet>> {
        let mut addrs = Vec::with_capacity(result.ips.len());
        for ip in &result.ips {
            let gw = match (ip.address.addr(), self.conf.bridge_ipv4, ip.gateway) {
                (a @ IpAddr::V4(_), Some(_), _) => a,
                (_, _, Some(gw)) => gw,
                (_, _, None) => continue,
            };
            addrs.push(gateway::bridge_addr(
                self.conf,
                gw,
                ip.address.prefix_len(),
            )?);
        }
        Ok(addrs)
    }

    /// Removes what this ADD created on the host. The pod side goes with
    /// the veth pair.
    fn rollback(&self, host: &mut Handle, sw: &mut dyn Switch) {
        let log = self.log;
        if self.port_attached {
            if let Err(e) = sw.detach(self.veth_name, self.owner) {
                log.warn(format_args!("rollback: detach {}: {e}", self.veth_name));
            }
        }
        if self.veth_created {
            if let Err(e) = host.delete_link_by_name(self.veth_name) {
                log.warn(format_args!("rollback: delete {}: {e}", self.veth_name));
            }
        }
    }
}

/// The pod's MAC ([`crate::naming::pod_mac`]) follows its IPv4 address, or
/// its IPv6 address when it has no IPv4 one. A gratuitous ARP cannot stand
/// in for a stable MAC: arp_notify's goes out while a new Linux bridge port
/// still waits for linkwatch to see its carrier and is dropped, and an
/// explicit one needs an AF_PACKET socket, whose close() waits for an RCU
/// grace period (~13 ms, most of an ADD).
fn mac_for(result: &CniResult) -> Option<[u8; 6]> {
    let pick = |v4: bool| {
        result
            .ips
            .iter()
            .find(|ip| ip.address.addr().is_ipv4() == v4)
    };
    let ip = pick(true).or_else(|| pick(false))?;
    Some(crate::naming::pod_mac(ip.address.addr()))
}

/// The network's masquerade rule is the same for every pod, so it is
/// written only when missing or different: reading the chain is two
/// netlink round trips (~0.06 ms, docs/benchmarks.md), and not rewriting it
/// keeps concurrent ADDs from queueing on the kernel's nf_tables commit.
///
/// Pod traffic to the host overlay (`hostCIDR`) is exempt: a Service whose
/// endpoint is another node's host address (a hostNetwork pod, the API
/// server) must see the client pod's own address, as kube-proxy intends.
/// Both prefixes of a dual-stack host overlay are exempt (the chain is in
/// an `inet` table: an IPv6 pod address is masqueraded like an IPv4 one).
fn ensure_masquerade(network: &str, result: &CniResult, host_cidrs: &[IpNet]) -> Result<()> {
    let mut want: Vec<IpNet> = result.ips.iter().map(|ip| ip.address.trunc()).collect();
    want.sort();
    want.dedup();
    let exempt: Vec<IpNet> = host_cidrs.to_vec();
    let have = evio_net::nft::masquerade_rules(network)
        .ok()
        .flatten()
        .map(|mut h| {
            h.masqueraded.sort();
            h.masqueraded.dedup();
            h
        });
    if have
        .as_ref()
        .is_some_and(|h| h.masqueraded == want && h.exempt == exempt)
    {
        return Ok(());
    }
    evio_net::nft::ensure_masquerade_except(network, &want, &exempt)
        .map_err(neterr("set up IP masquerade"))
}

fn family_gateway(result: &CniResult, dst: IpAddr) -> Option<IpAddr> {
    result
        .ips
        .iter()
        .filter_map(|ip| ip.gateway)
        .find(|gw| gw.is_ipv4() == dst.is_ipv4())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(addrs: &[&str]) -> CniResult {
        let ips = addrs
            .iter()
            .map(|a| evio_cni::result::IpConfig {
                address: a.parse().unwrap(),
                gateway: None,
                interface: None,
            })
            .collect();
        CniResult {
            ips,
            ..Default::default()
        }
    }

    #[test]
    fn mac_follows_the_address_v4_first() {
        let m = mac_for(&result(&["fd00::1:2/64", "10.244.3.2/16"])).unwrap();
        assert_eq!(fmt_mac(&m), "0a:58:0a:f4:03:02");
        let m = mac_for(&result(&["fd00::a0b:c0d/64"])).unwrap();
        // Locally administered, unicast, never the IPv4 form.
        assert_eq!(m[0], 0x0a);
        assert_ne!(m[1], 0x58);
        assert!(mac_for(&result(&[])).is_none());
        // The n-th pod of two nodes: their low 32 bits are the same, their
        // MACs are not.
        let a = mac_for(&result(&["fd00:10::2/48"])).unwrap();
        let b = mac_for(&result(&["fd00:10:0:1::2/48"])).unwrap();
        assert_ne!(a, b);
    }
}
