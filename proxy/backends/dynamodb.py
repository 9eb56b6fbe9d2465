"""DynamoDB through aiobotocore: GetItem by key, Query by key condition (all pages).

Credentials come from the standard AWS chain (environment, shared files, instance/task role).
Key and expression values arrive as text from the cache key; their DynamoDB types (S, N, B) come
from the table's attribute definitions, read once per table. A key value that its type cannot hold
(N that is not a DynamoDB number, B that is not base64, an empty or oversized key) is
BackendKeyRejected before any call: no item can have that key.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import random
import re
from decimal import Decimal, InvalidOperation
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from .base import (
    SUPERSEDED,
    BackendKeyRejected,
    BackendPermanentError,
    BackendUnavailable,
    ReadSpec,
    WriteOp,
    WriteResult,
    WriteSpec,
    required,
)

_TRANSIENT_CODES = {"ProvisionedThroughputExceededException", "ThrottlingException", "RequestLimitExceeded",
                    "InternalServerError", "ServiceUnavailable", "LimitExceededException"}
# DynamoDB's limits on a key attribute's value, in bytes (partition key, sort key) and on numbers.
_KEY_BYTES = {"HASH": 2048, "RANGE": 1024}
_NUMBER_DIGITS = 38
_NUMBER_EXPONENTS = (-130, 125)


class DynamoBackend:
    def __init__(self, name: str, cfg):
        self.name = name
        self.cfg = cfg
        self.client = None
        self._context: Any = None      # the aiobotocore client context (entered in start())
        self._types: dict[str, dict[str, str]] = {}   # table -> attribute -> S|N|B
        self._roles: dict[str, dict[str, str]] = {}   # table -> key attribute -> HASH|RANGE

    async def start(self) -> None:
        if self.client is not None:
            return
        cfg = self.cfg
        config = AioConfig(connect_timeout=cfg.timeout, read_timeout=cfg.timeout,
                           max_pool_connections=cfg.max_pool, retries={"max_attempts": 2, "mode": "standard"})
        self._context = get_session().create_client(
            "dynamodb", region_name=cfg.region, endpoint_url=cfg.endpoint_url or None, config=config)
        self.client = await self._context.__aenter__()

    async def close(self) -> None:
        if self._context is not None:
            context, self._context, self.client = self._context, None, None
            await context.__aexit__(None, None, None)

    async def _call(self, method: str, **kwargs):
        if self.client is None:
            await self.start()
        try:
            return await getattr(self.client, method)(**kwargs)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = error.get("Code", "")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            message = f"{code}: {error.get('Message', '')}"
            if code in _TRANSIENT_CODES or status >= 500:
                raise BackendUnavailable(self.name, message) from None
            raise BackendPermanentError(self.name, message) from None
        except (BotoCoreError, OSError, TimeoutError) as exc:
            raise BackendUnavailable(self.name, str(exc) or type(exc).__name__) from None
        except Exception as exc:   # aiohttp client errors and the like: the endpoint is unreachable
            raise BackendUnavailable(self.name, str(exc) or type(exc).__name__) from None

    async def _attribute_types(self, table: str) -> dict[str, str]:
        types = self._types.get(table)
        if types is None:
            described = await self._call("describe_table", TableName=table)
            types = {d["AttributeName"]: d["AttributeType"]
                     for d in described["Table"].get("AttributeDefinitions", [])}
            self._roles[table] = {k["AttributeName"]: k["KeyType"] for k in described["Table"].get("KeySchema", [])}
            self._types[table] = types
        return types

    def _key_value(self, table: str | None, attribute: str, value, types: dict) -> dict:
        """A key's value as the typed attribute value a request carries; BackendKeyRejected when the
        attribute's type (or, for the table's own key (`table` given), DynamoDB's size limit) cannot
        hold it."""
        kind = types.get(attribute, "S")
        try:
            typed = _typed(value, kind)
        except (ValueError, binascii.Error) as exc:
            raise BackendKeyRejected(self.name, f"key attribute {attribute} ({kind}): {exc}") from None
        limit = _KEY_BYTES.get(self._roles.get(table, {}).get(attribute, "")) if table else None
        size = len(typed["B"]) if kind == "B" else len(str(value).encode())
        if size == 0 and kind != "N":
            raise BackendKeyRejected(self.name, f"key attribute {attribute} is empty, which DynamoDB keys cannot be")
        if limit is not None and size > limit:
            raise BackendKeyRejected(self.name, f"key attribute {attribute} is {size} bytes, over DynamoDB's "
                                                f"{limit}-byte limit")
        return typed

    async def check_read(self, spec: ReadSpec) -> None:
        try:
            types = await self._attribute_types(required(spec.table, self.name, "read.table"))
        except BackendPermanentError as exc:
            if "ResourceNotFound" in str(exc):
                raise BackendPermanentError(
                    self.name, f"DynamoDB table {spec.table!r} does not exist; fix: create it or correct "
                    f"read.table") from None
            raise
        for attribute in spec.key or {}:
            if attribute not in types:
                raise BackendPermanentError(
                    self.name, f"read.key names {attribute!r}, which is not a key attribute of table "
                    f"{spec.table!r} (its key attributes: {', '.join(types)})")

    async def fetch(self, spec: ReadSpec, params: list) -> list[dict]:
        table = required(spec.table, self.name, "read.table")
        types = await self._attribute_types(table)
        if spec.key:
            key = {attr: self._key_value(spec.table, attr, value, types) for attr, value in spec.key.items()}
            reply = await self._call("get_item", TableName=spec.table, Key=key, ConsistentRead=spec.consistent_read)
            return [from_dynamo(reply["Item"])] if "Item" in reply else []
        placeholders = _placeholder_attributes(spec.key_condition or "")
        # Query: an index's key may have other limits than the table's, so only the types are checked.
        values = {name: self._key_value(None, placeholders.get(name, name), value, types)
                  for name, value in (spec.values or {}).items()}
        request: dict[str, Any] = {"TableName": table, "KeyConditionExpression": spec.key_condition,
                   "ExpressionAttributeValues": values}
        if spec.index:
            request["IndexName"] = spec.index
        elif spec.consistent_read:
            request["ConsistentRead"] = True
        items = []
        while True:
            reply = await self._call("query", **request)
            items += [from_dynamo(item) for item in reply.get("Items", [])]
            if "LastEvaluatedKey" not in reply:
                return items
            request["ExclusiveStartKey"] = reply["LastEvaluatedKey"]

    async def ping(self) -> None:
        await self._call("list_tables", Limit=1)

    # -- writes ------------------------------------------------------------------------------------
    async def check_write(self, spec: WriteSpec) -> None:
        await self.check_read(ReadSpec(table=spec.table, key=spec.key))

    def _item_key(self, spec: WriteSpec, op: WriteOp, types: dict) -> dict:
        return {attr: _typed(value, types.get(attr, "S")) for attr, value in (op.item_key or {}).items()}

    def _item(self, spec: WriteSpec, op: WriteOp, types: dict) -> dict:
        item = {name: to_dynamo(value) for name, value in (op.fields or {}).items()}
        item.update(self._item_key(spec, op, types))    # the key attributes always come from the key
        if spec.version_attribute:
            item[spec.version_attribute] = {"N": str(op.version)}
        return item

    async def write_batch(self, spec: WriteSpec, ops: list[WriteOp]) -> list[WriteResult]:
        """BatchWriteItem in chunks of 25 (UnprocessedItems retried), or, with a version attribute,
        conditional PutItem/DeleteItem per key (fencing): a write older than the stored version is
        skipped (SUPERSEDED), so a replayed queue entry or a paused owner can never roll a newer item
        back. A delete removes the item and its version with it: an older put arriving after it
        (only a sidecar paused past its lease between its lease check and its call) can bring the
        item back; DynamoDB has no row left to keep the version on."""
        if not ops:
            return []
        table = required(spec.table, self.name, "read.table")
        types = await self._attribute_types(table)
        results: list[WriteResult] = [None] * len(ops)
        requests: dict[int, dict] = {}
        for index, op in enumerate(ops):
            try:
                if op.op == "upsert":
                    requests[index] = {"PutRequest": {"Item": self._item(spec, op, types)}}
                else:
                    requests[index] = {"DeleteRequest": {"Key": self._item_key(spec, op, types)}}
            except (ValueError, TypeError) as exc:     # only this row can never be written
                results[index] = BackendPermanentError(self.name, f"cannot build the item: {exc}")
        order = list(requests)
        if spec.version_attribute:
            done = await asyncio.gather(*(self._conditional(spec, ops[i], requests[i]) for i in order))
        else:
            done = []
            for start in range(0, len(order), 25):
                done += await self._batch(table, [requests[i] for i in order[start:start + 25]])
        for index, result in zip(order, done, strict=True):
            results[index] = result
        return results

    async def _batch(self, table: str, chunk: list) -> list[WriteResult]:
        pending = chunk
        for attempt in range(8):
            try:
                reply = await self._call("batch_write_item", RequestItems={table: pending})
            except BackendPermanentError as exc:
                if len(chunk) == 1:
                    return [exc]
                # One bad item fails the whole call: write them one by one to find it.
                return [await self._single(table, request) for request in chunk]
            pending = reply.get("UnprocessedItems", {}).get(table, [])
            if not pending:
                return [None] * len(chunk)
            await asyncio.sleep(min(2.0, 0.05 * 2 ** attempt) * (0.5 + random.random()))
        raise BackendUnavailable(self.name, f"{len(pending)} items stayed unprocessed (throttled)")

    async def _single(self, table: str, request: dict) -> WriteResult:
        try:
            if "PutRequest" in request:
                await self._call("put_item", TableName=table, Item=request["PutRequest"]["Item"])
            else:
                await self._call("delete_item", TableName=table, Key=request["DeleteRequest"]["Key"])
        except BackendPermanentError as exc:
            return exc
        return None

    async def _conditional(self, spec: WriteSpec, op: WriteOp, request: dict) -> WriteResult:
        # An equal version is the same queue entry replayed: applied again (idempotent). A
        # write-through (supersede) always applies, with its clock version.
        condition = {} if op.supersede else {
            "ConditionExpression": "attribute_not_exists(#v) OR #v <= :v",
            "ExpressionAttributeNames": {"#v": spec.version_attribute},
            "ExpressionAttributeValues": {":v": {"N": str(op.version)}}}
        try:
            if "PutRequest" in request:
                await self._call("put_item", TableName=spec.table, Item=request["PutRequest"]["Item"], **condition)
            else:
                await self._call("delete_item", TableName=spec.table, Key=request["DeleteRequest"]["Key"],
                                 **condition)
        except BackendPermanentError as exc:
            if "ConditionalCheckFailed" in str(exc):
                return SUPERSEDED      # the table already holds a newer version of this key
            return exc
        return None


def _placeholder_attributes(condition: str) -> dict[str, str]:
    """':pk' -> 'PK' for conditions like 'PK = :pk AND begins_with(SK, :prefix)'."""
    found = {}
    for attr, name in re.findall(r"([A-Za-z_][\w.]*)\s*(?:=|<=|>=|<|>)\s*(:\w+)", condition):
        found[name] = attr
    for attr, name in re.findall(r"begins_with\s*\(\s*([A-Za-z_][\w.]*)\s*,\s*(:\w+)", condition):
        found[name] = attr
    for attr, low, high in re.findall(r"([A-Za-z_][\w.]*)\s+BETWEEN\s+(:\w+)\s+AND\s+(:\w+)", condition, re.I):
        found[low] = found[high] = attr
    return found


def _typed(value, kind: str) -> dict:
    """ValueError (or binascii.Error) when `value` is not a valid `kind` value."""
    if kind == "N":
        return {"N": _number(str(value))}
    if kind == "B":
        return {"B": value if isinstance(value, bytes) else base64.b64decode(str(value), validate=True)}
    return {"S": str(value)}


def _number(text: str) -> str:
    """`text` if DynamoDB can store it as a number (38 significant digits, 1E-130 to 9.9..E+125)."""
    try:
        number = Decimal(text)
    except InvalidOperation:
        raise ValueError(f"{text[:40]!r} is not a number") from None
    if not number.is_finite():
        raise ValueError(f"{text[:40]!r} is not a finite number")
    if number:
        digits = len(number.normalize().as_tuple().digits)
        magnitude = number.adjusted()
        if digits > _NUMBER_DIGITS or not _NUMBER_EXPONENTS[0] <= magnitude <= _NUMBER_EXPONENTS[1]:
            raise ValueError(f"{text[:40]!r} is beyond DynamoDB's number precision or range")
    return text


def to_dynamo(value) -> dict:
    """A JSON value (or hash field text) as a DynamoDB attribute value."""
    if value is None:
        return {"NULL": True}
    if isinstance(value, bool):
        return {"BOOL": value}
    if isinstance(value, (int, float, Decimal)):
        return {"N": str(value)}
    if isinstance(value, bytes):
        return {"S": value.decode()}
    if isinstance(value, str):
        return {"S": value}
    if isinstance(value, dict):
        return {"M": {str(k): to_dynamo(v) for k, v in value.items()}}
    if isinstance(value, (list, tuple)):
        return {"L": [to_dynamo(v) for v in value]}
    raise TypeError(f"cannot store a {type(value).__name__} in DynamoDB")


def from_dynamo(item: dict) -> dict:
    return {name: _value(value) for name, value in item.items()}


def _value(typed: dict):
    (kind, value), = typed.items()
    if kind == "S":
        return value
    if kind == "N":
        return Decimal(value)
    if kind == "B":
        return bytes(value)
    if kind == "BOOL":
        return bool(value)
    if kind == "NULL":
        return None
    if kind == "M":
        return from_dynamo(value)
    if kind == "L":
        return [_value(v) for v in value]
    if kind == "SS":
        return set(value)
    if kind == "NS":
        return {Decimal(v) for v in value}
    if kind == "BS":
        return {bytes(v) for v in value}
    raise ValueError(f"unknown DynamoDB type {kind}")
