"""The nightly batch: prompts in, published images and a manifest out."""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

from prefect import Task, flow, get_run_logger
from prefect.context import FlowRunContext
from prefect.events import emit_event
from prefect.runtime import flow_run
from prefect.states import Completed, Failed, State
from prefect.utilities.collections import visit_collection

from blocks.storage import sink_from_gcs_block
from imagebatch.batch import (
    BatchRun,
    BatchSummary,
    default_batch_id,
    shard_prompts,
    shard_run,
    summarize,
)
from imagebatch.config import BatchConfig
from imagebatch.errors import ImageBatchError, StorageError
from imagebatch.models import Prompt, PromptRecord
from imagebatch.progress import BatchProgress
from imagebatch.prompts import PromptLoad
from imagebatch.records import RecordStore
from imagebatch.report import NightEvent
from imagebatch.runtime import BatchRuntime
from imagebatch.settings import Settings
from imagebatch.storage import Sink, open_sink
from tasks.generate import generate_image
from tasks.limits import PrefectUsageStore, check_shared_limits, sync_limits
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
from tasks.shards import Shard, read_shards, shard_deployment, start_shard

#: how often a split night's parent reads its shards' states, and the night's progress
SHARD_POLL_S = 5.0
PROGRESS_POLL_S = 30.0
#: a crashed shard is started again this many times at most
SHARD_RESTARTS = 3
#: a shard no worker has taken for this long gets a warning (is a worker of the pool running?)
UNCLAIMED_S = 300.0


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
    but one flow run of the deployment per shard (see :func:`_split_night`); each shard
    (``run.shard`` set) works on every ``shards``-th prompt with the providers' limits shared,
    and leaves the night's manifest, summary and report to the parent.
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
        return await _split_night(run, config, loaded, batch_id, sink, settings)
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
            record_batch(runtime.records, loaded.prompts, _batch_settings(run, batch_id, sink))
        # what is left to do tonight: the finish_by estimate counts it down
        runtime.router.expect([p.id for p in prompts if p.id not in finished])
        progress = BatchProgress(batch_id=batch_id, total=len(prompts))
        artifact_id = await start_progress(progress)
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
                progress.record("resumed")
            else:
                async with limit:
                    progress.record(await _run_prompt(prompt, runtime, generate))
            await update_progress(artifact_id, progress)

        try:
            async with asyncio.TaskGroup() as group:
                for prompt in prompts:
                    group.create_task(settle(prompt))
        finally:
            await runtime.aclose()

        ids = [p.id for p in prompts]
        if run.shard is not None:  # its share only: the parent writes the night's files
            shard_id = f"{batch_id}-shard-{run.shard + 1}"
            records = await asyncio.to_thread(runtime.records.collect, ids, finished)
            summary = _summarize(shard_id, records, finished, ids, loaded, config, runtime.records)
            await update_progress(artifact_id, progress, final=True)
            await publish_report(
                summary,
                records,
                sink,
                config.publish.signed_url_expiry_s,
                journal.events,
                key_prefix="imagebatch-shard",
            )
            logger.info("%s %s: %s", shard_id, summary.outcome, summary.message)
            await name_run_after(summary)
            return _final_state(summary)
        records = write_manifest(runtime.records, ids, finished)
        if config.publish.latest_index:
            publish_index(sink, records)
        summary = _summarize(batch_id, records, finished, ids, loaded, config, runtime.records)
        write_summary(runtime.records, summary)
        await update_progress(artifact_id, progress, final=True)
        sheet = await publish_night_sheet(runtime.records, records, config.publish.contact_sheet)
        await publish_report(
            summary, records, sink, config.publish.signed_url_expiry_s, journal.events, sheet
        )

    logger.info("batch %s %s: %s", batch_id, summary.outcome, summary.message)
    emit_batch_outcome(summary)
    await name_run_after(summary)
    return _final_state(summary)


def _summarize(
    batch_id: str,
    records: list[PromptRecord],
    finished: set[str],
    ids: list[str],
    loaded: PromptLoad,
    config: BatchConfig,
    store: RecordStore,
) -> BatchSummary:
    return summarize(
        batch_id,
        records,
        resumed=finished & set(ids),
        rejected_rows=len(loaded.rejected),
        failure_threshold=config.failure_threshold,
        blocked_threshold=config.blocked_threshold,
        manifest_uri=store.manifest_uri,
    )


def _final_state(summary: BatchSummary) -> State[BatchSummary]:
    if summary.outcome == "failed":
        return Failed(message=summary.message, data=summary)
    if summary.outcome == "partial":
        return Completed(message=summary.message, name="Partially succeeded", data=summary)
    return Completed(message=summary.message, data=summary)


def _batch_settings(run: BatchRun, batch_id: str, sink: Sink) -> dict:
    """What the batch was run with, kept beside it for reruns."""
    return {
        **run.model_dump(mode="json"),
        "prompts": _absolute(run.prompts),
        "config": str(Path(run.config).resolve()) if run.config else None,
        "batch_id": batch_id,
        "output": sink.uri(),
    }


async def _split_night(
    run: BatchRun,
    config: BatchConfig,
    loaded: PromptLoad,
    batch_id: str,
    sink: Sink,
    settings: Settings,
) -> State[BatchSummary]:
    """A night split into ``run.shards`` flow runs of the nightly deployment, one share of the
    prompts each, on whichever workers of its work pool take them (a parent run with its
    shards in the UI).

    The parent holds the batch's lock, keeps its prompts and settings, creates the providers'
    shared limits that are missing (a shard checks them as ``shared_limits: true`` does), and
    starts the shards. A shard's budget is its share of the night's; its deadline what is
    left of the night's. A shard that crashed (its worker saw its process die, or the zombie
    automation saw its heartbeats stop) is started again, up to ``SHARD_RESTARTS`` times: it
    resumes from its records. When every shard has ended, the parent writes the night's
    manifest, summary, contact sheet and report from every prompt's record; a prompt no shard
    settled is recorded as skipped, with the shard's end as the reason.
    """
    logger = get_run_logger()
    deployment = await shard_deployment(run.shards)
    for spec, what in await sync_limits(config, settings.time_scale, create_only=True):
        if what == "created":
            logger.info("created the shared limit %s for the shards", spec.name)
    with sink.lock(batch_id):
        store = RecordStore(sink, batch_id)
        finished = find_finished(store)
        if not run.retry_blocked:
            finished |= find_blocked(store)
        record_batch(store, loaded.prompts, _batch_settings(run, batch_id, sink))
        journal = event_emitter(batch_id, logger)
        ids = [p.id for p in loaded.prompts]
        progress = BatchProgress(batch_id=batch_id, total=len(ids))
        artifact_id = await start_progress(progress)
        budget = run.budget_usd if run.budget_usd is not None else config.budget_usd
        deadline = run.deadline_s if run.deadline_s is not None else config.deadline_s
        started = time.monotonic()
        shards = [
            Shard(k, shard_run(run, k, batch_id, budget_usd=budget, deadline_s=deadline))
            for k in range(run.shards)
        ]
        for shard in shards:
            await start_shard(deployment, shard, batch_id)
        logger.info(
            "batch %s: %d prompts in %d shards (%d already done), output %s",
            batch_id,
            len(ids),
            run.shards,
            len(finished & set(ids)),
            sink.uri(batch_id),
        )
        await _watch_shards(
            shards,
            deployment,
            batch_id,
            journal.events,
            started,
            deadline,
            lambda: _night_progress(store, ids, finished, progress, artifact_id),
        )
        # the night's progress and files, from every prompt's record
        await _night_progress(store, ids, finished, progress, artifact_id, final=True)
        await _record_unsettled(store, shards, loaded.prompts, batch_id)
        records = write_manifest(store, ids, finished)
        if config.publish.latest_index:
            publish_index(sink, records)
        summary = _summarize(batch_id, records, finished, ids, loaded, config, store)
        write_summary(store, summary)
        sheet = await publish_night_sheet(store, records, config.publish.contact_sheet)
        await publish_report(
            summary,
            records,
            sink,
            config.publish.signed_url_expiry_s,
            journal.events,
            sheet,
            flow_runs=[r.id for shard in shards for r in shard.runs],
        )
    logger.info("batch %s %s: %s", batch_id, summary.outcome, summary.message)
    emit_batch_outcome(summary)
    await name_run_after(summary)
    return _final_state(summary)


async def _watch_shards(
    shards: list[Shard],
    deployment,
    batch_id: str,
    events: list[NightEvent],
    started: float,
    deadline_s: float | None,
    show_progress: Callable[[], Awaitable[None]],
) -> None:
    """Wait until every shard has ended; start a crashed one again while restarts and the
    deadline allow; warn about a shard no worker takes; ``show_progress`` now and then."""
    logger = get_run_logger()
    warned: set[int] = set()
    shown = time.monotonic()
    while True:
        await asyncio.sleep(SHARD_POLL_S)
        await read_shards(shards)
        if time.monotonic() - shown >= PROGRESS_POLL_S:
            await show_progress()
            shown = time.monotonic()
        running = False
        for shard in shards:
            state = shard.current.state
            if state is None or not state.is_final():
                running = True
                waiting = state is not None and (state.is_scheduled() or state.is_pending())
                created = shard.current.created
                waited = (datetime.now(UTC) - created).total_seconds() if created else 0.0
                if waiting and waited > UNCLAIMED_S and shard.index not in warned:
                    warned.add(shard.index)
                    logger.warning(
                        "%s has waited %.0f s for a worker: is a worker of the deployment's "
                        "pool running (`prefect worker start --pool ...`)?",
                        shard.label,
                        waited,
                    )
                continue
            left = None if deadline_s is None else deadline_s - (time.monotonic() - started)
            if not state.is_crashed() or len(shard.runs) > SHARD_RESTARTS:
                continue
            if left is not None and left <= 0:
                continue
            crashed = shard.current
            shard.params = shard.params.model_copy(update={"deadline_s": left})
            again = await start_shard(deployment, shard, batch_id)
            running = True
            why = (state.message or "").strip()[:200]
            logger.warning(
                "%s crashed (%s): started again as %s; it resumes from its records",
                shard.label,
                why or state.name,
                again.name,
            )
            detail = {"crashed run": crashed.name, "why": why, "new run": again.name}
            events.append(
                NightEvent(datetime.now(UTC), "imagebatch.shard.restarted", shard.label, detail)
            )
            emit_event(
                event="imagebatch.shard.restarted",
                resource={
                    "prefect.resource.id": f"prefect.flow-run.{crashed.id}",
                    "prefect.resource.name": crashed.name,
                },
                related=[
                    {
                        "prefect.resource.id": f"imagebatch.batch.{batch_id}",
                        "prefect.resource.role": "batch",
                    }
                ],
                payload={**detail, "shard": shard.label},
            )
        if not running:
            return


async def _night_progress(
    store: RecordStore,
    ids: list[str],
    finished: set[str],
    progress: BatchProgress,
    artifact_id,
    *,
    final: bool = False,
) -> None:
    """The parent's progress artifact, from the records the shards wrote (one listing)."""
    done = await asyncio.to_thread(store.succeeded_ids)
    wanted = set(ids)
    progress.counts = Counter(
        {"resumed": len(finished & wanted), "succeeded": len((done - finished) & wanted)}
    )
    progress.notify()
    await update_progress(artifact_id, progress, final=final)


async def _record_unsettled(
    store: RecordStore, shards: list[Shard], prompts: list[Prompt], batch_id: str
) -> None:
    """A skipped record, naming its shard's end, for every prompt no shard settled (a shard
    that crashed more often than it is restarted, ran out of the deadline, or failed before
    its prompts): the manifest lists every prompt of the night."""
    recorded = await asyncio.to_thread(store.recorded_ids)
    for shard in shards:
        ended = shard.current.state
        why = f"{ended.name}: {(ended.message or '').strip()[:200]}" if ended else "unknown"
        for prompt in shard_prompts(prompts, shard.index, len(shards)):
            if prompt.id not in recorded:
                record = PromptRecord(
                    id=prompt.id,
                    status="skipped",
                    error=(
                        f"{shard.label} ended before it settled this prompt (its run "
                        f"{shard.current.name} ended {why}); run the batch again to finish it"
                    ),
                    batch_id=batch_id,
                    finished_at=datetime.now(UTC),
                )
                await asyncio.to_thread(store.write_failure, record)


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
