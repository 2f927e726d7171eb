"""Plan before paying: the estimate of a batch, as a task and a report in the UI."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import acreate_markdown_artifact
from prefect.cache_policies import NO_CACHE

from imagebatch.config import BatchConfig
from imagebatch.models import Prompt
from imagebatch.plan import Plan
from imagebatch.plan import plan_batch as _plan_batch


@task(name="plan_batch", cache_policy=NO_CACHE, persist_result=False)
async def plan_batch(prompts: list[Prompt], config: BatchConfig) -> Plan:
    """Estimate the batch's time and cost from the configured quotas, latency and prices.

    Returns:
        The plan; it is also published as the markdown artifact ``imagebatch-plan``, with a
        warning for a deadline, budget or daily quota the batch would not fit in.
    """
    plan = _plan_batch(prompts, config)
    await acreate_markdown_artifact(
        key="imagebatch-plan",
        markdown=f"# Plan\n\n```\n{plan.describe()}\n```\n",
        description="Estimated time and cost of the batch",
    )
    return plan
