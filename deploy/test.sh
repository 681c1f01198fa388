#!/usr/bin/env bash
# THE test command, for local work and CI alike (.ci/run calls exactly this).
#
#   deploy/test.sh [pytest args...]
#
# Installs what is missing, starts Redis and Kafka unless they already run (and stops on exit
# only what it started), then: ruff check, ruff format --check, mypy --strict, pytest.
# Every step runs; the exit status is non-zero if any failed.
set -euo pipefail

# shellcheck source=deploy/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

cd "$DMP_ROOT"
deploy="$DMP_ROOT/deploy"

started=()
kafka_starter=""

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    # Let a background start finish (bounded by its own timeout) so its pid file exists
    # and the stop below finds the broker; killing it could orphan the JVM.
    if [[ -n $kafka_starter ]]; then
        wait "$kafka_starter" 2>/dev/null || true
    fi
    local i
    for ((i = ${#started[@]} - 1; i >= 0; i--)); do
        "$deploy/${started[i]}.sh" stop || true
    done
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

"$deploy/install.sh" python redis kafka kcat prometheus

# A service that already answers belongs to someone else (or an earlier session): leave it be.
needs_start() {
    if "$deploy/$1.sh" status 2>/dev/null; then
        log "$1: already running; leaving it running afterwards"
        return 1
    fi
}

if needs_start redis; then
    started+=(redis)
    "$deploy/redis.sh" start
fi
# A 3-master Redis Cluster for tests/integration/test_redis_cluster.py.
if needs_start redis_cluster; then
    started+=(redis_cluster)
    "$deploy/redis_cluster.sh" start
fi
export DMP_TEST_REDIS_CLUSTER_URL="redis://$DMP_HOST:${DMP_REDIS_CLUSTER_PORT:-17000}/0"
# Kafka takes a few seconds to come up: start it while the linters run.
kafka_log="$DMP_STATE_DIR/test-kafka-start.log"
if needs_start kafka; then
    started+=(kafka)
    mkdir -p "$DMP_STATE_DIR"
    "$deploy/kafka.sh" start 2>"$kafka_log" &
    kafka_starter=$!
    log "kafka: starting in the background (log: $kafka_log)"
fi

export PATH="$DMP_VENV/bin:$PATH"
export VIRTUAL_ENV="$DMP_VENV"
export DMP_KAFKA_BOOTSTRAP="$DMP_HOST:$DMP_KAFKA_PORT"
if [[ -n $DMP_REDIS_PASSWORD ]]; then
    export DMP_REDIS_URL="redis://:$DMP_REDIS_PASSWORD@$DMP_HOST:$DMP_REDIS_PORT/0"
else
    export DMP_REDIS_URL="redis://$DMP_HOST:$DMP_REDIS_PORT/0"
fi

failed=()
step() {
    local name=$1 rc=0
    shift
    log "==> $name"
    "$@" || rc=$?
    if ((rc == 0)); then
        log "ok: $name"
    else
        log "FAILED: $name (exit $rc)"
        failed+=("$name")
    fi
}

typed=()
for dir in dmp segment_rules bidder_adapter tests loadtests; do
    [[ -d $dir ]] && typed+=("$dir")
done

step "ruff check" ruff check .
step "ruff format --check" ruff format --check .
step "mypy --strict ${typed[*]}" mypy --strict "${typed[@]}"

services_up=1
if [[ -n $kafka_starter ]]; then
    rc=0
    wait "$kafka_starter" || rc=$?
    kafka_starter=""
    cat "$kafka_log" >&2
    if ((rc != 0)); then
        log "FAILED: kafka start (exit $rc)"
        failed+=("kafka start")
        services_up=0
    fi
fi

if ((services_up)); then
    # Exit status 5 (no tests collected) is non-zero, so it counts as a failure here too.
    step "pytest $*" pytest "$@"
else
    log "skipping pytest: the services did not start"
    failed+=("pytest (not run)")
fi

if ((${#failed[@]})); then
    log "failed steps:"
    printf '[deploy]   %s\n' "${failed[@]}" >&2
    exit 1
fi
log "all steps passed"
