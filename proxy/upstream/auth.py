"""`listen.auth: upstream`: clients' credentials are checked by the upstream Redis itself.

Applications keep the Redis credentials in their URL: AUTH and HELLO ... AUTH are sent, on a short-lived
connection of their own, to the upstream, and its answer is the client's (+OK, or Redis's own error
text). So a password changed on Redis (CONFIG SET requirepass, ACL SETUSER) is the one clients must
send, at once, as with a direct connection.

Rules of this module:
- A check never runs on a connection other clients use: one new connection per check, closed after.
- Results are cached briefly, keyed by the user and a hash of the password (never the password):
  a success for `OK_SECONDS`, a refusal for at most `REFUSED_SECONDS` (so a password set a moment
  ago is accepted almost at once, and a flood of wrong guesses does not open a connection each).
- Whether a client that sends no credentials is let in (Redis's default user without a password) is
  probed the same way and cached for `OPEN_SECONDS`; until the first probe answers, clients must
  authenticate.
- The check only authenticates: commands still run on the proxy's own connections, with the proxy's
  own upstream user (upstream.url), not with the client's ACL permissions.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl

from ..protocol import errors
from ..protocol.resp import encode_command, scan_replies

log = logging.getLogger("cacheproxy.auth")

OK_SECONDS = 5.0
REFUSED_SECONDS = 1.0
OPEN_SECONDS = 1.0


class UpstreamAuth:
    def __init__(self, cfg, loop: asyncio.AbstractEventLoop, ssl_context: ssl.SSLContext | None):
        self.cfg = cfg      # the `upstream` section: address, TLS, connect_timeout
        self.loop = loop
        self.ssl_context = ssl_context
        self.cache: dict[tuple[bytes, bytes], tuple[float, bytes]] = {}
        self.open = False           # may a client without credentials run commands (Redis's nopass default)?
        self.open_checked = -1e9
        self._probe: asyncio.Task | None = None

    # -- AUTH / HELLO AUTH -------------------------------------------------------------------------
    async def check(self, creds: list[bytes]) -> bytes:
        """The upstream's reply to `AUTH creds...` (one or two arguments), from the cache when fresh."""
        user = creds[0] if len(creds) == 2 else b""
        key = (user, hashlib.sha256(creds[-1]).digest())
        now = self.loop.time()
        cached = self.cache.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        reply = await self._ask([b"AUTH", *creds])
        if errors.is_upstream_lost(reply):
            return reply        # never cached: the upstream could not be asked
        ttl = OK_SECONDS if reply == b"+OK\r\n" else REFUSED_SECONDS
        if len(self.cache) > 10000:
            self.cache.clear()
        self.cache[key] = (now + ttl, reply)
        return reply

    # -- clients without credentials -----------------------------------------------------------------
    def refresh_open(self) -> None:
        """Re-probe (in the background) whether the default user needs no password, when stale."""
        if self._probe is None and self.loop.time() - self.open_checked > OPEN_SECONDS:
            self._probe = self.loop.create_task(self._check_open())

    async def probe(self) -> None:
        """Probe now (at startup, so the first clients are not refused while the answer is unknown)."""
        if self._probe is None:
            self._probe = self.loop.create_task(self._check_open())
        await asyncio.shield(self._probe)

    async def _check_open(self) -> None:
        try:
            reply = await self._ask([b"PING"])
            if not errors.is_upstream_lost(reply):
                self.open = reply.startswith(b"+PONG")
                self.open_checked = self.loop.time()
        finally:
            self._probe = None

    # -- one short-lived connection ----------------------------------------------------------------
    async def _ask(self, args: list[bytes]) -> bytes:
        cfg = self.cfg
        writer = None
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(
                cfg.host, cfg.port, ssl=self.ssl_context,
                server_hostname=(cfg.tls.server_hostname or cfg.host) if self.ssl_context else None),
                cfg.connect_timeout)
            writer.write(encode_command(args))
            return await asyncio.wait_for(_one_reply(reader), cfg.connect_timeout)
        except (OSError, TimeoutError, ssl.SSLError, asyncio.IncompleteReadError) as exc:
            log.warning("upstream: cannot check a client's credentials: %s", exc or type(exc).__name__)
            return errors.upstream_unavailable("cannot check the credentials")
        finally:
            if writer is not None:
                writer.close()


async def _one_reply(reader: asyncio.StreamReader) -> bytes:
    data = b""
    while True:
        chunk = await reader.read(4096)
        if not chunk:
            raise asyncio.IncompleteReadError(data, None)
        data += chunk
        end, left = scan_replies(data, 0, 1)
        if not left:
            return data[:end]
