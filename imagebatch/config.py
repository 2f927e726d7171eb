"""The batch configuration: one YAML file, validated by pydantic, unknown keys rejected.

Errors name the file, the line and the key path (``providers[0].limits.rpm``). Secrets never live
in this file: providers name an environment variable (``api_key_env``) or a Prefect block.
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from imagebatch.errors import ConfigError
from imagebatch.models import SAFE_ID_PATTERN

__all__ = [
    "PROVIDER_KINDS",
    "BatchConfig",
    "FinishBy",
    "Limits",
    "ProviderConfig",
    "RenditionConfig",
    "RetryConfig",
    "RoutingConfig",
    "default_config",
    "finish_by_time",
    "load_config",
    "model_group",
    "parse_config",
]

#: a call's typical latency when the config does not say (FIELD-NOTES: 30-100 s for image models)
DEFAULT_LATENCY_S = 60.0
_MODEL_PREFIXES = re.compile(r"^(projects/[^/]+/locations/[^/]+/)?(publishers/[^/]+/)?models/")

PROVIDER_KINDS = ("gemini", "vertex-gemini", "openai", "stability", "vertex-endpoint", "local")
FINISH_BY_PATTERN = r"^\s*(([01]\d|2[0-3]):[0-5]\d(\s+\S+)?|\d{4}-\d\d-\d\d[T ].+)\s*$"


def _finish_by_parses(value: str) -> str:
    finish_by_time(value, datetime.now().astimezone())  # raises ValueError with what to write
    return value


#: a ``finish_by`` value, checked as the time it names (the config and the run form alike)
FinishBy = Annotated[
    str, StringConstraints(pattern=FINISH_BY_PATTERN), AfterValidator(_finish_by_parses)
]
_SECRET_KEYS = {"api_key", "apikey", "key", "token", "secret", "password", "credentials"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Limits(_Strict):
    """A provider's quota as the provider publishes it; the gate paces every request to it."""

    rpm: float | None = Field(default=None, gt=0, description="Requests per minute")
    rpd: int | None = Field(default=None, ge=0, description="Requests per day")
    ipm: float | None = Field(default=None, gt=0, description="Images per minute")
    max_in_flight: int = Field(
        default=4,
        ge=1,
        le=1000,
        description="Calls at once at most, counting those waiting for their turn; default: "
        "twice the rate x latency (Little's law), so the quota is used when calls are slow",
    )
    latency_s: float | None = Field(
        default=None,
        gt=0,
        le=3600,
        description="A call's typical latency, for `imagebatch plan` (default 60 s; local 1 s)",
    )
    rpd_reset: str = Field(
        default="00:00",
        pattern=r"^([01]\d|2[0-3]):[0-5]\d$",
        description="When the day's quota resets",
    )
    rpd_timezone: str = Field(
        default="America/Los_Angeles", description="Timezone of rpd_reset (Gemini: Pacific)"
    )

    @model_validator(mode="before")
    @classmethod
    def _in_flight_for_the_rate(cls, data: Any) -> Any:
        """Without ``max_in_flight``: enough calls at once to keep the rate busy while each takes
        its latency, twice over (some wait for their turn, latencies spread), and at least 4."""
        if isinstance(data, dict) and data.get("max_in_flight") is None:
            rates = [r for r in (data.get("rpm"), data.get("ipm")) if isinstance(r, int | float)]
            latency = data.get("latency_s")
            latency = latency if isinstance(latency, int | float) else DEFAULT_LATENCY_S
            if rates and min(rates) > 0 and latency > 0:
                wanted = math.ceil(min(rates) * latency / 60.0 * 2)
                data = {**data, "max_in_flight": max(4, min(1000, wanted))}
            else:
                data = {k: v for k, v in data.items() if k != "max_in_flight"}
        return data

    @field_validator("rpd_timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown timezone {value!r}; use an IANA name such as UTC") from None
        return value


class ProviderConfig(_Strict):
    """One entry of the provider chain."""

    name: str = Field(pattern=SAFE_ID_PATTERN)
    kind: Literal["gemini", "vertex-gemini", "openai", "stability", "vertex-endpoint", "local"] = (
        None  # type: ignore[assignment]  # required unless ``block`` supplies it
    )
    model: str = Field(default=None, min_length=1)  # type: ignore[assignment]
    base_url: str | None = None
    api_key_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    block: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9-]+/[A-Za-z0-9._-]+$",
        description="A saved Prefect block, '<block-type-slug>/<name>', that fills this entry",
    )
    limits: Limits = Limits()
    price_usd: dict[Literal["1K", "2K", "4K"], float] = Field(default_factory=dict)
    timeout_s: float = Field(default=120.0, gt=0, le=3600)
    health_probe_s: float | None = Field(
        default=300.0,
        ge=60,
        description="provider-health probes it at most this often with one real (paid) "
        "request; null: never",
    )
    options: dict[str, Any] = Field(default_factory=dict)
    group: str | None = Field(
        default=None,
        min_length=1,
        max_length=100,
        description="Providers with the same group (default: the same model id) are "
        "interchangeable: they share a night's prompts, each at its own pace",
    )

    @model_validator(mode="after")
    def _kind_and_model_or_block(self) -> ProviderConfig:
        if self.block is None:
            missing = [f for f in ("kind", "model") if getattr(self, f) is None]
            if missing:
                raise ValueError(f"'{missing[0]}' is required unless 'block' names a saved block")
        return self

    def share_group(self) -> str:
        """Which providers this one shares prompts with: its ``group``, else its model id
        without the platform's prefix (``models/``, ``publishers/google/models/``)."""
        return self.group or model_group(self.model or "")

    def price_for(self, size: str) -> float:
        """Price of one image at ``size``; the nearest configured size if that one is missing."""
        if size in self.price_usd:
            return self.price_usd[size]
        return max(self.price_usd.values(), default=0.0)


class RoutingConfig(_Strict):
    """How work moves between providers."""

    strategy: Literal["priority", "cheapest"] = "priority"
    failover_after: int = Field(default=3, ge=1, description="Consecutive 503s that open a circuit")
    probe_interval_s: float = Field(
        default=300.0, gt=0, description="Open circuit: probe this often"
    )
    move_prompt_after: int = Field(
        default=2, ge=1, description="A prompt's failures in a row on one provider before another"
    )
    patience_s: float = Field(
        default=60.0, ge=0, description="Skip a provider paused by a hint longer than this"
    )
    spill_over_s: float | None = Field(
        default=None,
        ge=0,
        description="Send a prompt to the next provider while the preferred one's queue (its "
        "pace, a hint) would hold it longer than this, so every provider's quota works at once; "
        "null: the next provider only takes over when one fails",
    )
    margin: float = Field(default=0.05, ge=0, lt=0.5, description="Stay this far under each RPM")
    share_same_model: bool = Field(
        default=True,
        description="Providers of the same model (or the same `group`) share the night's "
        "prompts: each prompt goes to the one that can start it first; false: strictly in "
        "chain order, the next one only when one fails",
    )
    refused_content_failover: bool = Field(
        default=False, description="Try other providers for a prompt one provider refused"
    )


class RetryConfig(_Strict):
    """Retries of one prompt (Prefect task retries), bounded also by deadline and budgets."""

    max_attempts: int = Field(default=10, ge=1, le=51)
    base_delay_s: float = Field(default=1.0, ge=0)
    max_delay_s: float = Field(default=60.0, ge=0)
    jitter: float = Field(default=0.5, ge=0, le=1)
    budget_ratio: float = Field(
        default=0.1, gt=0, le=1, description="Retries a provider earns per success"
    )

    def delays(self, time_scale: float = 1.0) -> list[float]:
        """The waits before each retry: exponential, capped, divided by ``time_scale``."""
        return [
            min(self.max_delay_s, self.base_delay_s * 2**i) / time_scale
            for i in range(self.max_attempts - 1)
        ]


class RenditionConfig(_Strict):
    """One derived image: format, longest side and quality."""

    name: str = Field(pattern=SAFE_ID_PATTERN)
    format: Literal["png", "jpeg", "webp"]
    max_px: int | None = Field(default=None, ge=16, le=16384)
    quality: int = Field(default=85, ge=1, le=100)


class PublishConfig(_Strict):
    """How published objects are stored and reused."""

    cache_control: str = Field(
        default="public, max-age=86400",
        max_length=200,
        description="Cache-Control of published images (records and indexes get no-cache)",
    )
    reuse: Literal["seeded", "always", "never"] = Field(
        default="seeded",
        description="Reuse an image an earlier batch published for the same prompt, parameters, "
        "seed, model and renditions instead of paying again: for prompts with an explicit seed "
        "(seeded), for every prompt (always), or never",
    )
    latest_index: bool = Field(
        default=True, description="Keep latest.json: prompt id -> its newest published images"
    )
    contact_sheet: int = Field(
        default=24,
        ge=0,
        le=500,
        description="Publish contact-sheet.png beside the manifest: thumbnails of the first this "
        "many prompts and a labelled cell for every prompt that did not succeed (0: no sheet)",
    )
    signed_url_expiry_s: int | None = Field(
        default=None,
        ge=60,
        le=7 * 24 * 3600,
        description="Link the report's manifest and images with V4 signed URLs that expire after "
        "this many seconds (gs:// output and a service-account key needed; the default, null, "
        "links Cloud Console pages, which need a Google login with access to the bucket)",
    )


class BatchConfig(_Strict):
    """Everything a batch needs besides its prompts and secrets."""

    providers: list[ProviderConfig] = Field(min_length=1)
    routing: RoutingConfig = RoutingConfig()
    retry: RetryConfig = RetryConfig()
    budget_usd: float | None = Field(default=None, ge=0)
    deadline_s: float | None = Field(
        default=None, gt=0, description="Stop sending new work this long after the batch starts"
    )
    finish_by: FinishBy | None = Field(
        default=None,
        description="Finish by this time: 'HH:MM' (the next one after the start, local time), "
        "'HH:MM Area/City', or an ISO date-time; prompts go down the chain as soon as the "
        "preferred providers alone would miss it",
    )
    renditions: list[RenditionConfig] = Field(min_length=1)
    output: str = "./output"
    publish: PublishConfig = PublishConfig()
    max_in_flight: int | None = Field(
        default=None,
        ge=1,
        le=1000,
        description="Prompts worked on at once; default: the providers' in-flight caps added up "
        "(at least 8)",
    )
    shared_limits: bool = Field(
        default=False,
        description="Share each provider's rate, in-flight cap and daily allowance with every "
        "worker process on the same Prefect server (run `imagebatch limits sync` first)",
    )
    failure_threshold: float = Field(
        default=0.1, ge=0, le=1, description="Share of failed+skipped prompts still 'partial'"
    )
    blocked_threshold: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="A run whose share of blocked prompts is above this ends Failed (a "
        "provider's silent filter is not a normal night)",
    )

    def prompts_in_flight(self) -> int:
        """``max_in_flight``, or enough prompts to fill every provider's in-flight cap."""
        if self.max_in_flight is not None:
            return self.max_in_flight
        return max(8, min(1000, sum(p.limits.max_in_flight for p in self.providers)))

    def require_resolved(self, command: str) -> None:
        """Raise when an entry still names a saved block that was not read into it."""
        for index, entry in enumerate(self.providers):
            if entry.kind is None or entry.model is None:
                raise ConfigError(
                    f"'{entry.block}' is a saved block that was not read: {command} needs the "
                    "entry filled from the block (blocks.providers.resolve_provider_blocks)",
                    source="config",
                    key=f"providers[{index}].block",
                )

    @model_validator(mode="after")
    def _unique_names(self) -> BatchConfig:
        for what, items in (("providers", self.providers), ("renditions", self.renditions)):
            names = [i.name for i in items]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"{what}: duplicate name '{dupes[0]}'")
        return self


def model_group(model: str) -> str:
    """A model id without its platform's prefix: ``models/gemini-3-pro-image-preview`` and
    ``publishers/google/models/gemini-3-pro-image-preview`` are the same model."""
    return _MODEL_PREFIXES.sub("", model.strip())


def finish_by_time(value: str, start: datetime) -> datetime:
    """When ``value`` (``HH:MM``, ``HH:MM Area/City`` or ISO) falls: the first such time after
    ``start`` (an aware datetime); ``HH:MM`` alone is in ``start``'s zone."""
    clock = re.fullmatch(r"([01]\d|2[0-3]):([0-5]\d)(?:\s+(\S+))?", value.strip())
    if clock is None:
        try:
            moment = datetime.fromisoformat(value.strip())
        except ValueError:
            raise ValueError(
                f"finish_by {value!r}: use 'HH:MM', 'HH:MM Area/City' or an ISO date-time"
            ) from None
        return moment if moment.tzinfo else moment.replace(tzinfo=start.tzinfo)
    hour, minute, zone = int(clock[1]), int(clock[2]), clock[3]
    try:
        tz = ZoneInfo(zone) if zone else start.tzinfo
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"finish_by {value!r}: unknown timezone {zone!r}; use an IANA name such as "
            "Europe/Berlin"
        ) from None
    local = start.astimezone(tz)
    moment = local.replace(hour=hour, minute=minute, second=0, microsecond=0)
    if moment <= local:
        moment += timedelta(days=1)  # the same wall-clock time tomorrow, across DST too
    return moment


def default_config() -> BatchConfig:
    """The embedded default: the offline ``local`` provider, images under ``./output``."""
    text = resources.files("imagebatch").joinpath("defaults/config.yaml").read_text("utf-8")
    return parse_config(text, source="<embedded default config>")


def load_config(path: str | Path | None) -> BatchConfig:
    """Load a config file, or the embedded default when ``path`` is None."""
    if path is None:
        return default_config()
    source = str(path)
    p = Path(path)
    if not p.is_file():
        raise ConfigError("the config file does not exist", source=source)
    try:
        text = p.read_text("utf-8")
    except UnicodeDecodeError:
        raise ConfigError("not UTF-8 text; save the file as UTF-8", source=source) from None
    return parse_config(text, source=source)


def parse_config(text: str, *, source: str) -> BatchConfig:
    """Validate config text; errors name ``source``, the line and the key."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(
            f"malformed YAML: {problem}",
            source=source,
            line=mark.line + 1 if mark is not None else None,
        ) from None
    if not isinstance(data, dict):
        raise ConfigError("the config must be a YAML mapping (key: value)", source=source, line=1)
    try:
        return BatchConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(err["loc"])
        key = _key_path(loc)
        message = err["msg"]
        if err["type"] == "value_error":
            message = str(err.get("ctx", {}).get("error", message))
        if err["type"] == "extra_forbidden":
            last = str(loc[-1]).lower()
            message = f"unknown key '{loc[-1]}'"
            if last in _SECRET_KEYS or last.endswith(("_key", "_token", "_secret")):
                message += (
                    "; secrets never go in the config file: name an environment variable "
                    "with api_key_env, or a Prefect block with block"
                )
        raise ConfigError(message, source=source, line=_line_of(root, loc), key=key) from None


def _key_path(loc: tuple[Any, ...]) -> str | None:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or None


def _line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """The line of the deepest YAML node along ``loc`` (the key itself where it exists)."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == str(part)), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(node.value):
                break
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line
