"""Logs: one line per event (JSON with log.format: json), and secrets (listen passwords, AUTH
arguments, passwords in DSNs and Redis URLs) never in the proxy's log output or its error replies."""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request

import pytest
import yaml

from tests.fixtures.helpers import wait_for
from tests.fixtures.ports import free_port
from tests.fixtures.redis_server import RedisServer

pytestmark = [pytest.mark.proxy_only, pytest.mark.timeout(120)]

LISTEN_PW = "L1stenPassw0rd"
DSN_PW = "S3cretPassw0rd"
WRONG_PW = "Wr0ngGuessPw"
NEW_DSN_PW = "N3wDsnPassw0rd"
UPSTREAM_PW = "Upstr3amPassw0rd"


def test_secrets_never_reach_logs_or_clients(make_proxy, redis_server):
    admin = free_port()
    p = make_proxy(redis_server, listen={"password": LISTEN_PW},
                   backends={"main": {"type": "postgres", "connect_timeout": 1,
                                      "dsn": f"postgresql://postgres:{DSN_PW}@127.0.0.1:1/test"}},
                   routes=[{"key": "user:{id:int}", "backend": "main",
                            "read": {"query": "SELECT 1 AS id WHERE 1 = $1", "as": "json"}}],
                   admin={"enabled": True, "port": admin}, log={"format": "json", "level": "debug"})
    replies = []
    with p.raw() as r:
        replies.append(r.cmd("AUTH", WRONG_PW).value)
        replies.append(r.cmd("AUTH", "someone", WRONG_PW).value)
        replies.append(r.cmd("HELLO", "3", "AUTH", "default", WRONG_PW).value)
        replies.append(r.cmd("AUTH", LISTEN_PW).value)
        replies.append(r.cmd("GET", "user:1").value)             # the backend is unreachable
    assert replies[3] == "OK" and "backend main unavailable" in replies[4]
    status, body = _get(f"http://127.0.0.1:{admin}/readyz")
    assert status == 503 and "backend:main" in body
    # A reload with a new, unreachable DSN: refused, and its password is not logged either.
    data = yaml.safe_load(p.config_path.read_text())
    data["backends"]["main"]["dsn"] = f"postgresql://postgres:{NEW_DSN_PW}@127.0.0.1:2/test"
    p.config_path.write_text(yaml.safe_dump(data))
    p.signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in p.stderr_text(), timeout=15, what="the refused reload")
    time.sleep(0.3)
    log = p.stderr_text()
    assert "backends.main: not reachable" in log
    for secret in (LISTEN_PW, DSN_PW, WRONG_PW, NEW_DSN_PW):
        assert secret not in log, f"{secret} in the log"
        assert not any(secret in str(reply) for reply in replies), f"{secret} in a reply"
        assert secret not in body
    lines = log.splitlines()
    assert len(lines) >= 5
    for line in lines:
        entry = json.loads(line)             # one JSON object per line
        assert {"ts", "level", "logger", "msg"} <= set(entry)


def test_upstream_password_never_reaches_logs(make_proxy, tmp_path):
    guarded = RedisServer(tmp_path / "guarded", extra_args=["--requirepass", "TheRealOne"]).start()
    try:
        admin = free_port()
        # A wrong password: every handshake fails, and the proxy logs and reports that.
        p = make_proxy(f"redis://default:{UPSTREAM_PW}@127.0.0.1:{guarded.port}/0",
                       admin={"enabled": True, "port": admin}, log={"level": "debug"})
        with p.raw() as r:
            reply = r.cmd("GET", "k").value
        assert "upstream unavailable" in reply and UPSTREAM_PW not in reply
        status, body = _get(f"http://127.0.0.1:{admin}/readyz")
        assert status == 503 and "upstream" in body and UPSTREAM_PW not in body
        p.stop()
        log = p.stderr_text()
        assert f"upstream redis://default:***@127.0.0.1:{guarded.port}/0" in log
        assert "WRONGPASS" in log or "invalid" in log
        assert UPSTREAM_PW not in log
    finally:
        guarded.stop()


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
