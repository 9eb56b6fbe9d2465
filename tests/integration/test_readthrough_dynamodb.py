"""Read-through from DynamoDB (moto's server) through the proxy: GetItem and Query routes, types."""

from __future__ import annotations

import base64
import json

import pytest
import redis

from tests.fixtures.moto import ddb, ddb_calls
from tests.fixtures.ports import free_port
from tests.fixtures.proxy import ProxyProcess

pytestmark = [pytest.mark.proxy_only, pytest.mark.xdist_group("moto")]




def start(make_proxy, redis_server, moto_endpoint, routes):
    return make_proxy(redis_server, backends={"ddb": {"type": "dynamodb", "endpoint_url": moto_endpoint}},
                      routes=routes)


def test_getitem_as_hash_miss_then_hit(make_inproc_proxy, redis_server, moto_endpoint, tables):
    ddb(moto_endpoint, "put_item", TableName=tables["profiles"], Item={
        "UserId": {"S": "u1"}, "Plan": {"S": "pro"}, "Logins": {"N": "42"}, "Active": {"BOOL": True},
        "Gone": {"NULL": True}})
    p = start(make_inproc_proxy, redis_server, moto_endpoint, [
        {"key": "profile:{user_id}", "backend": "ddb",
         "read": {"table": tables["profiles"], "key": {"UserId": "{user_id}"}, "as": "hash"}}])
    c = p.client(protocol=3)
    assert c.hgetall("profile:u1") == {b"UserId": b"u1", b"Plan": b"pro", b"Logins": b"42", b"Active": b"true"}
    # The item is now in Redis: change it in DynamoDB and the cached copy still answers (a hit).
    ddb(moto_endpoint, "put_item", TableName=tables["profiles"], Item={"UserId": {"S": "u1"}, "Plan": {"S": "free"}})
    assert c.hget("profile:u1", "Plan") == b"pro"
    assert redis_server.client().hget("profile:u1", "Plan") == b"pro"
    assert c.hgetall("profile:nobody") == {}


def test_getitem_as_json_keeps_types(make_inproc_proxy, redis_server, moto_endpoint, tables):
    ddb(moto_endpoint, "put_item", TableName=tables["profiles"], Item={
        "UserId": {"S": "u2"}, "Big": {"N": "12345678901234567890.123456789"}, "Blob": {"B": b"\x00\xffbin"},
        "Tags": {"SS": ["b", "a"]}, "Scores": {"NS": ["3", "1.5"]}, "Nested": {"M": {"L": {"L": [{"N": "1"},
                                                                                           {"S": "x"}]}}},
        "Name": {"S": "Zoë ☃"}})
    p = start(make_inproc_proxy, redis_server, moto_endpoint, [
        {"key": "profile:{user_id}", "backend": "ddb",
         "read": {"table": tables["profiles"], "key": {"UserId": "{user_id}"}, "as": "json"}}])
    raw = p.client().get("profile:u2")
    assert b"12345678901234567890.123456789" in raw          # no float rounding
    item = json.loads(raw)
    assert base64.b64decode(item["Blob"]) == b"\x00\xffbin"
    assert item["Tags"] == ["a", "b"] and item["Scores"] == [1.5, 3]
    assert item["Nested"] == {"L": [1, "x"]} and item["Name"] == "Zoë ☃"


def test_query_route_returns_a_json_array_over_pages(make_inproc_proxy, redis_server, moto_endpoint, tables):
    filler = "x" * 40_000       # 40 items of 40 KB: more than DynamoDB's 1 MB page, so Query paginates
    ddb_calls(moto_endpoint, [("put_item", {"TableName": tables["events"], "Item": {
        "UserId": {"S": "u3"}, "Seq": {"N": str(seq)}, "Pad": {"S": filler}}}) for seq in range(40)])
    ddb(moto_endpoint, "put_item", TableName=tables["events"], Item={"UserId": {"S": "other"}, "Seq": {"N": "1"}})
    p = start(make_inproc_proxy, redis_server, moto_endpoint, [
        {"key": "events:{user_id}", "backend": "ddb",
         "read": {"table": tables["events"], "key_condition": "UserId = :u", "values": {":u": "{user_id}"},
                  "many": True, "as": "json"}}])
    events = json.loads(p.client().get("events:u3"))
    assert [e["Seq"] for e in events] == list(range(40))
    assert json.loads(p.client().get("events:nobody")) == []


def test_numeric_sort_key_and_string_route(make_inproc_proxy, redis_server, moto_endpoint, tables):
    ddb(moto_endpoint, "put_item", TableName=tables["events"], Item={
        "UserId": {"S": "u4"}, "Seq": {"N": "7"}, "Kind": {"S": "login"}})
    p = start(make_inproc_proxy, redis_server, moto_endpoint, [
        {"key": "event:{user_id}:{seq:int}", "backend": "ddb",
         "read": {"table": tables["events"], "key": {"UserId": "{user_id}", "Seq": "{seq}"}, "as": "string",
                  "column": "Kind"}}])
    c = p.client()
    assert c.get("event:u4:7") == b"login"
    assert c.get("event:u4:8") is None


def test_missing_table_stops_startup_with_a_clear_message(redis_server, moto_endpoint, tmp_path):
    p = ProxyProcess(redis_server, tmp_path / "bad", {
        "backends": {"ddb": {"type": "dynamodb", "endpoint_url": moto_endpoint}},
        "routes": [{"key": "profile:{user_id}", "backend": "ddb",
                    "read": {"table": "NoSuchTable", "key": {"UserId": "{user_id}"}, "as": "hash"}}]})
    with pytest.raises(Exception):   # noqa: B017 - any startup failure; the message is checked below
        p.start()
    p.stop()
    assert "NoSuchTable" in p.stderr_text() and "does not exist" in p.stderr_text()


def test_backend_down_gives_a_clear_error_and_caches_nothing(make_inproc_proxy, redis_server, tables):
    # An endpoint nobody listens on: DynamoDB is "down" from the proxy's point of view.
    p = make_inproc_proxy(redis_server, backends={"ddb": {"type": "dynamodb", "endpoint_url": f"http://127.0.0.1:{free_port()}",
                                                   "timeout": 1}},
                   routes=[{"key": "profile:{user_id}", "backend": "ddb",
                            "read": {"table": tables["profiles"], "key": {"UserId": "{user_id}"}, "as": "hash"}}])
    c = p.client()
    with pytest.raises(redis.ResponseError, match="backend ddb unavailable"):
        c.hgetall("profile:u1")
    assert redis_server.client().exists("profile:u1") == 0
    assert c.set("plain", "still-works") is True
