"""Records, manifest and the night's report: the end-of-batch tasks."""

from __future__ import annotations

import asyncio
from typing import Any
from uuid import UUID

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from imagebatch.batch import BatchSummary
from imagebatch.models import Prompt, PromptRecord
from imagebatch.prefect.artifacts import create_report_artifacts
from imagebatch.records import RecordStore
from imagebatch.report import NightEvent
from imagebatch.sheet import build_night_sheet
from imagebatch.storage.base import Sink

__all__ = [
    "find_blocked",
    "find_finished",
    "publish_night_sheet",
    "publish_report",
    "record_batch",
    "write_manifest",
    "write_summary",
]


@task(name="find_finished", cache_policy=NO_CACHE)
def find_finished(records: RecordStore) -> set[str]:
    """Ids of prompts of this batch that already have a success record (resumed, not redone)."""
    return records.succeeded_ids()


@task(name="find_blocked", cache_policy=NO_CACHE)
def find_blocked(records: RecordStore) -> set[str]:
    """Ids of prompts a provider refused in an earlier run of this batch."""
    return records.blocked_ids()


@task(name="record_batch", cache_policy=NO_CACHE)
def record_batch(records: RecordStore, prompts: list[Prompt], run: dict[str, Any]) -> None:
    """Keep the batch's validated prompts and run settings beside it (for ``imagebatch rerun``)."""
    records.write_batch(prompts, run)


@task(name="write_manifest", cache_policy=NO_CACHE, persist_result=False)
def write_manifest(
    records: RecordStore, prompt_ids: list[str], resumed: set[str]
) -> list[PromptRecord]:
    """Rebuild ``manifest.jsonl`` from the per-prompt records, in prompt-file order."""
    return records.write_manifest(prompt_ids, resumed)


@task(name="write_summary", cache_policy=NO_CACHE, persist_result=False)
def write_summary(records: RecordStore, summary: BatchSummary) -> None:
    """Replace ``summary.json`` beside the manifest with the batch's totals."""
    records.write_summary(summary.model_dump(mode="json"))


@task(name="publish_contact_sheet", cache_policy=NO_CACHE, persist_result=False)
async def publish_night_sheet(
    store: RecordStore, records: list[PromptRecord], first: int
) -> str | None:
    """Draw the night's contact sheet (see :func:`imagebatch.sheet.build_night_sheet`) and
    publish it beside the manifest; its URI. A sheet that cannot be made costs the night
    nothing: the run logs why and the report goes without it."""
    if first <= 0 or not records:
        return None
    try:
        png = await asyncio.to_thread(build_night_sheet, store, records, first)
        return await asyncio.to_thread(store.write_sheet, png)
    except Exception as exc:  # the images are published: a missing sheet is only a warning
        get_run_logger().warning("no contact sheet for %s: %s", store.batch_id, exc)
        return None


@task(name="publish_report", cache_policy=NO_CACHE)
async def publish_report(
    summary: BatchSummary,
    records: list[PromptRecord],
    sink: Sink | None = None,
    signed_url_expiry_s: int | None = None,
    events: list[NightEvent] | None = None,
    sheet_uri: str | None = None,
    *,
    key_prefix: str = "imagebatch",
    flow_runs: list[UUID] | None = None,
) -> None:
    """Create the end-of-batch artifacts: a table per provider and a markdown report.

    With ``signed_url_expiry_s`` (and a sink that can sign), the report's manifest and image
    links are signed URLs; otherwise Cloud Console pages. ``events``: the circuit and failover
    events of the night, listed with their times; the prompts that took more than one call link
    their generate task run. ``sheet_uri``: the night's contact sheet, shown or linked.
    ``key_prefix``: the artifacts' keys (``<prefix>-summary``, ``<prefix>-report``; a split
    night's shards use their own, so the night's keys show the whole night). ``flow_runs``:
    where the generate task runs are (a split night's shards; default this run).
    """
    await create_report_artifacts(
        summary,
        records,
        sink,
        signed_url_expiry_s,
        events,
        sheet_uri,
        key_prefix=key_prefix,
        flow_runs=flow_runs,
    )
