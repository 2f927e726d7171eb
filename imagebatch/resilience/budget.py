"""Budgets: retries per provider (retries spend, successes refill) and money per batch."""

from __future__ import annotations

__all__ = ["RetryBudget", "SpendCap"]


class RetryBudget:
    """Retries allowed on one provider: ``ratio`` per success, plus a small reserve to start.

    A failing provider can never multiply its load: once the reserve is spent, each retry needs
    1/ratio successes first.
    """

    def __init__(self, *, ratio: float = 0.15, reserve: float = 5.0):
        self.ratio = ratio
        self.cap = reserve
        self.tokens = reserve

    def can_retry(self) -> bool:
        return self.tokens >= 1.0

    def spend(self) -> None:
        self.tokens -= 1.0

    def refill(self) -> None:
        self.tokens = min(self.cap, self.tokens + self.ratio)


class SpendCap:
    """A call is admitted only if spent + reserved + its price stays under the cap."""

    def __init__(self, cap_usd: float | None):
        self.cap = cap_usd
        self.spent = 0.0
        self.reserved = 0.0

    def try_reserve(self, price: float) -> bool:
        if self.cap is not None and self.spent + self.reserved + price > self.cap + 1e-9:
            return False
        self.reserved += price
        return True

    def settle(self, price: float, *, charged: bool) -> None:
        """The call ended: move its reservation to spent if the provider charged for it."""
        self.reserved = max(0.0, self.reserved - price)
        if charged:
            self.spent += price
