#!/usr/bin/env bash
# The demo: Redis, PostgreSQL and a local DynamoDB (moto) on loopback, sample data, the proxy with
# config/demo.yaml, and a walk-through of what it does.
#   ./demo.sh          set up, walk through, leave the proxy running on 127.0.0.1:6380
#   ./demo.sh --check  the same, non-interactive, then stop what it started (CI runs this)
#   ./demo.sh stop     stop the proxy and the DynamoDB stand-in the demo started
# Running it twice is fine: Redis, PostgreSQL and moto are reused, the proxy is restarted, the data
# re-seeded. Redis (6379) and PostgreSQL (5432) are the machine's own and are left running.
# Ports (defaults): DEMO_PORT=6380 (proxy), DEMO_ADMIN_PORT=9121 (/metrics), DEMO_DDB_PORT=8001 (moto);
# DEMO_STATE=.demo holds pid files and logs. `./demo.sh stop` needs the same DEMO_STATE.
set -euo pipefail
cd "$(dirname "$0")"
export DEMO_PORT=${DEMO_PORT:-6380} DEMO_ADMIN_PORT=${DEMO_ADMIN_PORT:-9121} DEMO_DDB_PORT=${DEMO_DDB_PORT:-8001}
state=${DEMO_STATE:-.demo}
mkdir -p "$state"
export AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-demo} AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-demo}
export AWS_DEFAULT_REGION=${AWS_DEFAULT_REGION:-us-east-1}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Stop the process in pid file $1 and wait (up to 15 s) until it has exited, so its port is free.
stop_pid() {
    [ -f "$1" ] || return 0
    local pid
    pid=$(cat "$1")
    rm -f "$1"
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
}
stop_all() {
    stop_pid "$state/proxy.pid"
    stop_pid "$state/moto.pid"
    echo "demo stopped (Redis and PostgreSQL are left running)"
}
case "${1:-}" in
    stop) stop_all; exit 0 ;;
    ""|--check) ;;
    *) echo "usage: $0 [--check | stop]" >&2; exit 2 ;;
esac

scripts/ensure-env.sh

# DynamoDB stand-in: moto's server on loopback (reused when something already answers there).
if ! port_open "$DEMO_DDB_PORT"; then
    .venv/bin/python -m moto.server -H 127.0.0.1 -p "$DEMO_DDB_PORT" >"$state/moto.log" 2>&1 &
    echo $! >"$state/moto.pid"
    for _ in $(seq 100); do port_open "$DEMO_DDB_PORT" && break; sleep 0.1; done
fi

.venv/bin/python scripts/demo_seed.py

# The proxy: restarted so it runs this checkout's code and config. The ports come from the
# environment (CACHEPROXY_<SECTION>__<FIELD> overrides any config field).
stop_pid "$state/proxy.pid"
if port_open "$DEMO_PORT"; then
    echo "demo: something else listens on 127.0.0.1:$DEMO_PORT; stop it or set DEMO_PORT" >&2
    exit 1
fi
CACHEPROXY_LISTEN__PORT=$DEMO_PORT CACHEPROXY_ADMIN__PORT=$DEMO_ADMIN_PORT \
    .venv/bin/cacheproxy serve --config config/demo.yaml --pid-file "$state/proxy.pid" >"$state/proxy.log" 2>&1 &
echo $! >"$state/proxy.pid"
for _ in $(seq 100); do redis-cli -p "$DEMO_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
if ! redis-cli -p "$DEMO_PORT" ping >/dev/null 2>&1; then
    echo "demo: the proxy did not start; its log ($state/proxy.log) ends with:" >&2
    tail -20 "$state/proxy.log" >&2
    stop_all
    exit 1
fi

status=0
.venv/bin/python scripts/demo_walkthrough.py || status=$?
if [ "${1:-}" = --check ]; then
    stop_all
    exit $status
fi
cat <<MSG

The proxy is running on 127.0.0.1:$DEMO_PORT (log: $state/proxy.log, metrics: http://127.0.0.1:$DEMO_ADMIN_PORT/metrics).
Try:    redis-cli -p $DEMO_PORT GET user:3      redis-cli -p $DEMO_PORT HGETALL profile:u2
        .venv/bin/cacheproxy stats --admin http://127.0.0.1:$DEMO_ADMIN_PORT
Reload: edit config/demo.yaml, then  .venv/bin/cacheproxy reload --pid-file $state/proxy.pid
Stop:   ./demo.sh stop
MSG
exit $status
