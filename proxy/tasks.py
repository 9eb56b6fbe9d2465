"""Background work, tracked: one way to start work that outlives the call that started it.

Every task started here is cancelled at shutdown (close()), and a failure never vanishes: it is logged
and, when the work owes a client an answer, `on_error` gives it one (e.g. fills the client's reply
slot with an internal error), so a bug can never leave a client waiting forever.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger("cacheproxy.tasks")


class Background:
    def __init__(self) -> None:
        self.tasks: set[asyncio.Task] = set()

    def spawn(self, work: Coroutine[Any, Any, Any], on_error: Callable[[], None] | None = None,
              what: str = "background work") -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(self._guarded(work, on_error, what))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    @staticmethod
    async def _guarded(work, on_error, what: str) -> None:
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s failed", what)
            if on_error is not None:
                on_error()

    async def close(self) -> None:
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
