"""What a batch shows in the Prefect UI's Artifacts: live progress, the per-provider table and
the night's report."""

from __future__ import annotations

import time
from uuid import UUID

from prefect import get_run_logger
from prefect.artifacts import (
    acreate_markdown_artifact,
    acreate_progress_artifact,
    acreate_table_artifact,
    aupdate_progress_artifact,
)

from imagebatch.batch import BatchSummary
from imagebatch.models import PromptRecord
from imagebatch.prefect.runs import generate_task_run_links
from imagebatch.progress import BatchProgress
from imagebatch.report import REPORT_ROWS, NightEvent, markdown_report, provider_table, report_links
from imagebatch.storage.base import Sink

__all__ = ["PROGRESS_INTERVAL_S", "ProgressArtifact", "create_report_artifacts"]

#: seconds between two progress artifact updates (each is one API call)
PROGRESS_INTERVAL_S = 2.0


class ProgressArtifact:
    """The run's live progress artifact, updated in place at most every
    ``PROGRESS_INTERVAL_S`` seconds (not a task: it is one API call now and then)."""

    def __init__(self, progress: BatchProgress, artifact_id: UUID) -> None:
        self.progress, self.id = progress, artifact_id
        self._updated_at = 0.0

    @classmethod
    async def start(cls, progress: BatchProgress) -> ProgressArtifact:
        artifact_id = await acreate_progress_artifact(
            progress.percent, description=f"Batch {progress.batch_id}: {progress.describe()}"
        )
        return cls(progress, artifact_id)

    async def update(self, *, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self._updated_at < PROGRESS_INTERVAL_S:
            return
        self._updated_at = now
        await aupdate_progress_artifact(
            self.id,
            self.progress.percent,
            description=f"Batch {self.progress.batch_id}: {self.progress.describe()}",
        )


async def create_report_artifacts(
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
    """The table per provider (``<key_prefix>-summary``) and the markdown report
    (``<key_prefix>-report``); see :func:`imagebatch.tasks.report.publish_report`."""
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
    retried = [r.id for r in records if not r.resumed and len(r.attempts) > 1][:REPORT_ROWS]
    await acreate_markdown_artifact(
        markdown=markdown_report(
            summary,
            records,
            links,
            events=events or [],
            task_runs=await generate_task_run_links(retried, flow_runs),
            sheet_uri=sheet_uri,
        ),
        key=f"{key_prefix}-report",
        description=f"Batch {summary.batch_id} report",
    )
