"""A gate per provider: every request waits here for its turn.

The gate spaces request starts evenly at the provider's rate (never a burst above it), caps the
calls in flight, pauses the whole provider while a server hint (``RetryInfo``, ``Retry-After``)
runs, learns a lower real ceiling from 429s, and slows down under overload. Time is injected:
``clock`` returns seconds, ``sleep`` waits, so tests run a night in milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

__all__ = ["Admission", "GateSettings", "ProviderGate"]

_WINDOW_S = 60.0
#: a provider counts a request when it gets it: the network and its front end add a variable
#: delay to the moment imagebatch saw it leave, so a start that waits for the window waits this
#: much longer (provider seconds)
_ARRIVAL_JITTER_S = 1.0


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


class ProviderGate:
    """Admission to one provider: pace, in-flight cap, hint pauses, learned ceiling."""

    def __init__(
        self,
        settings: GateSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        self.settings = settings
        self.clock = clock
        self.sleep = sleep
        self.configured_rpm = settings.rpm
        self.ceiling: float | None = None  # learned from 429s, requests per minute
        self.rate = self._target()
        self.next_slot = 0.0
        self.paused_until = 0.0
        self._paused_from = 0.0  # the latest pause, for what it took out of the window
        self._starts: deque[Admission] = deque()
        self._clean_since = clock()
        self._probe_from: float | None = None  # the ceiling before the last try at one more
        self._epoch = 0  # bumped when the pace changes: waiting slots are claimed again
        self._napping: list[tuple[int, Admission, asyncio.Future[None]]] = []  # waiting now
        self._seq = itertools.count()
        self._slow_start = False  # after a successful probe: the rate doubles per success
        self._in_flight = asyncio.Semaphore(settings.max_in_flight)
        self._pokes: list[asyncio.Future[None]] = []  # requests waiting for a place, oldest first

    # ------------------------------------------------------------------ admission

    def _window(self) -> float:
        return _WINDOW_S / self.settings.time_scale

    def _target(self) -> float | None:
        if self.configured_rpm is None:
            return None
        limit = (
            self.configured_rpm if self.ceiling is None else min(self.ceiling, self.configured_rpm)
        )
        return max(self.settings.min_rpm, limit * (1.0 - self.settings.margin))

    def interval(self) -> float:
        """Seconds between two starts at the current rate (0 when unpaced)."""
        return 0.0 if self.rate is None else self._window() / self.rate

    def _allowed_in_window(self) -> int | None:
        """Starts allowed in any window: the learned ceiling, else the configured quota."""
        limit = self.ceiling if self.ceiling is not None else self.configured_rpm
        return None if limit is None else max(1, int(limit))

    def _earliest(self, now: float) -> float:
        """When a start claimed now would go: after the pace, any pause and the window."""
        start = max(now, self.next_slot, self.paused_until)
        allowed = self._allowed_in_window()
        # kept for two windows: a 429 answered late looks back one window from when it was sent
        while self._starts and self._starts[0].started <= now - 2 * self._window():
            self._starts.popleft()
        if allowed is not None:
            claimed = [a.started for a in self._starts if a.admitted]
            start = max(start, self._window_room(claimed, allowed, start))
        return start

    def _window_room(self, starts: list[float], allowed: int, at: float) -> float:
        """The first time from ``at`` on when one more start keeps every window within
        ``allowed``, given ``starts`` (at or before it): after the ``allowed``-th latest of those
        in the window leaves it, plus the allowance for arrival jitter."""
        window = self._window()
        # sorted: a call that left late (mark_sent) moved its start after later claims
        recent = sorted(t for t in starts if at - window < t)
        if len(recent) < allowed:
            return at
        return recent[-allowed] + window + _ARRIVAL_JITTER_S / self.settings.time_scale

    def start_in(self) -> float:
        """Seconds a request arriving now would wait to start (infinite when every in-flight
        place is taken): the length of this provider's queue, for spilling over."""
        if self.in_flight >= self.settings.max_in_flight:
            return float("inf")
        now = self.clock()
        return self._earliest(now) - now

    def reserve(self) -> Admission:
        """Claim the next start: evenly spaced, after any pause, and never more than the quota
        in any window (counting starts already claimed). ``started`` is when to go."""
        start = self._earliest(self.clock())
        self.next_slot = start + self.interval()
        admission = Admission(started=start, waited_s=0.0)
        self._starts.append(admission)
        return admission

    async def acquire(
        self, abandon: Callable[[float], bool] = lambda left: False
    ) -> Admission | None:
        """Wait for an in-flight place, then for the next start; ``release`` it after the call.

        ``abandon(left)`` (``left``: seconds until this request's turn) is asked at least every
        5 provider seconds while waiting, and when the pace changes; when it says so
        (the circuit opened meanwhile) the place is given back at once and None is returned,
        instead of the request queueing behind the pace it no longer needs.
        """
        began = self.clock()
        check_every = 5.0 / self.settings.time_scale
        if not await self._take_place(abandon, check_every):
            return None
        try:
            while True:
                epoch = self._epoch
                admission = self.reserve()
                while True:
                    while self.clock() < admission.started and epoch == self._epoch:
                        if abandon(admission.started - self.clock()):
                            admission.admitted = False
                            self._in_flight.release()
                            self._retime_waiting()  # its turn goes to the ones behind it
                            return None
                        await self._nap(
                            admission, min(admission.started - self.clock(), check_every)
                        )
                    # the slot was claimed when earlier calls were only planned: if one of them
                    # left late (see mark_sent), wait until the window has room by real times
                    clear_at = self._window_clear_at(admission)
                    if epoch != self._epoch or clear_at <= self.clock():
                        break
                    admission.started = clear_at
                    self.next_slot = max(self.next_slot, clear_at + self.interval())
                if self.clock() >= self.paused_until and epoch == self._epoch:
                    break
                # a hint or a lesson (429, 503) arrived meanwhile: claim a slot under the new pace
                admission.admitted = False
            if abandon(0.0):
                admission.admitted = False
                self._in_flight.release()
                self._retime_waiting()
                return None
        except BaseException:
            self._in_flight.release()
            raise
        admission.started = self.clock()
        admission.waited_s = admission.started - began
        return admission

    async def _take_place(self, abandon: Callable[[float], bool], check_every: float) -> bool:
        """Wait for an in-flight place; False (holding none) when ``abandon(inf)`` says so.

        While every place is taken the request asks ``abandon`` at least every ``check_every``
        and whenever :meth:`poke` says a place freed elsewhere (a peer provider's): a prompt
        queued here moves to a peer with room instead of waiting for this provider's calls.
        """
        if not self._in_flight.locked():
            await self._in_flight.acquire()  # a place is free: taken without waiting
            return True
        taking = asyncio.ensure_future(self._in_flight.acquire())
        try:
            while not taking.done():
                poked: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._pokes.append(poked)
                sleeper = asyncio.ensure_future(self.sleep(check_every))
                try:
                    await asyncio.wait(
                        {taking, poked, sleeper}, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    sleeper.cancel()
                    if poked in self._pokes:
                        self._pokes.remove(poked)
                if not taking.done() and abandon(float("inf")):
                    taking.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await taking
                    if not taking.cancelled():  # the place came just as it was given up
                        self._in_flight.release()
                    return False
        except BaseException:
            taking.cancel()
            if taking.done() and not taking.cancelled():
                self._in_flight.release()
            raise
        return True

    def poke(self) -> None:
        """A place freed at a peer provider: the longest-waiting request for a place here asks
        its ``abandon`` again (one at a time, so a single freed place moves a single prompt)."""
        while self._pokes:
            poked = self._pokes.pop(0)
            if not poked.done():
                poked.set_result(None)
                return

    async def _nap(self, admission: Admission, seconds: float) -> None:
        """Sleep ``seconds``, or less if the pace changes meanwhile: a waiting request claims its
        turn again at once, in the order of the turns it held, before any newcomer can."""
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (next(self._seq), admission, woken)
        self._napping.append(entry)
        sleeper = asyncio.ensure_future(self.sleep(seconds))
        try:
            await asyncio.wait({sleeper, woken}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            self._napping.remove(entry)

    def _waiting(self) -> list[Admission]:
        """The requests waiting for their turn, in the order of their turns."""
        napping = sorted(self._napping, key=lambda entry: (entry[1].started, entry[0]))
        return [admission for _, admission, _ in napping]

    def _wake_all(self) -> None:
        for _, _, woken in self._napping:
            if not woken.done():
                woken.set_result(None)

    def _window_clear_at(self, admission: Admission) -> float:
        """When ``admission`` may start with no more than the allowed starts in any window,
        counting the starts that have happened (at the times they really left) and claims due
        by now."""
        now = self.clock()
        allowed = self._allowed_in_window()
        if allowed is None:
            return now
        gone = [a.started for a in self._starts if a.admitted and a is not admission]
        return self._window_room([t for t in gone if t <= now], allowed, now)

    def mark_sent(self, admission: Admission) -> None:
        """The request admitted by ``admission`` is leaving now (``imagebatch.wire``): it
        counts against the window from now, not from when the gate let it go."""
        admission.started = max(admission.started, self.clock())

    def restore_ceiling(self, ceiling_rpm: float) -> None:
        """Start at a ceiling an earlier run learned (it is probed up again as usual)."""
        if self.configured_rpm is None or ceiling_rpm >= self.configured_rpm:
            return
        self.ceiling = max(self.settings.min_rpm, ceiling_rpm)
        self.rate = self._target()

    def release(self) -> None:
        """The call has ended (whatever its outcome)."""
        self._in_flight.release()

    @property
    def in_flight(self) -> int:
        return self.settings.max_in_flight - self._in_flight._value

    # ------------------------------------------------------------------ feedback

    def pause(self, seconds: float) -> None:
        """A server hint: no request to this provider starts before ``seconds`` from now."""
        now = self.clock()
        if self.paused_until <= now:
            self._paused_from = now
        self.paused_until = max(self.paused_until, now + seconds)
        self.next_slot = self.paused_until  # waiting requests claim their slots again from here
        self._new_epoch()

    def _new_epoch(self) -> None:
        """The pace changed: claims on future slots lapse, and the requests that held them
        claim their turns again now, under the new pace."""
        now = self.clock()
        for admission in self._starts:
            if admission.started > now:
                admission.admitted = False
        self._epoch += 1
        self._wake_all()

    def _pace_improved(self, before: float) -> None:
        """The pace got faster than one ``before`` seconds apart: the requests waiting on slots
        claimed at the slower pace take the faster one now, not after their old turns."""
        if self.interval() >= before:
            return
        self._retime_waiting()

    def _retime_waiting(self) -> None:
        """Give every waiting request the earliest turn the pace allows, in its old order, here
        and now (a request arriving after this can only queue behind them): after the pace
        improved, or when a waiting request gave up its turn."""
        now = self.clock()
        gone = [a.started for a in self._starts if a.admitted and a.started <= now]
        after_last = max(gone) + self.interval() if gone else now
        self.next_slot = max(now, self.paused_until, after_last)
        waiting = [a for a in self._waiting() if a.started > now]
        for admission in waiting:
            admission.admitted = False
        for admission in waiting:
            admission.started = self._earliest(now)
            admission.admitted = True
            self.next_slot = admission.started + self.interval()
        self._wake_all()  # to sleep again until their new turns

    def paused_for(self) -> float:
        return max(0.0, self.paused_until - self.clock())

    def on_success(self) -> None:
        now = self.clock()
        target = self._target()
        if target is None:
            return
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
            self.rate = self._target()
        self._pace_improved(before)

    def slow_start(self) -> None:
        """A probe succeeded: the provider may be back, or only lucky once in an overload.
        Resume at half the target and double with each success, so a lucky probe sends a few
        calls into a still-overloaded provider, not a full pace (a quarter cost about a minute
        of the night after a real recovery, for two calls fewer after a lucky probe)."""
        target = self._target()
        if target is None or self.rate is None:
            return
        floor = max(self.settings.min_rpm, target * self.settings.slow_start_share)
        self._slow_start = floor < target
        before = self.interval()
        if self.rate > floor:  # e.g. opened by an earlier run's health record, at full pace
            self.rate = floor
            self.next_slot = max(self.next_slot, self.clock() + self.interval())
            self._new_epoch()  # slots claimed at the faster pace are claimed again
        elif self.rate < floor:  # slowed by the 503s that opened the circuit
            self.rate = floor
            self._pace_improved(before)

    def on_rate_limited(self, admission: Admission | None, retry_after: float | None) -> None:
        """A 429 that is not a daily quota: honour its hint and learn the real ceiling."""
        now = self.clock()
        # the provider counted the minute before this request reached it, not before its answer
        # came back: a window ending at the answer would miss the earliest calls it counted
        sent = now if admission is None else min(admission.started, now)
        window_start = sent - self._window()
        # the share of the last window an earlier hint kept us paused: we sent less then by
        # choice, so only a 429 well under the quota for the rest of the window teaches one
        paused = max(0.0, min(self.paused_until, sent) - max(self._paused_from, window_start))
        open_share = 1.0 - paused / self._window()
        if retry_after is not None:
            self.pause(retry_after)
        if admission is not None:
            admission.admitted = False
        admitted = sum(1 for a in self._starts if a.admitted and window_start < a.started <= sent)
        limit = self.ceiling if self.ceiling is not None else self.configured_rpm
        # a per-minute quota frees a slot within the window: a longer hint says "back off",
        # not "your quota is lower", so it pauses the provider and teaches no ceiling
        long_hint = retry_after is not None and retry_after > self._window()
        if self._probe_from is not None:  # one more per minute was too many: back to before
            self.ceiling, self._probe_from = self._probe_from, None
            self.rate = self._target()
        elif long_hint:
            pass
        elif limit is not None and self.rate is not None and admitted < limit * open_share - 1:
            # the server let ``admitted`` through in the last minute: its real ceiling, near enough
            # (with the window as full as we fill it, a 429 is arrival jitter, not a lower quota)
            self.ceiling = max(self.settings.min_rpm, float(admitted), self.rate * 0.5)
            self.rate = self._target()
        self.next_slot = max(now + self.interval(), self.paused_until)
        self._clean_since = now
        self._new_epoch()

    def on_overload(self) -> None:
        """A 503: slow down; successes bring the rate back."""
        self._slow_start = False
        if self.rate is not None:
            floor = max(
                self.settings.min_rpm, (self._target() or 0.0) * self.settings.overload_floor
            )
            self.rate = max(floor, self.rate * self.settings.overload_factor)
            self.next_slot = max(self.clock() + self.interval(), self.paused_until)
            self._new_epoch()
