"""Key templates -> routes: which route owns a key, and the typed parameters inside it.

A template is literal text with parameters, e.g. ``user:{id:int}`` or ``org:{org}:member:{uid:uuid}``:

    {name}        str   one or more bytes other than ':'; must be valid UTF-8 (see below)
    {name:str}    same
    {name:int}    canonical integer: optional '-', no leading zeros, within signed 64 bits -> int
    {name:uuid}   8-4-4-4-12 hex digits (either case) -> uuid.UUID
    {{ and }}     a literal '{' or '}' (so Redis hash tags such as ``{{user}}:{id:int}`` can be written)

Rules of this module:
- Keys arrive as bytes and are matched as bytes; nothing is decoded until a template's regex matched.
- A key is owned by a route only if its parameters convert: ``user:abc`` for ``user:{id:int}``, a
  ``str`` parameter that is not valid UTF-8, or an int outside 64 bits -> no match (the command is
  passed through untouched). We refuse rather than decode with surrogateescape because the value
  would end up as a bind parameter that no database driver can encode.
- ``int`` is canonical (``007`` and ``-0`` do not match) so that one row has exactly one cache key:
  otherwise a write to ``user:7`` could leave a stale ``user:007`` behind.
- The router's first test is ``key.startswith(prefixes)``: a key that no route can own costs one C
  call. Only keys that pass it reach the regexes, in route order; the first match wins.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Generic, Protocol, TypeVar

__all__ = ["KeyTemplate", "Router", "TemplateError", "ambiguous", "compile_template", "fill", "template_params"]

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

# The regex of each parameter type. Every type excludes ':' so a key's colons all come from literals.
_TYPE_PATTERNS = {
    "str": rb"[^:]+",
    "int": rb"0|-?[1-9][0-9]*",
    "uuid": rb"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
}
TYPES = tuple(_TYPE_PATTERNS)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class TemplateError(ValueError):
    """A key template (or a value template filled from key parameters) is malformed."""


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    type: str


# A parsed template: literal text (str) and parameters, in order.
Part = str | Param


def _parse(template: str) -> tuple[Part, ...]:
    """Split a template into literal text and parameters (adjacent parameters are allowed here)."""
    parts: list[Part] = []
    literal: list[str] = []
    i, n = 0, len(template)
    while i < n:
        ch = template[i]
        if template.startswith(("{{", "}}"), i):
            literal.append(ch)
            i += 2
        elif ch == "{":
            end = template.find("}", i + 1)
            if end < 0:
                raise TemplateError(f"{template!r}: '{{' at position {i} is never closed (write '{{{{' for a literal brace)")
            if literal:
                parts.append("".join(literal))
                literal = []
            parts.append(_param(template, template[i + 1:end]))
            i = end + 1
        elif ch == "}":
            raise TemplateError(f"{template!r}: '}}' at position {i} has no matching '{{' (write '}}}}' for a literal brace)")
        else:
            literal.append(ch)
            i += 1
    if literal:
        parts.append("".join(literal))
    return tuple(parts)


def _param(template: str, body: str) -> Param:
    name, _, kind = body.partition(":")
    name, kind = name.strip(), (kind.strip() or "str")
    if "{" in body:
        raise TemplateError(f"{template!r}: '{{' inside a parameter")
    if not name:
        raise TemplateError(f"{template!r}: a parameter has an empty name (write {{name}} or {{name:type}})")
    if not _NAME.match(name):
        raise TemplateError(f"{template!r}: parameter name {name!r} is not an identifier (letters, digits, _)")
    if kind not in _TYPE_PATTERNS:
        raise TemplateError(f"{template!r}: parameter {name!r} has unknown type {kind!r} (use one of: {', '.join(TYPES)})")
    return Param(name, kind)


@lru_cache(maxsize=1024)
def _parse_cached(template: str) -> tuple[Part, ...]:
    return _parse(template)


def template_params(template: str) -> list[str]:
    """The parameter names of a template, in order (raises TemplateError if it does not parse)."""
    return [p.name for p in _parse_cached(template) if isinstance(p, Param)]


def _format(template: str, parts: Sequence[Part], params: Mapping[str, Any]) -> str:
    out = []
    for part in parts:
        if isinstance(part, str):
            out.append(part)
        elif part.name in params:
            out.append(str(params[part.name]))   # str(UUID) is the canonical lowercase form
        else:
            raise TemplateError(f"{template!r}: no value for parameter {part.name!r} (have: {', '.join(params) or 'none'})")
    return "".join(out)


def fill(template: str, params: Mapping[str, Any]) -> str:
    """Fill a value template such as DynamoDB's ``{user_id}`` or ``USER#{user_id}`` from key parameters."""
    return _format(template, _parse_cached(template), params)


# ------------------------------------------------------------------------------------ key templates

def _to_uuid(raw: bytes) -> uuid.UUID:
    return uuid.UUID(raw.decode("ascii"))


class KeyTemplate:
    """A compiled key template: ``match(key_bytes)`` -> typed parameters, ``format(params)`` -> key."""

    __slots__ = ("template", "parts", "params", "types", "prefix", "pattern", "_regex", "_typed")

    def __init__(self, template: str, parts: tuple[Part, ...]):
        self.template = template
        self.parts = parts
        self.params = [p.name for p in parts if isinstance(p, Param)]
        self.types = {p.name: p.type for p in parts if isinstance(p, Param)}
        first = parts[0] if parts else ""
        self.prefix = first.encode() if isinstance(first, str) else b""
        # One capturing group per parameter, in order (Router splices these patterns together).
        self.pattern = b"".join(
            re.escape(p.encode()) if isinstance(p, str) else b"(" + _TYPE_PATTERNS[p.type] + b")" for p in parts
        )
        self._regex = re.compile(self.pattern)
        self._typed = tuple((p.name, p.type) for p in parts if isinstance(p, Param))

    def match(self, key: bytes) -> dict[str, Any] | None:
        m = self._regex.fullmatch(key)
        return None if m is None else self.convert(m.groups())

    def convert(self, raw: Sequence[bytes]) -> dict[str, Any] | None:
        """The typed parameters from the regex groups, or None if one does not convert."""
        # Inline per type rather than a converter call per parameter: this runs for every routed key.
        out: dict[str, Any] = {}
        for (name, kind), text in zip(self._typed, raw, strict=True):
            value: Any
            if kind == "int":
                value = int(text)
                if not INT64_MIN <= value <= INT64_MAX:
                    return None
            elif kind == "str":
                try:
                    value = text.decode()
                except UnicodeDecodeError:
                    return None
            else:
                value = _to_uuid(text)
            out[name] = value
        return out

    def format(self, params: Mapping[str, Any]) -> str:
        return _format(self.template, self.parts, params)

    def __repr__(self) -> str:
        return f"KeyTemplate({self.template!r})"


@lru_cache(maxsize=1024)
def compile_template(template: str) -> KeyTemplate:
    """Parse and compile a key template; TemplateError says what is wrong with it."""
    if not template:
        raise TemplateError("empty key template")
    parts = _parse(template)
    names = [p.name for p in parts if isinstance(p, Param)]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise TemplateError(f"{template!r}: parameter {duplicates[0]!r} appears more than once")
    for left, right in zip(parts, parts[1:], strict=False):
        if isinstance(left, Param) and isinstance(right, Param):
            # Nothing tells where one ends and the next begins ("{a}{b}" on "xyz").
            raise TemplateError(f"{template!r}: parameters {left.name!r} and {right.name!r} are adjacent; "
                                "put literal text (such as ':') between them")
    return KeyTemplate(template, parts)


# ------------------------------------------------------------------------------------------- router

class Keyed(Protocol):
    key: str


R = TypeVar("R", bound=Keyed)

MEMO_SIZE = 65536       # keys whose route decision Router.match remembers
_UNSEEN = object()


class Router(Generic[R]):
    """First-match-wins lookup of a key among routes (anything with a ``.key`` template string)."""

    def __init__(self, routes: Iterable[R]):
        self.routes: list[R] = list(routes)
        self.templates = [compile_template(route.key) for route in self.routes]
        # The cheap first test for the hot path (bytes.startswith takes a tuple). A template with no
        # literal prefix contributes b"", which lets every key through to the regex.
        self.prefixes: tuple[bytes, ...] = tuple(dict.fromkeys(t.prefix for t in self.templates))
        # All templates as one alternation, each wrapped in an outer group: the regex engine tries
        # them in route order, and m.lastindex (the outer group closes last) names the winner.
        self._winners: dict[int, tuple[int, KeyTemplate, R, int]] = {}
        pieces, group = [], 1
        for index, (template, route) in enumerate(zip(self.templates, self.routes, strict=True)):
            self._winners[group] = (index, template, route, group)
            pieces.append(b"(" + template.pattern + b")")
            group += 1 + len(template.params)
        # With no routes, a pattern that matches nothing (an empty alternation would match b"").
        self._regex = re.compile(b"|".join(pieces) if pieces else rb"(?!)")
        self._memo: dict[bytes, Any] = {}

    def match(self, key: bytes) -> tuple[R, dict[str, Any]] | None:
        """The route that owns `key` and its typed parameters (shared: do not change them), or None."""
        if not key.startswith(self.prefixes):
            return None
        found = self._memo.get(key, _UNSEEN)
        if found is _UNSEEN:
            # Hot keys repeat: a routed GET asks up to three times per request, and its key again next
            # time. Bounded: past MEMO_SIZE keys the memo starts over (a key churner costs a clear).
            if len(self._memo) >= MEMO_SIZE:
                self._memo.clear()
            found = self._memo[key] = self._match(key)
        return found

    def _match(self, key: bytes) -> tuple[R, dict[str, Any]] | None:
        m = self._regex.fullmatch(key)
        if m is None or m.lastindex is None:
            return None
        index, template, route, group = self._winners[m.lastindex]
        params = template.convert(m.groups()[group:group + len(template.params)])
        if params is not None:
            return route, params
        return self._match_after(index, key)

    def _match_after(self, index: int, key: bytes) -> tuple[R, dict[str, Any]] | None:
        """Slow path: the regex winner's parameters did not convert (not UTF-8, int out of range)."""
        for template, route in zip(self.templates[index + 1:], self.routes[index + 1:], strict=True):
            params = template.match(key)
            if params is not None:
                return route, params
        return None

    def __len__(self) -> int:
        return len(self.routes)


# ---------------------------------------------------------------------------------------- ambiguity
#
# Two templates are compared exactly, as regular languages over bytes: each becomes a small NFA
# (one state per literal byte, a few per parameter), and a breadth-first walk over pairs of NFA
# state sets tells whether some key is accepted by both, and whether one accepts a subset of the
# other. The walk only needs one byte per class of bytes that every transition treats alike.

_ALL = frozenset(range(256))
_NOT_COLON = _ALL - {ord(":")}
_DIGITS = frozenset(b"0123456789")
_HEX = frozenset(b"0123456789abcdefABCDEF")


class _NFA:
    """NFA of a template; edges are (set of bytes | None for epsilon, target state)."""

    def __init__(self, parts: Sequence[Part]):
        self.edges: list[list[tuple[frozenset[int] | None, int]]] = [[]]
        end = 0
        for part in parts:
            if isinstance(part, str):
                for byte in part.encode():
                    end = self._edge(end, frozenset((byte,)))
            else:
                end = getattr(self, "_" + part.type)(end)
        self.accept = end
        self.start = self.closure({0})

    def _new(self) -> int:
        self.edges.append([])
        return len(self.edges) - 1

    def _edge(self, source: int, chars: frozenset[int] | None, target: int | None = None) -> int:
        target = self._new() if target is None else target
        self.edges[source].append((chars, target))
        return target

    def _str(self, s: int) -> int:
        end = self._edge(s, _NOT_COLON)
        self._edge(end, _NOT_COLON, end)
        return end

    def _int(self, s: int) -> int:   # 0|-?[1-9][0-9]*
        end = self._edge(s, frozenset(b"0"))
        sign = self._edge(s, frozenset(b"-"))
        self._edge(s, None, sign)
        digits = self._edge(sign, _DIGITS - {ord("0")})
        self._edge(digits, _DIGITS, digits)
        self._edge(digits, None, end)
        return end

    def _uuid(self, s: int) -> int:
        for group, size in enumerate((8, 4, 4, 4, 12)):
            if group:
                s = self._edge(s, frozenset(b"-"))
            for _ in range(size):
                s = self._edge(s, _HEX)
        return s

    def closure(self, states: Iterable[int]) -> frozenset[int]:
        seen, stack = set(states), list(states)
        while stack:
            for chars, target in self.edges[stack.pop()]:
                if chars is None and target not in seen:
                    seen.add(target)
                    stack.append(target)
        return frozenset(seen)

    def step(self, states: frozenset[int], byte: int) -> frozenset[int]:
        return self.closure({t for s in states for chars, t in self.edges[s] if chars is not None and byte in chars})

    def byte_sets(self) -> set[frozenset[int]]:
        return {chars for edges in self.edges for chars, _ in edges if chars is not None}


def _representatives(sets: Iterable[frozenset[int]]) -> list[int]:
    """One byte per class of bytes that belong to exactly the same transition sets."""
    sets = list(sets)
    classes: dict[tuple[bool, ...], int] = {}
    for byte in range(256):
        classes.setdefault(tuple(byte in s for s in sets), byte)
    return list(classes.values())


@dataclass(frozen=True)
class Overlap:
    both: bool           # some key matches both templates
    first_in_second: bool    # every key of the first also matches the second
    second_in_first: bool


def compare(t1: str | KeyTemplate, t2: str | KeyTemplate) -> Overlap:
    """Exact comparison of the keys two templates accept (ignoring the UTF-8 and 64-bit checks)."""
    a, b = (_NFA((t if isinstance(t, KeyTemplate) else compile_template(t)).parts) for t in (t1, t2))
    alphabet = _representatives(a.byte_sets() | b.byte_sets())
    both, a_in_b, b_in_a = False, True, True
    start = (a.start, b.start)
    seen, queue = {start}, [start]
    while queue:
        sa, sb = queue.pop()
        in_a, in_b = a.accept in sa, b.accept in sb
        both |= in_a and in_b
        a_in_b &= in_b or not in_a
        b_in_a &= in_a or not in_b
        for byte in alphabet:
            pair = (a.step(sa, byte), b.step(sb, byte))
            if (pair[0] or pair[1]) and pair not in seen:
                seen.add(pair)
                queue.append(pair)
    return Overlap(both, a_in_b, b_in_a)


def _cannot_overlap(a: KeyTemplate, b: KeyTemplate) -> bool:
    """Quick exit: keys of both must start with both literal prefixes, and end with both suffixes."""
    if not (a.prefix.startswith(b.prefix) or b.prefix.startswith(a.prefix)):
        return True
    sa, sb = (t.parts[-1].encode() if isinstance(t.parts[-1], str) else b"" for t in (a, b))
    return not (sa.endswith(sb) or sb.endswith(sa))


def ambiguous(t1: str | KeyTemplate, t2: str | KeyTemplate) -> bool:
    """True when route order would silently decide between two templates, t1 being the earlier route.

    The rule: some key matches both templates, and t1 is not strictly more specific than t2 (every
    key of t1 also matching t2, but not the other way round). So ``user:admin`` before
    ``user:{name}`` and ``user:{id:int}`` before ``user:{name}`` are fine (the special case comes
    first); the reverse order, two equivalent templates (``user:{id}`` / ``user:{uid}``), or partial
    overlaps (``{a}:x`` / ``y:{b}`` both take ``y:x``) are ambiguous. The languages are compared
    exactly (see compare()); the UTF-8 and 64-bit range checks done after a regex match are ignored.
    """
    a = t1 if isinstance(t1, KeyTemplate) else compile_template(t1)
    b = t2 if isinstance(t2, KeyTemplate) else compile_template(t2)
    if _cannot_overlap(a, b):
        return False
    result = compare(a, b)
    strictly_narrower = result.first_in_second and not result.second_in_first
    return result.both and not strictly_narrower
