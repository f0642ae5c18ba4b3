//! The fuzz targets' bodies: one function per parser evio feeds with input
//! from outside its trust boundary. Each must never panic, whatever the
//! bytes, and each asserts what must hold of whatever the parser accepts
//! (a violated assertion is a finding just like a crash). They are plain
//! functions so that `tests/smoke.rs` replays them on the stable toolchain
//! and `fuzz_targets/*` hands them to libFuzzer.

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use std::sync::OnceLock;

use evio_cni::config::{peek_version, NetConf, MAX_MTU, MIN_MTU};
use evio_cni::env::{parse_args, Command, Env};
use evio_cni::result::CniResult;
use evio_cni::version::SUPPORTED;
use evio_ovsdb::datum::{self, Atom, Datum};
use evio_ovsdb::framing::Framer;
use serde_json::Value;

use evio_node::{conflist, netconf, overlay};

/// Larger inputs only slow the fuzzer down: every parser bounds its input
/// before parsing (4 MiB for the plugin's stdin) or is fed by a framer.
const MAX_INPUT: usize = 1 << 20;

/// The plugin's network config (stdin of every CNI command).
pub fn netconf(data: &[u8]) {
    if data.len() > MAX_INPUT {
        return;
    }
    let v = peek_version(data);
    assert!(SUPPORTED.contains(&v.as_str()), "peek_version gave {v:?}");
    match NetConf::parse(data) {
        Ok(c) => {
            assert!(SUPPORTED.contains(&c.cni_version.as_str()));
            assert!(
                !c.bridge.is_empty() && c.bridge.len() <= 15,
                "{:?}",
                c.bridge
            );
            assert!(!c.bridge.contains(['/', ':', '\0']), "{:?}", c.bridge);
            assert!((MIN_MTU..=MAX_MTU).contains(&c.mtu), "mtu {}", c.mtu);
            assert!(
                !c.ipam_type.is_empty() && !c.ipam_type.contains('/'),
                "{:?}",
                c.ipam_type
            );
            assert!(c
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')));
            if let Some(l) = &c.log_file {
                assert!(l.is_absolute(), "{l:?}");
            }
            assert_eq!(c.raw, data);
        }
        Err(e) => assert!(matches!(e.code, 1 | 6 | 7), "code {} for {e}", e.code),
    }
}

/// The `CNI_*` environment: the input is the six variables separated by
/// NUL (COMMAND, CONTAINERID, NETNS, IFNAME, ARGS, PATH), any of them
/// possibly not UTF-8; a missing field is an unset variable.
pub fn cni_env(data: &[u8]) {
    if data.len() > MAX_INPUT {
        return;
    }
    const KEYS: [&str; 6] = [
        "CNI_COMMAND",
        "CNI_CONTAINERID",
        "CNI_NETNS",
        "CNI_IFNAME",
        "CNI_ARGS",
        "CNI_PATH",
    ];
    let vars: HashMap<&str, OsString> = KEYS
        .iter()
        .copied()
        .zip(
            data.split(|b| *b == 0)
                .map(|f| OsString::from_vec(f.to_vec())),
        )
        .collect();
    match Env::from_lookup(|k| vars.get(k).cloned()) {
        Ok(env) => {
            // GC, STATUS and VERSION ignore the container ID and ifname.
            if matches!(env.command, Command::Add | Command::Del | Command::Check) {
                assert!(env.ifname.len() <= 15, "{:?}", env.ifname);
                assert!(!env.ifname.contains(['/', ':', '\0']), "{:?}", env.ifname);
                assert!(env
                    .container_id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')));
            }
            for (k, _) in &env.args {
                assert!(!k.is_empty() && !k.contains(';'));
            }
        }
        Err(e) => assert!(matches!(e.code, 3 | 4), "code {} for {e}", e.code),
    }
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(pairs) = parse_args(s) {
            for (k, v) in pairs {
                assert!(!k.is_empty() && !k.contains(';') && !v.contains(';'));
            }
        }
    }
}

/// A result: the IPAM delegate's stdout and `prevResult`.
pub fn cni_result(data: &[u8]) {
    if data.len() > MAX_INPUT {
        return;
    }
    let r = match CniResult::from_slice(data) {
        Ok(r) => r,
        Err(e) => {
            assert!(matches!(e.code, 1 | 6), "code {} for {e}", e.code);
            return;
        }
    };
    for v in SUPPORTED {
        let out = r
            .to_value(v)
            .unwrap_or_else(|e| panic!("{v}: cannot write a result it read: {e}"));
        let back = CniResult::from_value(&out)
            .unwrap_or_else(|e| panic!("{v}: cannot read its own output {out}: {e}"));
        assert_eq!(back.ips, r.ips, "{v}: ips changed in a round trip");
        assert_eq!(back.interfaces, r.interfaces, "{v}: interfaces changed");
        let dst = |r: &CniResult| -> Vec<_> { r.routes.iter().map(|x| (x.dst, x.gw)).collect() };
        assert_eq!(dst(&back), dst(&r), "{v}: routes changed");
        assert_eq!(back.dns, r.dns, "{v}: dns changed");
    }
    // The config the plugin re-sends to an older delegate.
    let conf = serde_json::json!({"cniVersion": "1.1.0", "name": "n", "prevResult":
        serde_json::from_slice::<Value>(data).unwrap_or(Value::Null)});
    let _ = evio_cni::ipam::with_version(conf.to_string().as_bytes(), "0.4.0");
}

/// The ConfigMap's net-conf.json through `evio-node config-gen`'s resolver
/// and renderer: whatever it accepts must render a conflist the plugin
/// accepts and whose range the doctor finds consistent with the subnet.
pub fn node_netconf(data: &[u8]) {
    if data.len() > MAX_INPUT {
        return;
    }
    let Ok(conf) = netconf::RawConf::parse("fuzz.json", data) else {
        return;
    };
    if let Ok(o) = overlay::OverlayConf::parse(&conf) {
        assert!(o.listen_port != 0);
        assert!(o.default_mtu() <= o.max_mtu());
        assert!(!o.host_interface.is_empty() && o.host_interface.len() <= 15);
    }
    let Ok(gen) = conflist::GenConfig::resolve(&conf, &conflist::Overrides::default()) else {
        return;
    };
    let last = gen.pod.capacity() - 1;
    for index in [0, last / 2, last] {
        let ns = gen
            .pod
            .node(index)
            .unwrap_or_else(|e| panic!("node {index} of {}: {e}", gen.pod.capacity()));
        let bytes = gen
            .render(&ns)
            .unwrap_or_else(|e| panic!("render node {index}: {e}"));
        let nets = evio_doctor::conf::networks_in(Path::new("fuzz.conflist"), &bytes)
            .unwrap_or_else(|e| {
                panic!(
                    "the plugin refuses the rendered conflist: {e}\n{}",
                    String::from_utf8_lossy(&bytes)
                )
            });
        assert_eq!(nets.len(), 1);
        assert_eq!(
            evio_doctor::check::store_mismatch(&nets[0], ns.subnet),
            None,
            "rendered range disagrees with subnet {}",
            ns.subnet
        );
    }
}

/// OVSDB replies: framing of the byte stream and decoding of the values.
/// The first byte picks the read size, so messages split at any point.
pub fn ovsdb_reply(data: &[u8]) {
    if data.len() > MAX_INPUT {
        return;
    }
    let Some((ctl, stream)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(*ctl % 64) + 1;
    let whole = frame(stream, stream.len().max(1));
    let pieces = frame(stream, chunk);
    assert_eq!(
        whole, pieces,
        "framing depends on how the stream is split (chunk {chunk})"
    );
    for v in whole.0.iter() {
        decode(v);
    }
}

/// Messages, and whether the stream ended in an error, for one split.
fn frame(stream: &[u8], chunk: usize) -> (Vec<Value>, bool) {
    let mut f = Framer::with_limit(1 << 16);
    let mut out = Vec::new();
    for c in stream.chunks(chunk) {
        f.push(c);
        loop {
            match f.next_message() {
                Ok(Some(v)) => out.push(v),
                Ok(None) => break,
                Err(_) => return (out, true),
            }
        }
    }
    (out, false)
}

fn decode(v: &Value) {
    if let Ok(a) = Atom::from_json(v) {
        let _ = (a.as_str(), a.as_uuid(), a.as_integer());
    }
    if let Ok(d) = Datum::from_json(v) {
        let again = Datum::from_json(&d.to_json())
            .unwrap_or_else(|e| panic!("cannot decode its own encoding of {v}: {e}"));
        assert_eq!(again, d, "datum round trip of {v}");
        let _ = (d.string(), d.uuid(), d.uuids(), d.string_map());
        let _ = (d.optional_integer(), d.optional_string());
    }
    let results = match v.get("result") {
        Some(Value::Array(r)) => r.as_slice(),
        Some(r) => std::slice::from_ref(r),
        None => &[],
    };
    for r in results {
        let _ = datum::count(r);
        let _ = datum::inserted_uuid(r);
        let Ok(rows) = datum::rows(r) else { continue };
        for row in rows {
            for col in [
                "_uuid",
                "name",
                "ofport",
                "error",
                "external_ids",
                "interfaces",
                "ports",
                "datapath_type",
                "other_config",
            ] {
                let _ = row.datum(col);
                let _ = (row.string(col), row.uuid(col), row.uuids(col));
                let _ = (row.optional_integer(col), row.optional_string(col));
                let _ = row.string_map(col);
            }
        }
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap_or_else(|e| panic!("tokio runtime: {e}"))
    })
}

/// The file store's file: an in-memory file (memfd) reached through
/// `/proc/self/fd`, so the fuzzer neither touches the disk nor leaves
/// anything behind.
fn store_file() -> Option<&'static (std::fs::File, PathBuf)> {
    static F: OnceLock<Option<(std::fs::File, PathBuf)>> = OnceLock::new();
    F.get_or_init(|| {
        use std::os::fd::{AsRawFd, FromRawFd};
        // SAFETY: a NUL-terminated name and no flags; the fd is checked.
        let fd = unsafe { libc::memfd_create(c"evio-fuzz-store".as_ptr(), 0) };
        if fd < 0 {
            return None;
        }
        // SAFETY: memfd_create just returned this descriptor to us alone.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        Some((file, path))
    })
    .as_ref()
}

/// What the stores read back: owner records, subnet keys, node values, the
/// file store's whole file, and the store URL itself.
pub fn store_record(data: &[u8]) {
    if data.len() > MAX_INPUT {
        return;
    }
    if let Ok(r) = serde_json::from_slice::<evio_subnet::PeerRecord>(data) {
        let v = serde_json::to_value(&r).unwrap_or_else(|e| panic!("encode {r:?}: {e}"));
        let back: evio_subnet::PeerRecord =
            serde_json::from_value(v).unwrap_or_else(|e| panic!("decode own record: {e}"));
        assert_eq!(back, r);
        let _ = r.heartbeat_age(std::time::SystemTime::now());
    }
    if let Ok(r) = serde_json::from_slice::<evio_subnet::OwnerRecord>(data) {
        let v = serde_json::to_value(&r).unwrap_or_else(|e| panic!("encode {r:?}: {e}"));
        let back: evio_subnet::OwnerRecord =
            serde_json::from_value(v).unwrap_or_else(|e| panic!("decode own record: {e}"));
        assert_eq!(back, r);
    }
    if let Ok(s) = std::str::from_utf8(data) {
        if let Some(n) = evio_subnet::parse_subnet_key(s) {
            assert_eq!(
                evio_subnet::parse_subnet_key(&evio_subnet::subnet_key(&n)),
                Some(n)
            );
        }
        if evio_subnet::validate_name("node name", s).is_ok() {
            assert!(!s.contains(['/', '\0']) && !s.starts_with('.'));
        }
        if let Ok(bits) = evio_subnet::parse_node_bits(s) {
            let _ = evio_subnet::PodNetwork::parse("10.244.0.0/16", bits);
        }
        if let Ok(u) = evio_subnet::StoreUrl::parse(s) {
            assert_eq!(
                evio_subnet::StoreUrl::parse(&u.to_string()).ok(),
                Some(u.clone()),
                "store URL round trip of {s:?}"
            );
        }
    }
    // The file store reading whatever is in its file.
    let Some((file, path)) = store_file() else {
        return;
    };
    use std::io::{Seek, Write};
    let mut f = file;
    let written = f
        .set_len(0)
        .and_then(|()| f.rewind())
        .and_then(|()| f.write_all(data));
    if written.is_ok() {
        let store = evio_subnet::FileStore::new(path.clone(), std::time::Duration::from_secs(1));
        use evio_subnet::SubnetStore;
        let rt = runtime();
        let _ = rt.block_on(store.list("net"));
        let _ = rt.block_on(store.lookup("net", "node-1"));
    }
}

/// A node of the overlay, built once: what an attacker's datagram or a
/// pod's frame meets.
/// An overlay with one peer whose keys the harness knows and whose
/// session with it is established: fuzzed bytes sent through that session
/// pass mac1 and decryption and reach the switch, the probe parser and the
/// checksum checks, not only the handshake gate.
struct OverlayNode {
    ov: evio_overlay::engine::Overlay,
    /// The peer's end of the session.
    peer: evio_overlay::tunnel::Tunnel,
    peer_addr: evio_overlay::path::PathAddr,
    /// One instant for every input: sessions never expire mid-run.
    now: std::time::Instant,
}

/// Records the last datagram the overlay sent.
struct NullIo(Vec<u8>, usize);

impl evio_overlay::engine::Io for NullIo {
    fn datagram(&mut self) -> &mut [u8] {
        &mut self.0
    }
    fn commit(&mut self, _: evio_overlay::path::PathAddr, len: usize) {
        assert!(len <= self.0.len());
        self.1 = len;
    }
    fn pod(&mut self, frame: &mut [u8], _: evio_overlay::offload::Csum) {
        assert!(frame.len() >= 14);
    }
    fn host(&mut self, _: &mut [u8], _: evio_overlay::offload::Csum) {}
}

fn parse<T: std::str::FromStr>(s: &str) -> T
where
    T::Err: std::fmt::Display,
{
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn overlay_node() -> &'static std::sync::Mutex<OverlayNode> {
    static NODE: OnceLock<std::sync::Mutex<OverlayNode>> = OnceLock::new();
    NODE.get_or_init(|| std::sync::Mutex::new(new_overlay_node()))
}

fn new_overlay_node() -> OverlayNode {
    use evio_overlay::crypto::{seed_from_u64, StaticKeys};
    use evio_overlay::engine::{PeerCandidate, Overlay, OverlayConfig, PeerInfo};
    use evio_overlay::path::{Rank, PathAddr};
    use evio_overlay::tunnel::{Identity, Tunnel};
    use rand::SeedableRng;
    let now = std::time::Instant::now();
    let me = StaticKeys::from_private(&mut [1; 32]);
    let my_key = *me.public();
    let peer_keys = StaticKeys::from_private(&mut [2; 32]);
    let peer_key = *peer_keys.public();
    let cfg = OverlayConfig::new("fuzz", parse("10.244.1.0/24"), 1380);
    let mut ov = Overlay::new(now, cfg, Identity::new(me, None, "fuzz"), seed_from_u64(1));
    let peer_addr = PathAddr::direct(parse("203.0.113.2:5800"));
    ov.set_peers(
        now,
        &[PeerInfo {
            node: "peer".into(),
            key: peer_key,
            pod_subnet: parse("10.244.2.0/24"),
            host_addr: Some(parse("10.10.0.2/16")),
            host_addr6: Some(parse("fd00:ff::2/64")),
            candidates: vec![PeerCandidate {
                addr: peer_addr.remote,
                class: Rank::Direct,
            }],
            stale: false,
            bridge_mac: Some([0x7a, 0x1c, 0, 0, 0, 2]),
        }],
    );
    // The handshake, in memory: the peer initiates, the overlay answers.
    let peer_id = Identity::new(peer_keys, None, "fuzz");
    let mut peer = Tunnel::new(&peer_id, my_key);
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let mut init = [0u8; evio_overlay::wire::INITIATION_LEN];
    let wall = std::time::Duration::from_secs(1_700_000_000);
    if peer.initiate(&peer_id, &mut rng, now, wall, 7, &mut init).is_err() {
        panic!("initiation");
    }
    let mut io = NullIo(vec![0; evio_overlay::engine::MAX_DATAGRAM], 0);
    if ov.from_network(now, peer_addr, &init, &mut io).is_err() {
        panic!("the overlay refused the harness's initiation");
    }
    if peer.on_response(now, &io.0[..io.1]).is_err() {
        panic!("the harness refused the overlay's response");
    }
    // The first transport message confirms the session to the overlay.
    let mut out = [0u8; 64];
    let keepalive = [evio_overlay::wire::kind::KEEPALIVE, 0, 0, 0];
    let tcfg = evio_overlay::tunnel::TunnelConfig::default();
    let n = peer
        .encrypt(now, &tcfg, &keepalive, &mut out)
        .unwrap_or_else(|| panic!("no session on the harness's side"));
    if let Err(e) = ov.from_network(now, peer_addr, &out[..n], &mut io) {
        panic!("the overlay refused the session: {e:?}");
    }
    OverlayNode {
        ov,
        peer,
        peer_addr,
        now,
    }
}

/// Sends `data` through the established session as an inner message: the
/// first byte picks the kind (including unknown ones), the next three are
/// the checksum fields, the rest is the body.
fn through_session(node: &mut OverlayNode, data: &[u8]) {
    use evio_overlay::wire::{kind, INNER_HEADER};
    let Some(head) = data.get(..INNER_HEADER) else {
        return;
    };
    let kinds = [
        kind::POD_FRAME,
        kind::HOST_PACKET,
        kind::PROBE,
        kind::PROBE_REPLY,
        kind::KEEPALIVE,
        0x7f,
    ];
    let mut plain = data.to_vec();
    plain[0] = kinds[usize::from(head[0]) % kinds.len()];
    let mut out = vec![0u8; plain.len() + 64];
    let tcfg = evio_overlay::tunnel::TunnelConfig::default();
    let Some(n) = node.peer.encrypt(node.now, &tcfg, &plain, &mut out) else {
        return;
    };
    let mut io = NullIo(vec![0; evio_overlay::engine::MAX_DATAGRAM], 0);
    let r = node.ov.from_network(node.now, node.peer_addr, &out[..n], &mut io);
    assert!(
        !matches!(
            r,
            Err(evio_overlay::tunnel::Reject::Auth | evio_overlay::tunnel::Reject::NoSession)
        ),
        "a datagram of the session was refused: {r:?}"
    );
}

/// The overlay's entry points for outside bytes: a datagram from anyone
/// (handshakes, cookies, transport), a frame from a pod (with a vnet
/// header from the device), a packet from the host, and the offload
/// segmenter and coalescer on their own.
pub fn overlay(data: &[u8]) {
    use evio_overlay::offload::{segments, Coalescer, Csum, Framing, VnetHdr};
    use evio_overlay::path::PathAddr;
    if data.len() > 70_000 {
        return;
    }
    let mut node = overlay_node().lock().unwrap_or_else(|p| p.into_inner());
    let mut io = NullIo(vec![0; evio_overlay::engine::MAX_DATAGRAM], 0);
    let now = node.now;
    let from = PathAddr::direct(parse("198.51.100.7:4242"));
    let _ = node.ov.from_network(now, from, data, &mut io);
    through_session(&mut node, data);
    if data.len() > 10 {
        let hdr = VnetHdr::parse(&data[..10]).unwrap_or_default();
        node.ov.from_pod(now, &hdr, &data[10..], &mut io);
        node.ov.from_host(now, &hdr, &data[10..], &mut io);
        for framing in [Framing::Ethernet, Framing::Ip] {
            if let Ok(mut segs) = segments(&hdr, &data[10..], framing) {
                let mut out = vec![0u8; 65_600];
                let mut gro = Coalescer::new(framing, 4, 65_000);
                let mut n = 0;
                while let Ok(Some((len, csum))) = segs.next_into(&mut out) {
                    n += 1;
                    assert!(n <= segs.count(), "more segments than planned");
                    gro.push(&out[..len], csum, &mut |h, f| {
                        assert!(f.len() <= 65_535);
                        let _ = VnetHdr::parse(&h.to_bytes());
                    });
                    let mut copy = out[..len].to_vec();
                    let _ = evio_overlay::offload::complete_checksum(&mut copy, csum);
                }
                gro.flush(&mut |_, _| {});
            }
            let mut copy = data[10..].to_vec();
            let _ = evio_overlay::offload::complete_checksum(
                &mut copy,
                Csum::Partial {
                    start: u16::from(data[0]) * 2,
                    offset: u16::from(data[1] % 32),
                },
            );
        }
    }
}

/// Two switches (an IPv4 and an IPv6 node, each with two peers), built
/// once, and a clock that moves with every input so budgets refill and
/// entries expire.
struct Switches {
    v4: evio_overlay::l2::Switch,
    v6: evio_overlay::l2::Switch,
    now: std::time::Instant,
}

const FUZZ_BRIDGE: [u8; 6] = [0x7a, 0x1c, 0x99, 0, 0, 1];

fn switches() -> &'static std::sync::Mutex<Switches> {
    static S: OnceLock<std::sync::Mutex<Switches>> = OnceLock::new();
    S.get_or_init(|| {
        use evio_overlay::l2::{PeerAddrs, Switch, SwitchConfig};
        let net = |s: &str| s.parse::<ipnet::IpNet>().unwrap_or_else(|e| panic!("{e}"));
        let make = |local: &str, peers: [&str; 2]| {
            let mut sw = Switch::new(SwitchConfig {
                local_subnet: net(local),
                host_addr: Some("10.10.0.1".parse().unwrap_or_else(|e| panic!("{e}"))),
                // A dual-stack host overlay: its IPv6 checks get fuzzed too.
                host_addr6: Some("fd00:ff::1".parse().unwrap_or_else(|e| panic!("{e}"))),
                bridge_mac: Some(FUZZ_BRIDGE),
                mtu: 1380,
                flood_rate: 100,
                flood_burst: 200,
                peer_flood_rate: 100,
                peer_flood_burst: 200,
                max_macs_per_peer: 64,
                mac_ttl: std::time::Duration::from_secs(300),
            });
            for (i, p) in peers.iter().enumerate() {
                sw.set_peer(
                    i as u32 + 1,
                    PeerAddrs {
                        pod_subnet: net(p),
                        host_addr: Some(format!("10.10.0.{}", i + 2).parse().unwrap_or_else(|e| panic!("{e}"))),
                        host_addr6: Some(format!("fd00:ff::{}", i + 2).parse().unwrap_or_else(|e| panic!("{e}"))),
                        // One peer with its record's word, one without.
                        bridge_mac: (i == 0).then_some([0x7a, 0x1c, 0, 0, 0, 2]),
                    },
                );
            }
            sw
        };
        std::sync::Mutex::new(Switches {
            v4: make("10.244.1.0/24", ["10.244.2.0/24", "10.244.3.0/24"]),
            v6: make("fd00:10::/64", ["fd00:10:0:1::/64", "fd00:10:0:2::/64"]),
            now: std::time::Instant::now(),
        })
    })
}

/// The L2 switch on its own, past the tunnel's decryption: the first byte
/// picks the switch (bit 0), the entry point (bits 1-2: a frame from peer
/// 1, from peer 2, from the local bridge, a host packet from peer 1) and
/// how far the clock moves (the rest); the remaining bytes are the frame.
/// Whatever a peer gets delivered never carries this node's bridge MAC, and
/// the tables stay within their bounds.
pub fn switch(data: &[u8]) {
    use evio_overlay::l2::PeerVerdict;
    let Some((&op, frame)) = data.split_first() else {
        return;
    };
    let mut s = switches().lock().unwrap_or_else(|p| p.into_inner());
    s.now += std::time::Duration::from_millis(u64::from(op >> 3) * 997);
    let now = s.now;
    let sw = if op & 1 == 0 { &mut s.v4 } else { &mut s.v6 };
    match (op >> 1) & 3 {
        0 | 1 => {
            let peer = u32::from((op >> 1) & 1) + 1;
            if sw.from_peer(now, peer, frame) == PeerVerdict::Deliver {
                assert!(frame.len() >= 14 && frame[6..12] != FUZZ_BRIDGE);
            }
        }
        2 => {
            let mut out = [0u8; 1600];
            if let evio_overlay::l2::LocalVerdict::Reply(n) = sw.from_local(now, frame, false, &mut out) {
                assert!(n <= out.len() && n >= 14);
            }
        }
        _ => {
            let _ = sw.host_from_peer(1, frame);
        }
    }
    if op & 0xf8 == 0xf8 {
        sw.expire(now);
    }
    let st = sw.stats();
    assert!(st.learned_macs <= st.peers * 65, "{st:?}");
}

/// The port-mapping client's fixed identity, so that seeds can hold valid
/// answers (nonce, port and client as in the requests it sends).
pub const PORTMAP_NONCE: [u8; 12] = [9; 12];
pub const PORTMAP_PORT: u16 = 5800;
const PORTMAP_GW: std::net::Ipv4Addr = std::net::Ipv4Addr::new(192, 168, 1, 1);
const PORTMAP_ME: std::net::Ipv4Addr = std::net::Ipv4Addr::new(192, 168, 1, 2);

/// PCP and NAT-PMP from the gateway (crates/overlay/src/portmap): the input
/// is a script of records `[op, len, len bytes]`; op 0 is a datagram from
/// the gateway's server address, 1 from a stranger, 2 moves the clock by
/// `len` × 100 ms, 3 restarts, 4 shuts down. Every datagram also goes
/// through both codecs on its own. What the client sends is always one of
/// its three request shapes, a mapping it holds has an address anyone can
/// reach, and after a shutdown it is done within bounded time.
pub fn portmap(data: &[u8]) {
    use evio_overlay::portmap::{natpmp, pcp, PortMapConfig, PortMapper, SERVER_PORT};
    use std::net::{SocketAddr, SocketAddrV4};
    use std::time::Duration;
    if data.len() > MAX_INPUT {
        return;
    }
    let mut now = std::time::Instant::now();
    let cfg = PortMapConfig {
        gateway: PORTMAP_GW,
        client: PORTMAP_ME,
        internal_port: PORTMAP_PORT,
        lifetime: evio_overlay::portmap::LIFETIME,
    };
    let mut m = PortMapper::new(now, cfg, PORTMAP_NONCE);
    let server = SocketAddr::V4(SocketAddrV4::new(PORTMAP_GW, SERVER_PORT));
    let stranger = SocketAddr::V4(SocketAddrV4::new(PORTMAP_ME, SERVER_PORT));
    let check = |m: &mut PortMapper| {
        while let Some(t) = m.poll_transmit() {
            let shape = match t.len() {
                pcp::REQUEST_LEN => t[0] == pcp::VERSION,
                2 | 12 => t[0] == 0,
                _ => false,
            };
            assert!(shape, "sent {t:?}");
        }
        while m.poll_event().is_some() {}
        if let Some((_, ext)) = m.mapped() {
            assert!(evio_overlay::portmap::usable(*ext.ip()) && ext.port() != 0, "{ext}");
        }
    };
    let mut rest = data;
    while let [op, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (body, next) = tail.split_at(n);
        rest = next;
        match op % 5 {
            0 | 1 => {
                let _ = pcp::parse_map_response(body);
                let _ = pcp::is_natpmp_version_error(body);
                if let Some(r) = natpmp::parse_response(body) {
                    let _ = (r.result(), r.epoch(), natpmp::result_name(r.result()));
                }
                m.handle_datagram(now, if op % 5 == 0 { server } else { stranger }, body);
            }
            2 => {
                now += Duration::from_millis(u64::from(*len) * 100);
                m.handle_timeout(now);
            }
            3 => m.restart(now),
            _ => m.shutdown(now),
        }
        check(&mut m);
    }
    m.shutdown(now);
    for _ in 0..64 {
        check(&mut m);
        if m.is_done() {
            return;
        }
        match m.poll_timeout() {
            Some(t) => now = now.max(t),
            None => break,
        }
        m.handle_timeout(now);
    }
    check(&mut m);
    assert!(m.is_done(), "not done after a shutdown and every timeout");
}

/// What a UPnP gateway sends (crates/agent/src/upnp.rs): the input up to
/// the first NUL is an SSDP answer, the rest an HTTP answer, read as a
/// description and as a SOAP answer. A location and a control URL are
/// always on the gateway and print back to themselves, an external address
/// is one anyone can reach, and a body is never longer than the answer.
pub fn upnp(data: &[u8]) {
    use std::net::IpAddr;
    if data.len() > MAX_INPUT {
        return;
    }
    let (ssdp, answer) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let ssdp = String::from_utf8_lossy(ssdp);
    let r = evio_agent::upnp::read_gateway_bytes(PORTMAP_GW, &ssdp, answer);
    if let Some((host, port, path)) = &r.location {
        assert_eq!(*host, IpAddr::V4(PORTMAP_GW));
        assert!(path.starts_with('/'), "{path}");
        let again = format!("location: http://{host}:{port}{path}\r\n");
        let back = evio_agent::upnp::read_gateway_bytes(PORTMAP_GW, &again, b"");
        assert_eq!(back.location.as_ref(), Some(&(*host, *port, path.clone())));
    }
    if let Some((_, host, _, path)) = &r.control {
        assert_eq!(*host, IpAddr::V4(PORTMAP_GW));
        assert!(path.starts_with('/'), "{path}");
    }
    if let Some(ip) = r.external {
        assert!(evio_overlay::portmap::usable(ip), "{ip}");
    }
    if let Ok(body) = &r.body {
        // Lossy UTF-8 may grow each bad byte to three.
        assert!(body.len() <= answer.len() * 3, "{} > {}", body.len(), answer.len());
    }
}
