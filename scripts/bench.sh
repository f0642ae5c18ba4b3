#!/usr/bin/env bash
# The benchmark: evio against the reference CNI plugins (Debian's
# containernetworking-plugins bridge + host-local), on this machine, in one
# run, and the overlay agent against boringtun, kernel VXLAN and a plain
# link. Prints markdown tables and writes them, with a description of the
# machine, into docs/benchmarks.md (between its generated-part markers; the
# hand-written findings around them are kept).
#
#   scripts/bench.sh                 # full run (a few minutes)
#   scripts/bench.sh --quick         # smoke run
#   scripts/bench.sh --only latency  # one section: latency, alloc, datapath, footprint, overlay, services
#   scripts/bench.sh --help          # every option
#
# Needs root: it creates network namespaces (and configures nothing outside
# them). Exits non-zero only if a run failed, never because of a figure.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/bench.sh: the benchmark creates network namespaces: run as root" >&2
  exit 1
fi

bash .ci/install-deps
# The overlay section compares with boringtun (configured with `wg`): only
# the benchmark needs them, CI does not (its quick run skips that column).
if ! command -v wg >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends wireguard-tools \
    || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends wireguard-tools; }
fi
if ! command -v boringtun-cli >/dev/null && [ ! -x "${CARGO_HOME:-$HOME/.cargo}/bin/boringtun-cli" ]; then
  cargo install boringtun-cli --locked
fi
cargo build --release -p evio-plugin -p evio-node -p evio-bench
out=(--output docs/benchmarks.md)
for a in "$@"; do
  case "$a" in --quick|--only|--only=*) out=() ;; esac
done
exec target/release/evio-bench "${out[@]}" "$@"
