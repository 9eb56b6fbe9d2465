"""Every option from the environment: CACHEPROXY_<SECTION>__<FIELD>=value, for check-config and for a
running proxy (nested fields and list items included)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from tests.fixtures.helpers import REPO
from tests.fixtures.ports import free_port
from tests.fixtures.postgres import DSN
from tests.fixtures.proxy import ProxyProcess
from tests.fixtures.writebehind import routes

pytestmark = [pytest.mark.proxy_only, pytest.mark.timeout(60)]


def test_check_config_takes_overrides(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"backends": {"main": {"type": "postgres", "dsn": DSN}}}))
    env = {"PATH": "/usr/bin:/bin", "CACHEPROXY_UPSTREAM__URL": "redis://cache.internal:6390/2"}
    out = subprocess.run([sys.executable, "-m", "proxy", "check-config", str(cfg)], cwd=REPO, capture_output=True,
                         text=True, timeout=30, env=env)
    assert out.returncode == 0, out.stderr
    assert "upstream redis://cache.internal:6390/2" in out.stdout
    env["CACHEPROXY_LISTEN__PORT"] = "high"
    out = subprocess.run([sys.executable, "-m", "proxy", "check-config", str(cfg)], cwd=REPO, capture_output=True,
                         text=True, timeout=30, env=env)
    assert out.returncode == 2
    assert f"{cfg}: listen.port: " in out.stderr and "set by CACHEPROXY_LISTEN__PORT" in out.stderr


def test_a_running_proxy_takes_overrides(tmp_path, redis_server, pg):
    p = ProxyProcess(redis_server, tmp_path / "proxy", {
        "backends": {"main": {"type": "postgres", "dsn": DSN}}, "routes": routes(pg.schema)})
    p.port = free_port()          # the file says another port: the environment wins
    env = {"CACHEPROXY_LISTEN__PORT": str(p.port), "CACHEPROXY_LOG__FORMAT": "json",
           "CACHEPROXY_ROUTES__0__TTL__SECONDS": "77", "CACHEPROXY_BACKENDS__MAIN__MAX_POOL": "2"}
    p.start(env=env)
    try:
        c = p.client(protocol=2)
        assert json.loads(c.get("user:1"))["name"] == "user 1"
        assert 70_000 < redis_server.client().pttl("user:1") <= 77_000
    finally:
        p.stop()
    lines = p.stderr_text().splitlines()
    assert any(json.loads(line)["msg"].startswith(f"listening on 127.0.0.1:{p.port}") for line in lines)
