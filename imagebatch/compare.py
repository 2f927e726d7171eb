"""A/B comparison of providers: the same prompts through each, a contact sheet and a table."""

from __future__ import annotations

import io
import statistics
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

from imagebatch.models import Attempt
from imagebatch.sheet import draw_reason, font, paste_thumbnail

__all__ = ["CELL_PX", "HEADER_PX", "LABEL_PX", "Outcome", "compare_table", "contact_sheet"]

CELL_PX = 256  # each image fits in a square this size
LABEL_PX = 200  # the prompt ids on the left
HEADER_PX = 40  # the provider names on top


@dataclass
class Outcome:
    """One prompt on one provider."""

    prompt_id: str
    provider: str
    image: bytes | None = None  # the original image, when it succeeded
    error: str | None = None
    attempts: list[Attempt] = field(default_factory=list)
    cost_usd: float = 0.0


def contact_sheet(prompt_ids: list[str], providers: list[str], outcomes: list[Outcome]) -> bytes:
    """A PNG grid: one row per prompt, one column per provider; failures say why."""
    by_cell = {(o.prompt_id, o.provider): o for o in outcomes}
    width = LABEL_PX + CELL_PX * len(providers)
    height = HEADER_PX + CELL_PX * len(prompt_ids)
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    for c, provider in enumerate(providers):
        draw.text((LABEL_PX + c * CELL_PX + 8, 12), provider[:28], fill="black", font=font())
    for r, prompt_id in enumerate(prompt_ids):
        top = HEADER_PX + r * CELL_PX
        draw.text((8, top + CELL_PX // 2 - 7), prompt_id[:24], fill="black", font=font())
        for c, provider in enumerate(providers):
            left = LABEL_PX + c * CELL_PX
            box = (left + 4, top + 4, left + CELL_PX - 4, top + CELL_PX - 4)
            outcome = by_cell.get((prompt_id, provider))
            if outcome is not None and outcome.image is not None:
                paste_thumbnail(sheet, outcome.image, box)
            else:
                draw_reason(draw, box, (outcome.error if outcome else None) or "not run")
    out = io.BytesIO()
    sheet.save(out, format="PNG")
    return out.getvalue()


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 3)
    return round(statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1], 3)


def compare_table(providers: list[str], outcomes: list[Outcome]) -> list[dict]:
    """Per provider: success rate, p50/p95 latency of successful calls, retries, cost per image."""
    rows = []
    for provider in providers:
        mine = [o for o in outcomes if o.provider == provider]
        ok = [o for o in mine if o.image is not None]
        latencies = [a.latency_s for o in ok for a in o.attempts if a.outcome == "ok"]
        spent = sum(o.cost_usd for o in mine)
        rows.append(
            {
                "provider": provider,
                "prompts": len(mine),
                "succeeded": len(ok),
                "success_rate": round(len(ok) / len(mine), 3) if mine else None,
                "p50_latency_s": _percentile(latencies, 50),
                "p95_latency_s": _percentile(latencies, 95),
                "retries": sum(max(0, len(o.attempts) - 1) for o in mine),
                "cost_usd": round(spent, 4),
                "cost_per_image_usd": round(spent / len(ok), 4) if ok else None,
            }
        )
    return rows
