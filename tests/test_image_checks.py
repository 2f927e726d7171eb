"""What providers really send back, checked inside the attempt: real SDKs against the emulator."""

from __future__ import annotations

import asyncio
import io
import json
import time

import pytest
from PIL import Image

from imagebatch.batch import BatchRun
from imagebatch.config import parse_config
from imagebatch.emulator import EmulatorProfile, EmulatorServer, ProviderProfile, ScriptedFault
from imagebatch.errors import BadImage, BlankImage
from imagebatch.models import Prompt
from imagebatch.resilience import MemoryUsageStore
from imagebatch.runtime import BatchRuntime, is_retryable
from imagebatch.storage import LocalSink

MODELS = {"gemini": "gemini-3-pro-image-preview", "openai": "gpt-image-1.5", "stability": "sd3"}

ONE_PROVIDER = """
providers:
  - name: primary
    kind: {kind}
    model: {model}
    base_url: {url}
    api_key_env: EMULATOR_KEY
    timeout_s: 10
renditions: [{{name: original, format: png}}]
"""

BAD_IMAGES = {
    "corrupt": (BadImage, "do not decode as an image"),
    "truncated": (BadImage, "do not decode as an image"),
    "bomb": (BadImage, "too large to decode safely"),
    "wrong_aspect": (BadImage, "off the requested aspect ratio"),
    "blank": (BlankImage, "blank or near-uniform"),
}


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("fault", sorted(BAD_IMAGES))
def test_bad_images_fail_the_attempt_with_a_clear_reason(kind, fault, tmp_path):
    profile = EmulatorProfile(
        providers={"primary": ProviderProfile(script=[ScriptedFault(first=1, fault=fault)])}
    )
    cls, reason = BAD_IMAGES[fault]
    with EmulatorServer(profile) as server:
        text = ONE_PROVIDER.format(kind=kind, model=MODELS[kind], url=server.url)
        runtime = BatchRuntime(
            parse_config(text, source="t"),
            LocalSink(tmp_path),
            "b1",
            env={"EMULATOR_KEY": "k"},
            store=MemoryUsageStore(),
        )
        prompt = Prompt(id="p1", prompt="a red mug", aspect_ratio="16:9")

        async def attempt():
            try:
                return await runtime.generate(prompt)
            finally:
                await runtime.aclose()

        with pytest.raises(cls, match=reason) as caught:
            asyncio.run(attempt())
        record = asyncio.run(runtime.record_failure(prompt, caught.value))
    # a bad image is worth another try; a blank one is the provider refusing the content
    assert is_retryable(caught.value) is (cls is BadImage)
    assert record.status == ("blocked" if cls is BlankImage else "failed")
    assert reason in record.error and "primary" in record.error
    assert [(a.provider, a.outcome) for a in record.attempts] == [("primary", cls.__name__)]


CHAIN = """
providers:
  - name: primary
    kind: gemini
    model: gemini-3-pro-image-preview
    base_url: {url}/p/primary
    api_key_env: EMULATOR_KEY
    limits: {{rpm: 6000}}
    timeout_s: 10
  - name: backup
    kind: openai
    model: gpt-image-1.5
    base_url: {url}/p/backup
    api_key_env: EMULATOR_KEY
    limits: {{rpm: 6000}}
    timeout_s: 10
routing: {{move_prompt_after: 2}}
retry: {{max_attempts: 4, base_delay_s: 0.05, max_delay_s: 0.1}}
renditions: [{{name: original, format: png}}]
"""


@pytest.mark.flow
def test_bad_images_are_retried_and_move_the_prompt_to_the_backup(
    tmp_path, prefect_server, monkeypatch
):
    """Two off-shape images from the primary: the third attempt goes to the backup, whose 3:2
    answer to a 16:9 prompt (its nearest size) passes and is cropped to 16:9."""
    from imagebatch.flows.nightly_batch import nightly_batch

    monkeypatch.setenv("EMULATOR_KEY", "emulator-key")
    profile = EmulatorProfile(
        providers={
            "primary": ProviderProfile(
                script=[
                    ScriptedFault(first=1, fault="wrong_aspect"),
                    ScriptedFault(first=2, fault="truncated"),
                    ScriptedFault(first=3, fault="blank"),
                ]
            ),
            "backup": ProviderProfile(),
        }
    )
    with EmulatorServer(profile) as server:
        (tmp_path / "c.yaml").write_text(CHAIN.format(url=server.url))
        (tmp_path / "p.jsonl").write_text(
            json.dumps({"id": "shoe", "prompt": "a shoe", "aspect_ratio": "16:9"}) + "\n"
        )

        def run(batch_id: str):
            params = BatchRun(
                prompts=str(tmp_path / "p.jsonl"),
                config=str(tmp_path / "c.yaml"),
                output=str(tmp_path / "out"),
                batch_id=batch_id,
            )
            state = asyncio.run(nightly_batch(run=params, return_state=True))
            manifest = tmp_path / "out" / batch_id / "manifest.jsonl"
            return state, json.loads(manifest.read_text())

        state, record = run("bad-1")
        assert state.is_completed()
        assert [(a["provider"], a["outcome"]) for a in record["attempts"]] == [
            ("primary", "BadImage"),
            ("primary", "BadImage"),
            ("backup", "ok"),
        ]
        first, second, _ = record["attempts"]
        assert "256x256, 44% off the requested aspect ratio 16:9" in first["error"]
        assert "do not decode as an image" in second["error"]
        assert record["provider"] == "backup" and record["status"] == "succeeded"
        with Image.open(io.BytesIO((tmp_path / "out/bad-1/shoe/original.png").read_bytes())) as im:
            assert im.width / im.height == pytest.approx(16 / 9, rel=0.01)

        # the primary's next answer is a black image: the prompt ends blocked, with the reason
        state, record = run("bad-2")
        assert record["status"] == "blocked" and record["provider"] == "primary"
        assert "blank or near-uniform" in record["error"]
        # a blocked prompt does not fail a batch, but a night that published nothing does
        assert state.is_failed()
        assert "nothing published: every image came back blank" in state.message
        # its generate task run is the provider's answer, not a fault: Completed, "Blocked"
        generated = asyncio.run(_task_run_state(state.state_details.flow_run_id, "generate-shoe"))
        assert (generated.type.value, generated.name) == ("COMPLETED", "Blocked")
        assert "blank or near-uniform" in (generated.message or "")


async def _task_run_state(flow_run_id, name: str, wait_s: float = 30.0):
    """The final state of the flow run's task run ``name`` (the server records it a little
    after the flow returns: asked again until it is final, within ``wait_s``)."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
        TaskRunFilterName,
    )

    deadline = time.monotonic() + wait_s
    async with get_client() as client:
        while True:
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=[name])),
            )
            if runs and runs[0].state is not None and runs[0].state.is_final():
                return runs[0].state
            assert time.monotonic() < deadline, f"no final state for {name}: {runs}"
            await asyncio.sleep(0.5)
