"""Peak memory of a batch as it grows: images must stream, one prompt's bytes per slot in flight.

Runs the real nightly flow (local provider, the embedded renditions) for each prompt count in a
fresh process and prints its peak RSS. If a batch kept images (or Prefect results holding them)
in memory, the peak would grow with the prompt count; streaming keeps it flat.

    .venv/bin/python bench/memory.py --prompts 25 100 200 --size 1K
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _child(prompts: int, size: str, out: Path) -> None:
    import asyncio

    from prefect.testing.utilities import prefect_test_harness

    sys.path.insert(0, str(ROOT))
    from imagebatch.batch import BatchRun
    from imagebatch.flows.nightly_batch import nightly_batch

    source = out / "prompts.jsonl"
    source.write_text(
        "".join(
            json.dumps({"id": f"p{i:05d}", "prompt": f"product photo number {i}", "size": size})
            + "\n"
            for i in range(prompts)
        )
    )
    with prefect_test_harness(server_startup_timeout=120):  # the server is another process
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        started = time.perf_counter()
        state = asyncio.run(
            nightly_batch(
                run=BatchRun(prompts=str(source), output=str(out / "out"), batch_id="mem"),
                return_state=True,
            )
        )
        elapsed = time.perf_counter() - started
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    summary = state.result()
    print(
        json.dumps(
            {
                "prompts": prompts,
                "size": size,
                "succeeded": summary.succeeded,
                "rss_before_mib": round(base / 1024, 1),
                "peak_rss_mib": round(peak / 1024, 1),
                "seconds": round(elapsed, 1),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, nargs="+", default=[25, 100, 200])
    parser.add_argument("--size", default="1K", choices=["1K", "2K", "4K"])
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="also write the rows here (e.g. bench/memory-runs.json)",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.prompts[0], args.size, Path(os.environ["BENCH_OUT"]))
        return
    rows = []
    print("| prompts | image size | succeeded | RSS before (MiB) | peak RSS (MiB) | seconds |")
    print("|---:|---|---:|---:|---:|---:|")
    for n in args.prompts:
        with tempfile.TemporaryDirectory() as tmp:
            env = {
                **os.environ,
                "BENCH_OUT": tmp,
                "PREFECT_HOME": tmp,
                "IMAGEBATCH_STATE_DIR": f"{tmp}/state",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_LOGGING_LEVEL": "WARNING",
            }
            child = [sys.executable, __file__, "--child", "--prompts", str(n), "--size", args.size]
            result = subprocess.run(child, env=env, capture_output=True, text=True, check=False)
            lines = [x for x in result.stdout.splitlines() if x.startswith("{")]
            if result.returncode or not lines:
                sys.exit(f"run of {n} prompts failed:\n{result.stderr[-3000:]}")
            r = json.loads(lines[-1])
            rows.append(r)
            print(
                f"| {r['prompts']} | {r['size']} | {r['succeeded']} | {r['rss_before_mib']} "
                f"| {r['peak_rss_mib']} | {r['seconds']} |"
            )
    if args.json:
        from overhead import _save

        _save(args.json, rows)


if __name__ == "__main__":
    main()
