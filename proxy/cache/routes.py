"""Wiring: config routes + started backends -> runtime routes behind a Router.

A runtime route knows how to fetch its rows (binding the key's parameters) and how to encode them
for the cache; the loader and the read-through path only talk to this small surface.
"""

from __future__ import annotations

import logging

from ..backends.base import BackendError, BackendPermanentError, ReadSpec, WriteOp, WriteSpec
from ..config import StartupError
from .encoding import from_json, to_hash, to_json, to_string
from .loader import Found
from .templates import Router, compile_template, fill

log = logging.getLogger("cacheproxy.routes")


class RuntimeRoute:
    def __init__(self, index: int, cfg_route, backend, metrics):
        self.index = index
        self.key = cfg_route.key           # the template: Router matches on it
        self.name = cfg_route.key          # metric label
        self.backend = backend
        self.backend_name = cfg_route.backend
        read = cfg_route.read
        self.read = read
        self.encoding = read.as_
        self.family = "hash" if read.as_ == "hash" else "value"
        self.ttl = cfg_route.ttl
        # Hits need the remaining TTL only for refresh-ahead and stale-if-error.
        self.needs_pttl = bool(self.ttl.refresh_ahead or self.ttl.stale_if_error)
        self.stats = metrics.route(self.name)
        write = cfg_route.write
        self.write = write if write is not None and write.mode != "read-only" else None
        self.read_only = write is not None and write.mode == "read-only"
        self.write_spec = write_spec(cfg_route) if self.write is not None else None

    def spec(self, params: dict) -> ReadSpec:
        read = self.read
        return ReadSpec(
            as_=read.as_, query=read.query, params=read.params, many=read.many, column=read.column,
            table=read.table,
            key={attr: fill(t, params) for attr, t in read.key.items()} if read.key else None,
            key_condition=read.key_condition,
            values={name: fill(t, params) for name, t in read.values.items()} if read.values else None,
            index=read.index, consistent_read=read.consistent_read)

    def value_fields(self, value: bytes) -> dict:
        """The fields a string value of this route writes; ValueError names what is wrong with it."""
        if self.encoding == "json":
            fields = from_json(value)
            missing = [f for f in (self.write.fields if self.write is not None else None) or () if f not in fields]
            if missing:
                raise ValueError(f"the value lacks field(s) {', '.join(missing)} that write.upsert binds")
            return fields
        return {self.string_field: value.decode(errors="replace")}

    @property
    def string_field(self) -> str:
        """Where a string route's value goes: its one write field (config checks allow only one),
        else the column it is read from."""
        if self.write is not None and self.write.fields:
            return self.write.fields[0]
        return self.read.column or "value"

    def upsert_op(self, key: bytes, params: dict, value: bytes, version: int) -> WriteOp:
        """The database write for a string value of this route; ValueError names what is wrong with it."""
        return self.write_op("upsert", key, params, fields=self.value_fields(value),
                             whole=value.decode(errors="replace"), version=version)

    def write_op(self, op: str, key: bytes, params: dict, **fields) -> WriteOp:
        """A database write for the cache key `key` with these parameters (the backend gets the item
        key filled in; the cache key is what its version is kept under)."""
        templates = self.write_spec.key if self.write_spec is not None else None
        item_key = {attr: fill(template, params) for attr, template in templates.items()} if templates else None
        return WriteOp(op, params, item_key=item_key, key=key, **fields)

    async def fetch(self, params: dict) -> list[dict]:
        values = [params[name] for name in (self.read.params or [])]
        return await self.backend.fetch(self.spec(params), values)

    def encode(self, rows: list[dict]) -> Found:
        if self.read.many:             # a list query: no rows is an answer ([]), not a missing key
            return Found(value=to_json(rows))
        if not rows:
            return Found()
        if len(rows) > 1:
            raise BackendPermanentError(
                self.backend_name, f"the read query returned {len(rows)} rows for one key; "
                f"set `many: true` on route {self.name!r} to cache them as a JSON array")
        row = rows[0]
        if self.encoding == "json":
            return Found(value=to_json(row))
        if self.encoding == "string":
            try:
                return Found(value=to_string(row, self.read.column))
            except ValueError as exc:
                raise BackendPermanentError(self.backend_name, f"route {self.name!r}: {exc}") from None
        return Found(pairs=to_hash(row))


def write_spec(cfg_route) -> WriteSpec:
    """What the backend needs to write a route's keys; table mode generates the SQL."""
    write, read = cfg_route.write, cfg_route.read
    key_params = list(compile_template(cfg_route.key).params)
    spec = WriteSpec(route=cfg_route.key, key_params=key_params, upsert=write.upsert,
                     delete=write.delete, fields=write.fields, version_attribute=write.version_attribute)
    if write.table is not None:
        keys, fields = write.key_columns, write.fields
        columns = ", ".join(keys + fields)
        values = ", ".join(f"${n}" for n in range(1, len(keys) + len(fields) + 1))
        updates = ", ".join(f"{f} = EXCLUDED.{f}" for f in fields)
        spec.upsert = (f"INSERT INTO {write.table} ({columns}) VALUES ({values}) "
                       f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {updates}")
        spec.delete = f"DELETE FROM {write.table} WHERE " + " AND ".join(
            f"{k} = ${n}" for n, k in enumerate(keys, 1))
    if read is not None and read.table is not None:       # dynamodb: the item the read names
        spec.table, spec.key = read.table, read.key
    return spec


async def start_backends(cfg) -> dict:
    """Create and start every configured backend. An unreachable backend does not stop the proxy:
    its routes answer with `backend unavailable` errors until it comes back."""
    from ..backends import create_backend
    backends = {}
    for name, bcfg in cfg.backends.items():
        backend = create_backend(name, bcfg)
        try:
            await backend.start()
        except BackendError as exc:
            log.warning("backend %s is not reachable yet: %s", name, exc)
        backends[name] = backend
    return backends


async def build_router(cfg, backends: dict, metrics) -> Router:
    """Runtime routes for every route that reads; each read spec is checked against its backend
    (Postgres PREPAREs the query, DynamoDB describes the table) and a wrong one stops startup."""
    routes = []
    for index, cfg_route in enumerate(cfg.routes):
        if cfg_route.read is None:
            continue
        route = RuntimeRoute(index, cfg_route, backends[cfg_route.backend], metrics)
        try:
            placeholders = {name: "0" for name in compile_template(cfg_route.key).params}
            await route.backend.check_read(route.spec(placeholders))
        except BackendPermanentError as exc:
            raise StartupError(f"routes[{index}] ({cfg_route.key}): {exc}") from None
        except BackendError as exc:
            log.warning("routes[%d] (%s): cannot check the read spec now: %s", index, cfg_route.key, exc)
        if route.write_spec is not None:
            try:
                await route.backend.check_write(route.write_spec)
            except BackendPermanentError as exc:
                raise StartupError(f"routes[{index}] ({cfg_route.key}) write: {exc}") from None
            except BackendError as exc:
                log.warning("routes[%d] (%s): cannot check the write spec now: %s", index, cfg_route.key, exc)
        routes.append(route)
    return Router(routes)
