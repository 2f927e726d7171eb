"""The data that moves through a batch: prompts, generated images, attempts and records."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "ASPECT_RATIOS",
    "MAX_PROMPT_CHARS",
    "SAFE_ID_PATTERN",
    "SIZES",
    "Attempt",
    "GeneratedImage",
    "Prompt",
    "PromptRecord",
    "PromptStatus",
    "StoredObject",
    "aspect_dimensions",
    "aspect_value",
]

#: ids become object names, so they are restricted to a path-safe alphabet
SAFE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
MAX_PROMPT_CHARS = 8000
ASPECT_RATIOS = ("1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9")
SIZES = ("1K", "2K", "4K")
_SIZE_PX = {"1K": 1024, "2K": 2048, "4K": 4096}

AspectRatio = Literal["1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9"]
Size = Literal["1K", "2K", "4K"]
PromptStatus = Literal["succeeded", "blocked", "failed", "skipped"]


def aspect_value(spec: str) -> float | None:
    """Width over height of ``W:H`` or ``WxH`` (None if it is neither)."""
    for sep in (":", "x"):
        if sep in spec:
            try:
                w, h = (float(v) for v in spec.split(sep, 1))
            except ValueError:
                return None
            return w / h if w > 0 and h > 0 else None
    return None


def aspect_dimensions(aspect_ratio: str, long_side: int) -> tuple[int, int]:
    """Width and height for an aspect ratio such as ``16:9`` with the given long side."""
    w, h = (int(x) for x in aspect_ratio.split(":"))
    if w >= h:
        return long_side, max(1, round(long_side * h / w))
    return max(1, round(long_side * w / h)), long_side


class Prompt(BaseModel):
    """One line of a prompt file: what to generate and how."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(
        pattern=SAFE_ID_PATTERN, description="Stable id; derived from content if absent"
    )
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    aspect_ratio: AspectRatio = "1:1"
    size: Size = "1K"
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    negative_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    provider: str | None = Field(default=None, description="Preferred provider name in the chain")
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the prompt is empty")
        return value

    @property
    def long_side_px(self) -> int:
        return _SIZE_PX[self.size]

    @staticmethod
    def content_id(fields: dict[str, Any]) -> str:
        """A stable id from a prompt's content: the same content always gets the same id."""
        content = {k: v for k, v in fields.items() if k not in ("id", "metadata") and v is not None}
        digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
        return f"p-{digest[:16]}"


class GeneratedImage(BaseModel):
    """Image bytes as a provider returned them, after they decoded as an image."""

    model_config = ConfigDict(frozen=True)

    data: bytes = Field(repr=False)
    mime_type: str
    width: int
    height: int
    provider: str
    model: str
    cost_usd: float = 0.0


class Attempt(BaseModel):
    """One call to one provider for one prompt."""

    provider: str
    outcome: str  # "ok" or the error class name
    http_status: int | None = None
    latency_s: float = 0.0
    waited_s: float = 0.0
    error: str | None = None


class StoredObject(BaseModel):
    """One published rendition."""

    rendition: str
    uri: str
    sha256: str
    width: int
    height: int
    bytes: int
    content_type: str


class PromptRecord(BaseModel):
    """What became of one prompt; the line it contributes to ``manifest.jsonl``."""

    id: str
    status: PromptStatus
    provider: str | None = None
    model: str | None = None
    attempts: list[Attempt] = Field(default_factory=list)
    cost_usd: float = 0.0
    objects: list[StoredObject] = Field(default_factory=list)
    error: str | None = None
    error_kind: str | None = Field(
        default=None,
        description="What ended the prompt, for the night's outcome (see imagebatch.errors)",
    )
    resumed: bool = False
    reused_from: str | None = Field(
        default=None, description="The success record whose images this prompt reused"
    )
    batch_id: str
    finished_at: datetime
