"""PostgreSQL through an asyncpg pool. Key parameters are always bind parameters ($1..$n).

Rules of this module:
- The pool is the data path's. Readiness pings run on one connection of their own (application_name
  cacheproxy-readiness), so a flood of /readyz can never take a connection a cache miss needs.
- A pool that has no free connection within connect_timeout while all max_pool are in use is
  BackendBusy ("all N connections in use"), not "unavailable: timed out".
- A read whose key parameter cannot be expressed in its $n's type (an int above int4, a NUL in text)
  is BackendKeyRejected, decided before anything is sent: no row can have that key.
Writes are fenced (see backends/base.py) through a small table of the proxy's own, `versions_table`
(key bytea primary key, version bigint), created if missing. A batch is one transaction: first one
statement claims the versions of all its keys,

    INSERT INTO versions SELECT * FROM unnest($1::bytea[], $2::int8[]) ON CONFLICT (key)
        DO UPDATE SET version = EXCLUDED.version WHERE stored.version <= EXCLUDED.version RETURNING key

then only the ops of the keys it returned run (the user's upsert/delete SQL, unchanged). The claim
locks each key's versions row until commit, so two sidecars writing one key are serialized, and the
older of them finds the newer version and skips. An equal version is the same queue entry replayed:
it is applied again (idempotent). A delete leaves its version behind, so an older upsert cannot bring
the row back. Keys are claimed in sorted order, so concurrent batches do not deadlock on them.

A session idle inside a transaction (its sidecar paused mid-batch) is ended by the server after
statement_timeout_ms (60 s without one), so it cannot hold those row locks, and so the partition,
for longer.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import uuid
from decimal import Decimal

import asyncpg

from .base import (
    SUPERSEDED,
    BackendBusy,
    BackendError,
    BackendKeyRejected,
    BackendPermanentError,
    BackendUnavailable,
    ReadSpec,
    WriteOp,
    WriteResult,
    WriteSpec,
    required,
)

# SQLSTATEs that mean "try again later": connection exceptions (08), insufficient resources (53),
# operator intervention (57: admin shutdown, cannot connect now, statement timeout), transaction
# rollback (40: deadlock, serialization failure), lock_not_available (55P03: lock_timeout), a
# read-only transaction (25006: a failover still pointing at the old primary), the session ended
# for idling in a transaction (25P03), and errors outside PostgreSQL itself (58: I/O).
_TRANSIENT = (asyncpg.exceptions.PostgresConnectionError, asyncpg.exceptions.InsufficientResourcesError,
              asyncpg.exceptions.OperatorInterventionError, asyncpg.exceptions.TransactionRollbackError,
              asyncpg.exceptions.LockNotAvailableError, asyncpg.exceptions.ReadOnlySQLTransactionError,
              asyncpg.exceptions.IdleInTransactionSessionTimeoutError, asyncpg.exceptions.PostgresSystemError)

_FENCE = """INSERT INTO {table} AS stored (key, version)
SELECT key, version FROM unnest($1::bytea[], $2::int8[]) AS batch(key, version)
ON CONFLICT (key) DO UPDATE SET version = EXCLUDED.version WHERE stored.version <= EXCLUDED.version
RETURNING key"""

# Write-through: the write always applies, and its version ends up above anything stored.
_SUPERSEDE = """INSERT INTO {table} AS stored (key, version)
SELECT key, version FROM unnest($1::bytea[], $2::int8[]) AS batch(key, version)
ON CONFLICT (key) DO UPDATE SET version = GREATEST(stored.version + 1, EXCLUDED.version)
RETURNING key"""

_CREATE_VERSIONS = """CREATE TABLE {table} (key bytea PRIMARY KEY, version bigint NOT NULL)"""
_COMMENT_VERSIONS = """COMMENT ON TABLE {table} IS
'cacheproxy: the newest version written per cache key (write fencing); rows are tiny, keep them'"""
_PRIVILEGES = """SELECT has_table_privilege($1, 'SELECT') AND has_table_privilege($1, 'INSERT')
    AND has_table_privilege($1, 'UPDATE')"""


IDLE_IN_TRANSACTION_MS = 60000     # when statement_timeout_ms is 0 (none)


class VersionsUnusable(BackendPermanentError):
    """The versions table cannot be created or written: a setup problem, not a bad row."""

# The integer range of each integer parameter type: a key's int outside it matches no row.
_INT_RANGES = {"int2": (-2**15, 2**15 - 1), "int4": (-2**31, 2**31 - 1), "int8": (-2**63, 2**63 - 1),
               "oid": (0, 2**32 - 1)}


class PostgresBackend:
    def __init__(self, name: str, cfg):
        self.name = name
        self.cfg = cfg
        self.pool: asyncpg.Pool | None = None
        self._starting: asyncio.Lock = asyncio.Lock()
        self._param_types: dict[str, list[str]] = {}   # SQL -> its parameters' type names
        self.in_use = 0                                  # pool connections held right now
        self._probe: asyncpg.Connection | None = None    # readiness pings' own connection
        self._probe_lock = asyncio.Lock()
        self.versions = cfg.versions_table             # None: writes are not fenced
        self._versions_ready = False

    async def start(self) -> None:
        async with self._starting:
            if self.pool is not None:
                return
            cfg = self.cfg
            settings = {"application_name": "cacheproxy"}
            if cfg.statement_timeout_ms:
                settings["statement_timeout"] = str(cfg.statement_timeout_ms)
            # A sidecar paused inside a batch must not keep its row locks (see the module docstring).
            settings["idle_in_transaction_session_timeout"] = str(cfg.statement_timeout_ms or IDLE_IN_TRANSACTION_MS)
            try:
                self.pool = await asyncpg.create_pool(
                    cfg.dsn, min_size=cfg.min_pool, max_size=cfg.max_pool, timeout=cfg.connect_timeout,
                    server_settings=settings)
            except Exception as exc:
                raise self._error(exc) from None

    async def close(self) -> None:
        self._drop_probe()
        if self.pool is not None:
            pool, self.pool = self.pool, None
            await pool.close()

    async def _run(self, call):
        """Run `call(connection)`; errors become BackendUnavailable / BackendBusy / BackendPermanentError."""
        if self.pool is None:
            await self.start()
        pool = self.pool
        try:
            conn = await pool.acquire(timeout=self.cfg.connect_timeout)
        except TimeoutError:
            raise self._acquire_timed_out() from None
        except Exception as exc:
            raise self._error(exc) from None
        self.in_use += 1
        try:
            return await call(conn)
        except Exception as exc:
            raise self._error(exc) from None
        finally:
            self.in_use -= 1
            await pool.release(conn)

    def _acquire_timed_out(self) -> BackendError:
        """No connection within connect_timeout: busy when every connection is taken, else unreachable."""
        if self.in_use >= self.cfg.max_pool:
            return BackendBusy(self.name, f"all {self.cfg.max_pool} connections in use; none came free "
                                          f"within {self.cfg.connect_timeout:g}s")
        return BackendUnavailable(self.name, "timed out connecting")

    def _error(self, exc: Exception):
        if isinstance(exc, BackendError):
            return exc
        if isinstance(exc, asyncpg.PostgresError) and not isinstance(exc, _TRANSIENT):
            return BackendPermanentError(self.name, f"{type(exc).__name__}: {exc}")
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, asyncio.TimeoutError | TimeoutError):
            reason = "timed out"
        return BackendUnavailable(self.name, reason)

    async def fetch(self, spec: ReadSpec, params: list) -> list[dict]:
        query = required(spec.query, self.name, "read.query")
        types = self._param_types.get(query)
        if types is not None:       # known: a key no row can have never takes a connection
            self._check_key(spec, params, types)

        async def read(conn):
            if types is None:
                self._check_key(spec, params, await self._types(conn, query))
            return await conn.fetch(query, *params)
        rows = await self._run(read)
        return [dict(row) for row in rows]

    def _check_key(self, spec: ReadSpec, params: list, types: list[str]) -> None:
        names = spec.params or []
        for index, (value, type_name) in enumerate(zip(params, types, strict=False)):
            problem = unrepresentable(value, type_name)
            if problem is not None:
                name = names[index] if index < len(names) else f"${index + 1}"
                raise BackendKeyRejected(self.name, f"key parameter {name} {problem}")

    async def check_read(self, spec: ReadSpec) -> None:
        query = required(spec.query, self.name, "read.query")
        expected = len(await self._run(lambda conn: self._types(conn, query)))
        given = spec.params or []
        if expected != len(given):
            placeholders = f"$1..${expected}" if expected else "no parameters"
            raise BackendPermanentError(
                self.name, f"read.query expects {expected} parameters ({placeholders}) but the key "
                f"provides {len(given)} ({', '.join(given) or 'none'}); fix: bind one key parameter per $n "
                f"(read.params)")

    async def ping(self) -> None:
        """SELECT 1 on the readiness connection (opened on first use, replaced after any failure)."""
        async with self._probe_lock:
            try:
                if self._probe is None or self._probe.is_closed():
                    self._probe = await asyncpg.connect(
                        self.cfg.dsn, timeout=self.cfg.connect_timeout,
                        server_settings={"application_name": "cacheproxy-readiness"})
                await self._probe.fetchval("SELECT 1")
            except BaseException as exc:     # a cancelled ping leaves the connection mid-query: drop it
                self._drop_probe()
                if isinstance(exc, Exception):
                    raise self._error(exc) from None
                raise

    def _drop_probe(self) -> None:
        probe, self._probe = self._probe, None
        if probe is not None and not probe.is_closed():
            probe.terminate()

    # -- writes ------------------------------------------------------------------------------------
    async def _types(self, conn, sql: str) -> list[str]:
        types = self._param_types.get(sql)
        if types is None:
            statement = await conn.prepare(sql)
            types = self._param_types[sql] = [t.name for t in statement.get_parameters()]
        return types

    async def check_write(self, spec: WriteSpec) -> None:
        bound = len(spec.key_params) + (len(spec.fields) if spec.fields is not None else 1)
        for label, sql, expected in (("upsert", spec.upsert, bound), ("delete", spec.delete, len(spec.key_params))):
            if sql is None:
                continue
            types = await self._run(lambda conn, sql=sql: self._types(conn, sql))
            if len(types) != expected:
                raise BackendPermanentError(
                    self.name, f"write.{label} expects {len(types)} parameters but the route binds {expected} "
                    f"(key: {', '.join(spec.key_params)}"
                    + (f"; fields: {', '.join(spec.fields)}" if label == "upsert" and spec.fields else "")
                    + "); fix: one $n per key parameter, then one per field")
        await self._run(self._ensure_versions)

    # -- the versions table ----------------------------------------------------------------------
    async def _ensure_versions(self, conn) -> None:
        """Create the versions table if it is missing, and check that this role may write it."""
        if self._versions_ready or not self.versions:
            return
        table = self.versions
        if not await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", table):
            try:
                async with conn.transaction():
                    await conn.execute(_CREATE_VERSIONS.format(table=table))
                    await conn.execute(_COMMENT_VERSIONS.format(table=table))
            except (asyncpg.exceptions.DuplicateTableError, asyncpg.exceptions.UniqueViolationError):
                pass                     # another sidecar created it at the same moment
            except asyncpg.PostgresError as exc:
                if isinstance(exc, _TRANSIENT):
                    raise
                role, schema = await conn.fetchrow("SELECT current_user, current_schema()")
                schema = table.rpartition(".")[0] or schema
                raise VersionsUnusable(
                    self.name, f"cannot create the versions table {table!r} ({type(exc).__name__}: {exc}); "
                    f"fix: let the role create it (GRANT CREATE ON SCHEMA {schema} TO {role}), or create it once: "
                    f"{_CREATE_VERSIONS.format(table=table)}; GRANT SELECT, INSERT, UPDATE ON {table} TO {role}; "
                    f"or set backends.{self.name}.versions_table: '' to write unfenced") from None
        if not await conn.fetchval(_PRIVILEGES, table):
            role = await conn.fetchval("SELECT current_user")
            raise VersionsUnusable(
                self.name, f"the role may not write the versions table {table!r}; fix: GRANT SELECT, INSERT, "
                f"UPDATE ON {table} TO {role}")
        self._versions_ready = True

    async def _fence(self, conn, ops: list[WriteOp]) -> set[bytes]:
        """Claim the versions of the batch's keys; the keys whose ops may run."""
        newest: dict[bytes, int] = {}
        supersede = False
        for op in ops:
            newest[op.key] = max(newest.get(op.key, 0), op.version)
            supersede = supersede or op.supersede
        keys = sorted(newest)
        sql = (_SUPERSEDE if supersede else _FENCE).format(table=self.versions)
        rows = await conn.fetch(sql, keys, [newest[k] for k in keys])
        return {bytes(row[0]) for row in rows}

    # -- batches ------------------------------------------------------------------------------------
    def _args(self, spec: WriteSpec, op: WriteOp, types: list[str]) -> list:
        values = [op.params[name] for name in spec.key_params]
        if op.op == "upsert":
            if spec.fields is None:
                values.append(op.whole)
            else:
                values += [(op.fields or {}).get(name) for name in spec.fields]
        try:
            return [_coerce(v, t) for v, t in zip(values, types, strict=True)]
        except (ValueError, TypeError, ArithmeticError) as exc:
            raise BackendPermanentError(self.name, f"cannot bind the value: {exc}") from None

    async def _apply(self, conn, spec: WriteSpec, ops: list[WriteOp]) -> list[WriteResult]:
        """One transaction: claim the versions, then run the ops of the keys that won (consecutive
        ops of one kind through executemany)."""
        async with conn.transaction():
            won = await self._fence(conn, ops) if self.versions else None
            runnable = [op for op in ops if won is None or op.key in won]
            run: list[WriteOp] = []
            for index, op in enumerate(runnable):
                run.append(op)
                if index + 1 == len(runnable) or runnable[index + 1].op != op.op:
                    sql = required(spec.upsert if op.op == "upsert" else spec.delete, self.name, f"write.{op.op}")
                    types = await self._types(conn, sql)
                    await conn.executemany(sql, [self._args(spec, o, types) for o in run])
                    run = []
        return [None if won is None or op.key in won else SUPERSEDED for op in ops]

    async def write_batch(self, spec: WriteSpec, ops: list[WriteOp]) -> list[WriteResult]:
        """One transaction for the batch. When a row is refused, each op is retried on its own so
        only the poison rows fail."""
        if not ops:
            return []
        try:
            if self.versions and not self._versions_ready:
                await self._run(self._ensure_versions)
        except VersionsUnusable as exc:
            # Not the rows' fault: they wait (and the retry metrics say why) until it is fixed.
            raise BackendUnavailable(self.name, str(exc)) from None
        try:
            return await self._run(lambda conn: self._apply(conn, spec, ops))
        except BackendPermanentError as exc:
            if len(ops) == 1:
                return [exc]
        results: list[WriteResult] = []
        for op in ops:
            try:
                results += await self._run(lambda conn, op=op: self._apply(conn, spec, [op]))
            except BackendPermanentError as exc:
                results.append(exc)
        return results


def unrepresentable(value, type_name: str) -> str | None:
    """Why a key's parameter cannot be a value of the Postgres type `type_name` (None: it can be)."""
    if isinstance(value, int) and not isinstance(value, bool) and type_name in _INT_RANGES:
        low, high = _INT_RANGES[type_name]
        if not low <= value <= high:
            return f"= {value} is out of range for {type_name} ({low}..{high})"
    if isinstance(value, str) and type_name != "bytea" and "\x00" in value:
        return "contains a NUL byte, which Postgres text cannot hold"
    return None


def _coerce(value, type_name: str):
    """A JSON value (or hash field text) as the Python type asyncpg expects for the parameter."""
    if value is None:
        return None
    if type_name == "bytea":
        return value if isinstance(value, bytes) else str(value).encode()
    if isinstance(value, bytes):
        value = value.decode()
    if type_name in ("int2", "int4", "int8", "oid"):
        return int(value)
    if type_name in ("float4", "float8"):
        return float(value)
    if type_name == "numeric":
        return Decimal(str(value))
    if type_name == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("t", "true", "1", "yes", "on"):
            return True
        if text in ("f", "false", "0", "no", "off"):
            return False
        raise ValueError(f"{value!r} is not a boolean")
    if type_name in ("json", "jsonb"):
        return value if isinstance(value, str) else json.dumps(value, default=str)
    if type_name == "uuid":
        return uuid.UUID(str(value))
    if type_name == "date":
        return value if isinstance(value, datetime.date) else datetime.date.fromisoformat(str(value))
    if type_name in ("timestamp", "timestamptz"):
        if isinstance(value, datetime.datetime):
            return value
        parsed = datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        if type_name == "timestamptz" and parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=datetime.UTC)
        return parsed
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=str)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
