"""What the router keeps per provider during a run, and what one call was."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from imagebatch.resilience.budget import RetryBudget
from imagebatch.resilience.circuit import CircuitBreaker
from imagebatch.resilience.daily import DailyAllowance
from imagebatch.resilience.gate import ProviderGate

__all__ = ["AttemptInfo", "Lane"]


@dataclass
class Lane:
    """Everything the router knows about one provider during a run."""

    name: str
    price: Callable[[Any], float]
    gate: ProviderGate
    circuit: CircuitBreaker
    retries: RetryBudget
    daily: DailyAllowance
    disabled: str | None = None  # why this provider is out for the rest of the run
    disabled_state: str | None = None  # "auth_failing" or "model_missing", for the health record
    key: str = ""  # the provider's account-and-model key (daily usage, health)
    used: bool = False  # whether this run sent it anything (only then is its health recorded)
    blank_streak: int = 0  # prompts in a row it answered with a blank image
    group: str = ""  # providers of one group (the same model) share prompts
    faulty: bool = False  # taken out for sending blank images prompt after prompt

    @property
    def usable(self) -> bool:
        """Not taken out of the run, and with requests left today."""
        return self.disabled is None and self.daily.available()


@dataclass
class AttemptInfo:
    """What one call was: provider, outcome, HTTP status, latency and time waited first."""

    provider: str
    outcome: str
    http_status: int | None
    latency_s: float
    waited_s: float
    error: str | None = None
    probe: bool = False
