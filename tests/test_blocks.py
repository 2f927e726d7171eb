"""Provider blocks: Prefect's standard block checks, registration, and a batch that uses one."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import pytest
from prefect.testing.standard_test_suites import BlockStandardTestSuite

from imagebatch.batch import BatchRun
from imagebatch.blocks.providers import (
    BLOCK_TYPES,
    GeminiProviderBlock,
    OpenAIProviderBlock,
    StabilityProviderBlock,
    VertexEndpointProviderBlock,
    VertexGeminiProviderBlock,
)
from imagebatch.emulator import EmulatorProfile, EmulatorServer, ProviderProfile
from tests.conftest import ROOT


class _Offline(BlockStandardTestSuite):
    def test_has_a_valid_image(self, block) -> None:
        pytest.skip("Prefect's logo check downloads the logo URL; this machine has no internet")


class TestGeminiBlock(_Offline):
    @pytest.fixture
    def block(self):
        return GeminiProviderBlock


class TestVertexGeminiBlock(_Offline):
    @pytest.fixture
    def block(self):
        return VertexGeminiProviderBlock


class TestOpenAIBlock(_Offline):
    @pytest.fixture
    def block(self):
        return OpenAIProviderBlock


class TestStabilityBlock(_Offline):
    @pytest.fixture
    def block(self):
        return StabilityProviderBlock


class TestVertexEndpointBlock(_Offline):
    @pytest.fixture
    def block(self):
        return VertexEndpointProviderBlock


def test_block_becomes_a_chain_entry_with_its_key_kept_apart():
    block = OpenAIProviderBlock(
        model="gpt-image-1.5", api_key="sk-live", rpm=5, price_usd_1k=0.04, quality="high"
    )
    entry = block.to_provider_config("backup", api_key_env="VAR")
    assert (entry.kind, entry.model, entry.api_key_env, entry.limits.rpm) == (
        "openai",
        "gpt-image-1.5",
        "VAR",
        5,
    )
    assert entry.price_usd == {"1K": 0.04} and entry.options == {"quality": "high"}
    assert "sk-live" not in entry.model_dump_json()


@pytest.mark.flow
def test_registered_block_drives_a_batch_without_leaking_its_key(tmp_path, prefect_server):
    secret = "block-held-key-7f3a9c"
    registered = subprocess.run(
        [sys.executable, "-m", "prefect", "block", "register", "-m", "imagebatch.blocks.providers"],
        cwd=ROOT,
        env={**os.environ, "PREFECT_API_URL": prefect_server},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert registered.returncode == 0, registered.stderr
    for block_type in BLOCK_TYPES.values():
        assert block_type.get_block_type_name() in registered.stdout

    from imagebatch.flows.nightly_batch import nightly_batch

    profile = EmulatorProfile(providers={"primary": ProviderProfile(api_key=secret)})
    with EmulatorServer(profile) as server:
        GeminiProviderBlock(
            model="gemini-3-pro-image-preview",
            base_url=server.url,
            api_key=secret,
            price_usd_1k=0.134,
        ).save("night-primary", overwrite=True)
        config = tmp_path / "config.yaml"
        config.write_text(
            "providers:\n"
            "  - {name: primary, block: imagebatch-gemini/night-primary, timeout_s: 30}\n"
            "renditions: [{name: original, format: png}]\n"
        )
        prompts = tmp_path / "p.jsonl"
        prompts.write_text('{"id": "a", "prompt": "a cat"}\n{"id": "b", "prompt": "a dog"}\n')
        run = BatchRun(
            prompts=str(prompts), config=str(config), output=str(tmp_path / "out"), batch_id="blk"
        )
        state = asyncio.run(nightly_batch(run=run, return_state=True))

    assert state.name == "Completed", state.message
    manifest = (tmp_path / "out" / "blk" / "manifest.jsonl").read_text()
    records = [json.loads(line) for line in manifest.splitlines()]
    assert {(r["provider"], r["model"], r["cost_usd"]) for r in records} == {
        ("primary", "gemini-3-pro-image-preview", 0.134)
    }

    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    async def logs():
        async with get_client() as client:
            return await client.read_logs(
                log_filter=LogFilter(
                    flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])
                )
            )

    deadline = time.monotonic() + 30
    messages = [x.message for x in asyncio.run(logs())]
    while not any("completed" in m for m in messages) and time.monotonic() < deadline:
        time.sleep(0.2)
        messages = [x.message for x in asyncio.run(logs())]
    assert any("batch blk completed" in m for m in messages)
    on_disk = "".join(p.read_text(errors="ignore") for p in (tmp_path / "out").rglob("*.json*"))
    assert secret not in on_disk + "\n".join(messages)


@pytest.mark.flow
def test_missing_block_fails_the_batch_naming_the_key(tmp_path, prefect_server):
    from imagebatch.flows.nightly_batch import nightly_batch

    config = tmp_path / "config.yaml"
    config.write_text(
        "providers: [{name: primary, block: imagebatch-gemini/no-such-block}]\n"
        "renditions: [{name: original, format: png}]\n"
    )
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a cat"}\n')
    run = BatchRun(prompts=str(prompts), config=str(config), output=str(tmp_path / "out"))
    state = asyncio.run(nightly_batch(run=run, return_state=True))
    assert state.is_failed()
    error = str(state.result(raise_on_failure=False))
    assert "key 'providers[0].block'" in error and "no saved block" in error
    assert not (tmp_path / "out").exists()


@pytest.mark.flow
def test_limits_sync_and_plan_read_the_saved_block_as_a_run_does(tmp_path, prefect_server):
    """Both commands name the limits and the model the flow will use, not the unfilled entry."""
    GeminiProviderBlock(
        model="gemini-block-model",
        base_url="http://127.0.0.1:9",
        api_key="block-key-sync-5d1e",
        price_usd_1k=0.05,
        rpm=12,
        max_in_flight=3,
    ).save("sync-primary", overwrite=True)
    config = tmp_path / "config.yaml"
    config.write_text(
        "providers: [{name: primary, block: imagebatch-gemini/sync-primary}]\n"
        "renditions: [{name: original, format: png}]\n"
        "shared_limits: true\n"
    )
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"p {i}"}) + "\n" for i in range(24)))
    cli = [sys.executable, "-m", "imagebatch.cli"]
    env = {**os.environ, "PREFECT_API_URL": prefect_server}

    def run(*args: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*cli, *args], env={**env, **extra}, capture_output=True, text=True, timeout=120
        )

    sync = run("limits", "sync", "--config", str(config))
    assert sync.returncode == 0, sync.stderr
    names = [line.split()[1] for line in sync.stdout.splitlines()]
    assert names == [
        "imagebatch-primary-gemini-gemini-block-model-in-flight",
        "imagebatch-primary-gemini-gemini-block-model-rpm",
    ]
    assert "limit 3" in sync.stdout  # the block's own max_in_flight

    from imagebatch.config import load_config
    from imagebatch.tasks.limits import check_shared_limits

    async def the_flow_finds_them():
        from imagebatch.blocks.providers import resolve_provider_blocks

        resolved, _ = await resolve_provider_blocks(load_config(config))
        return await check_shared_limits(resolved, 1.0, str(config))

    assert asyncio.run(the_flow_finds_them()) is not None

    plan = run("plan", str(prompts), "--config", str(config))
    assert plan.returncode == 0, plan.stderr
    assert plan.stdout.splitlines()[0].startswith("24 prompts: about")
    assert "gemini-block-model" in plan.stdout and "in flight" in plan.stdout  # its cap of 3
    assert "block-key-sync-5d1e" not in sync.stdout + sync.stderr + plan.stdout + plan.stderr

    missing = tmp_path / "missing.yaml"
    missing.write_text(
        "providers: [{name: primary, block: imagebatch-gemini/no-such-block}]\n"
        "renditions: [{name: original, format: png}]\n"
    )
    for args in (("plan", str(prompts)), ("limits", "sync")):
        refused = run(*args, "--config", str(missing))
        assert refused.returncode == 2, refused.stdout
        assert "key 'providers[0].block'" in refused.stderr
        assert "no saved block 'imagebatch-gemini/no-such-block'" in refused.stderr
        assert "Traceback" not in refused.stderr


def test_plan_of_a_block_config_without_a_server_says_what_to_set(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        "providers: [{name: primary, block: imagebatch-gemini/night-primary}]\n"
        "renditions: [{name: original, format: png}]\n"
    )
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a cat"}\n')
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")  # no profile with a server either
    result = subprocess.run(
        [sys.executable, "-m", "imagebatch.cli", "plan", str(prompts), "--config", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "error: no Prefect server: the config names saved blocks" in result.stderr
    assert "set PREFECT_API_URL" in result.stderr and "Traceback" not in result.stderr


def test_an_unread_block_entry_is_refused_by_the_plan_and_the_limits():
    from imagebatch.config import parse_config
    from imagebatch.errors import ConfigError
    from imagebatch.plan import plan_batch
    from imagebatch.resilience import shared_limit_specs

    config = parse_config(
        "providers: [{name: primary, block: imagebatch-gemini/x}]\n"
        "renditions: [{name: o, format: png}]\n",
        source="c.yaml",
    )
    for call in (lambda: plan_batch([], config), lambda: shared_limit_specs(config)):
        with pytest.raises(ConfigError, match=r"providers\[0\]\.block.*was not read"):
            call()
