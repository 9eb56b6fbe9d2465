"""Lua scripts the proxy runs on the upstream: EVALSHA, falling back to EVAL once after a restart."""

from __future__ import annotations

import hashlib

from .single import UpstreamUnavailable


class Script:
    """EVALSHA with a fallback to EVAL when the upstream has not seen the script (or was restarted)."""

    def __init__(self, source: str):
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, pool, keys: list, args: list):
        reply = await pool.execute("EVALSHA", self.sha, len(keys), *keys, *args, key=keys[0])
        if isinstance(reply, Exception) and str(reply).startswith("NOSCRIPT"):
            reply = await pool.execute("EVAL", self.source, len(keys), *keys, *args, key=keys[0])
        if isinstance(reply, Exception):
            raise UpstreamUnavailable(f"script failed: {reply}")
        return reply
