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
from typing import Literal, Protocol

__all__ = ["FileHealthStore", "HealthStore", "MemoryHealthStore", "ProviderHealth"]

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
