"""DynamoDB through aiobotocore: GetItem by key, Query by key condition (all pages).

Credentials come from the standard AWS chain (environment, shared files, instance/task role).
Key and expression values arrive as text from the cache key; their DynamoDB types (S, N, B) come
from the table's attribute definitions, read once per table.
"""

from __future__ import annotations

import base64
import re
from decimal import Decimal

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from .base import BackendPermanentError, BackendUnavailable, ReadSpec

_TRANSIENT_CODES = {"ProvisionedThroughputExceededException", "ThrottlingException", "RequestLimitExceeded",
                    "InternalServerError", "ServiceUnavailable", "LimitExceededException"}


class DynamoBackend:
    def __init__(self, name: str, cfg):
        self.name = name
        self.cfg = cfg
        self.client = None
        self._context = None
        self._types: dict[str, dict[str, str]] = {}   # table -> attribute -> S|N|B

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
            self._types[table] = types
        return types

    async def check_read(self, spec: ReadSpec) -> None:
        try:
            types = await self._attribute_types(spec.table)
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
        types = await self._attribute_types(spec.table)
        if spec.key:
            key = {attr: _typed(value, types.get(attr, "S")) for attr, value in spec.key.items()}
            reply = await self._call("get_item", TableName=spec.table, Key=key, ConsistentRead=spec.consistent_read)
            return [from_dynamo(reply["Item"])] if "Item" in reply else []
        placeholders = _placeholder_attributes(spec.key_condition or "")
        values = {name: _typed(value, types.get(placeholders.get(name, ""), "S"))
                  for name, value in (spec.values or {}).items()}
        request = {"TableName": spec.table, "KeyConditionExpression": spec.key_condition,
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
    if kind == "N":
        return {"N": str(value)}
    if kind == "B":
        return {"B": value if isinstance(value, bytes) else base64.b64decode(str(value))}
    return {"S": str(value)}


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
