//! Faults under load on the OVS backend: ovs-vswitchd is SIGKILLed in the
//! middle of a churn of 50 pods (ADDs and DELs from two runtime workers)
//! and restarted seconds later. ADDs caught by the outage must fail cleanly
//! (a CNI error, everything rolled back), the runtime's DEL of them must
//! succeed, pods that existed before must keep reaching each other once
//! vswitchd is back, every ADD started after the restart must succeed, and
//! in the end exactly the live pods hold state (the doctor as leak detector
//! plus direct checks).
// A test that unwraps fails loudly, which is what a test should do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{pod_ip, write_conflist, Backend, Fixture};
use evio_doctor::{AttachmentId, Options};
use evio_plugin::naming::host_veth_name;
use evio_testkit::plugin::{ping, Leaks, Pod, GATEWAY4};
use serde_json::Value;

const PODS: usize = 50;
const WORKERS: usize = 2;
/// ADDs completed before vswitchd is killed.
const KILL_AFTER: usize = 10;
/// Longer than the plugin's 5 s wait for vswitchd, so that some ADDs run
/// into it and fail rather than just being slow.
const OUTAGE: Duration = Duration::from_secs(6);

/// What happened to one ADD of the churn.
struct Added {
    pod: Pod,
    started: Instant,
    result: Result<Value, (u64, String)>,
}

fn ping_within(from: &Pod, to: &str, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if ping(&from.ns, to) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
    }
}

#[test]
fn vswitchd_killed_and_restarted_during_pod_churn() {
    let mut f = Fixture::new(Backend::Ovs);
    let c = f.conf();
    let config = c.json();
    let ports = f
        .ovs_ports()
        .unwrap_or_else(|| panic!("OVS fixture without OVS"));
    let conf_dir = f.dir.path().join("net.d");
    write_conflist(&conf_dir, &config);
    // Taken out so that the chaos thread can kill and restart it while the
    // workers use the fixture; declared after `f`, so it stops first.
    let ovs = Mutex::new(f.ovs.take().unwrap_or_else(|| panic!("no OVS")));
    let f = f;

    // Two pods that live through the outage.
    let anchors = [Pod::new(), Pod::new()];
    let anchor_ips: Vec<String> = anchors
        .iter()
        .map(|p| pod_ip(&f.add_ok(p, &c), 4).to_string())
        .collect();
    assert!(
        ping(&anchors[0].ns, &anchor_ips[1]),
        "anchors before the fault"
    );

    let done = AtomicUsize::new(0);
    let restarted_at: Mutex<Option<Instant>> = Mutex::new(None);
    let outcomes: Mutex<Vec<Added>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for w in 0..WORKERS {
            let (f, c, done, outcomes) = (&f, &c, &done, &outcomes);
            s.spawn(move || {
                for i in 0..PODS / WORKERS {
                    let pod = Pod::new();
                    let started = Instant::now();
                    let out = f.add(&pod, c);
                    let result = if out.success() {
                        Ok(out.expect_success("ADD"))
                    } else {
                        let code = out.expect_error(&format!("ADD during the fault ({out})"));
                        Err((code, out.error_text()))
                    };
                    done.fetch_add(1, Ordering::SeqCst);
                    let ok = result.is_ok();
                    // Churn: every third pod goes away again at once.
                    if ok && (w + i) % 3 == 0 {
                        f.del_ok(&pod, c, None);
                        continue;
                    }
                    outcomes
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(Added {
                            pod,
                            started,
                            result,
                        });
                }
            });
        }
        // Chaos: kill vswitchd mid-churn, restart it after the outage.
        let deadline = Instant::now() + Duration::from_secs(60);
        while done.load(Ordering::SeqCst) < KILL_AFTER {
            assert!(Instant::now() < deadline, "the churn does not progress");
            std::thread::sleep(Duration::from_millis(5));
        }
        ovs.lock()
            .unwrap_or_else(|e| e.into_inner())
            .crash_vswitchd();
        std::thread::sleep(OUTAGE);
        ovs.lock()
            .unwrap_or_else(|e| e.into_inner())
            .start_vswitchd();
        *restarted_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        // Existing pods reach each other over OVS again without any ADD:
        // vswitchd re-reads its ports from the database.
        assert!(
            ping_within(&anchors[0], &anchor_ips[1], Duration::from_secs(10)),
            "pods that existed before the vswitchd restart cannot reach each other"
        );
    });

    let restarted = restarted_at
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .unwrap_or_else(|| panic!("vswitchd was never restarted"));
    let outcomes = outcomes.into_inner().unwrap_or_else(|e| e.into_inner());
    let mut live: Vec<Pod> = Vec::new();
    let mut failed = 0;
    for a in outcomes {
        match a.result {
            Ok(_) => live.push(a.pod),
            Err((code, text)) => {
                failed += 1;
                assert!(
                    a.started < restarted,
                    "an ADD started after the restart failed: code {code}: {text}"
                );
                assert!(
                    code == 11 || code == 101,
                    "ADD during the outage: code {code} is neither 11 (try again) nor 101 (switch): {text}"
                );
                // What a runtime does after a failed ADD.
                f.del_ok(&a.pod, &c, None);
            }
        }
    }
    eprintln!(
        "faults: {failed} ADDs failed during the outage, {} pods live",
        live.len()
    );
    assert!(
        failed > 0,
        "no ADD ran into the outage: the test proved nothing"
    );

    // Exactly the live pods (and the anchors) hold state.
    let mut valid: BTreeSet<AttachmentId> = live
        .iter()
        .chain(anchors.iter())
        .map(|p| (p.id.clone(), p.ifname.clone()))
        .collect();
    let node = evio_net::NetnsFd::open(&f.node.path()).unwrap_or_else(|e| panic!("{e}"));
    let doctor = |valid: &BTreeSet<AttachmentId>| {
        let opts = Options {
            valid: Some(valid.clone()),
            store: None,
        };
        let dir = conf_dir.clone();
        evio_net::run_in_netns(&node, move || evio_doctor::examine(&dir, &opts))
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap_or_else(|e| panic!("doctor: {e}"))
    };
    let report = doctor(&valid);
    assert!(report.is_clean(), "after the churn:\n{}", report.render());
    assert_eq!(report.attachment_ids(), valid);
    let veths: BTreeSet<String> = valid
        .iter()
        .map(|(id, ifname)| host_veth_name(id, ifname))
        .collect();
    assert_eq!(ports.list(), veths, "OVS ports after the churn");
    let owners: BTreeSet<AttachmentId> = f.allocations().into_values().collect();
    assert_eq!(owners, valid, "host-local's allocations after the churn");

    // New pods work: gateway, anchors, and a pod from before the restart.
    let pod = Pod::new();
    let before = Leaks::snapshot(&f.node, &[&pod.ns], &f.data_dir(), Some(&ports));
    let res = f.add_ok(&pod, &c);
    assert!(
        ping(&pod.ns, GATEWAY4),
        "a new pod cannot reach the gateway"
    );
    assert!(
        ping(&pod.ns, &anchor_ips[0]),
        "a new pod cannot reach an old one"
    );
    if let Some(p) = live.first() {
        assert!(
            ping(&p.ns, &pod_ip(&res, 4).to_string()),
            "a churn pod cannot reach the new pod"
        );
    }
    f.del_ok(&pod, &c, Some(&res));
    before.assert_no_leaks(
        &Leaks::snapshot(&f.node, &[&pod.ns], &f.data_dir(), Some(&ports)),
        "ADD and DEL after the restart",
    );

    for p in live.iter().chain(anchors.iter()) {
        f.del_ok(p, &c, None);
    }
    valid.clear();
    let report = doctor(&valid);
    assert!(
        report.is_clean(),
        "after DEL of everything:\n{}",
        report.render()
    );
    assert!(
        ports.list().is_empty(),
        "OVS ports left: {:?}",
        ports.list()
    );
    assert!(
        f.allocations().is_empty(),
        "addresses left: {:?}",
        f.allocations()
    );
}
