//! The CNI protocol as the spec (1.1.0) and its reference library define it:
//! VERSION, decoding, version negotiation, environment and name validation,
//! and the error codes. Every refused invocation must leave the node as it
//! was. These do not depend on the backend, so they run on the Linux bridge.
// A test that unwraps fails loudly, which is what a test should do.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::common;

use common::{Backend, Fixture};
use evio_testkit::plugin::{container_id, Pod, SUPPORTED_VERSIONS};
use serde_json::json;

fn fixture() -> Fixture {
    Fixture::new(Backend::Linux)
}

/// The six variables of an ADD for `pod`, as (name, value).
fn add_env(f: &Fixture, pod: &Pod) -> Vec<(&'static str, String)> {
    vec![
        ("CNI_COMMAND", "ADD".to_string()),
        ("CNI_CONTAINERID", pod.id.clone()),
        ("CNI_NETNS", pod.path().display().to_string()),
        ("CNI_IFNAME", pod.ifname.clone()),
        ("CNI_ARGS", String::new()),
        ("CNI_PATH", f.cni().cni_path.clone()),
    ]
}

fn as_refs<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

#[test]
fn version_lists_every_supported_version() {
    let f = fixture();
    for v in ["0.3.1", "1.1.0"] {
        let out = f.cni().version(v);
        let res = out.expect_success("VERSION");
        let cv = res["cniVersion"]
            .as_str()
            .unwrap_or_else(|| panic!("VERSION output lacks cniVersion: {out}"));
        assert!(!cv.is_empty(), "{out}");
        let got: Vec<&str> = res["supportedVersions"]
            .as_array()
            .unwrap_or_else(|| panic!("VERSION output lacks supportedVersions: {out}"))
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        for want in SUPPORTED_VERSIONS {
            assert!(
                got.contains(&want),
                "{want} not in supportedVersions: {out}"
            );
        }
    }
}

#[test]
fn malformed_json_is_error_6_and_creates_nothing() {
    let f = fixture();
    let pod = Pod::new();
    let before = f.leaks(&[&pod.ns]);
    let env = add_env(&f, &pod);
    for bad in [&b"{not json"[..], b"", b"[1, 2", b"\"string\""] {
        f.cni().run_env(&as_refs(&env), bad).expect_error_code(
            &format!("ADD with stdin {:?}", String::from_utf8_lossy(bad)),
            6,
        );
    }
    before.assert_no_leaks(&f.leaks(&[&pod.ns]), "after undecodable ADDs");
}

#[test]
fn unknown_cni_version_is_error_1() {
    let f = fixture();
    let pod = Pod::new();
    let before = f.leaks(&[&pod.ns]);
    f.add(&pod, &f.conf().version("9.9.9"))
        .expect_error_code("ADD with cniVersion 9.9.9", 1);
    before.assert_no_leaks(&f.leaks(&[&pod.ns]), "after refused ADD");
}

#[test]
fn versions_before_0_3_0_are_error_1() {
    let f = fixture();
    for v in ["0.1.0", "0.2.0"] {
        let pod = Pod::new();
        f.add(&pod, &f.conf().version(v))
            .expect_error_code(&format!("ADD with cniVersion {v}"), 1);
        assert_eq!(pod.ns.links(), vec!["lo".to_string()]);
    }
}

#[test]
fn missing_env_vars_are_error_4() {
    let f = fixture();
    let pod = Pod::new();
    let before = f.leaks(&[&pod.ns]);
    let conf = f.conf().json().to_string();
    for missing in [
        "CNI_COMMAND",
        "CNI_CONTAINERID",
        "CNI_NETNS",
        "CNI_IFNAME",
        "CNI_PATH",
    ] {
        let full = add_env(&f, &pod);
        // Unset, as a hand-made invocation would do it.
        let unset: Vec<_> = full
            .iter()
            .filter(|(k, _)| *k != missing)
            .cloned()
            .collect();
        let out = f.cni().run_env(&as_refs(&unset), conf.as_bytes());
        // The spec's library, with no CNI_COMMAND at all, may instead print
        // an "about" line on stderr and exit 0 (for humans running the
        // binary); either way nothing may be done and stdout stays empty.
        if missing == "CNI_COMMAND" && out.success() {
            assert!(
                out.stdout.trim().is_empty(),
                "about mode prints to stderr: {out}"
            );
        } else {
            out.expect_error_code(&format!("ADD without {missing}"), 4);
        }
        // Empty, as libcni passes a value it does not have.
        let empty: Vec<_> = full
            .iter()
            .map(|(k, v)| {
                (
                    *k,
                    if *k == missing {
                        String::new()
                    } else {
                        v.clone()
                    },
                )
            })
            .collect();
        f.cni()
            .run_env(&as_refs(&empty), conf.as_bytes())
            .expect_error_code(&format!("ADD with empty {missing}"), 4);
    }
    before.assert_no_leaks(&f.leaks(&[&pod.ns]), "after refused ADDs");
}

#[test]
fn unknown_command_is_error_4() {
    let f = fixture();
    let pod = Pod::new();
    f.cni()
        .run(
            "FROB",
            &pod.id,
            Some(&pod.path()),
            "eth0",
            None,
            &f.conf().json(),
        )
        .expect_error_code("CNI_COMMAND=FROB", 4);
}

#[test]
fn invalid_ifnames_are_error_4() {
    let f = fixture();
    let pod = Pod::new();
    let before = f.leaks(&[&pod.ns]);
    let conf = f.conf().json();
    for bad in [
        "",
        "abcdefghijklmnop",
        ".",
        "..",
        "a/b",
        "a:b",
        "a b",
        "a\tb",
        "eth0\n",
    ] {
        f.cni()
            .run("ADD", &pod.id, Some(&pod.path()), bad, None, &conf)
            .expect_error_code(&format!("ADD with ifname {bad:?}"), 4);
    }
    before.assert_no_leaks(&f.leaks(&[&pod.ns]), "after refused ifnames");
}

#[test]
fn invalid_container_ids_are_error_4() {
    let f = fixture();
    let pod = Pod::new();
    let before = f.leaks(&[&pod.ns]);
    let conf = f.conf().json();
    for bad in [
        "", "-abc", ".abc", "_abc", "a b", "a/b", "a:b", "abc$", "ab\ncd",
    ] {
        f.cni()
            .run("ADD", bad, Some(&pod.path()), "eth0", None, &conf)
            .expect_error_code(&format!("ADD with container ID {bad:?}"), 4);
    }
    before.assert_no_leaks(&f.leaks(&[&pod.ns]), "after refused container IDs");
}

#[test]
fn valid_unusual_container_id_is_accepted() {
    let f = fixture();
    let pod = Pod {
        id: format!("A9_b.c-{}", container_id()),
        ..Pod::new()
    };
    f.add_ok(&pod, &f.conf());
}

#[test]
fn invalid_network_name_is_error_7() {
    let f = fixture();
    let pod = Pod::new();
    let before = f.leaks(&[&pod.ns]);
    for bad in ["bad name", "-bad", "a/b", ""] {
        f.add(&pod, &f.conf().name(bad))
            .expect_error_code(&format!("ADD with network name {bad:?}"), 7);
    }
    before.assert_no_leaks(&f.leaks(&[&pod.ns]), "after refused network names");
}

#[test]
fn check_below_0_4_0_is_error_1() {
    let f = fixture();
    let pod = Pod::new();
    let c = f.conf().version("0.3.1");
    let res = f.add_ok(&pod, &c);
    f.check(&pod, &c, &res)
        .expect_error_code("CHECK with cniVersion 0.3.1", 1);
}

#[test]
fn gc_and_status_below_1_1_0_are_error_1() {
    let f = fixture();
    let c = f.conf().version("1.0.0");
    f.gc(&c, "cni.dev/valid-attachments", &[])
        .expect_error_code("GC with cniVersion 1.0.0", 1);
    f.status(&c)
        .expect_error_code("STATUS with cniVersion 1.0.0", 1);
}

#[test]
fn missing_ipam_is_error_7() {
    let f = fixture();
    let pod = Pod::new();
    let before = f.leaks(&[&pod.ns]);
    f.add(&pod, &f.conf().remove("ipam"))
        .expect_error_code("ADD without ipam", 7);
    before.assert_no_leaks(&f.leaks(&[&pod.ns]), "after ADD without ipam");
}

#[test]
fn unknown_bridge_type_is_error_7_naming_key_and_value() {
    let f = fixture();
    let pod = Pod::new();
    let out = f.add(&pod, &f.conf().bridge_type("frobnicator"));
    out.expect_error_code("ADD with bridgeType frobnicator", 7);
    let text = out.error_text();
    assert!(
        text.contains("bridgetype") && text.contains("frobnicator"),
        "error must name the key and the value: {out}"
    );
}

#[test]
fn bridge_name_longer_than_15_bytes_is_error_7() {
    let f = fixture();
    let pod = Pod::new();
    let before = f.leaks(&[&pod.ns]);
    let out = f.add(&pod, &f.conf().bridge("abcdefghijklmnop"));
    out.expect_error_code("ADD with a 16-byte bridge name", 7);
    assert!(
        out.error_text().contains("abcdefghijklmnop"),
        "error must name the value: {out}"
    );
    before.assert_no_leaks(&f.leaks(&[&pod.ns]), "after refused bridge name");
}

/// Logging goes to stderr and the optional logFile, never to stdout (which
/// a runtime parses as one JSON document).
#[test]
fn log_file_is_written_and_stdout_holds_only_the_result() {
    let f = fixture();
    let pod = Pod::new();
    let log = f.dir.path().join("evio.log");
    let out = f.add(&pod, &f.conf().set("logFile", json!(log)));
    let res = out.expect_success("ADD with logFile");
    assert_eq!(
        res["cniVersion"].as_str(),
        Some(f.version.as_str()),
        "{out}"
    );
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !text.trim().is_empty(),
        "logFile {} is empty or missing",
        log.display()
    );
}
