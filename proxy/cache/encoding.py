"""Rows and items <-> cached values (JSON string, hash fields, plain string). No RESP, no I/O.

JSON is written by a small serializer of its own because numbers must stay exact: a Postgres
numeric or DynamoDB number (Decimal) keeps every digit, which json.dumps cannot do without floats.
Other types: bytes -> base64 text, sets -> sorted arrays, date/time -> ISO 8601, UUID -> text,
NaN/Infinity -> null (JSON has no such numbers).
"""

from __future__ import annotations

import base64
import datetime
import json
import math
import uuid
from decimal import Decimal

_dumps_str = json.JSONEncoder(ensure_ascii=False).encode


def to_json(value) -> bytes:
    parts: list[str] = []
    _json(value, parts)
    return "".join(parts).encode()


def _json(value, out: list[str]) -> None:
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, str):
        out.append(_dumps_str(value))
    elif isinstance(value, int):
        out.append(str(value))
    elif isinstance(value, Decimal):
        out.append(str(value) if value.is_finite() else "null")
    elif isinstance(value, float):
        out.append(repr(value) if math.isfinite(value) else "null")
    elif isinstance(value, dict):
        out.append("{")
        for index, (key, item) in enumerate(value.items()):
            if index:
                out.append(",")
            out.append(_dumps_str(str(key)))
            out.append(":")
            _json(item, out)
        out.append("}")
    elif isinstance(value, list | tuple | set | frozenset):
        items = _sorted(value) if isinstance(value, set | frozenset) else value
        out.append("[")
        for index, item in enumerate(items):
            if index:
                out.append(",")
            _json(item, out)
        out.append("]")
    else:
        out.append(_dumps_str(_text(value)))


def _sorted(values) -> list:
    try:
        return sorted(values)
    except TypeError:
        return sorted(values, key=repr)


def _text(value) -> str:
    """Text of a scalar that JSON has no type for."""
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    return str(value)


def scalar_bytes(value) -> bytes | None:
    """A single value as cache bytes: text as UTF-8, bytes raw, numbers exact, booleans true/false,
    containers as JSON; None has no representation (the caller omits it)."""
    if value is None:
        return None
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bool):
        return b"true" if value else b"false"
    if isinstance(value, int | Decimal | float):
        return to_json(value)
    if isinstance(value, dict | list | tuple | set | frozenset):
        return to_json(value)
    return _text(value).encode()


def to_hash(row: dict) -> list[tuple[bytes, bytes]]:
    """Hash fields of a row; NULL columns are left out (a hash cannot hold a nil)."""
    pairs = []
    for name, value in row.items():
        encoded = scalar_bytes(value)
        if encoded is not None:
            pairs.append((str(name).encode(), encoded))
    return pairs


def to_string(row: dict, column: str | None) -> bytes | None:
    """The one column of a string route; None when it is NULL."""
    if column is None:
        if len(row) != 1:
            raise ValueError(f"the row has {len(row)} columns ({', '.join(map(str, row))}); "
                             f"set read.column to choose one")
        column = next(iter(row))
    if column not in row:
        raise ValueError(f"the row has no column {column!r} (it has {', '.join(map(str, row))})")
    return scalar_bytes(row[column])


def from_json(value: bytes) -> dict:
    """A JSON object written by a client (for writes); ValueError with a clear reason otherwise."""
    try:
        parsed = json.loads(value, parse_float=Decimal)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"the value is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"the value must be a JSON object, not {type(parsed).__name__}")
    return parsed


def from_hash(pairs) -> dict:
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in pairs}
