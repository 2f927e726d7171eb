"""Progress of a running batch, for whoever watches in this process (the CLI's progress bar).

The flow reports each finished prompt here; listeners registered by the CLI redraw. Listeners
must be quick and must not raise.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["BatchProgress", "add_listener", "remove_listener"]

Listener = Callable[["BatchProgress"], None]
_listeners: list[Listener] = []
_lock = threading.Lock()


def add_listener(listener: Listener) -> None:
    with _lock:
        _listeners.append(listener)


def remove_listener(listener: Listener) -> None:
    with _lock:
        if listener in _listeners:
            _listeners.remove(listener)


@dataclass
class BatchProgress:
    """Counts per status of one batch; ``done`` includes resumed prompts."""

    batch_id: str
    total: int
    counts: Counter[str] = field(default_factory=Counter)

    @property
    def done(self) -> int:
        return sum(self.counts.values())

    @property
    def percent(self) -> float:
        return 100.0 * self.done / self.total if self.total else 100.0

    def record(self, status: str) -> None:
        """Count one finished prompt (``succeeded``, ``resumed``, ``failed`` ...) and notify."""
        self.counts[status] += 1
        self.notify()

    def notify(self) -> None:
        with _lock:
            listeners = list(_listeners)
        for listener in listeners:
            listener(self)

    def describe(self) -> str:
        order = ("succeeded", "reused", "resumed", "blocked", "failed", "skipped")
        parts = [f"{s} {self.counts[s]}" for s in order if self.counts[s]]
        return f"{self.done}/{self.total} done" + (f" ({', '.join(parts)})" if parts else "")
