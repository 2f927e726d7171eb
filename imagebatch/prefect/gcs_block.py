"""Publishing to a saved prefect-gcp ``GcsBucket`` block: the bucket Prefect users already have.

The block's bucket and ``bucket_folder`` become the output root; its ``GcpCredentials`` (a
service account, or Application Default Credentials when it holds none) sign every request.
"""

from __future__ import annotations

from typing import Any

from imagebatch.errors import ConfigError, StorageError
from imagebatch.storage import storage_kwargs
from imagebatch.storage.gcs import GcsSink

__all__ = ["sink_from_gcs_block"]


async def sink_from_gcs_block(
    name: str, *, settings: Any, cache_control: str | None = None
) -> GcsSink:
    """A GCS sink on the saved ``GcsBucket`` block ``name``."""
    from prefect_gcp.cloud_storage import GcsBucket

    try:
        block = await GcsBucket.aload(name)
    except ValueError as exc:
        raise ConfigError(
            f"no GcsBucket block named {name!r} on this Prefect server ({exc}); create one in "
            "the UI (Blocks, +, GCS Bucket) or pass --output gs://BUCKET/PREFIX",
            source="gcs_block",
        ) from None
    try:
        client = block.gcp_credentials.get_cloud_storage_client()
    except Exception as exc:  # google-auth raises several types; none carries the key itself
        raise StorageError(
            f"the GcsBucket block {name!r} has no usable credentials ({type(exc).__name__}): "
            "give its GcpCredentials a service account, or set up Application Default "
            "Credentials on this worker"
        ) from None
    return GcsSink(
        block.bucket,
        block.bucket_folder,
        client=client,
        cache_control=cache_control,
        **storage_kwargs(settings),
    )
