"""Fault profiles: what each logical provider of the emulator does, in simulated seconds.

Every duration here (latency, windows, hints, hangs, quota windows) is divided by the profile's
``time_scale`` before it is applied, so a 60 s call and a 5-minute probe can take 0.6 s and 3 s.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from imagebatch.errors import ConfigError

__all__ = [
    "FAULTS",
    "EmulatorProfile",
    "Fault",
    "ProviderProfile",
    "ScriptedFault",
    "Window",
    "load_profile",
    "named_profiles",
]

Fault = Literal[
    "ok",
    "rate_limited",  # 429 over the per-minute quota, with a retry hint
    "rate_limited_no_hint",  # 429 below quota, no hint (the "hidden shared limit")
    "daily_quota",  # 429 naming a per-day quota (or limit 0)
    "overloaded",  # 503 "The model is overloaded"
    "server_error",  # 500, not JSON
    "bad_gateway",  # 502
    "hang",  # no answer until long past any sane client timeout
    "safety",  # content refused (style per profile)
    "empty",  # a success answer without an image
    "corrupt",  # image bytes that are not an image
    "truncated",  # a real image cut off half-way
    "bomb",  # a tiny PNG that claims to be 30000x30000 (a decompression bomb)
    "blank",  # an all-black image instead of an error (a silent safety filter)
    "wrong_aspect",  # a good image in the wrong shape (square when 16:9 was asked, and so on)
    "invalid_base64",  # an image field that is not base64 (JSON wire formats)
    "auth",  # 401/403 (or Gemini's 400 API_KEY_INVALID)
    "not_found",  # 404 model not found or retired
    "bad_request",  # 400 invalid argument
]
FAULTS: tuple[str, ...] = Fault.__args__  # type: ignore[attr-defined]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Window(_Strict):
    """A span of simulated time since the emulator started (or was reset)."""

    start_s: float = Field(ge=0)
    duration_s: float = Field(gt=0)
    rate: float = Field(default=1.0, ge=0, le=1, description="share of calls that get the fault")
    extra_latency_s: float = Field(default=0.0, ge=0)
    ramp_s: float = Field(default=0.0, ge=0, description="latency climbs over this long before")

    def contains(self, t: float) -> bool:
        return self.start_s <= t < self.start_s + self.duration_s


class ScriptedFault(_Strict):
    """Requests ``first``..``last`` (1-based, counted per logical provider) get ``fault``."""

    first: int = Field(ge=1)
    last: int | None = Field(default=None, ge=1)
    fault: Fault

    def covers(self, n: int) -> bool:
        return self.first <= n <= (self.last if self.last is not None else self.first)


class ProviderProfile(_Strict):
    """Behaviour of one logical provider, reachable in every wire format."""

    rpm: float | None = Field(default=None, gt=0, description="sliding 60 s window")
    rpd: int | None = Field(default=None, ge=0, description="sliding 24 h window; 0 = limit 0")
    latency_median_s: float = Field(default=0.0, ge=0)
    latency_p99_s: float | None = Field(default=None, ge=0)
    overload_rate: float = Field(default=0.0, ge=0, le=1)
    overload_windows: list[Window] = Field(default_factory=list)
    outage_windows: list[Window] = Field(default_factory=list)
    outage: bool = False
    rate_429: float = Field(default=0.0, ge=0, le=1, description="429s below quota")
    rate_500: float = Field(default=0.0, ge=0, le=1)
    rate_hang: float = Field(default=0.0, ge=0, le=1)
    hang_s: float = Field(default=600.0, gt=0)
    rate_empty: float = Field(default=0.0, ge=0, le=1)
    rate_corrupt: float = Field(default=0.0, ge=0, le=1)
    hint_s: float | None = Field(default=None, ge=0, description="retry hint on random 429s")
    safety_keywords: list[str] = Field(default_factory=list)
    safety_style: Literal["prompt_feedback", "image_safety", "prohibited_content", "no_image"] = (
        "image_safety"
    )
    thought_images: int = Field(default=0, ge=0, le=4, description="interim Gemini images")
    daily_quota_exhausted: bool = False
    auth_failure: bool = False
    api_key: str | None = Field(default=None, description="if set, requests must carry it")
    missing_models: list[str] = Field(default_factory=list)
    script: list[ScriptedFault] = Field(default_factory=list)
    image_px: int = Field(default=256, ge=8, le=4096, description="long side of returned images")


class EmulatorProfile(_Strict):
    """The whole emulator: logical providers by name (the first is the unprefixed default)."""

    seed: int = 0
    time_scale: float = Field(default=1.0, gt=0)
    providers: dict[str, ProviderProfile] = Field(
        default_factory=lambda: {"primary": ProviderProfile(), "backup": ProviderProfile()}
    )


def named_profiles() -> list[str]:
    """The profiles that ship with imagebatch (``healthy``, ``flaky``, ...)."""
    folder = resources.files("imagebatch.emulator").joinpath("profiles")
    return sorted(
        p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml")
    )


def load_profile(name_or_path: str | Path) -> EmulatorProfile:
    """A shipped profile by name, or a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        source = str(path)
        if not path.is_file():
            raise ConfigError("the emulator profile file does not exist", source=source)
        text = path.read_text("utf-8")
    elif str(name_or_path) in named_profiles():
        source = f"<profile {name_or_path}>"
        folder = resources.files("imagebatch.emulator").joinpath("profiles")
        text = folder.joinpath(f"{name_or_path}.yaml").read_text("utf-8")
    else:
        raise ConfigError(
            f"no such profile; shipped: {', '.join(named_profiles())}, or a YAML file",
            source=str(name_or_path),
        )
    try:
        return EmulatorProfile.model_validate(yaml.safe_load(text) or {})
    except (yaml.YAMLError, ValidationError) as exc:
        raise ConfigError(f"invalid emulator profile: {exc}", source=source) from None
