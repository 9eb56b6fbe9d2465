"""The command table: what the proxy does with each command name.

Kinds (small ints, compared on the hot path):
  PASS     forwarded as raw bytes on a shared, multiplexed upstream connection (the default, also for
           commands this table does not know: new Redis commands and modules keep working)
  LOCAL    answered by the proxy itself (PING, ECHO, AUTH, HELLO, QUIT, RESET, SELECT, CLIENT ...)
  PIN      carries connection state: the client gets a dedicated upstream connection until the
           state ends (MULTI/WATCH, blocking commands, SELECT n, CLIENT SETNAME)
  RELAY    the connection becomes a byte relay to a dedicated upstream connection until the client
           leaves (pub/sub, MONITOR, CLIENT TRACKING/REPLY: replies no longer pair with requests)
  DENY     not supported through a proxy (replication handshakes, SHUTDOWN)
  ROUTED   a read or write the router may own (only when routes are configured; see router.py)
"""

from __future__ import annotations

PASS, LOCAL, PIN, RELAY, DENY, ROUTED = 0, 1, 2, 3, 4, 5

LOCAL_COMMANDS = ("PING", "ECHO", "AUTH", "HELLO", "QUIT", "RESET", "SELECT", "CLIENT")

# MULTI and WATCH pin; EXEC/DISCARD/UNWATCH end that state (they pass through when nothing is pinned,
# so Redis gives its usual "EXEC without MULTI").
PIN_COMMANDS = (
    "MULTI", "WATCH",
    "BLPOP", "BRPOP", "BRPOPLPUSH", "BLMOVE", "BLMPOP", "BZPOPMIN", "BZPOPMAX", "BZMPOP",
    "WAIT", "WAITAOF", "XREAD", "XREADGROUP",
)

# Commands that block the connection: pinned, and exempt from the upstream command timeout.
BLOCKING = frozenset(c.encode() for c in (
    "BLPOP", "BRPOP", "BRPOPLPUSH", "BLMOVE", "BLMPOP", "BZPOPMIN", "BZPOPMAX", "BZMPOP",
    "WAIT", "WAITAOF", "XREAD", "XREADGROUP",
))

RELAY_COMMANDS = ("SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE", "MONITOR")

DENY_COMMANDS = ("SYNC", "PSYNC", "REPLCONF", "SHUTDOWN")   # SHUTDOWN: an app must not stop the shared Redis

# Common commands listed so the hot path finds them with one exact-case dict lookup.
_COMMON_PASS = (
    "GET", "SET", "SETEX", "PSETEX", "SETNX", "GETEX", "GETDEL", "GETSET", "MGET", "MSET", "MSETNX",
    "DEL", "UNLINK", "EXISTS", "EXPIRE", "PEXPIRE", "EXPIREAT", "TTL", "PTTL", "PERSIST", "TYPE",
    "INCR", "INCRBY", "INCRBYFLOAT", "DECR", "DECRBY", "APPEND", "STRLEN", "GETRANGE", "SETRANGE",
    "HGET", "HSET", "HMSET", "HMGET", "HGETALL", "HDEL", "HEXISTS", "HLEN", "HINCRBY", "HKEYS", "HVALS",
    "LPUSH", "RPUSH", "LPOP", "RPOP", "LRANGE", "LLEN", "LINDEX", "LREM", "LTRIM", "LSET",
    "SADD", "SREM", "SMEMBERS", "SISMEMBER", "SCARD", "SPOP", "SINTER", "SUNION",
    "ZADD", "ZINCRBY", "ZSCORE", "ZRANGE", "ZREVRANGE", "ZRANK", "ZREVRANK", "ZREM", "ZCARD",
    "ZRANGEBYSCORE", "XADD", "XRANGE", "XREVRANGE", "XLEN", "XACK", "XDEL", "XTRIM", "XGROUP",
    "EVAL", "EVALSHA", "SCRIPT", "PUBLISH", "SPUBLISH", "KEYS", "SCAN", "DBSIZE", "INFO", "TIME",
    "EXEC", "DISCARD", "UNWATCH", "UNSUBSCRIBE", "PUNSUBSCRIBE", "SUNSUBSCRIBE", "COMMAND", "TOUCH",
    "FLUSHDB", "FLUSHALL", "OBJECT", "MEMORY", "CONFIG", "DEBUG", "LATENCY", "SLOWLOG", "LOLWUT",
)


def _build() -> dict[bytes, int]:
    table: dict[bytes, int] = {}
    for names, kind in ((_COMMON_PASS, PASS), (LOCAL_COMMANDS, LOCAL), (PIN_COMMANDS, PIN),
                        (RELAY_COMMANDS, RELAY), (DENY_COMMANDS, DENY)):
        for name in names:
            table[name.encode()] = kind
            table[name.lower().encode()] = kind
    return table


TABLE: dict[bytes, int] = _build()


def kind_of(table: dict[bytes, int], name: bytes) -> int:
    kind = table.get(name)
    if kind is None:
        kind = table.get(name.upper(), PASS)
    return kind


def is_blocking(name: bytes, args: list[bytes]) -> bool:
    """True when this command would block its connection (XREAD/XREADGROUP only with BLOCK)."""
    if name in (b"XREAD", b"XREADGROUP"):
        return any(a.upper() == b"BLOCK" for a in args[1:-1])
    return name in BLOCKING


# Arity of the commands the proxy answers itself: (minimum, maximum or None).
LOCAL_ARITY = {
    b"PING": (1, 2), b"ECHO": (2, 2), b"AUTH": (2, 3), b"HELLO": (1, None), b"QUIT": (1, None),
    b"RESET": (1, 1), b"SELECT": (2, 2), b"CLIENT": (2, None),
}


def arity_error(name: bytes, args: list[bytes]) -> str | None:
    bounds = LOCAL_ARITY.get(name)
    if bounds is None:
        return None
    low, high = bounds
    if len(args) < low or (high is not None and len(args) > high):
        return f"ERR wrong number of arguments for '{name.decode().lower()}' command"
    return None
