#!/usr/bin/env bash
# Runs every check and test of the workspace: formatting, lints, unit tests
# and the integration tests that start real OVS, etcd, host-local and podman
# inside network namespaces they create (never the root namespace).
# Needs root (network namespaces) and the packages of .ci/install-deps.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/test.sh: the integration tests create network namespaces: run as root" >&2
  exit 1
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --release -- -D warnings
# A dependency no source uses is compile time and attack surface for nothing.
cargo machete
# Release: the same build serves the tests, the e2e binaries they exec and
# the benchmark. Two test threads per binary match the 2-core target machine.
cargo test --workspace --release -- --test-threads=2
# Parsers of outside input: every target on its seeds, its saved corpus and
# 3000 mutations, on stable and the workspace's build (docs/fuzzing.md).
# Coverage-guided libFuzzer rebuilds the whole dependency tree instrumented
# (minutes of CI for seconds of fuzzing): only when EVIO_FUZZ_SECS asks.
if [ -n "${EVIO_FUZZ_SECS:-}" ]; then
  fuzz/run.sh ci "$EVIO_FUZZ_SECS"
else
  fuzz/run.sh smoke
fi
