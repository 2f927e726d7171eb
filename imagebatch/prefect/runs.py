"""The flow run as the runs list shows it, and links to its task runs."""

from __future__ import annotations

from uuid import UUID

from prefect import get_client, get_run_logger
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    TaskRunFilter,
    TaskRunFilterName,
)
from prefect.client.schemas.sorting import TaskRunSort
from prefect.context import FlowRunContext
from prefect.states import Completed, Failed, State
from prefect.utilities.urls import url_for

from imagebatch.batch import BatchSummary

__all__ = ["API_PAGE", "generate_task_run_links", "name_run_after", "outcome_state"]

#: the most a read of the Prefect API returns (its server's default limit)
API_PAGE = 200


def outcome_state(summary: BatchSummary) -> State[BatchSummary]:
    """The flow run's final state for a night's outcome (judged in :mod:`imagebatch.batch`):
    Failed, Completed named "Partially succeeded", or Completed."""
    if summary.outcome == "failed":
        return Failed(message=summary.message, data=summary)
    if summary.outcome == "partial":
        return Completed(message=summary.message, name="Partially succeeded", data=summary)
    return Completed(message=summary.message, data=summary)


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


async def generate_task_run_links(
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
