//! A cluster that fails half-way through set-up removes everything it had
//! built: pods DELeted through the plugin, OVS stopped, namespaces and temp
//! dirs gone. Its own test binary, because it points TMPDIR at a private dir
//! to see every temp dir the cluster creates.
// A test that unwraps fails loudly, which is what a test should do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use evio_testkit::cluster::{Cluster, ClusterError};

/// Names of namespaces this process created (`Netns` names carry the pid).
fn our_netns() -> Vec<String> {
    let marker = format!("{}x", std::process::id() % 100_000);
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap_or_else(|e| panic!("ip netns list: {e}"));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with("ev") && n.contains(&marker))
        .map(str::to_string)
        .collect()
}

/// Our child processes (OVS daemons are spawned as children), any state.
fn our_children() -> Vec<String> {
    evio_testkit::process::children()
        .into_iter()
        .map(|p| format!("{} ({}) {}", p.pid, p.comm, p.state))
        .collect()
}

#[test]
fn failed_set_up_tears_down_what_it_built() {
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let private_tmp = tmp.path().join("tmp");
    let work = tmp.path().join("work");
    for d in [&private_tmp, &work] {
        std::fs::create_dir_all(d).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
    }
    // Every temp dir of the cluster and of its OVS instances lands here.
    std::env::set_var("TMPDIR", &private_tmp);

    // A plugin wrapper that logs every command and fails the 4th ADD the
    // way a plugin fails, passing everything else to the real plugin.
    let (evio, _) = common::bins();
    let log = work.join("log");
    let count = work.join("count");
    let wrapper_dir = work.join("bin");
    std::fs::create_dir_all(&wrapper_dir).unwrap_or_else(|e| panic!("{e}"));
    let wrapper = wrapper_dir.join("evio");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\n\
             echo \"$CNI_COMMAND\" >> {log}\n\
             if [ \"$CNI_COMMAND\" = ADD ]; then\n\
               n=$(cat {count} 2>/dev/null || echo 0); echo $((n+1)) > {count}\n\
               if [ \"$n\" -ge 3 ]; then\n\
                 echo '{{\"cniVersion\":\"1.0.0\",\"code\":11,\"msg\":\"injected failure\"}}'; exit 1\n\
               fi\n\
             fi\n\
             exec {evio}\n",
            log = log.display(),
            count = count.display(),
            evio = evio.display()
        ),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("{e}"));

    let mut opts = common::opts();
    opts.evio_bin = wrapper;
    opts.nodes = 2;
    opts.pods_per_node = 2;
    let err = match Cluster::up(opts) {
        Ok(_) => panic!("set-up succeeded despite the injected ADD failure"),
        Err(e) => e,
    };
    assert!(
        matches!(&err, ClusterError::Step { what, detail }
            if what.contains("ADD of pod n1p1") && detail.contains("injected failure")),
        "{err}"
    );

    let calls = std::fs::read_to_string(&log).unwrap_or_default();
    let adds = calls.lines().filter(|l| *l == "ADD").count();
    let dels = calls.lines().filter(|l| *l == "DEL").count();
    assert_eq!((adds, dels), (4, 3), "the three pods made were DELeted");

    assert_eq!(our_netns(), Vec::<String>::new(), "namespaces left");
    assert_eq!(our_children(), Vec::<String>::new(), "processes left");
    let left: Vec<_> = std::fs::read_dir(&private_tmp)
        .unwrap_or_else(|e| panic!("{e}"))
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "temp dirs left: {left:?}");
    assert!(Path::new(&private_tmp).exists());
}
