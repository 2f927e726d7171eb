"""A scripted provider for tests of the pure orchestration logic (not a stand-in for an SDK)."""

from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Callable
from typing import ClassVar

from PIL import Image

from imagebatch.models import Prompt
from imagebatch.providers.base import ImageProvider, RawImage

#: per provider name: a function of (prompt, call number for that prompt) -> bytes or raise
SCRIPTS: dict[str, Callable[[Prompt, int], bytes]] = {}


def png(size: tuple[int, int] = (64, 64)) -> bytes:
    """A small picture (a blue fade, never uniform: a uniform image counts as refused)."""
    fade = Image.linear_gradient("L").resize(size)
    image = Image.composite(Image.new("RGB", size, (10, 120, 200)), Image.new("RGB", size), fade)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


class ScriptedProvider(ImageProvider):
    kind: ClassVar[str] = "local"

    def __init__(self, config, env):
        super().__init__(config, env)
        self.calls: dict[str, int] = defaultdict(int)

    async def generate(self, prompt: Prompt) -> RawImage:
        self.calls[prompt.id] += 1
        script = SCRIPTS.get(self.name, lambda p, n: png())
        return RawImage(
            data=script(prompt, self.calls[prompt.id]), mime_type="image/png", model=self.model
        )
