"""The nightly batch: prompts in, published images and a manifest out."""

from __future__ import annotations

import asyncio
import os
from datetime import datetime
from pathlib import Path

from prefect import Task, flow, get_run_logger
from prefect.context import FlowRunContext
from prefect.runtime import flow_run
from prefect.states import Completed, Failed, State
from prefect.utilities.collections import visit_collection

from blocks.storage import sink_from_gcs_block
from imagebatch.batch import BatchRun, BatchSummary, default_batch_id, summarize
from imagebatch.config import BatchConfig
from imagebatch.errors import ImageBatchError, StorageError
from imagebatch.models import Prompt
from imagebatch.progress import BatchProgress
from imagebatch.runtime import BatchRuntime
from imagebatch.settings import Settings
from imagebatch.storage import Sink, open_sink
from tasks.generate import generate_image
from tasks.limits import PrefectUsageStore, check_shared_limits
from tasks.load import load_config, load_prompts, resolve_provider_blocks
from tasks.plan import plan_batch
from tasks.process import process_image
from tasks.publish import publish_images, publish_index, record_failure, reuse_published
from tasks.report import (
    emit_batch_outcome,
    event_emitter,
    find_blocked,
    find_finished,
    name_run_after,
    publish_night_sheet,
    publish_report,
    record_batch,
    start_progress,
    update_progress,
    write_manifest,
    write_summary,
)


def _run_day() -> datetime:
    """The scheduled start of this run (its date names the default batch), in local time."""
    scheduled = flow_run.scheduled_start_time
    return (scheduled or datetime.now()).astimezone()


#: the form's defaults (a model default, not ``None``, so the UI shows the fields at once and
#: "Quick run" runs the example prompts on the embedded defaults); never modified
_DEFAULT_RUN = BatchRun()


def _night_name() -> str:
    """The run's name when it starts: its batch id (the runs list reads as a log of nights)."""
    run = flow_run.parameters.get("run", _DEFAULT_RUN)
    try:
        run = run if isinstance(run, BatchRun) else BatchRun.model_validate(run)
    except ValueError:  # the flow's own validation reports it
        return "nightly-batch"
    return run.batch_id or default_batch_id(run.prompts, _run_day().date())


@flow(name="nightly-batch", flow_run_name=_night_name)
async def nightly_batch(run: BatchRun = _DEFAULT_RUN) -> State[BatchSummary]:
    """Generate, process and publish every prompt of a batch; resumable by batch id.

    Args:
        run: what to run (prompt file, config, output, batch id, bad-row policy, in-flight cap).

    Returns:
        Completed when every prompt succeeded or was blocked; Completed named "Partially
        succeeded" when the failed and skipped prompts stay within the config's failure
        threshold; Failed above it. The UI shows a live progress artifact, and at the end a
        table per provider (``imagebatch-summary``) and a report (``imagebatch-report``).
    """
    logger = get_run_logger()
    config = load_config(run.config)
    overrides = {
        key: value
        for key, value in (
            ("budget_usd", run.budget_usd),
            ("deadline_s", run.deadline_s),
            ("finish_by", run.finish_by),
        )
        if value is not None
    }
    if overrides:  # this run's own cap or deadline, from the form or the CLI
        config = config.model_copy(update=overrides)
    secrets: dict[str, str] = {}
    if any(p.block for p in config.providers):
        config, secrets = await resolve_provider_blocks(config)
    loaded = load_prompts(run.prompts, skip_bad_rows=run.skip_bad_rows)
    for rejected in loaded.rejected:
        logger.warning("skipped bad row of %s: %s", loaded.source, rejected)

    if run.dry_run:
        plan = await plan_batch(loaded.prompts, config)
        logger.info("plan:\n%s", plan.describe())
        if plan.feasible:
            return Completed(message=plan.describe().splitlines()[0], name="Planned")
        return Failed(message="; ".join(plan.warnings), name="Plan does not fit")

    batch_id = run.batch_id or default_batch_id(run.prompts, _run_day().date())
    settings = Settings()
    sink = await _open_output(run, config, settings)
    shared, store = None, None
    if config.shared_limits:  # every worker on this server shares each provider's limits
        shared = await check_shared_limits(config, settings.time_scale, run.config or "")
        store = PrefectUsageStore()
    with sink.lock(batch_id):
        journal = event_emitter(batch_id, logger)
        runtime = BatchRuntime(
            config,
            sink,
            batch_id,
            env={**os.environ, **secrets},
            settings=settings,
            store=store,
            shared=shared,
            emit=journal,
        )
        for note in runtime.health_notes:
            logger.info("recorded provider health: %s", note)
        generate = generate_image.with_options(
            retries=config.retry.max_attempts - 1,
            retry_delay_seconds=config.retry.delays(settings.time_scale),
            retry_jitter_factor=config.retry.jitter,
        )
        finished = find_finished(runtime.records)
        if not run.retry_blocked:
            finished |= find_blocked(runtime.records)  # kept as they are, counted as resumed
        record_batch(
            runtime.records,
            loaded.prompts,
            {
                **run.model_dump(mode="json"),
                "prompts": _absolute(run.prompts),
                "config": str(Path(run.config).resolve()) if run.config else None,
                "batch_id": batch_id,
                "output": sink.uri(),
            },
        )
        # what is left to do tonight: the finish_by estimate counts it down
        runtime.router.expect([p.id for p in loaded.prompts if p.id not in finished])
        progress = BatchProgress(batch_id=batch_id, total=len(loaded.prompts))
        artifact_id = await start_progress(progress)
        limit = asyncio.Semaphore(run.max_in_flight or config.prompts_in_flight())
        logger.info(
            "batch %s: %d prompts, %d already done, output %s",
            batch_id,
            len(loaded.prompts),
            len(finished & {p.id for p in loaded.prompts}),
            sink.uri(batch_id),
        )

        async def settle(prompt: Prompt) -> None:
            if prompt.id in finished:
                progress.record("resumed")
            else:
                async with limit:
                    progress.record(await _run_prompt(prompt, runtime, generate))
            await update_progress(artifact_id, progress)

        try:
            async with asyncio.TaskGroup() as group:
                for prompt in loaded.prompts:
                    group.create_task(settle(prompt))
        finally:
            await runtime.aclose()

        ids = [p.id for p in loaded.prompts]
        records = write_manifest(runtime.records, ids, finished)
        if config.publish.latest_index:
            publish_index(sink, records)
        summary = summarize(
            batch_id,
            records,
            resumed=finished & set(ids),
            rejected_rows=len(loaded.rejected),
            failure_threshold=config.failure_threshold,
            blocked_threshold=config.blocked_threshold,
            manifest_uri=runtime.records.manifest_uri,
        )
        write_summary(runtime.records, summary)
        await update_progress(artifact_id, progress, final=True)
        sheet = await publish_night_sheet(runtime.records, records, config.publish.contact_sheet)
        await publish_report(
            summary, records, sink, config.publish.signed_url_expiry_s, journal.events, sheet
        )

    logger.info("batch %s %s: %s", batch_id, summary.outcome, summary.message)
    emit_batch_outcome(summary)
    await name_run_after(summary)
    if summary.outcome == "failed":
        return Failed(message=summary.message, data=summary)
    if summary.outcome == "partial":
        return Completed(message=summary.message, name="Partially succeeded", data=summary)
    return Completed(message=summary.message, data=summary)


async def _open_output(run: BatchRun, config: BatchConfig, settings: Settings) -> Sink:
    cache_control = config.publish.cache_control
    if run.gcs_block:
        return await sink_from_gcs_block(
            run.gcs_block, settings=settings, cache_control=cache_control
        )
    return open_sink(run.output or config.output, settings=settings, cache_control=cache_control)


def _absolute(source: str) -> str:
    return source if "://" in source else str(Path(source).resolve())


async def _run_prompt(prompt: Prompt, runtime: BatchRuntime, generate: Task) -> str:
    """Reuse, or generate, process and publish one prompt; record why if it does not succeed."""
    if runtime.reusable(prompt):
        try:
            reused = await reuse_published(prompt, runtime)
            _forget_results(reused)
            if reused is not None:
                return "reused"
        except StorageError as exc:  # reuse only saves money: generate instead
            get_run_logger().warning("could not reuse earlier images of %s: %s", prompt.id, exc)
    image = renditions = None
    try:
        image = await generate(prompt, runtime)
        renditions = await process_image(prompt, image, runtime)
        record = await publish_images(prompt, image, renditions, runtime)
    except ImageBatchError as exc:
        record = await record_failure(prompt, exc, runtime)
    _forget_results(image, renditions, record)
    return record.status


def _forget_results(*results: object) -> None:
    """Drop Prefect's links from a settled prompt's task results to their task runs.

    For the whole flow run Prefect maps every task result, and each of its direct parts, to
    the task run's state (``FlowRunContext.run_results``), so that passing a result to another
    task draws the dependency in the UI. Nothing passes a settled prompt's results on, and the
    map never shrinks (about 13 KB a prompt: 130 MB at 10,000), so its entries go here.
    """
    links = getattr(FlowRunContext.get(), "run_results", None)
    if not isinstance(links, dict):  # another Prefect keeps them elsewhere: nothing to drop
        return
    for result in results:
        if result is not None:
            visit_collection(result, lambda part: links.pop(id(part), None), max_depth=1)
