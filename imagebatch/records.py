"""Per-prompt records in a sink, and the manifest rebuilt from them.

A prompt is done if and only if its success record exists. The success record is written last,
after the prompt's images, and create-only, so nothing ever overwrites it. A failure record is
replaced when a later run settles the prompt, and removed once the prompt succeeds.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from datetime import UTC, datetime

from imagebatch.config import RenditionConfig
from imagebatch.errors import StorageError
from imagebatch.models import Prompt, PromptRecord
from imagebatch.storage import Sink

__all__ = [
    "BATCH_NAME",
    "LATEST_NAME",
    "MANIFEST_NAME",
    "PROMPTS_NAME",
    "SHEET_NAME",
    "SUMMARY_NAME",
    "RecordStore",
    "reuse_key",
    "update_latest",
]

MANIFEST_NAME = "manifest.jsonl"
SUMMARY_NAME = "summary.json"  # the batch's totals, rebuilt from the records
PROMPTS_NAME = "_prompts.jsonl"  # the batch's validated prompts, for reruns
BATCH_NAME = "_batch.json"  # what the batch was run with
LATEST_NAME = "latest.json"  # prompt id -> its newest published renditions, for consumers
SHEET_NAME = "contact-sheet.png"  # thumbnails of the night (imagebatch.sheet)
_REUSE = "_reuse"  # content key -> the success record that published it
_SUCCESS = "_success.json"
_FAILURE = "_failure.json"
_JSON = "application/json"
_NO_CACHE = "no-cache"  # records and manifests change; consumers must not cache them


class RecordStore:
    """The records of one batch in one sink."""

    def __init__(self, sink: Sink, batch_id: str):
        self.sink = sink
        self.batch_id = batch_id

    def object_key(self, prompt_id: str, name: str) -> str:
        """``{batch_id}/{prompt_id}/{name}``: where a prompt's objects live."""
        return f"{self.batch_id}/{prompt_id}/{name}"

    def succeeded_ids(self) -> set[str]:
        """Ids of every prompt of this batch with a success record (one listing)."""
        return {
            key.split("/")[-2]
            for key in self.sink.list(f"{self.batch_id}/")
            if key.endswith(f"/{_SUCCESS}") and key.count("/") == 2
        }

    def recorded_ids(self) -> set[str]:
        """Ids of every prompt of this batch with a success or failure record (one listing)."""
        return {
            key.split("/")[-2]
            for key in self.sink.list(f"{self.batch_id}/")
            if key.endswith((f"/{_SUCCESS}", f"/{_FAILURE}")) and key.count("/") == 2
        }

    def read_success(self, prompt_id: str) -> PromptRecord | None:
        data = self.sink.read(self.object_key(prompt_id, _SUCCESS))
        return PromptRecord.model_validate_json(data) if data is not None else None

    def read(self, prompt_id: str) -> PromptRecord | None:
        """The success record if there is one, else the failure record, else None."""
        for name in (_SUCCESS, _FAILURE):
            data = self.sink.read(self.object_key(prompt_id, name))
            if data is not None:
                return PromptRecord.model_validate_json(data)
        return None

    def write_success(self, record: PromptRecord) -> PromptRecord:
        """Create the success record; if one exists already, keep it and return it."""
        key = self.object_key(record.id, _SUCCESS)
        created = self.sink.create(key, record.model_dump_json().encode(), content_type=_JSON)
        kept = record if created else self.read_success(record.id)
        if kept is None:  # pragma: no cover - create said it exists, so it can be read
            raise StorageError(f"{self.sink.uri(key)} exists but cannot be read")
        self.sink.delete(self.object_key(record.id, _FAILURE))
        return kept

    def write_failure(self, record: PromptRecord) -> None:
        """Write or replace the failure record of a prompt that did not succeed."""
        self.sink.write(
            self.object_key(record.id, _FAILURE),
            record.model_dump_json().encode(),
            content_type=_JSON,
            metadata={},
            cache_control=_NO_CACHE,
        )

    def collect(self, prompt_ids: Iterable[str], resumed: set[str]) -> list[PromptRecord]:
        """The records of ``prompt_ids`` in that order (those ``resumed`` marked so); a prompt
        without a record is left out."""
        records: list[PromptRecord] = []
        for prompt_id in prompt_ids:
            record = self.read(prompt_id)
            if record is None:
                continue
            if prompt_id in resumed:
                record = record.model_copy(update={"resumed": True})
            records.append(record)
        return records

    def write_manifest(self, prompt_ids: Iterable[str], resumed: set[str]) -> list[PromptRecord]:
        """Rebuild ``manifest.jsonl`` from the records of ``prompt_ids``, in that order."""
        records = self.collect(prompt_ids, resumed)
        body = "".join(r.model_dump_json() + "\n" for r in records).encode()
        self.sink.write(
            f"{self.batch_id}/{MANIFEST_NAME}",
            body,
            content_type="application/x-ndjson",
            metadata={},
            cache_control=_NO_CACHE,
        )
        return records

    def blocked_ids(self) -> set[str]:
        """Ids of prompts whose latest record says a provider refused them."""
        blocked = set()
        for key in self.sink.list(f"{self.batch_id}/"):
            if key.endswith(f"/{_FAILURE}") and key.count("/") == 2:
                data = self.sink.read(key)
                if data and PromptRecord.model_validate_json(data).status == "blocked":
                    blocked.add(key.split("/")[-2])
        return blocked

    def write_batch(self, prompts: Iterable[Prompt], run: dict) -> None:
        """Keep the batch's prompts and run settings beside it, so a rerun needs nothing else."""
        body = "".join(p.model_dump_json(exclude_none=True) + "\n" for p in prompts).encode()
        for name, data, content_type in (
            (PROMPTS_NAME, body, "application/x-ndjson"),
            (BATCH_NAME, json.dumps(run, indent=2).encode(), "application/json"),
        ):
            key = f"{self.batch_id}/{name}"
            if self.sink.read(key) != data:  # a resumed run leaves them as they are
                self.sink.write(
                    key, data, content_type=content_type, metadata={}, cache_control=_NO_CACHE
                )

    def write_summary(self, summary: dict) -> None:
        """Replace ``summary.json``: the batch's totals, rebuilt from its records each run."""
        self.sink.write(
            f"{self.batch_id}/{SUMMARY_NAME}",
            json.dumps(summary, indent=2).encode(),
            content_type=_JSON,
            metadata={},
            cache_control=_NO_CACHE,
        )

    def read_object(self, record: PromptRecord, uri: str) -> bytes | None:
        """The bytes of one of ``record``'s published objects (None if it is gone)."""
        return self.sink.read(self._key_of(record, uri))

    def write_sheet(self, png: bytes) -> str:
        """Replace the batch's contact sheet (unless it is the same: a rerun with nothing new
        to do writes nothing); its URI."""
        key = f"{self.batch_id}/{SHEET_NAME}"
        if self.sink.read(key) != png:
            self.sink.write(
                key, png, content_type="image/png", metadata={}, cache_control=_NO_CACHE
            )
        return self.sink.uri(key)

    @property
    def manifest_uri(self) -> str:
        return self.sink.uri(f"{self.batch_id}/{MANIFEST_NAME}")

    # ---------------------------------------------------------------- reuse across nights

    def find_reusable(self, keys: Iterable[str]) -> PromptRecord | None:
        """The success record an earlier batch published under one of ``keys`` (first found).

        A pointer whose record or images are gone is ignored: the prompt is generated anew.
        """
        for key in keys:
            data = self.sink.read(f"{_REUSE}/{key}.json")
            if data is None:
                continue
            try:
                pointer = json.loads(data)
                source = RecordStore(self.sink, pointer["batch_id"])
                record = source.read_success(pointer["prompt_id"])
            except (ValueError, KeyError, TypeError):
                continue  # a damaged pointer only costs a new image
            if record is None or record.batch_id == self.batch_id or not record.objects:
                continue
            if all(self.sink.exists(source._key_of(record, o.uri)) for o in record.objects):
                return record
        return None

    def _key_of(self, record: PromptRecord, uri: str) -> str:
        return self.object_key(record.id, uri.rsplit("/", 1)[-1])

    def reuse(self, prompt_id: str, source: PromptRecord) -> PromptRecord:
        """Copy ``source``'s images into this batch and record the prompt as done, at no cost."""
        origin = RecordStore(self.sink, source.batch_id)
        objects = []
        for obj in source.objects:
            name = obj.uri.rsplit("/", 1)[-1]
            target = self.object_key(prompt_id, name)
            self.sink.copy(origin.object_key(source.id, name), target)
            objects.append(obj.model_copy(update={"uri": self.sink.uri(target)}))
        record = PromptRecord(
            id=prompt_id,
            status="succeeded",
            provider=source.provider,
            model=source.model,
            objects=objects,
            batch_id=self.batch_id,
            finished_at=datetime.now(UTC),
            reused_from=origin.sink.uri(origin.object_key(source.id, _SUCCESS)),
        )
        return self.write_success(record)

    def remember(self, key: str, record: PromptRecord) -> None:
        """Point ``key`` at ``record`` so a later batch can reuse its images."""
        pointer = {"batch_id": record.batch_id, "prompt_id": record.id}
        self.sink.write(
            f"{_REUSE}/{key}.json",
            json.dumps(pointer).encode(),
            content_type=_JSON,
            metadata={},
            cache_control=_NO_CACHE,
        )


def reuse_key(prompt: Prompt, model: str, renditions: Iterable[RenditionConfig]) -> str:
    """What makes two images interchangeable: the prompt, its parameters and seed, the model
    and the renditions made of it (and the prompt id, which the images carry as metadata)."""
    content = {
        "id": prompt.id,
        "prompt": prompt.prompt,
        "negative_prompt": prompt.negative_prompt,
        "aspect_ratio": prompt.aspect_ratio,
        "size": prompt.size,
        "seed": prompt.seed,
        "model": model,
        "renditions": [r.model_dump(mode="json") for r in renditions],
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def update_latest(sink: Sink, records: Iterable[PromptRecord]) -> int:
    """Merge the succeeded ``records`` into ``latest.json`` (newest wins); how many it names.

    The index is replaced in one atomic write; concurrent batches merge, never overwrite.
    """
    fresh = {
        r.id: {
            "batch_id": r.batch_id,
            "finished_at": r.finished_at.isoformat(),
            "provider": r.provider,
            "model": r.model,
            "renditions": {
                o.rendition: o.model_dump(mode="json", exclude={"rendition"}) for o in r.objects
            },
        }
        for r in records
        if r.status == "succeeded" and r.objects
    }
    size = 0

    def merge(old: bytes | None) -> bytes:
        nonlocal size
        try:
            prompts = dict(json.loads(old)["prompts"]) if old else {}
        except (ValueError, KeyError, TypeError):
            raise StorageError(
                f"{sink.uri(LATEST_NAME)} is not an imagebatch index; move it aside and rerun "
                "the batch (its prompts are kept) to write a new one"
            ) from None
        for prompt_id, entry in fresh.items():
            current = prompts.get(prompt_id)
            if current is None or datetime.fromisoformat(
                current["finished_at"]
            ) <= datetime.fromisoformat(entry["finished_at"]):
                prompts[prompt_id] = entry
        size = len(prompts)
        if old and prompts == json.loads(old)["prompts"]:
            return old  # nothing new: leave the index (and its timestamp) as it is
        index = {
            "version": 1,
            "updated_at": datetime.now(UTC).isoformat(),
            "prompts": dict(sorted(prompts.items())),
        }
        return json.dumps(index, indent=1).encode()

    sink.update(LATEST_NAME, merge, content_type=_JSON)
    return size
