"""Sinks: where a batch publishes its images, records and manifest."""

from __future__ import annotations

from typing import Any

from imagebatch.storage.base import Sink
from imagebatch.storage.local import LocalSink

__all__ = ["LocalSink", "Sink", "open_sink", "storage_kwargs"]


def storage_kwargs(settings: Any) -> dict[str, Any]:
    """The GCS sink's retry and lease settings from :class:`~imagebatch.settings.Settings`."""
    from imagebatch.storage.gcs import storage_retry

    return {
        "retry": storage_retry(
            settings.storage_retry_initial_s,
            settings.storage_retry_max_s,
            settings.storage_retry_deadline_s,
        ),
        "lock_ttl_s": settings.lock_ttl_s,
    }


def open_sink(output: str, *, settings: Any = None, cache_control: str | None = None) -> Sink:
    """The sink for an output URI: ``gs://bucket/prefix``, or a local directory (or ``file://``)."""
    if output.startswith("gs://"):
        from imagebatch.settings import Settings
        from imagebatch.storage.gcs import GcsSink

        return GcsSink.from_uri(
            output, cache_control=cache_control, **storage_kwargs(settings or Settings())
        )
    if output.startswith("file://"):
        output = output[len("file://") :]
    return LocalSink(output)
