"""The backend protocol: what the loader and the writer need from a database.

A backend knows nothing of RESP or of the cache. Errors come in kinds, and none ever carries a
secret such as a DSN password:
    BackendUnavailable    transient: connection lost, timeout, throttling; the same request may work later
      BackendBusy         transient: every connection of the proxy's pool is in use (our saturation,
                          not the database's failure)
    BackendPermanentError the request itself is wrong (bad SQL, missing table, constraint violation)
    BackendKeyRejected    the key's parameters cannot be expressed in the backend's types (an int4
                          overflow, a NUL in text): no row can have this key, so it is not found. The
                          client's input, not a failure of the backend; the backend checks it before
                          sending anything.
A backend knows nothing of RESP or of the cache. Errors split into transient ones (retry later:
connection lost, timeout, lock timeout, throttling) and permanent ones (the request itself is wrong);
neither ever carries a secret such as a DSN password. The write-behind flusher retries transient
errors without limit and dead-letters only permanent ones, so a misclassified error either stalls a
partition (visible in the retry metrics) or dead-letters a row: when in doubt, transient.

Fencing: every write carries a version that grows per key (a queue entry's stream id, or a clock for
write-through). A backend applies a write only if the version it holds for the key is not newer, and
it keeps the version of a delete, so an older write (a paused owner waking up, a replayed entry, an
entry queued before a write-through) can never overwrite a newer one. A write it skips for that
reason is reported as SUPERSEDED, not as an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, TypeVar


class BackendError(Exception):
    transient = True

    def __init__(self, backend: str, message: str):
        super().__init__(message)
        self.backend = backend


class BackendUnavailable(BackendError):
    """Unreachable, timed out or throttled: the same request may succeed later."""


class BackendBusy(BackendUnavailable):
    """Every connection the proxy may hold to the backend is in use and none came free in time."""


class BackendPermanentError(BackendError):
    """The request is wrong (bad SQL, missing table, constraint violation): retrying cannot help."""
    transient = False


class BackendKeyRejected(BackendError):
    """A key parameter lies outside what the backend's type can hold: no row can match it."""
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


@dataclass
class WriteSpec:
    """How one route's keys are written; built once per route from its `write` config."""
    route: str
    key_params: list[str]                # template parameters, in order ($1..$k / key attributes)
    upsert: str | None = None            # postgres: SQL, key params then `fields`
    delete: str | None = None            # postgres
    fields: list[str] | None = None      # postgres: value fields bound after the key params (None: the whole value)
    table: str | None = None             # dynamodb
    key: dict[str, str] | None = None    # dynamodb: attribute -> template
    version_attribute: str | None = None


class Superseded:
    """The result of a write skipped because the database already holds a newer version of the key."""

    def __repr__(self) -> str:
        return "SUPERSEDED"


SUPERSEDED = Superseded()

WriteResult = BackendError | Superseded | None     # None: the write landed


@dataclass
class WriteOp:
    """One write to apply: an upsert of `fields` or a delete, for the key's parameters."""
    op: str                              # "upsert" | "delete"
    params: dict                         # the key's template parameters (typed)
    fields: dict | None = None           # upsert: column/attribute -> value (JSON types, or str for hashes)
    whole: object = None                 # upsert without `fields`: the value bound as one parameter
    version: int = 0                     # grows with every write of a key (from the queue entry id)
    item_key: dict | None = None         # dynamodb: the item's key attributes, filled from the key's parameters
    key: bytes = b""                     # the cache key: what the version is kept under
    supersede: bool = False              # write-through: always applies, and its version becomes newer than
                                         # the stored one (so every entry queued before it is skipped)


class Backend(Protocol):
    name: str
    cfg: object      # its config section; max_pool and queue_timeout size the loader's admission queue

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Readiness: is the backend reachable? Must not take a connection the data path needs."""

    async def check_read(self, spec: ReadSpec) -> None:
        """Startup validation of a route's read; raises BackendPermanentError when it cannot work."""

    async def fetch(self, spec: ReadSpec, params: list) -> list[dict]:
        """The rows/items for one key; an empty list means not found. BackendKeyRejected when a
        parameter cannot be expressed in the backend's type (checked before anything is sent)."""

    async def check_write(self, spec: WriteSpec) -> None:
        """Startup validation of a route's write statements; BackendPermanentError when they cannot work."""

    async def write_batch(self, spec: WriteSpec, ops: list[WriteOp]) -> list[WriteResult]:
        """Apply `ops` (a key's ops in the order given); one result per op: None when it landed,
        SUPERSEDED when the database holds a newer version of the key, a BackendPermanentError for a
        row that can never land. Raises BackendUnavailable when the whole batch should be retried
        later; never raises BackendPermanentError for the whole batch."""


T = TypeVar("T")


def required(value: T | None, backend: str, what: str) -> T:
    """A spec field this backend needs (config checks make sure it is set; this says which if not)."""
    if value is None:
        raise BackendPermanentError(backend, f"{what} is not set for this route")
    return value
