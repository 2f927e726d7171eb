"""The daily allowance (RPD) of a provider, remembered across runs and processes of one day.

A provider's day starts at its reset time in its timezone (the Gemini API resets at midnight
Pacific). Usage is counted when a request starts, as the provider counts it, in a store that
outlives the run: a JSON file under a lock for the processes of one machine.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol
from zoneinfo import ZoneInfo

__all__ = ["DailyAllowance", "FileUsageStore", "MemoryUsageStore", "UsageStore"]


class UsageStore(Protocol):
    def try_add(self, key: str, day: str, limit: int) -> bool:
        """Count one request for ``key`` on ``day`` if fewer than ``limit`` were counted."""

    def used(self, key: str, day: str) -> int: ...

    def exhaust(self, key: str, day: str, limit: int) -> None:
        """The provider said the day's quota is gone: count it as used up."""


class MemoryUsageStore:
    def __init__(self) -> None:
        self._counts: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def try_add(self, key: str, day: str, limit: int) -> bool:
        with self._lock:
            used = self._counts.get((key, day), 0)
            if used >= limit:
                return False
            self._counts[(key, day)] = used + 1
            return True

    def used(self, key: str, day: str) -> int:
        return self._counts.get((key, day), 0)

    def exhaust(self, key: str, day: str, limit: int) -> None:
        with self._lock:
            self._counts[(key, day)] = max(limit, self._counts.get((key, day), 0))


class FileUsageStore:
    """One JSON file per provider key; an exclusive lock around every read-modify-write."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory).expanduser()
        self._lock = threading.Lock()

    def _update(self, key: str, change: Callable[[dict[str, int]], bool]) -> bool:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"usage-{key}.json"
        with self._lock, open(path, "a+", encoding="utf-8") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                fh.seek(0)
                text = fh.read()
                counts = json.loads(text) if text.strip() else {}
                result = change(counts)
                fh.seek(0)
                fh.truncate()
                fh.write(json.dumps(dict(sorted(counts.items())[-7:])))  # keep a week
                fh.flush()
                os.fsync(fh.fileno())
                return result
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def try_add(self, key: str, day: str, limit: int) -> bool:
        def change(counts: dict[str, int]) -> bool:
            if counts.get(day, 0) >= limit:
                return False
            counts[day] = counts.get(day, 0) + 1
            return True

        return self._update(key, change)

    def used(self, key: str, day: str) -> int:
        path = self.directory / f"usage-{key}.json"
        try:
            return int(json.loads(path.read_text("utf-8") or "{}").get(day, 0))
        except FileNotFoundError:
            return 0

    def exhaust(self, key: str, day: str, limit: int) -> None:
        def change(counts: dict[str, int]) -> bool:
            counts[day] = max(limit, counts.get(day, 0))
            return True

        self._update(key, change)


class DailyAllowance:
    """Requests per day for one provider, with its reset time and timezone."""

    def __init__(
        self,
        key: str,
        rpd: int | None,
        *,
        store: UsageStore,
        reset: str = "00:00",
        timezone: str = "America/Los_Angeles",
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ):
        self.key, self.rpd, self.store, self.now = key, rpd, store, now
        hours, minutes = (int(x) for x in reset.split(":"))
        self._offset = timedelta(hours=hours, minutes=minutes)
        self._zone = ZoneInfo(timezone)
        self._exhausted_day: str | None = None

    def day(self) -> str:
        return (self.now().astimezone(self._zone) - self._offset).date().isoformat()

    def seconds_to_reset(self) -> float:
        local = self.now().astimezone(self._zone) - self._offset
        next_day = datetime.combine(
            local.date() + timedelta(days=1), datetime.min.time(), self._zone
        )
        return max(0.0, (next_day - local).total_seconds())

    @property
    def remote(self) -> bool:
        """Whether counting a request asks another machine (so it belongs off the event loop)."""
        return bool(getattr(self.store, "remote", False))

    def available(self) -> bool:
        day = self.day()
        if self._exhausted_day == day:
            return False
        return self.rpd is None or self.store.used(self.key, day) < self.rpd

    def try_consume(self) -> bool:
        if self.rpd is None:
            return self._exhausted_day != self.day()
        return self._exhausted_day != self.day() and self.store.try_add(
            self.key, self.day(), self.rpd
        )

    def exhaust(self) -> None:
        """The provider answered with a daily-quota error: skip it until the reset."""
        self._exhausted_day = self.day()
        if self.rpd is not None:
            self.store.exhaust(self.key, self._exhausted_day, self.rpd)
