"""MULTI ... EXEC: queued in the session, sent to the upstream as one block.

The client gets +OK for MULTI and +QUEUED for each command from the proxy; at EXEC the whole block
(MULTI, the commands, EXEC) leaves in one write, so no other client's command can come between them on
a shared connection, and no connection is held while the client composes the transaction. With WATCH
(or a SELECTed database) the block goes to the client's dedicated connection instead.

Redis's queue-time checks are kept: an unknown command or a wrong number of arguments gets Redis's own
error (the command alone is sent to Redis to get it) and makes EXEC answer EXECABORT; commands that
change the connection (SELECT, HELLO, AUTH, CLIENT, SUBSCRIBE ...) are refused inside a transaction; on
a cluster every key must be in one slot (CROSSSLOT otherwise), and a block refused because its slot
moved is sent again where the slot now is (Redis ran nothing).
"""

from __future__ import annotations

from ..protocol import errors
from ..protocol.commands import DENY, FLUSH, LOCAL, RELAY
from ..protocol.resp import OK, encode_command, scan_replies, split_replies
from ..upstream.placement import CROSSSLOT
from . import local

QUEUED = b"+QUEUED\r\n"
MULTI = encode_command((b"MULTI",))
EXEC = encode_command((b"EXEC",))
_RETRY = (b"-MOVED ", b"-ASK ", b"-TRYAGAIN")


class Transaction:
    __slots__ = ("commands", "slot", "failed")

    def __init__(self, slot: int | None):
        self.commands: list[list[bytes]] = []
        self.slot = slot        # the one slot of every key (and of WATCH), when known
        self.failed = False     # a queued command was refused: EXEC answers EXECABORT


def start(session, frames: list, i: int, name: bytes) -> int:
    """MULTI, EXEC, DISCARD, WATCH, UNWATCH outside a transaction."""
    args = frames[i]
    if name == b"MULTI":
        if len(args) != 1:
            session.reply(errors.wrong_arity(b"multi"))
            return i + 1
        session.tx = Transaction(session.watch_slot)
        session.reply(OK)
        return i + 1
    if name in (b"EXEC", b"DISCARD"):
        session.reply(errors.without_multi(name))
        return i + 1
    if name == b"UNWATCH":
        if session.pin is not None and session.pin.up:
            session.send_pinned(args)
        else:
            session.reply(OK)
        return i + 1
    # WATCH: on a dedicated connection; a transaction must then stay in the watched keys' slot.
    slot = session.pool.slot_of(args)
    if slot is None:
        session.reply(errors.wrong_arity(b"watch"))
        return i + 1
    if slot is CROSSSLOT or (session.watch_slot is not None and slot != session.watch_slot):
        session.reply(errors.CROSSSLOT)
        return i + 1
    if session.pin is not None and session.pin.up:
        session.watch_slot = slot
        session.send_pinned(args)
        return i + 1
    return session._start_pin(frames, i)


def queue(session, frames: list, i: int, name: bytes, kind: int) -> int:
    """A command inside MULTI."""
    tx = session.tx
    args = frames[i]
    if name == b"EXEC":
        return _exec(session, i)
    if name == b"DISCARD":
        session.tx = None
        session.reply(OK)
        session.end_watch(clean=False)
        return i + 1
    if name == b"MULTI":
        session.reply(errors.MULTI_NESTED)
        return i + 1
    if name == b"WATCH":
        session.reply(errors.WATCH_IN_MULTI)
        return i + 1
    if name in (b"QUIT", b"RESET"):         # run at once inside MULTI, as Redis does
        return local.run(session, frames, i, name)
    if kind in (LOCAL, RELAY, DENY, FLUSH) and name not in (b"PING", b"ECHO"):
        # Connection state must never change inside a block on a shared connection, and FLUSHALL must
        # run as the proxy's script (see guard.py).
        tx.failed = True
        session.reply(errors.NOT_IN_TRANSACTION)
        return i + 1
    table = session.pool.table
    spec = table.lookup(args) if table is not None else None
    if spec is None or (spec.arity > 0 and len(args) != spec.arity) or len(args) < -spec.arity:
        # Unknown command or wrong arity: Redis's own error (it runs nothing), and the transaction is
        # void, as in Redis.
        tx.failed = True
        session.send_commands([args])
        return i + 1
    slot = session.pool.slot_of(args)
    if slot is CROSSSLOT or (slot is not None and tx.slot is not None and slot != tx.slot):
        tx.failed = True
        session.reply(errors.CROSSSLOT)
        return i + 1
    if slot is not None:
        tx.slot = slot
    tx.commands.append(args)
    session.reply(QUEUED)
    return i + 1


def _exec(session, i: int) -> int:
    tx, session.tx = session.tx, None
    if tx.failed:
        session.reply(errors.EXECABORT)
        session.end_watch(clean=False)
        return i + 1
    pin = session.pin if session.pin is not None and session.pin.up else None
    if session.watching and pin is None:       # the watch's connection died: its state is gone
        session.end_watch(clean=False)
        session.reply(errors.upstream_unavailable("the connection holding WATCH was lost"))
        return i + 1
    request = MULTI + b"".join(map(encode_command, tx.commands)) + EXEC
    slot = session.order.add(session, len(tx.commands) + 2, _after_exec)
    if pin is not None:
        pin.send_direct(request, slot)
        return i + 1
    node = session.pool.node_for_slot(tx.slot) if tx.slot is not None else session.pool.any_node()
    conn = session._conn(node) if node is not None else None
    waiter = _TxWaiter(session, slot, tx)
    if conn is not None:
        conn.send_direct(request, waiter)
    else:
        waiter.retry(None, True)
    return i + 1


def _after_exec(slot, data):
    """A transaction's replies: MULTI's +OK and the +QUEUED were answered already; EXEC's stays."""
    session = slot.owner
    if session.watching:
        session.end_watch(clean=True)     # EXEC ran on the pin: Redis dropped the watch
    pos, _ = scan_replies(data, 0, slot.count - 1)
    return data[pos:]


class _TxWaiter:
    """The replies of MULTI ... EXEC on a shared connection; a block refused because its slot moved,
    or lost before it left, is sent again (nothing ran)."""

    __slots__ = ("session", "slot", "tx", "count")

    def __init__(self, session, slot, tx: Transaction):
        self.session, self.slot, self.tx = session, slot, tx
        self.count = len(tx.commands) + 2

    def on_reply(self, data) -> None:
        replies = split_replies(data, self.count)
        if any(r.startswith(_RETRY) for r in replies[1:-1]) or errors.is_upstream_lost(replies[-1]):
            self.retry(replies, False)
            return
        self.slot.on_reply(data)

    def partial(self, data, count: int) -> bool:
        return False

    def retry(self, replies, unsent: bool) -> None:
        session, tx = self.session, self.tx

        async def again():
            self.answer(await session.pool.transaction(tx.commands, session.proto, tx.slot, replies, unsent))
        session.host.background.spawn(again(), lambda: self.answer(errors.INTERNAL), "a transaction retry")

    def answer(self, reply: bytes) -> None:
        # The slot expects MULTI's and every command's reply before EXEC's (_after_exec drops them).
        self.slot.on_reply(OK + QUEUED * len(self.tx.commands) + reply)
