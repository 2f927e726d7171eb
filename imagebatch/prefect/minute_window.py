"""The per-minute quota shared by every worker: a sliding window of slots on the Prefect server.

The limit ``imagebatch-<provider>-rpm`` has ``quota`` slots. A call takes one when it starts
and gives it back one window (60 s and the slack) after the grant, so that all workers together
never start more calls in a minute than the quota (see
:func:`imagebatch.resilience.shared_limit_specs`). A start the provider refuses gives its slot
back at once. When the provider refuses a start although the window had room, the window's
limit is lowered to what every worker started in it (a learned ceiling, which
:mod:`imagebatch.prefect.news` tells the workers and raises again after a clean spell).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate
from prefect.exceptions import ObjectNotFound

from imagebatch.prefect.server import ServerLink, ask, limit_gone, refused
from imagebatch.resilience import LimitSpec

__all__ = ["MinuteWindow", "Start"]

#: a start's slot: its lease and the timer that gives it back
Start = tuple[str, asyncio.TimerHandle]


class MinuteWindow:
    """The shared per-minute windows of the providers that have an ``rpm`` spec."""

    def __init__(
        self, link: ServerLink, specs: dict[str, LimitSpec], *, poll_s: float, lease_s: float
    ) -> None:
        self._link = link
        self.specs = specs
        self._poll_s = poll_s
        # a slot is given back one window after it was granted; its lease, longer than the
        # window (60 s is the server's floor), frees it if this process dies first
        self._lease_s = lease_s
        self._due_back: set[asyncio.TimerHandle] = set()

    def __contains__(self, provider: str) -> bool:
        return provider in self.specs

    async def take_start(self, provider: str, check: Callable[[], None]) -> Start:
        """Take one of the window's ``quota`` slots for a start, and give it back one window
        after the server granted it.

        Asked for only when a read shows a free slot: a refused ask is a write, and on a SQLite
        server writes wait for each other. ``check()`` is called while the window is full (it
        raises to give the wait up). A worker that dies keeps its slots until their lease ends
        and the server's sweep frees them (at most the lease and 15 s).
        """
        spec = self.specs[provider]
        client = await self._link.client()
        while True:
            try:
                current = await ask(
                    lambda: client.read_global_concurrency_limit_by_name(spec.name),
                    pause=self._poll_s,
                )
            except ObjectNotFound:
                raise limit_gone(spec.name) from None
            if current.active_slots >= current.limit:
                check()
                await asyncio.sleep(self._poll_s * random.uniform(0.5, 1.5))
                continue
            try:
                # not granted if the server was busy (a grant lost on the way back would end
                # with its lease)
                response = await ask(
                    lambda: client.increment_concurrency_slots_with_lease(
                        [spec.name], slots=1, mode="concurrency", lease_duration=self._lease_s
                    ),
                    pause=self._poll_s,
                )
            except Exception as exc:
                if refused(exc):
                    continue  # another worker took the last one first
                raise
            body = response.json()
            if not body.get("limits"):
                raise limit_gone(spec.name)
            break
        lease_id = body["lease_id"]
        handle = asyncio.get_running_loop().call_later(
            spec.window_s or 61.0, lambda: self._give_back(lease_id, handle)
        )
        self._due_back.add(handle)
        return lease_id, handle

    async def refused_start(self, start: Start) -> None:
        """The provider refused the start, so it did not count against its quota: its slot is
        free again now (and the window's count, read to learn a lower quota, holds only what
        the provider let through)."""
        lease_id, handle = start
        if handle not in self._due_back:
            return
        handle.cancel()
        self._due_back.discard(handle)
        await self._link.release(lease_id)

    def _give_back(self, lease_id: str, handle: asyncio.TimerHandle) -> None:
        self._due_back.discard(handle)
        self._link.spawn(self._link.release(lease_id))

    async def lower(self, provider: str) -> tuple[int, int] | None:
        """The provider refused a start although the window had room: lower the window's limit
        to what every worker started in the last window, without the refused start (the server
        then refuses every worker's extra start). The new ceiling and how many had started, or
        None when the window was as full as it is filled (arrival jitter, not a lower quota)."""
        spec = self.specs[provider]
        client = await self._link.client()
        current = await client.read_global_concurrency_limit_by_name(spec.name)
        # the refused start gave its slot back: what is held, the provider let through (a start
        # refused at the same moment by another worker may still hold one: then the next
        # refusal takes the ceiling down the rest of the way)
        admitted = current.active_slots
        if current.limit >= spec.limit:
            if admitted >= spec.limit - 1:
                return None
        elif admitted >= current.limit:
            return None
        ceiling = max(1, admitted)
        await client.update_global_concurrency_limit(
            spec.name, GlobalConcurrencyLimitUpdate(limit=ceiling)
        )
        return ceiling, admitted

    async def raise_by_one(self, provider: str, ceiling: int) -> int | None:
        """One more start per window than the learned ``ceiling`` (a 429 lowers it again); the
        new ceiling, or None when that reaches the configured quota (no ceiling any more)."""
        spec = self.specs[provider]
        higher = ceiling + 1
        client = await self._link.client()
        await client.update_global_concurrency_limit(
            spec.name, GlobalConcurrencyLimitUpdate(limit=min(higher, spec.limit))
        )
        return higher if higher < spec.limit else None

    def leave(self) -> None:
        """Slots not yet due back are left to their leases: giving them back now would let the
        next minute hold more than the quota."""
        for handle in self._due_back:
            handle.cancel()
        self._due_back.clear()
