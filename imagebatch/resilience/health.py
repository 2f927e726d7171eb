"""Provider health that outlives a run: a batch starts from what the last one learned.

At the end of each run every provider's state is recorded: healthy, overloaded (its circuit was
open), quota exhausted, auth failing, model missing, and the real per-minute ceiling the gate
learned from 429s. The next batch (or a provider-health probe) starts from it: a provider that
was overloaded minutes ago gets a probe first instead of a full pace of calls, and a learned
ceiling is kept instead of being learned again from fresh 429s.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from imagebatch.resilience.lane import Lane

__all__ = [
    "FileHealthStore",
    "HealthStore",
    "MemoryHealthStore",
    "ProviderHealth",
    "lanes_health",
    "start_lanes_from",
]

HealthState = Literal["healthy", "overloaded", "quota_exhausted", "auth_failing", "model_missing"]

#: a learned ceiling older than this is forgotten: quotas change
CEILING_TTL_S = 24 * 3600.0


@dataclass(frozen=True)
class ProviderHealth:
    state: HealthState
    at: str  # ISO 8601, UTC
    ceiling_rpm: float | None = None
    reason: str | None = None
    ceiling_at: str | None = None  # when the ceiling was learned (a probe keeps it as it was)

    def age_s(self, now: datetime) -> float:
        return (now - datetime.fromisoformat(self.at)).total_seconds()

    def ceiling_age_s(self, now: datetime) -> float:
        return (now - datetime.fromisoformat(self.ceiling_at or self.at)).total_seconds()

    @classmethod
    def now(cls, state: HealthState, now: datetime, **extra) -> ProviderHealth:
        return cls(state=state, at=now.astimezone(UTC).isoformat(), **extra)


class HealthStore(Protocol):
    def read(self, key: str) -> ProviderHealth | None: ...

    def write(self, key: str, health: ProviderHealth) -> None: ...


class MemoryHealthStore:
    def __init__(self) -> None:
        self.saved: dict[str, ProviderHealth] = {}

    def read(self, key: str) -> ProviderHealth | None:
        return self.saved.get(key)

    def write(self, key: str, health: ProviderHealth) -> None:
        self.saved[key] = health


class FileHealthStore:
    """``health-<provider key>.json`` under the state directory, replaced atomically."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory).expanduser()

    def read(self, key: str) -> ProviderHealth | None:
        try:
            data = json.loads((self.directory / f"health-{key}.json").read_text("utf-8"))
            return ProviderHealth(**data)
        except (FileNotFoundError, ValueError, TypeError):
            return None  # nothing recorded, or unreadable: start fresh

    def write(self, key: str, health: ProviderHealth) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".health-{key}.", suffix=".part")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(asdict(health), fh)
        os.replace(tmp, self.directory / f"health-{key}.json")


def lanes_health(lanes: list[Lane], now: datetime) -> dict[str, ProviderHealth]:
    """Each provider a run used, as the run leaves it (what the next batch starts from)."""
    found = {}
    for lane in lanes:
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


def start_lanes_from(
    lanes: list[Lane], recorded: dict[str, ProviderHealth], now: datetime
) -> list[str]:
    """Apply what earlier runs recorded to a new run's lanes; what was applied, in words."""
    notes = []
    for lane in lanes:
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
            notes.append(f"{lane.name} starts at its learned ceiling of {health.ceiling_rpm:g} RPM")
    return notes
