"""The storage seam: where images, records and manifests go (a local directory, later GCS)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

__all__ = ["Sink"]


class Sink(ABC):
    """Objects addressed by ``/``-separated keys under one root (a directory or a bucket prefix)."""

    @abstractmethod
    def uri(self, key: str = "") -> str:
        """The URI a user or consumer can open for ``key``."""

    @abstractmethod
    def write(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str,
        metadata: dict[str, str],
        cache_control: str | None = None,
    ) -> None:
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
    def copy(self, source: str, target: str) -> None:
        """Copy the object ``source`` to ``target`` (replacing it) inside this sink."""

    @abstractmethod
    def update(
        self, key: str, change: Callable[[bytes | None], bytes], *, content_type: str
    ) -> None:
        """Replace ``key`` with ``change(current bytes or None)``, atomically.

        Concurrent updates never lose each other's change: ``change`` may be called again on
        the newer bytes if someone else wrote in between. Unchanged bytes are not written.
        """

    def console_url(self, key: str) -> str:
        """A page where a person can look at ``key`` (the URI where there is no console)."""
        return self.uri(key)

    def signed_url(self, uri: str, expires_s: int) -> str:
        """A link to the object ``uri`` that anyone holding it can open for ``expires_s`` seconds.

        Only object stores sign links; StorageError says why when this sink cannot.
        """
        from imagebatch.errors import StorageError

        raise StorageError(f"{uri}: signed URLs exist only for gs:// output")

    @abstractmethod
    def lock(self, name: str) -> AbstractContextManager[None]:
        """Hold an exclusive lock on ``name`` for one run; raise BatchLockedError if taken."""
