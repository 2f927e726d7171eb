"""The emulator's own behaviour: quotas, reproducibility, time scale, control and log."""

from __future__ import annotations

import httpx
import pytest

from imagebatch.emulator import (
    Emulator,
    EmulatorProfile,
    EmulatorServer,
    ProviderProfile,
    ScriptedFault,
    Window,
    load_profile,
    named_profiles,
)
from imagebatch.errors import ConfigError


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _emulator(clock: FakeClock, scale: float = 1.0, seed: int = 0, **fields) -> Emulator:
    profile = EmulatorProfile(
        seed=seed, time_scale=scale, providers={"primary": ProviderProfile(**fields)}
    )
    return Emulator(profile, clock=clock)


def _ask(emulator: Emulator, prompt: str = "a cat"):
    return emulator.decide("primary", wire="gemini", model="m", prompt=prompt, api_key="k")


def test_rpm_is_a_sliding_window_not_a_fixed_minute():
    clock = FakeClock()
    emulator = _emulator(clock, rpm=3)
    faults = []
    for t in (0, 10, 20, 30, 59.9, 60.5, 70.5, 75):
        clock.now = 1000.0 + t
        faults.append(_ask(emulator).fault)
    # t=30 and 59.9 fall in the window of 0,10,20; at 60.5 the request of t=0 has left it
    assert faults == ["ok", "ok", "ok", "rate_limited", "rate_limited", "ok", "ok", "rate_limited"]


def test_a_rate_limit_hint_is_the_time_until_the_window_frees_a_slot():
    clock = FakeClock()
    emulator = _emulator(clock, rpm=1)
    _ask(emulator)
    clock.now += 15
    decision = _ask(emulator)
    assert decision.fault == "rate_limited" and decision.retry_after_s == pytest.approx(45)


def test_rpd_exhaustion_names_the_daily_quota_and_resets_after_a_day():
    clock = FakeClock()
    emulator = _emulator(clock, rpd=2)
    assert [_ask(emulator).fault for _ in range(3)] == ["ok", "ok", "daily_quota"]
    clock.now += 86400.5
    assert _ask(emulator).fault == "ok"


def test_time_scale_divides_windows_latency_and_hints():
    clock = FakeClock()
    emulator = _emulator(clock, scale=100, rpm=1, latency_median_s=40)
    first = _ask(emulator)
    assert first.latency_s == pytest.approx(0.4)
    clock.now += 0.3  # 30 simulated seconds
    limited = _ask(emulator)
    assert limited.fault == "rate_limited" and limited.retry_after_s == pytest.approx(0.3)
    clock.now += 0.31  # 61 simulated seconds since the first call
    assert _ask(emulator).fault == "ok"


def test_overload_windows_use_simulated_time_and_raise_latency_before():
    clock = FakeClock()
    window = Window(start_s=600, duration_s=900, rate=1.0, extra_latency_s=40, ramp_s=300)
    emulator = _emulator(clock, scale=100, latency_median_s=30, overload_windows=[window])
    clock.now += 2.0  # 200 s: healthy, before the ramp
    assert (_ask(emulator).fault, _ask(emulator).latency_s) == ("ok", pytest.approx(0.3))
    clock.now += 2.5  # 450 s: half way up the ramp
    assert _ask(emulator).latency_s == pytest.approx(0.5)
    clock.now += 3.0  # 750 s: inside the window
    assert _ask(emulator).fault == "overloaded"
    clock.now += 8.0  # 1550 s: after it
    assert _ask(emulator).fault == "ok"


def test_a_night_can_start_at_the_first_request_instead_of_the_reset():
    """A benchmark resets the emulator when its client is ready; a client slow to make its
    first call (a busy Prefect server) must not see the outage come earlier in its night."""
    clock = FakeClock()
    window = Window(start_s=300, duration_s=600)
    emulator = _emulator(clock, scale=10, outage_windows=[window])
    emulator.reset(at_first_request=True)
    assert emulator.sim_now() == 0.0
    clock.now += 40.0  # 400 simulated seconds before the first call
    assert _ask(emulator).fault == "ok" and emulator.log[0].t_sim_s == 0.0
    clock.now += 31.0  # 310 s after the first call: the outage has begun
    assert _ask(emulator).fault == "overloaded" and emulator.log[1].t_sim_s == pytest.approx(310)

    emulator.reset()  # the default: the clock starts at the reset
    clock.now += 40.0
    assert _ask(emulator).fault == "overloaded"


def test_same_seed_same_faults_and_latencies():
    fields = {"overload_rate": 0.3, "rate_429": 0.1, "latency_median_s": 30, "latency_p99_s": 100}

    def run(seed: int) -> list[tuple[str, float]]:
        emulator = _emulator(FakeClock(), seed=seed, **fields)
        return [(d.fault, round(d.latency_s, 6)) for d in (_ask(emulator) for _ in range(200))]

    assert run(5) == run(5)
    assert run(5) != run(6)
    faults = [f for f, _ in run(5)]
    assert 0.2 < faults.count("overloaded") / 200 < 0.4


def test_latency_distribution_has_the_configured_median_and_p99():
    emulator = _emulator(FakeClock(), seed=1, latency_median_s=30, latency_p99_s=100)
    samples = sorted(_ask(emulator).latency_s for _ in range(4000))
    assert samples[2000] == pytest.approx(30, rel=0.08)
    assert samples[3960] == pytest.approx(100, rel=0.2)


def test_scripted_faults_by_request_count_and_safety_keywords():
    emulator = _emulator(
        FakeClock(),
        safety_keywords=["Forbidden"],
        script=[ScriptedFault(first=3, last=5, fault="overloaded")],
    )
    faults = [_ask(emulator).fault for _ in range(6)]
    assert faults == ["ok", "ok", "overloaded", "overloaded", "overloaded", "ok"]
    assert _ask(emulator, "a forbidden thing").fault == "safety"


def test_control_endpoint_switches_faults_and_log_endpoint_reports(tmp_path):
    profile = EmulatorProfile(providers={"primary": ProviderProfile(), "backup": ProviderProfile()})
    body = {"contents": [{"parts": [{"text": "a cat"}]}]}
    with EmulatorServer(profile) as server:
        url = f"{server.provider_url('backup')}/v1beta/models/m:generateContent"
        assert httpx.post(url, json=body).status_code == 200
        changed = httpx.post(f"{server.url}/_emulator/providers/backup", json={"outage": True})
        assert changed.status_code == 200 and changed.json()["outage"] is True
        assert httpx.post(url, json=body).status_code == 503
        bad = httpx.post(f"{server.url}/_emulator/providers/backup", json={"overload_rate": 2})
        assert bad.status_code == 422
        log = httpx.get(f"{server.url}/_emulator/log").json()
        assert log["providers"] == {
            "backup": {"requests": 2, "statuses": {"200": 1, "503": 1}, "wires": {"gemini": 2}}
        }
        assert [r["fault"] for r in log["requests"]] == ["ok", "overloaded"]
        assert httpx.post(f"{server.url}/_emulator/reset").status_code == 200
        assert httpx.get(f"{server.url}/_emulator/log").json()["requests"] == []
        assert (
            httpx.post(
                f"{server.url}/p/nobody/v1beta/models/m:generateContent", json=body
            ).status_code
            == 404
        )


def test_shipped_profiles_load_and_bad_ones_are_named(tmp_path):
    assert {"healthy", "flaky", "overloaded", "outage"} <= set(named_profiles())
    for name in named_profiles():
        assert load_profile(name).providers
    bad = tmp_path / "bad.yaml"
    bad.write_text("providers: {primary: {rpm: -1}}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: invalid emulator profile"):
        load_profile(bad)
    with pytest.raises(ConfigError, match="no such profile"):
        load_profile("nonexistent")
