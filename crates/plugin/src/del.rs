//! DEL: idempotent, and independent of the pod's netns. Everything is found
//! from the attachment identity, so a missing netns, a missing interface or
//! a second DEL all succeed, and the IPAM allocation is released regardless.
//! Steps run to the end even when one fails; the first error is returned so
//! the runtime retries.

use evio_cni::config::NetConf;
use evio_cni::env::{Command, Env};
use evio_cni::ipam::Delegate;
use evio_cni::{CniError, Result};
use evio_net::Handle;

use crate::naming::host_veth_name;
use crate::switch::{self, VethOwner};
use crate::{neterr, Log};

pub fn del(env: &Env, conf: &NetConf, log: &Log) -> Result<()> {
    let mut errors: Vec<CniError> = Vec::new();
    let veth_name = host_veth_name(&env.container_id, &env.ifname);
    let owner = VethOwner {
        network: &conf.name,
        container_id: &env.container_id,
        ifname: &env.ifname,
        netns: env.netns.as_deref().and_then(|p| p.to_str()),
    };

    // Deleting the host end destroys the pair, the pod side included.
    match Handle::new() {
        Ok(mut host) => match host.delete_link_by_name(&veth_name) {
            Ok(_) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => errors.push(neterr(format!("delete {veth_name}"))(e)),
        },
        Err(e) => errors.push(neterr("open netlink in the node's netns")(e)),
    }
    let mut sw = switch::for_conf(conf);
    if let Err(e) = sw.detach(&veth_name, &owner) {
        errors.push(e);
    }
    match Delegate::of(conf, &env.path) {
        Ok(ipam) => {
            if let Err(e) = ipam.run(Command::Del, &conf.raw, conf.version) {
                errors.push(e);
            }
        }
        Err(e) => errors.push(e),
    }
    for e in errors.iter().skip(1) {
        log.warn(format_args!("DEL {}: also failed: {e}", env.container_id));
    }
    match errors.into_iter().next() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
