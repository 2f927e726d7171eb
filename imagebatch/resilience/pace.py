"""The pacing rule of one provider, as plain numbers: when may the next request start?

A :class:`Pace` spaces starts evenly at the provider's rate (never a burst above it), keeps every
60 s window within the quota counting the starts it granted, pauses while a server hint runs,
learns a lower real ceiling from 429s, and slows down under overload. It holds no event loop
and reads no clock: every method takes ``now`` (seconds), so its rules are tested with numbers.
:class:`~imagebatch.resilience.gate.ProviderGate` is the async queue in front of it.

The feedback methods say what the waiting requests must do: ``LAPSED`` (the turns they hold
were cancelled: claim again under the new pace), ``FASTER`` (the pace improved: retime them),
or ``None``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Literal

__all__ = ["FASTER", "LAPSED", "Admission", "Change", "GateSettings", "Pace"]

_WINDOW_S = 60.0
#: a provider counts a request when it gets it: the network and its front end add a variable
#: delay to the moment imagebatch saw it leave, so a start that waits for the window waits this
#: much longer (provider seconds)
_ARRIVAL_JITTER_S = 1.0

LAPSED, FASTER = "lapsed", "faster"
Change = Literal["lapsed", "faster"] | None


@dataclass(frozen=True)
class GateSettings:
    """How a gate paces one provider (requests per minute; None means unpaced)."""

    rpm: float | None = None
    max_in_flight: int = 4
    margin: float = 0.05  # run this far under the quota, so jitter never crosses it
    min_rpm: float = 0.5  # never slower than this, even under overload
    probe_up_after_s: float = 600.0  # clean time before trying one more request per minute
    overload_factor: float = 0.5  # multiplicative slow-down on a 503
    overload_floor: float = 0.25  # ... but never below this share of the target rate
    slow_start_share: float = 0.5  # after a successful probe: this share, doubling per success
    time_scale: float = 1.0  # the clock's seconds per provider second (the emulator's scale)


@dataclass
class Admission:
    """A claimed start: when, how long it waited, and whether it counts against the quota."""

    started: float
    waited_s: float
    admitted: bool = True


class Pace:
    """Rate, learned ceiling, hint pause and the starts of the last two windows."""

    def __init__(self, settings: GateSettings, now: float = 0.0) -> None:
        self.settings = settings
        self.configured_rpm = settings.rpm
        self.ceiling: float | None = None  # learned from 429s, requests per minute
        self.rate = self.target()
        self.next_slot = 0.0
        self.paused_until = 0.0
        self._paused_from = 0.0  # the latest pause, for what it took out of the window
        self.starts: deque[Admission] = deque()
        self._clean_since = now
        self._probe_from: float | None = None  # the ceiling before the last try at one more
        self._slow_start = False  # after a successful probe: the rate doubles per success

    # ------------------------------------------------------------------ when

    def window(self) -> float:
        return _WINDOW_S / self.settings.time_scale

    def target(self) -> float | None:
        if self.configured_rpm is None:
            return None
        limit = (
            self.configured_rpm if self.ceiling is None else min(self.ceiling, self.configured_rpm)
        )
        return max(self.settings.min_rpm, limit * (1.0 - self.settings.margin))

    def interval(self) -> float:
        """Seconds between two starts at the current rate (0 when unpaced)."""
        return 0.0 if self.rate is None else self.window() / self.rate

    def allowed_in_window(self) -> int | None:
        """Starts allowed in any window: the learned ceiling, else the configured quota."""
        limit = self.ceiling if self.ceiling is not None else self.configured_rpm
        return None if limit is None else max(1, int(limit))

    def earliest(self, now: float) -> float:
        """When a start claimed now would go: after the pace, any pause and the window."""
        start = max(now, self.next_slot, self.paused_until)
        allowed = self.allowed_in_window()
        # kept for two windows: a 429 answered late looks back one window from when it was sent
        while self.starts and self.starts[0].started <= now - 2 * self.window():
            self.starts.popleft()
        if allowed is not None:
            claimed = [a.started for a in self.starts if a.admitted]
            start = max(start, self.window_room(claimed, allowed, start))
        return start

    def window_room(self, starts: list[float], allowed: int, at: float) -> float:
        """The first time from ``at`` on when one more start keeps every window within
        ``allowed``, given ``starts`` (at or before it): after the ``allowed``-th latest of those
        in the window leaves it, plus the allowance for arrival jitter."""
        window = self.window()
        # sorted: a call that left late (mark_sent) moved its start after later claims
        recent = sorted(t for t in starts if at - window < t)
        if len(recent) < allowed:
            return at
        return recent[-allowed] + window + _ARRIVAL_JITTER_S / self.settings.time_scale

    def reserve(self, now: float) -> Admission:
        """Claim the next start: evenly spaced, after any pause, and never more than the quota
        in any window (counting starts already claimed). ``started`` is when to go."""
        start = self.earliest(now)
        self.next_slot = start + self.interval()
        admission = Admission(started=start, waited_s=0.0)
        self.starts.append(admission)
        return admission

    def window_clear_at(self, admission: Admission, now: float) -> float:
        """When ``admission`` may start with no more than the allowed starts in any window,
        counting the starts that have happened (at the times they really left) and claims due
        by now."""
        allowed = self.allowed_in_window()
        if allowed is None:
            return now
        gone = [a.started for a in self.starts if a.admitted and a is not admission]
        return self.window_room([t for t in gone if t <= now], allowed, now)

    def mark_sent(self, admission: Admission, now: float) -> None:
        """The request is leaving now: it counts against the window from now, not from when
        the gate let it go."""
        admission.started = max(admission.started, now)

    def paused_for(self, now: float) -> float:
        return max(0.0, self.paused_until - now)

    # ------------------------------------------------------------------ waiting requests

    def lapse(self, now: float) -> None:
        """Claims on future starts lapse (their holders claim again under the new pace)."""
        for admission in self.starts:
            if admission.started > now:
                admission.admitted = False

    def retime(self, waiting: list[Admission], now: float) -> None:
        """Give every waiting request (in the order of its turn) the earliest turn the pace
        allows now: after the pace improved, or when a waiting request gave up its turn."""
        gone = [a.started for a in self.starts if a.admitted and a.started <= now]
        after_last = max(gone) + self.interval() if gone else now
        self.next_slot = max(now, self.paused_until, after_last)
        waiting = [a for a in waiting if a.started > now]
        for admission in waiting:
            admission.admitted = False
        for admission in waiting:
            admission.started = self.earliest(now)
            admission.admitted = True
            self.next_slot = admission.started + self.interval()

    # ------------------------------------------------------------------ feedback

    def restore_ceiling(self, ceiling_rpm: float) -> None:
        """Start at a ceiling an earlier run learned (it is probed up again as usual)."""
        if self.configured_rpm is None or ceiling_rpm >= self.configured_rpm:
            return
        self.ceiling = max(self.settings.min_rpm, ceiling_rpm)
        self.rate = self.target()

    def pause(self, now: float, seconds: float) -> Change:
        """A server hint: no request to this provider starts before ``seconds`` from now."""
        if self.paused_until <= now:
            self._paused_from = now
        self.paused_until = max(self.paused_until, now + seconds)
        self.next_slot = self.paused_until  # waiting requests claim their turns again from here
        self.lapse(now)
        return LAPSED

    def on_success(self, now: float) -> Change:
        target = self.target()
        if target is None:
            return None
        before = self.interval()
        if self.rate is not None and self.rate < target:
            if self._slow_start:  # back from an open circuit: double with each success
                self.rate = min(target, self.rate * 2)
            else:  # recover additively after overload
                self.rate = min(target, self.rate + max(0.5, target * 0.1))
            self._slow_start = self._slow_start and self.rate < target
        probe_after = self.settings.probe_up_after_s / self.settings.time_scale
        if self.ceiling is not None and now - self._clean_since >= probe_after:
            self._probe_from = self.ceiling
            self.ceiling += 1.0  # try one more request per minute; a 429 takes it back
            self._clean_since = now
            if self.configured_rpm is not None and self.ceiling >= self.configured_rpm:
                self.ceiling = None
            self.rate = self.target()
        return FASTER if self.interval() < before else None

    def slow_start(self, now: float) -> Change:
        """A probe succeeded: the provider may be back, or only lucky once in an overload.
        Resume at half the target and double with each success, so a lucky probe sends a few
        calls into a still-overloaded provider, not a full pace."""
        target = self.target()
        if target is None or self.rate is None:
            return None
        floor = max(self.settings.min_rpm, target * self.settings.slow_start_share)
        self._slow_start = floor < target
        before = self.interval()
        if self.rate > floor:  # e.g. opened by an earlier run's health record, at full pace
            self.rate = floor
            self.next_slot = max(self.next_slot, now + self.interval())
            self.lapse(now)  # turns claimed at the faster pace are claimed again
            return LAPSED
        if self.rate < floor:  # slowed by the 503s that opened the circuit
            self.rate = floor
            return FASTER if self.interval() < before else None
        return None

    def on_rate_limited(
        self, admission: Admission | None, retry_after: float | None, now: float
    ) -> Change:
        """A 429 that is not a daily quota: honour its hint and learn the real ceiling."""
        # the provider counted the minute before this request reached it, not before its answer
        # came back: a window ending at the answer would miss the earliest calls it counted
        sent = now if admission is None else min(admission.started, now)
        window_start = sent - self.window()
        # the share of the last window an earlier hint kept us paused: we sent less then by
        # choice, so only a 429 well under the quota for the rest of the window teaches one
        paused = max(0.0, min(self.paused_until, sent) - max(self._paused_from, window_start))
        open_share = 1.0 - paused / self.window()
        if retry_after is not None:
            self.pause(now, retry_after)
        if admission is not None:
            admission.admitted = False
        admitted = sum(1 for a in self.starts if a.admitted and window_start < a.started <= sent)
        limit = self.ceiling if self.ceiling is not None else self.configured_rpm
        # a per-minute quota frees a slot within the window: a longer hint says "back off",
        # not "your quota is lower", so it pauses the provider and teaches no ceiling
        long_hint = retry_after is not None and retry_after > self.window()
        if self._probe_from is not None:  # one more per minute was too many: back to before
            self.ceiling, self._probe_from = self._probe_from, None
            self.rate = self.target()
        elif long_hint:
            pass
        elif limit is not None and self.rate is not None and admitted < limit * open_share - 1:
            # the server let ``admitted`` through in the last minute: its real ceiling, near
            # enough (with the window as full as we fill it, a 429 is arrival jitter)
            self.ceiling = max(self.settings.min_rpm, float(admitted), self.rate * 0.5)
            self.rate = self.target()
        self.next_slot = max(now + self.interval(), self.paused_until)
        self._clean_since = now
        self.lapse(now)
        return LAPSED

    def on_overload(self, now: float) -> Change:
        """A 503: slow down; successes bring the rate back."""
        self._slow_start = False
        if self.rate is None:
            return None
        floor = max(self.settings.min_rpm, (self.target() or 0.0) * self.settings.overload_floor)
        self.rate = max(floor, self.rate * self.settings.overload_factor)
        self.next_slot = max(now + self.interval(), self.paused_until)
        self.lapse(now)
        return LAPSED
