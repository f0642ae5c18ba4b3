//! Test-only package: the tests in `tests/` check the deployment artefacts
//! in `deploy/` (Kubernetes manifests, Containerfile, image build script).
//! There is deliberately no code here.
// Test support: a harness that unwraps fails the test that called it, loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
