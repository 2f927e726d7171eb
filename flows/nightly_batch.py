"""The nightly batch: prompts in, published images and a manifest out."""

from __future__ import annotations

import asyncio
import os
from datetime import datetime

from prefect import Task, flow, get_run_logger
from prefect.context import FlowRunContext
from prefect.runtime import flow_run
from prefect.states import Completed, Failed, State
from prefect.utilities.collections import visit_collection

from imagebatch.batch import (
    BatchRun,
    BatchSummary,
    batch_settings,
    default_batch_id,
    shard_prompts,
)
from imagebatch.config import BatchConfig
from imagebatch.errors import ImageBatchError, StorageError
from imagebatch.flows.night_end import close_night, close_shard
from imagebatch.flows.split_night import split_night
from imagebatch.models import Prompt
from imagebatch.prefect.artifacts import ProgressArtifact
from imagebatch.prefect.daily_usage import PrefectUsageStore
from imagebatch.prefect.events import event_emitter
from imagebatch.prefect.gcs_block import sink_from_gcs_block
from imagebatch.progress import BatchProgress
from imagebatch.runtime import BatchRuntime
from imagebatch.settings import Settings
from imagebatch.storage import Sink, open_sink
from imagebatch.tasks.generate import generate_image, refusal
from imagebatch.tasks.limits import check_shared_limits
from imagebatch.tasks.load import load_config, load_prompts, resolve_provider_blocks
from imagebatch.tasks.plan import plan_batch
from imagebatch.tasks.process import process_image
from imagebatch.tasks.publish import publish_images, record_failure, reuse_published
from imagebatch.tasks.report import find_blocked, find_finished, record_batch


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
    night = run.batch_id or default_batch_id(run.prompts, _run_day().date())
    return f"{night} · {run.shard_label()}" if run.shard is not None else night


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

    With ``run.shards`` above 1 this run is a split night's parent: it runs no prompt itself
    but one flow run of the deployment per shard (:mod:`imagebatch.flows.split_night`); each
    shard (``run.shard`` set) works on every ``shards``-th prompt with the providers' limits
    shared, and leaves the night's manifest, summary and report to the parent.
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
    if run.shards > 1 and run.shard is None:
        return await split_night(run, config, loaded, batch_id, sink, settings)
    prompts, lock = loaded.prompts, batch_id
    if run.shard is not None:  # one share of a split night: the shards share every limit
        prompts = shard_prompts(loaded.prompts, run.shard, run.shards)
        config = config.model_copy(update={"shared_limits": True})
        lock = f"{batch_id}/shard-{run.shard + 1}"
    shared, store = None, None
    if config.shared_limits:  # every worker on this server shares each provider's limits
        shared = await check_shared_limits(config, settings.time_scale, run.config or "")
        store = PrefectUsageStore()
    with sink.lock(lock):
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
        if run.shard is None:  # a shard's parent keeps them for the whole night
            record_batch(runtime.records, loaded.prompts, batch_settings(run, batch_id, sink.uri()))
        # what is left to do tonight: the finish_by estimate counts it down
        runtime.router.expect([p.id for p in prompts if p.id not in finished])
        progress = await ProgressArtifact.start(
            BatchProgress(batch_id=batch_id, total=len(prompts))
        )
        limit = asyncio.Semaphore(run.max_in_flight or config.prompts_in_flight())
        logger.info(
            "batch %s%s: %d prompts, %d already done, output %s",
            batch_id,
            f" ({run.shard_label()} of {len(loaded.prompts)})" if run.shard is not None else "",
            len(prompts),
            len(finished & {p.id for p in prompts}),
            sink.uri(batch_id),
        )

        async def settle(prompt: Prompt) -> None:
            if prompt.id in finished:
                progress.progress.record("resumed")
            else:
                async with limit:
                    progress.progress.record(await _run_prompt(prompt, runtime, generate))
            await progress.update()

        try:
            async with asyncio.TaskGroup() as group:
                for prompt in prompts:
                    group.create_task(settle(prompt))
        finally:
            await runtime.aclose()

        ids = [p.id for p in prompts]
        night = dict(
            store=runtime.records,
            sink=sink,
            ids=ids,
            finished=finished,
            loaded=loaded,
            config=config,
            progress=progress,
            events=journal.events,
        )
        if run.shard is not None:  # its share only: the parent writes the night's files
            return await close_shard(shard_id=f"{batch_id}-shard-{run.shard + 1}", **night)
        return await close_night(**night)


async def _open_output(run: BatchRun, config: BatchConfig, settings: Settings) -> Sink:
    cache_control = config.publish.cache_control
    if run.gcs_block:
        return await sink_from_gcs_block(
            run.gcs_block, settings=settings, cache_control=cache_control
        )
    return open_sink(run.output or config.output, settings=settings, cache_control=cache_control)


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
        refused = await refusal(image)  # its task run is Completed, named "Blocked"
        if refused is not None:
            raise refused
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
