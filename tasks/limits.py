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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections.abc import AsyncIterator

from prefect import get_client, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.exceptions import ObjectNotFound

from imagebatch.config import BatchConfig
from imagebatch.errors import ConfigError
from imagebatch.resilience import LimitSpec, shared_limit_specs

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
        self._client = None

    async def _get_client(self):
        if self._client is None:
            client = get_client()
            await client.__aenter__()
            self._client = client
        return self._client

    @contextlib.asynccontextmanager
    async def slot(self, provider: str) -> AsyncIterator[None]:
        spec = self._in_flight.get(provider)
        if spec is None:
            yield
            return
        client = await self._get_client()
        async with self._queues.setdefault(provider, asyncio.Lock()):
            lease = await _poll(
                spec,
                lambda: client.increment_concurrency_slots_with_lease(
                    [spec.name], slots=1, mode="concurrency", lease_duration=self._lease_s
                ),
                self._poll_s,
            )
            try:
                if provider in self._rate:
                    await self._take_start(client, self._rate[provider])
            except BaseException:
                await client.release_concurrency_slots_with_lease(lease["lease_id"])
                raise
        renewing = asyncio.ensure_future(self._renew(client, lease["lease_id"]))
        try:
            yield
        finally:
            renewing.cancel()
            await client.release_concurrency_slots_with_lease(lease["lease_id"])

    async def _take_start(self, client, spec: LimitSpec) -> None:
        """Take one of the window's ``quota`` slots for a start, and give it back one window
        (60 s and the slack) after the server granted it.

        Asked for only when a read shows a free slot: a refused ask is a write, and on a SQLite
        server writes wait for each other. A worker that dies keeps its slots until their lease
        ends and the server's sweep frees them (at most ``window_lease_s`` and 15 s).
        """
        from httpx import HTTPStatusError

        while True:
            try:
                current = await client.read_global_concurrency_limit_by_name(spec.name)
            except ObjectNotFound:
                raise _limit_gone(spec) from None
            if current.active_slots >= current.limit:
                await asyncio.sleep(self._poll_s * random.uniform(0.5, 1.5))
                continue
            try:
                response = await client.increment_concurrency_slots_with_lease(
                    [spec.name], slots=1, mode="concurrency", lease_duration=self._window_lease_s
                )
            except HTTPStatusError as exc:
                if exc.response.status_code != 423:
                    raise
                continue  # another worker took the last one first
            body = response.json()
            if not body.get("limits"):
                raise _limit_gone(spec)
            break
        handle = asyncio.get_running_loop().call_later(
            spec.window_s or 61.0, lambda: self._give_back(client, body["lease_id"], handle)
        )
        self._due_back.add(handle)

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
                "could not give back a shared per-minute slot (its lease frees it): %s", exc
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

    async def aclose(self) -> None:
        """Close the client. Per-minute slots not yet due back are left to their leases (they
        come back within ``window_lease_s`` and the server's 15 s sweep): giving them back now
        would let the next minute hold more than the quota."""
        for handle in self._due_back:
            handle.cancel()
        self._due_back.clear()
        if self._releasing:
            await asyncio.gather(*self._releasing, return_exceptions=True)
        if self._client is not None:
            client, self._client = self._client, None
            await client.__aexit__(None, None, None)


def _limit_gone(spec: LimitSpec) -> ConfigError:
    return ConfigError(
        f"the global concurrency limit {spec.name!r} is gone: run `imagebatch limits sync` again",
        source="shared_limits",
    )


async def _poll(spec: LimitSpec, ask, pause: float) -> dict:
    """Ask for an in-flight slot until the server grants it; refusals (423) ask again after
    ``pause`` (a concurrency limit does not decay: a refusal costs only its round trip).

    Prefect's own ``rate_limit`` and ``concurrency`` sleep for the server's randomised
    ``Retry-After``, which grows with every refusal: measured, ``rate_limit`` delivers 60-74% of
    the nominal rate (bench/RESULTS.md). The bucket and the slots are kept by the server either
    way, so asking on our own schedule keeps the same guarantee and loses far less.
    """
    from httpx import HTTPStatusError

    while True:
        try:
            response = await ask()
        except HTTPStatusError as exc:
            if exc.response.status_code != 423:
                raise
            await asyncio.sleep(pause)
            continue
        body = response.json()
        limits = body.get("limits", []) if isinstance(body, dict) else body
        if not limits:  # strict: the limit was deleted since the batch started
            raise _limit_gone(spec)
        return body if isinstance(body, dict) else {}


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


async def sync_limits(config: BatchConfig, time_scale: float = 1.0) -> list[tuple[LimitSpec, str]]:
    """Create or update the shared limits of ``config``; what was done to each."""
    done = []
    async with get_client() as client:
        for spec in shared_limit_specs(config, time_scale):
            try:
                current = await client.read_global_concurrency_limit_by_name(spec.name)
            except ObjectNotFound:
                current = None
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
            done.append((spec, "unchanged" if same else "updated" if current else "created"))
    return done


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
            if current.limit != spec.limit or current.slot_decay_per_second != (
                spec.slot_decay_per_second or 0.0
            ):
                raise ConfigError(
                    f"the global concurrency limit {spec.name!r} (limit {current.limit}, decay "
                    f"{current.slot_decay_per_second}/s) does not match the config (limit "
                    f"{spec.limit}, decay {spec.slot_decay_per_second or 0.0}/s): {fix}",
                    source=source,
                    key="shared_limits",
                )
    return PrefectSharedLimits(specs)
