"""Deployments defined once: prefect.yaml deployed with `prefect deploy` and served by
`imagebatch serve` give the same schedule and parameter schema on a real Prefect server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from imagebatch.errors import ConfigError
from imagebatch.flows.deployments import read_definitions
from tests.conftest import ROOT

pytestmark = pytest.mark.flow
PREFECT = str(Path(sys.executable).parent / "prefect")  # the CLI of this environment


def _env(api_url: str) -> dict[str, str]:
    return {**os.environ, "PREFECT_API_URL": api_url, "PREFECT_RUNNER_POLL_FREQUENCY": "2"}


async def _deployment(name: str = "nightly-batch/nightly"):
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    async with get_client() as client:
        try:
            return await client.read_deployment_by_name(name)
        except ObjectNotFound:
            return None


def _shape(deployment) -> dict:
    return {
        "schedules": [
            (
                getattr(s.schedule, "cron", None) or getattr(s.schedule, "interval", None),
                s.schedule.timezone,
                s.active,
            )
            for s in deployment.schedules
        ],
        "schema": deployment.parameter_openapi_schema,
        "enforce": deployment.enforce_parameter_schema,
        "tags": deployment.tags,
        "description": deployment.description,
    }


@contextlib.contextmanager
def _serving(tmp_path: Path, env: dict[str, str]) -> Iterator[subprocess.Popen]:
    """`imagebatch serve` in the project directory, stopped before the server goes away."""
    with open(tmp_path / "serve.log", "wb") as log:
        served = subprocess.Popen(
            [sys.executable, "-m", "imagebatch.cli", "serve"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield served
        finally:
            os.killpg(served.pid, signal.SIGTERM)  # serve pauses its schedules on the way out
            served.wait(60)


async def _start(deployment_id, parameters: dict):
    from prefect import get_client

    async with get_client() as client:
        return await client.create_flow_run_from_deployment(deployment_id, parameters=parameters)


async def _read_run(run_id):
    from prefect import get_client

    async with get_client() as client:
        return await client.read_flow_run(run_id)


def _wait_for(fetch, ready, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while True:
        value = asyncio.run(fetch())
        if ready(value):
            return value
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)


def test_prefect_yaml_is_checked_with_file_and_key(tmp_path):
    bad = tmp_path / "prefect.yaml"
    bad.write_text("deployments:\n  - name: x\n    entrypoint: a.py:f\n    schedule: daily\n")
    with pytest.raises(ConfigError, match=r"prefect.yaml, key 'deployments\[0\]'.*'schedule'"):
        read_definitions(bad)
    assert read_definitions(ROOT / "prefect.yaml")[0]["schedules"][0]["cron"] == "0 2 * * *"


def test_deploy_and_serve_give_the_same_deployment(tmp_path, prefect_server):
    from prefect import get_client

    env = _env(prefect_server)
    pool = subprocess.run(
        [PREFECT, "work-pool", "create", "imagebatch", "--type", "process"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert pool.returncode == 0 or "already exists" in pool.stdout, pool.stdout + pool.stderr
    deploy = subprocess.run(
        [PREFECT, "--no-prompt", "deploy", "--all"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
    deployed = asyncio.run(_deployment())
    health = asyncio.run(_deployment("provider-health/every-5-minutes"))
    assert deployed.work_pool_name == health.work_pool_name == "imagebatch"
    by_deploy, health_by_deploy = _shape(deployed), _shape(health)
    assert health_by_deploy["schedules"][0][0].total_seconds() == 300
    assert by_deploy["schedules"] == [("0 2 * * *", "UTC", True)]
    assert by_deploy["enforce"] is True
    fields = by_deploy["schema"]["definitions"]["BatchRun"]["properties"]
    assert {"prompts", "config", "output", "gcs_block", "batch_id", "dry_run"} <= set(fields)

    async def delete():
        async with get_client() as client:
            await client.delete_deployment(deployed.id)
            await client.delete_deployment(health.id)

    asyncio.run(delete())
    with _serving(tmp_path, env):
        deployment = _wait_for(_deployment, lambda d: d is not None)
        assert _shape(deployment) == by_deploy  # the same schedule, schema, tags, text
        health = _wait_for(
            lambda: _deployment("provider-health/every-5-minutes"), lambda d: d is not None
        )
        assert _shape(health) == health_by_deploy

        # the server validates the form: an out-of-range value never becomes a run
        with pytest.raises(Exception, match="max_in_flight"):
            asyncio.run(_start(deployment.id, {"run": {"max_in_flight": 0}}))

        out = tmp_path / "out"
        params = {"run": {"output": str(out), "batch_id": "served-1"}}
        run = asyncio.run(_start(deployment.id, params))
        final = _wait_for(lambda: _read_run(run.id), lambda r: r.state and r.state.is_final())
        assert final.state.is_completed(), final.state
        assert (out / "served-1" / "manifest.jsonl").is_file()


def create_automations(
    block: str, api_url: str, tmp_path: Path, edit: Callable[[str], str] = lambda text: text
) -> None:
    """Create automations/notifications.yaml as a user does: rendered with ``block`` by
    `imagebatch automations`, then `prefect automation create` (``edit`` changes it between)."""
    env = _env(api_url)
    rendered = subprocess.run(
        [sys.executable, "-m", "imagebatch.cli", "automations", "--block", block],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert rendered.returncode == 0, rendered.stderr
    assert "NOTIFICATION_BLOCK_ID" not in rendered.stdout
    (tmp_path / "automations.yaml").write_text(edit(rendered.stdout))
    created = subprocess.run(
        [PREFECT, "automation", "create", "--from-file", str(tmp_path / "automations.yaml")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert created.returncode == 0, created.stdout + created.stderr


def test_notification_automations_are_accepted_by_prefect(tmp_path, prefect_server):
    from prefect import get_client
    from prefect.blocks.notifications import SlackWebhook

    env = _env(prefect_server)
    block_id = SlackWebhook(url="http://127.0.0.1:9/hook").save("imagebatch-ops", overwrite=True)
    create_automations("slack-webhook/imagebatch-ops", prefect_server, tmp_path)

    async def automations():
        async with get_client() as client:
            return await client.read_automations()

    ours = {a.name: a for a in asyncio.run(automations()) if a.name.startswith("imagebatch - ")}
    assert set(ours) == {
        "imagebatch - nightly batch failed or crashed",
        "imagebatch - provider circuit stays open",
        "imagebatch - no nightly batch completed for a day",
    }
    for automation in ours.values():
        assert [a.block_document_id for a in automation.actions] == [block_id]
    missed = ours["imagebatch - no nightly batch completed for a day"].trigger
    assert (missed.posture, missed.within.total_seconds()) == ("Proactive", 90000)

    unknown = subprocess.run(
        [sys.executable, "-m", "imagebatch.cli", "automations", "--block", "slack-webhook/nope"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert unknown.returncode == 2 and "--block slack-webhook/nope" in unknown.stderr


def test_cancelling_a_served_run_keeps_what_finished_and_the_rerun_resumes(
    tmp_path, prefect_server
):
    import json

    import httpx
    from prefect import get_client
    from prefect.states import Cancelling

    from imagebatch.emulator import EmulatorProfile, EmulatorServer, ProviderProfile

    profile = EmulatorProfile(providers={"primary": ProviderProfile(latency_median_s=1.0)})
    with EmulatorServer(profile) as emulator:
        config = tmp_path / "c.yaml"
        config.write_text(
            "providers:\n"
            "  - {name: primary, kind: gemini, model: gemini-3-pro-image-preview,\n"
            f"     base_url: {emulator.url}/p/primary, api_key_env: EMULATOR_KEY,\n"
            "     limits: {rpm: 6000, max_in_flight: 2}, timeout_s: 30}\n"
            "renditions: [{name: original, format: png}]\n"
            "max_in_flight: 2\n"
        )
        prompts = tmp_path / "p.jsonl"
        texts = {f"p{i:02d}": f"cancel {i}" for i in range(20)}
        prompts.write_text(
            "".join(json.dumps({"id": k, "prompt": v}) + "\n" for k, v in texts.items())
        )
        out = tmp_path / "out"
        run_params = {
            "run": {
                "prompts": str(prompts),
                "config": str(config),
                "output": str(out),
                "batch_id": "c1",
            }
        }
        env = {**_env(prefect_server), "EMULATOR_KEY": "emulator-key"}
        with _serving(tmp_path, env):
            deployment = _wait_for(_deployment, lambda d: d is not None)

            def done() -> set[str]:
                return {p.parent.name for p in out.glob("c1/*/_success.json")}

            first = asyncio.run(_start(deployment.id, run_params))
            deadline = time.monotonic() + 180
            while len(done()) < 3:  # watching the output, not waiting for time to pass
                assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
                time.sleep(0.05)

            async def cancel():
                async with get_client() as client:
                    await client.set_flow_run_state(first.id, Cancelling())

            asyncio.run(cancel())
            cancelled = _wait_for(lambda: _read_run(first.id), lambda r: r.state.is_final())
            assert cancelled.state.is_cancelled(), cancelled.state
            kept = done()
            assert 3 <= len(kept) < 20
            before = len(httpx.get(f"{emulator.url}/_emulator/log").json()["requests"])

            second = asyncio.run(_start(deployment.id, run_params))
            final = _wait_for(lambda: _read_run(second.id), lambda r: r.state.is_final())
            assert final.state.is_completed(), final.state
        again = httpx.get(f"{emulator.url}/_emulator/log").json()["requests"][before:]

    manifest = [json.loads(x) for x in (out / "c1" / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 20 and {r["status"] for r in manifest} == {"succeeded"}
    assert {r["id"] for r in manifest if r["resumed"]} == kept  # nothing finished was lost
    assert not {texts[p] for p in kept} & {e["prompt"] for e in again}
    assert len(again) <= 20 - len(kept) + 2  # at most the two in flight at the cancel, again
