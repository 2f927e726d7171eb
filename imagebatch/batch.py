"""A batch as a whole: its run parameters, its id, and how its outcome is judged."""

from __future__ import annotations

import re
from collections import Counter
from datetime import date
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from imagebatch.config import FinishBy
from imagebatch.errors import FAULTY_PROVIDER
from imagebatch.models import SAFE_ID_PATTERN, Prompt, PromptRecord

__all__ = [
    "BatchRun",
    "BatchSummary",
    "Outcome",
    "batch_settings",
    "default_batch_id",
    "rerun_params",
    "shard_prompts",
    "shard_run",
    "summarize",
]

#: a split night's shards at most (each a flow run, its own process on some worker)
MAX_SHARDS = 64

Outcome = Literal["completed", "partial", "failed"]


class BatchRun(BaseModel):
    """What to run: the one parameter of the nightly flow (a form in the Prefect UI)."""

    model_config = ConfigDict(extra="forbid")

    prompts: str = Field(
        default="examples/prompts.jsonl",
        description="Prompt file (JSONL, CSV or YAML): a path on the worker or gs://BUCKET/FILE",
    )
    config: str | None = Field(
        default=None, description="Config YAML path; empty for the embedded offline default"
    )
    output: str | None = Field(
        default=None,
        description="Output directory or gs://BUCKET/PREFIX; empty for the config's `output`",
    )
    gcs_block: str | None = Field(
        default=None,
        description="Name of a saved GcsBucket block to publish to (instead of `output`)",
    )
    batch_id: str | None = Field(
        default=None,
        pattern=SAFE_ID_PATTERN,
        description="Same id resumes that batch; empty for the prompt file's name and the "
        "run's date (prompts-2026-12-04)",
    )
    skip_bad_rows: bool = Field(
        default=False, description="Skip malformed prompt rows (reported) instead of failing"
    )
    max_in_flight: int | None = Field(
        default=None, ge=1, le=1000, description="Prompts worked on at once; empty for the config's"
    )
    budget_usd: float | None = Field(
        default=None, ge=0, description="Spend cap for this run; empty for the config's"
    )
    deadline_s: float | None = Field(
        default=None,
        gt=0,
        description="Send nothing new this many seconds after the start; empty for the config's",
    )
    finish_by: FinishBy | None = Field(
        default=None,
        description="Finish by this time ('06:00', '06:00 Europe/Berlin' or an ISO date-time): "
        "prompts go down the chain as soon as the preferred providers alone would miss it; "
        "empty for the config's",
    )
    retry_blocked: bool = Field(
        default=True, description="Also try again prompts a provider refused in an earlier run"
    )
    dry_run: bool = Field(
        default=False,
        description="Only estimate the time and cost (the plan artifact); generate nothing",
    )
    shards: int = Field(
        default=1,
        ge=1,
        le=MAX_SHARDS,
        description="Split the night into this many runs of the nightly deployment, spread "
        "over its work pool's workers (they share each provider's limits); 1: this run does "
        "it all",
    )
    shard: int | None = Field(
        default=None,
        ge=0,
        lt=MAX_SHARDS,
        description="Set by a split night's parent run (this run does one share of the "
        "prompts); leave empty",
    )

    @model_validator(mode="after")
    def _shard_in_range(self) -> BatchRun:
        if self.shard is not None and self.shard >= self.shards:
            raise ValueError(f"shard {self.shard} of {self.shards}: shard must be below shards")
        return self

    def shard_label(self) -> str:
        """``shard 2/4`` (1-based, as the UI shows it), or empty for a whole night."""
        return "" if self.shard is None else f"shard {self.shard + 1}/{self.shards}"


def shard_prompts(prompts: list[Prompt], shard: int, shards: int) -> list[Prompt]:
    """The prompts of shard ``shard`` of ``shards``: every ``shards``-th from position
    ``shard`` of the validated prompts, so each prompt is in exactly one shard and the shards
    are even (within one prompt) whatever the order of the file."""
    return prompts[shard::shards]


def shard_run(
    run: BatchRun,
    shard: int,
    batch_id: str,
    *,
    budget_usd: float | None,
    deadline_s: float | None,
) -> BatchRun:
    """The parameters of one shard of ``run``: the same prompts, config and output, the
    night's batch id, its share of the night's budget and what is left of its deadline."""
    return run.model_copy(
        update={
            "batch_id": batch_id,
            "shard": shard,
            "budget_usd": None if budget_usd is None else budget_usd / run.shards,
            "deadline_s": deadline_s,
            "dry_run": False,
        }
    )


def rerun_params(
    manifest: str, *, include_blocked: bool = False, config: str | None = None
) -> BatchRun:
    """The run that settles what a batch left unsettled, from its manifest's URI or path.

    The batch's validated prompts and settings are kept beside its manifest; the rerun is the
    same batch (same id and output), so its finished prompts are kept as they are.
    """
    import json
    import os

    from imagebatch.errors import InputError, StorageError
    from imagebatch.records import BATCH_NAME, PROMPTS_NAME
    from imagebatch.storage import open_sink

    uri = manifest.removeprefix("file://")
    if "://" not in uri:
        uri = os.path.abspath(uri)
    parts = uri.rsplit("/", 2)
    saved = None
    if len(parts) == 3 and parts[2] == "manifest.jsonl":
        root, batch = parts[0] or "/", parts[1]
        try:
            data = open_sink(root).read(f"{batch}/{BATCH_NAME}")
            saved = json.loads(data) if data else None
        except (StorageError, ValueError) as exc:
            raise InputError(f"{manifest}: {exc}") from None
    if not saved:
        raise InputError(
            f"{manifest}: no batch settings ({BATCH_NAME}) beside it; give the manifest.jsonl "
            "of a batch"
        )
    return BatchRun(
        prompts=f"{root.rstrip('/')}/{batch}/{PROMPTS_NAME}",
        config=config or saved.get("config"),
        output=root,
        gcs_block=saved.get("gcs_block"),
        batch_id=saved["batch_id"],
        max_in_flight=saved.get("max_in_flight"),
        retry_blocked=include_blocked,
    )


def batch_settings(run: BatchRun, batch_id: str, output_uri: str) -> dict:
    """What the batch was run with, kept beside it for reruns (paths made absolute)."""

    def absolute(source: str) -> str:
        return source if "://" in source else str(Path(source).resolve())

    return {
        **run.model_dump(mode="json"),
        "prompts": absolute(run.prompts),
        "config": absolute(run.config) if run.config else None,
        "batch_id": batch_id,
        "output": output_uri,
    }


def default_batch_id(source: str, day: date) -> str:
    """``<prompt file stem>-<YYYY-MM-DD>``, reduced to the characters ids may hold."""
    stem = PurePosixPath(source.replace("\\", "/")).name.split(".")[0]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-._") or "batch"
    return f"{stem[:100]}-{day.isoformat()}"


class BatchSummary(BaseModel):
    """The counts a batch ends with; what the CLI prints and the flow returns."""

    batch_id: str
    total: int
    succeeded: int = 0
    blocked: int = 0
    failed: int = 0
    skipped: int = 0
    resumed: int = 0
    reused: int = 0
    rejected_rows: int = 0
    cost_usd: float = 0.0
    manifest_uri: str
    outcome: Outcome
    message: str

    def title(self) -> str:
        """``<batch> · <succeeded>/<total> · $<cost>``: the night at a glance (a run's name)."""
        return f"{self.batch_id} · {self.succeeded}/{self.total} · ${self.cost_usd:.2f}"


def summarize(
    batch_id: str,
    records: list[PromptRecord],
    *,
    resumed: set[str],
    rejected_rows: int,
    failure_threshold: float,
    manifest_uri: str,
    blocked_threshold: float = 0.5,
) -> BatchSummary:
    """Count the records and judge the outcome: the one definition the flow, the CLI, the
    events and the report use.

    Completed: every prompt succeeded or was blocked. Partial: some failed or were skipped, but
    no more than ``failure_threshold`` of them. Failed: above that; or this run had prompts to
    generate and published none of them; or more than ``blocked_threshold`` of them came back
    blocked (a provider's silent filter is not a normal night). A run whose prompts were all
    done already (resumed) or served by reuse is not a failure.
    """
    counts = Counter(r.status for r in records)
    total = len(records)
    unsettled = counts["failed"] + counts["skipped"]
    fresh = [r for r in records if r.id not in resumed]  # what this run had to do
    published = sum(1 for r in fresh if r.status == "succeeded")
    blocked = [r for r in fresh if r.status == "blocked"]
    why = None
    if fresh and not published:
        why = _nothing_published(fresh, blocked)
    elif fresh and len(blocked) / len(fresh) > blocked_threshold:
        why = (
            f"{len(blocked)} of {len(fresh)} prompts came back blocked, over the blocked "
            f"threshold of {blocked_threshold:.0%}{_blank_hint(blocked)}"
        )
    if why is None and total and unsettled / total > failure_threshold:
        why = f"over the failure threshold of {failure_threshold:.0%}"
    outcome: Outcome = "failed" if why is not None else "completed" if unsettled == 0 else "partial"
    # each prompt counted once: what this run settled, then what earlier runs had
    reused = sum(1 for r in fresh if r.reused_from)
    now = Counter(r.status for r in fresh)
    parts = []
    if now["succeeded"] or not resumed:
        parts.append(f"{now['succeeded']} succeeded" + (f" ({reused} reused)" if reused else ""))
    parts += [f"{now[s]} {s}" for s in ("blocked", "failed", "skipped") if now[s]]
    if resumed:
        parts.append(f"{len(resumed)} resumed")
    message = f"{', '.join(parts)} of {total} prompts"
    if why is not None:
        message += f" ({why})"
    return BatchSummary(
        batch_id=batch_id,
        total=total,
        succeeded=counts["succeeded"],
        blocked=counts["blocked"],
        failed=counts["failed"],
        skipped=counts["skipped"],
        resumed=len(resumed),
        reused=reused,
        rejected_rows=rejected_rows,
        cost_usd=round(sum(r.cost_usd for r in records if r.id not in resumed), 6),
        manifest_uri=manifest_uri,
        outcome=outcome,
        message=message,
    )


def _blank_hint(blocked: list[PromptRecord]) -> str:
    blank = sum(1 for r in blocked if r.error_kind == "BlankImage")
    if blocked and blank == len(blocked):
        return ": every one a blank image, the provider's silent filter?"
    return ""


def _nothing_published(fresh: list[PromptRecord], blocked: list[PromptRecord]) -> str:
    if len(blocked) == len(fresh):
        if _blank_hint(blocked):
            return "nothing published: every image came back blank, the provider's silent filter?"
        return "nothing published: the providers refused every prompt"
    faulty = [r for r in fresh if r.error_kind == FAULTY_PROVIDER]
    if faulty:
        return (
            "nothing published: a provider returned blank images prompt after prompt and was "
            "taken out of the chain"
        )
    return "nothing published: no prompt of this run succeeded"
