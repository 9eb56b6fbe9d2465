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
    """The reply to a request the parser refused (the connection closes after it), byte for byte what
    Redis sends: a byte quoted from the request (expected '$', got '\x80') goes out as that one byte."""
    text = f"ERR Protocol error: {message}".replace("\r", " ").replace("\n", " ")
    return b"-" + text.encode("latin-1", "replace") + b"\r\n"


# The parser's words after "ERR Protocol error: " (proxy/protocol/request.py). All but the last are
# Redis 7's own (networking.c), so a client sees what Redis would have said at the same point.
PROTO_INVALID_MULTIBULK = "invalid multibulk length"
PROTO_INVALID_BULK = "invalid bulk length"
PROTO_UNAUTH_MULTIBULK = "unauthenticated multibulk length"
PROTO_UNAUTH_BULK = "unauthenticated bulk length"
PROTO_TOO_BIG_MBULK = "too big mbulk count string"
PROTO_TOO_BIG_BULK = "too big bulk count string"
PROTO_TOO_BIG_INLINE = "too big inline request"
PROTO_UNBALANCED_QUOTES = "unbalanced quotes in request"
# Redis closes a client past client-query-buffer-limit without a word; the proxy says why.
PROTO_QUERY_BUFFER = "request too big for the query buffer (limits.max_query_buffer)"
# For the session/server to give the client it drops when all clients' unfinished requests together
# pass limits.max_query_buffer_total (RequestParser.buffered adds up to that total).
PROTO_QUERY_BUFFER_TOTAL = "too many bytes of unfinished requests in the proxy (limits.max_query_buffer_total)"


def proto_expected_bulk(got: int) -> str:
    """A multibulk element that does not start with '$' (Redis: "expected '$', got '%c'")."""
    return f"expected '$', got '{chr(got)}'"


def unknown_subcommand(command: bytes | str, sub: bytes | str) -> bytes:
    sub_text = sub.decode(errors="replace") if isinstance(sub, bytes) else sub
    return line(f"ERR unknown subcommand '{sub_text}'. Try {_name(command).upper()} HELP.")


def not_supported(command: bytes | str) -> bytes:
    return line(f"ERR command '{_name(command).upper()}' is not supported by cacheproxy")


def cluster_node_local(command: bytes) -> bytes:
    shown = command.decode(errors="replace").replace("|", " ").upper()
    return line(f"ERR cacheproxy cluster mode: '{shown}' acts on a single node's state; send it to the nodes "
                "directly")


def cluster_per_node(command: bytes) -> bytes:
    shown = command.decode(errors="replace").replace("|", " ").upper()
    return line(f"ERR cacheproxy cluster mode: '{shown}' has a per-node answer; send it to the nodes directly")


TRACKING_REDIRECT_UNKNOWN = line("ERR The client ID you want redirect to does not exist")
TRACKING_REDIRECT_NOT_SUBSCRIBED = line(
    "ERR cacheproxy: CLIENT TRACKING REDIRECT needs a target client that is subscribed through the proxy "
    "(SUBSCRIBE __redis__:invalidate, or any SUBSCRIBE in RESP3) before tracking is turned on")
TRACKING_REDIRECT_CLUSTER = line(
    "ERR cacheproxy cluster mode: CLIENT TRACKING REDIRECT is not supported (the two clients' connections may "
    "be on different nodes); use tracking without REDIRECT (RESP3 pushes)")


def request_timeout(seconds: float) -> bytes:
    return line(f"ERR request not completed within {seconds:g} s (limits.request_timeout)")


def refused(reason: str) -> bytes:
    """A command the proxy refuses for a reason of its own (reserved keys, a rule of a route ...)."""
    return line(f"ERR {reason}")


def bad_value(route: str, reason: str) -> bytes:
    """The client's value cannot be stored by the route (not JSON, a field missing ...)."""
    return line(f"ERR value for route {route!r}: {reason}; nothing was written")


def queue_full(depth: int, partition: int, max_pending: int) -> bytes:
    return line(f"ERR write-behind queue full: {depth} writes wait in partition {partition} "
                f"(write_behind.max_pending {max_pending}); retry later")


# -- the client's mistakes the proxy answers itself (Redis's wording) ------------------------------

AUTH_WITHOUT_PASSWORD = line("ERR AUTH <password> called without any password configured for the default user. "
                             "Are you sure your configuration is correct?")
HELLO_PROTO_NOT_INTEGER = line("ERR Protocol version is not an integer or out of range")
NOPROTO = line("NOPROTO unsupported protocol version")
HELLO_NOAUTH = line("NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO "
                    "<proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP "
                    "protocol version at the same time")
BAD_CLIENT_NAME = line("ERR Client names cannot contain spaces, newlines or special characters.")
INVALID_CLIENT_ID = line("ERR Invalid client ID")
NO_SUCH_CLIENT = line("ERR No such client")
CLIENT_ID_NOT_POSITIVE = line("ERR client-id should be greater than 0")
MULTI_NESTED = line("ERR MULTI calls can not be nested")
WATCH_IN_MULTI = line("ERR WATCH inside MULTI is not allowed")
NOT_IN_TRANSACTION = line("ERR Command not allowed inside a transaction")
SELECT_IN_CLUSTER = line("ERR SELECT is not allowed in cluster mode")
INVALID_CURSOR = line("ERR invalid cursor")
HELLO_AUTH_IN_RELAY = line("ERR cacheproxy: HELLO AUTH is not supported after SUBSCRIBE, MONITOR or CLIENT "
                           "TRACKING; send AUTH first")


def hello_syntax(option: bytes) -> bytes:
    return line(f"ERR Syntax error in HELLO option '{option.decode(errors='replace')}'")


def unrecognized_option(option: bytes) -> bytes:
    return line(f"ERR Unrecognized option '{option.decode(errors='replace')}'")


def unknown_client_type(kind: bytes) -> bytes:
    return line(f"ERR Unknown client type '{kind.decode(errors='replace')}'")


def without_multi(command: bytes) -> bytes:
    return line(f"ERR {command.decode(errors='replace').upper()} without MULTI")


def failed(message: str) -> bytes:
    """The proxy's own failure carried to a client as an ERR line (e.g. a connection lost)."""
    return line(f"ERR {message}")


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


def backend_busy(backend: str, reason: str) -> bytes:
    """Every connection the proxy may open to the backend is in use: the proxy's own saturation, not
    a failure of the database (the client may retry)."""
    return line(f"ERR backend {backend} busy: {reason}")


def backend_read_failed(backend: str, reason: str) -> bytes:
    """The backend answered, but the read cannot work for this key (bad SQL, a row the route cannot
    encode ...): retrying does not help; the reason says what to fix."""
    return line(f"ERR backend {backend} cannot answer for this key: {reason}")


def write_behind_refused(reason: str) -> bytes:
    """A write-behind write refused because the upstream could lose the queue (upstream.durability)."""
    return line(f"ERR write-behind refused: {reason}")
