"""A split night's shards: flow runs of the nightly deployment, started and watched by its parent.

Each shard is a run of the deployment (``run_deployment``), so any worker of its work pool may
take it, each in a process of its own, and the UI shows it under the parent as a subflow run.
A shard whose process died is marked Crashed: by its worker when only the flow-run process
died, or by the zombie automation (``automations/zombies.yaml``) when its heartbeats stop
because the whole machine went. The parent then starts the shard again; the shard's records
make the new run resume (only what was in flight when it died is paid for twice).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from uuid import UUID

from prefect import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.context import FlowRunContext
from prefect.deployments import arun_deployment
from prefect.exceptions import ObjectNotFound

from imagebatch.batch import BatchRun
from imagebatch.errors import ConfigError

__all__ = [
    "SHARD_DEPLOYMENT",
    "Shard",
    "ShardEnd",
    "read_shards",
    "shard_deployment",
    "start_shard",
]

#: the deployment a split night started outside a deployment (the CLI) sends its shards to;
#: ``IMAGEBATCH_SHARD_DEPLOYMENT`` names another
SHARD_DEPLOYMENT = "nightly-batch/nightly"
#: every shard's tag (the zombie automation matches it) and its heartbeat interval (seconds)
SHARD_TAG = "imagebatch-shard"
HEARTBEAT_S = 30


@dataclass(frozen=True)
class ShardEnd:
    """How a shard's current run ended, in plain values (what a task may take)."""

    index: int
    label: str
    run_name: str
    why: str  # "<state name>: <message>"


@dataclass
class Shard:
    """One share of a split night and the flow runs that worked on it (the last is current)."""

    index: int  # 0-based
    params: BatchRun
    runs: list[FlowRun] = field(default_factory=list)

    @property
    def label(self) -> str:
        return self.params.shard_label()

    @property
    def current(self) -> FlowRun:
        return self.runs[-1]

    def end(self) -> ShardEnd:
        ended = self.current.state
        why = f"{ended.name}: {(ended.message or '').strip()[:200]}" if ended else "unknown"
        return ShardEnd(self.index, self.label, self.current.name, why)


async def shard_deployment(shards: int) -> UUID:
    """Where the shards go: the deployment this run belongs to, or else the one
    ``IMAGEBATCH_SHARD_DEPLOYMENT`` names (``nightly-batch/nightly`` by default)."""
    context = FlowRunContext.get()
    own = context.flow_run.deployment_id if context and context.flow_run else None
    if own:
        return own
    name = os.environ.get("IMAGEBATCH_SHARD_DEPLOYMENT") or SHARD_DEPLOYMENT
    async with get_client() as client:
        try:
            return (await client.read_deployment_by_name(name)).id
        except ObjectNotFound:
            raise ConfigError(
                f"a night split into {shards} shards runs them as flow runs of the deployment "
                f"{name!r}, which this Prefect server does not have: deploy it (`prefect deploy "
                "--all` in the project directory), start workers of its pool (`prefect worker "
                "start --pool imagebatch`), or name another in IMAGEBATCH_SHARD_DEPLOYMENT",
                source="run",
                key="shards",
            ) from None


async def start_shard(deployment_id: UUID, shard: Shard, night: str) -> FlowRun:
    """A new flow run of the deployment for ``shard``, a subflow run of this run; returned at
    once (its worker starts it)."""
    started = await arun_deployment(
        name=deployment_id,
        parameters={"run": shard.params.model_dump(mode="json", exclude_none=True)},
        flow_run_name=f"{night} · {shard.label}",
        timeout=0,
        as_subflow=True,
        tags=[SHARD_TAG],
        # heartbeats every 30 s, whatever the worker's environment: the zombie automation
        # (automations/zombies.yaml) marks a shard Crashed after 90 s without one
        job_variables={"env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S)}},
    )
    shard.runs.append(started)
    return started


async def read_shards(shards: list[Shard]) -> None:
    """Refresh each shard's current flow run (its state) from the server."""
    async with get_client() as client:
        for shard in shards:
            shard.runs[-1] = await client.read_flow_run(shard.current.id)
