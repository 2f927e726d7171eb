"""The resilience core in simulated time: gates, circuits, budgets, daily allowance, router."""

from __future__ import annotations

import asyncio
import itertools
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from imagebatch import errors
from imagebatch.config import parse_config
from imagebatch.emulator import Emulator, EmulatorProfile, ProviderProfile, Window
from imagebatch.models import Prompt
from imagebatch.resilience import (
    CircuitBreaker,
    DailyAllowance,
    FileUsageStore,
    GateSettings,
    MemoryUsageStore,
    NoSharedLimits,
    ProviderGate,
    ProviderNews,
    RetryBudget,
    SpendCap,
    build_router,
)
from imagebatch.wire import request_sent
from tests.simclock import SimClock

# ---------------------------------------------------------------- gate


def _starts_in_any_window(starts: list[float], window: float = 60.0) -> int:
    starts = sorted(starts)
    best, j = 0, 0
    for i, t in enumerate(starts):
        while starts[j] <= t - window:
            j += 1
        best = max(best, i - j + 1)
    return best


def test_no_minute_ever_holds_more_requests_than_the_rate_allows():
    sim = SimClock()
    gate = ProviderGate(GateSettings(rpm=10, max_in_flight=50), clock=sim, sleep=sim.sleep)
    starts: list[float] = []

    async def one() -> None:
        await gate.acquire()
        starts.append(sim())
        await sim.sleep(45)  # a slow call
        gate.release()

    async def many() -> None:
        await asyncio.gather(*(one() for _ in range(120)))

    sim.run(many())
    assert len(starts) == 120
    assert _starts_in_any_window(starts) <= 10
    gaps = [b - a for a, b in zip(sorted(starts), sorted(starts)[1:], strict=False)]
    assert min(gaps) == pytest.approx(60 / 9.5)  # evenly spaced at 95% of the quota: no burst
    assert max(starts) <= 119 * 60 / 9.5 + 1e-6  # and no slower than that


def test_a_call_that_leaves_late_moves_the_ones_claimed_after_it():
    # the first call creates its client and leaves 4 s after the gate let it go; the slots
    # claimed meanwhile assumed it left on time: the 11th would share its minute
    sim = SimClock()
    gate = ProviderGate(GateSettings(rpm=10, max_in_flight=50), clock=sim, sleep=sim.sleep)
    sent: list[float] = []

    async def one(i: int) -> None:
        admission = await gate.acquire()
        if i == 0:
            await sim.sleep(4)
        gate.mark_sent(admission)
        sent.append(sim())
        await sim.sleep(45)
        gate.release()

    async def many() -> None:
        await asyncio.gather(*(one(i) for i in range(40)))

    sim.run(many())
    assert len(sent) == 40
    assert _starts_in_any_window(sent) <= 10
    # only the late call's delay is lost (and the gate's 1 s allowance for arrival jitter)
    assert max(sent) <= 39 * 60 / 9.5 + 4 + 1 + 1e-6


def test_a_429_answered_late_with_the_window_full_teaches_no_lower_quota():
    # ten calls fill the minute; the eleventh is refused, and the refusal takes 15 s to come
    # back: the provider counted the minute before the request reached it, which was full
    sim = SimClock()
    gate = ProviderGate(GateSettings(rpm=10, max_in_flight=50), clock=sim, sleep=sim.sleep)

    async def night() -> None:
        for _ in range(10):
            gate.mark_sent(await gate.acquire())
            gate.release()
        admission = await gate.acquire()
        gate.mark_sent(admission)
        await sim.sleep(15)
        gate.release()
        gate.on_rate_limited(admission, None)

    sim.run(night())
    assert gate.ceiling is None
    assert gate.rate == pytest.approx(9.5)


def test_a_90_second_hint_delays_every_request_of_the_provider():
    sim = SimClock(start=1000.0)
    gate = ProviderGate(GateSettings(rpm=600, max_in_flight=10), clock=sim, sleep=sim.sleep)
    gate.pause(90)
    starts: list[float] = []

    async def one() -> None:
        admission = await gate.acquire()
        starts.append(sim())
        assert admission.waited_s >= 90
        gate.release()

    async def many() -> None:
        await asyncio.gather(*(one() for _ in range(5)))

    sim.run(many())
    assert min(starts) >= 1090


def test_a_hint_that_arrives_while_requests_wait_holds_them_too():
    sim = SimClock()
    gate = ProviderGate(GateSettings(rpm=6, max_in_flight=10), clock=sim, sleep=sim.sleep)
    starts: list[float] = []

    async def one() -> None:
        await gate.acquire()
        starts.append(sim())
        if len(starts) == 1:
            gate.pause(120)  # the first call comes back with a long hint
        gate.release()

    async def many() -> None:
        await asyncio.gather(*(one() for _ in range(3)))

    sim.run(many())
    assert starts[0] == 0 and min(starts[1:]) >= 120


def test_when_the_pace_improves_waiting_requests_take_it_at_once_and_before_newcomers():
    # a probe (w0) left at 0 and succeeded: the gate resumes at half the pace, and 11 requests
    # queue on slots claimed at that pace (12.6 s apart); then a success doubles it, back to
    # the full pace
    sim = SimClock()
    gate = ProviderGate(GateSettings(rpm=10, max_in_flight=50), clock=sim, sleep=sim.sleep)
    full = 60 / 9.5
    starts: dict[str, float] = {}

    async def one(name: str) -> None:
        await gate.acquire()
        starts[name] = sim()
        gate.release()

    async def night() -> None:
        await one("w0")
        gate.slow_start()
        assert gate.interval() == pytest.approx(2 * full)
        waiting = [asyncio.ensure_future(one(f"w{i}")) for i in range(1, 12)]
        await sim.sleep(1)
        gate.on_success()
        late = asyncio.ensure_future(one("newcomer"))  # arrives the moment it improved
        await asyncio.gather(*waiting, late)

    sim.run(night())
    order = [k for k, _ in sorted(starts.items(), key=lambda kv: kv[1])]
    assert order == [f"w{i}" for i in range(12)] + ["newcomer"]  # turns kept, newcomer last
    times = sorted(starts.values())
    assert times[0] == 0 and times[1] == pytest.approx(full)  # one full-pace gap after w0
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps == pytest.approx([full] * 12)  # the full pace at once, not 12.6 s apart


def test_a_request_that_gives_up_its_turn_leaves_no_hole_in_the_pace():
    """A waiting request that moves to another provider gives its turn to the ones behind it:
    the provider keeps its full pace (a hole per move slowed a shared backup to half its pace)."""
    sim = SimClock()
    gate = ProviderGate(
        GateSettings(rpm=60, margin=0.0, max_in_flight=10), clock=sim, sleep=sim.sleep
    )
    starts: dict[str, float] = {}

    async def one(name: str, leaves: bool = False) -> None:
        admission = await gate.acquire(abandon=lambda left: leaves and sim() >= 0.5)
        if admission is None:
            return
        starts[name] = sim()
        gate.mark_sent(admission)
        gate.release()

    async def night() -> None:
        await asyncio.gather(*(one(f"r{i}", leaves=i == 2) for i in range(6)))

    sim.run(night())
    assert "r2" not in starts
    assert [starts[f"r{i}"] for i in (0, 1, 3, 4, 5)] == pytest.approx([0, 1, 2, 3, 4])


def test_in_flight_cap_holds():
    sim = SimClock()
    gate = ProviderGate(GateSettings(rpm=None, max_in_flight=3), clock=sim, sleep=sim.sleep)
    peak = 0

    async def one() -> None:
        nonlocal peak
        await gate.acquire()
        peak = max(peak, gate.in_flight)
        await sim.sleep(10)
        gate.release()

    async def many() -> None:
        await asyncio.gather(*(one() for _ in range(20)))

    sim.run(many())
    assert peak == 3


def test_overload_slows_down_and_successes_bring_the_rate_back():
    sim = SimClock()
    gate = ProviderGate(GateSettings(rpm=20), clock=sim, sleep=sim.sleep)
    assert gate.rate == pytest.approx(19)
    gate.on_overload()
    gate.on_overload()
    assert gate.rate == pytest.approx(4.75)
    for _ in range(20):
        gate.on_success()
    assert gate.rate == pytest.approx(19)


# ---------------------------------------------------------------- a simulated night


def _prices(config):
    def fixed(price: float):
        return lambda prompt: price

    return {p.name: fixed(p.price_for("1K")) for p in config.providers}


FAULT_ERRORS = {
    "rate_limited": errors.RateLimited,
    "rate_limited_no_hint": errors.RateLimited,
    "daily_quota": errors.DailyQuotaExhausted,
    "overloaded": errors.ProviderOverloaded,
    "server_error": errors.ProviderServerError,
    "hang": errors.ProviderTimeout,
    "safety": errors.ContentRefused,
}


def night(
    config_text: str,
    profile: EmulatorProfile,
    prompts: int,
    *,
    concurrency: int | None = 16,
    leaves_after: Callable[[str, int], float] = lambda provider, n: 0.0,
):
    """Run ``prompts`` through the router against the emulator's engine, in simulated time.

    ``leaves_after(provider, n)``: how long the ``n``-th call to ``provider`` takes between
    the gate and the wire (a client created on a first call, a busy event loop).
    ``concurrency=None``: the config's prompts in flight (its default, if it sets none)."""
    sim = SimClock()
    emulator = Emulator(profile, clock=sim)
    config = parse_config(config_text, source="test")
    events: list[tuple[str, str, float]] = []
    router = build_router(
        config,
        _prices(config),
        store=MemoryUsageStore(),
        emit=lambda event, provider, payload: events.append((event, provider, sim())),
        clock=sim,
        sleep=sim.sleep,
    )
    outcomes: dict[str, str] = {}

    calls: dict[str, int] = defaultdict(int)

    async def call(prompt: Prompt, name: str) -> str:
        calls[name] += 1
        await sim.sleep(leaves_after(name, calls[name]))
        request_sent()
        decision = emulator.decide(
            name, wire="gemini", model="m", prompt=prompt.prompt, api_key=None
        )
        await sim.sleep(decision.latency_s)
        emulator.finish(decision, 200 if decision.fault == "ok" else 500, decision.latency_s)
        if decision.fault != "ok":
            raise FAULT_ERRORS[decision.fault](decision.fault, retry_after=decision.retry_after_s)
        return name

    async def one(prompt: Prompt, limit: asyncio.Semaphore) -> None:
        async with limit:
            for attempt in range(config.retry.max_attempts):
                try:
                    outcomes[prompt.id] = await router.attempt(prompt, lambda n: call(prompt, n))
                    return
                except errors.RetryableError:
                    await sim.sleep(
                        config.retry.delays()[min(attempt, len(config.retry.delays()) - 1)]
                    )
                except errors.GiveUpError as exc:
                    outcomes[prompt.id] = exc.final_status
                    return
            outcomes[prompt.id] = "failed"
            router.settled(prompt.id)

    async def run() -> None:
        limit = asyncio.Semaphore(concurrency or config.prompts_in_flight())
        batch = [Prompt(id=f"p{i}", prompt=f"p{i}") for i in range(prompts)]
        router.expect([p.id for p in batch])
        await asyncio.gather(*(one(prompt, limit) for prompt in batch))

    sim.run(run())
    return outcomes, emulator.log, events, sim()


CHAIN = """
providers:
  - {name: primary, kind: local, model: m, limits: {rpm: 10, max_in_flight: 16},
     price_usd: {1K: 0.1}}
  - {name: backup, kind: local, model: m2, limits: {rpm: 5, max_in_flight: 8},
     price_usd: {1K: 0.05}}
renditions: [{name: o, format: png}]
"""


def _stats(log, provider: str):
    calls = [e for e in log if e.provider == provider]
    limited = sum(e.fault.startswith("rate_limited") for e in calls)
    ok = sum(e.fault == "ok" for e in calls)
    return calls, limited, ok


def test_with_a_hidden_lower_quota_the_gate_settles_under_it():
    profile = EmulatorProfile(
        providers={"primary": ProviderProfile(rpm=7, latency_median_s=40, latency_p99_s=90)}
    )
    config = CHAIN.split("  - {name: backup")[0] + "renditions: [{name: o, format: png}]\n"
    outcomes, log, _, _ = night(config, profile, 300)
    calls, limited, ok = _stats(log, "primary")
    assert set(outcomes.values()) == {"primary"}
    assert limited / len(calls) < 0.03
    last_start = max(e.t_sim_s for e in calls)
    assert ok / (last_start / 60 * 7) >= 0.9  # at least 90% of the real quota used


def test_with_the_quota_as_configured_no_call_gets_a_429():
    profile = EmulatorProfile(
        providers={"primary": ProviderProfile(rpm=10, latency_median_s=40, latency_p99_s=90)}
    )
    config = CHAIN.split("  - {name: backup")[0] + "renditions: [{name: o, format: png}]\n"
    _, log, _, _ = night(config, profile, 200)
    calls, limited, ok = _stats(log, "primary")
    assert limited == 0 and ok == 200 == len(calls)


def test_a_first_call_that_leaves_late_costs_no_429():
    # each provider's first call leaves 4 s after its slot; the quota counts from its arrival
    profile = EmulatorProfile(
        providers={
            "primary": ProviderProfile(rpm=10, latency_median_s=40, latency_p99_s=90),
            "backup": ProviderProfile(rpm=5, latency_median_s=30, latency_p99_s=80),
        }
    )
    config = CHAIN + "routing: {spill_over_s: 60}\n"
    outcomes, log, _, _ = night(
        config, profile, 200, concurrency=40, leaves_after=lambda p, n: 4.0 if n == 1 else 0.0
    )
    assert len(outcomes) == 200 and set(outcomes.values()) == {"primary", "backup"}
    assert [e.fault for e in log if e.fault != "ok"] == []
    assert len(log) == 200


def test_overload_window_fails_over_then_back_with_few_extra_calls():
    window = Window(start_s=600, duration_s=900, rate=0.9, extra_latency_s=20)
    profile = EmulatorProfile(
        seed=3,
        providers={
            "primary": ProviderProfile(
                rpm=10, latency_median_s=30, latency_p99_s=60, overload_windows=[window]
            ),
            "backup": ProviderProfile(rpm=5, latency_median_s=20, latency_p99_s=40),
        },
    )
    outcomes, log, events, _ = night(CHAIN, profile, 300)
    assert all(v in ("primary", "backup") for v in outcomes.values()) and len(outcomes) == 300
    kinds = [e for e, _, _ in events]
    assert "imagebatch.circuit.opened" in kinds and "imagebatch.provider.failover" in kinds
    assert "imagebatch.circuit.closed" in kinds and "imagebatch.provider.failback" in kinds
    opened = next(t for e, _, t in events if e == "imagebatch.circuit.opened")
    closed = [t for e, _, t in events if e == "imagebatch.circuit.closed"][-1]
    assert 600 <= opened < 900 and 1500 <= closed <= 1500 + 300 + 120  # back within a probe
    primary = [e for e in log if e.provider == "primary"]
    while_open = [e for e in primary if opened + 60 < e.t_sim_s < 1500]
    # after the circuit opened only probes (one per interval, 300 s) reached the primary
    assert len(while_open) <= (1500 - opened) / 300 + 1
    calls = len(log)
    assert (calls - 300) / 300 < 0.2  # extra calls per success
    # prompts that were queued at the slower backup came back to the recovered primary
    after = [e for e in log if e.t_sim_s > closed]
    assert sum(e.provider == "primary" for e in after) > 0.6 * len(after)


def test_spill_over_puts_every_quota_to_work_and_finishes_near_the_capacity_bound():
    """With ``spill_over_s`` a long queue at the primary spills to the backup; without it the
    backup waits for a failure. Both providers healthy, 200 prompts at once."""
    profile = EmulatorProfile(
        seed=5,
        providers={
            "primary": ProviderProfile(rpm=10, latency_median_s=45, latency_p99_s=100),
            "backup": ProviderProfile(rpm=5, latency_median_s=30, latency_p99_s=80),
        },
    )
    spill = CHAIN.replace("renditions:", "routing: {spill_over_s: 60}\nrenditions:")
    outcomes, log, _, end = night(spill, profile, 200, concurrency=40)
    assert len(outcomes) == 200 and set(outcomes.values()) == {"primary", "backup"}
    assert not any(e.fault.startswith("rate_limited") for e in log)
    # the quota actually available: 10 + 5 RPM less the 5% pacing margin, plus one latency
    bound = 200 / (15 * 0.95) * 60 + 100
    assert end <= 1.1 * bound
    primary = sorted(e.t_sim_s for e in log if e.provider == "primary")
    assert (len(primary) - 1) / ((primary[-1] - primary[0]) / 60) >= 0.9 * 10  # still full pace

    outcomes, log, _, end_priority = night(CHAIN, profile, 200, concurrency=40)
    assert set(outcomes.values()) == {"primary"}  # without it the backup waits for a failure
    assert end_priority > 1.3 * end


#: what a new user writes: quotas and prices, nothing about in-flight caps or spilling over
SAME_MODEL_PAIR = """
providers:
  - {name: studio, kind: gemini, model: gemini-3-pro-image-preview, limits: {rpm: 10},
     price_usd: {1K: 0.134}}
  - {name: vertex, kind: vertex-gemini, model: publishers/google/models/gemini-3-pro-image-preview,
     limits: {rpm: 5}, price_usd: {1K: 0.15}}
renditions: [{name: o, format: png}]
"""
DIFFERENT_MODELS = """
providers:
  - {name: primary, kind: gemini, model: gemini-3-pro-image-preview, limits: {rpm: 10},
     price_usd: {1K: 0.134}}
  - {name: backup, kind: openai, model: gpt-image-1.5, limits: {rpm: 5}, price_usd: {1K: 0.04}}
renditions: [{name: o, format: png}]
"""
HEALTHY = {
    "primary": ProviderProfile(rpm=10, latency_median_s=45, latency_p99_s=100),
    "backup": ProviderProfile(rpm=5, latency_median_s=30, latency_p99_s=80),
}


def test_on_the_defaults_two_providers_of_one_model_share_the_night():
    # the emulator's logical providers are named after the chain's entries
    profile = EmulatorProfile(
        seed=5, providers={"studio": HEALTHY["primary"], "vertex": HEALTHY["backup"]}
    )
    outcomes, log, _, end = night(SAME_MODEL_PAIR, profile, 200, concurrency=None)
    assert len(outcomes) == 200 and set(outcomes.values()) == {"studio", "vertex"}
    assert not any(e.fault.startswith("rate_limited") for e in log) and len(log) == 200
    # the quotas alone admit 200 requests in 200 / 15 minutes; the last answer comes a
    # median latency later
    bound = 200 / 15 * 60 + 45
    assert end <= 1.12 * bound
    for name, rpm in (("studio", 10), ("vertex", 5)):  # each at its own full pace
        starts = sorted(e.t_sim_s for e in log if e.provider == name)
        assert (len(starts) - 1) / ((starts[-1] - starts[0]) / 60) >= 0.9 * rpm


def test_a_prompt_waiting_for_a_place_at_a_full_provider_takes_one_that_frees_at_a_peer():
    """More prompts in flight than the two accounts' places: the ones queued for the first
    account's place move to the second as soon as one of its (shorter) calls ends."""
    pair = SAME_MODEL_PAIR.replace("limits: {rpm: 10}", "limits: {max_in_flight: 1}").replace(
        "limits: {rpm: 5}", "limits: {max_in_flight: 1}"
    )
    profile = EmulatorProfile(
        providers={
            "studio": ProviderProfile(latency_median_s=100, latency_p99_s=100),
            "vertex": ProviderProfile(latency_median_s=10, latency_p99_s=10),
        }
    )
    outcomes, log, _, end = night(pair, profile, 4, concurrency=4)
    assert sorted(outcomes.values()) == ["studio", "vertex", "vertex", "vertex"]
    # studio's one call ends at 100 s; the three others went one after another to vertex
    assert end == pytest.approx(100, abs=1)
    assert sorted(round(e.t_sim_s) for e in log if e.provider == "vertex") == [0, 10, 20]


def test_different_models_keep_to_the_chain_unless_finish_by_needs_the_backup():
    profile = EmulatorProfile(seed=5, providers=HEALTHY)
    outcomes, _, _, end = night(DIFFERENT_MODELS, profile, 200, concurrency=None)
    assert set(outcomes.values()) == {"primary"}  # one model's look: time allowed it
    # the primary alone needs 200 / 9.5 = 21 minutes; finish in 18
    finish_by = (datetime.now(UTC) + timedelta(minutes=18)).isoformat()
    config = DIFFERENT_MODELS + f"finish_by: '{finish_by}'\n"
    outcomes, log, _, end = night(config, profile, 200, concurrency=None)
    assert len(outcomes) == 200 and end <= 18 * 60
    backup = sum(1 for v in outcomes.values() if v == "backup")
    # only what the primary cannot do in time goes to the backup, not a third of the night
    assert 0 < backup < 200 / 3
    assert not any(e.fault.startswith("rate_limited") for e in log)
    # and a finish_by the primary meets on its own sends nothing down the chain
    roomy = (datetime.now(UTC) + timedelta(minutes=40)).isoformat()
    outcomes, _, _, _ = night(DIFFERENT_MODELS + f"finish_by: '{roomy}'\n", profile, 200)
    assert set(outcomes.values()) == {"primary"}


def test_after_an_overload_the_primary_is_back_at_full_pace_within_a_few_successes():
    window = Window(start_s=300, duration_s=900, rate=0.9, extra_latency_s=40, ramp_s=120)
    profile = EmulatorProfile(
        seed=2,
        providers={
            "primary": ProviderProfile(
                rpm=10, latency_median_s=45, latency_p99_s=100, overload_windows=[window]
            ),
            "backup": HEALTHY["backup"],
        },
    )
    outcomes, log, events, end = night(DIFFERENT_MODELS, profile, 200, concurrency=None)
    assert len(outcomes) == 200 and set(outcomes.values()) <= {"primary", "backup"}
    closed = [t for e, p, t in events if e == "imagebatch.circuit.closed" and p == "primary"][-1]
    after = sorted(e.t_sim_s for e in log if e.provider == "primary" and e.t_sim_s > closed)
    # slow start: half, then the full pace as soon as a success comes back; every call waiting
    # meanwhile takes the faster pace at once (not the slot it booked at half)
    gaps = [b - a for a, b in itertools.pairwise(after)]
    full = 60 / 9.5
    assert len(gaps) > 20 and all(g <= 2 * full * 1.01 for g in gaps)
    assert sum(g > full * 1.01 for g in gaps) <= 5
    assert max(gaps[5:]) <= full * 1.01
    # the quota after the circuit closed: the calls left end one latency after the last start
    assert end - closed <= (len(after) - 1) / 9.5 * 60 + 3 * 60 + 100


def test_a_provider_that_sends_three_blank_images_in_a_row_is_out_for_the_night():
    blank = lambda name, n: errors.BlankImage("blank") if name == "primary" else "ok"  # noqa: E731
    router, sim, _ = _router(CHAIN)
    results = [_attempt(router, sim, Prompt(id=f"p{i}", prompt="x"), blank) for i in range(4)]
    # the first two end blocked (a silent filter, as far as anyone can tell), the third is the
    # third blank in a row: the provider is at fault, and that prompt and the rest move on
    assert [type(r).__name__ for r, _ in results[:2]] == ["BlankImage", "BlankImage"]
    assert results[2] == ("backup", ["primary", "backup"])
    assert results[3] == ("backup", ["backup"])
    # with one provider, the prompts end failed (a fault), not blocked
    alone = CHAIN.split("  - {name: backup")[0] + "renditions: [{name: o, format: png}]\n"
    router, sim, _ = _router(alone)
    results = [_attempt(router, sim, Prompt(id=f"p{i}", prompt="x"), blank) for i in range(4)]
    assert [r.final_status for r, _ in results] == ["blocked", "blocked", "failed", "failed"]
    assert "blank images for 3 prompts in a row" in str(results[3][0])
    # the records say so by kind, which is what the night's outcome is judged from
    kinds = [errors.error_kind(r) for r, _ in results]
    assert kinds == ["BlankImage", "BlankImage", errors.FAULTY_PROVIDER, errors.FAULTY_PROVIDER]


# ---------------------------------------------------------------- circuit breaker


def test_circuit_opens_after_exactly_n_then_one_probe_then_closes():
    sim = SimClock()
    changes: list[str] = []
    circuit = CircuitBreaker(threshold=3, probe_interval_s=300, clock=sim, on_change=changes.append)
    tickets = [circuit.allow() for _ in range(4)]
    for t in tickets[:2]:
        circuit.record_failure(t, counts=True)
    assert circuit.state == "closed"
    circuit.record_failure(tickets[2], counts=True)
    assert circuit.state == "open" and changes == ["opened"]
    circuit.record_failure(tickets[3], counts=True)  # was in flight: changes nothing
    assert circuit.allow() is None
    sim.now = 299
    assert circuit.allow() is None
    sim.now = 300
    probe = circuit.allow()
    assert probe is not None and probe.probe and circuit.allow() is None  # a single probe
    circuit.record_success(probe)
    assert circuit.state == "closed" and changes == ["opened", "closed"]


def test_a_failed_probe_reopens_for_another_interval():
    sim = SimClock()
    circuit = CircuitBreaker(threshold=1, probe_interval_s=100, clock=sim)
    circuit.record_failure(circuit.allow(), counts=True)
    sim.now = 100
    circuit.record_failure(circuit.allow(), counts=True)
    assert circuit.state == "open" and circuit.available_in() == 100
    sim.now = 150
    assert circuit.allow() is None


def test_a_slow_failed_probe_does_not_stretch_the_probe_cadence():
    sim = SimClock()
    circuit = CircuitBreaker(threshold=1, probe_interval_s=100, clock=sim)
    circuit.record_failure(circuit.allow(), counts=True)
    sim.now = 100
    probe = circuit.allow()
    assert probe is not None and probe.probe
    sim.now = 180  # overloaded providers fail slowly: the 503 comes back 80 s later
    circuit.record_failure(probe, counts=True)
    assert circuit.state == "open" and circuit.available_in() == 20
    sim.now = 200  # one interval after the failed probe went out
    assert circuit.allow().probe


def test_errors_that_are_not_outages_reset_the_count():
    circuit = CircuitBreaker(threshold=3)
    for counts in (True, True, False, True, True):
        circuit.record_failure(circuit.allow(), counts=counts)
    assert circuit.state == "closed"


# ---------------------------------------------------------------- budgets and daily allowance


def test_retry_budget_caps_extra_calls_at_its_ratio():
    budget = RetryBudget(ratio=0.1, reserve=5, clock=SimClock())  # no time passes
    retries = 0
    for i in range(1000):
        if i % 2:
            budget.refill()  # a success
        elif budget.can_retry():
            budget.spend()
            retries += 1
    assert retries <= 5 + 0.1 * 500


def test_an_empty_retry_budget_comes_back_with_time_so_no_prompt_is_stranded():
    sim = SimClock()
    budget = RetryBudget(ratio=0.1, reserve=2, floor_per_s=1 / 60, clock=sim)
    budget.spend()
    budget.spend()
    assert not budget.can_retry() and budget.retry_in() == pytest.approx(60)
    sim.now = 59
    assert not budget.can_retry()
    sim.now = 60
    assert budget.can_retry()


def test_long_hints_pause_the_provider_without_teaching_it_a_lower_quota():
    """10% of calls get a 429 with a 90 s hint, at random: each pauses the provider (honoured),
    but a 429 right after a pause must not be read as a lower quota, or the pace collapses."""
    profile = EmulatorProfile(
        seed=2,
        providers={
            "primary": ProviderProfile(
                rpm=10, rate_429=0.1, hint_s=90, latency_median_s=45, latency_p99_s=100
            )
        },
    )
    single = CHAIN.split("  - {name: backup")[0] + "renditions: [{name: o, format: png}]\n"
    outcomes, log, _, end = night(single, profile, 100, concurrency=40)
    assert list(outcomes.values()).count("primary") == 100  # the last retries are not stranded
    hinted = [e for e in log if e.fault.startswith("rate_limited")]
    assert hinted
    for h in hinted:  # every hint honoured: nothing started before it ran out
        assert not any(h.t_sim_s < e.t_sim_s < h.t_sim_s + h.hint_s for e in log if e is not h)
    # each hint costs 90 s of a provider that makes ~10 calls a minute: it can be busy 40% of
    # the time at most, so 100 prompts need about 27 minutes at 9.5 RPM
    bound = 100 / (9.5 * 60 / (60 + 0.1 * 10 * 90)) * 60 + 45
    assert end <= 1.2 * bound


def test_spend_never_exceeds_the_cap_with_reservations_in_flight():
    cap = SpendCap(1.0)
    admitted = [cap.try_reserve(0.3) for _ in range(5)]
    assert admitted == [True, True, True, False, False]
    cap.settle(0.3, charged=False)  # one call failed: its reservation comes back
    assert cap.try_reserve(0.3)
    for _ in range(3):
        cap.settle(0.3, charged=True)
    assert cap.spent <= 1.0 and not cap.try_reserve(0.2)


def test_daily_allowance_survives_a_restart_and_resets_at_midnight_pacific(tmp_path):
    clock = [datetime(2026, 11, 28, 7, 59, tzinfo=UTC)]  # 23:59 Pacific on the 27th
    first = DailyAllowance("gemini", 3, store=FileUsageStore(tmp_path), now=lambda: clock[0])
    assert [first.try_consume() for _ in range(2)] == [True, True]
    restarted = DailyAllowance("gemini", 3, store=FileUsageStore(tmp_path), now=lambda: clock[0])
    assert [restarted.try_consume() for _ in range(2)] == [True, False]
    assert not restarted.available()
    assert restarted.seconds_to_reset() == pytest.approx(60)
    clock[0] += timedelta(minutes=2)  # 00:01 Pacific: a new day
    assert restarted.available() and restarted.try_consume()


def test_daily_quota_error_exhausts_the_provider_until_the_reset(tmp_path):
    clock = [datetime(2026, 11, 28, 12, 0, tzinfo=UTC)]
    allowance = DailyAllowance(
        "g", None, store=MemoryUsageStore(), reset="06:00", timezone="UTC", now=lambda: clock[0]
    )
    allowance.exhaust()
    assert not allowance.available() and not allowance.try_consume()
    clock[0] += timedelta(hours=18, minutes=1)
    assert allowance.available()


# ---------------------------------------------------------------- router


def _router(text: str, **kwargs):
    sim = SimClock()
    config = parse_config(text, source="test")
    events: list[str] = []
    router = build_router(
        config,
        _prices(config),
        store=MemoryUsageStore(),
        emit=lambda event, provider, payload: events.append(f"{event}:{provider}"),
        clock=sim,
        sleep=sim.sleep,
        **kwargs,
    )
    return router, sim, events


def _attempt(router, sim, prompt, script):
    calls: list[str] = []

    async def call(name: str) -> str:
        calls.append(name)
        outcome = script(name, len(calls))
        if isinstance(outcome, Exception):
            raise outcome
        return name

    try:
        return sim.run(router.attempt(prompt, call)), calls
    except Exception as exc:
        return exc, calls


def test_a_successful_probe_resumes_at_half_the_pace_doubling_with_each_success():
    # a probe may succeed by luck in the middle of an overload: a full pace at once would send
    # a dozen calls into it before three failures came back and opened the circuit again
    text = CHAIN.split("  - {name: backup")[0] + (
        "renditions: [{name: o, format: png}]\n"
        "routing: {failover_after: 3, probe_interval_s: 300}\n"
    )
    router, sim, _ = _router(text)
    gate = router.lanes[0].gate
    for i in range(3):
        _attempt(
            router,
            sim,
            Prompt(id=f"f{i}", prompt="x"),
            lambda n, k: errors.ProviderOverloaded("503"),
        )
    assert router.lanes[0].circuit.state == "open"
    sim.now += 300
    assert _attempt(router, sim, Prompt(id="probe", prompt="x"), lambda n, k: n)[0] == "primary"
    assert router.lanes[0].circuit.state == "closed"
    rates = [gate.rate]
    for i in range(3):
        assert (
            _attempt(router, sim, Prompt(id=f"ok{i}", prompt="x"), lambda n, k: n)[0] == "primary"
        )
        rates.append(gate.rate)
    assert rates == pytest.approx([9.5 / 2, 9.5, 9.5, 9.5])
    # a 503 meanwhile ends the doubling: the pace comes back additively after it
    gate.slow_start()
    gate.on_overload()
    gate.on_success()
    assert gate.rate == pytest.approx(9.5 / 4 + 0.95)


def test_router_orders_by_priority_or_price_with_the_prompts_preference_first():
    router, _, _ = _router(CHAIN)
    plain, preferring = Prompt(id="a", prompt="x"), Prompt(id="b", prompt="x", provider="backup")
    assert [x.name for x in router.order(plain)] == ["primary", "backup"]
    assert [x.name for x in router.order(preferring)] == ["backup", "primary"]
    cheapest, _, _ = _router(
        CHAIN.replace("renditions:", "routing: {strategy: cheapest}\nrenditions:")
    )
    assert [x.name for x in cheapest.order(plain)] == ["backup", "primary"]


def test_a_prompt_that_keeps_failing_on_one_provider_moves_to_the_next():
    router, sim, _ = _router(CHAIN)
    prompt = Prompt(id="p", prompt="x")
    flaky = lambda name, n: errors.ProviderServerError("500") if name == "primary" else "ok"  # noqa: E731
    for _ in range(2):
        result, calls = _attempt(router, sim, prompt, flaky)
        assert isinstance(result, errors.ProviderServerError) and calls == ["primary"]
    result, calls = _attempt(router, sim, prompt, flaky)
    assert result == "backup" and calls == ["backup"]


def test_auth_failure_disables_a_provider_for_the_run_and_moves_on_now():
    router, sim, _ = _router(CHAIN)
    script = lambda name, n: errors.AuthenticationFailed("401") if name == "primary" else "ok"  # noqa: E731
    result, calls = _attempt(router, sim, Prompt(id="a", prompt="x"), script)
    assert result == "backup" and calls == ["primary", "backup"]
    result, calls = _attempt(router, sim, Prompt(id="b", prompt="x"), script)
    assert calls == ["backup"]


def test_everything_declined_fails_and_quota_gone_skips():
    router, sim, _ = _router(CHAIN)
    result, _ = _attempt(
        router, sim, Prompt(id="a", prompt="x"), lambda n, i: errors.ModelNotFound("404")
    )
    assert isinstance(result, errors.ProvidersExhausted) and result.final_status == "failed"
    router, sim, events = _router(CHAIN)
    result, _ = _attempt(
        router, sim, Prompt(id="a", prompt="x"), lambda n, i: errors.DailyQuotaExhausted("rpd")
    )
    assert isinstance(result, errors.QuotaGone) and result.final_status == "skipped"
    assert "imagebatch.quota.exhausted:primary" in events


def test_budget_and_deadline_skip_prompts_without_calling():
    router, sim, _ = _router(CHAIN.replace("renditions:", "budget_usd: 0.15\nrenditions:"))
    ok = lambda name, n: "ok"  # noqa: E731
    assert _attempt(router, sim, Prompt(id="a", prompt="x"), ok)[0] == "primary"
    result, calls = _attempt(router, sim, Prompt(id="b", prompt="x"), ok)
    assert (
        isinstance(result, errors.BudgetReached)
        and calls == []
        and result.final_status == "skipped"
    )
    router, sim, _ = _router(CHAIN.replace("renditions:", "deadline_s: 100\nrenditions:"))
    sim.now = 101
    result, calls = _attempt(router, sim, Prompt(id="c", prompt="x"), ok)
    assert isinstance(result, errors.DeadlineReached) and calls == []


def test_refused_content_may_try_other_providers_when_configured():
    refuse = lambda name, n: errors.ContentRefused("IMAGE_SAFETY") if name == "primary" else "ok"  # noqa: E731
    router, sim, _ = _router(CHAIN)
    result, _ = _attempt(router, sim, Prompt(id="a", prompt="x"), refuse)
    assert isinstance(result, errors.ContentRefused)
    router, sim, _ = _router(
        CHAIN.replace("renditions:", "routing: {refused_content_failover: true}\nrenditions:")
    )
    result, calls = _attempt(router, sim, Prompt(id="a", prompt="x"), refuse)
    assert result == "backup" and calls == ["primary", "backup"]


def test_shared_limits_are_held_around_the_call_after_the_local_gate():
    """The process's own gate admits first (precise pace); the cross-process slot is held only
    for the call itself, and the time spent waiting for it counts as the attempt's wait."""
    import contextlib

    trace: list[str] = []

    class Shared(NoSharedLimits):
        @contextlib.asynccontextmanager
        async def slot(self, provider, abandon=None):
            lane = next(x for x in router.lanes if x.name == provider)
            trace.append(f"enter {provider} (gate in flight {lane.gate.in_flight})")
            await sim.sleep(2.0)  # other workers hold the shared slots for a while
            yield
            trace.append(f"exit {provider}")

    router, sim, _ = _router(CHAIN, shared=Shared())
    infos = []
    router.on_attempt = lambda prompt, info: infos.append(info)

    def script(name, n):
        trace.append(f"call {name}")
        return name

    result, _ = _attempt(router, sim, Prompt(id="a", prompt="x"), script)
    assert result == "primary"
    assert trace == ["enter primary (gate in flight 1)", "call primary", "exit primary"]
    assert infos[0].waited_s == pytest.approx(2.0, abs=0.01)


class Board:
    """What workers share, kept in memory on one simulated clock: news reaches the others at
    once, and one probe per interval is granted among all (the Prefect side of the same seam is
    tested on a real server in tests/test_shared_limits.py)."""

    def __init__(self, sim: SimClock) -> None:
        self.sim = sim
        self.listeners: list[Callable[[str, ProviderNews], None]] = []
        # the probe slot: who holds it, until when (infinite while the probe is out)
        self.probe_held: dict[str, tuple[object, float, float]] = {}
        self.reports: list[tuple[str, ProviderNews]] = []
        self.probes_refused = 0

    def worker(self) -> NoSharedLimits:
        board = self

        class Shared(NoSharedLimits):
            def report(self, provider, news):
                board.reports.append((provider, news))
                for listener in board.listeners:
                    if listener is not self.listener:
                        listener(provider, news)

            def watch(self, apply):
                self.listener = apply
                board.listeners.append(apply)

            async def claim_probe(self, provider, interval_s):
                holder, until, _ = board.probe_held.get(provider, (None, float("-inf"), 0.0))
                if holder is not self and board.sim.now < until:
                    board.probes_refused += 1
                    return False
                board.probe_held[provider] = (self, float("inf"), interval_s)
                return True

            def probe_ended(self, provider, sent_ago):
                holder, _, interval_s = board.probe_held[provider]
                assert holder is self
                until = board.sim.now if sent_ago is None else board.sim.now - sent_ago + interval_s
                board.probe_held[provider] = (self, until, interval_s)

        return Shared()


def _two_workers(text: str):
    """Two routers (two worker processes) of one config, sharing a board and a clock."""
    sim = SimClock()
    board = Board(sim)
    config = parse_config(text, source="test")
    routers = [
        build_router(
            config,
            _prices(config),
            store=MemoryUsageStore(),
            clock=sim,
            sleep=sim.sleep,
            shared=board.worker(),
        )
        for _ in range(2)
    ]
    return routers, sim, board


def test_a_hint_one_worker_gets_pauses_the_provider_for_every_worker():
    (a, b), sim, board = _two_workers(CHAIN)
    hint = errors.RateLimited("429", retry_after=90.0)
    _attempt(a, sim, Prompt(id="x", prompt="x"), lambda n, k: hint if n == "primary" else n)
    assert board.reports == [("primary", ProviderNews(paused_for=90.0))]
    assert b.lanes[0].gate.paused_for() == pytest.approx(90.0)
    # paused longer than its patience: B's next prompt goes to the backup, none to the primary
    result, calls = _attempt(b, sim, Prompt(id="y", prompt="y"), lambda n, k: n)
    assert (result, calls) == ("backup", ["backup"])
    # a shorter pause from another worker changes nothing
    b.hear("primary", ProviderNews(paused_for=10.0))
    assert b.lanes[0].gate.paused_for() > 80.0


def test_an_open_circuit_holds_for_every_worker_and_they_send_one_probe_per_interval():
    text = CHAIN.replace(
        "renditions:", "routing: {failover_after: 3, probe_interval_s: 300}\nrenditions:"
    )
    (a, b), sim, board = _two_workers(text)
    down = errors.ProviderOverloaded("503")
    for i in range(3):
        _attempt(a, sim, Prompt(id=f"f{i}", prompt="x"), lambda n, k: down)
    assert [lane.circuit.state for lane in (a.lanes[0], b.lanes[0])] == ["open", "open"]
    # B never saw a failure: its prompts go to the backup, and no call of its reaches the primary
    assert _attempt(b, sim, Prompt(id="b0", prompt="x"), lambda n, k: n) == ("backup", ["backup"])

    # one interval later both workers have prompts: one probe in all, by whichever asks first
    sim.now += 300
    primary_calls: list[str] = []

    async def both():
        async def call_as(who: str, name: str) -> str:
            if name == "primary":
                primary_calls.append(who)
                await sim.sleep(20.0)  # the probe takes a while; the other worker goes on
            return name

        return await asyncio.gather(
            a.attempt(Prompt(id="pa", prompt="x"), lambda n: call_as("a", n)),
            b.attempt(Prompt(id="pb", prompt="x"), lambda n: call_as("b", n)),
        )

    results = sim.run(both())
    assert len(primary_calls) == 1 and board.probes_refused == 1
    assert sorted(results) == ["backup", "primary"]
    # the probe succeeded: both circuits closed, and B's next prompt goes to the primary
    assert [lane.circuit.state for lane in (a.lanes[0], b.lanes[0])] == ["closed", "closed"]
    assert [n.circuit for p, n in board.reports if n.circuit] == ["opened", "closed"]
    assert _attempt(b, sim, Prompt(id="b1", prompt="x"), lambda n, k: n) == ("primary", ["primary"])


def test_the_prober_keeps_its_turn_and_others_wait_one_interval_from_when_its_probe_left():
    """Worker A's probes fail while the primary stays down. Each holds the probe slot until one
    interval after it left (not after it was claimed: it may wait at the gate first), so B is
    refused throughout, and A's own next probe is not refused by A's own hold."""
    text = CHAIN.replace(
        "renditions:", "routing: {failover_after: 3, probe_interval_s: 300}\nrenditions:"
    )
    (a, b), sim, board = _two_workers(text)
    down = errors.ProviderOverloaded("503")
    ended: list[tuple[str, float | None]] = []
    a_shared = a.shared
    original = a_shared.probe_ended
    a_shared.probe_ended = lambda p, ago: (ended.append((p, ago)), original(p, ago))[1]
    for i in range(3):
        _attempt(a, sim, Prompt(id=f"f{i}", prompt="x"), lambda n, k: down)
    primary_calls: list[tuple[str, float]] = []

    async def slow_down(who: str, name: str):
        if name == "primary":
            primary_calls.append((who, sim.now))
            await sim.sleep(40.0)  # a slow failure: the interval counts from when it left
            raise errors.ProviderOverloaded("503")
        return name

    start = sim.now
    for step in range(4):  # B half an interval after each of A's probes were due
        sim.now = start + 300 * (step + 1)
        with pytest.raises(errors.ProviderOverloaded):  # A's probe: still down
            sim.run(a.attempt(Prompt(id=f"a{step}", prompt="x"), lambda n: slow_down("a", n)))
        sim.now = start + 300 * (step + 1) + 150
        b_prompt = Prompt(id=f"b{step}", prompt="x")
        assert sim.run(b.attempt(b_prompt, lambda n: slow_down("b", n))) == "backup"
    assert [who for who, _ in primary_calls] == ["a"] * 4
    assert ended == [("primary", pytest.approx(40.0))] * 4
    assert board.probes_refused == 4  # each of B's turns; none of A's own


def test_a_probe_given_up_before_it_left_frees_the_probe_slot_at_once():
    """A's probe of the backup waits at its gate and gives its turn up for the primary: its
    claim goes back at once, so B's probe is not refused for an interval nobody probes in."""
    text = CHAIN.replace(
        "renditions:", "routing: {failover_after: 3, probe_interval_s: 300}\nrenditions:"
    )
    (a, b), sim, board = _two_workers(text)
    down = errors.ProviderOverloaded("503")
    for i in range(3):  # the backup's circuit opens (B's too, on A's news)
        _attempt(a, sim, Prompt(id=f"f{i}", prompt="x", provider="backup"), lambda n, k: down)
    assert b.lanes[1].circuit.state == "open"
    sim.now += 300  # the backup's probe is due
    a.lanes[0].gate.pause(70.0)  # A passes its primary over for now...
    a.lanes[1].gate.pause(20.0)  # ...and its probe waits at the backup's gate meanwhile
    result, calls = _attempt(a, sim, Prompt(id="a", prompt="x"), lambda n, k: n)
    assert (result, calls) == ("primary", ["primary"])  # it gave the probe up for the primary
    prompt = Prompt(id="b", prompt="x", provider="backup")
    assert _attempt(b, sim, prompt, lambda n, k: n) == ("backup", ["backup"])
    assert board.probes_refused == 0


def test_a_call_waiting_for_the_backups_shared_slot_goes_back_when_the_primarys_probe_is_due():
    """Other workers hold the backup's shared slots; a prompt waiting for one leaves the queue
    when the primary's probe comes due, and is that probe (it does not wait in a queue the
    primary's return cannot reach)."""
    import contextlib

    from imagebatch.resilience import SlotGivenUp

    class Shared(NoSharedLimits):
        @contextlib.asynccontextmanager
        async def slot(self, provider, abandon=None):
            free_at = sim.now + 1000.0  # the others hold the backup's slots until then
            while provider == "backup" and sim.now < free_at:
                if abandon is not None and abandon():
                    raise SlotGivenUp()
                await sim.sleep(1.0)
            yield

    text = CHAIN.replace(
        "renditions:", "routing: {failover_after: 3, probe_interval_s: 300}\nrenditions:"
    )
    router, sim, _ = _router(text, shared=Shared())
    down = errors.ProviderOverloaded("503")
    for i in range(3):
        _attempt(router, sim, Prompt(id=f"f{i}", prompt="x"), lambda n, k: down)
    opened_at = router.lanes[0].circuit.opened_at
    sent: list[float] = []
    result, calls = _attempt(
        router, sim, Prompt(id="p", prompt="x"), lambda n, k: sent.append(sim.now)
    )
    assert (result, calls) == ("primary", ["primary"])
    assert sent[0] - opened_at == pytest.approx(300.0, abs=2.0)
    assert router.lanes[0].circuit.state == "closed"
    assert router.spend.spent == pytest.approx(0.1)  # the backup's price was given back


def test_a_call_waiting_for_a_shared_slot_does_not_go_out_into_a_pause_heard_meanwhile():
    import contextlib

    class Shared(NoSharedLimits):
        @contextlib.asynccontextmanager
        async def slot(self, provider, abandon=None):
            if provider == "primary":  # other workers hold the slots; one of them got a hint
                await sim.sleep(2.0)
                router.hear("primary", ProviderNews(paused_for=90.0))
            yield

    router, sim, _ = _router(CHAIN, shared=Shared())
    result, calls = _attempt(router, sim, Prompt(id="a", prompt="x"), lambda n, k: n)
    assert (result, calls) == ("backup", ["backup"])
    assert router.spend.spent == pytest.approx(0.05)  # the primary's price was given back


def test_a_call_waiting_for_a_shared_slot_does_not_go_out_into_a_circuit_opened_meanwhile():
    import contextlib

    class Shared(NoSharedLimits):
        @contextlib.asynccontextmanager
        async def slot(self, provider, abandon=None):
            if provider == "primary":  # another worker's circuit opens while this one waits
                await sim.sleep(2.0)
                router.hear("primary", ProviderNews(circuit="opened", opened_ago=1.0))
            yield

    router, sim, _ = _router(CHAIN, shared=Shared())
    result, calls = _attempt(router, sim, Prompt(id="a", prompt="x"), lambda n, k: n)
    assert (result, calls) == ("backup", ["backup"])
    assert router.lanes[0].circuit.state == "open"


def test_a_worker_that_starts_after_the_circuit_opened_probes_on_the_same_schedule():
    text = CHAIN.replace(
        "renditions:", "routing: {failover_after: 3, probe_interval_s: 300}\nrenditions:"
    )
    (_, b), _, board = _two_workers(text)
    b.hear("primary", ProviderNews(circuit="opened", opened_ago=250.0))
    assert b.lanes[0].circuit.state == "open"
    assert b.lanes[0].circuit.available_in() == pytest.approx(50.0)
    assert not [n for _, n in board.reports], "news heard is not passed on again"
    # closed by another worker's probe while B's own circuit was open: B resumes at half pace
    b.hear("primary", ProviderNews(circuit="closed"))
    assert b.lanes[0].circuit.state == "closed"
    assert b.lanes[0].gate.rate == pytest.approx(9.5 / 2)


# ---------------------------------------------------------------- health across runs


def test_a_batch_starts_from_the_health_the_last_run_recorded(tmp_path):
    from imagebatch.resilience import FileHealthStore, Ticket

    store = FileHealthStore(tmp_path)
    ended = datetime(2026, 11, 28, 2, 0, tzinfo=UTC)
    first, _, _ = _router(CHAIN)
    primary = first.lanes[0]
    for _ in range(3):  # the primary is overloaded when the run ends: its circuit is open
        primary.circuit.record_failure(Ticket(probe=False, generation=0), counts=True)
    primary.used = True
    primary.gate.ceiling = 7.0  # and it had learned a real ceiling below the configured 10 RPM
    recorded = first.health(ended)
    assert set(recorded) == {"primary"}  # the backup was never used: nothing to say about it
    assert (recorded["primary"].state, recorded["primary"].ceiling_rpm) == ("overloaded", 7.0)
    store.write(primary.key, recorded["primary"])

    # a run two minutes later: the primary gets a probe first, three minutes on, and its ceiling
    second, sim, _ = _router(CHAIN)
    saved = {"primary": store.read(second.lanes[0].key)}
    notes = second.start_from(saved, ended + timedelta(minutes=2))
    lane = second.lanes[0]
    assert lane.circuit.state == "open"
    assert lane.circuit.available_in() == pytest.approx(180.0)
    assert lane.gate.ceiling == 7.0 and lane.gate.rate == pytest.approx(7.0 * 0.95)
    assert notes == [
        "primary was overloaded 120 s ago: it gets a probe first, in 180 s",
        "primary starts at its learned ceiling of 7 RPM",
    ]
    result, calls = _attempt(second, sim, Prompt(id="a", prompt="x"), lambda name, n: name)
    assert (result, calls) == ("backup", ["backup"])  # failed over from the first call

    # a run after the probe interval starts normally, and a day later the ceiling is forgotten
    third, _, _ = _router(CHAIN)
    assert third.start_from(saved, ended + timedelta(minutes=6)) == [
        "primary starts at its learned ceiling of 7 RPM"
    ]
    assert third.lanes[0].circuit.state == "closed"
    fourth, _, _ = _router(CHAIN)
    assert fourth.start_from(saved, ended + timedelta(days=2)) == []
    assert fourth.lanes[0].gate.ceiling is None


def test_after_a_failed_probe_the_next_is_due_one_interval_after_it_left_not_after_its_turn():
    text = CHAIN.split("  - {name: backup")[0] + (
        "renditions: [{name: o, format: png}]\n"
        "routing: {failover_after: 3, probe_interval_s: 300}\n"
    )
    router, sim, _ = _router(text)
    circuit = router.lanes[0].circuit
    down = errors.ProviderOverloaded("503")
    for i in range(3):
        _attempt(router, sim, Prompt(id=f"f{i}", prompt="x"), lambda n, k: down)
    sim.now += 300  # the probe's turn...
    router.lanes[0].gate.pause(20.0)  # ...but it waits 20 s at the gate before it leaves
    sent: list[float] = []
    result, _ = _attempt(
        router, sim, Prompt(id="p", prompt="x"), lambda n, k: (sent.append(sim.now), down)[1]
    )
    assert isinstance(result, errors.ProviderOverloaded)
    assert circuit.state == "open"
    assert circuit.available_in() == pytest.approx(300.0 - (sim.now - sent[0]))


def test_a_probe_given_up_for_a_better_provider_leaves_the_next_probe_due():
    """A probe that waited at its gate and gave its turn up because the first provider came
    free must not leave the circuit half-open with no probe out: the next call probes."""
    text = CHAIN.replace(
        "renditions:", "routing: {failover_after: 3, probe_interval_s: 300}\nrenditions:"
    )
    router, sim, _ = _router(text)
    primary, backup = router.lanes
    down = errors.ProviderOverloaded("503")
    for i in range(3):  # the backup's circuit opens
        prompt = Prompt(id=f"b{i}", prompt="x", provider="backup")
        _attempt(router, sim, prompt, lambda n, k: down)
    assert backup.circuit.state == "open"
    sim.now += 300  # its probe is due
    primary.gate.pause(70.0)  # longer than the patience: the primary is passed over, for now
    backup.gate.pause(20.0)  # the probe waits at the backup's gate meanwhile

    calls: list[str] = []

    async def call(name: str) -> str:
        calls.append(name)
        return name

    result = sim.run(router.attempt(Prompt(id="p", prompt="x"), call))
    assert (result, calls) == ("primary", ["primary"])  # it gave the probe up for the primary
    assert backup.circuit.state == "open" and backup.circuit.available_in() == 0
    assert backup.circuit.allow() is not None  # the next call is the backup's probe
