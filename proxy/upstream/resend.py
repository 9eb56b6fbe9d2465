"""Which requests may be sent again after their connection died without answering them.

A connection that dies (Redis restarted, failed over, `CLIENT KILL`) takes the replies of every request
in flight on it with it. A direct client would see a ConnectionError and its library would retry; a
proxy client keeps its connection, so the proxy decides, and must never run anything twice:

- requests that never left the proxy (still queued for the next write) are sent again, whatever they do;
- requests that may have reached Redis are sent again only when every command in them is read-only
  by the upstream's COMMAND table (flag `readonly`): running one twice changes nothing;
- anything else (a write that may have run, a command the table does not know, a request over
  RESEND_MAX_BYTES) gets the error.

Sans-IO: this module only decides; the session sends (session.py, upstream_lost).
"""

from __future__ import annotations

import hiredis

from ..protocol.commands import CommandTable
from ..protocol.resp import encode_command, parse_requests

MAX_RESENDS = 2     # a request lost on this many connections in a row gets the error
# Requests are kept for a resend only up to this size: reads are small, and holding a big write's bytes
# until its reply would double the memory it takes (a big request lost on the wire gets the error).
RESEND_MAX_BYTES = 1 << 20


def resendable(table: CommandTable | None, request: bytes | None, count: int, unsent: bool) -> bytes | None:
    """The bytes to send again for the last `count` commands of `request` (the earlier ones were answered
    already), or None when that could run a write twice."""
    if request is None or count <= 0:
        return None
    try:
        commands = parse_requests(request)
    except hiredis.ProtocolError:
        return None
    if len(commands) < count or any(not isinstance(c, list) or not c for c in commands):
        return None
    if len(commands) > count:
        # Some replies were streamed to the client already: only the rest goes again.
        commands = commands[-count:]
        request = b"".join(map(encode_command, commands))
    if unsent:
        return request
    if table is None or not all(table.readonly(c) for c in commands):
        return None
    return request

