"""Provider limits shared across worker processes: the core's ``SharedLimits`` on Prefect.

Per provider, on the Prefect server (``imagebatch limits sync`` creates the first two, see
:mod:`imagebatch.prefect.limit_admin`):

- the in-flight cap, a leased slot held around one call (:mod:`imagebatch.prefect.in_flight`);
- the per-minute quota, a sliding window of slots (:mod:`imagebatch.prefect.minute_window`);
- the news, a variable every worker reads once a second (:mod:`imagebatch.prefect.news`);
- the probe slot, one probe per interval among all workers (:mod:`imagebatch.prefect.probes`).

The daily allowance is :class:`imagebatch.prefect.daily_usage.PrefectUsageStore`. Every use is
strict: a batch whose limits were not synced fails before it sends a request, naming the
command that fixes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Callable

from imagebatch.errors import RateLimited
from imagebatch.prefect.in_flight import GiveUp, InFlightSlots, lock_unless
from imagebatch.prefect.minute_window import MinuteWindow
from imagebatch.prefect.news import NewsBoard, news_name
from imagebatch.prefect.probes import ProbeSlots
from imagebatch.prefect.server import ServerLink
from imagebatch.resilience import LimitSpec, ProviderNews

__all__ = ["SHARED_CEILING_PROBE_UP_S", "PrefectSharedLimits"]

#: seconds at a learned shared ceiling without a 429 before one more start per window is tried
#: (the same as a worker's own gate: ``GateSettings.probe_up_after_s``)
SHARED_CEILING_PROBE_UP_S = 600.0


class PrefectSharedLimits:
    """The shared in-flight cap (a leased slot), then the shared pace (a slot of the minute's
    window, given back a window later), around one call; news and probes beside them.

    One client for the run, and one request per process and provider asking the server at a
    time: Prefect lengthens every refused request's suggested wait by the number of refusals, so
    a crowd of waiters from one process would only slow each other down. Slots are asked for
    on our own schedule.
    """

    def __init__(
        self,
        specs: list[LimitSpec],
        *,
        lease_s: float = 60.0,
        poll_s: float = 0.2,
        window_lease_s: float = 75.0,
        news_poll_s: float = 1.0,
        time_scale: float = 1.0,
    ):
        self._link = ServerLink()
        in_flight = {s.provider: s for s in specs if s.kind == "in-flight"}
        self._slots = InFlightSlots(self._link, in_flight, lease_s=lease_s, poll_s=poll_s)
        self._window = MinuteWindow(
            self._link,
            {s.provider: s for s in specs if s.kind == "window"},
            poll_s=poll_s,
            lease_s=window_lease_s,
        )
        # news and probes: one variable and one probe limit per provider, named like its limits
        prefixes = {s.provider: s.name.removesuffix("-in-flight") for s in in_flight.values()}
        self._news = NewsBoard(
            self._link,
            {provider: news_name(prefix) for provider, prefix in prefixes.items()},
            self._window,
            poll_s=news_poll_s,
            probe_up_s=SHARED_CEILING_PROBE_UP_S / time_scale,
            worker=f"{socket.gethostname()}:{os.getpid()}",
        )
        self._probes = ProbeSlots(
            self._link, {provider: f"{prefix}-probe" for provider, prefix in prefixes.items()}
        )
        self._queues: dict[str, asyncio.Lock] = {}
        # a call waiting for slots asks whether it belongs elsewhere now this often
        self._abandon_check_s = 5.0 / time_scale

    @contextlib.asynccontextmanager
    async def slot(
        self, provider: str, abandon: Callable[[], bool] | None = None
    ) -> AsyncIterator[None]:
        if provider not in self._slots:
            yield
            return
        give_up = GiveUp(abandon, self._abandon_check_s)
        queue = self._queues.setdefault(provider, asyncio.Lock())
        await lock_unless(queue, give_up)
        try:
            lease_id = await self._slots.take(provider, give_up)
            start = None
            try:
                if provider in self._window:
                    start = await self._window.take_start(provider, give_up.check)
            except BaseException:
                await self._slots.give_back(lease_id)
                raise
        finally:
            queue.release()
        async with self._slots.renewed(lease_id):
            try:
                yield
            except RateLimited:
                if start is not None:
                    await self._window.refused_start(start)
                raise

    # the news and the probe slot (see imagebatch.prefect.news and .probes)

    async def read_news(self) -> None:
        await self._news.read_first()

    def learned_ceiling(self, provider: str) -> int | None:
        return self._news.learned_ceiling(provider)

    def watch(self, apply: Callable[[str, ProviderNews], None]) -> None:
        self._news.watch(apply)

    def report(self, provider: str, news: ProviderNews) -> None:
        self._news.report(provider, news)

    def _news_from(self, provider: str, variable) -> ProviderNews | None:
        return self._news.news_from(provider, variable)

    async def claim_probe(self, provider: str, interval_s: float) -> bool:
        return await self._probes.claim(provider, interval_s)

    def probe_ended(self, provider: str, sent_ago: float | None) -> None:
        self._probes.ended(provider, sent_ago)

    async def aclose(self) -> None:
        """Close the client. Per-minute slots not yet due back, and a probe slot's interval,
        are left to their leases (they come back within the lease and the server's 15 s sweep):
        giving them back now would let the next minute hold more than the quota. News being
        written is waited for."""
        await self._news.stop()
        self._window.leave()
        self._probes.leave()
        await self._link.aclose()
