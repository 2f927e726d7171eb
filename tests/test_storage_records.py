from __future__ import annotations

import multiprocessing
from datetime import UTC, datetime

import pytest

from imagebatch.errors import BatchLockedError, StorageError
from imagebatch.models import PromptRecord
from imagebatch.records import RecordStore
from imagebatch.storage import LocalSink, Sink, open_sink
from imagebatch.storage.gcs import GcsSink, storage_retry


@pytest.fixture(params=["local", "gcs"])
def sink(request, tmp_path) -> Sink:
    """Each contract test runs on the local sink and on the GCS sink (real emulator)."""
    if request.param == "local":
        return LocalSink(tmp_path / "out")
    bucket = request.getfixturevalue("gcs_bucket")
    return GcsSink(bucket, "some/prefix", retry=storage_retry(0.05, 0.2, 10))


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


def test_create_never_overwrites(sink):
    assert sink.create("k.json", b"first", content_type="application/json") is True
    assert sink.create("k.json", b"second", content_type="application/json") is False
    assert sink.read("k.json") == b"first"
    assert list(sink.list("")) == ["k.json"]


def test_keys_cannot_escape_the_root(tmp_path):
    sink = LocalSink(tmp_path / "out")
    with pytest.raises(StorageError, match="escapes the output directory"):
        sink.write("../evil", b"x", content_type="text/plain", metadata={})


def test_list_read_exists_delete(sink):
    for key in ("b1/a/x.png", "b1/b/y.png", "b2/a/x.png"):
        sink.write(key, b"1", content_type="image/png", metadata={})
    assert list(sink.list("b1/")) == ["b1/a/x.png", "b1/b/y.png"]
    assert sink.exists("b2/a/x.png") and sink.read("nope") is None
    sink.delete("b2/a/x.png")
    sink.delete("b2/a/x.png")
    assert not sink.exists("b2/a/x.png")


def test_copy_and_update(sink):
    sink.write("a/x.png", b"img", content_type="image/png", metadata={"sha256": "abc"})
    sink.copy("a/x.png", "b/x.png")
    assert sink.read("b/x.png") == b"img"
    sink.update("idx.json", lambda old: (old or b"") + b"1", content_type="application/json")
    sink.update("idx.json", lambda old: (old or b"") + b"2", content_type="application/json")
    assert sink.read("idx.json") == b"12"


def test_concurrent_updates_lose_nothing(sink):
    import concurrent.futures

    def add(i: int) -> None:
        sink.update(
            "counter.txt", lambda old: b"%d" % (int(old or b"0") + 1), content_type="text/plain"
        )

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(add, range(12)))
    assert sink.read("counter.txt") == b"12"


def test_open_sink_accepts_paths_file_and_gs_uris(tmp_path):
    assert isinstance(open_sink(str(tmp_path)), LocalSink)
    assert open_sink(tmp_path.as_uri()).root == tmp_path.resolve()
    gcs = open_sink("gs://bucket/some/prefix/")
    assert isinstance(gcs, GcsSink)
    assert gcs.uri("b/p/x.png") == "gs://bucket/some/prefix/b/p/x.png"
    with pytest.raises(StorageError, match="names no bucket"):
        open_sink("gs:///prefix")


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


def test_success_record_is_create_only_and_clears_the_failure(sink):
    store = RecordStore(sink, "b1")
    store.write_failure(_record("p1", "failed", error="503"))
    assert store.read("p1").status == "failed"
    first = store.write_success(_record("p1", cost_usd=0.1))
    again = store.write_success(_record("p1", cost_usd=0.2))
    assert again.cost_usd == first.cost_usd == 0.1
    assert store.read("p1").status == "succeeded"
    assert not sink.exists("b1/p1/_failure.json")
    assert store.succeeded_ids() == {"p1"}


def test_manifest_is_rebuilt_in_prompt_order_with_resumed_flags(sink):
    store = RecordStore(sink, "b1")
    store.write_success(_record("b"))
    store.write_failure(_record("a", "blocked", error="safety"))
    store.write_success(_record("c"))
    records = store.write_manifest(["a", "b", "c", "missing"], resumed={"c"})
    lines = sink.read("b1/manifest.jsonl").decode().splitlines()
    assert [PromptRecord.model_validate_json(line).id for line in lines] == ["a", "b", "c"]
    assert [r.resumed for r in records] == [False, False, True]
    assert store.read("c").resumed is False  # the stored record itself is never rewritten
    assert store.manifest_uri.endswith("/b1/manifest.jsonl")
