"""Write fencing in the backends themselves (real Postgres, moto's DynamoDB): an older version never
overwrites a newer one, a delete keeps its version, a replayed entry is applied again, a
write-through supersedes; and a role that cannot create or write the versions table is told how
to fix it."""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from proxy.backends.base import SUPERSEDED, BackendPermanentError, WriteOp, WriteSpec
from proxy.backends.dynamodb import DynamoBackend
from proxy.backends.postgres import PostgresBackend
from proxy.config import DynamoBackend as DynamoConfig
from proxy.config import PostgresBackend as PostgresConfig
from tests.fixtures.postgres import DSN

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def schema():
    name = "fence_" + uuid.uuid4().hex[:10]
    conn = await asyncpg.connect(DSN)
    await conn.execute(f"CREATE SCHEMA {name}; CREATE TABLE {name}.kv (k text PRIMARY KEY, v text)")
    try:
        yield name
    finally:
        await conn.execute(f"DROP SCHEMA {name} CASCADE")
        await conn.close()


def kv_spec(s: str) -> WriteSpec:
    return WriteSpec(route="kv:{k}", key_params=["k"], fields=["v"],
                     upsert=f"INSERT INTO {s}.kv (k, v) VALUES ($1, $2) ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v",
                     delete=f"DELETE FROM {s}.kv WHERE k = $1")


def op(kind: str, version: int, value: str | None = None, k: str = "a", **extra) -> WriteOp:
    return WriteOp(kind, {"k": k}, fields={"v": value} if kind == "upsert" else None, version=version,
                   key=f"kv:{k}".encode(), **extra)


async def stored(s: str, k: str = "a"):
    conn = await asyncpg.connect(DSN)
    try:
        return await conn.fetchval(f"SELECT v FROM {s}.kv WHERE k = $1", k)
    finally:
        await conn.close()


def pg_backend(s: str, dsn: str = DSN) -> PostgresBackend:
    return PostgresBackend("main", PostgresConfig(type="postgres", dsn=dsn, versions_table=f"{s}.versions"))


async def test_postgres_applies_only_the_newest_version_of_a_key(schema):
    backend, spec = pg_backend(schema), kv_spec(schema)
    try:
        assert await backend.write_batch(spec, [op("upsert", 20, "new")]) == [None]
        assert await backend.write_batch(spec, [op("upsert", 10, "old")]) == [SUPERSEDED]
        assert await stored(schema) == "new"
        assert await backend.write_batch(spec, [op("upsert", 20, "new")]) == [None], "a replay applies again"
        # A delete keeps its version: an older upsert arriving later cannot bring the row back.
        assert await backend.write_batch(spec, [op("delete", 30)]) == [None]
        assert await backend.write_batch(spec, [op("upsert", 25, "resurrected")]) == [SUPERSEDED]
        assert await stored(schema) is None
        # One batch, several keys: each key is judged on its own.
        results = await backend.write_batch(spec, [op("upsert", 40, "b40", k="b"), op("upsert", 29, "a29"),
                                                   op("upsert", 41, "c41", k="c")])
        assert results == [None, SUPERSEDED, None]
        # A write-through supersedes whatever is stored, and what was queued before it is then older.
        assert await backend.write_batch(spec, [op("upsert", 5, "through", supersede=True)]) == [None]
        assert await stored(schema) == "through"
        assert await backend.write_batch(spec, [op("upsert", 30, "queued before")]) == [SUPERSEDED]
        assert await stored(schema) == "through"
        # coalesce: false sends several ops of one key in a batch: applied in order when the newest wins.
        assert await backend.write_batch(spec, [op("upsert", 50, "x", k="d"), op("upsert", 51, "y", k="d")]) \
            == [None, None]
        assert await stored(schema, "d") == "y"
    finally:
        await backend.close()


async def test_postgres_refused_row_rolls_back_its_version_only(schema):
    backend, spec = pg_backend(schema), kv_spec(schema)
    conn = await asyncpg.connect(DSN)
    await conn.execute(f"ALTER TABLE {schema}.kv ADD CHECK (v <> 'bad')")
    await conn.close()
    try:
        results = await backend.write_batch(spec, [op("upsert", 10, "good", k="g"), op("upsert", 10, "bad", k="b")])
        assert results[0] is None and isinstance(results[1], BackendPermanentError)
        # The refused row's version was rolled back with it: a fixed, older-than-nothing write lands.
        assert await backend.write_batch(spec, [op("upsert", 5, "fixed", k="b")]) == [None]
        assert await stored(schema, "b") == "fixed"
    finally:
        await backend.close()


@pytest.fixture
async def weak_role(schema):
    """A login role that may use the schema and write its table, but not create tables in it."""
    role = "cp_weak_" + uuid.uuid4().hex[:8]
    conn = await asyncpg.connect(DSN)
    await conn.execute(f"CREATE ROLE {role} LOGIN; GRANT USAGE ON SCHEMA {schema} TO {role}; "
                       f"GRANT SELECT, INSERT, UPDATE, DELETE ON {schema}.kv TO {role}")
    try:
        yield role, DSN.replace("postgres@", f"{role}@")
    finally:
        await conn.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")
        await conn.close()


async def test_a_role_that_cannot_create_the_versions_table_is_told_how(schema, weak_role):
    role, dsn = weak_role
    backend = pg_backend(schema, dsn)
    try:
        with pytest.raises(BackendPermanentError, match=rf"cannot create the versions table .*GRANT CREATE ON SCHEMA "
                                                        rf"{schema} TO {role}\)"):
            await backend.check_write(kv_spec(schema))
        conn = await asyncpg.connect(DSN)
        await conn.execute(f"CREATE TABLE {schema}.versions (key bytea PRIMARY KEY, version bigint NOT NULL); "
                           f"GRANT SELECT ON {schema}.versions TO {role}")
        await conn.close()
        with pytest.raises(BackendPermanentError, match=rf"may not write the versions table .*GRANT SELECT, INSERT, "
                                                        rf"UPDATE ON {schema}.versions TO {role}"):
            await backend.check_write(kv_spec(schema))
        conn = await asyncpg.connect(DSN)
        await conn.execute(f"GRANT INSERT, UPDATE ON {schema}.versions TO {role}")
        await conn.close()
        await backend.check_write(kv_spec(schema))
        assert await backend.write_batch(kv_spec(schema), [op("upsert", 1, "ok")]) == [None]
    finally:
        await backend.close()


async def test_dynamodb_version_attribute_fences_and_replays(moto_endpoint, tables):
    table = tables["profiles"]
    backend = DynamoBackend("ddb", DynamoConfig(type="dynamodb", endpoint_url=moto_endpoint))
    spec = WriteSpec(route="profile:{u}", key_params=["u"], table=table, key={"UserId": "{u}"},
                     version_attribute="Version")

    def put(version: int, plan: str, **extra) -> WriteOp:
        return WriteOp("upsert", {"u": "u1"}, fields={"Plan": plan}, version=version, item_key={"UserId": "u1"},
                       key=b"profile:u1", **extra)
    try:
        assert await backend.write_batch(spec, [put(20, "new")]) == [None]
        assert await backend.write_batch(spec, [put(10, "old")]) == [SUPERSEDED]
        assert await backend.write_batch(spec, [put(20, "new")]) == [None], "a replay applies again"
        assert await backend.write_batch(spec, [put(5, "through", supersede=True)]) == [None]
        item = await backend.client.get_item(TableName=table, Key={"UserId": {"S": "u1"}}, ConsistentRead=True)
        assert item["Item"]["Plan"] == {"S": "through"}
    finally:
        await backend.close()
