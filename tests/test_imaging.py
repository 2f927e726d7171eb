from __future__ import annotations

import hashlib
import io

import pytest
from PIL import Image

from imagebatch.config import RenditionConfig
from imagebatch.errors import BadImage
from imagebatch.imaging import (
    ALGORITHMIC_SOURCE_TYPE,
    DIGITAL_SOURCE_TYPE,
    inspect_image,
    render_renditions,
)

RENDITIONS = [
    RenditionConfig(name="original", format="png"),
    RenditionConfig(name="web", format="webp", max_px=300, quality=70),
    RenditionConfig(name="thumb", format="jpeg", max_px=64, quality=80),
]
META = {"prompt_id": "mug-1", "provider": "primary", "model": "gemini-3-pro-image"}


def _png(size=(400, 200), mode="RGB", color=(200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, color).save(out, format="PNG")
    return out.getvalue()


def test_renditions_have_configured_format_size_and_metadata():
    renditions = render_renditions(_png(), RENDITIONS, META)
    assert [r.name for r in renditions] == ["original", "web", "thumb"]
    expected = {
        "original": ("PNG", (400, 200)),
        "web": ("WEBP", (300, 150)),
        "thumb": ("JPEG", (64, 32)),
    }
    for r in renditions:
        with Image.open(io.BytesIO(r.data)) as im:
            assert (im.format, im.size) == expected[r.name]
            assert (r.width, r.height) == im.size
            xmp = im.getxmp()["xmpmeta"]["RDF"]["Description"]
        assert xmp["DigitalSourceType"] == DIGITAL_SOURCE_TYPE
        assert (xmp["prompt_id"], xmp["provider"], xmp["model"]) == tuple(META.values())
        assert r.sha256 == hashlib.sha256(r.data).hexdigest()
        assert r.content_type == f"image/{im.format.lower()}"


def test_png_also_carries_plain_text_fields():
    original = render_renditions(_png(), RENDITIONS[:1], META)[0]
    with Image.open(io.BytesIO(original.data)) as im:
        assert im.text["imagebatch:prompt_id"] == "mug-1"


def test_offline_images_are_labelled_algorithmic_not_generative():
    thumb = render_renditions(_png(), RENDITIONS[2:], META, source_type=ALGORITHMIC_SOURCE_TYPE)[0]
    with Image.open(io.BytesIO(thumb.data)) as im:
        assert im.getxmp()["xmpmeta"]["RDF"]["Description"]["DigitalSourceType"] == (
            ALGORITHMIC_SOURCE_TYPE
        )


def test_transparent_source_becomes_an_opaque_jpeg():
    renditions = render_renditions(_png(mode="RGBA", color=(0, 0, 255, 0)), RENDITIONS, META)
    modes = {}
    for r in renditions:
        with Image.open(io.BytesIO(r.data)) as im:
            modes[r.name] = im.mode
    assert modes["original"] == "RGBA" and modes["thumb"] == "RGB"


def test_small_images_are_never_upscaled():
    web = render_renditions(_png(size=(100, 50)), RENDITIONS[1:2], META)[0]
    assert (web.width, web.height) == (100, 50)


def test_metadata_values_are_escaped_in_xmp():
    meta = {**META, "prompt_id": "a<b>&c"}
    thumb = render_renditions(_png(), RENDITIONS[2:], meta)[0]
    with Image.open(io.BytesIO(thumb.data)) as im:
        assert im.getxmp()["xmpmeta"]["RDF"]["Description"]["prompt_id"] == "a<b>&c"


def test_inspect_reports_size_of_a_good_image():
    info = inspect_image(_png())
    assert (info.width, info.height, info.format) == (400, 200, "PNG")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "no image bytes"),
        (b"<html>503 Service Unavailable</html>", "do not decode as an image"),
        (_png()[:-200], "do not decode as an image"),
    ],
)
def test_inspect_rejects_empty_corrupt_and_truncated_bytes(data, message):
    with pytest.raises(BadImage, match=message):
        inspect_image(data)


def test_inspect_rejects_decompression_bombs(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    with pytest.raises(BadImage, match="too large to decode safely"):
        inspect_image(_png(size=(400, 200)))
