"""MONITOR through the proxy: Redis's own stream, plus the commands the proxy answers itself.

A client in MONITOR mode is a relay: Redis streams every command it runs. Commands the proxy answers
itself (PING, ECHO, local CLIENT subcommands, SELECT of the current db, QUIT, RESET ...) never reach
Redis, so their lines are written into every monitoring client's stream by the proxy, in Redis's format:

    +<unix time with 6 decimals> [<db> <client address>] "<name>" "<arg>" ...

with arguments quoted as Redis quotes them (sdscatrepr). Rules:
- A line goes in only between two of Redis's lines (a relayed read may end inside one); until then it
  waits in that monitor's queue (Monitoring.lines).
- AUTH and HELLO are not shown (Redis redacts their arguments; the proxy leaves them out).
- Nothing is done while no client monitors: one set test per local command.
"""

from __future__ import annotations

import time

_HIDDEN = (b"AUTH", b"HELLO")
_ESCAPES = {ord("\\"): "\\\\", ord('"'): '\\"', ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t",
            7: "\\a", 8: "\\b"}


class Monitoring:
    """One monitoring client's state: MONITOR sent, then active once Redis's +OK came back."""

    __slots__ = ("active", "at_line_end", "lines")

    def __init__(self) -> None:
        self.active = False         # Redis answered MONITOR: lines may follow
        self.at_line_end = True     # the relayed stream ends at a line boundary
        self.lines: list[bytes] = []   # the proxy's lines waiting for a boundary


class Monitors:
    """The proxy's monitoring clients (sessions with `monitoring` active)."""

    def __init__(self) -> None:
        self.sessions: set = set()

    def feed(self, session, name: bytes, args: list[bytes], address: str) -> None:
        """`session` ran `args` (answered by the proxy): tell every monitoring client."""
        if name in _HIDDEN:
            return
        line = encode_line(time.time(), session.db, address, args)
        for monitor in list(self.sessions):
            monitor.monitor_line(line)


def encode_line(now: float, db: int, address: str, args: list[bytes]) -> bytes:
    quoted = " ".join(quote(a) for a in args)
    return f"+{now:.6f} [{db} {address}] {quoted}\r\n".encode("latin-1")


def quote(arg: bytes) -> str:
    """An argument as Redis's sdscatrepr writes it: quoted, escaped, \\xHH for unprintable bytes."""
    out = ['"']
    for byte in arg:
        escape = _ESCAPES.get(byte)
        if escape is not None:
            out.append(escape)
        elif 32 <= byte < 127:
            out.append(chr(byte))
        else:
            out.append(f"\\x{byte:02x}")
    out.append('"')
    return "".join(out)
