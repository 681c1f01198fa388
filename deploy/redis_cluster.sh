#!/usr/bin/env bash
# A 3-master Redis Cluster on loopback (Debian's redis-server), for the scale-out tests.
#
#   deploy/redis_cluster.sh start|stop|status|reset
#
# Masters on 127.0.0.1:$DMP_REDIS_CLUSTER_PORT and the next two ports (default 17000-17002),
# no replicas, state in $DMP_STATE_DIR/redis-cluster/<port>. Point the DMP at it with
#   DMP_REDIS_CLUSTER=1 DMP_REDIS_URL=redis://127.0.0.1:17000/0
# (any one node is enough: the client learns the others from CLUSTER SLOTS).
set -euo pipefail

# shellcheck source=deploy/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DMP_REDIS_CLUSTER_PORT="${DMP_REDIS_CLUSTER_PORT:-17000}"
CLUSTER_DIR="$DMP_STATE_DIR/redis-cluster"
PORTS=("$DMP_REDIS_CLUSTER_PORT" "$((DMP_REDIS_CLUSTER_PORT + 1))" "$((DMP_REDIS_CLUSTER_PORT + 2))")
START_TIMEOUT=20
MARKER="redis-server "

node_dir() {
    printf '%s/%s\n' "$CLUSTER_DIR" "$1"
}

render_config() {
    local port=$1 dir
    dir=$(node_dir "$port")
    cat <<EOF
# Written by deploy/redis_cluster.sh on each start; edit the script, not this file.
bind $DMP_HOST
port $port
protected-mode yes
daemonize yes
pidfile $dir/redis.pid
logfile $dir/redis.log
dir $dir
cluster-enabled yes
cluster-config-file $dir/nodes.conf
cluster-node-timeout 5000
appendonly yes
appendfsync everysec
save ""
EOF
}

cli() {
    redis-cli -h "$DMP_HOST" -p "$1" "${@:2}"
}

node_pid() {
    running_pid "$(node_dir "$1")/redis.pid" "$MARKER"
}

cluster_ok() {
    [[ $(cli "${PORTS[0]}" cluster info 2>/dev/null | tr -d '\r' | grep '^cluster_state:') == "cluster_state:ok" ]]
}

start_node() {
    local port=$1 dir pid
    dir=$(node_dir "$port")
    if pid=$(node_pid "$port"); then
        log "redis-cluster: node $port already running (pid $pid)"
        return 0
    fi
    if port_open "$DMP_HOST" "$port"; then
        die "redis-cluster: $DMP_HOST:$port is taken by a process this state dir does not own" \
            "($DMP_STATE_DIR); stop it or set DMP_REDIS_CLUSTER_PORT"
    fi
    mkdir -p "$dir"
    render_config "$port" >"$dir/redis.conf"
    redis-server "$dir/redis.conf" || {
        show_tail "$dir/redis.log"
        die "redis-cluster: node $port refused to start"
    }
    local deadline=$((SECONDS + START_TIMEOUT))
    until [[ $(cli "$port" ping 2>/dev/null) == PONG ]]; do
        if ((SECONDS >= deadline)); then
            show_tail "$dir/redis.log"
            die "redis-cluster: no PONG from $DMP_HOST:$port after ${START_TIMEOUT}s"
        fi
        sleep 0.1
    done
}

cmd_start() {
    "$DMP_ROOT/deploy/install.sh" redis
    local port
    for port in "${PORTS[@]}"; do
        start_node "$port"
    done
    if ! cluster_ok; then
        # A fresh set of nodes: join them and share the 16384 slots out (nodes.conf keeps it).
        if [[ $(cli "${PORTS[0]}" cluster info | tr -d '\r' | grep '^cluster_known_nodes:') != "cluster_known_nodes:3" ]]; then
            log "redis-cluster: creating the cluster on ports ${PORTS[*]}"
            redis-cli --cluster create "${PORTS[@]/#/$DMP_HOST:}" --cluster-replicas 0 --cluster-yes >&2
        fi
        local deadline=$((SECONDS + START_TIMEOUT))
        until cluster_ok; do
            if ((SECONDS >= deadline)); then
                die "redis-cluster: cluster_state is not ok after ${START_TIMEOUT}s"
            fi
            sleep 0.2
        done
    fi
    log "redis-cluster: ready on $DMP_HOST:${PORTS[0]}-${PORTS[2]}"
}

cmd_stop() {
    local port pid
    for port in "${PORTS[@]}"; do
        if pid=$(node_pid "$port"); then
            stop_pid "redis-cluster node $port" "$pid" "$MARKER"
        fi
        rm -f "$(node_dir "$port")/redis.pid"
    done
}

cmd_status() {
    if cluster_ok; then
        log "redis-cluster: running, cluster_state ok ($DMP_HOST:${PORTS[0]}-${PORTS[2]})"
        return 0
    fi
    log "redis-cluster: not running"
    return 1
}

cmd_reset() {
    cmd_stop
    log "redis-cluster: deleting $CLUSTER_DIR"
    rm -rf "$CLUSTER_DIR"
}

need_linux_proc
case "${1:-}" in
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
reset) cmd_reset ;;
*)
    echo "usage: $0 start|stop|status|reset" >&2
    exit 2
    ;;
esac
