"""Would the preferred providers alone finish the night by ``finish_by``?

The estimate counts the prompts this run still has to settle, and what the preferred providers
(the first usable one and the ones sharing its model) finish per second at their current pace
and in-flight cap. When they would miss ``finish_by``, every provider of the chain takes
prompts (:mod:`imagebatch.resilience.choosing`).
"""

from __future__ import annotations

from collections.abc import Callable

from imagebatch.resilience.lane import Lane

__all__ = ["FinishByEstimate"]


class FinishByEstimate:
    def __init__(
        self, finish_by: float | None, latency_s: float, clock: Callable[[], float]
    ) -> None:
        self.finish_by = finish_by  # clock time by which the batch should be done
        self.latency_s = latency_s  # a call's typical latency (clock seconds)
        self.clock = clock
        self._backlog: set[str] | None = None  # prompts not settled yet

    def expect(self, prompt_ids: list[str]) -> None:
        """The prompts this run has to settle."""
        self._backlog = set(prompt_ids)

    def settled(self, prompt_id: str) -> None:
        """A prompt ended (succeeded, failed, blocked, skipped, or reused)."""
        if self._backlog is not None:
            self._backlog.discard(prompt_id)

    @property
    def active(self) -> bool:
        """A ``finish_by`` is set and the run said what it has to settle."""
        return self.finish_by is not None and self._backlog is not None

    def behind(self, preferred: list[Lane], lanes: list[Lane]) -> bool:
        """Whether ``preferred`` alone would finish the prompts left after ``finish_by``
        (always, once it has passed, or when no provider is up: ``preferred`` empty)."""
        if not self.active:
            return False
        now = self.clock()
        if now >= self.finish_by or not preferred:
            return True
        per_s = sum(self.throughput(lane) for lane in preferred)
        elsewhere = sum(lane.gate.in_flight for lane in lanes if lane not in preferred)
        todo = max(0, len(self._backlog) - elsewhere)
        return now + todo / per_s + self.latency_s > self.finish_by

    def throughput(self, lane: Lane) -> float:
        """Prompts per clock second ``lane`` finishes at its current pace and in-flight cap."""
        by_flight = lane.gate.settings.max_in_flight / max(self.latency_s, 1e-9)
        interval = lane.gate.interval()
        return by_flight if interval <= 0 else min(1.0 / interval, by_flight)
