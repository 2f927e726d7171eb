"""Two workers sharing one provider's per-minute quota through the Prefect server.

    .venv/bin/python bench/shared_rpm.py --json bench/shared-rpm-runs.json   # about 6 minutes

Two ``imagebatch run`` processes (the CLI as a user runs it, each its own batch of 100 prompts)
against one ``prefect server start`` (SQLite, as a user starts it) and one emulator provider
with a 10 RPM quota and the night benchmark's latency (median 45 s, p99 100 s), at time scale 5.
The config is what a new user writes to share an account: ``rpm: 10`` and
``shared_limits: true``, every other setting its default. Each worker's own gate would start
about 9.5 calls a minute, so together they would send nearly twice the quota: the shared
window (``imagebatch limits sync``) is the limit that binds.

Figures, all from the emulator's request log (what the provider saw), in simulated time:
429s and other refusals; the most starts in any 60 s window; the quota used while both workers
still had prompts to send (starts from the first start to the earlier of the two workers' last
starts, over the quota of that span); each worker's share; the Prefect server's CPU seconds over
the run. Raw data: the figures and every request's time, worker and status.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
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
    api_key_env: EMULATOR_KEY
    limits: {{rpm: {rpm}}}
renditions: [{{name: original, format: png}}]
shared_limits: true
"""


def main() -> None:
    from bench.night import LATENCY, start_prefect_server, tree_usage
    from imagebatch.emulator import EmulatorProfile, EmulatorServer, ProviderProfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rpm", type=float, default=10.0)
    parser.add_argument("--prompts", type=int, default=100, help="per worker")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--scale", type=float, default=5.0)
    parser.add_argument("--json", type=Path, default=None, help="write the raw data here")
    parser.add_argument(
        "--figures-of", type=Path, default=None, help="print the figures of a raw data file"
    )
    args = parser.parse_args()
    if args.figures_of:  # figures computed again from a saved log (e.g. by a newer figures())
        saved = json.loads(args.figures_of.read_text())
        row = saved["figures"]
        print(json.dumps(figures(saved["log"], row["rpm"], row["workers"]), indent=2))
        return

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        (home / "prefect").mkdir()
        server, api = start_prefect_server(home / "prefect")
        try:
            profile = EmulatorProfile(
                time_scale=args.scale,
                providers={"primary": ProviderProfile(rpm=args.rpm, **LATENCY)},
            )
            with EmulatorServer(profile) as emulator:
                config = home / "config.yaml"
                config.write_text(CONFIG.format(url=emulator.url, rpm=args.rpm))
                env = {
                    **os.environ,
                    "PREFECT_API_URL": api,
                    "EMULATOR_KEY": "emulator-key",
                    "IMAGEBATCH_TIME_SCALE": str(args.scale),
                    "IMAGEBATCH_STATE_DIR": str(home / "state"),
                }
                cli = [sys.executable, "-m", "imagebatch.cli"]
                sync = subprocess.run(
                    [*cli, "limits", "sync", "--config", str(config)],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                )
                print(sync.stdout.strip(), flush=True)
                cpu_before = tree_usage(server.pid)[0]
                started = time.perf_counter()
                workers = []
                for w in range(args.workers):
                    prompts = home / f"w{w}.jsonl"
                    prompts.write_text(
                        "".join(
                            json.dumps({"id": f"w{w}-{i:03d}", "prompt": f"worker {w} prompt {i}"})
                            + "\n"
                            for i in range(args.prompts)
                        )
                    )
                    run = ["run", str(prompts), "--config", str(config)]
                    run += ["--output", str(home / "out"), "--batch-id", f"worker-{w}", "--quiet"]
                    workers.append(
                        subprocess.Popen(
                            [*cli, *run], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
                        )
                    )
                outputs = [w.communicate() for w in workers]
                wall = time.perf_counter() - started
                server_cpu = tree_usage(server.pid)[0] - cpu_before
                log = emulator.emulator.log
                entries = [
                    {
                        "t_sim_s": round(e.t_sim_s, 3),
                        "worker": e.prompt.split()[1],
                        "status": e.status,
                    }
                    for e in log
                ]
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(60)
    codes = [w.returncode for w in workers]
    for code, (_out, err) in zip(codes, outputs, strict=True):
        if code != 0:
            print(err.decode()[-3000:], file=sys.stderr)
    row = figures(entries, args.rpm, args.workers)
    row.update(
        {
            "workers": args.workers,
            "prompts per worker": args.prompts,
            "rpm": args.rpm,
            "time scale": args.scale,
            "exit codes": codes,
            "wall s": round(wall, 1),
            "server CPU s": round(server_cpu, 1),
        }
    )
    print(json.dumps(row, indent=2))
    if args.json:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        args.json.write_text(
            json.dumps(
                {"command": " ".join(sys.argv), "commit": commit, "figures": row, "log": entries},
                indent=1,
            )
            + "\n"
        )


def figures(entries: list[dict], rpm: float, workers: int) -> dict:
    """What the provider saw: refusals, the busiest minute, the quota used while every worker
    still had prompts to send, and each worker's share."""
    starts = sorted(e["t_sim_s"] for e in entries)
    statuses: dict[str, int] = {}
    for e in entries:
        statuses[str(e["status"])] = statuses.get(str(e["status"]), 0) + 1
    last = {}
    for e in entries:
        last[e["worker"]] = max(last.get(e["worker"], 0.0), e["t_sim_s"])
    both_until = min(last.values()) if len(last) == workers else starts[0]
    span = both_until - starts[0]
    in_span = sum(1 for t in starts if t <= both_until)
    # starts in [first, both_until] over what the quota admits in that span (the first
    # window's rpm at once, then rpm a minute)
    allowed = rpm * (1 + span / 60)
    return {
        "requests": len(entries),
        "statuses": statuses,
        "429s": statuses.get("429", 0),
        "most starts in any 60 s": max(sum(1 for t in starts if s <= t < s + 60) for s in starts),
        "span with every worker sending (sim min)": round(span / 60, 2),
        "quota used while every worker was sending": round(in_span / allowed, 3),
        "starts per minute from the first": [
            sum(1 for t in starts if m * 60 <= t - starts[0] < (m + 1) * 60)
            for m in range(int((starts[-1] - starts[0]) // 60) + 1)
        ],
        "share per worker": {
            w: round(sum(1 for e in entries if e["worker"] == w) / len(entries), 3)
            for w in sorted(last)
        },
    }


if __name__ == "__main__":
    main()
