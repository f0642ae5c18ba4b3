//! Shared by the evio-sim integration tests: where the binaries under test
//! are.

use std::path::PathBuf;

use evio_testkit::cluster::{profile_dir_of_current_exe, ClusterOpts};

/// `evio` and `evio-node` of the current cargo profile, next to the test
/// executable's `deps/` dir. `cargo test --workspace` builds them (they are
/// bins of packages with integration tests); `cargo test -p evio-sim` alone
/// does not.
pub fn bins() -> (PathBuf, PathBuf) {
    let dir = profile_dir_of_current_exe()
        .unwrap_or_else(|| panic!("cannot locate the test executable's target dir"));
    let evio = dir.join("evio");
    let node = dir.join("evio-node");
    for b in [&evio, &node] {
        assert!(
            b.is_file(),
            "{} is missing: build it for this profile first, e.g. \
             `cargo build -p evio-plugin -p evio-node` (add --release for release tests), \
             or run `cargo test --workspace`",
            b.display()
        );
    }
    (evio, node)
}

// Not every test binary that includes this module builds a cluster itself.
#[allow(dead_code)]
pub fn opts() -> ClusterOpts {
    let (evio, node) = bins();
    ClusterOpts::new(evio, node)
}
