//! Test-only package: the tests in `tests/` check the deployment artefacts
//! in `deploy/` (Kubernetes manifests, Containerfile, image build script).
//! There is deliberately no code here.
