"""Provider limits shared by several worker processes through Prefect global concurrency limits."""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from imagebatch.config import parse_config
from imagebatch.emulator import (
    EmulatorProfile,
    EmulatorServer,
    ProviderProfile,
    ScriptedFault,
    Window,
)
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


def test_news_merges_keep_the_later_pause_and_the_later_circuit_and_ceiling_change():
    from imagebatch.prefect.news import merge_news as _merge_news
    from imagebatch.prefect.news import news_name

    current = {"paused_until": 100.0, "circuit": "opened", "circuit_at": 50.0}
    # an earlier pause and an older circuit change lose: nothing to write
    assert (
        _merge_news(current, {"paused_until": 90.0, "circuit": "closed", "circuit_at": 40.0}, "w")
        == current
    )
    merged = _merge_news(
        current, {"paused_until": 130.0, "circuit": "closed", "circuit_at": 60.0}, "w2"
    )
    assert (merged["paused_until"], merged["circuit"], merged["circuit_at"]) == (
        130.0,
        "closed",
        60.0,
    )
    assert merged["paused_by"] == merged["circuit_by"] == "w2"
    assert merged["circuit_at_utc"] == "1970-01-01T00:01:00+00:00"
    # a ceiling cleared later wins over the one learned before
    learned = _merge_news({}, {"ceiling": 7, "ceiling_at": 10.0}, "w")
    assert _merge_news(learned, {"ceiling": None, "ceiling_at": 20.0}, "w")["ceiling"] is None
    # variable names allow no dots or capitals
    assert news_name("imagebatch-backup-openai-gpt-image-1.5") == (
        "imagebatch-backup-openai-gpt-image-1_5-news"
    )


def test_a_read_racing_a_write_does_not_bring_back_the_change_before_it():
    """The news variable read just after this worker's probe closed the circuit may still show
    the opening before it (the write is on its way): that is no news, or this worker would open
    its own circuit again. Only a change later than any seen or made counts."""
    from types import SimpleNamespace

    from imagebatch.prefect.shared_limits import PrefectSharedLimits
    from imagebatch.resilience import LimitSpec

    limits = PrefectSharedLimits([LimitSpec("imagebatch-p-local-m-in-flight", "p", "in-flight", 1)])

    def read(circuit: str, at: float):
        return limits._news_from("p", SimpleNamespace(value={"circuit": circuit, "circuit_at": at}))

    now = time.time()
    opened = read("opened", now - 50)
    assert (opened.circuit, round(opened.opened_ago)) == ("opened", 50)
    assert read("opened", now - 50) is None  # the same change twice is news once
    assert read("closed", now - 5).circuit == "closed"
    assert read("opened", now - 50) is None  # a stale read of the earlier change
    assert read("opened", now - 1).circuit == "opened"  # a later opening is news again


def _run_flow(config_path, prompts_path, out, batch_id):
    from imagebatch.batch import BatchRun
    from imagebatch.flows.nightly_batch import nightly_batch

    params = BatchRun(
        prompts=str(prompts_path), config=str(config_path), output=str(out), batch_id=batch_id
    )
    return asyncio.run(nightly_batch(run=params, return_state=True))


@pytest.mark.flow
def test_missing_shared_limits_fail_the_batch_before_any_request(
    tmp_path, prefect_server, monkeypatch
):
    from imagebatch.config import load_config
    from imagebatch.prefect.limit_admin import sync_limits

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


def _start_workers(
    tmp_path, prefect_server, config, scale, per_worker, before_second=None, count=2, tag=""
):
    """``imagebatch limits sync``, then ``count`` ``imagebatch run`` workers of ``per_worker``
    prompts each (prompt texts "worker <w> prompt <i>"); ``before_second()`` is called between
    the first two. ``tag`` keeps the files of several groups of workers in one directory apart."""
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_server,
        "EMULATOR_KEY": "emulator-key",
        "IMAGEBATCH_TIME_SCALE": str(scale),
        "IMAGEBATCH_STATE_DIR": str(tmp_path / f"{tag}state"),  # not shared: the server counts
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
    for w in range(count):
        if w == 1 and before_second is not None:
            before_second()
        prompts = tmp_path / f"{tag}w{w}.jsonl"
        prompts.write_text(
            "".join(
                json.dumps({"id": f"w{w}-{i:02d}", "prompt": f"worker {w} prompt {i}"}) + "\n"
                for i in range(per_worker)
            )
        )
        args = ["run", str(prompts), "--config", str(config), "--output", str(tmp_path / "o")]
        workers.append(
            subprocess.Popen(
                [*cli, *args, "--batch-id", f"{tag}worker-{w}", "--quiet"],
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
    rpm, scale, per_worker, deadline = 20, 2, 60, 210
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


NEWS_CONFIG = """
providers:
  - name: primary
    kind: gemini
    model: {model}-a
    base_url: {url}/p/primary
    api_key_env: EMULATOR_KEY
    limits: {{rpm: 60}}
    timeout_s: 30
  - name: backup
    kind: gemini
    model: {model}-b
    base_url: {url}/p/backup
    api_key_env: EMULATOR_KEY
    limits: {{rpm: 12}}
    timeout_s: 30
renditions: [{{name: original, format: png}}]
shared_limits: true
routing: {{failover_after: 3, probe_interval_s: {probe}}}
"""


def _news(prefect_api: str, config, provider: str) -> dict:
    """The provider's news variable as the workers wrote it ({} before the first write)."""
    from imagebatch.prefect.news import news_name

    specs = shared_limit_specs(parse_config(config.read_text(), source=str(config)))
    prefix = next(s.name for s in specs if s.provider == provider and s.kind == "in-flight")
    name = news_name(prefix.removesuffix("-in-flight"))
    response = httpx.get(f"{prefect_api}/variables/name/{name}")
    return response.json()["value"] if response.status_code == 200 else {}


def _primary_calls(log: dict) -> list[tuple[float, str, int | None]]:
    """(simulated start, worker, status) of every call to the primary, in start order."""
    return sorted(
        (e["t_sim_s"], e["prompt"].split()[1], e["status"])
        for e in log["requests"]
        if e["provider"] == "primary"
    )


@pytest.mark.flow
def test_a_retry_hint_one_worker_gets_holds_every_worker_off_the_provider(
    tmp_path, real_prefect_server
):
    """The primary's 4th call gets a 429 with a 120 s hint. The worker that got it pauses the
    primary; the other hears of it within a second and a poll, and neither sends the primary
    anything until the hint has passed (both use the backup meanwhile)."""
    scale, hint = 4, 120.0
    profile = EmulatorProfile(
        time_scale=scale,
        providers={
            "primary": ProviderProfile(
                latency_median_s=2.0,
                hint_s=hint,
                script=[ScriptedFault(first=4, fault="rate_limited")],
            ),
            "backup": ProviderProfile(latency_median_s=2.0),
        },
    )
    with EmulatorServer(profile) as server:
        config = tmp_path / "c.yaml"
        config.write_text(NEWS_CONFIG.format(url=server.url, model="hint-test", probe=60))
        workers = _start_workers(tmp_path, real_prefect_server, config, scale, 20)
        outputs = [w.communicate(timeout=600) for w in workers]
        log = httpx.get(f"{server.url}/_emulator/log").json()
    for worker, (_out, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err[-3000:]
    calls = _primary_calls(log)
    hinted = [c for c in calls if c[2] == 429]
    assert len(hinted) == 1, calls
    t429, told = hinted[0][0], hinted[0][1]
    # a call the other worker started before it heard (a news poll of 1 s and the read: 2 wall
    # seconds) is allowed; after that, nothing until the hint is over
    heard = t429 + 2.0 * scale + 2.0
    during = [c for c in calls if heard < c[0] < t429 + hint - 1.0]
    assert during == [], f"worker {told} got the hint at {t429:.0f} s; calls: {calls}"
    after = {c[1] for c in calls if c[0] >= t429 + hint - 1.0 and c[2] == 200}
    assert after == {"0", "1"}, f"both workers come back to the primary: {calls}"


@pytest.mark.flow
def test_an_open_circuit_holds_for_a_worker_that_starts_later_and_all_send_one_probe_per_interval(
    tmp_path, real_prefect_server
):
    """The primary is down for its first 240 simulated seconds. Worker 0's circuit opens after
    its first failures; worker 1 starts after that and sends no failing calls of its own: the
    two together send one probe per 60 s interval, and both come back once a probe succeeds."""
    scale, probe, outage = 4, 60.0, 240.0
    profile = EmulatorProfile(
        time_scale=scale,
        providers={
            "primary": ProviderProfile(
                latency_median_s=2.0,
                outage_windows=[Window(start_s=0, duration_s=outage)],
            ),
            "backup": ProviderProfile(latency_median_s=2.0),
        },
    )
    with EmulatorServer(profile) as server:
        config = tmp_path / "c.yaml"
        config.write_text(NEWS_CONFIG.format(url=server.url, model="probe-test", probe=probe))
        second_started: list[float] = []

        def after_the_circuit_opened() -> None:
            deadline = time.monotonic() + 180
            while True:
                log = httpx.get(f"{server.url}/_emulator/log").json()
                failed = [c for c in _primary_calls(log) if c[2] == 503]
                if len(failed) >= 3:
                    break
                assert time.monotonic() < deadline, "worker 0 never reached the primary"
                time.sleep(0.2)
            while _news(real_prefect_server, config, "primary").get("circuit") != "opened":
                assert time.monotonic() < deadline, "worker 0 never told of its open circuit"
                time.sleep(0.2)
            second_started.append(server.emulator.sim_now())

        workers = _start_workers(
            tmp_path, real_prefect_server, config, scale, 60, before_second=after_the_circuit_opened
        )
        outputs = [w.communicate(timeout=900) for w in workers]
        log = httpx.get(f"{server.url}/_emulator/log").json()
    for worker, (_out, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err[-3000:]
    calls = _primary_calls(log)
    later = [c for c in calls if c[0] > second_started[0] and c[0] < outage]
    # one probe per interval in all (a little slack for clocks and the news poll): worker 1
    # sent no opening failures of its own, and the two did not each probe
    probes = [c[0] for c in later]
    assert len(probes) >= 2, f"no probes while the primary was down: {calls}"
    gaps = [b - a for a, b in itertools.pairwise(probes)]
    workers_said = "\n".join(err[-4000:] for _out, err in outputs)
    assert all(gap >= probe - 4.0 for gap in gaps), (
        f"probe starts (time, worker, status) {later}, worker 1 started {second_started[0]:.1f}"
        f"\n{workers_said}"
    )
    # back: a probe succeeded, and every worker still at work a news poll later (both, with
    # 60 prompts each) sends to the primary again
    back = {c[1] for c in calls if c[0] >= outage and c[2] == 200}
    first_back = min(c[0] for c in calls if c[0] >= outage and c[2] == 200)
    working = {e["prompt"].split()[1] for e in log["requests"] if e["t_sim_s"] > first_back + 8}
    assert working == {"0", "1"}, (
        f"a worker ran out of prompts before the primary came back: {calls}"
    )
    assert back == working, calls


CEILING_CONFIG = """
providers:
  - name: primary
    kind: gemini
    model: {model}
    base_url: {url}/p/primary
    api_key_env: EMULATOR_KEY
    limits: {{rpm: 10}}
    timeout_s: 30
renditions: [{{name: original, format: png}}]
shared_limits: true
"""


@pytest.mark.flow
def test_two_workers_learn_a_lower_quota_for_one_429_each_more_than_one_worker(
    tmp_path, real_prefect_server
):
    """The config says 10 RPM, the provider allows 7. One worker alone pays a few 429s to learn
    it; two workers sharing the account pay at most one more each, because the first 429
    lowers the shared window for both. ``limits sync`` afterwards puts the config's quota back."""
    scale, prompts = 4, 20

    def night(model: str, workers: int) -> tuple[list, dict]:
        profile = EmulatorProfile(
            time_scale=scale,
            providers={"primary": ProviderProfile(rpm=7, latency_median_s=2.0)},
        )
        with EmulatorServer(profile) as server:
            config = tmp_path / f"{model}.yaml"
            config.write_text(CEILING_CONFIG.format(url=server.url, model=model))
            procs = _start_workers(
                tmp_path,
                real_prefect_server,
                config,
                scale,
                prompts // workers,
                count=workers,
                tag=f"{model}-",
            )
            outputs = [p.communicate(timeout=600) for p in procs]
            log = httpx.get(f"{server.url}/_emulator/log").json()
        for proc, (_out, err) in zip(procs, outputs, strict=True):
            assert proc.returncode == 0, err[-3000:]
        return _primary_calls(log), {"config": str(config)}

    # both at once (each its own emulator and limits): the test takes one night, not two
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        one_night = pool.submit(night, "ceiling-one", 1)
        (two, extra), (alone, _) = pool.submit(night, "ceiling-two", 2).result(), one_night.result()
    limited_alone = sum(1 for c in alone if c[2] == 429)
    limited_two = sum(1 for c in two if c[2] == 429)
    print(f"429s: one worker {limited_alone}, two workers {limited_two}")
    assert sum(1 for c in two if c[2] == 200) == prompts
    assert limited_two <= limited_alone + 2, (alone, two)

    # the window the two learned is in order for the next batch; a sync puts 10 back
    env = {**os.environ, "PREFECT_API_URL": real_prefect_server, "EMULATOR_KEY": "k"}
    sync = subprocess.run(
        [sys.executable, "-m", "imagebatch.cli", "limits", "sync", "--config", extra["config"]],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert limited_two >= 1  # 10 a minute against 7: the lower quota had to be learned
    assert "reset      imagebatch-primary-gemini-ceiling-two-rpm  (window: limit 10" in (
        sync.stdout
    ), sync.stdout


_HOLDER = """
import asyncio, sys
from imagebatch.resilience import LimitSpec
from imagebatch.prefect.shared_limits import PrefectSharedLimits

async def hold():
    limits = PrefectSharedLimits([LimitSpec(sys.argv[1], "p", "in-flight", 1)])
    async with limits.slot("p"):
        print("holding", flush=True)
        await asyncio.sleep(3600)

asyncio.run(hold())
"""


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
