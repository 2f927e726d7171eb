"""Plan before paying: the estimate for known quotas, the CLI, and a dry run of the flow."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from datetime import UTC, datetime

import pytest

from imagebatch.config import parse_config
from imagebatch.models import Prompt
from imagebatch.plan import plan_batch
from tests.test_flow_nightly_batch import _poll

CHAIN = """
providers:
  - name: primary
    kind: gemini
    model: gemini-3-pro-image-preview
    limits: {{rpm: 10, rpd: {rpd}, max_in_flight: 16, latency_s: 60}}
    price_usd: {{1K: 0.134, 4K: 0.24}}
  - name: backup
    kind: openai
    model: gpt-image-1.5
    limits: {{rpm: 5, max_in_flight: 2, latency_s: 60}}
    price_usd: {{1K: 0.04}}
renditions: [{{name: o, format: png}}]
{extra}
"""


def _prompts(n: int, **fields) -> list[Prompt]:
    return [Prompt(id=f"p{i}", prompt=f"prompt {i}", **fields) for i in range(n)]


def test_estimate_for_a_known_quota():
    plan = plan_batch(_prompts(95), parse_config(CHAIN.format(rpd=1000, extra=""), source="t"))
    (primary,) = plan.providers
    # 10 RPM less the 5% margin is 9.5 images a minute: 95 prompts take 10 min, plus one call
    assert (primary.prompts, primary.per_minute, primary.bound_by) == (95, 9.5, "quota")
    assert primary.minutes == pytest.approx(11.0)
    assert plan.cost_usd == pytest.approx(95 * 0.134)
    assert plan.feasible and plan.warnings == []


def test_daily_allowance_overflow_goes_to_the_backup_and_in_flight_can_bind():
    plan = plan_batch(_prompts(30), parse_config(CHAIN.format(rpd=20, extra=""), source="t"))
    primary, backup = plan.providers
    assert (primary.prompts, backup.prompts) == (20, 10)
    # the backup's 5 RPM would allow 4.75/min, but 2 calls of 60 s in flight give only 2/min
    assert (backup.per_minute, backup.bound_by) == (2.0, "in flight")
    assert plan.minutes == pytest.approx(10 / 2 + 1)
    assert plan.cost_usd == pytest.approx(20 * 0.134 + 10 * 0.04)


def test_with_spill_over_each_provider_gets_a_share_that_ends_at_the_same_time():
    extra = "routing: {spill_over_s: 60}"
    plan = plan_batch(_prompts(115), parse_config(CHAIN.format(rpd=1000, extra=extra), source="t"))
    primary, backup = plan.providers
    # 9.5/min on the primary, 2/min on the backup (in flight binds): 95 + 20 in 10 min each
    assert (primary.prompts, backup.prompts) == (95, 20)
    assert primary.minutes == pytest.approx(11.0) and backup.minutes == pytest.approx(11.0)
    pinned = _prompts(10, provider="backup") + _prompts(20)
    plan = plan_batch(pinned, parse_config(CHAIN.format(rpd=1000, extra=extra), source="t"))
    assert {p.name: p.prompts for p in plan.providers} == {"primary": 20, "backup": 10}


def test_providers_of_one_model_share_on_the_defaults_and_finish_by_brings_in_the_rest():
    same = CHAIN.format(rpd=1000, extra="").replace(
        "kind: openai\n    model: gpt-image-1.5",
        "kind: vertex-gemini\n    model: publishers/google/models/gemini-3-pro-image-preview",
    )
    plan = plan_batch(_prompts(115), parse_config(same, source="t"))
    assert {p.name: p.prompts for p in plan.providers} == {"primary": 95, "backup": 20}
    apart = parse_config(CHAIN.format(rpd=1000, extra=""), source="t")
    assert [p.name for p in plan_batch(_prompts(115), apart).providers] == ["primary"]
    # the primary alone needs 115 / 9.5 + 1 = 13.1 min; finish in 11: the backup takes some
    start = datetime(2026, 12, 1, 1, 0, tzinfo=UTC)
    extra = "finish_by: '01:11 UTC'"
    plan = plan_batch(
        _prompts(115), parse_config(CHAIN.format(rpd=1000, extra=extra), source="t"), now=start
    )
    shares = {p.name: p.prompts for p in plan.providers}
    assert shares["backup"] > 0 and plan.minutes <= 11.0 and plan.feasible
    roomy = CHAIN.format(rpd=1000, extra="finish_by: '01:30 UTC'")
    plan = plan_batch(_prompts(115), parse_config(roomy, source="t"), now=start)
    assert [p.name for p in plan.providers] == ["primary"]  # time allows one model's look


def test_warnings_for_deadline_budget_and_daily_quota():
    text = CHAIN.format(rpd=10, extra="deadline_s: 180\nbudget_usd: 1")
    text = text.replace("  - name: backup", "  - name: backup2").replace(
        "limits: {rpm: 5, max_in_flight: 2, latency_s: 60}",
        "limits: {rpm: 5, rpd: 5, max_in_flight: 2, latency_s: 60}",
    )
    plan = plan_batch(_prompts(20, size="4K"), parse_config(text, source="t"))
    assert not plan.feasible
    assert [w.split(":")[0] for w in plan.warnings] == [
        "5 prompts do not fit in the providers' daily allowances (rpd)",
        "it needs about 3.5 min, past the deadline of 3.0 min",
        "it costs about $2.60, over the budget of $1.00",
    ]


def test_plan_command_prints_the_estimate(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"p {i}"}) + "\n" for i in range(95)))
    config = tmp_path / "c.yaml"
    config.write_text(CHAIN.format(rpd=1000, extra=""))
    result = subprocess.run(
        [sys.executable, "-m", "imagebatch.cli", "plan", str(prompts), "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "95 prompts: about 11.0 min, $12.73"
    assert "primary" in result.stdout and "quota" in result.stdout

    config.write_text(CHAIN.format(rpd=1000, extra="deadline_s: 300"))
    late = subprocess.run(
        [sys.executable, "-m", "imagebatch.cli", "plan", str(prompts), "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert late.returncode == 1 and "WARNING: it needs about 11.0 min, past the deadline" in (
        late.stdout
    )


@pytest.mark.flow
def test_a_dry_run_of_the_flow_publishes_the_plan_and_generates_nothing(tmp_path, prefect_server):
    from prefect import get_client

    from imagebatch.batch import BatchRun
    from imagebatch.flows.nightly_batch import nightly_batch

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"p {i}"}) + "\n" for i in range(95)))
    config = tmp_path / "c.yaml"
    config.write_text(CHAIN.format(rpd=1000, extra=""))
    run = BatchRun(
        prompts=str(prompts), config=str(config), output=str(tmp_path / "out"), dry_run=True
    )
    state = asyncio.run(nightly_batch(run=run, return_state=True))
    assert state.is_completed() and state.name == "Planned"
    assert state.message == "95 prompts: about 11.0 min, $12.73"
    assert not (tmp_path / "out").exists()  # nothing generated, nothing written

    async def artifacts():
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])
                )
            )

    found = _poll(artifacts, lambda found: any(a.key == "imagebatch-plan" for a in found))
    (plan,) = [a for a in found if a.key == "imagebatch-plan"]
    assert "95 prompts: about 11.0 min, $12.73" in plan.data
