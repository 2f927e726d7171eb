"""The one place that reads the Prefect server's answers to the shared limits.

Two answers are not errors: **423** (a global concurrency limit's slots are all taken: ask
again later) and **busy** (a 5xx, SQLite's write lock held too long, or a broken connection,
after the client's own retries: back off and ask again; not worth ending a night for). Every
other failure is raised. :func:`ask` is the loop that applies that rule to one request;
:class:`ServerLink` is the run's one client and its background writes.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import httpx
from prefect import get_client

from imagebatch.errors import ConfigError

__all__ = ["ServerLink", "ask", "backoff", "busy", "limit_gone", "refused"]

log = logging.getLogger("imagebatch.limits")


def refused(exc: BaseException) -> bool:
    """A 423: every slot of the limit is taken (ask again when one may be free)."""
    return isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code == 423


def busy(exc: BaseException) -> bool:
    """A 5xx from the Prefect server or a broken connection, after the client's own retries."""
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code >= 500
    return isinstance(exc, httpx.TransportError)


async def backoff(exc: BaseException, tries: int, pause: float) -> None:
    """Wait before asking a busy server again: doubling from ``pause``, at most 10 s, jittered;
    said in the log on the first try and every tenth."""
    if tries == 1 or tries % 10 == 0:
        log.warning("the Prefect server is busy (%s); asking again for a shared slot", exc)
    await asyncio.sleep(min(10.0, pause * 2**tries) * random.uniform(0.5, 1.0))


async def ask(
    request: Callable[[], Awaitable[Any]],
    *,
    pause: float,
    on_refused: Callable[[], Awaitable[bool]] | None = None,
) -> Any:
    """``request()`` until the server answers it: a busy server is asked again after
    :func:`backoff`; a 423 is given to ``on_refused``, which waits as it sees fit and returns
    True to ask again (False: raise it). Any other error is raised."""
    tries = 0
    while True:
        try:
            return await request()
        except Exception as exc:
            if refused(exc) and on_refused is not None:
                if await on_refused():
                    continue
                raise
            if not busy(exc):
                raise
            tries += 1
            await backoff(exc, tries, pause)


def limit_gone(name: str) -> ConfigError:
    """A limit this run relies on was deleted since the batch started."""
    return ConfigError(
        f"the global concurrency limit {name!r} is gone: run `imagebatch limits sync` again",
        source="shared_limits",
    )


class ServerLink:
    """One Prefect client for the run (opened on first use, bound to its event loop) and the
    background writes made with it, which :meth:`aclose` waits for."""

    def __init__(self) -> None:
        self._client = None
        self._background: set[asyncio.Task] = set()

    @property
    def open(self) -> bool:
        return self._client is not None

    async def client(self):
        if self._client is None:
            client = get_client()
            await client.__aenter__()
            self._client = client
        return self._client

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` in the background (a write nobody waits for)."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def release(self, lease_id, what: str = "a shared slot") -> None:
        """Give a leased slot back; if the server cannot be reached its lease frees it."""
        try:
            await (await self.client()).release_concurrency_slots_with_lease(lease_id)
        except Exception as exc:  # its lease ends anyway: the slot comes back a little later
            log.warning("could not give back %s (its lease frees it): %s", what, exc)

    async def drain(self) -> None:
        """Wait for the background writes."""
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    async def aclose(self) -> None:
        await self.drain()
        if self._client is not None:
            client, self._client = self._client, None
            await client.__aexit__(None, None, None)
