"""The write-behind queue's safety on the upstream, watched: at startup, then every check_interval.

    DurabilityMonitor.check(): every master (cluster) or the one upstream -> upstream/durability.py
        -> findings (eviction, persistence: ok | unsafe | unknown), acted on per upstream.durability:
           refuse  at startup: the proxy does not start (StartupError names the setting and the fix);
                   later (CONFIG SET at runtime): write-behind writes are refused with that reason,
                   and /readyz answers 503, until a check finds the setting safe again
           warn    logged (when it changes), listed under /readyz "warnings", in the metrics
           ignore  only in the metrics

Rules of this module:
- Checks run only while some route writes behind: a read-through cache may be evicted freely.
- A setting that cannot be read is "unknown": a warning, never a refusal (ElastiCache may deny
  CONFIG, and the proxy must not refuse to start for what it cannot see).
- Logs only when the findings change, so a check every 30 s does not flood the log.
- Metric: cacheproxy_upstream_durability{node, aspect} = 1 ok, 0 unsafe, -1 unknown.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ..upstream.durability import OK, UNKNOWN, UNSAFE, Finding, assess, read_node, unreadable
from ..upstream.single import UpstreamUnavailable
from .metrics import DURABILITY, DURABILITY_CHECKS

log = logging.getLogger("cacheproxy.durability")

NODE_TIMEOUT = 5.0          # seconds to read one node's settings
RETRY_UNREACHED = 2.0       # seconds to the next check when a node could not be asked
_GAUGE = {OK: 1, UNSAFE: 0, UNKNOWN: -1}


class DurabilityMonitor:
    def __init__(self, pool, cfg):
        """cfg: the upstream.durability section (eviction, persistence: refuse|warn|ignore; check_interval)."""
        self.pool = pool
        self.cfg = cfg
        self.active = False          # some route writes behind
        self.findings: list[Finding] = []
        self.checks = 0
        self._logged: set[Finding] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    # -- what the rest of the proxy asks -----------------------------------------------------------
    @property
    def refusal(self) -> str | None:
        """Why write-behind must not queue now (an unsafe setting whose action is refuse), or None."""
        if not self.active:
            return None
        unsafe = [f for f in self.findings if f.state == UNSAFE and self._action(f) == "refuse"]
        if not unsafe:
            return None
        return "the upstream may lose queued writes: " + "; ".join(
            f"{f.message} (upstream.durability.{f.aspect}: refuse)" for f in unsafe)

    def warnings(self) -> dict[str, str]:
        """/readyz warnings: unsafe settings under `warn`, and settings that could not be read."""
        out: dict[str, str] = {}
        if not self.active:
            return out
        for f in self.findings:
            action = self._action(f)
            if action == "ignore" or f.state == OK or (f.state == UNSAFE and action == "refuse"):
                continue
            name = f"durability:{f.aspect}"
            out[name] = f"{out[name]}; {f.message}" if name in out else f.message
        return out

    def _action(self, finding: Finding) -> str:
        return getattr(self.cfg, finding.aspect)

    # -- checking ------------------------------------------------------------------------------------
    def set_active(self, active: bool) -> None:
        """Called when routes are installed; a newly active monitor checks at once."""
        if active and not self.active:
            self._wake.set()
        self.active = active

    async def check(self) -> list[Finding]:
        findings: list[Finding] = []
        for node, conn in self._nodes():
            if conn is None:
                findings += unreadable(node, "not connected")
                continue
            try:
                async with asyncio.timeout(NODE_TIMEOUT):       # call_direct: this node, no key routing
                    findings += assess(await read_node(node, conn.call_direct))
            except (UpstreamUnavailable, TimeoutError) as exc:
                findings += unreadable(node, str(exc) or "timed out")
        self.findings = findings
        self.checks += 1
        self._report()
        return findings

    def _nodes(self) -> list[tuple[str, Any]]:
        """(address, a shared connection or None) of every master."""
        masters = getattr(self.pool, "master_list", None)
        if masters is None:
            return [(f"{self.pool.host}:{self.pool.port}", self.pool.pick(2))]
        if not masters:
            return [("cluster", None)]
        return [(node.addr, node.pick(2)) for node in masters]

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _watch(self) -> None:
        """Re-check every check_interval (sooner while a node could not be asked, or when woken)."""
        while True:
            self._wake.clear()
            try:
                async with asyncio.timeout(self._next_delay()):
                    await self._wake.wait()
            except TimeoutError:
                pass
            if self.active:
                try:
                    await self.check()
                except Exception:     # a reply of an unexpected shape must not end the watch
                    log.exception("upstream durability check failed")

    def _next_delay(self) -> float:
        unreached = any(f.state == UNKNOWN and "not connected" in f.message for f in self.findings)
        return min(self.cfg.check_interval, RETRY_UNREACHED) if unreached else self.cfg.check_interval

    def _report(self) -> None:
        """Log what changed since the last check (a problem appearing, or going away)."""
        current = {f for f in self.findings if self._action(f) != "ignore"}
        for f in sorted(current - self._logged, key=lambda f: (f.node, f.aspect)):
            if f.state == UNSAFE and self._action(f) == "refuse":
                log.error("upstream durability: %s (upstream.durability.%s: refuse: no write-behind write is "
                          "taken while it lasts)", f.message, f.aspect)
            elif f.state == UNSAFE:
                log.warning("upstream durability: %s (upstream.durability.%s: warn)", f.message, f.aspect)
            elif f.state == UNKNOWN:
                log.warning("upstream durability: %s", f.message)
            elif any(old.node == f.node and old.aspect == f.aspect for old in self._logged):
                log.info("upstream durability: %s (fixed)", f.message)
            else:
                log.info("upstream durability: %s", f.message)
        self._logged = current

    # -- metrics -------------------------------------------------------------------------------------
    def register(self, metrics) -> None:
        metrics.read(DURABILITY, lambda: [((f.node, f.aspect), _GAUGE[f.state])
                                          for f in (self.findings if self.active else ())])
        metrics.read(DURABILITY_CHECKS, lambda: self.checks)
