from __future__ import annotations

import multiprocessing
from datetime import UTC, datetime

import pytest

from imagebatch.errors import BatchLockedError, StorageError
from imagebatch.models import PromptRecord
from imagebatch.records import RecordStore
from imagebatch.storage import LocalSink, open_sink


def _record(prompt_id: str, status: str = "succeeded", **extra) -> PromptRecord:
    return PromptRecord(
        id=prompt_id, status=status, batch_id="b1", finished_at=datetime.now(UTC), **extra
    )


def test_write_replaces_atomically_and_leaves_no_temp_files(tmp_path):
    sink = LocalSink(tmp_path)
    sink.write("b/p/x.png", b"one", content_type="image/png", metadata={})
    sink.write("b/p/x.png", b"two", content_type="image/png", metadata={})
    assert sink.read("b/p/x.png") == b"two"
    assert sorted(p.name for p in (tmp_path / "b" / "p").iterdir()) == ["x.png"]


def test_create_never_overwrites(tmp_path):
    sink = LocalSink(tmp_path)
    assert sink.create("k.json", b"first", content_type="application/json") is True
    assert sink.create("k.json", b"second", content_type="application/json") is False
    assert sink.read("k.json") == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.json"]


def test_keys_cannot_escape_the_root(tmp_path):
    sink = LocalSink(tmp_path / "out")
    with pytest.raises(StorageError, match="escapes the output directory"):
        sink.write("../evil", b"x", content_type="text/plain", metadata={})


def test_list_read_exists_delete(tmp_path):
    sink = LocalSink(tmp_path)
    for key in ("b1/a/x.png", "b1/b/y.png", "b2/a/x.png"):
        sink.write(key, b"1", content_type="image/png", metadata={})
    assert list(sink.list("b1/")) == ["b1/a/x.png", "b1/b/y.png"]
    assert sink.exists("b2/a/x.png") and sink.read("nope") is None
    sink.delete("b2/a/x.png")
    sink.delete("b2/a/x.png")
    assert not sink.exists("b2/a/x.png")


def test_open_sink_accepts_paths_and_file_uris_and_refuses_gcs_for_now(tmp_path):
    assert isinstance(open_sink(str(tmp_path)), LocalSink)
    assert open_sink(tmp_path.as_uri()).root == tmp_path.resolve()
    with pytest.raises(StorageError, match="not supported yet"):
        open_sink("gs://bucket/prefix")


def _try_lock(root: str, queue) -> None:
    try:
        with LocalSink(root).lock("b1"):
            queue.put("acquired")
    except BatchLockedError as exc:
        queue.put(str(exc))


def test_one_run_per_batch_id_across_processes(tmp_path):
    sink = LocalSink(tmp_path)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    with sink.lock("b1"):
        proc = ctx.Process(target=_try_lock, args=(str(tmp_path), queue))
        proc.start()
        proc.join(60)
        assert "another run is working on batch 'b1'" in queue.get(timeout=5)
    proc = ctx.Process(target=_try_lock, args=(str(tmp_path), queue))
    proc.start()
    proc.join(60)
    assert queue.get(timeout=5) == "acquired"


def test_success_record_is_create_only_and_clears_the_failure(tmp_path):
    store = RecordStore(LocalSink(tmp_path), "b1")
    store.write_failure(_record("p1", "failed", error="503"))
    assert store.read("p1").status == "failed"
    first = store.write_success(_record("p1", cost_usd=0.1))
    again = store.write_success(_record("p1", cost_usd=0.2))
    assert again.cost_usd == first.cost_usd == 0.1
    assert store.read("p1").status == "succeeded"
    assert not (tmp_path / "b1" / "p1" / "_failure.json").exists()
    assert store.succeeded_ids() == {"p1"}


def test_manifest_is_rebuilt_in_prompt_order_with_resumed_flags(tmp_path):
    store = RecordStore(LocalSink(tmp_path), "b1")
    store.write_success(_record("b"))
    store.write_failure(_record("a", "blocked", error="safety"))
    store.write_success(_record("c"))
    records = store.write_manifest(["a", "b", "c", "missing"], resumed={"c"})
    lines = (tmp_path / "b1" / "manifest.jsonl").read_text().splitlines()
    assert [PromptRecord.model_validate_json(line).id for line in lines] == ["a", "b", "c"]
    assert [r.resumed for r in records] == [False, False, True]
    assert store.read("c").resumed is False  # the stored record itself is never rewritten
    assert store.manifest_uri.endswith("/b1/manifest.jsonl")
