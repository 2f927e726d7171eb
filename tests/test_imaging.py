from __future__ import annotations

import hashlib
import io

import pytest
from PIL import Image

from imagebatch.config import RenditionConfig
from imagebatch.emulator.wire import BOMB_BYTES
from imagebatch.errors import BadImage, ContentRefused
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
    """A picture: ``color`` fading to black left to right (never uniform)."""
    fade = Image.linear_gradient("L").rotate(90).resize(size)
    image = Image.composite(Image.new(mode, size, color), Image.new(mode, size), fade)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _encode(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
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


def test_inspect_rejects_decompression_bombs_at_pillows_own_limit():
    assert len(BOMB_BYTES) < 200  # claims 30000x30000 pixels, above Image.MAX_IMAGE_PIXELS
    with pytest.raises(BadImage, match="too large to decode safely"):
        inspect_image(BOMB_BYTES)


@pytest.mark.parametrize(
    "image",
    [
        Image.new("RGB", (256, 256)),  # all black
        Image.new("RGB", (256, 256), (255, 255, 255)),
        Image.effect_noise((256, 256), 1).convert("RGB"),  # grey with faint noise
        Image.new("RGBA", (256, 256), (200, 10, 10, 0)),  # fully transparent
    ],
    ids=["black", "white", "faint-noise", "transparent"],
)
def test_blank_or_near_uniform_images_are_refused_content(image):
    with pytest.raises(ContentRefused, match="blank or near-uniform") as caught:
        inspect_image(_encode(image))
    assert caught.value.final_status == "blocked"


def test_a_dark_but_real_picture_is_not_blank():
    dark = _png(color=(40, 40, 40))  # a fade from dark grey to black
    assert inspect_image(dark).width == 400


@pytest.mark.parametrize(
    ("size", "requested", "ok"),
    [
        ((400, 200), "2:1", True),
        ((400, 204), "2:1", True),  # 1.96% off
        ((400, 208), "2:1", False),  # 3.8% off
        ((256, 256), "16:9", False),
        ((1536, 1024), "1536x1024", True),  # an API's own size string
        ((1024, 1024), "1536x1024", False),
    ],
)
def test_aspect_ratio_more_than_two_percent_off_is_a_bad_image(size, requested, ok):
    data = _png(size=size)
    if ok:
        assert (inspect_image(data, requested).width, inspect_image(data).height) == size
    else:
        with pytest.raises(BadImage, match=f"off the requested aspect ratio {requested}"):
            inspect_image(data, requested)


def test_renditions_crop_a_slightly_off_image_to_the_requested_aspect():
    original, thumb = render_renditions(
        _png(size=(400, 204)), [RENDITIONS[0], RENDITIONS[2]], META, aspect_ratio="2:1"
    )
    assert (original.width, original.height) == (400, 200)
    assert (thumb.width, thumb.height) == (64, 32)
    exact = render_renditions(_png(size=(400, 200)), RENDITIONS[:1], META, aspect_ratio="2:1")
    assert (exact[0].width, exact[0].height) == (400, 200)
