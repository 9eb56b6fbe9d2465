"""Rows to cached values: exact numbers, faithful types, clear errors."""

import datetime
import json
import uuid
from decimal import Decimal

import pytest

from proxy.backends.dynamodb import from_dynamo
from proxy.cache.encoding import from_json, to_hash, to_json, to_string


def test_decimals_keep_every_digit():
    value = Decimal("12345678901234567890.123456789012345678")
    assert to_json({"n": value}) == b'{"n":12345678901234567890.123456789012345678}'
    assert json.loads(to_json([value]), parse_float=Decimal) == [value]


def test_json_types():
    row = {"s": "Zoë \"q\" \n", "i": -7, "f": 1.5, "t": True, "no": None, "b": b"\x00\xff",
           "set": {"b", "a"}, "d": datetime.date(2024, 1, 2), "u": uuid.UUID(int=1), "nan": float("nan"),
           "nested": {"l": [1, {"x": None}]}}
    parsed = json.loads(to_json(row))
    assert parsed == {"s": "Zoë \"q\" \n", "i": -7, "f": 1.5, "t": True, "no": None, "b": "AP8=",
                      "set": ["a", "b"], "d": "2024-01-02", "u": "00000000-0000-0000-0000-000000000001",
                      "nan": None, "nested": {"l": [1, {"x": None}]}}
    assert "Zoë".encode() in to_json(row)      # UTF-8, not \u escapes


def test_hash_fields_skip_nulls_and_keep_text_exact():
    pairs = dict(to_hash({"name": "a", "n": Decimal("1.50"), "ok": False, "gone": None, "tags": ["x"]}))
    assert pairs == {b"name": b"a", b"n": b"1.50", b"ok": b"false", b"tags": b'["x"]'}


def test_string_column_choice():
    assert to_string({"v": "x"}, None) == b"x"
    assert to_string({"a": 1, "v": 2}, "v") == b"2"
    assert to_string({"v": None}, None) is None
    with pytest.raises(ValueError, match="set read.column"):
        to_string({"a": 1, "b": 2}, None)
    with pytest.raises(ValueError, match="no column 'z'"):
        to_string({"a": 1}, "z")


def test_from_json_rejects_non_objects():
    assert from_json(b'{"a": 1.10}') == {"a": Decimal("1.10")}
    with pytest.raises(ValueError, match="not valid JSON"):
        from_json(b"{oops")
    with pytest.raises(ValueError, match="JSON object"):
        from_json(b"[1]")


def test_dynamodb_types_deserialize_faithfully():
    item = from_dynamo({"S": {"S": "x"}, "N": {"N": "1e400"}, "B": {"B": b"\x01"}, "BOOL": {"BOOL": False},
                        "NULL": {"NULL": True}, "M": {"M": {"a": {"N": "2"}}}, "L": {"L": [{"S": "y"}]},
                        "SS": {"SS": ["b", "a"]}, "NS": {"NS": ["1", "2.5"]}, "BS": {"BS": [b"z"]}})
    assert item == {"S": "x", "N": Decimal("1e400"), "B": b"\x01", "BOOL": False, "NULL": None,
                    "M": {"a": Decimal(2)}, "L": ["y"], "SS": {"a", "b"}, "NS": {Decimal(1), Decimal("2.5")},
                    "BS": {b"z"}}
    assert json.loads(to_json(item))["NS"] == [1, 2.5]
