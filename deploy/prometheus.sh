#!/usr/bin/env bash
# Our own Prometheus on 127.0.0.1:$DMP_PROMETHEUS_PORT (default 19090), scraping the DMP
# services with the rules of deploy/prometheus/rules/. Separate from any system Prometheus
# (Debian's package may run one on :9090): own port, own config and storage under
# $DMP_STATE_DIR/prometheus.
#
#   deploy/prometheus.sh install|config|start|stop|status|reset
#
# Targets (comma-separated host:port lists):
#   DMP_PROMETHEUS_INGEST_TARGETS  default 127.0.0.1:$DMP_INGEST_METRICS_PORT (9464)
#   DMP_PROMETHEUS_LOOKUP_TARGETS  default 127.0.0.1:$DMP_LOOKUP_PORT (8080)
#   DMP_PROMETHEUS_DESTINATIONS_TARGETS  default none (dmp destinations is optional)
#   DMP_PROMETHEUS_SCRAPE_INTERVAL default 5s (also the rule evaluation interval)
#   DMP_PROMETHEUS_RETENTION       default 2d
set -euo pipefail

# shellcheck source=deploy/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PROM_DIR="$DMP_STATE_DIR/prometheus"
CONF="$PROM_DIR/prometheus.yml"
PID_FILE="$PROM_DIR/prometheus.pid"
LOG_FILE="$PROM_DIR/prometheus.log"
RULES_DIR="$DMP_ROOT/deploy/prometheus/rules"
START_TIMEOUT=30
INGEST_TARGETS="${DMP_PROMETHEUS_INGEST_TARGETS:-$DMP_HOST:${DMP_INGEST_METRICS_PORT:-9464}}"
LOOKUP_TARGETS="${DMP_PROMETHEUS_LOOKUP_TARGETS:-$DMP_HOST:${DMP_LOOKUP_PORT:-8080}}"
DESTINATIONS_TARGETS="${DMP_PROMETHEUS_DESTINATIONS_TARGETS:-}"
INTERVAL="${DMP_PROMETHEUS_SCRAPE_INTERVAL:-5s}"
RETENTION="${DMP_PROMETHEUS_RETENTION:-2d}"
# The config path is on the command line: it tells our server from any other prometheus.
MARKER="--config.file=$CONF"

cmd_install() {
    if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
        log "prometheus: present ($(command -v prometheus))"
        return 0
    fi
    # Debian's package brings both prometheus and promtool.
    "$DMP_ROOT/deploy/install.sh" prometheus
    command -v promtool >/dev/null || die "prometheus: promtool still missing after install"
}

# yaml_targets "a:1,b:2" -> ["a:1", "b:2"]
yaml_targets() {
    local list=$1 out="" target
    IFS=',' read -ra parts <<<"$list"
    for target in "${parts[@]}"; do
        [[ $target =~ ^[A-Za-z0-9._-]+:[0-9]+$ ]] || die "prometheus: bad target '$target' (host:port)"
        out+="${out:+, }\"$target\""
    done
    printf '[%s]' "$out"
}

render_config() {
    local file
    cat <<EOF
# Written by deploy/prometheus.sh; edit deploy/prometheus/ or the script, not this file.
global:
  scrape_interval: $INTERVAL
  evaluation_interval: $INTERVAL
  scrape_timeout: $INTERVAL
rule_files:
EOF
    for file in "$RULES_DIR"/*.yml; do
        printf '  - %s\n' "$file"
    done
    cat <<EOF
scrape_configs:
  - job_name: dmp-ingest
    static_configs:
      - targets: $(yaml_targets "$INGEST_TARGETS")
  - job_name: dmp-lookup
    static_configs:
      - targets: $(yaml_targets "$LOOKUP_TARGETS")
EOF
    if [[ -n $DESTINATIONS_TARGETS ]]; then
        cat <<EOF
  - job_name: dmp-destinations
    static_configs:
      - targets: $(yaml_targets "$DESTINATIONS_TARGETS")
EOF
    fi
}

cmd_config() {
    mkdir -p "$PROM_DIR"
    render_config >"$CONF.tmp"
    promtool check config "$CONF.tmp" >&2 || die "prometheus: the generated config is invalid"
    mv -f "$CONF.tmp" "$CONF"
    log "prometheus: config written to $CONF"
}

url() {
    printf 'http://%s:%s%s' "$DMP_HOST" "$DMP_PROMETHEUS_PORT" "$1"
}

answering() {
    curl -sf -o /dev/null --max-time 2 "$(url /-/ready)"
}

current_pid() {
    running_pid "$PID_FILE" "$MARKER"
}

cmd_start() {
    cmd_install
    local pid
    if pid=$(current_pid); then
        cmp -s <(render_config) "$CONF" ||
            die "prometheus: running (pid $pid) with another config than now asked" \
                "(see $CONF); deploy/prometheus.sh stop first"
        pid_port_is "$pid" ||
            die "prometheus: running (pid $pid) on another port; deploy/prometheus.sh stop first"
    else
        rm -f "$PID_FILE"
        if port_open "$DMP_HOST" "$DMP_PROMETHEUS_PORT"; then
            die "prometheus: $DMP_HOST:$DMP_PROMETHEUS_PORT is taken by a process this state dir" \
                "does not own ($DMP_STATE_DIR); stop it or set DMP_PROMETHEUS_PORT"
        fi
        cmd_config
        mkdir -p "$PROM_DIR/data"
        log "prometheus: starting on $DMP_HOST:$DMP_PROMETHEUS_PORT (state in $PROM_DIR)"
        # Its own session, so that the caller's Ctrl-C or exit does not reach it.
        setsid prometheus \
            "$MARKER" \
            --storage.tsdb.path="$PROM_DIR/data" \
            --storage.tsdb.retention.time="$RETENTION" \
            --web.listen-address="$DMP_HOST:$DMP_PROMETHEUS_PORT" \
            --web.enable-lifecycle \
            </dev/null >>"$LOG_FILE" 2>&1 &
        pid=$!
        printf '%s\n' "$pid" >"$PID_FILE"
    fi
    local deadline=$((SECONDS + START_TIMEOUT))
    until answering; do
        if ! pid_alive "$pid" "$MARKER"; then
            show_tail "$LOG_FILE"
            die "prometheus: exited during start"
        fi
        if ((SECONDS >= deadline)); then
            show_tail "$LOG_FILE"
            die "prometheus: not ready on $(url /) after ${START_TIMEOUT}s"
        fi
        sleep 0.2
    done
    log "prometheus: ready on $(url /) (pid $pid)"
}

# The running server listens on today's port (the port is on its command line).
pid_port_is() {
    pid_alive "$1" "--web.listen-address=$DMP_HOST:$DMP_PROMETHEUS_PORT"
}

cmd_stop() {
    local pid
    if pid=$(current_pid); then
        stop_pid prometheus "$pid" "$MARKER"
    else
        log "prometheus: not running"
    fi
    rm -f "$PID_FILE"
}

cmd_status() {
    local pid
    if pid=$(current_pid) && answering; then
        log "prometheus: running (pid $pid, $(url /))"
        return 0
    fi
    log "prometheus: not running"
    return 1
}

cmd_reset() {
    cmd_stop
    log "prometheus: deleting $PROM_DIR"
    rm -rf "$PROM_DIR"
}

need_linux_proc
case "${1:-}" in
install) cmd_install ;;
config) cmd_config ;;
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
reset) cmd_reset ;;
*)
    echo "usage: $0 install|config|start|stop|status|reset" >&2
    exit 2
    ;;
esac
