"""The nightly flow on a real Prefect server (one per session)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from PIL import Image

from imagebatch.batch import BatchRun
from imagebatch.errors import ContentRefused, InvalidRequest, ProviderOverloaded
from imagebatch.providers import REGISTRY
from tests.scripted import SCRIPTS, ScriptedProvider, png

pytestmark = pytest.mark.flow

CONFIG = """
providers:
  - {name: primary, kind: local, model: local-render-v1, options: {render_px: 96}}
renditions:
  - {name: original, format: png}
  - {name: thumb, format: jpeg, max_px: 32, quality: 80}
max_in_flight: 4
failure_threshold: 0.2
"""


@pytest.fixture
def batch(tmp_path: Path, prefect_server: str):
    """Run the nightly flow on prompts (id -> text) and return (state, output dir)."""
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)

    def run(prompts: dict[str, str], batch_id: str = "night-1", **fields):
        source = tmp_path / "prompts.jsonl"
        source.write_text(
            "".join(json.dumps({"id": k, "prompt": v}) + "\n" for k, v in prompts.items())
        )
        from imagebatch.flows.nightly_batch import nightly_batch

        params = BatchRun(
            prompts=str(source),
            config=str(config),
            output=str(tmp_path / "out"),
            batch_id=batch_id,
            **fields,
        )
        return asyncio.run(nightly_batch(run=params, return_state=True)), tmp_path / "out"

    return run


@pytest.fixture
def scripted(monkeypatch):
    monkeypatch.setitem(REGISTRY, "local", ScriptedProvider)
    SCRIPTS.clear()
    yield SCRIPTS
    SCRIPTS.clear()


def _flow_run(state):
    from prefect import get_client

    async def read():
        async with get_client() as client:
            return await client.read_flow_run(state.state_details.flow_run_id)

    return asyncio.run(read())


def _poll(fetch, ready, timeout: float = 60.0):
    """The server records runs a little after the client finishes: poll with a deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = asyncio.run(fetch())
        if ready(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


async def _task_runs(flow_run_id):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async with get_client() as client:
        return await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )


def test_batch_publishes_renditions_manifest_and_artifacts(batch):
    state, out = batch({"mug": "a white mug", "shoe": "a red shoe", "lamp": "a desk lamp"})
    assert state.is_completed() and state.name == "Completed"
    summary = state.result()
    assert (summary.succeeded, summary.total, summary.outcome) == (3, 3, "completed")

    lines = [json.loads(x) for x in (out / "night-1" / "manifest.jsonl").read_text().splitlines()]
    assert [r["id"] for r in lines] == ["mug", "shoe", "lamp"]
    for record in lines:
        assert record["status"] == "succeeded" and record["resumed"] is False
        assert [a["outcome"] for a in record["attempts"]] == ["ok"]
        assert {o["rendition"] for o in record["objects"]} == {"original", "thumb"}
        for obj in record["objects"]:
            path = Path(obj["uri"].removeprefix("file://"))
            assert path.parent == out / "night-1" / record["id"]
            with Image.open(path) as im:
                assert (im.width, im.height) == (obj["width"], obj["height"])
            assert path.stat().st_size == obj["bytes"]

    from prefect import get_client

    async def artifacts():
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])
                )
            )

    found = _poll(artifacts, lambda a: {"progress", "table", "markdown"} <= {x.type for x in a})
    by_type = {a.type: a for a in found}
    assert by_type["progress"].data == 100.0
    assert by_type["table"].key == "imagebatch-summary"
    table = json.loads(by_type["table"].data)
    assert table[0]["provider"] == "primary" and table[0]["succeeded"] == 3
    assert "# Batch `night-1`: completed" in by_type["markdown"].data

    # the runs list shows names: the night's batch, what it published of all, what it cost
    assert _flow_run(state).name == "night-1 · 3/3 · $0.00"

    expected = {"generate-mug", "process-shoe", "publish-lamp"}
    runs = _poll(
        lambda: _task_runs(state.state_details.flow_run_id),
        lambda r: expected <= {x.name for x in r},
    )
    assert expected <= {r.name for r in runs}


def test_transient_error_shows_as_prefect_retries_with_the_provider(batch, scripted):
    scripted["primary"] = lambda p, n: (
        (_ for _ in ()).throw(ProviderOverloaded("The model is overloaded.", http_status=503))
        if n == 1
        else png()
    )
    state, out = batch({"mug": "a mug"}, batch_id="retry-1")
    assert state.is_completed()
    record = json.loads((out / "retry-1" / "manifest.jsonl").read_text())
    assert [a["outcome"] for a in record["attempts"]] == ["ProviderOverloaded", "ok"]

    flow_run_id = state.state_details.flow_run_id

    def generate_run(runs):
        return next(
            (r for r in runs if r.name == "generate-mug" and r.state_type == "COMPLETED"), None
        )

    run = generate_run(_poll(lambda: _task_runs(flow_run_id), generate_run))
    assert run is not None and run.run_count == 2

    async def states():
        from prefect import get_client

        async with get_client() as client:
            return await client.read_task_run_states(run.id)

    history = _poll(states, lambda s: any(x.name == "AwaitingRetry" for x in s))
    assert [s.name for s in history].count("AwaitingRetry") == 1

    async def logs():
        from prefect import get_client
        from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId

        async with get_client() as client:
            return await client.read_logs(
                log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=[run.id]))
            )

    # Prefect leaves AwaitingRetry's message empty; the retry's reason is in the run's logs
    lines = [x.message for x in _poll(logs, lambda ls: any("Retry 1/" in x.message for x in ls))]
    retry_line = next(line for line in lines if "Retry 1/" in line)
    assert "primary/local-render-v1 HTTP 503" in retry_line and "overloaded" in retry_line


@pytest.mark.parametrize(
    ("failing", "state_name", "completed"),
    [
        ({"p1": ContentRefused("IMAGE_SAFETY")}, "Completed", True),
        ({"p1": InvalidRequest("bad size", http_status=400)}, "Partially succeeded", True),
        (
            {k: InvalidRequest("bad size", http_status=400) for k in ("p1", "p2", "p3")},
            "Failed",
            False,
        ),
    ],
)
def test_flow_outcome_follows_the_failure_threshold(
    batch, scripted, failing, state_name, completed
):
    def script(prompt, n):
        if prompt.id in failing:
            raise failing[prompt.id]
        return png()

    scripted["primary"] = script
    prompts = {f"p{i}": f"prompt {i}" for i in range(1, 8)}
    state, out = batch(prompts, batch_id=f"outcome-{len(failing)}-{state_name[:4].lower()}")
    assert state.name == state_name
    assert state.is_completed() is completed
    summary = state.result(raise_on_failure=False)
    records = {
        r["id"]: r
        for r in map(
            json.loads, (out / summary.batch_id / "manifest.jsonl").read_text().splitlines()
        )
    }
    assert len(records) == 7
    for prompt_id, error in failing.items():
        assert records[prompt_id]["status"] == error.final_status
        assert records[prompt_id]["objects"] == []
        assert error.message in records[prompt_id]["error"]


def test_the_nights_contact_sheet_shows_the_first_prompts_and_every_one_that_failed(
    batch, scripted, tmp_path
):
    from imagebatch.sheet import _CAPTION_PX, _TITLE_PX, NIGHT_CELL_PX

    (tmp_path / "config.yaml").write_text(CONFIG + "publish: {contact_sheet: 2}\n")
    failing = {"p5": ContentRefused("IMAGE_SAFETY"), "p7": InvalidRequest("bad size")}

    def script(prompt, n):
        if prompt.id in failing:
            raise failing[prompt.id]
        return png()

    scripted["primary"] = script
    state, out = batch({f"p{i}": f"prompt {i}" for i in range(1, 8)}, batch_id="sheet-1")
    assert state.is_completed()
    path = out / "sheet-1" / "contact-sheet.png"
    with Image.open(path) as sheet:
        sheet = sheet.convert("RGB")
    # p1 and p2 (the first two), then p5 and p7 (did not succeed): four cells in one row
    assert sheet.size == (4 * NIGHT_CELL_PX, _TITLE_PX + NIGHT_CELL_PX + _CAPTION_PX)
    centre = NIGHT_CELL_PX // 2
    for cell in (0, 1):  # the published thumbnail (png(): a blue fade), not a grey cell
        r, g, b = sheet.getpixel((cell * NIGHT_CELL_PX + centre, _TITLE_PX + centre))
        assert b > r + 40, (cell, (r, g, b))
    for cell in (2, 3):
        corner = (cell * NIGHT_CELL_PX + 6, _TITLE_PX + NIGHT_CELL_PX - 8)
        assert sheet.getpixel(corner) == (238, 238, 238)

    from prefect import get_client

    async def report():
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

        async with get_client() as client:
            found = await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["imagebatch-report"]))
            )
        return [a for a in found if a.flow_run_id == state.state_details.flow_run_id]

    found = _poll(report, bool)
    assert found, "no report artifact"
    assert f"`{path}` on the machine that ran the batch" in found[0].data
    # a rerun of the night in which p7 succeeds redraws the sheet for the whole night
    del failing["p7"]
    state, _ = batch({f"p{i}": f"prompt {i}" for i in range(1, 8)}, batch_id="sheet-1")
    assert state.is_completed()
    with Image.open(path) as sheet:
        assert sheet.width == 3 * NIGHT_CELL_PX  # p1, p2 (resumed), p5 (still refused)


def test_bad_prompt_file_fails_before_anything_is_generated(tmp_path, prefect_server):
    from imagebatch.flows.nightly_batch import nightly_batch

    source = tmp_path / "bad.jsonl"
    source.write_text('{"prompt": "fine"}\n{"prompt": 42, "oops": 1}\n')
    params = BatchRun(prompts=str(source), output=str(tmp_path / "out"), batch_id="bad-1")
    state = asyncio.run(nightly_batch(run=params, return_state=True))
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert "bad.jsonl, line 2, field 'oops'" in str(error)
    assert not (tmp_path / "out").exists()


def _reject_once(scripted, prompt_id: str) -> list[str]:
    """The primary rejects ``prompt_id`` on its first call; the ids it was called for."""
    calls: list[str] = []
    rejected = {prompt_id}

    def flaky(prompt, n):
        calls.append(prompt.id)
        if prompt.id in rejected:
            rejected.discard(prompt.id)
            raise InvalidRequest("rejected once", http_status=400)
        return png()

    scripted["primary"] = flaky
    return calls


def test_rerun_resumes_done_prompts_and_retries_the_failed(batch, scripted):
    calls = _reject_once(scripted, "p2")
    prompts = {"p1": "one", "p2": "two", "p3": "three"}
    first, out = batch(prompts, batch_id="resume-1")
    assert first.is_failed()  # 1 of 3 failed: over the 20% threshold
    assert (out / "resume-1" / "p2" / "_failure.json").exists()
    done_before = (out / "resume-1" / "p1" / "_success.json").stat()

    calls.clear()
    second, _ = batch(prompts, batch_id="resume-1")
    assert second.name == "Completed"
    summary = second.result()
    assert (summary.resumed, summary.succeeded) == (2, 3)
    assert calls == ["p2"]  # only the unsettled prompt was generated again
    assert not (out / "resume-1" / "p2" / "_failure.json").exists()
    after = (out / "resume-1" / "p1" / "_success.json").stat()
    assert (after.st_ino, after.st_mtime_ns) == (done_before.st_ino, done_before.st_mtime_ns)
    manifest = [
        json.loads(x) for x in (out / "resume-1" / "manifest.jsonl").read_text().splitlines()
    ]
    assert [(r["id"], r["resumed"]) for r in manifest] == [
        ("p1", True),
        ("p2", False),
        ("p3", True),
    ]


def test_rerun_batch_flow_runs_only_the_unsettled_prompts(batch, scripted):
    from imagebatch.flows.rerun_batch import rerun_batch

    calls = _reject_once(scripted, "p2")
    first, out = batch({"p1": "one", "p2": "two", "p3": "three"}, batch_id="rerun-flow")
    assert first.is_failed()
    calls.clear()
    state = asyncio.run(
        rerun_batch(manifest=str(out / "rerun-flow" / "manifest.jsonl"), return_state=True)
    )
    assert state.is_completed()
    summary = state.result()
    assert (summary.batch_id, summary.resumed, summary.succeeded) == ("rerun-flow", 2, 3)
    assert calls == ["p2"]
    assert _flow_run(state).name == "rerun-flow rerun"
    assert _flow_run(first).name == "rerun-flow · 2/3 · $0.00"


def test_the_run_form_can_set_its_own_deadline(batch, scripted):
    calls: list[str] = []
    scripted["primary"] = lambda prompt, n: calls.append(prompt.id) or png()
    state, out = batch({"a": "one", "b": "two"}, batch_id="deadline-1", deadline_s=1e-9)
    summary = state.result(raise_on_failure=False)
    assert state.is_failed() and (summary.skipped, calls) == (2, [])
    record = json.loads((out / "deadline-1" / "manifest.jsonl").read_text().splitlines()[0])
    assert record["status"] == "skipped" and "deadline" in record["error"]


def test_a_settled_prompt_leaves_nothing_in_prefects_result_map(batch, monkeypatch):
    """Prefect maps every task result of a flow run to its state for the run's whole life; the
    flow drops a prompt's entries once it is settled, so memory does not grow with the batch."""
    from prefect.context import FlowRunContext

    import imagebatch.flows.night_end as module  # where every night ends

    linked_runs: list[set] = []
    publish_report = module.publish_report

    async def count_then_report(*args, **kwargs):
        links = FlowRunContext.get().run_results.values()
        linked_runs.append({state.state_details.task_run_id for state, _, _ in links})
        return await publish_report(*args, **kwargs)

    monkeypatch.setattr(module, "publish_report", count_then_report)
    state, _ = batch({f"p{i:02d}": f"a red chair, angle {i}" for i in range(24)})
    assert state.is_completed() and state.result().succeeded == 24
    # left: the batch-level task runs' results (config, prompts, manifest), none of the 72
    # generate, process and publish runs
    assert len(linked_runs) == 1 and 0 < len(linked_runs[0]) <= 6, linked_runs
