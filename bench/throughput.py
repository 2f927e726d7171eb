"""How fast one process publishes, what it costs in CPU, and what a second pinned process adds.

    .venv/bin/python bench/throughput.py                    # both parts, about 15 minutes
    .venv/bin/python bench/throughput.py --part sizes --sizes 64 --prompts 1000

Every run is the CLI as a new user runs it: ``imagebatch run`` on its own temporary Prefect
server, the embedded three renditions (PNG original, 1024-px WebP, 256-px JPEG), one Gemini-wire
provider on the project's emulator that answers in 0.05 s with no quota, 32 prompts in flight.
Prompt texts repeat every 8 prompts (ids do not), so the emulator draws each picture once and its
CPU mostly stays out of the figures (it still encodes and sends every answer); it runs in this
process, the CLI and its server in others.

- ``sizes``: at 64 px, 1K, 2K and 4K, one CLI on both cores: prompts per second while
  generating and the CPU seconds per prompt of the flow process and of the Prefect server over
  the same span (from the 10th to the 90th percentile request; /proc, the process tree sampled
  four times a second); prompts per hour per core is 3600 over their sum. The whole command's
  wall and CPU time (Prefect's start and the end included) are kept beside them.
- ``pinned``: 2K, one CLI with ``taskset -c 0`` (its server inherits the core), then two CLIs at
  once on cores 0 and 1, each with its own batch and temporary server.

Raw data: ``bench/throughput-runs.json`` (one object per run); the markdown table printed at the
end is the one in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
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
    limits: {{max_in_flight: 32}}
renditions:
  - {{name: original, format: png}}
  - {{name: web, format: webp, max_px: 1024, quality: 85}}
  - {{name: thumb, format: jpeg, max_px: 256, quality: 80}}
max_in_flight: 32
failure_threshold: 0.1
"""

SIZES = {"64": 64, "1K": 1024, "2K": 2048, "4K": 4096}


class TreeSampler:
    """Own CPU seconds (user + system) of every process under ``pid``, sampled until stopped;
    the last reading of each process is kept (a process's last quarter second is missed)."""

    def __init__(self, pid: int, every_s: float = 0.25):
        self.pid, self.every_s = pid, every_s
        self.cpu: dict[int, tuple[str, float]] = {}
        self.series: list[tuple[float, float, float]] = []  # (monotonic, flow, server) CPU s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._tick = os.sysconf("SC_CLK_TCK")

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.every_s)

    def sample(self) -> None:
        parents: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        todo = [self.pid]
        while todo:
            pid = todo.pop()
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            kind = "server" if "uvicorn" in cmdline or "prefect.server" in cmdline else "flow"
            kind = self.cpu.get(pid, (kind, 0.0))[0]  # a zombie's cmdline reads empty
            self.cpu[pid] = (kind, (int(fields[11]) + int(fields[12])) / self._tick)
            todo += parents.get(pid, [])
        split = self.split()
        self.series.append((time.monotonic(), split["flow"], split["server"]))

    def between(self, t0: float, t1: float) -> tuple[float, float]:
        """Flow and server CPU seconds used from ``t0`` to ``t1`` (nearest samples)."""

        def at(t: float) -> tuple[float, float, float]:
            return min(self.series, key=lambda row: abs(row[0] - t))

        a, b = at(t0), at(t1)
        return b[1] - a[1], b[2] - a[2]

    def split(self) -> dict[str, float]:
        totals = {"flow": 0.0, "server": 0.0}
        for kind, seconds in self.cpu.values():
            totals[kind] += seconds
        return totals


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def start_cli(
    work: Path, url: str, prompts: int, batch: str, cpus: str | None
) -> tuple[subprocess.Popen, Path]:
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.yaml").write_text(CONFIG.format(url=url))
    source = work / "prompts.jsonl"
    source.write_text(
        "".join(
            json.dumps({"id": f"{i:05d}", "prompt": f"{batch} product photo {i % 8}"}) + "\n"
            for i in range(prompts)
        )
    )
    env = {
        **os.environ,
        "PREFECT_HOME": str(work / "prefect-home"),
        "IMAGEBATCH_STATE_DIR": str(work / "state"),
        "EMULATOR_KEY": "bench-key",
    }
    env.pop("PREFECT_API_URL", None)  # its own temporary server, as a new user's first run
    command = [str(Path(sys.executable).parent / "imagebatch"), "run", str(source)]
    command += ["--config", str(work / "config.yaml"), "--output", str(work / "out")]
    command += ["--batch-id", batch, "--quiet"]
    if cpus is not None:
        command = ["taskset", "-c", cpus, *command]
    log = open(work / "cli.log", "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT), work


def published(work: Path, batch: str) -> int:
    manifest = work / "out" / batch / "manifest.jsonl"
    lines = manifest.read_text().splitlines() if manifest.exists() else []
    return sum(json.loads(line)["status"] == "succeeded" for line in lines)


def run_group(
    server, home: Path, px: int, prompts: int, cpus: list[str | None], label: str
) -> list[dict]:
    """Run one CLI per entry of ``cpus`` at once; one figures dict per CLI."""
    server.emulator.profile.providers["primary"].image_px = px
    server.emulator.reset()
    procs, samplers = [], []
    cpu_before, started = _children_cpu(), time.perf_counter()
    for i, core in enumerate(cpus):
        proc, work = start_cli(home / f"{label}-{i}", server.url, prompts, f"{label}-{i}", core)
        procs.append((proc, work))
        samplers.append(TreeSampler(proc.pid).__enter__())
    walls = []
    for proc, _ in procs:
        proc.wait(timeout=3600)
        walls.append(time.perf_counter() - started)
    for sampler in samplers:
        sampler.__exit__(None, None, None)
    cpu_all = _children_cpu() - cpu_before
    t0 = server.emulator._t0  # the emulator's clock: monotonic, from its first request
    log = [(e.prompt, t0 + e.t_wall_s) for e in list(server.emulator.log)]
    rows = []
    for i, ((proc, work), sampler, wall) in enumerate(zip(procs, samplers, walls, strict=True)):
        batch = f"{label}-{i}"
        starts = sorted(t for prompt, t in log if prompt.startswith(f"{batch} "))
        first, last = len(starts) // 10, len(starts) * 9 // 10 - 1
        lo, hi = starts[first], starts[last]
        flow_cpu, server_cpu = sampler.between(lo, hi)
        per_prompt = (flow_cpu + server_cpu) / (last - first)
        split = sampler.split()
        done = published(work, batch)
        rows.append(
            {
                "part": label.split("-")[0],
                "image px": px,
                "cores": cpus[i] if cpus[i] is not None else "all",
                "processes at once": len(cpus),
                "prompts": prompts,
                "published": done,
                "exit code": proc.returncode,
                "prompts/s while generating": round((last - first) / max(hi - lo, 1e-9), 2),
                "flow CPU s per prompt": round(flow_cpu / (last - first), 4),
                "server CPU s per prompt": round(server_cpu / (last - first), 4),
                "prompts per hour per core": round(3600 / max(per_prompt, 1e-9)),
                "whole command s": round(wall, 1),
                "whole command CPU s (flow, server)": [
                    round(split["flow"], 1),
                    round(split["server"], 1),
                ],
                "CPU s of the group (rusage)": round(cpu_all, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["sizes", "pinned", "all"], default="all")
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--prompts", type=int, default=None, help="per run (default per size)")
    parser.add_argument("--json", default=str(ROOT / "bench" / "throughput-runs.json"))
    args = parser.parse_args()

    from imagebatch.emulator import EmulatorProfile, EmulatorServer, ProviderProfile

    default_prompts = {"64": 1000, "1K": 400, "2K": 200, "4K": 80}
    profile = EmulatorProfile(providers={"primary": ProviderProfile(latency_median_s=0.05)})
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp, EmulatorServer(profile) as server:
        home = Path(tmp)
        if args.part in ("sizes", "all"):
            for size in args.sizes:
                n = args.prompts or default_prompts[size]
                rows += run_group(server, home, SIZES[size], n, [None], f"sizes-{size}")
        if args.part in ("pinned", "all"):
            n = args.prompts or 200
            rows += run_group(server, home, 2048, n, ["0"], "pinned-one")
            rows += run_group(server, home, 2048, n, ["0", "1"], "pinned-two")
    Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {args.json}")
    print(table(rows))


def table(rows: list[dict]) -> str:
    """The markdown table of RESULTS.md."""
    lines = [
        "| part | image | cores | at once | published | prompts/s generating | flow CPU s/prompt "
        "| server CPU s/prompt | prompts/h/core | whole command s |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['part']} | {r['image px']} px | {r['cores']} | {r['processes at once']} "
            f"| {r['published']}/{r['prompts']} | {r['prompts/s while generating']} "
            f"| {r['flow CPU s per prompt']} | {r['server CPU s per prompt']} "
            f"| {r['prompts per hour per core']} | {r['whole command s']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
