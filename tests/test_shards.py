"""One night over many workers: a split night's shards on a process work pool, one worker lost.

The real parts: Prefect's test server (its triggers and actions run the zombie automation), a
process work pool with ``prefect worker start`` workers, a deployment of the nightly flow, the
CLI as the parent, the emulator as the provider (google-genai over HTTP), a local output.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from imagebatch.batch import BatchRun, shard_prompts
from imagebatch.emulator import EmulatorProfile, EmulatorServer, ProviderProfile
from imagebatch.models import Prompt, PromptRecord
from tests.conftest import ROOT

PREFECT = str(Path(sys.executable).parent / "prefect")
POOL, DEPLOYMENT = "imagebatch-shards-test", "shards-test"
CONFIG = """
providers:
  - name: primary
    kind: gemini
    model: shards-test-model
    base_url: {url}/p/primary
    api_key_env: EMULATOR_KEY
    limits: {{rpm: 600, max_in_flight: 2}}
    timeout_s: 30
renditions: [{{name: original, format: png}}]
max_in_flight: 4
failure_threshold: 0
"""


def test_shards_take_every_prompt_once_and_evenly():
    prompts = [Prompt(id=f"p{i}", prompt=f"prompt {i}") for i in range(11)]
    for shards in (1, 2, 3, 11, 12):
        parts = [shard_prompts(prompts, k, shards) for k in range(shards)]
        ids = [p.id for part in parts for p in part]
        assert sorted(ids) == sorted(p.id for p in prompts)  # each prompt in exactly one shard
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError, match="shard 2 of 2: shard must be below shards"):
        BatchRun(shards=2, shard=2)
    with pytest.raises(ValueError, match="shards"):
        BatchRun(shards=0)


@pytest.mark.flow
def test_a_split_night_without_its_deployment_says_what_to_deploy_and_writes_nothing(
    tmp_path, prefect_server, monkeypatch
):
    from imagebatch.flows.nightly_batch import nightly_batch

    monkeypatch.setenv("IMAGEBATCH_SHARD_DEPLOYMENT", "nightly-batch/not-deployed")
    run = BatchRun(output=str(tmp_path / "out"), batch_id="split-0", shards=2)
    state = asyncio.run(nightly_batch(run=run, return_state=True))
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "split into 2 shards" in message and "'nightly-batch/not-deployed'" in message
    assert "prefect deploy --all" in message and "prefect worker start" in message
    assert not (tmp_path / "out" / "split-0").exists()


def _tree(pid: int) -> list[int]:
    """``pid`` and every process below it, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    return found


def _worker(name: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen(
            [PREFECT, "worker", "start", "--pool", POOL, "--type", "process", "--name", name],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


async def _setup(tmp_path: Path) -> None:
    """The work pool, a deployment of the nightly flow from this checkout, the automation."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    from imagebatch.flows.nightly_batch import nightly_batch

    async with get_client() as client:
        with contextlib.suppress(ObjectAlreadyExists):
            await client.create_work_pool(WorkPoolCreate(name=POOL, type="process"))
    flow = await nightly_batch.from_source(
        source=str(ROOT), entrypoint="flows/nightly_batch.py:nightly_batch"
    )
    await flow.deploy(
        name=DEPLOYMENT, work_pool_name=POOL, build=False, push=False, print_next_steps=False
    )


async def _shard_runs() -> list:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.client.schemas.sorting import FlowRunSort

    async with get_client() as client:
        return await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=["imagebatch-shard"])),
            sort=FlowRunSort.START_TIME_ASC,
        )


async def _delete_automations(prefix: str) -> None:
    from prefect import get_client

    async with get_client() as client:
        for automation in await client.read_automations():
            if automation.name.startswith(prefix):
                await client.delete_automation(automation.id)


async def _parent_and_report(task_run_id) -> tuple:
    """The flow run that started a shard (through its subflow task run) and its report."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )

    async with get_client() as client:
        task_run = await client.read_task_run(task_run_id)
        parent = await client.read_flow_run(task_run.flow_run_id)
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["imagebatch-report"]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[parent.id]),
            )
        )
    assert len(artifacts) == 1, artifacts
    return parent, str(artifacts[0].data)


def _successes(out: Path, batch: str) -> set[str]:
    return {p.parent.name for p in (out / batch).glob("*/_success.json")}


@pytest.mark.flow
def test_a_night_split_over_a_work_pool_finishes_when_a_worker_dies_paying_only_its_calls_in_flight(
    tmp_path, real_prefect_server
):
    """On ``prefect server start``: its repossessor gives the dead worker's in-flight slots back
    when their leases end (the test harness's server never does, and the restarted shards then
    wait for slots nobody will return)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: real_prefect_server}):
        _split_night_with_a_worker_killed(tmp_path, real_prefect_server)


def _split_night_with_a_worker_killed(tmp_path: Path, prefect_server: str) -> None:
    prompts, batch, out = 30, "split-1", tmp_path / "out"
    (tmp_path / "p.jsonl").write_text(
        "".join(
            json.dumps({"id": f"s{i:02d}", "prompt": f"split {i}"}) + "\n" for i in range(prompts)
        )
    )
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_server,
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "EMULATOR_KEY": "emulator-key",
        "IMAGEBATCH_STATE_DIR": str(tmp_path / "state"),
        "IMAGEBATCH_SHARD_DEPLOYMENT": f"nightly-batch/{DEPLOYMENT}",
    }
    # the automation as a user creates it, its 90 s shortened to 50 (heartbeats every 30 s)
    automation = (ROOT / "automations" / "zombies.yaml").read_text()
    assert "within: 90" in automation
    (tmp_path / "zombies.yaml").write_text(automation.replace("within: 90", "within: 50"))
    created = subprocess.run(
        [PREFECT, "automation", "create", "--from-file", str(tmp_path / "zombies.yaml")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert created.returncode == 0, created.stdout + created.stderr
    workers: list[subprocess.Popen] = []
    # calls of about 2 s: a shard whose worker process starts a few seconds after the other's
    # is still at work when the first has published its three (at 1 s it once had finished)
    profile = EmulatorProfile(providers={"primary": ProviderProfile(latency_median_s=2.0)})
    try:
        asyncio.run(_setup(tmp_path))
        with EmulatorServer(profile) as server:
            (tmp_path / "c.yaml").write_text(CONFIG.format(url=server.url))
            workers.append(_worker("machine-a", env, tmp_path / "worker-a.log"))
            args = ["run", str(tmp_path / "p.jsonl"), "--config", str(tmp_path / "c.yaml")]
            args += ["--output", str(out), "--batch-id", batch, "--shards", "2", "--quiet"]
            with (
                (tmp_path / "parent.out").open("wb") as stdout,
                (tmp_path / "parent.err").open("wb") as stderr,
            ):
                parent = subprocess.Popen(
                    [sys.executable, "-m", "imagebatch.cli", *args],
                    cwd=tmp_path,
                    env=env,
                    stdout=stdout,
                    stderr=stderr,
                )
            # both shards at work on machine A, each with a few prompts published: A dies
            deadline = time.monotonic() + 180
            while True:
                done = _successes(out, batch)
                first = asyncio.run(_shard_runs())
                if (
                    min(len([d for d in done if int(d[1:]) % 2 == k]) for k in (0, 1)) >= 3
                    and len(first) == 2
                    and all(r.state and r.state.is_running() for r in first)
                ):
                    break
                assert parent.poll() is None, (tmp_path / "parent.err").read_text()[-3000:]
                assert time.monotonic() < deadline, (tmp_path / "worker-a.log").read_text()
                time.sleep(0.5)
            for pid in _tree(workers[0].pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            workers[0].wait(30)
            killed_at = time.monotonic()
            done_at_kill = _successes(out, batch)
            workers.append(_worker("machine-b", env, tmp_path / "worker-b.log"))
            parent.wait(timeout=420)
            stdout = (tmp_path / "parent.out").read_text()
            stderr = (tmp_path / "parent.err").read_text()
            log = httpx.get(f"{server.url}/_emulator/log").json()["requests"]
        assert parent.returncode == 0, stdout + stderr[-3000:]
        assert f"{prompts} succeeded" in stdout
    finally:
        asyncio.run(_delete_automations("imagebatch - silent shards"))
        for worker in workers:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGTERM)
                worker.wait(60)

    # every prompt published once, in the night's one manifest
    manifest = [json.loads(x) for x in (out / batch / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in manifest) == [f"s{i:02d}" for i in range(prompts)]
    assert {r["status"] for r in manifest} == {"succeeded"}
    assert json.loads((out / batch / "summary.json").read_text())["succeeded"] == prompts
    # paid again only for what was in flight on machine A when it died (two calls at most: the
    # shards share the provider's two places in flight)
    calls: dict[str, int] = {}
    for entry in log:
        calls[entry["prompt"]] = calls.get(entry["prompt"], 0) + 1
    twice = {p for p, n in calls.items() if n > 1}
    assert len(calls) == prompts and len(twice) <= 2, twice
    assert not {f"s{p.split()[1]:0>2}" for p in twice} & done_at_kill
    # the UI: both lost shards marked Crashed by the automation, then run again to the end
    runs = asyncio.run(_shard_runs())
    by_state = sorted((r.state.type.value, r.name) for r in runs)
    assert by_state == [
        # a finished shard is named after its figures, as a night is
        ("COMPLETED", f"{batch}-shard-1 · 15/15 · $0.00"),
        ("COMPLETED", f"{batch}-shard-2 · 15/15 · $0.00"),
        ("CRASHED", f"{batch} · shard 1/2"),
        ("CRASHED", f"{batch} · shard 2/2"),
    ], by_state
    for run in runs:
        assert run.parent_task_run_id is not None  # a subflow run of the night's parent
        if run.state.is_crashed():
            assert "No heartbeat for 90 s" in (run.state.message or ""), run.state
    assert "crashed (" in stdout + stderr and "started again as" in stdout + stderr
    # the night's report, on the parent run, tells the story: both restarts, with their runs
    parent_run, report = asyncio.run(_parent_and_report(runs[0].parent_task_run_id))
    assert parent_run.name == f"{batch} · {prompts}/{prompts} · $0.00"
    assert report.count("crashed; started again, resuming from its records") == 2, report
    assert "shard 1/2" in report and f"{batch} · shard 2/2" in report
    print(f"recovered {time.monotonic() - killed_at:.0f} s after the kill")


@pytest.mark.flow
def test_a_prompt_no_shard_settled_is_recorded_skipped_with_its_shards_end(
    tmp_path, prefect_server
):
    from uuid import uuid4

    from prefect import flow
    from prefect.client.schemas.objects import FlowRun
    from prefect.states import Completed, Crashed

    from imagebatch.prefect.shards import Shard
    from imagebatch.records import RecordStore
    from imagebatch.storage import open_sink
    from imagebatch.tasks.shards import record_unsettled

    prompts = [Prompt(id=f"p{i}", prompt=f"prompt {i}") for i in range(4)]
    store = RecordStore(open_sink(str(tmp_path)), "night")
    run = BatchRun(shards=2, batch_id="night")
    shards = [Shard(k, run.model_copy(update={"shard": k})) for k in range(2)]
    shards[0].runs.append(FlowRun(flow_id=uuid4(), name="night · shard 1/2", state=Completed()))
    lost = Crashed(message="No heartbeat for 90 s")
    shards[1].runs.append(FlowRun(flow_id=uuid4(), name="night · shard 2/2", state=lost))
    for pid in ("p0", "p2", "p1"):  # shard 2/2 settled p1 before it was lost; p3 never
        store.write_failure(
            PromptRecord(id=pid, status="failed", batch_id="night", finished_at=datetime.now(UTC))
        )

    @flow
    async def parent() -> int:  # the task as the parent runs it: its arguments go to Prefect
        return await record_unsettled(store, [shard.end() for shard in shards], prompts, "night")

    assert asyncio.run(parent()) == 1
    assert store.read("p1").status == "failed"  # a record of its own is kept
    left = store.read("p3")
    assert left.status == "skipped"
    assert "shard 2/2 ended before it settled this prompt" in left.error
    assert "Crashed: No heartbeat for 90 s" in left.error and "run the batch again" in left.error
    assert store.recorded_ids() == {"p0", "p1", "p2", "p3"}


@pytest.mark.flow
def test_the_report_links_every_retried_prompts_task_run_past_one_page_of_the_api(
    prefect_server,
):
    """A night (or a split night's shards) with more retried prompts than one read of the API
    returns (200 runs) still links each one's generate task run."""
    from prefect import flow, task

    from imagebatch.prefect.runs import generate_task_run_links

    @task(task_run_name="generate-{pid}")
    def generate(pid: str) -> str:
        return pid

    async def recorded(flow_run_id) -> int:
        """Task runs of the flow run the server has recorded (it records them from events,
        a moment after they ran)."""
        from prefect import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        async with get_client() as client:
            found = 0
            for page in range(2):
                found += len(
                    await client.read_task_runs(
                        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                        offset=page * 100,
                        limit=100,
                    )
                )
        return found

    @flow
    async def night() -> dict[str, str]:
        from prefect.runtime import flow_run

        for i in range(150):
            generate(f"p{i:03d}")
        deadline = time.monotonic() + 60
        while await recorded(flow_run.id) < 150:
            assert time.monotonic() < deadline, "the server did not record the task runs"
            await asyncio.sleep(0.2)
        return await generate_task_run_links([f"p{i:03d}" for i in range(150)])

    links = asyncio.run(night())
    assert sorted(links) == [f"p{i:03d}" for i in range(150)]
    assert len(set(links.values())) == 150 and all("/runs/task-run/" in u for u in links.values())
