"""Compatibility (issue 17 items 2, 5, 6): connection state and authentication as with Redis.

- HELLO on a connection that SELECTed another database keeps that database and switches protocol.
- Without listen.password, `HELLO 3 AUTH default <anything>` is accepted (Redis's default user without
  a password does), so redis-py 8 with a password in its URL and RESP3 connects.
- listen.auth: upstream: AUTH / HELLO AUTH are checked by Redis itself, so a password set with CONFIG
  SET requirepass through the proxy is the one clients send, and the proxy says clearly (logs,
  /readyz) when its own credentials stop working for new connections.
- CLIENT TRACKING ON REDIRECT <id> between two clients of the proxy.
"""

import json
import time
import urllib.error
import urllib.request

import pytest
import redis

from tests.fixtures.redis_server import free_port

proxy_only = pytest.mark.proxy_only


@pytest.mark.parametrize("first", [2, 3])
def test_hello_after_select_keeps_the_database(proxy, redis_server, first):
    with proxy.raw() as c:
        if first == 3:
            assert c.cmd("HELLO", 3).kind == "%"
        assert c.cmd("SELECT", 9).value == "OK"
        hello = c.cmd("HELLO", 3)
        assert hello.kind == "%" and hello.py()[b"proto"] == 3, hello
        assert c.cmd("SET", "hs:k", "nine").value == "OK"
        assert c.cmd("HGETALL", "hs:none").kind == "%"        # RESP3 replies on the selected db's connection
        hello = c.cmd("HELLO", 2)
        assert hello.kind == "*", hello
        assert c.cmd("GET", "hs:k").value == b"nine"
    assert redis_server.client(db=9).get("hs:k") == b"nine"
    assert redis_server.client(db=0).get("hs:k") is None


@pytest.mark.parametrize("protocol", [2, 3])
def test_password_in_url_without_a_password_configured(proxy, protocol):
    """redis-py 8 sends `HELLO 3 AUTH default <password>` (RESP3) or `AUTH default <password>`: Redis's
    passwordless default user accepts any password; so does the proxy without listen.password."""
    client = redis.Redis.from_url(f"redis://default:whatever@127.0.0.1:{proxy.port}/0", protocol=protocol)
    assert client.ping() is True
    assert client.set("pw:k", "1") is True
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(f"redis://someone:whatever@127.0.0.1:{proxy.port}/0", protocol=protocol).ping()


def readyz(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@proxy_only
@pytest.mark.timeout(60)
def test_auth_checked_by_the_upstream(redis_server, make_proxy):
    """listen.auth: upstream, as redis-py's own test_auth does it: CONFIG SET requirepass through the
    proxy, then AUTH with that password (on main: AUTH never reached Redis and was refused)."""
    admin_port = free_port()
    proxy = make_proxy(redis_server, listen={"auth": "upstream"},
                       admin={"enabled": True, "port": admin_port, "readiness_cache_seconds": 0})
    r = proxy.client(protocol=2, decode_responses=True)
    assert r.ping() is True                                     # Redis needs no password yet
    with pytest.raises(redis.AuthenticationError, match="without any password configured"):
        r.auth("some_password")                                 # Redis's own answer
    try:
        assert r.config_set("requirepass", "temp_pass") is True
        assert r.auth("temp_pass") is True and r.auth("temp_pass", "default") is True
        with pytest.raises(redis.AuthenticationError):
            r.auth("wrong")
        for protocol in (2, 3):
            app = redis.Redis.from_url(f"redis://default:temp_pass@127.0.0.1:{proxy.port}/0", protocol=protocol)
            assert app.set("ua:k", "v") is True and app.get("ua:k") == b"v"
            with pytest.raises(redis.AuthenticationError):
                redis.Redis.from_url(f"redis://default:nope@127.0.0.1:{proxy.port}/0", protocol=protocol).ping()
        time.sleep(1.5)                         # past the cached "no password needed"
        with proxy.raw() as anonymous:
            assert anonymous.cmd("GET", "ua:k").value.startswith("NOAUTH"), "unauthenticated client let in"
        # The proxy's own new connections are refused now (its url has no password): /readyz says so.
        with proxy.raw() as c:
            c.cmd("AUTH", "temp_pass")
            assert c.cmd("SUBSCRIBE", "ua:ch").kind in "*>-"     # needs a new dedicated connection
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            status, body = readyz(admin_port)
            if body["problems"].get("upstream_credentials"):
                break
            # make the proxy open more connections
            redis_server.client(password="temp_pass").client_kill_filter(_type="pubsub", skipme=True)
            time.sleep(0.2)
        assert status == 503 and "refused the proxy's own credentials" in body["problems"]["upstream_credentials"]
        assert "refused the proxy's own credentials" in proxy.stderr_text()
    finally:
        redis_server.client(password="temp_pass").config_set("requirepass", "")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and readyz(admin_port)[0] != 200:
        time.sleep(0.2)
    assert readyz(admin_port)[0] == 200


@proxy_only
def test_auth_upstream_refuses_a_local_password_too(redis_server, tmp_path):
    from tests.fixtures.proxy import ProxyProcess
    p = ProxyProcess(redis_server, tmp_path, {"listen": {"auth": "upstream", "password": "x"}})
    with pytest.raises(RuntimeError, match="auth: upstream"):
        p.start()


def test_tracking_redirect_between_two_clients(proxy, redis_server):
    """CLIENT TRACKING ON REDIRECT <id of another client subscribed to __redis__:invalidate>: that client
    receives the invalidations (on main the proxy's client id went to Redis as it was)."""
    with proxy.raw() as target, proxy.raw() as tracker:
        target_id = target.cmd("CLIENT", "ID").value
        assert target.cmd("SUBSCRIBE", "__redis__:invalidate").py() == [b"subscribe", b"__redis__:invalidate", 1]
        assert tracker.cmd("CLIENT", "TRACKING", "ON", "REDIRECT", target_id).value == "OK"
        assert tracker.cmd("GET", "tr:k").value is None       # now tracked
        redis_server.client().set("tr:k", "changed")
        message = target.read_frame(timeout=5).py()
        assert message[:2] == [b"message", b"__redis__:invalidate"] and message[2] == [b"tr:k"], message


@proxy_only
def test_tracking_redirect_refusals(proxy):
    with proxy.raw() as idle, proxy.raw() as tracker:
        idle_id = idle.cmd("CLIENT", "ID").value
        reply = tracker.cmd("CLIENT", "TRACKING", "ON", "REDIRECT", idle_id)
        assert reply.is_error and "needs a target client that is subscribed" in reply.value, reply
        reply = tracker.cmd("CLIENT", "TRACKING", "ON", "REDIRECT", 987654)
        assert reply.value == "ERR The client ID you want redirect to does not exist"
        assert tracker.cmd("PING").value == "PONG"      # still an ordinary client
