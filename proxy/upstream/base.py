"""The seams between the session and the upstream, as Protocols: what a session may ask of a pool (the
hooks where single node and cluster differ), of a connection, and what a connection asks of a waiter.

UpstreamPool (single.py) and ClusterPool (cluster.py) both satisfy Pool; the session only uses this.
"""

from __future__ import annotations

from typing import Any, Protocol

from ..protocol.commands import CommandTable


class Waiter(Protocol):
    """Receives `count` consecutive replies of one connection, as raw bytes."""

    count: int

    def on_reply(self, data: bytes) -> None: ...

    def partial(self, data: bytes, count: int) -> bool:
        """The first `count` replies of a big batch, early; False to wait for the whole batch."""


class Connection(Protocol):
    up: bool
    proto: int
    write_paused: bool
    blocked_sessions: set
    timeout_exempt: int
    relay_to: Any
    transport: Any

    @property
    def busy(self) -> bool:
        """Replies are still owed on this connection."""

    def send(self, data: bytes, waiter: Waiter) -> None: ...

    def send_direct(self, data: bytes, waiter: Waiter) -> None:
        """Like send(), without following cluster redirects (a transaction, a pinned connection)."""

    def send_raw(self, data: bytes) -> None:
        """Relay mode: bytes with no waiter."""

    def close(self) -> None: ...


class Node(Protocol):
    def pick(self, proto: int) -> Connection | None: ...


class Pool(Protocol):
    cluster: bool
    table: CommandTable | None      # the upstream's COMMAND, once read
    reason: str                     # why it is unavailable, for clients (no addresses, no secrets)
    server_version: str

    def node_for(self, args: list[bytes]) -> Node | None:
        """The node whose shared connection takes this command; None: run() decides (slow path)."""

    def node_for_key(self, key: bytes) -> Node | None: ...

    def node_for_slot(self, slot: int, readonly: bool = False) -> Node | None: ...

    def any_node(self) -> Node | None: ...

    def slot_of(self, args: list[bytes]) -> Any:
        """The one slot of the command's keys, None without keys, placement.CROSSSLOT across slots."""

    def first_key(self, args: list[bytes]) -> bytes | None: ...

    def relay_key(self, args: list[bytes]) -> bytes | None: ...

    def refusal(self, name: bytes, args: list[bytes]) -> bytes | None:
        """An error reply for what this kind of upstream cannot do through a proxy, else None."""

    async def run(self, args: list[bytes], proto: int = 2) -> bytes:
        """One command wherever it must go (split, fanned out, after a reconnect); its raw reply."""

    async def run_everywhere(self, args: list[bytes], proto: int = 2) -> list[bytes]: ...

    async def transaction(self, commands: list, proto: int, slot: int | None, first: list[bytes] | None = None,
                          unsent: bool = False) -> bytes: ...

    def take_free(self, proto: int, key: bytes | None = None) -> Connection | None: ...

    async def get_dedicated(self, proto: int, key: bytes | None = None) -> Connection: ...

    def release(self, conn: Connection, clean: bool) -> None: ...
