#!/usr/bin/env bash
# Fuzzing of evio's parsers of outside input (see docs/fuzzing.md).
#
#   fuzz/run.sh smoke             stable toolchain: every target on its seeds,
#                                 its saved corpus and 3000 mutations (~2 s)
#   fuzz/run.sh ci [SECS]         smoke, then SECS (default 3) of coverage-
#                                 guided libFuzzer per target
#   fuzz/run.sh run SECS [T...]   libFuzzer for SECS per target (all targets
#                                 by default); the corpus grows in
#                                 fuzz/corpus/T, crashes land in
#                                 fuzz/artifacts/T
#
# libFuzzer runs need cargo-fuzz (installed here on first use from
# crates.io) and nightly-only compiler flags: only the stable toolchain is
# installed, so RUSTC_BOOTSTRAP=1 unlocks them for this build alone. The
# targets are built with debug assertions (overflow checks) and without a
# sanitizer: the parsers are safe Rust, so a memory sanitizer would only
# slow the search down (EVIO_FUZZ_SANITIZER=address to use one anyway).
set -euo pipefail
cd "$(dirname "$0")"

TARGETS=(netconf cni_env cni_result node_netconf ovsdb_reply store_record overlay switch portmap upnp)
SANITIZER="${EVIO_FUZZ_SANITIZER:-none}"

smoke() {
  # The workspace's target dir: the dependencies are the workspace's own
  # (fuzz/Cargo.lock pins the same versions), so they are not rebuilt.
  CARGO_TARGET_DIR=../target cargo test --release -- --test-threads=2
}

ensure_cargo_fuzz() {
  if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz/run.sh: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
  fi
}

fuzz() {
  local secs="$1"
  shift
  local targets=("$@")
  [ "${#targets[@]}" -gt 0 ] || targets=("${TARGETS[@]}")
  ensure_cargo_fuzz
  export RUSTC_BOOTSTRAP=1
  cargo fuzz build -O -a -s "$SANITIZER"
  local failed=0
  for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    echo "== $t: ${secs}s" >&2
    # The first directory is where new inputs are saved; the seeds are
    # read-only inputs. -max_len lets the fuzzer grow past the seeds' sizes.
    if ! cargo fuzz run -O -a -s "$SANITIZER" "$t" "corpus/$t" "seeds/$t" -- \
      -max_total_time="$secs" -max_len=65536 -rss_limit_mb=2048 -print_final_stats=1 \
      2> >(grep -E '^(#[0-9]+.*DONE|stat::number_of_executed_units|stat::new_units_added|INFO: seed corpus|==[0-9]+==|SUMMARY|panicked|Test unit written)' >&2); then
      echo "fuzz/run.sh: $t FAILED (see fuzz/artifacts/$t)" >&2
      failed=1
    fi
  done
  return "$failed"
}

case "${1:-}" in
  smoke) smoke ;;
  ci) smoke && fuzz "${2:-3}" ;;
  run)
    [ $# -ge 2 ] || { echo "usage: fuzz/run.sh run SECS [TARGET...]" >&2; exit 2; }
    secs="$2"
    shift 2
    fuzz "$secs" "$@"
    ;;
  *)
    echo "usage: fuzz/run.sh smoke | ci [SECS] | run SECS [TARGET...]" >&2
    exit 2
    ;;
esac
