//! Crash consistency of ADD: the plugin is SIGKILLed at random moments of
//! ADD, over and over, on both backends. Then the test does what a runtime
//! does after a failed ADD — DEL (some of them after the pod's netns is
//! already gone), or nothing at all for a third of them (a runtime that
//! lost track, e.g. restarted: GC alone must clean up, veths left untagged
//! by a kill right after their creation included) — then GC with the
//! attachments still valid, and checks that exactly the live pods' veths,
//! ports, addresses and masquerade state remain: the doctor (evio-doctor)
//! as leak detector must find nothing at all, plus direct checks; and that
//! new pods still work.
//!
//! Two kinds of kill: the whole process group (a node crash or an OOM kill
//! of the runtime's call) and `evio` alone. The IPAM delegate runs in a
//! process group of its own (so that a timeout can kill it with its
//! children) and dies with evio either way (PR_SET_PDEATHSIG); host-local
//! killed mid-write leaves an empty file, which GC releases. The RNG is
//! seeded; the seed is printed and `EVIO_CRASH_SEED` replays a run.
// A test that unwraps fails loudly, which is what a test should do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Stdio};
use std::sync::Once;
use std::time::{Duration, Instant};

use common::{plugin_bin, pod_ip, write_conflist, Backend, Fixture};
use evio_doctor::{AttachmentId, Options, Report};
use evio_plugin::naming::host_veth_name;
use evio_testkit::plugin::{nft_ruleset, ping, Pod, GATEWAY4, POD_CIDR4, RUNTIME_PATH};
use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use serde_json::Value;

/// Crash rounds per backend.
const ROUNDS: usize = 40;
/// Pods added (successfully) before the crash rounds, and kept. The first
/// also creates the bridge, so only the later ones time a typical ADD.
const LIVE_BEFORE: usize = 4;
/// Floor of the kill window. The window itself is the fastest ADD measured
/// on this node right before the rounds (release and debug builds, a quiet
/// or a loaded machine differ by 5×): kills then land inside ADD, at every
/// step of it, instead of after it has finished. A window from the slowest
/// ADD made the test flaky once ADD got faster: too many rounds finished
/// before the kill.
const MIN_WINDOW: Duration = Duration::from_millis(2);
/// Bound for an orphaned delegate to finish after `evio` was killed.
const ORPHAN_TIMEOUT: Duration = Duration::from_secs(10);

/// splitmix64: a tiny seeded generator, so a failing run can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

fn seed(backend: Backend) -> u64 {
    let s = std::env::var("EVIO_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(42)
        });
    eprintln!("crash test {backend:?}: seed {s} (replay with EVIO_CRASH_SEED={s})");
    s
}

/// Orphans of a killed `evio` (its IPAM delegate, nft) are re-parented to
/// this process instead of PID 1, so the test can wait for them to finish.
fn become_subreaper() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: plain prctl with integer arguments.
        let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        assert_eq!(rc, 0, "prctl(PR_SET_CHILD_SUBREAPER)");
    });
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kill {
    /// The plugin and everything it started.
    Group,
    /// Only the plugin; its children finish on their own.
    PluginOnly,
}

#[derive(Debug)]
enum Outcome {
    /// The ADD ended before the kill landed, with this exit code and stdout.
    Finished(i32, String),
    Killed,
}

/// Starts ADD of `pod` as the runtime would (node netns, cleared env, config
/// on stdin), in its own process group.
fn spawn_add(f: &Fixture, pod: &Pod, config: &Value) -> Child {
    let bin = plugin_bin().display().to_string();
    let cni_path = f.cni().cni_path;
    let mut cmd = f.node.command(&[&bin]);
    cmd.env_clear()
        .env("PATH", RUNTIME_PATH)
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", &pod.id)
        .env("CNI_NETNS", pod.path())
        .env("CNI_IFNAME", &pod.ifname)
        .env("CNI_ARGS", pod.k8s_args())
        .env("CNI_PATH", cni_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0);
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {bin}: {e}"));
    // A config is far below the pipe buffer: this write cannot block.
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(config.to_string().as_bytes());
    }
    child
}

/// ADD that is SIGKILLed after `delay` unless it finished first.
fn add_and_kill(f: &Fixture, pod: &Pod, config: &Value, delay: Duration, how: Kill) -> Outcome {
    let mut child = spawn_add(f, pod, config);
    let pid = Pid::from_raw(child.id() as i32);
    std::thread::sleep(delay);
    if matches!(child.try_wait(), Ok(None)) {
        let _ = match how {
            Kill::Group => killpg(pid, Signal::SIGKILL),
            Kill::PluginOnly => kill(pid, Signal::SIGKILL),
        };
    }
    let status = child
        .wait()
        .unwrap_or_else(|e| panic!("wait for the plugin: {e}"));
    // What is left of the group (an orphaned delegate) finishes on its own;
    // the group id stays valid until its last member is reaped here.
    reap_group(pid);
    if status.signal() == Some(libc::SIGKILL) {
        return Outcome::Killed;
    }
    let mut out = String::new();
    if let Some(mut s) = child.stdout.take() {
        use std::io::Read;
        let _ = s.read_to_string(&mut out);
    }
    Outcome::Finished(status.code().unwrap_or(-1), out)
}

/// Waits (bounded) for every remaining process of group `pgid` to exit and
/// reaps them; SIGKILLs the group if they outlive the bound.
fn reap_group(pgid: Pid) {
    let deadline = Instant::now() + ORPHAN_TIMEOUT;
    let group = Pid::from_raw(-pgid.as_raw());
    loop {
        match waitpid(group, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {
                if Instant::now() >= deadline {
                    let _ = killpg(pgid, Signal::SIGKILL);
                    panic!("an orphan of the killed plugin ran for more than {ORPHAN_TIMEOUT:?}");
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok(_) => {}
            // ECHILD: nothing of the group is left.
            Err(_) => return,
        }
    }
}

/// The doctor's report on the node, in the node's netns.
fn doctor(f: &Fixture, conf_dir: &std::path::Path, valid: &BTreeSet<AttachmentId>) -> Report {
    let ns = evio_net::NetnsFd::open(&f.node.path()).unwrap_or_else(|e| panic!("{e}"));
    let opts = Options {
        valid: Some(valid.clone()),
        store: None,
    };
    let dir = conf_dir.to_path_buf();
    evio_net::run_in_netns(&ns, move || evio_doctor::examine(&dir, &opts))
        .unwrap_or_else(|e| panic!("enter node netns: {e}"))
        .unwrap_or_else(|e| panic!("doctor: {e}"))
}

fn ev_links(f: &Fixture) -> BTreeSet<String> {
    f.node
        .links()
        .into_iter()
        .filter(|l| l.len() == 15 && l.starts_with("ev"))
        .collect()
}

/// Exactly the live attachments hold state: checked by the doctor and by
/// looking at each kind of state directly.
fn assert_exactly(f: &Fixture, conf_dir: &std::path::Path, live: &[&Pod], masq: bool, what: &str) {
    let valid: BTreeSet<AttachmentId> = live
        .iter()
        .map(|p| (p.id.clone(), p.ifname.clone()))
        .collect();
    let report = doctor(f, conf_dir, &valid);
    assert!(report.is_clean(), "{what}: doctor:\n{}", report.render());
    assert_eq!(
        report.attachment_ids(),
        valid,
        "{what}: doctor's attachments"
    );

    let veths: BTreeSet<String> = live
        .iter()
        .map(|p| host_veth_name(&p.id, &p.ifname))
        .collect();
    assert_eq!(ev_links(f), veths, "{what}: host veths in the node");
    let owners: BTreeSet<AttachmentId> = f.allocations().into_values().collect();
    assert_eq!(owners, valid, "{what}: host-local's allocations");
    assert_eq!(
        f.allocations().len(),
        live.len(),
        "{what}: one address per pod"
    );
    if let Some(ports) = f.ovs_ports() {
        assert_eq!(ports.list(), veths, "{what}: OVS ports");
    }
    let rules = nft_ruleset(&f.node);
    let chain = format!("masq-{}", f.net);
    if masq {
        assert!(
            rules.contains(&chain) && rules.contains(POD_CIDR4),
            "{what}: masquerade chain for {POD_CIDR4} missing:\n{rules}"
        );
    } else {
        assert!(
            !rules.contains(&chain),
            "{what}: masquerade chain left:\n{rules}"
        );
    }
}

fn crash_rounds(backend: Backend) {
    become_subreaper();
    let mut rng = Rng(seed(backend));
    let f = Fixture::new(backend);
    let c = f.conf().ip_masq(true);
    let config = c.json();
    let conf_dir = f.dir.path().join("net.d");
    write_conflist(&conf_dir, &config);

    let mut live: Vec<Pod> = Vec::new();
    let mut add_time = Duration::MAX;
    for i in 0..LIVE_BEFORE {
        let pod = Pod::new();
        let t = Instant::now();
        f.add_ok(&pod, &c);
        if i > 0 {
            add_time = add_time.min(t.elapsed());
        }
        live.push(pod);
    }
    let window = MIN_WINDOW.max(add_time);
    eprintln!("crash test {backend:?}: fastest ADD {add_time:?}, kill window {window:?}");

    let mut failed: Vec<Pod> = Vec::new();
    let (mut killed, mut finished) = (0, 0);
    let started = Instant::now();
    for round in 0..ROUNDS {
        let pod = Pod::new();
        let delay = Duration::from_micros(rng.below(window.as_micros() as u64));
        let how = if round % 3 == 2 {
            Kill::PluginOnly
        } else {
            Kill::Group
        };
        match add_and_kill(&f, &pod, &config, delay, how) {
            Outcome::Killed => {
                killed += 1;
                failed.push(pod);
            }
            Outcome::Finished(0, out) => {
                finished += 1;
                let res: Value = serde_json::from_str(out.trim())
                    .unwrap_or_else(|e| panic!("round {round}: ADD result not JSON ({e}): {out}"));
                assert!(res.get("ips").is_some(), "round {round}: {res}");
                live.push(pod);
            }
            Outcome::Finished(code, out) => {
                panic!("round {round}: ADD failed on its own (exit {code}) before the kill: {out}")
            }
        }
    }
    eprintln!(
        "crash test {backend:?}: {killed} ADDs killed, {finished} finished, in {:?}",
        started.elapsed()
    );
    assert!(
        killed >= ROUNDS / 2,
        "only {killed} of {ROUNDS} ADDs were killed: the kill window does not cover ADD"
    );

    // Before any cleanup the detector must see the debris of the killed
    // ADDs: otherwise a clean report at the end would prove nothing.
    let live_ids: BTreeSet<AttachmentId> = live
        .iter()
        .map(|p| (p.id.clone(), p.ifname.clone()))
        .collect();
    let debris = doctor(&f, &conf_dir, &live_ids);
    let mut kinds: std::collections::BTreeMap<&str, usize> = Default::default();
    for p in debris.problems() {
        *kinds.entry(p.kind.as_str()).or_default() += 1;
    }
    eprintln!("crash test {backend:?}: debris before cleanup: {kinds:?}");
    assert!(
        kinds.contains_key("stale-attachment"),
        "{killed} killed ADDs left nothing the doctor sees:\n{}",
        debris.render()
    );

    // The runtime's part: DEL a failed ADD, after the pod's netns is gone
    // or before; or, for every third one, nothing: those pods' netns stay
    // until GC has run, so that their host veths are GC's to remove.
    let mut forgotten: Vec<Pod> = Vec::new();
    for (i, pod) in failed.into_iter().enumerate() {
        if i % 3 == 2 {
            forgotten.push(pod);
            continue;
        }
        let Pod { ns, id, ifname } = pod;
        let path = ns.path();
        if i % 3 == 0 {
            drop(ns);
            let out = f.run("DEL", &id, Some(&path), &ifname, &config);
            out.expect_success(&format!("DEL of killed ADD {id} after its netns is gone"));
        } else {
            let out = f.run("DEL", &id, Some(&path), &ifname, &config);
            out.expect_success(&format!("DEL of killed ADD {id}"));
            drop(ns);
        }
    }
    let ids: Vec<(String, String)> = live
        .iter()
        .map(|p| (p.id.clone(), p.ifname.clone()))
        .collect();
    let refs: Vec<(&str, &str)> = ids.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    f.gc(&c, "cni.dev/valid-attachments", &refs)
        .expect_success("GC with the live attachments");
    for p in &forgotten {
        let name = host_veth_name(&p.id, &p.ifname);
        assert!(
            !f.node.has_link(&name),
            "GC left {name} of a killed ADD the runtime never deleted"
        );
    }
    drop(forgotten);
    // Deleted netns take their veths with them asynchronously.
    for name in ev_links(&f) {
        let is_live = live
            .iter()
            .any(|p| host_veth_name(&p.id, &p.ifname) == name);
        if !is_live {
            f.wait_link_gone(&name, Duration::from_secs(5));
        }
    }
    let live_refs: Vec<&Pod> = live.iter().collect();
    assert_exactly(&f, &conf_dir, &live_refs, true, "after the crash rounds");

    // Survivors still work, and so do new pods.
    for p in &live {
        assert!(ping(&p.ns, GATEWAY4), "live pod {} lost the gateway", p.id);
    }
    for _ in 0..2 {
        let pod = Pod::new();
        let res = f.add_ok(&pod, &c);
        assert!(ping(&pod.ns, GATEWAY4), "new pod cannot reach the gateway");
        let ip = pod_ip(&res, 4).to_string();
        assert!(ping(&live[0].ns, &ip), "an old pod cannot reach a new one");
        live.push(pod);
    }
    let live_refs: Vec<&Pod> = live.iter().collect();
    assert_exactly(&f, &conf_dir, &live_refs, true, "after new ADDs");

    // And everything goes away cleanly.
    for p in &live {
        f.del_ok(p, &c, None);
    }
    f.gc(&c, "cni.dev/valid-attachments", &[])
        .expect_success("GC with no attachment");
    assert_exactly(&f, &conf_dir, &[], false, "after DEL of every pod and GC");
}

#[test]
fn sigkill_during_add_leaves_nothing_linux_bridge() {
    crash_rounds(Backend::Linux);
}

#[test]
fn sigkill_during_add_leaves_nothing_ovs() {
    crash_rounds(Backend::Ovs);
}
