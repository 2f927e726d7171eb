"""The router: for each attempt, the best provider now, and what its answer teaches the rest.

One :class:`Router` per batch run holds a :class:`Lane` per provider (gate, circuit, retry
budget, daily allowance) and the batch's spend cap and deadline. :meth:`Router.attempt` runs one
attempt of one prompt: it picks a provider, waits at its gate, calls it, and feeds the outcome
back. Retryable errors are raised for the caller to retry later (a Prefect retry); "move on"
errors send the same attempt down the chain; "give up" errors end the prompt.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from imagebatch.errors import (
    AuthenticationFailed,
    BlankImage,
    BudgetReached,
    ContentRefused,
    DailyQuotaExhausted,
    DeadlineReached,
    GiveUpError,
    ModelNotFound,
    MoveOnError,
    ProviderConnectionError,
    ProviderError,
    ProviderOverloaded,
    ProviderServerError,
    ProvidersExhausted,
    ProviderTimeout,
    QuotaGone,
    RateLimited,
    RetryableError,
)
from imagebatch.resilience.budget import RetryBudget, SpendCap
from imagebatch.resilience.circuit import CircuitBreaker, Ticket
from imagebatch.resilience.daily import DailyAllowance
from imagebatch.resilience.gate import ProviderGate
from imagebatch.resilience.health import CEILING_TTL_S, ProviderHealth
from imagebatch.resilience.shared import NoSharedLimits, ProviderNews, SharedLimits, SlotGivenUp
from imagebatch.wire import on_request_sent

__all__ = ["AttemptInfo", "Lane", "Router"]

T = TypeVar("T")
#: errors that say a provider is overloaded or unavailable: they count toward opening its circuit
CIRCUIT_ERRORS = (ProviderOverloaded, ProviderServerError, ProviderTimeout, ProviderConnectionError)
Emit = Callable[[str, str, dict[str, Any]], None]
#: blank images from one provider for this many prompts in a row: the provider is at fault
BLANK_STREAK_FAULTY = 3
#: simulated seconds: another worker's pause no longer than ours plus this is not news
NEWS_SLACK_S = 1.0


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


class _Rerouted(Exception):
    """The chosen provider's circuit opened before the call went out: choose again."""


@dataclass
class _Choice(Generic[T]):
    lane: Lane
    ticket: Ticket
    retry: bool


@dataclass
class Router:
    lanes: list[Lane]
    strategy: str = "priority"
    move_prompt_after: int = 2
    patience_s: float = 60.0
    spill_over_s: float | None = None  # a queue longer than this sends prompts further down
    refused_failover: bool = False  # a prompt one provider refused may try the others
    spend: SpendCap = field(default_factory=lambda: SpendCap(None))
    deadline: float | None = None  # clock time after which nothing new is sent
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    emit: Emit = lambda event, provider, payload: None
    on_attempt: Callable[[Any, AttemptInfo], None] = lambda prompt, info: None
    shared: SharedLimits = field(default_factory=NoSharedLimits)
    share_same_model: bool = True  # a prompt goes to the group's provider that starts it first
    finish_by: float | None = None  # clock time by which the batch should be done
    latency_s: float = 60.0  # a call's typical latency (clock seconds), for the finish_by estimate
    _backlog: set[str] | None = None  # prompts not settled yet (for finish_by)
    _streaks: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    _active: str | None = None
    _refused: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    _hearing_news: bool = False  # applying another worker's news: not news to pass on

    def __post_init__(self) -> None:
        # what one worker learns about a provider, every worker sharing it acts on
        for lane in self.lanes:
            lane.circuit.on_change = self._telling_others(lane, lane.circuit.on_change)
        self.shared.watch(self.hear)

    def _telling_others(self, lane: Lane, on_change: Callable[[str], None]):
        def changed(state: str) -> None:
            on_change(state)
            if self._hearing_news:
                return
            ago = self.clock() - lane.circuit.opened_at if state == "opened" else 0.0
            self.shared.report(lane.name, ProviderNews(circuit=state, opened_ago=max(0.0, ago)))

        return changed

    def hear(self, provider: str, news: ProviderNews) -> None:
        """Act on what another worker learned about ``provider``: its server's retry hint, its
        circuit opening (this one opens too, probing on the same schedule) or closing after a
        successful probe (this one closes and resumes at half pace, as after its own probe)."""
        lane = next((x for x in self.lanes if x.name == provider), None)
        if lane is None:
            return
        self._hearing_news = True
        try:
            slack = NEWS_SLACK_S / lane.gate.settings.time_scale
            if news.paused_for > lane.gate.paused_for() + slack:
                lane.gate.pause(news.paused_for)
            if news.circuit == "opened" and lane.circuit.state == "closed":
                lane.circuit.open_on_news(news.opened_ago)
            elif news.circuit == "closed" and lane.circuit.state != "closed":
                lane.circuit.close_on_news()
                lane.gate.slow_start()
        finally:
            self._hearing_news = False

    # ------------------------------------------------------------------ choosing

    def order(self, prompt: Any) -> list[Lane]:
        lanes = list(self.lanes)
        if self.strategy == "cheapest":
            lanes.sort(key=lambda lane: lane.price(prompt))
        preferred = getattr(prompt, "provider", None)
        if preferred:
            lanes.sort(key=lambda lane: lane.name != preferred)
        return lanes

    def _usable(self, lane: Lane) -> bool:
        return lane.disabled is None and lane.daily.available()

    def _choose(self, prompt: Any) -> _Choice | None:
        usable = [lane for lane in self.order(prompt) if self._usable(lane)]
        others_ok = len(usable) > 1
        usable = [lane for lane in usable if lane.name not in self._refused.get(prompt.id, ())]
        candidates = []
        for lane in usable:
            if lane.gate.paused_for() > self.patience_s and others_ok:
                continue
            if others_ok and self._spills(lane, usable):
                continue  # its queue is long and another provider can start this sooner
            streak = self._streaks.get((prompt.id, lane.name), 0)
            if streak >= self.move_prompt_after and others_ok:
                continue  # this request keeps failing here: let another provider try it
            if streak and not lane.retries.can_retry():
                continue
            if lane.circuit.available_in() > 0:
                continue
            candidates.append(lane)
        for lane in self._soonest_first(prompt, candidates):
            ticket = lane.circuit.allow()
            if ticket is None:
                continue
            if not ticket.probe:  # a probe is not a failback until it succeeds
                self._note_route(prompt, lane)
            return _Choice(lane, ticket, retry=self._streaks.get((prompt.id, lane.name), 0) > 0)
        return None

    def _soonest_first(self, prompt: Any, candidates: list[Lane]) -> list[Lane]:
        """The candidates in chain order, except that among the ones sharing the first one's
        prompts (its group; every candidate when ``finish_by`` needs them) the one that can
        start the prompt soonest goes first (the chain's order breaks ties)."""
        if len(candidates) < 2:
            return candidates
        peers = [c for c in candidates if self._share(prompt, candidates[0], c)]
        if len(peers) < 2:
            return candidates
        best = min(peers, key=lambda c: (c.gate.start_in(), candidates.index(c)))
        return [best, *(c for c in candidates if c is not best)]

    def _share(self, prompt: Any, a: Lane, b: Lane) -> bool:
        """Whether ``a`` and ``b`` take this prompt interchangeably: the same model (group),
        or different ones while the preferred providers alone would miss ``finish_by``."""
        if a is b:
            return True
        return (self.share_same_model and a.group == b.group) or self._behind(prompt)

    # ------------------------------------------------------------------ finish_by

    def expect(self, prompt_ids: list[str]) -> None:
        """The prompts this run has to settle (what the ``finish_by`` estimate counts)."""
        self._backlog = set(prompt_ids)

    def settled(self, prompt_id: str) -> None:
        """A prompt ended (succeeded, failed, blocked, skipped, or reused)."""
        if self._backlog is not None:
            self._backlog.discard(prompt_id)

    def _behind(self, prompt: Any) -> bool:
        """Whether the preferred providers alone (the first usable one and its group) would
        finish the prompts left after ``finish_by``: then every provider takes prompts."""
        if self.finish_by is None or self._backlog is None:
            return False
        now = self.clock()
        if now >= self.finish_by:
            return True
        chain = [lane for lane in self.order(prompt) if not self._down(lane)]
        if not chain:
            return True
        preferred = [
            lane
            for lane in chain
            if lane is chain[0] or (self.share_same_model and lane.group == chain[0].group)
        ]
        per_s = sum(self._throughput(lane) for lane in preferred)
        elsewhere = sum(lane.gate.in_flight for lane in self.lanes if lane not in preferred)
        todo = max(0, len(self._backlog) - elsewhere)
        return now + todo / per_s + self.latency_s > self.finish_by

    def _throughput(self, lane: Lane) -> float:
        """Prompts per clock second ``lane`` finishes at its current pace and in-flight cap."""
        by_flight = lane.gate.settings.max_in_flight / max(self.latency_s, 1e-9)
        interval = lane.gate.interval()
        return by_flight if interval <= 0 else min(1.0 / interval, by_flight)

    def _short_queue(self, lane: Lane) -> bool:
        return self.spill_over_s is None or lane.gate.start_in() <= self.spill_over_s

    def _spills(self, lane: Lane, usable: list[Lane]) -> bool:
        """Spill-over: ``lane``'s queue is longer than ``spill_over_s`` while another usable
        provider, closed and with a short queue, could start the prompt within it."""
        if self._short_queue(lane):
            return False
        return any(
            other is not lane
            and other.circuit.available_in() == 0
            and other.gate.paused_for() <= self.patience_s
            and self._short_queue(other)
            for other in usable
        )

    def _can_take(self, prompt: Any, lane: Lane) -> bool:
        """Whether ``lane`` could take ``prompt`` now: usable, closed or open with its probe due
        (a queued prompt can be that probe), not paused beyond patience, a place in flight free,
        and neither given up on nor refused for this prompt."""
        return (
            self._usable(lane)
            and lane.circuit.available_in() == 0
            and lane.gate.paused_for() <= self.patience_s
            and lane.gate.in_flight < lane.gate.settings.max_in_flight
            and self._streaks.get((prompt.id, lane.name), 0) < self.move_prompt_after
            and lane.name not in self._refused.get(prompt.id, ())
        )

    def _better_than(self, prompt: Any, lane: Lane, left: float) -> bool:
        """Whether a provider before ``lane`` in this prompt's order should take it instead,
        the prompt having ``left`` seconds to wait at ``lane``.

        Prompts queued at a backup's slower gate move back as soon as the primary recovers,
        instead of draining at the backup's pace; one of them probes it when a probe is due.
        Between providers that share prompts (one model), a prompt moves only to a clearly
        earlier start, in either direction of the chain: a prompt waiting for a place at a
        full provider (``left`` infinite) takes a place that frees at a peer.
        """
        after = False  # past ``lane`` in the order: only its peers may take the prompt
        for other in self.order(prompt):
            if other is lane:
                after = True
                continue
            if after and not self._share(prompt, other, lane):
                continue
            if not self._can_take(prompt, other):
                continue
            if self._share(prompt, other, lane):
                step = max(other.gate.interval(), 1.0 / other.gate.settings.time_scale)
                if other.gate.start_in() + step < left:
                    return True
            elif self._short_queue(other):  # not back into a queue it spilled from
                return True
        return False

    def _leave_shared_queue(self, prompt: Any, lane: Lane, ticket: Ticket) -> bool:
        """Whether a call waiting for ``lane``'s shared slots should go elsewhere: a hint or the
        circuit's opening came meanwhile, or an earlier provider of another model in the chain
        can take it (back after an outage, or its probe due). Not to a peer account of the same
        model: all of them wait for the same kind of slot, and each move costs a day's request."""
        if not ticket.probe and (lane.gate.paused_for() > 0 or not lane.circuit.valid(ticket)):
            return True
        for other in self.order(prompt):
            if other is lane:
                return False
            if self._share(prompt, other, lane):
                continue
            if self._can_take(prompt, other) and self._short_queue(other):
                return True
        return False

    def _wait_for_any(self, prompt: Any) -> float | None:
        """Seconds until some usable provider could take this prompt, or None if none ever."""
        waits = [
            max(
                lane.circuit.available_in(),
                lane.gate.paused_for(),
                lane.retries.retry_in() if self._streaks.get((prompt.id, lane.name)) else 0.0,
            )
            for lane in self.lanes
            if self._usable(lane)
        ]
        if not waits:
            return None
        # a provider may be open but not for this prompt (its retry budget, its streak): look
        # again after a short while rather than spin
        scale = self.lanes[0].gate.settings.time_scale if self.lanes else 1.0
        return max(min(waits), 0.5 / scale)

    def _check_deadline(self, extra: float = 0.0) -> None:
        if self.deadline is not None and self.clock() + extra > self.deadline:
            raise DeadlineReached("the batch deadline passed before this prompt could be sent")

    # ------------------------------------------------------------------ health across runs

    def health(self, now: datetime) -> dict[str, ProviderHealth]:
        """Each provider this run used, as it leaves it (what the next batch starts from)."""
        found = {}
        for lane in self.lanes:
            if not lane.used:
                continue  # nothing learned: keep what was recorded before
            ceiling = lane.gate.ceiling
            if lane.disabled_state:
                state, reason = lane.disabled_state, lane.disabled
            elif not lane.daily.available():
                state, reason = "quota_exhausted", "the day's requests are used up"
            elif lane.circuit.state != "closed":
                state, reason = "overloaded", "its circuit was open at the end of the run"
            else:
                state, reason = "healthy", None
            found[lane.name] = ProviderHealth.now(
                state,
                now,
                ceiling_rpm=ceiling,
                reason=reason,
                ceiling_at=now.astimezone(UTC).isoformat() if ceiling is not None else None,
            )
        return found

    def start_from(self, recorded: dict[str, ProviderHealth], now: datetime) -> list[str]:
        """Apply what earlier runs recorded; what was applied, in words (for the log)."""
        notes = []
        for lane in self.lanes:
            health = recorded.get(lane.name)
            if health is None:
                continue
            scale = lane.gate.settings.time_scale
            age = health.age_s(now) / scale  # in this run's clock seconds
            if health.state == "overloaded" and age < lane.circuit.probe_interval_s:
                lane.circuit.restore_open(age)
                notes.append(
                    f"{lane.name} was overloaded {age * scale:.0f} s ago: it gets a probe first, "
                    f"in {lane.circuit.available_in() * scale:.0f} s"
                )
            if health.ceiling_rpm is not None and health.ceiling_age_s(now) < CEILING_TTL_S:
                lane.gate.restore_ceiling(health.ceiling_rpm)
                notes.append(
                    f"{lane.name} starts at its learned ceiling of {health.ceiling_rpm:g} RPM"
                )
        return notes

    # ------------------------------------------------------------------ one attempt

    async def attempt(self, prompt: Any, call: Callable[[str], Awaitable[T]]) -> T:
        """One attempt of ``prompt``: ``call(provider_name)`` on the best provider now."""
        try:
            result = await self._attempt(prompt, call)
        except GiveUpError:
            self.settled(prompt.id)
            raise
        self.settled(prompt.id)
        return result

    async def _attempt(self, prompt: Any, call: Callable[[str], Awaitable[T]]) -> T:
        declined: list[MoveOnError] = []
        while True:
            self._check_deadline()
            choice = self._choose(prompt)
            if choice is None:
                if not any(self._usable(lane) for lane in self.lanes):
                    raise self._nothing_left(declined)
                wait = self._wait_for_any(prompt) or 0.5
                self._check_deadline(wait)
                await self.sleep(wait)
                continue
            lane, ticket = choice.lane, choice.ticket
            if ticket.probe and not await self.shared.claim_probe(
                lane.name, lane.circuit.probe_interval_s
            ):
                lane.circuit.defer_probe(ticket)  # another worker probes it this interval
                continue
            price = lane.price(prompt)
            if not self.spend.try_reserve(price):
                self._give_up_probe(lane, ticket)
                raise BudgetReached(
                    f"sending this prompt (${price:.3f} on {lane.name}) would exceed the budget "
                    f"of ${self.spend.cap:.2f} (spent ${self.spend.spent:.2f})"
                )
            # a shared allowance asks a server: off the event loop
            consume = lane.daily.try_consume
            if not (await asyncio.to_thread(consume) if lane.daily.remote else consume()):
                self.spend.settle(price, charged=False)
                self._give_up_probe(lane, ticket)
                self.emit("imagebatch.quota.exhausted", lane.name, {"reason": "daily allowance"})
                continue
            if choice.retry:
                lane.retries.spend()
            try:
                return await self._call(prompt, lane, ticket, price, call)
            except _Rerouted:
                continue
            except MoveOnError as exc:
                declined.append(exc)
                continue
            except ContentRefused as exc:
                refused = self._refused[prompt.id]
                refused.add(lane.name)
                if isinstance(exc, BlankImage) and lane.disabled is not None:
                    declined.append(MoveOnError(lane.disabled, http_status=exc.http_status))
                    continue  # a faulty provider, not a refused prompt: down the chain
                if self.refused_failover and any(
                    self._usable(x) and x.name not in refused for x in self.lanes
                ):
                    continue
                raise

    def _give_up_probe(self, lane: Lane, ticket: Ticket) -> None:
        """The ticket is not used; a probe's turn (and its shared claim) goes to the next caller."""
        lane.circuit.cancel(ticket)
        if ticket.probe:
            self.shared.probe_ended(lane.name, None)

    async def _call(
        self,
        prompt: Any,
        lane: Lane,
        ticket: Ticket,
        price: float,
        call: Callable[[str], Awaitable[T]],
    ) -> T:
        admission = await lane.gate.acquire(
            abandon=lambda left: (
                not lane.circuit.valid(ticket) or self._better_than(prompt, lane, left)
            )
        )
        if admission is None:  # its circuit opened, or a better provider is free: choose again
            self.spend.settle(price, charged=False)
            self._give_up_probe(lane, ticket)  # the next caller is the probe
            raise _Rerouted()
        started = self.clock()
        sent_at: list[float] = []  # when the call went out (the HTTP hook says it more exactly)

        def leaving() -> None:
            lane.gate.mark_sent(admission)
            sent_at[:] = [self.clock()]
            lane.circuit.probe_sent(ticket, sent_at[0])

        try:
            # other processes on the same account: their shared in-flight cap and pace (a
            # prompt waiting for them goes back to an earlier provider that came back)
            async with self.shared.slot(
                lane.name, abandon=lambda: self._leave_shared_queue(prompt, lane, ticket)
            ):
                if not ticket.probe and (
                    lane.gate.paused_for() > 0 or not lane.circuit.valid(ticket)
                ):
                    # a hint, or the circuit opening (another worker's news, or our own), came
                    # while this call waited for a shared slot: it does not go out into them
                    # (the price is given back below)
                    raise _Rerouted()
                waited = admission.waited_s + (self.clock() - started)
                started = self.clock()
                # the provider's HTTP client says when the request really leaves
                sent_at.append(started)
                lane.circuit.probe_sent(ticket, started)
                with on_request_sent(leaving):
                    result = await call(lane.name)
        except SlotGivenUp:
            self.spend.settle(price, charged=False)
            lane.circuit.cancel(ticket)  # a probe's turn goes to the next caller
            raise _Rerouted() from None
        except ProviderError as exc:
            self.spend.settle(price, charged=False)
            self._record(prompt, lane, waited, started, exc, ticket.probe)
            self._learn(prompt, lane, ticket, admission, exc)
            raise
        except BaseException:
            self.spend.settle(price, charged=False)
            raise
        finally:
            lane.gate.release()
            if ticket.probe:  # other workers' next probe: one interval after this one left
                self.shared.probe_ended(lane.name, self.clock() - sent_at[0] if sent_at else None)
            for other in self.lanes:  # a prompt queued for a peer's place may take this one
                if other is not lane and other.group == lane.group:
                    other.gate.poke()
        self.spend.settle(price, charged=True)
        self._record(prompt, lane, waited, started, None, ticket.probe)
        lane.circuit.record_success(ticket)
        lane.gate.on_success()
        if ticket.probe:  # back, or lucky once in an overload: half the pace, doubling
            lane.gate.slow_start()
        lane.retries.refill()
        lane.blank_streak = 0
        self._streaks.pop((prompt.id, lane.name), None)
        return result

    def _learn(
        self, prompt: Any, lane: Lane, ticket: Ticket, admission: Any, exc: ProviderError
    ) -> None:
        if isinstance(exc, RetryableError):
            self._streaks[(prompt.id, lane.name)] += 1
            lane.circuit.record_failure(ticket, counts=isinstance(exc, CIRCUIT_ERRORS))
            if isinstance(exc, RateLimited):
                lane.gate.on_rate_limited(admission, exc.retry_after)
            else:
                if isinstance(exc, ProviderOverloaded):
                    lane.gate.on_overload()
                if exc.retry_after is not None:
                    lane.gate.pause(exc.retry_after)
            # the hint, and what the 429 says of the quota, are for the account, not this process
            window = 60.0 / lane.gate.settings.time_scale
            news = ProviderNews(
                paused_for=lane.gate.paused_for() if exc.retry_after is not None else 0.0,
                rate_limited=isinstance(exc, RateLimited)
                and (exc.retry_after is None or exc.retry_after <= window),
            )
            if news.paused_for > 0 or news.rate_limited:
                self.shared.report(lane.name, news)
            return
        lane.circuit.record_failure(ticket, counts=False)  # it answered: it is up
        if isinstance(exc, ContentRefused):
            lane.blank_streak = lane.blank_streak + 1 if isinstance(exc, BlankImage) else 0
            if lane.blank_streak >= BLANK_STREAK_FAULTY and lane.disabled is None:
                lane.faulty = True
                lane.disabled = (
                    f"it returned blank images for {lane.blank_streak} prompts in a row (a silent "
                    "filter gone wrong, or a fault): not used for the rest of the run"
                )
                self.emit("imagebatch.provider.faulty", lane.name, {"reason": lane.disabled})
        elif isinstance(exc, DailyQuotaExhausted):
            lane.daily.exhaust()
            self.emit("imagebatch.quota.exhausted", lane.name, {"error": str(exc)})
        elif isinstance(exc, MoveOnError):
            lane.disabled = str(exc)
            if isinstance(exc, AuthenticationFailed):
                lane.disabled_state = "auth_failing"
            elif isinstance(exc, ModelNotFound):
                lane.disabled_state = "model_missing"

    def _record(
        self,
        prompt: Any,
        lane: Lane,
        waited: float,
        started: float,
        exc: ProviderError | None,
        probe: bool,
    ) -> None:
        scale = lane.gate.settings.time_scale
        lane.used = True
        self.on_attempt(
            prompt,
            AttemptInfo(
                provider=lane.name,
                outcome="ok" if exc is None else type(exc).__name__,
                http_status=None if exc is None else exc.http_status,
                latency_s=round((self.clock() - started) * scale, 4),
                waited_s=round(waited * scale, 4),
                error=None if exc is None else str(exc),
                probe=probe,
            ),
        )

    def _down(self, lane: Lane) -> bool:
        """Whether a provider is out for everyone (not just for one prompt)."""
        return (
            not self._usable(lane)
            or lane.circuit.available_in() > 0
            or lane.gate.paused_for() > self.patience_s
        )

    def _note_route(self, prompt: Any, lane: Lane) -> None:
        """Failover when work leaves the first provider because it is down; failback after."""
        if getattr(prompt, "provider", None):
            return
        first = self.order(prompt)[0]
        if lane is first:
            if self._active is not None and self._active != first.name:
                self.emit("imagebatch.provider.failback", first.name, {"from": self._active})
            self._active = first.name
        elif self._down(first) and self._active != lane.name:
            self.emit("imagebatch.provider.failover", lane.name, {"from": first.name})
            self._active = lane.name

    def _nothing_left(self, declined: list[MoveOnError]) -> GiveUpError:
        if all(lane.disabled is not None for lane in self.lanes):
            last = declined[-1] if declined else None
            reasons = "; ".join(f"{lane.name}: {lane.disabled}" for lane in self.lanes)
            return ProvidersExhausted(
                f"every provider in the chain declined: {reasons}",
                http_status=last.http_status if last else None,
                faulty=any(lane.faulty for lane in self.lanes),
            )
        return QuotaGone("every provider's daily quota is used up until its reset")

    def circuit_states(self) -> dict[str, str]:
        return {lane.name: lane.circuit.state for lane in self.lanes}
