"""Reply demultiplexing without sockets: replies reach their waiters whole, in order, however the
bytes are split; big batches stream; unexpected bytes are reported."""

from __future__ import annotations

from proxy.upstream.demux import STREAM_THRESHOLD, ReplyDemux


class Waiter:
    def __init__(self, count: int, stream: bool = False):
        self.count = count
        self.stream = stream
        self.got: list[bytes] = []
        self.partials: list[tuple[bytes, int]] = []

    def on_reply(self, data) -> None:
        self.got.append(bytes(data))

    def partial(self, data, count: int) -> bool:
        if self.stream:
            self.partials.append((bytes(data), count))
        return self.stream


REPLIES = [b"+OK\r\n", b"$5\r\nhello\r\n", b"*2\r\n:1\r\n$-1\r\n", b"%1\r\n+a\r\n,1.5\r\n",
           b"|1\r\n+k\r\n+v\r\n:7\r\n", b"-ERR x\r\n", b"_\r\n", b"~2\r\n#t\r\n(12345678901234567890\r\n"]


def test_every_split_point_delivers_the_same_batches():
    stream = b"".join(REPLIES)
    for cut in range(1, len(stream)):
        demux = ReplyDemux()
        a, b, c = Waiter(3), Waiter(1), Waiter(4)
        demux.waiters.extend([a, b, c])
        assert demux.feed(stream[:cut])
        assert demux.feed(stream[cut:])
        assert a.got == [b"".join(REPLIES[:3])]
        assert b.got == [REPLIES[3]]
        assert c.got == [b"".join(REPLIES[4:])]
        assert not demux.waiters and not demux.buf


def test_bytes_nobody_asked_for_are_reported():
    demux = ReplyDemux()
    waiter = Waiter(1)
    demux.waiters.append(waiter)
    assert not demux.feed(b"+OK\r\n>2\r\n$10\r\ninvalidate\r\n*0\r\n")
    assert waiter.got == [b"+OK\r\n"]
    assert not demux.waiters


def test_a_big_batch_streams_its_complete_replies():
    value = b"x" * (STREAM_THRESHOLD // 2)
    reply = b"$%d\r\n%s\r\n" % (len(value), value)
    demux = ReplyDemux()
    waiter = Waiter(4, stream=True)
    demux.waiters.append(waiter)
    demux.feed(reply * 3)            # 3 of 4 replies, past the threshold
    assert sum(n for _, n in waiter.partials) == 3
    assert len(demux.buf) < len(reply)
    demux.feed(reply)
    assert waiter.got == [reply]


def test_reset_returns_the_waiters_still_owed():
    demux = ReplyDemux()
    a, b = Waiter(1), Waiter(2)
    demux.waiters.extend([a, b])
    demux.feed(b"+OK\r\n+O")
    assert list(demux.reset()) == [b]
    assert not demux.buf and not demux.waiters
