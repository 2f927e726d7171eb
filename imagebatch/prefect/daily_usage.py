"""The daily allowance counted by the Prefect server for every worker.

One global concurrency limit per provider day, ``imagebatch-<provider>-rpd-<day>``, with ``rpd``
slots that are taken and never given back (created on the day's first request): the core's
``UsageStore`` for workers that share an account.
"""

from __future__ import annotations

import contextlib
import threading
import time

from prefect import get_client
from prefect.client.schemas.actions import (
    GlobalConcurrencyLimitCreate,
    GlobalConcurrencyLimitUpdate,
)
from prefect.exceptions import ObjectNotFound

from imagebatch.prefect.server import refused

__all__ = ["PrefectUsageStore"]


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
        name = self._name(key, day)
        client = self._get_client()
        self._ensure(client, name, limit)
        try:
            client.increment_concurrency_slots([name], slots=1, mode="concurrency")
        except Exception as exc:
            if refused(exc):  # every slot of the day is taken
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
        name = self._name(key, day)
        client = self._get_client()
        self._ensure(client, name, limit)
        client.update_global_concurrency_limit(
            name, GlobalConcurrencyLimitUpdate(active_slots=limit)
        )
        self._seen[name] = (limit, time.monotonic())
