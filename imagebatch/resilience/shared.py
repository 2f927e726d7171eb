"""Limits and provider state shared by every worker process that runs batches against one
provider account.

Each process paces itself precisely with its own :class:`~imagebatch.resilience.ProviderGate`;
on top of that, a :class:`SharedLimits` bounds what all processes do together: at most
``max_in_flight`` calls at once, and never more starts in any minute than the quota allows. It
also carries what one worker learns that every worker should act on (:class:`ProviderNews`: a
server's retry hint, a circuit that opened or closed) and lets one worker at a time probe a
provider whose circuit is open. The core only describes the limits (:func:`shared_limit_specs`)
and calls the seam; the Prefect side (global concurrency limits and variables) lives outside
the core.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from imagebatch.config import BatchConfig, ProviderConfig

__all__ = [
    "SHARED_PACE_SLACK_S",
    "LimitSpec",
    "NoSharedLimits",
    "ProviderNews",
    "SharedLimits",
    "SlotGivenUp",
    "limit_prefix",
    "shared_limit_specs",
]


@dataclass(frozen=True)
class ProviderNews:
    """What one worker learned about a provider that every worker should act on.

    Times are relative, in the clock seconds of the process that reads them (the shared side
    converts), so workers' clocks need not agree on an origin.
    """

    paused_for: float = 0.0  # a server's retry hint: no request starts for this long
    circuit: str | None = None  # "opened" or "closed"
    opened_ago: float = 0.0  # for "opened": how long ago it opened
    rate_limited: bool = False  # a 429 with no hint longer than a window: the quota may be lower


class SlotGivenUp(Exception):
    """Waiting for a shared slot was given up because ``abandon()`` said so; nothing is held."""


class SharedLimits(Protocol):
    def slot(
        self, provider: str, abandon: Callable[[], bool] | None = None
    ) -> AbstractAsyncContextManager[None]:
        """Held around one call to ``provider``: the shared in-flight cap, then the shared pace.

        While other workers hold the slots, ``abandon()`` is asked every few seconds; when it
        says so the wait ends with :class:`SlotGivenUp` (the call belongs elsewhere now).
        """

    def report(self, provider: str, news: ProviderNews) -> None:
        """Tell the other workers (without waiting for them to hear)."""

    def watch(self, apply: Callable[[str, ProviderNews], None]) -> None:
        """Call ``apply(provider, news)`` on this event loop with what other workers report."""

    async def claim_probe(self, provider: str, interval_s: float) -> bool:
        """Whether this worker may probe ``provider`` now: one probe per ``interval_s`` among
        all workers (a refused worker waits for the prober's news, or its next turn). A granted
        claim is held until :meth:`probe_ended` says when the probe left."""

    def probe_ended(self, provider: str, sent_ago: float | None) -> None:
        """The claimed probe is over: it left ``sent_ago`` seconds ago (the claim holds until
        one interval after that), or it never left (None: the next caller may probe)."""

    async def aclose(self) -> None:
        """Release connections at the end of the run."""


class NoSharedLimits:
    """One process alone: its own gates are the whole story."""

    @contextlib.asynccontextmanager
    async def slot(
        self, provider: str, abandon: Callable[[], bool] | None = None
    ) -> AsyncIterator[None]:
        yield

    def report(self, provider: str, news: ProviderNews) -> None:
        pass

    def watch(self, apply: Callable[[str, ProviderNews], None]) -> None:
        pass

    async def claim_probe(self, provider: str, interval_s: float) -> bool:
        return True

    def probe_ended(self, provider: str, sent_ago: float | None) -> None:
        pass

    async def aclose(self) -> None:
        pass


@dataclass(frozen=True)
class LimitSpec:
    """One shared limit: ``limit`` slots, freed at ``slot_decay_per_second`` (None: on release;
    a ``window`` slot is released ``window_s`` after it was taken)."""

    name: str
    provider: str
    kind: str  # "in-flight" or "window"
    limit: int
    slot_decay_per_second: float | None = None
    window_s: float | None = None


def limit_prefix(provider: ProviderConfig) -> str:
    """``imagebatch-<name>-<kind>-<model>``: limits are per account and model, not per config."""
    from imagebatch.resilience import usage_key

    return f"imagebatch-{usage_key(provider)}"


#: seconds of slack in the shared pace: a request may reach the provider this much later than
#: the server granted its start and still be counted in its own minute
SHARED_PACE_SLACK_S = 1.0


def shared_limit_specs(config: BatchConfig, time_scale: float = 1.0) -> list[LimitSpec]:
    """The shared limits a config needs, for every provider with a rate or an in-flight cap.

    The rate is a sliding window kept by the server: ``quota`` slots (whole requests: 10.5 RPM
    is 10), each start holding one from the moment the server grants it until 60 s and the
    slack after the worker got the grant. At any moment at most ``quota`` starts of the last
    window hold a slot, so no 60 s window of the provider's clock holds more than the quota,
    however the workers' requests fall, as long as each request reaches the provider within the
    slack of its grant. All of the quota is usable: a slot is back one window later. (Prefect's
    rate limits, which decay, restart their clock at every write to the limit: each start would
    lose the time its write waited, and on a SQLite server writes wait seconds.) Each worker's
    own gate still keeps the routing margin. A quota under one request a minute has one slot
    held for a minute per request.
    """
    config.require_resolved("shared limits")
    specs = []
    for provider in config.providers:
        prefix = limit_prefix(provider)
        limits = provider.limits
        specs.append(
            LimitSpec(f"{prefix}-in-flight", provider.name, "in-flight", limits.max_in_flight)
        )
        rates = [r for r in (limits.rpm, limits.ipm) if r is not None]
        if rates:
            quota = min(rates)
            slots = max(1, math.floor(quota))
            window = 60.0 * slots / quota if quota < 1 else 60.0
            specs.append(
                LimitSpec(
                    f"{prefix}-rpm",
                    provider.name,
                    "window",
                    slots,
                    window_s=(window + SHARED_PACE_SLACK_S) / time_scale,
                )
            )
    return specs
