#!/usr/bin/env bash
# Our own redis-server on 127.0.0.1:$DMP_REDIS_PORT, separate from any system Redis.
#
#   deploy/redis.sh start|stop|status|reset
#
# AOF persistence (appendfsync everysec), no RDB snapshots. DMP_REDIS_PASSWORD, when set,
# becomes requirepass.
set -euo pipefail

# shellcheck source=deploy/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

REDIS_DIR="$DMP_STATE_DIR/redis"
CONF="$REDIS_DIR/redis.conf"
PID_FILE="$REDIS_DIR/redis.pid"
LOG_FILE="$REDIS_DIR/redis.log"
START_TIMEOUT=20
# redis-server rewrites its process title to "redis-server 127.0.0.1:PORT"; the port may
# differ from today's DMP_REDIS_PORT, so match the program name only (start then refuses).
MARKER="redis-server "

render_config() {
    cat <<EOF
# Written by deploy/redis.sh on each start; edit the script, not this file.
bind $DMP_HOST
port $DMP_REDIS_PORT
protected-mode yes
daemonize yes
pidfile $PID_FILE
logfile $LOG_FILE
dir $REDIS_DIR
appendonly yes
appendfsync everysec
save ""
EOF
    if [[ -n $DMP_REDIS_PASSWORD ]]; then
        printf 'requirepass "%s"\n' "$DMP_REDIS_PASSWORD"
    fi
}

write_config() {
    if [[ $DMP_REDIS_PASSWORD == *[\"[:space:]]* ]]; then
        die "redis: DMP_REDIS_PASSWORD must not contain quotes, backslashes or whitespace"
    fi
    mkdir -p "$REDIS_DIR"
    # The password goes in this file (owner-only), never on a command line that ps shows.
    (
        umask 077
        render_config >"$CONF.tmp"
    )
    mv -f "$CONF.tmp" "$CONF"
}

# A running server was started from $CONF; refuse to pretend it has different settings.
same_settings() {
    cmp -s <(render_config) "$CONF"
}

cli() {
    REDISCLI_AUTH="$DMP_REDIS_PASSWORD" redis-cli -h "$DMP_HOST" -p "$DMP_REDIS_PORT" "$@"
}

answering() {
    [[ $(cli ping 2>/dev/null) == PONG ]]
}

current_pid() {
    running_pid "$PID_FILE" "$MARKER"
}

cmd_start() {
    "$DMP_ROOT/deploy/install.sh" redis
    local pid
    if pid=$(current_pid); then
        same_settings || die "redis: running (pid $pid) with other settings than now asked" \
            "(port or password; see $CONF); deploy/redis.sh stop first"
        if answering; then
            log "redis: already running (pid $pid, $DMP_HOST:$DMP_REDIS_PORT)"
            return 0
        fi
        log "redis: pid $pid exists but does not answer PING yet; waiting"
    else
        rm -f "$PID_FILE"
        if port_open "$DMP_HOST" "$DMP_REDIS_PORT"; then
            die "redis: $DMP_HOST:$DMP_REDIS_PORT is taken by a process this state dir does not own" \
                "($DMP_STATE_DIR); stop it or set DMP_REDIS_PORT"
        fi
        write_config
        log "redis: starting on $DMP_HOST:$DMP_REDIS_PORT (state in $REDIS_DIR)"
        # daemonize: redis forks, detaches into its own session and writes the pid file.
        redis-server "$CONF" || {
            show_tail "$LOG_FILE"
            die "redis: redis-server refused to start"
        }
    fi
    local deadline=$((SECONDS + START_TIMEOUT))
    until answering; do
        if ((SECONDS >= deadline)); then
            show_tail "$LOG_FILE"
            die "redis: no PONG from $DMP_HOST:$DMP_REDIS_PORT after ${START_TIMEOUT}s"
        fi
        sleep 0.1
    done
    pid=$(current_pid) || {
        show_tail "$LOG_FILE"
        die "redis: answers PING but $PID_FILE does not name a live redis-server"
    }
    log "redis: ready on $DMP_HOST:$DMP_REDIS_PORT (pid $pid)"
}

cmd_stop() {
    local pid
    if pid=$(current_pid); then
        # SIGTERM makes redis fsync the AOF and exit cleanly.
        stop_pid redis "$pid" "$MARKER"
    else
        log "redis: not running"
    fi
    rm -f "$PID_FILE"
}

cmd_status() {
    local pid
    if pid=$(current_pid) && answering; then
        log "redis: running (pid $pid, $DMP_HOST:$DMP_REDIS_PORT)"
        return 0
    fi
    log "redis: not running"
    return 1
}

cmd_reset() {
    cmd_stop
    log "redis: deleting $REDIS_DIR"
    rm -rf "$REDIS_DIR"
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
