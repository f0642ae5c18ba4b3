//! STATUS: can this network take pods now? Code 50 if not.

use evio_cni::config::NetConf;
use evio_cni::env::{Command, Env};
use evio_cni::ipam::Delegate;
use evio_cni::{code, CniError, Result};

use crate::switch;

pub fn status(env: &Env, conf: &NetConf) -> Result<()> {
    let not_ready = |e: CniError| {
        if e.code == code::NOT_AVAILABLE || e.code == code::NOT_AVAILABLE_LIMITED {
            e
        } else {
            CniError::new(code::NOT_AVAILABLE, e.msg).with_details(e.details)
        }
    };
    switch::for_conf(conf).status().map_err(not_ready)?;
    let ipam = Delegate::of(conf, &env.path).map_err(not_ready)?;
    // A delegate older than 1.1.0 has no STATUS: it is ready if it runs.
    let versions = ipam.versions().map_err(not_ready)?;
    if versions.iter().any(|v| v == "1.1.0") {
        ipam.exec(Command::Status, &conf.raw).map_err(not_ready)?;
    }
    Ok(())
}
