#!/usr/bin/env bash
# containerd drives evio the way a Kubernetes node does, for a look by hand:
# runs the CRI end-to-end test (crates/sim/tests/containerd.rs) for one
# bridge type with its progress on the terminal. Once the first three pod
# sandboxes are up (two started at once, one with a host port), it prints
# where everything is (node netns, containerd socket and log, each
# sandbox's netns and IP) and waits for Enter (at most 10 minutes) while you
# look around with nsenter, ip, ping or `ctr`; then it goes on (stop,
# remove, 20 sandboxes, a containerd restart) and tears everything down.
#
#   scripts/containerd-demo.sh [ovs|linux]      # default: ovs
#
# containerd runs inside the simulated node's netns with its own root,
# state, socket and config under a temp dir; nothing touches the machine's
# root namespace. Needs root and the packages of .ci/install-deps.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/containerd-demo.sh: creating network namespaces needs root" >&2
  exit 1
fi
case "${1:-ovs}" in
  ovs) test=containerd_cri_on_ovs ;;
  linux) test=containerd_cri_on_linux_bridge ;;
  *) echo "usage: $0 [ovs|linux]" >&2; exit 2 ;;
esac

bash .ci/install-deps
# The test execs the plugin and evio-node of the same profile.
cargo build --release -p evio-plugin -p evio-node
EVIO_CONTAINERD_DEMO=1 exec cargo test --release -p evio-sim --test containerd -- \
  --exact "$test" --nocapture
