"""rerun-batch: settle, as the same batch, what a night left failed or skipped."""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run
from prefect.states import Completed, Failed, State

from imagebatch.batch import BatchSummary, rerun_params
from imagebatch.flows.nightly_batch import nightly_batch


def _rerun_name() -> str:
    """``<batch> rerun``: the batch is the manifest's folder."""
    manifest = str(flow_run.parameters.get("manifest", ""))
    parts = manifest.replace("\\", "/").rstrip("/").split("/")
    return f"{parts[-2]} rerun" if len(parts) >= 2 and parts[-2] else "rerun"


@flow(name="rerun-batch", flow_run_name=_rerun_name)
async def rerun_batch(
    manifest: str, include_blocked: bool = False, config: str | None = None
) -> State[BatchSummary]:
    """Run again the prompts of a batch that did not succeed, as that same batch.

    Args:
        manifest: the batch's manifest.jsonl (a path on the worker, or gs://).
        include_blocked: also try again the prompts a provider refused.
        config: another config (empty: the one the batch ran with).

    Returns:
        The nightly-batch subflow's state: its prompts that had succeeded are kept as they were
        (resumed), the others run again.
    """
    params = rerun_params(manifest, include_blocked=include_blocked, config=config)
    state = await nightly_batch(run=params, return_state=True)
    summary = await state.aresult(raise_on_failure=False)
    if not isinstance(summary, BatchSummary):  # the batch could not run: its error
        return Failed(message=str(summary))
    # the batch's own outcome, so the runs list tells the story for the rerun too
    if state.is_completed():
        return Completed(message=state.message, name=state.name, data=summary)
    return Failed(message=state.message, data=summary)
