"""The pacing rule as plain numbers: no event loop, no clock, no sleeping."""

from __future__ import annotations

import pytest

from imagebatch.resilience.pace import FASTER, LAPSED, GateSettings, Pace


def _starts(pace: Pace, n: int, now: float = 0.0) -> list[float]:
    return [pace.reserve(now).started for _ in range(n)]


def test_starts_are_spaced_evenly_under_the_quota_with_its_margin():
    pace = Pace(GateSettings(rpm=10, margin=0.05))
    starts = _starts(pace, 4)
    gap = 60 / 9.5
    assert starts == pytest.approx([0, gap, 2 * gap, 3 * gap])


def test_no_window_holds_more_than_the_quota_even_when_the_pace_would_allow_it():
    # a pace faster than the quota (a learned ceiling raised, a margin of 0): the window holds
    pace = Pace(GateSettings(rpm=3, margin=0.0))
    pace.rate = 30.0  # 2 s apart
    starts = _starts(pace, 4)
    assert starts[:3] == pytest.approx([0, 2, 4])
    assert starts[3] == pytest.approx(60 + 1)  # the first start left the window, plus jitter


def test_a_hint_pauses_every_start_and_lapses_the_turns_claimed_after_it():
    pace = Pace(GateSettings(rpm=60, margin=0.0))
    later = pace.reserve(0.0), pace.reserve(0.0)
    assert pace.pause(0.5, 30.0) == LAPSED
    assert not later[1].admitted  # its turn (at 1 s) fell inside the pause
    assert pace.paused_for(10.0) == pytest.approx(20.5)
    assert pace.reserve(1.0).started == pytest.approx(30.5)


def test_a_429_well_under_the_quota_teaches_the_real_ceiling_and_a_clean_spell_probes_it_up():
    pace = Pace(GateSettings(rpm=20, margin=0.0, probe_up_after_s=600))
    admissions = [pace.reserve(0.0) for _ in range(6)]  # 3 s apart
    refused = admissions[-1]
    assert pace.on_rate_limited(refused, None, refused.started + 1) == LAPSED
    assert pace.ceiling == pytest.approx(10.0)  # half the rate is the floor of what it learns
    assert pace.target() == pytest.approx(10.0)
    assert pace.on_success(500.0) is None and pace.ceiling == pytest.approx(10.0)  # not yet
    assert pace.on_success(700.0) == FASTER  # 600 s clean: one more a minute is tried
    assert pace.ceiling == pytest.approx(11.0)


def test_overload_slows_down_to_a_floor_and_successes_bring_the_pace_back():
    pace = Pace(GateSettings(rpm=20, margin=0.0))
    for _ in range(5):
        pace.on_overload(0.0)
    assert pace.rate == pytest.approx(5.0)  # a quarter of the target at most
    changes = [pace.on_success(float(t)) for t in range(10)]
    assert changes[0] == FASTER and pace.rate == pytest.approx(20.0)


def test_after_a_probe_it_resumes_at_half_and_doubles_with_each_success():
    pace = Pace(GateSettings(rpm=20, margin=0.0))
    assert pace.slow_start(0.0) == LAPSED and pace.rate == pytest.approx(10.0)
    assert pace.on_success(1.0) == FASTER and pace.rate == pytest.approx(20.0)
    assert pace.on_success(2.0) is None


def test_unpaced_provider_starts_at_once():
    pace = Pace(GateSettings(rpm=None))
    assert _starts(pace, 3, now=5.0) == [5.0, 5.0, 5.0]
    assert pace.interval() == 0.0 and pace.on_overload(0.0) is None
