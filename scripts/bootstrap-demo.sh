#!/usr/bin/env bash
# The README's "Bootstrapping a cluster over the host overlay", run: a
# three-site cluster built in a NAT lab by executing the README's own
# commands, word for word, in the order the README gives them, then the
# backup and restore recipe of docs/operations.md ("Backing up the store").
#
#   scripts/bootstrap-demo.sh [--keep-logs]
#
# Needs root, the release binaries (cargo build --release -p evio-plugin -p
# evio-node --bins; EVIO_BIN_DIR=DIR for others) and the packages of
# .ci/install-deps; stops itself after BOOTSTRAP_TIMEOUT seconds (200).
#
# The lab (network namespaces of its own, removed on exit, also on failure
# or Ctrl-C; nothing in the machine's root namespace is touched):
#   internet   a bridge on 203.0.113.0/24 (a documentation range)
#   cloud      the public node, 203.0.113.10 on its interface (inbound
#              only the ports docs/operations.md lists for it): etcd for
#              evio (TLS, a user limited to /evio/) and coturn, the
#              control-plane node (kubeadm init), host address pinned to
#              10.10.0.1
#   home-a     behind a port-restricted cone NAT (router 203.0.113.11,
#              LAN 192.168.1.0/24)
#   home-b     behind a symmetric NAT (router 203.0.113.12, LAN
#              192.168.2.0/24): home-a <-> home-b can only be relayed
# Each node is a network namespace plus a mount namespace whose /etc, /var,
# /run, /opt and /usr/local are overlays of the machine's (writes go to a
# tmpfs of the node), and a UTS namespace with the node's hostname, so the
# README's `install ... /etc/evio/...` lines run as written, once per node.
#
# How the README's blocks are run: every fenced block in that section is
# tagged `sh lab=public|homes|all|skip`; this script runs each on the
# public node, the home nodes or all of them (public first), in document
# order, with `set -eu`, in the node's working directory (which
# holds `evio-node`, `cni-bin/evio`, `deploy/` and `Cargo.toml` as a
# checkout with the binaries built would). docs/operations.md's blocks
# are read the same way: "Ports" (the public node's firewall, before the
# README), "Backing up the store" and, of "Rotating keys and
# certificates", the one tagged lab=node (run on home-b). Each section's
# count of blocks per tag is pinned.
# Variables a block sets are kept for that node's later blocks. Three
# commands cannot be real here and are shell functions instead (said in
# the README too):
#   systemctl  no systemd in the namespaces: `enable --now U`, `start`,
#              `restart` run the unit's ExecStart (with its Environment=
#              and EnvironmentFile=) in the background and then its
#              ExecStartPost, as systemd would; a Type=notify unit counts
#              as started once it listens. The unit's sandbox settings,
#              User= and Restart= are not applied. `stop` sends SIGTERM.
#   kubeadm    no Kubernetes here: prints the exact command, addresses
#              filled in.
#   kubectl    no API server: prints the command; the next README block,
#              the DaemonSet's commands run by hand, stands in for it.
# Pods are then attached the way the kubelet's runtime would: the `evio`
# plugin from the conflist `config-gen` wrote, executed with the CNI
# environment, one pod per node; everything pings everything.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/bootstrap-demo.sh: creating network namespaces needs root" >&2
  exit 1
fi
keep_logs=0
case "${1:-}" in
  --keep-logs) keep_logs=1 ;;
  "") ;;
  *) echo "usage: $0 [--keep-logs]" >&2; exit 2 ;;
esac

bin=${EVIO_BIN_DIR:-$repo/target/release}
for b in evio evio-node; do
  [ -x "$bin/$b" ] || {
    echo "bootstrap-demo: $bin/$b missing: cargo build --release -p evio-plugin -p evio-node --bins" >&2
    exit 1
  }
done

started=$(date +%s)
lab=bsd$$
# starttime PID: field 22 of /proc/PID/stat (after the parenthesised name,
# which may hold spaces): with the PID, names one process for good.
starttime() {
  local s
  { read -r s < "/proc/$1/stat"; } 2>/dev/null || return 1
  s=${s##*) }
  set -- $s
  echo "${20}"
}
self_start=$(starttime $$)
work=$(mktemp -d /tmp/evio-bootstrap.XXXXXX)
namespaces=()

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
fail() { echo "bootstrap-demo: FAILED: $*" >&2; exit 1; }

# ---------------------------------------------------------------------------
# Teardown: every process in the lab's namespaces, then the namespaces. The
# nodes' mount namespaces (and their tmpfs) go with their last process.

cleanup() {
  local rc=$? ns pids i
  # A second Ctrl-C or TERM must not cut the teardown short.
  trap - EXIT
  trap '' INT TERM
  set +e
  [ -n "${watchdog:-}" ] && kill "$watchdog" 2>/dev/null
  if [ "$rc" -ne 0 ] && [ -d "$work/nodes" ]; then
    for f in "$work"/nodes/*/logs/*.log; do
      [ -s "$f" ] || continue
      echo "---- ${f#"$work"/nodes/} (last 25 lines)" >&2
      tail -n 25 "$f" >&2
    done
  fi
  for sig in TERM KILL; do
    for ns in "${namespaces[@]}"; do
      pids=$(ip netns pids "$ns" 2>/dev/null)
      [ -n "$pids" ] && kill "-$sig" $pids 2>/dev/null || true
    done
    for i in $(seq 50); do
      pids=""
      for ns in "${namespaces[@]}"; do pids+=$(ip netns pids "$ns" 2>/dev/null); done
      [ -z "$pids" ] && break
      sleep 0.1
    done
  done
  for ns in "${namespaces[@]}"; do ip netns del "$ns" 2>/dev/null; done
  if [ "$keep_logs" -eq 1 ]; then
    echo "logs kept in $work" >&2
  else
    # A process killed just now may still be closing its log there.
    rm -rf "$work" 2>/dev/null || { sleep 1; rm -rf "$work"; }
  fi
  echo "bootstrap-demo: lab removed; $(( $(date +%s) - started )) s in all" >&2
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
# Every step is bounded on its own; this bounds them all, and a caller's
# SIGKILL could not run the teardown, so the script stops itself first.
# Bash runs its TERM trap only once the foreground command ends, and one
# step can run a minute (a unit's ExecStartPost): the watchdog also stops
# the lab's own processes, those in the namespaces named $lab-*, so that
# step ends and the teardown runs in time.
limit=${BOOTSTRAP_TIMEOUT:-200}
(
  trap 'kill "$sleeper" 2>/dev/null; exit 0' TERM
  sleep "$limit" & sleeper=$!
  wait "$sleeper" || exit 0
  echo "bootstrap-demo: FAILED: $limit s limit reached" >&2
  # $$ may have ended and its PID gone to another process.
  [ "$(starttime $$)" = "$self_start" ] || exit 0
  kill -TERM $$
  for sig in TERM TERM KILL; do
    sleep 2
    for ns in $(ip netns list | awk -v p="$lab-" 'index($1, p) == 1 {print $1}'); do
      pids=$(ip netns pids "$ns" 2>/dev/null) || continue
      [ -n "$pids" ] && kill "-$sig" $pids 2>/dev/null || true
    done
  done
  exit 0
) &
watchdog=$!

# ---------------------------------------------------------------------------
# The README's blocks, extracted before anything is built, so a doc that
# lost its tags fails at once.

# extract FILE HEADING OUTDIR: every fenced block of the section under
# "## HEADING" as OUTDIR/NN.ROLE.sh (indentation of list items removed).
# Only ``` fences opening with bash or sh and a lab= tag are read; any
# other fence there (~~~, another language, no tag, no end) fails, so no
# block goes unrun unnoticed.
extract() {
  awk -v heading="## $2" -v out="$3" '
    function bad_line(why) { printf "line %d: %s\n", NR, why > "/dev/stderr"; bad = 1 }
    $0 == heading { in_sec = 1; found = 1; next }
    in_sec && !in_blk && /^## / { in_sec = 0 }
    !in_sec { next }
    /^ *~~~/ { bad_line("~~~ fence (use ``` with a lab= tag)"); next }
    !in_blk && /^ *```/ {
      ind = match($0, /[^ ]/) - 1
      tag = $0; sub(/^ *```/, "", tag)
      role = ""
      if (tag !~ /^(bash|sh)( |$)/) bad_line("fence \"" tag "\": a block must be ```bash or ```sh")
      if (match(tag, /lab=[a-z]+/)) role = substr(tag, RSTART + 4, RLENGTH - 4)
      if (role == "") bad_line("untagged block (tag it lab=public|homes|all|skip, or the role the script reads)")
      n++; in_blk = 1; file = sprintf("%s/%02d.%s.sh", out, n, role); printf "" > file
      next
    }
    in_blk && /^ *``` *$/ { in_blk = 0; close(file); next }
    in_blk && /^ *```/ { bad_line("fence inside a block"); next }
    in_blk { line = $0; if (substr(line, 1, ind) ~ /^ *$/) line = substr(line, ind + 1); print line >> file }
    END {
      if (!found) { printf "no section \"%s\"\n", heading > "/dev/stderr"; bad = 1 }
      if (in_blk) { printf "a block of the section has no closing fence\n" > "/dev/stderr"; bad = 1 }
      if (bad) exit 1
    }
  ' "$1"
}

# blocks DIR ROLE: how many blocks of DIR carry lab=ROLE.
blocks() { find "$1" -name "*.$2.sh" | wc -l; }

# shape DIR WHAT ROLE=N...: the section has exactly these blocks, so a doc
# that lost (or gained) steps cannot pass by running something else.
shape() {
  local dir=$1 what=$2 want total=0 n r
  shift 2
  for want in "$@"; do
    r=${want%=*}; n=$(blocks "$dir" "$r")
    [ "$n" -eq "${want#*=}" ] || fail "$what: $n blocks tagged lab=$r, expected ${want#*=}"
    total=$((total + n))
  done
  n=$(find "$dir" -name '*.sh' | wc -l)
  [ "$n" -eq "$total" ] || fail "$what: $n blocks, expected $total ($*)"
}

mkdir -p "$work/readme" "$work/ops" "$work/ports" "$work/rotate"
extract README.md "Bootstrapping a cluster over the host overlay" "$work/readme" ||
  fail "README.md: the bootstrap section's blocks must be tagged (above)"
extract docs/operations.md "Backing up the store" "$work/ops" ||
  fail "docs/operations.md: the backup section's blocks must be tagged (above)"
extract docs/operations.md "Ports" "$work/ports" ||
  fail "docs/operations.md: the Ports section's blocks must be tagged (above)"
extract docs/operations.md "Rotating keys and certificates" "$work/rotate" ||
  fail "docs/operations.md: the rotation section's blocks must be tagged (above)"
shape "$work/readme" "README bootstrap section" public=7 homes=1 all=5
shape "$work/ops" "operations.md backup section" public=2 all=1
shape "$work/ports" "operations.md Ports section" public=1
# The node-key rotation runs on one node (home-b); the others are shown,
# not run (the network key's and certificates' rounds need every node in
# turn and are covered by the agent's tests).
shape "$work/rotate" "operations.md rotation section" node=1 skip=2
n_readme=$(find "$work/readme" -name '*.sh' | wc -l)

# ---------------------------------------------------------------------------
# The lab's network.

nsx() { local ns=$1; shift; ip netns exec "$ns" "$@"; }
mkns() { ip netns add "$1"; namespaces+=("$1"); nsx "$1" ip link set lo up; }

# plug NS DEV PORT: a veth DEV in NS, its peer PORT on the internet bridge.
plug() {
  nsx "$lab-inet" ip link add "$3" type veth peer name "$2" netns "$1"
  nsx "$lab-inet" ip link set "$3" master inet0 up
}

# router NAME WAN LAN NAT: a home router, WAN on the internet, LAN bridge
# 192.168.LAN.1/24; NAT "masquerade" (port-restricted cone) or
# "masquerade fully-random" (symmetric); a stateful input firewall as home
# routers have (docs/natlab.md says why it matters for hole punching).
router() {
  local ns=$lab-$1
  mkns "$ns"
  plug "$ns" wan "w$1"
  nsx "$ns" ip addr add "$2/24" dev wan
  nsx "$ns" ip link set wan up
  nsx "$ns" ip link add lan0 type bridge
  nsx "$ns" ip addr add "192.168.$3.1/24" dev lan0
  nsx "$ns" ip link set lan0 up
  nsx "$ns" sysctl -qw net.ipv4.ip_forward=1
  nsx "$ns" nft -f - <<EOF
table ip natlab {
  chain postrouting { type nat hook postrouting priority srcnat; policy accept; oifname "wan" $4; }
  chain input {
    type filter hook input priority filter; policy accept;
    iifname "wan" ct state established,related accept
    iifname "wan" drop
  }
}
EOF
}

# node NAME: the node's netns (created by the caller) gets its mount and
# UTS namespaces: a holder process keeps them; every step enters all three.
node_up() {
  local name=$1 d=$work/nodes/$1
  mkdir -p "$d/fs" "$d/logs" "$d/units" "$d/cni-bin"
  # What a checkout gives: deploy/ (render.sh reads Cargo.toml's version).
  ln -s "$repo/deploy" "$d/deploy"
  ln -s "$repo/Cargo.toml" "$d/Cargo.toml"
  cp "$bin/evio-node" "$d/evio-node"
  cp "$bin/evio" "$d/cni-bin/evio"
  : > "$d/env"
  nsx "$lab-$name" unshare --mount --uts --propagation private -- bash -c '
    set -e
    hostname "$1"
    mount -t tmpfs -o mode=0755 "$4" "$2"
    for d in etc var run opt usr/local; do
      n=${d//\//_}
      mkdir -p "$2/$n.up" "$2/$n.work"
      mount -t overlay "$4" -o "lowerdir=/$d,upperdir=$2/$n.up,workdir=$2/$n.work" "/$d"
    done
    echo $$ > "$3.tmp" && mv "$3.tmp" "$3"
    exec sleep 3600' _ "$name" "$d/fs" "$d/holder.pid" "$lab-$name" > "$d/logs/holder.log" 2>&1 &
  for _ in $(seq 100); do
    [ -s "$d/holder.pid" ] && return 0
    sleep 0.05
  done
  fail "node $name: its namespaces did not come up: $(cat "$d/logs/holder.log")"
}

# ns_of PID NS: the inode of PID's namespace NS; fails if unreadable.
ns_of() {
  local l
  l=$(readlink "/proc/$1/ns/$2") && [ -n "$l" ] || return 1
  l=${l##*[}; echo "${l%]}"
}

# node_check NODE: every step enters the holder's namespaces, so they must
# be the node's own, or a step would write to the machine's /etc and run
# daemons in its namespace: its netns is /run/netns/$lab-NODE, its mount
# and UTS namespaces neither the machine's (PID 1's) nor this script's,
# and its /etc the overlay this script mounted there. Checked once per
# holder (its PID and start time recorded in ns-ok).
node_check() {
  local d=$work/nodes/$1 pid st ns mine want got
  pid=$(cat "$d/holder.pid") || fail "node $1: no holder"
  st=$(starttime "$pid") || fail "node $1: holder $pid is gone"
  if [ -s "$d/ns-ok" ] && [ "$(cat "$d/ns-ok")" = "$pid $st" ]; then return 0; fi
  want=$(stat -L -c %i "/run/netns/$lab-$1") || fail "node $1: no /run/netns/$lab-$1"
  got=$(ns_of "$pid" net) || fail "node $1: holder $pid: net namespace unreadable"
  [ "$got" = "$want" ] || fail "node $1: holder $pid is not in $lab-$1 ($got != $want)"
  for ns in mnt uts; do
    got=$(ns_of "$pid" $ns) || fail "node $1: holder $pid: $ns namespace unreadable"
    # PID 1's may be unreadable (a sandbox hides it): then this script's
    # alone, which must be readable.
    for mine in 1 $$; do
      if ! want=$(ns_of "$mine" $ns); then
        [ "$mine" = 1 ] && continue
        fail "node $1: $ns namespace of PID $mine unreadable"
      fi
      [ "$got" != "$want" ] || fail "node $1: holder $pid shares PID $mine's $ns namespace"
    done
  done
  got=$(nsenter -t "$pid" -m findmnt -no SOURCE /etc) || fail "node $1: findmnt /etc"
  [ "$got" = "$lab-$1" ] || fail "node $1: /etc is $got, not the node's overlay $lab-$1"
  echo "$pid $st" > "$d/ns-ok"
}

# on NODE CMD...: runs CMD inside the node (its netns, mount ns, hostname).
on() {
  local d=$work/nodes/$1
  node_check "$1"
  shift
  nsenter -t "$(cat "$d/holder.pid")" -n -m -u -- "$@"
}

say "NAT lab: internet 203.0.113.0/24, cloud (public), home-a (port-restricted cone NAT), home-b (symmetric NAT)"
mkns "$lab-inet"
nsx "$lab-inet" ip link add inet0 type bridge
nsx "$lab-inet" ip addr add 203.0.113.1/24 dev inet0
nsx "$lab-inet" ip link set inet0 up

mkns "$lab-cloud"
plug "$lab-cloud" eth0 pcloud
nsx "$lab-cloud" ip addr add 203.0.113.10/24 dev eth0
nsx "$lab-cloud" ip link set eth0 up
nsx "$lab-cloud" ip route add default via 203.0.113.1

router ra 203.0.113.11 1 "masquerade"
router rb 203.0.113.12 2 "masquerade fully-random"
for h in a:ra:1 b:rb:2; do
  IFS=: read -r n r k <<<"$h"
  mkns "$lab-home-$n"
  nsx "$lab-$r" ip link add "l$n" type veth peer name eth0 netns "$lab-home-$n"
  nsx "$lab-$r" ip link set "l$n" master lan0 up
  nsx "$lab-home-$n" ip addr add "192.168.$k.2/24" dev eth0
  nsx "$lab-home-$n" ip link set eth0 up
  nsx "$lab-home-$n" ip route add default via "192.168.$k.1"
done
nodes=(cloud home-a home-b)
for n in "${nodes[@]}"; do node_up "$n"; node_check "$n"; done

# ---------------------------------------------------------------------------
# What runs inside a node before each README block: the stand-ins.

cat > "$work/lab-lib.sh" <<'LIB'
# Sourced by every README block the lab runs (see scripts/bootstrap-demo.sh).
lab_dir=$LAB_NODE_DIR

# lab_unit_start UNIT: what `systemctl start UNIT` does, without systemd.
lab_unit_start() {
  local u=$1 f="" c line type=simple start="" host
  local -a envs=() files=() post=()
  for c in "/etc/systemd/system/$u.service" "/lib/systemd/system/$u.service"; do
    [ -f "$c" ] && { f=$c; break; }
  done
  [ -n "$f" ] || { echo "lab: no unit $u.service" >&2; return 1; }
  host=$(hostname)
  while IFS= read -r line; do
    line=${line//%H/$host}; line=${line//%p/$u}
    case "$line" in
      Environment=*) envs+=("${line#Environment=}") ;;
      EnvironmentFile=*) files+=("${line#EnvironmentFile=}") ;;
      ExecStart=*) start=${line#ExecStart=} ;;
      ExecStartPost=*) post+=("${line#ExecStartPost=}") ;;
      Type=*) type=${line#Type=} ;;
    esac
  done < "$f"
  [ -n "$start" ] || { echo "lab: $f has no ExecStart" >&2; return 1; }
  {
    echo "set -a"
    for c in "${envs[@]}"; do printf '%s\n' "$c"; done
    for c in "${files[@]}"; do
      if [ "${c#-}" != "$c" ]; then printf '[ ! -f %q ] || . %q\n' "${c#-}" "${c#-}"
      else printf '. %q\n' "$c"; fi
    done
    echo "set +a"
    printf 'exec %s\n' "${start#[-@+!]}"
  } > "$lab_dir/units/$u.sh"
  echo "[lab: no systemd here] $u.service: ExecStart=$start"
  setsid bash "$lab_dir/units/$u.sh" >> "$lab_dir/logs/$u.log" 2>&1 < /dev/null &
  local pid=$!
  # With its start time and network namespace, so a stop never signals a
  # process that took over the PID.
  echo "$pid $(lab_starttime "$pid") $(readlink "/proc/$pid/ns/net")" > "$lab_dir/units/$u.pid"
  if [ "$type" = notify ]; then
    # systemd waits for READY=1; here: until the service listens.
    local i
    for i in $(seq 300); do
      kill -0 "$pid" 2>/dev/null || { echo "lab: $u exited" >&2; return 1; }
      ss -Hlntup 2>/dev/null | grep -q "pid=$pid," && break
      [ "$i" -lt 300 ] || { echo "lab: $u not listening after 30 s" >&2; return 1; }
      sleep 0.1
    done
  fi
  for c in "${post[@]}"; do
    echo "[lab] $u.service: ExecStartPost=$c"
    bash -c "${c#[-@+!]}" || { echo "lab: $u ExecStartPost failed" >&2; return 1; }
  done
}

lab_starttime() {
  local s
  { read -r s < "/proc/$1/stat"; } 2>/dev/null || return 1
  s=${s##*) }
  set -- $s
  echo "${20}"
}

# lab_unit_signal UNIT SIG: SIG to the unit's process if it is still the
# one started (same start time) in this node's network namespace.
lab_unit_signal() {
  local f=$lab_dir/units/$1.pid pid st ns now
  [ -f "$f" ] || return 1
  read -r pid st ns < "$f" || return 1
  now=$(lab_starttime "$pid") || return 1
  [ "$now" = "$st" ] || return 1
  [ "$(readlink "/proc/$pid/ns/net" 2>/dev/null)" = "$ns" ] || return 1
  [ "$ns" = "$(readlink /proc/self/ns/net)" ] || return 1
  kill "-$2" "$pid" 2>/dev/null
}

lab_unit_stop() {
  local u=$1 i
  lab_unit_signal "$u" TERM || { rm -f "$lab_dir/units/$u.pid"; return 0; }
  for i in $(seq 100); do lab_unit_signal "$u" 0 || break; sleep 0.1; done
  lab_unit_signal "$u" KILL || true
  rm -f "$lab_dir/units/$u.pid"
}

systemctl() {
  case "$1" in
    daemon-reload) echo "[lab: no systemd here] systemctl daemon-reload: nothing to do" ;;
    enable)
      [ "${2:-}" = --now ] || { echo "[lab] systemctl enable without --now: nothing to start"; return 0; }
      lab_unit_start "$3" ;;
    start) lab_unit_start "$2" ;;
    restart) lab_unit_stop "$2"; lab_unit_start "$2" ;;
    stop) echo "[lab: no systemd here] stopping $2.service (SIGTERM)"; lab_unit_stop "$2" ;;
    *) echo "lab: systemctl $* is not emulated" >&2; return 1 ;;
  esac
}

kubeadm() {
  printf '[lab stand-in: no kubeadm or kubelet here; on a real node this runs:]\n  kubeadm'
  printf ' %q' "$@"
  printf '\n'
}

kubectl() {
  printf '[lab stand-in: no Kubernetes API here; on a real cluster this runs:]\n  kubectl'
  printf ' %q' "$@"
  printf '\n'
  # A manifest piped in is read (and must be there), as kubectl would.
  if [ "$*" = "apply -f -" ]; then
    local lines
    lines=$(wc -l)
    [ "$lines" -gt 0 ] || { echo "lab: kubectl apply got nothing on stdin" >&2; return 1; }
    echo "  ($lines lines of manifest on stdin)"
  fi
}
LIB

# run_block FILE NODE: one README block on one node, with the variables
# earlier blocks set on that node.
run_block() {
  local f=$1 n=$2 d=$work/nodes/$2
  printf '\n\033[1m-- on %s:\033[0m\n' "$n"
  sed 's/^/   $ /' "$f"
  # -e and -u make every line a check; no pipefail: `a | grep b` checks
  # what a reader's shell checks, grep's finding.
  if ! on "$n" env LAB_NODE_DIR="$d" bash -c '
    set -eu
    cd "$1"
    . ./env
    . "$2"
    trap "export -p > \"$1/env\"" EXIT
    set -a
    . "$3"' _ "$d" "$work/lab-lib.sh" "$f" 2>&1 | sed 's/^/     /'; then
    fail "block $(basename "$f") of $(basename "$(dirname "$f")") failed on $n"
  fi
}

# role FILE: the block's tag.
role() { local r=${1%.sh}; echo "${r##*.}"; }

# run_file FILE: one block on the nodes its tag names.
run_file() {
  local f=$1 n
  case "$(role "$f")" in
    public) run_block "$f" cloud ;;
    homes) for n in home-a home-b; do run_block "$f" "$n"; done ;;
    all) for n in "${nodes[@]}"; do run_block "$f" "$n"; done ;;
    skip) ;;
    *) fail "block $f: unknown tag lab=$(role "$f")" ;;
  esac
}

# ---------------------------------------------------------------------------
# Prerequisites a real node has from its distribution: Open vSwitch running
# (the README's prerequisite for bridgeType ovs; Debian's
# openvswitch-switch service, started here by hand, userspace datapath).

say "docs/operations.md, \"Ports\": the public node's firewall (a cloud's security group)"
for f in "$work"/ports/*.sh; do run_file "$f"; done

say "prerequisite on every node: Open vSwitch running (as the distribution's service would start it)"
for n in "${nodes[@]}"; do
  on "$n" bash -c '
    set -e
    mkdir -p /run/openvswitch /var/log/openvswitch
    # Not /etc/openvswitch: the machine'"'"'s lock file there would be shared
    # through the overlay.
    ovsdb-tool create /run/openvswitch/conf.db /usr/share/openvswitch/vswitch.ovsschema
    ovsdb-server /run/openvswitch/conf.db --remote=punix:/run/openvswitch/db.sock --pidfile --detach --log-file
    ovs-vsctl --timeout=10 --no-wait init
    ovs-vswitchd --pidfile --detach --log-file' > "$work/nodes/$n/logs/ovs.log" 2>&1 ||
    fail "OVS on $n: $(cat "$work/nodes/$n/logs/ovs.log")"
done

# The kubeadm join values `kubeadm init` would have printed.
for n in home-a home-b; do
  printf 'export TOKEN=%q CA_HASH=%q\n' "abcdef.0123456789abcdef" "sha256:HASH-PRINTED-BY-KUBEADM-INIT" \
    >> "$work/nodes/$n/env"
done

# ---------------------------------------------------------------------------
# The README.

say "README, \"Bootstrapping a cluster over the host overlay\": $n_readme blocks, run as written"
# The files step 0 makes on the public node and tells the operator to copy
# to every node: copied between the nodes' directories (scp on real hosts).
copied="network.key turn-password ca.crt evio.crt evio.key"
for f in "$work"/readme/*.sh; do
  if [ "$(role "$f")" != public ] && [ ! -e "$work/nodes/home-a/network.key" ] && [ -e "$work/nodes/cloud/network.key" ]; then
    printf '\n\033[1m-- lab: copying %s from cloud to home-a and home-b (scp on real hosts)\033[0m\n' "$copied"
    for h in home-a home-b; do
      for c in $copied; do cp "$work/nodes/cloud/$c" "$work/nodes/$h/$c"; done
    done
  fi
  run_file "$f"
done
[ -e "$work/nodes/home-a/network.key" ] || fail "the README never made network.key on the public node"

# ---------------------------------------------------------------------------
# Checks of what the README promises.

say "checks: pinned host address, host overlay between every pair"
cloud_host=$(on cloud ip -4 -o addr show dev evio-host | awk '{split($4, a, "/"); print a[1]}')
[ "$cloud_host" = 10.10.0.1 ] || fail "the public node's host address is $cloud_host, not the pinned 10.10.0.1"
declare -A host_ip
for n in "${nodes[@]}"; do
  host_ip[$n]=$(on "$n" ip -4 -o addr show dev evio-host | awk '{split($4, a, "/"); print a[1]}')
  [ -n "${host_ip[$n]}" ] || fail "$n has no host overlay address"
  echo "   $n: host overlay ${host_ip[$n]}"
done
for a in "${nodes[@]}"; do
  for b in "${nodes[@]}"; do
    [ "$a" = "$b" ] && continue
    on "$a" ping -q -c 1 -w 20 "${host_ip[$b]}" > /dev/null ||
      fail "host overlay: $a cannot reach $b at ${host_ip[$b]}"
    echo "   host overlay $a -> $b (${host_ip[$b]}): ok"
  done
done

# ---------------------------------------------------------------------------
# Pods, as the kubelet's runtime would attach them: the plugin named by the
# conflist config-gen wrote, with the CNI environment.

say "pods: one per node, attached by the evio plugin from the conflist config-gen wrote (no kubelet here)"
declare -A pod_ip
for n in "${nodes[@]}"; do
  pod_ip[$n]=$(on "$n" bash -c '
    set -euo pipefail
    ip netns add pod
    conf=$(jq -c ".plugins[0] + {name: .name, cniVersion: .cniVersion}" /etc/cni/net.d/10-evio.conflist)
    out=$(printf "%s" "$conf" | env -i PATH="$PATH" CNI_COMMAND=ADD CNI_CONTAINERID="pod-$(hostname)" \
      CNI_NETNS=/run/netns/pod CNI_IFNAME=eth0 CNI_PATH=/opt/cni/bin:/usr/lib/cni /opt/cni/bin/evio)
    printf "%s" "$out" | jq -r ".ips[0].address" | cut -d/ -f1') ||
    fail "pod on $n: the plugin failed"
  echo "   pod on $n: ${pod_ip[$n]}"
done

pod_matrix() {
  local a b
  for a in "${nodes[@]}"; do
    for b in "${nodes[@]}"; do
      [ "$a" = "$b" ] && continue
      on "$a" ip netns exec pod ping -q -c 1 -w 20 "${pod_ip[$b]}" > /dev/null ||
        fail "$1: pod on $a cannot reach pod on $b (${pod_ip[$b]})"
      echo "   $1: pod on $a -> pod on $b (${pod_ip[$b]}): ok"
    done
  done
}
pod_matrix "pods"
# path_of NODE PEER: the path NODE's agent uses to PEER.
path_of() {
  on "$1" /usr/local/bin/evio-node peers --json | jq -r --arg p "$2" '.peers[] | select(.node == $p) | .path'
}
say "paths: homes reach the public node directly (coturn shares its address), home-a <-> home-b only through the relay"
for n in home-a home-b; do
  for i in $(seq 30); do
    p=$(path_of "$n" cloud) || p=error
    [ "$p" = direct ] && break
    [ "$i" -lt 30 ] || fail "$n reaches cloud on path $p, not direct"
    sleep 0.5
  done
done
for pair in home-a:home-b home-b:home-a; do
  p=$(path_of "${pair%%:*}" "${pair#*:}") || p=error
  [ "$p" = relay ] || fail "${pair%%:*} reaches ${pair#*:} on path $p: a symmetric and a port-restricted NAT leave only the relay"
done
for n in "${nodes[@]}"; do
  echo "   $n:"
  on "$n" /usr/local/bin/evio-node peers | sed 's/^/     /'
done

# ---------------------------------------------------------------------------
# docs/operations.md: backup, a disaster, restore.

say "docs/operations.md, \"Backing up the store\": snapshot, wipe, restore"
before=$(on cloud /usr/local/bin/evio-node subnets list --config /etc/evio/net-conf.json)
first_ops=$(find "$work/ops" -name '*.sh' ! -name '*.skip.sh' | sort | head -n 1)
for f in "$work"/ops/*.sh; do
  run_file "$f"
  # The disaster comes right after the backup (the first block) and before
  # the restore: etcd dies and its data directory is lost.
  if [ "$f" = "$first_ops" ]; then
    # A real snapshot is older than the disaster: the store wrote on
    # after it, and the agents read those revisions. 200 writes (outside
    # evio's prefix), then one inside it that every agent reads.
    printf '\n\033[1m-- lab: the store moves on after the snapshot (200 writes)\033[0m\n'
    on cloud bash -c 'set -e; cd "$1"; . ./env
      for i in $(seq 200); do etcdctl put /lab/after-snapshot "$i" > /dev/null; done
      etcdctl put /evio/evio/lab-after-snapshot 1 > /dev/null
      etcdctl del /evio/evio/lab-after-snapshot > /dev/null' _ "$work/nodes/cloud" ||
      fail "writing after the snapshot"
    printf '\n\033[1m-- lab: disaster on cloud: etcd killed (SIGKILL), /var/lib/etcd-evio deleted\033[0m\n'
    on cloud env LAB_NODE_DIR="$work/nodes/cloud" bash -c '. "$1"
      lab_unit_signal etcd KILL || { echo "lab: etcd is not running" >&2; exit 1; }
      rm -f "$LAB_NODE_DIR/units/etcd.pid"; rm -rf /var/lib/etcd-evio' _ "$work/lab-lib.sh" ||
      fail "killing etcd on cloud"
    on cloud bash -c '! /usr/local/bin/evio-node subnets list --config /etc/evio/net-conf.json --timeout 3' > /dev/null 2>&1 ||
      fail "the store still answers after the wipe"
    pod_matrix "store down"
  fi
done
after=$(on cloud /usr/local/bin/evio-node subnets list --config /etc/evio/net-conf.json)
[ "$before" = "$after" ] || fail "subnets differ after the restore:
$before
---
$after"
echo "   subnets after the restore are those of the snapshot:"
echo "$after" | sed 's/^/     /'

say "checks after the restore: every agent live in the store again, pods and host overlay"
for i in $(seq 60); do
  live=$(on cloud /usr/local/bin/evio-node nodes list --config /etc/evio/net-conf.json --json |
    jq -s '[.[] | select(.state == "live")] | length') || live=error
  [ "$live" = 3 ] && break
  [ "$i" -lt 60 ] || fail "after the restore only $live of 3 nodes are live in the store"
  sleep 0.5
done
echo "   3 of 3 nodes live in the restored store"
pod_matrix "after restore"

# The agents must also see what changes after the restore, though the
# restored store's revisions are behind those they had read: home-b gets a
# new node key (the runbook in operations.md); the others must pick it up
# from the store to talk to it again.
say "a change after the restore reaches every agent: home-b's node key rotated"
old_key=$(on home-b /usr/local/bin/evio-node peers --json | jq -r .publicKey)
run_block "$(find "$work/rotate" -name '*.node.sh')" home-b
new_key=$(on home-b /usr/local/bin/evio-node peers --json | jq -r .publicKey)
[ "$new_key" != "$old_key" ] || fail "home-b kept its key $old_key"
for n in cloud home-a; do
  for i in $(seq 40); do
    seen=$(on "$n" /usr/local/bin/evio-node peers --json | jq -r '.peers[] | select(.node == "home-b") | .publicKey') ||
      seen=error
    [ "$seen" = "$new_key" ] && break
    [ "$i" -lt 40 ] || fail "$n still has home-b's old key $seen 20 s after the rotation (new: $new_key)"
    sleep 0.5
  done
  echo "   $n has home-b's new key"
done
pod_matrix "after key rotation"
for n in home-a home-b; do
  on "$n" ping -q -c 1 -w 20 10.10.0.1 > /dev/null || fail "after restore: $n cannot reach 10.10.0.1"
  echo "   host overlay $n -> 10.10.0.1: ok"
done

say "bootstrap-demo: PASSED ($(( $(date +%s) - started )) s)"
