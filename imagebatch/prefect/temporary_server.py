"""The Prefect server a command records to: ``PREFECT_API_URL``'s, or a temporary one.

Without ``PREFECT_API_URL`` Prefect would start a server inside the process; this starts one
as a subprocess instead, with a watchdog that stops it when the command's process is gone
however it ends (a SIGKILL runs no exit handler).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["prepare_environment", "recording_server"]


def prepare_environment(*, quiet: bool = False) -> None:
    """Settings a command sets before Prefect is imported (each can still be overridden)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # a temporary server's first start migrates its database, which takes longer than
    # Prefect's 20 s default on a small machine
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # that temporary server is stopped at exit mid-flush and logs tracebacks about its own
    # shutdown; this affects only a server started by this process, never a real one
    os.environ.setdefault("PREFECT_LOGGING_SERVER_LEVEL", "CRITICAL")
    if quiet:  # the terminal shows warnings and errors; the server still gets every log line
        os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "WARNING"


@contextmanager
def recording_server() -> Iterator[None]:
    """The Prefect server the run records to: ``PREFECT_API_URL``'s, or else a temporary one
    that ends with this process however it ends (a watchdog stops it if this process is
    killed, where no exit handler runs)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    import subprocess

    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start(timeout=int(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"]))
    process = server.server_process
    watchdog = subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(process.pid if process else 0)],
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # a Ctrl-C to this terminal's group does not end it early
    )
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            yield
    finally:
        # what the run logged and emitted reaches the server before it stops
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        for worker in (APILogWorker, EventsWorker):
            worker.drain_all(timeout=5)
        server.stop()
        watchdog.kill()
        watchdog.wait()


#: run beside a temporary server: when the CLI (argv 1) is gone, stop the server (argv 2)
_WATCHDOG = """
import os, signal, sys, time
parent, server = int(sys.argv[1]), int(sys.argv[2])
def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
while os.getppid() == parent and alive(server):
    time.sleep(0.5)
if alive(server):
    os.kill(server, signal.SIGTERM)
    for _ in range(20):
        time.sleep(0.25)
        if not alive(server):
            break
    else:
        os.kill(server, signal.SIGKILL)
"""
