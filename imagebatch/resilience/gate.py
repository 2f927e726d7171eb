"""A gate per provider: every request waits here for its turn.

The pacing rule is :class:`~imagebatch.resilience.pace.Pace` (plain numbers: when may the next
request start?). The gate is the async queue in front of it: it caps the calls in flight, makes
each request wait for its turn, wakes the waiting ones when the pace changes (a hint, a 429, a
503, a recovery) so they claim their turns again in order, and lets a waiting request give its
turn up when it belongs elsewhere. Time is injected: ``clock`` returns seconds, ``sleep`` waits,
so tests run a night in milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from collections.abc import Awaitable, Callable

from imagebatch.resilience.pace import FASTER, LAPSED, Admission, Change, GateSettings, Pace

__all__ = ["Admission", "GateSettings", "ProviderGate"]


class _Places:
    """At most ``size`` in-flight places; a freed place goes straight to the longest-waiting
    call (counted as held from then on), so no newcomer can take it first."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.held = 0
        self._waiting: deque[asyncio.Future[None]] = deque()

    def try_take(self) -> bool:
        if self.held >= self.size or any(not w.done() for w in self._waiting):
            return False
        self.held += 1
        return True

    def wait(self) -> asyncio.Future[None]:
        """A future that completes when a place is handed to it (cancel it to stop waiting)."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        return waiter

    def release(self) -> None:
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)  # handed over: still held
                return
        self.held -= 1


class ProviderGate:
    """Admission to one provider: its pace, an in-flight cap, and the queue of waiting calls."""

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
        self.pace = Pace(settings, clock())
        self._epoch = 0  # bumped when the pace changes: waiting turns are claimed again
        self._napping: list[tuple[int, Admission, asyncio.Future[None]]] = []  # waiting now
        self._seq = itertools.count()
        self._places = _Places(settings.max_in_flight)
        self._pokes: list[asyncio.Future[None]] = []  # requests waiting for a place, oldest first

    # the pace's numbers, read by the router and the tests

    @property
    def configured_rpm(self) -> float | None:
        return self.pace.configured_rpm

    @property
    def ceiling(self) -> float | None:
        return self.pace.ceiling

    @ceiling.setter
    def ceiling(self, value: float | None) -> None:
        self.pace.ceiling = value

    @property
    def rate(self) -> float | None:
        return self.pace.rate

    def interval(self) -> float:
        """Seconds between two starts at the current rate (0 when unpaced)."""
        return self.pace.interval()

    def paused_for(self) -> float:
        return self.pace.paused_for(self.clock())

    @property
    def in_flight(self) -> int:
        """Places taken by calls being admitted or running (a freed place handed to a waiting
        call counts from the moment it is handed over)."""
        return self._places.held

    # ------------------------------------------------------------------ admission

    def start_in(self) -> float:
        """Seconds a request arriving now would wait to start (infinite when every in-flight
        place is taken): the length of this provider's queue, for spilling over."""
        if self.in_flight >= self.settings.max_in_flight:
            return float("inf")
        now = self.clock()
        return self.pace.earliest(now) - now

    def reserve(self) -> Admission:
        """Claim the next start (see :meth:`Pace.reserve`)."""
        return self.pace.reserve(self.clock())

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
                            self._give_place()
                            self._retime_waiting()  # its turn goes to the ones behind it
                            return None
                        await self._nap(
                            admission, min(admission.started - self.clock(), check_every)
                        )
                    # the slot was claimed when earlier calls were only planned: if one of them
                    # left late (see mark_sent), wait until the window has room by real times
                    clear_at = self.pace.window_clear_at(admission, self.clock())
                    if epoch != self._epoch or clear_at <= self.clock():
                        break
                    admission.started = clear_at
                    self.pace.next_slot = max(self.pace.next_slot, clear_at + self.interval())
                if self.clock() >= self.pace.paused_until and epoch == self._epoch:
                    break
                # a hint or a lesson (429, 503) arrived meanwhile: claim a slot under the new pace
                admission.admitted = False
            if abandon(0.0):
                admission.admitted = False
                self._give_place()
                self._retime_waiting()
                return None
        except BaseException:
            self._give_place()
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
        if self._places.try_take():  # a place is free: taken without waiting
            return True
        taking = self._places.wait()
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
                        self._places.release()
                    return False
        except BaseException:
            taking.cancel()
            if taking.done() and not taking.cancelled():
                self._places.release()
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

    def mark_sent(self, admission: Admission) -> None:
        """The request admitted by ``admission`` is leaving now (``imagebatch.wire``): it
        counts against the window from now, not from when the gate let it go."""
        self.pace.mark_sent(admission, self.clock())

    def release(self) -> None:
        """The call has ended (whatever its outcome)."""
        self._give_place()

    def _give_place(self) -> None:
        self._places.release()

    # ------------------------------------------------------------------ feedback

    def restore_ceiling(self, ceiling_rpm: float) -> None:
        """Start at a ceiling an earlier run learned (it is probed up again as usual)."""
        self.pace.restore_ceiling(ceiling_rpm)

    def pause(self, seconds: float) -> None:
        """A server hint: no request to this provider starts before ``seconds`` from now."""
        self._apply(self.pace.pause(self.clock(), seconds))

    def on_success(self) -> None:
        self._apply(self.pace.on_success(self.clock()))

    def slow_start(self) -> None:
        """A probe succeeded: half the target, doubling with each success (see
        :meth:`Pace.slow_start`)."""
        self._apply(self.pace.slow_start(self.clock()))

    def on_rate_limited(self, admission: Admission | None, retry_after: float | None) -> None:
        """A 429 that is not a daily quota: honour its hint and learn the real ceiling."""
        self._apply(self.pace.on_rate_limited(admission, retry_after, self.clock()))

    def on_overload(self) -> None:
        """A 503: slow down; successes bring the rate back."""
        self._apply(self.pace.on_overload(self.clock()))

    def _apply(self, change: Change) -> None:
        if change == LAPSED:  # the waiting requests claim their turns again, under the new pace
            self._epoch += 1
            self._wake_all()
        elif change == FASTER:  # they take the faster pace now, not after their old turns
            self._retime_waiting()

    def _retime_waiting(self) -> None:
        """Every waiting request gets the earliest turn the pace allows, in its old order, here
        and now (a request arriving after this can only queue behind them)."""
        self.pace.retime(self._waiting(), self.clock())
        self._wake_all()  # to sleep again until their new turns
