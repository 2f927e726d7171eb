"""Crash and resume for real: SIGKILL a batch publishing to GCS, then rerun it as the same batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from imagebatch.emulator import EmulatorProfile, EmulatorServer, ProviderProfile
from imagebatch.storage.gcs import GcsSink, storage_retry

pytestmark = pytest.mark.flow

PROMPTS = 30
IN_FLIGHT = 4
KILL_AFTER = 8  # success records in the bucket when the batch is killed

CONFIG = """
providers:
  - name: primary
    kind: gemini
    model: gemini-3-pro-image-preview
    base_url: {url}/p/primary
    api_key_env: EMULATOR_KEY
    limits: {{rpm: 6000, max_in_flight: {in_flight}}}
    price_usd: {{1K: 0.134}}
    timeout_s: 30
renditions:
  - {{name: original, format: png}}
  - {{name: thumb, format: jpeg, max_px: 64}}
max_in_flight: {in_flight}
"""


def _requested(server: EmulatorServer, since: int = 0) -> list[str]:
    """The prompt texts the provider was asked to draw, in order, from the emulator's log."""
    log = httpx.get(f"{server.url}/_emulator/log").json()["requests"]
    return [entry["prompt"] for entry in log[since:]]


def _successes(sink: GcsSink, batch_id: str) -> dict[str, int]:
    """Prompt id -> generation of its success record, straight from the bucket."""
    prefix = f"{sink.prefix}/{batch_id}/"
    return {
        blob.name.split("/")[-2]: blob.generation
        for blob in sink.bucket.client.list_blobs(sink.bucket, prefix=prefix)
        if blob.name.endswith("/_success.json")
    }


def test_sigkill_mid_batch_then_rerun_generates_only_what_was_in_flight(
    tmp_path, prefect_server, gcs_bucket, monkeypatch
):
    monkeypatch.setenv("EMULATOR_KEY", "emulator-key")
    texts = {f"p{i:02d}": f"prompt number {i:02d}" for i in range(PROMPTS)}
    (tmp_path / "p.jsonl").write_text(
        "".join(json.dumps({"id": k, "prompt": v}) + "\n" for k, v in texts.items())
    )
    sink = GcsSink(gcs_bucket, "shop", retry=storage_retry(0.05, 0.2, 10))
    # each call takes ~1 s, longer than publishing, so several are in flight at the kill
    profile = EmulatorProfile(
        providers={"primary": ProviderProfile(latency_median_s=1.0, latency_p99_s=2.0)}
    )
    with EmulatorServer(profile) as server:
        (tmp_path / "c.yaml").write_text(CONFIG.format(url=server.url, in_flight=IN_FLIGHT))
        command = [
            sys.executable, "-m", "imagebatch.cli", "run", "p.jsonl",
            "--config", "c.yaml", "--output", sink.uri(), "--batch-id", "crash-1", "--quiet",
        ]  # fmt: skip
        env = {**os.environ, "PREFECT_API_URL": prefect_server}

        victim = subprocess.Popen(
            command,
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / "victim.log", "wb"),  # noqa: SIM115 - closed with the process
            start_new_session=True,
        )
        deadline = time.monotonic() + 180
        while len(_successes(sink, "crash-1")) < KILL_AFTER:
            assert victim.poll() is None, (tmp_path / "victim.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the batch never published 8 prompts"
            time.sleep(0.02)  # polling the bucket, not waiting for time to pass
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(30)
        assert victim.returncode == -signal.SIGKILL

        done_at_kill = _successes(sink, "crash-1")
        first_run = _requested(server)
        assert KILL_AFTER <= len(done_at_kill) < PROMPTS
        assert not sink.exists("crash-1/manifest.jsonl")  # it really died mid-batch

        rerun = subprocess.run(
            command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        second_run = _requested(server, since=len(first_run))

    assert f"resumed {len(done_at_kill)}" in rerun.stdout
    done_texts = {texts[p] for p in done_at_kill}
    # nothing that had its success record was generated again ...
    assert not done_texts & set(second_run)
    # ... only the prompts in flight at the kill were, and never more than the in-flight limit
    again = set(first_run) & set(second_run)
    assert again == set(first_run) - done_texts
    assert len(again) <= IN_FLIGHT
    assert len(second_run) == len(set(second_run)) == PROMPTS - len(done_at_kill)

    # every prompt published once: the old records untouched, one record for each of the rest
    final = _successes(sink, "crash-1")
    assert set(final) == set(texts)
    assert {p: final[p] for p in done_at_kill} == done_at_kill
    manifest = [json.loads(x) for x in sink.read("crash-1/manifest.jsonl").decode().splitlines()]
    assert [r["id"] for r in manifest] == list(texts)
    assert {r["status"] for r in manifest} == {"succeeded"}
    assert {r["id"] for r in manifest if r["resumed"]} == set(done_at_kill)
    for record in manifest:
        for obj in record["objects"]:
            assert sink.exists(obj["uri"].removeprefix(sink.uri() + "/"))
