#!/usr/bin/env bash
# A single-node Kafka (KRaft, broker+controller) on 127.0.0.1 for development and CI.
#
#   deploy/kafka.sh start|stop|status|reset
#
# DMP_KAFKA_SASL_USERS="alice:secret,bob:other" adds a SASL_PLAINTEXT listener (mechanism
# PLAIN, those users) on 127.0.0.1:$DMP_KAFKA_SASL_PORT beside the plaintext one; the
# passwords live only in the owner-only server.properties.
#
# What bin/kafka-server-start.sh would do, by hand: jars from Maven Central (install.sh),
# storage formatted once, then `java -cp '<libs>/*' kafka.Kafka server.properties`.
set -euo pipefail

# shellcheck source=deploy/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

KAFKA_DIR="$DMP_STATE_DIR/kafka"
PROPS="$KAFKA_DIR/server.properties"
DATA_DIR="$KAFKA_DIR/data"
PID_FILE="$KAFKA_DIR/kafka.pid"
CONSOLE_LOG="$KAFKA_DIR/server.log"
LOG_DIR="$KAFKA_DIR/logs"
CLUSTER_ID_FILE="$KAFKA_DIR/cluster.id"
FORMATTED_FOR="$KAFKA_DIR/formatted-for"
START_TIMEOUT=60
BOOTSTRAP="$DMP_HOST:$DMP_KAFKA_PORT"
DMP_KAFKA_SASL_USERS="${DMP_KAFKA_SASL_USERS:-}"
DMP_KAFKA_SASL_PORT="${DMP_KAFKA_SASL_PORT:-19094}"
JAVA="${JAVA:-java}"

java_cmd() {
    "$JAVA" -cp "$DMP_KAFKA_LIBS/*" "$@"
}

render_properties() {
    cat <<EOF
# Written by deploy/kafka.sh on each start; edit the script, not this file.
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=$DMP_HOST:$DMP_KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://$DMP_HOST:$DMP_KAFKA_PORT,CONTROLLER://$DMP_HOST:$DMP_KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://$DMP_HOST:$DMP_KAFKA_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$DATA_DIR

# One node: every replication factor and ISR minimum is 1.
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# Fewer than the default 50, so the first consumer group on a fresh broker starts quickly.
offsets.topic.num.partitions=8

num.partitions=4
auto.create.topics.enable=false
group.initial.rebalance.delay.ms=0
# Tests use short session timeouts to see a crashed consumer's partitions move quickly.
group.min.session.timeout.ms=1000

# Tests send a 2 MB event that the broker must accept so the consumer can dead-letter it.
message.max.bytes=4194304
replica.fetch.max.bytes=4194304

log.retention.hours=720
EOF
    if [[ -n $DMP_KAFKA_SASL_USERS ]]; then
        render_sasl
    fi
}

# The SASL/PLAIN listener: later keys win in a properties file, so these override the above.
render_sasl() {
    local users="" pair pairs
    IFS=',' read -ra pairs <<<"$DMP_KAFKA_SASL_USERS"
    for pair in "${pairs[@]}"; do
        users+=" user_${pair%%:*}=\"${pair#*:}\""
    done
    cat <<EOF
listeners=PLAINTEXT://$DMP_HOST:$DMP_KAFKA_PORT,CONTROLLER://$DMP_HOST:$DMP_KAFKA_CONTROLLER_PORT,SASL_PLAINTEXT://$DMP_HOST:$DMP_KAFKA_SASL_PORT
advertised.listeners=PLAINTEXT://$DMP_HOST:$DMP_KAFKA_PORT,SASL_PLAINTEXT://$DMP_HOST:$DMP_KAFKA_SASL_PORT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT
sasl.enabled.mechanisms=PLAIN
listener.name.sasl_plaintext.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required$users;
EOF
}

write_properties() {
    if [[ $DMP_KAFKA_SASL_USERS == *[\"\\[:space:]]* ]]; then
        die "kafka: DMP_KAFKA_SASL_USERS must not contain quotes, backslashes or whitespace"
    fi
    mkdir -p "$KAFKA_DIR" "$DATA_DIR" "$LOG_DIR"
    # Owner-only: it may hold SASL passwords.
    (
        umask 077
        render_properties >"$PROPS.tmp"
    )
    mv -f "$PROPS.tmp" "$PROPS"
}

# A running broker was started from $PROPS; refuse to pretend it has different settings.
same_settings() {
    cmp -s <(render_properties) "$PROPS"
}

# The controller's endpoint is written into the formatted metadata (--standalone).
formatted_key() {
    printf 'controller=%s:%s\n' "$DMP_HOST" "$DMP_KAFKA_CONTROLLER_PORT"
}

format_storage() {
    if [[ -f $DATA_DIR/meta.properties ]]; then
        if [[ -f $FORMATTED_FOR && $(<"$FORMATTED_FOR") != "$(formatted_key)" ]]; then
            die "kafka storage was formatted for $(<"$FORMATTED_FOR"); run deploy/kafka.sh reset"
        fi
        return
    fi
    if [[ ! -s $CLUSTER_ID_FILE ]]; then
        java_cmd kafka.tools.StorageTool random-uuid >"$CLUSTER_ID_FILE.tmp"
        mv -f "$CLUSTER_ID_FILE.tmp" "$CLUSTER_ID_FILE"
    fi
    local cluster_id
    cluster_id=$(<"$CLUSTER_ID_FILE")
    log "kafka: formatting storage (cluster id $cluster_id)"
    # No log4j2 config here on purpose: log4j's default (errors only) keeps the tool quiet.
    java_cmd kafka.tools.StorageTool format --standalone -t "$cluster_id" -c "$PROPS" >&2
    formatted_key >"$FORMATTED_FOR"
}

# The broker answers a metadata request and lists itself.
answering() {
    local out
    out=$(kcat -b "$BOOTSTRAP" -L -m 3 2>/dev/null) || return 1
    [[ $out == *"broker 1 at $BOOTSTRAP"* ]]
}

current_pid() {
    running_pid "$PID_FILE" "$PROPS"
}

cmd_start() {
    "$DMP_ROOT/deploy/install.sh" kafka kcat
    local pid
    if pid=$(current_pid); then
        same_settings || die "kafka: running (pid $pid) with other settings than now asked" \
            "(see $PROPS); deploy/kafka.sh stop first"
        if port_open "$DMP_HOST" "$DMP_KAFKA_PORT"; then
            log "kafka: already running (pid $pid, $BOOTSTRAP)"
            return 0
        fi
        # Ours, but not listening: still starting (another start is waiting) or wedged.
        log "kafka: pid $pid exists but $BOOTSTRAP is not open yet; waiting"
    else
        rm -f "$PID_FILE"
        local port
        for port in "$DMP_KAFKA_PORT" "$DMP_KAFKA_CONTROLLER_PORT"; do
            if port_open "$DMP_HOST" "$port"; then
                die "kafka: $DMP_HOST:$port is taken by a process this state dir does not own" \
                    "($DMP_STATE_DIR); stop it or set DMP_KAFKA_PORT/DMP_KAFKA_CONTROLLER_PORT"
            fi
        done
        write_properties
        format_storage
        log "kafka: starting $DMP_KAFKA_VERSION on $BOOTSTRAP (state in $KAFKA_DIR)"
        # setsid: its own session, so Ctrl-C in the caller's terminal does not reach it.
        # Without job control the child is no group leader, so setsid execs in place and $!
        # is the JVM itself.
        set +m
        setsid "$JAVA" -Xms256m -Xmx"$DMP_KAFKA_HEAP" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
            -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent \
            -Djava.awt.headless=true \
            -Dlog4j2.configurationFile="$DMP_KAFKA_LOG4J" -Dkafka.logs.dir="$LOG_DIR" \
            -cp "$DMP_KAFKA_LIBS/*" kafka.Kafka "$PROPS" \
            </dev/null >"$CONSOLE_LOG" 2>&1 &
        pid=$!
        printf '%s\n' "$pid" >"$PID_FILE"
    fi
    local deadline=$((SECONDS + START_TIMEOUT))
    until answering; do
        if ! pid_alive "$pid" "$PROPS"; then
            rm -f "$PID_FILE"
            show_tail "$CONSOLE_LOG"
            die "kafka: the broker exited during start"
        fi
        if ((SECONDS >= deadline)); then
            show_tail "$CONSOLE_LOG"
            die "kafka: not answering on $BOOTSTRAP after ${START_TIMEOUT}s (pid $pid still running; deploy/kafka.sh stop)"
        fi
        sleep 0.3
    done
    log "kafka: ready on $BOOTSTRAP (pid $pid)"
}

cmd_stop() {
    local pid
    if pid=$(current_pid); then
        stop_pid kafka "$pid" "$PROPS"
    else
        log "kafka: not running"
    fi
    rm -f "$PID_FILE"
}

cmd_status() {
    local pid
    if pid=$(current_pid) && answering; then
        log "kafka: running (pid $pid, $BOOTSTRAP)"
        return 0
    fi
    log "kafka: not running"
    return 1
}

cmd_reset() {
    cmd_stop
    log "kafka: deleting $KAFKA_DIR"
    rm -rf "$KAFKA_DIR"
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
