"""compare-providers on a real Prefect server, two providers of the emulator through real SDKs."""

from __future__ import annotations

import asyncio
import io
import json

import pytest
from PIL import Image

from imagebatch.compare import CELL_PX, HEADER_PX, LABEL_PX
from imagebatch.emulator import EmulatorProfile, EmulatorServer, ProviderProfile, ScriptedFault

pytestmark = pytest.mark.flow

CONFIG = """
providers:
  - name: primary
    kind: gemini
    model: gemini-3-pro-image-preview
    base_url: {url}/p/primary
    api_key_env: EMULATOR_KEY
    limits: {{rpm: 6000}}
    price_usd: {{1K: 0.134}}
    timeout_s: 10
  - name: backup
    kind: openai
    model: gpt-image-1.5
    base_url: {url}/p/backup
    api_key_env: EMULATOR_KEY
    limits: {{rpm: 6000}}
    price_usd: {{1K: 0.04}}
    timeout_s: 10
retry: {{base_delay_s: 0.05, max_delay_s: 0.1}}
renditions: [{{name: o, format: png}}]
"""


def test_contact_sheet_and_table_for_prompts_by_providers(tmp_path, prefect_server, monkeypatch):
    from imagebatch.flows.compare_providers import compare_providers

    monkeypatch.setenv("EMULATOR_KEY", "emulator-key")
    profile = EmulatorProfile(
        providers={
            # the primary's first answer is a 503: one retry, visible in the table
            "primary": ProviderProfile(script=[ScriptedFault(first=1, fault="overloaded")]),
            # the backup refuses one prompt
            "backup": ProviderProfile(safety_keywords=["forbidden"]),
        }
    )
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"id": i, "prompt": text}) + "\n"
            for i, text in [("mug", "a mug"), ("lamp", "a lamp"), ("odd", "a forbidden thing")]
        )
    )
    with EmulatorServer(profile) as server:
        config = tmp_path / "c.yaml"
        config.write_text(CONFIG.format(url=server.url))
        result = asyncio.run(
            compare_providers(
                prompts=str(prompts), config=str(config), output=str(tmp_path / "out")
            )
        )

    sheet = result["contact_sheet"]
    with Image.open(sheet.removeprefix("file://")) as im:
        # one row per prompt, one column per provider
        assert im.size == (LABEL_PX + 2 * CELL_PX, HEADER_PX + 3 * CELL_PX)
    table = {row["provider"]: row for row in result["table"]}
    assert (table["primary"]["succeeded"], table["primary"]["retries"]) == (3, 1)
    assert table["primary"]["cost_per_image_usd"] == 0.134
    assert (table["backup"]["succeeded"], table["backup"]["success_rate"]) == (2, 0.667)
    assert table["backup"]["cost_per_image_usd"] == 0.04
    assert table["primary"]["p50_latency_s"] is not None


def test_contact_sheet_marks_failures():
    from imagebatch.compare import Outcome, contact_sheet

    good = io.BytesIO()
    Image.linear_gradient("L").convert("RGB").save(good, format="PNG")
    png = contact_sheet(
        ["a"],
        ["p1", "p2"],
        [Outcome("a", "p1", image=good.getvalue()), Outcome("a", "p2", error="refused")],
    )
    with Image.open(io.BytesIO(png)) as im:
        im = im.convert("RGB")
        assert im.size == (LABEL_PX + 2 * CELL_PX, HEADER_PX + CELL_PX)
        # the failed cell is grey, the good one carries the picture
        assert im.getpixel((LABEL_PX + CELL_PX + 200, HEADER_PX + 200)) == (238, 238, 238)
        assert im.getpixel((LABEL_PX + 128, HEADER_PX + 200)) != (255, 255, 255)
