"""Tasks of a split night's parent."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from prefect import task
from prefect.cache_policies import NO_CACHE

from imagebatch.batch import shard_prompts
from imagebatch.models import Prompt, PromptRecord
from imagebatch.prefect.shards import ShardEnd
from imagebatch.records import RecordStore

__all__ = ["record_unsettled"]


@task(name="record_unsettled", cache_policy=NO_CACHE, persist_result=False)
async def record_unsettled(
    store: RecordStore, ends: list[ShardEnd], prompts: list[Prompt], batch_id: str
) -> int:
    """A skipped record, naming its shard's end, for every prompt no shard settled (a shard
    that crashed more often than it is restarted, ran out of the deadline, or failed before
    its prompts): the manifest lists every prompt of the night.

    Returns:
        How many prompts were recorded skipped.
    """
    recorded = await asyncio.to_thread(store.recorded_ids)
    written = 0
    for end in ends:
        for prompt in shard_prompts(prompts, end.index, len(ends)):
            if prompt.id not in recorded:
                record = PromptRecord(
                    id=prompt.id,
                    status="skipped",
                    error=(
                        f"{end.label} ended before it settled this prompt (its run "
                        f"{end.run_name} ended {end.why}); run the batch again to finish it"
                    ),
                    error_kind="shard_ended",
                    batch_id=batch_id,
                    finished_at=datetime.now(UTC),
                )
                await asyncio.to_thread(store.write_failure, record)
                written += 1
    return written
