"""Who takes this prompt now, and when a waiting prompt moves to another provider.

Every rule by which a prompt goes down the chain, or back up it, is here:

- :meth:`Chooser.choose`: the provider for the next attempt: usable (not taken out, requests
  left today), its circuit closed or its single probe free, not paused by a hint beyond the
  router's patience, its queue not spilling over while another could start the prompt sooner,
  not where this prompt failed ``move_prompt_after`` times in a row, with retry budget left.
  Among providers that share prompts (one model, or every provider when ``finish_by`` needs
  them) the one that can start it soonest goes first;
- :meth:`Chooser.better_than`: a prompt waiting at a provider's gate moves to an earlier
  provider that came back, or to a peer with a clearly earlier start;
- :meth:`Chooser.leave_shared_queue`: a prompt waiting for other workers' shared slots moves to
  an earlier provider of another model that came back, or whose probe is due.

The router (:mod:`imagebatch.resilience.router`) runs the attempt and feeds back what each
answer teaches: the streaks and refusals it records here steer the next choice.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from imagebatch.resilience.circuit import Ticket
from imagebatch.resilience.finish_by import FinishByEstimate
from imagebatch.resilience.lane import Lane
from imagebatch.resilience.strategies import Priority, Strategy, order_for

__all__ = ["Choice", "Chooser"]


@dataclass
class Choice:
    lane: Lane
    ticket: Ticket
    retry: bool  # this prompt failed on this provider before (the retry budget pays)


class Chooser:
    def __init__(
        self,
        lanes: list[Lane],
        *,
        strategy: Strategy | None = None,
        move_prompt_after: int = 2,
        patience_s: float = 60.0,
        spill_over_s: float | None = None,
        share_same_model: bool = True,
        estimate: FinishByEstimate | None = None,
    ) -> None:
        self.lanes = lanes
        self.strategy = strategy or Priority()
        self.move_prompt_after = move_prompt_after
        self.patience_s = patience_s
        self.spill_over_s = spill_over_s  # a queue longer than this sends prompts further down
        self.share_same_model = share_same_model
        self.estimate = estimate
        # what each prompt met: failures in a row per provider, providers that refused it
        self.streaks: dict[tuple[str, str], int] = defaultdict(int)
        self.refused: dict[str, set[str]] = defaultdict(set)

    def order(self, prompt: Any) -> list[Lane]:
        return order_for(self.strategy, self.lanes, prompt)

    def streak(self, prompt: Any, lane: Lane) -> int:
        return self.streaks.get((prompt.id, lane.name), 0)

    # ------------------------------------------------------------------ the next attempt

    def choose(self, prompt: Any) -> Choice | None:
        """The provider for this prompt's next attempt, with its circuit's ticket; None when
        none can take it now."""
        usable = [lane for lane in self.order(prompt) if lane.usable]
        others_ok = len(usable) > 1
        usable = [lane for lane in usable if lane.name not in self.refused.get(prompt.id, ())]
        candidates = []
        for lane in usable:
            if lane.gate.paused_for() > self.patience_s and others_ok:
                continue
            if others_ok and self._spills(lane, usable):
                continue  # its queue is long and another provider can start this sooner
            streak = self.streak(prompt, lane)
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
            return Choice(lane, ticket, retry=self.streak(prompt, lane) > 0)
        return None

    def _soonest_first(self, prompt: Any, candidates: list[Lane]) -> list[Lane]:
        """The candidates in chain order, except that among the ones sharing the first one's
        prompts (its group; every candidate when ``finish_by`` needs them) the one that can
        start the prompt soonest goes first (the chain's order breaks ties)."""
        if len(candidates) < 2:
            return candidates
        peers = [c for c in candidates if self.share(prompt, candidates[0], c)]
        if len(peers) < 2:
            return candidates
        best = min(peers, key=lambda c: (c.gate.start_in(), candidates.index(c)))
        return [best, *(c for c in candidates if c is not best)]

    def share(self, prompt: Any, a: Lane, b: Lane) -> bool:
        """Whether ``a`` and ``b`` take this prompt interchangeably: the same model (group),
        or different ones while the preferred providers alone would miss ``finish_by``."""
        if a is b:
            return True
        return (self.share_same_model and a.group == b.group) or self.behind(prompt)

    def behind(self, prompt: Any) -> bool:
        """Whether the preferred providers for this prompt (the first up and its group) alone
        would miss ``finish_by``: then every provider takes prompts."""
        if self.estimate is None or not self.estimate.active:
            return False
        chain = [lane for lane in self.order(prompt) if not self.down(lane)]
        preferred = [
            lane
            for lane in chain
            if lane is chain[0] or (self.share_same_model and lane.group == chain[0].group)
        ]
        return self.estimate.behind(preferred, self.lanes)

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

    # ------------------------------------------------------------------ waiting prompts move

    def can_take(self, prompt: Any, lane: Lane) -> bool:
        """Whether ``lane`` could take ``prompt`` now: usable, closed or open with its probe due
        (a queued prompt can be that probe), not paused beyond patience, a place in flight free,
        and neither given up on nor refused for this prompt."""
        return (
            lane.usable
            and lane.circuit.available_in() == 0
            and lane.gate.paused_for() <= self.patience_s
            and lane.gate.in_flight < lane.gate.settings.max_in_flight
            and self.streak(prompt, lane) < self.move_prompt_after
            and lane.name not in self.refused.get(prompt.id, ())
        )

    def better_than(self, prompt: Any, lane: Lane, left: float) -> bool:
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
            if after and not self.share(prompt, other, lane):
                continue
            if not self.can_take(prompt, other):
                continue
            if self.share(prompt, other, lane):
                step = max(other.gate.interval(), 1.0 / other.gate.settings.time_scale)
                if other.gate.start_in() + step < left:
                    return True
            elif self._short_queue(other):  # not back into a queue it spilled from
                return True
        return False

    def leave_shared_queue(self, prompt: Any, lane: Lane, ticket: Ticket) -> bool:
        """Whether a call waiting for ``lane``'s shared slots should go elsewhere: a hint or the
        circuit's opening came meanwhile, or an earlier provider of another model in the chain
        can take it (back after an outage, or its probe due). Not to a peer account of the same
        model: all of them wait for the same kind of slot, and each move costs a day's request."""
        if not ticket.probe and (lane.gate.paused_for() > 0 or not lane.circuit.valid(ticket)):
            return True
        for other in self.order(prompt):
            if other is lane:
                return False
            if self.share(prompt, other, lane):
                continue
            if self.can_take(prompt, other) and self._short_queue(other):
                return True
        return False

    def wait_for_any(self, prompt: Any) -> float | None:
        """Seconds until some usable provider could take this prompt, or None if none ever."""
        waits = [
            max(
                lane.circuit.available_in(),
                lane.gate.paused_for(),
                lane.retries.retry_in() if self.streaks.get((prompt.id, lane.name)) else 0.0,
            )
            for lane in self.lanes
            if lane.usable
        ]
        if not waits:
            return None
        # a provider may be open but not for this prompt (its retry budget, its streak): look
        # again after a short while rather than spin
        scale = self.lanes[0].gate.settings.time_scale if self.lanes else 1.0
        return max(min(waits), 0.5 / scale)

    def down(self, lane: Lane) -> bool:
        """Whether a provider is out for everyone (not just for one prompt)."""
        return (
            not lane.usable
            or lane.circuit.available_in() > 0
            or lane.gate.paused_for() > self.patience_s
        )
