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

import os
import re
import types
from functools import cached_property
from typing import Annotated, Any, Literal, NamedTuple, Union, get_args, get_origin
from urllib.parse import unquote, urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from ..cache.templates import compile_template

ENV_PREFIX = "CACHEPROXY_"


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


def unwrap(tp: Any) -> Any:
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


def _is_container(annotation: Any) -> bool:
    tp = unwrap(annotation)
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
    auth: Literal["local", "upstream"] = Field(
        "local", description="use local (password/users above) or upstream (clients' AUTH is checked by the "
                             "upstream Redis; then leave password and users out)")
    max_clients: int = Field(10000, ge=1, description="set the most client connections to accept at once (>= 1)")
    idle_timeout: float = Field(0, ge=0, description="set seconds after which idle clients are closed (0 = never)")
    reuse_port: bool = Field(False, description="set true to let several processes share the port (SO_REUSEPORT)")

    @model_validator(mode="after")
    def _one_source_of_credentials(self) -> Listen:
        if self.auth == "upstream" and (self.password or self.users):
            raise ValueError("auth: upstream checks clients' credentials on the upstream Redis; leave password "
                             "and users out (or use auth: local)")
        return self


class Limits(_Model):
    max_bulk_len: int = Field(536870912, ge=1, description="set the largest bulk string accepted, in bytes (>= 1)")
    max_multibulk_len: int = Field(2147483647, ge=1,
                                   description="set the most elements accepted in one command (>= 1)")
    max_inline_len: int = Field(65536, ge=1, description="set the longest inline command accepted, in bytes (>= 1)")
    max_query_buffer: int = Field(268435456, ge=1,
                                  description="set the most bytes the proxy holds for one client's unfinished "
                                              "request, in bytes (>= 1; Redis's client-query-buffer-limit)")
    max_query_buffer_total: int = Field(268435456, ge=0,
                                        description="set the most bytes of unfinished requests held for all "
                                                    "clients together, in bytes (0 = no total limit)")
    request_timeout: float = Field(60.0, ge=0,
                                   description="set the most seconds a client may take to send one request once "
                                               "it has begun (0 = no limit)")
    client_output_soft: int = Field(8388608, ge=1,
                                    description="set the bytes of unsent replies at which the proxy stops "
                                                "reading from that client (>= 1)")
    client_output_hard: int = Field(268435456, ge=0,
                                    description="set the bytes of unsent replies at which the client is "
                                                "disconnected (0 = never)")
    max_inflight: int = Field(1024, ge=1,
                              description="set the most commands per client awaiting replies before the proxy "
                                          "stops reading from it (>= 1)")
    max_loads_per_command: int = Field(16, ge=1,
                                       description="set the most backend loads one MGET or EXISTS of missing "
                                                   "routed keys runs at once (>= 1)")


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


DurabilityAction = Literal["refuse", "warn", "ignore"]


class Durability(_Model):
    """What the proxy does when the upstream cannot keep the write-behind queue (checked only while a
    route writes behind: a read-through cache may be evicted and lost freely)."""
    eviction: DurabilityAction = Field(
        "refuse", description="use one of: refuse, warn, ignore (when maxmemory-policy is allkeys-* with a "
                              "maxmemory set, Redis may evict the queue's streams: acknowledged writes lost)")
    persistence: DurabilityAction = Field(
        "warn", description="use one of: refuse, warn, ignore (when the upstream has neither AOF nor a "
                            "connected replica, a Redis restart loses the queued writes)")
    check_interval: float = Field(30.0, gt=0, description="set seconds between checks of the upstream's "
                                                          "settings, which CONFIG SET can change at runtime (> 0)")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        # `durability: warn` sets both eviction and persistence.
        if isinstance(data, str):
            return {"eviction": data, "persistence": data}
        return data


class Upstream(_Model):
    url: str = Field("redis://127.0.0.1:6379/0",
                     description="set a redis:// or rediss:// url such as redis://user:pass@host:6379/0")
    cluster: bool = Field(False, description="set true when the upstream is a Redis Cluster")
    nodes: list[Annotated[str, AfterValidator(_check_node)]] = Field(default_factory=list,
                             description="list extra cluster seed nodes as \"host:port\" (cluster mode only)")
    pool_size: int = Field(2, ge=1, le=256,
                           description="set a pool size between 1 and 256 (shared connections per RESP version)")
    spare_connections: int = Field(2, ge=0, le=64,
                                   description="set how many dedicated connections per RESP version to keep "
                                               "connected ahead of time for SUBSCRIBE, MONITOR, WATCH, blocking "
                                               "commands and SELECT (0..64; 0 = open them when needed)")
    connect_timeout: float = Field(2.0, gt=0, description="set seconds to wait for an upstream connection (> 0)")
    command_timeout: float = Field(10.0, gt=0, description="set seconds to wait for an upstream reply (> 0)")
    read_from: Literal["primary", "replica", "prefer_replica"] = Field(
        "primary", description="use one of: primary, replica, prefer_replica")
    tls: UpstreamTLS = Field(default_factory=UpstreamTLS, description="set TLS options for a rediss:// upstream")
    durability: Durability = Field(default_factory=Durability,
                                   description="set refuse, warn or ignore for eviction and persistence, or one "
                                               "of them for both")

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
    readiness_cache_seconds: float = Field(
        1.0, ge=0, description="set seconds a /readyz result is reused (>= 0; 0 = check on every request; "
                               "checks never overlap)")
    token: OptStr = Field(None, description="set a secret that /metrics and /readyz require as "
                                            "`Authorization: Bearer <token>` (/healthz stays open)")
    token_file: OptStr = Field(None, description="set the path of an existing file holding the admin token "
                                                 "(instead of token; surrounding whitespace is ignored)")

    _token_file_exists = field_validator("token_file")(_existing_file)

    @property
    def bearer(self) -> str | None:
        """The admin token from `token` or `token_file`, if either is set."""
        if self.token_file:
            with open(self.token_file) as f:
                return f.read().strip() or None
        return self.token


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
    queue_timeout: float = Field(5.0, gt=0, description="set seconds a cache miss waits for a free connection "
                                                        "before the client gets 'backend NAME busy' (> 0)")
    versions_table: OptStr = Field("cacheproxy_versions",
                                   description="name the table (schema.table allowed) that keeps the newest "
                                               "version written per key, so an older write never lands over a "
                                               "newer one; created if missing; '' turns fencing off")

    _dsn = field_validator("dsn")(_valid_dsn)


class DynamoBackend(_Model):
    type: Literal["dynamodb"] = Field(description="use one of: postgres, dynamodb")
    region: str = Field("us-east-1", min_length=1, description="set the AWS region, e.g. us-east-1")
    endpoint_url: OptStr = Field(None, description="set an http(s):// endpoint (DynamoDB Local, moto), or leave "
                                                   "it out for AWS")
    max_pool: int = Field(10, ge=1, description="set the most HTTP connections to DynamoDB (>= 1)")
    timeout: float = Field(5.0, gt=0, description="set seconds to wait for a DynamoDB call (> 0)")
    queue_timeout: float = Field(5.0, gt=0, description="set seconds a cache miss waits for a free connection "
                                                        "before the client gets 'backend NAME busy' (> 0)")

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
    max_attempts: int = Field(10, ge=1, description="remove this setting: it is no longer used (a database that "
                                                    "is unavailable is retried without limit; a row it refuses is "
                                                    "dead-lettered at once)")
    max_pending: int = Field(100000, ge=1, description="set the most unflushed writes before backpressure (>= 1)")
    coalesce: bool = Field(True, description="set false to send every write instead of the last per key")
    claim_idle_ms: int = Field(15000, ge=100, description="set ms after which another sidecar takes over a dead "
                                                          "one's partitions and pending writes (>= 100)")
    stream_prefix: str = Field("cacheproxy:wb", min_length=1, description="set the prefix of the queue's Redis "
                                                                        "stream names")
    partitions: int = Field(16, ge=1, le=1024, description="set how many streams the queue is split into "
                                                            "(1..1024); a key always uses the same one")
    retry_base_ms: int = Field(200, ge=1, description="set the first retry delay in ms (doubles per attempt)")
    retry_max_ms: int = Field(30000, ge=1, description="set the longest retry delay in ms (retries never stop "
                                                       "while the database is unavailable)")
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
