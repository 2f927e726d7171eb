"""The README's main command, as a user runs it: a subprocess against a real Prefect server."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.conftest import ROOT

pytestmark = pytest.mark.flow
EXAMPLE = ROOT / "examples" / "prompts.jsonl"


def _env(api_url: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, "PREFECT_API_URL": api_url, "COLUMNS": "160", **(extra or {})}


def _imagebatch(
    *args: str, api_url: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "imagebatch.cli", *args],
        cwd=cwd,
        env=_env(api_url, env),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file()
        and p.name not in ("manifest.jsonl", "summary.json")  # rebuilt every run
        and not p.name.startswith(".")
    }


def test_run_example_then_rerun_resumes_everything(tmp_path, prefect_server):
    n_prompts = len(EXAMPLE.read_text().splitlines())
    args = ("run", str(EXAMPLE), "--output", "out", "--batch-id", "cli-1", "--quiet")
    first = _imagebatch(*args, api_url=prefect_server, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert " INFO " not in first.stderr  # --quiet: warnings, errors and the summary only
    assert f"batch cli-1: Completed ({n_prompts} succeeded of {n_prompts} prompts)" in first.stdout
    manifest = tmp_path / "out" / "cli-1" / "manifest.jsonl"
    assert f"manifest: {manifest.as_uri()}" in first.stdout
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(records) == n_prompts and {r["status"] for r in records} == {"succeeded"}
    for record in records:
        assert {o["rendition"] for o in record["objects"]} == {"original", "web", "thumb"}
    before = _snapshot(tmp_path / "out")
    # three renditions and a success record each, the batch's prompts and settings, and the
    # contact sheet (redrawn by the rerun to the same bytes, so not written again)
    assert len([k for k in before if k.startswith("cli-1/")]) == n_prompts * 4 + 3
    latest = json.loads((tmp_path / "out" / "latest.json").read_text())
    assert sorted(latest["prompts"]) == sorted(r["id"] for r in records)
    seeded = [line for line in EXAMPLE.read_text().splitlines() if '"seed"' in line]
    assert len([k for k in before if k.startswith("_reuse/")]) == len(seeded) > 0

    second = _imagebatch(*args, api_url=prefect_server, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"succeeded {n_prompts}  blocked 0  failed 0  skipped 0  resumed {n_prompts}" in (
        second.stdout
    )
    assert "generate-" not in second.stderr  # no generation task ran
    assert _snapshot(tmp_path / "out") == before  # nothing was written again
    resumed = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert all(r["resumed"] for r in resumed)


def test_bad_input_exits_2_with_the_file_and_line(tmp_path, prefect_server):
    bad = tmp_path / "bad.csv"
    bad.write_text("id,prompt\na,one\nb,\n")
    result = _imagebatch("run", str(bad), "--output", "out", api_url=prefect_server, cwd=tmp_path)
    assert result.returncode == 2
    assert f"error: {bad}, line 3, field 'prompt': the prompt is missing" in result.stderr
    assert not (tmp_path / "out").exists()


def _without_server(tmp_path: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a user with no Prefect server configured (a temporary one starts)."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return {**env, "PREFECT_HOME": str(tmp_path / "prefect-home"), **(extra or {})}


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.jsonl", '{"prompt": "a"}\n{"prompt": \n', "bad.jsonl, line 2: malformed JSON"),
        ("config.yaml", "providers: []\n", "config.yaml, line 1, key 'providers'"),
    ],
)
def test_bad_input_is_refused_before_anything_starts_with_only_the_clear_line(
    tmp_path, name, text, message
):
    (tmp_path / name).write_text(text)
    args = ["run", name] if name.endswith(".jsonl") else ["run", str(EXAMPLE), "--config", name]
    result = subprocess.run(
        [sys.executable, "-m", "imagebatch.cli", *args, "--output", "out"],
        cwd=tmp_path,
        env=_without_server(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [result.stderr.strip()]  # one line, no traceback
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert not (tmp_path / "prefect-home").exists()  # no temporary server was started
    assert not (tmp_path / "out").exists()


def _children(pid: int) -> list[tuple[int, str]]:
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(
                line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line
            )
            cmdline = (status.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(fields.get("PPid", "0")) == pid:
            found.append((int(status.parent.name), cmdline))
    return found


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in state  # a zombie has ended; only its exit code is left


def test_a_killed_cli_takes_its_temporary_prefect_server_with_it(tmp_path):
    from imagebatch.emulator import EmulatorProfile, EmulatorServer, ProviderProfile

    profile = EmulatorProfile(providers={"primary": ProviderProfile(latency_median_s=600)})
    with EmulatorServer(profile) as emulator:
        (tmp_path / "config.yaml").write_text(
            (ROOT / "examples" / "emulator.yaml")
            .read_text()
            .replace("http://127.0.0.1:8600", emulator.url)
        )
        env = _without_server(tmp_path, {"GEMINI_API_KEY": "k", "OPENAI_API_KEY": "k"})
        cli = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "imagebatch.cli",
                "run",
                str(EXAMPLE),
                "--config",
                "config.yaml",
                "--output",
                "out",
                "--batch-id",
                "killed",
                "--quiet",
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            started = tmp_path / "out" / "killed" / "_batch.json"  # the flow is under way
            deadline = time.monotonic() + 180
            while not started.exists() and cli.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            assert started.exists(), "the run did not start"
            servers = [pid for pid, cmd in _children(cli.pid) if "uvicorn" in cmd]
            assert len(servers) == 1
            cli.kill()  # SIGKILL: no exit handler of the CLI runs
            cli.wait()
            deadline = time.monotonic() + 30
            while _running(servers[0]) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not _running(servers[0]), "the temporary server outlived the CLI"
        finally:
            if cli.poll() is None:
                cli.kill()


def test_bad_flag_value_exits_2_before_starting(tmp_path, prefect_server):
    result = _imagebatch(
        "run", str(EXAMPLE), "--batch-id", "../x", api_url=prefect_server, cwd=tmp_path
    )
    assert result.returncode == 2
    assert "error: --batch-id: String should match pattern" in result.stderr


def _run_on_terminal(args: list[str], api_url: str, cwd: Path) -> tuple[int, str]:
    """Run with stderr on a pseudo-terminal, as a user at a shell would; return (code, text)."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "imagebatch.cli", *args],
        cwd=cwd,
        env=_env(api_url),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=follower,
    )
    os.close(follower)
    chunks: list[bytes] = []
    while True:
        ready, _, _ = select.select([leader], [], [], 1.0)
        if ready:
            try:
                data = os.read(leader, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    proc.wait(timeout=300)
    os.close(leader)
    proc.stdout.close()
    return proc.returncode, b"".join(chunks).decode(errors="replace")


def test_progress_bar_shows_on_a_terminal_and_not_when_quiet(tmp_path, prefect_server):
    code, screen = _run_on_terminal(
        ["run", str(EXAMPLE), "--output", "out", "--batch-id", "tty-1"], prefect_server, tmp_path
    )
    n = len(EXAMPLE.read_text().splitlines())
    assert code == 0
    assert f"{n}/{n}" in screen and f"succeeded {n}" in screen and "left" in screen

    code, screen = _run_on_terminal(
        ["run", str(EXAMPLE), "--output", "out", "--batch-id", "tty-2", "--quiet"],
        prefect_server,
        tmp_path,
    )
    assert code == 0
    assert f"{n}/{n}" not in screen


def test_run_with_gemini_primary_on_the_emulator_end_to_end(tmp_path, prefect_server):
    from imagebatch.emulator import EmulatorProfile, EmulatorServer, ProviderProfile

    config = (ROOT / "examples" / "emulator.yaml").read_text()
    profile = EmulatorProfile(
        providers={
            "primary": ProviderProfile(thought_images=1, missing_models=["retired-model"]),
            "backup": ProviderProfile(),
        }
    )
    n = len(EXAMPLE.read_text().splitlines())
    with EmulatorServer(profile) as server:
        (tmp_path / "config.yaml").write_text(config.replace("http://127.0.0.1:8600", server.url))
        # the config paces to 10 and 5 RPM; a time scale of 100 runs those minutes in 0.6 s
        keys = {
            "GEMINI_API_KEY": "emulator-key",
            "OPENAI_API_KEY": "emulator-key",
            "IMAGEBATCH_TIME_SCALE": "100",
        }

        def run_example(batch_id: str) -> subprocess.CompletedProcess[str]:
            args = ["--config", "config.yaml", "--output", "out", "--batch-id", batch_id, "--quiet"]
            return _imagebatch(
                "run", str(EXAMPLE), *args, api_url=prefect_server, cwd=tmp_path, env=keys
            )

        result = run_example("gemini-1")
        assert result.returncode == 0, result.stderr[-3000:]
        log = httpx.get(f"{server.url}/_emulator/log").json()["providers"]
        assert log == {"primary": {"requests": n, "statuses": {"200": n}, "wires": {"gemini": n}}}

        # the night a model is retired: the chain moves on to the backup, through the openai SDK
        (tmp_path / "config.yaml").write_text(
            config.replace("http://127.0.0.1:8600", server.url).replace(
                "model: gemini-3-pro-image-preview", "model: retired-model"
            )
        )
        result = run_example("gemini-2")
        assert result.returncode == 0, result.stderr[-3000:]
        log = httpx.get(f"{server.url}/_emulator/log").json()["providers"]
    assert log["primary"]["statuses"] == {"200": n, "404": n}
    assert log["backup"] == {"requests": n, "statuses": {"200": n}, "wires": {"openai": n}}

    first = [
        json.loads(x) for x in (tmp_path / "out/gemini-1/manifest.jsonl").read_text().splitlines()
    ]
    assert {(r["provider"], r["model"], r["status"]) for r in first} == {
        ("primary", "gemini-3-pro-image-preview", "succeeded")
    }
    assert first[0]["cost_usd"] == 0.134
    second = [
        json.loads(x) for x in (tmp_path / "out/gemini-2/manifest.jsonl").read_text().splitlines()
    ]
    assert {(r["provider"], r["status"]) for r in second} == {("backup", "succeeded")}
    assert [a["outcome"] for a in second[0]["attempts"]] == ["ModelNotFound", "ok"]
    for record in first + second:
        with Image.open(record["objects"][0]["uri"].removeprefix("file://")) as im:
            im.load()


def test_rerun_runs_only_what_did_not_succeed_and_blocked_only_on_request(tmp_path, prefect_server):
    from imagebatch.emulator import EmulatorProfile, EmulatorServer, ProviderProfile

    prompts = tmp_path / "night.jsonl"
    prompts.write_text(
        '{"id": "cat", "prompt": "a cat"}\n{"id": "odd", "prompt": "something forbidden"}\n'
        '{"id": "dog", "prompt": "a dog"}\n'
    )
    # two requests a day: the refused prompt uses one, so one good prompt is left unsent
    profile = EmulatorProfile(
        providers={"primary": ProviderProfile(rpd=2, safety_keywords=["forbidden"])}
    )
    with EmulatorServer(profile) as server:
        (tmp_path / "config.yaml").write_text(
            "providers:\n"
            f"  - {{name: primary, kind: gemini, model: m, base_url: {server.url},\n"
            "     api_key_env: K}\n"
            "renditions: [{name: original, format: png}]\nfailure_threshold: 0.5\n"
        )
        keys = {"K": "emulator-key"}
        first = _imagebatch(
            "run",
            str(prompts),
            "--config",
            "config.yaml",
            "--output",
            "out",
            "--batch-id",
            "n1",
            "--quiet",
            api_url=prefect_server,
            cwd=tmp_path,
            env=keys,
        )
        assert first.returncode == 0, first.stderr[-2000:]
        manifest = tmp_path / "out" / "n1" / "manifest.jsonl"
        # the prompts go out at once, in no set order: whichever is third finds the day's quota
        # spent. The refused prompt either used a request (and a good one is left unsent) or is
        # the one left unsent.
        skipped = [
            r["id"]
            for r in map(json.loads, manifest.read_text().splitlines())
            if r["status"] == "skipped"
        ]
        assert len(skipped) == 1, manifest.read_text()
        if skipped == ["odd"]:
            assert "succeeded 2  blocked 0  failed 0  skipped 1" in first.stdout
        else:
            assert "succeeded 1  blocked 1  failed 0  skipped 1" in first.stdout

        httpx.post(f"{server.url}/_emulator/providers/primary", json={"rpd": 100})
        sent_before = len(server.emulator.log)
        second = _imagebatch(
            "rerun", str(manifest), "--quiet", api_url=prefect_server, cwd=ROOT, env=keys
        )
        if skipped == ["odd"]:  # the rerun's only prompt was refused: nothing published, Failed
            assert second.returncode == 1, second.stderr[-2000:]
            assert "the providers refused every prompt" in second.stdout + second.stderr
        else:
            assert second.returncode == 0, second.stderr[-2000:]
        assert "succeeded 2  blocked 1  failed 0  skipped 0  resumed 2" in second.stdout
        assert len(server.emulator.log) == sent_before + 1  # only the skipped prompt was sent

        # the refused prompt is left alone unless asked for (whichever way the first run went)
        again = _imagebatch(
            "rerun", str(manifest), "--quiet", api_url=prefect_server, cwd=ROOT, env=keys
        )
        assert again.returncode == 0, again.stderr[-2000:]
        assert "succeeded 2  blocked 1  failed 0  skipped 0  resumed 3" in again.stdout
        assert len(server.emulator.log) == sent_before + 1

        httpx.post(f"{server.url}/_emulator/providers/primary", json={"safety_keywords": []})
        third = _imagebatch(
            "rerun",
            str(manifest),
            "--include-blocked",
            "--quiet",
            api_url=prefect_server,
            cwd=ROOT,
            env=keys,
        )
        assert third.returncode == 0, third.stderr[-2000:]
        assert len(server.emulator.log) == sent_before + 2
    records = {r["id"]: r for r in map(json.loads, manifest.read_text().splitlines())}
    assert {k: r["status"] for k, r in records.items()} == dict.fromkeys(
        ("cat", "odd", "dog"), "succeeded"
    )


def test_rerun_names_a_missing_manifest(tmp_path, prefect_server):
    result = _imagebatch("rerun", "nope/manifest.jsonl", api_url=prefect_server, cwd=tmp_path)
    assert result.returncode == 2 and "no batch settings (_batch.json) beside it" in result.stderr


def test_a_night_of_blank_images_is_failed_with_the_reason_and_exit_1(tmp_path, prefect_server):
    from imagebatch.emulator import EmulatorProfile, EmulatorServer, ProviderProfile, ScriptedFault

    # the provider's silent filter answers every prompt with an all-black image
    profile = EmulatorProfile(
        providers={
            "primary": ProviderProfile(script=[ScriptedFault(first=1, last=1000, fault="blank")])
        }
    )
    config = (ROOT / "examples" / "emulator.yaml").read_text()
    only_primary = config.split("  - name: backup")[0] + config[config.index("routing:") :]
    with EmulatorServer(profile) as server:
        (tmp_path / "config.yaml").write_text(
            only_primary.replace("http://127.0.0.1:8600", server.url)
        )
        result = _imagebatch(
            "run",
            str(EXAMPLE),
            "--config",
            "config.yaml",
            "--output",
            "out",
            "--batch-id",
            "blank",
            "--quiet",
            api_url=prefect_server,
            cwd=tmp_path,
            env={"GEMINI_API_KEY": "k", "IMAGEBATCH_TIME_SCALE": "100"},
        )
    n = len(EXAMPLE.read_text().splitlines())
    assert result.returncode == 1, result.stderr[-3000:]
    # two blank images may be the filter; the third in a row says the provider is at fault:
    # the rest fail (one provider: nowhere to go), and nothing was published
    assert f"batch blank: Failed (0 succeeded, 2 blocked, {n - 2} failed of {n} prompts" in (
        result.stdout
    )
    assert "nothing published: a provider returned blank images" in result.stdout
    records = [
        json.loads(x) for x in (tmp_path / "out/blank/manifest.jsonl").read_text().splitlines()
    ]
    failed = [r for r in records if r["status"] == "failed"]
    assert all("blank images for 3 prompts in a row" in r["error"] for r in failed)
