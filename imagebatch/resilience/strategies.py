"""The chain's order for one prompt: one small object per ``routing.strategy``.

A strategy orders the providers; the prompt's own ``provider`` preference then goes first. What
the router does with the order (who takes the prompt now, when it moves) is
:mod:`imagebatch.resilience.choosing`.
"""

from __future__ import annotations

from typing import Any, Protocol

from imagebatch.resilience.lane import Lane

__all__ = ["STRATEGIES", "Cheapest", "Priority", "Strategy", "order_for"]


class Strategy(Protocol):
    name: str

    def order(self, lanes: list[Lane], prompt: Any) -> list[Lane]:
        """The providers in the order this strategy prefers them for ``prompt``."""


class Priority:
    """The chain as configured."""

    name = "priority"

    def order(self, lanes: list[Lane], prompt: Any) -> list[Lane]:
        return list(lanes)


class Cheapest:
    """The cheapest for this prompt (its size) first; the chain's order breaks ties."""

    name = "cheapest"

    def order(self, lanes: list[Lane], prompt: Any) -> list[Lane]:
        return sorted(lanes, key=lambda lane: lane.price(prompt))


#: the strategies a config names (``routing.strategy``)
STRATEGIES: dict[str, Strategy] = {s.name: s for s in (Priority(), Cheapest())}


def order_for(strategy: Strategy, lanes: list[Lane], prompt: Any) -> list[Lane]:
    """The strategy's order with the prompt's preferred provider, if any, first."""
    ordered = strategy.order(lanes, prompt)
    preferred = getattr(prompt, "provider", None)
    if preferred:
        ordered.sort(key=lambda lane: lane.name != preferred)
    return ordered
