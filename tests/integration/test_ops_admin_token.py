"""The admin endpoint's token (security issue): /metrics and /readyz need `Authorization: Bearer`,
/healthz stays open for liveness probes, and oversized or slow requests are dropped."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request

import pytest

from tests.fixtures.ports import free_port

pytestmark = [pytest.mark.proxy_only, pytest.mark.timeout(30)]


def get(port: int, path: str, token: str | None = None) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            return reply.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.parametrize("source", ["token", "token_file"])
def test_metrics_and_readyz_need_the_token(make_inproc_proxy, redis_server, tmp_path, source):
    admin = free_port()
    settings: dict = {"enabled": True, "port": admin}
    if source == "token":
        settings["token"] = "s3cret-admin-token"
    else:
        path = tmp_path / "token"
        path.write_text("s3cret-admin-token\n")
        settings["token_file"] = str(path)
    make_inproc_proxy(redis_server, admin=settings)
    assert get(admin, "/healthz") == 200
    for path in ("/metrics", "/readyz"):
        assert get(admin, path) == 401
        assert get(admin, path, "wrong") == 401
        assert get(admin, path, "s3cret-admin-token") == 200


def test_oversized_requests_are_dropped(make_inproc_proxy, redis_server):
    admin = free_port()
    make_inproc_proxy(redis_server, admin={"enabled": True, "port": admin})
    with socket.create_connection(("127.0.0.1", admin), timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nX-Junk: " + b"a" * 20000 + b"\r\n\r\n")
        s.settimeout(5)
        assert s.recv(100) == b""      # closed without an answer
    assert get(admin, "/healthz") == 200
