"""Configuration: the pydantic schema, YAML loading, ${ENV} expansion, overrides, and readable errors.

The order of work in load_config():
    read file -> YAML (line numbers on syntax errors, duplicate keys refused)
    -> expand ${VAR} and ${VAR:-default} in string values ($${...} is a literal "${...}")
    -> apply CACHEPROXY_<SECTION>__<FIELD>=value overrides (values parsed as YAML scalars, except
       for string fields, which take the text as it is so a password such as "0123" stays a string)
    -> pydantic validation (types, ranges, unknown fields)
    -> cross-field checks in Config's validator (backends exist, routes fit their backend, templates
       compile and are not ambiguous, ...) and the merge of route TTLs with the top-level `ttl`.

Every failure is a ConfigError whose message has one line per problem:
    <file>: <field path>: <what is wrong>; fix: <what to do>
The "fix" of a field-level error is the field's `description`, so descriptions are written as
instructions. Nothing here prints or exits: the CLI decides what to do with the message.
"""

from __future__ import annotations

import difflib
import os
import re
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, Union, get_args, get_origin
from urllib.parse import unquote, urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from .router import TemplateError, ambiguous, compare, compile_template, template_params

__all__ = [
    "Admin", "Config", "ConfigError", "DynamoBackend", "Limits", "Listen", "Log", "PostgresBackend",
    "Problem", "Route", "RouteRead", "RouteWrite", "Shutdown", "TTLPolicy", "Upstream", "UpstreamTLS",
    "WriteBehind", "config_from_dict", "load_config",
]

ENV_PREFIX = "CACHEPROXY_"


# ------------------------------------------------------------------------------------------- errors

@dataclass(frozen=True)
class Problem:
    path: str       # dotted field path such as routes[0].ttl.seconds, or a file position
    message: str
    fix: str

    def line(self, source: str, origin: str = "") -> str:
        where = f"{source}: {self.path}: " if self.path else f"{source}: "
        note = f" ({origin})" if origin else ""
        return f"{where}{self.message}{note}; fix: {self.fix}"


class ConfigError(Exception):
    """The configuration is unusable. str(error) is the human readable report, one problem a line."""

    def __init__(self, message: str, problems: Sequence[Problem] = (), source: str = ""):
        super().__init__(message)
        self.problems = list(problems)
        self.source = source

    @classmethod
    def from_problems(cls, source: str, problems: Sequence[Problem], origins: Mapping[str, str] | None = None):
        origins = origins or {}
        lines = [p.line(source, _origin_of(p.path, origins)) for p in problems]
        return cls("\n".join(lines), problems, source)


def _origin_of(path: str, origins: Mapping[str, str]) -> str:
    """Where a value came from, if not from the file itself (an env override or a ${VAR}).

    Matches in both directions: a bad value inside an overridden one, and an unknown section that
    only exists because an override created it (CACHEPROXY_UPSTREM__URL -> `upstrem`)."""
    for origin, note in origins.items():
        if _within(path, origin) or _within(origin, path):
            return note
    return ""


def _within(path: str, parent: str) -> bool:
    return bool(path) and (path == parent or path.startswith((parent + ".", parent + "[")))


def _join(path: str, name: str | int) -> str:
    return _dotted([name]) if not path else path + (_dotted([name]) if not isinstance(name, str) or not
                                                     re.fullmatch(r"[A-Za-z0-9_\-]+", name) else "." + name)


def _dotted(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z0-9_\-]+", part):
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"
    return out


# ---------------------------------------------------------------------------------- shared helpers

def _empty_is_none(value: Any) -> Any:
    # `endpoint_url: ${DDB_ENDPOINT:-}` means "not set", not "the empty string".
    return None if value == "" else value


OptStr = Annotated[str | None, BeforeValidator(_empty_is_none)]


def _existing_file(value: str | None) -> str | None:
    if value is None:
        return None
    path = os.path.expanduser(value)
    if not os.path.isfile(path):
        raise ValueError(f"file {value!r} does not exist (relative paths start at {os.getcwd()})")
    return path


def _is_container(annotation: Any) -> bool:
    tp = _unwrap(annotation)
    return get_origin(tp) in (dict, list) or (isinstance(tp, type) and issubclass(tp, BaseModel))


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, coerce_numbers_to_str=True)

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, data: Any) -> Any:
        # A section left empty in YAML (`listen:` with everything commented out) is null: treat it as
        # "all defaults" rather than as a type error. Only for fields that cannot be null themselves.
        if not isinstance(data, dict):
            return data
        empty = [name for name, value in data.items() if value is None and name in _container_fields(cls)]
        return {k: v for k, v in data.items() if k not in empty} if empty else data


def _container_fields(model: type[BaseModel]) -> set[str]:
    return {info.alias or name for name, info in model.model_fields.items()
            if _is_container(info.annotation) and not _nullable(info.annotation)}


def _nullable(annotation: Any) -> bool:
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    return get_origin(annotation) in (Union, types.UnionType) and type(None) in get_args(annotation)


# ---------------------------------------------------------------------------------------- sections

class Listen(_Model):
    host: str = Field("127.0.0.1", description="set the address clients connect to, e.g. 127.0.0.1 or 0.0.0.0")
    port: int = Field(6380, ge=1, le=65535, description="set a TCP port between 1 and 65535")
    password: OptStr = Field(None, description="set the password clients send with AUTH <password>, or leave it out")
    users: dict[str, str] = Field(default_factory=dict,
                                  description="map user names to passwords for AUTH <user> <password>")
    max_clients: int = Field(10000, ge=1, description="set the most client connections to accept at once (>= 1)")
    idle_timeout: float = Field(0, ge=0, description="set seconds after which idle clients are closed (0 = never)")
    reuse_port: bool = Field(False, description="set true to let several processes share the port (SO_REUSEPORT)")


class Limits(_Model):
    max_bulk_len: int = Field(536870912, ge=1, description="set the largest bulk string accepted, in bytes (>= 1)")
    max_multibulk_len: int = Field(2147483647, ge=1,
                                   description="set the most elements accepted in one command (>= 1)")
    max_inline_len: int = Field(65536, ge=1, description="set the longest inline command accepted, in bytes (>= 1)")
    client_output_soft: int = Field(8388608, ge=1,
                                    description="set the bytes of unsent replies at which the proxy stops "
                                                "reading from that client (>= 1)")
    client_output_hard: int = Field(268435456, ge=0,
                                    description="set the bytes of unsent replies at which the client is "
                                                "disconnected (0 = never)")
    max_inflight: int = Field(1024, ge=1,
                              description="set the most commands per client awaiting replies before the proxy "
                                          "stops reading from it (>= 1)")


class UpstreamTLS(_Model):
    ca_file: OptStr = Field(None, description="set the path of an existing CA bundle (PEM) to verify the server")
    cert_file: OptStr = Field(None, description="set the path of an existing client certificate (PEM)")
    key_file: OptStr = Field(None, description="set the path of an existing client private key (PEM)")
    verify: bool = Field(True, description="set false only to skip server certificate verification (testing)")
    server_hostname: OptStr = Field(None, description="set the name to verify the server certificate against "
                                                      "(default: the url's host)")

    _files_exist = field_validator("ca_file", "cert_file", "key_file")(_existing_file)


class RedisURL(NamedTuple):
    host: str
    port: int
    db: int
    username: str | None
    password: str | None
    use_tls: bool
    redacted: str


def parse_redis_url(url: str) -> RedisURL:
    """Split redis[s]://[user[:password]@]host[:port][/db]; ValueError says what is wrong (never the password)."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"cannot parse url: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("redis", "rediss"):
        raise ValueError(f"scheme {(parts.scheme or '(none)')!r} is not supported")
    if not parts.hostname:
        raise ValueError("the url has no host")
    if parts.query or parts.fragment:
        raise ValueError("query strings and fragments are not supported in the url")
    db_text = parts.path.strip("/")
    if db_text and not db_text.isdigit():
        raise ValueError(f"database {db_text!r} in the url path must be an integer >= 0")
    userinfo, _, hostport = parts.netloc.rpartition("@")
    redacted_netloc = parts.netloc
    if parts.password:
        redacted_netloc = f"{userinfo.partition(':')[0]}:***@{hostport}"
    return RedisURL(
        host=parts.hostname,
        port=port or 6379,
        db=int(db_text or 0),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        use_tls=scheme == "rediss",
        redacted=f"{scheme}://{redacted_netloc}{parts.path}",
    )


def _check_node(node: str) -> str:
    host, sep, port = node.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"seed node {node!r} is not host:port")
    return node


class Upstream(_Model):
    url: str = Field("redis://127.0.0.1:6379/0",
                     description="set a redis:// or rediss:// url such as redis://user:pass@host:6379/0")
    cluster: bool = Field(False, description="set true when the upstream is a Redis Cluster")
    nodes: list[Annotated[str, AfterValidator(_check_node)]] = Field(default_factory=list,
                             description="list extra cluster seed nodes as \"host:port\" (cluster mode only)")
    pool_size: int = Field(2, ge=1, le=256,
                           description="set a pool size between 1 and 256 (shared connections per RESP version)")
    connect_timeout: float = Field(2.0, gt=0, description="set seconds to wait for an upstream connection (> 0)")
    command_timeout: float = Field(10.0, gt=0, description="set seconds to wait for an upstream reply (> 0)")
    read_from: Literal["primary", "replica", "prefer_replica"] = Field(
        "primary", description="use one of: primary, replica, prefer_replica")
    tls: UpstreamTLS = Field(default_factory=UpstreamTLS, description="set TLS options for a rediss:// upstream")

    @field_validator("url")
    @classmethod
    def _valid_url(cls, value: str) -> str:
        parse_redis_url(value)
        return value.strip()

    @cached_property
    def parsed_url(self) -> RedisURL:
        return parse_redis_url(self.url)

    @property
    def host(self) -> str:
        return self.parsed_url.host

    @property
    def port(self) -> int:
        return self.parsed_url.port

    @property
    def db(self) -> int:
        return self.parsed_url.db

    @property
    def username(self) -> str | None:
        return self.parsed_url.username

    @property
    def password(self) -> str | None:
        return self.parsed_url.password

    @property
    def use_tls(self) -> bool:
        return self.parsed_url.use_tls

    @property
    def redacted_url(self) -> str:
        """The url with its password replaced by ***, for logs."""
        return self.parsed_url.redacted


class Admin(_Model):
    enabled: bool = Field(True, description="set false to turn off the HTTP endpoint (/metrics /healthz /readyz)")
    host: str = Field("127.0.0.1", description="set the address of the admin HTTP endpoint")
    port: int = Field(9121, ge=0, le=65535, description="set a TCP port between 1 and 65535 (0 picks a free one)")


class Log(_Model):
    level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="use one of: debug, info, warning, error")
    format: Literal["text", "json"] = Field("text", description="use one of: text, json")


class Shutdown(_Model):
    grace_seconds: float = Field(10.0, ge=0, description="set how many seconds SIGTERM waits for in-flight replies (>= 0)")


def _none_seconds(value: Any) -> Any:
    # YAML has no `none` keyword: `seconds: none` arrives as a string and means "no expiry".
    return None if isinstance(value, str) and value.strip().lower() in ("none", "null", "~") else value


class TTLPolicy(_Model):
    seconds: Annotated[int | None, BeforeValidator(_none_seconds)] = Field(
        300, ge=1, description="set the cache TTL in seconds (>= 1), or `none` for no expiry")
    jitter: float = Field(0.1, ge=0, le=1, description="set the random TTL spread as a fraction between 0 and 1")
    negative_seconds: int = Field(30, ge=0, description="set seconds to remember a missing row (0 = off)")
    refresh_ahead: float = Field(0.0, ge=0, le=1,
                                 description="set the fraction of TTL remaining that triggers a background "
                                             "reload, between 0 and 1 (0 = off)")
    stale_if_error: int = Field(0, ge=0, description="set seconds a stale value may be served while the backend "
                                                     "fails (0 = off)")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        # `ttl: none` and `ttl: 60` are shorthands for {seconds: none} and {seconds: 60}.
        if isinstance(data, str) and _none_seconds(data) is None:
            return {"seconds": None}
        if isinstance(data, int) and not isinstance(data, bool):
            return {"seconds": data}
        return data


def _valid_dsn(value: str) -> str:
    if not value.startswith(("postgres://", "postgresql://")):
        shown = value.split("://")[0] + "://..." if "://" in value else "not a URL"
        raise ValueError(f"dsn must be a postgres:// or postgresql:// URL (got {shown})")
    return value


class PostgresBackend(_Model):
    type: Literal["postgres"] = Field(description="use one of: postgres, dynamodb")
    dsn: str = Field(description="set a DSN such as postgresql://user:pass@host:5432/dbname")
    min_pool: int = Field(1, ge=0, description="set the connections kept open (>= 0, <= max_pool)")
    max_pool: int = Field(10, ge=1, description="set the most connections to Postgres (>= 1)")
    statement_timeout_ms: int = Field(5000, ge=0, description="set the statement timeout in ms (0 = none)")
    connect_timeout: float = Field(5.0, gt=0, description="set seconds to wait for a Postgres connection (> 0)")

    _dsn = field_validator("dsn")(_valid_dsn)


class DynamoBackend(_Model):
    type: Literal["dynamodb"] = Field(description="use one of: postgres, dynamodb")
    region: str = Field("us-east-1", min_length=1, description="set the AWS region, e.g. us-east-1")
    endpoint_url: OptStr = Field(None, description="set an http(s):// endpoint (DynamoDB Local, moto), or leave "
                                                   "it out for AWS")
    max_pool: int = Field(10, ge=1, description="set the most HTTP connections to DynamoDB (>= 1)")
    timeout: float = Field(5.0, gt=0, description="set seconds to wait for a DynamoDB call (> 0)")

    @field_validator("endpoint_url")
    @classmethod
    def _valid_endpoint(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"https?://[^/\s]+", value):
            raise ValueError(f"endpoint_url {value!r} is not an http:// or https:// URL")
        return value


Backend = Annotated[PostgresBackend | DynamoBackend, Field(discriminator="type")]


class RouteRead(_Model):
    as_: Literal["json", "hash", "string"] = Field(
        "json", alias="as", description="use one of: json, hash, string (how a row is stored in the cache)")
    # postgres
    query: str | None = Field(None, description="set the SQL that loads one key, with $1..$n for parameters")
    params: list[str] | None = Field(None, description="list the key parameters bound to $1..$n, in order "
                                                       "(default: the template's parameters)")
    many: bool = Field(False, description="set true to cache all returned rows as a JSON array (as: json only)")
    column: str | None = Field(None, description="name the column or attribute holding the value (as: string only)")
    # dynamodb
    table: str | None = Field(None, description="name the DynamoDB table")
    key: dict[str, str] | None = Field(None, description="map key attributes to templates, e.g. "
                                                         "{UserId: \"{user_id}\"} (partition + optional sort key)")
    key_condition: str | None = Field(None, description="set a DynamoDB KeyConditionExpression, e.g. "
                                                        "\"OrgId = :org\"")
    values: dict[str, str] | None = Field(None, description="map expression values to templates, e.g. "
                                                            "{\":org\": \"{org}\"}")
    index: str | None = Field(None, description="name a secondary index to query (with key_condition)")
    consistent_read: bool = Field(False, description="set true for strongly consistent DynamoDB reads")


class RouteWrite(_Model):
    mode: Literal["write-behind", "write-through", "read-only"] = Field(
        "read-only", description="use one of: write-behind, write-through, read-only")
    upsert: str | None = Field(None, description="set the SQL that stores one key: key parameters as $1..$k, "
                                                 "then `fields` in order")
    delete: str | None = Field(None, description="set the SQL that deletes one key, key parameters as $1..$k")
    table: str | None = Field(None, description="name the Postgres table to generate upsert/delete SQL for")
    key_columns: list[str] | None = Field(None, description="list the table's key columns, one per template "
                                                            "parameter, in order")
    fields: list[str] | None = Field(None, description="list the value fields the upsert binds after the key "
                                                       "parameters")
    delete_on_del: bool = Field(True, description="set false to keep database rows when a key is deleted")
    version_attribute: str | None = Field(None, description="name the DynamoDB attribute used for conditional "
                                                            "puts (dynamodb only)")
    on_backpressure: Literal["error", "write-through"] = Field(
        "error", description="use one of: error, write-through (what to do when the queue is full)")


class Route(_Model):
    key: str = Field(min_length=1, description="set a key template such as \"user:{id:int}\" "
                                              "(types: str, int, uuid)")
    backend: str = Field(description="name one of the entries of `backends`")
    read: RouteRead | None = Field(None, description="describe how a cache miss loads the key from the backend")
    write: RouteWrite | None = Field(None, description="describe how writes reach the backend")
    ttl: TTLPolicy | None = Field(None, description="override fields of the top-level ttl for this route, or "
                                                    "write `ttl: none` for no expiry")

    @property
    def effective_ttl(self) -> TTLPolicy:
        """The route's full TTL policy (after Config validation, `ttl` already holds the merged policy)."""
        return self.ttl if self.ttl is not None else TTLPolicy()

    @property
    def template(self):
        return compile_template(self.key)


class WriteBehind(_Model):
    batch_size: int = Field(100, ge=1, description="set the most queued writes sent in one backend batch (>= 1)")
    max_delay_ms: int = Field(200, ge=0, description="set the most ms a write waits for its batch to fill (>= 0)")
    max_attempts: int = Field(10, ge=1, description="set the tries before a write goes to the dead letters (>= 1)")
    max_pending: int = Field(100000, ge=1, description="set the most unflushed writes before backpressure (>= 1)")
    coalesce: bool = Field(True, description="set false to send every write instead of the last per key")
    claim_idle_ms: int = Field(15000, ge=100, description="set ms after which another sidecar takes over a dead "
                                                          "one's partitions and pending writes (>= 100)")
    stream_prefix: str = Field("cacheproxy:wb", min_length=1, description="set the prefix of the queue's Redis "
                                                                        "stream names")
    partitions: int = Field(16, ge=1, le=1024, description="set how many streams the queue is split into "
                                                            "(1..1024); a key always uses the same one")
    retry_base_ms: int = Field(200, ge=1, description="set the first retry delay in ms (doubles per attempt)")
    retry_max_ms: int = Field(30000, ge=1, description="set the longest retry delay in ms")
    consumer: str | None = Field(None, description="name this sidecar in the queue's consumer group "
                                                   "(default: hostname:port; keep it stable across restarts)")


class Config(_Model):
    listen: Listen = Field(default_factory=Listen, description="set where clients connect")
    limits: Limits = Field(default_factory=Limits, description="set protocol and per-client limits")
    upstream: Upstream = Field(default_factory=Upstream, description="set the Redis the proxy fronts")
    admin: Admin = Field(default_factory=Admin, description="set the admin HTTP endpoint")
    log: Log = Field(default_factory=Log, description="set logging")
    shutdown: Shutdown = Field(default_factory=Shutdown, description="set graceful shutdown")
    ttl: TTLPolicy = Field(default_factory=TTLPolicy, description="set the default TTL policy of routes")
    backends: dict[str, Backend] = Field(default_factory=dict,
                                         description="name the databases routes read from and write to")
    routes: list[Route] = Field(default_factory=list, description="list the key templates cached from backends")
    write_behind: WriteBehind = Field(default_factory=WriteBehind, description="set the write-behind queue")

    @model_validator(mode="after")
    def _cross_checks(self, info: ValidationInfo) -> Config:
        # Raised as ConfigError (not ValueError) so pydantic lets it through with exact field paths.
        context = info.context or {}
        problems = _check_config(self)
        if problems:
            raise ConfigError.from_problems(context.get("source", "<config>"), problems, context.get("origins"))
        for route in self.routes:
            _fill_defaults(route, self.ttl)
        return self


# ------------------------------------------------------------------------------- cross-field checks

def _check_config(cfg: Config) -> list[Problem]:
    problems = _check_upstream(cfg.upstream) + _check_sections(cfg) + _check_backends(cfg)
    for index, route in enumerate(cfg.routes):
        problems += _check_route(cfg, index, route)
    return problems + _check_ambiguity(cfg.routes)


def _check_upstream(up: Upstream) -> list[Problem]:
    problems = []
    if up.nodes and not up.cluster:
        problems.append(Problem("upstream.nodes", "seed nodes are only used in cluster mode",
                                "set upstream.cluster: true, or remove upstream.nodes"))
    if up.cluster and up.db != 0:
        problems.append(Problem("upstream.url", f"Redis Cluster has only database 0 (the url selects {up.db})",
                                "remove the /db part of the url"))
    tls = up.tls
    if not up.use_tls and any((tls.ca_file, tls.cert_file, tls.key_file, tls.server_hostname)):
        problems.append(Problem("upstream.tls", "TLS options are set but upstream.url uses redis://",
                                "use a rediss:// url, or remove upstream.tls"))
    if bool(tls.cert_file) != bool(tls.key_file):
        field = "key_file" if tls.cert_file else "cert_file"
        problems.append(Problem(f"upstream.tls.{field}", "cert_file and key_file go together",
                                f"set upstream.tls.{field} as well"))
    return problems


def _check_sections(cfg: Config) -> list[Problem]:
    problems = []
    limits = cfg.limits
    if limits.client_output_hard and limits.client_output_hard < limits.client_output_soft:
        problems.append(Problem(
            "limits.client_output_hard",
            f"must be >= limits.client_output_soft ({limits.client_output_soft}) or 0 "
            f"(got {limits.client_output_hard})",
            "raise client_output_hard, lower client_output_soft, or set client_output_hard: 0"))
    any_host = ("0.0.0.0", "::", "")
    same_host = cfg.admin.host == cfg.listen.host or cfg.admin.host in any_host or cfg.listen.host in any_host
    if cfg.admin.enabled and cfg.admin.port == cfg.listen.port and same_host:
        problems.append(Problem("admin.port", f"same port as listen.port ({cfg.listen.port})",
                                "give the admin endpoint its own port, or set admin.enabled: false"))
    return problems


def _check_backends(cfg: Config) -> list[Problem]:
    problems = []
    for name, backend in cfg.backends.items():
        if isinstance(backend, PostgresBackend) and backend.min_pool > backend.max_pool:
            problems.append(Problem(f"backends.{name}.min_pool",
                                    f"must be <= max_pool ({backend.max_pool}) (got {backend.min_pool})",
                                    "lower min_pool or raise max_pool"))
    return problems


def _check_route(cfg: Config, index: int, route: Route) -> list[Problem]:
    at = f"routes[{index}]"
    backend = cfg.backends.get(route.backend)
    problems = []
    if backend is None:
        names = ", ".join(cfg.backends)
        fix = f"use one of: {names}" if names else "define it under `backends:` first"
        problems.append(Problem(f"{at}.backend", f"unknown backend {route.backend!r}", fix))
    try:
        params = route.template.params
    except TemplateError as exc:
        return problems + [Problem(f"{at}.key", f"bad key template: {exc}",
                                   "write parameters as {name} or {name:int|uuid|str}, separated by literal "
                                   "text such as ':'")]
    if backend is None:
        return problems
    if route.read is not None:
        check = _check_pg_read if backend.type == "postgres" else _check_ddb_read
        problems += check(f"{at}.read", route.read, route.key, params)
    if route.write is not None:
        problems += _check_write(f"{at}.write", route, backend.type, params)
    return problems


def _not_for(at: str, section: BaseModel, names: Sequence[str], kind: str) -> list[Problem]:
    """Fields set that belong to the other backend type."""
    return [Problem(f"{at}.{name}", f"only used by {kind} routes", f"remove {name} from this route")
            for name in names if getattr(section, name) is not None]


def _unknown_params(at: str, used: Sequence[str], template: str, params: Sequence[str]) -> list[Problem]:
    allowed = ", ".join(params) or "(the template has no parameters)"
    return [Problem(at, f"{name!r} is not a parameter of key template {template!r}", f"use one of: {allowed}")
            for name in used if name not in params]


def _placeholders(sql: str) -> int:
    """Highest $n in a statement, ignoring quoted string literals."""
    unquoted = re.sub(r"'(?:[^']|'')*'", "''", sql)
    return max((int(n) for n in re.findall(r"\$(\d+)", unquoted)), default=0)


def _sql_arity(at: str, sql: str, names: Sequence[str]) -> list[Problem]:
    highest = _placeholders(sql)
    if highest == len(names):
        return []
    bound = ", ".join(names) or "nothing"
    return [Problem(at, f"the statement uses up to ${highest} but {len(names)} value(s) are bound ({bound})",
                    "make the $1..$n placeholders match the bound parameters")]


def _check_shape(at: str, read: RouteRead) -> list[Problem]:
    problems = []
    if read.many and read.as_ != "json":
        problems.append(Problem(f"{at}.many", f"many rows can only be cached as json (as: {read.as_})",
                                "set `as: json`, or remove many"))
    if read.column is not None and read.as_ != "string":
        problems.append(Problem(f"{at}.column", "column only applies to `as: string`",
                                "set `as: string`, or remove column"))
    return problems


def _check_pg_read(at: str, read: RouteRead, template: str, params: list[str]) -> list[Problem]:
    problems = _check_shape(at, read) + _not_for(at, read, ("table", "key", "key_condition", "values", "index"),
                                                 "dynamodb")
    names = read.params if read.params is not None else params
    problems += _unknown_params(f"{at}.params", names, template, params)
    if read.query is None:
        problems.append(Problem(f"{at}.query", "a postgres route needs a query",
                                "set read.query, e.g. SELECT ... WHERE id = $1"))
    else:
        problems += _sql_arity(f"{at}.query", read.query, names)
    return problems


def _template_problems(at: str, templates: Mapping[str, str], key: str, params: list[str]) -> list[Problem]:
    problems = []
    for name, text in templates.items():
        try:
            used = template_params(text)
        except TemplateError as exc:
            problems.append(Problem(_join(at, name), str(exc), "write parameters as {name}"))
            continue
        problems += _unknown_params(_join(at, name), used, key, params)
    return problems


def _check_ddb_read(at: str, read: RouteRead, template: str, params: list[str]) -> list[Problem]:
    problems = _check_shape(at, read) + _not_for(at, read, ("query", "params"), "postgres")
    if not read.table:
        problems.append(Problem(f"{at}.table", "a dynamodb route needs a table", "set read.table"))
    if read.key is not None and read.key_condition is not None:
        problems.append(Problem(f"{at}.key_condition", "give either key (GetItem) or key_condition (Query)",
                                "remove one of them"))
    elif read.key is not None:
        if not 1 <= len(read.key) <= 2:
            problems.append(Problem(f"{at}.key", f"a DynamoDB key has 1 or 2 attributes (got {len(read.key)})",
                                    "list the partition key and, if the table has one, the sort key"))
        for name in ("index", "values"):
            if getattr(read, name) is not None:
                problems.append(Problem(f"{at}.{name}", f"{name} only applies to key_condition (Query) routes",
                                        f"remove {name}, or use key_condition instead of key"))
        if read.many:
            problems.append(Problem(f"{at}.many", "a key lookup returns one item",
                                    "remove many, or use key_condition"))
        problems += _template_problems(f"{at}.key", read.key, template, params)
    elif read.key_condition is not None:
        if not read.values:
            problems.append(Problem(f"{at}.values", "key_condition needs values for its placeholders",
                                    "set read.values, e.g. {\":org\": \"{org}\"}"))
        problems += _template_problems(f"{at}.values", read.values or {}, template, params)
    else:
        problems.append(Problem(f"{at}.key", "a dynamodb route needs key or key_condition",
                                "set read.key, e.g. {UserId: \"{user_id}\"}"))
    return problems


_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)?\Z")


def _identifiers(at: str, names: Sequence[str] | None) -> list[Problem]:
    # Table mode builds SQL from these names, so they must be plain identifiers.
    return [Problem(at, f"{name!r} is not a plain SQL identifier", "use letters, digits and _ (schema.table allowed)")
            for name in names or () if not _IDENT.match(name)]


def _check_write(at: str, route: Route, kind: str, params: list[str]) -> list[Problem]:
    write = route.write
    if write.mode == "read-only":
        optional = ("upsert", "delete", "table", "key_columns", "fields", "version_attribute")
        return [Problem(f"{at}.{name}", "is set but write.mode is read-only",
                        f"set write.mode to write-behind or write-through, or remove {name}")
                for name in optional if getattr(write, name) is not None]
    if kind == "postgres":
        return _check_pg_write(at, write, params)
    return _check_ddb_write(at, route)


def _check_pg_write(at: str, write: RouteWrite, params: list[str]) -> list[Problem]:
    problems = _not_for(at, write, ("version_attribute",), "dynamodb")
    table_mode = write.table is not None or write.key_columns is not None
    if write.upsert is not None and table_mode:
        return problems + [Problem(f"{at}.upsert", "give either upsert/delete SQL or table + key_columns",
                                   "remove upsert/delete, or remove table/key_columns")]
    if table_mode:
        return problems + _check_table_mode(at, write, params)
    if write.upsert is None:
        return problems + [Problem(f"{at}.upsert", "a postgres write route needs upsert SQL or table + key_columns",
                                   "set write.upsert, or write.table and write.key_columns")]
    if write.fields is not None:
        problems += _sql_arity(f"{at}.upsert", write.upsert, list(params) + list(write.fields))
    if write.delete is not None:
        problems += _sql_arity(f"{at}.delete", write.delete, params)
    elif write.delete_on_del:
        problems.append(Problem(f"{at}.delete", "DEL of a key must delete the row, but no delete SQL is given",
                                "set write.delete, or set write.delete_on_del: false"))
    return problems


def _check_table_mode(at: str, write: RouteWrite, params: list[str]) -> list[Problem]:
    problems = []
    for name in ("table", "key_columns", "fields"):
        if not getattr(write, name):
            problems.append(Problem(f"{at}.{name}", "table mode needs table, key_columns and fields",
                                    f"set write.{name}"))
    if write.key_columns and len(write.key_columns) != len(params):
        problems.append(Problem(f"{at}.key_columns",
                                f"{len(write.key_columns)} key column(s) for {len(params)} template parameter(s) "
                                f"({', '.join(params)})", "list one key column per template parameter"))
    if write.delete is not None:
        problems.append(Problem(f"{at}.delete", "table mode generates the delete statement",
                                "remove delete, or use upsert/delete SQL instead of table"))
    problems += _identifiers(f"{at}.table", [write.table] if write.table else [])
    return problems + _identifiers(f"{at}.key_columns", write.key_columns) + _identifiers(f"{at}.fields", write.fields)


def _check_ddb_write(at: str, route: Route) -> list[Problem]:
    write = route.write
    problems = _not_for(at, write, ("upsert", "delete", "table", "key_columns"), "postgres")
    read = route.read
    if read is None or read.key is None:
        problems.append(Problem(f"{at}.mode", "dynamodb writes need read.key to know the item's primary key",
                                "set read.table and read.key on this route, or set write.mode: read-only"))
    return problems


def _check_ambiguity(routes: Sequence[Route]) -> list[Problem]:
    compiled = []
    for index, route in enumerate(routes):
        try:
            compiled.append((index, route.template))
        except TemplateError:
            pass   # already reported
    problems = []
    for pos, (i, first) in enumerate(compiled):
        for j, later in compiled[pos + 1:]:
            if ambiguous(first, later):
                problems.append(_ambiguity_problem(i, first, j, later))
    return problems


def _ambiguity_problem(i: int, first, j: int, later) -> Problem:
    result = compare(first, later)
    if result.first_in_second and result.second_in_first:
        what = f"matches exactly the same keys as routes[{i}] ({first.template!r}), so it is never used"
        fix = "remove one of the two routes"
    elif result.second_in_first:
        what = f"every key it matches is taken first by routes[{i}] ({first.template!r})"
        fix = f"move this route before routes[{i}], or make the templates distinct"
    else:
        what = f"some keys match both this route and routes[{i}] ({first.template!r}), which comes first"
        fix = "make the templates distinct (different literal text or parameter types)"
    return Problem(f"routes[{j}].key", what, fix)


def _fill_defaults(route: Route, top: TTLPolicy) -> None:
    """Give each route a full TTL policy and explicit read params, so consumers never re-derive them."""
    own = route.ttl
    given = {name: getattr(own, name) for name in own.model_fields_set} if own is not None else {}
    route.ttl = top.model_copy(update=given)
    if route.read is not None and route.read.params is None and route.read.query is not None:
        route.read.params = list(route.template.params)


# ------------------------------------------------------------------------------- pydantic -> Problem

@dataclass
class _Where:
    path: list[str | int]
    field: FieldInfo | None = None
    type: Any = None
    model: type[BaseModel] | None = None   # the model the last path element was looked up in


def _unwrap(tp: Any) -> Any:
    """Annotated[X, ...] -> X; Optional[X] -> X; a union of several models -> tuple of them."""
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            members = [a for a in get_args(tp) if a is not type(None)]
            if len(members) > 1:
                return tuple(members)
            tp = members[0]
        else:
            return tp


def _model_field(model: type[BaseModel], name: str) -> tuple[str, FieldInfo] | None:
    for key, info in model.model_fields.items():
        if name in (key, info.alias):
            return info.alias or key, info
    return None


def _resolve(loc: Sequence[str | int]) -> _Where:
    """Follow a pydantic error location (or a data path) through the schema."""
    where = _Where(path=[], type=Config)
    for part in loc:
        tp = where.type
        if isinstance(tp, tuple):   # a tagged union: the location names the tag, which is not a field
            tagged = [m for m in tp if part in get_args(m.model_fields["type"].annotation)]
            if tagged:
                where.type = tagged[0]
                continue
            tp = next((m for m in tp if _model_field(m, str(part))), tp[0])
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            where.model = tp
            found = _model_field(tp, str(part))
            if found is None:                # unknown field: keep the rest of the path as written
                where.path.append(part)
                where.type = None
                continue
            name, where.field = found
            where.path.append(name)
            where.type = _unwrap(where.field.annotation)
        elif get_origin(tp) in (dict, list):
            where.path.append(part)
            where.type = _unwrap(get_args(tp)[-1])
        else:
            where.path.append(part)
            where.type = None
    return where


_SECRET = re.compile(r"password|dsn|url|users", re.I)


def _show(value: Any, path: str) -> str:
    if _SECRET.search(path):                 # say what kind of value, never the value itself
        kind = type(value).__name__
        return {"str": "a string", "dict": "a mapping", "int": "an int"}.get(kind, f"a {kind}")
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_MESSAGES = {
    "missing": "required field is missing",
    "int_parsing": "must be an integer",
    "int_type": "must be an integer",
    "int_from_float": "must be a whole number",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "dict_type": "must be a mapping (key: value)",
    "model_type": "must be a mapping (key: value)",
    "model_attributes_type": "must be a mapping (key: value)",
    "list_type": "must be a list",
}


def _problem(err: Mapping[str, Any]) -> Problem:
    kind = err["type"]
    where = _resolve(err["loc"])
    path = _dotted(where.path)
    fix = where.field.description if where.field is not None and where.field.description else "see config/example.yaml"
    if kind == "extra_forbidden":
        return _unknown_field(path, where)
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        tag = err.get("ctx", {}).get("tag")
        what = f"unknown backend type {tag!r}" if tag else "backend type is missing"
        return Problem(f"{path}.type", what, "set type to one of: postgres, dynamodb")
    if kind == "value_error":
        return Problem(path, str(err.get("ctx", {}).get("error", err["msg"])), fix)
    message = _MESSAGES.get(kind) or _bound_message(kind, err.get("ctx", {})) or _pydantic_message(err["msg"])
    if kind != "missing":
        message += f" (got {_show(err['input'], path)})"
    return Problem(path, message, fix)


_BOUNDS = {"greater_than_equal": (">=", "ge"), "less_than_equal": ("<=", "le"),
           "greater_than": (">", "gt"), "less_than": ("<", "lt")}


def _bound_message(kind: str, ctx: Mapping[str, Any]) -> str | None:
    if kind not in _BOUNDS:
        return None
    op, name = _BOUNDS[kind]
    return f"must be {op} {ctx.get(name)}"


def _pydantic_message(msg: str) -> str:
    msg = msg.replace("Input should be", "must be").replace("Input should have", "must have")
    return msg[:1].lower() + msg[1:]


def _unknown_field(path: str, where: _Where) -> Problem:
    name = str(where.path[-1])
    choices = []
    if where.model is not None:
        choices = [info.alias or key for key, info in where.model.model_fields.items()]
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    if close:
        return Problem(path, f"unknown field; did you mean {close[0]}?", f"rename it to {close[0]}")
    valid = ", ".join(choices) if choices else "none"
    return Problem(path, "unknown field", f"remove it (fields allowed here: {valid})")


# ------------------------------------------------------------------------------- environment values

_VAR = re.compile(r"\$(\$?)\{([^}]*)\}")
_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _expand_env(data: Any, env: Mapping[str, str], loc: list, problems: list, origins: dict) -> Any:
    """${VAR} and ${VAR:-default} in every string value (keys are left alone)."""
    if isinstance(data, dict):
        return {k: _expand_env(v, env, loc + [k], problems, origins) for k, v in data.items()}
    if isinstance(data, list):
        return [_expand_env(v, env, loc + [i], problems, origins) for i, v in enumerate(data)]
    if not isinstance(data, str) or "${" not in data:
        return data
    path = _dotted(_resolve(loc).path) if loc else "(top level)"
    used = []

    def substitute(m: re.Match) -> str:
        if m.group(1):                       # $${X} is the literal text ${X}
            return m.group(0)[1:]
        name, has_default, default = m.group(2).partition(":-")
        if not _VAR_NAME.match(name):
            problems.append(Problem(path, f"bad variable reference {m.group(0)!r}",
                                    "write ${NAME} or ${NAME:-default} (use $${...} for a literal ${)"))
            return ""
        value = env.get(name)
        used.append(name)
        if value is None or (has_default and value == ""):
            if has_default:
                return default
            problems.append(Problem(path, f"environment variable {name} is not set",
                                    f"export {name}, or write ${{{name}:-default}} to give a default"))
            return ""
        return value

    result = _VAR.sub(substitute, data)
    if used:
        origins.setdefault(path, "value from " + ", ".join(f"${{{n}}}" for n in used))
    return result


def _override_value(loc: Sequence[str | int], raw: str) -> Any:
    """Parse an override as a YAML scalar (or flow list), except for string fields: those keep the text."""
    if _resolve(loc).type is str:
        return raw
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    return raw if isinstance(value, dict) else value


def _apply_overrides(data: dict, env: Mapping[str, str], problems: list, origins: dict) -> None:
    """CACHEPROXY_<SECTION>__<FIELD>[__<FIELD>...]=value; names without '__' (CACHEPROXY_CONFIG) are not overrides."""
    for name in sorted(env):
        rest = name[len(ENV_PREFIX):]
        if not name.startswith(ENV_PREFIX) or "__" not in rest:
            continue
        segments: list[str | int] = [int(s) if s.isdigit() else s for s in rest.lower().split("__")]
        if "" in segments:
            problems.append(Problem("", f"environment variable {name} has an empty path segment",
                                    "write CACHEPROXY_<SECTION>__<FIELD>, e.g. CACHEPROXY_LISTEN__PORT"))
            continue
        path = _dotted(_resolve(segments).path)
        error = _set_path(data, segments, _override_value(segments, env[name]))
        if error:
            problems.append(Problem(path, f"cannot apply {name}: {error}",
                                    "fix the variable name, or the value it descends into in the file"))
        else:
            origins[path] = f"set by {name}"


def _set_path(data: dict, segments: Sequence[str | int], value: Any) -> str | None:
    node: Any = data
    for depth, seg in enumerate(segments):
        last = depth == len(segments) - 1
        if isinstance(node, list):
            if not isinstance(seg, int) or seg >= len(node):
                return f"{_dotted(segments[:depth]) or 'the file'} has no item {seg}"
        elif isinstance(node, dict):
            seg = str(seg)                   # mapping keys are names, even when they look like numbers
            if not last and node.get(seg) is None:
                node[seg] = {}               # create (or fill an empty `section:`) on the way down
            elif not last and not isinstance(node[seg], dict | list):
                return f"{_dotted(segments[:depth + 1])} is not a mapping"
        else:
            return f"{_dotted(segments[:depth])} is not a mapping"
        if last:
            node[seg] = value
        else:
            node = node[seg]
    return None


# ------------------------------------------------------------------------------------------- YAML

class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML would silently keep the last one)."""


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            first = seen.setdefault(key, key_node.start_mark.line)
        except TypeError:
            continue                         # unhashable key: SafeLoader reports it below
        if first != key_node.start_mark.line:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first given on line {first + 1})", key_node.start_mark)
    return loader.construct_mapping(node, deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_yaml(path: Path, source: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _fail(source, "", "file not found", "check the path (relative paths start at the current directory)") from None
    except IsADirectoryError:
        raise _fail(source, "", "is a directory, not a file", "give the path of a YAML file") from None
    except UnicodeDecodeError as exc:
        raise _fail(source, "", f"not UTF-8 text ({exc.reason} at byte {exc.start})", "save the file as UTF-8") from None
    except OSError as exc:
        raise _fail(source, "", f"cannot read the file: {exc.strerror or exc}", "check the file's permissions") from None
    try:
        return yaml.load(text, Loader=_Loader)   # _Loader is a SafeLoader
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = " ".join(filter(None, (exc.context, exc.problem)))
        raise _fail(source, where, f"YAML syntax error: {what}",
                    "check indentation, quoting and brackets near that line") from None
    except yaml.YAMLError as exc:
        raise _fail(source, "", f"YAML syntax error: {exc}", "check the file is valid YAML") from None


def _fail(source: str, where: str, message: str, fix: str) -> ConfigError:
    return ConfigError.from_problems(source, [Problem(where, message, fix)])


# --------------------------------------------------------------------------------------- public API

def config_from_dict(data: Mapping[str, Any] | None, source: str = "<dict>", *,
                     env: Mapping[str, str] | None = None) -> Config:
    """Validate a config given as plain data. With `env`, ${VAR} and CACHEPROXY_ overrides apply too
    (load_config passes os.environ; tests that build configs in code usually pass nothing)."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise _fail(source, "", f"the top level must be a mapping of sections (got {type(data).__name__})",
                    "start the file with sections such as `listen:` and `upstream:`")
    data = dict(data)
    origins: dict[str, str] = {}
    if env is not None:
        problems: list[Problem] = []
        data = _expand_env(data, env, [], problems, origins)
        _apply_overrides(data, env, problems, origins)
        if problems:
            raise ConfigError.from_problems(source, problems, origins)
    try:
        return Config.model_validate(data, context={"source": source, "origins": origins})
    except ValidationError as exc:
        raise ConfigError.from_problems(source, [_problem(e) for e in exc.errors()], origins) from None


def load_config(path: str | os.PathLike, env: Mapping[str, str] | None = None) -> Config:
    """Read, expand, override and validate a YAML config file (env defaults to os.environ)."""
    source = os.fspath(path)
    data = _read_yaml(Path(source), source)
    return config_from_dict(data, source, env=os.environ if env is None else env)

