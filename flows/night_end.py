"""How a night ends, written once: a whole night and a split night's parent end the same way;
a shard ends with its own report and leaves the night's files to its parent.

Not a flow: the nightly flow (:mod:`imagebatch.flows.nightly_batch`) and the split night's parent
(:mod:`imagebatch.flows.split_night`) call these as their last step.
"""

from __future__ import annotations

import asyncio
from uuid import UUID

from prefect import get_run_logger
from prefect.states import State

from imagebatch.batch import BatchSummary, summarize
from imagebatch.config import BatchConfig
from imagebatch.models import PromptRecord
from imagebatch.prefect.artifacts import ProgressArtifact
from imagebatch.prefect.events import emit_batch_outcome
from imagebatch.prefect.runs import name_run_after, outcome_state
from imagebatch.prompts import PromptLoad
from imagebatch.records import RecordStore
from imagebatch.report import NightEvent
from imagebatch.storage import Sink
from imagebatch.tasks.publish import publish_index
from imagebatch.tasks.report import (
    publish_night_sheet,
    publish_report,
    write_manifest,
    write_summary,
)

__all__ = ["close_night", "close_shard", "summarize_night"]


def summarize_night(
    batch_id: str,
    records: list[PromptRecord],
    finished: set[str],
    ids: list[str],
    loaded: PromptLoad,
    config: BatchConfig,
    store: RecordStore,
) -> BatchSummary:
    """The night's counts and outcome (judged by :func:`imagebatch.batch.summarize`)."""
    return summarize(
        batch_id,
        records,
        resumed=finished & set(ids),
        rejected_rows=len(loaded.rejected),
        failure_threshold=config.failure_threshold,
        blocked_threshold=config.blocked_threshold,
        manifest_uri=store.manifest_uri,
    )


async def close_night(
    *,
    store: RecordStore,
    sink: Sink,
    ids: list[str],
    finished: set[str],
    loaded: PromptLoad,
    config: BatchConfig,
    progress: ProgressArtifact,
    events: list[NightEvent],
    flow_runs: list[UUID] | None = None,
) -> State[BatchSummary]:
    """The night's manifest (from every prompt's record), latest index, summary, contact sheet
    and report; its outcome event; the run renamed after its figures; the final state."""
    records = write_manifest(store, ids, finished)
    if config.publish.latest_index:
        publish_index(sink, records)
    summary = summarize_night(store.batch_id, records, finished, ids, loaded, config, store)
    write_summary(store, summary)
    await progress.update(final=True)
    sheet = await publish_night_sheet(store, records, config.publish.contact_sheet)
    await publish_report(
        summary,
        records,
        sink,
        config.publish.signed_url_expiry_s,
        events,
        sheet,
        flow_runs=flow_runs,
    )
    get_run_logger().info("batch %s %s: %s", summary.batch_id, summary.outcome, summary.message)
    emit_batch_outcome(summary)
    await name_run_after(summary)
    return outcome_state(summary)


async def close_shard(
    *,
    store: RecordStore,
    sink: Sink,
    shard_id: str,
    ids: list[str],
    finished: set[str],
    loaded: PromptLoad,
    config: BatchConfig,
    progress: ProgressArtifact,
    events: list[NightEvent],
) -> State[BatchSummary]:
    """A shard's own report (keys ``imagebatch-shard-*``) and name; no night files and no
    outcome event: the parent judges the night."""
    records = await asyncio.to_thread(store.collect, ids, finished)
    summary = summarize_night(shard_id, records, finished, ids, loaded, config, store)
    await progress.update(final=True)
    await publish_report(
        summary,
        records,
        sink,
        config.publish.signed_url_expiry_s,
        events,
        key_prefix="imagebatch-shard",
    )
    get_run_logger().info("%s %s: %s", shard_id, summary.outcome, summary.message)
    await name_run_after(summary)
    return outcome_state(summary)
