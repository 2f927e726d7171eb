"""Provider limits shared across worker processes, as Prefect global concurrency limits.

``imagebatch limits sync --config FILE`` creates (or updates) per provider:

- ``imagebatch-<provider>-in-flight``: ``max_in_flight`` slots, held for the length of one call
  (a 60 s lease renewed while the call runs, so a killed worker's slot comes back within about
  75 s: the lease, then the server's 15 s sweep);
- ``imagebatch-<provider>-rpm``: a sliding window of ``quota`` slots, each start holding one
  for 60 s and the slack, so that all workers together never start more calls in a minute than
  the quota (see :func:`imagebatch.resilience.shared_limit_specs`);
- the daily allowance as one limit per provider day, ``imagebatch-<provider>-rpd-<day>``, with
  ``rpd`` slots that are taken and never given back (created on the day's first request).

Every use is strict: a batch whose limits were not synced fails before it sends a request,
naming the command that fixes it. Retries never hold a slot: a call holds its slots
only while it runs, and Prefect's retry wait happens outside it.

What one worker learns about a provider reaches the others through the same server, created on
first use (nothing to sync):

- the variable ``imagebatch-<provider>-news`` (``.`` written ``_``): the end of the latest retry
  hint and the circuit's last change (opened when, or closed), read by every worker once a
  second. Variables have no compare-and-set: a writer merges with what it read (the later pause,
  the later circuit change), reads back, and writes again if another worker's write replaced
  its own;
- the limit ``imagebatch-<provider>-probe``: one slot, taken by the worker that probes a
  provider whose circuit is open and held for the probe interval, so that all workers together
  send one probe per interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

from prefect import get_client, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.actions import (
    GlobalConcurrencyLimitCreate,
    GlobalConcurrencyLimitUpdate,
    VariableCreate,
    VariableUpdate,
)
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from imagebatch.config import BatchConfig
from imagebatch.errors import ConfigError, RateLimited
from imagebatch.resilience import LimitSpec, ProviderNews, SlotGivenUp, shared_limit_specs

log = logging.getLogger("imagebatch.limits")

#: seconds at a learned shared ceiling without a 429 before one more start per window is tried
#: (the same as a worker's own gate: ``GateSettings.probe_up_after_s``)
SHARED_CEILING_PROBE_UP_S = 600.0

__all__ = [
    "PrefectSharedLimits",
    "PrefectUsageStore",
    "check_shared_limits",
    "sync_limits",
]


class PrefectSharedLimits:
    """The shared in-flight cap (a leased slot), then the shared pace (a slot of the minute's
    window, given back a window later), around one call.

    One client for the run, and one request per process and provider asking the server at a
    time: Prefect lengthens every refused request's suggested wait by the number of refusals, so
    a crowd of waiters from one process would only slow each other down. Slots are asked for
    on our own schedule (:func:`_poll`, :meth:`_take_start`).
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
        self._in_flight = {s.provider: s for s in specs if s.kind == "in-flight"}
        self._rate = {s.provider: s for s in specs if s.kind == "window"}
        # a per-minute slot is given back one window after it was granted; its lease, longer
        # than the window (60 s is the server's floor), frees it if this process dies first
        self._window_lease_s = window_lease_s
        self._releasing: set[asyncio.Task] = set()
        self._due_back: set[asyncio.TimerHandle] = set()
        self._queues: dict[str, asyncio.Lock] = {}
        # a dead worker's slot comes back this long after its last renewal (plus the server's
        # 15 s sweep); a living one renews every third of it. 60 s is the server's floor.
        self._lease_s = lease_s
        self._poll_s = poll_s
        # a call waiting for slots asks whether it belongs elsewhere now this often
        self._abandon_check_s = 5.0 / time_scale
        self._client = None
        # provider news: one variable and one probe limit per provider, named like its limits
        prefixes = {s.provider: s.name.removesuffix("-in-flight") for s in self._in_flight.values()}
        self._news_names = {provider: news_name(prefix) for provider, prefix in prefixes.items()}
        self._probe_names = {provider: f"{prefix}-probe" for provider, prefix in prefixes.items()}
        self._news_poll_s = news_poll_s
        self._seen_circuit_at: dict[str, float] = {}
        self._first_news: dict[str, object] = {}
        self._writing_news: dict[str, asyncio.Lock] = {}
        self._background: set[asyncio.Task] = set()
        self._watching: asyncio.Task | None = None
        self._probe_limits: set[str] = set()
        # this worker's probe claims: lease id, interval, and the timer that gives it back
        self._probes: dict[str, tuple[str, float]] = {}
        self._probe_timers: dict[str, asyncio.TimerHandle] = {}
        self._raising: set[str] = set()
        # a learned shared ceiling is tried one higher after this long without a 429
        self._probe_up_s = SHARED_CEILING_PROBE_UP_S / time_scale
        self._worker = f"{socket.gethostname()}:{os.getpid()}"

    async def _get_client(self):
        if self._client is None:
            client = get_client()
            await client.__aenter__()
            self._client = client
        return self._client

    @contextlib.asynccontextmanager
    async def slot(
        self, provider: str, abandon: Callable[[], bool] | None = None
    ) -> AsyncIterator[None]:
        spec = self._in_flight.get(provider)
        if spec is None:
            yield
            return
        client = await self._get_client()
        give_up = _GiveUp(abandon, self._abandon_check_s)
        queue = self._queues.setdefault(provider, asyncio.Lock())
        await _lock_unless(queue, give_up)
        try:
            lease = await _poll(
                spec,
                lambda: client.increment_concurrency_slots_with_lease(
                    [spec.name], slots=1, mode="concurrency", lease_duration=self._lease_s
                ),
                self._poll_s,
                give_up,
            )
            start = None
            try:
                if provider in self._rate:
                    start = await self._take_start(client, self._rate[provider], give_up)
            except BaseException:
                await client.release_concurrency_slots_with_lease(lease["lease_id"])
                raise
        finally:
            queue.release()
        renewing = asyncio.ensure_future(self._renew(client, lease["lease_id"]))
        try:
            yield
        except RateLimited:
            # the provider refused it, so it did not count against the quota: its slot of the
            # window is free again now (and the window's count, read to learn a lower quota,
            # holds only what the provider let through)
            if start is not None:
                await self._return_start(client, *start)
            raise
        finally:
            renewing.cancel()
            try:
                await client.release_concurrency_slots_with_lease(lease["lease_id"])
            except Exception as exc:  # its lease ends unrenewed: the slot is back within 75 s
                if not _server_busy(exc):
                    raise
                log.warning(
                    "could not give back a shared in-flight slot (its lease frees it): %s", exc
                )

    async def _return_start(self, client, lease_id, handle: asyncio.TimerHandle) -> None:
        if handle not in self._due_back:
            return
        handle.cancel()
        self._due_back.discard(handle)
        await self._release_window_slot(client, lease_id)

    async def _take_start(
        self, client, spec: LimitSpec, give_up: _GiveUp
    ) -> tuple[str, asyncio.TimerHandle]:
        """Take one of the window's ``quota`` slots for a start, and give it back one window
        (60 s and the slack) after the server granted it.

        Asked for only when a read shows a free slot: a refused ask is a write, and on a SQLite
        server writes wait for each other. A worker that dies keeps its slots until their lease
        ends and the server's sweep frees them (at most ``window_lease_s`` and 15 s).

        Returns:
            The slot's lease and the timer that gives it back (a start the provider refuses
            gives it back at once).
        """
        from httpx import HTTPStatusError

        busy = 0
        while True:
            try:
                current = await client.read_global_concurrency_limit_by_name(spec.name)
            except ObjectNotFound:
                raise _limit_gone(spec) from None
            except Exception as exc:
                if not _server_busy(exc):
                    raise
                busy += 1
                await _wait_for_busy_server(exc, busy, self._poll_s)
                continue
            if current.active_slots >= current.limit:
                give_up.check()
                await asyncio.sleep(self._poll_s * random.uniform(0.5, 1.5))
                continue
            try:
                response = await client.increment_concurrency_slots_with_lease(
                    [spec.name], slots=1, mode="concurrency", lease_duration=self._window_lease_s
                )
            except HTTPStatusError as exc:
                if exc.response.status_code == 423:
                    continue  # another worker took the last one first
                if not _server_busy(exc):
                    raise
                busy += 1  # not granted (a grant lost on the way back would end with its lease)
                await _wait_for_busy_server(exc, busy, self._poll_s)
                continue
            body = response.json()
            if not body.get("limits"):
                raise _limit_gone(spec)
            break
        handle = asyncio.get_running_loop().call_later(
            spec.window_s or 61.0, lambda: self._give_back(client, body["lease_id"], handle)
        )
        self._due_back.add(handle)
        return body["lease_id"], handle

    def _give_back(self, client, lease_id, handle: asyncio.TimerHandle) -> None:
        self._due_back.discard(handle)
        task = asyncio.ensure_future(self._release_window_slot(client, lease_id))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def _release_window_slot(self, client, lease_id) -> None:
        try:
            await client.release_concurrency_slots_with_lease(lease_id)
        except Exception as exc:  # its lease ends anyway: the slot comes back a little later
            logging.getLogger("imagebatch.limits").warning(
                "could not give back a shared slot (its lease frees it): %s", exc
            )

    async def _renew(self, client, lease_id) -> None:
        """Keep a held slot's lease alive while the call runs (a call may outlast the lease)."""
        while True:
            await asyncio.sleep(self._lease_s / 3)
            try:
                await client.renew_concurrency_lease(lease_id, lease_duration=self._lease_s)
            except Exception as exc:  # the next renewal may get through; the lease has slack
                logging.getLogger("imagebatch.limits").warning(
                    "could not renew a shared in-flight slot's lease: %s", exc
                )

    # ------------------------------------------------------------------ provider news

    async def read_news(self) -> None:
        """Read every provider's news once before the run's first call: a worker that starts
        while another's circuit is open must not send its own opening failures."""
        async with get_client() as client:  # the run's own client belongs to its event loop
            for provider, name in self._news_names.items():
                self._first_news[provider] = await client.read_variable_by_name(name)

    def learned_ceiling(self, provider: str) -> int | None:
        """The per-minute limit the workers learned for ``provider``, as read before the run."""
        variable = self._first_news.get(provider)
        value = getattr(variable, "value", None)
        ceiling = value.get("ceiling") if isinstance(value, dict) else None
        return None if ceiling is None else int(ceiling)

    def watch(self, apply: Callable[[str, ProviderNews], None]) -> None:
        """Apply the news read before the run, then read every provider's news once a second
        and hand what changed to ``apply``."""
        for provider, variable in self._first_news.items():
            news = self._news_from(provider, variable)
            if news is not None:
                apply(provider, news)
        self._first_news.clear()
        if self._news_names and self._watching is None:
            self._watching = asyncio.ensure_future(self._watch(apply))

    async def _watch(self, apply: Callable[[str, ProviderNews], None]) -> None:
        warned_at = float("-inf")
        while True:
            for provider, name in self._news_names.items():
                try:
                    client = await self._get_client()
                    variable = await client.read_variable_by_name(name)
                except Exception as exc:  # the next read may get through; say so once a minute
                    if time.monotonic() - warned_at > 60:
                        warned_at = time.monotonic()
                        log.warning("could not read other workers' news of %s: %s", provider, exc)
                    continue
                news = self._news_from(provider, variable)
                if news is not None:
                    apply(provider, news)
                value = variable.value if variable is not None else None
                if isinstance(value, dict) and provider in self._rate:
                    ceiling, at = value.get("ceiling"), value.get("ceiling_at")
                    clean = at is not None and time.time() - float(at) >= self._probe_up_s
                    if ceiling is not None and clean and provider not in self._raising:
                        self._raising.add(provider)
                        self._background_task(self._raise_window(provider, int(ceiling)))
            await asyncio.sleep(self._news_poll_s)

    def _news_from(self, provider: str, variable) -> ProviderNews | None:
        value = variable.value if variable is not None else None
        if not isinstance(value, dict):
            return None
        now = time.time()
        paused_for = max(0.0, float(value.get("paused_until", 0.0)) - now)
        circuit, opened_ago = None, 0.0
        circuit_at = value.get("circuit_at")
        # only a change later than any this worker saw or made: a read racing our own write
        # still shows the change before it, which is not news
        if circuit_at is not None and circuit_at > self._seen_circuit_at.get(provider, -1.0):
            self._seen_circuit_at[provider] = circuit_at
            circuit = value.get("circuit")
            opened_ago = max(0.0, now - float(circuit_at))
        if paused_for <= 0 and circuit is None:
            return None
        return ProviderNews(paused_for=paused_for, circuit=circuit, opened_ago=opened_ago)

    def report(self, provider: str, news: ProviderNews) -> None:
        """Write ``news`` to the provider's variable in the background (merged with what is
        there: the later pause, the later circuit change); a 429 that may mean a lower quota
        lowers the shared per-minute window to what all workers started in it."""
        if provider not in self._news_names:
            return
        now = time.time()
        mine: dict = {}
        if news.paused_for > 0:
            mine["paused_until"] = now + news.paused_for
        if news.circuit is not None:
            mine["circuit"] = news.circuit
            mine["circuit_at"] = now - news.opened_ago if news.circuit == "opened" else now
            seen = self._seen_circuit_at.get(provider, -1.0)
            self._seen_circuit_at[provider] = max(seen, mine["circuit_at"])  # not news to us
        if mine:
            self._background_task(self._write_news(provider, mine))
        if news.rate_limited and provider in self._rate:
            self._background_task(self._lower_window(provider))

    def _background_task(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _lower_window(self, provider: str) -> None:
        """The provider refused a start although the shared window had room: its real quota
        is what every worker started in the last window, without the refused start. Lower the
        window's limit to that (the server then refuses every worker's extra start), and say
        so in the news, where the workers also raise it again by one after a clean spell."""
        spec = self._rate[provider]
        try:
            async with self._writing_news.setdefault(provider, asyncio.Lock()):
                client = await self._get_client()
                current = await client.read_global_concurrency_limit_by_name(spec.name)
                # the refused start gave its slot back: what is held, the provider let through
                # (a start refused at the same moment by another worker may still hold one:
                # then the next refusal takes the ceiling down the rest of the way)
                admitted = current.active_slots
                if current.limit >= spec.limit:
                    # as full as the configured quota allows: arrival jitter, not a lower quota
                    if admitted >= spec.limit - 1:
                        return
                elif admitted >= current.limit:
                    return
                ceiling = max(1, admitted)
                await client.update_global_concurrency_limit(
                    spec.name, GlobalConcurrencyLimitUpdate(limit=ceiling)
                )
            log.warning(
                "%s refused a call with %d started in the last minute by all workers: the shared "
                "per-minute limit %s is %d until a clean spell raises it (configured %d)",
                provider, admitted, spec.name, ceiling, spec.limit,
            )  # fmt: skip
            await self._write_news(provider, {"ceiling": ceiling, "ceiling_at": time.time()})
        except Exception as exc:  # each worker's own gate still learns from its 429s
            log.warning("could not lower the shared per-minute limit of %s: %s", provider, exc)

    async def _raise_window(self, provider: str, ceiling: int) -> None:
        """A clean spell at a learned ceiling: try one more start per window (a 429 lowers it
        again); at the configured quota the ceiling is gone."""
        spec = self._rate[provider]
        higher = ceiling + 1
        try:
            client = await self._get_client()
            await client.update_global_concurrency_limit(
                spec.name, GlobalConcurrencyLimitUpdate(limit=min(higher, spec.limit))
            )
            await self._write_news(
                provider,
                {"ceiling": higher if higher < spec.limit else None, "ceiling_at": time.time()},
            )
        except Exception as exc:
            log.warning("could not raise the shared per-minute limit of %s: %s", provider, exc)
        finally:
            self._raising.discard(provider)

    async def _write_news(self, provider: str, mine: dict) -> None:
        name = self._news_names[provider]
        try:
            async with self._writing_news.setdefault(provider, asyncio.Lock()):
                client = await self._get_client()
                for _ in range(3):  # no compare-and-set: write, read back, again if overwritten
                    variable = await client.read_variable_by_name(name)
                    value = variable.value if variable is not None else None
                    current = dict(value) if isinstance(value, dict) else {}
                    merged = _merge_news(current, mine, self._worker)
                    if merged == current:
                        return
                    if variable is None:
                        with contextlib.suppress(ObjectAlreadyExists):  # another worker's first
                            await client.create_variable(VariableCreate(name=name, value=merged))
                    else:
                        await client.update_variable(VariableUpdate(name=name, value=merged))
                    await asyncio.sleep(0.2)
        except Exception as exc:  # the others learn it from their own calls, a little later
            log.warning("could not tell other workers about %s: %s", provider, exc)

    async def claim_probe(self, provider: str, interval_s: float) -> bool:
        """Take the provider's probe slot (held until one interval after the probe left, see
        :meth:`probe_ended`; its lease frees it if this process dies first), or say another
        worker holds it. A slot this worker still holds from its last probe is taken anew."""
        from httpx import HTTPStatusError

        name = self._probe_names.get(provider)
        if name is None:
            return True
        client = await self._get_client()
        if provider in self._probes:  # our own last probe's interval: ours to end
            timer = self._probe_timers.pop(provider, None)
            if timer is not None:
                timer.cancel()
            lease_id, _ = self._probes.pop(provider)
            await self._release_window_slot(client, lease_id)
        try:
            if name not in self._probe_limits:
                try:
                    await client.read_global_concurrency_limit_by_name(name)
                except ObjectNotFound:
                    with contextlib.suppress(ObjectAlreadyExists):
                        await client.create_global_concurrency_limit(
                            GlobalConcurrencyLimitCreate(name=name, limit=1)
                        )
                self._probe_limits.add(name)
            response = await client.increment_concurrency_slots_with_lease(
                [name], slots=1, mode="concurrency", lease_duration=max(60.0, interval_s + 15.0)
            )
        except HTTPStatusError as exc:
            if exc.response.status_code == 423:
                return False
            log.warning("could not ask for %s's probe slot, probing anyway: %s", provider, exc)
            return True
        except Exception as exc:  # a probe too many is better than a provider never probed
            log.warning("could not ask for %s's probe slot, probing anyway: %s", provider, exc)
            return True
        lease_id = response.json().get("lease_id")
        if lease_id is not None:
            self._probes[provider] = (lease_id, interval_s)
        return True

    def probe_ended(self, provider: str, sent_ago: float | None) -> None:
        """Hold the probe slot until one interval after the probe left (then give it back), or
        give it back now if the probe never left."""
        if provider not in self._probes or self._client is None:
            return
        lease_id, interval_s = self._probes[provider]
        client = self._client
        keep = 0.0 if sent_ago is None else interval_s - sent_ago
        if keep <= 0:
            del self._probes[provider]
            self._background_task(self._release_window_slot(client, lease_id))
            return

        def give_back() -> None:
            if self._probes.get(provider, (None,))[0] == lease_id:
                del self._probes[provider]
                self._probe_timers.pop(provider, None)
                self._background_task(self._release_window_slot(client, lease_id))

        self._probe_timers[provider] = asyncio.get_running_loop().call_later(keep, give_back)
        # the lease outlives the hold (the probe waited at the gate and ran since it was taken)
        self._background_task(self._renew_probe(client, lease_id, keep))

    async def _renew_probe(self, client, lease_id, keep: float) -> None:
        try:
            await client.renew_concurrency_lease(lease_id, lease_duration=max(60.0, keep + 15.0))
        except Exception as exc:  # its first lease may still cover the interval
            log.warning("could not renew the probe slot's lease: %s", exc)

    async def aclose(self) -> None:
        """Close the client. Per-minute slots not yet due back are left to their leases (they
        come back within ``window_lease_s`` and the server's 15 s sweep): giving them back now
        would let the next minute hold more than the quota. News being written is waited for."""
        if self._watching is not None:
            self._watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watching
            self._watching = None
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        for handle in [*self._due_back, *self._probe_timers.values()]:
            handle.cancel()  # a probe slot's interval, too, is left to its lease
        self._due_back.clear()
        self._probe_timers.clear()
        if self._releasing:
            await asyncio.gather(*self._releasing, return_exceptions=True)
        if self._client is not None:
            client, self._client = self._client, None
            await client.__aexit__(None, None, None)


def _merge_news(current: dict, mine: dict, worker: str) -> dict:
    """``current`` with ``mine`` merged in: the later pause, the later circuit change; times
    also written in UTC for whoever reads the variable in the UI."""
    merged = dict(current)
    if mine.get("paused_until", 0.0) > current.get("paused_until", 0.0):
        merged["paused_until"] = mine["paused_until"]
        merged["paused_until_utc"] = _utc(mine["paused_until"])
        merged["paused_by"] = worker
    for field in ("circuit", "ceiling"):  # the later change wins
        at = f"{field}_at"
        if at in mine and mine[at] > current.get(at, float("-inf")):
            merged[field] = mine[field]
            merged[at] = mine[at]
            merged[f"{at}_utc"] = _utc(mine[at])
            merged[f"{field}_by"] = worker
    return merged


def _utc(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


def _limit_gone(spec: LimitSpec) -> ConfigError:
    return ConfigError(
        f"the global concurrency limit {spec.name!r} is gone: run `imagebatch limits sync` again",
        source="shared_limits",
    )


class _GiveUp:
    """Asks a waiting call's ``abandon()`` at most every ``every`` seconds."""

    def __init__(self, abandon: Callable[[], bool] | None, every: float) -> None:
        self.abandon, self.every = abandon, every
        self._asked_at = time.monotonic()

    def check(self) -> None:
        if self.abandon is None or time.monotonic() - self._asked_at < self.every:
            return
        self._asked_at = time.monotonic()
        if self.abandon():
            raise SlotGivenUp()


async def _lock_unless(lock: asyncio.Lock, give_up: _GiveUp) -> None:
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


async def _poll(spec: LimitSpec, ask, pause: float, give_up: _GiveUp | None = None) -> dict:
    """Ask for an in-flight slot until the server grants it; refusals (423) ask again after
    ``pause`` (a concurrency limit does not decay: a refusal costs only its round trip).

    Prefect's own ``rate_limit`` and ``concurrency`` sleep for the server's randomised
    ``Retry-After``, which grows with every refusal: measured, ``rate_limit`` delivers 60-74% of
    the nominal rate (bench/RESULTS.md). The bucket and the slots are kept by the server either
    way, so asking on our own schedule keeps the same guarantee and loses far less.
    """
    from httpx import HTTPStatusError

    busy = 0
    while True:
        try:
            response = await ask()
        except HTTPStatusError as exc:
            if exc.response.status_code == 423:
                if give_up is not None:
                    give_up.check()
                await asyncio.sleep(pause)
                continue
            if not _server_busy(exc):
                raise
            busy += 1
            await _wait_for_busy_server(exc, busy, pause)
            continue
        except Exception as exc:
            if not _server_busy(exc):
                raise
            busy += 1
            await _wait_for_busy_server(exc, busy, pause)
            continue
        body = response.json()
        limits = body.get("limits", []) if isinstance(body, dict) else body
        if not limits:  # strict: the limit was deleted since the batch started
            raise _limit_gone(spec)
        return body if isinstance(body, dict) else {}


def _server_busy(exc: BaseException) -> bool:
    """A 5xx from the Prefect server (SQLite's lock held too long) or a broken connection,
    after the client's own retries: worth asking again, not worth ending the night for."""
    import httpx

    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code >= 500
    return isinstance(exc, httpx.TransportError)


async def _wait_for_busy_server(exc: BaseException, tries: int, pause: float) -> None:
    if tries == 1 or tries % 10 == 0:
        log.warning("the Prefect server is busy (%s); asking again for a shared slot", exc)
    await asyncio.sleep(min(10.0, pause * 2**tries) * random.uniform(0.5, 1.0))


class PrefectUsageStore:
    """Daily usage per provider, counted by the Prefect server for every worker.

    One global concurrency limit per provider day with ``rpd`` slots: a request takes a slot
    and never gives it back. The router calls it synchronously, once per request.
    """

    remote = True  # the router counts requests from a worker thread

    def __init__(self, *, fresh_s: float = 5.0) -> None:
        self._known: set[str] = set()
        self._client = None
        self._lock = threading.Lock()
        # the router asks "any left today?" often: answer from what we last saw, for a while
        self._seen: dict[str, tuple[int, float]] = {}
        self._fresh_s = fresh_s

    def _get_client(self):
        with self._lock:
            if self._client is None:
                client = get_client(sync_client=True)
                client.__enter__()
                self._client = client
            return self._client

    def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            client.__exit__(None, None, None)

    @staticmethod
    def _name(key: str, day: str) -> str:
        return f"imagebatch-{key}-rpd-{day}"

    def _ensure(self, client, name: str, limit: int) -> None:
        if name in self._known:
            return
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            with contextlib.suppress(Exception):  # another worker created it in between
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=name, limit=limit)
                )
        self._known.add(name)

    def try_add(self, key: str, day: str, limit: int) -> bool:
        from httpx import HTTPStatusError

        name = self._name(key, day)
        client = self._get_client()
        self._ensure(client, name, limit)
        try:
            client.increment_concurrency_slots([name], slots=1, mode="concurrency")
        except HTTPStatusError as exc:
            if exc.response.status_code == 423:  # every slot of the day is taken
                self._seen[name] = (limit, time.monotonic())
                return False
            raise
        used, _ = self._seen.get(name, (0, 0.0))
        self._seen[name] = (used + 1, time.monotonic())
        return True

    def used(self, key: str, day: str) -> int:
        name = self._name(key, day)
        used, at = self._seen.get(name, (0, -1e9))
        if time.monotonic() - at < self._fresh_s:
            return used
        try:
            used = self._get_client().read_global_concurrency_limit_by_name(name).active_slots
        except ObjectNotFound:
            used = 0
        self._seen[name] = (used, time.monotonic())
        return used

    def exhaust(self, key: str, day: str, limit: int) -> None:
        from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

        name = self._name(key, day)
        client = self._get_client()
        self._ensure(client, name, limit)
        client.update_global_concurrency_limit(
            name, GlobalConcurrencyLimitUpdate(active_slots=limit)
        )
        self._seen[name] = (limit, time.monotonic())


async def sync_limits(
    config: BatchConfig, time_scale: float = 1.0, *, create_only: bool = False
) -> list[tuple[LimitSpec, str]]:
    """Create or update the shared limits of ``config``; what was done to each.

    ``create_only``: create the missing limits and leave those that exist as they are (a
    split night's parent: a ceiling the workers learned stays; a limit that no longer matches
    the config is reported by each shard's check, which says to run ``imagebatch limits
    sync``)."""
    done = []
    async with get_client() as client:
        for spec in shared_limit_specs(config, time_scale):
            try:
                current = await client.read_global_concurrency_limit_by_name(spec.name)
            except ObjectNotFound:
                current = None
            if create_only and current is not None:
                done.append((spec, "kept"))
                continue
            same = current is not None and (
                current.limit == spec.limit
                and current.slot_decay_per_second == (spec.slot_decay_per_second or 0.0)
                and current.active
            )
            if not same:
                await client.upsert_global_concurrency_limit_by_name(
                    # 0.0, not None: a per-minute limit synced by an earlier version decayed
                    spec.name,
                    spec.limit,
                    spec.slot_decay_per_second or 0.0,
                )
            what = "unchanged" if same else "updated" if current else "created"
            if spec.kind == "window" and await _forget_ceiling(client, spec):
                what = "reset"  # the workers had learned a lower quota: the config's is back
            done.append((spec, what))
    return done


async def _forget_ceiling(client, spec: LimitSpec) -> bool:
    """Clear a per-minute ceiling the workers learned (the news variable says so)."""
    name = news_name(spec.name.removesuffix("-rpm"))
    variable = await client.read_variable_by_name(name)
    value = variable.value if variable is not None else None
    if not isinstance(value, dict) or value.get("ceiling") is None:
        return False
    now = time.time()
    cleared = {**value, "ceiling": None, "ceiling_at": now, "ceiling_at_utc": _utc(now)}
    await client.update_variable(VariableUpdate(name=name, value=cleared))
    return True


def news_name(prefix: str) -> str:
    """The Prefect variable of a provider's news (variable names allow no dots)."""
    return re.sub(r"[^a-z0-9_-]", "_", f"{prefix}-news".lower())


@task(name="check_shared_limits", cache_policy=NO_CACHE, persist_result=False)
async def check_shared_limits(
    config: BatchConfig, time_scale: float = 1.0, source: str = "config"
) -> PrefectSharedLimits:
    """Fail before any request if the config's shared limits are missing or out of date.

    Returns:
        The shared limits to hold around each call.
    """
    specs = shared_limit_specs(config, time_scale)
    fix = "run `imagebatch limits sync" + (f" --config {source}`" if source else "`")
    shared = PrefectSharedLimits(specs, time_scale=time_scale)
    await shared.read_news()
    async with get_client() as client:
        for spec in specs:
            try:
                current = await client.read_global_concurrency_limit_by_name(spec.name)
            except ObjectNotFound:
                raise ConfigError(
                    f"shared_limits is on, but the Prefect server has no global concurrency "
                    f"limit {spec.name!r}: {fix} against this server first",
                    source=source,
                    key="shared_limits",
                ) from None
            # a per-minute window the workers lowered to a quota they learned is in order
            learned = spec.kind == "window" and current.limit == shared.learned_ceiling(
                spec.provider
            )
            if not learned and (
                current.limit != spec.limit
                or current.slot_decay_per_second != (spec.slot_decay_per_second or 0.0)
            ):
                raise ConfigError(
                    f"the global concurrency limit {spec.name!r} (limit {current.limit}, decay "
                    f"{current.slot_decay_per_second}/s) does not match the config (limit "
                    f"{spec.limit}, decay {spec.slot_decay_per_second or 0.0}/s): {fix}",
                    source=source,
                    key="shared_limits",
                )
    return shared
