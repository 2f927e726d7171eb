"""Measure the resilience layer: the real nightly flow, real SDKs, the emulator over HTTP.

    .venv/bin/python bench/resilience.py [--prompts 150] [--time-scale 100] [--seed 1]

Runs three simulated nights (healthy, hidden quota 30% under the configured one, a 15-minute
overload window on the primary) on a temporary Prefect server and prints, per scenario, what the
emulator saw: calls, 429 share, quota use while healthy, extra calls per success, failover and
failback. Numbers, not assertions: the test suite checks behaviour, this measures it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONFIG = """
providers:
  - name: primary
    kind: gemini
    model: gemini-3-pro-image-preview
    base_url: {url}/p/primary
    api_key_env: BENCH_KEY
    limits: {{rpm: 10, max_in_flight: 24}}
    price_usd: {{1K: 0.134}}
    timeout_s: 300
  - name: backup
    kind: openai
    model: gpt-image-1.5
    base_url: {url}/p/backup
    api_key_env: BENCH_KEY
    limits: {{rpm: 5, max_in_flight: 12}}
    price_usd: {{1K: 0.04}}
    timeout_s: 300
routing: {{failover_after: 3, probe_interval_s: 300}}
renditions: [{{name: original, format: png}}]
max_in_flight: 40
"""


def scenarios(seed: int):
    from imagebatch.emulator import ProviderProfile, Window

    latency = {"latency_median_s": 45, "latency_p99_s": 100, "image_px": 32}
    backup = ProviderProfile(rpm=5, latency_median_s=30, latency_p99_s=80, image_px=32)
    return {
        "healthy": ({"primary": ProviderProfile(rpm=10, **latency), "backup": backup}, 10),
        "hidden-quota": ({"primary": ProviderProfile(rpm=7, **latency), "backup": backup}, 7),
        "overload": (
            {
                "primary": ProviderProfile(
                    rpm=10,
                    overload_windows=[
                        Window(
                            start_s=300, duration_s=900, rate=0.9, extra_latency_s=40, ramp_s=120
                        )
                    ],
                    **latency,
                ),
                "backup": backup,
            },
            10,
        ),
    }


def measure(
    log: list, real_rpm: float, overload: tuple[float, float, float] | None, scale: float
) -> dict:
    """Figures from the emulator's log; ``overload`` is (ramp start, start, end) in sim seconds."""
    calls = len(log)
    ok = sum(e.status == 200 for e in log)
    limited = sum(e.status == 429 for e in log)
    first = min(e.t_sim_s for e in log)
    primary = [e for e in log if e.provider == "primary"]
    healthy_end = overload[0] if overload else max(e.t_sim_s for e in primary)
    healthy = [e.t_sim_s for e in primary if e.status == 200 and e.t_sim_s <= healthy_end]
    minutes = (max(healthy) - first) / 60 if len(healthy) > 1 else 0
    used = (len(healthy) - 1) / (minutes * real_rpm) if minutes else None
    row = {
        "calls": calls,
        "succeeded": ok,
        "429 share": f"{limited / calls:.1%}",
        "extra calls per success": f"{(calls - ok) / ok:.2f}" if ok else "-",
        "primary quota used while healthy": f"{used:.0%}" if used else "-",
        "makespan from first call (sim min)": f"{(max(e.t_sim_s for e in log) - first) / 60:.1f}",
    }
    if overload:
        _, start, end = overload
        done = sorted(primary, key=lambda e: e.t_sim_s + e.latency_s * scale)
        fails, third = 0, None
        for entry in done:
            fails = fails + 1 if entry.status != 200 else 0
            if fails == 3 and entry.t_sim_s >= start:
                third = entry.t_sim_s + entry.latency_s * scale
                break
        if third is not None:
            row["primary calls sent after its 3rd failure came back, in the window"] = sum(
                third < e.t_sim_s < end for e in primary
            )
        back = [e for e in primary if e.t_sim_s >= end and e.status == 200]
        row["first primary success after the window (sim s)"] = (
            f"{back[0].t_sim_s - end:.0f}" if back else "never"
        )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=150)
    parser.add_argument(
        "--time-scale",
        type=float,
        default=10.0,
        help="simulated seconds per second; above about 20 the flow's own overhead (tens of ms "
        "per task) is no longer small next to the scaled pacing interval",
    )
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    home = tempfile.mkdtemp(prefix="imagebatch-bench-")
    os.environ.update(
        PREFECT_HOME=home,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_LOGGING_LEVEL="WARNING",
        IMAGEBATCH_STATE_DIR=str(Path(home) / "state"),
        IMAGEBATCH_TIME_SCALE=str(args.time_scale),
        BENCH_KEY="bench",
    )
    from prefect.testing.utilities import prefect_test_harness

    from flows.nightly_batch import nightly_batch
    from imagebatch.batch import BatchRun
    from imagebatch.emulator import EmulatorProfile, EmulatorServer

    results = {}
    with prefect_test_harness(server_startup_timeout=120):
        for name, (providers, real_rpm) in scenarios(args.seed).items():
            work = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=home))
            profile = EmulatorProfile(
                seed=args.seed, time_scale=args.time_scale, providers=providers
            )
            with EmulatorServer(profile) as server:
                (work / "config.yaml").write_text(CONFIG.format(url=server.url))
                (work / "p.jsonl").write_text(
                    "".join(
                        json.dumps({"id": f"p{i:04d}", "prompt": f"product photo {i}"}) + "\n"
                        for i in range(args.prompts)
                    )
                )
                started = time.perf_counter()
                state = asyncio.run(
                    nightly_batch(
                        run=BatchRun(
                            prompts=str(work / "p.jsonl"),
                            config=str(work / "config.yaml"),
                            output=str(work / "out"),
                            batch_id=name,
                        ),
                        return_state=True,
                    )
                )
                wall = time.perf_counter() - started
                window = (180.0, 300.0, 1200.0) if name == "overload" else None
                row = measure(list(server.emulator.log), real_rpm, window, args.time_scale)
            row["state"] = state.name
            row["wall s"] = f"{wall:.0f}"
            results[name] = row
            print(f"{name}: {json.dumps(row)}", flush=True)

    keys = list(dict.fromkeys(k for row in results.values() for k in row))
    print("\n| figure | " + " | ".join(results) + " |")
    print("|---|" + "---:|" * len(results))
    for key in keys:
        print(f"| {key} | " + " | ".join(str(results[n].get(key, "")) for n in results) + " |")


if __name__ == "__main__":
    main()
