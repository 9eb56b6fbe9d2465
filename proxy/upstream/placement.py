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
from typing import Any

from redis.crc import key_slot

from ..protocol import errors
from ..protocol.commands import CommandTable, Spec, keys_of
from ..protocol.resp import scan_replies

CROSSSLOT = errors.CROSSSLOT

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
    return errors.cluster_node_local(name)


# -- placement -------------------------------------------------------------------------------------

def place(table: CommandTable, args: list[bytes]) -> tuple[int, Any]:
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
            return ERROR, errors.cluster_per_node(name)
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
        numbers = [_integer(reply) for reply in replies]
        total = sum(numbers) if policy == b"agg_sum" else min(numbers) if policy == b"agg_min" else max(numbers)
        return b":%d\r\n" % total
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
