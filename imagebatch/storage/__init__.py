"""Sinks: where a batch publishes its images, records and manifest."""

from __future__ import annotations

from imagebatch.errors import StorageError
from imagebatch.storage.base import Sink
from imagebatch.storage.local import LocalSink

__all__ = ["LocalSink", "Sink", "open_sink"]


def open_sink(output: str) -> Sink:
    """The sink for an output URI: a local directory (a path or ``file://``)."""
    if output.startswith("gs://"):
        raise StorageError(
            f"output {output!r}: Google Cloud Storage output is not supported yet; "
            "use a local directory"
        )
    if output.startswith("file://"):
        output = output[len("file://") :]
    return LocalSink(output)
