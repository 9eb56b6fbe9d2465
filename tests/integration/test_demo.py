"""The README's first command, as CI runs it: `./demo.sh --check` (non-interactive) on free ports,
then `./demo.sh stop`.

It runs once per suite run: it is proxy_only (skipped in the CACHEPROXY_TEST_DIRECT pass, which has
no proxy to show), and a file lock keeps two checkouts on one machine from running it at the same
time (both would use the machine's Redis on 6379 and the `demo_users` table in Postgres).
"""

from __future__ import annotations

import fcntl
import os
import subprocess

import pytest

from tests.fixtures.helpers import REPO
from tests.fixtures.ports import free_port

pytestmark = [pytest.mark.proxy_only, pytest.mark.timeout(300)]

LOCK = "/tmp/cacheproxy-demo-test.lock"


@pytest.fixture
def demo_lock():
    with open(LOCK, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)     # bounded by the test's timeout
        yield


def test_demo_check_then_stop(tmp_path, demo_lock):
    env = dict(os.environ, DEMO_PORT=str(free_port()), DEMO_ADMIN_PORT=str(free_port()),
               DEMO_DDB_PORT=str(free_port()), DEMO_STATE=str(tmp_path / "state"))
    env.pop("CACHEPROXY_CONFIG", None)
    try:
        out = subprocess.run(["./demo.sh", "--check"], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=270, stdin=subprocess.DEVNULL)
    finally:
        stopped = subprocess.run(["./demo.sh", "stop"], cwd=REPO, env=env, capture_output=True, text=True,
                                 timeout=30)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    for expected in ("loads it from Postgres", "is a hit", "(hit: ", "the miss took",
                     "DynamoDB item served as a Redis hash", "reaches Postgres through write-behind",
                     "the write landed in Postgres", "cached as 'not found'",
                     f"http://127.0.0.1:{env['DEMO_ADMIN_PORT']}/metrics", "cache hit ratio",
                     "demo walk-through: all steps passed", "demo stopped"):
        assert expected in text, f"demo output lacks {expected!r}:\n{text[-3000:]}"
    assert "FAILED" not in text
    assert stopped.returncode == 0 and "demo stopped" in stopped.stdout
    state = tmp_path / "state"
    assert not (state / "proxy.pid").exists() and not (state / "moto.pid").exists(), "nothing left running"
    assert f"listening on 127.0.0.1:{env['DEMO_PORT']}" in (state / "proxy.log").read_text()
