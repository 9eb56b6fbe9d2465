"""Logging: one line per event (text or JSON), the level from `log.level`, and configured secrets
masked in every line.

Rules:
- A record is one line: newlines in messages and tracebacks are folded (` | `) in text format, and
  escaped by JSON in json format, so a log shipper never splits an event.
- Secrets from the config (listen.password and users, the upstream URL's password, DSN passwords)
  are replaced by *** in each formatted line, whoever logged it (asyncpg, redis, our code). Code
  still never logs them on purpose; this is the net under that rule. Secrets shorter than
  MIN_SECRET characters are not masked: masking every "ab" would make logs unreadable.
- configure() installs the handler at startup; refresh() follows a reloaded config (level, format,
  secrets) by swapping that handler's formatter.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from urllib.parse import unquote, urlsplit

MIN_SECRET = 4

_handler: logging.Handler | None = None


class _Masking(logging.Formatter):
    """Masks `secrets` in the formatted line."""

    def __init__(self, secrets: frozenset[str], fmt: str | None = None):
        super().__init__(fmt)
        # Longest first, so a secret that contains another is masked whole.
        self.secrets = sorted(secrets, key=len, reverse=True)

    def mask(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, "***")
        return text


class TextFormatter(_Masking):
    def __init__(self, secrets: frozenset[str] = frozenset()):
        super().__init__(secrets, "%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return self.mask(super().format(record).rstrip("\n").replace("\n", " | "))


class JsonFormatter(_Masking):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, 3), "level": record.levelname.lower(),
                 "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        # Masked after encoding too: json.dumps may escape a secret's characters differently.
        return self.mask(json.dumps({k: self.mask(v) if isinstance(v, str) else v for k, v in entry.items()}))


class _NoTraceback(logging.Filter):
    """asyncpg logs a full traceback each time it cannot refill its pool while Postgres is down: an
    expected condition for a sidecar, so keep its one-line warning and drop the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            record.msg = f"{record.msg}: {record.exc_info[1]}"
            record.exc_info = record.exc_text = None
        return True


def secrets_of(cfg) -> frozenset[str]:
    """Every secret the config holds, in the forms a message may carry (raw and %-decoded)."""
    found = {cfg.listen.password, *cfg.listen.users.values(), cfg.upstream.password, cfg.admin.token}
    for backend in cfg.backends.values():
        dsn = getattr(backend, "dsn", None)
        if dsn:
            try:
                password = urlsplit(dsn).password
            except ValueError:
                password = None
            found |= {password, unquote(password) if password else None}
    found.add(os.environ.get("AWS_SECRET_ACCESS_KEY"))
    return frozenset(s for s in found if s and len(s) >= MIN_SECRET)


def configure(cfg, extra_secrets: frozenset[str] = frozenset()) -> None:
    """Install the stderr handler for `cfg.log` (at startup: `cacheproxy serve`)."""
    global _handler
    root = logging.getLogger()
    _handler = logging.StreamHandler(sys.stderr)
    root.handlers[:] = [_handler]
    fold_expected_tracebacks()
    logging.captureWarnings(True)        # library warnings become log lines too, not raw stderr text
    refresh(cfg, extra_secrets)


def fold_expected_tracebacks() -> None:
    """Install _NoTraceback on asyncpg's pool logger (once). configure() calls it; a program that runs
    the proxy under its own logging (the tests' in-process proxy) calls it too."""
    pool = logging.getLogger("asyncpg.pool")
    if not any(isinstance(f, _NoTraceback) for f in pool.filters):
        pool.addFilter(_NoTraceback())


def refresh(cfg, extra_secrets: frozenset[str] = frozenset()) -> None:
    """Follow `cfg.log` and mask `cfg`'s secrets plus `extra_secrets` (on reload). Does nothing when
    configure() was not called (the proxy embedded in a test or another program keeps its logging)."""
    if _handler is None:
        return
    secrets = secrets_of(cfg) | extra_secrets
    _handler.setFormatter(JsonFormatter(secrets) if cfg.log.format == "json" else TextFormatter(secrets))
    logging.getLogger().setLevel(cfg.log.level.upper())


def current_secrets() -> frozenset[str]:
    formatter = _handler.formatter if _handler is not None else None
    return frozenset(formatter.secrets) if isinstance(formatter, _Masking) else frozenset()
