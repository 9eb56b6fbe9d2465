"""Config problems: one line per problem, `<file>: <field path>: <what is wrong>; fix: <what to do>`,
and the translation of pydantic's validation errors into such lines (the fix of a field-level error is
the field's `description`, written as an instruction)."""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, get_args, get_origin

from pydantic import (
    BaseModel,
)
from pydantic.fields import FieldInfo

from .schema import Config, unwrap

# ------------------------------------------------------------------------------------------- errors

@dataclass(frozen=True)
class Problem:
    path: str       # dotted field path such as routes[0].ttl.seconds, or a file position
    message: str
    fix: str

    def line(self, source: str, origin: str = "") -> str:
        where = f"{source}: {self.path}: " if self.path else f"{source}: "
        note = f" ({origin})" if origin else ""
        return f"{where}{self.message}{note}; fix: {self.fix}"


class ConfigError(Exception):
    """The configuration is unusable. str(error) is the human readable report, one problem a line."""

    def __init__(self, message: str, problems: Sequence[Problem] = (), source: str = ""):
        super().__init__(message)
        self.problems = list(problems)
        self.source = source

    @classmethod
    def from_problems(cls, source: str, problems: Sequence[Problem], origins: Mapping[str, str] | None = None):
        origins = origins or {}
        lines = [p.line(source, _origin_of(p.path, origins)) for p in problems]
        return cls("\n".join(lines), problems, source)


def _origin_of(path: str, origins: Mapping[str, str]) -> str:
    """Where a value came from, if not from the file itself (an env override or a ${VAR}).

    Matches in both directions: a bad value inside an overridden one, and an unknown section that
    only exists because an override created it (CACHEPROXY_UPSTREM__URL -> `upstrem`)."""
    for origin, note in origins.items():
        if _within(path, origin) or _within(origin, path):
            return note
    return ""


def _within(path: str, parent: str) -> bool:
    return bool(path) and (path == parent or path.startswith((parent + ".", parent + "[")))


def join(path: str, name: str | int) -> str:
    return dotted([name]) if not path else path + (dotted([name]) if not isinstance(name, str) or not
                                                     re.fullmatch(r"[A-Za-z0-9_\-]+", name) else "." + name)


def dotted(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z0-9_\-]+", part):
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"
    return out



class StartupError(Exception):
    """The proxy cannot start as configured (e.g. a route its backend rejects); the text says why."""


# ------------------------------------------------------------------------------- pydantic -> Problem

@dataclass
class _Where:
    path: list[str | int]
    field: FieldInfo | None = None
    type: Any = None
    model: type[BaseModel] | None = None   # the model the last path element was looked up in


def _model_field(model: type[BaseModel], name: str) -> tuple[str, FieldInfo] | None:
    for key, info in model.model_fields.items():
        if name in (key, info.alias):
            return info.alias or key, info
    return None


def resolve(loc: Sequence[str | int]) -> _Where:
    """Follow a pydantic error location (or a data path) through the schema."""
    where = _Where(path=[], type=Config)
    for part in loc:
        tp = where.type
        if isinstance(tp, tuple):   # a tagged union: the location names the tag, which is not a field
            tagged = [m for m in tp if part in get_args(m.model_fields["type"].annotation)]
            if tagged:
                where.type = tagged[0]
                continue
            tp = next((m for m in tp if _model_field(m, str(part))), tp[0])
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            where.model = tp
            found = _model_field(tp, str(part))
            if found is None:                # unknown field: keep the rest of the path as written
                where.path.append(part)
                where.type = None
                continue
            name, where.field = found
            where.path.append(name)
            where.type = unwrap(where.field.annotation)
        elif get_origin(tp) in (dict, list):
            where.path.append(part)
            where.type = unwrap(get_args(tp)[-1])
        else:
            where.path.append(part)
            where.type = None
    return where


_SECRET = re.compile(r"password|dsn|url|users", re.I)


def _show(value: Any, path: str) -> str:
    if _SECRET.search(path):                 # say what kind of value, never the value itself
        kind = type(value).__name__
        return {"str": "a string", "dict": "a mapping", "int": "an int"}.get(kind, f"a {kind}")
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_MESSAGES = {
    "missing": "required field is missing",
    "int_parsing": "must be an integer",
    "int_type": "must be an integer",
    "int_from_float": "must be a whole number",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "dict_type": "must be a mapping (key: value)",
    "model_type": "must be a mapping (key: value)",
    "model_attributes_type": "must be a mapping (key: value)",
    "list_type": "must be a list",
}


def problem_from_pydantic(err: Mapping[str, Any]) -> Problem:
    kind = err["type"]
    where = resolve(err["loc"])
    path = dotted(where.path)
    fix = where.field.description if where.field is not None and where.field.description else "see config/example.yaml"
    if kind == "extra_forbidden":
        return _unknown_field(path, where)
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        tag = err.get("ctx", {}).get("tag")
        what = f"unknown backend type {tag!r}" if tag else "backend type is missing"
        return Problem(f"{path}.type", what, "set type to one of: postgres, dynamodb")
    if kind == "value_error":
        return Problem(path, str(err.get("ctx", {}).get("error", err["msg"])), fix)
    message = _MESSAGES.get(kind) or _bound_message(kind, err.get("ctx", {})) or _pydantic_message(err["msg"])
    if kind != "missing":
        message += f" (got {_show(err['input'], path)})"
    return Problem(path, message, fix)


_BOUNDS = {"greater_than_equal": (">=", "ge"), "less_than_equal": ("<=", "le"),
           "greater_than": (">", "gt"), "less_than": ("<", "lt")}


def _bound_message(kind: str, ctx: Mapping[str, Any]) -> str | None:
    if kind not in _BOUNDS:
        return None
    op, name = _BOUNDS[kind]
    return f"must be {op} {ctx.get(name)}"


def _pydantic_message(msg: str) -> str:
    msg = msg.replace("Input should be", "must be").replace("Input should have", "must have")
    return msg[:1].lower() + msg[1:]


def _unknown_field(path: str, where: _Where) -> Problem:
    name = str(where.path[-1])
    choices = []
    if where.model is not None:
        choices = [info.alias or key for key, info in where.model.model_fields.items()]
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    if close:
        return Problem(path, f"unknown field; did you mean {close[0]}?", f"rename it to {close[0]}")
    valid = ", ".join(choices) if choices else "none"
    return Problem(path, "unknown field", f"remove it (fields allowed here: {valid})")


