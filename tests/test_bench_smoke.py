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
    from bench.night import ONLY_IN, scenarios

    # imagebatch on a new user's defaults everywhere; a chain of two models where it is run
    runs = _smoke(tmp_path, "naive", "imagebatch-defaults", "imagebatch-chain")
    expected = {(s, c) for s in scenarios() for c in ("naive", "imagebatch-defaults")}
    expected |= {(s, "imagebatch-chain") for s in ONLY_IN["imagebatch-chain"]}
    assert {(r["scenario"], r["contender"]) for r in runs} == expected
    for run in runs:
        figures = run["figures"]
        assert set(ALWAYS) <= set(figures), run
        assert figures["calls"] >= figures["prompts completed"] > 0
        assert 0 <= figures["429 share"] <= 1 and figures["CPU s"] >= 0 < figures["wall s"]
        if scenarios()[run["scenario"]].window:
            assert set(WINDOWED) <= set(figures), run
    for contender in ("naive", "imagebatch-defaults", "imagebatch-chain"):
        assert (tmp_path / f"overload-{contender}.png").stat().st_size > 1000


def test_runs_at_once_keep_each_contenders_cap_and_a_failure_stops_nothing():
    """bench/night.py runs several nights at once: at most ``caps[contender]`` of a kind, and a
    run that fails is reported while the others finish (pure scheduling, no emulator)."""
    import threading

    from bench.night import Run, run_jobs

    lock = threading.Lock()
    active = {"imagebatch": 0, "naive": 0}
    most = {"imagebatch": 0, "naive": 0}
    # the two naive runs must be in flight together, or this barrier times out
    together = threading.Barrier(2, timeout=30)

    def work(job):
        scenario, contender, seed = job
        contender = contender.split("-")[0]
        with lock:
            active[contender] += 1
            most[contender] = max(most[contender], active[contender])
        try:
            if contender == "naive":
                together.wait()
            if seed == 13:
                raise RuntimeError("the server went away")
            return Run(scenario, contender, seed, 1.0)
        finally:
            with lock:
                active[contender] -= 1

    # the imagebatch variants share imagebatch's cap (one Prefect server)
    jobs = [("steady", "imagebatch", s) for s in (1, 13)] + [
        ("steady", "imagebatch-defaults", 2),
        *(("steady", "naive", s) for s in (1, 2)),
    ]
    finished = []
    runs, failures = run_jobs(jobs, work, slots=3, caps={"imagebatch": 1}, done=finished.append)

    assert most == {"imagebatch": 1, "naive": 2}
    assert sorted((r.contender, r.seed) for r in runs) == [
        ("imagebatch", 1),
        ("imagebatch", 2),
        ("naive", 1),
        ("naive", 2),
    ]  # Run records the cap group the work function was given
    assert finished == runs
    assert [(job, str(exc)) for job, exc in failures] == [
        (("steady", "imagebatch", 13), "the server went away")
    ]
