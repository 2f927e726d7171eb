"""What only the GCS sink does: retries through a faulty network, resumable uploads, the lease."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from urllib.parse import urlsplit

import httpx
import pytest

from imagebatch.errors import BatchLockedError, StorageError
from imagebatch.storage.gcs import GcsSink, storage_retry
from tests.gcs import FaultProxy

FAST = storage_retry(0.05, 0.2, 10)


def test_resumable_upload_survives_failed_chunks(gcs_server, gcs_bucket, monkeypatch):
    def fail(method: str, path: str, n: int) -> int | None:
        # every other chunk of the resumable upload fails once
        return 503 if method == "PUT" and "uploadType=resumable" in path and n % 2 == 0 else None

    proxy = FaultProxy(gcs_server.url, fail)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
    try:
        sink = GcsSink(gcs_bucket, "big", retry=FAST, resumable_threshold=256 * 1024)
        data = os.urandom(1024 * 1024 + 17)  # four full chunks and a bit
        sink.write("x.bin", data, content_type="application/octet-stream", metadata={"k": "v"})
        assert sink.read("x.bin") == data
    finally:
        proxy.close()
    puts = proxy.statuses("PUT", "uploadType=resumable")
    assert puts.count(503) >= 2 and 308 in puts  # chunks went through the proxy and were resent
    assert proxy.statuses("POST", "uploadType=resumable") == [200]  # one upload session


def test_a_call_that_keeps_failing_names_the_object(gcs_server, gcs_bucket, monkeypatch):
    proxy = FaultProxy(gcs_server.url, lambda method, path, n: 503)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
    try:
        sink = GcsSink(gcs_bucket, "p", retry=storage_retry(0.01, 0.05, 0.5))
        with pytest.raises(StorageError, match=rf"could not write gs://{gcs_bucket}/p/a/b.png"):
            sink.write("a/b.png", b"x", content_type="image/png", metadata={})
    finally:
        proxy.close()
    assert len(proxy.seen) > 2  # retried before giving up


def test_a_missing_bucket_is_a_clear_error(gcs_bucket):
    sink = GcsSink(gcs_bucket + "-nope", retry=FAST)
    with pytest.raises(StorageError, match=rf"gs://{gcs_bucket}-nope/k.json: NotFound"):
        sink.write("k.json", b"{}", content_type="application/json", metadata={})


def test_missing_credentials_say_what_to_do(monkeypatch, tmp_path):
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing-key.json"))
    with pytest.raises(StorageError, match="no Google Cloud credentials found: run `gcloud auth"):
        GcsSink("some-bucket").read("k")


def _take(sink: GcsSink) -> None:
    with sink.lock("b1"):
        pass


def _hold(bucket: str, ttl: float) -> subprocess.Popen:
    """Another process that takes the batch lease and waits for a line on stdin."""
    code = (
        "import sys\n"
        "from imagebatch.storage.gcs import GcsSink\n"
        f"with GcsSink({bucket!r}, 'out', lock_ttl_s={ttl}).lock('b1'):\n"
        "    print('held', flush=True)\n"
        "    sys.stdin.readline()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_the_lease_keeps_a_second_run_out_until_released(gcs_bucket):
    holder = _hold(gcs_bucket, ttl=120)
    sink = GcsSink(gcs_bucket, "out", retry=FAST)
    try:
        with pytest.raises(BatchLockedError, match="another run is working on batch 'b1'"):
            _take(sink)
    finally:
        holder.communicate("go\n", timeout=30)
    assert not sink.exists("b1/.lock")  # released on a clean exit
    with sink.lock("b1"):
        assert json.loads(sink.read("b1/.lock"))["pid"] == os.getpid()


def test_a_killed_holders_lease_is_taken_over_at_once_on_the_same_machine(gcs_bucket):
    holder = _hold(gcs_bucket, ttl=120)
    holder.kill()
    holder.wait(30)
    sink = GcsSink(gcs_bucket, "out", retry=FAST)
    assert json.loads(sink.read("b1/.lock"))["pid"] == holder.pid  # left behind
    with sink.lock("b1"):
        assert json.loads(sink.read("b1/.lock"))["pid"] == os.getpid()


def test_a_lease_from_another_machine_expires_after_its_ttl(gcs_bucket):
    sink = GcsSink(gcs_bucket, "out", retry=FAST, lock_ttl_s=60)
    other = {"owner": "x", "host": socket.gethostname() + "-other", "pid": 1}
    fresh = {**other, "heartbeat_at": time.time() - 30}
    sink.write("b1/.lock", json.dumps(fresh).encode(), content_type="application/json", metadata={})
    with pytest.raises(BatchLockedError, match="refreshed less than 60 s ago"):
        _take(sink)
    stale = {**other, "heartbeat_at": time.time() - 61}
    sink.write("b1/.lock", json.dumps(stale).encode(), content_type="application/json", metadata={})
    with sink.lock("b1"):
        assert json.loads(sink.read("b1/.lock"))["owner"] != "x"


def test_the_lease_is_refreshed_while_held(gcs_bucket):
    sink = GcsSink(gcs_bucket, "out", retry=FAST, lock_ttl_s=0.4)  # refreshed every 0.1 s
    with sink.lock("b1"):
        generations = {sink.bucket.get_blob(sink._name("b1/.lock")).generation}
        deadline = time.monotonic() + 20
        while len(generations) < 9:  # eight refreshes: over two ttls since it was taken
            assert time.monotonic() < deadline, "the lease was not refreshed"
            generations.add(sink.bucket.get_blob(sink._name("b1/.lock")).generation)
        # a second run still sees a live lease
        with pytest.raises(BatchLockedError):
            _take(GcsSink(gcs_bucket, "out", retry=FAST, lock_ttl_s=0.4))


def test_signed_urls_verify_expire_and_open_the_object(gcs_bucket):
    from cryptography.exceptions import InvalidSignature
    from google.cloud import storage

    from tests.gcs import signing_credentials, verify_v4_signed_url

    writer = GcsSink(gcs_bucket, "site", retry=FAST)
    writer.write("n1/mug/web image.webp", b"webp-bytes", content_type="image/webp", metadata={})
    credentials, public_key, pem = signing_credentials()
    client = storage.Client(project="test-project", credentials=credentials)
    sink = GcsSink(gcs_bucket, "site", client=client, retry=FAST)

    url = sink.signed_url(sink.uri("n1/mug/web image.webp"), 900)
    params = verify_v4_signed_url(url, public_key)
    assert params["X-Goog-Expires"] == "900"
    with pytest.raises(InvalidSignature):  # the check itself fails on a link someone extended
        verify_v4_signed_url(url.replace("X-Goog-Expires=900", "X-Goog-Expires=9000"), public_key)
    assert params["X-Goog-Credential"].startswith("signer@test-project.iam.gserviceaccount.com/")
    assert urlsplit(url).path == f"/{gcs_bucket}/site/n1/mug/web%20image.webp"
    assert "PRIVATE KEY" not in url and pem.splitlines()[1] not in url
    # the emulator checks no signature, but serves the object at the signed path
    assert httpx.get(url).content == b"webp-bytes"

    with pytest.raises(StorageError, match="is not an object of"):
        sink.signed_url("gs://another-bucket/x.png", 900)


def test_credentials_without_a_key_cannot_sign_and_say_what_to_do(gcs_bucket):
    sink = GcsSink(gcs_bucket, "site", retry=FAST)  # the emulator's anonymous credentials
    with pytest.raises(StorageError) as caught:
        sink.signed_url(sink.uri("n1/manifest.jsonl"), 900)
    message = str(caught.value)
    assert "cannot sign URLs" in message and "AnonymousCredentials" in message
    assert "service-account key" in message and "publish.signed_url_expiry_s" in message
