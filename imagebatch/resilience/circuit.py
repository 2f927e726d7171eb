"""A circuit breaker per provider: stop sending work to a provider that is down, probe it back.

Closed: calls flow; consecutive overload/unavailability errors are counted. After ``threshold``
of them the circuit opens: no calls, until ``probe_interval_s`` has passed; then exactly one call
goes through as a probe (half-open). Its success closes the circuit; its failure opens it again,
with the next probe due one interval after the failed one was sent (slow failures, which are the
usual kind under overload, do not stretch the cadence, so failback comes within one interval of
recovery). Calls that were already in flight when it opened may still fail; they change nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["CircuitBreaker", "Ticket"]


@dataclass(frozen=True)
class Ticket:
    """Permission for one call; ``probe`` when it is the half-open circuit's single probe."""

    probe: bool
    generation: int


class CircuitBreaker:
    def __init__(
        self,
        *,
        threshold: int = 3,
        probe_interval_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str], None] | None = None,
    ):
        self.threshold = threshold
        self.probe_interval_s = probe_interval_s
        self.clock = clock
        self.on_change = on_change or (lambda state: None)
        self.state = "closed"
        self.failures = 0
        self.opened_at = 0.0
        self.generation = 0  # bumps when the circuit opens: tickets from before are stale
        self._probe_out = False
        self._probe_sent_at = 0.0

    def available_in(self) -> float:
        """Seconds until a call could be allowed (0 when closed or a probe is due)."""
        if self.state == "closed":
            return 0.0
        if self._probe_out:
            return self.probe_interval_s
        return max(0.0, self.opened_at + self.probe_interval_s - self.clock())

    def allow(self) -> Ticket | None:
        """A ticket for one call now, or None while the circuit is open."""
        if self.state == "closed":
            return Ticket(probe=False, generation=self.generation)
        if self._probe_out or self.clock() < self.opened_at + self.probe_interval_s:
            return None
        self._probe_out = True
        self._probe_sent_at = self.clock()
        self.state = "half-open"
        return Ticket(probe=True, generation=self.generation)

    def probe_sent(self, ticket: Ticket, at: float) -> None:
        """The probe left at ``at`` (it may have waited for its turn since its ticket): the next
        probe, if this one fails, is due one interval after that."""
        if ticket.probe and self._probe_out:
            self._probe_sent_at = at

    def valid(self, ticket: Ticket) -> bool:
        """Whether a ticket still holds: a probe, or issued since the circuit last closed.

        A request that waited at the gate while the circuit opened must not go out anyway.
        """
        return ticket.probe or (self.state == "closed" and ticket.generation == self.generation)

    def cancel(self, ticket: Ticket) -> None:
        """The ticket was not used: a probe's turn goes back to the next caller."""
        if ticket.probe and self._probe_out:
            self._probe_out = False
            self.state = "open"

    def record_success(self, ticket: Ticket) -> None:
        if ticket.probe:
            self._probe_out = False
            self._close()
        elif self.state == "closed":
            self.failures = 0

    def record_failure(self, ticket: Ticket, *, counts: bool) -> None:
        """A failed call; ``counts`` when it says the provider is overloaded or unavailable."""
        if ticket.probe:
            if not self._probe_out:  # closed meanwhile by another worker's probe
                return
            self._probe_out = False
            if counts:  # the next probe one interval after this one went out
                self._open(since=self._probe_sent_at)
            else:  # the provider answered: it is up, whatever it said about this request
                self._close()
            return
        if self.state != "closed" or ticket.generation != self.generation:
            return  # in flight when the circuit opened
        if counts:
            self.failures += 1
            if self.failures >= self.threshold:
                self._open()
        else:
            self.failures = 0

    def defer_probe(self, ticket: Ticket) -> None:
        """Another worker probes the provider in this interval: ours is not sent, and the next
        is due one interval from now (that worker's news closes the circuit sooner)."""
        if ticket.probe and self._probe_out:
            self._probe_out = False
            self.state = "open"
            self.opened_at = self.clock()

    def open_on_news(self, opened_ago: float) -> None:
        """Another worker's circuit to the same provider opened ``opened_ago`` seconds ago:
        open this one as if it had, its first probe due one interval after that."""
        if self.state != "closed":
            return
        self.opened_at = self.clock() - max(0.0, opened_ago)
        self._open(since=self.opened_at)

    def close_on_news(self) -> None:
        """Another worker's probe succeeded: the provider is back for this worker too."""
        if self.state == "closed":
            return
        self._probe_out = False
        self.generation += 1  # a probe of ours still out changes nothing when it ends
        self._close()

    def restore_open(self, opened_ago: float) -> None:
        """Start open, as a run that ended recently left it: the next call is a probe, due
        ``probe_interval_s`` after it opened then."""
        self.state = "open"
        self.opened_at = self.clock() - max(0.0, opened_ago)
        self.generation += 1

    def _open(self, since: float | None = None) -> None:
        was_closed = self.state == "closed"
        self.state = "open"
        self.opened_at = self.clock() if since is None else since
        self.generation += 1
        if was_closed:  # a failed probe re-opens quietly: the provider never came back
            self.on_change("opened")

    def _close(self) -> None:
        was_open = self.state != "closed"
        self.state = "closed"
        self.failures = 0
        if was_open:
            self.on_change("closed")
