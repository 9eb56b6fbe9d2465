"""The write-behind queue's layout in Redis, shared by the write path (writes.py), the flusher
(writer.py) and `cacheproxy dlq`.

    {prefix}:{p}          stream of partition p: k=<key> o=set|hset|del x=<expire-at ms or ''> payload
                          (set: v=<value>; hset: the hash's field/value pairs after x)
    {prefix}:s:{tag}      cluster mode: the stream of one hash slot instead (tag: a string in that slot)
    {prefix}:{p}:dirty    cluster mode: slots of partition p written since its owner last looked
    {prefix}:{p}:owner    which sidecar flushes partition p: a lease (SET PX), renewed while alive and
                          while a batch waits on the database; an owner that finds it lapsed drops
                          the batch in hand (the entries stay pending, for whoever owns p now)
    {prefix}:dead         dead letters: id, route, error, attempts, then the entry's own fields
    {prefix}:members      live sidecars (ZSET of heartbeats), so partitions are split fairly
    cacheproxy:pend:{tag}:<key>   id of the key's newest unflushed entry (a companion of the key)

A key always maps to the same partition, so one stream holds all of a key's writes in order, and a
partition is flushed by one sidecar at a time (its owner): the database applies each key's writes in
the order the cache took them. The write script updates the cache, appends the entry and marks the
key pending in one step, so the cache and the queue never disagree. A pending key has no TTL; the
flusher applies the TTL only after its newest entry landed, so a miss can never load the older row.

On a Redis Cluster a script may only touch keys of one slot, so the stream must live in the data
key's slot: there is one stream per slot, named with a hash tag that hashes to that slot, and
partition p owns the slots s with s % partitions == p. After the script, the write path adds the
slot to the partition's dirty set (news for the owner); the owner pops the dirty slots and reads
their streams until a read comes back short. A sidecar that dies between the script and the SADD
leaves entries nobody was told about: the owners also SCAN the masters for non-empty slot streams
(when they take a partition, and every minute). A drained stream stays as an empty key: at most one
per slot.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from ..upstream.scripts import Script

GROUP = "cacheproxy"
FIXED_FIELDS = 6   # k <key> o <op> x <expiry>


def stream_name(prefix: str, partition: int) -> bytes:
    return f"{prefix}:{{{partition}}}".encode()


@functools.cache
def slot_tags() -> tuple[bytes, ...]:
    """For each hash slot, the first hex number that hashes to it: the same table on every sidecar."""
    tags: list[bytes | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
    missing, n = REDIS_CLUSTER_HASH_SLOTS, 0
    while missing:
        tag = b"%x" % n
        slot = key_slot(tag)
        if tags[slot] is None:
            tags[slot] = tag
            missing -= 1
        n += 1
    return tuple(tag for tag in tags if tag is not None)    # every slot has one by now


def slot_stream_name(prefix: str, slot: int) -> bytes:
    return b"%s:s:{%s}" % (prefix.encode(), slot_tags()[slot])


def slot_stream_pattern(prefix: str) -> bytes:
    """SCAN MATCH pattern for the slot streams (glob specials in the prefix escaped)."""
    escaped = "".join("\\" + c if c in "*?[]\\" else c for c in prefix)
    return f"{escaped}:s:{{*}}".encode()


def dirty_name(prefix: str, partition: int) -> bytes:
    return f"{prefix}:{{{partition}}}:dirty".encode()


class Layout:
    """Where a key's queue entries go: its partition's stream, or (cluster) its slot's stream."""

    def __init__(self, prefix: str, partitions: int, cluster: bool):
        self.prefix = prefix
        self.partitions = partitions
        self.cluster = cluster
        if cluster:
            slot_tags()

    def place(self, key: bytes) -> tuple[int, int, bytes]:
        """(slot, partition, stream) of a key's queue entries."""
        slot = key_slot(key)
        partition = slot % self.partitions
        if self.cluster:
            return slot, partition, slot_stream_name(self.prefix, slot)
        return slot, partition, stream_name(self.prefix, partition)

    def dirty(self, partition: int) -> bytes:
        return dirty_name(self.prefix, partition)

    def dirty_slots(self, members, partition: int | None = None) -> list[int]:
        """The slots a dirty set names (of `partition` only, if given); anything else is ignored."""
        slots = []
        for member in members or ():
            if member.isdigit() and int(member) < REDIS_CLUSTER_HASH_SLOTS:
                slot = int(member)
                if partition is None or slot % self.partitions == partition:
                    slots.append(slot)
        return slots


def owner_name(prefix: str, partition: int) -> bytes:
    return f"{prefix}:{{{partition}}}:owner".encode()


def dead_name(prefix: str) -> bytes:
    return f"{prefix}:dead".encode()


def members_name(prefix: str) -> bytes:
    return f"{prefix}:members".encode()


def entry_version(entry_id: bytes) -> int:
    """A number that grows with every entry of a stream (ms * 2**20 + sequence)."""
    ms, _, seq = entry_id.partition(b"-")
    return (int(ms) << 20) + int(seq or 0)


def entry_age_ms(entry_id: bytes, now_ms: float) -> float:
    return max(0.0, now_ms - int(entry_id.partition(b"-")[0]))


@dataclass
class Entry:
    id: bytes
    key: bytes
    op: str                       # set | hset | del
    expiry: bytes                 # absolute expire-at in ms, or b"" for the route's TTL policy
    value: bytes | None = None    # set
    pairs: list | None = None     # hset: [(field, value), ...]
    stream: bytes = b""           # the stream it was read from

    @classmethod
    def parse(cls, entry_id: bytes, fields: list, stream: bytes = b"") -> Entry:
        if len(fields) < FIXED_FIELDS or fields[0] != b"k" or fields[2] != b"o":
            raise ValueError("not a cacheproxy write-behind entry")
        op = fields[3].decode()
        entry = cls(entry_id, fields[1], op, fields[5], stream=stream)
        rest = fields[FIXED_FIELDS:]
        if op == "set":
            entry.value = rest[1] if len(rest) >= 2 else b""
        elif op == "hset":
            entry.pairs = list(zip(rest[0::2], rest[1::2], strict=False))
        return entry

    def fields(self) -> list[bytes]:
        out = [b"k", self.key, b"o", self.op.encode(), b"x", self.expiry]
        if self.op == "set":
            out += [b"v", self.value or b""]
        elif self.op == "hset":
            for field, value in self.pairs or ():
                out += [field, value]
        return out


# The write script: runs the client's own command on the key, so Redis itself decides its reply,
# its errors and its options (NX, XX, GET, EX, KEEPTTL ...), then queues the key's resulting state.
# KEYS: data, pend, lease, neg, stream.
# ARGV: cap (0 = none), needs_state (1: the key must be cached or known absent first), compare (1: only
# queue if the state changed), the command and its arguments.
# Returns {'LOAD'} | {'FULL', depth} | {'ERR', message} | {'OK'} | {'DONE', reply[, entry id]}.
_WRITE = """
local cap = tonumber(ARGV[1])
if cap > 0 then
  local depth = redis.call('XLEN', KEYS[5])
  if depth >= cap then return {'FULL', depth} end
end
if ARGV[2] == '1' and redis.call('EXISTS', KEYS[1]) == 0 and redis.call('EXISTS', KEYS[2]) == 0
   and redis.call('EXISTS', KEYS[4]) == 0 then
  return {'LOAD'}
end
local function state()
  local t = redis.call('TYPE', KEYS[1])['ok']
  if t == 'string' then return t, redis.call('GET', KEYS[1]) end
  if t == 'hash' then return t, redis.call('HGETALL', KEYS[1]) end
  return t, nil
end
local function digest(t, v)
  if type(v) == 'table' then return t .. ':' .. cjson.encode(v) end
  return t .. ':' .. (v or '')
end
local before
if ARGV[3] == '1' then before = digest(state()) end
local reply = redis.pcall(unpack(ARGV, 4))
if type(reply) == 'table' and reply.err then return {'ERR', reply.err} end
if type(reply) == 'table' and reply.ok then reply = nil end
local t, v = state()
if ARGV[3] == '1' and digest(t, v) == before then
  if reply == nil then return {'OK'} end
  return {'DONE', reply}
end
local fields = {'k', KEYS[1], 'o', 'del', 'x', ''}
if t ~= 'none' then
  local pttl = redis.call('PTTL', KEYS[1])
  if pttl > 0 then
    local now = redis.call('TIME')
    fields[6] = string.format('%d', tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) + pttl)
    redis.call('PERSIST', KEYS[1])
  end
  if t == 'hash' then
    fields[4] = 'hset'
    for i = 1, #v do fields[6 + i] = v[i] end
  else
    fields[4] = 'set'
    fields[7] = 'v'
    fields[8] = v
  end
end
local id = redis.call('XADD', KEYS[5], '*', unpack(fields))
redis.call('SET', KEYS[2], id)
redis.call('DEL', KEYS[3], KEYS[4])
if reply == nil then return {'OK', id} end
return {'DONE', reply, id}
"""

# After a batch landed (or was dead-lettered): ack and delete its entries, and for each key whose
# newest entry this was, drop the pending mark and give the key its TTL (or, for a dead letter,
# drop the cached value the database refused, so the next read loads what the database holds).
# KEYS: stream, then data, pend per key. ARGV: group, n ids, ids..., then per key: entry id, action
# (ttl|drop), expire-at ms ('' = none), ttl ms (0 = none).
_DONE = """
local n = tonumber(ARGV[2])
for i = 3, n + 2, 200 do
  local last = math.min(i + 199, n + 2)
  redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, i, last))
  redis.call('XDEL', KEYS[1], unpack(ARGV, i, last))
end
local a = n + 3
for k = 2, #KEYS, 2 do
  if redis.call('GET', KEYS[k + 1]) == ARGV[a] then
    redis.call('DEL', KEYS[k + 1])
    if ARGV[a + 1] == 'drop' then
      redis.call('DEL', KEYS[k])
    elseif ARGV[a + 2] ~= '' then
      redis.call('PEXPIREAT', KEYS[k], ARGV[a + 2])
    elseif tonumber(ARGV[a + 3]) > 0 then
      redis.call('PEXPIRE', KEYS[k], ARGV[a + 3])
    end
  end
  a = a + 4
end
return n
"""

# Partition ownership: keep the lease if it is ours (2: renewed), take it if it is free (1: taken,
# so it had lapsed: whatever this sidecar read before may have been flushed by another since), or
# leave it (0: another sidecar's).
_CLAIM = """
local owner = redis.call('GET', KEYS[1])
if owner == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 2
end
if owner == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""
RENEWED, TAKEN, OTHERS = 2, 1, 0

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

WRITE = Script(_WRITE)
DONE = Script(_DONE)
CLAIM = Script(_CLAIM)
RELEASE = Script(_RELEASE)
