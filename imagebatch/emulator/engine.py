"""What the emulator does with each request: quotas, faults and latency, and the request log.

Pure logic with an injected clock and seeded randomness; the HTTP layer (``app``) renders each
decision in the caller's wire format.
"""

from __future__ import annotations

import math
import random
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from imagebatch.emulator.profile import EmulatorProfile, Fault, ProviderProfile

__all__ = ["Decision", "Emulator", "LogEntry"]

_Z99 = 2.3263478740408408  # the 99th percentile of the standard normal
_DAY_S = 86400.0
_MINUTE_S = 60.0


@dataclass(frozen=True)
class Decision:
    """The answer to one request: a fault (or ``ok``), how long to wait first, and a hint."""

    provider: str
    n: int
    fault: Fault
    latency_s: float  # wall seconds, already scaled
    retry_after_s: float | None = None  # wall seconds, already scaled
    quota: str | None = None  # which quota a 429 names


@dataclass
class LogEntry:
    n: int
    provider: str
    wire: str
    model: str
    t_sim_s: float
    t_wall_s: float
    fault: str
    status: int | None = None
    latency_s: float = 0.0
    prompt: str = ""  # the prompt's first 120 characters, to tell requests apart
    hint_s: float | None = None  # the retry hint sent with a 429, in simulated seconds


@dataclass
class _ProviderState:
    profile: ProviderProfile
    rng: random.Random
    count: int = 0
    minute: deque[float] = field(default_factory=deque)
    day: deque[float] = field(default_factory=deque)


class Emulator:
    """Shared state of every logical provider; thread-safe."""

    def __init__(self, profile: EmulatorProfile, *, clock: Callable[[], float] = time.monotonic):
        self.profile = profile
        self.clock = clock
        self._lock = threading.Lock()
        self.closing = threading.Event()  # set when the server stops: hanging requests end
        self.reset()

    @property
    def scale(self) -> float:
        return self.profile.time_scale

    @property
    def default_provider(self) -> str:
        return next(iter(self.profile.providers))

    def reset(self, *, at_first_request: bool = False) -> None:
        """Forget counts, windows and the log; simulated time starts again at 0, now or, with
        ``at_first_request``, when the next request arrives (a benchmark's night begins with
        its first call, however long the client took to start)."""
        with self._lock:
            self._t0: float | None = None if at_first_request else self.clock()
            self._states = {
                name: _ProviderState(
                    p, random.Random(self.profile.seed * 1_000_003 + zlib.crc32(name.encode()))
                )
                for name, p in self.profile.providers.items()
            }
            self.log: list[LogEntry] = []

    def update_provider(self, name: str, changes: dict[str, Any]) -> ProviderProfile:
        """Change a provider's faults at run time (the control endpoint); counts are kept."""
        with self._lock:
            state = self._states[name]
            merged = {**state.profile.model_dump(), **changes}
            state.profile = ProviderProfile.model_validate(merged)
            self.profile.providers[name] = state.profile
            return state.profile

    def sim_now(self) -> float:
        """Simulated seconds since the start (or the last reset); 0 until it starts."""
        return 0.0 if self._t0 is None else (self.clock() - self._t0) * self.scale

    def decide(
        self, provider: str, *, wire: str, model: str, prompt: str, api_key: str | None
    ) -> Decision:
        """Count the request against its provider and decide its fate."""
        with self._lock:
            state = self._states[provider]
            state.count += 1
            now = self.clock()
            if self._t0 is None:
                self._t0 = now
            t_sim = (now - self._t0) * self.scale
            p = state.profile
            fault, hint, quota = self._fault(state, now, t_sim, model, prompt, api_key)
            latency = self._latency(state, t_sim)
            if fault == "hang":
                latency = p.hang_s / self.scale
            elif fault in (
                "rate_limited",
                "rate_limited_no_hint",
                "daily_quota",
                "auth",
                "not_found",
            ):
                latency = min(latency, 0.05 / self.scale)  # refusals come back fast
            self.log.append(
                LogEntry(
                    n=state.count,
                    provider=provider,
                    wire=wire,
                    model=model,
                    t_sim_s=round(t_sim, 3),
                    t_wall_s=round(now - self._t0, 4),
                    fault=fault,
                    prompt=prompt[:120],
                    hint_s=None if hint is None else round(hint * self.scale, 3),
                )
            )
            return Decision(provider, state.count, fault, latency, hint, quota)

    def finish(self, decision: Decision, status: int, latency_s: float) -> None:
        """Record the HTTP status that was sent for ``decision``."""
        with self._lock:
            for entry in reversed(self.log):
                if entry.provider == decision.provider and entry.n == decision.n:
                    entry.status, entry.latency_s = status, round(latency_s, 4)
                    break

    def _fault(
        self,
        state: _ProviderState,
        now: float,
        t_sim: float,
        model: str,
        prompt: str,
        api_key: str | None,
    ) -> tuple[Fault, float | None, str | None]:
        p, rng = state.profile, state.rng
        if p.auth_failure or (p.api_key is not None and api_key != p.api_key):
            return "auth", None, None
        if model in p.missing_models:
            return "not_found", None, None
        for scripted in p.script:
            if scripted.covers(state.count):
                if scripted.fault in ("ok", "rate_limited", "daily_quota"):
                    self._admit(state, now)
                hinted = scripted.fault.startswith("rate_limited")
                return scripted.fault, self._scaled(p.hint_s) if hinted else None, None
        if p.outage or any(w.contains(t_sim) for w in p.outage_windows):
            return "overloaded", None, None

        if p.daily_quota_exhausted or p.rpd == 0:
            return "daily_quota", None, "GenerateRequestsPerDayPerProjectPerModel"
        day_window, minute_window = _DAY_S / self.scale, _MINUTE_S / self.scale
        _expire(state.day, now - day_window)
        _expire(state.minute, now - minute_window)
        if p.rpd is not None and len(state.day) >= p.rpd:
            return "daily_quota", None, "GenerateRequestsPerDayPerProjectPerModel"
        if p.rpm is not None and len(state.minute) >= math.floor(p.rpm):
            wait = state.minute[0] + minute_window - now
            return "rate_limited", max(wait, 0.0), "GenerateRequestsPerMinutePerProjectPerModel"
        self._admit(state, now)

        overload = p.overload_rate
        for w in p.overload_windows:
            if w.contains(t_sim):
                overload = max(overload, w.rate)
        draws = [
            rng.random() for _ in range(6)
        ]  # a fixed number per request keeps runs reproducible
        if draws[0] < overload:
            return "overloaded", None, None
        if draws[1] < p.rate_429:
            return "rate_limited_no_hint", self._scaled(p.hint_s), None
        if draws[2] < p.rate_500:
            return "server_error", None, None
        if draws[3] < p.rate_hang:
            return "hang", None, None
        lowered = prompt.lower()
        if any(k.lower() in lowered for k in p.safety_keywords):
            return "safety", None, None
        if draws[4] < p.rate_empty:
            return "empty", None, None
        if draws[5] < p.rate_corrupt:
            return "corrupt", None, None
        return "ok", None, None

    def _admit(self, state: _ProviderState, now: float) -> None:
        state.minute.append(now)
        state.day.append(now)

    def _scaled(self, seconds: float | None) -> float | None:
        return None if seconds is None else seconds / self.scale

    def _latency(self, state: _ProviderState, t_sim: float) -> float:
        p = state.profile
        base = p.latency_median_s
        if base > 0 and p.latency_p99_s and p.latency_p99_s > base:
            sigma = math.log(p.latency_p99_s / base) / _Z99
            base = base * math.exp(sigma * state.rng.gauss(0.0, 1.0))
        for w in p.overload_windows:
            if w.contains(t_sim):
                base += w.extra_latency_s
            elif w.ramp_s and w.start_s - w.ramp_s <= t_sim < w.start_s:
                base += w.extra_latency_s * (t_sim - (w.start_s - w.ramp_s)) / w.ramp_s
        return base / self.scale

    def snapshot(self) -> dict[str, Any]:
        """The request log and per-provider, per-wire counts of statuses (the JSON endpoint)."""
        with self._lock:
            summary: dict[str, dict[str, Any]] = {}
            for entry in self.log:
                per = summary.setdefault(
                    entry.provider, {"requests": 0, "statuses": {}, "wires": {}}
                )
                per["requests"] += 1
                key = str(entry.status)
                per["statuses"][key] = per["statuses"].get(key, 0) + 1
                per["wires"][entry.wire] = per["wires"].get(entry.wire, 0) + 1
            return {
                "time_scale": self.scale,
                "sim_now_s": round(self.sim_now(), 3),
                "providers": summary,
                "requests": [asdict(e) for e in self.log],
            }


def _expire(window: deque[float], before: float) -> None:
    while window and window[0] <= before:
        window.popleft()
