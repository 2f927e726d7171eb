"""The Prefect UI in a real browser: a user starts the nightly batch from its deployment page and
watches it complete, then finds the summary and report artifacts and the night, named after its
batch and figures, in the runs list; fills the Custom-run form (which refuses
invalid values before anything reaches the server); and reads the schedule in their own time zone.

Headless Chromium (Debian's ``chromium`` package, which ``.ci/run`` installs) driven by
Playwright, against a real ``prefect server start`` and ``imagebatch serve`` started here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from imagebatch.emulator import EmulatorProfile, EmulatorServer, ProviderProfile, ScriptedFault
from tests.conftest import ROOT
from tests.gcs import free_port

pytestmark = pytest.mark.flow

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _need_chromium() -> None:
    if Path(CHROMIUM).exists():
        return
    message = f"{CHROMIUM} is missing: `apt-get install -y chromium` (.ci/run does)"
    if os.environ.get("CI"):
        pytest.fail(message)  # CI installs it: its absence there is a defect, not a skip
    pytest.skip(message)


def _wait_http(url: str, timeout_s: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"{url} did not answer: {log.read_text()[-3000:]}"
        time.sleep(0.25)


ROUGH_CONFIG = """
providers:
  - name: primary
    kind: gemini
    model: gemini-3-pro-image-preview
    base_url: {url}
    api_key_env: EMULATOR_KEY
retry: {{base_delay_s: 0.2, max_delay_s: 1}}
renditions:
  - {{name: original, format: png}}
  - {{name: thumb, format: jpeg, max_px: 128}}
"""
ROUGH_PROMPTS = "".join(
    f'{{"id": "{pid}", "prompt": "{text}"}}\n'
    for pid, text in [
        ("mug", "a white mug on a table"),
        ("shoe", "a red running shoe"),
        ("knife", "a forbidden knife"),
        ("lamp", "a brass desk lamp"),
    ]
)


@pytest.fixture(scope="module")
def ui_stack(tmp_path_factory) -> Iterator[dict]:
    """A real Prefect server with its UI, and `imagebatch serve` against it (one per module)."""
    _need_chromium()
    tmp_path = tmp_path_factory.mktemp("ui-stack")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": f"{base}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        "IMAGEBATCH_STATE_DIR": str(tmp_path / "state"),
        "EMULATOR_KEY": "emulator-key",  # the rough night's provider (ROUGH_CONFIG)
    }
    procs: list[subprocess.Popen] = []
    logs = []
    # a provider for a rough night: its first two calls are 503s, and it refuses a keyword
    emulator = EmulatorServer(
        EmulatorProfile(
            providers={
                "primary": ProviderProfile(
                    script=[ScriptedFault(first=1, last=2, fault="overloaded")],
                    safety_keywords=["forbidden"],
                )
            }
        )
    ).start()
    try:
        server_log = tmp_path / "server.log"
        logs.append(open(server_log, "wb"))  # noqa: SIM115 - closed below
        procs.append(
            subprocess.Popen(
                [
                    str(Path(sys.executable).parent / "prefect"),
                    "server",
                    "start",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                ],
                env=env,
                stdout=logs[-1],
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        _wait_http(f"{base}/api/health", 180, procs[0], server_log)

        # the served flows run in this directory: the example prompts, ./output for images
        work = tmp_path / "work"
        (work / "examples").mkdir(parents=True)
        shutil.copy(ROOT / "examples" / "prompts.jsonl", work / "examples" / "prompts.jsonl")
        (work / "rough.yaml").write_text(ROUGH_CONFIG.format(url=emulator.provider_url("primary")))
        (work / "rough.jsonl").write_text(ROUGH_PROMPTS)
        serve_log = tmp_path / "serve.log"
        logs.append(open(serve_log, "wb"))  # noqa: SIM115 - closed below
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "imagebatch.cli",
                    "serve",
                    "--file",
                    str(ROOT / "prefect.yaml"),
                ],
                cwd=work,
                env=env,
                stdout=logs[-1],
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        deadline = time.monotonic() + 120
        while True:
            response = httpx.get(f"{base}/api/deployments/name/nightly-batch/nightly", timeout=5)
            if response.status_code == 200:
                break
            assert procs[1].poll() is None, serve_log.read_text()[-3000:]
            assert time.monotonic() < deadline, serve_log.read_text()[-3000:]
            time.sleep(0.5)
        yield {"base": base, "deployment": response.json()["id"], "work": work}
    finally:
        for proc in reversed(procs):  # serve first: it pauses its schedules on the server
            if proc.poll() is None:
                os.killpg(proc.pid, 15)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, 9)
        for log in logs:
            log.close()
        emulator.stop()


@contextmanager
def _browser_page(tmp_path: Path, timezone_id: str = "UTC") -> Iterator:
    """A page in headless Chromium as a user in ``timezone_id``; a screenshot if the test fails."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        context = browser.new_context(
            timezone_id=timezone_id, viewport={"width": 1400, "height": 1000}
        )
        # the UI calls an analytics host even with analytics off: nothing leaves the machine
        context.route(re.compile(r"^https?://(?!127\.0\.0\.1)"), lambda route: route.abort())
        page = context.new_page()
        try:
            yield page
        except Exception:
            page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
            raise
        finally:
            browser.close()


def _is_create_run(response) -> bool:
    return response.url.endswith("/create_flow_run") and response.request.method == "POST"


def _manifest_lines(work: Path, batch_id: str) -> list[str]:
    manifest = work / "output" / batch_id / "manifest.jsonl"
    assert manifest.exists(), sorted(p.name for p in (work / "output").glob("*"))
    return manifest.read_text().splitlines()


EXAMPLE_PROMPTS = len((ROOT / "examples" / "prompts.jsonl").read_text().splitlines())


def test_quick_run_from_the_deployment_page_completes_with_its_artifacts(ui_stack, tmp_path):
    base = ui_stack["base"]
    with _browser_page(tmp_path) as page:
        page.goto(f"{base}/v2/deployments/deployment/{ui_stack['deployment']}")
        page.get_by_text("nightly-batch").first.wait_for(timeout=60_000)
        run_button = page.get_by_role("button", name="Run", exact=True)
        run_button.wait_for(state="visible", timeout=60_000)
        for attempt in (1, 2):
            run_button.click()
            with page.expect_response(_is_create_run, timeout=60_000) as created:
                page.get_by_role("menuitem", name="Quick run").click()
            response = created.value
            # a busy SQLite server on 2 cores can answer 5xx once; a user clicks again
            if response.status < 500 or attempt == 2:
                break
        assert response.ok, f"{response.status} {response.url}: {response.text()[:2000]}"
        run_id, parameters = response.json()["id"], response.json()["parameters"]

        page.goto(f"{base}/v2/runs/flow-run/{run_id}")
        page.get_by_text("Completed", exact=True).first.wait_for(timeout=180_000)
        page.get_by_role("tab", name="Artifacts").click()
        page.get_by_text("imagebatch-summary").first.wait_for(timeout=60_000)
        page.get_by_text("imagebatch-report").first.wait_for(timeout=60_000)
        page.screenshot(path=str(tmp_path / "flow-run.png"), full_page=True)

        # the batch really ran: its manifest is where the served flow wrote it, under the
        # default batch id (the prompt file's name and the run's date)
        assert parameters.get("run", {}).get("batch_id") is None  # a Quick run leaves it be
        manifests = list((ui_stack["work"] / "output").glob("prompts-*/manifest.jsonl"))
        assert len(manifests) == 1
        assert len(manifests[0].read_text().splitlines()) == EXAMPLE_PROMPTS

        # the runs list tells the night apart: its name carries the batch and its figures, and
        # the same row shows the outcome
        name = f"{manifests[0].parent.name} · {EXAMPLE_PROMPTS}/{EXAMPLE_PROMPTS} · $0.00"
        page.goto(f"{base}/v2/runs")
        page.get_by_text(name, exact=True).first.wait_for(timeout=60_000)
        row = page.locator("div", has=page.get_by_text(name, exact=True)).filter(
            has_text="Completed"
        )
        assert row.count() > 0, "the run's name and its state are not in one row"
        assert "Failed" not in row.last.inner_text()
        page.screenshot(path=str(tmp_path / "runs-list.png"), full_page=True)

    assert (tmp_path / "flow-run.png").stat().st_size > 10_000
    assert (tmp_path / "runs-list.png").stat().st_size > 10_000


def test_custom_run_form_refuses_invalid_values_and_runs_what_was_entered(ui_stack, tmp_path):
    base = ui_stack["base"]
    created: list = []
    with _browser_page(tmp_path) as page:
        page.on("response", lambda r: created.append(r) if _is_create_run(r) else None)
        page.goto(f"{base}/v2/deployments/deployment/{ui_stack['deployment']}")
        run_button = page.get_by_role("button", name="Run", exact=True)
        run_button.wait_for(state="visible", timeout=60_000)
        run_button.click()
        page.get_by_role("menuitem", name="Custom run").click()

        def field(label: str, kind: str):
            """The form field under ``label``, switched from "None" to its ``kind`` tab."""
            name = page.get_by_text(label, exact=True)
            name.wait_for(timeout=60_000)
            box = page.locator("div", has=name).filter(has=page.get_by_role("tab", name=kind)).last
            box.get_by_role("tab", name=kind).click()
            return box

        in_flight = field("Max In Flight (Optional)", "int").get_by_role("spinbutton")
        in_flight.fill("0")
        # pydantic's ge=1 reaches the form as the input's min: the browser refuses 0 itself
        assert in_flight.evaluate("e => e.min") == "1"
        assert in_flight.evaluate("e => e.validity.valid") is False
        page.get_by_role("button", name="Submit").click()
        assert in_flight.evaluate("e => e.form !== null && !e.form.checkValidity()") is True

        in_flight.fill("2")
        assert in_flight.evaluate("e => e.validity.valid") is True
        field("Batch Id (Optional)", "str").get_by_role("textbox").fill("ui-custom-1")
        with page.expect_response(_is_create_run, timeout=60_000) as response_info:
            page.get_by_role("button", name="Submit").click()
        response = response_info.value
        assert response.ok, f"{response.status}: {response.text()[:2000]}"
        run = response.json()
        assert run["parameters"]["run"]["batch_id"] == "ui-custom-1"
        assert run["parameters"]["run"]["max_in_flight"] == 2
        # the click on Submit with 0 in the form sent nothing: this is the only run created
        assert len(created) == 1

        page.goto(f"{base}/v2/runs/flow-run/{run['id']}")
        page.get_by_role("tab", name="Artifacts").wait_for(timeout=60_000)
        page.get_by_text("Completed", exact=True).first.wait_for(timeout=180_000)
        page.screenshot(path=str(tmp_path / "custom-run.png"), full_page=True)

    assert len(_manifest_lines(ui_stack["work"], "ui-custom-1")) == EXAMPLE_PROMPTS


@pytest.mark.parametrize("timezone_id", ["America/New_York", "Asia/Tokyo"])
def test_schedule_times_show_in_the_users_time_zone(ui_stack, tmp_path, timezone_id):
    """prefect.yaml says 02:00 UTC; a user elsewhere sees the next run in their own time."""
    from datetime import datetime
    from zoneinfo import ZoneInfo

    import yaml

    definition = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    nightly = next(d for d in definition["deployments"] if d["name"] == "nightly")
    schedule = nightly["schedules"][0]
    minute, hour = (int(x) for x in schedule["cron"].split()[:2])
    base = ui_stack["base"]
    runs = httpx.post(
        f"{base}/api/flow_runs/filter",
        json={
            "deployments": {"id": {"any_": [ui_stack["deployment"]]}},
            "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
            "sort": "EXPECTED_START_TIME_ASC",
            "limit": 1,
        },
    ).json()
    assert runs, "the server scheduled no nightly run"
    start = datetime.fromisoformat(runs[0]["expected_start_time"])
    in_schedule_zone = start.astimezone(ZoneInfo(schedule["timezone"]))
    assert (in_schedule_zone.hour, in_schedule_zone.minute) == (hour, minute)
    local = start.astimezone(ZoneInfo(timezone_id))
    assert local.hour != hour  # the zone really differs, or this test shows nothing

    with _browser_page(tmp_path, timezone_id) as page:
        page.goto(f"{base}/v2/deployments/deployment/{ui_stack['deployment']}")
        page.get_by_role("button", name="Run", exact=True).wait_for(timeout=60_000)
        # "Next Run" is in the browser's zone ...
        page.get_by_text(local.strftime("%Y/%m/%d %I:%M:%S %p")).first.wait_for(timeout=60_000)
        # ... while the schedule card reads the cron in the schedule's own zone (README says so)
        card = datetime(2000, 1, 1, hour, minute).strftime("At %I:%M %p")
        page.get_by_text(card, exact=True).first.wait_for(timeout=30_000)
        page.screenshot(path=str(tmp_path / "schedule.png"), full_page=True)


def test_a_rough_nights_report_shows_its_retried_prompts_and_contact_sheet(ui_stack, tmp_path):
    """The operator opens the night's report: the prompts that needed retries link their
    generate task runs, and the contact sheet is named (local output has no web address)."""
    base = ui_stack["base"]
    for _ in range(5):  # a busy SQLite server on 2 cores can answer 503 for a moment
        response = httpx.post(
            f"{base}/api/deployments/{ui_stack['deployment']}/create_flow_run",
            json={
                "parameters": {
                    "run": {
                        "prompts": "rough.jsonl",
                        "config": "rough.yaml",
                        "batch_id": "ui-rough",
                    }
                }
            },
            timeout=30,
        )
        if response.status_code < 500:
            break
        time.sleep(2)
    assert response.status_code == 201, response.text
    run_id = response.json()["id"]
    deadline = time.monotonic() + 240
    while True:
        run = httpx.get(f"{base}/api/flow_runs/{run_id}", timeout=10).json()
        if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            break
        assert time.monotonic() < deadline, f"the rough night never ended: {run['state']}"
        time.sleep(1)
    assert run["state"]["type"] == "COMPLETED", run["state"]
    records = [json.loads(x) for x in _manifest_lines(ui_stack["work"], "ui-rough")]
    retried = sorted(r["id"] for r in records if len(r["attempts"]) > 1)
    assert retried, "the two 503s retried no prompt"
    assert {r["id"]: r["status"] for r in records}["knife"] == "blocked"
    assert (ui_stack["work"] / "output" / "ui-rough" / "contact-sheet.png").stat().st_size > 1000

    with _browser_page(tmp_path) as page:
        page.goto(f"{base}/v2/runs/flow-run/{run_id}")
        page.get_by_role("tab", name="Artifacts").click()
        page.get_by_text("imagebatch-report").first.click()
        page.get_by_role(
            "heading", name="Prompts that needed retries or another provider"
        ).wait_for(timeout=60_000)
        page.get_by_role("heading", name="Contact sheet").wait_for(timeout=10_000)
        # local output: the UI opens no file:// link, so the report names the sheet's path
        sheet = ui_stack["work"] / "output" / "ui-rough" / "contact-sheet.png"
        page.get_by_text(str(sheet), exact=True).wait_for(timeout=10_000)
        for prompt_id in retried:
            assert page.get_by_role("link", name=f"generate-{prompt_id}").count() == 1
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)

        # the link leads to that prompt's generate task run, with its retry in its states
        page.get_by_role("link", name=f"generate-{retried[0]}").click()
        page.wait_for_url(re.compile(r"/runs/task-run/"), timeout=60_000)
        page.get_by_text(f"generate-{retried[0]}").first.wait_for(timeout=60_000)
        page.get_by_text(re.compile(r"HTTP 503\] ProviderOverloaded")).first.wait_for(
            timeout=60_000
        )
        page.screenshot(path=str(tmp_path / "retried-task-run.png"), full_page=True)

    assert (tmp_path / "report.png").stat().st_size > 10_000
