"""imagebatch's Prefect events: what automations match (see ``automations/``).

The provider is an event's resource and the batch a related resource, so an automation can
match either. Names (renaming one is a change users' automations see: say it in CHANGELOG.md):
``imagebatch.circuit.opened`` / ``.closed``, ``imagebatch.provider.failover`` / ``.failback`` /
``.faulty``, ``imagebatch.quota.exhausted``, ``imagebatch.batch.completed`` / ``.failed``,
``imagebatch.shard.restarted``.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from prefect.events import emit_event

from imagebatch.batch import BatchSummary
from imagebatch.report import NightEvent

__all__ = ["EventJournal", "emit_batch_outcome", "emit_shard_restarted", "event_emitter"]


def _batch(batch_id: str) -> dict[str, str]:
    return {"prefect.resource.id": f"imagebatch.batch.{batch_id}", "prefect.resource.role": "batch"}


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
            related=[_batch(batch_id)],
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


def emit_shard_restarted(
    batch_id: str, crashed_run_id, crashed_run_name: str, payload: dict[str, str]
) -> None:
    """``imagebatch.shard.restarted``: a split night's parent started a crashed shard again."""
    emit_event(
        event="imagebatch.shard.restarted",
        resource={
            "prefect.resource.id": f"prefect.flow-run.{crashed_run_id}",
            "prefect.resource.name": crashed_run_name,
        },
        related=[_batch(batch_id)],
        payload=payload,
    )
