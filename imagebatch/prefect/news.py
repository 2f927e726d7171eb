"""What one worker learns about a provider, told to every worker through a Prefect variable.

The variable ``imagebatch-<provider>-news`` (``.`` written ``_``) holds the end of the latest
retry hint, the circuit's last change (opened when, or closed) and a learned per-minute
ceiling; every worker reads it once a second. Variables have no compare-and-set: a writer merges
with what it read (the later pause, the later change), reads back, and writes again if another
worker's write replaced its own. Created on first use (nothing to sync).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime

from prefect import get_client
from prefect.client.schemas.actions import VariableCreate, VariableUpdate
from prefect.exceptions import ObjectAlreadyExists

from imagebatch.prefect.minute_window import MinuteWindow
from imagebatch.prefect.server import ServerLink
from imagebatch.resilience import ProviderNews

__all__ = ["NewsBoard", "merge_news", "news_name"]

log = logging.getLogger("imagebatch.limits")

Apply = Callable[[str, ProviderNews], None]


def news_name(prefix: str) -> str:
    """The Prefect variable of a provider's news (variable names allow no dots)."""
    return re.sub(r"[^a-z0-9_-]", "_", f"{prefix}-news".lower())


class NewsBoard:
    """Reads and writes the providers' news variables for one run."""

    def __init__(
        self,
        link: ServerLink,
        names: dict[str, str],
        window: MinuteWindow,
        *,
        poll_s: float,
        probe_up_s: float,
        worker: str,
    ) -> None:
        self._link = link
        self._names = names  # provider -> its variable
        self._window = window
        self._poll_s = poll_s
        # a learned shared ceiling is tried one higher after this long without a 429
        self._probe_up_s = probe_up_s
        self._worker = worker
        self._seen_circuit_at: dict[str, float] = {}
        self._first: dict[str, object] = {}
        self._writing: dict[str, asyncio.Lock] = {}
        self._raising: set[str] = set()
        self._watching: asyncio.Task | None = None

    async def read_first(self) -> None:
        """Read every provider's news once before the run's first call: a worker that starts
        while another's circuit is open must not send its own opening failures."""
        async with get_client() as client:  # the run's own client belongs to its event loop
            for provider, name in self._names.items():
                self._first[provider] = await client.read_variable_by_name(name)

    def learned_ceiling(self, provider: str) -> int | None:
        """The per-minute limit the workers learned for ``provider``, as read before the run."""
        value = getattr(self._first.get(provider), "value", None)
        ceiling = value.get("ceiling") if isinstance(value, dict) else None
        return None if ceiling is None else int(ceiling)

    def watch(self, apply: Apply) -> None:
        """Apply the news read before the run, then read every provider's news once a second
        and hand what changed to ``apply``."""
        for provider, variable in self._first.items():
            news = self.news_from(provider, variable)
            if news is not None:
                apply(provider, news)
        self._first.clear()
        if self._names and self._watching is None:
            self._watching = asyncio.ensure_future(self._watch(apply))

    async def stop(self) -> None:
        if self._watching is not None:
            self._watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watching
            self._watching = None

    async def _watch(self, apply: Apply) -> None:
        warned_at = float("-inf")
        while True:
            for provider, name in self._names.items():
                try:
                    client = await self._link.client()
                    variable = await client.read_variable_by_name(name)
                except Exception as exc:  # the next read may get through; say so once a minute
                    if time.monotonic() - warned_at > 60:
                        warned_at = time.monotonic()
                        log.warning("could not read other workers' news of %s: %s", provider, exc)
                    continue
                news = self.news_from(provider, variable)
                if news is not None:
                    apply(provider, news)
                value = variable.value if variable is not None else None
                if isinstance(value, dict) and provider in self._window:
                    ceiling, at = value.get("ceiling"), value.get("ceiling_at")
                    clean = at is not None and time.time() - float(at) >= self._probe_up_s
                    if ceiling is not None and clean and provider not in self._raising:
                        self._raising.add(provider)
                        self._link.spawn(self._raise_ceiling(provider, int(ceiling)))
            await asyncio.sleep(self._poll_s)

    def news_from(self, provider: str, variable) -> ProviderNews | None:
        """What a read of ``provider``'s variable tells this worker that it did not know."""
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
        if provider not in self._names:
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
            self._link.spawn(self._write(provider, mine))
        if news.rate_limited and provider in self._window:
            self._link.spawn(self._lower_ceiling(provider))

    async def _lower_ceiling(self, provider: str) -> None:
        """The provider refused a start although the shared window had room: lower the window
        to what every worker started in it, and say so in the news, where the workers also
        raise it again by one after a clean spell."""
        spec = self._window.specs[provider]
        try:
            async with self._writing.setdefault(provider, asyncio.Lock()):
                lowered = await self._window.lower(provider)
            if lowered is None:
                return
            ceiling, admitted = lowered
            log.warning(
                "%s refused a call with %d started in the last minute by all workers: the shared "
                "per-minute limit %s is %d until a clean spell raises it (configured %d)",
                provider, admitted, spec.name, ceiling, spec.limit,
            )  # fmt: skip
            await self._write(provider, {"ceiling": ceiling, "ceiling_at": time.time()})
        except Exception as exc:  # each worker's own gate still learns from its 429s
            log.warning("could not lower the shared per-minute limit of %s: %s", provider, exc)

    async def _raise_ceiling(self, provider: str, ceiling: int) -> None:
        """A clean spell at a learned ceiling: one more start per window (a 429 lowers it
        again); at the configured quota the ceiling is gone."""
        try:
            higher = await self._window.raise_by_one(provider, ceiling)
            await self._write(provider, {"ceiling": higher, "ceiling_at": time.time()})
        except Exception as exc:
            log.warning("could not raise the shared per-minute limit of %s: %s", provider, exc)
        finally:
            self._raising.discard(provider)

    async def _write(self, provider: str, mine: dict) -> None:
        name = self._names[provider]
        try:
            async with self._writing.setdefault(provider, asyncio.Lock()):
                client = await self._link.client()
                for _ in range(3):  # no compare-and-set: write, read back, again if overwritten
                    variable = await client.read_variable_by_name(name)
                    value = variable.value if variable is not None else None
                    current = dict(value) if isinstance(value, dict) else {}
                    merged = merge_news(current, mine, self._worker)
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


def merge_news(current: dict, mine: dict, worker: str) -> dict:
    """``current`` with ``mine`` merged in: the later pause, the later circuit change; times
    also written in UTC for whoever reads the variable in the UI."""
    merged = dict(current)
    if mine.get("paused_until", 0.0) > current.get("paused_until", 0.0):
        merged["paused_until"] = mine["paused_until"]
        merged["paused_until_utc"] = utc(mine["paused_until"])
        merged["paused_by"] = worker
    for field in ("circuit", "ceiling"):  # the later change wins
        at = f"{field}_at"
        if at in mine and mine[at] > current.get(at, float("-inf")):
            merged[field] = mine[field]
            merged[at] = mine[at]
            merged[f"{at}_utc"] = utc(mine[at])
            merged[f"{field}_by"] = worker
    return merged


def utc(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")
