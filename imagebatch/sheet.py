"""Contact sheets: thumbnails in a grid, and a labelled cell for every image that is not there.

Two sheets use it: the night's (:func:`night_sheet`: the first prompts of the batch, then every
prompt that did not succeed) and the provider comparison's (:mod:`imagebatch.compare`).
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from imagebatch.errors import StorageError
from imagebatch.models import PromptRecord
from imagebatch.records import RecordStore

__all__ = [
    "NIGHT_CELL_PX",
    "SheetCell",
    "build_night_sheet",
    "choose_night_cells",
    "draw_reason",
    "font",
    "night_sheet",
    "paste_thumbnail",
    "smallest_object",
]

NIGHT_CELL_PX = 192  # each thumbnail fits in a square this size
_CAPTION_PX = 40  # the prompt id and status under each cell
_TITLE_PX = 36
_MISSING = "#eeeeee"
_RED = "#aa0000"


def font(size: int = 14) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def paste_thumbnail(sheet: Image.Image, image: bytes, box: tuple[int, int, int, int]) -> None:
    """Paste ``image`` shrunk to fit ``box`` (left, top, right, bottom), centred in it.

    Raises what Pillow raises for bytes that are not an image: the caller labels the cell.
    """
    left, top, right, bottom = box
    with Image.open(io.BytesIO(image)) as im:
        im.draft("RGB", (right - left, bottom - top))  # JPEG: decode at the size needed
        thumb = im.convert("RGB")
        thumb.thumbnail((right - left, bottom - top))
    sheet.paste(
        thumb,
        (left + (right - left - thumb.width) // 2, top + (bottom - top - thumb.height) // 2),
    )


def draw_reason(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], reason: str) -> None:
    """A grey cell in ``box`` with ``reason`` written in red, as many lines as fit."""
    left, top, right, bottom = box
    draw.rectangle(box, fill=_MISSING)
    face = font()
    lines = _fit(reason, face, right - left - 16)
    rows = max(1, (bottom - top - 16) // 18)
    if len(lines) > rows:
        lines = [*lines[: rows - 1], lines[rows - 1][:-3] + "..."]
    for i, line in enumerate(lines):
        draw.text((left + 8, top + 8 + i * 18), line, fill=_RED, font=face)


def _fit(text: str, face, width_px: int) -> list[str]:
    """``text`` in lines no wider than ``width_px`` in ``face``; a word too long for a line is
    cut where it reaches the edge."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if face.getlength(candidate) <= width_px:
            line = candidate
            continue
        if line:
            lines.append(line)
        line = ""
        for char in word:
            if line and face.getlength(line + char) > width_px:
                lines.append(line)
                line = ""
            line += char
    return [*lines, line] if line else lines


@dataclass(frozen=True)
class SheetCell:
    """One prompt on the night's sheet: its thumbnail, or why there is none."""

    prompt_id: str
    status: str  # succeeded, failed, blocked, skipped
    image: bytes | None = None
    reason: str | None = None  # shown instead of the image


def choose_night_cells(
    records: list[PromptRecord], first: int, *, most_unsettled: int = 96
) -> tuple[list[PromptRecord], int]:
    """The records on the night's sheet, and how many prompts that did not succeed were left off.

    The first ``first`` prompts of the batch (in prompt-file order, whatever became of them),
    then every other prompt that did not succeed, at most ``most_unsettled`` of them.
    """
    chosen = records[:first]
    unsettled = [r for r in records[first:] if r.status != "succeeded"]
    return chosen + unsettled[:most_unsettled], max(0, len(unsettled) - most_unsettled)


def smallest_object(record: PromptRecord):
    """The record's smallest published rendition (the cheapest to read back), or None."""
    if not record.objects:
        return None
    return min(record.objects, key=lambda o: (o.width * o.height, o.bytes))


def night_sheet(
    cells: list[SheetCell], *, title: str = "", columns: int = 6, left_off: int = 0
) -> bytes:
    """A PNG grid of ``cells``, ``columns`` wide; each cell captioned with its prompt id and,
    unless it succeeded, its status; a cell without an image says why. ``left_off``: prompts
    that did not succeed and have no cell (said in the title line)."""
    columns = max(1, min(columns, len(cells) or 1))
    rows = max(1, -(-len(cells) // columns))
    step = NIGHT_CELL_PX + _CAPTION_PX
    sheet = Image.new("RGB", (columns * NIGHT_CELL_PX, _TITLE_PX + rows * step), "white")
    draw = ImageDraw.Draw(sheet)
    heading = title
    if left_off:
        heading += f" ({left_off} more that did not succeed: see the manifest)"
    draw.text((8, 10), heading, fill="black", font=font(16))
    for i, cell in enumerate(cells):
        left = (i % columns) * NIGHT_CELL_PX
        top = _TITLE_PX + (i // columns) * step
        box = (left + 4, top + 4, left + NIGHT_CELL_PX - 4, top + NIGHT_CELL_PX - 4)
        drawn = False
        if cell.image is not None:
            try:
                paste_thumbnail(sheet, cell.image, box)
                drawn = True
            except Exception:  # an undecodable thumbnail loses only its cell
                reason = "the published thumbnail could not be read"
        else:
            reason = cell.reason or cell.status
        if not drawn:
            draw_reason(draw, box, reason)
        caption = (
            cell.prompt_id if cell.status == "succeeded" else f"{cell.prompt_id}: {cell.status}"
        )
        colour = "black" if cell.status == "succeeded" else _RED
        draw.text((left + 6, top + NIGHT_CELL_PX + 2), caption[:26], fill=colour, font=font(13))
    out = io.BytesIO()
    sheet.save(out, format="PNG", optimize=True)
    return out.getvalue()


def build_night_sheet(store: RecordStore, records: list[PromptRecord], first: int) -> bytes:
    """The night's contact sheet from its manifest ``records``: each chosen prompt's smallest
    published rendition read back from ``store`` (eight reads at a time); a prompt that did not
    succeed, or whose thumbnail is gone, gets a labelled cell."""
    chosen, left_off = choose_night_cells(records, first)

    def cell(record: PromptRecord) -> SheetCell:
        if record.status != "succeeded":
            return SheetCell(record.id, record.status, reason=record.error or record.status)
        smallest = smallest_object(record)
        try:
            image = store.read_object(record, smallest.uri) if smallest else None
        except StorageError as exc:
            return SheetCell(record.id, record.status, reason=f"not read back: {exc}")
        return SheetCell(record.id, record.status, image, reason="no published image found")

    with ThreadPoolExecutor(max_workers=8) as pool:
        cells = list(pool.map(cell, chosen))
    succeeded = sum(r.status == "succeeded" for r in records)
    title = f"{store.batch_id}: {succeeded}/{len(records)} succeeded"
    return night_sheet(cells, title=title, left_off=left_off)
