#!/usr/bin/env bash
# The demo: Redis, PostgreSQL and a local DynamoDB (moto) on loopback, sample data, the proxy with
# config/demo.yaml, and a walk-through of what it does.
#   ./demo.sh          set up, walk through, leave the proxy running on 127.0.0.1:6380
#   ./demo.sh --check  the same, non-interactive, then stop what it started (CI runs this)
#   ./demo.sh stop     stop the proxy and the DynamoDB stand-in the demo started
# Running it twice is fine: what is already running is reused.
set -euo pipefail
cd "$(dirname "$0")"
state=.demo
mkdir -p "$state"
export DEMO_DDB_PORT=${DEMO_DDB_PORT:-8001}
export AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-demo} AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-demo}
export AWS_DEFAULT_REGION=${AWS_DEFAULT_REGION:-us-east-1}

stop_pid() { [ -f "$1" ] && kill "$(cat "$1")" 2>/dev/null; rm -f "$1"; }
stop_all() {
    stop_pid "$state/proxy.pid"
    stop_pid "$state/moto.pid"
    echo "demo stopped (Redis and PostgreSQL are left running)"
}
if [ "${1:-}" = stop ]; then stop_all; exit 0; fi

scripts/ensure-env.sh

# DynamoDB stand-in: moto's server on loopback.
if ! (exec 3<>"/dev/tcp/127.0.0.1/$DEMO_DDB_PORT") 2>/dev/null; then
    .venv/bin/python -m moto.server -H 127.0.0.1 -p "$DEMO_DDB_PORT" >"$state/moto.log" 2>&1 &
    echo $! >"$state/moto.pid"
    for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$DEMO_DDB_PORT") 2>/dev/null && break; sleep 0.1; done
fi

.venv/bin/python scripts/demo_seed.py

# The proxy (restarted so it runs this checkout's code and config).
stop_pid "$state/proxy.pid"
.venv/bin/cacheproxy serve --config config/demo.yaml >"$state/proxy.log" 2>&1 &
echo $! >"$state/proxy.pid"
for _ in $(seq 100); do redis-cli -p 6380 ping >/dev/null 2>&1 && break; sleep 0.1; done

status=0
.venv/bin/python scripts/demo_walkthrough.py || status=$?
if [ "${1:-}" = --check ]; then
    stop_all
    exit $status
fi
cat <<MSG

The proxy is running on 127.0.0.1:6380 (log: $state/proxy.log, metrics: http://127.0.0.1:9121/metrics).
Try:  redis-cli -p 6380 GET user:3      redis-cli -p 6380 HGETALL profile:u2
Stop: ./demo.sh stop
MSG
exit $status
