"""Config: defaults, YAML loading, ${ENV} expansion, CACHEPROXY_ overrides, and error messages."""

import re
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from proxy.config import (
    Config,
    ConfigError,
    DynamoBackend,
    PostgresBackend,
    TTLPolicy,
    config_from_dict,
    load_config,
)

REPO = Path(__file__).resolve().parents[2]
PG = {"type": "postgres", "dsn": "postgresql://postgres@127.0.0.1:5432/test"}
DDB = {"type": "dynamodb", "endpoint_url": "http://127.0.0.1:8000"}
USER_READ = {"query": "SELECT id, name FROM users WHERE id = $1", "as": "json"}


def write(tmp_path, data, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def error_of(data, source="x.yaml") -> ConfigError:
    with pytest.raises(ConfigError) as info:
        config_from_dict(data, source)
    return info.value


def assert_problem(err: ConfigError, path: str, *fragments: str, source: str = "x.yaml") -> str:
    """One line of the message names the file and the field path, says what is wrong and gives a fix."""
    lines = [line for line in str(err).splitlines() if line.startswith(f"{source}: {path}: ")]
    assert lines, f"no line for {path!r} in:\n{err}"
    line = lines[0]
    assert re.search(r"; fix: \S", line), line
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    return line


def with_routes(*routes, backends=None):
    return {"backends": backends or {"main": PG, "ddb": DDB}, "routes": list(routes)}


# ---------------------------------------------------------------------------------------- defaults

def test_defaults():
    cfg = config_from_dict({})
    assert (cfg.listen.host, cfg.listen.port, cfg.listen.password, cfg.listen.users) == ("127.0.0.1", 6380, None, {})
    assert (cfg.listen.max_clients, cfg.listen.idle_timeout, cfg.listen.reuse_port) == (10000, 0, False)
    assert cfg.limits.max_bulk_len == 536870912 and cfg.limits.max_multibulk_len == 2147483647
    assert (cfg.limits.max_inline_len, cfg.limits.client_output_soft) == (65536, 8388608)
    assert (cfg.limits.client_output_hard, cfg.limits.max_inflight) == (268435456, 1024)
    up = cfg.upstream
    assert (up.url, up.cluster, up.nodes, up.pool_size) == ("redis://127.0.0.1:6379/0", False, [], 2)
    assert (up.connect_timeout, up.command_timeout, up.read_from) == (2.0, 10.0, "primary")
    assert (up.tls.ca_file, up.tls.verify) == (None, True)
    assert (cfg.admin.enabled, cfg.admin.host, cfg.admin.port) == (True, "127.0.0.1", 9121)
    assert (cfg.log.level, cfg.log.format, cfg.shutdown.grace_seconds) == ("info", "text", 10.0)
    assert cfg.ttl == TTLPolicy(seconds=300, jitter=0.1, negative_seconds=30, refresh_ahead=0.0, stale_if_error=0)
    assert cfg.backends == {} and cfg.routes == []
    wb = cfg.write_behind
    assert (wb.batch_size, wb.max_delay_ms, wb.max_attempts, wb.max_pending) == (100, 200, 10, 100000)
    assert (wb.coalesce, wb.claim_idle_ms, wb.stream_prefix) == (True, 15000, "cacheproxy:wb")
    assert (wb.partitions, wb.retry_base_ms, wb.retry_max_ms, wb.consumer) == (16, 200, 30000, None)


def test_none_and_empty_file_give_defaults(tmp_path):
    assert config_from_dict(None).listen.port == 6380
    assert load_config(write(tmp_path, ""), env={}).listen.port == 6380


def test_every_field_has_a_description():
    def walk(model: type[BaseModel], seen: set):
        for name, info in model.model_fields.items():
            assert info.description, f"{model.__name__}.{name} has no description"
            for arg in _models_in(info.annotation):
                if arg not in seen:
                    seen.add(arg)
                    walk(arg, seen)
    walk(Config, set())


def _models_in(tp):
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    return [m for arg in typing.get_args(tp) for m in _models_in(arg)]


def test_example_yaml_documents_every_option():
    text = (REPO / "config/example.yaml").read_text()
    missing = []

    def walk(model, seen):
        for name, info in model.model_fields.items():
            if not re.search(rf"\b{re.escape(info.alias or name)}:", text):
                missing.append(f"{model.__name__}.{name}")
            for sub in _models_in(info.annotation):
                if sub not in seen:
                    seen.add(sub)
                    walk(sub, seen)
    walk(Config, set())
    assert not missing, f"example.yaml does not show: {missing}"


# ------------------------------------------------------------------------------------ shipped files

def test_example_yaml_loads_with_defaults():
    cfg = load_config(REPO / "config/example.yaml", env={})
    assert [r.key for r in cfg.routes] == ["user:{id:int}", "profile:{user_id}", "flag:{name}", "org:{org}:members"]
    assert isinstance(cfg.backends["main"], PostgresBackend)
    assert cfg.backends["main"].dsn == "postgresql://postgres@127.0.0.1:5432/test"
    assert isinstance(cfg.backends["ddb"], DynamoBackend) and cfg.backends["ddb"].endpoint_url is None
    assert cfg.listen.password is None
    user, profile, flag, org = cfg.routes
    assert user.read.as_ == "json" and user.write.mode == "write-behind"
    assert profile.read.as_ == "hash" and profile.read.key == {"UserId": "{user_id}"}
    assert flag.read.as_ == "string" and flag.ttl.seconds is None
    assert org.read.key_condition and org.read.many


def test_example_yaml_takes_environment(tmp_path):
    env = {"PGDSN": "postgresql://u:p@db:5432/app", "DDB_ENDPOINT": "http://ddb:8000", "CACHEPROXY_PASSWORD": "pw"}
    cfg = load_config(REPO / "config/example.yaml", env=env)
    assert cfg.backends["main"].dsn == env["PGDSN"]
    assert cfg.backends["ddb"].endpoint_url == "http://ddb:8000"
    assert cfg.listen.password == "pw"


def test_demo_yaml_loads():
    cfg = load_config(REPO / "config/demo.yaml", env={})
    assert (cfg.listen.host, cfg.listen.port, cfg.upstream.url) == ("127.0.0.1", 6380, "redis://127.0.0.1:6379/0")
    assert cfg.backends["main"].dsn == "postgresql://postgres@127.0.0.1:5432/test"
    assert cfg.backends["ddb"].endpoint_url == "http://127.0.0.1:8001"
    user, profile = cfg.routes
    assert user.key == "user:{id:int}" and user.backend == "main"
    assert user.read.query == "SELECT id, name, email FROM demo_users WHERE id = $1"
    assert user.write.mode == "write-behind" and "demo_users" in user.write.upsert
    assert profile.read.table == "DemoProfiles" and profile.read.as_ == "hash"
    assert load_config(REPO / "config/demo.yaml", env={"DEMO_DDB_PORT": "9000"}).backends["ddb"].endpoint_url \
        == "http://127.0.0.1:9000"


# ------------------------------------------------------------------------------- env ${} expansion

def test_env_expansion(tmp_path):
    path = write(tmp_path, {
        "listen": {"host": "${HOST}", "port": "${PORT:-7000}", "password": "pre-${SECRET}-post"},
        "upstream": {"url": "redis://${RHOST:-localhost}:${RPORT:-6390}/${RDB:-2}"},
        "log": {"level": "${LEVEL:-debug}"},
    })
    cfg = load_config(path, env={"HOST": "0.0.0.0", "SECRET": "s3", "RPORT": "7777", "LEVEL": ""})
    assert cfg.listen.host == "0.0.0.0"
    assert cfg.listen.port == 7000                   # default, then validated as an int
    assert cfg.listen.password == "pre-s3-post"
    assert (cfg.upstream.host, cfg.upstream.port, cfg.upstream.db) == ("localhost", 7777, 2)
    assert cfg.log.level == "debug"                  # :- also replaces an empty value, like the shell


def test_env_expansion_escape_and_lists(tmp_path):
    path = write(tmp_path, {"listen": {"password": "$${NOT_A_VAR}", "users": {"app": "${APP_PW}"}},
                            "upstream": {"cluster": True, "nodes": ["${N1}", "h2:7001"]}})
    cfg = load_config(path, env={"APP_PW": "x", "N1": "h1:7000"})
    assert cfg.listen.password == "${NOT_A_VAR}"
    assert cfg.listen.users == {"app": "x"}
    assert cfg.upstream.nodes == ["h1:7000", "h2:7001"]


def test_env_uses_os_environ_by_default(tmp_path, monkeypatch):
    monkeypatch.setenv("CP_TEST_PORT", "6499")
    assert load_config(write(tmp_path, {"listen": {"port": "${CP_TEST_PORT}"}})).listen.port == 6499


def test_missing_env_var_names_field_and_variable(tmp_path):
    path = write(tmp_path, {"backends": {"main": {"type": "postgres", "dsn": "${NO_SUCH_PGDSN}"}}})
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert_problem(info.value, "backends.main.dsn", "NO_SUCH_PGDSN", "is not set", source=str(path))


def test_expanded_value_that_fails_says_where_it_came_from(tmp_path):
    path = write(tmp_path, {"listen": {"port": "${PORT}"}})
    with pytest.raises(ConfigError) as info:
        load_config(path, env={"PORT": "http"})
    assert_problem(info.value, "listen.port", "must be an integer", "${PORT}", source=str(path))


def test_config_from_dict_does_not_expand_without_env():
    assert config_from_dict({"listen": {"password": "${X}"}}).listen.password == "${X}"
    assert config_from_dict({"listen": {"password": "${X}"}}, env={"X": "y"}).listen.password == "y"


# ------------------------------------------------------------------------------ CACHEPROXY_ overrides

def test_overrides(tmp_path):
    path = write(tmp_path, {"listen": {"port": 6380}, "upstream": {"url": "redis://a:6379/0"},
                            "backends": {"main": PG}, "routes": [{"key": "u:{id:int}", "backend": "main"}]})
    env = {
        "CACHEPROXY_UPSTREAM__URL": "redis://b:6400/3",
        "CACHEPROXY_LISTEN__PORT": "6390",
        "CACHEPROXY_LISTEN__PASSWORD": "0123",          # a string field keeps the text as written
        "CACHEPROXY_LISTEN__REUSE_PORT": "true",
        "CACHEPROXY_UPSTREAM__TLS__VERIFY": "false",    # deeper nesting, section created on the way
        "CACHEPROXY_BACKENDS__MAIN__MAX_POOL": "3",
        "CACHEPROXY_ROUTES__0__TTL__SECONDS": "none",
        "CACHEPROXY_CONFIG": "/elsewhere.yaml",         # not an override: no '__'
    }
    cfg = load_config(path, env=env)
    assert (cfg.upstream.host, cfg.upstream.port, cfg.upstream.db) == ("b", 6400, 3)
    assert cfg.listen.port == 6390
    assert cfg.listen.password == "0123"
    assert cfg.listen.reuse_port is True
    assert cfg.upstream.tls.verify is False
    assert cfg.backends["main"].max_pool == 3
    assert cfg.routes[0].ttl.seconds is None


def test_override_beats_env_expansion(tmp_path):
    path = write(tmp_path, {"listen": {"port": "${PORT:-1000}"}})
    assert load_config(path, env={"CACHEPROXY_LISTEN__PORT": "2000"}).listen.port == 2000


def test_override_typo_is_reported_with_the_variable(tmp_path):
    path = write(tmp_path, {})
    with pytest.raises(ConfigError) as info:
        load_config(path, env={"CACHEPROXY_UPSTREM__URL": "redis://x"})
    assert_problem(info.value, "upstrem", "did you mean upstream?", "CACHEPROXY_UPSTREM__URL", source=str(path))


def test_override_bad_value_and_bad_path(tmp_path):
    path = write(tmp_path, {"routes": []})
    with pytest.raises(ConfigError) as info:
        load_config(path, env={"CACHEPROXY_LISTEN__PORT": "high"})
    assert_problem(info.value, "listen.port", "must be an integer", "CACHEPROXY_LISTEN__PORT", source=str(path))
    with pytest.raises(ConfigError) as info:
        load_config(path, env={"CACHEPROXY_ROUTES__3__KEY": "x"})
    assert_problem(info.value, "routes[3].key", "CACHEPROXY_ROUTES__3__KEY", "no item 3", source=str(path))
    with pytest.raises(ConfigError) as info:
        load_config(path, env={"CACHEPROXY_LISTEN____PORT": "1"})
    assert "empty path segment" in str(info.value) and "fix:" in str(info.value)


# ------------------------------------------------------------------------------------- upstream url

@pytest.mark.parametrize("url,host,port,db,user,password,tls", [
    ("redis://127.0.0.1:6379/0", "127.0.0.1", 6379, 0, None, None, False),
    ("redis://cache", "cache", 6379, 0, None, None, False),
    ("redis://cache:7000/5", "cache", 7000, 5, None, None, False),
    ("redis://:secret@cache/1", "cache", 6379, 1, None, "secret", False),
    ("redis://app:p%40ss%3Aw@cache:6380/2", "cache", 6380, 2, "app", "p@ss:w", False),
    ("rediss://app:pw@cache.example.com:6390", "cache.example.com", 6390, 0, "app", "pw", True),
    ("REDISS://[::1]:7001/", "::1", 7001, 0, None, None, True),
])
def test_upstream_url_parsing(url, host, port, db, user, password, tls):
    up = config_from_dict({"upstream": {"url": url}}).upstream
    assert (up.host, up.port, up.db, up.username, up.password, up.use_tls) == (host, port, db, user, password, tls)


def test_redacted_url_hides_the_password():
    up = config_from_dict({"upstream": {"url": "redis://app:hunter2@cache:6380/2"}}).upstream
    assert up.redacted_url == "redis://app:***@cache:6380/2"
    assert config_from_dict({"upstream": {"url": "redis://cache/1"}}).upstream.redacted_url == "redis://cache/1"


@pytest.mark.parametrize("url,fragment", [
    ("http://cache:6379", "scheme 'http'"),
    ("cache:6379", "not supported"),
    ("redis://", "no host"),
    ("redis://cache/abc", "database 'abc'"),
    ("redis://cache/-1", "database '-1'"),
    ("redis://cache:99999/0", "cannot parse"),
    ("redis://cache:port/0", "cannot parse"),
    ("redis://cache/0?ssl=true", "query strings"),
])
def test_bad_upstream_url(url, fragment):
    assert_problem(error_of({"upstream": {"url": url}}), "upstream.url", fragment, "redis://")


def test_bad_url_message_never_shows_the_password():
    err = error_of({"upstream": {"url": "http://app:hunter2@cache:1/0"}})
    assert "hunter2" not in str(err)


# ------------------------------------------------------------------------------------- file errors

def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    message = str(info.value)
    assert message.startswith(f"{path}: file not found; fix: ")


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path, env={})


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"listen: {host: caf\xe9}\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path, env={})


def test_yaml_syntax_error_has_line_number(tmp_path):
    path = write(tmp_path, "listen:\n  host: 127.0.0.1\n  port: [unclosed\nupstream: {}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    message = str(info.value)
    assert message.startswith(f"{path}: line ")
    assert "YAML syntax error" in message and "; fix: " in message
    line = int(re.search(r"line (\d+)", message).group(1))
    assert 3 <= line <= 5


def test_duplicate_keys_are_refused(tmp_path):
    path = write(tmp_path, "listen:\n  port: 1000\n  host: a\n  port: 2000\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert "duplicate key 'port' (first given on line 2)" in str(info.value)
    assert "line 4" in str(info.value)


def test_yaml_merge_keys_still_work(tmp_path):
    # A key that overrides a merged (<<) one is not a duplicate.
    path = write(tmp_path, "backends:\n  one: &b {type: postgres, dsn: 'postgresql://h/db', max_pool: 5}\n"
                           "  two:\n    <<: *b\n    max_pool: 7\n")
    cfg = load_config(path, env={})
    assert cfg.backends["two"].max_pool == 7 and cfg.backends["one"].max_pool == 5


def test_top_level_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"), env={})


# ------------------------------------------------------------------------------ field-level errors

@pytest.mark.parametrize("data,path,fragments", [
    ({"upstream": {"pool_size": 0}}, "upstream.pool_size", ["must be >= 1 (got 0)", "pool size"]),
    ({"upstream": {"pool_size": 257}}, "upstream.pool_size", ["must be <= 256"]),
    ({"upstream": {"pool_size": "many"}}, "upstream.pool_size", ["must be an integer (got 'many')"]),
    ({"listen": {"port": "not-a-port"}}, "listen.port", ["must be an integer", "TCP port"]),
    ({"listen": {"port": 70000}}, "listen.port", ["must be <= 65535"]),
    ({"listen": {"max_clients": [1, 2]}}, "listen.max_clients", ["must be an integer (got [1, 2])"]),
    ({"listen": {"reuse_port": "maybe"}}, "listen.reuse_port", ["true or false"]),
    ({"limits": {"max_bulk_len": "huge"}}, "limits.max_bulk_len", ["must be an integer"]),
    ({"upstream": {"connect_timeout": 0}}, "upstream.connect_timeout", ["must be > 0"]),
    ({"upstream": {"read_from": "any"}}, "upstream.read_from", ["'primary'", "use one of"]),
    ({"upstream": {"nodes": ["nohost"]}}, "upstream.nodes[0]", ["not host:port"]),
    ({"log": {"level": "verbose"}}, "log.level", ["debug"]),
    ({"ttl": {"jitter": 1.5}}, "ttl.jitter", ["must be <= 1"]),
    ({"ttl": {"seconds": 0}}, "ttl.seconds", ["must be >= 1"]),
    ({"listen": "everywhere"}, "listen", ["must be a mapping"]),
    ({"routes": {"key": "x"}}, "routes", ["must be a list"]),
    ({"listen": {"users": {"app": ["x"]}}}, "listen.users.app", ["must be a string", "got a"]),
    ({"backends": {"main": {"type": "mysql"}}}, "backends.main.type", ["unknown backend type 'mysql'", "postgres"]),
    ({"backends": {"main": {"dsn": "x"}}}, "backends.main.type", ["backend type is missing"]),
    ({"backends": {"main": {"type": "postgres"}}}, "backends.main.dsn", ["required field is missing", "DSN"]),
    ({"backends": {"main": {"type": "postgres", "dsn": "host=db"}}}, "backends.main.dsn", ["postgres://"]),
    ({"backends": {"d": {"type": "dynamodb", "endpoint_url": "ddb:8000"}}}, "backends.d.endpoint_url", ["http"]),
    ({"routes": [{"key": "u:{id}"}]}, "routes[0].backend", ["required field is missing"]),
    ({"routes": [{"key": "u:{id}", "backend": "main", "read": {"as": "xml"}}]}, "routes[0].read.as", ["json"]),
    ({"upstream": {"tls": {"ca_file": "/no/such/ca.pem"}}}, "upstream.tls.ca_file", ["does not exist", "CA"]),
])
def test_field_errors(data, path, fragments):
    assert_problem(error_of(data), path, *fragments)


@pytest.mark.parametrize("data,path,suggestion", [
    ({"listen": {"hots": "x"}}, "listen.hots", "host"),
    ({"upstrem": {}}, "upstrem", "upstream"),
    ({"routes": [{"key": "u:{id}", "backend": "main", "ttl": {"secnds": 5}}]}, "routes[0].ttl.secnds", "seconds"),
    ({"backends": {"main": {**PG, "max_pol": 3}}}, "backends.main.max_pol", "max_pool"),
    ({"routes": [{"key": "u:{id}", "backend": "main", "read": {"qeury": "x"}}]}, "routes[0].read.qeury", "query"),
])
def test_unknown_field_suggests_the_right_one(data, path, suggestion):
    assert_problem(error_of(data), path, f"unknown field; did you mean {suggestion}?")


def test_unknown_field_without_a_close_match_lists_valid_ones():
    line = assert_problem(error_of({"log": {"zzz": 1}}), "log.zzz", "unknown field")
    assert "level, format" in line


def test_several_problems_one_line_each():
    err = error_of({"listen": {"port": 0, "max_clients": 0}, "upstream": {"pool_size": 0}})
    assert len(str(err).splitlines()) == 3
    assert len(err.problems) == 3
    assert all(line.startswith("x.yaml: ") and "; fix: " in line for line in str(err).splitlines())


def test_secrets_are_not_echoed():
    err = error_of({"listen": {"password": "hunter2", "port": "x"}, "backends": {"m": {"type": "postgres",
                                                                                          "dsn": "mysql://u:hunter3@h"}}})
    assert "hunter2" not in str(err) and "hunter3" not in str(err)


@pytest.mark.parametrize("value", [None, 1, "x", [1], {"a": 1}, True, 1.5])
def test_garbage_in_any_section_is_a_config_error(value):
    for section in Config.model_fields:
        try:
            config_from_dict({section: value})
        except ConfigError as exc:
            assert "fix:" in str(exc)


# --------------------------------------------------------------------------------- cross-field rules

def test_unknown_backend_lists_defined_names():
    data = with_routes({"key": "user:{id:int}", "backend": "main", "read": USER_READ},
                       {"key": "p:{id}", "backend": "pg"})
    assert_problem(error_of(data, "config/demo.yaml"), "routes[1].backend", "unknown backend 'pg'",
                   "fix: use one of: main, ddb", source="config/demo.yaml")


def test_unknown_backend_when_none_defined():
    assert_problem(error_of({"routes": [{"key": "p:{id}", "backend": "pg"}]}), "routes[0].backend", "backends:")


def test_bad_template():
    line = assert_problem(error_of(with_routes({"key": "user:{a}{b}", "backend": "main"})), "routes[0].key",
                          "adjacent")
    assert "{name:int|uuid|str}" in line


def test_ambiguous_routes_name_both():
    data = with_routes({"key": "user:{name}", "backend": "main"}, {"key": "user:{id:int}", "backend": "main"})
    assert_problem(error_of(data), "routes[1].key", "routes[0]", "'user:{name}'", "move this route before")
    data = with_routes({"key": "user:{a}", "backend": "main"}, {"key": "user:{b}", "backend": "main"})
    assert_problem(error_of(data), "routes[1].key", "exactly the same keys", "never used")
    data = with_routes({"key": "{t}:x", "backend": "main"}, {"key": "y:{b}", "backend": "main"})
    assert_problem(error_of(data), "routes[1].key", "some keys match both")


def test_specific_route_first_is_fine():
    cfg = config_from_dict(with_routes({"key": "user:admin", "backend": "main"},
                                       {"key": "user:{id:int}", "backend": "main"},
                                       {"key": "user:{name}", "backend": "main"}))
    assert len(cfg.routes) == 3


def test_nodes_need_cluster_mode():
    assert_problem(error_of({"upstream": {"nodes": ["h:7000"]}}), "upstream.nodes", "cluster", "cluster: true")
    assert config_from_dict({"upstream": {"cluster": True, "nodes": ["h:7000"]}}).upstream.nodes == ["h:7000"]


def test_cluster_has_only_db_zero():
    assert_problem(error_of({"upstream": {"cluster": True, "url": "redis://h/3"}}), "upstream.url", "database 0")


def test_tls_options_need_rediss(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    assert_problem(error_of({"upstream": {"tls": {"ca_file": str(ca)}}}), "upstream.tls", "rediss://")
    cfg = config_from_dict({"upstream": {"url": "rediss://h", "tls": {"ca_file": str(ca)}}})
    assert cfg.upstream.tls.ca_file == str(ca) and cfg.upstream.use_tls


def test_cert_needs_key(tmp_path):
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    assert_problem(error_of({"upstream": {"url": "rediss://h", "tls": {"cert_file": str(cert)}}}),
                   "upstream.tls.key_file", "go together")


def test_limits_and_ports_consistency():
    assert_problem(error_of({"limits": {"client_output_soft": 100, "client_output_hard": 50}}),
                   "limits.client_output_hard", "client_output_soft")
    assert config_from_dict({"limits": {"client_output_soft": 100, "client_output_hard": 0}})
    assert_problem(error_of({"listen": {"port": 9121}}), "admin.port", "listen.port")
    assert config_from_dict({"listen": {"port": 9121}, "admin": {"enabled": False}})


def test_pool_bounds():
    assert_problem(error_of({"backends": {"m": {**PG, "min_pool": 5, "max_pool": 2}}}), "backends.m.min_pool",
                   "max_pool")


# ------------------------------------------------------------------------------------ route checks

@pytest.mark.parametrize("route,path,fragment", [
    ({"key": "u:{id:int}", "backend": "main", "read": {"as": "json"}}, "routes[0].read.query", "needs a query"),
    ({"key": "u:{id:int}", "backend": "main", "read": {"query": "SELECT 1 WHERE a = $1 AND b = $2"}},
     "routes[0].read.query", "$2 but 1 value"),
    ({"key": "u:{id:int}", "backend": "main", "read": {**USER_READ, "params": ["uid"]}},
     "routes[0].read.params", "'uid' is not a parameter of key template 'u:{id:int}'"),
    ({"key": "u:{id:int}", "backend": "main", "read": {**USER_READ, "table": "T"}}, "routes[0].read.table",
     "only used by dynamodb"),
    ({"key": "u:{id:int}", "backend": "main", "read": {**USER_READ, "as": "hash", "many": True}},
     "routes[0].read.many", "json"),
    ({"key": "u:{id:int}", "backend": "main", "read": {**USER_READ, "column": "c"}}, "routes[0].read.column",
     "as: string"),
    ({"key": "p:{user_id}", "backend": "ddb", "read": {"key": {"UserId": "{user_id}"}}}, "routes[0].read.table",
     "needs a table"),
    ({"key": "p:{user_id}", "backend": "ddb", "read": {"table": "T"}}, "routes[0].read.key", "key or key_condition"),
    ({"key": "p:{user_id}", "backend": "ddb", "read": {"table": "T", "key": {"UserId": "{uid}"}}},
     "routes[0].read.key.UserId", "'uid' is not a parameter"),
    ({"key": "p:{user_id}", "backend": "ddb", "read": {"table": "T", "key": {"UserId": "{user_id"}}},
     "routes[0].read.key.UserId", "never closed"),
    ({"key": "o:{org}", "backend": "ddb", "read": {"table": "T", "key_condition": "OrgId = :o",
                                                   "values": {":o": "{organisation}"}}},
     "routes[0].read.values[':o']", "'organisation' is not a parameter"),
    ({"key": "o:{org}", "backend": "ddb", "read": {"table": "T", "key_condition": "OrgId = :o"}},
     "routes[0].read.values", "needs values"),
    ({"key": "o:{org}", "backend": "ddb", "read": {"table": "T", "key": {"A": "{org}"}, "key_condition": "x"}},
     "routes[0].read.key_condition", "either key"),
    ({"key": "o:{org}", "backend": "ddb", "read": {"table": "T", "key": {"A": "{org}"}, "query": "SELECT"}},
     "routes[0].read.query", "only used by postgres"),
])
def test_read_section_checks(route, path, fragment):
    assert_problem(error_of(with_routes(route)), path, fragment)


@pytest.mark.parametrize("write,path,fragment", [
    ({"upsert": "INSERT"}, "routes[0].write.upsert", "read-only"),
    ({"mode": "write-behind"}, "routes[0].write.upsert", "needs upsert SQL or table"),
    ({"mode": "write-behind", "upsert": "INSERT ($1, $2)", "fields": ["name"]}, "routes[0].write.delete",
     "delete_on_del: false"),
    ({"mode": "write-behind", "upsert": "INSERT ($1, $2)", "fields": ["name", "email"], "delete_on_del": False},
     "routes[0].write.upsert", "$2 but 3 value"),
    ({"mode": "write-behind", "upsert": "INSERT ($1)", "delete": "DELETE $1 $2"}, "routes[0].write.delete",
     "$2 but 1 value"),
    ({"mode": "write-through", "table": "users"}, "routes[0].write.key_columns", "table mode"),
    ({"mode": "write-through", "table": "users", "key_columns": ["id", "x"], "fields": ["n"]},
     "routes[0].write.key_columns", "2 key column(s) for 1 template parameter"),
    ({"mode": "write-through", "table": "users; DROP", "key_columns": ["id"], "fields": ["n"]},
     "routes[0].write.table", "not a plain SQL identifier"),
    ({"mode": "write-through", "upsert": "x", "table": "users"}, "routes[0].write.upsert", "either"),
    ({"mode": "write-through", "upsert": "INSERT $1", "delete": "DELETE $1", "version_attribute": "v"},
     "routes[0].write.version_attribute", "only used by dynamodb"),
])
def test_postgres_write_checks(write, path, fragment):
    route = {"key": "u:{id:int}", "backend": "main", "read": USER_READ, "write": write}
    assert_problem(error_of(with_routes(route)), path, fragment)


def test_dynamodb_write_checks():
    base = {"key": "p:{user_id}", "backend": "ddb"}
    query = {"table": "T", "key_condition": "A = :a", "values": {":a": "{user_id}"}}
    assert_problem(error_of(with_routes({**base, "read": query, "write": {"mode": "write-behind"}})),
                   "routes[0].write.mode", "read.key")
    getitem = {"table": "T", "key": {"UserId": "{user_id}"}}
    assert_problem(error_of(with_routes({**base, "read": getitem, "write": {"mode": "write-behind", "upsert": "x"}})),
                   "routes[0].write.upsert", "only used by postgres")
    cfg = config_from_dict(with_routes({**base, "read": getitem,
                                        "write": {"mode": "write-behind", "version_attribute": "Version"}}))
    assert cfg.routes[0].write.version_attribute == "Version"


def test_valid_postgres_write_modes():
    sql = {"mode": "write-behind", "upsert": "INSERT INTO t VALUES ($1, $2, $3)", "fields": ["name", "email"],
           "delete": "DELETE FROM t WHERE id = $1"}
    table = {"mode": "write-through", "table": "public.users", "key_columns": ["id"], "fields": ["name"]}
    for write in (sql, table):
        cfg = config_from_dict(with_routes({"key": "u:{id:int}", "backend": "main", "read": USER_READ,
                                            "write": write}))
        assert cfg.routes[0].write.mode == write["mode"]


def test_read_params_default_to_template_params():
    cfg = config_from_dict(with_routes(
        {"key": "org:{org}:member:{uid:uuid}", "backend": "main",
         "read": {"query": "SELECT * FROM m WHERE org = $1 AND uid = $2"}},
        {"key": "x:{a}:{b}", "backend": "main", "read": {"query": "SELECT $1", "params": ["b"]}}))
    assert cfg.routes[0].read.params == ["org", "uid"]
    assert cfg.routes[1].read.params == ["b"]


def test_placeholders_inside_string_literals_are_ignored():
    route = {"key": "u:{id:int}", "backend": "main", "read": {"query": "SELECT '$5' AS x WHERE id = $1"}}
    assert config_from_dict(with_routes(route)).routes[0].read.query


def test_as_alias_and_python_name():
    cfg = config_from_dict(with_routes({"key": "u:{id:int}", "backend": "main",
                                        "read": {"query": "SELECT $1", "as": "string"}}))
    assert cfg.routes[0].read.as_ == "string"
    cfg = config_from_dict(with_routes({"key": "u:{id:int}", "backend": "main",
                                        "read": {"query": "SELECT $1", "as_": "hash"}}))
    assert cfg.routes[0].read.as_ == "hash"


# --------------------------------------------------------------------------------------------- TTL

def test_route_ttl_merges_with_top_level():
    cfg = config_from_dict({
        "ttl": {"seconds": 100, "jitter": 0.2, "negative_seconds": 5},
        **with_routes({"key": "a:{x}", "backend": "main"},
                      {"key": "b:{x}", "backend": "main", "ttl": {"seconds": 50, "stale_if_error": 9}},
                      {"key": "c:{x}", "backend": "main", "ttl": "none"},
                      {"key": "d:{x}", "backend": "main", "ttl": 42},
                      {"key": "e:{x}", "backend": "main", "ttl": {"seconds": "none", "jitter": 0}}),
    })
    a, b, c, d, e = (route.ttl for route in cfg.routes)
    assert a == TTLPolicy(seconds=100, jitter=0.2, negative_seconds=5, refresh_ahead=0, stale_if_error=0)
    assert b == TTLPolicy(seconds=50, jitter=0.2, negative_seconds=5, refresh_ahead=0, stale_if_error=9)
    assert c.seconds is None and c.jitter == 0.2 and c.negative_seconds == 5
    assert d.seconds == 42 and d.jitter == 0.2
    assert e.seconds is None and e.jitter == 0
    assert all(route.effective_ttl is route.ttl for route in cfg.routes)


def test_top_level_ttl_none(tmp_path):
    cfg = load_config(write(tmp_path, "ttl: none\n"), env={})
    assert cfg.ttl.seconds is None and cfg.ttl.negative_seconds == 30


def test_route_ttl_errors_have_route_paths():
    data = with_routes({"key": "a:{x}", "backend": "main", "ttl": {"refresh_ahead": 2}})
    assert_problem(error_of(data), "routes[0].ttl.refresh_ahead", "must be <= 1")


def test_empty_sections_mean_defaults(tmp_path):
    path = write(tmp_path, "listen:\nupstream:\n  tls:\n  nodes:\nbackends:\nroutes:\nttl:\n")
    cfg = load_config(path, env={})
    assert cfg.listen.port == 6380 and cfg.upstream.tls.verify and cfg.upstream.nodes == []
    assert cfg.backends == {} and cfg.routes == [] and cfg.ttl.seconds == 300
    # a scalar left empty is still an error: there is no section of defaults to fall back on
    with pytest.raises(ConfigError, match="listen.port"):
        load_config(write(tmp_path, "listen:\n  port:\n"), env={})


def test_write_behind_and_write_through_load_on_a_cluster():
    route = {"key": "user:{id:int}", "backend": "main",
             "read": {"query": "SELECT * FROM users WHERE id = $1"},
             "write": {"mode": "write-behind", "upsert": "INSERT INTO users VALUES ($1, $2)", "fields": ["name"],
                       "delete": "DELETE FROM users WHERE id = $1"}}
    data = with_routes(route)
    data["upstream"] = {"cluster": True, "url": "redis://127.0.0.1:7000"}
    assert config_from_dict(data).routes[0].write.mode == "write-behind"
    route["write"]["mode"] = "write-through"
    assert config_from_dict(data).routes[0].write.mode == "write-through"
