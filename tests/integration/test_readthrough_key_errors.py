"""Keys no row can have are not found, not backend failures; a read that cannot work says so.

`GET item:2147483648` on an int4 key and `GET named:a\\0b` on a text key used to answer "backend
main unavailable" and count as backend errors. Such a key cannot exist in the database: the client
gets nil (0 for EXISTS), exactly what Redis says for a key that does not exist, without a query.
The same for DynamoDB keys their attribute types cannot hold.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import asyncpg
import pytest
import redis

from tests.fixtures.helpers import metric_sum
from tests.fixtures.moto import ddb
from tests.fixtures.redis_server import free_port

DSN = "postgresql://postgres@127.0.0.1:5432/test"

SCHEMA_SQL = """
CREATE TABLE {s}.items (id int4 PRIMARY KEY, name text);
CREATE TABLE {s}.named (name text PRIMARY KEY, v int);
CREATE TABLE {s}.seen (what text);
INSERT INTO {s}.items VALUES (1, 'one'), (2147483647, 'max');
INSERT INTO {s}.named VALUES ('ab', 1);
CREATE FUNCTION {s}.get_item(uid int4) RETURNS SETOF {s}.items LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO {s}.seen VALUES (uid::text);
  RETURN QUERY SELECT * FROM {s}.items WHERE id = uid;
END $$;
"""

pytestmark = [pytest.mark.proxy_only, pytest.mark.timeout(60)]


@pytest.fixture
def schema():
    name = "ke_" + uuid.uuid4().hex[:10]

    async def run(sql: str, script: bool = False):
        conn = await asyncpg.connect(DSN)
        try:
            if script:
                return await conn.execute(sql.format(s=name))
            return await conn.fetch(sql.format(s=name))
        finally:
            await conn.close()
    asyncio.run(run("CREATE SCHEMA {s}"))
    asyncio.run(run(SCHEMA_SQL, script=True))
    yield name, lambda sql: asyncio.run(run(sql))
    asyncio.run(run("DROP SCHEMA {s} CASCADE"))


def start(make_proxy, redis_server, s: str):
    admin = free_port()
    routes = [
        {"key": "item:{id:int}", "backend": "main",
         "read": {"query": f"SELECT id, name FROM {s}.get_item($1)", "as": "json"}},
        {"key": "named:{name}", "backend": "main",
         "read": {"query": f"SELECT name, v FROM {s}.named WHERE name = $1", "as": "json"}},
        # A route mistake: a text parameter bound to an int4 column fails for every key.
        {"key": "mistyped:{id}", "backend": "main",
         "read": {"query": f"SELECT id, name FROM {s}.items WHERE id = $1", "as": "json"}},
    ]
    p = make_proxy(redis_server, backends={"main": {"type": "postgres", "dsn": DSN}}, routes=routes,
                   admin={"enabled": True, "port": admin})
    p.admin_port = admin
    return p


def test_out_of_range_and_nul_keys_are_not_found(schema, make_proxy, redis_server):
    s, sql = schema
    p = start(make_proxy, redis_server, s)
    c = p.client(protocol=2)
    assert json.loads(c.get("item:1")) == {"id": 1, "name": "one"}
    assert json.loads(c.get("item:2147483647")) == {"id": 2147483647, "name": "max"}
    assert c.get("item:2147483648") is None                    # above int4
    assert c.get("item:-2147483649") is None                   # below int4
    assert c.exists("item:9223372036854775807") == 0
    assert [json.loads(v) if v else None for v in c.mget("item:1", "item:4294967296", "named:ab")] == [
        {"id": 1, "name": "one"}, None, {"name": "ab", "v": 1}]
    assert c.get("named:a\x00b") is None                       # Postgres text cannot hold NUL
    with p.raw() as raw:                                        # the same over RESP3, byte for byte
        raw.cmd("HELLO", 3)
        assert raw.cmd("GET", "item:2147483648").kind == "_"
    assert c.get("item:2147483648") is None                    # now a negative entry answers
    assert sorted(r["what"] for r in sql("SELECT what FROM {s}.seen")) == ["1", "2147483647"], \
        "a key no row can have never reaches the database"
    route = 'route="item:{id:int}"'
    assert metric_sum(p, f"cacheproxy_route_rejected_keys_total{{{route}}}") == 4
    assert metric_sum(p, f"cacheproxy_route_load_errors_total{{{route}}}") == 0
    assert metric_sum(p, 'cacheproxy_route_rejected_keys_total{route="named:{name}"}') == 1
    assert metric_sum(p, 'cacheproxy_backend_errors_total{backend="main"}') == 0
    assert "unavailable" not in p.stderr_text()


def test_a_read_that_cannot_work_is_not_called_unavailable(schema, make_proxy, redis_server):
    s, _ = schema
    p = start(make_proxy, redis_server, s)
    with pytest.raises(redis.ResponseError) as failed:
        p.client(protocol=2).get("mistyped:1")
    message = str(failed.value)
    assert message.startswith("backend main cannot answer for this key: DataError: invalid input for query "
                              "argument $1"), message
    assert metric_sum(p, 'cacheproxy_backend_errors_total{backend="main"}') == 1
    assert "route mistyped:{id}: DataError" in p.stderr_text(), "the route's mistake is logged"


def test_dynamodb_keys_their_types_cannot_hold_are_not_found(make_proxy, redis_server, moto_endpoint, tables):
    ddb(moto_endpoint, "put_item", TableName=tables["events"], Item={
        "UserId": {"S": "u1"}, "Seq": {"N": "7"}, "Kind": {"S": "login"}})
    admin = free_port()
    p = make_proxy(redis_server, backends={"ddb": {"type": "dynamodb", "endpoint_url": moto_endpoint}},
                   admin={"enabled": True, "port": admin}, routes=[
                       {"key": "event:{user_id}:{seq}", "backend": "ddb",
                        "read": {"table": tables["events"], "key": {"UserId": "{user_id}", "Seq": "{seq}"},
                                 "as": "string", "column": "Kind"}}])
    p.admin_port = admin
    c = p.client(protocol=2)
    assert c.get("event:u1:7") == b"login"
    assert c.get("event:u1:seven") is None                   # Seq is a number attribute
    assert c.get("event:u1:1e999") is None                   # beyond DynamoDB's number range
    assert c.get("event:" + "u" * 2049 + ":7") is None       # over the 2,048-byte partition key limit
    route = 'route="event:{user_id}:{seq}"'
    assert metric_sum(p, f"cacheproxy_route_rejected_keys_total{{{route}}}") == 3
    assert metric_sum(p, f"cacheproxy_route_load_errors_total{{{route}}}") == 0
