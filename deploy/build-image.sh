#!/usr/bin/env bash
# Builds the evio-cni container image offline: FROM scratch plus the two
# binaries and the shared libraries `ldd` says they need. No registry is
# contacted (there is no base image to pull).
#
#   deploy/build-image.sh --build            build release binaries first
#   deploy/build-image.sh [--bin-dir DIR]    use existing binaries (default target/release)
#   options: --tag TAG (default localhost/evio-cni:<workspace version>)
#            --context DIR (stage there and keep it; default: a temp dir, removed)
#
# Environment: PODMAN (default podman) and PODMAN_OPTS (global podman options,
# whitespace-separated, e.g. "--root DIR --runroot DIR") so callers such as the
# tests can build into private storage.
#
# The plugin is executed by the container runtime on the HOST after
# install-cni copies it there, so it must not depend on the host's libraries:
# --build links it statically (glibc, crt-static). With --bin-dir a
# dynamically linked plugin is accepted with a warning naming the glibc it needs.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
version=$(awk -F'"' '/^\[workspace.package\]/{p=1;next} /^\[/{p=0} p && /^version *=/{print $2; exit}' "$repo/Cargo.toml")
[ -n "$version" ] || { echo "build-image: no version in [workspace.package] of $repo/Cargo.toml" >&2; exit 1; }

bin_dir="$repo/target/release"
tag="localhost/evio-cni:$version"
build=0
context=""

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --build) build=1; shift ;;
    --bin-dir) bin_dir=${2:?--bin-dir needs a directory}; shift 2 ;;
    --tag) tag=${2:?--tag needs a value}; shift 2 ;;
    --context) context=${2:?--context needs a directory}; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "build-image: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done

if [ "$build" = 1 ]; then
  host_target=$(rustc -vV | sed -n 's/^host: //p')
  # --target keeps crt-static away from build scripts and proc macros, which
  # must stay dynamic to be loaded by rustc.
  (cd "$repo" && RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
    cargo build --release --target "$host_target" -p evio-plugin --bin evio)
  (cd "$repo" && cargo build --release -p evio-node --bin evio-node)
  plugin="$repo/target/$host_target/release/evio"
  node="$repo/target/release/evio-node"
else
  plugin="$bin_dir/evio"
  node="$bin_dir/evio-node"
fi
for b in "$plugin" "$node"; do
  if [ ! -x "$b" ]; then
    echo "build-image: $b is missing; build it with 'cargo build --release -p evio-plugin -p evio-node' or run this script with --build" >&2
    exit 1
  fi
done

if [ -z "$context" ]; then
  context=$(mktemp -d "${TMPDIR:-/tmp}/evio-image.XXXXXX")
  trap 'rm -rf "$context"' EXIT
else
  rm -rf "$context/rootfs"
  mkdir -p "$context"
fi
rootfs="$context/rootfs"

install -D -m 0755 "$node" "$rootfs/usr/local/bin/evio-node"
install -D -m 0755 "$plugin" "$rootfs/opt/evio/cni-bin/evio"

# Copies every library the dynamic loader resolves for $1 to the same absolute
# path in the image (following symlinks, so the image holds real files where
# the binary will look for them).
stage_libs() {
  local bin=$1 out line path
  if ! out=$(ldd "$bin" 2>&1); then
    case "$out" in
      *"not a dynamic executable"*|*"statically linked"*) return 0 ;;
      *) echo "build-image: ldd $bin failed: $out" >&2; return 1 ;;
    esac
  fi
  case "$out" in *"statically linked"*) return 0 ;; esac
  if grep -q "not found" <<<"$out"; then
    echo "build-image: $bin needs libraries that are not installed:" >&2
    grep "not found" <<<"$out" >&2
    return 1
  fi
  while read -r line; do
    case "$line" in
      *"=> /"*) path=${line#*=> }; path=${path%% (*} ;;
      /*) path=${line%% (*} ;;
      *) continue ;; # linux-vdso: provided by the kernel
    esac
    [ -e "$rootfs$path" ] || install -D -m 0755 "$(readlink -f "$path")" "$rootfs$path"
  done <<<"$out"
}
stage_libs "$node"
stage_libs "$plugin"

if ldd "$plugin" >/dev/null 2>&1 && ! ldd "$plugin" 2>&1 | grep -q "statically linked"; then
  glibc=$(grep -ao 'GLIBC_2\.[0-9.]*' "$plugin" | sort -uV | tail -n 1 || true)
  echo "build-image: warning: $plugin is dynamically linked; on the hosts it needs ${glibc:-glibc} or newer (use --build for a static plugin)" >&2
fi

mkdir -p "$rootfs/etc"
printf 'hosts: files dns\n' >"$rootfs/etc/nsswitch.conf"
cp "$repo/deploy/Containerfile" "$context/Containerfile"

read -r -a podman_opts <<<"${PODMAN_OPTS:-}"
"${PODMAN:-podman}" "${podman_opts[@]}" build --pull=never --layers=false \
  --build-arg "VERSION=$version" -f "$context/Containerfile" -t "$tag" "$context"
echo "build-image: built $tag"
