"""Simulated time for async code: sleeps return when the simulation reaches their wake time.

``SimClock.run(coro)`` drives the event loop: it lets every runnable task run, then jumps the
clock to the earliest pending sleep. Nothing really sleeps, so a night runs in milliseconds.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Coroutine
from typing import Any


class SimClock:
    def __init__(self, start: float = 0.0) -> None:
        self.now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.now + max(0.0, seconds), next(self._seq), future))
        await future

    async def _settle(self) -> None:
        for _ in range(50):  # the code under test does no real I/O between sleeps
            await asyncio.sleep(0)

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        async def drive() -> Any:
            task = asyncio.ensure_future(coro)
            while True:
                await self._settle()
                if task.done():
                    return task.result()
                if not self._sleepers:
                    raise RuntimeError("deadlock: every task waits and nothing sleeps")
                wake, _, future = heapq.heappop(self._sleepers)
                self.now = max(self.now, wake)
                if not future.cancelled():
                    future.set_result(None)

        return asyncio.run(drive())
