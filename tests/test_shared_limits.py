"""Provider limits shared by several worker processes through Prefect global concurrency limits."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from imagebatch.config import parse_config
from imagebatch.emulator import EmulatorProfile, EmulatorServer, ProviderProfile
from imagebatch.resilience import shared_limit_specs
from tests.conftest import ROOT

CONFIG = """
providers:
  - name: primary
    kind: gemini
    model: gemini-3-pro-image-preview
    base_url: {url}/p/primary
    api_key_env: EMULATOR_KEY
    limits: {{rpm: {rpm}, rpd: {rpd}, max_in_flight: {in_flight}}}
    timeout_s: 30
renditions: [{{name: original, format: png}}]
shared_limits: true
max_in_flight: 8
failure_threshold: 1
"""


def _greedy_starts(slots: int, window_s: float, seconds: float, grant_s: float) -> list[float]:
    """Grant times of a crowd of workers that takes every slot of the window the moment one is
    back; each grant reaches its worker ``grant_s`` later, and the slot is back a window after
    that."""
    back = [0.0] * slots  # when each slot is free again
    starts = []
    while True:
        i = min(range(slots), key=back.__getitem__)
        if back[i] >= seconds:
            return starts
        starts.append(back[i])
        back[i] = back[i] + grant_s + window_s


@pytest.mark.parametrize("rpm", [0.5, 1, 3, 10, 60, 600])
def test_the_shared_window_never_admits_more_than_the_quota_in_any_minute(rpm):
    import random

    from imagebatch.resilience import SHARED_PACE_SLACK_S

    config = parse_config(
        f"providers: [{{name: p, kind: local, model: m, limits: {{rpm: {rpm}}}}}]\n"
        "renditions: [{name: o, format: png}]\n",
        source="t",
    )
    (in_flight, window) = shared_limit_specs(config)
    assert in_flight.kind == "in-flight" and window.kind == "window"
    assert window.slot_decay_per_second is None  # held and given back, not decayed
    jitter = random.Random(str(rpm))
    for grant_s in (0.0, 0.3):
        starts = _greedy_starts(window.limit, window.window_s, 600, grant_s)
        # each request reaches the provider within the slack of its grant, in any order:
        # no closed 60 s window of the provider's clock holds more than the quota
        arrivals = sorted(
            t + grant_s + jitter.uniform(0, SHARED_PACE_SLACK_S - grant_s) for t in starts
        )
        most = max(sum(1 for t in arrivals if s <= t <= s + 60) for s in arrivals)
        assert most <= max(1, rpm)
        # and over ten minutes the quota is used but for the slack and the grants' delay
        assert len(starts) >= 10 * rpm * 60 / (60 + SHARED_PACE_SLACK_S + grant_s) - 1


def test_time_scale_shortens_the_window_and_providers_without_rates_share_in_flight_only():
    text = (
        "providers:\n"
        "  - {name: a, kind: local, model: m, limits: {rpm: 10, max_in_flight: 3}}\n"
        "  - {name: b, kind: local, model: m2}\n"
        "renditions: [{name: o, format: png}]\n"
    )
    specs = shared_limit_specs(parse_config(text, source="t"), time_scale=10)
    assert [(s.name, s.kind, s.limit) for s in specs] == [
        ("imagebatch-a-local-m-in-flight", "in-flight", 3),
        ("imagebatch-a-local-m-rpm", "window", 10),
        ("imagebatch-b-local-m2-in-flight", "in-flight", 4),
    ]
    assert specs[1].window_s == pytest.approx(61 / 10)


def _run_flow(config_path, prompts_path, out, batch_id):
    from flows.nightly_batch import nightly_batch
    from imagebatch.batch import BatchRun

    params = BatchRun(
        prompts=str(prompts_path), config=str(config_path), output=str(out), batch_id=batch_id
    )
    return asyncio.run(nightly_batch(run=params, return_state=True))


@pytest.mark.flow
def test_missing_shared_limits_fail_the_batch_before_any_request(
    tmp_path, prefect_server, monkeypatch
):
    from imagebatch.config import load_config
    from tasks.limits import sync_limits

    monkeypatch.setenv("EMULATOR_KEY", "emulator-key")
    with EmulatorServer(EmulatorProfile(providers={"primary": ProviderProfile()})) as server:
        config = tmp_path / "c.yaml"
        # a model of its own, so no other test has synced these limits
        config.write_text(
            CONFIG.format(url=server.url, rpm=600, rpd=1000, in_flight=2).replace(
                "gemini-3-pro-image-preview", "unsynced-model"
            )
        )
        prompts = tmp_path / "p.jsonl"
        prompts.write_text('{"id": "a", "prompt": "a mug"}\n')
        state = _run_flow(config, prompts, tmp_path / "out", "unsynced")
        assert state.is_failed()
        message = str(state.result(raise_on_failure=False))
        assert (
            "no global concurrency limit 'imagebatch-primary-gemini-unsynced-model-in-flight'"
            in (message)
        )
        assert f"run `imagebatch limits sync --config {config}`" in message
        assert httpx.get(f"{server.url}/_emulator/log").json()["requests"] == []

        done = asyncio.run(sync_limits(load_config(config)))
        assert [what for _, what in done] == ["created", "created"]
        assert [what for _, what in asyncio.run(sync_limits(load_config(config)))] == [
            "unchanged",
            "unchanged",
        ]
        assert _run_flow(config, prompts, tmp_path / "out", "unsynced").is_completed()
        assert len(httpx.get(f"{server.url}/_emulator/log").json()["requests"]) == 1


def _max_overlap(entries: list[dict]) -> int:
    events = []
    for e in entries:
        events += [(e["t_wall_s"], 1), (e["t_wall_s"] + e["latency_s"], -1)]
    most = now = 0
    for _, delta in sorted(events, key=lambda x: (x[0], x[1])):
        now += delta
        most = max(most, now)
    return most


@pytest.mark.flow
def test_two_workers_together_stay_within_the_shared_rpm_rpd_and_in_flight(
    tmp_path, prefect_server
):
    rpm, rpd, in_flight, scale, per_worker = 30, 20, 2, 10, 15
    profile = EmulatorProfile(
        time_scale=scale,
        providers={"primary": ProviderProfile(rpm=rpm, rpd=rpd, latency_median_s=4.0)},
    )
    with EmulatorServer(profile) as server:
        config = tmp_path / "c.yaml"
        config.write_text(CONFIG.format(url=server.url, rpm=rpm, rpd=rpd, in_flight=in_flight))
        workers = _start_workers(tmp_path, prefect_server, config, scale, per_worker)
        outputs = [w.communicate(timeout=600) for w in workers]
        log = httpx.get(f"{server.url}/_emulator/log").json()

    for worker, (_out, err) in zip(workers, outputs, strict=True):
        assert worker.returncode in (0, 1), err[-3000:]  # 1: the day's quota ran out
    entries = log["requests"]
    statuses = log["providers"]["primary"]["statuses"]
    # both workers sent work, the day's allowance was used exactly, and never exceeded
    assert {e["prompt"].split()[1] for e in entries} == {"0", "1"}
    assert statuses == {"200": rpd}
    # no minute (6 wall seconds at this scale) holds more starts than the quota
    starts = sorted(e["t_sim_s"] for e in entries)
    assert max(sum(1 for t in starts if s <= t < s + 60) for s in starts) <= rpm
    assert _max_overlap(entries) <= in_flight
    skipped = sum(
        1
        for w in range(2)
        for line in (tmp_path / "o" / f"worker-{w}" / "manifest.jsonl").read_text().splitlines()
        if json.loads(line)["status"] == "skipped"
    )
    assert skipped == 2 * per_worker - rpd


def _start_workers(tmp_path, prefect_server, config, scale, per_worker) -> list:
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_server,
        "EMULATOR_KEY": "emulator-key",
        "IMAGEBATCH_TIME_SCALE": str(scale),
        "IMAGEBATCH_STATE_DIR": str(tmp_path / "state"),  # not shared: the server counts
    }
    cli = [sys.executable, "-m", "imagebatch.cli"]
    sync = subprocess.run(
        [*cli, "limits", "sync", "--config", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert sync.returncode == 0, sync.stderr
    assert "-rpm  (window: limit" in sync.stdout
    workers = []
    for w in range(2):
        prompts = tmp_path / f"w{w}.jsonl"
        prompts.write_text(
            "".join(
                json.dumps({"id": f"w{w}-{i:02d}", "prompt": f"worker {w} prompt {i}"}) + "\n"
                for i in range(per_worker)
            )
        )
        args = ["run", str(prompts), "--config", str(config), "--output", str(tmp_path / "o")]
        workers.append(
            subprocess.Popen(
                [*cli, *args, "--batch-id", f"worker-{w}", "--quiet"],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return workers


@pytest.mark.flow
def test_two_workers_held_by_the_shared_rpm_use_nine_tenths_of_it_and_never_cross_it(
    tmp_path, real_prefect_server
):
    """Each worker alone would start 19 calls a minute (its gate: the quota less the margin):
    together 38 against a quota of 20, so the shared per-minute limit is the one that binds.
    Both have more prompts than the quota allows before their deadline, so both send to the end.
    On ``prefect server start`` (SQLite), as a user runs it."""
    rpm, scale, per_worker, deadline = 20, 2, 60, 240
    profile = EmulatorProfile(
        time_scale=scale,
        providers={"primary": ProviderProfile(rpm=rpm, latency_median_s=3.0)},
    )
    with EmulatorServer(profile) as server:
        config = tmp_path / "c.yaml"
        # a model of its own: the window is this test's alone
        text = CONFIG.format(url=server.url, rpm=rpm, rpd=100_000, in_flight=8)
        text = text.replace("gemini-3-pro-image-preview", "rpm-bound-model")
        config.write_text(text + f"deadline_s: {deadline}\n")
        workers = _start_workers(tmp_path, real_prefect_server, config, scale, per_worker)
        outputs = [w.communicate(timeout=600) for w in workers]
        log = httpx.get(f"{server.url}/_emulator/log").json()

    for worker, (_out, err) in zip(workers, outputs, strict=True):
        assert worker.returncode in (0, 1), err[-3000:]  # 1: more skipped than the threshold
    entries = log["requests"]
    statuses = log["providers"]["primary"]["statuses"]
    assert set(statuses) == {"200"}, statuses  # not one 429
    starts = sorted(e["t_sim_s"] for e in entries)
    # no sliding minute of the emulator's clock holds more starts than the quota ...
    assert max(sum(1 for t in starts if s <= t <= s + 60) for s in starts) <= rpm
    # ... and the quota is used: in the first three minutes from the first start, while both
    # workers have prompts left, at least 90% of three minutes' quota
    assert {e["prompt"].split()[1] for e in entries} == {"0", "1"}
    assert starts[-1] > starts[0] + 180, "the workers stopped sending early"
    used = sum(1 for t in starts if t < starts[0] + 180) / (3 * rpm)
    print(f"quota used in three minutes: {used:.1%}")
    assert used >= 0.9, f"{used:.0%} of the quota; starts: {[round(t) for t in starts]}"


_HOLDER = """
import asyncio, sys
from imagebatch.resilience import LimitSpec
from tasks.limits import PrefectSharedLimits

async def hold():
    limits = PrefectSharedLimits([LimitSpec(sys.argv[1], "p", "in-flight", 1)])
    async with limits.slot("p"):
        print("holding", flush=True)
        await asyncio.sleep(3600)

asyncio.run(hold())
"""


@pytest.fixture(scope="module")
def real_prefect_server(tmp_path_factory) -> Iterator[str]:
    """``prefect server start``: unlike the test harness's server it runs Prefect's services,
    among them the repossessor that frees expired concurrency leases every 15 s."""
    from bench.night import start_prefect_server

    server, url = start_prefect_server(tmp_path_factory.mktemp("real-prefect"))
    try:
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


@pytest.mark.flow
def test_a_killed_workers_slot_comes_back_and_a_living_one_keeps_it(real_prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    name = "imagebatch-lease-test-in-flight"
    from prefect.settings import PREFECT_API_URL, temporary_settings

    env = {**os.environ, "PREFECT_API_URL": real_prefect_server}
    with (
        temporary_settings({PREFECT_API_URL: real_prefect_server}),
        get_client(sync_client=True) as client,
    ):
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))

        def take() -> bool:
            try:
                response = client.increment_concurrency_slots_with_lease(
                    [name], slots=1, mode="concurrency", lease_duration=60
                )
            except httpx.HTTPStatusError as exc:
                assert exc.response.status_code == 423, exc.response.text
                return False
            client.release_concurrency_slots_with_lease(response.json()["lease_id"])
            return True

        holder = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, name],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert holder.stdout.readline().strip() == "holding"
            held = time.monotonic()
            # alive, it renews its 60 s lease: past the lease and a sweep, the slot is still its
            while time.monotonic() - held < 80:
                assert not take(), (
                    f"a living worker lost its slot after {time.monotonic() - held:.0f} s"
                )
                time.sleep(5)
        finally:
            holder.kill()  # SIGKILL: no release, no more renewals
            holder.wait()
        killed = time.monotonic()
        while not take():
            assert time.monotonic() - killed < 120, "a dead worker's slot was not back in 2 min"
            time.sleep(1)
