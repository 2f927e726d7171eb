"""The nightly flow publishing to GCS: a real GCS emulator and a real Prefect server."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from imagebatch.batch import BatchRun
from imagebatch.emulator import EmulatorProfile, EmulatorServer, ProviderProfile
from imagebatch.storage.gcs import GcsSink, storage_retry
from tests.gcs import RESET, FaultProxy

pytestmark = pytest.mark.flow

GEMINI_CONFIG = """
providers:
  - name: primary
    kind: gemini
    model: gemini-3-pro-image-preview
    base_url: {url}/p/primary
    api_key_env: EMULATOR_KEY
    limits: {{rpm: 6000, max_in_flight: 8}}
    price_usd: {{1K: 0.134}}
    timeout_s: 10
renditions:
  - {{name: original, format: png}}
  - {{name: thumb, format: jpeg, max_px: 64}}
{extra}
"""


def _write_prompts(path: Path, prompts: dict[str, dict]) -> str:
    path.write_text("".join(json.dumps({"id": k, **v}) + "\n" for k, v in prompts.items()))
    return str(path)


def _run(**params):
    from imagebatch.flows.nightly_batch import nightly_batch

    return asyncio.run(nightly_batch(run=BatchRun(**params), return_state=True))


def _manifest(sink: GcsSink, batch_id: str) -> list[dict]:
    data = sink.read(f"{batch_id}/manifest.jsonl")
    assert data is not None, f"no manifest for {batch_id}"
    return [json.loads(line) for line in data.decode().splitlines()]


def _key(sink: GcsSink, uri: str) -> str:
    prefix = sink.uri() + "/"
    assert uri.startswith(prefix), uri
    return uri[len(prefix) :]


@pytest.fixture
def sink(gcs_bucket) -> GcsSink:
    return GcsSink(gcs_bucket, "nightly", retry=storage_retry(0.05, 0.2, 10))


def test_batch_publishes_images_with_metadata_and_create_only_records(
    tmp_path, prefect_server, sink
):
    prompts = _write_prompts(
        tmp_path / "p.jsonl",
        {"mug": {"prompt": "a mug", "aspect_ratio": "16:9"}, "lamp": {"prompt": "a lamp"}},
    )
    state = _run(prompts=prompts, output=sink.uri(), batch_id="gcs-1")
    assert state.is_completed() and state.name == "Completed"
    records = _manifest(sink, "gcs-1")
    assert [(r["id"], r["status"]) for r in records] == [
        ("mug", "succeeded"),
        ("lamp", "succeeded"),
    ]
    for record in records:
        assert {o["rendition"] for o in record["objects"]} == {"original", "web", "thumb"}
        for obj in record["objects"]:
            blob = sink.bucket.get_blob(sink._name(_key(sink, obj["uri"])))
            data = blob.download_as_bytes()
            assert blob.content_type == obj["content_type"]
            assert blob.cache_control == "public, max-age=86400"
            assert blob.metadata == {
                "prompt_id": record["id"],
                "provider": "local",
                "model": "local-render-v1",
                "sha256": obj["sha256"],
            }
            assert hashlib.sha256(data).hexdigest() == obj["sha256"] and len(data) == obj["bytes"]
        success = sink.bucket.get_blob(sink._name(f"gcs-1/{record['id']}/_success.json"))
        assert success.cache_control == "no-cache"

    # the success record cannot be overwritten, by the sink or by a rerun of the batch
    key = "gcs-1/mug/_success.json"
    generation = sink.bucket.get_blob(sink._name(key)).generation
    assert sink.create(key, b'{"forged": true}', content_type="application/json") is False
    again = _run(prompts=prompts, output=sink.uri(), batch_id="gcs-1")
    assert again.is_completed()
    assert again.result().resumed == 2
    summary = json.loads(sink.read("gcs-1/summary.json"))
    assert (summary["succeeded"], summary["resumed"], summary["outcome"]) == (2, 2, "completed")
    assert sink.bucket.get_blob(sink._name(key)).generation == generation
    assert json.loads(sink.read(key))["id"] == "mug"


def test_latest_index_after_two_batches_points_at_the_second(tmp_path, prefect_server, sink):
    prompts = _write_prompts(
        tmp_path / "p.jsonl", {"mug": {"prompt": "a mug"}, "lamp": {"prompt": "a lamp"}}
    )
    assert _run(prompts=prompts, output=sink.uri(), batch_id="night-1").is_completed()
    first = json.loads(sink.read("latest.json"))["prompts"]
    assert {p: e["batch_id"] for p, e in first.items()} == {"mug": "night-1", "lamp": "night-1"}

    only_mug = _write_prompts(tmp_path / "mug.jsonl", {"mug": {"prompt": "a mug"}})
    assert _run(prompts=only_mug, output=sink.uri(), batch_id="night-2").is_completed()
    latest = json.loads(sink.read("latest.json"))["prompts"]
    assert latest["mug"]["batch_id"] == "night-2"
    assert latest["lamp"] == first["lamp"]  # a prompt not in the second batch keeps its images
    web = latest["mug"]["renditions"]["web"]
    assert web["uri"] == sink.uri("night-2/mug/web.webp")
    assert sink.exists("night-2/mug/web.webp")

    # a rerun of the older night does not take the index back
    assert _run(prompts=prompts, output=sink.uri(), batch_id="night-1").is_completed()
    assert json.loads(sink.read("latest.json"))["prompts"]["mug"]["batch_id"] == "night-2"


def test_seeded_prompts_reuse_what_an_earlier_night_published(
    tmp_path, prefect_server, sink, monkeypatch
):
    monkeypatch.setenv("EMULATOR_KEY", "emulator-key")
    prompts = _write_prompts(
        tmp_path / "p.jsonl",
        {
            "mug": {"prompt": "a mug", "seed": 1},
            "lamp": {"prompt": "a lamp", "seed": 2},
            "vase": {"prompt": "a vase"},  # no seed: a new image every night
        },
    )
    with EmulatorServer(EmulatorProfile(providers={"primary": ProviderProfile()})) as server:
        config = tmp_path / "config.yaml"
        config.write_text(GEMINI_CONFIG.format(url=server.url, extra=""))

        def requests() -> int:
            return len(httpx.get(f"{server.url}/_emulator/log").json()["requests"])

        assert _run(prompts=prompts, config=str(config), output=sink.uri(), batch_id="n1")
        assert requests() == 3
        state = _run(prompts=prompts, config=str(config), output=sink.uri(), batch_id="n2")
        assert requests() == 4  # only the unseeded vase was generated again
        summary = state.result()
        assert (summary.reused, summary.succeeded, summary.cost_usd) == (2, 3, 0.134)
        assert "2 reused" in summary.message

        first = {r["id"]: r for r in _manifest(sink, "n1")}
        second = {r["id"]: r for r in _manifest(sink, "n2")}
        for prompt_id in ("mug", "lamp"):
            reused = second[prompt_id]
            assert reused["reused_from"] == sink.uri(f"n1/{prompt_id}/_success.json")
            assert reused["cost_usd"] == 0 and reused["attempts"] == []
            for obj, old in zip(reused["objects"], first[prompt_id]["objects"], strict=True):
                assert obj["uri"].startswith(sink.uri() + "/n2/")  # a copy: n1 may be deleted
                assert obj["sha256"] == old["sha256"]
                assert (
                    hashlib.sha256(sink.read(_key(sink, obj["uri"]))).hexdigest() == (obj["sha256"])
                )
        assert second["vase"]["reused_from"] is None

        # a changed seed, or reuse turned off, generates again
        changed = _write_prompts(tmp_path / "c.jsonl", {"mug": {"prompt": "a mug", "seed": 9}})
        _run(prompts=changed, config=str(config), output=sink.uri(), batch_id="n3")
        assert requests() == 5
        config.write_text(GEMINI_CONFIG.format(url=server.url, extra="publish: {reuse: never}"))
        _run(prompts=prompts, config=str(config), output=sink.uri(), batch_id="n4")
        assert requests() == 8


def test_transient_storage_errors_are_retried_and_the_batch_completes(
    tmp_path, prefect_server, gcs_server, gcs_bucket, monkeypatch
):
    def fail(method: str, path: str, n: int) -> int | None:
        if method == "POST" and path.startswith("/upload/") and n % 3 == 0:
            return 503
        if method == "GET" and "/download/" in path and n % 7 == 0:
            return 429
        if n % 11 == 0:
            return RESET
        return None

    proxy = FaultProxy(gcs_server.url, fail)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
    try:
        prompts = _write_prompts(
            tmp_path / "p.jsonl", {f"p{i}": {"prompt": f"prompt {i}"} for i in range(6)}
        )
        state = _run(prompts=prompts, output=f"gs://{gcs_bucket}/out", batch_id="flaky")
    finally:
        proxy.close()
    assert state.is_completed() and state.name == "Completed"
    uploads = proxy.statuses("POST", "/upload/")
    assert uploads.count(503) >= 5 and uploads.count(200) >= 6 * 4
    assert RESET in [s.status for s in proxy.seen]
    direct = GcsSink(gcs_bucket, "out")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server.url)
    records = _manifest(direct, "flaky")
    assert {r["status"] for r in records} == {"succeeded"} and len(records) == 6
    for record in records:
        for obj in record["objects"]:
            data = direct.read(_key(direct, obj["uri"]))
            assert data is not None and hashlib.sha256(data).hexdigest() == obj["sha256"]


def test_a_saved_gcs_bucket_block_is_a_publish_target(
    tmp_path, prefect_server, gcs_bucket, monkeypatch
):
    from google.auth.credentials import AnonymousCredentials
    from prefect_gcp import GcpCredentials
    from prefect_gcp.cloud_storage import GcsBucket

    # the emulator takes no real credentials; everything else is prefect-gcp's own code path
    monkeypatch.setattr(
        GcpCredentials, "get_credentials_from_service_account", lambda self: AnonymousCredentials()
    )
    block = GcsBucket(
        bucket=gcs_bucket,
        bucket_folder="site/images",
        gcp_credentials=GcpCredentials(project="test-project"),
    )
    block.save("nightly-images", overwrite=True)
    prompts = _write_prompts(tmp_path / "p.jsonl", {"mug": {"prompt": "a mug"}})
    state = _run(prompts=prompts, gcs_block="nightly-images", batch_id="blk-1")
    assert state.is_completed()
    sink = GcsSink(gcs_bucket, "site/images")
    (record,) = _manifest(sink, "blk-1")
    assert record["objects"][0]["uri"].startswith(f"gs://{gcs_bucket}/site/images/blk-1/mug/")
    assert sink.exists("latest.json")

    missing = _run(prompts=prompts, gcs_block="no-such-block", batch_id="blk-2")
    assert missing.is_failed()
    assert "no GcsBucket block named 'no-such-block'" in str(missing.result(raise_on_failure=False))


SIGNED_CONFIG = """
providers:
  - {name: primary, kind: local, model: local-render-v1, options: {render_px: 64}}
renditions:
  - {name: original, format: png}
publish: {signed_url_expiry_s: 900}
"""


async def _report(flow_run_id) -> str:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async with get_client() as client:
        found = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return next((a.data for a in found if a.key == "imagebatch-report"), "")


def _poll_report(state) -> str:
    import time

    deadline = time.monotonic() + 60
    while not (text := asyncio.run(_report(state.state_details.flow_run_id))):
        assert time.monotonic() < deadline, "no imagebatch-report artifact"
        time.sleep(0.2)
    return text


def test_report_links_are_signed_urls_only_when_configured_and_possible(
    tmp_path, prefect_server, gcs_bucket, monkeypatch
):
    import re

    from prefect_gcp import GcpCredentials
    from prefect_gcp.cloud_storage import GcsBucket

    from tests.gcs import signing_credentials, verify_v4_signed_url

    credentials, public_key, pem = signing_credentials()
    # a service account's key, as a block holds it; its token is never fetched (the emulator)
    monkeypatch.setattr(
        GcpCredentials, "get_credentials_from_service_account", lambda self: credentials
    )
    GcsBucket(
        bucket=gcs_bucket,
        bucket_folder="site",
        gcp_credentials=GcpCredentials(project="test-project"),
    ).save("signed-images", overwrite=True)
    config = tmp_path / "config.yaml"
    config.write_text(SIGNED_CONFIG)
    prompts = _write_prompts(tmp_path / "p.jsonl", {"mug": {"prompt": "a mug"}})

    state = _run(prompts=prompts, config=str(config), gcs_block="signed-images", batch_id="s-1")
    assert state.is_completed()
    report = _poll_report(state)
    assert "Links are signed URLs valid until" in report
    links = re.findall(r"\]\((http://[^)]+)\)", report)
    paths = {urlsplit(u).path for u in links}
    assert f"/{gcs_bucket}/site/s-1/manifest.jsonl" in paths
    assert f"/{gcs_bucket}/site/s-1/mug/original.png" in paths
    # the contact sheet has a web address: the report shows it (until the link expires)
    assert f"/{gcs_bucket}/site/s-1/contact-sheet.png" in paths
    assert "![contact sheet of s-1](http://" in report
    for url in links:
        assert verify_v4_signed_url(url, public_key)["X-Goog-Expires"] == "900"
    assert pem.splitlines()[1] not in report

    # the emulator's anonymous credentials cannot sign: the batch still completes, the report
    # says why and links the console
    anonymous = _run(
        prompts=prompts, config=str(config), output=f"gs://{gcs_bucket}/plain", batch_id="s-2"
    )
    assert anonymous.is_completed()
    report = _poll_report(anonymous)
    assert "Signed links were not made: cannot sign URLs" in report
    assert "X-Goog-Signature" not in report
    console = "https://console.cloud.google.com/storage/browser/_details"
    assert f"({console}/{gcs_bucket}/plain/s-2/manifest.jsonl)" in report
    assert f"[contact-sheet.png]({console}/{gcs_bucket}/plain/s-2/contact-sheet.png)" in report
