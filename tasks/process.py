"""Post-processing: renditions and embedded metadata (transforms only, no I/O)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from imagebatch.imaging import Rendition
from imagebatch.models import GeneratedImage, Prompt
from imagebatch.runtime import BatchRuntime


@task(
    name="process_image",
    task_run_name="process-{prompt.id}",
    cache_policy=NO_CACHE,
    persist_result=False,
)
async def process_image(
    prompt: Prompt, image: GeneratedImage, runtime: BatchRuntime
) -> list[Rendition]:
    """Render the configured renditions (size, format, quality) with provenance metadata.

    Returns:
        One encoded rendition per config entry, each with its sha256.
    """
    return await runtime.render(prompt, image)
