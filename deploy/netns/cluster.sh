#!/usr/bin/env bash
# A multi-host Tandem cluster on one machine: every node in its own network
# namespace with its own address on a bridge, started with the same per-role
# scripts as on real hosts (deploy/bin). Needs root (ip netns, veth, bridge).
#
#   deploy/netns/cluster.sh up          create hosts, write the cluster file and certificates, start every role, wait until healthy
#   deploy/netns/cluster.sh status      the hosts and /health
#   deploy/netns/cluster.sh stop-host NODE   take a host off the network and kill what runs there (a power cut)
#   deploy/netns/cluster.sh down        stop everything and remove the hosts
#
# Environment: PP (prefill stages, default 2), TP (decode ranks, default 1),
# DIR (cluster file, certificates, logs; default /tmp/tandem-netns),
# TANDEM_BIN, TANDEM_HOME, TANDEM_THREADS as for deploy/bin, SUBNET (first
# three octets, default 10.77.0). The gateway's API is then
# http://$SUBNET.1:8000 from the machine itself.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PP="${PP:-2}"
TP="${TP:-1}"
DIR="${DIR:-/tmp/tandem-netns}"
SUBNET="${SUBNET:-10.77.0}"
BR="tdm-br0"
PREFIX="tdm-"

# Node name, namespace, address, role.
nodes() {
    echo "gateway ${PREFIX}gateway $SUBNET.1 gateway"
    for ((i = 0; i < PP; i++)); do
        echo "p0-s$i ${PREFIX}p0-s$i $SUBNET.$((11 + i)) prefill"
    done
    echo "d0 ${PREFIX}d0 $SUBNET.31 decode"
}

ns_of() { nodes | awk -v n="$1" '$1 == n { print $2 }'; }

up() {
    down quiet
    mkdir -p "$DIR"
    ip link add "$BR" type bridge
    ip addr add "$SUBNET.254/24" dev "$BR"
    ip link set "$BR" up
    local i=0
    while read -r name ns addr role; do
        ip netns add "$ns"
        ip link add "tdm-v$i" type veth peer name "tdm-p$i"
        ip link set "tdm-v$i" master "$BR" up
        ip link set "tdm-p$i" netns "$ns"
        ip -n "$ns" link set "tdm-p$i" name eth0
        ip -n "$ns" addr add "$addr/24" dev eth0
        ip -n "$ns" link set eth0 up
        ip -n "$ns" link set lo up
        i=$((i + 1))
    done < <(nodes)
    local stages=""
    while read -r name ns addr role; do
        [[ "$role" == prefill ]] && stages+="  { name = \"$name\", addr = \"$addr:7100\" },"$'\n'
    done < <(nodes)
    cat > "$DIR/cluster.toml" <<TOML
# Written by deploy/netns/cluster.sh: one network namespace per node.
[cluster]
name = "netns"
certs = "certs"

[gateway]
http = "$SUBNET.1:8000"
quic = "$SUBNET.1:7000"

[[prefill]]
name = "p0"
stages = [
$stages]

[[decode]]
name = "d0"
addr = "$SUBNET.31:7200"
tp = $TP
TOML
    local bin="${TANDEM_BIN:-$here/../../target/release/tandem}"
    "$bin" certs --config "$DIR/cluster.toml" >/dev/null
    while read -r name ns addr role; do
        TANDEM_BIN="$bin" TANDEM_CONFIG="$DIR/cluster.toml" \
            setsid ip netns exec "$ns" "$here/../bin/tandem-$role" "$name" \
            >"$DIR/$name.log" 2>&1 &
        echo $! >"$DIR/$name.pid"
    done < <(nodes)
    for ((t = 0; t < 1200; t++)); do
        if curl -sf -m 2 "http://$SUBNET.1:8000/health" >/dev/null; then
            echo "cluster up: http://$SUBNET.1:8000 (PP $PP, TP $TP; files in $DIR)"
            return 0
        fi
        sleep 0.1
    done
    echo "the cluster did not become healthy in 120 s; logs in $DIR" >&2
    return 1
}

stop_host() {
    local ns
    ns="$(ns_of "$1")"
    [[ -n "$ns" ]] || { echo "no host for node '$1'" >&2; return 1; }
    ip -n "$ns" link set eth0 down
    local pids
    pids="$(ip netns pids "$ns" || true)"
    [[ -n "$pids" ]] && kill -9 $pids 2>/dev/null || true
    echo "host of $1 is off the network and its processes are gone"
}

down() {
    for f in "$DIR"/*.pid; do
        [[ -e "$f" ]] || continue
        kill -TERM -- "-$(cat "$f")" 2>/dev/null || kill -TERM "$(cat "$f")" 2>/dev/null || true
    done
    sleep 0.5
    while read -r name ns addr role; do
        if ip netns list | grep -qw "$ns"; then
            local pids
            pids="$(ip netns pids "$ns" || true)"
            [[ -n "$pids" ]] && kill -9 $pids 2>/dev/null || true
            ip netns del "$ns"
        fi
    done < <(PP=8 nodes)
    ip link show "$BR" >/dev/null 2>&1 && ip link del "$BR"
    rm -f "$DIR"/*.pid
    [[ "${1:-}" == quiet ]] || echo "cluster down"
}

status() {
    while read -r name ns addr role; do
        printf '%-8s %-8s %-14s %s\n' "$name" "$role" "$addr" \
            "$(ip netns pids "$ns" 2>/dev/null | wc -l) processes"
    done < <(nodes)
    curl -s -m 2 "http://$SUBNET.1:8000/health" || echo "gateway not answering"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    stop-host) stop_host "${2:?stop-host NODE}" ;;
    *) sed -n '2,17p' "$0"; exit 2 ;;
esac
