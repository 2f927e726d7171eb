"""Records, manifest and what the Prefect UI shows about a batch."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from prefect import get_client, get_run_logger, task
from prefect.artifacts import (
    acreate_markdown_artifact,
    acreate_progress_artifact,
    acreate_table_artifact,
    aupdate_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    TaskRunFilter,
    TaskRunFilterName,
)
from prefect.client.schemas.sorting import TaskRunSort
from prefect.context import FlowRunContext
from prefect.events import emit_event
from prefect.utilities.urls import url_for

from imagebatch.batch import BatchSummary
from imagebatch.models import Prompt, PromptRecord
from imagebatch.progress import BatchProgress
from imagebatch.records import RecordStore
from imagebatch.report import (
    REPORT_ROWS,
    NightEvent,
    markdown_report,
    provider_table,
    report_links,
)
from imagebatch.sheet import build_night_sheet
from imagebatch.storage.base import Sink

#: seconds between two progress artifact updates (each is one API call)
PROGRESS_INTERVAL_S = 2.0
#: the most a read of the Prefect API returns (its server's default limit)
API_PAGE = 200
_last_update: dict[UUID, float] = {}


class EventJournal:
    """Emit imagebatch's events (circuit, failover, quota) to Prefect, log each one, and keep
    them for the night's report (``events``).

    The provider is the event's resource and the batch a related resource, so automations can
    match either.
    """

    def __init__(self, batch_id: str, logger: logging.Logger | logging.LoggerAdapter):
        self.batch_id, self.logger = batch_id, logger
        self.events: list[NightEvent] = []

    def __call__(self, event: str, provider: str, payload: dict[str, Any]) -> None:
        batch_id = self.batch_id
        self.logger.warning("%s: %s %s", event, provider, payload or "")
        self.events.append(
            NightEvent(datetime.now(UTC), event, provider, {k: str(v) for k, v in payload.items()})
        )
        emit_event(
            event=event,
            resource={
                "prefect.resource.id": f"imagebatch.provider.{provider}",
                "provider": provider,
            },
            related=[
                {
                    "prefect.resource.id": f"imagebatch.batch.{batch_id}",
                    "prefect.resource.role": "batch",
                }
            ],
            payload={k: str(v) for k, v in payload.items()},
        )


def event_emitter(batch_id: str, logger: logging.Logger | logging.LoggerAdapter) -> EventJournal:
    """The router's ``emit`` for one batch (see :class:`EventJournal`)."""
    return EventJournal(batch_id, logger)


def emit_batch_outcome(summary: BatchSummary) -> None:
    """``imagebatch.batch.completed`` for a batch that did not fail (Completed or Partially
    succeeded), ``imagebatch.batch.failed`` for one that did; with the counts, for automations."""
    emit_event(
        event=f"imagebatch.batch.{'failed' if summary.outcome == 'failed' else 'completed'}",
        resource={
            "prefect.resource.id": f"imagebatch.batch.{summary.batch_id}",
            "outcome": summary.outcome,
        },
        payload=summary.model_dump(mode="json"),
    )


async def name_run_after(summary: BatchSummary) -> None:
    """Rename the running flow run after its night's figures; the runs list shows run names
    and state names, not state messages. A rename that fails costs the batch nothing."""
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return
    try:
        async with get_client() as client:
            await client.update_flow_run(context.flow_run.id, name=summary.title())
    except Exception as exc:  # the API is down or refused: the night's work is done anyway
        get_run_logger().warning("could not rename the run after its figures: %s", exc)


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
    links = None
    if sink is not None:
        links = report_links(sink, signed_url_expiry_s, summary.manifest_uri)
        if signed_url_expiry_s and not links.signed:
            get_run_logger().warning("%s", links.note)
    await acreate_table_artifact(
        table=provider_table(records) or [{"provider": "(none)", "succeeded": 0}],
        key=f"{key_prefix}-summary",
        description=f"Batch {summary.batch_id}: {summary.message}",
    )
    await acreate_markdown_artifact(
        markdown=markdown_report(
            summary,
            records,
            links,
            events=events or [],
            task_runs=await _generate_task_runs(
                [r.id for r in records if not r.resumed and len(r.attempts) > 1][:REPORT_ROWS],
                flow_runs,
            ),
            sheet_uri=sheet_uri,
        ),
        key=f"{key_prefix}-report",
        description=f"Batch {summary.batch_id} report",
    )


async def _generate_task_runs(
    prompt_ids: list[str], flow_runs: list[UUID] | None = None
) -> dict[str, str]:
    """Prompt id -> UI link of its ``generate-<id>`` task run in this flow run, or in
    ``flow_runs`` (the newest of several; none if the API cannot say: the report is written
    anyway)."""
    context = FlowRunContext.get()
    if not prompt_ids or context is None or context.flow_run is None:
        return {}
    names = {f"generate-{pid}": pid for pid in prompt_ids}
    where = flow_runs or [context.flow_run.id]
    # a read returns at most the server's page (PREFECT_SERVER_API_DEFAULT_LIMIT, 200): ask
    # for a few names at a time, each with room for a run in every flow run (and a spare)
    wanted = list(names)
    per_read = max(1, API_PAGE // (2 * len(where)))
    links = {}
    try:
        async with get_client() as client:
            for start in range(0, len(wanted), per_read):
                part = wanted[start : start + per_read]
                runs = await client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=where)),
                    task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=part)),
                    sort=TaskRunSort.EXPECTED_START_TIME_ASC,  # the newest last, kept
                    limit=len(part) * 2 * len(where),
                )
                for run in runs:
                    url = url_for("task-run", obj_id=run.id)
                    if run.name in names and url:
                        links[names[run.name]] = url
    except Exception as exc:  # the report matters more than its links
        get_run_logger().warning("could not link the retried prompts' task runs: %s", exc)
        return {}
    return links


async def start_progress(progress: BatchProgress) -> UUID:
    """Create the run's live progress artifact (not a task: it is updated in place)."""
    return await acreate_progress_artifact(
        progress.percent, description=f"Batch {progress.batch_id}: {progress.describe()}"
    )


async def update_progress(
    artifact_id: UUID, progress: BatchProgress, *, final: bool = False
) -> None:
    """Update the progress artifact, at most every ``PROGRESS_INTERVAL_S`` seconds."""
    now = time.monotonic()
    if not final and now - _last_update.get(artifact_id, 0.0) < PROGRESS_INTERVAL_S:
        return
    _last_update[artifact_id] = now
    await aupdate_progress_artifact(
        artifact_id,
        progress.percent,
        description=f"Batch {progress.batch_id}: {progress.describe()}",
    )
    if final:
        _last_update.pop(artifact_id, None)
