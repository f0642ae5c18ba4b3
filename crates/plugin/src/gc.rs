//! GC: removes what evio holds on this node for attachments of this network
//! that the runtime no longer lists in `cni.dev/valid-attachments`.

use std::collections::HashSet;

use evio_cni::config::NetConf;
use evio_cni::env::{Command, Env};
use evio_cni::host_local::{self, NetworkDir};
use evio_cni::ipam::Delegate;
use evio_cni::version::Version;
use evio_cni::{code, CniError, Result};
use evio_net::Handle;

use crate::naming::{host_veth_name, host_veth_of, HostVeth};
use crate::switch;
use crate::{neterr, Log};

pub fn gc(env: &Env, conf: &NetConf, log: &Log) -> Result<()> {
    let valid = conf.valid_attachments.as_ref().ok_or_else(|| {
        CniError::invalid_config("GC needs cni.dev/valid-attachments (an empty list means none)")
    })?;
    let valid: HashSet<(&str, &str)> = valid
        .iter()
        .map(|a| (a.container_id.as_str(), a.ifname.as_str()))
        .collect();
    let keep = |cid: &str, ifname: &str| valid.contains(&(cid, ifname));
    let valid_veths: HashSet<String> = valid
        .iter()
        .map(|(cid, ifname)| host_veth_name(cid, ifname))
        .collect();
    let mut errors: Vec<CniError> = Vec::new();

    // Host veths first: a stale pod loses its connectivity before its
    // address can be handed to someone else.
    let mut host = Handle::new().map_err(neterr("open netlink in the node's netns"))?;
    for link in host.links().map_err(neterr("list links"))? {
        let whose = match host_veth_of(&link, &conf.name) {
            Some(HostVeth::Tagged(cid, ifname)) if keep(cid, ifname) => continue,
            Some(HostVeth::Tagged(cid, ifname)) => format!("{cid}/{ifname}"),
            Some(HostVeth::Untagged) if valid_veths.contains(&link.name) => continue,
            Some(HostVeth::Untagged) => "untagged: its ADD stopped before tagging it".into(),
            None => continue,
        };
        match host.delete_link(link.index) {
            Ok(()) => log.info(format_args!("GC: removed {} ({whose})", link.name)),
            Err(e) if e.is_not_found() => {}
            Err(e) => errors.push(neterr(format!("GC: delete {}", link.name))(e)),
        }
    }
    let mut sw = switch::for_conf(conf);
    match sw.gc(&mut host, &conf.name, &keep) {
        Ok(removed) => {
            for p in removed {
                log.info(format_args!("GC: removed port {p}"));
            }
        }
        Err(e) => errors.push(e),
    }

    if let Err(e) = gc_ipam(env, conf, &valid, log) {
        errors.push(e);
    }

    if valid.is_empty() && conf.ip_masq {
        if let Err(e) = evio_net::nft::remove_masquerade(&conf.name) {
            errors.push(neterr("GC: remove masquerade")(e));
        }
    }
    match errors.into_iter().next() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn gc_ipam(env: &Env, conf: &NetConf, valid: &HashSet<(&str, &str)>, log: &Log) -> Result<()> {
    let ipam = Delegate::of(conf, &env.path)?;
    // A delegate that speaks 1.1.0 does its own GC.
    if ipam
        .versions()
        .map(|v| v.iter().any(|v| v == "1.1.0"))
        .unwrap_or(false)
        && conf.version >= Version::V1_1_0
    {
        ipam.exec(Command::Gc, &conf.raw)?;
        return Ok(());
    }
    if conf.ipam_type != "host-local" {
        log.warn(format_args!(
            "GC: ipam plugin {} does not support GC; its allocations were not collected",
            conf.ipam_type
        ));
        return Ok(());
    }
    let raw: serde_json::Value = serde_json::from_slice(&conf.raw)
        .map_err(|e| CniError::new(code::DECODE, "config").with_details(e.to_string()))?;
    let dir = host_local::network_dir(&raw, &conf.name);
    let Some(dir) = NetworkDir::open(&dir)? else {
        return Ok(());
    };
    for ip in host_local_release(&dir, valid, log)? {
        log.info(format_args!(
            "GC: released {ip} in {}",
            dir.path().display()
        ));
    }
    Ok(())
}

/// host-local has no GC of its own (not even upstream), so the entries of
/// dead attachments are removed here, under host-local's lock (bounded: a
/// stuck holder makes GC fail with code 11 instead of hanging). Entries that
/// are not plain files are left alone and logged. Returns the released IPs.
pub fn host_local_release(
    dir: &NetworkDir,
    valid: &HashSet<(&str, &str)>,
    log: &Log,
) -> Result<Vec<String>> {
    let _locked = dir.lock(host_local::LOCK_TIMEOUT)?;
    let listing = dir.allocations()?;
    for (name, why) in &listing.refused {
        log.warn(format_args!(
            "GC: {}/{name} is {why}: not host-local's, left alone",
            dir.path().display()
        ));
    }
    let mut released = Vec::new();
    for a in listing.allocations {
        if a.owner.is_stale(valid.iter().copied()) && dir.release(a.ip)? {
            released.push(a.ip.to_string());
        }
    }
    Ok(released)
}
