"""PostgreSQL through an asyncpg pool. Key parameters are always bind parameters ($1..$n)."""

from __future__ import annotations

import asyncio

import asyncpg

from .base import BackendPermanentError, BackendUnavailable, ReadSpec

# SQLSTATE classes that mean "try again later": connection exceptions (08), insufficient
# resources (53), operator intervention (57: admin shutdown, cannot connect now, statement timeout).
_TRANSIENT = (asyncpg.exceptions.PostgresConnectionError, asyncpg.exceptions.InsufficientResourcesError,
              asyncpg.exceptions.OperatorInterventionError)


class PostgresBackend:
    def __init__(self, name: str, cfg):
        self.name = name
        self.cfg = cfg
        self.pool: asyncpg.Pool | None = None
        self._starting: asyncio.Lock = asyncio.Lock()

    async def start(self) -> None:
        async with self._starting:
            if self.pool is not None:
                return
            cfg = self.cfg
            settings = {"application_name": "cacheproxy"}
            if cfg.statement_timeout_ms:
                settings["statement_timeout"] = str(cfg.statement_timeout_ms)
            try:
                self.pool = await asyncpg.create_pool(
                    cfg.dsn, min_size=cfg.min_pool, max_size=cfg.max_pool, timeout=cfg.connect_timeout,
                    server_settings=settings)
            except Exception as exc:
                raise self._error(exc) from None

    async def close(self) -> None:
        if self.pool is not None:
            pool, self.pool = self.pool, None
            await pool.close()

    async def _run(self, call):
        """Run `call(connection)`; errors become BackendUnavailable / BackendPermanentError."""
        if self.pool is None:
            await self.start()
        try:
            async with self.pool.acquire(timeout=self.cfg.connect_timeout) as conn:
                return await call(conn)
        except Exception as exc:
            raise self._error(exc) from None

    def _error(self, exc: Exception):
        if isinstance(exc, (BackendUnavailable, BackendPermanentError)):
            return exc
        if isinstance(exc, asyncpg.PostgresError) and not isinstance(exc, _TRANSIENT):
            return BackendPermanentError(self.name, f"{type(exc).__name__}: {exc}")
        reason = str(exc) or type(exc).__name__
        if isinstance(exc, asyncio.TimeoutError | TimeoutError):
            reason = "timed out"
        return BackendUnavailable(self.name, reason)

    async def fetch(self, spec: ReadSpec, params: list) -> list[dict]:
        rows = await self._run(lambda conn: conn.fetch(spec.query, *params))
        return [dict(row) for row in rows]

    async def check_read(self, spec: ReadSpec) -> None:
        async def prepare(conn):
            statement = await conn.prepare(spec.query)
            return len(statement.get_parameters())
        expected = await self._run(prepare)
        given = spec.params or []
        if expected != len(given):
            placeholders = f"$1..${expected}" if expected else "no parameters"
            raise BackendPermanentError(
                self.name, f"read.query expects {expected} parameters ({placeholders}) but the key "
                f"provides {len(given)} ({', '.join(given) or 'none'}); fix: bind one key parameter per $n "
                f"(read.params)")

    async def ping(self) -> None:
        await self._run(lambda conn: conn.fetchval("SELECT 1"))
