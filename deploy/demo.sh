#!/usr/bin/env bash
# THE product command (README's first Quick start command):
#
#   deploy/demo.sh
#
# Installs what is missing, starts Redis and Kafka (KRaft) on loopback, creates the topics,
# starts the ingest consumer and the lookup server with the example rules, feeds a small
# synthetic stream of events, prints curl lines to try, and waits. Ctrl-C stops everything
# it started, in order: lookup, ingest, then the services it started itself.
#
# Settings (env): DMP_LOOKUP_PORT (18080), DMP_INGEST_METRICS_PORT (18081), DMP_DEMO_COOKIES
# (300), DMP_RULES_PATH (segment_rules/examples/segments.yaml), and those of deploy/lib.sh.
set -euo pipefail

# shellcheck source=deploy/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

cd "$DMP_ROOT"
deploy="$DMP_ROOT/deploy"
demo_dir="$DMP_STATE_DIR/demo"
mkdir -p "$demo_dir"

export DMP_LOOKUP_PORT="${DMP_LOOKUP_PORT:-18080}"
export DMP_INGEST_METRICS_PORT="${DMP_INGEST_METRICS_PORT:-18081}"
export DMP_RULES_PATH="${DMP_RULES_PATH:-$DMP_ROOT/segment_rules/examples/segments.yaml}"
export DMP_KAFKA_BOOTSTRAP="$DMP_HOST:$DMP_KAFKA_PORT"
if [[ -n $DMP_REDIS_PASSWORD ]]; then
    export DMP_REDIS_URL="redis://:$DMP_REDIS_PASSWORD@$DMP_HOST:$DMP_REDIS_PORT/0"
else
    export DMP_REDIS_URL="redis://$DMP_HOST:$DMP_REDIS_PORT/0"
fi
export DMP_LOG_FORMAT="${DMP_LOG_FORMAT:-text}"
cookies="${DMP_DEMO_COOKIES:-300}"
dmp="$DMP_VENV/bin/dmp"

started=()
children=()

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    log "stopping"
    local i pid
    # Services first, newest first: lookup, then ingest (which finishes its batch and commits).
    for ((i = ${#children[@]} - 1; i >= 0; i--)); do
        pid=${children[i]}
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
            for _ in $(seq 1 100); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.1
            done
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    for ((i = ${#started[@]} - 1; i >= 0; i--)); do
        "$deploy/${started[i]}.sh" stop || true
    done
    log "stopped everything this demo started"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

"$deploy/install.sh" python redis kafka kcat

for service in redis kafka; do
    if "$deploy/$service.sh" status 2>/dev/null; then
        log "$service: already running; leaving it running afterwards"
    else
        started+=("$service")
        "$deploy/$service.sh" start
    fi
done

for port in "$DMP_LOOKUP_PORT" "$DMP_INGEST_METRICS_PORT"; do
    if port_open "$DMP_HOST" "$port"; then
        die "port $port is in use; set DMP_LOOKUP_PORT / DMP_INGEST_METRICS_PORT to free ports"
    fi
done

log "validating $DMP_RULES_PATH"
"$dmp" rules validate "$DMP_RULES_PATH"
"$dmp" topics

"$dmp" ingest >"$demo_dir/ingest.log" 2>&1 &
children+=($!)
"$dmp" lookup >"$demo_dir/lookup.log" 2>&1 &
children+=($!)
log "ingest and lookup started (logs: $demo_dir/{ingest,lookup}.log)"

lookup="http://$DMP_HOST:$DMP_LOOKUP_PORT"
for _ in $(seq 1 300); do
    if curl -fsS "$lookup/readyz" >/dev/null 2>&1; then
        break
    fi
    for pid in "${children[@]}"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            show_tail "$demo_dir/ingest.log"
            show_tail "$demo_dir/lookup.log"
            die "a service exited during start-up"
        fi
    done
    sleep 0.1
done
curl -fsS "$lookup/readyz" >/dev/null || die "lookup not ready after 30 s (see $demo_dir/lookup.log)"

"$dmp" demo-events --cookies "$cookies"
# demo-00000 qualifies for all three example segments once its events are applied.
for _ in $(seq 1 100); do
    if curl -fsS "$lookup/v1/users/demo-00000/segments" | grep -q new_car_socal; then
        break
    fi
    sleep 0.1
done

cat <<EOF

The DMP is running. Try:

  curl -s $lookup/v1/users/demo-00000/segments   # SoCal new-car intender: all three segments
  curl -s $lookup/v1/users/demo-00001/segments   # new-car intent outside SoCal
  curl -s $lookup/v1/users/demo-00002/segments   # SoCal, one view only: geo_socal
  curl -s $lookup/v1/users/nobody/segments       # unknown cookie: empty list
  curl -s $lookup/readyz
  curl -s $lookup/metrics | grep ^dmp_
  curl -s http://$DMP_HOST:$DMP_INGEST_METRICS_PORT/metrics | grep ^dmp_ingest_events

Send your own event (Kafka key = cookie id):

  echo 'me|{"uid":"me","ts":'\$(date +%s)',"type":"page_view","categories":["auto/new-cars"],"geo":{"country":"USA","region":"CA","metro":"803"}}' \\
    | kcat -P -b $DMP_KAFKA_BOOTSTRAP -t dmp.events -K '|'

Press Ctrl-C to stop everything this command started.
EOF

# Wait until Ctrl-C, or until a service dies on its own (then say so and stop the rest).
while true; do
    for pid in "${children[@]}"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            show_tail "$demo_dir/ingest.log"
            show_tail "$demo_dir/lookup.log"
            die "a service stopped unexpectedly"
        fi
    done
    sleep 1
done
