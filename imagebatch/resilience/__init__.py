"""Resilience: pace to each provider's quota, retry what is worth it, fail over and back.

Free of Prefect and of any SDK: it sees provider names, prices and the error hierarchy. Time is
injected everywhere (``clock``, ``sleep``, ``now``).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from imagebatch.config import DEFAULT_LATENCY_S, BatchConfig, ProviderConfig, finish_by_time
from imagebatch.resilience.budget import RetryBudget, SpendCap
from imagebatch.resilience.circuit import CircuitBreaker, Ticket
from imagebatch.resilience.daily import DailyAllowance, FileUsageStore, MemoryUsageStore, UsageStore
from imagebatch.resilience.gate import Admission, GateSettings, ProviderGate
from imagebatch.resilience.health import (
    FileHealthStore,
    HealthStore,
    MemoryHealthStore,
    ProviderHealth,
)
from imagebatch.resilience.lane import AttemptInfo, Lane
from imagebatch.resilience.pace import Pace
from imagebatch.resilience.router import Emit, Router
from imagebatch.resilience.shared import (
    SHARED_PACE_SLACK_S,
    LimitSpec,
    NoSharedLimits,
    ProviderNews,
    SharedLimits,
    SlotGivenUp,
    limit_prefix,
    shared_limit_specs,
)
from imagebatch.resilience.strategies import STRATEGIES, Cheapest, Priority, Strategy

__all__ = [
    "SHARED_PACE_SLACK_S",
    "STRATEGIES",
    "Admission",
    "AttemptInfo",
    "Cheapest",
    "CircuitBreaker",
    "DailyAllowance",
    "FileHealthStore",
    "FileUsageStore",
    "GateSettings",
    "HealthStore",
    "Lane",
    "LimitSpec",
    "MemoryHealthStore",
    "MemoryUsageStore",
    "NoSharedLimits",
    "Pace",
    "Priority",
    "ProviderGate",
    "ProviderHealth",
    "ProviderNews",
    "RetryBudget",
    "Router",
    "SharedLimits",
    "SlotGivenUp",
    "SpendCap",
    "Strategy",
    "Ticket",
    "UsageStore",
    "build_router",
    "limit_prefix",
    "shared_limit_specs",
    "usage_key",
]


def usage_key(provider: ProviderConfig) -> str:
    """The daily-usage key of a provider: its name, kind and model (file-name safe)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{provider.name}-{provider.kind}-{provider.model}")


def build_router(
    config: BatchConfig,
    prices: dict[str, Callable[[Any], float]],
    *,
    store: UsageStore,
    time_scale: float = 1.0,
    emit: Emit = lambda event, provider, payload: None,
    on_attempt: Callable[[Any, AttemptInfo], None] = lambda prompt, info: None,
    shared: SharedLimits | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> Router:
    """One router for one batch run, with a lane per configured provider."""
    routing = config.routing
    lanes = []
    for provider in config.providers:
        limits = provider.limits
        rates = [r for r in (limits.rpm, limits.ipm) if r is not None]
        gate = ProviderGate(
            GateSettings(
                rpm=min(rates) if rates else None,
                max_in_flight=limits.max_in_flight,
                margin=routing.margin,
                time_scale=time_scale,
            ),
            clock=clock,
            sleep=sleep,
        )
        name = provider.name
        circuit = CircuitBreaker(
            threshold=routing.failover_after,
            probe_interval_s=routing.probe_interval_s / time_scale,
            clock=clock,
            on_change=lambda state, name=name: emit(f"imagebatch.circuit.{state}", name, {}),
        )
        daily = DailyAllowance(
            usage_key(provider),
            limits.rpd,
            store=store,
            reset=limits.rpd_reset,
            timezone=limits.rpd_timezone,
            now=now,
        )
        lanes.append(
            Lane(
                name=name,
                price=prices[name],
                gate=gate,
                circuit=circuit,
                retries=RetryBudget(
                    ratio=config.retry.budget_ratio, floor_per_s=time_scale / 60.0, clock=clock
                ),
                daily=daily,
                key=usage_key(provider),
                group=provider.share_group(),
            )
        )
    deadline = None if config.deadline_s is None else clock() + config.deadline_s / time_scale
    finish_by = None
    if config.finish_by is not None:  # a time of day: how far off it is, in this clock's seconds
        start = now()
        until = (finish_by_time(config.finish_by, start.astimezone()) - start).total_seconds()
        finish_by = clock() + until / time_scale
    latencies = [p.limits.latency_s or DEFAULT_LATENCY_S for p in config.providers]
    return Router(
        lanes=lanes,
        strategy=STRATEGIES[routing.strategy],
        move_prompt_after=routing.move_prompt_after,
        patience_s=routing.patience_s / time_scale,
        spill_over_s=None if routing.spill_over_s is None else routing.spill_over_s / time_scale,
        refused_failover=routing.refused_content_failover,
        spend=SpendCap(config.budget_usd),
        deadline=deadline,
        clock=clock,
        sleep=sleep,
        emit=emit,
        on_attempt=on_attempt,
        shared=shared or NoSharedLimits(),
        share_same_model=routing.share_same_model,
        finish_by=finish_by,
        latency_s=max(latencies) / time_scale,
    )
