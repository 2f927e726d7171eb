"""Limits shared by every worker process that runs batches against one provider account.

Each process paces itself precisely with its own :class:`~imagebatch.resilience.ProviderGate`;
on top of that, a :class:`SharedLimits` bounds what all processes do together: at most
``max_in_flight`` calls at once, and never more starts in any minute than the quota allows. The
core only describes the limits (:func:`shared_limit_specs`) and calls the seam; the Prefect side
(global concurrency limits) lives outside the core.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from imagebatch.config import BatchConfig, ProviderConfig

__all__ = [
    "LimitSpec",
    "NoSharedLimits",
    "SharedLimits",
    "limit_prefix",
    "shared_limit_specs",
]


class SharedLimits(Protocol):
    def slot(self, provider: str) -> AbstractAsyncContextManager[None]:
        """Held around one call to ``provider``: the shared in-flight cap, then the shared pace."""

    async def aclose(self) -> None:
        """Release connections at the end of the run."""


class NoSharedLimits:
    """One process alone: its own gates are the whole story."""

    @contextlib.asynccontextmanager
    async def slot(self, provider: str) -> AsyncIterator[None]:
        yield

    async def aclose(self) -> None:
        pass


@dataclass(frozen=True)
class LimitSpec:
    """One shared limit: ``limit`` slots, freed at ``slot_decay_per_second`` (None: on release)."""

    name: str
    provider: str
    kind: str  # "in-flight" or "rate"
    limit: int
    slot_decay_per_second: float | None = None


def limit_prefix(provider: ProviderConfig) -> str:
    """``imagebatch-<name>-<kind>-<model>``: limits are per account and model, not per config."""
    from imagebatch.resilience import usage_key

    return f"imagebatch-{usage_key(provider)}"


def shared_limit_specs(config: BatchConfig, time_scale: float = 1.0) -> list[LimitSpec]:
    """The shared limits a config needs, for every provider with a rate or an in-flight cap.

    The rate is a token bucket of ``burst`` slots refilled at ``(rate - burst) / 60`` per second,
    where ``rate`` is the quota less the safety margin: over any 60 s window it admits at most
    ``burst + (rate - burst) = rate`` starts, however the processes' requests fall. A burst of 2
    (from 4 RPM up) lets a process that polls late find a token waiting instead of losing the
    slot: Prefect answers a refused request with a randomised wait.
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
            rate = min(rates) * (1.0 - config.routing.margin)
            burst = 2 if rate >= 4 else 1
            refill = (rate - burst) / 60.0 if rate > burst else rate / 120.0
            specs.append(
                LimitSpec(
                    f"{prefix}-rpm",
                    provider.name,
                    "rate",
                    burst,
                    round(refill * time_scale, 6),
                )
            )
    return specs
