"""Reply order without sockets: replies leave in request order whatever order they arrive in."""

from __future__ import annotations

import random

from proxy.session.replies import ReplyOrder


def test_replies_leave_in_request_order():
    rng = random.Random(7)
    for _ in range(200):
        order = ReplyOrder()
        written: list[bytes] = []
        slots = []
        expected = []
        for n in range(rng.randint(1, 12)):
            if rng.random() < 0.3:
                data = b"+local%d\r\n" % n
                out = order.ready(None, data)
                if out is not None:
                    written.append(out)
            else:
                data = b":%d\r\n" % n
                slots.append((order.add(None, 1), data))
            expected.append(data)
        rng.shuffle(slots)
        for slot, data in slots:
            out = order.fill(slot, data)
            if out is not None:
                written.append(out)
        assert b"".join(written) == b"".join(expected)
        assert not order and order.inflight == 0


def test_only_the_head_may_stream():
    order = ReplyOrder()
    first, second = order.add(None, 3), order.add(None, 1)
    assert order.can_stream(first) and not order.can_stream(second)
    order.streamed(2)
    assert order.inflight == 2
    assert order.fill(second, b":2\r\n") is None
    assert order.fill(first, b":1\r\n") == b":1\r\n:2\r\n"
