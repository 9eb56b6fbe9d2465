"""Cluster mode: where a command's keys are, which node(s) it goes to, and how split replies merge.

Rules of this module (sans-IO: no sockets, no asyncio):
- Key positions and flags come from the upstream's own `COMMAND` reply, read at startup: first/last/
  step for ordinary commands, key specs for commands with movable keys (EVAL/EVALSHA/FCALL numkeys,
  ZUNIONSTORE, XREAD ... STREAMS, GEORADIUS ... STORE). New commands and modules route correctly
  without a table here.
- `place(args)` says where a command goes: one slot, any master, split across slots (MGET, MSET, DEL,
  UNLINK, EXISTS, TOUCH), fanned out to every master (or every node) with a merge rule, or an error
  the proxy answers at once (CROSSSLOT, node-local admin commands). The fan-out and merge rules are
  Redis's own command tips (request_policy / response_policy).
- A command the table cannot read (unknown, wrong arity, a bad numkeys) goes to any master: Redis
  then answers with its own error, or with MOVED, which the pool follows. Nothing here raises on bad
  input.
- Merges work on raw reply bytes (RESP2 and RESP3 alike): split replies are cut with scan_replies
  and reassembled in the order of the client's keys.
"""

from __future__ import annotations

import random

from redis.crc import key_slot

from ..protocol.resp import error, scan_replies

CROSSSLOT = error("CROSSSLOT Keys in request don't hash to the same slot")

# Kinds of placement returned by place().
SLOT, ANY, SPLIT, FANOUT, ERROR, SCAN, ONE = range(7)

# Commands split by slot when their keys span several slots (others get CROSSSLOT): name -> merge.
SPLITTABLE = {b"mget": "index", b"mset": "ok", b"del": "sum", b"unlink": "sum", b"exists": "sum",
              b"touch": "sum"}

# Keyless commands that act on one node's private state: through a proxy over many nodes they would
# silently act on a random one, so they are refused with a clear error.
NODE_LOCAL = frozenset((
    b"save", b"bgsave", b"bgrewriteaof", b"lastsave", b"debug", b"replicaof", b"slaveof", b"failover",
    b"swapdb", b"monitor", b"wait", b"waitaof", b"module", b"psync", b"sync", b"shutdown",
    b"config|rewrite", b"config|resetstat", b"acl|setuser", b"acl|deluser", b"acl|save", b"acl|load",
    b"cluster|addslots", b"cluster|addslotsrange", b"cluster|delslots", b"cluster|delslotsrange",
    b"cluster|failover", b"cluster|forget", b"cluster|meet", b"cluster|replicate", b"cluster|reset",
    b"cluster|setslot", b"cluster|flushslots", b"cluster|saveconfig", b"cluster|set-config-epoch",
    b"cluster|bumpepoch", b"client|kill", b"client|pause", b"client|unpause",
))

# response_policy:special commands that still have an obvious answer: the first master's reply.
ONE_NODE = frozenset((b"info",))


def node_local_error(name: bytes) -> bytes:
    return error(f"ERR cacheproxy cluster mode: '{name.decode(errors='replace').replace('|', ' ').upper()}' "
                 "acts on a single node's state; send it to the nodes directly")


class Spec:
    """One command (or subcommand) as the upstream's COMMAND describes it."""

    __slots__ = ("name", "arity", "first", "last", "step", "movable", "key_specs", "readonly", "blocking",
                 "subs", "request", "response")

    def __init__(self, entry: list):
        self.name = entry[0].lower()
        self.arity = entry[1]
        flags = set(entry[2])
        self.first, self.last, self.step = entry[3], entry[4], entry[5]
        self.movable = b"movablekeys" in flags
        self.readonly = b"readonly" in flags
        self.blocking = b"blocking" in flags
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


# -- placement -------------------------------------------------------------------------------------

def place(table: CommandTable, args: list[bytes]):
    """Where a command goes: (SLOT, slot) | (ANY, None) | (SPLIT, (merge, [(slot, args)...])) |
    (FANOUT, (spec, to_replicas_too)) | (SCAN, None) | (ONE, None) | (ERROR, reply bytes)."""
    spec = table.lookup(args)
    if spec is None:
        return ANY, None
    keys = keys_of(spec, args)
    if keys is None:
        return ANY, None
    if keys:
        slot = key_slot(keys[0])
        for key in keys[1:]:
            if key_slot(key) != slot:
                return _split(spec, args)
        return SLOT, slot
    name = spec.name
    if name in NODE_LOCAL:
        return ERROR, node_local_error(name)
    request = spec.request
    if request is None:
        return ANY, None
    if request == b"special":
        return (SCAN, None) if name == b"scan" else (ERROR, node_local_error(name))
    if request in (b"all_shards", b"all_nodes"):
        if name in ONE_NODE:
            return ONE, None
        if spec.response == b"special":
            return ERROR, error(f"ERR cacheproxy cluster mode: '{name.decode().replace('|', ' ').upper()}' "
                                "has a per-node answer; send it to the nodes directly")
        return FANOUT, (spec, request == b"all_nodes")
    return ANY, None


def _split(spec: Spec, args: list[bytes]):
    merge = SPLITTABLE.get(spec.name)
    if merge is None:
        return ERROR, CROSSSLOT
    parts: dict[int, list] = {}      # slot -> (indexes of the client's keys, the part's args)
    if merge == "ok":                # MSET key value [key value ...]
        if len(args) % 2 == 0:
            return ANY, None         # wrong arity: Redis answers it
        for i in range(1, len(args), 2):
            part = parts.setdefault(key_slot(args[i]), [[], [args[0]]])
            part[0].append(i // 2)
            part[1] += (args[i], args[i + 1])
    else:
        for i in range(1, len(args)):
            part = parts.setdefault(key_slot(args[i]), [[], [args[0]]])
            part[0].append(i - 1)
            part[1].append(args[i])
    return SPLIT, (merge, [(slot, indexes, part_args) for slot, (indexes, part_args) in parts.items()])


# -- merging raw replies ---------------------------------------------------------------------------

def first_error(replies: list[bytes]) -> bytes | None:
    for reply in replies:
        if reply[:1] in (b"-", b"!"):
            return reply
    return None


def elements(reply: bytes) -> list[bytes]:
    """The raw elements of an array/set reply (`*n` or `~n`)."""
    end = reply.index(b"\r\n")
    count = int(reply[1:end])
    out, pos = [], end + 2
    for _ in range(max(count, 0)):
        stop, _ = scan_replies(reply, pos, 1)
        out.append(reply[pos:stop])
        pos = stop
    return out


def _integer(reply: bytes) -> int:
    return int(reply[1:reply.index(b"\r\n")])


def merge_split(merge: str, total: int, parts: list, replies: list[bytes]) -> bytes:
    """Reassemble the replies of a split command; `parts` as from _split, `total` = the client's keys."""
    problem = first_error(replies)
    if problem is not None:
        return problem
    if merge == "ok":
        return replies[0]
    if merge == "sum":
        return b":%d\r\n" % sum(map(_integer, replies))
    values: list[bytes] = [b""] * total
    for (_, indexes, _), reply in zip(parts, replies, strict=True):
        for index, value in zip(indexes, elements(reply), strict=True):
            values[index] = value
    return b"*%d\r\n" % total + b"".join(values)


def merge_fanout(spec: Spec, replies: list[bytes]) -> bytes:
    """Merge the replies of a command sent to every master (or node) by its response_policy tip."""
    policy = spec.response
    if policy == b"one_succeeded":
        return next((r for r in replies if r[:1] not in (b"-", b"!")), replies[0])
    problem = first_error(replies)
    if problem is not None:
        return problem
    if policy == b"all_succeeded":
        return replies[0]
    if policy in (b"agg_sum", b"agg_min", b"agg_max"):
        combine = {b"agg_sum": sum, b"agg_min": min, b"agg_max": max}[policy]
        return b":%d\r\n" % combine(map(_integer, replies))
    if policy in (b"agg_logical_and", b"agg_logical_or"):
        combine = all if policy == b"agg_logical_and" else any
        if replies[0][:1] == b":":
            return b":%d\r\n" % combine(_integer(r) for r in replies)
        columns = zip(*(elements(r) for r in replies), strict=False)
        values = [b":%d\r\n" % combine(_integer(v) for v in column) for column in columns]
        return b"*%d\r\n" % len(values) + b"".join(values)
    if replies[0][:1] in (b"*", b"~"):          # no policy, arrays: concatenated (KEYS)
        values = [v for r in replies for v in elements(r)]
        return replies[0][:1] + b"%d\r\n" % len(values) + b"".join(values)
    found = [r for r in replies if r not in (b"$-1\r\n", b"_\r\n")]   # RANDOMKEY: any node's key
    return random.choice(found) if found else replies[0]
