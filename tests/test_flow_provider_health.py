"""provider-health on a real Prefect server, probing the emulator through the real SDKs."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from imagebatch.emulator import EmulatorProfile, EmulatorServer, ProviderProfile
from imagebatch.resilience import FileHealthStore, usage_key
from imagebatch.settings import Settings

pytestmark = pytest.mark.flow

CONFIG = """
providers:
  - name: primary
    kind: gemini
    model: gemini-3-pro-image-preview
    base_url: {url}/p/primary
    api_key_env: EMULATOR_KEY
    price_usd: {{1K: 0.134}}
    timeout_s: 10
  - name: backup
    kind: openai
    model: gpt-image-1.5
    base_url: {url}/p/backup
    api_key_env: EMULATOR_KEY
    price_usd: {{1K: 0.04}}
    timeout_s: 10
  - name: retired
    kind: openai
    model: dall-e-2
    base_url: {url}/p/backup
    api_key_env: EMULATOR_KEY
  - name: costly
    kind: openai
    model: gpt-image-1.5
    base_url: {url}/p/backup
    api_key_env: EMULATOR_KEY
    health_probe_s: null
renditions: [{{name: o, format: png}}]
"""


def test_each_provider_is_probed_once_and_its_health_recorded(
    tmp_path, prefect_server, monkeypatch
):
    from imagebatch.flows.provider_health import provider_health

    monkeypatch.setenv("EMULATOR_KEY", "emulator-key")
    profile = EmulatorProfile(
        providers={
            "primary": ProviderProfile(outage=True),
            "backup": ProviderProfile(missing_models=["dall-e-2"]),
        }
    )
    with EmulatorServer(profile) as server:
        config = tmp_path / "c.yaml"
        config.write_text(CONFIG.format(url=server.url))
        states = asyncio.run(provider_health(config=str(config)))
        log = httpx.get(f"{server.url}/_emulator/log").json()
        assert states == {
            "primary": "overloaded",
            "backup": "healthy",
            "retired": "model_missing",
            "costly": "skipped",  # health_probe_s: null opts it out
        }
        # one request each, and none to the opted-out provider
        assert [(e["provider"], e["model"]) for e in log["requests"]] == [
            ("primary", "gemini-3-pro-image-preview"),
            ("backup", "gpt-image-1.5"),
            ("backup", "dall-e-2"),
        ]

        # recorded where the next batch starts from
        from imagebatch.config import load_config

        store = FileHealthStore(Settings().state_dir)
        providers = {p.name: p for p in load_config(config).providers}
        assert store.read(usage_key(providers["primary"])).state == "overloaded"
        assert store.read(usage_key(providers["backup"])).state == "healthy"

        # a second run within the interval sends nothing
        again = asyncio.run(provider_health(config=str(config)))
        assert set(again.values()) == {"skipped"}
        assert len(httpx.get(f"{server.url}/_emulator/log").json()["requests"]) == 3
