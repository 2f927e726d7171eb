"""The in-flight cap shared by every worker: a leased slot of ``imagebatch-<provider>-in-flight``.

A call holds one slot for as long as it runs: a 60 s lease renewed every third of it, so a
killed worker's slot comes back within about 75 s (the lease, then the server's 15 s sweep).
Retries never hold a slot: Prefect's retry wait happens outside the call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from imagebatch.prefect.server import ServerLink, ask, busy, limit_gone
from imagebatch.resilience import LimitSpec, SlotGivenUp

__all__ = ["GiveUp", "InFlightSlots", "lock_unless"]

log = logging.getLogger("imagebatch.limits")


class GiveUp:
    """Asks a waiting call's ``abandon()`` at most every ``every`` seconds."""

    def __init__(self, abandon: Callable[[], bool] | None, every: float) -> None:
        self.abandon, self.every = abandon, every
        self._asked_at = time.monotonic()

    def check(self) -> None:
        """Raise :class:`SlotGivenUp` if ``abandon()`` says the call belongs elsewhere now."""
        if self.abandon is None or time.monotonic() - self._asked_at < self.every:
            return
        self._asked_at = time.monotonic()
        if self.abandon():
            raise SlotGivenUp()


async def lock_unless(lock: asyncio.Lock, give_up: GiveUp) -> None:
    """Take ``lock`` (queued in order), or raise :class:`SlotGivenUp` holding nothing."""
    if give_up.abandon is None:
        await lock.acquire()
        return
    taking = asyncio.ensure_future(lock.acquire())
    try:
        while not taking.done():
            await asyncio.wait({taking}, timeout=give_up.every)
            if not taking.done():
                give_up.check()
    except BaseException:  # given up, or cancelled: a lock taken meanwhile goes back
        taking.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            if await taking:
                lock.release()
        raise


class InFlightSlots:
    """The providers' shared in-flight caps."""

    def __init__(
        self, link: ServerLink, specs: dict[str, LimitSpec], *, lease_s: float, poll_s: float
    ) -> None:
        self._link = link
        self.specs = specs
        # a dead worker's slot comes back this long after its last renewal (plus the server's
        # 15 s sweep); a living one renews every third of it. 60 s is the server's floor.
        self._lease_s = lease_s
        self._poll_s = poll_s

    def __contains__(self, provider: str) -> bool:
        return provider in self.specs

    async def take(self, provider: str, give_up: GiveUp) -> str:
        """Ask for a slot until the server grants it; its lease id. Refusals (423) ask again
        after the poll pause (a concurrency limit does not decay: a refusal costs only its
        round trip).

        Prefect's own ``rate_limit`` and ``concurrency`` sleep for the server's randomised
        ``Retry-After``, which grows with every refusal: measured, ``rate_limit`` delivers
        60-74% of the nominal rate (bench/RESULTS.md). The slots are kept by the server either
        way, so asking on our own schedule keeps the same guarantee and loses far less.
        """
        spec = self.specs[provider]
        client = await self._link.client()

        async def wait_and_ask_again() -> bool:
            give_up.check()
            await asyncio.sleep(self._poll_s)
            return True

        response = await ask(
            lambda: client.increment_concurrency_slots_with_lease(
                [spec.name], slots=1, mode="concurrency", lease_duration=self._lease_s
            ),
            pause=self._poll_s,
            on_refused=wait_and_ask_again,
        )
        body = response.json()
        limits = body.get("limits", []) if isinstance(body, dict) else body
        if not limits:  # strict: the limit was deleted since the batch started
            raise limit_gone(spec.name)
        return body.get("lease_id") if isinstance(body, dict) else None

    @contextlib.asynccontextmanager
    async def renewed(self, lease_id: str):
        """Keep the slot's lease alive while the call runs, and give the slot back after it."""
        client = await self._link.client()
        renewing = asyncio.ensure_future(self._renew(client, lease_id))
        try:
            yield
        finally:
            renewing.cancel()
            await self.give_back(lease_id)

    async def give_back(self, lease_id: str) -> None:
        client = await self._link.client()
        try:
            await client.release_concurrency_slots_with_lease(lease_id)
        except Exception as exc:  # its lease ends unrenewed: the slot is back within 75 s
            if not busy(exc):
                raise
            log.warning("could not give back a shared in-flight slot (its lease frees it): %s", exc)

    async def _renew(self, client, lease_id: str) -> None:
        """A call may outlast the lease: renew it every third of its length."""
        while True:
            await asyncio.sleep(self._lease_s / 3)
            try:
                await client.renew_concurrency_lease(lease_id, lease_duration=self._lease_s)
            except Exception as exc:  # the next renewal may get through; the lease has slack
                log.warning("could not renew a shared in-flight slot's lease: %s", exc)
