"""The Prefect UI in a real browser: a user starts the nightly batch from its deployment page and
watches it complete, then finds the summary artifact.

Headless Chromium (Debian's ``chromium`` package, which ``.ci/run`` installs) driven by
Playwright, against a real ``prefect server start`` and ``imagebatch serve`` started here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

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


@pytest.fixture
def ui_stack(tmp_path) -> Iterator[dict]:
    """A real Prefect server with its UI, and `imagebatch serve` against it."""
    _need_chromium()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": f"{base}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        "IMAGEBATCH_STATE_DIR": str(tmp_path / "state"),
    }
    procs: list[subprocess.Popen] = []
    logs = []
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


def test_quick_run_from_the_deployment_page_completes_with_its_artifacts(ui_stack, tmp_path):
    from playwright.sync_api import sync_playwright

    base = ui_stack["base"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        context = browser.new_context(timezone_id="UTC", viewport={"width": 1400, "height": 1000})
        # the UI calls an analytics host even with analytics off: nothing leaves the machine
        context.route(re.compile(r"^https?://(?!127\.0\.0\.1)"), lambda route: route.abort())
        page = context.new_page()
        try:
            page.goto(f"{base}/v2/deployments/deployment/{ui_stack['deployment']}")
            page.get_by_text("nightly-batch").first.wait_for(timeout=60_000)
            run_button = page.get_by_role("button", name="Run", exact=True)
            run_button.wait_for(state="visible", timeout=60_000)
            for attempt in (1, 2):
                run_button.click()
                with page.expect_response(
                    lambda r: r.url.endswith("/create_flow_run") and r.request.method == "POST",
                    timeout=60_000,
                ) as created:
                    page.get_by_role("menuitem", name="Quick run").click()
                response = created.value
                # a busy SQLite server on 2 cores can answer 5xx once; a user clicks again
                if response.status < 500 or attempt == 2:
                    break
            assert response.ok, f"{response.status} {response.url}: {response.text()[:2000]}"
            run_id = response.json()["id"]

            page.goto(f"{base}/v2/runs/flow-run/{run_id}")
            page.get_by_text("Completed", exact=True).first.wait_for(timeout=180_000)
            page.get_by_role("tab", name="Artifacts").click()
            page.get_by_text("imagebatch-summary").first.wait_for(timeout=60_000)
            page.screenshot(path=str(tmp_path / "flow-run.png"), full_page=True)
        except Exception:
            page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
            raise
        finally:
            browser.close()

    # and the batch really ran: its manifest is where the served flow wrote it
    manifests = list((ui_stack["work"] / "output").glob("*/manifest.jsonl"))
    assert len(manifests) == 1
    assert len(manifests[0].read_text().splitlines()) == len(
        (ROOT / "examples" / "prompts.jsonl").read_text().splitlines()
    )
    assert (tmp_path / "flow-run.png").stat().st_size > 10_000
