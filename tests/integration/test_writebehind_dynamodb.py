"""Write-behind and write-through to DynamoDB (moto's server): items put, updated and deleted."""

from __future__ import annotations

import json
import threading

import pytest
import redis

from tests.fixtures.helpers import wait_for
from tests.fixtures.moto import ddb, ddb_calls
from tests.fixtures.writebehind import queued

pytestmark = [pytest.mark.proxy_only, pytest.mark.timeout(120), pytest.mark.xdist_group("moto")]


def start(make_proxy, redis_server, moto_endpoint, table, mode="write-behind", as_="json", **write):
    route = {"key": "profile:{user_id}", "backend": "ddb",
             "read": {"table": table, "key": {"UserId": "{user_id}"}, "as": as_},
             "write": {"mode": mode, **write}}
    return make_proxy(redis_server, backends={"ddb": {"type": "dynamodb", "endpoint_url": moto_endpoint}},
                      routes=[route], write_behind={"max_delay_ms": 50, "batch_size": 100})


def item(endpoint: str, table: str, user: str) -> dict | None:
    return items(endpoint, table, [user])[0]


def items(endpoint: str, table: str, users: list[str]) -> list[dict | None]:
    """Consistent reads of several items on one client."""
    answers = ddb_calls(endpoint, [("get_item", {"TableName": table, "Key": {"UserId": {"S": user}},
                                                 "ConsistentRead": True}) for user in users])
    return [answer.get("Item") for answer in answers]


def test_json_set_puts_a_typed_item_and_del_deletes_it(make_inproc_proxy, redis_server, moto_endpoint, tables):
    table = tables["profiles"]
    p = start(make_inproc_proxy, redis_server, moto_endpoint, table)
    c = p.client(protocol=2)
    doc = {"Plan": "pro", "Logins": 42, "Ratio": 0.25, "Active": True, "Tags": ["a", "b"], "Meta": {"x": None}}
    assert c.set("profile:u1", json.dumps(doc)) is True
    assert json.loads(c.get("profile:u1")) == doc
    wait_for(lambda: item(moto_endpoint, table, "u1"), what="the item")
    assert item(moto_endpoint, table, "u1") == {
        "UserId": {"S": "u1"}, "Plan": {"S": "pro"}, "Logins": {"N": "42"}, "Ratio": {"N": "0.25"},
        "Active": {"BOOL": True}, "Tags": {"L": [{"S": "a"}, {"S": "b"}]}, "Meta": {"M": {"x": {"NULL": True}}}}
    assert c.delete("profile:u1") == 1
    wait_for(lambda: item(moto_endpoint, table, "u1") is None, what="the delete")
    assert c.get("profile:u1") is None


def test_hash_route_writes_the_whole_item(make_inproc_proxy, redis_server, moto_endpoint, tables):
    table = tables["profiles"]
    ddb(moto_endpoint, "put_item", TableName=table, Item={"UserId": {"S": "u2"}, "Plan": {"S": "free"},
                                                          "Theme": {"S": "dark"}})
    p = start(make_inproc_proxy, redis_server, moto_endpoint, table, as_="hash")
    c = p.client(protocol=3)
    assert c.hset("profile:u2", "Plan", "pro") == 0
    wait_for(lambda: item(moto_endpoint, table, "u2")["Plan"] == {"S": "pro"}, what="the update")
    assert item(moto_endpoint, table, "u2")["Theme"] == {"S": "dark"}, "the rest of the item is kept"


def test_many_keys_go_through_batch_write(make_inproc_proxy, redis_server, moto_endpoint, tables):
    table = tables["profiles"]
    p = start(make_inproc_proxy, redis_server, moto_endpoint, table)

    def writer(n: int):
        c = p.client(protocol=2)
        for i in range(100):
            c.set(f"profile:k{(n * 100 + i) % 300}", json.dumps({"By": n, "Seq": i}))
    threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    direct = redis_server.client()
    wait_for(lambda: queued(direct) == 0, timeout=60, what="the queue to drain")
    stored_items = items(moto_endpoint, table, [f"k{k}" for k in range(300)])
    for k, stored in enumerate(stored_items):
        cached = json.loads(direct.get(f"profile:k{k}"))
        assert {"By": int(stored["By"]["N"]), "Seq": int(stored["Seq"]["N"])} == cached


def test_version_attribute_makes_puts_conditional(make_inproc_proxy, redis_server, moto_endpoint, tables):
    table = tables["profiles"]
    p = start(make_inproc_proxy, redis_server, moto_endpoint, table, version_attribute="Version")
    c = p.client(protocol=2)
    c.set("profile:u3", json.dumps({"Plan": "a"}))
    wait_for(lambda: item(moto_endpoint, table, "u3"), what="the item")
    first = int(item(moto_endpoint, table, "u3")["Version"]["N"])
    c.set("profile:u3", json.dumps({"Plan": "b"}))
    wait_for(lambda: item(moto_endpoint, table, "u3")["Plan"] == {"S": "b"}, what="the newer put")
    assert int(item(moto_endpoint, table, "u3")["Version"]["N"]) > first
    # A put carrying an older version (a replayed entry) is skipped, not an error.
    ddb(moto_endpoint, "put_item", TableName=table, Item={"UserId": {"S": "u3"}, "Plan": {"S": "newest"},
                                                         "Version": {"N": str(2 ** 62)}})
    c.set("profile:u3", json.dumps({"Plan": "stale"}))
    wait_for(lambda: queued(redis_server.client()) == 0, what="the queue to drain")
    assert item(moto_endpoint, table, "u3")["Plan"] == {"S": "newest"}
    # The skipped write was the key's newest: its cached value is dropped, so readers see the table's.
    assert json.loads(c.get("profile:u3"))["Plan"] == "newest"


def test_write_through_puts_before_the_reply(make_inproc_proxy, redis_server, moto_endpoint, tables):
    table = tables["profiles"]
    p = start(make_inproc_proxy, redis_server, moto_endpoint, table, mode="write-through")
    c = p.client(protocol=2)
    c.set("profile:u4", json.dumps({"Plan": "through"}))
    assert item(moto_endpoint, table, "u4")["Plan"] == {"S": "through"}
    c.delete("profile:u4")
    assert item(moto_endpoint, table, "u4") is None
    with pytest.raises(redis.ResponseError, match="not valid JSON"):
        c.set("profile:u4", "{broken")
