//! Store selection and connection flags shared by every command that talks
//! to the allocation store.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use evio_subnet::{EtcdOptions, StoreOptions, StoreUrl, DEFAULT_STORE};

use crate::error::NodeError;
use crate::netconf::RawConf;

pub fn parse_secs(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !v.is_finite() || v <= 0.0 || v > 86_400.0 {
        return Err(format!("{s:?} must be between 0 and 86400 seconds"));
    }
    Ok(Duration::from_secs_f64(v))
}

#[derive(Debug, Clone, clap::Args)]
pub struct StoreArgs {
    /// Allocation store: file:///PATH or etcd://HOST:PORT[,HOST:PORT...]
    /// [default: dataStore from --config, else file:///var/lib/evio/subnets.json]
    #[arg(long, value_name = "URL")]
    pub store: Option<String>,

    /// Give up (non-zero exit) if the whole operation takes longer.
    #[arg(long, value_name = "SECS", default_value = "30", value_parser = parse_secs)]
    pub timeout: Duration,

    /// CA bundle that signed the etcd server certificates (enables TLS).
    #[arg(long, value_name = "FILE")]
    pub etcd_ca: Option<PathBuf>,

    /// Client certificate for etcd (with --etcd-key).
    #[arg(long, value_name = "FILE")]
    pub etcd_cert: Option<PathBuf>,

    /// Client private key for etcd (with --etcd-cert).
    #[arg(long, value_name = "FILE")]
    pub etcd_key: Option<PathBuf>,

    /// File holding the etcd user name (with --etcd-password-file).
    #[arg(long, value_name = "FILE")]
    pub etcd_username_file: Option<PathBuf>,

    /// File holding the etcd password.
    #[arg(long, value_name = "FILE")]
    pub etcd_password_file: Option<PathBuf>,

    /// Limit for establishing one connection to an etcd member.
    #[arg(long, value_name = "SECS", default_value = "3", value_parser = parse_secs)]
    pub etcd_connect_timeout: Duration,

    /// Limit for one etcd request (retried with backoff within --timeout).
    #[arg(long, value_name = "SECS", default_value = "5", value_parser = parse_secs)]
    pub etcd_request_timeout: Duration,
}

impl StoreArgs {
    /// Flags win over the config file, which wins over the defaults.
    pub fn resolve(&self, conf: &RawConf) -> Result<(StoreUrl, StoreOptions), NodeError> {
        let url = match &self.store {
            Some(s) => s.clone(),
            None => conf
                .string("dataStore")?
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| DEFAULT_STORE.to_string()),
        };
        let url = StoreUrl::parse(&url)?;
        let pick = |flag: &Option<PathBuf>, key: &str| -> Result<Option<PathBuf>, NodeError> {
            match flag {
                Some(p) => Ok(Some(p.clone())),
                None => conf.path(key),
            }
        };
        let etcd = EtcdOptions {
            ca_file: pick(&self.etcd_ca, "etcdCACert")?,
            cert_file: pick(&self.etcd_cert, "etcdCert")?,
            key_file: pick(&self.etcd_key, "etcdKey")?,
            username_file: pick(&self.etcd_username_file, "etcdUsernameFile")?,
            password_file: pick(&self.etcd_password_file, "etcdPasswordFile")?,
            connect_timeout: self.etcd_connect_timeout,
            request_timeout: self.etcd_request_timeout,
        };
        Ok((
            url,
            StoreOptions {
                timeout: store_budget(self.timeout),
                etcd,
            },
        ))
    }
}

/// The store's own retry deadline ends a little before the hard stop so
/// that a store that cannot be reached is reported with its last error
/// ("connection refused", a TLS failure) rather than a bare timeout.
fn store_budget(total: Duration) -> Duration {
    total
        .saturating_sub((total / 20).max(Duration::from_millis(100)))
        .max(total / 2)
}

/// Runs `fut` on a single-threaded runtime (one request at a time is all a
/// command needs) and turns running past `timeout` into an error: a hard
/// stop on top of the store's own retry deadline.
pub fn block_on_with_timeout<T, F>(
    store: &StoreUrl,
    timeout: Duration,
    fut: F,
) -> Result<T, NodeError>
where
    F: Future<Output = Result<T, NodeError>>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(NodeError::Runtime)?;
    rt.block_on(async {
        match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(NodeError::Timeout {
                store: store.to_string(),
                after: timeout,
            }),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_leaves_room_for_the_hard_stop() {
        assert_eq!(
            store_budget(Duration::from_secs(30)),
            Duration::from_millis(28_500)
        );
        assert_eq!(
            store_budget(Duration::from_secs(2)),
            Duration::from_millis(1900)
        );
        assert_eq!(
            store_budget(Duration::from_millis(100)),
            Duration::from_millis(50)
        );
    }

    #[test]
    fn secs() {
        assert_eq!(parse_secs("30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_secs("0.5").unwrap(), Duration::from_millis(500));
        for bad in ["0", "-1", "x", "inf", "NaN", "1e9"] {
            assert!(parse_secs(bad).is_err(), "{bad}");
        }
    }
}
