"""RESP framing, sans-IO: bytes in, frames out; frames in, bytes out. No sockets, no asyncio.

Rules of this module:
- Requests are parsed in request.py (RequestParser, exactly as strict as Redis):
  `feed` returns argument lists, and the client's raw bytes only when they are canonical multibulk.
  encode_command is the canonical encoding every other request is forwarded in.
- Replies are only *framed*, never parsed: `scan_replies` finds where N complete replies end so their
  raw bytes can be forwarded untouched (RESP3 maps, doubles, attributes... stay byte-exact). hiredis
  has no API for frame offsets, so this small boundary walker is the one hand-written scanner.
"""

from __future__ import annotations

import hiredis


def encode_command(args) -> bytes:
    """Encode an argument list as a RESP multibulk request."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if not isinstance(arg, bytes | bytearray):
            arg = str(arg).encode()
        parts.append(b"$%d\r\n" % len(arg))
        parts.append(arg)
        parts.append(b"\r\n")
    return b"".join(parts)


# -- replies ---------------------------------------------------------------------------------------

_LENGTH_PREFIXED = frozenset(b"$=!")   # bulk string, verbatim string, bulk error
_AGGREGATE = frozenset(b"*~")          # array, set: N elements follow
_MAP = 0x25                            # '%': 2N elements follow
_ATTRIBUTE = 0x7C                      # '|': 2N elements follow, then the reply they annotate
_PUSH = 0x3E                           # '>': N elements, out of band: rides along with the next reply


def scan_replies(buf, pos: int, left: int) -> tuple[int, int]:
    """Walk `left` complete replies starting at `pos`.

    Returns (pos, left): left == 0 means the replies end at pos; otherwise more bytes are needed and
    the walk can resume later from the returned (pos, left), so a huge reply arriving in many reads
    is walked once, not once per read. Nested aggregates are flattened into the `left` counter.
    """
    find = buf.find
    size = len(buf)
    while left:
        if pos >= size:
            break
        kind = buf[pos]
        end = find(b"\r\n", pos)
        if end < 0:
            break
        if kind in _LENGTH_PREFIXED:
            length = int(buf[pos + 1:end])
            if length < 0:
                pos = end + 2
            else:
                stop = end + 4 + length
                if stop > size:
                    break
                pos = stop
            left -= 1
        elif kind in _AGGREGATE:
            count = int(buf[pos + 1:end])
            pos = end + 2
            left += count - 1 if count > 0 else -1
        elif kind == _MAP:
            left += 2 * int(buf[pos + 1:end]) - 1
            pos = end + 2
        elif kind == _ATTRIBUTE:
            left += 2 * int(buf[pos + 1:end])
            pos = end + 2
        elif kind == _PUSH:
            left += int(buf[pos + 1:end])
            pos = end + 2
        else:  # + - : _ , # ( : one line
            pos = end + 2
            left -= 1
    return pos, left


def parse_requests(data: bytes) -> list[list[bytes]]:
    """The commands of a request the proxy built or checked: always canonical multibulk (request.py)."""
    reader = hiredis.Reader()
    reader.feed(data)
    out = []
    while (frame := reader.gets()) is not False:
        out.append(frame)
    return out


def split_replies(data, count: int) -> list[bytes]:
    """The raw bytes of each of the first `count` replies in `data` (which holds at least that many)."""
    out, pos = [], 0
    for _ in range(count):
        end, _ = scan_replies(data, pos, 1)
        out.append(bytes(data[pos:end]))
        pos = end
    return out


def parse_reply(raw: bytes):
    """Parse one raw reply into Python values (hiredis); errors come back as hiredis.ReplyError."""
    reader = hiredis.Reader()
    reader.feed(raw)
    return reader.gets()


# -- replies the proxy writes itself -----------------------------------------------------------------

class Status(str):
    """A simple string reply (+OK)."""


OK = b"+OK\r\n"


def encode_reply(value, proto: int = 2) -> bytes:
    """Encode a Python value as a reply in RESP2 or RESP3 (only what local commands need)."""
    if isinstance(value, Status):
        return b"+" + value.encode() + b"\r\n"
    if value is None:
        return b"_\r\n" if proto == 3 else b"$-1\r\n"
    if isinstance(value, bool):
        return (b"#t\r\n" if value else b"#f\r\n") if proto == 3 else (b":1\r\n" if value else b":0\r\n")
    if isinstance(value, int):
        return b":%d\r\n" % value
    if isinstance(value, str):
        value = value.encode()
    if isinstance(value, bytes | bytearray):
        return b"$%d\r\n%s\r\n" % (len(value), value)
    if isinstance(value, dict):
        head = b"%%%d\r\n" % len(value) if proto == 3 else b"*%d\r\n" % (2 * len(value))
        return head + b"".join(encode_reply(k, proto) + encode_reply(v, proto) for k, v in value.items())
    if isinstance(value, list | tuple):
        return b"*%d\r\n" % len(value) + b"".join(encode_reply(v, proto) for v in value)
    raise TypeError(f"cannot encode {type(value).__name__} as a reply")
