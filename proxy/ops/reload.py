"""Config reload (SIGHUP, `cacheproxy reload`): routes, TTLs, backends and write settings change in
place, without dropping a client connection. A new config that does not validate, or whose routes do
not fit their databases, is refused with the reason and the running one stays in force. Listener,
upstream, admin and limits settings only change on restart (a warning names the fields).

What is refused (the reason is logged, nothing changes): a file that does not parse or validate, a
new or changed backend that does not answer (a typo in a host must not take routes down), a route
whose query or table does not fit its database. A route on an unchanged backend that is down right
now cannot be checked: it is applied with a warning, as at startup.

After the swap, install_routes() hands the new router to the read path, the write path and the
write-behind writer (writer.reconfigure(cfg, router)).
"""

from __future__ import annotations

import asyncio
import logging

from ..backends import create_backend
from ..cache.routes import build_router
from ..config import ConfigError, load_config
from .logs import current_secrets, refresh, secrets_of

log = logging.getLogger("cacheproxy.reload")

RESTART_ONLY = ("listen", "upstream", "admin", "limits", "shutdown")
BACKEND_CHECK_SECONDS = 5.0


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
            log.error("reload refused, the running config stays in force: %s", exc)
            return False
        old = server.cfg
        # The new file's secrets are masked from now on, even if it is refused below.
        refresh(old, current_secrets() | secrets_of(new))
        backends, started = {}, []
        for name, bcfg in new.backends.items():
            current = server.backends.get(name)
            if current is not None and old.backends.get(name) == bcfg:
                backends[name] = current
                continue
            backend = create_backend(name, bcfg)
            started.append(backend)
            backends[name] = backend
            try:       # a new or changed backend must answer now (unlike at startup, see above)
                await backend.start()
                await asyncio.wait_for(backend.ping(), BACKEND_CHECK_SECONDS)
            except Exception as exc:  # BackendError, a timeout, or a client library's own error
                reason = str(exc) or type(exc).__name__
                return await _refuse(f"{path}: backends.{name}: not reachable: {reason}; fix: check the "
                                     f"backend's address and credentials, or reload once it is up", started)
        try:
            router = await build_router(new, backends, server.metrics)
        except Exception as exc:      # a route that does not fit its database: StartupError, mostly
            return await _refuse(f"{path}: {exc}", started)
        changed = restart_only_changes(old, new)
        if changed:
            log.warning("reload: %s changed but only take(s) effect on restart; the running values stay",
                        ", ".join(changed))
            new = new.model_copy(update={name: getattr(old, name) for name in RESTART_ONLY})
        retired = [b for name, b in server.backends.items() if backends.get(name) is not b]
        try:
            server.install_routes(router, new)
        except Exception as exc:      # e.g. the writer refusing new write settings
            return await _refuse(f"{path}: {exc}", started)
        server.cfg = new
        server.backends = backends
        refresh(new, current_secrets())    # old secrets stay masked: retired backends may log
        if retired:       # loads and flushes already running on them finish first
            server._tasks.append(asyncio.get_running_loop().create_task(_close_later(retired)))
        log.info("reloaded %s: %d routes, %d backends", path, len(router.routes), len(backends))
        return True


async def _refuse(reason: str, started: list) -> bool:
    log.error("reload refused, the running config stays in force: %s", reason)
    for backend in started:
        try:
            await backend.close()
        except Exception as exc:
            log.warning("closing a backend of the refused config: %s", exc)
    return False


def restart_only_changes(old, new) -> list[str]:
    """Dotted names of the listen/upstream/admin/limits/shutdown fields that differ (never their values)."""
    changed = []
    for section in RESTART_ONLY:
        before, after = getattr(old, section).model_dump(), getattr(new, section).model_dump()
        changed += [f"{section}.{field}" for field in sorted(before.keys() | after.keys())
                    if before.get(field) != after.get(field)]
    return changed


async def _close_later(backends, delay: float = 10.0) -> None:
    await asyncio.sleep(delay)
    for backend in backends:
        try:
            await backend.close()
        except Exception as exc:
            log.warning("closing a retired backend: %s", exc)
