"""Every error line a client can see, and the predicates that recognise them.

Rules of this module:
- Client-visible errors are built here and nowhere else, so rewording one never changes behaviour:
  code that must tell errors apart (retry an upstream loss, count a backend failure) asks a
  predicate below instead of matching text.
- The text says whose fault it is, as Redis does: the client's mistake in Redis's own words
  (ERR wrong number of arguments ..., WRONGTYPE ..., NOAUTH ...); the proxy's or a server's trouble
  as "upstream unavailable" / "backend NAME unavailable" with a reason that never carries a secret
  or an internal address.
- An error is one line: CR and LF inside a message become spaces.
"""

from __future__ import annotations


def line(message: str) -> bytes:
    """An error reply; `message` starts with its code (ERR, WRONGTYPE, NOAUTH ...)."""
    return b"-" + message.replace("\r", " ").replace("\n", " ").encode() + b"\r\n"


def _name(command: bytes | str) -> str:
    text = command.decode(errors="replace") if isinstance(command, bytes) else command
    return text.lower()


# -- the client's mistakes (Redis's own wording) -----------------------------------------------------

NOAUTH = line("NOAUTH Authentication required.")
WRONGPASS = line("WRONGPASS invalid username-password pair or user is disabled.")
WRONGTYPE = line("WRONGTYPE Operation against a key holding the wrong kind of value")
CROSSSLOT = line("CROSSSLOT Keys in request don't hash to the same slot")
EXECABORT = line("EXECABORT Transaction discarded because of previous errors.")
NOT_INTEGER = line("ERR value is not an integer or out of range")
NOT_FLOAT = line("ERR value is not a valid float")
OFFSET_OUT_OF_RANGE = line("ERR offset is out of range")
SYNTAX = line("ERR syntax error")
MAX_CLIENTS = line("ERR max number of clients reached")


def wrong_arity(command: bytes | str) -> bytes:
    return line(f"ERR wrong number of arguments for '{_name(command)}' command")


def invalid_expire(command: bytes | str) -> bytes:
    return line(f"ERR invalid expire time in '{_name(command)}' command")


def protocol_error(message: str) -> bytes:
    return line(f"ERR Protocol error: {message}")


def unknown_subcommand(command: bytes | str, sub: bytes | str) -> bytes:
    sub_text = sub.decode(errors="replace") if isinstance(sub, bytes) else sub
    return line(f"ERR unknown subcommand '{sub_text}'. Try {_name(command).upper()} HELP.")


def not_supported(command: bytes | str) -> bytes:
    return line(f"ERR command '{_name(command).upper()}' is not supported by cacheproxy")


def refused(reason: str) -> bytes:
    """A command the proxy refuses for a reason of its own (reserved keys, a rule of a route ...)."""
    return line(f"ERR {reason}")


def bad_value(route: str, reason: str) -> bytes:
    """The client's value cannot be stored by the route (not JSON, a field missing ...)."""
    return line(f"ERR value for route {route!r}: {reason}; nothing was written")


def queue_full(depth: int, partition: int, max_pending: int) -> bytes:
    return line(f"ERR write-behind queue full: {depth} writes wait in partition {partition} "
                f"(write_behind.max_pending {max_pending}); retry later")


# -- trouble on the proxy's side -------------------------------------------------------------------

UPSTREAM_LOST_PREFIX = b"-ERR upstream unavailable"
INTERNAL = line("ERR internal proxy error")


def upstream_unavailable(reason: str = "") -> bytes:
    """The upstream Redis cannot take the command now; `reason` must not name hosts or secrets."""
    return line(f"ERR upstream unavailable: {reason}" if reason else "ERR upstream unavailable")


def is_upstream_lost(reply: bytes | bytearray | memoryview) -> bool:
    """Is this reply (or the first of a batch) the proxy's own "upstream unavailable" error?"""
    return bytes(reply[:len(UPSTREAM_LOST_PREFIX)]) == UPSTREAM_LOST_PREFIX


def backend_unavailable(backend: str, reason: str) -> bytes:
    return line(f"ERR backend {backend} unavailable: {reason}")


def backend_refused(backend: str, reason: str) -> bytes:
    return line(f"ERR backend {backend} refused the write: {reason}")
