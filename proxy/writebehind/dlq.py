"""`cacheproxy dlq list|replay|drop`: the write-behind dead letters, from the shell.

A dead letter is a queued write the database refused (a constraint, a type: never an outage, which
is retried without limit). It holds the original entry and why it failed. `replay` puts entries back on their key's queue
partition as the key's newest write (fix the row or the schema first); `drop` forgets them.
"""

from __future__ import annotations

import json
import sys

import redis
import redis.cluster

from ..config import load_config
from .queue import Layout, dead_name

META = 8   # id <id> route <route> error <text> attempts <n>, then the entry's own fields


def add_parser(sub) -> None:
    dlq = sub.add_parser("dlq", help="list, replay or drop write-behind dead letters")
    dlq.add_argument("action", choices=("list", "replay", "drop"))
    dlq.add_argument("ids", nargs="*", help="dead-letter ids (as `list` shows them)")
    dlq.add_argument("--all", action="store_true", help="replay or drop every dead letter")
    dlq.add_argument("--limit", type=int, default=100, help="most entries `list` shows")
    dlq.add_argument("--json", action="store_true", help="`list` prints one JSON object per line")
    dlq.add_argument("--config", "-c", default=None, help="config file (default: $CACHEPROXY_CONFIG)")


def _clients(cfg, dead: bytes):
    """A client for the upstream, and one for the node that holds the dead letters."""
    client: redis.Redis | redis.cluster.RedisCluster
    if cfg.upstream.cluster:
        client = redis.cluster.RedisCluster.from_url(cfg.upstream.url)
        dead_client = client.get_node_from_key(dead).redis_connection
    else:
        client = dead_client = redis.Redis.from_url(cfg.upstream.url)
    # Entries as raw field lists: a hash's fields may repeat the entry's own field names.
    dead_client.set_response_callback("XRANGE", lambda response, **options: response)
    return client, dead_client


def _text(value: bytes) -> str:
    return value.decode(errors="backslashreplace")


def _describe(dead_id: bytes, fields: list) -> dict:
    meta = dict(zip(fields[0:META:2], fields[1:META:2], strict=False))
    entry = fields[META:]
    out = {"dead_id": _text(dead_id), "entry_id": _text(meta.get(b"id", b"")),
           "route": _text(meta.get(b"route", b"")), "error": _text(meta.get(b"error", b"")),
           "attempts": int(meta.get(b"attempts", b"0") or 0)}
    if len(entry) >= 4:
        out["key"], out["op"] = _text(entry[1]), _text(entry[3])
        if out["op"] == "set" and len(entry) >= 8:
            out["value"] = _text(entry[7])
        elif out["op"] == "hset":
            out["value"] = {_text(f): _text(v) for f, v in zip(entry[6::2], entry[7::2], strict=False)}
    return out


def run(args, config_path: str | None) -> int:
    path = args.config or config_path
    if not path:
        print("cacheproxy dlq: give the proxy's config file (--config, or set CACHEPROXY_CONFIG)", file=sys.stderr)
        return 2
    try:
        cfg = load_config(path)
    except Exception as exc:
        print(exc, file=sys.stderr)
        return 2
    wb = cfg.write_behind
    layout = Layout(wb.stream_prefix, wb.partitions, cfg.upstream.cluster)
    dead = dead_name(wb.stream_prefix)
    try:
        client, dead_client = _clients(cfg, dead)
    except redis.RedisError as exc:
        print(f"upstream {cfg.upstream.redacted_url}: {exc}", file=sys.stderr)
        return 1
    try:
        if args.action == "list":
            rows = dead_client.xrange(dead, count=args.limit)
            for dead_id, fields in rows:
                item = _describe(dead_id, fields)
                if args.json:
                    print(json.dumps(item))
                else:
                    print(f"{item['dead_id']}  {item.get('op', '?'):4} {item.get('key', '?')}  "
                          f"route={item['route'] or '-'} attempts={item['attempts']}  error: {item['error']}")
            print(f"{dead_client.xlen(dead)} dead letter(s)", file=sys.stderr)
            return 0
        if not args.ids and not args.all:
            print(f"dlq {args.action}: give dead-letter ids, or --all", file=sys.stderr)
            return 2
        rows = dead_client.xrange(dead) if args.all else [r for i in args.ids for r in dead_client.xrange(dead, i, i)]
        if not args.all and len(rows) < len(args.ids):
            found = {_text(r[0]) for r in rows}
            print(f"not found: {', '.join(i for i in args.ids if i not in found)}", file=sys.stderr)
        done = 0
        for dead_id, fields in rows:
            if args.action == "replay":
                entry = fields[META:]
                if len(entry) < 6:
                    print(f"{_text(dead_id)}: not a queue entry, left in place", file=sys.stderr)
                    continue
                slot, partition, stream = layout.place(entry[1])
                client.execute_command("XADD", stream, "*", *entry)
                if layout.cluster:      # tell the partition's owner where the entry is
                    client.sadd(layout.dirty(partition), slot)
            dead_client.xdel(dead, dead_id)
            done += 1
        print(f"{args.action}: {done} dead letter(s)")
        return 0
    except redis.RedisError as exc:
        print(f"upstream {cfg.upstream.redacted_url}: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
