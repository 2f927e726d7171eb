from __future__ import annotations

import asyncio
import io

import pytest
from PIL import Image

from imagebatch.config import ProviderConfig
from imagebatch.models import Prompt, aspect_dimensions
from imagebatch.providers import REGISTRY, LocalProvider, build_provider


def _provider(**options) -> LocalProvider:
    config = ProviderConfig(name="local", kind="local", model="local-render-v1", options=options)
    provider = build_provider(config, {})
    assert isinstance(provider, LocalProvider)
    return provider


def _generate(provider: LocalProvider, **fields) -> bytes:
    prompt = Prompt(id="p", **{"prompt": "a lighthouse at dusk", **fields})
    return asyncio.run(provider.generate(prompt)).data


def test_same_prompt_and_seed_give_the_same_bytes():
    provider = _provider(render_px=128)
    assert _generate(provider, seed=5) == _generate(provider, seed=5)


@pytest.mark.parametrize("change", [{"seed": 6}, {"prompt": "a lighthouse at dawn"}])
def test_a_different_seed_or_prompt_gives_a_different_image(change):
    provider = _provider(render_px=128)
    assert _generate(provider, seed=5) != _generate(provider, **{"seed": 5, **change})


@pytest.mark.parametrize("ratio", ["1:1", "16:9", "9:16", "21:9", "4:5"])
def test_renders_the_requested_aspect_ratio(ratio):
    data = _generate(_provider(render_px=200), aspect_ratio=ratio)
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG"
        assert im.size == aspect_dimensions(ratio, 200)


def test_renders_the_requested_size_without_a_cap():
    data = _generate(_provider(), size="1K", aspect_ratio="3:2")
    with Image.open(io.BytesIO(data)) as im:
        assert im.size == (1024, 683)


def test_is_registered_and_free_and_labelled_offline():
    provider = _provider()
    assert REGISTRY["local"] is LocalProvider
    assert provider.offline is True
    assert provider.price(Prompt(id="p", prompt="x")) == 0.0
