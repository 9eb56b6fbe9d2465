"""Admin HTTP endpoint: /metrics (Prometheus), /healthz (alive), /readyz (upstream and backends reachable).

A deliberately tiny HTTP/1.0-style server on asyncio streams: three GET routes, one response per
connection, so the proxy needs no web framework. A request must arrive whole within 5 s and within
8 KiB of headers; anything else is dropped.

With admin.token (or token_file), /metrics and /readyz answer 401 unless the request carries
`Authorization: Bearer <token>` (compared in constant time); /healthz stays open for liveness probes.

/readyz: 200 or 503 with {"ready": bool, "problems": {component: reason}, "warnings": {component:
reason}}. Problems make it 503; warnings (e.g. an upstream without persistence under
upstream.durability.persistence: warn) are reported and do not.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger("cacheproxy.admin")

MAX_REQUEST = 8192      # bytes of request line and headers


class AdminServer:
    def __init__(self, cfg, metrics, readiness, warnings=dict):
        """readiness: async callable returning {component: None if ok else 'reason'};
        warnings: callable returning {component: 'reason'} for what is reported but not a problem."""
        self.cfg = cfg
        self.metrics = metrics
        self.readiness = readiness
        self.warnings = warnings
        self.token = cfg.bearer
        self.server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, self.cfg.host, self.cfg.port, limit=MAX_REQUEST)
        log.info("admin on http://%s:%d (/metrics /healthz /readyz)", self.cfg.host, self.port)
        if self.token is None and self.cfg.host not in ("127.0.0.1", "::1", "localhost"):
            log.warning("admin endpoint on %s without admin.token: anyone who reaches port %d can read "
                        "/metrics and /readyz; set admin.token (or admin.token_file)", self.cfg.host, self.port)

    def _authorized(self, request: bytes) -> bool:
        if self.token is None:
            return True
        for line in request.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"authorization":
                scheme, _, given = value.strip().partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.token.encode())
        return False

    @property
    def port(self) -> int:
        assert self.server is not None, "the admin server is not started"
        return self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            method, path = request.split(b" ", 2)[:2]
            path = path.split(b"?", 1)[0]
            if method != b"GET":
                status, ctype, body = 405, "text/plain", b"method not allowed\n"
            elif path in (b"/metrics", b"/readyz") and not self._authorized(request):
                status, ctype, body = 401, "text/plain", b"unauthorized: send Authorization: Bearer <admin.token>\n"
            elif path == b"/metrics":
                status, ctype, body = 200, CONTENT_TYPE_LATEST, generate_latest(self.metrics.registry)
            elif path == b"/healthz":
                status, ctype, body = 200, "application/json", b'{"status":"ok"}\n'
            elif path == b"/readyz":
                problems = {k: v for k, v in (await self.readiness()).items() if v}
                status = 503 if problems else 200
                body = json.dumps({"ready": not problems, "problems": problems,
                                   "warnings": self.warnings()}).encode() + b"\n"
                ctype = "application/json"
            else:
                status, ctype, body = 404, "text/plain", b"not found\n"
            reason = {200: "OK", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
                      503: "Service Unavailable"}[status]
            writer.write(b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                         % (status, reason.encode(), ctype.encode(), len(body)) + body)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError,
                ConnectionError):
            pass
        finally:
            writer.close()
