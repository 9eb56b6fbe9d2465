"""The backend protocol: what the loader (and later the writer) needs from a database.

A backend knows nothing of RESP or of the cache. Errors split into transient ones (retry later:
connection lost, timeout, throttling) and permanent ones (the request itself is wrong); neither ever
carries a secret such as a DSN password.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class BackendError(Exception):
    transient = True

    def __init__(self, backend: str, message: str):
        super().__init__(message)
        self.backend = backend


class BackendUnavailable(BackendError):
    """Unreachable, timed out or throttled: the same request may succeed later."""


class BackendPermanentError(BackendError):
    """The request is wrong (bad SQL, missing table, constraint violation): retrying cannot help."""
    transient = False


@dataclass
class ReadSpec:
    """How one key is read, with any key/value templates already filled from the key's parameters."""
    as_: str = "json"
    query: str | None = None            # postgres: SQL with $1..$n
    params: list[str] | None = None     # postgres: parameter names bound to $1..$n
    many: bool = False
    column: str | None = None
    table: str | None = None            # dynamodb
    key: dict[str, str] | None = None   # dynamodb GetItem: attribute -> value
    key_condition: str | None = None    # dynamodb Query
    values: dict[str, str] | None = None
    index: str | None = None
    consistent_read: bool = False


class Backend(Protocol):
    name: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None: ...

    async def check_read(self, spec: ReadSpec) -> None:
        """Startup validation of a route's read; raises BackendPermanentError when it cannot work."""

    async def fetch(self, spec: ReadSpec, params: list) -> list[dict]:
        """The rows/items for one key; an empty list means not found."""
