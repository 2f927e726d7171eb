"""A sink on the local filesystem: atomic writes, create-only records, a per-batch lock."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from imagebatch.errors import BatchLockedError, StorageError
from imagebatch.storage.base import Sink

__all__ = ["LocalSink"]


class LocalSink(Sink):
    """Objects as files under ``root``; metadata lives in the images themselves."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if path != self.root and self.root not in path.parents:
            raise StorageError(f"key escapes the output directory: {key!r}")
        return path

    def uri(self, key: str = "") -> str:
        return self._path(key).as_uri() if key else self.root.as_uri()

    def _write_temp(self, path: Path, data: bytes) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        return tmp

    def write(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str,
        metadata: dict[str, str],
        cache_control: str | None = None,
    ) -> None:
        path = self._path(key)
        try:
            tmp = self._write_temp(path, data)
            os.replace(tmp, path)
        except OSError as exc:
            raise StorageError(f"could not write {path}: {exc.strerror}") from None

    def create(self, key: str, data: bytes, *, content_type: str) -> bool:
        path = self._path(key)
        try:
            tmp = self._write_temp(path, data)
            try:
                os.link(tmp, path)  # atomic and fails if the target exists
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        except OSError as exc:
            raise StorageError(f"could not create {path}: {exc.strerror}") from None
        return True

    def read(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    def list(self, prefix: str) -> Iterator[str]:
        base = self._path(prefix.rsplit("/", 1)[0]) if "/" in prefix else self.root
        if not base.is_dir():
            return
        for path in sorted(base.rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    yield key

    def copy(self, source: str, target: str) -> None:
        src, dst = self._path(source), self._path(target)
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".part")
            os.close(fd)
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
        except OSError as exc:
            raise StorageError(f"could not copy {src} to {dst}: {exc.strerror}") from None

    def update(
        self, key: str, change: Callable[[bytes | None], bytes], *, content_type: str
    ) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(f".{path.name}.lock"), "a+") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)  # writers of this key take turns
            try:
                old = self.read(key)
                new = change(old)
                if new != old:
                    self.write(key, new, content_type=content_type, metadata={})
            finally:
                fcntl.flock(guard, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        path = self._path(f"{name}/.lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+") as fh:
            try:
                # released by the kernel when the process ends, so a crash never leaves it stale
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise BatchLockedError(
                    f"another run is working on batch '{name}' in {self.root}; wait for it to "
                    "finish, or pick another --batch-id"
                ) from None
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
