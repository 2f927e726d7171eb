"""Pillow work: check that provider bytes are an image, and render the configured renditions.

Everything here is CPU-bound and synchronous; callers run it in a worker thread.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from xml.sax.saxutils import escape

from PIL import Image, PngImagePlugin

from imagebatch.config import RenditionConfig
from imagebatch.errors import BadImage

__all__ = [
    "ALGORITHMIC_SOURCE_TYPE",
    "CONTENT_TYPES",
    "DIGITAL_SOURCE_TYPE",
    "ImageInfo",
    "Rendition",
    "build_xmp",
    "inspect_image",
    "render_renditions",
]

#: IPTC digital source types: made by a generative model, or drawn by a plain algorithm
DIGITAL_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
ALGORITHMIC_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/algorithmicMedia"
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
_NS = "https://github.com/imagebatch/imagebatch/ns/1.0/"


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


def inspect_image(data: bytes) -> ImageInfo:
    """Decode ``data`` fully; raise :class:`BadImage` if it is empty, corrupt or a bomb."""
    if not data:
        raise BadImage("the provider returned no image bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                return ImageInfo(width=im.width, height=im.height, format=im.format or "")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage(f"the image is too large to decode safely: {exc}") from None
    except Exception as exc:  # Pillow raises many types for bad data
        raise BadImage(f"the bytes do not decode as an image ({len(data)} bytes): {exc}") from None


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
) -> list[Rendition]:
    """Encode each configured rendition of ``data`` with the metadata embedded."""
    xmp = build_xmp(metadata, source_type)
    with Image.open(io.BytesIO(data)) as source:
        source.load()
        base = source.convert("RGBA" if _has_alpha(source) else "RGB")
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
