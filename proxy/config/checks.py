"""Cross-field checks of a validated Config (backends exist, routes fit their backend, templates
compile and are not ambiguous ...) and the merge of route TTLs with the top-level `ttl`."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from pydantic import (
    BaseModel,
)

from ..cache.templates import TemplateError, ambiguous, compare, template_params
from .problems import Problem, join
from .schema import Config, PostgresBackend, Route, RouteRead, RouteWrite, TTLPolicy, Upstream

# ------------------------------------------------------------------------------- cross-field checks

def check_config(cfg: Config) -> list[Problem]:
    """Every problem of a Config that field validation alone cannot see (empty: it is usable)."""
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
    if limits.max_query_buffer_total and limits.max_query_buffer_total < limits.max_query_buffer:
        problems.append(Problem(
            "limits.max_query_buffer_total",
            f"must be >= limits.max_query_buffer ({limits.max_query_buffer}) or 0 "
            f"(got {limits.max_query_buffer_total})",
            "raise max_query_buffer_total, lower max_query_buffer, or set max_query_buffer_total: 0"))
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
        if isinstance(backend, PostgresBackend) and backend.versions_table:
            problems += _identifiers(f"backends.{name}.versions_table", [backend.versions_table])
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
            problems.append(Problem(join(at, name), str(exc), "write parameters as {name}"))
            continue
        problems += _unknown_params(join(at, name), used, key, params)
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
    if write is None:
        return []
    if write.mode == "read-only":
        optional = ("upsert", "delete", "table", "key_columns", "fields", "version_attribute")
        return [Problem(f"{at}.{name}", "is set but write.mode is read-only",
                        f"set write.mode to write-behind or write-through, or remove {name}")
                for name in optional if getattr(write, name) is not None]
    problems = _check_string_write(at, route, kind)
    if kind == "postgres":
        return problems + _check_pg_write(at, write, params)
    return problems + _check_ddb_write(at, route)


def _check_string_write(at: str, route: Route, kind: str) -> list[Problem]:
    """A string route's value is one column or attribute: the write must name exactly one place
    for it (a second field would be written NULL, every time)."""
    read, write = route.read, route.write
    if read is None or write is None or read.as_ != "string":
        return []
    fields = write.fields or []
    if len(fields) > 1:
        return [Problem(f"{at}.fields", f"a string route stores one value, but {len(fields)} fields are listed "
                        f"({', '.join(fields)})", "list the one column the value is written to, e.g. fields: [value]")]
    if kind != "dynamodb":
        return []
    read_at = at.rpartition(".")[0] + ".read.column"
    if not fields and read.column is None:
        return [Problem(read_at, "a string route on DynamoDB needs the attribute that holds the value",
                        "set read.column to that attribute")]
    if fields and read.column is not None and fields[0] != read.column:
        return [Problem(f"{at}.fields", f"the value would be written to {fields[0]!r} but read from "
                        f"{read.column!r}", "use the same attribute in write.fields and read.column")]
    return []


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
    if write is None:
        return []
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


def fill_defaults(cfg: Config) -> None:
    for route in cfg.routes:
        _fill_route_defaults(route, cfg.ttl)


def _fill_route_defaults(route: Route, top: TTLPolicy) -> None:
    """Give each route a full TTL policy and explicit read params, so consumers never re-derive them."""
    own = route.ttl
    given = {name: getattr(own, name) for name in own.model_fields_set} if own is not None else {}
    route.ttl = top.model_copy(update=given)
    if route.read is not None and route.read.params is None and route.read.query is not None:
        route.read.params = list(route.template.params)


