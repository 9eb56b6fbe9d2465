"""placement (upstream/placement.py) and the command table: key positions from COMMAND entries, placement, and merging raw replies (no servers).

The entries below are what Redis 7.0's COMMAND returns (RESP2) for these commands, trimmed.
"""

from __future__ import annotations

from redis.crc import key_slot

from proxy.upstream import placement as cc


def _range(index, lastkey, step=1, limit=0):
    return [b"flags", [b"RW"], b"begin_search", [b"type", b"index", b"spec", [b"index", index]],
            b"find_keys", [b"type", b"range", b"spec", [b"lastkey", lastkey, b"keystep", step, b"limit", limit]]]


ENTRIES = [
    [b"get", 2, [b"readonly", b"fast"], 1, 1, 1, [], [], [_range(1, 0)], []],
    [b"set", -3, [b"write"], 1, 1, 1, [], [], [_range(1, 0)], []],
    [b"mget", -2, [b"readonly"], 1, -1, 1, [], [b"request_policy:multi_shard"], [_range(1, -1)], []],
    [b"mset", -3, [b"write"], 1, -1, 2, [], [b"request_policy:multi_shard", b"response_policy:all_succeeded"],
     [_range(1, -1, 2)], []],
    [b"msetnx", -3, [b"write"], 1, -1, 2, [], [b"request_policy:multi_shard", b"response_policy:agg_min"],
     [_range(1, -1, 2)], []],
    [b"del", -2, [b"write"], 1, -1, 1, [], [b"request_policy:multi_shard", b"response_policy:agg_sum"],
     [_range(1, -1)], []],
    [b"eval", -3, [b"noscript", b"movablekeys"], 0, 0, 0, [], [],
     [[b"flags", [b"RW"], b"begin_search", [b"type", b"index", b"spec", [b"index", 2]],
       b"find_keys", [b"type", b"keynum", b"spec", [b"keynumidx", 0, b"firstkey", 1, b"keystep", 1]]]], []],
    [b"xread", -4, [b"readonly", b"blocking", b"movablekeys"], 0, 0, 0, [], [],
     [[b"flags", [b"RO"], b"begin_search", [b"type", b"keyword", b"spec", [b"keyword", b"STREAMS", b"startfrom", 1]],
       b"find_keys", [b"type", b"range", b"spec", [b"lastkey", -1, b"keystep", 1, b"limit", 2]]]], []],
    [b"dbsize", 1, [b"readonly"], 0, 0, 0, [], [b"request_policy:all_shards", b"response_policy:agg_sum"], [], []],
    [b"keys", 2, [b"readonly"], 0, 0, 0, [], [b"request_policy:all_shards"], [], []],
    [b"scan", -2, [b"readonly"], 0, 0, 0, [], [b"request_policy:special"], [], []],
    [b"time", 1, [b"fast"], 0, 0, 0, [], [], [], []],
    [b"save", 1, [b"admin"], 0, 0, 0, [], [], [], []],
    [b"memory", -2, [], 0, 0, 0, [], [], [], [
        [b"memory|stats", 2, [], 0, 0, 0, [], [b"request_policy:all_shards", b"response_policy:special"], [], []],
    ]],
    [b"script", -2, [], 0, 0, 0, [], [], [], [
        [b"script|exists", -3, [b"noscript"], 0, 0, 0, [],
         [b"request_policy:all_shards", b"response_policy:agg_logical_and"], [], []],
        [b"script|load", 3, [b"noscript"], 0, 0, 0, [],
         [b"request_policy:all_nodes", b"response_policy:all_succeeded"], [], []],
    ]],
]
TABLE = cc.CommandTable(ENTRIES)


def test_keys_by_first_last_step_and_key_specs():
    assert TABLE.keys([b"GET", b"k"]) == [b"k"]
    assert TABLE.keys([b"get", b"k"]) == [b"k"]
    assert TABLE.keys([b"MSET", b"a", b"1", b"b", b"2"]) == [b"a", b"b"]
    assert TABLE.keys([b"EVAL", b"s", b"2", b"k1", b"k2", b"arg"]) == [b"k1", b"k2"]
    assert TABLE.keys([b"EVAL", b"s", b"0"]) == []
    assert TABLE.keys([b"XREAD", b"COUNT", b"2", b"STREAMS", b"s1", b"s2", b"0", b"0"]) == [b"s1", b"s2"]
    # Wrong arity, bad numkeys, unknown: "cannot tell" (sent to any node; Redis answers).
    assert TABLE.keys([b"GET"]) is None
    assert TABLE.keys([b"EVAL", b"s", b"x"]) is None
    assert TABLE.keys([b"EVAL", b"s", b"5", b"a"]) is None
    assert TABLE.keys([b"NOSUCH", b"a"]) is None
    assert TABLE.readonly([b"GET", b"k"]) and not TABLE.readonly([b"SET", b"k", b"v"])


def test_placement():
    assert cc.place(TABLE, [b"GET", b"k"]) == (cc.SLOT, key_slot(b"k"))
    assert cc.place(TABLE, [b"MGET", b"{t}a", b"{t}b"]) == (cc.SLOT, key_slot(b"t"))
    kind, (merge, parts) = cc.place(TABLE, [b"MGET", b"a", b"b", b"c"])
    assert kind == cc.SPLIT and merge == "index"
    assert sorted(i for _, indexes, _ in parts for i in indexes) == [0, 1, 2]
    kind, (merge, parts) = cc.place(TABLE, [b"MSET", b"a", b"1", b"b", b"2"])
    assert merge == "ok" and sorted(tuple(p[2][1:]) for p in parts) == [(b"a", b"1"), (b"b", b"2")]
    assert cc.place(TABLE, [b"MSETNX", b"a", b"1", b"b", b"2"]) == (cc.ERROR, cc.CROSSSLOT)
    assert cc.place(TABLE, [b"EVAL", b"s", b"2", b"a", b"b"]) == (cc.ERROR, cc.CROSSSLOT)
    assert cc.place(TABLE, [b"DBSIZE"])[0] == cc.FANOUT
    assert cc.place(TABLE, [b"SCRIPT", b"LOAD", b"x"])[1][1] is True      # all_nodes
    assert cc.place(TABLE, [b"SCAN", b"0"]) == (cc.SCAN, None)
    assert cc.place(TABLE, [b"TIME"]) == (cc.ANY, None)
    assert cc.place(TABLE, [b"SAVE"])[0] == cc.ERROR
    assert cc.place(TABLE, [b"MEMORY", b"STATS"])[0] == cc.ERROR
    assert cc.place(TABLE, [b"GET"]) == (cc.ANY, None)


def test_merges():
    kind, (merge, parts) = cc.place(TABLE, [b"MGET", b"a", b"b", b"c", b"a"])
    replies = []
    for _, _indexes, part_args in parts:
        values = [b"$1\r\n%s\r\n" % k[:1] if k != b"c" else b"$-1\r\n" for k in part_args[1:]]
        replies.append(b"*%d\r\n" % len(values) + b"".join(values))
    assert cc.merge_split(merge, 4, parts, replies) == b"*4\r\n$1\r\na\r\n$1\r\nb\r\n$-1\r\n$1\r\na\r\n"
    assert cc.merge_split("sum", 3, [], [b":1\r\n", b":2\r\n"]) == b":3\r\n"
    assert cc.merge_split("ok", 2, [], [b"+OK\r\n", b"-ERR x\r\n"]) == b"-ERR x\r\n"
    dbsize = TABLE.lookup([b"DBSIZE"])
    assert cc.merge_fanout(dbsize, [b":1\r\n", b":5\r\n"]) == b":6\r\n"
    keys = TABLE.lookup([b"KEYS", b"*"])
    assert cc.merge_fanout(keys, [b"*1\r\n$1\r\na\r\n", b"*0\r\n", b"*1\r\n$1\r\nb\r\n"]) == \
        b"*2\r\n$1\r\na\r\n$1\r\nb\r\n"
    exists = TABLE.lookup([b"SCRIPT", b"EXISTS", b"x"])
    assert cc.merge_fanout(exists, [b"*2\r\n:1\r\n:1\r\n", b"*2\r\n:1\r\n:0\r\n"]) == b"*2\r\n:1\r\n:0\r\n"
