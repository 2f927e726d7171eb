"""Administration of the shared limits: ``imagebatch limits sync`` and the check before a night.

``sync_limits`` creates (or updates) each provider's ``-in-flight`` and ``-rpm`` global
concurrency limits from the config (:func:`imagebatch.resilience.shared_limit_specs`);
``check_limits`` fails a batch before its first request when they are missing or out of date,
naming the command that fixes it.
"""

from __future__ import annotations

import time

from prefect import get_client
from prefect.client.schemas.actions import VariableUpdate
from prefect.exceptions import ObjectNotFound

from imagebatch.config import BatchConfig
from imagebatch.errors import ConfigError
from imagebatch.prefect.news import news_name, utc
from imagebatch.prefect.shared_limits import PrefectSharedLimits
from imagebatch.resilience import LimitSpec, shared_limit_specs

__all__ = ["check_limits", "sync_limits"]


async def sync_limits(
    config: BatchConfig, time_scale: float = 1.0, *, create_only: bool = False
) -> list[tuple[LimitSpec, str]]:
    """Create or update the shared limits of ``config``; what was done to each.

    ``create_only``: create the missing limits and leave those that exist as they are (a
    split night's parent: a ceiling the workers learned stays; a limit that no longer matches
    the config is reported by each shard's check, which says to run ``imagebatch limits
    sync``)."""
    done = []
    async with get_client() as client:
        for spec in shared_limit_specs(config, time_scale):
            try:
                current = await client.read_global_concurrency_limit_by_name(spec.name)
            except ObjectNotFound:
                current = None
            if create_only and current is not None:
                done.append((spec, "kept"))
                continue
            same = current is not None and (
                current.limit == spec.limit
                and current.slot_decay_per_second == (spec.slot_decay_per_second or 0.0)
                and current.active
            )
            if not same:
                await client.upsert_global_concurrency_limit_by_name(
                    # 0.0, not None: a per-minute limit synced by an earlier version decayed
                    spec.name,
                    spec.limit,
                    spec.slot_decay_per_second or 0.0,
                )
            what = "unchanged" if same else "updated" if current else "created"
            if spec.kind == "window" and await _forget_ceiling(client, spec):
                what = "reset"  # the workers had learned a lower quota: the config's is back
            done.append((spec, what))
    return done


async def _forget_ceiling(client, spec: LimitSpec) -> bool:
    """Clear a per-minute ceiling the workers learned (the news variable says so)."""
    name = news_name(spec.name.removesuffix("-rpm"))
    variable = await client.read_variable_by_name(name)
    value = variable.value if variable is not None else None
    if not isinstance(value, dict) or value.get("ceiling") is None:
        return False
    now = time.time()
    cleared = {**value, "ceiling": None, "ceiling_at": now, "ceiling_at_utc": utc(now)}
    await client.update_variable(VariableUpdate(name=name, value=cleared))
    return True


async def check_limits(
    config: BatchConfig, time_scale: float = 1.0, source: str = "config"
) -> PrefectSharedLimits:
    """Fail before any request if the config's shared limits are missing or out of date.

    Returns:
        The shared limits to hold around each call.
    """
    specs = shared_limit_specs(config, time_scale)
    fix = "run `imagebatch limits sync" + (f" --config {source}`" if source else "`")
    shared = PrefectSharedLimits(specs, time_scale=time_scale)
    await shared.read_news()
    async with get_client() as client:
        for spec in specs:
            try:
                current = await client.read_global_concurrency_limit_by_name(spec.name)
            except ObjectNotFound:
                raise ConfigError(
                    f"shared_limits is on, but the Prefect server has no global concurrency "
                    f"limit {spec.name!r}: {fix} against this server first",
                    source=source,
                    key="shared_limits",
                ) from None
            # a per-minute window the workers lowered to a quota they learned is in order
            learned = spec.kind == "window" and current.limit == shared.learned_ceiling(
                spec.provider
            )
            if not learned and (
                current.limit != spec.limit
                or current.slot_decay_per_second != (spec.slot_decay_per_second or 0.0)
            ):
                raise ConfigError(
                    f"the global concurrency limit {spec.name!r} (limit {current.limit}, decay "
                    f"{current.slot_decay_per_second}/s) does not match the config (limit "
                    f"{spec.limit}, decay {spec.slot_decay_per_second or 0.0}/s): {fix}",
                    source=source,
                    key="shared_limits",
                )
    return shared
