"""Shared fixtures. Prefect's home and the test server live in temporary directories."""

from __future__ import annotations

import os
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# before anything imports prefect or google.auth
_HOME = tempfile.mkdtemp(prefix="imagebatch-tests-")
os.environ["PREFECT_HOME"] = _HOME
os.environ["IMAGEBATCH_STATE_DIR"] = os.path.join(_HOME, "imagebatch-state")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_LOGGING_SERVER_LEVEL"] = "WARNING"
os.environ.pop("PREFECT_API_URL", None)
os.environ.pop("PREFECT_PROFILE", None)
os.environ.setdefault("NO_GCE_CHECK", "true")
os.environ.setdefault("GCE_METADATA_HOST", "127.0.0.1:9")
os.environ.setdefault("GCE_METADATA_IP", "127.0.0.1:9")

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[str]:
    """One real Prefect server (subprocess, fresh SQLite) for the whole session; its API URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield str(PREFECT_API_URL.value())


@pytest.fixture(autouse=True)
def _own_state_dir(tmp_path: Path, monkeypatch) -> None:
    """Daily usage and provider health of one test never reach another."""
    monkeypatch.setenv("IMAGEBATCH_STATE_DIR", str(tmp_path / "imagebatch-state"))


@pytest.fixture
def write_file(tmp_path: Path):
    """Write ``text`` to ``tmp_path / name`` and return the path."""

    def write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return write


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory) -> Iterator:
    """A real GCS emulator (fake-gcs-server from the test extra) for the whole session."""
    from tests.gcs import FakeGcsServer

    server = FakeGcsServer(tmp_path_factory.mktemp("gcs") / "fake-gcs-server.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def gcs_bucket(gcs_server, monkeypatch, request) -> str:
    """A fresh, empty bucket on the emulator, which google-cloud-storage now reaches."""
    import re
    import uuid

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    bucket = f"{name}-{uuid.uuid4().hex[:8]}"
    gcs_server.create_bucket(bucket)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server.url)
    # fast storage retries for every sink a test or a flow opens
    monkeypatch.setenv("IMAGEBATCH_STORAGE_RETRY_INITIAL_S", "0.05")
    monkeypatch.setenv("IMAGEBATCH_STORAGE_RETRY_MAX_S", "0.2")
    monkeypatch.setenv("IMAGEBATCH_STORAGE_RETRY_DEADLINE_S", "20")
    return bucket


@pytest.fixture(scope="module")
def real_prefect_server(tmp_path_factory) -> Iterator[str]:
    """``prefect server start`` (one per test module): unlike the test harness's server it runs
    Prefect's services, among them the repossessor that frees expired concurrency leases every
    15 s (a killed worker's slots come back only there)."""
    from bench.night import start_prefect_server

    server, url = start_prefect_server(tmp_path_factory.mktemp("real-prefect"))
    try:
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
