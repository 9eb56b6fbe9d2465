"""The in-process proxy fixture keeps what the tests rely on: its stderr_text() is its own log (other
proxies' records stay out), a crash on its event loop shows up there with its traceback (so "no
Traceback in the log" still means something), and stop() is the graceful shutdown."""

from __future__ import annotations

import pytest

from tests.fixtures.helpers import wait_for

pytestmark = pytest.mark.proxy_only


def test_each_proxy_logs_its_own_records_and_crashes(make_inproc_proxy, redis_server):
    a = make_inproc_proxy(redis_server)
    b = make_inproc_proxy(redis_server)
    assert f"listening on 127.0.0.1:{a.port}" in a.stderr_text()
    assert f"listening on 127.0.0.1:{a.port}" not in b.stderr_text()
    a._loop.call_soon_threadsafe(lambda: 1 / 0)       # a callback that raises, as a buggy protocol would
    wait_for(lambda: "ZeroDivisionError" in a.stderr_text(), what="the crash in a's log")
    assert "Traceback" in a.stderr_text()
    assert "Traceback" not in b.stderr_text()


def test_stop_is_the_graceful_shutdown(make_inproc_proxy, redis_server):
    p = make_inproc_proxy(redis_server)
    c = p.client(protocol=2)
    assert c.set("k", "v") is True
    assert p.stop() == 0
    assert not p.alive
    assert "shutting down" in p.stderr_text() and "stopped" in p.stderr_text()
    p.start()                                          # again, on the same port
    assert p.client(protocol=2).get("k") == b"v"
