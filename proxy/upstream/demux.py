"""Reply demultiplexing, sans-IO: one upstream byte stream -> the waiters of the requests, in order.

Redis answers in order on one connection, so a connection keeps a FIFO of waiters; a waiter stands for
`count` consecutive replies (a client's whole pipeline is one waiter) and gets their raw bytes in one
piece (`on_reply`), never re-encoded: RESP3 maps, doubles and attributes stay byte-exact. Replies are
only framed (protocol/resp.scan_replies), never parsed.

A batch whose received part passes STREAM_THRESHOLD bytes is handed over reply by reply as the replies
complete (`waiter.partial`), so a pipeline of large values is not held in memory whole. Bytes that no
waiter asked for mean the stream can no longer be trusted: feed() says so and the connection closes.
"""

from __future__ import annotations

from collections import deque

from ..protocol.resp import scan_replies

STREAM_THRESHOLD = 256 * 1024


class ReplyDemux:
    __slots__ = ("waiters", "buf", "start", "cursor", "left")

    def __init__(self) -> None:
        self.waiters: deque = deque()
        self.buf = bytearray()
        self.start = 0          # where the head waiter's replies begin in buf
        self.cursor = 0         # where scanning resumes in buf
        self.left = 0           # replies the head waiter still misses (0: head not started)

    def reset(self) -> deque:
        """Forget the stream (the connection is gone); returns the waiters that got nothing."""
        waiters, self.waiters = self.waiters, deque()
        self.buf = bytearray()
        self.start = self.cursor = self.left = 0
        return waiters

    def feed(self, data: bytes) -> bool:
        """Deliver every complete batch in `data` (and what came before); False on unexpected bytes."""
        buf: bytes | bytearray = data
        if self.buf:
            self.buf += data
            buf = self.buf
        waiters = self.waiters
        start, cursor, left = self.start, self.cursor, self.left
        size = len(buf)
        while waiters:
            waiter = waiters[0]
            if not left:
                left = waiter.count
            cursor, left = scan_replies(buf, cursor, left)
            if left:
                if cursor - start > STREAM_THRESHOLD and waiter.count > 1:
                    start = _stream(waiter, buf, start)
                break
            waiters.popleft()
            # Hand out bytes (one copy), never the reusable bytearray itself.
            waiter.on_reply(data if buf is data and start == 0 and cursor == size
                            else bytes(memoryview(buf)[start:cursor]))
            start = cursor
        self.left = left
        if start >= size:
            if buf is not data:
                self.buf = bytearray()
            self.start = self.cursor = 0
            return True
        if not waiters:
            self.reset()
            return False
        if buf is data:
            self.buf = bytearray(data[start:])
        elif start:
            del self.buf[:start]
        self.start = 0
        self.cursor = cursor - start
        return True


def _stream(waiter, buf, start: int) -> int:
    """The head batch is big and still incomplete: hand its complete replies over now. Returns where
    the undelivered part starts."""
    end, done = start, 0
    while done < waiter.count - 1:
        pos, left = scan_replies(buf, end, 1)
        if left:
            break
        end, done = pos, done + 1
    if done and waiter.partial(bytes(memoryview(buf)[start:end]), done):
        waiter.count -= done
        return end
    return start
