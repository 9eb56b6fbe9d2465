"""Reply order, sans-IO: replies leave in request order whatever order they arrive in.

    add(count)  -> a Slot at the tail: the place of `count` replies that someone will deliver later
    ready(data) -> a reply known now: to write at once, or queued behind the pending ones
    fill(slot, data) -> the bytes that can be written now (the head run of filled slots), or None

A Slot is also the waiter an upstream connection delivers to (on_reply / partial / count); it hands
its data back to its owner, the session, which calls fill() and writes what it returns. `inflight`
counts the replies still missing (flow control reads it). A slot sent on a shared connection keeps its
request bytes (`request`), so when that connection dies before answering, the session can send it
again where that cannot run anything twice (upstream/resend.py; on_lost). Nothing here touches a socket.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any


class Slot:
    """The place of one request (or a batch of `count` pipelined requests) in a session's replies."""

    __slots__ = ("owner", "count", "data", "after", "request", "resent")

    def __init__(self, owner: Any, count: int, after: Callable[[Slot, bytes], bytes] | None = None):
        self.owner = owner      # has fill(slot, data), fill_partial(slot, data, count), upstream_lost(...)
        self.count = count
        self.data: bytes | None = None   # the reply bytes once they are known (and not yet written)
        self.after = after      # called with (slot, reply) before the reply is queued for writing
        self.request: bytes | None = None   # the commands' bytes, when they went to a shared connection
        self.resent = 0         # times they were sent again after their connection died

    def on_reply(self, data) -> None:
        self.owner.fill(self, data)

    def partial(self, data, count: int) -> bool:
        """The first `count` replies of this batch; taken only when they can be written now."""
        return self.after is None and self.owner.fill_partial(self, data, count)

    def on_lost(self, conn: Any, unsent: bool, message: str) -> None:
        """The connection died before these replies came (`unsent`: before the request left)."""
        self.owner.upstream_lost(self, conn, unsent, message)


class ReplyOrder:
    __slots__ = ("slots", "inflight")

    def __init__(self) -> None:
        self.slots: deque[Slot] = deque()
        self.inflight = 0

    def __bool__(self) -> bool:
        """True while some reply has not been written yet."""
        return bool(self.slots)

    def add(self, owner: Any, count: int, after=None) -> Slot:
        slot = Slot(owner, count, after)
        self.slots.append(slot)
        self.inflight += count
        return slot

    def ready(self, owner: Any, data: bytes) -> bytes | None:
        """A reply known now: returned for writing at once when nothing is pending before it."""
        if not self.slots:
            return data
        slot = Slot(owner, 0)
        slot.data = data
        self.slots.append(slot)
        return None

    def fill(self, slot: Slot, data: bytes) -> bytes | None:
        """`slot`'s replies arrived (after `slot.after` ran): the bytes to write now, if any."""
        self.inflight -= slot.count
        slots = self.slots
        if not slots or slots[0] is not slot:
            slot.data = data
            return None
        slots.popleft()
        if slots and slots[0].data is not None:
            out = [data]
            while slots and (ready := slots[0].data) is not None:
                slots.popleft()
                out.append(ready)
            data = b"".join(out)
        return data

    def can_stream(self, slot: Slot) -> bool:
        """May the first replies of `slot` be written before the rest (it is at the head)?"""
        return bool(self.slots) and self.slots[0] is slot

    def streamed(self, count: int) -> None:
        self.inflight -= count

    def clear(self) -> None:
        self.slots.clear()
        self.inflight = 0
