//! Debian's `miniupnpd` (package `miniupnpd-nftables`) as the port-mapping
//! service of a lab home router ([`crate::natlab::NatType::Upnp`]): PCP,
//! NAT-PMP and UPnP IGD on the router's LAN, its forwards as nftables rules
//! in the router namespace (table `inet miniupnpd`, created here as the
//! package's `nft_init.sh` would, with an accepting forward policy).
//!
//! miniupnpd refuses to forward when its WAN address is private or reserved,
//! and every lab address is (203.0.113.0/24 is TEST-NET-3), also when given
//! as `ext_ip`. What it accepts instead is a STUN check (RFC 5780: four
//! binding requests, two asking for a reply from another address and port)
//! proving that nothing filters in front of it. So every such router gets
//! its own STUN-only coturn on two extra server addresses, and the router's
//! input firewall lets their answers in. Everything lives in the lab's
//! namespaces and in a temp dir (config, pid and lease files, logs); both
//! daemons run under a [`Keeper`] and die with the site or the test.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::keeper::{Keeper, KEEPER_SCRIPT};
use crate::natlab::{stun_binding, LAN_BRIDGE, TURN_PORT, WAN_IF};
use crate::netns::Netns;
use crate::plugin::run_bounded;

/// Bound for coturn and miniupnpd to be ready.
const READY: Duration = Duration::from_secs(15);

/// What the router offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpnpOpts {
    /// PCP and NAT-PMP (one switch in miniupnpd: `enable_natpmp`).
    pub pcp_natpmp: bool,
    /// UPnP IGD (SSDP and SOAP).
    pub upnp: bool,
    /// The longest PCP lifetime granted, seconds (short in the lab, so
    /// that renewals happen within a test).
    pub max_lifetime: u32,
}

impl Default for UpnpOpts {
    fn default() -> UpnpOpts {
        UpnpOpts {
            pcp_natpmp: true,
            upnp: true,
            max_lifetime: 20,
        }
    }
}

/// miniupnpd in a router namespace, with its STUN server.
pub struct MiniUpnpd {
    router: PathBuf,
    router_name: String,
    internet: PathBuf,
    stun: [Ipv4Addr; 2],
    dir: tempfile::TempDir,
    stun_keeper: Option<Keeper>,
    /// The daemon and its options: replaced by [`MiniUpnpd::restart`],
    /// which tests call through the lab's shared reference.
    daemon: Mutex<(Option<Keeper>, UpnpOpts)>,
}

/// The table and chains miniupnpd 2.3.1 fills but does not create.
const NFT_TABLE: &str = "table inet miniupnpd\ndelete table inet miniupnpd\n\
table inet miniupnpd {
  chain forward { type filter hook forward priority filter; policy accept; jump miniupnpd; }
  chain miniupnpd { }
  chain prerouting { type nat hook prerouting priority dstnat; policy accept; jump prerouting_miniupnpd; }
  chain postrouting { type nat hook postrouting priority srcnat; policy accept; jump postrouting_miniupnpd; }
  chain prerouting_miniupnpd { }
  chain postrouting_miniupnpd { }
}
";

impl MiniUpnpd {
    /// Starts the STUN server on `stun` in `internet`, then miniupnpd in
    /// `router` (WAN [`WAN_IF`], LAN [`LAN_BRIDGE`]), and waits until it
    /// forwards. Panics with the logs when it does not.
    pub(crate) fn start(internet: &Netns, router: &Netns, stun: [Ipv4Addr; 2]) -> MiniUpnpd {
        let dir = tempfile::Builder::new()
            .prefix("evio-upnp-")
            .tempdir()
            .unwrap_or_else(|e| panic!("miniupnpd temp dir: {e}"));
        let mut m = MiniUpnpd {
            router: router.path(),
            router_name: router.name().to_string(),
            internet: internet.path(),
            stun,
            dir,
            stun_keeper: None,
            daemon: Mutex::new((None, UpnpOpts::default())),
        };
        m.start_stun();
        let out = run_bounded(
            router.command(&["nft", "-f", "-"]),
            NFT_TABLE.as_bytes(),
            READY,
        );
        assert!(out.code == 0, "miniupnpd's nft table: {}", out.stderr);
        m.restart(UpnpOpts::default());
        m
    }

    fn start_stun(&mut self) {
        let d = self.dir.path();
        let mut args = vec![
            "nsenter".to_string(),
            format!("--net={}", self.internet.display()),
            "--".into(),
            "turnserver".into(),
            "-n".into(),
            "--stun-only".into(),
        ];
        // Two addresses: RFC 5780's "other address" answers.
        for a in self.stun {
            args.push(format!("--listening-ip={a}"));
        }
        args.extend([
            format!("--listening-port={TURN_PORT}"),
            "--no-tls".into(),
            "--no-dtls".into(),
            "--no-cli".into(),
            format!("--userdb={}", d.join("turndb").display()),
            format!("--pidfile={}", d.join("turn.pid").display()),
            format!("--log-file={}", d.join("turn.log").display()),
            "--simple-log".into(),
            "--no-stdout-log".into(),
        ]);
        let log = d.join("turn-stderr.log");
        self.stun_keeper = Some(Keeper::spawn(KEEPER_SCRIPT, &args, Some(&log)));
        let server = SocketAddr::new(IpAddr::V4(self.stun[0]), TURN_PORT);
        let sock = crate::netns::run_in_netns_path(&self.internet, || {
            std::net::UdpSocket::bind(SocketAddr::new(IpAddr::V4(self.stun[1]), 0))
        })
        .unwrap_or_else(|e| panic!("STUN probe socket: {e}"));
        let deadline = Instant::now() + READY;
        while stun_binding(&sock, server, Duration::from_millis(300)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the routers' STUN server at {server} does not answer: {}",
                read(&d.join("turn.log"))
            );
        }
    }

    /// `uptime`: its epoch counts from the host's boot (miniupnpd's
    /// `system_uptime`), else from its own start.
    fn config(&self, opts: UpnpOpts, uptime: bool) -> String {
        let yes = |b: bool| if b { "yes" } else { "no" };
        let d = self.dir.path();
        format!(
            "ext_ifname={WAN_IF}\nlistening_ip={LAN_BRIDGE}\nhttp_port=0\n\
             enable_natpmp={}\nenable_upnp={}\n\
             ext_perform_stun=yes\next_stun_host={}\next_stun_port={TURN_PORT}\n\
             secure_mode=yes\nsystem_uptime={}\nmin_lifetime=10\nmax_lifetime={}\n\
             lease_file={}\nuuid=6c2a0f2e-5a1b-4e36-9d1e-0e7e10c0ffee\n\
             upnp_table_name=miniupnpd\nupnp_nat_table_name=miniupnpd\n\
             allow 1024-65535 192.168.0.0/16 1024-65535\n\
             deny 0-65535 0.0.0.0/0 0-65535\n",
            yes(opts.pcp_natpmp),
            yes(opts.upnp),
            self.stun[0],
            yes(uptime),
            opts.max_lifetime,
            d.join("leases").display(),
        )
    }

    /// (Re)starts miniupnpd with `opts` (the mappings of a previous run
    /// are dropped) and waits until it forwards.
    pub fn restart(&self, opts: UpnpOpts) {
        self.run(opts, true);
    }

    /// Restarts it as a rebooted router comes back: the same options, its
    /// mappings gone, and its PCP/NAT-PMP epoch counting from 0 (its own
    /// start instead of the host's boot), which it multicasts to the LAN
    /// in a PCP ANNOUNCE.
    pub fn reboot(&self) {
        let opts = self.daemon.lock().unwrap_or_else(|p| p.into_inner()).1;
        self.run(opts, false);
    }

    fn run(&self, opts: UpnpOpts, uptime: bool) {
        let mut daemon = self.daemon.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = daemon.0.take() {
            k.stop();
        }
        daemon.1 = opts;
        let d = self.dir.path();
        let _ = std::fs::remove_file(d.join("leases"));
        let conf = d.join("miniupnpd.conf");
        std::fs::write(&conf, self.config(opts, uptime))
            .unwrap_or_else(|e| panic!("write {conf:?}: {e}"));
        let _ = std::fs::remove_file(d.join("miniupnpd.log"));
        let args = vec![
            "nsenter".to_string(),
            format!("--net={}", self.router.display()),
            "--".into(),
            "miniupnpd".into(),
            "-d".into(),
            "-f".into(),
            conf.display().to_string(),
            "-P".into(),
            d.join("miniupnpd.pid").display().to_string(),
        ];
        let log = d.join("miniupnpd.log");
        let keeper = daemon
            .0
            .insert(Keeper::spawn(KEEPER_SCRIPT, &args, Some(&log)));
        let deadline = Instant::now() + READY;
        loop {
            let text = read(&log);
            let listening = !opts.pcp_natpmp || text.contains("Listening for NAT-PMP/PCP");
            if text.contains("Port forwarding is now enabled") && listening {
                return;
            }
            let exited = keeper.exited();
            assert!(
                !exited && Instant::now() < deadline,
                "miniupnpd in {} not forwarding (exited: {exited}): {text}",
                self.router_name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The mappings miniupnpd holds, one lease-file line each
    /// (`UDP:5800:192.168.1.2:5800:<expiry>:<description>`).
    pub fn leases(&self) -> Vec<String> {
        read(&self.dir.path().join("leases"))
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// The DNAT rules of its mappings in the router's nftables.
    pub fn nft_forwards(&self) -> Vec<String> {
        let r = Netns::borrowed(&self.router_name);
        let out = run_bounded(
            r.command(&[
                "nft",
                "list",
                "chain",
                "inet",
                "miniupnpd",
                "prerouting_miniupnpd",
            ]),
            b"",
            READY,
        );
        out.stdout
            .lines()
            .filter(|l| l.contains("dnat"))
            .map(|l| l.trim().to_string())
            .collect()
    }

    /// Its log (run with `-d`) and the STUN server's, for diagnostics.
    pub fn log(&self) -> String {
        let d = self.dir.path();
        format!(
            "{}\n--- its STUN server:\n{}",
            read(&d.join("miniupnpd.log")),
            read(&d.join("turn.log"))
        )
    }

    /// The two STUN server addresses whose answers the router lets in.
    pub fn stun_addrs(&self) -> [Ipv4Addr; 2] {
        self.stun
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

impl Drop for MiniUpnpd {
    fn drop(&mut self) {
        let daemon = self.daemon.get_mut().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = daemon.0.take() {
            k.stop();
        }
        if let Some(k) = self.stun_keeper.take() {
            k.stop();
        }
    }
}
