"""Core (issue 2): the proxy as a process. Upstream outages and recovery, authentication, client
limits, idle timeout, graceful shutdown on SIGTERM/SIGINT, the CLI (check-config, --version,
CACHEPROXY_CONFIG), and the commands it refuses.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import pytest
import redis
import yaml
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.fixtures.proxy import (
    DEFAULT_CONFIG,
    REPO_ROOT,
    START_TIMEOUT,
    ProxyProcess,
    deep_merge,
    encode_command,
)
from tests.fixtures.redis_server import RedisServer, free_port

proxy_only = pytest.mark.proxy_only


def run_cli(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.pop("CACHEPROXY_CONFIG", None)
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args], cwd=REPO_ROOT, env=env,
        capture_output=True, text=True, timeout=timeout,
    )


def wait_until(predicate, timeout: float, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    last_exc = None
    while time.monotonic() < deadline:
        try:
            result = predicate()
            if result:
                return result
        except Exception as exc:  # retried until the deadline
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last error: {last_exc!r})")


# --------------------------------------------------------------------------- upstream outages


@proxy_only
@pytest.mark.timeout(60)
def test_upstream_killed_then_restarted(redis_server, make_inproc_proxy):
    proxy = make_inproc_proxy(redis_server, upstream={"connect_timeout": 1.0})
    r = proxy.client(protocol=3, decode_responses=True)
    assert r.set("up:k", "1") is True
    held = proxy.raw()
    assert held.cmd("GET", "up:k").value == b"1"
    in_flight = proxy.raw(timeout=10)
    in_flight.send(encode_command("DEBUG", "SLEEP", "3") + encode_command("GET", "up:k"))
    time.sleep(0.3)
    redis_server.kill()
    # commands that were waiting on the upstream when it died get the documented error, promptly
    t0 = time.monotonic()
    for _ in range(2):
        reply = in_flight.read_frame(timeout=5)
        assert reply.is_error and reply.value.startswith("ERR upstream unavailable"), reply
    assert time.monotonic() - t0 < 2.5
    in_flight.close()

    for _ in range(3):
        t0 = time.monotonic()
        with pytest.raises(redis.ResponseError, match="^upstream unavailable"):
            r.get("up:k")
        assert time.monotonic() - t0 < 5, "upstream-down error was not fast"
    t0 = time.monotonic()
    reply = held.cmd("SET", "up:k", "2", timeout=5)
    assert reply.is_error and reply.value.startswith("ERR upstream unavailable"), reply
    assert time.monotonic() - t0 < 5
    with proxy.raw() as fresh:  # new clients are still accepted and answered
        assert fresh.cmd("PING", timeout=5).kind in "+-"
        assert fresh.cmd("GET", "up:k", timeout=5).value.startswith("ERR upstream unavailable")

    redis_server.restart()
    wait_until(lambda: r.set("up:k", "back") is True, timeout=15, interval=0.2)
    assert r.get("up:k") == "back"
    # the connection that lived through the outage works again too
    wait_until(lambda: held.cmd("GET", "up:k").value == b"back", timeout=15, interval=0.2)
    assert held.cmd("INCR", "up:n").value == 1
    held.close()
    assert "Traceback" not in proxy.stderr_text()


@proxy_only
@pytest.mark.timeout(60)
def test_upstream_down_at_start_then_comes_up(tmp_path, make_inproc_proxy):
    port = free_port()
    proxy = make_inproc_proxy(f"redis://127.0.0.1:{port}/0", upstream={"connect_timeout": 1.0})
    r = proxy.client(protocol=2)
    t0 = time.monotonic()
    with pytest.raises(redis.ResponseError, match="^upstream unavailable"):
        r.get("k")
    assert time.monotonic() - t0 < 5
    server = RedisServer(tmp_path / "late-redis", port=port).start()
    try:
        wait_until(lambda: r.set("k", "v") is True, timeout=15, interval=0.2)
        assert server.client().get("k") == b"v"
    finally:
        server.stop()


@pytest.mark.timeout(60)
def test_blocked_client_gets_error_when_upstream_dies(redis_server, inproc_proxy):
    with inproc_proxy.raw(timeout=10) as blocked:
        blocked.send_command("BLPOP", "dead:q", 0)
        time.sleep(0.3)
        redis_server.kill()
        t0 = time.monotonic()
        try:
            frame = blocked.read_frame(timeout=8)
            assert frame.is_error, f"BLPOP on a dead upstream returned {frame}"
        except ConnectionError:
            pass  # closing the client's connection is an acceptable answer too
        assert time.monotonic() - t0 < 6
    if not inproc_proxy.direct:
        redis_server.restart()
        r = inproc_proxy.client(protocol=2)
        wait_until(lambda: r.ping() and r.set("dead:k", "1"), timeout=15, interval=0.2)
        assert r.get("dead:k") == b"1"


@proxy_only
@pytest.mark.timeout(60)
def test_upstream_hangs_command_timeout(redis_server, make_inproc_proxy):
    proxy = make_inproc_proxy(redis_server, upstream={"command_timeout": 1.0, "connect_timeout": 1.0})
    r = proxy.client(protocol=2, socket_timeout=15)
    assert r.set("hang:k", "1") is True
    os.kill(redis_server.proc.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        with pytest.raises((redis.ResponseError, redis.ConnectionError)):
            r.get("hang:k")
        assert time.monotonic() - t0 < 6, "no upstream command timeout"
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
    r2 = proxy.client(protocol=2)
    wait_until(lambda: r2.get("hang:k") == b"1", timeout=15, interval=0.2)


# --------------------------------------------------------------------------- auth and limits


@proxy_only
def test_password_required(redis_server, make_inproc_proxy):
    proxy = make_inproc_proxy(redis_server, listen={"password": "s3cret"})
    redis_server.client().set("auth:k", "v")
    with proxy.raw() as c:
        reply = c.cmd("GET", "auth:k")
        assert reply.is_error and reply.value == "NOAUTH Authentication required.", reply
        reply = c.cmd("SET", "auth:k", "hacked")
        assert reply.is_error and reply.value.startswith("NOAUTH")
        reply = c.cmd("AUTH", "wrong")
        assert reply.is_error and reply.value.split()[0] in ("WRONGPASS", "ERR"), reply
        assert c.cmd("GET", "auth:k").value.startswith("NOAUTH")
        reply = c.cmd("HELLO", 3)
        assert reply.is_error and reply.value.startswith("NOAUTH"), reply
        assert c.cmd("AUTH", "s3cret").value == "OK"
        assert c.cmd("GET", "auth:k").value == b"v"
    assert redis_server.client().get("auth:k") == b"v"
    with proxy.raw() as c:
        assert c.cmd("AUTH", "default", "s3cret").value == "OK"
        assert c.cmd("GET", "auth:k").value == b"v"
    with proxy.raw() as c:
        reply = c.cmd("HELLO", 3, "AUTH", "default", "s3cret")
        assert reply.kind == "%" and reply.py()[b"proto"] == 3
        assert c.cmd("HGETALL", "auth:none").kind == "%"
        assert c.cmd("GET", "auth:k").value == b"v"
    with proxy.raw() as c:
        reply = c.cmd("HELLO", 3, "AUTH", "default", "nope")
        assert reply.is_error
        assert c.cmd("GET", "auth:k").value.startswith("NOAUTH")
    for protocol in (2, 3):
        ok = proxy.client(protocol=protocol, password="s3cret")
        assert ok.get("auth:k") == b"v"
        ok.close()
        no_retry = Retry(NoBackoff(), 0)  # redis-py retries auth failures with backoff by default
        with pytest.raises(redis.AuthenticationError):
            proxy.client(protocol=protocol, retry=no_retry).get("auth:k")
        with pytest.raises(redis.AuthenticationError):
            proxy.client(protocol=protocol, password="wrong", retry=no_retry).get("auth:k")
    proc = proxy.cli("-a", "s3cret", "--no-auth-warning", "GET", "auth:k")
    assert proc.stdout == "v\n", proc


@proxy_only
@pytest.mark.timeout(30)
def test_max_clients(redis_server, make_inproc_proxy):
    proxy = make_inproc_proxy(redis_server, listen={"max_clients": 2})
    time.sleep(0.3)  # let the proxy notice that its readiness probe hung up
    a, b = proxy.raw(), proxy.raw()
    try:
        assert a.cmd("PING").value == "PONG"
        assert b.cmd("PING").value == "PONG"
        third = proxy.raw()
        try:
            third.sock.settimeout(0.5)
            try:
                early = third.sock.recv(256)
            except TimeoutError:
                early = b""
            if not early:
                third.send(encode_command("PING"))
                early = third.read_line(timeout=3)
            assert early.startswith(b"-ERR max number of clients reached"), early
            assert third.wait_closed(3)
        finally:
            third.close()
        assert a.cmd("SET", "mc:k", "1").value == "OK"
        assert b.cmd("GET", "mc:k").value == b"1"
        a.close()

        def slot_free():
            with proxy.raw() as d:
                return d.cmd("GET", "mc:k").value == b"1"

        wait_until(slot_free, timeout=5, interval=0.2)
    finally:
        a.close()
        b.close()


@proxy_only
@pytest.mark.timeout(30)
def test_idle_timeout(redis_server, make_inproc_proxy):
    proxy = make_inproc_proxy(redis_server, listen={"idle_timeout": 1})
    idle = proxy.raw()
    active = proxy.raw()
    try:
        assert idle.cmd("PING").value == "PONG"
        t_end = time.monotonic() + 2.5
        while time.monotonic() < t_end:
            assert active.cmd("PING").value == "PONG"
            time.sleep(0.3)
        assert idle.wait_closed(3), "idle client was not disconnected"
        assert active.cmd("PING").value == "PONG"
    finally:
        idle.close()
        active.close()


@proxy_only
@pytest.mark.timeout(30)
def test_idle_timeout_spares_subscribers_and_blocked_clients(redis_server, make_inproc_proxy):
    """As with Redis's `timeout`: a subscriber or a blocked BLPOP is waiting, not idle."""
    proxy = make_inproc_proxy(redis_server, listen={"idle_timeout": 1})
    with proxy.raw() as sub, proxy.raw(timeout=10) as blocked:
        assert sub.cmd("SUBSCRIBE", "idle:ch").py() == [b"subscribe", b"idle:ch", 1]
        blocked.send_command("BLPOP", "idle:q", 0)
        time.sleep(2.5)
        r = proxy.client(protocol=2)
        assert r.publish("idle:ch", "still here") == 1
        assert sub.read_frame().py() == [b"message", b"idle:ch", b"still here"]
        r.rpush("idle:q", "x")
        assert blocked.read_frame().py() == [b"idle:q", b"x"]


# --------------------------------------------------------------------------- shutdown


@proxy_only
@pytest.mark.timeout(40)
def test_sigterm_lets_in_flight_reply_finish(redis_server, make_proxy):
    proxy = make_proxy(redis_server, shutdown={"grace_seconds": 5})
    redis_server.client().set("gs:k", "v")
    c = proxy.client(protocol=2, socket_timeout=10)
    assert c.ping()
    result = {}

    def slow():
        try:
            result["reply"] = c.execute_command("DEBUG", "SLEEP", "0.6")
        except Exception as exc:
            result["error"] = exc

    raw = proxy.raw(timeout=10)
    raw.send(encode_command("DEBUG", "SLEEP", "0.5") + encode_command("GET", "gs:k") + encode_command("INCR", "gs:n"))
    t = threading.Thread(target=slow)
    t.start()
    time.sleep(0.2)
    proc = proxy.proc
    proxy.signal(signal.SIGTERM)
    time.sleep(0.1)
    # no new clients once shutdown began
    try:
        with socket.create_connection((proxy.host, proxy.port), timeout=1) as s:
            s.sendall(encode_command("PING"))
            s.settimeout(2)
            try:
                got = s.recv(64)
            except OSError:
                got = b""
            assert not got.startswith(b"+PONG"), "a new client was served after SIGTERM"
    except OSError:
        pass
    t.join(10)
    assert result.get("reply") in (b"OK", "OK", True), result
    assert raw.read_frame().value == "OK"
    assert raw.read_frame().value == b"v"
    assert raw.read_frame().value == 1
    rc = proc.wait(10)
    assert rc == 0, proxy.stderr_text()[-3000:]
    assert raw.wait_closed(2)
    raw.close()
    assert redis_server.client().get("gs:n") == b"1"
    assert "Traceback" not in proxy.stderr_text()


@proxy_only
@pytest.mark.timeout(30)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_with_idle_clients_exits_zero(redis_server, make_proxy, sig):
    proxy = make_proxy(redis_server, shutdown={"grace_seconds": 3})
    clients = [proxy.raw() for _ in range(5)]
    subscriber = proxy.raw()
    assert subscriber.cmd("SUBSCRIBE", "sh:ch").kind == "*"
    for c in clients:
        assert c.cmd("PING").value == "PONG"
    time.sleep(0.3)  # well past startup (see test_signal_during_startup_exits_zero for that window)
    proc = proxy.proc
    t0 = time.monotonic()
    proxy.signal(sig)
    rc = proc.wait(10)
    assert rc == 0, proxy.stderr_text()[-3000:]
    assert time.monotonic() - t0 < 3 + 1.5
    for c in clients + [subscriber]:
        assert c.wait_closed(2)
        c.close()
    assert "Traceback" not in proxy.stderr_text()


@proxy_only
@pytest.mark.timeout(30)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_during_startup_exits_zero(make_proxy, sig):
    """The proxy already answers clients while it waits for its upstream (here: down); a signal
    then must still mean a graceful exit 0, not death by the default handler or a traceback."""
    proxy = make_proxy(f"redis://127.0.0.1:{free_port()}/0", upstream={"connect_timeout": 3.0})
    with proxy.raw() as c:
        assert c.cmd("PING").value == "PONG"
    proc = proxy.proc
    proxy.signal(sig)
    rc = proc.wait(10)
    assert rc == 0, proxy.stderr_text()[-3000:]
    assert "Traceback" not in proxy.stderr_text()


# --------------------------------------------------------------------------- CLI


def _project_version() -> str:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]


@proxy_only
def test_version():
    proc = run_cli("--version")
    assert proc.returncode == 0, proc
    assert _project_version() in proc.stdout + proc.stderr
    script = Path(sys.executable).with_name("cacheproxy")
    exe = str(script) if script.exists() else shutil.which("cacheproxy")
    assert exe, "the `cacheproxy` console script is not installed (pip install -e .)"
    proc = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=20)
    assert proc.returncode == 0, proc
    assert _project_version() in proc.stdout + proc.stderr


def _write_config(path: Path, overrides: dict) -> Path:
    path.write_text(yaml.safe_dump(deep_merge(DEFAULT_CONFIG, overrides), sort_keys=False))
    return path


@proxy_only
def test_check_config_accepts_valid_file(tmp_path):
    cfg = _write_config(tmp_path / "good.yaml", {})
    proc = run_cli("check-config", str(cfg))
    assert proc.returncode == 0, proc


BAD_CONFIGS = {
    "port-not-a-number": ({"listen": {"port": "not-a-port"}}, "port"),
    "pool-size-not-int": ({"upstream": {"pool_size": "many"}}, "pool_size"),
    "bulk-len-not-int": ({"limits": {"max_bulk_len": "huge"}}, "max_bulk_len"),
    "max-clients-not-int": ({"listen": {"max_clients": [1, 2]}}, "max_clients"),
}


@proxy_only
@pytest.mark.parametrize("overrides,field", list(BAD_CONFIGS.values()), ids=list(BAD_CONFIGS))
def test_check_config_rejects_bad_field(tmp_path, overrides, field):
    cfg = _write_config(tmp_path / "bad.yaml", overrides)
    proc = run_cli("check-config", str(cfg))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert field in out, f"message does not name {field!r}: {out}"
    assert "Traceback" not in out, out


@proxy_only
def test_check_config_missing_file_and_bad_yaml(tmp_path):
    proc = run_cli("check-config", str(tmp_path / "nope.yaml"))
    assert proc.returncode != 0
    assert "nope.yaml" in proc.stdout + proc.stderr
    bad = tmp_path / "broken.yaml"
    bad.write_text("listen: {host: 127.0.0.1, port: [unclosed\n")
    proc = run_cli("check-config", str(bad))
    assert proc.returncode != 0
    assert "Traceback" not in proc.stdout + proc.stderr


@proxy_only
def test_serve_with_bad_config_exits_nonzero(tmp_path):
    cfg = _write_config(tmp_path / "bad.yaml", {"listen": {"port": "not-a-port"}})
    proc = run_cli("serve", "--config", str(cfg), timeout=20)
    assert proc.returncode != 0
    assert "port" in proc.stdout + proc.stderr


@proxy_only
@pytest.mark.timeout(30)
def test_config_path_from_environment(redis_server, tmp_path):
    p = ProxyProcess(redis_server, tmp_path / "envcfg")
    try:
        p.start(argv=[sys.executable, "-m", "proxy", "serve"], env={"CACHEPROXY_CONFIG": str(p.config_path)})
        c = p.client(protocol=2)
        assert c.set("envcfg", "1") is True
        assert redis_server.client().get("envcfg") == b"1"
    finally:
        assert p.stop() == 0


# --------------------------------------------------------------------------- refused commands


@proxy_only
@pytest.mark.parametrize("command", [("SHUTDOWN",), ("SHUTDOWN", "NOSAVE")], ids=["SHUTDOWN", "NOSAVE"])
def test_shutdown_refused(sproxy, command):
    """An application must not stop the Redis every client shares (SYNC/PSYNC are relayed: see
    test_compat_pubsub.py)."""
    with sproxy.raw() as c:
        reply = c.cmd(*command, timeout=5)
        assert reply.is_error and "not supported by cacheproxy" in reply.value, reply
    with sproxy.raw() as c:
        assert c.cmd("PING").value == "PONG"


@proxy_only
@pytest.mark.timeout(40)
def test_workers_share_the_port(redis_server, tmp_path):
    """`serve --workers 2`: several processes on one port (SO_REUSEPORT), all serving; SIGTERM exits 0."""
    p = ProxyProcess(redis_server, tmp_path / "workers")
    try:
        p.start(argv=p.command() + ["--workers", "2"])
        # Both workers serving (the port answers as soon as one is): a worker still importing when
        # SIGTERM comes dies of it, and serve exits 241 (reported; not what this test is about).
        wait_until(lambda: p.stderr_text().count("listening on") == 2, timeout=START_TIMEOUT)
        clients = [p.client(protocol=2) for _ in range(20)]
        for i, c in enumerate(clients):
            assert c.set(f"wk:{i}", i) is True
        for i, c in enumerate(clients):
            assert c.get(f"wk:{i}") == str(i).encode()
            c.close()
    finally:
        rc = p.stop()
    assert rc == 0, p.stderr_text()[-3000:]


@proxy_only
def test_acl_style_users(redis_server, make_inproc_proxy):
    proxy = make_inproc_proxy(redis_server, listen={"users": {"alice": "alice-pw", "bob": "0123"}})
    with proxy.raw() as c:
        assert c.cmd("GET", "acl:k").value.startswith("NOAUTH")
        assert c.cmd("AUTH", "alice", "wrong").is_error
        assert c.cmd("AUTH", "bob", "alice-pw").is_error
        assert c.cmd("GET", "acl:k").value.startswith("NOAUTH")
        assert c.cmd("AUTH", "alice", "alice-pw").value == "OK"
        assert c.cmd("SET", "acl:k", "v").value == "OK"
    with proxy.raw() as c:
        reply = c.cmd("HELLO", 3, "AUTH", "bob", "0123")
        assert reply.kind == "%", reply
        assert c.cmd("GET", "acl:k").value == b"v"
    ok = proxy.client(protocol=2, username="alice", password="alice-pw")
    assert ok.get("acl:k") == b"v"
    ok.close()


@proxy_only
def test_upstream_url_with_password_and_db(tmp_path, make_proxy):
    """upstream.url redis://:pass@host:port/2 : the proxy authenticates upstream and uses db 2."""
    server = RedisServer(tmp_path / "pw-redis", extra_args=["--requirepass", "up-secret"]).start()
    try:
        proxy = make_proxy(f"redis://:up-secret@127.0.0.1:{server.port}/2")
        for protocol in (2, 3):
            c = proxy.client(protocol=protocol)  # no AUTH from the client: the proxy has no password
            assert c.set(f"updb:{protocol}", "x") is True
            assert c.get(f"updb:{protocol}") == b"x"
            assert c.dbsize() == protocol - 1
            c.close()
        direct = server.client(password="up-secret", db=2)
        assert direct.get("updb:2") == b"x" and direct.get("updb:3") == b"x"
        assert server.client(password="up-secret", db=0).dbsize() == 0
        assert "up-secret" not in proxy.stderr_text(), "the upstream password leaked into the log"
    finally:
        server.stop()


@proxy_only
@pytest.mark.timeout(60)
def test_commands_right_after_startup_reach_a_healthy_upstream(redis_server, tmp_path):
    """The first command a client sends the moment the proxy accepts connections must not fail
    with 'upstream unavailable' while Redis is up (the listener opens before the upstream pool is
    connected, or RESP3 connections lag behind RESP2 ones)."""
    failures = []
    for attempt in range(5):
        p = ProxyProcess(redis_server, tmp_path / f"early{attempt}").start(wait=False)
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while True:  # connect the very moment the port opens
                assert time.monotonic() < deadline, p.stderr_text()
                try:
                    c = p.raw()
                    break
                except OSError:
                    time.sleep(0.001)
            with c, p.raw() as c3:
                c3.send_command("HELLO", 3)
                c.send_command("SET", f"early:{attempt}", "2")
                c3.send_command("SET", f"early3:{attempt}", "3")
                assert c3.read_frame().kind == "%"
                for proto, conn in ((2, c), (3, c3)):
                    reply = conn.read_frame()
                    if reply.value != "OK":
                        failures.append((attempt, proto, reply.value))
        finally:
            p.stop()
    assert not failures, failures
