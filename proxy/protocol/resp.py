"""RESP framing, sans-IO: bytes in, frames out; frames in, bytes out. No sockets, no asyncio.

Rules of this module:
- Requests are parsed into argument lists. The fast path hands a whole chunk to hiredis and, when the
  chunk is exactly a run of well-formed multibulk requests, also returns the chunk itself so the
  caller can forward it without re-encoding. Anything else (inline commands, frames split across
  reads, suspicious element types) goes through the exact slow path below, which also enforces the
  size limits before buffering a huge frame.
- Replies are only *framed*, never parsed: `scan_replies` finds where N complete replies end so their
  raw bytes can be forwarded untouched (RESP3 maps, doubles, attributes... stay byte-exact). hiredis
  has no API for frame offsets, so this small boundary walker is the one hand-written scanner.
- A ProtocolError is the peer's fault; its message is what the client sees after "-ERR Protocol error: ".
"""

from __future__ import annotations

import re

import hiredis

# Redis' own limit for the header line of a multibulk/bulk and for an inline request.
MAX_HEADER_LINE = 64 * 1024

# Exact encoded size of a bulk string of length L ("$L\r\n" + L bytes + "\r\n") and of an array header
# ("*N\r\n"), precomputed so the fast path can check a chunk's length without Python loops.
_TABLE = 10000
_BULK_SIZE = [len(b"$%d\r\n" % n) + n + 2 for n in range(_TABLE)]
# Index 0 is None: an empty multibulk never takes the fast path (Redis sends no reply for it).
_ARRAY_HEADER = [None] + [len(b"*%d\r\n" % n) for n in range(1, _TABLE)]


# hiredis allocates a Python list as soon as it reads an aggregate header, so "*3000000000" would
# make it try to allocate gigabytes. Chunks with an aggregate count of 5+ digits take the slow path,
# which builds argument lists as the bulks arrive and applies the limits first.
_LARGE_AGGREGATE = re.compile(rb"[*%~>|][0-9]{5}")


class ProtocolError(Exception):
    """The client sent something that is not RESP; the connection must be closed after replying."""


class RequestParser:
    """Incremental request parser. `feed(data)` returns (frames, raw).

    frames: list of argument lists (list[bytes]) for every complete request in the data so far.
    raw: the exact bytes of those frames when they can be forwarded as they are, else None.
    After a ProtocolError the parser is dead; `self.error` holds the message and the frames that
    were complete before the bad one are still returned by the failing feed.
    """

    __slots__ = ("_reader", "_buf", "_cursor", "_args", "_left", "_need", "max_bulk", "max_multibulk",
                 "max_inline", "error")

    def __init__(self, max_bulk: int = 512 * 1024 * 1024, max_multibulk: int = 2**31 - 1,
                 max_inline: int = MAX_HEADER_LINE):
        self._reader = hiredis.Reader()
        self._buf = bytearray()     # slow path: bytes not yet consumed (starts at a frame boundary)
        self._cursor = 0            # slow path: where parsing resumes inside _buf
        self._args: list | None = None  # slow path: the multibulk being assembled
        self._left = 0              # slow path: bulks still missing from _args
        self._need = 0              # slow path: don't re-parse before _buf holds this many bytes
        self.max_bulk = max_bulk
        self.max_multibulk = max_multibulk
        self.max_inline = max_inline
        self.error: str | None = None

    def feed(self, data: bytes) -> tuple[list[list[bytes]], bytes | None]:
        if not self._buf and data[:1] == b"*" and _LARGE_AGGREGATE.search(data) is None:
            fast = self._fast(data)
            if fast is not None:
                return fast, data
        self._buf += data
        if len(self._buf) < self._need:
            return [], None
        return self._slow()

    def pending(self) -> bytes:
        """Bytes received but not yet returned as frames (used when a session turns into a relay)."""
        out = bytes(self._buf)
        self._buf = bytearray()
        self._cursor, self._args, self._left, self._need = 0, None, 0, 0
        return out

    # -- fast path -------------------------------------------------------------------------------
    def _fast(self, data: bytes) -> list[list[bytes]] | None:
        """hiredis parse; accept only when `data` is exactly canonical multibulk requests."""
        reader = self._reader
        reader.feed(data)
        frames = []
        size = 0
        try:
            while (frame := reader.gets()) is not False:
                frames.append(frame)
                # TypeError (non-list frame, non-bytes element), IndexError (large frame): slow path.
                size += _ARRAY_HEADER[len(frame)] + sum(map(_BULK_SIZE.__getitem__, map(len, frame)))
        except Exception:
            self._reader = hiredis.Reader()
            return None
        if reader.has_data():
            self._reader = hiredis.Reader()
            return None
        # Only a status element ("+x" inside a request) encodes shorter than its bulk form; every
        # other wrong type either fails above or makes the chunk longer than `size`. Exclude it, and
        # an exact length match proves every element was a canonical bulk string.
        if size != len(data) or b"\r\n+" in data:
            return None
        return frames

    # -- slow path -------------------------------------------------------------------------------
    def _slow(self) -> tuple[list[list[bytes]], bytes | None]:
        buf = self._buf
        frames: list[list[bytes]] = []
        raw_ok = True
        boundary = 0    # _buf always starts at a frame boundary
        try:
            while True:
                if self._args is None:
                    boundary = self._cursor
                    if self._cursor >= len(buf):
                        break
                    if buf[self._cursor] != 0x2A:  # not '*': an inline command
                        args = self._inline(buf)
                        if args is None:
                            break
                        raw_ok = False
                        if args:
                            frames.append(args)
                        continue
                    if not self._multibulk_header(buf):
                        break
                    if self._args is None:      # "*0" or "*-1": Redis ignores it, sends no reply
                        raw_ok = False
                        continue
                if not self._bulks(buf):
                    break
                frames.append(self._args)
                self._args = None
        except ProtocolError as exc:
            self.error = str(exc)
            self._args = None
            boundary = self._cursor
            raw_ok = False
        raw = bytes(buf[:boundary]) if raw_ok and frames else None
        if boundary:
            del buf[:boundary]
            self._cursor -= boundary
            if self._need:
                self._need -= boundary
        return frames, raw

    def _line_end(self, buf: bytearray, start: int, what: str) -> int:
        end = buf.find(b"\r\n", start)
        if end < 0 and len(buf) - start > MAX_HEADER_LINE:
            raise ProtocolError(f"too big {what} count string")
        return end

    def _multibulk_header(self, buf: bytearray) -> bool:
        cur = self._cursor
        end = self._line_end(buf, cur, "mbulk")
        if end < 0:
            return False
        try:
            count = int(buf[cur + 1:end])
        except ValueError:
            raise ProtocolError("invalid multibulk length") from None
        if count > self.max_multibulk:
            raise ProtocolError("invalid multibulk length")
        self._cursor = end + 2
        if count > 0:
            self._args, self._left = [], count
        return True

    def _bulks(self, buf: bytearray) -> bool:
        """Collect the remaining bulks of the current multibulk; False when more bytes are needed."""
        args = self._args
        cur = self._cursor
        size = len(buf)
        while self._left:
            if cur >= size:
                break
            if buf[cur] != 0x24:  # '$'
                raise ProtocolError(f"expected '$', got '{chr(buf[cur])}'")
            end = self._line_end(buf, cur, "bulk")
            if end < 0:
                break
            try:
                length = int(buf[cur + 1:end])
            except ValueError:
                raise ProtocolError("invalid bulk length") from None
            if length < 0 or length > self.max_bulk:
                raise ProtocolError("invalid bulk length")
            stop = end + 2 + length
            if stop + 2 > size:
                self._need = stop + 2
                break
            args.append(bytes(buf[end + 2:stop]))
            cur = stop + 2
            self._left -= 1
        self._cursor = cur
        if self._left:
            return False
        self._need = 0
        return True

    def _inline(self, buf: bytearray) -> list[bytes] | None:
        cur = self._cursor
        end = buf.find(b"\n", cur)
        if end < 0:
            if len(buf) - cur > self.max_inline:
                raise ProtocolError("too big inline request")
            return None
        line = bytes(buf[cur:end]).rstrip(b"\r")
        self._cursor = end + 1
        return split_inline(line)


_ESCAPES = {ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t", ord("b"): b"\b", ord("a"): b"\a"}
_HEX = b"0123456789abcdefABCDEF"
_SPACE = b" \t\n\r\f\v"


def split_inline(line: bytes) -> list[bytes]:
    """Split an inline command the way Redis' sdssplitargs does: spaces, "double" and 'single' quotes."""
    args: list[bytes] = []
    i, n = 0, len(line)
    while True:
        while i < n and line[i] in _SPACE:
            i += 1
        if i >= n:
            return args
        arg = bytearray()
        quote = 0
        while True:
            if i >= n:
                if quote:
                    raise ProtocolError("unbalanced quotes in request")
                break
            c = line[i]
            if quote:
                if c == quote:
                    if i + 1 < n and line[i + 1] not in _SPACE:
                        raise ProtocolError("unbalanced quotes in request")
                    i += 1
                    break
                if c == 0x5C and i + 1 < n:   # backslash
                    i, text = _escape(line, i, quote)
                    arg += text
                    continue
                arg.append(c)
            elif c in _SPACE:
                break
            elif c in (0x22, 0x27):
                quote = c
            else:
                arg.append(c)
            i += 1
        args.append(bytes(arg))


def _escape(line: bytes, i: int, quote: int) -> tuple[int, bytes]:
    """The escape at line[i] (a backslash): "double quotes" know \\xHH, \\n, \\r, \\t, \\b, \\a and
    escape any other byte; 'single quotes' only \\'. Returns the index after it and its bytes."""
    following = line[i + 1]
    if quote == 0x27:
        return (i + 2, b"'") if following == 0x27 else (i + 1, b"\\")
    if following == 0x78 and i + 3 < len(line) and line[i + 2] in _HEX and line[i + 3] in _HEX:
        return i + 4, bytes([int(line[i + 2:i + 4], 16)])
    return i + 2, _ESCAPES.get(following, bytes([following]))


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


def parse_reply(raw: bytes):
    """Parse one raw reply into Python values (hiredis); errors come back as hiredis.ReplyError."""
    reader = hiredis.Reader()
    reader.feed(raw)
    return reader.gets()


# -- replies the proxy writes itself -----------------------------------------------------------------

class Status(str):
    """A simple string reply (+OK)."""


class Error(str):
    """An error reply; the text includes its code, e.g. 'ERR unknown command'."""


OK = b"+OK\r\n"


def error(message: str) -> bytes:
    return b"-" + message.replace("\r", " ").replace("\n", " ").encode() + b"\r\n"


def encode_reply(value, proto: int = 2) -> bytes:
    """Encode a Python value as a reply in RESP2 or RESP3 (only what local commands need)."""
    if isinstance(value, Error):
        return error(value)
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
