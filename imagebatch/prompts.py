"""Load and validate prompt files (JSONL, CSV, YAML) into a list of prompts.

Every problem is reported with the file, line and field. By default one bad row fails the whole
load before anything is generated; with ``skip_bad_rows`` the bad rows are returned as rejects.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from imagebatch.errors import PromptFileError
from imagebatch.models import Prompt

__all__ = ["PromptLoad", "RejectedRow", "load_prompts", "parse_prompts"]

_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".yaml": "yaml", ".yml": "yaml"}
_FIELDS = tuple(Prompt.model_fields)
_METADATA_PREFIX = "metadata."


@dataclass(frozen=True)
class RejectedRow:
    """A row left out because ``skip_bad_rows`` was set."""

    line: int
    field: str | None
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}" + (f", field '{self.field}'" if self.field else "")
        return f"{where}: {self.message}"


@dataclass(frozen=True)
class PromptLoad:
    """The prompts of one file and the rows that were skipped."""

    source: str
    prompts: list[Prompt]
    rejected: list[RejectedRow] = field(default_factory=list)


def load_prompts(source: str | Path, *, skip_bad_rows: bool = False) -> PromptLoad:
    """Read and validate a prompt file; raise :class:`PromptFileError` on the first bad row."""
    name = str(source)
    if name.startswith("gs://"):
        data = _read_gs(name)
    else:
        path = Path(source)
        if not path.is_file():
            what = "is a directory, not a file" if path.is_dir() else "does not exist"
            raise PromptFileError(f"the prompt file {what}", source=name)
        data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PromptFileError(
            f"not UTF-8 text (bad byte at offset {exc.start}); save the file as UTF-8",
            source=name,
        ) from None
    return parse_prompts(text, source=name, skip_bad_rows=skip_bad_rows)


def _read_gs(uri: str) -> bytes:
    from imagebatch.errors import StorageError
    from imagebatch.settings import Settings
    from imagebatch.storage import storage_kwargs
    from imagebatch.storage.gcs import read_gs_uri

    try:
        return read_gs_uri(uri, retry=storage_kwargs(Settings())["retry"])
    except StorageError as exc:
        raise PromptFileError(f"cannot read the prompt file: {exc}", source=uri) from None


def parse_prompts(text: str, *, source: str, skip_bad_rows: bool = False) -> PromptLoad:
    """Validate the text of a prompt file; the format comes from the source's extension."""
    fmt = _FORMATS.get(Path(source).suffix.lower())
    if fmt is None:
        raise PromptFileError(
            f"unknown prompt file type; use one of {', '.join(sorted(_FORMATS))}", source=source
        )
    if not text.strip():
        raise PromptFileError("the prompt file is empty", source=source)
    rows = {"jsonl": _jsonl_rows, "csv": _csv_rows, "yaml": _yaml_rows}[fmt](text, source)

    prompts: list[Prompt] = []
    rejected: list[RejectedRow] = []
    seen: dict[str, int] = {}
    for line, row in rows:
        try:
            if isinstance(row, PromptFileError):
                raise row
            prompt = _validate(row, source, line)
            if prompt.id in seen:
                how = "the same id" if "id" in row else "the same content (and so the same id)"
                raise PromptFileError(
                    f"duplicate id '{prompt.id}': line {seen[prompt.id]} has {how}; ids must be "
                    "unique within a batch",
                    source=source,
                    line=line,
                    field="id",
                )
        except PromptFileError as exc:
            if not skip_bad_rows:
                raise
            rejected.append(RejectedRow(line=exc.line or line, field=exc.field, message=exc.reason))
            continue
        seen[prompt.id] = line
        prompts.append(prompt)

    if not prompts:
        detail = f"; all {len(rejected)} rows were bad" if rejected else ""
        raise PromptFileError(f"the prompt file has no prompts{detail}", source=source)
    return PromptLoad(source=source, prompts=prompts, rejected=rejected)


def _validate(row: Any, source: str, line: int) -> Prompt:
    if isinstance(row, str):
        row = {"prompt": row}
    if not isinstance(row, dict):
        raise PromptFileError(
            f"expected an object with a 'prompt' field, got {type(row).__name__}",
            source=source,
            line=line,
        )
    unknown = [k for k in row if k not in _FIELDS]
    if unknown:
        raise PromptFileError(
            f"unknown field '{unknown[0]}'; allowed fields: {', '.join(_FIELDS)}",
            source=source,
            line=line,
            field=str(unknown[0]),
        )
    if "prompt" not in row or row["prompt"] is None:
        raise PromptFileError("the prompt is missing", source=source, line=line, field="prompt")
    fields = dict(row)
    if fields.get("id") in (None, ""):
        fields["id"] = Prompt.content_id(fields)
    try:
        return Prompt.model_validate(fields)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or None
        message = err["msg"]
        if err["type"] == "string_too_long":
            message = f"too long: {len(str(fields.get(loc, '')))} characters, at most " + str(
                err.get("ctx", {}).get("max_length")
            )
        elif err["type"] == "string_pattern_mismatch":
            message = (
                "ids may hold letters, digits, '.', '_' and '-', start with a letter or digit, "
                "and be at most 128 characters"
            )
        elif err["type"] == "value_error":
            message = str(err.get("ctx", {}).get("error", message))
        raise PromptFileError(message, source=source, line=line, field=loc) from None


def _jsonl_rows(text: str, source: str) -> Iterator[tuple[int, Any]]:
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            yield number, json.loads(raw)
        except json.JSONDecodeError as exc:
            yield (
                number,
                PromptFileError(
                    f"malformed JSON at column {exc.colno}: {exc.msg}", source=source, line=number
                ),
            )


def _csv_rows(text: str, source: str) -> Iterator[tuple[int, Any]]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = [h.strip() for h in next(reader)]
    except csv.Error as exc:
        raise PromptFileError(f"malformed CSV: {exc}", source=source, line=1) from None
    if "prompt" not in header:
        raise PromptFileError(
            "the CSV header has no 'prompt' column", source=source, line=1, field="prompt"
        )
    for name in header:
        if name not in _FIELDS and not name.startswith(_METADATA_PREFIX):
            raise PromptFileError(
                f"unknown column '{name}'; allowed: {', '.join(_FIELDS)} or metadata.<key>",
                source=source,
                line=1,
                field=name,
            )
    line = reader.line_num + 1
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield line, PromptFileError(f"malformed CSV: {exc}", source=source, line=line)
            return
        start, line = line, reader.line_num + 1
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            yield (
                start,
                PromptFileError(
                    f"expected {len(header)} cells as in the header, found {len(cells)}",
                    source=source,
                    line=start,
                ),
            )
            continue
        row: dict[str, Any] = {}
        for name, value in zip(header, cells, strict=True):
            if value == "":
                continue
            if name.startswith(_METADATA_PREFIX):
                row.setdefault("metadata", {})[name[len(_METADATA_PREFIX) :]] = value
            else:
                row[name] = value
        yield start, row


def _yaml_rows(text: str, source: str) -> Iterator[tuple[int, Any]]:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise PromptFileError(f"malformed YAML: {problem}", source=source, line=line) from None
    items_node, items = root, data
    if isinstance(data, dict) and isinstance(root, yaml.MappingNode):
        if set(data) != {"prompts"}:
            raise PromptFileError(
                "a YAML prompt file is a list of prompts, or a mapping with only 'prompts:'",
                source=source,
                line=1,
            )
        items = data["prompts"]
        items_node = next(v for k, v in root.value if k.value == "prompts")
    if not isinstance(items, list) or not isinstance(items_node, yaml.SequenceNode):
        raise PromptFileError("expected a list of prompts", source=source, line=1)
    for node, item in zip(items_node.value, items, strict=True):
        yield node.start_mark.line + 1, item
