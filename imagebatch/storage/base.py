"""The storage seam: where images, records and manifests go (a local directory, later GCS)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import AbstractContextManager

__all__ = ["Sink"]


class Sink(ABC):
    """Objects addressed by ``/``-separated keys under one root (a directory or a bucket prefix)."""

    @abstractmethod
    def uri(self, key: str = "") -> str:
        """The URI a user or consumer can open for ``key``."""

    @abstractmethod
    def write(self, key: str, data: bytes, *, content_type: str, metadata: dict[str, str]) -> None:
        """Write ``key`` atomically, replacing any earlier object."""

    @abstractmethod
    def create(self, key: str, data: bytes, *, content_type: str) -> bool:
        """Write ``key`` only if it is absent; return False (writing nothing) if it exists."""

    @abstractmethod
    def read(self, key: str) -> bytes | None:
        """The object's bytes, or None if there is no such object."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether ``key`` exists."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key`` if it exists."""

    @abstractmethod
    def list(self, prefix: str) -> Iterator[str]:
        """Keys that start with ``prefix``."""

    @abstractmethod
    def lock(self, name: str) -> AbstractContextManager[None]:
        """Hold an exclusive lock on ``name`` for one run; raise BatchLockedError if taken."""
