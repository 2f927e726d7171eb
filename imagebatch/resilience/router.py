"""The router: one attempt of one prompt, on the best provider now, and what its answer teaches.

One :class:`Router` per batch run holds a :class:`~imagebatch.resilience.lane.Lane` per provider
(gate, circuit, retry budget, daily allowance) and the batch's spend cap and deadline.
:meth:`Router.attempt` asks the chooser (:mod:`imagebatch.resilience.choosing`: who takes this
prompt now, and when a waiting prompt moves) for a provider, waits at its gate and its shared
slots, calls it, and feeds the outcome back: retryable errors are raised for the caller to retry
later (a Prefect retry); "move on" errors send the same attempt down the chain; "give up" errors
end the prompt. It also tells other workers what it learned (:meth:`hear` and the circuits'
changes), emits the failover and failback events, and records each provider's health
(:mod:`imagebatch.resilience.health`) and the ``finish_by`` countdown
(:mod:`imagebatch.resilience.finish_by`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

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
from imagebatch.resilience.budget import SpendCap
from imagebatch.resilience.choosing import Choice, Chooser
from imagebatch.resilience.circuit import Ticket
from imagebatch.resilience.finish_by import FinishByEstimate
from imagebatch.resilience.health import ProviderHealth, lanes_health, start_lanes_from
from imagebatch.resilience.lane import AttemptInfo, Lane
from imagebatch.resilience.shared import NoSharedLimits, ProviderNews, SharedLimits, SlotGivenUp
from imagebatch.resilience.strategies import STRATEGIES, Strategy
from imagebatch.wire import on_request_sent

__all__ = ["AttemptInfo", "Emit", "Lane", "Router"]

T = TypeVar("T")
#: errors that say a provider is overloaded or unavailable: they count toward opening its circuit
CIRCUIT_ERRORS = (ProviderOverloaded, ProviderServerError, ProviderTimeout, ProviderConnectionError)
Emit = Callable[[str, str, dict[str, Any]], None]
#: blank images from one provider for this many prompts in a row: the provider is at fault
BLANK_STREAK_FAULTY = 3
#: simulated seconds: another worker's pause no longer than ours plus this is not news
NEWS_SLACK_S = 1.0


class _Rerouted(Exception):
    """The chosen provider's circuit opened before the call went out: choose again."""


@dataclass
class Router:
    lanes: list[Lane]
    strategy: Strategy | str = "priority"  # a routing.strategy name, or a Strategy
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
    estimate: FinishByEstimate = field(init=False)
    chooser: Chooser = field(init=False)
    _active: str | None = field(default=None, init=False)  # the provider prompts go to now
    _hearing_news: bool = field(default=False, init=False)  # another worker's: not passed on

    def __post_init__(self) -> None:
        strategy = STRATEGIES[self.strategy] if isinstance(self.strategy, str) else self.strategy
        self.estimate = FinishByEstimate(self.finish_by, self.latency_s, self.clock)
        self.chooser = Chooser(
            self.lanes,
            strategy=strategy,
            move_prompt_after=self.move_prompt_after,
            patience_s=self.patience_s,
            spill_over_s=self.spill_over_s,
            share_same_model=self.share_same_model,
            estimate=self.estimate,
        )
        # what one worker learns about a provider, every worker sharing it acts on
        for lane in self.lanes:
            lane.circuit.on_change = self._telling_others(lane, lane.circuit.on_change)
        self.shared.watch(self.hear)

    def order(self, prompt: Any) -> list[Lane]:
        """The chain's order for ``prompt`` (its strategy, its preferred provider first)."""
        return self.chooser.order(prompt)

    def expect(self, prompt_ids: list[str]) -> None:
        """The prompts this run has to settle (what the ``finish_by`` estimate counts)."""
        self.estimate.expect(prompt_ids)

    def settled(self, prompt_id: str) -> None:
        """A prompt ended (succeeded, failed, blocked, skipped, or reused)."""
        self.estimate.settled(prompt_id)

    def health(self, now: datetime) -> dict[str, ProviderHealth]:
        """Each provider this run used, as it leaves it (what the next batch starts from)."""
        return lanes_health(self.lanes, now)

    def start_from(self, recorded: dict[str, ProviderHealth], now: datetime) -> list[str]:
        """Apply what earlier runs recorded; what was applied, in words (for the log)."""
        return start_lanes_from(self.lanes, recorded, now)

    # ------------------------------------------------------------------ news from other workers

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

    # ------------------------------------------------------------------ one attempt

    def _check_deadline(self, extra: float = 0.0) -> None:
        if self.deadline is not None and self.clock() + extra > self.deadline:
            raise DeadlineReached("the batch deadline passed before this prompt could be sent")

    def _choose(self, prompt: Any) -> Choice | None:
        choice = self.chooser.choose(prompt)
        if choice is not None and not choice.ticket.probe:  # a probe is no failback yet
            self._note_route(prompt, choice.lane)
        return choice

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
                if not any(lane.usable for lane in self.lanes):
                    raise self._nothing_left(declined)
                wait = self.chooser.wait_for_any(prompt) or 0.5
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
                refused = self.chooser.refused[prompt.id]
                refused.add(lane.name)
                if isinstance(exc, BlankImage) and lane.disabled is not None:
                    declined.append(MoveOnError(lane.disabled, http_status=exc.http_status))
                    continue  # a faulty provider, not a refused prompt: down the chain
                if self.refused_failover and any(
                    x.usable and x.name not in refused for x in self.lanes
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
                not lane.circuit.valid(ticket) or self.chooser.better_than(prompt, lane, left)
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
                lane.name, abandon=lambda: self.chooser.leave_shared_queue(prompt, lane, ticket)
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
        self.chooser.streaks.pop((prompt.id, lane.name), None)
        return result

    def _learn(
        self, prompt: Any, lane: Lane, ticket: Ticket, admission: Any, exc: ProviderError
    ) -> None:
        if isinstance(exc, RetryableError):
            self.chooser.streaks[(prompt.id, lane.name)] += 1
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

    def _note_route(self, prompt: Any, lane: Lane) -> None:
        """Failover when work leaves the first provider because it is down; failback after."""
        if getattr(prompt, "provider", None):
            return
        first = self.chooser.order(prompt)[0]
        if lane is first:
            if self._active is not None and self._active != first.name:
                self.emit("imagebatch.provider.failback", first.name, {"from": self._active})
            self._active = first.name
        elif self.chooser.down(first) and self._active != lane.name:
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
