"""Plan before paying: how long a batch will take and what it will cost, from the config alone.

The estimate routes prompts as the router would on a healthy night (each prompt to its preferred
provider, else down the chain in priority or price order; among providers of the same model, and
with ``routing.spill_over_s`` among all, to the provider where it would finish first; with
``finish_by``, down the chain once the preferred providers alone would miss it) and gives each
provider a share no larger than its daily allowance. A provider's throughput is the lower of its
pace (the quota less the safety margin) and its in-flight cap over its typical latency (Little's
law); the batch ends when the slowest provider has worked through its share.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime

from imagebatch.config import DEFAULT_LATENCY_S, BatchConfig, ProviderConfig, finish_by_time
from imagebatch.models import Prompt

__all__ = ["DEFAULT_LATENCY_S", "Plan", "ProviderPlan", "plan_batch"]

_LOCAL_LATENCY_S = 1.0


@dataclass(frozen=True)
class ProviderPlan:
    name: str
    model: str
    prompts: int
    per_minute: float  # images per minute it can deliver
    bound_by: str  # "quota", "in flight" or "unpaced"
    latency_s: float
    minutes: float
    cost_usd: float


@dataclass
class Plan:
    prompts: int
    providers: list[ProviderPlan]
    unplaced: int  # prompts no provider's daily allowance has room for
    minutes: float
    cost_usd: float
    warnings: list[str] = field(default_factory=list)

    @property
    def feasible(self) -> bool:
        """False when the batch cannot finish within its deadline, budget or daily quotas."""
        return not self.warnings

    def describe(self) -> str:
        lines = [
            f"{self.prompts} prompts: about {_duration(self.minutes)}, ${self.cost_usd:.2f}",
            "",
            f"{'provider':14} {'model':32} {'prompts':>7} {'img/min':>8} {'bound by':>10} "
            f"{'time':>9} {'cost':>9}",
        ]
        for p in self.providers:
            lines.append(
                f"{p.name:14} {p.model[:32]:32} {p.prompts:>7} {p.per_minute:>8.2f} "
                f"{p.bound_by:>10} {_duration(p.minutes):>9} {'$' + format(p.cost_usd, '.2f'):>9}"
            )
        lines += [f"WARNING: {w}" for w in self.warnings]
        return "\n".join(lines)


def _duration(minutes: float) -> str:
    if minutes == float("inf"):
        return "never"
    if minutes < 1:
        return f"{minutes * 60:.0f} s"
    if minutes < 120:
        return f"{minutes:.1f} min"
    return f"{minutes / 60:.1f} h"


def _latency(provider: ProviderConfig) -> float:
    if provider.limits.latency_s is not None:
        return provider.limits.latency_s
    return _LOCAL_LATENCY_S if provider.kind == "local" else DEFAULT_LATENCY_S


def _throughput(provider: ProviderConfig, margin: float) -> tuple[float, str]:
    limits = provider.limits
    by_flight = limits.max_in_flight / _latency(provider) * 60.0
    rates = [r for r in (limits.rpm, limits.ipm) if r is not None]
    if not rates:
        return by_flight, "in flight"
    by_quota = min(rates) * (1.0 - margin)
    return (by_quota, "quota") if by_quota <= by_flight else (by_flight, "in flight")


def plan_batch(prompts: list[Prompt], config: BatchConfig, *, now: datetime | None = None) -> Plan:
    """The estimate for ``prompts`` under ``config`` on a healthy night starting ``now``."""
    config.require_resolved("a plan")
    chain = list(config.providers)
    if config.routing.strategy == "cheapest":
        chain.sort(key=lambda p: p.price_for("1K"))
    by_name = {p.name: p for p in config.providers}
    room = {p.name: p.limits.rpd for p in chain}  # None: no daily limit
    share: Counter[str] = Counter()
    cost: Counter[str] = Counter()
    unplaced = 0
    rates = {p.name: _throughput(p, config.routing.margin)[0] for p in chain}
    spill = config.routing.spill_over_s is not None
    start = (now or datetime.now()).astimezone()
    window = None  # minutes until finish_by
    if config.finish_by is not None:
        window = (finish_by_time(config.finish_by, start) - start).total_seconds() / 60

    def finish(p: ProviderConfig, extra: int = 1) -> float:
        """Minutes until ``p`` would be done with its share and ``extra`` more prompts."""
        return (share[p.name] + extra) / rates[p.name] + _latency(p) / 60

    def open_(p: ProviderConfig) -> bool:
        return room[p.name] is None or room[p.name] > 0

    for prompt in prompts:
        order = ([by_name[prompt.provider]] if prompt.provider in by_name else []) + [
            p for p in chain if p.name != prompt.provider
        ]
        order = [p for p in order if open_(p)]
        if not order:
            unplaced += 1
            continue
        if prompt.provider not in by_name:
            first = order[0]
            peers = [
                p
                for p in order
                if p is first
                or (config.routing.share_same_model and p.share_group() == first.share_group())
            ]
            behind = window is not None and min(finish(p) for p in peers) > window
            if spill or behind:  # every provider takes prompts: where it finishes first
                order.sort(key=finish)
            else:  # the same model's providers share; the chain's order breaks ties
                order = sorted(peers, key=finish) + [p for p in order if p not in peers]
        provider = order[0]
        if room[provider.name] is not None:
            room[provider.name] -= 1
        share[provider.name] += 1
        cost[provider.name] += provider.price_for(prompt.size)

    plans = []
    for provider in chain:
        n = share[provider.name]
        if not n:
            continue
        per_minute, bound = _throughput(provider, config.routing.margin)
        latency = _latency(provider)
        minutes = n / per_minute + latency / 60.0
        plans.append(
            ProviderPlan(
                provider.name,
                provider.model,
                n,
                round(per_minute, 3),
                bound,
                latency,
                round(minutes, 2),
                round(cost[provider.name], 4),
            )
        )
    total_minutes = max((p.minutes for p in plans), default=0.0)
    total_cost = round(sum(p.cost_usd for p in plans), 4)
    plan = Plan(len(prompts), plans, unplaced, total_minutes, total_cost)
    if unplaced:
        plan.warnings.append(
            f"{unplaced} prompts do not fit in the providers' daily allowances (rpd): they would "
            "end skipped; add a provider or spread the batch over two days"
        )
        plan.minutes = float("inf") if not plans else plan.minutes
    if config.deadline_s is not None and total_minutes * 60 > config.deadline_s:
        plan.warnings.append(
            f"it needs about {_duration(total_minutes)}, past the deadline of "
            f"{_duration(config.deadline_s / 60)}: the rest would end skipped; raise the quota "
            "or max_in_flight, add a provider, or split the batch"
        )
    if window is not None and total_minutes > window:
        plan.warnings.append(
            f"it needs about {_duration(total_minutes)} with every provider, past finish_by "
            f"{config.finish_by} ({_duration(window)} from now): raise the quota, add a "
            "provider, or split the batch"
        )
    if config.budget_usd is not None and total_cost > config.budget_usd:
        plan.warnings.append(
            f"it costs about ${total_cost:.2f}, over the budget of ${config.budget_usd:.2f}: "
            "prompts past the budget would end skipped"
        )
    return plan
