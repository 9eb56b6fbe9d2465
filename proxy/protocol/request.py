"""Requests, sans-IO: the bytes a client sends -> argument lists, read exactly as Redis reads them.

Rules of this module:
- Redis 7's own parser is the reference (networking.c: processInputBuffer, processMultibulkBuffer,
  processInlineBuffer; sds.c: sdssplitargs; util.c: string2ll). The slow path is a port of it: the
  proxy accepts exactly what Redis accepts, with the same argument lists, and refuses what Redis
  refuses, with Redis's error text, at the same point of the stream. Details that matter:
    * a line ends at the FIRST '\\r' (multibulk) or '\\n' (inline), found the way strchr finds it: a NUL
      byte before it ends the search, so the line never ends (Redis waits, then says "too big ...");
    * lengths are string2ll integers: digits, an optional '-', no '+', spaces, '_' or leading zeros;
    * a multibulk count <= 0 is ignored (no reply); an element must be a bulk string ('$');
    * inline: sdssplitargs, where \\v and \\f are skipped between arguments but do not end one.
- Redis is lenient in two places: it skips the byte after a length line's '\\r' and the two bytes after a
  bulk's data without looking at them. The proxy reads those requests exactly as Redis does (so it sees
  the commands Redis would run, and refuses the same ones) but never forwards such bytes: see the next
  rule. Refusing them instead would break clients Redis serves, for no gain in safety.
- Only canonical bytes are forwarded. `feed` returns the client's raw bytes only when they are exactly
  "*N\\r\\n" (N >= 1) followed by N "$len\\r\\narg\\r\\n", the one encoding every RESP parser reads alike;
  anything else (inline commands, ignored "*0", the leniencies above) comes back as frames only and the
  caller re-encodes them (resp.encode_command). So what reaches Redis is what the proxy saw.
- Fast path: hiredis parses a whole read, and the frames are taken only if encoding them canonically
  (hiredis.pack_command, in C) gives back the very bytes received. That one comparison rejects all that
  hiredis accepts but Redis reads otherwise (nested aggregates, RESP3 types, non-bulk elements, bulk
  trailers hiredis does not check). A read that ends inside a request takes the fast path up to it; the
  next read finishes that request on the slow path and hands what follows to the fast path again.
- Limits, checked on the length line before any data is buffered for it: max_bulk (proto-max-bulk-len),
  max_multibulk, 64 KB for a length line and max_inline for an inline request (PROTO_INLINE_MAX_SIZE),
  Redis's limits for a connection that must still AUTH (`unauthenticated`: more than 10 arguments or a
  bulk over 16384 bytes), and max_query_buffer for all the bytes of one request. Memory grows only with
  bytes received: nothing is allocated for a declared length.
- A ProtocolError is the peer's fault: the requests complete before it are still returned, `error` holds
  Redis's message (errors.protocol_error makes the reply) and the parser is dead; the connection closes.
"""

from __future__ import annotations

import re

import hiredis

from . import errors

LINE_MAX = 64 * 1024            # PROTO_INLINE_MAX_SIZE: the longest length line (and default inline request)
UNAUTH_MAX_ARGS = 10            # a connection that must still AUTH: at most this many arguments ...
UNAUTH_MAX_BULK = 16384         # ... of at most this many bytes each
INT_MAX = 2**31 - 1
QUERY_BUFFER_DEFAULT = 1 << 30  # Redis's client-query-buffer-limit

_STAR, _DOLLAR, _CR, _LF = 0x2A, 0x24, 0x0D, 0x0A
_LLONG = 2**63
# string2ll's syntax (util.c): "0", or an optional '-' and digits without a leading zero; < 21 chars.
_INTEGER = re.compile(rb"0|-?[1-9][0-9]{0,19}")
# hiredis builds a list of the declared size as soon as it reads an aggregate header: a read that
# declares 10,000+ elements anywhere takes the slow path, which stores only what arrives.
_LARGE_AGGREGATE = re.compile(rb"[*%~>|][0-9]{5}")
_pack = hiredis.pack_command
_NEED_DATA = object()   # gets() returns it when no frame is complete (its default, False, equals a frame :0)


class ProtocolError(Exception):
    """The client sent something Redis would refuse; reply with the message, then close."""


def string2ll(buf, start: int, end: int) -> int | None:
    """buf[start:end] as Redis's string2ll reads it, or None where Redis says it is no integer."""
    if not _INTEGER.fullmatch(buf, start, end):
        return None
    value = int(buf[start:end])
    return value if -_LLONG <= value < _LLONG else None


def unauthenticated_error(args: list[bytes]) -> str | None:
    """The protocol error Redis gives for this request on a connection that must still AUTH, if any.

    For requests parsed before the connection lost its authentication (RESET pipelined with more
    commands): the session checks the ones after RESET with this, as Redis would have."""
    if len(args) > UNAUTH_MAX_ARGS:
        return errors.PROTO_UNAUTH_MULTIBULK
    if max(map(len, args), default=0) > UNAUTH_MAX_BULK:
        return errors.PROTO_UNAUTH_BULK
    return None


class RequestParser:
    """Incremental request parser: `feed(data)` returns (frames, raw).

    frames: the argument lists (list[bytes], never empty) of every request completed by `data`.
    raw: the exact bytes of those frames when they are canonical (forward them as they are), else None.

    State for the session: `error` (a protocol error: the parser is dead), `unauthenticated` (set while
    the connection must still AUTH), `deferred` (requests are held back because the frames just
    returned may authenticate the connection: call feed(b"") once they are handled), `buffered` (bytes
    held for requests not returned yet) and `partial` (a request has begun but is not complete).
    """

    __slots__ = ("_reader", "_buf", "_pos", "_seek", "_start", "_count", "_argc", "_bulk", "_spans",
                 "_canonical", "_fast_limit", "max_bulk", "max_multibulk", "max_inline", "max_query_buffer",
                 "unauthenticated", "error", "deferred")

    def __init__(self, max_bulk: int = 512 * 1024 * 1024, max_multibulk: int = INT_MAX,
                 max_inline: int = LINE_MAX, max_query_buffer: int = QUERY_BUFFER_DEFAULT,
                 unauthenticated: bool = False):
        self._reader = hiredis.Reader(notEnoughData=_NEED_DATA)
        self.max_bulk = max_bulk
        self.max_multibulk = max_multibulk
        self.max_inline = max_inline
        self.max_query_buffer = max_query_buffer
        self.unauthenticated = unauthenticated   # the session keeps it equal to "must still AUTH"
        self.error: str | None = None
        self.deferred = False
        # A read of n bytes holds no bulk longer than n and fewer than n / 6 elements ("$0\r\n\r\n"),
        # so up to this size hiredis' frames cannot break max_bulk or max_multibulk (-1: parser dead).
        self._fast_limit = min(max_bulk, 6 * max_multibulk)
        self._reset()

    def _reset(self) -> None:
        self._buf = bytearray()   # bytes not returned yet; starts where the current request starts
        self._pos = 0             # where parsing resumes in _buf (Redis: qb_pos)
        self._seek = 0            # where the search for the current line's end resumes; -1: never ends
        self._start = 0           # where the multibulk being collected starts in _buf
        self._count = 0           # bulks still to come in that multibulk (Redis: multibulklen)
        self._argc = 0            # bulks it declared
        self._bulk = -1           # length of the bulk being received, -1 before its length line
        self._spans: list[int] = []   # (offset from _start, length) of each bulk received so far
        self._canonical = True    # that multibulk is canonical so far

    @property
    def buffered(self) -> int:
        """Bytes held for requests not returned yet (what a total query-buffer cap adds up)."""
        return len(self._buf)

    @property
    def partial(self) -> bool:
        """A request has begun and is not complete (or is deferred): a completion deadline runs."""
        return bool(self._buf)

    def pending(self) -> bytes:
        """Bytes received but not returned as frames (used when a session turns into a relay)."""
        out = bytes(self._buf)
        self._reset()
        return out

    # -- feed --------------------------------------------------------------------------------------
    def feed(self, data: bytes) -> tuple[list[list[bytes]], bytes | None]:
        # The hot path, _afresh inlined: a read that starts a request and may go to hiredis.
        if not self._buf and len(data) <= self._fast_limit and data.startswith(b"*") \
                and not self.unauthenticated and _LARGE_AGGREGATE.search(data) is None:
            frames, used = self._fast(data)
            if used == len(data):
                return frames, data
            return self._fresh(data, used, frames, [data[:used]] if used else [])
        return self._resume(data)

    def _afresh(self, data: bytes, frames: list, parts: list | None):
        """Parse `data`, which starts a request, with nothing buffered: hiredis first if it may."""
        used = 0
        if len(data) <= self._fast_limit and data.startswith(b"*") and not self.unauthenticated \
                and _LARGE_AGGREGATE.search(data) is None:
            got, used = self._fast(data)
            frames += got
            if used and parts is not None:
                parts.append(data[:used])
            if used == len(data):
                return frames, None if parts is None else b"".join(parts)
        return self._fresh(data, used, frames, parts)

    def _resume(self, data: bytes) -> tuple[list[list[bytes]], bytes | None]:
        """Bytes after others still buffered (or a read the fast path cannot take)."""
        self.deferred = False
        if self.error is not None:
            return [], None
        frames: list[list[bytes]] = []
        buf = self._buf
        buf += data
        try:
            if self.unauthenticated and self._count:
                self._recheck_unauthenticated()
            canonical = self._slow(frames, one=True)
        except ProtocolError as exc:
            return self._fail(exc, frames)
        pos = self._pos
        if not frames or self._count or self.deferred or pos == len(buf):
            return self._done(frames, [] if canonical else None)
        # The request begun in an earlier read is complete: what follows it starts afresh.
        with memoryview(buf) as view:
            head = bytes(view[:pos]) if canonical else None
            rest = bytes(view[pos:])
        self._reset()
        return self._afresh(rest, frames, None if head is None else [head])

    def _fresh(self, data: bytes, used: int, frames: list, parts: list | None):
        """Slow path for data[used:], which starts a request, with nothing else buffered."""
        self.deferred = False
        with memoryview(data) as view:
            self._buf = bytearray(view[used:])
        self._pos = self._seek = 0
        try:
            canonical = self._slow(frames)
        except ProtocolError as exc:
            return self._fail(exc, frames)
        return self._done(frames, parts if canonical else None)

    def _done(self, frames: list, parts: list | None):
        """Drop the consumed bytes (adding them to `parts`, the raw pieces) and return the frames."""
        buf = self._buf
        boundary = self._start if self._count else self._pos
        if parts is not None and frames:
            with memoryview(buf) as view:
                parts.append(bytes(view[:boundary]))
        if boundary == len(buf):
            self._buf = bytearray()
        elif boundary:
            del buf[:boundary]
        self._pos -= boundary
        self._start = 0         # the request being collected (if any) now starts _buf
        if self._seek >= 0:
            self._seek -= boundary
        if len(self._buf) > self.max_query_buffer:
            return self._fail(ProtocolError(errors.PROTO_QUERY_BUFFER), frames)
        return frames, b"".join(parts) if parts is not None and frames else None

    def _fail(self, exc: ProtocolError, frames: list):
        self.error = str(exc)
        self._reset()
        self._fast_limit = -1
        return frames, None

    # -- fast path -----------------------------------------------------------------------------------
    def _fast(self, data: bytes) -> tuple[list, int]:
        """Let hiredis parse `data`: its frames and the bytes they take, when those bytes are exactly
        the frames' canonical encoding (all of `data`, or a prefix ending where a request was cut);
        else ([], 0)."""
        reader = self._reader
        reader.feed(data)
        try:
            got = list(iter(reader.gets, _NEED_DATA))
            canonical = _pack(tuple(got[0])) if len(got) == 1 else b"".join(map(_pack, map(tuple, got)))
        except (hiredis.ProtocolError, TypeError):  # not RESP; a nested aggregate, a nil, an error ...
            self._reader = hiredis.Reader(notEnoughData=_NEED_DATA)
            return [], 0
        if canonical == data and all(got):     # "*0" and "*-1" are for the slow path (Redis ignores them)
            return got, len(data)
        if reader.has_data():                   # a request cut by the end of the read
            self._reader = hiredis.Reader(notEnoughData=_NEED_DATA)
        if got and all(got) and data.startswith(canonical):
            return got, len(canonical)
        return [], 0

    # -- slow path: Redis's processInputBuffer ---------------------------------------------------------
    def _slow(self, frames: list, one: bool = False) -> bool:
        """Parse _buf from _pos, appending complete requests to `frames` (stop after one if `one`).
        Returns whether all it consumed was canonical multibulk; stops when more bytes are needed."""
        buf = self._buf
        canonical = True
        while self._pos < len(buf):
            if not self._count:
                if buf[self._pos] != _STAR:
                    args = self._inline(buf)
                    if args is None:
                        break
                    canonical = False
                    if args:
                        frames.append(args)
                        if one:
                            break
                    continue
                if not self._multibulk_header(buf, frames):
                    break
                if not self._count:     # a count <= 0: Redis ignores it and sends no reply
                    canonical = False
                    continue
            if not self._bulks(buf, frames):
                break
            frames.append(self._take_args(buf))
            canonical = canonical and self._canonical
            if one:
                break
        return canonical

    def _line_end(self, buf: bytearray, char: bytes, limit: int, too_big: str) -> int:
        """Index of the first `char` at or after _pos as Redis's strchr finds it (a NUL stops the
        search), or -1 while there is none; over `limit` bytes without one is a protocol error."""
        seek = self._seek
        if seek >= 0:
            end = buf.find(char, seek)
            if buf.find(b"\0", seek, end if end >= 0 else len(buf)) >= 0:
                self._seek = -1         # the line can never end
            elif end >= 0:
                self._seek = end
                return end
            else:
                self._seek = len(buf)
        if len(buf) - self._pos > limit:
            raise ProtocolError(too_big)
        return -1

    def _advance(self, pos: int) -> None:
        self._pos = self._seek = pos

    def _multibulk_header(self, buf: bytearray, frames: list) -> bool:
        """'*<count>\\r?': False while the line is incomplete (or deferred), else consumed."""
        pos = self._pos
        cr = self._line_end(buf, b"\r", LINE_MAX, errors.PROTO_TOO_BIG_MBULK)
        if cr < 0 or cr > len(buf) - 2:     # Redis also waits for the byte after '\r'
            return False
        count = string2ll(buf, pos + 1, cr)
        if count is None or count > INT_MAX or count > self.max_multibulk:
            raise ProtocolError(errors.PROTO_INVALID_MULTIBULK)
        if count > UNAUTH_MAX_ARGS and self.unauthenticated:
            return self._defer(frames, errors.PROTO_UNAUTH_MULTIBULK)
        self._advance(cr + 2)
        if count > 0:
            self._start, self._count, self._argc, self._bulk = pos, count, count, -1
            self._spans = []
            self._canonical = buf[cr + 1] == _LF
        return True

    def _bulks(self, buf: bytearray, frames: list) -> bool:
        """Collect the bulks of the current multibulk; False while more bytes are needed."""
        size = len(buf)
        while self._count:
            if self._bulk < 0 and not self._bulk_header(buf, frames):
                return False
            pos, length = self._pos, self._bulk
            if size - pos < length + 2:
                return False
            self._spans += (pos - self._start, length)
            if buf[pos + length] != _CR or buf[pos + length + 1] != _LF:
                self._canonical = False         # Redis skips these two bytes unread
            self._advance(pos + length + 2)
            self._bulk = -1
            self._count -= 1
        return True

    def _bulk_header(self, buf: bytearray, frames: list) -> bool:
        pos = self._pos
        cr = self._line_end(buf, b"\r", LINE_MAX, errors.PROTO_TOO_BIG_BULK)
        if cr < 0 or cr > len(buf) - 2:
            return False
        if buf[pos] != _DOLLAR:
            raise ProtocolError(errors.proto_expected_bulk(buf[pos]))
        length = string2ll(buf, pos + 1, cr)
        if length is None or length < 0 or length > self.max_bulk:
            raise ProtocolError(errors.PROTO_INVALID_BULK)
        if length > UNAUTH_MAX_BULK and self.unauthenticated:
            return self._defer(frames, errors.PROTO_UNAUTH_BULK)
        if cr + 4 + length - self._start > self.max_query_buffer:
            raise ProtocolError(errors.PROTO_QUERY_BUFFER)
        if buf[cr + 1] != _LF:
            self._canonical = False
        self._advance(cr + 2)
        self._bulk = length
        return True

    def _defer(self, frames: list, message: str) -> bool:
        """An unauthenticated limit is hit. Frames returned by this feed may authenticate the
        connection (Redis runs them before it reads on), so stop here until the session says."""
        if not frames:
            raise ProtocolError(message)
        self.deferred = True
        return False

    def _recheck_unauthenticated(self) -> None:
        """The connection lost its authentication while a request was half received (RESET)."""
        if self._argc > UNAUTH_MAX_ARGS:
            raise ProtocolError(errors.PROTO_UNAUTH_MULTIBULK)
        if max(self._spans[1::2], default=0) > UNAUTH_MAX_BULK or self._bulk > UNAUTH_MAX_BULK:
            raise ProtocolError(errors.PROTO_UNAUTH_BULK)

    def _take_args(self, buf: bytearray) -> list[bytes]:
        start, spans = self._start, self._spans
        with memoryview(buf) as view:
            args = [bytes(view[start + spans[i]:start + spans[i] + spans[i + 1]])
                    for i in range(0, len(spans), 2)]
        self._spans = []
        return args

    def _inline(self, buf: bytearray) -> list[bytes] | None:
        """One inline request (a line), or None while its '\\n' has not arrived."""
        pos = self._pos
        newline = self._line_end(buf, b"\n", self.max_inline, errors.PROTO_TOO_BIG_INLINE)
        if newline < 0:
            return None
        end = newline - 1 if newline != pos and buf[newline - 1] == _CR else newline
        args = split_inline(bytes(buf[pos:end]))
        self._advance(newline + 1)
        return args


# -- inline requests: sds.c sdssplitargs ---------------------------------------------------------------

_ISSPACE = frozenset(b" \t\n\v\f\r")       # isspace() in the C locale: skipped between arguments
_ENDS_WORD = frozenset(b" \n\r\t")         # what ends an unquoted argument (and NUL, never in a line)
_ESCAPES = {ord("n"): 0x0A, ord("r"): 0x0D, ord("t"): 0x09, ord("b"): 0x08, ord("a"): 0x07}
_HEX = frozenset(b"0123456789abcdefABCDEF")
_DQUOTE, _SQUOTE, _BACKSLASH = 0x22, 0x27, 0x5C


def split_inline(line: bytes) -> list[bytes]:
    """Split an inline request as Redis's sdssplitargs does; unbalanced quotes are a ProtocolError.

    `line` holds no NUL (the parser never ends a line past one) and no line terminator."""
    args: list[bytes] = []
    i, n = 0, len(line)
    while True:
        while i < n and line[i] in _ISSPACE:
            i += 1
        if i >= n:
            return args
        arg = bytearray()
        if line[i] == _DQUOTE:
            i = _double_quoted(line, i + 1, arg)
        elif line[i] == _SQUOTE:
            i = _single_quoted(line, i + 1, arg)
        else:
            i = _unquoted(line, i, arg)
        args.append(bytes(arg))


def _unquoted(line: bytes, i: int, arg: bytearray) -> int:
    """An argument outside quotes, up to a space, tab, CR or LF; a quote inside it opens a quoted part
    ("ab"cd" reads as abcd). Returns the index after the byte that ended it."""
    n = len(line)
    while i < n:
        c = line[i]
        if c in _ENDS_WORD:
            return i + 1
        if c == _DQUOTE:
            return _double_quoted(line, i + 1, arg)
        if c == _SQUOTE:
            return _single_quoted(line, i + 1, arg)
        arg.append(c)
        i += 1
    return i


def _close_quote(line: bytes, i: int) -> int:
    """The closing quote at line[i] must end the line or be followed by a space (isspace)."""
    if i + 1 < len(line) and line[i + 1] not in _ISSPACE:
        raise ProtocolError(errors.PROTO_UNBALANCED_QUOTES)
    return i + 1


def _double_quoted(line: bytes, i: int, arg: bytearray) -> int:
    """After a '"': \\xHH, \\n \\r \\t \\b \\a and \\<any byte> are escapes."""
    n = len(line)
    while i < n:
        c = line[i]
        if c == _BACKSLASH and i + 3 < n and line[i + 1] == 0x78 and line[i + 2] in _HEX and line[i + 3] in _HEX:
            arg.append(int(line[i + 2:i + 4], 16))
            i += 4
        elif c == _BACKSLASH and i + 1 < n:
            arg.append(_ESCAPES.get(line[i + 1], line[i + 1]))
            i += 2
        elif c == _DQUOTE:
            return _close_quote(line, i)
        else:
            arg.append(c)
            i += 1
    raise ProtocolError(errors.PROTO_UNBALANCED_QUOTES)


def _single_quoted(line: bytes, i: int, arg: bytearray) -> int:
    """After a "'": only \\' is an escape."""
    n = len(line)
    while i < n:
        c = line[i]
        if c == _BACKSLASH and i + 1 < n and line[i + 1] == _SQUOTE:
            arg.append(_SQUOTE)
            i += 2
        elif c == _SQUOTE:
            return _close_quote(line, i)
        else:
            arg.append(c)
            i += 1
    raise ProtocolError(errors.PROTO_UNBALANCED_QUOTES)
