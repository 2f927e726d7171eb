"""The offline ``local`` provider: a deterministic picture drawn from the prompt with Pillow.

It is a stand-in, not a generative model: it lets a new machine run the whole pipeline with no
account and no key, and it is labelled as such inside every image it draws. The same prompt,
parameters and seed always give the same bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import random
import textwrap
from typing import ClassVar

from PIL import Image, ImageDraw, ImageFont

from imagebatch.models import Prompt, aspect_dimensions
from imagebatch.providers.base import ImageProvider, RawImage

__all__ = ["LocalProvider"]

_LABEL = "imagebatch local renderer - offline stand-in, not a generated image"


class LocalProvider(ImageProvider):
    """Gradients and shapes seeded by the prompt; option ``render_px`` caps the long side."""

    kind: ClassVar[str] = "local"
    offline: ClassVar[bool] = True

    async def generate(self, prompt: Prompt) -> RawImage:
        cap = self.config.options.get("render_px")
        long_side = min(prompt.long_side_px, int(cap)) if cap else prompt.long_side_px
        data = await asyncio.to_thread(render_local_image, prompt, long_side)
        return RawImage(data=data, mime_type="image/png", model=self.model)


def render_local_image(prompt: Prompt, long_side: int) -> bytes:
    """PNG bytes for ``prompt``, a pure function of the prompt's content and seed."""
    key = "\x1f".join(
        str(v) for v in (prompt.prompt, prompt.negative_prompt, prompt.seed, prompt.aspect_ratio)
    )
    rng = random.Random(hashlib.sha256(key.encode()).digest())
    width, height = aspect_dimensions(prompt.aspect_ratio, long_side)

    top = tuple(rng.randrange(40, 216) for _ in range(3))
    bottom = tuple(rng.randrange(40, 216) for _ in range(3))
    mask = Image.linear_gradient("L").resize((width, height))
    image = Image.composite(
        Image.new("RGB", (width, height), bottom), Image.new("RGB", (width, height), top), mask
    )

    draw = ImageDraw.Draw(image, "RGBA")
    for _ in range(rng.randrange(6, 14)):
        x, y = rng.randrange(width), rng.randrange(height)
        r = rng.randrange(max(2, long_side // 20), max(3, long_side // 4))
        fill = (*(rng.randrange(256) for _ in range(3)), rng.randrange(90, 200))
        box = (x - r, y - r, x + r, y + r)
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)

    font = ImageFont.load_default(size=max(8, long_side // 40))
    margin = max(4, long_side // 64)
    text = _LABEL + "\n" + "\n".join(textwrap.wrap(prompt.prompt, 60)[:3])
    draw.multiline_text(
        (margin, margin),
        text,
        fill=(255, 255, 255, 230),
        font=font,
        stroke_width=1,
        stroke_fill=(0, 0, 0, 200),
    )

    out = io.BytesIO()
    image.save(out, format="PNG", optimize=False)
    return out.getvalue()
