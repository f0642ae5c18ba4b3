#!/usr/bin/env bash
# The README's main command: on a fresh Debian machine (as root), installs
# what is missing, builds the plugin, evio-node and the simulator, and brings
# up a simulated cluster on this machine: one network namespace with its own
# Open vSwitch per node, pods attached by the real `evio` plugin, subnets from
# the real `evio-node config-gen`. It prints the nodes, pods and a pod-to-pod
# reachability matrix, then tears everything down (also on Ctrl-C).
#
#   scripts/cluster.sh [--nodes N] [--pods M] [--bridge-type ovs|linux] [--keep]
#
# Everything it creates lives in namespaces and temp dirs of its own; the
# machine's root namespace is not touched.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/cluster.sh: creating network namespaces needs root" >&2
  exit 1
fi

bash .ci/install-deps
cargo build --release -p evio-plugin -p evio-node -p evio-sim
# exec: Ctrl-C and SIGTERM reach evio-sim directly, which then tears down.
exec target/release/evio-sim up \
  --evio target/release/evio \
  --evio-node target/release/evio-node \
  "$@"
