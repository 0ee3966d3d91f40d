"""A restartable watch of a JetStream KV bucket, shared by the snapshot and ownership stores.

nats-py's watch does not survive a server restart reliably, so the owner of a watch calls
:meth:`KeyWatch.restart` from the client's reconnected callback; the new watch first delivers the
current value of every key again, then live updates. Entries go to one callback, in order; a
callback that raises is logged and the watch goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable

import nats.errors
from nats.js.kv import KeyValue

__all__ = ["WATCH_ATTEMPTS", "EntryCallback", "KeyWatch"]

log = logging.getLogger(__name__)

WATCH_ATTEMPTS = 5
"""Times a KV watch is set up before its error is raised (each a 5 s JetStream API request)."""

EntryCallback = Callable[[KeyValue.Entry], Awaitable[None] | None]


class KeyWatch:
    """One watch of ``keys`` (a key filter, ``>`` for all) in ``kv``, restartable."""

    def __init__(self, kv: KeyValue, keys: str, callback: EntryCallback, *, name: str) -> None:
        self.kv = kv
        self.keys = keys
        self.callback = callback
        self.name = name
        self._watcher: KeyValue.KeyWatcher | None = None
        self._task: asyncio.Task[None] | None = None
        self._synced = asyncio.Event()
        self._restart_lock = asyncio.Lock()
        self._stopped = False

    async def start(self) -> None:
        """Set the watch up (retrying a busy server a few times); returns once it is."""
        self._synced.clear()
        delay = 0.2
        for attempt in range(WATCH_ATTEMPTS):
            try:
                watcher = await self.kv.watch(self.keys)
                break
            except (TimeoutError, nats.errors.TimeoutError) as exc:
                # A server busy storing a burst of events (a thousand pools recovering at once)
                # can answer the watch's consumer info late; nats-py has unsubscribed by then.
                if attempt + 1 == WATCH_ATTEMPTS:
                    raise
                log.warning("KV watch not set up (%s); retrying in %.1f s", exc or "timeout", delay)
                await asyncio.sleep(delay)  # ok: backoff before asking a busy server again
                delay = min(delay * 2, 2.0)
        self._watcher = watcher
        self._task = asyncio.get_running_loop().create_task(self._pump(watcher), name=self.name)

    async def restart(self) -> None:
        """Re-create the watch (call from the NATS reconnected callback). Serialised: two
        reconnects in quick succession must not leave two watchers running."""
        async with self._restart_lock:
            if self._stopped:
                return
            await self._stop_current()
            await self.start()

    async def wait_synced(self) -> None:
        """Wait until the current watch has delivered every key's value present at its start."""
        await self._synced.wait()

    async def stop(self) -> None:
        """Stop watching for good."""
        self._stopped = True
        await self._stop_current()

    async def _stop_current(self) -> None:
        watcher, task = self._watcher, self._task
        self._watcher = self._task = None
        if watcher is not None:
            # The old subscription may belong to a connection that is gone; stopping is best-effort.
            with contextlib.suppress(TimeoutError, nats.errors.Error, OSError):
                await watcher.stop()  # type: ignore[no-untyped-call]
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _pump(self, watcher: KeyValue.KeyWatcher) -> None:
        async for entry in watcher:
            if entry is None:
                # nats-py's marker: every value present at watch start has been delivered.
                self._synced.set()
                continue
            try:
                result = self.callback(entry)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("KV watch %s: callback failed for %r", self.name, entry.key)
