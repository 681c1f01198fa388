# shellcheck shell=bash disable=SC2034  # the variables are used by the scripts that source this
# Shared configuration and helpers for the deploy/ scripts. Source it; do not run it.
#
# Every setting can be overridden from the environment. Everything binds 127.0.0.1 only.

DMP_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DMP_STATE_DIR="${DMP_STATE_DIR:-$DMP_ROOT/.state}"
# Shared between clones so that a second checkout does not fetch Kafka again.
DMP_CACHE_DIR="${DMP_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/dmp}"
DMP_PYTHON="${DMP_PYTHON:-python3}"
DMP_VENV="${DMP_VENV:-$DMP_ROOT/.venv}"
# Relative overrides are taken from the caller's directory; the scripts may cd elsewhere.
[[ $DMP_STATE_DIR == /* ]] || DMP_STATE_DIR="$PWD/$DMP_STATE_DIR"
[[ $DMP_CACHE_DIR == /* ]] || DMP_CACHE_DIR="$PWD/$DMP_CACHE_DIR"
[[ $DMP_VENV == /* ]] || DMP_VENV="$PWD/$DMP_VENV"

DMP_KAFKA_VERSION="${DMP_KAFKA_VERSION:-4.1.1}"
# Must be the log4j2 release that kafka_2.13 itself depends on (core and binding in step).
DMP_LOG4J_VERSION="${DMP_LOG4J_VERSION:-2.24.3}"
DMP_KAFKA_PORT="${DMP_KAFKA_PORT:-19092}"
DMP_KAFKA_CONTROLLER_PORT="${DMP_KAFKA_CONTROLLER_PORT:-19093}"
DMP_KAFKA_HEAP="${DMP_KAFKA_HEAP:-1g}"
DMP_REDIS_PORT="${DMP_REDIS_PORT:-16379}"
DMP_REDIS_PASSWORD="${DMP_REDIS_PASSWORD:-}"
DMP_PROMETHEUS_PORT="${DMP_PROMETHEUS_PORT:-19090}"
DMP_HOST=127.0.0.1

DMP_KAFKA_HOME="$DMP_CACHE_DIR/kafka-$DMP_KAFKA_VERSION"
DMP_KAFKA_LIBS="$DMP_KAFKA_HOME/libs"
DMP_KAFKA_LOG4J="$DMP_KAFKA_HOME/log4j2.properties"

log() {
    printf '[deploy] %s\n' "$*" >&2
}

die() {
    log "error: $*"
    exit 1
}

# True when something accepts TCP connections on HOST PORT.
port_open() {
    local host=$1 port=$2
    (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null
}

# wait_for_port HOST PORT TIMEOUT_SECONDS
wait_for_port() {
    local host=$1 port=$2 timeout=$3
    local deadline=$((SECONDS + timeout))
    until port_open "$host" "$port"; do
        if ((SECONDS >= deadline)); then
            return 1
        fi
        sleep 0.2
    done
}

# read_pid FILE: print the pid stored in FILE, if any.
read_pid() {
    local file=$1 pid
    [[ -f $file ]] || return 1
    pid=$(<"$file")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    printf '%s\n' "$pid"
}

# pid_alive PID MARKER: the process exists and its command line contains MARKER,
# so a recycled pid that now belongs to something else is not mistaken for ours.
pid_alive() {
    local pid=$1 marker=$2 cmdline
    kill -0 "$pid" 2>/dev/null || return 1
    cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
    [[ $cmdline == *"$marker"* ]]
}

# running_pid FILE MARKER: print the pid from FILE if that process is alive and ours.
running_pid() {
    local file=$1 marker=$2 pid
    pid=$(read_pid "$file") || return 1
    pid_alive "$pid" "$marker" || return 1
    printf '%s\n' "$pid"
}

# stop_pid NAME PID MARKER: SIGTERM, wait up to 30 s, then SIGKILL.
stop_pid() {
    local name=$1 pid=$2 marker=$3
    local deadline=$((SECONDS + 30))
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || return 0
    while pid_alive "$pid" "$marker"; do
        if ((SECONDS >= deadline)); then
            log "$name did not exit within 30 s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.5
            break
        fi
        sleep 0.2
    done
    log "$name stopped"
}

# show_tail FILE...: the last lines of each log, to explain a failed start.
show_tail() {
    local file
    for file in "$@"; do
        [[ -f $file ]] || continue
        log "last lines of $file:"
        tail -n 40 "$file" >&2
    done
}

need_linux_proc() {
    [[ -d /proc/self ]] || die "these scripts need Linux /proc"
}
