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
    storage_retry_initial_s: float = Field(
        default=1.0, gt=0, description="First wait before retrying a failed storage call"
    )
    storage_retry_max_s: float = Field(
        default=32.0, gt=0, description="Longest wait between storage retries"
    )
    storage_retry_deadline_s: float = Field(
        default=300.0, gt=0, description="Give up on one storage call after this long"
    )
    lock_ttl_s: float = Field(
        default=120.0,
        gt=0,
        description="A batch lease on GCS not refreshed for this long belongs to a dead run",
    )
