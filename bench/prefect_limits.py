"""How precise is Prefect's ``rate_limit`` as a cross-process pacer? Measured, not assumed.

For each nominal rate, one global concurrency limit (limit 1, slot decay = the rate) is created on a
real Prefect server, and W worker processes call ``rate_limit(name, strict=True)`` in a loop. The
script prints the achieved rate, the largest burst in any window of 1/rate seconds, and the gaps.

    .venv/bin/python bench/prefect_limits.py --rates 0.5 2 --calls 16 --workers 1 2
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


async def _worker(name: str, calls: int) -> list[float]:
    from prefect.concurrency.asyncio import rate_limit

    starts = []
    for _ in range(calls):
        await rate_limit(name, strict=True)
        starts.append(time.time())
    return starts


async def _create(name: str, rate: float) -> None:
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    async with get_client() as client:
        await client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name=name, limit=1, slot_decay_per_second=rate)
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[0.5, 2.0])
    parser.add_argument("--calls", type=int, default=16, help="calls per worker")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(asyncio.run(_worker(args.worker[0], int(args.worker[1])))))
        return

    os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp())
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    print("| nominal /s | workers | calls | achieved /s | share of nominal | max in 1/rate s "
          "| gap p50 s | gap max s |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    with prefect_test_harness(server_startup_timeout=120):
        env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
        for rate in args.rates:
            for workers in args.workers:
                name = f"bench-{rate}-{workers}".replace(".", "-")
                asyncio.run(_create(name, rate))
                procs = [
                    subprocess.Popen(
                        [sys.executable, __file__, "--worker", name, str(args.calls)],
                        env=env,
                        stdout=subprocess.PIPE,
                        text=True,
                    )
                    for _ in range(workers)
                ]
                starts = sorted(t for p in procs for t in json.loads(p.communicate(timeout=600)[0]))
                # the first call of each process only measures its import time: skip the warm-up
                starts = starts[workers:]
                span = starts[-1] - starts[0]
                achieved = (len(starts) - 1) / span if span else float("inf")
                window = 1 / rate
                burst = max(sum(1 for t in starts if s <= t < s + window) for s in starts)
                gaps = [b - a for a, b in itertools.pairwise(starts)]
                print(
                    f"| {rate:g} | {workers} | {len(starts)} | {achieved:.2f} "
                    f"| {achieved / rate:.0%} | {burst} | {statistics.median(gaps):.2f} "
                    f"| {max(gaps):.2f} |"
                )


if __name__ == "__main__":
    main()
