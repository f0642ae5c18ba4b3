//! Real etcd instances for tests: single members, 3-member clusters with a
//! member that can be stopped and restarted, TLS with client certificates
//! and user/password auth. Everything listens on loopback ports picked at
//! start, keeps its data under a fresh directory (in /dev/shm when there is
//! one, so fsyncs are cheap) and is removed on drop.
//!
//! Lifetime without drop (a shared `static` instance, or a test binary that
//! panics or is killed): each member runs under a [`Keeper`] that kills it
//! when the test process goes away, and a janitor keeper then removes the
//! data.
//!
//! With [`EtcdConfig::netns`] the members run inside that network namespace
//! (the NAT lab's "internet") and serve clients on [`EtcdConfig::host`];
//! ports are then picked inside that namespace and `etcdctl` runs there too.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::keeper::{Keeper, KEEPER_SCRIPT};
use crate::netns::{run_in_netns_path, run_ok, unique_name};

const ROOT_USER: &str = "root";
const ROOT_PASSWORD: &str = "evio-root-pw";
/// The limited user (and its role) that auth creates; also the CN of
/// [`EtcdTlsFiles::user_cert`].
const AUTH_USER: &str = "evio";
/// Generous: a 3-member cluster on a busy 2-core machine, while other tests
/// compile and run, can take several seconds to elect a leader.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// What to start.
#[derive(Debug, Clone, Default)]
pub struct EtcdConfig {
    pub members: usize,
    /// Serve clients over TLS and require client certificates.
    pub tls: bool,
    /// Enable auth with a non-root user limited to the `/evio/` prefix.
    pub auth: bool,
    /// Run the members inside this network namespace (`/run/netns/NAME`)
    /// instead of the caller's; `None`: the caller's namespace.
    pub netns: Option<PathBuf>,
    /// Address the members serve clients on; `None`: 127.0.0.1. Members
    /// always talk to each other over the namespace's loopback.
    pub host: Option<IpAddr>,
    /// A second address members also serve clients on, on the same port
    /// (the NAT lab's IPv6 internet, for IPv6-only nodes: issue 25). Not
    /// with `tls` (the certificates name `host` only).
    pub host6: Option<IpAddr>,
}

/// Client-side TLS material generated for the instance.
#[derive(Debug, Clone)]
pub struct EtcdTlsFiles {
    pub ca: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// A client certificate with CN = `evio`, the name of the limited user
    /// that [`EtcdConfig::auth`] creates: with auth on, etcd takes the user
    /// from the CN of a certificate sent without a password, so this one
    /// authenticates as that user (`client_cert`'s CN names no user).
    pub user_cert: PathBuf,
    pub user_key: PathBuf,
}

/// Credentials of the non-root user, also written to files (with a
/// trailing newline, as a mounted Secret usually has).
#[derive(Debug, Clone)]
pub struct EtcdAuth {
    pub user: String,
    pub password: String,
    pub username_file: PathBuf,
    pub password_file: PathBuf,
}

/// Whom `etcdctl` authenticates as.
#[derive(Clone, Copy)]
enum Identity {
    Root,
    UserPassword,
    UserCert,
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    keeper: Option<Keeper>,
}

/// One or more etcd members forming a cluster.
pub struct EtcdCluster {
    root: PathBuf,
    token: String,
    members: Vec<Member>,
    tls: Option<EtcdTlsFiles>,
    /// What members serve and trust: certificate, key, and the CA bundle
    /// client certificates must chain to.
    server_tls: Option<ServerTls>,
    auth: Option<EtcdAuth>,
    netns: Option<PathBuf>,
    host: IpAddr,
    host6: Option<IpAddr>,
    /// Removes `root` once everything else has stopped (or the process died).
    janitor: Option<Keeper>,
}

const JANITOR_SCRIPT: &str = r#"read _ignored
sleep 0.2
rm -rf -- "$1"
exit 0"#;

/// A port that is free on `host` (in `netns` when given), with the listener
/// that holds it until the caller lets it go.
fn free_port(netns: Option<&Path>, host: IpAddr) -> (TcpListener, u16) {
    let bind = move || {
        TcpListener::bind(SocketAddr::new(host, 0)).unwrap_or_else(|e| panic!("bind {host}: {e}"))
    };
    let l = match netns {
        Some(ns) => run_in_netns_path(ns, bind),
        None => bind(),
    };
    let p = l
        .local_addr()
        .unwrap_or_else(|e| panic!("local_addr: {e}"))
        .port();
    (l, p)
}

fn scratch_root() -> PathBuf {
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!("{}-{:08x}", unique_name("evio-etcd-"), rand_u32()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
    dir
}

fn rand_u32() -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    t ^ std::process::id().rotate_left(16)
}

/// A member's TLS: its certificate and key, and the CA bundle it accepts
/// client certificates from.
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub trusted_ca: PathBuf,
}

/// Certificates of one CA: the clients' files and the server's.
#[derive(Debug, Clone)]
pub struct EtcdCa {
    pub client: EtcdTlsFiles,
    pub server: ServerTls,
}

/// CA, server and client certificates (EC P-256) made with the `openssl` CLI;
/// the server certificate is valid for 127.0.0.1 and `host`.
fn make_certs(dir: &Path, host: IpAddr, ca_cn: &str) -> (EtcdTlsFiles, PathBuf, PathBuf) {
    let server_ext = format!(
        "subjectAltName=IP:127.0.0.1,IP:{host},DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
    );
    let p = |n: &str| dir.join(n);
    let s = |n: &str| p(n).to_string_lossy().into_owned();
    run_ok(Command::new("openssl").args([
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        &s("ca.key"),
        "-out",
        &s("ca.crt"),
        "-days",
        "2",
        "-subj",
        &format!("/CN={ca_cn}"),
    ]));
    for (name, cn, ext) in [
        ("server", "etcd-server", server_ext.as_str()),
        (
            "client",
            "evio-node",
            "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n",
        ),
        (
            "user",
            AUTH_USER,
            "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n",
        ),
    ] {
        std::fs::write(p(&format!("{name}.ext")), ext)
            .unwrap_or_else(|e| panic!("write ext: {e}"));
        run_ok(Command::new("openssl").args([
            "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", &s(&format!("{name}.key")), "-out", &s(&format!("{name}.csr")),
            "-subj", &format!("/CN={cn}"),
        ]));
        run_ok(Command::new("openssl").args([
            "x509", "-req", "-in", &s(&format!("{name}.csr")), "-CA", &s("ca.crt"),
            "-CAkey", &s("ca.key"), "-CAcreateserial", "-out", &s(&format!("{name}.crt")),
            "-days", "2", "-extfile", &s(&format!("{name}.ext")),
        ]));
    }
    (
        EtcdTlsFiles {
            ca: p("ca.crt"),
            client_cert: p("client.crt"),
            client_key: p("client.key"),
            user_cert: p("user.crt"),
            user_key: p("user.key"),
        },
        p("server.crt"),
        p("server.key"),
    )
}

impl EtcdCluster {
    /// A plain (no TLS, no auth) cluster of `n` members.
    pub fn start(n: usize) -> EtcdCluster {
        EtcdCluster::start_with(EtcdConfig {
            members: n,
            ..EtcdConfig::default()
        })
    }

    /// Starts and waits until every member is healthy. Retries with fresh
    /// ports if one was taken between picking it and etcd binding it.
    pub fn start_with(cfg: EtcdConfig) -> EtcdCluster {
        let mut last = String::new();
        for _ in 0..3 {
            match EtcdCluster::try_start(&cfg) {
                Ok(c) => return c,
                Err(e) => last = e,
            }
        }
        panic!("etcd did not start: {last}");
    }

    fn try_start(cfg: &EtcdConfig) -> Result<EtcdCluster, String> {
        let n = cfg.members.max(1);
        let root = scratch_root();
        let janitor = Keeper::spawn(JANITOR_SCRIPT, &[root.to_string_lossy().into_owned()], None);
        let host = cfg.host.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let netns = cfg.netns.clone();
        let tls = cfg.tls.then(|| make_certs(&root, host, "evio-test-ca"));
        // Hold every listener until all ports are known so that no two
        // members (or roles) get the same port from the kernel.
        let mut held = Vec::new();
        let mut members = Vec::new();
        for i in 0..n {
            let (l1, client_port) = free_port(netns.as_deref(), host);
            let (l2, peer_port) = free_port(netns.as_deref(), IpAddr::V4(Ipv4Addr::LOCALHOST));
            held.push(l1);
            held.push(l2);
            members.push(Member {
                name: format!("m{i}"),
                client_port,
                peer_port,
                keeper: None,
            });
        }
        drop(held);
        let mut c = EtcdCluster {
            root,
            token: unique_name("evio-"),
            members,
            tls: tls.as_ref().map(|t| t.0.clone()),
            server_tls: tls.as_ref().map(|t| ServerTls {
                cert: t.1.clone(),
                key: t.2.clone(),
                trusted_ca: t.0.ca.clone(),
            }),
            auth: None,
            netns,
            host,
            host6: cfg.host6,
            janitor: Some(janitor),
        };
        for i in 0..n {
            c.spawn_member(i, "new");
        }
        for i in 0..n {
            c.wait_healthy(i)?;
        }
        if cfg.auth {
            c.enable_auth();
        }
        Ok(c)
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    fn client_url(&self, i: usize) -> String {
        format!(
            "{}://{}",
            self.scheme(),
            SocketAddr::new(self.host, self.members[i].client_port)
        )
    }

    fn spawn_member(&mut self, i: usize, state: &str) {
        let initial_cluster = self
            .members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let m = &self.members[i];
        let mut client = self.client_url(i);
        if let Some(h6) = self.host6 {
            client = format!(
                "{client},{}://{}",
                self.scheme(),
                SocketAddr::new(h6, m.client_port)
            );
        }
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let data = self.root.join(&m.name);
        // nsenter execs etcd in place, so the keeper's pid is etcd's.
        let mut args: Vec<String> = match &self.netns {
            Some(ns) => vec![
                "nsenter".into(),
                format!("--net={}", ns.display()),
                "--".into(),
            ],
            None => Vec::new(),
        };
        let etcd_args: Vec<String> = vec![
            "etcd".into(),
            format!("--name={}", m.name),
            format!("--data-dir={}", data.display()),
            format!("--listen-client-urls={client}"),
            format!("--advertise-client-urls={client}"),
            format!("--listen-peer-urls={peer}"),
            format!("--initial-advertise-peer-urls={peer}"),
            format!("--initial-cluster={initial_cluster}"),
            format!("--initial-cluster-state={state}"),
            format!("--initial-cluster-token={}", self.token),
            // Loopback round trips are sub-millisecond: short timers make
            // elections (start-up, a stopped member) take well under a second.
            "--heartbeat-interval=50".into(),
            "--election-timeout=500".into(),
            "--logger=zap".into(),
            "--log-outputs=stderr".into(),
        ];
        args.extend(etcd_args);
        if let Some(t) = &self.server_tls {
            args.push(format!("--cert-file={}", t.cert.display()));
            args.push(format!("--key-file={}", t.key.display()));
            args.push(format!("--trusted-ca-file={}", t.trusted_ca.display()));
            args.push("--client-cert-auth".into());
        }
        let log = self.root.join(format!("{}.log", m.name));
        let keeper = Keeper::spawn(KEEPER_SCRIPT, &args, Some(&log));
        self.members[i].keeper = Some(keeper);
    }

    fn wait_healthy(&mut self, i: usize) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let ep = self.client_url(i);
        loop {
            let out = self.etcdctl_at(&ep, &["endpoint", "health"]);
            if out.status.success() {
                return Ok(());
            }
            let exited = self.members[i].keeper.as_mut().is_some_and(|k| k.exited());
            if exited || Instant::now() > deadline {
                let log = std::fs::read_to_string(
                    self.root.join(format!("{}.log", self.members[i].name)),
                )
                .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                return Err(format!(
                    "member {} at {ep} not healthy: {} / log: {}",
                    self.members[i].name,
                    String::from_utf8_lossy(&out.stderr).trim(),
                    tail.join(" | ")
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn enable_auth(&mut self) {
        let user = AUTH_USER.to_string();
        let password = "evio-pw".to_string();
        let steps: [&[&str]; 6] = [
            &[
                "user",
                "add",
                ROOT_USER,
                "--new-user-password",
                ROOT_PASSWORD,
                "--interactive=false",
            ],
            &["role", "add", "evio"],
            &[
                "role",
                "grant-permission",
                "evio",
                "--prefix=true",
                "readwrite",
                "/evio/",
            ],
            &[
                "user",
                "add",
                &user,
                "--new-user-password",
                &password,
                "--interactive=false",
            ],
            &["user", "grant-role", &user, "evio"],
            &["auth", "enable"],
        ];
        for s in steps {
            let out = self.etcdctl(s);
            assert!(
                out.status.success(),
                "etcdctl {s:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let username_file = self.root.join("username");
        let password_file = self.root.join("password");
        std::fs::write(&username_file, format!("{user}\n"))
            .unwrap_or_else(|e| panic!("write username: {e}"));
        std::fs::write(&password_file, format!("{password}\n"))
            .unwrap_or_else(|e| panic!("write password: {e}"));
        self.auth = Some(EtcdAuth {
            user,
            password,
            username_file,
            password_file,
        });
    }

    /// `host:port` of every member (running or not), in member order.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| SocketAddr::new(self.host, m.client_port).to_string())
            .collect()
    }

    /// `host:port` of every member on [`EtcdConfig::host6`] (none
    /// without it), in member order.
    pub fn endpoints6(&self) -> Vec<String> {
        let Some(h6) = self.host6 else {
            return Vec::new();
        };
        self.members
            .iter()
            .map(|m| SocketAddr::new(h6, m.client_port).to_string())
            .collect()
    }

    /// `etcd://host:port,...` for `--store`.
    pub fn store_url(&self) -> String {
        format!("etcd://{}", self.endpoints().join(","))
    }

    pub fn tls(&self) -> Option<&EtcdTlsFiles> {
        self.tls.as_ref()
    }

    /// What the members serve and trust (from their next start on).
    pub fn server_tls(&self) -> Option<&ServerTls> {
        self.server_tls.as_ref()
    }

    pub fn auth(&self) -> Option<&EtcdAuth> {
        self.auth.as_ref()
    }

    /// Directory holding data, logs, certificates and credential files.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The network namespace the members run in, if not the caller's.
    pub fn netns(&self) -> Option<&Path> {
        self.netns.as_deref()
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.members[i].keeper.is_some()
    }

    /// The pid of member `i`'s etcd, while it runs.
    pub fn member_pid(&self, i: usize) -> Option<i32> {
        self.members.get(i)?.keeper.as_ref()?.job_pid("etcd")
    }

    /// Kills member `i` (SIGKILL, as a crash would); its data is kept.
    pub fn stop_member(&mut self, i: usize) {
        if let Some(k) = self.members[i].keeper.take() {
            k.stop();
        }
    }

    /// Freezes member `i` (SIGSTOP): it keeps its connections open and
    /// answers nothing, as a hung store does (unlike a stopped one, which
    /// refuses). [`EtcdCluster::thaw_member`] lets it go on.
    pub fn freeze_member(&self, i: usize) {
        self.signal_member(i, nix::sys::signal::Signal::SIGSTOP);
    }

    /// Undoes [`EtcdCluster::freeze_member`] (SIGCONT).
    pub fn thaw_member(&self, i: usize) {
        self.signal_member(i, nix::sys::signal::Signal::SIGCONT);
    }

    fn signal_member(&self, i: usize, sig: nix::sys::signal::Signal) {
        let pid = self.members[i]
            .keeper
            .as_ref()
            .and_then(|k| k.job_pid("etcd"))
            .unwrap_or_else(|| panic!("etcd member {i} is not running"));
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig)
            .unwrap_or_else(|e| panic!("{sig} to etcd {pid}: {e}"));
    }

    /// Restarts a stopped member on its old ports and data, and waits until
    /// it is healthy (has rejoined the cluster).
    pub fn start_member(&mut self, i: usize) {
        if self.members[i].keeper.is_some() {
            return;
        }
        self.spawn_member(i, "existing");
        if let Err(e) = self.wait_healthy(i) {
            panic!("{e}");
        }
    }

    /// Server and client certificates from a new CA of their own (CN
    /// `evio-test-ca-NAME`, files under `root/NAME/`), as a CA rotation
    /// brings. Nothing trusts it until [`EtcdCluster::set_tls`] says so.
    pub fn new_ca(&self, name: &str) -> EtcdCa {
        assert!(self.tls.is_some(), "new_ca: this etcd has no TLS");
        let dir = self.root.join(name);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let (client, cert, key) = make_certs(&dir, self.host, &format!("evio-test-ca-{name}"));
        EtcdCa {
            server: ServerTls {
                cert,
                key,
                trusted_ca: client.ca.clone(),
            },
            client,
        }
    }

    /// The TLS the members use from their next start on
    /// ([`EtcdCluster::stop_member`], [`EtcdCluster::start_member`]: an
    /// etcd restart), and the client files `etcdctl` uses from now on
    /// (their `ca` must verify `server`).
    pub fn set_tls(&mut self, server: ServerTls, client: EtcdTlsFiles) {
        assert!(self.tls.is_some(), "set_tls: this etcd has no TLS");
        self.server_tls = Some(server);
        self.tls = Some(client);
    }

    fn etcdctl_at(&self, endpoints: &str, args: &[&str]) -> Output {
        self.etcdctl_as_at(endpoints, Identity::Root, args)
    }

    fn etcdctl_as_at(&self, endpoints: &str, who: Identity, args: &[&str]) -> Output {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", ns.display()))
                    .args(["--", "etcdctl"]);
                c
            }
            None => Command::new("etcdctl"),
        };
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={endpoints}"))
            .arg("--dial-timeout=2s")
            .arg("--command-timeout=5s");
        if let Some(t) = &self.tls {
            // The server wants a certificate from every client; only the
            // certificate identity authenticates by it (CN = user).
            let (cert, key) = match who {
                Identity::UserCert => (&t.user_cert, &t.user_key),
                Identity::Root | Identity::UserPassword => (&t.client_cert, &t.client_key),
            };
            cmd.arg(format!("--cacert={}", t.ca.display()))
                .arg(format!("--cert={}", cert.display()))
                .arg(format!("--key={}", key.display()));
        }
        match (who, &self.auth) {
            (Identity::Root, Some(_)) => {
                cmd.arg(format!("--user={ROOT_USER}:{ROOT_PASSWORD}"));
            }
            (Identity::UserPassword, Some(a)) => {
                cmd.arg(format!("--user={}:{}", a.user, a.password));
            }
            _ => {}
        }
        cmd.args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("spawn etcdctl: {e}"))
    }

    fn running_urls(&self) -> String {
        (0..self.members.len())
            .filter(|&i| self.is_running(i))
            .map(|i| self.client_url(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Runs `etcdctl` (v3 API) against the running members, as root when
    /// auth is on, with the TLS client certificate when TLS is on.
    pub fn etcdctl(&self, args: &[&str]) -> Output {
        self.etcdctl_at(&self.running_urls(), args)
    }

    /// Runs `etcdctl` as the limited auth user: with its password
    /// (`cert: false`; over TLS with [`EtcdTlsFiles::client_cert`], whose CN
    /// is no user, so only the password can grant anything), or with
    /// [`EtcdTlsFiles::user_cert`] and no password (`cert: true`).
    pub fn etcdctl_as_user(&self, cert: bool, args: &[&str]) -> Output {
        let who = if cert {
            Identity::UserCert
        } else {
            Identity::UserPassword
        };
        self.etcdctl_as_at(&self.running_urls(), who, args)
    }

    /// How many calls of each gRPC method member `i` has started
    /// (`grpc_server_started_total` on its metrics endpoint), e.g.
    /// `LeaseGrant`, `Watch`, `Txn`: a test diffs two of these to see what
    /// clients asked for in between. Plain HTTP only (no TLS lab).
    pub fn grpc_calls(&self, i: usize) -> std::collections::BTreeMap<String, u64> {
        use std::io::{Read, Write};
        assert!(self.tls.is_none(), "grpc_calls: not over TLS");
        let addr = SocketAddr::new(self.host, self.members[i].client_port);
        let get = move || -> std::io::Result<String> {
            let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
            let mut body = String::new();
            s.read_to_string(&mut body)?;
            Ok(body)
        };
        let body = match &self.netns {
            Some(ns) => run_in_netns_path(ns, get),
            None => get(),
        }
        .unwrap_or_else(|e| panic!("GET http://{addr}/metrics: {e}"));
        let mut out = std::collections::BTreeMap::new();
        for l in body
            .lines()
            .filter(|l| l.starts_with("grpc_server_started_total{"))
        {
            let method = l
                .split("grpc_method=\"")
                .nth(1)
                .and_then(|m| m.split('"').next());
            let n = l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
            if let (Some(m), Some(n)) = (method, n) {
                *out.entry(m.to_string()).or_insert(0) += n as u64;
            }
        }
        out
    }

    /// `etcdctl get --prefix KEY` as `(key, value)` pairs.
    pub fn get_prefix(&self, prefix: &str) -> Vec<(String, String)> {
        let out = self.etcdctl(&["get", "--prefix", prefix]);
        assert!(
            out.status.success(),
            "etcdctl get: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let lines: Vec<&str> = text.lines().collect();
        lines
            .chunks(2)
            .filter(|c| c.len() == 2)
            .map(|c| (c[0].to_string(), c[1].to_string()))
            .collect()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(k) = m.keeper.take() {
                k.stop();
            }
        }
        if let Some(j) = self.janitor.take() {
            j.stop();
        }
    }
}

/// A single-member instance.
pub struct Etcd(EtcdCluster);

impl Etcd {
    pub fn start() -> Etcd {
        Etcd(EtcdCluster::start(1))
    }

    /// TLS with client certificates (generated under [`EtcdCluster::root`]).
    pub fn start_tls() -> Etcd {
        Etcd(EtcdCluster::start_with(EtcdConfig {
            members: 1,
            tls: true,
            ..EtcdConfig::default()
        }))
    }

    /// Auth enabled; the non-root user may only touch `/evio/`.
    pub fn start_auth() -> Etcd {
        Etcd(EtcdCluster::start_with(EtcdConfig {
            members: 1,
            auth: true,
            ..EtcdConfig::default()
        }))
    }

    /// TLS with client certificates and auth: the limited user can log in
    /// with its password or with [`EtcdTlsFiles::user_cert`].
    pub fn start_tls_auth() -> Etcd {
        Etcd(EtcdCluster::start_with(EtcdConfig {
            members: 1,
            tls: true,
            auth: true,
            ..EtcdConfig::default()
        }))
    }

    /// A plain single member inside network namespace `netns`, serving
    /// clients on `host` (e.g. the NAT lab's internet, reachable from every
    /// lab node over TCP).
    pub fn start_in(netns: &Path, host: IpAddr) -> Etcd {
        Etcd(EtcdCluster::start_with(EtcdConfig {
            members: 1,
            netns: Some(netns.to_path_buf()),
            host: Some(host),
            ..EtcdConfig::default()
        }))
    }

    /// [`Etcd::start_in`], serving clients on `host6` too (same port):
    /// the NAT lab's IPv6 internet, for IPv6-only nodes.
    pub fn start_dual_in(netns: &Path, host: IpAddr, host6: IpAddr) -> Etcd {
        Etcd(EtcdCluster::start_with(EtcdConfig {
            members: 1,
            netns: Some(netns.to_path_buf()),
            host: Some(host),
            host6: Some(host6),
            ..EtcdConfig::default()
        }))
    }

    /// [`Etcd::start_in`] with TLS and client certificates.
    pub fn start_tls_in(netns: &Path, host: IpAddr) -> Etcd {
        Etcd(EtcdCluster::start_with(EtcdConfig {
            members: 1,
            tls: true,
            netns: Some(netns.to_path_buf()),
            host: Some(host),
            ..EtcdConfig::default()
        }))
    }

    /// A plain instance shared by every test of the calling test binary,
    /// started on first use. Tests isolate themselves with distinct network
    /// names. It is never dropped; its keepers clean up when the process exits.
    pub fn shared() -> &'static Etcd {
        static SHARED: OnceLock<Etcd> = OnceLock::new();
        SHARED.get_or_init(Etcd::start)
    }

    /// `host:port`.
    pub fn endpoint(&self) -> String {
        self.0.endpoints().remove(0)
    }

    /// `[v6]:port` with [`Etcd::start_dual_in`].
    pub fn endpoint6(&self) -> Option<String> {
        self.0.endpoints6().into_iter().next()
    }
}

impl std::ops::Deref for Etcd {
    type Target = EtcdCluster;
    fn deref(&self) -> &EtcdCluster {
        &self.0
    }
}

impl std::ops::DerefMut for Etcd {
    fn deref_mut(&mut self) -> &mut EtcdCluster {
        &mut self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pids_of(root: &Path) -> Vec<String> {
        let out = Command::new("pgrep")
            .args(["-f", &root.to_string_lossy()])
            .output()
            .unwrap_or_else(|e| panic!("pgrep: {e}"));
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_string)
            .collect()
    }

    fn wait_gone(root: &Path) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while (root.exists() || !pids_of(root).is_empty()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(!root.exists(), "{} left behind", root.display());
        assert!(pids_of(root).is_empty(), "etcd left running");
    }

    #[test]
    fn single_member_put_get_and_cleanup() {
        let e = Etcd::start();
        let root = e.root().to_path_buf();
        assert!(!pids_of(&root).is_empty());
        run_ok(Command::new("etcdctl").env("ETCDCTL_API", "3").args([
            &format!("--endpoints={}", e.endpoint()),
            "put",
            "/t/k",
            "v",
        ]));
        assert_eq!(
            e.get_prefix("/t/"),
            vec![("/t/k".to_string(), "v".to_string())]
        );
        drop(e);
        wait_gone(&root);
    }

    #[test]
    fn cluster_survives_one_member_and_restarts_it() {
        let mut c = EtcdCluster::start(3);
        assert!(c.etcdctl(&["put", "/a", "1"]).status.success());
        c.stop_member(0);
        assert!(!c.is_running(0));
        // Losing the leader fails in-flight writes ("leader changed") until
        // the survivors elect a new one: retry for a bounded time.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !c.etcdctl(&["put", "/b", "2"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "2 of 3 members did not accept writes"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        c.start_member(0);
        let out = c.etcdctl_at(&c.client_url(0), &["get", "/b"]);
        assert!(String::from_utf8_lossy(&out.stdout).contains('2'));
        let root = c.root().to_path_buf();
        drop(c);
        wait_gone(&root);
    }

    #[test]
    fn tls_requires_client_cert() {
        let e = Etcd::start_tls();
        assert!(e.etcdctl(&["put", "/k", "v"]).status.success());
        let t = e.tls().unwrap_or_else(|| panic!("no tls files"));
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args([
                &format!("--endpoints=https://{}", e.endpoint()),
                &format!("--cacert={}", t.ca.display()),
                "--dial-timeout=1s",
                "--command-timeout=2s",
                "get",
                "/k",
            ])
            .output()
            .unwrap_or_else(|e| panic!("etcdctl: {e}"));
        assert!(
            !out.status.success(),
            "served a client without a certificate"
        );
    }

    #[test]
    fn auth_limits_user_to_prefix() {
        let e = Etcd::start_auth();
        let a = e.auth().unwrap_or_else(|| panic!("no auth")).clone();
        let as_user = |args: &[&str]| {
            Command::new("etcdctl")
                .env("ETCDCTL_API", "3")
                .arg(format!("--endpoints={}", e.endpoint()))
                .arg(format!("--user={}:{}", a.user, a.password))
                .args(args)
                .output()
                .unwrap_or_else(|e| panic!("etcdctl: {e}"))
        };
        assert!(as_user(&["put", "/evio/x", "1"]).status.success());
        assert!(!as_user(&["put", "/other", "1"]).status.success());
        let anon = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args([
                &format!("--endpoints={}", e.endpoint()),
                "put",
                "/evio/y",
                "1",
            ])
            .output()
            .unwrap_or_else(|e| panic!("etcdctl: {e}"));
        assert!(!anon.status.success(), "anonymous write accepted");
    }
}
