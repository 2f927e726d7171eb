"""Shared pieces of the adapters' error translation: status codes, retry hints, Google details."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import requests

from imagebatch.errors import (
    AuthenticationFailed,
    DailyQuotaExhausted,
    InvalidRequest,
    ModelNotFound,
    ProviderConnectionError,
    ProviderError,
    ProviderNotConfigured,
    ProviderOverloaded,
    ProviderServerError,
    ProviderTimeout,
    RateLimited,
)

try:  # openai brings httpx2, a fork of httpx; google-genai can use it too
    import httpx2
except ImportError:  # pragma: no cover - httpx2 is a dependency of openai
    httpx2 = None

__all__ = [
    "error_for_status",
    "google_error",
    "parse_duration",
    "parse_retry_after",
    "require_key",
    "transport_error",
]

# requests is what google-auth (and so aiplatform's REST transport) sends with
_TIMEOUTS: tuple[type[BaseException], ...] = (
    httpx.TimeoutException,
    requests.exceptions.Timeout,
    asyncio.TimeoutError,
    TimeoutError,
)
_TRANSPORT: tuple[type[BaseException], ...] = (
    httpx.TransportError,
    requests.exceptions.ConnectionError,
    ConnectionError,
)
if httpx2 is not None:
    _TIMEOUTS += (httpx2.TimeoutException,)
    _TRANSPORT += (httpx2.TransportError,)

_DAILY = re.compile(r"per ?day|perday|_per_day|daily|\blimit: 0\b", re.IGNORECASE)


def require_key(env: Mapping[str, str], env_name: str | None, *, provider: str, model: str) -> str:
    """The API key from the environment variable the config names; never echoes its value."""
    if not env_name:
        raise ProviderNotConfigured(
            "no API key configured: set api_key_env (an environment variable name) or a block",
            provider=provider,
            model=model,
        )
    value = env.get(env_name, "").strip()
    if not value:
        raise ProviderNotConfigured(
            f"the environment variable {env_name} is not set or empty; export the API key there",
            provider=provider,
            model=model,
        )
    return value


def parse_duration(value: Any) -> float | None:
    """A protobuf Duration as JSON (``"37s"``, ``"0.370s"``) or a number, in seconds."""
    if isinstance(value, int | float):
        return max(0.0, float(value))
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)s\s*", value)
        if match:
            return float(match.group(1))
    return None


def parse_retry_after(headers: Mapping[str, str], *, now: datetime | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    ms = lowered.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = lowered.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def error_for_status(
    status: int,
    message: str,
    *,
    provider: str,
    model: str,
    retry_after: float | None = None,
    daily: bool = False,
) -> ProviderError:
    """The error class for an HTTP status, by what the caller does next."""
    kwargs: dict[str, Any] = {"provider": provider, "model": model, "http_status": status}
    if status == 429:
        if daily:
            return DailyQuotaExhausted(message, **kwargs)
        return RateLimited(message, retry_after=retry_after, **kwargs)
    if status == 402:
        return DailyQuotaExhausted(message, **kwargs)
    if status in (401, 403):
        return AuthenticationFailed(message, **kwargs)
    if status == 404:
        return ModelNotFound(message, **kwargs)
    if status == 503:
        return ProviderOverloaded(message, retry_after=retry_after, **kwargs)
    if status in (408, 500, 502, 504) or status >= 500:
        return ProviderServerError(message, retry_after=retry_after, **kwargs)
    return InvalidRequest(message, **kwargs)


def google_error(
    status: int, body: Any, fallback: str, *, provider: str, model: str
) -> ProviderError:
    """Translate a Google API error body (``{"error": {code, message, status, details}}``)."""
    error = body.get("error", body) if isinstance(body, dict) else {}
    if not isinstance(error, dict):
        error = {}
    message = str(error.get("message") or fallback or f"HTTP {status}").strip()
    retry_after: float | None = None
    daily = False
    for detail in error.get("details") or []:
        if not isinstance(detail, dict):
            continue
        kind = str(detail.get("@type", ""))
        if kind.endswith("google.rpc.RetryInfo"):
            retry_after = parse_duration(detail.get("retryDelay"))
        elif kind.endswith("google.rpc.QuotaFailure"):
            for violation in detail.get("violations") or []:
                text = " ".join(str(violation.get(k, "")) for k in ("quotaId", "quotaMetric"))
                if _DAILY.search(text) or str(violation.get("quotaValue")) == "0":
                    daily = True
        elif kind.endswith("google.rpc.ErrorInfo") and "API_KEY" in str(detail.get("reason", "")):
            status = 401  # Gemini answers a bad key with 400 INVALID_ARGUMENT
    if status == 429 and re.search(r"\blimit: 0\b", message):
        daily = True
    return error_for_status(
        status, message, provider=provider, model=model, retry_after=retry_after, daily=daily
    )


def transport_error(
    exc: BaseException, *, provider: str, model: str, timeout_s: float
) -> ProviderError | None:
    """Timeouts and connection failures of httpx/httpx2, or None for anything else."""
    if isinstance(exc, _TIMEOUTS):
        return ProviderTimeout(
            f"no answer within the configured timeout of {timeout_s:g}s",
            provider=provider,
            model=model,
        )
    if isinstance(exc, _TRANSPORT):
        return ProviderConnectionError(
            f"could not reach the provider: {type(exc).__name__}", provider=provider, model=model
        )
    return None
