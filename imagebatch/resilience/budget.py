"""Budgets: retries per provider (retries spend, successes refill) and money per batch."""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["RetryBudget", "SpendCap"]


class RetryBudget:
    """Retries allowed on one provider: ``ratio`` per success, plus a small reserve to start.

    A failing provider can never multiply its load: once the reserve is spent, each retry needs
    1/ratio successes first, or time: ``floor_per_s`` tokens come back every second whatever
    happens (Finagle's minimum retries per second), so the last prompts of a batch, which are
    all retries, are slowed down but never stranded.
    """

    def __init__(
        self,
        *,
        ratio: float = 0.15,
        reserve: float = 5.0,
        floor_per_s: float = 1.0 / 60.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.ratio = ratio
        self.cap = reserve
        self.tokens = reserve
        self.floor_per_s = floor_per_s
        self.clock = clock
        self._at = clock()

    def _refresh(self) -> None:
        now = self.clock()
        self.tokens = min(self.cap, self.tokens + (now - self._at) * self.floor_per_s)
        self._at = now

    def can_retry(self) -> bool:
        self._refresh()
        return self.tokens >= 1.0

    def retry_in(self) -> float:
        """Seconds until a retry is allowed by time alone."""
        self._refresh()
        if self.tokens >= 1.0:
            return 0.0
        return (1.0 - self.tokens) / self.floor_per_s if self.floor_per_s else float("inf")

    def spend(self) -> None:
        self._refresh()
        self.tokens -= 1.0

    def refill(self) -> None:
        self._refresh()
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
