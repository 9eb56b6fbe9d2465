"""Redis's own checks of a routed write's arguments, in Redis's order, before the proxy looks at the value.

A routed write is checked in the order Redis itself would answer it: the number of arguments, then
the options and the numeric arguments (TTLs, increments, offsets) with Redis's exact rules and
words, and only then the proxy's own rules (the route's kind, the value's JSON). So `SETEX user:1 abc
{}` is told its TTL is not an integer, as Redis would tell it, not that its JSON lacks a field; and a
write-through route never writes the database for a command Redis would then refuse.

Everything here is pure: no I/O, no routes. Checked against a real redis-server 7 in
tests/integration/test_writebehind_errors.py.
"""

from __future__ import annotations

import math
import re
import time

from ..protocol import errors

# (fewest, most) arguments including the command name (None: no most); Redis's own arity.
ARITY = {b"SET": (3, None), b"SETEX": (4, 4), b"PSETEX": (4, 4), b"SETNX": (3, 3), b"GETSET": (3, 3),
         b"GETDEL": (2, 2), b"INCR": (2, 2), b"DECR": (2, 2), b"INCRBY": (3, 3), b"DECRBY": (3, 3),
         b"INCRBYFLOAT": (3, 3), b"APPEND": (3, 3), b"SETRANGE": (4, 4), b"HSET": (4, None),
         b"HMSET": (4, None), b"HSETNX": (4, 4), b"HDEL": (3, None), b"HINCRBY": (4, 4), b"HINCRBYFLOAT": (4, 4)}

LLONG_MAX = 2 ** 63 - 1
LLONG_MIN = -2 ** 63
_INTEGER = re.compile(rb"(?:0|-?[1-9][0-9]{0,19})\Z")
_EXPIRY_FLAGS = {b"EX": "s", b"PX": "ms", b"EXAT": "s", b"PXAT": "ms"}


def redis_integer(text: bytes) -> int | None:
    """Redis's string2ll: optional '-', no '+', no spaces, no leading zeros, 64-bit; else None."""
    if not _INTEGER.match(text):
        return None
    value = int(text)
    return value if LLONG_MIN <= value <= LLONG_MAX else None


def redis_float(text: bytes) -> float | None:
    """Close to Redis's strtold check: no leading space, not NaN, the whole string a number."""
    if not text or text[:1].isspace() or b"_" in text:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return None if math.isnan(value) else value


def arity_error(name: bytes, args: list[bytes]) -> bytes | None:
    low, high = ARITY.get(name, (2, None))
    if len(args) < low or (high is not None and len(args) > high):
        return errors.wrong_arity(name)
    if name in (b"HSET", b"HMSET") and len(args) % 2:
        return errors.wrong_arity(name)
    return None


def set_flags(args: list[bytes]) -> tuple[set[bytes], bytes | None] | bytes:
    """SET's options as Redis 7 parses them: (flags, the expiry argument or None), or a syntax error."""
    flags: set[bytes] = set()
    expiry = None
    index = 3
    while index < len(args):
        option = args[index].upper()
        has_next = index + 1 < len(args)
        if option == b"NX" and b"XX" not in flags:
            flags.add(option)
        elif option == b"XX" and b"NX" not in flags:
            flags.add(option)
        elif option == b"GET":
            flags.add(option)
        elif option == b"KEEPTTL" and not flags & _EXPIRY_FLAGS.keys():
            flags.add(option)
        elif option in _EXPIRY_FLAGS and not (flags - {option}) & (_EXPIRY_FLAGS.keys() | {b"KEEPTTL"}) and has_next:
            flags.add(option)
            expiry = args[index + 1]
            index += 1
        else:
            return errors.SYNTAX
        index += 1
    return flags, expiry


def expire_error(command: bytes, text: bytes, unit: str, relative: bool) -> bytes | None:
    """Redis's getExpireMillisecondsOrReply: an integer, > 0, and no overflow once in ms (and, for
    a relative TTL, once added to the clock)."""
    value = redis_integer(text)
    if value is None:
        return errors.NOT_INTEGER
    if value <= 0 or (unit == "s" and value > LLONG_MAX // 1000):
        return errors.invalid_expire(command)
    ms = value * 1000 if unit == "s" else value
    if relative and ms + int(time.time() * 1000) > LLONG_MAX:
        return errors.invalid_expire(command)
    return None


def argument_error(name: bytes, args: list[bytes]) -> bytes | None:
    """The error Redis would answer for the command's arguments (arity, options, numbers), or None.
    `name` is the upper-cased command name."""
    error = arity_error(name, args)
    if error is not None:
        return error
    if name == b"SET":
        parsed = set_flags(args)
        if isinstance(parsed, bytes):
            return parsed
        flags, expiry = parsed
        if expiry is not None:
            flag = next(f for f in _EXPIRY_FLAGS if f in flags)
            return expire_error(name, expiry, _EXPIRY_FLAGS[flag], flag in (b"EX", b"PX"))
        return None
    if name in (b"SETEX", b"PSETEX"):
        return expire_error(name, args[2], "s" if name == b"SETEX" else "ms", True)
    if name in (b"INCRBY", b"DECRBY"):
        return errors.NOT_INTEGER if redis_integer(args[2]) is None else None
    if name == b"HINCRBY":
        return errors.NOT_INTEGER if redis_integer(args[3]) is None else None
    if name == b"INCRBYFLOAT":
        return errors.NOT_FLOAT if redis_float(args[2]) is None else None
    if name == b"HINCRBYFLOAT":
        return errors.NOT_FLOAT if redis_float(args[3]) is None else None
    if name == b"SETRANGE":
        offset = redis_integer(args[2])
        if offset is None:
            return errors.NOT_INTEGER
        return errors.OFFSET_OUT_OF_RANGE if offset < 0 else None
    return None


def set_options(args: list[bytes]) -> set[bytes]:
    """The condition/read options of a SET (NX, XX, GET, KEEPTTL) that change how it is applied."""
    return {a.upper() for a in args[3:]} & {b"NX", b"XX", b"GET", b"KEEPTTL"}
