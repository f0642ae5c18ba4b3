//! The `evio` CNI plugin: ADD, DEL, CHECK, VERSION, GC and STATUS of CNI
//! spec 1.1.0 over a Linux bridge or an Open vSwitch bridge.
//!
//! The process is single-threaded on purpose: it switches network namespace
//! with `setns` (see `evio_net::NetnsFd::enter`), which is only safe when no
//! other thread can observe the switch. Stdout carries the CNI protocol and
//! nothing else; logs go to stderr (errors) and to `logFile` (everything).

use std::io::{Read, Write};

use evio_cni::config::{peek_version, NetConf, MAX_CONFIG_BYTES};
use evio_cni::env::{Command, Env};
use evio_cni::version::Version;
use evio_cni::{code, CniError, Result};

mod add;
mod check;
mod del;
mod gc;
mod log;
pub mod naming;
mod status;
pub mod switch;

pub use log::Log;

/// Maps a host networking error to a CNI error that says what was being
/// done; a netns that disappeared mid-way is "container unknown" (code 3:
/// the spec's "container unknown or does not exist", which tells the runtime
/// there is nothing to clean up in it).
pub(crate) fn neterr(what: impl std::fmt::Display) -> impl FnOnce(evio_net::Error) -> CniError {
    move |e| {
        let code = match e {
            evio_net::Error::NetnsNotFound(_) => code::UNKNOWN_CONTAINER,
            _ => code::NETWORK,
        };
        CniError::new(code, format!("{what}: {e}"))
    }
}

/// evio never runs as anyone's IPAM delegate: when evio started this
/// process as one (a config whose `ipam.type` is evio under another file
/// name, or a symlink to it), it stops here instead of delegating again,
/// level after level. VERSION delegates nothing and stays allowed.
fn refuse_self_delegation(command: Command) -> Result<()> {
    let depth = evio_cni::ipam::delegation_depth()?;
    if depth > 0 && command != Command::Version {
        return Err(CniError::invalid_config(format!(
            "evio was started as an IPAM delegate ({}={depth}): the config's ipam.type \
             names evio itself (perhaps renamed or through a symlink); use an IPAM plugin \
             such as host-local",
            evio_cni::ipam::DEPTH_ENV
        )));
    }
    Ok(())
}

/// Runs the plugin; returns the process exit code.
pub fn main() -> i32 {
    let mut raw = Vec::new();
    if let Err(e) = std::io::stdin()
        .take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut raw)
    {
        return fail(
            &CniError::new(code::IO, "cannot read network config from stdin")
                .with_details(e.to_string()),
            evio_cni::version::LATEST,
        );
    }
    let version = peek_version(&raw);
    if raw.len() as u64 > MAX_CONFIG_BYTES {
        return fail(
            &CniError::new(
                code::DECODE,
                format!("network config is larger than {MAX_CONFIG_BYTES} bytes"),
            ),
            &version,
        );
    }
    let env = match Env::from_process() {
        Ok(env) => env,
        Err(e) => return fail(&e, &version),
    };
    if env.command == Command::Version {
        return print(&evio_cni::version::version_info());
    }
    if let Err(e) = refuse_self_delegation(env.command) {
        return fail(&e, &version);
    }
    let conf = match NetConf::parse(&raw) {
        Ok(c) => c,
        Err(e) => return fail(&e, &version),
    };
    let log = Log::open(conf.log_file.as_deref());
    log.debug(format_args!(
        "{} container={} ifname={} netns={:?} network={}",
        env.command.as_str(),
        env.container_id,
        env.ifname,
        env.netns,
        conf.name
    ));
    match dispatch(&env, &conf, &log) {
        Ok(Some(out)) => print(&out),
        Ok(None) => 0,
        Err(e) => {
            log.error(format_args!(
                "{} container={} ifname={} failed: code {}: {e}",
                env.command.as_str(),
                env.container_id,
                env.ifname,
                e.code
            ));
            fail(&e, &conf.cni_version)
        }
    }
}

fn dispatch(env: &Env, conf: &NetConf, log: &Log) -> Result<Option<String>> {
    let need = |min: Version, what: &str| -> Result<()> {
        if conf.version < min {
            return Err(CniError::incompatible(format!(
                "{what} needs cniVersion {min} or later, config is {}",
                conf.cni_version
            )));
        }
        Ok(())
    };
    match env.command {
        Command::Add => {
            let result = add::add(env, conf, log)?;
            let out = result.to_value(&conf.cni_version)?;
            Ok(Some(out.to_string()))
        }
        Command::Del => del::del(env, conf, log).map(|()| None),
        Command::Check => {
            need(Version::V0_4_0, "CHECK")?;
            check::check(env, conf).map(|()| None)
        }
        Command::Gc => {
            need(Version::V1_1_0, "GC")?;
            gc::gc(env, conf, log).map(|()| None)
        }
        Command::Status => {
            need(Version::V1_1_0, "STATUS")?;
            status::status(env, conf).map(|()| None)
        }
        Command::Version => Ok(Some(evio_cni::version::version_info())),
    }
}

fn print(out: &str) -> i32 {
    let mut stdout = std::io::stdout().lock();
    if writeln!(stdout, "{out}")
        .and_then(|()| stdout.flush())
        .is_err()
    {
        return 1;
    }
    0
}

fn fail(e: &CniError, version: &str) -> i32 {
    let _ = writeln!(std::io::stderr(), "evio: {e}");
    print(&e.to_json(version));
    1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vanished_netns_is_container_unknown() {
        let e = neterr("enter the pod's netns")(evio_net::Error::NetnsNotFound(
            "/run/netns/gone".into(),
        ));
        assert_eq!(e.code, code::UNKNOWN_CONTAINER);
        let e = neterr("x")(evio_net::Error::Invalid {
            what: "interface name",
            value: "a/b".into(),
        });
        assert_eq!(e.code, code::NETWORK);
    }
}
