"""Can the upstream keep the write-behind queue? Its eviction policy and persistence, per master.

    read_node(): CONFIG GET maxmemory-policy / maxmemory / appendonly / save   (the settings)
                 INFO (sections memory, persistence, replication)               (connected replicas, and
                                                                                the settings where CONFIG
                                                                                is renamed or denied, as
                                                                                on ElastiCache)
    assess():    NodeSettings -> one Finding per aspect: ok, unsafe or unknown, with what to do

Rules of this module:
- Only the write-behind queue needs this: a read-through cache may be evicted and lost freely.
- Eviction is unsafe when maxmemory-policy is allkeys-* and a maxmemory is set: under memory
  pressure Redis then evicts any key, the queue's streams included, and acknowledged writes are
  lost. noeviction and volatile-* are safe (queue keys never carry a TTL); allkeys-* without a
  maxmemory never evicts (a later CONFIG SET maxmemory is caught by the next check).
- Persistence is safe with AOF (appendonly yes) or at least one connected replica (a failover keeps
  the queue; ElastiCache Multi-AZ). RDB snapshots alone lose the writes queued since the last
  snapshot; no persistence loses every queued write on a restart.
- What cannot be read is "unknown", with the reason; it is never taken for safe or unsafe.
- parse_info() and assess() are sans-IO; read_node() does the I/O through one connection's call.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ..protocol.resp import parse_reply

OK, UNSAFE, UNKNOWN = "ok", "unsafe", "unknown"
ASPECTS = ("eviction", "persistence")
CONFIG_NAMES = ("maxmemory-policy", "maxmemory", "appendonly", "save")


@dataclass
class NodeSettings:
    """What one master said about itself; None where it could not be read."""
    node: str                          # host:port
    policy: str | None = None          # maxmemory-policy
    maxmemory: int | None = None       # bytes; 0 = no limit
    appendonly: bool | None = None
    save: str | None = None            # RDB schedule ("" = no snapshots)
    replicas: int | None = None        # connected replicas
    notes: list[str] = field(default_factory=list)   # what could not be read, and why


@dataclass(frozen=True)
class Finding:
    aspect: str          # eviction | persistence
    node: str
    state: str           # ok | unsafe | unknown
    message: str         # what it means for the queue; with a fix when unsafe


def parse_info(text: str) -> dict[str, str]:
    """INFO's `name:value` lines (section headers and blank lines skipped)."""
    fields = {}
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep and not line.startswith("#"):
            fields[name.strip()] = value.strip()
    return fields


def _text(value) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _reason(error: Exception) -> str:
    lines = str(error).splitlines()
    return lines[0][:120] if lines else type(error).__name__


async def read_node(node: str, call: Callable[..., Awaitable[bytes]]) -> NodeSettings:
    """The settings of one master; `call(*args)` runs a command on a connection to it (raw reply).
    Errors of the connection itself (UpstreamUnavailable, timeouts) are the caller's to handle."""
    settings = NodeSettings(node)
    config: dict[str, str] = {}
    for name in CONFIG_NAMES:
        reply = parse_reply(await call("CONFIG", "GET", name))
        if isinstance(reply, Exception):          # renamed, disabled (ElastiCache) or denied by ACL
            settings.notes.append(f"CONFIG GET refused: {_reason(reply)}; read from INFO, which does "
                                  f"not show the RDB snapshot schedule")
            break
        pairs = reply if isinstance(reply, dict) else dict(zip(reply[::2], reply[1::2], strict=False))
        config.update({_text(k): _text(v) for k, v in pairs.items()})
    info_reply = parse_reply(await call("INFO"))
    info: dict[str, str] = {}
    if isinstance(info_reply, Exception):
        settings.notes.append(f"INFO refused: {_reason(info_reply)}")
    else:
        info = parse_info(_text(info_reply))
    settings.policy = config.get("maxmemory-policy") or info.get("maxmemory_policy")
    settings.maxmemory = _int(config.get("maxmemory", info.get("maxmemory")))
    aof = config.get("appendonly", {"1": "yes", "0": "no"}.get(info.get("aof_enabled", "")))
    settings.appendonly = None if aof is None else aof.lower() == "yes"
    settings.save = config.get("save")
    settings.replicas = _int(info.get("connected_slaves"))
    return settings


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def assess(settings: NodeSettings) -> list[Finding]:
    """One finding per aspect for one master."""
    return [_eviction(settings), _persistence(settings)]


def unreadable(node: str, reason: str) -> list[Finding]:
    """Both aspects unknown: the node could not be asked at all."""
    return [Finding(aspect, node, UNKNOWN, f"{node}: could not be checked ({reason})") for aspect in ASPECTS]


def _why_unknown(settings: NodeSettings) -> str:
    return "; ".join(settings.notes) or "not reported"


def _eviction(s: NodeSettings) -> Finding:
    if s.policy is None:
        return Finding("eviction", s.node, UNKNOWN,
                       f"{s.node}: maxmemory-policy could not be read ({_why_unknown(s)})")
    if s.policy.startswith("allkeys-") and s.maxmemory != 0:
        limit = "a maxmemory" if s.maxmemory is None else f"maxmemory {s.maxmemory}"
        return Finding("eviction", s.node, UNSAFE,
                       f"{s.node}: maxmemory-policy is {s.policy} with {limit}: under memory pressure Redis "
                       f"evicts the write-behind queue's streams and acknowledged writes are lost; fix: "
                       f"CONFIG SET maxmemory-policy noeviction (or a volatile-* policy)")
    return Finding("eviction", s.node, OK, f"{s.node}: maxmemory-policy {s.policy}")


def _persistence(s: NodeSettings) -> Finding:
    if s.appendonly:
        return Finding("persistence", s.node, OK, f"{s.node}: appendonly yes")
    if s.replicas:
        return Finding("persistence", s.node, OK, f"{s.node}: {s.replicas} connected replica(s)")
    if s.appendonly is None or s.replicas is None:
        return Finding("persistence", s.node, UNKNOWN,
                       f"{s.node}: AOF or replicas could not be read ({_why_unknown(s)})")
    if s.save:
        loss = f"RDB snapshots only (save \"{s.save}\"): a restart loses the writes queued since the last snapshot"
    elif s.save is None:
        loss = (f"neither AOF nor a replica, and the RDB snapshot schedule could not be read "
                f"({_why_unknown(s)}): a restart loses the writes queued since the last snapshot, if any")
    else:
        loss = "neither AOF nor a replica: a restart loses every queued write"
    return Finding("persistence", s.node, UNSAFE,
                   f"{s.node}: {loss}; fix: CONFIG SET appendonly yes, or add a replica (ElastiCache: Multi-AZ)")
