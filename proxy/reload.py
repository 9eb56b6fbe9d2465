"""Config reload (SIGHUP, `cacheproxy reload`): routes, TTLs, backends and write settings change in
place, without dropping a client connection. A new config that does not validate, or whose routes do
not fit their databases, is refused with the reason and the running one stays in force. Listener,
upstream, admin and limits settings only change on restart (a warning names them).
"""

from __future__ import annotations

import asyncio
import logging

from .backends import create_backend
from .backends.base import BackendError
from .config import ConfigError, load_config
from .routes import build_router

log = logging.getLogger("cacheproxy.reload")

RESTART_ONLY = ("listen", "upstream", "admin", "limits", "shutdown")


async def reload(server) -> bool:
    """Re-read server.config_path and apply it; False (old config kept) when it is refused."""
    async with server.reload_lock:
        path = server.config_path
        if not path:
            log.warning("reload: the proxy was started without a config file; nothing to re-read")
            return False
        try:
            new = load_config(path)
        except ConfigError as exc:
            log.error("reload refused, the running config stays in force:\n%s", exc)
            return False
        old = server.cfg
        backends, started = {}, []
        for name, bcfg in new.backends.items():
            current = server.backends.get(name)
            if current is not None and old.backends.get(name) == bcfg:
                backends[name] = current
                continue
            backend = create_backend(name, bcfg)
            try:
                await backend.start()
            except BackendError as exc:
                log.warning("reload: backend %s is not reachable yet: %s", name, exc)
            started.append(backend)
            backends[name] = backend
        try:
            router = await build_router(new, backends, server.metrics)
        except Exception as exc:      # a route that does not fit its database: StartupError, mostly
            log.error("reload refused, the running config stays in force: %s", exc)
            for backend in started:
                await backend.close()
            return False
        kept = [name for name in RESTART_ONLY if getattr(new, name) != getattr(old, name)]
        if kept:
            log.warning("reload: %s changed but only take effect on restart", ", ".join(kept))
            new = new.model_copy(update={name: getattr(old, name) for name in kept})
        retired = [b for name, b in server.backends.items() if backends.get(name) is not b]
        server.cfg = new
        server.backends = backends
        server.install_routes(router, new)
        logging.getLogger().setLevel(new.log.level.upper())
        if retired:       # loads and flushes already running on them finish first
            asyncio.get_running_loop().create_task(_close_later(retired))
        log.info("reloaded %s: %d routes, %d backends", path, len(router.routes), len(backends))
        return True


async def _close_later(backends, delay: float = 10.0) -> None:
    await asyncio.sleep(delay)
    for backend in backends:
        try:
            await backend.close()
        except Exception as exc:
            log.warning("closing a retired backend: %s", exc)
