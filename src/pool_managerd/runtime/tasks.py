"""The daemon's background tasks: started by name, logged when they fail, cancelled at shutdown."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)


class BackgroundTasks:
    """Tasks the daemon starts and forgets (command handlers, health publishes, take-overs).

    Each is held here until done, so the event loop cannot collect it mid-flight and shutdown
    can cancel whatever is still running."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def start(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        """Run ``coro`` as a task called ``name``; a failure is logged, never raised."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s failed: %s", task.get_name(), task.exception())

    async def cancel_all(self, timeout_s: float) -> None:
        """Cancel every task still running and wait up to ``timeout_s`` for them to end."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=timeout_s)
            if stuck:
                log.error("shutdown: tasks still running after cancel: %s",
                          ", ".join(sorted(t.get_name() for t in stuck)))  # fmt: skip
