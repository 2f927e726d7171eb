"""Process knobs, from the environment (``IMAGEBATCH_`` prefix); not per batch."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IMAGEBATCH_", extra="ignore")

    state_dir: Path = Field(
        default=Path("~/.imagebatch/state"),
        description="Where state that outlives a run lives (daily usage per provider)",
    )
    time_scale: float = Field(
        default=1.0,
        gt=0,
        description="Divide every time constant (pacing windows, backoff, probes) by this; "
        "for the emulator's simulated nights only",
    )
