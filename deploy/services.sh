#!/usr/bin/env bash
# Start, stop or check both backing services: Redis, then Kafka (stopped in reverse order).
#
#   deploy/services.sh start|stop|status|reset
set -euo pipefail

# shellcheck source=deploy/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

deploy="$DMP_ROOT/deploy"
case "${1:-}" in
start)
    "$deploy/redis.sh" start
    "$deploy/kafka.sh" start
    ;;
stop | reset)
    "$deploy/kafka.sh" "$1"
    "$deploy/redis.sh" "$1"
    ;;
status)
    rc=0
    "$deploy/redis.sh" status || rc=1
    "$deploy/kafka.sh" status || rc=1
    exit "$rc"
    ;;
*)
    echo "usage: $0 start|stop|status|reset" >&2
    exit 2
    ;;
esac
