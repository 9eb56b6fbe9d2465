#!/usr/bin/env bash
# Make this machine able to run cacheproxy and its tests: Debian packages (python3-venv, redis-server,
# PostgreSQL), a Redis on 127.0.0.1:6379, a PostgreSQL on 127.0.0.1:5432 with database `test`
# (trust auth for local connections), and the project's virtual environment at .venv.
# Idempotent: everything already present is left as it is. Used by run-tests.sh, demo.sh and .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[ensure-env] %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
command -v redis-server >/dev/null || missing+=(redis-server)
command -v redis-benchmark >/dev/null || missing+=(redis-tools)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || missing+=(postgresql)
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Redis on 6379 (the tests start their own servers too; the demo uses this one).
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    log "starting redis-server on 127.0.0.1:6379"
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
        --dir /tmp --logfile /tmp/cacheproxy-redis-6379.log
    for _ in $(seq 50); do redis-cli -p 6379 ping >/dev/null 2>&1 && break; sleep 0.1; done
fi

# PostgreSQL on 5432 with a `test` database that the postgres user reaches without a password.
pg_ready() { psql -h 127.0.0.1 -U postgres -d postgres -Atc 'select 1' >/dev/null 2>&1; }
if ! pg_ready; then
    if command -v pg_ctlcluster >/dev/null && ls /etc/postgresql/*/main >/dev/null 2>&1; then
        version=$(ls /etc/postgresql | sort -V | tail -1)
        hba=/etc/postgresql/$version/main/pg_hba.conf
        if ! grep -q 'cacheproxy: trust' "$hba"; then
            log "allowing trust auth for local TCP connections in $hba"
            as_root sed -i '1i host all all 127.0.0.1/32 trust # cacheproxy: trust\nhost all all ::1/128 trust # cacheproxy: trust' "$hba"
        fi
        log "starting PostgreSQL $version"
        as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start 2>/dev/null \
            || as_root pg_ctlcluster --skip-systemctl-redirect "$version" main reload
        for _ in $(seq 100); do pg_ready && break; sleep 0.1; done
    fi
fi
if pg_ready; then
    psql -h 127.0.0.1 -U postgres -d postgres -Atc "select 1 from pg_database where datname='test'" | grep -q 1 \
        || psql -h 127.0.0.1 -U postgres -d postgres -qc 'create database test'
else
    log "WARNING: PostgreSQL is not reachable on 127.0.0.1:5432; backend tests will fail"
fi

# The project's virtual environment, with the versions pinned in requirements.lock (the ranges stay in
# pyproject.toml; README "Dependencies" says how to update the lock). uv installs them in seconds; if
# uv cannot be had, pip installs the same pins. Reinstalled whenever pyproject.toml or the lock changes.
UV_VERSION=0.13.9
lock=requirements.lock
if [ ! -x .venv/bin/python ]; then
    log "creating .venv"
    python3 -m venv .venv
fi
stamp=.venv/.cacheproxy-installed
wanted=$(cat pyproject.toml "$lock" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    log "installing cacheproxy and its test dependencies ($lock) into .venv"
    if .venv/bin/uv --version 2>/dev/null | grep -q "^uv $UV_VERSION\b" \
        || .venv/bin/python -m pip install -q "uv==$UV_VERSION"; then
        .venv/bin/uv pip install --python .venv/bin/python -q --constraint "$lock" -e '.[test]'
    else
        log "uv not available; installing with pip"
        .venv/bin/python -m pip install -q --constraint "$lock" -e '.[test]'
    fi
    echo "$wanted" > "$stamp"
fi
