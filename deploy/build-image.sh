#!/usr/bin/env bash
# Builds the evio-cni container image offline: FROM scratch plus the two
# binaries and the shared libraries they need. No registry is contacted
# (there is no base image to pull).
#
#   deploy/build-image.sh --build            build release binaries first
#   deploy/build-image.sh [--bin-dir DIR]    use existing binaries (default target/release)
#   options: --tag TAG (default $EVIO_IMAGE_REPO:<workspace version>, deploy/image.env)
#            --platforms amd64,arm64  one multi-arch manifest list named TAG, with
#                     one image per platform (tagged TAG-<arch>); without it, one
#                     plain image for the build host's architecture
#            --cross-bin-dir DIR  binaries of the other architecture (default
#                     target/<its rust target>/release, where --build puts them)
#            --binaries-only  with --build: build the binaries, assemble nothing
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
# evio-node stays dynamic (a static glibc still loads NSS modules for its
# etcd name lookups at run time, and only from the exact same glibc); the
# image carries its libraries: for the host
# architecture those `ldd` resolves, for a cross-built one those its ELF
# headers name, taken from Debian's cross sysroot /usr/<gnu triple>.
# Cross builds need the rustup target and gcc-<gnu triple> plus
# libc6-dev-<arch>-cross (.ci/install-deps installs them); no qemu.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
version=$(awk -F'"' '/^\[workspace.package\]/{p=1;next} /^\[/{p=0} p && /^version *=/{print $2; exit}' "$repo/Cargo.toml")
[ -n "$version" ] || { echo "build-image: no version in [workspace.package] of $repo/Cargo.toml" >&2; exit 1; }
# shellcheck source=image.env
. "$repo/deploy/image.env"

# Cargo's target directory, where --build puts binaries (honours
# CARGO_TARGET_DIR like cargo itself).
target_dir=${CARGO_TARGET_DIR:-$repo/target}
bin_dir="$target_dir/release"
cross_bin_dir=""
tag="$EVIO_IMAGE_REPO:$version"
build=0
binaries_only=0
platforms=""
context=""

usage() { sed -n '2,31p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --build) build=1; shift ;;
    --bin-dir) bin_dir=${2:?--bin-dir needs a directory}; shift 2 ;;
    --cross-bin-dir) cross_bin_dir=${2:?--cross-bin-dir needs a directory}; shift 2 ;;
    --tag) tag=${2:?--tag needs a value}; shift 2 ;;
    --platforms) platforms=${2:?--platforms needs a list such as amd64,arm64}; shift 2 ;;
    --binaries-only) binaries_only=1; shift ;;
    --context) context=${2:?--context needs a directory}; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "build-image: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done

# OCI architecture name -> Rust target and GNU triple (Debian's cross packages).
rust_target() { case "$1" in amd64) echo x86_64-unknown-linux-gnu ;; arm64) echo aarch64-unknown-linux-gnu ;; *) return 1 ;; esac; }
gnu_triple() { case "$1" in amd64) echo x86_64-linux-gnu ;; arm64) echo aarch64-linux-gnu ;; *) return 1 ;; esac; }
case "$(uname -m)" in
  x86_64) host_arch=amd64 ;;
  aarch64) host_arch=arm64 ;;
  *) echo "build-image: unsupported build host $(uname -m)" >&2; exit 1 ;;
esac
multi=1
if [ -z "$platforms" ]; then
  platforms=$host_arch
  multi=0
fi
IFS=, read -r -a archs <<<"$platforms"
for a in "${archs[@]}"; do
  rust_target "$a" >/dev/null || { echo "build-image: unknown platform '$a' (amd64, arm64)" >&2; exit 2; }
done
if [ "$binaries_only" = 1 ] && [ "$build" = 0 ]; then
  echo "build-image: --binaries-only needs --build" >&2; exit 2
fi

# Cross-compiles evio-node (dynamic) and the plugin (static) for $1 into
# target/<rust target>/release. `cargo rustc` passes crt-static to the
# plugin's final link only, so both binaries share one build of the
# dependencies instead of two builds with different RUSTFLAGS.
cross_build() {
  local arch=$1 rt gnu var
  rt=$(rust_target "$arch"); gnu=$(gnu_triple "$arch")
  command -v "$gnu-gcc" >/dev/null || { echo "build-image: $gnu-gcc is missing; install gcc-$gnu and libc6-dev-$arch-cross (.ci/install-deps)" >&2; return 1; }
  rustup target list --installed 2>/dev/null | grep -qx "$rt" || { echo "build-image: rust target $rt is missing; run 'rustup target add $rt'" >&2; return 1; }
  var=$(echo "$rt" | tr 'a-z-' 'A-Z_')
  (cd "$repo" && env "CARGO_TARGET_${var}_LINKER=$gnu-gcc" \
     "CC_${rt//-/_}=$gnu-gcc" "AR_${rt//-/_}=$gnu-ar" \
     cargo build --release --target "$rt" -p evio-node --bin evio-node &&
   env "CARGO_TARGET_${var}_LINKER=$gnu-gcc" \
     "CC_${rt//-/_}=$gnu-gcc" "AR_${rt//-/_}=$gnu-ar" \
     cargo rustc --release --target "$rt" -p evio-plugin --bin evio -- -C target-feature=+crt-static)
}

# Sets $plugin and $node for architecture $1.
binaries_for() {
  local arch=$1 rt dir
  if [ "$arch" = "$host_arch" ]; then
    if [ "$build" = 1 ]; then
      rt=$(rust_target "$arch")
      plugin="$target_dir/$rt/release/evio"
      node="$target_dir/release/evio-node"
    else
      plugin="$bin_dir/evio"
      node="$bin_dir/evio-node"
    fi
  else
    dir=${cross_bin_dir:-$target_dir/$(rust_target "$arch")/release}
    plugin="$dir/evio"
    node="$dir/evio-node"
  fi
  for b in "$plugin" "$node"; do
    if [ ! -x "$b" ]; then
      if [ "$arch" = "$host_arch" ]; then
        echo "build-image: $b is missing; build it with 'cargo build --release -p evio-plugin -p evio-node' or run this script with --build" >&2
      else
        echo "build-image: $b ($arch) is missing; run this script with --build --platforms $platforms" >&2
      fi
      return 1
    fi
  done
}

if [ "$build" = 1 ]; then
  for a in "${archs[@]}"; do
    if [ "$a" = "$host_arch" ]; then
      host_target=$(rust_target "$a")
      # --target keeps crt-static away from build scripts and proc macros,
      # which must stay dynamic to be loaded by rustc.
      (cd "$repo" && RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
        cargo build --release --target "$host_target" -p evio-plugin --bin evio)
      (cd "$repo" && cargo build --release -p evio-node --bin evio-node)
    else
      cross_build "$a"
    fi
  done
fi
if [ "$binaries_only" = 1 ]; then
  for a in "${archs[@]}"; do binaries_for "$a"; echo "build-image: $a: $node $plugin"; done
  exit 0
fi

if [ -z "$context" ]; then
  context=$(mktemp -d "${TMPDIR:-/tmp}/evio-image.XXXXXX")
  trap 'rm -rf "$context"' EXIT
else
  mkdir -p "$context"
fi

# Copies every library the host's dynamic loader resolves for $1 to the same
# absolute path in the image (following symlinks, so the image holds real
# files where the binary will look for them).
stage_libs_ldd() {
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

# The same for a binary of another architecture, which neither ldd nor the
# host's loader can inspect: the interpreter and the NEEDED entries from its
# ELF headers (and theirs, transitively), looked up in Debian's cross sysroot
# /usr/<gnu>/lib, placed where that loader searches by default in the image:
# the interpreter at its absolute path, the rest in /lib/<gnu>.
stage_libs_sysroot() {
  local bin=$1 gnu=$2 sysroot="/usr/$2" interp queue f lib src
  command -v "$gnu-readelf" >/dev/null || { echo "build-image: $gnu-readelf is missing; install binutils-$gnu (.ci/install-deps)" >&2; return 1; }
  interp=$("$gnu-readelf" -lW "$bin" | sed -n 's/.*Requesting program interpreter: \(.*\)\]$/\1/p')
  [ -n "$interp" ] || return 0 # statically linked
  src="$sysroot/lib/$(basename "$interp")"
  [ -e "$src" ] || { echo "build-image: $bin: interpreter $interp not in $sysroot/lib" >&2; return 1; }
  [ -e "$rootfs$interp" ] || install -D -m 0755 "$(readlink -f "$src")" "$rootfs$interp"
  queue=("$bin")
  while [ "${#queue[@]}" -gt 0 ]; do
    f=${queue[0]}; queue=("${queue[@]:1}")
    for lib in $("$gnu-readelf" -dW "$f" | sed -n 's/.*(NEEDED).*Shared library: \[\(.*\)\]$/\1/p'); do
      [ "$lib" != "$(basename "$interp")" ] || continue
      [ ! -e "$rootfs/lib/$gnu/$lib" ] || continue
      src="$sysroot/lib/$lib"
      [ -e "$src" ] || { echo "build-image: $f needs $lib, not found in $sysroot/lib (libc6-dev-*-cross installed?)" >&2; return 1; }
      install -D -m 0755 "$(readlink -f "$src")" "$rootfs/lib/$gnu/$lib"
      queue+=("$src")
    done
  done
}

# Stages $context/<arch>/rootfs for architecture $1.
stage() {
  local arch=$1 glibc
  binaries_for "$arch"
  rootfs="$context/$arch/rootfs"
  rm -rf "$rootfs"
  install -D -m 0755 "$node" "$rootfs/usr/local/bin/evio-node"
  install -D -m 0755 "$plugin" "$rootfs/opt/evio/cni-bin/evio"
  if [ "$arch" = "$host_arch" ]; then
    stage_libs_ldd "$node"
    stage_libs_ldd "$plugin"
    if ldd "$plugin" >/dev/null 2>&1 && ! ldd "$plugin" 2>&1 | grep -q "statically linked"; then
      glibc=$(grep -ao 'GLIBC_2\.[0-9.]*' "$plugin" | sort -uV | tail -n 1 || true)
      echo "build-image: warning: $plugin is dynamically linked; on the hosts it needs ${glibc:-glibc} or newer (use --build for a static plugin)" >&2
    fi
  else
    stage_libs_sysroot "$node" "$(gnu_triple "$arch")"
    stage_libs_sysroot "$plugin" "$(gnu_triple "$arch")"
    if "$(gnu_triple "$arch")-readelf" -lW "$plugin" | grep -q 'program interpreter'; then
      echo "build-image: warning: the $arch plugin $plugin is dynamically linked; use --build for a static one" >&2
    fi
  fi
  mkdir -p "$rootfs/etc"
  printf 'hosts: files dns\n' >"$rootfs/etc/nsswitch.conf"
  cp "$repo/deploy/Containerfile" "$context/$arch/Containerfile"
}

read -r -a podman_opts <<<"${PODMAN_OPTS:-}"
pm() { "${PODMAN:-podman}" "${podman_opts[@]}" "$@"; }

if [ "$multi" = 0 ]; then
  stage "$host_arch"
  pm build --pull=never --layers=false \
    --build-arg "VERSION=$version" -f "$context/$host_arch/Containerfile" -t "$tag" "$context/$host_arch"
  echo "build-image: built $tag"
  exit 0
fi

for a in "${archs[@]}"; do stage "$a"; done
# A rebuild replaces the list: `manifest add` to an old one would keep the
# previous build's images in it next to the new ones.
# A plain image of that name (an earlier single-platform build) only loses
# the name, so the list can take it.
if pm manifest exists "$tag" 2>/dev/null; then
  pm manifest rm "$tag" >/dev/null
elif pm image exists "$tag" 2>/dev/null; then
  pm untag "$tag" "$tag"
fi
pm manifest create "$tag" >/dev/null
for a in "${archs[@]}"; do
  # --platform only labels the image (FROM scratch, no RUN step): no qemu.
  pm build --pull=never --layers=false --platform "linux/$a" \
    --build-arg "VERSION=$version" -f "$context/$a/Containerfile" -t "$tag-$a" "$context/$a"
  pm manifest add "$tag" "containers-storage:$tag-$a" >/dev/null
done
echo "build-image: built manifest list $tag ($platforms; images $tag-<arch>)"
