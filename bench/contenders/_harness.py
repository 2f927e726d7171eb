"""What every contender process shares: its arguments, the READY line, and its own costs.

Kept free of imagebatch imports: the LiteLLM contender runs it in a separate environment.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Callable


def arguments(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--url", required=True, help="the emulator")
    parser.add_argument("--prompts", required=True, help="JSONL prompt file")
    parser.add_argument("--scale", type=float, required=True, help="simulated s per wall s")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="per call, simulated")
    parser.add_argument("--probe-interval-s", type=float, default=300.0, help="simulated")
    parser.add_argument("--work", required=True, help="a directory of this run's own")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--variant", default="", help="a contender's configuration, by name")
    return parser.parse_args()


def read_prompts(path: str) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def run(body: Callable[[], dict]) -> None:
    """Say READY (the night starts), run ``body``, print its result with wall, CPU and RSS."""
    print("READY", flush=True)
    start_wall = time.perf_counter()
    start = resource.getrusage(resource.RUSAGE_SELF)
    start_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = body()
    wall = time.perf_counter() - start_wall
    end = resource.getrusage(resource.RUSAGE_SELF)
    end_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (end.ru_utime + end.ru_stime - start.ru_utime - start.ru_stime) + (
        end_children.ru_utime
        + end_children.ru_stime
        - start_children.ru_utime
        - start_children.ru_stime
    )
    result.update(wall_s=wall, cpu_s=cpu, rss_mib=round(end.ru_maxrss / 1024))
    print(json.dumps(result), flush=True)
    sys.stdout.flush()
