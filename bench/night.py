"""A simulated night, side by side: imagebatch, the usual sequential loop, and LiteLLM's router.

    .venv/bin/python bench/night.py                      # everything: about 30 minutes
    .venv/bin/python bench/night.py --smoke              # each scenario, a few prompts, seconds

Each run starts the project's emulator over HTTP with one scenario's profile (a primary logical
provider at 10 RPM, latency 30-100 s, and a backup at 5 RPM, in simulated time), runs one
contender against it in a child process (so its CPU time and memory are its own), and computes
every figure from the emulator's request log, i.e. from what the providers saw. Up to 20 runs
go at once (``--jobs``; at most eight of them imagebatch's, ``--imagebatch-jobs``, spread over
two Prefect servers, ``--servers``), the longest first; each has its own emulator, so they do
not share a quota. A run that fails (say the Prefect server's database stayed locked) is run
once more; one that sent no request at all (its start refused by a busy server) twice more.

- ``imagebatch``: the real nightly flow on a Prefect server this script starts, the primary in
  the Gemini wire format (google-genai), the backup in OpenAI's (openai SDK);
- ``naive``: the usual practice, written fresh in ``bench/contenders/naive.py``;
- ``litellm``: LiteLLM's Router as its documentation recommends (``rpm`` per deployment with
  usage-based routing, a retry policy per error class, fallbacks), in a benchmark-only virtual
  environment (``bench/contenders/litellm_router.py``; this script creates it the first time);
  ``litellm-loop``: the same with the outer loop a user writes (failed prompts go round again).

The results (a median over the seeds for every scenario and contender) are printed as a
markdown table and, with ``--write``, replace the section of bench/RESULTS.md between its
``<!-- night -->`` markers; ``--plot`` draws requests per minute per provider for ``overload``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from imagebatch.emulator import EmulatorProfile, EmulatorServer, ProviderProfile, Window  # noqa: E402

PRIMARY_RPM, BACKUP_RPM = 10.0, 5.0
PRICES = {"primary": 0.134, "backup": 0.04}  # USD per image: Gemini 3 Pro Image 1K, gpt-image
#: the defaults variant's backup is a second account of the primary's model, at its price
SAME_MODEL_PRICES = {"primary": 0.134, "backup": 0.134}
LATENCY = {"latency_median_s": 45.0, "latency_p99_s": 100.0, "image_px": 32}
BACKUP_LATENCY = {"latency_median_s": 30.0, "latency_p99_s": 80.0, "image_px": 32}
#: wall seconds from a contender's READY to its first request before it counts as hung
START_LIMIT_S = 150.0
#: wall seconds between the starts of two imagebatch nights on the shared Prefect server
STAGGER_S = 10.0
CLIENT_TIMEOUT_S = 120.0  # every contender's per-call timeout (simulated seconds)
PROBE_INTERVAL_S = 300.0  # imagebatch's probe interval; LiteLLM's cooldown is set the same
HINT_SLACK_S = 1.0  # a call this soon after a 429 was already on its way, not a broken hint
#: imagebatch on a new user's defaults first (two accounts of one model; a chain of two models;
#: that chain with a finish_by), then as tuned (``spill_over_s``, in-flight caps by hand)
IMAGEBATCH = ("imagebatch-defaults", "imagebatch-chain", "imagebatch-finish-by", "imagebatch")
LITELLM = ("litellm", "litellm-loop")
CONTENDERS = ("naive", *LITELLM, *IMAGEBATCH)
SCRIPTS = {
    "naive": "naive.py",
    **{name: "litellm_router.py" for name in LITELLM},
    **{name: "imagebatch.py" for name in IMAGEBATCH},
}
#: the variants that run only some scenarios (to keep the whole benchmark within 30 minutes)
ONLY_IN = {"imagebatch-chain": {"overload", "outage"}, "imagebatch-finish-by": {"steady"}}
FINISH_BY_MIN = 18.0  # bench/contenders/imagebatch.py sets finish_by this far after the start
LITELLM_VENV = ROOT / "bench" / ".venv-litellm"
LITELLM_SPEC = "litellm>=1.110,<2"


@dataclass
class Scenario:
    """One night's weather: provider profiles and when the primary is unusable."""

    name: str
    primary: ProviderProfile
    backup: ProviderProfile
    real_primary_rpm: float = PRIMARY_RPM
    #: (start, end) simulated seconds of the window in which the primary is overloaded or out
    window: tuple[float, float] | None = None
    #: the share of the primary's calls that succeed outside the window, and inside it
    primary_success: float = 1.0
    window_success: float = 0.0
    #: the share of the time the primary may be called when every hint is honoured (a client
    #: policy: only for the labelled extra figure)
    primary_duty: float = 1.0
    notes: str = ""

    def rate_at(self, t: float, honour_hints: bool = False) -> float:
        """Successful requests per second the emulator admits to any client at simulated second
        ``t``: each provider's quota times the share of its calls that succeed (with
        ``honour_hints``, the primary only for the share of time its hints leave it)."""
        share = self.primary_duty if honour_hints else self.primary_success
        if self.window and self.window[0] <= t < self.window[1]:
            share = self.window_success
        return (self.real_primary_rpm * share + BACKUP_RPM) / 60.0

    def capacity_bound_s(self, prompts: int, honour_hints: bool = False) -> float:
        """Least time for ``prompts`` successes at that rate, plus one median latency: the same
        for every contender, assuming no client's policy."""
        t, served = 0.0, 0.0
        while served < prompts:
            served += self.rate_at(t, honour_hints)
            t += 1.0
        return t + LATENCY["latency_median_s"]


def scenarios() -> dict[str, Scenario]:
    backup = ProviderProfile(rpm=BACKUP_RPM, **BACKUP_LATENCY)
    overload = Window(start_s=300, duration_s=900, rate=0.9, extra_latency_s=40, ramp_s=120)
    outage = Window(start_s=300, duration_s=3600)
    return {
        s.name: s
        for s in [
            Scenario("steady", ProviderProfile(rpm=PRIMARY_RPM, **LATENCY), backup),
            Scenario(
                "hidden-quota",
                ProviderProfile(rpm=PRIMARY_RPM * 0.7, **LATENCY),
                backup,
                real_primary_rpm=PRIMARY_RPM * 0.7,
                notes="the primary really allows 7 RPM; every contender is told 10",
            ),
            Scenario(
                "overload",
                ProviderProfile(rpm=PRIMARY_RPM, overload_windows=[overload], **LATENCY),
                backup,
                window=(300.0, 1200.0),
                window_success=0.1,
                notes="503 to 90% of primary calls for 15 min, latency rising over 2 min before",
            ),
            Scenario(
                "outage",
                ProviderProfile(rpm=PRIMARY_RPM, outage_windows=[outage], **LATENCY),
                backup,
                window=(300.0, 3900.0),
                notes="the primary answers 503 to everything for an hour",
            ),
            Scenario(
                "long-hints",
                ProviderProfile(rpm=PRIMARY_RPM, rate_429=0.1, hint_s=90.0, **LATENCY),
                backup,
                primary_success=0.9,
                # honouring each: a hint comes once a minute and stops the primary for 90 s
                primary_duty=60 / (60 + 0.1 * PRIMARY_RPM * 90),
                notes="10% of primary calls get a 429 with a 90 s retry hint",
            ),
            Scenario(
                "hangs",
                ProviderProfile(rpm=PRIMARY_RPM, rate_hang=0.05, hang_s=600.0, **LATENCY),
                backup,
                primary_success=0.95,
                notes="5% of primary calls hang for 600 s, past every client's 120 s timeout",
            ),
        ]
    }


# ---------------------------------------------------------------------------------- figures


def _end(entry, scale: float) -> float:
    """Simulated second at which the provider answered ``entry``."""
    return entry.t_sim_s + entry.latency_s * scale


def figures(
    log: list, scenario: Scenario, prompts: int, scale: float, prices: dict | None = None
) -> dict:
    """Every figure of one run, from the emulator's log (what the providers saw)."""
    prices = prices or PRICES
    calls = len(log)
    ok = [e for e in log if e.status == 200]
    completed = len({e.prompt for e in ok})
    row: dict = {"prompts completed": completed, "calls": calls}
    if not log:
        return row
    first = min(e.t_sim_s for e in log)
    makespan = max(_end(e, scale) for e in ok) - first if ok else None
    bound = scenario.capacity_bound_s(prompts)
    row["makespan (sim min)"] = round(makespan / 60, 1) if makespan else None
    row["makespan / capacity bound"] = round(makespan / bound, 2) if makespan else None
    if scenario.primary_duty != 1.0 and makespan:  # a policy-aware extra, labelled as such
        honoured = scenario.capacity_bound_s(prompts, honour_hints=True)
        row["makespan / bound honouring hints"] = round(makespan / honoured, 2)
    row["calls per success"] = round(calls / len(ok), 2) if ok else None
    row["429 share"] = round(sum(e.status == 429 for e in log) / calls, 4)

    primary = sorted((e for e in log if e.provider == "primary"), key=lambda e: e.t_sim_s)
    healthy_end = scenario.window[0] if scenario.window else float("inf")
    healthy_ok = [e.t_sim_s for e in primary if e.status == 200 and e.t_sim_s < healthy_end]
    if len(healthy_ok) > 1:
        # successes per minute over the healthy part (at least one minute: a provider's quota
        # is per 60 s window), divided by the primary's real quota
        span_min = max(1.0, (min(max(healthy_ok), healthy_end) - first) / 60)
        used = (len(healthy_ok) - 1) / (span_min * scenario.real_primary_rpm)
        row["quota used while healthy"] = round(used, 3)
    else:
        row["quota used while healthy"] = 0.0

    if scenario.window:
        start, end = scenario.window
        fails, third = 0, None
        for e in sorted(primary, key=lambda e: _end(e, scale)):
            fails = fails + 1 if e.status != 200 else 0
            if fails == 3 and e.t_sim_s >= start - 180:  # the window's latency ramp included
                third = _end(e, scale)
                break
        # failed over: the third failure in a row came back and work reaches the backup
        backup_after = [
            e.t_sim_s
            for e in log
            if e.provider == "backup" and e.t_sim_s >= max(start, third or start)
        ]
        row["failover after (sim s)"] = (
            round(max(third, backup_after[0]) - start) if third and backup_after else None
        )
        row["primary calls after its 3rd failure, in the window"] = (
            sum(third < e.t_sim_s < end for e in primary) if third is not None else None
        )
        back = [e for e in primary if e.t_sim_s >= end and e.status == 200]
        row["failback after (sim s)"] = round(back[0].t_sim_s - end) if back else None
        if back and makespan:
            # after the circuit closed (the first success of the primary after the window came
            # back), the prompts with no successful call started yet need the whole quota (15
            # RPM) plus one median latency: how much later than that the night ended
            closed = _end(back[0], scale)
            started = {e.prompt for e in ok if e.t_sim_s <= closed}
            left = prompts - len(started)
            allowed = closed + left * 60 / (PRIMARY_RPM + BACKUP_RPM) + LATENCY["latency_median_s"]
            row["end after close - quota time (sim min)"] = round(
                (first + makespan - allowed) / 60, 2
            )

    hinted = [e for e in log if e.status == 429 and e.hint_s]
    broken = 0
    for h in hinted:
        until = _end(h, scale) + h.hint_s
        if any(
            _end(h, scale) + HINT_SLACK_S < e.t_sim_s < until
            for e in log
            if e.provider == h.provider and e is not h
        ):
            broken += 1
    row["hints honoured"] = round(1 - broken / len(hinted), 3) if hinted else None
    cost = sum(prices[e.provider] for e in ok)
    row["cost per 1,000 images (USD)"] = round(cost / completed * 1000, 2) if completed else None
    row["backup share"] = (
        round(sum(e.provider == "backup" for e in ok) / len(ok), 3) if ok else None
    )
    return row


# ---------------------------------------------------------------------------------- running


@dataclass
class Run:
    scenario: str
    contender: str
    seed: int
    scale: float
    figures: dict = field(default_factory=dict)
    log: list = field(default_factory=list, repr=False)  # the emulator's, for the plot


def _python_for(contender: str) -> str:
    if contender not in LITELLM:
        return sys.executable
    python = LITELLM_VENV / "bin" / "python"
    if not python.exists():
        print(f"creating {LITELLM_VENV} for LiteLLM (once; about 380 MB)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", LITELLM_SPEC, "pillow"], check=True
        )
    return str(python)


def run_one(
    scenario: Scenario,
    contender: str,
    seed: int,
    scale: float,
    prompts: int,
    work: Path,
    prefect_api: str | None,
) -> Run:
    profile = EmulatorProfile(
        seed=seed,
        time_scale=scale,
        providers={"primary": scenario.primary, "backup": scenario.backup},
    )
    work.mkdir(parents=True, exist_ok=True)
    prompt_file = work / "prompts.jsonl"
    prompt_file.write_text(
        "".join(
            json.dumps({"id": f"p{i:05d}", "prompt": f"product photo {i} seed {seed}"}) + "\n"
            for i in range(prompts)
        )
    )
    env = {
        **os.environ,
        "BENCH_KEY": "bench-key",
        "IMAGEBATCH_TIME_SCALE": str(scale),
        "IMAGEBATCH_STATE_DIR": str(work / "state"),
        "PREFECT_LOGGING_LEVEL": "WARNING",
        # a busy server's 503s are retried with backoff; Prefect's client waits 2**n s before
        # its n-th retry, uncapped: at 10 retries a request the SQLite server kept refusing
        # waited 2 + 4 + ... + 1024 s (34 min: most likely the nights that hung at the start).
        # 7 caps one request's waits at about 4 min; past that the run fails and is redone
        "PREFECT_CLIENT_MAX_RETRIES": "7",
    }
    if contender.startswith("imagebatch"):  # the client's retries, in stderr.log
        env["PREFECT_LOGGING_LOGGERS_PREFECT_CLIENT_LEVEL"] = "DEBUG"
    if prefect_api:
        env["PREFECT_API_URL"] = prefect_api
    with EmulatorServer(profile) as server:
        args = [
            _python_for(contender),
            str(ROOT / "bench" / "contenders" / SCRIPTS[contender]),
            "--url",
            server.url,
            "--prompts",
            str(prompt_file),
            "--scale",
            str(scale),
            "--timeout-s",
            str(CLIENT_TIMEOUT_S),
            "--probe-interval-s",
            str(PROBE_INTERVAL_S),
            "--work",
            str(work),
            "--seed",
            str(seed),
        ]
        if contender.startswith(("imagebatch-", "litellm-")):
            args += ["--variant", contender.split("-", 1)[1]]
        stderr = work / "stderr.log"  # the contender's own logs (LiteLLM's are loud)
        with stderr.open("w") as errors:
            child = subprocess.Popen(
                args, env=env, stdout=subprocess.PIPE, stderr=errors, text=True, cwd=work
            )
            # a night that hangs is killed, and run again by the caller: one that has not
            # sent its first request START_LIMIT_S after it was ready, or that runs four times
            # its expected length
            limit = 4 * expected_wall_s(scenario, contender, prompts, scale) + 300
            watchdog = threading.Timer(limit, child.kill)
            watchdog.start()

            def first_request_or_kill() -> None:
                if not server.emulator.log and child.poll() is None:
                    child.kill()
                    print(f"{scenario.name} {contender} seed {seed}: no request", flush=True)

            starter = threading.Timer(START_LIMIT_S, first_request_or_kill)
            result: dict = {}
            assert child.stdout is not None
            try:
                for line in child.stdout:
                    if line.strip() == "READY":  # imported: the night begins with its first call
                        server.emulator.reset(at_first_request=True)
                        ready_at = server.emulator.clock()
                        starter.start()
                    elif line.startswith("{"):
                        result = json.loads(line)
            finally:
                watchdog.cancel()
                starter.cancel()
        if child.wait() != 0 or not result:
            tail = stderr.read_text()[-3000:]
            failed = StartRefused if not server.emulator.log else RuntimeError
            raise failed(f"{contender} on {scenario.name} (seed {seed}) failed:\n{tail}")
        log = list(server.emulator.log)
    prices = SAME_MODEL_PRICES if contender == "imagebatch-defaults" else PRICES
    row = figures(log, scenario, prompts, scale, prices)
    if contender == "imagebatch-finish-by" and row.get("makespan (sim min)"):
        row["finish_by met"] = 1.0 if row["makespan (sim min)"] <= FINISH_BY_MIN else 0.0
    wall = result["wall_s"]
    row["wall s"] = round(wall, 1)
    row["CPU s"] = round(result["cpu_s"], 1)
    row["busy share of the run"] = round(result["cpu_s"] / wall, 3) if wall else None
    row["peak RSS (MiB)"] = result.get("rss_mib")
    # how long the contender took from READY to its first request (START_LIMIT_S's evidence)
    first = getattr(server.emulator, "_t0", None)
    row["to first request (wall s)"] = None if first is None else round(first - ready_at, 1)
    return Run(scenario.name, contender, seed, scale, derive(row), log)


class StartRefused(RuntimeError):
    """A night ended before its first request: on the shared SQLite server, its flow's first
    writes were refused (503) until the client gave up or the watchdog killed it."""


def derive(row: dict) -> dict:
    """Figures computed from others: the orchestration's CPU as a share of the makespan, i.e.
    what its own work would take of a night at real speed (the CPU time does not scale)."""
    makespan = row.get("makespan (sim min)")
    if makespan and row.get("CPU s") is not None:
        row["orchestration CPU / makespan"] = round(row["CPU s"] / (makespan * 60), 4)
    return row


def expected_wall_s(scenario: Scenario, contender: str, prompts: int, scale: float) -> float:
    """A rough length of one run in wall seconds, to start the longest first."""
    if contender == "naive":  # one call after another, a 7 s pause between them
        return prompts * (7.0 + LATENCY["latency_median_s"]) / scale
    if contender in LITELLM:  # paced to the quotas, but refused bursts slow it down
        return 2 * scenario.capacity_bound_s(prompts) / scale
    return scenario.capacity_bound_s(prompts) / scale


def cap_group(contender: str) -> str:
    """Contenders whose runs count against one cap: imagebatch's share one Prefect server."""
    return contender.split("-")[0]


Job = tuple[str, str, int]  # scenario, contender, seed


def run_jobs(
    jobs: list[Job],
    work: Callable[[Job], Run],
    *,
    slots: int,
    caps: dict[str, int],
    done: Callable[[Run], None] = lambda run: None,
) -> tuple[list[Run], list[tuple[Job, BaseException]]]:
    """Run ``jobs`` on ``slots`` threads, in list order as far as each contender's cap in
    ``caps`` (runs of it at once) allows. A failed job does not stop the others.

    Returns:
        The runs in the order they finished, and each failed job with its exception.
    """
    pending = list(jobs)
    running: dict[str, int] = {}
    runs: list[Run] = []
    failures: list[tuple[Job, BaseException]] = []
    changed = threading.Condition()

    def next_job() -> Job | None:
        with changed:
            while pending:
                for job in pending:
                    group = cap_group(job[1])
                    if running.get(group, 0) < caps.get(group, slots):
                        pending.remove(job)
                        running[group] = running.get(group, 0) + 1
                        return job
                changed.wait()
            return None

    def worker() -> None:
        while (job := next_job()) is not None:
            try:
                run = work(job)
                with changed:
                    runs.append(run)
                done(run)
            except Exception as exc:  # reported at the end; the other runs go on
                with changed:
                    failures.append((job, exc))
            finally:
                with changed:
                    running[cap_group(job[1])] -= 1
                    changed.notify_all()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, slots))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return runs, failures


def tree_usage(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system, reaped children included) and peak RSS in MiB, summed over
    process ``pid`` and its descendants, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    cpu = rss = 0.0
    todo = [pid]
    while todo:
        current = todo.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            status = Path(f"/proc/{current}/status").read_text()
        except OSError:
            continue
        cpu += sum(int(x) for x in fields[11:15]) / tick  # utime, stime, cutime, cstime
        hwm = [line for line in status.splitlines() if line.startswith("VmHWM:")]
        rss += int(hwm[0].split()[1]) / 1024 if hwm else 0.0
        todo += children.get(current, [])
    return cpu, rss


def charge_server(runs: list[Run], cpu_s: float, rss_mib: float) -> None:
    """Give each imagebatch run an equal share of the Prefect servers' CPU (``cpu_s``: their
    sum over the whole benchmark; they served the runs between them, several at once), and the
    larger server's peak RSS (``rss_mib``) beside the run's own."""
    served = [run for run in runs if run.contender.startswith("imagebatch")]
    for run in served:
        share = cpu_s / len(served)
        run.figures["Prefect server CPU s (share)"] = round(share, 1)
        run.figures["Prefect server peak RSS (MiB)"] = round(rss_mib)
        if run.figures.get("CPU s") is not None:
            run.figures["CPU s with server"] = round(run.figures["CPU s"] + share, 1)
        makespan = run.figures.get("makespan (sim min)")
        if makespan and "CPU s with server" in run.figures:
            run.figures["CPU with server / makespan"] = round(
                run.figures["CPU s with server"] / (makespan * 60), 4
            )


def start_prefect_server(home: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    from imagebatch.emulator.app import free_port

    port = free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        # several flows write at once: wait for SQLite's lock rather than answer 503
        "PREFECT_SERVER_DATABASE_TIMEOUT": "60",
        "PREFECT_SERVER_DATABASE_CONNECTION_TIMEOUT": "60",
    }
    log = open(home / "server.log", "wb")  # noqa: SIM115 - the server's whole life
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "prefect"), "server", "start", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return server, url
        except httpx.HTTPError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the Prefect server did not start: see {home / 'server.log'}")
        time.sleep(0.5)


def median_rows(runs: list[Run]) -> dict[tuple[str, str], dict]:
    """Per (scenario, contender), the median of every numeric figure over the seeds."""
    grouped: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        grouped.setdefault((run.scenario, run.contender), []).append(run.figures)
    table = {}
    for key, rows in grouped.items():
        merged = {}
        for name in dict.fromkeys(k for row in rows for k in row):
            values = [row.get(name) for row in rows]
            numbers = [v for v in values if isinstance(v, int | float)]
            if len(numbers) == len(values):
                merged[name] = round(statistics.median(numbers), 4)
            else:  # some seeds have no value (e.g. no failback): say how many do
                merged[name] = (
                    f"{statistics.median(numbers):g} ({len(numbers)}/{len(values)})"
                    if numbers
                    else "-"
                )
        table[key] = merged
    return table


#: the table's columns: (figure, heading, format)
COLUMNS = [
    ("prompts completed", "done", "{:g}"),
    ("makespan (sim min)", "makespan (min)", "{:g}"),
    ("makespan / capacity bound", "/ bound", "{:.2f}"),
    ("makespan / bound honouring hints", "/ bound if hints paused the provider", "{:.2f}"),
    ("calls per success", "calls / success", "{:.2f}"),
    ("429 share", "429 share", "{:.1%}"),
    ("quota used while healthy", "quota used healthy", "{:.0%}"),
    ("failover after (sim s)", "failover (s)", "{:g}"),
    (
        "primary calls after its 3rd failure, in the window",
        "to primary after 3rd fail",
        "{:g}",
    ),
    ("failback after (sim s)", "failback (s)", "{:g}"),
    ("hints honoured", "hints honoured", "{:.0%}"),
    ("end after close - quota time (sim min)", "end vs quota after close (min)", "{:+.1f}"),
    ("finish_by met", "finish_by met", "{:.0%}"),
    ("backup share", "backup share", "{:.0%}"),
    ("cost per 1,000 images (USD)", "USD / 1,000", "{:.2f}"),
    ("orchestration CPU / makespan", "CPU / makespan", "{:.1%}"),
    ("busy share of the run", "busy share", "{:.0%}"),
    ("CPU s", "CPU s", "{:g}"),
    ("Prefect server CPU s (share)", "server CPU s (share)", "{:g}"),
    ("CPU with server / makespan", "CPU with server / makespan", "{:.1%}"),
    ("wall s", "wall s", "{:g}"),
    ("peak RSS (MiB)", "RSS MiB", "{:g}"),
    ("Prefect server peak RSS (MiB)", "server RSS MiB", "{:g}"),
]


def markdown_table(table: dict[tuple[str, str], dict]) -> str:
    """One row per scenario and contender, one column per figure (medians over the seeds)."""
    lines = [
        "| scenario | contender | " + " | ".join(h for _, h, _ in COLUMNS) + " |",
        "|---|---|" + "---:|" * len(COLUMNS),
    ]
    for (scenario, contender), row in table.items():
        cells = []
        for name, _, fmt in COLUMNS:
            value = row.get(name, "")
            cells.append(fmt.format(value) if isinstance(value, int | float) else str(value))
        lines.append(f"| {scenario} | {contender} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_requests_per_minute(log: list, path: Path, title: str) -> None:
    """Requests per simulated minute per provider (stacked ok / refused), drawn with Pillow."""
    from PIL import Image, ImageDraw

    minutes = int(max(e.t_sim_s for e in log) // 60) + 1
    series = {}
    for provider in ("primary", "backup"):
        ok, bad = [0] * minutes, [0] * minutes
        for e in log:
            if e.provider == provider:
                (ok if e.status == 200 else bad)[int(e.t_sim_s // 60)] += 1
        series[provider] = (ok, bad)
    top = max(max(o[i] + b[i] for i in range(minutes)) for o, b in series.values()) or 1
    width, panel, left, pad = max(600, minutes * 12 + 80), 200, 50, 30
    image = Image.new("RGB", (width, pad + 2 * (panel + pad) + 20), "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 8), title, fill="black")
    bar = (width - left - 20) / minutes
    for row, (provider, (ok, bad)) in enumerate(series.items()):
        y0 = pad + row * (panel + pad) + panel
        draw.line([(left, y0), (width - 20, y0)], fill="black")
        draw.text((4, y0 - panel), provider, fill="black")
        for tick in range(0, top + 1, max(1, top // 4)):
            y = y0 - tick / top * (panel - 10)
            draw.text((left - 24, y - 6), str(tick), fill="grey")
        for i in range(minutes):
            x = left + i * bar
            h_ok = ok[i] / top * (panel - 10)
            h_bad = bad[i] / top * (panel - 10)
            draw.rectangle([x, y0 - h_ok, x + bar - 2, y0], fill=(46, 125, 50))
            draw.rectangle([x, y0 - h_ok - h_bad, x + bar - 2, y0 - h_ok], fill=(198, 40, 40))
        for m in range(0, minutes, 10):
            draw.text((left + m * bar, y0 + 2), f"{m}", fill="grey")
    draw.text((left, image.height - 16), "simulated minute; green 200, red 429/5xx", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def write_results(text: str, runs: list[Run], scales: dict, args, total_s: float) -> None:
    """Replace the section between the ``<!-- night -->`` markers of bench/RESULTS.md."""
    results = ROOT / "bench" / "RESULTS.md"
    body = results.read_text()
    begin, end = "<!-- night -->", "<!-- /night -->"
    command = "bench/night.py " + " ".join(sys.argv[1:])
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    section = "\n".join(
        [
            begin,
            f"Measured on commit `{commit or 'unknown'}`. "
            f"Command: `.venv/bin/python {command.strip()}`; {len(runs)} runs in "
            f"{total_s / 60:.1f} min on {os.cpu_count()} cores ({platform.machine()}), "
            f"Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}. "
            f"Prompts per run: {args.prompts}; seeds: {', '.join(map(str, args.seeds))}"
            + "".join(f", {item.replace('=', ': ')}" for item in args.seeds_for)
            + "; "
            "time scales: "
            + ", ".join(f"{k} {v:g}" for k, v in scales.items())
            + f"; {args.jobs} runs at once, at most {args.imagebatch_jobs} of imagebatch, "
            f"spread over {args.servers} Prefect servers.",
            "",
            text,
            end,
        ]
    )
    if begin in body and end in body:
        body = body[: body.index(begin)] + section + body[body.index(end) + len(end) :]
    else:
        body += "\n" + section + "\n"
    results.write_text(body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument(
        "--seeds-for",
        nargs="+",
        # the tuned run and LiteLLM's two variants once each: the whole within 30 minutes
        default=["imagebatch=1", "litellm=1", "litellm-loop=1"],
        metavar="CONTENDER=S,S",
        help="other seeds for some contenders (e.g. imagebatch=1: the tuned run once)",
    )
    parser.add_argument("--scenarios", nargs="+", default=list(scenarios()))
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    parser.add_argument(
        "--scale",
        nargs="+",
        # LiteLLM's per-wall-minute rpm counter spans S simulated minutes at scale S: its scale
        # is the lowest at which its longest night (outage, about 60 simulated minutes) ends
        # within the budget
        # the naive loop sleeps 7 s between calls: at scale 500 a 10 ms scheduling delay on a
        # busy machine was 5 simulated seconds; at 200, 2
        default=["naive=200", "litellm=2.5", "imagebatch=5"],
        help="simulated seconds per wall second, per contender (NAME=SCALE)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        # LiteLLM's 12 nights and 8 of imagebatch's: the naive loop's short nights run in the
        # slots that free later, not during the busy first minute when every night starts
        default=20,
        help="runs at the same time (each its own emulator and contender process)",
    )
    parser.add_argument(
        "--imagebatch-jobs",
        type=int,
        default=8,
        help="of these, imagebatch runs at the same time (they share the Prefect servers)",
    )
    parser.add_argument(
        "--servers",
        type=int,
        default=2,
        help="Prefect servers (each its own SQLite database) the imagebatch runs are spread "
        "over: one database's write lock refuses starts when eight nights share it",
    )
    parser.add_argument("--smoke", action="store_true", help="4 prompts, one seed, high scales")
    parser.add_argument("--write", action="store_true", help="update bench/RESULTS.md")
    parser.add_argument("--plot", type=Path, help="PNG: requests per minute, overload scenario")
    parser.add_argument("--json", type=Path, help="write every run's figures here")
    parser.add_argument(
        "--table-from",
        type=Path,
        nargs="+",
        help="only print the table of --json files (a later file's runs replace an earlier's)",
    )
    args = parser.parse_args(argv)
    if args.table_from:
        merged: dict[tuple, Run] = {}
        for path in args.table_from:
            for r in json.loads(path.read_text()):
                run = Run(**{**r, "figures": derive(r["figures"])})
                merged[(run.scenario, run.contender, run.seed)] = run
        print(markdown_table(median_rows(list(merged.values()))))
        return 0
    scales = {k: float(v) for k, v in (s.split("=") for s in args.scale)}
    if args.smoke:
        args.prompts, args.seeds = 4, args.seeds[:1]
        scales = {"naive": 3000.0, "litellm": 300.0, "imagebatch": 300.0}
    for name in IMAGEBATCH:  # every variant runs at its contender's scale
        scales.setdefault(name, scales.get("imagebatch", 5.0))
    scales.setdefault("litellm-loop", scales.get("litellm", 2.0))

    seeds_for = {
        name: [int(x) for x in seeds.split(",")]
        for name, seeds in (item.split("=") for item in args.seeds_for)
    }
    chosen = {n: s for n, s in scenarios().items() if n in args.scenarios}
    home = Path(tempfile.mkdtemp(prefix="imagebatch-night-"))
    servers: list[subprocess.Popen] = []
    apis: list[str] = []
    if any(c.startswith("imagebatch") for c in args.contenders):
        for i in range(max(1, args.servers)):
            (home / f"server-{i}").mkdir()
            server, api = start_prefect_server(home / f"server-{i}")
            servers.append(server)
            apis.append(api)
    nights_on = [0] * len(apis)  # imagebatch nights running on each server
    jobs = [
        (name, contender, seed)
        for name in chosen
        for contender in args.contenders
        for seed in seeds_for.get(contender, args.seeds)
        if name in ONLY_IN.get(contender, {name})
    ]
    order = {job: i for i, job in enumerate(jobs)}
    # the longest runs first, so the last to finish is a short one
    jobs.sort(
        key=lambda job: expected_wall_s(chosen[job[0]], job[1], args.prompts, scales[job[1]]),
        reverse=True,
    )
    started = time.perf_counter()
    stagger, placing = threading.Lock(), threading.Lock()
    last_start = [0.0]
    stagger_s = 0.0 if args.smoke else STAGGER_S  # a few prompts a night: no crowd to spread

    def one(job: tuple[str, str, int]) -> Run:
        name, contender, seed = job
        work = home / f"{name}-{contender}-{seed}"
        for attempt in (1, 2, 3):
            api, on = None, None
            if contender.startswith("imagebatch"):
                # nights that start on one SQLite server together refuse each other's writes
                # (503s and client backoff): one start every STAGGER_S at most, each on the
                # server with the fewest nights running
                with stagger:
                    time.sleep(max(0.0, last_start[0] + stagger_s - time.perf_counter()))
                    last_start[0] = time.perf_counter()
                with placing:
                    on = nights_on.index(min(nights_on))
                    nights_on[on] += 1
                    api = apis[on]
            try:
                return run_one(
                    chosen[name], contender, seed, scales[contender], args.prompts, work, api
                )
            except RuntimeError as exc:
                # a night is run twice at most; one whose start the server refused (no request
                # sent: nothing was measured) three times
                if attempt == (3 if isinstance(exc, StartRefused) else 2):
                    raise
                # e.g. the Prefect server's SQLite busy for longer than the client retries:
                # the run is redone from the start, in a directory of its own
                print(f"{name} {contender} seed {seed}: failed, running it again: {exc}")
                work = home / f"{name}-{contender}-{seed}-again{attempt}"
            finally:
                if on is not None:
                    with placing:
                        nights_on[on] -= 1
        raise AssertionError("unreachable")

    def report(run: Run) -> None:
        line = {"scenario": run.scenario, "contender": run.contender, "seed": run.seed}
        print(json.dumps({**line, **run.figures}), flush=True)

    caps = {"imagebatch": args.imagebatch_jobs}
    server_cpu, server_rss = 0.0, 0.0
    try:
        runs, failures = run_jobs(jobs, one, slots=args.jobs, caps=caps, done=report)
    finally:
        for server in servers:
            cpu, rss = tree_usage(server.pid)
            server_cpu, server_rss = server_cpu + cpu, max(server_rss, rss)
            os.killpg(server.pid, 15)
            server.wait(30)
    charge_server(runs, server_cpu, server_rss)
    for job, exc in failures:
        print(f"FAILED {' '.join(map(str, job))}: {exc}", file=sys.stderr)
    runs.sort(key=lambda r: order[(r.scenario, r.contender, r.seed)])
    if args.plot:
        for run in runs:
            if run.scenario == "overload" and run.seed == args.seeds[0] and run.log:
                path = args.plot.with_name(f"{args.plot.stem}-{run.contender}.png")
                title = f"overload, {run.contender}, seed {run.seed}: requests per minute"
                plot_requests_per_minute(run.log, path, title)
    total = time.perf_counter() - started
    table = median_rows(runs)
    text = markdown_table(table)
    print(text)
    print(
        f"\n{len(runs)} runs in {total / 60:.1f} min on {os.cpu_count()} cores, "
        f"Python {platform.python_version()}"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                [{k: v for k, v in r.__dict__.items() if k != "log"} for r in runs], indent=1
            )
        )
    if failures:  # the table above lacks these runs: RESULTS.md is left as it was
        print(f"{len(failures)} runs failed; bench/RESULTS.md not written", file=sys.stderr)
        return 1
    if args.write:
        write_results(text, runs, scales, args, total)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
