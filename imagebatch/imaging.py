"""Pillow work: check that provider bytes are an image, and render the configured renditions.

Everything here is CPU-bound and synchronous; callers run it in a worker thread.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from xml.sax.saxutils import escape

from PIL import Image, ImageStat, PngImagePlugin

from imagebatch.config import RenditionConfig
from imagebatch.errors import BadImage, BlankImage
from imagebatch.models import aspect_value

__all__ = [
    "ALGORITHMIC_SOURCE_TYPE",
    "CONTENT_TYPES",
    "DIGITAL_SOURCE_TYPE",
    "ImageInfo",
    "Rendition",
    "build_xmp",
    "crop_to_aspect",
    "inspect_image",
    "render_renditions",
]

#: IPTC digital source types: made by a generative model, or drawn by a plain algorithm
DIGITAL_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
ALGORITHMIC_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/algorithmicMedia"
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
_NS = "https://github.com/imagebatch/imagebatch/ns/1.0/"
#: an image whose grey levels vary less than this (std dev, 0-255) is blank or near-uniform
UNIFORM_STDDEV = 2.0
#: an image further off the requested aspect ratio than this is a failed attempt
ASPECT_TOLERANCE = 0.02


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    format: str


@dataclass(frozen=True)
class Rendition:
    """One encoded derivative of a generated image, ready to publish."""

    name: str
    data: bytes
    content_type: str
    extension: str
    width: int
    height: int
    sha256: str


def inspect_image(data: bytes, expected_aspect: str | None = None) -> ImageInfo:
    """Decode ``data`` fully and check what the provider sent.

    Raises:
        BadImage: empty, not an image, truncated, a decompression bomb, or an aspect ratio more
            than 2% off ``expected_aspect`` (``W:H`` or ``WxH``): worth another try.
        BlankImage: blank or near-uniform, which some providers' safety filters return
            instead of an error: the provider refused the content.
    """
    if not data:
        raise BadImage("the provider returned no image bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                info = ImageInfo(width=im.width, height=im.height, format=im.format or "")
                spread = _spread(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage(f"the image is too large to decode safely: {exc}") from None
    except Exception as exc:  # Pillow raises many types for bad data
        raise BadImage(f"the bytes do not decode as an image ({len(data)} bytes): {exc}") from None
    if spread < UNIFORM_STDDEV:
        raise BlankImage(
            f"the image is blank or near-uniform ({info.width}x{info.height}, grey-level std dev "
            f"{spread:.1f}): taken as the provider's silent safety filter"
        )
    wanted = aspect_value(expected_aspect) if expected_aspect else None
    if wanted:
        off = (info.width / info.height) / wanted - 1
        if abs(off) > ASPECT_TOLERANCE:
            raise BadImage(
                f"the image is {info.width}x{info.height}, {abs(off):.0%} off the requested "
                f"aspect ratio {expected_aspect} (more than {ASPECT_TOLERANCE:.0%})"
            )
    return info


def _spread(im: Image.Image) -> float:
    """How much the image varies: std dev of grey levels on a small copy (0 for one colour)."""
    if _has_alpha(im):
        rgba = im.convert("RGBA")
        if rgba.getchannel("A").getextrema()[1] == 0:
            return 0.0  # fully transparent
    small = im.convert("L").resize((64, 64), Image.Resampling.BOX)
    return ImageStat.Stat(small).stddev[0]


def crop_to_aspect(image: Image.Image, aspect_ratio: str | None) -> Image.Image:
    """Centre-crop ``image`` to ``aspect_ratio`` when it is off by more than a pixel's rounding."""
    wanted = aspect_value(aspect_ratio) if aspect_ratio else None
    if not wanted:
        return image
    w, h = image.size
    if w / h > wanted:
        new_w, new_h = max(1, round(h * wanted)), h
    else:
        new_w, new_h = w, max(1, round(w / wanted))
    if abs(new_w - w) <= 1 and abs(new_h - h) <= 1:
        return image
    left, top = (w - new_w) // 2, (h - new_h) // 2
    return image.crop((left, top, left + new_w, top + new_h))


def build_xmp(fields: dict[str, str], source_type: str = DIGITAL_SOURCE_TYPE) -> bytes:
    """An XMP packet with the IPTC digital source type and imagebatch's own fields."""
    props = "".join(
        f"<imagebatch:{k}>{escape(v)}</imagebatch:{k}>" for k, v in sorted(fields.items())
    )
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">'
        '<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description rdf:about=""'
        ' xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/"'
        f' xmlns:imagebatch="{_NS}">'
        f"<Iptc4xmpExt:DigitalSourceType>{source_type}</Iptc4xmpExt:DigitalSourceType>"
        f"{props}"
        "</rdf:Description></rdf:RDF></x:xmpmeta>"
        '<?xpacket end="w"?>'
    ).encode()


def render_renditions(
    data: bytes,
    renditions: list[RenditionConfig],
    metadata: dict[str, str],
    *,
    source_type: str = DIGITAL_SOURCE_TYPE,
    aspect_ratio: str | None = None,
) -> list[Rendition]:
    """Encode each configured rendition of ``data`` with the metadata embedded.

    With ``aspect_ratio``, an image slightly off it (or one an API could only make in its
    nearest supported shape) is centre-cropped to it first.
    """
    xmp = build_xmp(metadata, source_type)
    with Image.open(io.BytesIO(data)) as source:
        source.load()
        base = crop_to_aspect(source.convert("RGBA" if _has_alpha(source) else "RGB"), aspect_ratio)
    return [_render(base, spec, xmp, metadata) for spec in renditions]


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)


def _render(
    base: Image.Image, spec: RenditionConfig, xmp: bytes, metadata: dict[str, str]
) -> Rendition:
    image = base
    if spec.max_px and max(base.size) > spec.max_px:
        image = base.copy()
        image.thumbnail((spec.max_px, spec.max_px), Image.Resampling.LANCZOS)
    if spec.format == "jpeg" and image.mode != "RGB":
        image = image.convert("RGB")

    out = io.BytesIO()
    if spec.format == "png":
        info = PngImagePlugin.PngInfo()
        info.add_itxt("XML:com.adobe.xmp", xmp.decode("utf-8"))
        for key, value in sorted(metadata.items()):
            info.add_text(f"imagebatch:{key}", value)
        image.save(out, format="PNG", pnginfo=info)
    elif spec.format == "jpeg":
        image.save(out, format="JPEG", quality=spec.quality, optimize=True, xmp=xmp)
    else:
        image.save(out, format="WEBP", quality=spec.quality, method=4, xmp=xmp)
    encoded = out.getvalue()
    return Rendition(
        name=spec.name,
        data=encoded,
        content_type=CONTENT_TYPES[spec.format],
        extension=_EXTENSIONS[spec.format],
        width=image.width,
        height=image.height,
        sha256=hashlib.sha256(encoded).hexdigest(),
    )
