"""Publishing: images first, then the record that makes the prompt done."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from imagebatch.imaging import Rendition
from imagebatch.models import GeneratedImage, Prompt, PromptRecord
from imagebatch.records import update_latest
from imagebatch.runtime import BatchRuntime
from imagebatch.storage import Sink


@task(
    name="publish_images",
    task_run_name="publish-{prompt.id}",
    cache_policy=NO_CACHE,
    persist_result=False,
)
async def publish_images(
    prompt: Prompt, image: GeneratedImage, renditions: list[Rendition], runtime: BatchRuntime
) -> PromptRecord:
    """Write a prompt's renditions, then its create-only success record.

    Returns:
        The success record (an existing one is kept as it is).
    """
    return await runtime.publish(prompt, image, renditions)


@task(
    name="reuse_published",
    task_run_name="reuse-{prompt.id}",
    cache_policy=NO_CACHE,
    persist_result=False,
)
async def reuse_published(prompt: Prompt, runtime: BatchRuntime) -> PromptRecord | None:
    """Publish the images an earlier batch made for the same prompt, seed, model and renditions.

    Returns:
        The new success record (its ``reused_from`` names the source), or None when nothing
        published before matches: then the prompt is generated.
    """
    return await runtime.reuse(prompt)


@task(name="publish_index", cache_policy=NO_CACHE, persist_result=False)
def publish_index(sink: Sink, records: list[PromptRecord]) -> int:
    """Merge this batch's succeeded prompts into ``latest.json`` at the output root.

    Returns:
        How many prompts the index names.
    """
    return update_latest(sink, records)


@task(
    name="record_failure",
    task_run_name="record-failure-{prompt.id}",
    cache_policy=NO_CACHE,
    persist_result=False,
)
async def record_failure(
    prompt: Prompt, error: BaseException, runtime: BatchRuntime
) -> PromptRecord:
    """Write the failure record of a prompt that ended blocked or failed, with the reason."""
    return await runtime.record_failure(prompt, error)
