#!/usr/bin/env bash
# The README's main command: on a fresh Debian machine (as root), installs
# what is missing (coturn among it), builds the plugin, evio-node and the
# simulator, and brings up a simulated cluster on this machine: nodes on a
# NAT lab (sites behind port-restricted cone, symmetric, full-cone, double
# and UDP-blocked NATs, a public node, and a home router running Debian's
# miniupnpd that grants port mappings over PCP/NAT-PMP/UPnP; coturn as
# STUN/TURN server in the lab's "internet"; the sites are
# `OverlayOpts::nat_lab()`'s: two symmetric sites and the public one also
# have the lab's IPv6 internet (2001:db8::/32, dual-stack), and a second
# STUN server lets a symmetric node know it is one, for birthday probing),
# each a network namespace with its own Open vSwitch,
# subnets from the real `evio-node config-gen`, the real `evio-node agent`
# joining the node bridges and hosts over encrypted tunnels, pods attached by
# the real `evio` plugin. It prints the nodes (site, NAT type, addresses),
# the pod reachability matrix, the node matrix with how each pair's path was
# made (peers --json's method: local, reflexive, learned, punched, mapped,
# predicted = direct; relay; and the underlay family) and its RTT, a count of pairs per method, and a Services row (kube-proxy's own rules in every
# node netns: each node's pod reaches a ClusterIP backed by a pod on another
# node, and dnsmasq behind a ClusterIP answers as the cluster DNS over UDP
# and TCP), then tears everything down (also on Ctrl-C).
#
#   scripts/cluster.sh [--no-nat] [--nodes N] [--pods M]
#                      [--bridge-type ovs|linux] [--store file|etcd] [--keep]
#                      [--kube-proxy iptables|nftables|none]
#   scripts/cluster.sh --plain-link      # the pre-overlay topology
#   scripts/cluster.sh --nodes 256       # > 32 nodes: the routed scale lab,
#                                        # sampled pairs (README)
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
