"""The benchmark cannot rot: every scenario, each contender, a few prompts at a high time scale.

It checks that each run happens and its figures are computed, not what they are (bench/night.py
measures; bench/RESULTS.md has the numbers).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.flow

ALWAYS = (
    "prompts completed",
    "calls",
    "makespan (sim min)",
    "makespan / capacity bound",
    "calls per success",
    "429 share",
    "quota used while healthy",
    "hints honoured",
    "cost per 1,000 images (USD)",
    "wall s",
    "CPU s",
    "busy share of the run",
    "peak RSS (MiB)",
)
WINDOWED = (
    "failover after (sim s)",
    "primary calls after its 3rd failure, in the window",
    "failback after (sim s)",
)


def _smoke(tmp_path, *contenders: str) -> list[dict]:
    out = tmp_path / "runs.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "night.py"),
            "--smoke",
            "--json",
            str(out),
            "--plot",
            str(tmp_path / "overload.png"),
            "--contenders",
            *contenders,
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_every_scenario_runs_and_yields_its_figures(tmp_path):
    from bench.night import scenarios

    runs = _smoke(tmp_path, "naive", "imagebatch")
    expected = {(s, c) for s in scenarios() for c in ("naive", "imagebatch")}
    assert {(r["scenario"], r["contender"]) for r in runs} == expected
    for run in runs:
        figures = run["figures"]
        assert set(ALWAYS) <= set(figures), run
        assert figures["calls"] >= figures["prompts completed"] > 0
        assert 0 <= figures["429 share"] <= 1 and figures["CPU s"] >= 0 < figures["wall s"]
        if scenarios()[run["scenario"]].window:
            assert set(WINDOWED) <= set(figures), run
    for contender in ("naive", "imagebatch"):
        assert (tmp_path / f"overload-{contender}.png").stat().st_size > 1000
