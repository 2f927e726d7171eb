"""Check the providers' shared limits before a night's first request."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from imagebatch.config import BatchConfig
from imagebatch.prefect.limit_admin import check_limits
from imagebatch.prefect.shared_limits import PrefectSharedLimits

__all__ = ["check_shared_limits"]


@task(name="check_shared_limits", cache_policy=NO_CACHE, persist_result=False)
async def check_shared_limits(
    config: BatchConfig, time_scale: float = 1.0, source: str = "config"
) -> PrefectSharedLimits:
    """Fail before any request if the config's shared limits are missing or out of date.

    Returns:
        The shared limits to hold around each call (see
        :mod:`imagebatch.prefect.shared_limits`).
    """
    return await check_limits(config, time_scale, source)
