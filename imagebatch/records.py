"""Per-prompt records in a sink, and the manifest rebuilt from them.

A prompt is done if and only if its success record exists. The success record is written last,
after the prompt's images, and create-only, so nothing ever overwrites it. A failure record is
replaced when a later run settles the prompt, and removed once the prompt succeeds.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from imagebatch.errors import StorageError
from imagebatch.models import Prompt, PromptRecord
from imagebatch.storage import Sink

__all__ = ["BATCH_NAME", "MANIFEST_NAME", "PROMPTS_NAME", "RecordStore"]

MANIFEST_NAME = "manifest.jsonl"
PROMPTS_NAME = "_prompts.jsonl"  # the batch's validated prompts, for reruns
BATCH_NAME = "_batch.json"  # what the batch was run with
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

    def write_manifest(self, prompt_ids: Iterable[str], resumed: set[str]) -> list[PromptRecord]:
        """Rebuild ``manifest.jsonl`` from the records of ``prompt_ids``, in that order."""
        records: list[PromptRecord] = []
        for prompt_id in prompt_ids:
            record = self.read(prompt_id)
            if record is None:
                continue
            if prompt_id in resumed:
                record = record.model_copy(update={"resumed": True})
            records.append(record)
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

    @property
    def manifest_uri(self) -> str:
        return self.sink.uri(f"{self.batch_id}/{MANIFEST_NAME}")
