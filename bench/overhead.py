"""What the orchestration costs per prompt: the nightly flow against the raw provider calls.

    .venv/bin/python bench/overhead.py --prompts 1000 10000

For each prompt count, in a fresh process: (1) the raw provider time, i.e. the local provider's
``generate`` for every prompt at the batch's in-flight cap and nothing else; (2) the whole
nightly flow on the same prompts and config (Prefect task runs per prompt, renditions, records,
manifest), on a Prefect server in another process. The per-prompt overhead is the difference of
the two wall times over the prompt count; the flow's CPU time and peak RSS are its process's own,
and the Prefect server's CPU time over the same run is given beside it (its process tree, read
from /proc before and after the run). Images are small (64 px) so the figure is orchestration,
not Pillow.
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

CONFIG = """
providers:
  - {name: local, kind: local, model: local-render-v1, options: {render_px: 64}}
renditions: [{name: original, format: png}]
publish: {latest_index: false}
max_in_flight: 8
"""


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _child(prompts: int, out: Path) -> None:
    import asyncio

    sys.path.insert(0, str(ROOT))
    from imagebatch.batch import BatchRun
    from imagebatch.config import parse_config
    from imagebatch.flows.nightly_batch import nightly_batch
    from imagebatch.models import Prompt
    from imagebatch.providers import build_provider

    source = out / "prompts.jsonl"
    source.write_text(
        "".join(
            json.dumps({"id": f"p{i:05d}", "prompt": f"product photo number {i}"}) + "\n"
            for i in range(prompts)
        )
    )
    config_path = out / "config.yaml"
    config_path.write_text(CONFIG)
    config = parse_config(CONFIG, source=str(config_path))
    provider = build_provider(config.providers[0], os.environ)

    async def raw() -> None:
        slots = asyncio.Semaphore(config.max_in_flight)

        async def one(i: int) -> None:
            async with slots:
                await provider.generate(Prompt(id=f"p{i:05d}", prompt=f"product photo number {i}"))

        await asyncio.gather(*(one(i) for i in range(prompts)))

    started, cpu = time.perf_counter(), _cpu()
    asyncio.run(raw())
    raw_wall, raw_cpu = time.perf_counter() - started, _cpu() - cpu

    started, cpu = time.perf_counter(), _cpu()
    state = asyncio.run(
        nightly_batch(
            run=BatchRun(
                prompts=str(source),
                config=str(config_path),
                output=str(out / "out"),
                batch_id="overhead",
            ),
            return_state=True,
        )
    )
    flow_wall, flow_cpu = time.perf_counter() - started, _cpu() - cpu
    summary = state.result()
    print(
        json.dumps(
            {
                "prompts": prompts,
                "succeeded": summary.succeeded,
                "raw provider s": round(raw_wall, 2),
                "flow s": round(flow_wall, 1),
                "overhead per prompt (ms)": round((flow_wall - raw_wall) / prompts * 1000, 1),
                "flow CPU per prompt (ms)": round((flow_cpu - 0) / prompts * 1000, 1),
                "raw CPU per prompt (ms)": round(raw_cpu / prompts * 1000, 2),
                "peak RSS (MiB)": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            }
        ),
        flush=True,
    )


def start_server(home: Path) -> tuple[subprocess.Popen, str]:
    sys.path.insert(0, str(ROOT))
    from bench.night import start_prefect_server

    return start_prefect_server(home)


def server_cpu_s(pid: int) -> float:
    """CPU seconds the Prefect server's process tree has used so far."""
    from bench.night import tree_usage

    return tree_usage(pid)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="also write the rows here (e.g. bench/overhead-runs.json)",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.prompts[0], Path(os.environ["BENCH_OUT"]))
        return
    rows = []
    with tempfile.TemporaryDirectory() as home:
        server, api = start_server(Path(home))
        try:
            for n in args.prompts:
                out = Path(tempfile.mkdtemp(dir=home))
                env = {
                    **os.environ,
                    "BENCH_OUT": str(out),
                    "PREFECT_API_URL": api,
                    "IMAGEBATCH_STATE_DIR": str(out / "state"),
                    "PREFECT_LOGGING_LEVEL": "WARNING",
                }
                child = [sys.executable, __file__, "--child", "--prompts", str(n)]
                before = server_cpu_s(server.pid)
                result = subprocess.run(child, env=env, capture_output=True, text=True)
                server_ms = (server_cpu_s(server.pid) - before) / n * 1000
                lines = [x for x in result.stdout.splitlines() if x.startswith("{")]
                if result.returncode or not lines:
                    sys.exit(f"run of {n} prompts failed:\n{result.stderr[-3000:]}")
                row = json.loads(lines[-1])
                row["server CPU per prompt (ms)"] = round(server_ms, 1)
                row["flow + server CPU per prompt (ms)"] = round(
                    row["flow CPU per prompt (ms)"] + server_ms, 1
                )
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            os.killpg(server.pid, 15)
            server.wait(30)
    if args.json:
        _save(args.json, rows)
    keys = list(rows[0])
    print("\n| " + " | ".join(keys) + " |")
    print("|" + "---:|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")


def _save(path: Path, rows: list[dict]) -> None:
    """The raw rows, with what they were measured on (commit, machine), for bench/RESULTS.md."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    path.write_text(
        json.dumps(
            {"command": " ".join(sys.argv), "commit": commit, "cpus": os.cpu_count(), "rows": rows},
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
