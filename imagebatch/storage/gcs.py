"""A sink in a Google Cloud Storage bucket: create-only records, retried uploads, a lease lock.

Every call goes through google-cloud-storage with an explicit retry policy: an image upload
replaces the object (idempotent), a record is created with ``if_generation_match=0`` (a retry
after a lost response finds the object there and reports it existing, which the caller treats
as "already recorded"), and read-modify-write objects (the ``latest`` index, the lock) are
updated with generation preconditions so two writers never lose each other's work.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from imagebatch.errors import BatchLockedError, StorageError
from imagebatch.storage.base import Sink

__all__ = ["GcsSink", "parse_gs_uri", "read_gs_uri", "storage_retry"]

#: above this size an upload is resumable, in chunks of this size (a multiple of 256 KiB)
RESUMABLE_THRESHOLD = 8 * 1024 * 1024
_CAS_ATTEMPTS = 20
_CHUNK = 256 * 1024  # resumable chunks are multiples of this


def parse_gs_uri(uri: str) -> tuple[str, str]:
    """``gs://bucket/some/prefix`` -> ``("bucket", "some/prefix")``; a clear error otherwise."""
    if not uri.startswith("gs://"):
        raise StorageError(f"{uri!r} is not a gs:// URI")
    bucket, _, prefix = uri[len("gs://") :].partition("/")
    if not bucket:
        raise StorageError(f"{uri!r} names no bucket; write gs://BUCKET/optional/prefix")
    return bucket, prefix.strip("/")


def storage_retry(initial_s: float = 1.0, maximum_s: float = 32.0, deadline_s: float = 300.0):
    """google-cloud-storage's retry (429, 5xx, connection resets) with our own timings."""
    from google.cloud.storage.retry import DEFAULT_RETRY

    return DEFAULT_RETRY.with_delay(initial=initial_s, maximum=maximum_s).with_timeout(deadline_s)


def _client(project: str | None = None):
    """A storage client from Application Default Credentials (anonymous on the emulator)."""
    from google.auth.exceptions import DefaultCredentialsError
    from google.cloud import storage

    try:
        return storage.Client(project=project)
    except DefaultCredentialsError:
        raise StorageError(
            "no Google Cloud credentials found: run `gcloud auth application-default login`, "
            "set GOOGLE_APPLICATION_CREDENTIALS to a service account key file, or pass a saved "
            "GcsBucket block (--gcs-block)"
        ) from None


def read_gs_uri(uri: str, *, client: Any = None, retry: Any = None) -> bytes:
    """The bytes of one ``gs://bucket/object``; StorageError if it is missing or unreadable."""
    bucket, name = parse_gs_uri(uri)
    if not name:
        raise StorageError(f"{uri!r} names a bucket, not an object")
    sink = GcsSink(bucket, "", client=client, retry=retry)
    data = sink.read(name)
    if data is None:
        raise StorageError(f"{uri}: no such object")
    return data


class GcsSink(Sink):
    """Objects under ``gs://bucket/prefix``; metadata as GCS custom metadata."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client: Any = None,
        retry: Any = None,
        cache_control: str | None = None,
        resumable_threshold: int = RESUMABLE_THRESHOLD,
        lock_ttl_s: float = 120.0,
    ):
        self.bucket_name = bucket
        self.prefix = prefix.strip("/")
        self._client = client
        self._bucket = None
        self.retry = retry if retry is not None else storage_retry()
        self.cache_control = cache_control
        self.resumable_threshold = resumable_threshold
        self.lock_ttl_s = lock_ttl_s

    @classmethod
    def from_uri(cls, uri: str, **kwargs: Any) -> GcsSink:
        bucket, prefix = parse_gs_uri(uri)
        return cls(bucket, prefix, **kwargs)

    # ------------------------------------------------------------------ plumbing

    @property
    def bucket(self):
        if self._bucket is None:
            if self._client is None:
                self._client = _client()
            self._bucket = self._client.bucket(self.bucket_name)
        return self._bucket

    def _name(self, key: str) -> str:
        if not key or key.startswith("/") or any(p in ("", ".", "..") for p in key.split("/")):
            raise StorageError(f"invalid object key {key!r}")
        return f"{self.prefix}/{key}" if self.prefix else key

    def _error(self, what: str, key: str, exc: Exception) -> StorageError:
        # the exception text of google-api-core carries the URL and the server's message, never
        # a credential; keep it short and name the object
        message = getattr(exc, "message", None) or str(exc)
        return StorageError(f"could not {what} {self.uri(key)}: {type(exc).__name__}: {message}")

    def uri(self, key: str = "") -> str:
        if not key:
            return f"gs://{self.bucket_name}/{self.prefix}".rstrip("/")
        return f"gs://{self.bucket_name}/{self._name(key)}"

    def console_url(self, key: str) -> str:
        """The Cloud Console page of one object."""
        return (
            f"https://console.cloud.google.com/storage/browser/_details/"
            f"{self.bucket_name}/{self._name(key)}"
        )

    def signed_url(self, uri: str, expires_s: int) -> str:
        """A V4 signed GET URL of ``uri`` (an object of this sink's bucket), signed locally.

        Signing needs credentials that hold a private key (a service-account key file, or a
        GcsBucket block whose credentials have one); user or metadata-server credentials do not.
        """
        from datetime import timedelta

        bucket, name = parse_gs_uri(uri)
        if bucket != self.bucket_name or not name:
            raise StorageError(f"{uri} is not an object of gs://{self.bucket_name}")
        try:
            return self.bucket.blob(name).generate_signed_url(
                version="v4", expiration=timedelta(seconds=expires_s), method="GET"
            )
        except (AttributeError, TypeError, ValueError) as exc:
            # google-cloud-storage says "you need a private key to sign credentials" (with no
            # secret in it); keep our own words and drop the library's long text
            kind = type(getattr(self._client, "_credentials", None)).__name__
            raise StorageError(
                f"cannot sign URLs for gs://{bucket} with {kind} credentials "
                f"({type(exc).__name__}): use a service-account key "
                "(GOOGLE_APPLICATION_CREDENTIALS, or a GcsBucket block whose GcpCredentials "
                "hold one), or unset publish.signed_url_expiry_s"
            ) from None

    def _upload(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str,
        metadata: dict[str, str] | None = None,
        cache_control: str | None = None,
        if_generation_match: int | None = None,
    ) -> int:
        blob = self.bucket.blob(self._name(key))
        if metadata:
            blob.metadata = metadata
        cc = cache_control or self.cache_control
        if cc:
            blob.cache_control = cc
        if len(data) > self.resumable_threshold:
            # resumable, in chunks: a dropped connection resends one chunk, not the object
            blob.chunk_size = max(_CHUNK, self.resumable_threshold // _CHUNK * _CHUNK)
            blob.upload_from_file(
                io.BytesIO(data),
                content_type=content_type,
                size=None,  # no size: the library picks a resumable upload
                if_generation_match=if_generation_match,
                retry=self.retry,
            )
        else:
            blob.upload_from_string(
                data,
                content_type=content_type,
                if_generation_match=if_generation_match,
                retry=self.retry,
            )
        return int(blob.generation or 0)

    # ------------------------------------------------------------------ the Sink interface

    def write(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str,
        metadata: dict[str, str],
        cache_control: str | None = None,
    ) -> None:
        try:
            self._upload(
                key, data, content_type=content_type, metadata=metadata, cache_control=cache_control
            )
        except StorageError:
            raise
        except Exception as exc:
            raise self._error("write", key, exc) from None

    def create(self, key: str, data: bytes, *, content_type: str) -> bool:
        from google.api_core.exceptions import PreconditionFailed

        if len(data) > self.resumable_threshold:
            # a resumable upload would work too, but some emulators ignore the precondition there
            raise StorageError(f"{self.uri(key)}: a create-only object must be small")
        try:
            self._upload(
                key,
                data,
                content_type=content_type,
                cache_control="no-cache",
                if_generation_match=0,
            )
        except PreconditionFailed:
            return False
        except Exception as exc:
            raise self._error("create", key, exc) from None
        return True

    def read(self, key: str) -> bytes | None:
        return self._read(key)[0]

    def _read(self, key: str) -> tuple[bytes | None, int]:
        """The object's bytes and generation; (None, 0) if it does not exist."""
        from google.api_core.exceptions import NotFound

        blob = self.bucket.blob(self._name(key))
        try:
            data = blob.download_as_bytes(retry=self.retry)
        except NotFound:
            return None, 0
        except Exception as exc:
            raise self._error("read", key, exc) from None
        return data, int(blob.generation or 0)

    def exists(self, key: str) -> bool:
        try:
            return bool(self.bucket.blob(self._name(key)).exists(retry=self.retry))
        except Exception as exc:
            raise self._error("check", key, exc) from None

    def delete(self, key: str) -> None:
        from google.api_core.exceptions import NotFound

        try:
            self.bucket.blob(self._name(key)).delete(retry=self.retry)
        except NotFound:
            pass
        except Exception as exc:
            raise self._error("delete", key, exc) from None

    def list(self, prefix: str) -> Iterator[str]:
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        skip = len(self.prefix) + 1 if self.prefix else 0
        try:
            blobs = list(self.bucket.client.list_blobs(self.bucket, prefix=full, retry=self.retry))
        except Exception as exc:
            raise self._error("list", prefix or ".", exc) from None
        for blob in sorted(blobs, key=lambda b: b.name):
            key = blob.name[skip:]
            if not key.rsplit("/", 1)[-1].startswith("."):
                yield key

    def copy(self, source: str, target: str) -> None:
        try:
            src = self.bucket.blob(self._name(source))
            self.bucket.copy_blob(src, self.bucket, self._name(target), retry=self.retry)
        except Exception as exc:
            raise self._error("copy to " + self.uri(target) + " from", source, exc) from None

    def update(
        self, key: str, change: Callable[[bytes | None], bytes], *, content_type: str
    ) -> None:
        from google.api_core.exceptions import PreconditionFailed

        for _ in range(_CAS_ATTEMPTS):
            data, generation = self._read(key)
            new = change(data)
            if new == data:
                return
            try:
                self._upload(
                    key,
                    new,
                    content_type=content_type,
                    cache_control="no-cache",
                    if_generation_match=generation,
                )
                return
            except PreconditionFailed:
                continue  # someone else updated it in between: apply the change to theirs
            except Exception as exc:
                raise self._error("update", key, exc) from None
        raise StorageError(f"could not update {self.uri(key)}: it kept changing under us")

    # ------------------------------------------------------------------ the batch lock

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """A lease: an object naming its holder, refreshed while held, taken over when stale.

        A holder that dies leaves the lease behind; another run takes it over once it has not
        been refreshed for ``lock_ttl_s``, or at once if the holder was a process on this
        machine that no longer exists.
        """
        lease = _Lease(self, f"{name}/.lock")
        lease.acquire(name)
        try:
            yield
        finally:
            lease.release()


class _Lease:
    def __init__(self, sink: GcsSink, key: str):
        self.sink = sink
        self.key = key
        self.owner = uuid.uuid4().hex
        self.generation = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    def _body(self) -> bytes:
        return json.dumps(
            {
                "owner": self.owner,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "heartbeat_at": time.time(),
            }
        ).encode()

    def _put(self, generation: int) -> bool:
        from google.api_core.exceptions import PreconditionFailed

        try:
            self.generation = self.sink._upload(
                self.key,
                self._body(),
                content_type="application/json",
                cache_control="no-cache",
                if_generation_match=generation,
            )
        except PreconditionFailed:
            return False
        except Exception as exc:
            raise self.sink._error("lock", self.key, exc) from None
        return True

    def _stale(self, data: bytes) -> bool:
        try:
            holder = json.loads(data)
            age = time.time() - float(holder["heartbeat_at"])
        except (ValueError, KeyError, TypeError):
            return True  # unreadable: nobody can be holding it in a known way
        if age > self.sink.lock_ttl_s:
            return True
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            try:
                os.kill(holder["pid"], 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False
        return False

    def acquire(self, name: str) -> None:
        taken = self._put(0)
        if not taken:
            data, generation = self.sink._read(self.key)
            # no data: released between our two calls
            taken = self._put(0) if data is None else self._stale(data) and self._put(generation)
        if not taken:
            raise BatchLockedError(
                f"another run is working on batch '{name}' in {self.sink.uri()}: its lease "
                f"{self.sink.uri(self.key)} was refreshed less than "
                f"{self.sink.lock_ttl_s:.0f} s ago. Wait for that run to finish (a dead "
                "run's lease expires by itself), or pick another --batch-id"
            )
        self._thread = threading.Thread(target=self._beat, name="imagebatch-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.sink.lock_ttl_s / 4):
            try:
                if not self._put(self.generation):
                    self.lost = True  # another run took it over: we were presumed dead
                    return
            except StorageError:
                continue  # a transient failure; the next beat tries again well before expiry

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.lost:
            return
        # never mask the run's own outcome: a lease left behind expires by itself
        with contextlib.suppress(Exception):
            self.sink.bucket.blob(self.sink._name(self.key)).delete(
                if_generation_match=self.generation, retry=self.sink.retry
            )
