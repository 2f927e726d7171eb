"""A split night's parent: the nightly flow with ``shards`` above 1 runs no prompt itself.

It starts one flow run of the nightly deployment per shard (:mod:`imagebatch.prefect.shards`),
watches them, restarts a crashed one, and writes the night's files when all have ended. Not a
flow of its own: :func:`imagebatch.flows.nightly_batch.nightly_batch` calls :func:`split_night`.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from prefect import get_run_logger
from prefect.states import State

from imagebatch.batch import BatchRun, BatchSummary, batch_settings, shard_run
from imagebatch.config import BatchConfig
from imagebatch.flows.night_end import close_night
from imagebatch.prefect.artifacts import ProgressArtifact
from imagebatch.prefect.events import emit_shard_restarted, event_emitter
from imagebatch.prefect.limit_admin import sync_limits
from imagebatch.prefect.shards import Shard, read_shards, shard_deployment, start_shard
from imagebatch.progress import BatchProgress
from imagebatch.prompts import PromptLoad
from imagebatch.records import RecordStore
from imagebatch.report import NightEvent
from imagebatch.settings import Settings
from imagebatch.storage import Sink
from imagebatch.tasks.report import find_blocked, find_finished, record_batch
from imagebatch.tasks.shards import record_unsettled

__all__ = ["split_night"]

#: how often a split night's parent reads its shards' states, and the night's progress
SHARD_POLL_S = 5.0
PROGRESS_POLL_S = 30.0
#: a crashed shard is started again this many times at most
SHARD_RESTARTS = 3
#: a shard no worker has taken for this long gets a warning (is a worker of the pool running?)
UNCLAIMED_S = 300.0


async def split_night(
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
        record_batch(store, loaded.prompts, batch_settings(run, batch_id, sink.uri()))
        journal = event_emitter(batch_id, logger)
        ids = [p.id for p in loaded.prompts]
        progress = await ProgressArtifact.start(BatchProgress(batch_id=batch_id, total=len(ids)))
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
            lambda: _night_progress(store, ids, finished, progress),
        )
        # the night's progress and files, from every prompt's record
        await _night_progress(store, ids, finished, progress, final=True)
        await record_unsettled(store, [s.end() for s in shards], loaded.prompts, batch_id)
        return await close_night(
            store=store,
            sink=sink,
            ids=ids,
            finished=finished,
            loaded=loaded,
            config=config,
            progress=progress,
            events=journal.events,
            flow_runs=[r.id for shard in shards for r in shard.runs],
        )


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
            emit_shard_restarted(
                batch_id, crashed.id, crashed.name, {**detail, "shard": shard.label}
            )
        if not running:
            return


async def _night_progress(
    store: RecordStore,
    ids: list[str],
    finished: set[str],
    artifact: ProgressArtifact,
    *,
    final: bool = False,
) -> None:
    """The parent's progress artifact, from the records the shards wrote (one listing)."""
    done = await asyncio.to_thread(store.succeeded_ids)
    wanted = set(ids)
    artifact.progress.counts = Counter(
        {"resumed": len(finished & wanted), "succeeded": len((done - finished) & wanted)}
    )
    artifact.progress.notify()
    await artifact.update(final=final)
