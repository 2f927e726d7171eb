"""Resilience in the real flow: real SDKs against the emulator, on a real Prefect server.

Faults are keyed to request counts or switched through the emulator's control endpoint when the
emulator's own log says the batch got there; nothing waits on wall-clock windows.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time

import httpx
import pytest

from imagebatch.batch import BatchRun
from imagebatch.emulator import EmulatorProfile, EmulatorServer, ProviderProfile, ScriptedFault

pytestmark = pytest.mark.flow

CONFIG = """
providers:
  - name: primary
    kind: gemini
    model: gemini-3-pro-image-preview
    base_url: {url}/p/primary
    api_key_env: EMULATOR_KEY
    limits: {{rpm: {rpm}, max_in_flight: 8}}
    timeout_s: {timeout}
  - name: backup
    kind: openai
    model: gpt-image-1.5
    base_url: {url}/p/backup
    api_key_env: EMULATOR_KEY
    limits: {{rpm: {rpm}, max_in_flight: 2}}
    timeout_s: {timeout}
routing: {{failover_after: 3, probe_interval_s: {probe}}}
retry: {{base_delay_s: 0.2, max_delay_s: 1}}
renditions: [{{name: original, format: png}}]
max_in_flight: 8
"""


@pytest.fixture
def run_batch(tmp_path, prefect_server, monkeypatch):
    monkeypatch.setenv("EMULATOR_KEY", "emulator-key")

    def run(
        server: EmulatorServer,
        prompts: int,
        batch_id: str,
        *,
        rpm=600,
        probe=300,
        only_primary=False,
        timeout=10,
    ):
        # timeout_s, like every provider time, is divided by IMAGEBATCH_TIME_SCALE
        text = CONFIG.format(url=server.url, rpm=rpm, probe=probe, timeout=timeout)
        if only_primary:
            text = text.split("  - name: backup")[0] + text[text.index("routing:") :]
        (tmp_path / "config.yaml").write_text(text)
        (tmp_path / "p.jsonl").write_text(
            "".join(
                json.dumps({"id": f"p{i:02d}", "prompt": f"prompt {i}"}) + "\n"
                for i in range(prompts)
            )
        )
        from imagebatch.flows.nightly_batch import nightly_batch

        params = BatchRun(
            prompts=str(tmp_path / "p.jsonl"),
            config=str(tmp_path / "config.yaml"),
            output=str(tmp_path / "out"),
            batch_id=batch_id,
        )
        state = asyncio.run(nightly_batch(run=params, return_state=True))
        manifest = tmp_path / "out" / batch_id / "manifest.jsonl"
        records = [json.loads(line) for line in manifest.read_text().splitlines()]
        return state, records

    return run


async def _flow_logs(flow_run_id) -> list[str]:
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    async with get_client() as client:
        logs = await client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
        )
    return [x.message for x in logs]


def _poll_logs(flow_run_id, needle: str, timeout: float = 30.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        messages = asyncio.run(_flow_logs(flow_run_id))
        if any(needle in m for m in messages) or time.monotonic() > deadline:
            return messages
        time.sleep(0.2)


def test_overload_fails_over_and_comes_back_when_it_ends(run_batch):
    profile = EmulatorProfile(
        providers={
            "primary": ProviderProfile(outage=True),
            "backup": ProviderProfile(latency_median_s=0.3),
        }
    )
    with EmulatorServer(profile) as server:
        log = server.emulator.log

        def end_overload_once_failed_over() -> None:
            # the emulator's log tells when the batch has failed over: then the outage ends
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                primary = [e for e in log if e.provider == "primary" and e.status is not None]
                backup = [e for e in log if e.provider == "backup" and e.status == 200]
                if len(primary) >= 3 and len(backup) >= 4:
                    httpx.post(f"{server.url}/_emulator/providers/primary", json={"outage": False})
                    return
                time.sleep(0.05)

        switcher = threading.Thread(target=end_overload_once_failed_over)
        switcher.start()
        state, records = run_batch(server, 30, "overload-1", probe=1.0)
        switcher.join()
        requests = list(log)

    assert state.name == "Completed" and len(records) == 30
    assert all(r["status"] == "succeeded" for r in records)
    primary = [e for e in requests if e.provider == "primary"]
    assert [e.status for e in primary[:3]] == [503, 503, 503]
    opened_at = primary[2].t_wall_s
    # after the third consecutive 503 only probes reached the primary, one per probe interval
    while_open = [e for e in primary[3:] if e.status == 503]
    assert all(b.t_wall_s - a.t_wall_s >= 0.9 for a, b in itertools.pairwise(while_open))
    assert any(e.provider == "backup" and e.t_wall_s > opened_at for e in requests)
    # the primary came back: the batch ended on it
    assert requests[-1].provider == "primary" and primary[-1].status == 200
    served = {r["provider"] for r in records}
    assert served == {"primary", "backup"}

    messages = _poll_logs(state.state_details.flow_run_id, "imagebatch.provider.failback")
    for event in ("circuit.opened", "provider.failover", "circuit.closed", "provider.failback"):
        assert any(f"imagebatch.{event}" in m for m in messages), event

    # the report tells the story: the events in order with their times, each prompt that took
    # more than one call with its errors and a link to its own generate task run, the cost
    report, task_runs = asyncio.run(_report_and_task_runs(state.state_details.flow_run_id))
    story = report.split("## Circuits and failovers")[1].split("##")[0]
    rows = [line.split(" | ")[1:] for line in story.splitlines() if line.startswith("| ")]
    happened = [(provider, what.split(" (")[0].split(":")[0]) for provider, what in rows[1:]]
    assert happened[:2] == [("primary", "circuit opened"), ("backup", "prompts failed over to it")]
    assert ("primary", "circuit closed") in happened
    assert happened[-1] == ("primary", "prompts came back to it")
    retried = report.split("## Prompts that needed retries or another provider")[1].split("##")[0]
    moved = [r for r in records if len(r["attempts"]) > 1]
    assert moved and f"{len(moved)} prompts took more than one call" in retried
    for record in moved:
        line = next(x for x in retried.splitlines() if x.startswith(f"| `{record['id']}` |"))
        assert "primary: 503 ProviderOverloaded" in line
        name = f"generate-{record['id']}"
        assert f"[{name}](" in line and f"/runs/task-run/{task_runs[name]})" in line
    assert any("primary → backup" in x for x in retried.splitlines())
    cost = report.split("## Cost per provider")[1].split("##")[0]
    assert "| primary |" in cost and "| backup |" in cost


async def _report_and_task_runs(flow_run_id) -> tuple[str, dict[str, str]]:
    """The run's markdown report, and its task runs' ids by name."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
    )

    async with get_client() as client:
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
        runs = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    report = next(a.data for a in artifacts if a.key == "imagebatch-report")
    return report, {r.name: str(r.id) for r in runs}


def test_a_quota_equal_to_the_configured_one_gets_no_429(run_batch, monkeypatch):
    # 30 requests per (simulated) minute on both sides, time running 5x: a minute is 12 s. The
    # 5% margin leaves 0.6 s for arrival jitter here (3 s at real speed).
    monkeypatch.setenv("IMAGEBATCH_TIME_SCALE", "5")
    profile = EmulatorProfile(
        time_scale=5, providers={"primary": ProviderProfile(rpm=30, latency_median_s=10)}
    )
    with EmulatorServer(profile) as server:
        state, records = run_batch(server, 40, "quota-1", rpm=30, only_primary=True, timeout=120)
        statuses = [e.status for e in server.emulator.log]
    assert state.name == "Completed"
    assert statuses == [200] * 40
    assert all(r["provider"] == "primary" for r in records)


def test_a_transient_503_is_a_visible_prefect_retry_through_the_real_sdk(run_batch):
    profile = EmulatorProfile(
        providers={"primary": ProviderProfile(script=[ScriptedFault(first=1, fault="overloaded")])}
    )
    with EmulatorServer(profile) as server:
        state, records = run_batch(server, 1, "retry-sdk", only_primary=True)
    assert state.name == "Completed"
    assert [a["outcome"] for a in records[0]["attempts"]] == ["ProviderOverloaded", "ok"]
    assert records[0]["attempts"][0]["http_status"] == 503
    messages = _poll_logs(state.state_details.flow_run_id, "Retry 1/")
    retry = next(m for m in messages if "Retry 1/" in m)
    assert "primary/gemini-3-pro-image-preview HTTP 503" in retry and "overloaded" in retry


def test_the_next_batch_starts_from_the_recorded_provider_health(run_batch):
    """A primary down at the end of one batch is not hammered by the next: it gets a probe
    when one is due (here after 300 s), and the batch starts on the backup."""
    profile = EmulatorProfile(
        providers={"primary": ProviderProfile(outage=True), "backup": ProviderProfile()}
    )
    with EmulatorServer(profile) as server:
        state, records = run_batch(server, 6, "night-1", probe=300)
        assert state.is_completed() and {r["provider"] for r in records} == {"backup"}
        first = len(server.emulator.log)
        assert [e.provider for e in server.emulator.log].count("primary") == 3

        state, records = run_batch(server, 6, "night-2", probe=300)
        second = list(server.emulator.log)[first:]
    assert state.is_completed() and {r["provider"] for r in records} == {"backup"}
    assert [e.provider for e in second] == ["backup"] * 6  # not one call to the primary
    messages = _poll_logs(state.state_details.flow_run_id, "recorded provider health")
    assert any("primary was overloaded" in m and "probe first" in m for m in messages)


SAME_MODEL = """
providers:
  - name: studio
    kind: gemini
    model: gemini-3-pro-image-preview
    base_url: {url}/p/studio
    api_key_env: EMULATOR_KEY
    limits: {{rpm: 10}}
  - name: second-account
    kind: gemini
    model: models/gemini-3-pro-image-preview
    base_url: {url}/p/second
    api_key_env: EMULATOR_KEY
    limits: {{rpm: 5}}
renditions: [{{name: original, format: png}}]
"""


def test_two_accounts_of_one_model_share_the_night_on_the_defaults(
    tmp_path, prefect_server, monkeypatch
):
    """What a new user writes (quotas only, no in-flight caps, no spill-over): both accounts
    work at once, each at its own pace, and neither gets a 429."""
    from imagebatch.flows.nightly_batch import nightly_batch

    monkeypatch.setenv("EMULATOR_KEY", "emulator-key")
    monkeypatch.setenv("IMAGEBATCH_TIME_SCALE", "10")
    healthy = {"latency_median_s": 30, "latency_p99_s": 60}
    profile = EmulatorProfile(
        time_scale=10,
        providers={
            "studio": ProviderProfile(rpm=10, **healthy),
            "second": ProviderProfile(rpm=5, **healthy),
        },
    )
    with EmulatorServer(profile) as server:
        (tmp_path / "config.yaml").write_text(SAME_MODEL.format(url=server.url))
        (tmp_path / "p.jsonl").write_text(
            "".join(
                json.dumps({"id": f"p{i:02d}", "prompt": f"prompt {i}"}) + "\n" for i in range(30)
            )
        )
        params = BatchRun(
            prompts=str(tmp_path / "p.jsonl"),
            config=str(tmp_path / "config.yaml"),
            output=str(tmp_path / "out"),
            batch_id="shared-model",
        )
        state = asyncio.run(nightly_batch(run=params, return_state=True))
        log = list(server.emulator.log)
    assert state.name == "Completed"
    assert [e.status for e in log] == [200] * 30
    served = {name: sum(e.provider == name for e in log) for name in ("studio", "second")}
    assert served["studio"] > served["second"] > 5  # the second account takes its share
