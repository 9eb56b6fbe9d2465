"""The command table: everything the proxy knows about commands, in one place.

Two halves:
- What the proxy does with a command name (its *kind*, below), fixed here. Kinds are small ints
  compared on the hot path:
    PASS      forwarded as raw bytes on a shared, multiplexed upstream connection (the default, also for
              commands this table does not know: new Redis commands and modules keep working)
    LOCAL     answered by the proxy itself (PING, ECHO, AUTH, HELLO, QUIT, RESET, SELECT, CLIENT, the
              unsubscribe family outside pub/sub ...): they would change a shared connection's state or
              its number of replies
    PIN       carries connection state: a dedicated upstream connection until the state ends (WATCH,
              blocking commands, SELECT n)
    RELAY     the connection becomes a byte relay on a dedicated upstream connection (pub/sub, MONITOR,
              SYNC/PSYNC/REPLCONF, CLIENT TRACKING on, CLIENT REPLY off: replies no longer pair with
              requests)
    DENY      not supported through a proxy (SHUTDOWN)
    TX        MULTI/EXEC/DISCARD/WATCH/UNWATCH: queued by the session, sent as one block
    FLUSH     FLUSHALL/FLUSHDB/SWAPDB: the whole keyspace; the proxy's own state survives them
              (session/guard.py)
    LISTKEYS  KEYS/SCAN: the proxy's own keys are filtered out of the reply
    ROUTED    a read or write the router may own (only when routes are configured)
- What the upstream says about each command (its `COMMAND` reply, read when the pool connects):
  arity, flags, key positions (first/last/step, or key specs for movable keys: EVAL numkeys,
  ZUNIONSTORE, XREAD ... STREAMS), ACL categories and routing tips. New commands and modules get
  correct key positions without a table here. `CommandTable` is that half.

Routed commands' key shapes (which arguments are keys) are `routed_keys()` below; everything else asks
the CommandTable.
"""

from __future__ import annotations

PASS, LOCAL, PIN, RELAY, DENY, ROUTED, TX, FLUSH, LISTKEYS = range(9)
KIND_NAMES = ("pass-through", "local", "pinned", "relay", "denied", "routed", "transaction", "flush",
              "key-listing", "protocol-error")
FAIL = len(KIND_NAMES) - 1      # the kind of a frame the parser refused (answered, then the client is closed)

LOCAL_COMMANDS = ("PING", "ECHO", "AUTH", "HELLO", "QUIT", "RESET", "SELECT", "CLIENT", "UNSUBSCRIBE",
                  "PUNSUBSCRIBE", "SUNSUBSCRIBE", "ASKING", "READONLY", "READWRITE")

PIN_COMMANDS = (
    "BLPOP", "BRPOP", "BRPOPLPUSH", "BLMOVE", "BLMPOP", "BZPOPMIN", "BZPOPMAX", "BZMPOP",
    "WAIT", "WAITAOF", "XREAD", "XREADGROUP",
)

# Commands that block the connection: pinned, and exempt from the upstream command timeout.
BLOCKING = frozenset(c.encode() for c in PIN_COMMANDS)

# SYNC/PSYNC stream the dataset then every write (a replica's view: tools that read it); REPLCONF
# comes before PSYNC in a replica's handshake.
RELAY_COMMANDS = ("SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE", "MONITOR", "SYNC", "PSYNC", "REPLCONF")

DENY_COMMANDS = ("SHUTDOWN",)   # an app must not stop the shared Redis

TX_COMMANDS = ("MULTI", "EXEC", "DISCARD", "WATCH", "UNWATCH")

FLUSH_COMMANDS = ("FLUSHALL", "FLUSHDB", "SWAPDB")

LISTKEYS_COMMANDS = ("KEYS", "SCAN")

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
    "EVAL", "EVALSHA", "SCRIPT", "PUBLISH", "SPUBLISH", "DBSIZE", "INFO", "TIME",
    "COMMAND", "TOUCH", "OBJECT", "MEMORY", "CONFIG", "DEBUG", "LATENCY", "SLOWLOG", "LOLWUT",
)


def _build() -> dict:
    table: dict = {}
    for names, kind in ((_COMMON_PASS, PASS), (LOCAL_COMMANDS, LOCAL), (PIN_COMMANDS, PIN),
                        (RELAY_COMMANDS, RELAY), (DENY_COMMANDS, DENY), (TX_COMMANDS, TX),
                        (FLUSH_COMMANDS, FLUSH), (LISTKEYS_COMMANDS, LISTKEYS)):
        for name in names:
            table[name.encode()] = kind
            table[name.lower().encode()] = kind
    return table


TABLE: dict = _build()


def kind_of(table: dict, name: bytes) -> int:
    kind = table.get(name)
    if kind is None:
        kind = table.get(name.upper(), PASS)
    return kind


def with_routed(names) -> dict:
    """The table with `names` (the commands routes may own) as ROUTED."""
    table = dict(TABLE)
    for name in names:
        table[name] = table[name.lower()] = ROUTED
    return table


def is_blocking(name: bytes, args: list[bytes]) -> bool:
    """True when this command would block its connection (XREAD/XREADGROUP only with BLOCK)."""
    if name in (b"XREAD", b"XREADGROUP"):
        return any(a.upper() == b"BLOCK" for a in args[1:-1])
    return name in BLOCKING


# Arity of the commands the proxy answers itself: (minimum, maximum or None), the name included.
LOCAL_ARITY = {
    b"PING": (1, 2), b"ECHO": (2, 2), b"AUTH": (2, 3), b"HELLO": (1, None), b"QUIT": (1, None),
    b"RESET": (1, 1), b"SELECT": (2, 2), b"CLIENT": (2, None), b"UNSUBSCRIBE": (1, None),
    b"PUNSUBSCRIBE": (1, None), b"SUNSUBSCRIBE": (1, None), b"ASKING": (1, 1), b"READONLY": (1, 1),
    b"READWRITE": (1, 1), b"MULTI": (1, 1), b"EXEC": (1, 1), b"DISCARD": (1, 1), b"WATCH": (2, None),
    b"UNWATCH": (1, 1), b"FLUSHALL": (1, 2), b"FLUSHDB": (1, 2),
}


def arity_ok(name: bytes, args: list[bytes]) -> bool:
    bounds = LOCAL_ARITY.get(name)
    if bounds is None:
        return True
    low, high = bounds
    return low <= len(args) and (high is None or len(args) <= high)


# -- routed commands: which arguments are keys -----------------------------------------------------

# command -> (encoding family the key must have, nil reply is ambiguous without PTTL)
SINGLE_READS = {
    b"GET": ("value", False), b"GETEX": ("value", False),
    b"HGETALL": ("hash", False), b"HLEN": ("hash", False),
    b"HGET": ("hash", True), b"HMGET": ("hash", True), b"HEXISTS": ("hash", True),
    b"TTL": (None, False), b"PTTL": (None, False),
}
MULTI_READS = (b"MGET", b"EXISTS")
WRITES_ALL_KEYS = (b"DEL", b"UNLINK")
WRITES_PAIRS = (b"MSET",)
WRITES_FIRST_KEY = (
    b"SET", b"SETEX", b"PSETEX", b"SETNX", b"GETSET", b"GETDEL", b"APPEND", b"SETRANGE",
    b"INCR", b"INCRBY", b"DECR", b"DECRBY", b"INCRBYFLOAT",
    b"HSET", b"HMSET", b"HSETNX", b"HDEL", b"HINCRBY", b"HINCRBYFLOAT",
    b"EXPIRE", b"PEXPIRE", b"EXPIREAT", b"PEXPIREAT", b"PERSIST",
)
ROUTED_COMMANDS = tuple(SINGLE_READS) + MULTI_READS + WRITES_ALL_KEYS + WRITES_PAIRS + WRITES_FIRST_KEY


def routed_keys(name: bytes, args: list[bytes]) -> list[bytes]:
    """The keys of a routed command (`name` upper case): MSET's every other argument, DEL/UNLINK/MGET/
    EXISTS all of them, the others the first."""
    if name in WRITES_PAIRS:
        return args[1::2]
    if name in WRITES_ALL_KEYS or name in MULTI_READS:
        return args[1:]
    return args[1:2]


# -- what the upstream says: its COMMAND reply -----------------------------------------------------

class Spec:
    """One command (or subcommand) as the upstream's COMMAND describes it."""

    __slots__ = ("name", "arity", "first", "last", "step", "movable", "key_specs", "readonly", "blocking",
                 "subs", "request", "response", "categories")

    def __init__(self, entry: list):
        self.name = entry[0].lower()
        self.arity = entry[1]
        flags = set(entry[2])
        self.first, self.last, self.step = entry[3], entry[4], entry[5]
        self.movable = b"movablekeys" in flags
        self.readonly = b"readonly" in flags
        self.blocking = b"blocking" in flags
        self.categories = frozenset(c.lstrip(b"@").lower() for c in entry[6]) if len(entry) > 6 else frozenset()
        tips = entry[7] if len(entry) > 7 else []
        self.request = self.response = None
        for tip in tips:
            if tip.startswith(b"request_policy:"):
                self.request = tip.split(b":", 1)[1]
            elif tip.startswith(b"response_policy:"):
                self.response = tip.split(b":", 1)[1]
        self.key_specs = [_spec_dict(s) for s in entry[8]] if len(entry) > 8 and entry[8] else []
        self.subs: dict[bytes, Spec] = {}
        if len(entry) > 9 and entry[9]:
            for sub in entry[9]:
                spec = Spec(sub)
                self.subs[spec.name.split(b"|", 1)[1]] = spec


def _spec_dict(flat) -> dict:
    """RESP2 flattens maps into [k1, v1, k2, v2 ...]; nested ones too."""
    if not isinstance(flat, list) or len(flat) % 2:
        return {}
    out = {}
    for key, value in zip(flat[::2], flat[1::2], strict=True):
        if isinstance(value, list) and key in (b"begin_search", b"find_keys", b"spec"):
            value = _spec_dict(value)
        out[key] = value
    return out


class CommandTable:
    """Key positions and routing tips of every command the upstream knows (from its COMMAND reply)."""

    def __init__(self, reply: list):
        self.specs: dict[bytes, Spec] = {}
        for entry in reply:
            if isinstance(entry, list) and len(entry) >= 6:
                spec = Spec(entry)
                self.specs[spec.name] = spec
                self.specs[spec.name.upper()] = spec

    def lookup(self, args: list[bytes]) -> Spec | None:
        spec = self.specs.get(args[0])
        if spec is None:
            spec = self.specs.get(args[0].lower())
            if spec is None:
                return None
        if spec.subs and len(args) > 1:
            return spec.subs.get(args[1].lower(), spec)
        return spec

    def keys(self, args: list[bytes]) -> list[bytes] | None:
        """The keys of a command, or None when the table cannot tell (unknown, wrong arity, bad
        numkeys): such a command is sent to any node and Redis answers it."""
        spec = self.lookup(args)
        if spec is None:
            return None
        return keys_of(spec, args)

    def readonly(self, args: list[bytes]) -> bool:
        spec = self.lookup(args)
        return spec is not None and spec.readonly

    def stateful(self, args: list[bytes]) -> bool:
        """Commands a redirect must not move to a shared connection: blocking ones, transactions."""
        spec = self.lookup(args)
        return spec is None or spec.blocking or spec.name in (b"watch", b"unwatch", b"multi", b"exec", b"discard")


def keys_of(spec: Spec, args: list[bytes]) -> list[bytes] | None:
    n = len(args)
    arity = spec.arity
    if (arity > 0 and n != arity) or n < -arity:
        return None
    if not spec.movable:
        first = spec.first
        if first <= 0:
            return []
        last = spec.last
        if last < 0:
            last += n
        return args[first:last + 1:spec.step]
    keys: list[bytes] = []
    for ks in spec.key_specs:
        positions = _spec_positions(ks, args)
        if positions is None:
            return None
        keys.extend(args[i] for i in positions)
    return keys


def _spec_positions(ks: dict, args: list[bytes]) -> list[int] | None:
    """Key positions by one key spec, as Redis computes them (db.c, getKeysUsingKeySpecs).
    [] when the spec does not apply (keyword absent, unknown spec); None on a malformed command."""
    argc = len(args)
    begin, find = ks.get(b"begin_search", {}), ks.get(b"find_keys", {})
    bspec, fspec = begin.get(b"spec", {}), find.get(b"spec", {})
    if begin.get(b"type") == b"index":
        first = bspec.get(b"index", 0)
    elif begin.get(b"type") == b"keyword":
        keyword = bspec.get(b"keyword", b"").upper()
        start = bspec.get(b"startfrom", 1)
        indexes = range(start, argc) if start > 0 else range(argc + start, 0, -1)
        first = next((i + 1 for i in indexes if 1 <= i < argc and args[i].upper() == keyword), 0)
        if not first:
            return []
    else:
        return []       # "unknown" specs (SORT BY/GET patterns): Redis itself cannot place them
    if find.get(b"type") == b"range":
        step = fspec.get(b"keystep", 1) or 1
        lastkey, limit = fspec.get(b"lastkey", 0), fspec.get(b"limit", 0)
        if lastkey >= 0:
            last = first + lastkey
        elif not limit:
            last = argc + lastkey
        else:
            last = first + ((argc - first) // limit + lastkey)
    elif find.get(b"type") == b"keynum":
        step = fspec.get(b"keystep", 1) or 1
        index = first + fspec.get(b"keynumidx", 0)
        if index >= argc:
            return None
        try:
            numkeys = int(args[index])
        except ValueError:
            return None
        if numkeys < 0:
            return None
        first += fspec.get(b"firstkey", 1)
        last = first + numkeys - 1
        if numkeys == 0:
            return []
    else:
        return []
    if last >= argc or last < first or first >= argc:
        return None
    return list(range(first, last + 1, step))


