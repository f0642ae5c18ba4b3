//! Store selection and connection flags shared by every command that talks
//! to the allocation store.

use std::future::Future;
use std::path::{Path, PathBuf};
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

    /// Where the etcd credentials Secret is mounted. Credential files named
    /// in the config file (etcdCACert, etcdCert, etcdKey, etcdUsernameFile,
    /// etcdPasswordFile) must resolve inside it, so that whoever edits the
    /// ConfigMap cannot make evio send another file (a TLS key) to a store
    /// of their choosing. Files given by flags are taken as they are.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_SECRET_DIR)]
    pub etcd_secret_dir: PathBuf,

    /// Send the etcd password without TLS (config key
    /// etcdAllowPlaintextPassword); only on a network where nobody can
    /// listen.
    #[arg(long)]
    pub etcd_allow_plaintext_password: bool,

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
                None => conf
                    .path(key)?
                    .map(|p| inside(&self.etcd_secret_dir, key, p))
                    .transpose(),
            }
        };
        let etcd = EtcdOptions {
            ca_file: pick(&self.etcd_ca, "etcdCACert")?,
            cert_file: pick(&self.etcd_cert, "etcdCert")?,
            key_file: pick(&self.etcd_key, "etcdKey")?,
            username_file: pick(&self.etcd_username_file, "etcdUsernameFile")?,
            password_file: pick(&self.etcd_password_file, "etcdPasswordFile")?,
            allow_plaintext_password: self.etcd_allow_plaintext_password
                || conf.boolean("etcdAllowPlaintextPassword")?.unwrap_or(false),
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

/// Where deploy/evio-cni.yaml and the systemd unit's hosts keep the etcd
/// credentials.
pub const DEFAULT_SECRET_DIR: &str = "/etc/evio/etcd";

/// `path` (from the config file's `key`) if it resolves, through every
/// symlink, to a file inside `dir`. The Secret's own `..data` links stay
/// inside it; a path elsewhere, or a link out of it, does not.
fn inside(dir: &Path, key: &str, path: PathBuf) -> Result<PathBuf, NodeError> {
    let refuse = |why: String| NodeError::Invalid(format!("{key} {}: {why}", path.display()));
    let real_dir = std::fs::canonicalize(dir).map_err(|e| {
        refuse(format!(
            "the credentials directory {} (--etcd-secret-dir): {e}",
            dir.display()
        ))
    })?;
    let real = std::fs::canonicalize(&path).map_err(|e| refuse(e.to_string()))?;
    if !real.starts_with(&real_dir) {
        return Err(refuse(format!(
            "credential files named in the config must be inside {} (--etcd-secret-dir)",
            dir.display()
        )));
    }
    Ok(path)
}

/// The store's own retry deadline ends a little before the hard stop so
/// that a store that cannot be reached is reported with its last error
/// ("connection refused", a TLS failure) rather than a bare timeout.
fn store_budget(total: Duration) -> Duration {
    total
        .saturating_sub((total / 20).max(Duration::from_millis(100)))
        .max(total / 2)
}

/// A single-threaded runtime: one request at a time is all a command needs.
pub fn runtime() -> Result<tokio::runtime::Runtime, NodeError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(NodeError::Runtime)
}

/// Runs `fut` on `rt` and turns running past `timeout` into an error: a
/// hard stop on top of the store's own retry deadline.
pub fn timeout_on<T, F>(
    rt: &tokio::runtime::Runtime,
    store: &StoreUrl,
    timeout: Duration,
    fut: F,
) -> Result<T, NodeError>
where
    F: Future<Output = Result<T, NodeError>>,
{
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

/// [`timeout_on`] a runtime of its own, for commands that talk to the
/// store once.
pub fn block_on_with_timeout<T, F>(
    store: &StoreUrl,
    timeout: Duration,
    fut: F,
) -> Result<T, NodeError>
where
    F: Future<Output = Result<T, NodeError>>,
{
    timeout_on(&runtime()?, store, timeout, fut)
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

    fn args(secret_dir: &Path) -> StoreArgs {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            store: StoreArgs,
        }
        let mut a = Cli::parse_from(["x"]).store;
        a.etcd_secret_dir = secret_dir.to_path_buf();
        a
    }

    fn conf(v: serde_json::Value) -> RawConf {
        RawConf::parse("t.json", v.to_string().as_bytes()).unwrap()
    }

    /// A ConfigMap editor must not be able to name any file as a
    /// credential: only files inside the Secret's mount.
    #[test]
    fn config_credential_paths_stay_inside_the_secret_dir() {
        let root = tempfile::tempdir().unwrap();
        let secrets = root.path().join("etcd");
        std::fs::create_dir(&secrets).unwrap();
        // As the kubelet mounts a Secret: names linking into ..data.
        std::fs::create_dir(secrets.join("..data")).unwrap();
        std::fs::write(secrets.join("..data/password"), "pw").unwrap();
        std::os::unix::fs::symlink("..data/password", secrets.join("password")).unwrap();
        let elsewhere = root.path().join("tls.key");
        std::fs::write(&elsewhere, "PRIVATE KEY").unwrap();
        std::os::unix::fs::symlink(&elsewhere, secrets.join("escape")).unwrap();
        let a = args(&secrets);
        let ok = conf(serde_json::json!({
            "dataStore": "etcd://127.0.0.1:2379",
            "etcdPasswordFile": secrets.join("password"),
            "etcdUsernameFile": secrets.join("password"),
        }));
        let (_, o) = a.resolve(&ok).unwrap();
        assert_eq!(o.etcd.password_file, Some(secrets.join("password")));
        for (key, path) in [
            ("etcdPasswordFile", elsewhere.clone()),
            ("etcdKey", secrets.join("escape")),
            ("etcdCACert", secrets.join("../tls.key")),
            ("etcdCert", secrets.join("missing")),
            ("etcdUsernameFile", PathBuf::from("/etc/passwd")),
        ] {
            let c = conf(serde_json::json!({ key: path }));
            let e = a.resolve(&c).unwrap_err().to_string();
            assert!(e.contains(key), "{key}: {e}");
        }
        // A flag is the pod spec's, not the ConfigMap's: taken as given.
        let mut flagged = args(&secrets);
        flagged.etcd_key = Some(elsewhere.clone());
        let (_, o) = flagged.resolve(&conf(serde_json::json!({}))).unwrap();
        assert_eq!(o.etcd.key_file, Some(elsewhere));
    }

    #[test]
    fn plaintext_password_needs_an_explicit_opt_in() {
        let d = tempfile::tempdir().unwrap();
        let a = args(d.path());
        let (_, o) = a.resolve(&conf(serde_json::json!({}))).unwrap();
        assert!(!o.etcd.allow_plaintext_password);
        let c = conf(serde_json::json!({"etcdAllowPlaintextPassword": true}));
        assert!(a.resolve(&c).unwrap().1.etcd.allow_plaintext_password);
        let mut flagged = args(d.path());
        flagged.etcd_allow_plaintext_password = true;
        let (_, o) = flagged.resolve(&conf(serde_json::json!({}))).unwrap();
        assert!(o.etcd.allow_plaintext_password);
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
