//! GC: removes what evio holds on this node for attachments of this network
//! that the runtime no longer lists in `cni.dev/valid-attachments`.

use std::collections::HashSet;
use std::fs;
use std::io::ErrorKind;
use std::net::IpAddr;
use std::path::Path;

use evio_cni::config::NetConf;
use evio_cni::env::{Command, Env};
use evio_cni::ipam::{host_local_dir, Delegate};
use evio_cni::version::Version;
use evio_cni::{code, CniError, Result};
use evio_net::Handle;
use nix::fcntl::{Flock, FlockArg};

use crate::naming::parse_alias;
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
    let mut errors: Vec<CniError> = Vec::new();

    // Host veths first: a stale pod loses its connectivity before its
    // address can be handed to someone else.
    let mut host = Handle::new().map_err(neterr("open netlink in the node's netns"))?;
    for link in host.links().map_err(neterr("list links"))? {
        let Some((cid, ifname)) = link
            .alias
            .as_deref()
            .and_then(|a| parse_alias(a, &conf.name))
        else {
            continue;
        };
        if keep(cid, ifname) {
            continue;
        }
        match host.delete_link(link.index) {
            Ok(()) => log.info(format_args!("GC: removed {} ({cid}/{ifname})", link.name)),
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
    let ipam = Delegate::find(&conf.ipam_type, &env.path)?;
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
    let dir = host_local_dir(&raw, &conf.name);
    for f in host_local_release(&dir, valid)? {
        log.info(format_args!("GC: released {f} in {}", dir.display()));
    }
    Ok(())
}

/// host-local keeps one file per allocated IP, named by the IP and holding
/// `<containerID>\r\n<ifname>` (before CNI 0.4 just the container ID),
/// guarded by an flock on `<dir>/lock`. It has no GC of its own (not even
/// upstream), so the entries of dead attachments are removed here under the
/// same lock. Returns the released IPs.
pub fn host_local_release(dir: &Path, valid: &HashSet<(&str, &str)>) -> Result<Vec<String>> {
    fn io(what: String) -> impl FnOnce(std::io::Error) -> CniError {
        move |e| CniError::new(code::IO, what).with_details(e.to_string())
    }
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(format!("read {}", dir.display()))(e)),
    };
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("lock"))
        .map_err(io(format!("open {}/lock", dir.display())))?;
    let _locked = Flock::lock(lock, FlockArg::LockExclusive)
        .map_err(|(_, e)| io(format!("lock {}/lock", dir.display()))(e.into()))?;
    let mut released = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        // Only files named by an IP are allocations (not `lock`, not
        // `last_reserved_ip.N`).
        let Some(name) = name.to_str().filter(|n| n.parse::<IpAddr>().is_ok()) else {
            continue;
        };
        let Ok(content) = fs::read_to_string(entry.path()) else {
            continue;
        };
        let mut lines = content.split("\r\n").map(str::trim);
        let cid = lines.next().unwrap_or("");
        let stale = match lines.next().filter(|i| !i.is_empty()) {
            Some(ifname) => !valid.contains(&(cid, ifname)),
            // Old format: kept while any valid attachment has this ID.
            None => !valid.iter().any(|(c, _)| *c == cid),
        };
        if stale {
            match fs::remove_file(entry.path()) {
                Ok(()) => released.push(name.to_string()),
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(io(format!("remove {}", entry.path().display()))(e)),
            }
        }
    }
    Ok(released)
}
