"""Keeping clients out of the proxy's own keys: the write-behind queue, pending marks, leases.

A client that deletes, trims, renames or overwrites them can lose acknowledged writes or hide rows, so:
- a command naming a reserved key (cache/keys.py) in any key position is refused; positions come from
  the upstream's COMMAND (EVAL's numkeys included); a script body or SORT pattern that spells a
  reserved prefix is refused too, and a command the table cannot read is refused when any argument
  starts with one;
- KEYS and SCAN replies leave reserved keys out;
- FLUSHALL/FLUSHDB run as one script that deletes every key but the queue, the pending marks and the
  data keys whose writes are still queued (their cached value is newer than the database's); it
  clears the cache state (leases, negative entries) with the data.
The exact test runs only when the request's bytes contain a reserved prefix at all (`reserved_in`), so
ordinary traffic pays one substring search per read.

Known limit: a script that builds a key name at run time ("cache" .. "proxy:") is not inspected; deny
scripting to untrusted users with ACL rules.
"""

from __future__ import annotations

from ..cache.keys import CACHE_STATE, PENDING, reserved_prefixes
from ..protocol import errors
from ..protocol.resp import scan_replies

# Commands whose arguments may spell key names that are not in key positions.
_FREE_TEXT = frozenset((b"EVAL", b"EVAL_RO", b"EVALSHA", b"EVALSHA_RO", b"FCALL", b"FCALL_RO", b"SCRIPT",
                        b"FUNCTION", b"SORT", b"SORT_RO"))

# ARGV: mode (all|db), current db, pending prefix, n cache-state prefixes, those, then reserved prefixes.
_FLUSH = """
local function starts(k, p) return string.sub(k, 1, #p) == p end
local function tag(k)
  local s = string.find(k, '{', 1, true)
  if s then
    local e = string.find(k, '}', s + 1, true)
    if e and e > s + 1 then return string.sub(k, s + 1, e - 1) end
  end
  return k
end
local pend = ARGV[3]
local nstate = tonumber(ARGV[4])
local state, reserved = {}, {}
for i = 1, nstate do state[#state + 1] = ARGV[4 + i] end
for i = 5 + nstate, #ARGV do reserved[#reserved + 1] = ARGV[i] end
if ARGV[1] == 'all' then
  local info = redis.call('INFO', 'keyspace')
  for db in string.gmatch(info, 'db(%d+):') do
    if db ~= ARGV[2] then
      redis.call('SELECT', db)
      redis.call('FLUSHDB')
    end
  end
  redis.call('SELECT', ARGV[2])
end
local cursor, deleted = '0', 0
repeat
  local page = redis.call('SCAN', cursor, 'COUNT', 1000)
  cursor = page[1]
  for _, k in ipairs(page[2]) do
    local keep = false
    for _, p in ipairs(reserved) do if starts(k, p) then keep = true end end
    if keep then
      for _, p in ipairs(state) do if starts(k, p) then keep = false end end
    elseif redis.call('EXISTS', pend .. '{' .. tag(k) .. '}:' .. k) == 1 then
      keep = true
    end
    if not keep then
      redis.call('DEL', k)
      deleted = deleted + 1
    end
  end
until cursor == '0'
return deleted
"""


class Guard:
    """One per proxy: the reserved prefixes and the checks above."""

    def __init__(self, pool, stream_prefix: str, db: int):
        self.pool = pool
        self.prefixes = reserved_prefixes(stream_prefix)
        self.db = db
        shown = " and ".join(p.decode() + "*" for p in self.prefixes)
        self.refusal = errors.refused(f"keys {shown} are reserved for cacheproxy's own state")

    def refuses(self, args: list[bytes]) -> bool:
        """Does this command name a reserved key?"""
        prefixes = self.prefixes
        table = self.pool.table
        keys = table.keys(args) if table is not None else None
        if keys is None:        # unknown command, wrong arity, table not read yet: look at everything
            return any(arg.startswith(prefixes) for arg in args[1:])
        if any(key.startswith(prefixes) for key in keys):
            return True
        name = args[0].upper()
        if name in _FREE_TEXT:
            return any(prefix in arg for arg in args[1:] for prefix in prefixes)
        return False

    # -- KEYS / SCAN -----------------------------------------------------------------------------
    def listing_filter(self, name: bytes):
        """The `after` hook that removes reserved keys from a KEYS or SCAN reply."""
        return self._filter_scan if name == b"SCAN" else self._filter_keys

    def _filter_keys(self, slot, data: bytes) -> bytes:
        if data[:1] not in (b"*", b"~") or not any(p in data for p in self.prefixes):
            return data
        return self._without_reserved(data)

    def _filter_scan(self, slot, data: bytes) -> bytes:
        if data[:1] != b"*" or not any(p in data for p in self.prefixes):
            return data
        body = data.index(b"\r\n") + 2
        cursor_end, _ = scan_replies(data, body, 1)
        return b"*2\r\n" + data[body:cursor_end] + self._without_reserved(data[cursor_end:])

    def _without_reserved(self, array: bytes) -> bytes:
        """An array (or set) of bulk strings without the reserved ones."""
        head = array.index(b"\r\n")
        kept, pos, count = [], head + 2, int(array[1:head])
        for _ in range(max(count, 0)):
            end, _ = scan_replies(array, pos, 1)
            item = array[pos:end]
            value = item[item.index(b"\r\n") + 2:-2]
            if not value.startswith(self.prefixes):
                kept.append(item)
            pos = end
        return array[:1] + b"%d\r\n" % len(kept) + b"".join(kept)

    # -- FLUSHALL / FLUSHDB / SWAPDB ---------------------------------------------------------------
    def swapdb_refusal(self, args: list[bytes]) -> bytes | None:
        """SWAPDB of the proxy's database would move the queue where the proxy no longer sees it."""
        if len(args) == 3 and b"%d" % self.db in args[1:3]:
            return errors.refused(f"SWAPDB of database {self.db} would move cacheproxy's write-behind queue "
                                  "and leases out of its reach")
        return None

    async def flush(self, args: list[bytes], proto: int) -> bytes:
        """FLUSHALL/FLUSHDB [ASYNC|SYNC] as the keep-the-queue script, on every master."""
        name = args[0].upper()
        if len(args) > 2 or (len(args) == 2 and args[1].upper() not in (b"ASYNC", b"SYNC")):
            return errors.SYNTAX
        mode = b"all" if name == b"FLUSHALL" and not self.pool.cluster else b"db"
        argv = [mode, b"%d" % self.db, PENDING, b"%d" % len(CACHE_STATE), *CACHE_STATE, *self.prefixes]
        replies = await self.pool.run_everywhere([b"EVAL", _FLUSH.encode(), b"0", *argv], proto)
        for reply in replies:
            if reply[:1] in (b"-", b"!"):
                return reply
        return b"+OK\r\n"
