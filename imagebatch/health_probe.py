"""One minimal real request per provider, to record its health before the next batch needs it.

The probe asks the batch's own model for one small image through the provider's adapter (so the
same SDK, keys and error classification as a batch), and records what it found where the
router starts each batch from: healthy, overloaded, quota exhausted, auth failing, model missing.
It counts against the provider's daily allowance and costs one image.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from imagebatch.config import ProviderConfig
from imagebatch.errors import (
    AuthenticationFailed,
    DailyQuotaExhausted,
    ImageBatchError,
    ModelNotFound,
    ProviderNotConfigured,
    RateLimited,
    RetryableError,
)
from imagebatch.imaging import inspect_image
from imagebatch.models import Prompt
from imagebatch.providers import build_provider
from imagebatch.resilience import DailyAllowance, HealthStore, ProviderHealth, UsageStore, usage_key

__all__ = ["PROBE_PROMPT", "ProbeResult", "probe_provider"]

PROBE_PROMPT = Prompt(
    id="imagebatch-health-probe", prompt="A plain white ceramic mug on a grey table", seed=1
)


@dataclass(frozen=True)
class ProbeResult:
    provider: str
    state: str  # a HealthState, or "skipped"
    detail: str
    latency_s: float = 0.0
    cost_usd: float = 0.0


def _due(provider: ProviderConfig, store: HealthStore, now: datetime) -> str | None:
    """Why not to probe now, or None if a probe is due."""
    if provider.health_probe_s is None:
        return "health probes are off for it (health_probe_s: null)"
    last = store.read(usage_key(provider))
    if last is not None and last.age_s(now) < provider.health_probe_s:
        return f"its health was recorded {last.age_s(now):.0f} s ago ({last.state})"
    return None


async def probe_provider(
    provider: ProviderConfig,
    env: Mapping[str, str],
    *,
    health: HealthStore,
    usage: UsageStore,
    now: datetime | None = None,
) -> ProbeResult:
    """Probe ``provider`` if it is due, record its health, and say what was found."""
    now = now or datetime.now(UTC)
    why_not = _due(provider, health, now)
    if why_not:
        return ProbeResult(provider.name, "skipped", why_not)
    allowance = DailyAllowance(
        usage_key(provider),
        provider.limits.rpd,
        store=usage,
        reset=provider.limits.rpd_reset,
        timezone=provider.limits.rpd_timezone,
    )
    if not allowance.try_consume():
        result = ProbeResult(provider.name, "quota_exhausted", "the day's requests are used up")
        health.write(usage_key(provider), ProviderHealth.now("quota_exhausted", now))
        return result

    started = time.monotonic()
    cost = 0.0
    try:
        adapter = build_provider(provider, env)
    except ProviderNotConfigured as exc:
        state, detail = "auth_failing", str(exc)
    else:
        try:
            raw = await adapter.generate(PROBE_PROMPT)
            inspect_image(raw.data, raw.requested_aspect or PROBE_PROMPT.aspect_ratio)
            state, detail, cost = "healthy", "one image generated", adapter.price(PROBE_PROMPT)
        except DailyQuotaExhausted as exc:
            allowance.exhaust()
            state, detail = "quota_exhausted", str(exc)
        except AuthenticationFailed as exc:
            state, detail = "auth_failing", str(exc)
        except ModelNotFound as exc:
            state, detail = "model_missing", str(exc)
        except RateLimited as exc:  # up, but at its per-minute limit: not a reason to avoid it
            state, detail = "healthy", f"up, at its rate limit: {exc}"
        except RetryableError as exc:
            state, detail = "overloaded", str(exc)
        except ImageBatchError as exc:  # it answered (a refusal, a bad request): it is up
            state, detail = "healthy", f"up: {exc}"
        finally:
            await adapter.aclose()
    latency = round(time.monotonic() - started, 3)
    reason = None if detail == "one image generated" else detail
    last = health.read(usage_key(provider))
    kept = {}  # a probe learns nothing about the ceiling: keep what a batch learned
    if last is not None and last.ceiling_rpm is not None:
        kept = {"ceiling_rpm": last.ceiling_rpm, "ceiling_at": last.ceiling_at or last.at}
    health.write(usage_key(provider), ProviderHealth.now(state, now, reason=reason, **kept))
    return ProbeResult(provider.name, state, detail, latency, cost)
