"""provider-health: probe each configured provider and record its health for the next batch."""

from __future__ import annotations

import os

from prefect import flow, get_run_logger, task
from prefect.artifacts import acreate_table_artifact
from prefect.cache_policies import NO_CACHE

from imagebatch.config import BatchConfig, ProviderConfig
from imagebatch.health_probe import ProbeResult
from imagebatch.health_probe import probe_provider as _probe_provider
from imagebatch.prefect.daily_usage import PrefectUsageStore
from imagebatch.resilience import FileHealthStore, FileUsageStore
from imagebatch.settings import Settings
from imagebatch.tasks.load import load_config, resolve_provider_blocks


@task(
    name="probe_provider",
    task_run_name="probe-{provider.name}",
    cache_policy=NO_CACHE,
    persist_result=False,
)
async def probe_provider(
    provider: ProviderConfig, config: BatchConfig, secrets: dict[str, str]
) -> ProbeResult:
    """One minimal real request to the provider's batch model (skipped if not due).

    Returns:
        Its state (healthy, overloaded, quota_exhausted, auth_failing, model_missing, or
        skipped), what was seen, the latency and the cost.
    """
    settings = Settings()
    usage = PrefectUsageStore() if config.shared_limits else FileUsageStore(settings.state_dir)
    try:
        return await _probe_provider(
            provider,
            {**os.environ, **secrets},
            health=FileHealthStore(settings.state_dir),
            usage=usage,
        )
    finally:
        close = getattr(usage, "close", None)
        if close is not None:
            close()


@flow(name="provider-health")
async def provider_health(config: str | None = None) -> dict[str, str]:
    """Probe every provider of the config whose health is due, and record what was found.

    A batch starts from the recorded health: a provider found overloaded gets a probe first
    instead of a full pace of calls. Each probe is one real image: it costs what one image
    costs and counts against the day's quota (the table artifact shows both).

    Args:
        config: the batch config YAML (empty for the embedded offline default).

    Returns:
        provider name -> its state.
    """
    logger = get_run_logger()
    loaded = load_config(config)
    secrets: dict[str, str] = {}
    if any(p.block for p in loaded.providers):
        loaded, secrets = await resolve_provider_blocks(loaded)
    results = [await probe_provider(p, loaded, secrets) for p in loaded.providers]
    for r in results:
        logger.info("%s: %s (%s)", r.provider, r.state, r.detail)
    await acreate_table_artifact(
        key="imagebatch-provider-health",
        table=[
            {
                "provider": r.provider,
                "state": r.state,
                "latency_s": r.latency_s,
                "cost_usd": r.cost_usd,
                "detail": r.detail[:200],
            }
            for r in results
        ],
        description="What each provider answered to one minimal request",
    )
    return {r.provider: r.state for r in results}
